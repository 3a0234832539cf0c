//! `tproxy run`: set everything up in an order where a failure at any step undoes the steps
//! before it, serve until SIGINT/SIGTERM (reloading on SIGHUP), then take it all down again.
//!
//! Order matters: routing is installed before the program is attached (a marked packet with
//! no local route would be forwarded), and the program is detached before routing is removed.
//! Adopting pinned state, our programs replace the predecessor's on its links before our
//! rules are put in force: a program of an older version could misread them.
//!
//! With `--pin` the program, its maps and the routing outlive the process: a start adopts
//! what an earlier instance left, or takes over from the instance still running (its lock
//! and listening sockets come over the control socket, see `control`), and an exit leaves
//! it all in place for the next one. A stop drains first: accepting ends, the connections
//! and sessions in flight get up to `--drain-timeout` to finish.

use anyhow::{bail, Context, Result};

use crate::{
    config::{Config, RunArgs, Settings},
    daemon::control::{self},
    daemon::instance::{Held, InstanceLock, PinnedBy},
    daemon::privileges,
    datapath::local_origin::{self, LocalGlobals},
    datapath::out_routes,
    datapath::pin::PinnedState,
    datapath::routing::{self, PolicyRouting, RoutingSpec},
    datapath::rules::{self},
    datapath::steering::{self, LoadSettings, StagedRules, Steering},
    metrics,
    values::FailMode,
};
use crate::{
    daemon::addresses::AddressWatch,
    daemon::cgroups::CgroupWatch,
    daemon::links::LinkWatch,
    daemon::policy::PolicyWatch,
    daemon::ready::declare_ready,
    daemon::routes::RouteWatch,
    daemon::serve::{serve, Control, Ending, Signals},
    datapath::interfaces::{host_addresses, resolve_interfaces, Link, LOOPBACK},
    relay::{listeners::Relays, plan::Plan},
};

/// Runs until stopped: every step of the set-up is undone by the tear-down, whichever fails.
pub async fn run(args: RunArgs, workers: usize) -> Result<()> {
    // Registered first so that a signal during set-up still goes through the clean-up below.
    let mut signals = Signals::register()?;
    let mut config = Config::build(&args)?;
    let user = config
        .settings
        .user
        .as_deref()
        .map(privileges::resolve_user)
        .transpose()?;
    let mut relays = Relays::new(&config.settings)?;
    let (control_tx, control_rx) = tokio::sync::mpsc::channel(8);
    let mut control = Control::new(control_rx);
    if args.relay_only {
        let user = user.as_ref();
        return relay_only(
            &args,
            config,
            relays,
            (workers, user),
            &mut signals,
            &mut control,
        )
        .await;
    }

    let local = config.local.clone();
    let local_setup = local.as_ref().map(local_origin::prepare).transpose()?;
    let netlink = routing::connect()?;
    let entries = interface_entries(&config.settings, local.is_some());
    control.links = Some(LinkWatch::subscribe(entries.clone())?);
    control.addresses = Some(AddressWatch::subscribe()?);
    if local.is_some() {
        control.routes = Some(RouteWatch::subscribe()?);
        if !rules::out_interfaces(&config.rules).is_empty() {
            out_routes::warn_of_other_tables(&netlink).await;
        }
    }
    if !config.own_address_rules.is_empty() {
        // Again, now that changes are followed: one made since the configuration was read
        // would go unseen.
        config.set_own_addresses(host_addresses()?);
    }
    if !config.anycast_rules.is_empty() {
        config.set_anycast_destinations(routing::anycast_destinations(config.anycast_families())?);
    }
    let interfaces = resolve_interfaces(&netlink, &entries).await?;
    let settings = config.settings.clone();
    let mut claim = Claim::take(&netlink, &settings).await?;
    if let Some(takeover) = &mut claim.takeover {
        relays.inherited = std::mem::take(&mut takeover.listeners);
    }
    let mut steering = None;
    let mut routing = None;
    let served = async {
        let local_globals = local_setup.as_ref().map(|(_, globals)| *globals);
        let loaded = load_steering(&config, &mut relays, &interfaces, &claim, local_globals);
        let (loaded, first) = loaded.await?;
        let steering = steering.insert(loaded);
        // A fresh program runs no rules until they are in force; an adopted one is a
        // predecessor's, perhaps of an older version that would misread them.
        let first = match claim.adopting {
            false => first
                .put_in_force(steering, &mut relays, false)
                .map(|()| None)?,
            true => Some(first),
        };
        let installed = claim
            .policy_routing(&netlink, &settings, local.is_some())
            .await?;
        control.policy = Some(PolicyWatch::subscribe(installed.clone()).await?);
        routing = Some(installed);
        control.attached = attach_all(steering, &interfaces)?;
        // After `lo`'s program: a marked socket's packets must find it there.
        if let (Some(local), Some((root, _))) = (&local, &local_setup) {
            control.cgroups = Some(CgroupWatch::subscribe(root, local)?);
            local_origin::apply(steering, root, local)?;
        }
        if let Some(first) = first {
            // Our programs are on every adopted link now: only they read the new rules.
            first.put_in_force(steering, &mut relays, true)?;
        }
        claim.complete(&settings)?;
        control::serve(settings.table, control_tx)?;
        control.pinned = claim.pinned.is_some();
        control.lock = Some(&claim.lock);
        privileges::drop_privileges(workers, user.as_ref()).await?;
        // Only now: its blocking thread must be born without the set-up's privileges.
        steering.fragments().spawn_sweeper();
        declare_ready(&args, &config, &control.attached, &relays);
        serve(
            &args,
            config,
            relays,
            Some(steering),
            &mut signals,
            &mut control,
        )
        .await
    }
    .await;
    drop(steering);
    tear_down(claim, &settings, routing, served).await
}

