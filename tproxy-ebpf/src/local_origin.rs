//! `cgroup/connect4` and `cgroup/connect6`: the local processes' half of steering (see
//! `tproxy_common::local_origin`). Attached to the selected cgroups (or the root), they run
//! in the connecting process before the kernel picks the socket's route. Each selection the
//! process is in has its rules (under `selection_ifindex(k)`), and the best-ranked answer
//! among them wins, as among any rules. A socket whose destination a steer rule takes gets
//! tproxy's routing mark, so its packets go over `lo`, and the rule's listener is recorded in
//! the socket's storage, where the tc program on `lo` (`loopback`) finds it. They never
//! refuse a connect: the verdict is always "go on". A process in two cgroups the programs
//! are attached to runs them twice; the second run decides as the first did.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_F_NO_PREALLOC},
    btf_maps::SkStorage,
    helpers::generated::{
        bpf_get_cgroup_classid, bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id,
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_setsockopt, bpf_sk_release,
    },
    macros::{btf_map, cgroup_sock_addr, map},
    maps::{lpm_trie::Key, Array, LpmTrie},
    programs::SockAddrContext,
    EbpfContext, Global,
};
use tproxy_common::{
    decision::{self, match_mark_rules, rule_match, DestinationScope, RuleMatch},
    local_origin::{
        in_own_namespace, ipv4_mapped, is_own_socket, mapped_ipv4, route_selected,
        selection_ifindex, socket_mark_for, LocalDecision, Selection, MAX_SELECTIONS, ROUTE_BROADCAST,
    },
    maps::{listener_slot, ListenerSlot, MarkedPacket, Verdict, EXTERNAL_NONE},
};

use crate::{
    active_generation, listener, local_udp, match_rules_into, EXTERNAL_LISTENERS, FAIL_CLOSED,
    MARK_RULES, OWN_SOCKET_MARK, ROUTING_MARK, ROUTING_MARK_MASK, RULES_DST_V4, RULES_DST_V6,
    RULES_SRC_V4, RULES_SRC_V6,
};

/// Filled by the loader before the programs are attached
/// (`tproxy_common::local_origin::SELECTIONS_MAP`).
#[map]
static LOCAL_SELECTIONS: Array<Selection> = Array::with_max_entries(MAX_SELECTIONS as u32, 0);
/// The host's routes by destination, with their out-interface bits
/// (`tproxy_common::local_origin::ROUTES_V4_MAP`); sized and filled by the loader.
#[map]
static LOCAL_ROUTES_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(1, BPF_F_NO_PREALLOC);
/// As `LOCAL_ROUTES_V4`, for IPv6 destinations.
#[map]
static LOCAL_ROUTES_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(1, BPF_F_NO_PREALLOC);
/// Each steered socket's [`LocalDecision`], for the tc program on `lo`.
#[btf_map]
pub(crate) static LOCAL_DECISIONS: SkStorage<LocalDecision> = SkStorage::new();

/// Set by the loader before load (`tproxy_common::local_origin::STEER_LOOPBACK_GLOBAL`).
#[unsafe(no_mangle)]
static STEER_LOOPBACK: Global<u32> = Global::new(0);
/// Set by the loader before load (`tproxy_common::local_origin::OWN_CGROUP_GLOBAL`).
#[unsafe(no_mangle)]
pub(crate) static OWN_CGROUP_ID: Global<u64> = Global::new(0);
/// Set by the loader before load (`tproxy_common::local_origin::OWN_NETNS_GLOBAL`).
#[unsafe(no_mangle)]
pub(crate) static OWN_NETNS_COOKIE: Global<u64> = Global::new(0);
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
    if let Some(listener) = steered_ipv4(&ctx, addr) {
        mark_socket(&ctx, listener.is_some());
        if let Some(listener) = listener {
            record(&ctx, LocalDecision::new(&addr, port(&ctx), listener));
        }
    }
    CONNECT_GOES_ON
}

