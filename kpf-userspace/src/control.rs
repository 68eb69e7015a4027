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
    MapLs {},
    /// Converge to a whole config (`kpf apply -f`); `name` locates errors.
    Apply {
        config: String,
        name: String,
        #[serde(default)]
        dry_run: bool,
    },
    /// Re-read the daemon's own config file (as SIGHUP does).
    Reload {},
    Status {},
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
    Metrics {},
    /// Detach, unpin everything, and exit.
    Down {},
}
// Every variant is a struct variant, even without fields: serde applies `deny_unknown_fields`
// only to those, so `{"op":"down","junk":1}` is refused rather than obeyed.

impl Request {
    /// Whether this request changes anything (and so needs root).
    pub fn mutates(&self) -> bool {
        !matches!(self, Request::MapLs {} | Request::Status {} | Request::Flows { .. } | Request::Metrics {})
    }

    /// Decodes one request line. Only a JSON object with a known `op` and exactly that op's
    /// fields is a request (serde alone would also take `["status"]`, an array in field order).
    pub fn decode(line: &str) -> Result<Request, String> {
        // Decoded from the text itself, not via serde_json::Value, which would quietly keep the
        // last of two duplicate keys (`{"op":"status","op":"down"}` must be refused, not obeyed).
        if !line.trim_start().starts_with('{') {
            return Err("malformed request: expected a JSON object like {\"op\":\"status\"}".into());
        }
        serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"))
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
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => Error::NotRunning(socket.to_owned()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_requests_decode() {
        assert_eq!(Request::decode(r#"{"op":"status"}"#), Ok(Request::Status {}));
        assert_eq!(Request::decode(r#"{"op":"map_rm","port":9093}"#), Ok(Request::MapRm { port: 9093, address: None, reset: false }));
        for bad in [
            r#"{"op":"down","junk":1}"#,
            r#"{"op":"status","verbose":true}"#,
            r#"{"op":"map_ls","x":1}"#,
            r#"{"op":"metrics","format":"json"}"#,
            r#"["status"]"#,
            r#"["map_rm",9093,null,true]"#,
            r#"["flows",9093]"#,
            r#""status""#,
            r#"{"op":"map_add","port":9093}"#,
            r#"{"op":"map_add","port":"9093","backend":"10.0.0.1:1"}"#,
            r#"{"op":"nope"}"#,
            r#"{}"#,
            r#"{"op":"status","op":"down"}"#,
            r#"{"op":"map_rm","port":9999,"port":9093}"#,
            r#"{"op":"map_set","port":9094,"backend":"10.0.0.3:1","backend":"10.0.0.1:1"}"#,
        ] {
            assert!(Request::decode(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn every_request_round_trips() {
        let all = [
            Request::MapLs {},
            Request::Status {},
            Request::Reload {},
            Request::Metrics {},
            Request::Down {},
            Request::Flows { port: Some(9093) },
            Request::MapAdd { port: 9096, address: None, backend: "10.0.0.5:39092".into() },
            Request::BackendDrain { backend: "10.0.0.5:39092".into(), timeout_ms: Some(1500) },
        ];
        for r in all {
            let line = serde_json::to_string(&r).unwrap();
            assert_eq!(Request::decode(&line), Ok(r), "{line}");
        }
    }
}
