//! tc ingress program: the socket match and the TPROXY target of the classic iptables recipe,
//! in one pass over the packet.
//!
//! packet → parse (Ethernet, one 802.1Q tag — or nothing on an interface without a link-layer
//!          header, see `IP_INTERFACES`; IPv4 with options / IPv6 with its extension
//!          headers, TCP/UDP ports)
//!        → a later fragment (no ports) gets what its datagram's first fragment got
//!        → rules (port array, then per rule group a destination and maybe a source LPM
//!          trie; the best-ranked answer wins)
//!        → a steer rule's destination must be one a relay may reach (not loopback, mapped…)
//!        → for a steer, bypass or drop rule: the flow's own socket, if it has one
//!          (exact-tuple lookup; for UDP only tproxy's own per-flow sockets count)
//!        → otherwise, for a steer rule: the rule's listener from the socket map; for a drop
//!          rule: dropped
//!        → `bpf_sk_assign` + routing mark, so policy routing delivers it locally; a first
//!          fragment only gets the mark, and its flow is left for the `sk_lookup` program,
//!          which hands the reassembled datagram to the listener.
//!
//! What tc does next is `tproxy_common::decision::tc_action`: a packet that is not ours goes
//! to the next program at the hook (`TCX_NEXT`), as if this one were not there; an assigned
//! or marked one ends the chain, so no later filter redirects it; and a few are dropped.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod conntrack;
mod local_datagram;
mod local_origin;
mod local_udp;
mod loopback;
mod reject;

use core::{ffi::c_void, mem, ptr};

use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as TupleV4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as TupleV6, BPF_F_CURRENT_NETNS,
        BPF_F_NO_PREALLOC,
    },
    helpers::{
        bpf_ktime_get_ns,
        generated::{
            bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_lookup_udp, bpf_sk_release,
            bpf_skc_lookup_tcp,
        },
    },
    macros::{classifier, map, sk_lookup},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockMap},
    programs::{SkLookupContext, TcContext},
    EbpfContext, Global,
};
use aya_log_ebpf::debug;
use tproxy_common::{
    decision::{
        self, counter_index, fragment_outcome, match_mark_rules, outranks, rule_match,
        source_stage_ifindex, DestinationScope, FragmentPosition, Ipv6Step, Outcome, Protocol,
        RuleMatch, LOOPBACK_IFINDEX, MAX_IPV6_EXTENSION_HEADERS,
    },
    maps::{
        listener_counter_index, listener_slot, other_protocols_class, port_class_index,
        rule_group_class, DstKey,
        ExternalListener, FlowKey, FragmentDecision, FragmentKey, ListenerSlot, MarkRules,
        MarkedPacket, ProtocolFlowKey, ReassembledFlow, SrcKey, Verdict, COUNTERS_LEN,
        CT_ASKED_BY_ARRIVALS, DEFAULT_FRAGMENT_TIMEOUTS_NS, EXTERNAL_AT_ADDRESS, EXTERNAL_NONE,
        FRAGMENTS_LEN, IP_INTERFACES_LEN, LISTENERS_LEN, LISTENER_COUNTERS_LEN, PORT_CLASSES_LEN,
        REASSEMBLED_FLOWS_LEN, RULE_GROUPS, TIME_WAIT_FLOWS_LEN,
    },
};

#[map]
static ACTIVE_GENERATION: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static PORT_CLASSES: Array<u32> = Array::with_max_entries(PORT_CLASSES_LEN, 0);
/// Indexed by generation.
#[map]
pub(crate) static MARK_RULES: Array<MarkRules> = Array::with_max_entries(2, 0);
#[map]
static MARK_PACKET: PerCpuArray<MarkedPacket> = PerCpuArray::with_max_entries(1, 0);
// The loader sizes the rule maps for the rule set it loads.
#[map]
static RULES_DST_V4: LpmTrie<DstKey<4>, Verdict> = LpmTrie::with_max_entries(1, BPF_F_NO_PREALLOC);
#[map]
static RULES_DST_V6: LpmTrie<DstKey<16>, Verdict> = LpmTrie::with_max_entries(1, BPF_F_NO_PREALLOC);
#[map]
static RULES_SRC_V4: LpmTrie<SrcKey<4>, Verdict> = LpmTrie::with_max_entries(1, BPF_F_NO_PREALLOC);
#[map]
static RULES_SRC_V6: LpmTrie<SrcKey<16>, Verdict> = LpmTrie::with_max_entries(1, BPF_F_NO_PREALLOC);
#[map]
static LISTENERS: SockMap = SockMap::with_max_entries(LISTENERS_LEN, 0);
#[map]
static EXTERNAL_LISTENERS: Array<ExternalListener> = Array::with_max_entries(LISTENERS_LEN, 0);
#[map]
static LISTENER_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(LISTENER_COUNTERS_LEN, 0);
#[map]
static TIME_WAIT_FLOWS: LruHashMap<FlowKey, u32> =
    LruHashMap::with_max_entries(TIME_WAIT_FLOWS_LEN, 0);
#[map]
static FRAGMENTS: LruHashMap<FragmentKey, FragmentDecision> =
    LruHashMap::with_max_entries(FRAGMENTS_LEN, 0);
#[map]
static REASSEMBLED_FLOWS: LruHashMap<ProtocolFlowKey, ReassembledFlow> =
    LruHashMap::with_max_entries(REASSEMBLED_FLOWS_LEN, 0);
