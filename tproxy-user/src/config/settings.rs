//! The settings, each defined once (the list at the end of this file): its name, type,
//! default, documentation, flag and whether a reload may change it. From that list come
//! [`Settings`] and its `Default`, the command-line flags ([`SettingFlags`], whose `--help`
//! shows the same default), the configuration file's fields, the merge of the file over the
//! defaults and of the flags over the file, and the reload's check of what it may not change.

use std::{net::SocketAddr, path::PathBuf};

use super::{
    file::{ListenerEntry, RuleEntry},
    text::{
        DrainTimeout, InterfaceList, Parse, RulePriority, SessionCap, SocketMark, Table, Text,
        Timeout,
    },
    Interfaces,
};
use crate::values::{FailMode, Mark, TcpRelayMode};

/// The value of a default written as text, parsed as the flag would parse it: so `--help`
/// and the README show exactly what is in force.
fn parse_default<P: Parse>(setting: &str, text: &str) -> P::Value {
    P::parse(text).unwrap_or_else(|error| panic!("default of {setting}: {error}"))
}

/// A flag's `--help`: its documentation as one paragraph, with the default where there is
/// one (clap's own `[default: …]` would fill the flag in, hiding whether it was given).
fn flag_help(doc: &[&str], default: Option<&str>) -> String {
    let text = doc
        .iter()
        .map(|line| line.trim())
        .collect::<Vec<_>>()
        .join(" ");
    match default {
        Some(default) => format!("{text} [default: {default}]"),
        None => text.trim_end_matches('.').to_string(),
    }
}

/// The default overall connection limit: what the open-files limit allows (two descriptors
/// a connection), less a reserve for listeners, UDP sessions and the rest.
pub fn default_max_connections() -> u32 {
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((1024, 1024));
    (soft.saturating_sub(256) / 2).clamp(16, 1 << 20) as u32
}

/// One setting as the README's flags table and `--help` describe it.
#[derive(Clone, Copy, Debug)]
pub struct SettingInfo {
    /// Its name in the file (and the field of [`Settings`]).
    pub name: &'static str,
    /// The default as `--help` shows it, if there is one.
    pub default: Option<&'static str>,
    /// Whether that default is worked out (and `default` says how) rather than written.
    pub computed: bool,
    /// Whether a reload may change it.
    pub reloadable: bool,
}

