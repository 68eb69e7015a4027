//! `kpf kafka verify`: connects through the gateway as the cloud client would and proves, for
//! every broker, that its advertised port reaches *that* broker.
//!
//! The proof: a verification topic with one single-replica partition per broker (Kafka and the
//! test broker both place N such partitions one per broker). A ListOffsets request for all of its
//! partitions, sent through a broker's advertised port, is answered without error only for the
//! partition that broker holds (others get NOT_LEADER_OR_FOLLOWER or UNKNOWN_TOPIC_OR_PARTITION),
//! so the answer names the broker that was reached. Nothing is written; the topic is deleted
//! afterwards unless kept.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use kafka_protocol::{
    messages::{
        ApiKey, BrokerId, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
        ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse, TopicName,
        create_topics_request::CreatableTopic,
        delete_topics_request::DeleteTopicState,
        list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic},
        metadata_request::MetadataRequestTopic,
    },
    protocol::StrBytes,
};
use serde::Serialize;

use super::client::Conn;

const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
const TOPIC_ALREADY_EXISTS: i16 = 36;

pub struct Options {
    /// The address the cloud client connects to (the endpoint, or the gateway).
    pub connect: IpAddr,
    pub bootstrap_port: u16,
    /// The verification topic; `None`: a fresh one per run (`__kpf_verify_<ms>`), so one run
    /// never sees the previous run's topic while the brokers are still deleting it.
    pub topic: Option<String>,
    pub keep_topic: bool,
    pub timeout: Duration,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub port: u16,
    pub advertised: String,
    pub expected: i32,
    pub reached: Option<i32>,
    pub rtt_ms: Option<f64>,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub cluster_id: Option<String>,
    pub bootstrap: String,
    pub rows: Vec<Row>,
    pub ok: bool,
}

/// DeleteTopics for `topic` at `version`: names up to v5, topic states from v6 (Kafka 2.8). An
/// encoder refuses a field its version lacks, so only one of the two may be set.
fn delete_request(topic: &str, version: i16, timeout: Duration) -> DeleteTopicsRequest {
    let req = DeleteTopicsRequest::default().with_timeout_ms(timeout.as_millis() as i32);
    if version >= 6 {
        req.with_topics(vec![DeleteTopicState::default().with_name(Some(topic_name(topic)))])
    } else {
        req.with_topic_names(vec![topic_name(topic)])
    }
}

fn topic_name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_owned()))
}

fn metadata(c: &mut Conn, topic: &str) -> Result<MetadataResponse, String> {
    let req = MetadataRequest::default()
        .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(topic_name(topic)))]))
        .with_allow_auto_topic_creation(false);
    Ok(c.call::<_, MetadataResponse>(ApiKey::Metadata, &req)?.0)
}

/// partition -> the broker holding it, once every partition has a leader.
fn layout(m: &MetadataResponse, topic: &str) -> Result<Option<BTreeMap<i32, i32>>, String> {
    let Some(t) = m.topics.iter().find(|t| t.name.as_ref().is_some_and(|n| n.0.as_str() == topic)) else {
        return Ok(None);
    };
    match t.error_code {
        0 => {}
        UNKNOWN_TOPIC_OR_PARTITION => return Ok(None),
        e => return Err(format!("topic {topic}: error code {e}")),
    }
    if t.partitions.is_empty() || t.partitions.iter().any(|p| p.leader_id.0 < 0) {
        return Ok(None);
    }
    Ok(Some(t.partitions.iter().map(|p| (p.partition_index, p.leader_id.0)).collect()))
}

/// Asks each broker through its advertised port for the offsets of every partition of the
/// verification topic; returns the owners of the partitions answered without error, the round
/// trip, and the error codes of the others.
fn probe(addr: SocketAddr, topic: &str, owners: &BTreeMap<i32, i32>, timeout: Duration) -> Result<(BTreeSet<i32>, Duration, Vec<i16>), String> {
    let mut c = Conn::connect(addr, timeout)?;
    let parts = owners.keys().map(|p| ListOffsetsPartition::default().with_partition_index(*p).with_timestamp(-1)).collect();
    let req = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(vec![ListOffsetsTopic::default().with_name(topic_name(topic)).with_partitions(parts)]);
    let (r, rtt) = c.call::<_, ListOffsetsResponse>(ApiKey::ListOffsets, &req)?;
    let mut answered = BTreeSet::new();
    let mut errors = Vec::new();
    for p in r.topics.iter().flat_map(|t| &t.partitions) {
        match (p.error_code, owners.get(&p.partition_index)) {
            (0, Some(owner)) => {
                answered.insert(*owner);
            }
            (e, _) => errors.push(e),
        }
    }
    Ok((answered, rtt, errors))
}

