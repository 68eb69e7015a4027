//! The XDP program against a table of input frames and expected outputs, through
//! BPF_PROG_TEST_RUN (see `fixture_support` for the table and the harness). Needs root.

mod fixture_support;

use fixture_support::{Topology, fixtures};

fn root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn fixture_table() {
    if !root() {
        eprintln!("skipped: the fixture tests need root (BPF and network namespaces)");
        return;
    }
    // Dropped at the end of this function, and during unwinding if an assertion fails.
    let topo = Topology::new().expect("building the fixture topology");
    let table = fixtures();
    let failures = topo
        .run(|h| {
            let mut failures = h.run_table(&table);
            failures.extend(h.check_totals(&table));
            failures
        })
        .expect("running the fixtures in the gateway namespace");
    for f in &failures {
        eprintln!("\n{f}");
    }
    assert!(failures.is_empty(), "{} of {} fixtures (or totals) failed; see above", failures.len(), table.len());
}
