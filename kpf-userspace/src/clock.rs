//! The clock the kernel program stamps flows with (`bpf_ktime_get_coarse_ns`).

/// CLOCK_MONOTONIC_COARSE in nanoseconds: comparable with `Flow::last_seen_ns`.
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-pointer; this clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
