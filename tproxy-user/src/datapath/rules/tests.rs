use tproxy_common::{
    local_origin::{selection_ifindex, LOCAL_ORIGIN_IFINDEX},
    maps::{CT_ASKED_BY_ARRIVALS, CT_ASKED_BY_LOCAL, GENERATION_BIT},
};

use super::*;

const IFACES: &[(&str, u32)] = &[("eth0", 2), ("eth1", 3)];

fn interfaces() -> Vec<(String, u32)> {
    IFACES.iter().map(|(n, i)| (n.to_string(), *i)).collect()
}

fn rule(number: usize, text: &str, action: Action) -> Rule {
    // "tcp|udp|other 10.0.0.0/8 80 [src PREFIX] [iface IF] [mark VALUE[/MASK]] [origin local|any]"
    let words: Vec<&str> = text.split_whitespace().collect();
    let ports = match words[2] {
        "any" => Ports::Any,
        p if p.contains('-') => {
            let (a, b) = p.split_once('-').unwrap();
            Ports::Range(a.parse().unwrap(), b.parse().unwrap())
        }
        p => Ports::One(p.parse().unwrap()),
    };
    let mut rule = Rule {
        protocol: protocol(words[0]),
        dst: words[1].parse().unwrap(),
        ports,
        sport: None,
        src: None,
        iface: None,
        mark: None,
        action,
        number,
        retired: false,
        origin: Origin::Forwarded,
        selection: 0,
        out_iface: None,
        ct_direction: None,
    };
    for pair in words[3..].chunks(2) {
        match pair[0] {
            "src" => rule.src = Some(pair[1].parse().unwrap()),
            "iface" => rule.iface = Some(pair[1].to_string()),
            "mark" => rule.mark = Some(crate::values::parse_mark_match(pair[1]).unwrap()),
            "sport" => {
                rule.sport = Some(match pair[1].split_once('-') {
                    Some((a, b)) => Ports::Range(a.parse().unwrap(), b.parse().unwrap()),
                    None => Ports::One(pair[1].parse().unwrap()),
                })
            }
            "out_interface" => rule.out_iface = Some(pair[1].to_string()),
            "ct" => rule.ct_direction = Some(ct_direction(pair[1])),
            "origin" if pair[1] == "local" => rule.origin = Origin::Local,
            "origin" if pair[1] == "any" => rule.origin = Origin::Any,
            other => panic!("{other}"),
        }
    }
    rule
}

/// The interface of a local connection in these tests.
const LOCAL: &str = "local";

fn protocol(word: &str) -> Protocol {
    match word {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "other" => Protocol::Other,
        _ => panic!("`{word}` is no protocol"),
    }
}

fn ct_direction(text: &str) -> CtDirection {
    match text {
        "original" => CtDirection::Original,
        "reply" => CtDirection::Reply,
        other => panic!("{other}"),
    }
}

fn packet<'a>(text: &str, iface: &'a str) -> Packet<'a> {
    // "tcp SRC[:SPORT] -> DST:PORT [mark MARK] [ct DIRECTION]" (direction original unless
    // given) on an interface (source port 40000 unless given), or a local connection's (iface
    // [`LOCAL`], source port its bound one, 0 unless given)
    let words: Vec<&str> = text.split_whitespace().collect();
    let mut mark = 0;
    let local = iface == LOCAL;
    let mut direction = Some(CtDirection::Original);
    for pair in words.get(4..).unwrap_or_default().chunks(2) {
        match pair {
            ["mark", value] => mark = crate::values::parse_mark_match(value).unwrap().value,
            ["ct", value] => direction = Some(ct_direction(value)),
            other => panic!("{other:?}"),
        }
    }
    let dst: std::net::SocketAddr = words[3].parse().unwrap();
    let (src, sport) = match words[1].parse::<std::net::SocketAddr>() {
        Ok(src) => (src.ip(), src.port()),
        Err(_) => (words[1].parse().unwrap(), if local { 0 } else { 40000 }),
    };
    Packet {
        protocol: protocol(words[0]),
        src,
        dst: dst.ip(),
        port: dst.port(),
        sport,
        local,
        selections: 1,
        iface,
        mark,
        route: None,
        ct_direction: direction,
    }
}

fn ifindex(iface: &str) -> u32 {
    match iface {
        LOCAL => LOCAL_ORIGIN_IFINDEX,
        iface => IFACES.iter().find(|(n, _)| *n == iface).unwrap().1,
    }
}

/// Checks the definition's answer, and that the compiled maps give the same one.
fn expect(rules: &[Rule], text: &str, iface: &str, expected: RuleMatch) {
    let packet = packet(text, iface);
    assert_eq!(
        decide(rules, &packet),
        expected,
        "definition: {text} on {iface}"
    );
    for generation in [0, 1] {
        let compiled = compile(rules, generation, &interfaces());
        assert_eq!(
            lookup(&compiled, generation, &packet, ifindex(iface)),
            expected,
            "maps: {text} on {iface}"
        );
    }
}

#[test]
fn the_longest_destination_prefix_wins_whatever_the_order() {
    let rules = [
        rule(1, "tcp 10.0.0.0/8 80", Action::Steer(0)),
        rule(2, "tcp 10.1.0.0/16 any", Action::Bypass),
        rule(3, "tcp 10.1.2.0/24 80", Action::Steer(1)),
    ];
    expect(
        &rules,
        "tcp 192.0.2.1 -> 10.9.9.9:80",
        "eth0",
        RuleMatch::Steer(0),
    );
    expect(
        &rules,
        "tcp 192.0.2.1 -> 10.1.9.9:80",
        "eth0",
        RuleMatch::Bypass,
    );
    expect(
        &rules,
        "tcp 192.0.2.1 -> 10.1.2.3:80",
        "eth0",
        RuleMatch::Steer(1),
    );
    expect(
        &rules,
        "tcp 192.0.2.1 -> 10.1.2.3:443",
        "eth0",
        RuleMatch::Bypass,
    );
    expect(
        &rules,
        "tcp 192.0.2.1 -> 10.9.9.9:443",
        "eth0",
        RuleMatch::None,
    );
    expect(
        &rules,
        "udp 192.0.2.1 -> 10.9.9.9:80",
        "eth0",
        RuleMatch::None,
    );
}

#[test]
fn a_single_port_beats_a_range_which_beats_any_port_then_rule_order() {
    let rules = [
        rule(1, "tcp 0.0.0.0/0 any", Action::Steer(0)),
        rule(2, "tcp 0.0.0.0/0 8000-8100", Action::Steer(1)),
        rule(3, "tcp 0.0.0.0/0 8080", Action::Steer(2)),
        rule(4, "tcp 0.0.0.0/0 8080", Action::Steer(3)),
        rule(5, "tcp 0.0.0.0/0 8000-8010", Action::Steer(4)),
    ];
    expect(
        &rules,
        "tcp 192.0.2.1 -> 10.0.0.1:8080",
        "eth0",
        RuleMatch::Steer(2),
    );
    expect(
        &rules,
        "tcp 192.0.2.1 -> 10.0.0.1:8081",
        "eth0",
        RuleMatch::Steer(1),
    );
    expect(
        &rules,
        "tcp 192.0.2.1 -> 10.0.0.1:8005",
        "eth0",
        RuleMatch::Steer(1),
    );
    expect(
        &rules,
        "tcp 192.0.2.1 -> 10.0.0.1:22",
        "eth0",
        RuleMatch::Steer(0),
    );
}

