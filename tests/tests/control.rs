//! The control plane against the real `kpf` binary: live mapping changes from the CLI under load,
//! restarts (SIGKILL, SIGTERM, a different binary) that established connections never notice,
//! drain and reset on removal, `set` moving only new connections, rejected input changing
//! nothing, SIGHUP and `kpf apply`.
//!
//! Run as root, after `cargo build --release -p kpf`:
//! `cargo test --release -p kpf-tests --test control -- --test-threads=1 --nocapture`
//!
//! Every test builds its own one-NIC topology (client, gateway, b1..b3 on a bridge) and mounts a
//! bpffs of its own as kpf's `pin_dir` (see `kpf_tests::bpffs`: a bpffs kpf mounted itself inside
//! `ip netns exec` would vanish with it, and restarts must find the pinned state). Frontends are
//! wildcard (`*:PORT`), as in the README. The CLI runs as separate processes of the kpf binary.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use kpf_tests::{
    bpffs::{self, BpfFs},
    cli::{CliOutput, KpfCli},
    kpf_proc::{Kpf, Launch, Mode, SNAT_PORTS, kpf_binary},
    netns::{self, Netns},
    peer::{self, Backend, EchoLoop, Session},
    streams::{Pace, StreamReport, Streams},
    topology::{BACKEND_NAMES, BACKEND_PORT, OneNic},
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::Value;

/// The frontend ports every test starts with, mapped to b1, b2, b3.
const PORTS: [u16; 3] = [9093, 9094, 9095];
/// How the load streams behave: chunks up to 8 KiB, a short pause after each round so 100
/// streams leave CPU for the daemon and the CLI on small machines.
const PACE: Pace = Pace { max_chunk: 8192, pause: Duration::from_millis(20) };
/// Upper bound for anything that should happen "at once" (a stream's next rounds, a SIGHUP).
const SOON: Duration = Duration::from_secs(10);

use kpf_tests::serial::begin;

fn step(t: &mut Instant, what: &str) {
    eprintln!("  {what}: {:.2?}", t.elapsed());
    *t = Instant::now();
}

/// A directory removed (with its contents) on drop.
struct TempDir(PathBuf);

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

