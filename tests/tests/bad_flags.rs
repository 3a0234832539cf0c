//! Every bad flag makes `tproxy run` exit non-zero with a message naming the bad value, and
//! leaves nothing attached or installed.

use tproxy_tests::{
    ingress_programs, require_root, routing_state, run_tproxy_to_end, RouterTopology as Topo,
};

const IFACE: &str = Topo::ROUTER_CLIENT_IFACE;

#[test]
fn bad_flags_are_named_and_leave_nothing_behind() {
    require_root();
    let topo = Topo::new().unwrap();
    topo.router
        .ip(&["tuntap", "add", "dev", "tun0", "mode", "tun"])
        .unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--iface", "nosuch0", "--tcp", "80"], "nosuch0"),
        (
            &["--iface", IFACE, "--iface", IFACE, "--tcp", "80"],
            "given twice",
        ),
        (&["--iface", IFACE, "--tcp", "0"], "port 0"),
        (&["--iface", IFACE, "--tcp", "65536"], "65536"),
        (&["--iface", IFACE, "--tcp", "80,90-80"], "90-80"),
        (&["--iface", IFACE, "--tcp", "http"], "`http`"),
        (&["--iface", IFACE, "--udp", "53,0"], "port 0"),
        (
            &["--iface", IFACE, "--udp", "53", "--udp-max-sessions", "0"],
            "--udp-max-sessions",
        ),
        (
            &[
                "--iface",
                IFACE,
                "--udp",
                "53",
                "--udp-idle-timeout",
                "never",
            ],
            "never",
        ),
        (
            &[
                "--iface",
                IFACE,
                "--udp",
                "53",
                "--socket-mark",
                "0x1000000",
            ],
            "--socket-mark 0x1000000",
        ),
        (
            &["--iface", IFACE, "--udp", "53", "--socket-mark", "0"],
            "--socket-mark 0",
        ),
        (&["--iface", IFACE], "--tcp"),
        (&["--tcp", "80"], "--iface"),
        (
            &["--iface", IFACE, "--tcp", "80", "--dst", "10.0.0.0/33"],
            "10.0.0.0/33",
        ),
        (
            &["--iface", IFACE, "--tcp", "80", "--dst", "not-a-net"],
            "not-a-net",
        ),
        (
            &["--iface", IFACE, "--tcp", "80", "--listen", "127.0.0.1"],
            "`127.0.0.1`",
        ),
        (
            &[
                "--iface",
                IFACE,
                "--tcp",
                "80",
                "--upstream",
                "localhost:80",
            ],
            "localhost:80",
        ),
        (&["--iface", IFACE, "--tcp", "80", "--mark", "0xzz"], "0xzz"),
        (
            &["--iface", IFACE, "--tcp", "80", "--mark", "0x3/0x1"],
            "0x3/0x1",
        ),
        (
            &["--iface", IFACE, "--tcp", "80", "--table", "254"],
            "table 254",
        ),
        (
            &["--iface", IFACE, "--tcp", "80", "--rule-priority", "40000"],
            "40000",
        ),
        (
            &["--iface", IFACE, "--tcp", "80", "--connect-timeout", "soon"],
            "soon",
        ),
        (
            &["--iface", IFACE, "--tcp", "80", "--idle-timeout", "0s"],
            "0s",
        ),
        (
            &[
                "--iface",
                IFACE,
                "--tcp",
                "80",
                "--listen",
                "127.0.0.1:0",
                "--listen",
                "127.0.0.2:0",
            ],
            "127.0.0.2:0",
        ),
        (
            &[
                "--iface",
                IFACE,
                "--tcp",
                "80",
                "--listen",
                "192.0.2.1:99999",
            ],
            "192.0.2.1:99999",
        ),
        (
            &["--iface", IFACE, "--tcp", "80", "--fail-mode", "ajar"],
            "`ajar`",
        ),
        (
            &["--iface", IFACE, "--tcp", "80", "--drain-timeout", "later"],
            "later",
        ),
        // Under `ip netns exec`, /sys/fs/bpf is a plain sysfs directory: nothing pinned there
        // would outlive the process.
        (
            &["--iface", IFACE, "--tcp", "80", "--pin"],
            "--pin-dir /sys/fs/bpf/tproxy: not on a bpf filesystem",
        ),
        (
            &[
                "--iface",
                IFACE,
                "--tcp",
                "80",
                "--pin",
                "--pin-dir",
                "/run",
            ],
            "--pin-dir /run: not on a bpf filesystem",
        ),
        (
            &["--relay-only", "--tcp", "80", "--pin"],
            "--pin: with --relay-only",
        ),
    ];
    // An external proxy at tproxy's own listener would have tproxy relay its flows itself.
    let own_as_external = tproxy_tests::ConfigFile::new(&format!(
        "interfaces = [\"{IFACE}\"]\n\
             [[listener]]\nname = \"proxy\"\nexternal = [\"127.0.0.1:3129\"]\n\
             [[listener]]\nname = \"own\"\nlisten = [\"127.0.0.1:3129\"]\n\
             [[rule]]\nproto = [\"tcp\"]\nports = [80]\naction = \"steer\"\nlistener = \"proxy\"\n\
             [[rule]]\nproto = [\"tcp\"]\nports = [81]\naction = \"steer\"\nlistener = \"own\"\n"
    ))
    .unwrap();
    let file_cases: &[(&[&str], &str)] = &[(
        &["--config", own_as_external.path()],
        "listener `proxy`: external 127.0.0.1:3129 is one of tproxy's own listeners",
    )];
    for (flags, named) in cases.iter().chain(file_cases) {
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        let (status, stderr) = run_tproxy_to_end(&topo.router, &args).unwrap();
        assert!(!status.success(), "{flags:?} was accepted");
        assert!(
            stderr.contains(named),
            "{flags:?}: error does not name `{named}`:\n{stderr}"
        );
        assert!(
            ingress_programs(&topo.router, IFACE).unwrap().is_empty(),
            "{flags:?}"
        );
        assert_eq!(
            routing_state(&topo.router, tproxy_tests::DEFAULT_TABLE).unwrap(),
            "",
            "{flags:?}"
        );
    }
}

