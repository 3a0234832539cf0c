//! The flattened, precedence-checked rule set written as a tproxy configuration.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;

use super::{
    deliver, established,
    flatten::{flatten_in_turn, narrow, Flat, Narrowed},
    local, negation, other_protocols,
    own_mark::{self, looks_at_routing, routing_elsewhere},
    precedence::{covers, group_prefixes, more_specific, overlaps, ShadowIndex},
    Family, Match, Parsed, RejectWith, RuleSet, Target, Translation, UntrackedMark,
};
use crate::{
    config::{self, Settings},
    datapath::{interfaces::LOOPBACK, rules::Ports},
    values::{Mark, Transport},
};

/// A rule kept for the configuration, with the port of the listener it steers to (`None`:
/// a bypass, or a drop or delivery by its target).
type Rule = (Parsed, Option<u16>);

/// Listener addresses by the TPROXY port they stand for.
type Listeners = BTreeMap<u16, Vec<SocketAddr>>;

/// The configuration for `ruleset`, read from `source` (named in its header).
/// `keep_proxies`: each TPROXY port is an external listener (the proxy listening there stays
/// in the path) instead of one of tproxy's own.
pub(super) fn emit(ruleset: RuleSet, source: &str, keep_proxies: bool) -> Translation {
    let mut notes = ruleset.notes.clone();
    let mut skipped: Vec<String> = Vec::new();
    let flat = deliver::resolve(flatten_entries(&ruleset, &mut notes), &mut notes);
    let flat = established::resolve(flat, &mut notes);
    let local_flat = local::rules(&ruleset, &flat, &mut notes);
    let (mut flat, guard) = own_mark::guard(flat);
    let (local_flat, local_guard) = own_mark::guard(local_flat);
    let guard = local::one_guard(guard, local_guard, &mut skipped);
    local::note_socket_marks(&local_flat, &mut notes);
    let steer_loopback =
        local::loopback_destinations(&local_flat, keep_proxies, &mut notes) && keep_proxies;
    local::leave_out_loopback(&mut flat, &local_flat, &mut notes);
    flat.extend(local_flat);
    let flat = other_protocols::marked_where_dropped(flat);
    let flat: Vec<Parsed> = negation::open(flat, &mut notes)
        .into_iter()
        .filter_map(|rule| rule.map_err(|reason| skipped.push(reason)).ok())
        .collect();
    for (line, text, reason) in &ruleset.elsewhere {
        skipped.push(format!("line {line}: {text}: {reason}"));
    }
    let flat = other_protocols::written_for_them(flat, &mut skipped);
    let (listeners, rules, diverts) =
        listeners_and_rules(flat, keep_proxies, &mut notes, &mut skipped);
    let rules = rejects(rules, &listeners, keep_proxies, &mut notes, &mut skipped);
    let mut kept = drop_shadowed(rules, &mut notes, &mut skipped);
    let diverts = diverts_as_bypasses(diverts, &kept, &mut skipped);
    kept.extend(diverts.into_iter().map(|divert| (divert, None)));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Translated by `tproxy translate` from {source} output."
    );
    let kept = lo_arrivals_left_out(kept, &mut skipped);
    if kept
        .iter()
        .any(|(rule, _)| rule.matches.ct_direction.is_some() && !rule.matches.local)
    {
        notes.push(
            "the rules for arrivals with `ct_direction` (from `--ctdir`, `ct direction`) need \
             the kernel's connection tracking on, which the conntrack matches you delete with the rules \
             kept on: keep NAT or a `ct state` rule loaded, or every packet is original to \
             them (and Linux 5.19 or later with nf_conntrack built in)"
                .into(),
        );
    }
    write_interfaces(&mut out, &kept);
    let tproxy_mark = tproxy_mark(&kept, &mut notes);
    let routing = tproxy_mark.unwrap_or(Settings::default().mark);
    // The routing mark is tproxy's own business: when the loop guard needs the TPROXY
    // rules' mark for the socket mark, or other rules' marks look at its bits (which
    // tproxy's rules do not see), tproxy routes with a bit of its own.
    let read: Vec<Mark> = kept
        .iter()
        .filter_map(|(rule, _)| rule.matches.mark)
        .collect();
    let untracks = |routing: Mark| {
        ruleset
            .untracked_marks
            .iter()
            .find(|u| untracks_steered(u.mark, routing))
    };
    // A bit of its own, which no rule of a kept chain that untracks by the mark tells from
    // none.
    let own_bit = |avoid: u32| {
        let mut avoid = avoid;
        loop {
            let (mark, read_by_rules) = routing_elsewhere(avoid, &read)?;
            if untracks(mark).is_none() {
                return Some((mark, read_by_rules));
            }
            avoid |= mark.mask;
        }
    };
    let socket_mark = guard
        .as_ref()
        .map_or(Settings::default().socket_mark, |guard| guard.mark);
    let own_routing = match &guard {
        Some(guard) if guard.conflict(routing).is_some() => {
            own_bit(guard.mark).map(|(mark, read_by_rules)| {
                notes.push(guard.routing_note(routing, mark, read_by_rules));
                (
                    mark,
                    "the TPROXY rules' mark is the loop guard's, tproxy's socket_mark",
                )
            })
        }
        // Nor the socket mark's bits: tproxy refuses one its routing rule would match.
        _ if read.iter().any(|&mark| looks_at_routing(mark, routing)) => {
            own_bit(socket_mark).map(|(mark, read_by_rules)| {
                notes.push(marks_read_note(tproxy_mark, routing, mark, read_by_rules));
                (
                    mark,
                    "the rules' marks look at the bits of the one it would use",
                )
            })
        }
        _ if untracks(routing).is_some() => own_bit(socket_mark).map(|(mark, read_by_rules)| {
            if read_by_rules {
                notes.push(format!(
                    "the rules' marks are read without the bit of tproxy's routing mark \
                         {mark}, which no rule needs set and only tproxy sets"
                ));
            }
            (
                mark,
                "a chain left alone untracks the packets that carry the one it would use",
            )
        }),
        _ => None,
    };
    let final_routing = own_routing.map_or(routing, |(mark, _)| mark);
    for untracked in &ruleset.untracked_marks {
        if untracks_steered(untracked.mark, final_routing) {
            continue;
        }
        if untracks_steered(untracked.mark, routing) {
            notes.push(untracked_note(untracked, routing, final_routing));
        } else {
            notes.push(format!(
                "line {}: `{}`, in a chain left alone, untracks the packets whose mark is {}: \
                 tproxy's routing mark {final_routing} does not change whether it matches a \
                 packet tproxy steers, so it untracks what it did",
                untracked.line, untracked.text, untracked.mark
            ));
        }
    }
    if let Some(untracked) = untracks(final_routing) {
        skipped.push(format!(
            "line {}: {}: it would untrack the flows tproxy steers (they carry its routing \
             mark), and no bit is left for a routing mark of tproxy's own",
            untracked.line, untracked.text
        ));
    }
    match (own_routing, tproxy_mark) {
        (Some((mark, why)), _) => {
            let _ = writeln!(out, "# tproxy's own routing mark: {why}.");
            let _ = writeln!(out, "mark = \"{mark}\"");
        }
        (None, Some(mark)) => {
            let _ = writeln!(
                out,
                "# The TPROXY rules' mark, for anything else that relies on it."
            );
            let _ = writeln!(out, "mark = \"{mark}\"");
        }
        (None, None) => {}
    }
    let routing = own_routing.map_or(routing, |(mark, _)| mark);
    let kept = unseen_marks_left_out(kept, routing, &mut skipped);
    if let Some(guard) = guard {
        match guard.conflict(routing) {
            Some(conflict) => skipped.push(conflict),
            None => {
                notes.push(guard.note());
                let _ = writeln!(
                    out,
                    "# The proxy's loop guard: packets with this mark are never steered \
                     (tproxy's own sockets carry it too)."
                );
                let _ = writeln!(out, "socket_mark = \"{:#x}\"", guard.mark);
            }
        }
    }
    if steer_loopback {
        let _ = writeln!(
            out,
            "# The recipe hands the host's connections to loopback addresses to its proxy too."
        );
        let _ = writeln!(out, "steer_loopback = true");
    }
    for (port, addrs) in &listeners {
        let _ = writeln!(out, "\n[[listener]]\nname = \"{}\"", listener_name(*port));
        let addrs: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
        let key = if keep_proxies { "external" } else { "listen" };
        let _ = writeln!(out, "{key} = [{}]", addrs.join(", "));
    }
    for rule in &kept {
        write_rule(&mut out, rule);
    }
    // A chain reached by several paths (a jump per input interface of a set, say) reports
    // the rule it cannot translate once.
    let mut reported = std::collections::HashSet::new();
    skipped.retain(|skip| reported.insert(skip.clone()));
    Translation {
        config: out,
        notes,
        skipped,
    }
}

