//! The in-kernel TCP relay: a stream-verdict program on the relay's socket hash. Each relayed
//! socket is in [`RELAY_PEERS`] under the cookie of the *other* socket of its connection, so a
//! socket's own cookie finds its peer in one lookup, and whatever it receives is sent out of
//! the peer (`bpf_sk_redirect_hash` without `BPF_F_INGRESS`: the peer's egress). Userspace sets
//! the pairs up, watches for FIN, RST and idleness, and takes them out again.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action,
    helpers::generated::bpf_get_socket_cookie,
    macros::map,
    macros::stream_verdict,
    maps::{LruHashMap, SockHash},
    programs::SkBuffContext,
};
use tproxy_common::maps::RelayPeerKey;

// The loader sizes it for the connections it may relay.
#[map]
static RELAY_PEERS: SockHash<RelayPeerKey> = SockHash::with_max_entries(1, 0);
// A record is read only while its pair is being made (microseconds), and only sockets whose
// bytes were dropped get one: the oldest are let go when it is full.
#[map]
static RELAY_DROPS: LruHashMap<RelayPeerKey, u8> = LruHashMap::with_max_entries(1024, 0);

#[stream_verdict]
pub fn tproxy_relay_verdict(ctx: SkBuffContext) -> u32 {
    // A FIN arrives as an skb without bytes. Redirected, it would reach the peer's send path
    // after userspace shut that down (the FIN is passed on from userspace, once the bytes
    // before it are written) and fail it with EPIPE; there is nothing in it to send.
    if ctx.len() == 0 {
        return sk_action::SK_DROP;
    }
    // SAFETY: the helper only reads the socket the skb was received on.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let verdict = RELAY_PEERS.redirect_skb(&ctx, cookie, 0) as u32;
    // The peer is not in the map (yet, or any more): the bytes are dropped. The socket is
    // marked by its own cookie, so that the loader, which looks for its pair's two marks once
    // the pair is in, cannot take another pair's drop for its own.
    if verdict != sk_action::SK_PASS {
        let _ = RELAY_DROPS.insert(cookie, 1u8, 0);
    }
    verdict
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
