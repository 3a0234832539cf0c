//! What the configuration refuses across its parts: more rules or listeners than the
//! program holds, interfaces missing or named twice, a socket mark the routing rule would
//! catch, listener addresses that cannot be bound or would loop.

use std::net::SocketAddr;

use anyhow::{bail, Result};
use tproxy_common::{
    local_origin::MAX_OUT_INTERFACES,
    maps::{MAX_LISTENERS, MAX_MARK_RULES},
};

use super::{
    reaches_own_listener, upstream_flag, Config, Interfaces, ListenerConfig, RunArgs,
    DEFAULT_LISTENER,
};
use crate::{
    datapath::rules::Protocol,
    datapath::rules::{self, Action, CtDirection, Rule},
};

impl Config {
    /// Refuses what no part of the configuration shows alone, in the order an operator
    /// would fix it: nothing to steer, too much of it, nowhere to steer it.
    pub(super) fn check(&self, args: &RunArgs) -> Result<()> {
        self.check_counts(args)?;
        self.check_interfaces(args)?;
        if let Some(external) = self.listeners.iter().find(|l| l.external.is_some()) {
            if args.relay_only {
                bail!("--relay-only: listener `{}` is an external proxy, which only the eBPF program can hand flows to", external.name);
            }
        }
        if args.relay_only && self.settings.pin {
            bail!("--pin: with --relay-only there is no program to pin");
        }
        self.check_socket_mark(args)?;
        self.check_local_origin(args)?;
        for rule in self
            .rules
            .iter()
            .chain(&self.own_address_rules)
            .chain(&self.anycast_rules)
            .chain(&self.ipset_rules)
        {
            if let (Some(iface), Interfaces::Named(names)) =
                (&rule.iface, &self.settings.interfaces)
            {
                use crate::datapath::interfaces::matches;
                // A rule's pattern may name some of the steered interfaces only.
                let steered = names.iter().any(|entry| {
                    crate::datapath::interfaces::selects(entry, iface) || matches(iface, entry)
                });
                if !steered && !args.relay_only {
                    bail!("rule {} names interface {iface}, which is not among the steered interfaces ({})", rule.number, names.join(", "));
                }
            }
        }
        Ok(())
    }

    fn check_counts(&self, args: &RunArgs) -> Result<()> {
        if self.rules.is_empty()
            && self.own_address_rules.is_empty()
            && self.anycast_rules.is_empty()
            && self.ipset_rules.is_empty()
        {
            bail!(match &args.config {
                Some(path) => format!(
                    "{}: no [[rule]] and no --tcp/--udp: nothing to steer",
                    path.display()
                ),
                None =>
                    "nothing to steer: give --tcp and/or --udp ports, or --config FILE with rules"
                        .into(),
            });
        }
        if self.configured_rules > rules::MAX_RULES {
            bail!(
                "{} rules configured; at most {} are supported",
                self.configured_rules,
                rules::MAX_RULES
            );
        }
        if self.listeners.len() > MAX_LISTENERS as usize {
            bail!(
                "{} listeners defined; at most {MAX_LISTENERS} are supported",
                self.listeners.len()
            );
        }
        Ok(())
    }

    fn check_interfaces(&self, args: &RunArgs) -> Result<()> {
        if self.settings.interfaces == Interfaces::Named(Vec::new()) && !args.relay_only {
            bail!(match &args.config {
                Some(path) => format!(
                    "no interface to steer: set `interfaces` in {} or give --iface",
                    path.display()
                ),
                None => "no interface to steer: give --iface (or --relay-only)".into(),
            });
        }
        if let Interfaces::Named(names) = &self.settings.interfaces {
            let twice = names
                .iter()
                .enumerate()
                .find(|(i, iface)| names[..*i].contains(iface));
            if let Some((_, iface)) = twice {
                bail!("interface {iface} is given twice");
            }
            if names.len() > 1 && names.iter().any(|name| name == "all") {
                bail!(
                    "interface `all` among other interfaces: `all` alone means every interface \
                     but lo (no interface can be named so); give it alone, with lo only (`all` \
                     and lo: every interface), or only names and patterns"
                );
            }
        }
        Ok(())
    }

    /// Leaves the routing mark's bits out of the rules' marks (see
    /// [`rules::effective_mark`]); refuses rules with a mark that the program could not
    /// decide as configured.
    pub(super) fn settle_marks(&mut self) -> Result<()> {
        // The templates of the rules written per address or route are checked too: their
        // copies come later, and without them a host with no address yet would pass.
        let templates = self
            .own_address_rules
            .iter_mut()
            .chain(&mut self.anycast_rules)
            .chain(&mut self.ipset_rules);
        for rule in self.rules.iter_mut().chain(templates) {
            rule.mark = rules::effective_mark(rule, self.settings.mark)
                .map_err(|problem| anyhow::anyhow!("rule {}: {problem}", rule.number))?;
        }
        Ok(())
    }

