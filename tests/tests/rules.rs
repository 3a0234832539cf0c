//! Rule sets from a configuration file: precedence between overlapping rules, several
//! listeners, a large rule set, and live reloads (good and bad) under traffic.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use tproxy_tests::{
    peer_seen_by, require_root, run_tproxy_to_end, tproxy_with_input, udp_client, ConfigFile,
    RouterTopology as Topo, Server, Tproxy, UdpEcho,
};

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn router_v4() -> std::net::IpAddr {
    Topo::router_as_seen_by_server(false)
}

fn client_v4() -> std::net::IpAddr {
    Topo::client_ip(false)
}

/// Starts tproxy on the router with `config` (and the client-side interface).
fn start(topo: &Topo, config: &ConfigFile) -> Tproxy {
    topo.tproxy(&["--config", config.path()]).unwrap()
}

const OVERLAPPING: &str = r#"
[[listener]]
name = "direct"

[[listener]]
name = "pinned"
upstream = "10.10.2.3:9000"

# Port 80 of the whole server network goes to its original destination ...
[[rule]]
proto = "tcp"
dst = ["10.10.2.0/24", "fd00:2::/64"]
ports = 80
action = "steer"
listener = "direct"

# ... except one host, whose more specific rule pins it to a fixed upstream.
[[rule]]
proto = "tcp"
dst = "10.10.2.3/32"
ports = 80
action = "steer"
listener = "pinned"

# A range, and inside it one port handled differently: the single port wins.
[[rule]]
proto = "tcp"
dst = "10.10.2.0/24"
ports = "8000-8100"
action = "steer"
listener = "direct"

[[rule]]
proto = "tcp"
dst = "10.10.2.0/24"
ports = 8080
action = "steer"
listener = "pinned"

# A bypass for one host beats the broader steer rules, whatever their order.
[[rule]]
proto = "tcp"
dst = "10.10.2.2/32"
ports = 8090
action = "bypass"
"#;

#[test]
fn overlapping_rules_send_each_flow_to_the_right_listener_and_upstream() {
    require_root();
    let topo = Topo::new().unwrap();
    let config = ConfigFile::new(OVERLAPPING).unwrap();
    let servers: Vec<Server> = [
        "10.10.2.2:80",
        "10.10.2.3:80",
        "10.10.2.2:8080",
        "10.10.2.2:8081",
        "10.10.2.2:8090",
        "10.10.2.3:9000",
        "[fd00:2::2]:80",
    ]
    .iter()
    .map(|a| Server::tell_peer(&topo.server, addr(a)).unwrap())
    .collect();
    let [direct80, other80, s8080, s8081, s8090, pinned, v6_80] = &servers[..] else {
        unreachable!()
    };
    let mut tproxy = start(&topo, &config);

    // Relayed to its original destination by "direct": the server sees the router.
    assert_eq!(
        peer_seen_by(&topo.client, direct80.addr).unwrap(),
        router_v4()
    );
    assert_eq!(
        peer_seen_by(&topo.client, v6_80.addr).unwrap(),
        Topo::router_as_seen_by_server(true)
    );
    assert_eq!(
        peer_seen_by(&topo.client, s8081.addr).unwrap(),
        router_v4(),
        "the range"
    );
    // The /32 rule beats the /24 one: relayed to the pinned upstream instead.
    assert_eq!(
        peer_seen_by(&topo.client, other80.addr).unwrap(),
        router_v4()
    );
    // The single port beats the range.
    assert_eq!(peer_seen_by(&topo.client, s8080.addr).unwrap(), router_v4());
    assert!(
        other80.peers().is_empty() && s8080.peers().is_empty(),
        "both went to the pinned upstream"
    );
    assert_eq!(pinned.peers().len(), 2);
    // The bypass: untouched, the server sees the client itself.
    assert_eq!(peer_seen_by(&topo.client, s8090.addr).unwrap(), client_v4());

    tproxy.stop().unwrap();
    assert_eq!(tproxy.final_counter("tcp", "steered_new").unwrap(), 5);
    assert!(tproxy.final_counter("tcp", "bypassed").unwrap() >= 1);
    assert_eq!(tproxy.final_counter("tcp", "no_listener").unwrap(), 0);
}

