//! `cgroup/sendmsg4` and `cgroup/sendmsg6`: the datagrams that selected processes send from
//! unconnected UDP sockets (`sendto`). The socket's mark cannot steer them: the kernel has
//! copied it into the datagram before these programs run, and one socket may send to
//! steered and unsteered destinations alike. What these programs may set per datagram, before
//! the route lookup, is its source address: a datagram to a destination a steer rule takes
//! gets 127.84.80.1 (`::1`), the policy rule `from 127.84.80.1 iif lo` (`from ::1`) sends it to
//! tproxy's `local … dev lo` route, and the tc program on `lo` hands it to the listener. The
//! relay answers from the original destination to the loopback address, where the socket,
//! bound to the wildcard, receives it with the peer it sent to. Other datagrams are left
//! exactly as they are.
//!
//! The rule's listener is recorded in the socket's storage with the datagram's destination
//! (`LocalDecision`), for the tc program on `lo`, which takes a datagram there only when its
//! destination is the record's. The record is the socket's last steered datagram's: when
//! threads of one socket send to two steered destinations at once, one may overwrite the
//! other's record before that datagram reaches `lo`; that datagram then finds no listener
//! and is lost, as a datagram may be (the next one of its flow finds the relay's socket, or
//! its own record).
//!
//! Only a datagram whose source is still unset is rewritten: a socket bound to an address,
//! connected, or naming its source (`IP_PKTINFO`) has chosen it, and its datagrams go as
//! they would have. The verdict is always "go on".

use core::ptr;

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use tproxy_common::local_origin::{mapped_ipv4, LOOPBACK_SOURCE_V4, LOOPBACK_SOURCE_V6};

use crate::local_origin::{
    decision_ipv6, destination_ipv6, port, record, release, steered_ipv4, steered_ipv6,
};
use tproxy_common::local_origin::LocalDecision;

/// The verdict that lets the datagram go on.
const SEND_GOES_ON: i32 = 1;
/// The kernel's `TCP_ESTABLISHED`, a connected UDP socket's state.
const CONNECTED: u32 = 1;

/// A socket a connect steered and `connect(AF_UNSPEC)` disconnected (no program runs for
/// that) keeps the routing mark; sending from it to an unsteered destination lets it go
/// (`release`). The kernel has copied the mark into this datagram already, so the new mark
/// applies from the next one: this datagram goes over `lo`, where no record takes it, and is
/// lost. A socket still connected keeps its mark: a `sendto` elsewhere does not undo its
/// steered connection.
#[inline(always)]
fn release_disconnected(ctx: &SockAddrContext) {
    // SAFETY: `sk` of a sock_addr context is the sending socket, never null.
    let state = unsafe { ptr::read_volatile(&(*(*ctx.sock_addr).__bindgen_anon_1.sk).state) };
    if state != CONNECTED {
        release(ctx);
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn tproxy_sendmsg4(ctx: SockAddrContext) -> i32 {
    let sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for its whole run; its
    // fields are read and written 4 bytes at a time, as the verifier wants. A sendmsg4
    // program may read and set `msg_src_ip4` (network order).
    unsafe {
        if ptr::read_volatile(&(*sock_addr).msg_src_ip4) != 0 {
            return SEND_GOES_ON;
        }
        let addr = ptr::read_volatile(&(*sock_addr).user_ip4).to_ne_bytes();
        match steered_ipv4(&ctx, addr) {
            Some(Some(listener)) => {
                record(&ctx, LocalDecision::new(&addr, port(&ctx), listener));
                ptr::write_volatile(
                    &mut (*sock_addr).msg_src_ip4,
                    u32::from_ne_bytes(LOOPBACK_SOURCE_V4),
                );
            }
            Some(None) => release_disconnected(&ctx),
            None => {}
        }
    }
    SEND_GOES_ON
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tproxy_sendmsg6(ctx: SockAddrContext) -> i32 {
    let sock_addr = ctx.sock_addr;
    // SAFETY: as in `tproxy_sendmsg4`, for `msg_src_ip6`.
    unsafe {
        for i in 0..4 {
            if ptr::read_volatile(&(*sock_addr).msg_src_ip6[i]) != 0 {
                return SEND_GOES_ON;
            }
        }
    }
    let addr = destination_ipv6(&ctx);
    // A mapped destination is sent as IPv4 (the kernel runs the sendmsg4 program for it);
    // `::1` would be the wrong family's source.
    if mapped_ipv4(addr).is_some() {
        return SEND_GOES_ON;
    }
    let listener = match steered_ipv6(&ctx, addr) {
        Some(Some(listener)) => listener,
        Some(None) => {
            release_disconnected(&ctx);
            return SEND_GOES_ON;
        }
        None => return SEND_GOES_ON,
    };
    record(&ctx, decision_ipv6(addr, port(&ctx), listener));
    for i in 0..4 {
        let word = &LOOPBACK_SOURCE_V6[i * 4..i * 4 + 4];
        // SAFETY: as above.
        unsafe {
            ptr::write_volatile(
                &mut (*sock_addr).msg_src_ip6[i],
                u32::from_ne_bytes([word[0], word[1], word[2], word[3]]),
            )
        };
    }
    SEND_GOES_ON
}
