//! Conntrack garbage collection: frees the entries (and so the SNAT ports) of connections idle
//! past their state's timeout. The kernel already ignores such entries; this makes room.

use std::collections::HashMap;

use kpf_common::{Flow, FlowKey, tcp};

use crate::{error::Result, loader::Dataplane};

/// Removes expired connections; returns how many conntrack entries went. A connection goes only
/// when both its entries have expired, so one quiet direction never cuts a live connection.
pub fn collect(dp: &mut Dataplane, timeouts_ns: &[u64; tcp::STATE_COUNT], now_ns: u64) -> Result<usize> {
    let snapshot = snapshot(dp)?;
    sweep(dp, &snapshot, timeouts_ns, now_ns)
}

/// Both tables as they are now.
pub fn snapshot(dp: &Dataplane) -> Result<HashMap<FlowKey, Flow>> {
    Ok(dp.flows()?.into_iter().collect())
}

/// Removes the connections that had expired in `flows` and still have: every entry is read
/// again just before it goes, as the dataplane may have reused its key for a new connection
/// since (a walk of a large table takes a while).
pub fn sweep(
    dp: &mut Dataplane,
    flows: &HashMap<FlowKey, Flow>,
    timeouts_ns: &[u64; tcp::STATE_COUNT],
    now_ns: u64,
) -> Result<usize> {
    let expired = |f: &Flow| tcp::expired(timeouts_ns, f.state, f.last_seen_ns, now_ns);
    let mut removed = 0;
    for (key, flow) in flows {
        if !expired(flow) {
            continue;
        }
        // The peer entry counts only while it is this connection's (its rewrite leads back here).
        let peer = FlowKey::reply_of(&flow.nat);
        let live_peer = |p: &Flow| !expired(p) && FlowKey::reply_of(&p.nat) == *key;
        if flows.get(&peer).is_some_and(live_peer) || dp.flow(&peer)?.is_some_and(|p| live_peer(&p)) {
            continue;
        }
        if dp.remove_flow_if(key, expired)? {
            removed += 1;
        }
    }
    Ok(removed)
}
