//! The address/port rewrite applied to every forwarded packet, with its checksum deltas
//! computed once per connection instead of once per packet.

use crate::{csum, maps::FlowKey};

/// What a conntrack entry rewrites its packets to, with the checksum deltas precomputed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Nat {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// Folded delta for the IPv4 header checksum (addresses).
    pub ip_delta: u16,
    /// Folded delta for a complete TCP checksum (pseudo-header addresses and ports).
    pub l4_delta: u16,
    /// Folded delta for a CHECKSUM_PARTIAL TCP field (pseudo-header addresses only).
    pub pseudo_delta: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Nat>() == 20);

impl Nat {
    /// Whether `key` is what the other direction's packets carry once this rewrite is applied
    /// (`FlowKey::reply_of(self) == *key`, field by field, with no key built on the stack): the
    /// entry under `key` is this connection's peer, not a later connection's that took the key.
    #[inline(always)]
    pub const fn answered_by(&self, key: &FlowKey) -> bool {
        key.src_addr == self.dst_addr
            && key.dst_addr == self.src_addr
            && key.src_port == self.dst_port
            && key.dst_port == self.src_port
            && key.proto == crate::maps::IPPROTO_TCP
    }

    /// The rewrite that turns packets keyed `from` into `src:sport -> dst:dport`.
    pub const fn new(from: &FlowKey, src_addr: u32, src_port: u16, dst_addr: u32, dst_port: u16) -> Self {
        let addrs = csum::diff32(from.src_addr, src_addr) + csum::diff32(from.dst_addr, dst_addr);
        let ports = csum::diff16(from.src_port, src_port) + csum::diff16(from.dst_port, dst_port);
        Self {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            ip_delta: csum::fold(addrs),
            l4_delta: csum::fold(addrs + ports),
            pseudo_delta: csum::fold(addrs),
            _pad: 0,
        }
    }
}

/// How the TCP checksum field of a packet is to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Csum {
    /// A complete checksum (anything that crossed a wire).
    Full,
    /// A CHECKSUM_PARTIAL pseudo-header sum (GRO/GSO aggregates and locally sent segments, as
    /// generic XDP and tc see them).
    Partial,
}

/// How the TCP checksum field of a socket buffer reads, for generic XDP, which sees socket
/// buffers but not their checksum state. A CHECKSUM_PARTIAL packet (every GRO or GSO aggregate,
/// and any segment a sender on this host left to offload, however short) carries exactly the
/// pseudo-header sum of its addresses and segment length; a complete checksum equals that value
/// only by chance, for about one segment in 65,535. `seg_len`: TCP header and payload.
#[inline(always)]
pub const fn skb_l4_csum(check: u16, src_addr: u32, dst_addr: u32, seg_len: u16) -> L4Csum {
    if check == csum::tcp_pseudo_header(src_addr, dst_addr, seg_len) { L4Csum::Partial } else { L4Csum::Full }
}

/// The IPv4 header checksum field after the rewrite, from the one before. (The kernel program
/// does its own loads and stores, see kpf-ebpf's access.rs, and takes the arithmetic from here.)
#[inline(always)]
pub const fn ip_check(nat: &Nat, check: u16) -> u16 {
    csum::apply_full(check, nat.ip_delta)
}

/// The TCP checksum field after the rewrite, from the one before, read as `l4` says.
#[inline(always)]
pub const fn tcp_check(nat: &Nat, check: u16, l4: L4Csum) -> u16 {
    match l4 {
        L4Csum::Full => csum::apply_full(check, nat.l4_delta),
        L4Csum::Partial => csum::apply_partial(check, nat.pseudo_delta),
    }
}

