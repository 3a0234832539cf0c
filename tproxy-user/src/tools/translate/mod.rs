//! `tproxy translate`: an iptables/ip6tables (`iptables-save`) or nft (`nft list ruleset`)
//! TPROXY rule set in, the equivalent tproxy configuration out.
//!
//! What is translated: the `mangle` table's PREROUTING chain (nft: chains hooked at
//! prerouting) and the chains it jumps to. The socket-match "divert" rules become tproxy's
//! built-in socket match; each TPROXY target becomes a `steer` rule to a listener on its
//! `--on-port`; RETURN/ACCEPT become `bypass` rules. iptables applies the first matching
//! rule, tproxy the most specific one (see `rules`), so a rule that a more general earlier
//! rule shadows is dropped when iptables could never reach it; when only part of it is
//! shadowed, that part gets a rule of its own with the earlier rule's action ahead of it (see
//! `emit`). Everything that cannot be expressed is listed on stderr with its line.
//!
//! The mangle OUTPUT chain (nft: route chains hooked at output), the recipe's half for the
//! host's own traffic, becomes rules with `origin = "local"` (see [`local`]).
//!
//! The parsers ([`iptables`], [`nft`]) read their syntax into one model (a [`RuleSet`] of
//! [`Parsed`] rules); [`emit`] flattens it, resolves precedence (with [`precedence`]) and
//! writes the TOML.

mod deliver;
mod emit;
mod established;
mod first_packet;
mod flatten;
mod ipset;
mod iptables;
mod local;
mod negation;
mod nft;
mod other_protocols;
mod own_mark;
mod precedence;
#[cfg(test)]
mod tests;

use std::{collections::HashMap, io::Read, net::IpAddr};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;

use tproxy_common::local_origin::{ClassidRange, UidRange};

use crate::{
    cli::TranslateArgs,
    datapath::{
        interfaces::is_pattern,
        rules::{CtDirection, Ports},
    },
    values::{parse_mark, parse_mark_match, parse_port_list, Mark, Transport},
};

/// Reads the rule set from stdin, prints the configuration, lists what was skipped.
pub fn run(args: &TranslateArgs) -> Result<()> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading the rule set from stdin")?;
    let sets = match &args.ipset_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading --ipset-file {}", path.display()))?,
        None => String::new(),
    };
    let translation = translate_with_sets(&input, args.keep_proxies, &sets)?;
    print!("{}", translation.config);
    // A rule read as several (one per interface or address type) may earn one note as many
    // times.
    let mut noted = std::collections::HashSet::new();
    for note in translation.notes.iter().filter(|note| noted.insert(*note)) {
        eprintln!("note: {note}");
    }
    for skipped in &translation.skipped {
        eprintln!("skipped: {skipped}");
    }
    if !translation.skipped.is_empty() && !args.allow_skipped {
        bail!(
            "{} rules could not be translated (listed above); the configuration printed steers \
             the rest. Pass --allow-skipped to accept that",
            translation.skipped.len()
        );
    }
    // What `tproxy check` would say of it (limits such as the entries of the rules tried one
    // by one are the configuration's): a translation that `run` refuses is no translation.
    let checked = crate::config::RunArgs {
        config: Some("translated.toml".into()),
        ..Default::default()
    };
    crate::config::Config::from_text(&checked, &translation.config).context(
        "the configuration printed is refused as tproxy check would refuse it; the rule set \
         needs changes by hand",
    )?;
    Ok(())
}

