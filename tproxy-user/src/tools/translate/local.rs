//! mangle OUTPUT: the half of the TPROXY recipe that proxies the host itself.
//!
//! Its rules `MARK --set-mark` locally generated packets with the recipe's mark; the
//! recipe's `ip rule fwmark … lookup` table (`local 0.0.0.0/0 dev lo`) sends them over `lo`,
//! where PREROUTING's TPROXY takes them like forwarded packets. tproxy does the same with
//! rules of `origin = "local"`: its connect programs mark the selected processes' sockets and
//! its program on `lo` steers them. So a MARK rule setting the TPROXY rules' mark becomes a
//! local steer rule to the listener of the PREROUTING TPROXY rules that take its packets when
//! they come back on `lo`, the chain's RETURN and ACCEPT rules become local bypass rules, and
//! `-m owner --uid-owner` and `-m cgroup --path` become the rules' `uid` and `cgroup`.
//!
//! PREROUTING's bypass rules are not applied to the packets that come back on `lo`: the
//! guides repeat them in OUTPUT, and a marked packet that PREROUTING lets through would reach
//! no socket (the recipe's table delivers it locally), which no rule of tproxy's reproduces.

use std::fmt::Write as _;

use super::{
    flatten::{flatten_in_turn, narrow, Flat, Narrowed},
    own_mark::Guard,
    precedence::{covers, group_prefixes, iface_covers, loopback_prefixes, overlaps},
    Match, Parsed, RuleSet, Target,
};
use ipnet::IpNet;

use tproxy_common::local_origin::{ClassidRange, UidRange};

use crate::{
    datapath::rules::{CtDirection, Ports},
    values::{Mark, Transport},
};

/// The rules the kernel runs for locally generated packets, jumps inlined, in order: the
/// MARK rules that steer made TPROXY targets like those that take their packets on `lo`;
/// each rule or why it cannot be translated. `prerouting`: the flattened PREROUTING rules.
pub(super) fn rules(ruleset: &RuleSet, prerouting: &[Flat], notes: &mut Vec<String>) -> Vec<Flat> {
    let context = Match {
        local: true,
        ..Match::default()
    };
    let flat = flatten_in_turn(ruleset, &ruleset.local_entry, &context, "output", notes);
    let recipe_mark = prerouting
        .iter()
        .flatten()
        .find_map(|rule| match rule.target {
            Target::Tproxy { mark, .. } => mark,
            _ => None,
        });
    let flat = no_op_mark_matches_left_out(flat, recipe_mark, notes);
    // Before the rules' packets are followed to lo per transport (a TCP part that never
    // matches must not refuse its UDP part); again at the end, for the directions the rules
    // for the host's own addresses take from PREROUTING.
    let flat = tcp_directions_settled(flat, notes);
    let mut out = Vec::with_capacity(flat.len());
    // The range an unbound socket's port comes from, on this host (the kernel's default
    // when it cannot be read), and the lines whose source ports lie outside it.
    let read_range = crate::datapath::rules::ephemeral_port_range();
    let ephemeral = read_range.unwrap_or((32768, 60999));
    let mut bound_port_lines = Vec::new();
    // The OUTPUT rules met so far: what they take never reaches a later MARK.
    let mut earlier: Vec<Parsed> = Vec::new();
    for rule in flat {
        let rule = match rule {
            Ok(rule) => rule,
            Err(reason) => {
                out.push(Err(reason));
                continue;
            }
        };
        earlier.push(rule.clone());
        let before = &earlier[..earlier.len() - 1];
        let refuse = |reason: &str| Err(format!("line {}: {}: {reason}", rule.line, rule.text));
        if !rule.matches.src.is_empty() || !rule.matches.not_src.is_empty() {
            out.push(refuse(
                "a source address match on locally generated traffic (tproxy decides at \
                 connect, before the kernel picks the source)",
            ));
            continue;
        }
        if !rule.matches.sports.is_empty() {
            let (first, last) = ephemeral;
            let ephemeral = |ports: &Ports| {
                let (low, high) = ports.bounds();
                low <= last && first <= high
            };
            if rule.matches.sports.iter().any(ephemeral) {
                out.push(refuse(&format!(
                    "a source port match on locally generated traffic that takes ports of the \
                     ephemeral range {first}-{last} (net.ipv4.ip_local_port_range): tproxy \
                     decides at connect, before the kernel picks such a port"
                )));
                continue;
            }
            if !bound_port_lines.contains(&rule.line) {
                bound_port_lines.push(rule.line);
            }
        }
        match rule.target.clone() {
            Target::SetMark(mark) | Target::MarkThenAccept(mark) => {
                match steers(mark, recipe_mark) {
                    Ok(())
                        if rule.matches.out_iface.as_deref().is_some_and(|iface| {
                            crate::datapath::interfaces::matches(iface, "lo")
                        }) =>
                    {
                        out.push(refuse(
                            "an output interface that takes lo, the route of the host's own \
                         addresses, whose packets meet PREROUTING's rules on lo, bypasses \
                         included (tproxy translates that as `-m addrtype --dst-type LOCAL`)",
                        ))
                    }
                    Ok(()) if rule.matches.dst_local => {
                        out.extend(on_lo_to_own_addresses(&rule, mark, prerouting))
                    }
                    Ok(()) => out.extend(steered(
                        &rule,
                        (!ruleset.mark_set_elsewhere).then_some(mark),
                        prerouting,
                        before,
                        notes,
                    )),
                    // Its packets leave the chain with a mark that leads to no TPROXY rule.
                    Err(reason) if never_the_recipes(mark, recipe_mark) => {
                        // Only a MARK's packets go on to later rules: an accept's do not.
                        let steering: Vec<usize> = before
                            .iter()
                            .filter(|b| {
                                matches!(b.target, Target::SetMark(set) if steers(set, recipe_mark).is_ok())
                            })
                            .map(|b| b.line)
                            .collect();
                        out.push(unmarked(rule, &steering, &out, reason))
                    }
                    Err(reason) => out.push(refuse(&reason)),
                }
            }
            // Unmarked (their socket's own mark, 0 for most): PREROUTING's mark matches
            // read it as 0.
            Target::OwnAddressesOnLo => out.extend(on_lo_to_own_addresses(
                &rule,
                Mark {
                    value: 0,
                    mask: u32::MAX,
                },
                prerouting,
            )),
            Target::Bypass | Target::Return | Target::Ignore | Target::Unsteered(_) => {
                out.push(Ok(rule))
            }
            Target::Drop => out.push(refuse(
                "DROP of locally generated traffic (tproxy's rules for it only steer or leave \
                 alone; keep it in a firewall rule)",
            )),
            Target::Tproxy { .. }
            | Target::Deliver
            | Target::SocketDivert
            | Target::Established(_)
            | Target::Jump(_)
            | Target::Goto(_)
            | Target::Reject(_) => out.push(refuse("not a target for locally generated traffic")),
        }
    }
    out_interface_of_bypasses_left_out(&mut out);
    if out
        .iter()
        .flatten()
        .any(|rule| matches!(rule.target, Target::Tproxy { .. }))
    {
        notes.push(
            "mangle OUTPUT's MARK rules for the TPROXY rules' mark became rules with origin = \
             \"local\": tproxy's programs select the processes' connections and datagrams \
             themselves (see `tproxy run --local`)"
                .into(),
        );
    }
    if !bound_port_lines.is_empty() {
        let (first, last) = ephemeral;
        let lines: Vec<String> = bound_port_lines.iter().map(usize::to_string).collect();
        notes.push(format!(
            "the source ports of mangle OUTPUT (line {}) became `sport` of rules for local \
             connections: tproxy matches the port a socket is bound to when it connects or \
             sends. They lie outside the ephemeral range {first}-{last} ({}), so only a socket \
             bound to one has it, as OUTPUT saw (keep them outside that range; tproxy warns \
             when they are not)",
            lines.join(", "),
            if read_range.is_some() {
                "net.ipv4.ip_local_port_range here"
            } else {
                "the kernel's default: net.ipv4.ip_local_port_range could not be read"
            }
        ));
    }
    tcp_directions_settled(out, notes)
}

