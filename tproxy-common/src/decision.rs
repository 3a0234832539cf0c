//! The decisions the tc program takes, as pure functions over the values it has read.

use crate::maps::{
    MarkRule, MarkRules, MarkedPacket, Verdict, MARK_RULE_TCP, MARK_RULE_UDP, MAX_MARK_RULES,
    VERDICT_BYPASS, VERDICT_BY_SOURCE, VERDICT_BY_SOURCE_AND_IFACE, VERDICT_DELIVER, VERDICT_DROP,
    VERDICT_PASS, VERDICT_REJECT, VERDICT_STEER,
};

/// What the program did with one packet. The discriminant is the packet's index in the
/// `COUNTERS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No rule matched (or the packet could not be parsed that far): left untouched.
    Passed = 0,
    /// Assigned to tproxy's listener: the start of a new proxied flow.
    SteeredNew = 1,
    /// Assigned to the socket that already owns the flow (established or SYN-RECV).
    SteeredEstablished = 2,
    /// In the steering set, but no listening socket was in the socket map: passed.
    NoListener = 3,
    /// `bpf_sk_assign` refused: the socket is in another network namespace.
    AssignErrorNetns = 4,
    /// `bpf_sk_assign` refused: the socket type cannot be assigned (e.g. reuseport before 6.6).
    AssignErrorSocketType = 5,
    /// `bpf_sk_assign` refused: not supported at this hook.
    AssignErrorNotSupported = 6,
    /// `bpf_sk_assign` refused for any other reason.
    AssignErrorOther = 7,
    /// A `bypass` rule matched (and no socket already owned the flow): left untouched.
    Bypassed = 8,
    /// A steer rule matched a destination no relay may connect to (IPv4-mapped, loopback,
    /// unspecified: never legitimate on the wire, and a way to reach the router's own
    /// loopback services): dropped.
    RefusedDestination = 9,
    /// A steer rule matched a multicast, broadcast or link-local destination, which belongs
    /// to the local network and which the relay could not reach from here: left untouched.
    LocalScope = 10,
    /// A fragment of a steered datagram (the first decided by its ports, later ones by the
    /// first's decision): marked for local delivery, where the kernel reassembles it and the
    /// `sk_lookup` program hands it to the listener.
    FragmentSteered = 11,
    /// A fragment of a datagram the rules leave alone.
    FragmentPassed = 12,
    /// A later fragment whose first fragment was not seen (out of order, expired, or
    /// forged): the fail mode decides.
    FragmentUnknown = 13,
    /// The transport header could not be found: cut short, or behind more IPv6 extension
    /// headers than the program walks. Always dropped (see [`tc_action`]).
    Unparsed = 14,
    /// A `drop` rule matched (and no socket already owned the flow): dropped.
    Dropped = 15,
    /// A `deliver` rule matched (and no socket owned the flow, as for `Bypassed`): marked for local
    /// delivery, where the kernel looks its socket up as for any packet to this host, as the
    /// recipe's MARK does (no socket: dropped, the kernel cannot answer from an address that
    /// is not the host's).
    Delivered = 16,
    /// A `reject` rule matched (and no socket owned the flow, as for `Dropped`): answered as
    /// refused, a TCP segment with a reset and a UDP datagram with an ICMP port unreachable
    /// sent back out of the interface it came in on (see `crate::reject`), and not passed
    /// on. A packet that gets no answer (see `crate::reject`) is dropped.
    Rejected = 17,
}

impl Outcome {
    /// Number of outcomes, the length of one `COUNTERS` row.
    pub const COUNT: u32 = 18;

    /// Every outcome, in counter-index order.
    pub const ALL: [Outcome; Self::COUNT as usize] = [
        Outcome::Passed,
        Outcome::SteeredNew,
        Outcome::SteeredEstablished,
        Outcome::NoListener,
        Outcome::AssignErrorNetns,
        Outcome::AssignErrorSocketType,
        Outcome::AssignErrorNotSupported,
        Outcome::AssignErrorOther,
        Outcome::Bypassed,
        Outcome::RefusedDestination,
        Outcome::LocalScope,
        Outcome::FragmentSteered,
        Outcome::FragmentPassed,
        Outcome::FragmentUnknown,
        Outcome::Unparsed,
        Outcome::Dropped,
        Outcome::Delivered,
        Outcome::Rejected,
    ];

    /// Stable snake_case name, for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::SteeredNew => "steered_new",
            Outcome::SteeredEstablished => "steered_established",
            Outcome::NoListener => "no_listener",
            Outcome::AssignErrorNetns => "assign_error_netns",
            Outcome::AssignErrorSocketType => "assign_error_socket_type",
            Outcome::AssignErrorNotSupported => "assign_error_not_supported",
            Outcome::AssignErrorOther => "assign_error_other",
            Outcome::Bypassed => "bypassed",
            Outcome::RefusedDestination => "refused_destination",
            Outcome::LocalScope => "local_scope",
            Outcome::FragmentSteered => "fragment_steered",
            Outcome::FragmentPassed => "fragment_passed",
            Outcome::FragmentUnknown => "fragment_unknown",
            Outcome::Unparsed => "unparsed",
            Outcome::Dropped => "dropped",
            Outcome::Delivered => "delivered",
            Outcome::Rejected => "rejected",
        }
    }

    /// The outcome with this counter index, if any (for outcomes stored in maps).
    pub const fn from_index(index: u32) -> Option<Outcome> {
        if index < Self::COUNT {
            Some(Self::ALL[index as usize])
        } else {
            None
        }
    }

    /// Whether packets of `protocol` can have this outcome: the `other` row counts what the
    /// rules for other protocols drop or leave alone, and what no rule can look at; never a
    /// steer, a delivery or a socket's.
    pub const fn applies_to(self, protocol: Protocol) -> bool {
        match protocol {
            Protocol::Tcp | Protocol::Udp => true,
            Protocol::Other => matches!(
                self,
                Outcome::Passed
                    | Outcome::FragmentUnknown
                    | Outcome::Unparsed
                    | Outcome::Bypassed
                    | Outcome::Dropped
            ),
        }
    }
}

/// The transport protocol a counted packet had, the row of its counter; and the protocol a
/// rule is for (`proto = "other"`: every IP protocol besides TCP and UDP).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp = 0,
    Udp = 1,
    /// Not TCP or UDP, or not parsed that far (see [`Outcome::applies_to`]).
    Other = 2,
}

impl Protocol {
    /// Number of protocols, the rows of the `COUNTERS` map.
    pub const COUNT: u32 = 3;

    /// Every protocol, in row order.
    pub const ALL: [Protocol; Self::COUNT as usize] =
        [Protocol::Tcp, Protocol::Udp, Protocol::Other];

    /// Lower-case name, for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Other => "other",
        }
    }
}

/// The `COUNTERS` index of `outcome` for a packet of `protocol`.
pub const fn counter_index(protocol: Protocol, outcome: Outcome) -> u32 {
    protocol as u32 * Outcome::COUNT + outcome as u32
}

