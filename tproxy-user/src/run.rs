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

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};

use crate::{
    cli::{FailMode, RunArgs},
    config::Config,
    daemon::control::{self},
    daemon::instance::{Held, InstanceLock},
    daemon::privileges,
    datapath::pin::{PinnedBy, PinnedState},
    datapath::routing::{self, PolicyRouting, RoutingSpec},
    datapath::rules::{self},
    datapath::steering::{self, LoadSettings, Steering},
};
use crate::{
    daemon::serve::{notify_systemd, serve, Control, Ending, Signals},
    datapath::interfaces::resolve_interfaces,
    relay::listeners::Relays,
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
        relays.serve_metrics(&settings, Some(&*steering)).await?;
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
