//! End-to-end with a real Kafka cluster behind kpf, laid out as the seeds lay it out: three
//! brokers (node ids 1..3) in the one-NIC topology's backend namespaces, each with an EXTERNAL
//! listener on :39092 advertised as `b<id>.kafka.kpf.test:<9092+id>`; kpf on the gateway
//! forwarding the bootstrap port 9092 to every broker and 9093/9094/9095 to broker 1/2/3 (the
//! config written by `kpf kafka plan`), with Kafka (ApiVersions) health checks. The client
//! namespace resolves the advertised names to the gateway.
//!
//! Checked: kpf's Kafka health check marks the brokers unhealthy while none runs and healthy once
//! they answer; a produce/consume round trip bootstrapped only through the gateway
//! (`tests/kafka/roundtrip.py`, the seeds' produce.sh + consume.sh); `kpf kafka verify`, run back
//! to back several times as an operator would (every run must pass); and that both catch two
//! swapped mappings, naming the wrong ports, and pass again once they are swapped back.
//!
//! Run as root, after `cargo build --release -p kpf` and `cargo xtask setup` (which builds the
//! test broker, crabka, and installs the Python client, confluent-kafka):
//! `cargo test --release -p kpf-tests --test kafka -- --nocapture --test-threads=1`
//! Without the broker the test fails saying so, unless `KPF_SKIP_KAFKA=1`. With `KAFKA_HOME` set
//! it runs Apache Kafka instead (KRaft combined mode).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use kpf_tests::{
    kafka::{self, Finished, Flavor, KafkaCluster},
    kpf_proc::{self, Kpf, Mode},
    netns,
    topology::OneNic,
};
use serde_json::Value;

/// How long `kpf run` may take to be ready on a loaded machine.
const KPF_READY: Duration = Duration::from_secs(45);
/// How long the brokers may take until metadata lists all three.
const CRABKA_READY: Duration = Duration::from_secs(90);
const APACHE_READY: Duration = Duration::from_secs(240);
/// The health check: every second, two results in a row flip a backend.
const HEALTH: &str = "[health]\ncheck = \"kafka\"\ninterval = \"1s\"\ntimeout = \"800ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2\n";
/// A round trip that cannot complete must end (non-zero) within this; roundtrip.py's own
/// watchdog is 45 s, and its step timeouts are shorter.
const ROUNDTRIP_LIMIT: Duration = Duration::from_secs(60);
/// `kpf kafka verify` (5 s per request by default).
const VERIFY_LIMIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);

fn poll<T>(limit: Duration, what: &str, f: impl FnMut() -> Option<T>) -> (T, Duration) {
    kpf_tests::wait::poll(limit, POLL, what, f)
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("kpf-kafka-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn backend(addr: Ipv4Addr) -> String {
    format!("{addr}:{}", kafka::EXTERNAL_PORT)
}

/// The kpf config from `kpf kafka plan --write-config`, merged into a base with the Kafka health
/// check; also returns what plan printed. `pin_dir` and `socket` are left to [`Kpf::start`].
fn planned_config(kpf_bin: &Path, topo: &OneNic, tmp: &Path) -> (String, String) {
    let file = tmp.join("kpf.toml");
    std::fs::write(&file, format!("interface = \"eth0\"\nmanage_sysctls = true\n\n{HEALTH}")).unwrap();
    let mut cmd = std::process::Command::new(kpf_bin);
    cmd.args(["kafka", "plan", "--pattern", kafka::PATTERN]);
    for (i, a) in topo.backend_addrs.iter().enumerate() {
        cmd.args(["--broker", &format!("{}={a}", i + 1)]);
    }
    cmd.args(["--interface", "eth0", "--write-config"]).arg(&file);
    let out = cmd.output().expect("running kpf kafka plan");
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "kpf kafka plan failed: {out:?}");
    let written = std::fs::read_to_string(&file).unwrap();
    // The file is a complete config, defaults written out, including the default pin_dir
    // (/sys/fs/bpf/kpf) and socket (/run/kpf/kpf.sock): drop those two so this instance gets
    // its own (Kpf::start prepends them when the text does not set them).
    let text: String = written
        .lines()
        .filter(|l| !l.starts_with("pin_dir =") && !l.starts_with("socket ="))
        .map(|l| format!("{l}\n"))
        .collect();
    (text, printed)
}

