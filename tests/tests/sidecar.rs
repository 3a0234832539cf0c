//! The host-network sidecar deployment: tproxy on the host's interface steers an inbound port
//! that nothing listens on to a local app bound to loopback.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr},
};

use tproxy_tests::{require_root, Server, SidecarTopology as Topo, Tproxy};

#[test]
fn client_reaches_the_local_app_through_the_steered_port() {
    require_root();
    let topo = Topo::new().unwrap();
    let app = Server::start(
        &topo.host,
        "127.0.0.1:9000".parse().unwrap(),
        |mut stream| {
            let mut request = Vec::new();
            stream.read_to_end(&mut request).unwrap();
            stream.write_all(b"app got: ").unwrap();
            stream.write_all(&request).unwrap();
        },
    )
    .unwrap();
    let steered: Vec<SocketAddr> = [Topo::HOST_V4, Topo::HOST_V6]
        .iter()
        .map(|ip| SocketAddr::new(ip.parse().unwrap(), 8080))
        .collect();
    for addr in &steered {
        assert!(
            topo.client.connect(*addr).is_err(),
            "nothing listens on {addr} before tproxy runs"
        );
    }

    let _tproxy = Tproxy::start(
        &topo.host,
        &[
            "--iface",
            Topo::HOST_IFACE,
            "--tcp",
            "8080",
            "--upstream",
            "127.0.0.1:9000",
        ],
    )
    .unwrap();
    for addr in &steered {
        let mut stream = topo.client.connect(*addr).unwrap();
        stream.write_all(b"hello").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "app got: hello", "via {addr}");
    }
    assert_eq!(app.peers().len(), 2);
    assert!(app.peers().iter().all(|peer| peer.ip().is_loopback()));
}