/// `out` with the direction of a local TCP connection settled: tproxy decides one at its
/// connect, always the original direction (as OUTPUT sees its packets: a local server's
/// answers on accepted sockets never meet a connect). A rule for the reply direction is
/// for UDP only, and left out when it was for TCP only; one for the original direction is
/// a TCP rule without it, and a UDP rule with it.
fn tcp_directions_settled(out: Vec<Flat>, notes: &mut Vec<String>) -> Vec<Flat> {
    let mut settled = Vec::with_capacity(out.len());
    for rule in out {
        let Ok(rule) = rule else {
            settled.push(rule);
            continue;
        };
        let Some(direction) = rule.matches.ct_direction else {
            settled.push(Ok(rule));
            continue;
        };
        let transports = match rule.matches.transports.as_slice() {
            [] => vec![Transport::Tcp, Transport::Udp],
            some => some.to_vec(),
        };
        if !transports.contains(&Transport::Tcp) {
            settled.push(Ok(rule));
            continue;
        }
        let with_transports = |transports: Vec<Transport>, direction| {
            let mut rule = rule.clone();
            rule.matches.transports = transports;
            rule.matches.ct_direction = direction;
            rule
        };
        let udp = transports.contains(&Transport::Udp);
        match direction {
            CtDirection::Reply if udp => {
                settled.push(Ok(with_transports(vec![Transport::Udp], Some(direction))))
            }
            CtDirection::Reply => notes.push(format!(
                "line {}: `{}` never matches a connection of the host's own (a connect is the \
                 original direction); left out",
                rule.line, rule.text
            )),
            CtDirection::Original => {
                settled.push(Ok(with_transports(vec![Transport::Tcp], None)));
                if udp {
                    settled.push(Ok(with_transports(vec![Transport::Udp], Some(direction))));
                }
            }
        }
    }
    settled
}

/// `flat` without the rules that leave packets with the recipe's mark alone when every
/// later rule would leave them as they are too (it accepts them, or sets that mark
/// again, which changes nothing and routes nothing anew): sbshell's `meta mark 0x1 accept`
/// ahead of its MARK rules. It would otherwise look like a loop guard, which it is not:
/// those packets go on to `lo` and PREROUTING's TPROXY rules either way.
fn no_op_mark_matches_left_out(
    flat: Vec<Flat>,
    recipe: Option<Mark>,
    notes: &mut Vec<String>,
) -> Vec<Flat> {
    let Some(recipe) = recipe else {
        return flat;
    };
    let keeps = |rule: &Flat, mark: u32| match rule {
        Ok(rule) => match rule.target {
            Target::SetMark(set) | Target::MarkThenAccept(set) => {
                set.mask == u32::MAX && set.value == mark
            }
            Target::Bypass | Target::Return | Target::Ignore | Target::Unsteered(_) => true,
            _ => false,
        },
        Err(_) => false,
    };
    let no_op = |i: usize| match &flat[i] {
        Ok(rule) => {
            let is_recipe_mark = rule.matches.mark.is_some_and(|mark| {
                mark.mask == u32::MAX && mark.value & recipe.mask == recipe.value & recipe.mask
            });
            is_recipe_mark
                && matches!(rule.target, Target::Bypass | Target::Return)
                && !rule.matches.excludes()
                && flat[i + 1..]
                    .iter()
                    .all(|later| keeps(later, rule.matches.mark.map_or(0, |m| m.value)))
        }
        Err(_) => false,
    };
    let left_out: Vec<usize> = (0..flat.len()).filter(|&i| no_op(i)).collect();
    flat.into_iter()
        .enumerate()
        .filter_map(|(i, rule)| {
            if !left_out.contains(&i) {
                return Some(rule);
            }
            if let Ok(rule) = &rule {
                notes.push(format!(
                    "line {}: `{}` changes nothing: the packets it lets through already carry \
                     the TPROXY rules' mark, which the later rules only set again; left out",
                    rule.line, rule.text
                ));
            }
            None
        })
        .collect()
}

/// Whether setting `mark` in OUTPUT feeds the TPROXY recipe: it sets the mark the TPROXY
/// rules set (which the recipe's `ip rule fwmark` routes to `lo`).
pub(super) fn steers(mark: Mark, recipe: Option<Mark>) -> Result<(), String> {
    let Some(recipe) = recipe else {
        return Err(format!(
            "target MARK: no PREROUTING TPROXY rule sets a mark (--tproxy-mark) to tell \
             whether {mark} leads to it"
        ));
    };
    let sets_recipe_bits = mark.mask & recipe.mask == recipe.mask;
    if sets_recipe_bits && mark.value & recipe.mask == recipe.value & recipe.mask {
        Ok(())
    } else {
        Err(format!(
            "target MARK: it sets {mark}, not the TPROXY rules' mark {recipe}, so it does not \
             lead to them"
        ))
    }
}

/// Whether every packet `mark` is set on leaves without the recipe's mark: it sets one of
/// the recipe's bits to another value. (A mark that sets only some of them, or keeps the
/// packet's own bits, may leave a packet with the recipe's mark.)
pub(super) fn never_the_recipes(mark: Mark, recipe: Option<Mark>) -> bool {
    recipe.is_some_and(|recipe| (mark.value ^ recipe.value) & mark.mask & recipe.mask != 0)
}

/// A MARK rule as local steer rules: per listener that its packets reach on `lo`, the rule
/// with the transports that reach it and that listener's TPROXY target. `set`: the mark it
/// sets, which they carry there (`None`: a rule left alone may change it on the way).
/// `before`: the OUTPUT rules ahead of it.
fn steered(
    rule: &Parsed,
    set: Option<Mark>,
    prerouting: &[Flat],
    before: &[Parsed],
    notes: &mut Vec<String>,
) -> Vec<Flat> {
    let transports = match rule.matches.transports.is_empty() {
        true => vec![Transport::Tcp, Transport::Udp],
        false => rule.matches.transports.clone(),
    };
    let mut by_target: Vec<(Target, Vec<Transport>)> = Vec::new();
    let mut for_host: Vec<(usize, Match)> = Vec::new();
    for transport in transports {
        match target_on_lo(
            rule,
            transport,
            set,
            prerouting,
            before,
            &mut for_host,
            notes,
        ) {
            Ok(target) => match by_target.iter_mut().find(|(t, _)| *t == target) {
                Some((_, transports)) => transports.push(transport),
                None => by_target.push((target, vec![transport])),
            },
            Err(reason) => {
                return vec![Err(format!("line {}: {}: {reason}", rule.line, rule.text))]
            }
        }
    }
    let one_target = by_target.len() == 1;
    // What a PREROUTING bypass sends to the host itself, its destination: let go here too.
    let mut rules: Vec<Flat> = Vec::new();
    for (line, matches) in for_host {
        // The same packets met for TCP and for UDP: one rule for both.
        let same_but_transport = rules.iter_mut().flatten().find(|r: &&mut Parsed| {
            Match {
                transports: matches.transports.clone(),
                ..r.matches.clone()
            } == matches
        });
        if let Some(known) = same_but_transport {
            for transport in &matches.transports {
                if !known.matches.transports.contains(transport) {
                    known.matches.transports.push(*transport);
                }
            }
        } else {
            rules.push(Ok(Parsed {
                text: format!(
                    "{} (what line {line} lets go for this host when it comes back on lo)",
                    rule.text
                ),
                matches,
                target: Target::Bypass,
                ..rule.clone()
            }));
        }
    }
    rules.extend(by_target.into_iter().map(|(target, transports)| {
        let mut matches = rule.matches.clone();
        if !one_target {
            matches.transports = transports;
        }
        Ok(Parsed {
            matches,
            target,
            ..rule.clone()
        })
    }));
    rules
}

