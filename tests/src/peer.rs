//! Traffic peers: a backend server that runs in a backend namespace, and client helpers that
//! run in whatever namespace the calling thread is in (call them inside [`Netns::enter`]).
//!
//! Protocol (one request per connection): the backend first writes its identity line
//! (`b2\n`), then reads one request line:
//! - `ECHO\n`: echoes everything back until EOF.
//! - `STREAM <seed> <len>\n`: at the same time reads exactly `len` bytes, checking them against
//!   [`Pattern`] `seed`, and writes `len` bytes of pattern `seed + 1`; after receiving them all
//!   it sends the verdict `OK <sha256 hex of what it received>\n` or `BAD at <offset>\n`.
//!
//! Every socket has timeouts, so a broken path fails a test instead of hanging it.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

use crate::netns::Netns;

/// How long one connect may take. Generous: a SYN the forwarder drops is retried after 1 s, 3 s...
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one read or write may block (an idle limit, not a limit on a whole transfer).
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
const CHUNK: usize = 64 * 1024;
/// The longest identity, request or verdict line accepted.
const MAX_LINE: u64 = 256;

/// A deterministic byte stream: xoshiro256** seeded through splitmix64. Fast (several GB/s) and
/// defined here, so the bytes for a seed never change with a dependency's version.
#[derive(Clone, Debug)]
pub struct Pattern {
    s: [u64; 4],
    buf: [u8; 8],
    /// Bytes of `buf` already handed out (8 = empty).
    pos: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        let mut x = seed;
        let mut splitmix = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Pattern { s: [splitmix(), splitmix(), splitmix(), splitmix()], buf: [0; 8], pos: 8 }
    }

    #[inline]
    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Fills `out` with the next `out.len()` bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut i = 0;
        while i < out.len() && self.pos < 8 {
            out[i] = self.buf[self.pos];
            self.pos += 1;
            i += 1;
        }
        let mut words = out[i..].chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            self.buf = self.next_u64().to_le_bytes();
            let n = tail.len();
            tail.copy_from_slice(&self.buf[..n]);
            self.pos = n;
        }
    }

    /// The SHA-256 (hex) of the first `len` bytes of pattern `seed`.
    pub fn sha256_hex(seed: u64, len: u64) -> String {
        send_pattern(&mut io::sink(), seed, len).expect("writing to io::sink cannot fail")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn timeouts(s: &TcpStream) -> io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)
}

fn read_line(r: &mut impl BufRead, what: &str) -> io::Result<String> {
    let mut line = String::new();
    r.take(MAX_LINE).read_line(&mut line).map_err(|e| io::Error::new(e.kind(), format!("reading the {what}: {e}")))?;
    match line.strip_suffix('\n') {
        Some(l) => Ok(l.to_owned()),
        None => {
            Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("the {what} ended before its newline: {line:?}")))
        }
    }
}

/// Writes `len` bytes of pattern `seed`; returns the SHA-256 hex of what was written.
fn send_pattern(w: &mut impl Write, seed: u64, len: u64) -> io::Result<String> {
    let mut p = Pattern::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n])
            .map_err(|e| io::Error::new(e.kind(), format!("sending at offset {}: {e}", len - left)))?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    w.flush()?;
    Ok(hex(&h.finalize()))
}

/// What was received against pattern `seed`.
struct Received {
    sha256: String,
    /// Offset of the first byte that differs from the pattern.
    first_bad: Option<u64>,
}

/// Reads exactly `len` bytes, comparing them with pattern `seed` and hashing them.
fn receive_pattern(r: &mut impl Read, seed: u64, len: u64) -> io::Result<Received> {
    let mut p = Pattern::new(seed);
    let mut h = Sha256::new();
    let (mut buf, mut want) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut got = 0u64;
    let mut first_bad = None;
    while got < len {
        let cap = (len - got).min(CHUNK as u64) as usize;
        let n = match r.read(&mut buf[..cap]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the stream ended after {got} of {len} bytes"),
                ));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("receiving after {got} of {len} bytes: {e}"))),
        };
        p.fill(&mut want[..n]);
        if first_bad.is_none() && buf[..n] != want[..n] {
            let i = buf[..n].iter().zip(&want[..n]).position(|(a, b)| a != b).unwrap_or(0);
            first_bad = Some(got + i as u64);
        }
        h.update(&buf[..n]);
        got += n as u64;
    }
    Ok(Received { sha256: hex(&h.finalize()), first_bad })
}

