//! Command line: what an operator can say, and the parsers that turn each flag's text into a
//! checked value (or an error naming the bad value) before anything touches the system.

use std::{net::SocketAddr, ops::RangeInclusive, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

/// Transparent proxying without iptables: a tc ingress eBPF program steers chosen TCP and UDP
/// flows into tproxy's own transparent listeners (the socket match and TPROXY target in one),
/// and tproxy relays them to their original destination.
#[derive(Debug, Parser)]
#[command(name = "tproxy", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the steering program, install policy routing, and relay steered connections
    /// until SIGINT or SIGTERM; everything installed is removed on exit. SIGHUP reloads the
    /// configuration file's rules and listeners.
    Run(RunArgs),
    /// Check a configuration (file and flags, as `run` would take them) without touching the
    /// system, and print the effective rule table.
    Check(RunArgs),
    /// Make the running `tproxy run` of this network namespace re-read its configuration
    /// file (as SIGHUP does) and say what is in force now. Exits non-zero, with the reason,
    /// when the new configuration is rejected (the previous one stays in force).
    Reload(ReloadArgs),
    /// Check this host for what transparent proxying needs and for what breaks it (kernel
    /// support, rp_filter, forwarding, firewall policies, other TPROXY users and ingress
    /// programs); prints what to run for each problem. Exits non-zero if anything is wrong.
    Doctor(DoctorArgs),
    /// Show what the tproxy of this network namespace does: whether it runs, where it is
    /// attached, its listeners, rules, policy routing, pinned state and counters. Exits 3
    /// when no instance runs (like `systemctl status`), and 4 when it cannot tell: the
    /// running instance's control socket is root's only (permission denied).
    Status(StatusArgs),
    /// Remove everything of tproxy's in this network namespace that no running instance
    /// owns: state left pinned by `run --pin`, policy routing, tc filters of its program.
    /// Nothing else is touched; refused while an instance runs for the table.
    Cleanup(InstanceArgs),
    /// Print an equivalent tproxy configuration for an iptables/ip6tables TPROXY rule set
    /// (`iptables-save` output) or an nft one (`nft list ruleset` output) read from stdin.
    Translate(TranslateArgs),
}

/// Flags of `tproxy doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Take the interfaces and mark from this configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Interface to check (repeat for several); replaces the file's.
    #[arg(long = "iface", value_name = "IF")]
    pub ifaces: Vec<String>,

    /// The routing mark tproxy uses (as for `run`).
    #[arg(long, value_name = "MARK[/MASK]", value_parser = parse_mark)]
    pub mark: Option<Mark>,

    /// Check that this directory can hold `run --pin`'s state (implied by a configuration
    /// file that sets `pin`).
    #[arg(long = "pin-dir", value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
}

/// Flags of `tproxy reload` and `tproxy cleanup`.
#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// The routing table of the instance (as given to its `run`).
    #[arg(long, value_name = "N", value_parser = parse_table, default_value_t = 7470)]
    pub table: u32,
}

/// Which instance `status` and `cleanup` are about.
#[derive(Debug, Args)]
pub struct InstanceArgs {
    /// The routing table of the instance (as given to its `run`).
    #[arg(long, value_name = "N", value_parser = parse_table, default_value_t = 7470)]
    pub table: u32,
    /// Where `run --pin` pins its state (as given to its `run`).
    #[arg(
        long = "pin-dir",
        value_name = "DIR",
        default_value = "/sys/fs/bpf/tproxy"
    )]
    pub pin_dir: PathBuf,
}

/// Flags of `tproxy status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `tproxy translate`.
#[derive(Debug, Args)]
pub struct TranslateArgs {
    /// Exit with status 0 even when some rules could not be translated (they are still
    /// listed on stderr).
    #[arg(long = "allow-skipped")]
    pub allow_skipped: bool,
}

