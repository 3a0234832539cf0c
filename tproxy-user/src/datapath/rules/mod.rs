//! The rule model and its compilation into the eBPF program's lookup maps.
//!
//! A rule matches on protocol (TCP, UDP, or every other one), destination prefix, destination port (one, a range, or any),
//! and optionally source prefix and ingress interface (a name, or a pattern such as `eth0*`
//! matched against the interfaces the program is attached to), the packet's mark or its
//! source port; it steers, bypasses or drops what it matches; and it
//! applies to arrivals on the steered interfaces (origin `forwarded`), to this host's own
//! connections (`local`), or to both (`any`). The rule that decides a packet is the first in
//! this order among those that match it:
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
//! Origins: when some rule applies to local connections, they are looked up under interface
//! indices of their own, one per selection of processes (`selection_ifindex(k)`; selection 0,
//! every process, has `LOCAL_ORIGIN_IFINDEX`), and a cell's verdict is final at stage 2 only
//! when its first rule applies to every origin (`any`) and every process, and looks at
//! neither source nor interface. Every other cell goes to stage 3, where each attached
//! interface has the entries of the rules that apply to arrivals, and each selection's index
//! those of the rules for local connections with that selection. A local connection is looked
//! up under each selection its process is in, and the best-ranked answer wins, so the rules'
//! precedence holds across selections. Without local rules nothing changes. The rules with an
//! `out_interface` are a selection of their own (with the processes of theirs, see
//! `LocalOrigin::out_interface`): a local connection is looked up under it only when the
//! route to its destination leaves by that interface.
//!
//! Rules for other protocols than TCP and UDP (`proto = "other"`) have no ports: they are one
//! group of their own, looked up without the port array (stages 2 and 3 only), for arrivals.
//!
//! Keeping the groups apart means a rule is written into one group only: thousands of
//! single-port rules next to thousands of any-port or range prefixes cost their sum in map
//! entries, not their product.
//!
//! Rules with a mark, a source port or a connection's direction are not
//! in these stages: none is a prefix of anything to key a trie with, and there is no room for
//! them in the keys. They are few (at most `MAX_MARK_RULES` entries), each tried in turn by a
//! bounded loop before the other stages, and the best rank among their matches and the other
//! stages' answer wins, so precedence is the same as for every other rule. Where every rule
//! of an origin asks for a connection's original direction, one guard asks it for all of
//! them, and they go to the stages (see `compile::DirectionGuard`).

use std::{cmp::Reverse, collections::HashSet, fmt};

use ipnet::IpNet;
#[cfg(any(test, feature = "fuzzing"))]
use tproxy_common::decision::RuleMatch;
use tproxy_common::{
    local_origin::MAX_OUT_INTERFACES,
    maps::{Verdict, VERDICT_BYPASS, VERDICT_DELIVER, VERDICT_DROP, VERDICT_REJECT, VERDICT_STEER},
};

use crate::values::Mark;
pub use tproxy_common::decision::Protocol;

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

    /// The first and last port, inclusive (any port: 1 to 65535).
    pub fn bounds(self) -> (u16, u16) {
        match self {
            Ports::One(port) => (port, port),
            Ports::Range(first, last) => (first, last),
            Ports::Any => (1, u16::MAX),
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

/// Which packets a rule applies to, by where they come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// Arrivals on the steered interfaces (the default).
    #[default]
    Forwarded,
    /// Connections this host's selected processes make (see `datapath::local_origin`).
    Local,
    /// Both.
    Any,
}

impl Origin {
    /// Whether the rule applies to local connections.
    pub fn local(self) -> bool {
        matches!(self, Origin::Local | Origin::Any)
    }

    /// Whether the rule applies to arrivals on interfaces.
    pub fn forwarded(self) -> bool {
        matches!(self, Origin::Forwarded | Origin::Any)
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Forwarded => "forwarded",
            Origin::Local => "local",
            Origin::Any => "any",
        })
    }
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Hand new flows to the listener with this index.
    Steer(u32),
    /// Leave the packet alone (unless a socket already owns its flow).
    Bypass,
    /// Drop the packet (unless a socket already owns its flow).
    Drop,
    /// Answer the packet as refused, a TCP reset or an ICMP port unreachable, and drop it
    /// (unless a socket already owns its flow, as for `Drop`).
    Reject,
    /// Deliver the packet to this host, as the TPROXY recipe's MARK does without TPROXY:
    /// marked for local delivery, the kernel's own socket lookup decides (a socket that owns
    /// the flow, for UDP one of tproxy's own, still gets it first, as for `bypass`).
    Deliver,
}

