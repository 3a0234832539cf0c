//! The configuration from flags, files and both: what is taken, what is refused and how
//! the refusal names the bad value.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Parser;

use super::{
    file::{LineStarts, Location},
    *,
};
use crate::values::FailMode;

/// The flags of `tproxy run`, parsed as its subcommand parses them.
#[derive(Parser)]
struct Run {
    #[command(flatten)]
    args: RunArgs,
}

fn args(extra: &[&str]) -> RunArgs {
    let mut argv = vec!["run"];
    argv.extend_from_slice(extra);
    Run::try_parse_from(argv).unwrap().args
}

fn with_file(text: &str, extra: &[&str]) -> Result<Config> {
    let dir = std::env::temp_dir().join(format!("tproxy-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Tests run in parallel: each call gets a file of its own (two texts of one length
    // once raced for the same name).
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{call}.toml"));
    std::fs::write(&path, text).unwrap();
    let path_text = path.to_str().unwrap().to_string();
    let mut argv = vec!["--config", path_text.as_str()];
    argv.extend_from_slice(extra);
    let result = Config::build(&args(&argv));
    let _ = std::fs::remove_file(&path);
    result.map_err(|e| anyhow::anyhow!("{}", format!("{e:#}").replace(&path_text, "FILE")))
}

fn error(text: &str) -> String {
    with_file(text, &[]).unwrap_err().to_string()
}

const EXAMPLE: &str = r#"
interfaces = ["eth0", "eth1"]
connect_timeout = "5s"

[[listener]]
name = "web"
listen = ["127.0.0.1:15001", "[::1]:15001"]

[[listener]]
name = "dns"
upstream = "10.0.0.53:53"

[[rule]]
proto = "tcp"
dst = ["10.0.0.0/8", "2001:db8::/32"]
ports = [80, 443, "8000-8100"]
action = "steer"
listener = "web"

[[rule]]
proto = ["tcp", "udp"]
dst = "10.1.0.0/16"
action = "bypass"

[[rule]]
proto = "udp"
ports = 53
src = "192.0.2.0/24"
iface = "eth1"
action = "steer"
listener = "dns"
"#;

#[test]
fn a_full_file_parses_into_split_rules_and_listeners() {
    let config = with_file(EXAMPLE, &[]).unwrap();
    assert_eq!(
        config.settings.interfaces,
        Interfaces::Named(vec!["eth0".into(), "eth1".into()])
    );
    assert_eq!(config.settings.connect_timeout, Duration::from_secs(5));
    assert_eq!(
        config.settings.table, 7470,
        "defaults fill what the file leaves out"
    );
    assert_eq!(config.configured_rules, 3);
    // 2 prefixes × 3 port specs + 2 protocols + 1 (IPv4 only: the source is IPv4).
    assert_eq!(config.rules.len(), 6 + 2 + 1);
    assert_eq!(config.listeners[0].listen.len(), 2);
    assert!(config.listeners[0].tcp && !config.listeners[0].udp);
    assert!(!config.listeners[1].tcp && config.listeners[1].udp);
    assert_eq!(
        config.listeners[1].upstream,
        Some("10.0.0.53:53".parse().unwrap())
    );
    let udp = config.rules.last().unwrap();
    assert_eq!(udp.dst.to_string(), "0.0.0.0/0");
    assert_eq!(udp.ports, Ports::One(53));
    assert_eq!(udp.iface.as_deref(), Some("eth1"));
    let table = config.describe();
    assert!(
        table.contains("steer web") && table.contains("bypass") && table.contains("steer dns"),
        "{table}"
    );
}

#[test]
fn a_rules_mark_is_read_without_the_routing_marks_bits_or_refused() {
    let rule = |mark: &str| {
        format!(
            "interfaces = [\"eth0\"]\n[[listener]]\nname = \"web\"\n\
             [[rule]]\nproto = \"tcp\"\nmark = {mark}\naction = \"bypass\"\n\
             [[rule]]\nproto = \"tcp\"\naction = \"steer\"\n"
        )
    };
    let config = with_file(&rule("\"0x10/0xf0\""), &[]).unwrap();
    assert_eq!(config.rules[0].mark.unwrap().to_string(), "0x10/0xf0");
    let whole = with_file(&rule("255"), &["--mark", "0x100/0x100"]).unwrap();
    assert_eq!(
        whole.rules[0].mark.unwrap().to_string(),
        "0xff/0xfffffeff",
        "a bare mark is matched whole, but for the routing mark's bits"
    );
    assert!(
        whole.describe().contains("mark 0xff/0xfffffeff"),
        "{}",
        whole.describe()
    );
    let taken = with_file(&rule("\"0x100/0x100\""), &["--mark", "0x100/0x100"]).unwrap_err();
    assert!(
        format!("{taken:#}")
            .contains("rule 1: mark 0x100/0x100 needs bits of tproxy's routing mark"),
        "{taken:#}"
    );
    let outside = error(&rule("\"0x3/0x1\""));
    assert!(
        outside.contains("rule[1].mark") && outside.contains("outside its mask"),
        "{outside}"
    );
}

#[test]
fn reject_is_an_action_for_arrivals_of_tcp_and_udp() {
    let config = with_file(
        "interfaces = [\"eth0\"]\n\
         [[rule]]\nproto = [\"tcp\", \"udp\"]\ndst = \"192.0.2.0/24\"\nports = 7893\naction = \"reject\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(config.rules.len(), 2);
    assert!(config
        .rules
        .iter()
        .all(|rule| rule.action == Action::Reject));
    assert!(
        config.describe().contains(" reject"),
        "{}",
        config.describe()
    );
    for (rule, expected) in [
        (
            "proto = \"udp\"\naction = \"reject\"\nlistener = \"web\"\n",
            "rule[1].listener: a reject rule steers nowhere",
        ),
        (
            "proto = \"tcp\"\ndst = \"local\"\naction = \"reject\"\n",
            "rule[1].dst: \"local\" (the host's own addresses) is for bypass and steer rules",
        ),
        (
            "proto = \"other\"\naction = \"reject\"\n",
            "action \"reject\": only drop and bypass rules",
        ),
        (
            "proto = \"tcp\"\norigin = \"local\"\naction = \"reject\"\n",
            "origin \"local\" with action \"reject\"",
        ),
    ] {
        let refused = error(&format!(
            "interfaces = [\"eth0\"]\n[[listener]]\nname = \"web\"\n[[rule]]\n{rule}"
        ));
        assert!(refused.contains(expected), "{rule}: {refused}");
    }
}

#[test]
fn source_ports_split_a_rule_and_drop_is_an_action() {
    let config = with_file(
        "interfaces = [\"eth0\"]\n[[listener]]\nname = \"web\"\n\
         [[rule]]\nproto = \"udp\"\nports = [53, 443]\nsport = [7777, \"1000-2000\"]\n\
         action = \"bypass\"\n\
         [[rule]]\nproto = \"udp\"\nports = 443\naction = \"drop\"\n\
         [[rule]]\nproto = \"udp\"\naction = \"steer\"\n",
        &[],
    )
    .unwrap();
    // 2 families × 2 ports × 2 source port specs, then the drop and the steer rule by family.
    assert_eq!(config.rules.len(), 8 + 2 + 2);
    assert_eq!(config.rules[0].sport, Some(Ports::One(7777)));
    assert_eq!(config.rules[1].sport, Some(Ports::Range(1000, 2000)));
    assert_eq!(config.rules[8].action, Action::Drop);
    let table = config.describe();
    assert!(
        table.contains("sport 1000-2000") && table.contains(" drop"),
        "{table}"
    );
    let with_listener = error(
        "interfaces = [\"eth0\"]\n[[listener]]\nname = \"web\"\n\
         [[rule]]\nproto = \"udp\"\naction = \"drop\"\nlistener = \"web\"\n",
    );
    assert!(
        with_listener.contains("rule[1].listener: a drop rule steers nowhere"),
        "{with_listener}"
    );
    let empty = error(
        "interfaces = [\"eth0\"]\n[[rule]]\nproto = \"udp\"\nsport = []\naction = \"bypass\"\n",
    );
    assert!(empty.contains("rule[1].sport: an empty list"), "{empty}");
    // Each source port spec is one entry of the 32 tried one by one.
    let many: Vec<String> = (1..=33).map(|port| port.to_string()).collect();
    let full = error(&format!(
        "interfaces = [\"eth0\"]\n[[rule]]\nproto = \"udp\"\ndst = \"0.0.0.0/0\"\n\
         sport = [{}]\naction = \"bypass\"\n",
        many.join(", ")
    ));
    assert!(
        full.contains("need 33 entries")
            && full.contains("32 the program holds")
            && full.ends_with("most of them: rule[1]: 33"),
        "{full}"
    );
}

#[test]
fn flags_override_the_file_and_add_the_default_listener() {
    let config = with_file(
        EXAMPLE,
        &[
            "--iface",
            "eth1",
            "--iface",
            "eth9",
            "--table",
            "100",
            "--tcp",
            "22",
            "--rule-priority",
            "99",
        ],
    )
    .unwrap();
    assert_eq!(
        config.settings.interfaces,
        Interfaces::Named(vec!["eth1".into(), "eth9".into()])
    );
    assert_eq!(config.settings.table, 100);
    assert_eq!(config.settings.rule_priority, 99);
    assert_eq!(
        config.settings.connect_timeout,
        Duration::from_secs(5),
        "the file's, not the default"
    );
    assert_eq!(config.listeners.last().unwrap().name, DEFAULT_LISTENER);
    let last = config.rules.last().unwrap();
    assert_eq!(
        (last.number, last.ports),
        (4, Ports::One(22)),
        "after the file's rules"
    );
}

#[test]
fn limits_come_from_flags_or_the_file() {
    let config = with_file(
        "interfaces = [\"eth0\"]\nmax_connections = 100\nhalf_close_timeout = \"5s\"\n[[rule]]\nproto = \"tcp\"\naction = \"bypass\"\n",
        &["--max-connections-per-source", "7"],
    )
    .unwrap();
    assert_eq!(config.settings.max_connections, 100);
    assert_eq!(config.settings.max_connections_per_source, 7);
    assert_eq!(config.settings.half_close_timeout, Duration::from_secs(5));
    let config = Config::build(&args(&[
        "--iface",
        "eth0",
        "--tcp",
        "80",
        "--max-connections",
        "1000",
    ]))
    .unwrap();
    assert_eq!(
        config.settings.max_connections_per_source, 250,
        "a quarter of the overall limit"
    );
    assert_eq!(config.settings.udp_max_sessions_per_source, 8192 / 4);
    let config = with_file(
        "interfaces = [\"eth0\"]\nudp_max_sessions = 100\nudp_max_sessions_per_source = 7\n[[rule]]\nproto = \"udp\"\naction = \"bypass\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(config.settings.udp_max_sessions_per_source, 7);
    let config = with_file(
        "interfaces = [\"eth0\"]\nudp_max_sessions_per_source = 7\n[[rule]]\nproto = \"udp\"\naction = \"bypass\"\n",
        &["--udp-max-sessions-per-source", "9"],
    )
    .unwrap();
    assert_eq!(config.settings.udp_max_sessions_per_source, 9);
}

#[test]
fn pinning_fail_mode_and_drain_come_from_the_file_or_flags() {
    let file = "interfaces = [\"eth0\"]\npin = true\npin_dir = \"/bpf/x\"\nfail_mode = \"closed\"\ndrain_timeout = \"20s\"\n[[rule]]\nproto = \"tcp\"\naction = \"bypass\"\n";
    let config = with_file(file, &[]).unwrap();
    let s = &config.settings;
    assert!(s.pin);
    assert_eq!(s.pin_dir, PathBuf::from("/bpf/x"));
    assert_eq!(s.fail_mode, FailMode::Closed);
    assert_eq!(s.drain_timeout, Duration::from_secs(20));
    let config = with_file(file, &["--fail-mode", "open", "--drain-timeout", "1s"]).unwrap();
    assert_eq!(config.settings.fail_mode, FailMode::Open);
    assert_eq!(config.settings.drain_timeout, Duration::from_secs(1));
    let defaults = Config::build(&args(&["--iface", "eth0", "--tcp", "80"])).unwrap();
    assert!(!defaults.settings.pin);
    assert_eq!(defaults.settings.fail_mode, FailMode::Open);
    assert_eq!(defaults.settings.drain_timeout, Duration::from_secs(30));
    let no_drain = with_file(&file.replace("20s", "0s"), &[]).unwrap();
    assert_eq!(no_drain.settings.drain_timeout, Duration::ZERO);
    let no_drain = with_file(file, &["--drain-timeout", "0s"]).unwrap();
    assert_eq!(no_drain.settings.drain_timeout, Duration::ZERO);
}

#[test]
fn flags_alone_still_work() {
    let config = Config::build(&args(&[
        "--iface",
        "eth0",
        "--tcp",
        "80,8000-8100",
        "--udp",
        "53",
        "--dst",
        "10.0.0.0/8",
    ]))
    .unwrap();
    assert_eq!(config.listeners.len(), 1);
    assert_eq!(config.rules.len(), 3);
    assert_eq!(config.listeners[0].listen, default_listen());
}

#[test]
fn errors_name_file_line_column_and_field() {
    let cases = [
        ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"tcp\"\nports = \"99999\"\naction = \"bypass\"\n", "FILE:4:9: rule[1].ports: port 99999 is above 65535"),
        ("interfaces = [\"eth0\"]\nmark = \"0\"\n", "FILE:2:8: mark: mark `0` sets no bits"),
        ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"sctp\"\naction = \"steer\"\n", "FILE:3:9: rule[1].proto: `sctp` is not a protocol"),
        ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"tcp\"\ndst = \"10.0.0.0/33\"\naction = \"bypass\"\n", "FILE:4:7: rule[1].dst: `10.0.0.0/33` is not an IPv4/IPv6 prefix"),
        ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"tcp\"\naction = \"steer\"\nlistener = \"web\"\n", "FILE:5:12: rule[1].listener: no listener named `web` (defined: none)"),
        ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"tcp\"\naction = \"redirect\"\n", "FILE:4:10: rule[1].action: `redirect` is not an action: use \"steer\", \"bypass\", \"drop\", \"reject\" or \"deliver\""),
        ("interfaces = [\"eth0\"]\n[[listener]]\nname = \"web\"\n[[rule]]\nproto = \"tcp\"\naction = \"deliver\"\nlistener = \"web\"\n", "FILE:7:12: rule[1].listener: a deliver rule steers nowhere (the kernel finds the packet's socket); remove `listener = \"web\"`"),
        ("interfaces = [\"eth0\"]\ncolour = \"blue\"\n", "FILE:2:1: colour: unknown field `colour`"),
        ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"tcp\"\n", "FILE:2:1: missing field `action`"),
        ("interfaces = \"eth0\"\n", "FILE:1:14: interfaces: `eth0`: give a list like [\"eth0\"], or \"all\""),
        ("interfaces = [\"eth0\"]\nconnect_timeout = \"0s\"\n", "FILE:2:19: connect_timeout: duration `0s` must be greater than zero"),
        ("interfaces = [\"eth0\"]\nfail_mode = \"ajar\"\n", "FILE:2:13: fail_mode: `ajar` is not a fail mode: use \"open\" or \"closed\""),
        ("interfaces = [\"eth0\"]\npin = \"yes\"\n", "FILE:2:7: pin: invalid type: string \"yes\", expected a boolean"),
        ("interfaces = [\"eth0\"]\n[[listener]]\nname = \"a\"\n[[listener]]\nname = \"a\"\n", "FILE:5:8: listener.name: a listener named `a` is already defined"),
        ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"tcp\"\nsrc = \"2001:db8::/32\"\ndst = \"10.0.0.0/8\"\naction = \"bypass\"\n", "rule[1]: its src and dst prefixes are of different address families"),
        ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"tcp\"\niface = \"eth7\"\naction = \"bypass\"\n", "rule 1 names interface eth7, which is not among the steered interfaces (eth0)"),
        ("interfaces = [\"eth0\"]\n[[listener]]\nname = \"a\"\n[[listener]]\nname = \"b\"\n[[rule]]\nproto = \"tcp\"\naction = \"steer\"\n", "FILE:6:1: rule[1]: a steer rule needs `listener = \"NAME\"`"),
        ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"tcp\"\naction = \"bypass\"\nlistener = \"x\"\n", "rule[1].listener: a bypass rule steers nowhere"),
        ("interfaces = [\"eth0\"]\n", "FILE: no [[rule]] and no --tcp/--udp: nothing to steer"),
        ("[[rule]]\nproto = \"tcp\"\naction = \"bypass\"\n", "no interface to steer: set `interfaces` in FILE or give --iface"),
        ("interfaces = [\"eth0\"]\nsocket_mark = \"0x1000000\"\n[[rule]]\nproto = \"tcp\"\naction = \"bypass\"\n", "socket_mark 0x1000000 (from FILE) matches the routing rule's fwmark"),
        ("interfaces = [\"eth0\"\n", "FILE:1:"),
    ];
    for (text, expected) in cases {
        let message = error(text);
        assert!(
            message.contains(expected),
            "for\n{text}\nexpected `{expected}` in `{message}`"
        );
    }
}

