//! Rules that match the packet mark, on the router, against iptables' `-m mark` for the same
//! probes. Where the mark comes from matters and is the same for both: a forwarded packet's
//! mark is 0 when it reaches the router (the kernel scrubs it when a packet moves between
//! network namespaces, so the client cannot set it), and tproxy's program runs at tc ingress,
//! before netfilter, so a PREROUTING `-j MARK` comes too late for it. What does set it ahead
//! of both is another eBPF program attached at the same TCX ingress before tproxy's: the
//! test's [`Marker`].

use std::{
    net::SocketAddr,
    os::fd::{FromRawFd, OwnedFd},
};

use tproxy_tests::{
    ingress_programs, peer_seen_by, remove_iptables_tproxy, require_root, restore_iptables,
    tproxy_with_input, udp_client, udp_exchange, ConfigFile, Netns, RouterTopology as Topo, Server,
    Tproxy, UdpEcho,
};

/// A TCX ingress program that sets every packet's mark to one value and hands it on, attached
/// ahead of every other program at an interface for as long as it lives.
struct Marker {
    _link: OwnedFd,
}

/// The name the marker's program shows under.
const MARKER_NAME: &str = "test_marker";

impl Marker {
    fn attach(netns: &Netns, iface: &str, mark: u32) -> Self {
        let iface = std::ffi::CString::new(iface).unwrap();
        let link = netns.run(move || {
            // SAFETY: a name from a CString.
            let ifindex = unsafe { libc::if_nametoindex(iface.as_ptr()) };
            assert_ne!(ifindex, 0, "{iface:?} not found");
            let program = load_marker(mark);
            attach_first(&program, ifindex)
        });
        Marker { _link: link }
    }
}

