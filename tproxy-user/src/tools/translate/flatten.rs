//! Jumps inlined: the rules a chain runs, in order, each narrowed by the matches of the
//! jumps that led to it, as the kernel would meet them.

use ipnet::IpNet;

use tproxy_common::local_origin::{ClassidRange, UidRange};

use super::{
    precedence::{covers, iface_covers, ifaces_overlap, overlaps, port_bounds, within},
    Entry, Family, Match, Parsed, RuleSet, Target,
};
use crate::{datapath::rules::Ports, values::Mark};

/// A rule of the flattened rule set, or why it cannot be translated.
pub(super) type Flat = Result<Parsed, String>;

/// The rules of the base chains `entries` at `hook`, jumps inlined, in the order the kernel
/// runs them. nft runs every base chain at a hook in turn: an accept (or return) ends only
/// its own chain, and a `tproxy` statement ends none (a later one replaces its socket). One
/// rule set in order says that only while no chain before lets a packet go or steers it that
/// a later one steers or drops: a later chain that would is reported in place of its rules.
/// Chains of one priority run in an order the listing does not show (the kernel puts the
/// newest first): two of them that both decide packets are reported likewise.
pub(super) fn flatten_in_turn(
    ruleset: &RuleSet,
    entries: &[Entry],
    context: &Match,
    hook: &str,
    notes: &mut Vec<String>,
) -> Vec<Flat> {
    let mut flat = Vec::new();
    let mut before: Vec<(&Entry, Decides)> = Vec::new();
    for entry in entries {
        let mut own = Vec::new();
        flatten(ruleset, &entry.chain, context, None, 0, &mut own, notes);
        let decides = Decides::of(&own);
        let conflict = before.iter().find(|(earlier, earlier_decides)| {
            earlier.overlaps(entry)
                && (earlier_decides.overruled_by(&decides)
                    || (earlier.priority == entry.priority
                        && decides.overruled_by(earlier_decides)))
        });
        if let Some((earlier, _)) = conflict {
            flat.push(Err(format!(
                "chain {}: nft runs it at {hook} after chain {} for the same packets, and \
                 what that chain decides (an accept, or a tproxy a later one replaces) does \
                 not keep this one from steering or dropping them: one rule set in order \
                 cannot say both; merge them into one chain",
                entry.chain, earlier.chain
            )));
            continue;
        }
        // An owner match left out as never matching does match after an earlier chain's
        // `tproxy` gave the packet a socket.
        let tproxy_before = flat
            .iter()
            .flatten()
            .any(|earlier: &Parsed| matches!(earlier.target, Target::Tproxy { .. }));
        if tproxy_before {
            for rule in &mut own {
                if let Ok(parsed) = rule {
                    if parsed.target == Target::Unsteered(OWNER_AT_PREROUTING.into()) {
                        *rule = Err(format!(
                            "line {}: {}: an owner match after an earlier chain's `tproxy` \
                             statement, which gives the packet the proxy's socket for it to match",
                            parsed.line, parsed.text
                        ));
                    }
                }
            }
        }
        before.push((entry, decides));
        flat.extend(own);
    }
    flat
}

/// What a base chain's rules do to which packets (see [`flatten_in_turn`]).
struct Decides {
    /// Accept or return (the chain ends, the next one runs), TPROXY or at output the
    /// recipe's mark (the next chain still runs): packets a later chain may decide again.
    settled: Vec<Match>,
    /// TPROXY or the recipe's mark, drop or reject: what a later chain does anew.
    acts: Vec<Match>,
}

impl Decides {
    fn of(rules: &[Flat]) -> Self {
        let matching = |wanted: &dyn Fn(&Target) -> bool| -> Vec<Match> {
            rules
                .iter()
                .flatten()
                .filter(|rule| wanted(&rule.target))
                .map(|rule| rule.matches.clone())
                .collect()
        };
        let steers = |t: &Target| matches!(t, Target::Tproxy { .. } | Target::SetMark(_));
        Decides {
            settled: matching(&|t| {
                steers(t)
                    || matches!(
                        t,
                        Target::Bypass | Target::Return | Target::MarkThenAccept(_)
                    )
            }),
            // A mark and accept may be a delivery (see `deliver`).
            acts: matching(&|t| {
                steers(t)
                    || matches!(
                        t,
                        Target::Drop | Target::Reject(_) | Target::MarkThenAccept(_)
                    )
            }),
        }
    }

