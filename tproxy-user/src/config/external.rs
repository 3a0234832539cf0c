//! External listeners as configured: `--on-port`/`--on-ip`, or a `[[listener]]`'s
//! `external`, checked.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use anyhow::{bail, Result};
use tproxy_common::maps::{listener_slot, ExternalListener, ListenerSlot};

use super::file::Location;
use super::RunArgs;

/// Where a listener that tproxy does not own listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum External {
    /// At these addresses, at most one per family (`external = "127.0.0.1:3129"`, or
    /// `--on-port` with `--on-ip`). Flows of a family without an address get the fail mode.
    At(Vec<SocketAddr>),
    /// At this port of each packet's own destination address (`--on-port` alone), which a
    /// listener on the wildcard address answers. The kernel's TPROXY target looks at the
    /// receiving interface's first address instead; for the wildcard listeners proxies
    /// open, both find the same socket.
    OnPort(u16),
}

impl External {
    /// The program's entries for listener `listener`: (socket-map index, where to look).
    pub fn entries(&self, listener: u32, tcp: bool, udp: bool) -> Vec<(u32, ExternalListener)> {
        let mut entries = Vec::new();
        for (wanted, is_tcp) in [(tcp, true), (udp, false)] {
            if !wanted {
                continue;
            }
            for ipv6 in [false, true] {
                let entry =
                    match self {
                        External::OnPort(port) => Some(ExternalListener::new(None, *port)),
                        External::At(addrs) => addrs
                            .iter()
                            .find(|addr| addr.is_ipv6() == ipv6)
                            .map(|addr| {
                                ExternalListener::new(Some(address_bytes(addr.ip())), addr.port())
                            }),
                    };
                if let Some(entry) = entry {
                    let slot = listener_slot(listener, ListenerSlot::of(is_tcp, ipv6));
                    entries.push((slot, entry));
                }
            }
        }
        entries
    }

    /// The addresses whose sockets the program looks for (for `--on-port`, the wildcard of
    /// each family).
    pub fn addresses(&self) -> Vec<SocketAddr> {
        match self {
            External::At(addrs) => addrs.clone(),
            External::OnPort(port) => vec![
                SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), *port),
                SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), *port),
            ],
        }
    }
}

impl fmt::Display for External {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            External::At(addrs) => {
                let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                f.write_str(&addrs.join(", "))
            }
            External::OnPort(port) => write!(f, "port {port} of each destination"),
        }
    }
}

/// An address in network byte order, IPv4 in the first four bytes.
fn address_bytes(ip: IpAddr) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => bytes = v6.octets(),
    }
    bytes
}

/// The external listener of `--on-port`/`--on-ip`, if given.
pub(super) fn of_flags(args: &RunArgs) -> Result<Option<External>> {
    let Some(port) = args.on_port else {
        if !args.on_ip.is_empty() {
            bail!("--on-ip names the address of --on-port's proxy; give --on-port too");
        }
        return Ok(None);
    };
    if !args.listen.is_empty() || args.upstream.is_some() {
        bail!("--on-port hands flows to a proxy tproxy does not run: --listen and --upstream describe tproxy's own listener; give one or the other");
    }
    if port == 0 {
        bail!("--on-port 0: the port a proxy listens on is never 0");
    }
    if args.on_ip.is_empty() {
        return Ok(Some(External::OnPort(port)));
    }
    for (i, ip) in args.on_ip.iter().enumerate() {
        if let Err(reason) = proxy_address(*ip) {
            bail!("--on-ip {ip}: {reason}");
        }
        if args.on_ip[..i]
            .iter()
            .any(|earlier| earlier.is_ipv4() == ip.is_ipv4())
        {
            bail!("--on-ip {ip}: at most one address per address family");
        }
    }
    Ok(Some(External::At(
        args.on_ip
            .iter()
            .map(|ip| SocketAddr::new(*ip, port))
            .collect(),
    )))
}

