//! Names, sizes and layouts of the maps and globals through which the loader configures the
//! eBPF program. The loader finds maps and globals by these names; the program declares them
//! as statics of the same names (the eBPF crate cannot use a constant as a symbol name), so
//! a rename must change both.

/// Array (`u32`, one entry) holding the rule-set generation in force, 0 or 1. The rule maps
/// hold the entries of both generations side by side (class and cell ids carry the
/// generation), so a reload writes the new generation completely and then flips this one
/// value: a packet reads it once and sees either the old rule set or the new one, never a mix.
pub const ACTIVE_GENERATION: &str = "ACTIVE_GENERATION";

/// Stage 1 of a rule lookup. Array (`u32`) from (generation, transport, destination port) to
/// what the rules say about the port: whether single-port rules name it
/// ([`PORT_HAS_SINGLE`]), whether any-port rules exist ([`PORT_HAS_ANY`]), and the class of
/// the port ranges containing it ([`PORT_RANGE_CLASS`]; ports inside the same ranges share a
/// class). 0: no rule can match, the packet is passed after this one lookup.
pub const PORT_CLASSES: &str = "PORT_CLASSES";
/// Two generations × two transports × every port.
pub const PORT_CLASSES_LEN: u32 = 2 * 2 * 65536;
/// Bit in a [`PORT_CLASSES`] value: some single-port rule names this port.
pub const PORT_HAS_SINGLE: u32 = 1 << 29;
/// Bit in a [`PORT_CLASSES`] value: there are any-port rules for this transport.
pub const PORT_HAS_ANY: u32 = 1 << 30;
/// Bits of a [`PORT_CLASSES`] value holding the range class (0: in no range).
pub const PORT_RANGE_CLASS: u32 = PORT_HAS_SINGLE - 1;

/// The [`PORT_CLASSES`] index of a port (host byte order).
pub const fn port_class_index(generation: u32, udp: bool, port: u16) -> u32 {
    ((generation & 1) * 2 + udp as u32) * 65536 + port as u32
}

/// The [`DstKey::class`] of the single-port rules for a port. The rules of a packet are in up
/// to three groups, each looked up on its own: single-port rules, range rules, any-port
/// rules; the best-ranked answer wins.
pub const fn single_port_class(generation: u32, udp: bool, port: u16) -> u32 {
    generation_bit(generation) | (1 << 29) | (udp as u32) << 16 | port as u32
}

/// The [`DstKey::class`] of a range class (from [`PORT_CLASSES`]).
pub const fn range_class(generation: u32, class: u32) -> u32 {
    generation_bit(generation) | (2 << 29) | (class & PORT_RANGE_CLASS)
}

/// The [`DstKey::class`] of the any-port rules of a transport.
pub const fn any_port_class(generation: u32, udp: bool) -> u32 {
    generation_bit(generation) | (3 << 29) | udp as u32
}

/// The [`DstKey::class`] of the rules for protocols besides TCP and UDP (which have no
/// ports): the only group such a packet has.
pub const fn other_protocols_class(generation: u32) -> u32 {
    generation_bit(generation) | (3 << 29) | 2
}

/// How many rule groups a packet can have: single-port, range, any-port.
pub const RULE_GROUPS: usize = 3;

/// The [`DstKey::class`] of a packet's rule group number `group` (`0..RULE_GROUPS`, in the
/// order the program and the loader's oracle consult them), given its [`PORT_CLASSES`]
/// `entry`; `None` when the packet has no rules in that group. One function for both sides,
/// so the oracle that tests the compiled maps asks exactly what the program asks.
pub const fn rule_group_class(
    entry: u32,
    generation: u32,
    udp: bool,
    port: u16,
    group: usize,
) -> Option<u32> {
    match group {
        0 if entry & PORT_HAS_SINGLE != 0 => Some(single_port_class(generation, udp, port)),
        1 if entry & PORT_RANGE_CLASS != 0 => Some(range_class(generation, entry)),
        2 if entry & PORT_HAS_ANY != 0 => Some(any_port_class(generation, udp)),
        _ => None,
    }
}

const fn generation_bit(generation: u32) -> u32 {
    (generation & 1) << 31
}

