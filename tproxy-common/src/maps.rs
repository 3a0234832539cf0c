//! Names, sizes and layouts of the maps and globals through which the loader configures the
//! eBPF program. Both sides name maps with these constants so a rename cannot split them.

/// Per-port protocol bit set, indexed by destination port (host byte order). An array rather
/// than a hash: one bounded lookup whatever the number of steered ports.
pub const STEERED_PORTS: &str = "STEERED_PORTS";
/// One entry per possible port.
pub const STEERED_PORTS_LEN: u32 = 65536;
/// Bit in a [`STEERED_PORTS`] value: TCP to this port is steered.
pub const PORT_TCP: u8 = 1 << 0;
/// Bit in a [`STEERED_PORTS`] value: UDP to this port is steered.
pub const PORT_UDP: u8 = 1 << 1;

/// Longest-prefix-match set of steered IPv4 destinations, keyed by the address in network
/// byte order (`[u8; 4]`); the value is unused and always 1.
pub const STEERED_DST_V4: &str = "STEERED_DST_V4";
/// Longest-prefix-match set of steered IPv6 destinations (`[u8; 16]`, network byte order).
pub const STEERED_DST_V6: &str = "STEERED_DST_V6";
/// Most prefixes per address family that `--dst` may give.
pub const MAX_DST_PREFIXES: u32 = 16384;

/// SOCKMAP holding tproxy's transparent listeners, indexed by [`ListenerSlot`].
pub const LISTENERS: &str = "LISTENERS";

/// Which listener a steered packet is handed to: a socket can only be assigned packets of its
/// own address family.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerSlot {
    /// The IPv4 TCP listener.
    TcpV4 = 0,
    /// The IPv6 TCP listener.
    TcpV6 = 1,
    /// The IPv4 UDP listener.
    UdpV4 = 2,
    /// The IPv6 UDP listener.
    UdpV6 = 3,
}

impl ListenerSlot {
    /// Number of slots in [`LISTENERS`].
    pub const COUNT: u32 = 4;

    /// The slot of the listener for a flow's transport and address family.
    pub const fn of(tcp: bool, ipv6: bool) -> Self {
        match (tcp, ipv6) {
            (true, false) => ListenerSlot::TcpV4,
            (true, true) => ListenerSlot::TcpV6,
            (false, false) => ListenerSlot::UdpV4,
            (false, true) => ListenerSlot::UdpV6,
        }
    }
}

/// Interfaces the tc program is attached to (ifindex → 1), for the `sk_lookup` program,
/// which sees every listener lookup in the network namespace.
pub const STEERED_IFACES: &str = "STEERED_IFACES";
/// Most `--iface` interfaces.
pub const MAX_STEERED_IFACES: u32 = 256;

/// Name of the `sk_lookup` program in the object file.
pub const LOOKUP_PROGRAM_NAME: &str = "tproxy_tw_syn";

/// Per-CPU array of `u64` packet counts, indexed by [`crate::decision::counter_index`].
pub const COUNTERS: &str = "COUNTERS";
/// Length of [`COUNTERS`]: one row of outcomes per [`crate::decision::Protocol`].
pub const COUNTERS_LEN: u32 = crate::decision::Protocol::COUNT * crate::Outcome::COUNT;

/// Global (`u32`): the `SO_MARK` that tproxy puts on its own per-flow UDP sockets. A socket
/// found by the UDP socket match is assigned only if it carries this mark: a local wildcard
/// service on a steered port must not capture steered flows. It must not match the routing
/// rule, or the replies those sockets send would be routed back to the local host.
pub const OWN_SOCKET_MARK_GLOBAL: &str = "OWN_SOCKET_MARK";

/// Global (`u32`): the routing mark OR'ed, under [`MARK_MASK_GLOBAL`], into every packet the
/// program assigns to a socket, so that policy routing delivers it locally.
pub const MARK_GLOBAL: &str = "ROUTING_MARK";
/// Global (`u32`): the bits of `skb->mark` that belong to tproxy.
pub const MARK_MASK_GLOBAL: &str = "ROUTING_MARK_MASK";

/// Name of the tc ingress program in the object file.
pub const PROGRAM_NAME: &str = "tproxy_ingress";

#[cfg(test)]
mod tests {
    use super::ListenerSlot;

    #[test]
    fn every_transport_and_family_has_its_own_slot() {
        let slots = [(true, false), (true, true), (false, false), (false, true)]
            .map(|(tcp, ipv6)| ListenerSlot::of(tcp, ipv6) as u32);
        assert_eq!(slots, [0, 1, 2, 3]);
        assert!(slots.iter().all(|slot| *slot < ListenerSlot::COUNT));
    }
}