    /// Refuses more rules tried one by one than the program holds. Once the processes' selections are
    /// known (the direction guard has entries per selection); with one copy of each rule
    /// written per address, route or set entry, whose count is known only at run time
    /// (whether the direction guard holds depends on them). The count does not depend on
    /// the interfaces attached.
    pub(super) fn check_mark_stage(&self) -> Result<()> {
        let rules: Vec<Rule> = self
            .rules
            .iter()
            .chain(&self.own_address_rules)
            .chain(&self.anycast_rules)
            .chain(&self.ipset_rules)
            .cloned()
            .collect();
        let entries = rules::mark_rules(&rules, &[]).len();
        if entries <= MAX_MARK_RULES {
            return Ok(());
        }
        let needs = rules::mark_entries_by_rule(&rules);
        let mut counts: Vec<(usize, usize)> = needs.by_rule.into_iter().collect();
        counts.sort_by_key(|&(number, count)| (std::cmp::Reverse(count), number));
        let mut most: Vec<String> = counts
            .iter()
            .take(5)
            .map(|(number, count)| format!("rule[{number}]: {count}"))
            .collect();
        if needs.guard > 0 {
            most.insert(0, format!("the direction guard: {}", needs.guard));
        }
        // Advice only where asking helps: the guard's entries per selection may cost more
        // than the rules it takes the question off.
        let all_asking: Vec<Rule> = rules
            .iter()
            .map(|rule| {
                match needs.keep_guard_off.contains(&rule.number)
                // A rule's part for other protocols asks nothing of any packet's direction.
                && rule.protocol != Protocol::Other
                {
                    true => Rule {
                        ct_direction: Some(CtDirection::Original),
                        ..rule.clone()
                    },
                    false => rule.clone(),
                }
            })
            .collect();
        let helps = rules::mark_rules(&all_asking, &[]).len() < entries;
        let guard = match needs.keep_guard_off.as_slice() {
            _ if !helps => String::new(),
            [] => String::new(),
            numbers => {
                let mut named: Vec<String> = numbers
                    .iter()
                    .take(5)
                    .map(|number| format!("rule[{number}]"))
                    .collect();
                if numbers.len() > named.len() {
                    named.push(format!("{} more", numbers.len() - named.len()));
                }
                // Their part for other protocols cannot ask: it is written apart.
                let apart = match rules
                    .iter()
                    .any(|r| r.protocol == Protocol::Other && numbers.contains(&r.number))
                {
                    true => {
                        "; a rule with \"other\" in its proto asks in a rule of its own for \
                             TCP and UDP"
                    }
                    false => "",
                };
                format!(
                    "; {} {} not ask for ct_direction = \"original\" as the others of their \
                     origin do (were they all to ask, the direction would be asked once for all \
                     of them{apart})",
                    named.join(", "),
                    if numbers.len() == 1 { "does" } else { "do" }
                )
            }
        };
        bail!(
            "the rules with a mark, a source port or a connection's direction need {entries} entries (one per \
             destination and source prefix and port spec, destination and source), more \
             than the {MAX_MARK_RULES} the program holds, which try them one by one; most \
             of them: {}{guard}",
            most.join(", ")
        )
    }

    fn check_socket_mark(&self, args: &RunArgs) -> Result<()> {
        let settings = &self.settings;
        if settings.socket_mark & settings.mark.mask != settings.mark.value {
            return Ok(());
        }
        let origin = match (&args.settings.socket_mark, &args.config) {
            (None, Some(file)) => format!(
                "socket_mark {:#x} (from {})",
                settings.socket_mark,
                file.display()
            ),
            _ => format!("--socket-mark {:#x}", settings.socket_mark),
        };
        bail!(
            "{origin} matches the routing rule's fwmark {}: replies from tproxy's UDP \
             sockets would be routed back to this host",
            settings.mark
        );
    }

    /// Marks each listener with the transports its rules steer to it.
    pub(super) fn mark_listener_transports(&mut self) {
        // A steer rule for the host's own addresses or a set's entries needs its listener
        // whatever addresses the host or the set has now.
        let templates = self.own_address_rules.iter().chain(&self.ipset_rules);
        for rule in self.rules.iter().chain(templates) {
            if let Action::Steer(index) = rule.action {
                let listener = &mut self.listeners[index as usize];
                match rule.protocol {
                    Protocol::Tcp => listener.tcp = true,
                    Protocol::Udp => listener.udp = true,
                    // `check_protocol` refuses it.
                    Protocol::Other => {}
                }
            }
        }
    }

