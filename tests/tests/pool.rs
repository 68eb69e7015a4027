//! End-to-end: the bootstrap port with several brokers behind it (Maglev selection, the same on
//! two gateways), active health checks, draining, source allowlists, the metrics endpoint, and
//! the config rules for all of that.
//!
//! Run as root, after `cargo build --release -p kpf`:
//! `cargo test --release -p kpf-tests --test pool -- --test-threads=1`
//!
//! Every test but `config_rejections` builds a one-NIC topology (client 10.100.0.10, gateway
//! 10.100.0.1, backends b1..b3 on 10.100.0.21..23:39092) and runs kpf with a bootstrap frontend
//! `*:9092 -> [b1, b2, b3]`. Synchronisation is by polling with deadlines, never by sleeping a
//! fixed time and hoping.

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use kpf_tests::{
    kpf_proc::{self, Kpf, Mode},
    netns::{self, Netns},
    peer::{self, Backend, Session},
    topology::{BACKEND_NAMES, OneNic, Topology},
};
use serde_json::Value;

const BOOTSTRAP: u16 = 9092;
const B1: &str = "10.100.0.21:39092";
const B2: &str = "10.100.0.22:39092";
const B3: &str = "10.100.0.23:39092";
/// How long `kpf run` may take to be ready on a loaded machine.
const READY: Duration = Duration::from_secs(45);
const POLL: Duration = Duration::from_millis(100);

/// A one-NIC topology with b1..b3 serving and kpf running. Fields drop in order: kpf first
/// (`kpf down`), then the servers, then the namespaces.
struct Pool {
    kpf: Kpf,
    /// b1, b2, b3; `None` while stopped.
    servers: Vec<Option<Backend>>,
    topo: OneNic,
}

/// A config with the bootstrap frontend. `top` goes before every table (top-level keys),
/// `health` is a `[health]` table or empty, `extra` more `[[frontend]]` tables.
fn config(top: &str, health: &str, extra: &str) -> String {
    format!(
        "interface = \"eth0\"\nmanage_sysctls = true\n{top}\n{health}\n\
         [[frontend]]\nport = {BOOTSTRAP}\nbackends = [\"{B1}\", \"{B2}\", \"{B3}\"]\n{extra}"
    )
}

fn start_kpf(topo: &OneNic, config: &str) -> Kpf {
    let bin = kpf_proc::kpf_binary().expect("the kpf binary");
    Kpf::start_with(&bin, &topo.gateway, config, Mode::Native, READY).expect("starting kpf")
}

impl Pool {
    fn new(config: &str) -> Pool {
        let topo = OneNic::new().expect("building the topology");
        let servers = topo
            .backends
            .iter()
            .zip(BACKEND_NAMES)
            .map(|(ns, id)| Some(Backend::new(ns, id).expect("starting a backend")))
            .collect();
        let kpf = start_kpf(&topo, config);
        Pool { kpf, servers, topo }
    }

    fn fe(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.topo.gateway_addr, port)
    }

    fn client<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> T {
        in_ns(&self.topo.client, f)
    }

    fn status(&self) -> Value {
        let text = self.kpf.cli(&["status", "--json"]).expect("kpf status --json");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("kpf status --json is not JSON ({e}):\n{text}"))
    }

    /// Problems the servers saw on forwarded connections (see [`forwarded_problems`]).
    fn forwarded_problems(&self) -> Vec<String> {
        self.servers.iter().flatten().flat_map(forwarded_problems).collect()
    }
}

fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> io::Result<T> + Send) -> T {
    match ns.enter(f) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("in {}: {e}", ns.name()),
        Err(e) => panic!("entering {}: {e}", ns.name()),
    }
}

/// A backend's problems, minus those of kpf's health checks: a TCP check connects and closes
/// without sending a request, which the server reports. Those come from the gateway's own
/// address and a port outside `snat_ports` (forwarded connections use one inside).
fn forwarded_problems(b: &Backend) -> Vec<String> {
    b.problems()
        .into_iter()
        .filter(|p| {
            let peer = p.split("connection from ").nth(1).and_then(|r| r.split(": ").next());
            match peer.and_then(|a| a.parse::<SocketAddrV4>().ok()) {
                Some(a) => *a.ip() != Ipv4Addr::new(10, 100, 0, 1) || (40000..=59999).contains(&a.port()),
                None => true,
            }
        })
        .collect()
}

fn backend<'a>(status: &'a Value, addr: &str) -> &'a Value {
    status["backends"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["backend"] == addr))
        .unwrap_or_else(|| panic!("no backend {addr} in status: {status:#}"))
}

fn frontend<'a>(status: &'a Value, label: &str) -> &'a Value {
    status["frontends"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["frontend"] == label))
        .unwrap_or_else(|| panic!("no frontend {label} in status: {status:#}"))
}

