//! Nothing of ours outlives a run: not after SIGTERM, not after a failed start, and after a
//! SIGKILL the next start removes what was left and runs normally.

use nix::sys::signal::Signal;
use tproxy_tests::{
    ingress_programs, instance_files, peer_seen_by, require_root, routing_state, run_tproxy_to_end,
    Netns, RouterTopology as Topo, Server, Tproxy,
};

const TABLE: u32 = tproxy_tests::DEFAULT_TABLE;
const IFACE: &str = Topo::ROUTER_CLIENT_IFACE;

fn assert_installed(topo: &Topo) {
    assert_eq!(
        ingress_programs(&topo.router, IFACE).unwrap(),
        ["tproxy_ingress"]
    );
    let routing = routing_state(&topo.router, TABLE).unwrap();
    assert_eq!(
        routing.lines().count(),
        4,
        "two rules and two local routes:\n{routing}"
    );
    assert_eq!(
        instance_files(&topo.router, TABLE).len(),
        2,
        "lock and control socket"
    );
}

fn assert_nothing_left(topo: &Topo) {
    assert!(ingress_programs(&topo.router, IFACE).unwrap().is_empty());
    assert_eq!(routing_state(&topo.router, TABLE).unwrap(), "");
    assert_eq!(
        instance_files(&topo.router, TABLE),
        Vec::<std::path::PathBuf>::new(),
        "lock file or control socket left in /run/tproxy"
    );
}

#[test]
fn sigterm_removes_program_rules_and_routes() {
    require_root();
    let topo = Topo::new().unwrap();
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let mut tproxy = topo.tproxy(&["--tcp", "80"]).unwrap();
    assert_installed(&topo);
    assert_eq!(
        peer_seen_by(&topo.client, server.addr).unwrap(),
        Topo::router_as_seen_by_server(false)
    );
    tproxy.stop().unwrap();
    assert_nothing_left(&topo);
    assert_eq!(
        peer_seen_by(&topo.client, server.addr).unwrap(),
        Topo::client_ip(false)
    );
}

#[test]
fn sigint_also_cleans_up() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = topo.tproxy(&["--tcp", "80"]).unwrap();
    assert_installed(&topo);
    assert!(tproxy.signal_and_wait(Signal::SIGINT).unwrap().success());
    assert_nothing_left(&topo);
}

#[test]
fn after_sigkill_the_next_start_removes_stale_state() {
    require_root();
    let topo = Topo::new().unwrap();
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let mut killed = topo.tproxy(&["--tcp", "80"]).unwrap();
    killed.signal_and_wait(Signal::SIGKILL).unwrap();
    // The TCX link died with its process; the routing could not be removed by a dead process.
    assert!(ingress_programs(&topo.router, IFACE).unwrap().is_empty());
    assert_eq!(
        routing_state(&topo.router, TABLE).unwrap().lines().count(),
        4
    );

    let mut next = topo.tproxy(&["--tcp", "80"]).unwrap();
    assert!(
        next.log_text().contains("removed 4 rules/routes"),
        "{}",
        next.log_text()
    );
    assert_installed(&topo);
    assert_eq!(
        peer_seen_by(&topo.client, server.addr).unwrap(),
        Topo::router_as_seen_by_server(false)
    );
    next.stop().unwrap();
    assert_nothing_left(&topo);
}

#[test]
fn a_second_instance_on_the_same_table_is_refused_and_the_first_keeps_working() {
    require_root();
    let topo = Topo::new().unwrap();
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let mut first = topo.tproxy(&["--tcp", "80"]).unwrap();
    let (status, stderr) =
        run_tproxy_to_end(&topo.router, &["run", "--iface", IFACE, "--tcp", "80"]).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("another tproxy") && stderr.contains(&format!("table {TABLE}")),
        "{stderr}"
    );
    assert_installed(&topo);
    assert_eq!(
        peer_seen_by(&topo.client, server.addr).unwrap(),
        Topo::router_as_seen_by_server(false)
    );
    first.stop().unwrap();
    assert_nothing_left(&topo);
}

