//! results.json (everything, every repetition) and results.md (the table, the targets, how it
//! was measured).

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use kpf_tests::{kafka, kpf_proc::SNAT_RANGE};

use super::{
    results::{METRICS, Metric, PathResult, Results, Summary},
    throughput,
    topo::{FEATURES, LATENCY_CPU},
};

pub fn write_json(r: &Results, dir: &Path) -> Result<()> {
    let path = dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(r)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

pub fn write_markdown(r: &Results, dir: &Path) -> Result<()> {
    let path = dir.join("results.md");
    std::fs::write(&path, markdown(r)).with_context(|| format!("writing {}", path.display()))
}

fn num(v: f64, decimals: usize) -> String {
    format!("{v:.decimals$}")
}

fn cell(s: Option<&Summary>, decimals: usize) -> String {
    match s {
        None => "—".into(),
        Some(s) if s.n == 1 => num(s.median, decimals),
        Some(s) => format!("{} [{}–{}]", num(s.median, decimals), num(s.min, decimals), num(s.max, decimals)),
    }
}

/// The metrics the ratio columns show, with short names.
const RATIO_METRICS: [(&str, &str); 7] = [
    ("bulk_fwd_gbit_s", "→"),
    ("bulk_rev_gbit_s", "←"),
    ("rtt_p50_us", "RTT"),
    ("conns_per_s", "conn/s"),
    ("cpu_s_per_gb", "CPU/GB"),
    ("kafka_produce_mb_s", "Kafka produce"),
    ("kafka_consume_mb_s", "Kafka consume"),
];

fn ratios(p: &PathResult, reference: Option<&PathResult>) -> String {
    let Some(reference) = reference else { return "n/a".into() };
    if reference.id == p.id {
        return "(reference)".into();
    }
    let parts: Vec<String> = RATIO_METRICS
        .iter()
        .filter_map(|(key, short)| {
            let (a, b) = (p.median(key)?, reference.median(key)?);
            (b > 0.0).then(|| format!("{short} {:.2}", a / b))
        })
        .collect();
    if parts.is_empty() { "n/a".into() } else { parts.join(" · ") }
}

/// The main table: rows = paths, columns = metrics as median [min–max], then ratios.
pub fn table(r: &Results) -> String {
    let mut s = String::new();
    let headers: Vec<&str> = METRICS.iter().map(|m| m.header).collect();
    let _ = writeln!(s, "| path | {} | vs plain routing | vs nftables |", headers.join(" | "));
    let _ = writeln!(s, "|---|{}---|---|", "---|".repeat(METRICS.len()));
    for p in &r.paths {
        // Against the references of the path's own offload group.
        let reference = |role: &str| r.path(&super::paths::reference_id(p.id, role));
        let (routing, nft) = (reference("routing"), reference("nftables"));
        let cells: Vec<String> = METRICS.iter().map(|m: &Metric| cell(p.summary.get(m.key), m.decimals)).collect();
        let _ = writeln!(s, "| {} | {} | {} | {} |", p.label, cells.join(" | "), ratios(p, routing), ratios(p, nft));
    }
    s
}

fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(
        s,
        "# kpf benchmark{}\n",
        if r.run.smoke { " (smoke run: tiny durations, numbers meaningless)" } else { "" }
    );
    let _ = writeln!(
        s,
        "{} · {} ({} cores, {} GiB) · Linux {} · {} repetition(s), interleaved ({}), {} s per measurement, \
         {:.0} s in all\n",
        r.date,
        m.cpu_model,
        m.cores,
        m.memory_gib,
        m.kernel,
        r.run.repetitions,
        r.run.paths.join(" → "),
        r.run.seconds_per_measurement,
        r.run.wall_seconds
    );
    if !r.errors.is_empty() {
        let _ = writeln!(
            s,
            "**This run had errors; see [Errors](#errors). Missing cells are measurements that failed.**\n"
        );
    }

    let _ = writeln!(s, "## Results\n");
    let _ = writeln!(
        s,
        "Median [min–max] over the repetitions. Ratio columns: the path's median ÷ the reference's median, \
         the reference being the path of the same offload group (see [settings](#endpoint-and-gateway-settings)) \
         (→/← bulk, conn/s and Kafka: higher is better; RTT and CPU/GB: lower is better).\n"
    );
    s += &table(r);

    let _ = writeln!(s, "\n## Targets\n");
    let _ = writeln!(s, "| goal | path | measured (medians) | verdict |\n|---|---|---|---|");
    for t in &r.targets {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not judged",
        };
        let _ = writeln!(s, "| {} | {} | {} | {verdict} |", t.goal, t.path.unwrap_or("—"), t.measured);
    }

    let _ = writeln!(s, "\n## Per-packet program cost (BPF_PROG_TEST_RUN)\n");
    match &r.prog_cost {
        None => {
            let _ = writeln!(s, "Not measured (see errors).");
        }
        Some(p) => {
            let _ = writeln!(
                s,
                "kpf's XDP program (as `kpf run` loads it) in the fixture topology of \
                 `kpf-userspace/tests/fixture_support`, and an empty XDP program (`return XDP_PASS`, \
                 loaded with raw bpf(2)) run the same way in the same process; {} interleaved trials, \
                 median [min–max] of the kernel-reported mean ns per run.\n",
                r.run.prog_trials
            );
            let _ = writeln!(s, "| case | repeat × runs | ns per run | minus baseline |\n|---|---|---|---|");
            for c in &p.cases {
                let base = c.baseline.and_then(|b| p.case(b));
                let minus = base.map_or_else(
                    || "(baseline)".into(),
                    |b| format!("{:+.1} ns vs {}", c.summary.median - b.summary.median, b.id),
                );
                let label = if c.diagnostic { format!("*{}* (diagnostic)", c.label) } else { c.label.to_string() };
                let _ = writeln!(
                    s,
                    "| {label} | {} × {} | {} | {minus} |",
                    c.repeat,
                    c.runs_per_trial,
                    cell(Some(&c.summary), 1)
                );
            }
            let _ = writeln!(
                s,
                "\nHow: with `repeat > 1` the kernel runs the program again on the frame the previous \
                 iteration left (there is no reset between iterations). *Unmapped* frames pass untouched, \
                 so `repeat` is used as is. For the *established* case the bench opens a real connection \
                 (SYN, SYN-ACK, ACK through the program), then inserts, through the program's conntrack \
                 map, a second established entry keyed by the *rewritten* tuple (gateway:snat → \
                 backend) whose rewrite maps it back to client → frontend. Each iteration is then an \
                 established-path hit (lookup, NAT with checksum deltas, MACs, devmap redirect), \
                 alternating between the two entries: their packet counters grew by {} over {} \
                 iterations, and the frame after each even-length run equals the input ({}). For *new \
                 flows* a bench-only frontend at a backend's own address and port maps to that \
                 backend, so the SYN a new connection sends on (gateway:snat → backend) is again a SYN \
                 to a frontend with a 4-tuple never seen: each iteration opens one more connection \
                 (backend choice, next hop, SNAT port, two half-open entries); the NewFlows counter grew \
                 by {} over {} iterations, and the half-open table is cleared between runs. The \
                 *diagnostic* rows split the cost up: one LRU hash lookup in a map shaped like kpf's \
                 conntrack table prices a map operation on this machine; the two *floors* are raw programs \
                 that make exactly the map operations and helper calls of kpf's established and new-flow \
                 paths, in maps of the sizes and shapes kpf's have, and nothing else (no parsing, rewriting \
                 or conntrack logic; the floor's half-open table is cleared between runs like kpf's): \
                 kpf's cost above a floor is its own code (with the map accesses the verifier inlines), \
                 the floor is the kernel's price for those operations here plus the test run's; a \
                 *cold* new flow is one SYN \
                 per test run ({} distinct SYNs per trial through a wildcard frontend, alternating \
                 with as many through an address-specific one, which skips the locality lookup; {} \
                 in all, averaged, next to the empty program run the same way, since a single run \
                 also carries the test-run timer's overhead and starts with caches the syscall path \
                 has cooled); a SYN whose backend has no neighbour entry runs the frontend lookups \
                 and the route lookup and is dropped, so it repeats.",
                p.established_hits,
                p.established_iterations,
                if p.established_frame_restored {
                    "checked"
                } else {
                    "it was NOT: the rewrite is not its own inverse here"
                },
                p.chain_opened,
                p.chain_iterations,
                r.run.prog_syns,
                p.syns_opened
            );
        }
    }

    let _ = writeln!(s, "\n## Paths\n");
    for p in &r.paths {
        let desc = super::paths::by_id(p.id).map_or(p.description, |x| x.description);
        let _ = writeln!(s, "- **{}** (`{}`): {desc}", p.label, p.id);
    }
    let _ = writeln!(s, "\nIPVS: {}; so there is no IPVS path.", r.machine.ipvs);

    let _ = writeln!(s, "\n## Method\n");
    let (snat_min, snat_max) = (SNAT_RANGE.start(), SNAT_RANGE.end());
    let _ = writeln!(
        s,
        "- Topology: the harness's two-NIC network (`kpf_tests::topology::TwoNic`), built once for the \
         whole run: client 10.100.1.10 ── gateway eth0 10.100.1.1 | eth1 10.100.2.1 ── bridge ── \
         b1 10.100.2.21 (iperf3 :5201), b2 .22 (sockperf :11111), b3 .23 (1-byte echo :7000). \
         Each frontend port on 10.100.1.1 maps to the same port on its backend.\n\
         - Interleaving: each repetition runs every path in turn, setting it up and tearing it \
         down (nft table deleted, HAProxy or kpf stopped), so paths never overlap and slow drifts \
         of the machine spread over all paths.\n\
         - Bulk: `iperf3 -c -P {} -t {} -J` (and `-R`), receiver-side goodput, against a one-off \
         `iperf3 -s` on b1.\n\
         - Latency: `sockperf ping-pong --tcp --full-rtt -t {}` (one connection, one message in \
         flight; sockperf first sends warm-up messages for 2 s, then discards the test's first 400 ms), \
         against `sockperf server --tcp` on b2, both pinned to CPU {}: unpinned, the two ends landed on \
         one or on two CPUs from run to run and a cross-CPU wakeup of an idle vCPU costs ~20 µs here, \
         which made every path's RTT bimodal (~20 or ~60 µs). Pinned, the RTT is the sum of the work \
         along the path (the gateway's softirq work runs on that CPU too); HAProxy's own threads are \
         not pinned, so its RTT includes whatever cross-CPU wakeups its placement costs.\n\
         - Connection rate: {} client threads (Rust, in the client namespace), each looping connect / \
         send 1 byte / read 1 byte / close for {} s, against a 1-byte echo server on b3 \
         (`kpf_tests::byte_echo`, 16 worker threads); the rate counts connections completed within the \
         window. Client and gateway have `tcp_tw_reuse=1` and ports 1024–65535; the gateway reserves {snat_min}–{snat_max} (kpf's SNAT range) for every path.\n\
         - CPU: machine-wide busy time from /proc/stat (user + system + irq + softirq + steal; \
         `nice` excluded so niced background jobs do not count) over each bulk and connection-rate \
         measurement, per GB moved (both bulk directions together) and per 1000 connections.",
        throughput::STREAMS,
        r.run.seconds_per_measurement,
        r.run.seconds_per_measurement,
        LATENCY_CPU,
        r.run.connrate_threads,
        r.run.seconds_per_measurement,
    );
    if let Some(broker) = &r.run.kafka_broker {
        let _ = writeln!(
            s,
            "- Kafka: three brokers ({broker}) in b1–b3, each with an EXTERNAL listener on :{} \
             advertised as `{}:{}` for broker 1 (port = {} + id), names the client namespace resolves to the gateway; every \
             path but plain routing maps that gateway port to the broker (plain routing cannot serve these \
             clients: the brokers advertise the gateway's ports). A confluent-kafka client in the client \
             namespace (`xtask/scripts/kafka_throughput.py`) bootstraps through port {}, creates a topic with one partition per broker and replication factor 1 (every \
             byte crosses the path once) and 2 GiB log segments (crabka 0.3.8 skips data when a fetch \
             reads on into the next segment, so production also stops at 90% of one), produces {} B random messages (acks=all, linger 5 ms, no \
             compression) for {} s and flushes (produce MB/s: bytes acknowledged ÷ first send to last \
             acknowledgement), reads them all back from the beginning (consume MB/s; with a 64 MB \
             prefetch queue, and a 10 ms pause when it is full instead of librdkafka's 1 s, which \
             made paths faster than the client's drain read slow), and deletes the topic. MB = 10⁶ bytes of message values. CPU as above over both phases, per GB produced \
             plus consumed.",
            kafka::EXTERNAL_PORT,
            kafka::advertised_host(1),
            kafka::advertised_port(1),
            kafka::BOOTSTRAP_PORT,
            kafka::advertised_port(1),
            super::kafka::MESSAGE_BYTES,
            r.run.seconds_per_measurement,
        );
    }
    let tools: Vec<String> = r.tools.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let _ = writeln!(s, "- Tools: {}.", tools.join("; "));

    let _ = writeln!(s, "\n## Endpoint and gateway settings\n");
    let _ = writeln!(
        s,
        "Read back with `ethtool -k`, `ip link` and `tc qdisc` before the first path; the same for every \
         path of a group (re-read at each path's start and compared). Paths are only compared within \
         their group. **Offloads off** (the paths without a suffix): endpoints compute and verify \
         checksums in software (tx/rx checksum offload off, hence no TSO), because native veth XDP \
         loses CHECKSUM_PARTIAL. HAProxy is the exception there: it sends from the gateway's own \
         sockets, and the gateway's interfaces keep their transmit offloads (the same for every \
         path), so its packets leave as 64 KB aggregates whose checksum no one on veth computes or \
         verifies. **Offloads on** (the `-offload` paths): the endpoints send with checksum and \
         segmentation offload, as Linux hosts normally do (64 KB CHECKSUM_PARTIAL GSO aggregates); \
         on veth such a packet's checksum is never filled in, and receivers trust it whichever \
         path carried it. In both, the gateway interfaces and bridge ports keep `rx off` so nothing \
         on the way marks a packet as verified that was not sent that way.\n"
    );
    let groups = [("offloads off", Some(&r.settings)), ("offloads on", r.settings_offloads.as_ref())];
    for (name, settings) in groups {
        let Some(settings) = settings else { continue };
        let _ = writeln!(s, "\n{name}:\n");
        let _ = writeln!(s, "| interface | MTU | qdisc | {} |", FEATURES.join(" | "));
        let _ = writeln!(s, "|---|---|---|{}", "---|".repeat(FEATURES.len()));
        for i in settings {
            let f: Vec<&str> = FEATURES.iter().map(|f| i.feature(f)).collect();
            let _ = writeln!(
                s,
                "| {} {}{} | {} | {} | {} |",
                i.role,
                i.dev,
                if i.endpoint { " (endpoint)" } else { "" },
                i.mtu,
                i.qdisc,
                f.join(" | ")
            );
        }
    }

    let kpf_paths: Vec<&PathResult> =
        r.paths.iter().filter(|p| p.reps.iter().any(|x| x.kpf_counters.is_some())).collect();
    if !kpf_paths.is_empty() {
        let _ = writeln!(s, "\n## kpf counters at exit (non-zero)\n");
        for p in kpf_paths {
            for rep in &p.reps {
                if let Some(c) = &rep.kpf_counters {
                    let nz: Vec<String> = c.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
                    let _ = writeln!(
                        s,
                        "- {} rep {}: {}",
                        p.id,
                        rep.rep,
                        if nz.is_empty() { "all zero".into() } else { nz.join(" ") }
                    );
                }
            }
        }
    }

    let mut warnings = Vec::new();
    for p in &r.paths {
        for rep in &p.reps {
            for w in &rep.warnings {
                warnings.push(format!("{} rep {}: {w}", p.id, rep.rep));
            }
            if let Some(c) = &rep.connrate
                && (c.errors > 0 || c.slow > 0)
            {
                warnings.push(format!(
                    "{} rep {}: connection rate: {} failed and {} slow (>500 ms, a lost SYN) of {} connections{}",
                    p.id,
                    rep.rep,
                    c.errors,
                    c.slow,
                    c.conns_total,
                    failures(&c.failures)
                ));
            }
        }
    }
    if !warnings.is_empty() || !r.notes.is_empty() {
        let _ = writeln!(s, "\n## Notes\n");
        for n in r.notes.iter().chain(&warnings) {
            let _ = writeln!(s, "- {n}");
        }
    }
    if !r.errors.is_empty() {
        let _ = writeln!(s, "\n## Errors\n");
        for e in &r.errors {
            let _ = writeln!(s, "- {}", e.replace('\n', " "));
        }
    }
    s
}

/// The recorded failures of a connection-rate round, for its note.
fn failures(f: &[super::connrate::Failure]) -> String {
    let each: Vec<String> = f
        .iter()
        .map(|f| {
            let port = f.client_port.map_or_else(|| "no client port".into(), |p| format!("client port {p}"));
            let fwd = f.forwarder.as_ref().map_or(String::new(), |w| format!(" ({w})"));
            format!("{port}, after {} ms: {}{fwd}", f.after_ms, f.error)
        })
        .collect();
    if each.is_empty() { String::new() } else { format!("; {}", each.join("; ")) }
}