#[test]
fn locations_agree_with_counting_newlines_at_every_offset() {
    let by_counting = |text: &str, offset: usize| {
        let before = &text[..offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        (
            line,
            before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1,
        )
    };
    let file = Path::new("FILE");
    for text in [
        "",
        "\n",
        "a",
        "\n\nab\n",
        "[[rule]]\nproto = \"tcp\"\n\n\nx = 1",
    ] {
        let lines = LineStarts::new(text);
        for offset in 0..=text.len() + 2 {
            let at = Location::new(file, &lines, offset..offset);
            assert_eq!(
                (at.line, at.column),
                by_counting(text, offset),
                "{text:?} at {offset}"
            );
        }
    }
}

#[test]
fn the_last_of_many_rules_is_located_exactly() {
    let mut text = String::from("interfaces = [\"eth0\"]\n");
    for i in 0..20_000 {
        let (high, low) = (i / 250, i % 250);
        text += &format!(
            "[[rule]]\nproto = \"tcp\"\ndst = \"10.{high}.{low}.0/24\"\naction = \"bypass\"\n"
        );
    }
    text += "[[rule]]\nproto = \"tcp\"\naction = \"bypass\"\nlistener = \"x\"\n";
    let listener_line = 1 + 20_000 * 4 + 4;
    let message = error(&text);
    let expected = format!("FILE:{listener_line}:12: rule[20001].listener: a bypass rule");
    assert!(message.contains(&expected), "{message}");
}

/// The README's worked example decides what the README says it decides.
#[test]
fn the_readme_example_decides_as_documented() {
    use crate::datapath::rules::{decide, Packet, Protocol};
    use tproxy_common::decision::RuleMatch;
    let config = with_file(include_str!("../../../examples/router.toml"), &[]).unwrap();
    let (web, dns) = (RuleMatch::Steer(0), RuleMatch::Steer(1));
    let cases = [
        (
            Protocol::Tcp,
            "192.168.1.5",
            "203.0.113.7",
            443,
            "lan0",
            web,
        ),
        (
            Protocol::Tcp,
            "192.168.1.5",
            "192.168.1.20",
            443,
            "lan0",
            RuleMatch::Bypass,
        ),
        (
            Protocol::Tcp,
            "192.168.1.5",
            "192.168.1.80",
            80,
            "lan0",
            web,
        ),
        (
            Protocol::Tcp,
            "192.168.1.5",
            "192.168.1.80",
            22,
            "lan0",
            RuleMatch::Bypass,
        ),
        (Protocol::Udp, "10.99.0.7", "8.8.8.8", 53, "guest0", dns),
        (
            Protocol::Udp,
            "192.168.1.5",
            "8.8.8.8",
            53,
            "lan0",
            RuleMatch::None,
        ),
        (Protocol::Tcp, "fd00::5", "2001:db8::1", 8050, "lan0", web),
    ];
    for (protocol, src, dst, port, iface, expected) in cases {
        let packet = Packet {
            protocol,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            port,
            sport: 40000,
            local: false,
            selections: 0,
            iface,
            mark: 0,
            route: None,
            ct_direction: None,
        };
        assert_eq!(decide(&config.rules, &packet), expected, "{packet:?}");
    }
}

#[test]
fn a_missing_file_is_named() {
    let error = Config::build(&args(&["--config", "/nonexistent/tproxy.toml"])).unwrap_err();
    assert!(
        format!("{error:#}").contains("reading /nonexistent/tproxy.toml"),
        "{error:#}"
    );
}

/// What `run` would refuse when binding (or starting) is refused by the configuration
/// already, which `check` builds too.
#[test]
fn listener_addresses_that_run_could_not_bind_or_that_loop_are_refused() {
    let flags = |extra: &[&str]| {
        let mut argv = vec!["--iface", "eth0", "--tcp", "80"];
        argv.extend_from_slice(extra);
        Config::build(&args(&argv)).map_err(|e| format!("{e:#}"))
    };
    let refused = flags(&["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:7000"]);
    assert!(refused
        .unwrap_err()
        .contains("--upstream 127.0.0.1:7000 is one of tproxy's own listeners: that would loop"));
    let refused = flags(&["--listen", "0.0.0.0:7000", "--upstream", "10.1.2.3:7000"]);
    assert!(refused.unwrap_err().contains("--upstream 10.1.2.3:7000"));
    let refused = flags(&["--listen", "127.0.0.1:0", "--listen", "127.0.0.2:0"]);
    assert!(refused
        .unwrap_err()
        .contains("--listen 127.0.0.2:0: at most one address per address family"));
    assert!(flags(&["--iface", "eth0"])
        .unwrap_err()
        .contains("eth0 is given twice"));
    let relay_only_pinned = Config::build(&args(&["--relay-only", "--tcp", "80", "--pin"]));
    assert!(format!("{:#}", relay_only_pinned.unwrap_err()).contains("--pin: with --relay-only"));
    assert!(flags(&["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:7001"]).is_ok());

    let two = |first: &str, second: &str, proto: &str| {
        format!(
            "interfaces = [\"eth0\"]\n\
             [[listener]]\nname = \"a\"\nlisten = \"{first}\"\n\
             [[listener]]\nname = \"b\"\nlisten = \"{second}\"\n\
             [[rule]]\nproto = \"tcp\"\naction = \"steer\"\nlistener = \"a\"\n\
             [[rule]]\nproto = \"{proto}\"\nports = 53\naction = \"steer\"\nlistener = \"b\"\n"
        )
    };
    for (first, second) in [
        ("127.0.0.1:7000", "127.0.0.1:7000"),
        ("0.0.0.0:7000", "127.0.0.1:7000"),
        ("127.0.0.1:7000", "0.0.0.0:7000"),
    ] {
        assert!(
            error(&two(first, second, "tcp")).contains(&format!(
                "listener `b`: listen {second}: listener `a` listens on {first} already"
            )),
            "{first} {second}"
        );
    }
    // Another port, another family, another transport, or ports still to be picked.
    for (first, second, proto) in [
        ("127.0.0.1:7000", "127.0.0.1:7001", "tcp"),
        ("0.0.0.0:7000", "[::1]:7000", "tcp"),
        ("127.0.0.1:7000", "127.0.0.1:7000", "udp"),
        ("127.0.0.1:0", "127.0.0.1:0", "tcp"),
    ] {
        with_file(&two(first, second, proto), &[]).unwrap();
    }
}

#[test]
fn check_prints_durations_as_they_are_written() {
    let mut config = Config::build(&args(&[
        "--iface",
        "eth0",
        "--tcp",
        "80",
        "--drain-timeout",
        "5m",
    ]))
    .unwrap();
    assert!(config.describe().contains("drain timeout 5m"));
    config.settings.drain_timeout = Duration::ZERO;
    assert!(
        config.describe().contains("drain timeout 0s"),
        "{}",
        config.describe()
    );
}

#[test]
fn listen_and_upstream_flags_need_tcp_or_udp() {
    let error = with_file(EXAMPLE, &["--upstream", "127.0.0.1:1"]).unwrap_err();
    assert!(error.to_string().contains("give --tcp or --udp"), "{error}");
}

#[test]
fn local_refuses_what_it_cannot_serve() {
    let error = |extra: &[&str]| format!("{:#}", Config::build(&args(extra)).unwrap_err());
    let external = ["--local", "--tcp", "80", "--on-port", "3129"];
    assert!(
        error(&external)
            .contains("--local for every process (no --cgroup, or cgroup \"/\") with listener `default` an external proxy"),
        "{}",
        error(&external)
    );
    let with_cgroup = [
        "--local",
        "--cgroup",
        "/app.slice",
        "--tcp",
        "80",
        "--on-port",
        "3129",
    ];
    assert!(Config::build(&args(&with_cgroup)).is_ok());
    // The proxy is kept out by its user, or by the mark on its sockets.
    let with_uid = [
        "--local",
        "--uid",
        "1000",
        "--tcp",
        "80",
        "--on-port",
        "3129",
    ];
    assert!(Config::build(&args(&with_uid)).is_ok());
    let marked = [
        "--local",
        "--tcp",
        "80",
        "--on-port",
        "3129",
        "--socket-mark",
        "0xff",
    ];
    assert!(Config::build(&args(&marked)).is_ok());
    // Given, the default is the operator's word too.
    let default_given = [
        "--local",
        "--tcp",
        "80",
        "--on-port",
        "3129",
        "--socket-mark",
        "0x2000000",
    ];
    assert!(Config::build(&args(&default_given)).is_ok());
    let spoofing = ["--local", "--tcp", "80", "--transparent-upstream"];
    assert!(
        error(&spoofing).contains("--local with --transparent-upstream"),
        "{}",
        error(&spoofing)
    );
    let lo = ["--local", "--iface", "lo", "--tcp", "80"];
    assert!(
        error(&lo).contains("--local with lo among the interfaces"),
        "{}",
        error(&lo)
    );
    // A pattern never selects lo: --local adds it beside the pattern.
    let config = Config::build(&args(&["--local", "--iface", "l*", "--tcp", "80"])).unwrap();
    assert_eq!(
        config.settings.interfaces,
        Interfaces::Named(vec!["l*".into(), "lo".into()])
    );
}

#[test]
fn iface_all_alone_is_every_interface_and_beside_others_an_error() {
    let config = Config::build(&args(&["--iface", "all", "--tcp", "80"])).unwrap();
    assert_eq!(
        config.settings.interfaces,
        Interfaces::All { loopback: false }
    );
    assert_eq!(config.settings.interfaces.entries(), vec!["*".to_string()]);
    assert!(
        config.describe().contains("all but lo"),
        "{}",
        config.describe()
    );
    let from_file = with_file("interfaces = \"all\"\n", &["--tcp", "80"]).unwrap();
    assert_eq!(
        from_file.settings.interfaces,
        Interfaces::All { loopback: false }
    );
    // `["all"]` too: `check` used to call it a name that `run` then failed to find.
    let listed = with_file("interfaces = [\"all\"]\n", &["--tcp", "80"]).unwrap();
    assert_eq!(
        listed.settings.interfaces,
        Interfaces::All { loopback: false }
    );
    for given in [
        &["--iface", "all", "--iface", "eth0"][..],
        &["--iface", "eth0", "--iface", "all"][..],
    ] {
        let mut flags = given.to_vec();
        flags.extend(["--tcp", "80"]);
        let error = format!("{:#}", Config::build(&args(&flags)).unwrap_err());
        assert!(
            error.contains("`all` alone means every interface but lo"),
            "{error}"
        );
    }
}

#[test]
fn iface_all_with_lo_is_every_interface_but_not_with_local_rules() {
    let every = Interfaces::All { loopback: true };
    for flags in [
        ["--iface", "all", "--iface", "lo"],
        ["--iface", "lo", "--iface", "all"],
    ] {
        let mut flags = flags.to_vec();
        flags.extend(["--tcp", "80"]);
        let config = Config::build(&args(&flags)).unwrap();
        assert_eq!(config.settings.interfaces, every);
        assert_eq!(config.settings.interfaces.entries(), ["*", "lo"]);
        assert!(
            config
                .describe()
                .contains("interfaces: all, as they come and go, and lo"),
            "{}",
            config.describe()
        );
    }
    for listed in ["[\"all\", \"lo\"]", "[\"lo\", \"all\"]"] {
        let config = with_file(&format!("interfaces = {listed}\n"), &["--tcp", "80"]).unwrap();
        assert_eq!(config.settings.interfaces, every, "{listed}");
    }
    // Anything else beside `all` is among what it selects already.
    let error = format!(
        "{:#}",
        with_file(
            "interfaces = [\"all\", \"lo\", \"eth0\"]\n",
            &["--tcp", "80"]
        )
        .unwrap_err()
    );
    assert!(error.contains("with lo only"), "{error}");
    // The loopback program would take lo's arrivals from the rules that steer there.
    let local = ["--local", "--iface", "all", "--iface", "lo", "--tcp", "80"];
    let error = format!("{:#}", Config::build(&args(&local)).unwrap_err());
    assert!(
        error.contains("--local with lo among the interfaces"),
        "{error}"
    );
    let text = "interfaces = [\"all\", \"lo\"]\n\
                [[listener]]\nname = \"web\"\nlisten = [\"127.0.0.1:15001\"]\n\
                [[rule]]\nproto = \"tcp\"\norigin = \"local\"\naction = \"steer\"\n\
                listener = \"web\"\n";
    let error = format!("{:#}", with_file(text, &[]).unwrap_err());
    assert!(
        error.contains("rules for local connections (origin local or any) with lo among"),
        "{error}"
    );
}

#[test]
fn a_local_destination_bypass_follows_the_addresses_it_is_given() {
    let text = r#"
interfaces = ["eth0"]

[[rule]]
proto = "tcp"
dst = "local-ipv4"
action = "bypass"

[[rule]]
proto = ["tcp", "udp"]
dst = "local"
ports = 53
action = "bypass"

[[listener]]
name = "web"

[[rule]]
proto = "tcp"
action = "steer"
"#;
    let mut config = with_file(text, &[]).unwrap();
    let shown = |config: &Config| -> Vec<String> {
        let mut rules: Vec<String> = config
            .rules
            .iter()
            .filter(|r| r.action == Action::Bypass)
            .map(|r| format!("{} #{}", r, r.number))
            .collect();
        rules.sort();
        rules
    };
    assert_eq!(config.own_address_rules.len(), 5);
    let addresses: Vec<IpAddr> = vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()];
    assert!(config.set_own_addresses(addresses.clone()));
    assert_eq!(
        shown(&config),
        [
            "tcp dst 192.0.2.1/32 port 53 #2",
            "tcp dst 192.0.2.1/32 port any #1",
            "tcp dst 2001:db8::1/128 port 53 #2",
            "udp dst 192.0.2.1/32 port 53 #2",
            "udp dst 2001:db8::1/128 port 53 #2",
        ]
    );
    assert!(!config.set_own_addresses(addresses), "nothing changed");
    assert!(config.set_own_addresses(vec!["198.51.100.7".parse().unwrap()]));
    assert_eq!(
        shown(&config),
        [
            "tcp dst 198.51.100.7/32 port 53 #2",
            "tcp dst 198.51.100.7/32 port any #1",
            "udp dst 198.51.100.7/32 port 53 #2",
        ]
    );
    // The steer rule is untouched.
    assert_eq!(
        config
            .rules
            .iter()
            .filter(|r| r.action != Action::Bypass)
            .count(),
        2
    );

    let drop_local = "[[rule]]\nproto = \"tcp\"\ndst = \"local\"\naction = \"drop\"\n";
    assert!(
        error(drop_local).contains(
            "rule[1].dst: \"local\" (the host's own addresses) is for bypass and steer rules"
        ),
        "{}",
        error(drop_local)
    );
    assert!(
        error("[[rule]]\nproto = \"tcp\"\ndst = \"locals\"\naction = \"bypass\"\n")
            .contains("locals")
    );
}

