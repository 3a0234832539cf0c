//! `tproxy run`: set everything up in an order where a failure at any step undoes the steps
//! before it, serve until SIGINT/SIGTERM, then take it all down again.
//!
//! Order matters: routing is installed before the program is attached (a marked packet with
//! no local route would be forwarded), and the program is detached before routing is removed.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use futures::TryStreamExt;
use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    time::timeout,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tproxy_common::{decision::Protocol, Outcome};

use crate::{
    cli::RunArgs,
    instance::InstanceLock,
    listener::{self, TransparentListener, Transport},
    relay::{self, RelayConfig, RelayStats},
    routing::{self, PolicyRouting, RoutingSpec},
    steering::{Steering, SteeringSet},
    udp::{UdpConfig, UdpRelay},
};

pub async fn run(args: RunArgs) -> Result<()> {
    // Registered first so that a signal during set-up still goes through the clean-up below.
    let mut signals = Signals::register()?;
    args.validate().map_err(anyhow::Error::msg)?;
    if args.relay_only {
        let listening = bind_listeners(&args, None)?;
        return serve(&args, listening, None, &mut signals).await;
    }

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
        tcp: args.tcp.as_ref(),
        udp: args.udp.as_ref(),
        dst: &args.dst,
        mark: args.mark,
        socket_mark: args.socket_mark,
    })?;
    steering.spawn_log_forwarder()?;
    let listening = bind_listeners(&args, Some(&mut steering))?;
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
    let served = serve(&args, listening, Some(&mut steering), &mut signals).await;
    drop(steering);
    let removed = routing.remove().await.context("removing policy routing");
    served.and(removed)
}

/// The signals `tproxy run` acts on.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    report: Signal,
}

impl Signals {
    fn register() -> Result<Self> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            report: signal(SignalKind::user_defined1())?,
        })
    }
}

/// Binds the listeners for the steered protocols and, when steering, puts them in its
/// socket map.
fn bind_listeners(args: &RunArgs, steering: Option<&mut Steering>) -> Result<Listening> {
    let bind = |steered: bool, transport| match steered {
        true => listener::bind_all(&args.listen, transport),
        false => Ok(Vec::new()),
    };
    let tcp = bind(args.tcp.is_some(), Transport::Tcp)?;
    let udp = bind(args.udp.is_some(), Transport::Udp)?;
    if let Some(steering) = steering {
        for listener in tcp.iter().chain(&udp) {
            steering.register_listener(listener.slot, &listener.socket)?;
        }
    }
    Listening::new(tcp, udp)
}

/// Relays until SIGINT/SIGTERM, attaching the program (when steering) once the relays run.
async fn serve(
    args: &RunArgs,
    listening: Listening,
    mut steering: Option<&mut Steering>,
    signals: &mut Signals,
) -> Result<()> {
    if let Some(upstream) = args.upstream {
        let own: Vec<SocketAddr> = listening.addrs().collect();
        if listener::reaches_own_listener(&own, upstream) {
            bail!("--upstream {upstream} is one of tproxy's own listeners: that would loop");
        }
    }
    let relays = Relays::start(args, listening)?;
    let attached = match steering.as_deref_mut() {
        Some(steering) => attach_all(steering, &args.ifaces)?,
        None => Vec::new(),
    };
    announce_ready(args, &attached, &relays);
    loop {
        tokio::select! {
            _ = signals.interrupt.recv() => log::info!("SIGINT: shutting down"),
            _ = signals.terminate.recv() => log::info!("SIGTERM: shutting down"),
            _ = signals.report.recv() => {
                relays.log_stats(steering.as_deref());
                continue;
            }
        }
        break;
    }
    relays.stop().await;
    relays.log_stats(steering.as_deref());
    Ok(())
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

/// The bound listeners, by transport, with their addresses.
struct Listening {
    tcp: Vec<(SocketAddr, std::net::TcpListener)>,
    udp: Vec<(SocketAddr, std::net::UdpSocket)>,
}

impl Listening {
    fn new(tcp: Vec<TransparentListener>, udp: Vec<TransparentListener>) -> Result<Self> {
        fn with_addr<T: From<socket2::Socket>>(
            listener: TransparentListener,
        ) -> Result<(SocketAddr, T)> {
            let addr = listener
                .socket
                .local_addr()?
                .as_socket()
                .context("listener address")?;
            Ok((addr, T::from(listener.socket)))
        }
        Ok(Listening {
            tcp: tcp.into_iter().map(with_addr).collect::<Result<_>>()?,
            udp: udp.into_iter().map(with_addr).collect::<Result<_>>()?,
        })
    }

    fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let tcp = self.tcp.iter().map(|(addr, _)| *addr);
        tcp.chain(self.udp.iter().map(|(addr, _)| *addr))
    }
}

