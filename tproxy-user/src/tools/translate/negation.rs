//! Negated matches opened into what tproxy's rules can say.
//!
//! A rule `M and not X -> T` lets the packets of `M and X` fall through to the rules after
//! it. tproxy has no negation and no fall-through, so the rule becomes a bypass of `M and X`
//! (a "hole") followed by `M -> T`. The hole wins over the rule by tproxy's own precedence:
//! an excluded destination is a longer prefix than the rule's, and an excluded source or
//! interface keeps the rule's destination and ports and comes first in the configuration.
//! The bypass is what the fall-through would do only when no later rule could steer or drop
//! those packets before a bypass of them all. Otherwise a RETURN or ACCEPT takes the
//! fall-through itself: `M and not X -> RETURN` is `M and X -> goto` the rest of the chain,
//! then `M -> RETURN`, so the rules after it are repeated, narrowed to each hole, ahead of
//! `M -> RETURN` (see [`fall_through`]); other targets are reported.
//!
//! An excluded mark needs no fall-through: `mark & M != V` is "one of the bits under M
//! differs from V's", so the rule becomes one rule per such bit, each with that bit as its
//! `mark` (`! --mark 0x40/0xc0`: `0x0/0x40` and `0x80/0x80`), all with the rule's action.
//! Only a mask of more than [`MARK_PIECES`] bits (`! --mark 0xff`) takes a hole instead.

use std::collections::VecDeque;

use ipnet::IpNet;

use super::{
    flatten::{narrow, Flat, Narrowed},
    precedence::{covers, iface_covers, ifaces_overlap, overlaps},
    Family, Match, Parsed, Target,
};
use crate::values::Mark;

/// The most rules an excluded mark becomes (one per bit under its mask) before it is opened
/// into a hole instead: each is a rule with a mark, which tproxy tries one by one.
const MARK_PIECES: usize = 8;

/// The most rules that opening negated RETURN and ACCEPT rules may repeat in all (see
/// [`fall_through`]): each repeats the rules after it, and a chain of several such rules would
/// repeat them again in every repetition.
const FALL_THROUGH_COPIES: usize = 64;