// ---------------------------------------------------------------------------------------------
// Backend server

struct Conn {
    stream: TcpStream,
    thread: JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    conns: Mutex<Vec<Conn>>,
    accepted: AtomicU64,
    open: AtomicUsize,
    /// Errors and bad verdicts seen while serving, for a test to assert on.
    problems: Mutex<Vec<String>>,
}

/// A backend server listening on `0.0.0.0:<port>` inside a namespace, one thread per connection.
/// It is accepting once [`Backend::new`] returns; dropping it stops it and closes every
/// connection it has.
pub struct Backend {
    identity: String,
    port: u16,
    listener: Arc<TcpListener>,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Serves on [`crate::topology::BACKEND_PORT`] in `ns`, announcing itself as `identity`.
    pub fn new(ns: &Netns, identity: &str) -> io::Result<Backend> {
        Backend::on_port(ns, identity, crate::topology::BACKEND_PORT)
    }

    pub fn on_port(ns: &Netns, identity: &str, port: u16) -> io::Result<Backend> {
        if identity.is_empty() || identity.contains(char::is_whitespace) {
            return Err(io::Error::other(format!("identity {identity:?} must be one word")));
        }
        // The socket belongs to the namespace it is created in; the threads serving it need not.
        let listener = Arc::new(ns.enter(|| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)))??);
        let shared = Arc::new(Shared::default());
        let accept_thread = {
            let (listener, shared, identity) = (listener.clone(), shared.clone(), identity.to_owned());
            std::thread::Builder::new()
                .name(format!("backend-{identity}"))
                .spawn(move || accept_loop(&listener, &shared, &identity))?
        };
        Ok(Backend { identity: identity.to_owned(), port, listener, shared, accept_thread: Some(accept_thread) })
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections currently being served.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// What went wrong while serving (I/O errors, malformed requests, BAD verdicts), if anything.
    pub fn problems(&self) -> Vec<String> {
        self.shared.problems.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Returns the problems recorded so far and forgets them (for a test that caused some on
    /// purpose, e.g. a reset).
    pub fn take_problems(&self) -> Vec<String> {
        std::mem::take(&mut *self.shared.problems.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, identity: &str) {
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                shared.problems.lock().unwrap_or_else(|e| e.into_inner()).push(format!("accept: {e}"));
                return;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let Ok(handle) = stream.try_clone() else { continue };
        let (sh, id) = (shared.clone(), identity.to_owned());
        sh.open.fetch_add(1, Ordering::SeqCst);
        let thread = std::thread::spawn(move || {
            let peer = stream.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
            if let Err(e) = serve(stream, &id)
                && !sh.stop.load(Ordering::SeqCst)
            {
                sh.problems
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(format!("{id}: connection from {peer}: {e}"));
            }
            sh.open.fetch_sub(1, Ordering::SeqCst);
        });
        let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        // Forget finished connections so a long-running backend does not accumulate them.
        conns.retain(|c| !c.thread.is_finished());
        conns.push(Conn { stream: handle, thread });
    }
}

fn serve(stream: TcpStream, identity: &str) -> io::Result<()> {
    timeouts(&stream)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(CHUNK, stream);
    writer.write_all(format!("{identity}\n").as_bytes())?;
    let request = read_line(&mut reader, "request line")?;
    let mut words = request.split(' ');
    match (words.next(), words.next(), words.next(), words.next()) {
        (Some("ECHO"), None, ..) => {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                writer.write_all(&buf[..n])?;
            }
            writer.shutdown(Shutdown::Write)
        }
        (Some("STREAM"), Some(seed), Some(len), None) => {
            let bad = || io::Error::other(format!("malformed request {request:?}"));
            let seed: u64 = seed.parse().map_err(|_| bad())?;
            let len: u64 = len.parse().map_err(|_| bad())?;
            let mut out = writer.try_clone()?;
            let sender = std::thread::spawn(move || send_pattern(&mut out, seed.wrapping_add(1), len));
            let received = receive_pattern(&mut reader, seed, len);
            let sent = sender.join().map_err(|_| io::Error::other("sender thread panicked"))?;
            let received = received?;
            sent?;
            let verdict = match received.first_bad {
                None => format!("OK {}\n", received.sha256),
                Some(at) => format!("BAD at {at}\n"),
            };
            writer.write_all(verdict.as_bytes())?;
            writer.shutdown(Shutdown::Write)?;
            match received.first_bad {
                None => Ok(()),
                Some(at) => Err(io::Error::other(format!("STREAM seed {seed}: received data differs at offset {at}"))),
            }
        }
        _ => Err(io::Error::other(format!("unknown request {request:?}"))),
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Shutting a listening socket down makes a blocked accept() return (EINVAL) on Linux.
        // SAFETY: a valid socket fd that this struct keeps open.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        let conns = std::mem::take(&mut *self.shared.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for c in &conns {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        for c in conns {
            let _ = c.thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client side

/// An open client connection (sockets are created in the calling thread's namespace).
pub struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Session {
    /// Connects to `addr` with [`CONNECT_TIMEOUT`]; reads and writes time out after [`IO_TIMEOUT`].
    pub fn connect(addr: SocketAddr) -> io::Result<Session> {
        let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .map_err(|e| io::Error::new(e.kind(), format!("connecting to {addr}: {e}")))?;
        timeouts(&s)?;
        Ok(Session { writer: s.try_clone()?, reader: BufReader::with_capacity(CHUNK, s) })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.writer.local_addr()
    }

    /// Reads the identity line the backend sends first.
    pub fn identity(&mut self) -> io::Result<String> {
        read_line(&mut self.reader, "identity line")
    }

    /// Sends `ECHO` and `payload`, half-closes, and checks that exactly `payload` comes back
    /// before the backend closes. Consumes the session: the connection is finished after this.
    pub fn echo(mut self, payload: &[u8]) -> io::Result<()> {
        self.writer.write_all(b"ECHO\n")?;
        // Write and read concurrently so a large payload cannot deadlock on full buffers.
        let mut w = self.writer.try_clone()?;
        let data = payload.to_vec();
        let sender = std::thread::spawn(move || -> io::Result<()> {
            w.write_all(&data)?;
            w.shutdown(Shutdown::Write)
        });
        let mut back = Vec::with_capacity(payload.len());
        let got = self.reader.read_to_end(&mut back);
        sender.join().map_err(|_| io::Error::other("echo sender panicked"))??;
        got?;
        if back != payload {
            let at = back.iter().zip(payload).position(|(a, b)| a != b).unwrap_or(back.len().min(payload.len()));
            return Err(io::Error::other(format!(
                "echo differs: sent {} bytes, got {} back, first difference at offset {at}",
                payload.len(),
                back.len()
            )));
        }
        Ok(())
    }
}

impl Session {
    /// Connects from `src` (a local address, and a port unless it is 0) to `addr` within
    /// `timeout`. See [`connect_from`].
    pub fn connect_from(src: SocketAddrV4, addr: SocketAddrV4, timeout: Duration) -> io::Result<Session> {
        Session::from_stream(connect_from(src, addr, timeout)?)
    }

    fn from_stream(s: TcpStream) -> io::Result<Session> {
        timeouts(&s)?;
        Ok(Session { writer: s.try_clone()?, reader: BufReader::with_capacity(CHUNK, s) })
    }

    /// Sends the `ECHO` request and keeps the connection open, for [`Session::echo_round`]
    /// (call after [`Session::identity`]).
    pub fn start_echo(&mut self) -> io::Result<()> {
        self.writer.write_all(b"ECHO\n")
    }

    /// On a connection in ECHO mode: sends `payload` and reads exactly as many bytes back,
    /// which must be `payload`. The connection stays open.
    pub fn echo_round(&mut self, payload: &[u8]) -> io::Result<()> {
        echo_exact(&mut self.reader, &mut self.writer, payload)
    }

    /// Waits up to `wait` for something from the peer without sending anything: `Ok(None)` if
    /// nothing came, `Ok(Some(bytes))` with what arrived (empty: the peer closed), or the error
    /// the socket reports (e.g. `ConnectionReset` after an RST).
    pub fn read_some(&mut self, wait: Duration) -> io::Result<Option<Vec<u8>>> {
        let previous = self.writer.read_timeout()?;
        self.writer.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        let mut buf = vec![0u8; CHUNK];
        let got = self.reader.read(&mut buf);
        self.writer.set_read_timeout(previous)?;
        match got {
            Ok(n) => Ok(Some(buf[..n].to_vec())),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Ends a connection in ECHO mode cleanly: half-closes, and expects the backend to close
    /// with nothing more to say.
    pub fn finish_echo(mut self) -> io::Result<()> {
        finish_clean(&mut self.reader, &self.writer)
    }
}

/// Sends `payload` and reads exactly as many bytes back, failing unless they are the same.
/// Keep payloads within the socket buffers (a few tens of KiB): the write completes before the
/// read starts.
fn echo_exact(reader: &mut BufReader<TcpStream>, writer: &mut TcpStream, payload: &[u8]) -> io::Result<()> {
    writer.write_all(payload)?;
    let mut back = vec![0u8; payload.len()];
    let mut got = 0;
    while got < back.len() {
        match reader.read(&mut back[got..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the echo ended after {got} of {} bytes", payload.len()),
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io::Error::new(e.kind(), format!("reading the echo after {got} of {} bytes: {e}", payload.len())));
            }
        }
    }
    if back != payload {
        let at = back.iter().zip(payload).position(|(a, b)| a != b).unwrap_or(0);
        return Err(io::Error::other(format!("echo of {} bytes differs at offset {at}", payload.len())));
    }
    Ok(())
}

/// Half-closes and expects the backend to close too, with nothing more to read.
fn finish_clean(reader: &mut BufReader<TcpStream>, writer: &TcpStream) -> io::Result<()> {
    writer.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest)?;
    if !rest.is_empty() {
        return Err(io::Error::other(format!("{} unexpected bytes before the backend closed", rest.len())));
    }
    Ok(())
}

/// A TCP connection from `src` to `dst`, made within `timeout`, in the calling thread's
/// namespace. `src` is bound first (with `SO_REUSEADDR`), so the connection leaves from that
/// address and, unless `src.port()` is 0, that port. A connect that gets no answer fails with
/// [`io::ErrorKind::TimedOut`].
pub fn connect_from(src: SocketAddrV4, dst: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let sockaddr = |a: SocketAddrV4| {
        // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_port = a.port().to_be();
        sa.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
        sa
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let what = |w: &str, e: io::Error| io::Error::new(e.kind(), format!("{w} ({src} -> {dst}): {e}"));
    // SAFETY: socket has no preconditions; the fd is owned by `fd` from here on.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if raw < 0 {
        return Err(what("socket", io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    // SAFETY: valid fd, option value and length.
    let rc = unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(what("SO_REUSEADDR", io::Error::last_os_error()));
    }
    let (s, d) = (sockaddr(src), sockaddr(dst));
    // SAFETY: valid fd and address.
    if unsafe { libc::bind(raw, (&s as *const libc::sockaddr_in).cast(), len) } != 0 {
        return Err(what("bind", io::Error::last_os_error()));
    }
    // SAFETY: valid fd and address.
    if unsafe { libc::connect(raw, (&d as *const libc::sockaddr_in).cast(), len) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(what("connect", e));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect ({src} -> {dst}): no answer within {timeout:?}"),
                ));
            }
            let mut pfd = libc::pollfd { fd: raw, events: libc::POLLOUT, revents: 0 };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, i32::MAX as u128) as i32) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(what("poll", e));
            }
            if n > 0 {
                break;
            }
        }
        let mut err: libc::c_int = 0;
        let mut elen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid fd, buffer and length.
        let rc = unsafe {
            libc::getsockopt(raw, libc::SOL_SOCKET, libc::SO_ERROR, (&mut err as *mut libc::c_int).cast(), &mut elen)
        };
        if rc != 0 {
            return Err(what("SO_ERROR", io::Error::last_os_error()));
        }
        if err != 0 {
            return Err(what("connect", io::Error::from_raw_os_error(err)));
        }
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// [`who`] from `src` (see [`connect_from`]).
pub fn who_from(src: SocketAddrV4, dst: SocketAddrV4) -> io::Result<String> {
    let mut s = Session::connect_from(src, dst, CONNECT_TIMEOUT)?;
    let id = s.identity()?;
    s.echo(&[])?;
    Ok(id)
}

