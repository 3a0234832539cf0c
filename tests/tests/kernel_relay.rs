//! `--tcp-relay kernel`: the router topology with the in-kernel relay (a SOCKHASH and its
//! stream-verdict program move the bytes; tproxy only watches for FIN, RST and timeouts).
//! Every test also checks that the connections really went through the kernel relay (not
//! its splice fallback) and that the map is empty once they ended.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use tproxy_tests::{
    digest, digest_to_eof, payload, require_root, Bpffs, RouterTopology as Topo, Server, Tproxy,
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
    // A socket that has seen its peer's FIN is no longer one the kernel relay takes (the
    // relay splices it instead): half-close only once the pair is in its map.
    assert!(eventually(
        || tproxy.tcp_stat("kernel_relayed").unwrap() == 1
    ));
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
    let (go_tx, go) = mpsc::channel::<()>();
    let go = std::sync::Mutex::new(go);
    let greeting = payload(200_000, 4);
    let server = {
        let greeting = greeting.clone();
        Server::start(
            &topo.server,
            Topo::server_addr(false, 81),
            move |mut stream| {
                // As above, for the relay's upstream socket.
                let _ = go.lock().unwrap().recv_timeout(Duration::from_secs(10));
                stream.write_all(&greeting).unwrap();
                stream.shutdown(Shutdown::Write).unwrap();
                let _ = heard_tx.send(digest_to_eof(&mut stream).unwrap());
            },
        )
        .unwrap()
    };
    let mut stream = topo.client.connect(server.addr).unwrap();
    assert!(eventually(
        || tproxy.tcp_stat("kernel_relayed").unwrap() == 2
    ));
    go_tx.send(()).unwrap();
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
    // A socket that has seen its peer's FIN cannot go into the map (the relay splices it):
    // every pair is made before any client half-closes.
    assert!(eventually(
        || tproxy.tcp_stat("kernel_relayed").unwrap() == CONNECTIONS as u64
    ));
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

/// Waits (up to a generous limit) until `condition` holds; false if it never did.
fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
    true
}

/// The value `name` on the last `tcp relay:` line an instance logged: at its exit, after its
/// connections ended and while its map still existed.
fn logged_tcp_stat(tproxy: &Tproxy, name: &str) -> u64 {
    let log = tproxy.log_text();
    let line = log
        .lines()
        .rev()
        .find(|line| line.contains("tcp relay:"))
        .unwrap_or_else(|| panic!("no `tcp relay:` line in:\n{log}"));
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(prefix.as_str()))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

/// Sends signal `signal` to an instance without waiting for it to exit.
fn signal(tproxy: &Tproxy, signal: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(tproxy.pid() as i32), signal).unwrap();
}

const CHUNK: usize = 32 * 1024;
const CHUNK_GAP: Duration = Duration::from_millis(100);

/// A transfer both ways through the echo server, `chunks` × [`CHUNK_GAP`] long: the client
/// sends its payload a chunk at a time and reads the echo to its end. Whether both directions
/// arrived byte-exact, or how the transfer broke.
fn slow_echo_transfer(
    topo: &Topo,
    echo: SocketAddr,
    chunks: usize,
    seed: u64,
) -> thread::JoinHandle<Result<(), String>> {
    let mut stream = topo.client.connect(echo).unwrap();
    thread::spawn(move || {
        let data = payload(chunks * CHUNK, seed);
        let sender = {
            let mut stream = stream.try_clone().unwrap();
            let data = data.clone();
            thread::spawn(move || -> std::io::Result<()> {
                for chunk in data.chunks(CHUNK) {
                    stream.write_all(chunk)?;
                    thread::sleep(CHUNK_GAP);
                }
                stream.shutdown(Shutdown::Write)
            })
        };
        let echoed = digest_to_eof(&mut stream).map_err(|e| format!("transfer broke: {e}"))?;
        let sent = sender.join().unwrap();
        sent.map_err(|e| format!("sending broke: {e}"))?;
        match echoed == digest(&data) {
            true => Ok(()),
            false => Err(format!("echo {echoed:?} differs from what was sent")),
        }
    })
}

/// One short exchange through the echo server on a new connection.
fn echo_once(topo: &Topo, echo: SocketAddr) {
    let mut stream = topo.client.connect(echo).unwrap();
    stream.write_all(b"ping").unwrap();
    let mut back = [0; 4];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
}

