//! The benchmark run: program cost, then the interleaved rounds over the paths, then the
//! report. Harness errors (a path that cannot be set up, a measurement that fails) are recorded,
//! the run goes on, and the command fails at the end; Ctrl-C stops at once, cleaning up.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use kpf_tests::{
    kafka::KafkaCluster,
    kpf_proc::{SNAT_RANGE, kpf_binary},
};

use super::{
    Options, chart, connrate, cpu, kafka, latency, machine,
    paths::{self, PathSpec},
    proc, progcost, report,
    results::{PathResult, Rep, Results, RunInfo},
    targets, throughput,
    topo::{Bench, IfaceSettings, Service},
};
use crate::util::is_root;

/// The measurements `--metrics` can name.
const MEASUREMENTS: [&str; 5] = ["prog", "bulk", "latency", "connrate", "kafka"];

struct Plan {
    smoke: bool,
    /// Subset of [`MEASUREMENTS`] to run.
    metrics: Vec<&'static str>,
    reps: u32,
    secs: u64,
    paths: Vec<&'static PathSpec>,
    prog: progcost::Options,
    out: PathBuf,
}

impl Plan {
    fn wants(&self, m: &str) -> bool {
        self.metrics.contains(&m)
    }

    fn new(o: &Options) -> Result<Plan> {
        let smoke = o.smoke;
        let reps = o.reps.unwrap_or(if smoke { 1 } else { 3 });
        let secs = o.duration.unwrap_or(if smoke { 1 } else { 5 });
        if reps == 0 || secs == 0 {
            bail!("--reps and --duration must be at least 1");
        }
        let prog = progcost::Options {
            repeat: o.prog_repeat.unwrap_or(if smoke { 10_000 } else { 1_000_000 }),
            trials: if smoke { 2 } else { 5 },
            syns: if smoke { 50 } else { 400 },
            chain: 256,
            chain_runs: if smoke { 2 } else { 8 },
        };
        let out = o.out.clone().unwrap_or_else(|| {
            let d = kpf_tests::workspace_root().join("target").join("bench");
            if smoke { d.join("smoke") } else { d }
        });
        let metrics = match &o.metrics {
            None => MEASUREMENTS.to_vec(),
            Some(list) => {
                let wanted: Vec<&str> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
                if let Some(bad) = wanted.iter().find(|w| !MEASUREMENTS.contains(w)) {
                    bail!("unknown measurement {bad:?}; known: {}", MEASUREMENTS.join(", "));
                }
                MEASUREMENTS.iter().copied().filter(|m| wanted.contains(m)).collect()
            }
        };
        Ok(Plan { smoke, metrics, reps, secs, paths: paths::select(o.paths.as_deref())?, prog, out })
    }
}

fn check_tools() -> Result<()> {
    let missing: Vec<&str> = ["iperf3", "sockperf", "haproxy", "nft", "ethtool", "tc", "ip"]
        .into_iter()
        .filter(|t| {
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(std::process::Stdio::null())
                .status()
                .map_or(true, |s| !s.success())
        })
        .collect();
    if !missing.is_empty() {
        bail!("missing tools: {} (`cargo xtask setup` installs them)", missing.join(", "));
    }
    Ok(())
}

