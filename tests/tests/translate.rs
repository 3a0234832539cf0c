//! `tproxy translate` round trips: a rule set steers a set of probe flows with iptables or
//! nft (and tproxy's relay behind it), then its translation steers them with tproxy alone.
//! Both must intercept exactly the same flows.

use std::{io::Write as _, net::SocketAddr, process::Command};

use tproxy_tests::{
    echo_answered, install_tproxy_routing, peer_seen_by, remove_iptables_tproxy,
    remove_tproxy_routing, require_root, restore_iptables, tproxy_bin, tproxy_with_input,
    udp_client, udp_exchange, ConfigFile, Netns, RouterTopology as Topo, Server, Tproxy, UdpEcho,
};

/// A flow from the client: TCP or UDP to a server address.
#[derive(Clone, Copy, Debug)]
enum Probe {
    Tcp(&'static str),
    Udp(&'static str),
}

/// The probes' servers, started once per topology.
struct Servers {
    tcp: Vec<Server>,
    udp: Vec<UdpEcho>,
}

impl Servers {
    fn start(topo: &Topo, probes: &[Probe]) -> Self {
        let mut servers = Servers {
            tcp: Vec::new(),
            udp: Vec::new(),
        };
        for probe in probes {
            match probe {
                Probe::Tcp(addr) => servers
                    .tcp
                    .push(Server::tell_peer(&topo.server, addr.parse().unwrap()).unwrap()),
                Probe::Udp(addr) => servers
                    .udp
                    .push(UdpEcho::start(&topo.server, addr.parse().unwrap()).unwrap()),
            }
        }
        servers
    }

    /// For each probe: whether the server saw the router (intercepted) instead of the client.
    fn intercepted(&self, topo: &Topo, probes: &[Probe]) -> Vec<(String, bool)> {
        probes
            .iter()
            .map(|probe| {
                let (name, peer) = match probe {
                    Probe::Tcp(addr) => {
                        let addr: SocketAddr = addr.parse().unwrap();
                        (
                            format!("tcp {addr}"),
                            peer_seen_by(&topo.client, addr).unwrap(),
                        )
                    }
                    Probe::Udp(addr) => {
                        let addr: SocketAddr = addr.parse().unwrap();
                        let server = self.udp.iter().find(|s| s.addr == addr).unwrap();
                        server.peers.lock().unwrap().clear();
                        let client = udp_client(&topo.client, addr).unwrap();
                        let (reply, from) = udp_exchange(&client, addr, b"probe").unwrap();
                        assert_eq!((reply.as_slice(), from), (&b"probe"[..], addr));
                        (format!("udp {addr}"), server.peer_ips()[0])
                    }
                };
                let router = Topo::router_as_seen_by_server(peer.is_ipv6());
                (name, peer == router)
            })
            .collect()
    }
}

fn translate(rules: &str) -> String {
    let (status, stdout, stderr) = tproxy_with_input(&["translate"], rules).unwrap();
    assert!(status.success(), "translate failed: {stderr}\n{stdout}");
    stdout
}

fn restore_nft(netns: &Netns, rules: &str) {
    let path = ConfigFile::new(rules).unwrap();
    let status = Command::new("ip")
        .args(["netns", "exec", &netns.name, "nft", "-f", path.path()])
        .status()
        .unwrap();
    assert!(status.success(), "nft -f refused:\n{rules}");
    install_tproxy_routing(netns).unwrap();
}

/// Loads `rules` and returns what a user would paste: the ruleset as nft lists it.
fn listed_nft(netns: &Netns, rules: &str) -> String {
    restore_nft(netns, rules);
    let listed = Command::new("ip")
        .args(["netns", "exec", &netns.name, "nft", "list", "ruleset"])
        .output()
        .unwrap();
    assert!(listed.status.success());
    String::from_utf8(listed.stdout).unwrap()
}

fn remove_nft(netns: &Netns) {
    let status = Command::new("ip")
        .args(["netns", "exec", &netns.name, "nft", "flush", "ruleset"])
        .status()
        .unwrap();
    assert!(status.success());
    remove_tproxy_routing(netns).unwrap();
}

/// The kernel documentation's probes: TCP port 80 is steered, nothing else.
const DOC_PROBES: &[Probe] = &[
    Probe::Tcp("10.10.2.2:80"),
    Probe::Tcp("10.10.2.3:80"),
    Probe::Tcp("10.10.2.2:22"),
    Probe::Tcp("[fd00:2::2]:80"),
    Probe::Udp("10.10.2.2:80"),
];

/// Runs the kernel documentation's example both ways: loaded by `load`, with a transparent
/// listener on the wildcard address (the TPROXY target's `--on-ip 0.0.0.0` looks the
/// listener up at the packet's own destination address), then translated.
fn kernel_doc_round_trip(rules: &str, load: fn(&Netns, &str), unload: fn(&Netns)) {
    let topo = Topo::new().unwrap();
    let servers = Servers::start(&topo, DOC_PROBES);
    load(&topo.router, rules);
    let mut relay = Tproxy::start(
        &topo.router,
        &["--relay-only", "--tcp", "80", "--listen", "0.0.0.0:50080"],
    )
    .unwrap();
    let original = servers.intercepted(&topo, DOC_PROBES);
    relay.stop().unwrap();
    unload(&topo.router);
    assert_eq!(
        original.iter().filter(|(_, steered)| *steered).count(),
        2,
        "the original rules steer TCP port 80 over IPv4: {original:?}"
    );

    let config = ConfigFile::new(&translate(rules)).unwrap();
    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let translated = servers.intercepted(&topo, DOC_PROBES);
    tproxy.stop().unwrap();
    assert_eq!(translated, original);
}

#[test]
fn the_kernel_documentation_iptables_example_steers_the_same_flows_translated() {
    require_root();
    kernel_doc_round_trip(
        "*mangle\n\
         :DIVERT - [0:0]\n\
         -A PREROUTING -p tcp -m socket -j DIVERT\n\
         -A DIVERT -j MARK --set-mark 1\n\
         -A DIVERT -j ACCEPT\n\
         -A PREROUTING -p tcp --dport 80 -j TPROXY --tproxy-mark 0x1/0x1 --on-port 50080\n\
         COMMIT\n",
        |netns, rules| restore_iptables(netns, rules).unwrap(),
        |netns| remove_iptables_tproxy(netns).unwrap(),
    );
}

#[test]
fn the_kernel_documentation_nft_example_steers_the_same_flows_translated() {
    require_root();
    kernel_doc_round_trip(
        "table ip filter {\n\
         \tchain divert {\n\
         \t\ttype filter hook prerouting priority -150; policy accept;\n\
         \t\tmeta l4proto tcp socket transparent 1 meta mark set 1 accept\n\
         \t\ttcp dport 80 tproxy to :50080 meta mark set 1 accept\n\
         \t}\n\
         }\n",
        restore_nft,
        remove_nft,
    );
}

/// A router's rule set as deployed: a socket-match divert for TCP and UDP, a chain entered
/// from the client side, a bypass for one host, and three proxies by port.
const REALISTIC: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:DIVERT - [0:0]
:PROXY - [0:0]
-A PREROUTING -p tcp -m socket --transparent -j DIVERT
-A PREROUTING -p udp -m socket --transparent -j DIVERT
-A PREROUTING -i to-client -j PROXY
-A PROXY -d 10.10.2.3/32 -j RETURN
-A PROXY -p tcp -m multiport --dports 80,443 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PROXY -p tcp -m tcp --dport 8000:8100 -j TPROXY --on-port 15002 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PROXY -s 10.10.1.0/24 -p udp -m udp --dport 53 -j TPROXY --on-port 15053 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A DIVERT -j ACCEPT
COMMIT
";

const REALISTIC_PROBES: &[Probe] = &[
    Probe::Tcp("10.10.2.2:80"),
    Probe::Tcp("10.10.2.2:443"),
    Probe::Tcp("10.10.2.2:8050"),
    Probe::Tcp("10.10.2.3:80"),
    Probe::Tcp("10.10.2.3:8050"),
    Probe::Tcp("10.10.2.2:22"),
    Probe::Tcp("[fd00:2::2]:80"),
    Probe::Udp("10.10.2.2:53"),
    Probe::Udp("10.10.2.3:53"),
    Probe::Udp("10.10.2.2:54"),
];

#[test]
fn a_realistic_iptables_rule_set_steers_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let servers = Servers::start(&topo, REALISTIC_PROBES);
    let text = translate(REALISTIC);
    let config = ConfigFile::new(&text).unwrap();

    // The original: iptables steers, tproxy's relay serves the three TPROXY ports.
    restore_iptables(&topo.router, REALISTIC).unwrap();
    let mut relay =
        Tproxy::start(&topo.router, &["--relay-only", "--config", config.path()]).unwrap();
    let original = servers.intercepted(&topo, REALISTIC_PROBES);
    relay.stop().unwrap();
    remove_iptables_tproxy(&topo.router).unwrap();
    let steered: Vec<&str> = original
        .iter()
        .filter(|(_, steered)| *steered)
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(
        steered,
        [
            "tcp 10.10.2.2:80",
            "tcp 10.10.2.2:443",
            "tcp 10.10.2.2:8050",
            "udp 10.10.2.2:53"
        ],
        "what the original rules steer"
    );

    // The translation, with tproxy's own steering.
    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let translated = servers.intercepted(&topo, REALISTIC_PROBES);
    tproxy.stop().unwrap();
    assert_eq!(translated, original, "translated config:\n{text}");
}

/// Each public rule set in tests/corpus/translate (sources named in their headers) against
/// the `# expect:` line it carries: `translates` (exit 0 without --allow-skipped), or `not
/// translated (a; b)` with fragments of the reasons listed. A `NAME.ipset` next to
/// `NAME.rules` is given as its --ipset-file. A translation must pass `tproxy check`.
/// Reports the coverage.
#[test]
fn the_public_rule_set_corpus_translates_as_expected() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/translate");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "rules"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 15, "the corpus is in {}", dir.display());
    let mut translated = Vec::new();
    let mut kept = 0;
    let mut unexpected = Vec::new();
    for path in &paths {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(path).unwrap();
        let expect = text
            .lines()
            .find_map(|line| line.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{name} has no `# expect:` line"));
        // The sets a script creates and fills itself, as `ipset save` would list them.
        let sets = path.with_extension("ipset");
        let mut args = vec!["translate"];
        if sets.exists() {
            args.extend(["--ipset-file", sets.to_str().unwrap()]);
        }
        let (status, config, stderr) = tproxy_with_input(&args, &text).unwrap();
        if status.success() {
            translated.push(name.clone());
            let file = ConfigFile::new(&config).unwrap();
            let (checked, problem) = checked_where_followed_sets_exist(&config, file.path());
            assert!(
                checked,
                "{name}: `tproxy check` refuses the translation: {problem}\n{config}"
            );
        }
        // The same with the rule set's proxies kept in the path (external listeners): what
        // a user who keeps the proxy gets. Only counted; a translation must pass check too.
        let mut keep_args = args.clone();
        keep_args.push("--keep-proxies");
        let (kept_status, kept_config, _) = tproxy_with_input(&keep_args, &text).unwrap();
        if kept_status.success() {
            kept += 1;
            let file = ConfigFile::new(&kept_config).unwrap();
            let (checked, problem) = checked_where_followed_sets_exist(&kept_config, file.path());
            assert!(
                checked,
                "{name} --keep-proxies: `tproxy check` refuses the translation: {problem}\n{kept_config}"
            );
        }
        let as_expected = match expect.strip_prefix("not translated (") {
            None => expect == "translates" && status.success(),
            Some(reasons) => {
                !status.success()
                    && reasons
                        .trim_end_matches(')')
                        .split("; ")
                        .all(|reason| stderr.contains(reason))
            }
        };
        if !as_expected {
            unexpected.push(format!("{name}: expected {expect}, got:\n{stderr}"));
        }
    }
    // Straight to stderr: the test harness captures print! of passing tests, and the
    // coverage is meant to be seen in every run.
    let _ = writeln!(
        std::io::stderr(),
        "translate corpus: {} of {} public rule sets translate without --allow-skipped ({}%)",
        translated.len(),
        paths.len(),
        translated.len() * 100 / paths.len()
    );
    let _ = writeln!(
        std::io::stderr(),
        "translate corpus: {kept} of {} with --keep-proxies ({}%)",
        paths.len(),
        kept * 100 / paths.len()
    );
    assert!(unexpected.is_empty(), "{}", unexpected.join("\n"));
}

/// Whether `tproxy check` accepts the translation `config` (in `path`), with what it said.
/// The ipsets it follows (`dst = "ipset:NAME"`) must exist where tproxy reads them: it is
/// checked in a namespace of its own where they are created empty, as the scripts create
/// them.
fn checked_where_followed_sets_exist(config: &str, path: &str) -> (bool, String) {
    let followed: Vec<&str> = config
        .lines()
        .filter_map(|line| line.strip_prefix("dst = \"ipset:"))
        .map(|name| name.trim_end_matches('"'))
        .collect();
    if followed.is_empty() {
        let (checked, _, problem) = tproxy_with_input(&["check", "--config", path], "").unwrap();
        return (checked.success(), problem);
    }
    require_root();
    let netns = Netns::new("corpus").unwrap();
    for name in followed {
        ipset(&netns, &["create", "-exist", name, "hash:net"]);
    }
    let output = Command::new("ip")
        .args(["netns", "exec", &netns.name])
        .arg(tproxy_bin())
        .args(["check", "--config", path])
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Each probe's name with whether it was steered.
type Steered = Vec<(String, bool)>;

/// Loads a rule set with `load` (which returns its text as the kernel lists it), steers
/// `probes` with it and tproxy's relay behind it (configured by the translation), then with
/// the translation alone. Returns what each way steered, and the configuration.
fn steered_both_ways(
    topo: &Topo,
    probes: &[Probe],
    load: impl FnOnce(&Netns) -> String,
    unload: fn(&Netns),
) -> (Steered, Steered, String) {
    let servers = Servers::start(topo, probes);
    let listed = load(&topo.router);
    let text = translate(&listed);
    let config = ConfigFile::new(&text).unwrap();
    let mut relay =
        Tproxy::start(&topo.router, &["--relay-only", "--config", config.path()]).unwrap();
    let original = servers.intercepted(topo, probes);
    relay.stop().unwrap();
    unload(&topo.router);
    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let translated = servers.intercepted(topo, probes);
    tproxy.stop().unwrap();
    (original, translated, text)
}

/// [`steered_both_ways`] for an iptables rule set, loaded with `iptables-restore` as written.
fn steered_both_ways_iptables(
    topo: &Topo,
    probes: &[Probe],
    rules: &'static str,
) -> (Steered, Steered, String) {
    steered_both_ways(
        topo,
        probes,
        |netns| {
            restore_iptables(netns, rules).unwrap();
            rules.to_string()
        },
        |netns| remove_iptables_tproxy(netns).unwrap(),
    )
}

/// The probes of the negation rule sets, and which of them the rule sets steer: each
/// negated form once excluding the probe and once not. (UDP rules name the client side:
/// without it the server's replies would be steered too.)
const NEGATION_PROBES: &[Probe] = &[
    Probe::Tcp("10.10.2.2:80"),
    Probe::Tcp("10.10.2.3:80"),
    Probe::Udp("10.10.2.2:53"),
    Probe::Udp("10.10.2.2:54"),
    Probe::Udp("10.10.2.3:53"),
    Probe::Tcp("10.10.2.2:8050"),
    Probe::Tcp("10.10.2.2:8060"),
    Probe::Tcp("10.10.2.2:443"),
    Probe::Tcp("10.10.2.2:444"),
    Probe::Tcp("[fd00:2::2]:80"),
];

const NEGATION_STEERED: &[&str] = &[
    "tcp 10.10.2.2:80",
    "udp 10.10.2.2:53",
    "udp 10.10.2.3:53",
    "tcp 10.10.2.2:8050",
    "tcp 10.10.2.2:443",
];

fn steered_names(steered: &[(String, bool)]) -> Vec<&str> {
    steered
        .iter()
        .filter(|(_, steered)| *steered)
        .map(|(name, _)| name.as_str())
        .collect()
}

/// Negated destination, port, source and interface, as iptables writes them.
const NEGATIONS_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:DIVERT - [0:0]
-A PREROUTING -p tcp -m socket --transparent -j DIVERT
-A PREROUTING -p udp -m socket --transparent -j DIVERT
-A PREROUTING ! -d 10.10.2.3/32 -i to-client -p tcp -m tcp --dport 80 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PREROUTING -d 10.10.2.0/24 -i to-client -p udp -m multiport ! --dports 53,5353 -j RETURN
-A PREROUTING -i to-client -p udp -j TPROXY --on-port 15053 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PREROUTING ! -s 10.10.9.0/24 -p tcp -m tcp --dport 8050 -j TPROXY --on-port 15002 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PREROUTING ! -s 10.10.1.0/24 -p tcp -m tcp --dport 8060 -j TPROXY --on-port 15002 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PREROUTING ! -i to-server -p tcp -m tcp --dport 443 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PREROUTING ! -i to-client -p tcp -m tcp --dport 444 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A DIVERT -j ACCEPT
COMMIT
";

#[test]
fn negated_iptables_matches_steer_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let (original, translated, config) =
        steered_both_ways_iptables(&topo, NEGATION_PROBES, NEGATIONS_IPTABLES);
    assert_eq!(steered_names(&original), NEGATION_STEERED, "iptables");
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// The same in nft: `!=` on a named set, an anonymous set, one value, and interface names.
const NEGATIONS_NFT: &str = "\
table inet negations {
	set excluded_hosts {
		type ipv4_addr
		elements = { 10.10.2.3 }
	}
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta l4proto { tcp, udp } socket transparent 1 meta mark set 0x1 accept
		iifname \"to-client\" ip daddr != @excluded_hosts tcp dport 80 tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept
		iifname \"to-client\" ip daddr 10.10.2.0/24 udp dport != { 53, 5353 } return
		iifname \"to-client\" meta l4proto udp tproxy ip to 127.0.0.1:15053 meta mark set 0x1 accept
		ip saddr != { 10.10.9.0/24, 10.10.8.0/24 } tcp dport 8050 tproxy ip to 127.0.0.1:15002 meta mark set 0x1 accept
		ip saddr != 10.10.1.0/24 tcp dport 8060 tproxy ip to 127.0.0.1:15002 meta mark set 0x1 accept
		iifname != \"to-server\" tcp dport 443 tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept
		iifname != { \"to-client\", \"lo\" } tcp dport 444 tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept
	}
}
";

#[test]
fn negated_nft_matches_steer_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let (original, translated, config) = steered_both_ways(
        &topo,
        NEGATION_PROBES,
        |netns| listed_nft(netns, NEGATIONS_NFT),
        remove_nft,
    );
    assert_eq!(steered_names(&original), NEGATION_STEERED, "nft");
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// Interface wildcards (`-i to-c+`, nft `iifname "to-c*"`), plain and excluded, against the
/// router's `to-client` and `to-server`: TCP 80 and 443 and UDP 53 are steered.
const WILDCARD_PROBES: &[Probe] = &[
    Probe::Tcp("10.10.2.2:80"),
    Probe::Tcp("10.10.2.2:8050"),
    Probe::Tcp("10.10.2.2:443"),
    Probe::Tcp("10.10.2.2:444"),
    Probe::Udp("10.10.2.2:53"),
    Probe::Udp("10.10.2.2:54"),
    Probe::Tcp("[fd00:2::2]:80"),
];

const WILDCARD_STEERED: &[&str] = &["tcp 10.10.2.2:80", "tcp 10.10.2.2:443", "udp 10.10.2.2:53"];

const WILDCARDS_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:DIVERT - [0:0]
:PROXY - [0:0]
-A PREROUTING -p tcp -m socket --transparent -j DIVERT
-A PREROUTING -p udp -m socket --transparent -j DIVERT
-A PREROUTING -i to-c+ -p tcp -m tcp --dport 80 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PREROUTING -i to-s+ -p tcp -m tcp --dport 8050 -j TPROXY --on-port 15002 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PREROUTING -i to-+ -j PROXY
-A PROXY ! -i to-s+ -p tcp -m tcp --dport 443 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PROXY ! -i to-c+ -p tcp -m tcp --dport 444 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PROXY -p udp -m udp --dport 53 -j TPROXY --on-port 15053 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A DIVERT -j ACCEPT
COMMIT
";

#[test]
fn iptables_interface_wildcards_steer_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let (original, translated, config) =
        steered_both_ways_iptables(&topo, WILDCARD_PROBES, WILDCARDS_IPTABLES);
    // Every rule names interfaces by pattern: tproxy attaches to what the patterns match.
    assert!(
        config.contains("interfaces = [\"to-c*\", \"to-s*\""),
        "translated config:\n{config}"
    );
    assert_eq!(steered_names(&original), WILDCARD_STEERED, "iptables");
    assert_eq!(translated, original, "translated config:\n{config}");
}

