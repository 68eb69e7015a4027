//! Per-CPU counters: plain increments, no atomics needed.

use kpf_common::Counter;

use crate::maps::{FRONTEND_STATS, STATS};

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = STATS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn frontend(id: u32, bytes: u64, new_flow: bool) {
    if let Some(p) = FRONTEND_STATS.get_ptr_mut(id) {
        // SAFETY: as above.
        let s = unsafe { &mut *p };
        s.packets += 1;
        s.bytes += bytes;
        if new_flow {
            s.new_flows += 1;
        }
    }
}
