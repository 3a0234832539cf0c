//! The connmark first-packet idiom (shadowsocks-libev's README, v2rayA): a chain shared by
//! PREROUTING and OUTPUT that restores the connection's mark into the packet's, returns a
//! flow marked already, leaves the bypassed destinations alone, and marks only a flow's first
//! packet (a TCP SYN, a UDP packet of a new connection), saving that mark in the connection;
//! back in PREROUTING a TPROXY rule takes the packets with that mark, and in OUTPUT the mark
//! routes the host's packets back by `lo` to it.
//!
//! ```text
//! -A SSREDIR -j CONNMARK --restore-mark
//! -A SSREDIR -m mark --mark 0x2333 -j RETURN
//! -A SSREDIR -d 10.0.0.0/8 -j RETURN
//! -A SSREDIR -p tcp --tcp-flags FIN,SYN,RST,ACK SYN -j MARK --set-mark 0x2333
//! -A SSREDIR -p udp -m conntrack --ctstate NEW -j MARK --set-mark 0x2333
//! -A SSREDIR -j CONNMARK --save-mark
//! ```
//!
//! The connmark keeps the first packet's decision for the flow's later packets, and never
//! marks the replies of a flow it left alone. tproxy keeps the decision of a flow it steers
//! (a flow's own socket is looked up first, before any rule), and `ct_direction =
//! "original"` leaves replies alone: the chain is rewritten, before anything else reads it,
//! into its bypasses and the marking rules with `--ctdir ORIGINAL` in place of their
//! first-packet match (and for PREROUTING's jumps the marking rules take the TPROXY rule's
//! target, which their mark led to). What differs is said in a note: a connection older than
//! tproxy's start that the rules would steer goes to the listener (which resets it), where
//! the connmark, never set for it, left it alone.

use std::collections::HashMap;

use super::{full_mark, iptables::Reach, words, Chain, Match, Parsed, Target};
use crate::values::{parse_mark, Mark, Transport};

/// Reparses a rule's words (after `-A CHAIN`) as the chain with this key holds them, with
/// its line number and text.
pub(super) type Reparse<'a> = dyn Fn(&str, usize, &str, &[String]) -> Chain + 'a;

/// One chain found holding the idiom.
struct Idiom {
    /// The mark that the guard returns and the TPROXY rules match.
    mark: Mark,
    /// The rules between the guard and the marking: RETURNs.
    middle: Vec<Parsed>,
    /// The marking rules, reparsed with `--ctdir ORIGINAL` for their first-packet match.
    marking: Vec<Parsed>,
    /// The chain the marking is in when it is not the idiom's own (v2rayA's TP_MARK).
    marking_chain: Option<String>,
    /// The lines of the restore and the save.
    restore_line: usize,
    save_line: usize,
}

/// Rewrites each chain holding the idiom (see the module's documentation), when its callers
/// are as the idiom has them; otherwise leaves it as it is, to be reported rule by rule.
///
/// Not when another rule reads or sets the connection's mark (`connmark_lines`: the lines of
/// the input that name it, in any table), which the idiom's would no longer set or restore,
/// nor when a rule untracks packets (`untracks`): the idiom never marks an untracked flow
/// (`--ctstate NEW` does not match it), where tproxy would take it as original.
pub(super) fn rewrite(
    chains: &mut HashMap<String, Chain>,
    reach: &HashMap<String, Reach>,
    reparse: &Reparse,
    connmark_lines: &[usize],
    untracks: bool,
    notes: &mut Vec<String>,
) {
    let mut keys: Vec<String> = chains.keys().cloned().collect();
    keys.sort();
    let found: Vec<(String, Idiom)> = keys
        .into_iter()
        .filter_map(|key| find(chains, &key, reparse).map(|idiom| (key, idiom)))
        .collect();
    let idioms_lines: Vec<usize> = found
        .iter()
        .flat_map(|(_, idiom)| [idiom.restore_line, idiom.save_line])
        .collect();
    if untracks
        || connmark_lines
            .iter()
            .any(|line| !idioms_lines.contains(line))
    {
        return;
    }
    for (key, idiom) in found {
        if let Some(note) = apply(chains, reach, &key, idiom) {
            notes.push(note);
        }
    }
}

