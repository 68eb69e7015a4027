//! `cargo xtask test`: the project's test command. Runs, in order, stopping at the first failure:
//! 1. unit tests that need no kernel: `kpf-common`, and the `kpf` library (config, sysctl logic),
//! 2. `cargo build --release -p kpf` (userspace binary with the embedded XDP program), then the
//!    benchmark harness's unit tests (`xtask` with the `bench` feature, which links kpf),
//! 3. as root: the BPF_PROG_TEST_RUN fixtures and mutation run (`kpf --test fixtures --test
//!    mutation`), then the namespace tests (`kpf-tests`, one at a time), after sweeping namespaces
//!    a killed earlier run left behind, then `cargo xtask bench --smoke`.

use anyhow::{Result, bail};
use clap::Args;

use crate::util::{self, cargo, is_root};

#[derive(Args)]
pub struct Options {
    /// Skip the integration tests that need root instead of failing when they cannot run.
    #[arg(long)]
    pub unprivileged_only: bool,
    /// Extra arguments for the integration tests' test harness (e.g. a test name filter).
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

pub fn run(opts: Options) -> Result<()> {
    util::run(cargo().args(["test", "-p", "kpf-common", "-p", "kpf", "--lib"]))?;
    util::run(cargo().args(["build", "--release", "-p", "kpf"]))?;
    // The benchmark's own unit tests (parsers, path references, summaries): its code links kpf.
    util::run(cargo().args(["test", "--release", "-p", "xtask", "--features", "bench"]))?;

    if opts.unprivileged_only {
        println!("test: skipping the root integration tests (kpf-tests): --unprivileged-only");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the integration tests (kpf-tests) need root and were skipped; run `cargo xtask test` \
             as root, or pass --unprivileged-only to run only the unprivileged steps"
        );
    }
    for name in kpf_tests::netns::sweep_stale()? {
        println!("test: removed namespace {name} left by an earlier, killed run");
    }
    util::run(cargo().args(["test", "--release", "-p", "kpf", "--test", "fixtures", "--test", "mutation"]))?;
    util::run(
        cargo()
            .args([
                "test",
                "--release",
                "-p",
                "kpf-tests",
                "--",
                "--test-threads=1",
            ])
            .args(&opts.test_args),
    )?;
    // The benchmark harness, with tiny durations, so it keeps working (never the real run).
    util::run(cargo().args(["xtask", "bench", "--smoke"]))?;
    println!("test: all passed");
    Ok(())
}