impl TempDir {
    fn new() -> io::Result<TempDir> {
        let p = std::env::temp_dir().join(format!(
            "kpf-control-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        // Other users must reach the socket inside (the non-root test).
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One frontend as the tests model it: wildcard address, port, backend.
type Mapping = BTreeMap<u16, SocketAddrV4>;

fn backend(topo: &OneNic, i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(topo.backend_addrs[i], BACKEND_PORT)
}

/// The config file text for `mapping` (wildcard frontends).
fn config_text(pin_dir: &Path, socket: &Path, mapping: &Mapping) -> String {
    config_text_in(pin_dir, socket, mapping, "native")
}

fn config_text_in(pin_dir: &Path, socket: &Path, mapping: &Mapping, mode: &str) -> String {
    let mut s = format!(
        "interface = \"eth0\"\nmode = \"{mode}\"\nsnat_ports = \"{SNAT_PORTS}\"\nmanage_sysctls = true\n\
         pin_dir = {:?}\nsocket = {:?}\n\n\
         # The backends are traffic peers that log every odd connection: no health-check probes.\n\
         [health]\ncheck = \"none\"\n",
        pin_dir.display().to_string(),
        socket.display().to_string()
    );
    for (port, b) in mapping {
        s += &format!("\n[[frontend]]\nport = {port}\nbackends = [\"{b}\"]\n");
    }
    s
}

/// Everything one test runs on. Fields drop in order: kpf (`kpf down`), the bpffs (`kpf down`
/// again if needed, unmount), the directory, the backends, the namespaces.
struct Setup {
    kpf: Option<Kpf>,
    pins: BpfFs,
    dir: TempDir,
    backends: Vec<Backend>,
    topo: OneNic,
    cli: KpfCli,
    config_path: PathBuf,
    socket: PathBuf,
    /// Every kpf process this test started, to check none is left.
    pids: Vec<u32>,
}

impl Setup {
    /// Topology, b1..b3 on 39092, a bpffs, and kpf running `initial` (port -> backend index).
    fn new(initial: &[(u16, usize)]) -> Setup {
        Setup::in_mode(initial, "native")
    }

    /// The same with kpf attached in `mode` (native, generic, tc).
    fn in_mode(initial: &[(u16, usize)], mode: &str) -> Setup {
        let topo = OneNic::new().expect("building the topology");
        let backends: Vec<Backend> = topo
            .backends
            .iter()
            .zip(BACKEND_NAMES)
            .map(|(ns, id)| Backend::new(ns, id).expect("starting a backend"))
            .collect();
        let dir = TempDir::new().expect("temp dir");
        let mut pins = BpfFs::new().expect("mounting a bpffs");
        let config_path = dir.0.join("kpf.toml");
        let socket = dir.0.join("kpf.sock");
        let binary = kpf_binary().expect("the kpf binary");
        pins.down_on_drop(&binary, &config_path, &socket);
        let mapping: Mapping = initial.iter().map(|&(p, i)| (p, backend(&topo, i))).collect();
        std::fs::write(&config_path, config_text_in(pins.path(), &socket, &mapping, mode)).expect("writing the config");
        let cli = KpfCli::new(&binary, &socket);
        let mut s = Setup { kpf: None, pins, dir, backends, topo, cli, config_path, socket, pids: Vec::new() };
        s.start(&binary);
        s
    }

    /// Starts `binary` on the config file (which must not be running yet).
    fn start(&mut self, binary: &Path) {
        self.start_in(binary, None);
    }

    /// The same with `--mode`, if given.
    fn start_in(&mut self, binary: &Path, mode: Option<Mode>) {
        assert!(self.kpf.is_none(), "kpf is already running");
        let launch = Launch { mode, ..Launch::new(binary, &self.config_path, &self.socket) };
        let kpf = Kpf::launch(&self.topo.gateway, launch).expect("starting kpf");
        self.pids.extend(kpf.pid());
        self.kpf = Some(kpf);
    }

    fn kpf(&self) -> &Kpf {
        self.kpf.as_ref().expect("kpf is running")
    }

    fn client(&self) -> &Netns {
        &self.topo.client
    }

    fn fe(&self, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.topo.gateway_addr, port))
    }

    fn backend(&self, i: usize) -> SocketAddrV4 {
        backend(&self.topo, i)
    }

    /// Connects to `port` and returns the identity of the backend reached.
    fn who(&self, port: u16) -> io::Result<String> {
        let addr = self.fe(port);
        self.client().enter(|| peer::who(addr))?
    }

    fn echo_loop(&self, port: u16) -> io::Result<EchoLoop> {
        let addr = self.fe(port);
        self.client().enter(|| EchoLoop::connect(addr))?
    }

    /// `kpf map ls --json` as port -> backend (every frontend must be wildcard with one backend).
    fn map_ls(&self) -> Mapping {
        let v = self.cli.json(&["map", "ls", "--json"]).expect("kpf map ls --json");
        mapping_from_json(&v)
    }

    /// The frontends in the config file on disk, parsed as TOML.
    fn file_mapping(&self) -> Mapping {
        file_mapping(&self.config_path)
    }

    fn status(&self) -> Value {
        self.cli.json(&["status", "--json"]).expect("kpf status --json")
    }

    fn flows(&self, port: Option<u16>) -> Vec<Value> {
        let p = port.map(|p| p.to_string());
        let mut args = vec!["flows", "--json"];
        if let Some(p) = &p {
            args.extend(["--port", p]);
        }
        match self.cli.json(&args).expect("kpf flows --json") {
            Value::Array(v) => v,
            other => panic!("kpf flows --json printed {other}"),
        }
    }

    /// The XDP program id attached to the gateway's eth0.
    fn xdp_prog_id(&self) -> Option<u64> {
        xdp_prog_id(&self.topo.gateway, "eth0")
    }

    /// Everything a rejected change must leave as it was.
    fn snapshot(&self) -> Snapshot {
        let meta = std::fs::metadata(&self.config_path).expect("config metadata");
        Snapshot {
            frontends_map: bpftool_dump(&self.pins.path().join("maps/KPF_FRONTENDS")),
            config_map: bpftool_dump(&self.pins.path().join("maps/KPF_CONFIG")),
            file: std::fs::read(&self.config_path).expect("reading the config"),
            file_inode: meta.ino(),
            listed: self.cli.json(&["map", "ls", "--json"]).expect("kpf map ls --json"),
        }
    }

    /// Stops kpf with `kpf down`, checks it detached and unpinned, drops everything, and checks
    /// that no namespace, mount or kpf process is left.
    fn finish(mut self) {
        if let Some(kpf) = self.kpf.take() {
            let stopped = kpf.stop();
            assert!(
                stopped.is_clean(),
                "kpf did not stop cleanly: {stopped:?}"
            );
            assert!(self.xdp_prog_id().is_none(), "XDP still attached after kpf down");
            let left = self.pins.list().expect("listing the bpffs");
            assert!(left.is_empty(), "kpf down left pinned objects: {left:?}");
        }
        let pids = std::mem::take(&mut self.pids);
        for b in &self.backends {
            assert_eq!(b.problems(), Vec::<String>::new(), "{} had problems", b.identity());
        }
        drop(self);
        let left = netns::own_namespaces().expect("listing namespaces");
        assert!(left.is_empty(), "namespaces left behind: {left:?}");
        let mounts = bpffs::own_mounts().expect("reading mountinfo");
        assert!(mounts.is_empty(), "bpffs left mounted: {mounts:?}");
        for pid in pids {
            // SAFETY: signal 0 only checks for existence.
            let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
            assert!(!alive, "kpf pid {pid} still runs");
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    frontends_map: String,
    config_map: String,
    file: Vec<u8>,
    file_inode: u64,
    listed: Value,
}

fn mapping_from_json(v: &Value) -> Mapping {
    let list = v.as_array().unwrap_or_else(|| panic!("expected a list of frontends, got {v}"));
    let mut out = Mapping::new();
    for f in list {
        assert!(f.get("address").is_none_or(Value::is_null), "unexpected address in {f}");
        let port = f["port"].as_u64().unwrap_or_else(|| panic!("no port in {f}")) as u16;
        let b = f["backends"].as_array().unwrap_or_else(|| panic!("no backends in {f}"));
        assert_eq!(b.len(), 1, "{f}");
        let b: SocketAddrV4 =
            b[0].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad backend in {f}"));
        assert!(out.insert(port, b).is_none(), "port {port} listed twice");
    }
    out
}

fn file_mapping(path: &Path) -> Mapping {
    let text = std::fs::read_to_string(path).expect("reading the config file");
    let doc: toml::Table =
        toml::from_str(&text).unwrap_or_else(|e| panic!("the config file does not parse: {e}\n{text}"));
    let mut out = Mapping::new();
    if let Some(list) = doc.get("frontend") {
        for f in list.as_array().expect("frontend is an array of tables") {
            assert!(f.get("address").is_none(), "unexpected address in {f}");
            let port = f["port"].as_integer().expect("port") as u16;
            let b = f["backends"].as_array().expect("backends");
            assert_eq!(b.len(), 1);
            assert!(
                out.insert(port, b[0].as_str().unwrap().parse().unwrap()).is_none(),
                "port {port} twice in the file"
            );
        }
    }
    out
}

/// `bpftool -j map dump pinned PATH`, as text.
fn bpftool_dump(path: &Path) -> String {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .expect("running bpftool");
    assert!(out.status.success(), "bpftool map dump {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("bpftool prints UTF-8")
}

/// The id of the tcx ingress program on `dev` in `ns`, asked of the kernel (BPF_PROG_QUERY).
fn tc_prog_id(ns: &Netns, dev: &str) -> Option<u64> {
    let (_, progs) = ns
        .enter(|| aya::programs::SchedClassifier::query_tcx(dev, aya::programs::TcAttachType::Ingress))
        .expect("entering the namespace")
        .expect("querying tcx programs");
    assert!(progs.len() <= 1, "{} tcx programs on {dev}", progs.len());
    progs.first().map(|p| u64::from(p.id()))
}

/// The id of the XDP program on `dev` in `ns`, from `ip -j link show`.
fn xdp_prog_id(ns: &Netns, dev: &str) -> Option<u64> {
    let text = ns.ip(&["-j", "link", "show", "dev", dev]).expect("ip link show");
    let v: Value = serde_json::from_str(&text).expect("ip -j link show prints JSON");
    let xdp = &v[0]["xdp"];
    if let Some(id) = xdp["prog"]["id"].as_u64() {
        return Some(id);
    }
    xdp["attached"].as_array().and_then(|a| a.iter().find_map(|p| p["prog"]["id"].as_u64()))
}

fn counters(status: &Value) -> BTreeMap<String, u64> {
    status["counters"]
        .as_object()
        .unwrap_or_else(|| panic!("no counters in {status}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect()
}

/// Asserts no drop_* counter and no pass_no_flow moved.
fn assert_clean_counters(status: &Value) {
    let c = counters(status);
    let bad: Vec<_> = c.iter().filter(|(k, v)| (k.starts_with("drop_") || *k == "pass_no_flow") && **v > 0).collect();
    assert!(bad.is_empty(), "kpf counted drops or packets without a flow: {bad:?} (all: {c:?})");
}

/// Polls `f` every 10 ms until it returns `Some`, or fails after `limit` with `what`.
fn wait_for<T>(limit: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    kpf_tests::wait::poll(limit, Duration::from_millis(10), what, f).0
}

/// How the CLI failed unlike it must: exit code 1, stderr one line `kpf: ...` containing every
/// `want`, nothing on stdout. Empty when it failed as it must.
fn cli_error_problems(out: &CliOutput, wants: &[&str]) -> Vec<String> {
    let mut p = Vec::new();
    if out.code() != Some(1) {
        p.push(format!("{} instead of exit code 1", out.status));
    }
    let err = out.stderr.trim_end_matches('\n');
    if !err.starts_with("kpf: ") {
        p.push("stderr does not start with `kpf: `".into());
    }
    if err.lines().count() != 1 {
        p.push(format!("the error is {} lines, not one", err.lines().count()));
    }
    for w in wants {
        if !err.contains(w) {
            p.push(format!("stderr lacks {w:?}"));
        }
    }
    if !out.stdout.is_empty() {
        p.push("something on stdout".into());
    }
    p
}

fn assert_cli_error(out: &CliOutput, wants: &[&str]) {
    let p = cli_error_problems(out, wants);
    assert!(p.is_empty(), "{}:\n{out}", p.join("; "));
}

fn assert_streams_clean(reports: &[StreamReport], expect: &dyn Fn(SocketAddr) -> &'static str) -> (u64, u64) {
    let mut bad = Vec::new();
    let (mut rounds, mut bytes) = (0, 0);
    for (i, r) in reports.iter().enumerate() {
        if let Some(e) = &r.error {
            bad.push(format!("stream {i} {} -> {} ({}): {e}", r.local, r.target, r.identity));
        }
        if r.identity != expect(r.target) {
            bad.push(format!("stream {i} to {} reached {}, expected {}", r.target, r.identity, expect(r.target)));
        }
        if r.rounds == 0 {
            bad.push(format!("stream {i} completed no round"));
        }
        rounds += r.rounds;
        bytes += r.bytes;
    }
    assert!(bad.is_empty(), "{} stream problem(s):\n  {}", bad.len(), bad.join("\n  "));
    (rounds, bytes)
}

/// Every stream's connection is tracked by kpf with the backend its port maps to. (Keyed by
/// client and frontend: the client's kernel may give connections to different ports the same
/// source port.)
fn assert_flows_match(s: &Setup, streams: &Streams, backend_of: &dyn Fn(u16) -> SocketAddrV4) {
    let flows = s.flows(None);
    let key = |f: &Value| (f["client"].as_str().unwrap().to_owned(), f["frontend"].as_str().unwrap().to_owned());
    let by_conn: BTreeMap<(String, String), &Value> = flows.iter().map(|f| (key(f), f)).collect();
    assert_eq!(by_conn.len(), flows.len(), "kpf flows lists a connection twice: {flows:#?}");
    for (target, local, _) in streams.endpoints() {
        let f = by_conn
            .get(&(local.to_string(), target.to_string()))
            .unwrap_or_else(|| panic!("kpf flows has no connection from {local} to {target}"));
        assert_eq!(f["backend"].as_str(), Some(backend_of(target.port()).to_string().as_str()), "{f}");
        assert_eq!(f["state"].as_str(), Some("established"), "{f}");
    }
}

fn identity_of_port(port: u16) -> &'static str {
    BACKEND_NAMES[PORTS.iter().position(|&p| p == port).expect("one of PORTS")]
}

fn initial() -> Vec<(u16, usize)> {
    PORTS.iter().copied().zip(0..).collect()
}

/// Sets the flag when dropped (also while unwinding), so a helper thread stops.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Reads and parses `path` every 2 ms until `stop`; fails on the first read that is not a
/// complete TOML file. Returns (reads, distinct contents seen).
fn read_config_until(path: &Path, stop: &AtomicBool) -> Result<(u64, u64), String> {
    let (mut reads, mut distinct, mut last) = (0u64, 0u64, String::new());
    while !stop.load(Ordering::SeqCst) {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading the config: {e}"))?;
        if let Err(e) = toml::from_str::<toml::Table>(&text) {
            return Err(format!("a reader saw a config file that does not parse: {e}\n{text}"));
        }
        if text != last {
            distinct += 1;
            last = text;
        }
        reads += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok((reads, distinct))
}

/// `n` sequential `kpf map add/set/rm [--reset]` processes over ports 10000-10099, chosen from
/// `seed`; each must exit 0, and no stream may fail meanwhile. Returns the resulting mapping of
/// those ports, the counts [add, set, rm, rm --reset] and the slowest call.
fn random_changes(s: &Setup, streams: &Streams, seed: u64, n: u32) -> (Mapping, [u32; 4], Duration) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Mapping::new();
    let mut counts = [0u32; 4];
    let mut slowest = Duration::ZERO;
    for k in 0..n {
        let port = 10000 + (k % 100) as u16;
        let port_s = port.to_string();
        let start = Instant::now();
        let out = match model.get(&port).copied() {
            None => {
                let b = s.backend(rng.random_range(0..3));
                model.insert(port, b);
                counts[0] += 1;
                s.cli.run(&["map", "add", &port_s, &b.to_string()])
            }
            Some(cur) if rng.random_bool(0.5) => {
                let i = s.topo.backend_addrs.iter().position(|a| a == cur.ip()).unwrap();
                let b = s.backend((i + rng.random_range(1..3)) % 3);
                model.insert(port, b);
                counts[1] += 1;
                s.cli.run(&["map", "set", &port_s, &b.to_string()])
            }
            Some(_) => {
                model.remove(&port);
                counts[2] += 1;
                if rng.random_bool(0.25) {
                    counts[3] += 1;
                    s.cli.run(&["map", "rm", &port_s, "--reset"])
                } else {
                    s.cli.run(&["map", "rm", &port_s])
                }
            }
        }
        .expect("running the CLI");
        slowest = slowest.max(start.elapsed());
        assert!(out.success(), "change #{k} failed:\n{out}");
        if k % 100 == 99 {
            let failures = streams.failures();
            assert!(failures.is_empty(), "streams failed during change #{k}:\n  {}", failures.join("\n  "));
        }
    }
    (model, counts, slowest)
}

// ---------------------------------------------------------------------------------------------

/// 100 connections stream verified data through 9093-9095 while 1,000 `kpf map` processes add,
/// set and remove 100 other ports. No stream may notice.
#[test]
fn changes_under_load() {
    let Some(_serial) = begin("changes_under_load") else { return };
    let total = Instant::now();
    let mut t = Instant::now();
    let s = Setup::new(&initial());
    step(&mut t, "topology, backends, kpf ready");

    let targets: Vec<SocketAddr> = (0..100).map(|i| s.fe(PORTS[i % 3])).collect();
    let streams = Streams::start(s.client(), &targets, PACE).expect("opening 100 streams");
    streams.wait_all_advance(3, SOON).expect("streams running");
    for (target, local, id) in streams.endpoints() {
        assert_eq!(id, identity_of_port(target.port()), "stream from {local} to {target}");
    }
    step(&mut t, "100 streams running");

    let seed: u64 = rand::rng().random();
    eprintln!("  change sequence seed {seed}");
    let rounds_before = streams.rounds();
    // Meanwhile a reader keeps reading the config file: it must always find a complete file
    // (the old one or the new one), never a partial write.
    let reader_stop = AtomicBool::new(false);
    let changes = Instant::now();
    let (model, counts, slowest, reader) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| read_config_until(&s.config_path, &reader_stop));
        let _stop = StopOnDrop(&reader_stop);
        let (model, counts, slowest) = random_changes(&s, &streams, seed, 1000);
        reader_stop.store(true, Ordering::SeqCst);
        (model, counts, slowest, reader.join().expect("reader thread"))
    });
    let took = changes.elapsed();
    let [adds, sets, rms, resets] = counts;
    eprintln!(
        "  1,000 CLI changes ({adds} add, {sets} set, {rms} rm of which {resets} --reset) in {took:.2?}: \
         {:.1} ms each on average, slowest {slowest:.2?}",
        took.as_secs_f64()
    );
    let (reads, distinct) = reader.unwrap_or_else(|e| panic!("{e}"));
    eprintln!("  config file read {reads} times during the changes, {distinct} distinct versions, every one complete");
    let rounds_after = streams.rounds();
    let stalled: Vec<usize> = (0..rounds_after.len()).filter(|&i| rounds_after[i] <= rounds_before[i]).collect();
    assert!(stalled.is_empty(), "streams that made no progress during the changes: {stalled:?}");
    streams.wait_all_advance(2, SOON).expect("streams still running after the changes");
    t = Instant::now();

    let mut expected = model.clone();
    for (p, i) in initial() {
        expected.insert(p, s.backend(i));
    }
    assert_eq!(s.map_ls(), expected, "kpf map ls after the changes");
    assert_eq!(s.file_mapping(), expected, "the config file after the changes");
    let check =
        s.cli.ok(&["check", "--config", s.config_path.to_str().unwrap()]).expect("kpf check on the written file");
    assert!(check.contains(": ok"), "{check}");
    let status = s.status();
    assert_clean_counters(&status);
    let listed: BTreeSet<u16> = status["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["frontend"].as_str().unwrap()[2..].parse().unwrap())
        .collect();
    assert_eq!(listed, expected.keys().copied().collect(), "kpf status frontends");
    assert_flows_match(&s, &streams, &|port| s.backend(PORTS.iter().position(|&p| p == port).unwrap()));
    // New connections follow the final mapping, on a changed port and on an untouched one.
    if let Some((&p, b)) = expected.iter().find(|(p, _)| **p >= 10000) {
        let i = s.topo.backend_addrs.iter().position(|a| a == b.ip()).unwrap();
        assert_eq!(s.who(p).expect("connecting to a mapped port"), BACKEND_NAMES[i], "port {p}");
    }
    step(&mut t, "final state checked");
    let warnings: Vec<String> =
        s.kpf().log().lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).map(str::to_owned).collect();
    eprintln!(
        "  kpf logged {} warning(s)/error(s){}",
        warnings.len(),
        warnings.iter().map(|w| format!("\n    {w}")).collect::<String>()
    );

    let reports = streams.stop();
    let (rounds, bytes) = assert_streams_clean(&reports, &|a| identity_of_port(a.port()));
    eprintln!(
        "  streams: {} connections, {rounds} verified rounds, {:.1} MB each way, no errors",
        reports.len(),
        bytes as f64 / 1e6
    );
    let status = s.status();
    assert_clean_counters(&status);
    step(&mut t, "streams closed cleanly");
    s.finish();
    eprintln!("  total: {:.2?}", total.elapsed());
}

/// kill -9, restart, SIGTERM, restart as another binary: the dataplane forwards throughout, each
/// new daemon adopts the pinned state and swaps its own program in, and no stream notices.
#[test]
fn restart_kill9_keeps_flows() {
    let Some(_serial) = begin("restart_kill9_keeps_flows") else { return };
    let total = Instant::now();
    let mut t = Instant::now();
    let mut s = Setup::new(&initial());
    let binary = s.kpf().binary().to_owned();
    step(&mut t, "topology, backends, kpf ready");

    let targets: Vec<SocketAddr> = (0..100).map(|i| s.fe(PORTS[i % 3])).collect();
    let streams = Streams::start(s.client(), &targets, PACE).expect("opening streams");
    streams.wait_all_advance(3, SOON).expect("streams running");
    for (target, local, id) in streams.endpoints() {
        assert_eq!(id, identity_of_port(target.port()), "stream from {local} to {target}");
    }
    // A change made before the crash must survive it.
    s.cli.ok(&["map", "add", "9096", &s.backend(0).to_string()]).expect("kpf map add 9096");
    assert_eq!(s.who(9096).expect("connecting to 9096"), "b1");
    let prog1 = s.xdp_prog_id().expect("kpf attached an XDP program");
    step(&mut t, "streams running, 9096 added");

    // 1. kill -9: nothing runs, the pinned program keeps forwarding.
    let stopped = s.kpf.take().unwrap().kill9();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&stopped.status), Some(libc::SIGKILL), "{stopped:?}");
    assert_eq!(s.xdp_prog_id(), Some(prog1), "the program stays attached after kill -9");
    streams.wait_all_advance(20, SOON).expect("streams keep flowing with no daemon");
    assert_eq!(s.who(9094).expect("a new connection with no daemon running"), "b2");
    assert_eq!(s.who(9096).expect("a new connection to 9096 with no daemon running"), "b1");
    let gone = s.cli.run(&["status"]).unwrap();
    assert_cli_error(&gone, &["kpf is not running"]);
    step(&mut t, "kill -9: streams flow with no daemon");

    // 2. The same binary again: adopts and swaps its program in.
    s.start(&binary);
    wait_for(SOON, "kpf to log that it adopted the pinned state and link", || {
        let log = s.kpf().log();
        (log.contains("adopted pinned state in") && log.contains("adopted the pinned native link on eth0"))
            .then_some(())
    });
    let prog2 = s.xdp_prog_id().expect("XDP attached");
    assert_ne!(prog2, prog1, "the restarted kpf must swap its own program into the link");
    streams.wait_all_advance(5, SOON).expect("streams keep flowing after the restart");
    let mut expected: Mapping = initial().into_iter().map(|(p, i)| (p, s.backend(i))).collect();
    expected.insert(9096, s.backend(0));
    assert_eq!(s.map_ls(), expected, "the mapping added before kill -9 survives");
    assert_eq!(s.file_mapping(), expected);
    assert_eq!(s.who(9096).expect("9096 after the restart"), "b1");
    assert_flows_match(&s, &streams, &|port| s.backend(PORTS.iter().position(|&p| p == port).unwrap()));
    step(&mut t, "restart 1 (same binary) adopted");

    // A second `kpf run` on the same config while one runs refuses before touching anything.
    let second = Kpf::launch(&s.topo.gateway, Launch::new(&binary, &s.config_path, &s.socket));
    let err = second.err().expect("a second kpf on the same socket must refuse to start").to_string();
    assert!(err.contains("another kpf is already running"), "{err}");
    assert_eq!(s.xdp_prog_id(), Some(prog2), "the refused kpf must not swap its program in");
    assert_eq!(s.map_ls(), expected, "the running daemon still answers on its socket");
    streams.wait_all_advance(3, SOON).expect("streams unaffected by the refused start");

    // 3. SIGTERM (kpf exits and leaves the dataplane), then an "upgrade": another binary file.
    let stopped = s.kpf.take().unwrap().terminate();
    assert!(stopped.status.success() && !stopped.killed, "kpf did not exit cleanly on SIGTERM: {stopped:?}");
    assert!(stopped.log.contains("stays attached and forwarding"), "{}", stopped.log);
    assert_eq!(s.xdp_prog_id(), Some(prog2), "the program stays attached after SIGTERM");
    streams.wait_all_advance(20, SOON).expect("streams keep flowing after SIGTERM");
    let upgraded = s.dir.0.join("kpf-upgraded");
    std::fs::copy(&binary, &upgraded).expect("copying the kpf binary");
    std::fs::set_permissions(&upgraded, std::fs::Permissions::from_mode(0o755)).unwrap();
    s.start(&upgraded);
    assert_eq!(s.kpf().binary(), upgraded.as_path());
    wait_for(SOON, "the upgraded kpf to log that it adopted", || {
        let log = s.kpf().log();
        (log.contains("adopted pinned state in") && log.contains("adopted the pinned native link on eth0"))
            .then_some(())
    });
    let prog3 = s.xdp_prog_id().expect("XDP attached");
    assert!(
        prog3 != prog2 && prog3 != prog1,
        "the upgraded kpf must swap its own program in ({prog1} -> {prog2} -> {prog3})"
    );
    streams.wait_all_advance(5, SOON).expect("streams keep flowing after the upgrade");
    step(&mut t, "restart 2 (SIGTERM, other binary) adopted");

    // New connections work on every port, and the control plane answers with its state.
    for (&p, id) in PORTS.iter().zip(BACKEND_NAMES) {
        assert_eq!(s.who(p).expect("a new connection after the upgrade"), id, "port {p}");
    }
    assert_eq!(s.who(9096).unwrap(), "b1");
    assert_eq!(s.map_ls(), expected);
    let status = s.status();
    assert_eq!(status["pid"].as_u64(), s.kpf().pid().map(u64::from), "status comes from the new daemon");
    assert_clean_counters(&status);
    assert_flows_match(&s, &streams, &|port| s.backend(PORTS.iter().position(|&p| p == port).unwrap()));

    let reports = streams.stop();
    let (rounds, bytes) = assert_streams_clean(&reports, &|a| identity_of_port(a.port()));
    eprintln!(
        "  streams: {} connections, {rounds} verified rounds, {:.1} MB each way; XDP prog ids {prog1} -> {prog2} -> {prog3}",
        reports.len(),
        bytes as f64 / 1e6
    );
    assert_clean_counters(&s.status());
    step(&mut t, "checked");

    // A crash and then `kpf down --config` with no daemon running: it detaches and unpins.
    let stopped = s.kpf.take().unwrap().kill9();
    assert!(!stopped.status.success());
    assert_eq!(s.xdp_prog_id(), Some(prog3));
    let down =
        s.cli.ok(&["down", "--config", s.config_path.to_str().unwrap()]).expect("kpf down --config with no daemon");
    assert!(down.contains("no daemon running; removed"), "{down}");
    assert_eq!(s.xdp_prog_id(), None, "kpf down detaches the pinned program");
    assert_eq!(s.pins.list().unwrap(), Vec::<String>::new(), "kpf down unpins everything");
    let fe = s.fe(9093);
    let err =
        s.client().enter(|| Session::connect(fe).map(drop)).unwrap().expect_err("nothing forwards after kpf down");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    step(&mut t, "kill -9, then kpf down --config");
    s.finish();
    eprintln!("  total: {:.2?}", total.elapsed());
}

/// tc mode restarts the same way: the tcx link is pinned, streams flow with no daemon, and a new
/// daemon swaps its program into the link without a gap; switching between tc and XDP keeps every
/// connection too.
#[test]
fn restart_tc_keeps_flows() {
    let Some(_serial) = begin("restart_tc_keeps_flows") else { return };
    let mut t = Instant::now();
    let mut s = Setup::in_mode(&initial(), "tc");
    let binary = s.kpf().binary().to_owned();
    let prog1 = tc_prog_id(&s.topo.gateway, "eth0").expect("kpf attached a tc program");
    assert_eq!(s.xdp_prog_id(), None, "tc mode attaches no XDP program");
    step(&mut t, "topology, backends, kpf ready (tc)");

    let targets: Vec<SocketAddr> = (0..30).map(|i| s.fe(PORTS[i % 3])).collect();
    let streams = Streams::start(s.client(), &targets, PACE).expect("opening streams");
    streams.wait_all_advance(3, SOON).expect("streams running");

    let stopped = s.kpf.take().unwrap().kill9();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&stopped.status), Some(libc::SIGKILL), "{stopped:?}");
    assert_eq!(tc_prog_id(&s.topo.gateway, "eth0"), Some(prog1), "the program stays attached after kill -9");
    streams.wait_all_advance(20, SOON).expect("streams keep flowing with no daemon");
    assert_eq!(s.who(9094).expect("a new connection with no daemon running"), "b2");
    step(&mut t, "kill -9: streams flow with no daemon");

    s.start(&binary);
    wait_for(SOON, "kpf to log that it adopted the pinned tc link", || {
        let log = s.kpf().log();
        (log.contains("adopted pinned state in") && log.contains("adopted the pinned tc link on eth0")).then_some(())
    });
    let prog2 = tc_prog_id(&s.topo.gateway, "eth0").expect("tc attached");
    assert_ne!(prog2, prog1, "the restarted kpf must swap its own program into the link");
    streams.wait_all_advance(5, SOON).expect("streams keep flowing after the restart");
    for (&p, id) in PORTS.iter().zip(BACKEND_NAMES) {
        assert_eq!(s.who(p).expect("a new connection after the restart"), id, "port {p}");
    }
    assert_flows_match(&s, &streams, &|port| s.backend(PORTS.iter().position(|&p| p == port).unwrap()));
    step(&mut t, "restart adopted the tcx link");

    // Switching between tc and XDP is a restart with another mode: the new link is attached
    // before the old one goes, so no packet reaches the gateway's own stack (which would reset
    // the streams).
    // From generic XDP, `auto` (native here) goes through tc: native and generic XDP cannot be
    // attached at once, tc can beside either.
    for (from, to, described) in [
        ("tc", "native", "from tc ingress to native XDP"),
        ("native", "tc", "from native XDP to tc ingress"),
        ("tc", "generic", "from tc ingress to generic XDP"),
        ("generic", "auto", "from generic XDP to native XDP without a gap (through tc ingress)"),
        ("auto", "tc", "from native XDP to tc ingress"),
    ] {
        let stopped = s.kpf.take().unwrap().terminate();
        assert!(stopped.status.success(), "{stopped:?}");
        let text = std::fs::read_to_string(&s.config_path).expect("reading the config");
        let switched = text.replace(&format!("mode = \"{from}\""), &format!("mode = \"{to}\""));
        assert_ne!(text, switched, "the config names mode {from}");
        std::fs::write(&s.config_path, switched).expect("writing the config");
        s.start(&binary);
        let described = if described.ends_with(')') { described.to_owned() } else { format!("{described} without a gap") };
        wait_for(SOON, "kpf to log the switch", || s.kpf().log().contains(&format!("switched {described}")).then_some(()));
        assert!(!s.kpf().log().contains("forwarding stops"), "switching {from} -> {to}:\n{}", s.kpf().log());
        let (xdp, tc) = (s.xdp_prog_id(), tc_prog_id(&s.topo.gateway, "eth0"));
        assert_eq!((xdp.is_some(), tc.is_some()), (to != "tc", to == "tc"), "after switching to {to}: XDP {xdp:?}, tc {tc:?}");
        streams.wait_all_advance(5, SOON).unwrap_or_else(|e| panic!("streams after switching to {to}: {e}"));
        assert_eq!(s.who(9094).expect("a new connection after the switch"), "b2");
        step(&mut t, &format!("switched {from} -> {to}"));
    }

    // `kpf run --mode native` on the file's tc is for that run only: a change written back
    // keeps the file's mode, and the file still describes the live config.
    let stopped = s.kpf.take().unwrap().terminate();
    assert!(stopped.status.success(), "{stopped:?}");
    s.start_in(&binary, Some(Mode::Native));
    wait_for(SOON, "kpf --mode native to switch", || {
        s.kpf().log().contains("switched from tc ingress to native XDP without a gap").then_some(())
    });
    s.cli.ok(&["map", "add", "9096", &s.backend(0).to_string()]).expect("kpf map add 9096");
    let text = std::fs::read_to_string(&s.config_path).expect("reading the config");
    assert!(text.contains("mode = \"tc\""), "the written-back config lost the file's mode:\n{text}");
    let dry = s.cli.ok(&["apply", "-f", s.config_path.to_str().unwrap(), "--dry-run"]).expect("apply --dry-run");
    assert_eq!(dry.lines().map(str::trim).collect::<Vec<_>>(), ["plan (not applied):", "no changes"], "the file differs from the live config");
    s.cli.ok(&["map", "rm", "9096"]).expect("kpf map rm 9096");
    streams.wait_all_advance(5, SOON).expect("streams after the run with --mode native");
    step(&mut t, "--mode native for one run; the file keeps mode tc");

    let reports = streams.stop();
    let (rounds, _) = assert_streams_clean(&reports, &|a| identity_of_port(a.port()));
    assert_clean_counters(&s.status());
    eprintln!("  streams: {} connections, {rounds} verified rounds; tc prog ids {prog1} -> {prog2}", reports.len());

    let stopped = s.kpf.take().unwrap().kill9();
    assert!(!stopped.status.success());
    let down =
        s.cli.ok(&["down", "--config", s.config_path.to_str().unwrap()]).expect("kpf down --config with no daemon");
    assert!(down.contains("no daemon running; removed"), "{down}");
    assert_eq!(tc_prog_id(&s.topo.gateway, "eth0"), None, "kpf down detaches the pinned tc program");
    assert_eq!(s.pins.list().unwrap(), Vec::<String>::new(), "kpf down unpins everything");
    step(&mut t, "kpf down");
    s.finish();
}

