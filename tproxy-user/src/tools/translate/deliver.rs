//! MARK at prerouting with the TPROXY rules' mark, and no TPROXY: the recipe's policy
//! routing (`ip rule fwmark … lookup 100`, `local 0.0.0.0/0 dev lo table 100`) delivers the
//! packet to the host's own sockets whatever its destination. Squid's TPROXY guides do this
//! for the servers' replies to the connections Squid makes from its clients' addresses.
//! tproxy's `action = "deliver"` does the same: its routing mark, no socket assigned.
//!
//! MARK ends nothing: the packet goes on to the rules after it, with the new mark, and a
//! later TPROXY, DROP or other mark decides it anew, where `deliver`, like every tproxy rule,
//! is the last word. So a MARK becomes `deliver` only when no later rule that does any of
//! that may match its packets before an accept or return takes them all (those leave the
//! mark, and the delivery, as they are). nft's `meta mark set … accept` ends its chain with
//! the mark: `deliver` when the mark is the TPROXY rules', a bypass when it never is.
//!
//! The recipe's routing is known only from the TPROXY rules' `--tproxy-mark` of the same
//! family (iptables and ip6tables, nft's `ip`, `ip6` and `inet` tables): without one, what
//! a mark does is unknown and the rule is reported.

use super::{
    flatten::Flat,
    local,
    precedence::{covers, overlaps},
    Family, Match, Parsed, Target,
};
use crate::values::Mark;

/// `flat` (the rules for arrivals, in the kernel's order) with each MARK and mark-and-accept
/// read as a delivery, a bypass, or why it is neither.
pub(super) fn resolve(flat: Vec<Flat>, notes: &mut Vec<String>) -> Vec<Flat> {
    let tproxies: Vec<(Option<Family>, Mark)> = flat
        .iter()
        .flatten()
        .filter_map(|rule| match rule.target {
            Target::Tproxy { mark, .. } => Some((rule.matches.family, mark?)),
            _ => None,
        })
        .collect();
    let mut out = Vec::with_capacity(flat.len());
    for (i, rule) in flat.iter().enumerate() {
        let Ok(rule) = rule else {
            out.push(rule.clone());
            continue;
        };
        let (set, accepts) = match rule.target {
            Target::SetMark(set) if !rule.matches.local => (set, false),
            Target::MarkThenAccept(set) if !rule.matches.local => (set, true),
            _ => {
                out.push(Ok(rule.clone()));
                continue;
            }
        };
        out.push(read(rule, set, accepts, &tproxies, &flat[i + 1..], notes));
    }
    out
}