#[cgroup_sock_addr(connect6)]
pub fn tproxy_connect6(ctx: SockAddrContext) -> i32 {
    let addr = destination_ipv6(&ctx);
    if let Some(listener) = steered_ipv6(&ctx, addr) {
        mark_socket(&ctx, listener.is_some());
        if let Some(listener) = listener {
            record(&ctx, decision_ipv6(addr, port(&ctx), listener));
        }
    }
    CONNECT_GOES_ON
}

/// The record of a steer for an IPv6 destination: an IPv4-mapped one's packets are IPv4.
#[inline(always)]
pub(crate) fn decision_ipv6(addr: [u8; 16], port: u16, listener: u32) -> LocalDecision {
    match mapped_ipv4(addr) {
        Some(v4) => LocalDecision::new(&v4, port, listener),
        None => LocalDecision::new(&addr, port, listener),
    }
}

/// Keeps `decision` in the socket's storage, for the tc program on `lo`. Without it (no
/// memory), that program finds no listener for the socket's packets, and its connection
/// fails, as it would with the listener gone.
#[inline(always)]
pub(crate) fn record(ctx: &SockAddrContext, decision: LocalDecision) {
    // SAFETY: the context's socket is valid for the program's run; the storage returned is
    // the socket's own, of the map's value type.
    unsafe {
        let stored = LOCAL_DECISIONS.get_or_insert_ptr_mut(ctx, None);
        if !stored.is_null() {
            *stored = decision;
        }
    }
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
/// `None` when the socket is not this instance's to decide (see [`decide`]), otherwise the
/// listener of the steer rule that takes it, if one does. The connect programs and the
/// `sendmsg` ones (`local_datagram`) ask only this, so they always agree.
#[inline(always)]
pub(crate) fn steered_ipv4(ctx: &SockAddrContext, addr: [u8; 4]) -> Option<Option<u32>> {
    let udp = udp(ctx);
    let peer = ipv4_mapped(addr);
    let generation = active_generation();
    let routes = route_bits(&addr);
    let rule = decide(ctx, udp, &peer, (generation, routes), |ifindex, mark, pending| {
        if let Some(udp) = udp {
            match_rules_into::<4, false>(
                pending.generation,
                &RULES_DST_V4,
                &RULES_SRC_V4,
                udp,
                port(ctx),
                addr,
                [0; 4],
                ifindex,
                mark,
                &mut pending.best,
            );
            pending.packet.mark = mark;
            pending.packet.ifindex = ifindex;
            match_local_mark_rules(pending, &addr, udp, port(ctx), bound_port(ctx));
        }
    })?;
    let slot = ListenerSlot::of(udp != Some(true), false);
    let steered = steers(rule, slot, |loopback_too| {
        decision::ipv4_destination_scope(addr, loopback_too)
    })
    .filter(|_| routes & ROUTE_BROADCAST == 0);
    Some(steered.filter(|listener| served(*listener, slot)))
}

/// As [`steered_ipv4`], for an IPv6 destination (an IPv4-mapped one is decided by the IPv4
/// rules: a dual-stack socket sends IPv4 to it).
#[inline(always)]
pub(crate) fn steered_ipv6(ctx: &SockAddrContext, addr: [u8; 16]) -> Option<Option<u32>> {
    if let Some(v4) = mapped_ipv4(addr) {
        return steered_ipv4(ctx, v4);
    }
    let udp = udp(ctx);
    let generation = active_generation();
    let routes = route_bits(&addr);
    let rule = decide(ctx, udp, &addr, (generation, routes), |ifindex, mark, pending| {
        if let Some(udp) = udp {
            match_rules_into::<16, false>(
                pending.generation,
                &RULES_DST_V6,
                &RULES_SRC_V6,
                udp,
                port(ctx),
                addr,
                [0; 16],
                ifindex,
                mark,
                &mut pending.best,
            );
            pending.packet.mark = mark;
            pending.packet.ifindex = ifindex;
            match_local_mark_rules(pending, &addr, udp, port(ctx), bound_port(ctx));
        }
    })?;
    let slot = ListenerSlot::of(udp != Some(true), true);
    let steered = steers(rule, slot, |loopback_too| {
        decision::ipv6_destination_scope(addr, loopback_too)
    });
    Some(steered.filter(|listener| served(*listener, slot)))
}

/// Whether a steer to `listener` (its `kind` of slot) would be taken on `lo`. Fail-open: only
/// while the listener has a socket in the socket map, or is another program's (external);
/// the connect and sendmsg programs outlive the instance with `--pin`, and a socket they
/// steered while no instance runs would find nothing on `lo` (its connect would time out),
/// where a forwarded flow passes on. Fail-closed: always, and the loopback program drops
/// what no listener takes, as the main program drops a forwarded flow's packets.
#[inline(always)]
fn served(listener_index: u32, kind: ListenerSlot) -> bool {
    if FAIL_CLOSED.load() != 0 {
        return true;
    }
    let slot = listener_slot(listener_index, kind);
    if let Some(socket) = listener(slot) {
        // SAFETY: releases the reference the socket map lookup took.
        unsafe { bpf_sk_release(socket as *mut c_void) };
        return true;
    }
    is_external(slot)
}

/// Whether the listener in `slot` is another program's (an external proxy).
#[inline(always)]
fn is_external(slot: u32) -> bool {
    EXTERNAL_LISTENERS
        .get(slot)
        .is_some_and(|external| external.kind != EXTERNAL_NONE)
}

/// A decision in the making, in the socket's own storage: the verifier does not follow what
/// a map value holds, so the best answer so far kept there, rather than on the stack, does
/// not multiply the states it walks by the answers of each selection before. The socket's
/// storage, not a per-CPU scratch: these programs may be preempted (only migration is
/// disabled), and another task's run on the same CPU would overwrite a shared one between
/// the reset and the reading, handing one process's answer to another's socket. The connect
/// and `sendmsg` hooks run with the socket locked, so two runs on one socket never
/// interleave, and nothing else touches its entry.
/// The packet the mark stage looks at is kept there too, not in the classifier's per-CPU
/// scratch, for the same reason.
#[derive(Clone, Copy, Default)]
struct Pending {
    best: Verdict,
    selected: u32,
    /// The rules' generation, read once per decision: a reload between the selections'
    /// lookups (or between the lookups and the mark stage) would otherwise compare the
    /// answers of two rule sets by rank.
    generation: u32,
    packet: MarkedPacket,
}

/// The rules tried one by one (those with a mark or a source port) for a local connection
/// to `addr`, into `pending.best`: the caller has written the socket's mark and its
/// selection's index (as the interface) into `pending.packet`. No source address: not chosen
/// yet (rules for local connections name none). The source port is the one the socket is
/// bound to (`sport`, 0 while unbound: a connecting socket's ephemeral port is picked after
/// this runs; a sending one has it already). A function of its own, taking the address by
/// reference: inlined, the packet's values would take stack beside the other stages'.
#[inline(never)]
fn match_local_mark_rules<const N: usize>(
    pending: &mut Pending,
    addr: &[u8; N],
    udp: bool,
    port: u16,
    sport: u16,
) {
    let Some(marks) = MARK_RULES
        .get(pending.generation)
        .filter(|marks| marks.len != 0)
    else {
        return;
    };
    let packet = &mut pending.packet;
    packet.set(packet.mark, udp, port, *addr, [0; N], packet.ifindex);
    packet.sport = u32::from(sport);
    match_mark_rules::<true>(marks, packet, &mut pending.best);
}

/// The out-interface bits of the route to `addr` (0 when no route is mirrored for it).
#[inline(always)]
fn route_bits<const N: usize>(addr: &[u8; N]) -> u32 {
    let found = if N == 4 {
        let mut v4 = [0u8; 4];
        v4.copy_from_slice(&addr[..4]);
        LOCAL_ROUTES_V4.get(&Key::new(32, v4))
    } else {
        let mut v6 = [0u8; 16];
        v6.copy_from_slice(&addr[..16]);
        LOCAL_ROUTES_V6.get(&Key::new(128, v6))
    };
    found.copied().unwrap_or(0)
}

#[btf_map]
static LOCAL_PENDING: SkStorage<Pending> = SkStorage::new();

/// The answer of the rules of `generation` for the context's process, by `ask(ifindex,
/// mark, pending)` for each selection the process is in whose out-interface bits the
/// destination's `routes` have (read after the generation: a rule set's bits are mirrored
/// before it is put in force), the best-ranked answer of all, or `None` when the socket is
/// not this instance's to decide: not in tproxy's network namespace, tproxy's own, bound to
/// an interface, or of a process in no selection. Such a socket is left as it is, its mark included (another
/// program at the same hook, another tproxy's for another namespace or cgroup, may have just
/// set it), except that a socket this instance steered earlier is let go (`release`): a
/// reload may have removed its selection, or an unselected process inherited it. A socket
/// whose storage cannot be made (no memory) is let go likewise: it goes direct.
#[inline(always)]
fn decide(
    ctx: &SockAddrContext,
    udp: Option<bool>,
    peer: &[u8; 16],
    (generation, routes): (u32, u32),
    ask: impl Fn(u32, u32, &mut Pending),
) -> Option<RuleMatch> {
    // SAFETY: the helper reads the namespace of the context's socket.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if !in_own_namespace(netns, OWN_NETNS_COOKIE.load()) {
        return None;
    }
    // SAFETY: helpers without arguments.
    let (cgroup, ids) = unsafe { (bpf_get_current_cgroup_id(), bpf_get_current_uid_gid()) };
    // The helper answers the group id in the upper half, the user id in the lower.
    let (uid, gid) = (ids as u32, (ids >> 32) as u32);
    // The socket's mark, which the mark rules match (theirs leave the routing mark's bits out).
    let mark = current_mark(ctx);
    if is_own_socket(mark, OWN_SOCKET_MARK.load(), cgroup, OWN_CGROUP_ID.load()) {
        return None;
    }
    // A socket bound to an interface leaves by it whatever its mark: the kernel's route
    // lookup keeps to that interface, so the routing mark cannot bring it to `lo` (nor can
    // iptables' OUTPUT recipe). Left alone, it is not marked for nothing.
    if bound_device(ctx) != 0 {
        release(ctx);
        return None;
    }
    // SAFETY: the context's socket is valid for the program's run; the storage returned is
    // the socket's own, of the map's value type, and only runs on this socket (serialized by
    // its lock) use it.
    let pending = unsafe { LOCAL_PENDING.get_or_insert_ptr_mut(ctx, None) };
    if pending.is_null() {
        release(ctx);
        return None;
    }
    // SAFETY: as above.
    let pending = unsafe { &mut *pending };
    *pending = Pending {
        generation,
        ..Pending::default()
    };
    // Ahead of the selections' loop, which has no room for it in the verifier's walk: the
    // datagrams of processes no selection takes are followed too (their flows take places
    // in the map that the selected processes' flows could use).
    if let Some(udp) = udp {
        pending.packet.ct_direction = local_udp::sent(ctx, pending.generation, udp, *peer);
    }
    // SAFETY: in a sock_addr program the helper takes no argument (the kernel's variant for
    // the current task ignores the register) and answers the task's net_cls class id, 0
    // outside any class.
    let classid = unsafe { bpf_get_cgroup_classid(ptr::null_mut()) };
    // SAFETY: a helper taking a plain level; it answers 0 for a level below the process's.
    let ancestor = |level: u32| unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
    for k in 0..MAX_SELECTIONS as u32 {
        let Some(selection) = LOCAL_SELECTIONS.get(k) else {
            break;
        };
        if selection.selects(uid, gid, classid, ancestor) {
            pending.selected = 1;
            let required = MARK_RULES
                .get(pending.generation)
                .map_or(0, |rules| rules.selection_routes[k as usize]);
            if route_selected(required, routes) {
                ask(selection_ifindex(k), mark, pending);
            }
        }
    }
    if pending.selected == 0 {
        release(ctx);
        return None;
    }
    Some(rule_match(&pending.best))
}