/// The mark stage, consulted before the others: array (two entries, indexed by generation)
/// of [`MarkRules`], the rules tried one by one: those that match on the packet's mark
/// (`skb->mark` at tc ingress, the socket's `SO_MARK` in the connect programs) or on its
/// source port. Neither can be keyed into the LPM stages, so each rule is tried in turn; the
/// best-ranked match among them and the LPM stages' answer wins (see
/// [`crate::decision::match_mark_rules`]).
pub const MARK_RULES: &str = "MARK_RULES";
/// Most mark-stage entries one generation may hold (rules with the same matches for TCP and
/// UDP share one).
pub const MAX_MARK_RULES: usize = 32;
/// [`MarkRule::transports`] bit: the rule matches TCP.
pub const MARK_RULE_TCP: u32 = 1;
/// [`MarkRule::transports`] bit: the rule matches UDP.
pub const MARK_RULE_UDP: u32 = 2;

/// A rule tried one by one: `mark & mask == value` (mask 0: any mark), with its transports,
/// destination and source port ranges, destination and source prefixes and ingress
/// interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MarkRule {
    pub value: u32,
    pub mask: u32,
    /// [`MARK_RULE_TCP`] and/or [`MARK_RULE_UDP`].
    pub transports: u32,
    /// Destination ports, host order, inclusive (a rule for any port: 1 to 65535).
    pub first_port: u16,
    pub last_port: u16,
    /// Source ports, host order, inclusive (a rule for any source port: 0 to 65535).
    pub first_sport: u16,
    pub last_sport: u16,
    /// 1 for an IPv6 destination prefix.
    pub ipv6: u32,
    /// The ingress interface's index; 0: any.
    pub ifindex: u32,
    /// The destination prefix's address and netmask as the 32-bit words of the address bytes
    /// (network order in memory; IPv4 in the first word).
    pub dst: [u32; 4],
    pub dst_mask: [u32; 4],
    /// The source prefix, likewise (netmask 0: any source).
    pub src: [u32; 4],
    pub src_mask: [u32; 4],
    /// What the rule does, with its rank ([`VERDICT_STEER`], [`VERDICT_BYPASS`],
    /// [`VERDICT_DROP`], [`VERDICT_DELIVER`], [`VERDICT_REJECT`] or [`VERDICT_PASS`]).
    pub verdict: Verdict,
    /// The direction of its connection the packet must travel in, as the kernel's connection
    /// tracking has it ([`CT_ORIGINAL`] or [`CT_REPLY`]); 0: any.
    pub ct_direction: u32,
}

/// [`MarkRule::ct_direction`], [`MarkedPacket::ct_direction`]: the direction of the
/// connection's first packet, a packet no tracked connection has yet included (it starts
/// one).
pub const CT_ORIGINAL: u32 = 1;
/// [`MarkRule::ct_direction`], [`MarkedPacket::ct_direction`]: the other direction.
pub const CT_REPLY: u32 = 2;

/// [`MarkRules::ct_direction`] bit: a rule for arrivals matches on the direction.
pub const CT_ASKED_BY_ARRIVALS: u32 = 1;
/// [`MarkRules::ct_direction`] bit: a rule for local connections matches on the direction.
pub const CT_ASKED_BY_LOCAL: u32 = 2;

/// The helper number the program calls where it means the kfunc `bpf_skb_ct_lookup`: aya-ebpf
/// cannot declare a kfunc, so the loader rewrites each such call into the kfunc call (or,
/// on a kernel without it, into "nothing found") before loading. Above every helper number.
pub const KFUNC_CT_LOOKUP: u32 = 0x7fff_ff01;
/// As [`KFUNC_CT_LOOKUP`], for `bpf_ct_release`.
pub const KFUNC_CT_RELEASE: u32 = 0x7fff_ff02;

/// Per-CPU array (one [`MarkedPacket`]): where the program writes the packet the mark stage
/// looks at, rather than on its stack, which is nearly full.
pub const MARK_PACKET: &str = "MARK_PACKET";

/// A packet as the mark stage sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MarkedPacket {
    /// `skb->mark`, or in the connect programs the socket's mark.
    pub mark: u32,
    /// 1 for UDP.
    pub udp: u32,
    /// The destination port, host order.
    pub port: u32,
    /// The source port, host order (in the connect and sendmsg programs, the port the socket
    /// is bound to: 0 while unbound).
    pub sport: u32,
    /// The ingress interface's index (0 in the connect programs).
    pub ifindex: u32,
    /// 1 for IPv6.
    pub ipv6: u32,
    /// The addresses as [`MarkRule::dst`] holds them (IPv4 in the first word).
    pub dst: [u32; 4],
    pub src: [u32; 4],
    /// The packet's direction in its connection ([`CT_ORIGINAL`], [`CT_REPLY`]): at tc
    /// ingress as conntrack has it, in the connect and sendmsg programs as `local_udp`
    /// follows it (a TCP connect is always original); found only when a rule asks
    /// ([`MarkRules::ct_direction`]), 0 otherwise.
    pub ct_direction: u32,
}

