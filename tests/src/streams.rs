//! Many long-lived client connections exchanging verified data until told to stop: the load that
//! control-plane changes and daemon restarts must not disturb.
//!
//! Each stream is one [`EchoLoop`] on its own thread (inside a namespace): it sends a random chunk,
//! reads it back, checks every byte, pauses, and does it again. The first error ends that stream
//! and is kept for the report; a stream never reconnects, so any broken connection shows.

use std::{
    io,
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use rand::{Rng, RngCore};

use crate::{netns::Netns, peer::EchoLoop};

/// How every stream behaves.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Chunks are 1..=`max_chunk` bytes (keep within the socket buffers).
    pub max_chunk: usize,
    /// Pause after each round.
    pub pause: Duration,
}

#[derive(Default)]
struct Progress {
    rounds: AtomicU64,
    bytes: AtomicU64,
    failed: AtomicBool,
}

/// What one stream did.
#[derive(Clone, Debug)]
pub struct StreamReport {
    pub target: SocketAddr,
    /// The client end, as kpf sees it.
    pub local: SocketAddr,
    /// The backend identity read when the connection opened.
    pub identity: String,
    /// Completed rounds (each verified).
    pub rounds: u64,
    /// Bytes sent and verified back (each way).
    pub bytes: u64,
    /// The error that ended the stream, or that its clean close met.
    pub error: Option<String>,
}

struct Stream {
    target: SocketAddr,
    local: SocketAddr,
    identity: String,
    progress: Arc<Progress>,
    error: Arc<Mutex<Option<String>>>,
    socket: TcpStream,
    thread: Option<JoinHandle<()>>,
}

/// A set of running streams. Dropping it stops them (shutting their sockets down).
pub struct Streams {
    stop: Arc<AtomicBool>,
    streams: Vec<Stream>,
}

impl Streams {
    /// Opens one stream per entry of `targets` from namespace `ns` and returns once every one
    /// is connected and has read its backend's identity (failing if any could not).
    pub fn start(ns: &Netns, targets: &[SocketAddr], pace: Pace) -> io::Result<Streams> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut set = Streams { stop: stop.clone(), streams: Vec::with_capacity(targets.len()) };
        for &target in targets {
            let (tx, rx) = mpsc::channel::<io::Result<(SocketAddr, String, TcpStream)>>();
            let progress = Arc::new(Progress::default());
            let error = Arc::new(Mutex::new(None));
            let thread = {
                let (stop, progress, error) = (stop.clone(), progress.clone(), error.clone());
                let ns_file = std::fs::File::open(format!("/run/netns/{}", ns.name()))?;
                std::thread::Builder::new().name(format!("stream-{}", set.streams.len())).spawn(move || {
                    // SAFETY: setns on this thread only, with a valid netns fd.
                    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns_file), libc::CLONE_NEWNET) } != 0 {
                        let _ = tx.send(Err(io::Error::last_os_error()));
                        return;
                    }
                    let conn = EchoLoop::connect(target).and_then(|c| {
                        let sock = c.socket()?;
                        Ok((c, sock))
                    });
                    let mut conn = match conn {
                        Ok((c, sock)) => {
                            let _ = tx.send(Ok((c.local_addr(), c.identity().to_owned(), sock)));
                            c
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let mut rng = rand::rng();
                    let mut buf = vec![0u8; pace.max_chunk.max(1)];
                    let fail = |what: String| {
                        progress.failed.store(true, Ordering::SeqCst);
                        *error.lock().unwrap_or_else(|e| e.into_inner()) = Some(what);
                    };
                    while !stop.load(Ordering::SeqCst) {
                        let n = rng.random_range(1..=buf.len());
                        rng.fill_bytes(&mut buf[..n]);
                        if let Err(e) = conn.round(&buf[..n]) {
                            let rounds = progress.rounds.load(Ordering::SeqCst);
                            fail(format!("round {}: {e} (kind {:?})", rounds + 1, e.kind()));
                            return;
                        }
                        progress.rounds.fetch_add(1, Ordering::SeqCst);
                        progress.bytes.fetch_add(n as u64, Ordering::SeqCst);
                        if !pace.pause.is_zero() {
                            std::thread::sleep(pace.pause);
                        }
                    }
                    if let Err(e) = conn.finish() {
                        fail(format!("closing: {e} (kind {:?})", e.kind()));
                    }
                })?
            };
            match rx.recv() {
                Ok(Ok((local, identity, socket))) => {
                    set.streams.push(Stream { target, local, identity, progress, error, socket, thread: Some(thread) })
                }
                Ok(Err(e)) => {
                    let _ = thread.join();
                    return Err(io::Error::new(e.kind(), format!("stream {} to {target}: {e}", set.streams.len())));
                }
                Err(_) => {
                    let _ = thread.join();
                    return Err(io::Error::other(format!("stream {} to {target}: thread ended", set.streams.len())));
                }
            }
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// (target, client address, identity) of every stream, in the order of `targets`.
    pub fn endpoints(&self) -> Vec<(SocketAddr, SocketAddr, String)> {
        self.streams.iter().map(|s| (s.target, s.local, s.identity.clone())).collect()
    }

