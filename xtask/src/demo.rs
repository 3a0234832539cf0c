//! `cargo xtask demo`: tproxy intercepting real TCP on a throwaway client → router → server
//! topology, narrated. Everything it creates is removed when it ends, also on failure.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use tproxy_tests::{
    digest, digest_to_eof, ingress_programs, payload, routing_state, udp_client,
    RouterTopology as Topo, Server, Tproxy, UdpEcho,
};

const PORT: u16 = 80;
/// Where the throughput sink listens (also steered).
const SINK_PORT: u16 = 5001;
const THROUGHPUT_BYTES: usize = 1 << 30;
const THROUGHPUT_RUNS: usize = 3;
/// Where the UDP echo servers listen (steered).
const UDP_PORT: u16 = 5300;
/// Datagrams per UDP rate run, and how many may be in flight at once.
const UDP_DATAGRAMS: u64 = 100_000;
const UDP_WINDOW: u64 = 64;

pub fn run(binary: &Path) -> Result<()> {
    crate::require_root("the demo creates network namespaces and attaches a BPF program")?;
    std::env::set_var("TPROXY_BIN", binary);
    let topo = Topo::new().context("creating the demo namespaces")?;
    println!("\n== Topology (throwaway network namespaces)");
    println!("   client {} / {}", Topo::CLIENT_V4, Topo::CLIENT_V6);
    println!(
        "     → router ({} faces the client; {} / {} face the server)",
        Topo::ROUTER_CLIENT_IFACE,
        Topo::ROUTER_SERVER_SIDE_V4,
        Topo::ROUTER_SERVER_SIDE_V6
    );
    println!(
        "     → server {} / {}, port {PORT}",
        Topo::SERVER_V4,
        Topo::SERVER_V6
    );

    let servers = [false, true].map(|v6| reporting_server(&topo, v6));
    let mut servers = servers.into_iter().collect::<Result<Vec<_>>>()?;
    let sink = Server::start(
        &topo.server,
        Topo::server_addr(false, SINK_PORT),
        |mut stream| {
            if let Ok(received) = std::io::copy(&mut stream, &mut std::io::sink()) {
                let _ = write!(stream, "{received}");
            }
        },
    );
    servers.push(sink?);
    let udp_servers =
        [false, true].map(|v6| UdpEcho::start(&topo.server, Topo::server_addr(v6, UDP_PORT)));
    let udp_servers = udp_servers.into_iter().collect::<Result<Vec<_>>>()?;

    println!("\n== Without tproxy: the router only forwards");
    for v6 in [false, true] {
        exchange(&topo, v6)?;
        udp_exchange(&topo, v6)?;
    }
    let direct = throughput(&topo)?;
    let direct_udp = udp_rate(&topo)?;

    let ports = format!("{PORT},{SINK_PORT}");
    let udp_port = UDP_PORT.to_string();
    let args = [
        "--iface",
        Topo::ROUTER_CLIENT_IFACE,
        "--tcp",
        &ports,
        "--udp",
        &udp_port,
    ];
    println!("\n== tproxy run {}", args.join(" "));
    let mut tproxy = Tproxy::start(&topo.router, &args)?;
    print_log(&tproxy, 0);
    let mut shown = tproxy.log_text().lines().count();

    println!("\n== With tproxy: the same connections, intercepted on the router");
    for v6 in [false, true] {
        let seen = exchange(&topo, v6)?;
        ensure!(
            seen == Topo::router_as_seen_by_server(v6).to_string(),
            "the server saw {seen}: not intercepted"
        );
        udp_exchange(&topo, v6)?;
    }
    let router_ips = [false, true].map(Topo::router_as_seen_by_server);
    for server in &udp_servers {
        let peers = server.peer_ips();
        let intercepted = peers.iter().filter(|ip| router_ips.contains(ip)).count();
        ensure!(
            intercepted == 1,
            "UDP server peers {peers:?}: not intercepted"
        );
    }
    println!("\n   relay log (original destination as the relay saw it, bytes moved):");
    print_log(&tproxy, shown);
    let proxied = throughput(&topo)?;
    let proxied_udp = udp_rate(&topo)?;
    shown = tproxy.log_text().lines().count();

    println!("\n== Stopping tproxy (SIGTERM): counters, then clean-up");
    tproxy.stop()?;
    print_log(&tproxy, shown);
    ensure!(
        tproxy.final_counter("tcp", "steered_new")? >= 2,
        "no connection was steered"
    );
    let programs = ingress_programs(&topo.router, Topo::ROUTER_CLIENT_IFACE)?;
    let routing = routing_state(&topo.router, 7470)?;
    ensure!(programs.is_empty(), "still attached: {programs:?}");
    ensure!(routing.is_empty(), "routing left behind:\n{routing}");
    println!(
        "   no program attached to {}, no rule or route left in table 7470",
        Topo::ROUTER_CLIENT_IFACE
    );
    exchange(&topo, false)?;

    println!(
        "\n== Throughput, one TCP stream, {} MiB × {THROUGHPUT_RUNS} runs (median)",
        THROUGHPUT_BYTES >> 20
    );
    println!("   direct (router forwarding)  {:>6.2} Gbit/s", direct);
    println!(
        "   through tproxy              {:>6.2} Gbit/s  ({:.0}% of direct)",
        proxied,
        100.0 * proxied / direct
    );
    println!(
        "\n== UDP echo rate, one flow, {UDP_DATAGRAMS} datagrams of 64 bytes, {UDP_WINDOW} in flight"
    );
    println!(
        "   direct (router forwarding)  {:>8.0} datagrams/s each way",
        direct_udp
    );
    println!(
        "   through tproxy              {:>8.0} datagrams/s each way  ({:.0}% of direct)",
        proxied_udp,
        100.0 * proxied_udp / direct_udp
    );
    drop((servers, udp_servers));
    println!("\n== Demo OK: all namespaces removed");
    Ok(())
}

