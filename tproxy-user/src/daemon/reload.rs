//! Reloading while serving (SIGHUP, `tproxy reload`): the re-read configuration is put in
//! force whole, or refused with the reason and the current one kept.

use anyhow::{bail, Result};

use crate::relay::listeners::Relays;
use crate::{
    config::{settings, Config, RunArgs, Settings},
    datapath::rules::{self},
    datapath::steering::Steering,
};

/// Re-reads the configuration and puts it in force, or changes nothing and says why.
pub(crate) fn reload(
    args: &RunArgs,
    current: &Config,
    relays: &mut Relays,
    steering: Option<&mut Steering>,
) -> Result<Config> {
    if args.config.is_none() {
        bail!("there is no configuration file to re-read (started without --config)");
    }
    let new = Config::build(args)?;
    fixed_settings_unchanged(&current.settings, &new.settings)?;
    if new.local.is_some() != current.local.is_some() {
        // Local origin shapes the programs loaded, `lo`'s program and the policy routing.
        let what = |local: &Option<_>| match local {
            Some(_) => "some",
            None => "no",
        };
        bail!(
            "the configuration had {} rules for local connections and has {} now; a reload \
             changes those rules and the processes they select, not whether there are any: \
             restart tproxy to change that",
            what(&current.local),
            what(&new.local)
        );
    }
    // Checked before anything changes: the new selections' cgroups must exist.
    let local_root = match &new.local {
        Some(local) if new.local != current.local => {
            Some(crate::datapath::local_origin::prepare(local)?.0)
        }
        _ => None,
    };
    let plan = relays.plan(&new)?;
    match steering {
        Some(steering) => {
            let mut rules = plan.rules(&new);
            let retired = relays.retired_after(&current.rules, &rules);
            rules.extend(retired.iter().cloned());
            let interfaces = steering.attached_interfaces();
            let compiled = rules::compile(&rules, steering.next_generation(), &interfaces);
            plan.register(steering)?;
            if let Err(error) = steering.install_rules(compiled) {
                plan.unregister(steering);
                return Err(error);
            }
            if let (Some(root), Some(local)) = (&local_root, &new.local) {
                // The rules of the new selections are in force: now the selections.
                let applied = crate::datapath::local_origin::apply(steering, root, local);
                if let Err(error) = applied {
                    // Refused whole: the rules and selections in force stay (the rules back
                    // first, before the new listeners they name go).
                    if let Err(restoring) = reinstall_rules(current, relays, steering) {
                        log::error!("restoring the rules in force: {restoring:#}");
                    }
                    plan.unregister(steering);
                    if let Some(current_local) = &current.local {
                        let restored =
                            crate::datapath::local_origin::apply(steering, root, current_local);
                        if let Err(restoring) = restored {
                            log::error!("restoring the selections in force: {restoring:#}");
                        }
                    }
                    return Err(error);
                }
            }
            relays.retired = retired;
            relays.commit(plan, Some(steering))?;
        }
        None => relays.commit(plan, None)?,
    }
    Ok(new)
}

/// Compiles the rules in force again, for the interfaces attached now, and installs them:
/// rules that name an interface exist only for the interfaces that are attached.
pub(crate) fn reinstall_rules(
    config: &Config,
    relays: &mut Relays,
    steering: &mut Steering,
) -> Result<()> {
    let mut rules = relays.plan(config)?.rules(config);
    rules.extend(relays.retired.iter().cloned());
    let interfaces = steering.attached_interfaces();
    steering.install_rules(rules::compile(
        &rules,
        steering.next_generation(),
        &interfaces,
    ))
}

/// Settings that shape the program, the routing or the relays' sockets at start: a reload
/// that changes them is refused rather than half applied.
pub(crate) fn fixed_settings_unchanged(old: &Settings, new: &Settings) -> Result<()> {
    let changed = settings::fixed_changes(old, new);
    if !changed.is_empty() {
        bail!(
            "{} changed; a reload applies rules and listeners only: restart tproxy to change these",
            changed.join(", ")
        );
    }
    Ok(())
}