/// Flags of `tproxy run` (and `tproxy check`). Settings left out take the configuration
/// file's value, or the default shown.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Log each steering decision of the eBPF program (new flows steered, with addresses), at
    /// most 100 a second; what is held back is counted. Same as RUST_LOG=info,tproxy_ebpf=debug.
    #[arg(short, long)]
    pub verbose: bool,

    /// TOML configuration file: settings, listeners and rules (see the README). Flags given
    /// as well override its settings; --tcp/--udp add rules after its own.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Interface whose ingress traffic is steered (repeat for several). Steering happens on
    /// arrival, so name the interfaces clients' packets come in on. Replaces the file's
    /// `interfaces`.
    #[arg(long = "iface", value_name = "IF")]
    pub ifaces: Vec<String>,

    /// Run only the listeners and the relay: steering is done by something else, such as an
    /// existing iptables/nft TPROXY rule set pointed at the listeners (give them fixed
    /// ports). No program is attached and no policy routing is installed.
    #[arg(long = "relay-only", conflicts_with_all = ["ifaces", "dst"])]
    pub relay_only: bool,

    /// Destination TCP ports to steer to the `default` listener: a comma-separated list of
    /// ports and inclusive ranges, e.g. `80,443,8000-8100`.
    #[arg(long, value_name = "PORTS", value_parser = parse_port_list)]
    pub tcp: Option<PortList>,

    /// Destination UDP ports to steer to the `default` listener, in the same syntax as
    /// --tcp. Each (client, original destination) pair becomes a session with its own
    /// upstream socket.
    #[arg(long, value_name = "PORTS", value_parser = parse_port_list)]
    pub udp: Option<PortList>,

    /// Only steer --tcp/--udp packets to these destination prefixes (repeat for several;
    /// IPv4 and IPv6). A bare address means a single host. Default: every destination.
    #[arg(long = "dst", value_name = "CIDR", value_parser = parse_prefix)]
    pub dst: Vec<IpNet>,

    /// Address of the `default` listener (repeat for several; at most one per address
    /// family). Keep them on loopback so nothing can connect to them directly; steered
    /// packets reach them whatever their destination. Port 0 picks a free port, shared by
    /// all of them. [default: 127.0.0.1:0 [::1]:0]
    #[arg(long = "listen", value_name = "ADDR:PORT", value_parser = parse_socket_addr)]
    pub listen: Vec<SocketAddr>,

    /// Relay every connection of the `default` listener to this address instead of its
    /// original destination (e.g. a local app when running as a sidecar).
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_socket_addr)]
    pub upstream: Option<SocketAddr>,

    /// Routing mark set on steered packets, optionally with the mask of `skb->mark` bits that
    /// tproxy owns (`MARK/MASK`, decimal or 0x-hex). Only bits under the mask are changed.
    /// [default: 0x1000000/0x1000000]
    #[arg(long, value_name = "MARK[/MASK]", value_parser = parse_mark)]
    pub mark: Option<Mark>,

    /// Routing table holding the `local 0.0.0.0/0` and `local ::/0` routes. [default: 7470]
    #[arg(long, value_name = "N", value_parser = parse_table)]
    pub table: Option<u32>,

    /// Priority of the `fwmark MARK/MASK lookup TABLE` rule (lower is consulted earlier;
    /// must come before the main table's 32766). [default: 4700]
    #[arg(long = "rule-priority", value_name = "N", value_parser = clap::value_parser!(u32).range(1..32766))]
    pub rule_priority: Option<u32>,

    /// Give up connecting to the upstream after this long (e.g. `5s`, `500ms`) and reset the
    /// client. [default: 10s]
    #[arg(long = "connect-timeout", value_name = "DURATION", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,

    /// Close a relayed connection after no bytes moved either way for this long.
    /// [default: 5m]
    #[arg(long = "idle-timeout", value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,

    /// End a UDP session after no datagram moved either way for this long. [default: 60s]
    #[arg(long = "udp-idle-timeout", value_name = "DURATION", value_parser = parse_duration)]
    pub udp_idle_timeout: Option<Duration>,

    /// Most UDP sessions at once; datagrams of new flows beyond it are dropped (and counted).
    /// Each session holds two file descriptors. [default: 8192]
    #[arg(long = "udp-max-sessions", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub udp_max_sessions: Option<u32>,

    /// Most UDP sessions at once for one client address (each of its source ports and
    /// destinations is a session), so that no client can take them all; datagrams of its
    /// new flows beyond it are dropped (and counted). [default: a quarter of
    /// --udp-max-sessions]
    #[arg(long = "udp-max-sessions-per-source", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub udp_max_sessions_per_source: Option<u32>,

    /// Serve Prometheus metrics on `/metrics` at this address, with `/healthz` and `/readyz`
    /// for probes. Keep it on loopback or a management network.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_socket_addr)]
    pub metrics: Option<SocketAddr>,

    /// Once set up, run as this user (with only CAP_NET_ADMIN, CAP_NET_BIND_SERVICE and
    /// CAP_NET_RAW, which tproxy keeps in any case). The configuration file must stay readable to it for reloads.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,

    /// Connect to upstreams from the client's own address (IP_TRANSPARENT), so that servers
    /// see the client instead of this host (TCP). The servers' replies must route back
    /// through this host, and a `bypass` rule on the interface they arrive on must hand them
    /// to tproxy's sockets (see the README).
    #[arg(long = "transparent-upstream")]
    pub transparent_upstream: bool,

    /// Reset a connection when one direction has stayed open this long after the other ended
    /// (half-close). [default: 60s]
    #[arg(long = "half-close-timeout", value_name = "DURATION", value_parser = parse_duration)]
    pub half_close_timeout: Option<Duration>,

    /// Most TCP connections relayed at once; beyond it new ones are reset (and counted).
    /// [default: what the open-files limit allows: (limit - 256) / 2]
    #[arg(long = "max-connections", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,

    /// Most TCP connections relayed at once for one client address, so that no client can
    /// take them all. [default: a quarter of --max-connections]
    #[arg(long = "max-connections-per-source", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_source: Option<u32>,

    /// SO_MARK on tproxy's own per-flow UDP sockets, by which the eBPF program tells them from
    /// other local sockets. It must not match the routing rule (MARK under MASK), or replies
    /// would be delivered locally instead of sent. [default: 0x2000000]
    #[arg(long = "socket-mark", value_name = "MARK", value_parser = parse_socket_mark)]
    pub socket_mark: Option<u32>,

    /// Keep the program's links and maps pinned (under --pin-dir), so that steering outlives
    /// the process: the next `tproxy run --pin` adopts them without a gap, and one started
    /// while this one runs takes its listeners over (see the README's restart section).
    /// `tproxy cleanup` removes what is left pinned.
    #[arg(long)]
    pub pin: bool,

    /// The directory, on a bpf filesystem, that holds --pin's state. [default: /sys/fs/bpf/tproxy]
    #[arg(long = "pin-dir", value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,

    /// What happens to a packet a steer rule takes when no listener can get it (no tproxy
    /// process runs over pinned state, or the listener has no socket for the packet's family),
    /// and to a later fragment whose first fragment was not seen (any port: without ports its
    /// flow cannot be told): `open` passes it on untouched, `closed` drops it. [default: open]
    #[arg(long = "fail-mode", value_name = "MODE", value_parser = parse_fail_mode)]
    pub fail_mode: Option<FailMode>,

    /// On SIGTERM, or when a new instance takes over, stop accepting and give the connections
    /// and UDP sessions in flight this long to finish before resetting the rest; a second
    /// SIGTERM or SIGINT resets them at once, and 0s does not wait. [default: 30s]
    #[arg(long = "drain-timeout", value_name = "DURATION", value_parser = parse_drain_timeout)]
    pub drain_timeout: Option<Duration>,
}