/// The idiom in chain `key`, if it is there.
fn find(chains: &HashMap<String, Chain>, key: &str, reparse: &Reparse) -> Option<Idiom> {
    let chain = chains.get(key)?;
    let (Err((restore_line, restore, _)), rest) = chain.split_first()? else {
        return None;
    };
    if !whole_mark(restore, "--restore-mark") {
        return None;
    }
    let (Ok(guard), rest) = rest.split_first()? else {
        return None;
    };
    // An unmarked packet must not match the mark: a new flow's, restored from a connection
    // never marked, would return at once.
    let mark = (guard.target == Target::Return)
        .then(|| only_mark(&guard.matches))
        .flatten()
        .filter(|mark| mark.value != 0)?;
    // The marking ends the chain, or a chain its last rule jumps to without a match.
    let (middle, tail, marking_chain) = match rest.last()? {
        Ok(Parsed {
            target: Target::Jump(to),
            matches,
            ..
        }) if names_nothing(matches) => {
            let marking = chains.get(to)?;
            (
                &rest[..rest.len() - 1],
                marking.as_slice(),
                Some(to.clone()),
            )
        }
        _ => {
            let start = rest.iter().rposition(Result::is_ok).map_or(0, |i| i + 1);
            (&rest[..start], &rest[start..], None)
        }
    };
    let (Err((save_line, save, _)), marking) = tail.split_last()? else {
        return None;
    };
    if !whole_mark(save, "--save-mark") || marking.is_empty() {
        return None;
    }
    let middle: Vec<Parsed> = middle
        .iter()
        .map(|entry| {
            entry
                .as_ref()
                .ok()
                .filter(|rule| {
                    rule.target == Target::Return
                        && rule.matches.mark.is_none()
                        && rule.matches.not_marks.is_empty()
                })
                .cloned()
        })
        .collect::<Option<_>>()?;
    let marking_key = marking_chain.as_deref().unwrap_or(key);
    let mut reparsed = Vec::new();
    for entry in marking {
        let Err((line, text, _)) = entry else {
            return None;
        };
        let original = first_packet_as_original(text, mark)?;
        for rule in reparse(marking_key, *line, text, &original) {
            let rule = rule.ok()?;
            if !matches!(rule.target, Target::SetMark(_)) {
                return None;
            }
            reparsed.push(rule);
        }
    }
    Some(Idiom {
        mark,
        middle,
        marking: reparsed,
        marking_chain,
        restore_line: *restore_line,
        save_line: *save_line,
    })
}

