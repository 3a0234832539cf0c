//! tproxy's own policy routing while serving: without its rules and routes every steered
//! packet would be forwarded or dropped rather than delivered, and steering goes on counting
//! it as steered. They go when `lo` is set down (the kernel drops the routes through it), or
//! when someone flushes the table or deletes the rule. tproxy listens to the kernel's events
//! of rules and routes of its table going and of `lo` changing (IPv4 announces no route
//! flushed with a link), and puts back what is gone, with a warning naming it. Other events
//! (a router's churn of other tables) cost nothing but their reading.

use anyhow::{Context, Result};
use futures::{channel::mpsc::UnboundedReceiver, StreamExt};
use rtnetlink::{
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::RouteNetlinkMessage,
    MulticastGroup,
};
use tokio::time::Instant;

use crate::{
    daemon::routes::settled,
    datapath::routing::{route_table, rule_table, PolicyRouting},
};

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
    /// `lo`'s index, whose changes take the routes through it.
    loopback: u32,
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
            MulticastGroup::Link,
        ])
        .context("subscribing to rule and route events over rtnetlink")?;
        tokio::spawn(connection);
        let loopback =
            nix::net::if_::if_nametoindex("lo").context("looking up the loopback interface")?;
        let watch = PolicyWatch {
            events,
            burst_since: None,
            routing,
            loopback,
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

/// Waits for events that may have taken some of the routing away, until they settle. Never
/// ready without a subscription.
pub(crate) async fn changed(watch: &mut Option<PolicyWatch>) -> Option<()> {
    let Some(watch) = watch else {
        return std::future::pending().await;
    };
    let (table, loopback) = (watch.routing.table(), watch.loopback);
    let mut relevant = (&mut watch.events)
        .filter(|(message, _)| futures::future::ready(may_take_routing(message, table, loopback)));
    settled(&mut relevant, &mut watch.burst_since).await
}

/// Whether `message` says a rule or route of `table` went, or `lo` changed; or is an overrun
/// (events lost), which may have said so.
fn may_take_routing(
    message: &NetlinkMessage<RouteNetlinkMessage>,
    table: u32,
    loopback: u32,
) -> bool {
    match &message.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(route)) => {
            route_table(route) == table
        }
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRule(rule)) => {
            rule_table(rule) == table
        }
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewLink(link)
            | RouteNetlinkMessage::DelLink(link)
            | RouteNetlinkMessage::SetLink(link),
        ) => link.header.index == loopback,
        NetlinkPayload::Overrun(_) | NetlinkPayload::Error(_) => true,
        _ => false,
    }
}