/// The result of a translation.
#[derive(Debug)]
pub struct Translation {
    /// The TOML configuration.
    pub config: String,
    /// Things the operator should know that do not change what is steered.
    pub notes: Vec<String>,
    /// Rules that could not be translated: `line N: text: reason`.
    pub skipped: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// What a rule matches, as far as tproxy can express it.
#[derive(Clone, Debug, Default, PartialEq)]
struct Match {
    /// Empty: any transport.
    transports: Vec<Transport>,
    dst: Vec<IpNet>,
    src: Vec<IpNet>,
    /// Empty: any port.
    ports: Vec<Ports>,
    /// Source ports (`--sport`, nft `udp sport`); empty: any.
    sports: Vec<Ports>,
    /// The protocol matched when it is one tproxy never steers (`-p icmp`): the rule then
    /// concerns no packet tproxy decides.
    other_protocol: Option<String>,
    /// A negated protocol (`! -p tcp`): besides `transports`, every protocol tproxy never
    /// steers matches too (which matters to a DROP).
    protocols_beyond: bool,
    iface: Option<String>,
    /// The interface (name or pattern) the packet's route leaves by, in OUTPUT (`-o eth0`,
    /// nft `oifname "eth0"`): a local rule's `out_interface`.
    out_iface: Option<String>,
    /// The interface the packet's route does not leave by (`! -o eth0`, nft `oifname !=
    /// "eth0"`): only as an OUTPUT chain's guard that leaves such packets alone, which gives
    /// the rules after it that `out_iface` (see `flatten`).
    not_out_iface: Option<String>,
    /// `None`: both (nft `inet`).
    family: Option<Family>,
    /// Destinations, sources and input interfaces the rule excludes (`! -d`, `ip saddr !=
    /// …`, `! -i`). tproxy's rules cannot exclude: the emitter opens them into bypass rules
    /// ahead of the rule (see `negation`). Negated ports and protocols need none of this:
    /// they are read as the complementary ranges and protocol.
    not_dst: Vec<IpNet>,
    not_src: Vec<IpNet>,
    not_iface: Vec<String>,
    /// The packet mark matched (`-m mark --mark`, nft `meta mark`): a proxy's loop guard
    /// becomes the socket mark, others the rule's `mark` (see `own_mark`).
    mark: Option<Mark>,
    /// The packet's direction in its tracked connection (`-m conntrack --ctdir`, nft's `ct
    /// direction`): the rule's `ct_direction`.
    ct_direction: Option<CtDirection>,
    /// Marks the rule excludes (`-m mark ! --mark`, nft `meta mark !=`): opened into
    /// positive mark matches (see `negation`).
    not_marks: Vec<Mark>,
    /// The destination is one of the host's own addresses (`-m addrtype --dst-type LOCAL`,
    /// nft `fib daddr type local`): `dst` is then empty, and the rule a bypass written with
    /// `dst = "local"`, which tproxy keeps up to date with the addresses.
    dst_local: bool,
    /// The destination is not one of the host's own addresses (`-m addrtype ! --dst-type
    /// LOCAL`, nft `fib daddr type != local`): an exclusion, opened by `negation` into a
    /// bypass of `dst = "local"` (with the rule's other matches) ahead of the rule.
    excludes_dst_local: bool,
    /// The packet's route does not lead to `lo` (nft `oifname != "lo"` in an output route
    /// chain): its destination is not one of the host's own. Only as an OUTPUT chain's
    /// guard that leaves such packets alone, which makes the rules after it rules for the
    /// host's own addresses (see `flatten`).
    not_dst_local: bool,
    /// The destination is one the local table's anycast routes take (`-m addrtype
    /// --dst-type ANYCAST`): `dst` is then empty, and the rule a bypass written with `dst =
    /// "anycast"`, which tproxy keeps up to date with the routes.
    dst_anycast: bool,
    /// The destination is one the local table routes as broadcast (`-m addrtype --dst-type
    /// BROADCAST`): only as OUTPUT's bypass, which changes nothing (tproxy's programs never
    /// steer such a connection, see `flatten`).
    dst_broadcast: bool,
    /// The destination is in the kernel ipset of this name, which tproxy follows while it
    /// runs (`-m set --match-set NAME dst` of a set that `--ipset-file` does not fill, see
    /// `ipset`): `dst` is then empty, and the rule is written with `dst = "ipset:NAME"`.
    dst_set: Option<String>,
    /// The address types `-m addrtype --dst-type` names: the parser makes a rule of each
    /// (see `iptables::by_address_type`), so this is `None` in the model's rules.
    dst_types: Option<Vec<AddressType>>,
    /// Locally generated traffic: the rule was reached from mangle OUTPUT (see `local`).
    local: bool,
    /// The users whose sockets match (`-m owner --uid-owner`); empty: any.
    uids: Vec<UidRange>,
    /// The groups whose sockets match (`-m owner --gid-owner`, nft `meta skgid`), in the
    /// uid ranges' form; empty: any.
    gids: Vec<UidRange>,
    /// The cgroup v2 paths whose processes' sockets match (`-m cgroup --path`), from the
    /// hierarchy's root; empty: any.
    cgroups: Vec<String>,
    /// The net_cls class ids whose processes' sockets match (`-m cgroup --cgroup`); empty:
    /// any.
    classids: Vec<ClassidRange>,
    /// No packet matches: the rule names a set without elements (nft prints a set emptied
    /// or never filled without an `elements` line), or input interfaces that another of its
    /// matches leaves out (`iifname "eth0" iifname "eth1"`).
    matches_nothing: bool,
    /// Written for the protocols besides TCP and UDP too (`proto` with `"other"`): set only
    /// where the rule set drops such packets, on the rules that decide them (see
    /// `other_protocols`).
    other_protocols: bool,
}

/// What one of `--dst-type`'s (nft `fib daddr type`'s) address types matches.
#[derive(Clone, Debug, PartialEq, Eq)]
enum AddressType {
    /// The host's own addresses (`dst = "local"`).
    Local,
    /// What the kernel gives the type anycast (`dst = "anycast"`).
    Anycast,
    /// What the local table's IPv4 broadcast routes take.
    Broadcast,
    /// A fixed prefix (IPv4 MULTICAST is 224.0.0.0/4 by the address alone).
    Prefix(IpNet),
}

/// A rule whose `--dst-type` (nft `fib daddr type`) names several types, as one match per
/// type (the next rule is reached only when none matches, so in its place the rules for each
/// decide the same). Each parser has said what a rule of no type means.
fn by_address_type(mut m: Match) -> Vec<Match> {
    let Some(types) = m.dst_types.take() else {
        return vec![m];
    };
    types
        .into_iter()
        .map(|address_type| {
            let mut one = m.clone();
            match address_type {
                AddressType::Local => one.dst_local = true,
                AddressType::Anycast => one.dst_anycast = true,
                AddressType::Broadcast => one.dst_broadcast = true,
                AddressType::Prefix(prefix) => one.dst = vec![prefix],
            }
            one
        })
        .collect()
}

impl Match {
    fn excludes(&self) -> bool {
        !(self.not_dst.is_empty()
            && !self.excludes_dst_local
            && self.not_src.is_empty()
            && self.not_iface.is_empty()
            && self.not_marks.is_empty())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Tproxy {
        on_ip: Option<IpAddr>,
        /// None: each packet's own destination port (`--on-port 0`, nft's `tproxy to ADDR`
        /// without a port), which `emit` reads from the rule's single destination port.
        on_port: Option<u16>,
        /// `--tproxy-mark` (nft: the rule's `meta mark set`).
        mark: Option<Mark>,
    },
    /// ACCEPT: the packet leaves the hook untouched.
    Bypass,
    /// DROP: the packet is dropped.
    Drop,
    /// MARK with the TPROXY rules' mark at prerouting, the last rule to decide its packets:
    /// the policy routing delivers them to the host's own sockets (see `deliver`).
    Deliver,
    /// A rule that changes nothing tproxy decides, with why (for a note).
    Unsteered(String),
    /// RETURN: back to the calling chain (from a base chain: the policy, untouched).
    Return,
    /// nft `reject`: tproxy's `reject` where it answers as the rule did, and at the host's own
    /// addresses a bypass where nothing answers them (see `emit::rejects`).
    Reject(RejectWith),
    /// The socket match's "divert" jump: tproxy has it built in.
    SocketDivert,
    /// Another way of handing established flows their socket, built in as well where the
    /// rules after it agree (see `established`).
    Established(Established),
    /// MARK `--set-mark`: in mangle OUTPUT, the recipe's way to steer locally generated
    /// packets (see `local`); at PREROUTING, with the TPROXY rules' mark, its way to deliver
    /// them to the host's own sockets (see `deliver`).
    SetMark(Mark),
    /// nft's `meta mark set X accept`: the mark stays on the packet the verdict lets go. In
    /// an output route chain the recipe's steering when it is the TPROXY rules' mark, a
    /// bypass otherwise (nothing after it runs); at prerouting a delivery or an accept
    /// likewise (see `deliver`).
    MarkThenAccept(Mark),
    /// What an output interface guard (see `flatten`) lets through to the host's own
    /// addresses, whose route leads to `lo`: they arrive there as they left, and
    /// PREROUTING's rules on `lo` decide them (see `local::on_lo_to_own_addresses`).
    OwnAddressesOnLo,
    Jump(String),
    /// A jump that does not come back: what the chain leaves undecided leaves the calling
    /// chain too (iptables `-g`, nft `goto`).
    Goto(String),
    /// Part of the divert chain (mark, accept) or a no-op.
    Ignore,
}

/// How a rule other than the socket match's divert jump hands established flows their
/// socket, with the mark it sets for policy routing to deliver them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Established {
    /// `-m socket -j MARK`: the packets go on, marked, to the rules after it.
    SocketMark(Mark),
    /// `-m conntrack --ctstate ESTABLISHED -j CHAIN` (or `-m state --state`), where the
    /// chain only sets the mark and accepts (istio's form).
    Conntrack(Mark),
}

/// One parsed rule, with where it came from.
#[derive(Clone, Debug)]
struct Parsed {
    line: usize,
    text: String,
    matches: Match,
    target: Target,
    /// `-m comment --comment` (nft: `comment`), kept in the configuration.
    comment: Option<String>,
}

/// A chain's rules; `Err` holds why a rule could not be parsed.
type Chain = Vec<Result<Parsed, (usize, String, String)>>;

struct RuleSet {
    chains: HashMap<String, Chain>,
    /// The chains the kernel runs at prerouting, in order.
    entry: Vec<Entry>,
    /// Rules outside what is translated, for a note.
    ignored: usize,
    /// One of them sets the packet mark (MARK, `CONNMARK --restore-mark`, nft `meta mark
    /// set` in another table or hook): what mangle OUTPUT marks may come back on lo with
    /// another mark than the one it set.
    mark_set_elsewhere: bool,
    /// The chains the kernel runs for locally generated packets (mangle OUTPUT), in order.
    local_entry: Vec<Entry>,
    /// Rules that matter but cannot be translated where they are (nft: the output hook).
    elsewhere: Vec<(usize, String, String)>,
    /// The base chains left as they are, each with why (see
    /// `nft::leave_firewall_chains_alone`).
    kept: Vec<String>,
    /// Read from `nft list ruleset` (else from iptables-save).
    nft: bool,
    /// The rules of the chains left alone that untrack packets with one exact mark.
    untracked_marks: Vec<UntrackedMark>,
    /// What the operator should know of how the parser read the rules.
    notes: Vec<String>,
}

/// A rule of a chain left alone that does nothing but untrack the packets carrying `mark`
/// (nft `meta mark 0x1 notrack`). tproxy's program sets its routing mark before netfilter
/// runs, so `emit` routes with a mark that such a rule never matches: left alone, it
/// untracks what others mark, not the flows tproxy steers.
#[derive(Clone, Debug)]
struct UntrackedMark {
    line: usize,
    text: String,
    mark: Mark,
}

/// A base chain the kernel runs at prerouting (or, for locally generated packets, at
/// output).
struct Entry {
    chain: String,
    /// The packets it sees: one family's, or both (nft's `inet` tables).
    family: Option<Family>,
    /// nft's chain priority (the kernel runs a hook's base chains from the lowest up).
    priority: i32,
}

impl Entry {
    /// Whether some packet runs through both chains.
    fn overlaps(&self, other: &Entry) -> bool {
        match (self.family, other.family) {
            (Some(one), Some(other)) => one == other,
            _ => true,
        }
    }
}

/// Translates a rule set given as text.
pub fn translate(input: &str) -> Result<Translation> {
    translate_with(input, false)
}

/// Translates a rule set given as text; `keep_proxies`: the proxies on the TPROXY ports
/// stay in the path, as external listeners.
pub fn translate_with(input: &str, keep_proxies: bool) -> Result<Translation> {
    translate_with_sets(input, keep_proxies, "")
}

/// Translates a rule set given as text, with the ipsets its `-m set` rules name given as
/// `ipset save` output.
pub fn translate_with_sets(input: &str, keep_proxies: bool, ipsets: &str) -> Result<Translation> {
    let sets = ipset::parse(ipsets)?;
    let is_nft = input.lines().any(|l| {
        let l = l.trim_start();
        l.starts_with("table ") && l.trim_end().ends_with('{')
    });
    let is_iptables = input
        .lines()
        .any(|l| l.trim_start().starts_with("*") || l.contains("-A "));
    let ruleset = match (is_nft, is_iptables) {
        (true, _) => nft::parse(input)?,
        (false, true) => iptables::parse(input, &sets)?,
        (false, false) => bail!(
            "the input is neither `iptables-save` output (with `*mangle` and `-A` lines) nor \
             `nft list ruleset` output (with `table … {{` blocks)"
        ),
    };
    let followed: std::collections::BTreeSet<String> = ruleset
        .chains
        .values()
        .flatten()
        .flatten()
        .filter_map(|rule| rule.matches.dst_set.clone())
        .collect();
    let mut translation = emit::emit(
        ruleset,
        if is_nft {
            "`nft list ruleset`"
        } else {
            iptables_source(input)
        },
        keep_proxies,
    );
    if sets
        .values()
        .any(|set| set.as_ref().is_ok_and(|entries| !entries.is_empty()))
    {
        translation.notes.push(
            "the ipsets' entries were read from --ipset-file as saved; tproxy's rules do not \
             follow later changes to those sets: translate again after changing them"
                .into(),
        );
    }
    let followed: Vec<String> = followed
        .into_iter()
        .filter(|name| translation.config.contains(&format!("\"ipset:{name}\"")))
        .collect();
    if !followed.is_empty() {
        translation.notes.push(format!(
            "ipset {} (`dst = \"ipset:NAME\"`): tproxy reads the kernel's set while it runs \
             and follows its entries as they change; the set must exist when tproxy starts, so \
             keep the script's `ipset create` (and what fills the set, dnsmasq's `ipset=` for \
             instance)",
            followed.join(", ")
        ));
    }
    Ok(translation)
}

/// Splits a line into words, keeping quoted strings (without their quotes) together.
fn words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(current);
    }
    words
}

