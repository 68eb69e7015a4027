//! What every namespace test does first: run one at a time, skip without root, and clear what a
//! killed earlier run left behind.

use std::sync::{Mutex, MutexGuard};

use crate::{bpffs, netns};

static SERIAL: Mutex<()> = Mutex::new(());

/// The process-wide test lock alone, for the few tests that need neither root nor namespaces.
pub fn lock() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Takes the process-wide test lock, checks for root and sweeps stale namespaces and bpffs
/// mounts; `None` means skip (printed with `name`).
pub fn begin(name: &str) -> Option<MutexGuard<'static, ()>> {
    let guard = lock();
    if !is_root() {
        eprintln!("{name}: skipped: needs root (namespaces, XDP, bpffs)");
        return None;
    }
    for stale in netns::sweep_stale().expect("sweeping stale namespaces") {
        eprintln!("removed namespace {stale} left by a killed run");
    }
    for stale in bpffs::sweep_stale().expect("sweeping stale bpffs mounts") {
        eprintln!("unmounted {} left by a killed run", stale.display());
    }
    eprintln!("{name}:");
    Some(guard)
}