const WILDCARDS_NFT: &str = "\
table inet wildcards {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta l4proto { tcp, udp } socket transparent 1 meta mark set 0x1 accept
		iifname \"to-c*\" ip daddr 10.10.2.0/24 tcp dport 80 tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept
		iifname \"to-s*\" ip daddr 10.10.2.0/24 tcp dport 8050 tproxy ip to 127.0.0.1:15002 meta mark set 0x1 accept
		iifname \"to-*\" iifname != \"to-s*\" ip daddr 10.10.2.0/24 tcp dport 443 tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept
		iifname \"to-*\" iifname != \"to-c*\" ip daddr 10.10.2.0/24 tcp dport 444 tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept
		iifname \"to-*\" ip daddr 10.10.2.0/24 udp dport 53 tproxy ip to 127.0.0.1:15053 meta mark set 0x1 accept
	}
}
";

#[test]
fn nft_interface_wildcards_steer_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let (original, translated, config) = steered_both_ways(
        &topo,
        WILDCARD_PROBES,
        |netns| listed_nft(netns, WILDCARDS_NFT),
        remove_nft,
    );
    assert_eq!(steered_names(&original), WILDCARD_STEERED, "nft");
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// Sets of families and of input interfaces (`meta nfproto { ipv4, ipv6 }`, fw4's and
/// homeproxy's; `iifname { "lo", "eth0" }`, mssb's) against the router's `to-client` and
/// `to-server`: a family set narrows as its families do (both: not at all), an interface set
/// is a rule per interface (`lo` among them), a negated one excludes each.
const SETS_PROBES: &[Probe] = &[
    Probe::Tcp("10.10.2.2:80"),
    Probe::Tcp("[fd00:2::2]:80"),
    Probe::Tcp("10.10.2.2:443"),
    Probe::Tcp("[fd00:2::2]:443"),
    Probe::Tcp("10.10.2.2:8443"),
    Probe::Tcp("[fd00:2::2]:8443"),
    Probe::Tcp("10.10.2.2:444"),
    Probe::Udp("10.10.2.2:53"),
    Probe::Udp("10.10.2.2:54"),
];

const SETS_STEERED: &[&str] = &[
    "tcp 10.10.2.2:80",
    "tcp [fd00:2::2]:80",
    "tcp 10.10.2.2:443",
    "tcp [fd00:2::2]:8443",
    "udp 10.10.2.2:53",
];

const SETS_NFT: &str = "\
table inet sets {
	chain steer {
		meta l4proto tcp tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept
		meta l4proto tcp tproxy ip6 to [::1]:15001 meta mark set 0x1 accept
	}
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta l4proto { tcp, udp } socket transparent 1 meta mark set 0x1 accept
		meta nfproto { ipv4, ipv6 } iifname { \"lo\", \"to-client\" } tcp dport 80 jump steer
		meta nfproto { ipv4 } iifname { \"to-server\", \"to-client\" } tcp dport 443 jump steer
		meta nfproto != ipv4 tcp dport 8443 jump steer
		iifname { \"to-server\", \"eth9\" } tcp dport 444 jump steer
		iifname != { \"to-server\", \"eth9\" } udp dport 53 tproxy ip to 127.0.0.1:15053 meta mark set 0x1 accept
	}
}
";

/// IPv6's half of the TPROXY rules' policy routing (the helpers install IPv4's).
const TPROXY_ROUTING_V6: [&[&str]; 2] = [
    &["-6", "rule", "add", "fwmark", "1", "lookup", "100"],
    &[
        "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100",
    ],
];

fn remove_nft_and_v6_routing(netns: &Netns) {
    remove_nft(netns);
    netns
        .ip(&["-6", "rule", "del", "fwmark", "1", "lookup", "100"])
        .unwrap();
    netns.ip(&["-6", "route", "flush", "table", "100"]).unwrap();
}

#[test]
fn nft_family_and_interface_sets_steer_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let (original, translated, config) = steered_both_ways(
        &topo,
        SETS_PROBES,
        |netns| {
            let listed = listed_nft(netns, SETS_NFT);
            for args in TPROXY_ROUTING_V6 {
                netns.ip(args).unwrap();
            }
            listed
        },
        remove_nft_and_v6_routing,
    );
    assert!(
        config.contains("iface = \"lo\"") && config.contains("iface = \"to-client\""),
        "translated config:\n{config}"
    );
    assert_eq!(steered_names(&original), SETS_STEERED, "nft");
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// TPROXY targets without a port (iptables' `--on-port 0`, nft's `tproxy to ADDR`) hand each
/// packet to the proxy on its own destination port: the rule's one port is the listener's.
const OWN_PORT_PROBES: &[Probe] = &[
    Probe::Tcp("10.10.2.2:8080"),
    Probe::Tcp("10.10.2.2:80"),
    Probe::Udp("10.10.2.2:5353"),
    Probe::Udp("10.10.2.2:53"),
    Probe::Tcp("[fd00:2::2]:8080"),
    Probe::Tcp("[fd00:2::2]:80"),
];

const OWN_PORT_STEERED_V4: &[&str] = &["tcp 10.10.2.2:8080", "udp 10.10.2.2:5353"];

const OWN_PORT_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:DIVERT - [0:0]
-A PREROUTING -p tcp -m socket --transparent -j DIVERT
-A PREROUTING -p udp -m socket --transparent -j DIVERT
-A PREROUTING -i to-client -p tcp -m tcp --dport 8080 -j TPROXY --on-port 0 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PREROUTING -i to-client -p udp -m udp --dport 5353 -j TPROXY --on-port 0 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A DIVERT -j ACCEPT
COMMIT
";

const OWN_PORT_NFT: &str = "\
table inet own_port {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta l4proto { tcp, udp } socket transparent 1 meta mark set 0x1 accept
		iifname \"to-client\" tcp dport 8080 tproxy ip to 127.0.0.1 meta mark set 0x1 accept
		iifname \"to-client\" tcp dport 8080 tproxy ip6 to [::1] meta mark set 0x1 accept
		iifname \"to-client\" udp dport 5353 tproxy ip to 127.0.0.1 meta mark set 0x1 accept
	}
}
";

#[test]
fn iptables_tproxy_on_port_0_steers_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let (original, translated, config) =
        steered_both_ways_iptables(&topo, OWN_PORT_PROBES, OWN_PORT_IPTABLES);
    assert!(
        config.contains("127.0.0.1:8080"),
        "translated config:\n{config}"
    );
    assert_eq!(steered_names(&original), OWN_PORT_STEERED_V4, "iptables");
    assert_eq!(translated, original, "translated config:\n{config}");
}

#[test]
fn nft_tproxy_to_an_address_without_a_port_steers_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let (original, translated, config) = steered_both_ways(
        &topo,
        OWN_PORT_PROBES,
        |netns| {
            let listed = listed_nft(netns, OWN_PORT_NFT);
            for args in TPROXY_ROUTING_V6 {
                netns.ip(args).unwrap();
            }
            listed
        },
        remove_nft_and_v6_routing,
    );
    assert!(
        config.contains("[::1]:8080"),
        "translated config:\n{config}"
    );
    let mut expected = OWN_PORT_STEERED_V4.to_vec();
    expected.push("tcp [fd00:2::2]:8080");
    assert_eq!(steered_names(&original), expected, "nft");
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// An interval set's range that no prefix spans, as nft lists it (`10.10.2.3-10.10.2.6`):
/// the prefixes that cover it exactly.
const RANGE_PROBES: &[Probe] = &[
    Probe::Tcp("10.10.2.2:80"),
    Probe::Tcp("10.10.2.3:80"),
    Probe::Udp("10.10.2.2:53"),
    Probe::Udp("10.10.2.3:53"),
];

const RANGE_NFT: &str = "\
table inet ranges {
	set direct {
		type ipv4_addr
		flags interval
		elements = { 10.10.2.3-10.10.2.6 }
	}
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta l4proto { tcp, udp } socket transparent 1 meta mark set 0x1 accept
		ip daddr @direct return
		iifname \"to-client\" meta l4proto { tcp, udp } tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept
	}
}
";

#[test]
fn nft_address_ranges_steer_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let (original, translated, config) = steered_both_ways(
        &topo,
        RANGE_PROBES,
        |netns| {
            let listed = listed_nft(netns, RANGE_NFT);
            assert!(listed.contains("10.10.2.3-10.10.2.6"), "{listed}");
            listed
        },
        remove_nft,
    );
    assert_eq!(
        steered_names(&original),
        ["tcp 10.10.2.2:80", "udp 10.10.2.2:53"],
        "nft"
    );
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// nft chains of `type nat` (fw4's dstnat and fluxproxy's output redirect) are left alone, as
/// iptables' nat table: their `return`s end only their own chain, so they decide nothing for
/// the TPROXY chain at prerouting (before, translate read the nat chain at prerouting as
/// TPROXY rules, and its return bypassed 10.10.2.2).
const NAT_PROBES: &[Probe] = &[
    Probe::Tcp("10.10.2.2:80"),
    Probe::Tcp("10.10.2.3:80"),
    Probe::Tcp("10.10.2.2:22"),
    Probe::Udp("10.10.2.2:53"),
    Probe::Udp("10.10.2.2:54"),
];

