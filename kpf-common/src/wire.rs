//! Conversions between host values and the wire-order integers stored in map types.

use core::net::Ipv4Addr;

/// An IPv4 address as a wire-order `u32` (its four octets, in packet order, in memory).
#[inline(always)]
pub const fn addr(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

#[inline(always)]
pub const fn to_addr(w: u32) -> Ipv4Addr {
    let o = w.to_ne_bytes();
    Ipv4Addr::new(o[0], o[1], o[2], o[3])
}

/// A port as a wire-order `u16`.
#[inline(always)]
pub const fn port(p: u16) -> u16 {
    p.to_be()
}

#[inline(always)]
pub const fn to_port(w: u16) -> u16 {
    u16::from_be(w)
}