#[test]
fn an_anycast_bypass_follows_the_destinations_it_is_given() {
    let text = r#"
interfaces = ["eth0"]

[[rule]]
proto = "udp"
dst = "anycast"
action = "bypass"

[[listener]]
name = "web"

[[rule]]
proto = "udp"
action = "steer"
"#;
    let mut config = with_file(text, &[]).unwrap();
    // One for each family, as for `dst = "local"`.
    assert_eq!(config.anycast_rules.len(), 2);
    let bypasses = |config: &Config| -> Vec<String> {
        let mut rules: Vec<String> = config
            .rules
            .iter()
            .filter(|r| r.action == Action::Bypass)
            .map(|r| format!("{} #{}", r, r.number))
            .collect();
        rules.sort();
        rules
    };
    let routes: Vec<IpNet> = vec![
        "192.0.2.0/24".parse().unwrap(),
        "198.51.100.7/32".parse().unwrap(),
        "fd00:1::/128".parse().unwrap(),
    ];
    assert!(config.set_anycast_destinations(routes.clone()));
    assert_eq!(
        bypasses(&config),
        [
            "udp dst 192.0.2.0/24 port any #1",
            "udp dst 198.51.100.7/32 port any #1",
            "udp dst fd00:1::/128 port any #1"
        ]
    );
    let mut ipv4_only = with_file(&text.replace("\"anycast\"", "\"anycast-ipv4\""), &[]).unwrap();
    assert!(ipv4_only.set_anycast_destinations(routes.clone()));
    assert_eq!(
        bypasses(&ipv4_only),
        [
            "udp dst 192.0.2.0/24 port any #1",
            "udp dst 198.51.100.7/32 port any #1"
        ]
    );
    assert!(!config.set_anycast_destinations(routes), "nothing changed");
    assert!(config.set_anycast_destinations(Vec::new()));
    assert!(bypasses(&config).is_empty());

    let steer = "[[listener]]\nname = \"web\"\n\n[[rule]]\nproto = \"tcp\"\ndst = \"anycast\"\naction = \"steer\"\n";
    assert!(
        error(steer).contains("is for bypass rules"),
        "{}",
        error(steer)
    );
    let v6 = "[[rule]]\nproto = \"tcp\"\nsrc = \"2001:db8::/32\"\ndst = \"anycast-ipv4\"\naction = \"bypass\"\n";
    assert!(
        error(v6).contains("rule[1].dst: a family's own or anycast destinations with sources of the other family match nothing"),
        "{}",
        error(v6)
    );
}

