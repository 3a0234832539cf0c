//! The router deployment: tproxy on the router's client-facing interface intercepts the
//! client's connections to the server and relays them; the server sees the router as its peer.

use std::{
    io::{Read, Write},
    net::Shutdown,
    thread,
    time::{Duration, Instant},
};

use tproxy_tests::{
    digest, digest_to_eof, payload, peer_seen_by, require_root, RouterTopology as Topo, Server,
};

#[test]
fn server_sees_the_router_as_peer_over_ipv4_and_ipv6() {
    require_root();
    let topo = Topo::new().unwrap();
    let servers: Vec<Server> = [false, true]
        .map(|v6| Server::tell_peer(&topo.server, Topo::server_addr(v6, 80)).unwrap())
        .into();
    for (server, v6) in servers.iter().zip([false, true]) {
        assert_eq!(
            peer_seen_by(&topo.client, server.addr).unwrap(),
            Topo::client_ip(v6),
            "before tproxy runs, the server sees the client itself"
        );
    }
    let mut tproxy = topo.tproxy(&["--tcp", "80"]).unwrap();
    for v6 in [false, true] {
        let peer = peer_seen_by(&topo.client, Topo::server_addr(v6, 80)).unwrap();
        assert_eq!(peer, Topo::router_as_seen_by_server(v6), "v6={v6}");
        tproxy
            .wait_for_line(
                &format!("relaying via {}", Topo::server_addr(v6, 80)),
                Duration::from_secs(5),
            )
            .unwrap();
    }
    tproxy.stop().unwrap();
    assert_eq!(tproxy.final_counter("tcp", "steered_new").unwrap(), 2);
    assert!(tproxy.final_counter("tcp", "steered_established").unwrap() >= 2);
    assert_eq!(tproxy.final_counter("tcp", "no_listener").unwrap(), 0);
}

/// The server hashes what it receives until the client's FIN, then answers with the length
/// and hash: the client's half-close must reach it while the reply direction stays open.
fn hash_server(topo: &Topo, v6: bool) -> Server {
    Server::start(&topo.server, Topo::server_addr(v6, 80), |mut stream| {
        let (len, hash) = digest_to_eof(&mut stream).unwrap();
        stream
            .write_all(format!("{len} {hash}").as_bytes())
            .unwrap();
    })
    .unwrap()
}

#[test]
fn payloads_arrive_intact_both_ways() {
    require_root();
    let topo = Topo::new().unwrap();
    let _tproxy = topo.tproxy(&["--tcp", "80,81"]).unwrap();
    for v6 in [false, true] {
        let hasher = hash_server(&topo, v6);
        let echo = Server::echo(&topo.server, Topo::server_addr(v6, 81)).unwrap();
        for len in [1, 64 * 1024, 100 * 1024 * 1024] {
            let data = payload(len, len as u64);
            let expected = digest(&data);

            // Client → server, checked by the server's hash.
            let mut stream = topo.client.connect(hasher.addr).unwrap();
            stream.write_all(&data).unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            assert_eq!(
                answer,
                format!("{} {}", expected.0, expected.1),
                "upload v6={v6} len={len}"
            );

            // Both ways at once through the echo server.
            let mut stream = topo.client.connect(echo.addr).unwrap();
            let mut writer = stream.try_clone().unwrap();
            let sender = thread::spawn(move || {
                writer.write_all(&data).unwrap();
                writer.shutdown(Shutdown::Write).unwrap();
            });
            let echoed = digest_to_eof(&mut stream).unwrap();
            sender.join().unwrap();
            assert_eq!(echoed, expected, "echo v6={v6} len={len}");
        }
        let router = Topo::router_as_seen_by_server(v6);
        assert!(hasher
            .peers()
            .iter()
            .chain(echo.peers().iter())
            .all(|p| p.ip() == router));
    }
}

