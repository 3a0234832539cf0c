//! Serving, once set up: the phases (serving, draining, handed over), the signals that move
//! between them, the control socket's requests, and the status report it answers with.

use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::{
    config::{Config, RunArgs},
    daemon::control::{self, Request},
    daemon::instance::InstanceLock,
    datapath::steering::Steering,
    stats::{InstanceStatus, ListenerStatus},
    values::Human,
};
use crate::{
    daemon::addresses::{self, AddressWatch},
    daemon::cgroups::{self, CgroupWatch},
    daemon::ipsets,
    daemon::links::{self, LinkWatch},
    daemon::policy::{self, PolicyWatch},
    daemon::reload::{reinstall_rules, reload},
    daemon::routes::{self, RouteWatch},
    relay::external::socket_statuses,
    relay::listeners::{Relays, ACCEPT_GRACE},
};

/// How serving ended.
pub(crate) enum Ending {
    /// Stopped by a signal, after draining.
    Stopped,
    /// A new instance took over; this one drained.
    HandedOver,
}

/// The control socket's side of serving.
pub(crate) struct Control<'a> {
    pub(crate) requests: tokio::sync::mpsc::Receiver<Request>,
    /// The instance lock, to hand to a successor.
    pub(crate) lock: Option<&'a InstanceLock>,
    /// Whether this instance pins its state (and so may hand over).
    pub(crate) pinned: bool,
    /// How the program is attached, per interface.
    pub(crate) attached: Vec<String>,
    /// Link events, when interfaces are named (they are followed as they come and go).
    pub(crate) links: Option<LinkWatch>,
    /// Address events, for the bypass rules of the host's own addresses.
    pub(crate) addresses: Option<AddressWatch>,
    /// Route and link events, with rules for local connections (`out_interface`).
    pub(crate) routes: Option<RouteWatch>,
    /// Rule and route events, for tproxy's own policy routing.
    pub(crate) policy: Option<PolicyWatch>,
    /// Events of the directories the selected cgroups are in, with rules for local
    /// connections.
    pub(crate) cgroups: Option<CgroupWatch>,
}

impl Control<'_> {
    /// Before set-up: nothing attached, no lock to hand over, no link or address events yet.
    pub(crate) fn new(requests: tokio::sync::mpsc::Receiver<Request>) -> Self {
        Control {
            requests,
            lock: None,
            pinned: false,
            attached: Vec::new(),
            links: None,
            addresses: None,
            routes: None,
            policy: None,
            cgroups: None,
        }
    }
}

/// Where serving is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Serving,
    /// Not accepting; connections in flight have until `until`.
    Draining {
        until: Instant,
        handed_over: bool,
    },
}

impl Phase {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::Draining {
                handed_over: false, ..
            } => "draining",
            Phase::Draining {
                handed_over: true, ..
            } => "handed over, draining",
        }
    }
}

/// The signals `tproxy run` acts on.
pub(crate) struct Signals {
    pub(crate) interrupt: Signal,
    pub(crate) terminate: Signal,
    pub(crate) report: Signal,
    pub(crate) reload: Signal,
}

impl Signals {
    pub(crate) fn register() -> Result<Self> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            report: signal(SignalKind::user_defined1())?,
            reload: signal(SignalKind::hangup())?,
        })
    }
}

