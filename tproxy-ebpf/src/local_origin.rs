//! `cgroup/connect4` and `cgroup/connect6`: the local processes' half of steering (see
//! `tproxy_common::local_origin`). Attached to the selected cgroups, they run in the
//! connecting process before the kernel picks the socket's route, and give a socket whose
//! destination a steer rule for local connections takes (the rules under
//! `LOCAL_ORIGIN_IFINDEX`) tproxy's routing mark, so its packets go over `lo` to the tc
//! program there, which looks up the same rules. They never refuse a connect: the verdict is always "go on".

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_setsockopt,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext, Global,
};
use tproxy_common::{
    decision::{self, DestinationScope, RuleMatch},
    local_origin::{
        in_own_namespace, is_own_socket, mapped_ipv4, socket_mark_for, uid_selected, UidRange,
        LOCAL_ORIGIN_IFINDEX, MAX_UID_RANGES,
    },
};

use crate::{
    match_rules, OWN_SOCKET_MARK, ROUTING_MARK, ROUTING_MARK_MASK, RULES_DST_V4, RULES_DST_V6,
    RULES_SRC_V4, RULES_SRC_V6,
};

/// Set by the loader before load (`tproxy_common::local_origin::OWN_CGROUP_GLOBAL`).
#[unsafe(no_mangle)]
static OWN_CGROUP_ID: Global<u64> = Global::new(0);
/// Set by the loader before load (`tproxy_common::local_origin::OWN_NETNS_GLOBAL`).
#[unsafe(no_mangle)]
static OWN_NETNS_COOKIE: Global<u64> = Global::new(0);
/// Set by the loader before load (`tproxy_common::local_origin::UID_RANGES_GLOBAL`).
#[unsafe(no_mangle)]
static LOCAL_UID_RANGES: Global<[UidRange; MAX_UID_RANGES]> =
    Global::new([UidRange { first: 0, last: 0 }; MAX_UID_RANGES]);
/// Set by the loader before load (`tproxy_common::local_origin::UID_RANGES_LEN_GLOBAL`).
#[unsafe(no_mangle)]
static LOCAL_UID_RANGES_LEN: Global<u32> = Global::new(0);

/// The verdict that lets the connect go on.
const CONNECT_GOES_ON: i32 = 1;
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

#[cgroup_sock_addr(connect4)]
pub fn tproxy_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for its whole run; the
    // context is read one 4-byte field at a time, as the verifier wants.
    let addr = unsafe { ptr::read_volatile(&(*ctx.sock_addr).user_ip4) }.to_ne_bytes();
    if let Some(steered) = steered_ipv4(&ctx, addr) {
        mark_socket(&ctx, steered);
    }
    CONNECT_GOES_ON
}

#[cgroup_sock_addr(connect6)]
pub fn tproxy_connect6(ctx: SockAddrContext) -> i32 {
    let addr = destination_ipv6(&ctx);
    if let Some(steered) = steered_ipv6(&ctx, addr) {
        mark_socket(&ctx, steered);
    }
    CONNECT_GOES_ON
}

/// The IPv6 destination of a `connect6` or `sendmsg6` context.
#[inline(always)]
pub(crate) fn destination_ipv6(ctx: &SockAddrContext) -> [u8; 16] {
    let mut addr = [0u8; 16];
    for i in 0..4 {
        // SAFETY: as in `tproxy_connect4`.
        let word = unsafe { ptr::read_volatile(&(*ctx.sock_addr).user_ip6[i]) };
        addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    addr
}

/// The local-origin decision for a socket of the context's process going to `addr` (IPv4):
/// `None` when the socket is not this instance's to decide (see [`selected`]), otherwise
/// whether a steer rule takes it. The connect programs and the `sendmsg` ones
/// (`local_datagram`) ask only this, so they always agree.
#[inline(always)]
pub(crate) fn steered_ipv4(ctx: &SockAddrContext, addr: [u8; 4]) -> Option<bool> {
    if !selected(ctx) {
        return None;
    }
    Some(steers_ipv4(ctx, addr))
}

/// As [`steered_ipv4`], for an IPv6 destination (an IPv4-mapped one is decided by the IPv4
/// rules: a dual-stack socket sends IPv4 to it).
#[inline(always)]
pub(crate) fn steered_ipv6(ctx: &SockAddrContext, addr: [u8; 16]) -> Option<bool> {
    if !selected(ctx) {
        return None;
    }
    Some(match mapped_ipv4(addr) {
        Some(v4) => steers_ipv4(ctx, v4),
        None => steers_ipv6(ctx, addr),
    })
}

#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> *const bpf_sock_addr {
    ctx.sock_addr
}

