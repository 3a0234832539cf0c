//! `cargo xtask bench`: tproxy against the classic recipe, on one client → router → server
//! topology, in one run. Each round measures every mode in turn, so slow drift of the machine
//! spreads over all modes alike; the report gives the median of the rounds and their spread.
//!
//! Modes: the router only forwarding (the limit); iptables TPROXY + tproxy's relay
//! (`--relay-only`: isolates the cost of steering); eBPF steering + tproxy's relay (the
//! product); iptables TPROXY + HAProxy in transparent mode with splice (the incumbent); eBPF
//! steering (`--on-port`) + the same HAProxy (isolates the cost of steering for a proxy
//! tproxy does not run). Interfaces (a bridge, 100 veths by pattern): see [`interfaces`]. The host's
//! own connections (`--local`): see [`local`].

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{Shutdown, SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use tproxy_tests::{
    install_iptables_tproxy, remove_iptables_tproxy, udp_echo_rate, ConfigFile, IptablesTproxy,
    Netns, RouterTopology as Topo, Tproxy, UdpEcho,
};

/// Debian packages the benchmark drives, by the command they provide.
pub const PACKAGES: &[(&str, &str)] = &[
    ("iperf3", "iperf3"),
    ("ab", "apache2-utils"),
    ("nginx", "nginx-light"),
    ("sockperf", "sockperf"),
    ("haproxy", "haproxy"),
    ("iptables", "iptables"),
];
pub mod interfaces;
pub mod local;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const IPERF_PORT: u16 = 5201;
const UNSTEERED_PORT: u16 = 5202;
const HTTP_PORT: u16 = 80;
const SOCKPERF_PORT: u16 = 11111;
const UDP_PORT: u16 = 5300;
const RELAY_PORT: u16 = 15001;
const HAPROXY_PORT: u16 = 15002;
const IDLE_CONNECTIONS: usize = 5000;
const RULE_COUNTS: [usize; 3] = [1, 1000, 10000];
/// Rules in the rule-load measurement: a large iptables rule set after `translate`.
const LOAD_RULES: usize = 100_000;
const LOAD_CHECK: &str = "`tproxy check` (to exit)";
const LOAD_RUN: &str = "`tproxy run` (to ready)";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Direct,
    IptablesRelay,
    /// eBPF steering, relay `--tcp-relay splice`.
    Ebpf,
    /// eBPF steering, relay `--tcp-relay kernel` (sockhash + stream verdict).
    EbpfKernel,
    /// eBPF steering, relay `--tcp-relay copy`.
    EbpfCopy,
    Haproxy,
    /// eBPF steering to HAProxy as an external listener (`--on-port`), no iptables.
    EbpfHaproxy,
}

/// Every mode, in report order.
const MODES: [Mode; 7] = [
    Mode::Direct,
    Mode::IptablesRelay,
    Mode::Ebpf,
    Mode::EbpfKernel,
    Mode::EbpfCopy,
    Mode::Haproxy,
    Mode::EbpfHaproxy,
];

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct (forwarding only)",
            Mode::IptablesRelay => "iptables TPROXY + tproxy relay",
            Mode::Ebpf => "eBPF + tproxy relay (splice)",
            Mode::EbpfKernel => "eBPF + tproxy relay (kernel)",
            Mode::EbpfCopy => "eBPF + tproxy relay (copy)",
            Mode::Haproxy => "iptables TPROXY + HAProxy",
            Mode::EbpfHaproxy => "eBPF + HAProxy",
        }
    }
}

/// Metric name → mode → one value per round.
type Samples = BTreeMap<&'static str, BTreeMap<Mode, Vec<f64>>>;

/// Command → (seconds, peak resident MiB) per round, loading [`LOAD_RULES`] rules.
type Loads = BTreeMap<&'static str, Vec<(f64, f64)>>;

/// A metric: its name in the report, its unit, and whether more is better.
struct Metric {
    name: &'static str,
    unit: &'static str,
    higher_is_better: bool,
}

