//! The relays' listeners, reconciled with the configuration: a plan of what a configuration
//! changes is built without touching anything in force (`relay::plan`), then committed
//! here; the TCP and UDP relays serve what the listeners accept, and stop or drain with them.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::time::timeout;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tproxy_common::maps::ListenerSlot;

use crate::{
    config::{reaches_own_listener, ListenerConfig, Settings},
    datapath::rules::{self, Action, Rule},
    datapath::steering::Steering,
    relay::kernel::KernelRelay,
    relay::listener::{HandedListener, HandedSocket, TransparentListener},
    relay::plan::{NewSockets, Plan},
    relay::tcp::{self, RelayConfig, RelayStats, Upstream},
    relay::udp::{UdpConfig, UdpRelay},
    stats,
    values::{Human, TcpRelayMode},
};

/// A listener that is serving.
pub(crate) struct RunningListener {
    pub(crate) config: ListenerConfig,
    /// Its index in the program's socket map.
    pub(crate) slot: u32,
    /// The addresses its sockets are bound to (port 0 resolved).
    pub(crate) bound: Vec<SocketAddr>,
    pub(crate) upstream: Upstream,
    /// Cancelled to stop accepting (TCP) or receiving (UDP); `None`: no such sockets.
    pub(crate) tcp: Option<CancellationToken>,
    pub(crate) udp: Option<CancellationToken>,
    /// Its listening sockets (duplicates of the serving tasks' descriptors), to hand to a
    /// successor and to keep them open while draining.
    pub(crate) sockets: Vec<(ListenerSlot, OwnedFd)>,
}

/// The relays' listeners and the connections and sessions they serve.
pub(crate) struct Relays {
    pub(crate) listeners: Vec<RunningListener>,
    pub(crate) own_addrs: Arc<RwLock<Vec<SocketAddr>>>,
    pub(crate) tcp_config: Arc<RelayConfig>,
    pub(crate) tcp_stats: Arc<RelayStats>,
    pub(crate) udp: Arc<UdpRelay>,
    /// Steer rules that earlier configurations had and a reload dropped: their flows keep
    /// their sockets (see `Rule::retired`).
    pub(crate) retired: Vec<Rule>,
    /// Listening sockets a previous instance handed over, for the first plan to use instead
    /// of binding anew.
    pub(crate) inherited: Vec<(HandedListener, Vec<OwnedFd>)>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
    /// What `/readyz` says: set once set up, cleared when draining.
    pub(crate) ready: Arc<std::sync::atomic::AtomicBool>,
    /// Cancelled once a successor has taken over, so that scrapes reach it instead.
    pub(crate) metrics_stop: CancellationToken,
    /// The listeners in force, for scrapes.
    pub(crate) book: ListenerBook,
}

/// The listeners in force (socket-map slot, configuration), kept current by the reconciler.
pub(crate) type ListenerBook = Arc<RwLock<Vec<(u32, ListenerConfig)>>>;

/// Where the live counters are, for taking snapshots of them; cheap to clone.
#[derive(Clone)]
pub(crate) struct Sources {
    /// The eBPF program's counters, fragment tracking and interfaces; `None` without the
    /// program.
    pub(crate) steering: Option<(
        crate::datapath::steering::CounterReader,
        crate::datapath::fragments::FragmentTracking,
        Arc<crate::datapath::steering::InterfaceEvents>,
        Option<stats::LocalOriginStats>,
    )>,
    pub(crate) tcp: Arc<RelayStats>,
    pub(crate) udp: Arc<UdpRelay>,
}

impl Sources {
    /// The counters now.
    pub(crate) fn snapshot(&self) -> stats::Stats {
        let packets = self.steering.as_ref().and_then(|(counters, ..)| {
            counters
                .read()
                .map_err(|error| log::warn!("reading eBPF counters: {error:#}"))
                .ok()
                .map(stats::Packets)
        });
        stats::Stats {
            packets,
            fragment_tracking: self
                .steering
                .as_ref()
                .map(|(_, fragments, ..)| fragments.entries()),
            interfaces: self
                .steering
                .as_ref()
                .map(|(_, _, interfaces, _)| interfaces.snapshot()),
            local_origin: self.steering.as_ref().and_then(|(.., local)| local.clone()),
            tcp_relay: self.tcp.snapshot(),
            udp_relay: self.udp.stats.snapshot(),
        }
    }
}

/// How long a stopping instance keeps accepting connections that reached its listeners
/// before they left the socket map: a handshake under way takes a round trip to finish.
pub(crate) const ACCEPT_GRACE: Duration = Duration::from_secs(1);

/// How long UDP sessions must have been quiet before a drain may end early: a request sent
/// upstream just before the stop gets this long for its reply.
const UDP_QUIET_BEFORE_STOP: Duration = Duration::from_secs(2);
/// How long stopping may wait for relay tasks to reset their connections.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

