//! tproxy's own policy routing while serving: without its rules and routes every steered
//! packet would be forwarded or dropped rather than delivered, and steering goes on counting
//! it as steered. They go when `lo` is set down (the kernel drops the routes through it), or
//! when someone flushes the table or deletes the rule. tproxy listens to the kernel's rule
//! and route events and puts back what is gone, with a warning naming it.

use anyhow::{Context, Result};
use futures::channel::mpsc::UnboundedReceiver;
use rtnetlink::MulticastGroup;
use tokio::time::Instant;

use crate::{daemon::routes::settled, datapath::routing::PolicyRouting};

type Events = UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// A subscription to rule and route events, with the routing to keep in place.
pub(crate) struct PolicyWatch {
    events: Events,
    /// As in `routes`: the first event of a burst not yet looked at.
    burst_since: Option<Instant>,
    routing: PolicyRouting,
    /// Held only: the connection ends when its last handle goes.
    _handle: rtnetlink::Handle,
}

impl PolicyWatch {
    /// Subscribes, then puts back what went before the subscription (nothing is missed in
    /// between).
    pub(crate) async fn subscribe(routing: PolicyRouting) -> Result<Self> {
        let (connection, handle, events) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Ipv4Rule,
            MulticastGroup::Ipv6Rule,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv6Route,
        ])
        .context("subscribing to rule and route events over rtnetlink")?;
        tokio::spawn(connection);
        let watch = PolicyWatch {
            events,
            burst_since: None,
            routing,
            _handle: handle,
        };
        watch.restore().await;
        Ok(watch)
    }

    /// Puts back what of the routing is gone, saying what.
    pub(crate) async fn restore(&self) {
        match self.routing.restore_missing().await {
            Ok(restored) if restored.is_empty() => {}
            Ok(restored) => log::warn!(
                "tproxy's policy routing lost {} (removed by something else): put back; \
                 steered packets meanwhile were not delivered",
                restored.join(", ")
            ),
            Err(error) => log::error!(
                "putting back tproxy's policy routing, which something removed: {error:#}; \
                 steered packets are not delivered until it is back"
            ),
        }
    }
}

/// Waits for rule or route events until they settle. Never ready without a subscription.
pub(crate) async fn changed(watch: &mut Option<PolicyWatch>) -> Option<()> {
    let Some(watch) = watch else {
        return std::future::pending().await;
    };
    settled(&mut watch.events, &mut watch.burst_since).await
}
