//! `cgroup/recvmsg4` and `cgroup/recvmsg6`, and the flows they follow with the `sendmsg` and
//! connect programs: the direction of a local socket's UDP datagrams, which rules for local
//! connections with `ct_direction` match (see `tproxy_common::local_udp`). Followed only
//! while a rule of the active generation asks; the verdict is always "go on".

use core::ptr;

use aya_ebpf::{
    helpers::{
        bpf_get_socket_cookie, bpf_ktime_get_ns,
        generated::{bpf_get_current_cgroup_id, bpf_get_netns_cookie},
    },
    macros::{cgroup_sock_addr, map},
    maps::LruHashMap,
    programs::SockAddrContext,
    EbpfContext, Global,
};
use tproxy_common::{
    local_origin::{in_own_namespace, is_own_socket},
    local_udp::{
        UdpFlow, UdpPeer, UdpTimeouts, DEFAULT_UDP_STREAM_TIMEOUT_NS, DEFAULT_UDP_TIMEOUT_NS,
        MAX_UDP_FLOWS,
    },
    maps::{CT_ASKED_BY_LOCAL, CT_ORIGINAL},
};

use crate::{
    active_generation,
    local_origin::{current_mark, destination_ipv6, OWN_CGROUP_ID, OWN_NETNS_COOKIE},
    MARK_RULES, OWN_SOCKET_MARK,
};

#[map]
static LOCAL_UDP_FLOWS: LruHashMap<UdpPeer, UdpFlow> =
    LruHashMap::with_max_entries(MAX_UDP_FLOWS, 0);

/// Set by the loader before load (`tproxy_common::local_udp::UDP_TIMEOUT_GLOBAL`).
#[unsafe(no_mangle)]
static UDP_TIMEOUT_NS: Global<u64> = Global::new(DEFAULT_UDP_TIMEOUT_NS);
/// Set by the loader before load (`tproxy_common::local_udp::UDP_STREAM_TIMEOUT_GLOBAL`).
#[unsafe(no_mangle)]
static UDP_STREAM_TIMEOUT_NS: Global<u64> = Global::new(DEFAULT_UDP_STREAM_TIMEOUT_NS);
/// The verdict that lets the receive go on.
const RECEIVE_GOES_ON: i32 = 1;
#[cgroup_sock_addr(recvmsg4)]
pub fn tproxy_recvmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: `sk` of a sock_addr context is the receiving socket, never null; `src_ip4` is
    // the address it is bound to (0: none).
    let bound = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).src_ip4 } != 0;
    if followed(&ctx, bound) {
        // SAFETY: a recvmsg4 program may read the peer's address and port (network order).
        let (addr, port) = unsafe {
            (
                ptr::read_volatile(&(*ctx.sock_addr).user_ip4),
                ptr::read_volatile(&(*ctx.sock_addr).user_port),
            )
        };
        let peer = UdpPeer::ipv4(cookie(&ctx), addr.to_ne_bytes(), port);
        step(&peer, true);
    }
    RECEIVE_GOES_ON
}

#[cgroup_sock_addr(recvmsg6)]
pub fn tproxy_recvmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in `tproxy_recvmsg4`, for `src_ip6`.
    let bound = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        (*sk).src_ip6[0] | (*sk).src_ip6[1] | (*sk).src_ip6[2] | (*sk).src_ip6[3]
    } != 0;
    if followed(&ctx, bound) {
        let peer = UdpPeer {
            cookie: cookie(&ctx),
            // The context's address (a connect's destination, here the sender); an IPv4
            // sender of a dual-stack socket comes mapped, as `UdpPeer::ipv4` keeps it.
            addr: destination_ipv6(&ctx),
            // SAFETY: as in `tproxy_recvmsg4`.
            port: unsafe { ptr::read_volatile(&(*ctx.sock_addr).user_port) },
            _pad: 0,
        };
        step(&peer, true);
    }
    RECEIVE_GOES_ON
}

/// The direction of a datagram a local socket sends (or of a UDP socket's connect) to `addr`
/// (IPv4-mapped for IPv4), when a rule of `generation` asks; a TCP connect is original. 0
/// when no rule asks.
#[inline(always)]
pub(crate) fn sent(ctx: &SockAddrContext, generation: u32, udp: bool, addr: [u8; 16]) -> u32 {
    if !udp {
        return CT_ORIGINAL;
    }
    if !asked(generation) {
        return 0;
    }
    let peer = UdpPeer {
        cookie: cookie(ctx),
        addr,
        // SAFETY: as in `tproxy_recvmsg4`; the destination port of a connect or sendmsg.
        port: unsafe { ptr::read_volatile(&(*ctx.sock_addr).user_port) },
        _pad: 0,
    };
    step(&peer, false)
}

/// Whether a received datagram's flow is followed: a rule asks, and the socket is of
/// tproxy's namespace (its selections and rules are about no other), not tproxy's own (the
/// relay's, which the rules never decide), and bound to no address (the sendmsg programs
/// leave the datagrams of such a socket as they are, so its flows would never be asked).
/// Whether the process is in a selection is left to the send.
#[inline(always)]
fn followed(ctx: &SockAddrContext, bound: bool) -> bool {
    // The cheap checks first: a bound socket and a generation no rule asks in (a reload
    // that removed the last such rule, before the programs are detached) need no helper.
    if bound || !asked(active_generation()) {
        return false;
    }
    // SAFETY: the helpers read the namespace of the context's socket and the current task's
    // cgroup.
    let (netns, cgroup) = unsafe {
        (
            bpf_get_netns_cookie(ctx.as_ptr()),
            bpf_get_current_cgroup_id(),
        )
    };
    in_own_namespace(netns, OWN_NETNS_COOKIE.load())
        && !is_own_socket(
            current_mark(ctx),
            OWN_SOCKET_MARK.load(),
            cgroup,
            OWN_CGROUP_ID.load(),
        )
}

#[inline(always)]
fn asked(generation: u32) -> bool {
    MARK_RULES
        .get(generation)
        .is_some_and(|marks| marks.ct_direction & CT_ASKED_BY_LOCAL != 0)
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper reads the cookie of the context's socket (making one if it has none).
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Moves `peer`'s flow on by one datagram, and answers its direction. Without room in the
/// map the flow is not kept, and its datagrams are each original, as a flow conntrack could
/// not track would be new.
#[inline(never)]
fn step(peer: &UdpPeer, from_peer: bool) -> u32 {
    // SAFETY: the helper takes no argument.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeouts = UdpTimeouts {
        unreplied_ns: UDP_TIMEOUT_NS.load(),
        stream_ns: UDP_STREAM_TIMEOUT_NS.load(),
    };
    let stored = LOCAL_UDP_FLOWS.get_ptr_mut(peer);
    // SAFETY: an entry of the map's value type; the hooks run with the socket locked, so
    // only one run of one socket's flows writes it at a time.
    let (flow, direction) = UdpFlow::step(
        stored.map(|stored| unsafe { *stored }),
        now,
        from_peer,
        timeouts,
    );
    match stored {
        // SAFETY: as above.
        Some(stored) => unsafe { *stored = flow },
        None => {
            let _ = LOCAL_UDP_FLOWS.insert(peer, &flow, 0);
            // A lookup sets the entry's reference bit, which an insert does not: without it
            // a new flow is the kernel LRU's first choice to push out, ahead of every flow
            // looked up since (a server reading a burst of requests would lose them before
            // it answers).
            let _ = LOCAL_UDP_FLOWS.get_ptr(peer);
        }
    }
    direction
}
