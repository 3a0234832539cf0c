//! The configuration file: its listeners and rules as written, turned into checked
//! listeners and split rules, and its errors located (file, line, column and field).

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use serde::Deserialize;
use tproxy_common::local_origin::{ClassidRange, UidRange};

use super::{
    any_destination, default_listen,
    settings::ConfigFile,
    text::{Destinations, GidRange, List, MarkMatch, RuleAction, Text},
    ListenerConfig,
};
use crate::{
    datapath::rules::Protocol,
    datapath::{
        local_origin::LocalOrigin,
        rules::{self, Action, CtDirection, Origin, Ports, Rule},
    },
};

/// Where a span of the file is, for error messages.
pub(super) type At<'a> = &'a dyn Fn(std::ops::Range<usize>) -> Location;

/// A position in the configuration file, for error messages.
/// The `[[rule]]`s split (see [`ConfigFile::rules`]).
#[derive(Default)]
pub(super) struct SplitRules {
    /// For fixed destinations.
    pub fixed: Vec<Rule>,
    /// For the host's own addresses, with any destination of their family.
    pub own_addresses: Vec<Rule>,
    /// For the anycast destinations, with any destination of their family.
    pub anycast: Vec<Rule>,
    /// For kernel ipsets' entries, with any destination of each family.
    pub ipset: Vec<Rule>,
    /// The set each of `ipset`'s rules follows, by rule number.
    pub ipset_names: BTreeMap<usize, String>,
}

pub(super) struct Location {
    file: PathBuf,
    pub(super) line: usize,
    pub(super) column: usize,
}

impl Location {
    pub(super) fn new(file: &Path, lines: &LineStarts, span: std::ops::Range<usize>) -> Self {
        let offset = span.start.min(lines.text_len);
        // Line starts at or before the offset: one per line up to and including its own.
        let line = lines.starts.partition_point(|&start| start <= offset);
        let column = offset - lines.starts[line - 1] + 1;
        Location {
            file: file.to_owned(),
            line,
            column,
        }
    }
}

/// Where each line of the file starts. Every rule carries its location, and scanning the
/// text for each one made loading quadratic in the number of rules.
pub(super) struct LineStarts {
    starts: Vec<usize>,
    text_len: usize,
}