/// The connecting socket's protocol (UDP), if it is one the rules are about.
#[inline(always)]
fn udp(ctx: &SockAddrContext) -> Option<bool> {
    // SAFETY: as in `tproxy_connect4`.
    match unsafe { ptr::read_volatile(&(*sock_addr(ctx)).protocol) } {
        IPPROTO_TCP => Some(false),
        IPPROTO_UDP => Some(true),
        _ => None,
    }
}

/// The destination port, host order.
#[inline(always)]
fn port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: as in `tproxy_connect4`. The port is in network order in the low 16 bits.
    u16::from_be(unsafe { ptr::read_volatile(&(*sock_addr(ctx)).user_port) } as u16)
}

/// The socket's current `SO_MARK`.
#[inline(always)]
fn current_mark(ctx: &SockAddrContext) -> u32 {
    // SAFETY: `sk` of a sock_addr context is the connecting socket, never null.
    unsafe { (*(*sock_addr(ctx)).__bindgen_anon_1.sk).mark }
}

/// Whether the connecting process and socket are this instance's to decide: in tproxy's
/// network namespace, not tproxy's own, and of a selected user (the cgroup was selected by
/// attaching the program there). A socket that is not is left exactly as it is, its mark
/// included: another program at the same hook (another tproxy's, for another namespace or
/// cgroup) may have just set it.
#[inline(always)]
fn selected(ctx: &SockAddrContext) -> bool {
    // SAFETY: the helper reads the namespace of the context's socket.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if !in_own_namespace(netns, OWN_NETNS_COOKIE.load()) {
        return false;
    }
    // SAFETY: helpers without arguments.
    let (cgroup, uid) = unsafe {
        (
            bpf_get_current_cgroup_id(),
            bpf_get_current_uid_gid() as u32,
        )
    };
    if is_own_socket(
        current_mark(ctx),
        OWN_SOCKET_MARK.load(),
        cgroup,
        OWN_CGROUP_ID.load(),
    ) {
        return false;
    }
    uid_selected(uid, &LOCAL_UID_RANGES.load(), LOCAL_UID_RANGES_LEN.load())
}

#[inline(always)]
fn steers_ipv4(ctx: &SockAddrContext, addr: [u8; 4]) -> bool {
    let Some(udp) = udp(ctx) else {
        return false;
    };
    // The tc program's answer for the packets this socket will send over `lo`: the local
    // connections' rules, whatever the source (they name none); the packets carry the
    // socket's mark, plus the routing mark's bits, which mark rules leave out.
    let rule = match_rules(
        &RULES_DST_V4,
        &RULES_SRC_V4,
        udp,
        port(ctx),
        addr,
        [0; 4],
        LOCAL_ORIGIN_IFINDEX,
        current_mark(ctx),
    );
    steers(rule, decision::ipv4_destination_scope(addr, false))
}

#[inline(always)]
fn steers_ipv6(ctx: &SockAddrContext, addr: [u8; 16]) -> bool {
    let Some(udp) = udp(ctx) else {
        return false;
    };
    let rule = match_rules(
        &RULES_DST_V6,
        &RULES_SRC_V6,
        udp,
        port(ctx),
        addr,
        [0; 16],
        LOCAL_ORIGIN_IFINDEX,
        current_mark(ctx),
    );
    steers(rule, decision::ipv6_destination_scope(addr, false))
}

/// Only destinations the relay may reach from elsewhere are marked (scoped as if from
/// outside): loopback destinations are on `lo` anyway, and a process connecting to a local
/// service is not leaving the host.
#[inline(always)]
fn steers(rule: RuleMatch, scope: DestinationScope) -> bool {
    matches!(rule, RuleMatch::Steer(_)) && matches!(scope, DestinationScope::Relayable)
}

#[inline(always)]
fn mark_socket(ctx: &SockAddrContext, steered: bool) {
    let Some(mut mark) = socket_mark_for(
        current_mark(ctx),
        steered,
        ROUTING_MARK.load(),
        ROUTING_MARK_MASK.load(),
    ) else {
        return;
    };
    // SAFETY: the option value is a u32 on our stack, of the length given. A failure leaves
    // the socket as it was: the connection goes direct.
    let _ = unsafe {
        bpf_setsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            SO_MARK,
            ptr::addr_of_mut!(mark) as *mut c_void,
            4,
        )
    };
}