/// The names and patterns of the interfaces to attach to: those of `settings`; with
/// `--local`, `lo` too.
fn interface_entries(settings: &Settings, local_origin: bool) -> Vec<String> {
    let mut entries = settings.interfaces.entries();
    if local_origin && !entries.iter().any(|entry| entry == LOOPBACK) {
        // `interfaces = "all"`, which never selects lo: the configuration could not add it.
        entries.push(LOOPBACK.to_string());
    }
    entries
}

/// `run --relay-only`: listeners and relay, no program, no routing (iptables steers).
async fn relay_only(
    args: &RunArgs,
    config: Config,
    mut relays: Relays,
    (workers, user): (usize, Option<&nix::unistd::User>),
    signals: &mut Signals,
    control: &mut Control<'_>,
) -> Result<()> {
    metrics::start(&relays, &config.settings, None).await?;
    let plan = relays.plan(&config)?;
    relays.commit(plan, None)?;
    privileges::drop_privileges(workers, user).await?;
    declare_ready(args, &config, &[], &relays);
    serve(args, config, relays, None, signals, control)
        .await
        .map(drop)
}

/// This instance's claim on its routing table: the instance lock, and what it takes over
/// (a running predecessor's listeners, or the state a pinned one left).
struct Claim {
    lock: InstanceLock,
    takeover: Option<control::Takeover>,
    pinned: Option<PinnedState>,
    /// Whether program, maps and routing are taken over rather than created.
    adopting: bool,
}

impl Claim {
    /// Takes the table: refuses when another instance holds it (unless both pin, then takes
    /// over from it); removes what an instance that did not shut down left behind.
    async fn take(netlink: &rtnetlink::Handle, settings: &Settings) -> Result<Self> {
        let table = settings.table;
        // Before anything is adopted: a dead namespace's state under this directory's name
        // (its inode number given to this namespace) is no instance to take over.
        PinnedState::remove_of_gone_namespaces(&settings.pin_dir);
        let pinned = PinnedState::locate(&settings.pin_dir, table)?;
        if !settings.pin && pinned.exists() {
            // Its program would stay attached next to ours and answer first.
            bail!(
                "an earlier `tproxy run --pin` left its steering pinned in {}: start with --pin \
                 to take it over, or remove it with `tproxy cleanup`",
                pinned.dir().display()
            );
        }
        let pinned = settings.pin.then_some(pinned);
        let (lock, takeover) = match InstanceLock::try_acquire(table)? {
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
            let stale = routing::remove_ours(netlink, table).await?;
            if stale > 0 {
                log::warn!(
                    "removed {stale} rules/routes left in table {table} by a tproxy that did not shut down"
                );
            }
        }
        Ok(Self {
            lock,
            takeover,
            pinned,
            adopting,
        })
    }

    /// Installs the policy routing, or adopts what a predecessor installed; `local_origin`:
    /// local processes' connections are steered too (`--local`).
    async fn policy_routing(
        &self,
        netlink: &rtnetlink::Handle,
        settings: &Settings,
        local_origin: bool,
    ) -> Result<PolicyRouting> {
        let spec = RoutingSpec {
            mark: settings.mark.value,
            mask: settings.mark.mask,
            table: settings.table,
            priority: settings.rule_priority,
            local_origin,
        };
        match self.adopting {
            true => PolicyRouting::adopt(netlink, spec).await,
            false => PolicyRouting::install(netlink, spec).await,
        }
    }