/// As the configuration names it (`action = "steer"`).
impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Steer(_) => "steer",
            Action::Bypass => "bypass",
            Action::Drop => "drop",
            Action::Reject => "reject",
            Action::Deliver => "deliver",
        })
    }
}

/// One rule with a single transport, destination prefix and port spec: a configured rule
/// with lists becomes several of these, all with its number.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// TCP, UDP, or every other IP protocol (`drop` and `bypass` rules for arrivals only,
    /// without ports, marks or directions: see [`check_protocol`]).
    pub protocol: Protocol,
    pub dst: IpNet,
    pub ports: Ports,
    /// The source ports it matches (`None`: any).
    pub sport: Option<Ports>,
    pub src: Option<IpNet>,
    pub iface: Option<String>,
    /// Matches packets whose mark has `value` under `mask`: at tc ingress `skb->mark`, for a
    /// local process's connection (`--local`) its socket's `SO_MARK`.
    pub mark: Option<Mark>,
    pub action: Action,
    /// The rule's number in its configuration (1-based), the last tie-breaker.
    pub number: usize,
    /// A steer rule of an earlier configuration that a reload dropped. It only lets flows
    /// that already have a socket keep it (like `bypass`), so that a reload does not cut them,
    /// and it comes after every current rule.
    pub retired: bool,
    /// Arrivals, local connections, or both. A rule for local connections names neither
    /// source nor interface (the configuration refuses them).
    pub origin: Origin,
    /// For a rule for local connections, the processes it applies to: an index into the
    /// configuration's `LocalSelections` (0: every process).
    pub selection: u32,
    /// For a rule for local connections only: the name or pattern of the interface that the
    /// route to the destination must leave by (iptables' `-o` in OUTPUT, nft's `oifname`),
    /// as the host's `local` and `main` routing tables say (see [`out_interfaces`]).
    pub out_iface: Option<String>,
    /// The direction of its connection the packet must travel in (`ct_direction`;
    /// iptables' `-m conntrack --ctdir`, nft's `ct direction`): for an arrival as conntrack
    /// has it, for a local connection as `tproxy_common::local_udp` follows it (a TCP
    /// connect is always original).
    pub ct_direction: Option<CtDirection>,
}

/// What a rule matches (see [`Rule::match_key`]): protocol, destination, ports, source
/// ports, source, interface, mark, origin, selection, out interface, direction.
type MatchKey<'a> = (
    Protocol,
    IpNet,
    Ports,
    Option<Ports>,
    Option<IpNet>,
    Option<&'a str>,
    Option<Mark>,
    Origin,
    u32,
    Option<&'a str>,
    Option<CtDirection>,
);

/// A packet's direction in its connection, as the kernel's connection tracking has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CtDirection {
    /// As the connection's first packet went (a packet no tracked connection holds yet
    /// starts one).
    Original,
    /// Back, from the first packet's destination.
    Reply,
}

impl CtDirection {
    /// As the program compares it.
    fn program_value(self) -> u32 {
        match self {
            CtDirection::Original => tproxy_common::maps::CT_ORIGINAL,
            CtDirection::Reply => tproxy_common::maps::CT_REPLY,
        }
    }
}

impl std::fmt::Display for CtDirection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CtDirection::Original => "original",
            CtDirection::Reply => "reply",
        })
    }
}

/// A rule's place in the precedence: lower wins.
type Precedence = (bool, Reverse<u8>, u8, usize);

/// Most rules a configuration may have: rule numbers take 21 bits of a rank.
pub const MAX_RULES: usize = (1 << 21) - 1;