#[test]
fn ten_thousand_rules_load_and_steer() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut text = String::from("[[listener]]\nname = \"only\"\n");
    // 5,000 single-port steer rules for the server network, and 5,000 bypass rules for
    // host routes elsewhere: each port its own class, each class all the bypass prefixes.
    for port in 20_000..25_000 {
        text += &format!("[[rule]]\nproto = \"tcp\"\ndst = \"10.10.2.0/24\"\nports = {port}\naction = \"steer\"\n");
    }
    for i in 0..5_000u32 {
        text += &format!(
            "[[rule]]\nproto = \"tcp\"\ndst = \"10.200.{}.{}/32\"\nports = \"20000-24999\"\naction = \"bypass\"\n",
            i / 256,
            i % 256
        );
    }
    let config = ConfigFile::new(&text).unwrap();

    let (status, stdout, stderr) =
        tproxy_with_input(&["check", "--config", config.path(), "--iface", "x"], "").unwrap();
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains("rules (10000 configured"),
        "{}",
        &stdout[..500.min(stdout.len())]
    );

    let started = Instant::now();
    let mut tproxy = start(&topo, &config);
    let load_time = started.elapsed();
    println!("10,000 rules: ready after {load_time:?}");
    let servers: Vec<Server> = [20_000, 22_222, 24_999, 25_000]
        .iter()
        .map(|port| {
            Server::tell_peer(
                &topo.server,
                SocketAddr::new(addr("10.10.2.2:0").ip(), *port),
            )
            .unwrap()
        })
        .collect();
    for server in &servers[..3] {
        assert_eq!(
            peer_seen_by(&topo.client, server.addr).unwrap(),
            router_v4(),
            "{}",
            server.addr
        );
    }
    assert_eq!(
        peer_seen_by(&topo.client, servers[3].addr).unwrap(),
        client_v4(),
        "no rule for 25000"
    );
    tproxy.stop().unwrap();
    assert_eq!(tproxy.final_counter("tcp", "steered_new").unwrap(), 3);
}

/// Config A steers port 80 to listener "a"; config B drops that rule and listener and steers
/// port 8080 to a new listener "b".
fn reload_config(port: u16, listener: &str) -> String {
    format!(
        "[[listener]]\nname = \"{listener}\"\n\n[[rule]]\nproto = \"tcp\"\ndst = \"10.10.2.0/24\"\nports = {port}\naction = \"steer\"\nlistener = \"{listener}\"\n"
    )
}

/// A client connection that keeps exchanging lines with an echo server, counting round
/// trips, until told to stop; any error or mismatch is a failure.
fn keep_echoing(
    mut stream: std::net::TcpStream,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
) -> thread::JoinHandle<Result<(), String>> {
    thread::spawn(move || {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let line = format!("round {n:08}\n");
            stream
                .write_all(line.as_bytes())
                .map_err(|e| format!("write after {n} rounds: {e}"))?;
            let mut back = vec![0u8; line.len()];
            stream
                .read_exact(&mut back)
                .map_err(|e| format!("read after {n} rounds: {e}"))?;
            if back != line.as_bytes() {
                return Err(format!(
                    "round {n}: got {:?}",
                    String::from_utf8_lossy(&back)
                ));
            }
            n += 1;
            rounds.fetch_add(1, Ordering::Relaxed);
            thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    })
}

