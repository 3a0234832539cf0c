//! The configuration: a TOML file, command-line flags, or both, turned into one checked
//! [`Config`] before anything touches the system.
//!
//! How they combine: the file is read first; a setting given as a flag replaces the file's
//! (`--iface` replaces the whole interface list); `--tcp`/`--udp` (with `--dst`, `--listen`,
//! `--upstream`) add a listener named `default` and rules steering to it, after the file's
//! rules. Every error names where the bad value came from: the flag, or the file, line,
//! column and field.

use std::{
    collections::HashSet,
    fmt,
    marker::PhantomData,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use serde::{
    de::{self, Deserializer, SeqAccess, Visitor},
    Deserialize,
};
use tproxy_common::maps::MAX_LISTENERS;

use crate::{
    cli::RunArgs,
    datapath::rules::{self, Action, Ports, Rule},
    relay::listener::Transport,
    values::{self, FailMode, Mark},
};

/// Name of the listener that `--tcp`/`--udp` steer to.
pub const DEFAULT_LISTENER: &str = "default";

/// How long a stop or a handover gives the connections and sessions in flight by default: a
/// stop should not cut transfers short (HAProxy and nginx wait for their connections on a
/// graceful stop), nor keep an operator waiting for minutes. A service manager must allow a
/// little more before it kills (see deploy/).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the program is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interfaces {
    /// These interfaces.
    Named(Vec<String>),
    /// Every interface with Ethernet framing present at start (loopback excluded).
    All,
}

/// Settings that hold for the whole process: a reload may not change them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub interfaces: Interfaces,
    pub mark: Mark,
    pub table: u32,
    pub rule_priority: u32,
    pub socket_mark: u32,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub udp_idle_timeout: Duration,
    pub udp_max_sessions: u32,
    pub udp_max_sessions_per_source: u32,
    pub half_close_timeout: Duration,
    pub max_connections: u32,
    pub max_connections_per_source: u32,
    pub transparent_upstream: bool,
    /// The user to run as once set up (see `privileges`).
    pub user: Option<String>,
    /// Where to serve Prometheus metrics and the health endpoints.
    pub metrics: Option<SocketAddr>,
    /// Whether the program's links and maps stay pinned across restarts (`--pin`).
    pub pin: bool,
    /// The bpffs directory for pinned state.
    pub pin_dir: PathBuf,
    pub fail_mode: FailMode,
    /// See [`DEFAULT_DRAIN_TIMEOUT`].
    pub drain_timeout: Duration,
}

/// The default overall connection limit: what the open-files limit allows (two descriptors
/// a connection), less a reserve for listeners, UDP sessions and the rest.
pub fn default_max_connections() -> u32 {
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((1024, 1024));
    (soft.saturating_sub(256) / 2).clamp(16, 1 << 20) as u32
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            interfaces: Interfaces::Named(Vec::new()),
            mark: Mark {
                value: 0x100_0000,
                mask: 0x100_0000,
            },
            table: 7470,
            rule_priority: 4700,
            socket_mark: 0x200_0000,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            udp_idle_timeout: Duration::from_secs(60),
            udp_max_sessions: 8192,
            // Set from the overall limit once that is known (see `Config::load`).
            udp_max_sessions_per_source: 0,
            half_close_timeout: Duration::from_secs(60),
            max_connections: default_max_connections(),
            // Set from the overall limit once that is known (see `Config::load`).
            max_connections_per_source: 0,
            transparent_upstream: false,
            user: None,
            metrics: None,
            pin: false,
            pin_dir: PathBuf::from("/sys/fs/bpf/tproxy"),
            fail_mode: FailMode::Open,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

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
}

/// Default listener addresses: loopback, so nothing can connect to them directly.
pub fn default_listen() -> Vec<SocketAddr> {
    vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()]
}

impl Config {
    /// Builds the configuration from `--config` (if given) and the other flags.
    fn load(args: &RunArgs) -> Result<Self> {
        let text = match &args.config {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
            None => String::new(),
        };
        Self::from_text(args, &text)
    }