const NAT_STEERED: &[&str] = &["tcp 10.10.2.2:80", "tcp 10.10.2.3:80", "udp 10.10.2.2:53"];

const NAT_NFT: &str = "\
table inet natted {
	chain dstnat {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr 10.10.2.2 return
		meta nfproto { ipv4, ipv6 } udp dport 53 return
	}
	chain output_redirect {
		type nat hook output priority -105; policy accept;
		meta nfproto { ipv4, ipv6 } meta l4proto tcp return
	}
	chain mangle {
		type filter hook prerouting priority mangle; policy accept;
		meta l4proto { tcp, udp } socket transparent 1 meta mark set 0x1 accept
		iifname \"to-client\" tcp dport 80 tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept
		iifname \"to-client\" udp dport 53 tproxy ip to 127.0.0.1:15053 meta mark set 0x1 accept
	}
}
";

#[test]
fn nft_nat_chains_are_left_alone_and_the_same_flows_are_steered_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let (original, translated, config) = steered_both_ways(
        &topo,
        NAT_PROBES,
        |netns| listed_nft(netns, NAT_NFT),
        remove_nft,
    );
    assert_eq!(steered_names(&original), NAT_STEERED, "nft");
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// Waits (up to a generous limit, not a timed assertion) until tproxy's rules in force say
/// whether they hold `needle`; returns them either way.
fn rules_when(tproxy: &Tproxy, needle: &str, present: bool) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let rules = tproxy.status().unwrap().rules;
        if rules.iter().any(|r| r.contains(needle)) == present
            || std::time::Instant::now() > deadline
        {
            return rules;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The router's own addresses left alone (`-m addrtype --dst-type LOCAL -j RETURN`, nft
/// `fib daddr type local return`) ahead of a rule that steers all TCP from the client: a
/// remote server is steered, the router's own servers are not, both ways; then an address
/// added while tproxy runs is left alone too, and its rule goes with it.
fn local_addresses_round_trip(load: impl FnOnce(&Netns) -> String, unload: fn(&Netns)) {
    let topo = Topo::new().unwrap();
    let probes = ["10.10.2.2:80", "10.10.1.1:8080", "10.10.2.1:8080"];
    let _remote = Server::tell_peer(&topo.server, probes[0].parse().unwrap()).unwrap();
    let _own: Vec<Server> = probes[1..]
        .iter()
        .map(|addr| Server::tell_peer(&topo.router, addr.parse().unwrap()).unwrap())
        .collect();
    // Steered flows reach their server from the router (the relay), the others from the
    // client.
    let client = Topo::client_ip(false);
    let steered = |addr: &str| peer_seen_by(&topo.client, addr.parse().unwrap()).unwrap() != client;
    let listed = load(&topo.router);
    let text = translate(&listed);
    assert!(text.contains("dst = \"local"), "{text}");
    let config = ConfigFile::new(&text).unwrap();
    let mut relay =
        Tproxy::start(&topo.router, &["--relay-only", "--config", config.path()]).unwrap();
    let original: Vec<bool> = probes.iter().map(|addr| steered(addr)).collect();
    relay.stop().unwrap();
    unload(&topo.router);
    assert_eq!(original, [true, false, false], "the original rules");

    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let translated: Vec<bool> = probes.iter().map(|addr| steered(addr)).collect();
    assert_eq!(translated, original, "translated config:\n{text}");

    topo.router
        .ip(&["addr", "add", "10.10.1.9/24", "dev", "to-client"])
        .unwrap();
    let _added = Server::tell_peer(&topo.router, "10.10.1.9:8080".parse().unwrap()).unwrap();
    let rules = rules_when(&tproxy, "10.10.1.9/32", true);
    assert!(
        rules.iter().any(|r| r.contains("10.10.1.9/32")),
        "the new address's bypass rule: {rules:#?}"
    );
    assert!(!steered("10.10.1.9:8080"), "the new address is left alone");
    topo.router
        .ip(&["addr", "del", "10.10.1.9/24", "dev", "to-client"])
        .unwrap();
    let rules = rules_when(&tproxy, "10.10.1.9/32", false);
    assert!(
        !rules.iter().any(|r| r.contains("10.10.1.9/32")),
        "the removed address's rule goes: {rules:#?}"
    );
    tproxy.stop().unwrap();
}

/// [`local_addresses_round_trip`] for iptables rules whose `-m addrtype` rule is `rule`.
fn iptables_local_addresses_round_trip(rule: &str) {
    let rules = format!(
        "*mangle
:PREROUTING ACCEPT [0:0]
:DIVERT - [0:0]
-A PREROUTING -p tcp -m socket --transparent -j DIVERT
{rule}
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A DIVERT -j ACCEPT
COMMIT
"
    );
    local_addresses_round_trip(
        |netns| {
            restore_iptables(netns, &rules).unwrap();
            rules.clone()
        },
        |netns| remove_iptables_tproxy(netns).unwrap(),
    );
}

/// [`local_addresses_round_trip`] for an nft prerouting chain whose `fib daddr type` rules
/// are `rules`.
fn nft_local_addresses_round_trip(rules: &str) {
    local_addresses_round_trip(
        |netns| {
            listed_nft(
                netns,
                &format!(
                    "table inet local {{
	chain prerouting {{
		type filter hook prerouting priority mangle; policy accept;
		meta l4proto tcp socket transparent 1 meta mark set 0x1 accept
{rules}
	}}
}}
"
                ),
            )
        },
        remove_nft,
    );
}

#[test]
fn iptables_addrtype_local_steers_the_same_flows_translated_and_follows_addresses() {
    require_root();
    iptables_local_addresses_round_trip(
        "-A PREROUTING -m addrtype --dst-type LOCAL -j RETURN
-A PREROUTING -i to-client -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1",
    );
}

#[test]
fn nft_fib_daddr_type_local_steers_the_same_flows_translated_and_follows_addresses() {
    require_root();
    nft_local_addresses_round_trip(
        "\t\tfib daddr type local return
\t\tiifname \"to-client\" meta l4proto tcp tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept",
    );
}

/// The negated form (`! --dst-type LOCAL` on the TPROXY rule itself): the host's own
/// addresses become a bypass ahead of it, and follow address changes the same way. Before,
/// translate refused it ("negated `--dst-type`").
#[test]
fn iptables_negated_addrtype_local_steers_the_same_flows_translated_and_follows_addresses() {
    require_root();
    iptables_local_addresses_round_trip(
        "-A PREROUTING -i to-client -p tcp -m addrtype ! --dst-type LOCAL -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1",
    );
}

/// nft's `fib daddr type != local` on the tproxy rule: as the iptables form above.
#[test]
fn nft_fib_daddr_type_not_local_steers_the_same_flows_translated_and_follows_addresses() {
    require_root();
    nft_local_addresses_round_trip(
        "\t\tiifname \"to-client\" meta l4proto tcp fib daddr type != local tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept",
    );
}

/// Runs `ipset` in `netns` with `args`; returns what it printed.
fn ipset(netns: &Netns, args: &[&str]) -> String {
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
    String::from_utf8(output.stdout).unwrap()
}

/// `-m set --match-set` on a hash:net and a hash:ip set, plain and negated, with the sets
/// as `ipset save` prints them given to `translate --ipset-file`.
#[test]
fn iptables_ipset_matches_steer_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let rules = "\
*mangle
:PREROUTING ACCEPT [0:0]
:DIVERT - [0:0]
-A PREROUTING -p tcp -m socket --transparent -j DIVERT
-A PREROUTING -p udp -m socket --transparent -j DIVERT
-A PREROUTING -i to-client -p tcp -m set --match-set proxied dst -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PREROUTING -i to-client -p udp -m set ! --match-set excluded dst -m udp --dport 53 -j TPROXY --on-port 15053 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A DIVERT -j ACCEPT
COMMIT
";
    let probes = [
        Probe::Tcp("10.10.2.2:80"),
        Probe::Tcp("10.10.2.3:80"),
        Probe::Udp("10.10.2.2:53"),
        Probe::Udp("10.10.2.3:53"),
    ];
    let servers = Servers::start(&topo, &probes);
    ipset(&topo.router, &["create", "proxied", "hash:net"]);
    ipset(&topo.router, &["add", "proxied", "10.10.2.2"]);
    ipset(&topo.router, &["add", "proxied", "10.10.9.0/24"]);
    ipset(&topo.router, &["create", "excluded", "hash:ip"]);
    ipset(&topo.router, &["add", "excluded", "10.10.2.3"]);
    let saved = ConfigFile::new(&ipset(&topo.router, &["save"])).unwrap();
    restore_iptables(&topo.router, rules).unwrap();
    let (status, text, stderr) =
        tproxy_with_input(&["translate", "--ipset-file", saved.path()], rules).unwrap();
    assert!(status.success(), "translate failed: {stderr}\n{text}");
    let config = ConfigFile::new(&text).unwrap();

    let mut relay =
        Tproxy::start(&topo.router, &["--relay-only", "--config", config.path()]).unwrap();
    let original = servers.intercepted(&topo, &probes);
    relay.stop().unwrap();
    remove_iptables_tproxy(&topo.router).unwrap();
    assert_eq!(
        steered_names(&original),
        ["tcp 10.10.2.2:80", "udp 10.10.2.2:53"],
        "iptables"
    );

    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let translated = servers.intercepted(&topo, &probes);
    tproxy.stop().unwrap();
    assert_eq!(translated, original, "translated config:\n{text}");
}

/// What became of a probe flow: relayed by tproxy, answered by the server directly, refused
/// (a reset, a port unreachable), or never answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Intercepted,
    Direct,
    Refused,
    Dropped,
}

/// The fate of a probe that got no answer: refused, or dropped (timed out).
fn unanswered(error: &anyhow::Error) -> Fate {
    match error
        .downcast_ref::<std::io::Error>()
        .map(std::io::Error::kind)
    {
        Some(std::io::ErrorKind::ConnectionRefused) => Fate::Refused,
        _ => Fate::Dropped,
    }
}

/// A flow from the client's address of the server address's family, from a source port of
/// its own (0: an ephemeral one), to a server address.
#[derive(Clone, Copy, Debug)]
enum PortProbe {
    Tcp(u16, &'static str),
    Udp(u16, &'static str),
    /// An ICMP echo request to an IPv4 address of the server's (answered by its kernel).
    Ping(&'static str),
}

impl PortProbe {
    fn name(self) -> String {
        match self {
            PortProbe::Tcp(sport, to) => format!("tcp :{sport} -> {to}"),
            PortProbe::Udp(sport, to) => format!("udp :{sport} -> {to}"),
            PortProbe::Ping(to) => format!("ping {to}"),
        }
    }

    /// Sends the probe from the client and says what became of it.
    fn fate(self, topo: &Topo, servers: &Servers) -> Fate {
        let v6 = match self {
            PortProbe::Tcp(_, to) | PortProbe::Udp(_, to) => to.starts_with('['),
            PortProbe::Ping(_) => false,
        };
        let router = Topo::router_as_seen_by_server(v6);
        let client = Topo::client_ip(v6);
        let peer = match self {
            PortProbe::Ping(to) => {
                let to: std::net::Ipv4Addr = to.parse().unwrap();
                return match topo.client.run(move || echo_answered(to.into())) {
                    true => Fate::Direct,
                    false => Fate::Dropped,
                };
            }
            PortProbe::Tcp(sport, to) => {
                let to: SocketAddr = to.parse().unwrap();
                let answer = match sport {
                    0 => peer_seen_by(&topo.client, to).map(|peer| peer.to_string()),
                    _ => topo
                        .client
                        .read_all_from(SocketAddr::new(client, sport), to),
                };
                match answer {
                    Ok(text) => text.parse::<std::net::IpAddr>().unwrap(),
                    Err(error) => return unanswered(&error),
                }
            }
            PortProbe::Udp(sport, to) => {
                let to: SocketAddr = to.parse().unwrap();
                let server = servers.udp.iter().find(|s| s.addr == to).unwrap();
                server.peers.lock().unwrap().clear();
                let socket = topo
                    .client
                    .run(move || std::net::UdpSocket::bind(SocketAddr::new(client, sport)))
                    .unwrap();
                socket
                    .set_read_timeout(Some(std::time::Duration::from_secs(2)))
                    .unwrap();
                // Connected: a port unreachable about its datagram is reported on it.
                socket.connect(to).unwrap();
                match udp_exchange(&socket, to, b"probe") {
                    Ok((reply, from)) => {
                        assert_eq!((reply.as_slice(), from), (&b"probe"[..], to));
                        server.peer_ips()[0]
                    }
                    Err(error) => return unanswered(&error),
                }
            }
        };
        if peer == router {
            Fate::Intercepted
        } else {
            Fate::Direct
        }
    }
}

/// Each probe's name with what became of it.
type Fates = Vec<(String, Fate)>;

/// What became of each probe, in order, without the names.
fn fates_of(fates: &Fates) -> Vec<Fate> {
    fates.iter().map(|(_, fate)| *fate).collect()
}
/// The eBPF program's counters by name.
type Counters = std::collections::BTreeMap<String, u64>;

/// Loads `rules` into iptables, sends `probes` with tproxy's relay behind it (configured by
/// the translation), then with the translation alone; returns the fates both ways, the
/// configuration and the translated run's eBPF counters.
fn fates_both_ways(rules: &str, probes: &[PortProbe]) -> (Fates, Fates, String, Counters) {
    let rules = rules.to_string();
    fates_loaded_both_ways(
        probes,
        move |netns| {
            restore_iptables(netns, &rules).unwrap();
            rules
        },
        |netns| remove_iptables_tproxy(netns).unwrap(),
    )
}

/// As [`fates_both_ways`], with the rule set loaded by `load` (which returns its text as the
/// kernel lists it) and removed by `unload`.
fn fates_loaded_both_ways(
    probes: &[PortProbe],
    load: impl FnOnce(&Netns) -> String,
    unload: fn(&Netns),
) -> (Fates, Fates, String, Counters) {
    let topo = Topo::new().unwrap();
    let mut addresses: Vec<Probe> = Vec::new();
    for probe in probes {
        let (tcp, to) = match *probe {
            PortProbe::Tcp(_, to) => (true, to),
            PortProbe::Udp(_, to) => (false, to),
            // The server's kernel answers.
            PortProbe::Ping(_) => continue,
        };
        let known = addresses.iter().any(|known| match known {
            Probe::Tcp(addr) => tcp && *addr == to,
            Probe::Udp(addr) => !tcp && *addr == to,
        });
        if !known {
            addresses.push(if tcp { Probe::Tcp(to) } else { Probe::Udp(to) });
        }
    }
    let servers = Servers::start(&topo, &addresses);
    let fates = || -> Vec<(String, Fate)> {
        probes
            .iter()
            .map(|probe| (probe.name(), probe.fate(&topo, &servers)))
            .collect()
    };
    let listed = load(&topo.router);
    let text = translate(&listed);
    let config = ConfigFile::new(&text).unwrap();
    let mut relay =
        Tproxy::start(&topo.router, &["--relay-only", "--config", config.path()]).unwrap();
    let original = fates();
    relay.stop().unwrap();
    unload(&topo.router);
    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let translated = fates();
    let counters = tproxy.ebpf_counters().unwrap();
    tproxy.stop().unwrap();
    (original, translated, text, counters)
}

/// `-m conntrack --ctdir REPLY -j RETURN` ahead of a TPROXY rule for all UDP on every
/// interface: a flow left alone (to port 54) gets its replies left alone too, where without
/// the guard they would be steered on their way back (relayed to the client all the same,
/// so the probes' fates cannot tell: the counters do).
const CTDIR_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:DIVERT - [0:0]
-A PREROUTING -p udp -m socket --transparent -j DIVERT
-A PREROUTING -m conntrack --ctdir REPLY -j RETURN
-A PREROUTING -p udp -m udp --dport 54 -j RETURN
-A PREROUTING -p udp -j TPROXY --on-port 15053 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A DIVERT -j ACCEPT
COMMIT
";

/// What keeps the router's connection tracking on once the iptables rules are gone, as NAT
/// does on a real router: the kernel tracks connections only while something uses it.
const KEEP_CONNTRACK_NFT: &str = "\
table inet keep_conntrack {
	chain prerouting {
		type filter hook prerouting priority 0; policy accept;
		ct state new counter
	}
}
";

/// The same in nft, as mssb's sing-box rules write it: only a connection's original
/// direction goes to the chain that steers.
const CT_DIRECTION_NFT: &str = "\
table ip t {
	chain steer {
		meta l4proto udp tproxy to 127.0.0.1:15053 meta mark set 0x1 accept
	}
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta l4proto udp socket transparent 1 meta mark set 0x1 accept
		udp dport 54 return
		meta l4proto udp ct direction original goto steer
	}
}
";

