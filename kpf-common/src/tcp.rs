//! The TCP connection tracking state machine, with no I/O: the kernel feeds it each packet's
//! flags and direction and stores the result; the daemon's garbage collector uses the timeouts.

use crate::maps::Direction;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// Connection state, shared by both directions' conntrack entries.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The client's SYN went to the backend.
    SynSent = 1,
    /// The backend answered SYN-ACK.
    SynAcked = 2,
    /// The client acknowledged the SYN-ACK (or data flows).
    Established = 3,
    /// The client sent FIN; the backend may still send.
    FinFromClient = 4,
    /// The backend sent FIN; the client may still send.
    FinFromBackend = 5,
    /// Both sides sent FIN, the client first and the backend after it had the client's: only the
    /// last ACKs remain, and the 4-tuple's TIME_WAIT is on the client's side, behind the frontend.
    Closing = 6,
    /// Either side sent RST.
    Reset = 7,
    /// Both sides sent FIN, the backend first, or the two FINs crossed (the backend's did not
    /// acknowledge the client's, which then reached a backend that had closed too: both ends
    /// hold TIME_WAIT): the backend holds the SNAT 4-tuple in TIME_WAIT
    /// (see [`BACKEND_TIME_WAIT_NS`]), and a new connection on it could be refused. Shares
    /// `Closing`'s slot in per-state tables (14 & 7 = 6): their length, and with it the pinned
    /// map layout, stays as it was, so an upgrade keeps every connection.
    BackendTimeWait = 14,
}

/// Array length for per-state tables (index 0 unused, so the `State` value indexes directly;
/// [`State::slot`] folds the one value past the end onto its slot).
pub const STATE_COUNT: usize = 8;

const SEC: u64 = 1_000_000_000;

/// Default idle timeouts, indexed by `State`.
///
/// Established: 2 h 4 min, the least RFC 5382 (REQ-5) allows a NAT, and well above Kafka's
/// `connections.max.idle.ms` (10 min), so the broker or client always closes an idle
/// connection before kpf forgets it. Half-open and closing connections are short-lived.
pub const DEFAULT_TIMEOUTS_NS: [u64; STATE_COUNT] = [
    0,
    30 * SEC,   // SynSent
    30 * SEC,   // SynAcked
    7440 * SEC, // Established
    120 * SEC,  // FinFromClient
    120 * SEC,  // FinFromBackend
    30 * SEC,   // Closing
    10 * SEC,   // Reset
];

impl State {
    #[inline(always)]
    pub const fn from_u8(v: u8) -> Option<State> {
        Some(match v {
            1 => State::SynSent,
            2 => State::SynAcked,
            3 => State::Established,
            4 => State::FinFromClient,
            5 => State::FinFromBackend,
            6 => State::Closing,
            7 => State::Reset,
            14 => State::BackendTimeWait,
            _ => return None,
        })
    }

    /// This state's index in per-state tables (its timeout).
    #[inline(always)]
    pub const fn slot(state: u8) -> usize {
        (state as usize) & (STATE_COUNT - 1)
    }

    pub const fn name(self) -> &'static str {
        match self {
            State::SynSent => "syn_sent",
            State::SynAcked => "syn_acked",
            State::Established => "established",
            State::FinFromClient => "fin_from_client",
            State::FinFromBackend => "fin_from_backend",
            State::Closing => "closing",
            State::Reset => "reset",
            State::BackendTimeWait => "backend_time_wait",
        }
    }

    /// The client has completed the handshake (acknowledged the SYN-ACK): from here on the
    /// connection is established, whatever follows. A spoofed SYN never gets here.
    #[inline(always)]
    pub const fn handshake_done(self) -> bool {
        !matches!(self, State::SynSent | State::SynAcked | State::Reset)
    }

    /// A connection in this state may be replaced by a new SYN on the same 4-tuple (with a new
    /// SNAT binding): it has ended, or it was never set up.
    #[inline(always)]
    pub const fn reusable(self) -> bool {
        matches!(self, State::Closing | State::Reset | State::BackendTimeWait)
    }
}

/// What a SYN without ACK means: a new connection. Anything else with SYN (SYN+FIN, SYN+RST) is
/// not a valid opening and never creates state.
#[inline(always)]
pub const fn is_new_connection(flags: u8) -> bool {
    flags & (SYN | ACK | FIN | RST) == SYN
}

