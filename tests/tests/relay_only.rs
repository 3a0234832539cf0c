//! `--relay-only`: tproxy's relay behind the kernel documentation's iptables TPROXY recipe,
//! the way an operator migrates (and the way the benchmark isolates the cost of steering).

use std::process::Command;

use tproxy_tests::{
    ingress_programs, peer_seen_by, require_root, routing_state, RouterTopology as Topo, Server,
    Tproxy,
};

fn iptables(netns: &tproxy_tests::Netns, args: &[&str]) {
    let status = Command::new("ip")
        .args(["netns", "exec", &netns.name, "iptables"])
        .args(args)
        .status()
        .expect("running iptables");
    assert!(status.success(), "iptables {args:?}");
}

#[test]
fn relay_only_serves_an_iptables_tproxy_rule_set_and_installs_nothing() {
    require_root();
    let topo = Topo::new().unwrap();
    let router = &topo.router;
    iptables(router, &["-t", "mangle", "-N", "DIVERT"]);
    iptables(
        router,
        &[
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "-m",
            "socket",
            "-j",
            "DIVERT",
        ],
    );
    iptables(
        router,
        &[
            "-t",
            "mangle",
            "-A",
            "DIVERT",
            "-j",
            "MARK",
            "--set-mark",
            "1",
        ],
    );
    iptables(router, &["-t", "mangle", "-A", "DIVERT", "-j", "ACCEPT"]);
    iptables(
        router,
        &[
            "-t",
            "mangle",
            "-A",
            "PREROUTING",
            "-i",
            Topo::ROUTER_CLIENT_IFACE,
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "TPROXY",
            "--tproxy-mark",
            "0x1/0x1",
            "--on-ip",
            "127.0.0.1",
            "--on-port",
            "15001",
        ],
    );
    router
        .ip(&["rule", "add", "fwmark", "1", "lookup", "100"])
        .unwrap();
    router
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

    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let mut tproxy = Tproxy::start(
        router,
        &["--relay-only", "--tcp", "80", "--listen", "127.0.0.1:15001"],
    )
    .unwrap();
    assert!(
        tproxy.log_text().contains("relay only"),
        "{}",
        tproxy.log_text()
    );
    assert_eq!(
        peer_seen_by(&topo.client, server.addr).unwrap(),
        Topo::router_as_seen_by_server(false)
    );
    assert!(ingress_programs(router, Topo::ROUTER_CLIENT_IFACE)
        .unwrap()
        .is_empty());
    assert_eq!(routing_state(router, 7470).unwrap(), "");
    tproxy.stop().unwrap();
    assert!(
        tproxy
            .log_text()
            .contains("tcp relay: 1 connections accepted"),
        "{}",
        tproxy.log_text()
    );
}
