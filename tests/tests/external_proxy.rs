//! External listeners: tproxy hands flows to a transparent proxy it does not run (Squid's
//! `http_port 3129 tproxy`, HAProxy's `bind … transparent`, a UDP program reading
//! IP_RECVORIGDSTADDR), as `-j TPROXY --on-port` does, with no iptables rule. The proxies
//! run on the router; the client's requests to the server go through them. When a proxy
//! stops, its flows are counted as `no_listener` and get the fail mode; when it comes back,
//! they are steered to it again without restarting tproxy.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage,
};
use tproxy_tests::{
    remove_iptables_tproxy, require_root, restore_iptables, routing_state, run_tproxy_output,
    tproxy_with_input, ConfigFile, Netns, RouterTopology as Topo, Server, Tproxy, DEFAULT_TABLE,
};

/// A proxy process we started in a namespace, with a directory of its own; killed on drop.
struct Proxy {
    child: Child,
    dir: PathBuf,
}

impl Proxy {
    /// Runs `program ARGS…` in `netns`, `{dir}` in the arguments and in `config` (written to
    /// `{dir}/config`) replaced by the proxy's directory.
    fn start(netns: &Netns, program: &str, args: &[&str], config: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "tproxy-test-{program}-{}-{}",
            std::process::id(),
            netns.name
        ));
        std::fs::create_dir_all(&dir)?;
        // Squid drops privileges to its own user, which must write its logs here.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        let dir_text = dir.to_str().context("temp paths are UTF-8")?.to_string();
        std::fs::write(dir.join("config"), config.replace("{dir}", &dir_text))?;
        let args: Vec<String> = args.iter().map(|a| a.replace("{dir}", &dir_text)).collect();
        let child = Command::new("ip")
            .args(["netns", "exec", &netns.name, program])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr"))?)
            .spawn()
            .with_context(|| {
                format!("starting {program} (is it installed? `cargo xtask setup`)")
            })?;
        Ok(Proxy { child, dir })
    }

    /// Stops it (SIGKILL: a crash, as far as tproxy can tell) and waits until it is gone.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!("--- proxy stderr ---\n{}", self.file("stderr"));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `tproxy status --json` of the router's instance.
fn status(router: &Netns) -> serde_json::Value {
    let (_, stdout, stderr) = run_tproxy_output(router, &["status", "--json"]).unwrap();
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("status: {e}: {stdout} {stderr}"))
}