    /// Whether a chain run after this one steers or drops a packet this one decided.
    fn overruled_by(&self, later: &Decides) -> bool {
        self.settled
            .iter()
            .any(|earlier| later.acts.iter().any(|act| overlaps(earlier, act)))
    }
}

/// Inlines jumps from `chain`, narrowing the jumped-to rules by the jump's own matches.
/// `via`: the jump that led here, for the notes on rules it can never reach.
pub(super) fn flatten(
    ruleset: &RuleSet,
    chain: &str,
    context: &Match,
    via: Option<&Parsed>,
    depth: usize,
    out: &mut Vec<Flat>,
    notes: &mut Vec<String>,
) {
    let Some(rules) = ruleset.chains.get(chain) else {
        return;
    };
    flatten_rules(ruleset, rules, context, via, depth, out, notes);
}

/// [`flatten`] for a chain's `rules` (or the rules of one after a jump, which RETURNs
/// from the chain it jumps to continue with).
fn flatten_rules(
    ruleset: &RuleSet,
    rules: &[Result<Parsed, (usize, String, String)>],
    context: &Match,
    via: Option<&Parsed>,
    depth: usize,
    out: &mut Vec<Flat>,
    notes: &mut Vec<String>,
) {
    // The gotos met so far in this chain, with what they take: their packets never come
    // back to the rules after them here. (A rule they take only in part keeps its place
    // after the goto's own rule for what it leaves undecided, which comes first.)
    let mut gone_to: Vec<(usize, Match)> = Vec::new();
    // After OUTPUT's guard for the packets routed elsewhere than `lo` (see
    // [`routed_elsewhere_guard`]), the rules see only those for the host's own addresses.
    let mut own_addresses: Option<Match> = None;
    // After OUTPUT's guard for the packets routed by other interfaces than one (see
    // [`routed_by_guard`]), the rules see only those routed by it: their `out_iface`.
    let mut routed_by: Option<Match> = None;
    // The family the guard is for (`None`: both).
    let mut guarded_family: Option<Family> = None;
    for (i, rule) in rules.iter().enumerate() {
        let rule = match rule {
            Ok(rule) => rule,
            Err((line, text, reason)) => {
                out.push(Err(format!("line {line}: {text}: {reason}")));
                continue;
            }
        };
        if rule.matches.not_dst_local {
            match routed_elsewhere_guard(rule, context, depth) {
                Ok(()) => {
                    notes.push(format!(
                        "line {}: `{}` leaves the host's packets for other hosts alone (the \
                         route of the host's own addresses leads to lo, any other's does \
                         not): the rules after it are for the host's own addresses",
                        rule.line, rule.text
                    ));
                    own_addresses = Some(Match {
                        dst_local: true,
                        ..context.clone()
                    });
                }
                Err(reason) => {
                    out.push(Err(format!("line {}: {}: {reason}", rule.line, rule.text)))
                }
            }
            continue;
        }
        if let Some(iface) = &rule.matches.not_out_iface {
            let guard = routed_by_guard(rule, context, depth).and_then(|()| {
                match &routed_by {
                    None => Ok(true),
                    Some(guard) if guard.out_iface.as_ref() != Some(iface) => {
                        Err("a second output interface guard, for another interface".into())
                    }
                    // The same guard for packets it covers already.
                    Some(_)
                        if guarded_family.is_none() || guarded_family == rule.matches.family =>
                    {
                        Ok(false)
                    }
                    Some(_) => Ok(true),
                }
            });
            match &guard {
                Ok(true) => notes.push(format!(
                    "line {}: `{}` leaves the host's packets routed by other interfaces than \
                     {iface} alone: the rules after it have `out_interface = \"{iface}\"` \
                     (tproxy reads the interface from the local and main routing tables \
                     when a process connects)",
                    rule.line, rule.text
                )),
                Ok(false) => notes.push(format!(
                    "line {}: `{}` repeats the guard before it for some of its packets; left out",
                    rule.line, rule.text
                )),
                Err(reason) => {
                    out.push(Err(format!("line {}: {}: {reason}", rule.line, rule.text)));
                    continue;
                }
            }
            if !matches!(guard, Ok(false)) {
                out.push(Ok(Parsed {
                    matches: Match {
                        dst_local: true,
                        family: rule.matches.family,
                        ..context.clone()
                    },
                    target: Target::OwnAddressesOnLo,
                    ..rule.clone()
                }));
            }
            guarded_family = match &routed_by {
                None => rule.matches.family,
                // A guard for each family: both.
                Some(_) if guarded_family != rule.matches.family => None,
                Some(_) => guarded_family,
            };
            routed_by = Some(Match {
                out_iface: Some(iface.clone()),
                ..context.clone()
            });
            continue;
        }
        // After a guard for one family, the other family's packets are not guarded.
        let routed_by_here = match (&routed_by, guarded_family, rule.matches.family) {
            (Some(_), Some(guarded), Some(family)) if guarded != family => None,
            (Some(_), Some(_), None) => {
                out.push(Err(format!(
                    "line {}: {}: a rule for both families after an output interface guard \
                     for one",
                    rule.line, rule.text
                )));
                continue;
            }
            (guard, ..) => guard.as_ref(),
        };
        if rule.matches.out_iface.is_some() && !context.local && !rule.matches.local {
            out.push(Err(format!(
                "line {}: {}: an output interface outside a route chain at output (OUTPUT)",
                rule.line, rule.text
            )));
            continue;
        }
        let base = match (&own_addresses, routed_by_here) {
            (Some(_), Some(_)) => {
                out.push(Err(format!(
                    "line {}: {}: after both an `oifname != \"lo\"` guard and an output \
                     interface guard",
                    rule.line, rule.text
                )));
                continue;
            }
            (Some(guarded), None) | (None, Some(guarded)) => guarded,
            (None, None) => context,
        };
        let mut narrowed = narrow(base, &rule.matches);
        if own_addresses.is_some()
            && matches!(narrowed, Narrowed::Inexpressible)
            && matches!(rule.target, Target::Bypass | Target::Return)
        {
            // Which of the host's addresses lie in its prefixes is known only at run time;
            // the packets for the others are left alone by the guard anyway, so a bypass of
            // all of them means the same.
            narrowed = narrow(context, &rule.matches);
        }
        let matches = match narrowed {
            Narrowed::Both(matches) => *matches,
            Narrowed::Neither => {
                notes.push(match via {
                    Some(returned) if returned.target == Target::Return => format!(
                        "line {}: `{}` never matches what line {} gives back to it: no packet \
                         matches both; left out there",
                        rule.line, rule.text, returned.line
                    ),
                    Some(jump) => format!(
                        "line {}: `{}` never matches where line {} jumps to it: no packet \
                         matches both; left out there",
                        rule.line, rule.text, jump.line
                    ),
                    None if rule.matches.matches_nothing => format!(
                        "line {}: `{}` never matches: a set it names is empty (or its input \
                         interface matches share no interface, or its marks disagree); left out",
                        rule.line, rule.text
                    ),
                    None => format!(
                        "line {}: `{}` never matches: its matches exclude each other; left out",
                        rule.line, rule.text
                    ),
                });
                continue;
            }
            Narrowed::Inexpressible => {
                out.push(Err(format!(
                    "line {}: {}: its matches conflict with those of the rule that jumps here",
                    rule.line, rule.text
                )));
                continue;
            }
        };
        if !matches.local && reads_own_socket(&matches) {
            out.push(owner_at_prerouting(ruleset, rule, matches, out));
            continue;
        }
        if matches.dst_broadcast {
            match matches.local && matches!(rule.target, Target::Bypass | Target::Return) {
                true => notes.push(format!(
                    "line {}: `{}` changes nothing: tproxy's programs never steer a local \
                     connection to a destination the local table routes as broadcast (it \
                     never reaches lo, where the TPROXY rules are); left out",
                    rule.line, rule.text
                )),
                false => out.push(Err(format!(
                    "line {}: {}: the address type broadcast (`--dst-type BROADCAST`, nft's \
                     `fib daddr type broadcast`) is translated as OUTPUT's bypass only, which \
                     changes nothing for tproxy: for arrivals, the local table's broadcast \
                     addresses are not followed",
                    rule.line, rule.text
                ))),
            }
            continue;
        }
        if let Some((line, _)) = gone_to
            .iter()
            .find(|(_, taken)| !taken.excludes() && covers(taken, &matches))
        {
            notes.push(format!(
                "line {}: `{}` never matches: line {line}'s goto takes all of its packets \
                 elsewhere first; left out",
                rule.line, rule.text
            ));
            continue;
        }
        if let Target::Jump(target) = &rule.target {
            let called = ruleset.chains.get(target).map_or(&[][..], Vec::as_slice);
            if returns_every_packet(called, &matches) {
                notes.push(format!(
                    "line {}: `{}` changes nothing: {target} returns every packet it is given \
                     unchanged; left out",
                    rule.line, rule.text
                ));
                continue;
            }
        }
        match &rule.target {
            Target::Jump(target) | Target::Goto(target) if depth < 8 => {
                let start = out.len();
                flatten(ruleset, target, &matches, Some(rule), depth + 1, out, notes);
                if let Target::Goto(_) = rule.target {
                    // What the chain leaves undecided, and its RETURNs, leave this chain
                    // too: a RETURN here (a caller judges both).
                    let decided = out[start..]
                        .iter()
                        .flatten()
                        .any(|r| decides_all(r, &matches));
                    gone_to.push((rule.line, matches.clone()));
                    if !decided {
                        out.push(Ok(Parsed {
                            text: format!("what `{}` leaves undecided", rule.text),
                            matches,
                            target: Target::Return,
                            ..rule.clone()
                        }));
                    }
                    continue;
                }
                // RETURN in the target chain continues here, after the jump: only a bypass
                // if no later rule here could still steer or drop what it returns.
                let steering_later: Vec<Option<Match>> = rules[i + 1..]
                    .iter()
                    .flatten()
                    .filter(|later| {
                        matches!(
                            later.target,
                            Target::Tproxy { .. }
                                | Target::Drop
                                | Target::Reject(_)
                                | Target::Jump(_)
                                | Target::Goto(_)
                                | Target::SetMark(_)
                                | Target::MarkThenAccept(_)
                        )
                    })
                    .filter_map(|later| {
                        match narrow(own_addresses.as_ref().unwrap_or(context), &later.matches) {
                            Narrowed::Both(m) => Some(Some(*m)),
                            Narrowed::Neither => None,
                            // Some packets match it, which ones is not known: any may.
                            Narrowed::Inexpressible => Some(None),
                        }
                    })
                    .collect();
                // The rest of this chain after the jump, for what a RETURN gives back to it
                // when a later rule of its own chain may still match that too (the rules
                // met here so far must not change what the rest sees).
                let rest = (gone_to.is_empty() && own_addresses.is_none() && routed_by.is_none())
                    .then_some(&rules[i + 1..]);
                let called: Vec<Flat> = out.drain(start..).collect();
                for flat in called {
                    let returned = match flat {
                        Ok(returned)
                            if returned.target == Target::Return
                                && steering_later.iter().any(|later| {
                                    later
                                        .as_ref()
                                        .is_none_or(|later| overlaps(&returned.matches, later))
                                }) =>
                        {
                            returned
                        }
                        other => {
                            out.push(other);
                            continue;
                        }
                    };
                    if returns_anyway(ruleset, &returned) {
                        out.push(Ok(Parsed {
                            target: Target::Unsteered(
                                "no later rule of its chain matches what it returns, which \
                                 goes back to the calling chain either way"
                                    .into(),
                            ),
                            ..returned
                        }));
                        continue;
                    }
                    match rest.and_then(|rest| continued(ruleset, rest, rule, &returned, depth, notes)) {
                        Some(continued) => out.extend(continued),
                        None => out.push(Err(format!(
                            "line {}: {}: RETURN goes back to the calling chain, whose later rules may still steer or drop the packet",
                            returned.line, returned.text
                        ))),
                    }
                }
            }
            Target::Jump(target) | Target::Goto(target) => out.push(Err(format!(
                "line {}: {}: jumps nest too deep (to {target})",
                rule.line, rule.text
            ))),
            _ if !(matches.local || matches.cgroups.is_empty()) => out.push(Err(format!(
                "line {}: {}: `-m cgroup --path` (nft `socket cgroupv2`) at prerouting matches \
                 the cgroup of the local socket a packet is for, which tproxy's rules for \
                 arrivals cannot",
                rule.line, rule.text
            ))),
            _ => out.push(Ok(Parsed {
                matches,
                ..rule.clone()
            })),
        }
    }
}