/// Loads [`KEEP_CONNTRACK_NFT`], which stays for both runs.
fn keep_conntrack(netns: &Netns) {
    let path = ConfigFile::new(KEEP_CONNTRACK_NFT).unwrap();
    let status = Command::new("ip")
        .args(["netns", "exec", &netns.name, "nft", "-f", path.path()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Runs the probes of the connection-direction rule sets through `load`'s rules and their
/// translation, and checks that only the flow to port 53 is steered both ways.
fn ct_direction_round_trip(load: impl FnOnce(&Netns) -> String, unload: fn(&Netns)) {
    let probes = [
        PortProbe::Udp(0, "10.10.2.2:53"),
        PortProbe::Udp(0, "10.10.2.2:54"),
    ];
    let (original, translated, config, counters) = fates_loaded_both_ways(
        &probes,
        |netns| {
            keep_conntrack(netns);
            load(netns)
        },
        unload,
    );
    assert_eq!(
        fates_of(&original),
        [Fate::Intercepted, Fate::Direct],
        "original: {original:?}"
    );
    assert!(config.contains("ct_direction = "), "{config}");
    assert_eq!(translated, original, "translated config:\n{config}");
    assert_eq!(
        counters.get("udp/steered_new"),
        Some(&1),
        "only the flow to port 53 is steered, not the replies from port 54: {counters:?}"
    );
}

/// shadowsocks-libev's README (pure tproxy) at PREROUTING: the connection-mark idiom that
/// marks a flow's first packet (a TCP SYN, a UDP packet of a new connection), keeps the mark
/// in the connection and restores it for the later packets; TPROXY rules on the mark that
/// set none (`--tproxy-mark 0x0/0x0`: the recipe's `ip rule` routes by 0x2333). A flow to
/// the bypassed server must keep its replies, which come back to a client address the
/// rules would steer: the connection's mark never marks them, and the translation's
/// `ct_direction = "original"` leaves them alone.
const CONNMARK_FIRST_PACKET_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:SSREDIR - [0:0]
-A PREROUTING -p tcp -m addrtype ! --src-type LOCAL ! --dst-type LOCAL -j SSREDIR
-A PREROUTING -p udp -m addrtype ! --src-type LOCAL ! --dst-type LOCAL -j SSREDIR
-A PREROUTING -p tcp -m mark --mark 0x2333 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x0/0x0
-A PREROUTING -p udp -m mark --mark 0x2333 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x0/0x0
-A SSREDIR -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A SSREDIR -m mark --mark 0x2333 -j RETURN
-A SSREDIR -d 10.10.2.3/32 -j RETURN
-A SSREDIR -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j MARK --set-xmark 0x2333/0xffffffff
-A SSREDIR -p udp -m conntrack --ctstate NEW -j MARK --set-xmark 0x2333/0xffffffff
-A SSREDIR -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
";

/// The README's `ip rule add fwmark 0x2333 table 100` (table 100 is the recipe's).
fn connmark_routing(netns: &Netns, action: &str) {
    let status = Command::new("ip")
        .args(["netns", "exec", &netns.name, "ip", "rule", action])
        .args(["fwmark", "0x2333", "lookup", "100"])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn iptables_connmark_first_packet_idiom_steers_new_flows_and_leaves_replies_translated() {
    require_root();
    let probes = [
        PortProbe::Tcp(0, "10.10.2.2:80"),
        PortProbe::Tcp(0, "10.10.2.3:80"),
        PortProbe::Udp(0, "10.10.2.2:53"),
        PortProbe::Udp(0, "10.10.2.3:53"),
    ];
    let (original, translated, config, counters) = fates_loaded_both_ways(
        &probes,
        |netns| {
            keep_conntrack(netns);
            restore_iptables(netns, CONNMARK_FIRST_PACKET_IPTABLES).unwrap();
            connmark_routing(netns, "add");
            CONNMARK_FIRST_PACKET_IPTABLES.to_string()
        },
        |netns| {
            connmark_routing(netns, "del");
            remove_iptables_tproxy(netns).unwrap()
        },
    );
    let expected: Vec<Fate> = {
        use Fate::*;
        vec![Intercepted, Direct, Intercepted, Direct]
    };
    assert_eq!(fates_of(&original), expected, "original: {original:?}");
    assert!(config.contains("ct_direction = \"original\""), "{config}");
    assert_eq!(translated, original, "translated config:\n{config}");
    assert_eq!(
        counters.get("udp/steered_new"),
        Some(&1),
        "the flow to 10.10.2.2:53 is steered, not the replies of the one to 10.10.2.3: \
         {counters:?}"
    );
}

#[test]
fn iptables_ctdir_reply_leaves_the_replies_of_flows_left_alone_translated() {
    require_root();
    ct_direction_round_trip(
        |netns| {
            restore_iptables(netns, CTDIR_IPTABLES).unwrap();
            CTDIR_IPTABLES.to_string()
        },
        |netns| remove_iptables_tproxy(netns).unwrap(),
    );
}

#[test]
fn nft_ct_direction_original_steers_no_reply_translated() {
    require_root();
    ct_direction_round_trip(
        |netns| {
            restore_nft(netns, CT_DIRECTION_NFT);
            let listed = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &netns.name,
                    "nft",
                    "list",
                    "table",
                    "ip",
                    "t",
                ])
                .output()
                .unwrap();
            assert!(listed.status.success());
            String::from_utf8(listed.stdout).unwrap()
        },
        remove_translated_table,
    );
}

/// mssb's sing-box chain: `fib daddr type { unspec, local, anycast, multicast } return`,
/// reached only through `ct direction original` (on every interface here, so that the
/// server's replies meet it too), with more prefixes than the rules tried one by one could
/// hold if each asked for the direction itself.
const FIB_TYPES_NFT: &str = "\
table inet t {
	chain steer {
		fib daddr type { unspec, local, anycast, multicast } return
		ip daddr { 10.20.7.0/24, 10.21.7.0/24, 10.22.7.0/24, 10.23.7.0/24, 10.24.7.0/24, 10.25.7.0/24, 10.26.7.0/24, 10.27.7.0/24, 10.28.7.0/24, 10.29.7.0/24, 10.30.7.0/24, 10.31.7.0/24, 10.32.7.0/24, 10.33.7.0/24, 10.34.7.0/24, 10.35.7.0/24, 10.36.7.0/24, 10.37.7.0/24, 10.38.7.0/24, 10.39.7.0/24, 10.40.7.0/24, 10.41.7.0/24, 10.42.7.0/24, 10.43.7.0/24, 10.44.7.0/24, 10.45.7.0/24, 10.46.7.0/24, 10.47.7.0/24, 10.48.7.0/24, 10.49.7.0/24, 10.50.7.0/24, 10.51.7.0/24, 10.52.7.0/24, 10.53.7.0/24, 10.54.7.0/24, 10.55.7.0/24, 10.56.7.0/24, 10.57.7.0/24, 10.58.7.0/24, 10.59.7.0/24 } return
		udp dport 54 return
		meta l4proto { tcp, udp } tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept
		meta l4proto { tcp, udp } tproxy ip6 to [::1]:15001 meta mark set 0x1 accept
	}
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		ct direction original goto steer
	}
}
";

/// IPv6's anycast addresses include the first address of a prefix routed without a gateway
/// (fd00:7::/64 here, added by hand, whose first address the server holds): the original
/// leaves a flow to it alone, and so must the translation, which follows the routes. Every
/// rule asks for the original direction, so the translation's rules are looked up behind
/// the direction guard (without it, tproxy would refuse the 40 prefixes): the replies of
/// the flow left alone (to port 54) are not steered.
#[test]
fn nft_fib_address_types_behind_ct_direction_steer_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    for addr in ["fd00:7::/64", "fd00:7::1/64"] {
        topo.server
            .ip(&["addr", "add", addr, "dev", "eth0", "nodad"])
            .unwrap();
    }
    topo.router
        .ip(&["-6", "route", "add", "fd00:7::/64", "dev", "to-server"])
        .unwrap();
    let probes = [
        Probe::Tcp("10.10.2.2:80"),
        Probe::Tcp("[fd00:2::2]:80"),
        Probe::Tcp("[fd00:7::]:80"),
        Probe::Tcp("[fd00:7::1]:80"),
        Probe::Udp("10.10.2.2:53"),
        Probe::Udp("10.10.2.2:54"),
    ];
    let servers = Servers::start(&topo, &probes);
    let listed = listed_nft(&topo.router, FIB_TYPES_NFT);
    for args in TPROXY_ROUTING_V6 {
        topo.router.ip(args).unwrap();
    }
    keep_conntrack(&topo.router);
    let text = translate(&listed);
    assert!(
        text.contains("dst = \"anycast\"") && text.contains("ct_direction = \"original\""),
        "{text}"
    );
    let config = ConfigFile::new(&text).unwrap();
    let mut relay =
        Tproxy::start(&topo.router, &["--relay-only", "--config", config.path()]).unwrap();
    let original = servers.intercepted(&topo, &probes);
    relay.stop().unwrap();
    remove_nft_and_v6_routing(&topo.router);
    keep_conntrack(&topo.router);
    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let translated = servers.intercepted(&topo, &probes);
    let counters = tproxy.ebpf_counters().unwrap();
    tproxy.stop().unwrap();
    assert_eq!(
        steered_names(&original),
        [
            "tcp 10.10.2.2:80",
            "tcp [fd00:2::2]:80",
            "tcp [fd00:7::1]:80",
            "udp 10.10.2.2:53"
        ],
        "original"
    );
    assert_eq!(translated, original, "translated config:\n{text}");
    assert_eq!(
        counters.get("udp/steered_new"),
        Some(&1),
        "the flow to port 53 is steered, not the replies from port 54: {counters:?}"
    );
}

/// Source ports, as `--sport`, `-m multiport --sports` and `! --sport` write them: the
/// udp_proxy_server corpus idiom (the proxy's own port is left alone) and its other forms.
const SOURCE_PORTS_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:PROXY - [0:0]
-A PREROUTING -i to-client -j PROXY
-A PROXY -p udp -m udp --sport 7777 -j RETURN
-A PROXY -p udp -m multiport --sports 7000:7010,7100 -j RETURN
-A PROXY -p tcp -m tcp ! --sport 5000 -j RETURN
-A PROXY -p udp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PROXY -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
COMMIT
";