/// A MARK or mark and accept `rule` whose packets leave with a mark that is never the
/// recipe's. The last mark set is the one routed, and no rule in first-match order after
/// an earlier MARK (on the lines `steering` of `out`, the local rules so far) takes back
/// what it set the recipe's mark on: reported. Otherwise a mark and accept is a bypass in
/// its place, and a MARK is reported for `reason` (a later rule may read its mark, and
/// another `ip rule` route by it).
fn unmarked(rule: Parsed, steering: &[usize], out: &[Flat], reason: String) -> Flat {
    let earlier = out.iter().flatten().find(|r| {
        matches!(r.target, Target::Tproxy { .. })
            && steering.contains(&r.line)
            && overlaps(&r.matches, &rule.matches)
    });
    match earlier {
        Some(earlier) => Err(format!(
            "line {}: {}: it takes the TPROXY rules' mark off packets line {} set it on (the \
             last mark set is the one routed), which rules in first-match order cannot say",
            rule.line, rule.text, earlier.line
        )),
        None if matches!(rule.target, Target::MarkThenAccept(_)) => Ok(Parsed {
            target: Target::Bypass,
            ..rule
        }),
        None => Err(format!("line {}: {}: {reason}", rule.line, rule.text)),
    }
}

/// A MARK rule for the host's own addresses: its packets come back on `lo` to PREROUTING,
/// whose rules take them in order, bypasses too (what PREROUTING lets through is delivered
/// to its destination, the host's own). One rule for what each PREROUTING rule takes first,
/// with that rule's action; what none takes is delivered as it is: a bypass. `set`: the mark
/// the rule sets, which they carry there.
fn on_lo_to_own_addresses(rule: &Parsed, set: Mark, prerouting: &[Flat]) -> Vec<Flat> {
    let refuse = |reason: String| vec![Err(format!("line {}: {}: {reason}", rule.line, rule.text))];
    let mut parts = Vec::new();
    for candidate in prerouting.iter().flatten() {
        let m = &candidate.matches;
        let on_lo = m
            .iface
            .as_deref()
            .is_none_or(|iface| iface_covers(iface, "lo"))
            && !m.not_iface.iter().any(|iface| iface_covers(iface, "lo"));
        let target = match candidate.target {
            Target::Tproxy { .. } | Target::Reject(_) => candidate.target.clone(),
            Target::Bypass | Target::Return => Target::Bypass,
            Target::Drop => Target::Drop,
            // Delivered to the host's own sockets, which their destination is anyway.
            Target::Deliver => Target::Bypass,
            // Nothing these packets meet: the socket match (their socket is not transparent),
            // the divert chain's marks, other protocols.
            _ => continue,
        };
        // Their mark is the one set, whole: a mark match takes all of them or none.
        let marked = match m.mark {
            None => true,
            Some(_) if set.mask != u32::MAX => false,
            Some(mark) if set.value & mark.mask == mark.value => true,
            Some(_) => continue,
        };
        // As a rule for the same packets, locally generated.
        let taking = Match {
            iface: None,
            not_iface: Vec::new(),
            mark: None,
            local: true,
            ..m.clone()
        };
        if !on_lo || !overlaps(&taking, &rule.matches) {
            continue;
        }
        if target == Target::Drop
            || !marked
            || taking.excludes()
            || !taking.src.is_empty()
            || !taking.sports.is_empty()
        {
            return refuse(format!(
                "line {} takes some of its packets when they come back on lo, which a rule \
                 for local connections cannot say",
                candidate.line
            ));
        }
        let both = match narrow(&rule.matches, &taking) {
            Narrowed::Both(both) => *both,
            Narrowed::Neither => continue,
            Narrowed::Inexpressible => {
                return refuse(format!(
                    "line {} takes some of its packets when they come back on lo, which of the \
                     host's addresses is known only at run time",
                    candidate.line
                ))
            }
        };
        parts.push(Ok(Parsed {
            text: format!(
                "{} (what line {} takes when it comes back on lo)",
                rule.text, candidate.line
            ),
            matches: both,
            target,
            ..rule.clone()
        }));
        if covers(&taking, &rule.matches) {
            return parts;
        }
    }
    parts.push(Ok(Parsed {
        target: Target::Bypass,
        ..rule.clone()
    }));
    parts
}