fn flag(v: &Value, key: &str) -> bool {
    v[key].as_bool().unwrap_or_else(|| panic!("{key} is not a bool in {v:#}"))
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} is not a number in {v:#}"))
}

fn counter(status: &Value, name: &str) -> u64 {
    num(&status["counters"], name)
}

/// How many of `ids` are each identity.
fn tally(ids: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for id in ids {
        *m.entry(id.clone()).or_default() += 1;
    }
    m
}

/// `n` connections to `fe` (connect, identity, close), in the calling thread's namespace.
fn who_many(fe: SocketAddrV4, n: usize) -> io::Result<Vec<String>> {
    (0..n)
        .map(|i| {
            peer::who(SocketAddr::V4(fe)).map_err(|e| io::Error::new(e.kind(), format!("connection #{}: {e}", i + 1)))
        })
        .collect()
}

/// Polls `f` every [`POLL`] until it gives `Some`, or panics after `limit` with `what`.
fn poll<T>(limit: Duration, what: &str, f: impl FnMut() -> Option<T>) -> (T, Duration) {
    kpf_tests::wait::poll(limit, POLL, what, f)
}


/// Stops kpf cleanly and checks that every namespace of this process is gone afterwards.
fn epilogue(pool: Pool) {
    let Pool { kpf, servers, topo } = pool;
    let stopped = kpf.stop();
    assert!(
        stopped.is_clean(),
        "kpf did not stop cleanly: {stopped:?}"
    );
    drop(servers);
    let names: Vec<String> = topo.namespaces().iter().map(|n| n.name().to_owned()).collect();
    drop(topo);
    let left: Vec<String> =
        netns::own_namespaces().expect("listing namespaces").into_iter().filter(|n| names.contains(n)).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

/// After the last topology of a test is gone: nothing of this process is left.
fn nothing_left() {
    let left = netns::own_namespaces().expect("listing namespaces");
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

// -------------------------------------------------------------------------------------------

#[test]
fn spread_and_same_choice_on_two_gateways() {
    let Some(_serial) = kpf_tests::serial::begin(module_path!()) else { return };
    let t0 = Instant::now();
    let cfg = config("", "", "");
    let a = Pool::new(&cfg);
    eprintln!("  gateway A ready: {:.2?}", t0.elapsed());

    const N: usize = 300;
    let fe = a.fe(BOOTSTRAP);
    let t = Instant::now();
    let ids = a.client(|| who_many(fe, N));
    let spread = tally(&ids);
    eprintln!("  {N} connections in {:.2?}: {spread:?}", t.elapsed());
    assert_eq!(spread.values().sum::<usize>(), N);
    for id in BACKEND_NAMES {
        let n = spread.get(id).copied().unwrap_or(0);
        assert!((75..=125).contains(&n), "{id} got {n} of {N} connections, outside 75..=125: {spread:?}");
    }
    assert_eq!(spread.len(), 3, "only b1..b3 answer: {spread:?}");
    // What kpf counted per backend is what the client saw.
    let s = a.status();
    for (addr, id) in [B1, B2, B3].iter().zip(BACKEND_NAMES) {
        assert_eq!(num(backend(&s, addr), "new_flows"), spread[id] as u64, "kpf's new_flows for {addr} ({id})");
    }

    // A second gateway with the same config, in a topology of its own.
    let t = Instant::now();
    let b = Pool::new(&cfg);
    eprintln!("  gateway B ready: {:.2?}", t.elapsed());
    let ports = 21000u16..21300;
    let from_each = |pool: &Pool| -> Vec<String> {
        let (src, fe) = (pool.topo.client_addr, pool.fe(BOOTSTRAP));
        pool.client(|| {
            ports
                .clone()
                .map(|p| {
                    peer::who_from(SocketAddrV4::new(src, p), fe)
                        .map_err(|e| io::Error::new(e.kind(), format!("from port {p}: {e}")))
                })
                .collect()
        })
    };
    let t = Instant::now();
    let via_a = from_each(&a);
    let via_b = from_each(&b);
    eprintln!("  {} source ports through each gateway: {:.2?}", ports.len(), t.elapsed());
    let differ: Vec<String> = ports
        .clone()
        .zip(via_a.iter().zip(&via_b))
        .filter(|(_, (x, y))| x != y)
        .map(|(p, (x, y))| format!("port {p}: A {x}, B {y}"))
        .collect();
    assert!(
        differ.is_empty(),
        "{} of {} source ports went to different backends:\n{}",
        differ.len(),
        ports.len(),
        differ.join("\n")
    );
    let fixed = tally(&via_a);
    eprintln!("  explicit source ports, both gateways: {fixed:?}");
    assert_eq!(fixed.len(), 3, "the explicit source ports reach every backend: {fixed:?}");

    assert_eq!(a.forwarded_problems(), Vec::<String>::new());
    assert_eq!(b.forwarded_problems(), Vec::<String>::new());
    epilogue(b);
    epilogue(a);
    nothing_left();
    eprintln!("  total: {:.2?}", t0.elapsed());
}

#[test]
fn unhealthy_backend_leaves_and_rejoins() {
    let Some(_serial) = kpf_tests::serial::begin(module_path!()) else { return };
    let t0 = Instant::now();
    let interval = Duration::from_secs(1);
    let (healthy_threshold, unhealthy_threshold) = (2u32, 2u32);
    let health = "[health]\ncheck = \"tcp\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2\n";
    let mut pool = Pool::new(&config("", health, ""));
    let fe = pool.fe(BOOTSTRAP);

    // Everything healthy to begin with, and b2 takes connections.
    let s = pool.status();
    for addr in [B1, B2, B3] {
        assert!(flag(backend(&s, addr), "healthy"), "{addr} healthy at start: {s:#}");
    }
    let before = tally(&pool.client(|| who_many(fe, 30)));
    assert!(before.contains_key("b2"), "b2 takes connections while up: {before:?}");

    // Stop b2's server; its namespace stays, so connecting to it is refused.
    let stopped_at = Instant::now();
    pool.servers[1] = None;
    let unhealthy_limit = interval * unhealthy_threshold + Duration::from_secs(1);
    // Measured from just before the server stopped to the first status that shows the flip.
    let ((last_error, flipped), _) = poll(unhealthy_limit + Duration::from_secs(10), "b2 marked unhealthy", || {
        let s = pool.status();
        let b = backend(&s, B2);
        (!flag(b, "healthy")).then(|| (b["last_error"].clone(), stopped_at.elapsed()))
    });
    eprintln!(
        "  b2 marked unhealthy {flipped:.2?} after its server stopped (limit {unhealthy_limit:?}); last_error {last_error}"
    );
    assert!(flipped <= unhealthy_limit, "b2 took {flipped:?} to be marked unhealthy, more than {unhealthy_limit:?}");
    assert!(last_error.as_str().is_some_and(|e| e.contains("refused")), "last_error says why: {last_error}");
    let s = pool.status();
    assert!(flag(backend(&s, B1), "healthy") && flag(backend(&s, B3), "healthy"), "b1, b3 stay healthy: {s:#}");
    let log = pool.kpf.log();
    assert!(
        log.lines().any(|l| l.contains(B2) && l.contains("unhealthy")),
        "kpf logs the flip (\"{B2} ... unhealthy\"):\n{log}"
    );

    // The bootstrap port keeps serving, without b2.
    let without = tally(&pool.client(|| who_many(fe, 60)));
    eprintln!("  60 connections with b2 down: {without:?}");
    assert!(!without.contains_key("b2"), "no new connection may reach b2 while unhealthy: {without:?}");
    assert_eq!(without.values().sum::<usize>(), 60);
    assert!(without.contains_key("b1") && without.contains_key("b3"), "{without:?}");

    // b2 comes back: healthy again after `healthy_threshold` good checks, and takes connections.
    let restarted_at = Instant::now();
    pool.servers[1] = Some(Backend::new(&pool.topo.backends[1], "b2").expect("restarting b2"));
    let healthy_limit = interval * healthy_threshold + Duration::from_secs(1);
    let (back, _) = poll(healthy_limit + Duration::from_secs(10), "b2 healthy again", || {
        flag(backend(&pool.status(), B2), "healthy").then(|| restarted_at.elapsed())
    });
    eprintln!("  b2 healthy again {back:.2?} after its server restarted (limit {healthy_limit:?})");
    assert!(back <= healthy_limit, "b2 took {back:?} to be healthy again, more than {healthy_limit:?}");
    assert_eq!(backend(&pool.status(), B2)["last_error"], Value::Null, "a good check clears last_error");
    let again: Vec<String> = pool.client(|| {
        let mut ids = Vec::new();
        for _ in 0..60 {
            let id = peer::who(SocketAddr::V4(fe))?;
            let done = id == "b2";
            ids.push(id);
            if done {
                break;
            }
        }
        Ok(ids)
    });
    eprintln!("  b2 reached again after {} connection(s)", again.len());
    assert_eq!(again.last().map(String::as_str), Some("b2"), "b2 takes new connections again: {:?}", tally(&again));
    let log = pool.kpf.log();
    assert!(log.lines().any(|l| l.contains(B2) && l.contains("healthy again")), "kpf logs the recovery:\n{log}");

    assert_eq!(pool.forwarded_problems(), Vec::<String>::new());
    epilogue(pool);
    nothing_left();
    eprintln!("  total: {:.2?}", t0.elapsed());
}

/// `when_all_unhealthy = "reject"` counts only the backends that take new connections: with
/// one backend unhealthy and the other (healthy) draining, new connections are dropped, not sent
/// to the unhealthy one; undraining lifts that.
#[test]
fn reject_counts_only_backends_taking_connections() {
    let Some(_serial) = kpf_tests::serial::begin(module_path!()) else { return };
    let t0 = Instant::now();
    const PORT: u16 = 9100;
    let health = "[health]\ncheck = \"tcp\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2\n";
    let extra = format!("[[frontend]]\nport = {PORT}\nbackends = [\"{B1}\", \"{B2}\"]\nwhen_all_unhealthy = \"reject\"\n");
    let mut pool = Pool::new(&config("", health, &extra));
    let fe = pool.fe(PORT);

    pool.servers[1] = None;
    poll(Duration::from_secs(15), "b2 marked unhealthy", || (!flag(backend(&pool.status(), B2), "healthy")).then_some(()));
    assert_eq!(tally(&pool.client(|| who_many(fe, 10))).get("b1"), Some(&10), "b1 takes every connection while b2 is down");

    pool.kpf.cli(&["backend", "drain", B1, "--timeout", "300s"]).expect("kpf backend drain");
    let before = counter(&pool.status(), "drop_no_healthy_backend");
    let refused = pool.client(|| Ok(TcpStream::connect_timeout(&SocketAddr::V4(fe), Duration::from_secs(1))));
    let err = refused.expect_err("no backend takes new connections: b1 drains, b2 is unhealthy");
    // Sent to b2 instead, the SYN would be answered with an RST at once (connection refused).
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "the SYN is dropped: {err}");
    assert!(counter(&pool.status(), "drop_no_healthy_backend") > before, "the drop is counted");

    pool.kpf.cli(&["backend", "undrain", B1]).expect("kpf backend undrain");
    assert_eq!(pool.client(|| peer::who(SocketAddr::V4(fe))), "b1", "undrained, b1 takes connections again");

    epilogue(pool);
    nothing_left();
    eprintln!("  total: {:.2?}", t0.elapsed());
}

#[test]
fn drain_moves_new_keeps_old_then_resets() {
    let Some(_serial) = kpf_tests::serial::begin(module_path!()) else { return };
    let t0 = Instant::now();
    let pool = Pool::new(&config("", "", ""));
    let fe = pool.fe(BOOTSTRAP);

    // Long-lived connections in ECHO mode, at least one of them on b2.
    let mut sessions: Vec<(String, Session)> = pool.client(|| {
        let mut v = Vec::new();
        while v.len() < 30 || (!v.iter().any(|(id, _): &(String, Session)| id == "b2") && v.len() < 200) {
            let mut s = Session::connect(SocketAddr::V4(fe))?;
            let id = s.identity()?;
            s.start_echo()?;
            v.push((id, s));
        }
        Ok(v)
    });
    let on_b2 = sessions.iter().filter(|(id, _)| id == "b2").count();
    eprintln!(
        "  {} open connections: {:?}",
        sessions.len(),
        tally(&sessions.iter().map(|(i, _)| i.clone()).collect::<Vec<_>>())
    );
    assert!(on_b2 >= 1, "no connection landed on b2");
    for (id, s) in &mut sessions {
        s.echo_round(b"before the drain").unwrap_or_else(|e| panic!("echo on {id} before the drain: {e}"));
    }
    assert_eq!(num(backend(&pool.status(), B2), "live_flows"), on_b2 as u64, "kpf counts b2's live connections");

    let drain_timeout = Duration::from_secs(3);
    let drained_at = Instant::now();
    let out = pool.kpf.cli(&["backend", "drain", B2, "--timeout", "3s"]).expect("kpf backend drain");
    eprintln!("  drain: {}", out.trim());
    let s = pool.status();
    assert!(flag(backend(&s, B2), "draining"), "status shows b2 draining: {s:#}");
    assert!(!flag(backend(&s, B1), "draining") && !flag(backend(&s, B3), "draining"), "{s:#}");

    // Right after: the existing connections, b2's included, still work...
    for (id, s) in &mut sessions {
        s.echo_round(b"right after the drain").unwrap_or_else(|e| panic!("echo on {id} right after the drain: {e}"));
    }
    // ...and new ones never reach b2.
    let new = tally(&pool.client(|| who_many(fe, 60)));
    eprintln!("  60 new connections while draining: {new:?} ({:.2?} after the drain)", drained_at.elapsed());
    assert!(!new.contains_key("b2"), "a new connection reached the draining b2: {new:?}");
    assert_eq!(new.values().sum::<usize>(), 60);

    // b2's connections keep working until shortly before the timeout...
    let (mut b2s, mut others): (Vec<_>, Vec<_>) = sessions.into_iter().partition(|(id, _)| id == "b2");
    let limit = drain_timeout + Duration::from_secs(2);
    let mut rounds = 0;
    while drained_at.elapsed() + Duration::from_millis(700) < drain_timeout {
        for (id, s) in &mut b2s {
            s.echo_round(b"while draining").unwrap_or_else(|e| {
                panic!("echo on {id} {:.2?} after the drain, before its timeout: {e}", drained_at.elapsed())
            });
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("  b2's connections echoed {rounds} more time(s) until {:.2?} after the drain", drained_at.elapsed());
    // ...then kpf resets them. Nothing is sent from here on, so only an RST from kpf can end
    // them: the gateway's kernel would answer data on a forgotten connection, not silence.
    let mut ended: Vec<(Duration, io::Error)> = Vec::new();
    while !b2s.is_empty() && drained_at.elapsed() < limit + Duration::from_secs(5) {
        let mut alive = Vec::new();
        for (id, mut s) in b2s {
            match s.read_some(Duration::from_millis(20)) {
                Ok(None) => alive.push((id, s)),
                Ok(Some(b)) if b.is_empty() => ended.push((drained_at.elapsed(), io::ErrorKind::UnexpectedEof.into())),
                Ok(Some(b)) => panic!("{} unexpected bytes on a b2 connection while draining", b.len()),
                Err(e) => {
                    let at = drained_at.elapsed();
                    // The connection is unusable now: ECHO fails too.
                    let echo = s.echo_round(b"after the reset");
                    assert!(echo.is_err(), "echo still works on a b2 connection that reported {e}");
                    ended.push((at, e));
                }
            }
        }
        b2s = alive;
        std::thread::sleep(Duration::from_millis(50));
    }
    for (at, e) in &ended {
        eprintln!("  b2 connection ended {at:.2?} after the drain: {:?}: {e}", e.kind());
    }
    assert!(b2s.is_empty(), "{} b2 connection(s) still open {:.2?} after the drain", b2s.len(), drained_at.elapsed());
    for (at, e) in &ended {
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "a b2 connection ended with {e}, not a reset");
        assert!(
            *at >= drain_timeout,
            "a b2 connection ended {at:?} after the drain, before its {drain_timeout:?} timeout: {e}"
        );
        assert!(*at <= limit, "a b2 connection ended {at:?} after the drain, later than {limit:?}: {e}");
    }
    // kpf reset exactly b2's connections, toward b2 too.
    let (line, _) = poll(Duration::from_secs(5), "the drain's reset in kpf's log", || {
        pool.kpf.log().lines().find(|l| l.contains(&format!("drain of {B2} timed out"))).map(str::to_owned)
    });
    eprintln!("  log: {line}");
    assert!(line.contains(&format!("reset {on_b2} remaining")), "kpf reset b2's {on_b2} connection(s): {line}");
    let b2_server = pool.servers[1].as_ref().expect("b2 runs");
    let (_, gone) = poll(Duration::from_secs(5), "b2's server sees its connections reset", || {
        (b2_server.open_connections() == 0).then_some(())
    });
    eprintln!("  b2's server had closed all its connections {gone:.2?} later");

    // Everything on b1 and b3 is untouched.
    for (id, s) in &mut others {
        s.echo_round(b"after b2's reset")
            .unwrap_or_else(|e| panic!("echo on {id} after b2's connections were reset: {e}"));
    }
    for (id, s) in others {
        s.finish_echo().unwrap_or_else(|e| panic!("closing a connection to {id}: {e}"));
    }
    let s = pool.status();
    assert!(flag(backend(&s, B2), "draining"), "b2 stays drained until undrained: {s:#}");
    assert_eq!(num(backend(&s, B2), "live_flows"), 0, "{s:#}");

    // Undrained: b2 takes new connections again.
    pool.kpf.cli(&["backend", "undrain", B2]).expect("kpf backend undrain");
    assert!(!flag(backend(&pool.status(), B2), "draining"));
    let again: Vec<String> = pool.client(|| {
        let mut ids = Vec::new();
        for _ in 0..60 {
            let id = peer::who(SocketAddr::V4(fe))?;
            let done = id == "b2";
            ids.push(id);
            if done {
                break;
            }
        }
        Ok(ids)
    });
    eprintln!("  undrained: b2 reached after {} connection(s)", again.len());
    assert_eq!(
        again.last().map(String::as_str),
        Some("b2"),
        "b2 takes new connections after undrain: {:?}",
        tally(&again)
    );

    for (i, b) in pool.servers.iter().flatten().enumerate() {
        // b2's server saw its connections reset: that is the point. The others saw nothing.
        if i != 1 {
            assert_eq!(forwarded_problems(b), Vec::<String>::new(), "{}", b.identity());
        }
    }
    epilogue(pool);
    nothing_left();
    eprintln!("  total: {:.2?}", t0.elapsed());
}

#[test]
fn allowlist_drops_outsiders_without_state() {
    let Some(_serial) = kpf_tests::serial::begin(module_path!()) else { return };
    let t0 = Instant::now();
    let extra = format!("\n[[frontend]]\nport = 9096\nbackends = [\"{B1}\"]\nallow = [\"10.100.0.10/32\"]\n");
    let pool = Pool::new(&config("", "", &extra));
    pool.topo.client.ip(&["addr", "add", "10.100.0.11/24", "dev", "eth0"]).expect("second client address");
    let (inside, outside) = (pool.topo.client_addr, Ipv4Addr::new(10, 100, 0, 11));
    let (fe_allow, fe_open) = (pool.fe(9096), pool.fe(BOOTSTRAP));
    let flows = || -> Vec<Value> {
        let text = pool.kpf.cli(&["flows", "--json"]).expect("kpf flows --json");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("kpf flows --json is not a JSON list ({e}):\n{text}"))
    };

    let dropped_before = counter(&pool.status(), "drop_not_allowed");
    let t = Instant::now();
    let refused = pool.client(|| {
        Ok(Session::connect_from(SocketAddrV4::new(outside, 0), fe_allow, Duration::from_secs(2)).map(drop))
    });
    eprintln!("  from {outside} to {fe_allow}: {refused:?} after {:.2?}", t.elapsed());
    let e = refused.expect_err("an address outside the allowlist must not connect");
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "the SYN is dropped, not refused: {e}");
    let s = pool.status();
    let dropped = counter(&s, "drop_not_allowed") - dropped_before;
    eprintln!("  drop_not_allowed +{dropped}");
    assert!(dropped >= 1, "drop_not_allowed did not count the SYN(s): {:#}", s["counters"]);
    let f = flows();
    assert!(
        !f.iter().any(|x| x["client"].as_str().is_some_and(|c| c.starts_with("10.100.0.11:"))),
        "a dropped SYN left state behind: {f:#?}"
    );
    assert_eq!(num(frontend(&s, "*:9096"), "new_flows"), 0, "no connection opened through 9096: {s:#}");

    // The allowed source connects and reaches b1.
    let id = pool.client(|| peer::who_from(SocketAddrV4::new(inside, 0), fe_allow));
    assert_eq!(id, "b1", "{inside} through 9096");
    assert_eq!(num(frontend(&pool.status(), "*:9096"), "new_flows"), 1);

    // The outsider may use the frontend without an allowlist; kpf tracks that connection.
    let mut s = pool.client(|| Session::connect_from(SocketAddrV4::new(outside, 0), fe_open, peer::CONNECT_TIMEOUT));
    let id = s.identity().expect("identity through 9092");
    assert!(BACKEND_NAMES.contains(&id.as_str()), "{id}");
    let local = s.local_addr().expect("local address");
    let f = flows();
    let mine: Vec<&Value> = f.iter().filter(|x| x["client"] == local.to_string()).collect();
    assert_eq!(mine.len(), 1, "kpf flows lists {local}'s connection: {f:#?}");
    assert_eq!(mine[0]["frontend"], format!("{}:{BOOTSTRAP}", pool.topo.gateway_addr), "{f:#?}");
    s.echo(b"from the second address").expect("echo from the second address through 9092");
    assert_eq!(counter(&pool.status(), "drop_not_allowed") - dropped_before, dropped, "nothing else was dropped");

    assert_eq!(pool.forwarded_problems(), Vec::<String>::new());
    epilogue(pool);
    nothing_left();
    eprintln!("  total: {:.2?}", t0.elapsed());
}

