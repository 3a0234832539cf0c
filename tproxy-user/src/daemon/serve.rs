//! Serving, once set up: the phases (serving, draining, handed over), the signals that move
//! between them, the control socket's requests, and the status report it answers with.

use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::{
    cli::RunArgs,
    config::Config,
    daemon::control::{self, Request},
    daemon::instance::InstanceLock,
    datapath::rules::{self},
    datapath::steering::Steering,
    stats::{InstanceStatus, ListenerStatus},
    values::Human,
};
use crate::{
    daemon::reload::reload,
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
    mut config: Config,
    mut relays: Relays,
    mut steering: Option<&mut Steering>,
    interfaces: &[(String, u32)],
    signals: &mut Signals,
    control: &mut Control<'_>,
) -> Result<Ending> {
    let drain_timeout = config.settings.drain_timeout;
    let mut phase = Phase::Serving;
    // While draining after a signal: until when the listeners still accept what reached
    // them before they left the socket map.
    let mut accepting_until: Option<Instant> = None;
    let mut successor: Option<tokio::task::JoinHandle<bool>> = None;
    // Polled only while draining: with this timer running while serving, the relay's p50
    // round trip rose from 52 to 55–75 µs (sockperf ping-pong through the router topology).
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether a signal has been seen since the successor took over.
    let mut signalled_after_handover = false;
    loop {
        let signalled;
        tokio::select! {
            _ = signals.interrupt.recv() => signalled = true,
            _ = signals.terminate.recv() => signalled = true,
            _ = signals.report.recv() => {
                relays.log_stats(steering.as_deref());
                continue;
            }
            _ = signals.reload.recv() => {
                let _ = reload_in_serving(phase, args, &mut config, &mut relays, steering.as_deref_mut(), interfaces);
                continue;
            }
            Some(request) = control.requests.recv() => {
                match request {
                    Request::Reload(stream) => {
                        let outcome = reload_in_serving(phase, args, &mut config, &mut relays, steering.as_deref_mut(), interfaces);
                        control::answer_reload(stream, outcome);
                    }
                    Request::Status(mut stream) => {
                        let report = status_report(&config, &relays, steering.as_deref(), phase, control);
                        // A reader that does not read must not stall the serve loop.
                        let report = serde_json::to_vec(&report).expect("plain data");
                        tokio::task::spawn_blocking(move || {
                            let _ = std::io::Write::write_all(&mut stream, &report);
                        });
                    }
                    Request::Takeover(stream) => {
                        let refusal = if !control.pinned {
                            Some("it runs without --pin, so its program and maps would go with it; stop it first")
                        } else if successor.is_some() {
                            Some("another takeover is in progress")
                        } else if matches!(phase, Phase::Draining { handed_over: true, .. }) {
                            Some("it has handed over already")
                        } else {
                            None
                        };
                        match (refusal, control.lock) {
                            (Some(reason), _) => control::refuse(stream, reason),
                            (None, None) => control::refuse(stream, "it runs without a lock"),
                            (None, Some(lock)) => {
                                let mut stream = stream;
                                let (listeners, fds) = relays.handover_offer();
                                match control::offer(&mut stream, lock.offer_fd(), listeners, &fds) {
                                    Ok(()) => {
                                        log::info!("a new instance is taking over");
                                        successor = Some(tokio::task::spawn_blocking(move || control::await_done(stream)));
                                    }
                                    Err(error) => log::warn!("handing over failed: {error:#}"),
                                }
                            }
                        }
                    }
                }
                continue;
            }
            done = async { successor.as_mut().expect("guarded").await }, if successor.is_some() => {
                successor = None;
                if done.unwrap_or(false) {
                    log::info!("the new instance has taken over; draining for up to {}", Human(drain_timeout));
                    relays.stop_accepting();
                    relays.close_listeners();
                    relays.ready.store(false, std::sync::atomic::Ordering::Relaxed);
                    relays.metrics_stop.cancel();
                    accepting_until = None;
                    phase = Phase::Draining { until: Instant::now() + drain_timeout, handed_over: true };
                    notify_systemd(sd_notify::NotifyState::Stopping);
                } else {
                    log::warn!("the new instance did not take over; this one carries on");
                    if let Some(lock) = control.lock {
                        lock.offer_declined();
                    }
                    if let Some(steering) = steering.as_deref_mut() {
                        // Blocking map work, as a reload's.
                        let reasserted = tokio::task::block_in_place(|| {
                            reassert(&config, &mut relays, steering, interfaces)
                        });
                        if let Err(error) = reasserted {
                            log::error!("restoring this instance's rules and listeners: {error:#}");
                        }
                        if phase != Phase::Serving {
                            // Stopping: new flows keep getting the fail mode.
                            steering.unregister_except(&[]);
                        }
                    }
                }
                continue;
            }
            _ = tick.tick(), if phase != Phase::Serving => {
                let now = Instant::now();
                if accepting_until.is_some_and(|at| now >= at) {
                    accepting_until = None;
                    relays.stop_accepting();
                    if !control.pinned {
                        relays.close_listeners();
                    }
                }
                match phase {
                    Phase::Draining { until, .. } if now >= until => {}
                    Phase::Draining { .. } if accepting_until.is_none() && relays.idle() => {}
                    _ => continue,
                }
                signalled = false;
            }
        }
        // A signal, or the end of the drain.
        match phase {
            Phase::Serving => {
                // New flows get the fail mode from now on (until a successor registers the
                // listeners again); what reached the listeners already is still accepted for
                // a moment, so that no handshake in progress is reset. Both this and the
                // readiness are done before anything says it is draining: whoever reads the
                // log line and then asks /readyz or connects must see the drain.
                if let Some(steering) = steering.as_deref_mut() {
                    steering.unregister_except(&[]);
                }
                relays
                    .ready
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                log::info!("stopping: draining for up to {}", Human(drain_timeout));
                notify_systemd(sd_notify::NotifyState::Stopping);
                accepting_until = Some(Instant::now() + drain_timeout.min(ACCEPT_GRACE));
                phase = Phase::Draining {
                    until: Instant::now() + drain_timeout,
                    handed_over: false,
                };
            }
            // The upgrade path: whoever started the successor stops the old instance next;
            // that must not cut the connections it drains.
            Phase::Draining {
                handed_over: true, ..
            } if signalled && !signalled_after_handover => {
                signalled_after_handover = true;
                log::info!(
                    "already draining for the new instance; the connections in flight keep their \
                     time (signal again to reset them now)"
                );
            }
            Phase::Draining { handed_over, .. } => {
                relays.stop().await;
                relays.log_stats(steering.as_deref());
                return Ok(if handed_over {
                    Ending::HandedOver
                } else {
                    Ending::Stopped
                });
            }
        }
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
    interfaces: &[(String, u32)],
) -> std::result::Result<String, String> {
    if phase != Phase::Serving {
        log::warn!("reload while draining: nothing to reload");
        return Err("tproxy is draining (stopping or handed over): nothing to reload".into());
    }
    // A reload writes and erases up to hundreds of thousands of map entries and waits out the
    // generation switch's grace period: blocking work, kept off the runtime's other workers
    // so the relay goes on moving bytes meanwhile.
    match tokio::task::block_in_place(|| reload(args, config, relays, steering, interfaces)) {
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
    interfaces: &[(String, u32)],
) -> Result<()> {
    steering.forget_rules_in_force()?;
    relays.register_all(steering)?;
    let mut rules = relays.plan(config)?.rules(config);
    rules.extend(relays.retired.iter().cloned());
    steering.install_rules(rules::compile(
        &rules,
        steering.next_generation(),
        interfaces,
    ))?;
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
            tcp: l.tcp.is_some(),
            udp: l.udp.is_some(),
            addresses: l.bound.iter().map(ToString::to_string).collect(),
            upstream: l.upstream.read().unwrap().map(|u| u.to_string()),
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
        rules: config.rules.iter().map(ToString::to_string).collect(),
        stats: relays.stats_sources(steering).snapshot(),
    }
}

/// Tells systemd (Type=notify) where tproxy is; nothing when not started by systemd.
pub(crate) fn notify_systemd(state: sd_notify::NotifyState<'_>) {
    if let Err(error) = sd_notify::notify(&[state]) {
        log::warn!("telling systemd the service state: {error}");
    }
}
