//! The goals kpf is measured against, each judged on medians.

use serde::Serialize;

use super::{
    progcost::ProgCost,
    results::{PathResult, Summary, summarize},
};

#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub goal: String,
    /// The kpf path judged (None for the program-cost goals).
    pub path: Option<&'static str>,
    pub measured: String,
    /// None: could not be judged (a path or metric is missing).
    pub met: Option<bool>,
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt(r: Option<f64>) -> String {
    r.map_or_else(|| "n/a".into(), |r| format!("{r:.2}×"))
}

/// Judges every kpf path in `paths` (ids starting with `kpf`) and the program cost.
pub fn evaluate(paths: &[PathResult], prog: Option<&ProgCost>) -> Vec<Target> {
    let get = |id: &str| paths.iter().find(|p| p.id == id);
    let med = |id: &str, key: &str| get(id).and_then(|p| p.median(key));
    let mut out = Vec::new();
    for kpf in paths.iter().filter(|p| p.id.starts_with("kpf")) {
        let k = |key: &str| kpf.median(key);
        // Compared within its offload group only.
        let rf = |role: &str| super::paths::reference_id(kpf.id, role);
        let (routing, nftables, haproxy) = (rf("routing"), rf("nftables"), rf("haproxy"));
        let med = |id: &String, key: &str| med(id.as_str(), key);
        let mut push = |goal: &str, measured: String, met: Option<bool>| {
            out.push(Target { goal: goal.into(), path: Some(kpf.id), measured, met });
        };

        let avg = |other: &String| fmt(ratio(k("rtt_avg_us"), med(other, "rtt_avg_us")));
        let r = ratio(k("rtt_p50_us"), med(&routing, "rtt_p50_us"));
        push(
            "latency: RTT p50 ≤ 1.05× plain routing",
            format!("{} of {routing} (avg: {})", fmt(r), avg(&routing)),
            r.map(|r| r <= 1.05),
        );
        // Where plain routing (no NAT, no conntrack) stands against nftables: what no forwarder on
        // this topology can beat, printed next to the goals set relative to nftables.
        let ceiling = |key: &str| match ratio(med(&routing, key), med(&nftables, key)) {
            Some(c) => format!("; plain routing: {c:.2}×"),
            None => String::new(),
        };
        let r = ratio(k("rtt_p50_us"), med(&nftables, "rtt_p50_us"));
        push(
            "latency: RTT p50 ≤ 0.85× nftables",
            format!("{} of {nftables} (avg: {}){}", fmt(r), avg(&nftables), ceiling("rtt_p50_us")),
            r.map(|r| r <= 0.85),
        );
        let r = ratio(med(&haproxy, "rtt_p50_us"), k("rtt_p50_us"));
        let added = match (med(&haproxy, "rtt_p50_us"), k("rtt_p50_us"), med(&routing, "rtt_p50_us")) {
            (Some(h), Some(x), Some(rt)) if x - rt > 0.0 => format!(
                "; added over routing: HAProxy {:.1} µs vs kpf {:.1} µs ({:.1}×)",
                h - rt,
                x - rt,
                (h - rt) / (x - rt)
            ),
            (Some(h), Some(x), Some(rt)) => {
                format!("; added over routing: HAProxy {:.1} µs vs kpf {:.1} µs", h - rt, x - rt)
            }
            _ => String::new(),
        };
        push(
            "latency: RTT p50 ≥ 5× better than HAProxy",
            format!("HAProxy's RTT is {} kpf's{added}", fmt(r)),
            r.map(|r| r >= 5.0),
        );
        let r = ratio(k("conns_per_s"), med(&nftables, "conns_per_s"));
        push(
            "connection rate ≥ 1.2× nftables",
            format!("{} of {nftables}{}", fmt(r), ceiling("conns_per_s")),
            r.map(|r| r >= 1.2),
        );
        let both = |other: &String| {
            let f = ratio(k("bulk_fwd_gbit_s"), med(other, "bulk_fwd_gbit_s"));
            let b = ratio(k("bulk_rev_gbit_s"), med(other, "bulk_rev_gbit_s"));
            (f, b, f.zip(b).map(|(f, b)| f.min(b)))
        };
        let (f, b, m) = both(&nftables);
        push(
            "bulk ≥ nftables (both directions)",
            format!("→ {}, ← {} of {nftables}", fmt(f), fmt(b)),
            m.map(|m| m >= 1.0),
        );
        let (f, b, m) = both(&haproxy);
        push(
            "bulk ≥ 2× HAProxy (both directions)",
            format!("→ {}, ← {} of {haproxy}", fmt(f), fmt(b)),
            m.map(|m| m >= 2.0),
        );
    }
    if let Some(p) = prog {
        for (id, base, limit, goal) in [
            ("established", "empty", 60.0, "program cost: established packet ≤ 60 ns"),
            ("new-flow", "empty", 250.0, "program cost: new flow (SYN) ≤ 250 ns"),
        ] {
            let (Some(c), Some(b)) = (p.case(id), p.case(base)) else { continue };
            let ns = c.summary.median;
            // The issue asks for the program's own cost, measured next to an empty program: what
            // the empty one costs is the test run's loop (the call into the program and its
            // return), which a driver pays per packet whatever program it runs. Judged on each
            // trial's difference (both ran in it), free of the machine's drift between trials.
            let Some(own) = per_trial_excess(&c.ns, &b.ns) else { continue };
            // The floor program makes the same map operations and helper calls with no other
            // work: with these operations no code could go below it on this machine; above it is
            // kpf's own code. The two ran in the same trials, so each trial's difference is free
            // of the machine's drift between trials, which the two medians are not.
            let floor = match p.case(&format!("floor-{id}")) {
                Some(f) => {
                    let own = per_trial_excess(&c.ns, &f.ns).map_or_else(
                        || "n/a".into(),
                        |o| format!("{:+.1} ns [{:+.1} to {:+.1}] (per trial)", o.median, o.min, o.max),
                    );
                    format!(
                        "; the floor (the same map operations and helper calls with nothing else, test run \
                         included): {:.1} ns, so kpf's own code {own}",
                        f.summary.median
                    )
                }
                None => String::new(),
            };
            out.push(Target {
                goal: goal.into(),
                path: None,
                measured: format!(
                    "{:.1} ns [{:.1} to {:.1}] more than the empty program per trial ({ns:.1} ns per run as the \
                     kernel reports it, the empty program {:.1} ns){floor}",
                    own.median,
                    own.min,
                    own.max,
                    b.summary.median
                ),
                met: Some(own.median <= limit),
            });
        }
    }
    out
}

/// How much `a` exceeded `b` in each trial (both measured in every trial, in order), summarised.
fn per_trial_excess(a: &[f64], b: &[f64]) -> Option<Summary> {
    let d: Vec<f64> = a.iter().zip(b).map(|(a, b)| a - b).collect();
    summarize(&d)
}