#[test]
fn reloads_under_traffic_keep_established_connections_and_switch_new_ones() {
    require_root();
    let topo = Topo::new().unwrap();
    let echo80 = Server::echo(&topo.server, addr("10.10.2.2:80")).unwrap();
    let echo8080 = Server::echo(&topo.server, addr("10.10.2.2:8080")).unwrap();
    let config = ConfigFile::new(&reload_config(80, "a")).unwrap();
    let mut tproxy = start(&topo, &config);

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..10 {
        let stream = topo.client.connect(echo80.addr).unwrap();
        clients.push(keep_echoing(stream, stop.clone(), rounds.clone()));
    }
    thread::sleep(Duration::from_millis(200));

    // Alternate between the two configurations while the connections keep talking.
    for (i, (port, listener)) in [(8080, "b"), (80, "a"), (8080, "b")]
        .into_iter()
        .enumerate()
    {
        config.rewrite(&reload_config(port, listener)).unwrap();
        let (status, stderr) = run_tproxy_to_end(&topo.router, &["reload"]).unwrap();
        assert!(status.success(), "{stderr}");
        tproxy
            .wait_for_line("reloaded:", Duration::from_secs(10))
            .unwrap();
        let before = rounds.load(Ordering::Relaxed);
        thread::sleep(Duration::from_millis(300));
        assert!(
            rounds.load(Ordering::Relaxed) > before + 50,
            "traffic stalled after reload {i}"
        );
    }
    // In force now: port 8080 to "b"; port 80 is no longer steered for new connections.
    let peer80 = peer_seen_by_echo(&topo, &echo80);
    let peer8080 = peer_seen_by_echo(&topo, &echo8080);
    assert_eq!(
        peer80,
        client_v4(),
        "new port-80 connections are no longer steered"
    );
    assert_eq!(
        peer8080,
        router_v4(),
        "new port-8080 connections are steered"
    );

    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap().unwrap();
    }
    tproxy.stop().unwrap();
    assert!(tproxy
        .log_text()
        .contains("listener `a` removed; its connections run on"));
    assert_eq!(tproxy.final_counter("tcp", "no_listener").unwrap(), 0);
}

/// Connects to an echo server and returns the IP address the server saw for it.
fn peer_seen_by_echo(topo: &Topo, server: &Server) -> std::net::IpAddr {
    let mut stream = topo.client.connect(server.addr).unwrap();
    stream.write_all(b"x").unwrap();
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).unwrap();
    let local = stream.local_addr().unwrap();
    let peers = server.peers();
    if peers.contains(&local) {
        local.ip()
    } else {
        peers
            .last()
            .expect("the server accepted the connection")
            .ip()
    }
}

#[test]
fn a_bad_reload_is_rejected_and_the_rules_in_force_keep_working() {
    require_root();
    let topo = Topo::new().unwrap();
    let server = Server::tell_peer(&topo.server, addr("10.10.2.2:80")).unwrap();
    let config = ConfigFile::new(&reload_config(80, "a")).unwrap();
    let mut tproxy = start(&topo, &config);
    assert_eq!(
        peer_seen_by(&topo.client, server.addr).unwrap(),
        router_v4()
    );

    let bad = [
        (
            "[[rule]]\nproto = \"tcp\"\nports = \"80-70\"\naction = \"bypass\"\n",
            ":3:9: rule[1].ports: range `80-70` runs backwards",
        ),
        (
            "table = 100\n[[rule]]\nproto = \"tcp\"\naction = \"bypass\"\n",
            "table changed; a reload applies rules and listeners only",
        ),
        ("[[rule]\n", ":1:"),
    ];
    for (text, expected) in bad {
        config.rewrite(text).unwrap();
        let pid = nix::unistd::Pid::from_raw(tproxy.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
        let line = tproxy
            .wait_for_line("reload rejected", Duration::from_secs(10))
            .unwrap();
        assert!(line.contains(expected), "expected `{expected}` in `{line}`");
        // `tproxy reload` (what `systemctl reload` runs) must fail, with the reason.
        let (status, stderr) = run_tproxy_to_end(&topo.router, &["reload"]).unwrap();
        assert!(!status.success(), "a rejected reload exited 0: {stderr}");
        assert!(
            stderr.contains("rejected the reload") && stderr.contains(expected),
            "expected `{expected}` in `{stderr}`"
        );
        tproxy
            .wait_for_line("reload rejected", Duration::from_secs(10))
            .unwrap();
        assert_eq!(
            peer_seen_by(&topo.client, server.addr).unwrap(),
            router_v4(),
            "still steered after `{text}`"
        );
    }
    tproxy.stop().unwrap();
}

#[test]
fn reload_without_a_running_instance_says_so() {
    require_root();
    let topo = Topo::new().unwrap();
    let (status, stderr) = run_tproxy_to_end(&topo.router, &["reload", "--table", "7471"]).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("no tproxy is running with routing table 7471 in this network namespace"),
        "{stderr}"
    );
}

