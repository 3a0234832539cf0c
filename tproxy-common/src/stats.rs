//! The counters tproxy reports, as one typed snapshot: `tproxy status` serves it as JSON,
//! SIGUSR1 and the exit log it line by line, and `/metrics` exposes it to Prometheus. Each
//! counter is declared once, in a [`counters!`] list that names its Prometheus metric too, and
//! the three renderings walk [`Stats::sections`]: a counter added to a list appears in all
//! three without touching them.

use std::{collections::BTreeMap, format, string::String, vec, vec::Vec};

use crate::{decision::Protocol, Outcome};
use serde::{de::Error as _, Deserialize, Deserializer, Serialize, Serializer};

/// How Prometheus is told a value behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (exposed with the `_total` suffix).
    Counter,
    /// Goes up and down.
    Gauge,
}

/// A Prometheus metric, named without the `tproxy_` prefix (and a counter's `_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metric {
    pub kind: Kind,
    pub name: &'static str,
    pub help: &'static str,
}

/// One value of a snapshot and where it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// Its name in the status JSON and the log line.
    pub name: &'static str,
    pub value: u64,
    pub metric: Metric,
    /// What tells it from the other members of its metric's family (none: the metric is
    /// its own).
    pub labels: Vec<(&'static str, &'static str)>,
    /// False for a count that cannot move (an outcome packets of that protocol never have):
    /// still exposed, for the JSON and the metrics keep every combination, but not logged.
    pub can_move: bool,
}

/// A group of fields: one log line, one object of the status JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// The log line's header.
    pub title: String,
    pub fields: Vec<Field>,
}

const fn counter(name: &'static str, help: &'static str) -> Metric {
    Metric {
        kind: Kind::Counter,
        name,
        help,
    }
}

const fn gauge(name: &'static str, help: &'static str) -> Metric {
    Metric {
        kind: Kind::Gauge,
        name,
        help,
    }
}

/// Declares a struct of `u64` counters, serde-derived (the field names are the JSON and log
/// names), with `fields()` listing each with its metric (and the metric family's label).
macro_rules! counters {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$doc:meta])*
                $field:ident: $metric:ident $({ $label:ident: $value:literal })?
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $name {
            $( $(#[$doc])* pub $field: u64, )*
        }

        impl $name {
            /// Every counter, in declaration order.
            pub fn fields(&self) -> Vec<Field> {
                vec![$(
                    Field {
                        name: stringify!($field),
                        value: self.$field,
                        metric: $metric,
                        labels: vec![$((stringify!($label), $value))?],
                        can_move: true,
                    }
                ),*]
            }
        }
    };
}

const PACKETS: Metric = counter(
    "packets",
    "Packets the eBPF program saw, by transport and what it did with them",
);
const FRAGMENT_TRACKING: Metric = gauge(
    "fragment_tracking_entries",
    "Entries left in the eBPF program's fragment maps after the last sweep, by map",
);
const INTERFACES_ATTACHED: Metric = gauge(
    "interfaces_attached",
    "Interfaces the eBPF program is attached to",
);
const INTERFACE_EVENTS: Metric = counter(
    "interface_events",
    "Attaching to and detaching from interfaces (at start and as they come and go), by event",
);
const LOCAL_SELECTION: Metric = gauge(
    "local_selection",
    "What steering this host's own connections selects: selections (each rule has one), and the cgroups and uid ranges (0: every user) they name",
);
const LOCAL_CGROUP_LINKS: Metric = gauge(
    "local_cgroup_links",
    "Links of the connect programs to the selected cgroups (connect4 and connect6 each)",
);
const TCP_ACCEPTED: Metric = counter(
    "tcp_connections_accepted",
    "TCP connections accepted by the relay",
);
const TCP_ACTIVE: Metric = gauge("tcp_connections_active", "TCP connections being relayed");
const TCP_FAILED: Metric = counter(
    "tcp_connections_failed",
    "TCP connections that ended early, by reason",
);
const TCP_KERNEL: Metric = counter(
    "tcp_connections_kernel",
    "TCP connections the kernel relay (--tcp-relay kernel) took, or could not take",
);
const TCP_KERNEL_MAP: Metric = gauge(
    "tcp_kernel_map_entries",
    "Sockets in the kernel relay's socket hash (two a connection it relays)",
);
const TCP_BYTES: Metric = counter("tcp_bytes", "Bytes the TCP relay moved, by direction");
const UDP_ACTIVE: Metric = gauge("udp_sessions_active", "UDP sessions open");
const UDP_SESSIONS: Metric = counter("udp_sessions", "UDP sessions, by what happened to them");
const UDP_DATAGRAMS: Metric = counter("udp_datagrams", "UDP datagrams the relay moved or dropped");
const UDP_RAW_REPLY_FAILURES: Metric = counter(
    "udp_raw_reply_failures",
    "UDP replies the raw fallback could not send (also counted as dropped)",
);