/// `ExecStartPre=tproxy check` is only worth something if `check` refuses what `run` would.
#[test]
fn check_refuses_what_run_refuses() {
    require_root();
    let topo = Topo::new().unwrap();
    let two_listeners = tproxy_tests::ConfigFile::new(&format!(
        "interfaces = [\"{IFACE}\"]\n\
         [[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:7000\"\n\
         [[listener]]\nname = \"b\"\nlisten = \"127.0.0.1:7000\"\n\
         [[rule]]\nproto = \"tcp\"\nports = 80\naction = \"steer\"\nlistener = \"a\"\n\
         [[rule]]\nproto = \"tcp\"\nports = 81\naction = \"steer\"\nlistener = \"b\"\n"
    ))
    .unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--config", two_listeners.path()],
            "listener `b`: listen 127.0.0.1:7000: listener `a` listens on 127.0.0.1:7000 already",
        ),
        (
            &[
                "--iface",
                IFACE,
                "--tcp",
                "80",
                "--listen",
                "127.0.0.1:7000",
                "--upstream",
                "127.0.0.1:7000",
            ],
            "--upstream 127.0.0.1:7000 is one of tproxy's own listeners",
        ),
        (
            &["--iface", IFACE, "--iface", IFACE, "--tcp", "80"],
            "given twice",
        ),
        (
            &[
                "--iface",
                IFACE,
                "--tcp",
                "80",
                "--listen",
                "127.0.0.1:0",
                "--listen",
                "127.0.0.2:0",
            ],
            "127.0.0.2:0",
        ),
        (
            &["--relay-only", "--tcp", "80", "--pin"],
            "--pin: with --relay-only",
        ),
    ];
    for (flags, named) in cases {
        for command in ["check", "run"] {
            let mut args = vec![command];
            args.extend_from_slice(flags);
            let (status, stderr) = run_tproxy_to_end(&topo.router, &args).unwrap();
            assert!(!status.success(), "`{command}` accepted {flags:?}");
            assert!(
                stderr.contains(named),
                "{command} {flags:?}: error does not name `{named}`:\n{stderr}"
            );
        }
        assert!(ingress_programs(&topo.router, IFACE).unwrap().is_empty());
        assert_eq!(
            routing_state(&topo.router, tproxy_tests::DEFAULT_TABLE).unwrap(),
            ""
        );
    }
}

#[test]
fn help_documents_every_run_flag() {
    let output = std::process::Command::new(tproxy_tests::tproxy_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for flag in [
        "--iface",
        "--tcp",
        "--dst",
        "--listen",
        "--upstream",
        "--mark",
        "--table",
        "--rule-priority",
        "--connect-timeout",
        "--idle-timeout",
        "--udp",
        "--udp-idle-timeout",
        "--udp-max-sessions",
        "--udp-max-sessions-per-source",
        "--socket-mark",
        "--pin",
        "--pin-dir",
        "--fail-mode",
        "--drain-timeout",
    ] {
        assert!(
            help.contains(flag),
            "`tproxy run --help` does not mention {flag}"
        );
    }
}