const METRICS: &[Metric] = &[
    Metric {
        name: "TCP throughput, 1 stream",
        unit: "Gbit/s",
        higher_is_better: true,
    },
    Metric {
        name: "TCP throughput, 4 streams",
        unit: "Gbit/s",
        higher_is_better: true,
    },
    Metric {
        name: "new connections/s (HTTP, no keep-alive)",
        unit: "conn/s",
        higher_is_better: true,
    },
    Metric {
        name: "request/response latency p50",
        unit: "µs",
        higher_is_better: false,
    },
    Metric {
        name: "request/response latency p99",
        unit: "µs",
        higher_is_better: false,
    },
    Metric {
        name: "UDP datagrams/s (echo, 64 B)",
        unit: "dgram/s",
        higher_is_better: true,
    },
    Metric {
        name: "relay CPU per GB",
        unit: "CPU s/GB",
        higher_is_better: false,
    },
    Metric {
        name: "relay memory per idle connection",
        unit: "KiB",
        higher_is_better: false,
    },
    Metric {
        name: "unsteered TCP throughput, program attached",
        unit: "Gbit/s",
        higher_is_better: true,
    },
];

/// `relay_modes_only`: only the table of modes, without the rule-scaling, rule-load and
/// interface runs.
pub fn run(binary: &Path, rounds: usize, relay_modes_only: bool) -> Result<()> {
    crate::require_root("the benchmark creates network namespaces and attaches BPF programs")?;
    crate::setup::install_commands(PACKAGES)?;
    crate::setup::apt_install(&["fonts-dejavu-core"])?;
    std::env::set_var("TPROXY_BIN", binary);
    let mut samples = Samples::new();
    let mut scaling: BTreeMap<(String, usize), Vec<f64>> = BTreeMap::new();
    let mut loads = Loads::new();
    let many_rules = ConfigFile::new(&many_rules_config(LOAD_RULES))?;
    let mut by_interface = interfaces::Samples::default();
    let mut local_samples = local::LocalSamples::new();
    for round in 1..=rounds {
        local::measure_round(round, rounds, &mut local_samples)?;
        for mode in MODES {
            println!("bench: round {round}/{rounds}: {}", mode.label());
            let (topo, _servers) = fresh_topology()?;
            let proxy = Proxy::start(&topo, mode, &[])?;
            measure(&topo, mode, &proxy, &mut samples)?;
            proxy.stop(&topo)?;
        }
        if relay_modes_only {
            continue;
        }
        for rules in RULE_COUNTS {
            for (kind, mode) in [("eBPF", Mode::Ebpf), ("iptables", Mode::IptablesRelay)] {
                println!("bench: round {round}/{rounds}: {rules} rules, {kind}");
                let (topo, _servers) = fresh_topology()?;
                let proxy = Proxy::start(&topo, mode, &decoy_prefixes(rules - 1))?;
                let rate = connection_rate(&topo)?;
                proxy.stop(&topo)?;
                let runs = scaling.entry((kind.to_string(), rules)).or_default();
                runs.push(rate);
            }
        }
        println!("bench: round {round}/{rounds}: loading {LOAD_RULES} rules");
        let check = check_load(binary, &many_rules)?;
        loads.entry(LOAD_CHECK).or_default().push(check);
        let run = run_load(&many_rules)?;
        loads.entry(LOAD_RUN).or_default().push(run);
        interfaces::round(&mut by_interface, round, rounds)?;
    }
    report(
        &samples,
        &scaling,
        &loads,
        &by_interface,
        &local_samples,
        rounds,
    )
}

/// `count` rules of one /32 destination and one TCP port each, steered to one listener: what
/// `translate` makes of an iptables rule set (a rule per line).
fn many_rules_config(count: usize) -> String {
    let mut text = String::from("[[listener]]\nname = \"relay\"\n\n");
    for i in 0..count {
        // 172.16.0.1 onwards, inside 172.16.0.0/12 for up to a million rules.
        let dst = std::net::Ipv4Addr::from(0xac10_0001 + i as u32);
        let port = [80, 443, 8080][i % 3];
        text += &format!(
            "[[rule]]\nproto = \"tcp\"\ndst = \"{dst}/32\"\nports = {port}\naction = \"steer\"\n\n"
        );
    }
    text
}