/// The TPROXY target that the `transport` packets of `rule` meet when they come back on
/// `lo` marked with `set` (if known): the one of every PREROUTING TPROXY rule they may
/// match, one of which matches them all. A PREROUTING rule ahead of it that lets some of
/// them go (or drops them) leaves those with the mark, which the recipe's routing takes to
/// the host itself instead of their destination: unless an OUTPUT rule ahead of the MARK
/// (`before`) lets them go first, or the host is their destination (then they go to
/// `for_host`, with the line, for local bypasses ahead of the steering), a rule for local
/// connections cannot say that.
fn target_on_lo(
    rule: &Parsed,
    transport: Transport,
    set: Option<Mark>,
    prerouting: &[Flat],
    before: &[Parsed],
    for_host: &mut Vec<(usize, Match)>,
    notes: &mut Vec<String>,
) -> Result<Target, String> {
    let on_lo = Match {
        transports: vec![transport],
        dst: rule.matches.dst.clone(),
        ports: rule.matches.ports.clone(),
        iface: Some("lo".into()),
        family: rule.matches.family,
        // The bits it sets are what PREROUTING's mark matches know of them (all of them for
        // a mark set whole): a match on those takes all of them or none. (Found by the
        // hostile tester: `-m mark --mark 0x1/0x1 -j TPROXY` was taken to meet only some of
        // them.) The other bits are the socket's own.
        mark: set,
        // They are the connection's original direction: a local TCP connect always is, a
        // UDP rule may ask for it.
        ct_direction: match transport {
            Transport::Tcp => Some(CtDirection::Original),
            Transport::Udp => rule.matches.ct_direction,
        },
        ..Match::default()
    };
    let name = match transport {
        Transport::Tcp => "TCP",
        Transport::Udp => "UDP",
    };
    let mut targets: Vec<&Target> = Vec::new();
    let mut covered = false;
    for candidate in prerouting.iter().flatten() {
        let takes_lo = !candidate
            .matches
            .not_iface
            .iter()
            .any(|iface| iface_covers(iface, "lo"));
        if !takes_lo || !overlaps(&candidate.matches, &on_lo) {
            continue;
        }
        // A delivery leaves them with the mark as a bypass does.
        let lets_go = matches!(
            candidate.target,
            Target::Bypass | Target::Return | Target::Deliver
        );
        let takes = lets_go || matches!(candidate.target, Target::Drop | Target::Reject(_));
        let by_source = !(candidate.matches.src.is_empty() && candidate.matches.not_src.is_empty());
        if takes && !covered && by_source {
            // The host's packets carry the address its route picks, unknown here: the rule
            // set's source prefixes are read as other hosts'.
            let note = format!(
                "line {}: `{}` is read as not matching the host's own packets when they come \
                 back on lo marked by line {}: their source is one of the host's addresses, \
                 taken to lie outside what its source match takes (as on a host with one \
                 network; where it does take them, the original sends them to the host itself \
                 instead of their destination, and tproxy steers them)",
                candidate.line, candidate.text, rule.line
            );
            if !notes.contains(&note) {
                notes.push(note);
            }
            continue;
        }
        if takes && !covered {
            match on_lo_first(rule, set, candidate, before) {
                OnLo::Unmarked => {}
                // With the mark unknown, its mark matches were left aside: a bypass of what
                // they may not take would be too much.
                OnLo::ForHost(both) if lets_go && set.is_some() => for_host.push((
                    candidate.line,
                    Match {
                        transports: vec![transport],
                        ..*both
                    },
                )),
                OnLo::ForHost(_) | OnLo::Lost => {
                    return Err(format!(
                        "line {} takes some of its {name} packets ahead of the TPROXY rules \
                         when they come back on lo: what it lets go, still marked, the \
                         recipe's routing takes to this host instead of its destination (a TCP \
                         connection there never completes), and what it drops is dropped, \
                         which a rule for local connections cannot say",
                        candidate.line
                    ))
                }
            }
        }
        if !matches!(candidate.target, Target::Tproxy { .. }) {
            continue;
        }
        covered |= covers(&candidate.matches, &on_lo) && !candidate.matches.excludes();
        // One listener per port: TPROXY targets that differ only in their mark or address
        // lead to the same one.
        if !targets
            .iter()
            .any(|known| listener_port(known) == listener_port(&candidate.target))
        {
            targets.push(&candidate.target);
        }
    }
    match targets[..] {
        [target] if covered => Ok(target.clone()),
        [_] if set.is_none() => Err(format!(
            "only some of its {name} packets may meet a PREROUTING TPROXY rule when they \
             come back on lo: a rule outside the TPROXY path (another table, hook or chain) \
             sets the packet mark on the way"
        )),
        [_] => Err(format!(
            "only some of its {name} packets meet a PREROUTING TPROXY rule when they come \
             back on lo"
        )),
        [] => Err(format!(
            "no PREROUTING TPROXY rule takes its {name} packets when they come back on lo"
        )),
        _ => Err(format!(
            "its {name} packets come back on lo to {} TPROXY targets, which one rule cannot \
             tell apart",
            targets.len()
        )),
    }
}

/// What becomes of the packets of the OUTPUT rule `rule` that the PREROUTING rule
/// `candidate` takes on `lo` ahead of the TPROXY rules.
enum OnLo {
    /// None of them gets there marked: an OUTPUT rule of `before` lets them go first, or
    /// the candidate's mark match leaves them out.
    Unmarked,
    /// They are for the host itself (loopback, its own addresses) or for groups: these
    /// packets, locally generated.
    ForHost(Box<Match>),
    /// Some are taken from their destination.
    Lost,
}

/// See [`OnLo`]. `set`: the mark they carry there (`None`: unknown, and the PREROUTING
/// rule's mark matches are left aside: more packets, never fewer).
fn on_lo_first(rule: &Parsed, set: Option<Mark>, candidate: &Parsed, before: &[Parsed]) -> OnLo {
    let mut taking = Match {
        iface: None,
        not_iface: Vec::new(),
        mark: None,
        not_marks: Vec::new(),
        local: true,
        ..candidate.matches.clone()
    };
    if let Some(set) = set {
        // On lo the mark is the socket's with `set`'s bits: PREROUTING's mark matches ask
        // the socket's own bits, which OUTPUT's mark matches read.
        if let Some(mark) = candidate.matches.mark {
            match on_socket_mark(mark, set) {
                SocketMark::Never => return OnLo::Unmarked,
                SocketMark::Always => {}
                SocketMark::Reads(mark) => taking.mark = Some(mark),
            }
        }
        for &excluded in &candidate.matches.not_marks {
            match on_socket_mark(excluded, set) {
                SocketMark::Always => return OnLo::Unmarked,
                SocketMark::Never => {}
                SocketMark::Reads(mark) => taking.not_marks.push(mark),
            }
        }
    }
    let both = match narrow(&rule.matches, &normalized(&taking)) {
        Narrowed::Both(both) => *both,
        Narrowed::Neither => return OnLo::Unmarked,
        Narrowed::Inexpressible => return OnLo::Lost,
    };
    let taken_first = before.iter().any(|earlier| {
        let earlier_matches = normalized(&earlier.matches);
        matches!(
            earlier.target,
            Target::Bypass | Target::Return | Target::MarkThenAccept(_)
        ) && excludes_within(&earlier_matches, &both)
            && covers(&earlier_matches, &both)
    });
    if taken_first {
        return OnLo::Unmarked;
    }
    let for_host: Vec<IpNet> = loopback_prefixes()
        .into_iter()
        .chain(group_prefixes())
        .collect();
    if both.dst_local
        || (!both.dst.is_empty()
            && both
                .dst
                .iter()
                .all(|p| for_host.iter().any(|scope| scope.contains(p))))
    {
        return OnLo::ForHost(Box::new(both));
    }
    OnLo::Lost
}

/// `m` with an excluded single bit of the mark read as the bit's other value, which OUTPUT's
/// guards and PREROUTING's may write either way.
fn normalized(m: &Match) -> Match {
    let mut m = m.clone();
    if m.mark.is_none() {
        if let Some(i) = m.not_marks.iter().position(|x| x.mask.count_ones() == 1) {
            let bit = m.not_marks.remove(i);
            m.mark = Some(Mark {
                value: bit.value ^ bit.mask,
                mask: bit.mask,
            });
        }
    }
    m
}

/// What a mark match asks of a packet whose bits under `set.mask` are `set.value` and the
/// rest its socket's own.
enum SocketMark {
    /// Its known bits disagree: no such packet matches.
    Never,
    /// Its known bits agree and it reads no other: every such packet matches.
    Always,
    /// The socket's own bits it reads, with the values it wants.
    Reads(Mark),
}

fn on_socket_mark(mark: Mark, set: Mark) -> SocketMark {
    if (mark.value ^ set.value) & mark.mask & set.mask != 0 {
        return SocketMark::Never;
    }
    match mark.mask & !set.mask {
        0 => SocketMark::Always,
        own => SocketMark::Reads(Mark {
            value: mark.value & own,
            mask: own,
        }),
    }
}