/// `bpf(2)` with an attribute buffer (zeroed past what the command reads).
fn bpf(command: libc::c_long, attr: &mut [u8; 128]) -> OwnedFd {
    // SAFETY: the attribute buffer is as large as the kernel's `union bpf_attr` prefix for
    // these commands, and lives across the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_mut_ptr(), attr.len()) };
    assert!(
        fd >= 0,
        "bpf({command}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor the kernel just returned.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// `r2 = mark; skb->mark = r2; return TCX_NEXT`.
fn load_marker(mark: u32) -> OwnedFd {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
    // code, dst/src registers, offset, immediate.
    let insn = |code: u8, regs: u8, off: i16, imm: i32| -> u64 {
        u64::from(code)
            | u64::from(regs) << 8
            | u64::from(off as u16) << 16
            | u64::from(imm as u32) << 32
    };
    let program = [
        insn(0xb7, 0x02, 0, mark as i32), // mov r2, mark
        insn(0x63, 0x21, 8, 0),           // *(u32 *)(r1 + offsetof(__sk_buff, mark)) = r2
        insn(0xb7, 0x00, 0, -1),          // mov r0, TCX_NEXT
        insn(0x95, 0, 0, 0),              // exit
    ];
    let license = c"GPL";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
    attr[4..8].copy_from_slice(&(program.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(program.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..48 + MARKER_NAME.len()].copy_from_slice(MARKER_NAME.as_bytes());
    bpf(BPF_PROG_LOAD, &mut attr)
}

/// Links `program` at the TCX ingress of `ifindex`, before every program already there.
fn attach_first(program: &OwnedFd, ifindex: u32) -> OwnedFd {
    use std::os::fd::AsRawFd;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_TCX_INGRESS: u32 = 46;
    const BPF_F_BEFORE: u32 = 1 << 3;
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    attr[8..12].copy_from_slice(&BPF_TCX_INGRESS.to_ne_bytes());
    attr[12..16].copy_from_slice(&BPF_F_BEFORE.to_ne_bytes());
    bpf(BPF_LINK_CREATE, &mut attr)
}

/// A TCP probe and a UDP probe through the router.
const TCP: &str = "10.10.2.2:80";
const UDP: &str = "10.10.2.2:53";

/// The client's marks set at the router (`None`: no marker), and what the rules below do
/// with each: TCP is left alone when the bits 0xf0 are 0x10, UDP steered only with the mark
/// exactly 0x20.
const CASES: &[(Option<u32>, bool, bool)] = &[
    (None, true, false),
    (Some(0x10), false, false),
    (Some(0x20), true, true),
    (Some(0x110), false, false),
    (Some(0x1f0), true, false),
];

/// The rule set on the router, the mark rules between a socket-match divert and the TPROXY
/// rules (entered for the client's side only: the server's replies must not be caught).
const RULES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:DIVERT - [0:0]
-A PREROUTING -p tcp -m socket -j DIVERT
-A PREROUTING -p udp -m socket --transparent -j DIVERT
-A PREROUTING -i to-client -p tcp -m mark --mark 0x10/0xf0 -j RETURN
-A PREROUTING -i to-client -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PREROUTING -i to-client -p udp -m mark --mark 0x20 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A DIVERT -j ACCEPT
COMMIT
";

/// For each case: whether the TCP probe and the UDP probe were intercepted (their server saw
/// the router instead of the client), with the marker of the case attached meanwhile.
fn probe_each_mark(
    topo: &Topo,
    udp_server: &UdpEcho,
    cases: &[(Option<u32>, bool, bool)],
) -> Vec<(Option<u32>, bool, bool)> {
    let router = Topo::router_as_seen_by_server(false);
    cases
        .iter()
        .map(|&(mark, ..)| {
            let _marker = mark.map(|mark| {
                let marker = Marker::attach(&topo.router, Topo::ROUTER_CLIENT_IFACE, mark);
                let programs = ingress_programs(&topo.router, Topo::ROUTER_CLIENT_IFACE).unwrap();
                assert_eq!(programs.first().map(String::as_str), Some(MARKER_NAME));
                marker
            });
            let tcp = peer_seen_by(&topo.client, TCP.parse().unwrap()).unwrap() == router;
            udp_server.peers.lock().unwrap().clear();
            let to: SocketAddr = UDP.parse().unwrap();
            let client = udp_client(&topo.client, to).unwrap();
            let (reply, from) = udp_exchange(&client, to, b"probe").unwrap();
            assert_eq!((reply.as_slice(), from), (&b"probe"[..], to));
            let udp = udp_server.peer_ips() == [router];
            (mark, tcp, udp)
        })
        .collect()
}

/// The marks a packet carries into tc ingress decide as `-m mark` decides in PREROUTING, for
/// the translation of the same rule set; a PREROUTING `-j MARK` is too late for tproxy.
#[test]
fn mark_rules_steer_what_iptables_mark_matches_steer() {
    require_root();
    let topo = Topo::new().unwrap();
    let _tcp_server = Server::tell_peer(&topo.server, TCP.parse().unwrap()).unwrap();
    let udp_server = UdpEcho::start(&topo.server, UDP.parse().unwrap()).unwrap();
    let (status, text, stderr) = tproxy_with_input(&["translate"], RULES).unwrap();
    assert!(status.success(), "translate failed: {stderr}\n{text}");
    assert!(
        text.contains("mark = \"0x10/0xf0\"") && text.contains("mark = \"0x20\""),
        "{text}"
    );
    let config = ConfigFile::new(&text).unwrap();

    // The original: iptables steers, tproxy's relay serves the TPROXY port. TPROXY's mark
    // joins the client's, so the routing rule looks at its bit alone.
    restore_iptables(&topo.router, RULES).unwrap();
    topo.router
        .ip(&["rule", "add", "fwmark", "0x1/0x1", "lookup", "100"])
        .unwrap();
    let mut relay =
        Tproxy::start(&topo.router, &["--relay-only", "--config", config.path()]).unwrap();
    let original = probe_each_mark(&topo, &udp_server, CASES);
    relay.stop().unwrap();
    topo.router
        .ip(&["rule", "del", "fwmark", "0x1/0x1", "lookup", "100"])
        .unwrap();
    remove_iptables_tproxy(&topo.router).unwrap();
    assert_eq!(original, CASES, "what iptables steers");

    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let translated = probe_each_mark(&topo, &udp_server, CASES);
    assert_eq!(translated, original, "translated config:\n{text}");

    // A mark set by netfilter, after tc ingress, is not the mark tproxy sees.
    restore_iptables(
        &topo.router,
        "*mangle\n-A PREROUTING -i to-client -j MARK --set-xmark 0x10/0xf0\nCOMMIT\n",
    )
    .unwrap();
    let tcp = peer_seen_by(&topo.client, TCP.parse().unwrap()).unwrap();
    assert_eq!(tcp, Topo::router_as_seen_by_server(false), "steered");
    tproxy.stop().unwrap();
}

/// A source address on a rule for local connections is refused, naming the rule (a
/// connecting socket's source is not chosen yet); a mark is the socket's and a source port
/// its bound port, both taken; forwarded rules with either go with rules for local
/// connections (README, "Marks").
#[test]
fn a_source_address_on_a_rule_for_local_connections_is_refused_and_a_mark_or_port_taken() {
    let file = |matches: &str, origin: &str| {
        format!(
            r#"
[[listener]]
name = "up"
upstream = "10.10.2.3:8080"

[[rule]]
proto = "tcp"
ports = 80
{matches}
action = "bypass"
origin = "{origin}"

[[rule]]
proto = "tcp"
ports = 80
action = "steer"
origin = "local"
"#
        )
    };
    let check = |matches: &str, origin: &str| {
        let config = ConfigFile::new(&file(matches, origin)).unwrap();
        tproxy_with_input(&["check", "--config", config.path()], "").unwrap()
    };
    let (status, _, stderr) = check("mark = \"0xff\"", "any");
    assert!(status.success(), "{stderr}");
    // For local connections, the socket's bound port.
    let (status, _, stderr) = check("sport = 7777", "any");
    assert!(status.success(), "{stderr}");
    let (status, _, stderr) = check("src = \"192.0.2.0/24\"", "any");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("origin \"any\" with `src`"), "{stderr}");
    for matches in ["mark = \"0xff\"", "sport = 7777"] {
        let (status, _, stderr) = check(matches, "forwarded");
        assert!(status.success(), "{matches}: {stderr}");
    }
}

/// The client's marks, and what the negated rules below do with each: TCP is left alone
/// unless the bits 0x30 are 0x10, UDP steered unless the bits 0xf0 are 0x20.
const NEGATED_CASES: &[(Option<u32>, bool, bool)] = &[
    (None, false, true),
    (Some(0x10), true, true),
    (Some(0x20), false, false),
    (Some(0x30), false, true),
    (Some(0x110), true, true),
    (Some(0x120), false, false),
    (Some(0x1f0), false, true),
];

/// v2rayA's `-m mark ! --mark 0x40/0xc0 -j RETURN` in the same form, and an excluded mark on
/// a TPROXY rule.
const NEGATED_RULES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:DIVERT - [0:0]
-A PREROUTING -p tcp -m socket -j DIVERT
-A PREROUTING -p udp -m socket --transparent -j DIVERT
-A PREROUTING -i to-client -p tcp -m mark ! --mark 0x10/0x30 -j RETURN
-A PREROUTING -i to-client -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PREROUTING -i to-client -p udp -m mark ! --mark 0x20/0xf0 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A DIVERT -j ACCEPT
COMMIT
";

/// An excluded mark, translated into a rule per bit that differs from it, steers what
/// iptables' `-m mark ! --mark` steers, for marks that differ in one bit, in several, and in
/// bits outside the mask only.
#[test]
fn negated_mark_rules_steer_what_iptables_steers() {
    require_root();
    let topo = Topo::new().unwrap();
    let _tcp_server = Server::tell_peer(&topo.server, TCP.parse().unwrap()).unwrap();
    let udp_server = UdpEcho::start(&topo.server, UDP.parse().unwrap()).unwrap();
    let (status, text, stderr) = tproxy_with_input(&["translate"], NEGATED_RULES).unwrap();
    assert!(status.success(), "translate failed: {stderr}\n{text}");
    for piece in [
        "0x0/0x10",
        "0x20/0x20",
        "0x0/0x20",
        "0x10/0x10",
        "0x40/0x40",
        "0x80/0x80",
    ] {
        assert!(
            text.contains(&format!("mark = \"{piece}\"")),
            "{piece}: {text}"
        );
    }
    same_fates_translated(&topo, &udp_server, NEGATED_RULES, &text, NEGATED_CASES);
}

/// Probes each of `cases` behind iptables' `rules` (tproxy relaying what their TPROXY rules
/// hand it) and behind `translation` of them, and checks both steer what `cases` says.
fn same_fates_translated(
    topo: &Topo,
    udp_server: &UdpEcho,
    rules: &str,
    translation: &str,
    cases: &[(Option<u32>, bool, bool)],
) {
    let config = ConfigFile::new(translation).unwrap();
    restore_iptables(&topo.router, rules).unwrap();
    topo.router
        .ip(&["rule", "add", "fwmark", "0x1/0x1", "lookup", "100"])
        .unwrap();
    let mut relay =
        Tproxy::start(&topo.router, &["--relay-only", "--config", config.path()]).unwrap();
    let original = probe_each_mark(topo, udp_server, cases);
    relay.stop().unwrap();
    topo.router
        .ip(&["rule", "del", "fwmark", "0x1/0x1", "lookup", "100"])
        .unwrap();
    remove_iptables_tproxy(&topo.router).unwrap();
    assert_eq!(original, cases, "what iptables steers");

    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let translated = probe_each_mark(topo, udp_server, cases);
    tproxy.stop().unwrap();
    assert_eq!(translated, original, "translated config:\n{translation}");
}

/// A mark rule ahead of a rule with a longer destination prefix and another action, as
/// ikev2-manager's rule set has them (tests/corpus/translate/ikev2-manager-domain-router-nft.rules):
/// the marked packets keep the mark rule's action, which tproxy's precedence (the longer
/// prefix first) would give to the later rule. Fates as [`CASES`].
const FIRST_COME_RULES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:DIVERT - [0:0]
-A PREROUTING -p tcp -m socket -j DIVERT
-A PREROUTING -p udp -m socket --transparent -j DIVERT
-A PREROUTING -i to-client -p tcp -m mark --mark 0x10/0xf0 -j RETURN
-A PREROUTING -i to-client -d 10.10.2.0/24 -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PREROUTING -i to-client -p udp -m mark --mark 0x20 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PREROUTING -i to-client -d 10.10.2.2/32 -p udp -j RETURN
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A DIVERT -j ACCEPT
COMMIT
";

/// Before, translate refused such rule sets ("marks and selectors are not combined").
#[test]
fn a_mark_rule_ahead_of_a_longer_prefix_keeps_its_packets_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let _tcp_server = Server::tell_peer(&topo.server, TCP.parse().unwrap()).unwrap();
    let udp_server = UdpEcho::start(&topo.server, UDP.parse().unwrap()).unwrap();
    let (status, text, stderr) = tproxy_with_input(&["translate"], FIRST_COME_RULES).unwrap();
    assert!(status.success(), "translate failed: {stderr}\n{text}");
    assert!(
        text.matches("takes first").count() == 2,
        "a rule of their own for each mark rule's packets: {text}"
    );
    same_fates_translated(&topo, &udp_server, FIRST_COME_RULES, &text, CASES);
}

/// The client's marks set at the router, and what istio's rules below do with each: only
/// TCP marked exactly 0x53a is steered.
const ISTIO_CASES: &[(Option<u32>, bool, bool)] = &[
    (None, false, false),
    (Some(0x53a), true, false),
    (Some(0x53b), false, false),
    (Some(0x153a), false, false),
];

/// istio's TPROXY mode (tests/corpus/translate/istio-tproxy.rules), on the client's side in
/// place of lo: its loop guard is the TPROXY mark itself, and `! --mark 0x53a -j RETURN`
/// (32 bits, too many for a rule per bit) lets the packets marked 0x53a fall through to
/// TPROXY.
const ISTIO_RULES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:ISTIO_DIVERT - [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_TPROXY - [0:0]
-A PREROUTING -i to-client -p tcp -j ISTIO_INBOUND
-A ISTIO_DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A ISTIO_DIVERT -j ACCEPT
-A ISTIO_INBOUND -p tcp -m mark --mark 0x1 -j RETURN
-A ISTIO_INBOUND -i to-client -p tcp -m mark ! --mark 0x53a -j RETURN
-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT
-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY
-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x1/0xffffffff
COMMIT
";

/// The negated full-mask mark falls through as in iptables: the rules after it are repeated
/// for the packets marked 0x53a (before, it was reported, and so was the guard on the TPROXY
/// mark, which is now the socket mark beside tproxy's own routing bit).
#[test]
fn istios_negated_mark_falls_through_to_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let _tcp_server = Server::tell_peer(&topo.server, TCP.parse().unwrap()).unwrap();
    let udp_server = UdpEcho::start(&topo.server, UDP.parse().unwrap()).unwrap();
    let (status, text, stderr) = tproxy_with_input(&["translate"], ISTIO_RULES).unwrap();
    assert!(status.success(), "translate failed: {stderr}\n{text}");
    assert!(
        text.contains("mark = \"0x53a\"")
            && text.contains("socket_mark = \"0x1\"")
            && text.contains("\nmark = \"0x1000000/0x1000000\""),
        "{text}"
    );
    let config = ConfigFile::new(&text).unwrap();

    // Behind iptables the relay's own connections must not carry the guard's mark, which
    // the TPROXY mark's policy routing would deliver locally.
    restore_iptables(&topo.router, ISTIO_RULES).unwrap();
    let mut relay = Tproxy::start(
        &topo.router,
        &[
            "--relay-only",
            "--config",
            config.path(),
            "--socket-mark",
            "0x2000000",
        ],
    )
    .unwrap();
    let original = probe_each_mark(&topo, &udp_server, ISTIO_CASES);
    relay.stop().unwrap();
    remove_iptables_tproxy(&topo.router).unwrap();
    assert_eq!(original, ISTIO_CASES, "what iptables steers");

    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let translated = probe_each_mark(&topo, &udp_server, ISTIO_CASES);
    tproxy.stop().unwrap();
    assert_eq!(translated, original, "translated config:\n{text}");
}

/// Two mark matches in one rule match what both allow (`0x10/0x10` and `0x0/0x20` are
/// `0x10/0x30`, which decides [`CASES`] as `0x10/0xf0` does). Found by the hostile tester:
/// translate kept the last one only, and then left unmarked traffic alone.
#[test]
fn two_mark_matches_in_one_rule_steer_what_both_allow_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let _tcp_server = Server::tell_peer(&topo.server, TCP.parse().unwrap()).unwrap();
    let udp_server = UdpEcho::start(&topo.server, UDP.parse().unwrap()).unwrap();
    let rules = RULES.replace(
        "-m mark --mark 0x10/0xf0",
        "-m mark --mark 0x10/0x10 -m mark --mark 0x0/0x20",
    );
    assert_ne!(rules, RULES);
    let (status, text, stderr) = tproxy_with_input(&["translate"], &rules).unwrap();
    assert!(status.success(), "translate failed: {stderr}\n{text}");
    assert!(text.contains("mark = \"0x10/0x30\""), "{text}");
    same_fates_translated(&topo, &udp_server, &rules, &text, CASES);
}