/// The status entry of listener `name`.
fn listener_status(router: &Netns, name: &str) -> serde_json::Value {
    let report = status(router);
    report["instance"]["listeners"]
        .as_array()
        .and_then(|all| all.iter().find(|l| l["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no listener {name} in {report:#}"))
}

/// Waits until `tproxy status` says every socket of external listener `name` is `listening`
/// (true or false) with IP_TRANSPARENT when listening.
fn wait_for_external(router: &Netns, name: &str, listening: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listener = listener_status(router, name);
        let sockets = listener["external_sockets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let ready = !sockets.is_empty()
            && sockets
                .iter()
                .all(|s| s["listening"] == listening && (!listening || s["transparent"] == true));
        if ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "listener {name} never became listening={listening}: {listener:#}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Listener `name`'s (steered_new, no_listener) packet counts from `tproxy status`.
fn listener_packets(router: &Netns, name: &str) -> (u64, u64) {
    let packets = &listener_status(router, name)["packets"];
    (
        packets["steered_new"].as_u64().expect("steered_new"),
        packets["no_listener"].as_u64().expect("no_listener"),
    )
}

/// An HTTP server that answers every request with the peer address it sees.
fn http_tell_peer(netns: &Netns, addr: SocketAddr) -> Server {
    Server::start(netns, addr, |mut stream| {
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => request.push(byte[0]),
                _ => return,
            }
        }
        let body = stream
            .peer_addr()
            .map(|p| p.ip().to_string())
            .unwrap_or_default();
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    })
    .unwrap()
}

/// `GET /probe` from `netns` to `addr` (Host: the address, so the proxy resolves nothing):
/// the whole response.
fn http_get(netns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<String> {
    let mut stream = netns.run(move || TcpStream::connect_timeout(&addr, timeout))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let host = match addr.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    write!(
        stream,
        "GET /probe HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    if !response.starts_with("HTTP/1.1 200") && !response.starts_with("HTTP/1.0 200") {
        bail!("not a 200 response from {addr}: {response:?}");
    }
    Ok(response)
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// Steers port 80 from the client to Squid; on the server side a bypass rule is the socket
/// match that hands the servers' replies (addressed to the client, whose address Squid
/// spoofs) to Squid's sockets, as the iptables recipe's `-m socket` does.
const SQUID_TPROXY: &str = r#"
interfaces = ["to-client", "to-server"]
fail_mode = "closed"

[[listener]]
name = "squid"
external = ["127.0.0.1:3129", "[::1]:3129"]

[[rule]]
proto = "tcp"
iface = "to-client"
ports = 80
action = "steer"
listener = "squid"

[[rule]]
proto = "tcp"
iface = "to-server"
action = "bypass"
"#;

/// The seed documentation's own example: `http_port 3129 tproxy`.
const SQUID_CONFIG: &str = r#"
http_port 127.0.0.1:3128
http_port 3129 tproxy
pinger_enable off
http_access allow all
cache deny all
visible_hostname tproxy-test
dns_nameservers 127.0.0.1
logformat tproxy %>a accepted-at %>la %>lp %ru %>Hs
access_log stdio:{dir}/access.log tproxy
cache_log {dir}/cache.log
pid_filename {dir}/squid.pid
coredump_dir {dir}
shutdown_lifetime 0 seconds
"#;

fn start_squid(router: &Netns) -> Proxy {
    Proxy::start(router, "squid", &["-N", "-f", "{dir}/config"], SQUID_CONFIG).unwrap()
}

#[test]
fn squid_gets_the_flows_and_the_server_sees_the_client_over_ipv4_and_ipv6() {
    require_root();
    let topo = Topo::new().unwrap();
    let config = ConfigFile::new(SQUID_TPROXY).unwrap();
    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let mut squid = start_squid(&topo.router);
    wait_for_external(&topo.router, "squid", true);
    for v6 in [false, true] {
        let server = http_tell_peer(&topo.server, Topo::server_addr(v6, 80));
        let response = http_get(&topo.client, server.addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("v6={v6}: {e:#}\nsquid: {}", squid.file("cache.log")));
        assert_eq!(
            body(&response),
            Topo::client_ip(v6).to_string(),
            "v6={v6}: the server sees the client"
        );
        assert!(
            response.contains("Via:") || response.to_lowercase().contains("squid"),
            "v6={v6}: answered through Squid: {response}"
        );
    }
    // Squid logs the address it accepted on: the original destination, not its own port.
    let log = squid.file("access.log");
    for server in [Topo::SERVER_V4, Topo::SERVER_V6] {
        let accepted = format!("accepted-at {server} 80 ");
        assert!(log.contains(&accepted), "Squid saw {server} port 80: {log}");
    }
    let (steered, no_listener) = listener_packets(&topo.router, "squid");
    assert_eq!((steered, no_listener), (2, 0), "one SYN per family");

    // Squid gone: fail closed, counted.
    squid.kill();
    wait_for_external(&topo.router, "squid", false);
    let server = http_tell_peer(&topo.server, Topo::server_addr(false, 80));
    assert!(http_get(&topo.client, server.addr, Duration::from_secs(1)).is_err());
    let (_, no_listener) = listener_packets(&topo.router, "squid");
    assert!(no_listener >= 1, "the client's SYN found no listener");
    assert!(
        server.peers().is_empty(),
        "fail closed: nothing went direct"
    );

    let accepted = format!("{} accepted-at {} 80 ", Topo::CLIENT_V4, Topo::SERVER_V4);
    let accepted_before = squid.file("access.log").matches(&accepted).count();
    // Back: steered again, same tproxy.
    let squid = start_squid(&topo.router);
    wait_for_external(&topo.router, "squid", true);
    let response = http_get(&topo.client, server.addr, Duration::from_secs(5)).unwrap();
    assert_eq!(body(&response), Topo::CLIENT_V4);
    let (steered, _) = listener_packets(&topo.router, "squid");
    assert_eq!(steered, 3);
    assert_eq!(
        squid.file("access.log").matches(&accepted).count(),
        accepted_before + 1
    );
    drop(squid);
    tproxy.stop().unwrap();
    assert_eq!(
        routing_state(&topo.router, DEFAULT_TABLE).unwrap(),
        "",
        "nothing left"
    );
}

/// HAProxy on the wildcard address, steered to with the iptables idiom: `--on-port` alone.
const HAPROXY_CONFIG: &str = r#"
global
    pidfile {dir}/haproxy.pid
defaults
    mode http
    timeout connect 5s
    timeout client 20s
    timeout server 20s
frontend transparent
    bind :::3130 v4v6 transparent
    http-response set-header X-Original-Dst %[dst]:%[dst_port]
    default_backend original_destination
backend original_destination
    server origin 0.0.0.0:0
"#;

fn start_haproxy(router: &Netns) -> Proxy {
    Proxy::start(
        router,
        "haproxy",
        &["-db", "-f", "{dir}/config"],
        HAPROXY_CONFIG,
    )
    .unwrap()
}

#[test]
fn haproxy_gets_the_flows_with_their_original_destination_and_fails_open_when_gone() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = topo.tproxy(&["--tcp", "80", "--on-port", "3130"]).unwrap();
    let mut haproxy = start_haproxy(&topo.router);
    wait_for_external(&topo.router, "default", true);
    for v6 in [false, true] {
        let server = http_tell_peer(&topo.server, Topo::server_addr(v6, 80));
        let response = http_get(&topo.client, server.addr, Duration::from_secs(5)).unwrap();
        // An IPv4 flow on HAProxy's dual-stack socket shows as IPv4-mapped.
        let dst = match v6 {
            false => format!("X-Original-Dst: ::ffff:{}:80", Topo::SERVER_V4),
            true => format!("X-Original-Dst: {}:80", Topo::SERVER_V6),
        };
        assert!(
            response.to_lowercase().contains(&dst.to_lowercase()),
            "v6={v6}: {response}"
        );
        assert_eq!(
            body(&response),
            Topo::router_as_seen_by_server(v6).to_string(),
            "v6={v6}: HAProxy connects from the router"
        );
    }
    assert_eq!(listener_packets(&topo.router, "default"), (2, 0));

    // HAProxy gone: fail open, the client reaches the server directly; counted.
    haproxy.kill();
    wait_for_external(&topo.router, "default", false);
    let server = http_tell_peer(&topo.server, Topo::server_addr(true, 80));
    let response = http_get(&topo.client, server.addr, Duration::from_secs(5)).unwrap();
    assert!(
        !response.to_lowercase().contains("x-original-dst"),
        "{response}"
    );
    assert_eq!(
        body(&response),
        Topo::CLIENT_V6,
        "direct: the server sees the client"
    );
    // Every packet of the direct connection found no listener, not only its SYN.
    let (_, no_listener) = listener_packets(&topo.router, "default");
    assert!(no_listener >= 3, "{no_listener}");

    // Back, without restarting tproxy.
    let _haproxy = start_haproxy(&topo.router);
    wait_for_external(&topo.router, "default", true);
    let response = http_get(&topo.client, server.addr, Duration::from_secs(5)).unwrap();
    assert!(
        response.to_lowercase().contains("x-original-dst"),
        "{response}"
    );
    assert_eq!(
        listener_packets(&topo.router, "default"),
        (3, no_listener),
        "steered again; nothing more went without a listener"
    );
    tproxy.stop().unwrap();
    assert_eq!(
        tproxy.final_counter("tcp", "no_listener").unwrap(),
        no_listener
    );
}

/// What the client loop saw of one request: the outage phase when it started and when it
/// ended, and whether it got HAProxy's answer.
struct Attempt {
    started: usize,
    ended: usize,
    through_haproxy: bool,
}

/// The phases of the outage: before HAProxy is killed, while it is being killed, once it is
/// gone, while it is being started again, and once `tproxy status` sees it back. A request
/// that starts while HAProxy is being killed or started may end either way.
const BEFORE: usize = 0;
const KILLING: usize = 1;
const OUTAGE: usize = 2;
const RESTARTING: usize = 3;
const BACK: usize = 4;

/// HAProxy crashes (SIGKILL) and is started again while a client makes one request after
/// another: tproxy, left running, steers to the new HAProxy; the flows that came while it
/// was gone failed closed and were counted as `no_listener`, and only those failed.
#[test]
fn a_proxy_restart_under_load_is_recovered_from_without_restarting_tproxy() {
    use std::sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex,
    };
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = topo
        .tproxy(&["--tcp", "80", "--on-port", "3130", "--fail-mode", "closed"])
        .unwrap();
    let mut haproxy = start_haproxy(&topo.router);
    wait_for_external(&topo.router, "default", true);
    let pid = status(&topo.router)["instance"]["pid"].clone();
    assert!(pid.as_u64().is_some(), "{pid}");
    let server = http_tell_peer(&topo.server, Topo::server_addr(false, 80));

    let phase = AtomicUsize::new(BEFORE);
    let stop = AtomicBool::new(false);
    let attempts: Mutex<Vec<Attempt>> = Mutex::new(Vec::new());
    // Waits until the client has made `more` requests that started in `phase_now` and
    // ended with `through_haproxy`.
    let wait_for = |phase_now: usize, through_haproxy: bool, more: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen = attempts
                .lock()
                .unwrap()
                .iter()
                .filter(|a| a.started == phase_now && a.through_haproxy == through_haproxy)
                .count();
            if seen >= more {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "phase {phase_now}: {seen} of {more} requests with through_haproxy={through_haproxy}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    };
    /// Stops the client loop however the scope ends, so that a failed assertion fails the
    /// test instead of waiting forever for the loop to end.
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let haproxy = thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        scope.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let started = phase.load(Ordering::SeqCst);
                let through_haproxy = http_get(&topo.client, server.addr, Duration::from_secs(1))
                    .is_ok_and(|r| r.to_lowercase().contains("x-original-dst"));
                let ended = phase.load(Ordering::SeqCst);
                attempts.lock().unwrap().push(Attempt {
                    started,
                    ended,
                    through_haproxy,
                });
            }
        });
        wait_for(BEFORE, true, 20);
        let (_, no_listener_before) = listener_packets(&topo.router, "default");

        phase.store(KILLING, Ordering::SeqCst);
        haproxy.kill();
        phase.store(OUTAGE, Ordering::SeqCst);
        wait_for_external(&topo.router, "default", false);
        wait_for(OUTAGE, false, 1);
        thread::sleep(Duration::from_millis(500));
        let (_, no_listener_outage) = listener_packets(&topo.router, "default");
        assert!(
            no_listener_outage > no_listener_before,
            "the outage's SYNs were counted: {no_listener_before} -> {no_listener_outage}"
        );

        phase.store(RESTARTING, Ordering::SeqCst);
        // Dropped first: the old one's directory, removed on drop, has the same name.
        drop(haproxy);
        let haproxy = start_haproxy(&topo.router);
        wait_for_external(&topo.router, "default", true);
        phase.store(BACK, Ordering::SeqCst);
        wait_for(BACK, true, 20);
        haproxy
    });

    let attempts = attempts.into_inner().unwrap();
    let count = |started: usize, ended: usize, through_haproxy: bool| {
        attempts
            .iter()
            .filter(|a| a.started == started && a.ended == ended)
            .filter(|a| a.through_haproxy == through_haproxy)
            .count()
    };
    for started in BEFORE..=BACK {
        for ended in started..=BACK {
            let (ok, failed) = (count(started, ended, true), count(started, ended, false));
            if ok + failed > 0 {
                eprintln!("phase {started}..{ended}: {ok} answered, {failed} failed");
            }
        }
    }
    // Only the requests that overlapped the outage failed: none before, none once back.
    assert_eq!(count(BEFORE, BEFORE, false), 0, "failed before the kill");
    assert_eq!(count(BACK, BACK, false), 0, "failed after HAProxy was back");
    // Fail closed: nothing during the outage got an answer, and nothing went direct.
    assert_eq!(count(OUTAGE, OUTAGE, true), 0, "answered with no HAProxy");
    assert!(count(OUTAGE, OUTAGE, false) >= 1);
    assert!(
        server
            .peers()
            .iter()
            .all(|p| p.ip() != Topo::client_ip(false)),
        "fail closed: nothing went direct: {:?}",
        server.peers()
    );
    let (_, no_listener) = listener_packets(&topo.router, "default");
    assert!(
        no_listener as usize >= count(OUTAGE, OUTAGE, false),
        "every failed SYN was counted: {no_listener}"
    );
    assert_eq!(
        status(&topo.router)["instance"]["pid"],
        pid,
        "the same tproxy throughout"
    );
    drop(haproxy);
    tproxy.stop().unwrap();
    assert_eq!(
        tproxy.final_counter("tcp", "no_listener").unwrap(),
        no_listener,
        "nothing went without a listener once HAProxy was back"
    );
}

