//! Negated matches opened into what tproxy's rules can say.
//!
//! A rule `M and not X -> T` lets the packets of `M and X` fall through to the rules after
//! it. tproxy has no negation and no fall-through, so the rule becomes a bypass of `M and X`
//! (a "hole") followed by `M -> T`. The hole wins over the rule by tproxy's own precedence:
//! an excluded destination is a longer prefix than the rule's, and an excluded source or
//! interface keeps the rule's destination and ports and comes first in the configuration.
//! The bypass is what the fall-through would do only when no later rule could steer or drop
//! those packets; otherwise the rule is reported instead.

use ipnet::IpNet;

use super::{
    flatten::Flat,
    precedence::{iface_covers, ifaces_overlap, overlaps},
    Family, Match, Parsed, Target,
};

/// `flat` (in order, jumps inlined) with every rule that excludes something opened into its
/// holes and itself, or into why it cannot be.
pub(super) fn open(flat: Vec<Flat>, notes: &mut Vec<String>) -> Vec<Flat> {
    let mut out = Vec::with_capacity(flat.len());
    for (i, rule) in flat.iter().enumerate() {
        let rule = match rule {
            Ok(rule) if rule.matches.excludes() => rule,
            other => {
                out.push(other.clone());
                continue;
            }
        };
        let Some((holes, rest)) = holes_and_rest(rule) else {
            notes.push(format!(
                "line {}: `{}` never matches: it excludes everything it matches; left out",
                rule.line, rule.text
            ));
            continue;
        };
        let steers_later = flat[i + 1..].iter().flatten().find(|later| {
            // A later rule's own exclusions only narrow it: its rule without them is enough
            // to compare with, unless it never matches at all.
            let later_matches = match holes_and_rest(later) {
                Some((_, rest)) => rest.matches,
                None => return false,
            };
            matches!(later.target, Target::Tproxy { .. } | Target::Drop)
                && holes
                    .iter()
                    .any(|hole| overlaps(&hole.matches, &later_matches))
        });
        if let Some(later) = steers_later {
            out.push(Err(format!(
                "line {}: {}: negated match: the packets it excludes fall through to line {}, \
                 which may steer or drop them, and tproxy's rules have no fall-through",
                rule.line, rule.text, later.line
            )));
            continue;
        }
        out.extend(holes.into_iter().map(Ok));
        out.push(Ok(rest));
    }
    out
}

/// How the text of a bypass rule for what a rule excludes begins.
const HOLE: &str = "what `";

/// Whether `rule` is the bypass for what another rule excludes, which that rule's packets
/// fall through rather than match.
pub(super) fn is_hole(rule: &Parsed) -> bool {
    rule.text.starts_with(HOLE) && rule.target == Target::Bypass
}

/// The bypass rules for what `rule` excludes, and `rule` without its exclusions; `None` when
/// it excludes all it matches.
fn holes_and_rest(rule: &Parsed) -> Option<(Vec<Parsed>, Parsed)> {
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