    /// What [`Config::build`] makes of `text` as the contents of `args.config`, without
    /// reading any file (for fuzzing).
    pub fn from_text(args: &RunArgs, text: &str) -> Result<Self> {
        let mut raw = match &args.config {
            Some(path) => parse_file(path, text)?,
            None => ConfigFile::default(),
        };
        let mut settings = Settings::default();
        raw.apply_settings(&mut settings);
        args.apply_settings(&mut settings);
        if settings.max_connections_per_source == 0 {
            settings.max_connections_per_source = (settings.max_connections / 4).max(1);
        }
        if settings.udp_max_sessions_per_source == 0 {
            settings.udp_max_sessions_per_source = (settings.udp_max_sessions / 4).max(1);
        }
        let mut listeners = Vec::new();
        let mut rules = Vec::new();
        let mut configured_rules = 0;
        if let Some(file) = &args.config {
            let lines = LineStarts::new(text);
            let at = |span: std::ops::Range<usize>| Location::new(file, &lines, span);
            listeners = raw.listeners(&at)?;
            configured_rules = raw.rules.len();
            rules = raw.rules(&listeners, &at)?;
        }
        if args.tcp.is_some() || args.udp.is_some() {
            if listeners.iter().any(|l| l.name == DEFAULT_LISTENER) {
                bail!(
                    "--tcp/--udp steer to a listener named `{DEFAULT_LISTENER}`, which the \
                     configuration file already defines; rename that one or use rules"
                );
            }
            let index = listeners.len() as u32;
            listeners.push(ListenerConfig {
                name: DEFAULT_LISTENER.into(),
                listen: if args.listen.is_empty() {
                    default_listen()
                } else {
                    args.listen.clone()
                },
                upstream: args.upstream,
                tcp: args.tcp.is_some(),
                udp: args.udp.is_some(),
            });
            let dsts = if args.dst.is_empty() {
                any_destination()
            } else {
                args.dst.clone()
            };
            for (transport, list) in [(Transport::Tcp, &args.tcp), (Transport::Udp, &args.udp)] {
                let Some(list) = list else { continue };
                configured_rules += 1;
                for dst in &dsts {
                    for range in &list.0 {
                        rules.push(Rule {
                            transport,
                            dst: *dst,
                            ports: ports_of(*range.start(), *range.end()),
                            src: None,
                            iface: None,
                            action: Action::Steer(index),
                            number: configured_rules,
                            retired: false,
                        });
                    }
                }
            }
        } else if !args.listen.is_empty() || args.upstream.is_some() || !args.dst.is_empty() {
            bail!("--listen, --upstream and --dst describe the listener of --tcp/--udp; give --tcp or --udp too");
        }
        if rules.is_empty() {
            bail!(match &args.config {
                Some(path) => format!(
                    "{}: no [[rule]] and no --tcp/--udp: nothing to steer",
                    path.display()
                ),
                None =>
                    "nothing to steer: give --tcp and/or --udp ports, or --config FILE with rules"
                        .into(),
            });
        }
        if configured_rules > rules::MAX_RULES {
            bail!(
                "{configured_rules} rules configured; at most {} are supported",
                rules::MAX_RULES
            );
        }
        if listeners.len() > MAX_LISTENERS as usize {
            bail!(
                "{} listeners defined; at most {MAX_LISTENERS} are supported",
                listeners.len()
            );
        }
        if settings.interfaces == Interfaces::Named(Vec::new()) && !args.relay_only {
            bail!(match &args.config {
                Some(path) => format!(
                    "no interface to steer: set `interfaces` in {} or give --iface",
                    path.display()
                ),
                None => "no interface to steer: give --iface (or --relay-only)".into(),
            });
        }
        if let Interfaces::Named(names) = &settings.interfaces {
            let twice = names
                .iter()
                .enumerate()
                .find(|(i, iface)| names[..*i].contains(iface));
            if let Some((_, iface)) = twice {
                bail!("interface {iface} is given twice");
            }
        }
        if args.relay_only && settings.pin {
            bail!("--pin: with --relay-only there is no program to pin");
        }
        if settings.socket_mark & settings.mark.mask == settings.mark.value {
            let origin = match (&args.socket_mark, &args.config) {
                (None, Some(file)) => format!(
                    "socket_mark {:#x} (from {})",
                    settings.socket_mark,
                    file.display()
                ),
                _ => format!("--socket-mark {:#x}", settings.socket_mark),
            };
            bail!(
                "{origin} matches the routing rule's fwmark {}: replies from tproxy's UDP \
                 sockets would be routed back to this host",
                settings.mark
            );
        }
        for rule in &rules {
            if let Some(iface) = &rule.iface {
                if let Interfaces::Named(names) = &settings.interfaces {
                    if !names.contains(iface) && !args.relay_only {
                        bail!("rule {} names interface {iface}, which is not among the steered interfaces ({})", rule.number, names.join(", "));
                    }
                }
            }
        }
        Ok(Config {
            settings,
            listeners,
            rules,
            configured_rules,
        })
    }

    /// The effective rule table, as `tproxy check` prints it.
    pub fn describe(&self) -> String {
        use fmt::Write;
        let mut out = String::new();
        let interfaces = match &self.settings.interfaces {
            Interfaces::All => "all Ethernet interfaces".to_string(),
            Interfaces::Named(names) if names.is_empty() => "none (relay only)".to_string(),
            Interfaces::Named(names) => names.join(", "),
        };
        let _ = writeln!(out, "interfaces: {interfaces}");
        let s = &self.settings;
        let _ = writeln!(
            out,
            "routing: mark {} table {} rule priority {}; socket mark {:#x}",
            s.mark, s.table, s.rule_priority, s.socket_mark
        );
        let pinned = match s.pin {
            true => format!("pinned under {}", s.pin_dir.display()),
            false => "not pinned".to_string(),
        };
        let _ = writeln!(
            out,
            "lifecycle: {pinned}; fail-{}; drain timeout {}",
            s.fail_mode,
            values::Human(s.drain_timeout)
        );
        let _ = writeln!(out, "listeners:");
        for listener in &self.listeners {
            let transports = match (listener.tcp, listener.udp) {
                (true, true) => "tcp+udp",
                (true, false) => "tcp",
                (false, true) => "udp",
                (false, false) => "unused",
            };
            let listen: Vec<String> = listener.listen.iter().map(ToString::to_string).collect();
            let upstream = listener
                .upstream
                .map_or("original destination".into(), |u| u.to_string());
            let _ = writeln!(
                out,
                "  {:<16} {transports:<8} listen {}  relay to {upstream}",
                listener.name,
                listen.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "rules ({} configured, {} after splitting lists), in the order they are consulted:",
            self.configured_rules,
            self.rules.len()
        );
        let _ = writeln!(
            out,
            "  {:>5}  {:>5}  {:<60} action",
            "order", "rule", "match"
        );
        for (order, rule) in rules::by_precedence(&self.rules).iter().enumerate() {
            let action = match rule.action {
                Action::Steer(listener) => {
                    format!("steer {}", self.listeners[listener as usize].name)
                }
                Action::Bypass => "bypass".into(),
            };
            let _ = writeln!(
                out,
                "  {:>5}  {:>5}  {:<60} {action}",
                order + 1,
                rule.number,
                rule.to_string()
            );
        }
        out
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

impl RunArgs {
    fn apply_settings(&self, settings: &mut Settings) {
        if !self.ifaces.is_empty() {
            settings.interfaces = Interfaces::Named(self.ifaces.clone());
        }
        settings.transparent_upstream |= self.transparent_upstream;
        if let Some(user) = &self.user {
            settings.user = Some(user.clone());
        }
        if let Some(metrics) = self.metrics {
            settings.metrics = Some(metrics);
        }
        settings.pin |= self.pin;
        if let Some(dir) = &self.pin_dir {
            settings.pin_dir = dir.clone();
        }
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(value) = self.$field { settings.$field = value; })* };
        }
        set!(
            mark,
            table,
            rule_priority,
            socket_mark,
            connect_timeout,
            idle_timeout,
            udp_idle_timeout,
            udp_max_sessions,
            udp_max_sessions_per_source,
            half_close_timeout,
            max_connections,
            max_connections_per_source,
            fail_mode,
            drain_timeout
        );
    }
}

