//! A real three-broker Kafka cluster in the backend namespaces, laid out as the seeds lay it out,
//! for the Kafka end-to-end test.
//!
//! Broker `N` (node.id 1..3) runs in the N-th backend namespace (10.100.0.2N on the one-NIC
//! topology) with:
//! - an INTERNAL listener on `10.100.0.2N:19092`, advertised as itself: the inter-broker listener;
//! - an EXTERNAL listener bound on `10.100.0.2N:39092`, advertised as
//!   `bN.kafka.kpf.test:<9092+N>`, i.e. 9093, 9094, 9095: the gateway port that maps back to it;
//! - its KRaft controller on `10.100.0.2N:9093`, voters `1@10.100.0.21:9093,...`.
//!
//! The client namespace resolves `bN.kafka.kpf.test` to the gateway through
//! `/etc/netns/<client ns>/hosts`, which `ip netns exec` bind-mounts over `/etc/hosts`.
//!
//! The broker is crabka 0.3.8 (a Kafka-compatible broker in Rust, built by `cargo xtask setup`
//! into `~/.cache/kpf/crabka/bin`) or, when `KAFKA_HOME` is set, Apache Kafka in KRaft combined
//! mode. [`KafkaCluster`] is a Drop guard: the brokers are SIGKILLed (a clean shutdown waits 20 s
//! for nothing a test needs), their directories and the hosts file are removed, also when a test
//! panics; then it prints the tail of every broker's log.

use std::{
    fmt::Write as _,
    fs::File,
    io::{self, Read},
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use rand::RngCore;

use crate::netns::Netns;

/// The port every broker's EXTERNAL listener binds (the seeds' 39092).
pub const EXTERNAL_PORT: u16 = 39092;
/// The port every broker's INTERNAL (inter-broker) listener binds.
pub const INTERNAL_PORT: u16 = 19092;
/// The KRaft controller port (crabka fixes it at 9093 with `--config-file`).
pub const CONTROLLER_PORT: u16 = 9093;
/// The gateway's bootstrap port.
pub const BOOTSTRAP_PORT: u16 = 9092;
/// The domain of the advertised names: broker N is `bN.kafka.kpf.test`.
pub const DOMAIN: &str = "kafka.kpf.test";
/// The advertised-listener pattern as the cloud console would give it (`kpf kafka plan --pattern`).
pub const PATTERN: &str = "<broker_id>.kafka.kpf.test:<port>";
/// The confluent-kafka the tests and the bench drive: `cargo xtask setup` installs it into
/// [`client_dir`] (`xtask/src/kafka_client.rs` says why this one and not Debian's).
pub const CLIENT_VERSION: &str = "2.16.1";
/// crabka's log filter (`RUST_LOG` for the broker) unless `KPF_CRABKA_LOG` gives one.
const CRABKA_LOG: &str = "info,crabka_broker::network::dispatch=error";
/// `KPF_SKIP_KAFKA=1`: skip the Kafka test (loudly) when no broker is available, instead of failing.
pub const SKIP_ENV: &str = "KPF_SKIP_KAFKA";

/// Broker `id`'s advertised host, `b<id>.kafka.kpf.test`.
pub fn advertised_host(id: u32) -> String {
    format!("b{id}.{DOMAIN}")
}

/// Broker `id`'s advertised port: the gateway port mapped to it, `9092 + id` (9093, 9094, ...).
pub fn advertised_port(id: u32) -> u16 {
    BOOTSTRAP_PORT + id as u16
}

/// `tests/kafka/roundtrip.py`.
pub fn roundtrip_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kafka/roundtrip.py")
}

/// Which broker runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// crabka: `bin` holds `crabka-broker` and `crabka`.
    Crabka { bin: PathBuf },
    /// Apache Kafka at `KAFKA_HOME` (`bin/kafka-storage.sh`, `bin/kafka-server-start.sh`).
    Apache { home: PathBuf },
}

impl Flavor {
    pub fn describe(&self) -> String {
        match self {
            Flavor::Crabka { bin } => format!("crabka ({})", bin.display()),
            Flavor::Apache { home } => format!("Apache Kafka (KAFKA_HOME={})", home.display()),
        }
    }
}

