//! The deployment recipes, checked with what runs here: systemd readiness over a real
//! notify socket, the unit through `systemd-analyze verify`, the Kubernetes manifest parsed
//! and its configuration through `tproxy check`, the Containerfile's paths. (The image is
//! built and run by a real engine in tests/tests/containers.rs; no cluster runs here.)

use std::{os::unix::net::UnixDatagram, process::Command, time::Duration};

use tproxy_tests::{require_root, tproxy_bin, tproxy_with_input, RouterTopology as Topo, Tproxy};

fn repo(path: &str) -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    std::fs::read_to_string(format!("{root}/{path}")).unwrap()
}

#[test]
fn tproxy_tells_systemd_when_it_is_ready_and_when_it_stops() {
    require_root();
    let topo = Topo::new().unwrap();
    let path = std::env::temp_dir().join(format!("tproxy-notify-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let notify = format!("NOTIFY_SOCKET={}", path.display());
    let mut tproxy = Tproxy::start_wrapped(
        &topo.router,
        &["env", &notify],
        &["--iface", Topo::ROUTER_CLIENT_IFACE, "--tcp", "80"],
    )
    .unwrap();
    let mut message = [0u8; 256];
    let len = socket.recv(&mut message).unwrap();
    assert_eq!(&message[..len], b"READY=1\n");
    tproxy.stop().unwrap();
    let len = socket.recv(&mut message).unwrap();
    assert_eq!(&message[..len], b"STOPPING=1\n");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = repo("deploy/systemd/tproxy.service")
        .replace("/usr/local/bin/tproxy", tproxy_bin().to_str().unwrap());
    let dir = std::env::temp_dir().join(format!("tproxy-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tproxy.service");
    std::fs::write(&path, unit).unwrap();
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (cargo xtask setup installs it)");
    let _ = std::fs::remove_dir_all(&dir);
    let complaints = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && complaints.trim().is_empty(),
        "{complaints}"
    );
}

#[test]
fn the_kubernetes_manifest_parses_needs_no_privileged_mode_and_its_config_checks() {
    // Parsed with PyYAML; prints what the test compares.
    let script = r#"
import json, sys, yaml
docs = list(yaml.safe_load_all(open(sys.argv[1])))
config = next(d for d in docs if d["kind"] == "ConfigMap")
daemonset = next(d for d in docs if d["kind"] == "DaemonSet")
pod = daemonset["spec"]["template"]["spec"]
container = pod["containers"][0]
print(json.dumps({
    "kinds": [d["kind"] for d in docs],
    "hostNetwork": pod["hostNetwork"],
    "privileged": container["securityContext"]["privileged"],
    "add": container["securityContext"]["capabilities"]["add"],
    "drop": container["securityContext"]["capabilities"]["drop"],
    "liveness": container["livenessProbe"]["httpGet"]["path"],
    "readiness": container["readinessProbe"]["httpGet"]["path"],
    "args": container["args"],
    "mounts": [m["mountPath"] for m in container["volumeMounts"]],
    "grace": pod["terminationGracePeriodSeconds"],
    "config": config["data"]["tproxy.toml"],
}))
"#;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/daemonset.yaml"
    );
    let output = Command::new("python3")
        .args(["-c", script, path])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    for expected in [
        r#""kinds": ["ConfigMap", "DaemonSet"]"#,
        r#""hostNetwork": true"#,
        r#""privileged": false"#,
        r#""add": ["BPF", "PERFMON", "NET_ADMIN", "NET_BIND_SERVICE", "NET_RAW"]"#,
        r#""drop": ["ALL"]"#,
        r#""liveness": "/healthz""#,
        r#""readiness": "/readyz""#,
        r#""args": ["run", "--config", "/etc/tproxy/tproxy.toml", "--metrics", "0.0.0.0:9464", "--pin"]"#,
        r#""/etc/tproxy", "/run/tproxy", "/sys/fs/bpf""#,
        r#""grace": 40"#,
    ] {
        assert!(text.contains(expected), "{expected} not in {text}");
    }
    // The embedded configuration is valid.
    let config = text.split(r#""config": "#).nth(1).unwrap();
    let config: String = config
        .trim_end()
        .trim_end_matches('}')
        .trim()
        .trim_matches('"')
        .replace("\\n", "\n")
        .replace("\\\"", "\"");
    let file = std::env::temp_dir().join(format!("tproxy-k8s-{}.toml", std::process::id()));
    std::fs::write(&file, config).unwrap();
    let (status, stdout, stderr) =
        tproxy_with_input(&["check", "--config", file.to_str().unwrap()], "").unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(status.success(), "{stdout}{stderr}");
}

#[test]
fn the_containerfile_packages_the_built_binary_and_matches_the_manifest() {
    // `cargo xtask image` builds it and tests/tests/containers.rs runs it; here, what those
    // rely on: no base image to pull, the rootfs/ the build context holds, the entry point.
    let containerfile = repo("deploy/Containerfile");
    assert!(containerfile.contains("FROM scratch\n"));
    assert!(containerfile.contains("COPY rootfs/ /\n"));
    assert!(containerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/tproxy"]"#));
    assert!(containerfile.contains(
        r#"CMD ["run", "--config", "/etc/tproxy/tproxy.toml", "--metrics", "0.0.0.0:9464"]"#
    ));
}

/// Whole seconds of a duration as tproxy and systemd write these ("30s", "20").
fn seconds(text: &str) -> u64 {
    text.trim().trim_end_matches('s').parse().unwrap()
}

/// The drain `args` ask for, or the default that `tproxy run --help` states.
fn drain_of(args: &str) -> u64 {
    if let Some(after) = args.split("--drain-timeout").nth(1) {
        let value = after.trim_start_matches([' ', '"', ',']);
        return seconds(value.split(['"', ' ']).next().unwrap());
    }
    let (status, help, _) = tproxy_with_input(&["run", "--help"], "").unwrap();
    assert!(status.success());
    let after = help.split("--drain-timeout").nth(1).unwrap();
    let default = after.split("[default: ").nth(1).unwrap();
    seconds(default.split(']').next().unwrap())
}

#[test]
fn the_service_managers_wait_for_the_drain_before_they_kill() {
    // What stopping takes beyond the drain: resetting what is left (at most 2 s), the rest.
    const MARGIN: u64 = 5;
    let unit = repo("deploy/systemd/tproxy.service");
    let setting = |key: &str| {
        unit.lines()
            .find_map(|line| line.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the unit"))
            .to_string()
    };
    let (drain, stop) = (
        drain_of(&setting("ExecStart=")),
        seconds(&setting("TimeoutStopSec=")),
    );
    assert!(
        drain + MARGIN <= stop,
        "systemd: drain {drain} s, TimeoutStopSec {stop} s"
    );

    let manifest = repo("deploy/kubernetes/daemonset.yaml");
    let value = |key: &str| {
        manifest
            .lines()
            .find_map(|line| line.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in the manifest"))
            .to_string()
    };
    let (drain, grace) = (
        drain_of(&value("args:")),
        seconds(&value("terminationGracePeriodSeconds:")),
    );
    assert!(
        drain + MARGIN <= grace,
        "Kubernetes: drain {drain} s, grace period {grace} s"
    );
}