#[test]
fn sources_and_interfaces_narrow_a_rule_and_the_next_one_takes_over() {
    let rules = [
        rule(1, "tcp 10.0.0.0/8 80 src 192.0.2.0/24", Action::Bypass),
        rule(2, "tcp 10.0.0.0/8 80 iface eth1", Action::Steer(1)),
        rule(3, "tcp 10.0.0.0/8 80", Action::Steer(0)),
        rule(
            4,
            "tcp 10.1.0.0/16 80 src 198.51.100.0/24 iface eth0",
            Action::Steer(2),
        ),
    ];
    expect(
        &rules,
        "tcp 192.0.2.9 -> 10.2.0.1:80",
        "eth0",
        RuleMatch::Bypass,
    );
    expect(
        &rules,
        "tcp 203.0.113.9 -> 10.2.0.1:80",
        "eth1",
        RuleMatch::Steer(1),
    );
    expect(
        &rules,
        "tcp 203.0.113.9 -> 10.2.0.1:80",
        "eth0",
        RuleMatch::Steer(0),
    );
    expect(
        &rules,
        "tcp 198.51.100.7 -> 10.1.0.1:80",
        "eth0",
        RuleMatch::Steer(2),
    );
    expect(
        &rules,
        "tcp 198.51.100.7 -> 10.1.0.1:80",
        "eth1",
        RuleMatch::Steer(1),
    );
    expect(
        &rules,
        "tcp 192.0.2.9 -> 10.1.0.1:80",
        "eth0",
        RuleMatch::Bypass,
    );
}

#[test]
fn an_interface_pattern_matches_the_attached_interfaces_it_names() {
    let rules = [
        rule(1, "tcp 10.0.0.0/8 80 iface e?h1", Action::Bypass),
        rule(2, "tcp 10.0.0.0/8 80 iface eth*", Action::Steer(1)),
        rule(3, "tcp 10.0.0.0/8 80 iface wg*", Action::Steer(2)),
        rule(4, "tcp 10.0.0.0/8 80", Action::Steer(0)),
    ];
    expect(
        &rules,
        "tcp 192.0.2.9 -> 10.2.0.1:80",
        "eth0",
        RuleMatch::Steer(1),
    );
    expect(
        &rules,
        "tcp 192.0.2.9 -> 10.2.0.1:80",
        "eth1",
        RuleMatch::Bypass,
    );
}

#[test]
fn ipv6_rules_are_their_own_family() {
    let rules = [
        rule(1, "udp ::/0 53", Action::Steer(0)),
        rule(
            2,
            "udp 2001:db8::/32 53 src 2001:db8:1::/48",
            Action::Bypass,
        ),
        rule(3, "udp 0.0.0.0/0 53", Action::Bypass),
    ];
    expect(
        &rules,
        "udp 2001:db8:1::5 -> [2001:db8::1]:53",
        "eth0",
        RuleMatch::Bypass,
    );
    expect(
        &rules,
        "udp 2001:db8:2::5 -> [2001:db8::1]:53",
        "eth0",
        RuleMatch::Steer(0),
    );
    expect(
        &rules,
        "udp 192.0.2.1 -> 10.0.0.1:53",
        "eth0",
        RuleMatch::Bypass,
    );
}

#[test]
fn retired_rules_come_after_every_current_one_and_never_take_new_flows() {
    let mut old = rule(1, "tcp 10.0.0.0/24 80", Action::Steer(0));
    old.retired = true;
    let rules = [old, rule(1, "tcp 0.0.0.0/0 80", Action::Steer(1))];
    expect(
        &rules,
        "tcp 192.0.2.1 -> 10.0.0.1:80",
        "eth0",
        RuleMatch::Steer(1),
    );
    expect(
        &rules[..1],
        "tcp 192.0.2.1 -> 10.0.0.1:80",
        "eth0",
        RuleMatch::Bypass,
    );
}

/// `retire` by its definition: each candidate against every new rule and every candidate
/// already retired.
fn retire_by_definition(candidates: &[Rule], new: &[Rule]) -> Vec<Rule> {
    // A rule's part for arrivals, as a rule for arrivals only.
    let arrivals = |rule: &Rule| Rule {
        origin: Origin::Forwarded,
        selection: 0,
        ..rule.clone()
    };
    let new: Vec<Rule> = new
        .iter()
        .filter(|rule| rule.origin != Origin::Local)
        .map(arrivals)
        .collect();
    // Each kept rule, with its part for arrivals (what later candidates compare with).
    let mut retired: Vec<(Rule, Rule)> = Vec::new();
    for rule in candidates
        .iter()
        .filter(|rule| rule.origin != Origin::Local)
    {
        if !new
            .iter()
            .chain(retired.iter().map(|kept| &kept.1))
            .any(|other| other.match_key() == arrivals(rule).match_key())
        {
            // A rule for every origin and process keeps its origin.
            let kept = match (rule.origin, rule.selection) {
                (Origin::Any, 0) => rule.clone(),
                _ => arrivals(rule),
            };
            retired.push((
                Rule {
                    retired: true,
                    ..kept
                },
                arrivals(rule),
            ));
        }
    }
    retired.into_iter().map(|(kept, _)| kept).collect()
}

#[test]
fn a_reload_retires_each_dropped_match_once_whatever_the_rule_count() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    // Few distinct matches among many rules, so that candidates repeat each other and
    // the new rules, with actions and numbers that differ between equal matches.
    let mut random_rule = |number: usize| {
        let mut text = format!(
            "{} 10.{}.0.0/16 {}",
            ["tcp", "udp"][next(2) as usize],
            next(30),
            ["80", "443", "8000-8100", "any"][next(4) as usize]
        );
        if next(3) == 0 {
            text += &format!(" src 192.0.2.{}/32", next(4));
        }
        match next(6) {
            0 | 1 => text += &format!(" iface {}", IFACES[next(2) as usize].0),
            2 if !text.contains("src") => {
                text += [" origin local", " origin any"][next(2) as usize];
            }
            _ => {}
        }
        rule(number, &text, Action::Steer(next(3) as u32))
    };
    for size in [0, 1, 10, 1000, 20_000] {
        let candidates: Vec<Rule> = (1..=size).map(&mut random_rule).collect();
        let new: Vec<Rule> = (1..=size / 2).map(&mut random_rule).collect();
        let retired = retire(&candidates, &new);
        assert_eq!(retired, retire_by_definition(&candidates, &new), "{size}");
        assert!(retired.iter().all(|r| r.retired));
    }
    let kept = [rule(1, "tcp 10.0.0.0/8 80", Action::Steer(0))];
    let mut moved = kept[0].clone();
    moved.action = Action::Steer(1);
    assert!(
        retire(&kept, &[moved]).is_empty(),
        "a match the new rules still have is not retired, whatever its action"
    );
    let local = [rule(1, "tcp 10.0.0.0/8 80 origin local", Action::Steer(0))];
    assert!(
        retire(&local, &[]).is_empty(),
        "a rule for local connections only would decide nothing retired"
    );
}