#[test]
fn iptables_source_port_matches_steer_the_same_flows_translated() {
    require_root();
    let probes = [
        PortProbe::Udp(7777, "10.10.2.2:53"),
        PortProbe::Udp(7005, "10.10.2.2:53"),
        PortProbe::Udp(7100, "10.10.2.2:53"),
        PortProbe::Udp(7011, "10.10.2.2:53"),
        PortProbe::Udp(0, "10.10.2.2:53"),
        PortProbe::Tcp(5000, "10.10.2.2:80"),
        PortProbe::Tcp(5001, "10.10.2.2:80"),
        PortProbe::Tcp(0, "10.10.2.2:80"),
    ];
    let (original, translated, config, _) = fates_both_ways(SOURCE_PORTS_IPTABLES, &probes);
    let expected: Vec<Fate> = {
        use Fate::*;
        vec![
            Direct,
            Direct,
            Direct,
            Intercepted,
            Intercepted,
            Intercepted,
            Direct,
            Direct,
        ]
    };
    let fates = fates_of(&original);
    assert_eq!(fates, expected, "iptables: {original:?}");
    assert!(config.contains("sport = [7777]"), "{config}");
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// `-m multiport --ports` (either port in the list), the v2ray gist's UDP bypass of DNS and
/// DHCP, and its negation `! --ports` (neither port in the list).
const EITHER_PORTS_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:V2RAY_MASK - [0:0]
-A PREROUTING -i to-client -j V2RAY_MASK
-A V2RAY_MASK -p udp -m multiport --ports 53,7000:7010 -j RETURN
-A V2RAY_MASK -p tcp -m multiport ! --ports 80,5000,5001 -j RETURN
-A V2RAY_MASK -p udp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A V2RAY_MASK -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
COMMIT
";

#[test]
fn iptables_either_port_matches_steer_the_same_flows_translated() {
    require_root();
    let probes = [
        PortProbe::Udp(0, "10.10.2.2:53"),
        PortProbe::Udp(7005, "10.10.2.2:54"),
        PortProbe::Udp(53, "10.10.2.2:54"),
        PortProbe::Udp(7011, "10.10.2.2:54"),
        PortProbe::Udp(0, "10.10.2.2:54"),
        PortProbe::Tcp(0, "10.10.2.2:80"),
        PortProbe::Tcp(5000, "10.10.2.2:8080"),
        PortProbe::Tcp(5001, "10.10.2.2:80"),
        PortProbe::Tcp(0, "10.10.2.2:8080"),
    ];
    let (original, translated, config, _) = fates_both_ways(EITHER_PORTS_IPTABLES, &probes);
    let expected: Vec<Fate> = {
        use Fate::*;
        vec![
            Direct,
            Direct,
            Direct,
            Intercepted,
            Intercepted,
            Intercepted,
            Intercepted,
            Intercepted,
            Direct,
        ]
    };
    let fates = fates_of(&original);
    assert_eq!(fates, expected, "iptables: {original:?}");
    assert!(config.contains("sport = [53, \"7000-7010\"]"), "{config}");
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// AndroidTProxyShell's chains that change nothing (DNS_HIJACK_PRE's lone RETURN, an empty
/// MAC_CHAIN, and one whose first rule returns all), and its PROXY_INTERFACE, whose RETURNs
/// for the proxied interface take packets no later rule of the chain matches: they go on to
/// the calling chain's TPROXY rules as if the RETURNs were not there.
const RETURNING_CHAINS_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:DNS_HIJACK_PRE - [0:0]
:FIRST - [0:0]
:MAC_CHAIN - [0:0]
:PROXY_INTERFACE - [0:0]
:PROXY_PREROUTING - [0:0]
-A PREROUTING -p tcp -j PROXY_PREROUTING
-A PREROUTING -p udp -j PROXY_PREROUTING
-A DNS_HIJACK_PRE -j RETURN
-A FIRST -j RETURN
-A FIRST -j ACCEPT
-A PROXY_INTERFACE -i to-client -j RETURN
-A PROXY_INTERFACE -i to-server -j ACCEPT
-A PROXY_INTERFACE -i rndis+ -j ACCEPT
-A PROXY_PREROUTING -d 10.10.2.3/32 -j ACCEPT
-A PROXY_PREROUTING -j PROXY_INTERFACE
-A PROXY_PREROUTING -j MAC_CHAIN
-A PROXY_PREROUTING -j FIRST
-A PROXY_PREROUTING -j DNS_HIJACK_PRE
-A PROXY_PREROUTING -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PROXY_PREROUTING -p udp -m udp --dport 53 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
COMMIT
";

#[test]
fn returning_chains_and_returns_no_later_rule_matches_steer_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let probes = [
        Probe::Tcp("10.10.2.2:80"),
        Probe::Tcp("10.10.2.3:80"),
        Probe::Udp("10.10.2.2:53"),
        Probe::Udp("10.10.2.2:54"),
        Probe::Udp("10.10.2.3:53"),
    ];
    let (original, translated, config) =
        steered_both_ways_iptables(&topo, &probes, RETURNING_CHAINS_IPTABLES);
    assert_eq!(
        steered_names(&original),
        ["tcp 10.10.2.2:80", "udp 10.10.2.2:53"],
        "iptables"
    );
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// TPS's PROXY_INTERFACE: a RETURN for what is proxied, then an ACCEPT of everything else,
/// which the RETURN's packets would meet too: they go back to the calling chain's TPROXY
/// rules, which the translation repeats for them in the RETURN's place.
const RETURN_BEFORE_ACCEPT_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:PROXY_INTERFACE - [0:0]
:PROXY_PREROUTING - [0:0]
-A PREROUTING -p tcp -j PROXY_PREROUTING
-A PREROUTING -p udp -j PROXY_PREROUTING
-A PROXY_INTERFACE -d 10.10.2.2/32 -i to-client -j RETURN
-A PROXY_INTERFACE -j ACCEPT
-A PROXY_PREROUTING -j PROXY_INTERFACE
-A PROXY_PREROUTING -p tcp -m tcp --dport 80 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PROXY_PREROUTING -p udp -m udp --dport 53 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
COMMIT
";

#[test]
fn a_return_before_an_accept_of_the_rest_steers_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let probes = [
        Probe::Tcp("10.10.2.2:80"),
        Probe::Tcp("10.10.2.2:443"),
        Probe::Tcp("10.10.2.3:80"),
        Probe::Udp("10.10.2.2:53"),
        Probe::Udp("10.10.2.2:54"),
        Probe::Udp("10.10.2.3:53"),
    ];
    let (original, translated, config) =
        steered_both_ways_iptables(&topo, &probes, RETURN_BEFORE_ACCEPT_IPTABLES);
    assert_eq!(
        steered_names(&original),
        ["tcp 10.10.2.2:80", "udp 10.10.2.2:53"],
        "iptables"
    );
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// DROP in a TPROXY chain, the v2ray guides' block of QUIC (UDP 443) so that clients fall
/// back to TCP, behind a RETURN for one host (which keeps its QUIC).
const DROP_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:PROXY - [0:0]
-A PREROUTING -i to-client -j PROXY
-A PROXY -d 10.10.2.3/32 -j RETURN
-A PROXY -p udp -m udp --dport 443 -j DROP
-A PROXY -p udp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PROXY -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
COMMIT
";

#[test]
fn iptables_drop_drops_the_same_flows_translated() {
    require_root();
    let probes = [
        PortProbe::Udp(0, "10.10.2.2:443"),
        PortProbe::Udp(0, "10.10.2.3:443"),
        PortProbe::Udp(0, "10.10.2.2:53"),
        PortProbe::Tcp(0, "10.10.2.2:443"),
    ];
    let (original, translated, config, counters) = fates_both_ways(DROP_IPTABLES, &probes);
    let fates = fates_of(&original);
    assert_eq!(
        fates,
        [
            Fate::Dropped,
            Fate::Direct,
            Fate::Intercepted,
            Fate::Intercepted
        ],
        "iptables: {original:?}"
    );
    assert!(config.contains("action = \"drop\""), "{config}");
    assert_eq!(translated, original, "translated config:\n{config}");
    assert!(
        counters.get("udp/dropped").is_some_and(|count| *count >= 1),
        "the drop is counted: {counters:?}"
    );
}

/// A DROP of every protocol (fifa-merlin-ss's game-server list): the translation drops
/// ICMP too (`proto = "other"`), leaves it alone where a RETURN ahead of the DROP does, and
/// keeps the DROP's order over a RETURN of one of its destinations behind it (for the
/// client's sources: a rule of their own, for every protocol).
const DROP_EVERY_PROTOCOL_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:PROXY - [0:0]
-A PREROUTING -i to-client -j PROXY
-A PROXY -d 10.10.2.3/32 -p udp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PROXY -d 10.10.2.3/32 -j RETURN
-A PROXY -s 10.10.1.0/24 -d 10.10.2.0/24 -j DROP
-A PROXY -d 10.10.2.2/32 -j RETURN
-A PROXY -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
COMMIT
";

#[test]
fn iptables_drop_of_every_protocol_drops_the_same_packets_translated() {
    require_root();
    let probes = [
        PortProbe::Ping("10.10.2.3"),
        PortProbe::Ping("10.10.2.2"),
        PortProbe::Udp(0, "10.10.2.3:53"),
        PortProbe::Tcp(0, "10.10.2.3:80"),
        PortProbe::Tcp(0, "10.10.2.2:80"),
        PortProbe::Udp(0, "10.10.2.2:53"),
    ];
    let (original, translated, config, counters) =
        fates_both_ways(DROP_EVERY_PROTOCOL_IPTABLES, &probes);
    assert_eq!(
        fates_of(&original),
        [
            Fate::Direct,
            Fate::Dropped,
            Fate::Intercepted,
            Fate::Direct,
            Fate::Dropped,
            Fate::Dropped
        ],
        "iptables: {original:?}"
    );
    assert!(
        config.contains("proto = [\"tcp\", \"udp\", \"other\"]"),
        "{config}"
    );
    assert_eq!(translated, original, "translated config:\n{config}");
    assert!(
        counters
            .get("other/dropped")
            .is_some_and(|count| *count >= 1)
            && counters
                .get("other/bypassed")
                .is_some_and(|count| *count >= 1),
        "other protocols' drops and bypasses are counted: {counters:?}"
    );
}

/// A RETURN for ICMP (chenxiyu-infra's corpus rule set) changes nothing tproxy steers: the
/// translation leaves it out and steers the same flows.
#[test]
fn an_icmp_return_is_left_out_and_the_same_flows_are_steered() {
    require_root();
    let rules = "\
*mangle
:PREROUTING ACCEPT [0:0]
:PROXY - [0:0]
-A PREROUTING -i to-client -j PROXY
-A PROXY -d 10.10.2.3/32 -j RETURN
-A PROXY -p icmp -j RETURN
-A PROXY -p udp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PROXY -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
COMMIT
";
    let probes = [
        PortProbe::Udp(0, "10.10.2.2:53"),
        PortProbe::Udp(0, "10.10.2.3:53"),
        PortProbe::Tcp(0, "10.10.2.2:80"),
        PortProbe::Tcp(0, "10.10.2.3:80"),
    ];
    let (original, translated, config, _) = fates_both_ways(rules, &probes);
    let fates = fates_of(&original);
    assert_eq!(
        fates,
        [
            Fate::Intercepted,
            Fate::Direct,
            Fate::Intercepted,
            Fate::Direct
        ],
        "iptables: {original:?}"
    );
    assert!(!config.contains("icmp"), "{config}");
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// Source ports, DROP and an ICMP RETURN in nft's forms (`udp sport`, a set of them, `!=`,
/// `drop`, `meta l4proto icmp return`). The drop comes first: after `udp sport 7777 return`
/// tproxy's order would put it ahead of that rule for port 443 (translate reports that).
const SOURCE_PORTS_AND_DROP_NFT: &str = "\
table inet t {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		iifname \"to-client\" udp dport 443 drop
		iifname \"to-client\" udp sport 7777 return
		iifname \"to-client\" udp sport { 7000-7010, 7100 } return
		iifname \"to-client\" tcp sport != 5000 return
		iifname \"to-client\" meta l4proto icmp return
		iifname \"to-client\" meta l4proto udp tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept
		iifname \"to-client\" meta l4proto tcp tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept
	}
}
";

#[test]
fn nft_source_ports_and_drop_steer_and_drop_the_same_flows_translated() {
    require_root();
    let probes = [
        PortProbe::Udp(7777, "10.10.2.2:53"),
        PortProbe::Udp(7100, "10.10.2.2:53"),
        PortProbe::Udp(0, "10.10.2.2:53"),
        PortProbe::Udp(0, "10.10.2.2:443"),
        PortProbe::Udp(7777, "10.10.2.2:443"),
        PortProbe::Tcp(5000, "10.10.2.2:80"),
        PortProbe::Tcp(0, "10.10.2.2:80"),
    ];
    let (original, translated, config, counters) = fates_loaded_both_ways(
        &probes,
        |netns| listed_nft(netns, SOURCE_PORTS_AND_DROP_NFT),
        remove_nft,
    );
    let expected: Vec<Fate> = {
        use Fate::*;
        vec![
            Direct,
            Direct,
            Intercepted,
            Dropped,
            Dropped,
            Intercepted,
            Direct,
        ]
    };
    let fates = fates_of(&original);
    assert_eq!(fates, expected, "nft: {original:?}");
    assert_eq!(translated, original, "translated config:\n{config}");
    assert!(
        counters.get("udp/dropped").is_some_and(|count| *count >= 1),
        "the drop is counted: {counters:?}"
    );
}

/// A chain at priority raw that only filters (lesca's QUIC reject, a TCP reset, an accept
/// that ends only its own chain) in front of the TPROXY chain. The translation leaves it
/// alone: the user deletes only the translated table and keeps the other, which still
/// rejects what tproxy's program, running before it, steered.
const FILTER_CHAIN_NFT: &str = "\
table ip guard {
	chain raw {
		type filter hook prerouting priority raw; policy accept;
		iifname \"to-client\" udp dport 443 reject
		iifname \"to-client\" tcp dport 8443 reject with tcp reset
		iifname \"to-client\" ip daddr 10.10.2.3 accept
	}
}
table ip t {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		iifname \"to-client\" meta l4proto { tcp, udp } tproxy to 127.0.0.1:15001 meta mark set 0x1 accept
	}
}
";

/// Removes what the translation of [`FILTER_CHAIN_NFT`] replaces: its TPROXY table.
fn remove_translated_table(netns: &Netns) {
    let status = Command::new("ip")
        .args([
            "netns",
            "exec",
            &netns.name,
            "nft",
            "delete",
            "table",
            "ip",
            "t",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    remove_tproxy_routing(netns).unwrap();
}

#[test]
fn nft_a_chain_that_only_filters_is_kept_and_still_rejects_what_tproxy_steers() {
    require_root();
    let probes = [
        PortProbe::Udp(0, "10.10.2.2:443"),
        PortProbe::Tcp(0, "10.10.2.2:8443"),
        PortProbe::Tcp(0, "10.10.2.3:80"),
        PortProbe::Udp(0, "10.10.2.2:53"),
        PortProbe::Tcp(0, "10.10.2.2:80"),
    ];
    let (original, translated, config, counters) = fates_loaded_both_ways(
        &probes,
        |netns| listed_nft(netns, FILTER_CHAIN_NFT),
        remove_translated_table,
    );
    let expected: Vec<Fate> = {
        use Fate::*;
        vec![Refused, Refused, Intercepted, Intercepted, Intercepted]
    };
    let fates = fates_of(&original);
    assert_eq!(fates, expected, "nft: {original:?}");
    assert_eq!(translated, original, "translated config:\n{config}");
    assert!(
        !config.contains("drop") && !config.contains("443"),
        "the kept chain is not in the translation:\n{config}"
    );
    // tproxy's program steered the rejected flows' packets before the kept chain saw them.
    assert!(
        counters
            .get("udp/steered_new")
            .is_some_and(|count| *count >= 2),
        "{counters:?}"
    );
}

/// lesca's chain at priority raw: a notrack of the packets that carry the TPROXY rules'
/// mark 0x1 (in the original only those that arrive with it: mangle sets it later), beside
/// its QUIC reject, and a firewall that drops untracked packets at input. Left alone, the
/// notrack would untrack every packet tproxy steers if tproxy routed with 0x1, which its
/// program sets before netfilter runs, and the firewall would drop them: the translation
/// routes with a bit of its own.
const UNTRACKED_MARK_NFT: &str = "\
table ip guard {
	chain raw {
		type filter hook prerouting priority raw; policy accept;
		meta mark 0x00000001 notrack
		iifname \"to-client\" udp dport 443 reject
	}
	chain input {
		type filter hook input priority filter; policy accept;
		ct state untracked drop
	}
}
table ip t {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		iifname \"to-client\" meta l4proto { tcp, udp } tproxy to 127.0.0.1:15001 meta mark set 0x1 accept
	}
}
";

#[test]
fn nft_a_kept_notrack_of_the_tproxy_mark_does_not_untrack_what_tproxy_steers() {
    require_root();
    let probes = [
        PortProbe::Tcp(0, "10.10.2.2:80"),
        PortProbe::Udp(0, "10.10.2.2:53"),
        PortProbe::Udp(0, "10.10.2.2:443"),
    ];
    let (original, translated, config, _) = fates_loaded_both_ways(
        &probes,
        |netns| listed_nft(netns, UNTRACKED_MARK_NFT),
        remove_translated_table,
    );
    let fates = fates_of(&original);
    assert_eq!(
        fates,
        [Fate::Intercepted, Fate::Intercepted, Fate::Refused],
        "nft: {original:?}"
    );
    assert_eq!(translated, original, "translated config:\n{config}");
    assert!(
        config.contains("mark = \"0x1000000/0x1000000\""),
        "{config}"
    );
}