/// What the rules decided for a flow, once every lookup stage has answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleMatch {
    /// No rule matches.
    None,
    /// A `steer` rule matches: to the listener with this index.
    Steer(u32),
    /// A `bypass` rule matches.
    Bypass,
    /// A `drop` rule matches.
    Drop,
    /// A `deliver` rule matches.
    Deliver,
    /// A `reject` rule matches.
    Reject,
}

/// Whether a destination-stage `verdict` needs the source stage, and with which ifindex in
/// the key.
pub const fn source_stage_ifindex(verdict: &Verdict, ifindex: u32) -> Option<u32> {
    match verdict.action {
        VERDICT_BY_SOURCE => Some(0),
        VERDICT_BY_SOURCE_AND_IFACE => Some(ifindex),
        _ => None,
    }
}

/// Whether a final verdict `candidate` beats `best` so far: only a match counts, and of two
/// matches the lower rank wins.
pub const fn outranks(candidate: &Verdict, best: &Verdict) -> bool {
    is_match(candidate) && (!is_match(best) || candidate.rank < best.rank)
}

const fn is_match(verdict: &Verdict) -> bool {
    matches!(
        verdict.action,
        VERDICT_STEER
            | VERDICT_BYPASS
            | VERDICT_DROP
            | VERDICT_DELIVER
            | VERDICT_REJECT
            | VERDICT_PASS
    )
}

/// The mark stage (see [`crate::maps::MARK_RULES`]): of the first `table.len` rules, those
/// matching `packet` each replace `best` when they outrank it. Updated in place, and a
/// bounded loop reading the packet from memory (the classifier's per-CPU scratch map, the
/// connect programs' socket storage) in each round, so that the program's stack does not grow: the packet's dozen values, hoisted out
/// of the loop, would not fit in registers. The loader's oracle runs the same code.
///
/// `LOCAL`: the packet is a local connection's, looked up under its selection's index
/// (`local_origin::selection_ifindex`), which only that selection's rules have: a rule for
/// any interface (index 0) is a rule for arrivals and never answers for it.
#[inline(always)]
pub fn match_mark_rules<const LOCAL: bool>(
    table: &MarkRules,
    packet: &MarkedPacket,
    best: &mut Verdict,
) {
    let mut i = 0;
    while i < MAX_MARK_RULES {
        if i as u32 >= table.len {
            break;
        }
        if matches_marked::<LOCAL>(&table.rules[i], packet)
            && outranks(&table.rules[i].verdict, best)
        {
            *best = table.rules[i].verdict;
        }
        i += 1;
    }
}

/// Whether `rule` matches `packet`.
#[inline(always)]
fn matches_marked<const LOCAL: bool>(rule: &MarkRule, packet: &MarkedPacket) -> bool {
    // SAFETY: reads of fields of a live reference.
    let read = |field: &u32| unsafe { core::ptr::read_volatile(field) };
    let ipv6 = read(&packet.ipv6);
    let port = read(&packet.port);
    let transport = if read(&packet.udp) != 0 {
        MARK_RULE_UDP
    } else {
        MARK_RULE_TCP
    };
    let ifindex = read(&packet.ifindex);
    if read(&packet.mark) & rule.mask != rule.value
        || rule.transports & transport == 0
        || port < u32::from(rule.first_port)
        || port > u32::from(rule.last_port)
        || rule.ipv6 != ipv6
        || (rule.ifindex != ifindex && (LOCAL || rule.ifindex != 0))
    {
        return false;
    }
    let mut w = 0;
    while w < 4 {
        if w == 1 && ipv6 == 0 {
            break;
        }
        if read(&packet.dst[w]) & rule.dst_mask[w] != rule.dst[w]
            || read(&packet.src[w]) & rule.src_mask[w] != rule.src[w]
        {
            return false;
        }
        w += 1;
    }
    // Last, and read where they are used: one more value held through the checks above
    // would cost the classifier stack it does not have.
    let sport = read(&packet.sport);
    if sport < u32::from(rule.first_sport) || sport > u32::from(rule.last_sport) {
        return false;
    }
    rule.ct_direction == 0 || rule.ct_direction == read(&packet.ct_direction)
}

/// The outcome for a packet of another protocol than TCP and UDP: the rules for other
/// protocols are `drop` and `bypass` rules only, and they decide by addresses and interface
/// alone (no socket owns such a packet's flow, no listener takes it).
pub const fn other_protocol_outcome(rule: RuleMatch) -> Outcome {
    match rule {
        RuleMatch::Drop => Outcome::Dropped,
        RuleMatch::Bypass => Outcome::Bypassed,
        _ => Outcome::Passed,
    }
}

/// The outcome for a packet that a `bypass`, `drop`, `deliver` or `reject` rule matched and whose flow
/// no socket on this host owns. The socket match comes first for both, as the recipe's socket-match
/// rule comes ahead of the chain that drops: a flow steered before a reload added the drop
/// rule keeps its socket.
pub const fn unowned_outcome(rule: RuleMatch) -> Outcome {
    match rule {
        RuleMatch::Drop => Outcome::Dropped,
        RuleMatch::Deliver => Outcome::Delivered,
        RuleMatch::Reject => Outcome::Rejected,
        _ => Outcome::Bypassed,
    }
}

/// The match a final verdict stands for.
pub const fn rule_match(verdict: &Verdict) -> RuleMatch {
    match verdict.action {
        VERDICT_STEER => RuleMatch::Steer(verdict.listener),
        VERDICT_BYPASS => RuleMatch::Bypass,
        VERDICT_DROP => RuleMatch::Drop,
        VERDICT_DELIVER => RuleMatch::Deliver,
        VERDICT_REJECT => RuleMatch::Reject,
        _ => RuleMatch::None,
    }
}

const ENETUNREACH: i64 = 101;
const ESOCKTNOSUPPORT: i64 = 94;
const EOPNOTSUPP: i64 = 95;

/// Classifies the negative errno that `bpf_sk_assign` returned.
pub const fn assign_error(ret: i64) -> Outcome {
    // Compared as negatives: negating `ret` itself would overflow for i64::MIN (found by
    // the `decisions` fuzz target).
    match ret {
        ret if ret == -ENETUNREACH => Outcome::AssignErrorNetns,
        ret if ret == -ESOCKTNOSUPPORT => Outcome::AssignErrorSocketType,
        ret if ret == -EOPNOTSUPP => Outcome::AssignErrorNotSupported,
        _ => Outcome::AssignErrorOther,
    }
}

/// `TCP_LISTEN` from the kernel's `enum tcp_state`.
pub const TCP_LISTEN: u32 = 10;
/// `TCP_TIME_WAIT` from the kernel's `enum tcp_state`.
pub const TCP_TIME_WAIT: u32 = 6;
/// `TCP_ESTABLISHED` from the kernel's `enum tcp_state`: for a UDP socket, a connected one.
pub const TCP_ESTABLISHED: u32 = 1;