    /// Combinations that steering local connections (`--local`, or rules with origin
    /// `local` or `any`) cannot serve.
    fn check_local_origin(&self, args: &RunArgs) -> Result<()> {
        let Some(local) = &self.local else {
            return Ok(());
        };
        let what = match args.local {
            true => "--local",
            false => "rules for local connections",
        };
        if args.relay_only {
            // As for forwarded rules: the file's rules are someone else's to carry out (an
            // iptables mangle OUTPUT recipe), and only its listeners are served.
            return Ok(());
        }
        let out_interfaces = rules::out_interfaces(&self.rules);
        if out_interfaces.len() > MAX_OUT_INTERFACES {
            bail!(
                "the rules name {} distinct out_interface values ({}); at most \
                 {MAX_OUT_INTERFACES} are supported",
                out_interfaces.len(),
                out_interfaces.join(", ")
            );
        }
        let steers_to_external = |rule: &rules::Rule| match rule.action {
            Action::Steer(index) if rule.origin.local() => {
                self.listeners[index as usize].external.is_some()
            }
            _ => false,
        };
        // Whatever its out_interface: the proxy's upstream connections leave by that interface
        // too.
        let every_process = |rule: &rules::Rule| {
            local
                .get(rule.selection)
                .is_some_and(|selection| selection.selects_every_process())
        };
        let every_process_to_external = self
            .rules
            .iter()
            .chain(&self.own_address_rules)
            .chain(&self.ipset_rules)
            .find(|rule| steers_to_external(rule) && every_process(rule));
        if let Some(rule) = every_process_to_external {
            let Action::Steer(index) = rule.action else {
                unreachable!("only steer rules have a listener");
            };
            let listener = &self.listeners[index as usize].name;
            // With every process selected, the proxy is too: its upstream connection would
            // be marked, come back over lo and be handed to itself, unless it marks its
            // sockets with `socket_mark`, which is never steered (a recipe's loop guard, `-m
            // mark --mark X -j RETURN`, translates to that). Only a socket_mark given says
            // so: the default is tproxy's own.
            if !self.socket_mark_given {
                bail!(
                    "{what} for every process (no --cgroup, or cgroup \"/\") with listener \
                     `{listener}` an external proxy (rule {}): the proxy's own upstream \
                     connections would be steered back into it; select the applications by \
                     cgroup, user or group (and keep the proxy out of them), or set socket_mark \
                     to the mark the proxy puts on its sockets",
                    rule.number
                );
            }
            log::info!(
                "rule {} steers every process's connections to listener `{listener}`, an \
                 external proxy: its own connections are kept out only if it marks its sockets \
                 with socket_mark {:#x}",
                rule.number,
                self.settings.socket_mark
            );
        }
        if self.settings.transparent_upstream {
            // The client's address is 127.0.0.1 (or ::1): a loopback source cannot leave
            // through another interface.
            bail!(
                "{what} with --transparent-upstream: local connections come from 127.0.0.1/::1, \
                 which cannot be the source of an upstream connection; leave one of them out"
            );
        }
        Ok(())
    }

    /// Refuses listener addresses that `run` could not bind or that would loop: two
    /// addresses of one family in a listener, two listeners of one transport on one address
    /// (or one on a wildcard address and one on an address it covers, same port), and an
    /// upstream that is one of the listeners' addresses. Port 0 is known only once bound:
    /// `run` checks the upstreams again then.
    pub(super) fn check_listener_addresses(&self) -> Result<()> {
        let what = |listener: &ListenerConfig| match listener.name.as_str() {
            DEFAULT_LISTENER => "--listen".to_string(),
            name => format!("listener `{name}`: listen"),
        };
        for listener in &self.listeners {
            for (i, addr) in listener.listen.iter().enumerate() {
                if listener.listen[..i]
                    .iter()
                    .any(|earlier| earlier.is_ipv4() == addr.is_ipv4())
                {
                    bail!(
                        "{} {addr}: at most one address per address family",
                        what(listener)
                    );
                }
            }
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            for earlier in &self.listeners[..i] {
                if !(listener.tcp && earlier.tcp || listener.udp && earlier.udp) {
                    continue;
                }
                for addr in listener.listen.iter().filter(|a| a.port() != 0) {
                    let overlap = earlier.listen.iter().find(|other| {
                        other.port() == addr.port()
                            && other.is_ipv4() == addr.is_ipv4()
                            && (other.ip() == addr.ip()
                                || other.ip().is_unspecified()
                                || addr.ip().is_unspecified())
                    });
                    if let Some(other) = overlap {
                        bail!(
                            "{} {addr}: listener `{}` listens on {other} already; two listeners \
                             cannot share an address",
                            what(listener),
                            earlier.name
                        );
                    }
                }
            }
        }
        let own: Vec<SocketAddr> = self
            .listeners
            .iter()
            .filter(|listener| listener.tcp || listener.udp)
            .flat_map(|listener| listener.listen.iter().copied())
            .filter(|addr| addr.port() != 0)
            .collect();
        for listener in &self.listeners {
            if let Some(upstream) = listener.upstream {
                if upstream.port() == 0 {
                    bail!(
                        "{}: port 0 is no port to connect to",
                        upstream_flag(&listener.name, upstream)
                    );
                }
                if reaches_own_listener(&own, upstream) {
                    bail!(
                        "{} is one of tproxy's own listeners: that would loop",
                        upstream_flag(&listener.name, upstream)
                    );
                }
            }
        }
        Ok(())
    }
}
