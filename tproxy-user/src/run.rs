//! `tproxy run`: set everything up in an order where a failure at any step undoes the steps
//! before it, serve until SIGINT/SIGTERM (reloading on SIGHUP), then take it all down again.
//!
//! Order matters: routing is installed before the program is attached (a marked packet with
//! no local route would be forwarded), and the program is detached before routing is removed.
//!
//! With `--pin` the program, its maps and the routing outlive the process: a start adopts
//! what an earlier instance left, or takes over from the instance still running (its lock
//! and listening sockets come over the control socket, see `control`), and an exit leaves
//! it all in place for the next one. A stop drains first: accepting ends, the connections
//! and sessions in flight get up to `--drain-timeout` to finish.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use futures::TryStreamExt;
use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    time::timeout,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tproxy_common::{
    decision::Protocol,
    maps::{ListenerSlot, MAX_LISTENERS},
    Outcome,
};

use crate::{
    cli::{FailMode, Human, RunArgs},
    config::{Config, Interfaces, ListenerConfig, Settings},
    daemon::control::{self, HandedListener, HandedSocket, Request},
    daemon::instance::{Held, InstanceLock},
    relay::listener::{self, TransparentListener, Transport},
    metrics,
    datapath::pin::{PinnedBy, PinnedState},
    daemon::privileges,
    relay::tcp::{self, RelayConfig, RelayStats, Upstream},
    datapath::routing::{self, PolicyRouting, RoutingSpec},
    datapath::rules::{self, Action, Rule},
    datapath::steering::{self, LoadSettings, Steering},
    relay::udp::{UdpConfig, UdpRelay},
};

