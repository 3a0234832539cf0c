//! Test hosts for tproxy's kernel tests and demo: network namespaces joined by veth pairs,
//! sockets opened inside them, and a `tproxy run` process managed for the test.
//!
//! Everything is created with names unique to this process and removed on drop, also when a
//! test fails. All addresses live inside the namespaces created here.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
pub use tproxy_common::stats::{InstanceStatus, Stats};

pub mod cgroup;
pub mod containers;
pub mod packets;
pub mod topology;

pub use topology::{RouterTopology, SidecarTopology};

/// The routing table `tproxy run` uses unless told otherwise (`--table`).
pub const DEFAULT_TABLE: u32 = 7470;

/// Fails unless the tests can do what they need (root, for namespaces and BPF). Never skips:
/// a privileged test that cannot run must fail, so CI cannot pass without running it.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "these tests create network namespaces and load BPF programs: run them as root \
         (`cargo xtask test` does)"
    );
}

pub(crate) fn unique_name(role: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "tpx{}-{}-{role}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `ip ARGS…`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Deletes the namespaces of test processes that were killed (a timeout, SIGKILL): their
/// `Drop` never ran. Names carry the creating process's pid (see `unique_name`).
fn remove_namespaces_of_dead_tests() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("tpx")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "delete", &name]);
        }
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates a namespace with loopback up.
    pub fn new(role: &str) -> Result<Self> {
        remove_namespaces_of_dead_tests();
        let name = unique_name(role);
        ip(&["netns", "add", &name])?;
        let netns = Netns { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        // Link-local addresses would otherwise sit through duplicate address detection,
        // delaying the first IPv6 packets of a new topology.
        netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        Ok(netns)
    }

    /// Runs `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let status = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-qw",
                &format!("{key}={value}"),
            ])
            .status()?;
        if !status.success() {
            bail!("sysctl {key}={value} in {} failed", self.name);
        }
        Ok(())
    }

    /// Runs `ethtool ARGS…` inside the namespace.
    pub fn ethtool(&self, args: &[&str]) -> Result<()> {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.name, "ethtool"])
            .args(args)
            .output()
            .context("running ethtool (cargo xtask setup installs it)")?;
        if !output.status.success() {
            bail!(
                "ethtool {} in {} failed: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets created by `f` stay in
    /// this namespace wherever they are used afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("entering {path}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Connects to `addr` from inside this namespace.
    pub fn connect(&self, addr: SocketAddr) -> Result<TcpStream> {
        self.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
            .with_context(|| format!("connecting to {addr}"))
            .and_then(|stream| {
                stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                stream.set_write_timeout(Some(Duration::from_secs(30)))?;
                Ok(stream)
            })
    }

    /// Connects to `addr` from the local address `source` inside this namespace.
    pub fn connect_from(&self, source: IpAddr, addr: SocketAddr) -> Result<TcpStream> {
        self.run(move || -> std::io::Result<TcpStream> {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )?;
            socket.bind(&SocketAddr::new(source, 0).into())?;
            socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
            let stream = TcpStream::from(socket);
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            Ok(stream)
        })
        .with_context(|| format!("connecting from {source} to {addr}"))
    }

    /// A listener in this namespace with `IP_TRANSPARENT`, bound to `addr`: it takes
    /// connections the policy routing delivers locally for any destination on its port.
    pub fn transparent_listener(&self, addr: SocketAddr) -> Result<std::net::TcpListener> {
        self.run(move || -> std::io::Result<std::net::TcpListener> {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            match addr {
                SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
                SocketAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
            }
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(8)?;
            Ok(socket.into())
        })
        .with_context(|| format!("listening transparently on {addr}"))
    }

    /// Connects from exactly `source` (address and port, reused even while an old socket of
    /// that tuple is in TIME_WAIT) to `addr`, and reads until the peer closes.
    pub fn read_all_from(&self, source: SocketAddr, addr: SocketAddr) -> Result<String> {
        self.run(move || -> std::io::Result<String> {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )?;
            socket.set_reuse_address(true)?;
            socket.bind(&source.into())?;
            socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
            let mut stream = TcpStream::from(socket);
            let mut text = String::new();
            std::io::Read::read_to_string(&mut stream, &mut text)?;
            Ok(text)
        })
        .with_context(|| format!("reading from {addr} as {source}"))
    }

    /// This namespace's TCP sockets in TIME_WAIT, as `ss -Htan state time-wait` lists them.
    pub fn time_wait_sockets(&self) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(["ss", "-Htan", "state", "time-wait"])
            .output()?;
        if !out.status.success() {
            bail!(
                "ss in {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Binds a listener on `addr` inside this namespace.
    pub fn listen(&self, addr: SocketAddr) -> Result<TcpListener> {
        self.run(move || TcpListener::bind(addr))
            .with_context(|| format!("listening on {addr}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: {error}");
        }
    }
}

/// The `tproxy` binary under test: `$TPROXY_BIN`, or the workspace's release then debug build.
pub fn tproxy_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TPROXY_BIN") {
        return path.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    ["target/release/tproxy", "target/debug/tproxy"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.exists())
        .expect("no tproxy binary: run `cargo xtask build` (or set TPROXY_BIN)")
}