/// Whether what `outer` excludes is excluded by `inner` too, so that `covers`, which reads
/// no exclusions, may compare them.
fn excludes_within(outer: &Match, inner: &Match) -> bool {
    let within = |o: &[IpNet], i: &[IpNet]| o.iter().all(|p| i.iter().any(|q| q.contains(p)));
    within(&outer.not_dst, &inner.not_dst)
        && within(&outer.not_src, &inner.not_src)
        && (!outer.excludes_dst_local || inner.excludes_dst_local)
        && outer.not_iface.iter().all(|i| inner.not_iface.contains(i))
        && outer.not_marks.iter().all(|m| inner.not_marks.contains(m))
}

/// The port of a TPROXY target, which names its listener.
fn listener_port(target: &Target) -> Option<u16> {
    match target {
        Target::Tproxy { on_port, .. } => *on_port,
        _ => None,
    }
}

/// Leaves out of `prerouting` its rules for packets arriving on `lo` once `local` steers:
/// they served the packets the recipe sends back over `lo`, which the local rules now take
/// (tproxy's program on `lo` is theirs).
pub(super) fn leave_out_loopback(
    prerouting: &mut Vec<Flat>,
    local: &[Flat],
    notes: &mut Vec<String>,
) {
    let steers = local
        .iter()
        .flatten()
        .any(|rule| matches!(rule.target, Target::Tproxy { .. }));
    if !steers {
        return;
    }
    prerouting.retain(|rule| match rule {
        Ok(rule) if rule.matches.iface.as_deref() == Some("lo") => {
            notes.push(format!(
                "line {}: `{}` takes the host's own packets coming back on lo: the rules with \
                 origin = \"local\" steer those; left out",
                rule.line, rule.text
            ));
            false
        }
        _ => true,
    });
}

/// Notes each local steer rule that can take connections to loopback addresses (no earlier
/// rule takes them all first): the recipe sends those to the proxy too. tproxy's programs
/// steer them only to an external proxy with `steer_loopback` (see README, "The host's own
/// traffic"): with `keep_proxies` the answer is whether to set it; otherwise they go where
/// tproxy's relay would have connected them, which the notes say.
pub(super) fn loopback_destinations(
    local: &[Flat],
    keep_proxies: bool,
    notes: &mut Vec<String>,
) -> bool {
    let mut reached = false;
    let loopback = loopback_prefixes();
    let rules: Vec<&Parsed> = local.iter().flatten().collect();
    for (i, rule) in rules.iter().enumerate() {
        let m = &rule.matches;
        let reaches_loopback = loopback.iter().any(|&l| {
            let to_loopback = Match {
                dst: vec![l],
                dst_local: false,
                ..m.clone()
            };
            let named = m.dst_local
                || m.dst.is_empty()
                || m.dst.iter().any(|p| l.contains(p) || p.contains(&l));
            // `--dst-type LOCAL` (nft `fib daddr type local`) takes all of loopback, which the
            // local table routes to the host (tproxy's `dst = "local"` names the interfaces'
            // addresses, 127.0.0.1 alone of it): an earlier rule for it takes 127.0.0.53 too.
            let taken_by = |earlier: &Parsed| match earlier.matches.dst_local {
                true => covers(
                    &Match {
                        dst_local: false,
                        dst: loopback.to_vec(),
                        ..earlier.matches.clone()
                    },
                    &to_loopback,
                ),
                false => covers(&earlier.matches, &to_loopback),
            };
            named && !rules[..i].iter().any(|earlier| taken_by(earlier))
        });
        if matches!(rule.target, Target::Tproxy { .. }) && !m.matches_nothing && reaches_loopback {
            reached = true;
            if !keep_proxies {
                notes.push(format!(
                    "line {}: `{}`: its connections to loopback addresses (127.0.0.0/8, ::1) \
                     are not steered: tproxy's relay would connect to them as the app does, so \
                     they go straight there (with --keep-proxies they are steered to the proxy)",
                    rule.line, rule.text
                ));
            }
        }
    }
    reached
}

/// A note when rules for locally generated traffic match a mark: mangle OUTPUT reads each
/// packet's mark, which is its socket's (`SO_MARK`) unless the packet was sent with a mark of
/// its own; tproxy's connect and sendmsg programs read the socket's when it connects (an
/// unconnected UDP socket's: when it sends).
pub(super) fn note_socket_marks(local: &[Flat], notes: &mut Vec<String>) {
    if local
        .iter()
        .flatten()
        .any(|rule| rule.matches.mark.is_some() || !rule.matches.not_marks.is_empty())
    {
        notes.push(
            "mangle OUTPUT's mark matches became the mark of rules with origin = \"local\": \
             tproxy matches the socket's mark (SO_MARK) when it connects (an unconnected UDP \
             socket's: when it sends), where OUTPUT read each packet's: they differ for a socket \
             whose mark is changed after it connects, a datagram sent with a mark of its own (an \
             SO_MARK control message), and a packet whose mark another netfilter rule (the raw \
             table's OUTPUT) changed"
                .into(),
        );
    }
}

/// The one loop guard of the translation: PREROUTING's, OUTPUT's, or both when they agree
/// (tproxy has one `socket_mark`); a second guard with another mark is reported.
pub(super) fn one_guard(
    forwarded: Option<Guard>,
    local: Option<Guard>,
    skipped: &mut Vec<String>,
) -> Option<Guard> {
    match (forwarded, local) {
        (Some(forwarded), Some(local)) if forwarded.mark != local.mark => {
            skipped.push(format!(
                "line {}: {}: a loop guard for the mark {:#x}, while line {}'s is for {:#x}: \
                 tproxy has one socket_mark",
                local.rule.line, local.rule.text, local.mark, forwarded.rule.line, forwarded.mark
            ));
            Some(forwarded)
        }
        (forwarded, local) => forwarded.or(local),
    }
}

/// A local rule's selectors: `origin`, and `cgroup`, `uid` and `classid` when it has them.
pub(super) fn write_selectors(out: &mut String, m: &Match) {
    let _ = writeln!(out, "origin = \"local\"");
    if !m.cgroups.is_empty() {
        let cgroups: Vec<String> = m
            .cgroups
            .iter()
            .map(|cgroup| toml::Value::String(cgroup.clone()).to_string())
            .collect();
        let _ = writeln!(out, "cgroup = [{}]", cgroups.join(", "));
    }
    let uid_bounds = |r: &UidRange| (r.first, r.last);
    if !m.uids.is_empty() {
        let _ = writeln!(out, "uid = {}", id_list(&m.uids, uid_bounds));
    }
    if !m.gids.is_empty() {
        let _ = writeln!(out, "gid = {}", id_list(&m.gids, uid_bounds));
    }
    if !m.classids.is_empty() {
        let bounds = |r: &ClassidRange| (r.first, r.last);
        let _ = writeln!(out, "classid = {}", id_list(&m.classids, bounds));
    }
    if let Some(iface) = &m.out_iface {
        let _ = writeln!(
            out,
            "out_interface = {}",
            toml::Value::String(iface.clone())
        );
    }
}

/// When every steer rule has the same `out_interface`, the bypass rules' own (the guard's)
/// changes nothing: a connection routed by another interface is steered by no rule either
/// way. Left out, they stay in the lookup stages rather than each taking one of the mark
/// stage's few entries.
fn out_interface_of_bypasses_left_out(rules: &mut [Flat]) {
    let mut steers = rules
        .iter()
        .flatten()
        .filter(|rule| matches!(rule.target, Target::Tproxy { .. }));
    let Some(first) = steers.next() else {
        return;
    };
    let shared = first.matches.out_iface.clone();
    if shared.is_none() || steers.any(|rule| rule.matches.out_iface != shared) {
        return;
    }
    for rule in rules.iter_mut().flatten() {
        if matches!(rule.target, Target::Bypass | Target::Return)
            && rule.matches.out_iface == shared
        {
            rule.matches.out_iface = None;
        }
    }
}