/// How a reject answers (nft `reject with …`).
#[derive(Clone, Debug, PartialEq, Eq)]
enum RejectWith {
    /// `tcp reset`.
    Reset,
    /// An ICMP, ICMPv6 or either (`icmpx`) port unreachable: nft's answer without `with`.
    PortUnreachable,
    /// Any other answer, as written.
    Other(String),
}

/// Checks that a rule for the host's own addresses can be a `dst = "local"` bypass rule:
/// it bypasses, and names no other destination.
fn local_bypass(m: &Match, target: &Target) -> Result<(), String> {
    if !matches!(target, Target::Bypass | Target::Return | Target::Reject(_)) {
        return Err(
            "a match on the host's own addresses with a target other than RETURN or ACCEPT".into(),
        );
    }
    if !m.dst.is_empty() || !m.not_dst.is_empty() {
        return Err("a match on the host's own addresses and on destination prefixes".into());
    }
    Ok(())
}

/// The mark a MARK target (nft `meta mark set`) sets, as iptables and nft write it: a bare
/// value sets all 32 bits, and unlike a mark to route by it may clear them (`--set-mark 0`).
fn set_mark_value(text: &str) -> Result<Mark, String> {
    match full_mark(text) {
        Ok(mark) => Ok(mark),
        Err(error) => {
            let (value, mask) = text.split_once('/').unwrap_or((text, "0xffffffff"));
            let zero = parse_mark_match(&format!("{value}/{mask}"))
                .ok()
                .filter(|mark| mark.value == 0 && mark.mask != 0);
            zero.ok_or(error)
        }
    }
}

