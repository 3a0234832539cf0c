//! `run -v`: the program's steering decisions in the log, rate-limited.

use std::time::Duration;

use tproxy_tests::{
    peer_seen_by, require_root, udp_client, RouterTopology as Topo, Server, Tproxy, UdpEcho,
};

#[test]
fn verbose_shows_steering_decisions_and_only_verbose_does() {
    require_root();
    let topo = Topo::new().unwrap();
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    for verbose in [false, true] {
        let mut args = vec!["--iface", Topo::ROUTER_CLIENT_IFACE, "--tcp", "80"];
        if verbose {
            args.push("-v");
        }
        let mut tproxy =
            Tproxy::start_wrapped(&topo.router, &["env", "-u", "RUST_LOG"], &args).unwrap();
        peer_seen_by(&topo.client, server.addr).unwrap();
        tproxy.stop().unwrap();
        let traced = tproxy.log_text().contains("steer new tcp 10.10.1.2:");
        assert_eq!(traced, verbose, "{}", tproxy.log_text());
    }
}

#[test]
fn steering_decisions_are_rate_limited_and_the_rest_counted() {
    require_root();
    let topo = Topo::new().unwrap();
    let server = UdpEcho::start(&topo.server, Topo::server_addr(false, 5300)).unwrap();
    let mut tproxy = topo.tproxy(&["--udp", "5300"]).unwrap();
    // 600 new flows at once: far more decisions than 100 a second.
    let clients: Vec<_> = (0..600)
        .map(|_| udp_client(&topo.client, server.addr).unwrap())
        .collect();
    for client in &clients {
        client.send_to(b"x", server.addr).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1200));
    // The next decision closes the window and reports what was held back.
    udp_client(&topo.client, server.addr)
        .unwrap()
        .send_to(b"y", server.addr)
        .unwrap();
    let line = tproxy
        .wait_for_line("eBPF log records held back", Duration::from_secs(5))
        .unwrap();
    let held: u64 = line
        .split_whitespace()
        .find_map(|word| word.parse().ok())
        .unwrap();
    let shown = tproxy.log_text().matches("steer new udp").count() as u64;
    // At most one full window plus the closing decision (and a second window if the burst
    // straddled one). Under such a burst the kernel's log ring buffer also drops records
    // before they reach userspace, so shown + held back may be below 600.
    assert!(shown <= 201, "{shown} decisions shown");
    assert!(held > 0, "nothing was held back of 600 decisions");
    assert!(
        server.peer_ips() == [Topo::router_as_seen_by_server(false)],
        "all steered"
    );
    tproxy.stop().unwrap();
}
