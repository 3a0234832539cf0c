//! Jumps inlined: the rules a chain runs, in order, each narrowed by the matches of the
//! jumps that led to it, as the kernel would meet them.

use ipnet::IpNet;

use super::{precedence::iface_covers, Match, Parsed, RuleSet, Target};
use crate::values::Transport;

/// A rule of the flattened rule set, or why it cannot be translated.
pub(super) type Flat = Result<Parsed, String>;

/// Inlines jumps from `chain`, narrowing the jumped-to rules by the jump's own matches.
pub(super) fn flatten(
    ruleset: &RuleSet,
    chain: &str,
    context: &Match,
    depth: usize,
    out: &mut Vec<Flat>,
) {
    let Some(rules) = ruleset.chains.get(chain) else {
        return;
    };
    for (i, rule) in rules.iter().enumerate() {
        let rule = match rule {
            Ok(rule) => rule,
            Err((line, text, reason)) => {
                out.push(Err(format!("line {line}: {text}: {reason}")));
                continue;
            }
        };
        let Some(matches) = narrow(context, &rule.matches) else {
            out.push(Err(format!(
                "line {}: {}: its matches conflict with those of the rule that jumps here",
                rule.line, rule.text
            )));
            continue;
        };
        match &rule.target {
            Target::Jump(target) if depth < 8 => {
                // RETURN in the target chain continues here, after the jump: only a bypass if
                // nothing after the jump could still steer or drop.
                let steers_later = rules[i + 1..].iter().any(|r| {
                    r.as_ref().is_ok_and(|r| {
                        matches!(
                            r.target,
                            Target::Tproxy { .. }
                                | Target::Drop
                                | Target::Jump(_)
                                | Target::SetMark(_)
                        )
                    })
                });
                let start = out.len();
                flatten(ruleset, target, &matches, depth + 1, out);
                if steers_later {
                    for rule in &mut out[start..] {
                        if let Ok(returned) = rule.as_ref() {
                            if returned.target == Target::Return {
                                *rule = Err(format!(
                                    "line {}: {}: RETURN goes back to the calling chain, whose later rules may still steer or drop the packet",
                                    returned.line, returned.text
                                ));
                            }
                        }
                    }
                }
            }
            Target::Jump(target) => out.push(Err(format!(
                "line {}: {}: jumps nest too deep (to {target})",
                rule.line, rule.text
            ))),
            Target::SetMark(_) if !matches.local => out.push(Err(format!(
                "line {}: {}: target MARK (marks are tproxy's own business)",
                rule.line, rule.text
            ))),
            _ if !(matches.local || matches.uids.is_empty() && matches.cgroups.is_empty()) => out
                .push(Err(format!(
                    "line {}: {}: `-m owner` and `-m cgroup` select locally generated packets, \
                     which only mangle OUTPUT sees",
                    rule.line, rule.text
                ))),
            _ => out.push(Ok(Parsed {
                matches,
                ..rule.clone()
            })),
        }
    }
}

/// The matches of a rule reached through a jump with `context`'s matches; `None` when both
/// constrain the same thing differently.
fn narrow(context: &Match, rule: &Match) -> Option<Match> {
    fn pick<T: Clone + PartialEq>(outer: &[T], inner: &[T]) -> Option<Vec<T>> {
        match (outer.is_empty(), inner.is_empty()) {
            (true, _) => Some(inner.to_vec()),
            (false, true) => Some(outer.to_vec()),
            (false, false) if outer == inner => Some(inner.to_vec()),
            _ => None,
        }
    }
    let family = match (context.family, rule.family) {
        (Some(a), Some(b)) if a != b => return None,
        (a, b) => b.or(a),
    };
    let transports = match (context.transports.is_empty(), rule.transports.is_empty()) {
        (false, false) => {
            let both: Vec<Transport> = rule
                .transports
                .iter()
                .copied()
                .filter(|t| context.transports.contains(t))
                .collect();
            if both.is_empty() {
                return None;
            }
            both
        }
        _ => pick(&context.transports, &rule.transports)?,
    };
    let dst_local = context.dst_local || rule.dst_local;
    let dst = narrow_prefixes(&context.dst, &rule.dst)?;
    if dst_local && !dst.is_empty() {
        return None;
    }
    Some(Match {
        transports,
        dst,
        dst_local,
        src: narrow_prefixes(&context.src, &rule.src)?,
        ports: pick(&context.ports, &rule.ports)?,
        sports: pick(&context.sports, &rule.sports)?,
        other_protocol: rule
            .other_protocol
            .clone()
            .or(context.other_protocol.clone()),
        iface: match (&context.iface, &rule.iface) {
            (Some(outer), Some(inner)) if iface_covers(outer, inner) => Some(inner.clone()),
            (Some(outer), Some(inner)) if iface_covers(inner, outer) => Some(outer.clone()),
            (Some(_), Some(_)) => return None,
            (a, b) => b.clone().or(a.clone()),
        },
        family,
        not_dst: union(&context.not_dst, &rule.not_dst),
        not_src: union(&context.not_src, &rule.not_src),
        not_iface: union(&context.not_iface, &rule.not_iface),
        mark: match (context.mark, rule.mark) {
            (Some(a), Some(b)) if a != b => return None,
            (a, b) => b.or(a),
        },
        local: context.local || rule.local,
        uids: pick(&context.uids, &rule.uids)?,
        cgroups: pick(&context.cgroups, &rule.cgroups)?,
    })
}

/// What either excludes.
fn union<T: Clone + PartialEq>(a: &[T], b: &[T]) -> Vec<T> {
    let mut all = a.to_vec();
    all.extend(b.iter().filter(|x| !a.contains(x)).cloned());
    all
}

/// Prefixes matching both lists: the inner ones that lie within an outer one.
fn narrow_prefixes(outer: &[IpNet], inner: &[IpNet]) -> Option<Vec<IpNet>> {
    match (outer.is_empty(), inner.is_empty()) {
        (true, _) => Some(inner.to_vec()),
        (false, true) => Some(outer.to_vec()),
        (false, false) => {
            let both: Vec<IpNet> = inner
                .iter()
                .copied()
                .filter(|i| outer.iter().any(|o| o.contains(i)))
                .collect();
            (both.len() == inner.len()).then_some(both)
        }
    }
}
