//! `tproxy translate`: an iptables/ip6tables (`iptables-save`) or nft (`nft list ruleset`)
//! TPROXY rule set in, the equivalent tproxy configuration out.
//!
//! What is translated: the `mangle` table's PREROUTING chain (nft: chains hooked at
//! prerouting) and the chains it jumps to. The socket-match "divert" rules become tproxy's
//! built-in socket match; each TPROXY target becomes a `steer` rule to a listener on its
//! `--on-port`; RETURN/ACCEPT become `bypass` rules. iptables applies the first matching
//! rule, tproxy the most specific one (see `rules`), so a rule that a more general earlier
//! rule shadows is dropped when iptables could never reach it, and reported when only part of
//! it is shadowed. Everything that cannot be expressed is listed on stderr with its line.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    io::Read,
    net::{IpAddr, SocketAddr},
};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;

use crate::{
    cli::{self, Mark, TranslateArgs},
    datapath::rules::Ports,
    relay::listener::Transport,
};

/// Reads the rule set from stdin, prints the configuration, lists what was skipped.
pub fn run(args: &TranslateArgs) -> Result<()> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading the rule set from stdin")?;
    let translation = translate(&input)?;
    print!("{}", translation.config);
    for note in &translation.notes {
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
#[derive(Clone, Debug, Default)]
struct Match {
    /// Empty: any transport.
    transports: Vec<Transport>,
    dst: Vec<IpNet>,
    src: Vec<IpNet>,
    /// Empty: any port.
    ports: Vec<Ports>,
    iface: Option<String>,
    /// `None`: both (nft `inet`).
    family: Option<Family>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Tproxy {
        on_ip: Option<IpAddr>,
        on_port: u16,
        /// `--tproxy-mark` (nft: the rule's `meta mark set`).
        mark: Option<Mark>,
    },
    /// ACCEPT: the packet leaves the hook untouched.
    Bypass,
    /// RETURN: back to the calling chain (from a base chain: the policy, untouched).
    Return,
    /// The socket match's "divert" jump: tproxy has it built in.
    SocketDivert,
    Jump(String),
    /// Part of the divert chain (mark, accept) or a no-op.
    Ignore,
}

/// One parsed rule, with where it came from.
#[derive(Clone, Debug)]
struct Parsed {
    line: usize,
    text: String,
    matches: Match,
    target: Target,
}

/// A chain's rules; `Err` holds why a rule could not be parsed.
type Chain = Vec<Result<Parsed, (usize, String, String)>>;

struct RuleSet {
    chains: HashMap<String, Chain>,
    /// The chains the kernel runs at prerouting, in order.
    entry: Vec<String>,
    /// Rules outside what is translated, for a note.
    ignored: usize,
    /// Rules that matter but are outside prerouting (mangle OUTPUT: local traffic).
    elsewhere: Vec<(usize, String, String)>,
}

/// Translates a rule set given as text.
pub fn translate(input: &str) -> Result<Translation> {
    let is_nft = input.lines().any(|l| {
        let l = l.trim_start();
        l.starts_with("table ") && l.trim_end().ends_with('{')
    });
    let is_iptables = input
        .lines()
        .any(|l| l.trim_start().starts_with("*") || l.contains("-A "));
    let ruleset = match (is_nft, is_iptables) {
        (true, _) => parse_nft(input)?,
        (false, true) => parse_iptables(input)?,
        (false, false) => bail!(
            "the input is neither `iptables-save` output (with `*mangle` and `-A` lines) nor \
             `nft list ruleset` output (with `table … {{` blocks)"
        ),
    };
    Ok(emit(
        ruleset,
        if is_nft {
            "nft list ruleset"
        } else {
            "iptables-save"
        },
    ))
}

fn emit(ruleset: RuleSet, source: &str) -> Translation {
    let mut notes = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    let mut flat = Vec::new();
    for entry in &ruleset.entry {
        flatten(
            &ruleset,
            entry,
            &Match::default(),
            0,
            &mut flat,
            &mut skipped,
        );
    }
    for (line, text, reason) in &ruleset.elsewhere {
        skipped.push(format!("line {line}: {text}: {reason}"));
    }
    if ruleset.ignored > 0 {
        notes.push(format!(
            "{} rules outside the prerouting TPROXY path (other tables and chains) were left alone",
            ruleset.ignored
        ));
    }

    // Listeners by port; rules in order.
    let mut listeners: BTreeMap<u16, Vec<SocketAddr>> = BTreeMap::new();
    let mut rules: Vec<(Parsed, Option<u16>)> = Vec::new();
    let mut divert_seen = false;
    for parsed in flat {
        match &parsed.target {
            Target::SocketDivert => divert_seen = true,
            Target::Ignore | Target::Jump(_) => {}
            Target::Bypass | Target::Return => rules.push((parsed, None)),
            Target::Tproxy { on_ip, on_port, .. } => {
                let families: Vec<Family> = match parsed.matches.family {
                    Some(family) => vec![family],
                    None => vec![Family::V4, Family::V6],
                };
                let addrs = listeners.entry(*on_port).or_default();
                for family in families {
                    let addr = match (on_ip, family) {
                        (Some(ip @ IpAddr::V4(v4)), Family::V4) if !v4.is_unspecified() => *ip,
                        (Some(ip @ IpAddr::V6(v6)), Family::V6) if !v6.is_unspecified() => *ip,
                        (_, Family::V4) => "127.0.0.1".parse().unwrap(),
                        (_, Family::V6) => "::1".parse().unwrap(),
                    };
                    let addr = SocketAddr::new(addr, *on_port);
                    if !addrs.iter().any(|a| a.is_ipv4() == addr.is_ipv4()) {
                        addrs.push(addr);
                    }
                }
                let port = *on_port;
                rules.push((parsed, Some(port)));
            }
        }
    }
    if divert_seen {
        notes.push(
            "the socket-match DIVERT rules are built into tproxy (a flow's own socket is always \
             looked up first); they need no translation"
                .into(),
        );
    }
    if !listeners.is_empty() {
        notes.push(
            "tproxy relays steered flows to their original destination itself: the proxy that \
             listened on the TPROXY --on-port is no longer in the path (give a listener an \
             `upstream` to send its flows somewhere else)"
                .into(),
        );
    }

    // iptables: first match wins; tproxy: most specific wins. Drop rules iptables never
    // reaches; report those it reaches only in part.
    let mut kept: Vec<(Parsed, Option<u16>)> = Vec::new();
    let mut by_destination = ShadowIndex::default();
    'rules: for (rule, listener) in rules {
        for index in by_destination.candidates(&rule.matches, kept.len()) {
            let (earlier, earlier_listener) = &kept[index];
            if *earlier_listener == listener || !overlaps(&earlier.matches, &rule.matches) {
                continue;
            }
            if !more_specific(&rule.matches, &earlier.matches) {
                continue;
            }
            if covers(&earlier.matches, &rule.matches) {
                notes.push(format!(
                    "line {}: `{}` never matches: line {} comes first and matches all of its packets; left out",
                    rule.line, rule.text, earlier.line
                ));
            } else {
                skipped.push(format!(
                    "line {}: {}: line {} comes first and matches some of its packets; tproxy would \
                     apply this more specific rule to them instead",
                    rule.line, rule.text, earlier.line
                ));
            }
            continue 'rules;
        }
        by_destination.add(&rule.matches, kept.len());
        kept.push((rule, listener));
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Translated by `tproxy translate` from `{source}` output."
    );
    let ifaces: Vec<&String> = {
        let mut seen: Vec<&String> = Vec::new();
        for (rule, _) in &kept {
            if let Some(iface) = &rule.matches.iface {
                if !seen.contains(&iface) {
                    seen.push(iface);
                }
            }
        }
        seen
    };
    if kept.iter().any(|(rule, _)| rule.matches.iface.is_none()) || ifaces.is_empty() {
        let _ = writeln!(
            out,
            "# Rules without an input interface applied to packets arriving on any interface."
        );
        let _ = writeln!(out, "interfaces = \"all\"");
    } else {
        let names: Vec<String> = ifaces.iter().map(|i| quote(i)).collect();
        let _ = writeln!(out, "interfaces = [{}]", names.join(", "));
    }
    let mut marks: Vec<Mark> = Vec::new();
    for (rule, _) in &kept {
        if let Target::Tproxy {
            mark: Some(mark), ..
        } = rule.target
        {
            if !marks.contains(&mark) {
                marks.push(mark);
            }
        }
    }
    if let Some(mark) = marks.first() {
        let _ = writeln!(
            out,
            "# The TPROXY rules' mark, for anything else that relies on it."
        );
        let _ = writeln!(out, "mark = \"{mark}\"");
        if marks.len() > 1 {
            notes.push(format!(
                "the TPROXY rules set {} different marks; tproxy sets one, {mark}, on every steered packet",
                marks.len()
            ));
        }
    }
    for (port, addrs) in &listeners {
        let _ = writeln!(out, "\n[[listener]]\nname = \"{}\"", listener_name(*port));
        let addrs: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
        let _ = writeln!(out, "listen = [{}]", addrs.join(", "));
    }
    for (rule, listener) in &kept {
        let m = &rule.matches;
        // A comment cannot hold control characters.
        let text: String = rule
            .text
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        let _ = writeln!(out, "\n[[rule]]\n# line {}: {text}", rule.line);
        let transports = if m.transports.is_empty() {
            vec![Transport::Tcp, Transport::Udp]
        } else {
            m.transports.clone()
        };
        let names: Vec<&str> = transports
            .iter()
            .map(|t| match t {
                Transport::Tcp => "\"tcp\"",
                Transport::Udp => "\"udp\"",
            })
            .collect();
        let _ = writeln!(out, "proto = [{}]", names.join(", "));
        let dst = match (m.dst.is_empty(), m.family) {
            (false, _) => m.dst.clone(),
            (true, Some(Family::V4)) => vec!["0.0.0.0/0".parse().unwrap()],
            (true, Some(Family::V6)) => vec!["::/0".parse().unwrap()],
            (true, None) => Vec::new(),
        };
        if !dst.is_empty() {
            let _ = writeln!(out, "dst = [{}]", quoted(&dst));
        }
        if !m.src.is_empty() {
            let _ = writeln!(out, "src = [{}]", quoted(&m.src));
        }
        if !m.ports.is_empty() {
            let ports: Vec<String> = m
                .ports
                .iter()
                .map(|p| match p {
                    Ports::One(port) => port.to_string(),
                    other => format!("\"{other}\""),
                })
                .collect();
            let _ = writeln!(out, "ports = [{}]", ports.join(", "));
        }
        if let Some(iface) = &m.iface {
            let _ = writeln!(out, "iface = {}", quote(iface));
        }
        match listener {
            Some(port) => {
                let _ = writeln!(
                    out,
                    "action = \"steer\"\nlistener = \"{}\"",
                    listener_name(*port)
                );
            }
            None => {
                let _ = writeln!(out, "action = \"bypass\"");
            }
        }
    }
    Translation {
        config: out,
        notes,
        skipped,
    }
}