/// A UDP "proxy" as transparent proxies write them: an IP_TRANSPARENT socket that reads
/// each datagram's original destination (IP_RECVORIGDSTADDR) and answers from it.
struct UdpOrigDstEcho {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl UdpOrigDstEcho {
    fn start(netns: &Netns, addrs: &[SocketAddr]) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::new();
        for &addr in addrs {
            let socket = netns.run(move || transparent_udp(addr)).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let reply_netns = netns.name.clone();
            let stop = stop.clone();
            threads.push(thread::spawn(move || {
                serve_orig_dst(socket, &reply_netns, &stop)
            }));
        }
        UdpOrigDstEcho { stop, threads }
    }
}

impl Drop for UdpOrigDstEcho {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn transparent_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        None,
    )?;
    let fd = socket.as_raw_fd();
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    if addr.is_ipv6() {
        setsockopt(&borrowed, sockopt::IpTransparent, &true)?;
        setsockopt(&borrowed, sockopt::Ipv6OrigDstAddr, &true)?;
    } else {
        setsockopt(&borrowed, sockopt::IpTransparent, &true)?;
        setsockopt(&borrowed, sockopt::Ipv4OrigDstAddr, &true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Answers each datagram with "ORIGINAL_DESTINATION PAYLOAD", sent from that destination.
fn serve_orig_dst(socket: UdpSocket, netns: &str, stop: &std::sync::atomic::AtomicBool) {
    let path = format!("/run/netns/{netns}");
    let ns = std::fs::File::open(&path).unwrap();
    nix::sched::setns(
        std::os::fd::AsFd::as_fd(&ns),
        nix::sched::CloneFlags::CLONE_NEWNET,
    )
    .unwrap();
    let mut buffer = [0u8; 2048];
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
        let mut iov = [std::io::IoSliceMut::new(&mut buffer)];
        let Ok(message) = recvmsg::<SockaddrStorage>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        ) else {
            continue;
        };
        let Some(client) = message.address.and_then(|a| to_socket_addr(&a)) else {
            continue;
        };
        let mut original = None;
        for control in message.cmsgs().into_iter().flatten() {
            match control {
                ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                    original = Some(SocketAddr::from((
                        std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                        u16::from_be(a.sin_port),
                    )))
                }
                ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                    original = Some(SocketAddr::from((
                        std::net::Ipv6Addr::from(a.sin6_addr.s6_addr),
                        u16::from_be(a.sin6_port),
                    )))
                }
                _ => {}
            }
        }
        let len = message.bytes;
        let Some(original) = original else { continue };
        let reply = format!("{original} {}", String::from_utf8_lossy(&buffer[..len]));
        // From the original destination, as a transparent proxy answers.
        if let Ok(from) = transparent_udp(original) {
            let _ = from.send_to(reply.as_bytes(), client);
        }
    }
}