/// A position in the configuration file, for error messages.
struct Location {
    file: PathBuf,
    line: usize,
    column: usize,
}

impl Location {
    fn new(file: &Path, lines: &LineStarts, span: std::ops::Range<usize>) -> Self {
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
struct LineStarts {
    starts: Vec<usize>,
    text_len: usize,
}

impl LineStarts {
    fn new(text: &str) -> Self {
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
fn parse_file(path: &Path, text: &str) -> Result<ConfigFile> {
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

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    interfaces: Option<InterfaceList>,
    mark: Option<Text<Mark>>,
    table: Option<Text<Table>>,
    rule_priority: Option<Text<RulePriority>>,
    socket_mark: Option<Text<SocketMark>>,
    connect_timeout: Option<Text<Timeout>>,
    idle_timeout: Option<Text<Timeout>>,
    udp_idle_timeout: Option<Text<Timeout>>,
    udp_max_sessions: Option<Text<SessionCap>>,
    udp_max_sessions_per_source: Option<Text<SessionCap>>,
    half_close_timeout: Option<Text<Timeout>>,
    max_connections: Option<Text<SessionCap>>,
    max_connections_per_source: Option<Text<SessionCap>>,
    transparent_upstream: Option<bool>,
    user: Option<String>,
    metrics: Option<Text<SocketAddr>>,
    pin: Option<bool>,
    pin_dir: Option<PathBuf>,
    fail_mode: Option<Text<FailMode>>,
    drain_timeout: Option<Text<DrainTimeout>>,
    #[serde(default, rename = "listener")]
    listeners: Vec<toml::Spanned<ListenerEntry>>,
    #[serde(default, rename = "rule")]
    rules: Vec<toml::Spanned<RuleEntry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerEntry {
    name: toml::Spanned<String>,
    listen: Option<List<SocketAddr>>,
    upstream: Option<Text<SocketAddr>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    proto: List<Transport>,
    dst: Option<List<IpNet>>,
    ports: Option<List<Ports>>,
    src: Option<List<IpNet>>,
    iface: Option<String>,
    action: Text<RuleAction>,
    listener: Option<toml::Spanned<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RuleAction {
    Steer,
    Bypass,
}

impl ConfigFile {
    fn apply_settings(&mut self, settings: &mut Settings) {
        match self.interfaces.take() {
            Some(InterfaceList::All) => settings.interfaces = Interfaces::All,
            Some(InterfaceList::Named(names)) => settings.interfaces = Interfaces::Named(names),
            None => {}
        }
        if let Some(Text(mark)) = self.mark {
            settings.mark = mark;
        }
        if let Some(transparent) = self.transparent_upstream {
            settings.transparent_upstream = transparent;
        }
        if let Some(user) = self.user.take() {
            settings.user = Some(user);
        }
        if let Some(Text(metrics)) = self.metrics {
            settings.metrics = Some(metrics);
        }
        if let Some(pin) = self.pin {
            settings.pin = pin;
        }
        if let Some(dir) = self.pin_dir.take() {
            settings.pin_dir = dir;
        }
        if let Some(Text(mode)) = self.fail_mode {
            settings.fail_mode = mode;
        }
        if let Some(Text(Table(table))) = self.table {
            settings.table = table;
        }
        if let Some(Text(RulePriority(priority))) = self.rule_priority {
            settings.rule_priority = priority;
        }
        if let Some(Text(SocketMark(mark))) = self.socket_mark {
            settings.socket_mark = mark;
        }
        for (field, target) in [
            (self.connect_timeout, &mut settings.connect_timeout),
            (self.idle_timeout, &mut settings.idle_timeout),
            (self.udp_idle_timeout, &mut settings.udp_idle_timeout),
            (self.half_close_timeout, &mut settings.half_close_timeout),
        ] {
            if let Some(Text(Timeout(duration))) = field {
                *target = duration;
            }
        }
        if let Some(Text(DrainTimeout(duration))) = self.drain_timeout {
            settings.drain_timeout = duration;
        }
        for (field, target) in [
            (self.udp_max_sessions, &mut settings.udp_max_sessions),
            (
                self.udp_max_sessions_per_source,
                &mut settings.udp_max_sessions_per_source,
            ),
            (self.max_connections, &mut settings.max_connections),
            (
                self.max_connections_per_source,
                &mut settings.max_connections_per_source,
            ),
        ] {
            if let Some(Text(SessionCap(cap))) = field {
                *target = cap;
            }
        }
    }

    fn listeners(
        &self,
        at: &dyn Fn(std::ops::Range<usize>) -> Location,
    ) -> Result<Vec<ListenerConfig>> {
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
            let listen = entry
                .get_ref()
                .listen
                .as_ref()
                .map_or_else(default_listen, |List(addrs)| addrs.clone());
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
                upstream: entry.get_ref().upstream.map(|Text(addr)| addr),
                tcp: false,
                udp: false,
            });
        }
        Ok(listeners)
    }

    fn rules(
        &self,
        listeners: &[ListenerConfig],
        at: &dyn Fn(std::ops::Range<usize>) -> Location,
    ) -> Result<Vec<Rule>> {
        let mut rules = Vec::new();
        for (i, entry) in self.rules.iter().enumerate() {
            let number = i + 1;
            let where_ = at(entry.span());
            let raw = entry.get_ref();
            let action = match raw.action.0 {
                RuleAction::Bypass => {
                    if let Some(listener) = &raw.listener {
                        bail!("{}: rule[{number}].listener: a bypass rule steers nowhere; remove `listener = \"{}\"`", at(listener.span()), listener.get_ref());
                    }
                    Action::Bypass
                }
                RuleAction::Steer => {
                    let index = match &raw.listener {
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
            };
            let sources: Vec<Option<IpNet>> = match &raw.src {
                Some(List(prefixes)) if !prefixes.is_empty() => prefixes.iter().copied().map(Some).collect(),
                Some(_) => bail!("{where_}: rule[{number}].src: an empty list matches nothing; leave `src` out to match every source"),
                None => vec![None],
            };
            let dsts = match &raw.dst {
                Some(List(prefixes)) if !prefixes.is_empty() => prefixes.clone(),
                Some(_) => bail!("{where_}: rule[{number}].dst: an empty list matches nothing; leave `dst` out to match every destination"),
                None => {
                    // Without a destination, the families of the sources (if any) decide.
                    let families: HashSet<bool> = sources.iter().flatten().map(|s| s.addr().is_ipv6()).collect();
                    any_destination().into_iter().filter(|d| families.is_empty() || families.contains(&d.addr().is_ipv6())).collect()
                }
            };
            let ports = match &raw.ports {
                Some(List(ports)) if !ports.is_empty() => ports.clone(),
                Some(_) => bail!("{where_}: rule[{number}].ports: an empty list matches nothing; leave `ports` out to match every port"),
                None => vec![Ports::Any],
            };
            if raw.proto.0.is_empty() {
                bail!(
                    "{where_}: rule[{number}].proto: give \"tcp\", \"udp\" or [\"tcp\", \"udp\"]"
                );
            }
            let before = rules.len();
            for &transport in &raw.proto.0 {
                for &dst in &dsts {
                    for &src in &sources {
                        if src.is_some_and(|s| s.addr().is_ipv6() != dst.addr().is_ipv6()) {
                            continue;
                        }
                        for &ports in &ports {
                            let rule = Rule {
                                transport,
                                dst,
                                ports,
                                src,
                                iface: raw.iface.clone(),
                                action,
                                number,
                                retired: false,
                            };
                            rules::check_families(&rule)
                                .map_err(|e| anyhow::anyhow!("{where_}: rule[{number}]: {e}"))?;
                            rules.push(rule);
                        }
                    }
                }
            }
            if rules.len() == before {
                bail!("{where_}: rule[{number}]: its src and dst prefixes are of different address families, so it can never match");
            }
        }
        Ok(rules)
    }
}

impl Config {
    /// Marks each listener with the transports its rules steer to it.
    fn mark_listener_transports(&mut self) {
        for rule in &self.rules {
            if let Action::Steer(index) = rule.action {
                let listener = &mut self.listeners[index as usize];
                match rule.transport {
                    Transport::Tcp => listener.tcp = true,
                    Transport::Udp => listener.udp = true,
                }
            }
        }
    }

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
        let mut config = Config::load(args)?;
        config.mark_listener_transports();
        config.check_listener_addresses()?;
        Ok(config)
    }

    /// Refuses listener addresses that `run` could not bind or that would loop: two
    /// addresses of one family in a listener, two listeners of one transport on one address
    /// (or one on a wildcard address and one on an address it covers, same port), and an
    /// upstream that is one of the listeners' addresses. Port 0 is known only once bound:
    /// `run` checks the upstreams again then.
    fn check_listener_addresses(&self) -> Result<()> {
        let what = |listener: &ListenerConfig| match listener.name.as_str() {
            DEFAULT_LISTENER => "--listen".to_string(),
            name => format!("listener `{name}`: listen"),
        };
        for listener in &self.listeners {
            for (i, addr) in listener.listen.iter().enumerate() {
                if listener.listen[..i]
                    .iter()
                    .any(|earlier| earlier.is_ipv4() == addr.is_ipv4())
                {
                    bail!(
                        "{} {addr}: at most one address per address family",
                        what(listener)
                    );
                }
            }
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            for earlier in &self.listeners[..i] {
                if !(listener.tcp && earlier.tcp || listener.udp && earlier.udp) {
                    continue;
                }
                for addr in listener.listen.iter().filter(|a| a.port() != 0) {
                    let overlap = earlier.listen.iter().find(|other| {
                        other.port() == addr.port()
                            && other.is_ipv4() == addr.is_ipv4()
                            && (other.ip() == addr.ip()
                                || other.ip().is_unspecified()
                                || addr.ip().is_unspecified())
                    });
                    if let Some(other) = overlap {
                        bail!(
                            "{} {addr}: listener `{}` listens on {other} already; two listeners \
                             cannot share an address",
                            what(listener),
                            earlier.name
                        );
                    }
                }
            }
        }
        let own: Vec<SocketAddr> = self
            .listeners
            .iter()
            .filter(|listener| listener.tcp || listener.udp)
            .flat_map(|listener| listener.listen.iter().copied())
            .filter(|addr| addr.port() != 0)
            .collect();
        for listener in &self.listeners {
            if let Some(upstream) = listener.upstream {
                if crate::relay::listener::reaches_own_listener(&own, upstream) {
                    bail!(
                        "{} is one of tproxy's own listeners: that would loop",
                        upstream_flag(&listener.name, upstream)
                    );
                }
            }
        }
        Ok(())
    }
}

/// How an operator wrote listener `name`'s upstream: the flag for the `default` listener.
pub fn upstream_flag(name: &str, upstream: SocketAddr) -> String {
    match name {
        DEFAULT_LISTENER => format!("--upstream {upstream}"),
        name => format!("listener `{name}`: upstream {upstream}"),
    }
}

/// A value written as text (or, where it makes sense, a number) and parsed with the same
/// parser as its command-line flag, so file and flag accept and reject the same things.
trait FromText: Sized {
    fn from_text(text: &str) -> Result<Self, String>;
    /// What the value should look like, for type errors.
    const EXPECTED: &'static str;
}

macro_rules! from_text {
    ($type:ty, $expected:literal, $parse:expr) => {
        impl FromText for $type {
            const EXPECTED: &'static str = $expected;
            fn from_text(text: &str) -> Result<Self, String> {
                $parse(text)
            }
        }
    };
}

#[derive(Clone, Copy, Debug)]
struct Table(u32);
#[derive(Clone, Copy, Debug)]
struct RulePriority(u32);
#[derive(Clone, Copy, Debug)]
struct SocketMark(u32);
#[derive(Clone, Copy, Debug)]
struct Timeout(Duration);
#[derive(Clone, Copy, Debug)]
struct DrainTimeout(Duration);
#[derive(Clone, Copy, Debug)]
struct SessionCap(u32);

from_text!(FailMode, "\"open\" or \"closed\"", values::parse_fail_mode);
from_text!(
    Mark,
    "a mark like \"0x1000000/0x1000000\"",
    values::parse_mark
);
from_text!(Table, "a routing table number", |t| values::parse_table(t)
    .map(Table));
from_text!(
    RulePriority,
    "a rule priority (1-32765)",
    |t: &str| match t.parse::<u32>() {
        Ok(p @ 1..=32765) => Ok(RulePriority(p)),
        _ => Err(format!("`{t}` is not a rule priority between 1 and 32765")),
    }
);
from_text!(SocketMark, "a socket mark like \"0x2000000\"", |t| {
    values::parse_socket_mark(t).map(SocketMark)
});
from_text!(Timeout, "a duration like \"10s\" or \"500ms\"", |t| {
    values::parse_duration(t).map(Timeout)
});
from_text!(DrainTimeout, "a duration like \"30s\" or \"0s\"", |t| {
    values::parse_drain_timeout(t).map(DrainTimeout)
});
from_text!(
    SessionCap,
    "a session count of at least 1",
    |t: &str| match t.parse::<u32>() {
        Ok(n @ 1..) => Ok(SessionCap(n)),
        _ => Err(format!("`{t}` is not a session count of at least 1")),
    }
);
from_text!(
    SocketAddr,
    "an ADDR:PORT like \"127.0.0.1:8080\"",
    values::parse_socket_addr
);
from_text!(IpNet, "a prefix like \"10.0.0.0/8\"", values::parse_prefix);
from_text!(Transport, "\"tcp\" or \"udp\"", |t: &str| match t {
    "tcp" => Ok(Transport::Tcp),
    "udp" => Ok(Transport::Udp),
    _ => Err(format!("`{t}` is not a protocol: use \"tcp\" or \"udp\"")),
});
from_text!(RuleAction, "\"steer\" or \"bypass\"", |t: &str| match t {
    "steer" => Ok(RuleAction::Steer),
    "bypass" => Ok(RuleAction::Bypass),
    _ => Err(format!(
        "`{t}` is not an action: use \"steer\" or \"bypass\""
    )),
});
from_text!(
    Ports,
    "a port or range like 80 or \"8000-8100\"",
    |t: &str| {
        let list = values::parse_port_list(t)?;
        match list.0.as_slice() {
            [range] => Ok(ports_of(*range.start(), *range.end())),
            _ => Err(format!(
                "`{t}`: give several ports as a list, like [80, 443]"
            )),
        }
    }
);

/// One value.
#[derive(Clone, Copy, Debug)]
struct Text<T>(T);

/// One value or a list of them.
#[derive(Clone, Debug)]
struct List<T>(Vec<T>);

struct TextVisitor<T>(PhantomData<T>);

impl<T: FromText> TextVisitor<T> {
    fn parse<E: de::Error>(text: &str) -> Result<T, E> {
        T::from_text(text).map_err(E::custom)
    }
}

impl<'de, T: FromText> Visitor<'de> for TextVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(T::EXPECTED)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        Self::parse(v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        Self::parse(&v.to_string())
    }
}

impl<'de, T: FromText> Deserialize<'de> for Text<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor(PhantomData)).map(Text)
    }
}