/// Owner matches in a chain at prerouting (shellcrash's `meta skgid 7890 return`): nft
/// loads them, but a packet has no socket there yet and they never match, negated or not.
/// The client's sockets are root's: a match would let its flows go direct.
const OWNER_AT_PREROUTING_NFT: &str = "\
table ip t {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		iifname \"to-client\" meta skgid 0 return
		iifname \"to-client\" meta skuid != 4242 tcp dport 80 return
		iifname \"to-client\" meta l4proto { tcp, udp } tproxy to 127.0.0.1:15001 meta mark set 0x1 accept
	}
}
";

#[test]
fn nft_owner_matches_at_prerouting_match_nothing_there_translated() {
    require_root();
    let probes = [
        PortProbe::Tcp(0, "10.10.2.2:80"),
        PortProbe::Tcp(0, "10.10.2.2:22"),
        PortProbe::Udp(0, "10.10.2.2:53"),
    ];
    let (original, translated, config, _) = fates_loaded_both_ways(
        &probes,
        |netns| listed_nft(netns, OWNER_AT_PREROUTING_NFT),
        remove_nft,
    );
    let fates = fates_of(&original);
    assert_eq!(fates, [Fate::Intercepted; 3], "nft: {original:?}");
    assert_eq!(translated, original, "translated config:\n{config}");
    assert!(
        !config.contains("uid") && !config.contains("gid"),
        "{config}"
    );
}

/// The probes of the shared-chain rule sets: a chain entered by a TCP jump and by a UDP
/// one, whose RETURNs are bypasses and whose rules for the other protocol never match on a
/// path, and a bypass of the server's /24 that a port rule before it partly shadows (its
/// ports from the client's /24 are steered first).
const SHARED_CHAIN_PROBES: &[Probe] = &[
    Probe::Tcp("10.10.2.2:80"),
    Probe::Tcp("10.10.2.2:8050"),
    Probe::Tcp("10.10.2.2:22"),
    Probe::Tcp("10.10.2.3:80"),
    Probe::Udp("10.10.2.2:53"),
    Probe::Udp("10.10.2.3:53"),
    Probe::Udp("10.10.2.2:54"),
    Probe::Tcp("[fd00:2::2]:80"),
];

const SHARED_CHAIN_STEERED: &[&str] =
    &["tcp 10.10.2.2:80", "tcp 10.10.2.2:8050", "udp 10.10.2.2:53"];

const SHARED_CHAIN_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:DIVERT - [0:0]
:PROXY - [0:0]
-A PREROUTING -p tcp -m socket --transparent -j DIVERT
-A PREROUTING -p udp -m socket --transparent -j DIVERT
-A PREROUTING -i to-client -p tcp -j PROXY
-A PREROUTING -i to-client -p udp -m udp --dport 53 -j PROXY
-A PROXY -d 10.10.2.3/32 -j RETURN
-A PROXY -d 10.10.2.2/32 -p udp -m udp --dport 54 -j RETURN
-A PROXY -s 10.10.1.0/24 -p tcp -m multiport --dports 80,8050 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PROXY -d 10.10.2.0/24 -p tcp -j RETURN
-A PROXY -p tcp -j TPROXY --on-port 15002 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PROXY -p udp -j TPROXY --on-port 15053 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A DIVERT -j ACCEPT
COMMIT
";

#[test]
fn a_shared_chain_and_a_partly_shadowed_bypass_steer_the_same_flows_translated_iptables() {
    require_root();
    let topo = Topo::new().unwrap();
    let (original, translated, config) =
        steered_both_ways_iptables(&topo, SHARED_CHAIN_PROBES, SHARED_CHAIN_IPTABLES);
    assert!(
        config.contains("its packets that line 11 takes first"),
        "the shadowed ports get a rule of their own:\n{config}"
    );
    assert_eq!(steered_names(&original), SHARED_CHAIN_STEERED, "iptables");
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// The same in nft, with a rule on an empty named set (which matches nothing).
const SHARED_CHAIN_NFT: &str = "\
table inet shared {
	set nobody {
		type ipv4_addr
		flags interval
	}
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta l4proto { tcp, udp } socket transparent 1 meta mark set 0x1 accept
		iifname \"to-client\" meta l4proto tcp jump proxy
		iifname \"to-client\" udp dport 53 jump proxy
	}
	chain proxy {
		ip daddr 10.10.2.3 return
		ip saddr @nobody accept
		ip daddr 10.10.2.2 udp dport 54 return
		ip saddr 10.10.1.0/24 tcp dport { 80, 8050 } tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept
		ip daddr 10.10.2.0/24 meta l4proto tcp return
		meta l4proto tcp tproxy ip to 127.0.0.1:15002 meta mark set 0x1 accept
		meta l4proto udp tproxy ip to 127.0.0.1:15053 meta mark set 0x1 accept
	}
}
";