/// The state after a packet with `flags` travelling in `dir` is seen in `state`. `crossing`: the
/// packet is a FIN that does not acknowledge the other side's FIN (see [`crate::seq::acknowledges`]),
/// so its sender closed before it had the other's; only the backend's FIN after the client's
/// asks (the other way round, the backend holds TIME_WAIT either way).
#[inline(always)]
pub const fn next(state: State, dir: Direction, flags: u8, crossing: bool) -> State {
    if flags & RST != 0 {
        return State::Reset;
    }
    let from_client = matches!(dir, Direction::Original);
    let fin = flags & FIN != 0;
    match state {
        State::SynSent => {
            if !from_client && flags & (SYN | ACK) == (SYN | ACK) {
                State::SynAcked
            } else {
                State::SynSent
            }
        }
        State::SynAcked => {
            if from_client && flags & SYN == 0 && flags & ACK != 0 {
                if fin { State::FinFromClient } else { State::Established }
            } else {
                State::SynAcked
            }
        }
        State::Established => {
            if !fin {
                State::Established
            } else if from_client {
                State::FinFromClient
            } else {
                State::FinFromBackend
            }
        }
        State::FinFromClient => {
            if !fin || from_client {
                State::FinFromClient
            } else if crossing {
                State::BackendTimeWait
            } else {
                State::Closing
            }
        }
        State::FinFromBackend => {
            if fin && from_client { State::BackendTimeWait } else { State::FinFromBackend }
        }
        State::Closing => State::Closing,
        State::Reset => State::Reset,
        State::BackendTimeWait => State::BackendTimeWait,
    }
}

/// Whether [`next`] depends on `crossing` for this packet: the backend's FIN on a connection whose
/// client has sent its FIN. Only then is the client's progress worth reading.
#[inline(always)]
pub const fn may_cross(state: State, dir: Direction, flags: u8) -> bool {
    flags & (FIN | RST) == FIN && matches!(state, State::FinFromClient) && matches!(dir, Direction::Reply)
}

/// True when a packet with these flags may change the state, so the kernel must look at the
/// other direction's entry too. Plain data and ACKs in an established connection never do.
#[inline(always)]
pub const fn may_change(state: State, flags: u8) -> bool {
    flags & (SYN | FIN | RST) != 0 || matches!(state, State::SynAcked)
}

/// How long a closed or reset connection keeps its SNAT port against reuse by a new one: long
/// enough for the last ACK and the first retransmissions of a lost FIN (TCP's minimum RTO is
/// 200 ms) to arrive. It bounds the new-connection rate toward one backend at
/// `snat_ports` / grace when every connection is short and the client closes first.
pub const RECLAIM_GRACE_NS: u64 = SEC;

/// How long a connection the backend closed first keeps its SNAT port, and its entries: the
/// backend's TIME_WAIT. A SYN on a 4-tuple in TIME_WAIT is accepted only if its sequence number
/// or timestamp is past the old connection's, which a new client's (with its own random offsets)
/// is half the time; otherwise the backend answers with the old connection's ACK, the client
/// resets it and retries a second later. Linux holds TIME_WAIT for 60 s on a timer wheel that
/// fires up to ~4 s late at that range; Kafka brokers close idle connections themselves
/// (`connections.max.idle.ms`), so this is the common way a Kafka connection ends.
pub const BACKEND_TIME_WAIT_NS: u64 = 65 * SEC;

/// The last resort when every port a SYN probes is held, some by connections still in their
/// grace: the one whose hold ends soonest goes to the new connection if it has been quiet this
/// long, rather than dropping the SYN (which costs the client a 1 s retransmission). A lost last
/// ACK makes the backend retransmit its FIN after its RTO, at least 200 ms; by this time that
/// has normally happened (and refreshed the entry).
pub const RECLAIM_MIN_QUIET_NS: u64 = SEC / 4;

/// Whether a connection has ended: both FINs, or an RST.
#[inline(always)]
pub const fn ended(state: u8) -> bool {
    match State::from_u8(state) {
        Some(s) => s.reusable(),
        None => false,
    }
}

/// How long after its last packet an ended connection keeps its SNAT port.
#[inline(always)]
pub const fn reclaim_grace_ns(state: u8) -> u64 {
    if state == State::BackendTimeWait as u8 { BACKEND_TIME_WAIT_NS } else { RECLAIM_GRACE_NS }
}

