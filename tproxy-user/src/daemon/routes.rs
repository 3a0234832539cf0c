//! The host's routes while serving, for rules for local connections with an
//! `out_interface` (see `datapath::out_routes`): tproxy listens to the kernel's route and
//! link events (a route's interface may be renamed, or go with its routes) and mirrors the
//! routes again. As with addresses, an event only says that something changed: the routes
//! are listed again, so lost or bursting events are handled the same way.

use anyhow::{Context, Result};
use futures::{channel::mpsc::UnboundedReceiver, StreamExt};
use rtnetlink::MulticastGroup;

use crate::datapath::steering::Steering;

type Events = UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// A subscription to route and link events.
pub(crate) struct RouteWatch {
    events: Events,
    /// Held only: the connection ends when its last handle goes.
    _handle: rtnetlink::Handle,
}

impl RouteWatch {
    /// Subscribes to IPv4 and IPv6 route events and link events. Made before the routes are
    /// first mirrored, so that none changes unseen in between.
    pub(crate) fn subscribe() -> Result<Self> {
        let (connection, handle, events) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv6Route,
            MulticastGroup::Link,
        ])
        .context("subscribing to route events over rtnetlink")?;
        tokio::spawn(connection);
        Ok(RouteWatch {
            events,
            _handle: handle,
        })
    }
}

/// Waits for the next route or link event, then takes those already queued with it. Never
/// ready without a subscription.
pub(crate) async fn changed(watch: &mut Option<RouteWatch>) -> Option<()> {
    let Some(watch) = watch else {
        return std::future::pending().await;
    };
    watch.events.next().await?;
    while watch.events.try_recv().is_ok() {}
    Some(())
}

/// Mirrors the routes again, when rules have an `out_interface`. On error the maps keep
/// what they held.
pub(crate) fn follow(steering: &mut Steering) {
    // Blocking map work, as a reload's.
    if let Err(error) = tokio::task::block_in_place(|| steering.follow_routes()) {
        log::warn!("following the host's routes for out_interface: {error:#}");
    }
}
