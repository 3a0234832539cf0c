//! Which interfaces the program attaches to: named in the configuration (by name, or by a
//! pattern such as `veth*`), resolved to their ifindex here, each checked to have a framing
//! the program can parse.

use anyhow::{bail, Context, Result};
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};

/// Where the program is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interfaces {
    /// These interfaces: names, and patterns (`veth*`) whose matches are attached as they
    /// appear and detached as they go.
    Named(Vec<String>),
    /// Every interface the program can parse but loopback, followed as they come and go:
    /// the pattern `*` (which leaves `lo` out, see `selects`); `loopback`: `lo` too, named
    /// beside `all`.
    All { loopback: bool },
}

impl Interfaces {
    /// The interfaces as given (the repeated `--iface`, or the file's list): `all` alone is
    /// [`Interfaces::All`] (the kernel refuses an interface of that name), and so is `all`
    /// with `lo`, which it would leave out; `all` beside other names is refused by the
    /// configuration check.
    pub fn from_names(names: &[String]) -> Self {
        match names.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            ["all"] => Interfaces::All { loopback: false },
            ["all", LOOPBACK] | [LOOPBACK, "all"] => Interfaces::All { loopback: true },
            _ => Interfaces::Named(names.to_vec()),
        }
    }

    /// The names and patterns to select interfaces with.
    pub fn entries(&self) -> Vec<String> {
        match self {
            Interfaces::Named(names) => names.clone(),
            Interfaces::All { loopback: false } => vec!["*".to_string()],
            Interfaces::All { loopback: true } => vec!["*".to_string(), LOOPBACK.to_string()],
        }
    }
}

/// What precedes the IP header of a packet at the interface's tc ingress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// An Ethernet header (Ethernet devices, veth, bridges, loopback).
    Ethernet,
    /// Nothing: the packet starts at the IP header (tun, WireGuard, PPP, ipip).
    Ip,
}

/// An interface the program may attach to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Link {
    pub name: String,
    pub index: u32,
    pub framing: Framing,
}

/// Whether a configured interface is a pattern (`*` any run of characters, `?` any one)
/// rather than a name.
pub(crate) fn is_pattern(entry: &str) -> bool {
    entry.contains(['*', '?'])
}

/// The loopback interface: steering there changes the host's own connections (see
/// `datapath::local_origin`), so only its name selects it, never a pattern or `all`.
pub(crate) const LOOPBACK: &str = "lo";

/// Whether the configured `entry` (a name or a pattern) selects the interface `name`.
pub(crate) fn selects(entry: &str, name: &str) -> bool {
    match name {
        LOOPBACK => entry == LOOPBACK,
        _ => matches(entry, name),
    }
}

/// Whether `name` is `entry`: the same name, or matched by the pattern (as text: which
/// interfaces an entry selects is [`selects`]).
pub(crate) fn matches(entry: &str, name: &str) -> bool {
    fn glob(pattern: &[u8], name: &[u8]) -> bool {
        match pattern.split_first() {
            None => name.is_empty(),
            Some((b'*', rest)) => (0..=name.len()).any(|skip| glob(rest, &name[skip..])),
            Some((b'?', rest)) => !name.is_empty() && glob(rest, &name[1..]),
            Some((c, rest)) => name.first() == Some(c) && glob(rest, &name[1..]),
        }
    }
    glob(entry.as_bytes(), name.as_bytes())
}

/// The addresses of this network namespace's interfaces (what `-m addrtype --dst-type
/// LOCAL` calls local, but for `local` routes added by hand).
pub fn host_addresses() -> Result<Vec<std::net::IpAddr>> {
    let addresses = nix::ifaddrs::getifaddrs().context("listing the interfaces' addresses")?;
    Ok(addresses
        .filter_map(|interface| {
            let address = interface.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                return Some(std::net::IpAddr::V4(v4.ip()));
            }
            address
                .as_sockaddr_in6()
                .map(|v6| std::net::IpAddr::V6(v6.ip()))
        })
        .collect())
}

