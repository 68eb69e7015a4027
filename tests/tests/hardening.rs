//! Hardening: what hostile or unlucky conditions must not break.
//!
//! - A SYN flood of spoofed sources, many times the conntrack table, leaves established
//!   connections alone (handshakes live in their own half-open table).
//! - Idle and closed connections expire on their state's timeout, their next packet gets an RST,
//!   and their SNAT ports are free again.
//! - Path-MTU discovery works through the gateway in both directions (kpf translates the ICMP
//!   "fragmentation needed" errors routers send about forwarded packets).
//! - Garbage on the control socket gets an error or a closed connection, never a crash or a
//!   change.
//! - Without root, `kpf run` refuses with one clear line, changes are refused, and kpf opens no
//!   TCP port it was not asked to.
//!
//! Run as root, after `cargo build --release -p kpf`:
//! `cargo test --release -p kpf-tests --test hardening -- --test-threads=1 --nocapture`
//!
//! Every test builds its own namespaces (Drop guards) and checks at the end that none is left.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use kpf_tests::{
    bpffs::{self, BpfFs},
    cli::{CliOutput, KpfCli},
    kpf_proc::{Kpf, Mode, SNAT_PORTS, kpf_binary},
    netns::{self, Netns},
    peer::{self, Backend, EchoLoop, Pattern, Session},
    routed::{BOTTLENECK_MTU, Routed},
    streams::{Pace, Streams},
    synflood::{SynFlood, mac_of, net_within},
    topology::{BACKEND_NAMES, BACKEND_PORT, OneNic},
};
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

/// The frontend ports, mapped to b1, b2, b3.
const PORTS: [u16; 3] = [9093, 9094, 9095];

use kpf_tests::serial::begin;

fn step(t: &mut Instant, what: &str) {
    eprintln!("  {what}: {:.2?}", t.elapsed());
    *t = Instant::now();
}

/// `PORTS[i]` -> backend i's `BACKEND_PORT`, for every backend.
fn port_mapping(topo: &OneNic) -> Vec<(u16, SocketAddrV4)> {
    PORTS.iter().zip(&topo.backend_addrs).map(|(&p, &b)| (p, SocketAddrV4::new(b, BACKEND_PORT))).collect()
}

/// After a test dropped everything: no namespace or bpffs mount of this process is left.
fn nothing_left() {
    let left = netns::own_namespaces().expect("listing namespaces");
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let mounts = bpffs::own_mounts().expect("reading mountinfo");
    assert!(mounts.is_empty(), "bpffs left mounted: {mounts:?}");
}

/// A kpf config: `top` (extra top-level keys) goes before the tables; health checks off (the
/// backends are traffic peers); `timeouts` is the body of `[timeouts]` (may be empty); one
/// frontend per entry, on `address` (or every local address).
fn config(
    interfaces: &[&str],
    top: &str,
    timeouts: &str,
    address: Option<Ipv4Addr>,
    frontends: &[(u16, SocketAddrV4)],
) -> String {
    let ifaces: Vec<String> = interfaces.iter().map(|i| format!("{i:?}")).collect();
    let mut s = format!(
        "interfaces = [{}]\nmode = \"native\"\nmanage_sysctls = true\n{top}\n[health]\ncheck = \"none\"\n",
        ifaces.join(", ")
    );
    if !timeouts.is_empty() {
        s += &format!("\n[timeouts]\n{timeouts}\n");
    }
    for (port, b) in frontends {
        s += "\n[[frontend]]\n";
        if let Some(a) = address {
            s += &format!("address = \"{a}\"\n");
        }
        s += &format!("port = {port}\nbackends = [\"{b}\"]\n");
    }
    s
}

fn start_backends(nses: &[Netns]) -> Vec<Backend> {
    nses.iter().zip(BACKEND_NAMES).map(|(ns, id)| Backend::new(ns, id).expect("starting a backend")).collect()
}

fn cli_json(kpf: &Kpf, args: &[&str]) -> Value {
    let text = kpf.cli(args).unwrap_or_else(|e| panic!("kpf {}: {e}", args.join(" ")));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("kpf {} printed no JSON ({e}): {text}", args.join(" ")))
}

fn status(kpf: &Kpf) -> Value {
    cli_json(kpf, &["status", "--json"])
}

fn counters(status: &Value) -> BTreeMap<String, u64> {
    status["counters"]
        .as_object()
        .unwrap_or_else(|| panic!("no counters in {status}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or_else(|| panic!("counter {k} = {v}"))))
        .collect()
}

fn counter(status: &Value, name: &str) -> u64 {
    counters(status).get(name).copied().unwrap_or_else(|| panic!("no counter {name} in {status}"))
}

/// The counters among drop_* and pass_no_flow that are not zero.
fn bad_counters(status: &Value) -> Vec<(String, u64)> {
    counters(status).into_iter().filter(|(k, v)| (k.starts_with("drop_") || k == "pass_no_flow") && *v > 0).collect()
}

fn flows(kpf: &Kpf, port: Option<u16>) -> Vec<Value> {
    let p = port.map(|p| p.to_string());
    let mut args = vec!["flows", "--json"];
    if let Some(p) = &p {
        args.extend(["--port", p.as_str()]);
    }
    match cli_json(kpf, &args) {
        Value::Array(v) => v,
        other => panic!("kpf flows --json printed {other}"),
    }
}

fn field<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// The flows whose client is `client` (`ip:port`).
fn flows_of<'a>(all: &'a [Value], client: &str) -> Vec<&'a Value> {
    all.iter().filter(|f| f["client"].as_str() == Some(client)).collect()
}

/// Polls `f` every 20 ms until it returns `Some`; fails after `limit` with `what`. Returns the
/// value and how long it took.
fn wait_for<T>(limit: Duration, what: &str, f: impl FnMut() -> Option<T>) -> (T, Duration) {
    kpf_tests::wait::poll(limit, Duration::from_millis(20), what, f)
}

fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    ns.enter(f)?
}

fn in_csum_errors(ns: &Netns) -> i64 {
    ns.snmp("Tcp", "InCsumErrors").expect("reading /proc/net/snmp")
}

// =============================================================================================
// 1. SYN flood

/// SYNs in the flood: more than ten times the conntrack table (max_flows 1024 connections,
/// 2048 entries) and 24 times the half-open table (1024 handshakes).
const FLOOD_SYNS: u64 = 25_000;
const FLOOD_PPS: u64 = 6_000;
const FLOOD_SEED: u64 = 0x5eed_f100d;
/// Half-open capacity at max_flows 1024: max(1024, 1024 / 4) handshakes.
const HALF_OPEN_CAPACITY: u64 = 1024;
/// Established connections kept through the flood (10 per port).
const KEPT: usize = 30;