impl Rule {
    /// Who has to know a packet's direction for this rule (`CT_ASKED_BY_ARRIVALS`,
    /// `CT_ASKED_BY_LOCAL`, both or neither): the program looks it up for arrivals, and
    /// follows local UDP flows (with the `recvmsg` programs attached) only while a rule asks.
    /// A local TCP connect is always original, so a TCP rule asks nothing of local origin.
    pub fn ct_asked(&self) -> u32 {
        if self.ct_direction.is_none() {
            return 0;
        }
        let arrivals = match self.origin.forwarded() {
            true => tproxy_common::maps::CT_ASKED_BY_ARRIVALS,
            false => 0,
        };
        let local = match self.origin.local() && self.protocol == Protocol::Udp {
            true => tproxy_common::maps::CT_ASKED_BY_LOCAL,
            false => 0,
        };
        arrivals | local
    }

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
            Action::Drop if !self.retired => Verdict {
                action: VERDICT_DROP,
                rank,
                ..Verdict::default()
            },
            Action::Deliver if !self.retired => Verdict {
                action: VERDICT_DELIVER,
                rank,
                ..Verdict::default()
            },
            Action::Reject if !self.retired => Verdict {
                action: VERDICT_REJECT,
                rank,
                ..Verdict::default()
            },
            _ => Verdict {
                action: VERDICT_BYPASS,
                rank,
                ..Verdict::default()
            },
        }
    }

    /// Whether the rule applies to a packet of this origin (`local`: a local connection of a
    /// process in the selections of the bits of `selections`), from `src` on `iface`.
    #[cfg(any(test, feature = "fuzzing"))]
    fn matches_source(
        &self,
        local: Option<(u32, Option<&str>)>,
        src: &IpNet,
        iface: Option<&str>,
        mark: u32,
        direction: Option<CtDirection>,
    ) -> bool {
        let origin_ok = match local {
            Some((selections, route)) => {
                self.origin.local()
                    && selections & (1 << self.selection) != 0
                    && self.out_iface.as_deref().is_none_or(|own| {
                        route.is_some_and(|route| crate::datapath::interfaces::matches(own, route))
                    })
            }
            None => self.origin.forwarded() && self.out_iface.is_none(),
        };
        let mark_ok = origin_ok && self.mark.is_none_or(|own| mark & own.mask == own.value);
        let mark_ok = mark_ok && self.ct_direction.is_none_or(|own| Some(own) == direction);
        let src_ok = mark_ok && self.src.is_none_or(|own| own.contains(src));
        let iface_ok = match (&self.iface, iface) {
            (None, _) => true,
            (Some(own), Some(iface)) => crate::datapath::interfaces::selects(own, iface),
            (Some(_), None) => false,
        };
        origin_ok && src_ok && iface_ok
    }

    /// What the rule matches, without what it does: rules with equal keys match the same
    /// packets.
    fn match_key(&self) -> MatchKey<'_> {
        (
            self.protocol,
            self.dst,
            self.ports,
            self.sport,
            self.src,
            self.iface.as_deref(),
            self.mark,
            self.origin,
            self.selection,
            self.out_iface.as_deref(),
            self.ct_direction,
        )
    }

    /// Whether the rule is tried one by one rather than in the lookup stages: it matches a
    /// mark, a source port or a connection's direction, which no stage is keyed by (unless
    /// the direction guard takes the direction off it). A route's interface is its
    /// selection's (see `LocalOrigin::out_interface`).
    fn tried_one_by_one(&self) -> bool {
        self.mark.is_some() || self.sport.is_some() || self.ct_direction.is_some()
    }

    /// Whether the rule matches every packet its destination and port match, given whether
    /// local connections are steered at all (`local`: then they are told from arrivals, and
    /// by selection).
    fn is_unconditional(&self, local: bool) -> bool {
        self.src.is_none()
            && self.iface.is_none()
            && self.mark.is_none()
            && self.sport.is_none()
            && self.ct_direction.is_none()
            // A rule with an out_interface has a selection of its own, never 0.
            && (!local || (self.origin == Origin::Any && self.selection == 0))
    }

    /// The match as the program would report it (retired rules behave as bypass).
    #[cfg(any(test, feature = "fuzzing"))]
    fn rule_match(&self) -> RuleMatch {
        match self.action {
            Action::Steer(listener) if !self.retired => RuleMatch::Steer(listener),
            Action::Drop if !self.retired => RuleMatch::Drop,
            Action::Deliver if !self.retired => RuleMatch::Deliver,
            Action::Reject if !self.retired => RuleMatch::Reject,
            _ => RuleMatch::Bypass,
        }
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
    pub protocol: Protocol,
    pub src: std::net::IpAddr,
    pub dst: std::net::IpAddr,
    pub port: u16,
    /// The source port (for a local connection, the port its socket is bound to when it is
    /// steered: 0 while unbound).
    pub sport: u16,
    /// A local process's connection (`iface` is then ignored) rather than an arrival.
    pub local: bool,
    /// For a local connection, the selections its process is in (bit `k`: selection `k`).
    pub selections: u32,
    pub iface: &'a str,
    /// `skb->mark` (or the connecting socket's mark).
    pub mark: u32,
    /// For a local connection, the interface its route leaves by (`None`: no route).
    pub route: Option<&'a str>,
    /// Its direction in its connection, as the program found it (`None`: not looked up, as
    /// when no rule asks); a local TCP connection's is always original.
    pub ct_direction: Option<CtDirection>,
}