/// The rules the kernel runs at prerouting, jumps inlined, in order, each or why it cannot
/// be translated; the rules of other tables and chains are noted.
fn flatten_entries(ruleset: &RuleSet, notes: &mut Vec<String>) -> Vec<Flat> {
    let flat = flatten_in_turn(
        ruleset,
        &ruleset.entry,
        &Match::default(),
        "prerouting",
        notes,
    );
    notes.extend(ruleset.kept.iter().cloned());
    if ruleset.ignored > 0 {
        notes.push(format!(
            "{} rules outside the prerouting TPROXY path (other tables and chains) were left alone",
            ruleset.ignored
        ));
    }
    flat
}

/// The socket-match rules that can become bypass rules. In iptables a DIVERT takes only
/// packets that have a socket, so it shadows no TPROXY rule; as a bypass it takes every
/// packet it matches, and tproxy applies the most specific rule first: a DIVERT more
/// specific than a TPROXY rule it overlaps would take that rule's new flows, so it is
/// reported instead (the program's socket match still serves the flows the rule steers).
fn diverts_as_bypasses(
    diverts: Vec<Parsed>,
    kept: &[Rule],
    skipped: &mut Vec<String>,
) -> Vec<Parsed> {
    diverts
        .into_iter()
        .filter(|divert| {
            let outranked = kept.iter().find(|(steer, listener)| {
                (listener.is_some()
                    || matches!(steer.target, Target::Drop | Target::Deliver | Target::Reject(_)))
                    && overlaps(&divert.matches, &steer.matches)
                    && more_specific(&divert.matches, &steer.matches)
            });
            if let Some((steer, _)) = outranked {
                skipped.push(format!(
                    "line {}: {}: as a bypass rule it would take the new flows of line {} ({}), \
                     which iptables steers, drops or delivers; leave it out, or make it no more specific \
                     than that rule",
                    divert.line, divert.text, steer.line, steer.text
                ));
            }
            outranked.is_none()
        })
        .collect()
}