/// Seconds and peak resident MiB of `tproxy check` on `config`, until it exits.
fn check_load(binary: &Path, config: &ConfigFile) -> Result<(f64, f64)> {
    let start = Instant::now();
    let child = Command::new(binary)
        .args(["check", "--iface", "eth0", "--config", config.path()])
        .stdout(Stdio::null())
        .spawn()
        .context("starting tproxy check")?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet waited for; both pointers are to live locals.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = start.elapsed().as_secs_f64();
    ensure!(
        waited == pid,
        "waiting for tproxy check: {}",
        std::io::Error::last_os_error()
    );
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "tproxy check failed on {LOAD_RULES} rules (wait status {status:#x})"
    );
    // ru_maxrss is in KiB on Linux.
    Ok((seconds, usage.ru_maxrss as f64 / 1024.0))
}

/// Seconds from starting `tproxy run` on `config` on the router until it is ready (program
/// loaded, rule maps written, attached, routing in place), and its peak resident MiB by then.
fn run_load(config: &ConfigFile) -> Result<(f64, f64)> {
    let topo = Topo::new()?;
    let start = Instant::now();
    let mut tproxy = topo.tproxy(&["--config", config.path()])?;
    let seconds = start.elapsed().as_secs_f64();
    let peak = status_kib(tproxy.pid(), "VmHWM:")?;
    tproxy.stop()?;
    Ok((seconds, peak as f64 / 1024.0))
}

/// New namespaces and servers for each measurement. A proxying mode leaves its relay's
/// TIME_WAIT sockets on the router for a minute, and the router drops forwarded packets that
/// match a local socket: measured on the same router, the next mode would inherit them.
fn fresh_topology() -> Result<(Topo, Servers)> {
    let topo = Topo::new()?;
    let servers = Servers::start(&topo)?;
    Ok((topo, servers))
}

/// `count` /32 prefixes that no traffic goes to: rules that must be looked past.
fn decoy_prefixes(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("172.16.{}.{}/32", i / 250, i % 250 + 1))
        .collect()
}

/// The servers in the server namespace, for every metric.
struct Servers {
    children: Vec<Child>,
    _udp: UdpEcho,
    _dir: tempdir::Dir,
}

impl Servers {
    fn start(topo: &Topo) -> Result<Self> {
        let dir = tempdir::Dir::new("servers")?;
        fs::write(dir.path.join("index.html"), "ok\n")?;
        let nginx_conf = dir.path.join("nginx.conf");
        fs::write(
            &nginx_conf,
            format!(
                "daemon off; worker_processes 1; pid {dir}/nginx.pid; error_log stderr;\n\
                 events {{ worker_connections 12000; }}\n\
                 http {{ access_log off; client_body_temp_path {dir}; proxy_temp_path {dir};\n\
                 fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
                 keepalive_timeout 300s; keepalive_requests 1000000;\n\
                 server {{ listen {server}:{HTTP_PORT}; root {dir}; }} }}\n",
                dir = dir.path.display(),
                server = Topo::SERVER_V4,
            ),
        )?;
        let server = &topo.server;
        let children = vec![
            spawn_in(server, &["iperf3", "-s", "-p", &IPERF_PORT.to_string()])?,
            spawn_in(server, &["iperf3", "-s", "-p", &UNSTEERED_PORT.to_string()])?,
            spawn_in(server, &["nginx", "-c", nginx_conf.to_str().unwrap()])?,
            spawn_in(
                server,
                &[
                    "sockperf",
                    "server",
                    "--tcp",
                    "-i",
                    Topo::SERVER_V4,
                    "-p",
                    &SOCKPERF_PORT.to_string(),
                ],
            )?,
        ];
        let udp = UdpEcho::start(server, Topo::server_addr(false, UDP_PORT))?;
        thread::sleep(Duration::from_millis(500));
        Ok(Servers {
            children,
            _udp: udp,
            _dir: dir,
        })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A throwaway directory, removed on drop.
mod tempdir {
    use std::path::PathBuf;

    pub struct Dir {
        pub path: PathBuf,
    }

