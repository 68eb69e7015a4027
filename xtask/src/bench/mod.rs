//! `cargo xtask bench`: kpf against the alternatives, side by side, in one interleaved run.
//!
//! Builds the two-NIC namespace topology once (client -> gateway -> b1/b2/b3), then for each
//! repetition sets up every path in turn in the gateway (plain routing, nftables NAT, HAProxy,
//! kpf native XDP, kpf generic XDP, kpf tc, then routing, nftables, HAProxy and kpf tc again
//! with the endpoints' offloads on: see [`paths::ALL`]), measures bulk throughput both ways
//! (iperf3), request/response latency (sockperf), connection rate (own client and 1-byte echo
//! server), Kafka producer and consumer throughput (a real client and three brokers) and
//! machine-wide CPU, and tears the path down. Before that it measures kpf's own
//! per-packet cost with BPF_PROG_TEST_RUN next to an empty XDP program. Writes
//! `target/bench/{results.json,results.md,chart.svg}`.
//!
//! The benchmark links the kpf library, whose build needs the BPF toolchain; the plain xtask must
//! build without it (it is what runs `cargo xtask setup`). So `cargo xtask bench` first builds
//! `kpf`, then re-runs xtask in release mode with the `bench` feature, which holds the real
//! implementation.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[cfg(feature = "bench")]
mod baseline;
#[cfg(feature = "bench")]
mod chart;
#[cfg(feature = "bench")]
mod connrate;
#[cfg(feature = "bench")]
mod cpu;
#[cfg(feature = "bench")]
mod kafka;
#[cfg(feature = "bench")]
mod latency;
#[cfg(feature = "bench")]
mod machine;
#[cfg(feature = "bench")]
mod paths;
#[cfg(feature = "bench")]
mod proc;
#[cfg(feature = "bench")]
mod progcost;
#[cfg(feature = "bench")]
mod report;
#[cfg(feature = "bench")]
mod results;
#[cfg(feature = "bench")]
mod run;
#[cfg(feature = "bench")]
mod targets;
#[cfg(feature = "bench")]
mod throughput;
#[cfg(feature = "bench")]
mod topo;

#[derive(Args, Clone, Debug)]
pub struct Options {
    /// Tiny durations, to keep the harness working (about a minute); exits non-zero on harness errors.
    #[arg(long)]
    pub smoke: bool,
    /// Repetitions of the interleaved round over all paths [default: 3, 1 with --smoke].
    #[arg(long, value_name = "N")]
    pub reps: Option<u32>,
    /// Seconds per measurement (each bulk direction, latency, connection rate) [default: 5, 1
    /// with --smoke].
    #[arg(long, value_name = "SECS")]
    pub duration: Option<u64>,
    /// Comma-separated paths to run [default: all]: routing, nftables, haproxy, kpf-native,
    /// kpf-generic, kpf-tc; with the senders' offloads on: routing-offload, nftables-offload,
    /// haproxy-offload, kpf-tc-offload.
    #[arg(long, value_name = "LIST")]
    pub paths: Option<String>,
    /// Comma-separated measurements to run [default: all]: prog (program cost), bulk, latency,
    /// connrate, kafka (producer and consumer throughput of a real Kafka client and cluster).
    #[arg(long, value_name = "LIST")]
    pub metrics: Option<String>,
    /// BPF_PROG_TEST_RUN iterations per run for the program-cost step [default: 1000000, 10000
    /// with --smoke].
    #[arg(long, value_name = "N")]
    pub prog_repeat: Option<u32>,
    /// Where to write results.json, results.md and chart.svg [default: target/bench, or
    /// target/bench/smoke with --smoke].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

pub fn run(opts: Options) -> Result<()> {
    #[cfg(feature = "bench")]
    {
        run::run(opts)
    }
    #[cfg(not(feature = "bench"))]
    {
        reexec(opts)
    }
}

/// Builds kpf, then replaces this process with the release, `bench`-featured xtask.
#[cfg(not(feature = "bench"))]
fn reexec(_opts: Options) -> Result<()> {
    use std::os::unix::process::CommandExt as _;

    use anyhow::{Context as _, bail};

    use crate::util::{self, cargo, is_root};

    if !is_root() {
        bail!("the benchmark creates network namespaces and loads XDP programs: run it as root");
    }
    util::run(cargo().args(["build", "--release", "-p", "kpf"]))?;
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "--release", "-p", "xtask", "--features", "bench", "--"])
        .args(std::env::args_os().skip(1));
    eprintln!("+ {}", util::describe(&cmd));
    let err = cmd.exec();
    Err(err).context("re-running xtask with the bench feature")
}