#[test]
fn syn_flood_does_not_touch_established() {
    let Some(_serial) = begin("syn_flood_does_not_touch_established") else { return };
    let total = Instant::now();
    let mut t = Instant::now();
    let topo = OneNic::new().expect("building the topology");
    {
        let backends = start_backends(&topo.backends);
        let gw = topo.gateway_addr;
        let fe = |port: u16| SocketAddr::V4(SocketAddrV4::new(gw, port));
        let mapping = port_mapping(&topo);
        let top = format!("snat_ports = \"{SNAT_PORTS}\"\nmax_flows = 1024\n");
        let text = config(&["eth0"], &top, "", Some(gw), &mapping);
        let kpf = Kpf::start(&topo.gateway, &text, Mode::Native).expect("starting kpf");
        step(&mut t, "topology, backends, kpf ready");

        // 30 long-lived connections, echoing a few KB at a time, verified, until stopped.
        let targets: Vec<SocketAddr> = (0..KEPT / PORTS.len()).flat_map(|_| PORTS.map(fe)).collect();
        let pace = Pace { max_chunk: 4096, pause: Duration::from_millis(20) };
        let streams = Streams::start(&topo.client, &targets, pace).expect("opening the 30 connections");
        streams.wait_all_advance(3, Duration::from_secs(30)).unwrap_or_else(|e| panic!("before the flood: {e}"));
        let endpoints = streams.endpoints();
        for (target, local, id) in &endpoints {
            let want = BACKEND_NAMES[PORTS.iter().position(|&p| p == target.port()).unwrap()];
            assert_eq!(id, want, "connection {local} -> {target}");
        }
        let before = status(&kpf);
        assert_eq!(bad_counters(&before), Vec::new(), "before the flood");
        step(&mut t, &format!("{KEPT} connections echoing"));

        // The flood: spoofed sources from 10.100.128.0/17, random ports, to 10.100.0.1:9093.
        let flood = SynFlood {
            dev: "eth0".into(),
            src_mac: mac_of(&topo.client, "eth0").expect("client MAC"),
            dst_mac: mac_of(&topo.gateway, "eth0").expect("gateway MAC"),
            dst: SocketAddrV4::new(gw, PORTS[0]),
            src_net: (Ipv4Addr::new(10, 100, 128, 0), 17),
            count: FLOOD_SYNS,
            rate_pps: FLOOD_PPS,
            seed: FLOOD_SEED,
        };
        let rounds_before = streams.rounds();
        // Meanwhile, new legitimate connections, to the flooded port and another one (all
        // handshakes share the half-open table).
        let flooding = std::sync::atomic::AtomicBool::new(true);
        let (report, during_new) = std::thread::scope(|s| {
            let newcomer = s.spawn(|| {
                let mut done: Vec<(u16, io::Result<String>, Duration)> = Vec::new();
                let mut i = 0usize;
                while flooding.load(Ordering::SeqCst) {
                    let port = PORTS[i % 2];
                    let started = Instant::now();
                    let r = in_ns(&topo.client, || peer::who(fe(port)));
                    done.push((port, r, started.elapsed()));
                    i += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                done
            });
            let report = flood.run(&topo.client);
            flooding.store(false, Ordering::SeqCst);
            (report, newcomer.join().expect("the newcomer thread"))
        });
        let report = report.expect("sending the flood");
        let rounds_during = streams.rounds();
        eprintln!(
            "  flood: {} SYNs in {:.2?} ({:.0}/s, {} queue-full retries), {} distinct sources, seed {FLOOD_SEED:#x}",
            report.sent,
            report.elapsed,
            report.pps(),
            report.retries,
            report.distinct_sources
        );
        assert_eq!(report.sent, FLOOD_SYNS);
        let failures = streams.failures();
        assert!(failures.is_empty(), "connections broke during the flood:\n  {}", failures.join("\n  "));
        let stalled: Vec<String> = (0..rounds_before.len())
            .filter(|&i| rounds_during[i] <= rounds_before[i])
            .map(|i| format!("{} -> {}", endpoints[i].1, endpoints[i].0))
            .collect();
        assert!(stalled.is_empty(), "connections that completed no echo round during the flood: {stalled:?}");
        let during: Vec<u64> = (0..rounds_before.len()).map(|i| rounds_during[i] - rounds_before[i]).collect();
        eprintln!(
            "  echo rounds per connection during the flood: min {} max {}",
            during.iter().min().unwrap(),
            during.iter().max().unwrap()
        );
        let slowest = during_new.iter().map(|(.., d)| *d).max().unwrap_or_default();
        eprintln!("  {} new connections during the flood, slowest {slowest:.2?}", during_new.len());
        let failed: Vec<String> = during_new
            .iter()
            .zip(0..)
            .filter(|((port, r, _), _)| {
                !r.as_ref().is_ok_and(|id| id == BACKEND_NAMES[PORTS.iter().position(|p| p == port).unwrap()])
            })
            .map(|((port, r, d), n)| format!("#{n} via {port} after {d:.2?}: {r:?}"))
            .collect();
        assert!(during_new.len() >= 10, "only {} new connections during the flood", during_new.len());
        assert!(failed.is_empty(), "new connections during the flood failed: {failed:?}");
        step(&mut t, "flood sent, every connection echoed during it, new ones opened");

        // What the flood did to the tables.
        let after = status(&kpf);
        let c0 = counters(&before);
        let c1 = counters(&after);
        let opened = c1["new_flows"] - c0["new_flows"];
        let all = flows(&kpf, None);
        let spoofed = |f: &&Value| {
            let client: SocketAddrV4 = field(f, "client").parse().unwrap();
            net_within((*client.ip(), 32), flood.src_net)
        };
        let flood_rows: Vec<&Value> = all.iter().filter(spoofed).collect();
        let mut states: BTreeMap<String, usize> = BTreeMap::new();
        for f in &flood_rows {
            *states.entry(field(f, "state").to_owned()).or_default() += 1;
        }
        eprintln!(
            "  kpf: new_flows +{opened} during the flood ({FLOOD_SYNS} spoofed SYNs + {} legitimate; half-open capacity {HALF_OPEN_CAPACITY}); \
             flood connections still tracked: {} {states:?}; tracked_connections {}; counters {:?}",
            during_new.len(),
            flood_rows.len(),
            after["tracked_connections"],
            c1.iter().filter(|(_, v)| **v > 0).collect::<BTreeMap<_, _>>()
        );
        let opened = opened - during_new.len() as u64;
        assert!(
            opened >= 10 * HALF_OPEN_CAPACITY,
            "kpf opened only {opened} half-open connections for {FLOOD_SYNS} SYNs: the flood did not overrun the \
             half-open table ten times"
        );
        assert!(
            !flood_rows.is_empty() && flood_rows.len() as u64 <= HALF_OPEN_CAPACITY,
            "{} flood connections tracked; expected some, at most the half-open capacity {HALF_OPEN_CAPACITY}",
            flood_rows.len()
        );
        assert!(
            flood_rows.iter().all(|f| matches!(field(f, "state"), "syn_sent" | "syn_acked")),
            "a spoofed handshake left the half-open state: {states:?}"
        );
        assert_eq!(bad_counters(&after), Vec::new(), "drops or packets without a flow during the flood");

        // Every kept connection is still tracked, established, on its port.
        for &port in &PORTS {
            let listed = flows(&kpf, Some(port));
            for (target, local, _) in endpoints.iter().filter(|(t, ..)| t.port() == port) {
                let rows = flows_of(&listed, &local.to_string());
                assert_eq!(rows.len(), 1, "kpf flows --port {port}: connection {local} -> {target}: {rows:?}");
                assert_eq!(field(rows[0], "state"), "established", "{local} -> {target}: {}", rows[0]);
            }
        }
        step(&mut t, "tables checked");

        // And they keep echoing after it.
        streams.wait_all_advance(5, Duration::from_secs(30)).unwrap_or_else(|e| panic!("after the flood: {e}"));
        step(&mut t, "every connection echoed 5 more rounds");

        // New legitimate connections still work on every port (9093 is the flooded one).
        for (&port, id) in PORTS.iter().zip(BACKEND_NAMES) {
            for _ in 0..3 {
                let started = Instant::now();
                let got = in_ns(&topo.client, || peer::who(fe(port)))
                    .unwrap_or_else(|e| panic!("new connection via {port}: {e}"));
                assert_eq!(got, id, "new connection via {port}");
                eprintln!("  new connection via {port} -> {got} in {:.2?}", started.elapsed());
            }
        }
        step(&mut t, "new connections after the flood");

        let reports = streams.stop();
        let mut rounds = 0;
        let mut bytes = 0;
        for r in &reports {
            assert!(r.error.is_none(), "{} -> {}: {:?}", r.local, r.target, r.error);
            rounds += r.rounds;
            bytes += r.bytes;
        }
        eprintln!("  {KEPT} connections: {rounds} verified rounds, {bytes} bytes each way, no error, closed cleanly");
        let end = status(&kpf);
        assert_eq!(bad_counters(&end), Vec::new(), "drops or packets without a flow");
        for b in &backends {
            assert_eq!(b.problems(), Vec::<String>::new(), "{} had problems", b.identity());
        }
        for ns in std::iter::once(&topo.client).chain(&topo.backends) {
            assert_eq!(in_csum_errors(ns), 0, "{}: segments with bad checksums", ns.name());
        }
        drop(backends);
        let stopped = kpf.stop();
        assert!(stopped.is_clean(), "{stopped:?}");
    }
    drop(topo);
    nothing_left();
    eprintln!("  total: {:.2?}", total.elapsed());
}

// =============================================================================================
// 2. Idle timeouts, closing, port reuse

/// 64 SNAT ports (the least allowed): two rounds of [`POOL_ROUND`] connections to one backend
/// only fit if the first round's ports were freed.
const SMALL_SNAT: &str = "40000-40063";
const SNAT_SIZE: usize = 64;
const POOL_ROUND: usize = 40;
const ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(3);
const CLOSING_TIMEOUT: Duration = Duration::from_secs(2);
/// The daemon's conntrack GC interval.
const GC_INTERVAL: Duration = Duration::from_secs(5);
/// The coarse clock's granularity (a jiffy, at most 10 ms) and then some.
const CLOCK_SLACK: Duration = Duration::from_millis(100);

/// Connects from `src` to `dst` (retrying while the kernel still holds the old 4-tuple, e.g. in
/// LAST_ACK) and reads the backend's identity line.
fn raw_from(src: SocketAddrV4, dst: SocketAddrV4) -> io::Result<(TcpStream, String)> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut s = loop {
        match peer::connect_from(src, dst, peer::CONNECT_TIMEOUT) {
            Ok(s) => break s,
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    };
    s.set_read_timeout(Some(peer::IO_TIMEOUT))?;
    s.set_write_timeout(Some(peer::IO_TIMEOUT))?;
    let mut id = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        if s.read(&mut byte)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("no identity line: {id:?}")));
        }
        id.push(byte[0]);
    }
    id.pop();
    Ok((s, String::from_utf8_lossy(&id).into_owned()))
}

/// `STREAM seed len` on a connection from [`raw_from`]: `len` bytes (small: written before
/// reading) checked each way; the backend then closes first (so TIME_WAIT stays on its side and
/// the client's 4-tuple is free again at once), and this side closes.
fn exchange_and_close(mut s: TcpStream, seed: u64, len: usize) -> io::Result<()> {
    s.write_all(format!("STREAM {seed} {len}\n").as_bytes())?;
    let mut out = vec![0u8; len];
    Pattern::new(seed).fill(&mut out);
    s.write_all(&out)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    let mut want = vec![0u8; len];
    Pattern::new(seed.wrapping_add(1)).fill(&mut want);
    want.extend_from_slice(format!("OK {}\n", Pattern::sha256_hex(seed, len as u64)).as_bytes());
    if rest != want {
        return Err(io::Error::other(format!("the backend's {} bytes are not the pattern and verdict", rest.len())));
    }
    Ok(())
}