/// `rules` with each reject kept where tproxy answers its packets as the reject did:
/// - a reject of the host's own addresses at TPROXY ports (the guides' guard against
///   connecting to the proxy directly, which would loop) becomes a bypass: tproxy's
///   listeners for those ports are on loopback addresses, so such a packet, once bypassed,
///   finds no socket and is refused by the kernel (a reset, a port unreachable), and tproxy
///   refuses to relay to its own listeners;
/// - a reject of TCP and UDP for other destinations becomes tproxy's `reject`, which answers
///   TCP with a reset and UDP with a port unreachable (TCP refused by an ICMP port
///   unreachable gets a reset instead, with a note: its connection is refused either way).
///
/// Other rejects are reported: another answer (a host unreachable is not a refused
/// connection), other protocols, the host's own addresses elsewhere.
fn rejects(
    rules: Vec<Rule>,
    listeners: &Listeners,
    keep_proxies: bool,
    notes: &mut Vec<String>,
    skipped: &mut Vec<String>,
) -> Vec<Rule> {
    rules
        .into_iter()
        .filter_map(|(rule, listener)| {
            let Target::Reject(with) = &rule.target else {
                return Some((rule, listener));
            };
            let on_loopback = |port: u16| {
                listeners
                    .get(&port)
                    .is_some_and(|addrs| addrs.iter().all(|a| a.ip().is_loopback()))
            };
            let own_addresses = rule.matches.dst_local;
            let guards_listeners = !keep_proxies
                && own_addresses
                && !rule.matches.ports.is_empty()
                && rule.matches.ports.iter().all(|ports| match *ports {
                    Ports::One(port) => on_loopback(port),
                    Ports::Range(first, last) => (first..=last).all(on_loopback),
                    Ports::Any => false,
                });
            if guards_listeners {
                notes.push(format!(
                    "line {}: `{}` keeps clients off the TPROXY port at the host's own \
                     addresses: it became a bypass, and nothing answers there in the \
                     translation (tproxy's listener is on a loopback address, and refuses to \
                     relay to itself), so such connections fail as they did, with a reset or \
                     a port unreachable. Stop the proxy that listened on the port",
                    rule.line, rule.text
                ));
                return Some((
                    Parsed {
                        target: Target::Bypass,
                        ..rule
                    },
                    listener,
                ));
            }
            // Any transport (none named) may match other protocols: reported below.
            let tcp = rule.matches.transports.contains(&Transport::Tcp);
            let refused = if own_addresses {
                Some(
                    "`reject` of the host's own addresses (translated only at the TPROXY ports \
                      of tproxy's own listeners)"
                        .to_string(),
                )
            } else if rule.matches.dst_anycast || rule.matches.dst_broadcast {
                Some(
                    "`reject` of anycast or broadcast addresses: tproxy answers no packet to an \
                     address of more than one host"
                        .to_string(),
                )
            } else if other_protocols::may_match_other_protocols(&rule.matches) {
                Some(
                    "`reject` of protocols besides TCP and UDP: tproxy answers TCP with a reset \
                      and UDP with a port unreachable, and drops or bypasses the others"
                        .to_string(),
                )
            } else if let RejectWith::Other(answer) = with {
                Some(format!(
                    "`reject with {answer}`: tproxy's reject answers TCP with a reset and UDP \
                     with a port unreachable"
                ))
            } else {
                None
            };
            if let Some(reason) = refused {
                skipped.push(format!("line {}: {}: {reason}", rule.line, rule.text));
                return None;
            }
            if *with == RejectWith::PortUnreachable && tcp {
                notes.push(format!(
                    "line {}: `{}`: tproxy answers its TCP packets with a reset where the rule \
                     sent a port unreachable: a new connection is refused either way, one \
                     already established is reset (a port unreachable would not end it)",
                    rule.line, rule.text
                ));
            }
            Some((rule, listener))
        })
        .collect()
}

/// Whether every destination `m` names is multicast or broadcast: tproxy's program passes
/// such packets, whatever its rules say.
fn only_local_scope(m: &Match) -> bool {
    let scopes = group_prefixes();
    !m.dst.is_empty()
        && !m.dst_local
        && m.dst
            .iter()
            .all(|p| scopes.iter().any(|scope| scope.contains(p)))
}

/// Listeners by port; the steer and bypass rules in order; with `keep_proxies`, the
/// socket-match rules, which become bypass rules.
fn listeners_and_rules(
    flat: Vec<Parsed>,
    keep_proxies: bool,
    notes: &mut Vec<String>,
    skipped: &mut Vec<String>,
) -> (Listeners, Vec<Rule>, Vec<Parsed>) {
    let mut listeners = Listeners::new();
    let mut rules: Vec<Rule> = Vec::new();
    let mut diverts = Vec::new();
    let mut divert_seen = false;
    let mut wildcard = false;
    for parsed in flat {
        match &parsed.target {
            Target::SocketDivert if keep_proxies => diverts.push(parsed),
            Target::SocketDivert => divert_seen = true,
            // `local::rules` made each OUTPUT MARK a TPROXY target or a reason, `deliver`
            // each PREROUTING one a delivery, a bypass or a reason, `established`
            // each other way to a flow's socket the socket match or a reason.
            Target::Ignore
            | Target::Jump(_)
            | Target::Goto(_)
            | Target::SetMark(_)
            | Target::MarkThenAccept(_)
            | Target::OwnAddressesOnLo
            | Target::Established(_) => {}
            Target::Deliver if other_protocols::may_match_other_protocols(&parsed.matches) => {
                // Written for TCP and UDP, as tproxy delivers them: the rest is reported.
                skipped.push(format!(
                    "line {}: {}: a mark for local delivery of protocols besides TCP and UDP: \
                     tproxy delivers only TCP and UDP (the translation does); keep a rule \
                     that marks the others",
                    parsed.line, parsed.text
                ));
                rules.push((parsed, None))
            }
            Target::Bypass
            | Target::Return
            | Target::Reject(_)
            | Target::Drop
            | Target::Deliver => rules.push((parsed, None)),
            Target::Unsteered(reason) => notes.push(format!(
                "line {}: `{}`: {reason}; left out",
                parsed.line, parsed.text
            )),
            Target::Tproxy { .. } if only_local_scope(&parsed.matches) => skipped.push(format!(
                "line {}: {}: steers only multicast or broadcast destinations, which tproxy \
                 never steers (it passes them: see `local_scope` in tproxy status)",
                parsed.line, parsed.text
            )),
            Target::Tproxy { on_ip, on_port, .. } => {
                let Some(port) = on_port.or_else(|| single_port(&parsed.matches)) else {
                    skipped.push(format!(
                        "line {}: {}: its proxy listens on each packet's own destination port \
                         (a TPROXY target without a port), and a tproxy listener has one port: \
                         write a rule per destination port",
                        parsed.line, parsed.text
                    ));
                    continue;
                };
                let addrs = listeners.entry(port).or_default();
                match keep_proxies {
                    true => wildcard |= add_external(addrs, &parsed, *on_ip, port, skipped),
                    false => add_listener(addrs, &parsed.matches, *on_ip, port),
                }
                rules.push((parsed, Some(port)));
            }
        }
    }
    if keep_proxies {
        if !listeners.is_empty() {
            notes.push(
                "--keep-proxies: the proxies listening on the TPROXY ports stay in the path; \
                 each port is an external listener, handed its flows as TPROXY did"
                    .into(),
            );
        }
        if wildcard {
            notes.push(
                "TPROXY without --on-ip looks for the proxy at the receiving interface's first \
                 address; the translation looks for it on the wildcard address (0.0.0.0, [::]), \
                 where proxies listen by default. Name the address with `external` if yours \
                 listens on another"
                    .into(),
            );
        }
        if !diverts.is_empty() {
            notes.push(
                "the socket-match DIVERT rules became bypass rules: they hand the proxies' own \
                 connections their packets (the servers' replies to a proxy that connects from \
                 the client's address, as Squid's tproxy mode does)"
                    .into(),
            );
        }
        return (listeners, rules, diverts);
    }
    if divert_seen {
        notes.push(
            "the socket-match DIVERT rules are built into tproxy (a flow's own socket is always \
             looked up first); they need no translation"
                .into(),
        );
    }
    if !listeners.is_empty() {
        notes.push(
            "tproxy relays steered flows to their original destination itself: the proxy that \
             listened on the TPROXY --on-port is no longer in the path (give a listener an \
             `upstream` to send its flows somewhere else)"
                .into(),
        );
    }
    (listeners, rules, Vec::new())
}