impl MarkedPacket {
    /// The packet with these values; addresses of 4 or 16 bytes in network order, ports
    /// (destination, source) in host order.
    pub fn new<const N: usize>(
        mark: u32,
        udp: bool,
        ports: (u16, u16),
        dst: &[u8; N],
        src: &[u8; N],
        ifindex: u32,
    ) -> Self {
        let mut packet = MarkedPacket::default();
        packet.set(mark, udp, ports.0, *dst, *src, ifindex);
        packet.sport = u32::from(ports.1);
        packet
    }

    /// Overwrites every field but the source port and the connection's direction in place
    /// (the program's scratch entry holds the last packet's; the program writes those two as
    /// soon as it knows them).
    #[inline(always)]
    pub fn set<const N: usize>(
        &mut self,
        mark: u32,
        udp: bool,
        port: u16,
        dst: [u8; N],
        src: [u8; N],
        ifindex: u32,
    ) {
        self.mark = mark;
        self.udp = udp as u32;
        self.port = port as u32;
        self.ifindex = ifindex;
        self.ipv6 = (N == 16) as u32;
        let mut w = 0;
        while w < 4 {
            let (d, s) = if w * 4 + 3 < N {
                (
                    u32::from_ne_bytes([
                        dst[w * 4],
                        dst[w * 4 + 1],
                        dst[w * 4 + 2],
                        dst[w * 4 + 3],
                    ]),
                    u32::from_ne_bytes([
                        src[w * 4],
                        src[w * 4 + 1],
                        src[w * 4 + 2],
                        src[w * 4 + 3],
                    ]),
                )
            } else {
                (0, 0)
            };
            self.dst[w] = d;
            self.src[w] = s;
            w += 1;
        }
    }
}

/// One generation's mark rules: the first `len` of `rules` are in use.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkRules {
    pub len: u32,
    /// Who asks for the connection's direction ([`MarkRule::ct_direction`]):
    /// [`CT_ASKED_BY_ARRIVALS`] (only then does the tc program look the packet's connection
    /// up) and [`CT_ASKED_BY_LOCAL`] (only then do the local programs follow UDP flows, see
    /// `local_udp`).
    pub ct_direction: u32,
    pub rules: [MarkRule; MAX_MARK_RULES],
    /// For each selection of local connections (by index): the out-interface bits, one of
    /// which the route to a connection's destination must have for the selection's rules to
    /// be asked about it (see [`crate::local_origin::route_selected`]); 0: any route. Here,
    /// per generation, rather than in the selection's entry: the bits are numbered anew by
    /// each rule set (see [`crate::local_origin::route_bits_shift`]).
    pub selection_routes: [u32; crate::local_origin::MAX_SELECTIONS],
}

impl Default for MarkRules {
    fn default() -> Self {
        MarkRules {
            len: 0,
            ct_direction: 0,
            rules: [MarkRule::default(); MAX_MARK_RULES],
            selection_routes: [0; crate::local_origin::MAX_SELECTIONS],
        }
    }
}

/// Stage 2: longest-prefix match on ([`DstKey`] class, destination address) to a [`Verdict`].
pub const RULES_DST_V4: &str = "RULES_DST_V4";
/// Stage 2 for IPv6 destinations.
pub const RULES_DST_V6: &str = "RULES_DST_V6";
/// Stage 3, for cells whose rules look at the source or the interface: longest-prefix match
/// on ([`SrcKey`] cell, interface, source address) to a [`Verdict`].
pub const RULES_SRC_V4: &str = "RULES_SRC_V4";
/// Stage 3 for IPv6 sources.
pub const RULES_SRC_V6: &str = "RULES_SRC_V6";
/// Most entries one rule map may hold (both generations together): bounds kernel memory,
/// about 100 bytes an entry.
pub const MAX_RULE_MAP_ENTRIES: u32 = 4 << 20;

/// Bit in class and cell ids that says which generation they belong to.
pub const GENERATION_BIT: u32 = 1 << 31;

/// Key of the destination stage: the port class, then the address (network byte order). The
/// LPM prefix length is 32 (the whole class) plus the destination prefix length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DstKey<const N: usize> {
    pub class: u32,
    pub addr: [u8; N],
}

