//! tc ingress program: the socket match and the TPROXY target of the classic iptables recipe,
//! in one pass over the packet.
//!
//! packet → parse (Ethernet, one 802.1Q tag, IPv4/IPv6, TCP/UDP ports)
//!        → rules (port array, then per rule group a destination and maybe a source LPM
//!          trie; the best-ranked answer wins)
//!        → for a steer or bypass rule: the flow's own socket, if it has one (exact-tuple
//!          lookup; for UDP only tproxy's own per-flow sockets count)
//!        → otherwise, for a steer rule: the rule's listener from the socket map
//!        → `bpf_sk_assign` + routing mark, so policy routing delivers it locally.
//!
//! Every path returns `TC_ACT_OK` — a packet we do not steer continues exactly as if the
//! program were not there, and an assigned packet must not be redirected by a later filter —
//! except, when failing closed, a packet a steer rule took that no socket can get.
#![no_std]
#![no_main]

use core::{ffi::c_void, mem, ptr};

use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as TupleV4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as TupleV6, BPF_F_CURRENT_NETNS, BPF_F_NO_PREALLOC,
        TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::generated::{
        bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    macros::{classifier, map, sk_lookup},
    maps::{lpm_trie::Key, Array, LpmTrie, LruHashMap, PerCpuArray, SockMap},
    programs::{SkLookupContext, TcContext},
    EbpfContext, Global,
};
use aya_log_ebpf::{debug, warn};
use tproxy_common::{
    decision::{
        self, counter_index, outranks, rule_match, source_stage_ifindex, Outcome, Protocol,
        RuleMatch,
    },
    maps::{
        any_port_class, listener_slot, port_class_index, range_class, single_port_class, DstKey,
        FlowKey, ListenerSlot, SrcKey, Verdict, COUNTERS_LEN, LISTENERS_LEN, TIME_WAIT_FLOWS_LEN,
        PORT_CLASSES_LEN, PORT_HAS_ANY, PORT_HAS_SINGLE, PORT_RANGE_CLASS,
    },
};

#[map]
static ACTIVE_GENERATION: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static PORT_CLASSES: Array<u32> = Array::with_max_entries(PORT_CLASSES_LEN, 0);
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
static TIME_WAIT_FLOWS: LruHashMap<FlowKey, u32> = LruHashMap::with_max_entries(TIME_WAIT_FLOWS_LEN, 0);
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

const ETH_HEADER_LEN: usize = 14;
const VLAN_HEADER_LEN: usize = 4;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV6_HEADER_LEN: usize = 40;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

#[classifier]
pub fn tproxy_ingress(ctx: TcContext) -> i32 {
    let (protocol, outcome) = steer(&ctx);
    if let Some(counter) = COUNTERS.get_ptr_mut(counter_index(protocol, outcome)) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *counter += 1 };
    }
    if decision::drops_packet(outcome, FAIL_CLOSED.load()) {
        return TC_ACT_SHOT as i32;
    }
    TC_ACT_OK as i32
}