/// Whether a connection's SNAT port may go to a new connection: it has ended and stayed quiet for
/// its grace, or expired.
#[inline(always)]
pub const fn reclaimable(timeouts_ns: &[u64; STATE_COUNT], state: u8, last_seen_ns: u64, now_ns: u64) -> bool {
    let quiet = now_ns.saturating_sub(last_seen_ns);
    (ended(state) && quiet > reclaim_grace_ns(state)) || timed_out(timeouts_ns, state, quiet)
}

/// For the last resort, a port held by a connection quiet for `quiet_ns` and not reclaimable:
/// how long until it is free anyway, plus one (the lowest goes first), if the connection has
/// ended and been quiet [`RECLAIM_MIN_QUIET_NS`]; else 0, not a candidate. A port a backend holds
/// in TIME_WAIT thus goes before one merely in its 1 s grace only in that TIME_WAIT's last
/// second. (Ranks compare within one SYN's probes, all at the same `now`.)
#[inline(always)]
pub const fn last_resort_rank(state: u8, quiet_ns: u64) -> u64 {
    if !ended(state) || quiet_ns < RECLAIM_MIN_QUIET_NS {
        return 0;
    }
    reclaim_grace_ns(state).saturating_sub(quiet_ns) + 1
}

/// Whether an entry last seen at `last_seen_ns` has expired at `now_ns`: idle past its state's
/// timeout and, for a connection the backend closed first, past the backend's TIME_WAIT too
/// (its port must stay held that long, however short the closing timeout).
#[inline(always)]
pub const fn expired(timeouts_ns: &[u64; STATE_COUNT], state: u8, last_seen_ns: u64, now_ns: u64) -> bool {
    timed_out(timeouts_ns, state, now_ns.saturating_sub(last_seen_ns))
}