impl<const N: usize> DstKey<N> {
    /// LPM prefix length of a key whose address part has `prefix_len` significant bits.
    pub const fn prefix_len(prefix_len: u32) -> u32 {
        32 + prefix_len
    }
}

/// Key of the source stage: the cell from the destination stage, the ingress ifindex (0 when
/// the cell's rules name no interface), then the source address (network byte order). The
/// LPM prefix length is 64 plus the source prefix length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SrcKey<const N: usize> {
    pub cell: u32,
    pub ifindex: u32,
    pub addr: [u8; N],
}

impl<const N: usize> SrcKey<N> {
    /// LPM prefix length of a key whose address part has `prefix_len` significant bits.
    pub const fn prefix_len(prefix_len: u32) -> u32 {
        64 + prefix_len
    }
}

/// What a rule lookup stage says about a packet (see [`crate::decision::rule_match`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// One of the `VERDICT_*` constants.
    pub action: u32,
    /// For [`VERDICT_STEER`]: the listener's index (see [`listener_slot`]).
    pub listener: u32,
    /// For [`VERDICT_BY_SOURCE`] and [`VERDICT_BY_SOURCE_AND_IFACE`]: the [`SrcKey::cell`].
    pub cell: u32,
    /// For [`VERDICT_STEER`], [`VERDICT_BYPASS`], [`VERDICT_DROP`], [`VERDICT_DELIVER`],
    /// [`VERDICT_REJECT`] and [`VERDICT_PASS`]: the deciding rule's place in the precedence (lower wins), to choose between the answers of the rule groups.
    pub rank: u32,
}

/// No rule matches: the packet is passed.
pub const VERDICT_NONE: u32 = 0;
/// A `steer` rule matches: the flow's own socket, else the listener.
pub const VERDICT_STEER: u32 = 1;
/// A `bypass` rule matches: only a socket that already owns the flow gets it.
pub const VERDICT_BYPASS: u32 = 2;
/// The rules of a cell depend on the source address: look it up in stage 3 with ifindex 0.
pub const VERDICT_BY_SOURCE: u32 = 3;
/// As [`VERDICT_BY_SOURCE`], with the ingress interface's index in the key.
pub const VERDICT_BY_SOURCE_AND_IFACE: u32 = 4;
/// A `drop` rule matches: only a socket that already owns the flow gets it; otherwise the
/// packet is dropped.
pub const VERDICT_DROP: u32 = 5;
/// A `deliver` rule matches: the flow's own socket (as for [`VERDICT_BYPASS`]), else the
/// packet is marked for local delivery and the kernel's own socket lookup decides.
pub const VERDICT_DELIVER: u32 = 6;
/// Passes the packet as if no rule matched, and outranks what does: the guard that leaves a
/// connection's reply direction alone where every rule asks for the original one (the
/// loader's `DirectionGuard`).
pub const VERDICT_PASS: u32 = 7;
/// A `reject` rule matches: only a socket that already owns the flow gets it; otherwise the
/// packet is answered as refused (a TCP reset, an ICMP port unreachable) and not passed on.
pub const VERDICT_REJECT: u32 = 8;

/// Most named listeners (each has up to four sockets in [`LISTENERS`]).
pub const MAX_LISTENERS: u32 = 64;

/// The [`LISTENERS`] index of listener `listener`'s socket for a transport and family.
pub const fn listener_slot(listener: u32, slot: ListenerSlot) -> u32 {
    listener * ListenerSlot::COUNT + slot as u32
}

/// SOCKMAP holding tproxy's transparent listeners, indexed by [`listener_slot`].
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
    /// Number of sockets one listener can have.
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

    /// Whether it is a TCP listener's slot.
    pub const fn is_tcp(self) -> bool {
        matches!(self, ListenerSlot::TcpV4 | ListenerSlot::TcpV6)
    }

    /// Whether it is an IPv6 listener's slot.
    pub const fn is_ipv6(self) -> bool {
        matches!(self, ListenerSlot::TcpV6 | ListenerSlot::UdpV6)
    }
}

/// Array of [`ExternalListener`], indexed like [`LISTENERS`]: for a listener tproxy does not
/// own (a proxy such as Squid listening with IP_TRANSPARENT), where the program looks for its
/// socket when the socket map has none, as `-j TPROXY --on-ip --on-port` does (the kernel's
/// `nf_tproxy_get_sock`: a listener lookup in the same network namespace).
pub const EXTERNAL_LISTENERS: &str = "EXTERNAL_LISTENERS";

