//! `tproxy run`: set everything up in an order where a failure at any step undoes the steps
//! before it, serve until SIGINT/SIGTERM, then take it all down again.
//!
//! Order matters: routing is installed before the program is attached (a marked packet with
//! no local route would be forwarded), and the program is detached before routing is removed.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use futures::TryStreamExt;
use tokio::{
    signal::unix::{signal, SignalKind},
    time::timeout,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tproxy_common::Outcome;

use crate::{
    cli::RunArgs,
    instance::InstanceLock,
    listener::{self, TransparentListener},
    relay::{self, RelayConfig, RelayStats},
    routing::{self, PolicyRouting, RoutingSpec},
    steering::{Steering, SteeringSet},
};

pub async fn run(args: RunArgs) -> Result<()> {
    // Registered first so that a signal during set-up still goes through the clean-up below.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let netlink = routing::connect()?;
    check_interfaces(&netlink, &args.ifaces).await?;

    let _lock = InstanceLock::acquire(args.table)?;
    let stale = routing::remove_ours(&netlink, args.table).await?;
    if stale > 0 {
        log::warn!(
            "removed {stale} rules/routes left in table {} by a tproxy that did not shut down",
            args.table
        );
    }

    let mut steering = Steering::load(&SteeringSet {
        tcp: &args.tcp,
        dst: &args.dst,
        mark: args.mark,
    })?;
    steering.spawn_log_forwarder()?;
    let listeners = listener::bind_tcp(&args.listen)?;
    for listener in &listeners {
        steering.register_listener(listener.slot, &listener.socket)?;
    }
    let relay_config = relay_config(&args, &listeners)?;

    let routing = PolicyRouting::install(
        &netlink,
        RoutingSpec {
            mark: args.mark.value,
            mask: args.mark.mask,
            table: args.table,
            priority: args.rule_priority,
        },
    )
    .await?;
    let served = async {
        let relays = start_relays(listeners, relay_config)?;
        let attached = attach_all(&mut steering, &args.ifaces)?;
        announce_ready(&args, &attached, &relays.addrs);
        tokio::select! {
            _ = interrupt.recv() => log::info!("SIGINT: shutting down"),
            _ = terminate.recv() => log::info!("SIGTERM: shutting down"),
        }
        relays.stop().await;
        log_counters(&steering, &relays.stats);
        Ok::<_, anyhow::Error>(())
    }
    .await;
    drop(steering);
    let removed = routing.remove().await.context("removing policy routing");
    served.and(removed)
}

/// Each `--iface` must exist here, once, and carry Ethernet framing: the program parses an
/// Ethernet header, so on an L3 device (WireGuard, tun) it would never steer anything.
async fn check_interfaces(netlink: &rtnetlink::Handle, ifaces: &[String]) -> Result<()> {
    use rtnetlink::packet_route::link::LinkLayerType;
    for (i, iface) in ifaces.iter().enumerate() {
        if ifaces[..i].contains(iface) {
            bail!("--iface {iface} is given twice");
        }
        let link = netlink
            .link()
            .get()
            .match_name(iface.clone())
            .execute()
            .try_next()
            .await
            .ok()
            .flatten()
            .with_context(|| {
                format!("--iface {iface}: no such interface in this network namespace")
            })?;
        let kind = link.header.link_layer_type;
        if !matches!(kind, LinkLayerType::Ether | LinkLayerType::Loopback) {
            bail!("--iface {iface}: link type {kind} has no Ethernet header; only Ethernet interfaces can be steered");
        }
    }
    Ok(())
}

fn relay_config(args: &RunArgs, listeners: &[TransparentListener]) -> Result<RelayConfig> {
    let own_listeners = listeners
        .iter()
        .map(|l| l.socket.local_addr())
        .collect::<Result<Vec<_>, _>>()?;
    let config = RelayConfig {
        upstream: args.upstream,
        connect_timeout: args.connect_timeout,
        idle_timeout: args.idle_timeout,
        own_listeners,
    };
    if let Some(upstream) = args.upstream {
        if config.own_listeners.contains(&upstream) {
            bail!("--upstream {upstream} is one of tproxy's own listeners: that would loop");
        }
    }
    Ok(config)
}

/// The accept loops, one per listener, and the connections they relay.
struct Relays {
    addrs: Vec<SocketAddr>,
    stats: Arc<RelayStats>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// How long stopping may wait for relay tasks to reset their connections.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

impl Relays {
    /// Stops accepting and resets the connections in flight.
    async fn stop(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        if timeout(STOP_TIMEOUT, self.tasks.wait()).await.is_err() {
            log::warn!(
                "{} relay tasks did not stop within {STOP_TIMEOUT:?}",
                self.tasks.len()
            );
        }
    }
}

fn start_relays(listeners: Vec<TransparentListener>, config: RelayConfig) -> Result<Relays> {
    let config = Arc::new(config);
    let mut relays = Relays {
        addrs: Vec::new(),
        stats: Arc::default(),
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
    };
    for TransparentListener { slot: _, socket } in listeners {
        relays.addrs.push(socket.local_addr()?);
        let socket = tokio::net::TcpListener::from_std(socket)?;
        relays.tasks.spawn(relay::serve(
            socket,
            config.clone(),
            relays.stats.clone(),
            relays.shutdown.clone(),
            relays.tasks.clone(),
        ));
    }
    Ok(relays)
}

/// Attaches to every `--iface`; returns how each was attached, for the ready line.
fn attach_all(steering: &mut Steering, ifaces: &[String]) -> Result<Vec<String>> {
    ifaces
        .iter()
        .map(|iface| Ok(format!("{iface} ({})", steering.attach(iface)?)))
        .collect()
}

fn announce_ready(args: &RunArgs, attached: &[String], listeners: &[SocketAddr]) {
    for (family, present) in [
        ("IPv4", listeners.iter().any(SocketAddr::is_ipv4)),
        ("IPv6", listeners.iter().any(SocketAddr::is_ipv6)),
    ] {
        if !present {
            log::warn!("no {family} listener: steered {family} packets are passed untouched (counted as no_listener)");
        }
    }
    let dst = if args.dst.is_empty() {
        "any destination".to_string()
    } else {
        let prefixes: Vec<String> = args.dst.iter().map(ToString::to_string).collect();
        prefixes.join(", ")
    };
    let upstream = args
        .upstream
        .map_or("the original destination".to_string(), |u| u.to_string());
    let listeners: Vec<String> = listeners.iter().map(ToString::to_string).collect();
    log::info!(
        "ready: steering TCP ports {} to {dst} arriving on {}; listeners {}; relaying to {upstream}; \
         mark {} table {} rule priority {}",
        args.tcp,
        attached.join(", "),
        listeners.join(", "),
        args.mark,
        args.table,
        args.rule_priority,
    );
}

fn log_counters(steering: &Steering, stats: &RelayStats) {
    use std::sync::atomic::Ordering::Relaxed;
    match steering.counters() {
        Ok(counts) => {
            let line: Vec<String> = Outcome::ALL
                .iter()
                .zip(counts)
                .map(|(outcome, count)| format!("{}={count}", outcome.name()))
                .collect();
            log::info!("eBPF packets: {}", line.join(" "));
        }
        Err(error) => log::warn!("reading eBPF counters: {error:#}"),
    }
    log::info!(
        "relay: {} connections accepted, {} upstream failures, {} bytes to upstream, {} bytes to clients",
        stats.accepted.load(Relaxed),
        stats.upstream_failures.load(Relaxed),
        stats.bytes_to_upstream.load(Relaxed),
        stats.bytes_to_client.load(Relaxed),
    );
}