fn to_socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::from((v4.ip(), v4.port())));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
}

/// Sends `payload` from the client to `server` and waits up to `timeout` for an answer.
fn udp_ask(client: &Netns, server: SocketAddr, payload: &str, timeout: Duration) -> Option<String> {
    let payload = payload.to_string();
    client.run(move || {
        let bind: SocketAddr = match server {
            SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
            SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
        };
        let socket = UdpSocket::bind(bind).unwrap();
        socket.set_read_timeout(Some(timeout)).unwrap();
        socket.send_to(payload.as_bytes(), server).unwrap();
        let mut buffer = [0u8; 2048];
        let (len, from) = socket.recv_from(&mut buffer).ok()?;
        assert_eq!(
            from, server,
            "the answer comes from the address the client sent to"
        );
        Some(String::from_utf8_lossy(&buffer[..len]).into_owned())
    })
}

const METRICS: &str = "127.0.0.1:9464";

/// The metrics endpoint's text.
fn scrape(router: &Netns) -> String {
    let (status, body) =
        tproxy_tests::http_get(router, METRICS.parse().unwrap(), "/metrics").unwrap();
    assert_eq!(status, 200);
    body
}

/// The value of sample `name` (labels exactly as exposed), as text.
fn sample<'a>(body: &'a str, name: &str) -> &'a str {
    body.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no `{name}` in:\n{body}"))
}

