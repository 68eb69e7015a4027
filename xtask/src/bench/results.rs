//! What a run produces (serialised to results.json), the metric table that drives the report and
//! the chart, and median/min/max summaries.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    connrate::ConnRate, kafka::KafkaThroughput, latency::Latency, machine::Machine, progcost::ProgCost,
    targets::Target, throughput::Bulk, topo::IfaceSettings,
};

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

/// Median (mean of the middle two for an even count), min and max of the finite values.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    Some(Summary { median, min: v[0], max: v[n - 1], n })
}

/// One repetition of one path: every metric's raw result.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Rep {
    pub rep: u32,
    /// Client -> backend.
    pub bulk_fwd: Option<Bulk>,
    /// Backend -> client (`iperf3 -R`).
    pub bulk_rev: Option<Bulk>,
    pub latency: Option<Latency>,
    pub connrate: Option<ConnRate>,
    /// Kafka producer then consumer (not on plain routing: see kafka.rs).
    pub kafka: Option<KafkaThroughput>,
    /// kpf's global counters when it stopped (kpf paths).
    pub kpf_counters: Option<BTreeMap<String, u64>>,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// A column of the results: how to get it from a repetition, and which way is better.
pub struct Metric {
    pub key: &'static str,
    pub header: &'static str,
    /// Short name for the chart, if charted.
    pub chart: Option<&'static str>,
    pub higher_is_better: bool,
    pub decimals: usize,
    pub get: fn(&Rep) -> Option<f64>,
}

fn cpu_per_gb(r: &Rep) -> Option<f64> {
    let (f, b) = (r.bulk_fwd.as_ref()?, r.bulk_rev.as_ref()?);
    Some((f.cpu_s + b.cpu_s) / ((f.bytes + b.bytes) as f64 / 1e9))
}

pub const METRICS: &[Metric] = &[
    Metric {
        key: "bulk_fwd_gbit_s",
        header: "bulk →backend Gbit/s",
        chart: Some("bulk →backend"),
        higher_is_better: true,
        decimals: 2,
        get: |r| Some(r.bulk_fwd.as_ref()?.gbit_s),
    },
    Metric {
        key: "bulk_rev_gbit_s",
        header: "bulk ←backend Gbit/s",
        chart: Some("bulk ←backend"),
        higher_is_better: true,
        decimals: 2,
        get: |r| Some(r.bulk_rev.as_ref()?.gbit_s),
    },
    Metric {
        key: "rtt_avg_us",
        header: "RTT avg µs",
        chart: None,
        higher_is_better: false,
        decimals: 1,
        get: |r| Some(r.latency.as_ref()?.rtt_avg_us),
    },
    Metric {
        key: "rtt_p50_us",
        header: "RTT p50 µs",
        chart: Some("1 / RTT p50"),
        higher_is_better: false,
        decimals: 1,
        get: |r| Some(r.latency.as_ref()?.rtt_p50_us),
    },
    Metric {
        key: "rtt_p99_us",
        header: "RTT p99 µs",
        chart: None,
        higher_is_better: false,
        decimals: 1,
        get: |r| Some(r.latency.as_ref()?.rtt_p99_us),
    },
    Metric {
        key: "transactions_per_s",
        header: "req/resp per s",
        chart: None,
        higher_is_better: true,
        decimals: 0,
        get: |r| Some(r.latency.as_ref()?.transactions_per_s),
    },
    Metric {
        key: "conns_per_s",
        header: "conns/s",
        chart: Some("conns/s"),
        higher_is_better: true,
        decimals: 0,
        get: |r| Some(r.connrate.as_ref()?.conns_per_s),
    },
    Metric {
        key: "cpu_s_per_gb",
        header: "CPU s/GB",
        chart: Some("GB per CPU-s"),
        higher_is_better: false,
        decimals: 3,
        get: cpu_per_gb,
    },
    Metric {
        key: "cpu_s_per_1000_conns",
        header: "CPU s/1000 conns",
        chart: Some("conns per CPU-s"),
        higher_is_better: false,
        decimals: 3,
        get: |r| Some(r.connrate.as_ref()?.cpu_s_per_1000_conns()),
    },
    // Not charted: the chart is relative to plain routing, which has no Kafka figures.
    Metric {
        key: "kafka_produce_mb_s",
        header: "Kafka produce MB/s",
        chart: None,
        higher_is_better: true,
        decimals: 1,
        get: |r| Some(r.kafka.as_ref()?.produce_mb_s()),
    },
    Metric {
        key: "kafka_consume_mb_s",
        header: "Kafka consume MB/s",
        chart: None,
        higher_is_better: true,
        decimals: 1,
        get: |r| Some(r.kafka.as_ref()?.consume_mb_s()),
    },
    Metric {
        key: "kafka_cpu_s_per_gb",
        header: "Kafka CPU s/GB",
        chart: None,
        higher_is_better: false,
        decimals: 2,
        get: |r| Some(r.kafka.as_ref()?.cpu_s_per_gb()),
    },
];

#[derive(Clone, Debug, Serialize)]
pub struct PathResult {
    pub id: &'static str,
    pub label: &'static str,
    pub description: &'static str,
    pub reps: Vec<Rep>,
    /// Per metric key, over the repetitions that produced it.
    pub summary: BTreeMap<&'static str, Summary>,
}

impl PathResult {
    pub fn summarize(&mut self) {
        self.summary = METRICS
            .iter()
            .filter_map(|m| {
                let v: Vec<f64> = self.reps.iter().filter_map(m.get).collect();
                Some((m.key, summarize(&v)?))
            })
            .collect();
    }

    pub fn median(&self, key: &str) -> Option<f64> {
        self.summary.get(key).map(|s| s.median)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RunInfo {
    pub smoke: bool,
    pub repetitions: u32,
    pub seconds_per_measurement: u64,
    pub paths: Vec<&'static str>,
    pub iperf3_streams: u32,
    pub connrate_threads: usize,
    pub prog_repeat: u32,
    pub prog_trials: u32,
    pub prog_syns: u32,
    /// The brokers of the Kafka scenario, if it ran.
    pub kafka_broker: Option<String>,
    pub wall_seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub date: String,
    pub machine: Machine,
    pub run: RunInfo,
    pub tools: BTreeMap<&'static str, String>,
    pub settings: Vec<IfaceSettings>,
    /// The same with the senders' offloads on, if any path of that group ran.
    pub settings_offloads: Option<Vec<IfaceSettings>>,
    pub paths: Vec<PathResult>,
    pub prog_cost: Option<ProgCost>,
    pub targets: Vec<Target>,
    /// Harness errors (a path or metric that failed). Non-empty means a failed run.
    pub errors: Vec<String>,
    pub notes: Vec<String>,
}

impl Results {
    pub fn path(&self, id: &str) -> Option<&PathResult> {
        self.paths.iter().find(|p| p.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let s = summarize(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(summarize(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(summarize(&[]).is_none());
        assert_eq!(summarize(&[f64::NAN, 1.0]).unwrap().n, 1);
    }
}