/// A long-lived `ECHO` connection: any number of [`EchoLoop::round`]s, each sending a payload
/// and checking that exactly it comes back, then [`EchoLoop::finish`] for a clean close.
pub struct EchoLoop {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    identity: String,
    local: SocketAddr,
}

impl EchoLoop {
    /// Connects to `addr`, reads the backend's identity line and sends `ECHO`.
    pub fn connect(addr: SocketAddr) -> io::Result<EchoLoop> {
        let mut s = Session::connect(addr)?;
        let local = s.local_addr()?;
        let identity = s.identity()?;
        s.writer.write_all(b"ECHO\n")?;
        Ok(EchoLoop { reader: s.reader, writer: s.writer, identity, local })
    }

    /// The identity line the backend sent when the connection opened.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// This end's address (the client address kpf sees).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// A handle on the socket, e.g. to shut it down from another thread.
    pub fn socket(&self) -> io::Result<TcpStream> {
        self.writer.try_clone()
    }

    /// Changes how long one read or write may block (default [`IO_TIMEOUT`]).
    pub fn set_timeout(&self, t: Duration) -> io::Result<()> {
        self.writer.set_read_timeout(Some(t))?;
        self.writer.set_write_timeout(Some(t))
    }

    /// Sends `payload` and reads exactly as many bytes back, failing unless they are the same.
    /// Keep payloads within the socket buffers (a few tens of KiB): the write completes before
    /// the read starts.
    pub fn round(&mut self, payload: &[u8]) -> io::Result<()> {
        echo_exact(&mut self.reader, &mut self.writer, payload)
    }