/// The log lines a `tproxy` process wrote so far, shared with the thread reading them.
type Log = Arc<Mutex<Vec<String>>>;

/// A running `tproxy run` in a namespace. Killed (SIGKILL) on drop if still running.
pub struct Tproxy {
    child: Child,
    log: Log,
    lines: mpsc::Receiver<String>,
    /// The namespace and routing table it runs with, to ask it for `status`.
    netns: String,
    table: String,
    /// Its counters when [`Tproxy::stop`] stopped it, or why they could not be read.
    final_stats: Option<std::result::Result<Stats, String>>,
}

impl Tproxy {
    /// Starts `tproxy run ARGS…` in `netns` and waits for its "ready" line.
    pub fn start(netns: &Netns, args: &[&str]) -> Result<Self> {
        let mut tproxy = Self::spawn(netns, args)?;
        tproxy.wait_for_line("ready:", Duration::from_secs(30))?;
        Ok(tproxy)
    }

    /// Starts `tproxy run ARGS…` in `netns` without waiting for it to be ready.
    pub fn spawn(netns: &Netns, args: &[&str]) -> Result<Self> {
        Self::spawn_wrapped(netns, &[], args)
    }

    /// Starts `WRAPPER… tproxy run ARGS…` in `netns` (e.g. `prlimit --nofile=N --`) and waits
    /// for its "ready" line.
    pub fn start_wrapped(netns: &Netns, wrapper: &[&str], args: &[&str]) -> Result<Self> {
        let mut tproxy = Self::spawn_wrapped(netns, wrapper, args)?;
        tproxy.wait_for_line("ready:", Duration::from_secs(30))?;
        Ok(tproxy)
    }

    /// Starts `tproxy run ARGS…` in `netns` with nothing added, not even the quick stop the
    /// other constructors give (see [`Tproxy::spawn_wrapped`]), and waits for its "ready" line.
    pub fn start_with_defaults(netns: &Netns, args: &[&str]) -> Result<Self> {
        let mut tproxy = Self::spawn_exactly(netns, &[], args)?;
        tproxy.wait_for_line("ready:", Duration::from_secs(30))?;
        Ok(tproxy)
    }

    /// A test that does not ask for a drain (`--drain-timeout`) stops tproxy at once: with
    /// the default drain, each stop with a UDP session open would last until the session
    /// expired. The drain itself is tested where it is the subject.
    fn spawn_wrapped(netns: &Netns, wrapper: &[&str], args: &[&str]) -> Result<Self> {
        let mut args = args.to_vec();
        if !args.contains(&"--drain-timeout") {
            args.extend(["--drain-timeout", "0s"]);
        }
        Self::spawn_exactly(netns, wrapper, &args)
    }

    /// Starts `tproxy run ARGS…` in `netns` with the host's mounts, and waits for its
    /// "ready" line: `ip netns exec` mounts a fresh /sys, which hides the cgroup v2 tree that
    /// `--local` attaches to; `nsenter --net` changes the network namespace only.
    pub fn start_with_host_mounts(netns: &Netns, args: &[&str]) -> Result<Self> {
        let mut args = args.to_vec();
        args.extend(["--drain-timeout", "0s"]);
        let launcher = [
            "nsenter".to_string(),
            format!("--net=/run/netns/{}", netns.name),
        ];
        let mut tproxy = Self::spawn_launched(netns, &launcher, &[], &args)?;
        tproxy.wait_for_line("ready:", Duration::from_secs(30))?;
        Ok(tproxy)
    }