/// Each setting is one entry:
///
/// ```text
/// /// What it does (the field's documentation and the flag's `--help`).
/// #[flag(clap arguments of its flag)]
/// fixed|reloadable NAME: KIND<PARSER> [= DEFAULT EXPRESSION], default "SHOWN";
/// ```
///
/// KIND says how the setting is given: `value` (a flag taking a value; the default is the
/// shown text, parsed), `computed` (the same, with a default computed by the expression and
/// described by the shown text), `optional` (no default: unset), `switch` (a flag without a
/// value; off by default) and `interfaces` (the repeated `--iface`, or the file's list or
/// "all"). The PARSER (see [`Parse`]) reads the flag's and the file's text alike.
macro_rules! settings {
    (
        file $file:ident { $($file_extra:tt)* }
        $(
            $(#[doc = $doc:literal])+
            #[flag($($flag:tt)*)]
            $reload:ident $field:ident: $kind:ident $(<$parse:ty>)? $(= $computed:expr)?
                $(, default $shown:literal)?;
        )+
    ) => {
        settings!(@fields [] [] []
            $(
                [$(#[doc = $doc])+]
                [#[arg(
                    $($flag)*,
                    help = flag_help(&[$($doc),+], settings!(@shown [] $($shown)?))
                    $(, value_parser = <$parse as Parse>::parse)?
                )]]
                $kind $field [$($parse)?];
            )+
            => $file { $($file_extra)* }
        );

        impl Default for Settings {
            fn default() -> Self {
                Settings {
                    $($field: settings!(
                        @default $kind $field [$($parse)?] [$($computed)?] [$($shown)?]
                    ),)+
                }
            }
        }

        /// Every setting, in the order of the list.
        pub const SETTINGS: &[SettingInfo] = &[$(SettingInfo {
            name: stringify!($field),
            default: settings!(@shown [] $($shown)?),
            computed: settings!(@computed $kind),
            reloadable: settings!(@reloadable $reload),
        },)+];

        impl $file {
            /// Puts the settings the file gives in place of the defaults.
            pub(super) fn apply_settings(&mut self, settings: &mut Settings) {
                $(if let Some(value) = self.$field.take() {
                    settings.$field = settings!(@from_file $kind value);
                })+
            }
        }

        impl SettingFlags {
            /// Puts the settings the flags give in place of the file's (or the defaults).
            pub(super) fn apply(&self, settings: &mut Settings) {
                $(settings!(@from_flag $kind self.$field, settings.$field);)+
            }
        }

        /// The names of the settings that differ between `old` and `new` and that a reload
        /// may not change.
        pub fn fixed_changes(old: &Settings, new: &Settings) -> Vec<&'static str> {
            let mut changed = Vec::new();
            $(if !settings!(@reloadable $reload) && old.$field != new.$field {
                changed.push(stringify!($field));
            })+
            changed
        }
    };

    // The three structs, a field of each per setting, by kind.
    (@fields [$($settings:tt)*] [$($flags:tt)*] [$($file:tt)*]
        => $file_name:ident { $($file_extra:tt)* }) => {
        /// Settings that hold for the whole process (see [`SETTINGS`] for which a reload may
        /// change).
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct Settings { $($settings)* }

        /// The flags of `run` (and `check`) that give a setting; one left out leaves the
        /// file's value, or the default.
        #[derive(Debug, Default, clap::Args)]
        pub struct SettingFlags { $($flags)* }

        /// The file as written.
        #[derive(Debug, Default, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct $file_name {
            $($file)*
            $($file_extra)*
        }
    };
    (@fields [$($settings:tt)*] [$($flags:tt)*] [$($file:tt)*]
        [$($doc:tt)*] [$($flag:tt)*] value $field:ident [$parse:ty]; $($rest:tt)*) => {
        settings!(@fields
            [$($settings)* $($doc)* pub $field: <$parse as Parse>::Value,]
            [$($flags)* $($flag)* pub $field: Option<<$parse as Parse>::Value>,]
            [$($file)* $field: Option<Text<$parse>>,]
            $($rest)*);
    };
    (@fields $settings:tt $flags:tt $file:tt
        $doc:tt $flag:tt computed $field:ident [$parse:ty]; $($rest:tt)*) => {
        settings!(@fields $settings $flags $file $doc $flag value $field [$parse]; $($rest)*);
    };
    (@fields [$($settings:tt)*] [$($flags:tt)*] [$($file:tt)*]
        [$($doc:tt)*] [$($flag:tt)*] optional $field:ident [$parse:ty]; $($rest:tt)*) => {
        settings!(@fields
            [$($settings)* $($doc)* pub $field: Option<<$parse as Parse>::Value>,]
            [$($flags)* $($flag)* pub $field: Option<<$parse as Parse>::Value>,]
            [$($file)* $field: Option<Text<$parse>>,]
            $($rest)*);
    };
    (@fields [$($settings:tt)*] [$($flags:tt)*] [$($file:tt)*]
        [$($doc:tt)*] [$($flag:tt)*] switch $field:ident []; $($rest:tt)*) => {
        settings!(@fields
            [$($settings)* $($doc)* pub $field: bool,]
            [$($flags)* $($flag)* pub $field: bool,]
            [$($file)* $field: Option<bool>,]
            $($rest)*);
    };
    (@fields [$($settings:tt)*] [$($flags:tt)*] [$($file:tt)*]
        [$($doc:tt)*] [$($flag:tt)*] interfaces $field:ident []; $($rest:tt)*) => {
        settings!(@fields
            [$($settings)* $($doc)* pub $field: Interfaces,]
            [$($flags)* $($flag)* pub $field: Vec<String>,]
            [$($file)* $field: Option<InterfaceList>,]
            $($rest)*);
    };

    (@default value $field:ident [$parse:ty] [] [$shown:literal]) => {
        parse_default::<$parse>(stringify!($field), $shown)
    };
    (@default computed $field:ident [$parse:ty] [$computed:expr] [$shown:literal]) => {
        $computed
    };
    (@default optional $field:ident [$parse:ty] [] []) => { None };
    (@default switch $field:ident [] [] []) => { false };
    (@default interfaces $field:ident [] [] []) => { Interfaces::Named(Vec::new()) };

    (@shown []) => { None };
    (@shown [] $shown:literal) => { Some($shown) };
    (@computed computed) => { true };
    (@computed $kind:ident) => { false };
    (@reloadable fixed) => { false };
    (@reloadable reloadable) => { true };

    (@from_file value $value:ident) => { $value.0 };
    (@from_file computed $value:ident) => { $value.0 };
    (@from_file optional $value:ident) => { Some($value.0) };
    (@from_file switch $value:ident) => { $value };
    (@from_file interfaces $value:ident) => {
        match $value {
            InterfaceList::All => Interfaces::All { loopback: false },
            InterfaceList::Named(names) => Interfaces::from_names(&names),
        }
    };

    (@from_flag value $flag:expr, $setting:expr) => {
        if let Some(value) = &$flag {
            $setting = value.clone();
        }
    };
    (@from_flag computed $flag:expr, $setting:expr) => {
        settings!(@from_flag value $flag, $setting)
    };
    (@from_flag optional $flag:expr, $setting:expr) => {
        if let Some(value) = &$flag {
            $setting = Some(value.clone());
        }
    };
    (@from_flag switch $flag:expr, $setting:expr) => {
        $setting |= $flag
    };
    (@from_flag interfaces $flag:expr, $setting:expr) => {
        if !$flag.is_empty() {
            $setting = Interfaces::from_names(&$flag);
        }
    };
}

