//! Choosing the gateway's source port for a new connection toward a backend.
//!
//! The start of the probe sequence is a hash of the connection's 4-tuple keyed with a fresh random
//! number per SYN, so a 4-tuple reused after its connection closed lands on a different port (the
//! backend may still hold the old one in TIME_WAIT), and ports cannot be predicted from outside.
//!
//! The kernel probes candidates in order and claims the first that is free (it can insert the
//! reply key backend -> gateway:port with `BPF_NOEXIST`) or whose connection has ended and stayed
//! quiet for its grace ([`crate::tcp::reclaim_grace_ns`]: a second, or the backend's TIME_WAIT if
//! the backend closed first), or expired (it takes the place of that connection's entries), so a
//! port is never handed to two live connections toward the same backend. If every probe is
//! held, the SYN takes the ended connection's port that is free soonest
//! ([`crate::tcp::last_resort_rank`]) or, if there is none, is dropped and counted, and the
//! client's retransmission tries again.

use crate::maps::FlowKey;

/// How many ports one SYN may try before giving up.
pub const PROBES: u32 = 64;

/// A 32-bit mix of a connection's 4-tuple and a seed (the murmur3 finaliser over a combined
/// word), so starting ports spread over the range.
#[inline(always)]
pub const fn hash(key: &FlowKey, seed: u32) -> u32 {
    let mut h = seed ^ key.src_addr;
    h = h.wrapping_mul(0x85eb_ca6b) ^ key.dst_addr;
    h = h.wrapping_mul(0xc2b2_ae35) ^ ((key.src_port as u32) << 16 | key.dst_port as u32);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The `attempt`-th candidate port (host order) in `min..=max` for a connection whose hash is `h`:
/// each attempt an independent hash of (`h`, attempt). Linear probing, tried first, clusters (with
/// 32 probes it started refusing SYNs at about 55 % occupancy), and so does any fixed stride;
/// independent probes fail only when every one of them hits a taken port: at 85 % occupancy,
/// 0.85^64, about 3 in 100,000.
#[inline(always)]
pub const fn candidate(min: u16, max: u16, h: u32, attempt: u32) -> u16 {
    let size = (max as u32).saturating_sub(min as u32) + 1;
    let mut x = h ^ attempt.wrapping_mul(0x9e37_79b9);
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^= x >> 16;
    min + (x % size) as u16
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::HashSet;

    use super::*;

    fn key(i: u32) -> FlowKey {
        FlowKey::tcp(0x0a00_0001 + (i >> 16), (i as u16).to_be(), 0x0a00_0064, 9093u16.to_be())
    }

    #[test]
    fn candidates_stay_in_range_and_spread() {
        assert!((0..PROBES).all(|a| candidate(1024, 1024, 7, a) == 1024), "a one-port range");
        // Ranges of at least the 64 ports the config requires.
        for (min, max) in [(40000u16, 59999u16), (65000, 65535), (1024, 1087)] {
            let size = (max - min) as usize + 1;
            let mut total = 0;
            for i in 0..500 {
                let h = hash(&key(i), 42);
                let c: std::vec::Vec<u16> = (0..PROBES).map(|a| candidate(min, max, h, a)).collect();
                assert!(c.iter().all(|p| (min..=max).contains(p)), "{min}-{max}: {c:?}");
                total += c.iter().collect::<HashSet<_>>().len();
            }
            // Independent probes: size * (1 - (1 - 1/size)^PROBES) distinct ports expected.
            let mut miss = 1.0f64;
            for _ in 0..PROBES {
                miss *= 1.0 - 1.0 / size as f64;
            }
            let expected = size as f64 * (1.0 - miss);
            let mean = total as f64 / 500.0;
            assert!((mean - expected).abs() < 0.05 * expected, "{min}-{max}: {mean:.1} distinct on average, {expected:.1} expected");
        }
    }

    /// The kernel's allocation loop, over a set standing in for the reply-key map.
    fn allocate(taken: &mut HashSet<u16>, k: &FlowKey, min: u16, max: u16) -> Option<u16> {
        let h = hash(k, 0x5eed);
        (0..PROBES).map(|a| candidate(min, max, h, a)).find(|p| taken.insert(*p))
    }

    #[test]
    fn no_port_is_handed_out_twice_and_exhaustion_is_reported() {
        let (min, max) = (50000u16, 50999u16);
        let mut taken = HashSet::new();
        let mut granted = 0;
        let mut refused = 0;
        for i in 0..5000 {
            match allocate(&mut taken, &key(i), min, max) {
                Some(_) => granted += 1,
                None => refused += 1,
            }
        }
        // Every grant took a distinct port; nothing beyond the range was granted.
        assert_eq!(taken.len(), granted);
        assert!(granted <= 1000);
        assert!(granted >= 950, "probing should fill nearly all of the range, got {granted}");
        assert_eq!(granted + refused, 5000);
        // Freeing ports makes them available again.
        let freed: std::vec::Vec<u16> = taken.iter().copied().take(10).collect();
        for p in &freed {
            taken.remove(p);
        }
        let again = (0..5000).filter_map(|i| allocate(&mut taken, &key(10_000 + i), min, max)).count();
        assert_eq!(again, 10);
    }

    #[test]
    fn the_default_range_fills_far_before_probing_fails() {
        // 20,000 ports: no SYN may be refused while fewer than 85 % are taken.
        let (min, max) = (40000u16, 59999u16);
        let mut taken = HashSet::new();
        for i in 0..17_000u32 {
            let k = FlowKey::tcp(0x0a00_0001 + (i >> 16), (i as u16).to_be(), 0x0a00_0064, 9093u16.to_be());
            assert!(allocate(&mut taken, &k, min, max).is_some(), "refused at {} taken", taken.len());
        }
    }

    #[test]
    fn start_ports_are_spread_and_seeded() {
        let (min, max) = (40000u16, 59999u16);
        let starts: HashSet<u16> = (0..2000).map(|i| candidate(min, max, hash(&key(i), 1), 0)).collect();
        assert!(starts.len() > 1900, "{} distinct starts of 2000", starts.len());
        assert_ne!(hash(&key(1), 1), hash(&key(1), 2));
    }
}
