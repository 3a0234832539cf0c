//! A bounded soak: mixed TCP and UDP load with churn (short and long connections, clean
//! closes, half-closes and resets, new UDP flows all the time) through tproxy, then checks
//! that nothing leaked: no connection or session left, file descriptors back where they
//! were, memory flat. `TPROXY_SOAK_SECONDS` sets the length (`cargo xtask soak` runs longer).

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use tproxy_tests::{payload, require_root, udp_client, RouterTopology as Topo, Server, UdpEcho};

/// Open descriptors by kind: (pipes, everything else). Pipes are the relay's splice pool,
/// which keeps up to 256 idle pipes for reuse (two descriptors each); everything else must
/// come back to where it was.
fn descriptors(pid: u32) -> (usize, usize) {
    let mut pipes = 0;
    let mut other = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(entry.unwrap().path()).unwrap_or_default();
        if target.to_string_lossy().starts_with("pipe:") {
            pipes += 1;
        } else {
            other += 1;
        }
    }
    (pipes, other)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[derive(Default)]
struct Tally {
    tcp: AtomicU64,
    udp: AtomicU64,
    udp_lost: AtomicU64,
    errors: AtomicU64,
}

/// One TCP exchange of `round`'s kind: echo a payload, then close cleanly, half-close first,
/// or reset.
fn tcp_round(topo: &Topo, server: SocketAddr, round: u64) -> std::io::Result<()> {
    let mut stream = topo.client.connect(server).map_err(std::io::Error::other)?;
    let data = payload(1 + (round as usize * 7919) % 65536, round);
    let writer = {
        let mut stream = stream.try_clone()?;
        let data = data.clone();
        thread::spawn(move || stream.write_all(&data))
    };
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back)?;
    writer.join().unwrap()?;
    if back != data {
        return Err(std::io::Error::other("echo mismatch"));
    }
    match round % 3 {
        0 => {}
        1 => {
            stream.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest)?;
        }
        _ => socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?,
    }
    Ok(())
}

/// Five datagrams on a new client socket; returns how many got no answer. UDP may lose
/// datagrams under load, and a late answer may reach a later round's socket on the same
/// port: such strays are skipped, and a reply from anywhere but the server is an error.
fn udp_round(topo: &Topo, server: SocketAddr, round: u64) -> std::io::Result<u64> {
    let socket = udp_client(&topo.client, server).map_err(std::io::Error::other)?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut lost = 0;
    for i in 0..5 {
        let message = format!("round {round} datagram {i}");
        socket.send_to(message.as_bytes(), server)?;
        let mut buffer = [0u8; 128];
        loop {
            match socket.recv_from(&mut buffer) {
                Ok((_, from)) if from != server => {
                    return Err(std::io::Error::other(format!("a reply from {from}")));
                }
                Ok((len, _)) if &buffer[..len] == message.as_bytes() => break,
                Ok(_) => continue,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    lost += 1;
                    break;
                }
                Err(error) => return Err(error),
            }
        }
    }
    Ok(lost)
}

#[test]
fn a_soak_with_churn_leaks_no_connections_sessions_descriptors_or_memory() {
    require_root();
    let seconds: u64 = std::env::var("TPROXY_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let topo = Arc::new(Topo::new().unwrap());
    let tcp_servers: Vec<Server> = [false, true]
        .map(|v6| Server::echo(&topo.server, Topo::server_addr(v6, 80)).unwrap())
        .into();
    let udp_servers: Vec<UdpEcho> = [false, true]
        .map(|v6| UdpEcho::start(&topo.server, Topo::server_addr(v6, 5300)).unwrap())
        .into();
    let mut tproxy = topo
        .tproxy(&["--tcp", "80", "--udp", "5300", "--udp-idle-timeout", "2s"])
        .unwrap();
    let pid = tproxy.pid();
    // Warm up: thread pools, pipe pool, buffers.
    for round in 0..20 {
        tcp_round(&topo, tcp_servers[0].addr, round).unwrap();
        assert_eq!(udp_round(&topo, udp_servers[0].addr, round).unwrap(), 0);
    }
    thread::sleep(Duration::from_secs(3));
    let (fds_before, rss_before) = (descriptors(pid), rss_kib(pid));

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..6u64 {
        let (topo, tally, stop) = (topo.clone(), tally.clone(), stop.clone());
        let tcp: Vec<SocketAddr> = tcp_servers.iter().map(|s| s.addr).collect();
        let udp: Vec<SocketAddr> = udp_servers.iter().map(|s| s.addr).collect();
        workers.push(thread::spawn(move || {
            let mut round = worker * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let v6 = (round % 2) as usize;
                let result = if worker % 3 == 2 {
                    udp_round(&topo, udp[v6], round).map(|lost| {
                        tally.udp_lost.fetch_add(lost, Ordering::Relaxed);
                        &tally.udp
                    })
                } else {
                    tcp_round(&topo, tcp[v6], round).map(|()| &tally.tcp)
                };
                match result {
                    Ok(counter) => counter.fetch_add(1, Ordering::Relaxed),
                    Err(error) => {
                        eprintln!("worker {worker} round {round}: {error}");
                        tally.errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    let started = Instant::now();
    let mut rss_mid = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        thread::sleep(Duration::from_secs(1));
        if rss_mid == 0 && started.elapsed() >= Duration::from_secs(seconds / 2) {
            rss_mid = rss_kib(pid);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().unwrap();
    }
    // UDP sessions expire after 2 s idle; closed TCP connections are gone at once.
    thread::sleep(Duration::from_secs(4));
    let (fds_after, rss_after) = (descriptors(pid), rss_kib(pid));
    let (tcp_active, udp_active) = (
        tproxy.tcp_stat("active").unwrap(),
        tproxy.udp_stat("active").unwrap(),
    );
    let (tcp, udp, lost, errors) = (
        tally.tcp.load(Ordering::Relaxed),
        tally.udp.load(Ordering::Relaxed),
        tally.udp_lost.load(Ordering::Relaxed),
        tally.errors.load(Ordering::Relaxed),
    );
    println!(
        "soak {seconds} s: {tcp} TCP connections, {udp} UDP flows (5 datagrams each, {lost} unanswered), {errors} errors; \
         descriptors (pipes, others) {fds_before:?} -> {fds_after:?}; RSS {rss_before} KiB -> {rss_mid} KiB (half way) -> {rss_after} KiB; \
         afterwards TCP active {tcp_active}, UDP sessions active {udp_active}"
    );
    assert_eq!(errors, 0);
    assert!(
        lost * 1000 <= udp * 5,
        "more than 0.1% of datagrams unanswered: {lost}"
    );
    assert!(tcp > 100 && udp > 50, "the load ran: {tcp} TCP, {udp} UDP");
    assert_eq!(
        (tcp_active, udp_active),
        (0, 0),
        "connections or sessions left"
    );
    assert_eq!(
        fds_after.1, fds_before.1,
        "descriptors other than pooled pipes leaked"
    );
    assert!(
        fds_after.0 <= 2 * 256,
        "more pipes than the pool keeps: {}",
        fds_after.0
    );
    assert!(
        rss_after <= rss_mid + 8 * 1024,
        "memory grew in the second half: {rss_mid} -> {rss_after} KiB"
    );
    tproxy.stop().unwrap();
    // Every session created ended (a client port reused within the idle timeout rejoins its
    // session, so there are fewer sessions than flows).
    let udp = &tproxy.final_stats().unwrap().udp_relay;
    let created = udp.created;
    let ended = udp.expired + udp.ended_by_upstream_error;
    assert!(
        created > 0 && created == ended,
        "created {created}, ended {ended}"
    );
}
