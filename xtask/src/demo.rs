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
    digest, digest_to_eof, ingress_programs, payload, routing_state, RouterTopology as Topo,
    Server, Tproxy,
};

const PORT: u16 = 80;
/// Where the throughput sink listens (also steered).
const SINK_PORT: u16 = 5001;
const THROUGHPUT_BYTES: usize = 1 << 30;
const THROUGHPUT_RUNS: usize = 3;

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

    println!("\n== Without tproxy: the router only forwards");
    for v6 in [false, true] {
        exchange(&topo, v6)?;
    }
    let direct = throughput(&topo)?;

    let ports = format!("{PORT},{SINK_PORT}");
    let args = ["--iface", Topo::ROUTER_CLIENT_IFACE, "--tcp", &ports];
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
    }
    println!("\n   relay log (original destination as the relay saw it, bytes moved):");
    print_log(&tproxy, shown);
    let proxied = throughput(&topo)?;
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
    drop(servers);
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