counters! {
    /// Entries left in the program's fragment maps after the last sweep.
    pub struct FragmentEntries {
        /// Datagrams whose first fragment was decided and whose time is not up.
        datagrams: FRAGMENT_TRACKING { map: "datagrams" },
        /// Reassembled flows waiting for their socket lookup.
        reassembled_flows: FRAGMENT_TRACKING { map: "reassembled_flows" },
    }
}

counters! {
    /// Where the program is attached, and how often that changed.
    pub struct InterfaceStats {
        attached: INTERFACES_ATTACHED,
        attach_events: INTERFACE_EVENTS { event: "attached" },
        detach_events: INTERFACE_EVENTS { event: "detached" },
        /// Interfaces that matched but could not be attached to.
        attach_failures: INTERFACE_EVENTS { event: "attach_failed" },
    }
}

counters! {
    /// How much steering this host's own connections selects, and the links that do it.
    pub struct LocalOriginCounts {
        used_selections: LOCAL_SELECTION { selected: "selections" },
        selected_cgroups: LOCAL_SELECTION { selected: "cgroups" },
        selected_uid_ranges: LOCAL_SELECTION { selected: "uid_ranges" },
        cgroup_links: LOCAL_CGROUP_LINKS,
    }
}

/// Steering this host's own connections (rules with origin `local` or `any`): what it
/// selects, and where it is attached.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalOriginStats {
    /// Each selection the rules have, in words (`cgroup /app.slice, uid 1000`).
    pub selections: Vec<String>,
    /// The cgroup v2 paths the selections name (`/`: every process).
    pub cgroups: Vec<String>,
    /// The uids and ranges the selections name (none: every user).
    pub uids: Vec<String>,
    #[serde(flatten)]
    pub counts: LocalOriginCounts,
}

impl LocalOriginStats {
    /// The selections in words, as the log shows them.
    fn describe(&self) -> String {
        self.selections.join("; ")
    }
}

counters! {
    /// The TCP relay's totals since start, and the connections it relays now.
    pub struct TcpRelay {
        accepted: TCP_ACCEPTED,
        active: TCP_ACTIVE,
        upstream_failures: TCP_FAILED { reason: "upstream_unreachable" },
        bytes_to_upstream: TCP_BYTES { direction: "to_upstream" },
        bytes_to_client: TCP_BYTES { direction: "to_client" },
        /// Reset at once because `max_connections` were being relayed.
        refused_at_limit: TCP_FAILED { reason: "refused_at_limit" },
        /// Refused because their client address had `max_connections_per_source`.
        refused_at_source_limit: TCP_FAILED { reason: "refused_at_source_limit" },
        /// Reset because one direction stayed open `half_close_timeout` after the other ended.
        half_close_timeouts: TCP_FAILED { reason: "half_close_timeout" },
        /// Reset because their original destination is one no relay may connect to.
        refused_destination: TCP_FAILED { reason: "refused_destination" },
        /// Relayed by the kernel relay.
        kernel_relayed: TCP_KERNEL { outcome: "relayed" },
        /// Not taken by the kernel relay: spliced instead, or reset if bytes may have been
        /// dropped while only one side was in its map.
        kernel_fallbacks: TCP_KERNEL { outcome: "fallback" },
        /// Sockets in the kernel relay's map now.
        kernel_map_entries: TCP_KERNEL_MAP,
    }
}

counters! {
    /// The UDP relay's totals since start, and the sessions open now.
    pub struct UdpRelay {
        active: UDP_ACTIVE,
        created: UDP_SESSIONS { event: "created" },
        expired: UDP_SESSIONS { event: "expired" },
        /// New flows refused because `max_sessions` were open.
        refused_at_cap: UDP_SESSIONS { event: "refused_at_cap" },
        /// New flows refused because their client address had `max_sessions_per_source`.
        refused_at_source_cap: UDP_SESSIONS { event: "refused_at_source_cap" },
        ended_by_upstream_error: UDP_SESSIONS { event: "ended_by_upstream_error" },
        /// Sessions whose replies go out raw: no socket could be bound to the original
        /// destination.
        raw_reply_fallbacks: UDP_SESSIONS { event: "raw_reply_fallback" },
        /// Datagrams refused because of their original destination.
        refused_destination: UDP_SESSIONS { event: "refused_destination" },
        to_upstream: UDP_DATAGRAMS { direction: "to_upstream" },
        to_client: UDP_DATAGRAMS { direction: "to_client" },
        dropped: UDP_DATAGRAMS { direction: "dropped" },
        /// Datagrams the listeners' receive buffers had no room for.
        listener_buffer_drops: UDP_DATAGRAMS { direction: "listener_buffer_drops" },
        /// Replies the raw fallback could not send (also counted in `dropped`).
        raw_reply_failures: UDP_RAW_REPLY_FAILURES,
    }
}

