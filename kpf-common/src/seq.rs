//! Following TCP sequence numbers just enough to end a connection from the middle, and to tell
//! an RST or FIN its sender could have sent from one anybody who knows the 4-tuple could.
//!
//! kpf keeps one number per direction: the highest sequence number that direction's sender has
//! used, plus one (its `next_seq`). No windows: that would cost per-packet work and state on the
//! established path. Instead a segment counts only if it lands within [`WINDOW`] of that number:
//! every byte a receiver acknowledges has passed kpf, so a real sender's segments are never far
//! from it, while a blind guess lands there once in 2^32 / (2 * WINDOW) tries.

use crate::tcp::{ACK, FIN, RST, SYN};

/// How far from a direction's `next_seq` a segment may start or end and still count: four of
/// the largest segments kpf can see (64 KiB GSO packets in the skb modes), so that packets of
/// one connection handled on two CPUs at once (whose updates may land out of order) never leave
/// the number too far behind to catch up. A blind RST or FIN gets through once in 8,192 tries.
pub const WINDOW: u32 = 1 << 18;

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

/// `pos` lies within [`WINDOW`] of `reference`, either side, in sequence space (which wraps).
#[inline(always)]
pub const fn near(pos: u32, reference: u32) -> bool {
    (pos.wrapping_sub(reference) as i32).unsigned_abs() <= WINDOW
}

/// The flags of a segment (`seq`, `payload`, `flags`) that may change the connection's state,
/// given its sender's `next_seq`: an RST counts only if its sequence number is near it (a real
/// one carries exactly the next number, or what the receiver last acknowledged), a FIN only if
/// the number after it is (a new FIN extends the sender's data, a retransmitted one ends where
/// it did). The rest are dropped from the flags, so a spoofed RST or FIN leaves the connection
/// as it was; it is still forwarded, for the endpoint to judge by its own window.
#[inline(always)]
pub const fn credible(flags: u8, seq: u32, payload: u32, next_seq: u32) -> u8 {
    if flags & RST != 0 {
        return if near(seq, next_seq) { flags } else { flags & !(RST | FIN) };
    }
    if flags & FIN != 0 && !near(next(seq, payload, flags), next_seq) {
        return flags & !FIN;
    }
    flags
}

/// A segment with `flags` and acknowledgment number `ack` acknowledges everything the other
/// side has sent, up to that side's `next_seq` (its FIN included, once seen): its sender had it
/// all when it sent this. (Every byte a receiver acknowledges has passed kpf first.)
#[inline(always)]
pub const fn acknowledges(flags: u8, ack: u32, next_seq: u32) -> bool {
    flags & ACK != 0 && ack.wrapping_sub(next_seq) as i32 >= 0
}

