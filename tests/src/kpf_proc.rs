//! Running the `kpf` binary in a gateway namespace: `kpf run` in the foreground, ready once it
//! prints `ready`, stopped with `kpf down` (or SIGTERM, or SIGKILL to play a crash). Its stderr
//! (the log) is kept for the caller.
//!
//! [`Kpf::start`] makes a throwaway config, socket and pin directory; [`Kpf::launch`] runs on a
//! config file the caller owns, so kpf can be restarted (or replaced by another binary) on the
//! same config and pinned state (with a pin directory on a bpffs the caller mounted, see
//! [`crate::bpffs`]).

use std::{
    collections::BTreeMap,
    fmt,
    io::{self, BufRead, BufReader, Read},
    net::SocketAddrV4,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// How long `kpf run` may take to print `ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long kpf may take to stop after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The XDP attach mode passed as `kpf run --mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Native,
    Generic,
    Tc,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Generic => "generic",
            Mode::Tc => "tc",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kpf binary: `$KPF_BIN`, else `<workspace>/target/release/kpf`, else `target/debug/kpf`.
pub fn kpf_binary() -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("KPF_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("KPF_BIN={} is not a file", p.display())));
        }
        return Ok(p);
    }
    let workspace = crate::workspace_root();
    for profile in ["release", "debug"] {
        let p = workspace.join("target").join(profile).join("kpf");
        if p.is_file() {
            return Ok(p.canonicalize().unwrap_or(p));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "the kpf binary is not built: run `cargo build --release -p kpf` (looked for target/release/kpf \
             and target/debug/kpf under {}, and KPF_BIN is not set)",
            workspace.display()
        ),
    ))
}

/// The SNAT range [`config_toml`] gives kpf.
pub const SNAT_PORTS: &str = "40000-59999";
/// [`SNAT_PORTS`] as numbers.
pub const SNAT_RANGE: std::ops::RangeInclusive<u16> = 40000..=59999;

/// A config for `kpf run`: `interfaces`, SNAT ports [`SNAT_PORTS`], `manage_sysctls = true`, no
/// health checks (the test backends log every connection that sends no request, as a probe does),
/// and one frontend per `(frontend, backend)` pair.
pub fn config_toml(interfaces: &[&str], mode: Mode, frontends: &[(SocketAddrV4, SocketAddrV4)]) -> String {
    let ifaces: Vec<String> = interfaces.iter().map(|i| format!("{i:?}")).collect();
    let mut s = format!(
        "interfaces = [{}]\nmode = \"{mode}\"\nsnat_ports = \"{SNAT_PORTS}\"\nmanage_sysctls = true\n\n[health]\ncheck = \"none\"\n",
        ifaces.join(", ")
    );
    for (fe, be) in frontends {
        s += &format!("\n[[frontend]]\naddress = \"{}\"\nport = {}\nbackends = [\"{be}\"]\n", fe.ip(), fe.port());
    }
    s
}

/// A running `kpf run`. Dropping it stops kpf (see [`Kpf::stop`]).
pub struct Kpf {
    binary: PathBuf,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    /// Holds the config, the control socket and the pin directory of this instance, when this
    /// handle made them (removed when kpf stops); `None` when the caller owns them
    /// ([`Kpf::launch`]).
    dir: Option<PathBuf>,
    config_path: PathBuf,
    socket: PathBuf,
}

/// A running kpf's CLI: its binary and control socket (plain paths, so any thread can hold it).
#[derive(Clone, Debug)]
pub struct Control {
    binary: PathBuf,
    socket: PathBuf,
}