struct ListVisitor<T>(PhantomData<T>);

impl<'de, T: FromText> Visitor<'de> for ListVisitor<T> {
    type Value = Vec<T>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}, or a list of them", T::EXPECTED)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<T>, E> {
        TextVisitor::<T>::parse(v).map(|value| vec![value])
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Vec<T>, E> {
        TextVisitor::<T>::parse(&v.to_string()).map(|value| vec![value])
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut values = Vec::new();
        while let Some(Text(value)) = seq.next_element::<Text<T>>()? {
            values.push(value);
        }
        Ok(values)
    }
}

impl<'de, T: FromText> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ListVisitor(PhantomData)).map(List)
    }
}

/// `interfaces = "all"` or a list of names.
#[derive(Debug)]
enum InterfaceList {
    All,
    Named(Vec<String>),
}

impl<'de> Deserialize<'de> for InterfaceList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct InterfacesVisitor;
        impl<'de> Visitor<'de> for InterfacesVisitor {
            type Value = InterfaceList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of interface names, or \"all\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<InterfaceList, E> {
                match v {
                    "all" => Ok(InterfaceList::All),
                    other => Err(E::custom(format!(
                        "`{other}`: give a list like [\"{other}\"], or \"all\""
                    ))),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<InterfaceList, A::Error> {
                let mut names: Vec<String> = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    if names.contains(&name) {
                        return Err(de::Error::custom(format!(
                            "interface {name} is listed twice"
                        )));
                    }
                    names.push(name);
                }
                if names.is_empty() {
                    return Err(de::Error::custom(
                        "an empty list steers nothing; name at least one interface",
                    ));
                }
                Ok(InterfaceList::Named(names))
            }
        }
        d.deserialize_any(InterfacesVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli;
    use clap::Parser;

    fn args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["tproxy", "run"];
        argv.extend_from_slice(extra);
        match cli::Cli::try_parse_from(argv).unwrap().command {
            cli::Command::Run(args) => args,
            other => panic!("{other:?}"),
        }
    }

    fn with_file(text: &str, extra: &[&str]) -> Result<Config> {
        let dir = std::env::temp_dir().join(format!("tproxy-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{:x}.toml", text.len() * 31 + extra.len()));
        std::fs::write(&path, text).unwrap();
        let path_text = path.to_str().unwrap().to_string();
        let mut argv = vec!["--config", path_text.as_str()];
        argv.extend_from_slice(extra);
        let result = Config::build(&args(&argv));
        let _ = std::fs::remove_file(&path);
        result.map_err(|e| anyhow::anyhow!("{}", format!("{e:#}").replace(&path_text, "FILE")))
    }

    fn error(text: &str) -> String {
        with_file(text, &[]).unwrap_err().to_string()
    }

    const EXAMPLE: &str = r#"