/// Whether a socket found by an exact-tuple lookup owns the packet's flow, as the iptables
/// socket match decides it. A listener is not the flow's own socket: a wildcard service (sshd
/// on 0.0.0.0:22) matches every destination. Everything else is assigned as found:
/// established and closing connections, SYN-RECV request sockets, and TIME_WAIT sockets.
///
/// A TIME_WAIT socket is assigned even a new SYN reusing its tuple, because only the kernel
/// can retire it: handed the listener directly, the new request would collide with the
/// TIME_WAIT entry and be dropped. The kernel's TIME_WAIT handling accepts the SYN, retires
/// the old socket and looks up a listener for the destination, which the `sk_lookup` program
/// answers with tproxy's listener (what the TPROXY target does for iptables).
pub const fn socket_owns_flow(tcp_state: u32) -> bool {
    tcp_state != TCP_LISTEN
}

/// Whether a mark is tproxy's own `--socket-mark` (`own_mark`; 0 means unset and matches
/// nothing). Two things carry it: tproxy's per-flow UDP sockets, so a UDP socket found by an
/// exact-tuple lookup is assigned only when it is one of them (a local wildcard service on a
/// steered port must not capture steered flows); and the packets tproxy's sockets send (only
/// seen at ingress on `lo`), which are never steered, so the relay cannot re-enter its own
/// steering.
pub const fn carries_own_mark(mark: u32, own_mark: u32) -> bool {
    own_mark != 0 && mark == own_mark
}

/// Whether a UDP socket found by a flow's exact tuple is tproxy's own socket for that flow:
/// it carries the own mark and is connected (tproxy's per-flow sockets always are). An
/// unconnected one with the mark, bound to a wildcard, would be found for any datagram to its
/// port: another program's (an external proxy marking its sockets with `socket_mark`), as
/// iptables' TPROXY takes only connected sockets for a UDP flow's own.
pub const fn owns_udp_flow(mark: u32, state: u32, own_mark: u32) -> bool {
    carries_own_mark(mark, own_mark) && state == TCP_ESTABLISHED
}

/// The packet mark after setting tproxy's routing mark: only the bits under `mask` change, so
/// marks that other tools keep in the other bits survive.
pub const fn with_routing_mark(current: u32, mark: u32, mask: u32) -> u32 {
    (current & !mask) | (mark & mask)
}

/// Whether a packet arrived with an 802.1Q tag (taken off by the kernel before tc sees the
/// packet) for a VLAN other than 0: it belongs to that VLAN's interface, and is steered there
/// if tproxy is attached there, not on the parent. VLAN 0 only carries a priority.
pub const fn belongs_to_vlan_interface(vlan_present: u32, vlan_tci: u32) -> bool {
    vlan_present != 0 && vlan_tci & 0x0fff != 0
}

/// Where a packet stands in its datagram's fragmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragmentPosition {
    /// Not fragmented (an IPv6 atomic fragment, offset 0 without more fragments, counts as
    /// whole: the kernel processes it as such).
    Whole,
    /// Offset 0 with more to come: carries the transport header and decides for the datagram.
    First,
    /// Offset above 0: no transport header; treated as its first fragment was.
    Later,
}

/// The layout of an IPv4 packet, from its header's first byte (version and IHL) and its
/// flags/fragment-offset field (host byte order): `None` for a header the kernel drops
/// anyway (not version 4, or a header length below the minimum); else the transport header's
/// offset and the fragment position.
pub const fn ipv4_layout(
    version_ihl: u8,
    flags_fragment: u16,
) -> Option<(usize, FragmentPosition)> {
    const MORE_FRAGMENTS: u16 = 0x2000;
    const OFFSET_MASK: u16 = 0x1fff;
    if version_ihl >> 4 != 4 {
        return None;
    }
    let header_words = (version_ihl & 0x0f) as usize;
    if header_words < 5 {
        return None;
    }
    let position = if flags_fragment & OFFSET_MASK != 0 {
        FragmentPosition::Later
    } else if flags_fragment & MORE_FRAGMENTS != 0 {
        FragmentPosition::First
    } else {
        FragmentPosition::Whole
    };
    Some((header_words * 4, position))
}

/// The fragment position of an IPv6 packet from its fragment header's offset-and-flags field
/// (host byte order).
pub const fn ipv6_fragment_position(offset_flags: u16) -> FragmentPosition {
    const MORE_FRAGMENTS: u16 = 0x0001;
    const OFFSET_MASK: u16 = 0xfff8;
    if offset_flags & OFFSET_MASK != 0 {
        FragmentPosition::Later
    } else if offset_flags & MORE_FRAGMENTS != 0 {
        FragmentPosition::First
    } else {
        FragmentPosition::Whole
    }
}

/// IPv6 next-header value of the fragment header.
pub const IPV6_FRAGMENT_HEADER: u8 = 44;
/// Most IPv6 extension headers the program walks before the transport header; a longer chain
/// is [`Outcome::Unparsed`]. Real traffic carries one or two (hop-by-hop for MLD, a fragment
/// header, destination options).
pub const MAX_IPV6_EXTENSION_HEADERS: usize = 8;

/// Whether `next_header` is an IPv6 extension header the program walks past: the kernel's
/// own list (`ipv6_ext_hdr`, what ip6tables' `-p tcp` skips) but for "no next header", which
/// ends the packet. Everything else is an upper-layer protocol.
pub const fn is_ipv6_extension_header(next_header: u8) -> bool {
    matches!(next_header, 0 | 43 | IPV6_FRAGMENT_HEADER | 51 | 60)
}

/// One step of the walk over an IPv6 header chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6Step {
    /// `next_header` is the upper-layer protocol, found at the current offset.
    Transport(u8),
    /// An extension header of `len` bytes, followed by `next_header`.
    Skip { next_header: u8, len: usize },
    /// A fragment header (8 bytes) followed by `next_header`, with its position in the
    /// datagram and the datagram's identification.
    Fragment {
        next_header: u8,
        position: FragmentPosition,
        id: u32,
    },
}

/// What the header `next_header`, whose first eight bytes are `head`, is, and how far the
/// walk goes past it. Every extension header is at least eight bytes long; `head` is only
/// read for extension headers.
pub const fn ipv6_step(next_header: u8, head: [u8; 8]) -> Ipv6Step {
    match next_header {
        IPV6_FRAGMENT_HEADER => Ipv6Step::Fragment {
            next_header: head[0],
            position: ipv6_fragment_position(u16::from_be_bytes([head[2], head[3]])),
            id: u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
        },
        // Authentication header: 4-octet units, minus two.
        51 => Ipv6Step::Skip {
            next_header: head[0],
            len: (head[1] as usize + 2) * 4,
        },
        // Hop-by-hop, routing, destination options: 8-octet units after the first eight.
        0 | 43 | 60 => Ipv6Step::Skip {
            next_header: head[0],
            len: (head[1] as usize + 1) * 8,
        },
        _ => Ipv6Step::Transport(next_header),
    }
}