#[test]
fn a_shared_chain_and_a_partly_shadowed_bypass_steer_the_same_flows_translated_nft() {
    require_root();
    let topo = Topo::new().unwrap();
    let (original, translated, config) = steered_both_ways(
        &topo,
        SHARED_CHAIN_PROBES,
        |netns| listed_nft(netns, SHARED_CHAIN_NFT),
        remove_nft,
    );
    assert!(config.contains("takes first"), "{config}");
    assert_eq!(steered_names(&original), SHARED_CHAIN_STEERED, "nft");
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// A goto does not come back: the TCP to 10.10.2.2 that its chain does not steer (port
/// 8050) leaves PREROUTING unsteered, while the rest of TCP goes on to the later rule.
#[test]
fn what_a_goto_leaves_undecided_steers_the_same_flows_translated() {
    require_root();
    let rules = "\
*mangle
:PREROUTING ACCEPT [0:0]
:DIVERT - [0:0]
:WEB - [0:0]
-A PREROUTING -p tcp -m socket --transparent -j DIVERT
-A PREROUTING -i to-client -d 10.10.2.2/32 -g WEB
-A PREROUTING -i to-client -p tcp -j TPROXY --on-port 15002 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A WEB -p tcp -m tcp --dport 80 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A DIVERT -j ACCEPT
COMMIT
";
    let probes = [
        Probe::Tcp("10.10.2.2:80"),
        Probe::Tcp("10.10.2.2:8050"),
        Probe::Tcp("10.10.2.3:80"),
        Probe::Tcp("10.10.2.3:8050"),
    ];
    let topo = Topo::new().unwrap();
    let (original, translated, config) = steered_both_ways_iptables(&topo, &probes, rules);
    assert_eq!(
        steered_names(&original),
        ["tcp 10.10.2.2:80", "tcp 10.10.2.3:80", "tcp 10.10.2.3:8050"],
        "iptables"
    );
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// A translation that `run` would refuse fails as `check` would, even with
/// `--allow-skipped`: 40 source ports are more entries than the program tries one by one
/// (before, translate exited 0 and `check` refused its output).
#[test]
fn a_translation_that_check_refuses_fails_with_checks_reason() {
    let mut rules = String::from("*mangle\n");
    for port in 1001..=1040 {
        rules += &format!("-A PREROUTING -p udp --sport {port} -j DROP\n");
    }
    rules += "-A PREROUTING -p tcp --dport 80 -j TPROXY --on-port 7001 --tproxy-mark 0x1/0x1\n\
              COMMIT\n";
    for flags in [&["translate"][..], &["translate", "--allow-skipped"]] {
        let (status, _, stderr) = tproxy_with_input(flags, &rules).unwrap();
        assert!(!status.success(), "{flags:?}: {stderr}");
        assert!(
            stderr.contains("refused as tproxy check would refuse it")
                && stderr.contains("need 40 entries"),
            "{flags:?}: {stderr}"
        );
    }
}

/// The Envoy guide's idioms (tests/corpus/translate/envoy-tproxy-outgoing.rules): a LOG rule,
/// left out, and the socket match marking without a divert chain, its packets going on to
/// the TPROXY rule, whose own lookup of established flows hands them their socket.
const ENVOY_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -m limit --limit 2/min -j LOG
-A PREROUTING -p tcp -m socket -j MARK --set-xmark 0x1/0xffffffff
-A PREROUTING -p tcp -m tcp --dport 80 -j TPROXY --on-port 4999 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
COMMIT
";

#[test]
fn a_log_rule_and_a_socket_mark_that_goes_on_steer_the_same_flows_translated() {
    require_root();
    let probes = [
        Probe::Tcp("10.10.2.2:80"),
        Probe::Tcp("10.10.2.3:80"),
        Probe::Tcp("10.10.2.2:443"),
        Probe::Udp("10.10.2.2:80"),
    ];
    let topo = Topo::new().unwrap();
    let (original, translated, config) = steered_both_ways_iptables(&topo, &probes, ENVOY_IPTABLES);
    assert_eq!(
        steered_names(&original),
        ["tcp 10.10.2.2:80", "tcp 10.10.2.3:80"],
        "iptables"
    );
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// Hysteria's idiom (tests/corpus/translate/hysteria-tproxy.rules): the socket match marks
/// UDP packets of flows with a transparent socket, and they go on to a RETURN for every
/// socket. A flow's later datagrams meet the socket its first one made (the relay's), so
/// every datagram of a two-datagram flow is relayed both ways. (Only the client side jumps
/// to the chain: the servers' replies would be steered too.)
const HYSTERIA_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:HYSTERIA - [0:0]
-A PREROUTING -s 10.10.1.0/24 -j HYSTERIA
-A HYSTERIA -p tcp -m socket --transparent -j MARK --set-xmark 0x1/0xffffffff
-A HYSTERIA -p udp -m socket --transparent -j MARK --set-xmark 0x1/0xffffffff
-A HYSTERIA -m socket -j RETURN
-A HYSTERIA -d 10.10.2.3/32 -j RETURN
-A HYSTERIA -p tcp -j TPROXY --on-port 2500 --on-ip 127.0.0.1 --tproxy-mark 0x1/0xffffffff
-A HYSTERIA -p udp -j TPROXY --on-port 2500 --on-ip 127.0.0.1 --tproxy-mark 0x1/0xffffffff
COMMIT
";

#[test]
fn a_udp_socket_mark_that_goes_on_relays_every_datagram_of_a_flow_translated() {
    require_root();
    let probes = [
        Probe::Udp("10.10.2.2:53"),
        Probe::Udp("10.10.2.3:53"),
        Probe::Tcp("10.10.2.2:80"),
    ];
    let topo = Topo::new().unwrap();
    let servers = Servers::start(&topo, &probes);
    // Each datagram of one flow: whether it was answered, and through the router.
    let flow = || -> Vec<bool> {
        let addr: SocketAddr = "10.10.2.2:53".parse().unwrap();
        let server = servers.udp.iter().find(|s| s.addr == addr).unwrap();
        let client = udp_client(&topo.client, addr).unwrap();
        (0..2)
            .map(|i| {
                server.peers.lock().unwrap().clear();
                let payload = format!("datagram {i}");
                let (reply, from) = udp_exchange(&client, addr, payload.as_bytes()).unwrap();
                reply == payload.as_bytes()
                    && from == addr
                    && server.peer_ips() == [Topo::router_as_seen_by_server(false)]
            })
            .collect()
    };
    restore_iptables(&topo.router, HYSTERIA_IPTABLES).unwrap();
    let config = ConfigFile::new(&translate(HYSTERIA_IPTABLES)).unwrap();
    let mut relay =
        Tproxy::start(&topo.router, &["--relay-only", "--config", config.path()]).unwrap();
    let original = (servers.intercepted(&topo, &probes), flow());
    relay.stop().unwrap();
    remove_iptables_tproxy(&topo.router).unwrap();
    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let translated = (servers.intercepted(&topo, &probes), flow());
    tproxy.stop().unwrap();
    assert_eq!(
        steered_names(&original.0),
        ["udp 10.10.2.2:53", "tcp 10.10.2.2:80"],
        "iptables"
    );
    assert_eq!(original.1, [true, true], "iptables: the flow's datagrams");
    assert_eq!(
        translated,
        original,
        "translated config:\n{}",
        config.path()
    );
}

/// istio's idioms (tests/corpus/translate/istio-tproxy.rules): conntrack's established flows
/// jump to a chain that sets the TPROXY mark and accepts, a later TPROXY rule takes every
/// other TCP flow but those to 127.0.0.1, and a CONNMARK --save-mark that nothing reads back.
const ISTIO_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:ISTIO_DIVERT - [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_TPROXY - [0:0]
-A PREROUTING -i to-client -p tcp -j ISTIO_INBOUND
-A PREROUTING -p tcp -m mark --mark 0x1 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A ISTIO_DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A ISTIO_DIVERT -j ACCEPT
-A ISTIO_INBOUND -p tcp -m tcp --dport 443 -j RETURN
-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT
-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY
-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x1/0xffffffff
COMMIT
";

#[test]
fn conntrack_established_flows_diverted_steer_the_same_flows_translated() {
    require_root();
    let probes = [
        Probe::Tcp("10.10.2.2:80"),
        Probe::Tcp("10.10.2.3:8050"),
        Probe::Tcp("10.10.2.2:443"),
        Probe::Udp("10.10.2.2:53"),
    ];
    let topo = Topo::new().unwrap();
    let (original, translated, config) = steered_both_ways_iptables(&topo, &probes, ISTIO_IPTABLES);
    assert_eq!(
        steered_names(&original),
        ["tcp 10.10.2.2:80", "tcp 10.10.2.3:8050"],
        "iptables"
    );
    assert_eq!(translated, original, "translated config:\n{config}");
}

/// istio's idioms (tests/corpus/translate/istio-tproxy.rules): its loop guard is the TPROXY
/// mark itself, and negated RETURNs let what they exclude fall through to the TPROXY rule
/// (istio's is `-i lo ! --mark 0x53a`; here a destination and sources, which the client's
/// flows can carry). Before, both were reported and nothing was translated.
const ISTIO_GUARD_AND_NEGATED_RETURNS: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:ISTIO_DIVERT - [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_TPROXY - [0:0]
-A PREROUTING -i to-client -p tcp -j ISTIO_INBOUND
-A ISTIO_DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A ISTIO_DIVERT -j ACCEPT
-A ISTIO_INBOUND -p tcp -m mark --mark 0x1 -j RETURN
-A ISTIO_INBOUND ! -d 10.10.2.2/32 -p tcp -m tcp --dport 443 -j RETURN
-A ISTIO_INBOUND ! -s 10.10.1.0/24 -p tcp -m tcp --dport 8050 -j RETURN
-A ISTIO_INBOUND ! -s 10.10.9.0/24 -p tcp -m tcp --dport 8060 -j RETURN
-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT
-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY
-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x1/0xffffffff
COMMIT
";

#[test]
fn a_guard_on_the_tproxy_mark_and_negated_returns_falling_through_steer_the_same_flows_translated()
{
    require_root();
    let probes = [
        Probe::Tcp("10.10.2.2:80"),
        Probe::Tcp("10.10.2.3:80"),
        Probe::Tcp("10.10.2.2:443"),
        Probe::Tcp("10.10.2.3:443"),
        Probe::Tcp("10.10.2.2:8050"),
        Probe::Tcp("10.10.2.3:8050"),
        Probe::Tcp("10.10.2.2:8060"),
        Probe::Udp("10.10.2.2:53"),
    ];
    let topo = Topo::new().unwrap();
    let servers = Servers::start(&topo, &probes);
    restore_iptables(&topo.router, ISTIO_GUARD_AND_NEGATED_RETURNS).unwrap();
    let text = translate(ISTIO_GUARD_AND_NEGATED_RETURNS);
    assert!(
        text.contains("socket_mark = \"0x1\"") && text.contains("\nmark = \"0x1000000/0x1000000\""),
        "{text}"
    );
    let config = ConfigFile::new(&text).unwrap();
    // Behind iptables the relay's own connections must not carry the guard's mark: the
    // TPROXY mark's policy routing would deliver them locally.
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
    let original = servers.intercepted(&topo, &probes);
    relay.stop().unwrap();
    remove_iptables_tproxy(&topo.router).unwrap();
    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let translated = servers.intercepted(&topo, &probes);
    tproxy.stop().unwrap();
    assert_eq!(
        steered_names(&original),
        [
            "tcp 10.10.2.2:80",
            "tcp 10.10.2.3:80",
            "tcp 10.10.2.2:443",
            "tcp 10.10.2.2:8050",
            "tcp 10.10.2.3:8050"
        ],
        "iptables"
    );
    assert_eq!(translated, original, "translated config:\n{text}");
}

/// istio's TPROXY mode on lo (tests/corpus/translate/istio-tproxy.rules): besides the
/// TPROXY rule for every interface, it leaves lo alone but for its own source 127.0.0.6 and
/// the packets marked 0x53a (here 0x2), which its routing sends to lo, and which fall
/// through to the TPROXY rule there. The translation attaches to lo beside `all`. Before,
/// the rules repeated for lo were reported and nothing was translated.
const ISTIO_ON_LO: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:ISTIO_DIVERT - [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_TPROXY - [0:0]
-A PREROUTING -i to-server -j RETURN
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A ISTIO_DIVERT -j ACCEPT
-A ISTIO_INBOUND -p tcp -m mark --mark 0x1 -j RETURN
-A ISTIO_INBOUND -s 127.0.0.6/32 -i lo -p tcp -j RETURN
-A ISTIO_INBOUND -i lo -p tcp -m mark ! --mark 0x2 -j RETURN
-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT
-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY
-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 127.0.0.1 --tproxy-mark 0x1/0xffffffff
COMMIT
";

/// The router's own connections, which arrive on lo as istio's do: from `source` with
/// `SO_MARK` `mark` to `destination`. Its routing sends those marked 0x2 to lo whatever their
/// destination; the router's own address (10.10.2.1, where nothing listens on port 81) is
/// reached over lo anyway.
const ROUTER_PROBES: &[(&str, u32, &str)] = &[
    ("127.0.0.7", 0x2, "10.10.2.2:80"),
    ("127.0.0.7", 0x2, "10.10.2.1:81"),
    ("127.0.0.6", 0x2, "10.10.2.1:81"),
    ("127.0.0.7", 0x0, "10.10.2.1:81"),
    ("127.0.0.7", 0x2, "127.0.0.1:81"),
];

/// For each of [`ROUTER_PROBES`], what became of it: `relayed` (the server saw the router),
/// `accepted` (by the relay, which then found nothing listening at the destination), or
/// `refused` (not steered: delivered where nothing listens). A probe to the server that
/// is not steered would be delivered locally too, but refused by no one (the reset's source
/// would be the server's address, not the router's): that fails the test.
fn router_probes(topo: &Topo) -> Vec<(String, &'static str)> {
    use std::{io::ErrorKind, time::Duration};
    let router = Topo::router_as_seen_by_server(false).to_string();
    ROUTER_PROBES
        .iter()
        .map(|&(source, mark, destination)| {
            let name = format!("{source} mark {mark:#x} to {destination}");
            let (source, destination): (std::net::IpAddr, SocketAddr) =
                (source.parse().unwrap(), destination.parse().unwrap());
            let router = router.clone();
            let outcome = topo.router.run(move || -> std::io::Result<&'static str> {
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                socket.set_mark(mark)?;
                socket.bind(&SocketAddr::new(source, 0).into())?;
                match socket.connect_timeout(&destination.into(), Duration::from_secs(5)) {
                    Err(error) if error.kind() == ErrorKind::ConnectionRefused => {
                        return Ok("refused")
                    }
                    // Established, then reset before the connect's wait saw it: the relay's
                    // reset when it finds nothing at the destination.
                    Err(error) if error.kind() == ErrorKind::ConnectionReset => {
                        return Ok("accepted")
                    }
                    connected => connected?,
                }
                let mut stream = std::net::TcpStream::from(socket);
                stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut text = String::new();
                match std::io::Read::read_to_string(&mut stream, &mut text) {
                    Ok(_) if text == router => Ok("relayed"),
                    Ok(_) => Ok("accepted"),
                    Err(error) if error.kind() == ErrorKind::ConnectionReset => Ok("accepted"),
                    Err(error) => Err(error),
                }
            });
            let outcome = outcome.unwrap_or_else(|error| panic!("{name}: {error}"));
            (name, outcome)
        })
        .collect()
}

#[test]
fn istios_arrivals_on_lo_steer_the_same_flows_translated_with_lo_beside_all() {
    require_root();
    let probes = [Probe::Tcp("10.10.2.2:80"), Probe::Tcp("10.10.2.3:8050")];
    let topo = Topo::new().unwrap();
    // istio's routing of the packets it marks for its proxy: delivered over lo.
    topo.router
        .ip(&["rule", "add", "fwmark", "0x2", "lookup", "200"])
        .unwrap();
    topo.router
        .ip(&[
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "200",
        ])
        .unwrap();
    let servers = Servers::start(&topo, &probes);
    restore_iptables(&topo.router, ISTIO_ON_LO).unwrap();
    let text = translate(ISTIO_ON_LO);
    assert!(
        text.contains("\ninterfaces = [\"all\", \"lo\"]\n"),
        "{text}"
    );
    let config = ConfigFile::new(&text).unwrap();
    // Behind iptables the relay's own connections must not carry the guard's mark (see
    // above).
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
    let original = (servers.intercepted(&topo, &probes), router_probes(&topo));
    relay.stop().unwrap();
    remove_iptables_tproxy(&topo.router).unwrap();
    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let translated = (servers.intercepted(&topo, &probes), router_probes(&topo));
    tproxy.stop().unwrap();
    assert_eq!(
        steered_names(&original.0),
        ["tcp 10.10.2.2:80", "tcp 10.10.2.3:8050"],
        "iptables"
    );
    let outcomes: Vec<&str> = original.1.iter().map(|(_, outcome)| *outcome).collect();
    assert_eq!(
        outcomes,
        ["relayed", "accepted", "refused", "refused", "refused"],
        "iptables: {:?}",
        original.1
    );
    assert_eq!(translated, original, "translated config:\n{text}");
}

/// sbshell's sing-box PREROUTING chain (tests/corpus/translate/sbshell-singbox-nft.rules):
/// DNS is steered ahead of the bypass of the host's own addresses, so a query to the
/// router's own address is steered while its other services are left alone. A loop guard
/// for the relay's socket mark comes first: sing-box answers DNS itself, tproxy's relay
/// connects to the router's port 53, which the chain would steer again on lo.
const SBSHELL_PREROUTING: &str = "\
table inet sing-box {
	chain prerouting_tproxy {
		type filter hook prerouting priority mangle; policy accept;
		meta mark 0x02000000 accept
		meta l4proto { tcp, udp } th dport 53 tproxy to :7895 accept
		fib daddr type local meta l4proto { tcp, udp } th dport 7895 reject with icmpx host-unreachable
		fib daddr type local accept
		ip daddr { 10.0.0.0/16, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16, 224.0.0.0/3 } accept
		meta l4proto { tcp, udp } tproxy to :7895 meta mark set 0x00000001
	}
}
";

#[test]
fn dns_to_the_hosts_own_address_ahead_of_its_bypass_steers_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let own_dns: SocketAddr = "10.10.1.1:53".parse().unwrap();
    let _servers = [
        Server::tell_peer(&topo.server, "10.10.2.2:80".parse().unwrap()).unwrap(),
        Server::tell_peer(&topo.router, own_dns).unwrap(),
        Server::tell_peer(&topo.router, "10.10.1.1:8080".parse().unwrap()).unwrap(),
    ];
    let echoes = [
        UdpEcho::start(&topo.server, "10.10.2.2:54".parse().unwrap()).unwrap(),
        UdpEcho::start(&topo.router, own_dns).unwrap(),
    ];
    let client = Topo::client_ip(false);
    let steered = || -> Vec<bool> {
        let tcp = ["10.10.2.2:80", "10.10.1.1:53", "10.10.1.1:8080"]
            .map(|addr| peer_seen_by(&topo.client, addr.parse().unwrap()).unwrap() != client);
        let udp = echoes.each_ref().map(|echo| {
            echo.peers.lock().unwrap().clear();
            let socket = udp_client(&topo.client, echo.addr).unwrap();
            let (reply, from) = udp_exchange(&socket, echo.addr, b"probe").unwrap();
            assert_eq!((reply.as_slice(), from), (&b"probe"[..], echo.addr));
            echo.peer_ips()[0] != client
        });
        tcp.into_iter().chain(udp).collect()
    };
    let listed = listed_nft(&topo.router, SBSHELL_PREROUTING);
    let text = translate(&listed);
    assert!(
        text.contains("dst = \"local\"\nports = [53]\naction = \"steer\""),
        "{text}"
    );
    // `tproxy to :7895` looks the proxy up at the receiving interface's address: the
    // original's relay listens on the wildcard address.
    let wildcard = text.replace(
        "listen = [\"127.0.0.1:7895\", \"[::1]:7895\"]",
        "listen = [\"0.0.0.0:7895\"]",
    );
    let original_config = ConfigFile::new(&wildcard).unwrap();
    let mut relay = Tproxy::start(
        &topo.router,
        &["--relay-only", "--config", original_config.path()],
    )
    .unwrap();
    let original = steered();
    relay.stop().unwrap();
    remove_nft(&topo.router);
    // TCP to the server, to the router's DNS, to its other service; UDP to the server, to
    // the router's DNS.
    assert_eq!(
        original,
        [true, true, false, true, true],
        "the original rules"
    );

    let config = ConfigFile::new(&text).unwrap();
    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let translated = steered();
    tproxy.stop().unwrap();
    assert_eq!(translated, original, "translated config:\n{text}");
}

/// sing-box-tproxy's prerouting chain (tests/corpus/translate/sing-box-tproxy-ansible.rules)
/// with its reserved sets whole: DNS is steered ahead of the bypasses of the host's own
/// addresses and of the reserved ones, in IPv4 and IPv6; everything else to a reserved
/// address or the host's own is left alone, the rest steered. The test's addresses are
/// reserved (10.0.0.0/8, fd00::/8) but for 198.18.0.2 and 3fff::2 on the server. The TPROXY
/// rules mark 0x1 for the test's policy routing (the template's DNS rule marks nothing,
/// which forwards its packets to other hosts), and the loop guard of sbshell's chain comes
/// first (tproxy's relay connects to the router's port 53).
const SING_BOX_ANSIBLE_PREROUTING: &str = "\
table inet sing_box_tproxy {
	set reserved_ip4 {
		type ipv4_addr
		flags interval
		elements = { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.0.0.0/24, 192.0.2.0/24, 192.88.99.0/24, 192.168.0.0/16, 198.51.100.0/24, 203.0.113.0/24, 224.0.0.0/4, 240.0.0.0/4 }
	}
	set reserved_ip6 {
		type ipv6_addr
		flags interval
		elements = { ::, ::1, ::ffff:0.0.0.0/96, 64:ff9b::/96, 64:ff9b:1::/48, 100::/64, 2001::/32, 2001:20::/28, 2001:db8::/32, 2002::/16, fd00::/8, fe80::/10, ff00::/8 }
	}
	chain prerouting_tproxy {
		type filter hook prerouting priority mangle; policy accept;
		meta mark 0x000000e1 accept
		meta l4proto { tcp, udp } th dport 53 tproxy to :7895 meta mark set 0x00000001 accept
		fib daddr type local meta l4proto { tcp, udp } th dport 7895 reject with icmpx host-unreachable
		fib daddr type local accept
		ip daddr @reserved_ip4 accept
		ip6 daddr @reserved_ip6 accept
		meta l4proto tcp socket transparent 1 meta mark set 0x00000001 accept
		meta l4proto { tcp, udp } tproxy to :7895 meta mark set 0x00000001
	}
}
";

#[test]
fn dns_to_reserved_and_own_addresses_ahead_of_their_bypasses_steers_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    // Addresses outside the reserved sets, on the server.
    topo.server
        .ip(&["addr", "add", "198.18.0.2/32", "dev", "lo"])
        .unwrap();
    topo.server
        .ip(&["addr", "add", "3fff::2/128", "dev", "lo"])
        .unwrap();
    topo.router
        .ip(&["route", "add", "198.18.0.2/32", "via", "10.10.2.2"])
        .unwrap();
    topo.router
        .ip(&["-6", "route", "add", "3fff::2/128", "via", "fd00:2::2"])
        .unwrap();
    // TCP to each, and UDP to the port 53 ones: to a reserved address of the server, the
    // router's own, and one outside the sets.
    let tcp = [
        (&topo.server, "10.10.2.2:53"),
        (&topo.server, "10.10.2.2:80"),
        (&topo.server, "[fd00:2::2]:53"),
        (&topo.server, "[fd00:2::2]:80"),
        (&topo.router, "10.10.1.1:53"),
        (&topo.router, "10.10.1.1:8080"),
        (&topo.router, "[fd00:1::1]:53"),
        (&topo.router, "[fd00:1::1]:8080"),
        (&topo.server, "198.18.0.2:80"),
        (&topo.server, "[3fff::2]:80"),
    ];
    let udp = [
        (&topo.server, "10.10.2.2:53"),
        (&topo.server, "[fd00:2::2]:53"),
        (&topo.server, "[fd00:2::2]:54"),
        (&topo.router, "10.10.1.1:53"),
        (&topo.router, "[fd00:1::1]:53"),
    ];
    let _servers: Vec<Server> = tcp
        .iter()
        .map(|(netns, addr)| Server::tell_peer(netns, addr.parse().unwrap()).unwrap())
        .collect();
    let echoes: Vec<UdpEcho> = udp
        .iter()
        .map(|(netns, addr)| UdpEcho::start(netns, addr.parse().unwrap()).unwrap())
        .collect();
    let steered = || -> Vec<(String, bool)> {
        let tcp = tcp.iter().map(|(_, addr)| {
            let addr: SocketAddr = addr.parse().unwrap();
            let peer = peer_seen_by(&topo.client, addr).unwrap();
            (
                format!("tcp {addr}"),
                peer != Topo::client_ip(addr.is_ipv6()),
            )
        });
        let udp = echoes.iter().map(|echo| {
            echo.peers.lock().unwrap().clear();
            let socket = udp_client(&topo.client, echo.addr).unwrap();
            let (reply, from) = udp_exchange(&socket, echo.addr, b"probe").unwrap();
            assert_eq!((reply.as_slice(), from), (&b"probe"[..], echo.addr));
            let peer = echo.peer_ips()[0];
            (
                format!("udp {}", echo.addr),
                peer != Topo::client_ip(echo.addr.is_ipv6()),
            )
        });
        tcp.chain(udp).collect()
    };
    let listed = listed_nft(&topo.router, SING_BOX_ANSIBLE_PREROUTING);
    // The test's policy routing for the TPROXY rules' mark, in IPv6 too.
    topo.router
        .ip(&["-6", "rule", "add", "fwmark", "1", "lookup", "100"])
        .unwrap();
    topo.router
        .ip(&[
            "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100",
        ])
        .unwrap();
    let text = translate(&listed);
    // `tproxy to :7895` looks the proxy up at the receiving interface's address: the
    // original's relay listens on the wildcard addresses.
    let wildcard = text.replace(
        "listen = [\"127.0.0.1:7895\", \"[::1]:7895\"]",
        "listen = [\"0.0.0.0:7895\", \"[::]:7895\"]",
    );
    assert_ne!(wildcard, text);
    let original_config = ConfigFile::new(&wildcard).unwrap();
    let mut relay = Tproxy::start(
        &topo.router,
        &["--relay-only", "--config", original_config.path()],
    )
    .unwrap();
    let original = steered();
    relay.stop().unwrap();
    remove_nft(&topo.router);
    topo.router
        .ip(&["-6", "rule", "del", "fwmark", "1", "lookup", "100"])
        .unwrap();
    topo.router
        .ip(&["-6", "route", "flush", "table", "100"])
        .unwrap();
    assert_eq!(
        steered_names(&original),
        [
            "tcp 10.10.2.2:53",
            "tcp [fd00:2::2]:53",
            "tcp 10.10.1.1:53",
            "tcp [fd00:1::1]:53",
            "tcp 198.18.0.2:80",
            "tcp [3fff::2]:80",
            "udp 10.10.2.2:53",
            "udp [fd00:2::2]:53",
            "udp 10.10.1.1:53",
            "udp [fd00:1::1]:53",
        ],
        "the original rules"
    );

    let config = ConfigFile::new(&text).unwrap();
    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let translated = steered();
    tproxy.stop().unwrap();
    assert_eq!(translated, original, "translated config:\n{text}");
}

/// Asks the kernel, over rtnetlink from inside the current thread's namespace, to add a
/// route for `dst`/32 of type `kind` and scope `scope` to the local table, through
/// `ifindex`; returns the errno it answers (0: added). iproute2 cannot name type 0, so the
/// request is written by hand.
fn add_local_table_route(dst: [u8; 4], kind: u8, scope: u8, ifindex: u32) -> i32 {
    const RTM_NEWROUTE: u16 = 24;
    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    let flags =
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    // struct rtmsg: family, dst_len, src_len, tos, table (local), protocol (static), scope, type, flags.
    let mut body = vec![
        libc::AF_INET as u8,
        32,
        0,
        0,
        255,
        4,
        scope,
        kind,
        0,
        0,
        0,
        0,
    ];
    for (kind, value) in [
        (RTA_DST, dst.to_vec()),
        (RTA_OIF, ifindex.to_ne_bytes().to_vec()),
    ] {
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&kind.to_ne_bytes());
        body.extend_from_slice(&value);
    }
    let mut message = Vec::new();
    message.extend_from_slice(&(16 + body.len() as u32).to_ne_bytes());
    message.extend_from_slice(&RTM_NEWROUTE.to_ne_bytes());
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&1u32.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&body);
    let socket = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    assert!(socket >= 0, "opening an rtnetlink socket");
    let mut answer = [0u8; 1024];
    let (sent, received) = unsafe {
        let sent = libc::send(socket, message.as_ptr().cast(), message.len(), 0);
        let received = libc::recv(socket, answer.as_mut_ptr().cast(), answer.len(), 0);
        libc::close(socket);
        (sent, received)
    };
    assert_eq!(sent, message.len() as isize, "sending the route");
    assert!(received >= 20, "the kernel's answer");
    // NLMSG_ERROR: the header, then the (negated) errno.
    -i32::from_ne_bytes(answer[16..20].try_into().unwrap())
}

