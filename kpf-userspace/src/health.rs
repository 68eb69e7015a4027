//! Active health checks: one task per backend, NLB-style consecutive-result thresholds.

use std::{net::SocketAddrV4, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};

use crate::config::{CheckKind, Health};

/// One check's outcome, for the daemon's loop.
#[derive(Debug)]
pub struct Outcome {
    pub backend: SocketAddrV4,
    pub result: Result<(), String>,
}

/// A backend's health as the thresholds see it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct State {
    pub healthy: bool,
    /// Consecutive results agreeing with neither threshold yet, for the current verdict.
    #[serde(skip)]
    streak: u32,
    pub last_error: Option<String>,
}

impl Default for State {
    /// Backends start healthy: at start-up, and above all when adopting a running dataplane,
    /// traffic must not pause for `healthy_threshold` intervals.
    fn default() -> Self {
        State { healthy: true, streak: 0, last_error: None }
    }
}

impl State {
    /// Records one result; returns true when the verdict flips.
    pub fn record(&mut self, result: &Result<(), String>, h: &Health) -> bool {
        self.last_error = result.as_ref().err().cloned();
        let agrees = result.is_ok() == self.healthy;
        if agrees {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let needed = if self.healthy { h.unhealthy_threshold } else { h.healthy_threshold };
        if self.streak >= needed {
            self.healthy = !self.healthy;
            self.streak = 0;
            return true;
        }
        false
    }
}

/// Kafka ApiVersions v0 with correlation id `id` and client id "kpf-health".
fn api_versions_request(id: i32) -> Vec<u8> {
    let client = b"kpf-health";
    let mut body = Vec::new();
    body.extend_from_slice(&18i16.to_be_bytes()); // ApiVersions
    body.extend_from_slice(&0i16.to_be_bytes()); // version 0
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(&(client.len() as i16).to_be_bytes());
    body.extend_from_slice(client);
    let mut msg = (body.len() as i32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

async fn probe(addr: SocketAddrV4, kind: CheckKind) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    if kind != CheckKind::Kafka {
        return Ok(());
    }
    let id = 0x6b70_6600;
    s.write_all(&api_versions_request(id)).await.map_err(|e| format!("send ApiVersions: {e}"))?;
    let mut head = [0u8; 10];
    s.read_exact(&mut head).await.map_err(|e| format!("read ApiVersions answer: {e}"))?;
    let got = i32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    let error = i16::from_be_bytes([head[8], head[9]]);
    // Read the rest too: closing with unread data would send the broker an RST (and a warning
    // in its log) on every check.
    let size = i32::from_be_bytes([head[0], head[1], head[2], head[3]]).clamp(6, 1 << 20) as u64;
    let mut rest = Vec::new();
    (&mut s).take(size - 6).read_to_end(&mut rest).await.map_err(|e| format!("read ApiVersions answer: {e}"))?;
    let _ = s.shutdown().await;
    if got != id {
        return Err(format!("ApiVersions answer has correlation id {got}, sent {id}"));
    }
    if error != 0 {
        return Err(format!("ApiVersions error code {error}"));
    }
    Ok(())
}

/// One check within `timeout`.
pub async fn check(addr: SocketAddrV4, kind: CheckKind, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, probe(addr, kind)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {}", humantime::format_duration(timeout))),
    }
}

/// Checks `addr` every interval until aborted, reporting each result.
pub fn spawn(addr: SocketAddrV4, h: Health, out: mpsc::Sender<Outcome>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(h.interval.0);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let result = check(addr, h.check, h.timeout.0).await;
            if out.send(Outcome { backend: addr, result }).await.is_err() {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h() -> Health {
        Health { healthy_threshold: 2, unhealthy_threshold: 3, ..Health::default() }
    }

    #[test]
    fn thresholds_need_consecutive_results() {
        let (ok, bad) = (Ok(()), Err("refused".to_owned()));
        let mut s = State::default();
        assert!(!s.record(&bad, &h()) && !s.record(&bad, &h()) && s.healthy);
        assert!(!s.record(&ok, &h()), "a success resets the failure streak");
        assert!(!s.record(&bad, &h()) && !s.record(&bad, &h()));
        assert!(s.record(&bad, &h()) && !s.healthy, "third consecutive failure flips");
        assert_eq!(s.last_error.as_deref(), Some("refused"));
        assert!(!s.record(&ok, &h()) && !s.healthy);
        assert!(s.record(&ok, &h()) && s.healthy, "second consecutive success flips back");
        assert_eq!(s.last_error, None);
    }

    #[test]
    fn api_versions_request_layout() {
        let r = api_versions_request(7);
        assert_eq!(i32::from_be_bytes([r[0], r[1], r[2], r[3]]) as usize, r.len() - 4);
        assert_eq!(&r[4..8], &[0, 18, 0, 0]);
        assert_eq!(&r[8..12], &7i32.to_be_bytes());
    }
}