/// Relays until SIGINT/SIGTERM or until a new instance takes over, then drains; SIGUSR1
/// logs statistics, SIGHUP reloads the configuration. A further SIGINT/SIGTERM ends the
/// drain at once (after a takeover, the second one does: the first is the upgrade path's).
pub(crate) async fn serve(
    args: &RunArgs,
    config: Config,
    relays: Relays,
    steering: Option<&mut Steering>,
    signals: &mut Signals,
    control: &mut Control<'_>,
) -> Result<Ending> {
    let mut server = Server {
        args,
        drain_timeout: config.settings.drain_timeout,
        config,
        relays,
        steering,
        phase: Phase::Serving,
        accepting_until: None,
        signalled_after_handover: false,
    };
    let mut successor: Option<tokio::task::JoinHandle<bool>> = None;
    // Polled only while draining: with this timer running while serving, the relay's p50
    // round trip rose from 52 to 55–75 µs (sockperf ping-pong through the router topology).
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ipset_polls = ipsets::poll_timer(&server.config);
    loop {
        // While a successor takes over, nothing writes rules: its own first rules are written
        // in the generation ours would take. What comes meanwhile waits: after a takeover that
        // fails, `reassert` puts ours back and these follow.
        let rules_writable = successor.is_none();
        let signalled = tokio::select! {
            _ = signals.interrupt.recv() => true,
            _ = signals.terminate.recv() => true,
            _ = signals.report.recv() => {
                server.relays.log_stats(server.steering.as_deref());
                continue;
            }
            _ = signals.reload.recv(), if rules_writable => {
                let _ = server.reload();
                server.watch_cgroups(control);
                ipsets::retime(&mut ipset_polls, &server.config);
                continue;
            }
            Some(request) = control.requests.recv() => {
                if let Some(waiting) = server.answer(request, control, successor.is_some()) {
                    successor = Some(waiting);
                }
                // The request may have been a reload.
                server.watch_cgroups(control);
                ipsets::retime(&mut ipset_polls, &server.config);
                continue;
            }
            () = ipsets::due(&mut ipset_polls), if rules_writable => {
                server.follow_ipsets();
                continue;
            }
            Some(()) = links::changed(&mut control.links), if rules_writable => {
                server.follow_links(control).await;
                continue;
            }
            Some(()) = addresses::changed(&mut control.addresses), if rules_writable => {
                server.follow_addresses();
                continue;
            }
            Some(()) = routes::changed(&mut control.routes), if rules_writable => {
                server.follow_routes();
                continue;
            }
            Some(()) = policy::changed(&mut control.policy), if rules_writable => {
                // After a takeover that failed, what changed meanwhile is restored.
                if server.phase == Phase::Serving {
                    if let Some(watch) = &control.policy {
                        watch.restore().await;
                    }
                }
                continue;
            }
            Some(changes) = cgroups::changed(&mut control.cgroups), if rules_writable => {
                server.follow_cgroups(control, changes);
                continue;
            }
            done = async { successor.as_mut().expect("guarded").await }, if successor.is_some() => {
                successor = None;
                server.successor_answered(done.unwrap_or(false), control);
                continue;
            }
            _ = tick.tick(), if server.phase != Phase::Serving => {
                if !server.drain_over(control) {
                    continue;
                }
                false
            }
        };
        if let Some(ending) = server.stop_or_end(signalled).await {
            return Ok(ending);
        }
    }
}

/// Serving's state between events.
struct Server<'a, 's> {
    args: &'a RunArgs,
    config: Config,
    relays: Relays,
    steering: Option<&'s mut Steering>,
    drain_timeout: Duration,
    phase: Phase,
    /// While draining after a signal: until when the listeners still accept what reached
    /// them before they left the socket map.
    accepting_until: Option<Instant>,
    /// Whether a signal has been seen since the successor took over.
    signalled_after_handover: bool,
}

impl Server<'_, '_> {
    fn reload(&mut self) -> std::result::Result<String, String> {
        reload_in_serving(
            self.phase,
            self.args,
            &mut self.config,
            &mut self.relays,
            self.steering.as_deref_mut(),
        )
    }

    /// Interfaces came or went: attaches and detaches (while serving only: once draining,
    /// the pinned links may be a successor's).
    async fn follow_links(&mut self, control: &mut Control<'_>) {
        if let (Phase::Serving, Some(steering)) = (self.phase, self.steering.as_deref_mut()) {
            links::follow(&self.config, &mut self.relays, steering, control).await;
        }
    }

