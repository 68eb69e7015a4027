//! ICMP errors about forwarded connections ("fragmentation needed", "destination unreachable",
//! "time exceeded"), translated to the connection's other side so that path-MTU discovery and
//! fast failure work through the gateway.
//!
//! The quoted packet is one kpf sent after rewriting it; its reverse is the key of the entry for
//! the other direction of the same connection, whose rewrite says everything: the error goes to
//! that side's endpoint, from the address that side talks to, and quotes the packet as that side
//! sent it. Every checksum is updated incrementally: the outer IPv4 header, the quoted IPv4
//! header, the quoted TCP checksum when the quote includes it, and the ICMP checksum over all of
//! those changes.

use kpf_common::{Counter, FlowKey, csum};

use crate::{
    frame::Frame,
    maps::{FLOWS, HALF_OPEN},
    parse,
    stats,
};

/// A separate BPF function, so its frame does not add to the forwarding path's stack.
#[inline(never)]
pub fn translate<C: Frame>(ctx: &C, l4: usize) -> u32 {
    let e = match parse::icmp_error(ctx, l4) {
        Ok(e) => e,
        Err(reason) => {
            stats::count(reason);
            return C::PASS;
        }
    };
    let q = &e.inner;
    let key = FlowKey::tcp(q.dst_addr, q.dst_port, q.src_addr, q.src_port);
    let Some(entry) = FLOWS.get_ptr(&key).or_else(|| HALF_OPEN.get_ptr(&key)) else {
        stats::count(Counter::PassNotOurs);
        return C::PASS;
    };
    // SAFETY: plain data, copied out (only what is needed, not the whole entry).
    let (nat, next_hop) = unsafe { ((*entry).nat, (*entry).next_hop) };
    let nat = &nat;

    // SAFETY: parse bounds-checked every header used below.
    let (ip, inner, ports, icmp) = unsafe { (&mut *e.ip, &mut *e.inner_ip, &mut *e.inner_l4, &mut *e.icmp) };

    let (src, dst) = (u32::from_ne_bytes(ip.src_addr), u32::from_ne_bytes(ip.dst_addr));
    ip.src_addr = nat.src_addr.to_ne_bytes();
    ip.dst_addr = nat.dst_addr.to_ne_bytes();
    let outer = csum::fold(csum::diff32(src, nat.src_addr) + csum::diff32(dst, nat.dst_addr));
    ip.check = csum::apply_full(u16::from_ne_bytes(ip.check), outer).to_ne_bytes();

    // The quoted packet as the other side sent it: from its endpoint to the address it talks to.
    let (in_src, in_sport, in_dst, in_dport) = (nat.dst_addr, nat.dst_port, nat.src_addr, nat.src_port);
    let addrs = csum::diff32(q.src_addr, in_src) + csum::diff32(q.dst_addr, in_dst);
    let port_delta = csum::diff16(q.src_port, in_sport) + csum::diff16(q.dst_port, in_dport);
    let old_inner_check = u16::from_ne_bytes(inner.check);
    let new_inner_check = csum::apply_full(old_inner_check, csum::fold(addrs));
    inner.src_addr = in_src.to_ne_bytes();
    inner.dst_addr = in_dst.to_ne_bytes();
    inner.check = new_inner_check.to_ne_bytes();
    let [s0, s1] = in_sport.to_ne_bytes();
    let [d0, d1] = in_dport.to_ne_bytes();
    ports[0] = s0;
    ports[1] = s1;
    ports[2] = d0;
    ports[3] = d1;

    let mut icmp_delta = addrs + port_delta + csum::diff16(old_inner_check, new_inner_check);
    if !e.inner_check.is_null() {
        // SAFETY: bounds-checked by parse.
        let c = unsafe { &mut *e.inner_check };
        let old = u16::from_ne_bytes(*c);
        let new = csum::apply_full(old, csum::fold(addrs + port_delta));
        *c = new.to_ne_bytes();
        icmp_delta += csum::diff16(old, new);
    }
    let old_icmp = u16::from_ne_bytes([icmp[2], icmp[3]]);
    let [c0, c1] = csum::apply_full(old_icmp, csum::fold(icmp_delta)).to_ne_bytes();
    icmp[2] = c0;
    icmp[3] = c1;

    stats::count(Counter::IcmpTranslated);
    match ctx.send_frame(e.eth, &next_hop) {
        Ok(action) => action,
        Err(reason) => {
            stats::count(reason);
            C::DROP
        }
    }
}