    fn spawn_exactly(netns: &Netns, wrapper: &[&str], args: &[&str]) -> Result<Self> {
        let launcher = ["ip", "netns", "exec", &netns.name].map(String::from);
        Self::spawn_launched(netns, &launcher, wrapper, args)
    }

    fn spawn_launched(
        netns: &Netns,
        launcher: &[String],
        wrapper: &[&str],
        args: &[&str],
    ) -> Result<Self> {
        let mut child = Command::new(&launcher[0])
            .args(&launcher[1..])
            .args(wrapper)
            .arg(tproxy_bin())
            .arg("run")
            .args(args)
            .env("RUST_LOG", "info,tproxy=debug,tproxy_ebpf=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tproxy")?;
        let stderr = child.stderr.take().expect("piped stderr");
        let log: Log = Arc::default();
        let (sender, lines) = mpsc::channel();
        let shared = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                shared.lock().unwrap().push(line.clone());
                let _ = sender.send(line);
            }
        });
        let table = args
            .iter()
            .position(|arg| *arg == "--table")
            .and_then(|at| args.get(at + 1))
            .map_or_else(|| DEFAULT_TABLE.to_string(), ToString::to_string);
        Ok(Tproxy {
            child,
            log,
            lines,
            netns: netns.name.clone(),
            table,
            final_stats: None,
        })
    }

    /// Waits until a log line containing `needle` appears (or the process exits).
    pub fn wait_for_line(&mut self, needle: &str, limit: Duration) -> Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(_) => bail!(
                    "tproxy never logged `{needle}` (exit: {:?}); its log:\n{}",
                    self.child.try_wait()?,
                    self.log_text()
                ),
            }
        }
    }

    /// The process id of `tproxy`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn signal_and_wait(&mut self, signal: nix::sys::signal::Signal) -> Result<ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal)?;
        self.wait(Duration::from_secs(20))
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // Let the reader thread drain the last lines.
                thread::sleep(Duration::from_millis(50));
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "tproxy did not exit within {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then checks that it exited successfully. The counters just before are kept
    /// for [`Tproxy::final_stats`]: once stopped, the process cannot be asked.
    pub fn stop(&mut self) -> Result<()> {
        self.final_stats = Some(self.stats().map_err(|error| format!("{error:#}")));
        let status = self.signal_and_wait(nix::sys::signal::Signal::SIGTERM)?;
        if !status.success() {
            bail!(
                "tproxy exited with {status} after SIGTERM; log:\n{}",
                self.log_text()
            );
        }
        Ok(())
    }

    /// The counters when [`Tproxy::stop`] stopped it, after the test's traffic.
    pub fn final_stats(&self) -> Result<&Stats> {
        match &self.final_stats {
            Some(Ok(stats)) => Ok(stats),
            Some(Err(error)) => bail!("no counters from before the stop: {error}"),
            None => bail!("no counters: stopped without Tproxy::stop"),
        }
    }

    /// The value of eBPF counter `name` for `protocol` ("tcp", "udp", "other") when
    /// [`Tproxy::stop`] stopped it.
    pub fn final_counter(&self, protocol: &str, name: &str) -> Result<u64> {
        stat(
            self.final_stats()?,
            &format!("eBPF {protocol} packets"),
            name,
        )
    }

    /// What the running instance reports, from `tproxy status --json`.
    pub fn status(&self) -> Result<InstanceStatus> {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(tproxy_bin())
            .args(["status", "--json", "--table", &self.table])
            .stdin(Stdio::null())
            .output()
            .context("running tproxy status")?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        let report: serde_json::Value = serde_json::from_str(&stdout)
            .with_context(|| format!("`tproxy status --json` printed: {stdout}{stderr}"))?;
        match report.get("instance") {
            Some(instance) if !instance.is_null() => serde_json::from_value(instance.clone())
                .with_context(|| format!("the instance's status: {report:#}")),
            _ => bail!("no running instance in the status report: {report:#}"),
        }
    }

    /// The running instance's counters, from `tproxy status --json`.
    pub fn stats(&self) -> Result<Stats> {
        Ok(self.status()?.stats)
    }

    /// CPU time (user + system) the process has used so far.
    pub fn cpu_time(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("malformed /proc/PID/stat")?
            .1
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        let per_second =
            nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
        Ok(Duration::from_millis(ticks * 1000 / per_second))
    }

    /// The TCP relay's counter `name` now.
    pub fn tcp_stat(&self, name: &str) -> Result<u64> {
        stat(&self.stats()?, "tcp relay", name)
    }

    /// The UDP relay's counter `name` now.
    pub fn udp_stat(&self, name: &str) -> Result<u64> {
        stat(&self.stats()?, "udp relay", name)
    }

    /// Every eBPF packet counter now, as `"protocol/outcome"` → count.
    pub fn ebpf_counters(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let stats = self.stats()?;
        let packets = stats.packets.context("the status has no eBPF counters")?;
        Ok(packets
            .iter()
            .map(|(protocol, outcome, count)| {
                (format!("{}/{}", protocol.name(), outcome.name()), count)
            })
            .collect())
    }
}

