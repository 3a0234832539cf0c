//! UDP replies from 100 to 8,000 bytes on a privileged port (DNS, 53), over IPv4 and IPv6:
//! through the reply socket, which must be bindable to port 53 after tproxy drops its
//! privileges, and through the raw fallback, which must fragment what does not fit in one
//! packet. Replies above the path MTU are what EDNS/DNSSEC, NTP and QUIC send.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use tproxy_tests::{
    http_get, payload, require_root, run_tproxy_output, udp_client, udp_exchange, Netns,
    RouterTopology as Topo, UdpEcho,
};

const DNS: u16 = 53;
const METRICS: &str = "127.0.0.1:9464";
/// Around each MTU boundary (1,472 and 1,452 bytes fill one 1,500-byte packet over IPv4 and
/// IPv6), and well beyond it.
const SIZES: [usize; 7] = [100, 1400, 1452, 1453, 1472, 1473, 8000];

/// A UDP server whose reply to a request naming a length ("3000") is that many bytes of
/// [`payload`]: large replies without large requests. Stops when dropped.
struct SizedReplies {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl SizedReplies {
    fn start(netns: &Netns, addr: SocketAddr) -> Self {
        let socket = netns.run(move || std::net::UdpSocket::bind(addr)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        thread::spawn(move || {
            let mut request = [0u8; 64];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((len, peer)) = socket.recv_from(&mut request) else {
                    continue;
                };
                let asked = std::str::from_utf8(&request[..len])
                    .ok()
                    .and_then(|text| text.parse::<usize>().ok());
                if let Some(size) = asked {
                    let _ = socket.send_to(&payload(size, size as u64), peer);
                }
            }
        });
        SizedReplies { addr, stop }
    }
}

impl Drop for SizedReplies {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Asks for every size in [`SIZES`] over both families; each reply must arrive whole, from
/// the server's address and port.
fn every_size_arrives(topo: &Topo) {
    for v6 in [false, true] {
        let server = SizedReplies::start(&topo.server, Topo::server_addr(v6, DNS));
        let client = udp_client(&topo.client, server.addr).unwrap();
        for size in SIZES {
            let (reply, from) = udp_exchange(&client, server.addr, size.to_string().as_bytes())
                .unwrap_or_else(|error| panic!("v6={v6} size={size}: {error:#}"));
            assert_eq!(reply.len(), size, "v6={v6}");
            assert!(
                reply == payload(size, size as u64),
                "v6={v6} size={size}: content differs"
            );
            assert_eq!(from, server.addr, "v6={v6} size={size}");
        }
    }
}

#[test]
fn replies_of_100_to_8000_bytes_on_port_53_arrive_whole_over_ipv4_and_ipv6() {
    require_root();
    let topo = Topo::new().unwrap();
    let tproxy = topo.tproxy(&["--udp", "53"]).unwrap();
    every_size_arrives(&topo);
    // Each session's reply socket was bound to port 53: no raw replies were needed.
    assert_eq!(tproxy.udp_stat("raw_reply_fallbacks").unwrap(), 0);
    assert_eq!(tproxy.udp_stat("created").unwrap(), 2);
    assert_eq!(tproxy.udp_stat("dropped").unwrap(), 0);
}

#[test]
fn raw_replies_of_100_to_8000_bytes_arrive_whole_when_a_local_service_holds_port_53() {
    require_root();
    let topo = Topo::new().unwrap();
    let tproxy = topo.tproxy(&["--udp", "53", "--metrics", METRICS]).unwrap();
    // A resolver on the router itself, on the wildcard (dual-stack) without SO_REUSEADDR:
    // no reply socket can be bound to port 53, so every reply goes out raw.
    let local = UdpEcho::start(&topo.router, "[::]:53".parse().unwrap()).unwrap();
    every_size_arrives(&topo);
    assert!(local.peers.lock().unwrap().is_empty());
    assert_eq!(tproxy.udp_stat("raw_reply_fallbacks").unwrap(), 2);
    assert_eq!(tproxy.udp_stat("raw_reply_failures").unwrap(), 0);
    assert_eq!(tproxy.udp_stat("dropped").unwrap(), 0);
    // The same counters in the status report and the metrics.
    let (status, out, err) = run_tproxy_output(&topo.router, &["status", "--json"]).unwrap();
    assert!(status.success(), "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let udp = &report["instance"]["udp_relay"];
    assert_eq!(udp["raw_reply_fallbacks"], 2, "{report:#}");
    assert_eq!(udp["raw_reply_failures"], 0, "{report:#}");
    let (_, metrics) = http_get(&topo.router, METRICS.parse().unwrap(), "/metrics").unwrap();
    assert!(
        metrics.contains("\ntproxy_udp_raw_reply_failures_total 0\n"),
        "{metrics}"
    );
}

#[test]
fn a_reply_the_raw_fallback_cannot_send_is_counted_and_logged() {
    require_root();
    let topo = Topo::new().unwrap();
    // Below the 1,280-byte fragments the raw fallback sends: the kernel refuses them.
    topo.router
        .ip(&[
            "link",
            "set",
            "dev",
            Topo::ROUTER_CLIENT_IFACE,
            "mtu",
            "1000",
        ])
        .unwrap();
    let mut tproxy = topo.tproxy(&["--udp", "53"]).unwrap();
    let _local = UdpEcho::start(&topo.router, "[::]:53".parse().unwrap()).unwrap();
    let server = SizedReplies::start(&topo.server, Topo::server_addr(false, DNS));
    let client = udp_client(&topo.client, server.addr).unwrap();
    let (reply, _) = udp_exchange(&client, server.addr, b"100").unwrap();
    assert_eq!(reply, payload(100, 100));
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(udp_exchange(&client, server.addr, b"3000").is_err());
    tproxy
        .wait_for_line(
            "a reply of 3000 bytes could not be sent through the raw socket",
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(tproxy.udp_stat("raw_reply_failures").unwrap(), 1);
    assert_eq!(tproxy.udp_stat("dropped").unwrap(), 1);
}