/// What `cargo xtask setup` builds and installs outside the repository: `$KPF_CACHE_DIR`, else
/// `~/.cache/kpf`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("KPF_CACHE_DIR").map(from_repo_root).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
        home.join(".cache/kpf")
    })
}

/// Where `cargo xtask setup` installs crabka: `<cache>/crabka/bin`.
pub fn crabka_cache_bin_dir() -> PathBuf {
    cache_dir().join("crabka/bin")
}

/// Where the tests and the bench look for crabka: `$KPF_CRABKA_BIN`, else [`crabka_cache_bin_dir`].
pub fn crabka_bin_dir() -> PathBuf {
    std::env::var_os("KPF_CRABKA_BIN").map_or_else(crabka_cache_bin_dir, from_repo_root)
}

/// A path from the environment, a relative one taken from the repository root: `cargo xtask` runs
/// in the directory it was called from and `cargo test` in each package's own, and both must
/// find the same cache.
fn from_repo_root(path: std::ffi::OsString) -> PathBuf {
    crate::workspace_root().join(path)
}

/// The virtualenv holding the pinned Kafka client: `<cache>/kafka-client`.
pub fn client_dir() -> PathBuf {
    cache_dir().join("kafka-client")
}

/// The Python that runs the Kafka client scripts (the virtualenv's; the `python3` on PATH may be
/// another one, without the client).
pub fn python() -> PathBuf {
    client_dir().join("bin/python")
}

/// What a Python's confluent-kafka reports of itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientVersion {
    /// The Python package's version, e.g. `2.16.1`.
    pub package: String,
    /// The librdkafka it runs on.
    pub librdkafka: String,
}

/// The confluent-kafka `python` imports, or why it imports none.
pub fn client_version(python: &Path) -> Result<ClientVersion, String> {
    let out = Command::new(python)
        .args(["-c", "import confluent_kafka as k; print(k.__version__, k.libversion()[0])"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} cannot import confluent_kafka ({})",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_whitespace().collect::<Vec<_>>()[..] {
        [package, librdkafka] => Ok(ClientVersion { package: package.to_owned(), librdkafka: librdkafka.to_owned() }),
        _ => Err(format!("{}: unexpected confluent_kafka versions {:?}", python.display(), text.trim())),
    }
}

/// The broker to run: Apache Kafka if `KAFKA_HOME` is set, else crabka from
/// [`crabka_bin_dir`]; and the Python Kafka client. `Ok(None)` when something is missing and
/// `KPF_SKIP_KAFKA=1` (a loud skip message is printed); `Err` with what to do when something is
/// missing otherwise.
pub fn find() -> Result<Option<Flavor>, String> {
    let found = find_broker().and_then(|f| python_client().map(|()| f));
    match found {
        Ok(f) => Ok(Some(f)),
        Err(e) if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") => {
            let bar = "!".repeat(100);
            eprintln!("{bar}\n!!! SKIPPED: the Kafka end-to-end test did not run ({SKIP_ENV}=1): {e}\n{bar}");
            Ok(None)
        }
        Err(e) => Err(format!("{e}\n(set {SKIP_ENV}=1 to skip the Kafka test instead)")),
    }
}

fn find_broker() -> Result<Flavor, String> {
    if let Some(home) = std::env::var_os("KAFKA_HOME") {
        let home = PathBuf::from(home);
        for s in ["kafka-storage.sh", "kafka-server-start.sh"] {
            if !home.join("bin").join(s).is_file() {
                return Err(format!("KAFKA_HOME={} has no bin/{s}", home.display()));
            }
        }
        return Ok(Flavor::Apache { home });
    }
    let bin = crabka_bin_dir();
    let missing: Vec<&str> = ["crabka-broker", "crabka"].into_iter().filter(|b| !bin.join(b).is_file()).collect();
    if !missing.is_empty() {
        return Err(format!(
            "the Kafka test broker is not built: {} missing in {}; run `cargo xtask setup` (it builds crabka \
             once, ~11 minutes), or set KPF_CRABKA_BIN to a directory holding crabka-broker and crabka, or \
             KAFKA_HOME to an Apache Kafka",
            missing.join(" and "),
            bin.display()
        ));
    }
    Ok(Flavor::Crabka { bin })
}