/// Whether a rule matches the owner of the packet's own socket: `-m owner` (nft `meta
/// skuid`, `skgid`) or a net_cls class id (`-m cgroup --cgroup`, nft `meta cgroup`).
fn reads_own_socket(matches: &Match) -> bool {
    !(matches.uids.is_empty() && matches.gids.is_empty() && matches.classids.is_empty())
}

/// Why an owner match at prerouting is left out: see [`owner_at_prerouting`].
pub(super) const OWNER_AT_PREROUTING: &str = "`meta skuid`, `skgid` and `cgroup` read the \
     packet's own socket, which an arriving packet does not carry at prerouting (the kernel \
     leaves a socket from lo or another namespace out, and finds the packet's own after the \
     hook): it never matches there, negated or not";

/// An owner match in a rule at prerouting (`rule`, narrowed to `matches`). nft loads it, and
/// it reads `skb->sk`: none for an arrival from another host, namespace or `lo`, so the rule
/// breaks off unmatched whatever its action (a jump or goto is not taken), and is left out
/// with a note. Unless a `tproxy` statement came first on the way (`before`), which gives
/// the packet the proxy's socket; and iptables refuses to load it there at all: reported.
/// (Rules of an earlier chain are checked in [`flatten_in_turn`].)
fn owner_at_prerouting(ruleset: &RuleSet, rule: &Parsed, matches: Match, before: &[Flat]) -> Flat {
    if !ruleset.nft {
        return Err(format!(
            "line {}: {}: `-m owner` and `-m cgroup` select locally generated packets, which \
             only mangle OUTPUT sees (iptables refuses them in PREROUTING)",
            rule.line, rule.text
        ));
    }
    if before
        .iter()
        .flatten()
        .any(|earlier| matches!(earlier.target, Target::Tproxy { .. }))
    {
        return Err(format!(
            "line {}: {}: an owner match after a `tproxy` statement, which gives the packet \
             the proxy's socket for it to match",
            rule.line, rule.text
        ));
    }
    Ok(Parsed {
        target: Target::Unsteered(OWNER_AT_PREROUTING.into()),
        matches,
        ..rule.clone()
    })
}