/// What the MARK (or, `accepts`, mark-and-accept) `rule` setting `set` is, given the TPROXY
/// rules' families and marks and the rules `later` than it.
fn read(
    rule: &Parsed,
    set: Mark,
    accepts: bool,
    tproxies: &[(Option<Family>, Mark)],
    later: &[Flat],
    notes: &mut Vec<String>,
) -> Flat {
    let refuse = |reason: String| Err(format!("line {}: {}: {reason}", rule.line, rule.text));
    let families: &[Family] = match rule.matches.family {
        Some(Family::V4) => &[Family::V4],
        Some(Family::V6) => &[Family::V6],
        None => &[Family::V4, Family::V6],
    };
    // The recipe's marks for each family the rule takes: none for one, and what the mark
    // does to those packets is unknown.
    let mut marks: Vec<Mark> = Vec::new();
    for &family in families {
        let of_family: Vec<Mark> = tproxies
            .iter()
            .filter(|(f, _)| f.is_none_or(|f| f == family))
            .map(|&(_, mark)| mark)
            .collect();
        if of_family.is_empty() {
            let name = match family {
                Family::V4 => "IPv4",
                Family::V6 => "IPv6",
            };
            return refuse(format!(
                "{} (marks are tproxy's own business): no {name} TPROXY rule sets a mark \
                 (--tproxy-mark) to tell whether the policy routing delivers what it marks",
                if accepts {
                    "a mark and accept"
                } else {
                    "target MARK"
                }
            ));
        }
        marks.extend(of_family);
    }
    let delivers = marks
        .iter()
        .all(|&tproxy| local::steers(set, Some(tproxy)).is_ok());
    let never = marks
        .iter()
        .all(|&tproxy| local::never_the_recipes(set, Some(tproxy)));
    if !delivers {
        return match accepts {
            true if never => {
                notes.push(format!(
                    "line {}: `{}` sets a mark that is not the TPROXY rules' {}: read as the \
                     accept it is (the mark it sets is not kept: tproxy leaves the packet's \
                     mark as it came)",
                    rule.line, rule.text, marks[0]
                ));
                Ok(Parsed {
                    target: Target::Bypass,
                    ..rule.clone()
                })
            }
            true => refuse(format!(
                "a mark and accept that leaves some packets with the TPROXY rules' mark {} (by \
                 the bits they carried before) and others without",
                marks[0]
            )),
            false => refuse(
                marks
                    .iter()
                    .find_map(|&tproxy| local::steers(set, Some(tproxy)).err())
                    .unwrap_or_default(),
            ),
        };
    }
    // tproxy's delivery sets its routing mark alone: another bit set here would be lost to
    // whatever reads it later (an INPUT rule, another `ip rule`).
    let beyond = marks
        .iter()
        .fold(set.value & set.mask, |bits, tproxy| bits & !tproxy.mask);
    if beyond != 0 {
        return refuse(format!(
            "it sets the TPROXY rules' mark and bits besides ({beyond:#x}), which tproxy's \
             `deliver` does not set (it sets its routing mark alone)"
        ));
    }
    if !accepts {
        match later_decider(rule, set, later) {
            Some(Ok(decider)) => {
                return refuse(format!(
                    "target MARK with the TPROXY rules' mark lets its packets go on to line {}, \
                     which may steer, drop or mark them again (tproxy's `deliver` would end \
                     there)",
                    decider.line
                ))
            }
            Some(Err(_)) => {
                return refuse(
                    "target MARK with the TPROXY rules' mark lets its packets go on to a rule \
                     that cannot be translated, which may steer, drop or mark them again \
                     (tproxy's `deliver` would end there)"
                        .into(),
                )
            }
            None => {}
        }
    }
    notes.push(format!(
        "line {}: `{}` sets the TPROXY rules' mark, whose policy routing delivers the packets \
         to this host's own sockets: it became `action = \"deliver\"` (a flow's own socket \
         first, then a transparent socket or listener for the destination; with none the \
         packet is dropped, as it was)",
        rule.line, rule.text
    ));
    Ok(Parsed {
        target: Target::Deliver,
        ..rule.clone()
    })
}

/// The first of `later` that may meet some of `rule`'s packets, which carry `set` from
/// there on, and decide them otherwise than the delivery: steer, drop, reject or mark them
/// anew. An accept or return that takes all of them ends the search (it leaves the mark, and
/// the delivery, as they are), and so does the same mark set again with an accept. A rule
/// that cannot be translated may be any of them (`Err`).
fn later_decider<'a>(rule: &Parsed, set: Mark, later: &'a [Flat]) -> Option<&'a Flat> {
    let marked = with_mark_set(&rule.matches, set);
    for flat in later {
        let Ok(later) = flat else {
            return Some(flat);
        };
        // `overlaps` reads no exclusions: one of the mark the MARK set leaves them all out.
        let excluded = later.matches.not_marks.iter().any(|excluded| {
            marked.mark.is_some_and(|mark| {
                mark.mask & excluded.mask == excluded.mask
                    && mark.value & excluded.mask == excluded.value
            })
        });
        if excluded || !overlaps(&marked, &later.matches) {
            continue;
        }
        let takes_all = !later.matches.excludes() && covers(&later.matches, &marked);
        match later.target {
            Target::Bypass | Target::Return if takes_all => return None,
            Target::MarkThenAccept(again) if again == set && takes_all => return None,
            Target::SetMark(again) | Target::MarkThenAccept(again) if again == set => {}
            Target::Tproxy { .. }
            | Target::Drop
            | Target::Reject(_)
            | Target::Deliver
            | Target::SetMark(_)
            | Target::MarkThenAccept(_)
            | Target::Established(_)
            | Target::SocketDivert => return Some(flat),
            _ => {}
        }
    }
    None
}

/// `m` for the packets after a MARK that sets `set`: the bits under its mask are its value,
/// the others as `m` asked.
fn with_mark_set(m: &Match, set: Mark) -> Match {
    let mark = match m.mark {
        None => Mark {
            value: set.value & set.mask,
            mask: set.mask,
        },
        Some(asked) => Mark {
            value: (asked.value & !set.mask) | (set.value & set.mask),
            mask: asked.mask | set.mask,
        },
    };
    Match {
        mark: Some(mark),
        // An excluded mark on bits the MARK sets no longer tells its packets apart (left
        // out: more packets, never fewer).
        not_marks: m
            .not_marks
            .iter()
            .copied()
            .filter(|excluded| excluded.mask & set.mask == 0)
            .collect(),
        ..m.clone()
    }
}
