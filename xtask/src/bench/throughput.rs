//! Bulk throughput: `iperf3 -c -P 4 -J` from the client (`-R`: the backend sends) against a
//! one-off `iperf3 -s` on b1, with the machine's busy CPU time over the transfer.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde_json::Value;

use super::{cpu, proc, topo::Bench};

/// Parallel TCP streams per test.
pub const STREAMS: u32 = 4;

#[derive(Clone, Debug, Serialize)]
pub struct Bulk {
    /// Goodput seen by the receiver, all streams together.
    pub gbit_s: f64,
    pub bytes: u64,
    pub seconds: f64,
    pub retransmits: u64,
    /// Busy CPU-seconds of the whole machine during the test.
    pub cpu_s: f64,
}

pub fn measure(bench: &Bench, target: SocketAddrV4, secs: u64, reverse: bool) -> Result<Bulk> {
    let mut server = bench.iperf_server()?;
    let mut cmd = bench.client().command("iperf3");
    cmd.args(["-c", &target.ip().to_string(), "-p", &target.port().to_string()]).args([
        "-P",
        &STREAMS.to_string(),
        "-t",
        &secs.to_string(),
        "-J",
        "--connect-timeout",
        "3000",
    ]);
    if reverse {
        cmd.arg("-R");
    }
    let (out, cpu_s) = cpu::measure(|| proc::run_unchecked(&mut cmd, Duration::from_secs(secs + 30)))?;
    let server_log = server.stop();
    let mut bulk = parse(&out.stdout).with_context(|| {
        format!("iperf3 client ({}): {}; server: {}", out.status, out.stderr.trim(), server_log.trim())
    })?;
    bulk.cpu_s = cpu_s;
    Ok(bulk)
}

/// Reads the receiver's totals from `iperf3 -J` output.
pub fn parse(json: &str) -> Result<Bulk> {
    let v: Value = serde_json::from_str(json).context("iperf3 printed no JSON")?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {e}");
    }
    let recv = &v["end"]["sum_received"];
    let bytes = recv["bytes"].as_u64().context("no end.sum_received.bytes")?;
    let seconds = recv["seconds"].as_f64().context("no end.sum_received.seconds")?;
    let bps = recv["bits_per_second"].as_f64().context("no end.sum_received.bits_per_second")?;
    let retransmits = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    if bytes == 0 {
        bail!("iperf3 moved no data");
    }
    Ok(Bulk { gbit_s: bps / 1e9, bytes, seconds, retransmits, cpu_s: 0.0 })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_receiver_totals() {
        let j = r#"{"end":{"sum_sent":{"bytes":10,"retransmits":3},"sum_received":{"bytes":1000000000,"seconds":2.0,"bits_per_second":4e9}}}"#;
        let b = super::parse(j).unwrap();
        assert_eq!((b.bytes, b.retransmits), (1_000_000_000, 3));
        assert!((b.gbit_s - 4.0).abs() < 1e-9);
        assert!(super::parse(r#"{"error":"unable to connect"}"#).is_err());
    }
}
