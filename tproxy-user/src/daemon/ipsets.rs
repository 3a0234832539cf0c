//! The kernel ipsets that rules follow while serving (`dst = "ipset:NAME"`, what
//! `-m set --match-set NAME dst` becomes): dnsmasq and scripts fill them at run time.
//!
//! ipset sends no events when a set changes, so the sets are read again every
//! [`POLL_INTERVAL`] and the rules are put in force again only when an entry came or went.
//! A set that cannot be read (destroyed, renamed) keeps the rules made of its entries as
//! last read, with a warning, until it can be read again.

use tokio::time::{Interval, MissedTickBehavior};

use crate::{
    config::Config,
    daemon::reload::reinstall_rules,
    datapath::ipset::{set_prefixes, POLL_INTERVAL},
    datapath::steering::Steering,
    relay::listeners::Relays,
};

/// The timer of the polls, when rules follow sets; never ready without one.
pub(crate) fn poll_timer(config: &Config) -> Option<Interval> {
    if config.ipset_names.is_empty() {
        return None;
    }
    let mut timer = tokio::time::interval(POLL_INTERVAL);
    timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    Some(timer)
}

/// After a reload: starts the timer when rules now follow a set, stops it when none does
/// (a running timer keeps its pace: requests such as `status` come often).
pub(crate) fn retime(timer: &mut Option<Interval>, config: &Config) {
    if timer.is_some() == config.ipset_names.is_empty() {
        *timer = poll_timer(config);
    }
}

/// Waits for the next poll.
pub(crate) async fn due(timer: &mut Option<Interval>) {
    match timer {
        Some(timer) => {
            timer.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Reads the followed sets again and, when one changed, puts the rules in force for their
/// entries now.
pub(crate) fn follow(config: &mut Config, relays: &mut Relays, steering: &mut Steering) {
    let mut changed = false;
    for name in config.followed_ipsets() {
        match set_prefixes(&name) {
            Ok(entries) => {
                let count = entries.len();
                if config.set_ipset_entries(&name, entries) {
                    log::info!("ipset {name} changed; its rules now hold {count} entries");
                    changed = true;
                }
            }
            Err(error) => log::warn!(
                "following ipset {name} (its rules keep the entries read before): {error:#}"
            ),
        }
    }
    if !changed {
        return;
    }
    // Blocking map work, as a reload's.
    let reinstalled = tokio::task::block_in_place(|| reinstall_rules(config, relays, steering));
    if let Err(error) = reinstalled {
        log::error!("putting the rules in force for the ipsets' new entries: {error:#}");
    }
}