/// A TOML list of id ranges: a single id as a number, a range as a string (`"1000-1999"`).
fn id_list<R: std::fmt::Display>(ranges: &[R], bounds: impl Fn(&R) -> (u32, u32)) -> String {
    let items: Vec<String> = ranges
        .iter()
        .map(|range| match bounds(range) {
            (first, last) if first == last => first.to_string(),
            _ => format!("\"{range}\""),
        })
        .collect();
    format!("[{}]", items.join(", "))
}

#[cfg(test)]
mod tests {
    use crate::tools::translate::translate;

    /// The Xray guide's iptables rules whole: XRAY for forwarded traffic, XRAY_SELF (mangle
    /// OUTPUT) for the host's own, as `iptables-save` prints them.
    const XRAY_WITH_SELF: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:XRAY - [0:0]
:XRAY_SELF - [0:0]
-A PREROUTING -j XRAY
-A OUTPUT -j XRAY_SELF
-A XRAY -d 10.0.0.0/8 -j RETURN
-A XRAY -d 192.168.0.0/16 -p tcp -m tcp ! --dport 53 -j RETURN
-A XRAY -p tcp -j TPROXY --on-port 12345 --on-ip 0.0.0.0 --tproxy-mark 0x1/0xffffffff
-A XRAY -p udp -j TPROXY --on-port 12345 --on-ip 0.0.0.0 --tproxy-mark 0x1/0xffffffff
-A XRAY_SELF -d 10.0.0.0/8 -j RETURN
-A XRAY_SELF -d 192.168.0.0/16 -p tcp -m tcp ! --dport 53 -j RETURN
-A XRAY_SELF -m mark --mark 0x2 -j RETURN
-A XRAY_SELF -p tcp -j MARK --set-xmark 0x1/0xffffffff
-A XRAY_SELF -p udp -j MARK --set-xmark 0x1/0xffffffff
COMMIT
";