#[test]
fn half_close_works_in_both_directions() {
    require_root();
    let topo = Topo::new().unwrap();
    let _tproxy = topo.tproxy(&["--tcp", "80"]).unwrap();
    for v6 in [false, true] {
        // Server finishes first: sends, shuts its side, then still receives the client's data.
        let (sender, received) = std::sync::mpsc::channel();
        let server = Server::start(
            &topo.server,
            Topo::server_addr(v6, 80),
            move |mut stream| {
                stream.write_all(b"server done").unwrap();
                stream.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest).unwrap();
                sender.send(rest).unwrap();
            },
        )
        .unwrap();
        let mut stream = topo.client.connect(server.addr).unwrap();
        let mut greeting = Vec::new();
        stream.read_to_end(&mut greeting).unwrap();
        assert_eq!(
            greeting, b"server done",
            "the server's FIN arrives after its data"
        );
        stream.write_all(b"client still talking").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let rest = received.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(rest, b"client still talking", "v6={v6}");
        drop(server);

        // Client finishes first: the hash server answers after the client's FIN.
        let hasher = hash_server(&topo, v6);
        let mut stream = topo.client.connect(hasher.addr).unwrap();
        stream.write_all(b"question").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let (len, hash) = digest(b"question");
        assert_eq!(answer, format!("{len} {hash}"), "v6={v6}");
    }
}

#[test]
fn two_hundred_concurrent_connections() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = topo.tproxy(&["--tcp", "80"]).unwrap();
    let echo = Server::echo(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let echo6 = Server::echo(&topo.server, Topo::server_addr(true, 80)).unwrap();
    let streams: Vec<_> = (0..200)
        .map(|i| {
            topo.client
                .connect(if i % 2 == 0 { echo.addr } else { echo6.addr })
                .unwrap()
        })
        .collect();
    // All 200 are open at once; now each carries its own message.
    for (i, mut stream) in streams.iter().enumerate() {
        stream
            .write_all(format!("message {i:03}").as_bytes())
            .unwrap();
    }
    for (i, mut stream) in streams.iter().enumerate() {
        let mut reply = [0u8; 11];
        stream.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, format!("message {i:03}").as_bytes());
    }
    drop(streams);
    assert_eq!(echo.peers().len() + echo6.peers().len(), 200);
    tproxy.stop().unwrap();
    // Each connection was relayed once. The program counts SYNs it hands to the listener: a
    // SYN the burst's full accept queue dropped comes again after a second and counts again.
    let relayed = tproxy_tests::stat(tproxy.final_stats().unwrap(), "tcp relay", "accepted");
    assert_eq!(relayed.unwrap(), 200);
    assert!(tproxy.final_counter("tcp", "steered_new").unwrap() >= 200);
}

#[test]
fn refused_upstream_resets_the_client_promptly() {
    require_root();
    let topo = Topo::new().unwrap();
    let _tproxy = topo.tproxy(&["--tcp", "80"]).unwrap();
    for v6 in [false, true] {
        // Nothing listens on the server's port 80. A lost SYN alone would take 1 s; the
        // reset itself takes well under a millisecond.
        let started = Instant::now();
        connect_expecting_reset(&topo.client, Topo::server_addr(v6, 80));
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_millis(500),
            "v6={v6}: reset took {waited:?}"
        );
    }
}

/// Connects from `netns` to `addr` and expects the connection to be reset, not closed or left
/// hanging. The reset can come so fast that connect() itself reports it (SO_ERROR).
fn connect_expecting_reset(netns: &tproxy_tests::Netns, addr: std::net::SocketAddr) {
    match netns.run(move || std::net::TcpStream::connect(addr)) {
        Ok(mut stream) => expect_reset(&mut stream, &format!("connection to {addr}")),
        Err(error) => assert_eq!(
            error.kind(),
            std::io::ErrorKind::ConnectionReset,
            "{addr}: {error}"
        ),
    }
}

fn expect_reset(stream: &mut std::net::TcpStream, what: &str) {
    match stream.read(&mut [0u8; 16]) {
        Err(error) => assert_eq!(
            error.kind(),
            std::io::ErrorKind::ConnectionReset,
            "{what}: {error}"
        ),
        Ok(n) => panic!("{what}: expected a reset, read {n} bytes"),
    }
}

