//! Rules that match the packet mark, and among them the proxy's loop guard: `-m mark --mark
//! 0xff -j RETURN` (nft `meta mark 0xff return`).
//!
//! Proxies mark their own upstream sockets and the rule set leaves packets with that mark
//! alone. tproxy's eBPF program never steers a packet whose mark is exactly tproxy's
//! `socket_mark`, ahead of any rule, so a guard translates to that setting when it means
//! the same: RETURN or ACCEPT rules for one exact mark that every steering rule's packets
//! with that mark meet first. (Nor are they dropped: a DROP before the guard, which would
//! drop them in iptables, does not; the note says so.) Any other mark match stays on its rule, as the rule's `mark`, which
//! tproxy's rules match like the kernel's `-m mark`.
//!
//! When the guard's mark is also the TPROXY rules' (istio's 0x539), it cannot be the socket
//! mark beside that routing mark; the routing mark is tproxy's own business (it installs the
//! policy routing), so tproxy then routes with a bit of its own (see
//! [`Guard::routing_elsewhere`]).

use super::{flatten::Flat, precedence::covers, Match, Parsed, Target};
use crate::{config::Settings, values::Mark};

/// The loop guard found: its rule and the mark.
pub(super) struct Guard {
    pub(super) rule: Parsed,
    /// The lines of the guard's other rules, for the same mark.
    pub(super) other_lines: Vec<usize>,
    pub(super) mark: u32,
    /// The line of a DROP or reject that comes before the guard.
    dropped_before: Option<usize>,
}

impl Guard {
    /// What the operator should know about the guard once it is the socket mark.
    pub(super) fn note(&self) -> String {
        let others: String = self
            .other_lines
            .iter()
            .map(|line| format!(" (and line {line})"))
            .collect();
        let mut note = format!(
            "line {}: `{}`{others} is tproxy's socket_mark {:#x}: packets carrying it are \
             never steered, and tproxy's own sockets carry it too",
            self.rule.line, self.rule.text, self.mark
        );
        if let Some(line) = self.dropped_before {
            note += &format!(
                "; nor dropped or rejected: line {line}'s DROP or reject comes first, but tproxy decides \
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

    /// What the operator should know when tproxy routes with `own` in place of the TPROXY
    /// rules' `tproxy_mark`, which is the guard's; `read_by_rules`: the rules' marks look
    /// at `own`'s bit.
    pub(super) fn routing_note(&self, tproxy_mark: Mark, own: Mark, read_by_rules: bool) -> String {
        let reading = if read_by_rules {
            "the rules' marks are read without that bit, which no rule needs set and only \
             tproxy sets"
        } else {
            "no rule's mark looks at that bit"
        };
        format!(
            "the TPROXY rules' mark {tproxy_mark} is also the loop guard's (line {}), which \
             becomes tproxy's socket_mark; tproxy installs its own policy routing, so it routes \
             the packets it steers with a mark of its own, {own} ({reading}). Anything else \
             that relied on steered packets carrying {tproxy_mark} (an `ip rule`, a later \
             netfilter rule) sees {own} instead",
            self.rule.line
        )
    }
}

/// `flat` without the loop guard, and the guard; other rules that match a mark keep it.
///
/// The guard may be several rules for one exact mark (`-p tcp -m mark --mark 0xff -j
/// RETURN` and its UDP twin, or one per chain a jump leads to): they are the socket mark
/// when every steering rule's packets with that mark meet one of them first, so that the
/// original never steers a packet with it either.
pub(super) fn guard(flat: Vec<Flat>) -> (Vec<Flat>, Option<Guard>) {
    let is_candidate = |rule: &Parsed, first: Option<u32>| {
        rule.matches.mark.is_some_and(|mark| {
            mark.mask == u32::MAX
                && mark.value != 0
                && first.is_none_or(|first| first == mark.value)
        }) && matches!(rule.target, Target::Bypass | Target::Return)
            && !rule.matches.excludes()
    };
    let Some(mark) = flat
        .iter()
        .flatten()
        .find(|rule| is_candidate(rule, None))
        .and_then(|rule| rule.matches.mark)
    else {
        return (flat, None);
    };
    let without_mark = |m: &Match| Match {
        mark: None,
        ..m.clone()
    };
    let mut guards: Vec<&Parsed> = Vec::new();
    for rule in flat.iter().flatten() {
        if is_candidate(rule, Some(mark.value)) {
            guards.push(rule);
            continue;
        }
        let may_carry_it = rule
            .matches
            .mark
            .is_none_or(|m| (m.value ^ mark.value) & m.mask == 0);
        if !matches!(rule.target, Target::Tproxy { .. } | Target::Deliver) || !may_carry_it {
            continue;
        }
        let steered = without_mark(&rule.matches);
        if !guards
            .iter()
            .any(|g| covers(&without_mark(&g.matches), &steered))
        {
            return (flat, None);
        }
    }
    let dropped_before = flat
        .iter()
        .flatten()
        .take_while(|rule| !is_candidate(rule, Some(mark.value)))
        .find(|rule| matches!(rule.target, Target::Drop | Target::Reject(_)))
        .map(|rule| rule.line);
    let guard = Guard {
        rule: guards[0].clone(),
        other_lines: guards[1..].iter().map(|g| g.line).collect(),
        mark: mark.value,
        dropped_before,
    };
    let out = flat
        .into_iter()
        .filter(|rule| {
            rule.as_ref()
                .map_or(true, |rule| !is_candidate(rule, Some(mark.value)))
        })
        .collect();
    (out, Some(guard))
}

/// A routing mark of tproxy's own: one bit outside `avoid` that none of the rules' marks
/// (`read`) looks at, or failing that one that none of them needs set (tproxy's rules then
/// read their marks without it: only tproxy sets it), and whether rules look at it.
/// tproxy's default bit comes first, then the highest.
pub(super) fn routing_elsewhere(avoid: u32, read: &[Mark]) -> Option<(Mark, bool)> {
    let default = Settings::default().mark;
    let bits: Vec<u32> = (0..32)
        .rev()
        .map(|bit| 1u32 << bit)
        .filter(|&bit| bit & avoid == 0)
        .collect();
    let candidates = || {
        bits.iter()
            .copied()
            .filter(|&bit| bit == default.mask)
            .chain(bits.iter().copied().filter(|&bit| bit != default.mask))
    };
    let one_bit = |bit: u32| Mark {
        value: bit,
        mask: bit,
    };
    if let Some(bit) = candidates().find(|&bit| read.iter().all(|m| m.mask & bit == 0)) {
        return Some((one_bit(bit), false));
    }
    candidates()
        .find(|&bit| {
            read.iter()
                .all(|m| m.value & bit == 0 && m.mask & !bit != 0)
        })
        .map(|bit| (one_bit(bit), true))
}

/// Whether a rule's `mark` needs bits of the `routing` mark, which tproxy's rules do not see
/// (see `datapath::rules::effective_mark`).
pub(super) fn looks_at_routing(mark: Mark, routing: Mark) -> bool {
    // A mask of nothing takes every mark: it looks at no bit.
    mark.mask != 0 && (mark.value & routing.mask != 0 || mark.mask & !routing.mask == 0)
}