/// The one destination port `m` matches, if it matches only one.
fn single_port(m: &Match) -> Option<u16> {
    match m.ports[..] {
        [Ports::One(port)] => Some(port),
        _ => None,
    }
}

/// Adds where a TPROXY rule's proxy listens, one address per family the rule matches: its
/// `--on-ip`, or the wildcard address. Returns whether a wildcard was used.
fn add_external(
    addrs: &mut Vec<SocketAddr>,
    parsed: &Parsed,
    on_ip: Option<IpAddr>,
    on_port: u16,
    conflicts: &mut Vec<String>,
) -> bool {
    let (matches, line, text) = (&parsed.matches, parsed.line, &parsed.text);
    let mut wildcard = false;
    for family in families(matches) {
        let addr = match (on_ip, family) {
            (Some(ip @ IpAddr::V4(_)), Family::V4) | (Some(ip @ IpAddr::V6(_)), Family::V6) => ip,
            (_, Family::V4) => IpAddr::from([0u8; 4]),
            (_, Family::V6) => IpAddr::from([0u8; 16]),
        };
        wildcard |= addr.is_unspecified();
        let addr = SocketAddr::new(addr, on_port);
        match addrs.iter().find(|a| a.is_ipv4() == addr.is_ipv4()) {
            None => addrs.push(addr),
            Some(earlier) if *earlier != addr => conflicts.push(format!(
                "line {line}: {text}: its proxy is at {addr}, another TPROXY rule's on the same \
                 port at {earlier}; an external listener has one address per family: give the \
                 proxies different ports"
            )),
            Some(_) => {}
        }
    }
    wildcard
}

/// The address families a rule matches.
fn families(matches: &Match) -> Vec<Family> {
    match matches.family {
        Some(family) => vec![family],
        None => vec![Family::V4, Family::V6],
    }
}

/// Adds the addresses a TPROXY rule's listener needs, one per family the rule matches.
fn add_listener(addrs: &mut Vec<SocketAddr>, matches: &Match, on_ip: Option<IpAddr>, on_port: u16) {
    for family in families(matches) {
        let addr = match (on_ip, family) {
            (Some(ip @ IpAddr::V4(v4)), Family::V4) if !v4.is_unspecified() => ip,
            (Some(ip @ IpAddr::V6(v6)), Family::V6) if !v6.is_unspecified() => ip,
            (_, Family::V4) => "127.0.0.1".parse().unwrap(),
            (_, Family::V6) => "::1".parse().unwrap(),
        };
        let addr = SocketAddr::new(addr, on_port);
        if !addrs.iter().any(|a| a.is_ipv4() == addr.is_ipv4()) {
            addrs.push(addr);
        }
    }
}

/// iptables: first match wins; tproxy: most specific wins. Drops rules iptables never
/// reaches. A rule it reaches only in part keeps its place, with the packets that an
/// earlier rule takes first in rules of their own ahead of it (see [`first_come`]); when
/// those cannot be written, it is reported.
fn drop_shadowed(
    rules: Vec<Rule>,
    notes: &mut Vec<String>,
    skipped: &mut Vec<String>,
) -> Vec<Rule> {
    let mut kept: Vec<Rule> = Vec::new();
    // For each kept rule, the line whose action it carries (a first-come rule carries an
    // earlier line's).
    let mut decided_by: Vec<usize> = Vec::new();
    let mut by_destination = ShadowIndex::default();
    let mut reported_lines = BTreeSet::new();
    'rules: for (rule, listener) in rules {
        let mut outranked = Vec::new();
        for index in by_destination.candidates(&rule.matches, kept.len()) {
            let (earlier, earlier_listener) = &kept[index];
            if !overlaps(&earlier.matches, &rule.matches) {
                continue;
            }
            // What an exclusion lets fall through is not matched by its line: only a rule
            // with another action is compared with it.
            let other_action = !same_action(earlier, *earlier_listener, &rule, listener);
            let covering = covers(&earlier.matches, &rule.matches)
                && (other_action || !negation::is_hole(earlier));
            // Covered, it never decides a packet in tproxy either: it ranks no higher than
            // the earlier rule, or it does and then only on packets that rule takes first.
            if !covering && !more_specific(&rule.matches, &earlier.matches) {
                continue;
            }
            if covering {
                notes.push(format!(
                    "line {}: `{}` never matches: line {} comes first and matches all of its packets; left out",
                    rule.line, rule.text, decided_by[index]
                ));
                continue 'rules;
            }
            if other_action && !taken_before(&kept, index, &rule) {
                outranked.push(index);
            }
        }
        match first_come(&rule, &outranked, &kept, &decided_by, &by_destination) {
            Ok(firsts) => {
                for (first, line) in firsts {
                    notes.push(format!(
                        "line {}: `{}`: line {line} comes first and matches some of its \
                         packets; they keep line {line}'s action in a rule of their own ahead \
                         of it",
                        rule.line, rule.text
                    ));
                    by_destination.add(&first.0.matches, kept.len());
                    kept.push(first);
                    decided_by.push(line);
                }
            }
            Err(reason) => {
                skipped.push(format!(
                    "line {}: {}: {reason}; tproxy would apply this more specific rule to \
                     them instead",
                    rule.line, rule.text
                ));
                reported_lines.insert(rule.line);
                continue 'rules;
            }
        }
        by_destination.add(&rule.matches, kept.len());
        decided_by.push(rule.line);
        kept.push((rule, listener));
    }
    // A negated match is several rules from one line (the exclusions as bypasses, then the
    // rest): without one of them the others would steer what the original leaves alone, so
    // a line that lost one loses them all.
    kept.retain(|(rule, _)| {
        let partial = reported_lines.contains(&rule.line);
        if partial {
            skipped.push(format!(
                "line {}: {}: left out as well: another part of line {} is reported above",
                rule.line, rule.text, rule.line
            ));
        }
        !partial
    });
    kept
}

