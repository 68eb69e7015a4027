//! Machine-wide CPU time from `/proc/stat` (not per namespace: softirq work of forwarded
//! packets lands on whatever CPU received them, so only the machine-wide total sees all of it).
//!
//! Busy = user + system + irq + softirq + steal. `nice` is left out on purpose: background jobs
//! that are niced (e.g. a build) do not count against the path being measured. Un-niced
//! activity of other processes on the machine does count; keep the machine otherwise idle.

use std::time::Instant;

use anyhow::{Context as _, Result};

#[derive(Clone, Copy, Debug)]
pub struct Sample {
    busy_ticks: u64,
    at: Instant,
}

pub fn sample() -> Result<Sample> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let at = Instant::now();
    let line = stat.lines().find(|l| l.starts_with("cpu ")).context("/proc/stat has no `cpu` line")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal guest guest_nice
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    Ok(Sample { busy_ticks: get(0) + get(2) + get(5) + get(6) + get(7), at })
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Busy CPU-seconds (all CPUs together) and wall seconds between two samples.
pub fn busy_between(a: Sample, b: Sample) -> (f64, f64) {
    let busy = b.busy_ticks.saturating_sub(a.busy_ticks) as f64 / ticks_per_second();
    (busy, b.at.duration_since(a.at).as_secs_f64())
}

/// Runs `f` and returns its result with the busy CPU-seconds spent meanwhile.
pub fn measure<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let a = sample()?;
    let r = f()?;
    let b = sample()?;
    Ok((r, busy_between(a, b).0))
}

/// The share (0..1) of all CPUs busy over `d` while this process does nothing: load from
/// elsewhere on the machine, which skews every number.
pub fn background_load(d: std::time::Duration) -> Result<f64> {
    let a = sample()?;
    std::thread::sleep(d);
    let (busy, wall) = busy_between(a, sample()?);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    Ok(busy / (wall * cores))
}
