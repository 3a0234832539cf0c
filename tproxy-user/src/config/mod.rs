//! The configuration: a TOML file, command-line flags, or both, turned into one checked
//! [`Config`] before anything touches the system.
//!
//! How they combine: the file is read first; a setting given as a flag replaces the file's
//! (`--iface` replaces the whole interface list); `--tcp`/`--udp` (with `--dst`, `--listen`,
//! `--upstream`) add a listener named `default` and rules steering to it, after the file's
//! rules. Every error names where the bad value came from: the flag, or the file, line,
//! column and field.
//!
//! The settings are listed once, in [`settings`]; the file's listeners and rules are read in
//! `file`, its values in `text`; `check` holds what is refused across them.

mod args;
mod check;
mod describe;
mod external;
mod file;
pub mod settings;
#[cfg(test)]
mod tests;
mod text;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;

pub use args::RunArgs;
pub use external::External;
pub use settings::{SettingFlags, Settings};
pub use text::{with_families, ANYCAST, LOCAL};

pub use crate::datapath::interfaces::Interfaces;
use crate::{
    datapath::rules::Protocol,
    datapath::{
        interfaces::host_addresses,
        local_origin::{LocalOrigin, LocalSelections},
        routing::anycast_destinations,
        rules::{Action, CtDirection, Origin, Ports, Rule},
    },
};
use file::{parse_file, LineStarts, Location};
use settings::ConfigFile;

/// Name of the listener that `--tcp`/`--udp` steer to.
pub const DEFAULT_LISTENER: &str = "default";

/// A named listener: its sockets' addresses and where its relay connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    /// At most one address per family; port 0 picks a free port shared by the addresses.
    pub listen: Vec<SocketAddr>,
    /// `None`: each flow's original destination.
    pub upstream: Option<SocketAddr>,
    /// Whether any rule steers TCP / UDP to it (only those sockets are created).
    pub tcp: bool,
    pub udp: bool,
    /// `Some`: a proxy tproxy does not own listens there; `listen` is empty and nothing is
    /// bound or relayed for it.
    pub external: Option<External>,
}

/// Whether connecting to `target` would reach one of our own `listeners` (a wildcard
/// listener is reached at any address on its port): relaying there would loop forever.
pub(crate) fn reaches_own_listener(listeners: &[SocketAddr], target: SocketAddr) -> bool {
    // A mapped address is the IPv4 one; a connection to the unspecified address goes to a
    // loopback one (the kernel takes it for 127.0.0.1 or ::1).
    let target_ip = target.ip().to_canonical();
    listeners.iter().any(|listener| {
        let listener_ip = listener.ip().to_canonical();
        listener.port() == target.port()
            && (listener_ip == target_ip
                || listener_ip.is_unspecified()
                || (target_ip.is_unspecified() && listener_ip.is_loopback()))
    })
}

/// Everything `tproxy run` needs to know, checked.
#[derive(Clone, Debug)]
pub struct Config {
    pub settings: Settings,
    pub listeners: Vec<ListenerConfig>,
    /// Rules split into single-prefix, single-port-spec rules; `Action::Steer` holds an index
    /// into `listeners`.
    pub rules: Vec<Rule>,
    /// Number of rules as configured (before splitting).
    pub configured_rules: usize,
    /// The bypass rules for the host's own addresses (`dst = "local"`), with any
    /// destination of their family in place of the addresses: `rules` holds them once per
    /// address of [`Config::own_addresses`].
    pub own_address_rules: Vec<Rule>,
    /// The host's addresses as last listed (sorted).
    pub own_addresses: Vec<IpAddr>,
    /// The bypass rules for the anycast destinations (`dst = "anycast"`), with any
    /// destination of their family in place of them: `rules` holds them once per prefix of
    /// [`Config::anycast_destinations`].
    pub anycast_rules: Vec<Rule>,
    /// The destinations the kernel gives the type anycast, as last listed from the routes
    /// (sorted).
    pub anycast_destinations: Vec<IpNet>,
    /// The rules for kernel ipsets' entries (`dst = "ipset:NAME"`), with any destination of
    /// each family in place of the entries: `rules` holds them once per entry of their set
    /// in [`Config::ipset_entries`].
    pub ipset_rules: Vec<Rule>,
    /// The set each of `ipset_rules` follows, by rule number.
    pub ipset_names: BTreeMap<usize, String>,
    /// Each followed set's entries as last read (sorted), by name.
    pub ipset_entries: BTreeMap<String, Vec<IpNet>>,
    /// The sets of local processes the rules for local connections (origin `local` or
    /// `any`) apply to, each rule's by its `selection`; `None` when no rule is for them.
    pub local: Option<LocalSelections>,
    /// Whether `socket_mark` was given (flag or file), not left to its default: the
    /// operator's word that an external proxy marks its sockets with it (see `check`).
    pub socket_mark_given: bool,
}

