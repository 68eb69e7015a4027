//! kpf's XDP program: stateful full NAT from mapped frontend ports to backends.
//!
//! Per packet: parse (parse.rs), find the connection (conntrack.rs) or open one for a SYN to a
//! mapped frontend, rewrite addresses, ports, checksums and MACs (kpf_common::nat), and send it
//! out (forward.rs). Everything else goes to the kernel untouched. No logging on this path: the
//! counters (stats.rs) say what happened.
#![no_std]
#![no_main]

mod conntrack;
mod forward;
mod icmp;
mod maps;
mod parse;
mod stats;

use aya_ebpf::{macros::xdp, programs::XdpContext};

#[xdp]
pub fn kpf(ctx: XdpContext) -> u32 {
    match conntrack::handle(&ctx) {
        Ok(action) | Err(action) => action,
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