/// [`ExternalListener::kind`]: not an external listener (tproxy's own, or unused).
pub const EXTERNAL_NONE: u16 = 0;
/// [`ExternalListener::kind`]: the listener at [`ExternalListener::address`] and port.
pub const EXTERNAL_AT_ADDRESS: u16 = 1;
/// [`ExternalListener::kind`]: the listener at the packet's own destination address and
/// [`ExternalListener::port`] (`--on-port` without `--on-ip`; a wildcard listener answers).
pub const EXTERNAL_AT_DESTINATION: u16 = 2;

/// Where an external listener's socket is looked up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExternalListener {
    /// The address in network byte order, as the 32-bit words of a `bpf_sock_tuple` hold it
    /// in memory (IPv4 in the first word, the rest zero).
    pub address: [u32; 4],
    /// The port in network byte order.
    pub port: u16,
    /// One of the `EXTERNAL_*` constants.
    pub kind: u16,
}

impl ExternalListener {
    /// The entry for a listener at `address` (`None`: the packet's destination) and `port`.
    pub fn new(address: Option<[u8; 16]>, port: u16) -> Self {
        let mut words = [0u32; 4];
        if let Some(bytes) = address {
            for (i, word) in words.iter_mut().enumerate() {
                *word = u32::from_ne_bytes([
                    bytes[i * 4],
                    bytes[i * 4 + 1],
                    bytes[i * 4 + 2],
                    bytes[i * 4 + 3],
                ]);
            }
        }
        ExternalListener {
            address: words,
            port: port.to_be(),
            kind: match address {
                Some(_) => EXTERNAL_AT_ADDRESS,
                None => EXTERNAL_AT_DESTINATION,
            },
        }
    }
}

/// Per-CPU array of `u64` packet counts per listener, indexed by [`listener_counter_index`]:
/// how many new flows each listener slot was given, and how many found it absent.
pub const LISTENER_COUNTERS: &str = "LISTENER_COUNTERS";
/// Length of [`LISTENER_COUNTERS`].
pub const LISTENER_COUNTERS_LEN: u32 = LISTENERS_LEN * 2;

/// The [`LISTENER_COUNTERS`] index of a [`LISTENERS`] slot's count of `steered_new`
/// (`no_listener` false) or `no_listener` packets.
pub const fn listener_counter_index(slot: u32, no_listener: bool) -> u32 {
    slot * 2 + no_listener as u32
}

/// LRU hash from a [`FlowKey`] to a [`LISTENERS`] index. The tc program writes an entry when
/// it hands a packet of a steered flow to a TIME_WAIT socket; the `sk_lookup` program answers
/// the kernel's listener lookup for exactly those flows. It sees every listener lookup in the
/// network namespace, and must answer no other: not even one that looks steered, such as the
/// relay's own connection to a local address on a steered port (which would loop).
pub const TIME_WAIT_FLOWS: &str = "TIME_WAIT_FLOWS";
/// Entries in [`TIME_WAIT_FLOWS`]; the oldest are evicted.
pub const TIME_WAIT_FLOWS_LEN: u32 = 16384;

/// A TCP flow as both programs see it: addresses in network byte order (IPv4 in the first
/// four bytes, the rest zero), ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub client: [u8; 16],
    pub destination: [u8; 16],
    pub client_port: u16,
    pub destination_port: u16,
}

/// LRU hash from a [`FragmentKey`] to the [`FragmentDecision`] its datagram's first fragment
/// got, so that later fragments (which carry no ports) get the same treatment. Entries older
/// than the reassembly timeout ([`FRAGMENT_TIMEOUT_V4_GLOBAL`], [`FRAGMENT_TIMEOUT_V6_GLOBAL`])
/// count as absent: the kernel has given up reassembling by then. The loader also deletes them
/// periodically, so nothing is left once a datagram's time is up. Not pinned: fragments in
/// flight across a restart get the fail mode's treatment for orphan fragments.
pub const FRAGMENTS: &str = "FRAGMENTS";
/// Entries in [`FRAGMENTS`]; the oldest are evicted (a flood of never-completed first
/// fragments can only evict, never fill it).
pub const FRAGMENTS_LEN: u32 = 8192;