/// `flat` (in order, jumps inlined) with every rule that excludes something opened into its
/// holes and itself, or into why it cannot be.
pub(super) fn open(flat: Vec<Flat>, notes: &mut Vec<String>) -> Vec<Flat> {
    let mut out = Vec::with_capacity(flat.len());
    let mut pending: VecDeque<Flat> = flat.into();
    let mut copies_left = FALL_THROUGH_COPIES;
    while let Some(next) = pending.pop_front() {
        let rule = match next {
            // A repeated rule that no packet reaches goes unsaid: the rule it repeats is
            // noted where it is.
            Ok(rule)
                if rule.text.contains(REPEATED)
                    && out.iter().flatten().any(|earlier| {
                        decides_all(earlier, &without_exclusions(&rule.matches))
                    }) =>
            {
                continue
            }
            Ok(rule) if rule.matches.excludes() => rule,
            other => {
                out.push(other);
                continue;
            }
        };
        if let (Some(set), false) = (&rule.matches.dst_set, rule.matches.not_dst.is_empty()) {
            // The hole would be the excluded prefixes within the set's entries, which are
            // known only at run time.
            out.push(Err(format!(
                "line {}: {}: a destination excluded from set {set}'s entries, which tproxy \
                 follows as they change: a rule cannot say which entries lie in it",
                rule.line, rule.text
            )));
            continue;
        }
        let m = &rule.matches;
        let local_in_destinations = m.excludes_dst_local
            && (!m.dst.is_empty() || m.dst_set.is_some() || m.dst_anycast || m.dst_broadcast);
        let rule = if local_in_destinations
            && matches!(rule.target, Target::Bypass | Target::Return)
            && steered_or_dropped_later(&[own_addresses_of(&rule)], pending.make_contiguous())
                .is_none()
        {
            // What it excludes is left alone as well: no later rule decides the host's
            // addresses otherwise, so the exclusion changes nothing.
            let mut rule = rule;
            rule.matches.excludes_dst_local = false;
            if !rule.matches.excludes() {
                out.push(Ok(rule));
                continue;
            }
            rule
        } else {
            rule
        };
        let m = &rule.matches;
        if (m.dst_local || m.dst_anycast) && !m.not_dst.is_empty() {
            // The hole would be the excluded prefixes' share of the host's addresses (or of
            // the anycast routes' destinations), known only at run time. (Found in review:
            // it was written as all of them.)
            out.push(Err(format!(
                "line {}: {}: destination prefixes excluded from the host's own addresses (or \
                 the anycast routes'): a rule cannot say which of them lie there",
                rule.line, rule.text
            )));
            continue;
        }
        if m.excludes_dst_local
            && (!m.dst.is_empty() || m.dst_set.is_some() || m.dst_anycast || m.dst_broadcast)
        {
            // The hole would be the host's addresses within those destinations, which are
            // known only at run time.
            out.push(Err(format!(
                "line {}: {}: the host's own addresses excluded from destination prefixes \
                 (or a set, or anycast routes): a rule cannot say which of them lie there",
                rule.line, rule.text
            )));
            continue;
        }
        let Some((holes, rest)) = holes_and_rest(&rule) else {
            notes.push(format!(
                "line {}: `{}` never matches: it excludes everything it matches; left out",
                rule.line, rule.text
            ));
            continue;
        };
        let everything = without_exclusions(&rule.matches);
        if out
            .iter()
            .flatten()
            .any(|earlier| decides_all(earlier, &everything))
        {
            // No packet gets here, excluded or not (the rules a negated RETURN repeats come
            // before its own rule for the rest): the emitter notes what comes first.
            out.extend(rest.into_iter().map(Ok));
            continue;
        }
        let later = pending.make_contiguous();
        let Some(falls_to) = steered_or_dropped_later(&holes, later) else {
            out.extend(holes.into_iter().map(Ok));
            out.extend(rest.into_iter().map(Ok));
            continue;
        };
        let reported = format!(
            "line {}: {}: negated match: the packets it excludes fall through to line \
             {falls_to}, which may steer or drop them, and tproxy's rules have no fall-through",
            rule.line, rule.text
        );
        if !matches!(rule.target, Target::Bypass | Target::Return) {
            out.push(Err(reported));
            continue;
        }
        match fall_through(&rule, &holes, later, copies_left) {
            Ok(copies) => {
                copies_left -= copies.len();
                notes.push(format!(
                    "line {}: `{}`: the packets it excludes go on to the rules after it, as in \
                     iptables: those rules are repeated for them ({} rules) ahead of it",
                    rule.line,
                    rule.text,
                    copies.len()
                ));
                // The rules after it that its own rule for the rest covers see only what it
                // lets through, which meets them in their repetitions first.
                pending.retain(|later| {
                    let Ok(later) = later else {
                        return true;
                    };
                    let reached_only_through =
                        !matches!(later.target, Target::Unsteered(_) | Target::Ignore)
                            && rest.iter().any(|piece| {
                                decides_all(piece, &without_exclusions(&later.matches))
                            });
                    if reached_only_through && !later.text.contains(REPEATED) {
                        notes.push(format!(
                            "line {}: `{}`: the only packets that reach it are those line {} \
                             lets through; it is kept in the rules repeated for them",
                            later.line, later.text, rule.line
                        ));
                    }
                    !reached_only_through
                });
                for piece in copies.into_iter().chain(rest).rev() {
                    pending.push_front(Ok(piece));
                }
            }
            Err(why) => out.push(Err(format!("{reported} ({why})"))),
        }
    }
    out
}

