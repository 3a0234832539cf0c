//! MARK at prerouting with the TPROXY rules' mark, and no TPROXY: the recipe's policy
//! routing (`ip rule fwmark … lookup 100`, `local 0.0.0.0/0 dev lo table 100`) delivers the
//! packet to the host's own sockets whatever its destination. Squid's TPROXY guides do this
//! for the servers' replies to the connections Squid makes from its clients' addresses.
//! tproxy's `action = "deliver"` does the same: its routing mark, no socket assigned.
//!
//! MARK ends nothing: the packet goes on to the rules after it, and a later TPROXY, DROP or
//! MARK decides it anew, where `deliver`, like every tproxy rule, is the last word. So a MARK
//! becomes `deliver` only when no later rule that does any of that may match its packets; a
//! later accept or return changes nothing (the mark stays on the packet). nft's `meta mark
//! set … accept` ends its chain with the mark: `deliver` when the mark is the TPROXY rules',
//! a bypass when it never is.

use super::{flatten::Flat, local, precedence::overlaps, Parsed, Target};
use crate::values::Mark;

/// `flat` (the rules for arrivals, in the kernel's order) with each MARK and mark-and-accept
/// read as a delivery, a bypass, or why it is neither.
pub(super) fn resolve(flat: Vec<Flat>, notes: &mut Vec<String>) -> Vec<Flat> {
    let tproxy_marks: Vec<Mark> = flat
        .iter()
        .flatten()
        .filter_map(|rule| match rule.target {
            Target::Tproxy { mark, .. } => mark,
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
        let refuse = |reason: String| Err(format!("line {}: {}: {reason}", rule.line, rule.text));
        let delivers = !tproxy_marks.is_empty()
            && tproxy_marks
                .iter()
                .all(|&tproxy| local::steers(set, Some(tproxy)).is_ok());
        // Unknown without a TPROXY rule's mark: read as the accept it is, as before.
        let never = tproxy_marks
            .iter()
            .all(|&tproxy| local::never_the_recipes(set, Some(tproxy)));
        out.push(match (delivers, accepts) {
            (true, _) => match (accepts, later_decider(rule, &flat[i + 1..])) {
                (false, Some(later)) => refuse(format!(
                    "target MARK with the TPROXY rules' mark lets its packets go on to line \
                     {}, which may steer, drop or mark them again (tproxy's `deliver` would \
                     end there)",
                    later.line
                )),
                _ if rule.matches.dst_local => refuse(
                    "a mark for local delivery of the host's own addresses, which the kernel \
                     delivers anyway (leave it out)"
                        .into(),
                ),
                _ => {
                    notes.push(format!(
                        "line {}: `{}` sets the TPROXY rules' mark, whose policy routing \
                         delivers the packets to this host's own sockets: it became `action = \
                         \"deliver\"` (a flow's own socket first, then a transparent socket or \
                         listener for the destination; with none the packet is dropped, as it \
                         was)",
                        rule.line, rule.text
                    ));
                    Ok(Parsed {
                        target: Target::Deliver,
                        ..rule.clone()
                    })
                }
            },
            // An accept with a mark that leads to no TPROXY rule's routing: only an accept.
            (false, true) if never => Ok(Parsed {
                target: Target::Bypass,
                ..rule.clone()
            }),
            (false, true) => refuse(format!(
                "a mark and accept that leaves some packets with the TPROXY rules' mark {} (by \
                 the bits they carried before) and others without",
                tproxy_marks[0]
            )),
            (false, false) if tproxy_marks.is_empty() => refuse(
                "target MARK (marks are tproxy's own business): no TPROXY rule sets a mark \
                 (--tproxy-mark) to tell whether the policy routing delivers what it marks"
                    .into(),
            ),
            (false, false) => refuse("target MARK (marks are tproxy's own business)".into()),
        });
    }
    out
}

/// The first of `later` that may meet some of `rule`'s packets and decide them otherwise
/// than the delivery: steer, drop, reject or mark them (an accept or a return leaves the
/// mark, and the delivery, as they are).
fn later_decider<'a>(rule: &Parsed, later: &'a [Flat]) -> Option<&'a Parsed> {
    later.iter().flatten().find(|later| {
        matches!(
            later.target,
            Target::Tproxy { .. }
                | Target::Drop
                | Target::Reject
                | Target::Deliver
                | Target::SetMark(_)
                | Target::MarkThenAccept(_)
                | Target::Established(_)
                | Target::SocketDivert
        ) && overlaps(&rule.matches, &later.matches)
    })
}
