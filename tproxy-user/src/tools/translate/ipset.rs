//! `ipset save` output (`--ipset-file`): the contents of the sets that iptables rules name
//! with `-m set --match-set NAME dst|src`, so that those rules translate into the sets'
//! prefixes. The sets are read as they were saved: tproxy does not follow later changes
//! (a set that dnsmasq fills as names resolve does not translate).

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
/// destinations or sources, or those it excludes.
pub(super) fn match_set(
    m: &mut Match,
    sets: &IpSets,
    name: &str,
    flags: &str,
    negated: bool,
) -> Result<(), String> {
    let prefixes = match sets.get(name) {
        None if sets.is_empty() => {
            return Err(format!(
                "`-m set` (set {name}): give the sets with --ipset-file (`ipset save` output)"
            ))
        }
        None => return Err(format!("set {name} is not in the --ipset-file")),
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
            "set {name} holds no entry of the rule's address family as saved (one filled at run \
             time, by dnsmasq for instance, cannot be translated)"
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