/// The value `name` of the section `title` of `stats` (the log line's header: "tcp relay",
/// "udp relay", "eBPF tcp packets", …).
pub fn stat(stats: &Stats, title: &str, name: &str) -> Result<u64> {
    let sections = stats.sections();
    let section = sections
        .iter()
        .find(|section| section.title == title)
        .ok_or_else(|| anyhow!("no `{title}` in {stats:?}"))?;
    section
        .fields
        .iter()
        .find(|field| field.name == name)
        .map(|field| field.value)
        .ok_or_else(|| anyhow!("no `{name}` in `{title}`: {stats:?}"))
}

impl Drop for Tproxy {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- tproxy log ---\n{}\n--- end of tproxy log ---",
                self.log_text()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `tproxy ARGS…` (any subcommand) in `netns` to completion; returns (status, stderr).
pub fn run_tproxy_to_end(netns: &Netns, args: &[&str]) -> Result<(ExitStatus, String)> {
    let (status, _, stderr) = run_tproxy_output(netns, args)?;
    Ok((status, stderr))
}

/// A TCP server on its own threads that hands each accepted connection to `handler`. It stops
/// listening when dropped; connections already accepted run on.
pub struct Server {
    pub addr: SocketAddr,
    /// The peer address of every connection accepted so far.
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    listener: TcpListener,
}

impl Server {
    /// Listens on `addr` in `netns` and serves every connection with `handler` on a thread.
    pub fn start(
        netns: &Netns,
        addr: SocketAddr,
        handler: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Result<Self> {
        let listener = netns.listen(addr)?;
        let addr = listener.local_addr()?;
        let accepting = listener.try_clone()?;
        let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let seen = peers.clone();
        let handler = Arc::new(handler);
        thread::spawn(move || {
            for stream in accepting.incoming() {
                let Ok(stream) = stream else { return };
                if let Ok(peer) = stream.peer_addr() {
                    seen.lock().unwrap().push(peer);
                }
                let handler = handler.clone();
                thread::spawn(move || handler(stream));
            }
        });
        Ok(Server {
            addr,
            peers,
            listener,
        })
    }

    /// Replies with the peer address it sees, as text, then closes.
    pub fn tell_peer(netns: &Netns, addr: SocketAddr) -> Result<Self> {
        Self::start(netns, addr, |mut stream| {
            if let Ok(peer) = stream.peer_addr() {
                let _ = stream.write_all(peer.ip().to_string().as_bytes());
            }
        })
    }

    /// Reads the request to its end, then answers `name` (which server a flow reached).
    pub fn named(netns: &Netns, addr: SocketAddr, name: &'static str) -> Result<Self> {
        Self::start(netns, addr, move |mut stream| {
            let mut request = Vec::new();
            let _ = stream.read_to_end(&mut request);
            let _ = stream.write_all(name.as_bytes());
        })
    }

    /// Echoes everything back; on the client's end of stream, finishes echoing and closes.
    pub fn echo(netns: &Netns, addr: SocketAddr) -> Result<Self> {
        Self::start(netns, addr, |mut stream| {
            let mut reader = stream.try_clone().expect("clone");
            let _ = std::io::copy(&mut reader, &mut stream);
            let _ = stream.shutdown(Shutdown::Write);
        })
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Shutting a listener down leaves LISTEN at once and wakes its accept thread, which
        // then ends and closes its copy.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

/// Connects from `netns` to a [`Server::tell_peer`] server and returns the peer IP it saw.
pub fn peer_seen_by(netns: &Netns, server: SocketAddr) -> Result<IpAddr> {
    let mut stream = netns.connect(server)?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .with_context(|| format!("reading from {server}"))?;
    text.parse()
        .with_context(|| format!("server {server} answered `{text}`, not an address"))
}

/// Names of the programs attached (TCX) at `iface` ingress in `netns`, and any cls_bpf
/// filters on its clsact ingress hook: what a leftover tproxy would show up as.
pub fn ingress_programs(netns: &Netns, iface: &str) -> Result<Vec<String>> {
    let name = iface.to_string();
    let mut programs = netns.run(move || -> Result<Vec<String>> {
        let (_, programs) =
            aya::programs::SchedClassifier::query_tcx(&name, aya::programs::TcAttachType::Ingress)?;
        Ok(programs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_string())
            .collect())
    })?;
    let filters = Command::new("tc")
        .args(["-n", &netns.name, "filter", "show", "dev", iface, "ingress"])
        .output()?;
    programs.extend(
        String::from_utf8_lossy(&filters.stdout)
            .lines()
            .filter(|l| l.contains("bpf"))
            .map(str::to_string),
    );
    Ok(programs)
}

/// The id of the first program attached (TCX) at `iface` ingress in `netns`.
pub fn ingress_program_id(netns: &Netns, iface: &str) -> Result<u32> {
    let name = iface.to_string();
    netns.run(move || -> Result<u32> {
        let (_, programs) =
            aya::programs::SchedClassifier::query_tcx(&name, aya::programs::TcAttachType::Ingress)?;
        Ok(programs.first().context("no program attached")?.id())
    })
}

/// How many BPF links, anywhere on the host, run the program with id `program`: one per
/// interface it is attached to, none left once it is detached.
pub fn links_of_program(program: u32) -> usize {
    aya::programs::loaded_links()
        .filter_map(std::result::Result::ok)
        .filter(|link| link.program_id() == program)
        .count()
}

/// The policy-routing rules pointing at `table` and the routes in it (both families), one per
/// line; empty when there are none.
pub fn routing_state(netns: &Netns, table: u32) -> Result<String> {
    let lookup = format!("lookup {table}");
    let in_table = format!("table {table} ");
    let mut state = Vec::new();
    for family in ["-4", "-6"] {
        let rules = netns.ip(&[family, "rule", "show"])?;
        let ours = rules
            .lines()
            .filter(|l| l.ends_with(&lookup) || l.contains(&format!("{lookup} ")));
        state.extend(ours.map(str::to_string));
        // `show table N` fails for a table that was never created; `table all` does not.
        let routes = netns.ip(&[family, "route", "show", "table", "all"])?;
        let ours = routes.lines().filter(|l| l.contains(&in_table));
        state.extend(ours.map(str::to_string));
    }
    Ok(state.join("\n"))
}

/// Deterministic pseudo-random bytes (xorshift), so that a reordered or corrupted stream does
/// not hash the same.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Length and hash of everything read from `reader` until end of stream.
pub fn digest_to_eof(reader: &mut impl Read) -> std::io::Result<(u64, u64)> {
    use std::hash::Hasher;
    let mut hasher = std::hash::DefaultHasher::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let read = reader.read(&mut buffer)?;
        if read == 0 {
            return Ok((total, hasher.finish()));
        }
        hasher.write(&buffer[..read]);
        total += read as u64;
    }
}

/// Length and hash of `bytes`, as [`digest_to_eof`] computes them.
pub fn digest(bytes: &[u8]) -> (u64, u64) {
    digest_to_eof(&mut &bytes[..]).expect("reading a slice")
}

/// A UDP echo server on its own thread: sends every datagram back to its sender and records
/// the sender's address. Stops when dropped.
pub struct UdpEcho {
    pub addr: SocketAddr,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl UdpEcho {
    pub fn start(netns: &Netns, addr: SocketAddr) -> Result<Self> {
        let socket = netns
            .run(move || std::net::UdpSocket::bind(addr))
            .with_context(|| format!("binding UDP {addr}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = socket.local_addr()?;
        let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen, stopped) = (peers.clone(), stop.clone());
        thread::spawn(move || {
            let mut buffer = vec![0u8; 65536];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((len, peer)) = socket.recv_from(&mut buffer) {
                    seen.lock().unwrap().push(peer);
                    let _ = socket.send_to(&buffer[..len], peer);
                }
            }
        });
        Ok(UdpEcho { addr, peers, stop })
    }

    /// The distinct IP addresses that sent datagrams.
    pub fn peer_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self.peers.lock().unwrap().iter().map(|p| p.ip()).collect();
        ips.sort();
        ips.dedup();
        ips
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A UDP socket in `netns` bound to an ephemeral port of `like`'s family.
pub fn udp_client(netns: &Netns, like: SocketAddr) -> Result<std::net::UdpSocket> {
    let any: SocketAddr = if like.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()?;
    let socket = netns.run(move || std::net::UdpSocket::bind(any))?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(socket)
}

/// Whether an ICMP (ICMPv6) echo request to `to`, from a raw socket in the calling thread's
/// network namespace, is answered within two seconds.
pub fn echo_answered(to: std::net::IpAddr) -> bool {
    use socket2::{Domain, Protocol, Socket, Type};
    let (domain, protocol, request_type, reply_type) = match to {
        std::net::IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8, 0),
        std::net::IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128, 129),
    };
    let socket = Socket::new(domain, Type::RAW, Some(protocol)).unwrap();
    let id = (std::process::id() as u16).to_be_bytes();
    let mut request = [
        request_type,
        0,
        0,
        0,
        id[0],
        id[1],
        0,
        1,
        b'p',
        b'r',
        b'o',
        b'b',
    ];
    if to.is_ipv4() {
        // The kernel fills ICMPv6's checksum in, not ICMP's.
        let sum: u32 = request
            .chunks(2)
            .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
            .sum();
        let folded = (sum & 0xffff) + (sum >> 16);
        let checksum = !(((folded & 0xffff) + (folded >> 16)) as u16);
        request[2..4].copy_from_slice(&checksum.to_be_bytes());
    }
    socket
        .send_to(&request, &SocketAddr::new(to, 0).into())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buffer = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
    // Every ICMP packet of the namespace reaches a raw socket: ours is the echo reply from
    // `to` with our identifier (an IPv4 raw socket gets the IP header too).
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let Ok((len, from)) = socket.recv_from(&mut buffer) else {
            return false;
        };
        // SAFETY: `recv_from` initialised the first `len` bytes.
        let packet: Vec<u8> = buffer[..len]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        let icmp = match to {
            std::net::IpAddr::V4(_) => &packet[usize::from(packet[0] & 0x0f) * 4..],
            std::net::IpAddr::V6(_) => &packet[..],
        };
        let from_target = from.as_socket().is_some_and(|from| from.ip() == to);
        if from_target && icmp.len() >= 8 && icmp[0] == reply_type && icmp[4..6] == id {
            return true;
        }
    }
    false
}

/// Sends `payload` to `to` and waits for one datagram back; returns it and its source.
pub fn udp_exchange(
    socket: &std::net::UdpSocket,
    to: SocketAddr,
    payload: &[u8],
) -> Result<(Vec<u8>, SocketAddr)> {
    socket.send_to(payload, to)?;
    let mut buffer = vec![0u8; 65536];
    let (len, from) = socket
        .recv_from(&mut buffer)
        .with_context(|| format!("no reply from {to}"))?;
    buffer.truncate(len);
    Ok((buffer, from))
}

/// The result of [`udp_echo_rate`].
pub struct EchoRate {
    /// Replies received.
    pub replies: u64,
    pub elapsed: Duration,
}

/// Sends `total` datagrams of `size` bytes from `netns` to the UDP echo server at `to`,
/// keeping at most `window` in flight like a paced sender; a silence of 500 ms counts what is
/// in flight as lost.
pub fn udp_echo_rate(
    netns: &Netns,
    to: SocketAddr,
    total: u64,
    window: u64,
    size: usize,
) -> Result<EchoRate> {
    let client = udp_client(netns, to)?;
    client.set_read_timeout(Some(Duration::from_millis(500)))?;
    let (datagram, mut buffer) = (vec![0x5au8; size], vec![0u8; 65536]);
    let (mut sent, mut replies, mut in_flight) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    while sent < total || in_flight > 0 {
        while sent < total && in_flight < window {
            client.send_to(&datagram, to)?;
            sent += 1;
            in_flight += 1;
        }
        match client.recv_from(&mut buffer) {
            Ok(_) => {
                replies += 1;
                in_flight -= 1;
            }
            Err(_) => in_flight = 0,
        }
    }
    Ok(EchoRate {
        replies,
        elapsed: started.elapsed(),
    })
}

/// What the kernel documentation's iptables TPROXY recipe steers, for [`install_iptables_tproxy`].
pub struct IptablesTproxy<'a> {
    /// Interface the rules match on (`-i`).
    pub iface: &'a str,
    pub tcp_ports: &'a [u16],
    pub udp_ports: &'a [u16],
    /// Where TPROXY hands packets: `--on-ip 127.0.0.1 --on-port`.
    pub on_port: u16,
    /// Rules placed before the real ones that match other destinations (`-d PREFIX`, TCP
    /// port 80): rules the kernel has to look past.
    pub decoys: &'a [String],
}