/// A mark as iptables and nft write it: a bare value sets all 32 bits.
fn full_mark(text: &str) -> Result<Mark, String> {
    if text.contains('/') {
        cli::parse_mark(text)
    } else {
        cli::parse_mark(&format!("{text}/0xffffffff"))
    }
}

fn listener_name(port: u16) -> String {
    format!("tproxy-{port}")
}

/// `text` as a TOML string, escaped.
fn quote(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// Checks an input interface name the way the kernel would take it.
fn interface_name(name: &str) -> Result<String, String> {
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

fn quoted(prefixes: &[IpNet]) -> String {
    let items: Vec<String> = prefixes.iter().map(|p| format!("\"{p}\"")).collect();
    items.join(", ")
}

/// Inlines jumps from `chain`, narrowing the jumped-to rules by the jump's own matches.
fn flatten(
    ruleset: &RuleSet,
    chain: &str,
    context: &Match,
    depth: usize,
    out: &mut Vec<Parsed>,
    skipped: &mut Vec<String>,
) {
    let Some(rules) = ruleset.chains.get(chain) else {
        return;
    };
    for (i, rule) in rules.iter().enumerate() {
        let rule = match rule {
            Ok(rule) => rule,
            Err((line, text, reason)) => {
                skipped.push(format!("line {line}: {text}: {reason}"));
                continue;
            }
        };
        let Some(matches) = narrow(context, &rule.matches) else {
            skipped.push(format!(
                "line {}: {}: its matches conflict with those of the rule that jumps here",
                rule.line, rule.text
            ));
            continue;
        };
        match &rule.target {
            Target::Jump(target) if depth < 8 => {
                // RETURN in the target chain continues here, after the jump: only a bypass if
                // nothing after the jump could still steer.
                let steers_later = rules[i + 1..].iter().any(|r| {
                    r.as_ref()
                        .is_ok_and(|r| matches!(r.target, Target::Tproxy { .. } | Target::Jump(_)))
                });
                let start = out.len();
                flatten(ruleset, target, &matches, depth + 1, out, skipped);
                if steers_later {
                    let mut kept = Vec::new();
                    for rule in out.drain(start..) {
                        if rule.target == Target::Return {
                            skipped.push(format!(
                                "line {}: {}: RETURN goes back to the calling chain, whose later rules may still steer the packet",
                                rule.line, rule.text
                            ));
                        } else {
                            kept.push(rule);
                        }
                    }
                    out.extend(kept);
                }
            }
            Target::Jump(target) => skipped.push(format!(
                "line {}: {}: jumps nest too deep (to {target})",
                rule.line, rule.text
            )),
            _ => out.push(Parsed {
                matches,
                ..rule.clone()
            }),
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
    Some(Match {
        transports,
        dst: narrow_prefixes(&context.dst, &rule.dst)?,
        src: narrow_prefixes(&context.src, &rule.src)?,
        ports: pick(&context.ports, &rule.ports)?,
        iface: match (&context.iface, &rule.iface) {
            (Some(a), Some(b)) if a != b => return None,
            (a, b) => b.clone().or(a.clone()),
        },
        family,
    })
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

fn transports_of(m: &Match) -> Vec<Transport> {
    if m.transports.is_empty() {
        vec![Transport::Tcp, Transport::Udp]
    } else {
        m.transports.clone()
    }
}

fn families_of(m: &Match) -> Vec<Family> {
    match m.family {
        Some(family) => vec![family],
        None => vec![Family::V4, Family::V6],
    }
}

fn prefixes_of(list: &[IpNet], family: Family) -> Vec<IpNet> {
    if list.is_empty() {
        return vec![match family {
            Family::V4 => "0.0.0.0/0".parse().unwrap(),
            Family::V6 => "::/0".parse().unwrap(),
        }];
    }
    list.iter()
        .copied()
        .filter(|p| p.addr().is_ipv4() == (family == Family::V4))
        .collect()
}

fn port_bounds(p: Ports) -> (u16, u16) {
    match p {
        Ports::One(port) => (port, port),
        Ports::Range(first, last) => (first, last),
        Ports::Any => (1, 65535),
    }
}

fn ports_of_match(m: &Match) -> Vec<Ports> {
    if m.ports.is_empty() {
        vec![Ports::Any]
    } else {
        m.ports.clone()
    }
}

/// Whether some packet matches both.
fn overlaps(a: &Match, b: &Match) -> bool {
    let transports = transports_of(a)
        .iter()
        .any(|t| transports_of(b).contains(t));
    let ports = ports_of_match(a).iter().any(|pa| {
        let (a1, a2) = port_bounds(*pa);
        ports_of_match(b).iter().any(|pb| {
            let (b1, b2) = port_bounds(*pb);
            a1 <= b2 && b1 <= a2
        })
    });
    let iface = match (&a.iface, &b.iface) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    };
    let nets = |x: &[IpNet], y: &[IpNet], family| {
        prefixes_of(x, family).iter().any(|p| {
            prefixes_of(y, family)
                .iter()
                .any(|q| p.contains(q) || q.contains(p))
        })
    };
    let addresses = families_of(a)
        .into_iter()
        .filter(|f| families_of(b).contains(f))
        .any(|family| nets(&a.dst, &b.dst, family) && nets(&a.src, &b.src, family));
    transports && ports && iface && addresses
}

/// Whether every packet that `inner` matches, `outer` matches too.
fn covers(outer: &Match, inner: &Match) -> bool {
    let transports = transports_of(inner)
        .iter()
        .all(|t| transports_of(outer).contains(t));
    let ports = ports_of_match(inner).iter().all(|pi| {
        let (i1, i2) = port_bounds(*pi);
        ports_of_match(outer).iter().any(|po| {
            let (o1, o2) = port_bounds(*po);
            o1 <= i1 && i2 <= o2
        })
    });
    let iface = outer.iface.is_none() || outer.iface == inner.iface;
    let nets = |o: &[IpNet], i: &[IpNet], family| {
        prefixes_of(i, family)
            .iter()
            .all(|p| prefixes_of(o, family).iter().any(|q| q.contains(p)))
    };
    let addresses = families_of(inner).into_iter().all(|family| {
        families_of(outer).contains(&family)
            && nets(&outer.dst, &inner.dst, family)
            && nets(&outer.src, &inner.src, family)
    });
    transports && ports && iface && addresses
}

/// Whether tproxy's precedence could prefer `later` over `earlier` for a packet both match:
/// a longer destination prefix, or the same with a more specific port.
fn more_specific(later: &Match, earlier: &Match) -> bool {
    let longest = |m: &Match| {
        families_of(m)
            .into_iter()
            .flat_map(|f| prefixes_of(&m.dst, f))
            .map(|p| p.prefix_len())
            .max()
            .unwrap_or(0)
    };
    let shortest = |m: &Match| {
        families_of(m)
            .into_iter()
            .flat_map(|f| prefixes_of(&m.dst, f))
            .map(|p| p.prefix_len())
            .min()
            .unwrap_or(0)
    };
    let specificity = |m: &Match| match ports_of_match(m)
        .iter()
        .map(|p| port_bounds(*p))
        .map(|(a, b)| b - a)
        .min()
    {
        Some(0) => 0,
        Some(65534) => 2,
        _ => 1,
    };
    longest(later) > shortest(earlier)
        || (longest(later) == shortest(earlier) && specificity(later) < specificity(earlier))
}

/// The destination prefixes of `m` in each of its families (`0/0` where it names none).
fn destination_prefixes(m: &Match) -> Vec<IpNet> {
    families_of(m)
        .into_iter()
        .flat_map(|family| prefixes_of(&m.dst, family))
        .collect()
}

fn truncated(prefix: IpNet, len: u8) -> Option<IpNet> {
    IpNet::new(prefix.addr(), len).ok().map(|n| n.trunc())
}

/// The rules kept so far, by destination prefix: comparing each rule with every earlier one
/// made translating quadratic in the number of rules.
#[derive(Default)]
struct ShadowIndex {
    by_prefix: HashMap<IpNet, Vec<usize>>,
}

impl ShadowIndex {
    /// Files kept rule `index` under its destination prefixes, each cut to the rule's
    /// shortest one: a later rule outranks it (see [`more_specific`]) only with prefixes at
    /// least that long, whose ancestors then include the key.
    fn add(&mut self, m: &Match, index: usize) {
        let prefixes = destination_prefixes(m);
        let shortest = prefixes.iter().map(IpNet::prefix_len).min().unwrap_or(0);
        for prefix in prefixes {
            let len = prefix.prefix_len().min(shortest);
            if let Some(key) = truncated(prefix, len) {
                self.by_prefix.entry(key).or_default().push(index);
            }
        }
    }

    /// In order, the first `count` kept rules that `m` may overlap and outrank: every one
    /// that it does, and some that it does not.
    fn candidates(&self, m: &Match, count: usize) -> Vec<usize> {
        let prefixes = destination_prefixes(m);
        if prefixes
            .iter()
            .any(|p| p.prefix_len() != prefixes[0].prefix_len())
        {
            // With prefixes of several lengths, its longest can outrank rules inside its
            // shorter ones, which the keys do not lead to.
            return (0..count).collect();
        }
        let mut found: Vec<usize> = prefixes
            .iter()
            .flat_map(|&p| (0..=p.prefix_len()).filter_map(move |len| truncated(p, len)))
            .filter_map(|key| self.by_prefix.get(&key))
            .flatten()
            .copied()
            .collect();
        found.sort_unstable();
        found.dedup();
        found
    }
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

fn parse_iptables(input: &str) -> Result<RuleSet> {
    let mut chains: HashMap<String, Chain> = HashMap::new();
    let mut table = String::new();
    let mut family = Family::V4;
    let mut ignored = 0;
    let mut elsewhere = Vec::new();
    let mut divert_chains: Vec<String> = Vec::new();
    let mut user_chains: Vec<String> = Vec::new();
    // First pass: the user chains, and which are the socket match's divert chains.
    for line in input.lines() {
        let w = words(line);
        if let Some(name) = w.first().and_then(|w| w.strip_prefix(':')) {
            user_chains.push(name.to_string());
        }
        if w.iter().any(|x| x == "socket") {
            if let Some(i) = w.iter().position(|x| x == "-j") {
                if let Some(chain) = w.get(i + 1) {
                    divert_chains.push(chain.clone());
                }
            }
        }
    }
    for (number, line) in input.lines().enumerate() {
        let number = number + 1;
        let trimmed = line.trim();
        if trimmed.starts_with("# Generated by ip6tables") {
            family = Family::V6;
        } else if trimmed.starts_with("# Generated by iptables") {
            family = Family::V4;
        }
        if let Some(name) = trimmed.strip_prefix('*') {
            table = name.to_string();
            continue;
        }
        // `iptables-save -c` puts counters first.
        let trimmed = match trimmed.strip_prefix('[') {
            Some(rest) => rest.split_once(']').map_or(rest, |(_, r)| r).trim(),
            None => trimmed,
        };
        let Some(rest) = trimmed.strip_prefix("-A ") else {
            continue;
        };
        let w = words(rest);
        let chain = w[0].clone();
        if table != "mangle" {
            ignored += 1;
            continue;
        }
        let parsed = parse_iptables_rule(
            &w[1..],
            family,
            divert_chains.contains(&chain),
            &user_chains,
        )
        .map(|(matches, target)| Parsed {
            line: number,
            text: trimmed.to_string(),
            matches,
            target,
        })
        .map_err(|reason| (number, trimmed.to_string(), reason));
        if chain == "OUTPUT" {
            if parsed.as_ref().is_ok_and(|p| p.target != Target::Ignore) || parsed.is_err() {
                elsewhere.push((
                    number,
                    trimmed.to_string(),
                    "mangle OUTPUT handles locally generated traffic, which tproxy does not steer"
                        .to_string(),
                ));
            }
            continue;
        }
        if chain != "PREROUTING"
            && chain.chars().all(|c| c.is_ascii_uppercase())
            && !chains.contains_key(&chain)
            && is_builtin(&chain)
        {
            ignored += 1;
            continue;
        }
        chains.entry(chain).or_default().push(parsed);
    }
    Ok(RuleSet {
        chains,
        entry: vec!["PREROUTING".into()],
        ignored,
        elsewhere,
    })
}

fn is_builtin(chain: &str) -> bool {
    matches!(chain, "INPUT" | "FORWARD" | "OUTPUT" | "POSTROUTING")
}

fn parse_iptables_rule(
    w: &[String],
    family: Family,
    in_divert_chain: bool,
    user_chains: &[String],
) -> Result<(Match, Target), String> {
    let mut m = Match {
        family: Some(family),
        ..Match::default()
    };
    let mut target = None;
    let mut socket = false;
    let mut i = 0;
    let value = |i: usize| {
        w.get(i + 1)
            .cloned()
            .ok_or_else(|| format!("`{}` without a value", w[i]))
    };
    while i < w.len() {
        let word = w[i].as_str();
        match word {
            "!" => return Err("negated matches cannot be translated".into()),
            "-p" | "--protocol" => {
                m.transports = vec![match value(i)?.as_str() {
                    "tcp" | "6" => Transport::Tcp,
                    "udp" | "17" => Transport::Udp,
                    other => return Err(format!("protocol {other} (tproxy steers TCP and UDP)")),
                }];
                i += 2;
            }
            "-d" | "--destination" | "-s" | "--source" => {
                let prefixes = value(i)?
                    .split(',')
                    .map(cli::parse_prefix)
                    .collect::<Result<Vec<_>, _>>()?;
                if word.starts_with("-d") || word == "--destination" {
                    m.dst = prefixes;
                } else {
                    m.src = prefixes;
                }
                i += 2;
            }
            "-i" | "--in-interface" => {
                let iface = value(i)?;
                if iface.ends_with('+') {
                    return Err(format!("interface wildcard {iface}"));
                }
                m.iface = Some(interface_name(&iface)?);
                i += 2;
            }
            "-m" | "--match" => {
                match value(i)?.as_str() {
                    "tcp" | "udp" | "multiport" | "comment" => {}
                    "socket" => socket = true,
                    other => return Err(format!("match `-m {other}`")),
                }
                i += 2;
            }
            "--dport" | "--destination-port" | "--dports" | "--destination-ports" => {
                m.ports = value(i)?
                    .split(',')
                    .map(|p| {
                        let (first, last) = p.split_once(':').unwrap_or((p, p));
                        let text = if first == last {
                            first.to_string()
                        } else {
                            format!("{first}-{last}")
                        };
                        let list = cli::parse_port_list(&text)?;
                        let range = &list.0[0];
                        Ok(match (*range.start(), *range.end()) {
                            (a, b) if a == b => Ports::One(a),
                            (1, 65535) => Ports::Any,
                            (a, b) => Ports::Range(a, b),
                        })
                    })
                    .collect::<Result<_, String>>()?;
                i += 2;
            }
            "--transparent" | "--nowildcard" | "--restore-skmark" => i += 1,
            "--comment" => i += 2,
            "-j" | "--jump" | "-g" | "--goto" => {
                let name = value(i)?;
                i += 2;
                let mut on_ip = None;
                let mut on_port = None;
                let mut mark = None;
                while i < w.len() {
                    match w[i].as_str() {
                        "--on-port" => {
                            on_port =
                                Some(cli::parse_port_list(&value(i)?)?.0[0].start().to_owned());
                        }
                        "--on-ip" => {
                            on_ip = Some(
                                value(i)?
                                    .parse::<IpAddr>()
                                    .map_err(|_| format!("--on-ip {}", w[i + 1]))?,
                            );
                        }
                        "--tproxy-mark" => mark = Some(full_mark(&value(i)?)?),
                        "--set-mark" | "--set-xmark" | "--mark" => {}
                        // Matches may follow the target (`-j RETURN -m mark --mark 1`): the
                        // rule's options go on, and a match is judged as a match.
                        "-m" | "--match" | "-p" | "--protocol" | "-s" | "--source" | "-d"
                        | "--destination" | "-i" | "--in-interface" | "!" => break,
                        other => return Err(format!("target option `{other}`")),
                    }
                    i += 2;
                }
                target = Some(match name.as_str() {
                    "TPROXY" => Target::Tproxy {
                        on_ip,
                        on_port: on_port.ok_or("TPROXY without --on-port")?,
                        mark,
                    },
                    "MARK" | "ACCEPT" if in_divert_chain => Target::Ignore,
                    "MARK" | "CONNMARK" => {
                        return Err(format!("target {name} (marks are tproxy's own business)"))
                    }
                    "ACCEPT" => Target::Bypass,
                    "RETURN" => Target::Return,
                    _ if socket => Target::SocketDivert,
                    chain if user_chains.iter().any(|c| c == chain) => {
                        Target::Jump(chain.to_string())
                    }
                    other => return Err(format!("target {other}")),
                });
            }
            other => return Err(format!("option `{other}`")),
        }
    }
    let target = target.ok_or("a rule without a target")?;
    if socket && target != Target::SocketDivert && !matches!(target, Target::Ignore) {
        if matches!(target, Target::Bypass | Target::Return) {
            return Ok((m, Target::SocketDivert));
        }
        return Err("the socket match with a target other than a divert chain".into());
    }
    Ok((m, target))
}

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

fn parse_nft(input: &str) -> Result<RuleSet> {
    let mut chains: HashMap<String, Chain> = HashMap::new();
    let mut entry = Vec::new();
    let mut ignored = 0;
    let mut elsewhere = Vec::new();
    let mut sets = Sets::new();
    let mut blocks: Vec<Block> = Vec::new();
    // A set's `elements = { … }` may span lines: its text until the braces balance.
    let mut elements: Option<(String, String)> = None;
    let mut family: Option<Family> = None;
    let mut table = String::new();
    let mut chain: Option<String> = None;
    let mut hook: Option<String> = None;
    // nft's chains and sets are per table: name them table/name.
    for (number, line) in input.lines().enumerate() {
        let number = number + 1;
        let trimmed = line.trim();
        if let Some((set, mut text)) = elements.take() {
            text.push(' ');
            text.push_str(trimmed);
            if text.matches('{').count() > text.matches('}').count() {
                elements = Some((set, text));
            } else {
                sets.insert(set, set_elements(&text));
            }
            continue;
        }
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let w = words(trimmed);
        if trimmed == "}" {
            if let Some(Block::Chain) = blocks.pop() {
                chain = None;
            }
            continue;
        }
        if trimmed.ends_with('{') {
            let name = w.get(1).cloned().unwrap_or_default();
            match w[0].as_str() {
                "table" => {
                    family = match name.as_str() {
                        "ip" => Some(Family::V4),
                        "ip6" => Some(Family::V6),
                        _ => None,
                    };
                    table = w.get(2).cloned().unwrap_or_default();
                    blocks.push(Block::Table);
                }
                "chain" => {
                    chain = Some(format!("{table}/{name}"));
                    hook = None;
                    blocks.push(Block::Chain);
                }
                "set" | "map" => blocks.push(Block::Set(format!("{table}/{name}"))),
                _ => blocks.push(Block::Other),
            }
            continue;
        }
        match blocks.last() {
            Some(Block::Set(set)) => {
                if w[0] == "elements" {
                    let text = trimmed.to_string();
                    if text.matches('{').count() > text.matches('}').count() {
                        elements = Some((set.clone(), text));
                    } else {
                        sets.insert(set.clone(), set_elements(&text));
                    }
                }
                continue;
            }
            Some(Block::Chain) => {}
            _ => continue,
        }
        if w[0] == "type" {
            hook = w
                .iter()
                .position(|x| x == "hook")
                .and_then(|i| w.get(i + 1))
                .map(|h| h.trim_end_matches(';').to_string());
            if let (Some("prerouting"), Some(chain)) = (hook.as_deref(), &chain) {
                entry.push(chain.clone());
            }
            continue;
        }
        if w[0] == "policy" {
            continue;
        }
        let Some(chain) = &chain else { continue };
        let parsed = parse_nft_rule(trimmed, family, &table, &sets)
            .map(|(matches, target)| Parsed {
                line: number,
                text: trimmed.to_string(),
                matches,
                target,
            })
            .map_err(|reason| (number, trimmed.to_string(), reason));
        match hook.as_deref() {
            Some("prerouting") | None => chains.entry(chain.clone()).or_default().push(parsed),
            Some("output") => {
                elsewhere.push((number, trimmed.to_string(), "a rule at the output hook handles locally generated traffic, which tproxy does not steer".to_string()));
            }
            Some(_) => ignored += 1,
        }
    }
    Ok(RuleSet {
        chains,
        entry,
        ignored,
        elsewhere,
    })
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

/// Values of an nft expression at `w[i]`: one word, or a `{ a, b }` set. Returns the values
/// and the index after them.
fn nft_values(
    w: &[String],
    i: usize,
    sets: &Sets,
    table: &str,
) -> Result<(Vec<String>, usize), String> {
    let first = w.get(i).ok_or("an expression without a value")?;
    if first == "!=" {
        return Err("negated matches cannot be translated".into());
    }
    if let Some(name) = first.strip_prefix('@') {
        let elements = sets
            .get(&format!("{table}/{name}"))
            .ok_or(format!("set @{name} is not defined in table {table}"))?;
        return Ok((elements.clone(), i + 1));
    }
    if first != "{" {
        return Ok((vec![first.trim_end_matches(',').to_string()], i + 1));
    }
    let mut values = Vec::new();
    let mut j = i + 1;
    while j < w.len() && w[j] != "}" {
        for v in w[j].split(',').filter(|v| !v.is_empty()) {
            values.push(v.to_string());
        }
        j += 1;
    }
    Ok((values, j + 1))
}

fn parse_nft_rule(
    text: &str,
    family: Option<Family>,
    table: &str,
    sets: &Sets,
) -> Result<(Match, Target), String> {
    let w = words(text);
    let mut m = Match {
        family,
        ..Match::default()
    };
    let mut target = None;
    let mut socket = false;
    let mut set_mark = None;
    let mut i = 0;
    let transport = |name: &str| match name {
        "tcp" => Ok(Transport::Tcp),
        "udp" => Ok(Transport::Udp),
        other => Err(format!("protocol {other} (tproxy steers TCP and UDP)")),
    };
    while i < w.len() {
        match w[i].as_str() {
            "meta" if w.get(i + 1).is_some_and(|x| x == "l4proto") => {
                let (values, next) = nft_values(&w, i + 2, sets, table)?;
                m.transports = values
                    .iter()
                    .map(|v| transport(v))
                    .collect::<Result<_, _>>()?;
                i = next;
            }
            "meta" if w.get(i + 1).is_some_and(|x| x == "nfproto") => {
                m.family = match w.get(i + 2).map(String::as_str) {
                    Some("ipv4") => Some(Family::V4),
                    Some("ipv6") => Some(Family::V6),
                    other => return Err(format!("meta nfproto {}", other.unwrap_or(""))),
                };
                i += 3;
            }
            "ip" if w.get(i + 1).is_some_and(|x| x == "protocol") => {
                let (values, next) = nft_values(&w, i + 2, sets, table)?;
                m.transports = values
                    .iter()
                    .map(|v| transport(v))
                    .collect::<Result<_, _>>()?;
                m.family = Some(Family::V4);
                i = next;
            }
            "tcp" | "udp" | "th" if w.get(i + 1).is_some_and(|x| x == "dport") => {
                if w[i] != "th" {
                    m.transports = vec![transport(&w[i])?];
                }
                let (values, next) = nft_values(&w, i + 2, sets, table)?;
                m.ports = values
                    .iter()
                    .map(|v| {
                        let list = cli::parse_port_list(v)?;
                        let range = &list.0[0];
                        Ok(match (*range.start(), *range.end()) {
                            (a, b) if a == b => Ports::One(a),
                            (1, 65535) => Ports::Any,
                            (a, b) => Ports::Range(a, b),
                        })
                    })
                    .collect::<Result<_, String>>()?;
                i = next;
            }
            "ip" | "ip6" if w.get(i + 1).is_some_and(|x| x == "daddr" || x == "saddr") => {
                m.family = Some(if w[i] == "ip" { Family::V4 } else { Family::V6 });
                let (values, next) = nft_values(&w, i + 2, sets, table)?;
                let prefixes = values
                    .iter()
                    .map(|v| cli::parse_prefix(v))
                    .collect::<Result<Vec<_>, _>>()?;
                if w[i + 1] == "daddr" {
                    m.dst = prefixes;
                } else {
                    m.src = prefixes;
                }
                i = next;
            }
            "iifname" | "iif" => {
                let (values, next) = nft_values(&w, i + 1, sets, table)?;
                match values.as_slice() {
                    [one] if !one.ends_with('*') => m.iface = Some(interface_name(one)?),
                    _ => return Err("several or wildcard input interfaces".into()),
                }
                i = next;
            }
            "meta" if w.get(i + 1).is_some_and(|x| x == "iifname") => {
                let (values, next) = nft_values(&w, i + 2, sets, table)?;
                match values.as_slice() {
                    [one] if !one.ends_with('*') => m.iface = Some(interface_name(one)?),
                    _ => return Err("several or wildcard input interfaces".into()),
                }
                i = next;
            }
            "socket"
                if w.get(i + 1)
                    .is_some_and(|x| x == "transparent" || x == "wildcard") =>
            {
                socket |= w[i + 1] == "transparent";
                i += 3;
            }
            "meta" | "mark" if w[i] == "mark" || w.get(i + 1).is_some_and(|x| x == "mark") => {
                let at = if w[i] == "meta" { i + 2 } else { i + 1 };
                if w.get(at).is_some_and(|x| x == "set") {
                    let value = w.get(at + 1).ok_or("`mark set` without a value")?;
                    set_mark = Some(full_mark(value)?);
                    i = at + 2;
                } else {
                    return Err("matching on the packet mark cannot be translated".into());
                }
            }
            "counter" => {
                i += 1;
                while i + 1 < w.len() && (w[i] == "packets" || w[i] == "bytes") {
                    i += 2;
                }
            }
            "comment" => i += 2,
            "tproxy" => {
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
                let (addr, port) = to.rsplit_once(':').ok_or(format!("tproxy to `{to}`"))?;
                let addr = addr.trim_start_matches('[').trim_end_matches(']');
                let on_ip = if addr.is_empty() {
                    None
                } else {
                    Some(
                        addr.parse::<IpAddr>()
                            .map_err(|_| format!("tproxy to `{to}`"))?,
                    )
                };
                if let Some(f) =
                    tproxy_family
                        .or(on_ip.map(|ip| if ip.is_ipv4() { Family::V4 } else { Family::V6 }))
                {
                    if m.family.is_some_and(|mf| mf != f) {
                        return Err("tproxy to an address of the other family".into());
                    }
                    m.family = Some(f);
                }
                let on_port = cli::parse_port_list(port)?.0[0].start().to_owned();
                target = Some(Target::Tproxy {
                    on_ip,
                    on_port,
                    mark: None,
                });
                i = j + 2;
            }
            "accept" | "return" => {
                target.get_or_insert(match (socket, w[i].as_str()) {
                    (true, _) => Target::SocketDivert,
                    (false, "accept") => Target::Bypass,
                    (false, _) => Target::Return,
                });
                i += 1;
            }
            "jump" | "goto" => {
                let name = w.get(i + 1).ok_or("jump without a chain")?;
                target.get_or_insert(if socket {
                    Target::SocketDivert
                } else {
                    Target::Jump(format!("{table}/{name}"))
                });
                i += 2;
            }
            other => return Err(format!("`{other}` cannot be translated")),
        }
    }
    let target = match target {
        Some(Target::Tproxy { on_ip, on_port, .. }) => Target::Tproxy {
            on_ip,
            on_port,
            mark: set_mark,
        },
        Some(target) => target,
        // Only marking (part of a divert), or only counting.
        None if socket => Target::SocketDivert,
        None => Target::Ignore,
    };
    Ok((m, target))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's Documentation/networking/tproxy.rst, iptables version.
    pub const KERNEL_DOC_IPTABLES: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DIVERT - [0:0]
-A PREROUTING -p tcp -m socket -j DIVERT
-A PREROUTING -p tcp -m tcp --dport 80 -j TPROXY --on-port 50080 --on-ip 0.0.0.0 --tproxy-mark 0x1/0x1
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A DIVERT -j ACCEPT
COMMIT
";

    /// The same document's nft version, as `nft list ruleset` prints it.
    pub const KERNEL_DOC_NFT: &str = "\
table ip filter {
	chain divert {
		type filter hook prerouting priority mangle; policy accept;
		meta l4proto tcp socket transparent 1 meta mark set 0x00000001 accept
		tcp dport 80 tproxy to :50080 meta mark set 0x00000001 accept
	}
}
";

    #[test]
    fn the_kernel_documentation_iptables_example() {
        let t = translate(KERNEL_DOC_IPTABLES).unwrap();
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        assert!(t.config.contains("interfaces = \"all\""), "{}", t.config);
        assert!(t.config.contains("mark = \"0x1/0x1\""), "{}", t.config);
        assert!(
            t.config.contains("listen = [\"127.0.0.1:50080\"]"),
            "{}",
            t.config
        );
        assert!(t.config.contains("proto = [\"tcp\"]\ndst = [\"0.0.0.0/0\"]\nports = [80]\naction = \"steer\"\nlistener = \"tproxy-50080\""), "{}", t.config);
        assert!(
            t.notes.iter().any(|n| n.contains("DIVERT")),
            "{:?}",
            t.notes
        );
        let parsed: toml::Value = toml::from_str(&t.config).unwrap();
        assert_eq!(parsed["rule"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn the_kernel_documentation_nft_example() {
        let t = translate(KERNEL_DOC_NFT).unwrap();
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        assert!(
            t.config.contains("mark = \"0x1/0xffffffff\""),
            "{}",
            t.config
        );
        assert!(
            t.config.contains(
                "proto = [\"tcp\"]\ndst = [\"0.0.0.0/0\"]\nports = [80]\naction = \"steer\""
            ),
            "{}",
            t.config
        );
        assert_eq!(
            toml::from_str::<toml::Value>(&t.config).unwrap()["rule"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    const REALISTIC: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:PROXY - [0:0]
:DIVERT - [0:0]
[12:3456] -A PREROUTING -p tcp -m socket --transparent -j DIVERT
-A PREROUTING -i lan0 -j PROXY
-A PROXY -d 10.0.0.0/8 -j RETURN
-A PROXY -d 192.168.0.0/16 -p tcp -m multiport --dports 22,8000:8100 -j RETURN
-A PROXY -p tcp -m multiport --dports 80,443 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PROXY -p udp --dport 53 -s 192.168.1.0/24 -j TPROXY --on-port 15053 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
-A PROXY -p tcp -m addrtype --dst-type LOCAL -j RETURN
-A DIVERT -j MARK --set-mark 1
-A DIVERT -j ACCEPT
-A OUTPUT -p tcp --dport 80 -j MARK --set-mark 1
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT -p tcp --dport 22 -j ACCEPT
COMMIT
";

    #[test]
    fn a_realistic_rule_set_with_a_chain_bypasses_and_two_listeners() {
        let t = translate(REALISTIC).unwrap();
        let config: toml::Value = toml::from_str(&t.config).unwrap();
        assert_eq!(
            config["interfaces"].as_array().unwrap()[0].as_str(),
            Some("lan0")
        );
        assert_eq!(config["listener"].as_array().unwrap().len(), 2);
        let rules = config["rule"].as_array().unwrap();
        assert_eq!(rules.len(), 4, "{}", t.config);
        assert_eq!(rules[0]["action"].as_str(), Some("bypass"));
        assert_eq!(
            rules[0]["iface"].as_str(),
            Some("lan0"),
            "narrowed by the jump"
        );
        assert_eq!(rules[1]["ports"].as_array().unwrap().len(), 2);
        assert_eq!(
            rules[3]["src"].as_array().unwrap()[0].as_str(),
            Some("192.168.1.0/24")
        );
        // addrtype and the OUTPUT mark cannot be translated; they are named with their lines.
        assert_eq!(t.skipped.len(), 2, "{:?}", t.skipped);
        assert!(
            t.skipped[0].starts_with("line 11:") && t.skipped[0].contains("-m addrtype"),
            "{:?}",
            t.skipped
        );
        assert!(
            t.skipped
                .iter()
                .any(|s| s.starts_with("line 14:") && s.contains("OUTPUT")),
            "{:?}",
            t.skipped
        );
        assert!(
            t.notes.iter().any(|n| n.contains("1 rules outside")),
            "{:?}",
            t.notes
        );
    }

    /// Random matches: every earlier rule a later one overlaps and outranks (the rules the
    /// shadow check looks for) is among the index's candidates for it.
    #[test]
    fn the_shadow_index_finds_every_rule_that_can_shadow() {
        let mut seed = 0x5851_f42d_4c95_7f2du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let prefixes: Vec<IpNet> = [
            "0.0.0.0/0",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.2.3/32",
            "10.2.0.0/16",
            "192.168.7.0/24",
            "::/0",
            "2001:db8::/32",
            "2001:db8:1::/48",
            "2001:db8:1::5/128",
        ]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
        let random_match = |next: &mut dyn FnMut(u64) -> u64| {
            let dst: Vec<IpNet> = (0..next(4))
                .map(|_| prefixes[next(prefixes.len() as u64) as usize])
                .collect();
            let src: Vec<IpNet> = (0..next(2)).map(|_| prefixes[next(4) as usize]).collect();
            Match {
                transports: [vec![], vec![Transport::Tcp], vec![Transport::Udp]][next(3) as usize]
                    .clone(),
                dst,
                src,
                ports: [
                    vec![],
                    vec![Ports::One(80)],
                    vec![Ports::Range(70, 90)],
                    vec![Ports::One(443), Ports::One(80)],
                ][next(4) as usize]
                    .clone(),
                iface: [None, Some("eth0".to_string())][next(2) as usize].clone(),
                family: [None, Some(Family::V4), Some(Family::V6)][next(3) as usize],
            }
        };
        for _ in 0..300 {
            let matches: Vec<Match> = (0..1 + next(40)).map(|_| random_match(&mut next)).collect();
            let mut index = ShadowIndex::default();
            for (later, m) in matches.iter().enumerate() {
                let candidates = index.candidates(m, later);
                assert!(candidates.windows(2).all(|w| w[0] < w[1]));
                for (earlier, e) in matches[..later].iter().enumerate() {
                    if overlaps(e, m) && more_specific(m, e) {
                        assert!(
                            candidates.contains(&earlier),
                            "{e:?} can shadow {m:?} but is not a candidate"
                        );
                    }
                }
                index.add(m, later);
            }
        }
    }

    /// Thousands of rules for distinct destinations (a translated rule set's usual shape):
    /// none is compared with another, where each used to be compared with all earlier ones.
    #[test]
    fn rules_for_distinct_destinations_are_not_compared_with_each_other() {
        let mut index = ShadowIndex::default();
        let mut compared = 0;
        let rules = 20_000;
        for i in 0..rules {
            let dst = format!("10.{}.{}.{}/32", i / 62500, (i / 250) % 250, i % 250 + 1);
            let m = Match {
                transports: vec![Transport::Tcp],
                dst: vec![dst.parse().unwrap()],
                ports: vec![Ports::One(80)],
                family: Some(Family::V4),
                ..Match::default()
            };
            compared += index.candidates(&m, i).len();
            index.add(&m, i);
        }
        let broad = Match {
            dst: vec!["10.0.0.0/8".parse().unwrap()],
            family: Some(Family::V4),
            ..Match::default()
        };
        assert_eq!(compared, 0);
        assert!(index.candidates(&broad, rules).is_empty());
    }

    #[test]
    fn shadowed_rules_are_dropped_or_reported() {
        let input = "\
*mangle
-A PREROUTING -p tcp -d 10.0.0.0/8 -j RETURN
-A PREROUTING -p tcp -d 10.1.0.0/16 --dport 80 -j TPROXY --on-port 1234
-A PREROUTING -p tcp --dport 80 -j TPROXY --on-port 1234
-A PREROUTING -p tcp -d 10.0.0.0/9 -m multiport --dports 80,443 -j TPROXY --on-port 1234
COMMIT
";
        let t = translate(input).unwrap();
        assert!(
            t.notes
                .iter()
                .any(|n| n.contains("line 3") && n.contains("never matches")),
            "{:?}",
            t.notes
        );
        // 10.0.0.0/9 port 443 is shadowed by the RETURN, but port 80 outside 10/8? No: the /9
        // lies inside 10/8 entirely, so it is dropped too.
        assert!(
            t.notes.iter().any(|n| n.contains("line 5")),
            "{:?}",
            t.notes
        );
        let partial = "\
*mangle
-A PREROUTING -p tcp --dport 80 -s 192.0.2.0/24 -j RETURN
-A PREROUTING -p tcp -d 10.1.0.0/16 -j TPROXY --on-port 1234
COMMIT
";
        let t = translate(partial).unwrap();
        assert!(
            t.skipped
                .iter()
                .any(|s| s.starts_with("line 3:") && s.contains("line 2 comes first")),
            "{:?}",
            t.skipped
        );
    }

    #[test]
    fn what_cannot_be_translated_is_named() {
        let input = "\
*mangle
-A PREROUTING -p tcp ! -d 10.0.0.0/8 -j TPROXY --on-port 1
-A PREROUTING -p icmp -j RETURN
-A PREROUTING -p tcp -m mark --mark 0xff -j RETURN
-A PREROUTING -p tcp --dport 80 -j DROP
-A PREROUTING -p tcp --dport 81 -j TPROXY
COMMIT
";
        let t = translate(input).unwrap();
        let expected = [
            "line 2: -A PREROUTING -p tcp ! -d 10.0.0.0/8 -j TPROXY --on-port 1: negated",
            "line 3:",
            "line 4:",
            "line 5:",
            "line 6:",
        ];
        assert_eq!(t.skipped.len(), expected.len(), "{:?}", t.skipped);
        for (skipped, expected) in t.skipped.iter().zip(expected) {
            assert!(skipped.starts_with(expected), "{skipped}");
        }
        assert!(
            t.skipped[1].contains("icmp")
                && t.skipped[2].ends_with(": match `-m mark`")
                && t.skipped[3].contains("DROP")
                && t.skipped[4].contains("--on-port"),
            "{:?}",
            t.skipped
        );
    }

    #[test]
    fn a_match_after_the_target_is_named_as_a_match() {
        let input = "\
*mangle
-A PREROUTING -p tcp -j RETURN -m mark --mark 0xff
-A PREROUTING -p tcp -j TPROXY --on-port 1 -m comment --comment web
COMMIT
";
        let t = translate(input).unwrap();
        assert_eq!(t.skipped.len(), 1, "{:?}", t.skipped);
        assert!(
            t.skipped[0].ends_with(": match `-m mark`"),
            "{:?}",
            t.skipped
        );
    }

    #[test]
    fn an_nft_inet_rule_set_with_sets_and_bypasses() {
        let input = "\
table inet proxy {
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		ip daddr { 10.0.0.0/8, 192.168.0.0/16 } return
		meta l4proto { tcp, udp } socket transparent 1 meta mark set 0x00000001 accept
		iifname \"lan0\" meta l4proto tcp tproxy ip to 127.0.0.1:7000 meta mark set 0x00000001 accept
		iifname \"lan0\" udp dport 53 tproxy ip6 to [::1]:7053 meta mark set 0x00000001 accept
		fib daddr type local return
	}
	chain output {
		type route hook output priority mangle; policy accept;
		tcp dport 80 meta mark set 1
	}
}
";
        let t = translate(input).unwrap();
        let config: toml::Value = toml::from_str(&t.config).unwrap();
        let rules = config["rule"].as_array().unwrap();
        assert_eq!(rules.len(), 3, "{}", t.config);
        assert_eq!(rules[0]["dst"].as_array().unwrap().len(), 2);
        assert_eq!(
            rules[1]["dst"].as_array().unwrap()[0].as_str(),
            Some("0.0.0.0/0")
        );
        assert_eq!(
            rules[2]["dst"].as_array().unwrap()[0].as_str(),
            Some("::/0")
        );
        let listeners = config["listener"].as_array().unwrap();
        assert_eq!(
            listeners[0]["listen"].as_array().unwrap()[0].as_str(),
            Some("127.0.0.1:7000")
        );
        assert_eq!(
            listeners[1]["listen"].as_array().unwrap()[0].as_str(),
            Some("[::1]:7053")
        );
        assert_eq!(t.skipped.len(), 2, "{:?}", t.skipped);
        assert!(t.skipped[0].contains("`fib`"), "{:?}", t.skipped);
        assert!(t.skipped[1].contains("output"), "{:?}", t.skipped);
        assert!(
            t.config.contains("interfaces = \"all\""),
            "the bypass rule has no interface"
        );
    }

    #[test]
    fn a_return_that_falls_back_into_later_steering_rules_is_reported() {
        let input = "\
*mangle
:SKIP - [0:0]
-A PREROUTING -j SKIP
-A PREROUTING -p tcp --dport 80 -j TPROXY --on-port 1234
-A SKIP -d 10.0.0.0/8 -j RETURN
-A SKIP -d 192.168.0.0/16 -j ACCEPT
COMMIT
";
        let t = translate(input).unwrap();
        assert_eq!(t.skipped.len(), 1, "{:?}", t.skipped);
        assert!(
            t.skipped[0].starts_with("line 5:") && t.skipped[0].contains("RETURN goes back"),
            "{:?}",
            t.skipped
        );
        assert!(
            t.config.contains("dst = [\"192.168.0.0/16\"]"),
            "ACCEPT leaves for good: {}",
            t.config
        );
    }

    /// The rule set most proxy guides (v2ray, clash) hand out, as `iptables-save` prints it.
    #[test]
    fn a_proxy_guide_rule_set() {
        let input = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Fri Nov 27 07:00:00 2026
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DIVERT - [0:0]
:V2RAY - [0:0]
:V2RAY_MASK - [0:0]
-A PREROUTING -p tcp -m socket -j DIVERT
-A PREROUTING -j V2RAY
-A OUTPUT -j V2RAY_MASK
-A DIVERT -j MARK --set-xmark 0x1/0xffffffff
-A DIVERT -j ACCEPT
-A V2RAY -d 127.0.0.1/32 -j RETURN
-A V2RAY -d 224.0.0.0/4 -j RETURN
-A V2RAY -d 255.255.255.255/32 -j RETURN
-A V2RAY -d 192.168.0.0/16 -p tcp -j RETURN
-A V2RAY -d 192.168.0.0/16 -p udp -m udp ! --dport 53 -j RETURN
-A V2RAY -m mark --mark 0xff -j RETURN
-A V2RAY -p udp -j TPROXY --on-port 12345 --on-ip 127.0.0.1 --tproxy-mark 0x1/0xffffffff
-A V2RAY -p tcp -j TPROXY --on-port 12345 --on-ip 127.0.0.1 --tproxy-mark 0x1/0xffffffff
-A V2RAY_MASK -d 224.0.0.0/4 -j RETURN
-A V2RAY_MASK -p tcp -j MARK --set-xmark 0x1/0xffffffff
COMMIT
# Completed on Fri Nov 27 07:00:00 2026
";
        let t = translate(input).unwrap();
        let config: toml::Value = toml::from_str(&t.config).unwrap();
        let rules = config["rule"].as_array().unwrap();
        let actions: Vec<&str> = rules
            .iter()
            .map(|r| r["action"].as_str().unwrap())
            .collect();
        assert_eq!(
            actions,
            ["bypass", "bypass", "bypass", "bypass", "steer", "steer"],
            "{}",
            t.config
        );
        assert_eq!(config["mark"].as_str(), Some("0x1/0xffffffff"));
        assert_eq!(
            config["listener"][0]["listen"][0].as_str(),
            Some("127.0.0.1:12345")
        );
        let lines: Vec<&str> = t
            .skipped
            .iter()
            .map(|s| s.split(':').next().unwrap())
            .collect();
        assert_eq!(lines, ["line 20", "line 21", "line 13"], "{:?}", t.skipped);
    }

    #[test]
    fn nft_named_sets_are_resolved() {
        let input = "\
table inet clash {
	set local_ipv4 {
		type ipv4_addr
		flags interval
		elements = { 10.0.0.0/8, 127.0.0.0/8,
			     192.168.0.0/16 }
	}
	set dns_ports {
		type inet_service
		elements = { 53, 5353 }
	}
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta nfproto ipv4 ip daddr @local_ipv4 return
		udp dport @dns_ports tproxy ip to 127.0.0.1:1053 meta mark set 0x00000001 accept
		ip daddr @nowhere return
	}
}
";
        let t = translate(input).unwrap();
        let config: toml::Value = toml::from_str(&t.config).unwrap();
        let rules = config["rule"].as_array().unwrap();
        assert_eq!(rules[0]["dst"].as_array().unwrap().len(), 3, "{}", t.config);
        assert_eq!(
            rules[1]["ports"].as_array().unwrap().len(),
            2,
            "{}",
            t.config
        );
        assert_eq!(t.skipped.len(), 1, "{:?}", t.skipped);
        assert!(
            t.skipped[0].contains("set @nowhere is not defined"),
            "{:?}",
            t.skipped
        );
    }

    #[test]
    fn input_of_neither_kind_is_refused() {
        let error = translate("hello\n").unwrap_err();
        assert!(error.to_string().contains("neither"), "{error}");
    }
}