/// How packets of a link type reach tc ingress; `None` for a type the program cannot parse.
fn framing(kind: LinkLayerType) -> Option<Framing> {
    match kind {
        LinkLayerType::Ether | LinkLayerType::Loopback => Some(Framing::Ethernet),
        // These drivers reset the MAC header to the network header before handing a packet
        // up, so tc sees it at the IP header.
        LinkLayerType::None
        | LinkLayerType::Ppp
        | LinkLayerType::Tunnel
        | LinkLayerType::Tunnel6 => Some(Framing::Ip),
        _ => None,
    }
}

/// The name of the link a netlink message describes.
pub(crate) fn name_of(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

/// Every link in this network namespace.
pub(crate) async fn list_links(netlink: &rtnetlink::Handle) -> Result<Vec<LinkMessage>> {
    netlink
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("listing interfaces")
}

/// The links of `links` that `entries` (names and patterns) select and the program can
/// parse, each once.
pub(crate) fn selected(entries: &[String], links: &[LinkMessage]) -> Vec<Link> {
    links
        .iter()
        .filter_map(|link| {
            let name = name_of(link)?;
            entries
                .iter()
                .any(|entry| selects(entry, &name))
                .then_some(())?;
            Some(Link {
                name,
                index: link.header.index,
                framing: framing(link.header.link_layer_type)?,
            })
        })
        .collect()
}

/// The interfaces to attach to at start, selected by `entries` (names and patterns, see
/// [`Interfaces::entries`]). A name must exist here and have a framing the program can
/// parse; a pattern may match nothing yet (links that appear later are attached as they
/// come, see `daemon::links`).
pub(crate) async fn resolve_interfaces(
    netlink: &rtnetlink::Handle,
    entries: &[String],
) -> Result<Vec<Link>> {
    let links = list_links(netlink).await?;
    for iface in entries.iter().filter(|entry| !is_pattern(entry)) {
        let link = links
            .iter()
            .find(|link| name_of(link).as_deref() == Some(iface.as_str()))
            .with_context(|| {
                format!("--iface {iface}: no such interface in this network namespace")
            })?;
        let kind = link.header.link_layer_type;
        if framing(kind).is_none() {
            bail!("--iface {iface}: link type {kind} is neither Ethernet nor IP-only (tun, WireGuard, PPP, ipip); the program cannot parse its packets");
        }
    }
    let resolved = selected(entries, &links);
    for pattern in entries.iter().filter(|entry| is_pattern(entry)) {
        if !resolved.iter().any(|link| selects(pattern, &link.name)) {
            log::warn!(
                "--iface {pattern}: no interface matches yet; tproxy attaches to those that appear"
            );
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_names() {
        assert!(matches("veth*", "veth0"));
        assert!(matches("veth*", "veth"));
        assert!(!matches("veth*", "xveth0"));
        assert!(matches("wg?", "wg0"));
        assert!(!matches("wg?", "wg10"));
        assert!(matches("*-tp*", "veth-tp12"));
        assert!(matches("eth0", "eth0"));
        assert!(!matches("eth0", "eth01"));
        assert!(is_pattern("veth*") && is_pattern("wg?") && !is_pattern("docker0"));
    }

    #[test]
    fn only_its_name_selects_loopback() {
        assert!(selects("lo", "lo"));
        for entry in ["*", "l*", "lo*", "l?", "lo?*"] {
            assert!(!selects(entry, "lo"), "{entry}");
        }
        assert!(selects("*", "eth0") && selects("lo*", "lo0") && selects("l?", "l0"));
    }

    #[test]
    fn all_is_every_interface_but_loopback() {
        let entries = Interfaces::All { loopback: false }.entries();
        assert!(entries.iter().any(|entry| selects(entry, "veth1a2b")));
        assert!(!entries.iter().any(|entry| selects(entry, "lo")));
    }

    #[test]
    fn all_with_lo_is_every_interface() {
        let names = |names: &[&str]| {
            names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>()
        };
        for given in [names(&["all", "lo"]), names(&["lo", "all"])] {
            let interfaces = Interfaces::from_names(&given);
            assert_eq!(interfaces, Interfaces::All { loopback: true });
            let entries = interfaces.entries();
            for name in ["veth1a2b", "lo"] {
                assert!(entries.iter().any(|entry| selects(entry, name)), "{name}");
            }
        }
        assert_eq!(
            Interfaces::from_names(&names(&["all", "eth0"])),
            Interfaces::Named(names(&["all", "eth0"]))
        );
    }
}