/// The eBPF program's packet counts, per protocol and outcome; in JSON
/// `{protocol: {outcome: count}}` with every combination.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Packets(pub [[u64; Outcome::COUNT as usize]; Protocol::COUNT as usize]);

impl Packets {
    /// How many packets of `protocol` had `outcome`.
    pub fn count(&self, protocol: Protocol, outcome: Outcome) -> u64 {
        self.0[protocol as usize][outcome as usize]
    }

    /// Every count, with its protocol and outcome.
    pub fn iter(&self) -> impl Iterator<Item = (Protocol, Outcome, u64)> + '_ {
        Protocol::ALL.into_iter().flat_map(move |protocol| {
            Outcome::ALL
                .into_iter()
                .map(move |outcome| (protocol, outcome, self.count(protocol, outcome)))
        })
    }

    /// One section per protocol.
    fn sections(&self) -> impl Iterator<Item = Section> + '_ {
        Protocol::ALL.into_iter().map(move |protocol| Section {
            title: format!("eBPF {} packets", protocol.name()),
            fields: Outcome::ALL
                .into_iter()
                .map(|outcome| Field {
                    name: outcome.name(),
                    value: self.count(protocol, outcome),
                    metric: PACKETS,
                    labels: vec![("protocol", protocol.name()), ("outcome", outcome.name())],
                    can_move: outcome.applies_to(protocol),
                })
                .collect(),
        })
    }
}

impl Serialize for Packets {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let by_protocol: BTreeMap<&str, BTreeMap<&str, u64>> = Protocol::ALL
            .into_iter()
            .map(|protocol| {
                let row = Outcome::ALL
                    .into_iter()
                    .map(|outcome| (outcome.name(), self.count(protocol, outcome)))
                    .collect();
                (protocol.name(), row)
            })
            .collect();
        by_protocol.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Packets {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let by_protocol = BTreeMap::<String, BTreeMap<String, u64>>::deserialize(deserializer)?;
        let mut packets = Packets::default();
        for (protocol_name, row) in by_protocol {
            let protocol = Protocol::ALL
                .into_iter()
                .find(|p| p.name() == protocol_name)
                .ok_or_else(|| D::Error::custom(format!("unknown protocol `{protocol_name}`")))?;
            for (outcome_name, count) in row {
                let outcome = Outcome::ALL
                    .into_iter()
                    .find(|o| o.name() == outcome_name)
                    .ok_or_else(|| D::Error::custom(format!("unknown outcome `{outcome_name}`")))?;
                packets.0[protocol as usize][outcome as usize] = count;
            }
        }
        Ok(packets)
    }
}

/// Every counter tproxy reports, at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// `None` without the eBPF program (`--relay-only`), or when its counters could not be
    /// read.
    pub packets: Option<Packets>,
    /// `None` without the eBPF program.
    pub fragment_tracking: Option<FragmentEntries>,
    /// `None` without the eBPF program.
    pub interfaces: Option<InterfaceStats>,
    /// `None` unless this host's own connections are steered.
    #[serde(default)]
    pub local_origin: Option<LocalOriginStats>,
    pub tcp_relay: TcpRelay,
    pub udp_relay: UdpRelay,
}

impl Stats {
    /// Every value, grouped as the log shows them.
    pub fn sections(&self) -> Vec<Section> {
        let mut sections: Vec<Section> = self.packets.iter().flat_map(Packets::sections).collect();
        if let Some(fragments) = &self.fragment_tracking {
            sections.push(Section {
                title: "eBPF fragment tracking".into(),
                fields: fragments.fields(),
            });
        }
        if let Some(interfaces) = &self.interfaces {
            sections.push(Section {
                title: "interfaces".into(),
                fields: interfaces.fields(),
            });
        }
        if let Some(local) = &self.local_origin {
            sections.push(Section {
                title: format!("local origin ({})", local.describe()),
                fields: local.counts.fields(),
            });
        }
        sections.push(Section {
            title: "tcp relay".into(),
            fields: self.tcp_relay.fields(),
        });
        sections.push(Section {
            title: "udp relay".into(),
            fields: self.udp_relay.fields(),
        });
        sections
    }

