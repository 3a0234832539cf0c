//! The packet's direction in its connection, as the kernel's connection tracking has it
//! (what `-m conntrack --ctdir` and nft's `ct direction` match), asked with the conntrack
//! kfuncs `bpf_skb_ct_lookup` and `bpf_ct_release`.
//!
//! aya-ebpf 0.2 cannot declare a kfunc, so each call is written as a helper call to a
//! placeholder number (`tproxy_common::maps::KFUNC_CT_LOOKUP` and `KFUNC_CT_RELEASE`), and the
//! loader turns it into the kfunc call before loading, with the function's id in the
//! kernel's BTF.

use core::arch::asm;

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as TupleV4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as TupleV6,
    },
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use tproxy_common::maps::{CT_ORIGINAL, CT_REPLY, KFUNC_CT_LOOKUP, KFUNC_CT_RELEASE};

/// `struct bpf_ct_opts` as the kernel reads it: the first 12 bytes, the size every kernel
/// with the kfunc takes (the zone fields that follow are left at the default zone).
#[repr(C)]
struct CtOpts {
    netns_id: i32,
    error: i32,
    l4proto: u8,
    dir: u8,
    reserved: [u8; 2],
}

/// The size of [`CtOpts`] the kernel checks.
const CT_OPTS_SIZE: u64 = 12;
/// `netns_id`: the namespace of the packet's device.
const BPF_F_CURRENT_NETNS: i32 = -1;
/// `IP_CT_DIR_REPLY`, as `bpf_skb_ct_lookup` writes it to `dir`.
const IP_CT_DIR_REPLY: u8 = 1;

/// What the lookup reads: the packet's addresses and ports and the options, in a map rather
/// than on the classifier's stack, which has no room for them.
#[repr(C)]
struct CtLookup {
    tuple: bpf_sock_tuple,
    opts: CtOpts,
}

#[map]
static CT_LOOKUP: PerCpuArray<CtLookup> = PerCpuArray::with_max_entries(1, 0);

/// [`CT_REPLY`] when the packet (its addresses of `N` bytes, and its ports, in network
/// order) travels in the reply direction of a tracked connection, else [`CT_ORIGINAL`]: a
/// packet no tracked connection holds yet starts one, in its original direction (the
/// kernel's conntrack runs after tc ingress, so a connection's first packet finds nothing).
#[inline(always)]
pub(crate) fn direction<const N: usize>(
    ctx: &TcContext,
    udp: bool,
    saddr: [u8; N],
    daddr: [u8; N],
    sport: u16,
    dport: u16,
) -> u32 {
    let Some(lookup) = CT_LOOKUP.get_ptr_mut(0) else {
        return CT_ORIGINAL;
    };
    // SAFETY: this CPU's entry, which nothing else touches while the program runs.
    let lookup = unsafe { &mut *lookup };
    let tuple_len = if N == 4 {
        lookup.tuple.__bindgen_anon_1.ipv4 = TupleV4 {
            saddr: u32::from_ne_bytes([saddr[0], saddr[1], saddr[2], saddr[3]]),
            daddr: u32::from_ne_bytes([daddr[0], daddr[1], daddr[2], daddr[3]]),
            sport,
            dport,
        };
        core::mem::size_of::<TupleV4>() as u32
    } else {
        let mut v6 = TupleV6 {
            saddr: [0; 4],
            daddr: [0; 4],
            sport,
            dport,
        };
        let mut w = 0;
        while w < 4 {
            if w * 4 + 3 < N {
                v6.saddr[w] = u32::from_ne_bytes([
                    saddr[w * 4],
                    saddr[w * 4 + 1],
                    saddr[w * 4 + 2],
                    saddr[w * 4 + 3],
                ]);
                v6.daddr[w] = u32::from_ne_bytes([
                    daddr[w * 4],
                    daddr[w * 4 + 1],
                    daddr[w * 4 + 2],
                    daddr[w * 4 + 3],
                ]);
            }
            w += 1;
        }
        lookup.tuple.__bindgen_anon_1.ipv6 = v6;
        core::mem::size_of::<TupleV6>() as u32
    };
    lookup.opts = CtOpts {
        netns_id: BPF_F_CURRENT_NETNS,
        error: 0,
        l4proto: if udp { 17 } else { 6 },
        dir: 0,
        reserved: [0; 2],
    };
    looked_up(ctx, lookup, tuple_len)
}

/// The lookup itself, out of line: the classifier's own frame has no room for what the
/// kfunc calls clobber.
#[inline(never)]
fn looked_up(ctx: &TcContext, lookup: &mut CtLookup, tuple_len: u32) -> u32 {
    let ct: u64;
    // SAFETY: the loader makes the placeholder the kfunc call, whose arguments these are:
    // the context, the tuple and its size, the options and their size. It clobbers r1-r5.
    unsafe {
        asm!(
            "call {kfunc}",
            kfunc = const KFUNC_CT_LOOKUP,
            inlateout("r1") ctx.skb.skb as u64 => _,
            inlateout("r2") &mut lookup.tuple as *mut bpf_sock_tuple as u64 => _,
            inlateout("r3") u64::from(tuple_len) => _,
            inlateout("r4") &mut lookup.opts as *mut CtOpts as u64 => _,
            inlateout("r5") CT_OPTS_SIZE => _,
            lateout("r0") ct,
        );
    }
    if ct == 0 {
        return CT_ORIGINAL;
    }
    // SAFETY: the lookup wrote `dir` when it found the connection.
    let dir = unsafe { core::ptr::read_volatile(&lookup.opts.dir) };
    // SAFETY: the connection the lookup returned, released once, on the only path that has it.
    unsafe {
        asm!(
            "call {kfunc}",
            kfunc = const KFUNC_CT_RELEASE,
            inlateout("r1") ct => _,
            lateout("r0") _,
            lateout("r2") _,
            lateout("r3") _,
            lateout("r4") _,
            lateout("r5") _,
        );
    }
    match dir {
        IP_CT_DIR_REPLY => CT_REPLY,
        _ => CT_ORIGINAL,
    }
}
