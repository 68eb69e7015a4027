//! Request/response latency: `sockperf ping-pong --tcp --full-rtt` from the client against
//! `sockperf server --tcp` on b2 (one connection, one message in flight), both pinned to
//! [`LATENCY_CPU`]. sockperf sends warm-up
//! messages for 2 s first, then discards the test's first 400 ms and reports the rest.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{
    cpu, proc,
    topo::{Bench, LATENCY_CPU},
};

#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    /// Round-trip times in microseconds.
    pub rtt_avg_us: f64,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    pub rtt_max_us: f64,
    /// Round trips completed per second (over sockperf's valid duration).
    pub transactions_per_s: f64,
    pub observations: u64,
    pub cpu_s: f64,
}

pub fn measure(bench: &Bench, target: SocketAddrV4, secs: u64) -> Result<Latency> {
    bench.ensure_sockperf()?;
    let mut cmd = bench.client().command("taskset");
    cmd.args([
        "-c",
        LATENCY_CPU,
        "sockperf",
        "ping-pong",
        "--tcp",
        "--full-rtt",
        "-i",
        &target.ip().to_string(),
        "-p",
        &target.port().to_string(),
    ])
    .args(["-t", &secs.to_string()]);
    let (out, cpu_s) = cpu::measure(|| proc::run(&mut cmd, Duration::from_secs(secs + 30)))?;
    let mut l = parse(&out.stdout).with_context(|| format!("sockperf output:\n{}{}", out.stdout, out.stderr))?;
    l.cpu_s = cpu_s;
    Ok(l)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn number_after(text: &str, key: &str) -> Option<f64> {
    let at = text.find(key)? + key.len();
    let rest = text[at..].trim_start_matches([' ', '=']);
    let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Parses sockperf's client summary.
pub fn parse(raw: &str) -> Result<Latency> {
    let text = strip_ansi(raw);
    let valid = text.lines().find(|l| l.contains("[Valid Duration]")).context("no [Valid Duration] line")?;
    let runtime = number_after(valid, "RunTime=").context("no RunTime")?;
    let received = number_after(valid, "ReceivedMessages=").context("no ReceivedMessages")?;
    let pct = |p: &str| {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| number_after(l, "="))
            .with_context(|| format!("no percentile {p}"))
    };
    let max = text.lines().find(|l| l.contains("<MAX> observation")).and_then(|l| number_after(l, "="));
    Ok(Latency {
        rtt_avg_us: number_after(&text, "avg-rtt=").context("no avg-rtt (was --full-rtt honoured?)")?,
        rtt_p50_us: pct("50.000")?,
        rtt_p99_us: pct("99.000")?,
        rtt_max_us: max.unwrap_or(f64::NAN),
        transactions_per_s: received / runtime,
        observations: received as u64,
        cpu_s: 0.0,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_sockperf_summary() {
        let out = "sockperf: [Valid Duration] RunTime=0.550 sec; SentMessages=37639; ReceivedMessages=37639\n\
                   sockperf: \x1b[2;35m====> avg-rtt=14.598 (std-dev=53.865)\x1b[0m\n\
                   sockperf: ---> <MAX> observation = 5414.678\n\
                   sockperf: ---> percentile 99.000 =   16.113\n\
                   sockperf: ---> percentile 50.000 =   13.369\n";
        let l = super::parse(out).unwrap();
        assert_eq!((l.rtt_avg_us, l.rtt_p50_us, l.rtt_p99_us, l.rtt_max_us), (14.598, 13.369, 16.113, 5414.678));
        assert!((l.transactions_per_s - 37639.0 / 0.55).abs() < 1e-6);
    }
}
