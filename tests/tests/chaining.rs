//! Two tproxy instances (two tables, two marks) on one interface, each steering its own port:
//! what one leaves must reach the next program at the hook. Before, the first program's pass
//! verdict ended the TCX chain, and the second never saw a packet.

use tproxy_tests::{
    peer_seen_by, require_root, run_tproxy_output, RouterTopology as Topo, Server, Tproxy,
};

#[test]
fn a_second_instance_on_the_same_interface_steers_its_own_ports() {
    require_root();
    let topo = Topo::new().unwrap();
    let first = topo.tproxy(&["--tcp", "80"]).unwrap();
    let mut second = topo
        .tproxy(&[
            "--tcp",
            "81",
            "--table",
            "7471",
            "--mark",
            "0x4000000/0x4000000",
            "--socket-mark",
            "0x8000000",
        ])
        .unwrap();
    for v6 in [false, true] {
        for port in [80, 81] {
            let server = Server::tell_peer(&topo.server, Topo::server_addr(v6, port)).unwrap();
            assert_eq!(
                peer_seen_by(&topo.client, server.addr).unwrap(),
                Topo::router_as_seen_by_server(v6),
                "port {port} (v6={v6}) relayed"
            );
        }
        // Neither instance steers port 82: it goes on to the server untouched.
        let server = Server::tell_peer(&topo.server, Topo::server_addr(v6, 82)).unwrap();
        assert_eq!(
            peer_seen_by(&topo.client, server.addr).unwrap(),
            Topo::client_ip(v6),
            "port 82 (v6={v6}) untouched"
        );
    }

    // doctor names both programs at the hook.
    let (_, stdout, stderr) = run_tproxy_output(
        &topo.router,
        &["doctor", "--iface", Topo::ROUTER_CLIENT_IFACE],
    )
    .unwrap();
    let report = format!("{stdout}{stderr}");
    assert!(report.contains("2 programs at TCX ingress"), "{report}");
    assert!(report.contains("More than one tproxy instance"), "{report}");

    second.stop().unwrap();
    assert_eq!(second.final_counter("tcp", "steered_new").unwrap(), 2);
    drop::<Tproxy>(first);
}