#[test]
fn local_rules_in_the_file_carry_their_origin_and_their_own_selection() {
    let rule = |extra: &str| {
        format!("[[listener]]\nname = \"up\"\n[[rule]]\nproto = \"tcp\"\nports = 80\naction = \"steer\"\n{extra}")
    };
    let text = rule("origin = \"local\"\ncgroup = [\"/b\", \"/a\"]\nuid = [1000, \"2000-2999\"]\n")
        + "[[rule]]\nproto = \"udp\"\nports = 53\naction = \"bypass\"\norigin = \"any\"\n\
           cgroup = [\"/a\", \"/b\"]\nuid = [\"2000-2999\", 1000]\n";
    let config = with_file(&text, &[]).unwrap();
    let local = config.local.as_ref().expect("a selection");
    assert_eq!(local.used().count(), 1, "one selection, written two ways");
    assert_eq!(local.get(1).unwrap().cgroups, ["/a", "/b"]);
    assert_eq!(local.to_string(), "cgroup /a, /b, uid 1000, 2000-2999");
    assert!(config
        .rules
        .iter()
        .all(|r| r.origin.local() && r.selection == 1));
    assert!(config
        .describe()
        .contains("  selection 1: cgroup /a, /b, uid 1000, 2000-2999"));
    assert!(config.describe().contains("origin any selection 1"));

    // Rules with different selections, and one for every process (selection 0), side by
    // side: each rule has its own.
    let three = rule("origin = \"local\"\ncgroup = \"/a\"\n")
        + "[[rule]]\nproto = \"tcp\"\nports = 80\naction = \"steer\"\nlistener = \"up\"\n\
           origin = \"local\"\nuid = 1000\n\
           [[rule]]\nproto = \"tcp\"\ndst = \"10.0.0.0/8\"\naction = \"bypass\"\n\
           origin = \"local\"\n";
    let config = with_file(&three, &[]).unwrap();
    let mut selections: Vec<(usize, u32)> = config
        .rules
        .iter()
        .map(|r| (r.number, r.selection))
        .collect();
    selections.dedup();
    assert_eq!(selections, [(1, 1), (2, 2), (3, 0)]);
    let local = config.local.as_ref().unwrap();
    assert_eq!(local.used().count(), 3);
    assert_eq!(local.get(2).unwrap().to_string(), "cgroup /, uid 1000");
    // --local's selection is the flag rules' own.
    let config = with_file(
        &rule("origin = \"local\"\ncgroup = \"/a\"\n"),
        &["--local", "--uid", "1000", "--tcp", "81"],
    )
    .unwrap();
    let flag_rule = config
        .rules
        .iter()
        .find(|r| r.ports == Ports::One(81))
        .unwrap();
    let local = config.local.as_ref().unwrap();
    assert_eq!(
        local.get(flag_rule.selection).unwrap().to_string(),
        "cgroup /, uid 1000"
    );
    let error = format!("{:#}", with_file(&rule("uid = 1000\n"), &[]).unwrap_err());
    assert!(
        error.contains("rule[1].uid: only a rule for local connections selects processes"),
        "{error}"
    );
    // Adding the origin would not help a rule that only arrivals can have.
    let deliver = "[[rule]]\nproto = \"tcp\"\ncgroup = \"/a\"\naction = \"deliver\"\n";
    let error = format!("{:#}", with_file(deliver, &[]).unwrap_err());
    assert!(
        error.contains(
            "rule[1].cgroup: a deliver rule is for arrivals, which no process selection takes; \
             remove `cgroup`"
        ),
        "{error}"
    );
    let error = format!(
        "{:#}",
        with_file(&rule("origin = \"local\"\nsrc = \"10.0.0.0/8\"\n"), &[]).unwrap_err()
    );
    assert!(
        error.contains("rule[1]: origin \"local\" with `src`"),
        "{error}"
    );
    let error = format!(
        "{:#}",
        with_file(&rule("origin = \"outbound\"\n"), &[]).unwrap_err()
    );
    assert!(error.contains("`outbound` is not an origin"), "{error}");
    let error = format!(
        "{:#}",
        with_file(&rule("origin = \"local\"\nuid = \"5-1\"\n"), &[]).unwrap_err()
    );
    assert!(
        error.contains("uid `5-1`: the range's first uid is above its last"),
        "{error}"
    );
}