/// What the harness configured on the brokers is what `kpf kafka plan` tells an operator to
/// configure, and its frontends are the seeds' layout.
fn check_plan(config: &str, printed: &str, topo: &OneNic) {
    for id in 1..=3u32 {
        let want = format!(
            "advertised.listeners=...,EXTERNAL://{}:{}\n",
            kafka::advertised_host(id),
            kafka::advertised_port(id)
        );
        assert!(
            printed.contains(&want),
            "plan tells broker {id} to advertise something else than the harness does ({want}):\n{printed}"
        );
    }
    assert!(printed.contains(&format!("listeners=...,EXTERNAL://0.0.0.0:{}\n", kafka::EXTERNAL_PORT)), "{printed}");
    let v: toml::Value = toml::from_str(config).unwrap_or_else(|e| panic!("planned config: {e}\n{config}"));
    let fes: BTreeMap<i64, Vec<String>> = v["frontend"]
        .as_array()
        .expect("frontends")
        .iter()
        .map(|f| {
            let bs = f["backends"].as_array().unwrap().iter().map(|b| b.as_str().unwrap().to_owned()).collect();
            (f["port"].as_integer().unwrap(), bs)
        })
        .collect();
    let all: Vec<String> = topo.backend_addrs.iter().map(|a| backend(*a)).collect();
    let want: BTreeMap<i64, Vec<String>> =
        [(9092, all.clone()), (9093, vec![all[0].clone()]), (9094, vec![all[1].clone()]), (9095, vec![all[2].clone()])]
            .into();
    assert_eq!(fes, want, "planned frontends:\n{config}");
    assert_eq!(v["health"]["check"].as_str(), Some("kafka"), "the base's health check survives the merge:\n{config}");
}

fn status(kpf: &Kpf) -> Value {
    let text = kpf.cli(&["status", "--json"]).expect("kpf status --json");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("kpf status --json is not JSON ({e}):\n{text}"))
}

/// `(healthy, last_error)` of every backend, by address.
fn health(s: &Value) -> BTreeMap<String, (bool, Option<String>)> {
    s["backends"]
        .as_array()
        .expect("backends in status")
        .iter()
        .map(|b| {
            (
                b["backend"].as_str().unwrap().to_owned(),
                (b["healthy"].as_bool().unwrap(), b["last_error"].as_str().map(str::to_owned)),
            )
        })
        .collect()
}

fn frontend_new_flows(s: &Value, port: u16) -> u64 {
    let label = format!("*:{port}");
    s["frontends"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["frontend"] == label.as_str()))
        .and_then(|f| f["new_flows"].as_u64())
        .unwrap_or_else(|| panic!("no frontend {label} in status: {s:#}"))
}

/// Everything one run needs to reach the client side.
struct Env<'a> {
    topo: &'a OneNic,
    kpf_bin: &'a Path,
}

/// roundtrip.py from the client namespace, bootstrapping through the gateway's 9092 only.
fn roundtrip(env: &Env, cluster: &mut KafkaCluster, topic: &str) -> (Finished, Value) {
    let script = kafka::roundtrip_script();
    let mut cmd = env.topo.client.command(kafka::python());
    cmd.arg(&script)
        .args(["--bootstrap", &format!("{}:{}", env.topo.gateway_addr, kafka::BOOTSTRAP_PORT)])
        .args(["--topic", topic]);
    let done = kafka::run_bounded(&mut cmd, ROUNDTRIP_LIMIT, || cluster.check_running().err().map(|e| e.to_string()))
        .expect("running roundtrip.py");
    let summary = done.stdout.lines().rev().find_map(|l| serde_json::from_str::<Value>(l).ok()).unwrap_or(Value::Null);
    (done, summary)
}

/// `kpf kafka verify --connect <gateway> [--json]` from the client namespace.
fn verify(env: &Env, cluster: &mut KafkaCluster, json: bool) -> Finished {
    let mut cmd = env.topo.client.command(env.kpf_bin.to_str().unwrap());
    cmd.args(["kafka", "verify", "--connect", &env.topo.gateway_addr.to_string()]);
    if json {
        cmd.arg("--json");
    }
    cmd.env_remove("RUST_LOG");
    kafka::run_bounded(&mut cmd, VERIFY_LIMIT, || cluster.check_running().err().map(|e| e.to_string()))
        .expect("running kpf kafka verify")
}

