//! Saying that the instance is ready: the `/readyz` flag, the `ready:` log line (what is
//! steered where, and what a listener without an address family does with its flows), and
//! systemd's notification.

use std::net::SocketAddr;

use crate::{
    config::{Config, Interfaces, RunArgs},
    daemon::serve::notify_systemd,
    relay::listeners::Relays,
    values::FailMode,
};

/// Marks the instance ready (the `/readyz` flag, the ready log line, systemd).
pub(crate) fn declare_ready(args: &RunArgs, config: &Config, attached: &[String], relays: &Relays) {
    // Ready before the line that says so: whoever reads it and asks /readyz must hear 200.
    relays
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    announce_ready(args, config, attached, relays);
    notify_systemd(sd_notify::NotifyState::Ready);
}

fn announce_ready(args: &RunArgs, config: &Config, attached: &[String], relays: &Relays) {
    let listeners: Vec<String> = relays
        .listeners
        .iter()
        .map(|l| {
            if let Some(external) = &l.config.external {
                return crate::relay::external::describe(
                    &l.config.name,
                    external,
                    l.config.tcp,
                    l.config.udp,
                );
            }
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
        let addrs = match &l.config.external {
            Some(external) => external.addresses(),
            None => l.bound.clone(),
        };
        for (family, present) in [
            ("IPv4", addrs.iter().any(SocketAddr::is_ipv4)),
            ("IPv6", addrs.iter().any(SocketAddr::is_ipv6)),
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
        steered_interfaces(attached, &s.interfaces),
        listeners.join("; "),
        s.mark,
        s.table,
        s.rule_priority,
    );
}

/// Where the rules are in force, for the ready line: the interfaces attached to, or, when
/// none of the named ones (patterns) matches yet, what is awaited.
fn steered_interfaces(attached: &[String], configured: &Interfaces) -> String {
    if !attached.is_empty() {
        return attached.join(", ");
    }
    match configured {
        Interfaces::Named(names) if !names.is_empty() => {
            let names: Vec<String> = names.iter().map(|name| format!("'{name}'")).collect();
            format!("no interface yet (waiting for {})", names.join(", "))
        }
        _ => "no interface".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_says_which_interfaces_it_waits_for() {
        let patterns = Interfaces::Named(vec!["veth*".into(), "wg?".into()]);
        assert_eq!(
            steered_interfaces(&[], &patterns),
            "no interface yet (waiting for 'veth*', 'wg?')"
        );
        let attached = ["veth0 (tcx)".to_string(), "veth1 (tcx)".to_string()];
        assert_eq!(
            steered_interfaces(&attached, &patterns),
            "veth0 (tcx), veth1 (tcx)"
        );
    }
}