    /// Completed rounds per stream.
    pub fn rounds(&self) -> Vec<u64> {
        self.streams.iter().map(|s| s.progress.rounds.load(Ordering::SeqCst)).collect()
    }

    /// Total verified bytes (each way) so far.
    pub fn bytes(&self) -> u64 {
        self.streams.iter().map(|s| s.progress.bytes.load(Ordering::SeqCst)).sum()
    }

    /// The errors so far, one line per failed stream.
    pub fn failures(&self) -> Vec<String> {
        self.streams
            .iter()
            .enumerate()
            .filter(|(_, s)| s.progress.failed.load(Ordering::SeqCst))
            .map(|(i, s)| {
                let e = s.error.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
                format!("stream {i} ({} -> {}, {}): {e}", s.local, s.target, s.identity)
            })
            .collect()
    }

    /// Waits until every stream completed at least `by` more rounds than when called. Fails
    /// early if a stream failed, and after `timeout` naming the streams that did not move.
    pub fn wait_all_advance(&self, by: u64, timeout: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        let from = self.rounds();
        loop {
            let failures = self.failures();
            if !failures.is_empty() {
                return Err(format!("streams failed:\n  {}", failures.join("\n  ")));
            }
            let now = self.rounds();
            let behind: Vec<usize> = (0..now.len()).filter(|&i| now[i] < from[i] + by).collect();
            if behind.is_empty() {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                let list: Vec<String> = behind
                    .iter()
                    .take(10)
                    .map(|&i| format!("#{i} {} ({}->{} rounds)", self.streams[i].local, from[i], now[i]))
                    .collect();
                return Err(format!(
                    "{} of {} streams did not complete {by} more rounds within {timeout:?}: {}",
                    behind.len(),
                    now.len(),
                    list.join(", ")
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops every stream (each closes its connection cleanly) and reports what each did.
    pub fn stop(mut self) -> Vec<StreamReport> {
        self.stop.store(true, Ordering::SeqCst);
        let mut out = Vec::with_capacity(self.streams.len());
        for s in &mut self.streams {
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
            out.push(StreamReport {
                target: s.target,
                local: s.local,
                identity: s.identity.clone(),
                rounds: s.progress.rounds.load(Ordering::SeqCst),
                bytes: s.progress.bytes.load(Ordering::SeqCst),
                error: s.error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            });
        }
        out
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let running: Vec<&mut Stream> = self.streams.iter_mut().filter(|s| s.thread.is_some()).collect();
        if running.is_empty() {
            return;
        }
        // Unblock any read or write in progress, then wait for the threads.
        for s in &running {
            let _ = s.socket.shutdown(Shutdown::Both);
        }
        for s in running {
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
    }
}
