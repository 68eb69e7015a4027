//! Checking a whole TCP checksum, for the one case where generic XDP cannot tell otherwise what
//! the field holds: it equals the segment's pseudo-header sum, which is what every
//! CHECKSUM_PARTIAL socket buffer carries, and what a complete checksum carries by chance (one
//! segment in 65,535). Treated as partial, such a complete checksum would leave kpf wrong by the
//! port change, and a sender without TCP timestamps would retransmit the same bytes to the same
//! fate. A complete one sums to 0xffff with the pseudo-header; a partial one does not (but for a
//! coincidence of its own, one in 65,535 of such partial segments: those come only from a sender
//! on this host that left its checksum to offload, never off a wire).

use aya_ebpf::{
    bindings::xdp_md,
    helpers::generated::{bpf_csum_diff, bpf_xdp_load_bytes},
};
use kpf_common::csum;

use crate::maps::CSUM_SCRATCH;

/// The longest segment checked: up to jumbo frames, which do come off wires (9,001 bytes in an
/// AWS VPC). Longer ones are GRO aggregates, all CHECKSUM_PARTIAL.
pub const MAX_SEGMENT: u16 = 9216;

/// What `bpf_csum_diff` sums at most per call (its scratch buffer's size).
pub const CHUNK: usize = 512;

/// Whether the TCP segment of `seg_len` bytes at `tcp_off` in the frame has a correct complete
/// checksum, given its pseudo-header sum `pseudo`. A separate BPF function: its loop stays off
/// the forwarding path's code, and it runs only for the rare segments that need it.
#[inline(never)]
pub fn complete_checksum_holds(ctx: *mut xdp_md, tcp_off: u32, seg_len: u16, pseudo: u16) -> bool {
    let Some(buf) = CSUM_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let buf = buf.cast::<u8>();
    let len = seg_len.min(MAX_SEGMENT) as u32;
    // The whole pieces and the rest, each of a length the verifier can follow (a running
    // remainder it cannot: it would try every way through the loop). Every piece starts at a
    // multiple of 512 into the segment, so its 16-bit words are the segment's.
    let (full, rest) = (len / CHUNK as u32, len % CHUNK as u32);
    let mut acc = pseudo as u64;
    if rest != 0 {
        match sum_piece(ctx, buf, tcp_off + full * CHUNK as u32, rest) {
            Some(s) => acc += s as u64,
            None => return false,
        }
    }
    for i in 0..(MAX_SEGMENT as usize / CHUNK) as u32 {
        if i >= full {
            break;
        }
        match sum_piece(ctx, buf, tcp_off + i * CHUNK as u32, CHUNK as u32) {
            Some(s) => acc += s as u64,
            None => return false,
        }
    }
    csum::fold64(acc) == 0xffff
}

/// The ones' complement sum of the `n` bytes (1 to [`CHUNK`]) at `off` in the frame, copied to
/// `buf` and summed in 4-byte words; None if they are not all in the frame.
#[inline(always)]
fn sum_piece(ctx: *mut xdp_md, buf: *mut u8, off: u32, n: u32) -> Option<u32> {
    // The word the piece ends in is zeroed first, so its padding adds nothing.
    let last_word = (n - 1) & !3;
    // SAFETY: this CPU's scratch; last_word <= CHUNK - 4, so the word is inside it (and 4-byte
    // aligned in the value).
    unsafe {
        buf.add(last_word as usize).cast::<u32>().write(0);
        if bpf_xdp_load_bytes(ctx, off, buf.cast(), n) != 0 {
            return None;
        }
        let s = bpf_csum_diff(core::ptr::null_mut(), 0, buf.cast(), last_word + 4, 0);
        if s < 0 { None } else { Some(s as u32) }
    }
}
