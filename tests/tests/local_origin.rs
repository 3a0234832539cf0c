//! `tproxy run --local`: connections and connected UDP sockets of the processes in a cgroup
//! (and of chosen users) on the host running tproxy are relayed; everyone else's go direct.
//! The "host" is the router namespace; servers are in the server namespace. tproxy and the
//! clients keep the host's mounts (`nsenter --net`), so the cgroup v2 tree stays visible.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    process::Command,
};

use tproxy_tests::{
    cgroup::{dial_output, run_outside_cgroup, NetClsClass, TestCgroup},
    ingress_programs, require_root, routing_state, run_tproxy_output, tproxy_bin, Bpffs,
    RouterTopology as Topo, Server, Tproxy, UdpEcho, DEFAULT_TABLE,
};

const DIAL: &str = env!("CARGO_BIN_EXE_dial");
const MARKPROXY: &str = env!("CARGO_BIN_EXE_markproxy");
/// The kernel's `BPF_CGROUP_INET4_CONNECT` and `BPF_CGROUP_INET6_CONNECT`.
const CONNECT4: u32 = 10;
const CONNECT6: u32 = 11;
/// The kernel's `BPF_CGROUP_UDP4_SENDMSG` and `BPF_CGROUP_UDP6_SENDMSG`.
const SENDMSG4: u32 = 14;
const SENDMSG6: u32 = 15;

/// A server that reads the request to its end and answers `name`.
fn named_server(netns: &tproxy_tests::Netns, addr: SocketAddr, name: &'static str) -> Server {
    Server::named(netns, addr, name).unwrap()
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

#[test]
fn a_cgroups_connections_are_relayed_and_others_go_direct() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("app").unwrap();
    let original_v4 = named_server(&topo.server, addr("10.10.2.2:80"), "original");
    let original_v6 = named_server(&topo.server, addr("[fd00:2::2]:80"), "original");
    let unsteered = named_server(&topo.server, addr("10.10.2.2:81"), "unsteered");
    let upstream = named_server(&topo.server, addr("10.10.2.3:8080"), "upstream");

    let mut tproxy = Tproxy::start_with_host_mounts(
        &topo.router,
        &[
            "--local",
            "--cgroup",
            &cgroup.path,
            "--tcp",
            "80",
            "--upstream",
            "10.10.2.3:8080",
        ],
    )
    .unwrap();
    assert_eq!(cgroup.attached(CONNECT4).unwrap(), 1);
    assert_eq!(cgroup.attached(CONNECT6).unwrap(), 1);

    let inside = |target: &str| {
        dial_output(
            cgroup
                .run(&topo.router, &[], DIAL, &["tcp", target, "hi"])
                .unwrap(),
        )
        .unwrap()
    };
    let outside = |target: &str| {
        dial_output(run_outside_cgroup(&topo.router, &[], DIAL, &["tcp", target, "hi"]).unwrap())
            .unwrap()
    };
    // Relayed to the upstream, and the application still sees the peer it dialled.
    assert_eq!(inside("10.10.2.2:80"), "10.10.2.2:80 upstream");
    assert_eq!(inside("[fd00:2::2]:80"), "[fd00:2::2]:80 upstream");
    // A dual-stack socket dialling an IPv4-mapped address sends IPv4: the IPv4 rules decide.
    assert_eq!(
        inside("[::ffff:10.10.2.2]:80"),
        "[::ffff:10.10.2.2]:80 upstream"
    );
    // A port no rule steers, and processes outside the cgroup, go direct.
    assert_eq!(inside("10.10.2.2:81"), "10.10.2.2:81 unsteered");
    assert_eq!(outside("10.10.2.2:80"), "10.10.2.2:80 original");
    assert_eq!(outside("[fd00:2::2]:80"), "[fd00:2::2]:80 original");

    assert_eq!(tproxy.ebpf_counters().unwrap()["tcp/steered_new"], 3);
    assert_eq!(upstream.peers().len(), 3);
    assert_eq!(original_v4.peers().len(), 1);
    assert_eq!(original_v6.peers().len(), 1);
    assert_eq!(unsteered.peers().len(), 1);

    tproxy.stop().unwrap();
    assert_eq!(
        cgroup.attached(CONNECT4).unwrap(),
        0,
        "connect4 left attached"
    );
    assert_eq!(
        cgroup.attached(CONNECT6).unwrap(),
        0,
        "connect6 left attached"
    );
    assert_eq!(routing_state(&topo.router, DEFAULT_TABLE).unwrap(), "");
    assert_eq!(inside("10.10.2.2:80"), "10.10.2.2:80 original");
}

#[test]
fn only_the_selected_users_are_relayed() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("users").unwrap();
    let _original = named_server(&topo.server, addr("10.10.2.2:80"), "original");
    let _upstream = named_server(&topo.server, addr("10.10.2.3:8080"), "upstream");
    let _tproxy = Tproxy::start_with_host_mounts(
        &topo.router,
        &[
            "--local",
            "--cgroup",
            &cgroup.path,
            "--uid",
            "1000-1999",
            "--uid",
            "3000",
            "--tcp",
            "80",
            "--upstream",
            "10.10.2.3:8080",
        ],
    )
    .unwrap();
    let as_user = |uid: &str| {
        let reuid = format!("--reuid={uid}");
        let wrapper = ["setpriv", &reuid, "--regid=1000", "--clear-groups"];
        dial_output(
            cgroup
                .run(&topo.router, &wrapper, DIAL, &["tcp", "10.10.2.2:80", "hi"])
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(as_user("1000"), "10.10.2.2:80 upstream");
    assert_eq!(as_user("1999"), "10.10.2.2:80 upstream");
    assert_eq!(as_user("3000"), "10.10.2.2:80 upstream");
    assert_eq!(as_user("2000"), "10.10.2.2:80 original");
    assert_eq!(as_user("0"), "10.10.2.2:80 original");
}

/// `--gid` selects by the process's (real) group, as the guides' `-m owner --gid-owner`
/// singles out a proxy's group; with a uid it takes a process that has both.
#[test]
fn only_the_selected_groups_are_relayed() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("groups").unwrap();
    let _original = named_server(&topo.server, addr("10.10.2.2:80"), "original");
    let _upstream = named_server(&topo.server, addr("10.10.2.3:8080"), "upstream");
    let mut tproxy = Tproxy::start_with_host_mounts(
        &topo.router,
        &[
            "--local",
            "--cgroup",
            &cgroup.path,
            "--gid",
            "23333",
            "--gid",
            "5000-5999",
            "--tcp",
            "80",
            "--upstream",
            "10.10.2.3:8080",
        ],
    )
    .unwrap();
    let as_ids = |uid: &str, gid: &str| {
        let (reuid, regid) = (format!("--reuid={uid}"), format!("--regid={gid}"));
        let wrapper = ["setpriv", &reuid, &regid, "--clear-groups"];
        dial_output(
            cgroup
                .run(&topo.router, &wrapper, DIAL, &["tcp", "10.10.2.2:80", "hi"])
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(as_ids("1000", "23333"), "10.10.2.2:80 upstream");
    assert_eq!(as_ids("0", "5999"), "10.10.2.2:80 upstream");
    assert_eq!(as_ids("1000", "23334"), "10.10.2.2:80 original");
    assert_eq!(as_ids("1000", "1000"), "10.10.2.2:80 original");
    tproxy.stop().unwrap();
    let _tproxy = Tproxy::start_with_host_mounts(
        &topo.router,
        &[
            "--local",
            "--cgroup",
            &cgroup.path,
            "--uid",
            "1000",
            "--gid",
            "23333",
            "--tcp",
            "80",
            "--upstream",
            "10.10.2.3:8080",
        ],
    )
    .unwrap();
    assert_eq!(as_ids("1000", "23333"), "10.10.2.2:80 upstream");
    assert_eq!(as_ids("1001", "23333"), "10.10.2.2:80 original");
    assert_eq!(as_ids("1000", "1000"), "10.10.2.2:80 original");
}

#[test]
fn a_cgroups_connected_udp_sockets_are_relayed_with_replies_from_where_they_sent() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("udp").unwrap();
    let original = UdpEcho::start(&topo.server, addr("10.10.2.2:5353")).unwrap();
    let original_v6 = UdpEcho::start(&topo.server, addr("[fd00:2::2]:5353")).unwrap();
    let tproxy = Tproxy::start_with_host_mounts(
        &topo.router,
        &["--local", "--cgroup", &cgroup.path, "--udp", "5353"],
    )
    .unwrap();
    for target in ["10.10.2.2:5353", "[fd00:2::2]:5353"] {
        let line = dial_output(
            cgroup
                .run(&topo.router, &[], DIAL, &["udp", target, "query"])
                .unwrap(),
        )
        .unwrap();
        assert_eq!(line, format!("{target} query"));
        let line = dial_output(
            run_outside_cgroup(&topo.router, &[], DIAL, &["udp", target, "query"]).unwrap(),
        )
        .unwrap();
        assert_eq!(line, format!("{target} query"));
    }
    // One datagram each from inside the cgroup went through the relay's sessions.
    assert_eq!(tproxy.udp_stat("created").unwrap(), 2);
    assert_eq!(original.peers.lock().unwrap().len(), 2);
    assert_eq!(original_v6.peers.lock().unwrap().len(), 2);
}

/// The mark is the socket's: a UDP socket connected to a steered destination, disconnected
/// and connected to another one loses it, and its datagrams to the second go direct.
#[test]
fn a_reconnected_udp_socket_goes_direct() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("udp-mixed").unwrap();
    let steered = UdpEcho::start(&topo.server, addr("10.10.2.2:5353")).unwrap();
    let unsteered = UdpEcho::start(&topo.server, addr("10.10.2.2:5354")).unwrap();
    let tproxy = Tproxy::start_with_host_mounts(
        &topo.router,
        &["--local", "--cgroup", &cgroup.path, "--udp", "5353"],
    )
    .unwrap();
    let args = [
        "udp",
        "10.10.2.2:5353",
        "q",
        "10.10.2.2:5354",
        "10.10.2.2:5353",
    ];
    let lines = dial_output(cgroup.run(&topo.router, &[], DIAL, &args).unwrap()).unwrap();
    assert_eq!(
        lines,
        "10.10.2.2:5353 q\n10.10.2.2:5354 q\n10.10.2.2:5353 q"
    );
    assert_eq!(tproxy.udp_stat("to_upstream").unwrap(), 2);
    assert_eq!(unsteered.peers.lock().unwrap().len(), 1);
    assert_eq!(steered.peers.lock().unwrap().len(), 2);
}