    /// Half-closes and expects the backend to close too, with nothing more to read.
    pub fn finish(mut self) -> io::Result<()> {
        finish_clean(&mut self.reader, &self.writer)
    }
}

/// Connects, reads the identity line, does an empty ECHO and closes. Returns the identity.
pub fn who(addr: SocketAddr) -> io::Result<String> {
    let mut s = Session::connect(addr)?;
    let id = s.identity()?;
    s.echo(&[])?;
    Ok(id)
}

/// The outcome of a verified [`stream`].
#[derive(Clone, Debug)]
pub struct StreamResult {
    /// The backend's identity line.
    pub identity: String,
    /// Bytes sent to the backend (pattern `seed`) = bytes it verified.
    pub sent: u64,
    /// Bytes received from the backend (pattern `seed + 1`), verified here.
    pub received: u64,
    /// From connect to the verdict.
    pub elapsed: Duration,
    /// SHA-256 hex of what was sent; the backend's `OK` verdict carried the same hash.
    pub sent_sha256: String,
    /// SHA-256 hex of what was received; equal to the pattern's.
    pub received_sha256: String,
    /// The verdict line as received, e.g. `OK 3a7b...`.
    pub verdict: String,
}

impl StreamResult {
    /// Throughput of one direction, in Gbit/s.
    pub fn gbit_per_s(&self) -> f64 {
        self.sent as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e9
    }
}