/// Global (`u64`): how long the kernel keeps an IPv4 datagram's fragments for reassembly, in
/// nanoseconds (`net.ipv4.ipfrag_time` of the program's network namespace, read at load).
pub const FRAGMENT_TIMEOUT_V4_GLOBAL: &str = "FRAGMENT_TIMEOUT_V4_NS";
/// Global (`u64`): the same for IPv6 (`net.ipv6.ip6frag_time`).
pub const FRAGMENT_TIMEOUT_V6_GLOBAL: &str = "FRAGMENT_TIMEOUT_V6_NS";
/// The kernel's default reassembly timeouts, in nanoseconds (IPv4, IPv6).
pub const DEFAULT_FRAGMENT_TIMEOUTS_NS: (u64, u64) = (30_000_000_000, 60_000_000_000);

/// A fragmented datagram: the key under which the kernel reassembles it. Addresses in network
/// byte order (IPv4 in the first four bytes), the identification in host order. `protocol` is
/// the IPv4 protocol, or 0 for IPv6 (whose identification is unique per address pair).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentKey {
    pub source: [u8; 16],
    pub destination: [u8; 16],
    pub id: u32,
    pub protocol: u32,
}

/// What a datagram's first fragment decided, and when (`bpf_ktime_get_ns`, CLOCK_MONOTONIC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentDecision {
    /// The [`crate::Outcome`] index every fragment of the datagram gets
    /// ([`crate::decision::fragment_outcome`]).
    pub outcome: u32,
    /// The [`crate::decision::Protocol`] its transport header named, for counting later
    /// fragments in the same row (an IPv6 fragment header may name another header first).
    pub protocol: u16,
    /// 1 for an IPv6 datagram (see [`Self::is_live`]).
    pub ipv6: u16,
    pub seen_ns: u64,
}

impl FragmentDecision {
    /// Whether the kernel may still be reassembling the datagram at `now_ns`, given the
    /// reassembly timeouts (IPv4, IPv6).
    pub const fn is_live(&self, now_ns: u64, timeouts_ns: (u64, u64)) -> bool {
        is_live(self.seen_ns, self.ipv6 != 0, now_ns, timeouts_ns)
    }
}

const fn is_live(seen_ns: u64, ipv6: bool, now_ns: u64, timeouts_ns: (u64, u64)) -> bool {
    let timeout = if ipv6 { timeouts_ns.1 } else { timeouts_ns.0 };
    now_ns.saturating_sub(seen_ns) <= timeout
}

/// LRU hash from a [`ProtocolFlowKey`] to the [`ReassembledFlow`] whose listener should get
/// the flow's reassembled datagram. The tc program writes an entry when the first fragment of
/// a new flow is steered; the `sk_lookup` program answers the socket lookup of the reassembled
/// datagram with it (the kernel drops a socket assigned to a fragment when it reassembles).
pub const REASSEMBLED_FLOWS: &str = "REASSEMBLED_FLOWS";
/// Entries in [`REASSEMBLED_FLOWS`]; the oldest are evicted.
pub const REASSEMBLED_FLOWS_LEN: u32 = 8192;

/// A [`FlowKey`] with its transport (`IPPROTO_TCP` or `IPPROTO_UDP`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtocolFlowKey {
    pub flow: FlowKey,
    pub protocol: u32,
}

/// The listener for a reassembled datagram, and when its first fragment was steered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReassembledFlow {
    /// The [`LISTENERS`] index.
    pub slot: u32,
    /// 1 for IPv6 (see [`Self::is_live`]).
    pub ipv6: u32,
    pub seen_ns: u64,
}

impl ReassembledFlow {
    /// Whether the datagram may still be reassembled at `now_ns`, given the reassembly
    /// timeouts (IPv4, IPv6).
    pub const fn is_live(&self, now_ns: u64, timeouts_ns: (u64, u64)) -> bool {
        is_live(self.seen_ns, self.ipv6 != 0, now_ns, timeouts_ns)
    }
}

/// Name of the `sk_lookup` program in the object file.
pub const LOOKUP_PROGRAM_NAME: &str = "tproxy_sk_lookup";

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

/// Global (`u32`): non-zero to fail closed — drop what a steer rule takes when there is no
/// listener to give it to, and later fragments whose first fragment was not seen (see
/// [`crate::decision::tc_action`]).
pub const FAIL_CLOSED_GLOBAL: &str = "FAIL_CLOSED";