/// The most rules that a RETURN's continuation (see [`continued`]) may repeat.
const CONTINUED_RULES: usize = 64;

/// What a RETURN (`returned`, narrowed by the jumps to it) in the chain that `jump` leads to
/// becomes: the calling chain's `rest` after the jump, narrowed by what it returns, then a
/// RETURN from the calling chain for what they leave undecided (its end). In first-match
/// order, in its place, its packets meet what they would meet in the calling chain, and
/// none of the rules after it in its own chain. `None` when the rest, repeated, would be
/// too many rules, or the RETURN excludes packets (they would fall through to its chain).
fn continued(
    ruleset: &RuleSet,
    rest: &[Result<Parsed, (usize, String, String)>],
    jump: &Parsed,
    returned: &Parsed,
    depth: usize,
    notes: &mut Vec<String>,
) -> Option<Vec<Flat>> {
    if returned.matches.excludes() || depth >= 8 {
        return None;
    }
    let mut continued = Vec::new();
    flatten_rules(
        ruleset,
        rest,
        &returned.matches,
        Some(returned),
        depth + 1,
        &mut continued,
        notes,
    );
    if continued.len() > CONTINUED_RULES {
        return None;
    }
    let decided = continued
        .iter()
        .flatten()
        .any(|r| decides_all(r, &returned.matches));
    notes.push(format!(
        "line {}: `{}` gives its packets back to the rules after line {}, which are repeated \
         for them in its place",
        returned.line, returned.text, jump.line
    ));
    if !decided {
        continued.push(Ok(Parsed {
            text: format!(
                "what the rules after line {} leave undecided of `{}`",
                jump.line, returned.text
            ),
            ..returned.clone()
        }));
    }
    Some(continued)
}

