//! The rule set compiled into the contents of the program's lookup maps (see the parent
//! module for the lookup stages), and the host-side oracle that reads them back.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
};

use ipnet::IpNet;
#[cfg(any(test, feature = "fuzzing"))]
use tproxy_common::decision::RuleMatch;
use tproxy_common::maps::{
    any_port_class, other_protocols_class, range_class, single_port_class, DstKey, MarkRule,
    MarkRules, SrcKey, Verdict, GENERATION_BIT, MARK_RULE_TCP, MARK_RULE_UDP, MAX_MARK_RULES,
    PORT_HAS_ANY, PORT_HAS_SINGLE, VERDICT_BY_SOURCE, VERDICT_BY_SOURCE_AND_IFACE, VERDICT_PASS,
};

#[cfg(any(test, feature = "fuzzing"))]
use super::Packet;
use super::{any_local, truncated, CtDirection, Origin, Ports, Protocol, Rule};
use crate::datapath::interfaces;
use tproxy_common::local_origin::{
    route_bits_shift, selection_ifindex, LOCAL_ORIGIN_IFINDEX, MAX_SELECTIONS,
};

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
    /// The mark stage's entries (see [`mark_rules`]).
    pub marks: Vec<MarkRule>,
    /// The rules' `out_interface` names and patterns, in the order of their bits.
    pub out_interfaces: Vec<String>,
    /// Per selection, the bit of its rules' `out_interface` (see
    /// `MarkRules::selection_routes`).
    pub selection_routes: [u32; MAX_SELECTIONS],
    /// Who has to know a packet's direction (see [`Rule::ct_asked`]).
    pub ct_asked: u32,
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

    /// The mark stage's table for the program, or why the rules do not fit in it.
    pub fn mark_table(&self) -> Result<MarkRules, String> {
        if self.marks.len() > MAX_MARK_RULES {
            return Err(format!(
                "the rules with a mark, a source port or a connection's direction need {} entries (one per destination \
                 and source prefix and port spec), more than the {MAX_MARK_RULES} the program \
                 holds",
                self.marks.len()
            ));
        }
        let mut table = MarkRules {
            len: self.marks.len() as u32,
            ct_direction: self.ct_asked,
            selection_routes: self.selection_routes,
            ..MarkRules::default()
        };
        table.rules[..self.marks.len()].copy_from_slice(&self.marks);
        Ok(table)
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
    // Of the rules as configured: the guard that takes the question off them asks it.
    let asked = rules.iter().fold(0, |asked, rule| asked | rule.ct_asked());
    let guard = DirectionGuard::of(rules);
    let rules = &guard.apply(rules)[..];
    let marks = mark_stage(&guard, rules, interfaces);
    let out_interfaces = super::out_interfaces(rules);
    let generation_bit = if generation & 1 == 1 {
        GENERATION_BIT
    } else {
        0
    };
    let mut compiled = CompiledRules {
        port_classes: vec![0; 2 * 65536],
        marks,
        selection_routes: selection_routes(rules, &out_interfaces, generation),
        out_interfaces,
        ct_asked: asked,
        ..CompiledRules::default()
    };
    let mut next_range_class = 1u32;
    let mut cells = CellBuilder {
        generation_bit,
        next_cell: 1,
        interfaces,
        local: any_local(rules),
        selections: rules
            .iter()
            .filter(|rule| rule.origin.local())
            .map(|rule| rule.selection + 1)
            .max()
            .unwrap_or(0),
    };
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let udp = protocol == Protocol::Udp;
        let offset = usize::from(udp) * 65536;
        let rules: Vec<&Rule> = rules
            .iter()
            .filter(|r| r.protocol == protocol && !r.tried_one_by_one())
            .collect();
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
    // No ports, so one group; never tried one by one (`check_protocol`).
    let others: Vec<&Rule> = rules
        .iter()
        .filter(|r| r.protocol == Protocol::Other)
        .collect();
    for (dst, verdict, sources) in cells.destinations(&others) {
        compiled.push(other_protocols_class(generation), dst, verdict, sources);
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

/// The mark stage's entries for the rules that have a mark or a source port: one per rule and
/// interface it
/// names (a pattern names every attached interface it matches), except that rules alike but
/// for their transport share one. A rule whose interface is not attached keeps an entry, with
/// an ifindex no interface has, so that a name's count does not depend on what is attached.
/// A rule for local connections has one more, under its selection's index, where the
/// connect and sendmsg programs try it.
/// (With the direction guard's own first, see [`DirectionGuard`].)
pub fn mark_rules(rules: &[Rule], interfaces: Interfaces<'_>) -> Vec<MarkRule> {
    let guard = DirectionGuard::of(rules);
    mark_stage(&guard, &guard.apply(rules), interfaces)
}

/// Who needs the mark stage's entries, under the guard of the whole set.
pub struct MarkEntries {
    /// Each rule's (by number, those that need some).
    pub by_rule: BTreeMap<usize, usize>,
    /// The direction guard's own.
    pub guard: usize,
    /// The rules that keep the guard off: of an origin where other rules ask for the
    /// original direction, they do not.
    pub keep_guard_off: Vec<usize>,
}

/// See [`MarkEntries`].
pub fn mark_entries_by_rule(rules: &[Rule]) -> MarkEntries {
    let guard = DirectionGuard::of(rules);
    let applied = guard.apply(rules);
    let mut by_number: BTreeMap<usize, Vec<Rule>> = BTreeMap::new();
    for rule in applied.iter() {
        by_number.entry(rule.number).or_default().push(rule.clone());
    }
    let none = DirectionGuard {
        arrivals: false,
        local_selections: Vec::new(),
    };
    let by_rule = by_number
        .into_iter()
        .map(|(number, split)| (number, mark_stage(&none, &split, &[]).len()))
        .filter(|&(_, count)| count > 0)
        .collect();
    MarkEntries {
        by_rule,
        guard: guard.entries().len(),
        keep_guard_off: guard.kept_off_by(rules),
    }
}

/// Each selection's out-interface bit in `generation`'s byte of the routes' bits: that of
/// the name or pattern its rules have (a selection's rules all have the same one, see
/// `LocalOrigin::out_interface`), 0 for none.
fn selection_routes(
    rules: &[Rule],
    out_interfaces: &[String],
    generation: u32,
) -> [u32; MAX_SELECTIONS] {
    let mut routes: [Option<u32>; MAX_SELECTIONS] = [None; MAX_SELECTIONS];
    for rule in rules.iter().filter(|rule| rule.origin.local()) {
        // The rule's own name's bit: a pattern's is set on the routes by the interfaces it
        // matches, not by other names it matches.
        let bit = rule.out_iface.as_ref().map_or(0, |own| {
            let bit = out_interfaces
                .iter()
                .position(|name| name == own)
                .expect("out_interfaces holds every rule's name");
            (1 << bit) << route_bits_shift(generation)
        });
        let selection = routes[rule.selection as usize].get_or_insert(bit);
        assert!(
            *selection == bit,
            "rule {}: its selection's rules have different out_interface values",
            rule.number
        );
    }
    routes.map(|bit| bit.unwrap_or(0))
}

/// The mark stage's entries for `rules` as `guard` left them: its own, then the rules'.
fn mark_stage(guard: &DirectionGuard, rules: &[Rule], interfaces: Interfaces<'_>) -> Vec<MarkRule> {
    let mut entries: Vec<MarkRule> = guard.entries();
    for entry in rules.iter().flat_map(|rule| mark_rule(rule, interfaces)) {
        let alike = |e: &&mut MarkRule| {
            MarkRule {
                transports: entry.transports,
                ..**e
            } == entry
        };
        match entries.iter_mut().find(alike) {
            Some(shared) => shared.transports |= entry.transports,
            None => entries.push(entry),
        }
    }
    entries
}

/// Where every rule for arrivals (or for local connections: but for TCP's, which are always
/// of the original direction) asks for its connection's original direction, as rule sets
/// that guard their whole chain with `ct direction original` have it, no rule matches a
/// packet of the reply direction. The rules for that
/// origin are then compiled without asking (into the lookup stages, where the direction has
/// no room, instead of the few entries tried one by one) behind a guard: one entry per
/// family (and, for local connections, per selection) that passes the reply direction's
/// packets as unmatched ahead of every rule.
#[derive(Clone)]
struct DirectionGuard {
    arrivals: bool,
    /// The selections of the rules for local connections, when they are guarded.
    local_selections: Vec<u32>,
}

/// Whether the guard of `rules` leaves a packet of the reply direction unmatched: one that
/// arrives, or a local connection's of a process in the selections of these bits.
#[cfg(any(test, feature = "fuzzing"))]
pub(super) fn leaves_replies_unmatched(rules: &[Rule], local: Option<u32>) -> bool {
    let guard = DirectionGuard::of(rules);
    match local {
        None => guard.arrivals,
        Some(selections) => guard
            .local_selections
            .iter()
            .any(|&k| selections & (1 << k) != 0),
    }
}

/// Whether `rule` asks for the original direction.
fn asks_original(rule: &Rule) -> bool {
    rule.ct_direction == Some(CtDirection::Original)
}

/// A local TCP connection is always the original direction of its connection: such a rule
/// needs not ask.
fn original_for_local(rule: &Rule) -> bool {
    rule.protocol == Protocol::Tcp && rule.ct_direction.is_none()
}

/// For each origin (arrivals, local connections): which rules apply to it, and which of
/// them need not ask.
type OriginTest = (fn(&Rule) -> bool, fn(&Rule) -> bool);
const ORIGINS: [OriginTest; 2] = [
    // Rules for other protocols are never asked about a TCP or UDP packet.
    (
        |rule| rule.origin.forwarded() && rule.protocol != Protocol::Other,
        |_| false,
    ),
    (|rule| rule.origin.local(), original_for_local),
];

impl DirectionGuard {
    /// The guard of the rules in force, where it lowers the count of the entries tried one
    /// by one: its own (two per family, per selection) may cost more than the rules it takes
    /// the question off, when those are tried one by one for a mark as well.
    fn of(rules: &[Rule]) -> Self {
        let asked = Self::asked_by(rules);
        let candidates = [
            asked.clone(),
            DirectionGuard {
                local_selections: Vec::new(),
                ..asked.clone()
            },
            DirectionGuard {
                arrivals: false,
                ..asked
            },
            DirectionGuard {
                arrivals: false,
                local_selections: Vec::new(),
            },
        ];
        let cost = |guard: &DirectionGuard| mark_stage(guard, &guard.apply(rules), &[]).len();
        candidates
            .into_iter()
            .min_by_key(cost)
            .expect("four candidates")
    }

    /// The guard the rules in force ask for: retired rules (kept for the flows of an
    /// earlier configuration) have no say, or a reload from rules that do not ask would keep
    /// it off until a restart. Their flows keep what the guard lets through: the original
    /// direction, their clients' packets.
    fn asked_by(rules: &[Rule]) -> Self {
        let in_force = || rules.iter().filter(|rule| !rule.retired);
        let guarded = |(applies, implied): OriginTest| {
            let of_origin: Vec<&Rule> = in_force().filter(|rule| applies(rule)).collect();
            of_origin.iter().any(|rule| asks_original(rule))
                && of_origin
                    .iter()
                    .all(|rule| asks_original(rule) || implied(rule))
        };
        let local_selections: BTreeSet<u32> = match guarded(ORIGINS[1]) {
            true => in_force()
                .filter(|rule| rule.origin.local())
                .map(|rule| rule.selection)
                .collect(),
            false => BTreeSet::new(),
        };
        DirectionGuard {
            arrivals: guarded(ORIGINS[0]),
            local_selections: local_selections.into_iter().collect(),
        }
    }

    /// The rules that keep the guard off: of an origin where others ask for the original
    /// direction, they do not (by number).
    fn kept_off_by(&self, rules: &[Rule]) -> Vec<usize> {
        let on = [self.arrivals, !self.local_selections.is_empty()];
        let mut numbers: BTreeSet<usize> = BTreeSet::new();
        for ((applies, implied), on) in ORIGINS.into_iter().zip(on) {
            let of_origin = || {
                rules
                    .iter()
                    .filter(move |rule| !rule.retired && applies(rule))
            };
            if on || !of_origin().any(asks_original) {
                continue;
            }
            numbers.extend(
                of_origin()
                    .filter(|rule| !asks_original(rule) && !implied(rule))
                    .map(|rule| rule.number),
            );
        }
        numbers.into_iter().collect()
    }

    /// `rules` without the question the guard asks for them.
    fn apply<'a>(&self, rules: &'a [Rule]) -> Cow<'a, [Rule]> {
        let local = !self.local_selections.is_empty();
        if !self.arrivals && !local {
            return Cow::Borrowed(rules);
        }
        let guarded = |rule: &Rule| {
            rule.ct_direction == Some(CtDirection::Original)
                && (self.arrivals || !rule.origin.forwarded())
                && (local || !rule.origin.local())
        };
        rules
            .iter()
            .map(|rule| match guarded(rule) {
                true => Rule {
                    ct_direction: None,
                    ..rule.clone()
                },
                false => rule.clone(),
            })
            .collect()
    }

    /// The guard's own entries: rank 0, which no rule has (rule numbers start at 1), so
    /// they outrank every rule.
    fn entries(&self) -> Vec<MarkRule> {
        let arrivals = self.arrivals.then_some(0);
        let local = self.local_selections.iter().map(|&k| selection_ifindex(k));
        let (first_port, last_port) = Ports::Any.bounds();
        arrivals
            .into_iter()
            .chain(local)
            .flat_map(|ifindex| {
                [0, 1].map(|ipv6| MarkRule {
                    transports: MARK_RULE_TCP | MARK_RULE_UDP,
                    first_port,
                    last_port,
                    first_sport: 0,
                    last_sport: u16::MAX,
                    ipv6,
                    ifindex,
                    verdict: Verdict {
                        action: VERDICT_PASS,
                        rank: 0,
                        ..Verdict::default()
                    },
                    ct_direction: CtDirection::Reply.program_value(),
                    ..MarkRule::default()
                })
            })
            .collect()
    }
}

