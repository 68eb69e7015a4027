//! Connection rate: client threads in the client namespace, each looping connect / send 1 byte
//! / read 1 byte / close for the duration, against the 1-byte echo server on b3
//! ([`kpf_tests::byte_echo`]). Counts the connections completed within the window, per second.

use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use kpf_tests::netns::Netns;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

use super::{cpu, proc};

/// Client threads (each keeps one connection attempt in flight).
pub const THREADS: usize = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that took longer than this almost surely lost its SYN (retransmitted after 1 s).
const SLOW: Duration = Duration::from_millis(500);
/// Failures kept in the results, and how many of them the forwarder is asked about.
const FAILURES_KEPT: usize = 8;
const FAILURES_INSPECTED: usize = 2;

/// A connection that failed, as the client saw it.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    /// The client socket's port, if it got one.
    pub client_port: Option<u16>,
    pub error: String,
    /// From the start of the attempt.
    pub after_ms: u64,
    /// What the forwarder knew of the connection right then, while the client socket was still
    /// open (kpf: its conntrack entries for that client port); `None` if it cannot say.
    pub forwarder: Option<String>,
}

/// Asks the forwarder what it knows of the client's connection from a port, for the report.
pub type Inspect<'a> = &'a (dyn Fn(u16) -> Option<String> + Sync);

#[derive(Clone, Debug, Serialize)]
pub struct ConnRate {
    /// Connections completed within the window, per second of window.
    pub conns_per_s: f64,
    /// Connections completed within the window.
    pub conns: u64,
    /// All connections completed, including those that finished after the window closed (a
    /// thread whose SYN was lost when the window closed finishes its connection first).
    pub conns_total: u64,
    pub errors: u64,
    /// Connections that took longer than 500 ms (a dropped SYN and its retransmission).
    pub slow: u64,
    /// The window.
    pub seconds: f64,
    /// From the start until the last thread finished (window plus stragglers).
    pub elapsed_seconds: f64,
    /// Busy CPU-seconds over `elapsed_seconds`: per connection, divide by `conns_total`.
    pub cpu_s: f64,
    /// The first failures (up to 8).
    pub failures: Vec<Failure>,
}

impl ConnRate {
    pub fn cpu_s_per_1000_conns(&self) -> f64 {
        self.cpu_s / (self.conns_total as f64 / 1000.0)
    }
}

/// A failed attempt; holds the client socket open (its port bound) until dropped.
struct Failed {
    port: Option<u16>,
    error: std::io::Error,
    _socket: Option<Socket>,
}

fn local_port(s: &Socket) -> Option<u16> {
    s.local_addr().ok().and_then(|a| a.as_socket()).map(|a| a.port()).filter(|p| *p != 0)
}

/// One connection: connect, 1 byte each way, close.
fn one(addr: &SocketAddr) -> Result<(), Failed> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|error| Failed { port: None, error, _socket: None })?;
    if let Err(error) = socket.connect_timeout(&(*addr).into(), CONNECT_TIMEOUT) {
        return Err(Failed { port: local_port(&socket), error, _socket: Some(socket) });
    }
    let mut s = TcpStream::from(socket);
    echo(&mut s).map_err(|error| {
        let socket = Socket::from(s);
        Failed { port: local_port(&socket), error, _socket: Some(socket) }
    })
}

fn echo(s: &mut TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(&[0x2a])?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    if b[0] != 0x2a {
        return Err(std::io::Error::other(format!("echo returned {:#x}", b[0])));
    }
    Ok(())
}

/// Measures for `duration`; a failed connection's client port is given to `inspect` while its
/// socket is still open.
pub fn measure(client: &Netns, target: SocketAddrV4, duration: Duration, inspect: Inspect<'_>) -> Result<ConnRate> {
    let addr = SocketAddr::V4(target);
    let (conns, late, errors, slow) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let failures = Mutex::new(Vec::<Failure>::new());
    let (r, cpu_s) = cpu::measure(|| {
        let start = Instant::now();
        let end = start + duration;
        std::thread::scope(|sc| -> Result<()> {
            let mut handles = Vec::new();
            for _ in 0..THREADS {
                handles.push(sc.spawn(|| -> std::io::Result<()> {
                    client.join_current_thread()?;
                    while Instant::now() < end && !proc::interrupted() {
                        let t = Instant::now();
                        match one(&addr) {
                            Ok(()) => {
                                let counter = if Instant::now() <= end { &conns } else { &late };
                                counter.fetch_add(1, Ordering::Relaxed);
                                if t.elapsed() > SLOW {
                                    slow.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(failed) => {
                                let n = errors.fetch_add(1, Ordering::Relaxed) as usize;
                                if n < FAILURES_KEPT {
                                    let after_ms = t.elapsed().as_millis() as u64;
                                    // Asked before the socket closes: its port still names this
                                    // connection, not a later one.
                                    let forwarder =
                                        if n < FAILURES_INSPECTED { failed.port.and_then(inspect) } else { None };
                                    failures.lock().unwrap().push(Failure {
                                        client_port: failed.port,
                                        error: failed.error.to_string(),
                                        after_ms,
                                        forwarder,
                                    });
                                }
                            }
                        }
                    }
                    Ok(())
                }));
            }
            for h in handles {
                h.join().map_err(|_| anyhow::anyhow!("a connection thread panicked"))??;
            }
            Ok(())
        })?;
        Ok(start.elapsed())
    })?;
    proc::check_interrupted()?;
    let seconds = duration.as_secs_f64();
    let conns = conns.into_inner();
    let failures = failures.into_inner().unwrap();
    if conns == 0 {
        bail!("no connection to {target} completed: {}", failures.first().map_or("", |f| f.error.as_str()));
    }
    Ok(ConnRate {
        conns_per_s: conns as f64 / seconds,
        conns,
        conns_total: conns + late.into_inner(),
        errors: errors.into_inner(),
        slow: slow.into_inner(),
        seconds,
        elapsed_seconds: r.as_secs_f64(),
        cpu_s,
        failures,
    })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn a_refused_connection_names_its_client_port() {
        // A port nothing listens on: the listener that held it is gone.
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let failed = one(&addr).expect_err("nothing listens there");
        assert_eq!(failed.error.kind(), std::io::ErrorKind::ConnectionRefused, "{}", failed.error);
        assert!(failed.port.is_some(), "the refused socket's port was not recorded");
    }

    #[test]
    fn a_reset_connection_names_the_port_the_server_saw() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (conn, peer) = listener.accept().unwrap();
            // Closing with a zero linger sends RST instead of FIN.
            Socket::from(conn).set_linger(Some(Duration::ZERO)).unwrap();
            peer.port()
        });
        let failed = one(&addr).expect_err("the server resets every connection");
        let seen = server.join().unwrap();
        assert!(
            matches!(
                failed.error.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::UnexpectedEof
            ),
            "{}",
            failed.error
        );
        assert_eq!(failed.port, Some(seen));
    }
}
