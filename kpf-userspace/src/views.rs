//! What `kpf status`, `kpf flows` and the metrics endpoint show, read from the kernel's maps.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
};

use kpf_common::{Direction, FlowKey, FrontendKey, tcp};
use serde::{Deserialize, Serialize};

use crate::{
    daemon::Daemon,
    error::Result,
    loader::{self, Attachment},
};

#[derive(Debug, Serialize, Deserialize)]
pub struct FrontendStatus {
    pub frontend: String,
    pub backends: Vec<String>,
    #[serde(default)]
    pub allow: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub live_flows: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendStatus {
    pub backend: String,
    pub healthy: bool,
    pub draining: bool,
    pub last_error: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub live_flows: u64,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub pid: u32,
    pub uptime_s: u64,
    pub config: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    pub interfaces: Vec<Attachment>,
    pub frontends: Vec<FrontendStatus>,
    pub backends: Vec<BackendStatus>,
    pub tracked_connections: u64,
    pub counters: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FlowView {
    pub client: String,
    pub frontend: String,
    pub gateway: String,
    pub backend: String,
    pub state: String,
    pub age_s: f64,
    pub idle_s: f64,
    pub packets: u64,
    pub bytes: u64,
}

impl Daemon {
    pub fn status(&self) -> Result<Status> {
        let now = self.dp.now_ns()?;
        let mut live_fe: HashMap<u32, u64> = HashMap::new();
        let mut live_be: HashMap<u32, u64> = HashMap::new();
        let mut tracked = 0;
        for (_, f) in self.dp.flows()? {
            let open = tcp::State::from_u8(f.state).is_some_and(|s| !s.reusable());
            if f.direction == Direction::Original as u8
                && open
                && !tcp::expired(&self.kernel.timeouts_ns, f.state, f.last_seen_ns, now)
            {
                *live_fe.entry(f.frontend_id).or_default() += 1;
                *live_be.entry(f.backend_id).or_default() += 1;
                tracked += 1;
            }
        }
        let ids: HashMap<FrontendKey, u32> = self.dp.frontends()?.into_iter().map(|(k, f)| (k, f.id)).collect();
        let mut frontends = Vec::new();
        for f in &self.config.frontends {
            let id = ids.get(&loader::frontend_key(f.address, f.port)).copied();
            let s = match id {
                Some(id) => self.dp.frontend_stats(id)?,
                None => Default::default(),
            };
            frontends.push(FrontendStatus {
                frontend: f.label(),
                backends: f.backends.iter().map(ToString::to_string).collect(),
                allow: f.allow.iter().map(ToString::to_string).collect(),
                packets: s.packets,
                bytes: s.bytes,
                new_flows: s.new_flows,
                live_flows: id.and_then(|id| live_fe.get(&id).copied()).unwrap_or(0),
            });
        }
        let mut backends = Vec::new();
        for (addr, (id, healthy, draining, last_error)) in self.backend_health() {
            let s = self.dp.backend_stats(id)?;
            backends.push(BackendStatus {
                backend: addr.to_string(),
                healthy,
                draining,
                last_error,
                packets: s.packets,
                bytes: s.bytes,
                new_flows: s.new_flows,
                live_flows: live_be.get(&id).copied().unwrap_or(0),
            });
        }
        Ok(Status {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            config: self.config_path.clone(),
            pin_dir: self.config.pin_dir.clone(),
            socket: self.config.socket.clone(),
            interfaces: self.dp.attachments().to_vec(),
            frontends,
            backends,
            tracked_connections: tracked,
            counters: self.dp.counters()?.into_iter().map(|(c, v)| (c.name(), v)).collect(),
        })
    }

    /// Live connections (one row each, from the client's side), optionally of one frontend port.
    pub fn flows(&self, port: Option<u16>) -> Result<Vec<FlowView>> {
        let now = self.dp.now_ns()?;
        let all: HashMap<FlowKey, kpf_common::Flow> = self.dp.flows()?.into_iter().collect();
        let mut out = Vec::new();
        for (k, f) in &all {
            if f.direction != Direction::Original as u8 {
                continue;
            }
            if port.is_some_and(|p| kpf_common::wire::port(p) != k.dst_port) {
                continue;
            }
            let reply = all.get(&FlowKey::reply_of(&f.nat));
            let last = reply.map_or(f.last_seen_ns, |r| r.last_seen_ns.max(f.last_seen_ns));
            let secs = |ns: u64| (ns as f64 / 1e9 * 10.0).round() / 10.0;
            out.push(FlowView {
                client: loader::endpoint(k.src_addr, k.src_port).to_string(),
                frontend: loader::endpoint(k.dst_addr, k.dst_port).to_string(),
                gateway: loader::endpoint(f.nat.src_addr, f.nat.src_port).to_string(),
                backend: loader::endpoint(f.nat.dst_addr, f.nat.dst_port).to_string(),
                state: tcp::State::from_u8(f.state).map_or("unknown", tcp::State::name).to_owned(),
                age_s: secs(now.saturating_sub(f.created_ns)),
                idle_s: secs(now.saturating_sub(last)),
                packets: f.packets + reply.map_or(0, |r| r.packets),
                bytes: f.bytes + reply.map_or(0, |r| r.bytes),
            });
        }
        out.sort_by(|a, b| (&a.frontend, &a.client).cmp(&(&b.frontend, &b.client)));
        Ok(out)
    }
}