    /// The host's addresses changed: the bypass rules for them follow (while serving only,
    /// as links).
    fn follow_addresses(&mut self) {
        if let (Phase::Serving, Some(steering)) = (self.phase, self.steering.as_deref_mut()) {
            addresses::follow(&mut self.config, &mut self.relays, steering);
        }
    }

    /// The host's routes changed: their mirror for `out_interface` follows (while serving
    /// only, as the addresses).
    fn follow_routes(&mut self) {
        if let (Phase::Serving, Some(steering)) = (self.phase, self.steering.as_deref_mut()) {
            routes::follow(steering);
        }
    }

    /// Time to read the followed ipsets again: their rules follow (while serving only, as
    /// the addresses).
    fn follow_ipsets(&mut self) {
        if let (Phase::Serving, Some(steering)) = (self.phase, self.steering.as_deref_mut()) {
            ipsets::follow(&mut self.config, &mut self.relays, steering);
        }
    }

    /// A directory the selected cgroups are in changed: the selections follow what is
    /// there now (while serving only, as the addresses).
    fn follow_cgroups(&mut self, control: &mut Control<'_>, changes: cgroups::Changes) {
        if let (Phase::Serving, Some(steering), Some(local)) = (
            self.phase,
            self.steering.as_deref_mut(),
            self.config.local.as_ref(),
        ) {
            cgroups::follow(&mut control.cgroups, local, steering, changes);
        }
    }

    /// After a reload, which may select other cgroups: their directories are watched too.
    fn watch_cgroups(&self, control: &mut Control<'_>) {
        if let (Some(watch), Some(local)) = (control.cgroups.as_mut(), self.config.local.as_ref()) {
            if let Err(error) = watch.watch(local) {
                log::warn!("{error:#}: its re-creation is not followed");
            }
        }
    }

    /// Answers a control-socket request; a takeover that goes ahead returns the task that
    /// waits for the successor's word.
    fn answer(
        &mut self,
        request: Request,
        control: &Control<'_>,
        takeover_in_progress: bool,
    ) -> Option<tokio::task::JoinHandle<bool>> {
        match request {
            Request::Reload(stream) if takeover_in_progress => control::answer_reload(
                stream,
                Err(
                    "a new instance is taking over: reload it, or this one once it carries on"
                        .to_string(),
                ),
            ),
            Request::Reload(stream) => control::answer_reload(stream, self.reload()),
            Request::Status(mut stream) => {
                let report = status_report(
                    &self.config,
                    &self.relays,
                    self.steering.as_deref(),
                    self.phase,
                    control,
                );
                // A reader that does not read must not stall the serve loop.
                let report = serde_json::to_vec(&report).expect("plain data");
                tokio::task::spawn_blocking(move || {
                    let _ = std::io::Write::write_all(&mut stream, &report);
                });
            }
            Request::Takeover(stream) => {
                return self.offer_takeover(stream, control, takeover_in_progress)
            }
        }
        None
    }

    /// Hands the lock and the listening sockets to a new instance that asked, unless this
    /// instance cannot hand over.
    fn offer_takeover(
        &mut self,
        mut stream: std::os::unix::net::UnixStream,
        control: &Control<'_>,
        takeover_in_progress: bool,
    ) -> Option<tokio::task::JoinHandle<bool>> {
        let refusal = if !control.pinned {
            Some("it runs without --pin, so its program and maps would go with it; stop it first")
        } else if takeover_in_progress {
            Some("another takeover is in progress")
        } else if matches!(
            self.phase,
            Phase::Draining {
                handed_over: true,
                ..
            }
        ) {
            Some("it has handed over already")
        } else {
            None
        };
        let lock = match (refusal, control.lock) {
            (None, Some(lock)) => lock,
            (refusal, _) => {
                control::refuse(stream, refusal.unwrap_or("it runs without a lock"));
                return None;
            }
        };
        let (listeners, fds) = self.relays.handover_offer();
        match control::offer(&mut stream, lock.offer_fd(), listeners, &fds) {
            Ok(()) => {
                log::info!("a new instance is taking over");
                Some(tokio::task::spawn_blocking(move || {
                    control::await_done(stream)
                }))
            }
            Err(error) => {
                log::warn!("handing over failed: {error:#}");
                None
            }
        }
    }