impl Control {
    /// Runs `kpf ARGS --socket SOCKET` and returns its stdout. Fails with its exit status, stdout
    /// and stderr if it does not exit 0.
    pub fn cli(&self, args: &[&str]) -> io::Result<String> {
        let out = std::process::Command::new(&self.binary)
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "kpf {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr).trim_end()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// How [`Kpf::launch`] runs kpf on a config file the caller owns.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The kpf binary to run (e.g. [`kpf_binary`], or a copy of it to play an upgrade).
    pub binary: PathBuf,
    /// The config file: `kpf run --config FILE`. kpf writes accepted changes back to it.
    pub config_path: PathBuf,
    /// The control socket the config names (kept for [`Kpf::socket`]).
    pub socket: PathBuf,
    /// `--mode`, if any (else the config's `mode`).
    pub mode: Option<Mode>,
    pub ready_timeout: Duration,
    /// `RUST_LOG` for kpf (`None`: inherited).
    pub rust_log: Option<String>,
    /// Called with kpf's pid once it is spawned, before waiting for `ready` (to act on a
    /// starting daemon).
    pub on_spawn: Option<fn(u32, &Launch)>,
}

impl Launch {
    /// `binary` on `config_path` with `socket`, the config's mode, [`READY_TIMEOUT`], `RUST_LOG=info`.
    pub fn new(binary: &Path, config_path: &Path, socket: &Path) -> Launch {
        Launch {
            binary: binary.to_owned(),
            config_path: config_path.to_owned(),
            socket: socket.to_owned(),
            mode: None,
            ready_timeout: READY_TIMEOUT,
            rust_log: Some("info".into()),
            on_spawn: None,
        }
    }
}

/// How kpf ended.
#[derive(Debug)]
pub struct Stopped {
    pub status: ExitStatus,
    /// Everything kpf wrote to stderr (and any stdout besides `ready`).
    pub log: String,
    /// Whether `kpf down` was refused or failed, so kpf got SIGTERM instead (its output).
    pub down_failed: Option<String>,
    /// Whether it had to be killed because it did not stop within [`STOP_TIMEOUT`].
    pub killed: bool,
}

impl Stopped {
    /// `kpf down` worked and kpf exited by itself, successfully.
    pub fn is_clean(&self) -> bool {
        self.status.success() && self.down_failed.is_none() && !self.killed
    }
}

static NEXT_INSTANCE: AtomicU32 = AtomicU32::new(0);

/// Whether the TOML text sets top-level `key` itself.
fn sets(config_text: &str, key: &str) -> bool {
    config_text
        .lines()
        .take_while(|l| !l.trim_start().starts_with('['))
        .any(|l| l.trim_start().strip_prefix(key).is_some_and(|r| r.trim_start().starts_with('=')))
}

impl Kpf {
    /// Writes `config_text` to a file in a fresh temporary directory and runs
    /// `kpf run --config FILE --mode MODE` in `gateway`, returning once kpf printed `ready`.
    /// Fails with kpf's log if it exits first or is not ready within [`READY_TIMEOUT`].
    ///
    /// Unless the config sets them, `pin_dir` and `socket` are pointed into that directory (they
    /// are prepended to the text), so instances never share pinned state or a control socket.
    /// `ip netns exec` gives kpf a private mount namespace, so the bpffs kpf mounts on its pin
    /// directory, and with it everything pinned there, goes away when kpf exits.
    ///
    /// kpf gets SIGTERM if the thread that started it ends, so a test killed midway does not
    /// leave it running: keep the returned value on the thread that called this.
    pub fn start(gateway: &Netns, config_text: &str, mode: Mode) -> io::Result<Kpf> {
        Kpf::start_with(&kpf_binary()?, gateway, config_text, mode, READY_TIMEOUT)
    }

