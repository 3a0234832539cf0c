//! tc ingress program: the socket match and the TPROXY target of the classic iptables recipe,
//! in one pass over the packet.
//!
//! packet → parse (Ethernet, one 802.1Q tag, IPv4/IPv6, TCP/UDP ports)
//!        → steering set (destination port array, destination prefix LPM tries)
//!        → the flow's own socket, if it has one (exact-tuple lookup; for UDP only
//!          tproxy's own per-flow sockets count)
//!        → otherwise tproxy's listener for the protocol and family from the socket map
//!        → `bpf_sk_assign` + routing mark, so policy routing delivers it locally.
//!
//! Every path returns `TC_ACT_OK`: a packet we do not steer continues exactly as if the
//! program were not there, and an assigned packet must not be redirected by a later filter.
#![no_std]
#![no_main]

use core::{ffi::c_void, mem, ptr};

use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as TupleV4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as TupleV6, BPF_F_CURRENT_NETNS, TC_ACT_OK,
    },
    helpers::generated::{
        bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    macros::{classifier, map, sk_lookup},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, SockMap},
    programs::{SkLookupContext, TcContext},
    EbpfContext, Global,
};
use aya_log_ebpf::{debug, warn};
use tproxy_common::{
    decision::{self, counter_index, Outcome, Protocol},
    maps::{
        ListenerSlot, COUNTERS_LEN, MAX_DST_PREFIXES, MAX_STEERED_IFACES, PORT_TCP, PORT_UDP,
        STEERED_PORTS_LEN,
    },
};

#[map]
static STEERED_PORTS: Array<u8> = Array::with_max_entries(STEERED_PORTS_LEN, 0);
#[map]
static STEERED_DST_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_DST_PREFIXES, 0);
#[map]
static STEERED_DST_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_DST_PREFIXES, 0);
#[map]
static LISTENERS: SockMap = SockMap::with_max_entries(ListenerSlot::COUNT, 0);
#[map]
static STEERED_IFACES: HashMap<u32, u8> = HashMap::with_max_entries(MAX_STEERED_IFACES, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// Set by the loader before load (`tproxy_common::maps::MARK_GLOBAL`).
#[unsafe(no_mangle)]
static ROUTING_MARK: Global<u32> = Global::new(0);
/// Set by the loader before load (`tproxy_common::maps::MARK_MASK_GLOBAL`).
#[unsafe(no_mangle)]
static ROUTING_MARK_MASK: Global<u32> = Global::new(0);
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
    let lookup = unsafe { &*ctx.lookup };
    // Map keys must be on the stack, not in the context.
    let ifindex = unsafe { ptr::read_volatile(&lookup.ingress_ifindex) };
    if lookup.protocol != IPPROTO_TCP as u32
        || unsafe { STEERED_IFACES.get(&ifindex) }.is_none()
        || !port_steered(lookup.local_port as u16, Protocol::Tcp)
    {
        return SK_PASS;
    }
    const AF_INET: u32 = 2;
    let ipv6 = lookup.family != AF_INET;
    let steered = if ipv6 {
        let mut daddr = [0u8; 16];
        for (i, word) in lookup.local_ip6.iter().enumerate() {
            daddr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        dst_v6_steered(daddr)
    } else {
        dst_v4_steered(lookup.local_ip4.to_ne_bytes())
    };
    if steered {
        // Failing that, the kernel's own lookup goes on and answers as it would have.
        let _ = LISTENERS.redirect_sk_lookup(&ctx, ListenerSlot::of(true, ipv6) as u32, 0);
    }
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

/// Whether `port` (host byte order) is in the steering set for `protocol`.
#[inline(always)]
fn port_steered(port: u16, protocol: Protocol) -> bool {
    let bit = match protocol {
        Protocol::Tcp => PORT_TCP,
        Protocol::Udp => PORT_UDP,
        Protocol::Other => return false,
    };
    STEERED_PORTS
        .get(port as u32)
        .is_some_and(|protocols| protocols & bit != 0)
}

#[inline(always)]
fn dst_v4_steered(daddr: [u8; 4]) -> bool {
    STEERED_DST_V4.get(Key::new(32, daddr)).is_some()
}

#[inline(always)]
fn dst_v6_steered(daddr: [u8; 16]) -> bool {
    STEERED_DST_V6.get(Key::new(128, daddr)).is_some()
}

/// The source and destination ports (the first four bytes of both TCP and UDP headers), still
/// in network byte order, if the destination port is steered for `protocol`.
#[inline(always)]
fn steered_ports(ctx: &TcContext, offset: usize, protocol: Protocol) -> Option<[u16; 2]> {
    let ports = unsafe { *header::<[u16; 2]>(ctx, offset)? };
    port_steered(u16::from_be(ports[1]), protocol).then_some(ports)
}

/// The socket match and listener assignment for a parsed, steered flow of either family.
#[inline(always)]
fn steer_transport(
    ctx: &TcContext,
    protocol: Protocol,
    tuple: &mut bpf_sock_tuple,
    tuple_len: u32,
    ipv6: bool,
) -> Outcome {
    let tcp = protocol == Protocol::Tcp;
    let slot = ListenerSlot::of(tcp, ipv6);
    if tcp {
        steer_tcp(ctx, tuple, tuple_len, slot)
    } else {
        steer_udp(ctx, tuple, tuple_len, slot)
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
    // IHL is at most 15 words; the mask keeps the verifier's view of the offset bounded.
    let Some([sport, dport]) = steered_ports(ctx, l3 + (header_len & 0x3c), protocol) else {
        return (protocol, Outcome::Passed);
    };
    let daddr = [ip[16], ip[17], ip[18], ip[19]];
    if !dst_v4_steered(daddr) {
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
    let outcome = steer_transport(ctx, protocol, &mut tuple, tuple_len, false);
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
    let Some([sport, dport]) = steered_ports(ctx, l3 + IPV6_HEADER_LEN, protocol) else {
        return (protocol, Outcome::Passed);
    };
    let mut daddr = [0u8; 16];
    daddr.copy_from_slice(&ip[24..40]);
    if !dst_v6_steered(daddr) {
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
    let outcome = steer_transport(ctx, protocol, &mut tuple, tuple_len, true);
    if outcome == Outcome::SteeredNew {
        let mut saddr = [0u8; 16];
        saddr.copy_from_slice(&ip[8..24]);
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
    slot: ListenerSlot,
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
        if decision::socket_owns_flow(unsafe { (*own).state }) {
            return assign_and_release(ctx, own, Outcome::SteeredEstablished);
        }
        unsafe { bpf_sk_release(own as *mut c_void) };
    }
    let Some(listener) = listener(slot) else {
        return Outcome::NoListener;
    };
    if unsafe { (*listener).state } != decision::TCP_LISTEN {
        unsafe { bpf_sk_release(listener as *mut c_void) };
        return Outcome::NoListener;
    }
    assign_and_release(ctx, listener, Outcome::SteeredNew)
}

/// UDP socket match (tproxy's own per-flow sockets only), then listener.
#[inline(always)]
fn steer_udp(
    ctx: &TcContext,
    tuple: *mut bpf_sock_tuple,
    tuple_len: u32,
    slot: ListenerSlot,
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
    match listener(slot) {
        Some(listener) => assign_and_release(ctx, listener, Outcome::SteeredNew),
        None => Outcome::NoListener,
    }
}

/// The listener in `slot`, referenced: the caller must release it.
#[inline(always)]
fn listener(slot: ListenerSlot) -> Option<*mut bpf_sock> {
    let slot = slot as u32;
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
