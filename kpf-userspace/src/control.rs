//! The control protocol between the CLI and the daemon: one JSON request per connection, one JSON
//! response back, over a root-only Unix socket.

use std::{
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest request accepted (an `apply` carries a whole config file).
pub const MAX_REQUEST: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    MapAdd {
        port: u16,
        #[serde(default)]
        address: Option<Ipv4Addr>,
        backend: String,
    },
    MapRm {
        port: u16,
        #[serde(default)]
        address: Option<Ipv4Addr>,
        #[serde(default)]
        reset: bool,
    },
    MapSet {
        port: u16,
        #[serde(default)]
        address: Option<Ipv4Addr>,
        backend: String,
    },
    MapLs,
    /// Converge to a whole config (`kpf apply -f`); `name` locates errors.
    Apply {
        config: String,
        name: String,
        #[serde(default)]
        dry_run: bool,
    },
    /// Re-read the daemon's own config file (as SIGHUP does).
    Reload,
    Status,
    Flows {
        #[serde(default)]
        port: Option<u16>,
    },
    /// Take a backend out of selection; reset what is left after `timeout_ms` (default 300 s).
    BackendDrain {
        backend: String,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    BackendUndrain {
        backend: String,
    },
    /// The Prometheus exposition text.
    Metrics,
    /// Detach, unpin everything, and exit.
    Down,
}

impl Request {
    /// Whether this request changes anything (and so needs root).
    pub fn mutates(&self) -> bool {
        !matches!(self, Request::MapLs | Request::Status | Request::Flows { .. } | Request::Metrics)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Response {
    Ok { ok: serde_json::Value },
    Err { error: String },
}

impl Response {
    pub fn ok(v: impl Serialize) -> Response {
        Response::Ok { ok: serde_json::to_value(v).unwrap_or(serde_json::Value::Null) }
    }
}

/// Sends one request and waits for its answer.
pub fn call(socket: &Path, req: &Request) -> Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => Error::Environment(format!(
            "kpf is not running (nothing answers on {}): start it with `kpf run`, or pass --socket",
            socket.display()
        )),
        std::io::ErrorKind::PermissionDenied => Error::Environment(format!(
            "permission denied on {}: the control socket is root-only; run this as root",
            socket.display()
        )),
        _ => Error::io(format!("connecting to {}", socket.display()))(e),
    })?;
    // Applying a config can take a moment (map updates, a file write); never hang forever.
    let timeout = Some(Duration::from_secs(60));
    let _ = stream.set_read_timeout(timeout);
    let _ = stream.set_write_timeout(timeout);
    let mut line = serde_json::to_string(req).expect("requests always serialise");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(Error::io("sending the request"))?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(Error::io("reading the daemon's answer"))?;
    if reply.is_empty() {
        return Err(Error::Environment("the daemon closed the connection without answering".into()));
    }
    match serde_json::from_str::<Response>(&reply) {
        Ok(Response::Ok { ok }) => Ok(ok),
        Ok(Response::Err { error }) => Err(Error::Rejected(error)),
        Err(e) => Err(Error::Environment(format!("unreadable answer from the daemon ({e}): {reply:?}"))),
    }
}