fn python_client() -> Result<(), String> {
    let fix = "run `cargo xtask setup` (it installs the client into a virtualenv)";
    match client_version(&python()) {
        Ok(v) if v.package == CLIENT_VERSION => Ok(()),
        Ok(v) => Err(format!("{} has confluent-kafka {}, not {CLIENT_VERSION}; {fix}", python().display(), v.package)),
        Err(e) => Err(format!("{e}; {fix}")),
    }
}

/// How a command run by [`run_bounded`] ended.
#[derive(Debug)]
pub struct Finished {
    /// `None`: killed at the time limit (or because `abort` said so).
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// Why it was killed early, if `abort` asked.
    pub aborted: Option<String>,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

impl std::fmt::Display for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match (&self.status, &self.aborted) {
            (Some(s), _) => s.to_string(),
            (None, Some(why)) => format!("killed: {why}"),
            (None, None) => "killed at its time limit".into(),
        };
        write!(
            f,
            "{how} after {:.1?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

fn reader(r: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `cmd` (stdin closed, stdout and stderr collected) for at most `limit`, polling `abort`
/// meanwhile: if it returns a reason, or the limit passes, the command's process group is
/// SIGKILLed. Never blocks on a full pipe.
pub fn run_bounded(
    cmd: &mut Command,
    limit: Duration,
    mut abort: impl FnMut() -> Option<String>,
) -> io::Result<Finished> {
    let start = Instant::now();
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let mut child = cmd.spawn()?;
    let (out, err) = (reader(child.stdout.take()), reader(child.stderr.take()));
    let mut aborted = None;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if start.elapsed() >= limit {
            break None;
        }
        if let Some(why) = abort() {
            aborted = Some(why);
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if status.is_none() {
        // SAFETY: the child leads its own process group (process_group(0)) and is not reaped yet.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
    }
    Ok(Finished {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
        aborted,
    })
}

/// Waits for the brokers in a broker namespace: metadata through the INTERNAL listeners must list
/// every broker and a controller, and every EXTERNAL listener must accept connections. Prints
/// `{"brokers": {id: "host:port"}, "controller": id}` and exits 0, or exits 1 at the deadline
/// with the last thing that was missing.
const READY_PY: &str = r#"
import json, socket, sys, time
from confluent_kafka.admin import AdminClient
internal, external, want, deadline = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), time.monotonic() + float(sys.argv[4])
admin = AdminClient({"bootstrap.servers": internal, "socket.timeout.ms": 3000, "reconnect.backoff.max.ms": 500, "log_level": 3})
last = "nothing tried yet"
while time.monotonic() < deadline:
    try:
        md = admin.list_topics(timeout=2)
        brokers = {b.id: "%s:%d" % (b.host, b.port) for b in md.brokers.values()}
        if len(brokers) < want or md.controller_id < 0:
            last = "metadata lists brokers %s, controller %d" % (sorted(brokers), md.controller_id)
        else:
            for hp in external:
                h, p = hp.rsplit(":", 1)
                socket.create_connection((h, int(p)), timeout=2).close()
            print(json.dumps({"brokers": brokers, "controller": md.controller_id}, sort_keys=True))
            sys.exit(0)
    except Exception as e:
        last = "%s: %s" % (type(e).__name__, e)
    time.sleep(0.3)
print("not ready: " + last, file=sys.stderr)
sys.exit(1)
"#;

/// One broker process.
#[derive(Debug)]
struct Broker {
    id: u32,
    addr: Ipv4Addr,
    ns: String,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running cluster; dropping it kills the brokers and removes everything it created.
#[derive(Debug)]
pub struct KafkaCluster {
    flavor: Flavor,
    cluster_id: String,
    dir: PathBuf,
    hosts_dir: Option<PathBuf>,
    /// Whether this cluster created `/etc/netns` itself (then it removes it too, if empty).
    made_netns_etc: bool,
    brokers: Vec<Broker>,
    pids: Vec<u32>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);
const DIR_PREFIX: &str = "kpf-kafka";
const NETNS_ETC: &str = "/etc/netns";

/// 16 random bytes as a UUID (`xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`, what `crabka format`
/// accepts) and as Kafka's base64url without padding (22 characters, what
/// `kafka-storage.sh format -t` takes, as `kafka-storage.sh random-uuid` prints).
fn cluster_id(flavor: &Flavor) -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    match flavor {
        Flavor::Crabka { .. } => {
            let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
        }
        Flavor::Apache { .. } => base64url(&b),
    }
}

fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &c)| n | (u32::from(c) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// `controller.quorum.voters`: `1@10.100.0.21:9093`, ...
fn voters(addrs: &[Ipv4Addr]) -> Vec<String> {
    addrs.iter().enumerate().map(|(i, a)| format!("{}@{a}:{CONTROLLER_PORT}", i + 1)).collect()
}

/// crabka's `broker.toml` for broker `id` at `addr`.
pub fn crabka_config(id: u32, addr: Ipv4Addr, all: &[Ipv4Addr]) -> String {
    let voters: Vec<String> = voters(all).iter().map(|v| format!("{v:?}")).collect();
    format!(
        "inter_broker_listener_name = \"INTERNAL\"\n\
         controller_quorum_voters = [{}]\n\n\
         [[listeners]]\nname = \"INTERNAL\"\nbind_addr = \"{addr}:{INTERNAL_PORT}\"\nadvertised = \"{addr}:{INTERNAL_PORT}\"\nprotocol = \"Plaintext\"\n\n\
         [[listeners]]\nname = \"EXTERNAL\"\nbind_addr = \"{addr}:{EXTERNAL_PORT}\"\nadvertised = \"{}:{}\"\nprotocol = \"Plaintext\"\n",
        voters.join(", "),
        advertised_host(id),
        advertised_port(id),
    )
}

/// Apache Kafka's `server.properties` for broker `id` at `addr`: KRaft combined mode (this node is
/// both broker and controller), static voters, INTERNAL for replication, EXTERNAL for clients.
///
/// NOT RUN on the machines this was written on (Apache Kafka cannot be downloaded there); written
/// to the Kafka 3.x/4.x documentation: the controller listener is not advertised (3.x refuses a
/// controller listener in `advertised.listeners` when the node is also a broker), the internal
/// topics get replication factor 3 like the test topic, and group rebalances start at once.
pub fn apache_config(id: u32, addr: Ipv4Addr, all: &[Ipv4Addr], data_dir: &Path) -> String {
    format!(
        "# kpf-tests: Apache Kafka, KRaft combined mode, broker {id}\n\
         process.roles=broker,controller\n\
         node.id={id}\n\
         controller.quorum.voters={voters}\n\
         listeners=INTERNAL://{addr}:{INTERNAL_PORT},EXTERNAL://{addr}:{EXTERNAL_PORT},CONTROLLER://{addr}:{CONTROLLER_PORT}\n\
         advertised.listeners=INTERNAL://{addr}:{INTERNAL_PORT},EXTERNAL://{host}:{port}\n\
         listener.security.protocol.map=INTERNAL:PLAINTEXT,EXTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
         inter.broker.listener.name=INTERNAL\n\
         controller.listener.names=CONTROLLER\n\
         log.dirs={data}\n\
         num.partitions=1\n\
         auto.create.topics.enable=false\n\
         offsets.topic.replication.factor=3\n\
         offsets.topic.num.partitions=3\n\
         transaction.state.log.replication.factor=3\n\
         transaction.state.log.min.isr=2\n\
         group.initial.rebalance.delay.ms=0\n",
        voters = voters(all).join(","),
        host = advertised_host(id),
        port = advertised_port(id),
        data = data_dir.display(),
    )
}

/// The client namespace's `/etc/hosts`: the advertised names resolve to the gateway.
pub fn hosts_file(gateway: Ipv4Addr, ids: impl IntoIterator<Item = u32>) -> String {
    let names: Vec<String> = ids.into_iter().map(advertised_host).collect();
    format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{gateway}\t{}\n", names.join(" "))
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) }
}

/// Removes what a killed earlier run left: `/etc/netns/kpft-<pid>-...` entries and
/// `<tmp>/kpf-kafka-<pid>-...` directories of processes that no longer exist.
pub fn sweep_stale() -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let dirs = [(PathBuf::from(NETNS_ETC), "kpft-"), (std::env::temp_dir(), "kpf-kafka-")];
    for (parent, prefix) in dirs {
        let Ok(entries) = std::fs::read_dir(&parent) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(prefix).and_then(|r| r.split('-').next()?.parse::<i32>().ok()) else {
                continue;
            };
            if !pid_alive(pid) && std::fs::remove_dir_all(e.path()).is_ok() {
                removed.push(e.path());
            }
        }
    }
    if removed.iter().any(|p| p.starts_with(NETNS_ETC)) {
        // Made by that run if nothing else is in it.
        let _ = std::fs::remove_dir(NETNS_ETC);
    }
    removed
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn check_status(what: &str, out: std::process::Output) -> io::Result<()> {
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )))
}