#[map]
static IP_INTERFACES: HashMap<u32, u32> = HashMap::with_max_entries(IP_INTERFACES_LEN, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// Set by the loader before load (`tproxy_common::maps::MARK_GLOBAL`).
#[unsafe(no_mangle)]
static ROUTING_MARK: Global<u32> = Global::new(0);
/// Set by the loader before load (`tproxy_common::maps::MARK_MASK_GLOBAL`).
#[unsafe(no_mangle)]
static ROUTING_MARK_MASK: Global<u32> = Global::new(0);
/// Set by the loader before load (`tproxy_common::maps::FAIL_CLOSED_GLOBAL`).
#[unsafe(no_mangle)]
static FAIL_CLOSED: Global<u32> = Global::new(0);
/// Set by the loader before load (`tproxy_common::maps::OWN_SOCKET_MARK_GLOBAL`).
#[unsafe(no_mangle)]
static OWN_SOCKET_MARK: Global<u32> = Global::new(0);
/// Set by the loader before load (`tproxy_common::maps::FRAGMENT_TIMEOUT_V4_GLOBAL`).
#[unsafe(no_mangle)]
static FRAGMENT_TIMEOUT_V4_NS: Global<u64> = Global::new(DEFAULT_FRAGMENT_TIMEOUTS_NS.0);
/// Set by the loader before load (`tproxy_common::maps::FRAGMENT_TIMEOUT_V6_GLOBAL`).
#[unsafe(no_mangle)]
static FRAGMENT_TIMEOUT_V6_NS: Global<u64> = Global::new(DEFAULT_FRAGMENT_TIMEOUTS_NS.1);

pub(crate) const ETH_HEADER_LEN: usize = 14;
const VLAN_HEADER_LEN: usize = 4;
pub(crate) const ETH_P_IPV4: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
pub(crate) const IPV6_HEADER_LEN: usize = 40;
pub(crate) const IPPROTO_TCP: u8 = 6;
pub(crate) const IPPROTO_UDP: u8 = 17;

#[classifier]
pub fn tproxy_ingress(ctx: TcContext) -> i32 {
    let (protocol, outcome) = steer::<false>(&ctx);
    if outcome == Outcome::Rejected {
        count(protocol, outcome);
        return reject::answer(&ctx);
    }
    finish(protocol, outcome)
}

/// Counts the outcome, and tells tc what to do with the packet.
#[inline(always)]
fn finish(protocol: Protocol, outcome: Outcome) -> i32 {
    count(protocol, outcome);
    decision::tc_action(outcome, FAIL_CLOSED.load()) as i32
}

#[inline(always)]
fn count(protocol: Protocol, outcome: Outcome) {
    if let Some(counter) = COUNTERS.get_ptr_mut(counter_index(protocol, outcome)) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *counter += 1 };
    }
}

/// Runs for every listener (TCP) and unconnected-socket (UDP) lookup the kernel makes in
/// this network namespace, and answers only the lookups the tc program left for it:
/// - a reassembled datagram whose first fragment was steered as a new flow (the kernel drops
///   a socket assigned to a fragment when it reassembles, so the datagram arrives with none);
/// - a SYN that the tc program handed to the TIME_WAIT socket of an old connection with the
///   same tuple: the kernel retires that socket and then looks for a listener for the SYN's
///   (non-local) destination.
/// For both, the answer is tproxy's listener. Any other lookup of a steered flow would have
/// been answered already, by the tc program's assign; and it must answer no other lookup: not
/// even one that looks steered, such as the relay's own connection to a local address on a
/// steered port (which would loop).
#[sk_lookup]
pub fn tproxy_sk_lookup(ctx: SkLookupContext) -> u32 {
    const SK_PASS: u32 = 1;
    const AF_INET: u32 = 2;
    // SAFETY: the kernel hands the program a valid `bpf_sk_lookup` for its whole run.
    let lookup = unsafe { &*ctx.lookup };
    let protocol = lookup.protocol;
    if protocol != IPPROTO_TCP as u32 && protocol != IPPROTO_UDP as u32 {
        return SK_PASS;
    }
    // Map keys must be on the stack, not in the context.
    // SAFETY: plain loads of context fields the verifier allows for this program type.
    let mut flow = FlowKey {
        client_port: u16::from_be(unsafe { ptr::read_volatile(&lookup.remote_port) }),
        destination_port: unsafe { ptr::read_volatile(&lookup.local_port) } as u16,
        ..FlowKey::default()
    };
    let ipv6 = lookup.family != AF_INET;
    if ipv6 {
        for i in 0..4 {
            flow.client[i * 4..i * 4 + 4].copy_from_slice(&lookup.remote_ip6[i].to_ne_bytes());
            flow.destination[i * 4..i * 4 + 4].copy_from_slice(&lookup.local_ip6[i].to_ne_bytes());
        }
    } else {
        flow.client[..4].copy_from_slice(&lookup.remote_ip4.to_ne_bytes());
        flow.destination[..4].copy_from_slice(&lookup.local_ip4.to_ne_bytes());
    }
    let reassembled = ProtocolFlowKey { flow, protocol };
    // SAFETY: the value is copied out at once; the map holds plain data.
    if let Some(entry) = unsafe { REASSEMBLED_FLOWS.get(&reassembled) } {
        let entry = *entry;
        let live = entry.is_live(now_ns(), fragment_timeouts());
        // A TCP flow is reassembled once (its SYN); a UDP flow's next fragmented datagrams
        // use the entry again until it expires.
        if protocol == IPPROTO_TCP as u32 || !live {
            let _ = REASSEMBLED_FLOWS.remove(&reassembled);
        }
        if live {
            // Failing that, the kernel's own lookup goes on and answers as it would have.
            let _ = LISTENERS.redirect_sk_lookup(&ctx, entry.slot, 0);
            return SK_PASS;
        }
    }
    if protocol != IPPROTO_TCP as u32 {
        return SK_PASS;
    }
    // SAFETY: as above.
    let Some(&slot) = (unsafe { TIME_WAIT_FLOWS.get(&flow) }) else {
        return SK_PASS;
    };
    let _ = TIME_WAIT_FLOWS.remove(&flow);
    let _ = LISTENERS.redirect_sk_lookup(&ctx, slot, 0);
    SK_PASS
}

