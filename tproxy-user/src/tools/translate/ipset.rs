//! The sets that iptables rules name with `-m set --match-set NAME dst|src`. Those whose
//! entries `ipset save` output gives (`--ipset-file`) translate into their prefixes, read
//! as they were saved (tproxy does not follow later changes to them). Those it does not
//! give, or gives without entries (a set that dnsmasq fills as names resolve is empty when
//! the rules are saved), become `dst = "ipset:NAME"`: tproxy reads the kernel's set while
//! it runs and follows its changes.

use std::collections::HashMap;

use anyhow::{bail, Result};
use ipnet::IpNet;

use super::{Family, Match};
use crate::values::parse_prefix;

/// The sets by name: their prefixes, or why rules naming the set cannot be translated.
pub(super) type IpSets = HashMap<String, Result<Vec<IpNet>, String>>;

/// What a set is being read as.
struct Reading {
    prefixes: Result<Vec<IpNet>, String>,
    /// `hash:ip`'s `netmask`: its entries stand for prefixes of this length.
    netmask: Option<u8>,
}

/// Reads `ipset save` output; refuses lines it cannot make sense of, naming them.
pub(super) fn parse(text: &str) -> Result<IpSets> {
    let mut sets: HashMap<String, Reading> = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["create", name, kind, options @ ..] => {
                let option = |key: &str| {
                    options
                        .iter()
                        .position(|w| *w == key)
                        .and_then(|i| options.get(i + 1))
                };
                let netmask = match option("netmask").map(|n| n.parse::<u8>()) {
                    None => None,
                    Some(Ok(len)) => Some(len),
                    Some(Err(_)) => bail!("--ipset-file line {}: a bad netmask", number + 1),
                };
                let prefixes = match *kind {
                    "hash:net" | "hash:ip" => Ok(Vec::new()),
                    other => Err(format!(
                        "set {name} is of type {other}; translate reads hash:net and hash:ip sets"
                    )),
                };
                sets.insert(name.to_string(), Reading { prefixes, netmask });
            }
            ["add", name, element, options @ ..] => {
                let Some(set) = sets.get_mut(*name) else {
                    bail!(
                        "--ipset-file line {}: `{line}` adds to set {name}, which no `create` line \
                         made",
                        number + 1
                    );
                };
                let Ok(prefixes) = &mut set.prefixes else {
                    continue;
                };
                if options.contains(&"nomatch") {
                    set.prefixes = Err(format!(
                        "set {name} has `nomatch` entries (exceptions), which translate does not \
                         read"
                    ));
                    continue;
                }
                let prefix = parse_prefix(element).map_err(|e| {
                    anyhow::anyhow!("--ipset-file line {}: `{line}`: {e}", number + 1)
                })?;
                let prefix = match set.netmask {
                    Some(len) => {
                        IpNet::new(prefix.addr(), len)
                            .map(|p| p.trunc())
                            .map_err(|_| {
                                anyhow::anyhow!("--ipset-file line {}: a bad netmask", number + 1)
                            })?
                    }
                    None => prefix,
                };
                prefixes.push(prefix);
            }
            _ => {}
        }
    }
    Ok(sets
        .into_iter()
        .map(|(name, reading)| (name, reading.prefixes))
        .collect())
}

/// `--match-set NAME FLAGS` (after a `!` when `negated`): the set's prefixes as the rule's
/// destinations or sources, or those it excludes; or, for a set that `--ipset-file` does not
/// give or gives without entries (a set filled at run time, by dnsmasq for instance, looks
/// so when saved), the set itself as the rule's destinations, which tproxy follows while it
/// runs (`dst = "ipset:NAME"`). Whether the rule's place among the others survives tproxy's
/// precedence for any entries the set may hold is `emit`'s to check.
pub(super) fn match_set(
    m: &mut Match,
    sets: &IpSets,
    name: &str,
    flags: &str,
    negated: bool,
) -> Result<(), String> {
    let prefixes = match sets.get(name) {
        None => return follow_set(m, name, flags, negated),
        Some(Ok(prefixes)) if prefixes.is_empty() => return follow_set(m, name, flags, negated),
        Some(Err(why)) => return Err(why.clone()),
        Some(Ok(prefixes)) => prefixes,
    };
    let prefixes: Vec<IpNet> = prefixes
        .iter()
        .copied()
        .filter(|p| match m.family {
            Some(Family::V4) => p.addr().is_ipv4(),
            Some(Family::V6) => p.addr().is_ipv6(),
            None => true,
        })
        .collect();
    if prefixes.is_empty() && !negated {
        return Err(format!(
            "set {name} holds no entry of the rule's address family as saved"
        ));
    }
    let (positive, excluded) = match flags {
        "dst" => (&mut m.dst, &mut m.not_dst),
        "src" => (&mut m.src, &mut m.not_src),
        other => {
            return Err(format!(
                "`--match-set {name} {other}`: translate reads a set of addresses matched with \
                 `dst` or `src`"
            ))
        }
    };
    if negated {
        excluded.extend(prefixes);
    } else if positive.is_empty() {
        *positive = prefixes;
    } else {
        return Err(format!(
            "set {name} and a prefix on the same {flags}: translate does not intersect them"
        ));
    }
    Ok(())
}

/// `--match-set NAME dst` of a set whose entries are not given: the rule's destinations are
/// the set's, followed while tproxy runs. Only a positive match on destinations is.
fn follow_set(m: &mut Match, name: &str, flags: &str, negated: bool) -> Result<(), String> {
    let unknown = "its entries are not given (an `ipset save` with them, --ipset-file, \
                   translates into their prefixes as saved)";
    if negated {
        return Err(format!(
            "`! --match-set {name}`: {unknown}, and tproxy follows a set only as a rule's \
             destinations, not as an exclusion"
        ));
    }
    if flags != "dst" {
        return Err(format!(
            "`--match-set {name} {flags}`: {unknown}, and tproxy follows a set only as a \
             rule's destinations (`--match-set {name} dst`)"
        ));
    }
    if !m.dst.is_empty() || m.dst_set.is_some() {
        return Err(format!(
            "set {name} and another destination match: translate does not intersect them"
        ));
    }
    if !name.is_empty()
        && name.len() < 32
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        m.dst_set = Some(name.to_string());
        Ok(())
    } else {
        Err(format!("`{}` is not an ipset name", name.escape_debug()))
    }
}