/// Whether every packet that `rule` and the kept rule at `index` both match meets an
/// earlier kept rule that matches it first: in iptables none of them reaches that rule, so
/// `rule` outranking it takes nothing from it (how `rule` ranks against the earlier one is
/// weighed with that one).
fn taken_before(kept: &[Rule], index: usize, rule: &Parsed) -> bool {
    let Narrowed::Both(both) = narrow(&kept[index].0.matches, &rule.matches) else {
        return false;
    };
    kept[..index]
        .iter()
        .any(|(earlier, _)| covers(&earlier.matches, &both))
}

/// Whether the kept rule at `index` decides none of the packets it shares with `among`: an
/// earlier kept rule matches all of those and outranks it on every packet both match. A
/// rule of their own for `among` that outranks it then takes nothing from it; what it
/// takes from the rule that does decide them is weighed with that one.
fn never_decides(kept: &[Rule], index: usize, among: &Match) -> bool {
    let rule = &kept[index].0.matches;
    kept[..index].iter().any(|(earlier, _)| {
        // Coming first, it keeps a tie: tproxy prefers the later rule only where it could
        // rank higher.
        !more_specific(rule, &earlier.matches) && covers_common(&earlier.matches, rule, among)
    })
}

/// Whether every packet that both `a` and `b` match, `outer` matches too. Where the model
/// cannot write their common matches (the host's addresses or a set's entries within
/// prefixes), those of one with the other's destination left out, which match more.
fn covers_common(outer: &Match, a: &Match, b: &Match) -> bool {
    let covered = |a: &Match, b: &Match| match narrow(a, b) {
        Narrowed::Both(both) => Some(covers(outer, &both)),
        Narrowed::Neither => Some(true),
        Narrowed::Inexpressible => None,
    };
    let without_destination = |m: &Match| Match {
        dst: Vec::new(),
        dst_local: false,
        not_dst_local: false,
        dst_anycast: false,
        dst_set: None,
        ..m.clone()
    };
    covered(a, b).unwrap_or_else(|| {
        covered(&without_destination(a), b) == Some(true)
            || covered(a, &without_destination(b)) == Some(true)
    })
}

/// Whether two kept rules do the same: steer to the same listener, bypass, drop, reject or
/// deliver.
fn same_action(a: &Parsed, a_listener: Option<u16>, b: &Parsed, b_listener: Option<u16>) -> bool {
    let ends = |rule: &Parsed| match rule.target {
        Target::Drop => Some("drop"),
        Target::Deliver => Some("deliver"),
        Target::Reject(_) => Some("reject"),
        _ => None,
    };
    a_listener == b_listener && ends(a) == ends(b)
}

/// For `rule`, which may outrank the `outranked` kept rules with another action on packets
/// they match first: a rule per outranked one for just those packets (the two rules' common
/// matches) with its action, to go ahead of `rule`, each with the line it carries.
///
/// Such a rule ranks as high as `rule` or higher (its prefix is the longer of the two, its
/// ports the common ones), and comes first on a tie, so on those packets it wins over
/// `rule`. It may in turn outrank a kept rule with another action that it overlaps, on
/// packets that rule (or one of its own action) decides: those packets get a rule of their
/// own with that rule's action ahead of it, and so on until no new rule outranks another
/// (see [`settle`]). A rule that decides none of the packets they share (see
/// [`never_decides`]) needs none: that one, or one above it, still decides them. Where
/// common matches cannot be written (a forwarded rule's mark, the host's addresses within
/// prefixes), or the rules would outrank each other without end, the reason.
fn first_come(
    rule: &Parsed,
    outranked: &[usize],
    kept: &[Rule],
    decided_by: &[usize],
    by_destination: &ShadowIndex,
) -> Result<Vec<(Rule, usize)>, String> {
    let mut firsts = Vec::new();
    for &index in outranked {
        let line = decided_by[index];
        let shadowed = format!("line {line} comes first and matches some of its packets");
        let first = common_rule(rule, &kept[index], line)
            .map_err(|reason| format!("{shadowed} ({reason})"))?;
        let Some(first) = first else {
            continue;
        };
        let rules = Kept {
            kept,
            decided_by,
            by_destination,
        };
        let wider = wider_rule(rule, &kept[index], line);
        settle(first, wider, line, &rules, &mut firsts, &shadowed, 0)?;
    }
    Ok(firsts)
}

/// The kept rules, with the line each carries and their index by destination.
struct Kept<'a> {
    kept: &'a [Rule],
    decided_by: &'a [usize],
    by_destination: &'a ShadowIndex,
}

/// How many rules of their own may stand in a chain, each ahead of the one it outranks
/// the kept rules for: rules that keep outranking each other's rules of their own name the
/// same packets with other actions, and would never settle.
const SETTLE_DEPTH: usize = 8;