/// port -> (ok, reached, advertised) from `kpf kafka verify --json`.
fn verify_rows(done: &Finished) -> BTreeMap<u64, (bool, Option<i64>, String)> {
    let v: Value = serde_json::from_str(&done.stdout)
        .unwrap_or_else(|e| panic!("kpf kafka verify --json printed no JSON ({e}): {done}"));
    v["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("no rows: {v:#}"))
        .iter()
        .map(|r| {
            (
                r["port"].as_u64().unwrap(),
                (r["ok"].as_bool().unwrap(), r["reached"].as_i64(), r["advertised"].as_str().unwrap_or("").to_owned()),
            )
        })
        .collect()
}

/// What to look at when a verify row says no partition answered: a run that finds the
/// verification topic already there (it then takes ~50 ms instead of ~400 ms, as it creates none)
/// right after another run deleted it has used a topic that was still being deleted.
fn verify_hint(done: &Finished) -> &'static str {
    if done.stdout.contains("no partition answered") || done.stderr.contains("no partition answered") {
        "\n(hint: `no partition answered` on a verify run that directly follows another one: the earlier run \
         deleted the verification topic, this one still found it in the metadata and used it while the \
         brokers were dropping its partitions)"
    } else {
        ""
    }
}

/// The round trip and verify both pass, with every port reaching its own broker. Verify runs
/// back to back, as an operator runs it (the table, then `--json`, then `reruns` more times):
/// every run must pass.
fn expect_good(env: &Env, cluster: &mut KafkaCluster, topic: &str, phase: &str, reruns: usize) {
    let (done, summary) = roundtrip(env, cluster, topic);
    eprintln!("  [{phase}] roundtrip {topic}: {:?} in {:.1?}: {summary}", done.status, done.elapsed);
    assert!(done.success() && summary["ok"] == true, "[{phase}] the round trip through the gateway failed: {done}");
    assert_eq!(
        (summary["produced"].as_u64(), summary["consumed"].as_u64()),
        (Some(10), Some(10)),
        "[{phase}] {summary}"
    );

    let table = verify(env, cluster, false);
    eprintln!("  [{phase}] kpf kafka verify ({:.1?}):\n{}", table.elapsed, table.stdout.trim_end());
    assert!(table.success(), "[{phase}] kpf kafka verify failed: {table}{}", verify_hint(&table));
    let want: BTreeMap<u64, (bool, Option<i64>, String)> = (1..=3u32)
        .map(|id| {
            let port = kafka::advertised_port(id);
            (u64::from(port), (true, Some(i64::from(id)), format!("{}:{port}", kafka::advertised_host(id))))
        })
        .collect();
    for run in 0..=reruns {
        let json = verify(env, cluster, true);
        assert!(
            json.success(),
            "[{phase}] kpf kafka verify --json (run {}) failed: {json}{}",
            run + 2,
            verify_hint(&json)
        );
        assert_eq!(
            verify_rows(&json),
            want,
            "[{phase}] verify rows (ok, reached, advertised) by port:\n{}{}",
            json.stdout,
            verify_hint(&json)
        );
    }
    if reruns > 0 {
        eprintln!("  [{phase}] kpf kafka verify passed {} times in a row", reruns + 2);
    }
}

#[test]
fn kafka_through_kpf() {
    let Some(_serial) = kpf_tests::serial::begin("kafka_through_kpf") else { return };
    let flavor = match kafka::find() {
        Ok(Some(f)) => f,
        Ok(None) => return,
        Err(e) => panic!("{e}"),
    };
    let t0 = Instant::now();
    let kpf_bin = kpf_proc::kpf_binary().expect("the kpf binary");
    let topo = OneNic::new().expect("building the topology");
    let tmp = TempDir::new("plan");

    // 1. The config from `kpf kafka plan`, and kpf with Kafka health checks, before any broker runs.
    let (config, printed) = planned_config(&kpf_bin, &topo, &tmp.0);
    check_plan(&config, &printed, &topo);
    let kpf = Kpf::start_with(&kpf_bin, &topo.gateway, &config, Mode::Native, KPF_READY).expect("starting kpf");
    eprintln!("  kpf ready: {:.1?}", t0.elapsed());
    let backends: Vec<String> = topo.backend_addrs.iter().map(|a| backend(*a)).collect();
    let (_, took) = poll(Duration::from_secs(20), "every backend unhealthy while no broker runs", || {
        let h = health(&status(&kpf));
        backends.iter().all(|b| h.get(b).is_some_and(|(ok, err)| !ok && err.is_some())).then_some(())
    });
    let h = health(&status(&kpf));
    eprintln!("  no broker yet: all unhealthy after {took:.1?}: {h:?}");

    // 2. The brokers; kpf's ApiVersions check must see them answer.
    let ready = if matches!(flavor, Flavor::Apache { .. }) { APACHE_READY } else { CRABKA_READY };
    let t = Instant::now();
    let mut cluster =
        KafkaCluster::start(&flavor, &topo.backends, &topo.backend_addrs, topo.gateway_addr, &topo.client, ready, || false)
            .expect("starting the Kafka cluster");
    let hosts = std::fs::read_to_string(cluster.hosts_dir().unwrap().join("hosts")).unwrap();
    assert!(hosts.contains("10.100.0.1\tb1.kafka.kpf.test b2.kafka.kpf.test b3.kafka.kpf.test"), "{hosts}");
    let (_, took) = poll(Duration::from_secs(30), "every backend healthy (Kafka ApiVersions answered)", || {
        let h = health(&status(&kpf));
        backends.iter().all(|b| h.get(b).is_some_and(|(ok, err)| *ok && err.is_none())).then_some(())
    });
    eprintln!("  cluster up in {:.1?}; kpf marked every broker healthy {took:.1?} after that", t.elapsed() - took);
    let s = status(&kpf);
    for b in s["backends"].as_array().unwrap() {
        assert!(
            b["healthy"] == true && b["draining"] == false && b["last_error"].is_null(),
            "backend not healthy: {s:#}"
        );
    }

    let env = Env { topo: &topo, kpf_bin: &kpf_bin };

    // 3, 4. Round trip through the bootstrap port, and verify.
    let t = Instant::now();
    expect_good(&env, &mut cluster, "test-topic", "as planned", 5);
    let s = status(&kpf);
    for port in 9092..=9095 {
        assert!(frontend_new_flows(&s, port) > 0, "no connection went through port {port}: {s:#}");
    }
    eprintln!("  as planned: passed in {:.1?}", t.elapsed());

    // 5. Swap the mappings of brokers 1 and 2.
    kpf.cli(&["map", "set", "9093", &backends[1]]).expect("kpf map set 9093");
    kpf.cli(&["map", "set", "9094", &backends[0]]).expect("kpf map set 9094");
    let t = Instant::now();
    let (done, summary) = roundtrip(&env, &mut cluster, "test-topic-swapped");
    eprintln!("  [swapped] roundtrip: {:?} in {:.1?}: {summary}", done.status, done.elapsed);
    assert!(
        done.status.is_some_and(|s| !s.success()) && summary["ok"] == false,
        "[swapped] the round trip must fail (exit non-zero by itself) when 9093 and 9094 reach the wrong brokers: {done}"
    );
    assert!(done.elapsed < Duration::from_secs(50), "[swapped] the round trip took {:?} to fail", done.elapsed);

    let table = verify(&env, &mut cluster, false);
    eprintln!(
        "  [swapped] kpf kafka verify ({:.1?}, {:?}):\n{}\n{}",
        table.elapsed,
        table.status,
        table.stdout.trim_end(),
        table.stderr.trim_end()
    );
    assert!(table.status.is_some_and(|s| !s.success()), "[swapped] kpf kafka verify must fail: {table}");
    assert!(
        table.stderr.contains("port 9093") && table.stderr.contains("port 9094") && !table.stderr.contains("port 9095"),
        "[swapped] kpf kafka verify names the wrong ports, only them: {table}{}",
        verify_hint(&table)
    );
    let json = verify(&env, &mut cluster, true);
    assert!(json.status.is_some_and(|s| !s.success()), "[swapped] kpf kafka verify --json must fail: {json}");
    let rows = verify_rows(&json);
    let got: BTreeMap<u64, (bool, Option<i64>)> = rows.iter().map(|(p, (ok, r, _))| (*p, (*ok, *r))).collect();
    let want: BTreeMap<u64, (bool, Option<i64>)> =
        [(9093, (false, Some(2))), (9094, (false, Some(1))), (9095, (true, Some(3)))].into();
    assert_eq!(got, want, "[swapped] verify rows (ok, reached) by port:\n{}{}", json.stdout, verify_hint(&json));
    eprintln!("  swapped: caught in {:.1?}", t.elapsed());

    // Swap back: both pass again.
    kpf.cli(&["map", "set", "9093", &backends[0]]).expect("kpf map set 9093 back");
    kpf.cli(&["map", "set", "9094", &backends[1]]).expect("kpf map set 9094 back");
    let t = Instant::now();
    expect_good(&env, &mut cluster, "test-topic-restored", "swapped back", 0);
    eprintln!("  swapped back: passed in {:.1?}", t.elapsed());
    cluster.check_running().expect("every broker still runs");

    // Everything goes away: brokers, their files, the hosts file, kpf, the namespaces.
    let (pids, dir, hosts_dir) =
        (cluster.pids().to_vec(), cluster.dir().to_owned(), cluster.hosts_dir().unwrap().to_owned());
    drop(cluster);
    for pid in pids {
        // Its command line names the cluster's directory (a reused pid would not).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let dir_text = dir.display().to_string();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(&dir_text),
            "broker process {pid} is still there: {}",
            String::from_utf8_lossy(&cmdline)
        );
    }
    assert!(!dir.exists() && !hosts_dir.exists(), "left behind: {} or {}", dir.display(), hosts_dir.display());
    let stopped = kpf.stop();
    assert!(
        stopped.is_clean(),
        "kpf did not stop cleanly: {stopped:?}"
    );
    drop(topo);
    let left = netns::own_namespaces().expect("listing namespaces");
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    eprintln!("  total {:.1?}", t0.elapsed());
}
