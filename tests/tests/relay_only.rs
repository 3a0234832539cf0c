//! `--relay-only`: tproxy's relay behind the kernel documentation's iptables TPROXY recipe,
//! the way an operator migrates (and the way the benchmark isolates the cost of steering).

use tproxy_tests::{
    ingress_programs, install_iptables_tproxy, peer_seen_by, require_root, routing_state,
    IptablesTproxy, RouterTopology as Topo, Server, Tproxy,
};

#[test]
fn relay_only_serves_an_iptables_tproxy_rule_set_and_installs_nothing() {
    require_root();
    let topo = Topo::new().unwrap();
    let router = &topo.router;
    let recipe = IptablesTproxy {
        iface: Topo::ROUTER_CLIENT_IFACE,
        tcp_ports: &[80],
        udp_ports: &[],
        on_port: 15001,
        decoys: &[],
    };
    install_iptables_tproxy(router, &recipe).unwrap();

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
    assert_eq!(
        routing_state(router, tproxy_tests::DEFAULT_TABLE).unwrap(),
        ""
    );
    tproxy.stop().unwrap();
    // No control socket to ask without the steering (`status` finds nothing): the exit log.
    assert!(
        tproxy.log_text().contains("tcp relay: accepted=1 "),
        "{}",
        tproxy.log_text()
    );
}
