//! `nft list ruleset` output read into the rule model.

use std::{collections::HashMap, net::IpAddr};

use anyhow::Result;
use ipnet::{IpNet, Ipv4Subnets, Ipv6Subnets};
use tproxy_common::local_origin::{ClassidRange, UidRange};

use super::{
    by_address_type, cgroup_path, complement, interface_name, interface_pattern, local_bypass,
    other_classids, other_ids, other_protocol_rule, other_transports, port_range,
    precedence::iface_covers, set_mark_value, tproxy_port, words, AddressType, Chain, Entry,
    Family, Match, Parsed, RejectWith, RuleSet, Target, UntrackedMark,
};
use crate::{
    datapath::rules::CtDirection,
    values::{parse_gid_range, parse_mark, parse_mark_match, parse_prefix, Mark, Transport},
};

/// The block an nft line is in.
enum Block {
    Table,
    Chain,
    /// A named set (or map), by `table/name`.
    Set(String),
    Other,
}

/// Named sets' elements, by `table/name`.
type Sets = HashMap<String, Vec<String>>;

/// Where the reader is: nft's chains and sets are per table, and a table is named within its
/// family (`table ip x` and `table ip6 x` are two tables), so they are named `family
/// table/name`.
#[derive(Default)]
struct Position {
    blocks: Vec<Block>,
    family: Option<Family>,
    /// The table is not of IP packets (`bridge`, `netdev`, `arp`): its hooks are others'.
    other_packets: bool,
    /// The table's family and name (`ip x`).
    table: String,
    chain: Option<String>,
    hook: Option<String>,
    /// A set's `elements = { … }` may span lines: its text until the braces balance.
    elements: Option<(String, String)>,
    /// The chain is a base chain of `type nat`.
    nat: bool,
    /// The `type nat` base chains, each with whether it is hooked at prerouting.
    nat_chains: Vec<(String, bool)>,
    /// What each chain's rules jump to, and its lines with a `tproxy` statement or a mark
    /// set: what the `type nat` chains reach (see [`nat_reach`]).
    links: HashMap<String, Links>,
    /// The base chains with `policy drop`, with the line that says so.
    drop_policies: Vec<(String, usize, String)>,
}

/// A chain's jumps, and its lines that take part in TPROXY steering.
#[derive(Default)]
struct Links {
    to: Vec<String>,
    steering: Vec<(usize, String)>,
    /// Its rules.
    rules: usize,
    /// Some rule of it leaves a trace that later chains or the route see (see
    /// [`leaves_a_trace`]).
    leaves_a_trace: bool,
    /// Some rule of it reads what tproxy changes (see [`reads_what_tproxy_sets`]).
    reads_what_tproxy_sets: bool,
    /// Its rules that only untrack packets with one exact mark (see [`untracked_mark`]).
    untracked_marks: Vec<UntrackedMark>,
}

/// Reads the chains hooked at prerouting, the route chains hooked at output, and the chains
/// they may jump to.
pub(super) fn parse(input: &str) -> Result<RuleSet> {
    let mut ruleset = RuleSet {
        chains: HashMap::new(),
        entry: Vec::new(),
        local_entry: Vec::new(),
        ignored: 0,
        mark_set_elsewhere: false,
        elsewhere: Vec::new(),
        kept: Vec::new(),
        untracked_marks: Vec::new(),
        notes: Vec::new(),
        nft: true,
    };
    let mut sets = Sets::new();
    let mut at = Position::default();
    for (number, line) in input.lines().enumerate() {
        let number = number + 1;
        let trimmed = line.trim();
        if let Some((set, mut text)) = at.elements.take() {
            text.push(' ');
            text.push_str(trimmed);
            add_elements(&mut at, &mut sets, set, text);
            continue;
        }
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let w = words(trimmed);
        if trimmed == "}" {
            if let Some(Block::Chain) = at.blocks.pop() {
                at.chain = None;
            }
            continue;
        }
        if trimmed.ends_with('{') {
            at.open(&w);
            // nft prints a set without elements with no `elements` line at all.
            if let (Some(Block::Set(set)), "set") = (at.blocks.last(), w[0].as_str()) {
                sets.entry(set.clone()).or_default();
            }
            continue;
        }
        match at.blocks.last() {
            Some(Block::Set(set)) => {
                if w[0] == "elements" {
                    let set = set.clone();
                    add_elements(&mut at, &mut sets, set, trimmed.to_string());
                }
                continue;
            }
            Some(Block::Chain) => {}
            _ => continue,
        }
        chain_line(&mut ruleset, &mut at, &sets, number, trimmed, &w);
    }
    ruleset.elsewhere.extend(nat_reach(&at));
    leave_firewall_chains_alone(&mut ruleset, &at);
    for (chain, number, text) in at.drop_policies {
        let read = ruleset
            .entry
            .iter()
            .chain(&ruleset.local_entry)
            .any(|entry| entry.chain == chain);
        if read {
            ruleset.elsewhere.push((
                number,
                text,
                "the chain's policy drop drops every packet no rule of the chain decides; \
                 tproxy lets them through"
                    .to_string(),
            ));
        }
    }
    Ok(ruleset)
}

