//! Restarts and upgrades with `--pin`: steering, routing and the listening sockets outlive
//! the process, connections in flight drain in the old process, connections made during the
//! restart are served by the new one; what happens to steered traffic while no process runs
//! is the fail mode; `status` reads it all from another shell; `cleanup` removes it.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use tproxy_tests::{
    digest, digest_to_eof, ingress_programs, instance_files, payload, require_root, routing_state,
    run_tproxy_output, udp_client, udp_exchange, Bpffs, Netns, RouterTopology as Topo, Server,
    Tproxy, UdpEcho,
};

const TABLE: u32 = tproxy_tests::DEFAULT_TABLE;
const METRICS: &str = "127.0.0.1:9464";
/// The long transfer: CHUNKS chunks of CHUNK bytes, one every CHUNK_GAP (about 4 s).
const CHUNKS: usize = 40;
const CHUNK: usize = 32 * 1024;
const CHUNK_GAP: Duration = Duration::from_millis(100);

/// A server that, on `L`, streams the long transfer slowly and closes; on anything else,
/// echoes.
fn slow_or_echo_server(topo: &Topo) -> Server {
    Server::start(&topo.server, Topo::server_addr(false, 80), |mut stream| {
        let mut first = [0u8; 1];
        if stream.read_exact(&mut first).is_err() {
            return;
        }
        if &first == b"L" {
            let data = payload(CHUNKS * CHUNK, 7);
            for chunk in data.chunks(CHUNK) {
                if stream.write_all(chunk).is_err() {
                    return;
                }
                thread::sleep(CHUNK_GAP);
            }
            return;
        }
        let _ = stream.write_all(&first);
        let mut reader = stream.try_clone().expect("clone");
        let _ = std::io::copy(&mut reader, &mut stream);
    })
    .unwrap()
}

/// Starts the long transfer; the thread returns whether every byte arrived intact. The request
/// is written before the thread starts, so it cannot come after a stop the test signals next.
fn long_transfer(topo: &Topo) -> thread::JoinHandle<Result<(), String>> {
    let mut stream = topo.client.connect(Topo::server_addr(false, 80)).unwrap();
    stream.write_all(b"L").unwrap();
    thread::spawn(move || {
        let got = digest_to_eof(&mut stream).map_err(|e| format!("transfer broke: {e}"))?;
        let want = digest(&payload(CHUNKS * CHUNK, 7));
        if got != want {
            return Err(format!("got {got:?}, want {want:?}"));
        }
        Ok(())
    })
}

/// One echo round trip on a new connection, made on its own thread (it may have to wait for
/// the new instance).
fn echo_on_new_connection(topo: &Topo) -> thread::JoinHandle<Result<(), String>> {
    let server = Topo::server_addr(false, 80);
    // Spawned inside the client's namespace: its socket is made there.
    topo.client.run(move || {
        thread::spawn(move || {
            let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(10))
                .map_err(|e| format!("connecting: {e}"))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(15)))
                .unwrap();
            stream.write_all(b"hello").map_err(|e| e.to_string())?;
            let mut back = [0u8; 5];
            stream.read_exact(&mut back).map_err(|e| e.to_string())?;
            if &back != b"hello" {
                return Err(format!("echo came back as {back:?}"));
            }
            Ok(())
        })
    })
}

/// The id of the program on the pinned TCX link, from `tproxy status --json`.
fn pinned_program(topo: &Topo, bpffs: &Bpffs) -> u64 {
    let (_, out, err) = run_tproxy_output(
        &topo.router,
        &["status", "--json", "--pin-dir", bpffs.path()],
    )
    .unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}{err}"));
    report["pinned"]["links"][0]["program_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("{report:#}"))
}

fn pinned_args<'a>(bpffs: &'a Bpffs, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--tcp", "80", "--pin", "--pin-dir", bpffs.path()];
    args.extend_from_slice(extra);
    args
}