    /// The `[[rule]]` tables of a translation, each as its lines without comments.
    fn rules(config: &str) -> Vec<String> {
        config
            .split("[[rule]]")
            .skip(1)
            .map(|rule| {
                rule.lines()
                    .filter(|line| !line.starts_with('#') && !line.is_empty())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect()
    }

    #[test]
    fn the_output_chain_of_the_recipe_becomes_local_rules() {
        let t = translate(XRAY_WITH_SELF).unwrap();
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        let rules = rules(&t.config);
        let local: Vec<&String> = rules
            .iter()
            .filter(|rule| rule.contains("origin = \"local\""))
            .collect();
        assert_eq!(
            local,
            [
                "proto = [\"tcp\", \"udp\"]\ndst = [\"10.0.0.0/8\"]\norigin = \"local\"\naction = \"bypass\"",
                "proto = [\"tcp\"]\ndst = [\"192.168.0.0/16\"]\nports = [\"1-52\", \"54-65535\"]\norigin = \"local\"\naction = \"bypass\"",
                "proto = [\"tcp\"]\ndst = [\"0.0.0.0/0\"]\norigin = \"local\"\naction = \"steer\"\nlistener = \"tproxy-12345\"",
                "proto = [\"udp\"]\ndst = [\"0.0.0.0/0\"]\norigin = \"local\"\naction = \"steer\"\nlistener = \"tproxy-12345\"",
            ],
            "{}",
            t.config
        );
        assert_eq!(rules.len(), 8, "{}", t.config);
        // xray's own sockets carry mark 2: tproxy's socket mark, never steered.
        assert!(t.config.contains("socket_mark = \"0x2\""), "{}", t.config);
        assert!(t.config.contains("interfaces = \"all\""), "{}", t.config);
        assert_eq!(t.config.matches("[[listener]]").count(), 1, "{}", t.config);
        assert!(
            t.notes.iter().any(|n| n.contains("origin = \"local\"")),
            "{:?}",
            t.notes
        );
    }

    #[test]
    fn net_cls_class_ids_become_the_classid_selector() {
        let input = "\
*mangle
:MARKING - [0:0]
-A PREROUTING -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A OUTPUT -p tcp -m cgroup ! --cgroup 1 -j MARKING
-A MARKING -d 10.0.0.0/8 -j RETURN
-A MARKING -m cgroup --cgroup 0x100002 -j RETURN
-A MARKING -j MARK --set-mark 1
COMMIT
";
        let t = translate(input).unwrap();
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        let rules = rules(&t.config);
        let selectors: Vec<(bool, Vec<&str>)> = rules[1..]
            .iter()
            .map(|rule| {
                (
                    rule.contains("steer"),
                    rule.lines().filter(|l| l.starts_with("classid")).collect(),
                )
            })
            .collect();
        // `! --cgroup 1`: every class id but 1, a process in no class (0) included; the
        // jumped-to chain's `--cgroup 0x100002` narrows it.
        let others = "classid = [0, \"2-4294967295\"]";
        assert_eq!(
            selectors,
            [
                (false, vec![others]),
                (false, vec!["classid = [1048578]"]),
                (true, vec![others]),
            ],
            "{}",
            t.config
        );
        let args = crate::config::RunArgs {
            config: Some("translated.toml".into()),
            ..Default::default()
        };
        crate::config::Config::from_text(&args, &t.config).unwrap();
        for (rule, expected) in [
            (
                "-m cgroup --cgroup x",
                "`--cgroup x`: not a net_cls class id",
            ),
            ("-m cgroup --cgroup 1-5", "`--cgroup 1-5`: not one class id"),
            (
                "-m cgroup ! --cgroup 0-4294967295",
                "`--cgroup 0-4294967295`: not one class id",
            ),
        ] {
            let input = format!(
                "*mangle\n-A PREROUTING -p tcp -j TPROXY --on-port 15001 --tproxy-mark 0x1/0x1\n\
                 -A OUTPUT -p tcp {rule} -j MARK --set-mark 1\nCOMMIT\n"
            );
            let skipped = match translate(&input) {
                Ok(t) => format!("{:?}", t.skipped),
                Err(error) => error.to_string(),
            };
            assert!(skipped.contains(expected), "{rule}: {skipped}");
        }
    }

    #[test]
    fn owner_and_cgroup_matches_become_the_selectors() {
        let input = "\
*mangle
-A PREROUTING -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A OUTPUT -m owner --uid-owner 1000-1999 -p tcp --dport 443 -j MARK --set-mark 1
-A OUTPUT -m cgroup --path system.slice/app.service -p tcp --dport 80 -j MARK --set-mark 1
-A OUTPUT -m owner ! --uid-owner 0 -p tcp --dport 8080 -j MARK --set-mark 1
-A OUTPUT -m owner --uid-owner 5000 -m cgroup --path /app.slice -p tcp --dport 22 -j MARK --set-mark 1
COMMIT
";
        let t = translate(input).unwrap();
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        let rules = rules(&t.config);
        let selectors: Vec<Vec<&str>> = rules[1..]
            .iter()
            .map(|rule| {
                rule.lines()
                    .filter(|l| l.starts_with("uid") || l.starts_with("cgroup"))
                    .collect()
            })
            .collect();
        assert_eq!(
            selectors,
            [
                vec!["uid = [\"1000-1999\"]"],
                vec!["cgroup = [\"/system.slice/app.service\"]"],
                vec!["uid = [\"1-4294967294\"]"],
                vec!["cgroup = [\"/app.slice\"]", "uid = [5000]"],
            ],
            "{}",
            t.config
        );
        assert!(rules[1..]
            .iter()
            .all(|r| r.contains("listener = \"tproxy-15001\"")));
        // Each rule keeps its own selection: tproxy takes the translation as it is.
        let args = crate::config::RunArgs {
            config: Some("translated.toml".into()),
            ..Default::default()
        };
        let config = crate::config::Config::from_text(&args, &t.config).unwrap();
        let local = config.local.expect("rules for local connections");
        assert_eq!(local.used().count(), 4, "{local}");
    }

    #[test]
    fn a_mark_that_is_not_the_recipes_or_reaches_no_tproxy_rule_is_named() {
        let input = "\
*mangle
-A PREROUTING -i eth0 -p tcp -j TPROXY --on-port 15001 --tproxy-mark 0x1/0x1
-A PREROUTING -i lo -p tcp --dport 443 -j TPROXY --on-port 15443 --tproxy-mark 0x1/0x1
-A OUTPUT -p tcp --dport 80 -j MARK --set-mark 0x100
-A OUTPUT -p tcp --dport 80 -j MARK --set-mark 1
-A OUTPUT -p tcp --dport 443 -j MARK --set-mark 1
-A OUTPUT -p tcp -j MARK --set-mark 1
COMMIT
";
        let t = translate(input).unwrap();
        assert_eq!(t.skipped.len(), 3, "{:?}", t.skipped);
        assert!(
            t.skipped[0].starts_with("line 4:")
                && t.skipped[0]
                    .contains("sets 0x100/0xffffffff, not the TPROXY rules' mark 0x1/0x1"),
            "{:?}",
            t.skipped
        );
        assert!(
            t.skipped[1].starts_with("line 5:")
                && t.skipped[1].contains("no PREROUTING TPROXY rule takes its TCP packets"),
            "{:?}",
            t.skipped
        );
        // Port 443 comes back to the `-i lo` rule: translated. Any port: partly to it,
        // partly to nothing.
        assert!(
            t.skipped[2].starts_with("line 7:") && t.skipped[2].contains("only some of its TCP"),
            "{:?}",
            t.skipped
        );
        let rules = rules(&t.config);
        assert!(
            rules.iter().any(|r| r.contains("ports = [443]")
                && r.contains("origin = \"local\"")
                && r.contains("listener = \"tproxy-15443\"")),
            "{}",
            t.config
        );
    }

    #[test]
    fn transports_that_come_back_to_different_listeners_become_a_rule_each() {
        let input = "\
*mangle
-A PREROUTING -p tcp -j TPROXY --on-port 7001 --tproxy-mark 1
-A PREROUTING -p udp -j TPROXY --on-port 7002 --tproxy-mark 1
-A OUTPUT -d 203.0.113.0/24 -j MARK --set-mark 1
COMMIT
";
        let t = translate(input).unwrap();
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        let local: Vec<String> = rules(&t.config)
            .into_iter()
            .filter(|r| r.contains("origin"))
            .collect();
        assert_eq!(local.len(), 2, "{}", t.config);
        assert!(local[0].starts_with("proto = [\"tcp\"]") && local[0].ends_with("tproxy-7001\""));
        assert!(local[1].starts_with("proto = [\"udp\"]") && local[1].ends_with("tproxy-7002\""));
    }

    #[test]
    fn a_users_bypass_keeps_its_meaning_under_the_most_specific_order() {
        // Same rank: tproxy keeps the order, so uid 0 is let through as iptables does.
        let kept = translate(
            "*mangle
-A PREROUTING -p tcp -j TPROXY --on-port 7001 --tproxy-mark 1
-A OUTPUT -m owner --uid-owner 0 -j RETURN
-A OUTPUT -p tcp -j MARK --set-mark 1
COMMIT
",
        )
        .unwrap();
        assert!(kept.skipped.is_empty(), "{:?}", kept.skipped);
        let rules = rules(&kept.config);
        assert!(rules[1].contains("uid = [0]") && rules[1].contains("bypass"));
        assert!(rules[2].contains("steer") && !rules[2].contains("uid"));
        // A longer prefix would outrank the bypass for uid 0's connections to it: they get a
        // bypass of their own, with the selector, ahead of it.
        let shadowed = translate(
            "*mangle
-A PREROUTING -p tcp -j TPROXY --on-port 7001 --tproxy-mark 1
-A OUTPUT -m owner --uid-owner 0 -j RETURN
-A OUTPUT -d 198.51.100.7/32 -p tcp -j MARK --set-mark 1
COMMIT
",
        )
        .unwrap();
        assert!(shadowed.skipped.is_empty(), "{:?}", shadowed.skipped);
        let shadowed_rules = self::rules(&shadowed.config);
        assert_eq!(
            shadowed_rules[2],
            "proto = [\"tcp\"]\ndst = [\"198.51.100.7/32\"]\norigin = \"local\"\nuid = [0]\n\
             action = \"bypass\"",
            "{}",
            shadowed.config
        );
        assert!(shadowed_rules[3].contains("steer") && !shadowed_rules[3].contains("uid"));
    }

    #[test]
    fn selectors_and_marks_outside_output_are_refused() {
        let input = "\
*mangle
:SHARED - [0:0]
-A PREROUTING -j SHARED
-A OUTPUT -s 10.0.0.1 -p tcp -j MARK --set-mark 1
-A SHARED -m cgroup --path app.slice -j RETURN
-A SHARED -p tcp --dport 80 -j MARK --set-mark 1
-A SHARED -p tcp -j TPROXY --on-port 7001 --tproxy-mark 1
COMMIT
";
        let t = translate(input).unwrap();
        let reasons: Vec<&str> = t.skipped.iter().map(String::as_str).collect();
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with("line 5:") && r.contains("cgroup of the local socket")),
            "{reasons:?}"
        );
        // iptables refuses an owner match in PREROUTING: input it cannot have loaded.
        let owner =
            translate(&input.replace("-m cgroup --path app.slice", "-m owner --uid-owner 1000"))
                .unwrap();
        assert!(
            owner
                .skipped
                .iter()
                .any(|r| r.starts_with("line 5:") && r.contains("iptables refuses them")),
            "{:?}",
            owner.skipped
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with("line 6:") && r.contains("go on to line 7")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with("line 4:") && r.contains("source address")),
            "{reasons:?}"
        );
    }

    #[test]
    fn an_nft_output_route_chain_becomes_local_rules_and_a_filter_one_is_named() {
        let input = "\
table inet proxy {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta l4proto tcp tproxy to :7000 meta mark set 0x00000001
	}
	chain output {
		type route hook output priority mangle; policy accept;
		meta mark 0x000000ff return
		meta skuid 0 tcp dport 8080 return
		ip daddr 10.0.0.0/8 return
		meta skuid { 1000-1999, 3000 } tcp dport 443 meta mark set 0x00000001
		socket cgroupv2 level 2 \"system.slice/app.service\" tcp dport 80 meta mark set 0x00000001
		meta skuid != 0 tcp dport 8080 meta mark set 0x00000001
	}
	chain output_filter {
		type filter hook output priority mangle; policy accept;
		tcp dport 22 meta mark set 0x00000001
	}
}
";
        let t = translate(input).unwrap();
        assert_eq!(t.skipped.len(), 1, "{:?}", t.skipped);
        assert!(
            t.skipped[0].starts_with("line 17:") && t.skipped[0].contains("not `type route`"),
            "{:?}",
            t.skipped
        );
        assert!(t.config.contains("socket_mark = \"0xff\""), "{}", t.config);
        let local: Vec<String> = rules(&t.config)
            .into_iter()
            .filter(|r| r.contains("origin = \"local\""))
            .collect();
        assert_eq!(
            local,
            [
                "proto = [\"tcp\"]\nports = [8080]\norigin = \"local\"\nuid = [0]\naction = \"bypass\"",
                "proto = [\"tcp\", \"udp\"]\ndst = [\"10.0.0.0/8\"]\norigin = \"local\"\naction = \"bypass\"",
                "proto = [\"tcp\"]\nports = [443]\norigin = \"local\"\nuid = [\"1000-1999\", 3000]\naction = \"steer\"\nlistener = \"tproxy-7000\"",
                "proto = [\"tcp\"]\nports = [80]\norigin = \"local\"\ncgroup = [\"/system.slice/app.service\"]\naction = \"steer\"\nlistener = \"tproxy-7000\"",
                "proto = [\"tcp\"]\nports = [8080]\norigin = \"local\"\nuid = [\"1-4294967294\"]\naction = \"steer\"\nlistener = \"tproxy-7000\"",
            ],
            "{}",
            t.config
        );
    }

    /// Xray's guide keeps its own traffic out by group (`--gid-owner`, nft `meta skgid`).
    #[test]
    fn owner_gid_matches_become_the_gid_selector() {
        let iptables = "\
*mangle
-A PREROUTING -p tcp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PREROUTING -p udp -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A OUTPUT -m owner --gid-owner 23333 -j RETURN
-A OUTPUT -m owner ! --gid-owner 100-199 -p tcp -j MARK --set-mark 1
-A OUTPUT -p udp -j MARK --set-mark 1
COMMIT
";
        let nft = "\
table inet proxy {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta l4proto { tcp, udp } tproxy to :15001 meta mark set 0x00000001
	}
	chain output {
		type route hook output priority mangle; policy accept;
		meta skgid 23333 return
		meta skgid != 100-199 meta l4proto tcp meta mark set 0x00000001
		meta l4proto udp meta mark set 0x00000001
	}
}
";
        for input in [iptables, nft] {
            let t = translate(input).unwrap();
            assert!(t.skipped.is_empty(), "{:?}", t.skipped);
            let rules = rules(&t.config);
            let gids: Vec<Vec<&str>> = rules
                .iter()
                .filter(|r| r.contains("origin = \"local\""))
                .map(|rule| rule.lines().filter(|l| l.starts_with("gid")).collect())
                .collect();
            assert_eq!(
                gids,
                [
                    vec!["gid = [23333]"],
                    vec!["gid = [\"0-99\", \"200-4294967294\"]"],
                    vec![],
                ],
                "{}",
                t.config
            );
            // tproxy takes the translation as it is.
            let args = crate::config::RunArgs {
                config: Some("translated.toml".into()),
                ..Default::default()
            };
            crate::config::Config::from_text(&args, &t.config).unwrap();
        }
        // Supplementary groups are not what the programs see.
        let t = translate(
            "*mangle\n-A PREROUTING -p tcp -j TPROXY --on-port 15001 --tproxy-mark 0x1/0x1\n\
             -A OUTPUT -m owner --gid-owner 5 --suppl-groups -j RETURN\n\
             -A OUTPUT -p tcp -j MARK --set-mark 1\nCOMMIT\n",
        )
        .unwrap();
        assert!(
            t.skipped
                .iter()
                .any(|s| s.contains("`-m owner --suppl-groups`")),
            "{:?}",
            t.skipped
        );
    }

    #[test]
    fn an_nft_meta_cgroup_becomes_the_classid_selector() {
        let input = "\
table ip proxy {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta l4proto tcp tproxy to :7000 meta mark set 0x00000001
	}
	chain output {
		type route hook output priority mangle; policy accept;
		meta cgroup 1 return
		meta cgroup { 5-9, 0x100002 } tcp dport 443 meta mark set 0x00000001
		meta cgroup != 1 tcp dport 80 meta mark set 0x00000001
	}
}
";
        let t = translate(input).unwrap();
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        let classids: Vec<&str> = t
            .config
            .lines()
            .filter(|l| l.starts_with("classid"))
            .collect();
        assert_eq!(
            classids,
            [
                "classid = [1]",
                "classid = [\"5-9\", 1048578]",
                "classid = [0, \"2-4294967295\"]",
            ],
            "{}",
            t.config
        );
    }

    #[test]
    fn a_cgroup_level_that_is_not_the_paths_depth_is_refused() {
        let input = "\
table ip proxy {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta l4proto tcp tproxy to :7000 meta mark set 0x00000001
	}
	chain output {
		type route hook output priority mangle; policy accept;
		socket cgroupv2 level 1 \"system.slice/app.service\" meta mark set 0x00000001
	}
}
";
        let t = translate(input).unwrap();
        assert_eq!(t.skipped.len(), 1, "{:?}", t.skipped);
        assert!(t.skipped[0].contains("depth 2"), "{:?}", t.skipped);
    }

    #[test]
    fn tproxy_rules_for_one_port_are_one_listener_on_lo() {
        // sbshell's: the DNS rule sets no mark, the catch-all sets the recipe's.
        let input = "\
*mangle
-A PREROUTING -p tcp --dport 53 -j TPROXY --on-port 7001
-A PREROUTING -p tcp -j TPROXY --on-port 7001 --tproxy-mark 0x1/0x1
-A OUTPUT -p tcp -j MARK --set-mark 1
COMMIT
";
        let t = translate(input).unwrap();
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        assert!(
            rules(&t.config)
                .last()
                .is_some_and(|r| r.contains("origin = \"local\"") && r.ends_with("tproxy-7001\"")),
            "{}",
            t.config
        );
        // Another port: two listeners, which one local rule cannot tell apart.
        let t = translate(&input.replacen("7001", "7053", 1)).unwrap();
        assert!(
            t.skipped.len() == 1 && t.skipped[0].contains("come back on lo to 2 TPROXY targets"),
            "{:?}",
            t.skipped
        );
    }

    #[test]
    fn prerouting_rules_for_lo_are_left_to_the_local_rules() {
        let input = "\
*mangle
-A PREROUTING -i eth0 -p tcp -j TPROXY --on-port 7001 --tproxy-mark 1
-A PREROUTING -i lo -p tcp -j TPROXY --on-port 7001 --tproxy-mark 1
-A OUTPUT -p tcp -j MARK --set-mark 1
COMMIT
";
        let t = translate(input).unwrap();
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        assert!(t.config.contains("interfaces = [\"eth0\"]"), "{}", t.config);
        let rules = rules(&t.config);
        assert_eq!(rules.len(), 2, "{}", t.config);
        assert!(rules[0].contains("iface = \"eth0\""), "{}", t.config);
        assert!(rules[1].contains("origin = \"local\""), "{}", t.config);
        assert!(
            t.notes
                .iter()
                .any(|n| n.starts_with("line 3:") && n.contains("left out")),
            "{:?}",
            t.notes
        );
    }
}