/// A socket steered for a selected process that is then no longer selected (here the process
/// becomes another user; a reload that removes its selection or a child of another user
/// inheriting it is the same) is let go: connected again to an unsteered destination, its
/// datagrams reach it directly instead of keeping the routing mark and going over `lo`, where
/// no record takes them.
#[test]
fn a_steered_udp_socket_whose_process_leaves_the_selection_goes_direct() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("udp-leave").unwrap();
    let steered = UdpEcho::start(&topo.server, addr("10.10.2.2:5353")).unwrap();
    let unsteered = UdpEcho::start(&topo.server, addr("10.10.2.2:5354")).unwrap();
    let tproxy = Tproxy::start_with_host_mounts(
        &topo.router,
        &[
            "--local",
            "--cgroup",
            &cgroup.path,
            "--uid",
            "1000",
            "--udp",
            "5353,5354",
        ],
    )
    .unwrap();
    // Real user 1000 (selected), effective root, so that it may become user 2000.
    let wrapper = ["env", "DIAL_UID=2000", "setpriv", "--ruid=1000"];
    let args = ["udp", "10.10.2.2:5353", "q", "10.10.2.2:5354"];
    let lines = dial_output(cgroup.run(&topo.router, &wrapper, DIAL, &args).unwrap()).unwrap();
    assert_eq!(lines, "10.10.2.2:5353 q\n10.10.2.2:5354 q");
    assert_eq!(tproxy.udp_stat("to_upstream").unwrap(), 1);
    assert_eq!(steered.peers.lock().unwrap().len(), 1);
    assert_eq!(unsteered.peers.lock().unwrap().len(), 1);
}

/// Unconnected sockets (`sendto`): each datagram is decided on its own. One socket in the
/// cgroup sends to a steered destination, an unsteered one, and the steered one again: the
/// steered datagrams go through the relay, the other goes direct, and every reply comes from
/// the address the datagram was sent to. A socket outside the cgroup is left alone.
#[test]
fn a_cgroups_unconnected_udp_datagrams_are_relayed_one_by_one() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("udp-sendto").unwrap();
    let steered_v4 = UdpEcho::start(&topo.server, addr("10.10.2.2:5353")).unwrap();
    let unsteered_v4 = UdpEcho::start(&topo.server, addr("10.10.2.2:5354")).unwrap();
    let steered_v6 = UdpEcho::start(&topo.server, addr("[fd00:2::2]:5353")).unwrap();
    let unsteered_v6 = UdpEcho::start(&topo.server, addr("[fd00:2::2]:5354")).unwrap();
    let mut tproxy = Tproxy::start_with_host_mounts(
        &topo.router,
        &["--local", "--cgroup", &cgroup.path, "--udp", "5353"],
    )
    .unwrap();
    assert_eq!(cgroup.attached(SENDMSG4).unwrap(), 1);
    assert_eq!(cgroup.attached(SENDMSG6).unwrap(), 1);
    let routing = routing_state(&topo.router, DEFAULT_TABLE).unwrap();
    assert!(
        routing.contains("from 127.84.80.1 iif lo") && routing.contains("from ::1 iif lo"),
        "{routing}"
    );

    let mut relayed = 0;
    for (steered, unsteered) in [
        ("10.10.2.2:5353", "10.10.2.2:5354"),
        ("[fd00:2::2]:5353", "[fd00:2::2]:5354"),
    ] {
        let args = ["sendto", steered, "q", unsteered, steered];
        let lines = dial_output(cgroup.run(&topo.router, &[], DIAL, &args).unwrap()).unwrap();
        assert_eq!(lines, format!("{steered} q\n{unsteered} q\n{steered} q"));
        relayed += 2;
        assert_eq!(
            tproxy.udp_stat("to_upstream").unwrap(),
            relayed,
            "{steered}"
        );

        let outside = ["sendto", steered, "q", unsteered];
        let lines =
            dial_output(run_outside_cgroup(&topo.router, &[], DIAL, &outside).unwrap()).unwrap();
        assert_eq!(lines, format!("{steered} q\n{unsteered} q"));
        assert_eq!(
            tproxy.udp_stat("to_upstream").unwrap(),
            relayed,
            "outside the cgroup, to {steered}, was relayed"
        );
    }
    // One relay session per steered socket and family; every datagram reached its server.
    assert_eq!(tproxy.udp_stat("created").unwrap(), 2);
    for echo in [&steered_v4, &steered_v6] {
        assert_eq!(echo.peers.lock().unwrap().len(), 3, "{}", echo.addr);
    }
    for echo in [&unsteered_v4, &unsteered_v6] {
        assert_eq!(echo.peers.lock().unwrap().len(), 2, "{}", echo.addr);
    }

    // A socket bound to an address has chosen its source: its datagrams go direct, from it.
    for (bind, steered) in [
        ("10.10.2.1:0", "10.10.2.2:5353"),
        ("[fd00:2::1]:0", "[fd00:2::2]:5353"),
    ] {
        let args = ["sendto-from", bind, "q", steered];
        let line = dial_output(cgroup.run(&topo.router, &[], DIAL, &args).unwrap()).unwrap();
        assert_eq!(line, format!("{steered} q"));
    }
    assert_eq!(tproxy.udp_stat("to_upstream").unwrap(), relayed);
    for (echo, bound) in [(&steered_v4, "10.10.2.1"), (&steered_v6, "fd00:2::1")] {
        let last = *echo.peers.lock().unwrap().last().unwrap();
        assert_eq!(last.ip().to_string(), bound);
    }

    tproxy.stop().unwrap();
    assert_eq!(routing_state(&topo.router, DEFAULT_TABLE).unwrap(), "");
    assert_eq!(
        cgroup.attached(SENDMSG4).unwrap(),
        0,
        "sendmsg4 left attached"
    );
    let direct = ["sendto", "10.10.2.2:5353", "q"];
    let line = dial_output(cgroup.run(&topo.router, &[], DIAL, &direct).unwrap()).unwrap();
    assert_eq!(line, "10.10.2.2:5353 q");
    assert_eq!(steered_v4.peers.lock().unwrap().len(), 5);
}

