//! Prometheus text exposition on `metrics_addr` (off unless configured): `GET /metrics`.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc, oneshot},
};

use crate::{
    control::{Request, Response},
    daemon::Status,
    error::{Error, Result},
    server::Call,
};

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The exposition text for one status snapshot.
pub fn render(s: &Status) -> String {
    let mut o = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    let fe = |f: fn(&crate::daemon::FrontendStatus) -> u64| {
        s.frontends.iter().map(|x| (format!("{{frontend=\"{}\"}}", escape(&x.frontend)), f(x))).collect()
    };
    family("kpf_frontend_packets_total", "counter", "Packets forwarded for the frontend, both directions.", fe(|x| x.packets));
    family("kpf_frontend_bytes_total", "counter", "IP bytes forwarded for the frontend, both directions.", fe(|x| x.bytes));
    family("kpf_frontend_new_flows_total", "counter", "Connections opened through the frontend.", fe(|x| x.new_flows));
    family("kpf_frontend_live_flows", "gauge", "Open connections through the frontend.", fe(|x| x.live_flows));
    let be = |f: fn(&crate::daemon::BackendStatus) -> u64| {
        s.backends.iter().map(|x| (format!("{{backend=\"{}\"}}", escape(&x.backend)), f(x))).collect()
    };
    family("kpf_backend_packets_total", "counter", "Packets forwarded to and from the backend.", be(|x| x.packets));
    family("kpf_backend_bytes_total", "counter", "IP bytes forwarded to and from the backend.", be(|x| x.bytes));
    family("kpf_backend_new_flows_total", "counter", "Connections opened to the backend.", be(|x| x.new_flows));
    family("kpf_backend_live_flows", "gauge", "Open connections to the backend.", be(|x| x.live_flows));
    family("kpf_backend_healthy", "gauge", "1 if the backend passes its health checks.", be(|x| x.healthy as u64));
    family("kpf_backend_draining", "gauge", "1 while the backend is being drained.", be(|x| x.draining as u64));
    let by_prefix = |prefix: &str| {
        s.counters
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|r| (format!("{{reason=\"{r}\"}}"), *v)))
            .collect()
    };
    family("kpf_dropped_total", "counter", "Packets the program dropped, by reason.", by_prefix("drop_"));
    family("kpf_passed_total", "counter", "Packets handed to the kernel untouched, by reason.", by_prefix("pass_"));
    family("kpf_new_flows_total", "counter", "Connections opened.", vec![(String::new(), s.counters.get("new_flows").copied().unwrap_or(0))]);
    family("kpf_tracked_connections", "gauge", "Open connections tracked.", vec![(String::new(), s.tracked_connections)]);
    o
}

/// Binds the metrics listener (so a bad address fails start-up, not later).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(Error::io(format!("binding metrics_addr {addr}")))
}

/// Connections served at once. A scraper needs one; the cap keeps a flood of connections (the
/// listener may face a network) from using up the daemon's file descriptors, which its control
/// socket, netlink and map operations need too. Past it, a new connection is closed unanswered.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a connection may take to send its request, the daemon to answer it, and the
/// connection to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one log line per this long about connections refused at the cap.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

pub async fn serve(listener: TcpListener, calls: mpsc::Sender<Call>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (mut refused, mut logged) = (0u64, None::<Instant>);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: accepting again at once would spin.
                log::warn!("metrics listener accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            drop(stream);
            refused += 1;
            if logged.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL) {
                log::warn!("metrics listener: {MAX_CONNECTIONS} connections open; closed {refused} more unanswered");
                (refused, logged) = (0, Some(Instant::now()));
            }
            continue;
        };
        let calls = calls.clone();
        tokio::spawn(async move {
            connection(stream, calls).await;
            drop(slot);
        });
    }
}

async fn connection(mut stream: TcpStream, calls: mpsc::Sender<Call>) {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    let read = tokio::time::timeout(IO_TIMEOUT, async {
        while len < buf.len() {
            match stream.read(&mut buf[len..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => len += n,
            }
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    });
    if read.await.is_err() {
        return;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let reply = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => {
            let (reply, answer) = oneshot::channel();
            let (_written_tx, written) = oneshot::channel();
            // Bounded too: a daemon busy converging a large change must not keep the slot.
            let asked = tokio::time::timeout(IO_TIMEOUT, async {
                calls.send(Call { request: Request::Metrics {}, uid: u32::MAX, reply, written }).await.ok()?;
                answer.await.ok()
            });
            match asked.await {
                Ok(Some(Response::Ok { ok })) => {
                    let body = ok.as_str().unwrap_or_default().to_owned();
                    format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                }
                _ => "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
            }
        }
        (Some("GET"), _) => "HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n".into(),
        _ => "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
    };
    // A peer that never reads would otherwise hold its slot for good.
    let _ = tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}