/// A restart that switches between generic and native XDP removes the old link first (one XDP
/// program per interface). When the new mode then fails (here: native XDP on a veth whose peer's
/// MTU is too large for it), the old link is attached and pinned again and kpf runs in the old
/// mode, saying why: forwarding goes on, open connections included, and a supervisor does not
/// restart kpf into the same failed switch (and its gap) again and again.
#[test]
fn failed_xdp_mode_switch_keeps_forwarding() {
    let Some(_serial) = begin("failed_xdp_mode_switch_keeps_forwarding") else { return };
    let mut t = Instant::now();
    let mut s = Setup::in_mode(&initial(), "generic");
    let binary = s.kpf().binary().to_owned();
    s.xdp_prog_id().expect("kpf attached a generic XDP program");
    let mut open = s.echo_loop(9094).unwrap();
    open.round(b"before").expect("a round before the switch");
    let stopped = s.kpf.take().unwrap().terminate();
    assert!(stopped.status.success(), "{stopped:?}");
    step(&mut t, "generic XDP, one connection open, kpf stopped");

    s.topo.switch.ip(&["link", "set", "p-gw", "mtu", "3600"]).expect("raising the gateway peer's MTU");
    s.start_in(&binary, Some(Mode::Native));
    s.topo.switch.ip(&["link", "set", "p-gw", "mtu", "1500"]).expect("restoring the gateway peer's MTU");
    let log = s.kpf().log();
    assert!(log.contains("cannot switch to Native mode") && log.contains("attached in generic mode again"), "{log}");
    // The old link was detached at once, not left to the kernel's deferred release (during which
    // attaching generic XDP again fails with EBUSY).
    assert!(!log.contains("detaching the link pinned at"), "{log}");
    let status = s.status();
    assert_eq!(status["interfaces"][0]["mode"], "generic", "status names the mode kpf runs in: {status:#}");
    s.xdp_prog_id().expect("an XDP program is attached after the failed switch");
    assert_eq!(s.who(9093).expect("a new connection after the failed switch"), "b1");
    open.round(b"after").expect("the open connection survives the failed switch");
    assert_eq!(open.identity(), "b2");
    step(&mut t, "the switch to native failed; kpf runs in generic XDP");

    // The pinned state is whole: a start in the file's mode adopts it.
    let stopped = s.kpf.take().unwrap().terminate();
    assert!(stopped.status.success(), "{stopped:?}");
    s.start(&binary);
    wait_for(SOON, "kpf to adopt the re-pinned generic link", || {
        s.kpf().log().contains("adopted the pinned generic link on eth0").then_some(())
    });
    open.round(b"adopted").expect("the open connection after the restart");
    open.finish().unwrap();
    assert_clean_counters(&s.status());
    s.finish();
}