/// Installs the recipe in `netns`: the socket match into DIVERT (mark 1, accept), TPROXY
/// rules per port, and `fwmark 1 lookup 100` with `local 0.0.0.0/0 dev lo table 100`.
pub fn install_iptables_tproxy(netns: &Netns, recipe: &IptablesTproxy<'_>) -> Result<()> {
    use std::fmt::Write as _;
    let mut rules =
        String::from("*mangle\n:DIVERT - [0:0]\n-A PREROUTING -p tcp -m socket -j DIVERT\n");
    rules.push_str("-A DIVERT -j MARK --set-mark 1\n-A DIVERT -j ACCEPT\n");
    let target = format!(
        "-j TPROXY --tproxy-mark 0x1/0x1 --on-ip 127.0.0.1 --on-port {}",
        recipe.on_port
    );
    let iface = recipe.iface;
    for decoy in recipe.decoys {
        writeln!(
            rules,
            "-A PREROUTING -i {iface} -d {decoy} -p tcp --dport 80 {target}"
        )?;
    }
    for (protocol, ports) in [("tcp", recipe.tcp_ports), ("udp", recipe.udp_ports)] {
        for port in ports {
            writeln!(
                rules,
                "-A PREROUTING -i {iface} -p {protocol} --dport {port} {target}"
            )?;
        }
    }
    rules.push_str("COMMIT\n");
    restore_iptables(netns, &rules)
}