/// What steering does with a packet for which there is no listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailMode {
    /// Pass it on untouched: unproxied traffic flows while no listener is there.
    #[default]
    Open,
    /// Drop it: nothing a steer rule takes ever bypasses the proxy.
    Closed,
}

impl std::fmt::Display for FailMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        })
    }
}

/// `open` or `closed`.
pub fn parse_fail_mode(text: &str) -> Result<FailMode, String> {
    match text {
        "open" => Ok(FailMode::Open),
        "closed" => Ok(FailMode::Closed),
        _ => Err(format!(
            "`{text}` is not a fail mode: use \"open\" or \"closed\""
        )),
    }
}

/// A set of ports given as a list of inclusive ranges (a single port is a range of one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortList(pub Vec<RangeInclusive<u16>>);

impl std::fmt::Display for PortList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, range) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if range.start() == range.end() {
                write!(f, "{}", range.start())?;
            } else {
                write!(f, "{}-{}", range.start(), range.end())?;
            }
        }
        Ok(())
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    let port: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a port number"))?;
    match port {
        0 => Err("port 0 cannot be steered (ports are 1-65535)".into()),
        1..=65535 => Ok(port as u16),
        _ => Err(format!("port {port} is above 65535")),
    }
}

/// Parses `80,443,8000-8100`.
pub fn parse_port_list(text: &str) -> Result<PortList, String> {
    let ranges = text
        .split(',')
        .map(|item| match item.split_once('-') {
            _ if item.trim().is_empty() => Err(format!("empty entry in port list `{text}`")),
            None => parse_port(item).map(|port| port..=port),
            Some((first, last)) => {
                let (first, last) = (parse_port(first)?, parse_port(last)?);
                if first > last {
                    return Err(format!(
                        "range `{}` runs backwards ({first} > {last})",
                        item.trim()
                    ));
                }
                Ok(first..=last)
            }
        })
        .collect::<Result<_, _>>()?;
    Ok(PortList(ranges))
}

