//! The tc program on `lo` while local origin is steered (attached there instead of
//! `tproxy_ingress`): a packet on `lo` from a local process that the connect or sendmsg
//! programs steered. It cannot tell which process sent it (a packet on `lo` has no socket any
//! more), so it cannot ask the rules, which differ by selection; the connect or sendmsg
//! program recorded its decision in the client socket's storage (`LocalDecision`), and this
//! program finds the client socket by the packet's tuple turned round (a SYN from
//! 127.0.0.1:sport to D:dport comes from the socket at 127.0.0.1:sport connected to D:dport),
//! and takes the packet to the recorded listener when the record is for the packet's
//! destination. Everything else (parsing, the flow's own socket, the listener, the assign) is
//! the main program's, with its own stack budget.
//!
//! Without a record for its destination, a packet is handled as a bypass rule would have it:
//! it goes to a socket that owns its flow (the relay's, for the last packets of a client
//! socket gone to TIME_WAIT), or on as it is.

use core::{ffi::c_void, mem, ptr};

use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as TupleV4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as TupleV6, BPF_F_CURRENT_NETNS,
    },
    helpers::generated::{
        bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release, bpf_sk_storage_get,
    },
    macros::classifier,
    programs::TcContext,
    EbpfContext,
};
use tproxy_common::{decision::RuleMatch, local_origin::LocalDecision};

use crate::{ipv6_words, local_origin::LOCAL_DECISIONS};

#[classifier]
pub fn tproxy_loopback(ctx: TcContext) -> i32 {
    let (protocol, outcome) = crate::steer::<true>(&ctx);
    crate::finish(protocol, outcome)
}

/// The decision recorded for an IPv4 packet on `lo` (ports in network order). `tuple`: the
/// caller's, for the lookup (the stack has no room for another).
#[inline(always)]
pub(crate) fn recorded_v4(
    ctx: &TcContext,
    udp: bool,
    tuple: &mut bpf_sock_tuple,
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: u16,
    dport: u16,
) -> RuleMatch {
    tuple.__bindgen_anon_1.ipv4 = TupleV4 {
        saddr: u32::from_ne_bytes(daddr),
        daddr: u32::from_ne_bytes(saddr),
        sport: dport,
        dport: sport,
    };
    let len = mem::size_of::<TupleV4>() as u32;
    let port = u16::from_be(dport);
    // The turned tuple's source is the packet's destination: compared from there, without a
    // copy.
    let check = |record: &LocalDecision, tuple: &bpf_sock_tuple| {
        // SAFETY: written as IPv4 above.
        record.listener_for_v4(unsafe { tuple.__bindgen_anon_1.ipv4.saddr }, port)
    };
    recorded(ctx, udp, tuple, len, check)
}

/// As [`recorded_v4`], for an IPv6 packet.
#[inline(always)]
pub(crate) fn recorded_v6(
    ctx: &TcContext,
    udp: bool,
    tuple: &mut bpf_sock_tuple,
    saddr: &[u8; 16],
    daddr: &[u8; 16],
    sport: u16,
    dport: u16,
) -> RuleMatch {
    tuple.__bindgen_anon_1.ipv6 = TupleV6 {
        saddr: ipv6_words(daddr),
        daddr: ipv6_words(saddr),
        sport: dport,
        dport: sport,
    };
    let len = mem::size_of::<TupleV6>() as u32;
    let port = u16::from_be(dport);
    let check = |record: &LocalDecision, tuple: &bpf_sock_tuple| {
        // SAFETY: written as IPv6 above.
        record.listener_for_v6(unsafe { &tuple.__bindgen_anon_1.ipv6.saddr }, port)
    };
    recorded(ctx, udp, tuple, len, check)
}

/// The client socket's recorded listener for the packet, by `check`, as a rule match. TCP
/// and UDP are looked up apart: each lookup's socket is released on its own path.
#[inline(always)]
fn recorded(
    ctx: &TcContext,
    udp: bool,
    tuple: &mut bpf_sock_tuple,
    len: u32,
    check: impl Fn(&LocalDecision, &bpf_sock_tuple) -> Option<u32>,
) -> RuleMatch {
    let netns = BPF_F_CURRENT_NETNS as u64;
    let listener = if udp {
        // SAFETY: `tuple` is a tuple of `len` bytes on our stack.
        let client = unsafe { bpf_sk_lookup_udp(ctx.as_ptr(), tuple, len, netns, 0) };
        recorded_listener(client, tuple, &check)
    } else {
        // SAFETY: as above.
        let client = unsafe { bpf_sk_lookup_tcp(ctx.as_ptr(), tuple, len, netns, 0) };
        recorded_listener(client, tuple, &check)
    };
    match listener {
        Some(listener) => RuleMatch::Steer(listener),
        None => RuleMatch::Bypass,
    }
}

/// What `client`'s record says for the packet; releases `client` (when not null).
#[inline(always)]
fn recorded_listener(
    client: *mut bpf_sock,
    tuple: &bpf_sock_tuple,
    check: &impl Fn(&LocalDecision, &bpf_sock_tuple) -> Option<u32>,
) -> Option<u32> {
    if client.is_null() {
        return None;
    }
    // SAFETY: `client` is a referenced full socket from the lookup; the storage returned, if
    // any, is its own, of the map's value type, and is read before the socket is released.
    let record = unsafe {
        bpf_sk_storage_get(
            ptr::addr_of!(LOCAL_DECISIONS) as *mut c_void,
            client as *mut c_void,
            ptr::null_mut(),
            0,
        )
    } as *const LocalDecision;
    let listener = match record.is_null() {
        true => None,
        // SAFETY: as above.
        false => check(unsafe { &*record }, tuple),
    };
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(client as *mut c_void) };
    listener
}