/// The namespace's reassembly timeouts (IPv4, IPv6), as the loader read them.
#[inline(always)]
fn fragment_timeouts() -> (u64, u64) {
    (FRAGMENT_TIMEOUT_V4_NS.load(), FRAGMENT_TIMEOUT_V6_NS.load())
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Returns a bounds-checked pointer to a `T` at `offset` bytes into the packet.
#[inline(always)]
fn header<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data() + offset;
    if start + mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(start as *const T)
}

/// Parses the packet and steers it. `LOOPBACK`: a packet on `lo` from a local process (the
/// `loopback` program), whose listener its socket's record names instead of the rules.
fn steer<const LOOPBACK: bool>(ctx: &TcContext) -> (Protocol, Outcome) {
    const NOT_STEERED: (Protocol, Outcome) = (Protocol::Other, Outcome::Passed);
    let skb = unsafe { &*ctx.skb.skb };
    if decision::belongs_to_vlan_interface(skb.vlan_present, skb.vlan_tci)
        || decision::carries_own_mark(skb.mark, OWN_SOCKET_MARK.load())
    {
        return NOT_STEERED;
    }
    let unmarked_on_loopback = LOOPBACK
        && !tproxy_common::local_origin::marked_by_connect(
            skb.mark,
            ROUTING_MARK.load(),
            ROUTING_MARK_MASK.load(),
        );
    let Some((ethertype, l3)) = link_layer(ctx) else {
        return NOT_STEERED;
    };
    if unmarked_on_loopback && !steered_datagram(ctx, ethertype, l3) {
        return NOT_STEERED;
    }
    match ethertype {
        ETH_P_IPV4 => steer_ipv4::<LOOPBACK>(ctx, l3),
        ETH_P_IPV6 => steer_ipv6::<LOOPBACK>(ctx, l3),
        _ => NOT_STEERED,
    }
}

/// The packet's ethertype and where its IP header starts: Ethernet with one 802.1Q tag at
/// most, or nothing on an interface without a link-layer header.
#[inline(always)]
pub(crate) fn link_layer(ctx: &TcContext) -> Option<(u16, usize)> {
    let skb = unsafe { &*ctx.skb.skb };
    // A copy: the map helper takes the key from the stack, not the context.
    let ifindex = skb.ifindex;
    // SAFETY: only the presence of the entry is read.
    if unsafe { IP_INTERFACES.get(&ifindex) }.is_some() {
        // No link-layer header: the packet starts at the IP header, and the device said
        // which IP version it carries. `protocol` holds the big-endian ethertype.
        return Some((u16::from_be(skb.protocol as u16), 0));
    }
    let ethertype = header::<[u8; 2]>(ctx, 12)?;
    let ethertype = u16::from_be_bytes(unsafe { *ethertype });
    if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
        return Some((ethertype, ETH_HEADER_LEN));
    }
    let inner = header::<[u8; 2]>(ctx, ETH_HEADER_LEN + 2)?;
    Some((
        u16::from_be_bytes(unsafe { *inner }),
        ETH_HEADER_LEN + VLAN_HEADER_LEN,
    ))
}

/// Whether an unmarked packet on `lo` is a datagram the `sendmsg` programs steered (read in
/// place: no copy on the stack).
#[inline(always)]
fn steered_datagram(ctx: &TcContext, ethertype: u16, l3: usize) -> bool {
    use tproxy_common::local_origin::{steered_datagram_v4, steered_datagram_v6};
    // SAFETY: `header` checked that the bytes are inside the packet.
    match ethertype {
        ETH_P_IPV4 => {
            header::<[u8; 20]>(ctx, l3).is_some_and(|ip| steered_datagram_v4(unsafe { &*ip }))
        }
        ETH_P_IPV6 => {
            header::<[u8; 40]>(ctx, l3).is_some_and(|ip| steered_datagram_v6(unsafe { &*ip }))
        }
        _ => false,
    }
}

#[inline(always)]
fn protocol_of(ip_protocol: u8) -> Protocol {
    match ip_protocol {
        IPPROTO_TCP => Protocol::Tcp,
        IPPROTO_UDP => Protocol::Udp,
        _ => Protocol::Other,
    }
}

/// Writes the packet's source port (host order) where the rules tried one by one read it,
/// ahead of [`match_rules`] (in the per-CPU scratch, not as one more argument: the
/// classifier's stack has no room for it).
#[inline(always)]
fn note_source_port(sport: u16) {
    if let Some(packet) = MARK_PACKET.get_ptr_mut(0) {
        // SAFETY: this CPU's entry, which nothing else touches while the program runs.
        unsafe { (*packet).sport = u32::from(sport) };
    }
}

/// Writes the packet's direction in its tracked connection where the rules tried one by one
/// read it, when a rule of `generation` (the one [`match_rules`] asks) needs it; 0
/// otherwise. Addresses and ports in network order.
#[inline(always)]
fn note_ct_direction<const N: usize>(
    ctx: &TcContext,
    generation: u32,
    udp: bool,
    saddr: [u8; N],
    daddr: [u8; N],
    sport: u16,
    dport: u16,
) {
    let asks = MARK_RULES
        .get(generation)
        .is_some_and(|marks| marks.ct_direction & CT_ASKED_BY_ARRIVALS != 0);
    let direction = match asks {
        true => conntrack::direction(ctx, udp, saddr, daddr, sport, dport),
        false => 0,
    };
    if let Some(packet) = MARK_PACKET.get_ptr_mut(0) {
        // SAFETY: this CPU's entry, which nothing else touches while the program runs.
        unsafe { (*packet).ct_direction = direction };
    }
}

/// The rules' decision for a flow: the rules tried one by one (those with a mark or a source
/// port, the source port as [`note_source_port`] left it), then at most seven bounded
/// lookups, whatever the number of rules (see the loader's `rules` module for how the maps
/// are built). `mark`: the packet's mark. `ifindex`: the ingress interface's.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn match_rules<const N: usize>(
    generation: u32,
    by_dst: &LpmTrie<DstKey<N>, Verdict>,
    by_src: &LpmTrie<SrcKey<N>, Verdict>,
    udp: bool,
    dport: u16,
    daddr: [u8; N],
    saddr: [u8; N],
    ifindex: u32,
    mark: u32,
) -> RuleMatch {
    let mut best = Verdict::default();
    match_rules_into::<N, true>(
        generation, by_dst, by_src, udp, dport, daddr, saddr, ifindex, mark, &mut best,
    );
    rule_match(&best)
}

