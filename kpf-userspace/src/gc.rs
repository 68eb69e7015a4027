//! Conntrack garbage collection: frees the entries (and so the SNAT ports) of connections idle
//! past their state's timeout. The kernel already ignores such entries; this makes room.

use std::collections::HashMap;

use kpf_common::{FlowKey, tcp};

use crate::{error::Result, loader::Dataplane};

/// Removes expired connections; returns how many conntrack entries went. A connection goes only
/// when both its entries have expired, so one quiet direction never cuts a live connection.
pub fn collect(dp: &mut Dataplane, timeouts_ns: &[u64; tcp::STATE_COUNT], now_ns: u64) -> Result<usize> {
    let flows: HashMap<FlowKey, _> = dp.flows()?.into_iter().collect();
    let expired = |f: &kpf_common::Flow| tcp::expired(timeouts_ns, f.state, f.last_seen_ns, now_ns);
    let mut removed = 0;
    for (key, flow) in &flows {
        if !expired(flow) {
            continue;
        }
        let peer_live = flows.get(&FlowKey::reply_of(&flow.nat)).is_some_and(|p| !expired(p));
        if !peer_live {
            dp.remove_flow(key)?;
            removed += 1;
        }
    }
    Ok(removed)
}
