//! `--tcp-relay kernel`: the router topology with the in-kernel relay (a SOCKHASH and its
//! stream-verdict program move the bytes; tproxy only watches for FIN, RST and timeouts).
//! Every test also checks that the connections really went through the kernel relay (not
//! its splice fallback) and that the map is empty once they ended.

use std::{
    io::{ErrorKind, Read, Write},
    net::Shutdown,
    sync::mpsc,
    thread,
    time::Duration,
};

use tproxy_tests::{
    digest, digest_to_eof, payload, require_root, RouterTopology as Topo, Server, Tproxy,
};

fn kernel_tproxy(topo: &Topo, ports: &str) -> Tproxy {
    topo.tproxy(&["--tcp", ports, "--tcp-relay", "kernel"])
        .unwrap()
}

/// The kernel relay took `connections` connections, none fell back, and its map is empty.
fn assert_kernel_relayed_and_gone(tproxy: &mut Tproxy, connections: u64) {
    // The relay notices the end of a connection asynchronously: give it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tproxy.tcp_stat("active").unwrap() != 0 && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        tproxy.tcp_stat("active").unwrap(),
        0,
        "connections still relayed"
    );
    assert_eq!(tproxy.tcp_stat("kernel_relayed").unwrap(), connections);
    assert_eq!(tproxy.tcp_stat("kernel_fallbacks").unwrap(), 0);
    assert_eq!(tproxy.tcp_stat("kernel_map_entries").unwrap(), 0);
}

/// Hashes what it receives until the client's FIN, then answers with the length and hash.
fn hash_server(topo: &Topo, port: u16) -> Server {
    Server::start(
        &topo.server,
        Topo::server_addr(false, port),
        |mut stream| {
            let (len, hash) = digest_to_eof(&mut stream).unwrap();
            stream
                .write_all(format!("{len} {hash}").as_bytes())
                .unwrap();
        },
    )
    .unwrap()
}

#[test]
fn twenty_megabytes_arrive_byte_exact_both_ways() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = kernel_tproxy(&topo, "80,81");
    let len = 20 * 1024 * 1024;
    let data = payload(len, 16);
    let expected = digest(&data);
    let hasher = hash_server(&topo, 80);
    // Sends the payload, then ends its side (half-close towards the client).
    let sender = {
        let data = data.clone();
        Server::start(
            &topo.server,
            Topo::server_addr(false, 81),
            move |mut stream| {
                stream.write_all(&data).unwrap();
                stream.shutdown(Shutdown::Write).unwrap();
                let _ = stream.read(&mut [0; 1]);
            },
        )
        .unwrap()
    };

    let mut stream = topo.client.connect(hasher.addr).unwrap();
    stream.write_all(&data).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, format!("{} {}", expected.0, expected.1), "upload");

    let mut stream = topo.client.connect(sender.addr).unwrap();
    assert_eq!(digest_to_eof(&mut stream).unwrap(), expected, "download");
    drop(stream);

    assert_kernel_relayed_and_gone(&mut tproxy, 2);
    tproxy.stop().unwrap();
    // The counters come from TCP_INFO: exact, the FINs not counted as bytes.
    let log = tproxy.log_text();
    let summary = log
        .lines()
        .rev()
        .find(|l| l.contains("tcp relay:"))
        .unwrap();
    assert!(
        summary.contains(&format!(
            "bytes_to_upstream={len} bytes_to_client={}",
            len + answer.len()
        )),
        "byte counters: {summary}"
    );
}

#[test]
fn half_close_each_way_keeps_the_other_direction() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = kernel_tproxy(&topo, "80,81");
    // Client half-closes first: the server must see EOF and still answer.
    let hasher = hash_server(&topo, 80);
    let data = payload(300_000, 3);
    let expected = digest(&data);
    let mut stream = topo.client.connect(hasher.addr).unwrap();
    stream.write_all(&data).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, format!("{} {}", expected.0, expected.1));

    // Server half-closes first: the client must see EOF and still be heard.
    let (heard_tx, heard) = mpsc::channel();
    let greeting = payload(200_000, 4);
    let server = {
        let greeting = greeting.clone();
        Server::start(
            &topo.server,
            Topo::server_addr(false, 81),
            move |mut stream| {
                stream.write_all(&greeting).unwrap();
                stream.shutdown(Shutdown::Write).unwrap();
                let _ = heard_tx.send(digest_to_eof(&mut stream).unwrap());
            },
        )
        .unwrap()
    };
    let mut stream = topo.client.connect(server.addr).unwrap();
    assert_eq!(digest_to_eof(&mut stream).unwrap(), digest(&greeting));
    let reply = payload(100_000, 5);
    stream.write_all(&reply).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(
        heard.recv_timeout(Duration::from_secs(10)).unwrap(),
        digest(&reply),
        "the client's bytes after the server's FIN"
    );
    drop(stream);
    assert_kernel_relayed_and_gone(&mut tproxy, 2);
}

