//! tproxy's image (`cargo xtask image`, deploy/Containerfile) built and run by a real engine
//! the way the DaemonSet runs it: host network, only the README's capabilities, the rootfs
//! read-only, a bpf filesystem and /run/tproxy mounted, `docker stop` draining, `docker
//! restart` adopting the pinned state, `docker exec … tproxy status`, the logs in `docker
//! logs`. Containers on a user-defined bridge network make real requests through it.
//!
//! Each test starts a `dockerd` of its own inside a namespace of its own ([`Engine`]); that
//! namespace plays the container host. The servers live in a further namespace, routed
//! through the engine's over a veth pair: the containers' requests are routed, not bridged.

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use tproxy_tests::{
    containers::{build_busybox_image, build_tproxy_image, Docker, Engine, IMAGE},
    ingress_program_id, ingress_programs, links_of_program, require_root, routing_state,
    run_tproxy_output, stat, tproxy_bin, Bpffs, InstanceStatus, Netns, Server, DEFAULT_TABLE,
};

/// The containers' bridge network; the engine's namespace is its gateway (.1).
const CONTAINER_SUBNET: &str = "10.251.0.0/24";
const CLIENT_IP: &str = "10.251.0.50";
const SERVER_CONTAINER_IP: &str = "10.251.0.60";
/// The veth between the engine's namespace (.1) and the servers' (.2).
const ENGINE_TO_SERVERS: &str = "10.252.0.1";
const SERVERS: &str = "10.252.0.2";
const CLIENT_IMAGE: &str = "tproxy-test-client:latest";

/// The capabilities the README lists, in the form this engine accepts.
fn capabilities(docker: &Docker) -> Vec<&'static str> {
    let modern = ["BPF", "PERFMON", "NET_ADMIN", "NET_BIND_SERVICE", "NET_RAW"];
    // Engines whose capability list predates CAP_BPF/CAP_PERFMON (Docker 20.10) refuse them
    // by name; CAP_SYS_ADMIN covers both there (and their seccomp profile allows bpf() and
    // perf_event_open() only with it).
    let legacy = ["SYS_ADMIN", "NET_ADMIN", "NET_BIND_SERVICE", "NET_RAW"];
    let mut probe = vec!["run", "--rm", "--cap-drop", "ALL"];
    for cap in modern {
        probe.extend(["--cap-add", cap]);
    }
    probe.extend([IMAGE, "--version"]);
    match docker.run(&probe) {
        Ok(_) => modern.to_vec(),
        Err(error) if error.to_string().contains("unknown capability") => {
            eprintln!("this engine does not know CAP_BPF/CAP_PERFMON: running with CAP_SYS_ADMIN");
            legacy.to_vec()
        }
        Err(error) => panic!("the capability probe failed: {error:#}"),
    }
}

/// The container host: the engine, tproxy's image and the client's, a bridge network, the
/// servers' namespace routed through the host, and the directories mounted into tproxy's
/// container.
struct Host {
    engine: Engine,
    servers: Netns,
    network: String,
    /// The network's bridge device, `br-<network id>`: what tproxy's `--iface` names.
    bridge: String,
    capabilities: Vec<&'static str>,
    bpffs: Bpffs,
    /// Mounted at /run/tproxy: the instance lock and control socket.
    run_dir: PathBuf,
}

impl Host {
    fn new() -> Host {
        require_root();
        let engine = Engine::start().expect("starting a container engine");
        build_tproxy_image(
            &engine.docker,
            &tproxy_bin(),
            &engine.scratch_dir("tproxy-image").unwrap(),
        )
        .expect("building the tproxy image");
        build_busybox_image(
            &engine.docker,
            CLIENT_IMAGE,
            &engine.scratch_dir("client-image").unwrap(),
        )
        .expect("building the client image");
        let capabilities = capabilities(&engine.docker);
        let network = format!("tpx-{}", std::process::id());
        // Without masquerading, a request that is not steered reaches the servers from the
        // container's own address, so "the server sees tproxy" means something.
        let id = engine
            .docker
            .run(&[
                "network",
                "create",
                "--subnet",
                CONTAINER_SUBNET,
                "--opt",
                "com.docker.network.bridge.enable_ip_masquerade=false",
                &network,
            ])
            .unwrap();
        let bridge = format!("br-{}", &id[..12]);
        let servers = Netns::new("servers").unwrap();
        engine
            .netns
            .ip(&[
                "link",
                "add",
                "to-servers",
                "type",
                "veth",
                "peer",
                "name",
                "to-host",
                "netns",
                &servers.name,
            ])
            .unwrap();
        engine
            .netns
            .ip(&[
                "addr",
                "add",
                &format!("{ENGINE_TO_SERVERS}/24"),
                "dev",
                "to-servers",
            ])
            .unwrap();
        engine
            .netns
            .ip(&["link", "set", "to-servers", "up"])
            .unwrap();
        servers
            .ip(&["addr", "add", &format!("{SERVERS}/24"), "dev", "to-host"])
            .unwrap();
        servers.ip(&["link", "set", "to-host", "up"]).unwrap();
        servers
            .ip(&["route", "add", "default", "via", ENGINE_TO_SERVERS])
            .unwrap();
        let bpffs = Bpffs::new().unwrap();
        let run_dir = engine.scratch_dir("run-tproxy").unwrap();
        Host {
            engine,
            servers,
            network,
            bridge,
            capabilities,
            bpffs,
            run_dir,
        }
    }