/// What a fragment gets, from the decision its datagram's first fragment got: the mark when
/// the datagram was steered (the kernel reassembles it locally; fragments are never assigned
/// a socket, as reassembly would orphan it), the same drop-or-pass for the outcomes the fail
/// mode or a refusal decides, and otherwise nothing.
pub const fn fragment_outcome(first: Outcome) -> Outcome {
    match first {
        // A delivered datagram's later fragments are marked too; only a steered new flow's
        // reassembled datagram is handed to the listener (see `REASSEMBLED_FLOWS`).
        Outcome::SteeredNew
        | Outcome::SteeredEstablished
        | Outcome::FragmentSteered
        | Outcome::Delivered => Outcome::FragmentSteered,
        Outcome::NoListener
        | Outcome::RefusedDestination
        | Outcome::Unparsed
        | Outcome::Dropped => first,
        // A fragmented datagram is dropped whole, unanswered: an answer would quote a
        // fragment, and its later fragments would each need one.
        Outcome::Rejected => Outcome::Dropped,
        _ => Outcome::FragmentPassed,
    }
}

/// Whether the relay may connect to a destination, and what the program does with a packet
/// that a steer rule took for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationScope {
    /// A unicast address that can be connected to.
    Relayable,
    /// Multicast, broadcast or IPv6 link-local: the local network's own traffic (DHCP,
    /// mDNS, SSDP, neighbour protocols), left to the kernel. An IPv6 link-local address cannot
    /// even be connected to without the interface it belongs to. IPv4 link-local
    /// (169.254/16) is relayable: cloud metadata services live there.
    LocalScope,
    /// Never a legitimate destination on the wire: loopback, unspecified, and IPv4-mapped or
    /// IPv4-compatible IPv6 addresses, which a dual-stack relay would connect to as IPv4
    /// (`::ffff:127.0.0.1` is the router's own loopback, whatever the rules say about IPv4).
    Refused,
}

/// `ifindex` of the loopback device in every network namespace (the kernel's
/// `LOOPBACK_IFINDEX`).
pub const LOOPBACK_IFINDEX: u32 = 1;

/// The [`DestinationScope`] of an IPv4 destination (network byte order). `local_origin`: the
/// flow is a local process's own (its packet came in on the loopback device; for the relay,
/// its client is a loopback address). For those, the loopback addresses are a legitimate
/// destination (steering `lo` to proxy a local service); from anywhere else they are a way
/// into the host's loopback-only services.
pub const fn ipv4_destination_scope(addr: [u8; 4], local_origin: bool) -> DestinationScope {
    match addr {
        [127, ..] if local_origin => DestinationScope::Relayable,
        [0, ..] | [127, ..] => DestinationScope::Refused,
        [255, 255, 255, 255] => DestinationScope::LocalScope,
        [first, ..] if first & 0xf0 == 224 => DestinationScope::LocalScope,
        _ => DestinationScope::Relayable,
    }
}

/// The [`DestinationScope`] of an IPv6 destination (network byte order); `local_origin` as
/// for [`ipv4_destination_scope`] (`::1` only: a mapped address never travels, even on `lo`).
pub const fn ipv6_destination_scope(addr: [u8; 16], local_origin: bool) -> DestinationScope {
    if addr[0] == 0xff || (addr[0] == 0xfe && addr[1] & 0xc0 == 0x80) {
        return DestinationScope::LocalScope;
    }
    // ::/96 (unspecified, loopback, IPv4-compatible) and ::ffff:0:0/96 (IPv4-mapped).
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return DestinationScope::Relayable;
        }
        i += 1;
    }
    let loopback = addr[10] == 0
        && addr[11] == 0
        && addr[12] == 0
        && addr[13] == 0
        && addr[14] == 0
        && addr[15] == 1;
    match (addr[10], addr[11]) {
        _ if loopback && local_origin => DestinationScope::Relayable,
        (0, 0) | (0xff, 0xff) => DestinationScope::Refused,
        _ => DestinationScope::Relayable,
    }
}

/// The [`DestinationScope`] of an original destination as the relay sees it, for a flow from
/// `client` (a loopback client is a local process: see [`ipv4_destination_scope`]).
pub const fn destination_scope(
    addr: core::net::IpAddr,
    client: core::net::IpAddr,
) -> DestinationScope {
    let local_origin = client.is_loopback();
    match addr {
        core::net::IpAddr::V4(v4) => ipv4_destination_scope(v4.octets(), local_origin),
        core::net::IpAddr::V6(v6) => ipv6_destination_scope(v6.octets(), local_origin),
    }
}

/// What tc does with a packet once the program has its outcome.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcAction {
    /// `TC_ACT_UNSPEC` / `TCX_NEXT`: not ours; the next program at the hook (another tproxy,
    /// anyone's) decides, and with none left the packet goes on. `TC_ACT_OK` would end the
    /// chain and hide the packet from them.
    Next = -1,
    /// `TC_ACT_OK` / `TCX_PASS`: ours, assigned or marked; no later program may redirect it.
    Keep = 0,
    /// `TC_ACT_SHOT` / `TCX_DROP`.
    Drop = 2,
}