/// Removes what [`install_iptables_tproxy`] installed.
pub fn remove_iptables_tproxy(netns: &Netns) -> Result<()> {
    for args in [["-t", "mangle", "-F"], ["-t", "mangle", "-X"]] {
        let status = Command::new("ip")
            .args(["netns", "exec", &netns.name, "iptables"])
            .args(args)
            .status()?;
        if !status.success() {
            bail!("iptables {args:?} failed in {}", netns.name);
        }
    }
    remove_tproxy_routing(netns)
}

/// The kernel documentation's policy routing for TPROXY: `fwmark 1 lookup 100` and
/// `local 0.0.0.0/0 dev lo table 100`.
pub fn install_tproxy_routing(netns: &Netns) -> Result<()> {
    netns.ip(&["rule", "add", "fwmark", "1", "lookup", "100"])?;
    netns.ip(&[
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ])?;
    Ok(())
}

/// Removes what [`install_tproxy_routing`] installed.
pub fn remove_tproxy_routing(netns: &Netns) -> Result<()> {
    netns.ip(&["rule", "del", "fwmark", "1", "lookup", "100"])?;
    netns.ip(&["route", "flush", "table", "100"])?;
    Ok(())
}

/// A configuration file for `tproxy run --config`, removed on drop.
pub struct ConfigFile {
    path: PathBuf,
}