/// Whether `rule` ends the hook for every packet of `m` that reaches it (a MARK goes on).
fn decides_all(rule: &Parsed, m: &Match) -> bool {
    matches!(
        rule.target,
        Target::Tproxy { .. }
            | Target::Bypass
            | Target::Return
            | Target::Reject(_)
            | Target::Drop
            | Target::MarkThenAccept(_)
    ) && !rule.matches.excludes()
        && covers(&rule.matches, m)
}

/// Whether the packets a RETURN (`returned`, narrowed by the jumps to it) takes would leave
/// its chain without it too: no later rule of the chain may match them, so they fall off its
/// end, back to the calling chain, as they return. (A rule that cannot be read may match
/// anything.)
fn returns_anyway(ruleset: &RuleSet, returned: &Parsed) -> bool {
    let is_returned = |rule: &Result<Parsed, _>| {
        rule.as_ref()
            .is_ok_and(|rule| rule.line == returned.line && rule.text == returned.text)
    };
    let Some((rules, last)) = ruleset
        .chains
        .values()
        .find_map(|rules| Some((rules, rules.iter().rposition(is_returned)?)))
    else {
        return false;
    };
    rules[last + 1..].iter().all(|later| match later {
        Err(_) => false,
        Ok(later) if later.matches.not_dst_local || later.matches.not_out_iface.is_some() => false,
        Ok(later) => matches!(narrow(&returned.matches, &later.matches), Narrowed::Neither),
    })
}