pub fn run(opts: Options) -> Result<()> {
    if !is_root() {
        bail!("the benchmark creates network namespaces and loads XDP programs: run it as root");
    }
    let plan = Plan::new(&opts)?;
    check_tools()?;
    kpf_binary()?;
    let kafka_flavor = if plan.wants("kafka") { kafka::find()? } else { None };
    proc::install_signal_handlers();
    for name in kpf_tests::netns::sweep_stale()? {
        println!("bench: removed namespace {name} left by an earlier, killed run");
    }
    std::fs::create_dir_all(&plan.out).with_context(|| format!("creating {}", plan.out.display()))?;
    let started = Instant::now();
    let ids: Vec<&'static str> = plan.paths.iter().map(|p| p.id).collect();
    println!(
        "bench: {} × {} repetition(s), {} s per measurement{}; results in {}",
        ids.join(", "),
        plan.reps,
        plan.secs,
        if plan.smoke { " (smoke)" } else { "" },
        plan.out.display()
    );
    let mut errors = Vec::new();
    let mut notes = Vec::new();
    let mut load_note = |when: &str| -> Result<()> {
        let load = cpu::background_load(Duration::from_millis(if plan.smoke { 500 } else { 1000 }))?;
        println!("bench: background load {when}: {:.0}% of all CPUs busy (not counting niced processes)", load * 100.0);
        let mut note = format!(
            "Background load {when}: {:.0}% of all CPUs busy with the benchmark idle (niced processes not counted).",
            load * 100.0
        );
        if load > 0.05 {
            note += " Other work was running on the machine: throughput, latency and CPU figures are skewed by it.";
        }
        notes.push(note);
        Ok(())
    };
    load_note("before the run")?;

    // 1. kpf's own per-packet cost, next to an empty program.
    let prog = if plan.wants("prog") {
        println!(
            "[prog] BPF_PROG_TEST_RUN: {} trials × (repeat {} for empty / unmapped / established, {} × {} chained \
             new flows, {} distinct SYNs once each)",
            plan.prog.trials,
            plan.prog.repeat,
            plan.prog.chain_runs,
            plan.prog.chain,
            plan.prog.syns
        );
        progcost::measure(plan.prog).map(Some)
    } else {
        Ok(None)
    };
    let prog = match prog {
        Ok(None) => None,
        Ok(Some(p)) => {
            for c in &p.cases {
                println!(
                    "[prog] {:<68} {:>7.1} ns [{:.1}–{:.1}]",
                    c.label, c.summary.median, c.summary.min, c.summary.max
                );
            }
            Some(p)
        }
        Err(e) => {
            failed("[prog]", "program cost", &e, &mut errors)?;
            None
        }
    };

    // 2. The network, the same for every path.
    proc::check_interrupted()?;
    println!("[topo] building the two-NIC topology and starting the servers");
    let bench = Bench::new()?;
    let mut cluster = match &kafka_flavor {
        None => None,
        Some(flavor) => {
            println!("[kafka] starting three brokers ({}) in b1, b2, b3", flavor.describe());
            match kafka::start(&bench, flavor) {
                Ok(c) => Some(c),
                Err(e) => {
                    failed("[kafka]", "kafka", &e, &mut errors)?;
                    None
                }
            }
        }
    };
    if cluster.is_some() {
        load_note("with the Kafka brokers idle")?;
    }
    let settings = bench.settings()?;
    let settings_offloads = if plan.paths.iter().any(|p| p.offloads) {
        bench.set_sender_offloads(true)?;
        let on = bench.settings()?;
        bench.set_sender_offloads(false)?;
        Some(on)
    } else {
        None
    };
    let mut results: Vec<PathResult> = plan
        .paths
        .iter()
        .map(|p| PathResult {
            id: p.id,
            label: p.label,
            description: p.description,
            reps: Vec::new(),
            summary: Default::default(),
        })
        .collect();

    // 3. Interleaved rounds.
    let mut offloads_on = false;
    for rep in 1..=plan.reps {
        for (i, spec) in plan.paths.iter().enumerate() {
            proc::check_interrupted()?;
            if spec.offloads != offloads_on {
                bench.set_sender_offloads(spec.offloads)?;
                offloads_on = spec.offloads;
            }
            let baseline = if spec.offloads { settings_offloads.as_deref().unwrap_or(&settings) } else { &settings };
            let r = run_path(&bench, spec, rep, &plan, baseline, cluster.as_mut())?;
            for e in &r.errors {
                errors.push(format!("{} rep {rep}: {e}", spec.id));
            }
            results[i].reps.push(r);
        }
    }
    let kafka_broker = cluster.as_ref().and(kafka_flavor.as_ref()).map(|f| f.describe());
    drop(cluster);
    drop(bench);
    load_note("after the run")?;
    if plan.wants("kafka") && kafka_flavor.is_none() {
        notes.push("The Kafka scenario was skipped: no broker or no Kafka client is installed (KPF_SKIP_KAFKA=1).".into());
    }

    // 4. Report.
    for p in &mut results {
        p.summarize();
    }
    let targets = targets::evaluate(&results, prog.as_ref());
    let exhausted: Vec<String> = results
        .iter()
        .flat_map(|p| p.reps.iter().map(move |r| (p.id, r)))
        .filter_map(|(id, r)| {
            let n = *r.kpf_counters.as_ref()?.get("drop_snat_exhausted")?;
            let flows = r.kpf_counters.as_ref()?.get("new_flows").copied().unwrap_or(0);
            (n > 0).then(|| format!("{id} rep {}: {n} SYNs dropped after {flows} new flows", r.rep))
        })
        .collect();
    if !exhausted.is_empty() {
        let (snat_min, snat_max) = (SNAT_RANGE.start(), SNAT_RANGE.end());
        let per_s = snat_max - snat_min + 1;
        notes.push(format!(
            "kpf ran out of SNAT ports during the connection-rate test ({}). Every connection to the \
             echo backend needs its own gateway port from {snat_min}–{snat_max} toward the same backend address \
             and port, and a closed connection keeps its port for a 1 s grace (late FIN \
             retransmissions still find it), so a steady stream of short connections to one backend \
             can use at most about {per_s} per second; near that rate, a SYN whose 64 probed ports are \
             all in their grace is dropped. Each dropped SYN costs a client thread the 1 s SYN \
             retransmission timeout (the `slow` connections). nftables' masquerade keeps the \
             client's port when it can and has no such per-backend budget; a wider `snat_ports` \
             range raises kpf's.",
            exhausted.join("; ")
        ));
    }
    let machine = machine::machine();
    if plan.smoke {
        notes.push("Smoke run: every duration is tiny; the numbers only show that the harness works.".into());
    }
    let results = Results {
        date: machine::now_utc(),
        machine,
        run: RunInfo {
            smoke: plan.smoke,
            repetitions: plan.reps,
            seconds_per_measurement: plan.secs,
            paths: ids,
            iperf3_streams: throughput::STREAMS,
            connrate_threads: connrate::THREADS,
            prog_repeat: prog.as_ref().and_then(|p| p.case("empty")).map_or(plan.prog.repeat, |c| c.repeat),
            prog_trials: plan.prog.trials,
            prog_syns: plan.prog.syns,
            kafka_broker,
            wall_seconds: started.elapsed().as_secs_f64(),
        },
        tools: machine::tools(),
        settings,
        settings_offloads,
        paths: results,
        prog_cost: prog,
        targets,
        errors,
        notes,
    };
    report::write_json(&results, &plan.out)?;
    report::write_markdown(&results, &plan.out)?;
    chart::write(&results, &plan.out.join("chart.svg"))?;

    println!("\n{}", report::table(&results));
    for t in &results.targets {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not judged",
        };
        println!("target {:<11} {:<44} {verdict:<10} {}", t.path.unwrap_or("program"), t.goal, t.measured);
    }
    println!(
        "\nbench: wrote {}/{{results.json,results.md,chart.svg}} in {:.0} s",
        plan.out.display(),
        results.run.wall_seconds
    );
    if !results.errors.is_empty() {
        bail!("{} harness error(s), listed in results.md:\n  {}", results.errors.len(), results.errors.join("\n  "));
    }
    Ok(())
}