/// The line of the first rule after a rule's `holes` that may steer or drop packets the holes
/// let fall through; `None` when every such packet meets a bypass first, or no rule decides it.
fn steered_or_dropped_later(holes: &[Parsed], later: &[Flat]) -> Option<usize> {
    let later: Vec<&Parsed> = later.iter().flatten().collect();
    let first_for = |hole: &Parsed| {
        for (position, later) in later.iter().enumerate() {
            // A later rule's own exclusions only narrow it: its rule without them is enough
            // to compare with, unless it never matches at all.
            if holes_and_rest(later).is_none() {
                continue;
            }
            // The host's addresses, which a later rule may exclude exactly.
            if hole.matches.dst_local && later.matches.excludes_dst_local {
                continue;
            }
            let later_matches = without_exclusions(&later.matches);
            match later.target {
                Target::Tproxy { .. } | Target::Drop | Target::Deliver | Target::Reject(_)
                    if overlaps(&hole.matches, &later_matches) =>
                {
                    return Some(position)
                }
                // Past a bypass of all of them, no rule sees them.
                Target::Bypass | Target::Return if decides_all(later, &hole.matches) => {
                    return None
                }
                _ => {}
            }
        }
        None
    };
    holes
        .iter()
        .filter_map(first_for)
        .min()
        .map(|position| later[position].line)
}

/// For a RETURN or ACCEPT `rule` whose exclusions fall through to rules that may steer or
/// drop them: the rules after it (`later`), each narrowed to what one of its `holes` lets
/// through, to come ahead of it in place of the holes. `M and not N -> RETURN` is `M and N
/// -> goto` the rest of the chain, then `M -> RETURN`: the packets of `M and N` meet the
/// rest first and in order (no rule decides differently for them than it did), the others
/// of `M` are returned. At most `limit` rules; otherwise why not.
fn fall_through(
    rule: &Parsed,
    holes: &[Parsed],
    later: &[Flat],
    limit: usize,
) -> Result<Vec<Parsed>, String> {
    let mut copies = Vec::new();
    for hole in holes {
        for later in later.iter().flatten() {
            // The host's own packets and the arrivals meet different chains; a rule that
            // changes no packet's fate is noted once, where it is. A RETURN of one other
            // protocol (`-p icmp`) is repeated where the hole is written for other protocols:
            // it decides some of their packets (see `other_protocols`).
            let decides_other_protocols = hole.matches.other_protocols
                && matches!(later.target, Target::Unsteered(_))
                && later.matches.other_protocol.is_some();
            if later.matches.local != hole.matches.local
                || matches!(later.target, Target::Unsteered(_) | Target::Ignore)
                    && !decides_other_protocols
            {
                continue;
            }
            let matches = match narrow(&hole.matches, &later.matches) {
                Narrowed::Both(matches) => *matches,
                Narrowed::Neither => continue,
                Narrowed::Inexpressible => {
                    return Err(format!(
                        "the rules after it cannot be repeated for them: line {}'s matches \
                         cannot be combined with theirs",
                        later.line
                    ))
                }
            };
            // A repeated rule's text names its own line and the last negation repeating it.
            let text = later.text.split(REPEATED).next().unwrap_or_default();
            copies.push(Parsed {
                text: format!("{text}{REPEATED}{} lets through)", rule.line),
                matches,
                ..later.clone()
            });
            if copies.len() > limit {
                return Err(format!(
                    "repeating the rules after it for them would take more than the \
                     {FALL_THROUGH_COPIES} rules repeated in all for negated RETURN and ACCEPT \
                     rules"
                ));
            }
            if decides_all(later, &hole.matches) {
                break;
            }
        }
    }
    Ok(copies)
}

/// How the text of a rule repeated for what a negation lets through goes on.
const REPEATED: &str = " (repeated for what line ";

/// Whether `rule` decides every packet of `m` that reaches it: it steers, bypasses or drops
/// them all.
fn decides_all(rule: &Parsed, m: &Match) -> bool {
    matches!(
        rule.target,
        Target::Tproxy { .. }
            | Target::Bypass
            | Target::Return
            | Target::Drop
            | Target::Deliver
            | Target::Reject(_)
    ) && !rule.matches.excludes()
        && covers(&rule.matches, m)
}

/// What `m` matches, its exclusions aside.
fn without_exclusions(m: &Match) -> Match {
    Match {
        not_dst: Vec::new(),
        excludes_dst_local: false,
        not_src: Vec::new(),
        not_iface: Vec::new(),
        not_marks: Vec::new(),
        ..m.clone()
    }
}