impl Relays {
    /// Fails only when `--tcp-relay kernel` was asked for and its program cannot be loaded.
    pub(crate) fn new(settings: &Settings) -> Result<Self> {
        let kernel = match settings.tcp_relay {
            TcpRelayMode::Kernel => Some(Arc::new(
                KernelRelay::load(settings.max_connections)
                    .context("--tcp-relay kernel: setting up the in-kernel relay")?,
            )),
            TcpRelayMode::Splice | TcpRelayMode::Copy => None,
        };
        let tcp_stats = Arc::<RelayStats>::default();
        if let Some(kernel) = &kernel {
            let _ = tcp_stats.kernel.set(kernel.clone());
        }
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let own_addrs = Arc::new(RwLock::new(Vec::new()));
        let udp = Arc::new(UdpRelay::new(
            UdpConfig {
                idle_timeout: settings.udp_idle_timeout,
                max_sessions: settings.udp_max_sessions as usize,
                max_sessions_per_source: settings.udp_max_sessions_per_source as usize,
                socket_mark: settings.socket_mark,
                own_listeners: own_addrs.clone(),
            },
            shutdown.clone(),
            tasks.clone(),
        ));
        Ok(Relays {
            listeners: Vec::new(),
            tcp_config: Arc::new(RelayConfig {
                connect_timeout: settings.connect_timeout,
                idle_timeout: settings.idle_timeout,
                half_close_timeout: settings.half_close_timeout,
                max_connections: settings.max_connections as usize,
                max_connections_per_source: settings.max_connections_per_source as usize,
                transparent_upstream: settings.transparent_upstream,
                socket_mark: settings.socket_mark,
                connect_latency: tcp::connect_latency(),
                own_listeners: own_addrs.clone(),
                mode: settings.tcp_relay,
                kernel,
            }),
            own_addrs,
            tcp_stats,
            udp,
            retired: Vec::new(),
            inherited: Vec::new(),
            ready: Arc::default(),
            metrics_stop: CancellationToken::new(),
            book: Arc::default(),
            shutdown,
            tasks,
        })
    }

    /// Puts a plan in force: new sockets serve, kept listeners take their new upstream,
    /// dropped ones stop accepting (their connections and sessions run on).
    pub(crate) fn commit(&mut self, plan: Plan, mut steering: Option<&mut Steering>) -> Result<()> {
        for (index, config, stop_tcp, stop_udp) in plan.kept {
            let running = &mut self.listeners[index];
            *running.upstream.write().unwrap() = config.upstream;
            for (stop, transport) in [(stop_tcp, &mut running.tcp), (stop_udp, &mut running.udp)] {
                if let Some(token) = transport.take_if(|_| stop) {
                    token.cancel();
                }
            }
            running.sockets.retain(|(slot, _)| match slot.is_tcp() {
                true => !stop_tcp,
                false => !stop_udp,
            });
            running.config = config;
        }
        let mut removed: Vec<RunningListener> = Vec::new();
        for index in plan.removed.iter().rev() {
            removed.push(self.listeners.remove(*index));
        }
        for running in &removed {
            for token in running.tcp.iter().chain(&running.udp) {
                token.cancel();
            }
            if let Some(steering) = steering.as_deref_mut() {
                // A replacement may have taken over the slot already.
                if !plan.new_sockets.iter().any(|n| n.slot == running.slot) {
                    steering.unregister_listener(running.slot)?;
                }
            }
            log::info!(
                "listener `{}` removed; its connections run on",
                running.config.name
            );
        }
        for new in plan.new_sockets {
            self.serve_new_sockets(new)?;
        }
        self.publish_listeners();
        Ok(())
    }

    /// Starts serving a plan's new sockets, in a new listener or a kept one.
    fn serve_new_sockets(&mut self, new: NewSockets) -> Result<()> {
        let index = match new.kept {
            // Indices of kept listeners shift as removed ones go.
            Some(_) => self
                .listeners
                .iter()
                .position(|l| l.config.name == new.config.name),
            None => None,
        };
        let index = match index {
            Some(index) => index,
            None => {
                self.listeners.push(RunningListener {
                    upstream: Arc::new(RwLock::new(new.config.upstream)),
                    config: new.config,
                    slot: new.slot,
                    bound: new.bound,
                    tcp: None,
                    udp: None,
                    sockets: Vec::new(),
                });
                self.listeners.len() - 1
            }
        };
        let running = &mut self.listeners[index];
        if !new.tcp.is_empty() {
            let stop = CancellationToken::new();
            for socket in new.tcp {
                running.sockets.push(own_descriptor(&socket)?);
                let listener = std::net::TcpListener::from(socket.socket);
                self.tasks.spawn(tcp::serve(
                    tokio::net::TcpListener::from_std(listener)?,
                    running.upstream.clone(),
                    self.tcp_config.clone(),
                    self.tcp_stats.clone(),
                    stop.clone(),
                    self.shutdown.clone(),
                    self.tasks.clone(),
                ));
            }
            running.tcp = Some(stop);
        }
        if !new.udp.is_empty() {
            let stop = CancellationToken::new();
            for socket in new.udp {
                running.sockets.push(own_descriptor(&socket)?);
                let socket = std::net::UdpSocket::from(socket.socket);
                self.tasks.spawn(self.udp.clone().serve(
                    socket,
                    running.upstream.clone(),
                    stop.clone(),
                ));
            }
            running.udp = Some(stop);
        }
        Ok(())
    }