/// The folded delta of the ports alone: what a complete TCP checksum needs beyond the
/// pseudo-header delta.
#[inline(always)]
pub const fn port_delta(nat: &Nat) -> u16 {
    csum::fold(nat.l4_delta as u32 + (!nat.pseudo_delta) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use network_types::{ip::Ipv4Hdr, tcp::TcpHdr};
    use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};

    /// Rewrites addresses, ports and both checksums in place: the model of what the kernel program
    /// does (kpf-ebpf's frame.rs makes the same stores, one instruction each, with this arithmetic).
    fn rewrite(nat: &Nat, ip: &mut Ipv4Hdr, tcp: &mut TcpHdr, l4: L4Csum) {
        ip.src_addr = nat.src_addr.to_ne_bytes();
        ip.dst_addr = nat.dst_addr.to_ne_bytes();
        ip.check = ip_check(nat, u16::from_ne_bytes(ip.check)).to_ne_bytes();
        tcp.source = nat.src_port.to_ne_bytes();
        tcp.dest = nat.dst_port.to_ne_bytes();
        tcp.check = tcp_check(nat, u16::from_ne_bytes(tcp.check), l4).to_ne_bytes();
    }

    const IP: usize = 20;

    /// A random IPv4+TCP packet with correct checksums; returns (bytes, ihl bytes).
    fn random_packet(rng: &mut StdRng) -> ([u8; 1500], usize, usize) {
        let mut p = [0u8; 1500];
        let opts = rng.random_range(0..=10) * 4; // IP options: IHL 5..15
        let ihl = IP + opts;
        let doff = 20 + rng.random_range(0..=10) * 4;
        let payload = rng.random_range(0..=(1500 - ihl - doff));
        let total = ihl + doff + payload;
        rng.fill_bytes(&mut p[..total]);
        p[0] = 0x40 | (ihl / 4) as u8;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] &= 0x40; // DF or nothing, no fragment offset
        p[7] = 0;
        p[9] = 6;
        p[ihl + 12] = ((doff / 4) as u8) << 4 | (p[ihl + 12] & 0x0f);
        let c = csum::ipv4_header(&p[..ihl]);
        p[10..12].copy_from_slice(&c.to_ne_bytes());
        let (src, dst) = (addr_of(&p, 12), addr_of(&p, 16));
        let c = csum::transport(src, dst, 6, &p[ihl..total], 16);
        p[ihl + 16..ihl + 18].copy_from_slice(&c.to_ne_bytes());
        (p, ihl, total)
    }

    fn addr_of(p: &[u8], at: usize) -> [u8; 4] {
        [p[at], p[at + 1], p[at + 2], p[at + 3]]
    }

    fn headers(p: &mut [u8], ihl: usize) -> (&mut Ipv4Hdr, &mut TcpHdr) {
        let (ip, rest) = p.split_at_mut(ihl);
        // SAFETY: both header types are byte arrays (align 1) and the slices are long enough.
        unsafe { (&mut *(ip.as_mut_ptr() as *mut Ipv4Hdr), &mut *(rest.as_mut_ptr() as *mut TcpHdr)) }
    }

    fn key_of(p: &[u8], ihl: usize) -> FlowKey {
        FlowKey::tcp(
            u32::from_ne_bytes(addr_of(p, 12)),
            u16::from_ne_bytes([p[ihl], p[ihl + 1]]),
            u32::from_ne_bytes(addr_of(p, 16)),
            u16::from_ne_bytes([p[ihl + 2], p[ihl + 3]]),
        )
    }

    #[test]
    fn answered_by_is_reply_of() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..1000 {
            let from = FlowKey::tcp(rng.random(), rng.random(), rng.random(), rng.random());
            let nat = Nat::new(&from, rng.random(), rng.random(), rng.random(), rng.random());
            let reply = FlowKey::reply_of(&nat);
            assert!(nat.answered_by(&reply));
            // Any one field off: another connection's key.
            let mut other = reply;
            match rng.random_range(0..5) {
                0 => other.src_addr ^= 1,
                1 => other.dst_addr ^= 1 << 31,
                2 => other.src_port ^= 1,
                3 => other.dst_port ^= 0x100,
                _ => other.proto = 17,
            }
            assert!(!nat.answered_by(&other), "{other:?}");
        }
    }

    #[test]
    fn incremental_update_matches_full_recomputation() {
        let mut rng = StdRng::seed_from_u64(0x6b7066);
        for i in 0..20_000 {
            let (mut p, ihl, total) = random_packet(&mut rng);
            let key = key_of(&p, ihl);
            let nat = Nat::new(&key, rng.random(), rng.random(), rng.random(), rng.random());
            let (ip, tcp) = headers(&mut p, ihl);
            rewrite(&nat, ip, tcp, L4Csum::Full);

            assert_eq!(key_of(&p, ihl), FlowKey::tcp(nat.src_addr, nat.src_port, nat.dst_addr, nat.dst_port));
            let ip_ok = csum::ipv4_header(&p[..ihl]);
            assert_eq!(u16::from_ne_bytes([p[10], p[11]]), ip_ok, "ip checksum, packet {i}");
            let tcp_ok = csum::transport(addr_of(&p, 12), addr_of(&p, 16), 6, &p[ihl..total], 16);
            assert_eq!(u16::from_ne_bytes([p[ihl + 16], p[ihl + 17]]), tcp_ok, "tcp checksum, packet {i}");
        }
    }

    #[test]
    fn partial_checksum_keeps_the_pseudo_header_sum() {
        // A CHECKSUM_PARTIAL field holds the pseudo-header sum of the current addresses; after the
        // rewrite it must hold the pseudo-header sum of the new ones, whatever the ports.
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..5_000 {
            let (mut p, ihl, total) = random_packet(&mut rng);
            let seg = (total - ihl) as u16;
            let pseudo = csum::pseudo_header(addr_of(&p, 12), addr_of(&p, 16), 6, seg);
            p[ihl + 16..ihl + 18].copy_from_slice(&pseudo.to_ne_bytes());
            let key = key_of(&p, ihl);
            let nat = Nat::new(&key, rng.random(), rng.random(), rng.random(), rng.random());
            let (ip, tcp) = headers(&mut p, ihl);
            rewrite(&nat, ip, tcp, L4Csum::Partial);
            let want = csum::pseudo_header(addr_of(&p, 12), addr_of(&p, 16), 6, seg);
            // 0x0000 and 0xffff are the same ones' complement value.
            let got = u16::from_ne_bytes([p[ihl + 16], p[ihl + 17]]);
            assert!(got == want || (got | want) == 0xffff && (got & want) == 0, "{got:#x} != {want:#x}");
        }
    }

    #[test]
    fn pseudo_then_port_delta_equals_the_full_delta() {
        // The tc path applies the two separately (the kernel needs them apart); together they
        // must give what the one-step XDP update gives.
        let mut rng = StdRng::seed_from_u64(3);
        for i in 0..20_000 {
            let (p, ihl, _) = random_packet(&mut rng);
            let key = key_of(&p, ihl);
            let nat = Nat::new(&key, rng.random(), rng.random(), rng.random(), rng.random());
            let check = u16::from_ne_bytes([p[ihl + 16], p[ihl + 17]]);
            let two_steps = csum::apply_full(csum::apply_full(check, nat.pseudo_delta), port_delta(&nat));
            let one_step = csum::apply_full(check, nat.l4_delta);
            assert!(
                two_steps == one_step || (two_steps | one_step) == 0xffff && (two_steps & one_step) == 0,
                "packet {i}: {two_steps:#x} != {one_step:#x}"
            );
        }
    }

    #[test]
    fn skb_checksum_kind_is_read_from_the_field() {
        // Partial: whatever the length (a GRO aggregate of two short segments is shorter than any
        // MTU). Full: unless the complete checksum happens to equal the pseudo-header sum.
        let mut rng = StdRng::seed_from_u64(11);
        let mut coincidences = 0;
        for i in 0..20_000 {
            let (p, ihl, total) = random_packet(&mut rng);
            let (src, dst) = (addr_of(&p, 12), addr_of(&p, 16));
            let seg = (total - ihl) as u16;
            let (src_w, dst_w) = (u32::from_ne_bytes(src), u32::from_ne_bytes(dst));
            let full = u16::from_ne_bytes([p[ihl + 16], p[ihl + 17]]);
            let pseudo = csum::pseudo_header(src, dst, 6, seg);
            assert_eq!(skb_l4_csum(pseudo, src_w, dst_w, seg), L4Csum::Partial, "packet {i}");
            if skb_l4_csum(full, src_w, dst_w, seg) == L4Csum::Partial {
                assert_eq!(full, pseudo, "packet {i}");
                coincidences += 1;
            }
        }
        // About 0.3 expected; seeded, so this is the same every run.
        assert!(coincidences <= 3, "{coincidences} complete checksums read as partial");
    }

    #[test]
    fn identity_rewrite_changes_nothing() {
        let mut rng = StdRng::seed_from_u64(1);
        let (mut p, ihl, _) = random_packet(&mut rng);
        let before = p;
        let key = key_of(&p, ihl);
        let nat = Nat::new(&key, key.src_addr, key.src_port, key.dst_addr, key.dst_port);
        let (ip, tcp) = headers(&mut p, ihl);
        rewrite(&nat, ip, tcp, L4Csum::Full);
        assert_eq!(p[..], before[..]);
    }
}