/// A drop rule comes after the socket match, as the kernel documentation's socket-match rule
/// comes ahead of the chain: a reload that adds one leaves the connections tproxy already
/// relays alone and drops new ones (counted as `dropped`).
#[test]
fn a_drop_rule_added_by_reload_keeps_relayed_connections_and_drops_new_ones() {
    require_root();
    let topo = Topo::new().unwrap();
    let echo = Server::echo(&topo.server, addr("10.10.2.2:80")).unwrap();
    let steer = reload_config(80, "a");
    let config = ConfigFile::new(&steer).unwrap();
    let mut tproxy = start(&topo, &config);
    let mut relayed = topo.client.connect(echo.addr).unwrap();
    let round_trip = |stream: &mut std::net::TcpStream, line: &[u8]| {
        stream.write_all(line).unwrap();
        let mut back = vec![0u8; line.len()];
        stream.read_exact(&mut back).unwrap();
        assert_eq!(back, line);
    };
    round_trip(&mut relayed, b"before\n");
    assert_eq!(
        echo.peers().last().unwrap().ip(),
        router_v4(),
        "the connection is relayed"
    );

    let dropping = format!(
        "{steer}\n[[rule]]\nproto = \"tcp\"\ndst = \"10.10.2.2/32\"\nports = 80\naction = \"drop\"\n"
    );
    config.rewrite(&dropping).unwrap();
    let (status, stderr) = run_tproxy_to_end(&topo.router, &["reload"]).unwrap();
    assert!(status.success(), "{stderr}");
    tproxy
        .wait_for_line("reloaded:", Duration::from_secs(10))
        .unwrap();
    round_trip(&mut relayed, b"after the drop rule\n");
    assert!(
        topo.client.connect(echo.addr).is_err(),
        "a new connection is dropped"
    );
    assert!(
        tproxy.ebpf_counters().unwrap()["tcp/dropped"] >= 1,
        "the drop is counted"
    );
    round_trip(&mut relayed, b"still relayed\n");
    drop(relayed);
    tproxy.stop().unwrap();
}

const DELIVER: &str = r#"
[[listener]]
name = "direct"

[[rule]]
proto = "tcp"
ports = 80
action = "steer"
listener = "direct"

[[rule]]
proto = "tcp"
dst = "10.10.2.2/32"
ports = 81
action = "deliver"
"#;

