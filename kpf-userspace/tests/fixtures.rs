//! kpf's programs (XDP and tc) against a table of input frames and expected outputs, through
//! BPF_PROG_TEST_RUN (see `fixture_support` for the table and the harness). Needs root.

mod fixture_support;

use fixture_support::{Attach, Topology, fixtures};
use kpf_tests::serial::is_root;

#[test]
fn fixture_table() {
    table_through(Attach::Xdp);
}

/// The same table through the tc program: the same verdicts, outputs, counters and conntrack
/// state, but for the few XDP-only cases it reports as skipped.
#[test]
fn fixture_table_tc() {
    table_through(Attach::Tc);
}

fn table_through(attach: Attach) {
    if !is_root() {
        eprintln!("skipped: the fixture tests need root (BPF and network namespaces)");
        return;
    }
    // Dropped at the end of this function, and during unwinding if an assertion fails.
    let topo = Topology::new().expect("building the fixture topology");
    let table = fixtures();
    let failures = topo
        .run_at(attach, |h| {
            let mut failures = h.run_table(&table);
            failures.extend(h.check_totals(&table));
            failures
        })
        .expect("running the fixtures in the gateway namespace");
    for f in &failures {
        eprintln!("\n{f}");
    }
    assert!(
        failures.is_empty(),
        "{attach:?}: {} of {} fixtures (or totals) failed; see above",
        failures.len(),
        table.len()
    );
}
