//! What putting a configuration in force changes in the relays' listeners, worked out
//! without touching anything in force: which running listeners are kept (same name and
//! addresses), which go, and the sockets the new ones need, handed over by a predecessor or
//! bound here. `relay::listeners` commits the plan.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use tproxy_common::maps::{ExternalListener, MAX_LISTENERS};

use crate::{
    config::{reaches_own_listener, Config, ListenerConfig},
    datapath::rules::{Action, Rule},
    datapath::steering::Steering,
    relay::listener::{self, TransparentListener},
    relay::listeners::Relays,
    values::Transport,
};

/// Where a wanted listener goes (see `Relays::place`).
struct Placement {
    slot: u32,
    /// Its addresses as configured, or as a kept listener bound them.
    bound: Vec<SocketAddr>,
    /// The running listener it keeps, by index.
    kept: Option<usize>,
    need_tcp: bool,
    need_udp: bool,
}

/// What putting a configuration in force changes in the listeners; built without touching
/// anything in force, so a failure leaves everything as it was.
pub(crate) struct Plan {
    /// For each configured listener, in order: its slot.
    pub(crate) slots: Vec<u32>,
    /// Sockets bound for it, not yet serving.
    pub(crate) new_sockets: Vec<NewSockets>,
    /// Indices into `Relays::listeners` of those the configuration drops or replaces.
    pub(crate) removed: Vec<usize>,
    /// For kept listeners: (index into `Relays::listeners`, new config, stop tcp, stop udp).
    pub(crate) kept: Vec<(usize, ListenerConfig, bool, bool)>,
    /// For each external listener: its slot and the program's entries for it.
    pub(crate) external: Vec<(u32, Vec<(u32, ExternalListener)>)>,
}

pub(crate) struct NewSockets {
    /// `Some`: a listener that is kept (index into `Relays::listeners`) and gains a transport.
    pub(crate) kept: Option<usize>,
    pub(crate) config: ListenerConfig,
    pub(crate) slot: u32,
    pub(crate) bound: Vec<SocketAddr>,
    pub(crate) tcp: Vec<TransparentListener>,
    pub(crate) udp: Vec<TransparentListener>,
}

impl Plan {
    /// The configuration's rules with listener indices turned into socket-map slots.
    pub(crate) fn rules(&self, config: &Config) -> Vec<Rule> {
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

    /// Puts the new sockets into the socket map, and tells the program where the external
    /// listeners are (unused until the rules point at them).
    pub(crate) fn register(&self, steering: &mut Steering) -> Result<()> {
        for new in &self.new_sockets {
            for socket in new.tcp.iter().chain(&new.udp) {
                steering.register_listener(new.slot, socket.slot, &socket.socket)?;
            }
        }
        for (slot, entries) in &self.external {
            steering.set_external_listener(*slot, entries)?;
        }
        Ok(())
    }

    /// Undoes [`Plan::register`] for listeners that do not exist yet.
    pub(crate) fn unregister(&self, steering: &mut Steering) {
        for new in self.new_sockets.iter().filter(|n| n.kept.is_none()) {
            let _ = steering.unregister_listener(new.slot);
        }
    }
}

impl Relays {
    /// Binds what `config` needs that is not serving yet and works out the rest.
    pub(crate) fn plan(&mut self, config: &Config) -> Result<Plan> {
        let mut plan = Plan {
            slots: Vec::new(),
            new_sockets: Vec::new(),
            removed: Vec::new(),
            kept: Vec::new(),
            external: Vec::new(),
        };
        let mut taken: Vec<u32> = self.listeners.iter().map(|l| l.slot).collect();
        for wanted in &config.listeners {
            let placement = self.place(wanted, &mut taken, &mut plan)?;
            plan.slots.push(placement.slot);
            if let Some(external) = &wanted.external {
                // Nothing to bind: the proxy's sockets are found by lookup, packet by packet.
                let slot = placement.slot;
                plan.external
                    .push((slot, external.entries(slot, wanted.tcp, wanted.udp)));
                if placement.kept.is_none() {
                    plan.new_sockets.push(NewSockets {
                        kept: None,
                        config: wanted.clone(),
                        slot,
                        bound: Vec::new(),
                        tcp: Vec::new(),
                        udp: Vec::new(),
                    });
                }
                continue;
            }
            if placement.need_tcp || placement.need_udp {
                plan.new_sockets.push(self.sockets_for(wanted, placement)?);
            }
        }
        plan.removed = (0..self.listeners.len())
            .filter(|i| !plan.kept.iter().any(|(kept, ..)| kept == i))
            .collect();
        self.refuse_upstream_loops(config, &plan)?;
        Ok(plan)
    }

