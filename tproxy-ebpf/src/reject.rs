//! The `reject` action: the packet becomes its own answer (a TCP reset, an ICMP or ICMPv6 port
//! unreachable; built by `tproxy_common::reject`) and goes back out of the interface it came
//! in on, from the address it was sent to. What gets no answer (see the README's
//! "Rejecting") is dropped.

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, TC_ACT_SHOT},
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    },
    macros::map,
    maps::{LruHashMap, PerCpuArray},
    programs::TcContext,
};
use tproxy_common::reject::{
    self, AnswerBudget, QUOTE_IPV4_LEN, QUOTE_IPV6_LEN, RESET_IPV4_LEN, RESET_IPV6_LEN, UNREACHABLE_IPV4_LEN,
    UNREACHABLE_IPV6_LEN,
};

use crate::{ETH_HEADER_LEN, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, IPV6_HEADER_LEN};

/// `skb->pkt_type` of a frame sent to this host's link-layer address.
const PACKET_HOST: u32 = 0;
/// `bpf_map_update_elem` flag: only if the key is not there yet.
const BPF_NOEXIST: u64 = 1;

/// What the answer is built from and into: in a map, as the classifier's stack has no room.
#[repr(C)]
pub struct Scratch {
    ipv4: [u8; 20],
    ipv6: [u8; IPV6_HEADER_LEN],
    tcp: [u8; 20],
    quote_v4: [u8; QUOTE_IPV4_LEN],
    quote_v6: [u8; QUOTE_IPV6_LEN],
    reset_v4: [u8; RESET_IPV4_LEN],
    reset_v6: [u8; RESET_IPV6_LEN],
    unreachable_v4: [u8; UNREACHABLE_IPV4_LEN],
    unreachable_v6: [u8; UNREACHABLE_IPV6_LEN],
}

#[map]
static REJECT_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
/// Each CPU's budget of ICMP answers (see `tproxy_common::reject::take_icmp_answer`).
#[map]
static ICMP_ANSWER_BUDGET: PerCpuArray<AnswerBudget> = PerCpuArray::with_max_entries(1, 0);
/// Each destination's budget, by its address (an IPv4 one mapped into IPv6).
#[map]
static ICMP_ANSWER_BUDGETS: LruHashMap<[u8; 16], AnswerBudget> =
    LruHashMap::with_max_entries(reject::ICMP_ANSWER_DESTINATIONS, 0);

/// Answers the packet and returns what tc does next: redirect the answer, or drop a packet
/// that gets none. Its headers are parsed again rather than carried out of `steer`, whose
/// stack has no room: only rejected packets pay for it.
#[inline(always)]
pub fn answer(ctx: &TcContext) -> i32 {
    let answered = crate::link_layer(ctx).and_then(|(ethertype, l3)| answered(ctx, ethertype, l3));
    if answered.is_none() {
        return TC_ACT_SHOT as i32;
    }
    // SAFETY: plain helper call; the packet goes out of the device it arrived on.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
}