impl ConfigFile {
    /// Writes `text` to a file with a name unique to this process.
    pub fn new(text: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("{}.toml", unique_name("config")));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(ConfigFile { path })
    }

    /// Replaces the file's contents (as an operator editing it before a reload would).
    pub fn rewrite(&self, text: &str) -> Result<()> {
        std::fs::write(&self.path, text).with_context(|| format!("writing {}", self.path.display()))
    }

    pub fn path(&self) -> &str {
        self.path.to_str().expect("temp paths are UTF-8")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs `tproxy ARGS…` outside any namespace with `stdin` as its input; returns (status,
/// stdout, stderr). For the subcommands that touch nothing: check, translate.
pub fn tproxy_with_input(args: &[&str], stdin: &str) -> Result<(ExitStatus, String, String)> {
    let mut child = Command::new(tproxy_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running tproxy")?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes())?;
    let output = child.wait_with_output()?;
    Ok((
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// Loads an `iptables-save` style rule set into `netns` with `iptables-restore`, plus the
/// kernel documentation's policy routing (`fwmark 1 lookup 100`, `local 0.0.0.0/0 dev lo
/// table 100`). [`remove_iptables_tproxy`] takes it all away again.
pub fn restore_iptables(netns: &Netns, rules: &str) -> Result<()> {
    let mut restore = Command::new("ip")
        .args(["netns", "exec", &netns.name, "iptables-restore"])
        .stdin(Stdio::piped())
        .spawn()
        .context("running iptables-restore")?;
    restore
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(rules.as_bytes())?;
    if !restore.wait()?.success() {
        bail!("iptables-restore refused:\n{rules}");
    }
    install_tproxy_routing(netns)
}

/// The lock file and control socket that an instance for `table` in `netns` keeps in
/// /run/tproxy, those that exist.
pub fn instance_files(netns: &Netns, table: u32) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(format!("/run/netns/{}", netns.name))
        .expect("the namespace's bind mount")
        .ino();
    ["lock", "sock"]
        .iter()
        .map(|ext| PathBuf::from(format!("/run/tproxy/netns-{ino}-table-{table}.{ext}")))
        .filter(|path| path.exists())
        .collect()
}

/// Runs `tproxy ARGS…` in `netns` to completion; returns (status, stdout, stderr).
pub fn run_tproxy_output(netns: &Netns, args: &[&str]) -> Result<(ExitStatus, String, String)> {
    let output = Command::new("ip")
        .args(["netns", "exec", &netns.name])
        .arg(tproxy_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running tproxy")?;
    Ok((
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// A bpf filesystem of the test's own, for `tproxy run --pin --pin-dir`: mounted on the host
/// (so it outlives the `ip netns exec` mount namespaces tproxy runs in, as /sys/fs/bpf
/// does for a real service) and unmounted, with all it holds, on drop.
pub struct Bpffs {
    dir: PathBuf,
}

impl Bpffs {
    pub fn new() -> Result<Self> {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = PathBuf::from(format!(
            "/run/tproxy-tests/bpffs-{}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)?;
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .context("running mount")?;
        if !status.success() {
            bail!("mount -t bpf bpf {} failed: {status}", dir.display());
        }
        Ok(Bpffs { dir })
    }

    /// The directory to give as `--pin-dir`.
    pub fn path(&self) -> &str {
        self.dir.to_str().expect("ASCII path")
    }

    /// The files pinned under it, as paths relative to it (without the `maps.debug` and
    /// `progs.debug` iterators the kernel puts in every bpffs root).
    pub fn pinned(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(relative) = path.strip_prefix(&self.dir) {
                    let relative = relative.display().to_string();
                    if !relative.ends_with(".debug") {
                        found.push(relative);
                    }
                }
            }
        }
        found.sort();
        found
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// `GET path` over HTTP/1.1 to `addr` from `netns`: the status code and the body.
pub fn http_get(netns: &Netns, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = netns.connect(addr)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: tproxy\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .get(9..12)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP response: {response:?}"))?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok((status, body.to_string()))
}
