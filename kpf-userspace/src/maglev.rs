//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights: the table the kernel
//! picks a backend from for a new connection to a frontend with several backends.
//!
//! The table depends only on the set of (backend, weight) pairs, not on their order in the
//! config, so two gateways with the same config build the same table and send the same
//! connection to the same backend. Removing a backend moves (almost) only the slots it held.

use std::net::SocketAddrV4;

use kpf_common::MAGLEV_SIZE;

/// One candidate: its address (which seeds its permutation), the id the kernel knows it by, and
/// its weight (its share of slots is proportional; 0 takes none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub addr: SocketAddrV4,
    pub id: u32,
    pub weight: u32,
}

fn fnv1a(data: &[u8], basis: u64) -> u64 {
    data.iter().fold(basis, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn key(addr: &SocketAddrV4) -> [u8; 6] {
    let [a, b, c, d] = addr.ip().octets();
    let [p0, p1] = addr.port().to_be_bytes();
    [a, b, c, d, p0, p1]
}

/// Fills a table of `MAGLEV_SIZE` backend ids. Empty if no candidate has a weight.
pub fn build(candidates: &[Candidate]) -> Vec<u32> {
    let m = MAGLEV_SIZE as u64;
    let mut cs: Vec<Candidate> = candidates.iter().copied().filter(|c| c.weight > 0).collect();
    if cs.is_empty() {
        return Vec::new();
    }
    cs.sort_by_key(|c| (*c.addr.ip(), c.addr.port()));
    let perms: Vec<(u64, u64)> = cs
        .iter()
        .map(|c| {
            let k = key(&c.addr);
            let offset = fnv1a(&k, 0xcbf2_9ce4_8422_2325) % m;
            let skip = fnv1a(&k, 0x8422_2325_cbf2_9ce4) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; cs.len()];
    let mut table = vec![u32::MAX; MAGLEV_SIZE as usize];
    let mut filled = 0u64;
    'rounds: loop {
        for (i, c) in cs.iter().enumerate() {
            for _ in 0..c.weight {
                let (offset, skip) = perms[i];
                let mut slot = (offset + next[i] * skip) % m;
                while table[slot as usize] != u32::MAX {
                    next[i] += 1;
                    slot = (offset + next[i] * skip) % m;
                }
                table[slot as usize] = c.id;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'rounds;
                }
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn c(last: u8, id: u32, weight: u32) -> Candidate {
        Candidate { addr: SocketAddrV4::new([10, 64, 0, last].into(), 39092), id, weight }
    }

    fn shares(t: &[u32]) -> HashMap<u32, usize> {
        let mut m = HashMap::new();
        for id in t {
            *m.entry(*id).or_default() += 1;
        }
        m
    }

    #[test]
    fn even_shares_and_full_table() {
        let t = build(&[c(2, 0, 1), c(3, 1, 1), c(4, 2, 1)]);
        assert_eq!(t.len(), MAGLEV_SIZE as usize);
        let s = shares(&t);
        for id in 0..3 {
            let share = s[&id] as f64 / MAGLEV_SIZE as f64;
            assert!((share - 1.0 / 3.0).abs() < 0.01, "backend {id}: {share}");
        }
    }

    #[test]
    fn weights_are_proportional_and_zero_takes_nothing() {
        let t = build(&[c(2, 0, 1), c(3, 1, 3), c(4, 2, 0)]);
        let s = shares(&t);
        assert!(!s.contains_key(&2));
        let ratio = s[&1] as f64 / s[&0] as f64;
        assert!((ratio - 3.0).abs() < 0.05, "{ratio}");
        assert!(build(&[c(2, 0, 0)]).is_empty());
    }

    #[test]
    fn order_does_not_matter() {
        assert_eq!(build(&[c(2, 0, 1), c(3, 1, 2), c(4, 2, 1)]), build(&[c(4, 2, 1), c(2, 0, 1), c(3, 1, 2)]));
    }

    #[test]
    fn removing_a_backend_moves_little_else() {
        let all: Vec<Candidate> = (0..10).map(|i| c(10 + i as u8, i, 1)).collect();
        let before = build(&all);
        let after = build(&all[..9]);
        let kept = before.iter().filter(|id| **id != 9).count();
        let moved = before.iter().zip(&after).filter(|(b, a)| **b != 9 && b != a).count();
        // Maglev trades a little disruption for evenness; the paper reports a few percent.
        assert!((moved as f64) < 0.06 * kept as f64, "{moved} of {kept} slots moved");
        assert!(after.iter().all(|id| *id != 9));
    }
}