/// The path of a running or past upgrade: `sigterm_first` stops the old instance before the
/// new one starts (a restart), otherwise the new one starts while the old one serves (an
/// upgrade).
fn restart_under_load(sigterm_first: bool) {
    require_root();
    let topo = Topo::new().unwrap();
    let bpffs = Bpffs::new().unwrap();
    let server = slow_or_echo_server(&topo);
    let echo = UdpEcho::start(&topo.server, Topo::server_addr(false, 5353)).unwrap();
    // Fail-closed: a SYN sent while no listener is registered is dropped, and its
    // retransmission reaches the new instance (fail-open would let it past the proxy).
    let args = pinned_args(
        &bpffs,
        &[
            "--udp",
            "5353",
            "--udp-idle-timeout",
            "2s",
            "--drain-timeout",
            "30s",
            "--fail-mode",
            "closed",
            "--metrics",
            METRICS,
        ],
    );
    let mut old = topo.tproxy(&args).unwrap();
    let old_program = pinned_program(&topo, &bpffs);
    let transfer = long_transfer(&topo);
    let old_session = udp_client(&topo.client, echo.addr).unwrap();
    assert_eq!(
        udp_exchange(&old_session, echo.addr, b"before").unwrap().0,
        b"before"
    );
    thread::sleep(Duration::from_millis(500));

    let during = if sigterm_first {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old.pid() as i32),
            Signal::SIGTERM,
        )
        .unwrap();
        old.wait_for_line("stopping: draining", Duration::from_secs(5))
            .unwrap();
        // Draining: not ready, so a load balancer or kubelet stops sending it work.
        let (_, metrics) =
            tproxy_tests::http_get(&topo.router, METRICS.parse().unwrap(), "/metrics").unwrap();
        assert!(metrics.contains("\ntproxy_ready 0\n"), "{metrics}");
        assert_eq!(
            tproxy_tests::http_get(&topo.router, METRICS.parse().unwrap(), "/readyz")
                .unwrap()
                .0,
            503
        );
        // Between the processes: its SYN is dropped until the new instance is there.
        Some(echo_on_new_connection(&topo))
    } else {
        None
    };
    let mut new = topo.tproxy(&args).unwrap();
    assert!(
        new.log_text()
            .contains(&format!("took over from tproxy pid {}", old.pid())),
        "{}",
        new.log_text()
    );
    if !sigterm_first {
        old.wait_for_line("the new instance has taken over", Duration::from_secs(5))
            .unwrap();
        // The operator's next step in an upgrade: stop the old instance. It keeps draining.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old.pid() as i32),
            Signal::SIGTERM,
        )
        .unwrap();
        old.wait_for_line(
            "already draining for the new instance",
            Duration::from_secs(5),
        )
        .unwrap();
    }
    // The old instance stops serving metrics once it has handed over: scrapes reach the new one.
    let deadline = Instant::now() + Duration::from_secs(3);
    while tproxy_tests::http_get(&topo.router, METRICS.parse().unwrap(), "/readyz")
        .unwrap()
        .0
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "the new instance never answered /readyz"
        );
        thread::sleep(Duration::from_millis(50));
    }
    // The new program replaced the old one on the same link: one program at the hook.
    assert_ne!(pinned_program(&topo, &bpffs), old_program);
    assert_eq!(
        ingress_programs(&topo.router, Topo::ROUTER_CLIENT_IFACE).unwrap(),
        vec!["tproxy_ingress".to_string()]
    );
    if let Some(during) = during {
        assert_eq!(
            during.join().unwrap(),
            Ok(()),
            "connection made during the restart"
        );
    }
    assert_eq!(
        echo_on_new_connection(&topo).join().unwrap(),
        Ok(()),
        "connection after the restart"
    );
    // The old instance's UDP session runs on in it; a new one goes to the new instance.
    assert_eq!(
        udp_exchange(&old_session, echo.addr, b"again").unwrap().0,
        b"again"
    );
    let new_session = udp_client(&topo.client, echo.addr).unwrap();
    assert_eq!(
        udp_exchange(&new_session, echo.addr, b"new").unwrap().0,
        b"new"
    );
    assert_eq!(
        echo.peer_ips(),
        vec![Topo::router_as_seen_by_server(false)],
        "a datagram went past the proxy"
    );
    assert_eq!(
        transfer.join().unwrap(),
        Ok(()),
        "the long transfer across the restart"
    );
    let status = old.wait(Duration::from_secs(10)).unwrap();
    assert!(
        status.success(),
        "old instance: {status}\n{}",
        old.log_text()
    );
    assert!(
        ingress_programs(&topo.router, Topo::ROUTER_CLIENT_IFACE)
            .unwrap()
            .iter()
            .any(|p| p == "tproxy_ingress"),
        "steering went with the old instance"
    );
    // The connection made after the restart is the new instance's. One made during it goes
    // to whichever instance accepts first on the listening socket they share until the old
    // one has heard `done`: either relays it, none loses it.
    let relayed =
        |instance: &tproxy_tests::Tproxy| instance.log_text().matches("relaying via").count();
    // The logs are read by threads of their own: give the last lines a moment to arrive.
    let expected = if sigterm_first { 3 } else { 2 };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while relayed(&old) + relayed(&new) < expected && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(relayed(&new) >= 1, "{}", new.log_text());
    assert_eq!(
        relayed(&old) + relayed(&new),
        // The long transfer, the connection after, and the one during.
        if sigterm_first { 3 } else { 2 },
        "old:\n{}\nnew:\n{}",
        old.log_text(),
        new.log_text()
    );
    // The old instance handed its lock and control socket over: the new one is the one
    // `reload` reaches (it has no file to re-read, and says so).
    let (reloaded, _, err) = run_tproxy_output(&topo.router, &["reload"]).unwrap();
    assert!(!reloaded.success(), "{err}");
    assert!(
        err.contains(&format!("tproxy (pid {}) rejected the reload", new.pid()))
            && err.contains("started without --config"),
        "{err}"
    );

    new.stop().unwrap();
    drop(server);
    cleanup_leaves_nothing(&topo, &bpffs);
}