/// Puts in `rules` one rule of each of `templates` per destination of its family, in place
/// of the rules made of them before.
fn put_followed(rules: &mut Vec<Rule>, templates: &[Rule], destinations: &[IpNet]) {
    let numbers: HashSet<usize> = templates.iter().map(|r| r.number).collect();
    rules.retain(|rule| !numbers.contains(&rule.number));
    for template in templates {
        let family = destinations
            .iter()
            .filter(|dst| dst.addr().is_ipv6() == template.dst.addr().is_ipv6());
        rules.extend(family.map(|&dst| Rule {
            dst,
            ..template.clone()
        }));
    }
}

/// Default listener addresses: loopback, so nothing can connect to them directly.
pub fn default_listen() -> Vec<SocketAddr> {
    vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()]
}

impl Config {
    /// The configuration `run --config FILE` would use with no other flag, checked.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::build(&RunArgs {
            config: Some(path.to_owned()),
            ..RunArgs::default()
        })
    }

    /// The configuration `run` would use: the file named by `--config` (if any) and the
    /// flags, checked. `check` calls it too, so what it accepts `run` accepts (up to what
    /// only the system can tell: interfaces that exist, addresses that are free).
    pub fn build(args: &RunArgs) -> Result<Self> {
        let text = match &args.config {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
            None => String::new(),
        };
        let mut config = Self::from_text(args, &text)?;
        if !config.own_address_rules.is_empty() {
            config.set_own_addresses(
                host_addresses().context("listing the host's addresses for dst = \"local\"")?,
            );
        }
        if !config.anycast_rules.is_empty() {
            config.set_anycast_destinations(
                anycast_destinations(config.anycast_families())
                    .context("listing the anycast routes for dst = \"anycast\"")?,
            );
        }
        for name in config.followed_ipsets() {
            let entries = crate::datapath::ipset::set_prefixes(&name)
                .with_context(|| format!("dst = \"ipset:{name}\""))?;
            config.set_ipset_entries(&name, entries);
        }
        config.mark_listener_transports();
        config.check_listener_addresses()?;
        config.warn_of_ephemeral_source_ports();
        config.warn_of_local_tcp_replies();
        Ok(config)
    }

    /// A local rule's `sport` is the socket's bound port: an unbound socket's ephemeral port
    /// is picked after tproxy decides a connect (a datagram sent unconnected has it already),
    /// so ports of the ephemeral range match one and not the other. Said once per rule.
    fn warn_of_ephemeral_source_ports(&self) {
        let Some((first, last)) = crate::datapath::rules::ephemeral_port_range() else {
            return;
        };
        let mut warned = Vec::new();
        for rule in &self.rules {
            let Some(sport) = rule.sport.filter(|_| rule.origin.local()) else {
                continue;
            };
            let (low, high) = sport.bounds();
            if low <= last && first <= high && !warned.contains(&rule.number) {
                warned.push(rule.number);
                log::warn!(
                    "rule[{}]: sport {sport} of a rule for local connections takes ports of the \
                     ephemeral range {first}-{last} (net.ipv4.ip_local_port_range): it matches \
                     the port a socket is bound to, and an unbound one gets its port after \
                     tproxy decides its connect (a datagram it sends unconnected has one)",
                    rule.number
                );
            }
        }
    }

    /// Warns of a local TCP rule for the reply direction: a local TCP connection is decided
    /// at its connect, always the original direction, so the rule never matches one. Said
    /// once per rule.
    fn warn_of_local_tcp_replies(&self) {
        let mut warned = Vec::new();
        let all_rules = self
            .rules
            .iter()
            .chain(&self.own_address_rules)
            .chain(&self.anycast_rules)
            .chain(&self.ipset_rules);
        for rule in all_rules {
            if rule.origin.local()
                && rule.protocol == Protocol::Tcp
                && rule.ct_direction == Some(CtDirection::Reply)
                && !warned.contains(&rule.number)
            {
                warned.push(rule.number);
                let what = match rule.origin {
                    Origin::Local => "it matches nothing",
                    _ => "it matches arrivals only",
                };
                log::warn!(
                    "rule[{}]: ct_direction \"reply\" never matches a local TCP connection (its \
                     connect is the original direction): for TCP {what}",
                    rule.number
                );
            }
        }
    }

    /// What [`Config::build`] makes of `text` as the contents of `args.config`, without
    /// reading any file (for fuzzing).
    pub fn from_text(args: &RunArgs, text: &str) -> Result<Self> {
        let mut raw = match &args.config {
            Some(path) => parse_file(path, text)?,
            None => ConfigFile::default(),
        };
        let socket_mark_given = raw.gives_socket_mark() || args.settings.socket_mark.is_some();
        let mut settings = Settings::default();
        raw.apply_settings(&mut settings);
        args.settings.apply(&mut settings);
        if settings.max_connections_per_source == 0 {
            settings.max_connections_per_source = (settings.max_connections / 4).max(1);
        }
        if settings.udp_max_sessions_per_source == 0 {
            settings.udp_max_sessions_per_source = (settings.udp_max_sessions / 4).max(1);
        }
        let mut config = Config {
            settings,
            listeners: Vec::new(),
            rules: Vec::new(),
            configured_rules: 0,
            own_address_rules: Vec::new(),
            own_addresses: Vec::new(),
            anycast_rules: Vec::new(),
            anycast_destinations: Vec::new(),
            ipset_rules: Vec::new(),
            ipset_names: BTreeMap::new(),
            ipset_entries: BTreeMap::new(),
            local: None,
            socket_mark_given,
        };
        let mut file_selections = Vec::new();
        if let Some(file) = &args.config {
            let lines = LineStarts::new(text);
            let at = |span: std::ops::Range<usize>| Location::new(file, &lines, span);
            config.listeners = raw.listeners(&at)?;
            config.configured_rules = raw.rules.len();
            let split = raw.rules(&config.listeners, &at)?;
            config.rules = split.fixed;
            config.own_address_rules = split.own_addresses;
            config.anycast_rules = split.anycast;
            config.ipset_rules = split.ipset;
            config.ipset_names = split.ipset_names;
            file_selections = raw.local_selections(&at)?;
        }
        config.add_flag_rules(args)?;
        config.settle_marks()?;
        config.select_local(args, file_selections)?;
        config.check_mark_stage()?;
        config.check(args)?;
        Ok(config)
    }

    /// Puts the bypass rules for the host's own addresses in `rules` for `addresses`, in
    /// place of those for the addresses listed before. Returns whether that changed the
    /// rules.
    pub fn set_own_addresses(&mut self, mut addresses: Vec<IpAddr>) -> bool {
        addresses.sort_unstable();
        addresses.dedup();
        if addresses == self.own_addresses {
            return false;
        }
        let destinations: Vec<IpNet> = addresses.iter().map(|&addr| IpNet::from(addr)).collect();
        put_followed(&mut self.rules, &self.own_address_rules, &destinations);
        self.own_addresses = addresses;
        !self.own_address_rules.is_empty()
    }

    /// The families (IPv4, IPv6) whose anycast destinations rules follow.
    pub fn anycast_families(&self) -> (bool, bool) {
        let ipv6 = |ipv6| {
            self.anycast_rules
                .iter()
                .any(|r| r.dst.addr().is_ipv6() == ipv6)
        };
        (ipv6(false), ipv6(true))
    }

    /// Puts the bypass rules for the anycast routes' destinations in `rules` for
    /// `destinations`, in place of those listed before. Returns whether that changed the
    /// rules.
    pub fn set_anycast_destinations(&mut self, mut destinations: Vec<IpNet>) -> bool {
        destinations.sort_unstable();
        destinations.dedup();
        if destinations == self.anycast_destinations {
            return false;
        }
        put_followed(&mut self.rules, &self.anycast_rules, &destinations);
        self.anycast_destinations = destinations;
        !self.anycast_rules.is_empty()
    }

    /// The names of the ipsets that rules follow, each once.
    pub fn followed_ipsets(&self) -> Vec<String> {
        let names: std::collections::BTreeSet<&String> = self.ipset_names.values().collect();
        names.into_iter().cloned().collect()
    }

    /// Puts the rules for ipset `name` in `rules` for `entries`, in place of those for the
    /// entries read before. Returns whether that changed the rules.
    pub fn set_ipset_entries(&mut self, name: &str, mut entries: Vec<IpNet>) -> bool {
        entries.sort_unstable();
        entries.dedup();
        if self.ipset_entries.get(name) == Some(&entries) {
            return false;
        }
        let templates: Vec<Rule> = self
            .ipset_rules
            .iter()
            .filter(|rule| self.ipset_names.get(&rule.number).map(String::as_str) == Some(name))
            .cloned()
            .collect();
        put_followed(&mut self.rules, &templates, &entries);
        self.ipset_entries.insert(name.to_string(), entries);
        !templates.is_empty()
    }

    /// The processes each rule for local connections applies to: `--local`'s (`--cgroup`,
    /// `--uid`) for the `--tcp`/`--udp` rules, the file's (`file`: by rule number) for its
    /// own. Their connections arrive on `lo` (see `datapath::local_origin`), which is
    /// attached for them.
    fn select_local(&mut self, args: &RunArgs, file: Vec<(usize, LocalOrigin)>) -> Result<()> {
        if args.local && args.tcp.is_none() && args.udp.is_none() {
            bail!(
                "--local makes the --tcp/--udp rules apply to this host's own connections: give \
                 --tcp or --udp (a file's rules say it with `origin = \"local\"`)"
            );
        }
        let mut by_number: HashMap<usize, LocalOrigin> = file.into_iter().collect();
        if let Some(flags) = args.local_origin() {
            let flag_rules = self.rules.iter().filter(|rule| rule.origin.local());
            for rule in flag_rules {
                by_number
                    .entry(rule.number)
                    .or_insert_with(|| flags.clone());
            }
        }
        if by_number.is_empty() {
            return Ok(());
        }
        let mut numbers: Vec<&usize> = by_number.keys().collect();
        numbers.sort();
        for number in &numbers {
            let selection = &by_number[*number];
            for path in &selection.cgroups {
                crate::datapath::local_origin::check_cgroup_path(path)
                    .with_context(|| format!("rule {number}"))?;
            }
            selection
                .check_size()
                .with_context(|| format!("rule {number}"))?;
        }
        let mut selections = LocalSelections::default();
        let mut index = HashMap::new();
        for number in numbers {
            let selection = selections
                .index_of(by_number[number].clone())
                .with_context(|| format!("rule {number}"))?;
            index.insert(*number, selection);
        }
        for rule in self
            .rules
            .iter_mut()
            .chain(&mut self.own_address_rules)
            .chain(&mut self.anycast_rules)
            .chain(&mut self.ipset_rules)
        {
            if let Some(&selection) = index.get(&rule.number) {
                rule.selection = selection;
            }
        }
        let mut all_rules = self
            .rules
            .iter()
            .chain(&self.own_address_rules)
            .chain(&self.anycast_rules)
            .chain(&self.ipset_rules);
        selections.follow_datagram_directions(
            all_rules.any(|rule| rule.ct_asked() & tproxy_common::maps::CT_ASKED_BY_LOCAL != 0),
        );
        self.local = Some(selections);
        // The loopback program takes lo's arrivals in place of the main one (see
        // `datapath::steering`): the forwarded rules would never run there.
        let lo_named = match &self.settings.interfaces {
            Interfaces::Named(names) => names
                .iter()
                .any(|entry| entry == crate::datapath::interfaces::LOOPBACK),
            Interfaces::All { loopback } => *loopback,
        };
        if lo_named {
            let what = match args.local {
                true => "--local",
                false => "rules for local connections (origin local or any)",
            };
            bail!(
                "{what} with lo among the interfaces: lo then carries only the selected \
                 processes' connections; leave lo out of --iface and `interfaces`"
            );
        }
        if let Interfaces::Named(names) = &mut self.settings.interfaces {
            names.push("lo".to_string());
        }
        Ok(())
    }

    /// The `default` listener and the rules steering to it that `--tcp`/`--udp` ask for,
    /// after the file's.
    fn add_flag_rules(&mut self, args: &RunArgs) -> Result<()> {
        if args.tcp.is_none() && args.udp.is_none() {
            if !args.listen.is_empty()
                || args.upstream.is_some()
                || !args.dst.is_empty()
                || args.on_port.is_some()
            {
                bail!("--listen, --upstream, --on-port and --dst describe the listener of --tcp/--udp; give --tcp or --udp too");
            }
            return Ok(());
        }
        if self.listeners.iter().any(|l| l.name == DEFAULT_LISTENER) {
            bail!(
                "--tcp/--udp steer to a listener named `{DEFAULT_LISTENER}`, which the \
                 configuration file already defines; rename that one or use rules"
            );
        }
        let index = self.listeners.len() as u32;
        let external = external::of_flags(args)?;
        self.listeners.push(ListenerConfig {
            name: DEFAULT_LISTENER.into(),
            listen: match (&external, args.listen.is_empty()) {
                (Some(_), _) => Vec::new(),
                (None, true) => default_listen(),
                (None, false) => args.listen.clone(),
            },
            upstream: args.upstream,
            tcp: args.tcp.is_some(),
            udp: args.udp.is_some(),
            external,
        });
        let dsts = if args.dst.is_empty() {
            any_destination()
        } else {
            args.dst.clone()
        };
        // `--local` alone: only this host's connections; with interfaces to steer as well,
        // arrivals there too.
        let interfaces = match &self.settings.interfaces {
            Interfaces::All { .. } => true,
            Interfaces::Named(names) => !names.is_empty(),
        };
        let origin = match (args.local, interfaces) {
            (false, _) => Origin::Forwarded,
            (true, false) => Origin::Local,
            (true, true) => Origin::Any,
        };
        for (protocol, list) in [(Protocol::Tcp, &args.tcp), (Protocol::Udp, &args.udp)] {
            let Some(list) = list else { continue };
            self.configured_rules += 1;
            for dst in &dsts {
                for range in &list.0 {
                    self.rules.push(Rule {
                        protocol,
                        dst: *dst,
                        ports: ports_of(*range.start(), *range.end()),
                        sport: None,
                        src: None,
                        iface: None,
                        mark: None,
                        action: Action::Steer(index),
                        number: self.configured_rules,
                        retired: false,
                        origin,
                        selection: 0,
                        out_iface: None,
                        ct_direction: None,
                    });
                }
            }
        }
        Ok(())
    }
}

fn any_destination() -> Vec<IpNet> {
    vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()]
}

fn ports_of(first: u16, last: u16) -> Ports {
    match (first, last) {
        (first, last) if first == last => Ports::One(first),
        (1, 65535) => Ports::Any,
        (first, last) => Ports::Range(first, last),
    }
}

/// How an operator wrote listener `name`'s upstream: the flag for the `default` listener.
pub fn upstream_flag(name: &str, upstream: SocketAddr) -> String {
    match name {
        DEFAULT_LISTENER => format!("--upstream {upstream}"),
        name => format!("listener `{name}`: upstream {upstream}"),
    }
}