#[test]
fn a_rules_classid_selects_net_cls_classes_and_bad_ones_are_named() {
    let rule = |extra: &str| {
        "[[listener]]\nname = \"p\"\n[[rule]]\nproto = \"tcp\"\naction = \"steer\"\n\
         listener = \"p\"\n"
            .to_string()
            + extra
    };
    let config = with_file(
        &rule("origin = \"local\"\nclassid = [\"2-4294967295\", 0, \"0x10\"]\n"),
        &[],
    )
    .unwrap();
    let local = config.local.as_ref().expect("a selection");
    assert_eq!(
        local.get(1).unwrap().to_string(),
        "cgroup /, every user, net_cls class 0, 2-4294967295, 16"
    );
    for (extra, expected) in [
        (
            "classid = 1\n",
            "rule[1].classid: only a rule for local connections selects processes",
        ),
        (
            "origin = \"local\"\nclassid = []\n",
            "rule[1].classid: an empty list selects no process",
        ),
        (
            "origin = \"local\"\nclassid = \"9-2\"\n",
            "net_cls class id `9-2`: the range's first class id is above its last",
        ),
        (
            "origin = \"local\"\nclassid = \"1:1\"\n",
            "net_cls class id `1:1`: not a net_cls class id",
        ),
        (
            "origin = \"local\"\nclassid = [1, 2, 3, 4, 5, 6, 7, 8, 9]\n",
            "9 net_cls class id ranges selected; at most 8",
        ),
    ] {
        let error = format!("{:#}", with_file(&rule(extra), &[]).unwrap_err());
        assert!(error.contains(expected), "{extra}: {error}");
    }
}