/// Rewrites the idiom of chain `key` into a chain for PREROUTING's jumps and one for
/// OUTPUT's; the note that says so, or `None` (nothing changed) when a caller is not as the
/// idiom has it.
fn apply(
    chains: &mut HashMap<String, Chain>,
    reach: &HashMap<String, Reach>,
    key: &str,
    idiom: Idiom,
) -> Option<String> {
    let name = key.strip_prefix("ip6 ").unwrap_or(key);
    // A jump to it that was not parsed cannot be pointed elsewhere. (Compared by name: an
    // unparsed jump of the other family to a chain of the same name stops it too, which
    // only leaves the rules to be reported as they were.)
    let unparsed_jump = chains.values().flatten().any(|entry| {
        entry.as_ref().is_err_and(|(_, text, _)| {
            let w = words(text);
            w.windows(2)
                .any(|pair| matches!(pair[0].as_str(), "-j" | "-g") && pair[1] == name)
        })
    });
    if unparsed_jump {
        return None;
    }
    let mut forwarded: Vec<(String, usize)> = Vec::new();
    let mut local: Vec<(String, usize)> = Vec::new();
    for (caller, entries) in chains.iter() {
        for (at, entry) in entries.iter().enumerate() {
            let Ok(rule) = entry else { continue };
            match &rule.target {
                Target::Goto(to) if to == key => return None,
                Target::Jump(to) if to == key => {
                    let from = reach.get(caller).copied().unwrap_or_default();
                    match (from.prerouting, from.output) {
                        (true, false) => forwarded.push((caller.clone(), at)),
                        (false, true) => local.push((caller.clone(), at)),
                        _ => return None,
                    }
                }
                _ => {}
            }
        }
    }
    // What the idiom gives back unmarked meets only further jumps to it and, at PREROUTING,
    // the TPROXY rules on its mark, which it does not carry (restored from a connection
    // never marked): the end of the caller. Each jump is then a goto to the rewritten chain.
    for (caller, at) in &local {
        let rest = &chains[caller][at + 1..];
        if !rest
            .iter()
            .all(|entry| matches!(entry, Ok(rule) if rule.target == Target::Jump(key.into())))
        {
            return None;
        }
    }
    let mut steering: Vec<Parsed> = Vec::new();
    for (caller, at) in &forwarded {
        let taken = tproxy_rules_after(&chains[caller][at + 1..], key, idiom.mark)?;
        let jumped = match &chains[caller][*at] {
            Ok(jump) => jump.matches.transports.clone(),
            Err(_) => unreachable!("`forwarded` holds parsed jumps only"),
        };
        for rule in &idiom.marking {
            // A marking rule for another protocol than the jump's never matches there.
            let disjoint = !jumped.is_empty()
                && !rule.matches.transports.is_empty()
                && rule
                    .matches
                    .transports
                    .iter()
                    .all(|transport| !jumped.contains(transport));
            if disjoint {
                continue;
            }
            let tproxy = taken.iter().find(|(transports, _)| {
                rule.matches
                    .transports
                    .iter()
                    .all(|transport| transports.contains(transport))
            })?;
            // A TPROXY rule that sets no mark leaves the packet routed by the one the idiom
            // set (the recipe's `ip rule fwmark` is for it): the steering rule sets that.
            let target = match (&tproxy.1, &rule.target) {
                (
                    Target::Tproxy {
                        on_ip,
                        on_port,
                        mark: None,
                    },
                    Target::SetMark(set),
                ) => Target::Tproxy {
                    on_ip: *on_ip,
                    on_port: *on_port,
                    mark: Some(*set),
                },
                (target, _) => target.clone(),
            };
            // Each PREROUTING jump asks for the same marking rules: kept once, as long as
            // their TPROXY rules agree.
            if !steering.iter().any(|kept| {
                kept.line == rule.line && kept.matches.transports == rule.matches.transports
            }) {
                steering.push(Parsed {
                    target,
                    ..rule.clone()
                });
            } else if steering
                .iter()
                .any(|kept| kept.line == rule.line && kept.target != target)
            {
                // Two PREROUTING jumps whose TPROXY rules differ.
                return None;
            }
        }
    }
    // PREROUTING's jumps leave the host's own addresses out (`! --dst-type LOCAL`): in
    // the chain, ahead of all, a bypass of them, which the rules after it do not then have to
    // exclude one by one. Those packets met only the TPROXY rules on the idiom's mark in the
    // original, and no packet for the host's own addresses carries it: OUTPUT's jumps leave
    // them out too, and an arrival carries no mark at tc ingress but one the host set.
    // Every jump must leave them out, or the bypass would take what another jump sends in.
    let leave_out_own: Vec<bool> = forwarded
        .iter()
        .filter_map(|(caller, at)| chains.get(caller).and_then(|c| c.get(*at)))
        .filter_map(|jump| jump.as_ref().ok())
        .map(|jump| jump.matches.excludes_dst_local)
        .collect();
    if leave_out_own.contains(&true) && leave_out_own.contains(&false) {
        return None;
    }
    let mut own_addresses = None;
    for (caller, at) in &forwarded {
        if let Some(Ok(jump)) = chains.get(caller).and_then(|c| c.get(*at)) {
            if jump.matches.excludes_dst_local {
                own_addresses = Some(Parsed {
                    matches: Match {
                        dst_local: true,
                        family: jump.matches.family,
                        ..Match::default()
                    },
                    target: Target::Return,
                    ..jump.clone()
                });
            }
            let rest = Match {
                excludes_dst_local: false,
                ..jump.matches.clone()
            };
            if rest.excludes() {
                return None;
            }
        }
    }
    let forwarded_key = format!("{key} (first packets, arrivals)");
    let local_key = format!("{key} (first packets, local)");
    let chain_of = |rules: Vec<Parsed>| -> Chain {
        idiom.middle.iter().cloned().chain(rules).map(Ok).collect()
    };
    for (caller, at) in &forwarded {
        if let Some(Ok(rule)) = chains.get_mut(caller).and_then(|c| c.get_mut(*at)) {
            rule.target = Target::Goto(forwarded_key.clone());
            rule.matches.excludes_dst_local = false;
        }
    }
    for (caller, at) in &local {
        if let Some(Ok(rule)) = chains.get_mut(caller).and_then(|c| c.get_mut(*at)) {
            rule.target = Target::Goto(local_key.clone());
        }
    }
    if !forwarded.is_empty() {
        let chain = own_addresses.into_iter().map(Ok).chain(chain_of(steering));
        chains.insert(forwarded_key, chain.collect());
    }
    if !local.is_empty() {
        // A packet the host sends has no input interface: `-i eth0` never matches it, `! -i
        // eth0` always, and `-i +` (any name, the empty one too) always.
        let any = |iface: &String| iface == "*";
        let chain = chain_of(idiom.marking.clone())
            .into_iter()
            .flatten()
            .filter(|rule| rule.matches.iface.as_ref().is_none_or(any))
            .filter(|rule| !rule.matches.not_iface.iter().any(any))
            .map(|mut rule| {
                rule.matches.iface = None;
                rule.matches.not_iface.clear();
                Ok(rule)
            });
        chains.insert(local_key, chain.collect());
    }
    chains.remove(key);
    if let Some(marking) = &idiom.marking_chain {
        let still_used = chains.values().flatten().flatten().any(
            |rule| matches!(&rule.target, Target::Jump(to) | Target::Goto(to) if to == marking),
        );
        if !still_used {
            chains.remove(marking);
        }
    }
    let chains_named = match &idiom.marking_chain {
        Some(marking) => format!(
            "chains {name} and {}",
            marking.strip_prefix("ip6 ").unwrap_or(marking)
        ),
        None => format!("chain {name}"),
    };
    Some(format!(
        "lines {}-{} ({chains_named}): the connection-mark idiom, which marks a flow's first \
         packet (a TCP SYN, a UDP packet of a new connection) and keeps that mark for its \
         later packets, became its bypasses and rules with `ct_direction = \"original\"` for \
         what it marked (the jumps to it are read as gotos: what it gives back unmarked \
         meets only the TPROXY rules on its mark, which it does not carry): tproxy keeps a \
         flow it steers on its socket (looked up before any rule), and leaves the replies of \
         the flows it leaves alone to them, as the connection's mark did. Unlike it, tproxy \
         asks its rules again for each packet of a flow it left alone: one older than \
         tproxy's start, one whose first packet tproxy saw was not a SYN, or one that a bypass \
         stops matching later (its packets arrive by another interface, an entry of a set it \
         follows expires), goes to tproxy's listener, which resets it, where the original \
         never marked it",
        idiom.restore_line.min(idiom.save_line),
        idiom.restore_line.max(idiom.save_line)
    ))
}