#[test]
fn idle_connections_expire_and_ports_free() {
    let Some(_serial) = begin("idle_connections_expire_and_ports_free") else { return };
    let total = Instant::now();
    let mut t = Instant::now();
    let topo = OneNic::new().expect("building the topology");
    {
        let backends = start_backends(&topo.backends);
        let gw = topo.gateway_addr;
        let fe4 = |port: u16| SocketAddrV4::new(gw, port);
        let b = |i: usize| SocketAddrV4::new(topo.backend_addrs[i], BACKEND_PORT);
        let text = config(
            &["eth0"],
            &format!("snat_ports = \"{SMALL_SNAT}\"\n"),
            "established = \"3s\"\nclosing = \"2s\"\nreset = \"2s\"\nsyn = \"2s\"",
            Some(gw),
            &[(9093, b(0)), (9094, b(1))],
        );
        let kpf = Kpf::start(&topo.gateway, &text, Mode::Native).expect("starting kpf");
        let client = &topo.client;
        let client_addr = topo.client_addr;
        step(&mut t, "topology, backends, kpf ready");

        // (a) A: an established connection through 9094, then idle.
        let mut a = in_ns(client, || EchoLoop::connect(SocketAddr::V4(fe4(9094)))).expect("connection A");
        a.round(b"before going idle").expect("A's first round");
        let a_last = Instant::now();
        let a_client = a.local_addr().to_string();
        let listed = flows(&kpf, Some(9094));
        let rows = flows_of(&listed, &a_client);
        assert_eq!(rows.len(), 1, "A ({a_client}) in kpf flows: {listed:#?}");
        assert_eq!(field(rows[0], "state"), "established");
        let a_gateway = field(rows[0], "gateway").to_owned();

        // (b) B: from a fixed client port, closed normally (FIN both ways).
        let src = SocketAddrV4::new(client_addr, 30_001);
        let tuple = src.to_string();
        let accepted0 = backends[0].accepted();
        let (b_sess, id) = in_ns(client, || raw_from(src, fe4(9093))).expect("connection B");
        assert_eq!(id, "b1");
        let listed = flows(&kpf, Some(9093));
        let rows = flows_of(&listed, &tuple);
        assert_eq!(rows.len(), 1, "B ({tuple}) in kpf flows: {listed:#?}");
        let b_gateway = field(rows[0], "gateway").to_owned();
        exchange_and_close(b_sess, 1, 1000).expect("closing B");
        // The backend's FIN came first: it holds the 4-tuple in TIME_WAIT.
        let (state, took) = wait_for(Duration::from_secs(5), "B's entry to show both FINs", || {
            let listed = flows(&kpf, Some(9093));
            let rows = flows_of(&listed, &tuple);
            (rows.len() == 1 && field(rows[0], "state") == "backend_time_wait").then(|| field(rows[0], "state").to_owned())
        });
        eprintln!("  B {tuple} via {b_gateway}: closed, state {state} after {took:.2?}");

        // (c) The same 4-tuple again at once: a new connection that reaches b1 again.
        let (c_sess, id) = in_ns(client, || raw_from(src, fe4(9093))).expect("reusing B's 4-tuple");
        assert_eq!(id, "b1", "the reused 4-tuple reaches b1");
        assert_eq!(backends[0].accepted(), accepted0 + 2, "b1 accepted the reused 4-tuple as a new connection");
        let listed = flows(&kpf, Some(9093));
        let rows = flows_of(&listed, &tuple);
        assert_eq!(rows.len(), 1, "one connection for {tuple} (the old entries replaced): {rows:#?}");
        assert_eq!(field(rows[0], "state"), "established");
        let c_gateway = field(rows[0], "gateway").to_owned();
        exchange_and_close(c_sess, 2, 1000).expect("data both ways on the reused 4-tuple, then closing");
        let c_closed = Instant::now();
        eprintln!("  reused {tuple}: reached b1 via {c_gateway} (B had {b_gateway})");

        // A first round of connections on b1's 64 SNAT ports: opened together, then closed.
        let round1 = pool_round(&kpf, client, fe4(9093), "round 1");
        let round1_closed = Instant::now();
        step(&mut t, &format!("A idle, B closed, 4-tuple reused, {POOL_ROUND} connections opened and closed"));

        // Everything leaves kpf flows once idle past its state's timeout (and a GC pass).
        let gone = |client: &str, all: &[Value]| flows_of(all, client).is_empty();
        let limit = ESTABLISHED_TIMEOUT + GC_INTERVAL + Duration::from_secs(4);
        let (_, _) = wait_for(limit, "A's entry to expire", || gone(&a_client, &flows(&kpf, Some(9094))).then_some(()));
        let a_idle = a_last.elapsed();
        eprintln!("  A ({a_client} via {a_gateway}) left kpf flows {a_idle:.2?} after its last packet");
        assert!(
            a_idle + CLOCK_SLACK >= ESTABLISHED_TIMEOUT,
            "A expired after {a_idle:.2?} idle, before the established timeout {ESTABLISHED_TIMEOUT:?}"
        );
        // Round 1's clients closed first; the reused 4-tuple's backend did, and keeps its SNAT
        // port through its TIME_WAIT (65 s), past the closing timeout: it closed before round 1,
        // so under that timeout alone it would have gone in the same collection.
        let (_, _) = wait_for(
            CLOSING_TIMEOUT + GC_INTERVAL + Duration::from_secs(4),
            "the connections the clients closed to expire",
            || {
                let listed = flows(&kpf, Some(9093));
                listed.iter().all(|f| field(f, "client") == tuple).then_some(())
            },
        );
        let (c_after, r_after) = (c_closed.elapsed(), round1_closed.elapsed());
        let listed = flows(&kpf, Some(9093));
        let rows = flows_of(&listed, &tuple);
        eprintln!(
            "  round 1 left kpf flows {r_after:.2?} after closing; the reused 4-tuple is still there {c_after:.2?} after: {rows:?}"
        );
        assert!(
            r_after + CLOCK_SLACK >= CLOSING_TIMEOUT,
            "closed connections expired {r_after:.2?} after closing, before the closing timeout {CLOSING_TIMEOUT:?}"
        );
        assert_eq!(rows.len(), 1, "the reused 4-tuple, closed by its backend first, left kpf flows: {listed:#?}");
        assert_eq!(field(rows[0], "state"), "backend_time_wait");
        step(&mut t, "expired and collected, but for a backend's TIME_WAIT");

        // A's next packet: no connection any more, so the gateway's kernel answers RST.
        let before = status(&kpf);
        let err = a.round(b"after expiry").expect_err("A's connection expired: its next packet must be reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "A after expiry: {err}");
        let after = status(&kpf);
        assert!(
            counter(&after, "pass_no_flow") > counter(&before, "pass_no_flow"),
            "A's packet after expiry was not handed to the kernel as a packet without a flow"
        );
        eprintln!("  A after expiry: {err}");

        // The 4-tuple opens again (its last connection ended), with an entry of its own.
        let (d_sess, id) = in_ns(client, || raw_from(src, fe4(9093))).expect("the 4-tuple after expiry");
        assert_eq!(id, "b1");
        let listed = flows(&kpf, Some(9093));
        let rows = flows_of(&listed, &tuple);
        assert_eq!(rows.len(), 1, "{tuple} after expiry: {rows:#?}");
        assert_eq!(field(rows[0], "state"), "established");
        eprintln!("  {tuple} after expiry: a new entry via {}", field(rows[0], "gateway"));
        exchange_and_close(d_sess, 3, 1000).expect("data both ways after expiry, then closing");

        // A second round: only fits in 64 ports if the first round's were freed.
        let round2 = pool_round(&kpf, client, fe4(9093), "round 2");
        let reused: BTreeSet<&String> = round1.ports.intersection(&round2.ports).collect();
        eprintln!(
            "  SNAT ports: round 1 used {}, round 2 used {}, {} of them also used in round 1; slowest connect {:.2?}",
            round1.ports.len(),
            round2.ports.len(),
            reused.len(),
            round2.slowest
        );
        assert!(
            reused.len() >= 2 * POOL_ROUND - SNAT_SIZE,
            "{} ports reused; {POOL_ROUND} + {POOL_ROUND} connections on {SNAT_SIZE} ports need at least {}",
            reused.len(),
            2 * POOL_ROUND - SNAT_SIZE
        );
        let end = status(&kpf);
        assert_eq!(counter(&end, "drop_snat_exhausted"), 0, "SNAT ports ran out: they were not freed");
        let bad: Vec<_> = bad_counters(&end).into_iter().filter(|(k, _)| k != "pass_no_flow").collect();
        assert_eq!(bad, Vec::new(), "drops");
        step(&mut t, "reset after expiry, 4-tuple and ports reused");

        drop(a);
        // b2 may log A's connection timing out on its side (kpf forgot it; the backend did not):
        // that one is expected, nothing else.
        let a_port = a_gateway.rsplit(':').next().unwrap().to_owned();
        for bk in &backends {
            let problems: Vec<String> = bk
                .problems()
                .into_iter()
                .filter(|p| !(bk.identity() == "b2" && p.contains(&format!(":{a_port}:"))))
                .collect();
            assert_eq!(problems, Vec::<String>::new(), "{} had problems", bk.identity());
        }
        drop(backends);
        let stopped = kpf.stop();
        assert!(stopped.is_clean(), "{stopped:?}");
    }
    drop(topo);
    nothing_left();
    eprintln!("  total: {:.2?}", total.elapsed());
}

struct PoolRound {
    /// Gateway (SNAT) endpoints the connections got.
    ports: BTreeSet<String>,
    slowest: Duration,
}

/// Opens [`POOL_ROUND`] connections to `fe` at once (one thread each), checks each reached b1
/// without a retransmitted SYN (under a second) and has its own SNAT port in `kpf flows`, then
/// closes them all cleanly.
fn pool_round(kpf: &Kpf, client: &Netns, fe: SocketAddrV4, what: &str) -> PoolRound {
    let opened: Vec<io::Result<(Session, Duration)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..POOL_ROUND)
            .map(|_| {
                s.spawn(move || {
                    in_ns(client, || {
                        let started = Instant::now();
                        let mut sess = Session::connect(SocketAddr::V4(fe))?;
                        let took = started.elapsed();
                        let id = sess.identity()?;
                        if id != "b1" {
                            return Err(io::Error::other(format!("reached {id}, not b1")));
                        }
                        Ok((sess, took))
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(io::Error::other("thread panicked")))).collect()
    });
    let mut sessions = Vec::new();
    let mut errors = Vec::new();
    let mut slowest = Duration::ZERO;
    for r in opened {
        match r {
            Ok((s, took)) => {
                slowest = slowest.max(took);
                sessions.push(s);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    assert!(errors.is_empty(), "{what}: {} of {POOL_ROUND} connections failed: {errors:?}", errors.len());
    assert!(
        slowest < Duration::from_secs(1),
        "{what}: a connection took {slowest:.2?} (a SYN was dropped and retried)"
    );
    let listed = flows(kpf, Some(fe.port()));
    let mut ports = BTreeSet::new();
    for s in &sessions {
        let local = s.local_addr().unwrap().to_string();
        let rows = flows_of(&listed, &local);
        assert_eq!(rows.len(), 1, "{what}: {local} in kpf flows");
        assert_eq!(field(rows[0], "state"), "established");
        assert!(ports.insert(field(rows[0], "gateway").to_owned()), "{what}: SNAT port {} given twice", rows[0]);
    }
    for s in sessions {
        in_ns(client, || s.echo(b"pool")).unwrap_or_else(|e| panic!("{what}: echo and close: {e}"));
    }
    PoolRound { ports, slowest }
}

// =============================================================================================
// 3. Path MTU

/// Bytes each way through the bottlenecks.
const PMTU_BULK: u64 = 16 << 20;

fn route_get(ns: &Netns, dst: Ipv4Addr) -> String {
    ns.ip(&["route", "get", &dst.to_string()]).expect("ip route get").split_whitespace().collect::<Vec<_>>().join(" ")
}

fn icmp(ns: &Netns, field: &str) -> i64 {
    ns.snmp("Icmp", field).expect("reading /proc/net/snmp")
}

#[test]
fn pmtu_through_the_gateway() {
    let Some(_serial) = begin("pmtu_through_the_gateway") else { return };
    let total = Instant::now();
    let mut t = Instant::now();
    let topo = Routed::new().expect("building the routed topology");
    {
        let backend = Backend::new(&topo.backends[0], "b1").expect("starting the backend");
        let fe_addr = topo.gateway_client_addr;
        let b = SocketAddrV4::new(topo.backend_addrs[0], BACKEND_PORT);
        let top = format!("snat_ports = \"{SNAT_PORTS}\"\n");
        let text = config(&["eth0", "eth1"], &top, "", Some(fe_addr), &[(9093, b)]);
        let kpf = Kpf::start(&topo.gateway, &text, Mode::Native).expect("starting kpf");
        let fe = SocketAddr::V4(SocketAddrV4::new(fe_addr, 9093));
        step(&mut t, "routed topology, backend, kpf ready");

        let (client, server) = (&topo.client, &topo.backends[0]);
        let toward_client = route_get(server, topo.gateway_backend_addr);
        let toward_gateway = route_get(client, fe_addr);
        assert!(!toward_gateway.contains(" mtu "), "client: a path MTU before any traffic: {toward_gateway}");
        assert!(!toward_client.contains(" mtu "), "backend: a path MTU before any traffic: {toward_client}");
        for ns in [client, server] {
            assert_eq!(in_csum_errors(ns), 0);
        }
        let sent_unreach =
            [icmp(&topo.client_router, "OutDestUnreachs"), icmp(&topo.backend_router, "OutDestUnreachs")];
        let got = in_ns(client, || peer::who(fe)).expect("who via 9093");
        assert_eq!(got, "b1");

        // Both directions at once, every byte checked. Without path-MTU discovery the first
        // full-sized segment either way never arrives and this times out.
        let seed: u64 = rand::rng().random();
        let r = in_ns(client, || peer::stream(fe, seed, PMTU_BULK))
            .unwrap_or_else(|e| panic!("stream through the bottlenecks: {e}"));
        assert_eq!((r.sent, r.received), (PMTU_BULK, PMTU_BULK));
        assert_eq!(r.verdict, format!("OK {}", Pattern::sha256_hex(seed, PMTU_BULK)));
        assert_eq!(r.received_sha256, Pattern::sha256_hex(seed.wrapping_add(1), PMTU_BULK));
        eprintln!("  stream: {} MiB each way in {:.2?}, verified", PMTU_BULK >> 20, r.elapsed);
        step(&mut t, "stream");

        let s = status(&kpf);
        let translated = counter(&s, "icmp_translated");
        let routers = [
            icmp(&topo.client_router, "OutDestUnreachs") - sent_unreach[0],
            icmp(&topo.backend_router, "OutDestUnreachs") - sent_unreach[1],
        ];
        let toward_client = route_get(server, topo.gateway_backend_addr);
        let toward_gateway = route_get(client, fe_addr);
        eprintln!(
            "  kpf icmp_translated = {translated}; routers sent fragmentation-needed: rc {}, rb {}",
            routers[0], routers[1]
        );
        eprintln!("  client: ip route get {fe_addr}: {toward_gateway}");
        eprintln!("  backend: ip route get {}: {toward_client}", topo.gateway_backend_addr);
        eprintln!(
            "  ICMP destination-unreachable received: client {}, backend {}",
            icmp(client, "InDestUnreachs"),
            icmp(server, "InDestUnreachs")
        );
        assert!(translated > 0, "kpf translated no ICMP error");
        assert!(
            routers[1] > 0,
            "rb sent no fragmentation-needed: the client -> backend direction never hit the bottleneck"
        );
        assert!(
            routers[0] > 0,
            "rc sent no fragmentation-needed: the backend -> client direction never hit the bottleneck"
        );
        let mtu = format!(" mtu {BOTTLENECK_MTU}");
        // rb's errors went to the gateway (10.100.2.1): only kpf's translation brings them to the client.
        assert!(toward_gateway.contains(&mtu), "the client did not learn the path MTU through kpf: {toward_gateway}");
        // rc's errors went to the frontend address (10.100.1.1): only kpf's translation brings
        // them to the backend.
        assert!(toward_client.contains(&mtu), "the backend did not learn the path MTU through kpf: {toward_client}");
        assert!(translated >= 2, "one translation per direction at least, got {translated}");
        for ns in [client, server] {
            assert_eq!(in_csum_errors(ns), 0, "{}: TCP segments with bad checksums", ns.name());
            assert_eq!(icmp(ns, "InCsumErrors"), 0, "{}: ICMP messages with bad checksums", ns.name());
            assert_eq!(icmp(ns, "InErrors"), 0, "{}: ICMP messages in error", ns.name());
        }
        assert_eq!(bad_counters(&s), Vec::new(), "drops or packets without a flow");
        assert_eq!(backend.problems(), Vec::<String>::new());
        drop(backend);
        let stopped = kpf.stop();
        assert!(stopped.is_clean(), "{stopped:?}");
        step(&mut t, "checked");
    }
    drop(topo);
    nothing_left();
    eprintln!("  total: {:.2?}", total.elapsed());
}

// =============================================================================================
// 4. Garbage on the control socket

const GARBAGE_REQUESTS: u64 = 2400;
/// The default seed; `KPF_GARBAGE_SEED` (decimal or 0x-hex) runs another reproducible set.
const GARBAGE_SEED: u64 = 0x6a7b_a6e5;

fn garbage_seed() -> u64 {
    match std::env::var("KPF_GARBAGE_SEED") {
        Ok(v) => v
            .strip_prefix("0x")
            .map_or_else(|| v.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
            .unwrap_or_else(|| panic!("KPF_GARBAGE_SEED={v:?} is not a number")),
        Err(_) => GARBAGE_SEED,
    }
}
const GARBAGE_THREADS: usize = 4;
/// kpf's largest request (`control::MAX_REQUEST`).
const MAX_REQUEST: usize = 1 << 20;
/// Every op the protocol knows.
const OPS: [&str; 12] = [
    "map_add",
    "map_rm",
    "map_set",
    "map_ls",
    "apply",
    "reload",
    "status",
    "flows",
    "backend_drain",
    "backend_undrain",
    "metrics",
    "down",
];

/// One malformed request: its bytes, and whether to half-close after them (else the connection
/// stays open for writing while the answer is read).
struct Garbage {
    kind: &'static str,
    bytes: Vec<u8>,
    half_close: bool,
}

/// What came back. (The payloads are for the failure messages, through Debug.)
#[derive(Debug)]
#[allow(dead_code)]
enum Outcome {
    Error(String),
    Accepted(String),
    Closed,
    Unreadable(String),
    Hung,
    NoDaemon(String),
}

/// Whether `bytes` might deserialize as a real request: JSON whose `op` (or, in the sequence
/// form serde also accepts, first element) names an op. Such text is never sent as "garbage"
/// by accident; the deliberate cases below are built to be refused.
fn might_be_request(bytes: &[u8]) -> bool {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => m.get("op").and_then(Value::as_str).is_some_and(|op| OPS.contains(&op)),
        Ok(Value::Array(a)) => a.first().and_then(Value::as_str).is_some_and(|op| OPS.contains(&op)),
        _ => false,
    }
}

struct Templates {
    /// Real requests, compact JSON (some would change things: never sent whole).
    requests: Vec<String>,
    /// The running config, for `apply` payloads made invalid on purpose.
    config: String,
}

fn pick<'a, T>(rng: &mut StdRng, v: &'a [T]) -> &'a T {
    &v[rng.random_range(0..v.len())]
}

/// A port no frontend uses.
fn free_port(rng: &mut StdRng) -> u16 {
    loop {
        let p = rng.random_range(1..=65535u16);
        if !PORTS.contains(&p) {
            return p;
        }
    }
}

fn line(v: &Value) -> Vec<u8> {
    let mut b = serde_json::to_vec(v).unwrap();
    b.push(b'\n');
    b
}

fn mutate(rng: &mut StdRng, text: &[u8]) -> Vec<u8> {
    const TOKENS: [&[u8]; 10] = [b",", b"}", b"{", b"\"", b"null", b"[", b"]", b":", b"\\", b"\\u00"];
    let mut b = text.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        if b.is_empty() {
            b.push(rng.random());
            continue;
        }
        let i = rng.random_range(0..b.len());
        match rng.random_range(0..7) {
            0 => b[i] ^= 1 << rng.random_range(0..8),
            1 => b[i] = rng.random(),
            2 => b.insert(i, rng.random()),
            3 => {
                b.remove(i);
            }
            4 => {
                let j = rng.random_range(0..b.len());
                b.swap(i, j);
            }
            5 => {
                let t = pick(rng, &TOKENS);
                b.splice(i..i, t.iter().copied());
            }
            _ => {
                if b[i].is_ascii_digit() {
                    b[i] = b'0' + rng.random_range(0..10);
                } else {
                    let end = (i + rng.random_range(1..16)).min(b.len());
                    let dup = b[i..end].to_vec();
                    b.splice(i..i, dup);
                }
            }
        }
    }
    b
}

/// Request `i` of the run seeded `seed`: the same (seed, i) always gives the same bytes. Every
/// third round of kinds, requests that end in a newline keep the connection open for writing
/// (kpf must answer on the newline alone); the others half-close after writing.
fn garbage(seed: u64, i: u64, t: &Templates) -> Garbage {
    let mut g = garbage_bytes(seed, i, t);
    if g.bytes.ends_with(b"\n") && (i / 20) % 3 == 2 {
        g.half_close = false;
    }
    g
}

fn garbage_bytes(seed: u64, i: u64, t: &Templates) -> Garbage {
    let mut rng = StdRng::seed_from_u64(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let good_backend = "10.100.0.22:39092";
    let g = |kind, bytes| Garbage { kind, bytes, half_close: true };
    match i % 20 {
        // Random bytes, with or without a final newline.
        0 | 1 => loop {
            let mut b = vec![0u8; rng.random_range(1..2048)];
            rng.fill_bytes(&mut b);
            if rng.random_bool(0.7) {
                b.retain(|&c| c != b'\n');
                b.push(b'\n');
            }
            if !might_be_request(&b) {
                break g("random bytes", b);
            }
        },
        // A real request cut short.
        2 | 3 => {
            let r = pick(&mut rng, &t.requests).as_bytes();
            let mut b = r[..rng.random_range(0..r.len())].to_vec();
            if rng.random_bool(0.7) {
                b.push(b'\n');
            }
            g("truncated request", b)
        }
        // A real request with a few bytes changed, never into something that parses as one.
        4..=6 => {
            let r = pick(&mut rng, &t.requests).clone();
            let mut tries = 0;
            loop {
                let mut b = mutate(&mut rng, r.as_bytes());
                tries += 1;
                if b.last() != Some(&b'\n') {
                    b.push(b'\n');
                }
                if !might_be_request(&b) {
                    break g("mutated request", b);
                }
                assert!(tries < 1000, "no safe mutation of {r}");
            }
        }
        // Wrong types, missing or unknown fields, duplicate keys.
        7 | 8 => {
            let cases = [
                json!({"op": "map_rm", "port": "9093"}),
                json!({"op": "map_rm", "port": -1}),
                json!({"op": "map_rm", "port": 65536}),
                json!({"op": "map_rm", "port": 9093.5}),
                json!({"op": "map_rm", "port": 9093.0}),
                json!({"op": "map_rm", "port": true}),
                json!({"op": "map_rm", "port": null}),
                json!({"op": "map_rm", "port": [9093]}),
                json!({"op": "map_rm", "port": {"n": 9093}}),
                json!({"op": "map_rm", "port": 9093, "reset": "yes"}),
                json!({"op": "map_rm", "port": 9093, "reset": 1}),
                json!({"op": "map_rm", "port": 9093, "address": "not-an-ip"}),
                json!({"op": "map_rm", "port": 9093, "address": 167772161}),
                json!({"op": "map_rm", "port": 9093, "address": "10.100.0.1/24"}),
                json!({"op": "map_rm", "port": 9093, "force": true}),
                json!({"op": "map_rm"}),
                json!({"op": "map_add", "port": 9096, "backend": 39092}),
                json!({"op": "map_add", "port": 9096, "backend": null}),
                json!({"op": "map_add", "port": 9096, "backend": [good_backend]}),
                json!({"op": "map_add", "port": 9096}),
                json!({"op": "map_add", "backend": good_backend}),
                json!({"op": "map_add", "port": 9096, "backend": good_backend, "weight": 2}),
                json!({"op": "map_set", "port": 9094, "backend": {"address": good_backend}}),
                json!({"op": "map_set", "port": 9094, "backend": "10.100.0.23:39092", "weight": 2}),
                json!({"op": "map_set", "backend": "10.100.0.23:39092"}),
                json!({"op": "flows", "port": "9093"}),
                json!({"op": "flows", "port": -5}),
                json!({"op": "flows", "port": 70000}),
                json!({"op": "backend_drain", "backend": "10.100.0.21:39092", "timeout_ms": -1}),
                json!({"op": "backend_drain", "backend": "10.100.0.21:39092", "timeout_ms": "1000"}),
                json!({"op": "backend_drain", "backend": "10.100.0.21:39092", "timeout_ms": 1.5}),
                json!({"op": "backend_drain", "backend": "10.100.0.21:39092", "timeout_ms": 1e30}),
                json!({"op": "backend_drain", "backend": "10.100.0.21:39092", "timeout": 5}),
                json!({"op": "backend_drain"}),
                json!({"op": "backend_undrain", "backend": 42}),
                json!({"op": "apply", "config": 42, "name": "x"}),
                json!({"op": "apply", "config": "", "name": 7}),
                json!({"op": "apply", "config": t.config, "name": "x", "dry_run": "false"}),
                json!({"op": "apply", "config": t.config}),
            ];
            let mut b = line(pick(&mut rng, &cases));
            if rng.random_bool(0.1) {
                // Duplicate keys: the first says something harmless, the second something else.
                b = pick(
                    &mut rng,
                    &[
                        &br#"{"op":"map_rm","port":9999,"port":9093}"#[..],
                        br#"{"op":"status","op":"down"}"#,
                        br#"{"op":"map_set","port":9094,"backend":"10.100.0.23:39092","backend":"10.100.0.21:39092"}"#,
                    ],
                )
                .to_vec();
                b.push(b'\n');
            }
            g("wrong types and fields", b)
        }
        // Ops that do not exist.
        9 => {
            let mut op = pick(
                &mut rng,
                &[
                    json!("shutdown"),
                    json!("MAP_LS"),
                    json!("Status"),
                    json!("map-ls"),
                    json!("map ls"),
                    json!("status "),
                    json!(""),
                    json!("down\u{0}"),
                    json!("reload!"),
                    json!("exec"),
                    json!("map_add2"),
                    json!("\u{e9}tat"),
                    json!(null),
                    json!(1),
                    json!(["status"]),
                    json!({"op": "status"}),
                    json!(true),
                ],
            )
            .clone();
            if rng.random_bool(0.3) {
                let len = rng.random_range(1..24);
                let s: String = (0..len).map(|_| rng.random_range(b'a'..=b'z') as char).collect();
                if !OPS.contains(&s.as_str()) {
                    op = json!(s);
                }
            }
            let v = if rng.random_bool(0.15) { json!({"OP": "status"}) } else { json!({"op": op}) };
            g("unknown op", line(&v))
        }
        // Not an object, or nested deeper than any parser should follow.
        10 => {
            let depth = rng.random_range(200..200_000);
            let b: Vec<u8> = match rng.random_range(0..10) {
                0 => b"null\n".to_vec(),
                1 => b"true\n".to_vec(),
                2 => b"-1\n".to_vec(),
                3 => b"\"status\"\n".to_vec(),
                4 => b"[]\n".to_vec(),
                5 => b"{}\n".to_vec(),
                6 => b"1e999999\n".to_vec(),
                7 => [vec![b'['; depth], vec![b']'; depth], vec![b'\n']].concat(),
                8 => [br#"{"op":"#.repeat(depth), b"1".to_vec(), vec![b'}'; depth], vec![b'\n']].concat(),
                _ => br#"[["status"]]"#.iter().copied().chain([b'\n']).collect(),
            };
            g("not an object", b)
        }
        // Requests for frontends and backends that do not exist, and additions kpf must refuse.
        11 | 12 => {
            let p = free_port(&mut rng);
            let bad_backends = [
                "",
                "x",
                "10.100.0.22",
                "10.100.0.22:0",
                "0.0.0.0:39092",
                "255.255.255.255:1",
                "127.0.0.1:39092",
                "224.0.0.1:5",
                "10.100.0.22:99999",
                "::1",
                "[::1]:39092",
                "10.100.0.22:39092:1",
                "10.100.0.1:39092",
            ];
            let v = match rng.random_range(0..11) {
                0 => json!({"op": "map_rm", "port": p, "reset": rng.random_bool(0.5)}),
                1 => json!({"op": "map_rm", "port": pick(&mut rng, &PORTS), "address": "10.100.0.1"}),
                2 => json!({"op": "map_set", "port": p, "backend": good_backend}),
                3 => json!({"op": "map_add", "port": pick(&mut rng, &PORTS), "backend": good_backend}),
                4 => json!({"op": "map_add", "port": p, "backend": pick(&mut rng, &bad_backends)}),
                5 => json!({"op": "map_add", "port": 0, "backend": good_backend}),
                6 => json!({"op": "map_add", "port": rng.random_range(kpf_tests::kpf_proc::SNAT_RANGE), "backend": good_backend}),
                7 => {
                    json!({"op": "backend_drain", "backend": format!("10.100.0.{}:39092", rng.random_range(30..=250))})
                }
                8 => json!({"op": "backend_drain", "backend": pick(&mut rng, &bad_backends), "timeout_ms": 1}),
                9 => json!({"op": "backend_undrain", "backend": "10.100.0.21:1"}),
                _ => json!({"op": "map_set", "port": pick(&mut rng, &PORTS), "backend": pick(&mut rng, &bad_backends)}),
            };
            g("nonexistent or refused target", line(&v))
        }
        // `apply` with configs that are wrong in some way (never a valid one).
        13 => {
            let c = &t.config;
            let bad = match rng.random_range(0..7) {
                0 => format!("{c}\n[[frontend]]\nport = 0\nbackends = [\"10.100.0.21:39092\"]\n"),
                1 => format!("nonsense = true\n{c}"),
                2 => format!("{c}\n[[frontend]]\nport = 9093\nbackends = [\"10.100.0.22:39092\"]\n"),
                3 => c.replacen("interfaces = [\"eth0\"]", "interfaces = []", 1),
                4 => format!("{c}\n= = =\n"),
                5 => {
                    let mut s = vec![0u8; rng.random_range(1..4096)];
                    rng.fill_bytes(&mut s);
                    String::from_utf8_lossy(&s).into_owned()
                }
                _ => format!(
                    "{}\n[[frontend]]\nport = 45000\nbackends = [\"10.100.0.21:39092\"]\n",
                    "# padding\n".repeat(80_000)
                ),
            };
            let v = json!({"op": "apply", "config": bad, "name": "fuzz.toml", "dry_run": rng.random_bool(0.5)});
            g("invalid apply", line(&v))
        }
        // Lines longer than kpf accepts, or right at the limit.
        14 => {
            let b = match rng.random_range(0..6) {
                0 => [vec![b'a'; MAX_REQUEST + rng.random_range(1..65536)], vec![b'\n']].concat(),
                1 => [
                    br#"{"op":"status","pad":""#.to_vec(),
                    vec![b'x'; MAX_REQUEST + 100_000],
                    br#""}"#.to_vec(),
                    vec![b'\n'],
                ]
                .concat(),
                2 => {
                    let mut b = vec![0u8; MAX_REQUEST + MAX_REQUEST / 2];
                    rng.fill_bytes(&mut b);
                    b
                }
                // Spaces past the limit, then a real request that must never be read.
                3 => [vec![b' '; 2 * MAX_REQUEST], br#"{"op":"down"}"#.to_vec(), vec![b'\n']].concat(),
                // Exactly at the limit (newline included) and one byte over: both refused (the
                // config is nonsense), the first by the config parser.
                n => {
                    let head = br#"{"op":"apply","name":"x","config":""#;
                    let tail = b"\"}\n";
                    let len = MAX_REQUEST + usize::from(n == 5);
                    [head.to_vec(), vec![b'x'; len - head.len() - tail.len()], tail.to_vec()].concat()
                }
            };
            g("huge line", b)
        }
        // Not UTF-8, control characters, NULs.
        15 => {
            let b: Vec<u8> = pick(
                &mut rng,
                &[
                    &b"{\"op\":\"status\"\xff\xfe}\n"[..],
                    b"{\"op\":\"st\xc3\x28atus\"}\n",
                    b"\xef\xbb\xbf{\"op\":\"status\"}\n",
                    b"\x00\x00\x00\n",
                    b"{\"op\":\"status\"}\x00\n",
                    b"{\"op\":\"sta\x00tus\"}\n",
                    b"{\"op\":\"status\"}\x1b[2J\n",
                    b"\xc0\xaf\xc0\xaf\n",
                    b"{\"op\":\"down\"\x7f}\n",
                ],
            )
            .to_vec();
            g("bad encoding", b)
        }
        // Something broken on the first line, a real request on the second: never read.
        16 => {
            let first = pick(&mut rng, &[&b""[..], b"{", b"garbage", b"{\"op\":\"shutdown\"}", b"[1,2"]).to_vec();
            let second =
                pick(&mut rng, &[&b"{\"op\":\"down\"}"[..], b"{\"op\":\"map_rm\",\"port\":9093,\"reset\":true}"])
                    .to_vec();
            g("second line", [first, b"\n".to_vec(), second, b"\n".to_vec()].concat())
        }
        // Nothing, or only whitespace.
        17 => {
            let b = pick(&mut rng, &[&b""[..], b"\n", b"   \t  \n", b"\r\n", b" "]).to_vec();
            g("empty", b)
        }
        // Read-only ops with an unknown field, and the sequence form of read-only ops: neither
        // is the protocol (one object, `deny_unknown_fields`), so both must be refused.
        18 => {
            let v = pick(
                &mut rng,
                &[
                    json!({"op": "status", "verbose": true}),
                    json!({"op": "map_ls", "x": 1}),
                    json!({"op": "metrics", "format": "json"}),
                ],
            )
            .clone();
            g("unknown field on a read-only op", line(&v))
        }
        _ => {
            let v = pick(
                &mut rng,
                &[json!(["status"]), json!(["map_ls"]), json!(["metrics"]), json!(["flows", 9093]), json!(["flows"])],
            )
            .clone();
            g("sequence instead of an object", line(&v))
        }
    }
}

/// Sends one request on its own connection and classifies the answer.
fn send_garbage(socket: &Path, req: &Garbage) -> Outcome {
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => return Outcome::NoDaemon(e.to_string()),
    };
    let wait = Duration::from_secs(20);
    let _ = stream.set_read_timeout(Some(wait));
    let _ = stream.set_write_timeout(Some(wait));
    // Large requests are written from a thread: kpf may stop reading (and answer) half way.
    let writer = if req.bytes.len() > 64 * 1024 {
        let mut w = stream.try_clone().expect("cloning a unix stream");
        let (bytes, half_close) = (req.bytes.clone(), req.half_close);
        Some(std::thread::spawn(move || {
            let _ = w.write_all(&bytes);
            if half_close {
                let _ = w.shutdown(Shutdown::Write);
            }
        }))
    } else {
        let _ = stream.write_all(&req.bytes);
        if req.half_close {
            let _ = stream.shutdown(Shutdown::Write);
        }
        None
    };
    let mut answer = Vec::new();
    let read = (&mut stream).take(4 << 20).read_to_end(&mut answer);
    let _ = stream.shutdown(Shutdown::Both);
    if let Some(w) = writer {
        let _ = w.join();
    }
    match read {
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Outcome::Hung,
        // kpf answered and closed without reading the rest of a long request: the kernel
        // reports that as a reset after the answer.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => return Outcome::Unreadable(format!("{e} after {} bytes", answer.len())),
        Ok(_) => {}
    }
    if answer.is_empty() {
        return Outcome::Closed;
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let one_line = text.strip_suffix('\n').filter(|l| !l.contains('\n'));
    match one_line.map(serde_json::from_str::<Value>) {
        Some(Ok(Value::Object(m))) if m.len() == 1 && m.get("error").is_some_and(Value::is_string) => {
            Outcome::Error(m["error"].as_str().unwrap().to_owned())
        }
        Some(Ok(Value::Object(m))) if m.len() == 1 && m.contains_key("ok") => {
            Outcome::Accepted(text.chars().take(160).collect())
        }
        _ => Outcome::Unreadable(text.chars().take(300).collect()),
    }
}

fn bpftool_dump(path: &Path) -> String {
    let out =
        Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(path).output().expect("running bpftool");
    assert!(out.status.success(), "bpftool map dump {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("bpftool prints UTF-8")
}

/// Everything garbage must not change.
#[derive(Debug, PartialEq)]
struct ControlState {
    map_ls: Value,
    frontends: Value,
    backends: Value,
    interfaces: Value,
    pid: Value,
    config_file: String,
    socket_mode: u32,
    frontends_map: String,
    config_map: String,
    backends_map: String,
    allow_map: String,
}

fn control_state(kpf: &Kpf, pins: &Path) -> ControlState {
    let s = status(kpf);
    // Traffic counters are left out: they are the kernel's, not something a request sets.
    let strip = |v: &Value| -> Value {
        let mut v = v.clone();
        for item in v.as_array_mut().into_iter().flatten() {
            if let Some(o) = item.as_object_mut() {
                for k in ["packets", "bytes", "new_flows", "live_flows"] {
                    o.remove(k);
                }
            }
        }
        v
    };
    ControlState {
        map_ls: cli_json(kpf, &["map", "ls", "--json"]),
        frontends: strip(&s["frontends"]),
        backends: strip(&s["backends"]),
        interfaces: s["interfaces"].clone(),
        pid: s["pid"].clone(),
        config_file: std::fs::read_to_string(kpf.config_path()).expect("reading kpf's config"),
        socket_mode: std::fs::metadata(kpf.socket()).expect("the control socket").permissions().mode() & 0o7777,
        frontends_map: bpftool_dump(&pins.join("maps/KPF_FRONTENDS")),
        config_map: bpftool_dump(&pins.join("maps/KPF_CONFIG")),
        backends_map: bpftool_dump(&pins.join("maps/KPF_BACKENDS")),
        allow_map: bpftool_dump(&pins.join("maps/KPF_ALLOW")),
    }
}

#[test]
fn control_socket_survives_garbage() {
    let Some(_serial) = begin("control_socket_survives_garbage") else { return };
    let total = Instant::now();
    let mut t = Instant::now();
    let topo = OneNic::new().expect("building the topology");
    {
        let backends = start_backends(&topo.backends);
        let mut pins = BpfFs::new().expect("mounting a bpffs");
        let mapping = port_mapping(&topo);
        let top = format!("snat_ports = \"{SNAT_PORTS}\"\npin_dir = {:?}\n", pins.path().display().to_string());
        let text = config(&["eth0"], &top, "", None, &mapping);
        let mut kpf = Kpf::start(&topo.gateway, &text, Mode::Native).expect("starting kpf");
        pins.down_on_drop(kpf.binary(), kpf.config_path(), kpf.socket());
        let socket = kpf.socket().to_owned();
        let seed = garbage_seed();
        let before = control_state(&kpf, pins.path());
        step(&mut t, "topology, backends, kpf ready");

        // Connections that never finish a request, open all along: they must not hold up
        // anyone else, and get the request timeout's error in the end.
        let idle_opened = Instant::now();
        let mut idle: Vec<UnixStream> = Vec::new();
        for i in 0..6 {
            let mut s = UnixStream::connect(&socket).expect("an idle connection");
            if i % 2 == 1 {
                s.write_all(br#"{"op":"sta"#).unwrap();
            }
            idle.push(s);
        }

        let templates = Templates {
            requests: [
                json!({"op": "map_add", "port": 9096, "backend": "10.100.0.22:39092"}),
                json!({"op": "map_rm", "port": 9093, "reset": true}),
                json!({"op": "map_set", "port": 9094, "backend": "10.100.0.23:39092"}),
                json!({"op": "apply", "config": text, "name": "fuzz.toml", "dry_run": false}),
                json!({"op": "backend_drain", "backend": "10.100.0.21:39092", "timeout_ms": 1000}),
                json!({"op": "backend_undrain", "backend": "10.100.0.21:39092"}),
                json!({"op": "down"}),
                json!({"op": "reload"}),
                json!({"op": "status"}),
                json!({"op": "flows", "port": 9093}),
                json!({"op": "map_ls"}),
                json!({"op": "metrics"}),
            ]
            .iter()
            .map(|v| serde_json::to_string(v).unwrap())
            .collect(),
            config: text.clone(),
        };
        // Reproducible: the same seed gives the same requests (checked on a sample).
        for i in [0, 7, 1234] {
            assert_eq!(garbage(seed, i, &templates).bytes, garbage(seed, i, &templates).bytes);
        }

        let next = AtomicU64::new(0);
        let results: Mutex<Vec<(u64, &'static str, Outcome)>> = Mutex::new(Vec::new());
        let sent_bytes = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..GARBAGE_THREADS {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= GARBAGE_REQUESTS {
                            return;
                        }
                        let req = garbage(seed, i, &templates);
                        sent_bytes.fetch_add(req.bytes.len() as u64, Ordering::Relaxed);
                        let outcome = send_garbage(&socket, &req);
                        let stop = matches!(outcome, Outcome::NoDaemon(_));
                        results.lock().unwrap().push((i, req.kind, outcome));
                        if stop {
                            next.store(GARBAGE_REQUESTS, Ordering::SeqCst);
                            return;
                        }
                    }
                });
            }
        });
        let mut results = results.into_inner().unwrap();
        results.sort_by_key(|(i, ..)| *i);
        let mut table: BTreeMap<&str, [u64; 6]> = BTreeMap::new();
        let mut examples: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        let mut wrong: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut violations = Vec::new();
        for (i, kind, o) in &results {
            let slot = match o {
                Outcome::Error(_) => 0,
                Outcome::Closed => 1,
                Outcome::Accepted(_) => 2,
                Outcome::Unreadable(_) => 3,
                Outcome::Hung => 4,
                Outcome::NoDaemon(_) => 5,
            };
            table.entry(kind).or_default()[slot] += 1;
            if let Outcome::Error(e) = o {
                let set = examples.entry(kind).or_default();
                if set.len() < 3 {
                    set.insert(e.chars().take(110).collect());
                }
            }
            if slot >= 2 {
                let req = garbage(seed, *i, &templates);
                let shown: String = String::from_utf8_lossy(&req.bytes).chars().take(80).collect();
                wrong.entry(kind).or_default().push(format!("#{i} {shown:?}: {o:?}"));
            }
        }
        for (kind, list) in &wrong {
            let shown: Vec<&String> = list.iter().take(4).collect();
            violations.push(format!(
                "{} x {kind}, e.g.\n      {}",
                list.len(),
                shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n      ")
            ));
        }
        eprintln!(
            "  {} requests ({} MB), seed {seed:#x}, {GARBAGE_THREADS} at a time:",
            results.len(),
            sent_bytes.load(Ordering::Relaxed) / 1_000_000
        );
        eprintln!(
            "    {:<34} {:>6} {:>6} {:>8} {:>10} {:>5} {:>9}",
            "kind", "error", "closed", "ACCEPTED", "unreadable", "hung", "no daemon"
        );
        for (k, c) in &table {
            eprintln!("    {k:<34} {:>6} {:>6} {:>8} {:>10} {:>5} {:>9}", c[0], c[1], c[2], c[3], c[4], c[5]);
        }
        eprintln!("  example errors:");
        for (k, set) in &examples {
            for e in set {
                eprintln!("    {k}: {e}");
            }
        }
        step(&mut t, "garbage sent");

        // The idle connections: refused after kpf's request timeout, without blocking anyone.
        for (i, mut s) in idle.into_iter().enumerate() {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut answer = String::new();
            let r = s.read_to_string(&mut answer);
            let waited = idle_opened.elapsed();
            let ok = r.is_ok() && answer.contains("\"error\"") && answer.contains("no request within");
            if !ok {
                violations.push(format!("idle connection {i}: {r:?} {answer:?} after {waited:.2?}"));
            }
        }
        eprintln!("  idle connections answered with the request timeout's error after {:.2?}", idle_opened.elapsed());

        // The daemon is alive, the same process, answering, with nothing changed.
        assert!(!kpf.has_exited(), "kpf exited during the garbage run; its log:\n{}", kpf.log());
        let after = control_state(&kpf, pins.path());
        assert_eq!(before, after, "garbage changed kpf's state");
        for (&port, id) in PORTS.iter().zip(BACKEND_NAMES) {
            let fe = SocketAddr::V4(SocketAddrV4::new(topo.gateway_addr, port));
            let got = in_ns(&topo.client, || peer::who(fe)).unwrap_or_else(|e| panic!("who via {port}: {e}"));
            assert_eq!(got, id);
        }
        let log = kpf.log();
        assert!(!log.contains("panicked"), "kpf panicked:\n{log}");
        step(&mut t, "daemon alive, state unchanged, still forwarding");

        // Last, the requests that would end the daemon if it accepted them (so nothing comes
        // after them): `down` with an unknown field, and in sequence form.
        for probe in [&br#"{"op":"down","junk":1}"#[..], br#"["down"]"#] {
            let req = Garbage { kind: "down, malformed", bytes: [probe, b"\n"].concat(), half_close: true };
            let o = send_garbage(&socket, &req);
            let alive =
                !kpf.has_exited() && KpfCli::new(kpf.binary(), &socket).run(&["status"]).is_ok_and(|o| o.success());
            eprintln!("  {}: {o:?}; daemon still up: {alive}", String::from_utf8_lossy(probe));
            if !matches!(o, Outcome::Error(_)) || !alive {
                violations.push(format!("{}: {o:?}, daemon still up: {alive}", String::from_utf8_lossy(probe)));
            }
            if !alive {
                break;
            }
        }

        for b in &backends {
            assert_eq!(b.problems(), Vec::<String>::new(), "{} had problems", b.identity());
        }
        drop(backends);
        let stopped = kpf.stop();
        assert!(!stopped.log.contains("panicked"), "kpf panicked:\n{}", stopped.log);
        assert!(
            violations.is_empty(),
            "requests not answered with an error or a closed connection ({} kind(s)):\n  {}",
            violations.len(),
            violations.join("\n  ")
        );
        assert!(stopped.is_clean(), "{stopped:?}");
        drop(pins);
    }
    drop(topo);
    nothing_left();
    eprintln!("  total: {:.2?}", total.elapsed());
}

// =============================================================================================
// 5. Without rights

const NOBODY: u32 = 65534;

/// A directory removed (with its contents) on drop, mode 0755, owned by root.
struct TempDir(PathBuf);

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "kpf-hardening-{tag}-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating a temp dir");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `kpf run --config FILE` as uid/gid 65534 in `ns`, killed if it runs longer than 20 s.
fn run_as_nobody(ns: &Netns, binary: &Path, config: &Path) -> CliOutput {
    let (reuid, regid) = (format!("--reuid={NOBODY}"), format!("--regid={NOBODY}"));
    let mut cmd = ns.command("setpriv");
    cmd.args([reuid.as_str(), regid.as_str(), "--clear-groups"])
        .arg(binary)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("starting kpf run as nobody");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("waiting for kpf").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("kpf's output");
    CliOutput {
        command: format!("setpriv --reuid={NOBODY} kpf run --config {}", config.display()),
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// How a refusal differs from what it must be: a non-zero exit, one `kpf: ` line on stderr with
/// every `want`, no panic or backtrace, nothing on stdout.
fn refusal_problems(out: &CliOutput, wants: &[&str]) -> Vec<String> {
    let mut p = Vec::new();
    if out.status.success() || out.code().is_none() {
        p.push(format!("exit status {}", out.status));
    }
    let err = out.stderr.trim_end_matches('\n');
    if err.lines().count() != 1 || !err.starts_with("kpf: ") {
        p.push("stderr is not one `kpf: ...` line".into());
    }
    for w in wants {
        if !err.contains(w) {
            p.push(format!("stderr lacks {w:?}"));
        }
    }
    if err.contains("panicked") || err.contains("backtrace") || err.contains("RUST_BACKTRACE") {
        p.push("a panic".into());
    }
    if !out.stdout.is_empty() {
        p.push("output on stdout".into());
    }
    p
}

/// The listening sockets of `proto` (`t` or `u`) in `ns` that belong to process `pid` or to
/// anything named kpf.
fn kpf_listening(ns: &Netns, proto: &str, pid: u32) -> Vec<String> {
    let out = ns.run("ss", &[&format!("-Hl{proto}np")]).expect("ss in the gateway");
    out.lines().filter(|l| l.contains(&format!("pid={pid},")) || l.contains("\"kpf\"")).map(str::to_owned).collect()
}

#[test]
fn refuses_without_rights() {
    let Some(_serial) = begin("refuses_without_rights") else { return };
    let total = Instant::now();
    let mut t = Instant::now();
    let topo = OneNic::new().expect("building the topology");
    let binary = kpf_binary().expect("the kpf binary");
    let mut problems: Vec<String> = Vec::new();
    {
        let backends = start_backends(&topo.backends);
        let mapping = port_mapping(&topo);
        let text = config(&["eth0"], &format!("snat_ports = \"{SNAT_PORTS}\"\n"), "", None, &mapping);
        let kpf = Kpf::start(&topo.gateway, &text, Mode::Native).expect("starting kpf");
        let pid = kpf.pid().unwrap();
        let cli = KpfCli::new(&binary, kpf.socket());
        step(&mut t, "topology, backends, kpf ready");

        // No metrics_addr: no TCP (nor UDP) socket of kpf's listens in the gateway.
        let tcp = kpf_listening(&topo.gateway, "t", pid);
        let udp = kpf_listening(&topo.gateway, "u", pid);
        eprintln!("  kpf's listening sockets without metrics_addr: tcp {tcp:?}, udp {udp:?}");
        assert!(tcp.is_empty(), "kpf listens on TCP without metrics_addr: {tcp:?}");
        assert!(udp.is_empty(), "kpf has UDP sockets open without being asked: {udp:?}");

        // A change as uid 65534 through the root-only socket: permission denied, nothing changes.
        let ls = cli.json(&["map", "ls", "--json"]).expect("map ls");
        let out = cli.run_as(NOBODY, &["map", "add", "9096", "10.100.0.22:39092"]).unwrap();
        eprintln!("  map add as {NOBODY}: {} {:?}", out.status, out.stderr.trim_end());
        let p = refusal_problems(&out, &["permission denied"]);
        assert!(p.is_empty(), "{}:\n{out}", p.join("; "));
        assert_eq!(out.code(), Some(1), "{out}");
        assert_eq!(cli.json(&["map", "ls", "--json"]).unwrap(), ls, "map add as {NOBODY} changed the mappings");

        // `kpf run` as uid 65534: refused with one line saying root is needed, however the
        // config's socket and pin directory are set, and leaving nothing behind.
        let dir = TempDir::new("nobody");
        let variants: Vec<(&str, PathBuf)> = vec![
            // The default layout on a fresh host: /run/kpf does not exist yet, its parent is root's.
            ("socket directory not there yet", dir.0.join("run/kpf/kpf.sock")),
            // The socket of the kpf already running (root's, 0600).
            ("the running kpf's socket", kpf.socket().to_owned()),
            // A directory anyone may write to (like /tmp).
            ("socket in a world-writable directory", dir.0.join("tmp/kpf.sock")),
            // Another root daemon's live socket (0600) in a directory anyone may write to
            // (without the sticky bit): it must survive.
            ("a root daemon's socket in a writable directory", dir.0.join("shared/kpf.sock")),
        ];
        std::fs::create_dir_all(dir.0.join("tmp")).unwrap();
        std::fs::set_permissions(dir.0.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::create_dir_all(dir.0.join("shared")).unwrap();
        std::fs::set_permissions(dir.0.join("shared"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let shared_socket = dir.0.join("shared/kpf.sock");
        let _root_daemon = std::os::unix::net::UnixListener::bind(&shared_socket).expect("a root-owned socket");
        std::fs::set_permissions(&shared_socket, std::fs::Permissions::from_mode(0o600)).unwrap();
        for (n, (what, sock)) in variants.iter().enumerate() {
            let file = dir.0.join(format!("kpf-{n}.toml"));
            let c = format!(
                "socket = {:?}\npin_dir = {:?}\n{text}",
                sock.display().to_string(),
                dir.0.join("pins").display().to_string()
            );
            std::fs::write(&file, c).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
            let out = run_as_nobody(&topo.gateway, &binary, &file);
            eprintln!("  kpf run as {NOBODY} ({what}): {} {:?}", out.status, out.stderr.trim_end());
            let p = refusal_problems(&out, &["needs root"]);
            if !p.is_empty() {
                problems.push(format!("kpf run as {NOBODY} ({what}): {}:\n{out}", p.join("; ")));
            }
            let preexisting = sock.as_path() == kpf.socket() || *sock == shared_socket;
            if !preexisting && sock.exists() {
                problems.push(format!("kpf run as {NOBODY} ({what}) left {} behind", sock.display()));
            }
            if preexisting && UnixStream::connect(sock).is_err() {
                problems.push(format!("kpf run as {NOBODY} ({what}) removed the live socket {}", sock.display()));
            }
        }
        // Nothing happened to the running daemon, its socket or the gateway.
        let st = cli.json(&["status", "--json"]).expect("the running kpf still answers");
        assert_eq!(st["pid"], json!(pid));
        assert!(!dir.0.join("pins").exists(), "kpf run as {NOBODY} created the pin directory");
        let tcp = kpf_listening(&topo.gateway, "t", pid);
        assert!(tcp.is_empty(), "{tcp:?}");
        let fe = SocketAddr::V4(SocketAddrV4::new(topo.gateway_addr, 9093));
        assert_eq!(in_ns(&topo.client, || peer::who(fe)).expect("who via 9093"), "b1");
        step(&mut t, "refusals");

        // The control for the listening check: with metrics_addr, ss does show kpf's port.
        let stopped = kpf.stop();
        assert!(stopped.status.success() && stopped.down_failed.is_none(), "{stopped:?}");
        let with_metrics =
            text.replacen("manage_sysctls = true\n", "manage_sysctls = true\nmetrics_addr = \"127.0.0.1:9464\"\n", 1);
        let kpf = Kpf::start(&topo.gateway, &with_metrics, Mode::Native).expect("starting kpf with metrics_addr");
        let tcp = kpf_listening(&topo.gateway, "t", kpf.pid().unwrap());
        eprintln!("  with metrics_addr: {tcp:?}");
        assert!(tcp.len() == 1 && tcp[0].contains("127.0.0.1:9464"), "with metrics_addr, ss shows kpf's port: {tcp:?}");
        let stopped = kpf.stop();
        assert!(stopped.status.success() && stopped.down_failed.is_none(), "{stopped:?}");
        for b in &backends {
            assert_eq!(b.problems(), Vec::<String>::new(), "{} had problems", b.identity());
        }
        step(&mut t, "control: metrics_addr listens");
    }
    drop(topo);
    nothing_left();
    eprintln!("  total: {:.2?}", total.elapsed());
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}