/// Whether a jump with `context`'s matches to a chain of `rules` comes back with every
/// packet unchanged: the chain is empty, returns at every rule, or its first rule returns
/// all that the jump sends.
fn returns_every_packet(
    rules: &[Result<Parsed, (usize, String, String)>],
    context: &Match,
) -> bool {
    let returns = |rule: &Result<Parsed, _>| {
        matches!(
            rule,
            Ok(Parsed {
                target: Target::Return,
                ..
            })
        )
    };
    let returns_all = |rule: &Parsed| {
        !rule.matches.excludes()
            && !rule.matches.not_dst_local
            && rule.matches.not_out_iface.is_none()
            // Whether a rule is met in OUTPUT is the path's, not the rule's.
            && covers(
                &Match {
                    local: context.local,
                    ..rule.matches.clone()
                },
                context,
            )
    };
    rules.iter().all(returns)
        || rules
            .first()
            .is_some_and(|first| returns(first) && first.as_ref().is_ok_and(returns_all))
}

/// Checks that a rule matching packets routed elsewhere than `lo` (nft `oifname != "lo"`)
/// is OUTPUT's guard that leaves them all alone: an accept (or a return from the base chain)
/// that matches nothing else, so that only the packets for the host's own addresses meet
/// the rules after it. (A socket whose mark policy routing sends to `lo` is routed there
/// whatever its destination; tproxy's routing does the same with its routing mark.)
fn routed_elsewhere_guard(rule: &Parsed, context: &Match, depth: usize) -> Result<(), String> {
    output_guard(
        rule,
        context,
        depth,
        rule.matches.not_out_iface.is_none(),
        "`oifname != \"lo\"` is translated as the output chain's own first guard (an accept or \
         return with no other match), which leaves the host's packets for other hosts alone",
    )
}

/// Checks that a rule matching packets routed by other interfaces than one (`! -o eth0`,
/// nft `oifname != "eth0"`) is OUTPUT's guard that leaves them all alone, so that only the
/// packets routed by that interface meet the rules after it. A guard may be for one family
/// (iptables' are, and sing-box repeats its guard for IPv6 with `meta nfproto ipv6`).
fn routed_by_guard(rule: &Parsed, context: &Match, depth: usize) -> Result<(), String> {
    output_guard(
        rule,
        context,
        depth,
        !rule.matches.not_dst_local,
        "`! -o`/`oifname !=` is translated as the output chain's guard (an accept or return \
         with no other match), which leaves the host's packets routed by other interfaces alone",
    )
}

/// An OUTPUT chain's guard on the route's interface: in a route chain at output, at the
/// chain's own level, an accept or return whose only match but the guard's own is the
/// address family (`own_only`: the other guard's field is unset too).
fn output_guard(
    rule: &Parsed,
    context: &Match,
    depth: usize,
    own_only: bool,
    otherwise: &str,
) -> Result<(), String> {
    let m = &rule.matches;
    let nothing_else = own_only
        && m.transports.is_empty()
        && m.dst.is_empty()
        && m.src.is_empty()
        && m.ports.is_empty()
        && m.sports.is_empty()
        && m.other_protocol.is_none()
        && m.iface.is_none()
        && m.out_iface.is_none()
        && !m.excludes()
        && m.mark.is_none()
        && !m.dst_local
        && !m.dst_anycast
        && !m.dst_broadcast
        && m.dst_types.is_none()
        && m.dst_set.is_none()
        && m.uids.is_empty()
        && m.gids.is_empty()
        && m.cgroups.is_empty()
        && m.classids.is_empty()
        && !m.matches_nothing;
    if !context.local {
        return Err("an output interface outside a route chain at output (OUTPUT)".into());
    }
    let leaves_alone = matches!(rule.target, Target::Bypass | Target::Return);
    if !(nothing_else && leaves_alone && depth == 0) {
        return Err(otherwise.into());
    }
    Ok(())
}

/// What a rule reached through a jump matches (and what two rules both match).
pub(super) enum Narrowed {
    /// The packets that both the jump and the rule match.
    Both(Box<Match>),
    /// No packet matches both: the rule never matches on this path.
    Neither,
    /// Some packets match both, but the rule model cannot say which.
    Inexpressible,
}