#[test]
fn a_reset_on_either_side_resets_the_other() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = kernel_tproxy(&topo, "80,81");

    // The client resets: the server's read must fail, not end cleanly.
    let (outcome_tx, outcome) = mpsc::channel();
    let server = Server::start(
        &topo.server,
        Topo::server_addr(false, 80),
        move |mut stream| {
            let mut buffer = [0; 64];
            let first = stream.read(&mut buffer).map(|n| n > 0);
            let rest = std::io::copy(&mut stream, &mut std::io::sink());
            let _ = outcome_tx.send((first.unwrap_or(false), rest.map_err(|e| e.kind())));
        },
    )
    .unwrap();
    let mut stream = topo.client.connect(server.addr).unwrap();
    stream.write_all(b"hello").unwrap();
    thread::sleep(Duration::from_millis(200));
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
    let (got_data, rest) = outcome.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(got_data, "the bytes before the reset arrived");
    assert_eq!(
        rest.unwrap_err(),
        ErrorKind::ConnectionReset,
        "the server saw the reset"
    );

    // The server resets: the client's read must fail.
    let server = Server::start(&topo.server, Topo::server_addr(false, 81), |mut stream| {
        stream.write_all(b"bye").unwrap();
        thread::sleep(Duration::from_millis(200));
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    })
    .unwrap();
    let mut stream = topo.client.connect(server.addr).unwrap();
    let mut buffer = [0; 3];
    stream.read_exact(&mut buffer).unwrap();
    assert_eq!(&buffer, b"bye");
    let error = std::io::copy(&mut stream, &mut std::io::sink()).unwrap_err();
    assert_eq!(
        error.kind(),
        ErrorKind::ConnectionReset,
        "the client saw the reset"
    );
    drop(stream);
    assert_kernel_relayed_and_gone(&mut tproxy, 2);
}

#[test]
fn two_thousand_concurrent_connections_with_random_sizes() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = kernel_tproxy(&topo, "80");
    let echo = Server::echo(&topo.server, Topo::server_addr(false, 80)).unwrap();
    const CONNECTIONS: usize = 2000;
    const WORKERS: usize = 8;
    // All connections are opened first and held open together; then each worker sends and
    // checks its share, a connection at a time.
    let mut streams: Vec<_> = (0..CONNECTIONS)
        .map(|_| topo.client.connect(echo.addr).unwrap())
        .collect();
    let mut shares: Vec<Vec<_>> = (0..WORKERS).map(|_| Vec::new()).collect();
    for (index, stream) in streams.drain(..).enumerate() {
        shares[index % WORKERS].push((index, stream));
    }
    let workers: Vec<_> = shares
        .into_iter()
        .map(|share| {
            thread::spawn(move || {
                for (index, mut stream) in share {
                    // Sizes from 0 to ~256 KiB, a few bytes to many segments.
                    let seed = (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    let len = (seed >> 46) as usize;
                    let data = payload(len, seed);
                    let writer = {
                        let mut stream = stream.try_clone().unwrap();
                        thread::spawn(move || {
                            stream.write_all(&data).unwrap();
                            stream.shutdown(Shutdown::Write).unwrap();
                            digest(&data)
                        })
                    };
                    let echoed = digest_to_eof(&mut stream).unwrap();
                    assert_eq!(
                        echoed,
                        writer.join().unwrap(),
                        "connection {index}, {len} bytes"
                    );
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    assert_kernel_relayed_and_gone(&mut tproxy, CONNECTIONS as u64);
}

#[test]
fn bytes_sent_before_the_pair_is_made_are_relayed() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = kernel_tproxy(&topo, "80,81");
    // Client speaks first, at once: its request is queued before tproxy has the upstream
    // connected, so it reaches the program only through the flush at pairing time.
    let echo = Server::echo(&topo.server, Topo::server_addr(false, 80)).unwrap();
    // Server speaks first: its banner may be queued on the upstream socket before the pair.
    let banner = Server::start(&topo.server, Topo::server_addr(false, 81), |mut stream| {
        stream.write_all(b"220 hello\r\n").unwrap();
        let _ = std::io::copy(&mut stream.try_clone().unwrap(), &mut stream);
    })
    .unwrap();
    const ROUNDS: u64 = 300;
    for round in 0..ROUNDS {
        let mut stream = topo.client.connect(echo.addr).unwrap();
        stream.write_all(&[round as u8; 64]).unwrap();
        let mut answer = [0; 64];
        stream.read_exact(&mut answer).unwrap();
        assert_eq!(answer, [round as u8; 64], "round {round}");

        let mut stream = topo.client.connect(banner.addr).unwrap();
        let mut greeting = [0; 11];
        stream.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting, b"220 hello\r\n", "round {round}");
    }
    assert_kernel_relayed_and_gone(&mut tproxy, 2 * ROUNDS);
}
