//! The rule model and its compilation into the eBPF program's lookup maps.
//!
//! A rule matches on transport, destination prefix, destination port (one, a range, or any),
//! and optionally source prefix and ingress interface. The rule that decides a packet is the
//! first in this order among those that match it:
//!
//! 1. the longest destination prefix;
//! 2. then a single port before a range, and a range before any port;
//! 3. then the rule that comes first in the configuration.
//!
//! (Rules left over from an earlier configuration, kept so that their established flows
//! survive a reload, come after all current ones; see [`Rule::retired`].)
//!
//! The program cannot loop over rules, so the precedence is resolved here, ahead of time,
//! into lookups whose number does not depend on the number of rules. A packet's candidate
//! rules fall into three groups by their port spec: the single-port rules for its port, the
//! range rules of its port's range class (ports inside the same ranges share a class), and
//! the any-port rules. Each group is answered on its own, and the answer with the best rank
//! (the rule's place in the precedence) wins:
//!
//! 1. port array: which groups exist for the packet's transport and port (one lookup, and
//!    the only one for a port no rule mentions);
//! 2. per group, destination: a longest-prefix match on (group, destination). Its longest
//!    match is the longest destination prefix any of the group's rules has for the packet,
//!    so the group's rules that can match are exactly the ones whose prefix contains it: the
//!    "cell". When none of them looks at the source or interface, the cell's verdict is
//!    final;
//! 3. otherwise, source: a longest-prefix match on (cell, ifindex, source) whose entries hold
//!    the first of the cell's rules matching each source prefix.
//!
//! Keeping the groups apart means a rule is written into one group only: thousands of
//! single-port rules next to thousands of any-port or range prefixes cost their sum in map
//! entries, not their product.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
};

use ipnet::IpNet;
#[cfg(any(test, feature = "fuzzing"))]
use tproxy_common::decision::RuleMatch;
use tproxy_common::maps::{
    any_port_class, range_class, single_port_class, DstKey, SrcKey, Verdict, GENERATION_BIT,
    PORT_HAS_ANY, PORT_HAS_SINGLE, VERDICT_BYPASS, VERDICT_BY_SOURCE, VERDICT_BY_SOURCE_AND_IFACE,
    VERDICT_STEER,
};

pub use crate::relay::listener::Transport;

/// Which destination ports a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ports {
    One(u16),
    Range(u16, u16),
    Any,
}

impl Ports {
    /// Rank in the precedence: lower wins.
    fn specificity(self) -> u8 {
        match self {
            Ports::One(_) => 0,
            Ports::Range(..) => 1,
            Ports::Any => 2,
        }
    }

    #[cfg(any(test, feature = "fuzzing"))]
    fn contains(self, port: u16) -> bool {
        match self {
            Ports::One(p) => p == port,
            Ports::Range(first, last) => (first..=last).contains(&port),
            Ports::Any => port != 0,
        }
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ports::One(port) => write!(f, "{port}"),
            Ports::Range(first, last) => write!(f, "{first}-{last}"),
            Ports::Any => f.write_str("any"),
        }
    }
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Hand new flows to the listener with this index.
    Steer(u32),
    /// Leave the packet alone (unless a socket already owns its flow).
    Bypass,
}

/// One rule with a single transport, destination prefix and port spec: a configured rule
/// with lists becomes several of these, all with its number.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub transport: Transport,
    pub dst: IpNet,
    pub ports: Ports,
    pub src: Option<IpNet>,
    pub iface: Option<String>,
    pub action: Action,
    /// The rule's number in its configuration (1-based), the last tie-breaker.
    pub number: usize,
    /// A steer rule of an earlier configuration that a reload dropped. It only lets flows
    /// that already have a socket keep it (like `bypass`), so that a reload does not cut them,
    /// and it comes after every current rule.
    pub retired: bool,
}

/// A rule's place in the precedence: lower wins.
type Precedence = (bool, Reverse<u8>, u8, usize);

/// Most rules a configuration may have: rule numbers take 21 bits of a rank.
pub const MAX_RULES: usize = (1 << 21) - 1;

impl Rule {
    fn precedence(&self) -> Precedence {
        (
            self.retired,
            Reverse(self.dst.prefix_len()),
            self.ports.specificity(),
            self.number,
        )
    }