    /// Where `wanted` goes: the running listener it keeps (same name and addresses), or a
    /// free slot; and which transports still need sockets.
    fn place(
        &self,
        wanted: &ListenerConfig,
        taken: &mut Vec<u32>,
        plan: &mut Plan,
    ) -> Result<Placement> {
        let existing = self.listeners.iter().position(|l| {
            l.config.name == wanted.name
                && l.config.listen == wanted.listen
                && l.config.external == wanted.external
        });
        if let Some(index) = existing {
            let running = &self.listeners[index];
            plan.kept.push((
                index,
                wanted.clone(),
                running.tcp.is_some() && !wanted.tcp,
                running.udp.is_some() && !wanted.udp,
            ));
            return Ok(Placement {
                slot: running.slot,
                bound: running.bound.clone(),
                kept: Some(index),
                need_tcp: wanted.tcp && running.tcp.is_none(),
                need_udp: wanted.udp && running.udp.is_none(),
            });
        }
        let slot = (0..MAX_LISTENERS)
            .find(|slot| !taken.contains(slot))
            .with_context(|| {
                format!(
                    "no free listener slot for `{}` (at most {MAX_LISTENERS})",
                    wanted.name
                )
            })?;
        taken.push(slot);
        Ok(Placement {
            slot,
            bound: wanted.listen.clone(),
            kept: None,
            need_tcp: wanted.tcp,
            need_udp: wanted.udp,
        })
    }

    /// The sockets a placement still needs: handed over by a predecessor, or bound.
    fn sockets_for(&mut self, wanted: &ListenerConfig, placement: Placement) -> Result<NewSockets> {
        let what = |transport| format!("listener `{}` ({transport:?})", wanted.name);
        let (inherited_tcp, inherited_udp, bound) = match placement.kept {
            None => self.take_inherited(wanted, placement.bound),
            Some(_) => (Vec::new(), Vec::new(), placement.bound),
        };
        let tcp = match placement.need_tcp {
            true if !inherited_tcp.is_empty() => inherited_tcp,
            true => {
                listener::bind_all(&bound, Transport::Tcp).with_context(|| what(Transport::Tcp))?
            }
            false => Vec::new(),
        };
        // UDP shares the port TCP got (or was given).
        let udp_addrs = match tcp.first() {
            Some(first) => bound_addrs(&bound, first)?,
            None => bound.clone(),
        };
        let udp = match placement.need_udp {
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
        if placement.kept.is_none() {
            // Once per address, whether TCP, UDP or both are bound there.
            for addr in bound.iter().filter(|addr| !addr.ip().is_loopback()) {
                log::warn!("listener {addr} is not on loopback: clients can reach it directly");
            }
        }
        Ok(NewSockets {
            kept: placement.kept,
            config: wanted.clone(),
            slot: placement.slot,
            bound,
            tcp,
            udp,
        })
    }

    /// The TCP and UDP sockets a predecessor handed over for `wanted` (same name and
    /// addresses), and the addresses they are bound to; none: empty, and `bound` as given.
    fn take_inherited(
        &mut self,
        wanted: &ListenerConfig,
        bound: Vec<SocketAddr>,
    ) -> (
        Vec<TransparentListener>,
        Vec<TransparentListener>,
        Vec<SocketAddr>,
    ) {
        let Some(index) = self
            .inherited
            .iter()
            .position(|(l, _)| l.name == wanted.name && l.listen == wanted.listen)
        else {
            return (Vec::new(), Vec::new(), bound);
        };
        let (handed, fds) = self.inherited.swap_remove(index);
        let (mut tcp, mut udp) = (Vec::new(), Vec::new());
        for (socket, fd) in handed.sockets.into_iter().zip(fds) {
            let listener = TransparentListener {
                slot: socket.slot(),
                socket: socket2::Socket::from(fd),
            };
            match listener.slot.is_tcp() {
                true => tcp.push(listener),
                false => udp.push(listener),
            }
        }
        (tcp, udp, handed.bound)
    }

    /// Refuses an upstream or an external proxy that is one of the listeners the plan keeps
    /// or binds.
    fn refuse_upstream_loops(&self, config: &Config, plan: &Plan) -> Result<()> {
        let own: Vec<SocketAddr> = plan
            .kept
            .iter()
            .flat_map(|(index, ..)| self.listeners[*index].bound.clone())
            .chain(plan.new_sockets.iter().flat_map(|new| new.bound.clone()))
            .collect();
        for wanted in &config.listeners {
            let external = wanted.external.iter().flat_map(|e| e.addresses());
            if let Some(addr) = external
                .into_iter()
                .find(|addr| reaches_own_listener(&own, *addr))
            {
                // The program would find tproxy's own socket there and relay the flows itself.
                bail!(
                    "listener `{}`: external {addr} is one of tproxy's own listeners, not a proxy",
                    wanted.name
                );
            }
            if let Some(upstream) = wanted.upstream {
                if reaches_own_listener(&own, upstream) {
                    bail!(
                        "{} is one of tproxy's own listeners: that would loop",
                        crate::config::upstream_flag(&wanted.name, upstream)
                    );
                }
            }
        }
        Ok(())
    }
}

/// `wanted` addresses with port 0 replaced by the port `first` was bound to.
pub(crate) fn bound_addrs(
    wanted: &[SocketAddr],
    first: &TransparentListener,
) -> Result<Vec<SocketAddr>> {
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