/// A reload that gives a selection's index to the same processes through an out_interface:
/// the rules it retires keep only their part for arrivals, so none of the old selection
/// meets the new one's interface (compiling them together once failed its check that a
/// selection's rules have one out_interface).
#[test]
fn rules_retired_by_a_reload_leave_the_new_selections_alone() {
    let old = [Rule {
        selection: 1,
        ..rule(1, "tcp 0.0.0.0/0 80 origin any", Action::Steer(0))
    }];
    let new = [Rule {
        selection: 1,
        ..rule(
            1,
            "tcp 0.0.0.0/0 443 out_interface eth0 origin local",
            Action::Steer(0),
        )
    }];
    let every_process = rule(2, "tcp 10.0.0.0/8 80 origin any", Action::Steer(0));
    let retired = retire(&[old[0].clone(), every_process], &new);
    assert_eq!(
        retired
            .iter()
            .map(|rule| (rule.origin, rule.selection))
            .collect::<Vec<_>>(),
        [(Origin::Forwarded, 0), (Origin::Any, 0)],
        "a rule for every process keeps its origin"
    );
    let mut rules = new.to_vec();
    rules.extend(retired);
    assert_eq!(
        compile(&rules, 1, &interfaces()).selection_routes[1],
        0b01 << 8
    );
    // Its flows' arrivals still meet it (as a bypass); local connections never do.
    expect(
        &rules,
        "tcp 198.51.100.1 -> 192.0.2.1:80",
        "eth0",
        RuleMatch::Bypass,
    );
    expect_routed(
        &rules,
        "tcp 0.0.0.0 -> 192.0.2.1:80",
        Some("eth0"),
        RuleMatch::None,
    );
}

#[test]
fn rule_groups_add_up_instead_of_multiplying() {
    let mut rules: Vec<Rule> = (0..100)
        .map(|i| {
            rule(
                i + 1,
                &format!("tcp 10.10.0.0/16 {}", 20000 + i),
                Action::Steer(0),
            )
        })
        .collect();
    rules.extend(
        (0..100).map(|i| rule(200 + i, &format!("tcp 10.200.0.{i}/32 any"), Action::Bypass)),
    );
    rules.push(rule(400, "tcp 0.0.0.0/0 1000-2000", Action::Steer(0)));
    rules.push(rule(401, "tcp 10.0.0.0/8 1500-3000", Action::Bypass));
    let compiled = compile(&rules, 0, &interfaces());
    // 100 single ports, 3 range classes (1000-1499, 1500-2000, 2001-3000), any-port.
    assert_eq!(compiled.groups(), 100 + 3 + 1);
    assert_eq!(compiled.dst_v4.len(), 100 + 100 + 1 + 2 + 1);
    assert_eq!(compiled.port_classes[0], 0, "port 0 is never steered");
    assert_eq!(compiled.port_classes[65536 + 1500], 0, "no UDP rules");
    expect(
        &rules,
        "tcp 192.0.2.1 -> 10.200.0.7:20005",
        "eth0",
        RuleMatch::Bypass,
    );
    expect(
        &rules,
        "tcp 192.0.2.1 -> 10.10.0.7:20005",
        "eth0",
        RuleMatch::Steer(0),
    );
    expect(
        &rules,
        "tcp 192.0.2.1 -> 10.10.0.7:1600",
        "eth0",
        RuleMatch::Bypass,
    );
    expect(
        &rules,
        "tcp 192.0.2.1 -> 11.0.0.1:1600",
        "eth0",
        RuleMatch::Steer(0),
    );
}

/// One rule per client, as `translate` writes per-client iptables lines: every source
/// gets its own winner, and the rules after them still decide for everyone else.
#[test]
fn thousands_of_source_rules_on_one_destination_each_decide_their_source() {
    let clients = 20_000;
    let client = |i: usize| format!("10.0.{}.{}", i / 256, i % 256);
    let mut rules: Vec<Rule> = (0..clients)
        .map(|i| {
            let iface = if i % 3 == 0 { " iface eth1" } else { "" };
            let action = match i % 5 {
                0 => Action::Bypass,
                n => Action::Steer(n as u32),
            };
            let text = format!("tcp 0.0.0.0/0 80 src {}/32{iface}", client(i));
            rule(i + 1, &text, action)
        })
        .collect();
    rules.push(rule(
        clients + 1,
        "tcp 0.0.0.0/0 80 src 10.0.0.0/16",
        Action::Bypass,
    ));
    rules.push(rule(clients + 2, "tcp 0.0.0.0/0 80", Action::Steer(0)));
    let compiled = compile(&rules, 1, &interfaces());
    // Per interface: each client, the /16 and the catch-all.
    assert_eq!(compiled.src_v4.len(), IFACES.len() * (clients + 2));
    let mut sources: Vec<String> = (0..clients).step_by(199).map(client).collect();
    sources.extend(["10.0.255.1", "192.0.2.1"].map(String::from));
    for source in sources {
        for (iface, ifindex) in IFACES {
            let packet = packet(&format!("tcp {source} -> 192.0.2.80:80"), iface);
            assert_eq!(
                lookup(&compiled, 1, &packet, *ifindex),
                decide(&rules, &packet),
                "from {source} on {iface}"
            );
        }
    }
}

#[test]
fn generations_never_share_class_or_cell_ids() {
    let rules = [rule(
        1,
        "tcp 0.0.0.0/0 80 src 192.0.2.0/24",
        Action::Steer(0),
    )];
    let old = compile(&rules, 0, &interfaces());
    let new = compile(&rules, 1, &interfaces());
    assert!(old
        .dst_v4
        .iter()
        .all(|(k, _, v)| k.class & GENERATION_BIT == 0 && v.cell & GENERATION_BIT == 0));
    assert!(new
        .dst_v4
        .iter()
        .all(|(k, _, v)| k.class & GENERATION_BIT != 0 && v.cell & GENERATION_BIT != 0));
    assert!(new
        .src_v4
        .iter()
        .all(|(k, _, _)| k.cell & GENERATION_BIT != 0));
}

#[test]
fn a_mark_is_one_more_match_and_precedence_stays_the_same() {
    let rules = [
        rule(1, "tcp 0.0.0.0/0 any mark 0x10/0xf0", Action::Bypass),
        rule(2, "tcp 0.0.0.0/0 any", Action::Steer(0)),
        rule(3, "tcp 10.1.0.0/16 any", Action::Steer(1)),
        rule(4, "udp 10.0.0.0/8 53 mark 0x20", Action::Steer(2)),
        rule(5, "udp 10.1.0.0/16 53 mark 0x20", Action::Bypass),
        rule(6, "tcp ::/0 any mark 0x10/0xf0", Action::Steer(2)),
        rule(
            7,
            "tcp 0.0.0.0/0 22 src 192.0.2.0/24 iface eth1 mark 0x30",
            Action::Steer(1),
        ),
    ];
    let cases = [
        ("tcp 192.0.2.1 -> 10.9.9.9:80", RuleMatch::Steer(0)),
        ("tcp 192.0.2.1 -> 10.9.9.9:80 mark 0x10", RuleMatch::Bypass),
        (
            "tcp 192.0.2.1 -> 10.9.9.9:80 mark 0x1f10",
            RuleMatch::Bypass,
        ),
        (
            "tcp 192.0.2.1 -> 10.9.9.9:80 mark 0x20",
            RuleMatch::Steer(0),
        ),
        // The longer prefix wins over the mark rule, as it would over any rule.
        (
            "tcp 192.0.2.1 -> 10.1.2.3:80 mark 0x10",
            RuleMatch::Steer(1),
        ),
        (
            "udp 192.0.2.1 -> 10.9.9.9:53 mark 0x20",
            RuleMatch::Steer(2),
        ),
        ("udp 192.0.2.1 -> 10.9.9.9:53 mark 0x21", RuleMatch::None),
        ("udp 192.0.2.1 -> 10.9.9.9:54 mark 0x20", RuleMatch::None),
        ("udp 192.0.2.1 -> 10.1.9.9:53 mark 0x20", RuleMatch::Bypass),
        ("udp 192.0.2.1 -> 10.1.9.9:53", RuleMatch::None),
        (
            "tcp 2001:db8::1 -> [2001:db8::2]:80 mark 0x10",
            RuleMatch::Steer(2),
        ),
        ("tcp 2001:db8::1 -> [2001:db8::2]:80", RuleMatch::None),
    ];
    for (text, expected) in cases {
        expect(&rules, text, "eth0", expected);
    }
    let sourced = "tcp 192.0.2.1 -> 10.9.9.9:22 mark 0x30";
    expect(&rules, sourced, "eth1", RuleMatch::Steer(1));
    expect(&rules, sourced, "eth0", RuleMatch::Steer(0));
    expect(
        &rules,
        "tcp 198.51.100.1 -> 10.9.9.9:22 mark 0x30",
        "eth1",
        RuleMatch::Steer(0),
    );
    let compiled = compile(&rules, 0, &interfaces());
    assert_eq!(compiled.marks.len(), 5, "mark rules stay out of the tries");
    let both = [
        rule(1, "tcp 0.0.0.0/0 any mark 0x10/0xf0", Action::Bypass),
        rule(1, "udp 0.0.0.0/0 any mark 0x10/0xf0", Action::Bypass),
    ];
    assert_eq!(
        mark_rules(&both, &[]).len(),
        1,
        "TCP and UDP share an entry"
    );
}

