//! The clock flows are stamped with: jiffies in nanoseconds. Tick resolution is plenty for idle
//! timeouts and the SNAT grace periods, and bpf_jiffies64 is inlined by the verifier into one
//! load, where bpf_ktime_get_coarse_ns is a call (about 10 ns per packet here, with the return
//! thunk of this CPU's speculation mitigations).

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_PASS},
    helpers::generated::bpf_jiffies64,
    programs::XdpContext,
};
use kpf_common::Config;

/// Now, in the dataplane's clock: comparable with `Flow::last_seen_ns` and the timeouts.
#[inline(always)]
pub fn now(cfg: &Config) -> u64 {
    // SAFETY: helper without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    jiffies * cfg.tick_ns as u64
}

/// Writes [`now`] (native byte order) over the first 8 bytes of the frame, for the daemon, which
/// test-runs this to read the clock. XDP_ABORTED if the frame is shorter or there is no config.
#[inline(always)]
pub fn report(ctx: &XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    let Some(cfg) = crate::maps::CONFIG.get(0) else {
        return XDP_ABORTED;
    };
    if data + 8 > end {
        return XDP_ABORTED;
    }
    // SAFETY: bounds-checked above; packet memory may be misaligned.
    unsafe { core::ptr::write_unaligned(data as *mut u64, now(cfg)) };
    XDP_PASS
}