/// Hashes what it receives until end of stream and answers with the byte count, whether the
/// hash matched the demo payload of that size, and the peer it saw.
fn reporting_server(topo: &Topo, v6: bool) -> Result<Server> {
    Server::start(&topo.server, Topo::server_addr(v6, PORT), |mut stream| {
        let peer = stream
            .peer_addr()
            .map(|p| p.ip().to_string())
            .unwrap_or_default();
        let Ok((len, hash)) = digest_to_eof(&mut stream) else {
            return;
        };
        let _ = write!(stream, "{len} {hash} {peer}");
    })
}

/// Sends 1 MiB to the server and prints what the server reports; returns the peer it saw.
fn exchange(topo: &Topo, v6: bool) -> Result<String> {
    let addr = Topo::server_addr(v6, PORT);
    let data = payload(1 << 20, 42);
    let (len, hash) = digest(&data);
    let mut stream = topo.client.connect(addr)?;
    stream.write_all(&data)?;
    stream.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let fields: Vec<&str> = answer.split(' ').collect();
    let [got_len, got_hash, peer] = fields[..] else {
        bail!("unexpected answer from {addr}: `{answer}`");
    };
    ensure!(
        got_len == len.to_string() && got_hash == hash.to_string(),
        "payload corrupted: `{answer}`"
    );
    let who = if peer == Topo::client_ip(v6).to_string() {
        "the client itself"
    } else {
        "the router: intercepted"
    };
    println!("   client → {addr}: server got {len} bytes intact, from {peer} ({who})");
    Ok(peer.to_string())
}

/// Sends one datagram to the UDP echo server and prints where the reply came from.
fn udp_exchange(topo: &Topo, v6: bool) -> Result<()> {
    let addr = Topo::server_addr(v6, UDP_PORT);
    let client = udp_client(&topo.client, addr)?;
    let (reply, from) = tproxy_tests::udp_exchange(&client, addr, b"ping")?;
    ensure!(reply == b"ping", "UDP echo corrupted");
    println!("   client → {addr} (UDP): reply came from {from}");
    Ok(())
}

/// Echoed datagrams per second on one flow, with a window of datagrams in flight.
fn udp_rate(topo: &Topo) -> Result<f64> {
    let addr = Topo::server_addr(false, UDP_PORT);
    let rate = tproxy_tests::udp_echo_rate(&topo.client, addr, UDP_DATAGRAMS, UDP_WINDOW, 64)?;
    let lost = UDP_DATAGRAMS - rate.replies;
    ensure!(
        lost * 100 <= UDP_DATAGRAMS,
        "lost {lost} of {UDP_DATAGRAMS} datagrams"
    );
    Ok(rate.replies as f64 / rate.elapsed.as_secs_f64())
}

/// Median single-stream throughput from client to server, in Gbit/s.
fn throughput(topo: &Topo) -> Result<f64> {
    let addr: SocketAddr = Topo::server_addr(false, SINK_PORT);
    let chunk = vec![0x5au8; 1 << 20];
    let mut rates = Vec::new();
    for _ in 0..THROUGHPUT_RUNS {
        let started = Instant::now();
        let mut stream = topo.client.connect(addr)?;
        for _ in 0..THROUGHPUT_BYTES / chunk.len() {
            stream.write_all(&chunk)?;
        }
        stream.shutdown(Shutdown::Write)?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let elapsed = started.elapsed().max(Duration::from_micros(1));
        ensure!(
            answer == THROUGHPUT_BYTES.to_string(),
            "short transfer: `{answer}`"
        );
        rates.push(THROUGHPUT_BYTES as f64 * 8.0 / elapsed.as_secs_f64() / 1e9);
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[rates.len() / 2])
}

/// Prints tproxy's log lines from the `from`-th on, indented.
fn print_log(tproxy: &Tproxy, from: usize) {
    for line in tproxy.log_text().lines().skip(from) {
        println!("   [tproxy] {line}");
    }
}