#[test]
fn a_source_port_is_one_more_match_and_drop_one_more_action() {
    // The udp_proxy_server idiom: the proxy's own replies (from its port) are not steered;
    // and the QUIC block of the v2ray guides.
    let rules = [
        rule(1, "udp 0.0.0.0/0 any sport 7777", Action::Bypass),
        rule(2, "udp 0.0.0.0/0 any src 192.0.2.0/24", Action::Steer(0)),
        rule(3, "udp 0.0.0.0/0 443", Action::Drop),
        rule(4, "udp 10.0.0.0/8 443 sport 1000-2000", Action::Drop),
        rule(5, "udp 10.1.0.0/16 any", Action::Bypass),
        rule(6, "tcp 0.0.0.0/0 any", Action::Steer(1)),
    ];
    let cases = [
        ("udp 192.0.2.1:5000 -> 198.51.100.1:53", RuleMatch::Steer(0)),
        ("udp 192.0.2.1:7777 -> 198.51.100.1:53", RuleMatch::Bypass),
        ("udp 192.0.2.1:7778 -> 198.51.100.1:53", RuleMatch::Steer(0)),
        ("udp 198.51.100.9:5000 -> 198.51.100.1:53", RuleMatch::None),
        // A single port beats any port: the drop, whatever the source port.
        ("udp 192.0.2.1:5000 -> 198.51.100.1:443", RuleMatch::Drop),
        ("udp 192.0.2.1:7777 -> 198.51.100.1:443", RuleMatch::Drop),
        // The longer prefix wins, with its source ports or without.
        ("udp 192.0.2.1:1500 -> 10.9.9.9:443", RuleMatch::Drop),
        ("udp 192.0.2.1:2001 -> 10.9.9.9:443", RuleMatch::Drop),
        ("udp 192.0.2.1:1500 -> 10.1.9.9:443", RuleMatch::Bypass),
        (
            "tcp 192.0.2.1:7777 -> 198.51.100.1:443",
            RuleMatch::Steer(1),
        ),
    ];
    for (text, expected) in cases {
        expect(&rules, text, "eth0", expected);
    }
    let compiled = compile(&rules, 0, &interfaces());
    assert_eq!(
        compiled.marks.len(),
        2,
        "rules with a source port are tried one by one"
    );
    let mut retired = rules[2].clone();
    retired.retired = true;
    expect(
        &[retired],
        "udp 192.0.2.1:5000 -> 198.51.100.1:443",
        "eth0",
        RuleMatch::Bypass,
    );
}

#[test]
fn a_connections_direction_is_one_more_match_for_arrivals() {
    // `-m conntrack --ctdir REPLY -j RETURN` ahead of the steering: replies of connections
    // that were not steered (forwarded ones, say) are left alone.
    let rules = [
        rule(1, "udp 0.0.0.0/0 any ct reply", Action::Bypass),
        rule(2, "udp 0.0.0.0/0 any", Action::Steer(0)),
        rule(3, "tcp 10.0.0.0/8 80 ct original", Action::Steer(1)),
    ];
    let cases = [
        (
            "udp 192.0.2.1 -> 198.51.100.1:53 ct original",
            RuleMatch::Steer(0),
        ),
        (
            "udp 198.51.100.1:53 -> 192.0.2.1:5000 ct reply",
            RuleMatch::Bypass,
        ),
        (
            "tcp 192.0.2.1 -> 10.1.1.1:80 ct original",
            RuleMatch::Steer(1),
        ),
        ("tcp 192.0.2.1 -> 10.1.1.1:80 ct reply", RuleMatch::None),
    ];
    for (text, expected) in cases {
        expect(&rules, text, "eth0", expected);
    }
    let compiled = compile(&rules, 0, &interfaces());
    let table = compiled.mark_table().unwrap();
    assert_eq!(table.len, 2, "rules with a direction are tried one by one");
    assert_eq!(
        table.ct_direction, 1,
        "the program is told to look directions up"
    );
    let plain = compile(&rules[1..2], 0, &interfaces());
    assert_eq!(plain.mark_table().unwrap().ct_direction, 0);
}

