//! `--transparent-upstream`: the relay connects from the client's own address, so the server
//! sees the client, while the connection still goes through tproxy.

use std::time::Duration;

use tproxy_tests::{
    peer_seen_by, require_root, ConfigFile, RouterTopology as Topo, Server, Tproxy,
};

/// Steer port 80 from the client side; on the server side, a bypass rule is the socket match
/// that hands the servers' replies (addressed to the client) to the relay's sockets.
const CONFIG: &str = r#"
interfaces = ["to-client", "to-server"]
transparent_upstream = true

[[listener]]
name = "web"

[[rule]]
proto = "tcp"
iface = "to-client"
ports = 80
action = "steer"

[[rule]]
proto = "tcp"
iface = "to-server"
action = "bypass"
"#;

#[test]
fn a_transparent_upstream_connection_shows_the_client_to_the_server() {
    require_root();
    let topo = Topo::new().unwrap();
    let config = ConfigFile::new(CONFIG).unwrap();
    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    for v6 in [false, true] {
        let server = Server::tell_peer(&topo.server, Topo::server_addr(v6, 80)).unwrap();
        let peer = peer_seen_by(&topo.client, server.addr).unwrap();
        assert_eq!(
            peer,
            Topo::client_ip(v6),
            "v6={v6}: the server sees the client"
        );
        tproxy
            .wait_for_line(
                &format!("relaying via {}", server.addr),
                Duration::from_secs(5),
            )
            .unwrap();
    }
    tproxy.stop().unwrap();
    assert_eq!(tproxy.final_counter("tcp", "steered_new").unwrap(), 2);
    // The replies from the server reached the relay's upstream sockets by the socket match.
    assert!(tproxy.final_counter("tcp", "steered_established").unwrap() >= 4);
    assert_eq!(tproxy.final_counter("tcp", "no_listener").unwrap(), 0);
}

#[test]
fn without_the_return_path_rule_it_fails_visibly() {
    require_root();
    let topo = Topo::new().unwrap();
    // No socket match on the server side: the SYN-ACK to the client's address is forwarded
    // to the client, which resets it; the relay's connect times out and the client is reset.
    let config = ConfigFile::new(
        &CONFIG.replace("iface = \"to-server\"", "iface = \"to-server\"\nports = 1"),
    )
    .unwrap();
    let mut tproxy = Tproxy::start(
        &topo.router,
        &["--config", config.path(), "--connect-timeout", "1s"],
    )
    .unwrap();
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    assert!(peer_seen_by(&topo.client, server.addr).is_err());
    tproxy.stop().unwrap();
    assert!(tproxy.final_stats().unwrap().tcp_relay.upstream_failures >= 1);
    assert!(tproxy.log_text().contains(" upstream_failures="));
}
