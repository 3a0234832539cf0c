//! Command line: what an operator can say. Each flag's text is turned into a checked value
//! (or an error naming the bad value) by the parsers of [`crate::values`] before anything
//! touches the system.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

use crate::values::{
    parse_drain_timeout, parse_duration, parse_fail_mode, parse_mark, parse_port_list,
    parse_prefix, parse_socket_addr, parse_socket_mark, parse_table, FailMode, Mark, PortList,
};

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
/// file's value, or the default shown. `Default` is no flag at all.
#[derive(Debug, Default, Args)]
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

#[cfg(test)]
mod tests {
    use super::*;

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
