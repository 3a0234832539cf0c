//! The flags of `tproxy run` and `tproxy check`: the configuration source beside the file,
//! which [`Config::build`](super::Config::build) combines with it.

use std::{net::SocketAddr, path::PathBuf};

use clap::Args;
use ipnet::IpNet;
use tproxy_common::local_origin::UidRange;

use super::SettingFlags;
use crate::{
    datapath::local_origin::LocalOrigin,
    values::{
        parse_gid_range, parse_port_list, parse_prefix, parse_socket_addr, parse_uid_range,
        PortList,
    },
};

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

    /// Steer the connections that this host's own processes make, as the mangle OUTPUT
    /// recipe does: a TCP connection, a UDP socket's `connect()`, or a datagram an unconnected
    /// UDP socket sends (`sendto`, decided per datagram), to a destination the rules steer
    /// goes to the listener, for the processes --cgroup and --uid select (default: all of
    /// them, except tproxy itself). With --iface as well, arrivals there are steered too.
    #[arg(long, conflicts_with = "relay_only")]
    pub local: bool,

    /// With --local: only processes in this cgroup v2 (a path from the cgroup v2 root, e.g.
    /// `/system.slice/app.service`, and its descendants; repeat for several).
    /// [default: / (every process)]
    #[arg(long = "cgroup", value_name = "PATH", requires = "local")]
    pub cgroups: Vec<String>,

    /// With --local: only processes running as this user id or range (`1000`, `1000-1999`;
    /// repeat for several, at most 16). [default: every user]
    #[arg(long = "uid", value_name = "UID[-UID]", requires = "local", value_parser = parse_uid_range)]
    pub uids: Vec<UidRange>,

    /// With --local: only processes whose (real) group id is this one or in this range
    /// (`23333`, `1000-1999`; repeat for several, at most 8), as `-m owner --gid-owner`
    /// selects a proxy's group. [default: every group]
    #[arg(long = "gid", value_name = "GID[-GID]", requires = "local", value_parser = parse_gid_range)]
    pub gids: Vec<UidRange>,

    /// Run only the listeners and the relay: steering is done by something else, such as an
    /// existing iptables/nft TPROXY rule set pointed at the listeners (give them fixed
    /// ports). No program is attached and no policy routing is installed.
    #[arg(long = "relay-only", conflicts_with_all = ["interfaces", "dst"])]
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

    /// Hand the --tcp/--udp flows to a transparent proxy that tproxy does not run (Squid's
    /// `http_port 3129 tproxy`, HAProxy's `bind … transparent`), listening on this port, as
    /// `-j TPROXY --on-port` does. tproxy binds and relays nothing for it; while nothing
    /// listens there, flows get the --fail-mode treatment.
    #[arg(long = "on-port", value_name = "PORT", conflicts_with_all = ["listen", "upstream"])]
    pub on_port: Option<u16>,

    /// The address --on-port's proxy listens on (at most one per address family; flows of a
    /// family without one get the --fail-mode treatment), as `-j TPROXY --on-ip` does.
    /// Default: each packet's own destination, which a proxy on the wildcard address answers.
    #[arg(long = "on-ip", value_name = "ADDR", requires = "on_port")]
    pub on_ip: Vec<std::net::IpAddr>,

    /// The settings (see [`crate::config::settings`] for the list).
    #[command(flatten)]
    pub settings: SettingFlags,
}

impl RunArgs {
    /// What `--local` selects, if given.
    pub(crate) fn local_origin(&self) -> Option<LocalOrigin> {
        self.local.then(|| {
            LocalOrigin::new(self.cgroups.clone(), self.uids.clone()).with_gids(self.gids.clone())
        })
    }
}