/// The TPROXY rules on the idiom's mark that a packet marked by the jump ahead of `after`
/// meets first, with the transports each takes, when they end the chain: only further jumps
/// to the idiom (which give a marked packet back at once) may come between or after.
fn tproxy_rules_after(
    after: &[Result<Parsed, (usize, String, String)>],
    key: &str,
    mark: Mark,
) -> Option<Vec<(Vec<Transport>, Target)>> {
    let mut taken = Vec::new();
    for entry in after {
        let Ok(rule) = entry else { return None };
        match &rule.target {
            Target::Jump(to) if to == key => continue,
            Target::Tproxy { .. }
                if only_mark(&Match {
                    transports: Vec::new(),
                    ..rule.matches.clone()
                }) == Some(mark) =>
            {
                taken.push((rule.matches.transports.clone(), rule.target.clone()))
            }
            _ => return None,
        }
    }
    (!taken.is_empty()).then_some(taken)
}

/// The mark of a match that names nothing else (its family aside).
fn only_mark(m: &Match) -> Option<Mark> {
    let mark = m.mark?;
    names_nothing(&Match {
        mark: None,
        ..m.clone()
    })
    .then_some(mark)
}

/// Whether a match takes every packet of its family.
fn names_nothing(m: &Match) -> bool {
    Match {
        family: None,
        ..m.clone()
    } == Match::default()
}