#[test]
fn a_rules_gid_selects_groups_and_bad_ones_are_named() {
    let rule = |extra: &str| {
        "[[listener]]\nname = \"p\"\n[[rule]]\nproto = \"tcp\"\naction = \"steer\"\n\
         listener = \"p\"\n"
            .to_string()
            + extra
    };
    let config = with_file(
        &rule("origin = \"local\"\nuid = [1000]\ngid = [\"200-299\", 23333]\n"),
        &[],
    )
    .unwrap();
    let local = config.local.as_ref().expect("a selection");
    assert_eq!(
        local.get(1).unwrap().to_string(),
        "cgroup /, uid 1000, gid 200-299, 23333"
    );
    for (extra, expected) in [
        (
            "gid = 1\n",
            "rule[1].gid: only a rule for local connections selects processes",
        ),
        (
            "origin = \"local\"\ngid = []\n",
            "rule[1].gid: an empty list selects no group",
        ),
        (
            "origin = \"local\"\ngid = \"9-2\"\n",
            "gid `9-2`: the range's first gid is above its last",
        ),
        (
            "origin = \"local\"\ngid = \"proxy\"\n",
            "gid `proxy`: not a gid",
        ),
        (
            "origin = \"local\"\ngid = [1, 2, 3, 4, 5, 6, 7, 8, 9]\n",
            "9 gid ranges selected; at most 8",
        ),
    ] {
        let error = format!("{:#}", with_file(&rule(extra), &[]).unwrap_err());
        assert!(error.contains(expected), "{extra}: {error}");
    }
}