/// Writes the answer over the packet; `None`: the packet is not answered (and may be cut).
#[inline(always)]
fn answered(ctx: &TcContext, ethertype: u16, l3: usize) -> Option<()> {
    // SAFETY: a per-CPU slot, no other user while this program runs on this CPU.
    let s = unsafe { &mut *REJECT_SCRATCH.get_ptr_mut(0)? };
    let skb = unsafe { &*ctx.skb.skb };
    // Only what was sent to this host, from one: a frame for another (a bridge's, flooded,
    // seen in promiscuous mode) or to a broadcast or multicast address is not answered, nor
    // is a frame from a group address, which the answer would go to.
    if skb.pkt_type != PACKET_HOST || !from_one_link_address(ctx, l3)? {
        return None;
    }
    // Room for an ICMP message's headers is made after the link-layer header the kernel
    // knows, which is not where an 802.1Q tag in the packet ends.
    let room_at_ip = l3 == 0 || l3 == ETH_HEADER_LEN;
    // What the packet holds from its IP header on, for the lengths it claims.
    let available = ctx.len().saturating_sub(l3 as u32);
    match ethertype {
        ETH_P_IPV4 => {
            load(ctx, l3, &mut s.ipv4)?;
            // Options (rare) are not answered: `ipv4_header_holds` wants none.
            const HEADER_LEN: usize = 20;
            match s.ipv4[9] {
                IPPROTO_TCP => {
                    load(ctx, l3 + HEADER_LEN, &mut s.tcp)?;
                    reject::ipv4_header_holds(&s.ipv4, tcp_header_len(&s.tcp), available)
                        .then_some(())?;
                    let partial = checksum_left_to_device(ctx, l3 + HEADER_LEN + 16)?;
                    let total = u32::from(u16::from_be_bytes([s.ipv4[2], s.ipv4[3]]));
                    let payload = payload_len(total, HEADER_LEN, &s.tcp);
                    let out = &mut s.reset_v4;
                    reject::reset_ipv4(&s.ipv4, &s.tcp, payload, partial, out).then_some(())?;
                    put_answer(ctx, l3, RESET_IPV4_LEN, out)?;
                }
                IPPROTO_UDP if room_at_ip => {
                    reject::ipv4_header_holds(&s.ipv4, 8, available).then_some(())?;
                    load(ctx, l3, &mut s.quote_v4)?;
                    let out = &mut s.unreachable_v4;
                    reject::port_unreachable_ipv4(&s.quote_v4, out).then_some(())?;
                    let mut destination = [0u8; 16];
                    destination[10] = 0xff;
                    destination[11] = 0xff;
                    destination[12..].copy_from_slice(&s.quote_v4[12..16]);
                    icmp_answer_allowed(&destination)?;
                    put_answer(ctx, l3, QUOTE_IPV4_LEN, out)?;
                }
                _ => return None,
            }
        }
        ETH_P_IPV6 => {
            load(ctx, l3, &mut s.ipv6)?;
            match s.ipv6[6] {
                IPPROTO_TCP => {
                    load(ctx, l3 + IPV6_HEADER_LEN, &mut s.tcp)?;
                    reject::ipv6_header_holds(&s.ipv6, tcp_header_len(&s.tcp), available)
                        .then_some(())?;
                    let partial = checksum_left_to_device(ctx, l3 + IPV6_HEADER_LEN + 16)?;
                    let total = u32::from(u16::from_be_bytes([s.ipv6[4], s.ipv6[5]]))
                        + IPV6_HEADER_LEN as u32;
                    let payload = payload_len(total, IPV6_HEADER_LEN, &s.tcp);
                    let out = &mut s.reset_v6;
                    reject::reset_ipv6(&s.ipv6, &s.tcp, payload, partial, out).then_some(())?;
                    put_answer(ctx, l3, RESET_IPV6_LEN, out)?;
                }
                IPPROTO_UDP if room_at_ip => {
                    reject::ipv6_header_holds(&s.ipv6, 8, available).then_some(())?;
                    load(ctx, l3, &mut s.quote_v6)?;
                    let out = &mut s.unreachable_v6;
                    reject::port_unreachable_ipv6(&s.quote_v6, out).then_some(())?;
                    let mut destination = [0u8; 16];
                    destination.copy_from_slice(&s.quote_v6[8..24]);
                    icmp_answer_allowed(&destination)?;
                    put_answer(ctx, l3, QUOTE_IPV6_LEN, out)?;
                }
                _ => return None,
            }
        }
        _ => return None,
    }
    swap_link_addresses(ctx, l3)
}

/// Whether the segment's transport checksum is left for the device to finish (the kernel's
/// `CHECKSUM_PARTIAL`, which `__sk_buff` does not show; see `tproxy_common::reject`):
/// `bpf_l4_csum_replace` changes a checksum for a change outside the pseudo-header only when
/// it is not. Probed on the field at `offset`, which the answer writes over.
#[inline(always)]
fn checksum_left_to_device(ctx: &TcContext, offset: usize) -> Option<bool> {
    ctx.store(offset, &0u16, 0).ok()?;
    ctx.l4_csum_replace(offset, 0, 1, 2).ok()?;
    let after: u16 = ctx.load(offset).ok()?;
    Some(after == 0)
}