    /// Shares what the listeners are now with the relay (its own addresses) and the stats
    /// (slot to listener), and warns of an upstream that is one of them.
    fn publish_listeners(&self) {
        *self.own_addrs.write().unwrap() = self
            .listeners
            .iter()
            .flat_map(|l| l.bound.clone())
            .collect();
        *self.book.write().unwrap() = self
            .listeners
            .iter()
            .map(|l| (l.slot, l.config.clone()))
            .collect();
        for running in &self.listeners {
            if let Some(upstream) = *running.upstream.read().unwrap() {
                if reaches_own_listener(&self.own_addrs.read().unwrap(), upstream) {
                    log::warn!("listener `{}`: upstream {upstream} is one of tproxy's own listeners; its connections will be refused", running.config.name);
                }
            }
        }
    }

    /// The steer rules of `old` that `new` no longer has, with those retired before: they
    /// keep matching established flows (only) after the switch.
    pub(crate) fn retired_after(&self, old: &[Rule], new: &[Rule]) -> Vec<Rule> {
        let candidates = self
            .retired
            .iter()
            .chain(old.iter().filter(|r| matches!(r.action, Action::Steer(_))));
        rules::retire(candidates, new)
    }

    /// The listeners and their sockets' descriptors, for a successor.
    pub(crate) fn handover_offer(&self) -> (Vec<HandedListener>, Vec<RawFd>) {
        let mut fds = Vec::new();
        let listeners = self
            .listeners
            .iter()
            .map(|l| HandedListener {
                name: l.config.name.clone(),
                listen: l.config.listen.clone(),
                bound: l.bound.clone(),
                sockets: l
                    .sockets
                    .iter()
                    .map(|(slot, fd)| {
                        fds.push(fd.as_raw_fd());
                        HandedSocket::from(*slot)
                    })
                    .collect(),
            })
            .collect();
        (listeners, fds)
    }

    /// Stops every listener accepting (TCP) and receiving (UDP); connections and sessions in
    /// flight run on. The sockets stay open while [`Relays::close_listeners`] has not run.
    pub(crate) fn stop_accepting(&mut self) {
        for listener in &mut self.listeners {
            for token in listener.tcp.take().iter().chain(&listener.udp.take()) {
                token.cancel();
            }
        }
    }

    /// Closes this process's hold on the listening sockets.
    pub(crate) fn close_listeners(&mut self) {
        for listener in &mut self.listeners {
            listener.sockets.clear();
        }
    }

    /// Puts every listening socket (back) into the socket map, and the external listeners'
    /// addresses (back) into the program.
    pub(crate) fn register_all(&self, steering: &mut Steering) -> Result<()> {
        for listener in &self.listeners {
            for (slot, fd) in &listener.sockets {
                steering.register_listener(listener.slot, *slot, fd)?;
            }
            if let Some(external) = &listener.config.external {
                let entries =
                    external.entries(listener.slot, listener.config.tcp, listener.config.udp);
                steering.set_external_listener(listener.slot, &entries)?;
            }
        }
        Ok(())
    }

    /// The socket-map slots of the listeners in use.
    pub(crate) fn slots(&self) -> Vec<u32> {
        self.listeners.iter().map(|l| l.slot).collect()
    }

    /// Whether nothing is being relayed: no TCP connection, and no UDP session that moved a
    /// datagram lately. A UDP session lives until its idle timeout (a minute by default),
    /// longer than a drain: waiting for those would make every stop of a DNS router take
    /// the whole drain.
    pub(crate) fn idle(&self) -> bool {
        self.tcp_stats.active() == 0 && !self.udp.busy_within(UDP_QUIET_BEFORE_STOP)
    }

    /// Stops accepting and resets the connections in flight; ends the UDP sessions.
    pub(crate) async fn stop(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        if timeout(STOP_TIMEOUT, self.tasks.wait()).await.is_err() {
            log::warn!(
                "{} relay tasks did not stop within {}",
                self.tasks.len(),
                Human(STOP_TIMEOUT)
            );
        }
    }

    /// Logs the eBPF counters and the relays' totals (on SIGUSR1 and at exit).
    pub(crate) fn log_stats(&self, steering: Option<&Steering>) {
        for line in self.stats_sources(steering).snapshot().log_lines() {
            log::info!("{line}");
        }
    }

    /// Where the counters of this instance are.
    pub(crate) fn stats_sources(&self, steering: Option<&Steering>) -> Sources {
        Sources {
            steering: steering.map(|steering| {
                (
                    steering.counter_reader(),
                    steering.fragments().clone(),
                    steering.interface_events(),
                    steering.local_origin().cloned(),
                )
            }),
            tcp: self.tcp_stats.clone(),
            udp: self.udp.clone(),
        }
    }
}

/// A listening socket's slot, and a descriptor of it of our own.
pub(crate) fn own_descriptor(socket: &TransparentListener) -> Result<(ListenerSlot, OwnedFd)> {
    Ok((socket.slot, socket.socket.try_clone()?.into()))
}
