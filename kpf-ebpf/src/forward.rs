//! Next-hop lookup: the FIB, and each CPU's cache of its answer per backend (sending is in
//! `frame`).

use aya_ebpf::{
    bindings::{BPF_FIB_LOOKUP_SRC, bpf_fib_lookup},
    helpers::generated::bpf_fib_lookup as fib_lookup_helper,
};
use kpf_common::{BackendRoute, Counter, NextHop};

use crate::{
    frame::Frame,
    maps::{FIB_SCRATCH, ROUTES},
};

/// This CPU's FIB parameter block, reset for an IPv4/TCP lookup of `dst` from `ifindex`.
#[inline(always)]
fn params(ifindex: u32, dst: u32) -> Option<&'static mut bpf_fib_lookup> {
    // SAFETY: this CPU's slot; nothing else uses it while the program runs here.
    let p = unsafe { &mut *FIB_SCRATCH.get_ptr_mut(0)? };
    p.family = AF_INET;
    p.l4_protocol = kpf_common::IPPROTO_TCP;
    p.sport = 0;
    p.dport = 0;
    p.__bindgen_anon_1.tot_len = 0;
    p.ifindex = ifindex;
    p.__bindgen_anon_2.rt_metric = 0;
    p.__bindgen_anon_3.ipv6_src = [0; 4];
    p.__bindgen_anon_4.ipv6_dst = [0; 4];
    p.__bindgen_anon_4.ipv4_dst = dst;
    p.__bindgen_anon_5.tbid = 0;
    p.smac = [0; 6];
    p.dmac = [0; 6];
    Some(p)
}

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// Routes `dst` as the kernel would forward a packet that arrived on `ifindex`: the egress
/// interface, both MACs (the neighbour must already be resolved), and the source address the
/// kernel would pick toward `dst` (BPF_FIB_LOOKUP_SRC). The result is cached (see [`route`]), so
/// no packet length is given: the MTU check would judge one packet (maybe a GRO aggregate), not
/// the route. The answer stays in this CPU's parameter block (read it before the next lookup):
/// copying it out would cost stack the new-connection path does not have.
#[inline(always)]
fn lookup<C: Frame>(ctx: &C, ifindex: u32, dst: u32) -> Result<&'static bpf_fib_lookup, Counter> {
    let p = params(ifindex, dst).ok_or(Counter::DropFibFailed)?;
    // SAFETY: ctx is the live XDP or tc context and p a valid, fully sized parameter block.
    let rc = unsafe {
        fib_lookup_helper(
            ctx.as_ptr() as *mut _,
            &mut *p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SRC,
        )
    };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(p),
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(Counter::DropFibNoNeigh),
        _ => Err(Counter::DropFibFailed),
    }
}

/// The route to backend `id` (at `dst`) for a packet that arrived on `ingress`: this CPU's
/// cached answer if it is from the current routing generation, else a FIB lookup, cached. A
/// failed lookup is not cached: the next connection tries again.
#[inline(always)]
pub fn route<C: Frame>(ctx: &C, id: u32, dst: u32, ingress: u32, fib_gen: u32) -> Result<&'static BackendRoute, Counter> {
    // SAFETY: this CPU's entry; nothing else writes it while the program runs here.
    let r = unsafe { &mut *ROUTES.get_ptr_mut(id).ok_or(Counter::DropFibFailed)? };
    if !r.answers(dst, ingress, fib_gen) {
        let p = lookup(ctx, ingress, dst)?;
        store(p, &mut r.next_hop, fib_gen);
        r.src_addr = source(p);
        r.dst_addr = dst;
        r.ingress = ingress;
    }
    Ok(r)
}

/// The source address a successful lookup chose (BPF_FIB_LOOKUP_SRC).
#[inline(always)]
fn source(p: &bpf_fib_lookup) -> u32 {
    // SAFETY: BPF_FIB_LOOKUP_SRC filled ipv4_src on success.
    unsafe { p.__bindgen_anon_3.ipv4_src }
}

/// Copies a successful lookup's next hop into `nh`, field by field.
#[inline(always)]
fn store(p: &bpf_fib_lookup, nh: &mut NextHop, fib_gen: u32) {
    nh.ifindex = p.ifindex;
    nh.src_mac = p.smac;
    nh.dst_mac = p.dmac;
    nh.fib_gen = fib_gen;
}