/// `tproxy cleanup` removes the pinned state, the program and the routing.
fn cleanup_leaves_nothing(topo: &Topo, bpffs: &Bpffs) {
    assert!(!bpffs.pinned().is_empty(), "nothing was pinned");
    assert!(!routing_state(&topo.router, TABLE).unwrap().is_empty());
    // Someone else's directory next to ours.
    let theirs = std::path::Path::new(bpffs.path()).join("another-tool");
    std::fs::create_dir_all(&theirs).unwrap();
    let (status, out, err) =
        run_tproxy_output(&topo.router, &["cleanup", "--pin-dir", bpffs.path()]).unwrap();
    assert!(theirs.is_dir(), "cleanup removed what was not tproxy's");
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("pinned links and maps"), "{out}");
    assert_eq!(bpffs.pinned(), Vec::<String>::new());
    assert_eq!(routing_state(&topo.router, TABLE).unwrap(), "");
    assert_eq!(
        ingress_programs(&topo.router, Topo::ROUTER_CLIENT_IFACE).unwrap(),
        Vec::<String>::new()
    );
    // The instance stopped cleanly: its lock file and control socket went with it.
    assert_eq!(
        instance_files(&topo.router, TABLE),
        Vec::<std::path::PathBuf>::new()
    );
}

#[test]
fn after_sigkill_pinned_steering_stays_and_the_next_start_adopts_it() {
    require_root();
    let topo = Topo::new().unwrap();
    let bpffs = Bpffs::new().unwrap();
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let args = pinned_args(&bpffs, &["--fail-mode", "closed"]);
    let mut killed = topo.tproxy(&args).unwrap();
    killed.signal_and_wait(Signal::SIGKILL).unwrap();
    assert_eq!(
        ingress_programs(&topo.router, Topo::ROUTER_CLIENT_IFACE).unwrap(),
        vec!["tproxy_ingress".to_string()],
        "the pinned program went with the process"
    );
    assert!(!routing_state(&topo.router, TABLE).unwrap().is_empty());
    let mut next = topo.tproxy(&args).unwrap();
    assert!(
        next.log_text().contains("adopted from the pinned state"),
        "{}",
        next.log_text()
    );
    assert!(
        !next.log_text().contains("removed"),
        "an adopting start removes nothing: {}",
        next.log_text()
    );
    // Found by the hostile tester: the local UDP flows' map (one place without --local) was
    // taken for one of another layout at every takeover, and started again.
    assert!(
        !next.log_text().contains("another layout"),
        "{}",
        next.log_text()
    );
    assert_eq!(
        tproxy_tests::peer_seen_by(&topo.client, server.addr).unwrap(),
        Topo::router_as_seen_by_server(false)
    );
    next.stop().unwrap();
    cleanup_leaves_nothing(&topo, &bpffs);
}