pub async fn run(args: RunArgs, workers: usize) -> Result<()> {
    // Registered first so that a signal during set-up still goes through the clean-up below.
    let mut signals = Signals::register()?;
    let config = Config::build(&args)?;
    let user = config
        .settings
        .user
        .as_deref()
        .map(privileges::resolve_user)
        .transpose()?;
    let mut relays = Relays::new(&config.settings);
    let ready = relays.ready.clone();
    let (control_tx, control_rx) = tokio::sync::mpsc::channel(8);
    let mut control = Control {
        requests: control_rx,
        lock: None,
        pinned: false,
        attached: Vec::new(),
    };
    if args.relay_only {
        relays.serve_metrics(&config.settings, None).await?;
        let plan = relays.plan(&config)?;
        relays.commit(plan, None)?;
        privileges::drop_privileges(workers, user.as_ref()).await?;
        // Ready before the line that says so: whoever reads it and asks /readyz must hear 200.
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        announce_ready(&args, &config, &[], &relays);
        notify_systemd(sd_notify::NotifyState::Ready);
        return serve(&args, config, relays, None, &[], &mut signals, &mut control)
            .await
            .map(drop);
    }

    let netlink = routing::connect()?;
    let interfaces = resolve_interfaces(&netlink, &config.settings.interfaces).await?;
    let settings = config.settings.clone();
    let table = settings.table;
    let pinned = PinnedState::locate(&settings.pin_dir, table)?;
    if !settings.pin && pinned.exists() {
        // Its program would stay attached next to ours and answer first.
        bail!(
            "an earlier `tproxy run --pin` left its steering pinned in {}: start with --pin to \
             take it over, or remove it with `tproxy cleanup`",
            pinned.dir().display()
        );
    }
    let pinned = settings.pin.then_some(pinned);
    let (lock, mut takeover) = match InstanceLock::try_acquire(table)? {
        Ok(lock) => (lock, None),
        Err(Held { pid }) if pinned.is_none() => bail!(
            "another tproxy (pid {pid}) is running with routing table {table} in this network \
             namespace; stop it, pick another --table, or run both with --pin to take over from it"
        ),
        Err(Held { pid }) => {
            let (takeover, lock) = control::take_over(table)?.with_context(|| {
                format!("another tproxy (pid {pid}) holds table {table} but does not answer on its control socket")
            })?;
            log::info!("taking over from tproxy pid {}", takeover.pid);
            (InstanceLock::from_handover(table, lock)?, Some(takeover))
        }
    };
    let adopting = takeover.is_some() || pinned.as_ref().is_some_and(PinnedState::exists);
    if !adopting {
        let stale = routing::remove_ours(&netlink, table).await?;
        if stale > 0 {
            log::warn!(
                "removed {stale} rules/routes left in table {table} by a tproxy that did not shut down"
            );
        }
    }
    if let Some(takeover) = &mut takeover {
        relays.inherited = std::mem::take(&mut takeover.listeners);
    }

    let spec = RoutingSpec {
        mark: settings.mark.value,
        mask: settings.mark.mask,
        table,
        priority: settings.rule_priority,
    };
    let mut steering = None;
    let mut routing = None;
    let served = async {
        let plan = relays.plan(&config)?;
        relays.inherited.clear();
        let first = rules::compile(&plan.rules(&config), 0, &interfaces);
        let steering = steering.insert(Steering::load(&LoadSettings {
            mark: settings.mark,
            socket_mark: settings.socket_mark,
            rule_map_capacity: steering::rule_map_capacity(&first),
            fail_closed: settings.fail_mode == FailMode::Closed,
            pinned: pinned.clone(),
        })?);
        steering.spawn_log_forwarder()?;
        relays
            .serve_metrics(&settings, Some(steering.counter_reader()))
            .await?;
        plan.register(steering)?;
        let first = match steering.next_generation() {
            0 => first,
            generation => rules::compile(&plan.rules(&config), generation, &interfaces),
        };
        steering.install_rules(first)?;
        relays.commit(plan, Some(steering))?;
        if adopting {
            // Slots the previous instance used and this one does not.
            steering.unregister_except(&relays.slots());
        }
        routing = Some(match adopting {
            true => PolicyRouting::adopt(&netlink, spec).await?,
            false => PolicyRouting::install(&netlink, spec).await?,
        });
        control.attached = attach_all(steering, &interfaces)?;
        if pinned.is_some() {
            PinnedBy::record(table, settings.fail_mode)?;
        }
        if let Some(takeover) = takeover.take() {
            let pid = takeover.pid;
            takeover.complete()?;
            lock.confirm_handover();
            log::info!("took over from tproxy pid {pid}: it drains and exits");
        }
        control::serve(table, control_tx)?;
        control.pinned = pinned.is_some();
        control.lock = Some(&lock);
        privileges::drop_privileges(workers, user.as_ref()).await?;
        // Only now: its blocking thread must be born without the set-up's privileges.
        steering.fragments().spawn_sweeper();
        // Ready before the line that says so: whoever reads it and asks /readyz must hear 200.
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        announce_ready(&args, &config, &control.attached, &relays);
        notify_systemd(sd_notify::NotifyState::Ready);
        serve(
            &args,
            config,
            relays,
            Some(steering),
            &interfaces,
            &mut signals,
            &mut control,
        )
        .await
    }
    .await;
    drop(steering);
    match (&pinned, served) {
        (None, served) => {
            let removed = match routing {
                Some(routing) => routing.remove().await.context("removing policy routing"),
                None => Ok(()),
            };
            served.map(drop).and(removed)
        }
        (Some(_), Ok(Ending::HandedOver)) => {
            lock.hand_over();
            Ok(())
        }
        (Some(pinned), Ok(Ending::Stopped)) => {
            log::info!(
                "steering stays in place, pinned at {} (fail-{}) until the next `tproxy run --pin`; \
                 `tproxy cleanup` removes it",
                pinned.dir().display(),
                settings.fail_mode
            );
            Ok(())
        }
        (Some(pinned), Err(error)) => {
            // What this run created goes; what it adopted stays with whoever runs it.
            if !adopting {
                let _ = pinned.remove();
                let _ = PinnedBy::remove(table);
                if let Some(routing) = routing {
                    let _ = routing.remove().await;
                }
            }
            Err(error)
        }
    }
}

/// How serving ended.
enum Ending {
    /// Stopped by a signal, after draining.
    Stopped,
    /// A new instance took over; this one drained.
    HandedOver,
}

/// The control socket's side of serving.
struct Control<'a> {
    requests: tokio::sync::mpsc::Receiver<Request>,
    /// The instance lock, to hand to a successor.
    lock: Option<&'a InstanceLock>,
    /// Whether this instance pins its state (and so may hand over).
    pinned: bool,
    /// How the program is attached, per interface.
    attached: Vec<String>,
}

/// Where serving is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Not accepting; connections in flight have until `until`.
    Draining {
        until: Instant,
        handed_over: bool,
    },
}