/// The matches of a rule reached through a jump with `context`'s matches: exactly the
/// packets that match both.
pub(super) fn narrow(context: &Match, rule: &Match) -> Narrowed {
    match narrowed(context, rule) {
        Ok(Some(both)) => Narrowed::Both(Box::new(both)),
        Ok(None) => Narrowed::Neither,
        Err(()) => Narrowed::Inexpressible,
    }
}

/// [`narrow`]'s answer: `Ok(None)` when no packet matches both, `Err` when the model cannot
/// say which do.
fn narrowed(context: &Match, rule: &Match) -> Result<Option<Match>, ()> {
    if context.matches_nothing || rule.matches_nothing {
        return Ok(None);
    }
    let family = match (context.family, rule.family) {
        (Some(a), Some(b)) if a != b => return Ok(None),
        (a, b) => b.or(a),
    };
    let Some(transports) = both(&context.transports, &rule.transports, |a, b| {
        (a == b).then_some(*a)
    }) else {
        return Ok(None);
    };
    let dst_local = context.dst_local || rule.dst_local;
    let excludes_dst_local = context.excludes_dst_local || rule.excludes_dst_local;
    if dst_local && excludes_dst_local {
        return Ok(None);
    }
    let Some(dst) = both_prefixes(&context.dst, &rule.dst, family) else {
        return Ok(None);
    };
    let dst_anycast = context.dst_anycast || rule.dst_anycast;
    let dst_broadcast = context.dst_broadcast || rule.dst_broadcast;
    if dst_broadcast
        && (dst_local || dst_anycast || context.dst_set.is_some() || rule.dst_set.is_some())
    {
        return Err(());
    }
    if (dst_local || dst_anycast) && !dst.is_empty() || dst_local && dst_anycast {
        // Which of the host's addresses and the anycast routes' destinations lie in the
        // prefixes, or in each other, is known only at run time.
        return Err(());
    }
    let dst_set = match (&context.dst_set, &rule.dst_set) {
        (Some(a), Some(b)) if a != b => return Err(()),
        (a, b) => b.clone().or(a.clone()),
    };
    if dst_set.is_some() && (!dst.is_empty() || dst_local || dst_anycast) {
        // Which of the set's entries lie in the prefixes (or are the host's addresses) is
        // known only at run time, and a rule names one set.
        return Err(());
    }
    let Some(src) = both_prefixes(&context.src, &rule.src, family) else {
        return Ok(None);
    };
    let common_ports = |a: &Ports, b: &Ports| {
        let (a1, a2) = port_bounds(*a);
        let (b1, b2) = port_bounds(*b);
        let (first, last) = (a1.max(b1), a2.min(b2));
        (first <= last).then_some(match (first, last) {
            (first, last) if first == last => Ports::One(first),
            (1, 65535) => Ports::Any,
            (first, last) => Ports::Range(first, last),
        })
    };
    let Some(ports) = both(&context.ports, &rule.ports, common_ports) else {
        return Ok(None);
    };
    let Some(sports) = both(&context.sports, &rule.sports, common_ports) else {
        return Ok(None);
    };
    let iface = match (&context.iface, &rule.iface) {
        (Some(outer), Some(inner)) if iface_covers(outer, inner) => Some(inner.clone()),
        (Some(outer), Some(inner)) if iface_covers(inner, outer) => Some(outer.clone()),
        (Some(outer), Some(inner)) if !ifaces_overlap(outer, inner) => return Ok(None),
        (Some(_), Some(_)) => return Err(()),
        (a, b) => b.clone().or(a.clone()),
    };
    let out_iface = match (&context.out_iface, &rule.out_iface) {
        (Some(outer), Some(inner)) if iface_covers(outer, inner) => Some(inner.clone()),
        (Some(outer), Some(inner)) if iface_covers(inner, outer) => Some(outer.clone()),
        (Some(outer), Some(inner)) if !ifaces_overlap(outer, inner) => return Ok(None),
        (Some(_), Some(_)) => return Err(()),
        (a, b) => b.clone().or(a.clone()),
    };
    let mark = match (context.mark, rule.mark) {
        (Some(a), Some(b)) if (a.value ^ b.value) & a.mask & b.mask != 0 => return Ok(None),
        (Some(a), Some(b)) => Some(Mark {
            value: (a.value & a.mask) | (b.value & b.mask),
            mask: a.mask | b.mask,
        }),
        (a, b) => b.or(a),
    };
    let ct_direction = match (context.ct_direction, rule.ct_direction) {
        (Some(a), Some(b)) if a != b => return Ok(None),
        (a, b) => b.or(a),
    };
    // The ids both ranges take, if any.
    let common = |a: (u32, u32), b: (u32, u32)| {
        let (first, last) = (a.0.max(b.0), a.1.min(b.1));
        (first <= last).then_some((first, last))
    };
    let common_uids = |a: &UidRange, b: &UidRange| {
        common((a.first, a.last), (b.first, b.last)).map(|(first, last)| UidRange { first, last })
    };
    let Some(uids) = both(&context.uids, &rule.uids, common_uids) else {
        return Ok(None);
    };
    let Some(gids) = both(&context.gids, &rule.gids, common_uids) else {
        return Ok(None);
    };
    let Some(classids) = both(&context.classids, &rule.classids, |a, b| {
        common((a.first, a.last), (b.first, b.last))
            .map(|(first, last)| ClassidRange { first, last })
    }) else {
        return Ok(None);
    };
    let Some(cgroups) = both(&context.cgroups, &rule.cgroups, |a, b| {
        if within(a, b) {
            Some(a.clone())
        } else if within(b, a) {
            Some(b.clone())
        } else {
            None
        }
    }) else {
        return Ok(None);
    };
    // Other protocols stay matched only if neither side names TCP or UDP alone.
    let allows_beyond =
        |m: &Match| m.protocols_beyond || (m.transports.is_empty() && m.other_protocol.is_none());
    let protocols_beyond = (context.protocols_beyond || rule.protocols_beyond)
        && allows_beyond(context)
        && allows_beyond(rule);
    Ok(Some(Match {
        transports,
        protocols_beyond,
        dst,
        dst_local,
        dst_anycast,
        dst_broadcast,
        dst_set,
        dst_types: None,
        src,
        ports,
        sports,
        other_protocol: rule
            .other_protocol
            .clone()
            .or(context.other_protocol.clone()),
        iface,
        out_iface,
        not_out_iface: context.not_out_iface.clone().or(rule.not_out_iface.clone()),
        family,
        not_dst: union(&context.not_dst, &rule.not_dst),
        not_src: union(&context.not_src, &rule.not_src),
        not_iface: union(&context.not_iface, &rule.not_iface),
        mark,
        ct_direction,
        not_marks: union(&context.not_marks, &rule.not_marks),
        not_dst_local: context.not_dst_local || rule.not_dst_local,
        excludes_dst_local,
        local: context.local || rule.local,
        uids,
        gids,
        cgroups,
        classids,
        matches_nothing: false,
        other_protocols: context.other_protocols && rule.other_protocols,
    }))
}