/// Sends `len` bytes of pattern `seed` to the backend behind `addr` while receiving `len` bytes
/// of pattern `seed + 1` from it. Fails unless every received byte matches the pattern (checked
/// byte by byte and by SHA-256) and the backend's verdict is `OK` with the SHA-256 of what was
/// sent.
pub fn stream(addr: SocketAddr, seed: u64, len: u64) -> io::Result<StreamResult> {
    let start = Instant::now();
    let mut s = Session::connect(addr)?;
    let identity = s.identity()?;
    s.writer.write_all(format!("STREAM {seed} {len}\n").as_bytes())?;
    let mut w = s.writer.try_clone()?;
    let sender = std::thread::spawn(move || send_pattern(&mut w, seed, len));
    let received = receive_pattern(&mut s.reader, seed.wrapping_add(1), len);
    let sent_sha256 = sender.join().map_err(|_| io::Error::other("stream sender panicked"))??;
    let received = received?;
    let verdict = read_line(&mut s.reader, "verdict line")?;
    let elapsed = start.elapsed();
    if let Some(at) = received.first_bad {
        return Err(io::Error::other(format!(
            "{identity} via {addr}: received data differs from pattern {} at offset {at} (verdict {verdict:?})",
            seed.wrapping_add(1)
        )));
    }
    let expected = Pattern::sha256_hex(seed.wrapping_add(1), len);
    if received.sha256 != expected {
        return Err(io::Error::other(format!("received SHA-256 {} is not the pattern's {expected}", received.sha256)));
    }
    if verdict != format!("OK {sent_sha256}") {
        return Err(io::Error::other(format!(
            "{identity} via {addr}: backend verdict {verdict:?}, expected \"OK {sent_sha256}\""
        )));
    }
    let mut rest = Vec::new();
    s.reader.read_to_end(&mut rest)?;
    if !rest.is_empty() {
        return Err(io::Error::other(format!("{} unexpected bytes after the verdict", rest.len())));
    }
    Ok(StreamResult {
        identity,
        sent: len,
        received: len,
        elapsed,
        sent_sha256,
        received_sha256: received.sha256,
        verdict,
    })
}