/// Takes out of the prerouting chains to translate those that only filter: no rule in
/// their reach (their own and the chains they jump to) steers, changes what a later chain
/// or the route sees (see [`leaves_a_trace`]), or reads what tproxy changes (see
/// [`reads_what_tproxy_sets`]); a QUIC `reject` at priority raw, say, or `ct state invalid
/// drop`. Such a chain decides nothing for the chains after it (its `accept` ends only
/// itself; what it drops is gone either way), and tproxy's program runs before netfilter's
/// prerouting, so the packets it steers still meet the chain: left as it is, in nftables,
/// it keeps doing what it did, as iptables' tables other than mangle are left alone. Noted,
/// with what to keep and what to delete.
fn leave_firewall_chains_alone(ruleset: &mut RuleSet, at: &Position) {
    let mut kept: Vec<(String, usize, Vec<String>)> = Vec::new();
    let untracked_lines = |reach: &[&str]| -> Vec<usize> {
        reach
            .iter()
            .filter_map(|chain| at.links.get(*chain))
            .flat_map(|links| links.untracked_marks.iter().map(|u| u.line))
            .collect()
    };
    ruleset.entry.retain(|entry| {
        let reach = reach(at, &entry.chain);
        let decides = reach.iter().any(|chain| {
            at.links.get(*chain).is_some_and(|links| {
                links.leaves_a_trace || links.reads_what_tproxy_sets || !links.steering.is_empty()
            })
        });
        if decides {
            return true;
        }
        let rules: usize = reach
            .iter()
            .filter_map(|chain| at.links.get(*chain))
            .map(|links| links.rules)
            .sum();
        let drops_the_rest = at.drop_policies.iter().any(|(c, ..)| *c == entry.chain);
        // A table listed twice enters its chains twice: one note each.
        let noted = kept.iter().any(|(chain, ..)| *chain == entry.chain);
        if !noted {
            ruleset.untracked_marks.extend(
                reach
                    .iter()
                    .filter_map(|chain| at.links.get(*chain))
                    .flat_map(|links| links.untracked_marks.iter().cloned()),
            );
        }
        if (rules > 0 || drops_the_rest) && !noted {
            kept.push((
                entry.chain.clone(),
                rules,
                reach.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            ));
        }
        false
    });
    let translated: Vec<&str> = ruleset
        .entry
        .iter()
        .chain(&ruleset.local_entry)
        .map(|entry| entry.chain.as_str())
        .collect();
    let translated_reach: Vec<&str> = translated
        .iter()
        .flat_map(|chain| reach(at, chain))
        .collect();
    for (chain, rules, reach) in kept {
        let reach_names: Vec<&str> = reach.iter().map(String::as_str).collect();
        let reads = match untracked_lines(&reach_names).as_slice() {
            [] => "reads no mark or socket".to_string(),
            lines => format!(
                "reads no mark or socket but to untrack packets (see the note on line {})",
                lines
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", line ")
            ),
        };
        let shared: Vec<&str> = reach
            .iter()
            .map(String::as_str)
            .filter(|c| translated_reach.contains(c))
            .collect();
        let shared = match shared.as_slice() {
            [] => String::new(),
            shared => format!(
                "; it jumps to {}, which translated chains use too: keep {}",
                shared.join(", "),
                if shared.len() == 1 { "it" } else { "them" }
            ),
        };
        ruleset.kept.push(format!(
            "chain `{chain}` at prerouting ({rules} rules) only filters: it steers nothing, \
             changes nothing later chains or the route read and {reads}, and \
             tproxy's program runs before it, so it still drops or rejects what it did: left \
             alone, keep it (delete only the chains translated: {}){shared}",
            translated.join(", ")
        ));
    }
}

/// `chain` and the chains its rules jump or go to, each once.
fn reach<'a>(at: &'a Position, chain: &'a str) -> Vec<&'a str> {
    let mut seen: Vec<&str> = Vec::new();
    let mut next = vec![chain];
    while let Some(chain) = next.pop() {
        if seen.contains(&chain) {
            continue;
        }
        seen.push(chain);
        if let Some(links) = at.links.get(chain) {
            next.extend(links.to.iter().map(String::as_str));
        }
    }
    seen
}

/// Whether an nft rule's statements leave a trace that a later chain or the route sees:
/// a `tproxy`, anything `… set` (the mark, the conntrack mark, a header field), a set or
/// meter updated from the packet, a TCP option reset, the packet handed elsewhere (`dup`,
/// `fwd`, `queue`), rewritten (NAT) or offloaded, an iptables extension nft cannot show in
/// its own words (`xt target "TPROXY"`), or a verdict map by name, whose jumps are not
/// followed here. Verdicts, matches, `counter`, `log`, `limit` and `notrack` leave none.
fn leaves_a_trace(w: &[String]) -> bool {
    w.iter().enumerate().any(|(i, word)| {
        let word = word.to_ascii_lowercase();
        matches!(
            word.as_str(),
            "tproxy"
                | "set"
                | "add"
                | "update"
                | "delete"
                | "meter"
                | "dup"
                | "fwd"
                | "queue"
                | "redirect"
                | "dnat"
                | "snat"
                | "masquerade"
                | "synproxy"
                | "flow"
                | "offload"
                | "xt"
        ) || word.starts_with("xt_")
            // `reset tcp option …`, not `reject with tcp reset`.
            || (word == "reset" && w.get(i + 1).is_some_and(|next| next == "tcp"))
            || (word == "vmap" && w.get(i + 1).is_some_and(|map| map.starts_with('@')))
    })
}

/// The mark of a rule that does nothing but untrack the packets carrying one exact mark
/// (`meta mark 0x00000001 notrack`, lesca's for the host's packets that mangle OUTPUT marked
/// and routed back by `lo`), its other matches reading nothing tproxy changes. Such a rule
/// in a chain left alone sees tproxy's routing mark as well, which `emit` then keeps out of
/// its reach (see [`UntrackedMark`]).
fn untracked_mark(w: &[String]) -> Option<Mark> {
    if !w.iter().any(|word| word == "notrack") {
        return None;
    }
    let at = w
        .windows(2)
        .position(|pair| pair[0] == "meta" && pair[1] == "mark")?;
    // `meta mark 0x1`, or `meta mark & 0x1 == 0x1` (`==` may be left out).
    let (mark, words) = match w.get(at + 2..at + 6).unwrap_or_default() {
        [and, mask, equals, value] if and == "&" && equals == "==" => {
            (parse_mark_match(&format!("{value}/{mask}")).ok()?, 6)
        }
        [and, mask, value, ..] if and == "&" && value != "!=" => {
            (parse_mark_match(&format!("{value}/{mask}")).ok()?, 5)
        }
        _ => (parse_mark_match(w.get(at + 2)?).ok()?, 3),
    };
    let others: Vec<String> = w[..at].iter().chain(&w[at + words..]).cloned().collect();
    (!reads_what_tproxy_sets(&others) && !leaves_a_trace(&others)).then_some(mark)
}

/// Whether an nft rule reads what tproxy's program changes before netfilter runs, or what
/// the chains translated (and then deleted) set: the packet's mark (tproxy routes by its
/// own), the conntrack mark or labels, and the packet's socket or its owner (tproxy assigns
/// the listener's).
fn reads_what_tproxy_sets(w: &[String]) -> bool {
    w.iter().any(|word| {
        matches!(
            word.to_ascii_lowercase().as_str(),
            "mark" | "label" | "socket" | "skuid" | "skgid" | "cgroup"
        )
    })
}

/// The lines with a `tproxy` statement or a mark set in the chains a `type nat` chain at
/// prerouting reaches. Like iptables' nat table, nat chains are left alone: they steer by
/// rewriting addresses (`redirect`, `dnat`), which stays as it is, not by TPROXY. But the
/// kernel runs them for a connection's first packet only, and a mark set there routes that
/// packet: neither is the TPROXY path tproxy replaces. (At output a mark set in a nat chain
/// routes nothing: the kernel looks the route up again after a nat chain only when the
/// destination changed, see `nf_nat_ipv4_local_fn`; and `tproxy` is prerouting's alone.)
fn nat_reach(at: &Position) -> Vec<(usize, String, String)> {
    let mut seen: Vec<&str> = Vec::new();
    let mut next: Vec<&str> = at
        .nat_chains
        .iter()
        .filter(|(_, prerouting)| *prerouting)
        .map(|(chain, _)| chain.as_str())
        .collect();
    let mut found = Vec::new();
    while let Some(chain) = next.pop() {
        if seen.contains(&chain) {
            continue;
        }
        seen.push(chain);
        let Some(links) = at.links.get(chain) else {
            continue;
        };
        next.extend(links.to.iter().map(String::as_str));
        found.extend(links.steering.iter().map(|(line, text)| {
            (
                *line,
                text.clone(),
                "a `tproxy` statement or a mark set in a chain that a `type nat` chain at \
                 prerouting leads to: nat chains are left alone, as iptables' nat table (they \
                 steer by NAT), but this is TPROXY's part (for a connection's first packet \
                 only) and is not translated"
                    .to_string(),
            )
        }));
    }
    found.sort();
    found
}