const UDP_EXTERNAL: &str = r#"
interfaces = ["to-client"]
fail_mode = "closed"

[[listener]]
name = "dns"
external = ["127.0.0.1:5300", "[::1]:5300"]

[[rule]]
proto = "udp"
ports = 53
action = "steer"
"#;

#[test]
fn a_udp_program_reading_the_original_destination_gets_the_datagrams() {
    require_root();
    let topo = Topo::new().unwrap();
    let config = ConfigFile::new(UDP_EXTERNAL).unwrap();
    let mut tproxy = Tproxy::start(
        &topo.router,
        &["--config", config.path(), "--metrics", METRICS],
    )
    .unwrap();
    let addrs: Vec<SocketAddr> = vec![
        "127.0.0.1:5300".parse().unwrap(),
        "[::1]:5300".parse().unwrap(),
    ];
    let proxy = UdpOrigDstEcho::start(&topo.router, &addrs);
    wait_for_external(&topo.router, "dns", true);
    for v6 in [false, true] {
        let server = Topo::server_addr(v6, 53);
        let answer = udp_ask(&topo.client, server, "hello", Duration::from_secs(5))
            .unwrap_or_else(|| panic!("v6={v6}: no answer"));
        assert_eq!(answer, format!("{server} hello"), "v6={v6}");
    }
    assert_eq!(listener_packets(&topo.router, "dns"), (2, 0));
    let metrics = scrape(&topo.router);
    assert_eq!(
        sample(
            &metrics,
            r#"tproxy_listener_packets_total{listener="dns",outcome="steered_new"}"#
        ),
        "2"
    );
    let up = r#"tproxy_external_listener_up{listener="dns",address="[::1]:5300",transport="udp"}"#;
    assert_eq!(sample(&metrics, up), "2", "listening, with IP_TRANSPARENT");

    drop(proxy);
    wait_for_external(&topo.router, "dns", false);
    let server = Topo::server_addr(false, 53);
    assert_eq!(
        udp_ask(&topo.client, server, "lost", Duration::from_millis(500)),
        None
    );
    assert_eq!(listener_packets(&topo.router, "dns").1, 1);
    let metrics = scrape(&topo.router);
    assert_eq!(sample(&metrics, up), "0");
    assert_eq!(
        sample(
            &metrics,
            r#"tproxy_listener_packets_total{listener="dns",outcome="no_listener"}"#
        ),
        "1"
    );

    let _proxy = UdpOrigDstEcho::start(&topo.router, &addrs);
    wait_for_external(&topo.router, "dns", true);
    let answer = udp_ask(&topo.client, server, "again", Duration::from_secs(5)).unwrap();
    assert_eq!(answer, format!("{server} again"));
    assert_eq!(listener_packets(&topo.router, "dns"), (3, 1));
    tproxy.stop().unwrap();
    assert_eq!(tproxy.final_counter("udp", "no_listener").unwrap(), 1);
}

