//! Picking a backend for a new connection to a frontend with several.
//!
//! The daemon fills a Maglev table per such frontend (kpf-userspace `maglev.rs`); the kernel
//! hashes the connection into a slot. The hash leaves out the destination address: behind a cloud
//! load balancer each gateway may see its own address there, and two gateways with the same config
//! must pick the same backend for the same client connection.

use crate::{maps::FlowKey, maps::MAGLEV_SIZE};

/// A fixed, seedless hash of the client side of a connection and the frontend port.
#[inline(always)]
pub const fn flow_hash(key: &FlowKey) -> u32 {
    crate::snat::hash(&FlowKey::tcp(key.src_addr, key.src_port, 0, key.dst_port), 0x6b70_6631)
}

/// The Maglev slot of a connection.
#[inline(always)]
pub const fn slot(key: &FlowKey) -> u32 {
    flow_hash(key) % MAGLEV_SIZE
}

/// Index of a slot of table `table` in the flat array of tables.
#[inline(always)]
pub const fn table_index(table: u32, slot: u32) -> u32 {
    table * MAGLEV_SIZE + slot
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignores_the_destination_address_and_spreads() {
        let a = FlowKey::tcp(0x0a00_0001, 40000u16.to_be(), 0x0a00_0064, 9092u16.to_be());
        let b = FlowKey { dst_addr: 0x0a00_0099, ..a };
        assert_eq!(slot(&a), slot(&b));
        let mut hits = [0u32; 8];
        for p in 0..8000u16 {
            let k = FlowKey::tcp(0x0a00_0001, (30000 + p).to_be(), 0, 9092u16.to_be());
            hits[(slot(&k) % 8) as usize] += 1;
        }
        assert!(hits.iter().all(|h| (800..1200).contains(h)), "{hits:?}");
    }
}