    pub fn start_with(
        binary: &Path,
        gateway: &Netns,
        config_text: &str,
        mode: Mode,
        ready_timeout: Duration,
    ) -> io::Result<Kpf> {
        let dir = std::env::temp_dir().join(format!(
            "kpf-test-{}-{}",
            std::process::id(),
            NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let config_path = dir.join("kpf.toml");
        let socket = dir.join("kpf.sock");
        let mut text = String::new();
        if !sets(config_text, "pin_dir") {
            text += &format!("pin_dir = {:?}\n", dir.join("pins").display().to_string());
        }
        let socket = if sets(config_text, "socket") {
            // Not ours to know; `kpf down --config` reads it from the file.
            PathBuf::new()
        } else {
            text += &format!("socket = {:?}\n", socket.display().to_string());
            socket
        };
        text += config_text;
        std::fs::write(&config_path, &text)?;
        let launch = Launch {
            binary: binary.to_owned(),
            config_path,
            socket,
            mode: Some(mode),
            ready_timeout,
            rust_log: None,
            on_spawn: None,
        };
        Kpf::spawn(gateway, launch, Some(dir))
    }

    /// Runs `kpf run --config FILE` in `gateway` on a config file (and pin directory, and
    /// socket) the caller owns, returning once kpf printed `ready`: the way to restart kpf on the
    /// same config and pinned state, or to start another binary on it. Nothing is removed when
    /// it stops. As with [`Kpf::start`], keep the handle on the thread that called this.
    pub fn launch(gateway: &Netns, launch: Launch) -> io::Result<Kpf> {
        Kpf::spawn(gateway, launch, None)
    }

    fn spawn(gateway: &Netns, launch: Launch, dir: Option<PathBuf>) -> io::Result<Kpf> {
        let hook = launch.on_spawn.map(|f| (f, launch.clone()));
        let Launch { binary, config_path, socket, mode, ready_timeout, rust_log, .. } = launch;
        let binary = binary.as_path();
        let remove_dir = || {
            if let Some(d) = &dir {
                let _ = std::fs::remove_dir_all(d);
            }
        };
        let mut cmd = gateway.command(binary.to_str().ok_or_else(|| io::Error::other("non-UTF-8 kpf path"))?);
        cmd.arg("run").arg("--config").arg(&config_path);
        if let Some(mode) = mode {
            cmd.args(["--mode", mode.as_str()]);
        }
        if let Some(level) = rust_log {
            cmd.env("RUST_LOG", level);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                remove_dir();
                return Err(io::Error::new(e.kind(), format!("starting {}: {e}", binary.display())));
            }
        };

        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let readers = vec![
            {
                let log = log.clone();
                std::thread::spawn(move || drain(stderr, &log))
            },
            {
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut ready_tx = Some(ready_tx);
                    for line in BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        if line == "ready" {
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(());
                            }
                        } else {
                            log.lock().unwrap_or_else(|e| e.into_inner()).push_str(&format!("[stdout] {line}\n"));
                        }
                    }
                })
            },
        ];
        let mut kpf = Kpf { binary: binary.to_owned(), child: Some(child), log, readers, dir, config_path, socket };
        if let (Some((f, launch)), Some(pid)) = (hook, kpf.pid()) {
            f(pid, &launch);
        }

        match ready_rx.recv_timeout(ready_timeout) {
            Ok(()) => Ok(kpf),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // stdout closed without `ready`: kpf exited (or is exiting).
                let stopped = kpf.finish(Signal::Term);
                Err(io::Error::other(format!(
                    "kpf exited before it was ready ({}); its log:\n{}",
                    stopped.status, stopped.log
                )))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let stopped = kpf.finish(Signal::Term);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("kpf did not print `ready` within {ready_timeout:?}; its log:\n{}", stopped.log),
                ))
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The config file kpf was started with (with `pin_dir` and `socket` filled in).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The control socket, for `kpf status --socket ...` and friends (empty if the caller's
    /// config chose it).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// This instance's binary and control socket, for running its CLI from another thread.
    pub fn control(&self) -> Control {
        Control { binary: self.binary.clone(), socket: self.socket.clone() }
    }

    /// Runs `kpf ARGS --socket SOCKET` (this instance's control socket); see [`Control::cli`].
    pub fn cli(&self, args: &[&str]) -> io::Result<String> {
        self.control().cli(args)
    }

    /// kpf's log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The binary this kpf runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to kpf.
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        let pid = self.pid().ok_or_else(|| io::Error::other("kpf has stopped"))?;
        // SAFETY: signalling our own child, which has not been reaped (we hold it).
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether kpf has exited (without reaping it).
    pub fn has_exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|c| c.try_wait().is_ok_and(|s| s.is_some()))
    }

    /// Kills kpf with SIGKILL, the way a crash ends it: no `kpf down`, no clean-up of its own,
    /// the pinned dataplane stays. Returns once it has exited.
    pub fn kill9(mut self) -> Stopped {
        self.finish(Signal::Kill)
    }

    /// Asks kpf to detach and exit with `kpf down` (its control socket), falling back to
    /// SIGTERM if that fails, and to SIGKILL after [`STOP_TIMEOUT`]. Returns how it ended, with
    /// its complete log: kpf logs its counters when it stops (see [`counters`] and
    /// [`frontend_stats`]).
    pub fn stop(mut self) -> Stopped {
        self.finish(Signal::Down)
    }

    /// Stops kpf with SIGTERM alone: the daemon exits and leaves its pinned dataplane behind.
    /// With [`Kpf::start`]'s pin directory that lives only as long as kpf's private mount
    /// namespace, i.e. until it exits; on a bpffs the caller mounted it stays attached.
    pub fn terminate(mut self) -> Stopped {
        self.finish(Signal::Term)
    }

    fn finish(&mut self, how: Signal) -> Stopped {
        let Some(mut child) = self.child.take() else {
            return Stopped { status: ExitStatus::default(), log: self.log(), down_failed: None, killed: false };
        };
        let mut killed = false;
        let mut down_failed = None;
        let status = match child.try_wait() {
            Ok(Some(s)) => s,
            _ => {
                let mut sigterm = how != Signal::Kill;
                if how == Signal::Kill {
                    let _ = child.kill();
                }
                if how == Signal::Down {
                    let out = std::process::Command::new(&self.binary)
                        .arg("down")
                        .arg("--config")
                        .arg(&self.config_path)
                        .stdin(Stdio::null())
                        .output();
                    match out {
                        Ok(o) if o.status.success() => sigterm = false,
                        Ok(o) => {
                            down_failed = Some(format!(
                                "kpf down: {}: {}{}",
                                o.status,
                                String::from_utf8_lossy(&o.stdout),
                                String::from_utf8_lossy(&o.stderr)
                            ))
                        }
                        Err(e) => down_failed = Some(format!("kpf down: {e}")),
                    }
                }
                if sigterm {
                    // SAFETY: signalling our own child, which has not been reaped yet.
                    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                }
                let deadline = Instant::now() + STOP_TIMEOUT;
                loop {
                    match child.try_wait() {
                        Ok(Some(s)) => break s,
                        Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                        _ => {
                            killed = true;
                            let _ = child.kill();
                            break child.wait().unwrap_or_default();
                        }
                    }
                }
            }
        };
        // The pipes close with the process: the readers finish.
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
        Stopped { status, log: self.log(), down_failed, killed }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Signal {
    Down,
    Term,
    Kill,
}

impl Drop for Kpf {
    fn drop(&mut self) {
        let stopped = self.finish(Signal::Down);
        if std::thread::panicking() {
            eprintln!("--- kpf log ({}) ---\n{}--- end of kpf log ---", stopped.status, stopped.log);
        }
    }
}

fn drain(mut r: impl Read, log: &Mutex<String>) {
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => log.lock().unwrap_or_else(|e| e.into_inner()).push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
}

/// The global counters from kpf's last `counters: name=value ...` log line (`all zero` gives an
/// empty map). `None` if there is no such line.
pub fn counters(log: &str) -> Option<BTreeMap<String, u64>> {
    let line = log.lines().rev().find_map(|l| l.split_once("counters: ").map(|(_, rest)| rest))?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect(),
    )
}