/// Parses an IPv4 or IPv6 prefix; a bare address is a host prefix. Host bits are cleared, so
/// `10.1.2.3/8` means `10.0.0.0/8`.
pub fn parse_prefix(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| {
            format!("`{text}` is not an IPv4/IPv6 prefix (like 10.0.0.0/8 or 2001:db8::/32)")
        })
}

/// Parses `ADDR:PORT` (IPv6 in brackets: `[::1]:8080`).
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!("`{text}` is not an ADDR:PORT socket address (like 127.0.0.1:8080 or [::1]:8080)")
    })
}

/// A routing mark and the mask of mark bits it may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub value: u32,
    pub mask: u32,
}

impl std::fmt::Display for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}/{:#x}", self.value, self.mask)
    }
}

fn parse_u32(text: &str, what: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed
        .map_err(|_| format!("`{text}` is not a valid {what} (a 32-bit number, decimal or 0x-hex)"))
}

/// Parses `MARK` or `MARK/MASK`; a bare mark's mask is the mark itself.
pub fn parse_mark(text: &str) -> Result<Mark, String> {
    let (value, mask) = match text.split_once('/') {
        Some((value, mask)) => (parse_u32(value, "mark")?, parse_u32(mask, "mark mask")?),
        None => {
            let value = parse_u32(text, "mark")?;
            (value, value)
        }
    };
    if value == 0 || value & mask == 0 {
        return Err(format!(
            "mark `{text}` sets no bits under its mask: steered packets would be indistinguishable"
        ));
    }
    if value & !mask != 0 {
        return Err(format!("mark `{text}` has bits outside its mask"));
    }
    Ok(Mark { value, mask })
}

/// Parses a non-zero socket mark.
pub fn parse_socket_mark(text: &str) -> Result<u32, String> {
    match parse_u32(text, "socket mark")? {
        0 => Err("--socket-mark 0 would make every unmarked local socket look like ours".into()),
        mark => Ok(mark),
    }
}

/// Parses a routing table id, refusing the kernel's reserved tables.
pub fn parse_table(text: &str) -> Result<u32, String> {
    let table = parse_u32(text, "routing table")?;
    match table {
        0 | 253..=255 => Err(format!(
            "table {table} is reserved by the kernel (unspec/default/main/local); pick another"
        )),
        _ => Ok(table),
    }
}

/// Parses `10s`, `500ms`, `5m`, …; zero is refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_drain_timeout(text)?;
    if duration.is_zero() {
        return Err(format!("duration `{text}` must be greater than zero"));
    }
    Ok(duration)
}