/// The decision for `packet` by the definition: the first matching rule in precedence order.
/// The compiled maps must agree with this; the tests check that they do.
#[cfg(any(test, feature = "fuzzing"))]
pub fn decide(rules: &[Rule], packet: &Packet<'_>) -> RuleMatch {
    let src = IpNet::from(packet.src);
    let dst = IpNet::from(packet.dst);
    // A local TCP connection is the original direction of its connection, whatever asked.
    let direction = match packet.protocol {
        // Not looked up: no rule for other protocols asks.
        Protocol::Other => None,
        Protocol::Tcp if packet.local => Some(CtDirection::Original),
        _ => packet.ct_direction,
    };
    if direction == Some(CtDirection::Reply)
        && compile::leaves_replies_unmatched(rules, packet.local.then_some(packet.selections))
    {
        return RuleMatch::None;
    }
    rules
        .iter()
        .filter(|r| {
            r.protocol == packet.protocol
                && (r.protocol == Protocol::Other || r.ports.contains(packet.port))
                && r.sport.is_none_or(|sport| sport.contains(packet.sport))
                && r.dst.contains(&dst)
                && r.matches_source(
                    packet.local.then_some((packet.selections, packet.route)),
                    &src,
                    (!packet.local).then_some(packet.iface),
                    packet.mark,
                    direction,
                )
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

/// The mark a rule matches once the bits of tproxy's own `routing` mark are left out of it,
/// or why it cannot be matched. Those bits are tproxy's: the program sets them, and a local
/// process's packets carry them on `lo` though its socket had none at connect time, so a
/// rule looking at them would decide the same connection differently in the two places.
pub fn effective_mark(rule: &Rule, routing: Mark) -> Result<Option<Mark>, String> {
    let Some(mark) = rule.mark else {
        return Ok(None);
    };
    if mark.value & routing.mask != 0 {
        return Err(format!(
            "mark {mark} needs bits of tproxy's routing mark {routing}, which rules do not \
             see (tproxy sets them itself): use other bits, or move the routing mark (`mark`)"
        ));
    }
    let mask = mark.mask & !routing.mask;
    if mask == 0 {
        return Err(format!(
            "mark {mark} only looks at bits of tproxy's routing mark {routing}, which rules do \
             not see"
        ));
    }
    Ok(Some(Mark {
        value: mark.value,
        mask,
    }))
}

/// The kernel's ephemeral port range in this network namespace (`net.ipv4.ip_local_port_range`),
/// whence an unbound socket's source port comes; `None` when it cannot be read.
pub fn ephemeral_port_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut bounds = text.split_whitespace().map(str::parse::<u16>);
    Some((bounds.next()?.ok()?, bounds.next()?.ok()?))
}

/// Checks that a rule for local connections names no source address and no interface: a
/// local connection is decided at `connect()` or `sendmsg()`, before a source address is
/// chosen, and has no ingress interface. A source port is the socket's bound port then (see
/// `match_local_mark_rules` in the eBPF program).
pub fn check_origin(rule: &Rule) -> Result<(), String> {
    if let Some(out_iface) = &rule.out_iface {
        if rule.origin != Origin::Local {
            return Err(format!(
                "`out_interface = \"{out_iface}\"` with origin \"{}\": the interface a route \
                 leaves by is known for local connections only (origin \"local\"); an arrival's \
                 is decided after tproxy has seen it",
                rule.origin
            ));
        }
        check_out_interface(out_iface)?;
    }
    if !rule.origin.local() {
        return Ok(());
    }
    if matches!(rule.action, Action::Drop | Action::Deliver | Action::Reject) {
        return Err(format!(
            "origin \"{}\" with action \"{}\": a local connection is only steered or \
             left alone when it connects; {}make the rule origin \"forwarded\"",
            rule.origin,
            rule.action,
            match rule.action {
                Action::Drop | Action::Reject => "refuse it with a firewall rule in OUTPUT, or ",
                _ => "",
            }
        ));
    }
    let what = match (&rule.src, &rule.iface) {
        (Some(_), _) => "src",
        (None, Some(_)) => "iface",
        (None, None) => return Ok(()),
    };
    Err(format!(
        "origin \"{}\" with `{what}`: a local connection has no ingress interface and its \
         source is not known when it is steered; select local processes with `cgroup` and \
         `uid`, or write a separate forwarded rule",
        rule.origin
    ))
}

/// Refuses a rule for other protocols (`proto = "other"`) that asks what only TCP and UDP
/// have, or what the program does only to them: such a packet has no ports, no socket, no
/// listener, and the program looks at it at tc ingress only, by addresses and interface.
pub fn check_protocol(rule: &Rule) -> Result<(), String> {
    if rule.protocol != Protocol::Other {
        return Ok(());
    }
    let refused = if !matches!(rule.action, Action::Drop | Action::Bypass) {
        format!("action \"{}\": only drop and bypass rules", rule.action)
    } else if rule.ports != Ports::Any {
        "`ports`: other protocols have none".to_string()
    } else if rule.sport.is_some() {
        "`sport`: other protocols have none".to_string()
    } else if rule.mark.is_some() {
        "`mark`: the rules for other protocols are looked up by address and interface only"
            .to_string()
    } else if rule.ct_direction.is_some() {
        "`ct_direction`: the rules for other protocols are looked up by address and \
         interface only"
            .to_string()
    } else if rule.origin != Origin::Forwarded {
        format!(
            "origin \"{}\": local connections are TCP and UDP sockets'; other protocols' \
             rules are for arrivals",
            rule.origin
        )
    } else {
        return Ok(());
    };
    Err(format!(
        "proto \"other\" (every protocol besides TCP and UDP) with {refused}; write a separate \
         rule for TCP and UDP"
    ))
}

/// Refuses an `out_interface` that no interface can have: empty, longer than the kernel's
/// 15 bytes, or with a `/`, whitespace or a control character.
fn check_out_interface(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "`out_interface = \"{}\"` is not an interface name or pattern (at most 15 bytes, not \
             `.` or `..`, no `/`, `:` or whitespace)",
            name.escape_debug()
        ));
    }
    Ok(())
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} dst {}", self.protocol.name(), self.dst)?;
        if self.protocol != Protocol::Other {
            write!(f, " port {}", self.ports)?;
        }
        if let Some(src) = self.src {
            write!(f, " src {src}")?;
        }
        if let Some(sport) = self.sport {
            write!(f, " sport {sport}")?;
        }
        if let Some(iface) = &self.iface {
            write!(f, " iface {iface}")?;
        }
        if let Some(mark) = self.mark {
            write!(f, " mark {mark}")?;
        }
        if self.origin != Origin::Forwarded {
            write!(f, " origin {}", self.origin)?;
        }
        if self.origin.local() && self.selection != 0 {
            write!(f, " selection {}", self.selection)?;
        }
        if let Some(out_iface) = &self.out_iface {
            write!(f, " out_interface {out_iface}")?;
        }
        if let Some(direction) = self.ct_direction {
            write!(f, " ct_direction {direction}")?;
        }
        Ok(())
    }
}

