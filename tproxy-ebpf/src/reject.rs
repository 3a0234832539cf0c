//! The `reject` action: the packet becomes its own answer (a TCP reset, an ICMP or ICMPv6 port
//! unreachable; built by `tproxy_common::reject`) and goes back out of the interface it came
//! in on, from the address it was sent to, as netfilter's REJECT answers for a router. What
//! gets no answer (a reset, a packet from or to no single host, an IPv4 datagram with
//! options, an IPv6 packet whose transport header follows extension headers, an ICMP answer
//! beyond the rate the kernel allows its own) is dropped.

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, TC_ACT_SHOT},
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    },
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use tproxy_common::reject::{
    self, AnswerBudget, QUOTE_IPV4_LEN, QUOTE_IPV6_LEN, RESET_IPV4_LEN, RESET_IPV6_LEN, UNREACHABLE_IPV4_LEN,
    UNREACHABLE_IPV6_LEN,
};

use crate::{ETH_P_IPV4, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, IPV6_HEADER_LEN};

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
    match ethertype {
        ETH_P_IPV4 => {
            load(ctx, l3, &mut s.ipv4)?;
            let header_len = usize::from(s.ipv4[0] & 0x0f) * 4;
            match s.ipv4[9] {
                IPPROTO_TCP => {
                    load(ctx, l3 + header_len, &mut s.tcp)?;
                    let total = u32::from(u16::from_be_bytes([s.ipv4[2], s.ipv4[3]]));
                    let payload = payload_len(total, header_len, &s.tcp);
                    reject::reset_ipv4(&s.ipv4, &s.tcp, payload, &mut s.reset_v4).then_some(())?;
                    resize(ctx, l3, RESET_IPV4_LEN, 0)?;
                    ctx.store(l3, &s.reset_v4, 0).ok()?;
                }
                IPPROTO_UDP => {
                    icmp_answer_allowed()?;
                    load(ctx, l3, &mut s.quote_v4)?;
                    reject::port_unreachable_ipv4(&s.quote_v4, &mut s.unreachable_v4)
                        .then_some(())?;
                    resize(ctx, l3, QUOTE_IPV4_LEN, UNREACHABLE_IPV4_LEN - QUOTE_IPV4_LEN)?;
                    ctx.store(l3, &s.unreachable_v4, 0).ok()?;
                }
                _ => return None,
            }
        }
        ETH_P_IPV6 => {
            load(ctx, l3, &mut s.ipv6)?;
            match s.ipv6[6] {
                IPPROTO_TCP => {
                    load(ctx, l3 + IPV6_HEADER_LEN, &mut s.tcp)?;
                    let total = u32::from(u16::from_be_bytes([s.ipv6[4], s.ipv6[5]]))
                        + IPV6_HEADER_LEN as u32;
                    let payload = payload_len(total, IPV6_HEADER_LEN, &s.tcp);
                    reject::reset_ipv6(&s.ipv6, &s.tcp, payload, &mut s.reset_v6).then_some(())?;
                    resize(ctx, l3, RESET_IPV6_LEN, 0)?;
                    ctx.store(l3, &s.reset_v6, 0).ok()?;
                }
                IPPROTO_UDP => {
                    icmp_answer_allowed()?;
                    load(ctx, l3, &mut s.quote_v6)?;
                    reject::port_unreachable_ipv6(&s.quote_v6, &mut s.unreachable_v6)
                        .then_some(())?;
                    resize(ctx, l3, QUOTE_IPV6_LEN, UNREACHABLE_IPV6_LEN - QUOTE_IPV6_LEN)?;
                    ctx.store(l3, &s.unreachable_v6, 0).ok()?;
                }
                _ => return None,
            }
        }
        _ => return None,
    }
    swap_link_addresses(ctx, l3)
}

/// Takes one of this CPU's ICMP answers; `None` when they are spent for now.
#[inline(always)]
fn icmp_answer_allowed() -> Option<()> {
    // SAFETY: a per-CPU slot, no other user while this program runs on this CPU.
    let budget = unsafe { &mut *ICMP_ANSWER_BUDGET.get_ptr_mut(0)? };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    reject::take_icmp_answer(budget, now).then_some(())
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
    total.saturating_sub(ip_header_len as u32 + u32::from(tcp[12] >> 4) * 4)
}

/// Cuts the packet to `keep` bytes from its IP header, then makes room for `grow` bytes of
/// new headers ahead of those (between the link-layer header and them).
#[inline(always)]
fn resize(ctx: &TcContext, l3: usize, keep: usize, grow: usize) -> Option<()> {
    // SAFETY: plain helper call on the program's own packet.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (l3 + keep) as u32, 0) } != 0 {
        return None;
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