/// The maps the program shares between processes when tproxy runs with `--pin`: everything
/// but the log ring buffer, which belongs to the process that reads it, and the fragment
/// tracking ([`FRAGMENTS`], [`REASSEMBLED_FLOWS`]), whose entries live seconds. The local
/// origin's maps are among them: the connect programs on pinned cgroup links and the
/// loopback program on `lo` must read the maps the instance writes.
pub const PINNED_MAPS: [&str; 15] = [
    ACTIVE_GENERATION,
    PORT_CLASSES,
    MARK_RULES,
    RULES_DST_V4,
    RULES_DST_V6,
    RULES_SRC_V4,
    RULES_SRC_V6,
    LISTENERS,
    TIME_WAIT_FLOWS,
    COUNTERS,
    crate::local_origin::SELECTIONS_MAP,
    crate::local_origin::DECISIONS_MAP,
    crate::local_origin::ROUTES_V4_MAP,
    crate::local_origin::ROUTES_V6_MAP,
    crate::local_udp::UDP_FLOWS_MAP,
];

/// Hash map `u32 ifindex → u32` (value unused): the interfaces whose packets reach tc
/// ingress without a link-layer header, starting at the IP header (tun, WireGuard, PPP,
/// ipip). The program reads the IP version from `skb->protocol` there instead of an
/// Ethernet header. Written at attach, before the program can see a packet of the interface,
/// and erased at detach; an interface not in it carries Ethernet framing. Not pinned: each
/// instance fills its own for the links it attaches.
pub const IP_INTERFACES: &str = "IP_INTERFACES";
/// Capacity of [`IP_INTERFACES`].
pub const IP_INTERFACES_LEN: u32 = 4096;

/// Name of the tc ingress program in the object file.
pub const PROGRAM_NAME: &str = "tproxy_ingress";

/// The total size of [`LISTENERS`].
pub const LISTENERS_LEN: u32 = MAX_LISTENERS * ListenerSlot::COUNT;