/// Lets go of a socket this instance steered: when it carries the routing mark and this
/// instance's record of a steer (another instance's records are in that instance's map), the
/// record is voided and the mark's bits cleared, so that what it sends from now on goes
/// direct rather than over `lo`, where no record would take it. A socket without the mark
/// keeps its record: the `sendmsg` programs steer by source address, and a datagram they
/// steered may still be on its way to `lo`, where it needs the record.
#[inline(always)]
pub(crate) fn release(ctx: &SockAddrContext) {
    let Some(mut unmarked) = socket_mark_for(
        current_mark(ctx),
        false,
        ROUTING_MARK.load(),
        ROUTING_MARK_MASK.load(),
    ) else {
        return;
    };
    // SAFETY: as in `record`; no storage is made for a socket that has none.
    unsafe {
        let stored = LOCAL_DECISIONS.get_ptr_mut(ctx);
        if stored.is_null() || (*stored).listener == 0 {
            return;
        }
        (*stored).listener = 0;
    }
    set_mark(ctx, &mut unmarked);
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
pub(crate) fn port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: as in `tproxy_connect4`. The port is in network order in the low 16 bits.
    u16::from_be(unsafe { ptr::read_volatile(&(*sock_addr(ctx)).user_port) } as u16)
}

/// The local port the socket is bound to, host order; 0 for none yet.
#[inline(always)]
fn bound_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: as in `current_mark`. `src_port` is in host order.
    unsafe { (*(*sock_addr(ctx)).__bindgen_anon_1.sk).src_port as u16 }
}

