//! Interfaces by pattern, followed live: tproxy attaches to interfaces that appear and match
//! (a container's veth started after tproxy), detaches from those that go, and leaves no link
//! behind however many came and went. `all` is followed the same way; neither a pattern nor
//! `all` selects lo.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use tproxy_tests::{
    cgroup::{dial_output, TestCgroup},
    ingress_program_id, ingress_programs, links_of_program, peer_seen_by, require_root, ConfigFile,
    Netns, RouterTopology as Topo, Server, Tproxy,
};

const DIAL: &str = env!("CARGO_BIN_EXE_dial");

/// Waits until tproxy has attached to `iface` and put the rules in force for it (they are
/// written after the attachment).
fn in_force_on(tproxy: &mut Tproxy, iface: &str) {
    tproxy
        .wait_for_line(&format!("attached to {iface}"), Duration::from_secs(10))
        .unwrap();
    tproxy
        .wait_for_line("rules in force for the interfaces", Duration::from_secs(10))
        .unwrap();
}

/// Links a new namespace to the router as a container's veth would be: `eth0` inside,
/// `router_iface` on the router, addresses 10.10.`subnet`.0/24.
fn late_client(topo: &Topo, router_iface: &str, subnet: u8) -> Netns {
    let client = Netns::new("late").unwrap();
    client
        .ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            router_iface,
            "netns",
            &topo.router.name,
        ])
        .unwrap();
    let (client_addr, router_addr) = (
        format!("10.10.{subnet}.2/24"),
        format!("10.10.{subnet}.1/24"),
    );
    client
        .ip(&["addr", "add", &client_addr, "dev", "eth0"])
        .unwrap();
    client.ip(&["link", "set", "eth0", "up"]).unwrap();
    topo.router
        .ip(&["addr", "add", &router_addr, "dev", router_iface])
        .unwrap();
    topo.router
        .ip(&["link", "set", router_iface, "up"])
        .unwrap();
    client
        .ip(&[
            "route",
            "add",
            "default",
            "via",
            &format!("10.10.{subnet}.1"),
        ])
        .unwrap();
    client
}

/// Waits (up to a generous limit, not a timed assertion) until `done` holds for tproxy's
/// status; returns the last status either way.
fn status_when(
    tproxy: &Tproxy,
    done: impl Fn(&tproxy_tests::InstanceStatus) -> bool,
) -> tproxy_tests::InstanceStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = tproxy.status().unwrap();
        if done(&status) || Instant::now() > deadline {
            return status;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_interface_that_appears_after_start_is_steered_without_a_restart() {
    require_root();
    let topo = Topo::new().unwrap();
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let mut tproxy = Tproxy::start(&topo.router, &["--iface", "hp-*", "--tcp", "80"]).unwrap();
    assert!(
        tproxy
            .log_text()
            .contains("--iface hp-*: no interface matches yet"),
        "{}",
        tproxy.log_text()
    );
    // Not matched: passed through untouched.
    assert_eq!(
        peer_seen_by(&topo.client, server.addr).unwrap(),
        Topo::client_ip(false)
    );
    let late = late_client(&topo, "hp-late", 3);
    tproxy
        .wait_for_line("attached to hp-late", Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        peer_seen_by(&late, server.addr).unwrap(),
        Topo::router_as_seen_by_server(false),
        "the late interface's connection is relayed"
    );
    let status = tproxy.status().unwrap();
    assert_eq!(status.attached, vec!["hp-late (tcx)".to_string()]);
    let interfaces = status.stats.interfaces.unwrap();
    assert_eq!((interfaces.attached, interfaces.attach_events), (1, 1));
    drop(late);
    let status = status_when(&tproxy, |s| s.attached.is_empty());
    assert!(status.attached.is_empty(), "{:?}", status.attached);
    assert_eq!(status.stats.interfaces.unwrap().detach_events, 1);
    tproxy.stop().unwrap();
    assert_eq!(tproxy.final_counter("tcp", "steered_new").unwrap(), 1);
}

#[test]
fn two_hundred_interfaces_come_and_go_under_traffic_and_leave_nothing_behind() {
    require_root();
    let topo = Topo::new().unwrap();
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let mut tproxy = Tproxy::start(
        &topo.router,
        &[
            "--iface",
            Topo::ROUTER_CLIENT_IFACE,
            "--iface",
            "hp-*",
            "--tcp",
            "80",
        ],
    )
    .unwrap();
    let program = ingress_program_id(&topo.router, Topo::ROUTER_CLIENT_IFACE).unwrap();
    assert_eq!(links_of_program(program), 1);

    // Four rounds of 50 pairs, each deleted right after it was created, while the client
    // keeps connecting: tproxy sees links appear and vanish in bursts, some before it could
    // attach to them.
    let batch = |lines: Vec<String>| {
        let path = std::env::temp_dir().join(format!("tproxy-hotplug-{}", std::process::id()));
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        topo.router.ip(&["-batch", path.to_str().unwrap()]).unwrap();
        let _ = std::fs::remove_file(&path);
    };
    let stop = AtomicBool::new(false);
    let (relayed, wrong) = (AtomicU64::new(0), AtomicU64::new(0));
    let status = thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                match peer_seen_by(&topo.client, server.addr) {
                    Ok(peer) if peer == Topo::router_as_seen_by_server(false) => &relayed,
                    _ => &wrong,
                }
                .fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(5));
            }
        });
        for round in 0..4 {
            let names: Vec<String> = (0..50).map(|i| format!("hp-{round}-{i}")).collect();
            batch(
                names
                    .iter()
                    .map(|name| format!("link add {name} up type veth peer name peer-{name}"))
                    .collect(),
            );
            thread::sleep(Duration::from_millis(100));
            batch(
                names
                    .iter()
                    .map(|name| format!("link del {name}"))
                    .collect(),
            );
        }
        let status = status_when(&tproxy, |s| s.attached.len() == 1);
        stop.store(true, Ordering::Relaxed);
        status
    });

    assert_eq!(
        status.attached,
        vec![format!("{} (tcx)", Topo::ROUTER_CLIENT_IFACE)]
    );
    let interfaces = status.stats.interfaces.unwrap();
    assert!(interfaces.attach_events > 1, "{interfaces:?}");
    assert_eq!(
        interfaces.detach_events,
        interfaces.attach_events - 1,
        "{interfaces:?}"
    );
    assert_eq!(interfaces.attach_failures, 0, "{interfaces:?}");
    assert_eq!(
        links_of_program(program),
        1,
        "a link of a vanished interface is left"
    );
    assert_eq!(
        ingress_programs(&topo.router, Topo::ROUTER_CLIENT_IFACE).unwrap(),
        vec!["tproxy_ingress".to_string()]
    );
    assert!(relayed.load(Ordering::Relaxed) > 0);
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "a connection was not relayed"
    );
    // Still serving once it is over.
    assert_eq!(
        peer_seen_by(&topo.client, server.addr).unwrap(),
        Topo::router_as_seen_by_server(false)
    );
    tproxy.stop().unwrap();
    let log = tproxy.log_text();
    let serving = &log[log.find("ready:").unwrap()..];
    let noise: Vec<&str> = serving
        .lines()
        .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
        // The rate limiter of the per-packet debug records the tests turn on.
        .filter(|line| !line.contains("log records held back"))
        .collect();
    assert!(noise.is_empty(), "{}", noise.join("\n"));
}

