//! Connection rate: client threads in the client namespace, each looping connect / send 1 byte
//! / read 1 byte / close for the duration, against the 1-byte echo server on b3
//! ([`kpf_tests::byte_echo`]). Counts the connections completed within the window, per second.

use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use kpf_tests::netns::Netns;
use serde::Serialize;

use super::{cpu, proc};

/// Client threads (each keeps one connection attempt in flight).
pub const THREADS: usize = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that took longer than this almost surely lost its SYN (retransmitted after 1 s).
const SLOW: Duration = Duration::from_millis(500);

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
    pub first_error: Option<String>,
}

impl ConnRate {
    pub fn cpu_s_per_1000_conns(&self) -> f64 {
        self.cpu_s / (self.conns_total as f64 / 1000.0)
    }
}

fn one(addr: &SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(addr, CONNECT_TIMEOUT)?;
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

pub fn measure(client: &Netns, target: SocketAddrV4, duration: Duration) -> Result<ConnRate> {
    let addr = SocketAddr::V4(target);
    let (conns, late, errors, slow) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let first_error = std::sync::Mutex::new(None::<String>);
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
                            Err(e) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                first_error.lock().unwrap().get_or_insert_with(|| e.to_string());
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
    let first_error = first_error.into_inner().unwrap();
    if conns == 0 {
        bail!("no connection to {target} completed: {}", first_error.unwrap_or_default());
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
        first_error,
    })
}