/// `GET path` over HTTP/1.1 from the calling thread's namespace: the status line and the body
/// (checked against Content-Length).
fn http_get(addr: SocketAddr, path: &str) -> io::Result<(String, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) =
        raw.split_once("\r\n\r\n").ok_or_else(|| io::Error::other(format!("no end of headers: {raw:?}")))?;
    let status = head.lines().next().unwrap_or_default().to_owned();
    let len = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
        .and_then(|v| v.parse::<usize>().ok());
    if len != Some(body.len()) {
        return Err(io::Error::other(format!("Content-Length {len:?}, body {} bytes: {raw:?}", body.len())));
    }
    Ok((status, head.to_owned(), body.to_owned()))
}

fn listening(gateway: &Netns) -> Vec<String> {
    gateway.run("ss", &["-Hltn"]).expect("ss -ltn in the gateway").lines().map(str::to_owned).collect()
}

#[test]
fn metrics_endpoint() {
    let Some(_serial) = kpf_tests::serial::begin(module_path!()) else { return };
    let t0 = Instant::now();
    let pool = Pool::new(&config("metrics_addr = \"127.0.0.1:9464\"", "", ""));
    let fe = pool.fe(BOOTSTRAP);
    const N: usize = 30;
    let ids = tally(&pool.client(|| who_many(fe, N)));
    eprintln!("  {N} connections: {ids:?}");

    let addr: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    let (status, head, body) = in_ns(&pool.topo.gateway, || http_get(addr, "/metrics"));
    assert_eq!(status, "HTTP/1.1 200 OK", "{head}\n\n{body}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain"), "{head}");
    let lines: Vec<&str> = body.lines().collect();
    let want = [
        format!("kpf_frontend_new_flows_total{{frontend=\"*:{BOOTSTRAP}\"}} {N}"),
        format!("kpf_backend_healthy{{backend=\"{B1}\"}} 1"),
        format!("kpf_backend_healthy{{backend=\"{B2}\"}} 1"),
        format!("kpf_backend_healthy{{backend=\"{B3}\"}} 1"),
        format!("kpf_backend_draining{{backend=\"{B2}\"}} 0"),
    ];
    for w in &want {
        assert!(lines.contains(&w.as_str()), "metrics lack {w:?}:\n{body}");
    }
    for (addr, id) in [B1, B2, B3].iter().zip(BACKEND_NAMES) {
        let line = format!("kpf_backend_new_flows_total{{backend=\"{addr}\"}} {}", ids.get(id).copied().unwrap_or(0));
        assert!(lines.contains(&line.as_str()), "metrics lack {line:?}:\n{body}");
    }
    let not_allowed = "kpf_dropped_total{reason=\"not_allowed\"} ";
    assert!(
        lines.iter().any(|l| l.strip_prefix(not_allowed).is_some_and(|v| v.parse::<u64>().is_ok())),
        "metrics lack {not_allowed:?}<n>:\n{body}"
    );
    assert!(body.contains("# TYPE kpf_frontend_new_flows_total counter"), "{body}");
    let (status, _, _) = in_ns(&pool.topo.gateway, || http_get(addr, "/other"));
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    // Connections that send nothing take every slot (kpf's metrics::MAX_CONNECTIONS): one more is
    // closed unanswered at once rather than costing the daemon a descriptor (an idle one in a
    // slot is given 5 s to send its request); once they go, a scrape is answered again.
    const SLOTS: usize = 32;
    let idle: Vec<TcpStream> = in_ns(&pool.topo.gateway, || {
        (0..=SLOTS).map(|_| TcpStream::connect(addr).and_then(|s| s.set_nonblocking(true).map(|()| s))).collect()
    });
    let closed = |s: &TcpStream| match s.peek(&mut [0u8; 1]) {
        Ok(0) => true,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        Ok(_) => false,
    };
    // At least one: the slot of the request before may still be held a moment (then two).
    let (refused, took) = poll(Duration::from_secs(2), "a connection past the cap to be closed unanswered", || {
        let n = idle.iter().filter(|s| closed(s)).count();
        (n >= 1).then_some(n)
    });
    assert!(refused <= 2, "{refused} of {} idle connections closed at once", SLOTS + 1);
    drop(idle);
    let (_, answered) = poll(Duration::from_secs(5), "a scrape to be answered once the idle connections closed", || {
        in_ns(&pool.topo.gateway, || Ok(http_get(addr, "/metrics").ok())).filter(|(status, _, _)| status == "HTTP/1.1 200 OK")
    });
    eprintln!("  {} idle connections: {refused} closed unanswered after {took:.2?}; answered again {answered:.2?} after they closed", SLOTS + 1);
    // `kpf metrics` prints the same families through the control socket.
    let cli = pool.kpf.cli(&["metrics"]).expect("kpf metrics");
    assert!(cli.lines().any(|l| l == want[0]), "kpf metrics lacks {:?}:\n{cli}", want[0]);

    let open = listening(&pool.topo.gateway);
    eprintln!("  listening with metrics_addr: {open:?}");
    assert!(open.len() == 1 && open[0].contains("127.0.0.1:9464"), "only the metrics port listens: {open:?}");

    // Without metrics_addr, kpf opens no TCP port at all.
    let Pool { kpf, servers, topo } = pool;
    let stopped = kpf.stop();
    assert!(stopped.status.success() && stopped.down_failed.is_none(), "{stopped:?}");
    let (_, freed) = poll(Duration::from_secs(5), "the metrics port closes with kpf", || {
        listening(&topo.gateway).is_empty().then_some(())
    });
    eprintln!("  metrics port closed {freed:.2?} after kpf stopped");
    let kpf = start_kpf(&topo, &config("", "", ""));
    let pool = Pool { kpf, servers, topo };
    let id = pool.client(|| peer::who(SocketAddr::V4(fe)));
    assert!(BACKEND_NAMES.contains(&id.as_str()), "the second kpf forwards: {id}");
    let open = listening(&pool.topo.gateway);
    assert!(open.is_empty(), "kpf without metrics_addr listens on TCP: {open:?}");
    let refused = in_ns(&pool.topo.gateway, || Ok(http_get(addr, "/metrics").map(|_| ())));
    assert!(refused.is_err(), "nothing answers on 9464 without metrics_addr");

    assert_eq!(pool.forwarded_problems(), Vec::<String>::new());
    epilogue(pool);
    nothing_left();
    eprintln!("  total: {:.2?}", t0.elapsed());
}