/// Adds `first` (with the line it carries) to `firsts`, after rules of their own for the
/// packets of kept rules and of `firsts` it would outrank with another action (each
/// settled in turn). With those ahead of it, on each packet it matches the rule that wins
/// has the action that won before: where `first` wins, the rule it outranks has its action
/// or decides none of the packet's kind; where one of those rules wins, so does it by
/// induction. `wider` (`first` for the packets of every output interface) takes its place
/// when it outranks no rule with another action: the same argument holds for its packets,
/// and it asks nothing of the route (which may spare the programs a selection).
fn settle(
    first: Rule,
    wider: Option<Rule>,
    line: usize,
    rules: &Kept,
    firsts: &mut Vec<(Rule, usize)>,
    shadowed: &str,
    depth: usize,
) -> Result<(), String> {
    if let Some(wider) = wider.filter(|wider| contested(wider, rules, firsts).is_empty()) {
        if !redundant(&wider, firsts) {
            firsts.push((wider, line));
        }
        return Ok(());
    }
    if redundant(&first, firsts) {
        return Ok(());
    }
    let rule = &first.0;
    for (other, other_line) in contested(&first, rules, firsts) {
        if depth == SETTLE_DEPTH {
            return Err(format!(
                "{shadowed} (rules of their own for the packets it shares with line \
                 {other_line} would outrank each other without end)"
            ));
        }
        let ahead = common_rule(rule, &other, other_line).map_err(|reason| {
            format!(
                "{shadowed} (a rule of their own with its action would outrank line \
                 {other_line} too, and for the packets they share {reason})"
            )
        })?;
        if let Some(ahead) = ahead {
            let wider = wider_rule(rule, &other, other_line);
            settle(ahead, wider, other_line, rules, firsts, shadowed, depth + 1)?;
        }
    }
    firsts.push((first, line));
    Ok(())
}

/// Whether a rule of `firsts` with the same action, matches and rank as `rule` is already
/// ahead of it: it takes all of its packets.
fn redundant((rule, listener): &Rule, firsts: &[(Rule, usize)]) -> bool {
    firsts.iter().any(|((ahead, ahead_listener), _)| {
        let (a, m) = (&ahead.matches, &rule.matches);
        same_action(ahead, *ahead_listener, rule, *listener)
            && covers(a, m)
            && covers(m, a)
            && a.dst == m.dst
            && a.ports == m.ports
    })
}

/// The kept rules and `firsts` (with the lines they carry) that `rule` outranks with
/// another action on packets they decide.
fn contested(
    (rule, listener): &Rule,
    rules: &Kept,
    firsts: &[(Rule, usize)],
) -> Vec<(Rule, usize)> {
    let outranks = |(other, other_listener): &Rule| {
        !same_action(other, *other_listener, rule, *listener)
            && overlaps(&other.matches, &rule.matches)
            && more_specific(&rule.matches, &other.matches)
    };
    rules
        .by_destination
        .candidates(&rule.matches, rules.kept.len())
        .into_iter()
        .filter(|&other| {
            outranks(&rules.kept[other]) && !never_decides(rules.kept, other, &rule.matches)
        })
        .map(|other| (rules.kept[other].clone(), rules.decided_by[other]))
        .chain(firsts.iter().filter(|(ahead, _)| outranks(ahead)).cloned())
        .collect()
}

/// [`common_rule`] for `rule` without its output interface, when it has one and the
/// result can be written.
fn wider_rule(rule: &Parsed, earlier: &Rule, line: usize) -> Option<Rule> {
    rule.matches.out_iface.as_ref()?;
    let wider = Parsed {
        matches: Match {
            out_iface: None,
            ..rule.matches.clone()
        },
        ..rule.clone()
    };
    common_rule(&wider, earlier, line).ok().flatten()
}

/// A rule for the packets both `rule` and `earlier` match, with `earlier`'s action (which
/// it has from `line`): `None` when none does, why not when the model cannot write them.
fn common_rule(
    rule: &Parsed,
    (earlier, listener): &Rule,
    line: usize,
) -> Result<Option<Rule>, String> {
    let selectors = |m: &Match| {
        !m.uids.is_empty() || !m.gids.is_empty() || !m.cgroups.is_empty() || !m.classids.is_empty()
    };
    // Rules for local connections may have both (a mark is the socket's there); two
    // forwarded rules share the packet's mark, which a rule of their own matches as well. (A
    // forwarded and a local rule never overlap: no rule of their own is asked for.)
    let both_local = earlier.matches.local && rule.matches.local;
    if !both_local && (selectors(&earlier.matches) || selectors(&rule.matches)) {
        return Err(
            "a rule of their own cannot say which: marks and selectors are not \
                    combined"
                .into(),
        );
    }
    let both = match narrow(&earlier.matches, &rule.matches) {
        Narrowed::Both(both) => *both,
        Narrowed::Neither => return Ok(None),
        Narrowed::Inexpressible => {
            if let Some(set) = earlier
                .matches
                .dst_set
                .as_ref()
                .or(rule.matches.dst_set.as_ref())
            {
                // Which entries the set will hold is known only at run time: one may be
                // shorter or longer than the other rule's prefixes.
                return Err(format!(
                    "set {set}'s entries, followed as they change, rank in tproxy by their \
                     own prefix lengths, and a rule of their own cannot name both the set and \
                     a prefix"
                ));
            }
            return Err("a rule of their own cannot say which".into());
        }
    };
    if both.dst_anycast && listener.is_some() {
        return Err("the anycast routes' destinations, which a steer rule cannot name".into());
    }
    if !both_local
        && both.mark.is_some()
        && (both.dst_local || both.dst_anycast || both.dst_set.is_some())
    {
        // A marked rule is tried one by one, an entry per destination: one per address or
        // set entry as they come and go, which the program's few mark entries may not hold
        // (found in review: `check` cannot count them ahead).
        return Err(
            "a rule of their own would need the packet's mark and destinations followed at run \
             time (the host's addresses, a set's entries), an entry of the program's mark stage \
             each"
                .into(),
        );
    }
    let first = Parsed {
        text: format!("its packets that line {line} takes first, with line {line}'s action"),
        matches: both,
        target: earlier.target.clone(),
        comment: earlier.comment.clone(),
        ..rule.clone()
    };
    Ok(Some((first, *listener)))
}

/// What the operator should know when tproxy routes with `own` in place of the TPROXY
/// rules' `tproxy_mark`, whose bits the rules' marks look at; `read_by_rules`: they look at
/// `own`'s bit too.
fn marks_read_note(
    tproxy_mark: Option<Mark>,
    routing: Mark,
    own: Mark,
    read_by_rules: bool,
) -> String {
    let (routing, relied_on) = match tproxy_mark {
        Some(mark) => (format!("the TPROXY rules' mark {mark}"), mark.to_string()),
        None => (
            format!("tproxy's default routing mark {routing}"),
            routing.to_string(),
        ),
    };
    let reading = if read_by_rules {
        "the rules' marks are read without that bit, which no rule needs set and only tproxy \
         sets"
    } else {
        "no rule's mark looks at that bit"
    };
    format!(
        "rules match marks that look at the bits of {routing}, which tproxy's rules do not see \
         (it sets them itself); tproxy installs its own policy routing, so it routes the \
         packets it steers with a mark of its own, {own} ({reading}). Anything else that \
         relied on steered packets carrying {relied_on} (an `ip rule`, a later netfilter rule) \
         sees {own} instead"
    )
}