#[test]
fn a_start_that_fails_late_leaves_nothing_behind() {
    require_root();
    let topo = Topo::new().unwrap();
    // The lock is taken and stale routing looked for, then a listener cannot bind.
    let _taken = topo
        .router
        .listen("127.0.0.1:7000".parse().unwrap())
        .unwrap();
    let (status, stderr) = run_tproxy_to_end(
        &topo.router,
        &[
            "run",
            "--iface",
            IFACE,
            "--tcp",
            "80",
            "--listen",
            "127.0.0.1:7000",
        ],
    )
    .unwrap();
    assert!(!status.success());
    assert!(stderr.contains("--listen 127.0.0.1:7000"), "{stderr}");
    assert_nothing_left(&topo);

    // The IPv4 local route goes in, the IPv6 one cannot (IPv6 is off on lo): the IPv4 route
    // must be taken out again before tproxy exits.
    topo.router
        .sysctl("net.ipv6.conf.lo.disable_ipv6", "1")
        .unwrap();
    let (status, stderr) =
        run_tproxy_to_end(&topo.router, &["run", "--iface", IFACE, "--tcp", "80"]).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("adding `local IPv6 default dev lo table {TABLE}`")),
        "{stderr}"
    );
    assert_nothing_left(&topo);
}

#[test]
fn sigkill_under_load_fails_open_ends_relayed_connections_and_the_next_start_cleans_up() {
    use std::{
        io::{Read, Write},
        time::{Duration, Instant},
    };
    require_root();
    let topo = Topo::new().unwrap();
    let echo = Server::echo(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let udp = tproxy_tests::UdpEcho::start(&topo.server, Topo::server_addr(false, 5300)).unwrap();
    let tell = Server::tell_peer(&topo.server, "10.10.2.3:80".parse().unwrap()).unwrap();
    let mut killed = topo.tproxy(&["--tcp", "80", "--udp", "5300"]).unwrap();
    let load: Vec<_> = (0..10)
        .map(|_| {
            let mut stream = topo.client.connect(echo.addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            std::thread::spawn(move || -> Duration {
                // Exchanges until the relay goes away; returns how long the end took to show.
                loop {
                    let sent = Instant::now();
                    let mut back = [0u8; 5];
                    let alive =
                        stream.write_all(b"hello").is_ok() && stream.read_exact(&mut back).is_ok();
                    if !alive {
                        return sent.elapsed();
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    killed.signal_and_wait(Signal::SIGKILL).unwrap();

    // Fail-open: new flows go straight to their destination at once.
    assert_eq!(
        peer_seen_by(&topo.client, tell.addr).unwrap(),
        Topo::client_ip(false),
        "a new TCP connection is not steered"
    );
    let client = tproxy_tests::udp_client(&topo.client, udp.addr).unwrap();
    tproxy_tests::udp_exchange(&client, udp.addr, b"after the kill").unwrap();
    assert_eq!(
        udp.peers.lock().unwrap().last().unwrap().ip(),
        Topo::client_ip(false),
        "a new UDP flow is not steered"
    );
    // Relayed connections end (their sockets died with the process) instead of hanging.
    for thread in load {
        let took = thread.join().unwrap();
        assert!(
            took < Duration::from_secs(5),
            "a relayed connection hung for {took:?}"
        );
    }

    let mut next = topo.tproxy(&["--tcp", "80", "--udp", "5300"]).unwrap();
    assert!(
        next.log_text().contains("removed 4 rules/routes"),
        "{}",
        next.log_text()
    );
    assert_eq!(
        peer_seen_by(&topo.client, tell.addr).unwrap(),
        Topo::router_as_seen_by_server(false),
        "steered again after the restart"
    );
    next.stop().unwrap();
    assert_nothing_left(&topo);
}

#[test]
fn cleanup_removes_what_a_killed_instance_left_and_nothing_else() {
    require_root();
    let topo = Topo::new().unwrap();
    // Someone else's state: a rule, a table of routes, a tc filter at the same hook.
    topo.router
        .ip(&[
            "rule", "add", "fwmark", "0x5", "lookup", "100", "priority", "4700",
        ])
        .unwrap();
    topo.router
        .ip(&[
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        ])
        .unwrap();
    let tc = |args: &[&str]| {
        let status = std::process::Command::new("tc")
            .args(["-n", &topo.router.name])
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "tc {args:?}");
    };
    tc(&["qdisc", "add", "dev", IFACE, "clsact"]);
    // A classic BPF filter that accepts everything: not tproxy's, so it must survive.
    tc(&[
        "filter",
        "add",
        "dev",
        IFACE,
        "ingress",
        "bpf",
        "bytecode",
        "1,6 0 0 0,",
    ]);
    let others = |topo: &Topo| {
        (
            topo.router.ip(&["rule", "show"]).unwrap(),
            topo.router.ip(&["route", "show", "table", "100"]).unwrap(),
            String::from_utf8(
                std::process::Command::new("tc")
                    .args([
                        "-n",
                        &topo.router.name,
                        "filter",
                        "show",
                        "dev",
                        IFACE,
                        "ingress",
                    ])
                    .output()
                    .unwrap()
                    .stdout,
            )
            .unwrap(),
        )
    };

    let mut running = topo.tproxy(&["--tcp", "80"]).unwrap();
    let (status, stderr) = run_tproxy_to_end(&topo.router, &["cleanup"]).unwrap();
    assert!(
        !status.success() && stderr.contains(&format!("is running with routing table {TABLE}")),
        "{stderr}"
    );
    assert_eq!(
        routing_state(&topo.router, TABLE).unwrap().lines().count(),
        4
    );
    running.signal_and_wait(Signal::SIGKILL).unwrap();
    assert_eq!(
        instance_files(&topo.router, TABLE).len(),
        2,
        "a killed instance leaves its lock file and control socket"
    );

    let before = others(&topo);
    assert!(before.2.contains("bytecode"), "{}", before.2);
    let (status, stdout, stderr) =
        tproxy_tests::run_tproxy_output(&topo.router, &["cleanup"]).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!(
            "removed 4 policy routing rules and routes of table {TABLE}"
        )),
        "{stdout}"
    );
    assert_eq!(routing_state(&topo.router, TABLE).unwrap(), "");
    assert!(!ingress_programs(&topo.router, IFACE)
        .unwrap()
        .contains(&"tproxy_ingress".to_string()));
    let after = others(&topo);
    let ours = |rules: &str| {
        rules
            .lines()
            .filter(|l| !l.contains(&format!("lookup {TABLE}")))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(ours(&after.0), ours(&before.0), "someone else's rules");
    assert_eq!(after.1, before.1, "someone else's routes");
    assert_eq!(after.2, before.2, "someone else's tc filter");
    assert_eq!(
        instance_files(&topo.router, TABLE),
        Vec::<std::path::PathBuf>::new()
    );

    let (status, stdout, _) = tproxy_tests::run_tproxy_output(&topo.router, &["cleanup"]).unwrap();
    assert!(
        status.success() && stdout.contains("nothing of tproxy's was left"),
        "{stdout}"
    );
}

#[test]
fn status_as_another_user_says_permission_denied_not_that_nothing_runs() {
    require_root();
    let topo = Topo::new().unwrap();
    let status_as_nobody = || {
        std::process::Command::new("ip")
            .args(["netns", "exec", &topo.router.name])
            .args([
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ])
            .arg(tproxy_tests::tproxy_bin())
            .arg("status")
            .output()
            .unwrap()
    };
    let mut tproxy = topo.tproxy(&["--tcp", "80"]).unwrap();
    let refused = status_as_nobody();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    tproxy.stop().unwrap();

    let stopped = status_as_nobody();
    assert_eq!(
        stopped.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    assert!(String::from_utf8_lossy(&stopped.stdout).contains("not running"));
}

#[test]
fn start_up_warnings_are_said_once_and_say_what_the_fail_mode_does() {
    require_root();
    let topo = Topo::new().unwrap();
    for (fail_mode, fate) in [
        ("open", "passed on untouched (fail mode open)"),
        ("closed", "dropped (fail mode closed)"),
    ] {
        let mut tproxy = topo
            .tproxy(&[
                "--tcp",
                "80",
                "--udp",
                "53",
                "--listen",
                "10.10.2.1:0",
                "--fail-mode",
                fail_mode,
            ])
            .unwrap();
        tproxy.stop().unwrap();
        let log = tproxy.log_text();
        assert_eq!(
            log.matches("is not on loopback").count(),
            1,
            "one listener address, bound for TCP and UDP:\n{log}"
        );
        let no_ipv6 = log
            .lines()
            .find(|line| line.contains("has no IPv6 address"))
            .unwrap_or_else(|| panic!("no warning about IPv6:\n{log}"));
        assert!(no_ipv6.contains(fate), "--fail-mode {fail_mode}: {no_ipv6}");
    }
}

/// A killed instance cannot remove its lock file and control socket, and once its network
/// namespace is gone no `cleanup` can be run there: any other namespace's `cleanup` removes
/// them, and leaves a running instance's alone.
#[test]
fn cleanup_removes_the_files_killed_instances_left_for_namespaces_that_are_gone() {
    require_root();
    let gone = Netns::new("gone").unwrap();
    let mut killed = Tproxy::start(&gone, &["--iface", "lo", "--tcp", "80"]).unwrap();
    let left = instance_files(&gone, TABLE);
    assert_eq!(left.len(), 2, "lock and control socket");
    killed.signal_and_wait(Signal::SIGKILL).unwrap();
    drop(killed);
    drop(gone);
    assert!(left.iter().all(|file| file.exists()), "{left:?}");

    let alive = Netns::new("alive").unwrap();
    let mut running = Tproxy::start(&alive, &["--iface", "lo", "--tcp", "80"]).unwrap();
    let cleaner = Netns::new("cleaner").unwrap();
    let (status, stdout, stderr) = tproxy_tests::run_tproxy_output(&cleaner, &["cleanup"]).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains("removed the lock files and control sockets of"),
        "{stdout}"
    );
    assert!(left.iter().all(|file| !file.exists()), "{left:?}");
    assert_eq!(instance_files(&alive, TABLE).len(), 2, "the running one's");
    running.stop().unwrap();
}

/// The ready line says what it waits for when no interface matches yet, instead of an
/// empty list.
#[test]
fn the_ready_line_names_the_patterns_no_interface_matches_yet() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = Tproxy::start(&topo.router, &["--iface", "late*", "--tcp", "80"]).unwrap();
    let ready = tproxy
        .log_text()
        .lines()
        .find(|line| line.contains("ready:"))
        .map(str::to_string)
        .unwrap();
    assert!(
        ready.contains("rules on no interface yet (waiting for 'late*'); listeners"),
        "{ready}"
    );
    tproxy.stop().unwrap();
}

/// What removes tproxy's policy routing under it (`lo` set down takes the routes through it,
/// an operator deletes the rule or flushes the table) is put back, and steering goes on:
/// before, every steered connection timed out from then on, silently (found by the hostile
/// run).
#[test]
fn policy_routing_removed_under_a_running_instance_is_put_back() {
    require_root();
    let topo = Topo::new().unwrap();
    let servers =
        [false, true].map(|v6| Server::tell_peer(&topo.server, Topo::server_addr(v6, 80)).unwrap());
    let mut tproxy = topo.tproxy(&["--tcp", "80"]).unwrap();
    let steered = |round: &str| {
        for (v6, server) in [false, true].iter().zip(&servers) {
            assert_eq!(
                peer_seen_by(&topo.client, server.addr).unwrap(),
                Topo::router_as_seen_by_server(*v6),
                "{round}: IPv{}",
                if *v6 { 6 } else { 4 }
            );
        }
    };
    steered("before");
    let removals: [&[&[&str]]; 3] = [
        &[&["link", "set", "lo", "down"], &["link", "set", "lo", "up"]],
        &[&["-6", "rule", "del", "lookup", &TABLE.to_string()]],
        &[&["route", "flush", "table", &TABLE.to_string()]],
    ];
    for removal in removals {
        for command in removal {
            topo.router.ip(command).unwrap();
        }
        tproxy
            .wait_for_line("put back", std::time::Duration::from_secs(10))
            .unwrap();
        assert_installed(&topo);
        steered(&format!("after `ip {}`", removal[0].join(" ")));
    }
    tproxy.stop().unwrap();
    assert_nothing_left(&topo);
}