/// The values that lie in both lists (each empty: any), by `meet` of each pair of their
/// items; `None` when none do.
fn both<T: Clone + PartialEq>(
    outer: &[T],
    inner: &[T],
    meet: impl Fn(&T, &T) -> Option<T>,
) -> Option<Vec<T>> {
    if outer.is_empty() || inner.is_empty() {
        return Some(if outer.is_empty() { inner } else { outer }.to_vec());
    }
    let mut met: Vec<T> = Vec::new();
    for a in outer {
        for b in inner {
            if let Some(m) = meet(a, b) {
                if !met.contains(&m) {
                    met.push(m);
                }
            }
        }
    }
    (!met.is_empty()).then_some(met)
}

/// Prefixes matching both lists (each empty: any), of `family` if the rule has one: two
/// prefixes either nest, and then meet in the longer one, or lie apart.
fn both_prefixes(outer: &[IpNet], inner: &[IpNet], family: Option<Family>) -> Option<Vec<IpNet>> {
    let met = both(outer, inner, |a, b| {
        if a.contains(b) {
            Some(*b)
        } else if b.contains(a) {
            Some(*a)
        } else {
            None
        }
    })?;
    let in_family = |p: &IpNet| match family {
        Some(Family::V4) => p.addr().is_ipv4(),
        Some(Family::V6) => p.addr().is_ipv6(),
        None => true,
    };
    let kept: Vec<IpNet> = met.iter().copied().filter(in_family).collect();
    (kept.len() == met.len() || !kept.is_empty()).then_some(kept)
}

/// What either excludes.
fn union<T: Clone + PartialEq>(a: &[T], b: &[T]) -> Vec<T> {
    let mut all = a.to_vec();
    all.extend(b.iter().filter(|x| !a.contains(x)).cloned());
    all
}