/// A frontend added after a restart must not share its internal id with connections of a
/// frontend removed before the restart that are still draining: they would be counted as its
/// traffic and ended by its `rm --reset`.
#[test]
fn restart_keeps_draining_connections_apart() {
    let Some(_serial) = begin("restart_keeps_draining_connections_apart") else { return };
    let total = Instant::now();
    let mut s = Setup::new(&initial());
    let binary = s.kpf().binary().to_owned();

    let mut draining = s.echo_loop(9095).expect("connecting to 9095");
    assert_eq!(draining.identity(), "b3");
    s.cli.ok(&["map", "rm", "9095"]).expect("kpf map rm 9095");
    draining.round(b"draining").expect("the removed frontend's connection drains");

    s.kpf.take().unwrap().kill9();
    s.start(&binary);
    s.cli.ok(&["map", "add", "9096", &s.backend(0).to_string()]).expect("kpf map add 9096 after the restart");
    for i in 0..10 {
        draining.round(format!("draining {i}").as_bytes()).expect("the draining connection after the restart");
    }
    let status = s.status();
    let f9096 = status["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["frontend"] == "*:9096")
        .unwrap_or_else(|| panic!("no *:9096 in {status}"))
        .clone();
    let mut wrong = Vec::new();
    if f9096["packets"] != 0 || f9096["live_flows"] != 0 {
        wrong.push(format!(
            "the new frontend *:9096, which no connection used yet, is charged with the draining *:9095 connection's \
             traffic: {f9096}"
        ));
    }
    let mut fresh = s.echo_loop(9096).expect("connecting to 9096");
    assert_eq!(fresh.identity(), "b1");
    fresh.round(b"fresh").unwrap();
    s.cli.ok(&["map", "rm", "9096", "--reset"]).expect("kpf map rm 9096 --reset");
    fresh.set_timeout(Duration::from_secs(5)).unwrap();
    assert!(fresh.round(b"after reset").is_err(), "the reset connection to 9096 must fail");
    expect_backend_reset(&s.backends[0]);
    draining.set_timeout(Duration::from_secs(5)).unwrap();
    if let Err(e) = draining.round(b"after the other frontend's reset") {
        wrong.push(format!(
            "`kpf map rm 9096 --reset` also reset the connection of *:9095, removed (draining) before the restart: {e}"
        ));
    } else {
        draining.finish().expect("the draining connection closes cleanly");
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    s.finish();
    eprintln!("  total: {:.2?}", total.elapsed());
}

/// `--reset` sends an RST toward the backend too: its server sees exactly one connection reset
/// (from the gateway's address), and nothing else goes wrong.
fn expect_backend_reset(b: &Backend) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while b.problems().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let p = b.take_problems();
    assert!(
        p.len() == 1 && p[0].contains("from 10.100.0.1:") && p[0].contains("reset"),
        "{}: expected exactly the one reset connection, got {p:?}",
        b.identity()
    );
}

/// The gateway's neighbour entries on eth0: address -> (managed, protocol number, has a MAC).
fn neighbours(gateway: &Netns) -> BTreeMap<Ipv4Addr, (bool, Option<String>, bool)> {
    let text = gateway.ip(&["-4", "-N", "-j", "neigh", "show", "dev", "eth0"]).expect("ip neigh show");
    let list: Vec<Value> = serde_json::from_str(&text).unwrap_or_else(|e| panic!("ip -j neigh show: {e}: {text}"));
    list.iter()
        .map(|n| {
            let dst = n["dst"].as_str().and_then(|d| d.parse().ok()).unwrap_or_else(|| panic!("no dst in {n}"));
            let proto = n.get("protocol").and_then(Value::as_str).map(str::to_owned);
            (dst, (n.get("managed").is_some(), proto, n.get("lladdr").is_some()))
        })
        .collect()
}

/// kpf's own neighbour entry: managed, tagged with its protocol (107).
fn kept_by_kpf(n: &BTreeMap<Ipv4Addr, (bool, Option<String>, bool)>, addr: Ipv4Addr) -> bool {
    n.get(&addr).is_some_and(|(managed, proto, _)| *managed && proto.as_deref() == Some("107"))
}

/// The kernel keeps probing a managed neighbour entry for as long as it exists: kpf keeps its
/// backends' next hops managed and tags them, hands back the ones no backend uses any more
/// (on a change, at a start after a restart, at `kpf down`), keeping their MAC, and leaves
/// an operator's managed entry alone.
#[test]
fn neighbour_entries_follow_the_backends() {
    let Some(_serial) = begin("neighbour_entries_follow_the_backends") else { return };
    let total = Instant::now();
    let mut s = Setup::new(&initial());
    let binary = s.kpf().binary().to_owned();
    let [b1, b2, b3] = [0, 1, 2].map(|i| *s.backend(i).ip());
    let n = neighbours(&s.topo.gateway);
    for b in [b1, b2, b3] {
        assert!(kept_by_kpf(&n, b), "backend {b}'s next hop is not kept by kpf after the start: {n:?}");
    }

    // An operator's managed entry, and one a kpf before this one left for a broker gone since.
    let (operators, left_over) = (Ipv4Addr::new(10, 100, 0, 30), Ipv4Addr::new(10, 100, 0, 31));
    s.topo.gateway.ip(&["neigh", "replace", &operators.to_string(), "dev", "eth0", "managed"]).unwrap();
    s.cli.ok(&["map", "rm", "9095"]).expect("kpf map rm 9095");
    let n = wait_for(SOON, "b3's next hop to be handed back after its frontend's removal", || {
        let n = neighbours(&s.topo.gateway);
        (!kept_by_kpf(&n, b3)).then_some(n)
    });
    assert!(n.get(&b3).is_some_and(|&(managed, _, mac)| !managed && mac), "b3's entry keeps its MAC, unmanaged: {n:?}");
    assert!(kept_by_kpf(&n, b1) && kept_by_kpf(&n, b2), "b1's and b2's next hops are still kept: {n:?}");
    assert!(n.get(&operators).is_some_and(|e| e.0), "the operator's managed entry is left alone: {n:?}");
    // Added back: kept again before the change is answered, so no SYN waits for the next refresh.
    s.cli.ok(&["map", "add", "9095", &s.backend(2).to_string()]).expect("kpf map add 9095 b3");
    let n = neighbours(&s.topo.gateway);
    assert!(kept_by_kpf(&n, b3), "b3's next hop is not kept again when `kpf map add` returns: {n:?}");

    s.kpf.take().unwrap().terminate();
    s.topo.gateway.ip(&["neigh", "replace", &left_over.to_string(), "dev", "eth0", "managed", "protocol", "107"]).unwrap();
    s.start(&binary);
    // The start hands it back before the daemon answers.
    let n = neighbours(&s.topo.gateway);
    assert!(!kept_by_kpf(&n, left_over), "the earlier kpf's entry for a gone broker is still kept after the start: {n:?}");
    for b in [b1, b2, b3] {
        assert!(kept_by_kpf(&n, b), "backend {b}'s next hop after the restart: {n:?}");
    }
    assert!(n.get(&operators).is_some_and(|e| e.0), "the operator's managed entry after the restart: {n:?}");

    let stopped = s.kpf.take().unwrap().stop();
    assert!(stopped.is_clean(), "kpf did not stop cleanly: {stopped:?}");
    let n = neighbours(&s.topo.gateway);
    for b in [b1, b2, b3] {
        assert!(n.get(&b).is_some_and(|&(managed, _, mac)| !managed && mac), "{b}'s entry after kpf down: {n:?}");
    }
    assert!(n.get(&operators).is_some_and(|e| e.0), "the operator's managed entry after kpf down: {n:?}");
    s.finish();
    eprintln!("  total: {:.2?}", total.elapsed());
}

/// A backend replaced while it drains (`backend drain --timeout`, then `map set` to another
/// backend: the usual broker replacement) still has its remaining connections reset at the
/// deadline, though no frontend names it any more.
#[test]
fn drain_deadline_outlives_the_backends_removal() {
    let Some(_serial) = begin("drain_deadline_outlives_the_backends_removal") else { return };
    let s = Setup::new(&initial());
    let mut open = s.echo_loop(9095).expect("connecting to 9095");
    assert_eq!(open.identity(), "b3");
    let b3 = s.backend(2).to_string();
    let drained_at = Instant::now();
    s.cli.ok(&["backend", "drain", &b3, "--timeout", "2s"]).expect("kpf backend drain");
    s.cli.ok(&["map", "set", "9095", &s.backend(0).to_string()]).expect("kpf map set 9095 b1");
    assert_eq!(s.who(9095).expect("a new connection to 9095"), "b1");
    open.round(b"replaced, still draining").expect("the drained connection before its deadline");
    let line = wait_for(Duration::from_secs(6), "kpf to log the drain's deadline", || {
        s.kpf().log().lines().find(|l| l.contains(&format!("drain of {b3} (no longer configured) timed out"))).map(str::to_owned)
    });
    assert!(drained_at.elapsed() >= Duration::from_secs(2), "reset before the deadline: {line}");
    assert!(line.contains("reset 1 remaining"), "{line}");
    open.set_timeout(Duration::from_secs(3)).unwrap();
    let err = open.round(b"after the deadline").expect_err("the drained connection is reset at its deadline");
    assert!(
        matches!(err.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof),
        "expected a reset, got {err} ({:?})",
        err.kind()
    );
    expect_backend_reset(&s.backends[2]);
    assert_eq!(s.who(9095).expect("9095 after the reset"), "b1");
    s.finish();
}

/// `rm` drains: the existing connection keeps working, new ones are refused. `rm --reset` ends
/// the existing connections at once.
#[test]
fn rm_drains_and_reset_resets() {
    let Some(_serial) = begin("rm_drains_and_reset_resets") else { return };
    let total = Instant::now();
    let s = Setup::new(&initial());

    let mut old = s.echo_loop(9095).expect("connecting to 9095");
    assert_eq!(old.identity(), "b3");
    old.round(b"before rm").expect("echo before rm");
    let out = s.cli.ok(&["map", "rm", "9095"]).expect("kpf map rm 9095");
    assert!(out.contains("- *:9095"), "rm prints what it removed: {out}");
    assert!(!s.map_ls().contains_key(&9095));
    // The existing connection drains: it keeps working, many times over.
    for i in 0..20 {
        old.round(format!("after rm {i}").as_bytes())
            .unwrap_or_else(|e| panic!("existing connection after rm, round {i}: {e}"));
    }
    // A new connection is refused: the SYN goes to the gateway's kernel, which has no listener.
    let fe = s.fe(9095);
    let err =
        s.client().enter(|| Session::connect(fe).map(drop)).unwrap().expect_err("a new connection to 9095 after rm");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    old.round(b"still").expect("the old connection still works after the refused one");
    old.finish().expect("the drained connection closes cleanly");
    eprintln!("  rm: existing connection drained, new one refused");

    // Re-add, connect, rm --reset.
    s.cli.ok(&["map", "add", "9095", &s.backend(2).to_string()]).expect("re-adding 9095");
    let mut conn = s.echo_loop(9095).expect("connecting to the re-added 9095");
    assert_eq!(conn.identity(), "b3");
    conn.round(b"before reset").expect("echo before the reset");
    let mine = conn.local_addr().to_string();
    let tracked = |flows: Vec<Value>| flows.iter().any(|f| f["client"].as_str() == Some(mine.as_str()));
    assert!(tracked(s.flows(Some(9095))), "kpf flows lists the connection");
    let said = s.cli.ok(&["map", "rm", "9095", "--reset"]).expect("kpf map rm 9095 --reset");
    assert!(said.contains("9095") && said.contains("(existing connections reset)"), "map rm --reset says: {said}");
    assert!(!tracked(s.flows(Some(9095))), "--reset deletes the connection's conntrack entries");
    conn.set_timeout(Duration::from_secs(5)).unwrap();
    let start = Instant::now();
    let err = conn.round(b"after reset").expect_err("the reset connection must fail");
    let took = start.elapsed();
    assert!(
        matches!(err.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof),
        "expected a reset, got {err} ({:?}) after {took:?}",
        err.kind()
    );
    assert!(took < Duration::from_secs(3), "the reset took {took:?}");
    eprintln!("  rm --reset: next echo failed after {took:.2?} with {:?}", err.kind());
    drop(conn);
    expect_backend_reset(&s.backends[2]);

    // No drops; the packets that reached the gateway's kernel without a connection are the
    // refused SYN and the segment after the reset.
    let c = counters(&s.status());
    let drops: Vec<_> = c.iter().filter(|(k, v)| k.starts_with("drop_") && **v > 0).collect();
    assert!(drops.is_empty(), "{drops:?}");
    s.finish();
    eprintln!("  total: {:.2?}", total.elapsed());
}

/// `set` sends new connections to the new backend; existing ones stay where they are.
#[test]
fn set_moves_only_new_connections() {
    let Some(_serial) = begin("set_moves_only_new_connections") else { return };
    let total = Instant::now();
    let s = Setup::new(&initial());

    let mut a = s.echo_loop(9094).expect("connection A");
    assert_eq!(a.identity(), "b2");
    a.round(b"A before set").unwrap();
    let out = s.cli.ok(&["map", "set", "9094", &s.backend(2).to_string()]).expect("kpf map set 9094 b3");
    assert!(out.contains("~ *:9094"), "set prints the change: {out}");
    assert_eq!(s.map_ls()[&9094], s.backend(2));
    for i in 0..10 {
        a.round(format!("A after set {i}").as_bytes()).unwrap_or_else(|e| panic!("A after set: {e}"));
    }
    assert_eq!(a.identity(), "b2");
    let mut b = s.echo_loop(9094).expect("connection B");
    assert_eq!(b.identity(), "b3", "a new connection to 9094 reaches the new backend");
    b.round(b"B").unwrap();
    a.round(b"A again").unwrap();

    let flows = s.flows(Some(9094));
    assert_eq!(flows.len(), 2, "{flows:#?}");
    let row = |c: &EchoLoop| {
        flows
            .iter()
            .find(|f| f["client"].as_str() == Some(&c.local_addr().to_string()))
            .unwrap_or_else(|| panic!("no flow from {} in {flows:#?}", c.local_addr()))
    };
    assert_eq!(row(&a)["backend"].as_str(), Some(s.backend(1).to_string().as_str()), "A stays on b2");
    assert_eq!(row(&b)["backend"].as_str(), Some(s.backend(2).to_string().as_str()), "B is on b3");
    for c in [&a, &b] {
        assert_eq!(row(c)["frontend"].as_str(), Some(s.fe(9094).to_string().as_str()));
        assert_eq!(row(c)["state"].as_str(), Some("established"));
    }
    // The table view lists the same two connections.
    let table = s.cli.ok(&["flows", "--port", "9094"]).unwrap();
    assert!(table.contains("2 connection(s)"), "{table}");
    a.finish().unwrap();
    b.finish().unwrap();
    assert_clean_counters(&s.status());
    s.finish();
    eprintln!("  total: {:.2?}", total.elapsed());
}

/// Every rejected input: exit code 1, one line `kpf: ...` naming the problem, and nothing
/// changed — the pinned maps (bpftool), the config file, the listing.
#[test]
fn bad_input_changes_nothing() {
    let Some(_serial) = begin("bad_input_changes_nothing") else { return };
    let total = Instant::now();
    // One frontend with an explicit address, to have a backend that "is itself a frontend".
    let s = Setup::new(&initial());
    s.cli
        .ok(&["map", "add", "9097", "--address", "10.100.0.1", &s.backend(0).to_string()])
        .expect("an address-bound frontend");
    let before = s.snapshot();
    let b2 = s.backend(1).to_string();
    let dir = &s.dir.0;

    // Every case runs; what went wrong is collected and reported together at the end.
    let failures = std::cell::RefCell::new(Vec::<String>::new());
    let check = |what: &str, out: CliOutput, wants: &[&str]| {
        let mut p = cli_error_problems(&out, wants);
        let after = s.snapshot();
        if after != before {
            p.push(format!("it changed something: before {before:?}\nafter {after:?}"));
        }
        if p.is_empty() {
            eprintln!("  rejected {what}: {}", out.stderr.trim_end());
        } else {
            eprintln!("  WRONG: {what}: {}", p.join("; "));
            failures.borrow_mut().push(format!("{what}: {}\n{out}", p.join("; ")));
        }
    };
    check("rm of an unknown port", s.cli.run(&["map", "rm", "9999"]).unwrap(), &["no frontend *:9999"]);
    check("set of an unknown port", s.cli.run(&["map", "set", "9999", &b2]).unwrap(), &["no frontend *:9999"]);
    check("duplicate add", s.cli.run(&["map", "add", "9093", &b2]).unwrap(), &["*:9093 already exists"]);
    check("port 0", s.cli.run(&["map", "add", "0", &b2]).unwrap(), &["port 0"]);
    check("port 70000", s.cli.run(&["map", "add", "70000", &b2]).unwrap(), &["70000"]);
    check(
        "a bad backend address",
        s.cli.run(&["map", "add", "9096", "10.100.0.x:39092"]).unwrap(),
        &["\"10.100.0.x:39092\" is not an IPv4 address with a port"],
    );
    check(
        "a backend on the gateway itself",
        s.cli.run(&["map", "add", "9096", "10.100.0.1:9093"]).unwrap(),
        &["10.100.0.1:9093", "address of this gateway"],
    );
    check(
        "a backend that is itself a frontend",
        s.cli.run(&["map", "add", "9096", "10.100.0.1:9097"]).unwrap(),
        &["10.100.0.1:9097", "itself a frontend"],
    );
    check(
        "a port inside snat_ports",
        s.cli.run(&["map", "add", "45000", &b2]).unwrap(),
        &["45000", "inside snat_ports"],
    );
    check("a backend with port 0", s.cli.run(&["map", "add", "9096", "10.100.0.22:0"]).unwrap(), &["port 0"]);

    // apply -f: syntax error, unknown key, partly invalid (rejected whole).
    let current = std::fs::read_to_string(&s.config_path).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let syntax = write("syntax.toml", "interface = \"eth0\"\n[[frontend]\nport = 9096\n");
    check("apply: syntax error", s.cli.run(&["apply", "-f", &syntax]).unwrap(), &[&format!("{syntax}:2:")]);
    let unknown = write("unknown.toml", &format!("{current}\n[[frontend]]\nport = 9096\nbackend = [\"{b2}\"]\n"));
    let line = current.lines().count() + 4;
    check(
        "apply: unknown key",
        s.cli.run(&["apply", "-f", &unknown]).unwrap(),
        &[&format!("{unknown}:{line}:1:"), "unknown field `backend`"],
    );
    let partly = write(
        "partly.toml",
        &format!(
            "{current}\n[[frontend]]\nport = 9096\nbackends = [\"{b2}\"]\n\n[[frontend]]\nport = 9098\nbackends = [\"10.100.0.22:0\"]\n"
        ),
    );
    let line = current.lines().count() + 8;
    check(
        "apply: one good and one bad frontend",
        s.cli.run(&["apply", "-f", &partly]).unwrap(),
        &[&format!("{partly}:{line}:12:"), "port 0"],
    );
    let partly_remote = write(
        "partly-remote.toml",
        &format!(
            "{current}\n[[frontend]]\nport = 9096\nbackends = [\"{b2}\"]\n\n[[frontend]]\nport = 9098\nbackends = [\"10.100.0.1:39092\"]\n"
        ),
    );
    check(
        "apply: one good frontend and one whose backend is the gateway",
        s.cli.run(&["apply", "-f", &partly_remote]).unwrap(),
        &["10.100.0.1:39092", "address of this gateway"],
    );
    check(
        "apply: a file that does not exist",
        s.cli.run(&["apply", "-f", &dir.join("missing.toml").display().to_string()]).unwrap(),
        &["missing.toml"],
    );

    // The config file cannot be written (here: a directory where kpf writes the new file; in
    // practice a full or read-only filesystem): the change is refused before any map changes,
    // so the frontend keeps its id, counters and connections.
    let pid = s.kpf().pid().expect("kpf's pid");
    let blocked = dir.join(format!(".kpf.toml.kpf-{pid}.tmp"));
    std::fs::create_dir(&blocked).unwrap();
    check("rm while the config cannot be written", s.cli.run(&["map", "rm", "9095"]).unwrap(), &["creating", ".tmp"]);
    std::fs::remove_dir(&blocked).unwrap();

    // Nobody listening: a path with no socket, and a stale socket file.
    let nowhere = dir.join("nobody.sock");
    check(
        "no daemon on the socket path",
        s.cli.run(&["map", "ls", "--socket", nowhere.to_str().unwrap()]).unwrap(),
        &["kpf is not running"],
    );
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let stale_env = KpfCli::new(s.cli.binary(), &stale);
    check("a stale socket file", stale_env.run(&["map", "add", "9096", &b2]).unwrap(), &["kpf is not running"]);
    // `kpf down` unpins by itself only when nothing answers: not when it may not reach the
    // daemon (the socket is root-only), nor when a daemon that answers on another socket holds
    // the pin directory.
    check(
        "down by uid 65534 (0600 socket)",
        s.cli.run_as(65534, &["down", "--pin-dir", s.pins.path().to_str().unwrap()]).unwrap(),
        &["the control socket is root-only"],
    );
    check(
        "down on a socket nobody answers, the daemon running on the pin directory",
        s.cli.run(&["down", "--socket", nowhere.to_str().unwrap(), "--pin-dir", s.pins.path().to_str().unwrap()]).unwrap(),
        &["a kpf daemon is running on", &s.pins.path().display().to_string()],
    );
    // Nor does a second daemon start on the pin directory (it would converge the same maps to
    // its own config): refused before it changes anything, and its socket is gone.
    let second = dir.join("second.toml");
    let second_socket = dir.join("second.sock");
    std::fs::write(
        &second,
        std::fs::read_to_string(&s.config_path).unwrap().replace(
            &format!("socket = {:?}", s.socket.display().to_string()),
            &format!("socket = {:?}", second_socket.display().to_string()),
        ),
    )
    .unwrap();
    // Started as every kpf in these tests is: an error if it exits before it is ready (or is
    // not ready in time); Ok if it came up, which here is the failure.
    let launched = Kpf::launch(&s.topo.gateway, Launch::new(s.cli.binary(), &second, &second_socket));
    let err = match &launched {
        Ok(_) => "it started".to_string(),
        Err(e) => e.to_string(),
    };
    drop(launched);
    if !err.contains("a kpf daemon is running on") || second_socket.exists() || s.snapshot() != before {
        failures.borrow_mut().push(format!("a second daemon on the pin directory: {err}"));
    } else {
        eprintln!("  rejected a second daemon on the pin directory: {}", err.trim_end());
    }
    // --socket wins over KPF_SOCKET.
    let listed =
        stale_env.ok(&["map", "ls", "--socket", s.socket.to_str().unwrap()]).expect("--socket overrides KPF_SOCKET");
    assert!(listed.contains("*:9093"), "{listed}");

    // Not root: the 0600 socket keeps uid 65534 out; through a 0666 socket the daemon refuses
    // changes itself but answers read-only requests.
    check(
        "a change by uid 65534 (0600 socket)",
        s.cli.run_as(65534, &["map", "add", "9096", &b2]).unwrap(),
        &["permission denied"],
    );
    let mode = std::fs::metadata(&s.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is root-only");
    std::fs::set_permissions(&s.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    check(
        "a change by uid 65534 (0666 socket)",
        s.cli.run_as(65534, &["map", "add", "9096", &b2]).unwrap(),
        &["changing kpf needs root", "uid 65534"],
    );
    check("apply by uid 65534", s.cli.run_as(65534, &["apply", "-f", &partly]).unwrap(), &["changing kpf needs root"]);
    check("down by uid 65534", s.cli.run_as(65534, &["down"]).unwrap(), &["changing kpf needs root"]);
    let status = s.cli.run_as(65534, &["status", "--json"]).unwrap();
    assert!(status.success(), "read-only status as uid 65534:\n{status}");
    let v: Value = serde_json::from_str(&status.stdout).expect("status JSON");
    assert_eq!(v["frontends"].as_array().map(Vec::len), Some(4), "{v}");
    let ls = s.cli.run_as(65534, &["map", "ls"]).unwrap();
    assert!(ls.success() && ls.stdout.contains("*:9093"), "read-only map ls as uid 65534:\n{ls}");
    assert_eq!(s.snapshot(), before);
    std::fs::set_permissions(&s.socket, std::fs::Permissions::from_mode(0o600)).unwrap();

    let failures = failures.into_inner();
    assert!(
        failures.is_empty(),
        "{} bad input(s) not handled as required:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );

    // After all that, the daemon still takes a good change.
    s.cli.ok(&["map", "add", "9096", &b2]).expect("a good change after the bad ones");
    assert_eq!(s.who(9096).unwrap(), "b2");
    assert_clean_counters(&s.status());
    s.finish();
    eprintln!("  total: {:.2?}", total.elapsed());
}

/// Sends SIGHUP to a starting kpf once its control socket exists (it binds the socket before
/// the slow part of its start).
fn hup_once_bound(pid: u32, launch: &Launch) {
    wait_for(SOON, "kpf to bind its control socket", || launch.socket.exists().then_some(()));
    // SAFETY: a signal to the process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0, "SIGHUP to kpf");
}

/// SIGHUP re-reads the edited file; `kpf apply --dry-run` shows a plan and changes nothing;
/// `kpf apply` converges to the file and writes it back.
#[test]
fn sighup_and_apply() {
    let Some(_serial) = begin("sighup_and_apply") else { return };
    let total = Instant::now();
    let mut s = Setup::new(&initial());
    let pins = s.pins.path().to_owned();

    // The write-back keeps the file's mode.
    std::fs::set_permissions(&s.config_path, std::fs::Permissions::from_mode(0o640)).unwrap();

    // Edit the file: add 9096 -> b1; SIGHUP.
    let mut edited: Mapping = initial().into_iter().map(|(p, i)| (p, s.backend(i))).collect();
    edited.insert(9096, s.backend(0));
    std::fs::write(&s.config_path, config_text(&pins, &s.socket, &edited)).unwrap();
    s.kpf().signal(libc::SIGHUP).unwrap();
    wait_for(SOON, "9096 to appear after SIGHUP", || s.map_ls().contains_key(&9096).then_some(()));
    assert_eq!(s.map_ls(), edited);
    assert_eq!(s.who(9096).expect("connecting to 9096"), "b1");
    assert_eq!(s.file_mapping(), edited);

    // A broken file and SIGHUP: logged, nothing changes.
    let good_file = std::fs::read(&s.config_path).unwrap();
    std::fs::write(&s.config_path, "interface = \"eth0\"\n[[frontend]\n").unwrap();
    let before = bpftool_dump(&pins.join("maps/KPF_FRONTENDS"));
    s.kpf().signal(libc::SIGHUP).unwrap();
    wait_for(SOON, "kpf to log the rejected SIGHUP", || {
        s.kpf().log().contains("SIGHUP: config not applied").then_some(())
    });
    assert_eq!(s.map_ls(), edited);
    assert_eq!(bpftool_dump(&pins.join("maps/KPF_FRONTENDS")), before);
    std::fs::write(&s.config_path, &good_file).unwrap();

    // apply --dry-run: 9094 -> b3, 9095 removed, 9097 -> b2 added, 9093 and 9096 unchanged.
    let mut other = edited.clone();
    other.insert(9094, s.backend(2));
    other.remove(&9095);
    other.insert(9097, s.backend(1));
    let other_path = s.dir.0.join("other.toml");
    std::fs::write(&other_path, config_text(&pins, &s.socket, &other)).unwrap();
    let other_s = other_path.to_str().unwrap();
    let snap = s.snapshot();
    let plan = s.cli.ok(&["apply", "-f", other_s, "--dry-run"]).expect("apply --dry-run");
    eprintln!("  dry run:\n{}", plan.lines().map(|l| format!("    {l}\n")).collect::<String>());
    assert!(plan.starts_with("plan (not applied):"), "{plan}");
    let b = |i: usize| s.backend(i).to_string();
    for want in [
        format!("~ *:9094 -> {} (was {}", b(2), b(1)),
        format!("- *:9095 -> {}", b(2)),
        format!("+ *:9097 -> {}", b(1)),
    ] {
        assert!(plan.contains(&want), "plan lacks {want:?}:\n{plan}");
    }
    assert_eq!(plan.lines().count(), 4, "three changes:\n{plan}");
    let json = s.cli.json(&["apply", "-f", other_s, "--dry-run", "--json"]).expect("apply --dry-run --json");
    assert_eq!(json["changes"].as_array().map(Vec::len), Some(3), "{json}");
    assert_eq!(s.snapshot(), snap, "a dry run changes nothing");

    // apply for real, with a connection open on 9095 (removed: it drains) and on 9094 (moved:
    // it stays on b2).
    let mut on_9095 = s.echo_loop(9095).unwrap();
    let mut on_9094 = s.echo_loop(9094).unwrap();
    let applied = s.cli.ok(&["apply", "-f", other_s]).expect("kpf apply");
    assert_eq!(applied.lines().count(), 3, "{applied}");
    assert_eq!(s.map_ls(), other);
    assert_eq!(s.file_mapping(), other, "the file on disk now matches");
    s.cli.ok(&["check", "--config", s.config_path.to_str().unwrap()]).expect("the written file checks");
    assert_eq!(s.who(9094).unwrap(), "b3");
    assert_eq!(s.who(9097).unwrap(), "b2");
    let fe = s.fe(9095);
    let err = s.client().enter(|| Session::connect(fe).map(drop)).unwrap().expect_err("9095 is gone");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    on_9095.round(b"drains").expect("the connection on the removed 9095 keeps working");
    on_9094.round(b"stays").expect("the connection on 9094 keeps working");
    assert_eq!((on_9095.identity(), on_9094.identity()), ("b3", "b2"));
    on_9095.finish().unwrap();
    on_9094.finish().unwrap();
    let mode = std::fs::metadata(&s.config_path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640, "the config file keeps its mode across write-backs");
    let stray: Vec<_> = std::fs::read_dir(&s.dir.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(stray.is_empty(), "temporary files left next to the config: {stray:?}");
    // Applying the same file again is a no-op.
    let again = s.cli.ok(&["apply", "-f", other_s]).unwrap();
    assert_eq!(again.trim(), "no changes");

    // A SIGHUP while kpf starts (a `systemctl reload` right after a restart) waits for the start
    // rather than ending the process, which SIGHUP's default action would, and which systemd
    // counts as a clean exit and does not restart. This start is slow: a backend whose next hop
    // never resolves keeps it waiting 3 s.
    let stopped = s.kpf.take().unwrap().terminate();
    assert!(stopped.status.success(), "{stopped:?}");
    let mut slow = other.clone();
    slow.insert(9098, SocketAddrV4::new(Ipv4Addr::new(10, 100, 0, 99), BACKEND_PORT));
    std::fs::write(&s.config_path, config_text(&pins, &s.socket, &slow)).unwrap();
    let launch = Launch { on_spawn: Some(hup_once_bound), ..Launch::new(&kpf_binary().unwrap(), &s.config_path, &s.socket) };
    let kpf = Kpf::launch(&s.topo.gateway, launch).expect("kpf survives a SIGHUP while it starts");
    s.pids.extend(kpf.pid());
    s.kpf = Some(kpf);
    wait_for(SOON, "the SIGHUP to be handled", || s.kpf().log().contains("SIGHUP: config re-read").then_some(()));
    assert_eq!(s.map_ls(), slow);
    assert_eq!(s.who(9094).unwrap(), "b3");
    assert_clean_counters(&s.status());
    s.finish();
    eprintln!("  total: {:.2?}", total.elapsed());
}

/// A frontend that goes from several backends to one gives its pool back: with every pool in
/// use, another frontend may then take it.
#[test]
fn a_pool_given_up_can_be_taken() {
    let Some(_serial) = begin("a_pool_given_up_can_be_taken") else { return };
    let s = Setup::new(&initial());
    let pools = 128;
    let pair = format!("\"{}\", \"{}\"", s.backend(0), s.backend(1));
    let with = |frontends: &[(u16, &str)]| {
        let mut t = config_text(s.pins.path(), &s.socket, &BTreeMap::new());
        for (port, backends) in frontends {
            t += &format!("\n[[frontend]]\nport = {port}\nbackends = [{backends}]\n");
        }
        let path = s.dir.0.join("pools.toml");
        std::fs::write(&path, t).unwrap();
        s.cli.run(&["apply", "-f", path.to_str().unwrap()]).unwrap()
    };
    let mut frontends: Vec<(u16, &str)> = (0..pools).map(|i| (10_001 + i, pair.as_str())).collect();
    let out = with(&frontends);
    assert!(out.success(), "every pool in use:\n{out}");
    let single = format!("\"{}\"", s.backend(2));
    frontends[0].1 = &single;
    frontends.push((10_001 + pools, pair.as_str()));
    let out = with(&frontends);
    assert!(out.success(), "10001 down to one backend, 10129 a new pool:\n{out}");
    assert_eq!(s.who(10_001).unwrap(), "b3");
    assert!(["b1", "b2"].contains(&s.who(10_001 + pools).unwrap().as_str()));
    s.finish();
}
