//! Kernel ipsets that rules follow (`dst = "ipset:NAME"`): an iptables rule set matching a
//! set that is filled at run time (`-m set --match-set NAME dst`, no `--ipset-file`) and its
//! translation steer the same flows; the running tproxy follows `ipset add` and `ipset del`;
//! a set that cannot be read stops `check` and `run` with its name, leaving nothing behind.

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use tproxy_tests::{
    ingress_programs, peer_seen_by, remove_iptables_tproxy, require_root, restore_iptables,
    routing_state, run_tproxy_to_end, tproxy_with_input, udp_client, udp_exchange, ConfigFile,
    Netns, RouterTopology as Topo, Server, Tproxy, UdpEcho, DEFAULT_TABLE,
};

const IFACE: &str = Topo::ROUTER_CLIENT_IFACE;

/// Runs `ipset ARGS…` in `netns`.
fn ipset(netns: &Netns, args: &[&str]) {
    let output = Command::new("ip")
        .args(["netns", "exec", &netns.name, "ipset"])
        .args(args)
        .output()
        .expect("running ipset (package ipset, see `cargo xtask setup`)");
    assert!(
        output.status.success(),
        "ipset {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// An OpenWrt gfwlist setup: the set is created empty and filled at run time (by dnsmasq
/// there, by `ipset add` here). Port 8080 is left alone ahead of the set's rules, so the
/// translation needs a rule naming the set for the packets that rule takes first.
const GFWLIST_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:DIVERT - [0:0]
-A PREROUTING -p tcp -m socket --transparent -j DIVERT
-A PREROUTING -p udp -m socket --transparent -j DIVERT
-A PREROUTING -i to-client -p tcp -m tcp --dport 8080 -j RETURN
-A PREROUTING -i to-client -p tcp -m set --match-set gfwlist dst -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PREROUTING -i to-client -p udp -m set --match-set gfwlist dst -j TPROXY --on-port 15053 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A DIVERT -j ACCEPT
COMMIT
";

/// The TCP probes, then the UDP ones.
const TCP_PROBES: [&str; 4] = [
    "10.10.2.2:80",
    "10.10.2.2:8080",
    "10.10.2.3:80",
    "10.10.2.3:8080",
];
const UDP_PROBES: [&str; 2] = ["10.10.2.2:53", "10.10.2.3:53"];

struct Probes {
    _tcp: Vec<Server>,
    udp: Vec<UdpEcho>,
}

impl Probes {
    fn start(topo: &Topo) -> Self {
        Probes {
            _tcp: TCP_PROBES
                .iter()
                .map(|addr| Server::tell_peer(&topo.server, addr.parse().unwrap()).unwrap())
                .collect(),
            udp: UDP_PROBES
                .iter()
                .map(|addr| UdpEcho::start(&topo.server, addr.parse().unwrap()).unwrap())
                .collect(),
        }
    }

    /// Whether a TCP flow to `addr` reached its server from the router (steered).
    fn tcp_steered(topo: &Topo, addr: &str) -> bool {
        peer_seen_by(&topo.client, addr.parse().unwrap()).unwrap()
            == Topo::router_as_seen_by_server(false)
    }

    /// The probes that were steered, by name.
    fn steered(&self, topo: &Topo) -> Vec<String> {
        let mut steered: Vec<String> = TCP_PROBES
            .iter()
            .filter(|addr| Self::tcp_steered(topo, addr))
            .map(|addr| format!("tcp {addr}"))
            .collect();
        for (server, addr) in self.udp.iter().zip(UDP_PROBES) {
            let addr: SocketAddr = addr.parse().unwrap();
            server.peers.lock().unwrap().clear();
            let client = udp_client(&topo.client, addr).unwrap();
            let (reply, from) = udp_exchange(&client, addr, b"probe").unwrap();
            assert_eq!((reply.as_slice(), from), (&b"probe"[..], addr));
            if server.peer_ips()[0] == Topo::router_as_seen_by_server(false) {
                steered.push(format!("udp {addr}"));
            }
        }
        steered
    }
}

/// Waits (up to a generous limit, not a timed assertion) until tproxy's rules in force say
/// whether they hold `needle`; returns them either way.
fn rules_when(tproxy: &Tproxy, needle: &str, present: bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rules = tproxy.status().unwrap().rules;
        if rules.iter().any(|r| r.contains(needle)) == present || Instant::now() > deadline {
            return rules;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_set_filled_at_run_time_steers_the_same_flows_translated_and_is_followed() {
    require_root();
    let topo = Topo::new().unwrap();
    let probes = Probes::start(&topo);
    ipset(&topo.router, &["create", "gfwlist", "hash:net"]);
    ipset(&topo.router, &["add", "gfwlist", "10.10.2.2"]);
    let (status, text, stderr) = tproxy_with_input(&["translate"], GFWLIST_IPTABLES).unwrap();
    assert!(status.success(), "translate failed: {stderr}\n{text}");
    assert!(text.contains("dst = \"ipset:gfwlist\""), "{text}");
    let config = ConfigFile::new(&text).unwrap();

    restore_iptables(&topo.router, GFWLIST_IPTABLES).unwrap();
    let mut relay =
        Tproxy::start(&topo.router, &["--relay-only", "--config", config.path()]).unwrap();
    let original = probes.steered(&topo);
    relay.stop().unwrap();
    remove_iptables_tproxy(&topo.router).unwrap();
    assert_eq!(
        original,
        ["tcp 10.10.2.2:80", "udp 10.10.2.2:53"],
        "iptables"
    );

    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    assert_eq!(
        probes.steered(&topo),
        original,
        "translated config:\n{text}"
    );

    // An entry added while tproxy runs is steered once it is read; one deleted is not.
    ipset(&topo.router, &["add", "gfwlist", "10.10.2.3"]);
    let rules = rules_when(&tproxy, "10.10.2.3/32", true);
    assert!(
        rules.iter().any(|r| r.contains("10.10.2.3/32")),
        "the added entry's rules: {rules:#?}"
    );
    assert!(Probes::tcp_steered(&topo, "10.10.2.3:80"));
    assert!(
        !Probes::tcp_steered(&topo, "10.10.2.3:8080"),
        "the earlier RETURN still takes port 8080"
    );
    ipset(&topo.router, &["del", "gfwlist", "10.10.2.2"]);
    let rules = rules_when(&tproxy, "10.10.2.2/32", false);
    assert!(
        !rules.iter().any(|r| r.contains("10.10.2.2/32")),
        "the deleted entry's rules go: {rules:#?}"
    );
    assert!(!Probes::tcp_steered(&topo, "10.10.2.2:80"));

    // A set that can no longer be read keeps the rules made of what was read last.
    ipset(&topo.router, &["destroy", "gfwlist"]);
    tproxy
        .wait_for_line("following ipset gfwlist", Duration::from_secs(30))
        .unwrap();
    assert!(Probes::tcp_steered(&topo, "10.10.2.3:80"));
    tproxy.stop().unwrap();
}

#[test]
fn a_missing_set_or_one_of_another_type_is_refused_by_name_and_leaves_nothing_behind() {
    require_root();
    let topo = Topo::new().unwrap();
    ipset(&topo.router, &["create", "ports", "hash:net,port"]);
    for (set, reason) in [
        ("nosuch", "no such set"),
        (
            "ports",
            "hash:net,port; tproxy reads sets of type hash:ip and hash:net",
        ),
    ] {
        let config = ConfigFile::new(&format!(
            "interfaces = [\"{IFACE}\"]\n\n[[listener]]\nname = \"proxy\"\n\n\
             [[rule]]\nproto = \"tcp\"\ndst = \"ipset:{set}\"\naction = \"steer\"\n"
        ))
        .unwrap();
        for command in ["check", "run"] {
            let (status, stderr) =
                run_tproxy_to_end(&topo.router, &[command, "--config", config.path()]).unwrap();
            assert!(!status.success(), "{command} accepted ipset {set}");
            assert!(
                stderr.contains(&format!("ipset {set}")) && stderr.contains(reason),
                "{command}: {stderr}"
            );
        }
        assert!(ingress_programs(&topo.router, IFACE).unwrap().is_empty());
        assert_eq!(routing_state(&topo.router, DEFAULT_TABLE).unwrap(), "");
    }
}