/// A `deliver` rule hands the packet to the router's own socket lookup, as the TPROXY
/// recipe's MARK without TPROXY does (policy routing delivers it locally): with no socket
/// there the SYN goes unanswered (the kernel's reset would leave from the dialled address,
/// which is not the router's: it cannot; a bypass would have reached the server listening
/// there), and a transparent listener on the router bound to the port takes the
/// connection, the client's dialled address as its local one.
#[test]
fn a_deliver_rule_hands_the_packet_to_the_routers_own_sockets() {
    require_root();
    let topo = Topo::new().unwrap();
    let server = Server::echo(&topo.server, addr("10.10.2.2:81")).unwrap();
    let config = ConfigFile::new(DELIVER).unwrap();
    let mut tproxy = start(&topo, &config);
    let unanswered = topo.client.connect(addr("10.10.2.2:81")).unwrap_err();
    assert_eq!(
        unanswered
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind),
        Some(std::io::ErrorKind::TimedOut),
        "{unanswered:#}"
    );
    assert!(server.peers().is_empty(), "nothing reached the server");

    let listener = topo
        .router
        .transparent_listener(addr("0.0.0.0:81"))
        .unwrap();
    let answering = thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        writeln!(stream, "{}", stream.local_addr()?)
    });
    let mut stream = topo.client.connect(addr("10.10.2.2:81")).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert_eq!(
        answer.trim(),
        "10.10.2.2:81",
        "the router's listener answered"
    );
    answering.join().unwrap().unwrap();
    assert!(server.peers().is_empty(), "nothing reached the server");
    assert!(
        tproxy.ebpf_counters().unwrap()["tcp/delivered"] >= 2,
        "delivered packets are counted"
    );
    tproxy.stop().unwrap();
}

/// Rules for the protocols besides TCP and UDP (`proto = "other"`): ICMP and ICMPv6 to the
/// server network are dropped, to one host of it left alone (the longer prefix wins), and
/// TCP is untouched by them; nothing is dropped once tproxy stops.
const OTHER_PROTOCOLS: &str = r#"
[[rule]]
proto = "other"
dst = ["10.10.2.0/24", "fd00:2::/64"]
action = "drop"

[[rule]]
proto = "other"
dst = ["10.10.2.3/32", "fd00:2::3/128"]
action = "bypass"
"#;

#[test]
fn rules_for_other_protocols_drop_and_leave_alone_icmp_of_both_families_by_address() {
    require_root();
    let topo = Topo::new().unwrap();
    let server = Server::tell_peer(&topo.server, addr("10.10.2.2:80")).unwrap();
    let targets: [std::net::IpAddr; 4] = [
        "10.10.2.2".parse().unwrap(),
        "10.10.2.3".parse().unwrap(),
        "fd00:2::2".parse().unwrap(),
        "fd00:2::3".parse().unwrap(),
    ];
    let answered = |topo: &Topo| -> Vec<bool> {
        targets
            .iter()
            .map(|&to| topo.client.run(move || tproxy_tests::echo_answered(to)))
            .collect()
    };
    assert_eq!(answered(&topo), [true; 4], "before tproxy");
    let config = ConfigFile::new(OTHER_PROTOCOLS).unwrap();
    let mut tproxy = start(&topo, &config);
    assert_eq!(answered(&topo), [false, true, false, true], "with tproxy");
    assert_eq!(
        peer_seen_by(&topo.client, server.addr).unwrap(),
        client_v4()
    );
    let counters = tproxy.ebpf_counters().unwrap();
    assert!(
        counters.get("other/dropped").is_some_and(|&n| n >= 2)
            && counters.get("other/bypassed").is_some_and(|&n| n >= 2),
        "{counters:?}"
    );
    tproxy.stop().unwrap();
    assert_eq!(answered(&topo), [true; 4], "after tproxy");
}

/// `reject` rules: TCP to the server network's port 81 is refused with a reset and UDP to its
/// port 5353 with a port unreachable, for both families, while one host's bypass (the longer
/// prefix) lets its flows through; once tproxy stops, nothing is refused.
const REJECT: &str = r#"
[[rule]]
proto = "tcp"
dst = ["10.10.2.0/24", "fd00:2::/64"]
ports = 81
action = "reject"

[[rule]]
proto = "udp"
dst = ["10.10.2.0/24", "fd00:2::/64"]
ports = 5353
action = "reject"

[[rule]]
proto = ["tcp", "udp"]
dst = ["10.10.2.3/32", "fd00:2::3/128"]
ports = [81, 5353]
action = "bypass"
"#;