/// The packets of `rule` to the host's own addresses, whatever destinations it names (the
/// widest hole its `excludes_dst_local` could make).
fn own_addresses_of(rule: &Parsed) -> Parsed {
    Parsed {
        matches: Match {
            dst: Vec::new(),
            dst_local: true,
            dst_set: None,
            dst_anycast: false,
            dst_broadcast: false,
            ..without_exclusions(&rule.matches)
        },
        target: Target::Bypass,
        ..rule.clone()
    }
}

/// How the text of a bypass rule for what a rule excludes begins.
const HOLE: &str = "what `";

/// Whether `rule` is the bypass for what another rule excludes, which that rule's packets
/// fall through rather than match.
pub(super) fn is_hole(rule: &Parsed) -> bool {
    rule.text.starts_with(HOLE) && rule.target == Target::Bypass
}

/// The bypass rules for what `rule` excludes, and `rule` without its exclusions (one rule
/// per mark it may carry when it excludes marks); `None` when it excludes all it matches.
fn holes_and_rest(rule: &Parsed) -> Option<(Vec<Parsed>, Vec<Parsed>)> {
    let (mut holes, marked) = mark_holes_and_pieces(rule);
    let mut rest = Vec::new();
    for piece in marked {
        if let Some((piece_holes, piece_rest)) = address_holes_and_rest(&piece) {
            holes.extend(piece_holes);
            rest.push(piece_rest);
        }
    }
    (!rest.is_empty()).then_some((holes, rest))
}

/// `rule` as rules without excluded marks: one per mark it may carry (see [`mark_pieces`]),
/// or, past [`MARK_PIECES`] of them, itself with a hole for each excluded mark.
fn mark_holes_and_pieces(rule: &Parsed) -> (Vec<Parsed>, Vec<Parsed>) {
    let m = &rule.matches;
    if m.not_marks.is_empty() {
        return (Vec::new(), vec![rule.clone()]);
    }
    let with_mark = |mark: Option<Mark>| Parsed {
        matches: Match {
            mark,
            not_marks: Vec::new(),
            ..m.clone()
        },
        ..rule.clone()
    };
    let pieces = mark_pieces(m.mark, &m.not_marks);
    if pieces.len() <= MARK_PIECES {
        return (Vec::new(), pieces.into_iter().map(with_mark).collect());
    }
    let rest = with_mark(m.mark);
    let holes = m
        .not_marks
        .iter()
        .filter_map(|&excluded| both_marks(m.mark, excluded))
        .map(|mark| Parsed {
            text: format!("{HOLE}{}` excludes", rule.text),
            matches: Match {
                mark: Some(mark),
                ..without_exclusions(&rest.matches)
            },
            target: Target::Bypass,
            ..rule.clone()
        })
        .collect();
    (holes, vec![rest])
}

/// The marks a packet may carry to match `mark` (`None`: any) and none of `excluded`, as
/// masked marks: a packet's mark avoids `V/M` when one bit under `M` differs from `V`'s, so
/// each excluded mark splits each piece by those bits.
fn mark_pieces(mark: Option<Mark>, excluded: &[Mark]) -> Vec<Option<Mark>> {
    let mut pieces = vec![mark];
    for &avoided in excluded {
        let mut next: Vec<Option<Mark>> = Vec::new();
        for piece in pieces {
            let avoids =
                piece.is_some_and(|p| (p.value ^ avoided.value) & p.mask & avoided.mask != 0);
            let split: Vec<Option<Mark>> = if avoids {
                vec![piece]
            } else {
                (0..32)
                    .map(|bit| 1u32 << bit)
                    .filter(|bit| avoided.mask & bit != 0)
                    .filter_map(|bit| {
                        let differs = Mark {
                            value: !avoided.value & bit,
                            mask: bit,
                        };
                        match piece {
                            None => Some(Some(differs)),
                            Some(p) => both_marks(Some(p), differs).map(Some),
                        }
                    })
                    .collect()
            };
            for piece in split {
                if !next.contains(&piece) {
                    next.push(piece);
                }
            }
        }
        pieces = next;
        // Past the limit the caller takes the hole form: building further would only
        // multiply pieces that are not used.
        if pieces.len() > MARK_PIECES {
            break;
        }
    }
    pieces
}

