//! Waiting for a condition by polling it: the one readiness loop the tests share.

use std::time::{Duration, Instant};

/// Asks `f` every `every` until it gives `Some`, and returns the value with how long it took;
/// panics with `what` once `limit` has passed.
pub fn poll<T>(limit: Duration, every: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(every);
    }
}