    /// The precedence as one number for the program to compare (lower wins): retired, then
    /// the inverted prefix length, the port specificity, and the rule number.
    fn rank(&self) -> u32 {
        (u32::from(self.retired) << 31)
            | (u32::from(128 - self.dst.prefix_len()) << 23)
            | (u32::from(self.ports.specificity()) << 21)
            | (self.number.min(MAX_RULES) as u32)
    }

    fn verdict(&self) -> Verdict {
        let rank = self.rank();
        match self.action {
            Action::Steer(listener) if !self.retired => Verdict {
                action: VERDICT_STEER,
                listener,
                cell: 0,
                rank,
            },
            _ => Verdict {
                action: VERDICT_BYPASS,
                rank,
                ..Verdict::default()
            },
        }
    }

    #[cfg(any(test, feature = "fuzzing"))]
    fn matches_source(&self, src: &IpNet, iface: Option<&str>) -> bool {
        let src_ok = self.src.is_none_or(|own| own.contains(src));
        let iface_ok = match (&self.iface, iface) {
            (None, _) => true,
            (Some(own), Some(iface)) => own == iface,
            (Some(_), None) => false,
        };
        src_ok && iface_ok
    }

    /// What the rule matches, without what it does: rules with equal keys match the same
    /// packets.
    fn match_key(&self) -> (Transport, IpNet, Ports, Option<IpNet>, Option<&str>) {
        (
            self.transport,
            self.dst,
            self.ports,
            self.src,
            self.iface.as_deref(),
        )
    }

    fn is_unconditional(&self) -> bool {
        self.src.is_none() && self.iface.is_none()
    }

    /// The match as the program would report it (retired rules behave as bypass).
    #[cfg(any(test, feature = "fuzzing"))]
    fn rule_match(&self) -> RuleMatch {
        match self.action {
            Action::Steer(listener) if !self.retired => RuleMatch::Steer(listener),
            _ => RuleMatch::Bypass,
        }
    }
}

/// An LPM trie entry: key, its prefix length in bits, value.
pub type Entry<K> = (K, u32, Verdict);

/// One generation of the rule maps' contents.
#[derive(Debug, Default)]
pub struct CompiledRules {
    /// Port classes, TCP ports then UDP ports (`udp * 65536 + port`).
    pub port_classes: Vec<u32>,
    pub dst_v4: Vec<Entry<DstKey<4>>>,
    pub dst_v6: Vec<Entry<DstKey<16>>>,
    pub src_v4: Vec<Entry<SrcKey<4>>>,
    pub src_v6: Vec<Entry<SrcKey<16>>>,
}