/// mssb's sing-box chains are reached only through `ct direction original`: every rule asks
/// for it, more rules than the entries tried one by one hold. They are compiled into the
/// lookup stages behind one guard per family (and selection) that passes the reply
/// direction unmatched, with the same answers.
#[test]
fn rules_that_all_ask_for_the_original_direction_are_looked_up_behind_a_guard() {
    let mut rules: Vec<Rule> = (0..40u32)
        .map(|i| {
            let text = format!("udp 10.{i}.0.0/16 any ct original");
            rule(i as usize + 1, &text, Action::Bypass)
        })
        .collect();
    rules.push(rule(
        41,
        "tcp 0.0.0.0/0 any iface eth0 ct original",
        Action::Steer(0),
    ));
    rules.push(rule(42, "udp ::/0 53 ct original", Action::Drop));
    // A local TCP rule asks nothing: a TCP connect is always of the original direction.
    for (number, text) in [
        (43, "udp 0.0.0.0/0 443 ct original origin local"),
        (44, "tcp 0.0.0.0/0 443 origin local"),
        // Enough that asking once costs less than each asking.
        (46, "udp 0.0.0.0/0 444 ct original origin local"),
        (47, "udp ::/0 444 ct original origin local"),
    ] {
        let mut local = rule(number, text, Action::Steer(1));
        local.selection = 1;
        rules.push(local);
    }
    let cases = [
        (
            "udp 192.0.2.1 -> 10.7.1.1:53 ct original",
            "eth1",
            RuleMatch::Bypass,
        ),
        (
            "udp 192.0.2.1 -> 10.7.1.1:53 ct reply",
            "eth1",
            RuleMatch::None,
        ),
        (
            "tcp 192.0.2.1 -> 10.7.1.1:80 ct original",
            "eth0",
            RuleMatch::Steer(0),
        ),
        (
            "tcp 192.0.2.1 -> 10.7.1.1:80 ct original",
            "eth1",
            RuleMatch::None,
        ),
        (
            "tcp 192.0.2.1 -> 10.7.1.1:80 ct reply",
            "eth0",
            RuleMatch::None,
        ),
        (
            "udp 2001:db8::1 -> [2001:db8::2]:53 ct original",
            "eth1",
            RuleMatch::Drop,
        ),
        (
            "udp 2001:db8::1 -> [2001:db8::2]:53 ct reply",
            "eth1",
            RuleMatch::None,
        ),
    ];
    for (text, iface, expected) in cases {
        expect(&rules, text, iface, expected);
    }
    for transport in ["tcp", "udp"] {
        let text = format!("{transport} 0.0.0.0 -> 198.51.100.1:443");
        expect_selected(&rules, &text, 0b11, RuleMatch::Steer(1));
    }
    expect_selected(
        &rules,
        "udp 0.0.0.0:443 -> 198.51.100.1:5000 ct reply",
        0b11,
        RuleMatch::None,
    );
    let compiled = compile(&rules, 0, &interfaces());
    let table = compiled.mark_table().unwrap();
    assert_eq!(
        table.len, 4,
        "the guard alone is tried one by one: arrivals and selection 1, each family"
    );
    assert_eq!(
        table.ct_direction,
        CT_ASKED_BY_ARRIVALS | CT_ASKED_BY_LOCAL,
        "directions are still looked up, and local datagrams followed"
    );
    assert_eq!(mark_rules(&rules, &[]).len(), 4, "what `check` counts");

    // One rule for arrivals that does not ask: the direction is each of their rules' own
    // question again (42 entries), while the local rules stay behind their guard (2).
    rules.push(rule(45, "tcp 10.0.0.0/8 81", Action::Steer(0)));
    assert_eq!(mark_rules(&rules, &[]).len(), 44);
}

/// Rules tried one by one for a mark as well keep their entries behind a guard, which would
/// only add its own: without it, 31 fit.
#[test]
fn the_direction_guard_is_left_out_where_it_would_cost_more() {
    let rules: Vec<Rule> = (0..31u32)
        .map(|i| {
            let text = format!("udp 10.{i}.0.0/16 any mark 0x10 ct original");
            rule(i as usize + 1, &text, Action::Bypass)
        })
        .collect();
    assert_eq!(mark_rules(&rules, &[]).len(), 31);
    for (text, expected) in [
        (
            "udp 192.0.2.1 -> 10.7.1.1:53 mark 0x10 ct original",
            RuleMatch::Bypass,
        ),
        (
            "udp 192.0.2.1 -> 10.7.1.1:53 mark 0x10 ct reply",
            RuleMatch::None,
        ),
    ] {
        expect(&rules, text, "eth1", expected);
    }
}

#[test]
fn a_local_datagrams_direction_is_one_more_match_for_local_connections() {
    // mangle OUTPUT's `-m conntrack --ctdir REPLY -j RETURN`: a local server's answers are
    // left alone, its clients' datagrams steered.
    let mut rules = [
        rule(1, "udp 0.0.0.0/0 any ct reply", Action::Bypass),
        rule(2, "udp 0.0.0.0/0 any", Action::Steer(0)),
    ];
    for rule in &mut rules {
        rule.origin = Origin::Local;
        check_origin(rule).unwrap();
    }
    let cases = [
        ("udp 0.0.0.0 -> 198.51.100.1:53", RuleMatch::Steer(0)),
        (
            "udp 0.0.0.0:53 -> 198.51.100.1:5000 ct reply",
            RuleMatch::Bypass,
        ),
    ];
    for (text, expected) in cases {
        expect(&rules, text, LOCAL, expected);
    }
    let table = compile(&rules, 0, &interfaces()).mark_table().unwrap();
    assert_eq!(
        table.ct_direction, CT_ASKED_BY_LOCAL,
        "the local programs follow directions, the tc program looks none up"
    );
}

#[test]
fn a_local_rule_never_drops_and_may_name_a_source_port() {
    let mut local = rule(1, "tcp 0.0.0.0/0 any origin local", Action::Drop);
    assert!(check_origin(&local).unwrap_err().contains("drop"));
    local.action = Action::Deliver;
    assert!(check_origin(&local).unwrap_err().contains("deliver"));
    local.action = Action::Bypass;
    assert!(check_origin(&local).is_ok());
    local.sport = Some(Ports::One(7777));
    assert!(check_origin(&local).is_ok());
    local.src = Some("192.0.2.0/24".parse().unwrap());
    assert!(check_origin(&local).unwrap_err().contains("src"));
}

/// A local connection's source port is the port its socket is bound to when it connects or
/// sends (a server's replies from its own port), 0 while unbound: a bypass of a server's
/// ports keeps its replies out of a rule that steers everything else.
#[test]
fn a_local_rule_with_a_source_port_matches_the_bound_port() {
    let rules = [
        rule(
            1,
            "udp 0.0.0.0/0 any origin local sport 2080",
            Action::Bypass,
        ),
        rule(
            2,
            "udp 0.0.0.0/0 any origin local sport 8000-8585",
            Action::Bypass,
        ),
        rule(3, "udp 0.0.0.0/0 any origin local", Action::Steer(1)),
    ];
    let cases = [
        ("udp 0.0.0.0:2080 -> 198.51.100.1:53", RuleMatch::Bypass),
        ("udp 0.0.0.0:8585 -> 198.51.100.1:53", RuleMatch::Bypass),
        ("udp 0.0.0.0:2081 -> 198.51.100.1:53", RuleMatch::Steer(1)),
        ("udp 0.0.0.0 -> 198.51.100.1:53", RuleMatch::Steer(1)),
    ];
    for (text, expected) in cases {
        expect(&rules, text, LOCAL, expected);
    }
}

#[test]
fn a_mark_rule_never_looks_at_the_routing_mark() {
    let routing = crate::values::parse_mark("0x1000000/0x1000000").unwrap();
    let mark = |text| Some(crate::values::parse_mark_match(text).unwrap());
    let own_bits = rule(
        1,
        "tcp 0.0.0.0/0 any mark 0x1000000/0x1000000",
        Action::Bypass,
    );
    assert!(effective_mark(&own_bits, routing)
        .unwrap_err()
        .contains("routing mark"));
    let only_own = rule(1, "tcp 0.0.0.0/0 any mark 0/0x1000000", Action::Bypass);
    assert!(effective_mark(&only_own, routing)
        .unwrap_err()
        .contains("only looks"));
    let whole = rule(1, "tcp 0.0.0.0/0 any mark 0x10", Action::Bypass);
    assert_eq!(
        effective_mark(&whole, routing),
        Ok(mark("0x10/0xfeffffff")),
        "a bare value is matched whole but for the routing mark's bits"
    );
    let apart = rule(1, "tcp 0.0.0.0/0 any mark 0x10/0xf0", Action::Bypass);
    assert_eq!(effective_mark(&apart, routing), Ok(mark("0x10/0xf0")));
}