/// A mark as iptables and nft write it: a bare value sets all 32 bits.
fn full_mark(text: &str) -> Result<Mark, String> {
    if text.contains('/') {
        parse_mark(text)
    } else {
        parse_mark(&format!("{text}/0xffffffff"))
    }
}

/// Checks an input interface name the way the kernel would take it, and that tproxy will
/// not read it as a pattern.
fn interface_name(name: &str) -> Result<String, String> {
    if is_pattern(name) {
        return Err(format!(
            "interface `{}`: tproxy would read `*` and `?` in it as a pattern",
            name.escape_debug()
        ));
    }
    any_interface_name(name)
}

/// The pattern of the interfaces whose names start with `prefix` (iptables `eth+`, nft
/// `"eth*"`): tproxy's `eth*`.
fn interface_pattern(prefix: &str) -> Result<String, String> {
    if prefix.is_empty() {
        return Ok("*".into());
    }
    interface_name(prefix)?;
    Ok(format!("{prefix}*"))
}

fn any_interface_name(name: &str) -> Result<String, String> {
    let valid = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != ':');
    if valid {
        Ok(name.to_string())
    } else {
        Err(format!(
            "`{}` is not an interface name",
            name.escape_debug()
        ))
    }
}

/// Which of `iptables-save` and `ip6tables-save` wrote `input`, by the header each writes
/// (`iptables-save` when neither is there).
fn iptables_source(input: &str) -> &'static str {
    let wrote = |tool: &str| {
        input
            .lines()
            .any(|line| line.starts_with(&format!("# Generated by {tool} ")))
    };
    match (wrote("iptables-save"), wrote("ip6tables-save")) {
        (true, true) => "`iptables-save` and `ip6tables-save`",
        (false, true) => "`ip6tables-save`",
        _ => "`iptables-save`",
    }
}