/// A drain timeout: any duration, zero included (what is in flight is reset at once).
pub fn parse_drain_timeout(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration like 10s or 500ms ({e})"))
}

/// A duration as an operator writes one: `0s`, `500ms`, `30s`, `1.5s`, `5m`, `2h`.
pub struct Human(pub Duration);

impl std::fmt::Display for Human {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let duration = self.0;
        let whole = duration.subsec_nanos() == 0;
        let secs = duration.as_secs();
        if duration.is_zero() {
            f.write_str("0s")
        } else if whole && secs.is_multiple_of(3600) {
            write!(f, "{}h", secs / 3600)
        } else if whole && secs.is_multiple_of(60) {
            write!(f, "{}m", secs / 60)
        } else if secs > 0 {
            let text = format!("{:.3}", duration.as_secs_f64());
            write!(f, "{}s", text.trim_end_matches('0').trim_end_matches('.'))
        } else if duration.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", duration.subsec_millis())
        } else {
            write!(f, "{}µs", duration.subsec_micros())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists_and_ranges() {
        let list = parse_port_list("80,443,8000-8002").unwrap();
        assert_eq!(list.0, [80..=80, 443..=443, 8000..=8002]);
        assert_eq!(list.to_string(), "80,443,8000-8002");
        assert_eq!(parse_port_list("65535").unwrap().0, [65535..=65535]);
    }

    #[test]
    fn port_errors_name_the_bad_value() {
        assert!(parse_port_list("0").unwrap_err().contains("port 0"));
        assert!(parse_port_list("65536").unwrap_err().contains("65536"));
        assert!(parse_port_list("90-80").unwrap_err().contains("90-80"));
        assert!(parse_port_list("http").unwrap_err().contains("`http`"));
        assert!(parse_port_list("80,,81")
            .unwrap_err()
            .contains("empty entry"));
    }

    #[test]
    fn prefixes_and_hosts() {
        assert_eq!(
            parse_prefix("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_prefix("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        assert!(parse_prefix("10.0.0.0/33")
            .unwrap_err()
            .contains("10.0.0.0/33"));
        assert!(parse_prefix("example.com")
            .unwrap_err()
            .contains("example.com"));
    }

    #[test]
    fn marks() {
        assert_eq!(
            parse_mark("0x10").unwrap(),
            Mark {
                value: 0x10,
                mask: 0x10
            }
        );
        assert_eq!(
            parse_mark("1/0xff").unwrap(),
            Mark {
                value: 1,
                mask: 0xff
            }
        );
        assert!(parse_mark("0").unwrap_err().contains("sets no bits"));
        assert!(parse_mark("0x3/0x1")
            .unwrap_err()
            .contains("outside its mask"));
        assert!(parse_mark("0xzz").unwrap_err().contains("0xzz"));
    }

    #[test]
    fn tables_and_durations() {
        assert_eq!(parse_table("100").unwrap(), 100);
        assert!(parse_table("254").unwrap_err().contains("reserved"));
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert!(parse_duration("0s")
            .unwrap_err()
            .contains("greater than zero"));
        assert!(parse_duration("soon").unwrap_err().contains("`soon`"));
        assert_eq!(parse_drain_timeout("0s").unwrap(), Duration::ZERO);
        assert!(parse_drain_timeout("later")
            .unwrap_err()
            .contains("`later`"));
    }

    #[test]
    fn durations_print_as_an_operator_writes_them() {
        for (duration, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_micros(250), "250µs"),
        ] {
            assert_eq!(Human(duration).to_string(), text);
        }
    }

    #[test]
    fn help_says_both_transports_are_steered() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("steers chosen TCP and UDP"), "{help}");
    }

    #[test]
    fn run_flags_parse_and_leave_unset_settings_to_the_file_or_defaults() {
        let cli = Cli::try_parse_from(["tproxy", "run", "--iface", "eth0", "--tcp", "80"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!()
        };
        assert!(args.listen.is_empty() && args.mark.is_none() && args.config.is_none());
        assert!(args.dst.is_empty());
        assert!(args.udp.is_none());
    }
}
