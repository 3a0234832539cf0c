//! The host's own addresses while serving: bypass rules with `dst = "local"` (what
//! `-m addrtype --dst-type LOCAL -j RETURN` and nft's `fib daddr type local return` become)
//! follow them. tproxy listens to the kernel's address events and puts the rules in force
//! again for the addresses listed then.
//!
//! Bypass rules with `dst = "anycast"` (what `--dst-type ANYCAST` and nft's `fib daddr type
//! anycast` become) follow the routes that decide it the same way, on the kernel's route
//! events.
//!
//! As with links (see `links`), an event only says that something changed: the addresses
//! and routes are listed again, so that lost or bursting events are handled the same way.

use anyhow::{Context, Result};
use futures::{channel::mpsc::UnboundedReceiver, StreamExt};
use rtnetlink::MulticastGroup;

use crate::{
    config::Config,
    daemon::reload::reinstall_rules,
    datapath::steering::Steering,
    datapath::{interfaces::host_addresses, routing::anycast_destinations},
    relay::listeners::Relays,
};

type Events = UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// A subscription to address events.
pub(crate) struct AddressWatch {
    events: Events,
    /// Held only: the connection ends when its last handle goes.
    _handle: rtnetlink::Handle,
}

impl AddressWatch {
    /// Subscribes to address and route events of both families. Made before the addresses are listed
    /// for the first rules, so that none changes unseen in between.
    pub(crate) fn subscribe() -> Result<Self> {
        let (connection, handle, events) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv6Route,
        ])
        .context("subscribing to address events over rtnetlink")?;
        tokio::spawn(connection);
        Ok(AddressWatch {
            events,
            _handle: handle,
        })
    }
}

/// Waits for the next address event, then takes those already queued with it. Never ready
/// without a subscription.
pub(crate) async fn changed(watch: &mut Option<AddressWatch>) -> Option<()> {
    let Some(watch) = watch else {
        return std::future::pending().await;
    };
    watch.events.next().await?;
    while watch.events.try_recv().is_ok() {}
    Some(())
}

/// Lists the host's addresses and the anycast routes again and, when rules follow them and
/// they changed, puts the rules in force for them.
pub(crate) fn follow(config: &mut Config, relays: &mut Relays, steering: &mut Steering) {
    let mut changed = false;
    if !config.own_address_rules.is_empty() {
        match host_addresses() {
            Ok(addresses) => {
                if config.set_own_addresses(addresses) {
                    log::info!(
                        "the host's addresses changed; bypassing {} local addresses",
                        config.own_addresses.len()
                    );
                    changed = true;
                }
            }
            Err(error) => log::warn!("following the host's addresses: {error:#}"),
        }
    }
    if !config.anycast_rules.is_empty() {
        match anycast_destinations(config.anycast_families()) {
            Ok(destinations) => {
                if config.set_anycast_destinations(destinations) {
                    log::info!(
                        "the anycast routes changed; bypassing {} prefixes",
                        config.anycast_destinations.len()
                    );
                    changed = true;
                }
            }
            Err(error) => log::warn!("following the anycast routes: {error:#}"),
        }
    }
    if !changed {
        return;
    }
    // Blocking map work, as a reload's.
    let reinstalled = tokio::task::block_in_place(|| reinstall_rules(config, relays, steering));
    if let Err(error) = reinstalled {
        log::error!("putting the rules in force for the host's new addresses: {error:#}");
    }
}