/// The port of a TPROXY target: `--on-port 0` (nft: no port) keeps the packet's own.
fn tproxy_port(text: &str) -> Result<Option<u16>, String> {
    match text.trim() {
        "0" => Ok(None),
        text => Ok(Some(*parse_port_list(text)?.0[0].start())),
    }
}

/// A port or port range as `values::parse_port_list` reads it (`80`, `8000-8100`).
fn port_range(text: &str) -> Result<Ports, String> {
    let list = parse_port_list(text)?;
    let range = &list.0[0];
    Ok(match (*range.start(), *range.end()) {
        (a, b) if a == b => Ports::One(a),
        (1, 65535) => Ports::Any,
        (a, b) => Ports::Range(a, b),
    })
}

/// The ports `ports` leaves out, as ranges (`! --dport 53` is `1-52` and `54-65535`).
fn complement(ports: &[Ports]) -> Result<Vec<Ports>, String> {
    let mut taken: Vec<(u16, u16)> = ports
        .iter()
        .map(|p| match *p {
            Ports::One(port) => (port, port),
            Ports::Range(first, last) => (first, last),
            Ports::Any => (1, 65535),
        })
        .collect();
    taken.sort_unstable();
    let mut left = Vec::new();
    let mut next: u32 = 1;
    for (first, last) in taken {
        if u32::from(first) > next {
            left.push((next as u16, first - 1));
        }
        next = next.max(u32::from(last) + 1);
    }
    if next <= 65535 {
        left.push((next as u16, 65535));
    }
    if left.is_empty() {
        return Err("a negated port match that excludes every port".into());
    }
    Ok(left
        .into_iter()
        .map(|(first, last)| {
            if first == last {
                Ports::One(first)
            } else {
                Ports::Range(first, last)
            }
        })
        .collect())
}