/// A successor takes over while transfers run in the old instance's map. Their pairs stay in
/// the old instance's socket hash (its program and map are its own, not pinned) and it keeps
/// serving them until they end, as it does with spliced ones; new connections are paired in
/// the new instance's map. `sigterm_first`: the old instance is stopped before the new one
/// starts (a restart), otherwise it is stopped after the takeover (an upgrade).
fn takeover_under_load(sigterm_first: bool) {
    require_root();
    let topo = Topo::new().unwrap();
    let bpffs = Bpffs::new().unwrap();
    let echo = Server::echo(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let args = [
        "--tcp",
        "80",
        "--tcp-relay",
        "kernel",
        "--pin",
        "--pin-dir",
        bpffs.path(),
        "--fail-mode",
        "closed",
        "--drain-timeout",
        "30s",
    ];
    let mut old = topo.tproxy(&args).unwrap();
    const TRANSFERS: u64 = 4;
    // About 3 s each, so that the takeover happens in their middle.
    let transfers: Vec<_> = (0..TRANSFERS)
        .map(|seed| slow_echo_transfer(&topo, echo.addr, 30, seed))
        .collect();
    assert!(
        eventually(|| old.tcp_stat("kernel_relayed").unwrap() == TRANSFERS),
        "the transfers were not paired in the old instance"
    );
    if sigterm_first {
        signal(&old, Signal::SIGTERM);
        old.wait_for_line("stopping: draining", Duration::from_secs(5))
            .unwrap();
    }
    let mut new = topo.tproxy(&args).unwrap();
    old.wait_for_line("the new instance has taken over", Duration::from_secs(5))
        .unwrap();
    if !sigterm_first {
        // The operator's next step in an upgrade; the old instance keeps draining.
        signal(&old, Signal::SIGTERM);
        old.wait_for_line(
            "already draining for the new instance",
            Duration::from_secs(5),
        )
        .unwrap();
    }
    // The old instance accepts no more: this one is the new instance's.
    echo_once(&topo, echo.addr);
    for (index, transfer) in transfers.into_iter().enumerate() {
        assert_eq!(
            transfer.join().unwrap(),
            Ok(()),
            "transfer {index} across the takeover"
        );
    }
    // Its pairs ended, the old instance ends by itself, long before its drain timeout.
    let status = old.wait(Duration::from_secs(15)).unwrap();
    assert!(status.success(), "{status}\n{}", old.log_text());
    for (name, expected) in [
        ("kernel_relayed", TRANSFERS),
        ("kernel_fallbacks", 0),
        ("active", 0),
        ("kernel_map_entries", 0),
    ] {
        assert_eq!(
            logged_tcp_stat(&old, name),
            expected,
            "old instance's {name}"
        );
    }
    assert_kernel_relayed_and_gone(&mut new, 1);
    new.stop().unwrap();
}

#[test]
fn an_upgrade_under_load_leaves_the_pairs_in_flight_to_the_old_instance_byte_exact() {
    takeover_under_load(false);
}

#[test]
fn a_restart_under_load_leaves_the_pairs_in_flight_to_the_old_instance_byte_exact() {
    takeover_under_load(true);
}

#[test]
fn at_the_end_of_the_drain_the_pairs_left_are_reset_and_the_map_emptied() {
    require_root();
    let topo = Topo::new().unwrap();
    let echo = Server::echo(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let mut tproxy = topo
        .tproxy(&[
            "--tcp",
            "80",
            "--tcp-relay",
            "kernel",
            "--drain-timeout",
            "1s",
        ])
        .unwrap();
    // About 20 s: it cannot end by itself within the drain.
    let transfer = slow_echo_transfer(&topo, echo.addr, 200, 1);
    assert!(eventually(
        || tproxy.tcp_stat("kernel_relayed").unwrap() == 1
    ));
    signal(&tproxy, Signal::SIGTERM);
    let status = tproxy.wait(Duration::from_secs(15)).unwrap();
    assert!(status.success(), "{status}\n{}", tproxy.log_text());
    // Reset, not ended: a clean end of stream would hide the truncation.
    let cut = transfer.join().unwrap();
    assert!(
        cut.as_ref()
            .is_err_and(|e| e.starts_with("transfer broke") && e.contains("reset")),
        "{cut:?}"
    );
    assert_eq!(logged_tcp_stat(&tproxy, "active"), 0);
    assert_eq!(logged_tcp_stat(&tproxy, "kernel_map_entries"), 0);
}

/// How reading from `stream` ends (after any bytes), and how long that took.
fn read_outcome(stream: &mut TcpStream) -> (std::io::Result<usize>, Duration) {
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let started = Instant::now();
    let mut buffer = [0u8; 4096];
    let result = loop {
        match stream.read(&mut buffer) {
            Ok(n) if n > 0 => continue,
            other => break other,
        }
    };
    (result, started.elapsed())
}

#[test]
fn an_idle_pair_is_reset_after_the_idle_timeout_and_one_busy_one_way_is_not() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = topo
        .tproxy(&[
            "--tcp",
            "80,81",
            "--tcp-relay",
            "kernel",
            "--idle-timeout",
            "1s",
        ])
        .unwrap();
    let echo = Server::echo(&topo.server, Topo::server_addr(false, 80)).unwrap();
    // Busy one way only, for three idle timeouts: bytes tproxy itself never sees.
    const TICKS: usize = 15;
    let streamer = Server::start(&topo.server, Topo::server_addr(false, 81), |mut stream| {
        for _ in 0..TICKS {
            if stream.write_all(&[7; 1000]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
    })
    .unwrap();
    let mut busy = topo.client.connect(streamer.addr).unwrap();
    let busy = thread::spawn(move || {
        let mut got = Vec::new();
        busy.read_to_end(&mut got).map(|_| got.len())
    });

    let mut idle = topo.client.connect(echo.addr).unwrap();
    idle.write_all(b"x").unwrap();
    idle.read_exact(&mut [0u8; 1]).unwrap();
    let (result, waited) = read_outcome(&mut idle);
    assert_eq!(
        result.map_err(|e| e.kind()).err(),
        Some(ErrorKind::ConnectionReset),
        "the idle pair"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "reset after {waited:?}"
    );
    assert_eq!(
        busy.join().unwrap().map_err(|e| e.kind()),
        Ok(TICKS * 1000),
        "the pair busy one way"
    );
    assert_kernel_relayed_and_gone(&mut tproxy, 2);
}

#[test]
fn a_half_closed_pair_is_reset_after_the_half_close_timeout() {
    require_root();
    let topo = Topo::new().unwrap();
    // Reads to the client's end of stream, then keeps its own side open and silent.
    let server = Server::start(&topo.server, Topo::server_addr(false, 80), |mut stream| {
        let _ = stream.read_to_end(&mut Vec::new());
        thread::sleep(Duration::from_secs(20));
    })
    .unwrap();
    let mut tproxy = topo
        .tproxy(&[
            "--tcp",
            "80",
            "--tcp-relay",
            "kernel",
            "--half-close-timeout",
            "1s",
        ])
        .unwrap();
    let mut client = topo.client.connect(server.addr).unwrap();
    client.write_all(b"request").unwrap();
    // A socket that has received FIN cannot go into the map: half-closed before it was
    // paired, the connection would be spliced.
    assert!(eventually(
        || tproxy.tcp_stat("kernel_relayed").unwrap() == 1
    ));
    client.shutdown(Shutdown::Write).unwrap();
    let (result, waited) = read_outcome(&mut client);
    assert_eq!(
        result.map_err(|e| e.kind()).err(),
        Some(ErrorKind::ConnectionReset)
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "reset after {waited:?}"
    );
    assert_eq!(tproxy.tcp_stat("half_close_timeouts").unwrap(), 1);
    assert_kernel_relayed_and_gone(&mut tproxy, 1);
}

/// A connection refused at a limit: reset right after the handshake, or, when the reset
/// beats the connect call's own check of the handshake, the connect's error.
fn refused(connected: anyhow::Result<TcpStream>) -> bool {
    match connected {
        Ok(mut stream) => {
            matches!(read_outcome(&mut stream).0, Err(e) if e.kind() == ErrorKind::ConnectionReset)
        }
        Err(error) => error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == ErrorKind::ConnectionReset),
    }
}

#[test]
fn max_connections_refuses_beyond_the_limit_and_a_freed_place_is_paired_again() {
    require_root();
    let topo = Topo::new().unwrap();
    let echo = Server::echo(&topo.server, Topo::server_addr(false, 80)).unwrap();
    // The map is sized for the limit (two sockets a connection): a place given back must
    // have its map entries back too.
    let mut tproxy = topo
        .tproxy(&[
            "--tcp",
            "80",
            "--tcp-relay",
            "kernel",
            "--max-connections",
            "3",
            // Above the overall limit: the overall one is what refuses.
            "--max-connections-per-source",
            "4",
        ])
        .unwrap();
    let connect_and_echo = || {
        let mut stream = topo.client.connect(echo.addr).unwrap();
        stream.write_all(b"ping").unwrap();
        let mut back = [0; 4];
        stream.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ping");
        stream
    };
    let mut held: Vec<TcpStream> = (0..3).map(|_| connect_and_echo()).collect();
    assert!(
        refused(topo.client.connect(echo.addr)),
        "a fourth connection"
    );
    assert_eq!(tproxy.tcp_stat("refused_at_limit").unwrap(), 1);
    for _ in 0..3 {
        drop(held.pop());
        assert!(eventually(|| tproxy.tcp_stat("active").unwrap() < 3));
        held.push(connect_and_echo());
    }
    assert_eq!(tproxy.tcp_stat("kernel_map_entries").unwrap(), 6);
    drop(held);
    assert_kernel_relayed_and_gone(&mut tproxy, 6);
}

#[test]
fn as_an_unprivileged_user_the_kernel_relay_pairs_and_unpairs() {
    require_root();
    let topo = Topo::new().unwrap();
    let echo = Server::echo(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let mut tproxy = topo
        .tproxy(&["--tcp", "80", "--tcp-relay", "kernel", "--user", "nobody"])
        .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", tproxy.pid())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid.split_whitespace().skip(1).collect::<Vec<_>>(),
        ["65534"; 4],
        "{uid}"
    );
    // The map updates need only the map's descriptor, opened before the privileges went.
    for _ in 0..20 {
        echo_once(&topo, echo.addr);
    }
    assert_kernel_relayed_and_gone(&mut tproxy, 20);
    tproxy.stop().unwrap();
}

/// Pairs made while other connections are reset mid-stream (their peer leaves the map while
/// bytes still flow) are all relayed by the kernel, none reset or spliced, and every one of
/// them is counted and taken out of the map.
#[test]
fn pairs_made_while_other_connections_are_reset_mid_stream_are_all_relayed() {
    require_root();
    let topo = Topo::new().unwrap();
    let tproxy = topo
        .tproxy(&["--tcp", "80,81", "--tcp-relay", "kernel"])
        .unwrap();
    let echo = Server::echo(&topo.server, Topo::server_addr(false, 80)).unwrap();
    // Once asked (after the pair is made: nothing of it can be dropped while it is being
    // made), sends until its client is gone. Once the client's socket left the map (reset),
    // what still arrives for it is dropped by the program.
    let firehose = Server::start(&topo.server, Topo::server_addr(false, 81), |mut stream| {
        if stream.read_exact(&mut [0]).is_err() {
            return;
        }
        let block = [9u8; 16 * 1024];
        while stream.write_all(&block).is_ok() {}
    })
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let resetters: Vec<_> = (0..2)
        .map(|_| {
            let (stop, addr) = (stop.clone(), firehose.addr);
            topo.client.run(move || {
                thread::spawn(move || {
                    let mut resets = 0u64;
                    while !stop.load(Relaxed) {
                        let mut stream = TcpStream::connect(addr).unwrap();
                        stream.write_all(b"!").unwrap();
                        stream.read_exact(&mut [0; 64 * 1024]).unwrap();
                        socket2::SockRef::from(&stream)
                            .set_linger(Some(Duration::ZERO))
                            .unwrap();
                        resets += 1;
                    }
                    resets
                })
            })
        })
        .collect();
    const EXCHANGES: u64 = 1000;
    let pairs: Vec<_> = (0..2)
        .map(|_| {
            let addr = echo.addr;
            topo.client.run(move || {
                thread::spawn(move || {
                    for round in 0..EXCHANGES / 2 {
                        let mut stream = TcpStream::connect(addr).unwrap();
                        stream.write_all(&round.to_le_bytes()).unwrap();
                        let mut back = [0; 8];
                        stream
                            .read_exact(&mut back)
                            .unwrap_or_else(|e| panic!("exchange {round}: {e}"));
                        assert_eq!(u64::from_le_bytes(back), round);
                    }
                })
            })
        })
        .collect();
    for pair in pairs {
        pair.join().unwrap();
    }
    stop.store(true, Relaxed);
    let resets: u64 = resetters.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(resets > 0);
    assert!(
        eventually(|| tproxy.tcp_stat("active").unwrap() == 0),
        "connections still relayed"
    );
    assert_eq!(tproxy.tcp_stat("kernel_fallbacks").unwrap(), 0);
    assert_eq!(tproxy.tcp_stat("kernel_map_entries").unwrap(), 0);
    assert_eq!(
        tproxy.tcp_stat("kernel_relayed").unwrap(),
        EXCHANGES + resets
    );
}