/// `kpf check --config FILE`: its exit code and stdout + stderr.
fn check(bin: &Path, file: &Path) -> (Option<i32>, String) {
    let out = Command::new(bin)
        .arg("check")
        .arg("--config")
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .expect("running kpf check");
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn config_rejections() {
    let _serial = kpf_tests::serial::lock();
    let bin = kpf_proc::kpf_binary().expect("the kpf binary");
    let dir = std::env::temp_dir().join(format!("kpf-pool-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup<'a>(&'a Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
    let _cleanup = Cleanup(&dir);

    // A valid first frontend, so each problem is on a line of its own further down.
    let head = "# kpf test config\ninterface = \"eth0\"\n\n[[frontend]]\nport = 9093\nbackends = [\"10.64.0.2:39092\"]\n\n[[frontend]]\nport = 9092\n";
    // (name, rest of the file, lines the error may name, what it must say)
    let cases: &[(&str, String, &[usize], &str)] = &[
        ("empty backends", format!("{head}backends = []\n"), &[10], "`backends` is empty"),
        (
            "all weights 0",
            format!("{head}backends = [{{ address = \"10.64.0.3:39092\", weight = 0 }}, {{ address = \"10.64.0.4:39092\", weight = 0 }}]\n"),
            &[10],
            "weight 0",
        ),
        (
            "overlapping allow",
            format!("{head}backends = [\"10.64.0.3:39092\", \"10.64.0.4:39092\"]\nallow = [\"10.128.0.0/20\", \"10.128.4.0/24\"]\n"),
            &[11],
            "overlaps",
        ),
        (
            "host bits",
            format!("{head}backends = [\"10.64.0.3:39092\", \"10.64.0.4:39092\"]\nallow = [\"10.128.0.1/20\"]\n"),
            &[11],
            "host bits",
        ),
        (
            "health timeout equal to interval",
            "interface = \"eth0\"\n\n[health]\ninterval = \"2s\"\ntimeout = \"2s\"\n\n[[frontend]]\nport = 9092\nbackends = [\"10.64.0.3:39092\"]\n".into(),
            &[3, 5],
            "shorter than interval",
        ),
        (
            "health timeout above interval",
            "interface = \"eth0\"\n\n[health]\ninterval = \"1s\"\ntimeout = \"3s\"\n\n[[frontend]]\nport = 9092\nbackends = [\"10.64.0.3:39092\"]\n".into(),
            &[3, 5],
            "shorter than interval",
        ),
    ];
    // Control: the same shape, valid, passes.
    let good = dir.join("good.toml");
    std::fs::write(&good, format!("{head}backends = [\"10.64.0.3:39092\", {{ address = \"10.64.0.4:39092\", weight = 2 }}]\nallow = [\"10.128.0.0/20\", \"10.129.0.0/16\"]\n")).unwrap();
    let (code, out) = check(&bin, &good);
    assert_eq!(code, Some(0), "a valid config passes kpf check:\n{out}");

    let mut wrong = Vec::new();
    for (i, (name, text, lines, what)) in cases.iter().enumerate() {
        let file = dir.join(format!("case{i}.toml"));
        std::fs::write(&file, text).unwrap();
        let (code, out) = check(&bin, &file);
        eprintln!("  {name}: exit {code:?}: {}", out.trim());
        let at_line = lines.iter().any(|l| out.contains(&format!("{}:{l}:", file.display())));
        if code != Some(1) || !at_line || !out.contains(what) {
            wrong.push(format!(
                "{name}: want exit 1, {}:{lines:?}:..., {what:?}; got exit {code:?}: {}",
                file.display(),
                out.trim()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