/// `doctor --external`: says when nothing listens there, when the socket there lacks
/// IP_TRANSPARENT, and passes a transparent one; read from sock_diag.
#[test]
fn doctor_checks_the_external_proxys_socket() {
    require_root();
    let topo = Topo::new().unwrap();
    let doctor = || {
        let (status, stdout, stderr) = run_tproxy_output(
            &topo.router,
            &[
                "doctor",
                "--external",
                "127.0.0.1:3129",
                "--external",
                "[::1]:3129",
            ],
        )
        .unwrap();
        (status.success(), format!("{stdout}{stderr}"))
    };
    let (healthy, report) = doctor();
    assert!(!healthy, "{report}");
    assert!(
        report.contains("127.0.0.1:3129 (Tcp): nothing listens there"),
        "{report}"
    );
    assert!(
        report.contains("[::1]:3129 (Tcp): nothing listens there"),
        "{report}"
    );

    // A plain listener: there, but no proxy can take other hosts' flows on it.
    let plain = topo
        .router
        .listen("127.0.0.1:3129".parse().unwrap())
        .unwrap();
    let (healthy, report) = doctor();
    assert!(!healthy, "{report}");
    assert!(
        report.contains("127.0.0.1:3129 (Tcp): the socket there has no IP_TRANSPARENT"),
        "{report}"
    );
    drop(plain);

    // Squid's dual-stack wildcard `http_port 3129 tproxy` serves both addresses.
    let squid = start_squid(&topo.router);
    wait_for_squid(&topo.router);
    let (healthy, report) = doctor();
    assert!(
        report.contains("127.0.0.1:3129 (Tcp): listening, with IP_TRANSPARENT"),
        "{report}"
    );
    assert!(
        report.contains("[::1]:3129 (Tcp): listening, with IP_TRANSPARENT"),
        "{report}"
    );
    assert!(healthy, "{report}");
    drop(squid);
}

