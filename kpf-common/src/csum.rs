//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! All 16-bit words are taken in the machine's order straight from wire bytes
//! (`u16::from_ne_bytes`) and written back the same way: the ones' complement sum is
//! byte-order independent (RFC 1071 §2(B)), so no swapping is needed anywhere.

/// Folds a 32-bit accumulator to 16 bits with end-around carry.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Ones' complement addition of two 16-bit words.
#[inline(always)]
pub const fn add(a: u16, b: u16) -> u16 {
    fold(a as u32 + b as u32)
}

/// The sum that turns a checksum covering `old` into one covering `new` (both 16-bit words).
#[inline(always)]
pub const fn diff16(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

/// The same for a 32-bit field (two words), in wire order.
#[inline(always)]
pub const fn diff32(old: u32, new: u32) -> u32 {
    diff16(old as u16, new as u16) + diff16((old >> 16) as u16, (new >> 16) as u16)
}

/// Applies a folded delta to a complete checksum field: RFC 1624 eqn. 3, `HC' = ~(~HC + ~m + m')`.
#[inline(always)]
pub const fn apply_full(check: u16, delta: u16) -> u16 {
    !add(!check, delta)
}

/// Applies a folded pseudo-header delta to a CHECKSUM_PARTIAL field.
///
/// Such a field holds the *uncomplemented* pseudo-header sum, which the NIC (or the stack's
/// software fallback) later completes over the segment, so the delta is added, not subtracted.
/// Only pseudo-header changes (addresses) apply: the ports are summed when the segment is completed.
#[inline(always)]
pub const fn apply_partial(check: u16, delta: u16) -> u16 {
    add(check, delta)
}

/// The folded, uncomplemented IPv4 pseudo-header sum of a TCP segment of `len` bytes from `src`
/// to `dst` (addresses as read from the wire, see the module note): what a CHECKSUM_PARTIAL
/// TCP field holds. The kernel's counterpart of [`pseudo_header`].
#[inline(always)]
pub const fn tcp_pseudo_header(src: u32, dst: u32, len: u16) -> u16 {
    // Each word as it lies on the wire: [0, 6] for the protocol, the length big-endian.
    let words = (src & 0xffff) + (src >> 16) + (dst & 0xffff) + (dst >> 16);
    fold(words + u16::from_ne_bytes([0, 6]) as u32 + u16::from_ne_bytes(len.to_be_bytes()) as u32)
}

/// Ones' complement sum of `data` (a trailing odd byte is padded with zero), added to `init`.
/// Not for the kernel: it loops over the whole buffer. Used by tests and fixtures.
pub fn sum(data: &[u8], init: u32) -> u32 {
    let mut acc = init as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_ne_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += u16::from_ne_bytes([*last, 0]) as u64;
    }
    while acc >> 32 != 0 {
        acc = (acc & 0xffff_ffff) + (acc >> 32);
    }
    acc as u32
}

/// The checksum field value for an IPv4 header (with its checksum field zeroed or not: the field
/// at bytes 10..12 is skipped).
pub fn ipv4_header(header: &[u8]) -> u16 {
    let s = sum(&header[..10], 0);
    let s = sum(&header[12..], s);
    !fold(s)
}

/// The sum of the IPv4 pseudo-header for a transport segment of `len` bytes (uncomplemented,
/// folded): what a CHECKSUM_PARTIAL field holds.
pub fn pseudo_header(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u16 {
    let mut s = sum(&src, 0);
    s = sum(&dst, s);
    s = sum(&[0, proto], s);
    s = sum(&len.to_be_bytes(), s);
    fold(s)
}

/// The complete TCP/UDP checksum field value for `segment` (whose own checksum field, at
/// `check_offset`, is skipped).
pub fn transport(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8], check_offset: usize) -> u16 {
    let s = pseudo_header(src, dst, proto, segment.len() as u16) as u32;
    let s = sum(&segment[..check_offset], s);
    let s = sum(&segment[check_offset + 2..], s);
    !fold(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        let s = fold(sum(&data, 0));
        assert_eq!(u16::from_be_bytes(s.to_ne_bytes()), 0xddf2);
    }

    #[test]
    fn ipv4_header_known_value() {
        // A header captured from the wire, checksum b861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header(&h).to_ne_bytes(), [0xb8, 0x61]);
    }

    #[test]
    fn tcp_pseudo_header_matches_the_byte_wise_sum() {
        let mut x = 0x9e37_79b9_u32;
        for len in [0u16, 1, 20, 1480, 9000, 65515] {
            x = x.wrapping_mul(0x0101_0101).wrapping_add(0x7f4a_7c15);
            let (src, dst) = (x.to_ne_bytes(), x.rotate_left(11).to_ne_bytes());
            assert_eq!(
                tcp_pseudo_header(u32::from_ne_bytes(src), u32::from_ne_bytes(dst), len),
                pseudo_header(src, dst, 6, len),
                "{src:?} -> {dst:?}, {len} bytes"
            );
        }
    }

    #[test]
    fn rfc1624_minus_zero_case() {
        // RFC 1624 §4: HC = 0xdd2f, m 0x5555 -> 0x3285 gives HC' = 0x0000 (eqn. 2 gives 0xffff).
        let hc = 0xdd2fu16.to_be();
        let d = fold(diff16(0x5555u16.to_be(), 0x3285u16.to_be()));
        assert_eq!(u16::from_be(apply_full(hc, d)), 0x0000);
    }
}