/// The host's own clients all reach the relay from a loopback address (127.84.80.1 for
/// `sendto()`, 127.0.0.1 for a connected socket): the per-source cap would be one cap for every
/// process on the host. With a cap of 1 per source, three processes' unconnected sockets and a
/// connected one are all relayed (before, the second one's datagram was dropped at the cap).
#[test]
fn the_hosts_own_clients_are_not_one_source_to_the_per_source_cap() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("per-source").unwrap();
    let steered = UdpEcho::start(&topo.server, addr("10.10.2.2:5353")).unwrap();
    let tproxy = Tproxy::start_with_host_mounts(
        &topo.router,
        &[
            "--local",
            "--cgroup",
            &cgroup.path,
            "--udp",
            "5353",
            "--udp-max-sessions-per-source",
            "1",
        ],
    )
    .unwrap();
    for mode in ["sendto", "sendto", "sendto", "udp"] {
        let args = [mode, "10.10.2.2:5353", "q"];
        let line = dial_output(cgroup.run(&topo.router, &[], DIAL, &args).unwrap()).unwrap();
        assert_eq!(line, "10.10.2.2:5353 q", "{mode}");
    }
    assert_eq!(tproxy.udp_stat("created").unwrap(), 4);
    assert_eq!(tproxy.udp_stat("refused_at_source_cap").unwrap(), 0);
    assert_eq!(steered.peers.lock().unwrap().len(), 4);
}

/// Two instances, in two network namespaces, with cgroups nested: the programs of the one
/// attached to the parent cgroup run for the child's processes too, after the child's own.
/// They must leave the sockets of another namespace alone, neither marking nor unmarking
/// them.
#[test]
fn another_instances_programs_on_an_ancestor_cgroup_leave_this_ones_sockets_alone() {
    require_root();
    let topo = Topo::new().unwrap();
    let elsewhere = tproxy_tests::Netns::new("elsewhere").unwrap();
    let parent = TestCgroup::new("parent").unwrap();
    let child = parent.child("child").unwrap();
    let _original = named_server(&topo.server, addr("10.10.2.2:80"), "original");
    let _upstream = named_server(&topo.server, addr("10.10.2.3:8080"), "upstream");
    let _unsteered = named_server(&topo.server, addr("10.10.2.2:81"), "unsteered");
    let _other = Tproxy::start_with_host_mounts(
        &elsewhere,
        &["--local", "--cgroup", &parent.path, "--tcp", "81"],
    )
    .unwrap();
    let _tproxy = Tproxy::start_with_host_mounts(
        &topo.router,
        &[
            "--local",
            "--cgroup",
            &child.path,
            "--tcp",
            "80",
            "--upstream",
            "10.10.2.3:8080",
        ],
    )
    .unwrap();
    // The other instance steers port 81 for the parent: were its programs to decide for
    // this namespace's sockets, they would take the mark off the child's port 80 socket (it
    // would go direct) and put it on the parent's port 81 one (it would land on `lo` here,
    // where no rule takes it, and be refused).
    let steered = ["tcp", "10.10.2.2:80", "hi"];
    let line = dial_output(child.run(&topo.router, &[], DIAL, &steered).unwrap()).unwrap();
    assert_eq!(line, "10.10.2.2:80 upstream");
    let theirs = ["tcp", "10.10.2.2:81", "hi"];
    let line = dial_output(parent.run(&topo.router, &[], DIAL, &theirs).unwrap()).unwrap();
    assert_eq!(line, "10.10.2.2:81 unsteered");
}

/// The sidecar on one host: the programs sit at the cgroup v2 root, so they see every process
/// on the host, tproxy's relay included. Its upstream connection to the very destination and
/// port the rule steers goes direct (tproxy's own socket mark and cgroup), so the client is
/// relayed exactly once and the server sees one connection, not a loop.
#[test]
fn the_relays_own_upstream_connection_is_never_steered_on_a_single_host() {
    require_root();
    let topo = Topo::new().unwrap();
    let app = TestCgroup::new("sidecar-app").unwrap();
    let server = named_server(&topo.server, addr("10.10.2.2:80"), "original");
    let tproxy =
        Tproxy::start_with_host_mounts(&topo.router, &["--local", "--cgroup", "/", "--tcp", "80"])
            .unwrap();
    let line = dial_output(
        app.run(&topo.router, &[], DIAL, &["tcp", "10.10.2.2:80", "hi"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(line, "10.10.2.2:80 original");
    assert_eq!(tproxy.ebpf_counters().unwrap()["tcp/steered_new"], 1);
    assert_eq!(server.peers().len(), 1);
}

/// An external proxy among the selected processes, every process selected: it marks its
/// upstream sockets with `socket_mark`, which tproxy never steers (what a recipe's loop guard
/// `-m mark --mark 0xff -j RETURN` becomes), so an app's connection reaches it once and goes
/// on to the server. The same proxy without the mark gets its own upstream connection back,
/// and the app no answer. With `--steer-loopback`, connections to loopback addresses reach
/// it as well.
#[test]
fn an_external_proxy_that_marks_its_sockets_can_be_among_every_process() {
    require_root();
    let topo = Topo::new().unwrap();
    let app = TestCgroup::new("ext-app").unwrap();
    let proxy_cgroup = TestCgroup::new("ext-proxy").unwrap();
    let server = named_server(&topo.server, addr("10.10.2.2:80"), "original");
    let args = [
        "--local",
        "--tcp",
        "80",
        "--on-port",
        "3129",
        "--on-ip",
        "127.0.0.1",
        "--socket-mark",
        "255",
        "--steer-loopback",
    ];
    let _tproxy = Tproxy::start_with_host_mounts(&topo.router, &args).unwrap();
    let through_proxy = |mark: &str, target: &str| {
        let mut proxy = proxy_cgroup
            .spawn(&topo.router, MARKPROXY, &["127.0.0.1:3129", mark])
            .unwrap();
        let mut ready = [0u8; 10];
        proxy
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut ready)
            .unwrap();
        let dialled = app
            .run(&topo.router, &[], DIAL, &["tcp", target, "hi"])
            .unwrap();
        let proxied = proxy.wait_with_output().unwrap();
        (
            dial_output(dialled).map_err(|error| error.to_string()),
            String::from_utf8_lossy(&proxied.stdout).trim().to_string(),
        )
    };
    let (marked, proxied) = through_proxy("255", "10.10.2.2:80");
    assert_eq!(marked.as_deref(), Ok("10.10.2.2:80 original"));
    assert_eq!(proxied, "upstream 10.10.2.2:80");
    assert_eq!(server.peers().len(), 1);
    // Its own upstream connection comes back to its listener, where nobody answers it: the
    // proxy gives up, and the app gets no reply.
    let (unmarked, proxied) = through_proxy("0", "10.10.2.2:80");
    assert_eq!(unmarked.as_deref(), Ok("10.10.2.2:80"));
    assert_eq!(proxied, "upstream 10.10.2.2:80");
    assert_eq!(
        server.peers().len(),
        1,
        "an unmarked proxy reached the server"
    );
    // With --steer-loopback a connection to a loopback address reaches the proxy too, as an
    // iptables recipe without a 127.0.0.0/8 RETURN hands it over.
    let local = named_server(&topo.router, addr("127.0.0.1:80"), "local");
    let (to_loopback, proxied) = through_proxy("255", "127.0.0.1:80");
    assert_eq!(to_loopback.as_deref(), Ok("127.0.0.1:80 local"));
    assert_eq!(proxied, "upstream 127.0.0.1:80");
    assert_eq!(local.peers().len(), 1);
}

#[test]
fn bad_cgroups_and_uids_are_named_and_nothing_is_left() {
    require_root();
    let topo = Topo::new().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--local", "--cgroup", "/no-such-cgroup-tpx"],
            "cgroup `/no-such-cgroup-tpx`: no such cgroup",
        ),
        (
            &["--local", "--cgroup", "app.slice"],
            "cgroup `app.slice`: give the path from the cgroup v2 root",
        ),
        (
            &["--local", "--cgroup", "/../etc"],
            "cgroup `/../etc`: `.` and `..` are not allowed",
        ),
        (
            &["--local", "--uid", "2000-1000"],
            "uid `2000-1000`: the range's first uid is above its last",
        ),
        (&["--local", "--uid", "root"], "uid `root`: not a uid"),
        (&["--local", "--gid", "proxy"], "gid `proxy`: not a gid"),
        (&["--gid", "1000"], "--local"),
        (&["--cgroup", "/"], "--local"),
        (
            &["--local", "--iface", "lo"],
            "--local with lo among the interfaces",
        ),
    ];
    for (flags, expected) in cases {
        let output = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", topo.router.name))
            .arg(tproxy_bin())
            .arg("run")
            .args(*flags)
            .args(["--tcp", "80"])
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flags:?} started");
        assert!(log.contains(expected), "{flags:?}: {log}");
        assert_eq!(routing_state(&topo.router, DEFAULT_TABLE).unwrap(), "");
        assert!(ingress_programs(&topo.router, "lo").unwrap().is_empty());
    }
}