/// Random rule sets and packets: the maps must always agree with the definition.
#[test]
fn compiled_maps_agree_with_the_definition_on_random_rule_sets() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let prefixes = [
        "0.0.0.0/0",
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/24",
        "10.1.2.3/32",
        "10.2.0.0/16",
    ];
    let sources = [
        "192.0.2.0/24",
        "192.0.2.128/25",
        "198.51.100.0/24",
        "0.0.0.0/0",
        "192.0.2.5/32",
        "192.0.2.192/26",
        "203.0.113.0/24",
    ];
    let ports = ["80", "443", "70-90", "1-1000", "any"];
    for round in 0..1000 {
        // Mostly small sets, where every rule counts; some large ones, where many rules
        // share a destination, a port and sources.
        let count = match round % 10 {
            0 => 50 + next(300) as usize,
            _ => 1 + next(8) as usize,
        };
        let all_original = round % 4 == 1 || round % 20 == 0;
        let rules: Vec<Rule> = (0..count)
            .map(|i| {
                let mut text = format!(
                    "{} {} {}",
                    ["tcp", "udp"][next(2) as usize],
                    prefixes[next(prefixes.len() as u64) as usize],
                    ports[next(ports.len() as u64) as usize]
                );
                if next(3) == 0 {
                    text += &format!(" src {}", sources[next(sources.len() as u64) as usize]);
                }
                if next(4) == 0 {
                    // Names and patterns, one of which matches neither interface.
                    let ifaces = ["eth0", "eth1", "eth*", "e?h1", "wg*"];
                    text += &format!(" iface {}", ifaces[next(5) as usize]);
                }
                // The program holds 32 mark entries: marks in the small sets only.
                if count <= 8 && next(3) == 0 {
                    text += &format!(
                        " mark {}",
                        ["0x10/0xf0", "0x20", "0/0xff"][next(3) as usize]
                    );
                }
                // Source ports likewise (the same 32 entries), on forwarded rules only.
                if count <= 8 && next(3) == 0 {
                    text += [" sport 7777", " sport 1000-2000"][next(2) as usize];
                }
                // A connection's direction likewise; in some sets, large ones too, every
                // rule asks for the original direction (see `DirectionGuard`).
                if all_original {
                    text += " ct original";
                } else if count <= 8 && next(4) == 0 {
                    text += [" ct reply", " ct original"][next(2) as usize];
                }
                // Local rules (in a third of the sets) name no source, interface or source
                // port, do not drop, and have one of three selections; a mark and a
                // direction they may have.
                let plain = !["src", "iface", "sport"].iter().any(|w| text.contains(w));
                if round % 3 == 0 && plain {
                    text += ["", " origin local", " origin any"][next(3) as usize];
                }
                let action = match next(7) {
                    0 | 1 => Action::Bypass,
                    2 if !text.contains("origin") => Action::Drop,
                    6 if !text.contains("origin") => Action::Deliver,
                    n => Action::Steer(n as u32 % 3),
                };
                let mut rule = rule(i + 1, &text, action);
                if rule.origin.local() {
                    rule.selection = next(3) as u32;
                }
                // Retired as a reload retires it (see `retire`: a rule for local connections
                // only is not).
                if next(10) == 0 {
                    if let Some(retired) = retire(std::slice::from_ref(&rule), &[]).pop() {
                        rule = retired;
                    }
                }
                // Kept from a configuration whose rules did not ask (a reload): they have no
                // say in the guard.
                if rule.retired && all_original && next(2) == 0 {
                    rule.ct_direction = None;
                }
                // Some have an out_interface, and with it a selection of their own: 3 and 4
                // have the processes of 0 and 1. Not retired ones: `retire` keeps no rule
                // for local connections only.
                if rule.origin == Origin::Local && !rule.retired && next(4) == 0 {
                    let via = next(2);
                    rule.out_iface = Some(["eth0", "wg*"][via as usize].to_string());
                    rule.selection = 3 + via as u32;
                }
                rule
            })
            .collect();
        let compiled = compile(&rules, round % 2, &interfaces());
        for _ in 0..40 {
            let iface = match next(3) {
                0 if any_local(&rules) => LOCAL,
                n => IFACES[n as usize % 2].0,
            };
            let sport = match iface {
                LOCAL => String::new(),
                _ => [":7777", ":1000", ":2000", ":2001", ":999", ""][next(6) as usize].into(),
            };
            let direction = [" ct original", " ct reply"][next(2) as usize];
            let text = format!(
                "{} {}{sport} -> {}:{} mark {}{direction}",
                ["tcp", "udp"][next(2) as usize],
                ["192.0.2.200", "192.0.2.5", "198.51.100.1", "203.0.113.1"][next(4) as usize],
                [
                    "10.1.2.3",
                    "10.1.2.4",
                    "10.1.9.9",
                    "10.2.0.1",
                    "10.9.9.9",
                    "192.0.2.1"
                ][next(6) as usize],
                [80, 81, 443, 500, 2000][next(5) as usize],
                ["0", "0x10", "0x20", "0x1f0", "0x110"][next(5) as usize],
            );
            // A process is in selection 0 (every process) and maybe in 1 and 2; in 3 as in
            // 0, in 4 as in 1.
            let selections = 1 | (next(4) as u32) << 1;
            let packet = Packet {
                selections: selections | 1 << 3 | (selections & 0b10) << 3,
                route: [Some("eth0"), Some("wg0"), Some("eth1"), None][next(4) as usize],
                ..packet(&text, iface)
            };
            assert_eq!(
                lookup(&compiled, round % 2, &packet, ifindex(iface)),
                decide(&rules, &packet),
                "{text} on {iface} with rules {rules:#?}"
            );
        }
    }
}

/// Forwarded rules never answer for a local connection and local rules never for an
/// arrival, whether a cell's first rule is unconditional or looks at the source.
#[test]
fn local_and_forwarded_rules_are_kept_apart() {
    let rules = [
        rule(1, "tcp 0.0.0.0/0 80", Action::Steer(0)),
        rule(2, "tcp 0.0.0.0/0 80 origin local", Action::Steer(1)),
        rule(3, "tcp 10.0.0.0/8 443 origin local", Action::Steer(1)),
        rule(4, "tcp 10.0.0.0/8 443 src 192.0.2.0/24", Action::Steer(0)),
        rule(5, "tcp 10.1.0.0/16 any origin any", Action::Steer(2)),
        rule(6, "tcp 10.2.0.0/16 any origin local", Action::Bypass),
        rule(7, "tcp 10.2.0.0/16 any iface eth1", Action::Steer(0)),
    ];
    let cases = [
        ("tcp 192.0.2.1 -> 10.9.0.1:80", "eth0", RuleMatch::Steer(0)),
        ("tcp 0.0.0.0 -> 10.9.0.1:80", LOCAL, RuleMatch::Steer(1)),
        ("tcp 127.0.0.1 -> 10.9.0.1:80", LOCAL, RuleMatch::Steer(1)),
        ("tcp 192.0.2.1 -> 10.9.0.1:443", "eth0", RuleMatch::Steer(0)),
        ("tcp 198.51.100.1 -> 10.9.0.1:443", "eth0", RuleMatch::None),
        ("tcp 0.0.0.0 -> 10.9.0.1:443", LOCAL, RuleMatch::Steer(1)),
        ("tcp 192.0.2.1 -> 10.1.0.1:22", "eth1", RuleMatch::Steer(2)),
        ("tcp 0.0.0.0 -> 10.1.0.1:22", LOCAL, RuleMatch::Steer(2)),
        ("tcp 0.0.0.0 -> 10.2.0.1:22", LOCAL, RuleMatch::Bypass),
        ("tcp 192.0.2.1 -> 10.2.0.1:22", "eth1", RuleMatch::Steer(0)),
        ("tcp 192.0.2.1 -> 10.2.0.1:22", "eth0", RuleMatch::None),
    ];
    for (text, iface, expected) in cases {
        expect(&rules, text, iface, expected);
    }
    // Without local rules, forwarded cells stay final at the destination stage.
    let compiled = compile(&rules[..1], 0, &interfaces());
    assert!(compiled.src_v4.is_empty());
    let compiled = compile(&rules[..2], 0, &interfaces());
    assert!(compiled
        .src_v4
        .iter()
        .any(|(key, ..)| key.ifindex == LOCAL_ORIGIN_IFINDEX));
}

