//! Which interfaces the program attaches to: named in the configuration, resolved to their
//! ifindex here, each checked to exist and to carry Ethernet framing.

use anyhow::{bail, Context, Result};
use futures::TryStreamExt;

use crate::config::Interfaces;

/// The interfaces to attach to, with their ifindex. Each must exist here, once, and carry
/// Ethernet framing: the program parses an Ethernet header, so on an L3 device (WireGuard,
/// tun) it would never steer anything.
pub(crate) async fn resolve_interfaces(
    netlink: &rtnetlink::Handle,
    interfaces: &Interfaces,
) -> Result<Vec<(String, u32)>> {
    use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType};
    let links: Vec<_> = netlink
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("listing interfaces")?;
    let name_of = |link: &rtnetlink::packet_route::link::LinkMessage| {
        link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
    };
    let names = match interfaces {
        Interfaces::Named(names) => names.clone(),
        Interfaces::All => {
            let all: Vec<String> = links
                .iter()
                .filter(|link| link.header.link_layer_type == LinkLayerType::Ether)
                .filter_map(name_of)
                .collect();
            if all.is_empty() {
                bail!("interfaces = \"all\": no Ethernet interface in this network namespace");
            }
            all
        }
    };
    let mut resolved = Vec::new();
    for iface in &names {
        let link = links
            .iter()
            .find(|link| name_of(link).as_deref() == Some(iface.as_str()))
            .with_context(|| {
                format!("--iface {iface}: no such interface in this network namespace")
            })?;
        let kind = link.header.link_layer_type;
        if !matches!(kind, LinkLayerType::Ether | LinkLayerType::Loopback) {
            bail!("--iface {iface}: link type {kind} has no Ethernet header; only Ethernet interfaces can be steered");
        }
        resolved.push((iface.clone(), link.header.index));
    }
    Ok(resolved)
}