/// The rule-set generation in force. Read once per decision: every lookup of one decision
/// uses the same generation.
#[inline(always)]
pub(crate) fn active_generation() -> u32 {
    ACTIVE_GENERATION.get(0).copied().unwrap_or(0)
}

/// As [`match_rules`], for the rules of `generation`, keeping the answer in `best` if it
/// outranks what is there: the connect programs ask once per selection the process is in
/// (`ifindex`: the selection's), and the best-ranked answer wins. `MARKS`: whether the mark
/// rules are asked too in the same call (the connect programs ask them in a function of
/// their own, `local_origin::match_local_mark_rules`, whose packet lives in the socket's
/// storage: inlined here, eight selections' mark loops would be more than the verifier
/// walks).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn match_rules_into<const N: usize, const MARKS: bool>(
    generation: u32,
    by_dst: &LpmTrie<DstKey<N>, Verdict>,
    by_src: &LpmTrie<SrcKey<N>, Verdict>,
    udp: bool,
    dport: u16,
    daddr: [u8; N],
    saddr: [u8; N],
    ifindex: u32,
    mark: u32,
    best: &mut Verdict,
) {
    if MARKS {
        if let Some(marks) = MARK_RULES.get(generation).filter(|marks| marks.len != 0) {
            if let Some(packet) = MARK_PACKET.get_ptr_mut(0) {
                // SAFETY: this CPU's entry, which nothing else touches while the program runs.
                let packet = unsafe { &mut *packet };
                packet.set(mark, udp, dport, daddr, saddr, ifindex);
                match_mark_rules::<false>(marks, packet, best);
            }
        }
    }
    let groups = match PORT_CLASSES.get(port_class_index(generation, udp, dport)) {
        Some(&groups) if groups != 0 => groups,
        _ => return,
    };
    for group in 0..RULE_GROUPS {
        if let Some(class) = rule_group_class(groups, generation, udp, dport, group) {
            match_group(by_dst, by_src, class, daddr, saddr, ifindex, best);
        }
    }
}

/// One rule group's answer (destination, then maybe source), kept in `best` if it outranks
/// the answers so far.
#[inline(always)]
fn match_group<const N: usize>(
    by_dst: &LpmTrie<DstKey<N>, Verdict>,
    by_src: &LpmTrie<SrcKey<N>, Verdict>,
    class: u32,
    daddr: [u8; N],
    saddr: [u8; N],
    ifindex: u32,
    best: &mut Verdict,
) {
    let dst_key = DstKey { class, addr: daddr };
    let Some(verdict) = by_dst.get(Key::new(DstKey::<N>::prefix_len(N as u32 * 8), dst_key)) else {
        return;
    };
    let verdict = match source_stage_ifindex(verdict, ifindex) {
        None => verdict,
        Some(key_ifindex) => {
            let src_key = SrcKey {
                cell: verdict.cell,
                ifindex: key_ifindex,
                addr: saddr,
            };
            match by_src.get(Key::new(SrcKey::<N>::prefix_len(N as u32 * 8), src_key)) {
                Some(verdict) => verdict,
                None => return,
            }
        }
    };
    if outranks(verdict, best) {
        *best = *verdict;
    }
}

/// An arrival of a protocol besides TCP and UDP: the rules for other protocols (`drop` and
/// `bypass` only, without ports) decide by its addresses and interface; a drop is the only
/// thing done to it.
#[inline(always)]
fn other_protocol<const N: usize>(
    ctx: &TcContext,
    by_dst: &LpmTrie<DstKey<N>, Verdict>,
    by_src: &LpmTrie<SrcKey<N>, Verdict>,
    daddr: [u8; N],
    saddr: [u8; N],
) -> Outcome {
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let class = other_protocols_class(active_generation());
    let mut best = Verdict::default();
    match_group(by_dst, by_src, class, daddr, saddr, ifindex, &mut best);
    decision::other_protocol_outcome(rule_match(&best))
}

/// The source and destination ports (the first four bytes of both TCP and UDP headers), still
/// in network byte order. Copied with `bpf_skb_load_bytes`, which also reads headers that are
/// not in the linear part of the packet and needs no verifier-visible bound on the offset.
#[inline(always)]
fn ports(ctx: &TcContext, offset: usize) -> Option<[u16; 2]> {
    ctx.load::<[u16; 2]>(offset).ok()
}

/// Where a parsed TCP or UDP packet stands, besides its addresses and ports (those are in
/// the socket-lookup tuple).
struct Flow<'a> {
    protocol: Protocol,
    ipv6: bool,
    position: FragmentPosition,
    /// The datagram's reassembly key, when `position` is not `Whole`.
    fragment: &'a FragmentKey,
}

/// The decision for a flow whose ports are known: rules, destination scope, then the socket
/// match and the listener. A first fragment's decision is remembered for the rest of its
/// datagram.
#[inline(always)]
fn steer_flow(
    ctx: &TcContext,
    flow: &Flow<'_>,
    rule: RuleMatch,
    scope: DestinationScope,
    tuple: &mut bpf_sock_tuple,
    tuple_len: u32,
) -> Outcome {
    let ipv6 = flow.ipv6;
    let outcome = match (rule, scope) {
        (RuleMatch::None, _) => Outcome::Passed,
        // Delivered like a steered flow: not to the host's loopback by a mapped address,
        // and the local network's own traffic left to the kernel.
        // Nor answered from the host's loopback.
        (
            RuleMatch::Steer(_) | RuleMatch::Deliver | RuleMatch::Reject,
            DestinationScope::Refused,
        ) => Outcome::RefusedDestination,
        (RuleMatch::Steer(_) | RuleMatch::Deliver, DestinationScope::LocalScope) => {
            Outcome::LocalScope
        }
        _ => {
            let whole = flow.position == FragmentPosition::Whole;
            steer_transport(ctx, flow.protocol, tuple, tuple_len, ipv6, rule, whole)
        }
    };
    if flow.position == FragmentPosition::Whole {
        return outcome;
    }
    let outcome = fragment_outcome(outcome);
    let decision = FragmentDecision {
        outcome: outcome as u32,
        protocol: flow.protocol as u16,
        ipv6: ipv6 as u16,
        seen_ns: now_ns(),
    };
    let _ = FRAGMENTS.insert(flow.fragment, &decision, 0);
    outcome
}