#[test]
fn a_local_rule_names_no_source_or_interface() {
    let with_src = rule(1, "tcp 0.0.0.0/0 80 src 192.0.2.0/24", Action::Bypass);
    let local = |mut rule: Rule| {
        rule.origin = Origin::Local;
        rule
    };
    assert!(check_origin(&with_src).is_ok());
    let error = check_origin(&local(with_src)).unwrap_err();
    assert!(error.contains("origin \"local\" with `src`"), "{error}");
    let with_iface = local(rule(1, "tcp 0.0.0.0/0 80 iface eth0", Action::Bypass));
    assert!(check_origin(&with_iface).unwrap_err().contains("`iface`"));
}

/// As [`expect`], for a local connection of a process in the selections of `selections`'s
/// bits.
fn expect_selected(rules: &[Rule], text: &str, selections: u32, expected: RuleMatch) {
    let packet = Packet {
        selections,
        ..packet(text, LOCAL)
    };
    assert_eq!(
        decide(rules, &packet),
        expected,
        "definition: {text} in {selections:#b}"
    );
    for generation in [0, 1] {
        let compiled = compile(rules, generation, &interfaces());
        assert_eq!(
            lookup(&compiled, generation, &packet, LOCAL_ORIGIN_IFINDEX),
            expected,
            "maps: {text} in {selections:#b}"
        );
    }
}

#[test]
fn each_local_rule_applies_to_its_own_selection_with_the_usual_precedence() {
    let selected = |number, text, action, selection| Rule {
        selection,
        ..rule(number, text, action)
    };
    let rules = [
        // A: cgroup /a.slice; B: uid 1000; C: every process.
        selected(1, "tcp 0.0.0.0/0 80 origin local", Action::Steer(0), 1),
        selected(2, "tcp 0.0.0.0/0 80 origin local", Action::Steer(1), 2),
        selected(3, "tcp 10.0.0.0/8 any origin local", Action::Bypass, 0),
        selected(4, "tcp 0.0.0.0/0 443 origin any", Action::Steer(1), 2),
    ];
    let web = "tcp 127.0.0.1 -> 192.0.2.1:80";
    expect_selected(&rules, web, 0b011, RuleMatch::Steer(0));
    expect_selected(&rules, web, 0b101, RuleMatch::Steer(1));
    // In both: rule 1 comes first.
    expect_selected(&rules, web, 0b111, RuleMatch::Steer(0));
    expect_selected(&rules, web, 0b001, RuleMatch::None);
    // The longer prefix of the rule for every process wins over both.
    let inside = "tcp 127.0.0.1 -> 10.1.2.3:80";
    for selections in [0b001, 0b011, 0b101, 0b111] {
        expect_selected(&rules, inside, selections, RuleMatch::Bypass);
    }
    // Rule 4 applies to arrivals, and of local connections only to selection 2's.
    let tls = "tcp 127.0.0.1 -> 192.0.2.1:443";
    expect_selected(&rules, tls, 0b101, RuleMatch::Steer(1));
    expect_selected(&rules, tls, 0b011, RuleMatch::None);
    expect(
        &rules,
        "tcp 192.0.2.9 -> 192.0.2.1:443",
        "eth0",
        RuleMatch::Steer(1),
    );
    expect(
        &rules,
        "tcp 192.0.2.9 -> 192.0.2.1:80",
        "eth0",
        RuleMatch::None,
    );
}

#[test]
fn a_forwarded_mark_rule_never_decides_a_local_connection() {
    let rules = [
        rule(1, "tcp 0.0.0.0/0 80 mark 0x0/0xff", Action::Bypass),
        rule(2, "tcp 0.0.0.0/0 80 origin any", Action::Steer(0)),
    ];
    let web = "tcp 192.0.2.9 -> 192.0.2.1:80";
    expect(&rules, web, "eth0", RuleMatch::Bypass);
    expect_selected(&rules, web, 0b001, RuleMatch::Steer(0));
}

/// A local rule's mark is the connecting socket's, tried under its selection only: v2rayA's
/// `-A TP_OUT -m mark --mark 0x80/0x80 -j RETURN` ahead of its steering.
#[test]
fn a_local_mark_rule_decides_its_selections_connections_by_the_sockets_mark() {
    let selected = |number, text, action, selection| Rule {
        selection,
        ..rule(number, text, action)
    };
    let rules = [
        selected(
            1,
            "tcp 0.0.0.0/0 any mark 0x80/0x80 origin local",
            Action::Bypass,
            1,
        ),
        selected(2, "tcp 0.0.0.0/0 any origin local", Action::Steer(0), 0),
        rule(3, "tcp 0.0.0.0/0 any mark 0x80/0x80", Action::Steer(1)),
    ];
    let marked = "tcp 127.0.0.1 -> 192.0.2.1:80 mark 0x80";
    let unmarked = "tcp 127.0.0.1 -> 192.0.2.1:80 mark 0x7f";
    expect_selected(&rules, marked, 0b011, RuleMatch::Bypass);
    expect_selected(&rules, unmarked, 0b011, RuleMatch::Steer(0));
    // Not in selection 1: rule 1 is not its, and the forwarded rule 3 never is.
    expect_selected(&rules, marked, 0b001, RuleMatch::Steer(0));
    expect(
        &rules,
        "tcp 192.0.2.9 -> 192.0.2.1:80 mark 0x80",
        "eth0",
        RuleMatch::Steer(1),
    );
    let compiled = compile(&rules, 0, &interfaces());
    assert_eq!(
        compiled
            .marks
            .iter()
            .map(|entry| entry.ifindex)
            .collect::<Vec<_>>(),
        [selection_ifindex(1), 0],
        "one entry under the selection's index, one for arrivals on any interface"
    );
}

/// As [`expect`], for a local connection whose route leaves by `route`.
fn expect_routed(rules: &[Rule], text: &str, route: Option<&str>, expected: RuleMatch) {
    // The selections of these tests all have every process.
    let packet = Packet {
        route,
        selections: u32::MAX,
        ..packet(text, LOCAL)
    };
    assert_eq!(
        decide(rules, &packet),
        expected,
        "definition: {text} via {route:?}"
    );
    for generation in [0, 1] {
        let compiled = compile(rules, generation, &interfaces());
        assert_eq!(
            lookup(&compiled, generation, &packet, LOCAL_ORIGIN_IFINDEX),
            expected,
            "maps: {text} via {route:?}"
        );
    }
}