    fn docker(&self, args: &[&str]) -> anyhow::Result<String> {
        self.engine.docker.run(args)
    }

    /// `docker run` of the image with `args` the way the DaemonSet runs it, as `name`; waits
    /// for its "ready" line.
    fn run_tproxy(&self, name: &str, args: &[&str]) {
        let bpf = format!("{}:/sys/fs/bpf", self.bpffs.path());
        let run = format!("{}:/run/tproxy", self.run_dir.display());
        let mut command = vec![
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            "host",
            "--read-only",
            "--cap-drop",
            "ALL",
        ];
        for cap in &self.capabilities {
            command.extend(["--cap-add", cap]);
        }
        command.extend(["--volume", &bpf, "--volume", &run, IMAGE]);
        command.extend(args);
        self.docker(&command).unwrap();
        self.wait_for_log(name, "ready:");
    }

    /// What the container wrote so far (stdout and stderr, as `docker logs` gives them).
    fn logs(&self, name: &str) -> String {
        let output = self
            .engine
            .docker
            .command(&["logs", name])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    fn wait_for_log(&self, name: &str, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.logs(name).contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no `{needle}` from {name}: {}",
                self.logs(name)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `tproxy status --json` through `docker exec`.
    fn status(&self, name: &str) -> InstanceStatus {
        let text = self
            .docker(&["exec", name, "/usr/local/bin/tproxy", "status", "--json"])
            .unwrap();
        let report: serde_json::Value = serde_json::from_str(&text).unwrap();
        serde_json::from_value(report["instance"].clone())
            .unwrap_or_else(|e| panic!("{e}: {report:#}"))
    }

    fn relayed(&self, name: &str) -> u64 {
        stat(&self.status(name).stats, "tcp relay", "accepted").unwrap()
    }

    /// `wget` from a client container on the bridge network; the body it got.
    fn fetch(&self, url: &str) -> String {
        self.fetch_from(&self.network, CLIENT_IP, url)
    }

    /// `wget` from a client container at `ip` on `network`; the body it got.
    fn fetch_from(&self, network: &str, ip: &str, url: &str) -> String {
        self.docker(&[
            "run",
            "--rm",
            "--network",
            network,
            "--ip",
            ip,
            CLIENT_IMAGE,
            "wget",
            "-q",
            "-O",
            "-",
            url,
        ])
        .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Creates the bridge network `name` of `subnet`, without masquerading as in
    /// [`Host::new`]; its bridge device's name.
    fn create_network(&self, name: &str, subnet: &str) -> String {
        let id = self
            .docker(&[
                "network",
                "create",
                "--subnet",
                subnet,
                "--opt",
                "com.docker.network.bridge.enable_ip_masquerade=false",
                name,
            ])
            .unwrap();
        format!("br-{}", &id[..12])
    }

    /// Nothing of a tproxy instance is left in the host's namespace or directories.
    fn assert_nothing_left(&self) {
        assert_eq!(
            ingress_programs(&self.engine.netns, &self.bridge).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            routing_state(&self.engine.netns, DEFAULT_TABLE).unwrap(),
            ""
        );
        assert_eq!(self.bpffs.pinned(), Vec::<String>::new());
        let files: Vec<_> = std::fs::read_dir(&self.run_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(files.is_empty(), "left in /run/tproxy: {files:?}");
    }
}

/// An HTTP server that answers every request with the address it sees the request from.
fn peer_server(netns: &Netns, port: u16) -> Server {
    let addr = SocketAddr::new(SERVERS.parse().unwrap(), port);
    Server::start(netns, addr, |mut stream| {
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request);
        if let Ok(peer) = stream.peer_addr() {
            let _ = write!(stream, "HTTP/1.0 200 OK\r\n\r\n{}", peer.ip());
        }
    })
    .unwrap()
}

#[test]
fn the_image_runs_as_the_daemonset_runs_it_and_docker_stop_drains_and_leaves_nothing() {
    let host = Host::new();
    let echo = Server::echo(&host.servers, SocketAddr::new(SERVERS.parse().unwrap(), 80)).unwrap();
    host.run_tproxy("tproxy", &["run", "--iface", &host.bridge, "--tcp", "80"]);
    let logs = host.logs("tproxy");
    assert!(
        logs.contains(&format!("ready: 1 rules on {}", host.bridge)),
        "{logs}"
    );
    assert_eq!(host.relayed("tproxy"), 0);

    // What `doctor` says about this host (run from the host: the image has no iptables).
    let (_, report, _) =
        run_tproxy_output(&host.engine.netns, &["doctor", "--iface", &host.bridge]).unwrap();
    for expected in [
        "warning the IPv4 FORWARD policy is DROP (Docker sets it".to_string(),
        format!("fix: iptables -I DOCKER-USER -i {} -j ACCEPT", host.bridge),
        "warning br_netfilter hands the frames bridges switch to iptables".to_string(),
        format!("warning {} is a bridge", host.bridge),
    ] {
        assert!(report.contains(&expected), "{expected} not in {report}");
    }
    assert_eq!(
        ingress_programs(&host.engine.netns, &host.bridge).unwrap(),
        vec!["tproxy_ingress".to_string()]
    );

    // A connection in flight while `docker stop` runs: a namespace of the test's own, plugged
    // into the bridge like a container, so the test holds the socket.
    let lan = Netns::new("lan").unwrap();
    host.engine
        .netns
        .ip(&[
            "link", "add", "to-lan", "type", "veth", "peer", "name", "eth0", "netns", &lan.name,
        ])
        .unwrap();
    host.engine
        .netns
        .ip(&["link", "set", "to-lan", "master", &host.bridge, "up"])
        .unwrap();
    lan.ip(&["addr", "add", "10.251.0.70/24", "dev", "eth0"])
        .unwrap();
    lan.ip(&["link", "set", "eth0", "up"]).unwrap();
    lan.ip(&["route", "add", "default", "via", "10.251.0.1"])
        .unwrap();
    let mut stream: TcpStream = lan.connect(echo.addr).unwrap();
    stream.write_all(b"before").unwrap();
    let mut before = [0u8; 6];
    stream.read_exact(&mut before).unwrap();
    assert_eq!(
        echo.peers()[0].ip(),
        ENGINE_TO_SERVERS.parse::<IpAddr>().unwrap()
    );

    // The DaemonSet's grace period, so the drain is not cut short.
    let docker = host.engine.docker.clone();
    let stop = std::thread::spawn(move || docker.run(&["stop", "--time", "40", "tproxy"]));
    host.wait_for_log("tproxy", "stopping: draining");
    stream.write_all(b"during the drain").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut echoed = String::new();
    stream.read_to_string(&mut echoed).unwrap();
    assert_eq!(echoed, "during the drain");
    stop.join().unwrap().unwrap();
    let exit = host
        .docker(&["inspect", "--format", "{{.State.ExitCode}}", "tproxy"])
        .unwrap();
    assert_eq!(exit, "0", "{}", host.logs("tproxy"));
    host.assert_nothing_left();
}

#[test]
fn containers_on_a_bridge_network_are_steered_and_docker_restart_adopts_the_pinned_state() {
    let host = Host::new();
    let _steered = peer_server(&host.servers, 80);
    let _not_steered = peer_server(&host.servers, 8080);
    host.run_tproxy(
        "tproxy",
        &["run", "--iface", &host.bridge, "--tcp", "80", "--pin"],
    );

    // The client dialled 10.252.0.2 and got its answer from there (wget would fail on a
    // connection to anything else); the server saw tproxy's connection from the host.
    let seen = host.fetch(&format!("http://{SERVERS}/"));
    assert_eq!(seen, ENGINE_TO_SERVERS);
    assert_eq!(host.relayed("tproxy"), 1);
    // A port tproxy does not steer is routed as before: the server sees the container.
    let seen = host.fetch(&format!("http://{SERVERS}:8080/"));
    assert_eq!(seen, CLIENT_IP);
    assert_eq!(host.relayed("tproxy"), 1);

    // Container to container on the same bridge is switched at layer 2: it never reaches the
    // bridge device's ingress hook, so it is not steered (README, "On a container host").
    host.docker(&[
        "run",
        "--detach",
        "--name",
        "web",
        "--network",
        &host.network,
        "--ip",
        SERVER_CONTAINER_IP,
        CLIENT_IMAGE,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ])
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let attempt = host.docker(&[
            "run",
            "--rm",
            "--network",
            &host.network,
            "--ip",
            CLIENT_IP,
            CLIENT_IMAGE,
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{SERVER_CONTAINER_IP}/cgi-bin/peer"),
        ]);
        match attempt {
            Ok(seen) => break seen,
            Err(error) if Instant::now() > deadline => panic!("{error:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    // busybox httpd writes an IPv4 peer as "[::ffff:a.b.c.d]".
    let seen = seen
        .trim()
        .trim_start_matches("[::ffff:")
        .trim_end_matches(']');
    assert_eq!(seen, CLIENT_IP);
    assert_eq!(host.relayed("tproxy"), 1);

    host.docker(&["restart", "--time", "40", "tproxy"]).unwrap();
    host.wait_for_log("tproxy", "adopted from the pinned state");
    // `docker logs` keeps both runs: the second "ready" is the restarted one's.
    let deadline = Instant::now() + Duration::from_secs(30);
    while host.logs("tproxy").matches("ready:").count() < 2 {
        assert!(Instant::now() < deadline, "{}", host.logs("tproxy"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = host.fetch(&format!("http://{SERVERS}/"));
    assert_eq!(seen, ENGINE_TO_SERVERS);
    assert_eq!(
        host.relayed("tproxy"),
        1,
        "the restarted instance relayed it"
    );

    // --pin leaves the steering in place when the container stops; `tproxy cleanup` from
    // the same image removes it.
    host.docker(&["stop", "--time", "40", "tproxy"]).unwrap();
    assert_eq!(
        ingress_programs(&host.engine.netns, &host.bridge).unwrap(),
        vec!["tproxy_ingress".to_string()]
    );
    let bpf = format!("{}:/sys/fs/bpf", host.bpffs.path());
    let run = format!("{}:/run/tproxy", host.run_dir.display());
    let mut cleanup = vec!["run", "--rm", "--network", "host", "--cap-drop", "ALL"];
    for cap in &host.capabilities {
        cleanup.extend(["--cap-add", cap]);
    }
    cleanup.extend(["--volume", &bpf, "--volume", &run, IMAGE, "cleanup"]);
    host.docker(&cleanup).unwrap();
    host.assert_nothing_left();
}

#[test]
fn a_bridge_network_created_after_start_is_steered_and_its_removal_leaves_nothing() {
    let host = Host::new();
    let _steered = peer_server(&host.servers, 80);
    host.run_tproxy("tproxy", &["run", "--iface", "br-*", "--tcp", "80"]);
    let first = format!("{} (tcx)", host.bridge);
    assert_eq!(host.status("tproxy").attached, vec![first.clone()]);
    let program = ingress_program_id(&host.engine.netns, &host.bridge).unwrap();
    assert_eq!(links_of_program(program), 1);

    // A network (and so a bridge) created while tproxy runs, and a container on it.
    let late_network = format!("tpx-late-{}", std::process::id());
    let late_bridge = host.create_network(&late_network, "10.253.0.0/24");
    host.wait_for_log("tproxy", &format!("attached to {late_bridge}"));
    assert_eq!(links_of_program(program), 2);
    let seen = host.fetch_from(&late_network, "10.253.0.50", &format!("http://{SERVERS}/"));
    assert_eq!(
        seen, ENGINE_TO_SERVERS,
        "the late network's request is relayed"
    );
    assert_eq!(host.relayed("tproxy"), 1);

    host.docker(&["network", "rm", &late_network]).unwrap();
    host.wait_for_log("tproxy", &format!("detached from {late_bridge}"));
    let status = host.status("tproxy");
    assert_eq!(status.attached, vec![first]);
    let interfaces = status.stats.interfaces.unwrap();
    assert_eq!(
        (
            interfaces.attach_events,
            interfaces.detach_events,
            interfaces.attach_failures
        ),
        (2, 1, 0),
        "{interfaces:?}"
    );
    assert_eq!(
        links_of_program(program),
        1,
        "the removed bridge's link is left"
    );
    // The first network still steered.
    assert_eq!(host.fetch(&format!("http://{SERVERS}/")), ENGINE_TO_SERVERS);
    assert_eq!(host.relayed("tproxy"), 2);

    host.docker(&["stop", "--time", "40", "tproxy"]).unwrap();
    assert_eq!(links_of_program(program), 0);
    host.assert_nothing_left();
}