    /// The successor said it is done (`took_over`) or went away: drain for it, or carry on.
    fn successor_answered(&mut self, took_over: bool, control: &Control<'_>) {
        if took_over {
            log::info!(
                "the new instance has taken over; draining for up to {}",
                Human(self.drain_timeout)
            );
            self.relays.stop_accepting();
            self.relays.close_listeners();
            self.relays
                .ready
                .store(false, std::sync::atomic::Ordering::Relaxed);
            self.relays.metrics_stop.cancel();
            self.accepting_until = None;
            self.phase = Phase::Draining {
                until: Instant::now() + self.drain_timeout,
                handed_over: true,
            };
            notify_systemd(sd_notify::NotifyState::Stopping);
            return;
        }
        log::warn!("the new instance did not take over; this one carries on");
        if let Some(lock) = control.lock {
            lock.offer_declined();
        }
        let Some(steering) = self.steering.as_deref_mut() else {
            return;
        };
        // Blocking map work, as a reload's.
        let reasserted =
            tokio::task::block_in_place(|| reassert(&self.config, &mut self.relays, steering));
        if let Err(error) = reasserted {
            log::error!("restoring this instance's rules and listeners: {error:#}");
        }
        if self.phase != Phase::Serving {
            // Stopping: new flows keep getting the fail mode.
            steering.unregister_except(&[]);
        }
    }

    /// A drain tick: ends accepting when its grace is over; whether the drain is over.
    fn drain_over(&mut self, control: &Control<'_>) -> bool {
        let now = Instant::now();
        if self.accepting_until.is_some_and(|at| now >= at) {
            self.accepting_until = None;
            self.relays.stop_accepting();
            if !control.pinned {
                self.relays.close_listeners();
            }
        }
        match self.phase {
            Phase::Draining { until, .. } if now >= until => true,
            Phase::Draining { .. } => self.accepting_until.is_none() && self.relays.idle(),
            Phase::Serving => false,
        }
    }

    /// After a signal (`signalled`) or the end of the drain: starts draining, or ends.
    async fn stop_or_end(&mut self, signalled: bool) -> Option<Ending> {
        match self.phase {
            Phase::Serving => {
                self.start_draining();
                None
            }
            // The upgrade path: whoever started the successor stops the old instance next;
            // that must not cut the connections it drains.
            Phase::Draining {
                handed_over: true, ..
            } if signalled && !self.signalled_after_handover => {
                self.signalled_after_handover = true;
                log::info!(
                    "already draining for the new instance; the connections in flight keep their \
                     time (signal again to reset them now)"
                );
                None
            }
            Phase::Draining { handed_over, .. } => {
                self.relays.stop().await;
                self.relays.log_stats(self.steering.as_deref());
                Some(if handed_over {
                    Ending::HandedOver
                } else {
                    Ending::Stopped
                })
            }
        }
    }

    fn start_draining(&mut self) {
        // New flows get the fail mode from now on (until a successor registers the
        // listeners again); what reached the listeners already is still accepted for
        // a moment, so that no handshake in progress is reset. Both this and the
        // readiness are done before anything says it is draining: whoever reads the
        // log line and then asks /readyz or connects must see the drain.
        if let Some(steering) = self.steering.as_deref_mut() {
            steering.unregister_except(&[]);
        }
        self.relays
            .ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        log::info!("stopping: draining for up to {}", Human(self.drain_timeout));
        notify_systemd(sd_notify::NotifyState::Stopping);
        self.accepting_until = Some(Instant::now() + self.drain_timeout.min(ACCEPT_GRACE));
        self.phase = Phase::Draining {
            until: Instant::now() + self.drain_timeout,
            handed_over: false,
        };
    }
}