impl Position {
    /// Enters the block that the line `w` opens.
    fn open(&mut self, w: &[String]) {
        let name = w.get(1).cloned().unwrap_or_default();
        match w[0].as_str() {
            "table" => {
                self.family = match name.as_str() {
                    "ip" => Some(Family::V4),
                    "ip6" => Some(Family::V6),
                    _ => None,
                };
                self.other_packets = !matches!(name.as_str(), "ip" | "ip6" | "inet");
                self.table = format!("{name} {}", w.get(2).map_or("", String::as_str));
                self.blocks.push(Block::Table);
            }
            "chain" => {
                self.chain = Some(format!("{}/{name}", self.table));
                self.hook = None;
                self.nat = false;
                self.blocks.push(Block::Chain);
            }
            "set" | "map" => self
                .blocks
                .push(Block::Set(format!("{}/{name}", self.table))),
            _ => self.blocks.push(Block::Other),
        }
    }
}

/// Files `set`'s elements once `text` holds them all; until then keeps reading.
fn add_elements(at: &mut Position, sets: &mut Sets, set: String, text: String) {
    if text.matches('{').count() > text.matches('}').count() {
        at.elements = Some((set, text));
    } else {
        sets.insert(set, set_elements(&text));
    }
}

/// A line inside a chain: its hook, or a rule.
fn chain_line(
    ruleset: &mut RuleSet,
    at: &mut Position,
    sets: &Sets,
    number: usize,
    trimmed: &str,
    w: &[String],
) {
    if at.other_packets {
        // A bridge table's prerouting is the bridge's, before any IP routing.
        if !matches!(w[0].as_str(), "type" | "policy") {
            ruleset.ignored += 1;
        }
        return;
    }
    if w[0] == "type" {
        at.hook = w
            .iter()
            .position(|x| x == "hook")
            .and_then(|i| w.get(i + 1))
            .map(|h| h.trim_end_matches(';').to_string());
        at.nat = w.get(1).is_some_and(|t| t == "nat");
        match (at.hook.as_deref(), &at.chain) {
            // NAT, not TPROXY: left alone (see `nat_reach`).
            (Some(hook), Some(chain)) if at.nat => {
                at.nat_chains.push((chain.clone(), hook == "prerouting"))
            }
            (Some("prerouting"), Some(chain)) => {
                let entry = entry(chain, at.family, w);
                in_priority_order(&mut ruleset.entry, entry);
            }
            // Only a route chain looks up the route again when a rule changes the mark:
            // the recipe's way to send the host's own packets to `lo`.
            (Some("output"), Some(chain)) if w.get(1).is_some_and(|t| t == "route") => {
                let entry = entry(chain, at.family, w);
                in_priority_order(&mut ruleset.local_entry, entry);
            }
            _ => {}
        }
    }
    // What no rule of the chain decides is dropped: tproxy would let it through.
    let drops_the_rest = w
        .windows(2)
        .any(|pair| pair[0] == "policy" && pair[1].trim_end_matches(';') == "drop");
    if let (true, Some(chain)) = (drops_the_rest, &at.chain) {
        at.drop_policies
            .push((chain.clone(), number, trimmed.to_string()));
    }
    if w[0] == "type" || w[0] == "policy" {
        return;
    }
    let Some(chain) = &at.chain else { return };
    let links = at.links.entry(chain.clone()).or_default();
    // A verdict map's jumps end in `,` or `}`.
    links.to.extend(
        w.windows(2)
            .filter(|pair| pair[0] == "jump" || pair[0] == "goto")
            .map(|pair| format!("{}/{}", at.table, pair[1].trim_end_matches([',', '}']))),
    );
    links.rules += 1;
    links.leaves_a_trace |= leaves_a_trace(w);
    match untracked_mark(w) {
        Some(mark) => links.untracked_marks.push(UntrackedMark {
            line: number,
            text: trimmed.to_string(),
            mark,
        }),
        None => links.reads_what_tproxy_sets |= reads_what_tproxy_sets(w),
    }
    if w.iter().any(|x| x == "tproxy") || w.windows(2).any(|p| p[0] == "mark" && p[1] == "set") {
        links.steering.push((number, trimmed.to_string()));
    }
    if at.nat {
        ruleset.ignored += 1;
        ruleset.mark_set_elsewhere |= sets_mark(w);
        return;
    }
    let parsed: Chain = match parse_rule(trimmed, at.family, &at.table, sets) {
        Ok(ReadRule {
            matches,
            target,
            comment,
            notes,
        }) => {
            ruleset.notes.extend(
                notes
                    .into_iter()
                    .map(|note| format!("line {number}: {note}")),
            );
            matches
                .into_iter()
                .map(|matches| {
                    Ok(Parsed {
                        line: number,
                        text: trimmed.to_string(),
                        matches,
                        target: target.clone(),
                        comment: comment.clone(),
                    })
                })
                .collect()
        }
        Err(reason) => vec![Err((number, trimmed.to_string(), reason))],
    };
    match at.hook.as_deref() {
        Some("prerouting") | None => ruleset
            .chains
            .entry(chain.clone())
            .or_default()
            .extend(parsed),
        Some("output")
            if ruleset
                .local_entry
                .iter()
                .any(|entry| &entry.chain == chain) =>
        {
            ruleset
                .chains
                .entry(chain.clone())
                .or_default()
                .extend(parsed)
        }
        Some("output") => {
            ruleset.elsewhere.push((number, trimmed.to_string(), "a rule in a chain at the output hook that is not `type route`: a mark it sets does not send the packet to the TPROXY rules".to_string()));
        }
        Some(_) => {
            ruleset.ignored += 1;
            ruleset.mark_set_elsewhere |= sets_mark(w);
        }
    }
}

/// Whether a rule's words set the packet mark (`meta mark set`, `mark set`).
fn sets_mark(w: &[String]) -> bool {
    w.windows(3)
        .any(|x| x[0] != "ct" && x[1] == "mark" && x[2] == "set")
        || w.first().is_some_and(|x| x == "mark") && w.get(1).is_some_and(|x| x == "set")
}

/// The base chain `chain` of the `type` line `w`.
fn entry(chain: &str, family: Option<Family>, w: &[String]) -> Entry {
    Entry {
        chain: chain.to_string(),
        family,
        priority: w
            .iter()
            .position(|x| x == "priority")
            .map_or(0, |i| chain_priority(&w[i + 1..])),
    }
}