#[test]
fn a_takeover_that_fails_leaves_the_old_instance_in_charge() {
    require_root();
    let topo = Topo::new().unwrap();
    let bpffs = Bpffs::new().unwrap();
    let server = slow_or_echo_server(&topo);
    let mut old = topo.tproxy(&pinned_args(&bpffs, &[])).unwrap();
    // Taken by someone else (no SO_REUSEPORT): the new instance fails after the handover
    // began, having opened the pinned maps.
    let _taken = topo
        .router
        .listen("127.0.0.1:9464".parse().unwrap())
        .unwrap();
    let (status, _, stderr) = run_tproxy_output(
        &topo.router,
        &pinned_args(
            &bpffs,
            &[
                "--iface",
                Topo::ROUTER_CLIENT_IFACE,
                "--metrics",
                "127.0.0.1:9464",
            ],
        )
        .iter()
        .fold(vec!["run"], |mut args, arg| {
            args.push(arg);
            args
        }),
    )
    .unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("--metrics 127.0.0.1:9464"), "{stderr}");
    old.wait_for_line(
        "did not take over; this one carries on",
        Duration::from_secs(5),
    )
    .unwrap();
    // The failed successor shared the old instance's lock (the same open file): it must
    // have let go of it without unlocking it for the old one.
    let (_, _, err) = run_tproxy_output(&topo.router, &["reload"]).unwrap();
    assert!(
        err.contains(&format!("tproxy (pid {}) rejected the reload", old.pid())),
        "{err}"
    );
    for _ in 0..3 {
        assert_eq!(echo_on_new_connection(&topo).join().unwrap(), Ok(()));
    }
    // The log is read by a thread of its own: wait for the lines before counting them.
    for _ in 0..3 {
        old.wait_for_line("relaying via", Duration::from_secs(5))
            .unwrap();
    }
    assert_eq!(old.log_text().matches("relaying via").count(), 3);
    old.stop().unwrap();
    drop(server);
    cleanup_leaves_nothing(&topo, &bpffs);
}

#[test]
fn a_restart_with_pin_keeps_a_long_transfer_and_serves_connections_made_during_it() {
    restart_under_load(true);
}

#[test]
fn an_upgrade_started_while_the_old_instance_runs_takes_over_and_the_old_one_drains() {
    restart_under_load(false);
}

/// Stops a pinned instance and checks what a new connection does while no process runs.
fn with_no_process(fail_mode: &str) -> (Topo, Bpffs, Server, Result<SocketAddr, String>) {
    require_root();
    let topo = Topo::new().unwrap();
    let bpffs = Bpffs::new().unwrap();
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let mut tproxy = topo
        .tproxy(&pinned_args(&bpffs, &["--fail-mode", fail_mode]))
        .unwrap();
    assert_eq!(
        tproxy_tests::peer_seen_by(&topo.client, server.addr).unwrap(),
        Topo::router_as_seen_by_server(false),
        "steered while running"
    );
    tproxy.stop().unwrap();
    assert!(tproxy.log_text().contains("steering stays in place"));
    // A start without --pin would run next to the pinned program: refused, nothing touched.
    let (status, _, stderr) = run_tproxy_output(
        &topo.router,
        &[
            "run",
            "--iface",
            Topo::ROUTER_CLIENT_IFACE,
            "--tcp",
            "80",
            "--pin-dir",
            bpffs.path(),
        ],
    )
    .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("start with --pin to take it over, or remove it with `tproxy cleanup`"),
        "{stderr}"
    );
    assert!(!bpffs.pinned().is_empty());
    let seen = topo
        .client
        .run({
            let addr = server.addr;
            move || -> Result<String, String> {
                let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                    .map_err(|e| e.kind().to_string())?;
                let mut text = String::new();
                stream
                    .read_to_string(&mut text)
                    .map_err(|e| e.to_string())?;
                Ok(text)
            }
        })
        .map(|text| SocketAddr::new(text.parse().unwrap(), 0));
    (topo, bpffs, server, seen)
}

#[test]
fn failing_open_passes_steered_traffic_untouched_while_no_process_runs() {
    let (topo, bpffs, _server, seen) = with_no_process("open");
    assert_eq!(
        seen.map(|addr| addr.ip()),
        Ok(Topo::client_ip(false)),
        "fail-open: the connection goes straight to the server"
    );
    cleanup_leaves_nothing(&topo, &bpffs);
}

#[test]
fn failing_closed_drops_steered_traffic_while_no_process_runs() {
    let (topo, bpffs, _server, seen) = with_no_process("closed");
    assert!(
        seen.is_err(),
        "fail-closed let a connection through: {seen:?}"
    );
    let (_, out, _) = run_tproxy_output(
        &topo.router,
        &["status", "--json", "--pin-dir", bpffs.path()],
    )
    .unwrap();
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["running"], false, "{report:#}");
    assert_eq!(report["pinned"]["fail_mode"], "closed", "{report:#}");
    let (_, text, _) =
        run_tproxy_output(&topo.router, &["status", "--pin-dir", bpffs.path()]).unwrap();
    assert!(
        text.contains("fail-closed: what steer rules take is dropped"),
        "{text}"
    );
    assert!(
        report["pinned"]["packets"]["tcp"]["no_listener"].as_u64() >= Some(1),
        "the dropped SYNs are counted: {report:#}"
    );
    // And the next start serves again at once.
    let mut tproxy = topo
        .tproxy(&pinned_args(&bpffs, &["--fail-mode", "closed"]))
        .unwrap();
    assert_eq!(
        tproxy_tests::peer_seen_by(&topo.client, Topo::server_addr(false, 80)).unwrap(),
        Topo::router_as_seen_by_server(false)
    );
    tproxy.stop().unwrap();
    cleanup_leaves_nothing(&topo, &bpffs);
}