/// The arrivals' part of the `candidates` (in order) that match what no rule of `new` and
/// no earlier candidate matches, marked retired: a reload keeps them so that their
/// established flows survive. Only the arrivals' part: a retired rule only bypasses, which
/// for a local connection is what no rule does (its flow, over `lo`, finds its own socket
/// first all the same), and its selection is the old configuration's, which the new one
/// may have given other processes or an `out_interface`. A rule for every origin and every
/// process stays one: its selection, 0, never has an `out_interface`, and a destination
/// whose first rule it is keeps its verdict in the destination stage (see
/// `Rule::is_unconditional`) rather than taking entries per interface and selection.
pub fn retire<'a>(candidates: impl IntoIterator<Item = &'a Rule>, new: &[Rule]) -> Vec<Rule> {
    let mut matched: HashSet<_> = new.iter().filter_map(arrivals_key).collect();
    candidates
        .into_iter()
        .filter(|rule| arrivals_key(rule).is_some_and(|key| matched.insert(key)))
        .map(|rule| match (rule.origin, rule.selection) {
            (Origin::Any, 0) => Rule {
                retired: true,
                ..rule.clone()
            },
            _ => Rule {
                retired: true,
                origin: Origin::Forwarded,
                selection: 0,
                ..rule.clone()
            },
        })
        .collect()
}