interfaces = ["eth0", "eth1"]
connect_timeout = "5s"

[[listener]]
name = "web"
listen = ["127.0.0.1:15001", "[::1]:15001"]

[[listener]]
name = "dns"
upstream = "10.0.0.53:53"

[[rule]]
proto = "tcp"
dst = ["10.0.0.0/8", "2001:db8::/32"]
ports = [80, 443, "8000-8100"]
action = "steer"
listener = "web"

[[rule]]
proto = ["tcp", "udp"]
dst = "10.1.0.0/16"
action = "bypass"

[[rule]]
proto = "udp"
ports = 53
src = "192.0.2.0/24"
iface = "eth1"
action = "steer"
listener = "dns"
"#;

    #[test]
    fn a_full_file_parses_into_split_rules_and_listeners() {
        let config = with_file(EXAMPLE, &[]).unwrap();
        assert_eq!(
            config.settings.interfaces,
            Interfaces::Named(vec!["eth0".into(), "eth1".into()])
        );
        assert_eq!(config.settings.connect_timeout, Duration::from_secs(5));
        assert_eq!(
            config.settings.table, 7470,
            "defaults fill what the file leaves out"
        );
        assert_eq!(config.configured_rules, 3);
        // 2 prefixes × 3 port specs + 2 protocols + 1 (IPv4 only: the source is IPv4).
        assert_eq!(config.rules.len(), 6 + 2 + 1);
        assert_eq!(config.listeners[0].listen.len(), 2);
        assert!(config.listeners[0].tcp && !config.listeners[0].udp);
        assert!(!config.listeners[1].tcp && config.listeners[1].udp);
        assert_eq!(
            config.listeners[1].upstream,
            Some("10.0.0.53:53".parse().unwrap())
        );
        let udp = config.rules.last().unwrap();
        assert_eq!(udp.dst.to_string(), "0.0.0.0/0");
        assert_eq!(udp.ports, Ports::One(53));
        assert_eq!(udp.iface.as_deref(), Some("eth1"));
        let table = config.describe();
        assert!(
            table.contains("steer web") && table.contains("bypass") && table.contains("steer dns"),
            "{table}"
        );
    }

    #[test]
    fn flags_override_the_file_and_add_the_default_listener() {
        let config = with_file(
            EXAMPLE,
            &[
                "--iface",
                "eth1",
                "--iface",
                "eth9",
                "--table",
                "100",
                "--tcp",
                "22",
                "--rule-priority",
                "99",
            ],
        )
        .unwrap();
        assert_eq!(
            config.settings.interfaces,
            Interfaces::Named(vec!["eth1".into(), "eth9".into()])
        );
        assert_eq!(config.settings.table, 100);
        assert_eq!(config.settings.rule_priority, 99);
        assert_eq!(
            config.settings.connect_timeout,
            Duration::from_secs(5),
            "the file's, not the default"
        );
        assert_eq!(config.listeners.last().unwrap().name, DEFAULT_LISTENER);
        let last = config.rules.last().unwrap();
        assert_eq!(
            (last.number, last.ports),
            (4, Ports::One(22)),
            "after the file's rules"
        );
    }

    #[test]
    fn limits_come_from_flags_or_the_file() {
        let config = with_file(
            "interfaces = [\"eth0\"]\nmax_connections = 100\nhalf_close_timeout = \"5s\"\n[[rule]]\nproto = \"tcp\"\naction = \"bypass\"\n",
            &["--max-connections-per-source", "7"],
        )
        .unwrap();
        assert_eq!(config.settings.max_connections, 100);
        assert_eq!(config.settings.max_connections_per_source, 7);
        assert_eq!(config.settings.half_close_timeout, Duration::from_secs(5));
        let config = Config::build(&args(&[
            "--iface",
            "eth0",
            "--tcp",
            "80",
            "--max-connections",
            "1000",
        ]))
        .unwrap();
        assert_eq!(
            config.settings.max_connections_per_source, 250,
            "a quarter of the overall limit"
        );
        assert_eq!(config.settings.udp_max_sessions_per_source, 8192 / 4);
        let config = with_file(
            "interfaces = [\"eth0\"]\nudp_max_sessions = 100\nudp_max_sessions_per_source = 7\n[[rule]]\nproto = \"udp\"\naction = \"bypass\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(config.settings.udp_max_sessions_per_source, 7);
        let config = with_file(
            "interfaces = [\"eth0\"]\nudp_max_sessions_per_source = 7\n[[rule]]\nproto = \"udp\"\naction = \"bypass\"\n",
            &["--udp-max-sessions-per-source", "9"],
        )
        .unwrap();
        assert_eq!(config.settings.udp_max_sessions_per_source, 9);
    }

    #[test]
    fn pinning_fail_mode_and_drain_come_from_the_file_or_flags() {
        let file = "interfaces = [\"eth0\"]\npin = true\npin_dir = \"/bpf/x\"\nfail_mode = \"closed\"\ndrain_timeout = \"20s\"\n[[rule]]\nproto = \"tcp\"\naction = \"bypass\"\n";
        let config = with_file(file, &[]).unwrap();
        let s = &config.settings;
        assert!(s.pin);
        assert_eq!(s.pin_dir, PathBuf::from("/bpf/x"));
        assert_eq!(s.fail_mode, FailMode::Closed);
        assert_eq!(s.drain_timeout, Duration::from_secs(20));
        let config = with_file(file, &["--fail-mode", "open", "--drain-timeout", "1s"]).unwrap();
        assert_eq!(config.settings.fail_mode, FailMode::Open);
        assert_eq!(config.settings.drain_timeout, Duration::from_secs(1));
        let defaults = Config::build(&args(&["--iface", "eth0", "--tcp", "80"])).unwrap();
        assert!(!defaults.settings.pin);
        assert_eq!(defaults.settings.fail_mode, FailMode::Open);
        assert_eq!(defaults.settings.drain_timeout, Duration::from_secs(30));
        let no_drain = with_file(&file.replace("20s", "0s"), &[]).unwrap();
        assert_eq!(no_drain.settings.drain_timeout, Duration::ZERO);
        let no_drain = with_file(file, &["--drain-timeout", "0s"]).unwrap();
        assert_eq!(no_drain.settings.drain_timeout, Duration::ZERO);
    }

    #[test]
    fn flags_alone_still_work() {
        let config = Config::build(&args(&[
            "--iface",
            "eth0",
            "--tcp",
            "80,8000-8100",
            "--udp",
            "53",
            "--dst",
            "10.0.0.0/8",
        ]))
        .unwrap();
        assert_eq!(config.listeners.len(), 1);
        assert_eq!(config.rules.len(), 3);
        assert_eq!(config.listeners[0].listen, default_listen());
    }

    #[test]
    fn errors_name_file_line_column_and_field() {
        let cases = [
            ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"tcp\"\nports = \"99999\"\naction = \"bypass\"\n", "FILE:4:9: rule[1].ports: port 99999 is above 65535"),
            ("interfaces = [\"eth0\"]\nmark = \"0\"\n", "FILE:2:8: mark: mark `0` sets no bits"),
            ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"sctp\"\naction = \"steer\"\n", "FILE:3:9: rule[1].proto: `sctp` is not a protocol"),
            ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"tcp\"\ndst = \"10.0.0.0/33\"\naction = \"bypass\"\n", "FILE:4:7: rule[1].dst: `10.0.0.0/33` is not an IPv4/IPv6 prefix"),
            ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"tcp\"\naction = \"steer\"\nlistener = \"web\"\n", "FILE:5:12: rule[1].listener: no listener named `web` (defined: none)"),
            ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"tcp\"\naction = \"drop\"\n", "FILE:4:10: rule[1].action: `drop` is not an action"),
            ("interfaces = [\"eth0\"]\ncolour = \"blue\"\n", "FILE:2:1: colour: unknown field `colour`"),
            ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"tcp\"\n", "FILE:2:1: missing field `action`"),
            ("interfaces = \"eth0\"\n", "FILE:1:14: interfaces: `eth0`: give a list like [\"eth0\"], or \"all\""),
            ("interfaces = [\"eth0\"]\nconnect_timeout = \"0s\"\n", "FILE:2:19: connect_timeout: duration `0s` must be greater than zero"),
            ("interfaces = [\"eth0\"]\nfail_mode = \"ajar\"\n", "FILE:2:13: fail_mode: `ajar` is not a fail mode: use \"open\" or \"closed\""),
            ("interfaces = [\"eth0\"]\npin = \"yes\"\n", "FILE:2:7: pin: invalid type: string \"yes\", expected a boolean"),
            ("interfaces = [\"eth0\"]\n[[listener]]\nname = \"a\"\n[[listener]]\nname = \"a\"\n", "FILE:5:8: listener.name: a listener named `a` is already defined"),
            ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"tcp\"\nsrc = \"2001:db8::/32\"\ndst = \"10.0.0.0/8\"\naction = \"bypass\"\n", "rule[1]: its src and dst prefixes are of different address families"),
            ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"tcp\"\niface = \"eth7\"\naction = \"bypass\"\n", "rule 1 names interface eth7, which is not among the steered interfaces (eth0)"),
            ("interfaces = [\"eth0\"]\n[[listener]]\nname = \"a\"\n[[listener]]\nname = \"b\"\n[[rule]]\nproto = \"tcp\"\naction = \"steer\"\n", "FILE:6:1: rule[1]: a steer rule needs `listener = \"NAME\"`"),
            ("interfaces = [\"eth0\"]\n[[rule]]\nproto = \"tcp\"\naction = \"bypass\"\nlistener = \"x\"\n", "rule[1].listener: a bypass rule steers nowhere"),
            ("interfaces = [\"eth0\"]\n", "FILE: no [[rule]] and no --tcp/--udp: nothing to steer"),
            ("[[rule]]\nproto = \"tcp\"\naction = \"bypass\"\n", "no interface to steer: set `interfaces` in FILE or give --iface"),
            ("interfaces = [\"eth0\"]\nsocket_mark = \"0x1000000\"\n[[rule]]\nproto = \"tcp\"\naction = \"bypass\"\n", "socket_mark 0x1000000 (from FILE) matches the routing rule's fwmark"),
            ("interfaces = [\"eth0\"\n", "FILE:1:"),
        ];
        for (text, expected) in cases {
            let message = error(text);
            assert!(
                message.contains(expected),
                "for\n{text}\nexpected `{expected}` in `{message}`"
            );
        }
    }

    #[test]
    fn locations_agree_with_counting_newlines_at_every_offset() {
        let by_counting = |text: &str, offset: usize| {
            let before = &text[..offset.min(text.len())];
            let line = before.matches('\n').count() + 1;
            (
                line,
                before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1,
            )
        };
        let file = Path::new("FILE");
        for text in [
            "",
            "\n",
            "a",
            "\n\nab\n",
            "[[rule]]\nproto = \"tcp\"\n\n\nx = 1",
        ] {
            let lines = LineStarts::new(text);
            for offset in 0..=text.len() + 2 {
                let at = Location::new(file, &lines, offset..offset);
                assert_eq!(
                    (at.line, at.column),
                    by_counting(text, offset),
                    "{text:?} at {offset}"
                );
            }
        }
    }

    #[test]
    fn the_last_of_many_rules_is_located_exactly() {
        let mut text = String::from("interfaces = [\"eth0\"]\n");
        for i in 0..20_000 {
            let (high, low) = (i / 250, i % 250);
            text += &format!(
                "[[rule]]\nproto = \"tcp\"\ndst = \"10.{high}.{low}.0/24\"\naction = \"bypass\"\n"
            );
        }
        text += "[[rule]]\nproto = \"tcp\"\naction = \"bypass\"\nlistener = \"x\"\n";
        let listener_line = 1 + 20_000 * 4 + 4;
        let message = error(&text);
        let expected = format!("FILE:{listener_line}:12: rule[20001].listener: a bypass rule");
        assert!(message.contains(&expected), "{message}");
    }

    /// The README's worked example decides what the README says it decides.
    #[test]
    fn the_readme_example_decides_as_documented() {
        use crate::datapath::rules::{decide, Packet};
        use tproxy_common::decision::RuleMatch;
        let config = with_file(include_str!("../../examples/router.toml"), &[]).unwrap();
        let (web, dns) = (RuleMatch::Steer(0), RuleMatch::Steer(1));
        let cases = [
            (
                Transport::Tcp,
                "192.168.1.5",
                "203.0.113.7",
                443,
                "lan0",
                web,
            ),
            (
                Transport::Tcp,
                "192.168.1.5",
                "192.168.1.20",
                443,
                "lan0",
                RuleMatch::Bypass,
            ),
            (
                Transport::Tcp,
                "192.168.1.5",
                "192.168.1.80",
                80,
                "lan0",
                web,
            ),
            (
                Transport::Tcp,
                "192.168.1.5",
                "192.168.1.80",
                22,
                "lan0",
                RuleMatch::Bypass,
            ),
            (Transport::Udp, "10.99.0.7", "8.8.8.8", 53, "guest0", dns),
            (
                Transport::Udp,
                "192.168.1.5",
                "8.8.8.8",
                53,
                "lan0",
                RuleMatch::None,
            ),
            (Transport::Tcp, "fd00::5", "2001:db8::1", 8050, "lan0", web),
        ];
        for (transport, src, dst, port, iface, expected) in cases {
            let packet = Packet {
                transport,
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                port,
                iface,
            };
            assert_eq!(decide(&config.rules, &packet), expected, "{packet:?}");
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = Config::build(&args(&["--config", "/nonexistent/tproxy.toml"])).unwrap_err();
        assert!(
            format!("{error:#}").contains("reading /nonexistent/tproxy.toml"),
            "{error:#}"
        );
    }

    /// What `run` would refuse when binding (or starting) is refused by the configuration
    /// already, which `check` builds too.
    #[test]
    fn listener_addresses_that_run_could_not_bind_or_that_loop_are_refused() {
        let flags = |extra: &[&str]| {
            let mut argv = vec!["--iface", "eth0", "--tcp", "80"];
            argv.extend_from_slice(extra);
            Config::build(&args(&argv)).map_err(|e| format!("{e:#}"))
        };
        let refused = flags(&["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:7000"]);
        assert!(refused.unwrap_err().contains(
            "--upstream 127.0.0.1:7000 is one of tproxy's own listeners: that would loop"
        ));
        let refused = flags(&["--listen", "0.0.0.0:7000", "--upstream", "10.1.2.3:7000"]);
        assert!(refused.unwrap_err().contains("--upstream 10.1.2.3:7000"));
        let refused = flags(&["--listen", "127.0.0.1:0", "--listen", "127.0.0.2:0"]);
        assert!(refused
            .unwrap_err()
            .contains("--listen 127.0.0.2:0: at most one address per address family"));
        assert!(flags(&["--iface", "eth0"])
            .unwrap_err()
            .contains("eth0 is given twice"));
        let relay_only_pinned = Config::build(&args(&["--relay-only", "--tcp", "80", "--pin"]));
        assert!(
            format!("{:#}", relay_only_pinned.unwrap_err()).contains("--pin: with --relay-only")
        );
        assert!(flags(&["--listen", "127.0.0.1:7000", "--upstream", "127.0.0.1:7001"]).is_ok());

        let two = |first: &str, second: &str, proto: &str| {
            format!(
                "interfaces = [\"eth0\"]\n\
                 [[listener]]\nname = \"a\"\nlisten = \"{first}\"\n\
                 [[listener]]\nname = \"b\"\nlisten = \"{second}\"\n\
                 [[rule]]\nproto = \"tcp\"\naction = \"steer\"\nlistener = \"a\"\n\
                 [[rule]]\nproto = \"{proto}\"\nports = 53\naction = \"steer\"\nlistener = \"b\"\n"
            )
        };
        for (first, second) in [
            ("127.0.0.1:7000", "127.0.0.1:7000"),
            ("0.0.0.0:7000", "127.0.0.1:7000"),
            ("127.0.0.1:7000", "0.0.0.0:7000"),
        ] {
            assert!(
                error(&two(first, second, "tcp")).contains(&format!(
                    "listener `b`: listen {second}: listener `a` listens on {first} already"
                )),
                "{first} {second}"
            );
        }
        // Another port, another family, another transport, or ports still to be picked.
        for (first, second, proto) in [
            ("127.0.0.1:7000", "127.0.0.1:7001", "tcp"),
            ("0.0.0.0:7000", "[::1]:7000", "tcp"),
            ("127.0.0.1:7000", "127.0.0.1:7000", "udp"),
            ("127.0.0.1:0", "127.0.0.1:0", "tcp"),
        ] {
            with_file(&two(first, second, proto), &[]).unwrap();
        }
    }

    #[test]
    fn check_prints_durations_as_they_are_written() {
        let mut config = Config::build(&args(&[
            "--iface",
            "eth0",
            "--tcp",
            "80",
            "--drain-timeout",
            "5m",
        ]))
        .unwrap();
        assert!(config.describe().contains("drain timeout 5m"));
        config.settings.drain_timeout = Duration::ZERO;
        assert!(
            config.describe().contains("drain timeout 0s"),
            "{}",
            config.describe()
        );
    }

    #[test]
    fn listen_and_upstream_flags_need_tcp_or_udp() {
        let error = with_file(EXAMPLE, &["--upstream", "127.0.0.1:1"]).unwrap_err();
        assert!(error.to_string().contains("give --tcp or --udp"), "{error}");
    }
}