/// sing-box's `oifname != "eth0" accept` ahead of its output chain's steering: the steer
/// rules take only connections whose route leaves by eth0, with the usual precedence. Each
/// out_interface is a selection of its own, with every process (see
/// `LocalOrigin::out_interface`).
#[test]
fn an_out_interface_narrows_a_local_rule_to_the_routes_by_that_interface() {
    let via = |number, text, action, selection| Rule {
        selection,
        ..rule(number, text, action)
    };
    let rules = [
        via(
            1,
            "tcp 0.0.0.0/0 any out_interface eth0 origin local",
            Action::Steer(0),
            1,
        ),
        rule(2, "tcp 10.0.0.0/8 any origin local", Action::Bypass),
        via(
            3,
            "tcp 0.0.0.0/0 443 out_interface wg* origin local",
            Action::Steer(1),
            2,
        ),
        rule(4, "tcp 0.0.0.0/0 any", Action::Steer(2)),
        via(
            5,
            "udp 0.0.0.0/0 53 out_interface eth0 origin local",
            Action::Steer(0),
            1,
        ),
    ];
    let public = "tcp 0.0.0.0 -> 192.0.2.1:80";
    expect_routed(&rules, public, Some("eth0"), RuleMatch::Steer(0));
    expect_routed(&rules, public, Some("eth1"), RuleMatch::None);
    expect_routed(&rules, public, Some("lo"), RuleMatch::None);
    expect_routed(&rules, public, None, RuleMatch::None);
    expect_routed(
        &rules,
        "tcp 0.0.0.0 -> 10.1.1.1:80",
        Some("eth0"),
        RuleMatch::Bypass,
    );
    // Port 443's single port outranks rule 1's any port, by its own interface only.
    let https = "tcp 0.0.0.0 -> 192.0.2.1:443";
    expect_routed(&rules, https, Some("wg0"), RuleMatch::Steer(1));
    expect_routed(&rules, https, Some("eth0"), RuleMatch::Steer(0));
    let dns = "udp 0.0.0.0 -> 192.0.2.1:53";
    expect_routed(&rules, dns, Some("eth0"), RuleMatch::Steer(0));
    expect_routed(&rules, dns, Some("wg0"), RuleMatch::None);
    // Arrivals never have their route looked at.
    expect(
        &rules,
        "tcp 198.51.100.1 -> 192.0.2.1:80",
        "eth0",
        RuleMatch::Steer(2),
    );
    let compiled = compile(&rules, 0, &interfaces());
    assert_eq!(compiled.out_interfaces, ["eth0", "wg*"]);
    assert!(compiled.marks.is_empty(), "looked up in the stages");
    assert_eq!(compiled.selection_routes[..3], [0, 0b01, 0b10]);
    let next = compile(&rules, 1, &interfaces());
    assert_eq!(
        next.selection_routes[..3],
        [0, 0b01 << 8, 0b10 << 8],
        "the other generation's byte"
    );
    assert_eq!(route_bits(&compiled.out_interfaces, "wg1"), 0b10);
    assert_eq!(route_bits(&compiled.out_interfaces, "eth0"), 0b01);
    assert_eq!(route_bits(&compiled.out_interfaces, "lo"), 0);
}

#[test]
fn an_out_interface_is_for_local_rules_and_a_name_an_interface_can_have() {
    let with = |text: &str, origin| Rule {
        origin,
        ..rule(1, text, Action::Steer(0))
    };
    assert!(check_origin(&with("tcp 0.0.0.0/0 80 out_interface eth0", Origin::Local)).is_ok());
    for origin in [Origin::Forwarded, Origin::Any] {
        let error = check_origin(&with("tcp 0.0.0.0/0 80 out_interface eth0", origin)).unwrap_err();
        assert!(
            error.contains("known for local connections only"),
            "{error}"
        );
    }
    let error = check_origin(&with(
        "tcp 0.0.0.0/0 80 out_interface a-name-far-too-long",
        Origin::Local,
    ))
    .unwrap_err();
    assert!(error.contains("is not an interface name"), "{error}");
}

#[test]
fn rules_for_other_protocols_decide_by_address_and_interface_apart_from_tcp_and_udp() {
    let rules = [
        rule(1, "other 10.0.0.0/8 any", Action::Bypass),
        rule(2, "other 10.1.0.0/16 any src 192.0.2.0/24", Action::Drop),
        rule(3, "tcp 10.1.0.0/16 any", Action::Steer(0)),
        rule(4, "other 0.0.0.0/0 any iface eth1", Action::Drop),
        rule(5, "other 2001:db8::/32 any", Action::Drop),
        // Never asked about other protocols: it keeps no guard off, and adds nothing.
        rule(6, "udp 0.0.0.0/0 53 ct original", Action::Steer(1)),
    ];
    expect(
        &rules,
        "other 192.0.2.1 -> 10.1.2.3:0",
        "eth0",
        RuleMatch::Drop,
    );
    expect(
        &rules,
        "other 198.51.100.1 -> 10.1.2.3:0",
        "eth0",
        RuleMatch::Bypass,
    );
    expect(
        &rules,
        "other 192.0.2.1 -> 10.2.0.1:0",
        "eth1",
        RuleMatch::Bypass,
    );
    expect(
        &rules,
        "other 192.0.2.1 -> 203.0.113.1:0",
        "eth1",
        RuleMatch::Drop,
    );
    expect(
        &rules,
        "other 192.0.2.1 -> 203.0.113.1:0",
        "eth0",
        RuleMatch::None,
    );
    expect(
        &rules,
        "other 2001:db8:1::1 -> [2001:db8::1]:0",
        "eth0",
        RuleMatch::Drop,
    );
    // TCP and UDP see only their own rules.
    expect(
        &rules,
        "tcp 192.0.2.1 -> 10.1.2.3:80",
        "eth0",
        RuleMatch::Steer(0),
    );
    expect(
        &rules,
        "udp 192.0.2.1 -> 10.1.2.3:80",
        "eth0",
        RuleMatch::None,
    );
    expect(
        &rules,
        "udp 192.0.2.1 -> 203.0.113.1:53",
        "eth1",
        RuleMatch::Steer(1),
    );
    expect(
        &rules,
        "udp 192.0.2.1 -> 203.0.113.1:53 ct reply",
        "eth1",
        RuleMatch::None,
    );
    let compiled = compile(&rules, 0, &interfaces());
    assert!(compiled.marks.len() <= 2, "{:?}", compiled.marks);
}

#[test]
fn a_rule_for_other_protocols_refuses_what_only_tcp_and_udp_have() {
    for (text, action, refused) in [
        ("other 10.0.0.0/8 any", Action::Steer(0), "action \"steer\""),
        (
            "other 10.0.0.0/8 any",
            Action::Deliver,
            "action \"deliver\"",
        ),
        ("other 10.0.0.0/8 80", Action::Drop, "`ports`"),
        ("other 10.0.0.0/8 any sport 53", Action::Drop, "`sport`"),
        ("other 10.0.0.0/8 any mark 0x10", Action::Drop, "`mark`"),
        (
            "other 10.0.0.0/8 any ct original",
            Action::Drop,
            "`ct_direction`",
        ),
        (
            "other 10.0.0.0/8 any origin any",
            Action::Bypass,
            "origin \"any\"",
        ),
    ] {
        let error = check_protocol(&rule(1, text, action)).unwrap_err();
        assert!(error.contains(refused), "{text}: {error}");
    }
    assert_eq!(
        check_protocol(&rule(
            1,
            "other 10.0.0.0/8 any iface eth0 src 192.0.2.0/24",
            Action::Drop
        )),
        Ok(())
    );
    assert_eq!(
        check_protocol(&rule(1, "tcp 10.0.0.0/8 80 mark 0x10", Action::Steer(0))),
        Ok(())
    );
}