/// A later fragment (no transport header): what its datagram's first fragment got, counted
/// in that fragment's protocol row, if it was seen and is not older than the kernel's
/// reassembly timeout. Otherwise `protocol` (what the fragment names) decides: a TCP or UDP
/// fragment, or one whose first fragment began with more extension headers, could belong to
/// a flow the rules look at (`fragment_unknown`); other protocols' fragments are passed as
/// they always were.
#[inline(always)]
fn later_fragment(ctx: &TcContext, key: &FragmentKey, next_header: u8) -> (Protocol, Outcome) {
    // SAFETY: the value is copied out at once; the map holds plain data.
    let first = unsafe { FRAGMENTS.get(key) }.copied();
    let named = protocol_of(next_header);
    let (protocol, outcome) = match first {
        Some(first) if first.is_live(now_ns(), fragment_timeouts()) => (
            if first.protocol == Protocol::Udp as u16 {
                Protocol::Udp
            } else {
                Protocol::Tcp
            },
            Outcome::from_index(first.outcome).unwrap_or(Outcome::FragmentUnknown),
        ),
        _ if named != Protocol::Other => (named, Outcome::FragmentUnknown),
        _ if decision::is_ipv6_extension_header(next_header) => {
            (Protocol::Other, Outcome::FragmentUnknown)
        }
        _ => (named, Outcome::Passed),
    };
    if outcome == Outcome::FragmentSteered {
        mark_for_local_delivery(ctx);
    }
    (protocol, outcome)
}

/// The socket match and listener assignment for a parsed flow of either family that a rule
/// matched. `assign`: false for a first fragment, which is only marked (see
/// `decision::fragment_outcome`).
#[inline(always)]
fn steer_transport(
    ctx: &TcContext,
    protocol: Protocol,
    tuple: &mut bpf_sock_tuple,
    tuple_len: u32,
    ipv6: bool,
    rule: RuleMatch,
    assign: bool,
) -> Outcome {
    let tcp = protocol == Protocol::Tcp;
    // A bypassed or dropped flow still goes to a socket that owns it: the rule that steered
    // it may have been removed by a reload since (see `decision::unowned_outcome`).
    let listener = match rule {
        RuleMatch::None => return Outcome::Passed,
        RuleMatch::Bypass | RuleMatch::Drop | RuleMatch::Deliver | RuleMatch::Reject => None,
        RuleMatch::Steer(listener) => Some(listener_slot(listener, ListenerSlot::of(tcp, ipv6))),
    };
    let outcome = if tcp {
        steer_tcp(ctx, tuple, tuple_len, listener, assign)
    } else {
        steer_udp(ctx, tuple, tuple_len, listener, assign)
    };
    let outcome = match outcome {
        Outcome::Bypassed => decision::unowned_outcome(rule),
        outcome => outcome,
    };
    if outcome == Outcome::Delivered {
        // No socket assigned: the kernel's own lookup finds one, as for the recipe's MARK.
        mark_for_local_delivery(ctx);
    }
    if let Some(slot) = listener {
        count_for_listener(slot, outcome);
    }
    if let (Outcome::SteeredNew, false, Some(slot)) = (outcome, assign, listener) {
        let reassembled = ProtocolFlowKey {
            flow: flow_key(tuple, tuple_len),
            protocol: if tcp { IPPROTO_TCP } else { IPPROTO_UDP } as u32,
        };
        let entry = ReassembledFlow {
            slot,
            ipv6: ipv6 as u32,
            seen_ns: now_ns(),
        };
        let _ = REASSEMBLED_FLOWS.insert(&reassembled, &entry, 0);
    }
    outcome
}