/// A direction's `next_seq` after its sender's segment (`seq`, `payload`, `flags`). During the
/// handshake a SYN sets it (it carries the sender's first number; the backend's is unknown
/// before its SYN-ACK). Later it only moves forward, and by at most [`WINDOW`] at a time: a
/// retransmission does not pull it back, and a blind segment does not drag it away (a SYN there
/// is a new connection's attempt on the same 4-tuple, an RST ends the sender's use of it).
#[inline(always)]
pub const fn track(next_seq: u32, seq: u32, payload: u32, flags: u8, handshaking: bool) -> u32 {
    if flags & RST != 0 {
        return next_seq;
    }
    let end = next(seq, payload, flags);
    if flags & SYN != 0 {
        return if handshaking { end } else { next_seq };
    }
    let ahead = end.wrapping_sub(next_seq);
    if ahead != 0 && ahead <= WINDOW { end } else { next_seq }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::ACK;

    #[test]
    fn syn_fin_and_data_consume_sequence_space() {
        assert_eq!(next(100, 0, SYN), 101);
        assert_eq!(next(100, 10, ACK), 110);
        assert_eq!(next(100, 10, FIN | ACK), 111);
        assert_eq!(next(u32::MAX, 2, ACK), 1, "wraps");
    }

    #[test]
    fn near_is_symmetric_and_wraps() {
        assert!(near(1000, 1000));
        assert!(near(1000 + WINDOW, 1000) && near(1000, 1000 + WINDOW));
        assert!(!near(1000 + WINDOW + 1, 1000) && !near(1000, 1000 + WINDOW + 1));
        assert!(near(5, u32::MAX - 5), "across the wrap");
        assert!(near(u32::MAX - 5, 5));
        assert!(!near(1 << 31, 0), "half the space away is far either way");
    }

    #[test]
    fn an_rst_counts_only_near_the_senders_next_number() {
        let n = 1_000_000;
        assert_eq!(credible(RST | ACK, n, 0, n), RST | ACK, "exactly the next number");
        assert_eq!(credible(RST, n - 5000, 0, n), RST, "what the receiver last acknowledged");
        assert_eq!(credible(RST | ACK, n + WINDOW + 1, 0, n), ACK, "a blind guess ahead");
        assert_eq!(credible(RST | ACK, n.wrapping_sub(WINDOW + 1), 0, n), ACK, "a blind guess behind");
        assert_eq!(credible(RST | FIN | ACK, 7, 0, n), ACK, "a blind RST+FIN loses both");
        // A backend refusing a SYN sends sequence 0, before kpf has seen any number of its own.
        assert_eq!(credible(RST | ACK, 0, 0, 0), RST | ACK);
    }

    #[test]
    fn a_fin_counts_when_it_ends_near_the_senders_data() {
        let n = 500_000;
        assert_eq!(credible(FIN | ACK, n, 0, n), FIN | ACK, "a bare FIN");
        assert_eq!(credible(FIN | ACK, n, 1400, n), FIN | ACK, "a FIN with the last data");
        assert_eq!(credible(FIN | ACK, n - 1, 0, n), FIN | ACK, "the same FIN again");
        assert_eq!(credible(FIN | ACK, n - 65_000, 64_999, n), FIN | ACK, "a retransmitted 64 KB segment with the FIN");
        assert_eq!(credible(FIN | ACK, n + 3 * WINDOW, 0, n), ACK, "a blind guess");
        assert_eq!(credible(FIN | ACK | 0x08, n.wrapping_sub(2 * WINDOW), 10, n), ACK | 0x08);
        assert_eq!(credible(ACK, 12345, 0, n), ACK, "other flags are not judged");
    }

    #[test]
    fn next_seq_moves_forward_only_and_by_a_window_at_most() {
        let n = 10_000;
        assert_eq!(track(n, n, 1448, ACK, false), n + 1448);
        assert_eq!(track(n, n - 1448, 1448, ACK, false), n, "a retransmission does not pull it back");
        assert_eq!(track(n, n + 100, 1000, ACK, false), n + 1100, "a segment after a lost one");
        assert_eq!(track(n, n + WINDOW - 10, 10, ACK, false), n + WINDOW);
        assert_eq!(track(n, n + WINDOW, 1, ACK, false), n, "too far ahead: a blind segment");
        assert_eq!(track(n, n ^ 0x8000_0000, 0, ACK, false), n);
        assert_eq!(track(u32::MAX - 10, u32::MAX - 10, 20, ACK, false), 9, "wraps");
        assert_eq!(track(n, n, 0, FIN | ACK, false), n + 1);
        assert_eq!(track(n, n, 0, RST | ACK, false), n, "an RST does not move it");
        assert_eq!(track(n, n + 1, 0, RST | ACK, false), n);
    }

    #[test]
    fn acknowledging_the_other_sides_fin() {
        let client_next = 1002; // after the client's FIN at 1001
        assert!(acknowledges(FIN | ACK, 1002, client_next), "the FIN's own number");
        assert!(!acknowledges(FIN | ACK, 1001, client_next), "sent before the FIN arrived");
        assert!(!acknowledges(FIN | ACK, 500, client_next), "before some data too");
        assert!(!acknowledges(FIN, 1002, client_next), "no ACK flag, no acknowledgment");
        assert!(acknowledges(ACK, 3, u32::MAX - 1), "across the wrap");
        assert!(!acknowledges(ACK, u32::MAX - 2, 1), "behind, across the wrap");
    }

    #[test]
    fn a_syn_sets_it_during_the_handshake_only() {
        assert_eq!(track(0, 5000, 0, SYN | ACK, true), 5001, "the backend's first number");
        assert_eq!(track(1001, 1000, 0, SYN, true), 1001, "a retransmitted SYN");
        assert_eq!(track(1001, 77_777, 0, SYN, false), 1001, "a SYN on an established 4-tuple");
    }

    /// A blind sender who knows the 4-tuple but not the sequence numbers: out of every 2^16
    /// evenly spread guesses, the share that gets an RST accepted is about 2 * WINDOW / 2^32.
    #[test]
    fn a_blind_rst_rarely_counts() {
        let n = 0x1234_5678;
        let hits = (0..1u32 << 16).filter(|i| credible(RST, i << 16, 0, n) & RST != 0).count();
        assert_eq!(hits, (2 * WINDOW as usize) >> 16, "one per 2^16 numbers inside the window");
    }
}