/// A rule for one interface that is not there at start: in force once the interface
/// appears, and again after it is re-created (with another ifindex).
const RULE_FOR_A_LATE_INTERFACE: &str = r#"
interfaces = ["to-client", "hp-*"]

[[listener]]
name = "direct"

[[rule]]
proto = "tcp"
ports = 80
iface = "hp-late"
action = "steer"
listener = "direct"
"#;

#[test]
fn a_rule_naming_an_interface_applies_once_it_appears() {
    require_root();
    let topo = Topo::new().unwrap();
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let config = ConfigFile::new(RULE_FOR_A_LATE_INTERFACE).unwrap();
    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    for round in 0..2 {
        let late = late_client(&topo, "hp-late", 3);
        in_force_on(&mut tproxy, "hp-late");
        assert_eq!(
            peer_seen_by(&late, server.addr).unwrap(),
            Topo::router_as_seen_by_server(false),
            "round {round}: the rule for hp-late steers its connection"
        );
        assert_eq!(
            peer_seen_by(&topo.client, server.addr).unwrap(),
            Topo::client_ip(false),
            "round {round}: no rule for to-client"
        );
        drop(late);
        tproxy
            .wait_for_line("detached from hp-late", Duration::from_secs(10))
            .unwrap();
    }
    tproxy.stop().unwrap();
    assert_eq!(tproxy.final_counter("tcp", "steered_new").unwrap(), 2);
}