    /// Records a pinned run, and tells a predecessor that it may drain: everything is in
    /// place on this side.
    fn complete(&mut self, settings: &Settings) -> Result<()> {
        if self.pinned.is_some() {
            PinnedBy::record(settings.table, settings.fail_mode)?;
        }
        if let Some(takeover) = self.takeover.take() {
            let pid = takeover.pid;
            takeover.complete()?;
            self.lock.confirm_handover();
            log::info!("took over from tproxy pid {pid}: it drains and exits");
        }
        Ok(())
    }
}

/// Loads (or adopts) the program and maps, serves metrics, and writes the first rule set
/// where no program reads it yet: everything up to routing and attaching. Returns that rule
/// set and its listeners, to be put in force.
async fn load_steering(
    config: &Config,
    relays: &mut Relays,
    interfaces: &[Link],
    claim: &Claim,
    local_origin: Option<LocalGlobals>,
) -> Result<(Steering, FirstRules)> {
    let settings = &config.settings;
    // The rules are compiled before the program is attached anywhere: for the interfaces
    // it is about to be attached to.
    let interfaces: Vec<(String, u32)> = interfaces
        .iter()
        .map(|link| (link.name.clone(), link.index))
        .collect();
    let interfaces = &interfaces;
    let plan = relays.plan(config)?;
    relays.inherited.clear();
    let first = rules::compile(&plan.rules(config), 0, interfaces);
    let mut steering = Steering::load(&LoadSettings {
        mark: settings.mark,
        socket_mark: settings.socket_mark,
        rule_map_capacity: steering::rule_map_capacity(&first),
        fail_closed: settings.fail_mode == FailMode::Closed,
        pinned: claim.pinned.clone(),
        local_origin,
        steer_loopback: settings.steer_loopback,
    })?;
    steering.spawn_log_forwarder()?;
    metrics::start(relays, settings, Some(&steering)).await?;
    let rules = match steering.next_generation() {
        0 => first,
        generation => rules::compile(&plan.rules(config), generation, interfaces),
    };
    // Written now, where it fails for want of room with nothing changed; read once put in
    // force.
    let staged = steering.stage_rules(rules)?;
    Ok((steering, FirstRules { plan, staged }))
}

/// The first rule set, written and not yet in force, and the listener plan it steers to.
struct FirstRules {
    plan: Plan,
    staged: StagedRules,
}

impl FirstRules {
    /// Registers the new listeners, switches to the rules and commits the listeners;
    /// `adopting`: the slots the previous instance used and this one does not are emptied,
    /// once no rule in force names them. The listeners come only now: until the switch, the
    /// predecessor's rules name its slots, which ours may reuse for other listeners.
    fn put_in_force(
        self,
        steering: &mut Steering,
        relays: &mut Relays,
        adopting: bool,
    ) -> Result<()> {
        if let Err(error) = self.plan.register(steering) {
            self.plan.unregister(steering);
            steering.discard(self.staged);
            return Err(error);
        }
        if let Err(error) = steering.switch_to(self.staged) {
            self.plan.unregister(steering);
            return Err(error);
        }
        relays.commit(self.plan, Some(&mut *steering))?;
        if adopting {
            steering.unregister_except(&relays.slots());
        }
        Ok(())
    }
}

/// Removes what this run created, or leaves the pinned state for the next instance; the
/// program is already detached (the steering dropped).
async fn tear_down(
    claim: Claim,
    settings: &Settings,
    routing: Option<PolicyRouting>,
    served: Result<Ending>,
) -> Result<()> {
    match (&claim.pinned, served) {
        (None, served) => {
            let removed = match routing {
                Some(routing) => routing.remove().await.context("removing policy routing"),
                None => Ok(()),
            };
            served.map(drop).and(removed)
        }
        (Some(_), Ok(Ending::HandedOver)) => {
            claim.lock.hand_over();
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
            if !claim.adopting {
                let _ = pinned.remove();
                let _ = PinnedBy::remove(settings.table);
                if let Some(routing) = routing {
                    let _ = routing.remove().await;
                }
            }
            Err(error)
        }
    }
}

/// Attaches to every interface; returns how each was attached, for the ready line.
fn attach_all(steering: &mut Steering, interfaces: &[Link]) -> Result<Vec<String>> {
    for link in interfaces {
        steering.attach(link)?;
    }
    Ok(steering.attached_descriptions())
}