impl KafkaCluster {
    /// Starts one broker per namespace of `backends` (node ids 1, 2, ... in order, at `addrs`),
    /// writes `client`'s hosts file (advertised names -> `gateway`), and waits until metadata
    /// lists every broker and every EXTERNAL listener accepts connections, for at most
    /// `ready_timeout`, or until `cancelled` says so (asked while waiting). On any failure
    /// everything started so far is removed and the error carries the brokers' logs (unless it
    /// was cancelled).
    pub fn start(
        flavor: &Flavor,
        backends: &[Netns],
        addrs: &[Ipv4Addr],
        gateway: Ipv4Addr,
        client: &Netns,
        ready_timeout: Duration,
        cancelled: impl Fn() -> bool,
    ) -> io::Result<KafkaCluster> {
        assert_eq!(backends.len(), addrs.len(), "one address per backend namespace");
        for p in sweep_stale() {
            eprintln!("removed {} left by a killed run", p.display());
        }
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut cluster = KafkaCluster {
            flavor: flavor.clone(),
            cluster_id: cluster_id(flavor),
            dir,
            hosts_dir: None,
            made_netns_etc: !Path::new(NETNS_ETC).exists(),
            brokers: Vec::new(),
            pids: Vec::new(),
        };

        let hosts_dir = Path::new(NETNS_ETC).join(client.name());
        std::fs::create_dir_all(&hosts_dir)?;
        cluster.hosts_dir = Some(hosts_dir.clone());
        std::fs::write(hosts_dir.join("hosts"), hosts_file(gateway, 1..=backends.len() as u32))?;

        for (i, (ns, addr)) in backends.iter().zip(addrs).enumerate() {
            let id = i as u32 + 1;
            // 39092 is inside Linux's default ephemeral range (32768-60999), and a broker dials
            // its peers' controllers before it binds its listeners: a connection that happened
            // to get local port 39092 made crabka exit with AddrInUse (seen once in 17 starts; Linux
            // hands out connect() ports in steps of 2 from a per-destination offset, and 39092 is
            // even). Reserve the listener ports in the broker's own namespace.
            ns.sysctl("net.ipv4.ip_local_reserved_ports", &format!("{INTERNAL_PORT},{EXTERNAL_PORT}"))?;
            let bdir = cluster.dir.join(format!("b{id}"));
            std::fs::create_dir_all(&bdir)?;
            cluster.brokers.push(Broker {
                id,
                addr: *addr,
                ns: ns.name().to_owned(),
                log: bdir.join("broker.log"),
                dir: bdir,
                child: None,
            });
        }
        for i in 0..cluster.brokers.len() {
            cluster.format(i, addrs)?;
        }
        for i in 0..cluster.brokers.len() {
            cluster.spawn(i)?;
        }
        cluster.wait_ready(ready_timeout, cancelled)?;
        Ok(cluster)
    }