/// A request from the client namespace, through the router: what the server answered.
fn arrival(topo: &Topo, target: &str) -> String {
    let mut stream = topo.client.connect(addr(target)).unwrap();
    stream.write_all(b"hi").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// Rules for local connections and for arrivals, in one file: each origin's rules apply to
/// it alone (a forwarded rule does not steer a local connect, a local rule does not steer an
/// arrival on the steered interface), a reload that swaps their ports swaps what is steered,
/// and one that selects another cgroup moves the programs there.
#[test]
fn file_rules_apply_to_their_own_origin_only() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("file").unwrap();
    let _original80 = named_server(&topo.server, addr("10.10.2.2:80"), "original");
    let _original81 = named_server(&topo.server, addr("10.10.2.2:81"), "original");
    let upstream = named_server(&topo.server, addr("10.10.2.3:8080"), "upstream");
    let file = |local_port: u16, forwarded_port: u16| {
        format!(
            "interfaces = [\"{}\"]\n\
             [[listener]]\nname = \"up\"\nupstream = \"10.10.2.3:8080\"\n\
             [[rule]]\norigin = \"local\"\nproto = \"tcp\"\nports = {local_port}\n\
             cgroup = [\"{}\"]\naction = \"steer\"\nlistener = \"up\"\n\
             [[rule]]\nproto = \"tcp\"\nports = {forwarded_port}\naction = \"steer\"\n\
             listener = \"up\"\n",
            Topo::ROUTER_CLIENT_IFACE,
            cgroup.path
        )
    };
    let config = tproxy_tests::ConfigFile::new(&file(80, 81)).unwrap();
    let mut tproxy =
        Tproxy::start_with_host_mounts(&topo.router, &["--config", config.path()]).unwrap();
    let local = |target: &str| {
        dial_output(
            cgroup
                .run(&topo.router, &[], DIAL, &["tcp", target, "hi"])
                .unwrap(),
        )
        .unwrap()
    };
    let outside = |target: &str| {
        dial_output(run_outside_cgroup(&topo.router, &[], DIAL, &["tcp", target, "hi"]).unwrap())
            .unwrap()
    };
    assert_eq!(local("10.10.2.2:80"), "10.10.2.2:80 upstream");
    assert_eq!(outside("10.10.2.2:80"), "10.10.2.2:80 original");
    assert_eq!(
        local("10.10.2.2:81"),
        "10.10.2.2:81 original",
        "a forwarded rule steered a local connection"
    );
    assert_eq!(arrival(&topo, "10.10.2.2:81"), "upstream");
    assert_eq!(
        arrival(&topo, "10.10.2.2:80"),
        "original",
        "a local rule steered an arrival"
    );
    assert_eq!(upstream.peers().len(), 2);

    let status = tproxy.status().unwrap();
    let selection = status
        .stats
        .local_origin
        .as_ref()
        .expect("status shows the selection");
    assert_eq!(selection.cgroups, std::slice::from_ref(&cgroup.path));
    assert!(selection.uids.is_empty());
    let links = tproxy_tests::stat(
        &status.stats,
        &format!("local origin (cgroup {}, every user)", cgroup.path),
        "cgroup_links",
    )
    .unwrap();
    // connect4/6 and sendmsg4/6 on the one selected cgroup.
    assert_eq!(links, 4);
    assert_eq!(cgroup.attached(CONNECT4).unwrap(), 1);

    // The local rules are reloadable like any rules.
    config.rewrite(&file(81, 80)).unwrap();
    let (status, stderr) = tproxy_tests::run_tproxy_to_end(&topo.router, &["reload"]).unwrap();
    assert!(status.success(), "{stderr}");
    tproxy
        .wait_for_line("reloaded:", std::time::Duration::from_secs(10))
        .unwrap();
    assert_eq!(local("10.10.2.2:81"), "10.10.2.2:81 upstream");
    assert_eq!(local("10.10.2.2:80"), "10.10.2.2:80 original");
    assert_eq!(arrival(&topo, "10.10.2.2:80"), "upstream");
    assert_eq!(arrival(&topo, "10.10.2.2:81"), "original");

    // Another selection: the programs move to the other cgroup, whose processes the rules
    // now steer, and the first cgroup's go direct.
    let other = TestCgroup::new("file-other").unwrap();
    config
        .rewrite(&file(81, 80).replace(&cgroup.path, &other.path))
        .unwrap();
    let (status, stderr) = tproxy_tests::run_tproxy_to_end(&topo.router, &["reload"]).unwrap();
    assert!(status.success(), "{stderr}");
    tproxy
        .wait_for_line("reloaded:", std::time::Duration::from_secs(10))
        .unwrap();
    assert_eq!(local("10.10.2.2:81"), "10.10.2.2:81 original");
    let moved = dial_output(
        other
            .run(&topo.router, &[], DIAL, &["tcp", "10.10.2.2:81", "hi"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(moved, "10.10.2.2:81 upstream");
    assert_eq!(cgroup.attached(CONNECT4).unwrap(), 0);
    assert_eq!(other.attached(CONNECT4).unwrap(), 1);
    // A selection whose cgroup does not exist: refused, and the rules in force stay.
    config
        .rewrite(&file(81, 80).replace(&cgroup.path, "/no-such-cgroup-tpx"))
        .unwrap();
    let (status, stderr) = tproxy_tests::run_tproxy_to_end(&topo.router, &["reload"]).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("cgroup `/no-such-cgroup-tpx`: no such cgroup"),
        "{stderr}"
    );
    let again = dial_output(
        other
            .run(&topo.router, &[], DIAL, &["tcp", "10.10.2.2:81", "hi"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(again, "10.10.2.2:81 upstream");
    tproxy.stop().unwrap();
    assert_eq!(other.attached(CONNECT4).unwrap(), 0);
}

/// `--local` with `--iface`: the flag rules apply to both origins.
#[test]
fn local_with_an_interface_steers_both_origins() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("both").unwrap();
    let _original = named_server(&topo.server, addr("10.10.2.2:80"), "original");
    let upstream = named_server(&topo.server, addr("10.10.2.3:8080"), "upstream");
    let _tproxy = Tproxy::start_with_host_mounts(
        &topo.router,
        &[
            "--local",
            "--cgroup",
            &cgroup.path,
            "--iface",
            Topo::ROUTER_CLIENT_IFACE,
            "--tcp",
            "80",
            "--upstream",
            "10.10.2.3:8080",
        ],
    )
    .unwrap();
    let line = dial_output(
        cgroup
            .run(&topo.router, &[], DIAL, &["tcp", "10.10.2.2:80", "hi"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(line, "10.10.2.2:80 upstream");
    assert_eq!(arrival(&topo, "10.10.2.2:80"), "upstream");
    assert_eq!(upstream.peers().len(), 2);
}

/// `doctor --config` checks each cgroup the rules for local connections select.
#[test]
fn doctor_names_a_selected_cgroup_that_does_not_exist() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("doctor").unwrap();
    let file = |path: &str| {
        format!(
            "[[listener]]\nname = \"up\"\n\
             [[rule]]\norigin = \"local\"\nproto = \"tcp\"\nports = 80\ncgroup = [\"{path}\"]\n\
             action = \"steer\"\n"
        )
    };
    let doctor = |config: &tproxy_tests::ConfigFile| {
        let output = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", topo.router.name))
            .arg(tproxy_bin())
            .args(["doctor", "--config", config.path()])
            .output()
            .unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), report)
    };
    let present = tproxy_tests::ConfigFile::new(&file(&cgroup.path)).unwrap();
    let (_, report) = doctor(&present);
    assert!(
        report.contains("ok      cgroup v2 is mounted at"),
        "{report}"
    );
    assert!(
        report.contains(&format!("ok      cgroup `{}` exists", cgroup.path)),
        "{report}"
    );
    let missing = tproxy_tests::ConfigFile::new(&file("/no-such-cgroup-tpx")).unwrap();
    let (healthy, report) = doctor(&missing);
    assert!(!healthy, "{report}");
    assert!(
        report.contains("PROBLEM cgroup `/no-such-cgroup-tpx`: no such cgroup"),
        "{report}"
    );
}

/// Rules for local connections with different selections, and their own listeners: a
/// cgroup's rule, a uid's rule, and a bypass for every process. Each process gets the rules
/// of the selections it is in, with the usual precedence between them (the first rule, for
/// a process in both); a process in neither goes direct; the loopback program hands each
/// connection and datagram to the listener its own process's rule named.
#[test]
fn each_rule_steers_the_processes_of_its_own_selection_to_its_own_listener() {
    require_root();
    let topo = Topo::new().unwrap();
    let a = TestCgroup::new("sel-a").unwrap();
    let b = TestCgroup::new("sel-b").unwrap();
    let _original = named_server(&topo.server, addr("10.10.2.2:80"), "original");
    let _original_v6 = named_server(&topo.server, addr("[fd00:2::2]:80"), "original");
    let _direct = named_server(&topo.server, addr("10.10.2.3:80"), "direct");
    let one = named_server(&topo.server, addr("10.10.2.3:8081"), "one");
    let two = named_server(&topo.server, addr("10.10.2.3:8082"), "two");
    let echo_one = UdpEcho::start(&topo.server, addr("10.10.2.3:6001")).unwrap();
    let echo_two = UdpEcho::start(&topo.server, addr("10.10.2.3:6002")).unwrap();
    let _echo = UdpEcho::start(&topo.server, addr("10.10.2.2:5353")).unwrap();
    let file = format!(
        "[[listener]]\nname = \"one\"\nupstream = \"10.10.2.3:8081\"\n\
         [[listener]]\nname = \"two\"\nupstream = \"10.10.2.3:8082\"\n\
         [[listener]]\nname = \"udp-one\"\nupstream = \"10.10.2.3:6001\"\n\
         [[listener]]\nname = \"udp-two\"\nupstream = \"10.10.2.3:6002\"\n\
         [[rule]]\norigin = \"local\"\ncgroup = [\"{}\"]\nproto = \"tcp\"\nports = 80\n\
         action = \"steer\"\nlistener = \"one\"\n\
         [[rule]]\norigin = \"local\"\nuid = [1000]\nproto = \"tcp\"\nports = 80\n\
         action = \"steer\"\nlistener = \"two\"\n\
         [[rule]]\norigin = \"local\"\nproto = \"tcp\"\ndst = \"10.10.2.3/32\"\n\
         action = \"bypass\"\n\
         [[rule]]\norigin = \"local\"\ncgroup = [\"{}\"]\nproto = \"udp\"\nports = 5353\n\
         action = \"steer\"\nlistener = \"udp-one\"\n\
         [[rule]]\norigin = \"local\"\nuid = [1000]\nproto = \"udp\"\nports = 5353\n\
         action = \"steer\"\nlistener = \"udp-two\"\n",
        a.path, a.path
    );
    let config = tproxy_tests::ConfigFile::new(&file).unwrap();
    let mut tproxy =
        Tproxy::start_with_host_mounts(&topo.router, &["--config", config.path()]).unwrap();
    let dial = |cgroup: &TestCgroup, uid: &str, args: &[&str]| {
        let reuid = format!("--reuid={uid}");
        let wrapper = ["setpriv", &reuid, "--regid=1000", "--clear-groups"];
        dial_output(cgroup.run(&topo.router, &wrapper, DIAL, args).unwrap()).unwrap()
    };
    let web = ["tcp", "10.10.2.2:80", "hi"];
    assert_eq!(dial(&a, "0", &web), "10.10.2.2:80 one", "cgroup a's rule");
    assert_eq!(
        dial(&a, "0", &["tcp", "[fd00:2::2]:80", "hi"]),
        "[fd00:2::2]:80 one",
        "cgroup a's rule, IPv6"
    );
    assert_eq!(
        dial(&b, "1000", &web),
        "10.10.2.2:80 two",
        "uid 1000's rule"
    );
    assert_eq!(
        dial(&a, "1000", &web),
        "10.10.2.2:80 one",
        "in both: the first rule"
    );
    assert_eq!(dial(&b, "0", &web), "10.10.2.2:80 original", "in neither");
    let bypassed = ["tcp", "10.10.2.3:80", "hi"];
    assert_eq!(dial(&a, "0", &bypassed), "10.10.2.3:80 direct");
    assert_eq!(dial(&b, "1000", &bypassed), "10.10.2.3:80 direct");
    assert_eq!(one.peers().len(), 3);
    assert_eq!(two.peers().len(), 1);

    // Unconnected UDP: each datagram goes to its own process's listener.
    let query = ["sendto", "10.10.2.2:5353", "q"];
    assert_eq!(dial(&a, "0", &query), "10.10.2.2:5353 q");
    assert_eq!(dial(&b, "1000", &query), "10.10.2.2:5353 q");
    assert_eq!(dial(&b, "0", &query), "10.10.2.2:5353 q");
    assert_eq!(echo_one.peers.lock().unwrap().len(), 1);
    assert_eq!(echo_two.peers.lock().unwrap().len(), 1);

    // A selection by uid alone takes every cgroup: the programs sit at the root, once.
    let status = tproxy.status().unwrap();
    let local = status.stats.local_origin.as_ref().unwrap();
    let expected = [
        "cgroup /, every user".to_string(),
        format!("cgroup {}, every user", a.path),
        "cgroup /, uid 1000".to_string(),
    ];
    assert_eq!(local.selections, expected);
    assert_eq!(a.attached(CONNECT4).unwrap(), 0);
    tproxy.stop().unwrap();
    assert_eq!(routing_state(&topo.router, DEFAULT_TABLE).unwrap(), "");
}

/// A forwarded mark rule beside rules for local connections decides arrivals only: here it
/// bypasses every unmarked arrival on port 80 (ahead of a forwarded steer rule), and a
/// cgroup's connections to port 80 are still relayed by their own rule.
#[test]
fn a_forwarded_mark_rule_leaves_local_connections_to_their_rules() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("mark").unwrap();
    let _original = named_server(&topo.server, addr("10.10.2.2:80"), "original");
    let upstream = named_server(&topo.server, addr("10.10.2.3:8080"), "upstream");
    let file = format!(
        "interfaces = [\"{}\"]\n\
         [[listener]]\nname = \"up\"\nupstream = \"10.10.2.3:8080\"\n\
         [[rule]]\nproto = \"tcp\"\nports = 80\nmark = \"0x0/0xff\"\naction = \"bypass\"\n\
         [[rule]]\norigin = \"local\"\ncgroup = [\"{}\"]\nproto = \"tcp\"\nports = 80\n\
         action = \"steer\"\n\
         [[rule]]\nproto = \"tcp\"\nports = 80\naction = \"steer\"\n",
        Topo::ROUTER_CLIENT_IFACE,
        cgroup.path
    );
    let config = tproxy_tests::ConfigFile::new(&file).unwrap();
    let _tproxy =
        Tproxy::start_with_host_mounts(&topo.router, &["--config", config.path()]).unwrap();
    let line = dial_output(
        cgroup
            .run(&topo.router, &[], DIAL, &["tcp", "10.10.2.2:80", "hi"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(line, "10.10.2.2:80 upstream");
    assert_eq!(arrival(&topo, "10.10.2.2:80"), "original");
    assert_eq!(upstream.peers().len(), 1);
}

/// The ids of the programs on the pinned cgroup links, from `tproxy status --json`.
fn pinned_cgroup_programs(topo: &Topo, bpffs: &Bpffs) -> Vec<u64> {
    let (status, out, err) = run_tproxy_output(
        &topo.router,
        &["status", "--json", "--pin-dir", bpffs.path()],
    )
    .unwrap();
    assert!(status.success(), "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let links = report["pinned"]["cgroup_links"].as_array().unwrap().clone();
    links
        .iter()
        .map(|link| link["program_id"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_pinned_instances_cgroup_links_are_adopted_by_the_next_one_and_cleaned_up() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("pinned").unwrap();
    let bpffs = Bpffs::new().unwrap();
    let _original = named_server(&topo.server, addr("10.10.2.2:80"), "original");
    let upstream = named_server(&topo.server, addr("10.10.2.3:8080"), "upstream");
    let args = [
        "--local",
        "--cgroup",
        &cgroup.path,
        "--tcp",
        "80",
        "--upstream",
        "10.10.2.3:8080",
        "--fail-mode",
        "open",
        "--pin",
        "--pin-dir",
        bpffs.path(),
    ];
    let dial = || {
        dial_output(
            cgroup
                .run(&topo.router, &[], DIAL, &["tcp", "10.10.2.2:80", "hi"])
                .unwrap(),
        )
    };
    let attached =
        || [CONNECT4, CONNECT6, SENDMSG4, SENDMSG6].map(|hook| cgroup.attached(hook).unwrap());

    let mut first = Tproxy::start_with_host_mounts(&topo.router, &args).unwrap();
    assert_eq!(attached(), [1; 4]);
    assert_eq!(dial().unwrap(), "10.10.2.2:80 upstream");
    let first_programs = pinned_cgroup_programs(&topo, &bpffs);
    assert_eq!(first_programs.len(), 4, "one pinned link per program");
    first.stop().unwrap();
    assert_eq!(attached(), [1; 4], "the pinned links went with the process");

    // No instance: fail-open lets the cgroup's connection go direct.
    assert_eq!(dial().unwrap(), "10.10.2.2:80 original");

    let mut next = Tproxy::start_with_host_mounts(&topo.router, &args).unwrap();
    assert_eq!(attached(), [1; 4], "one set of programs after adoption");
    let next_programs = pinned_cgroup_programs(&topo, &bpffs);
    assert_eq!(next_programs.len(), 4);
    for (old, new) in first_programs.iter().zip(&next_programs) {
        assert_ne!(old, new, "the pinned link still runs the old program");
    }
    assert_eq!(dial().unwrap(), "10.10.2.2:80 upstream");
    assert_eq!(upstream.peers().len(), 2);
    next.stop().unwrap();

    let (status, out, err) =
        run_tproxy_output(&topo.router, &["cleanup", "--pin-dir", bpffs.path()]).unwrap();
    assert!(status.success(), "{out}{err}");
    assert_eq!(attached(), [0; 4], "cleanup left programs on the cgroup");
    assert_eq!(bpffs.pinned(), Vec::<String>::new());
    assert_eq!(routing_state(&topo.router, DEFAULT_TABLE).unwrap(), "");
    assert_eq!(dial().unwrap(), "10.10.2.2:80 original");
}

#[test]
fn an_upgrade_keeps_the_pinned_cgroup_links_and_a_start_for_another_cgroup_moves_them() {
    require_root();
    let topo = Topo::new().unwrap();
    let first = TestCgroup::new("first").unwrap();
    let second = TestCgroup::new("second").unwrap();
    let bpffs = Bpffs::new().unwrap();
    let _original = named_server(&topo.server, addr("10.10.2.2:80"), "original");
    let _upstream = named_server(&topo.server, addr("10.10.2.3:8080"), "upstream");
    let args = |cgroup: &TestCgroup| {
        [
            "--local",
            "--cgroup",
            &cgroup.path,
            "--tcp",
            "80",
            "--upstream",
            "10.10.2.3:8080",
            "--pin",
            "--pin-dir",
            bpffs.path(),
        ]
        .map(String::from)
    };
    let start = |cgroup: &TestCgroup| {
        let args = args(cgroup);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Tproxy::start_with_host_mounts(&topo.router, &args).unwrap()
    };
    let dial = |cgroup: &TestCgroup| {
        dial_output(
            cgroup
                .run(&topo.router, &[], DIAL, &["tcp", "10.10.2.2:80", "hi"])
                .unwrap(),
        )
        .unwrap()
    };
    let attached =
        |cgroup: &TestCgroup| [CONNECT4, SENDMSG6].map(|hook| cgroup.attached(hook).unwrap());
    let cgroup_links = || {
        bpffs
            .pinned()
            .into_iter()
            .filter(|path| path.contains("/cgroup-"))
            .count()
    };

    let mut old = start(&first);
    // Started while the old one runs: an upgrade, which takes the pinned links over.
    let mut new = start(&first);
    assert!(new.log_text().contains("took over from tproxy pid"));
    old.wait(std::time::Duration::from_secs(20)).unwrap();
    assert_eq!(attached(&first), [1, 1], "after the upgrade");
    assert_eq!(dial(&first), "10.10.2.2:80 upstream");
    assert_eq!(cgroup_links(), 4);
    new.stop().unwrap();

    let mut other = start(&second);
    assert_eq!(
        attached(&first),
        [0, 0],
        "the unselected cgroup kept its links"
    );
    assert_eq!(attached(&second), [1, 1]);
    assert_eq!(cgroup_links(), 4, "{:?}", bpffs.pinned());
    assert_eq!(dial(&first), "10.10.2.2:80 original");
    assert_eq!(dial(&second), "10.10.2.2:80 upstream");
    other.stop().unwrap();

    let (status, out, err) =
        run_tproxy_output(&topo.router, &["cleanup", "--pin-dir", bpffs.path()]).unwrap();
    assert!(status.success(), "{out}{err}");
    assert_eq!(
        attached(&second),
        [0, 0],
        "cleanup left programs on the cgroup"
    );
    assert_eq!(bpffs.pinned(), Vec::<String>::new());
}

/// A selected cgroup removed and created again, as systemd does when it restarts a unit, is
/// followed: the new directory (a new id, nothing attached) gets the programs, and its
/// processes are relayed again without a restart. So is a selected cgroup below the one the
/// programs are attached to (only its id changes).
#[test]
fn a_selected_cgroup_created_again_is_followed() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("again").unwrap();
    let child = cgroup.child("inner").unwrap();
    let _original = named_server(&topo.server, addr("10.10.2.2:80"), "original");
    let _other = named_server(&topo.server, addr("10.10.2.2:81"), "original");
    let upstream = named_server(&topo.server, addr("10.10.2.3:8080"), "upstream");
    let config = tproxy_tests::ConfigFile::new(&format!(
        "[[listener]]\nname = \"up\"\nupstream = \"10.10.2.3:8080\"\n\
         [[rule]]\norigin = \"local\"\nproto = \"tcp\"\nports = 80\ncgroup = [\"{}\"]\n\
         action = \"steer\"\nlistener = \"up\"\n\
         [[rule]]\norigin = \"local\"\nproto = \"tcp\"\nports = 81\ncgroup = [\"{}\"]\n\
         action = \"steer\"\nlistener = \"up\"\n",
        cgroup.path, child.path
    ))
    .unwrap();
    let mut tproxy =
        Tproxy::start_with_host_mounts(&topo.router, &["--config", config.path()]).unwrap();
    let dial = |cgroup: &TestCgroup, target: &str| {
        dial_output(
            cgroup
                .run(&topo.router, &[], DIAL, &["tcp", target, "hi"])
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(dial(&child, "10.10.2.2:81"), "10.10.2.2:81 upstream");
    child.recreate().unwrap();
    // The inner cgroup's new id is in force once tproxy has looked again; its connection
    // shows it (no log line: nothing is attached there).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while dial(&child, "10.10.2.2:81") != "10.10.2.2:81 upstream" {
        assert!(
            std::time::Instant::now() < deadline,
            "the re-created inner cgroup's connections are not relayed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(child);
    assert_eq!(dial(&cgroup, "10.10.2.2:80"), "10.10.2.2:80 upstream");
    for round in 0..2 {
        cgroup.recreate().unwrap();
        tproxy
            .wait_for_line(
                &format!("attached to cgroup `{}`", cgroup.path),
                std::time::Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(cgroup.attached(CONNECT4).unwrap(), 1, "round {round}");
        assert_eq!(
            dial(&cgroup, "10.10.2.2:80"),
            "10.10.2.2:80 upstream",
            "round {round}"
        );
    }
    assert!(upstream.peers().len() >= 4);
    tproxy.stop().unwrap();
    assert_eq!(cgroup.attached(CONNECT4).unwrap(), 0);
}

/// An HTTP server that answers every request with `name` as its body.
fn http_server(netns: &tproxy_tests::Netns, at: SocketAddr, name: &'static str) -> Server {
    Server::start(netns, at, move |mut stream| {
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
            request.push(byte[0]);
        }
        let _ = write!(
            stream,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
            name.len()
        );
    })
    .unwrap()
}

/// A DNS server that answers every query with one A record, `answer`, until dropped.
struct DnsServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl DnsServer {
    fn start(netns: &tproxy_tests::Netns, at: SocketAddr, answer: [u8; 4]) -> Self {
        let socket = netns.run(move || std::net::UdpSocket::bind(at)).unwrap();
        socket
            .set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let mut query = [0u8; 512];
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((len, from)) = socket.recv_from(&mut query) else {
                    continue;
                };
                // The header and the question (name, type, class); what follows (EDNS) is
                // left out of the answer.
                let mut end = 12;
                while end < len && query[end] != 0 {
                    end += usize::from(query[end]) + 1;
                }
                let question_end = end + 5;
                if question_end > len {
                    continue;
                }
                let mut reply = query[..question_end].to_vec();
                reply[2] = 0x81; // a response, recursion desired
                reply[3] = 0x80; // recursion available, no error
                reply[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]); // one answer
                                                                   // The question's name (a pointer to it), A, IN, TTL 60, 4 bytes.
                reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                reply.extend_from_slice(&answer);
                let _ = socket.send_to(&reply, from);
            }
        });
        DnsServer { stop }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The real clients the issue names: curl (TCP) and dig (UDP) in a selected cgroup reach
/// the server they were given through tproxy (the upstream answers), and the same commands
/// outside the cgroup go direct.
#[test]
fn curl_and_dig_in_the_cgroup_are_relayed_and_outside_it_go_direct() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("real").unwrap();
    let _original_http = http_server(&topo.server, addr("10.10.2.2:80"), "original");
    let upstream_http = http_server(&topo.server, addr("10.10.2.3:8080"), "upstream");
    let _original_dns = DnsServer::start(&topo.server, addr("10.10.2.2:53"), [192, 0, 2, 1]);
    let _upstream_dns = DnsServer::start(&topo.server, addr("10.10.2.3:8080"), [192, 0, 2, 2]);
    let _tproxy = Tproxy::start_with_host_mounts(
        &topo.router,
        &[
            "--local",
            "--cgroup",
            &cgroup.path,
            "--tcp",
            "80",
            "--udp",
            "53",
            "--upstream",
            "10.10.2.3:8080",
        ],
    )
    .unwrap();
    let stdout = |output: std::process::Output| {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    let curl = ["-s", "--max-time", "10", "http://10.10.2.2/"];
    let dig = ["+short", "+tries=1", "+time=5", "@10.10.2.2", "tproxy.test"];
    assert_eq!(
        stdout(cgroup.run(&topo.router, &[], "curl", &curl).unwrap()),
        "upstream"
    );
    assert_eq!(
        stdout(run_outside_cgroup(&topo.router, &[], "curl", &curl).unwrap()),
        "original"
    );
    assert_eq!(
        stdout(cgroup.run(&topo.router, &[], "dig", &dig).unwrap()),
        "192.0.2.2"
    );
    assert_eq!(
        stdout(run_outside_cgroup(&topo.router, &[], "dig", &dig).unwrap()),
        "192.0.2.1"
    );
    assert_eq!(upstream_http.peers().len(), 1);
}

/// A selected cgroup whose parent (not selected) is removed and created again with it is
/// followed too: the parent's directory is watched from above, and the programs go to the
/// new child (before, the watch went with the parent and the cgroup stayed unsteered until
/// a restart; found by the hostile test).
#[test]
fn a_selected_cgroup_created_again_with_its_parent_is_followed() {
    require_root();
    let topo = Topo::new().unwrap();
    let parent = TestCgroup::new("parent").unwrap();
    let cgroup = parent.child("selected").unwrap();
    let _original = named_server(&topo.server, addr("10.10.2.2:80"), "original");
    let _upstream = named_server(&topo.server, addr("10.10.2.3:8080"), "upstream");
    let mut tproxy = Tproxy::start_with_host_mounts(
        &topo.router,
        &[
            "--local",
            "--cgroup",
            &cgroup.path,
            "--tcp",
            "80",
            "--upstream",
            "10.10.2.3:8080",
        ],
    )
    .unwrap();
    let dial = || {
        dial_output(
            cgroup
                .run(&topo.router, &[], DIAL, &["tcp", "10.10.2.2:80", "hi"])
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(dial(), "10.10.2.2:80 upstream");
    for round in 0..2 {
        cgroup.recreate_with_parent(&parent).unwrap();
        tproxy
            .wait_for_line(
                &format!("attached to cgroup `{}`", cgroup.path),
                std::time::Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(dial(), "10.10.2.2:80 upstream", "round {round}");
    }
    tproxy.stop().unwrap();
    assert_eq!(cgroup.attached(CONNECT4).unwrap(), 0);
}

#[test]
fn a_classid_selection_leaves_the_excluded_net_cls_class_alone() {
    require_root();
    let topo = Topo::new().unwrap();
    // The proxy's own processes in class 1, as sing-box's start scripts put them; the rule
    // takes every class id but 1 (`-m cgroup ! --cgroup 1`), a process in no class (0)
    // included. The clients run in a cgroup of their own: tproxy's cgroup, the test's, is
    // never steered.
    let cgroup = TestCgroup::new("netcls").unwrap();
    let excluded = NetClsClass::new(1).unwrap();
    let other = NetClsClass::new(0x100002).unwrap();
    let _original = named_server(&topo.server, addr("10.10.2.2:80"), "original");
    let upstream = named_server(&topo.server, addr("10.10.2.3:8080"), "upstream");
    let config = tproxy_tests::ConfigFile::new(
        "[[listener]]\nname = \"up\"\nupstream = \"10.10.2.3:8080\"\n\
         [[rule]]\norigin = \"local\"\nproto = \"tcp\"\nports = 80\n\
         classid = [0, \"2-4294967295\"]\naction = \"steer\"\nlistener = \"up\"\n",
    )
    .unwrap();
    let tproxy =
        Tproxy::start_with_host_mounts(&topo.router, &["--config", config.path()]).unwrap();
    let dial_in = |class: Option<&NetClsClass>| {
        let wrapper = class.map(NetClsClass::wrapper);
        let wrapper: Vec<&str> = wrapper.iter().flatten().map(String::as_str).collect();
        dial_output(
            cgroup
                .run(&topo.router, &wrapper, DIAL, &["tcp", "10.10.2.2:80", "hi"])
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(dial_in(Some(&excluded)), "10.10.2.2:80 original");
    assert_eq!(dial_in(None), "10.10.2.2:80 upstream", "no class");
    assert_eq!(dial_in(Some(&other)), "10.10.2.2:80 upstream");
    assert_eq!(upstream.peers().len(), 2);
    let status = tproxy.status().unwrap();
    let selection = status.stats.local_origin.as_ref().unwrap();
    assert_eq!(
        selection.selections,
        ["cgroup /, every user, net_cls class 0, 2-4294967295"]
    );
}

/// The kernel's `BPF_CGROUP_UDP4_RECVMSG` and `BPF_CGROUP_UDP6_RECVMSG`.
const RECVMSG4: u32 = 19;
const RECVMSG6: u32 = 20;

/// The `recvmsg` programs, which follow local UDP flows' directions for rules with
/// `ct_direction`, cost every UDP receive of the host a socket lock: they are attached only
/// while such a rule is in force, and a reload adds and removes them beside the others.
#[test]
fn the_recvmsg_programs_come_and_go_with_rules_for_a_datagrams_direction() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("recvmsg").unwrap();
    let file = |direction: &str| {
        format!(
            "interfaces = [\"{}\"]\n\
             [[listener]]\nname = \"dns\"\nlisten = [\"127.0.0.1:15053\"]\n\
             [[rule]]\norigin = \"local\"\nproto = \"udp\"\ncgroup = [\"{path}\"]\n\
             {direction}action = \"bypass\"\n\
             [[rule]]\norigin = \"local\"\nproto = \"udp\"\nports = 53\n\
             cgroup = [\"{path}\"]\naction = \"steer\"\nlistener = \"dns\"\n",
            Topo::ROUTER_CLIENT_IFACE,
            path = cgroup.path
        )
    };
    let attached =
        || [CONNECT4, SENDMSG4, RECVMSG4, RECVMSG6].map(|hook| cgroup.attached(hook).unwrap());
    // Started without: the programs a later rule set may need are loaded all the same, while
    // tproxy still has the privileges to (a reload runs without them).
    let config = tproxy_tests::ConfigFile::new(&file("")).unwrap();
    let mut tproxy =
        Tproxy::start_with_host_mounts(&topo.router, &["--config", config.path()]).unwrap();
    assert_eq!(attached(), [1, 1, 0, 0], "without a direction rule");
    let reload = |text: &str| {
        config.rewrite(text).unwrap();
        let (status, stderr) = tproxy_tests::run_tproxy_to_end(&topo.router, &["reload"]).unwrap();
        assert!(status.success(), "reload: {stderr}");
    };
    reload(&file("ct_direction = \"reply\"\n"));
    assert_eq!(attached(), [1, 1, 1, 1], "with one");
    reload(&file(""));
    assert_eq!(attached(), [1, 1, 0, 0], "without one again");
    tproxy.stop().unwrap();
    assert_eq!(attached(), [0; 4], "left attached after stop");
}

/// `out_interface` goes by the route the kernel takes: a route whose interface has lost its
/// carrier while `ignore_routes_with_linkdown` is on there is dead, and the kernel's lookup
/// takes the next metric's instead, out of the steered interface (a dual-uplink host's
/// failover). Its connections are relayed, and go direct again once the carrier is back.
#[test]
fn out_interface_follows_the_kernel_past_a_dead_route() {
    require_root();
    let topo = Topo::new().unwrap();
    let cgroup = TestCgroup::new("dead-route").unwrap();
    // 10.10.9.1 on both sides; the router reaches it by the client's side first.
    for side in [&topo.client, &topo.server] {
        side.ip(&["addr", "add", "10.10.9.1/32", "dev", "lo"])
            .unwrap();
    }
    let _lan = named_server(&topo.client, addr("10.10.9.1:80"), "lan");
    let _wan = named_server(&topo.server, addr("10.10.9.1:80"), "wan");
    let _upstream = named_server(&topo.server, addr("10.10.2.3:8080"), "upstream");
    for (via, dev, metric) in [
        ("10.10.1.2", Topo::ROUTER_CLIENT_IFACE, "10"),
        ("10.10.2.2", "to-server", "20"),
    ] {
        topo.router
            .ip(&[
                "route",
                "add",
                "10.10.9.0/24",
                "via",
                via,
                "dev",
                dev,
                "metric",
                metric,
            ])
            .unwrap();
    }
    topo.router
        .sysctl("net.ipv4.conf.to-client.ignore_routes_with_linkdown", "1")
        .unwrap();
    let config = tproxy_tests::ConfigFile::new(&format!(
        "[[listener]]\nname = \"up\"\nupstream = \"10.10.2.3:8080\"\n\
         [[rule]]\norigin = \"local\"\nproto = \"tcp\"\nports = 80\ncgroup = [\"{}\"]\n\
         out_interface = \"to-server\"\naction = \"steer\"\nlistener = \"up\"\n",
        cgroup.path
    ))
    .unwrap();
    let mut tproxy =
        Tproxy::start_with_host_mounts(&topo.router, &["--config", config.path()]).unwrap();
    let local = || {
        dial_output(
            cgroup
                .run(&topo.router, &[], DIAL, &["tcp", "10.10.9.1:80", "hi"])
                .unwrap(),
        )
        .unwrap()
    };
    let route = || topo.router.ip(&["route", "get", "10.10.9.1"]).unwrap();
    // The kernel marks the route after the carrier goes (linkwatch), and the route map
    // follows the link event within half a second of its settling.
    let eventually = |expected: &str, answer: &dyn Fn() -> String| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let answer = answer();
            if answer.contains(expected) || std::time::Instant::now() > deadline {
                return answer;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    assert!(route().contains("dev to-client"), "{}", route());
    assert_eq!(local(), "10.10.9.1:80 lan");
    // The client's end down: the router's end loses its carrier.
    topo.client.ip(&["link", "set", "eth0", "down"]).unwrap();
    let taken = eventually("dev to-server", &route);
    assert!(taken.contains("dev to-server"), "{taken}");
    assert_eq!(
        eventually("10.10.9.1:80 upstream", &local),
        "10.10.9.1:80 upstream"
    );
    topo.client.ip(&["link", "set", "eth0", "up"]).unwrap();
    assert_eq!(eventually("10.10.9.1:80 lan", &local), "10.10.9.1:80 lan");
    tproxy.stop().unwrap();
}