/// `doctor --external` reads the UDP sockets there too: a plain UDP socket is a problem, a
/// transparent one passes, and then TCP missing is only a warning (the flag names no
/// transport).
#[test]
fn doctor_checks_an_external_udp_proxys_socket_too() {
    require_root();
    let topo = Topo::new().unwrap();
    let addr: SocketAddr = "127.0.0.1:3130".parse().unwrap();
    let doctor = || {
        let (status, stdout, stderr) =
            run_tproxy_output(&topo.router, &["doctor", "--external", "127.0.0.1:3130"]).unwrap();
        (status.success(), format!("{stdout}{stderr}"))
    };
    let plain = topo.router.run(move || UdpSocket::bind(addr)).unwrap();
    let (healthy, report) = doctor();
    assert!(!healthy, "{report}");
    assert!(
        report.contains(
            "PROBLEM listener `--external`: 127.0.0.1:3130 (Udp): the socket there has no IP_TRANSPARENT"
        ),
        "{report}"
    );
    drop(plain);

    let proxy = topo.router.run(move || transparent_udp(addr)).unwrap();
    let (healthy, report) = doctor();
    assert!(
        report.contains(
            "ok      listener `--external`: 127.0.0.1:3130 (Udp): listening, with IP_TRANSPARENT"
        ),
        "{report}"
    );
    assert!(
        report
            .contains("warning listener `--external`: 127.0.0.1:3130 (Tcp): nothing listens there"),
        "{report}"
    );
    assert!(healthy, "{report}");
    drop(proxy);
}

/// Waits until Squid's transparent port accepts connections.
fn wait_for_squid(router: &Netns) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while router.connect("127.0.0.1:3129".parse().unwrap()).is_err() {
        assert!(Instant::now() < deadline, "Squid never listened on 3129");
        thread::sleep(Duration::from_millis(100));
    }
}

/// A transparent TCP "proxy" that tells each client the original destination it accepted
/// the connection on, and closes first (so the router keeps the tuple in TIME_WAIT).
fn tell_original_destination(router: &Netns, addr: SocketAddr) -> std::net::TcpListener {
    let listener = router
        .run(move || -> std::io::Result<std::net::TcpListener> {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )?;
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(socket.as_raw_fd()) };
            setsockopt(&borrowed, sockopt::IpTransparent, &true)?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(16)?;
            Ok(socket.into())
        })
        .unwrap();
    let accepting = listener.try_clone().unwrap();
    thread::spawn(move || {
        for stream in accepting.incoming() {
            let Ok(mut stream) = stream else { return };
            let original = stream
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let _ = stream.write_all(original.as_bytes());
        }
    });
    listener
}

/// A SYN reusing the tuple of a TIME_WAIT socket of the proxy's. The kernel's TIME_WAIT
/// handling looks for a listener at the original destination, which the `sk_lookup`
/// program can answer only with tproxy's own listeners: for an external one the old socket
/// answers the SYN with an ACK, the client resets it, and its next SYN is steered to the
/// proxy (the iptables recipe does the same: its `-m socket` matches the TIME_WAIT socket).
/// A Linux client sends that SYN a few milliseconds later; the test prints how long each
/// connection took.
#[test]
fn a_connection_reusing_a_time_wait_tuple_of_the_proxy_gets_through() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = topo
        .tproxy(&[
            "--tcp",
            "80",
            "--on-port",
            "3140",
            "--on-ip",
            "127.0.0.1",
            "--on-ip",
            "::1",
        ])
        .unwrap();
    let listeners = [
        tell_original_destination(&topo.router, "127.0.0.1:3140".parse().unwrap()),
        tell_original_destination(&topo.router, "[::1]:3140".parse().unwrap()),
    ];
    for v6 in [false, true] {
        let server = Topo::server_addr(v6, 80);
        let client = SocketAddr::new(Topo::client_ip(v6), 40001);
        for round in 0..3 {
            if round > 0 {
                let time_wait = topo.router.time_wait_sockets().unwrap();
                assert!(
                    time_wait.contains(":40001"),
                    "no TIME_WAIT to reuse:\n{time_wait}"
                );
            }
            let started = Instant::now();
            let original = topo.client.read_all_from(client, server);
            eprintln!("v6={v6} round {round}: {:?}", started.elapsed());
            assert_eq!(
                original.unwrap(),
                server.to_string(),
                "v6={v6} round {round}"
            );
        }
    }
    drop(listeners);
    tproxy.stop().unwrap();
    assert_eq!(tproxy.final_counter("tcp", "no_listener").unwrap(), 0);
}

/// The kernel documentation's recipe with Squid behind it, as people run it today.
const SQUID_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:DIVERT - [0:0]
-A PREROUTING -p tcp -m socket -j DIVERT
-A PREROUTING -p tcp -m tcp --dport 80 -j TPROXY --on-port 3129 --on-ip 0.0.0.0 --tproxy-mark 0x1/0x1
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A DIVERT -j ACCEPT
COMMIT
";

