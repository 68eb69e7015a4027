//! A minimal blocking Kafka client over the `kafka-protocol` crate's message types: one
//! connection, versions negotiated with ApiVersions, one request at a time.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use kafka_protocol::{
    messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader},
    protocol::{Decodable, Encodable, HeaderVersion, Message, StrBytes},
};

/// Largest response accepted.
const MAX_RESPONSE: usize = 64 << 20;

pub struct Conn {
    stream: TcpStream,
    next_id: i32,
    /// The broker's (min, max) version per API key.
    versions: HashMap<i16, (i16, i16)>,
}

impl Conn {
    /// Connects and learns which API versions the broker speaks.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, String> {
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_read_timeout(Some(timeout));
        let _ = stream.set_write_timeout(Some(timeout));
        let _ = stream.set_nodelay(true);
        let mut c = Conn { stream, next_id: 1, versions: HashMap::new() };
        // ApiVersions v0 is understood by every broker that speaks the protocol at all.
        let (r, _): (ApiVersionsResponse, _) = c.send(ApiKey::ApiVersions, 0, &ApiVersionsRequest::default())?;
        if r.error_code != 0 {
            return Err(format!("{addr}: ApiVersions error code {}", r.error_code));
        }
        c.versions = r.api_keys.iter().map(|k| (k.api_key, (k.min_version, k.max_version))).collect();
        Ok(c)
    }

    /// The version [`Conn::call`] sends `key` at: the highest both sides speak.
    pub fn version<M: Message>(&self, key: ApiKey) -> Result<i16, String> {
        let (min, max) =
            self.versions.get(&(key as i16)).copied().ok_or_else(|| format!("the broker does not support {key:?}"))?;
        let v = M::VERSIONS.max.min(max);
        if v < min.max(M::VERSIONS.min) {
            return Err(format!("no common version of {key:?} (broker {min}-{max})"));
        }
        Ok(v)
    }

    /// Sends `req` at the highest version both sides speak; returns the answer and its round trip.
    pub fn call<Req, Resp>(&mut self, key: ApiKey, req: &Req) -> Result<(Resp, Duration), String>
    where
        Req: Encodable + HeaderVersion + Message,
        Resp: Decodable + HeaderVersion,
    {
        let v = self.version::<Req>(key)?;
        self.send(key, v, req)
    }

    fn send<Req, Resp>(&mut self, key: ApiKey, version: i16, req: &Req) -> Result<(Resp, Duration), String>
    where
        Req: Encodable + HeaderVersion,
        Resp: Decodable + HeaderVersion,
    {
        let id = self.next_id;
        self.next_id += 1;
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(id)
            .with_client_id(Some(StrBytes::from_static_str("kpf")));
        let mut body = BytesMut::new();
        header.encode(&mut body, Req::header_version(version)).map_err(|e| format!("encode header: {e}"))?;
        req.encode(&mut body, version).map_err(|e| format!("encode {key:?}: {e}"))?;
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        let started = Instant::now();
        self.stream.write_all(&frame).map_err(|e| format!("send {key:?}: {e}"))?;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).map_err(|e| format!("read {key:?} answer: {e}"))?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_RESPONSE {
            return Err(format!("{key:?} answer of {len} bytes is too large"));
        }
        let mut buf = vec![0u8; len];
        self.stream.read_exact(&mut buf).map_err(|e| format!("read {key:?} answer: {e}"))?;
        let rtt = started.elapsed();
        let mut b = Bytes::from(buf);
        let rh = ResponseHeader::decode(&mut b, Resp::header_version(version)).map_err(|e| format!("decode header: {e}"))?;
        if rh.correlation_id != id {
            return Err(format!("{key:?} answer has correlation id {}, sent {id}", rh.correlation_id));
        }
        let resp = Resp::decode(&mut b, version).map_err(|e| format!("decode {key:?} v{version}: {e}"))?;
        Ok((resp, rtt))
    }
}