/// What tc does with a packet of `outcome`. Refused destinations, unparsed packets and those
/// a `drop` rule took are always dropped; the fail mode (`fail_closed` ≠ 0) drops what a steer rule took that no
/// socket could get (no listener registered, as while no tproxy process runs over pinned
/// state) and later fragments whose first fragment was not seen (out of order, or in flight
/// across a restart: their flow cannot be told without ports, so failing closed drops them
/// whatever their port). Everything else, bypassed or unmatched traffic included, goes on.
pub const fn tc_action(outcome: Outcome, fail_closed: u32) -> TcAction {
    match outcome {
        // A shape the program cannot judge is the attacker's choice, whatever the fail mode:
        // the kernel drops a truncated transport header, RFC 8200 a first fragment without
        // the whole header chain; a chain longer than the walk is legal but rare, and passing
        // it would hide any steered flow behind one more header.
        Outcome::RefusedDestination | Outcome::Unparsed => TcAction::Drop,
        // What the operator's rules say, whatever the fail mode. A rejected packet that was
        // answered is redirected by the program itself; this is for one that could not be.
        Outcome::Dropped | Outcome::Rejected => TcAction::Drop,
        Outcome::NoListener | Outcome::FragmentUnknown if fail_closed != 0 => TcAction::Drop,
        // A marked packet too: the stack's own lookup decides, as for any packet to this host.
        Outcome::SteeredNew
        | Outcome::SteeredEstablished
        | Outcome::FragmentSteered
        | Outcome::Delivered => TcAction::Keep,
        _ => TcAction::Next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{CT_ORIGINAL, CT_REPLY};

    fn mark_rule(value: u32, mask: u32, transports: u32, ports: (u16, u16), rank: u32) -> MarkRule {
        MarkRule {
            value,
            mask,
            transports,
            first_port: ports.0,
            last_port: ports.1,
            first_sport: 0,
            last_sport: u16::MAX,
            verdict: Verdict {
                action: VERDICT_BYPASS,
                rank,
                ..Verdict::default()
            },
            ..MarkRule::default()
        }
    }

    fn table(rules: &[MarkRule]) -> MarkRules {
        let mut table = MarkRules::default();
        table.rules[..rules.len()].copy_from_slice(rules);
        table.len = rules.len() as u32;
        table
    }

    #[test]
    fn a_rule_for_one_direction_of_connections_matches_only_packets_travelling_it() {
        let mut replies = mark_rule(0, 0, MARK_RULE_UDP, (1, 65535), 3);
        replies.ct_direction = CT_REPLY;
        let table = table(&[replies]);
        let decide = |direction: u32| {
            let mut best = Verdict::default();
            let mut packet =
                MarkedPacket::new(0, true, (5353, 53), &[10, 0, 0, 1], &[10, 0, 0, 2], 2);
            packet.ct_direction = direction;
            match_mark_rules::<false>(&table, &packet, &mut best);
            rule_match(&best)
        };
        assert_eq!(decide(CT_REPLY), RuleMatch::Bypass);
        assert_eq!(decide(CT_ORIGINAL), RuleMatch::None);
        // Not looked up: the rule cannot say.
        assert_eq!(decide(0), RuleMatch::None);
    }

    /// The direction guard: a pass outranks the rules it guards and stands for no match.
    #[test]
    fn a_pass_outranks_what_it_guards_and_is_no_match() {
        let mut guard = mark_rule(0, 0, MARK_RULE_TCP | MARK_RULE_UDP, (1, 65535), 0);
        guard.verdict.action = VERDICT_PASS;
        guard.ct_direction = CT_REPLY;
        let steer = Verdict {
            action: VERDICT_STEER,
            rank: 1,
            ..Verdict::default()
        };
        let table = table(&[guard]);
        let decide = |direction: u32| {
            let mut best = steer;
            let mut packet =
                MarkedPacket::new(0, true, (5353, 53), &[10, 0, 0, 1], &[10, 0, 0, 2], 2);
            packet.ct_direction = direction;
            match_mark_rules::<false>(&table, &packet, &mut best);
            // A later stage's match cannot take its place.
            assert!(!outranks(&steer, &best) || best == steer);
            rule_match(&best)
        };
        assert_eq!(decide(CT_REPLY), RuleMatch::None);
        assert_eq!(decide(CT_ORIGINAL), RuleMatch::Steer(0));
    }

    #[test]
    fn a_mark_rule_matches_the_bits_under_its_mask_and_its_other_matches() {
        let mut on_eth = mark_rule(0x10, 0xf0, MARK_RULE_TCP, (1, 65535), 7);
        on_eth.ifindex = 2;
        // From 192.0.2.0/24 only.
        on_eth.src[0] = u32::from_ne_bytes([192, 0, 2, 0]);
        on_eth.src_mask[0] = u32::from_ne_bytes([255, 255, 255, 0]);
        let table = table(&[on_eth]);
        let decide = |mark: u32, udp: bool, port: u16, src: [u8; 4], ifindex: u32| {
            let mut best = Verdict::default();
            let packet = MarkedPacket::new(mark, udp, (port, 40000), &[10, 0, 0, 1], &src, ifindex);
            match_mark_rules::<false>(&table, &packet, &mut best);
            rule_match(&best)
        };
        let inside = [192, 0, 2, 7];
        assert_eq!(decide(0x10, false, 80, inside, 2), RuleMatch::Bypass);
        assert_eq!(
            decide(0x1_0a1f, false, 80, inside, 2),
            RuleMatch::Bypass,
            "other bits"
        );
        assert_eq!(decide(0x20, false, 80, inside, 2), RuleMatch::None);
        assert_eq!(decide(0, false, 80, inside, 2), RuleMatch::None);
        assert_eq!(decide(0x10, true, 80, inside, 2), RuleMatch::None, "UDP");
        assert_eq!(decide(0x10, false, 0, inside, 2), RuleMatch::None, "port 0");
        assert_eq!(
            decide(0x10, false, 80, [192, 0, 3, 7], 2),
            RuleMatch::None,
            "source"
        );
        assert_eq!(
            decide(0x10, false, 80, inside, 3),
            RuleMatch::None,
            "interface"
        );
        assert_eq!(
            decide(0x10, false, 80, inside, 0),
            RuleMatch::None,
            "a local connect"
        );
        let mut v6 = Verdict::default();
        let packet = MarkedPacket::new(0x10, false, (80, 40000), &[0u8; 16], &[0u8; 16], 2);
        match_mark_rules::<false>(&table, &packet, &mut v6);
        assert_eq!(rule_match(&v6), RuleMatch::None, "an IPv4 rule");
    }

    /// A local connection is looked up under its selection's index: only that selection's
    /// rules answer, never one for arrivals on any interface (index 0) or on one.
    #[test]
    fn a_local_connection_meets_only_its_selections_mark_rules() {
        use crate::local_origin::selection_ifindex;
        let any_interface = mark_rule(0x80, 0x80, MARK_RULE_TCP, (1, 65535), 3);
        let mut selection_1 = mark_rule(0x80, 0x80, MARK_RULE_TCP, (1, 65535), 7);
        selection_1.ifindex = selection_ifindex(1);
        let table = table(&[any_interface, selection_1]);
        let decide = |local: bool, mark: u32, ifindex: u32| {
            let mut best = Verdict::default();
            let packet = MarkedPacket::new(mark, false, (80, 0), &[10, 0, 0, 1], &[0; 4], ifindex);
            match local {
                true => match_mark_rules::<true>(&table, &packet, &mut best),
                false => match_mark_rules::<false>(&table, &packet, &mut best),
            }
            best.rank
        };
        assert_eq!(decide(true, 0x80, selection_ifindex(1)), 7);
        assert_eq!(decide(true, 0x7f, selection_ifindex(1)), 0, "another mark");
        assert_eq!(
            decide(true, 0x80, selection_ifindex(0)),
            0,
            "another selection"
        );
        assert_eq!(decide(false, 0x80, 2), 3, "an arrival on any interface");
    }

    #[test]
    fn the_best_ranked_of_mark_rules_and_the_other_stages_wins() {
        let mut steer = mark_rule(0, 0xff, MARK_RULE_TCP | MARK_RULE_UDP, (80, 80), 5);
        steer.verdict.action = VERDICT_STEER;
        steer.verdict.listener = 3;
        // 192.0.2.0/24
        steer.dst[0] = u32::from_ne_bytes([192, 0, 2, 0]);
        steer.dst_mask[0] = u32::from_ne_bytes([255, 255, 255, 0]);
        let table = table(&[mark_rule(0, 0xff, MARK_RULE_TCP, (1, 65535), 9), steer]);
        let lpm = |rank| Verdict {
            action: VERDICT_BYPASS,
            rank,
            ..Verdict::default()
        };
        let decide = |best: Verdict, dst: [u8; 4]| {
            let mut best = best;
            let packet = MarkedPacket::new(0x100, false, (80, 40000), &dst, &[198, 51, 100, 1], 5);
            match_mark_rules::<false>(&table, &packet, &mut best);
            rule_match(&best)
        };
        assert_eq!(
            decide(Verdict::default(), [192, 0, 2, 9]),
            RuleMatch::Steer(3)
        );
        assert_eq!(
            decide(Verdict::default(), [192, 0, 3, 9]),
            RuleMatch::Bypass
        );
        assert_eq!(decide(lpm(6), [192, 0, 2, 9]), RuleMatch::Steer(3));
        assert_eq!(
            decide(lpm(4), [192, 0, 2, 9]),
            RuleMatch::Bypass,
            "the LPM's rule"
        );
        let mut unused = table;
        unused.len = 0;
        let mut best = Verdict::default();
        let packet = MarkedPacket::new(
            0,
            false,
            (80, 40000),
            &[192, 0, 2, 9],
            &[198, 51, 100, 1],
            5,
        );
        match_mark_rules::<false>(&unused, &packet, &mut best);
        assert_eq!(rule_match(&best), RuleMatch::None, "entries past len");
    }

    #[test]
    fn a_source_port_rule_matches_its_range_whatever_the_mark() {
        // `sport = ["7777", "1000-2000"]` without a mark: two entries, mask 0.
        let mut one = mark_rule(0, 0, MARK_RULE_UDP, (1, 65535), 4);
        (one.first_sport, one.last_sport) = (7777, 7777);
        let mut range = one;
        (range.first_sport, range.last_sport) = (1000, 2000);
        let table = table(&[one, range]);
        let decide = |mark: u32, sport: u16| {
            let mut best = Verdict::default();
            let packet =
                MarkedPacket::new(mark, true, (53, sport), &[10, 0, 0, 1], &[10, 0, 0, 2], 2);
            match_mark_rules::<false>(&table, &packet, &mut best);
            rule_match(&best)
        };
        for sport in [7777, 1000, 1500, 2000] {
            assert_eq!(decide(0, sport), RuleMatch::Bypass, "{sport}");
            assert_eq!(decide(0xff, sport), RuleMatch::Bypass, "{sport}, marked");
        }
        for sport in [0, 999, 2001, 7776, 7778, 65535] {
            assert_eq!(decide(0, sport), RuleMatch::None, "{sport}");
        }
    }

    #[test]
    fn a_drop_rule_is_a_match_ranked_like_the_others() {
        let verdict = |action, rank| Verdict {
            action,
            listener: 0,
            cell: 0,
            rank,
        };
        assert_eq!(rule_match(&verdict(VERDICT_DROP, 3)), RuleMatch::Drop);
        assert!(outranks(&verdict(VERDICT_DROP, 3), &Verdict::default()));
        assert!(outranks(
            &verdict(VERDICT_DROP, 3),
            &verdict(VERDICT_STEER, 4)
        ));
        assert!(!outranks(
            &verdict(VERDICT_DROP, 5),
            &verdict(VERDICT_BYPASS, 4)
        ));
        let mut drop = mark_rule(0, 0, MARK_RULE_UDP, (443, 443), 2);
        drop.verdict.action = VERDICT_DROP;
        let table = table(&[drop]);
        let mut best = verdict(VERDICT_STEER, 9);
        let packet = MarkedPacket::new(0, true, (443, 5000), &[10, 0, 0, 1], &[10, 0, 0, 2], 2);
        match_mark_rules::<false>(&table, &packet, &mut best);
        assert_eq!(rule_match(&best), RuleMatch::Drop);
        assert_eq!(unowned_outcome(RuleMatch::Drop), Outcome::Dropped);
        assert_eq!(unowned_outcome(RuleMatch::Bypass), Outcome::Bypassed);
        assert_eq!(fragment_outcome(Outcome::Dropped), Outcome::Dropped);
        assert_eq!(Outcome::Dropped.name(), "dropped");
    }

    #[test]
    fn a_reject_rule_outranks_as_any_rule_and_a_fragmented_datagram_is_dropped() {
        let verdict = |action, rank| Verdict {
            action,
            listener: 0,
            cell: 0,
            rank,
        };
        assert_eq!(rule_match(&verdict(VERDICT_REJECT, 3)), RuleMatch::Reject);
        assert!(outranks(
            &verdict(VERDICT_REJECT, 3),
            &verdict(VERDICT_STEER, 4)
        ));
        assert!(!outranks(
            &verdict(VERDICT_REJECT, 5),
            &verdict(VERDICT_DROP, 4)
        ));
        assert_eq!(unowned_outcome(RuleMatch::Reject), Outcome::Rejected);
        // A fragmented datagram is dropped unanswered, its first fragment too.
        assert_eq!(fragment_outcome(Outcome::Rejected), Outcome::Dropped);
        assert_eq!(tc_action(Outcome::Rejected, 0), TcAction::Drop);
        assert!(!Outcome::Rejected.applies_to(Protocol::Other));
        assert_eq!(other_protocol_outcome(RuleMatch::Reject), Outcome::Passed);
    }

    #[test]
    fn packets_of_other_protocols_are_dropped_or_bypassed_by_their_rules_and_else_passed() {
        assert_eq!(other_protocol_outcome(RuleMatch::Drop), Outcome::Dropped);
        assert_eq!(other_protocol_outcome(RuleMatch::Bypass), Outcome::Bypassed);
        assert_eq!(other_protocol_outcome(RuleMatch::None), Outcome::Passed);
        for counted in [Outcome::Dropped, Outcome::Bypassed, Outcome::Passed] {
            assert!(counted.applies_to(Protocol::Other), "{counted:?}");
        }
        assert!(!Outcome::SteeredNew.applies_to(Protocol::Other));
    }

    #[test]
    fn a_deliver_rule_delivers_what_no_socket_of_ours_owns() {
        let verdict = |action, rank| Verdict {
            action,
            rank,
            ..Verdict::default()
        };
        let mut deliver = verdict(VERDICT_DELIVER, 3);
        assert_eq!(rule_match(&deliver), RuleMatch::Deliver);
        assert!(outranks(&deliver, &Verdict::default()));
        deliver.rank = 5;
        assert!(!outranks(&deliver, &verdict(VERDICT_STEER, 4)));
        assert_eq!(unowned_outcome(RuleMatch::Deliver), Outcome::Delivered);
        assert_eq!(
            fragment_outcome(Outcome::Delivered),
            Outcome::FragmentSteered
        );
        assert_eq!(Outcome::Delivered.name(), "delivered");
        assert!(!Outcome::Delivered.applies_to(Protocol::Other));
    }

    #[test]
    fn what_is_dropped_kept_or_handed_on() {
        for outcome in Outcome::ALL {
            let open = tc_action(outcome, 0);
            let closed = tc_action(outcome, 1);
            let marked = matches!(
                outcome,
                Outcome::SteeredNew
                    | Outcome::SteeredEstablished
                    | Outcome::FragmentSteered
                    | Outcome::Delivered
            );
            let fail_mode = matches!(outcome, Outcome::NoListener | Outcome::FragmentUnknown);
            let expected_open = if matches!(
                outcome,
                Outcome::RefusedDestination
                    | Outcome::Unparsed
                    | Outcome::Dropped
                    | Outcome::Rejected
            ) {
                TcAction::Drop
            } else if marked {
                TcAction::Keep
            } else {
                TcAction::Next
            };
            assert_eq!(open, expected_open, "fail-open, {}", outcome.name());
            let expected_closed = if fail_mode {
                TcAction::Drop
            } else {
                expected_open
            };
            assert_eq!(closed, expected_closed, "fail-closed, {}", outcome.name());
        }
        // The values tc and TCX define.
        assert_eq!(TcAction::Next as i32, -1);
        assert_eq!(TcAction::Keep as i32, 0);
        assert_eq!(TcAction::Drop as i32, 2);
    }

    #[test]
    fn outcomes_round_trip_through_their_index() {
        for outcome in Outcome::ALL {
            assert_eq!(Outcome::from_index(outcome as u32), Some(outcome));
        }
        assert_eq!(Outcome::from_index(Outcome::COUNT), None);
        assert_eq!(Outcome::from_index(u32::MAX), None);
    }

    #[test]
    fn fragments_follow_their_first_fragment() {
        assert_eq!(
            fragment_outcome(Outcome::SteeredNew),
            Outcome::FragmentSteered
        );
        assert_eq!(
            fragment_outcome(Outcome::SteeredEstablished),
            Outcome::FragmentSteered
        );
        assert_eq!(
            fragment_outcome(Outcome::FragmentSteered),
            Outcome::FragmentSteered
        );
        assert_eq!(fragment_outcome(Outcome::NoListener), Outcome::NoListener);
        assert_eq!(
            fragment_outcome(Outcome::RefusedDestination),
            Outcome::RefusedDestination
        );
        assert_eq!(fragment_outcome(Outcome::Unparsed), Outcome::Unparsed);
        for passed in [
            Outcome::Passed,
            Outcome::Bypassed,
            Outcome::LocalScope,
            Outcome::FragmentPassed,
        ] {
            assert_eq!(
                fragment_outcome(passed),
                Outcome::FragmentPassed,
                "{}",
                passed.name()
            );
        }
        // A stored decision is already a fragment outcome: applying it again changes nothing.
        for outcome in Outcome::ALL {
            let once = fragment_outcome(outcome);
            assert_eq!(fragment_outcome(once), once, "{}", outcome.name());
        }
    }

    #[test]
    fn loopback_destinations_only_for_local_processes() {
        use core::net::IpAddr;
        let scope = |dst: &str, client: &str| {
            destination_scope(dst.parse::<IpAddr>().unwrap(), client.parse().unwrap())
        };
        assert_eq!(scope("127.0.0.1", "127.0.0.1"), DestinationScope::Relayable);
        assert_eq!(scope("127.0.0.2", "127.0.0.1"), DestinationScope::Relayable);
        assert_eq!(scope("::1", "::1"), DestinationScope::Relayable);
        assert_eq!(scope("127.0.0.1", "10.0.0.1"), DestinationScope::Refused);
        assert_eq!(scope("::1", "fd00::1"), DestinationScope::Refused);
        for never in ["::ffff:127.0.0.1", "::", "0.0.0.0"] {
            let client = if never.contains(':') {
                "::1"
            } else {
                "127.0.0.1"
            };
            assert_eq!(scope(never, client), DestinationScope::Refused, "{never}");
        }
        assert_eq!(
            ipv4_destination_scope([127, 0, 0, 1], true),
            DestinationScope::Relayable
        );
        let mut v6_loopback = [0u8; 16];
        v6_loopback[15] = 1;
        assert_eq!(
            ipv6_destination_scope(v6_loopback, true),
            DestinationScope::Relayable
        );
        assert_eq!(
            ipv6_destination_scope(v6_loopback, false),
            DestinationScope::Refused
        );
    }

    #[test]
    fn special_destinations() {
        use core::net::IpAddr;
        let remote: IpAddr = "192.0.2.1".parse().unwrap();
        let scope = |text: &str| destination_scope(text.parse::<IpAddr>().unwrap(), remote);
        for refused in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.77.2.1",
            "::10.1.2.3",
        ] {
            assert_eq!(scope(refused), DestinationScope::Refused, "{refused}");
        }
        for local in [
            "224.0.0.251",
            "239.255.255.250",
            "255.255.255.255",
            "ff02::fb",
            "ff05::1:3",
            "fe80::1",
            "febf::1",
        ] {
            assert_eq!(scope(local), DestinationScope::LocalScope, "{local}");
        }
        for relayable in [
            "10.77.2.1",
            "192.168.1.1",
            "169.254.169.254",
            "1.1.1.1",
            "223.255.255.255",
            "240.0.0.1",
            "fd77:2::1",
            "2001:db8::1",
            "64:ff9b::a4d:201",
            "fec0::1",
            "::1:0:0:1",
            "::fffe:1.2.3.4",
            "1::",
        ] {
            assert_eq!(scope(relayable), DestinationScope::Relayable, "{relayable}");
        }
    }

    #[test]
    fn counter_indices_match_table_order() {
        for (index, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, index, "{}", outcome.name());
        }
    }

    #[test]
    fn counter_rows_do_not_overlap() {
        let mut seen = [false; (Protocol::COUNT * Outcome::COUNT) as usize];
        for protocol in Protocol::ALL {
            assert_eq!(Protocol::ALL[protocol as usize], protocol);
            for outcome in Outcome::ALL {
                let index = counter_index(protocol, outcome) as usize;
                assert!(!seen[index], "{} {}", protocol.name(), outcome.name());
                seen[index] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn a_listener_never_owns_the_flow() {
        assert!(!socket_owns_flow(TCP_LISTEN));
    }

    #[test]
    fn connected_closing_request_and_time_wait_sockets_own_the_flow() {
        const ESTABLISHED: u32 = 1;
        const SYN_RECV: u32 = 3;
        const FIN_WAIT1: u32 = 4;
        const CLOSE_WAIT: u32 = 8;
        const NEW_SYN_RECV: u32 = 12;
        for state in [
            ESTABLISHED,
            SYN_RECV,
            FIN_WAIT1,
            TCP_TIME_WAIT,
            CLOSE_WAIT,
            NEW_SYN_RECV,
        ] {
            assert!(socket_owns_flow(state), "state {state}");
        }
    }

    #[test]
    fn only_our_own_mark_is_ours() {
        assert!(carries_own_mark(0x200_0000, 0x200_0000));
        assert!(
            !carries_own_mark(0, 0x200_0000),
            "an unmarked local service"
        );
        assert!(
            !carries_own_mark(0x300_0000, 0x200_0000),
            "someone else's mark"
        );
        assert!(!carries_own_mark(0, 0), "an unset own mark matches nothing");
        assert!(owns_udp_flow(0x200_0000, TCP_ESTABLISHED, 0x200_0000));
        assert!(
            !owns_udp_flow(0x200_0000, 7, 0x200_0000),
            "an unconnected socket (TCP_CLOSE) is no flow's own"
        );
        assert!(!owns_udp_flow(0, TCP_ESTABLISHED, 0x200_0000));
    }

    #[test]
    fn routing_mark_only_touches_masked_bits() {
        assert_eq!(with_routing_mark(0, 0x100_0000, 0x100_0000), 0x100_0000);
        assert_eq!(
            with_routing_mark(0xffff, 0x100_0000, 0x100_0000),
            0x100_ffff
        );
        assert_eq!(
            with_routing_mark(0x0f00_00ff, 0x0100_0000, 0x0f00_0000),
            0x0100_00ff
        );
        // Mark bits outside the mask are never written.
        assert_eq!(with_routing_mark(0, 0xffff_ffff, 0x10), 0x10);
    }

    #[test]
    fn only_tagged_packets_of_a_real_vlan_belong_to_another_interface() {
        assert!(!belongs_to_vlan_interface(0, 0));
        assert!(
            !belongs_to_vlan_interface(1, 0x6000),
            "VLAN 0 with a priority"
        );
        assert!(belongs_to_vlan_interface(1, 5));
        assert!(
            belongs_to_vlan_interface(1, 0xe005),
            "VLAN 5 with a priority"
        );
        assert!(!belongs_to_vlan_interface(0, 5), "no tag present");
    }

    #[test]
    fn ipv4_plain_header_and_options() {
        assert_eq!(ipv4_layout(0x45, 0), Some((20, FragmentPosition::Whole)));
        assert_eq!(ipv4_layout(0x4f, 0), Some((60, FragmentPosition::Whole)));
        // Don't-fragment alone is not a fragment.
        assert_eq!(
            ipv4_layout(0x46, 0x4000),
            Some((24, FragmentPosition::Whole))
        );
    }

    #[test]
    fn ipv4_fragments_bad_lengths_and_versions() {
        assert_eq!(
            ipv4_layout(0x45, 0x2000),
            Some((20, FragmentPosition::First))
        );
        assert_eq!(
            ipv4_layout(0x45, 0x0001),
            Some((20, FragmentPosition::Later))
        );
        assert_eq!(
            ipv4_layout(0x45, 0x2001),
            Some((20, FragmentPosition::Later))
        );
        assert_eq!(ipv4_layout(0x44, 0), None, "IHL below 5");
        assert_eq!(ipv4_layout(0x65, 0), None, "version 6");
    }

    #[test]
    fn ipv6_fragment_positions() {
        assert_eq!(
            ipv6_fragment_position(0),
            FragmentPosition::Whole,
            "atomic fragment"
        );
        assert_eq!(ipv6_fragment_position(1), FragmentPosition::First);
        assert_eq!(ipv6_fragment_position(8), FragmentPosition::Later);
        assert_eq!(ipv6_fragment_position(8 | 1), FragmentPosition::Later);
        assert_eq!(
            ipv6_fragment_position(6),
            FragmentPosition::Whole,
            "reserved bits"
        );
    }

    #[test]
    fn ipv6_header_steps() {
        let head = |next: u8, len: u8| [next, len, 0, 0, 0, 0, 0, 0];
        let skip = |next_header, len| Ipv6Step::Skip { next_header, len };
        assert_eq!(ipv6_step(0, head(17, 0)), skip(17, 8), "hop-by-hop");
        assert_eq!(ipv6_step(43, head(6, 2)), skip(6, 24), "routing");
        assert_eq!(
            ipv6_step(60, head(60, 255)),
            skip(60, 2048),
            "destination options"
        );
        assert_eq!(
            ipv6_step(51, head(6, 4)),
            skip(6, 24),
            "AH: 4-octet units minus two"
        );
        assert_eq!(
            ipv6_step(51, head(6, 0)),
            skip(6, 8),
            "AH: never shorter than 8"
        );
        assert_eq!(
            ipv6_step(44, [17, 99, 0x00, 0x09, 0xde, 0xad, 0xbe, 0xef]),
            Ipv6Step::Fragment {
                next_header: 17,
                position: FragmentPosition::Later,
                id: 0xdead_beef
            },
            "fragment: fixed size, its own length byte is reserved"
        );
        for upper in [6u8, 17, 58, 50, 59, 135, 139, 140] {
            assert_eq!(
                ipv6_step(upper, head(0, 0)),
                Ipv6Step::Transport(upper),
                "{upper}"
            );
            assert!(!is_ipv6_extension_header(upper), "{upper}");
        }
        for extension in [0u8, 43, 44, 51, 60] {
            assert!(is_ipv6_extension_header(extension), "{extension}");
            assert!(!matches!(
                ipv6_step(extension, head(6, 0)),
                Ipv6Step::Transport(_)
            ));
        }
    }

    #[test]
    fn rule_stages_end_in_a_match_or_ask_for_the_source() {
        let verdict = |action, rank| Verdict {
            action,
            listener: 3,
            cell: 7,
            rank,
        };
        assert_eq!(
            source_stage_ifindex(&verdict(VERDICT_BY_SOURCE, 0), 9),
            Some(0)
        );
        assert_eq!(
            source_stage_ifindex(&verdict(VERDICT_BY_SOURCE_AND_IFACE, 0), 9),
            Some(9)
        );
        assert_eq!(source_stage_ifindex(&verdict(VERDICT_STEER, 0), 9), None);
        assert_eq!(rule_match(&verdict(VERDICT_STEER, 0)), RuleMatch::Steer(3));
        assert_eq!(rule_match(&verdict(VERDICT_BYPASS, 0)), RuleMatch::Bypass);
        assert_eq!(rule_match(&verdict(0, 0)), RuleMatch::None);
        assert_eq!(
            rule_match(&verdict(77, 0)),
            RuleMatch::None,
            "unknown action"
        );
    }

    #[test]
    fn the_lower_rank_wins_and_no_match_never_does() {
        let verdict = |action, rank| Verdict {
            action,
            listener: 0,
            cell: 0,
            rank,
        };
        let none = Verdict::default();
        assert!(outranks(&verdict(VERDICT_BYPASS, 9), &none));
        assert!(!outranks(&none, &verdict(VERDICT_BYPASS, 9)));
        assert!(outranks(
            &verdict(VERDICT_STEER, 3),
            &verdict(VERDICT_BYPASS, 4)
        ));
        assert!(!outranks(
            &verdict(VERDICT_STEER, 4),
            &verdict(VERDICT_BYPASS, 4)
        ));
        assert!(
            !outranks(&verdict(VERDICT_BY_SOURCE, 0), &none),
            "not final"
        );
    }

    #[test]
    fn assign_errors_by_reason() {
        assert_eq!(assign_error(-101), Outcome::AssignErrorNetns);
        assert_eq!(assign_error(-94), Outcome::AssignErrorSocketType);
        assert_eq!(assign_error(-95), Outcome::AssignErrorNotSupported);
        assert_eq!(assign_error(-22), Outcome::AssignErrorOther);
        assert_eq!(assign_error(i64::MIN), Outcome::AssignErrorOther);
    }
}