/// Whether `text` is `-j CONNMARK` with `action` (`--restore-mark`, `--save-mark`) of the
/// whole mark, and nothing else.
fn whole_mark(text: &str, action: &str) -> bool {
    let w = words(text);
    let Some(rest) = w.get(2..) else {
        return false;
    };
    let whole = |option: &str| {
        rest.windows(2)
            .find(|pair| pair[0] == option)
            .is_none_or(|pair| parse_mark(&pair[1]).is_ok_and(|m| m.value == u32::MAX))
    };
    rest.first().is_some_and(|w| w == "-j")
        && rest.get(1).is_some_and(|w| w == "CONNMARK")
        && rest.get(2).is_some_and(|w| w == action)
        && rest[3..].chunks(2).all(|pair| {
            matches!(pair[0].as_str(), "--nfmask" | "--ctmask" | "--mask") && pair.len() == 2
        })
        && whole("--nfmask")
        && whole("--ctmask")
        && whole("--mask")
}

/// The words (after `-A CHAIN`) of a first-packet MARK rule (`-p tcp --tcp-flags
/// FIN,SYN,RST,ACK SYN` or `--syn`; `-p udp -m conntrack --ctstate NEW`) with `-m conntrack
/// --ctdir ORIGINAL` in place of that match, when the mark it sets on an unmarked packet
/// (the connection's, restored: none for a new connection) matches `mark`.
fn first_packet_as_original(text: &str, mark: Mark) -> Option<Vec<String>> {
    let w = words(text);
    let rest = w.get(2..)?;
    let at = rest.iter().position(|word| word == "-j")?;
    let (matches, target) = rest.split_at(at);
    let [_, mark_target, option, value] = target else {
        return None;
    };
    // On the unmarked packet of a new connection `--set-xmark`, `--set-mark` and
    // `--or-mark` all leave the value.
    let set = match option.as_str() {
        "--set-xmark" | "--set-mark" => full_mark(value).ok()?,
        "--or-mark" => full_mark(&format!("{value}/{value}")).ok()?,
        _ => return None,
    };
    if mark_target != "MARK" {
        return None;
    }
    if set.value & mark.mask != mark.value {
        return None;
    }
    let text: Vec<&str> = matches.iter().map(String::as_str).collect();
    let first_packet: Vec<&str> = match text.as_slice() {
        ["-p", "tcp", "-m", "tcp", "--tcp-flags", "FIN,SYN,RST,ACK", "SYN"]
        | ["-p", "tcp", "--tcp-flags", "FIN,SYN,RST,ACK", "SYN"]
        | ["-p", "tcp", "-m", "tcp", "--syn"]
        | ["-p", "tcp", "--syn"]
        | ["-p", "tcp", "-m", "conntrack", "--ctstate", "NEW"]
        | ["-p", "tcp", "-m", "state", "--state", "NEW"] => vec!["-p", "tcp"],
        ["-p", "udp", "-m", "conntrack", "--ctstate", "NEW"]
        | ["-p", "udp", "-m", "state", "--state", "NEW"] => vec!["-p", "udp"],
        _ => return None,
    };
    let set = format!("{:#x}/{:#x}", set.value, set.mask);
    Some(
        first_packet
            .into_iter()
            .chain(["-m", "conntrack", "--ctdir", "ORIGINAL"])
            .chain(["-j", "MARK", "--set-xmark", &set])
            .map(String::from)
            .collect(),
    )
}