/// How `to` answers a TCP connection and a UDP datagram from the client: `Ok` or the error's
/// kind, and how long the connection took to be answered.
fn answers(
    topo: &Topo,
    to: std::net::IpAddr,
) -> (std::io::Result<()>, Duration, std::io::Result<()>) {
    let started = Instant::now();
    let tcp = topo
        .client
        .connect(SocketAddr::new(to, 81))
        .map(drop)
        .map_err(|error| match error.downcast::<std::io::Error>() {
            Ok(error) => error,
            Err(other) => panic!("{other:#}"),
        });
    let took = started.elapsed();
    let socket = udp_client(&topo.client, SocketAddr::new(to, 5353)).unwrap();
    // Connected: an ICMP error about its datagram is reported on the socket.
    socket.connect(SocketAddr::new(to, 5353)).unwrap();
    socket.send(b"query").unwrap();
    let mut buffer = [0u8; 64];
    let udp = socket.recv(&mut buffer).map(drop);
    (tcp, took, udp)
}

#[test]
fn a_reject_rule_refuses_tcp_with_a_reset_and_udp_with_a_port_unreachable() {
    require_root();
    let topo = Topo::new().unwrap();
    // The client's packets reach the router with their checksums computed, so that the
    // answers, built from them, come back without offload either: the client's stack checks
    // every checksum of what tproxy wrote.
    topo.client.ethtool(&["-K", "eth0", "tx", "off"]).unwrap();
    let hosts: [std::net::IpAddr; 4] = [
        "10.10.2.2".parse().unwrap(),
        "fd00:2::2".parse().unwrap(),
        "10.10.2.3".parse().unwrap(),
        "fd00:2::3".parse().unwrap(),
    ];
    let (mut tcp_servers, mut udp_servers) = (Vec::new(), Vec::new());
    for host in hosts {
        tcp_servers.push(Server::echo(&topo.server, SocketAddr::new(host, 81)).unwrap());
        udp_servers.push(UdpEcho::start(&topo.server, SocketAddr::new(host, 5353)).unwrap());
    }
    let config = ConfigFile::new(REJECT).unwrap();
    let mut tproxy = start(&topo, &config);
    // More than once: each answer is built where the one before was.
    for host in hosts[..2].iter().cycle().take(6) {
        let (tcp, took, udp) = answers(&topo, *host);
        let refused = Some(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(tcp.err().map(|e| e.kind()), refused, "TCP to {host}");
        assert!(
            took < Duration::from_secs(1),
            "refused at once, not timed out: {took:?}"
        );
        assert_eq!(udp.err().map(|e| e.kind()), refused, "UDP to {host}");
    }
    for host in &hosts[2..] {
        let (tcp, _, udp) = answers(&topo, *host);
        assert!(
            tcp.is_ok() && udp.is_ok(),
            "{host} is bypassed: {tcp:?} {udp:?}"
        );
    }
    for (index, host) in hosts.iter().enumerate().take(2) {
        assert!(
            tcp_servers[index].peers().is_empty(),
            "no SYN reached {host}"
        );
        assert!(
            udp_servers[index].peer_ips().is_empty(),
            "no datagram reached {host}"
        );
    }
    let counters = tproxy.ebpf_counters().unwrap();
    assert!(
        counters.get("tcp/rejected").is_some_and(|&n| n >= 2)
            && counters.get("udp/rejected").is_some_and(|&n| n >= 2),
        "{counters:?}"
    );
    // Where the sender left its checksums to the device (the client's offload on), the
    // answers keep that state: the device that finishes them, here the router's kernel (the
    // interface's offload off), must write them right for the client to take them.
    topo.client.ethtool(&["-K", "eth0", "tx", "on"]).unwrap();
    topo.router
        .ethtool(&["-K", Topo::ROUTER_CLIENT_IFACE, "tx", "off"])
        .unwrap();
    for host in &hosts[..2] {
        let (tcp, _, udp) = answers(&topo, *host);
        let refused = Some(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            tcp.err().map(|e| e.kind()),
            refused,
            "TCP to {host}, finished by the device"
        );
        assert_eq!(
            udp.err().map(|e| e.kind()),
            refused,
            "UDP to {host}, finished by the device"
        );
    }
    // Floods get the kernel's own ICMP rates: from many sources, a burst of 50 in all
    // (per CPU), then one a millisecond; from one source not answered before, a burst of 6
    // to it, then one a second.
    let sources: Vec<String> = (10..211).map(|host| format!("10.10.1.{host}")).collect();
    for source in &sources {
        topo.client
            .ip(&["addr", "add", &format!("{source}/24"), "dev", "eth0"])
            .unwrap();
    }
    let (many, one) = sources.split_at(200);
    let many = many.to_vec();
    let (unreachables, took) = topo
        .client
        .run(move || port_unreachables_for_a_flood(&many, 1));
    // One more a millisecond while they are sent, with room for datagrams handled after.
    let most = 50 + took.as_millis() as usize + 20;
    assert!(
        (40..=most).contains(&unreachables),
        "{unreachables} port unreachables for a datagram from each of 200 sources in {took:?}"
    );
    let one = one.to_vec();
    let (unreachables, took) = topo
        .client
        .run(move || port_unreachables_for_a_flood(&one, 300));
    let most = 6 + took.as_secs() as usize + 1;
    assert!(
        (6..=most).contains(&unreachables),
        "{unreachables} port unreachables for 300 datagrams from one source in {took:?}"
    );
    tproxy.stop().unwrap();
    for host in &hosts[..2] {
        let (tcp, _, udp) = answers(&topo, *host);
        assert!(
            tcp.is_ok() && udp.is_ok(),
            "{host} after tproxy: {tcp:?} {udp:?}"
        );
    }
}

/// Sends `datagrams` UDP datagrams from each of the `sources` to 10.10.2.2:5353 at once
/// from the calling thread's namespace, and counts the ICMP port unreachables that come back
/// within half a second; with how long the sending took.
fn port_unreachables_for_a_flood(sources: &[String], datagrams: usize) -> (usize, Duration) {
    use socket2::{Domain, Protocol, Socket, Type};
    // One CPU's budget: the datagrams are handled on the CPU that sends them.
    let mut one_cpu = nix::sched::CpuSet::new();
    one_cpu.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one_cpu).unwrap();
    let icmp = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).unwrap();
    icmp.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // Room for every answer, were they all sent (the default holds about 150).
    nix::sys::socket::setsockopt(&icmp, nix::sys::socket::sockopt::RcvBufForce, &(4 << 20))
        .unwrap();
    let started = Instant::now();
    for source in sources {
        let udp = std::net::UdpSocket::bind((source.as_str(), 0)).unwrap();
        for _ in 0..datagrams {
            // Unconnected: the errors are not reported on the socket, nothing stops the
            // sends.
            udp.send_to(b"flood", addr("10.10.2.2:5353")).unwrap();
        }
    }
    let took = started.elapsed();
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut buffer = [std::mem::MaybeUninit::new(0u8); 1500];
    let mut count = 0;
    while Instant::now() < deadline {
        let Ok(len) = icmp.recv(&mut buffer) else {
            continue;
        };
        // SAFETY: the kernel wrote `len` bytes.
        let packet: Vec<u8> = buffer[..len]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        let header = usize::from(packet[0] & 0x0f) * 4;
        // With a checksum that holds (the router's kernel finished it, its offload off).
        if packet.get(header..header + 2) == Some(&[3, 3])
            && tproxy_tests::packets::checksum(&[&packet[header..]]) == 0
        {
            count += 1;
        }
    }
    (count, took)
}