/// [`expired`], for an entry quiet for `quiet_ns`.
#[inline(always)]
const fn timed_out(timeouts_ns: &[u64; STATE_COUNT], state: u8, quiet_ns: u64) -> bool {
    // The slot's timeout first: every packet asks, and a live entry is answered by one compare.
    quiet_ns > timeouts_ns[State::slot(state)] && (state != State::BackendTimeWait as u8 || quiet_ns > BACKEND_TIME_WAIT_NS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Direction::{Original as C, Reply as B};

    fn run(steps: &[(Direction, u8)]) -> State {
        let mut s = State::SynSent;
        for &(d, f) in steps {
            s = next(s, d, f, false);
        }
        s
    }

    #[test]
    fn handshake_data_and_orderly_close() {
        assert_eq!(run(&[]), State::SynSent);
        assert_eq!(run(&[(B, SYN | ACK)]), State::SynAcked);
        assert_eq!(run(&[(B, SYN | ACK), (C, ACK)]), State::Established);
        let est = [(B, SYN | ACK), (C, ACK), (C, ACK), (B, ACK)];
        assert_eq!(run(&est), State::Established);
        let mut close = est.to_vec();
        close.push((C, FIN | ACK));
        assert_eq!(run(&close), State::FinFromClient);
        close.push((C, FIN | ACK)); // retransmitted FIN from the same side
        assert_eq!(run(&close), State::FinFromClient);
        close.push((B, ACK)); // backend keeps sending on a half-closed connection
        assert_eq!(run(&close), State::FinFromClient);
        close.push((B, FIN | ACK));
        assert_eq!(run(&close), State::Closing);
        close.push((C, ACK));
        assert_eq!(run(&close), State::Closing);
    }

    #[test]
    fn backend_closes_first() {
        let s = run(&[(B, SYN | ACK), (C, ACK), (B, FIN | ACK), (B, FIN | ACK), (C, FIN | ACK)]);
        assert_eq!(s, State::BackendTimeWait);
        assert_eq!(run(&[(B, SYN | ACK), (C, ACK), (B, FIN | ACK), (C, FIN | ACK), (B, ACK), (C, FIN | ACK)]), s);
        assert_eq!(next(s, B, RST, false), State::Reset, "an RST ends TIME_WAIT (RFC 1337 is off by default)");
    }

    #[test]
    fn fins_that_cross_leave_the_backend_in_time_wait() {
        let half = run(&[(B, SYN | ACK), (C, ACK), (C, FIN | ACK)]);
        assert_eq!(half, State::FinFromClient);
        assert_eq!(next(half, B, FIN | ACK, true), State::BackendTimeWait, "the backend closed before it had the client's FIN");
        assert_eq!(next(half, B, FIN | ACK, false), State::Closing, "the backend closed after it");
        assert_eq!(next(half, B, ACK, true), half, "no FIN, no change");
        assert_eq!(next(half, C, FIN | ACK, true), half, "the client's own FIN again");
        // The backend first: TIME_WAIT on its side whatever the client's FIN acknowledges.
        let b_first = run(&[(B, SYN | ACK), (C, ACK), (B, FIN | ACK)]);
        assert_eq!(next(b_first, C, FIN | ACK, true), State::BackendTimeWait);
        assert_eq!(next(b_first, C, FIN | ACK, false), State::BackendTimeWait);
    }

    /// Every state, with the value the kernel stores.
    const ALL: [State; 8] = [
        State::SynSent,
        State::SynAcked,
        State::Established,
        State::FinFromClient,
        State::FinFromBackend,
        State::Closing,
        State::Reset,
        State::BackendTimeWait,
    ];

    #[test]
    fn state_values_round_trip_and_fold_into_the_table() {
        for s in ALL {
            assert_eq!(State::from_u8(s as u8), Some(s));
            assert!((1..STATE_COUNT).contains(&State::slot(s as u8)), "{s:?}");
        }
        assert_eq!(State::slot(State::BackendTimeWait as u8), State::Closing as usize);
        for (i, a) in ALL.iter().enumerate() {
            assert!(ALL[i + 1..].iter().all(|b| b.name() != a.name()), "{a:?}: name used twice");
        }
        for v in (0..=u8::MAX).filter(|v| !ALL.iter().any(|s| *s as u8 == *v)) {
            assert_eq!(State::from_u8(v), None, "{v}");
        }
    }

    #[test]
    fn rst_from_either_side_in_any_state() {
        let prefixes: &[&[(Direction, u8)]] =
            &[&[], &[(B, SYN | ACK)], &[(B, SYN | ACK), (C, ACK)], &[(B, SYN | ACK), (C, ACK), (C, FIN)]];
        for p in prefixes {
            for d in [C, B] {
                let mut v = p.to_vec();
                v.push((d, RST | ACK));
                assert_eq!(run(&v), State::Reset, "{p:?} then RST from {d:?}");
                v.push((C, ACK));
                assert_eq!(run(&v), State::Reset, "reset is final");
            }
        }
    }

    #[test]
    fn handshake_is_directional() {
        // A SYN-ACK from the client side, or an ACK before the SYN-ACK, does not advance.
        assert_eq!(run(&[(C, SYN | ACK)]), State::SynSent);
        assert_eq!(run(&[(C, ACK)]), State::SynSent);
        assert_eq!(run(&[(B, SYN | ACK), (B, ACK)]), State::SynAcked);
        assert_eq!(run(&[(B, SYN | ACK), (C, SYN)]), State::SynAcked);
    }

    #[test]
    fn new_connection_flags() {
        assert!(is_new_connection(SYN));
        assert!(is_new_connection(SYN | 0x08 | 0x20)); // PSH/URG do not matter
        for bad in [SYN | ACK, SYN | FIN, SYN | RST, ACK, FIN, RST, 0] {
            assert!(!is_new_connection(bad), "{bad:#x}");
        }
    }

    #[test]
    fn only_rare_packets_need_the_peer_entry() {
        assert!(!may_change(State::Established, ACK));
        assert!(!may_change(State::Established, ACK | 0x08));
        assert!(may_change(State::Established, FIN | ACK));
        assert!(may_change(State::Established, RST));
        assert!(may_change(State::SynAcked, ACK));
        assert!(!may_change(State::FinFromClient, ACK) && !may_change(State::Closing, ACK));
        // may_change must never hide a transition.
        for s in ALL {
            for flags in 0..=0x3f {
                for d in [C, B] {
                    for crossing in [false, true] {
                        if next(s, d, flags, crossing) != s {
                            assert!(may_change(s, flags), "{s:?} {d:?} {flags:#x}");
                        }
                    }
                    // may_cross must never hide a case where crossing matters.
                    if next(s, d, flags, true) != next(s, d, flags, false) {
                        assert!(may_cross(s, d, flags), "{s:?} {d:?} {flags:#x}");
                    }
                }
            }
        }
    }

    #[test]
    fn only_ended_or_expired_connections_give_up_their_port() {
        let t = DEFAULT_TIMEOUTS_NS;
        let closing = State::Closing as u8;
        assert!(ended(closing) && ended(State::Reset as u8));
        assert!(!ended(State::FinFromClient as u8) && !ended(State::Established as u8) && !ended(0));
        const { assert!(RECLAIM_MIN_QUIET_NS < RECLAIM_GRACE_NS) };
        assert!(!reclaimable(&t, closing, 0, SEC / 2), "a just-closed connection keeps its port");
        assert!(reclaimable(&t, closing, 0, 2 * SEC));
        assert!(reclaimable(&t, State::Reset as u8, 0, 2 * SEC));
        assert!(!reclaimable(&t, State::Established as u8, 0, 3600 * SEC), "a quiet open connection keeps it");
        assert!(reclaimable(&t, State::Established as u8, 0, 7441 * SEC), "an expired one does not");
        assert!(!reclaimable(&t, State::FinFromClient as u8, 0, 60 * SEC), "half-closed is still open");
    }

    #[test]
    fn a_backend_in_time_wait_keeps_the_port_for_its_time_wait() {
        let t = DEFAULT_TIMEOUTS_NS;
        let tw = State::BackendTimeWait as u8;
        assert!(ended(tw));
        assert!(!reclaimable(&t, tw, 0, 2 * SEC));
        assert!(!reclaimable(&t, tw, 0, 60 * SEC), "Linux's TIME_WAIT is 60 s");
        assert!(reclaimable(&t, tw, 0, BACKEND_TIME_WAIT_NS + 1));
        // The entry outlives the closing timeout, however short it is configured, or the garbage
        // collector would free the port early.
        let mut short = t;
        short[State::Closing as usize] = 0;
        assert!(!expired(&short, tw, 0, 60 * SEC));
        assert!(expired(&short, tw, 0, BACKEND_TIME_WAIT_NS + 1));
        assert!(expired(&short, State::Closing as u8, 0, 1), "Closing keeps its own timeout");
        let mut long = t;
        long[State::Closing as usize] = 600 * SEC;
        assert!(!expired(&long, tw, 0, 300 * SEC), "a longer closing timeout applies to it too");
    }

    #[test]
    fn the_last_resort_takes_the_port_free_soonest() {
        let (closing, tw, reset) = (State::Closing as u8, State::BackendTimeWait as u8, State::Reset as u8);
        assert_eq!(last_resort_rank(closing, RECLAIM_MIN_QUIET_NS / 2), 0, "not quiet long enough");
        assert_ne!(last_resort_rank(closing, RECLAIM_MIN_QUIET_NS), 0);
        assert_eq!(last_resort_rank(State::Established as u8, 60 * SEC), 0, "open connections are never candidates");
        assert_eq!(last_resort_rank(State::FinFromBackend as u8, 60 * SEC), 0);
        // A port in the backend's TIME_WAIT ranks after one merely in its grace, though quiet
        // far longer, until its TIME_WAIT's last second.
        assert!(last_resort_rank(closing, SEC / 2) < last_resort_rank(tw, 60 * SEC));
        assert!(last_resort_rank(closing, SEC / 2) > last_resort_rank(tw, BACKEND_TIME_WAIT_NS - SEC / 4));
        assert!(last_resort_rank(reset, SEC / 2) < last_resort_rank(tw, 60 * SEC));
        // Among equals, the one quiet longest first.
        assert!(last_resort_rank(closing, SEC * 3 / 4) < last_resort_rank(closing, SEC / 2));
        assert!(last_resort_rank(tw, 40 * SEC) < last_resort_rank(tw, 30 * SEC));
        assert_ne!(last_resort_rank(closing, 10 * SEC), 0, "never 0 for a candidate");
    }

    #[test]
    fn expiry_uses_the_state_timeout() {
        let t = DEFAULT_TIMEOUTS_NS;
        let est = State::Established as u8;
        assert!(!expired(&t, est, 0, 7440 * SEC));
        assert!(expired(&t, est, 0, 7440 * SEC + 1));
        assert!(expired(&t, State::SynSent as u8, 0, 31 * SEC));
        assert!(!expired(&t, est, 100, 50), "a clock behind last_seen is not expiry");
        assert!(t[State::Established as usize] >= 3600 * SEC, "issue: established idle >= 1 h");
    }
}