impl CompiledRules {
    /// The most entries any one LPM map needs for this generation.
    pub fn largest_map(&self) -> usize {
        [
            self.dst_v4.len(),
            self.dst_v6.len(),
            self.src_v4.len(),
            self.src_v6.len(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    /// Number of rule groups (single-port, range class, any-port) with entries.
    pub fn groups(&self) -> usize {
        let v4 = self.dst_v4.iter().map(|(key, ..)| key.class);
        let v6 = self.dst_v6.iter().map(|(key, ..)| key.class);
        v4.chain(v6).collect::<BTreeSet<_>>().len()
    }
}

/// The interfaces the program is attached to, by name and ifindex: rules naming an interface
/// get one source-stage entry set per attached interface.
pub type Interfaces<'a> = &'a [(String, u32)];

/// Compiles `rules` into the map contents of `generation` (0 or 1).
pub fn compile(rules: &[Rule], generation: u32, interfaces: Interfaces<'_>) -> CompiledRules {
    let generation_bit = if generation & 1 == 1 {
        GENERATION_BIT
    } else {
        0
    };
    let mut compiled = CompiledRules {
        port_classes: vec![0; 2 * 65536],
        ..CompiledRules::default()
    };
    let mut next_range_class = 1u32;
    let mut cells = CellBuilder {
        generation_bit,
        next_cell: 1,
        interfaces,
    };
    for transport in [Transport::Tcp, Transport::Udp] {
        let udp = transport == Transport::Udp;
        let offset = usize::from(udp) * 65536;
        let rules: Vec<&Rule> = rules.iter().filter(|r| r.transport == transport).collect();
        let mut singles: BTreeMap<u16, Vec<&Rule>> = BTreeMap::new();
        let mut ranges: Vec<&Rule> = Vec::new();
        let mut any: Vec<&Rule> = Vec::new();
        for rule in rules {
            match rule.ports {
                Ports::One(port) => singles.entry(port).or_default().push(rule),
                Ports::Range(..) => ranges.push(rule),
                Ports::Any => any.push(rule),
            }
        }
        let mut groups: Vec<(u32, Vec<&Rule>)> = Vec::new();
        for (port, members) in singles {
            compiled.port_classes[offset + usize::from(port)] |= PORT_HAS_SINGLE;
            groups.push((single_port_class(generation, udp, port), members));
        }
        for (ports, members) in port_classes(&ranges) {
            let class = next_range_class;
            next_range_class += 1;
            for port in ports {
                compiled.port_classes[offset + usize::from(port)] |= class;
            }
            let members = members.iter().map(|&i| ranges[i]).collect();
            groups.push((range_class(generation, class), members));
        }
        if !any.is_empty() {
            for port in 1..=65535usize {
                compiled.port_classes[offset + port] |= PORT_HAS_ANY;
            }
            groups.push((any_port_class(generation, udp), any));
        }
        for (class, members) in groups {
            for (dst, verdict, sources) in cells.destinations(&members) {
                compiled.push(class, dst, verdict, sources);
            }
        }
    }
    compiled
}

impl CompiledRules {
    fn push(&mut self, class: u32, dst: IpNet, verdict: Verdict, sources: Vec<SourceEntry>) {
        let dst_len = u32::from(dst.prefix_len());
        match dst {
            IpNet::V4(net) => {
                let key = DstKey {
                    class,
                    addr: net.addr().octets(),
                };
                self.dst_v4
                    .push((key, DstKey::<4>::prefix_len(dst_len), verdict));
            }
            IpNet::V6(net) => {
                let key = DstKey {
                    class,
                    addr: net.addr().octets(),
                };
                self.dst_v6
                    .push((key, DstKey::<16>::prefix_len(dst_len), verdict));
            }
        }
        for (cell, ifindex, src, verdict) in sources {
            let src_len = u32::from(src.prefix_len());
            match (dst, src) {
                (IpNet::V4(_), IpNet::V4(src)) => {
                    let key = SrcKey {
                        cell,
                        ifindex,
                        addr: src.addr().octets(),
                    };
                    self.src_v4
                        .push((key, SrcKey::<4>::prefix_len(src_len), verdict));
                }
                (IpNet::V6(_), IpNet::V6(src)) => {
                    let key = SrcKey {
                        cell,
                        ifindex,
                        addr: src.addr().octets(),
                    };
                    self.src_v6
                        .push((key, SrcKey::<16>::prefix_len(src_len), verdict));
                }
                _ => {}
            }
        }
    }
}

/// Groups ports by the set of rules (indices into `rules`) that match them; ports no rule
/// matches are left out.
fn port_classes(rules: &[&Rule]) -> Vec<(Vec<u16>, Vec<usize>)> {
    // Sweep the port space: the matching set only changes where a port spec starts or ends.
    let mut starts: HashMap<u32, Vec<usize>> = HashMap::new();
    let mut ends: HashMap<u32, Vec<usize>> = HashMap::new();
    let mut boundaries = BTreeSet::from([1u32, 65536]);
    for (i, rule) in rules.iter().enumerate() {
        let (first, last) = match rule.ports {
            Ports::One(port) => (port, port),
            Ports::Range(first, last) => (first, last),
            Ports::Any => (1, 65535),
        };
        let (first, end) = (u32::from(first), u32::from(last) + 1);
        starts.entry(first).or_default().push(i);
        ends.entry(end).or_default().push(i);
        boundaries.extend([first, end]);
    }
    let mut by_members: HashMap<Vec<usize>, Vec<u16>> = HashMap::new();
    let mut order: Vec<Vec<usize>> = Vec::new();
    let mut active = BTreeSet::new();
    let boundaries: Vec<u32> = boundaries.into_iter().collect();
    for window in boundaries.windows(2) {
        let (from, to) = (window[0], window[1]);
        for i in ends.get(&from).into_iter().flatten() {
            active.remove(i);
        }
        active.extend(starts.get(&from).into_iter().flatten());
        if active.is_empty() {
            continue;
        }
        let members: Vec<usize> = active.iter().copied().collect();
        let ports = by_members.entry(members.clone()).or_insert_with(|| {
            order.push(members);
            Vec::new()
        });
        ports.extend((from..to).map(|p| p as u16));
    }
    order
        .into_iter()
        .map(|members| {
            let ports = by_members.remove(&members).unwrap_or_default();
            (ports, members)
        })
        .collect()
}

/// A source-stage entry: cell, ifindex, source prefix, verdict.
type SourceEntry = (u32, u32, IpNet, Verdict);

struct CellBuilder<'a> {
    generation_bit: u32,
    next_cell: u32,
    interfaces: Interfaces<'a>,
}

impl CellBuilder<'_> {
    /// For each destination prefix of a port class's rules: its verdict, and the source
    /// stage's entries when the verdict depends on the source.
    fn destinations(&mut self, rules: &[&Rule]) -> Vec<(IpNet, Verdict, Vec<SourceEntry>)> {
        let mut by_dst: HashMap<IpNet, Vec<&Rule>> = HashMap::new();
        for rule in rules {
            by_dst.entry(rule.dst).or_default().push(rule);
        }
        let mut dsts: Vec<IpNet> = by_dst.keys().copied().collect();
        dsts.sort();
        dsts.into_iter()
            .map(|dst| {
                // The rules that match an address whose longest match is `dst` are those whose
                // prefix is `dst` or contains it.
                let mut candidates: Vec<&Rule> = (0..=dst.prefix_len())
                    .filter_map(|len| truncated(dst, len))
                    .filter_map(|ancestor| by_dst.get(&ancestor))
                    .flatten()
                    .copied()
                    .collect();
                candidates.sort_by_key(|rule| rule.precedence());
                if let Some(first) = candidates.iter().position(|r| r.is_unconditional()) {
                    // Nothing after a rule that always matches can win.
                    candidates.truncate(first + 1);
                }
                let (verdict, sources) = self.cell(&candidates);
                (dst, verdict, sources)
            })
            .collect()
    }

    fn cell(&mut self, candidates: &[&Rule]) -> (Verdict, Vec<SourceEntry>) {
        match candidates {
            [only] if only.is_unconditional() => return (only.verdict(), Vec::new()),
            [first, ..] if first.is_unconditional() => return (first.verdict(), Vec::new()),
            _ => {}
        }
        let cell = self.generation_bit | self.next_cell;
        self.next_cell += 1;
        let by_iface = candidates.iter().any(|r| r.iface.is_some());
        let interfaces: Vec<(Option<&str>, u32)> = if by_iface {
            self.interfaces
                .iter()
                .map(|(name, index)| (Some(name.as_str()), *index))
                .collect()
        } else {
            vec![(None, 0)]
        };
        let mut sources: BTreeSet<IpNet> = candidates.iter().filter_map(|r| r.src).collect();
        sources.insert(IpNet::V4(Default::default()));
        sources.insert(IpNet::V6(Default::default()));
        // A source's winner is the first candidate whose own source is absent or contains
        // it, with no interface or the one at hand: looking up each of the source's prefixes
        // here instead of scanning the candidates keeps thousands of source rules linear.
        let mut first: HashMap<(Option<IpNet>, Option<&str>), usize> = HashMap::new();
        for (index, rule) in candidates.iter().enumerate() {
            let key = (rule.src.map(|own| own.trunc()), rule.iface.as_deref());
            first.entry(key).or_insert(index);
        }
        let mut entries = Vec::new();
        for (iface, ifindex) in interfaces {
            for src in &sources {
                let containing = (0..=src.prefix_len())
                    .filter_map(|len| truncated(*src, len))
                    .map(Some)
                    .chain([None]);
                let winner = containing
                    .flat_map(|own| [(own, None), (own, iface)])
                    .filter_map(|key| first.get(&key))
                    .min();
                let verdict = winner.map_or(Verdict::default(), |&i| candidates[i].verdict());
                entries.push((cell, ifindex, *src, verdict));
            }
        }
        let action = if by_iface {
            VERDICT_BY_SOURCE_AND_IFACE
        } else {
            VERDICT_BY_SOURCE
        };
        let verdict = Verdict {
            action,
            listener: 0,
            cell,
            rank: 0,
        };
        (verdict, entries)
    }
}

fn same_family(a: IpNet, b: IpNet) -> bool {
    matches!(
        (a, b),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    )
}

fn truncated(net: IpNet, len: u8) -> Option<IpNet> {
    IpNet::new(net.addr(), len).ok().map(|n| n.trunc())
}

/// A packet as the rules see it.
#[cfg(any(test, feature = "fuzzing"))]
#[derive(Clone, Debug)]
pub struct Packet<'a> {
    pub transport: Transport,
    pub src: std::net::IpAddr,
    pub dst: std::net::IpAddr,
    pub port: u16,
    pub iface: &'a str,
}