/// Puts `entry` among `entries` where the kernel runs it: a hook's base chains run by
/// priority, whatever the order listed (equal ones in that order).
fn in_priority_order(entries: &mut Vec<Entry>, entry: Entry) {
    let at = entries
        .iter()
        .position(|other| other.priority > entry.priority)
        .unwrap_or(entries.len());
    entries.insert(at, entry);
}

/// A base chain's priority from the words after `priority`: a number, or a name with an
/// optional offset (`mangle - 1`), as nft lists them.
fn chain_priority(words: &[String]) -> i32 {
    let word = |i: usize| words.get(i).map(|w| w.trim_end_matches(';'));
    let base = match word(0) {
        Some("raw") => -300,
        Some("mangle") => -150,
        Some("dstnat") => -100,
        Some("filter") => 0,
        Some("security") => 50,
        Some("srcnat") => 100,
        Some(number) => number.parse().unwrap_or(0),
        None => 0,
    };
    let offset: i32 = word(2).and_then(|n| n.parse().ok()).unwrap_or(0);
    match word(1) {
        Some("+") => base + offset,
        Some("-") => base - offset,
        _ => base,
    }
}

/// The elements of `elements = { a, b, … }`.
fn set_elements(text: &str) -> Vec<String> {
    let inner = text
        .split_once('{')
        .and_then(|(_, rest)| rest.rsplit_once('}'))
        .map_or("", |(inner, _)| inner);
    inner
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(String::from)
        .collect()
}

/// The values of an nft expression: one word, or a `{ a, b }` set, or a named set; after
/// `!=`, the values it excludes.
struct Values {
    values: Vec<String>,
    negated: bool,
    /// The index of the word after them.
    next: usize,
}

/// The values of the nft expression at `w[i]`.
fn nft_values(w: &[String], i: usize, sets: &Sets, table: &str) -> Result<Values, String> {
    let negated = w.get(i).is_some_and(|x| x == "!=");
    let i = i + usize::from(negated);
    let first = w.get(i).ok_or("an expression without a value")?;
    let (values, next) = if let Some(name) = first.strip_prefix('@') {
        let elements = sets
            .get(&format!("{table}/{name}"))
            .ok_or(format!("set @{name} is not defined in table {table}"))?;
        (elements.clone(), i + 1)
    } else if first != "{" {
        (vec![first.trim_end_matches(',').to_string()], i + 1)
    } else {
        let mut values = Vec::new();
        let mut j = i + 1;
        while j < w.len() && w[j] != "}" {
            for v in w[j].split(',').filter(|v| !v.is_empty()) {
                values.push(v.to_string());
            }
            j += 1;
        }
        (values, j + 1)
    };
    Ok(Values {
        values,
        negated,
        next,
    })
}

/// The mark `meta mark set` gives at `w[i]`, as the value and mask iptables' `MARK
/// --set-xmark` and tproxy write (the bits under the mask become the value's, the others
/// stay), with the index of the word after it: a number (all 32 bits), or the mark itself
/// with bits cleared and set, `meta mark & A | B` (nft lists `& A` and `| B` alone too).
/// `(mark & A) | B` sets B's bits, clears those neither A nor B keeps and keeps A's other
/// bits: value B under mask `!A | B`. Flipping bits (`^`) and marks from elsewhere (`ct
/// mark`) are no value under a mask.
fn set_mark(w: &[String], i: usize) -> Result<(Mark, usize), String> {
    let value = w.get(i).ok_or("`mark set` without a value")?;
    let from_mark = match value.as_str() {
        "meta" if w.get(i + 1).is_some_and(|x| x == "mark") => i + 2,
        "mark" => i + 1,
        number if number.starts_with(|c: char| c.is_ascii_digit()) => {
            return Ok((set_mark_value(value)?, i + 1))
        }
        _ => {
            return Err(format!(
                "`mark set {value} …`: a mark taken from elsewhere than the packet's own mark \
                 cannot be translated"
            ))
        }
    };
    let number = |at: usize| {
        let text = w.get(at).map_or("", String::as_str);
        match text.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => text.parse(),
        }
        .map_err(|_| format!("`mark set`: `{text}` is not a 32-bit number"))
    };
    let (mut keep, mut set, mut at) = (u32::MAX, 0, from_mark);
    if w.get(at).is_some_and(|x| x == "&") {
        keep = number(at + 1)?;
        at += 2;
    }
    if w.get(at).is_some_and(|x| x == "|") {
        set = number(at + 1)?;
        at += 2;
    }
    if w.get(at).is_some_and(|x| x == "&" || x == "|" || x == "^") {
        return Err(format!(
            "`mark set {} …`: only `meta mark & MASK | BITS` is a value under a mask (bits \
             flipped by `^` are not)",
            w[i..(at + 2).min(w.len())].join(" ")
        ));
    }
    let text = w[i..at].join(" ");
    let mask = !keep | set;
    if mask == 0 {
        return Err(format!("`mark set {text}` changes no bit of the mark"));
    }
    set_mark_value(&format!("{set:#x}/{mask:#x}"))
        .map(|mark| (mark, at))
        .map_err(|error| format!("`mark set {text}` (a value under a mask: {error})"))
}

/// A rule being read: its words, and what they said so far.
struct Rule<'a> {
    w: Vec<String>,
    table: &'a str,
    sets: &'a Sets,
    m: Match,
    target: Option<Target>,
    socket: bool,
    set_mark: Option<Mark>,
    comment: Option<String>,
    /// The input interfaces (names or patterns) the rule takes, none covering another:
    /// `iifname { "lo", "eth0" }` is a rule for each.
    ifaces: Option<Vec<String>>,
    /// `fib daddr type`'s types (any of them), read for the rule's family once every
    /// expression has narrowed it.
    address_types: Option<Vec<String>>,
}

/// One rule of a chain in table `table` of `family`: one rule of the model per input
/// interface it names (a packet arrives on one, so they never meet) and per address type
/// of its `fib daddr type`; with its comment and notes on how it was read.
fn parse_rule(
    text: &str,
    family: Option<Family>,
    table: &str,
    sets: &Sets,
) -> Result<ReadRule, String> {
    let mut rule = Rule {
        w: words(text),
        table,
        sets,
        m: Match {
            family,
            ..Match::default()
        },
        target: None,
        socket: false,
        set_mark: None,
        comment: None,
        ifaces: None,
        address_types: None,
    };
    let mut i = 0;
    while i < rule.w.len() {
        i = rule.expression(i)?;
    }
    let ifaces = rule.ifaces.take();
    let address_types = rule.address_types.take();
    let (mut m, target, comment) = rule.finish();
    let mut notes = Vec::new();
    if let Some(names) = address_types {
        if !m.dst.is_empty() || !m.not_dst.is_empty() || m.dst_set.is_some() {
            return Err(
                "`fib daddr type` and destination addresses in one rule: translate does not \
                 intersect them"
                    .into(),
            );
        }
        if m.dst_local || m.excludes_dst_local {
            return Err(twice("fib daddr type"));
        }
        let types = address_types_of(&names, m.family, &mut notes)?;
        if types.contains(&AddressType::Local) || types.contains(&AddressType::Anycast) {
            local_bypass(&m, &target)?;
        }
        if types.is_empty() {
            m.matches_nothing = true;
        } else {
            m.dst_types = Some(types);
        }
    }
    // A MARK may clear bits (`set_mark_value`); the TPROXY rules' mark is what the recipe
    // routes by, and must set some.
    if let Target::Tproxy {
        mark: Some(mark), ..
    } = target
    {
        parse_mark(&mark.to_string())?;
    }
    let target = other_protocol_rule(&m, target)?;
    if m.dst_local {
        local_bypass(&m, &target)?;
    }
    let matches = match ifaces {
        Some(ifaces) if !ifaces.is_empty() => ifaces
            .into_iter()
            .map(|iface| Match {
                iface: Some(iface),
                ..m.clone()
            })
            .collect(),
        _ => vec![m],
    };
    Ok(ReadRule {
        matches: matches.into_iter().flat_map(by_address_type).collect(),
        target,
        comment,
        notes,
    })
}