/// The in-kernel TCP relay's socket hash (its own eBPF object, apart from the steering one):
/// each relayed socket under the [`RelayPeerKey`] of the other socket of its connection.
pub const RELAY_PEERS: &str = "RELAY_PEERS";
/// LRU hash, socket cookie → `u8` (1): sockets whose received bytes the relay's program dropped
/// because their peer was not in [`RELAY_PEERS`], which happens while a pair is being inserted
/// (or after the peer closed).
pub const RELAY_DROPS: &str = "RELAY_DROPS";
/// The relay's `sk_skb/stream_verdict` program, attached to [`RELAY_PEERS`].
pub const RELAY_VERDICT_PROGRAM: &str = "tproxy_relay_verdict";
/// A [`RELAY_PEERS`] key: the socket cookie (`SO_COOKIE`) of the socket whose received bytes go
/// to the socket stored under it. The program reads its socket's cookie and redirects there.
pub type RelayPeerKey = u64;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` data without padding (u32 fields, then bytes filling the
    // alignment: N is 4 or 16).
    unsafe impl<const N: usize> aya::Pod for super::DstKey<N> {}
    unsafe impl<const N: usize> aya::Pod for super::SrcKey<N> {}
    unsafe impl aya::Pod for super::Verdict {}
    // SAFETY: `repr(C)` u32 and u16 fields without padding (checked in
    // `keys_have_no_padding`).
    unsafe impl aya::Pod for super::MarkRules {}
    // SAFETY: `repr(C)`, sizes checked for padding in `keys_have_no_padding`.
    unsafe impl aya::Pod for super::FragmentKey {}
    unsafe impl aya::Pod for super::FragmentDecision {}
    unsafe impl aya::Pod for super::ProtocolFlowKey {}
    unsafe impl aya::Pod for super::ReassembledFlow {}
    unsafe impl aya::Pod for super::ExternalListener {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_class_indices_cover_the_array_without_overlap() {
        assert_eq!(port_class_index(0, false, 0), 0);
        assert_eq!(port_class_index(0, true, 0), 65536);
        assert_eq!(port_class_index(1, false, 0), 2 * 65536);
        assert_eq!(port_class_index(1, true, 65535), PORT_CLASSES_LEN - 1);
        assert_eq!(
            port_class_index(3, true, 65535),
            PORT_CLASSES_LEN - 1,
            "generation is 0 or 1"
        );
    }

    #[test]
    fn class_ids_of_the_groups_and_two_generations_never_collide() {
        let mut ids = [
            single_port_class(0, false, 80),
            single_port_class(0, true, 80),
            single_port_class(1, false, 80),
            range_class(0, 80),
            range_class(1, 80),
            any_port_class(0, false),
            any_port_class(0, true),
            any_port_class(1, false),
            other_protocols_class(0),
            other_protocols_class(1),
        ];
        ids.sort_unstable();
        assert!(ids.windows(2).all(|w| w[0] != w[1]), "{ids:x?}");
        assert_eq!(range_class(1, 5) & GENERATION_BIT, GENERATION_BIT);
        assert_eq!(single_port_class(0, true, 65535) & GENERATION_BIT, 0);
    }

    #[test]
    fn keys_have_no_padding() {
        assert_eq!(core::mem::size_of::<DstKey<4>>(), 8);
        assert_eq!(core::mem::size_of::<DstKey<16>>(), 20);
        assert_eq!(core::mem::size_of::<SrcKey<4>>(), 12);
        assert_eq!(core::mem::size_of::<SrcKey<16>>(), 24);
        assert_eq!(core::mem::size_of::<FragmentKey>(), 40);
        assert_eq!(core::mem::size_of::<FragmentDecision>(), 16);
        assert_eq!(core::mem::size_of::<FlowKey>(), 36);
        assert_eq!(core::mem::size_of::<ProtocolFlowKey>(), 40);
        assert_eq!(core::mem::size_of::<ReassembledFlow>(), 16);
        assert_eq!(core::mem::size_of::<ExternalListener>(), 20);
        assert_eq!(core::mem::size_of::<MarkRule>(), 112);
        assert_eq!(core::mem::size_of::<MarkedPacket>(), 60);
        assert_eq!(
            core::mem::size_of::<MarkRules>(),
            8 + 112 * MAX_MARK_RULES + 4 * crate::local_origin::MAX_SELECTIONS
        );
    }

    #[test]
    fn fragment_decisions_expire_with_the_kernels_reassembly() {
        let timeouts = DEFAULT_FRAGMENT_TIMEOUTS_NS;
        let v4 = FragmentDecision {
            outcome: 0,
            protocol: 1,
            ipv6: 0,
            seen_ns: 1_000,
        };
        assert!(v4.is_live(1_000, timeouts));
        assert!(v4.is_live(1_000 + timeouts.0, timeouts));
        assert!(!v4.is_live(1_001 + timeouts.0, timeouts));
        let v6 = FragmentDecision { ipv6: 1, ..v4 };
        assert!(v6.is_live(1_001 + timeouts.0, timeouts));
        assert!(!v6.is_live(1_001 + timeouts.1, timeouts));
        assert!(
            v4.is_live(0, timeouts),
            "a clock read before the entry was written"
        );
        let flow = ReassembledFlow {
            slot: 2,
            ipv6: 0,
            seen_ns: 5,
        };
        assert!(!flow.is_live(6 + timeouts.0, timeouts));
        assert!(
            !flow.is_live(9, (3, 3)),
            "a namespace's own, shorter timeout"
        );
    }

    #[test]
    fn external_addresses_are_kept_in_network_order() {
        let v4 = ExternalListener::new(
            Some([127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            3129,
        );
        assert_eq!(v4.address[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(v4.port.to_ne_bytes(), 3129u16.to_be_bytes());
        assert_eq!(v4.kind, EXTERNAL_AT_ADDRESS);
        let any = ExternalListener::new(None, 3129);
        assert_eq!((any.address, any.kind), ([0; 4], EXTERNAL_AT_DESTINATION));
        assert_ne!(
            listener_counter_index(LISTENERS_LEN - 1, true),
            listener_counter_index(LISTENERS_LEN - 1, false)
        );
        assert_eq!(
            listener_counter_index(LISTENERS_LEN - 1, true),
            LISTENER_COUNTERS_LEN - 1
        );
    }

    #[test]
    fn listeners_do_not_share_slots() {
        let last = listener_slot(MAX_LISTENERS - 1, ListenerSlot::UdpV6);
        assert_eq!(last, LISTENERS_LEN - 1);
        assert_eq!(listener_slot(1, ListenerSlot::TcpV4), ListenerSlot::COUNT);
    }

    #[test]
    fn every_transport_and_family_has_its_own_slot() {
        let slots = [(true, false), (true, true), (false, false), (false, true)]
            .map(|(tcp, ipv6)| ListenerSlot::of(tcp, ipv6) as u32);
        assert_eq!(slots, [0, 1, 2, 3]);
        assert!(slots.iter().all(|slot| *slot < ListenerSlot::COUNT));
        for (tcp, ipv6) in [(true, false), (true, true), (false, false), (false, true)] {
            let slot = ListenerSlot::of(tcp, ipv6);
            assert_eq!((slot.is_tcp(), slot.is_ipv6()), (tcp, ipv6), "{slot:?}");
        }
    }
}