/// The mark stage's ifindex for a rule whose interface is not attached: no interface has
/// it, and no selection's local connections are looked up with it.
const NO_INTERFACE: u32 = LOCAL_ORIGIN_IFINDEX - MAX_SELECTIONS as u32;

fn mark_rule(rule: &Rule, interfaces: Interfaces<'_>) -> Vec<MarkRule> {
    if !rule.tried_one_by_one() {
        return Vec::new();
    }
    // No mark: a mask of zero takes any.
    let mark = rule
        .mark
        .unwrap_or(crate::values::Mark { value: 0, mask: 0 });
    let mut ifindexes: Vec<u32> = match (&rule.iface, rule.origin.forwarded()) {
        (_, false) => Vec::new(),
        (None, true) => vec![0],
        (Some(name), true) => {
            let attached: Vec<u32> = interfaces
                .iter()
                .filter(|(attached, _)| interfaces::selects(name, attached))
                .map(|(_, index)| *index)
                .collect();
            match attached.is_empty() {
                true => vec![NO_INTERFACE],
                false => attached,
            }
        }
    };
    // A local connection is tried under its selections' indices only (see
    // `match_mark_rules`).
    if rule.origin.local() {
        ifindexes.push(selection_ifindex(rule.selection));
    }
    let (first_port, last_port) = rule.ports.bounds();
    // No source port: any, 0 included.
    let (first_sport, last_sport) = rule.sport.map_or((0, u16::MAX), Ports::bounds);
    // A prefix's address and netmask as the program compares them.
    let words = |net: IpNet| {
        let bytes = |addr: std::net::IpAddr| match addr {
            std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
            std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        let as_words = |bytes: Vec<u8>| {
            let mut words = [0u32; 4];
            for (word, chunk) in words.iter_mut().zip(bytes.chunks(4)) {
                *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            words
        };
        (
            as_words(bytes(net.network())),
            as_words(bytes(net.netmask())),
        )
    };
    let (dst, dst_mask) = words(rule.dst);
    // No source: a netmask of zero takes any.
    let (src, src_mask) = rule.src.map_or(([0; 4], [0; 4]), words);
    let entry = |ifindex| MarkRule {
        value: mark.value,
        mask: mark.mask,
        transports: match rule.protocol {
            Protocol::Tcp => MARK_RULE_TCP,
            Protocol::Udp => MARK_RULE_UDP,
            // Matches nothing the stage is asked about (`check_protocol` refuses such a
            // rule).
            Protocol::Other => 0,
        },
        first_port,
        last_port,
        first_sport,
        last_sport,
        ipv6: u32::from(rule.dst.addr().is_ipv6()),
        ifindex,
        dst,
        dst_mask,
        src,
        src_mask,
        verdict: rule.verdict(),
        ct_direction: rule.ct_direction.map_or(0, CtDirection::program_value),
    };
    ifindexes.into_iter().map(entry).collect()
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
    /// Whether some rule applies to local connections, so that they must be told from
    /// arrivals (see the parent module).
    local: bool,
    /// How many selections the rules for local connections have (the highest index + 1).
    selections: u32,
}

/// Where the packets of a set of source-stage entries come from.
#[derive(Clone, Copy)]
enum Context<'a> {
    /// Arrivals on this interface (`None`: any, when no rule of the cell names one).
    Arrival(Option<&'a str>),
    /// Local connections of the processes of this selection.
    Local(u32),
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
                let local = self.local;
                if let Some(first) = candidates.iter().position(|r| r.is_unconditional(local)) {
                    // Nothing after a rule that always matches can win.
                    candidates.truncate(first + 1);
                }
                let (verdict, sources) = self.cell(&candidates);
                (dst, verdict, sources)
            })
            .collect()
    }

    fn cell(&mut self, candidates: &[&Rule]) -> (Verdict, Vec<SourceEntry>) {
        if let [first, ..] = candidates {
            if first.is_unconditional(self.local) {
                return (first.verdict(), Vec::new());
            }
        }
        let cell = self.generation_bit | self.next_cell;
        self.next_cell += 1;
        let by_iface = self.local || candidates.iter().any(|r| r.iface.is_some());
        let mut contexts: Vec<(Context, u32)> = if by_iface {
            self.interfaces
                .iter()
                .map(|(name, index)| (Context::Arrival(Some(name.as_str())), *index))
                .collect()
        } else {
            vec![(Context::Arrival(None), 0)]
        };
        if self.local {
            for k in 0..self.selections {
                contexts.push((Context::Local(k), selection_ifindex(k)));
            }
        }
        let mut sources: BTreeSet<IpNet> = candidates.iter().filter_map(|r| r.src).collect();
        sources.insert(IpNet::V4(Default::default()));
        sources.insert(IpNet::V6(Default::default()));
        let mut entries = Vec::new();
        for (context, ifindex) in contexts {
            // A source's winner is the first candidate that applies here (its origin, its
            // interface or pattern) whose own source is absent or contains it: looking up each
            // of the source's prefixes here instead of scanning the candidates keeps thousands
            // of source rules linear.
            let mut first: HashMap<Option<IpNet>, usize> = HashMap::new();
            for (index, rule) in candidates.iter().enumerate() {
                if applies_in(rule, context) {
                    first
                        .entry(rule.src.map(|own| own.trunc()))
                        .or_insert(index);
                }
            }
            for src in &sources {
                let containing = (0..=src.prefix_len())
                    .filter_map(|len| truncated(*src, len))
                    .map(Some)
                    .chain([None]);
                let winner = containing.filter_map(|own| first.get(&own)).min();
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

/// Whether `rule` applies to the packets of `context`: its origin, and for arrivals its
/// interface (local connections are looked up with no interface).
fn applies_in(rule: &Rule, context: Context<'_>) -> bool {
    match context {
        Context::Arrival(iface) => rule.origin != Origin::Local && applies_on(rule, iface),
        Context::Local(selection) => {
            rule.origin != Origin::Forwarded && rule.iface.is_none() && rule.selection == selection
        }
    }
}

/// Whether `rule` applies to packets arriving on `iface` (`None`: the cell does not look at
/// interfaces, so no rule in it names one). A rule names an interface or a pattern of them.
fn applies_on(rule: &Rule, iface: Option<&str>) -> bool {
    match (&rule.iface, iface) {
        (None, _) => true,
        (Some(own), Some(name)) => interfaces::selects(own, name),
        (Some(_), None) => false,
    }
}

/// What the compiled maps say for `packet`, looked up the way the eBPF programs do: an
/// arrival under `ifindex`, a local connection under each of its selections' indices.
#[cfg(any(test, feature = "fuzzing"))]
pub fn lookup(
    compiled: &CompiledRules,
    generation: u32,
    packet: &Packet<'_>,
    ifindex: u32,
) -> RuleMatch {
    use tproxy_common::{
        decision::{outranks, rule_match},
        local_origin::route_selected,
    };
    if packet.local && packet.protocol == Protocol::Other {
        // The connect and sendmsg programs see TCP and UDP sockets only.
        return RuleMatch::None;
    }
    if packet.local {
        // As the connect programs do: once per selection the process is in whose
        // out-interface bit the route has, the best wins.
        let routes = packet.route.map_or(0, |route| {
            super::route_bits(&compiled.out_interfaces, route) << route_bits_shift(generation)
        });
        let mut best = Verdict::default();
        for k in (0..MAX_SELECTIONS as u32).filter(|&k| {
            packet.selections & (1 << k) != 0
                && route_selected(compiled.selection_routes[k as usize], routes)
        }) {
            let verdict = lookup_verdict(compiled, generation, packet, selection_ifindex(k));
            if outranks(&verdict, &best) {
                best = verdict;
            }
        }
        return rule_match(&best);
    }
    rule_match(&lookup_verdict(compiled, generation, packet, ifindex))
}

/// The best verdict of the compiled maps for `packet` looked up under `ifindex`.
#[cfg(any(test, feature = "fuzzing"))]
fn lookup_verdict(
    compiled: &CompiledRules,
    generation: u32,
    packet: &Packet<'_>,
    ifindex: u32,
) -> Verdict {
    use tproxy_common::{
        decision::{match_mark_rules, outranks, source_stage_ifindex},
        maps::{rule_group_class, MarkedPacket, RULE_GROUPS},
    };
    let udp = packet.protocol == Protocol::Udp;
    let classes: Vec<u32> = match packet.protocol {
        Protocol::Other => vec![other_protocols_class(generation)],
        Protocol::Tcp | Protocol::Udp => {
            let entry = compiled.port_classes[usize::from(udp) * 65536 + usize::from(packet.port)];
            (0..RULE_GROUPS)
                .filter_map(|group| rule_group_class(entry, generation, udp, packet.port, group))
                .collect()
        }
    };
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
    let marks = compiled.mark_table().expect("the rules fit the mark stage");
    let marked = match (packet.dst, packet.src) {
        (std::net::IpAddr::V4(dst), std::net::IpAddr::V4(src)) => MarkedPacket::new(
            packet.mark,
            udp,
            (packet.port, packet.sport),
            &dst.octets(),
            &src.octets(),
            ifindex,
        ),
        (std::net::IpAddr::V6(dst), std::net::IpAddr::V6(src)) => MarkedPacket::new(
            packet.mark,
            udp,
            (packet.port, packet.sport),
            &dst.octets(),
            &src.octets(),
            ifindex,
        ),
        _ => unreachable!("a packet's addresses are of one family"),
    };
    let mut marked = marked;
    // The program looks the direction up only when a rule for the packet's origin asks; a
    // local TCP connect is original all the same.
    let asked = match packet.local {
        true => tproxy_common::maps::CT_ASKED_BY_LOCAL,
        false => tproxy_common::maps::CT_ASKED_BY_ARRIVALS,
    };
    if packet.local && !udp {
        marked.ct_direction = tproxy_common::maps::CT_ORIGINAL;
    } else if marks.ct_direction & asked != 0 {
        marked.ct_direction = packet.ct_direction.map_or(0, CtDirection::program_value);
    }
    match (packet.local, packet.protocol) {
        // The program asks only the rules for other protocols about such a packet.
        (_, Protocol::Other) => {}
        (true, _) => match_mark_rules::<true>(&marks, &marked, &mut best),
        (false, _) => match_mark_rules::<false>(&marks, &marked, &mut best),
    }
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
    best
}
