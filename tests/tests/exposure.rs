//! What tproxy does with flows addressed to the router itself: steered like any destination
//! unless a bypass rule says otherwise (the equivalent of the iptables recipes'
//! `-m addrtype --dst-type LOCAL -j RETURN`).

use tproxy_tests::{peer_seen_by, require_root, ConfigFile, RouterTopology as Topo, Server};

#[test]
fn a_flow_to_a_local_address_is_relayed_to_the_local_service_unless_bypassed() {
    require_root();
    let topo = Topo::new().unwrap();
    // A service on the router itself, on the steered port.
    let local = Server::tell_peer(&topo.router, "10.10.1.1:80".parse().unwrap()).unwrap();
    let client = Topo::client_ip(false);

    let mut tproxy = topo.tproxy(&["--tcp", "80"]).unwrap();
    let peer = peer_seen_by(&topo.client, local.addr).unwrap();
    assert_eq!(
        peer.to_string(),
        "10.10.1.1",
        "relayed: the local service sees tproxy"
    );
    tproxy.stop().unwrap();
    assert_eq!(tproxy.final_counter("tcp", "steered_new").unwrap(), 1);

    let config = ConfigFile::new(
        "[[listener]]\nname = \"web\"\n\n\
         [[rule]]\nproto = \"tcp\"\nports = 80\naction = \"steer\"\n\n\
         [[rule]]\nproto = \"tcp\"\ndst = [\"10.10.1.1/32\", \"10.10.2.1/32\"]\naction = \"bypass\"\n",
    )
    .unwrap();
    let mut tproxy = topo.tproxy(&["--config", config.path()]).unwrap();
    assert_eq!(
        peer_seen_by(&topo.client, local.addr).unwrap(),
        client,
        "bypassed: untouched"
    );
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    assert_eq!(
        peer_seen_by(&topo.client, server.addr).unwrap(),
        Topo::router_as_seen_by_server(false),
        "other destinations are still steered"
    );
    tproxy.stop().unwrap();
    assert_eq!(tproxy.final_counter("tcp", "steered_new").unwrap(), 1);
}

#[test]
fn steering_on_lo_does_not_steer_the_relays_own_connections() {
    require_root();
    let topo = Topo::new().unwrap();
    let service = Server::tell_peer(&topo.router, "127.0.0.1:9000".parse().unwrap()).unwrap();
    let mut tproxy =
        tproxy_tests::Tproxy::start(&topo.router, &["--iface", "lo", "--tcp", "9000"]).unwrap();
    // A local client's connection is steered on lo; the relay's own connection onward to the
    // same address and port carries tproxy's socket mark and is not steered again.
    assert_eq!(
        peer_seen_by(&topo.router, service.addr)
            .unwrap()
            .to_string(),
        "127.0.0.1"
    );
    tproxy.stop().unwrap();
    assert_eq!(tproxy.final_counter("tcp", "steered_new").unwrap(), 1);
    assert_eq!(
        tproxy.log_text().matches("relaying via").count(),
        1,
        "{}",
        tproxy.log_text()
    );
}
