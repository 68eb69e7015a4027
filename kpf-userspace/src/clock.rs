//! The kernel's tick, which the program's clock counts in (see `kpf_common::Config::tick_ns`).

use crate::error::{Error, Result};

/// Nanoseconds per kernel tick (jiffy). CLOCK_MONOTONIC_COARSE advances once per tick, and its
/// resolution is exactly the kernel's TICK_NSEC.
pub fn tick_ns() -> Result<u32> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-pointer.
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } != 0 {
        return Err(Error::Environment(format!(
            "clock_getres(CLOCK_MONOTONIC_COARSE): {}",
            std::io::Error::last_os_error()
        )));
    }
    // Linux allows HZ from 100 to 1000 (ticks of 1 to 10 ms); anything else is not a tick.
    match (ts.tv_sec, ts.tv_nsec) {
        (0, ns @ 1_000_000..=10_000_000) => Ok(ns as u32),
        (s, ns) => Err(Error::Environment(format!(
            "the coarse clock's resolution is {s} s + {ns} ns, not a kernel tick (1-10 ms); kpf cannot tell the tick length"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tick_is_a_known_hz() {
        let ns = super::tick_ns().expect("tick length");
        // TICK_NSEC = (NSEC_PER_SEC + HZ/2) / HZ for the HZ values Kconfig offers.
        let known = [100u64, 250, 300, 1000].map(|hz| ((1_000_000_000 + hz / 2) / hz) as u32);
        assert!(known.contains(&ns), "tick of {ns} ns is none of {known:?}");
    }
}