impl Phase {
    fn name(self) -> &'static str {
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
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    report: Signal,
    reload: Signal,
}

impl Signals {
    fn register() -> Result<Self> {
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
async fn serve(
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
                        let _ = std::io::Write::write_all(&mut stream, report.to_string().as_bytes());
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
                        if let Err(error) = reassert(&config, &mut relays, steering, interfaces) {
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

/// Puts this instance's rules and listeners back in force after a takeover that did not
/// complete: the would-be successor may have changed the shared maps.
fn reassert(
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
fn status_report(
    config: &Config,
    relays: &Relays,
    steering: Option<&Steering>,
    phase: Phase,
    control: &Control<'_>,
) -> serde_json::Value {
    use serde_json::json;
    use std::sync::atomic::Ordering::Relaxed;
    let s = &config.settings;
    let packets = steering
        .and_then(|steering| steering.counters().ok())
        .map(|counters| crate::tools::status::packets_json(&counters));
    let listeners: Vec<serde_json::Value> = relays
        .listeners
        .iter()
        .map(|l| {
            json!({
                "name": l.config.name,
                "tcp": l.tcp.is_some(),
                "udp": l.udp.is_some(),
                "addresses": l.bound.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "upstream": l.upstream.read().unwrap().map(|u| u.to_string()),
            })
        })
        .collect();
    let tcp = &relays.tcp_stats;
    let udp = &relays.udp.stats;
    json!({
        "pid": std::process::id(),
        "phase": phase.name(),
        "table": s.table,
        "mark": s.mark.to_string(),
        "rule_priority": s.rule_priority,
        "fail_mode": s.fail_mode.to_string(),
        "pinned": control.pinned.then(|| s.pin_dir.display().to_string()),
        "attached": control.attached,
        "listeners": listeners,
        "rules": config.rules.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "packets": packets,
        "fragment_tracking": steering.map(|steering| steering.fragments().entries()),
        "tcp_relay": {
            "accepted": tcp.accepted.load(Relaxed),
            "active": tcp.active(),
            "upstream_failures": tcp.upstream_failures.load(Relaxed),
            "bytes_to_upstream": tcp.bytes_to_upstream.load(Relaxed),
            "bytes_to_client": tcp.bytes_to_client.load(Relaxed),
            "refused_at_limit": tcp.refused_at_limit.load(Relaxed),
            "refused_at_source_limit": tcp.refused_at_source_limit.load(Relaxed),
            "half_close_timeouts": tcp.half_close_timeouts.load(Relaxed),
            "refused_destination": tcp.refused_destinations.load(Relaxed),
        },
        "udp_relay": {
            "active": udp.active.load(Relaxed),
            "created": udp.created.load(Relaxed),
            "expired": udp.expired.load(Relaxed),
            "to_upstream": udp.to_upstream.load(Relaxed),
            "to_client": udp.to_client.load(Relaxed),
            "refused_destination": udp.refused_destinations.load(Relaxed),
            "raw_reply_fallbacks": udp.reply_fallbacks.load(Relaxed),
            "raw_reply_failures": udp.raw_reply_failures.load(Relaxed),
            "refused_at_cap": udp.refused_at_cap.load(Relaxed),
            "refused_at_source_cap": udp.refused_at_source_cap.load(Relaxed),
            "listener_buffer_drops": udp.listener_buffer_drops.load(Relaxed),
        },
    })
}

/// Tells systemd (Type=notify) where tproxy is; nothing when not started by systemd.
fn notify_systemd(state: sd_notify::NotifyState<'_>) {
    if let Err(error) = sd_notify::notify(&[state]) {
        log::warn!("telling systemd the service state: {error}");
    }
}

/// A reload (SIGHUP or `tproxy reload`) while serving: puts the re-read configuration in
/// force or keeps the current one, logs which, and returns what is in force now or why the
/// new configuration was rejected (for `tproxy reload` to report).
fn reload_in_serving(
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
    match reload(args, config, relays, steering, interfaces) {
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

/// Re-reads the configuration and puts it in force, or changes nothing and says why.
fn reload(
    args: &RunArgs,
    current: &Config,
    relays: &mut Relays,
    steering: Option<&mut Steering>,
    interfaces: &[(String, u32)],
) -> Result<Config> {
    if args.config.is_none() {
        bail!("there is no configuration file to re-read (started without --config)");
    }
    let new = Config::build(args)?;
    fixed_settings_unchanged(&current.settings, &new.settings)?;
    let plan = relays.plan(&new)?;
    match steering {
        Some(steering) => {
            let mut rules = plan.rules(&new);
            let retired = relays.retired_after(&current.rules, &rules);
            rules.extend(retired.iter().cloned());
            let compiled = rules::compile(&rules, steering.next_generation(), interfaces);
            plan.register(steering)?;
            if let Err(error) = steering.install_rules(compiled) {
                plan.unregister(steering);
                return Err(error);
            }
            relays.retired = retired;
            relays.commit(plan, Some(steering))?;
        }
        None => relays.commit(plan, None)?,
    }
    Ok(new)
}

/// Settings that shape the program, the routing or the relays' sockets at start: a reload
/// that changes them is refused rather than half applied.
fn fixed_settings_unchanged(old: &Settings, new: &Settings) -> Result<()> {
    let mut changed = Vec::new();
    if old.interfaces != new.interfaces {
        changed.push("interfaces");
    }
    if old.mark != new.mark {
        changed.push("mark");
    }
    if old.table != new.table {
        changed.push("table");
    }
    if old.rule_priority != new.rule_priority {
        changed.push("rule_priority");
    }
    if old.socket_mark != new.socket_mark {
        changed.push("socket_mark");
    }
    if old.connect_timeout != new.connect_timeout
        || old.idle_timeout != new.idle_timeout
        || old.half_close_timeout != new.half_close_timeout
    {
        changed.push("connect_timeout/idle_timeout/half_close_timeout");
    }
    if old.metrics != new.metrics {
        changed.push("metrics");
    }
    if old.user != new.user {
        changed.push("user");
    }
    if old.transparent_upstream != new.transparent_upstream {
        changed.push("transparent_upstream");
    }
    if old.max_connections != new.max_connections
        || old.max_connections_per_source != new.max_connections_per_source
    {
        changed.push("max_connections/max_connections_per_source");
    }
    if old.udp_idle_timeout != new.udp_idle_timeout
        || old.udp_max_sessions != new.udp_max_sessions
        || old.udp_max_sessions_per_source != new.udp_max_sessions_per_source
    {
        changed.push("udp_idle_timeout/udp_max_sessions/udp_max_sessions_per_source");
    }
    // Every setting is fixed for the process's lifetime; a new one not named above still is.
    if changed.is_empty() && old != new {
        changed.push("a setting");
    }
    if !changed.is_empty() {
        bail!(
            "{} changed; a reload applies rules and listeners only: restart tproxy to change these",
            changed.join(", ")
        );
    }
    Ok(())
}

/// The interfaces to attach to, with their ifindex. Each must exist here, once, and carry
/// Ethernet framing: the program parses an Ethernet header, so on an L3 device (WireGuard,
/// tun) it would never steer anything.
async fn resolve_interfaces(
    netlink: &rtnetlink::Handle,
    interfaces: &Interfaces,
) -> Result<Vec<(String, u32)>> {
    use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType};
    let links: Vec<_> = netlink
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("listing interfaces")?;
    let name_of = |link: &rtnetlink::packet_route::link::LinkMessage| {
        link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
    };
    let names = match interfaces {
        Interfaces::Named(names) => names.clone(),
        Interfaces::All => {
            let all: Vec<String> = links
                .iter()
                .filter(|link| link.header.link_layer_type == LinkLayerType::Ether)
                .filter_map(name_of)
                .collect();
            if all.is_empty() {
                bail!("interfaces = \"all\": no Ethernet interface in this network namespace");
            }
            all
        }
    };
    let mut resolved = Vec::new();
    for iface in &names {
        let link = links
            .iter()
            .find(|link| name_of(link).as_deref() == Some(iface.as_str()))
            .with_context(|| {
                format!("--iface {iface}: no such interface in this network namespace")
            })?;
        let kind = link.header.link_layer_type;
        if !matches!(kind, LinkLayerType::Ether | LinkLayerType::Loopback) {
            bail!("--iface {iface}: link type {kind} has no Ethernet header; only Ethernet interfaces can be steered");
        }
        resolved.push((iface.clone(), link.header.index));
    }
    Ok(resolved)
}

/// A listener that is serving.
struct RunningListener {
    config: ListenerConfig,
    /// Its index in the program's socket map.
    slot: u32,
    /// The addresses its sockets are bound to (port 0 resolved).
    bound: Vec<SocketAddr>,
    upstream: Upstream,
    /// Cancelled to stop accepting (TCP) or receiving (UDP); `None`: no such sockets.
    tcp: Option<CancellationToken>,
    udp: Option<CancellationToken>,
    /// Its listening sockets (duplicates of the serving tasks' descriptors), to hand to a
    /// successor and to keep them open while draining.
    sockets: Vec<(ListenerSlot, OwnedFd)>,
}

/// What putting a configuration in force changes in the listeners; built without touching
/// anything in force, so a failure leaves everything as it was.
struct Plan {
    /// For each configured listener, in order: its slot.
    slots: Vec<u32>,
    /// Sockets bound for it, not yet serving.
    new_sockets: Vec<NewSockets>,
    /// Indices into `Relays::listeners` of those the configuration drops or replaces.
    removed: Vec<usize>,
    /// For kept listeners: (index into `Relays::listeners`, new config, stop tcp, stop udp).
    kept: Vec<(usize, ListenerConfig, bool, bool)>,
}

struct NewSockets {
    /// `Some`: a listener that is kept (index into `Relays::listeners`) and gains a transport.
    kept: Option<usize>,
    config: ListenerConfig,
    slot: u32,
    bound: Vec<SocketAddr>,
    tcp: Vec<TransparentListener>,
    udp: Vec<TransparentListener>,
}

impl Plan {
    /// The configuration's rules with listener indices turned into socket-map slots.
    fn rules(&self, config: &Config) -> Vec<Rule> {
        config
            .rules
            .iter()
            .map(|rule| {
                let mut rule = rule.clone();
                if let Action::Steer(index) = rule.action {
                    rule.action = Action::Steer(self.slots[index as usize]);
                }
                rule
            })
            .collect()
    }

    /// Puts the new sockets into the socket map (unused until the rules point at them).
    fn register(&self, steering: &mut Steering) -> Result<()> {
        for new in &self.new_sockets {
            for socket in new.tcp.iter().chain(&new.udp) {
                steering.register_listener(new.slot, socket.slot, &socket.socket)?;
            }
        }
        Ok(())
    }

    /// Undoes [`Plan::register`] for listeners that do not exist yet.
    fn unregister(&self, steering: &mut Steering) {
        for new in self.new_sockets.iter().filter(|n| n.kept.is_none()) {
            let _ = steering.unregister_listener(new.slot);
        }
    }
}

/// The relays' listeners and the connections and sessions they serve.
struct Relays {
    listeners: Vec<RunningListener>,
    own_addrs: Arc<RwLock<Vec<SocketAddr>>>,
    tcp_config: Arc<RelayConfig>,
    tcp_stats: Arc<RelayStats>,
    udp: Arc<UdpRelay>,
    /// Steer rules that earlier configurations had and a reload dropped: their flows keep
    /// their sockets (see `Rule::retired`).
    retired: Vec<Rule>,
    /// Listening sockets a previous instance handed over, for the first plan to use instead
    /// of binding anew.
    inherited: Vec<(HandedListener, Vec<OwnedFd>)>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// What `/readyz` says: set once set up, cleared when draining.
    ready: Arc<std::sync::atomic::AtomicBool>,
    /// Cancelled once a successor has taken over, so that scrapes reach it instead.
    metrics_stop: CancellationToken,
}

/// How long a stopping instance keeps accepting connections that reached its listeners
/// before they left the socket map: a handshake under way takes a round trip to finish.
const ACCEPT_GRACE: Duration = Duration::from_secs(1);

/// How long stopping may wait for relay tasks to reset their connections.
/// How long UDP sessions must have been quiet before a drain may end early: a request sent
/// upstream just before the stop gets this long for its reply.
const UDP_QUIET_BEFORE_STOP: Duration = Duration::from_secs(2);
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

impl Relays {
    fn new(settings: &Settings) -> Self {
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
        Relays {
            listeners: Vec::new(),
            tcp_config: Arc::new(RelayConfig {
                connect_timeout: settings.connect_timeout,
                idle_timeout: settings.idle_timeout,
                half_close_timeout: settings.half_close_timeout,
                max_connections: settings.max_connections as usize,
                max_connections_per_source: settings.max_connections_per_source as usize,
                transparent_upstream: settings.transparent_upstream,
                socket_mark: settings.socket_mark,
                connect_latency: metrics::connect_latency(),
                own_listeners: own_addrs.clone(),
            }),
            own_addrs,
            tcp_stats: Arc::default(),
            udp,
            retired: Vec::new(),
            inherited: Vec::new(),
            ready: Arc::default(),
            metrics_stop: CancellationToken::new(),
            shutdown,
            tasks,
        }
    }

    /// Starts the metrics endpoint, if the settings ask for one.
    async fn serve_metrics(
        &self,
        settings: &Settings,
        counters: Option<crate::datapath::steering::CounterReader>,
    ) -> Result<()> {
        let Some(addr) = settings.metrics else {
            return Ok(());
        };
        metrics::serve(
            addr,
            metrics::Sources {
                counters,
                tcp: self.tcp_stats.clone(),
                udp: self.udp.clone(),
                connect_latency: self.tcp_config.connect_latency.clone(),
                ready: self.ready.clone(),
            },
            self.metrics_stop.clone(),
        )
        .await
    }

    /// Binds what `config` needs that is not serving yet and works out the rest.
    fn plan(&mut self, config: &Config) -> Result<Plan> {
        let mut plan = Plan {
            slots: Vec::new(),
            new_sockets: Vec::new(),
            removed: Vec::new(),
            kept: Vec::new(),
        };
        let mut taken: Vec<u32> = self.listeners.iter().map(|l| l.slot).collect();
        for wanted in &config.listeners {
            let existing = self
                .listeners
                .iter()
                .position(|l| l.config.name == wanted.name && l.config.listen == wanted.listen);
            let (slot, bound, kept, need_tcp, need_udp) = match existing {
                Some(index) => {
                    let running = &self.listeners[index];
                    plan.kept.push((
                        index,
                        wanted.clone(),
                        running.tcp.is_some() && !wanted.tcp,
                        running.udp.is_some() && !wanted.udp,
                    ));
                    let need_tcp = wanted.tcp && running.tcp.is_none();
                    let need_udp = wanted.udp && running.udp.is_none();
                    (
                        running.slot,
                        running.bound.clone(),
                        Some(index),
                        need_tcp,
                        need_udp,
                    )
                }
                None => {
                    let slot = (0..MAX_LISTENERS)
                        .find(|slot| !taken.contains(slot))
                        .with_context(|| {
                            format!(
                                "no free listener slot for `{}` (at most {MAX_LISTENERS})",
                                wanted.name
                            )
                        })?;
                    taken.push(slot);
                    (slot, wanted.listen.clone(), None, wanted.tcp, wanted.udp)
                }
            };
            plan.slots.push(slot);
            if !need_tcp && !need_udp {
                continue;
            }
            let what = |transport| format!("listener `{}` ({transport:?})", wanted.name);
            let (mut inherited_tcp, mut inherited_udp, mut bound) = (Vec::new(), Vec::new(), bound);
            if kept.is_none() {
                if let Some(index) = self
                    .inherited
                    .iter()
                    .position(|(l, _)| l.name == wanted.name && l.listen == wanted.listen)
                {
                    let (handed, fds) = self.inherited.swap_remove(index);
                    bound = handed.bound;
                    for (socket, fd) in handed.sockets.into_iter().zip(fds) {
                        let listener = TransparentListener {
                            slot: socket.slot(),
                            socket: socket2::Socket::from(fd),
                        };
                        match listener.slot.is_tcp() {
                            true => inherited_tcp.push(listener),
                            false => inherited_udp.push(listener),
                        }
                    }
                }
            }
            let tcp = match need_tcp {
                true if !inherited_tcp.is_empty() => inherited_tcp,
                true => listener::bind_all(&bound, Transport::Tcp)
                    .with_context(|| what(Transport::Tcp))?,
                false => Vec::new(),
            };
            // UDP shares the port TCP got (or was given).
            let udp_addrs = match tcp.first() {
                Some(first) => bound_addrs(&bound, first)?,
                None => bound.clone(),
            };
            let udp = match need_udp {
                true if !inherited_udp.is_empty() => inherited_udp,
                true => listener::bind_all(&udp_addrs, Transport::Udp)
                    .with_context(|| what(Transport::Udp))?,
                false => Vec::new(),
            };
            let first = tcp
                .first()
                .or(udp.first())
                .expect("bound at least one socket");
            let bound = bound_addrs(&bound, first)?;
            if kept.is_none() {
                // Once per address, whether TCP, UDP or both are bound there.
                for addr in bound.iter().filter(|addr| !addr.ip().is_loopback()) {
                    log::warn!("listener {addr} is not on loopback: clients can reach it directly");
                }
            }
            plan.new_sockets.push(NewSockets {
                kept,
                config: wanted.clone(),
                slot,
                bound,
                tcp,
                udp,
            });
        }
        plan.removed = (0..self.listeners.len())
            .filter(|i| !plan.kept.iter().any(|(kept, ..)| kept == i))
            .collect();
        let own: Vec<SocketAddr> = plan
            .kept
            .iter()
            .flat_map(|(index, ..)| self.listeners[*index].bound.clone())
            .chain(plan.new_sockets.iter().flat_map(|new| new.bound.clone()))
            .collect();
        for wanted in &config.listeners {
            if let Some(upstream) = wanted.upstream {
                if listener::reaches_own_listener(&own, upstream) {
                    bail!(
                        "{} is one of tproxy's own listeners: that would loop",
                        crate::config::upstream_flag(&wanted.name, upstream)
                    );
                }
            }
        }
        Ok(plan)
    }

    /// Puts a plan in force: new sockets serve, kept listeners take their new upstream,
    /// dropped ones stop accepting (their connections and sessions run on).
    fn commit(&mut self, plan: Plan, mut steering: Option<&mut Steering>) -> Result<()> {
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
        }
        *self.own_addrs.write().unwrap() = self
            .listeners
            .iter()
            .flat_map(|l| l.bound.clone())
            .collect();
        for running in &self.listeners {
            if let Some(upstream) = *running.upstream.read().unwrap() {
                if listener::reaches_own_listener(&self.own_addrs.read().unwrap(), upstream) {
                    log::warn!("listener `{}`: upstream {upstream} is one of tproxy's own listeners; its connections will be refused", running.config.name);
                }
            }
        }
        Ok(())
    }

    /// The steer rules of `old` that `new` no longer has, with those retired before: they
    /// keep matching established flows (only) after the switch.
    fn retired_after(&self, old: &[Rule], new: &[Rule]) -> Vec<Rule> {
        let candidates = self
            .retired
            .iter()
            .chain(old.iter().filter(|r| matches!(r.action, Action::Steer(_))));
        rules::retire(candidates, new)
    }

    /// The listeners and their sockets' descriptors, for a successor.
    fn handover_offer(&self) -> (Vec<HandedListener>, Vec<RawFd>) {
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
    fn stop_accepting(&mut self) {
        for listener in &mut self.listeners {
            for token in listener.tcp.take().iter().chain(&listener.udp.take()) {
                token.cancel();
            }
        }
    }

    /// Closes this process's hold on the listening sockets.
    fn close_listeners(&mut self) {
        for listener in &mut self.listeners {
            listener.sockets.clear();
        }
    }

    /// Puts every listening socket (back) into the socket map.
    fn register_all(&self, steering: &mut Steering) -> Result<()> {
        for listener in &self.listeners {
            for (slot, fd) in &listener.sockets {
                steering.register_listener(listener.slot, *slot, fd)?;
            }
        }
        Ok(())
    }

    /// The socket-map slots of the listeners in use.
    fn slots(&self) -> Vec<u32> {
        self.listeners.iter().map(|l| l.slot).collect()
    }

    /// Whether nothing is being relayed: no TCP connection, and no UDP session that moved a
    /// datagram lately. A UDP session lives until its idle timeout (a minute by default),
    /// longer than a drain: waiting for those would make every stop of a DNS router take
    /// the whole drain.
    fn idle(&self) -> bool {
        self.tcp_stats.active() == 0 && !self.udp.busy_within(UDP_QUIET_BEFORE_STOP)
    }

    /// Stops accepting and resets the connections in flight; ends the UDP sessions.
    async fn stop(&self) {
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
    fn log_stats(&self, steering: Option<&Steering>) {
        use std::sync::atomic::Ordering::Relaxed;
        match steering.map(Steering::counters) {
            None => {}
            Some(Ok(counters)) => {
                for protocol in Protocol::ALL {
                    let row = &counters[protocol as usize];
                    let line: Vec<String> = Outcome::ALL
                        .iter()
                        .filter(|outcome| outcome.applies_to(protocol))
                        .map(|outcome| format!("{}={}", outcome.name(), row[*outcome as usize]))
                        .collect();
                    log::info!("eBPF {} packets: {}", protocol.name(), line.join(" "));
                }
            }
            Some(Err(error)) => log::warn!("reading eBPF counters: {error:#}"),
        }
        if let Some(steering) = steering {
            let fragments = steering.fragments().entries();
            log::info!(
                "eBPF fragment tracking: datagrams={} reassembled_flows={}",
                fragments.datagrams,
                fragments.reassembled_flows
            );
        }
        let tcp = &self.tcp_stats;
        log::info!(
            "tcp relay: {} connections accepted, {} upstream failures, {} bytes to upstream, {} bytes to clients; \
             active={} refused_at_limit={} refused_at_source_limit={} half_close_timeouts={} \
             refused_destination={}",
            tcp.accepted.load(Relaxed),
            tcp.upstream_failures.load(Relaxed),
            tcp.bytes_to_upstream.load(Relaxed),
            tcp.bytes_to_client.load(Relaxed),
            tcp.active(),
            tcp.refused_at_limit.load(Relaxed),
            tcp.refused_at_source_limit.load(Relaxed),
            tcp.half_close_timeouts.load(Relaxed),
            tcp.refused_destinations.load(Relaxed),
        );
        log::info!("{}", self.udp.stats.summary());
    }
}

/// A listening socket's slot, and a descriptor of it of our own.
fn own_descriptor(socket: &TransparentListener) -> Result<(ListenerSlot, OwnedFd)> {
    Ok((socket.slot, socket.socket.try_clone()?.into()))
}

/// `wanted` addresses with port 0 replaced by the port `first` was bound to.
fn bound_addrs(wanted: &[SocketAddr], first: &TransparentListener) -> Result<Vec<SocketAddr>> {
    let port = first
        .socket
        .local_addr()?
        .as_socket()
        .context("listener address")?
        .port();
    Ok(wanted
        .iter()
        .map(|addr| {
            let mut addr = *addr;
            if addr.port() == 0 {
                addr.set_port(port);
            }
            addr
        })
        .collect())
}

/// Attaches to every interface; returns how each was attached, for the ready line.
fn attach_all(steering: &mut Steering, interfaces: &[(String, u32)]) -> Result<Vec<String>> {
    interfaces
        .iter()
        .map(|(iface, _)| Ok(format!("{iface} ({})", steering.attach(iface)?)))
        .collect()
}

fn announce_ready(args: &RunArgs, config: &Config, attached: &[String], relays: &Relays) {
    let listeners: Vec<String> = relays
        .listeners
        .iter()
        .map(|l| {
            let transports = match (l.tcp.is_some(), l.udp.is_some()) {
                (true, true) => "TCP+UDP",
                (true, false) => "TCP",
                (false, true) => "UDP",
                (false, false) => "unused",
            };
            let addrs: Vec<String> = l.bound.iter().map(ToString::to_string).collect();
            let upstream = l
                .config
                .upstream
                .map_or("the original destination".to_string(), |u| u.to_string());
            format!(
                "{} {transports} on {} relaying to {upstream}",
                l.config.name,
                addrs.join(", ")
            )
        })
        .collect();
    for l in &relays.listeners {
        for (family, present) in [
            ("IPv4", l.bound.iter().any(SocketAddr::is_ipv4)),
            ("IPv6", l.bound.iter().any(SocketAddr::is_ipv6)),
        ] {
            if !present && !args.relay_only {
                let fate = match config.settings.fail_mode {
                    FailMode::Open => "passed on untouched (fail mode open)",
                    FailMode::Closed => "dropped (fail mode closed)",
                };
                log::warn!(
                    "listener `{}` has no {family} address: {family} flows steered to it are \
                     {fate} and counted as no_listener",
                    l.config.name
                );
            }
        }
    }
    if args.relay_only {
        log::info!(
            "ready: relay only (steering is left to others): listeners {}",
            listeners.join("; ")
        );
        return;
    }
    let s = &config.settings;
    log::info!(
        "ready: {} rules on {}; listeners {}; mark {} table {} rule priority {}",
        config.configured_rules,
        attached.join(", "),
        listeners.join("; "),
        s.mark,
        s.table,
        s.rule_priority,
    );
}