/// The external listener of `[[listener]]` `name` with `external = …` (`own`: it has
/// `listen` or `upstream` too).
pub(super) fn of_entry(
    name: &str,
    own: bool,
    addrs: &[SocketAddr],
    where_: &Location,
) -> Result<External> {
    if own {
        bail!("{where_}: listener `{name}`: external is a proxy tproxy does not run; listen and upstream describe tproxy's own listener; give one or the other");
    }
    if addrs.is_empty() {
        bail!("{where_}: listener `{name}`: external: give the proxy's address, e.g. \"127.0.0.1:3129\"");
    }
    for (i, addr) in addrs.iter().enumerate() {
        if addr.port() == 0 {
            bail!("{where_}: listener `{name}`: external {addr}: the port a proxy listens on is never 0");
        }
        if let Err(reason) = proxy_address(addr.ip()) {
            bail!("{where_}: listener `{name}`: external {addr}: {reason}");
        }
        if addrs[..i]
            .iter()
            .any(|earlier| earlier.is_ipv4() == addr.is_ipv4())
        {
            bail!("{where_}: listener `{name}`: external: at most one address per address family");
        }
    }
    Ok(External::At(addrs.to_vec()))
}

/// Refuses an address no proxy can take flows on: the program hands a flow only to a
/// socket of the flow's own family, found by a unicast address. (An IPv4-mapped IPv6
/// address would file an IPv4 proxy under IPv6, where no IPv4 flow looks.)
fn proxy_address(ip: IpAddr) -> std::result::Result<(), String> {
    if let IpAddr::V6(v6) = ip {
        if let Some(v4) = v6.to_ipv4_mapped() {
            return Err(format!(
                "an IPv4-mapped IPv6 address; give the IPv4 address {v4} instead"
            ));
        }
    }
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if ip.is_multicast() || broadcast {
        return Err("a multicast or broadcast address; a proxy listens on a unicast one".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_ip(ips: &[&str]) -> Result<Option<External>> {
        of_flags(&RunArgs {
            on_port: Some(3129),
            on_ip: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            ..RunArgs::default()
        })
    }

    #[test]
    fn on_ip_refuses_multicast_and_ipv4_mapped_addresses_naming_them() {
        for (ip, reason) in [
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            (
                "::ffff:127.0.0.1",
                "give the IPv4 address 127.0.0.1 instead",
            ),
        ] {
            let error = on_ip(&[ip]).unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("--on-ip {ip}: ")) && error.contains(reason),
                "{error}"
            );
        }
        assert!(on_ip(&["127.0.0.1", "::1"]).unwrap().is_some());
    }

    #[test]
    fn an_external_entry_refuses_an_ipv4_mapped_address() {
        let text = "external = [\"[::ffff:10.0.0.1]:3129\"]";
        let lines = super::super::file::LineStarts::new(text);
        let where_ = Location::new(std::path::Path::new("tproxy.toml"), &lines, 0..0);
        let addrs = ["[::ffff:10.0.0.1]:3129".parse().unwrap()];
        let error = of_entry("squid", false, &addrs, &where_)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("external [::ffff:10.0.0.1]:3129: an IPv4-mapped IPv6 address"),
            "{error}"
        );
    }

    #[test]
    fn an_address_per_family_fills_only_that_familys_slots() {
        let external = External::At(vec!["127.0.0.1:3129".parse().unwrap()]);
        let entries = external.entries(2, true, false);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].0, listener_slot(2, ListenerSlot::TcpV4));
        assert_eq!(entries[0].1.address[0].to_ne_bytes(), [127, 0, 0, 1]);
        let both = External::At(vec![
            "127.0.0.1:3129".parse().unwrap(),
            "[::1]:3130".parse().unwrap(),
        ]);
        let slots: Vec<u32> = both.entries(0, true, true).iter().map(|e| e.0).collect();
        assert_eq!(slots, [0, 1, 2, 3]);
        assert_eq!(both.entries(0, false, true)[1].1.port, 3130u16.to_be());
    }

    #[test]
    fn on_port_alone_looks_at_each_destination() {
        let entries = External::OnPort(3129).entries(1, true, true);
        assert_eq!(entries.len(), 4);
        assert!(entries
            .iter()
            .all(|(_, e)| e.kind == tproxy_common::maps::EXTERNAL_AT_DESTINATION));
        assert_eq!(External::OnPort(3129).addresses().len(), 2);
    }
}
