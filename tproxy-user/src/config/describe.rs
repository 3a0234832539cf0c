//! The effective configuration as `tproxy check` prints it.

use std::fmt;

use super::{Config, Interfaces};
use crate::{
    datapath::rules::{self, Action, Rule},
    values::Human,
};

impl Config {
    /// The effective rule table, as `tproxy check` prints it.
    pub fn describe(&self) -> String {
        use fmt::Write;
        let mut out = String::new();
        let interfaces = match &self.settings.interfaces {
            Interfaces::All { loopback: false } => "all but lo, as they come and go".to_string(),
            Interfaces::All { loopback: true } => "all, as they come and go, and lo".to_string(),
            Interfaces::Named(names) if names.is_empty() => "none (relay only)".to_string(),
            Interfaces::Named(names) => names.join(", "),
        };
        let _ = writeln!(out, "interfaces: {interfaces}");
        let s = &self.settings;
        let _ = writeln!(
            out,
            "routing: mark {} table {} rule priority {}; socket mark {:#x}",
            s.mark, s.table, s.rule_priority, s.socket_mark
        );
        let pinned = match s.pin {
            true => format!("pinned under {}", s.pin_dir.display()),
            false => "not pinned".to_string(),
        };
        let _ = writeln!(
            out,
            "lifecycle: {pinned}; fail-{}; drain timeout {}",
            s.fail_mode,
            Human(s.drain_timeout)
        );
        if let Some(local) = &self.local {
            let _ = writeln!(
                out,
                "local connections (rules with origin local or any), by the rules' selection:"
            );
            for (index, selection) in local.used() {
                let _ = writeln!(out, "  selection {index}: {selection}");
            }
        }
        for (name, entries) in &self.ipset_entries {
            let _ = writeln!(
                out,
                "ipset {name}: {} entries now, read again every {} while running",
                entries.len(),
                Human(crate::datapath::ipset::POLL_INTERVAL)
            );
        }
        let _ = writeln!(out, "listeners:");
        for listener in &self.listeners {
            let transports = match (listener.tcp, listener.udp) {
                (true, true) => "tcp+udp",
                (true, false) => "tcp",
                (false, true) => "udp",
                (false, false) => "unused",
            };
            if let Some(external) = &listener.external {
                let _ = writeln!(
                    out,
                    "  {:<16} {transports:<8} external proxy at {external}",
                    listener.name
                );
                continue;
            }
            let listen: Vec<String> = listener.listen.iter().map(ToString::to_string).collect();
            let upstream = listener
                .upstream
                .map_or("original destination".into(), |u| u.to_string());
            let _ = writeln!(
                out,
                "  {:<16} {transports:<8} listen {}  relay to {upstream}",
                listener.name,
                listen.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "rules ({} configured, {} after splitting lists), in the order they are consulted:",
            self.configured_rules,
            self.rules.len()
        );
        let _ = writeln!(
            out,
            "  {:>5}  {:>5}  {:<60} action",
            "order", "rule", "match"
        );
        for (order, rule) in rules::by_precedence(&self.rules).iter().enumerate() {
            let action = self.action_of(rule);
            let _ = writeln!(
                out,
                "  {:>5}  {:>5}  {:<60} {action}",
                order + 1,
                rule.number,
                rule.to_string()
            );
        }
        out
    }
}

impl Config {
    /// What `rule` does, with its listener's name for a steer rule (`steer web`).
    pub fn action_of(&self, rule: &Rule) -> String {
        match rule.action {
            Action::Steer(listener) => format!("steer {}", self.listeners[listener as usize].name),
            other => other.to_string(),
        }
    }
}