/// The decision for `packet` by the definition: the first matching rule in precedence order.
/// The compiled maps must agree with this; the tests check that they do.
#[cfg(any(test, feature = "fuzzing"))]
pub fn decide(rules: &[Rule], packet: &Packet<'_>) -> RuleMatch {
    let src = IpNet::from(packet.src);
    let dst = IpNet::from(packet.dst);
    rules
        .iter()
        .filter(|r| {
            r.transport == packet.transport
                && r.ports.contains(packet.port)
                && r.dst.contains(&dst)
                && r.matches_source(&src, Some(packet.iface))
        })
        .min_by_key(|r| r.precedence())
        .map_or(RuleMatch::None, Rule::rule_match)
}

/// Checks the configured rules' invariants that the compiler relies on.
pub fn check_families(rule: &Rule) -> Result<(), String> {
    match rule.src {
        Some(src) if !same_family(src, rule.dst) => Err(format!(
            "source {src} and destination {} are of different address families",
            rule.dst
        )),
        _ => Ok(()),
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let transport = match self.transport {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        };
        write!(f, "{transport} dst {} port {}", self.dst, self.ports)?;
        if let Some(src) = self.src {
            write!(f, " src {src}")?;
        }
        if let Some(iface) = &self.iface {
            write!(f, " iface {iface}")?;
        }
        Ok(())
    }
}