/// The marks that match both `a` (`None`: any) and `b`; `None` when none do.
fn both_marks(a: Option<Mark>, b: Mark) -> Option<Mark> {
    let Some(a) = a else {
        return Some(b);
    };
    ((a.value ^ b.value) & a.mask & b.mask == 0).then_some(Mark {
        value: (a.value & a.mask) | (b.value & b.mask),
        mask: a.mask | b.mask,
    })
}

/// The bypass rules for the destinations, sources and interfaces `rule` excludes, and
/// `rule` without them; `None` when it excludes all it matches.
fn address_holes_and_rest(rule: &Parsed) -> Option<(Vec<Parsed>, Parsed)> {
    let m = &rule.matches;
    let (dst, dst_holes) = cut(&m.dst, &m.not_dst, m.family)?;
    let (src, src_holes) = cut(&m.src, &m.not_src, m.family)?;
    let iface_holes: Vec<String> = match &m.iface {
        Some(iface) if m.not_iface.iter().any(|x| iface_covers(x, iface)) => return None,
        // Excluding another interface than those it matches changes nothing. The patterns
        // read are prefixes (`eth*`), which nest or lie apart: an overlapping exclusion lies
        // within the rule's pattern.
        Some(iface) => m
            .not_iface
            .iter()
            .filter(|x| ifaces_overlap(iface, x))
            .cloned()
            .collect(),
        None => m.not_iface.clone(),
    };
    let rest = Parsed {
        matches: Match {
            dst,
            src,
            not_dst: Vec::new(),
            excludes_dst_local: false,
            not_src: Vec::new(),
            not_iface: Vec::new(),
            ..m.clone()
        },
        ..rule.clone()
    };
    let hole = |matches: Match| Parsed {
        text: format!("{HOLE}{}` excludes", rule.text),
        matches,
        target: Target::Bypass,
        ..rule.clone()
    };
    let mut holes = Vec::new();
    if !dst_holes.is_empty() {
        holes.push(hole(Match {
            dst: dst_holes,
            ..rest.matches.clone()
        }));
    }
    if !src_holes.is_empty() {
        holes.push(hole(Match {
            src: src_holes,
            ..rest.matches.clone()
        }));
    }
    if m.excludes_dst_local {
        // Its own destinations (none: any) only narrow which of the host's addresses it
        // excludes, and which lie in them is known at run time: the checks before let only
        // a rule for any destination get here.
        holes.push(hole(Match {
            dst: Vec::new(),
            dst_local: true,
            ..rest.matches.clone()
        }));
    }
    for iface in iface_holes {
        holes.push(hole(Match {
            iface: Some(iface),
            ..rest.matches.clone()
        }));
    }
    Some((holes, rest))
}

/// Prefixes `list` (empty: any) keeps once `excluded` is taken out, and the excluded
/// prefixes that lie inside it (the holes); `None` when nothing is kept.
fn cut(
    list: &[IpNet],
    excluded: &[IpNet],
    family: Option<Family>,
) -> Option<(Vec<IpNet>, Vec<IpNet>)> {
    let in_family = |p: &IpNet| match family {
        Some(Family::V4) => p.addr().is_ipv4(),
        Some(Family::V6) => p.addr().is_ipv6(),
        None => true,
    };
    if list.is_empty() {
        return Some((
            Vec::new(),
            excluded.iter().copied().filter(in_family).collect(),
        ));
    }
    let kept: Vec<IpNet> = list
        .iter()
        .copied()
        .filter(|p| !excluded.iter().any(|x| x.contains(p)))
        .collect();
    if kept.is_empty() {
        return None;
    }
    let holes = excluded
        .iter()
        .copied()
        .filter(|x| kept.iter().any(|p| p.contains(x)))
        .collect();
    Some((kept, holes))
}
