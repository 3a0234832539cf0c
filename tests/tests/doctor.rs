//! `tproxy doctor` finds what breaks transparent proxying, and says how to fix it.

use std::process::Command;

use tproxy_tests::{
    install_iptables_tproxy, remove_iptables_tproxy, require_root, run_tproxy_output,
    IptablesTproxy, RouterTopology as Topo,
};

const IFACE: &str = Topo::ROUTER_CLIENT_IFACE;

fn doctor(topo: &Topo) -> (bool, String) {
    let (status, stdout, stderr) =
        run_tproxy_output(&topo.router, &["doctor", "--iface", IFACE]).unwrap();
    (status.success(), format!("{stdout}{stderr}"))
}

fn iptables(topo: &Topo, args: &[&str]) {
    let status = Command::new("ip")
        .args(["netns", "exec", &topo.router.name, "iptables"])
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "iptables {args:?}");
}

#[test]
fn doctor_passes_a_healthy_router_and_finds_each_deliberate_breakage() {
    require_root();
    let topo = Topo::new().unwrap();
    let (healthy, report) = doctor(&topo);
    assert!(healthy, "{report}");
    assert!(report.contains("the steering program loads"), "{report}");
    assert!(report.contains("no problems found"), "{report}");
    assert!(
        report.contains("ok      no FORWARD policy drops what tproxy leaves to be forwarded"),
        "{report}"
    );

    // Strict reverse-path filtering on the steered interface.
    topo.router
        .sysctl(&format!("net.ipv4.conf.{IFACE}.rp_filter"), "1")
        .unwrap();
    let (healthy, report) = doctor(&topo);
    assert!(!healthy, "{report}");
    assert!(
        report.contains("PROBLEM strict reverse-path filtering (rp_filter 1) on to-client"),
        "{report}"
    );
    assert!(
        report.contains("fix: sysctl -w net.ipv4.conf.to-client.rp_filter=2"),
        "{report}"
    );
    topo.router
        .sysctl(&format!("net.ipv4.conf.{IFACE}.rp_filter"), "2")
        .unwrap();
    assert!(doctor(&topo).0);

    // A conflicting iptables TPROXY rule set.
    let recipe = IptablesTproxy {
        iface: IFACE,
        tcp_ports: &[80],
        udp_ports: &[],
        on_port: 15001,
        decoys: &[],
    };
    install_iptables_tproxy(&topo.router, &recipe).unwrap();
    let (healthy, report) = doctor(&topo);
    assert!(!healthy);
    assert!(
        report.contains("iptables-save: 1 TPROXY rule(s) are active"),
        "{report}"
    );
    assert!(report.contains("tproxy translate"), "{report}");
    remove_iptables_tproxy(&topo.router).unwrap();

    // An INPUT policy that drops, then the accept for the mark that fixes it.
    iptables(&topo, &["-P", "INPUT", "DROP"]);
    let (healthy, report) = doctor(&topo);
    assert!(!healthy);
    assert!(
        report.contains(
            "the IPv4 INPUT policy drops, and no rule accepts tproxy's mark 0x1000000/0x1000000"
        ),
        "{report}"
    );
    iptables(
        &topo,
        &[
            "-I",
            "INPUT",
            "-m",
            "mark",
            "--mark",
            "0x1000000/0x1000000",
            "-j",
            "ACCEPT",
        ],
    );
    let (healthy, report) = doctor(&topo);
    assert!(healthy, "{report}");
}

#[test]
fn doctor_checks_that_the_pin_directory_is_on_a_bpf_filesystem() {
    require_root();
    let topo = Topo::new().unwrap();
    let bpffs = tproxy_tests::Bpffs::new().unwrap();
    let run = |dir: &str| {
        let (status, stdout, stderr) = run_tproxy_output(
            &topo.router,
            &["doctor", "--iface", IFACE, "--pin-dir", dir],
        )
        .unwrap();
        (status.success(), format!("{stdout}{stderr}"))
    };
    let (healthy, report) = run(bpffs.path());
    assert!(healthy, "{report}");
    assert!(report.contains("is on a bpf filesystem"), "{report}");
    // Under `ip netns exec`, /sys is a fresh sysfs without a bpffs at /sys/fs/bpf.
    let (healthy, report) = run("/sys/fs/bpf/tproxy");
    assert!(!healthy, "{report}");
    assert!(
        report.contains("/sys/fs/bpf/tproxy is not on a bpf filesystem"),
        "{report}"
    );
    assert!(
        report.contains("fix: mount -t bpf bpf /sys/fs/bpf"),
        "{report}"
    );
}

#[test]
fn doctor_examines_the_interfaces_a_pattern_selects_now() {
    require_root();
    let topo = Topo::new().unwrap();
    topo.router
        .sysctl(&format!("net.ipv4.conf.{IFACE}.rp_filter"), "1")
        .unwrap();
    // Before, a pattern was looked up as an interface name and reported missing.
    let (status, stdout, stderr) =
        run_tproxy_output(&topo.router, &["doctor", "--iface", "to-*"]).unwrap();
    let report = format!("{stdout}{stderr}");
    assert!(!status.success(), "{report}");
    assert!(!report.contains("does not exist"), "{report}");
    assert!(
        report.contains("PROBLEM strict reverse-path filtering (rp_filter 1) on to-client"),
        "{report}"
    );
    assert!(
        report.contains("to-server: reverse-path filtering"),
        "{report}"
    );
    let (status, stdout, stderr) =
        run_tproxy_output(&topo.router, &["doctor", "--iface", "br-*"]).unwrap();
    let report = format!("{stdout}{stderr}");
    assert!(status.success(), "{report}");
    assert!(
        report.contains("br-*: no interface matches it yet"),
        "{report}"
    );
}