impl LineStarts {
    pub(super) fn new(text: &str) -> Self {
        let after_newlines = text.match_indices('\n').map(|(i, _)| i + 1);
        LineStarts {
            starts: std::iter::once(0).chain(after_newlines).collect(),
            text_len: text.len(),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// Parses the file; syntax and type errors name the line, column and field.
pub(super) fn parse_file(path: &Path, text: &str) -> Result<ConfigFile> {
    toml::from_str(text).map_err(|error| {
        let span = error.span().unwrap_or(0..0);
        let at = Location::new(path, &LineStarts::new(text), span.clone());
        let field = field_at(text, span.start);
        let message = error.message().trim_end();
        match field {
            Some(field) => anyhow::anyhow!("{at}: {field}: {message}"),
            None => anyhow::anyhow!("{at}: {message}"),
        }
    })
}

/// The dotted name of the field whose value starts at `offset`, like `rule[2].ports`, worked
/// out from the text (toml reports a span, not a path).
fn field_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = &text[line_start..];
    let line = &line[..line.find('\n').unwrap_or(line.len())];
    let key = line
        .split_once('=')
        .map(|(key, _)| key.trim())
        .filter(|key| !key.starts_with('['))?;
    let mut table = None;
    let mut counts: std::collections::HashMap<&str, usize> = Default::default();
    for header in text[..line_start].lines().map(str::trim) {
        if let Some(name) = header.strip_prefix("[[").and_then(|h| h.split("]]").next()) {
            let count = counts.entry(name.trim()).or_default();
            *count += 1;
            table = Some(format!("{}[{}]", name.trim(), count));
        } else if let Some(name) = header.strip_prefix('[').and_then(|h| h.split(']').next()) {
            table = Some(name.trim().to_string());
        }
    }
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key.to_string(),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
/// A `[[listener]]` as written.
pub(super) struct ListenerEntry {
    name: toml::Spanned<String>,
    listen: Option<List<SocketAddr>>,
    upstream: Option<Text<SocketAddr>>,
    external: Option<List<SocketAddr>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
/// A `[[rule]]` as written.
pub(super) struct RuleEntry {
    proto: List<Protocol>,
    dst: Option<Destinations>,
    ports: Option<List<Ports>>,
    /// The source ports (default: any).
    sport: Option<List<Ports>>,
    src: Option<List<IpNet>>,
    iface: Option<String>,
    /// For local connections: the interface (name or pattern) the route to the destination
    /// must leave by.
    out_interface: Option<String>,
    mark: Option<Text<MarkMatch>>,
    /// The direction of its connection the packet travels in (`"original"` or `"reply"`;
    /// default: either): an arrival's as conntrack has it, a local datagram's as the local
    /// programs follow it.
    ct_direction: Option<Text<CtDirection>>,
    action: Text<RuleAction>,
    listener: Option<toml::Spanned<String>>,
    /// `forwarded` (the default), `local` or `any`.
    origin: Option<Text<Origin>>,
    /// For local connections: the cgroup v2 paths whose processes (and their descendants')
    /// the rule applies to (default: every process).
    cgroup: Option<toml::Spanned<List<String>>>,
    /// For local connections: the users whose processes it applies to (default: every one).
    uid: Option<toml::Spanned<List<UidRange>>>,
    /// For local connections: the cgroup v1 net_cls class ids (or ranges) whose processes
    /// it applies to (default: every process).
    classid: Option<toml::Spanned<List<ClassidRange>>>,
    /// For local connections: the groups (real group ids) whose processes it applies to
    /// (default: every group).
    gid: Option<toml::Spanned<List<GidRange>>>,
}

impl ConfigFile {
    /// The `[[listener]]`s, checked.
    pub(super) fn listeners(&self, at: At) -> Result<Vec<ListenerConfig>> {
        let mut listeners: Vec<ListenerConfig> = Vec::new();
        for entry in &self.listeners {
            let name = entry.get_ref().name.get_ref();
            let where_ = at(entry.get_ref().name.span());
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                bail!("{where_}: listener.name: `{name}` is not a valid name (letters, digits, `-` and `_`)");
            }
            if listeners.iter().any(|l| &l.name == name) {
                bail!("{where_}: listener.name: a listener named `{name}` is already defined");
            }
            let external = match &entry.get_ref().external {
                None => None,
                Some(List(addrs)) => Some(super::external::of_entry(
                    name,
                    entry.get_ref().listen.is_some() || entry.get_ref().upstream.is_some(),
                    addrs,
                    &where_,
                )?),
            };
            let listen = match &external {
                Some(_) => Vec::new(),
                None => entry
                    .get_ref()
                    .listen
                    .as_ref()
                    .map_or_else(default_listen, |List(addrs)| addrs.clone()),
            };
            if listen.iter().filter(|a| a.is_ipv4()).count() > 1
                || listen.iter().filter(|a| a.is_ipv6()).count() > 1
            {
                bail!(
                    "{where_}: listener `{name}`: listen: at most one address per address family"
                );
            }
            listeners.push(ListenerConfig {
                name: name.clone(),
                listen,
                upstream: entry.get_ref().upstream.as_ref().map(|Text(addr)| *addr),
                tcp: false,
                udp: false,
                external,
            });
        }
        Ok(listeners)
    }

    /// The `[[rule]]`s, each split into single-prefix, single-port-spec rules; apart, those
    /// for the host's own addresses (`dst = "local"`), those for anycast routes (`dst =
    /// "anycast"`) and those for ipsets (`dst = "ipset:NAME"`), with any destination of
    /// their family in place of what they follow.
    pub(super) fn rules(&self, listeners: &[ListenerConfig], at: At) -> Result<SplitRules> {
        let mut split_rules = SplitRules::default();
        for (i, spanned) in self.rules.iter().enumerate() {
            let entry = spanned.get_ref();
            let split = entry.split(i + 1, at(spanned.span()), listeners, at)?;
            match entry.dst {
                Some(Destinations::Local { .. }) => split_rules.own_addresses.extend(split),
                Some(Destinations::Anycast { .. }) => split_rules.anycast.extend(split),
                Some(Destinations::Ipset(ref name)) => {
                    split_rules.ipset_names.insert(i + 1, name.clone());
                    split_rules.ipset.extend(split)
                }
                _ => split_rules.fixed.extend(split),
            }
        }
        Ok(split_rules)
    }

    /// The processes each rule for local connections selects, by rule number.
    pub(super) fn local_selections(&self, at: At) -> Result<Vec<(usize, LocalOrigin)>> {
        let mut found = Vec::new();
        for (i, entry) in self.rules.iter().enumerate() {
            let number = i + 1;
            if let Some(selection) = entry.get_ref().selection(number, at)? {
                found.push((number, selection));
            }
        }
        Ok(found)
    }
}

impl RuleEntry {
    fn origin(&self) -> Origin {
        self.origin
            .as_ref()
            .map_or(Origin::Forwarded, |Text(origin)| *origin)
    }

    /// The processes rule `number` selects, when it is for local connections.
    fn selection(&self, number: usize, at: At) -> Result<Option<LocalOrigin>> {
        if !self.origin().local() {
            let given = [
                ("cgroup", self.cgroup.as_ref().map(|c| c.span())),
                ("uid", self.uid.as_ref().map(|u| u.span())),
                ("classid", self.classid.as_ref().map(|c| c.span())),
                ("gid", self.gid.as_ref().map(|g| g.span())),
            ];
            if let Some((field, Some(span))) = given.into_iter().find(|(_, span)| span.is_some()) {
                // Such a rule cannot be for local connections: a connect is only steered or
                // left alone.
                let arrivals_only = match self.action.0 {
                    RuleAction::Drop => Some("drop"),
                    RuleAction::Deliver => Some("deliver"),
                    RuleAction::Reject => Some("reject"),
                    RuleAction::Steer | RuleAction::Bypass => None,
                };
                if let Some(action) = arrivals_only {
                    bail!(
                        "{}: rule[{number}].{field}: a {action} rule is for arrivals, which no \
                         process selection takes; remove `{field}`",
                        at(span)
                    );
                }
                bail!(
                    "{}: rule[{number}].{field}: only a rule for local connections selects \
                     processes; add `origin = \"local\"` (or \"any\")",
                    at(span)
                );
            }
            return Ok(None);
        }
        let cgroups = match &self.cgroup {
            None => Vec::new(),
            Some(list) if list.get_ref().0.is_empty() => bail!(
                "{}: rule[{number}].cgroup: an empty list selects no process; leave `cgroup` \
                 out to select every process",
                at(list.span())
            ),
            Some(list) => list.get_ref().0.clone(),
        };
        let uids = match &self.uid {
            None => Vec::new(),
            Some(list) if list.get_ref().0.is_empty() => bail!(
                "{}: rule[{number}].uid: an empty list selects no user; leave `uid` out to \
                 select every user",
                at(list.span())
            ),
            Some(list) => list.get_ref().0.clone(),
        };
        let classids = match &self.classid {
            None => Vec::new(),
            Some(list) if list.get_ref().0.is_empty() => bail!(
                "{}: rule[{number}].classid: an empty list selects no process; leave `classid` \
                 out to select processes of every net_cls class",
                at(list.span())
            ),
            Some(list) => list.get_ref().0.clone(),
        };
        let gids = match &self.gid {
            None => Vec::new(),
            Some(list) if list.get_ref().0.is_empty() => bail!(
                "{}: rule[{number}].gid: an empty list selects no group; leave `gid` out to \
                 select every group",
                at(list.span())
            ),
            Some(list) => list.get_ref().0.clone(),
        };
        Ok(Some(
            LocalOrigin::new(cgroups, uids)
                .with_classids(classids)
                .with_gids(gids)
                .with_out_interface(self.out_interface.clone()),
        ))
    }

    /// What the rule does: bypass, drop, reject, deliver, or steer to the index of its listener.
    fn action(
        &self,
        number: usize,
        where_: &Location,
        listeners: &[ListenerConfig],
        at: At,
    ) -> Result<Action> {
        // A rule that steers nowhere names no listener; `why` says where its packets go.
        let steers_nowhere = |action: Action, why: &str| -> Result<Action> {
            if let Some(listener) = &self.listener {
                bail!(
                    "{}: rule[{number}].listener: a {action} rule steers nowhere{why}; remove \
                     `listener = \"{}\"`",
                    at(listener.span()),
                    listener.get_ref()
                );
            }
            Ok(action)
        };
        Ok(match self.action.0 {
            RuleAction::Bypass => steers_nowhere(Action::Bypass, "")?,
            RuleAction::Drop => steers_nowhere(Action::Drop, "")?,
            RuleAction::Reject => {
                steers_nowhere(Action::Reject, " (tproxy answers the packet itself)")?
            }
            RuleAction::Deliver => {
                steers_nowhere(Action::Deliver, " (the kernel finds the packet's socket)")?
            }
            RuleAction::Steer => {
                let index = match &self.listener {
                    Some(name) => listeners.iter().position(|l| &l.name == name.get_ref()).with_context(|| {
                        let known: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
                        format!(
                            "{}: rule[{number}].listener: no listener named `{}` (defined: {})",
                            at(name.span()),
                            name.get_ref(),
                            if known.is_empty() { "none".to_string() } else { known.join(", ") }
                        )
                    })?,
                    None if listeners.len() == 1 => 0,
                    None => bail!("{where_}: rule[{number}]: a steer rule needs `listener = \"NAME\"` when there is not exactly one [[listener]]"),
                };
                Action::Steer(index as u32)
            }
        })
    }

    /// Rule `number` split into one rule per protocol, destination, source and port spec
    /// (destination and source).
    fn split(
        &self,
        number: usize,
        where_: Location,
        listeners: &[ListenerConfig],
        at: At,
    ) -> Result<Vec<Rule>> {
        let action = self.action(number, &where_, listeners, at)?;
        let sources: Vec<Option<IpNet>> = match &self.src {
            Some(List(prefixes)) if !prefixes.is_empty() => prefixes.iter().copied().map(Some).collect(),
            Some(_) => bail!("{where_}: rule[{number}].src: an empty list matches nothing; leave `src` out to match every source"),
            None => vec![None],
        };
        let dsts = match &self.dst {
            Some(Destinations::Prefixes(prefixes)) if !prefixes.is_empty() => prefixes.clone(),
            Some(Destinations::Prefixes(_)) => bail!("{where_}: rule[{number}].dst: an empty list matches nothing; leave `dst` out to match every destination"),
            Some(Destinations::Local { .. }) if matches!(action, Action::Drop | Action::Deliver | Action::Reject) => bail!("{where_}: rule[{number}].dst: \"local\" (the host's own addresses) is for bypass and steer rules"),
            Some(Destinations::Anycast { .. }) if action != Action::Bypass => bail!("{where_}: rule[{number}].dst: \"anycast\" (the anycast destinations) is for bypass rules"),
            // Each destination takes the place of its family's (see
            // `Config::set_anycast_destinations`).
            Some(Destinations::Anycast { ipv4, ipv6 }) => of_families(*ipv4, *ipv6, &sources),
            // Each entry takes the place of its family's destination (see
            // `Config::set_ipset_entries`).
            Some(Destinations::Ipset(_)) => {
                let families: HashSet<bool> = sources.iter().flatten().map(|s| s.addr().is_ipv6()).collect();
                any_destination().into_iter().filter(|d| families.is_empty() || families.contains(&d.addr().is_ipv6())).collect()
            }
            // Each address takes the place of its family's destination (see
            // `Config::set_own_addresses`).
            Some(Destinations::Local { ipv4, ipv6 }) => of_families(*ipv4, *ipv6, &sources),
            None => {
                // Without a destination, the families of the sources (if any) decide.
                let families: HashSet<bool> = sources.iter().flatten().map(|s| s.addr().is_ipv6()).collect();
                any_destination().into_iter().filter(|d| families.is_empty() || families.contains(&d.addr().is_ipv6())).collect()
            }
        };
        if dsts.is_empty() {
            bail!("{where_}: rule[{number}].dst: a family's own or anycast destinations with sources of the other family match nothing");
        }
        let ports = match &self.ports {
            Some(List(ports)) if !ports.is_empty() => ports.clone(),
            Some(_) => bail!("{where_}: rule[{number}].ports: an empty list matches nothing; leave `ports` out to match every port"),
            None => vec![Ports::Any],
        };
        let sports: Vec<Option<Ports>> = match &self.sport {
            Some(List(ports)) if !ports.is_empty() => ports.iter().copied().map(Some).collect(),
            Some(_) => bail!("{where_}: rule[{number}].sport: an empty list matches nothing; leave `sport` out to match every source port"),
            None => vec![None],
        };
        if self.proto.0.is_empty() {
            bail!("{where_}: rule[{number}].proto: give \"tcp\", \"udp\" or [\"tcp\", \"udp\"] (and \"other\": every other IP protocol)");
        }
        if let Some(twice) = self
            .proto
            .0
            .iter()
            .enumerate()
            .find_map(|(i, p)| self.proto.0[..i].contains(p).then_some(p))
        {
            bail!(
                "{where_}: rule[{number}].proto: \"{}\" is listed twice",
                twice.name()
            );
        }
        let mut rules = Vec::new();
        for &protocol in &self.proto.0 {
            for &dst in &dsts {
                for &src in &sources {
                    if src.is_some_and(|s| s.addr().is_ipv6() != dst.addr().is_ipv6()) {
                        continue;
                    }
                    for (&ports, &sport) in ports
                        .iter()
                        .flat_map(|p| sports.iter().map(move |s| (p, s)))
                    {
                        let rule = Rule {
                            protocol,
                            dst,
                            ports,
                            sport,
                            src,
                            iface: self.iface.clone(),
                            mark: self.mark.as_ref().map(|Text(mark)| *mark),
                            action,
                            number,
                            retired: false,
                            origin: self.origin(),
                            selection: 0,
                            out_iface: self.out_interface.clone(),
                            ct_direction: self.ct_direction.as_ref().map(|Text(d)| *d),
                        };
                        rules::check_families(&rule)
                            .and_then(|()| rules::check_origin(&rule))
                            .and_then(|()| rules::check_protocol(&rule))
                            .map_err(|e| anyhow::anyhow!("{where_}: rule[{number}]: {e}"))?;
                        rules.push(rule);
                    }
                }
            }
        }
        if rules.is_empty() {
            bail!("{where_}: rule[{number}]: its src and dst prefixes are of different address families, so it can never match");
        }
        Ok(rules)
    }
}

/// Any destination of the families named (IPv4, IPv6) that sources of `sources` (if any)
/// can reach.
fn of_families(ipv4: bool, ipv6: bool, sources: &[Option<IpNet>]) -> Vec<IpNet> {
    let families: HashSet<bool> = sources
        .iter()
        .flatten()
        .map(|s| s.addr().is_ipv6())
        .collect();
    any_destination()
        .into_iter()
        .filter(|d| if d.addr().is_ipv6() { ipv6 } else { ipv4 })
        .filter(|d| families.is_empty() || families.contains(&d.addr().is_ipv6()))
        .collect()
}