/// Runs for every listener lookup the kernel makes in this network namespace. It answers
/// one: a SYN that the tc program handed to the TIME_WAIT socket of an old connection with the
/// same tuple. The kernel retires that socket and then looks for a listener for the SYN's
/// (non-local) destination; for a steered flow, that is tproxy's listener. Any other lookup
/// of a steered flow would have been answered already, by the tc program's assign.
#[sk_lookup]
pub fn tproxy_tw_syn(ctx: SkLookupContext) -> u32 {
    const SK_PASS: u32 = 1;
    const AF_INET: u32 = 2;
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP as u32 {
        return SK_PASS;
    }
    // Map keys must be on the stack, not in the context.
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
    let Some(&slot) = (unsafe { TIME_WAIT_FLOWS.get(&flow) }) else {
        return SK_PASS;
    };
    let _ = TIME_WAIT_FLOWS.remove(&flow);
    // Failing that, the kernel's own lookup goes on and answers as it would have.
    let _ = LISTENERS.redirect_sk_lookup(&ctx, slot, 0);
    SK_PASS
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

fn steer(ctx: &TcContext) -> (Protocol, Outcome) {
    const NOT_STEERED: (Protocol, Outcome) = (Protocol::Other, Outcome::Passed);
    let skb = unsafe { &*ctx.skb.skb };
    if decision::belongs_to_vlan_interface(skb.vlan_present, skb.vlan_tci)
        || decision::sent_by_tproxy(skb.mark, OWN_SOCKET_MARK.load())
    {
        return NOT_STEERED;
    }
    let Some(ethertype) = header::<[u8; 2]>(ctx, 12) else {
        return NOT_STEERED;
    };
    let mut ethertype = u16::from_be_bytes(unsafe { *ethertype });
    let mut l3 = ETH_HEADER_LEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(inner) = header::<[u8; 2]>(ctx, l3 + 2) else {
            return NOT_STEERED;
        };
        ethertype = u16::from_be_bytes(unsafe { *inner });
        l3 += VLAN_HEADER_LEN;
    }
    match ethertype {
        ETH_P_IPV4 => steer_ipv4(ctx, l3),
        ETH_P_IPV6 => steer_ipv6(ctx, l3),
        _ => NOT_STEERED,
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

/// The rules' decision for a flow: at most seven bounded lookups, whatever the number of
/// rules (see the loader's `rules` module for how the maps are built).
#[inline(always)]
fn match_rules<const N: usize>(
    by_dst: &LpmTrie<DstKey<N>, Verdict>,
    by_src: &LpmTrie<SrcKey<N>, Verdict>,
    udp: bool,
    dport: u16,
    daddr: [u8; N],
    saddr: [u8; N],
    ifindex: u32,
) -> RuleMatch {
    // Read once: every lookup below uses the same generation of the rule set.
    let generation = ACTIVE_GENERATION.get(0).copied().unwrap_or(0);
    let groups = match PORT_CLASSES.get(port_class_index(generation, udp, dport)) {
        Some(&groups) if groups != 0 => groups,
        _ => return RuleMatch::None,
    };
    let mut best = Verdict::default();
    if groups & PORT_HAS_SINGLE != 0 {
        let class = single_port_class(generation, udp, dport);
        match_group(by_dst, by_src, class, daddr, saddr, ifindex, &mut best);
    }
    if groups & PORT_RANGE_CLASS != 0 {
        let class = range_class(generation, groups & PORT_RANGE_CLASS);
        match_group(by_dst, by_src, class, daddr, saddr, ifindex, &mut best);
    }
    if groups & PORT_HAS_ANY != 0 {
        let class = any_port_class(generation, udp);
        match_group(by_dst, by_src, class, daddr, saddr, ifindex, &mut best);
    }
    rule_match(&best)
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
            let src_key = SrcKey { cell: verdict.cell, ifindex: key_ifindex, addr: saddr };
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

/// The source and destination ports (the first four bytes of both TCP and UDP headers), still
/// in network byte order.
#[inline(always)]
fn ports(ctx: &TcContext, offset: usize) -> Option<[u16; 2]> {
    Some(unsafe { *header::<[u16; 2]>(ctx, offset)? })
}

/// The socket match and listener assignment for a parsed, steered flow of either family.
#[inline(always)]
fn steer_transport(
    ctx: &TcContext,
    protocol: Protocol,
    tuple: &mut bpf_sock_tuple,
    tuple_len: u32,
    ipv6: bool,
    rule: RuleMatch,
) -> Outcome {
    let tcp = protocol == Protocol::Tcp;
    // A bypassed flow still goes to a socket that owns it: the rule that steered it may
    // have been removed by a reload since.
    let listener = match rule {
        RuleMatch::None => return Outcome::Passed,
        RuleMatch::Bypass => None,
        RuleMatch::Steer(listener) => Some(listener_slot(listener, ListenerSlot::of(tcp, ipv6))),
    };
    if tcp {
        steer_tcp(ctx, tuple, tuple_len, listener)
    } else {
        steer_udp(ctx, tuple, tuple_len, listener)
    }
}

fn steer_ipv4(ctx: &TcContext, l3: usize) -> (Protocol, Outcome) {
    // version/IHL at 0, flags+fragment offset at 6, protocol at 9, addresses at 12..20.
    let Some(ip) = header::<[u8; 20]>(ctx, l3) else {
        return (Protocol::Other, Outcome::Passed);
    };
    let ip = unsafe { &*ip };
    let protocol = protocol_of(ip[9]);
    let Some(header_len) =
        decision::ipv4_transport_offset(ip[0], u16::from_be_bytes([ip[6], ip[7]]))
    else {
        return (protocol, Outcome::Passed);
    };
    if protocol == Protocol::Other {
        return (protocol, Outcome::Passed);
    }
    // IHL is at most 15 words; the mask keeps the verifier's view of the offset bounded.
    let Some([sport, dport]) = ports(ctx, l3 + (header_len & 0x3c)) else {
        return (protocol, Outcome::Passed);
    };
    let daddr = [ip[16], ip[17], ip[18], ip[19]];
    let saddr = [ip[12], ip[13], ip[14], ip[15]];
    let udp = protocol == Protocol::Udp;
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let rule = match_rules(&RULES_DST_V4, &RULES_SRC_V4, udp, u16::from_be(dport), daddr, saddr, ifindex);
    if rule == RuleMatch::None {
        return (protocol, Outcome::Passed);
    }
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4 = TupleV4 {
        saddr: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        daddr: u32::from_ne_bytes(daddr),
        sport,
        dport,
    };
    let tuple_len = mem::size_of::<TupleV4>() as u32;
    let outcome = steer_transport(ctx, protocol, &mut tuple, tuple_len, false, rule);
    if outcome == Outcome::SteeredNew {
        debug!(
            ctx,
            "steer new {} {:i}:{} -> {:i}:{}",
            protocol.name(),
            u32::from_be_bytes([ip[12], ip[13], ip[14], ip[15]]),
            u16::from_be(sport),
            u32::from_be_bytes(daddr),
            u16::from_be(dport)
        );
    }
    (protocol, outcome)
}

fn steer_ipv6(ctx: &TcContext, l3: usize) -> (Protocol, Outcome) {
    // next header at 6, source at 8..24, destination at 24..40.
    let Some(ip) = header::<[u8; IPV6_HEADER_LEN]>(ctx, l3) else {
        return (Protocol::Other, Outcome::Passed);
    };
    let ip = unsafe { &*ip };
    // Extension headers are not walked yet: such packets are "other" and pass untouched.
    let protocol = protocol_of(ip[6]);
    if protocol == Protocol::Other {
        return (protocol, Outcome::Passed);
    }
    let Some([sport, dport]) = ports(ctx, l3 + IPV6_HEADER_LEN) else {
        return (protocol, Outcome::Passed);
    };
    let (mut daddr, mut saddr) = ([0u8; 16], [0u8; 16]);
    daddr.copy_from_slice(&ip[24..40]);
    saddr.copy_from_slice(&ip[8..24]);
    let udp = protocol == Protocol::Udp;
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let rule = match_rules(&RULES_DST_V6, &RULES_SRC_V6, udp, u16::from_be(dport), daddr, saddr, ifindex);
    if rule == RuleMatch::None {
        return (protocol, Outcome::Passed);
    }
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    let words = |bytes: &[u8]| -> [u32; 4] {
        let mut out = [0u32; 4];
        for (i, word) in out.iter_mut().enumerate() {
            let b = &bytes[i * 4..i * 4 + 4];
            *word = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        }
        out
    };
    tuple.__bindgen_anon_1.ipv6 = TupleV6 {
        saddr: words(&ip[8..24]),
        daddr: words(&daddr),
        sport,
        dport,
    };
    let tuple_len = mem::size_of::<TupleV6>() as u32;
    let outcome = steer_transport(ctx, protocol, &mut tuple, tuple_len, true, rule);
    if outcome == Outcome::SteeredNew {
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

/// TCP socket match, then listener. TCP and UDP are kept in separate functions: the
/// verifier types the socket pointers of the two lookups differently.
#[inline(always)]
fn steer_tcp(
    ctx: &TcContext,
    tuple: *mut bpf_sock_tuple,
    tuple_len: u32,
    listener_slot: Option<u32>,
) -> Outcome {
    // The netns argument is a u64: -1 must stay all ones, a 32-bit cast would miss every socket.
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
        let state = unsafe { (*own).state };
        if decision::socket_owns_flow(state) {
            if let (decision::TCP_TIME_WAIT, Some(slot)) = (state, listener_slot) {
                // A new SYN here makes the kernel retire the socket and look up a listener:
                // tell the sk_lookup program which one.
                let flow = time_wait_flow(unsafe { &*tuple }, tuple_len);
                let _ = TIME_WAIT_FLOWS.insert(&flow, &slot, 0);
            }
            return assign_and_release(ctx, own, Outcome::SteeredEstablished);
        }
        unsafe { bpf_sk_release(own as *mut c_void) };
    }
    let Some(slot) = listener_slot else {
        return Outcome::Bypassed;
    };
    let Some(listener) = listener(slot) else {
        return Outcome::NoListener;
    };
    if unsafe { (*listener).state } != decision::TCP_LISTEN {
        unsafe { bpf_sk_release(listener as *mut c_void) };
        return Outcome::NoListener;
    }
    assign_and_release(ctx, listener, Outcome::SteeredNew)
}

/// The [`FlowKey`] of a socket-lookup tuple (addresses as they are, ports to host order).
#[inline(always)]
fn time_wait_flow(tuple: &bpf_sock_tuple, tuple_len: u32) -> FlowKey {
    let mut flow = FlowKey::default();
    if tuple_len == mem::size_of::<TupleV4>() as u32 {
        let v4 = unsafe { tuple.__bindgen_anon_1.ipv4 };
        flow.client[..4].copy_from_slice(&v4.saddr.to_ne_bytes());
        flow.destination[..4].copy_from_slice(&v4.daddr.to_ne_bytes());
        flow.client_port = u16::from_be(v4.sport);
        flow.destination_port = u16::from_be(v4.dport);
    } else {
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
) -> Outcome {
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
        if decision::is_own_udp_socket(unsafe { (*own).mark }, OWN_SOCKET_MARK.load()) {
            return assign_and_release(ctx, own, Outcome::SteeredEstablished);
        }
        unsafe { bpf_sk_release(own as *mut c_void) };
    }
    let Some(slot) = listener_slot else {
        return Outcome::Bypassed;
    };
    match listener(slot) {
        Some(listener) => assign_and_release(ctx, listener, Outcome::SteeredNew),
        None => Outcome::NoListener,
    }
}

/// The listener socket in `slot`, referenced: the caller must release it.
#[inline(always)]
fn listener(slot: u32) -> Option<*mut bpf_sock> {
    let listener = unsafe {
        bpf_map_lookup_elem(
            ptr::addr_of!(LISTENERS) as *mut c_void,
            ptr::addr_of!(slot) as *const c_void,
        )
    } as *mut bpf_sock;
    (!listener.is_null()).then_some(listener)
}

/// Assigns `sk` to the packet, drops our reference to it, and marks the packet for local
/// delivery. The reference is released whatever the assign returned.
#[inline(always)]
fn assign_and_release(ctx: &TcContext, sk: *mut bpf_sock, success: Outcome) -> Outcome {
    let ret = unsafe { bpf_sk_assign(ctx.as_ptr(), sk as *mut c_void, 0) };
    unsafe { bpf_sk_release(sk as *mut c_void) };
    if ret != 0 {
        let outcome = decision::assign_error(ret);
        warn!(ctx, "bpf_sk_assign failed: {}", ret);
        return outcome;
    }
    let current = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(decision::with_routing_mark(
        current,
        ROUTING_MARK.load(),
        ROUTING_MARK_MASK.load(),
    ));
    success
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