/// A rule as [`parse_rule`] read it.
struct ReadRule {
    matches: Vec<Match>,
    target: Target,
    comment: Option<String>,
    notes: Vec<String>,
}

/// What nft's `fib daddr type` types (any of them) match for packets of `family` (`None`:
/// both), as the kernel's nft_fib gives them: `local`, `anycast` and `broadcast` (IPv4) by
/// the routes; `multicast` and `unspec` (IPv6: `::` and IPv4-mapped addresses) by the address.
fn address_types_of(
    names: &[String],
    family: Option<Family>,
    notes: &mut Vec<String>,
) -> Result<Vec<AddressType>, String> {
    let ipv4 = family != Some(Family::V6);
    let ipv6 = family != Some(Family::V4);
    let mut types = Vec::new();
    for name in names {
        let mut of_name = Vec::new();
        match name.as_str() {
            "local" => of_name.push(AddressType::Local),
            "anycast" => of_name.push(AddressType::Anycast),
            // IPv6 has no broadcast.
            "broadcast" => {
                if ipv4 {
                    of_name.push(AddressType::Broadcast);
                }
            }
            // No IPv4 address is of type unspec: only a route gives one that type, and the
            // kernel refuses a route of type unspec.
            "unspec" if !ipv6 => {}
            "multicast" => {
                if ipv4 {
                    of_name.push(AddressType::Prefix("224.0.0.0/4".parse().unwrap()));
                }
                if ipv6 {
                    of_name.push(AddressType::Prefix("ff00::/8".parse().unwrap()));
                }
            }
            "unspec" => {
                of_name.push(AddressType::Prefix("::/128".parse().unwrap()));
                of_name.push(AddressType::Prefix("::ffff:0:0/96".parse().unwrap()));
                notes.push(
                    "`fib daddr type unspec` takes the IPv6 destinations `::` and \
                     ::ffff:0:0/96 (IPv4-mapped) when a route takes them (the kernel calls them \
                     unreachable otherwise): the translation takes them always, which differs \
                     only for packets to them on a host without such a route (no IPv6 default \
                     route), which the original would not leave alone"
                        .to_string(),
                );
            }
            other => {
                return Err(format!(
                    "`fib daddr type {}` (tproxy knows local, anycast, multicast, unspec and \
                     broadcast, not {other})",
                    names.join(", ")
                ))
            }
        }
        for address_type in of_name {
            if !types.contains(&address_type) {
                types.push(address_type);
            }
        }
    }
    Ok(types)
}

fn transport(name: &str) -> Result<Transport, String> {
    match name {
        "tcp" => Ok(Transport::Tcp),
        "udp" => Ok(Transport::Udp),
        other => Err(format!("protocol {other} (tproxy steers TCP and UDP)")),
    }
}