/// `--dst-type UNSPEC` is translated as matching no IPv4 destination: xt_addrtype gives an
/// address the type of its route in the local table (MULTICAST and the broadcast addresses
/// aside), and the kernel refuses a route of type unspec in every scope, while it takes the
/// same request for an anycast route. iptables agrees: datagrams to an anycast route's
/// destination and to others match its ANYCAST rule and never its UNSPEC one.
#[test]
fn the_kernel_has_no_route_of_type_unspec_for_dst_type_unspec_to_match() {
    require_root();
    let topo = Topo::new().unwrap();
    let answers = topo.router.run(|| {
        let ifindex = unsafe { libc::if_nametoindex(c"to-server".as_ptr()) };
        assert_ne!(ifindex, 0, "to-server's index");
        let unspec: Vec<i32> = [0, 200, 253, 254, 255]
            .iter()
            .map(|&scope| add_local_table_route([10, 10, 2, 200], 0, scope, ifindex))
            .collect();
        let anycast = add_local_table_route([10, 10, 2, 201], 4, 253, ifindex);
        (unspec, anycast)
    });
    assert_eq!(
        answers,
        (vec![libc::EINVAL; 5], 0),
        "type unspec in each scope, then anycast"
    );
    let listed = topo
        .router
        .ip(&["route", "show", "table", "local"])
        .unwrap();
    assert!(listed.contains("anycast 10.10.2.201"), "{listed}");

    restore_iptables(
        &topo.router,
        "*mangle\n-A OUTPUT -m addrtype --dst-type UNSPEC -j RETURN\n\
         -A OUTPUT -m addrtype --dst-type ANYCAST -j RETURN\nCOMMIT\n",
    )
    .unwrap();
    topo.router.run(|| {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for to in [
            "10.10.2.201:9",
            "10.10.2.2:9",
            "10.10.2.200:9",
            "10.10.1.1:9",
        ] {
            socket.send_to(b"probe", to).unwrap();
        }
    });
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.router.name,
            "iptables-save",
            "-c",
            "-t",
            "mangle",
        ])
        .output()
        .unwrap();
    let saved = String::from_utf8_lossy(&out.stdout).into_owned();
    let packets = |kind: &str| -> u64 {
        saved
            .lines()
            .find(|line| line.contains(&format!("--dst-type {kind}")))
            .and_then(|line| line.strip_prefix('['))
            .and_then(|line| line.split(':').next())
            .and_then(|count| count.parse().ok())
            .unwrap_or_else(|| panic!("no counter for {kind} in\n{saved}"))
    };
    assert_eq!((packets("UNSPEC"), packets("ANYCAST")), (0, 1), "{saved}");
    remove_iptables_tproxy(&topo.router).unwrap();
}

/// What translate relies on to leave an nft `type nat` chain at output alone (fluxproxy's,
/// which only jumps to `redirect`s): the kernel looks a locally generated packet's route up
/// again after a nat chain only when its destination changed (`nf_nat_ipv4_local_fn`), so a
/// mark set there never sends the packet to the TPROXY rules' policy routing. A route chain's
/// mark does (the control: the connection is routed to `lo`, where nothing listens for it).
#[test]
fn a_mark_set_in_a_nft_nat_output_chain_routes_nothing_anew() {
    require_root();
    let topo = Topo::new().unwrap();
    let server: SocketAddr = "10.10.2.2:80".parse().unwrap();
    let _server = Server::tell_peer(&topo.server, server).unwrap();
    let marking = |chain_type: &str| {
        format!(
            "table inet marking {{\n\tchain output {{\n\t\ttype {chain_type} hook output \
             priority -105; policy accept;\n\t\ttcp dport 80 meta mark set 0x1\n\t}}\n}}\n"
        )
    };
    restore_nft(&topo.router, &marking("nat"));
    let through_nat = peer_seen_by(&topo.router, server);
    remove_nft(&topo.router);
    restore_nft(&topo.router, &marking("route"));
    let through_route = peer_seen_by(&topo.router, server);
    remove_nft(&topo.router);
    assert!(
        through_nat.is_ok(),
        "a nat chain's mark rerouted: {through_nat:?}"
    );
    assert!(
        through_route.is_err(),
        "a route chain's mark did not reroute: {through_route:?}"
    );
}

/// The Squid guides' MARK with the TPROXY rules' mark and no TPROXY (pastebin's corpus rule
/// set): policy routing hands the packet to the router's own sockets.
const MARK_FOR_DELIVERY_IPTABLES: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -i to-client -p tcp -m tcp --dport 80 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PREROUTING -d 10.10.2.2/32 -i to-client -p tcp -j MARK --set-xmark 0x1/0x1
COMMIT
";

/// What the client's connection to 10.10.2.2:81 reaches: the router's transparent listener
/// on port 81 answers with its local address (the dialled one), the server there with the
/// client's address as it sees it.
fn answer_to_port_81(topo: &Topo) -> String {
    let mut stream = topo
        .client
        .connect("10.10.2.2:81".parse().unwrap())
        .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
    answer.trim().to_string()
}

/// A MARK with the TPROXY rules' mark, last for its packets, becomes `action = "deliver"`:
/// with the iptables rules and with the translation alone, the connection to 10.10.2.2:81
/// goes to the router's transparent listener on that port, not to the server behind it, and
/// a connection to port 80 is still relayed.
#[test]
fn iptables_mark_for_local_delivery_delivers_the_same_flows_translated() {
    require_root();
    let topo = Topo::new().unwrap();
    let _server = Server::tell_peer(&topo.server, "10.10.2.2:81".parse().unwrap()).unwrap();
    let relayed = Server::tell_peer(&topo.server, "10.10.2.2:80".parse().unwrap()).unwrap();
    let listener = topo
        .router
        .transparent_listener("0.0.0.0:81".parse().unwrap())
        .unwrap();
    let answering = std::thread::spawn(move || -> std::io::Result<()> {
        for _ in 0..2 {
            let (mut stream, _) = listener.accept()?;
            writeln!(stream, "router {}", stream.local_addr()?)?;
        }
        Ok(())
    });
    let text = translate(MARK_FOR_DELIVERY_IPTABLES);
    assert!(text.contains("action = \"deliver\""), "{text}");
    let config = ConfigFile::new(&text).unwrap();
    let router = Topo::router_as_seen_by_server(false);

    restore_iptables(&topo.router, MARK_FOR_DELIVERY_IPTABLES).unwrap();
    let mut relay =
        Tproxy::start(&topo.router, &["--relay-only", "--config", config.path()]).unwrap();
    let original = (
        answer_to_port_81(&topo),
        peer_seen_by(&topo.client, relayed.addr).unwrap() == router,
    );
    relay.stop().unwrap();
    remove_iptables_tproxy(&topo.router).unwrap();
    assert_eq!(
        original,
        ("router 10.10.2.2:81".to_string(), true),
        "iptables: the router's listener answers port 81, port 80 is relayed"
    );

    let mut tproxy = Tproxy::start(&topo.router, &["--config", config.path()]).unwrap();
    let translated = (
        answer_to_port_81(&topo),
        peer_seen_by(&topo.client, relayed.addr).unwrap() == router,
    );
    let counters = tproxy.ebpf_counters().unwrap();
    tproxy.stop().unwrap();
    answering.join().unwrap().unwrap();
    assert_eq!(translated, original, "translated config:\n{text}");
    assert!(
        counters
            .get("tcp/delivered")
            .is_some_and(|count| *count >= 1),
        "the delivery is counted: {counters:?}"
    );
}

/// nft's `reject` at prerouting (clash-tproxy's guard of its TPROXY port, fluxproxy's QUIC
/// block): a TCP reset and an ICMP port unreachable for both families, as tproxy's `reject`
/// answers; TCP refused by a port unreachable is answered with a reset (refused either way).
/// A host's RETURN ahead of the rejects lets its flows through, and the TPROXY rule steers
/// the rest of IPv4.
const REJECT_NFT: &str = "\
table inet proxy {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		ip daddr 10.10.2.3 return
		tcp dport 81 reject with tcp reset
		udp dport 5353 reject with icmpx port-unreachable
		ip6 daddr fd00:2::2 tcp dport 82 reject
		udp dport 5354 reject with icmp port-unreachable
		iifname \"to-client\" meta l4proto { tcp, udp } tproxy ip to 127.0.0.1:15001 meta mark set 0x1 accept
	}
}
";

#[test]
fn nft_rejects_refuse_the_same_flows_translated() {
    require_root();
    let probes = [
        PortProbe::Tcp(0, "10.10.2.2:81"),
        PortProbe::Tcp(0, "[fd00:2::2]:81"),
        PortProbe::Tcp(0, "10.10.2.3:81"),
        PortProbe::Udp(0, "10.10.2.2:5353"),
        PortProbe::Udp(0, "[fd00:2::2]:5353"),
        PortProbe::Tcp(0, "[fd00:2::2]:82"),
        PortProbe::Tcp(0, "10.10.2.2:82"),
        // `icmp`: IPv4 only; IPv6 goes on (the TPROXY rule is for IPv4: the recipe's
        // routing here is).
        PortProbe::Udp(0, "10.10.2.2:5354"),
        PortProbe::Udp(0, "[fd00:2::2]:5354"),
    ];
    let (original, translated, config, counters) =
        fates_loaded_both_ways(&probes, |netns| listed_nft(netns, REJECT_NFT), remove_nft);
    assert_eq!(
        fates_of(&original),
        [
            Fate::Refused,
            Fate::Refused,
            Fate::Direct,
            Fate::Refused,
            Fate::Refused,
            Fate::Refused,
            Fate::Intercepted,
            Fate::Refused,
            Fate::Direct,
        ],
        "nft: {original:?}"
    );
    assert!(config.contains("action = \"reject\""), "{config}");
    assert_eq!(translated, original, "translated config:\n{config}");
    assert!(
        counters
            .get("tcp/rejected")
            .is_some_and(|count| *count >= 3)
            && counters
                .get("udp/rejected")
                .is_some_and(|count| *count >= 3),
        "the rejects are counted: {counters:?}"
    );
}