/// The interface the socket is bound to (`SO_BINDTODEVICE`), 0 for none.
#[inline(always)]
fn bound_device(ctx: &SockAddrContext) -> u32 {
    // SAFETY: as in `current_mark`.
    unsafe { (*(*sock_addr(ctx)).__bindgen_anon_1.sk).bound_dev_if }
}

/// The socket's current `SO_MARK`.
#[inline(always)]
pub(crate) fn current_mark(ctx: &SockAddrContext) -> u32 {
    // SAFETY: `sk` of a sock_addr context is the connecting socket, never null.
    unsafe { (*(*sock_addr(ctx)).__bindgen_anon_1.sk).mark }
}

/// The listener of a steer rule whose destination may be steered (the scope the program on
/// `lo` allows too): not multicast, broadcast or link-local, and a loopback destination only
/// to an external proxy with `steer_loopback`, as an iptables recipe sent it to its proxy
/// (tproxy's own relay would only connect to it as the app does).
#[inline(always)]
fn steers(
    rule: RuleMatch,
    kind: ListenerSlot,
    scope: impl Fn(bool) -> DestinationScope,
) -> Option<u32> {
    let RuleMatch::Steer(listener) = rule else {
        return None;
    };
    let loopback_too = STEER_LOOPBACK.load() != 0 && is_external(listener_slot(listener, kind));
    match scope(loopback_too) {
        DestinationScope::Relayable => Some(listener),
        _ => None,
    }
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
    set_mark(ctx, &mut mark);
}

#[inline(always)]
fn set_mark(ctx: &SockAddrContext, mark: &mut u32) {
    // SAFETY: the option value is a u32 of the length given. A failure leaves the mark as it
    // was (a connection it would have steered goes direct).
    let _ = unsafe {
        bpf_setsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            SO_MARK,
            ptr::from_mut(mark) as *mut c_void,
            4,
        )
    };
}