/// Runs `f` as one progress-reported measurement; a failure is recorded in `out.errors`.
fn step<T>(
    tag: &str,
    what: &str,
    out: &mut Rep,
    f: impl FnOnce() -> Result<T>,
    show: impl Fn(&T) -> String,
) -> Result<Option<T>> {
    let t = Instant::now();
    match f() {
        Ok(v) => {
            println!("{tag} {what:<13} {}  ({:.1} s)", show(&v), t.elapsed().as_secs_f64());
            Ok(Some(v))
        }
        Err(e) => {
            failed(&format!("{tag} {what:<13}"), what, &e, &mut out.errors)?;
            Ok(None)
        }
    }
}

/// Records a failed step and goes on (unless the user interrupted the run, which is what made it
/// fail): says so after `shown`, and adds it to `errors` as `what: error`.
fn failed(shown: &str, what: &str, e: &anyhow::Error, errors: &mut Vec<String>) -> Result<()> {
    proc::check_interrupted()?;
    println!("{shown} FAILED: {e:#}");
    errors.push(format!("{what}: {e:#}"));
    Ok(())
}

fn settings_diff(a: &[IfaceSettings], b: &[IfaceSettings]) -> Vec<String> {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x != y)
        .map(|(x, y)| {
            format!("{} {}: {:?} {:?} became {:?} {:?}", x.role, x.dev, x.qdisc, x.features, y.qdisc, y.features)
        })
        .collect()
}