/// What a rule for a protocol tproxy never steers (`other_protocol`) becomes: a RETURN or
/// ACCEPT changes nothing tproxy decides, anything else cannot be translated.
fn other_protocol_rule(m: &Match, target: Target) -> Result<Target, String> {
    let Some(protocol) = &m.other_protocol else {
        return Ok(target);
    };
    match target {
        Target::Bypass | Target::Return => Ok(Target::Unsteered(format!(
            "protocol {protocol}: tproxy only ever steers TCP and UDP, so leaving it alone \
             changes nothing they decide"
        ))),
        _ => Err(format!(
            "protocol {protocol} (tproxy steers TCP and UDP) with a target other than RETURN \
             or ACCEPT: tproxy's rules for other protocols (`proto = \"other\"`) take every \
             protocol besides TCP and UDP at once, not {protocol} alone"
        )),
    }
}

/// The transports a negated protocol match leaves: the other of TCP and UDP, or both when
/// it excludes a protocol tproxy does not steer.
fn other_transports(excluded: Result<Transport, String>) -> Vec<Transport> {
    match excluded {
        Ok(Transport::Tcp) => vec![Transport::Udp],
        Ok(Transport::Udp) => vec![Transport::Tcp],
        Err(_) => Vec::new(),
    }
}

/// The users (or groups) `uids` leaves out, as ranges (`! --uid-owner 1000`, nft `meta skuid
/// != 1000`: `0-999` and `1001-4294967294`).
fn other_ids(uids: &[UidRange]) -> Result<Vec<UidRange>, String> {
    // The kernel's "no uid" (`(uid_t)-1`), and "no gid" likewise, is no process's.
    let bounds: Vec<(u32, u32)> = uids.iter().map(|r| (r.first, r.last)).collect();
    let left = ids_left_out(&bounds, u32::MAX - 1);
    if left.is_empty() {
        return Err("a negated uid or gid match that excludes every one".into());
    }
    Ok(left
        .into_iter()
        .map(|(first, last)| UidRange { first, last })
        .collect())
}