#[test]
fn status_reports_the_running_instance_its_pinned_state_and_moving_counters() {
    require_root();
    let topo = Topo::new().unwrap();
    let bpffs = Bpffs::new().unwrap();
    let status = |json: bool| {
        let mut args = vec!["status", "--pin-dir", bpffs.path()];
        if json {
            args.push("--json");
        }
        run_tproxy_output(&topo.router, &args).unwrap()
    };
    let (code, out, _) = status(false);
    assert_eq!(code.code(), Some(3), "{out}");
    assert!(out.contains("not running"), "{out}");
    assert!(out.contains("pinned:     nothing"), "{out}");

    let server = Server::echo(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let mut tproxy = topo.tproxy(&pinned_args(&bpffs, &[])).unwrap();
    let read = |report: &serde_json::Value, path: &[&str]| {
        path.iter()
            .fold(report, |value, key| &value[*key])
            .as_u64()
            .unwrap_or_else(|| panic!("{path:?} in {report:#}"))
    };
    let (code, out, err) = status(true);
    assert!(code.success(), "{out}{err}");
    let before: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(read(&before, &["instance", "pid"]), u64::from(tproxy.pid()));
    assert_eq!(before["instance"]["phase"], "serving");
    assert_eq!(
        before["pinned"]["links"][0]["interface"],
        Topo::ROUTER_CLIENT_IFACE
    );
    assert_eq!(
        before["routing"].as_array().map(Vec::len),
        Some(4),
        "{before:#}"
    );
    for _ in 0..3 {
        let mut stream = topo.client.connect(server.addr).unwrap();
        stream.write_all(b"x").unwrap();
        let mut back = [0u8; 1];
        stream.read_exact(&mut back).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let (_, out, _) = status(true);
        let after: serde_json::Value = serde_json::from_str(&out).unwrap();
        if read(&after, &["instance", "tcp_relay", "accepted"]) >= 3 || Instant::now() > deadline {
            break after;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(read(&after, &["instance", "tcp_relay", "accepted"]), 3);
    for source in ["instance", "pinned"] {
        assert!(
            read(&after, &[source, "packets", "tcp", "steered_new"])
                >= read(&before, &[source, "packets", "tcp", "steered_new"]) + 3,
            "{source}: {after:#}"
        );
    }
    let (_, text, _) = status(false);
    for expected in [
        format!("running, pid {}", tproxy.pid()),
        "listener default: TCP".to_string(),
        "tcx link on to-client".to_string(),
        format!("fwmark 0x1000000/0x1000000 lookup {TABLE}"),
    ] {
        assert!(text.contains(&expected), "`{expected}` missing:\n{text}");
    }
    tproxy.stop().unwrap();
    cleanup_leaves_nothing(&topo, &bpffs);
}

/// What the churning clients saw.
#[derive(Debug, Default)]
struct Churn {
    proxied: u64,
    unproxied: u64,
    failed: Vec<String>,
    slowest: Duration,
}

/// Clients opening short connections back to back (each reads the address the server saw)
/// until `stop` is set.
fn churn(
    topo: &Topo,
    server: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<thread::JoinHandle<Churn>> {
    (0..4)
        .map(|_| {
            let stop = stop.clone();
            topo.client.run(move || {
                // Spawned inside the client's namespace: its sockets are made there.
                thread::spawn(move || {
                    let mut seen = Churn::default();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let started = Instant::now();
                        let result = TcpStream::connect_timeout(&server, Duration::from_secs(5))
                            .and_then(|mut stream| {
                                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                                let mut text = String::new();
                                stream.read_to_string(&mut text)?;
                                Ok(text)
                            });
                        seen.slowest = seen.slowest.max(started.elapsed());
                        match result {
                            Ok(text)
                                if text == Topo::router_as_seen_by_server(false).to_string() =>
                            {
                                seen.proxied += 1
                            }
                            Ok(_) => seen.unproxied += 1,
                            Err(error) => seen.failed.push(error.to_string()),
                        }
                        thread::sleep(Duration::from_millis(5));
                    }
                    seen
                })
            })
        })
        .collect()
}

#[test]
fn under_connection_churn_an_upgrade_and_a_restart_fail_no_connection_and_proxy_every_one() {
    require_root();
    let topo = Topo::new().unwrap();
    let bpffs = Bpffs::new().unwrap();
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let args = pinned_args(&bpffs, &["--fail-mode", "closed", "--drain-timeout", "10s"]);
    let mut first = topo.tproxy(&args).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = churn(&topo, server.addr, stop.clone());
    thread::sleep(Duration::from_secs(1));

    // Upgrade: the new instance starts while the old one serves.
    let started = Instant::now();
    let mut second = topo.tproxy(&args).unwrap();
    let upgrade_ready = started.elapsed();
    assert!(first.wait(Duration::from_secs(15)).unwrap().success());
    thread::sleep(Duration::from_secs(1));

    // Restart: stop, then start. In between, new SYNs are dropped (fail-closed) and the
    // clients' retransmissions reach the next instance.
    let started = Instant::now();
    second.stop().unwrap();
    let mut third = topo.tproxy(&args).unwrap();
    let restart_ready = started.elapsed();
    thread::sleep(Duration::from_secs(2));

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = Churn::default();
    for client in clients {
        let seen = client.join().unwrap();
        total.proxied += seen.proxied;
        total.unproxied += seen.unproxied;
        total.failed.extend(seen.failed);
        total.slowest = total.slowest.max(seen.slowest);
    }
    println!(
        "churn across an upgrade (new instance ready {upgrade_ready:?} after its start) and a \
         restart (ready {restart_ready:?} after the SIGTERM): {} proxied, {} unproxied, {} failed, \
         slowest {:?}",
        total.proxied,
        total.unproxied,
        total.failed.len(),
        total.slowest
    );
    assert_eq!(total.failed, Vec::<String>::new());
    assert_eq!(total.unproxied, 0);
    assert!(total.proxied > 100, "{total:?}");
    third.stop().unwrap();
    cleanup_leaves_nothing(&topo, &bpffs);
}

/// Replaces the pinned map `name` of the instance in `bpffs` with an empty one of another
/// layout, as an earlier version would have left it.
fn pin_earlier_layout(bpffs: &Bpffs, name: &str, kind: &str, value_size: u32, entries: u32) {
    let pinned = bpffs
        .pinned()
        .into_iter()
        .find(|path| path.ends_with(&format!("/{name}")))
        .unwrap_or_else(|| panic!("{name} is pinned: {:?}", bpffs.pinned()));
    let path = std::path::Path::new(bpffs.path()).join(pinned);
    std::fs::remove_file(&path).unwrap();
    let status = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&path)
        .args(["type", kind, "key", "4", "value", &value_size.to_string()])
        .args(["entries", &entries.to_string(), "name", name])
        .status()
        .expect("running bpftool");
    assert!(status.success(), "bpftool map create {name}");
}

/// An upgrade over the pinned maps of an earlier version whose layouts differ (the rules
/// tried one by one before source ports, the counters before the `dropped` outcome): they
/// are replaced, not handed to a program that cannot use them, and steering goes on.
#[test]
fn pinned_maps_of_an_earlier_layout_are_replaced_when_adopted() {
    require_root();
    let topo = Topo::new().unwrap();
    let bpffs = Bpffs::new().unwrap();
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let args = pinned_args(&bpffs, &[]);
    let mut killed = topo.tproxy(&args).unwrap();
    killed.signal_and_wait(Signal::SIGKILL).unwrap();
    pin_earlier_layout(&bpffs, "MARK_RULES", "array", 4 + 104 * 32, 2);
    pin_earlier_layout(&bpffs, "COUNTERS", "percpu_array", 8, 3 * 15);
    let mut next = topo.tproxy(&args).unwrap();
    let log = next.log_text();
    assert!(
        log.contains("the pinned rules tried one by one have another layout (3332 bytes an entry")
            && log.contains("the pinned packet counters have another layout (45 entries"),
        "{log}"
    );
    assert_eq!(
        tproxy_tests::peer_seen_by(&topo.client, server.addr).unwrap(),
        Topo::router_as_seen_by_server(false)
    );
    next.stop().unwrap();
    cleanup_leaves_nothing(&topo, &bpffs);
}

/// The inode of network namespace `netns`, which names its pinned state's directory.
fn netns_inode(netns: &Netns) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/run/netns/{}", netns.name))
        .unwrap()
        .ino()
}

/// A namespace of its own where an instance ran with `--pin` and stopped, leaving its state
/// pinned under `bpffs`, and that state's directory.
fn pinned_in_a_namespace(bpffs: &Bpffs, name: &str) -> (Netns, std::path::PathBuf) {
    let netns = Netns::new(name).unwrap();
    netns
        .ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"])
        .unwrap();
    netns.ip(&["link", "set", "d0", "up"]).unwrap();
    let args = [
        "--iface",
        "d0",
        "--tcp",
        "80",
        "--pin",
        "--pin-dir",
        bpffs.path(),
    ];
    let mut tproxy = Tproxy::start(&netns, &args).unwrap();
    tproxy.stop().unwrap();
    let dir = std::path::Path::new(bpffs.path())
        .join(format!("netns-{}-table-{TABLE}", netns_inode(&netns)));
    assert!(
        dir.join("sk-lookup").exists(),
        "nothing pinned in {}",
        dir.display()
    );
    (netns, dir)
}

/// Waits until the kernel, tearing a namespace down in the background, has detached the
/// sk_lookup link pinned in `dir`.
fn wait_until_detached(dir: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = std::process::Command::new("bpftool")
            .args(["link", "show", "pinned"])
            .arg(dir.join("sk-lookup"))
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("netns_ino 0") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the namespace's link stayed attached"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// State pinned by a namespace that no longer exists is removed, not adopted: when the
/// kernel gives the dead namespace's inode number to a new one, the new one finds that
/// directory under its own name (simulated by renaming it), and a start with `--pin` must
/// not take over maps and links that steer nothing; another dead namespace's state is
/// removed too (it held its maps in kernel memory for good), and `cleanup` removes such
/// state as well.
#[test]
fn pinned_state_of_a_namespace_that_no_longer_exists_is_removed_not_adopted() {
    require_root();
    let bpffs = Bpffs::new().unwrap();
    // Both pinned before either goes: a start removes dead namespaces' state.
    let (first, reused) = pinned_in_a_namespace(&bpffs, "gone-reused");
    let (second, other) = pinned_in_a_namespace(&bpffs, "gone-other");
    drop((first, second));
    wait_until_detached(&reused);
    wait_until_detached(&other);
    let topo = Topo::new().unwrap();
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let own = std::path::Path::new(bpffs.path())
        .join(format!("netns-{}-table-{TABLE}", netns_inode(&topo.router)));
    std::fs::rename(&reused, &own).unwrap();

    let mut tproxy = topo.tproxy(&pinned_args(&bpffs, &[])).unwrap();
    let log = tproxy.log_text();
    assert!(
        !log.contains("adopted from the pinned state"),
        "adopted a dead namespace's state: {log}"
    );
    assert_eq!(
        log.matches("its network namespace no longer exists")
            .count(),
        2,
        "{log}"
    );
    assert!(!other.exists(), "the other dead namespace's state stayed");
    assert_eq!(
        tproxy_tests::peer_seen_by(&topo.client, server.addr).unwrap(),
        Topo::router_as_seen_by_server(false),
        "not steered"
    );
    tproxy.stop().unwrap();
    cleanup_leaves_nothing(&topo, &bpffs);

    // `cleanup` removes a dead namespace's state too, naming it.
    let (third, cleaned) = pinned_in_a_namespace(&bpffs, "gone-cleaned");
    drop(third);
    wait_until_detached(&cleaned);
    let (status, out, err) =
        run_tproxy_output(&topo.router, &["cleanup", "--pin-dir", bpffs.path()]).unwrap();
    assert!(status.success(), "{out}{err}");
    assert!(
        out.contains("removed the pinned state of 1 instances in network namespaces"),
        "{out}{err}"
    );
    assert_eq!(bpffs.pinned(), Vec::<String>::new());
}

/// The path of the pinned object of the instance in `bpffs` whose file name begins with
/// `name`.
fn pinned_path(bpffs: &Bpffs, name: &str) -> std::path::PathBuf {
    let pinned = bpffs
        .pinned()
        .into_iter()
        .find(|path| {
            path.rsplit('/')
                .next()
                .is_some_and(|file| file.starts_with(name))
        })
        .unwrap_or_else(|| panic!("{name} is pinned: {:?}", bpffs.pinned()));
    std::path::Path::new(bpffs.path()).join(pinned)
}

/// The generation in force, from the pinned `ACTIVE_GENERATION` array.
fn generation_in_force(map: &aya::maps::Map) -> u32 {
    aya::maps::Array::<_, u32>::try_from(map)
        .unwrap()
        .get(&0, 0)
        .unwrap()
}

/// The id of the program on a pinned link.
fn link_program(link: &aya::programs::links::FdLink) -> u32 {
    link.info().unwrap().program_id()
}

/// An instance that adopts pinned state switches to its rules only once its own program is
/// on the adopted link: the predecessor's program, perhaps of an older version, would
/// misread them (a verdict it does not know reads as no rule: the direction guard's, which
/// keeps replies from steer rules, would let them be steered). Watched from outside, as the
/// generation in force and the link's program sampled while the new instance starts.
#[test]
fn an_adopting_instance_puts_its_rules_in_force_only_after_its_program_replaced_the_old_one() {
    require_root();
    let topo = Topo::new().unwrap();
    let bpffs = Bpffs::new().unwrap();
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let args = pinned_args(&bpffs, &[]);
    let mut old = topo.tproxy(&args).unwrap();
    let old_program = pinned_program(&topo, &bpffs) as u32;
    old.stop().unwrap();
    let generation = aya::maps::MapData::from_pin(pinned_path(&bpffs, "ACTIVE_GENERATION"))
        .map(aya::maps::Map::Array)
        .unwrap();
    let link: aya::programs::links::FdLink =
        aya::programs::links::PinnedLink::from_pin(pinned_path(&bpffs, "tc-ingress-"))
            .unwrap()
            .into();
    let old_generation = generation_in_force(&generation);
    assert_eq!(link_program(&link), old_program);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        thread::spawn(move || {
            let (mut samples, mut misread) = (0u64, 0u64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                // The generation first: both only ever change from old to new, so a new
                // generation followed by the old program proves they were in place together.
                let in_force = generation_in_force(&generation);
                let program = link_program(&link);
                samples += 1;
                misread += u64::from(in_force != old_generation && program == old_program);
            }
            (
                samples,
                misread,
                generation_in_force(&generation),
                link_program(&link),
            )
        })
    };
    let mut new = topo.tproxy(&args).unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (samples, misread, in_force, program) = sampler.join().unwrap();
    assert_ne!(in_force, old_generation, "the new rules are in force");
    assert_ne!(program, old_program, "the new program is on the link");
    assert!(samples > 1000, "{samples} samples");
    assert_eq!(
        misread, 0,
        "{misread} of {samples} samples saw the new rules in force under the old program"
    );
    // And it steers.
    assert_eq!(
        tproxy_tests::peer_seen_by(&topo.client, server.addr).unwrap(),
        Topo::router_as_seen_by_server(false)
    );
    new.stop().unwrap();
    cleanup_leaves_nothing(&topo, &bpffs);
}

/// An instance that adopts pinned state and cannot load its rules (more than the pinned maps
/// hold) fails before it touches a link: the predecessor's program stays on it, steering
/// with the predecessor's rules, rather than its own reading them.
#[test]
fn an_adopting_instance_whose_rules_do_not_fit_leaves_the_links_as_they_were() {
    require_root();
    let topo = Topo::new().unwrap();
    let bpffs = Bpffs::new().unwrap();
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let mut old = topo.tproxy(&pinned_args(&bpffs, &[])).unwrap();
    let old_program = pinned_program(&topo, &bpffs);
    old.stop().unwrap();
    // Sized at 1024 entries by the first instance's single rule.
    let prefixes: Vec<String> = (0..1100)
        .map(|i| format!("\"10.{}.{}.0/24\"", 100 + i / 256, i % 256))
        .collect();
    let config = tproxy_tests::ConfigFile::new(&format!(
        "[[rule]]\nproto = \"tcp\"\ndst = [{}]\naction = \"bypass\"\n",
        prefixes.join(", ")
    ))
    .unwrap();
    let mut args = vec![
        "run",
        "--iface",
        Topo::ROUTER_CLIENT_IFACE,
        "--config",
        config.path(),
    ];
    args.extend(pinned_args(&bpffs, &[]));
    let (status, _, stderr) = run_tproxy_output(&topo.router, &args).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("more than the 1024 the pinned maps hold")
            && stderr.contains("tproxy cleanup"),
        "{stderr}"
    );
    assert_eq!(pinned_program(&topo, &bpffs), old_program, "{stderr}");
    // What it left can be adopted as ever.
    let mut next = topo.tproxy(&pinned_args(&bpffs, &[])).unwrap();
    assert_eq!(
        tproxy_tests::peer_seen_by(&topo.client, server.addr).unwrap(),
        Topo::router_as_seen_by_server(false)
    );
    next.stop().unwrap();
    cleanup_leaves_nothing(&topo, &bpffs);
}
