//! The host's routes while serving, for rules for local connections with an
//! `out_interface` (see `datapath::out_routes`): tproxy listens to the kernel's route and
//! link events (a route's interface may be renamed, or go with its routes) and mirrors the
//! routes again. As with addresses, an event only says that something changed: the routes
//! are listed again, so lost events (an overrun of the socket's buffer arrives as an event
//! too) are handled the same way. A burst (a routing daemon loading a table, a VPN coming
//! up) is mirrored once it settles, not once per event.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::{channel::mpsc::UnboundedReceiver, Stream, StreamExt};
use rtnetlink::MulticastGroup;
use tokio::time::Instant;

use crate::datapath::steering::Steering;

type Events = UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// A subscription to route and link events.
pub(crate) struct RouteWatch {
    events: Events,
    /// When the first event of a burst not yet mirrored came: kept here, not in the waiting
    /// future, which the serve loop drops whenever another event wins.
    burst_since: Option<Instant>,
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
            burst_since: None,
            _handle: handle,
        })
    }
}

/// How long the events must pause before the routes are mirrored again.
const QUIET: Duration = Duration::from_millis(50);
/// How long a burst may delay the mirror at most: a steady stream of events is still
/// followed.
const MOST_DELAY: Duration = Duration::from_millis(500);

/// Waits for route or link events until they settle. Never ready without a subscription.
pub(crate) async fn changed(watch: &mut Option<RouteWatch>) -> Option<()> {
    let Some(watch) = watch else {
        return std::future::pending().await;
    };
    settled(&mut watch.events, &mut watch.burst_since).await
}

/// Ready once events have come and then paused for [`QUIET`] (or kept coming for
/// [`MOST_DELAY`]); `None` when the stream ends with no burst pending. Safe to drop at any
/// await: a burst begun stays in `burst_since`, and no event is lost (the stream's `next` is).
pub(crate) async fn settled<S: Stream + Unpin>(
    events: &mut S,
    burst_since: &mut Option<Instant>,
) -> Option<()> {
    loop {
        let Some(first) = *burst_since else {
            events.next().await?;
            *burst_since = Some(Instant::now());
            continue;
        };
        let latest = first + MOST_DELAY;
        let until = (Instant::now() + QUIET).min(latest);
        match tokio::time::timeout_at(until, events.next()).await {
            Ok(Some(_)) if Instant::now() < latest => continue,
            // Quiet, over time, or no more events: what came is mirrored.
            _ => {
                *burst_since = None;
                return Some(());
            }
        }
    }
}

/// Mirrors the routes again, when rules have an `out_interface`. On error the maps keep
/// what they held.
pub(crate) fn follow(steering: &mut Steering) {
    // Blocking map work, as a reload's.
    if let Err(error) = tokio::task::block_in_place(|| steering.follow_routes()) {
        log::warn!("following the host's routes for out_interface: {error:#}");
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    #[tokio::test]
    async fn a_burst_is_one_change() {
        let (sender, mut events) = futures::channel::mpsc::unbounded::<()>();
        let mut burst_since = None;
        for _ in 0..1000 {
            sender.unbounded_send(()).unwrap();
        }
        assert_eq!(settled(&mut events, &mut burst_since).await, Some(()));
        assert!(
            events.try_recv().is_err(),
            "events left after the burst settled"
        );
        drop(sender);
        assert_eq!(settled(&mut events, &mut burst_since).await, None);
    }

    #[tokio::test]
    async fn a_burst_begun_is_not_lost_when_the_wait_is_dropped() {
        let (sender, mut events) = futures::channel::mpsc::unbounded::<()>();
        let mut burst_since = None;
        sender.unbounded_send(()).unwrap();
        // Dropped while waiting for the quiet: another event of the serve loop won.
        assert!(settled(&mut events, &mut burst_since)
            .now_or_never()
            .is_none());
        assert!(burst_since.is_some());
        // No new event: the burst begun is still reported.
        drop(sender);
        assert_eq!(settled(&mut events, &mut burst_since).await, Some(()));
        assert_eq!(settled(&mut events, &mut burst_since).await, None);
    }
}