    /// Formats broker `i`'s storage and writes its config.
    fn format(&mut self, i: usize, all: &[Ipv4Addr]) -> io::Result<()> {
        let b = &self.brokers[i];
        let data = b.dir.join("data");
        match &self.flavor {
            Flavor::Crabka { bin } => {
                std::fs::write(b.dir.join("broker.toml"), crabka_config(b.id, b.addr, all))?;
                let out = Command::new(bin.join("crabka"))
                    .args(["format", "--log-dir"])
                    .arg(&data)
                    .args(["--cluster-id", &self.cluster_id])
                    .stdin(Stdio::null())
                    .output()?;
                check_status(&format!("crabka format for broker {}", b.id), out)
            }
            Flavor::Apache { home } => {
                // Not run here (no Apache Kafka on these machines): see apache_config.
                let props = b.dir.join("server.properties");
                std::fs::write(&props, apache_config(b.id, b.addr, all, &data))?;
                let out = Command::new(home.join("bin/kafka-storage.sh"))
                    .args(["format", "-t", &self.cluster_id, "-c"])
                    .arg(&props)
                    .env("LOG_DIR", b.dir.join("logs"))
                    .stdin(Stdio::null())
                    .output()?;
                check_status(&format!("kafka-storage.sh format for broker {}", b.id), out)
            }
        }
    }