/// Per-frontend statistics from kpf's shutdown log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// `frontend ADDR:PORT: packets=.. bytes=.. new_flows=..` lines, by `ADDR:PORT` (`*:PORT` for
/// a frontend without an address). The last line per frontend wins.
pub fn frontend_stats(log: &str) -> BTreeMap<String, FrontendStats> {
    let mut out = BTreeMap::new();
    for line in log.lines() {
        let Some((_, rest)) = line.split_once("frontend ") else { continue };
        let Some((label, fields)) = rest.split_once(": ") else { continue };
        let mut s = FrontendStats::default();
        let mut seen = 0;
        for kv in fields.split_whitespace() {
            let Some((k, v)) = kv.split_once('=') else { continue };
            let Ok(v) = v.parse() else { continue };
            match k {
                "packets" => s.packets = v,
                "bytes" => s.bytes = v,
                "new_flows" => s.new_flows = v,
                _ => continue,
            }
            seen += 1;
        }
        if seen == 3 {
            out.insert(label.to_owned(), s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snat_range_is_snat_ports() {
        assert_eq!(format!("{}-{}", SNAT_RANGE.start(), SNAT_RANGE.end()), SNAT_PORTS);
    }

    #[test]
    fn parses_the_shutdown_log() {
        let log = "[2025-01-01T00:00:00Z INFO  kpf::daemon] frontend 10.100.0.1:9093 -> 10.100.0.21:39092\n\
                   [2025-01-01T00:00:01Z INFO  kpf::daemon] counters: new_flows=3 pass_not_ours=17\n\
                   [2025-01-01T00:00:01Z INFO  kpf::daemon] frontend 10.100.0.1:9093: packets=10 bytes=1000 new_flows=3\n";
        let c = counters(log).unwrap();
        assert_eq!(c.get("new_flows"), Some(&3));
        assert_eq!(c.get("pass_not_ours"), Some(&17));
        let f = frontend_stats(log);
        assert_eq!(f.len(), 1);
        assert_eq!(f["10.100.0.1:9093"], FrontendStats { packets: 10, bytes: 1000, new_flows: 3 });
        assert_eq!(counters("counters: all zero"), Some(BTreeMap::new()));
        assert_eq!(counters("nothing"), None);
    }

    #[test]
    fn config_is_what_kpf_expects() {
        let c = config_toml(
            &["eth0", "eth1"],
            Mode::Generic,
            &[("10.100.1.1:9093".parse().unwrap(), "10.100.2.21:39092".parse().unwrap())],
        );
        assert!(c.contains("interfaces = [\"eth0\", \"eth1\"]"), "{c}");
        assert!(c.contains("address = \"10.100.1.1\"\nport = 9093\nbackends = [\"10.100.2.21:39092\"]"), "{c}");
        assert!(!sets(&c, "pin_dir") && !sets(&c, "socket"));
        assert!(sets("socket = \"/x\"\n[[frontend]]\n", "socket"));
        assert!(!sets("[[frontend]]\nsocket = 1\n", "socket"));
        assert!(!sets("sockets = 1\n", "socket"));
    }
}