#[test]
fn idle_connections_are_reset_and_active_ones_are_not() {
    require_root();
    let topo = Topo::new().unwrap();
    let _tproxy = topo
        .tproxy(&["--tcp", "80", "--idle-timeout", "400ms"])
        .unwrap();
    let echo = Server::echo(&topo.server, Topo::server_addr(false, 80)).unwrap();

    let mut active = topo.client.connect(echo.addr).unwrap();
    for _ in 0..8 {
        thread::sleep(Duration::from_millis(100));
        active.write_all(b"x").unwrap();
        active.read_exact(&mut [0u8; 1]).unwrap();
    }

    let mut idle = topo.client.connect(echo.addr).unwrap();
    idle.write_all(b"x").unwrap();
    idle.read_exact(&mut [0u8; 1]).unwrap();
    let started = Instant::now();
    expect_reset(&mut idle, "idle connection");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
}

#[test]
fn an_unanswered_upstream_times_out_and_the_client_is_reset() {
    require_root();
    let topo = Topo::new().unwrap();
    // A listener whose accept queue is full drops further SYNs: a blackhole on a test host.
    let addr = Topo::server_addr(false, 80);
    let blackhole = topo.server.run(move || {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&addr.into()).unwrap();
        socket.listen(0).unwrap();
        let queued = std::net::TcpStream::connect(addr).unwrap();
        (socket, queued)
    });
    let _tproxy = topo
        .tproxy(&["--tcp", "80", "--connect-timeout", "300ms"])
        .unwrap();
    let started = Instant::now();
    let mut stream = topo.client.connect(addr).unwrap();
    expect_reset(&mut stream, "blackholed upstream");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    drop(blackhole);
}

#[test]
fn stopping_resets_connections_in_flight() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = topo.tproxy(&["--tcp", "80"]).unwrap();
    let echo = Server::echo(&topo.server, Topo::server_addr(true, 80)).unwrap();
    let mut stream = topo.client.connect(echo.addr).unwrap();
    stream.write_all(b"x").unwrap();
    stream.read_exact(&mut [0u8; 1]).unwrap();
    tproxy.stop().unwrap();
    // A clean end of stream here would pass a truncated transfer off as complete.
    expect_reset(&mut stream, "connection relayed when tproxy stopped");
}

#[test]
fn a_connection_straight_to_the_listener_is_refused_not_looped() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = topo
        .tproxy(&["--tcp", "80", "--listen", "127.0.0.1:7000"])
        .unwrap();
    // Only a process on the router itself can reach a loopback listener. Relaying such a
    // connection to its "original destination" would connect to the listener again, forever.
    connect_expecting_reset(&topo.router, "127.0.0.1:7000".parse().unwrap());
    tproxy
        .wait_for_line(
            "refusing to relay to our own listener",
            Duration::from_secs(5),
        )
        .unwrap();
    tproxy.stop().unwrap();
    assert_eq!(
        tproxy.final_stats().unwrap().tcp_relay.accepted,
        1,
        "{}",
        tproxy.log_text()
    );
}

#[test]
fn a_new_connection_reusing_a_time_wait_tuple_is_accepted_promptly() {
    require_root();
    let topo = Topo::new().unwrap();
    let _tproxy = topo.tproxy(&["--tcp", "80"]).unwrap();
    for v6 in [false, true] {
        // The server speaks and closes first, so the relay closes its client side first and
        // the router keeps that side's tuple in TIME_WAIT.
        let server = Server::tell_peer(&topo.server, Topo::server_addr(v6, 80)).unwrap();
        let client = std::net::SocketAddr::new(Topo::client_ip(v6), 40000);
        for round in 0..3 {
            if round > 0 {
                let time_wait = topo.router.time_wait_sockets().unwrap();
                assert!(
                    time_wait.contains(":40000"),
                    "no TIME_WAIT to reuse:\n{time_wait}"
                );
            }
            let started = Instant::now();
            let peer = topo.client.read_all_from(client, server.addr);
            let waited = started.elapsed();
            assert_eq!(
                peer.unwrap(),
                Topo::router_as_seen_by_server(v6).to_string(),
                "v6={v6} round {round}"
            );
            // A dropped SYN would cost a 1 s retransmission.
            assert!(
                waited < Duration::from_millis(500),
                "v6={v6} round {round}: {waited:?}"
            );
        }
    }
}