fn steer_ipv4<const LOOPBACK: bool>(ctx: &TcContext, l3: usize) -> (Protocol, Outcome) {
    // version/IHL at 0, identification at 4, flags+fragment offset at 6, protocol at 9,
    // addresses at 12..20.
    let Some(ip) = header::<[u8; 20]>(ctx, l3) else {
        return (Protocol::Other, Outcome::Passed);
    };
    // SAFETY: `header` checked that the 20 bytes are inside the packet.
    let ip = unsafe { &*ip };
    let protocol = protocol_of(ip[9]);
    let Some((header_len, position)) =
        decision::ipv4_layout(ip[0], u16::from_be_bytes([ip[6], ip[7]]))
    else {
        // The kernel drops it too.
        return (protocol, Outcome::Passed);
    };
    let daddr = [ip[16], ip[17], ip[18], ip[19]];
    let saddr = [ip[12], ip[13], ip[14], ip[15]];
    if protocol == Protocol::Other {
        // Every fragment carries what these rules look at.
        let outcome = match LOOPBACK {
            true => Outcome::Passed,
            false => other_protocol(ctx, &RULES_DST_V4, &RULES_SRC_V4, daddr, saddr),
        };
        return (protocol, outcome);
    }
    let mut fragment = FragmentKey::default();
    if position != FragmentPosition::Whole {
        fragment.source[..4].copy_from_slice(&saddr);
        fragment.destination[..4].copy_from_slice(&daddr);
        fragment.id = u16::from_be_bytes([ip[4], ip[5]]) as u32;
        fragment.protocol = ip[9] as u32;
    }
    if position == FragmentPosition::Later {
        return later_fragment(ctx, &fragment, ip[9]);
    }
    let Some([sport, dport]) = ports(ctx, l3 + header_len) else {
        return (protocol, Outcome::Unparsed);
    };
    let flow = Flow {
        protocol,
        ipv6: false,
        position,
        fragment: &fragment,
    };
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let udp = protocol == Protocol::Udp;
    // The loopback program looks the client socket up with it first.
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    let rule = if LOOPBACK {
        loopback::recorded_v4(ctx, udp, &mut tuple, saddr, daddr, sport, dport)
    } else {
        // The loopback program asks no rules: only the others need it.
        note_source_port(u16::from_be(sport));
        let generation = active_generation();
        note_ct_direction(ctx, generation, udp, saddr, daddr, sport, dport);
        match_rules(
            generation,
            &RULES_DST_V4,
            &RULES_SRC_V4,
            udp,
            u16::from_be(dport),
            daddr,
            saddr,
            ifindex,
            unsafe { (*ctx.skb.skb).mark },
        )
    };
    let scope = decision::ipv4_destination_scope(daddr, ifindex == LOOPBACK_IFINDEX);
    tuple.__bindgen_anon_1.ipv4 = TupleV4 {
        saddr: u32::from_ne_bytes(saddr),
        daddr: u32::from_ne_bytes(daddr),
        sport,
        dport,
    };
    let tuple_len = mem::size_of::<TupleV4>() as u32;
    let outcome = steer_flow(ctx, &flow, rule, scope, &mut tuple, tuple_len);
    // Not from the loopback program: aya-log's frame on top of its record lookup would be
    // over the verifier's 512 bytes.
    if !LOOPBACK && outcome == Outcome::SteeredNew {
        debug!(
            ctx,
            "steer new {} {:i}:{} -> {:i}:{}",
            protocol.name(),
            u32::from_be_bytes(saddr),
            u16::from_be(sport),
            u32::from_be_bytes(daddr),
            u16::from_be(dport)
        );
    }
    (protocol, outcome)
}

fn steer_ipv6<const LOOPBACK: bool>(ctx: &TcContext, l3: usize) -> (Protocol, Outcome) {
    // next header at 6, source at 8..24, destination at 24..40.
    let Some(ip) = header::<[u8; IPV6_HEADER_LEN]>(ctx, l3) else {
        return (Protocol::Other, Outcome::Passed);
    };
    // SAFETY: `header` checked that the 40 bytes are inside the packet.
    let ip = unsafe { &*ip };
    let (mut daddr, mut saddr) = ([0u8; 16], [0u8; 16]);
    daddr.copy_from_slice(&ip[24..40]);
    saddr.copy_from_slice(&ip[8..24]);
    let mut next = ip[6];
    let mut offset = l3 + IPV6_HEADER_LEN;
    let mut position = FragmentPosition::Whole;
    let mut fragment = FragmentKey::default();
    // What ip6tables' `-p tcp` does: walk the extension headers to the transport header.
    for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
        if !decision::is_ipv6_extension_header(next) {
            break;
        }
        // Every extension header is at least 8 bytes long. One that is not all there (a
        // first fragment whose header chain runs into the next fragment) is unparsed.
        let Ok(head) = ctx.load::<[u8; 8]>(offset) else {
            return (Protocol::Other, Outcome::Unparsed);
        };
        match decision::ipv6_step(next, head) {
            Ipv6Step::Transport(_) => break,
            Ipv6Step::Skip { next_header, len } => {
                next = next_header;
                offset += len;
            }
            Ipv6Step::Fragment {
                next_header,
                position: here,
                id,
            } => {
                position = here;
                if position != FragmentPosition::Whole {
                    fragment.source = saddr;
                    fragment.destination = daddr;
                    fragment.id = id;
                }
                if position == FragmentPosition::Later {
                    if !LOOPBACK
                        && protocol_of(next_header) == Protocol::Other
                        && !decision::is_ipv6_extension_header(next_header)
                    {
                        // Decided by its addresses, as its first fragment was.
                        let outcome =
                            other_protocol(ctx, &RULES_DST_V6, &RULES_SRC_V6, daddr, saddr);
                        return (Protocol::Other, outcome);
                    }
                    // What follows is the middle of the datagram, not a header.
                    return later_fragment(ctx, &fragment, next_header);
                }
                next = next_header;
                offset += 8;
            }
        }
    }
    if decision::is_ipv6_extension_header(next) {
        // More headers than the program walks: it cannot tell whose flow this is.
        return (Protocol::Other, Outcome::Unparsed);
    }
    let protocol = protocol_of(next);
    if protocol == Protocol::Other {
        let outcome = match LOOPBACK {
            true => Outcome::Passed,
            false => other_protocol(ctx, &RULES_DST_V6, &RULES_SRC_V6, daddr, saddr),
        };
        return (protocol, outcome);
    }
    let Some([sport, dport]) = ports(ctx, offset) else {
        return (protocol, Outcome::Unparsed);
    };
    let flow = Flow {
        protocol,
        ipv6: true,
        position,
        fragment: &fragment,
    };
    let udp = protocol == Protocol::Udp;
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // The loopback program looks the client socket up with it first.
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    let rule = if LOOPBACK {
        loopback::recorded_v6(ctx, udp, &mut tuple, &saddr, &daddr, sport, dport)
    } else {
        // The loopback program asks no rules: only the others need it.
        note_source_port(u16::from_be(sport));
        let generation = active_generation();
        note_ct_direction(ctx, generation, udp, saddr, daddr, sport, dport);
        match_rules(
            generation,
            &RULES_DST_V6,
            &RULES_SRC_V6,
            udp,
            u16::from_be(dport),
            daddr,
            saddr,
            ifindex,
            unsafe { (*ctx.skb.skb).mark },
        )
    };
    let scope = decision::ipv6_destination_scope(daddr, ifindex == LOOPBACK_IFINDEX);
    tuple.__bindgen_anon_1.ipv6 = TupleV6 {
        saddr: ipv6_words(&saddr),
        daddr: ipv6_words(&daddr),
        sport,
        dport,
    };
    let tuple_len = mem::size_of::<TupleV6>() as u32;
    let outcome = steer_flow(ctx, &flow, rule, scope, &mut tuple, tuple_len);
    // Not from the loopback program: aya-log's frame on top of its record lookup would be
    // over the verifier's 512 bytes.
    if !LOOPBACK && outcome == Outcome::SteeredNew {
        debug!(
            ctx,
            "steer new {} [{:i}]:{} -> [{:i}]:{}",
            protocol.name(),
            saddr,
            u16::from_be(sport),
            daddr,
            u16::from_be(dport)
        );
    }
    (protocol, outcome)
}

