//! Following TCP sequence numbers just enough to end a connection from the middle.

use crate::tcp::{FIN, SYN};

/// The sequence number a sender will use after a segment with sequence `seq` (host order),
/// `payload` data bytes and `flags`: SYN and FIN each take one number.
#[inline(always)]
pub const fn next(seq: u32, payload: u32, flags: u8) -> u32 {
    let mut n = seq.wrapping_add(payload);
    if flags & SYN != 0 {
        n = n.wrapping_add(1);
    }
    if flags & FIN != 0 {
        n = n.wrapping_add(1);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_fin_and_data_consume_sequence_space() {
        assert_eq!(next(100, 0, SYN), 101);
        assert_eq!(next(100, 10, 0x10), 110);
        assert_eq!(next(100, 10, FIN | 0x10), 111);
        assert_eq!(next(u32::MAX, 2, 0x10), 1, "wraps");
    }
}