// ---------------------------------------------------------------------------------------------
// Checksum control

pub(crate) fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    sum
}

pub(crate) fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends one TCP SYN from `src` to `dst` whose TCP checksum is deliberately wrong, through a raw
/// socket of the calling thread's namespace. A receiver that verifies checksums counts it in
/// `Tcp InCsumErrors` and drops it.
pub fn send_bad_checksum_syn(src: SocketAddrV4, dst: SocketAddrV4) -> io::Result<()> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 5 words
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8, 0, tcp.len() as u8]);
    let good = csum_fold(csum_add(csum_add(0, &pseudo), &tcp));
    // XOR with anything but 0xffff cannot produce the other encoding of the same sum.
    let bad = good ^ 0x5a5a;
    tcp[16..18].copy_from_slice(&bad.to_be_bytes());

    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = libc::IPPROTO_TCP as u8;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let hsum = csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&hsum.to_be_bytes());
    let mut packet = ip.to_vec();
    packet.extend_from_slice(&tcp);

    // SAFETY: plain socket calls with a valid buffer and address; the fd is closed below.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_addr.s_addr = u32::from_ne_bytes(dst.ip().octets());
        let rc = libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc != packet.len() as isize {
            return Err(io::Error::new(err.kind(), format!("sending a raw TCP segment to {dst}: {err}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_the_same_however_it_is_read() {
        let mut whole = vec![0u8; 1000];
        Pattern::new(7).fill(&mut whole);
        let mut pieces = vec![0u8; 1000];
        let mut p = Pattern::new(7);
        let mut at = 0;
        for n in [1, 3, 8, 13, 64, 5, 906] {
            p.fill(&mut pieces[at..at + n]);
            at += n;
        }
        assert_eq!(whole, pieces);
        let mut other = vec![0u8; 1000];
        Pattern::new(8).fill(&mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn checksum_helpers_agree_with_a_known_header() {
        // The IPv4 header example from RFC 1071 discussions (checksum field zeroed).
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(csum_fold(csum_add(0, &hdr)), 0xb861);
    }

    #[test]
    fn receive_pattern_finds_the_first_bad_byte() {
        let mut data = vec![0u8; 5000];
        Pattern::new(3).fill(&mut data);
        let good = receive_pattern(&mut &data[..], 3, 5000).unwrap();
        assert_eq!(good.first_bad, None);
        assert_eq!(good.sha256, Pattern::sha256_hex(3, 5000));
        data[4321] ^= 1;
        assert_eq!(receive_pattern(&mut &data[..], 3, 5000).unwrap().first_bad, Some(4321));
        assert!(receive_pattern(&mut &data[..100], 3, 5000).is_err());
    }
}