/// What the rule matches among arrivals (its key with the origin made `forwarded`), if it
/// applies to them.
fn arrivals_key(rule: &Rule) -> Option<MatchKey<'_>> {
    let (protocol, dst, ports, sport, src, iface, mark, _, _, out_iface, direction) =
        rule.match_key();
    rule.origin.forwarded().then_some((
        protocol,
        dst,
        ports,
        sport,
        src,
        iface,
        mark,
        Origin::Forwarded,
        0,
        out_iface,
        direction,
    ))
}

/// The distinct `out_interface` names and patterns of `rules`, in the order of their bits in
/// the route maps and in the mark stage's entries (bit `i`: the `i`th).
pub fn out_interfaces(rules: &[Rule]) -> Vec<String> {
    let mut names: Vec<String> = rules.iter().filter_map(|r| r.out_iface.clone()).collect();
    names.sort();
    names.dedup();
    names
}

/// The out-interface bits of a route that leaves by `iface`, for the rules' `names` (see
/// [`out_interfaces`]).
pub fn route_bits(names: &[String], iface: &str) -> u32 {
    names
        .iter()
        .take(MAX_OUT_INTERFACES)
        .enumerate()
        // A pattern takes lo too, as iptables' `-o +` does: only arrivals keep lo apart.
        .filter(|(_, name)| crate::datapath::interfaces::matches(name, iface))
        .fold(0, |bits, (i, _)| bits | 1 << i)
}

/// The rules in the order they are consulted, for `tproxy check`.
pub fn by_precedence(rules: &[Rule]) -> Vec<&Rule> {
    let mut sorted: Vec<&Rule> = rules.iter().collect();
    sorted.sort_by_key(|r| (r.dst.addr().is_ipv6(), r.precedence()));
    sorted
}

mod compile;
#[cfg(test)]
mod tests;

#[cfg(any(test, feature = "fuzzing"))]
pub use compile::lookup;
pub use compile::{
    compile, mark_entries_by_rule, mark_rules, CompiledRules, Entry, Interfaces, MarkEntries,
};

/// Whether any of `rules` applies to local connections: they are then told from arrivals.
pub fn any_local(rules: &[Rule]) -> bool {
    rules.iter().any(|rule| rule.origin.local())
}