/// Whether the frame's source is one link-layer address (not a group's, whose bit is the
/// first octet's lowest); an interface without link-layer header has none.
#[inline(always)]
fn from_one_link_address(ctx: &TcContext, l3: usize) -> Option<bool> {
    if l3 == 0 {
        return Some(true);
    }
    let first: u8 = ctx.load(6).ok()?;
    Some(first & 1 == 0)
}

/// Takes one of this CPU's ICMP answers and one of `destination`'s; `None` when either is
/// spent for now.
#[inline(always)]
fn icmp_answer_allowed(destination: &[u8; 16]) -> Option<()> {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if ICMP_ANSWER_BUDGETS.get_ptr_mut(destination).is_none() {
        // Full at its first use; another CPU's entry, made meanwhile, stays.
        let _ = ICMP_ANSWER_BUDGETS.insert(destination, &AnswerBudget::default(), BPF_NOEXIST);
    }
    // SAFETY: the entry is plain data; another CPU answering the same destination at the
    // same moment may count a token twice, which only the limit's precision pays for.
    let per_destination = unsafe { &mut *ICMP_ANSWER_BUDGETS.get_ptr_mut(destination)? };
    // SAFETY: a per-CPU slot, no other user while this program runs on this CPU.
    let per_cpu = unsafe { &mut *ICMP_ANSWER_BUDGET.get_ptr_mut(0)? };
    reject::take_icmp_answer_to(per_cpu, per_destination, now).then_some(())
}

/// A TCP header's length, from its data offset.
#[inline(always)]
fn tcp_header_len(tcp: &[u8; 20]) -> u32 {
    u32::from(tcp[12] >> 4) * 4
}

/// Copies `N` bytes of the packet from `offset` into `to` (all of them, or `None`).
#[inline(always)]
fn load<const N: usize>(ctx: &TcContext, offset: usize, to: &mut [u8; N]) -> Option<()> {
    // SAFETY: the helper writes at most `N` bytes to `to`.
    let copied = unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), offset as u32, to.as_mut_ptr().cast(), N as u32) };
    (copied == 0).then_some(())
}

/// What a TCP segment of `total` bytes from its IP header carries after its headers.
#[inline(always)]
fn payload_len(total: u32, ip_header_len: usize, tcp: &[u8; 20]) -> u32 {
    total.saturating_sub(ip_header_len as u32 + tcp_header_len(tcp))
}

/// Writes `answer` over the packet from its IP header: the packet cut to the `keep` bytes the
/// answer ends with (its quote, or all of it), and room made ahead of those for the rest.
#[inline(always)]
fn put_answer<const N: usize>(
    ctx: &TcContext,
    l3: usize,
    keep: usize,
    answer: &[u8; N],
) -> Option<()> {
    resize(ctx, l3, keep, N - keep)?;
    ctx.store(l3, answer, 0).ok()
}

/// Cuts the packet to `keep` bytes from its IP header, then makes room for `grow` bytes of
/// new headers ahead of those (between the link-layer header and them).
#[inline(always)]
fn resize(ctx: &TcContext, l3: usize, keep: usize, grow: usize) -> Option<()> {
    // Cut in two steps, the last always a cut, even of a packet as long as its answer: a
    // cut leaves no checksum of the packet's received bytes on it (`CHECKSUM_COMPLETE`),
    // which the probe of `checksum_left_to_device` and the answer's bytes have made stale.
    for len in [l3 + keep + 2, l3 + keep] {
        // SAFETY: plain helper call on the program's own packet.
        if unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) } != 0 {
            return None;
        }
    }
    if grow > 0 {
        ctx.adjust_room(grow as i32, BPF_ADJ_ROOM_MAC, 0).ok()?;
    }
    Some(())
}

/// The answer goes back to the link-layer address the packet came from (nothing to do on
/// an interface without link-layer header).
#[inline(always)]
fn swap_link_addresses(ctx: &TcContext, l3: usize) -> Option<()> {
    if l3 == 0 {
        return Some(());
    }
    let addresses: [u8; 12] = ctx.load(0).ok()?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&addresses[6..]);
    swapped[6..].copy_from_slice(&addresses[..6]);
    ctx.store(0, &swapped, 0).ok()
}