/// One path, one repetition. `Err` only for Ctrl-C; everything else lands in the `Rep`.
fn run_path(
    bench: &Bench,
    spec: &'static PathSpec,
    rep: u32,
    plan: &Plan,
    baseline: &[IfaceSettings],
    cluster: Option<&mut KafkaCluster>,
) -> Result<Rep> {
    let mut out = Rep { rep, ..Rep::default() };
    let tag = format!("[rep {rep}/{}] {:<11}", plan.reps, spec.id);
    match bench.settings() {
        Ok(now) => {
            for d in settings_diff(baseline, &now) {
                out.errors.push(format!("interface settings changed before this path: {d}"));
            }
        }
        Err(e) => out.errors.push(format!("reading interface settings: {e:#}")),
    }
    let t = Instant::now();
    let mut active = match spec.start(bench) {
        Ok(a) => a,
        Err(e) => {
            failed(&format!("{tag} set-up"), "set-up", &e, &mut out.errors)?;
            return Ok(out);
        }
    };
    println!("{tag} up             ({:.1} s)", t.elapsed().as_secs_f64());
    let secs = plan.secs;

    let iperf = active.target(Service::Iperf);
    if plan.wants("bulk") {
        out.bulk_fwd =
            step(&tag, "bulk →backend", &mut out, || throughput::measure(bench, iperf, secs, false), show_bulk)?;
        if let Err(e) = active.check() {
            out.errors.push(format!("{e:#}"));
        }
        out.bulk_rev =
            step(&tag, "bulk ←backend", &mut out, || throughput::measure(bench, iperf, secs, true), show_bulk)?;
    }
    let sp = active.target(Service::Sockperf);
    if plan.wants("latency") {
        out.latency = step(
            &tag,
            "latency",
            &mut out,
            || latency::measure(bench, sp, secs),
            |l| {
                format!(
                    "RTT avg {:.1} µs, p50 {:.1}, p99 {:.1}; {:.0} req/resp per s",
                    l.rtt_avg_us, l.rtt_p50_us, l.rtt_p99_us, l.transactions_per_s
                )
            },
        )?;
    }
    let echo = active.target(Service::Echo);
    let served = bench.echo_served();
    if plan.wants("connrate") {
        out.connrate = step(
            &tag,
            "conn rate",
            &mut out,
            || {
                let kpf = active.kpf_control();
                let inspect = |port| kpf.as_ref().map(|k| paths::describe_client(k, echo.port(), port));
                connrate::measure(bench.client(), echo, Duration::from_secs(secs), &inspect)
            },
            |c| {
                format!(
                    "{:.0} conns/s ({} conns, {} failed, {} slow), CPU {:.2} s = {:.3} s/1000 conns",
                    c.conns_per_s,
                    c.conns,
                    c.errors,
                    c.slow,
                    c.cpu_s,
                    c.cpu_s_per_1000_conns()
                )
            },
        )?;
    }
    if let Some(c) = &out.connrate {
        // The server counts a connection once the client has closed it: allow those in flight.
        let served = bench.echo_served() - served;
        if served + connrate::THREADS as u64 * 2 < c.conns_total {
            out.errors
                .push(format!("the echo server served {served} connections, the client counted {}", c.conns_total));
        }
    }
    if let Some(cluster) = cluster {
        if let Some(bootstrap) = active.kafka_bootstrap() {
            let show = |k: &kafka::KafkaThroughput| {
                format!(
                    "produce {:.1} MB/s, consume {:.1} MB/s ({} messages{}), CPU {:.2} s/GB",
                    k.produce_mb_s(),
                    k.consume_mb_s(),
                    k.messages,
                    if k.capped { ", capped at 90% of a log segment per partition" } else { "" },
                    k.cpu_s_per_gb()
                )
            };
            out.kafka = step(&tag, "kafka", &mut out, || kafka::measure(bench, cluster, bootstrap, secs), show)?;
        } else {
            println!("{tag} kafka         n/a: the brokers advertise the gateway's ports, which plain routing does not map");
        }
    }
    if let Err(e) = active.check() {
        out.errors.push(format!("{e:#}"));
    }
    match active.finish() {
        Ok(f) => {
            out.kpf_counters = f.kpf_counters;
            out.warnings = f.warnings;
        }
        Err(e) => {
            proc::check_interrupted()?;
            out.errors.push(format!("tear-down: {e:#}"));
        }
    }
    Ok(out)
}

fn show_bulk(b: &throughput::Bulk) -> String {
    format!(
        "{:.2} Gbit/s ({} retransmits), CPU {:.2} s = {:.3} s/GB",
        b.gbit_s,
        b.retransmits,
        b.cpu_s,
        b.cpu_s / (b.bytes as f64 / 1e9)
    )
}