/// The relays' accept and receive loops, and the connections and sessions they serve.
struct Relays {
    tcp_addrs: Vec<SocketAddr>,
    udp_addrs: Vec<SocketAddr>,
    tcp_stats: Arc<RelayStats>,
    udp: Arc<UdpRelay>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// How long stopping may wait for relay tasks to reset their connections.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

impl Relays {
    fn start(args: &RunArgs, listening: Listening) -> Result<Self> {
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let tcp_addrs: Vec<SocketAddr> = listening.tcp.iter().map(|(addr, _)| *addr).collect();
        let udp_addrs: Vec<SocketAddr> = listening.udp.iter().map(|(addr, _)| *addr).collect();
        let tcp_config = Arc::new(RelayConfig {
            upstream: args.upstream,
            connect_timeout: args.connect_timeout,
            idle_timeout: args.idle_timeout,
            own_listeners: tcp_addrs.clone(),
        });
        let udp = Arc::new(UdpRelay::new(
            UdpConfig {
                upstream: args.upstream,
                idle_timeout: args.udp_idle_timeout,
                max_sessions: args.udp_max_sessions as usize,
                socket_mark: args.socket_mark,
                own_listeners: udp_addrs.clone(),
            },
            shutdown.clone(),
            tasks.clone(),
        ));
        let relays = Relays {
            tcp_addrs,
            udp_addrs,
            tcp_stats: Arc::default(),
            udp,
            shutdown,
            tasks,
        };
        for (_, listener) in listening.tcp {
            relays.tasks.spawn(relay::serve(
                tokio::net::TcpListener::from_std(listener)?,
                tcp_config.clone(),
                relays.tcp_stats.clone(),
                relays.shutdown.clone(),
                relays.tasks.clone(),
            ));
        }
        for (_, socket) in listening.udp {
            relays.tasks.spawn(relays.udp.clone().serve(socket));
        }
        Ok(relays)
    }

    /// Stops accepting and resets the connections in flight; ends the UDP sessions.
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

    /// Logs the eBPF counters and the relays' totals (on SIGUSR1 and at exit).
    fn log_stats(&self, steering: Option<&Steering>) {
        use std::sync::atomic::Ordering::Relaxed;
        match steering.map(Steering::counters) {
            None => {}
            Some(Ok(counters)) => {
                for protocol in Protocol::ALL {
                    let row = &counters[protocol as usize];
                    let line: Vec<String> = Outcome::ALL
                        .iter()
                        .filter(|outcome| {
                            protocol != Protocol::Other || **outcome == Outcome::Passed
                        })
                        .map(|outcome| format!("{}={}", outcome.name(), row[*outcome as usize]))
                        .collect();
                    log::info!("eBPF {} packets: {}", protocol.name(), line.join(" "));
                }
            }
            Some(Err(error)) => log::warn!("reading eBPF counters: {error:#}"),
        }
        let tcp = &self.tcp_stats;
        log::info!(
            "tcp relay: {} connections accepted, {} upstream failures, {} bytes to upstream, {} bytes to clients",
            tcp.accepted.load(Relaxed),
            tcp.upstream_failures.load(Relaxed),
            tcp.bytes_to_upstream.load(Relaxed),
            tcp.bytes_to_client.load(Relaxed),
        );
        log::info!("{}", self.udp.stats.summary());
    }
}

/// Attaches to every `--iface`; returns how each was attached, for the ready line.
fn attach_all(steering: &mut Steering, ifaces: &[String]) -> Result<Vec<String>> {
    ifaces
        .iter()
        .map(|iface| Ok(format!("{iface} ({})", steering.attach(iface)?)))
        .collect()
}

fn announce_ready(args: &RunArgs, attached: &[String], relays: &Relays) {
    let mut steered = Vec::new();
    for (name, ports, listeners) in [
        ("TCP", &args.tcp, &relays.tcp_addrs),
        ("UDP", &args.udp, &relays.udp_addrs),
    ] {
        let Some(ports) = ports else { continue };
        for (family, present) in [
            ("IPv4", listeners.iter().any(SocketAddr::is_ipv4)),
            ("IPv6", listeners.iter().any(SocketAddr::is_ipv6)),
        ] {
            if !present && !args.relay_only {
                log::warn!("no {family} {name} listener: such steered packets are passed untouched (counted as no_listener)");
            }
        }
        let listeners: Vec<String> = listeners.iter().map(ToString::to_string).collect();
        steered.push(format!(
            "{name} ports {ports} (listeners {})",
            listeners.join(", ")
        ));
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
    if args.relay_only {
        log::info!(
            "ready: relay only (steering is left to others): {}; relaying to {upstream}",
            steered.join(" and ")
        );
        return;
    }
    log::info!(
        "ready: steering {} to {dst} arriving on {}; relaying to {upstream}; mark {} table {} rule priority {}",
        steered.join(" and "),
        attached.join(", "),
        args.mark,
        args.table,
        args.rule_priority,
    );
}