/// The class ids `classids` leaves out, as ranges (`! --cgroup 1`: `0` and `2-4294967295`;
/// 0 is a process in no class).
fn other_classids(classids: &[ClassidRange]) -> Result<Vec<ClassidRange>, String> {
    let bounds: Vec<(u32, u32)> = classids.iter().map(|r| (r.first, r.last)).collect();
    let left = ids_left_out(&bounds, u32::MAX);
    if left.is_empty() {
        return Err("a negated `--cgroup` that excludes every class id".into());
    }
    Ok(left
        .into_iter()
        .map(|(first, last)| ClassidRange { first, last })
        .collect())
}

/// The ids from 0 to `last_id` that none of the inclusive `ranges` holds, as inclusive
/// ranges in order.
fn ids_left_out(ranges: &[(u32, u32)], last_id: u32) -> Vec<(u32, u32)> {
    let mut taken = ranges.to_vec();
    taken.sort_unstable();
    let mut left = Vec::new();
    // u64: one past u32::MAX is where the ids end.
    let mut next: u64 = 0;
    for (first, last) in taken {
        if u64::from(first) > next {
            left.push((next as u32, first - 1));
        }
        next = next.max(u64::from(last) + 1);
    }
    if next <= u64::from(last_id) {
        left.push((next as u32, last_id));
    }
    left
}

/// A cgroup v2 path (`-m cgroup --path`, nft `socket cgroupv2`) from the hierarchy's root,
/// as tproxy takes it (iptables and nft take it with or without the leading `/`).
fn cgroup_path(text: &str) -> Result<String, String> {
    let relative = text.trim_start_matches('/');
    if relative
        .split('/')
        .any(|part| part == "." || part == ".." || (part.is_empty() && !relative.is_empty()))
    {
        return Err(format!("cgroup `{text}`: not a cgroup path"));
    }
    Ok(format!("/{relative}"))
}