    /// Starts broker `i` in its namespace, stdout and stderr to its log file, in a process group
    /// of its own (SIGKILLed whole on drop) and SIGKILLed by the kernel if this thread goes away.
    fn spawn(&mut self, i: usize) -> io::Result<()> {
        let b = &self.brokers[i];
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &b.ns]);
        match &self.flavor {
            Flavor::Crabka { bin } => {
                cmd.arg(bin.join("crabka-broker"))
                    .arg("--config-file")
                    .arg(b.dir.join("broker.toml"))
                    .args(["--broker-id", &b.id.to_string(), "--log-dir"])
                    .arg(b.dir.join("data"))
                    .args(["--cluster-id", &self.cluster_id, "--metrics-listen-addr", "none"]);
                // Its INFO level logs every request and connection; keep the rest.
                let filter = std::env::var("KPF_CRABKA_LOG").unwrap_or_else(|_| CRABKA_LOG.to_owned());
                cmd.env("RUST_LOG", filter);
            }
            Flavor::Apache { home } => {
                // Not run here (no Apache Kafka on these machines). kafka-server-start.sh execs
                // kafka-run-class.sh, which execs java: the child is the JVM. Three JVMs on a small
                // machine: a small heap unless the caller chose one.
                cmd.arg(home.join("bin/kafka-server-start.sh")).arg(b.dir.join("server.properties"));
                cmd.env("LOG_DIR", b.dir.join("logs"));
                if std::env::var_os("KAFKA_HEAP_OPTS").is_none() {
                    cmd.env("KAFKA_HEAP_OPTS", "-Xms128m -Xmx384m");
                }
            }
        }
        let log = File::create(&b.log)?;
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| io::Error::new(e.kind(), format!("starting broker {}: {e}", b.id)))?;
        self.pids.push(child.id());
        self.brokers[i].child = Some(child);
        Ok(())
    }

    /// A broker that has exited, as an error naming it.
    pub fn check_running(&mut self) -> io::Result<()> {
        for b in &mut self.brokers {
            if let Some(c) = &mut b.child
                && let Some(s) = c.try_wait()?
            {
                return Err(io::Error::other(format!("broker {} exited ({s})", b.id)));
            }
        }
        Ok(())
    }

    fn wait_ready(&mut self, limit: Duration, cancelled: impl Fn() -> bool) -> io::Result<()> {
        let t0 = Instant::now();
        let internal: Vec<String> = self.brokers.iter().map(|b| format!("{}:{INTERNAL_PORT}", b.addr)).collect();
        let external: Vec<String> = self.brokers.iter().map(|b| format!("{}:{EXTERNAL_PORT}", b.addr)).collect();
        let first = self.brokers.first().ok_or_else(|| io::Error::other("no brokers"))?.ns.clone();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &first]).arg(python()).args(["-c", READY_PY])
            .arg(internal.join(","))
            .arg(external.join(","))
            .arg(self.brokers.len().to_string())
            .arg(limit.as_secs_f64().to_string());
        let done = run_bounded(&mut cmd, limit + Duration::from_secs(10), || {
            if cancelled() {
                return Some("cancelled".to_owned());
            }
            self.check_running().err().map(|e| e.to_string())
        })?;
        // Cancelling is final (an interrupt flag stays set): asked again, it says whether it was this.
        if cancelled() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled while the Kafka cluster started"));
        }
        if !done.success() {
            return Err(io::Error::other(format!(
                "the Kafka cluster ({}) was not ready within {limit:?}: {}\n{}",
                self.flavor.describe(),
                done,
                self.logs(40)
            )));
        }
        let want: Vec<(String, String)> =
            self.brokers.iter().map(|b| (b.id.to_string(), format!("{}:{INTERNAL_PORT}", b.addr))).collect();
        let got: serde_json::Value = serde_json::from_str(done.stdout.trim())
            .map_err(|e| io::Error::other(format!("readiness answer is not JSON ({e}): {done}")))?;
        for (id, addr) in &want {
            if got["brokers"][id] != addr.as_str() {
                return Err(io::Error::other(format!(
                    "metadata through INTERNAL does not list broker {id} at {addr}: {got}\n{}",
                    self.logs(40)
                )));
            }
        }
        eprintln!(
            "  kafka: {} brokers ({}) ready in {:.1?}: {}",
            self.brokers.len(),
            self.flavor.describe(),
            t0.elapsed(),
            done.stdout.trim()
        );
        Ok(())
    }

    /// The directory holding every broker's config, data and log (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `/etc/netns/<client ns>` (removed on drop).
    pub fn hosts_dir(&self) -> Option<&Path> {
        self.hosts_dir.as_deref()
    }

    /// The brokers' process ids (the processes `ip netns exec` became).
    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// The last `lines` lines of every broker's log.
    pub fn logs(&self, lines: usize) -> String {
        let mut s = String::new();
        for b in &self.brokers {
            let _ = writeln!(
                s,
                "--- broker {} ({}) log, last {lines} lines: {} ---\n{}",
                b.id,
                b.addr,
                b.log.display(),
                tail(&b.log, lines)
            );
        }
        s
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        for b in &mut self.brokers {
            if let Some(mut c) = b.child.take() {
                if matches!(c.try_wait(), Ok(None)) {
                    // SAFETY: the child leads its own process group and has not been reaped.
                    unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
                }
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs(60));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(h) = self.hosts_dir.take() {
            if let Err(e) = std::fs::remove_dir_all(&h) {
                eprintln!("warning: could not remove {}: {e}", h.display());
            }
            if self.made_netns_etc {
                // Only if empty: another namespace may have got an entry meanwhile.
                let _ = std::fs::remove_dir(NETNS_ETC);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_configs() {
        assert_eq!(base64url(&[0xfb, 0xff, 0xbf]), "-_-_");
        assert_eq!(base64url(b"Ma"), "TWE");
        let k = cluster_id(&Flavor::Apache { home: PathBuf::new() });
        assert_eq!(k.len(), 22, "{k}");
        let c = cluster_id(&Flavor::Crabka { bin: PathBuf::new() });
        assert_eq!(c.len(), 36);
        assert_eq!(&c[14..15], "4");

        let all: Vec<Ipv4Addr> = (21..=23).map(|i| Ipv4Addr::new(10, 100, 0, i)).collect();
        let t = crabka_config(2, all[1], &all);
        assert!(
            t.contains(
                "controller_quorum_voters = [\"1@10.100.0.21:9093\", \"2@10.100.0.22:9093\", \"3@10.100.0.23:9093\"]"
            ),
            "{t}"
        );
        assert!(t.contains("bind_addr = \"10.100.0.22:39092\"\nadvertised = \"b2.kafka.kpf.test:9094\""), "{t}");
        let p = apache_config(3, all[2], &all, Path::new("/d"));
        assert!(
            p.contains("advertised.listeners=INTERNAL://10.100.0.23:19092,EXTERNAL://b3.kafka.kpf.test:9095\n"),
            "{p}"
        );
        assert!(
            p.contains("controller.quorum.voters=1@10.100.0.21:9093,2@10.100.0.22:9093,3@10.100.0.23:9093\n"),
            "{p}"
        );
        assert!(p.contains("node.id=3\n") && p.contains("log.dirs=/d\n"));
        let h = hosts_file(Ipv4Addr::new(10, 100, 0, 1), 1..=3);
        assert!(h.ends_with("10.100.0.1\tb1.kafka.kpf.test b2.kafka.kpf.test b3.kafka.kpf.test\n"), "{h}");
    }

    #[test]
    fn cache_paths_from_the_environment() {
        assert_eq!(from_repo_root("/var/cache/kpf".into()), Path::new("/var/cache/kpf"));
        let rel = from_repo_root("cache".into());
        // The same directory whichever package's tests or binary asks.
        assert!(rel.is_absolute() && rel.ends_with("cache"), "{}", rel.display());
        assert!(rel.parent().unwrap().join("Cargo.toml").is_file(), "{} is not in the repository root", rel.display());
        assert!(rel.parent().unwrap().join("xtask").is_dir());
    }
}