/// A reload (SIGHUP or `tproxy reload`) while serving: puts the re-read configuration in
/// force or keeps the current one, logs which, and returns what is in force now or why the
/// new configuration was rejected (for `tproxy reload` to report).
pub(crate) fn reload_in_serving(
    phase: Phase,
    args: &RunArgs,
    config: &mut Config,
    relays: &mut Relays,
    steering: Option<&mut Steering>,
) -> std::result::Result<String, String> {
    if phase != Phase::Serving {
        log::warn!("reload while draining: nothing to reload");
        return Err("tproxy is draining (stopping or handed over): nothing to reload".into());
    }
    // A reload writes and erases up to hundreds of thousands of map entries and waits out the
    // generation switch's grace period: blocking work, kept off the runtime's other workers
    // so the relay goes on moving bytes meanwhile.
    match tokio::task::block_in_place(|| reload(args, config, relays, steering)) {
        Ok(new) => {
            let in_force = format!(
                "{} rules, {} listeners in force",
                new.configured_rules,
                new.listeners.len()
            );
            log::info!("reloaded: {in_force}");
            *config = new;
            Ok(in_force)
        }
        Err(error) => {
            log::error!("reload rejected, the previous configuration stays in force: {error:#}");
            Err(format!("{error:#}"))
        }
    }
}

/// Puts this instance's rules and listeners back in force after a takeover that did not
/// complete: the would-be successor may have changed the shared maps.
pub(crate) fn reassert(
    config: &Config,
    relays: &mut Relays,
    steering: &mut Steering,
) -> Result<()> {
    steering.forget_rules_in_force()?;
    relays.register_all(steering)?;
    reinstall_rules(config, relays, steering)?;
    steering.unregister_except(&relays.slots());
    Ok(())
}

/// What `tproxy status` shows of a running instance.
pub(crate) fn status_report(
    config: &Config,
    relays: &Relays,
    steering: Option<&Steering>,
    phase: Phase,
    control: &Control<'_>,
) -> InstanceStatus {
    let s = &config.settings;
    let listeners = relays
        .listeners
        .iter()
        .map(|l| ListenerStatus {
            name: l.config.name.clone(),
            tcp: l.tcp.is_some() || l.config.external.is_some() && l.config.tcp,
            udp: l.udp.is_some() || l.config.external.is_some() && l.config.udp,
            addresses: l.bound.iter().map(ToString::to_string).collect(),
            upstream: l.upstream.read().unwrap().map(|u| u.to_string()),
            external: l.config.external.as_ref().map(ToString::to_string),
            external_sockets: l
                .config
                .external
                .as_ref()
                .map(|external| socket_statuses(external, l.config.tcp, l.config.udp))
                .unwrap_or_default(),
            packets: steering
                .and_then(|steering| steering.counter_reader().listener_counts(l.slot).ok()),
        })
        .collect();
    InstanceStatus {
        pid: std::process::id(),
        phase: phase.name().into(),
        table: s.table,
        mark: s.mark.to_string(),
        rule_priority: s.rule_priority,
        fail_mode: s.fail_mode.to_string(),
        pinned: control.pinned.then(|| s.pin_dir.display().to_string()),
        attached: control.attached.clone(),
        listeners,
        rules: config
            .rules
            .iter()
            .map(|rule| format!("{rule} {}", config.action_of(rule)))
            .collect(),
        stats: relays.stats_sources(steering).snapshot(),
    }
}

/// Tells systemd (Type=notify) where tproxy is; nothing when not started by systemd.
pub(crate) fn notify_systemd(state: sd_notify::NotifyState<'_>) {
    if let Err(error) = sd_notify::notify(&[state]) {
        log::warn!("telling systemd the service state: {error}");
    }
}
