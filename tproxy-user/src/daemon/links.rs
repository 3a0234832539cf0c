//! Interfaces that come and go while serving (container veths, bridges, tunnels): tproxy
//! listens to the kernel's link events and attaches the program to the interfaces that
//! appear and match `interfaces`, and detaches it from those that go.
//!
//! An event only says that something changed: the links are listed again and compared with
//! where the program is attached, so that events lost to a full socket buffer, a burst of
//! events or a rename are all handled the same way.

use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use futures::{channel::mpsc::UnboundedReceiver, StreamExt};
use rtnetlink::MulticastGroup;

use crate::{
    config::Config,
    daemon::reload::reinstall_rules,
    daemon::serve::Control,
    datapath::interfaces::{self, Link},
    datapath::rules,
    datapath::steering::Steering,
    relay::listeners::Relays,
};

type Events = UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// A subscription to link events, and what tproxy attaches to.
pub(crate) struct LinkWatch {
    events: Events,
    netlink: rtnetlink::Handle,
    /// The configured names and patterns.
    entries: Vec<String>,
    /// Links whose attaching failed, not tried again while they exist (one warning each,
    /// not one per event).
    failed: Vec<u32>,
}

impl LinkWatch {
    /// Subscribes to link events, to follow the interfaces that `entries` (names and
    /// patterns, see `Interfaces::entries`) select. Made before the links are first listed,
    /// so that none appears unseen in between.
    pub(crate) fn subscribe(entries: Vec<String>) -> Result<Self> {
        let (connection, netlink, events) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
                .context("subscribing to link events over rtnetlink")?;
        tokio::spawn(connection);
        Ok(LinkWatch {
            events,
            netlink,
            entries,
            failed: Vec::new(),
        })
    }
}

/// Waits for the next link event, then takes those already queued with it: a burst is
/// followed once. Never ready without a subscription.
pub(crate) async fn changed(watch: &mut Option<LinkWatch>) -> Option<()> {
    let Some(watch) = watch else {
        return std::future::pending().await;
    };
    watch.events.next().await?;
    while watch.events.try_recv().is_ok() {}
    Some(())
}

/// Attaches to the links that match and are not attached yet, detaches from those that are
/// gone or no longer match, and puts the rules in force again for the new set when a rule
/// names (or has a pattern matching) one of the interfaces that came or went.
pub(crate) async fn follow(
    config: &Config,
    relays: &mut Relays,
    steering: &mut Steering,
    control: &mut Control<'_>,
) {
    let Some(watch) = control.links.as_mut() else {
        return;
    };
    let links = match interfaces::list_links(&watch.netlink).await {
        Ok(links) => links,
        Err(error) => {
            log::warn!("following interfaces: {error:#}");
            return;
        }
    };
    let wanted = interfaces::selected(&watch.entries, &links);
    watch
        .failed
        .retain(|index| wanted.iter().any(|link| link.index == *index));
    let mut changed: Vec<String> = Vec::new();
    for (name, index) in steering.attached_interfaces() {
        if !wanted
            .iter()
            .any(|link| link.index == index && link.name == name)
        {
            steering.detach(index);
            log::info!("detached from {name} (gone or renamed)");
            changed.push(name);
        }
    }
    let attached = steering.attached_interfaces();
    for link in &wanted {
        let new = !attached.iter().any(|(_, index)| *index == link.index);
        if new && !watch.failed.contains(&link.index) {
            match attach(steering, link) {
                Attach::Done => changed.push(link.name.clone()),
                Attach::Gone => {}
                Attach::Failed => watch.failed.push(link.index),
            }
        }
    }
    control.attached = steering.attached_descriptions();
    // A cell of the rules that names an interface, and every cell once rules for local
    // connections exist, holds entries for each attached interface, the ones its rules do
    // not name included (their other rules apply there): any change of the attached set is
    // put in force.
    let by_interface =
        rules::any_local(&config.rules) || config.rules.iter().any(|r| r.iface.is_some());
    if !changed.is_empty() && by_interface {
        // Blocking map work, as a reload's.
        let reinstalled = tokio::task::block_in_place(|| reinstall_rules(config, relays, steering));
        match reinstalled {
            Ok(_) => log::info!(
                "rules in force for the interfaces attached now (after {})",
                changed.join(", ")
            ),
            Err(error) => {
                log::error!("putting the rules in force for the interfaces attached now: {error:#}")
            }
        }
    }
}

/// How attaching to a link that appeared went.
enum Attach {
    Done,
    /// The link went away meanwhile (a container that lived for a moment): nothing to warn
    /// about, and nothing to detach later.
    Gone,
    Failed,
}

fn attach(steering: &mut Steering, link: &Link) -> Attach {
    let error = match steering.attach(link) {
        Ok(mode) => {
            log::info!("attached to {} ({mode})", link.name);
            return Attach::Done;
        }
        Err(error) => error,
    };
    let still_there = nix::net::if_::if_nametoindex(link.name.as_str()) == Ok(link.index);
    if !still_there {
        log::debug!("{} went away before it could be attached to", link.name);
        return Attach::Gone;
    }
    log::warn!("attaching to {}: {error:#}", link.name);
    steering
        .interface_events()
        .attach_failures
        .fetch_add(1, Ordering::Relaxed);
    Attach::Failed
}