/// Whether a rule that untracks the packets with `untracked` tells a steered packet from
/// the same packet unsteered: an arrival comes unmarked, and tproxy's program sets the
/// `routing` bits on it before netfilter runs, where the TPROXY recipe marks it after the
/// raw table.
fn untracks_steered(untracked: Mark, routing: Mark) -> bool {
    let untracks = |mark: u32| mark & untracked.mask == untracked.value;
    untracks(0) != untracks(routing.value)
}

/// What the operator should know when tproxy routes with `own` in place of `routing`
/// because a chain left alone untracks the packets with that mark (`untracked`).
fn untracked_note(untracked: &UntrackedMark, routing: Mark, own: Mark) -> String {
    format!(
        "line {}: `{}`, in a chain left alone, untracks the packets that carry {:#x}, which \
         tproxy's program would set ({routing}) on every packet it steers before netfilter \
         runs; tproxy installs its own policy routing, so it routes the packets it steers with \
         a mark of its own, {own}, which does not change whether that rule matches. In the \
         original it \
         untracked only packets that arrived with that mark, such as the host's that mangle \
         OUTPUT marked and routed back by lo: tproxy steers those connections by its own \
         programs, with {own}, and the kernel tracks them now (which matters only to a rule \
         that reads their conntrack state)",
        untracked.line, untracked.text, untracked.mark.value
    )
}

/// `kept` without the rules whose mark needs bits of the `routing` mark, which tproxy's
/// rules do not see (see `datapath::rules::effective_mark`): they are reported.
fn unseen_marks_left_out(kept: Vec<Rule>, routing: Mark, skipped: &mut Vec<String>) -> Vec<Rule> {
    let unseen_mark = |rule: &Parsed| {
        rule.matches
            .mark
            .filter(|&mark| looks_at_routing(mark, routing))
    };
    let mut unseen_lines = BTreeSet::new();
    for (rule, _) in &kept {
        if let Some(mark) = unseen_mark(rule) {
            skipped.push(format!(
                "line {}: {}: its mark {mark} looks at the bits of the routing mark \
                 {routing}, which tproxy sets itself and its rules do not see",
                rule.line, rule.text
            ));
            unseen_lines.insert(rule.line);
        }
    }
    // An excluded mark is several rules from one line (see `negation`): without one of
    // them the others would not do what the line does.
    kept.into_iter()
        .filter(|(rule, _)| {
            let partial = unseen_lines.contains(&rule.line);
            if partial && unseen_mark(rule).is_none() {
                skipped.push(format!(
                    "line {}: {}: left out as well: another part of line {} is reported above",
                    rule.line, rule.text, rule.line
                ));
            }
            !partial
        })
        .collect()
}

/// Whether `rule` steers or drops packets arriving on `lo` only, when they come from
/// elsewhere (not a rule for locally generated traffic).
fn acts_on_lo_arrivals((rule, listener): &Rule) -> bool {
    !rule.matches.local
        && rule.matches.iface.as_deref() == Some(LOOPBACK)
        && (listener.is_some()
            || matches!(
                rule.target,
                Target::Drop | Target::Deliver | Target::Reject(_)
            ))
}

/// `kept` without the forwarded rules that steer or drop arrivals on `lo` when other rules
/// apply to every interface and rules for locally generated traffic exist: tproxy then runs
/// the local rules' program on `lo` in place of the one for arrivals (see
/// `datapath::steering`), so those rules would never run. They are reported, and the other
/// parts of their lines with them. (Without local rules, `lo` is attached beside `all`, see
/// `write_interfaces`.)
fn lo_arrivals_left_out(kept: Vec<Rule>, skipped: &mut Vec<String>) -> Vec<Rule> {
    let every_interface = kept
        .iter()
        .any(|(rule, _)| !rule.matches.local && rule.matches.iface.is_none());
    let local = kept.iter().any(|(rule, _)| rule.matches.local);
    if !every_interface || !local {
        return kept;
    }
    let mut lines = BTreeSet::new();
    for (rule, _) in kept.iter().filter(|kept| acts_on_lo_arrivals(kept)) {
        skipped.push(format!(
            "line {}: {}: it steers, drops, rejects or delivers arrivals on lo, and other rules apply to every \
             interface (`interfaces = [\"all\", \"lo\"]`), but with rules for local \
             connections tproxy runs their program on lo in place of the one for arrivals, so \
             it would never run",
            rule.line, rule.text
        ));
        lines.insert(rule.line);
    }
    kept.into_iter()
        .filter(|kept| {
            let (rule, _) = kept;
            let partial = lines.contains(&rule.line);
            if partial && !acts_on_lo_arrivals(kept) {
                skipped.push(format!(
                    "line {}: {}: left out as well: another part of line {} is reported above",
                    rule.line, rule.text, rule.line
                ));
            }
            !partial
        })
        .collect()
}

/// `interfaces`: the rules' input interfaces, or all when a rule names none (with `lo`
/// when rules steer or drop arrivals there: `all` leaves it out). Rules for locally
/// generated traffic have no input interface.
fn write_interfaces(out: &mut String, kept: &[Rule]) {
    let forwarded: Vec<&Rule> = kept
        .iter()
        .filter(|(rule, _)| !rule.matches.local)
        .collect();
    let ifaces: Vec<&String> = {
        let mut seen: Vec<&String> = Vec::new();
        for (rule, _) in &forwarded {
            if let Some(iface) = &rule.matches.iface {
                if !seen.contains(&iface) {
                    seen.push(iface);
                }
            }
        }
        seen
    };
    if forwarded
        .iter()
        .any(|(rule, _)| rule.matches.iface.is_none())
        || ifaces.is_empty()
    {
        let _ = writeln!(
            out,
            "# Rules without an input interface applied to packets arriving on any interface."
        );
        if kept.iter().any(acts_on_lo_arrivals) {
            let _ = writeln!(
                out,
                "# lo too, which `all` leaves out: rules steer or drop arrivals there."
            );
            let _ = writeln!(out, "interfaces = [\"all\", \"{LOOPBACK}\"]");
        } else {
            let _ = writeln!(out, "interfaces = \"all\"");
        }
    } else {
        let names: Vec<String> = ifaces.iter().map(|i| quote(i)).collect();
        let _ = writeln!(out, "interfaces = [{}]", names.join(", "));
    }
}