    impl Dir {
        pub fn new(purpose: &str) -> std::io::Result<Self> {
            let name = format!("tproxy-bench-{}-{purpose}", std::process::id());
            let path = std::env::temp_dir().join(name);
            std::fs::create_dir_all(&path)?;
            Ok(Dir { path })
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn spawn_in(netns: &Netns, command: &[&str]) -> Result<Child> {
    Command::new("ip")
        .args(["netns", "exec", &netns.name])
        .args(command)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {command:?}"))
}

fn output_in(netns: &Netns, command: &[&str]) -> Result<String> {
    let output = Command::new("ip")
        .args(["netns", "exec", &netns.name])
        .args(command)
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whatever steers and relays in a mode, set up on the router.
enum Proxy {
    None,
    Tproxy(Tproxy, bool),
    /// HAProxy, and the tproxy steering to it when iptables does not.
    Haproxy(Child, tempdir::Dir, Option<Tproxy>),
}

impl Proxy {
    fn start(topo: &Topo, mode: Mode, decoys: &[String]) -> Result<Self> {
        let router = &topo.router;
        let steered = format!("{IPERF_PORT},{HTTP_PORT},{SOCKPERF_PORT}");
        let udp = UDP_PORT.to_string();
        // Every load generator runs from the one client address: lift the per-client cap
        // (a quarter of the overall one by default) so the idle-connection test fits.
        let per_source = (IDLE_CONNECTIONS * 2).to_string();
        Ok(match mode {
            Mode::Direct => Proxy::None,
            Mode::Ebpf | Mode::EbpfKernel | Mode::EbpfCopy => {
                let relay = match mode {
                    Mode::EbpfKernel => "kernel",
                    Mode::EbpfCopy => "copy",
                    _ => "splice",
                };
                let mut args = vec![
                    "--tcp",
                    &steered,
                    "--udp",
                    &udp,
                    "--max-connections-per-source",
                    &per_source,
                    "--tcp-relay",
                    relay,
                ];
                let real = format!("{}/24", Topo::SERVER_V4);
                for prefix in decoys.iter().chain([&real]) {
                    args.extend(["--dst", prefix]);
                }
                Proxy::Tproxy(topo.tproxy(&args)?, false)
            }
            Mode::IptablesRelay => {
                install_iptables_tproxy(router, &iptables_recipe(RELAY_PORT, decoys))?;
                let listen = format!("127.0.0.1:{RELAY_PORT}");
                let args = [
                    "--relay-only",
                    "--tcp",
                    &steered,
                    "--udp",
                    &udp,
                    "--listen",
                    &listen,
                    "--max-connections-per-source",
                    &per_source,
                ];
                Proxy::Tproxy(Tproxy::start(router, &args)?, true)
            }
            Mode::Haproxy => {
                install_iptables_tproxy(router, &iptables_recipe(HAPROXY_PORT, decoys))?;
                let (child, dir) = start_haproxy(router)?;
                Proxy::Haproxy(child, dir, None)
            }
            Mode::EbpfHaproxy => {
                let (child, dir) = start_haproxy(router)?;
                let on_port = HAPROXY_PORT.to_string();
                let mut args = vec![
                    "--tcp",
                    &steered,
                    "--on-port",
                    &on_port,
                    "--on-ip",
                    "127.0.0.1",
                ];
                let real = format!("{}/24", Topo::SERVER_V4);
                for prefix in decoys.iter().chain([&real]) {
                    args.extend(["--dst", prefix]);
                }
                Proxy::Haproxy(child, dir, Some(topo.tproxy(&args)?))
            }
        })
    }

    fn relay_pid(&self) -> Option<u32> {
        match self {
            Proxy::None => None,
            Proxy::Tproxy(tproxy, _) => Some(tproxy.pid()),
            Proxy::Haproxy(child, _, _) => Some(child.id()),
        }
    }

    fn stop(self, topo: &Topo) -> Result<()> {
        match self {
            Proxy::None => {}
            Proxy::Tproxy(mut tproxy, iptables) => {
                tproxy.stop()?;
                if iptables {
                    remove_iptables_tproxy(&topo.router)?;
                }
            }
            Proxy::Haproxy(mut child, _dir, tproxy) => {
                match tproxy {
                    Some(mut tproxy) => tproxy.stop()?,
                    None => remove_iptables_tproxy(&topo.router)?,
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        Ok(())
    }
}

/// HAProxy in transparent mode with splice, on the router's loopback at [`HAPROXY_PORT`].
fn start_haproxy(router: &Netns) -> Result<(Child, tempdir::Dir)> {
    let dir = tempdir::Dir::new("haproxy")?;
    let config = dir.path.join("haproxy.cfg");
    fs::write(
        &config,
        format!(
            "global\n  maxconn 7000\n  nbthread 2\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n  option splice-auto\n\
             frontend steered\n  bind 127.0.0.1:{HAPROXY_PORT} transparent\n  default_backend original\n\
             backend original\n  server destination 0.0.0.0:0\n"
        ),
    )?;
    let child = spawn_in(router, &["haproxy", "-db", "-f", config.to_str().unwrap()])?;
    thread::sleep(Duration::from_millis(500));
    Ok((child, dir))
}

fn iptables_recipe(on_port: u16, decoys: &[String]) -> IptablesTproxy<'_> {
    IptablesTproxy {
        iface: Topo::ROUTER_CLIENT_IFACE,
        tcp_ports: &[IPERF_PORT, HTTP_PORT, SOCKPERF_PORT],
        udp_ports: &[UDP_PORT],
        on_port,
        decoys,
    }
}

fn record(samples: &mut Samples, metric: &'static str, mode: Mode, value: f64) {
    samples
        .entry(metric)
        .or_default()
        .entry(mode)
        .or_default()
        .push(value);
}

fn measure(topo: &Topo, mode: Mode, proxy: &Proxy, samples: &mut Samples) -> Result<()> {
    let cpu_before = proxy.relay_pid().map(cpu_seconds).transpose()?;
    let (single, bytes) = iperf(topo, IPERF_PORT, 1)?;
    if let (Some(pid), Some(before)) = (proxy.relay_pid(), cpu_before) {
        let seconds = cpu_seconds(pid)? - before;
        record(samples, METRICS[6].name, mode, seconds / (bytes / 1e9));
    }
    record(samples, METRICS[0].name, mode, single);
    record(
        samples,
        METRICS[1].name,
        mode,
        iperf(topo, IPERF_PORT, 4)?.0,
    );
    record(samples, METRICS[2].name, mode, connection_rate(topo)?);
    let (p50, p99) = latency(topo)?;
    record(samples, METRICS[3].name, mode, p50);
    record(samples, METRICS[4].name, mode, p99);
    // The UDP relay is the same whatever --tcp-relay says.
    if !matches!(
        mode,
        Mode::Haproxy | Mode::EbpfHaproxy | Mode::EbpfKernel | Mode::EbpfCopy
    ) {
        record(samples, METRICS[5].name, mode, udp_rate(topo)?);
    }
    if let Some(pid) = proxy.relay_pid() {
        record(
            samples,
            METRICS[7].name,
            mode,
            idle_connection_memory(topo, pid)?,
        );
    }
    if matches!(mode, Mode::Direct | Mode::Ebpf) {
        record(
            samples,
            METRICS[8].name,
            mode,
            iperf(topo, UNSTEERED_PORT, 1)?.0,
        );
    }
    Ok(())
}

/// Gbit/s received and bytes moved, by iperf3 from client to server.
fn iperf(topo: &Topo, port: u16, streams: usize) -> Result<(f64, f64)> {
    let report = output_in(
        &topo.client,
        &[
            "iperf3",
            "-c",
            Topo::SERVER_V4,
            "-p",
            &port.to_string(),
            "-t",
            "3",
            "-P",
            &streams.to_string(),
            "-J",
        ],
    )?;
    let report: Value = serde_json::from_str(&report).context("parsing iperf3 -J")?;
    let received = &report["end"]["sum_received"];
    let rate = received["bits_per_second"]
        .as_f64()
        .context("iperf3: no rate")?;
    let bytes = received["bytes"]
        .as_f64()
        .context("iperf3: no byte count")?;
    Ok((rate / 1e9, bytes))
}

/// Short HTTP requests per second, one connection each (ab without keep-alive).
fn connection_rate(topo: &Topo) -> Result<f64> {
    let url = format!("http://{}:{HTTP_PORT}/", Topo::SERVER_V4);
    let report = output_in(&topo.client, &["ab", "-q", "-n", "20000", "-c", "32", &url])?;
    let failed = field(&report, "Failed requests:")?;
    ensure!(failed == 0.0, "ab: {failed} failed requests");
    field(&report, "Requests per second:")
}

fn field(report: &str, label: &str) -> Result<f64> {
    report
        .lines()
        .find_map(|line| line.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .with_context(|| format!("no `{label}` in:\n{report}"))
}

/// p50 and p99 round-trip latency in µs of 64-byte ping-pong on one warm TCP connection.
fn latency(topo: &Topo) -> Result<(f64, f64)> {
    let report = output_in(
        &topo.client,
        &[
            "sockperf",
            "ping-pong",
            "--tcp",
            "-i",
            Topo::SERVER_V4,
            "-p",
            &SOCKPERF_PORT.to_string(),
            "-t",
            "3",
            "-m",
            "64",
        ],
    )?;
    let percentile = |p: &str| -> Result<f64> {
        report
            .lines()
            .find(|line| line.contains(&format!("percentile {p} =")))
            .and_then(|line| line.rsplit('=').next())
            .and_then(|value| value.trim().parse().ok())
            .with_context(|| format!("no percentile {p} in sockperf output:\n{report}"))
    };
    // sockperf reports half the round trip; double it back.
    Ok((2.0 * percentile("50.000")?, 2.0 * percentile("99.000")?))
}

/// Echoed 64-byte datagrams per second on one flow, 64 in flight.
fn udp_rate(topo: &Topo) -> Result<f64> {
    let addr = Topo::server_addr(false, UDP_PORT);
    let rate = udp_echo_rate(&topo.client, addr, 100_000, 64, 64)?;
    Ok(rate.replies as f64 / rate.elapsed.as_secs_f64())
}

/// The relay's resident memory growth per connection, in KiB, with IDLE_CONNECTIONS open
/// through it (each has moved one request and its response, then stays idle).
fn idle_connection_memory(topo: &Topo, pid: u32) -> Result<f64> {
    let before = status_kib(pid, "VmRSS:")?;
    let server: SocketAddr = Topo::server_addr(false, HTTP_PORT);
    let mut connections: Vec<TcpStream> = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        let mut stream = topo.client.connect(server)?;
        std::io::Write::write_all(&mut stream, b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        connections.push(stream);
    }
    let mut buffer = [0u8; 1024];
    for stream in &mut connections {
        let read = std::io::Read::read(stream, &mut buffer)?;
        ensure!(read > 0, "an idle-test connection was closed");
    }
    thread::sleep(Duration::from_millis(500));
    let after = status_kib(pid, "VmRSS:")?;
    for stream in &connections {
        let _ = stream.shutdown(Shutdown::Both);
    }
    drop(connections);
    thread::sleep(Duration::from_millis(500));
    Ok(after.saturating_sub(before) as f64 / IDLE_CONNECTIONS as f64)
}

/// A memory figure of `/proc/PID/status` in KiB, by its label (`VmRSS:`, `VmHWM:`).
fn status_kib(pid: u32, label: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("no {label} in /proc/{pid}/status"))
}

/// User plus system CPU time of a process and its threads, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let after_name = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / per_second)
}

/// The direct path's median for `metric`, the baseline of its ratios. Unsteered throughput
/// (measured with the program attached) compares with direct single-stream throughput; the
/// relay's own CPU and memory have no direct counterpart.
fn direct_baseline(samples: &Samples, metric: &Metric) -> Option<f64> {
    let values = match samples.get(metric.name)?.get(&Mode::Direct) {
        Some(values) => values,
        None if metric.name == METRICS[8].name => {
            samples.get(METRICS[0].name)?.get(&Mode::Direct)?
        }
        None => return None,
    };
    Some(median_and_spread(values).0)
}

/// One table cell: the median, its spread, and its ratio to `baseline` (when given and not
/// zero) named `against`. Returns the median, the spread and the ratio.
fn write_cell(
    md: &mut String,
    values: &[f64],
    baseline: Option<f64>,
    against: &str,
) -> (f64, f64, f64, Option<f64>) {
    let (median, low, high) = median_and_spread(values);
    let ratio = baseline.filter(|b| *b > 0.0).map(|b| median / b);
    let _ = write!(
        md,
        " {} [{}–{}]",
        format_value(median),
        format_value(low),
        format_value(high)
    );
    if let Some(ratio) = ratio {
        let _ = write!(md, "<br>{ratio:.2}× {against}");
    }
    md.push_str(" |");
    (median, low, high, ratio)
}

fn median_and_spread(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    (
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1],
    )
}

fn report(
    samples: &Samples,
    scaling: &BTreeMap<(String, usize), Vec<f64>>,
    loads: &Loads,
    by_interface: &interfaces::Samples,
    local_samples: &local::LocalSamples,
    rounds: usize,
) -> Result<()> {
    let dir = crate::workspace_root().join("bench");
    fs::create_dir_all(&dir)?;
    let machine = machine_description();
    let date = output_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"])?;
    let modes = MODES;
    let mut md = format!(
        "# tproxy benchmark\n\n{date} on {machine}. `cargo xtask bench --rounds {rounds}`: median of \
         {rounds} rounds, spread (min–max) in brackets; ratio to direct below each value.\n\n"
    );
    md.push_str("| metric |");
    for mode in modes {
        write!(md, " {} |", mode.label())?;
    }
    md.push_str("\n| --- |");
    md.push_str(&" --- |".repeat(modes.len()));
    md.push('\n');
    let mut json_metrics = Vec::new();
    for metric in METRICS {
        let Some(by_mode) = samples.get(metric.name) else {
            continue;
        };
        let direct = direct_baseline(samples, metric);
        write!(md, "| {} ({}) |", metric.name, metric.unit)?;
        let mut json_modes = serde_json::Map::new();
        for mode in modes {
            match by_mode.get(&mode) {
                Some(values) => {
                    let shown = direct.filter(|_| mode != Mode::Direct);
                    let (median, low, high, ratio) = write_cell(&mut md, values, shown, "direct");
                    let ratio = ratio.or_else(|| direct.filter(|d| *d > 0.0).map(|d| median / d));
                    json_modes.insert(
                        format!("{mode:?}"),
                        json!({"median": median, "min": low, "max": high, "ratio_to_direct": ratio, "runs": values}),
                    );
                }
                None => md.push_str(" – |"),
            }
        }
        md.push('\n');
        json_metrics.push(json!({
            "metric": metric.name, "unit": metric.unit,
            "higher_is_better": metric.higher_is_better, "modes": json_modes,
        }));
    }
    let mut json_scaling = Vec::new();
    if !scaling.is_empty() {
        md.push_str("\n## New connections/s by number of steering rules (same relay)\n\n| rules | eBPF | iptables |\n| --- | --- | --- |\n");
    }
    for rules in RULE_COUNTS.iter().copied().filter(|_| !scaling.is_empty()) {
        write!(md, "| {rules} |")?;
        for kind in ["eBPF", "iptables"] {
            let values = &scaling[&(kind.to_string(), rules)];
            let (median, low, high) = median_and_spread(values);
            let one = median_and_spread(&scaling[&(kind.to_string(), 1)]).0;
            write!(
                md,
                " {} [{}–{}], {:.0}% of 1 rule |",
                format_value(median),
                format_value(low),
                format_value(high),
                100.0 * median / one
            )?;
            json_scaling.push(json!({"rules": rules, "steering": kind, "median": median, "min": low, "max": high, "runs": values}));
        }
        md.push('\n');
    }
    let json_load = match loads.is_empty() {
        true => Value::Null,
        false => {
            let (load_md, json_load) = rule_load_report(loads)?;
            md.push_str(&load_md);
            json_load
        }
    };
    let (interfaces_md, json_interfaces) = interfaces::report(by_interface, None)?;
    if !by_interface.is_empty() {
        md.push_str(&interfaces_md);
    }
    let (local_md, json_local) = local::report(local_samples, None)?;
    md.push_str(&local_md);
    md.push_str("\n![ratios to direct](results.png)\n");
    fs::write(dir.join("results.md"), &md)?;
    let json = json!({
        "date": date, "machine": machine, "rounds": rounds,
        "metrics": json_metrics, "rule_scaling": json_scaling, "rule_load": json_load,
        (interfaces::JSON_KEY): json_interfaces,
        (local::JSON_KEY): json_local,
    });
    fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    chart(samples, &dir.join("results.png"))?;
    println!("\n{md}\nwritten to bench/results.md, bench/results.json, bench/results.png");
    Ok(())
}

/// The rule-load section of the report, as markdown and JSON.
fn rule_load_report(loads: &Loads) -> Result<(String, Value)> {
    let mut md = format!(
        "\n## Loading {LOAD_RULES} rules\n\nOne `[[rule]]` per /32 destination and TCP port, as \
         `translate` writes an iptables rule set.\n\n| command | seconds | peak memory (MiB) |\n\
         | --- | --- | --- |\n"
    );
    let mut json_load = Vec::new();
    for (command, runs) in loads {
        let seconds: Vec<f64> = runs.iter().map(|(seconds, _)| *seconds).collect();
        let memory: Vec<f64> = runs.iter().map(|(_, mib)| *mib).collect();
        let summary = |values: &[f64]| {
            let (median, low, high) = median_and_spread(values);
            (
                format!(
                    "{} [{}–{}]",
                    format_value(median),
                    format_value(low),
                    format_value(high)
                ),
                json!({"median": median, "min": low, "max": high, "runs": values}),
            )
        };
        let (seconds_md, seconds_json) = summary(&seconds);
        let (memory_md, memory_json) = summary(&memory);
        writeln!(md, "| {command} | {seconds_md} | {memory_md} |")?;
        json_load.push(json!({
            "rules": LOAD_RULES, "command": command,
            "seconds": seconds_json, "peak_memory_mib": memory_json,
        }));
    }
    Ok((md, Value::Array(json_load)))
}

fn format_value(value: f64) -> String {
    if value >= 1000.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

fn output_of(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program).args(args).output()?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn machine_description() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = output_of("uname", &["-r"]).unwrap_or_default();
    format!("{cores} cores ({cpu}), Linux {kernel}, veth between network namespaces")
}

/// Grouped bars: each metric's median per proxying mode, as a ratio to direct (for metrics
/// where lower is better, direct / value, so that taller is always better).
fn chart(samples: &Samples, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let font: &'static [u8] = Box::leak(
        fs::read(FONT)
            .context("reading the chart font")?
            .into_boxed_slice(),
    );
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("registering the chart font"))?;
    let modes = [
        Mode::IptablesRelay,
        Mode::Ebpf,
        Mode::EbpfKernel,
        Mode::EbpfCopy,
        Mode::Haproxy,
        Mode::EbpfHaproxy,
    ];
    let colors = [
        RGBColor(150, 150, 150),
        RGBColor(30, 110, 200),
        RGBColor(40, 170, 90),
        RGBColor(130, 80, 180),
        RGBColor(220, 120, 30),
        RGBColor(200, 60, 60),
    ];
    let bars: Vec<(&Metric, Vec<Option<f64>>)> = METRICS
        .iter()
        .filter_map(|metric| {
            let by_mode = samples.get(metric.name)?;
            let direct = direct_baseline(samples, metric)?;
            let ratios = modes
                .iter()
                .map(|mode| {
                    let median = median_and_spread(by_mode.get(mode)?).0;
                    Some(if metric.higher_is_better {
                        median / direct
                    } else {
                        direct / median
                    })
                })
                .collect();
            Some((metric, ratios))
        })
        .collect();
    let root = BitMapBackend::new(path, (1600, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "tproxy benchmark: median as a ratio to direct (latency: direct / value); taller is better",
            ("sans-serif", 22),
        )
        .margin(20)
        .x_label_area_size(140)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..bars.len() as f64, 0f64..1.2f64)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("ratio to direct")
        .draw()?;
    for (index, (metric, ratios)) in bars.iter().enumerate() {
        for (slot, ratio) in ratios.iter().enumerate() {
            let Some(ratio) = ratio else { continue };
            let left = index as f64 + 0.05 + slot as f64 * 0.15;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(left, 0.0), (left + 0.13, ratio.min(1.2))],
                colors[slot].filled(),
            )))?;
        }
        for (line, text) in wrap(metric.name, 22).iter().enumerate() {
            root.draw(&Text::new(
                text.clone(),
                (
                    chart.backend_coord(&(index as f64 + 0.05, 0.0)).0,
                    580 + 18 * line as i32,
                ),
                ("sans-serif", 13),
            ))?;
        }
    }
    for (slot, mode) in modes.iter().enumerate() {
        let x = 60 + slot as i32 * 255;
        root.draw(&Rectangle::new(
            [(x, 670), (x + 20, 685)],
            colors[slot].filled(),
        ))?;
        root.draw(&Text::new(mode.label(), (x + 28, 668), ("sans-serif", 16)))?;
    }
    root.present()?;
    Ok(())
}

/// Splits `text` into lines of at most `width` characters, at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(line) if line.len() + 1 + word.len() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}
