//! Reloading while serving (SIGHUP, `tproxy reload`): the re-read configuration is put in
//! force whole, or refused with the reason and the current one kept.

use anyhow::{bail, Result};

use crate::relay::listeners::Relays;
use crate::{
    cli::RunArgs,
    config::{Config, Settings},
    datapath::rules::{self},
    datapath::steering::Steering,
};

/// Re-reads the configuration and puts it in force, or changes nothing and says why.
pub(crate) fn reload(
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
pub(crate) fn fixed_settings_unchanged(old: &Settings, new: &Settings) -> Result<()> {
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