impl Rule<'_> {
    /// Reads the expression at `w[i]`; returns the index after it.
    fn expression(&mut self, i: usize) -> Result<usize, String> {
        let w = &self.w;
        let next_is = |word: &str| w.get(i + 1).is_some_and(|x| x == word);
        match w[i].as_str() {
            "meta" if next_is("l4proto") => self.transports(i + 2),
            "meta" if next_is("nfproto") => self.families(i + 2),
            "ip" if next_is("protocol") => {
                let next = self.transports(i + 2)?;
                self.m.family = Some(Family::V4);
                Ok(next)
            }
            "tcp" | "udp" | "th" if next_is("dport") || next_is("sport") => self.ports(i),
            "ip" | "ip6" if next_is("daddr") || next_is("saddr") => self.addresses(i),
            "fib" if next_is("daddr") && w.get(i + 2).is_some_and(|x| x == "type") => {
                self.address_types(i + 3)
            }
            "iifname" | "iif" => self.interface(i + 1),
            "meta" if next_is("iifname") => self.interface(i + 2),
            // `socket wildcard 0` is what the socket match does anyway; a wildcard-bound
            // socket taking the flow, tproxy's socket match skips.
            "socket" if next_is("wildcard") && w.get(i + 2).is_some_and(|v| v == "0") => Ok(i + 3),
            "socket" if next_is("wildcard") => Err(
                "`socket wildcard` other than 0 (a socket bound to the wildcard address taking \
                 the flow; tproxy's socket match skips those)"
                    .into(),
            ),
            "socket" if next_is("transparent") => {
                self.socket = true;
                Ok(i + 3)
            }
            "meta" | "mark" if w[i] == "mark" || next_is("mark") => self.mark(i),
            "meta" | "skuid" if w[i] == "skuid" || next_is("skuid") => {
                let at = if w[i] == "meta" { i + 2 } else { i + 1 };
                self.uids(at)
            }
            "meta" | "skgid" if w[i] == "skgid" || next_is("skgid") => {
                let at = if w[i] == "meta" { i + 2 } else { i + 1 };
                self.gids(at)
            }
            "socket" if next_is("cgroupv2") => self.cgroup(i),
            "meta" | "cgroup" if w[i] == "cgroup" || next_is("cgroup") => {
                let at = if w[i] == "meta" { i + 2 } else { i + 1 };
                self.classids(at)
            }
            "counter" => {
                let mut i = i + 1;
                while i + 1 < w.len() && (w[i] == "packets" || w[i] == "bytes") {
                    i += 2;
                }
                Ok(i)
            }
            "comment" => {
                self.comment = w.get(i + 1).cloned();
                Ok(i + 2)
            }
            "tproxy" => self.tproxy(i),
            "drop" => {
                self.target.get_or_insert(Target::Drop);
                Ok(i + 1)
            }
            "accept" | "return" => {
                self.target
                    .get_or_insert(match (self.socket, w[i].as_str()) {
                        (true, _) => Target::SocketDivert,
                        (false, "accept") => Target::Bypass,
                        (false, _) => Target::Return,
                    });
                Ok(i + 1)
            }
            "reject" => self.reject(i + 1),
            "jump" | "goto" => {
                let name = w.get(i + 1).ok_or("jump without a chain")?;
                let chain = format!("{}/{name}", self.table);
                self.target
                    .get_or_insert(match (self.socket, w[i].as_str()) {
                        (true, _) => Target::SocketDivert,
                        (false, "goto") => Target::Goto(chain),
                        (false, _) => Target::Jump(chain),
                    });
                Ok(i + 2)
            }
            "oifname" | "oif" => self.output_interface(i),
            "ct" if next_is("direction") => self.ct_direction(i + 2),
            other => Err(format!("`{other}` cannot be translated")),
        }
    }

    /// The values at `w[i]`; a match on a set without elements matches no packet.
    fn values(&mut self, i: usize) -> Result<Values, String> {
        let found = nft_values(&self.w, i, self.sets, self.table)?;
        if !found.negated && found.values.is_empty() {
            self.m.matches_nothing = true;
        }
        Ok(found)
    }

    /// A `reject` whose `with …` (if any) starts at `w[i]`: `reject with icmpx [type]
    /// host-unreachable`, `reject with tcp reset`. An ICMP answer of one family is the
    /// rule's match of that family (nft adds it), as `tcp reset` is of TCP.
    fn reject(&mut self, i: usize) -> Result<usize, String> {
        let w = &self.w;
        if w.get(i).is_none_or(|x| x != "with") {
            self.target
                .get_or_insert(Target::Reject(RejectWith::PortUnreachable));
            return Ok(i);
        }
        let kind = w.get(i + 1).ok_or("reject with nothing")?.clone();
        let mut next = i + 2;
        if w.get(next).is_some_and(|x| x == "type") {
            next += 1;
        }
        let answer = w.get(next).ok_or("reject with a type missing")?.clone();
        let (with, family) = match (kind.as_str(), answer.as_str()) {
            ("tcp", "reset") => (RejectWith::Reset, None),
            ("icmp", "port-unreachable") => (RejectWith::PortUnreachable, Some(Family::V4)),
            ("icmpv6", "port-unreachable") => (RejectWith::PortUnreachable, Some(Family::V6)),
            ("icmpx", "port-unreachable") => (RejectWith::PortUnreachable, None),
            _ => (RejectWith::Other(format!("{kind} {answer}")), None),
        };
        if let Some(family) = family {
            if self.m.family.is_some_and(|f| f != family) {
                self.m.matches_nothing = true;
            }
            self.m.family = Some(family);
        }
        if with == RejectWith::Reset {
            self.m.transports = vec![Transport::Tcp];
        }
        self.target.get_or_insert(Target::Reject(with));
        Ok(next + 1)
    }

    /// `meta nfproto` values at `w[i]`: one family, a set of them (`{ ipv4, ipv6 }`, fw4's
    /// and homeproxy's, which in an inet table narrows nothing), or all but those. What the
    /// table's family (or an earlier match) leaves out stays out.
    fn families(&mut self, i: usize) -> Result<usize, String> {
        let found = self.values(i)?;
        if self.m.matches_nothing {
            return Ok(found.next);
        }
        let mut named = Vec::new();
        for value in &found.values {
            named.push(match value.as_str() {
                "ipv4" => Family::V4,
                "ipv6" => Family::V6,
                other => return Err(format!("meta nfproto {other}")),
            });
        }
        let matched: Vec<Family> = [Family::V4, Family::V6]
            .into_iter()
            .filter(|family| named.contains(family) != found.negated)
            .filter(|family| self.m.family.is_none_or(|f| f == *family))
            .collect();
        self.m.family = match matched.as_slice() {
            [one] => Some(*one),
            [_, _] => None,
            _ => {
                return Err(format!(
                    "`meta nfproto {}{}` matches no packet of this table's family",
                    if found.negated { "!= " } else { "" },
                    found.values.join(", ")
                ))
            }
        };
        Ok(found.next)
    }

    /// `meta l4proto`/`ip protocol` values at `w[i]`.
    fn transports(&mut self, i: usize) -> Result<usize, String> {
        let found = self.values(i)?;
        self.m.transports = match (found.negated, found.values.as_slice()) {
            (true, [one]) => {
                self.m.protocols_beyond = true;
                other_transports(transport(one))
            }
            (true, _) => return Err("a negated set of protocols".into()),
            // Only protocols tproxy never steers (`meta l4proto icmp`).
            (false, [one, ..]) if found.values.iter().all(|v| transport(v).is_err()) => {
                self.m.other_protocol = Some(match found.values.len() {
                    1 => one.clone(),
                    _ => format!("{{ {} }}", found.values.join(", ")),
                });
                Vec::new()
            }
            (false, values) => values
                .iter()
                .map(|v| transport(v))
                .collect::<Result<_, _>>()?,
        };
        Ok(found.next)
    }

    /// `tcp dport`, `udp sport`, `th dport` and the like at `w[i]`.
    fn ports(&mut self, i: usize) -> Result<usize, String> {
        if self.w[i] != "th" {
            self.m.transports = vec![transport(&self.w[i])?];
        }
        let found = self.values(i + 2)?;
        let mut ports = found
            .values
            .iter()
            .map(|v| port_range(v))
            .collect::<Result<Vec<_>, String>>()?;
        if found.negated {
            ports = complement(&ports)?;
        }
        let (which, earlier) = match self.w[i + 1].as_str() {
            "sport" => ("sport", &mut self.m.sports),
            _ => ("dport", &mut self.m.ports),
        };
        if !earlier.is_empty() {
            return Err(twice(&format!("{} {which}", self.w[i])));
        }
        *earlier = ports;
        Ok(found.next)
    }

    /// `ip daddr`, `ip6 saddr` and the like at `w[i]`.
    fn addresses(&mut self, i: usize) -> Result<usize, String> {
        self.m.family = Some(if self.w[i] == "ip" {
            Family::V4
        } else {
            Family::V6
        });
        let found = self.values(i + 2)?;
        let mut prefixes = Vec::new();
        for value in &found.values {
            prefixes.extend(address_range(value)?);
        }
        let earlier = match (self.w[i + 1] == "daddr", found.negated) {
            (true, false) => &mut self.m.dst,
            (true, true) => &mut self.m.not_dst,
            (false, false) => &mut self.m.src,
            (false, true) => &mut self.m.not_src,
        };
        if !earlier.is_empty() {
            return Err(twice(&format!("{} {}", self.w[i], self.w[i + 1])));
        }
        *earlier = prefixes;
        Ok(found.next)
    }

    /// `fib daddr type`'s address types at `w[i]` (negated: `!= local` alone).
    fn address_types(&mut self, i: usize) -> Result<usize, String> {
        let found = self.values(i)?;
        match (found.negated, found.values.as_slice()) {
            (false, [local]) if local == "local" => self.m.dst_local = true,
            (true, [local]) if local == "local" => self.m.excludes_dst_local = true,
            (true, _) => {
                return Err(format!(
                    "`fib daddr type != {}` (tproxy knows `!= local`)",
                    found.values.join(", ")
                ))
            }
            (false, _) if self.address_types.is_some() => {
                return Err(twice("fib daddr type"));
            }
            (false, names) => self.address_types = Some(names.to_vec()),
        }
        Ok(found.next)
    }

    /// `oifname` at `w[i]`: in a route chain at output, the interface of the route looked
    /// up for the packet. `!= "lo"` is the host's packets for other hosts' addresses (the
    /// route of the host's own leads to `lo`); another name is a local rule's
    /// `out_interface` (negated, the guard that leaves other routes' packets alone).
    fn output_interface(&mut self, i: usize) -> Result<usize, String> {
        let found = self.values(i + 1)?;
        if found.negated && found.values == ["lo"] {
            self.m.not_dst_local = true;
            return Ok(found.next);
        }
        let by_name = self.w[i] == "oifname";
        let [one] = found.values.as_slice() else {
            return Err(format!("`{}` with several interfaces", self.w[i]));
        };
        let iface = match one.strip_suffix('*') {
            Some(prefix) if by_name => interface_pattern(prefix)?,
            _ => interface_name(one)?,
        };
        let earlier = match found.negated {
            true => &mut self.m.not_out_iface,
            false => &mut self.m.out_iface,
        };
        if earlier.is_some() {
            return Err(twice(&self.w[i]));
        }
        *earlier = Some(iface);
        Ok(found.next)
    }

    /// The input interface's name at `w[i]`.
    fn interface(&mut self, i: usize) -> Result<usize, String> {
        let found = self.values(i)?;
        // `iifname "eth*"`: every interface whose name starts with `eth` (`iif` resolves its
        // name once, when the rule is loaded: no wildcard).
        let by_name = self.w[i - 1] == "iifname";
        let wildcard = |v: &String| match v.strip_suffix('*') {
            Some(prefix) if by_name => interface_pattern(prefix),
            _ => interface_name(v),
        };
        let named = found
            .values
            .iter()
            .map(wildcard)
            .collect::<Result<Vec<_>, _>>()?;
        if found.negated {
            self.m.not_iface.extend(named);
            return Ok(found.next);
        }
        // A packet arrives on one interface: where two matches name interfaces, those that
        // both take (a name or pattern either covers the other's, or they share none).
        let taken = match self.ifaces.take() {
            None => named,
            Some(earlier) => earlier
                .iter()
                .flat_map(|a| named.iter().map(move |b| (a, b)))
                .filter_map(|(a, b)| match (iface_covers(a, b), iface_covers(b, a)) {
                    (true, _) => Some(b.clone()),
                    (_, true) => Some(a.clone()),
                    _ => None,
                })
                .collect(),
        };
        // Those another of them covers are taken already.
        let mut kept: Vec<String> = Vec::new();
        for iface in taken {
            if !kept.iter().any(|k| iface_covers(k, &iface)) {
                kept.retain(|k| !iface_covers(&iface, k));
                kept.push(iface);
            }
        }
        if kept.is_empty() {
            self.m.matches_nothing = true;
        }
        self.ifaces = Some(kept);
        Ok(found.next)
    }

    /// `meta mark`/`mark` at `w[i]`: setting it goes with a TPROXY; a match is one exact
    /// mark (`mark 0xff`, `mark == 0xff`) or the bits under a mask (`mark & 0xf0 == 0x10`),
    /// which may be a loop guard (see `own_mark`), or not (`!=`, see `negation`). Other mark
    /// expressions (sets, ranges) cannot be translated.
    fn mark(&mut self, i: usize) -> Result<usize, String> {
        let w = &self.w;
        let mut at = if w[i] == "meta" { i + 2 } else { i + 1 };
        if w.get(at).is_some_and(|x| x == "set") {
            let (mark, next) = set_mark(w, at + 1)?;
            self.set_mark = Some(mark);
            return Ok(next);
        }
        let number = |at: usize| {
            w.get(at)
                .filter(|value| value.starts_with(|c: char| c.is_ascii_digit()))
                .map(String::as_str)
        };
        let unsupported = "matching on the packet mark other than `mark [& MASK ==] VALUE`";
        let mut mask = None;
        if w.get(at).is_some_and(|x| x == "&") {
            mask = Some(number(at + 1).ok_or(unsupported)?);
            at += 2;
        }
        let negated = w.get(at).is_some_and(|x| x == "!=");
        if w.get(at).is_some_and(|x| x == "==" || x == "!=") {
            at += 1;
        }
        let value = number(at).ok_or(unsupported)?;
        let text = match mask {
            Some(mask) => format!("{value}/{mask}"),
            None => value.to_string(),
        };
        let mark = parse_mark_match(&text)?;
        match (negated, self.m.mark) {
            (true, _) => self.m.not_marks.push(mark),
            (false, None) => self.m.mark = Some(mark),
            // Two of them: a packet's mark must agree with both.
            (false, Some(earlier))
                if (earlier.value ^ mark.value) & earlier.mask & mark.mask != 0 =>
            {
                self.m.matches_nothing = true
            }
            (false, Some(earlier)) => {
                self.m.mark = Some(Mark {
                    value: (earlier.value & earlier.mask) | (mark.value & mark.mask),
                    mask: earlier.mask | mark.mask,
                })
            }
        }
        Ok(at + 1)
    }

    /// `meta skuid` values at `w[i]`: uids and ranges of them, or all but those.
    fn uids(&mut self, i: usize) -> Result<usize, String> {
        let found = self.values(i)?;
        let uids = found
            .values
            .iter()
            .map(|v| {
                v.parse::<UidRange>().map_err(|error| {
                    format!("`meta skuid {v}`: {error} (list the rule set with `nft -n`)")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !self.m.uids.is_empty() {
            return Err(twice("meta skuid"));
        }
        self.m.uids = match found.negated {
            true => other_ids(&uids)?,
            false => uids,
        };
        Ok(found.next)
    }

    /// `meta skgid` values at `w[i]`: gids and ranges of them, or all but those.
    fn gids(&mut self, i: usize) -> Result<usize, String> {
        let found = self.values(i)?;
        let gids = found
            .values
            .iter()
            .map(|v| {
                parse_gid_range(v).map_err(|error| {
                    format!("`meta skgid`: {error} (list the rule set with `nft -n`)")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !self.m.gids.is_empty() {
            return Err(twice("meta skgid"));
        }
        self.m.gids = match found.negated {
            true => other_ids(&gids)?,
            false => gids,
        };
        Ok(found.next)
    }

    /// `meta cgroup` values at `w[i]`: net_cls class ids and ranges of them, or all but
    /// those.
    fn classids(&mut self, i: usize) -> Result<usize, String> {
        let found = self.values(i)?;
        let classids = found
            .values
            .iter()
            .map(|v| {
                v.parse::<ClassidRange>()
                    .map_err(|error| format!("`meta cgroup {v}`: {error}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !self.m.classids.is_empty() {
            return Err(twice("meta cgroup"));
        }
        self.m.classids = match found.negated {
            true => other_classids(&classids)?,
            false => classids,
        };
        Ok(found.next)
    }

    /// `socket cgroupv2 level N "path"` at `w[i]`: the path's processes, from the root.
    fn cgroup(&mut self, i: usize) -> Result<usize, String> {
        if self.w.get(i + 2).map(String::as_str) != Some("level") {
            return Err("`socket cgroupv2` without `level`".into());
        }
        let level: usize = self
            .w
            .get(i + 3)
            .and_then(|level| level.parse().ok())
            .ok_or("`socket cgroupv2 level` without a number")?;
        let found = self.values(i + 4)?;
        if found.negated {
            return Err("negated `socket cgroupv2`".into());
        }
        if !self.m.cgroups.is_empty() {
            return Err(twice("socket cgroupv2"));
        }
        self.m.cgroups = found
            .values
            .iter()
            .map(|path| {
                let path = cgroup_path(path)?;
                // `level` is the path's depth: a path of another depth never matches.
                let depth = path.split('/').filter(|part| !part.is_empty()).count();
                match depth == level {
                    true => Ok(path),
                    false => Err(format!(
                        "`socket cgroupv2 level {level}` with the path {path} of depth {depth}"
                    )),
                }
            })
            .collect::<Result<_, String>>()?;
        Ok(found.next)
    }

    /// `ct direction`'s value at `w[i]` (`original`, `reply`, or either negated).
    fn ct_direction(&mut self, i: usize) -> Result<usize, String> {
        let found = self.values(i)?;
        let [direction] = found.values.as_slice() else {
            return Err("`ct direction` with a set of directions".into());
        };
        let direction = match (direction.as_str(), found.negated) {
            ("original", false) | ("reply", true) => CtDirection::Original,
            ("reply", false) | ("original", true) => CtDirection::Reply,
            (other, _) => return Err(format!("`ct direction {other}` (original or reply)")),
        };
        // nft asks each match: a packet has one direction, so two that differ take none.
        if self
            .m
            .ct_direction
            .is_some_and(|earlier| earlier != direction)
        {
            self.m.matches_nothing = true;
        }
        self.m.ct_direction = Some(direction);
        Ok(found.next)
    }

    /// `tproxy [ip|ip6] to [addr]:port` at `w[i]`.
    fn tproxy(&mut self, i: usize) -> Result<usize, String> {
        let w = &self.w;
        let mut j = i + 1;
        let mut tproxy_family = None;
        if let Some(f) = w.get(j).filter(|x| *x == "ip" || *x == "ip6") {
            tproxy_family = Some(if f == "ip" { Family::V4 } else { Family::V6 });
            j += 1;
        }
        if w.get(j).map(String::as_str) != Some("to") {
            return Err("tproxy without `to`".into());
        }
        let to = w.get(j + 1).ok_or("tproxy to nothing")?;
        let (on_ip, on_port) = tproxy_to(to).ok_or(format!("tproxy to `{to}`"))?;
        if let Some(f) =
            tproxy_family.or(on_ip.map(|ip| if ip.is_ipv4() { Family::V4 } else { Family::V6 }))
        {
            if self.m.family.is_some_and(|mf| mf != f) {
                return Err("tproxy to an address of the other family".into());
            }
            self.m.family = Some(f);
        }
        let on_port = match on_port {
            Some(port) => tproxy_port(port)?,
            None => None,
        };
        self.target = Some(Target::Tproxy {
            on_ip,
            on_port,
            mark: None,
        });
        Ok(j + 2)
    }

    /// The rule's matches and target, the mark it sets going with its TPROXY.
    fn finish(self) -> (Match, Target, Option<String>) {
        let target = match self.target {
            Some(Target::Tproxy { on_ip, on_port, .. }) => Target::Tproxy {
                on_ip,
                on_port,
                mark: self.set_mark,
            },
            // `meta mark set 0xe0 accept`: the mark stays on the packet the verdict lets go
            // (in an output route chain, the recipe's steering, as without the verdict).
            Some(Target::Bypass) if !self.socket && self.set_mark.is_some() => {
                Target::MarkThenAccept(self.set_mark.expect("guarded"))
            }
            Some(target) => target,
            // Only marking (part of a divert), or only counting.
            None if self.socket => Target::SocketDivert,
            // Only marking: in an output route chain, the recipe's steering (see `local`).
            None => match self.set_mark {
                Some(mark) => Target::SetMark(mark),
                None => Target::Ignore,
            },
        };
        (self.m, target, self.comment)
    }
}

/// The address and port of `tproxy to`'s value, as nft lists them: `1.1.1.1:80`, `:80`,
/// `[::1]:80`, and without a port (the packet's own) `1.1.1.1` or `[dead::beef]`.
fn tproxy_to(to: &str) -> Option<(Option<IpAddr>, Option<&str>)> {
    let (addr, port) = match to.strip_prefix('[') {
        Some(v6) => {
            let (addr, rest) = v6.split_once(']')?;
            match rest {
                "" => (addr, None),
                rest => (addr, Some(rest.strip_prefix(':')?)),
            }
        }
        None => match to.split_once(':') {
            Some((addr, port)) => (addr, Some(port)),
            None => (to, None),
        },
    };
    let on_ip = match addr {
        "" if port.is_some() => None,
        addr => Some(addr.parse::<IpAddr>().ok()?),
    };
    Some((on_ip, port))
}

/// The prefixes of an address or prefix, or of a range as nft lists an interval set's
/// elements that no prefix spans (`91.108.4.0-91.108.23.255`): the fewest that cover it.
fn address_range(text: &str) -> Result<Vec<IpNet>, String> {
    let Some((first, last)) = text.split_once('-') else {
        return parse_prefix(text).map(|prefix| vec![prefix]);
    };
    let not_a_range = || {
        format!(
            "`{text}` is neither an IPv4/IPv6 prefix (like 10.0.0.0/8) nor a range of addresses \
             (like 10.0.0.1-10.0.0.9)"
        )
    };
    let (first, last) = (
        first.parse::<IpAddr>().map_err(|_| not_a_range())?,
        last.parse::<IpAddr>().map_err(|_| not_a_range())?,
    );
    match (first, last) {
        (IpAddr::V4(first), IpAddr::V4(last)) if first <= last => {
            Ok(Ipv4Subnets::new(first, last, 0).map(IpNet::V4).collect())
        }
        (IpAddr::V6(first), IpAddr::V6(last)) if first <= last => {
            Ok(Ipv6Subnets::new(first, last, 0).map(IpNet::V6).collect())
        }
        _ => Err(format!(
            "`{text}`: a range of addresses runs from a lower to a higher one of the same family"
        )),
    }
}

/// Why a rule that names one kind of match twice is not translated: it matches what both
/// allow, and the model holds one match of each kind.
fn twice(what: &str) -> String {
    format!("`{what}` a second time in one rule: write one match that allows what both do")
}
