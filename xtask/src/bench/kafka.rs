//! The Kafka scenario: producer and consumer throughput of a real client through each path.
//!
//! Three brokers (the Kafka end-to-end test's [`KafkaCluster`]: crabka, or Apache Kafka with
//! `KAFKA_HOME`) run in b1, b2, b3 beside the other services, each with an EXTERNAL listener on
//! `:39092` advertised as `b<id>.kafka.kpf.test:<9092 + id>`; the client namespace resolves those
//! names to the gateway, and every path but plain routing maps gateway port `9092 + id` to broker
//! `id`'s `:39092` ([`frontends`]). So, as with a cloud consumer, the client bootstraps through
//! one gateway port and then reaches each broker through its own. Plain routing has no such
//! mapping (the brokers advertise the gateway's ports), so it has no Kafka figures.
//!
//! The client is `xtask/scripts/kafka_throughput.py` (confluent-kafka, i.e. librdkafka): one
//! topic per measurement with one partition per broker and replication factor 1 (every byte
//! crosses the path once; replication would add traffic that never touches the gateway),
//! [`MESSAGE_BYTES`] messages produced with acks=all for the measurement's duration, then
//! consumed back, then the topic is deleted.

use std::{
    net::SocketAddrV4,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use kpf_tests::{
    kafka::{self, KafkaCluster},
    topology::Topology as _,
};
use serde::{Deserialize, Serialize};

use super::{proc, topo::Bench};

/// Bytes per message: large enough that the Python client's per-message cost does not set the
/// rate (with 1 KiB messages it did: about 160 MB/s whatever the path, one CPU busy in the
/// client's produce loop).
pub const MESSAGE_BYTES: u32 = 16384;

/// The brokers' frontends: gateway port `9092 + id` -> broker `id`'s EXTERNAL listener.
pub fn frontends(b: &Bench) -> Vec<(SocketAddrV4, SocketAddrV4)> {
    b.net
        .backend_addrs()
        .iter()
        .zip(1u32..)
        .map(|(&addr, id)| {
            (
                SocketAddrV4::new(b.net.frontend_addr(), kafka::advertised_port(id)),
                SocketAddrV4::new(addr, kafka::EXTERNAL_PORT),
            )
        })
        .collect()
}

/// The broker to run, or `None` (with the reason) when none is installed and `KPF_SKIP_KAFKA=1`
/// says to go on without. Checked before anything is built.
pub fn find() -> Result<Option<kafka::Flavor>> {
    kafka::find().map_err(|e| anyhow!("the Kafka scenario cannot run: {e}"))
}

/// Starts the brokers in the backends; the guard kills them and removes their files.
pub fn start(bench: &Bench, flavor: &kafka::Flavor) -> Result<KafkaCluster> {
    let net = &bench.net;
    KafkaCluster::start(
        flavor,
        net.backends(),
        net.backend_addrs(),
        net.frontend_addr(),
        net.client(),
        Duration::from_secs(60),
        proc::interrupted,
    )
    .context("starting the Kafka cluster")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KafkaThroughput {
    pub messages: u64,
    /// Production stopped before the time was up, at 90% of a log segment per partition (the
    /// script says why).
    pub capped: bool,
    pub produce_bytes: u64,
    /// First send to last acknowledgement.
    pub produce_s: f64,
    pub consume_bytes: u64,
    /// Assignment to the last message read.
    pub consume_s: f64,
    /// Busy CPU-seconds of the whole machine while producing and while consuming.
    pub produce_cpu_s: f64,
    pub consume_cpu_s: f64,
    /// Partition -> leader broker, as the client saw it.
    pub leaders: std::collections::BTreeMap<String, i64>,
}

impl KafkaThroughput {
    pub fn produce_mb_s(&self) -> f64 {
        self.produce_bytes as f64 / 1e6 / self.produce_s
    }

    pub fn consume_mb_s(&self) -> f64 {
        self.consume_bytes as f64 / 1e6 / self.consume_s
    }

    pub fn cpu_s_per_gb(&self) -> f64 {
        (self.produce_cpu_s + self.consume_cpu_s) / ((self.produce_bytes + self.consume_bytes) as f64 / 1e9)
    }
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka_throughput.py")
}

static TOPICS: AtomicU32 = AtomicU32::new(0);

/// Produces for `secs` seconds through `bootstrap` (the path's gateway port for broker 1), then
/// consumes it all back.
pub fn measure(
    bench: &Bench,
    cluster: &mut KafkaCluster,
    bootstrap: SocketAddrV4,
    secs: u64,
) -> Result<KafkaThroughput> {
    let topic = format!("kpf-bench-{}-{}", std::process::id(), TOPICS.fetch_add(1, Ordering::Relaxed));
    let deadline = secs * 6 + 60;
    let mut cmd = bench.client().command(kafka::python());
    cmd.arg(script()).args([
        "--bootstrap",
        &bootstrap.to_string(),
        "--topic",
        &topic,
        "--brokers",
        &bench.net.backends().len().to_string(),
        "--seconds",
        &secs.to_string(),
        "--size",
        &MESSAGE_BYTES.to_string(),
        "--deadline",
        &deadline.to_string(),
    ]);
    proc::die_with_parent(&mut cmd);
    // Past the client's own watchdog, with room for the cleanup it does when that fires.
    let done = kafka::run_bounded(&mut cmd, Duration::from_secs(deadline + 45), || {
        if proc::interrupted() {
            return Some("interrupted".into());
        }
        cluster.check_running().err().map(|e| e.to_string())
    })
    .context("running the Kafka client")?;
    proc::check_interrupted()?;
    let line = done.stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("the Kafka client printed no result: {done}\n{}", cluster.logs(10)))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("Kafka client: {e}\n{}", cluster.logs(10));
    }
    if !done.success() {
        bail!("the Kafka client failed: {done}");
    }
    let t: KafkaThroughput = serde_json::from_value(v).with_context(|| format!("the Kafka client's result: {line}"))?;
    if t.messages == 0 || t.consume_bytes != t.produce_bytes || t.produce_s <= 0.0 || t.consume_s <= 0.0 {
        bail!("the Kafka client's result does not add up: {line}");
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_bytes_and_seconds() {
        let t = KafkaThroughput {
            messages: 1000,
            capped: false,
            produce_bytes: 2_000_000,
            produce_s: 2.0,
            consume_bytes: 2_000_000,
            consume_s: 0.5,
            produce_cpu_s: 1.0,
            consume_cpu_s: 1.0,
            leaders: Default::default(),
        };
        assert_eq!((t.produce_mb_s(), t.consume_mb_s()), (1.0, 4.0));
        assert_eq!(t.cpu_s_per_gb(), 500.0);
    }

    #[test]
    fn the_client_script_is_where_measure_runs_it() {
        assert!(script().is_file(), "{}", script().display());
    }
}