pub fn verify(o: &Options) -> Result<Report, String> {
    let generated;
    let topic: &str = match &o.topic {
        Some(t) => t,
        None => {
            let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
            generated = format!("__kpf_verify_{ms}");
            &generated
        }
    };
    let boot_addr = SocketAddr::new(o.connect, o.bootstrap_port);
    let mut boot = Conn::connect(boot_addr, o.timeout).map_err(|e| format!("bootstrap {boot_addr}: {e}"))?;
    let m = metadata(&mut boot, topic)?;
    let mut brokers: Vec<(i32, String, u16)> =
        m.brokers.iter().map(|b| (b.node_id.0, b.host.as_str().to_owned(), b.port as u16)).collect();
    brokers.sort();
    if brokers.is_empty() {
        return Err("the bootstrap answered with no brokers".into());
    }

    let mut created = false;
    let mut owners = layout(&m, topic)?;
    if owners.is_none() {
        let creatable = CreatableTopic::default()
            .with_name(topic_name(topic))
            .with_num_partitions(brokers.len() as i32)
            .with_replication_factor(1);
        let req = CreateTopicsRequest::default().with_topics(vec![creatable]).with_timeout_ms(o.timeout.as_millis() as i32);
        let (r, _) = boot.call::<_, CreateTopicsResponse>(ApiKey::CreateTopics, &req)?;
        match r.topics.first().map(|t| t.error_code) {
            Some(0) => created = true,
            Some(TOPIC_ALREADY_EXISTS) => {}
            other => return Err(format!("creating {}: error code {other:?}", topic)),
        }
        let deadline = Instant::now() + o.timeout.max(Duration::from_secs(15));
        while owners.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            owners = layout(&metadata(&mut boot, topic)?, topic)?;
        }
    }
    let owners = owners.ok_or_else(|| format!("topic {} has no leader for every partition yet", topic))?;

    let mut rows = Vec::new();
    for (id, host, port) in &brokers {
        let mut row = Row {
            port: *port,
            advertised: format!("{host}:{port}"),
            expected: *id,
            reached: None,
            rtt_ms: None,
            ok: false,
            detail: String::new(),
        };
        if !owners.values().any(|o| o == id) {
            row.detail = format!("no partition of {} is on broker {id}; use a fresh --topic", topic);
            rows.push(row);
            continue;
        }
        let addr = SocketAddr::new(o.connect, *port);
        // A partition the metadata already lists may not exist on its broker yet: when nothing
        // answers, ask again for a moment before calling it a failure.
        let deadline = Instant::now() + Duration::from_secs(5);
        let answer = loop {
            let a = probe(addr, topic, &owners, o.timeout);
            match &a {
                Ok((answered, _, _)) if answered.is_empty() && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                _ => break a,
            }
        };
        match answer {
            Err(e) => row.detail = e,
            Ok((answered, rtt, errors)) => {
                row.rtt_ms = Some((rtt.as_secs_f64() * 1e5).round() / 100.0);
                match answered.iter().collect::<Vec<_>>().as_slice() {
                    [one] => {
                        row.reached = Some(**one);
                        row.ok = **one == *id;
                        row.detail = if row.ok { "ok".into() } else { format!("reaches broker {one}, not {id}") };
                    }
                    [] => row.detail = format!("no partition answered (error codes {errors:?}): not a broker of this cluster?"),
                    many => row.detail = format!("answered for brokers {many:?}: partitions are replicated; use a fresh --topic"),
                }
            }
        }
        rows.push(row);
    }

    if created && !o.keep_topic {
        let deleted = boot.version::<DeleteTopicsRequest>(ApiKey::DeleteTopics).and_then(|v| {
            boot.call::<_, DeleteTopicsResponse>(ApiKey::DeleteTopics, &delete_request(topic, v, o.timeout))
        });
        match deleted {
            Err(e) => log::warn!("could not delete the verification topic {topic}: {e}"),
            Ok(_) => {
                // Deletion is asynchronous: wait (briefly) until the metadata no longer lists it.
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline && metadata(&mut boot, topic).is_ok_and(|m| layout(&m, topic).ok().flatten().is_some()) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
    let ok = rows.iter().all(|r| r.ok);
    Ok(Report { cluster_id: m.cluster_id.map(|c| c.as_str().to_owned()), bootstrap: boot_addr.to_string(), rows, ok })
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "cluster {} via {}", self.cluster_id.as_deref().unwrap_or("?"), self.bootstrap)?;
        writeln!(f, "{:<6} {:<56} {:>8} {:>8} {:>9}  RESULT", "PORT", "ADVERTISED", "EXPECTED", "REACHED", "RTT")?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<6} {:<56} {:>8} {:>8} {:>9}  {}{}",
                r.port,
                r.advertised,
                r.expected,
                r.reached.map_or("-".into(), |n| n.to_string()),
                r.rtt_ms.map_or("-".into(), |ms| format!("{ms:.2}ms")),
                if r.ok { "OK" } else { "FAIL" },
                if r.ok { String::new() } else { format!(" ({})", r.detail) }
            )?;
        }
        write!(f, "{}", if self.ok { "every advertised port reaches its own broker\n" } else { "FAILED\n" })
    }
}

#[cfg(test)]
mod tests {
    use kafka_protocol::protocol::{Encodable, Message};

    use super::*;

    /// Brokers before Kafka 2.8 speak DeleteTopics up to v5, which has no topic states: a request
    /// with both fields set (as verify once sent) fails to encode there, and the topic stayed.
    #[test]
    fn delete_request_encodes_at_every_version() {
        let timeout = Duration::from_secs(5);
        for v in DeleteTopicsRequest::VERSIONS.min..=DeleteTopicsRequest::VERSIONS.max {
            let mut buf = bytes::BytesMut::new();
            delete_request("__kpf_verify_1", v, timeout).encode(&mut buf, v).unwrap_or_else(|e| panic!("v{v}: {e}"));
            assert!(buf.len() > 14, "v{v}: the topic name is in the request");
        }
        let both = delete_request("t", 6, timeout).with_topic_names(vec![topic_name("t")]);
        assert!(both.encode(&mut bytes::BytesMut::new(), 5).is_err(), "the old request fails at v5");
    }
}