#[test]
fn local_flag_rules_are_local_or_both_with_interfaces() {
    let origins = |extra: &[&str]| -> Vec<Origin> {
        let mut flags = vec!["--local", "--tcp", "80"];
        flags.extend_from_slice(extra);
        Config::build(&args(&flags))
            .unwrap()
            .rules
            .iter()
            .map(|r| r.origin)
            .collect()
    };
    assert!(origins(&[]).iter().all(|o| *o == Origin::Local));
    assert!(origins(&["--iface", "eth0"])
        .iter()
        .all(|o| *o == Origin::Any));
    let error = format!(
        "{:#}",
        Config::build(&args(&["--local", "--config", "/dev/null"])).unwrap_err()
    );
    assert!(
        error.contains("--local makes the --tcp/--udp rules apply"),
        "{error}"
    );
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn own_listener_addresses_are_recognised() {
    let own = addrs(&["127.0.0.1:7000", "[::1]:7000"]);
    assert!(reaches_own_listener(
        &own,
        "127.0.0.1:7000".parse().unwrap()
    ));
    assert!(reaches_own_listener(&own, "[::1]:7000".parse().unwrap()));
    assert!(!reaches_own_listener(
        &own,
        "127.0.0.1:7001".parse().unwrap()
    ));
    assert!(!reaches_own_listener(
        &own,
        "10.0.0.1:7000".parse().unwrap()
    ));
    // The unspecified address is this host, and a mapped one its IPv4 address (found by the
    // hostile test: these upstreams looped).
    for target in ["0.0.0.0:7000", "[::]:7000", "[::ffff:127.0.0.1]:7000"] {
        assert!(
            reaches_own_listener(&own, target.parse().unwrap()),
            "{target}"
        );
    }
    assert!(!reaches_own_listener(&own, "0.0.0.0:7001".parse().unwrap()));
    // Not a listener on another address, which a connection there never reaches.
    let elsewhere = addrs(&["10.0.0.1:7000"]);
    assert!(!reaches_own_listener(
        &elsewhere,
        "0.0.0.0:7000".parse().unwrap()
    ));
    let wildcard = addrs(&["0.0.0.0:7000"]);
    assert!(reaches_own_listener(
        &wildcard,
        "10.0.0.1:7000".parse().unwrap()
    ));
}

#[test]
fn cgroup_paths_are_checked_as_run_checks_them_and_a_trailing_slash_is_one_cgroup() {
    for bad in ["", "app", "../../etc", "/app/.."] {
        let error = format!(
            "{:#}",
            Config::build(&args(&["--local", "--cgroup", bad, "--tcp", "80"])).unwrap_err()
        );
        assert!(error.contains(&format!("cgroup `{bad}`")), "{bad}: {error}");
    }
    let text = "[[listener]]\nname = \"up\"\n[[rule]]\nproto = \"tcp\"\nports = 80\n\
                action = \"steer\"\norigin = \"local\"\ncgroup = [\"/app\"]\n\
                [[rule]]\nproto = \"udp\"\nports = 53\naction = \"steer\"\nlistener = \"up\"\n\
                origin = \"any\"\ncgroup = [\"/app/\"]\n";
    let config = with_file(text, &[]).unwrap();
    assert_eq!(
        config.local.as_ref().unwrap().get(1).unwrap().cgroups,
        ["/app"]
    );
    assert!(config.rules.iter().all(|r| r.selection == 1));
    // Other spellings of one cgroup are that cgroup (before, each was attached again).
    let spellings = text.replace("\"/app/\"", "\"//app\", \"/app/.\"");
    let config = with_file(&spellings, &[]).unwrap();
    assert_eq!(
        config.local.as_ref().unwrap().get(1).unwrap().cgroups,
        ["/app"]
    );
}

#[test]
fn a_selection_larger_than_the_programs_try_is_refused_by_check_naming_the_rule() {
    let nine: Vec<String> = (1..=9).map(|n| format!("\"/c{n}\"")).collect();
    let seventeen: Vec<String> = (1..=17).map(|n| n.to_string()).collect();
    for (selector, expected) in [
        (
            format!("cgroup = [{}]", nine.join(", ")),
            "9 cgroups selected; at most 8",
        ),
        (
            format!("uid = [{}]", seventeen.join(", ")),
            "17 uid ranges selected; at most 16",
        ),
    ] {
        let text = format!(
            "[[listener]]\nname = \"up\"\n[[rule]]\nproto = \"tcp\"\nports = 80\n\
             action = \"steer\"\norigin = \"local\"\n{selector}\n"
        );
        let error = format!("{:#}", with_file(&text, &[]).unwrap_err());
        assert!(
            error.contains("rule 1") && error.contains(expected),
            "{error}"
        );
    }
}

/// A `dst = "local"` rule is written per host address later (the rule itself is a template):
/// its mark is checked as any rule's is, whatever addresses the host has now.
#[test]
fn a_mark_on_a_rule_for_the_hosts_own_addresses_is_checked_too() {
    let rule = |mark: &str, origin: &str| {
        format!(
            "interfaces = [\"eth0\"]\n[[listener]]\nname = \"web\"\n\
             [[rule]]\nproto = \"tcp\"\ndst = \"local\"\nmark = \"{mark}\"\norigin = \"{origin}\"\n\
             action = \"steer\"\nlistener = \"web\"\n"
        )
    };
    let taken = with_file(
        &rule("0x100/0x100", "forwarded"),
        &["--mark", "0x100/0x100"],
    )
    .unwrap_err();
    assert!(
        format!("{taken:#}").contains("needs bits of tproxy's routing mark"),
        "{taken:#}"
    );
    // A local connection's mark is its socket's, matched by the connect programs.
    with_file(&rule("0x40/0xc0", "local"), &[]).unwrap();
    let local_own_bits =
        with_file(&rule("0x100/0x100", "local"), &["--mark", "0x100/0x100"]).unwrap_err();
    assert!(
        format!("{local_own_bits:#}").contains("needs bits of tproxy's routing mark"),
        "{local_own_bits:#}"
    );
}

#[test]
fn an_ipset_destination_follows_the_entries_it_is_given() {
    let text = r#"
interfaces = "all"

[[listener]]
name = "proxy"

[[rule]]
proto = ["tcp", "udp"]
dst = "ipset:gfwlist"
action = "steer"

[[rule]]
proto = "tcp"
src = "192.168.1.0/24"
dst = "ipset:direct"
ports = 443
action = "bypass"
"#;
    let file = RunArgs {
        config: Some("sets.toml".into()),
        ..RunArgs::default()
    };
    let mut config = Config::from_text(&file, text).unwrap();
    assert!(config.rules.is_empty(), "nothing until the sets are read");
    assert_eq!(config.followed_ipsets(), ["direct", "gfwlist"]);
    // Both families for the steer rule, the source's for the bypass.
    assert_eq!(config.ipset_rules.len(), 5);
    let shown = |config: &Config| -> Vec<String> {
        let mut rules: Vec<String> = config
            .rules
            .iter()
            .map(|r| format!("{} #{}", r, r.number))
            .collect();
        rules.sort();
        rules
    };
    let gfwlist: Vec<IpNet> = vec![
        "8.8.8.0/24".parse().unwrap(),
        "2001:db8::1/128".parse().unwrap(),
    ];
    assert!(config.set_ipset_entries("gfwlist", gfwlist.clone()));
    assert!(
        !config.set_ipset_entries("gfwlist", gfwlist),
        "nothing changed"
    );
    assert!(config.set_ipset_entries("direct", vec!["8.8.8.8/32".parse().unwrap()]));
    assert_eq!(
        shown(&config),
        [
            "tcp dst 2001:db8::1/128 port any #1",
            "tcp dst 8.8.8.0/24 port any #1",
            "tcp dst 8.8.8.8/32 port 443 src 192.168.1.0/24 #2",
            "udp dst 2001:db8::1/128 port any #1",
            "udp dst 8.8.8.0/24 port any #1",
        ]
    );
    // A set emptied takes its rules away, and leaves the other set's alone.
    assert!(config.set_ipset_entries("gfwlist", Vec::new()));
    assert_eq!(
        shown(&config),
        ["tcp dst 8.8.8.8/32 port 443 src 192.168.1.0/24 #2"]
    );
    config.mark_listener_transports();
    assert!(
        config.listeners[0].tcp && config.listeners[0].udp,
        "the listener whatever the set holds"
    );

    for bad in ["ipset:", "ipset:a b", &format!("ipset:{}", "x".repeat(32))] {
        let text = format!("[[rule]]\nproto = \"tcp\"\ndst = \"{bad}\"\naction = \"bypass\"\n");
        let refused = Config::from_text(&file, &text).unwrap_err().to_string();
        assert!(
            refused.contains("an ipset name has 1 to 31 characters"),
            "{refused}"
        );
    }
}

/// The direction guard has two entries per selection of the local rules it guards: `check`
/// counts them once the selections are known, as `run` compiles them (30 entries of marked
/// rules and the guard of two selections are 34), and names a rule that keeps the guard off.
#[test]
fn the_mark_stage_is_counted_with_the_direction_guard_of_each_selection() {
    let head = "interfaces = [\"eth0\"]\n\n[[listener]]\nname = \"up\"\n";
    let mut marked = String::from(head);
    for port in 1000..1030 {
        marked += &format!(
            "\n[[rule]]\nproto = \"udp\"\ndst = \"10.0.0.0/8\"\nports = {port}\nmark = \"0x10\"\naction = \"bypass\"\n"
        );
    }
    let local = |uid: u32| {
        format!(
            "\n[[rule]]\nproto = \"udp\"\norigin = \"local\"\nuid = {uid}\nct_direction = \"original\"\naction = \"steer\"\n"
        )
    };
    let one_selection = marked + &local(1000);
    assert!(
        with_file(&one_selection, &[]).is_ok(),
        "30 and a guard of 2 fit"
    );
    let two = one_selection + &local(2000);
    let error = format!("{:#}", with_file(&two, &[]).unwrap_err());
    assert!(
        error.contains("need 34 entries") && error.contains("most of them: the direction guard: 4"),
        "{error}"
    );
    // A selection's rule that does not ask among two that do: asking too would cost the
    // guard's 6 entries, more than the two that ask cost on their own (4): no such advice.
    let third =
        two.replace("uid = 2000\nct_direction = \"original\"\n", "uid = 2000\n") + &local(3000);
    let error = format!("{:#}", with_file(&third, &[]).unwrap_err());
    assert!(
        error.contains("need 34 entries") && !error.contains("does not ask"),
        "{error}"
    );

    let mut asking = String::from(head);
    for i in 0..40 {
        asking += &format!(
            "\n[[rule]]\nproto = \"udp\"\ndst = \"10.{i}.0.0/16\"\nct_direction = \"original\"\naction = \"bypass\"\n"
        );
    }
    assert!(with_file(&asking, &[]).is_ok(), "behind the guard");
    let unguarded = asking + "\n[[rule]]\nproto = \"udp\"\naction = \"steer\"\n";
    let error = format!("{:#}", with_file(&unguarded, &[]).unwrap_err());
    assert!(
        error.contains("; rule[41] does not ask for ct_direction = \"original\" as the others"),
        "{error}"
    );
}

#[test]
fn followed_destination_keywords_round_trip_with_their_families() {
    for keyword in [text::LOCAL, text::ANYCAST] {
        for (ipv4, ipv6) in [(true, true), (true, false), (false, true)] {
            let written = text::with_families(keyword, ipv4, ipv6);
            assert_eq!(text::families_of(&written, keyword), Some((ipv4, ipv6)));
        }
        assert_eq!(text::families_of(&format!("{keyword}-ipv5"), keyword), None);
    }
    assert_eq!(text::families_of("localhost", text::LOCAL), None);
    assert_eq!(text::families_of("anycast", text::LOCAL), None);
}
