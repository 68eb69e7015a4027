//! kpf's programs: stateful full NAT from mapped frontend ports to backends, at XDP (`kpf`
//! native, `kpf_generic`) or at tc ingress (`kpf_tc`), the same code behind [`frame::Frame`].
//!
//! Per packet: parse (parse.rs), find the connection (conntrack.rs) or open one for a SYN to a
//! mapped frontend, rewrite addresses, ports, checksums and MACs (kpf_common::nat, frame.rs), and
//! send it out. Everything else goes to the kernel untouched. No logging on this path: the
//! counters (stats.rs) say what happened.
#![no_std]
#![no_main]
// Inline assembly for instructions Rust has no way to emit here: conntrack's compare-and-exchange
// and access.rs's unaligned header loads and stores; aya-ebpf needs the same feature.
#![feature(asm_experimental_arch)]

mod access;
mod clock;
mod conntrack;
mod forward;
mod frame;
mod icmp;
mod maps;
mod parse;
mod stats;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// Native XDP: frames from the driver.
#[xdp]
pub fn kpf(ctx: XdpContext) -> u32 {
    match conntrack::handle(&frame::Xdp::<false>(ctx)) {
        Ok(action) | Err(action) => action,
    }
}

/// Generic XDP: socket buffers, GRO aggregates and locally sent segments among them.
#[xdp]
pub fn kpf_generic(ctx: XdpContext) -> u32 {
    match conntrack::handle(&frame::Xdp::<true>(ctx)) {
        Ok(action) | Err(action) => action,
    }
}

/// Not attached anywhere: the daemon test-runs it to read the clock flows are stamped with.
#[xdp]
pub fn kpf_clock(ctx: XdpContext) -> u32 {
    clock::report(&ctx)
}

/// Headers kpf may read: Ethernet with an 802.1Q tag, IPv4 and TCP with all options, or an ICMP
/// error quoting IPv4 with options and TCP.
const HEADERS_MAX: u32 = 18 + 60 + 8 + 60 + 20;

#[classifier]
pub fn kpf_tc(ctx: TcContext) -> i32 {
    // A socket buffer's linear part may end inside the headers; pull them in first (before any
    // packet pointer exists: the pull may move the data).
    let want = HEADERS_MAX.min(ctx.len());
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        let _ = ctx.pull_data(want);
    }
    match conntrack::handle(&ctx) {
        Ok(action) | Err(action) => action as i32,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never called.
    loop {}
}

// bpf_fib_lookup and the redirect helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
