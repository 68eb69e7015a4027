//! Per-CPU counters: plain increments, no atomics needed.

use kpf_common::Counter;

use aya_ebpf::maps::PerCpuArray;
use kpf_common::FrontendStats;

use crate::maps::{BACKEND_STATS, FRONTEND_STATS, STATS};

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = STATS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

/// Counts a packet of a connection toward its frontend and its backend.
#[inline(always)]
pub fn traffic(frontend_id: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    add(&FRONTEND_STATS, frontend_id, bytes, new_flow);
    add(&BACKEND_STATS, backend_id, bytes, new_flow);
}

#[inline(always)]
fn add(map: &PerCpuArray<FrontendStats>, id: u32, bytes: u64, new_flow: bool) {
    if let Some(p) = map.get_ptr_mut(id) {
        // SAFETY: as above.
        let s = unsafe { &mut *p };
        s.packets += 1;
        s.bytes += bytes;
        if new_flow {
            s.new_flows += 1;
        }
    }
}