/// The interfaces tproxy is attached to, by name (status gives "NAME (MODE)"), sorted.
fn attached_names(tproxy: &Tproxy) -> Vec<String> {
    let status = tproxy.status().unwrap();
    let mut names: Vec<String> = status
        .attached
        .iter()
        .map(|entry| entry.split(' ').next().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn iface_all_follows_interfaces_that_appear_and_leaves_lo_out() {
    require_root();
    let topo = Topo::new().unwrap();
    let server = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let mut tproxy = Tproxy::start(&topo.router, &["--iface", "all", "--tcp", "80"]).unwrap();
    assert_eq!(attached_names(&tproxy), vec!["to-client", "to-server"]);
    assert_eq!(
        ingress_programs(&topo.router, "lo").unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        peer_seen_by(&topo.client, server.addr).unwrap(),
        Topo::router_as_seen_by_server(false)
    );
    let late = late_client(&topo, "late0", 3);
    tproxy
        .wait_for_line("attached to late0", Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        peer_seen_by(&late, server.addr).unwrap(),
        Topo::router_as_seen_by_server(false),
        "the interface that appeared after start is steered"
    );
    drop(late);
    tproxy
        .wait_for_line("detached from late0", Duration::from_secs(10))
        .unwrap();
    assert_eq!(attached_names(&tproxy), vec!["to-client", "to-server"]);
    tproxy.stop().unwrap();
    assert_eq!(tproxy.final_counter("tcp", "steered_new").unwrap(), 2);
}

/// `--iface all --iface lo`: lo beside all the others, which are still followed as they
/// come and go (before, `all` beside any name was refused).
#[test]
fn iface_all_with_lo_attaches_lo_too_and_follows_the_others() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = Tproxy::start(
        &topo.router,
        &["--iface", "all", "--iface", "lo", "--tcp", "80"],
    )
    .unwrap();
    let all_and_lo = vec!["lo", "to-client", "to-server"];
    assert_eq!(attached_names(&tproxy), all_and_lo);
    assert_eq!(
        ingress_programs(&topo.router, "lo").unwrap(),
        vec!["tproxy_ingress".to_string()]
    );
    let late = late_client(&topo, "late1", 4);
    tproxy
        .wait_for_line("attached to late1", Duration::from_secs(10))
        .unwrap();
    drop(late);
    tproxy
        .wait_for_line("detached from late1", Duration::from_secs(10))
        .unwrap();
    assert_eq!(attached_names(&tproxy), all_and_lo);
    tproxy.stop().unwrap();
}

#[test]
fn a_pattern_leaves_lo_out_and_its_name_selects_it() {
    require_root();
    let topo = Topo::new().unwrap();
    let mut tproxy = Tproxy::start(&topo.router, &["--iface", "*", "--tcp", "80"]).unwrap();
    assert_eq!(attached_names(&tproxy), vec!["to-client", "to-server"]);
    assert_eq!(
        ingress_programs(&topo.router, "lo").unwrap(),
        Vec::<String>::new()
    );
    tproxy.stop().unwrap();
    let mut tproxy = Tproxy::start(
        &topo.router,
        &["--iface", "*", "--iface", "lo", "--tcp", "80"],
    )
    .unwrap();
    assert_eq!(
        attached_names(&tproxy),
        vec!["lo", "to-client", "to-server"]
    );
    assert_eq!(
        ingress_programs(&topo.router, "lo").unwrap(),
        vec!["tproxy_ingress".to_string()]
    );
    tproxy.stop().unwrap();
}

/// Rules for local connections stay in force while interfaces come and go: every change of
/// the attached set recompiles the rule maps, and the local rules' entries must survive
/// each one (before a review mend an interface that appeared later had no entries).
#[test]
fn local_rules_hold_while_interfaces_come_and_go() {
    use std::io::{Read, Write};
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("hotplug").unwrap();
    let named =
        |addr: &str, name| Server::named(&topo.server, addr.parse().unwrap(), name).unwrap();
    let _original = named("10.10.2.2:80", "original");
    let upstream = named("10.10.2.3:8080", "upstream");
    let config = ConfigFile::new(&format!(
        "interfaces = [\"hp-*\"]\n\
         [[listener]]\nname = \"up\"\nupstream = \"10.10.2.3:8080\"\n\
         [[rule]]\norigin = \"local\"\ncgroup = [\"{}\"]\nproto = \"tcp\"\nports = 80\n\
         action = \"steer\"\nlistener = \"up\"\n\
         [[rule]]\nproto = \"tcp\"\nports = 80\niface = \"hp-late\"\naction = \"steer\"\n\
         listener = \"up\"\n",
        cgroup.path
    ))
    .unwrap();
    let mut tproxy =
        Tproxy::start_with_host_mounts(&topo.router, &["--config", config.path()]).unwrap();
    let local = || {
        dial_output(
            cgroup
                .run(&topo.router, &[], DIAL, &["tcp", "10.10.2.2:80", "hi"])
                .unwrap(),
        )
        .unwrap()
    };
    let arrival = |client: &Netns| {
        let mut stream = client.connect("10.10.2.2:80".parse().unwrap()).unwrap();
        stream.write_all(b"hi").unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    };
    assert_eq!(local(), "10.10.2.2:80 upstream", "before any interface");
    for round in 0..3 {
        let late = late_client(&topo, "hp-late", 3);
        in_force_on(&mut tproxy, "hp-late");
        assert_eq!(arrival(&late), "upstream", "round {round}: hp-late's rule");
        assert_eq!(local(), "10.10.2.2:80 upstream", "round {round}: attached");
        drop(late);
        tproxy
            .wait_for_line("detached from hp-late", Duration::from_secs(10))
            .unwrap();
        assert_eq!(local(), "10.10.2.2:80 upstream", "round {round}: detached");
    }
    assert_eq!(upstream.peers().len(), 10);
    tproxy.stop().unwrap();
}