/// `translate --keep-proxies` replaces the iptables rules one for one: Squid stays in the
/// path, and the same request reaches the server from the client's address through it.
#[test]
fn a_translated_squid_rule_set_keeps_squid_in_the_path() {
    require_root();
    let topo = Topo::new().unwrap();
    let squid = start_squid(&topo.router);
    wait_for_squid(&topo.router);
    let server = http_tell_peer(&topo.server, Topo::server_addr(false, 80));
    let accepted = format!("{} accepted-at {} 80 ", Topo::CLIENT_V4, Topo::SERVER_V4);

    restore_iptables(&topo.router, SQUID_IPTABLES).unwrap();
    let response = http_get(&topo.client, server.addr, Duration::from_secs(5)).unwrap();
    assert_eq!(
        body(&response),
        Topo::CLIENT_V4,
        "iptables: the server sees the client"
    );
    assert_eq!(
        squid.file("access.log").matches(&accepted).count(),
        1,
        "through Squid"
    );
    remove_iptables_tproxy(&topo.router).unwrap();

    let (status, translated, stderr) =
        tproxy_with_input(&["translate", "--keep-proxies"], SQUID_IPTABLES).unwrap();
    assert!(status.success(), "{stderr}");
    assert!(
        translated.contains("external = [\"0.0.0.0:3129\"]"),
        "{translated}"
    );
    let config = ConfigFile::new(&translated).unwrap();
    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let response = http_get(&topo.client, server.addr, Duration::from_secs(5)).unwrap();
    assert_eq!(
        body(&response),
        Topo::CLIENT_V4,
        "tproxy: the server sees the client"
    );
    assert_eq!(
        squid.file("access.log").matches(&accepted).count(),
        2,
        "through Squid"
    );
    assert_eq!(listener_packets(&topo.router, "tproxy-3129"), (1, 0));
    tproxy.stop().unwrap();
}

/// What makes no sense for a proxy tproxy does not run is refused by `check`, naming it.
#[test]
fn bad_external_listeners_are_refused_by_name() {
    let check = |args: &[&str]| {
        let mut full = vec!["check", "--iface", "lo"];
        full.extend_from_slice(args);
        let (status, _, stderr) = tproxy_with_input(&full, "").unwrap();
        assert!(!status.success(), "{args:?} accepted");
        stderr
    };
    assert!(check(&["--tcp", "80", "--on-ip", "127.0.0.1"]).contains("--on-port"));
    assert!(check(&[
        "--tcp",
        "80",
        "--on-port",
        "3129",
        "--listen",
        "127.0.0.1:1"
    ])
    .contains("--listen"));
    assert!(check(&[
        "--tcp",
        "80",
        "--on-port",
        "3129",
        "--upstream",
        "127.0.0.1:1"
    ])
    .contains("--upstream"));
    assert!(check(&["--tcp", "80", "--on-port", "0"]).contains("never 0"));
    let twice = check(&[
        "--tcp",
        "80",
        "--on-port",
        "3129",
        "--on-ip",
        "127.0.0.1",
        "--on-ip",
        "127.0.0.2",
    ]);
    assert!(
        twice.contains("--on-ip 127.0.0.2: at most one address per address family"),
        "{twice}"
    );
    assert!(check(&["--on-port", "3129"]).contains("give --tcp or --udp"));
    let (status, _, stderr) = tproxy_with_input(
        &["check", "--relay-only", "--tcp", "80", "--on-port", "3129"],
        "",
    )
    .unwrap();
    assert!(
        !status.success() && stderr.contains("--relay-only"),
        "{stderr}"
    );

    for (entry, says) in [
        (
            "external = \"127.0.0.1:3129\"\nlisten = \"127.0.0.1:1\"",
            "give one or the other",
        ),
        (
            "external = \"127.0.0.1:3129\"\nupstream = \"127.0.0.1:1\"",
            "give one or the other",
        ),
        (
            "external = [\"127.0.0.1:3129\", \"127.0.0.2:3129\"]",
            "at most one address per address family",
        ),
        ("external = \"127.0.0.1:0\"", "never 0"),
        ("external = []", "give the proxy's address"),
    ] {
        let config = ConfigFile::new(&format!(
            "interfaces = [\"lo\"]\n[[listener]]\nname = \"squid\"\n{entry}\n[[rule]]\nproto = \"tcp\"\nports = 80\naction = \"steer\"\n"
        ))
        .unwrap();
        let (status, _, stderr) =
            tproxy_with_input(&["check", "--config", config.path()], "").unwrap();
        assert!(!status.success(), "{entry}: accepted");
        assert!(
            stderr.contains("listener `squid`") && stderr.contains(says),
            "{entry}: {stderr}"
        );
    }
}
