//! Least privilege: once set up, every thread of `tproxy run` holds only CAP_NET_ADMIN,
//! CAP_NET_BIND_SERVICE and CAP_NET_RAW, optionally as an unprivileged user, and everything still works: new TCP and
//! UDP flows, reloads, statistics, and the clean-up at exit.

use std::time::Duration;

use tproxy_tests::{
    ingress_programs, peer_seen_by, require_root, routing_state, udp_client, udp_exchange,
    ConfigFile, RouterTopology as Topo, Server, UdpEcho,
};

/// CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12) and CAP_NET_RAW (13).
const KEPT: u64 = (1 << 10) | (1 << 12) | (1 << 13);

/// (uid line, CapEff and CapPrm of every thread) of a process.
fn credentials(pid: u32) -> (String, Vec<(u64, u64)>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            let hex = status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim();
            u64::from_str_radix(hex, 16).unwrap()
        };
        threads.push((field("CapEff:"), field("CapPrm:")));
    }
    (uid, threads)
}

fn relay_works(topo: &Topo, tcp: &Server, udp: &UdpEcho) {
    assert_eq!(
        peer_seen_by(&topo.client, tcp.addr).unwrap(),
        Topo::router_as_seen_by_server(false)
    );
    let client = udp_client(&topo.client, udp.addr).unwrap();
    let (reply, from) = udp_exchange(&client, udp.addr, b"hello").unwrap();
    assert_eq!((reply.as_slice(), from), (&b"hello"[..], udp.addr));
    assert!(udp
        .peer_ips()
        .contains(&Topo::router_as_seen_by_server(false)));
}

#[test]
fn after_set_up_only_net_admin_net_bind_service_and_net_raw_remain_on_every_thread() {
    require_root();
    let topo = Topo::new().unwrap();
    let tcp = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let udp = UdpEcho::start(&topo.server, Topo::server_addr(false, 5300)).unwrap();
    let mut tproxy = topo.tproxy(&["--tcp", "80", "--udp", "5300"]).unwrap();
    let (uid, threads) = credentials(tproxy.pid());
    assert!(uid.split_whitespace().skip(1).all(|id| id == "0"), "{uid}");
    assert!(threads.len() >= 3, "main thread and workers: {threads:?}");
    assert!(
        threads.iter().all(|caps| *caps == (KEPT, KEPT)),
        "{threads:x?}"
    );
    relay_works(&topo, &tcp, &udp);
    tproxy.stop().unwrap();
    assert!(tproxy.final_counter("udp", "steered_new").unwrap() >= 1);
}

#[test]
fn as_an_unprivileged_user_it_relays_reloads_and_cleans_up() {
    require_root();
    let topo = Topo::new().unwrap();
    let tcp = Server::tell_peer(&topo.server, Topo::server_addr(false, 80)).unwrap();
    let udp = UdpEcho::start(&topo.server, Topo::server_addr(false, 5300)).unwrap();
    let rules = "[[listener]]\nname = \"all\"\n\n[[rule]]\nproto = \"tcp\"\nports = 80\naction = \"steer\"\n\n[[rule]]\nproto = \"udp\"\nports = 5300\naction = \"steer\"\n";
    let config = ConfigFile::new(rules).unwrap();
    let mut tproxy = topo
        .tproxy(&["--config", config.path(), "--user", "nobody"])
        .unwrap();
    let (uid, threads) = credentials(tproxy.pid());
    assert_eq!(
        uid.split_whitespace().skip(1).collect::<Vec<_>>(),
        ["65534"; 4],
        "{uid}"
    );
    assert!(
        threads.iter().all(|caps| *caps == (KEPT, KEPT)),
        "{threads:x?}"
    );
    relay_works(&topo, &tcp, &udp);

    // A reload binds a new listener (IP_TRANSPARENT) and rewrites the rule maps.
    config
        .rewrite(&rules.replace("name = \"all\"", "name = \"renamed\""))
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(tproxy.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    tproxy
        .wait_for_line("reloaded:", Duration::from_secs(10))
        .unwrap();
    relay_works(&topo, &tcp, &udp);

    tproxy.stop().unwrap();
    assert_eq!(
        routing_state(&topo.router, tproxy_tests::DEFAULT_TABLE).unwrap(),
        ""
    );
    assert!(ingress_programs(&topo.router, Topo::ROUTER_CLIENT_IFACE)
        .unwrap()
        .is_empty());
}

#[test]
fn an_unknown_user_is_refused_before_anything_is_touched() {
    require_root();
    let topo = Topo::new().unwrap();
    let (status, stderr) = tproxy_tests::run_tproxy_to_end(
        &topo.router,
        &[
            "run",
            "--iface",
            Topo::ROUTER_CLIENT_IFACE,
            "--tcp",
            "80",
            "--user",
            "no-such-user-here",
        ],
    )
    .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("--user no-such-user-here: no such user"),
        "{stderr}"
    );
    assert_eq!(
        routing_state(&topo.router, tproxy_tests::DEFAULT_TABLE).unwrap(),
        ""
    );
}
