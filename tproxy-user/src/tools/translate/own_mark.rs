//! Rules that match the packet mark, and among them the proxy's loop guard: `-m mark --mark
//! 0xff -j RETURN` (nft `meta mark 0xff return`).
//!
//! Proxies mark their own upstream sockets and the rule set leaves packets with that mark
//! alone. tproxy's eBPF program never steers a packet whose mark is exactly tproxy's
//! `socket_mark`, ahead of any rule, so a guard translates to that setting when it means
//! the same: a RETURN or ACCEPT for one exact mark and nothing else, which no steering rule
//! comes before. (Nor are they dropped: a DROP before the guard, which would drop them in
//! iptables, does not; the note says so.) Any other mark match stays on its rule, as the rule's `mark`, which
//! tproxy's rules match like the kernel's `-m mark`.

use super::{flatten::Flat, Family, Match, Parsed, Target};
use crate::values::Mark;

/// The loop guard found: its rule and the mark.
pub(super) struct Guard {
    pub(super) rule: Parsed,
    pub(super) mark: u32,
    /// The line of a DROP rule that comes before the guard.
    dropped_before: Option<usize>,
}

impl Guard {
    /// What the operator should know about the guard once it is the socket mark.
    pub(super) fn note(&self) -> String {
        let mut note = format!(
            "line {}: `{}` is tproxy's socket_mark {:#x}: packets carrying it are never \
             steered, and tproxy's own sockets carry it too",
            self.rule.line, self.rule.text, self.mark
        );
        if let Some(line) = self.dropped_before {
            note += &format!(
                "; nor dropped: line {line}'s DROP comes first in iptables, but tproxy decides \
                 nothing for them (few packets carry a mark at tc ingress: see the README's \
                 \"Marks\")"
            );
        }
        note
    }

    /// Why the guard cannot be tproxy's socket mark under `routing` (the configuration's
    /// `mark`): tproxy refuses a socket mark that its routing rule would match.
    pub(super) fn conflict(&self, routing: Mark) -> Option<String> {
        (self.mark & routing.mask == routing.value).then(|| {
            format!(
                "line {}: {}: match `-m mark`: the mark {:#x} would match the routing mark {routing}, \
                 so it cannot be tproxy's socket_mark",
                self.rule.line, self.rule.text, self.mark
            )
        })
    }
}

/// `flat` without the loop guard, and the guard; other rules that match a mark keep it.
pub(super) fn guard(flat: Vec<Flat>) -> (Vec<Flat>, Option<Guard>) {
    let mut guarded: Option<Guard> = None;
    // The families of the steering rules so far: one of another family cannot come first.
    let mut steered_before: Vec<Family> = Vec::new();
    let mut dropped_before = None;
    let mut out = Vec::with_capacity(flat.len());
    for rule in flat {
        let Ok(parsed) = &rule else {
            out.push(rule);
            continue;
        };
        if matches!(parsed.target, Target::Tproxy { .. }) {
            steered_before.extend(families(&parsed.matches));
        }
        if parsed.target == Target::Drop {
            dropped_before.get_or_insert(parsed.line);
        }
        let Some(mark) = parsed.matches.mark else {
            out.push(rule);
            continue;
        };
        let is_guard = mark.mask == u32::MAX
            && mark.value != 0
            && matches!(parsed.target, Target::Bypass | Target::Return)
            && matches_any_packet(&parsed.matches)
            && !families(&parsed.matches).any(|f| steered_before.contains(&f))
            && guarded.as_ref().is_none_or(|g| g.mark == mark.value);
        if !is_guard {
            out.push(rule);
            continue;
        }
        if guarded.is_none() {
            guarded = Some(Guard {
                rule: parsed.clone(),
                mark: mark.value,
                dropped_before,
            });
        }
    }
    (out, guarded)
}

/// Whether the rule's other matches take every packet (of its family).
fn matches_any_packet(m: &Match) -> bool {
    m.transports.is_empty()
        && m.dst.is_empty()
        && m.src.is_empty()
        && m.ports.is_empty()
        && m.sports.is_empty()
        && m.iface.is_none()
        && !m.dst_local
        && m.uids.is_empty()
        && m.cgroups.is_empty()
        && !m.excludes()
}

/// The address families a rule's packets may have.
fn families(m: &Match) -> impl Iterator<Item = Family> {
    match m.family {
        Some(family) => vec![family],
        None => vec![Family::V4, Family::V6],
    }
    .into_iter()
}
