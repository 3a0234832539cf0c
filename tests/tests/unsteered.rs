//! What tproxy must leave alone: other ports, other destinations, and connections that
//! already belong to a local socket.

use std::{
    io::{Read, Write},
    net::SocketAddr,
};

use tproxy_tests::{peer_seen_by, require_root, RouterTopology as Topo, Server};

#[test]
fn other_ports_pass_untouched() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = topo.tproxy(&["--tcp", "80,443"]).unwrap();
    for v6 in [false, true] {
        let steered = Server::tell_peer(&topo.server, Topo::server_addr(v6, 443)).unwrap();
        let other = Server::tell_peer(&topo.server, Topo::server_addr(v6, 8443)).unwrap();
        assert_eq!(
            peer_seen_by(&topo.client, steered.addr).unwrap(),
            Topo::router_as_seen_by_server(v6)
        );
        assert_eq!(
            peer_seen_by(&topo.client, other.addr).unwrap(),
            Topo::client_ip(v6)
        );
    }
    tproxy.stop().unwrap();
    assert_eq!(tproxy.final_counter("tcp", "steered_new").unwrap(), 2);
    assert!(tproxy.final_counter("tcp", "passed").unwrap() > 0);
}

#[test]
fn other_destination_prefixes_pass_untouched() {
    require_root();
    let topo = Topo::new().unwrap();
    let _tproxy = topo
        .tproxy(&[
            "--tcp",
            "80",
            "--dst",
            &format!("{}/32", Topo::SERVER_V4),
            "--dst",
            &format!("{}/128", Topo::SERVER_V6),
        ])
        .unwrap();
    for (v6, steered_ip, other_ip) in [
        (false, Topo::SERVER_V4, Topo::SERVER_OTHER_V4),
        (true, Topo::SERVER_V6, Topo::SERVER_OTHER_V6),
    ] {
        let steered = SocketAddr::new(steered_ip.parse().unwrap(), 80);
        let other = SocketAddr::new(other_ip.parse().unwrap(), 80);
        let _servers = [
            Server::tell_peer(&topo.server, steered).unwrap(),
            Server::tell_peer(&topo.server, other).unwrap(),
        ];
        assert_eq!(
            peer_seen_by(&topo.client, steered).unwrap(),
            Topo::router_as_seen_by_server(v6)
        );
        assert_eq!(
            peer_seen_by(&topo.client, other).unwrap(),
            Topo::client_ip(v6)
        );
    }
}

#[test]
fn established_local_connections_on_a_steered_port_are_not_hijacked() {
    require_root();
    let topo = Topo::new().unwrap();
    for (v6, router_ip) in [(false, "10.10.1.1"), (true, "fd00:1::1")] {
        // A service on the router itself, with a client connected before tproxy starts.
        let local = Server::echo(
            &topo.router,
            SocketAddr::new(router_ip.parse().unwrap(), 80),
        )
        .unwrap();
        let mut stream = topo.client.connect(local.addr).unwrap();
        stream.write_all(b"before").unwrap();
        let mut reply = [0u8; 6];
        stream.read_exact(&mut reply).unwrap();

        let mut tproxy = topo.tproxy(&["--tcp", "80"]).unwrap();
        stream.write_all(b"during").unwrap();
        stream.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"during", "v6={v6}: the local socket still answers");
        tproxy.stop().unwrap();
        assert_eq!(
            local.peers().len(),
            1,
            "no second connection reached the service"
        );
        assert_eq!(local.peers()[0].ip(), Topo::client_ip(v6));
        assert_eq!(tproxy.final_counter("tcp", "steered_new").unwrap(), 0);
        assert!(
            tproxy.final_counter("tcp", "steered_established").unwrap() >= 1,
            "the packet was assigned to its own socket"
        );
    }
}