settings! {
    file ConfigFile {
        #[serde(default, rename = "listener")]
        pub(super) listeners: Vec<toml::Spanned<ListenerEntry>>,
        #[serde(default, rename = "rule")]
        pub(super) rules: Vec<toml::Spanned<RuleEntry>>,
    }

    /// Interface whose ingress traffic is steered (repeat for several). Steering happens on
    /// arrival, so name the interfaces clients' packets come in on. A pattern (`'veth*'`,
    /// `wg?`) attaches to every matching interface, including those that appear later;
    /// `all` (alone) to every interface. Patterns and `all` leave out lo, whose traffic is
    /// the host's own: name lo to steer there (beside `all` too). Replaces the file's
    /// `interfaces`.
    #[flag(long = "iface", value_name = "IF")]
    fixed interfaces: interfaces;

    /// Routing mark set on steered packets, optionally with the mask of `skb->mark` bits that
    /// tproxy owns (`MARK/MASK`, decimal or 0x-hex). Only bits under the mask are changed.
    #[flag(long, value_name = "MARK[/MASK]")]
    fixed mark: value<Mark>, default "0x1000000/0x1000000";

    /// Routing table holding the `local 0.0.0.0/0` and `local ::/0` routes.
    #[flag(long, value_name = "N")]
    fixed table: value<Table>, default "7470";

    /// Priority of the `fwmark MARK/MASK lookup TABLE` rule (lower is consulted earlier;
    /// must come before the main table's 32766).
    #[flag(long = "rule-priority", value_name = "N")]
    fixed rule_priority: value<RulePriority>, default "4700";

    /// Give up connecting to the upstream after this long (e.g. `5s`, `500ms`) and reset the
    /// client.
    #[flag(long = "connect-timeout", value_name = "DURATION")]
    fixed connect_timeout: value<Timeout>, default "10s";

    /// Close a relayed connection after no bytes moved either way for this long.
    #[flag(long = "idle-timeout", value_name = "DURATION")]
    fixed idle_timeout: value<Timeout>, default "5m";

    /// End a UDP session after no datagram moved either way for this long.
    #[flag(long = "udp-idle-timeout", value_name = "DURATION")]
    fixed udp_idle_timeout: value<Timeout>, default "60s";

    /// Most UDP sessions at once; datagrams of new flows beyond it are dropped (and counted).
    /// Each session holds two file descriptors.
    #[flag(long = "udp-max-sessions", value_name = "N")]
    fixed udp_max_sessions: value<SessionCap>, default "8192";

    /// Most UDP sessions at once for one client address (each of its source ports and
    /// destinations is a session), so that no client can take them all; datagrams of its
    /// new flows beyond it are dropped (and counted).
    #[flag(long = "udp-max-sessions-per-source", value_name = "N")]
    // 0: set from the overall limit once that is known (see `Config::from_text`).
    fixed udp_max_sessions_per_source: computed<SessionCap> = 0,
        default "a quarter of --udp-max-sessions";

    /// Serve Prometheus metrics on `/metrics` at this address, with `/healthz` and `/readyz`
    /// for probes. Keep it on loopback or a management network.
    #[flag(long, value_name = "ADDR:PORT")]
    fixed metrics: optional<SocketAddr>;

    /// Once set up, run as this user (with only CAP_NET_ADMIN, CAP_NET_BIND_SERVICE and
    /// CAP_NET_RAW, which tproxy keeps in any case). The configuration file must stay readable to it for reloads.
    #[flag(long, value_name = "NAME")]
    fixed user: optional<String>;

    /// Connect to upstreams from the client's own address (IP_TRANSPARENT), so that servers
    /// see the client instead of this host (TCP). The servers' replies must route back
    /// through this host, and a `bypass` rule on the interface they arrive on must hand them
    /// to tproxy's sockets (see the README).
    #[flag(long = "transparent-upstream")]
    fixed transparent_upstream: switch;

    /// Reset a connection when one direction has stayed open this long after the other ended
    /// (half-close).
    #[flag(long = "half-close-timeout", value_name = "DURATION")]
    fixed half_close_timeout: value<Timeout>, default "60s";

    /// Most TCP connections relayed at once; beyond it new ones are reset (and counted).
    #[flag(long = "max-connections", value_name = "N")]
    fixed max_connections: computed<SessionCap> = default_max_connections(),
        default "what the open-files limit allows: (limit - 256) / 2";

    /// Most TCP connections relayed at once for one client address, so that no client can
    /// take them all.
    #[flag(long = "max-connections-per-source", value_name = "N")]
    // 0: set from the overall limit once that is known (see `Config::from_text`).
    fixed max_connections_per_source: computed<SessionCap> = 0,
        default "a quarter of --max-connections";

    /// SO_MARK on tproxy's own per-flow UDP sockets, by which the eBPF program tells them from
    /// other local sockets. It must not match the routing rule (MARK under MASK), or replies
    /// would be delivered locally instead of sent.
    #[flag(long = "socket-mark", value_name = "MARK")]
    fixed socket_mark: value<SocketMark>, default "0x2000000";

    /// Steer local connections to loopback addresses when a rule takes them to an external
    /// proxy, as an iptables recipe without a `-d 127.0.0.0/8 -j RETURN` hands them to its
    /// proxy (`translate --keep-proxies` sets it for such a recipe). Off, they go direct: a
    /// process connecting to a local service does not leave the host.
    #[flag(long = "steer-loopback")]
    fixed steer_loopback: switch;

    /// Keep the program's links and maps pinned (under --pin-dir), so that steering outlives
    /// the process: the next `tproxy run --pin` adopts them without a gap, and one started
    /// while this one runs takes its listeners over (see the README's restart section).
    /// `tproxy cleanup` removes what is left pinned.
    #[flag(long)]
    fixed pin: switch;

    /// The directory, on a bpf filesystem, that holds --pin's state.
    #[flag(long = "pin-dir", value_name = "DIR")]
    fixed pin_dir: value<PathBuf>, default "/sys/fs/bpf/tproxy";

    /// What happens to a packet a steer rule takes when no listener can get it (no tproxy
    /// process runs over pinned state, or the listener has no socket for the packet's family),
    /// and to a later fragment whose first fragment was not seen (any port: without ports its
    /// flow cannot be told): `open` passes it on untouched, `closed` drops it.
    #[flag(long = "fail-mode", value_name = "MODE")]
    fixed fail_mode: value<FailMode>, default "open";

    /// How TCP bytes are moved once both sides are connected: `kernel` hands the two sockets
    /// to an eBPF stream-verdict program that forwards each one's bytes to the other inside
    /// the kernel (tproxy only watches for FIN, RST and idleness); `splice` moves them with
    /// splice(2) through a pipe; `copy` reads and writes them through a buffer. A connection
    /// the kernel relay cannot take is spliced (and counted).
    #[flag(long = "tcp-relay", value_name = "MODE")]
    fixed tcp_relay: value<TcpRelayMode>, default "splice";

    /// On SIGTERM, or when a new instance takes over, stop accepting and give the connections
    /// and UDP sessions in flight this long to finish before resetting the rest; a second
    /// SIGTERM or SIGINT resets them at once, and 0s does not wait.
    #[flag(long = "drain-timeout", value_name = "DURATION")]
    // A stop should not cut transfers short (HAProxy and nginx wait for their connections on
    // a graceful stop), nor keep an operator waiting for minutes. A service manager must
    // allow a little more before it kills (see deploy/).
    fixed drain_timeout: value<DrainTimeout>, default "30s";
}