/// The `candidates` (in order) that match what no rule of `new` and no earlier candidate
/// matches, marked retired: a reload keeps them so that their established flows survive.
pub fn retire<'a>(candidates: impl IntoIterator<Item = &'a Rule>, new: &[Rule]) -> Vec<Rule> {
    let mut matched: HashSet<_> = new.iter().map(Rule::match_key).collect();
    candidates
        .into_iter()
        .filter(|rule| matched.insert(rule.match_key()))
        .map(|rule| Rule {
            retired: true,
            ..rule.clone()
        })
        .collect()
}

/// The rules in the order they are consulted, for `tproxy check`.
pub fn by_precedence(rules: &[Rule]) -> Vec<&Rule> {
    let mut sorted: Vec<&Rule> = rules.iter().collect();
    sorted.sort_by_key(|r| (r.dst.addr().is_ipv6(), r.precedence()));
    sorted
}

/// What the compiled maps say for `packet`, looked up the way the eBPF program does.
#[cfg(any(test, feature = "fuzzing"))]
pub fn lookup(
    compiled: &CompiledRules,
    generation: u32,
    packet: &Packet<'_>,
    ifindex: u32,
) -> RuleMatch {
    use tproxy_common::{
        decision::{outranks, rule_match, source_stage_ifindex},
        maps::PORT_RANGE_CLASS,
    };
    let udp = packet.transport == Transport::Udp;
    let entry = compiled.port_classes[usize::from(udp) * 65536 + usize::from(packet.port)];
    let mut classes = Vec::new();
    if entry & PORT_HAS_SINGLE != 0 {
        classes.push(single_port_class(generation, udp, packet.port));
    }
    if entry & PORT_RANGE_CLASS != 0 {
        classes.push(range_class(generation, entry & PORT_RANGE_CLASS));
    }
    if entry & PORT_HAS_ANY != 0 {
        classes.push(any_port_class(generation, udp));
    }
    fn longest<K, const N: usize>(
        entries: &[Entry<K>],
        fixed: impl Fn(&K) -> bool,
        addr: impl Fn(&K) -> [u8; N],
        fixed_bits: u32,
        target: [u8; N],
    ) -> Option<Verdict> {
        let bits = |bytes: &[u8; N], len: u32| -> Vec<bool> {
            (0..len as usize)
                .map(|i| bytes[i / 8] & (0x80 >> (i % 8)) != 0)
                .collect()
        };
        entries
            .iter()
            .filter(|(key, len, _)| {
                let len = len - fixed_bits;
                fixed(key) && bits(&addr(key), len) == bits(&target, len)
            })
            .max_by_key(|(_, len, _)| *len)
            .map(|(_, _, verdict)| *verdict)
    }
    let mut best = Verdict::default();
    for class in classes {
        let verdict = match packet.dst {
            std::net::IpAddr::V4(dst) => longest(
                &compiled.dst_v4,
                |k| k.class == class,
                |k| k.addr,
                32,
                dst.octets(),
            ),
            std::net::IpAddr::V6(dst) => longest(
                &compiled.dst_v6,
                |k| k.class == class,
                |k| k.addr,
                32,
                dst.octets(),
            ),
        };
        let Some(mut verdict) = verdict else { continue };
        if let Some(key_ifindex) = source_stage_ifindex(&verdict, ifindex) {
            let fixed = |cell: u32, index: u32| cell == verdict.cell && index == key_ifindex;
            let found = match packet.src {
                std::net::IpAddr::V4(src) => longest(
                    &compiled.src_v4,
                    |k| fixed(k.cell, k.ifindex),
                    |k| k.addr,
                    64,
                    src.octets(),
                ),
                std::net::IpAddr::V6(src) => longest(
                    &compiled.src_v6,
                    |k| fixed(k.cell, k.ifindex),
                    |k| k.addr,
                    64,
                    src.octets(),
                ),
            };
            verdict = found.unwrap_or_default();
        }
        if outranks(&verdict, &best) {
            best = verdict;
        }
    }
    rule_match(&best)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IFACES: &[(&str, u32)] = &[("eth0", 2), ("eth1", 3)];

    fn interfaces() -> Vec<(String, u32)> {
        IFACES.iter().map(|(n, i)| (n.to_string(), *i)).collect()
    }

    fn rule(number: usize, text: &str, action: Action) -> Rule {
        // "tcp 10.0.0.0/8 80 [src PREFIX] [iface IF]"
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
            transport: if words[0] == "tcp" {
                Transport::Tcp
            } else {
                Transport::Udp
            },
            dst: words[1].parse().unwrap(),
            ports,
            src: None,
            iface: None,
            action,
            number,
            retired: false,
        };
        for pair in words[3..].chunks(2) {
            match pair[0] {
                "src" => rule.src = Some(pair[1].parse().unwrap()),
                "iface" => rule.iface = Some(pair[1].to_string()),
                other => panic!("{other}"),
            }
        }
        rule
    }

    fn packet<'a>(text: &str, iface: &'a str) -> Packet<'a> {
        // "tcp SRC -> DST:PORT"
        let words: Vec<&str> = text.split_whitespace().collect();
        let dst: std::net::SocketAddr = words[3].parse().unwrap();
        Packet {
            transport: if words[0] == "tcp" {
                Transport::Tcp
            } else {
                Transport::Udp
            },
            src: words[1].parse().unwrap(),
            dst: dst.ip(),
            port: dst.port(),
            iface,
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
            let ifindex = IFACES.iter().find(|(n, _)| *n == iface).unwrap().1;
            assert_eq!(
                lookup(&compiled, generation, &packet, ifindex),
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
        let mut retired: Vec<Rule> = Vec::new();
        for rule in candidates {
            if !new
                .iter()
                .chain(&retired)
                .any(|other| other.match_key() == rule.match_key())
            {
                retired.push(Rule {
                    retired: true,
                    ..rule.clone()
                });
            }
        }
        retired
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
            if next(3) == 0 {
                text += &format!(" iface {}", IFACES[next(2) as usize].0);
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
                        text += &format!(" iface {}", IFACES[next(2) as usize].0);
                    }
                    let action = if next(3) == 0 {
                        Action::Bypass
                    } else {
                        Action::Steer(next(3) as u32)
                    };
                    let mut rule = rule(i + 1, &text, action);
                    rule.retired = next(10) == 0;
                    rule
                })
                .collect();
            let compiled = compile(&rules, round % 2, &interfaces());
            for _ in 0..40 {
                let text = format!(
                    "{} {} -> {}:{}",
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
                );
                let (iface, ifindex) = IFACES[next(2) as usize];
                let packet = packet(&text, iface);
                assert_eq!(
                    lookup(&compiled, round % 2, &packet, ifindex),
                    decide(&rules, &packet),
                    "{text} on {iface} with rules {rules:#?}"
                );
            }
        }
    }
}
