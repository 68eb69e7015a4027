//! A minimal echo server for connection-rate measurements: each connection sends one byte, gets
//! it back, and closes. Unlike [`crate::peer::Backend`] there is no identity line and no thread
//! per connection: a fixed pool of workers blocks in `accept()` on one listener and serves each
//! connection to completion (read 1 byte, write it back, wait for the client's EOF, close), so
//! the server costs about the same whatever path the connections took.

use std::{
    io::{self, Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::netns::Netns;

/// How long a worker waits for a client's byte or EOF before giving the connection up.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    served: AtomicU64,
    problems: Mutex<Vec<String>>,
}

/// A running 1-byte echo server; stopped (workers joined) when dropped.
pub struct ByteEcho {
    listener: TcpListener,
    addr: SocketAddrV4,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl ByteEcho {
    /// Listens on `addr` inside `ns` and starts `workers` threads serving it.
    pub fn start(ns: &Netns, addr: SocketAddrV4, workers: usize) -> io::Result<ByteEcho> {
        let listener = ns
            .enter(|| TcpListener::bind(addr))?
            .map_err(|e| io::Error::new(e.kind(), format!("byte echo: binding {addr} in {}: {e}", ns.name())))?;
        let shared = Arc::new(Shared::default());
        let mut handles = Vec::with_capacity(workers);
        for _ in 0..workers.max(1) {
            let l = listener.try_clone()?;
            let sh = shared.clone();
            handles.push(std::thread::spawn(move || worker(&l, &sh)));
        }
        Ok(ByteEcho { listener, addr, shared, workers: handles })
    }

    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// Connections served to completion so far.
    pub fn served(&self) -> u64 {
        self.shared.served.load(Ordering::Relaxed)
    }

    /// Connections that failed on the server side (timeouts, resets), as messages; at most 100
    /// are kept.
    pub fn problems(&self) -> Vec<String> {
        self.shared.problems.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn worker(listener: &TcpListener, shared: &Shared) {
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((s, _)) => match serve(s) {
                Ok(()) => {
                    shared.served.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    let mut p = shared.problems.lock().unwrap_or_else(|e| e.into_inner());
                    if p.len() < 100 {
                        p.push(e.to_string());
                    }
                }
            },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // E.g. ECONNABORTED for a connection reset while queued: keep serving.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(_) => return,
        }
    }
}

fn serve(mut s: TcpStream) -> io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    let mut b = [0u8; 1];
    if s.read(&mut b)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before its byte"));
    }
    s.write_all(&b)?;
    // Wait for the client to close first, so the TIME_WAIT state stays on the client's side.
    let mut rest = [0u8; 16];
    while s.read(&mut rest)? != 0 {}
    Ok(())
}

impl Drop for ByteEcho {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // shutdown() on a listening socket wakes every thread blocked in accept() (EINVAL).
        // SAFETY: a valid socket fd this struct keeps open.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