/// The TPROXY rules' mark (the first, noting when they set several).
fn tproxy_mark(kept: &[Rule], notes: &mut Vec<String>) -> Option<Mark> {
    let mut marks: Vec<Mark> = Vec::new();
    for (rule, _) in kept {
        if let Target::Tproxy {
            mark: Some(mark), ..
        } = rule.target
        {
            if !marks.contains(&mark) {
                marks.push(mark);
            }
        }
    }
    let first = marks.first().copied()?;
    if marks.len() > 1 {
        notes.push(format!(
            "the TPROXY rules set {} different marks; tproxy sets one, {first}, on every steered packet",
            marks.len()
        ));
    }
    Some(first)
}

/// One `[[rule]]` table, headed by the line it came from.
fn write_rule(out: &mut String, (rule, listener): &Rule) {
    write_origin(out, rule);
    write_matches(out, &rule.matches);
    match listener {
        Some(port) => {
            let _ = writeln!(
                out,
                "action = \"steer\"\nlistener = \"{}\"",
                listener_name(*port)
            );
        }
        None if rule.target == Target::Drop => {
            let _ = writeln!(out, "action = \"drop\"");
        }
        None if rule.target == Target::Deliver => {
            let _ = writeln!(out, "action = \"deliver\"");
        }
        None if matches!(rule.target, Target::Reject(_)) => {
            let _ = writeln!(out, "action = \"reject\"");
        }
        None => {
            let _ = writeln!(out, "action = \"bypass\"");
        }
    }
}

/// The table's header and the comments naming the line (and its `-m comment`).
fn write_origin(out: &mut String, rule: &Parsed) {
    // A comment cannot hold control characters.
    let printable = |text: &str| -> String {
        text.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect()
    };
    let _ = writeln!(
        out,
        "\n[[rule]]\n# line {}: {}",
        rule.line,
        printable(&rule.text)
    );
    if let Some(comment) = &rule.comment {
        let _ = writeln!(out, "# comment: {}", printable(comment));
    }
}

/// The rule's matches, one key each.
fn write_matches(out: &mut String, m: &Match) {
    let transports = if m.transports.is_empty() {
        vec![Transport::Tcp, Transport::Udp]
    } else {
        m.transports.clone()
    };
    let mut names: Vec<&str> = transports
        .iter()
        .map(|t| match t {
            Transport::Tcp => "\"tcp\"",
            Transport::Udp => "\"udp\"",
        })
        .collect();
    if m.other_protocols {
        names.push("\"other\"");
    }
    let _ = writeln!(out, "proto = [{}]", names.join(", "));
    write_destination(out, m);
    if !m.src.is_empty() {
        let _ = writeln!(out, "src = [{}]", quoted(&m.src));
    }
    if !m.ports.is_empty() {
        let _ = writeln!(out, "ports = [{}]", port_list(&m.ports));
    }
    if !m.sports.is_empty() {
        let _ = writeln!(out, "sport = [{}]", port_list(&m.sports));
    }
    if let Some(iface) = &m.iface {
        let _ = writeln!(out, "iface = {}", quote(iface));
    }
    match m.mark {
        Some(mark) if mark.mask == u32::MAX => {
            let _ = writeln!(out, "mark = \"{:#x}\"", mark.value);
        }
        Some(mark) => {
            let _ = writeln!(out, "mark = \"{mark}\"");
        }
        None => {}
    }
    if let Some(direction) = m.ct_direction {
        let _ = writeln!(out, "ct_direction = \"{direction}\"");
    }
    if m.local {
        local::write_selectors(out, m);
    }
}

/// `dst`: the prefixes, the family's whole space, the host's own addresses, the anycast
/// routes' destinations or a followed ipset's entries.
fn write_destination(out: &mut String, m: &Match) {
    if let Some(name) = &m.dst_set {
        let _ = writeln!(out, "dst = {}", quote(&format!("ipset:{name}")));
        return;
    }
    let followed = match (m.dst_anycast, m.dst_local) {
        (true, _) => Some(config::ANYCAST),
        (false, true) => Some(config::LOCAL),
        (false, false) => None,
    };
    if let Some(keyword) = followed {
        let (ipv4, ipv6) = match m.family {
            None => (true, true),
            Some(Family::V4) => (true, false),
            Some(Family::V6) => (false, true),
        };
        let keyword = config::with_families(keyword, ipv4, ipv6);
        let _ = writeln!(out, "dst = \"{keyword}\"");
        return;
    }
    let dst = match (m.dst.is_empty(), m.family) {
        (false, _) => m.dst.clone(),
        (true, Some(Family::V4)) => vec!["0.0.0.0/0".parse().unwrap()],
        (true, Some(Family::V6)) => vec!["::/0".parse().unwrap()],
        (true, None) => Vec::new(),
    };
    if !dst.is_empty() {
        let _ = writeln!(out, "dst = [{}]", quoted(&dst));
    }
}

/// Ports as a TOML list: numbers, and ranges as strings.
fn port_list(ports: &[Ports]) -> String {
    let items: Vec<String> = ports
        .iter()
        .map(|p| match p {
            Ports::One(port) => port.to_string(),
            other => format!("\"{other}\""),
        })
        .collect();
    items.join(", ")
}

fn listener_name(port: u16) -> String {
    format!("tproxy-{port}")
}

/// `text` as a TOML string, escaped.
fn quote(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

fn quoted(prefixes: &[IpNet]) -> String {
    let items: Vec<String> = prefixes.iter().map(|p| format!("\"{p}\"")).collect();
    items.join(", ")
}