/// An IPv6 address as a socket-lookup tuple holds it.
#[inline(always)]
fn ipv6_words(bytes: &[u8; 16]) -> [u32; 4] {
    let mut out = [0u32; 4];
    for (i, word) in out.iter_mut().enumerate() {
        let b = &bytes[i * 4..i * 4 + 4];
        *word = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    }
    out
}

/// TCP socket match, then listener. TCP and UDP are kept in separate functions: the
/// verifier types the socket pointers of the two lookups differently.
#[inline(always)]
fn steer_tcp(
    ctx: &TcContext,
    tuple: *mut bpf_sock_tuple,
    tuple_len: u32,
    listener_slot: Option<u32>,
    assign: bool,
) -> Outcome {
    // The netns argument is a u64: -1 must stay all ones, a 32-bit cast would miss every socket.
    // SAFETY: `tuple` points at a tuple of `tuple_len` bytes on our stack.
    let own = unsafe {
        bpf_skc_lookup_tcp(
            ctx.as_ptr(),
            tuple,
            tuple_len,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if !own.is_null() {
        // SAFETY: a non-null socket from the lookup, referenced until released below.
        let state = unsafe { (*own).state };
        if decision::socket_owns_flow(state) {
            if let (decision::TCP_TIME_WAIT, Some(slot)) = (state, listener_slot) {
                // A new SYN here makes the kernel retire the socket and look up a listener:
                // tell the sk_lookup program which one.
                // SAFETY: as above, the tuple is ours.
                let flow = flow_key(unsafe { &*tuple }, tuple_len);
                let _ = TIME_WAIT_FLOWS.insert(&flow, &slot, 0);
            }
            return take_socket(ctx, own, Outcome::SteeredEstablished, assign);
        }
        // SAFETY: releases the reference the lookup took.
        unsafe { bpf_sk_release(own as *mut c_void) };
    }
    let Some(slot) = listener_slot else {
        return Outcome::Bypassed;
    };
    let Some(listener) = listener(slot) else {
        return steer_tcp_external(ctx, tuple, tuple_len, slot, assign);
    };
    // SAFETY: a referenced socket from the socket map.
    if unsafe { (*listener).state } != decision::TCP_LISTEN {
        // SAFETY: releases the reference the map lookup took.
        unsafe { bpf_sk_release(listener as *mut c_void) };
        return Outcome::NoListener;
    }
    take_socket(ctx, listener, Outcome::SteeredNew, assign)
}

/// The [`FlowKey`] of a socket-lookup tuple (addresses as they are, ports to host order).
#[inline(always)]
fn flow_key(tuple: &bpf_sock_tuple, tuple_len: u32) -> FlowKey {
    let mut flow = FlowKey::default();
    if tuple_len == mem::size_of::<TupleV4>() as u32 {
        // SAFETY: a tuple of this length was written as IPv4.
        let v4 = unsafe { tuple.__bindgen_anon_1.ipv4 };
        flow.client[..4].copy_from_slice(&v4.saddr.to_ne_bytes());
        flow.destination[..4].copy_from_slice(&v4.daddr.to_ne_bytes());
        flow.client_port = u16::from_be(v4.sport);
        flow.destination_port = u16::from_be(v4.dport);
    } else {
        // SAFETY: any other length was written as IPv6.
        let v6 = unsafe { tuple.__bindgen_anon_1.ipv6 };
        for i in 0..4 {
            flow.client[i * 4..i * 4 + 4].copy_from_slice(&v6.saddr[i].to_ne_bytes());
            flow.destination[i * 4..i * 4 + 4].copy_from_slice(&v6.daddr[i].to_ne_bytes());
        }
        flow.client_port = u16::from_be(v6.sport);
        flow.destination_port = u16::from_be(v6.dport);
    }
    flow
}

/// UDP socket match (tproxy's own per-flow sockets only), then listener.
#[inline(always)]
fn steer_udp(
    ctx: &TcContext,
    tuple: *mut bpf_sock_tuple,
    tuple_len: u32,
    listener_slot: Option<u32>,
    assign: bool,
) -> Outcome {
    // SAFETY: `tuple` points at a tuple of `tuple_len` bytes on our stack.
    let own = unsafe {
        bpf_sk_lookup_udp(
            ctx.as_ptr(),
            tuple,
            tuple_len,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if !own.is_null() {
        // SAFETY: a non-null socket from the lookup, referenced until released.
        let (mark, state) = unsafe { ((*own).mark, (*own).state) };
        if decision::owns_udp_flow(mark, state, OWN_SOCKET_MARK.load()) {
            return take_socket(ctx, own, Outcome::SteeredEstablished, assign);
        }
        // SAFETY: releases the reference the lookup took.
        unsafe { bpf_sk_release(own as *mut c_void) };
    }
    let Some(slot) = listener_slot else {
        return Outcome::Bypassed;
    };
    match listener(slot) {
        Some(listener) => take_socket(ctx, listener, Outcome::SteeredNew, assign),
        None => steer_udp_external(ctx, tuple, tuple_len, slot, assign),
    }
}

/// A new TCP flow for a listener tproxy does not own: the socket listening at its external
/// address, found as `-j TPROXY --on-ip --on-port` finds it. The flow's own socket was looked
/// for already, so the tuple may be rewritten.
#[inline(always)]
fn steer_tcp_external(
    ctx: &TcContext,
    tuple: *mut bpf_sock_tuple,
    tuple_len: u32,
    slot: u32,
    assign: bool,
) -> Outcome {
    if !assign || !aim_at_external_listener(tuple, tuple_len, slot) {
        // A first fragment: the reassembled datagram would reach the `sk_lookup` program,
        // which can only hand it to a socket in the socket map.
        return Outcome::NoListener;
    }
    // SAFETY: `tuple` points at a tuple of `tuple_len` bytes on our stack.
    let found = unsafe {
        bpf_skc_lookup_tcp(
            ctx.as_ptr(),
            tuple,
            tuple_len,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if found.is_null() {
        return Outcome::NoListener;
    }
    // SAFETY: a non-null socket from the lookup, referenced until released.
    if unsafe { (*found).state } != decision::TCP_LISTEN {
        // SAFETY: releases the reference the lookup took.
        unsafe { bpf_sk_release(found as *mut c_void) };
        return Outcome::NoListener;
    }
    take_socket(ctx, found, Outcome::SteeredNew, assign)
}

/// A new UDP flow for a listener tproxy does not own: the unconnected socket at its external
/// address, as the kernel's TPROXY finds it.
#[inline(always)]
fn steer_udp_external(
    ctx: &TcContext,
    tuple: *mut bpf_sock_tuple,
    tuple_len: u32,
    slot: u32,
    assign: bool,
) -> Outcome {
    if !assign || !aim_at_external_listener(tuple, tuple_len, slot) {
        return Outcome::NoListener;
    }
    // SAFETY: `tuple` points at a tuple of `tuple_len` bytes on our stack.
    let found = unsafe {
        bpf_sk_lookup_udp(
            ctx.as_ptr(),
            tuple,
            tuple_len,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if found.is_null() {
        return Outcome::NoListener;
    }
    // SAFETY: as above. A connected socket is one flow's, not a listener (TPROXY skips it too).
    if unsafe { (*found).state } == decision::TCP_ESTABLISHED {
        // SAFETY: releases the reference the lookup took.
        unsafe { bpf_sk_release(found as *mut c_void) };
        return Outcome::NoListener;
    }
    take_socket(ctx, found, Outcome::SteeredNew, assign)
}

/// Rewrites the tuple's destination to listener `slot`'s external address and port; false
/// when the slot has no external listener.
#[inline(always)]
fn aim_at_external_listener(tuple: *mut bpf_sock_tuple, tuple_len: u32, slot: u32) -> bool {
    let Some(external) = EXTERNAL_LISTENERS.get(slot) else {
        return false;
    };
    if external.kind == EXTERNAL_NONE {
        return false;
    }
    let at_address = external.kind == EXTERNAL_AT_ADDRESS;
    // SAFETY: `tuple` points at a tuple of `tuple_len` bytes on our stack, written as the
    // family its length says.
    unsafe {
        if tuple_len == mem::size_of::<TupleV4>() as u32 {
            let v4 = &mut (*tuple).__bindgen_anon_1.ipv4;
            if at_address {
                v4.daddr = external.address[0];
            }
            v4.dport = external.port;
        } else {
            let v6 = &mut (*tuple).__bindgen_anon_1.ipv6;
            if at_address {
                v6.daddr = external.address;
            }
            v6.dport = external.port;
        }
    }
    true
}

/// Counts a steer rule's new flow, or its absent listener, for the listener it names.
#[inline(always)]
fn count_for_listener(slot: u32, outcome: Outcome) {
    let no_listener = match outcome {
        Outcome::SteeredNew => false,
        Outcome::NoListener => true,
        _ => return,
    };
    if let Some(counter) = LISTENER_COUNTERS.get_ptr_mut(listener_counter_index(slot, no_listener))
    {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *counter += 1 };
    }
}

/// The listener socket in `slot`, referenced: the caller must release it.
#[inline(always)]
fn listener(slot: u32) -> Option<*mut bpf_sock> {
    // SAFETY: a socket map lookup from a tc program returns a referenced socket or null.
    let listener = unsafe {
        bpf_map_lookup_elem(
            ptr::addr_of!(LISTENERS) as *mut c_void,
            ptr::addr_of!(slot) as *const c_void,
        )
    } as *mut bpf_sock;
    (!listener.is_null()).then_some(listener)
}

/// Gives the packet to `sk` (assigns it, when `assign`), drops our reference to it, and marks
/// the packet for local delivery. The reference is released whatever the assign returned.
#[inline(always)]
fn take_socket(ctx: &TcContext, sk: *mut bpf_sock, success: Outcome, assign: bool) -> Outcome {
    let ret = if assign {
        // SAFETY: `sk` is a referenced full socket or request socket from a lookup.
        unsafe { bpf_sk_assign(ctx.as_ptr(), sk as *mut c_void, 0) }
    } else {
        0
    };
    // SAFETY: releases the reference the caller's lookup took, on every path.
    unsafe { bpf_sk_release(sk as *mut c_void) };
    if ret != 0 {
        // Counted by reason; no log record here: aya-log's call would be a second stack
        // frame on top of the classifier's, over the verifier's 512 bytes.
        return decision::assign_error(ret);
    }
    mark_for_local_delivery(ctx);
    success
}

/// Sets tproxy's routing mark (only its bits), so policy routing delivers the packet locally.
#[inline(always)]
fn mark_for_local_delivery(ctx: &TcContext) {
    // SAFETY: reading a field of the context's skb.
    let current = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(decision::with_routing_mark(
        current,
        ROUTING_MARK.load(),
        ROUTING_MARK_MASK.load(),
    ));
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