impl ConfigFile {
    /// Whether the file gives `socket_mark` (read before the settings are applied).
    pub(super) fn gives_socket_mark(&self) -> bool {
        self.socket_mark.is_some()
    }
}

#[cfg(test)]
mod tests {
    use clap::{Args, Command};

    use super::*;

    /// The flag of each setting, by name.
    fn flags() -> Vec<(String, String)> {
        let command = SettingFlags::augment_args(Command::new("run"));
        command
            .get_arguments()
            .filter_map(|arg| Some((arg.get_id().to_string(), arg.get_long()?.to_string())))
            .collect()
    }

    #[test]
    fn every_setting_has_a_flag_and_a_default_that_parses() {
        let flags = flags();
        for setting in SETTINGS {
            assert!(
                flags.iter().any(|(name, _)| name == setting.name),
                "{} has no flag",
                setting.name
            );
        }
        assert_eq!(flags.len(), SETTINGS.len());
        let defaults = Settings::default();
        assert_eq!(defaults.connect_timeout, std::time::Duration::from_secs(10));
        assert_eq!(defaults.mark.to_string(), "0x1000000/0x1000000");
    }

    /// The README's flags table lists every setting but `interfaces` (which has no default:
    /// `--iface` or `--relay-only` is required), nothing that is not one but the `default`
    /// listener's `--listen`, and the defaults `--help` shows.
    #[test]
    fn the_readme_flags_table_agrees_with_the_settings() {
        let readme = include_str!("../../../README.md");
        let table = readme
            .split("### Flags")
            .nth(1)
            .expect("README has a Flags section");
        let rows: Vec<(String, String)> = table
            .lines()
            .skip_while(|line| !line.starts_with("| flag |"))
            .take_while(|line| line.starts_with('|'))
            .filter_map(|line| {
                let cells: Vec<&str> = line.split(" | ").collect();
                let flag = cells[0].strip_prefix("| `--")?;
                let flag = flag.split([' ', '`']).next()?;
                Some((flag.to_string(), cells.get(1)?.trim().to_string()))
            })
            .collect();
        assert!(rows.len() > 10, "{rows:?}");
        let flags = flags();
        for (flag, _) in &rows {
            assert!(
                flag == "listen" || flags.iter().any(|(_, long)| long == flag),
                "the README lists --{flag}, which is no setting"
            );
        }
        for setting in SETTINGS.iter().filter(|s| s.name != "interfaces") {
            let (_, long) = flags.iter().find(|(name, _)| name == setting.name).unwrap();
            let (_, readme_default) = rows
                .iter()
                .find(|(flag, _)| flag == long)
                .unwrap_or_else(|| panic!("the README's flags table has no --{long}"));
            if let (Some(default), false) = (setting.default, setting.computed) {
                assert_eq!(
                    readme_default,
                    &format!("`{default}`"),
                    "the README's default of --{long}"
                );
            }
        }
    }

    #[test]
    fn a_reload_names_each_fixed_setting_it_would_change() {
        let old = Settings::default();
        let mut new = old.clone();
        assert!(fixed_changes(&old, &new).is_empty());
        new.table = 100;
        new.drain_timeout = std::time::Duration::ZERO;
        new.pin = true;
        assert_eq!(fixed_changes(&old, &new), ["table", "pin", "drain_timeout"]);
    }
}
