//! DROPs of every protocol (a DROP that names none, as `-d 203.0.113.7 -j DROP`): tproxy's
//! rules for other protocols than TCP and UDP (`proto = "other"`) drop and leave alone by
//! address and interface, so such a DROP translates when every rule ahead of it that decides
//! some of those packets says what they can say.

use super::{flatten::Flat, precedence, Match, Parsed, Target};

/// Whether `m` names no protocol, so matches every one: what `proto = ["tcp", "udp",
/// "other"]` says. A negated protocol (`! -p icmp`) leaves one out, which "other" cannot.
fn every_protocol(m: &Match) -> bool {
    m.transports.is_empty() && !m.protocols_beyond && m.other_protocol.is_none()
}

/// Whether a rule that matches packets of other protocols says what tproxy's rules for
/// them can: a drop or a bypass of every protocol for arrivals, by addresses and interface.
fn expressible(rule: &Parsed) -> bool {
    let m = &rule.matches;
    matches!(rule.target, Target::Drop | Target::Bypass | Target::Return)
        && every_protocol(m)
        && !m.local
        && m.mark.is_none()
        && m.ct_direction.is_none()
        && m.sports.is_empty()
        && m.ports.is_empty()
}

/// Whether some packet of another protocol than TCP and UDP may match: it names no
/// protocol, a negated one, or another one.
pub(super) fn may_match_other_protocols(m: &Match) -> bool {
    !m.matches_nothing
        && (m.transports.is_empty() || m.protocols_beyond || m.other_protocol.is_some())
}

/// Whether `a` and `b` share a packet of another protocol (no ports, any transport).
fn share_other_packets(a: &Match, b: &Match) -> bool {
    let addresses_only = |m: &Match| Match {
        transports: Vec::new(),
        ports: Vec::new(),
        sports: Vec::new(),
        ..m.clone()
    };
    precedence::overlaps(&addresses_only(a), &addresses_only(b))
}

/// `flat` with the rules that could be written for other protocols marked so, where the
/// rule set has a DROP of every protocol: ahead of everything that weighs rules against each
/// other (`negation`, the precedence), so that a rule for TCP and UDP alone is never taken
/// to cover one for every protocol. [`written_for_them`] settles which keep the mark.
pub(super) fn marked_where_dropped(mut flat: Vec<Flat>) -> Vec<Flat> {
    let drops = |rule: &Parsed| rule.target == Target::Drop && expressible(rule);
    if flat.iter().flatten().any(drops) {
        for rule in flat.iter_mut().flatten() {
            rule.matches.other_protocols = expressible(rule);
        }
    }
    flat
}

/// `flat` (the rules for arrivals and local connections in the kernel's order), with the
/// rules that decide packets of other protocols written for them too, where a DROP of
/// every protocol needs them. A DROP of other protocols that cannot be written so is
/// reported (its TCP and UDP part stays): one with a match those rules do not have, or one
/// that a rule ahead of it takes some of those packets from in a way they cannot say.
pub(super) fn written_for_them(mut flat: Vec<Parsed>, skipped: &mut Vec<String>) -> Vec<Parsed> {
    let mut undecidable: Vec<usize> = Vec::new();
    let mut written = false;
    for index in 0..flat.len() {
        let rule = &flat[index];
        // A divert chain's rules are reached through its socket match alone (which the
        // program has built in); that match itself is undecidable here: it takes the ICMP
        // errors about a flow with a socket too.
        if !may_match_other_protocols(&rule.matches) || rule.target == Target::Ignore {
            continue;
        }
        // Of the rules left out as changing nothing, only a RETURN or ACCEPT of one other
        // protocol (`-p icmp`) decides packets of those protocols.
        if matches!(rule.target, Target::Unsteered(_)) && rule.matches.other_protocol.is_none() {
            continue;
        }
        let drops = rule.target == Target::Drop && rule.matches.other_protocol.is_none();
        let ahead = undecidable
            .iter()
            .find(|&&earlier| share_other_packets(&flat[earlier].matches, &rule.matches));
        let expressible = expressible(rule);
        flat[index].matches.other_protocols = expressible && !(drops && ahead.is_some());
        let rule = &flat[index];
        match (expressible, ahead) {
            (true, Some(&earlier)) if drops => skipped.push(format!(
                "line {}: {}: DROP of protocols besides TCP and UDP: line {} ahead of it ({}) \
                 decides some of their packets in a way tproxy's rules for them (drop and \
                 bypass by address and interface, for arrivals) cannot say; keep a firewall \
                 rule for them",
                rule.line, rule.text, flat[earlier].line, flat[earlier].text
            )),
            (true, _) => written |= drops,
            // (`local` has refused OUTPUT's DROPs.)
            (false, _) if drops => skipped.push(format!(
                "line {}: {}: DROP of protocols besides TCP and UDP: tproxy drops the others \
                 by address and interface (without a mark, a direction, a negated protocol or \
                 ports), and the translation drops only TCP and UDP; keep a firewall rule for \
                 the others",
                rule.line, rule.text
            )),
            // The host's own connections meet other rules than arrivals.
            (false, _) if !rule.matches.local => undecidable.push(index),
            (false, _) => {}
        }
    }
    if !written {
        for rule in &mut flat {
            rule.matches.other_protocols = false;
        }
    }
    flat
}
