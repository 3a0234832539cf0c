//! `--metrics`: Prometheus text that moves when traffic moves, and probe endpoints.

use tproxy_tests::{
    peer_seen_by, require_root, routing_state, run_tproxy_to_end, udp_client, udp_exchange, Netns,
    RouterTopology as Topo, Server, UdpEcho,
};

const METRICS: &str = "127.0.0.1:9464";

/// GET `path` from the metrics endpoint in `netns`: (status code, body).
fn get(netns: &Netns, path: &str) -> (u16, String) {
    tproxy_tests::http_get(netns, METRICS.parse().unwrap(), path).unwrap()
}

/// The value of the sample `name` (with its labels, exactly as exposed).
fn sample(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no `{name}` in:\n{body}"))
        .parse()
        .unwrap()
}

#[test]
fn metrics_move_with_traffic_and_probes_answer() {
    require_root();
    let topo = Topo::new().unwrap();
    let tcp = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let udp = UdpEcho::start(&topo.server, Topo::server_addr(false, 5300)).unwrap();
    let mut tproxy = topo
        .tproxy(&["--tcp", "80", "--udp", "5300", "--metrics", METRICS])
        .unwrap();
    assert_eq!(get(&topo.router, "/healthz").0, 200);
    assert_eq!(get(&topo.router, "/readyz").0, 200);
    assert_eq!(get(&topo.router, "/nothing").0, 404);
    let (status, before) = get(&topo.router, "/metrics");
    assert_eq!(status, 200);
    let new = r#"tproxy_packets_total{protocol="tcp",outcome="steered_new"}"#;
    assert_eq!(sample(&before, new), 0.0);

    for _ in 0..3 {
        peer_seen_by(&topo.client, tcp.addr).unwrap();
    }
    let client = udp_client(&topo.client, udp.addr).unwrap();
    udp_exchange(&client, udp.addr, b"hello").unwrap();

    let (_, after) = get(&topo.router, "/metrics");
    assert_eq!(sample(&after, new), 3.0);
    assert_eq!(sample(&after, "tproxy_tcp_connections_accepted_total"), 3.0);
    assert_eq!(sample(&after, "tproxy_upstream_connect_seconds_count"), 3.0);
    assert!(sample(&after, r#"tproxy_tcp_bytes_total{direction="to_client"}"#) > 0.0);
    assert_eq!(
        sample(&after, r#"tproxy_udp_sessions_total{event="created"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            r#"tproxy_udp_datagrams_total{direction="to_upstream"}"#
        ),
        1.0
    );
    assert_eq!(sample(&after, "tproxy_udp_sessions_active"), 1.0);
    assert_eq!(sample(&after, "tproxy_ready"), 1.0);
    assert!(after.contains("# HELP tproxy_packets Packets the eBPF program saw"));
    tproxy.stop().unwrap();
}

#[test]
fn a_metrics_address_that_cannot_be_bound_fails_the_start_cleanly() {
    require_root();
    let topo = Topo::new().unwrap();
    let (status, stderr) = run_tproxy_to_end(
        &topo.router,
        &[
            "run",
            "--iface",
            Topo::ROUTER_CLIENT_IFACE,
            "--tcp",
            "80",
            "--metrics",
            "10.10.99.1:9464",
        ],
    )
    .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("--metrics 10.10.99.1:9464: binding"),
        "{stderr}"
    );
    assert_eq!(
        routing_state(&topo.router, tproxy_tests::DEFAULT_TABLE).unwrap(),
        ""
    );
}