    /// The log lines (SIGUSR1 and exit): `TITLE: name=value …`, one per section.
    pub fn log_lines(&self) -> Vec<String> {
        self.sections()
            .into_iter()
            .map(|section| {
                let fields: Vec<String> = section
                    .fields
                    .iter()
                    .filter(|field| field.can_move)
                    .map(|field| format!("{}={}", field.name, field.value))
                    .collect();
                format!("{}: {}", section.title, fields.join(" "))
            })
            .collect()
    }
}

/// What a running instance answers `tproxy status` with (the `instance` of
/// `tproxy status --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub pid: u32,
    /// Serving, draining, or handed over and draining.
    pub phase: String,
    pub table: u32,
    pub mark: String,
    pub rule_priority: u32,
    pub fail_mode: String,
    /// The pin directory, when the instance pins its state.
    pub pinned: Option<String>,
    /// How the program is attached, per interface.
    pub attached: Vec<String>,
    pub listeners: Vec<ListenerStatus>,
    pub rules: Vec<String>,
    #[serde(flatten)]
    pub stats: Stats,
}

/// One listener of a running instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    /// Whether it serves TCP.
    pub tcp: bool,
    /// Whether it serves UDP.
    pub udp: bool,
    pub addresses: Vec<String>,
    /// Where it relays to; `None`: the original destination.
    pub upstream: Option<String>,
    /// For a proxy tproxy does not run: where it listens.
    #[serde(default)]
    pub external: Option<String>,
    /// For a proxy tproxy does not run: whether its sockets are there now.
    #[serde(default)]
    pub external_sockets: Vec<ExternalSocketStatus>,
    /// What the program did with the listener's new flows; `None` without the program.
    #[serde(default)]
    pub packets: Option<ListenerPackets>,
}

/// What the program did with the new flows of one listener's steer rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerPackets {
    /// Packets handed to the listener as new flows.
    pub steered_new: u64,
    /// Packets that found no socket listening (fail mode applied).
    pub no_listener: u64,
}

/// Which transport a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Udp,
}

/// One address and transport of an external listener, as sock_diag shows it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalSocketStatus {
    pub address: String,
    pub transport: Transport,
    /// A socket listens there (TCP), or is bound there unconnected (UDP).
    pub listening: bool,
    /// It has IP_TRANSPARENT.
    pub transparent: bool,
    /// Why the sockets could not be read (then both are false).
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_names_are_the_field_names_and_round_trip() {
        let mut stats = Stats {
            packets: Some(Packets::default()),
            fragment_tracking: Some(FragmentEntries::default()),
            interfaces: Some(InterfaceStats::default()),
            ..Stats::default()
        };
        stats.udp_relay.dropped = 7;
        stats.packets.as_mut().unwrap().0[1][Outcome::SteeredNew as usize] = 3;
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["udp_relay"]["dropped"], 7);
        assert_eq!(json["packets"]["udp"]["steered_new"], 3);
        assert_eq!(
            json["packets"]["other"].as_object().unwrap().len(),
            Outcome::COUNT as usize
        );
        for section in stats.sections().iter().skip(Protocol::ALL.len()) {
            let key = match section.title.as_str() {
                "eBPF fragment tracking" => "fragment_tracking",
                "interfaces" => "interfaces",
                "tcp relay" => "tcp_relay",
                _ => "udp_relay",
            };
            let names: Vec<&str> = json[key]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            let mut fields: Vec<&str> = section.fields.iter().map(|f| f.name).collect();
            fields.sort_unstable();
            assert_eq!(names, fields);
        }
        assert_eq!(serde_json::from_value::<Stats>(json).unwrap(), stats);
    }

    #[test]
    fn the_log_leaves_out_what_cannot_move() {
        let stats = Stats {
            packets: Some(Packets::default()),
            ..Stats::default()
        };
        let lines = stats.log_lines();
        assert_eq!(
            lines[2],
            "eBPF other packets: passed=0 bypassed=0 fragment_unknown=0 unparsed=0 dropped=0"
        );
        assert!(lines[3].starts_with("tcp relay: accepted=0 active=0 upstream_failures=0"));
        assert!(lines[4].ends_with("listener_buffer_drops=0 raw_reply_failures=0"));
    }
}
