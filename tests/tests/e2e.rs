//! End-to-end: kpf forwarding real TCP between namespaces, in both topologies and every attach
//! mode (native XDP, generic XDP, tc).
//!
//! Run as root, after `cargo build --release -p kpf`:
//! `cargo test --release -p kpf-tests --test e2e -- --test-threads=1`
//!
//! Checksum honesty: the veths of the client and the backends have rx and tx checksum offload
//! off (the gateway interfaces and bridge ports rx off), see `topology.rs`. So every endpoint
//! computes its checksums in software and every receiver verifies each one in software; nothing
//! is marked "already verified" or left to "hardware". A segment kpf rewrote with a wrong
//! checksum would be dropped and counted in the receiver's `Tcp InCsumErrors`, so the test
//! asserts that counter stays 0 in the client and every backend, and first proves the counter
//! works there by sending a segment with a deliberately wrong checksum and watching it rise.
//!
//! In the socket-buffer modes (tc and generic XDP) the endpoints send with checksum and
//! segmentation offload instead (see `topology::sender_offloads`): kpf then rewrites 64 KB
//! CHECKSUM_PARTIAL aggregates, and short CHECKSUM_PARTIAL segments (requests, ACKs, the
//! handshake). In tc mode the gateway's `tx off` interfaces complete every checksum in software
//! from what kpf left; generic XDP transmits past that step, so there the switch's `tx off`
//! ports do it (`topology::switch_completes_checksums`). Either way a wrong update of either
//! kind shows up as InCsumErrors at the receivers.

use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use kpf_tests::{
    wait,
    kpf_proc::{self, Kpf, Mode},
    netns::{self, Netns},
    peer::{self, Backend, Pattern, Session},
    topology::{self, BACKEND_NAMES, BACKEND_PORT, OneNic, Topology, TwoNic},
};
use rand::{Rng, RngCore};

/// The frontend ports, mapped to b1, b2, b3 in order.
const PORTS: [u16; 3] = [9093, 9094, 9095];
/// Bytes each way in the bulk transfer (134 MB).
const BULK: u64 = 128 << 20;
/// Concurrent connections per frontend port (210 in all).
const PER_PORT: usize = 70;

fn in_csum_errors(ns: &Netns) -> i64 {
    ns.snmp("Tcp", "InCsumErrors").expect("reading /proc/net/snmp")
}

fn step(t: &mut Instant, what: &str) {
    eprintln!("  {what}: {:.2?}", t.elapsed());
    *t = Instant::now();
}

fn e2e<T: Topology + Sync>(build: fn() -> io::Result<T>, mode: Mode) {
    let Some(_serial) = kpf_tests::serial::begin(&format!("e2e {mode}")) else { return };
    let total = Instant::now();
    let mut t = Instant::now();

    let topo = build().expect("building the topology");
    if mode == Mode::Generic {
        topology::switch_completes_checksums(&topo).expect("making the switch complete checksums");
    }
    if mode == Mode::Generic && topo.gateway_interfaces().len() > 1 {
        // Generic XDP cannot redirect an aggregate to another interface: the kernel drops every
        // packet longer than the target's MTU there (README, "Checksums").
        topology::sender_checksum_offload(&topo).expect("turning the senders' checksum offload on");
    } else if matches!(mode, Mode::Tc | Mode::Generic) {
        topology::sender_offloads(&topo).expect("turning the senders' offloads on");
    }
    eprintln!("{} / {mode}:", topo.name());
    step(&mut t, "topology");
    {
        let backends: Vec<Backend> = topo
            .backends()
            .iter()
            .zip(BACKEND_NAMES)
            .map(|(ns, id)| Backend::new(ns, id).expect("starting a backend"))
            .collect();
        let fe = |port: u16| SocketAddr::V4(SocketAddrV4::new(topo.frontend_addr(), port));
        let frontends: Vec<(SocketAddrV4, SocketAddrV4)> = PORTS
            .iter()
            .zip(topo.backend_addrs())
            .map(|(&p, &b)| (SocketAddrV4::new(topo.frontend_addr(), p), SocketAddrV4::new(b, BACKEND_PORT)))
            .collect();
        let config = kpf_proc::config_toml(topo.gateway_interfaces(), mode, &frontends);
        // Generic XDP across two interfaces with GRO on would drop the aggregates: kpf says so.
        let warn_gro = mode == Mode::Generic && topo.gateway_interfaces().len() > 1;
        let backend_side = *topo.gateway_interfaces().last().expect("a gateway interface");
        if warn_gro {
            topo.gateway().ethtool_k(backend_side, &["gro", "on"]).expect("turning GRO on");
        }
        let kpf = Kpf::start(topo.gateway(), &config, mode).expect("starting kpf");
        if warn_gro {
            let log = kpf.log();
            assert!(log.contains(&format!("{backend_side}: GRO is on")), "no warning about GRO: {log}");
            assert_eq!(log.matches("GRO is on").count(), 1, "only {backend_side} has GRO on: {log}");
            topo.gateway().ethtool_k(backend_side, &["gro", "off"]).expect("turning GRO off");
        }
        step(&mut t, "backends and kpf ready");

        let client = topo.client();
        let receivers: Vec<&Netns> = std::iter::once(client).chain(topo.backends()).collect();
        for ns in &receivers {
            assert_eq!(in_csum_errors(ns), 0, "{}: InCsumErrors before any traffic", ns.name());
        }

        // Each port reaches its own backend.
        for (&port, id) in PORTS.iter().zip(BACKEND_NAMES) {
            let got = client.enter(|| peer::who(fe(port))).unwrap().unwrap_or_else(|e| panic!("who via {port}: {e}"));
            assert_eq!(got, id, "port {port} must reach {id}");
        }
        step(&mut t, "who on each port");

        // Bulk, both directions at once, every byte checked on both sides.
        let seed: u64 = rand::rng().random();
        let r = client
            .enter(|| peer::stream(fe(9094), seed, BULK))
            .unwrap()
            .unwrap_or_else(|e| panic!("bulk stream via 9094: {e}"));
        assert_eq!(r.identity, "b2");
        assert_eq!((r.sent, r.received), (BULK, BULK));
        let sent_hash = Pattern::sha256_hex(seed, BULK);
        assert_eq!(r.sent_sha256, sent_hash);
        assert_eq!(r.verdict, format!("OK {sent_hash}"), "backend's verdict on what it received");
        assert_eq!(r.received_sha256, Pattern::sha256_hex(seed.wrapping_add(1), BULK));
        eprintln!(
            "  bulk: {} MB each way in {:.2?} ({:.2} Gbit/s each way)",
            BULK / 1_000_000,
            r.elapsed,
            r.gbit_per_s()
        );
        step(&mut t, "bulk");

        // Many connections open at once, each reaching the backend its port maps to.
        client
            .enter(|| -> io::Result<()> {
                let mut sessions = Vec::with_capacity(PER_PORT * PORTS.len());
                for _ in 0..PER_PORT {
                    for (&port, id) in PORTS.iter().zip(BACKEND_NAMES) {
                        sessions.push((port, id, Session::connect(fe(port))?));
                    }
                }
                for (port, id, s) in &mut sessions {
                    let local = s.local_addr()?;
                    let got = s.identity()?;
                    assert_eq!(got, *id, "connection {local} via port {port}");
                }
                for b in &backends {
                    assert!(
                        b.open_connections() >= PER_PORT,
                        "{} serves {} connections at once, expected at least {PER_PORT}",
                        b.identity(),
                        b.open_connections()
                    );
                }
                let mut rng = rand::rng();
                for (port, id, s) in sessions {
                    let mut payload = vec![0u8; rng.random_range(1..=4096)];
                    rng.fill_bytes(&mut payload);
                    s.echo(&payload).map_err(|e| io::Error::new(e.kind(), format!("echo via {port} to {id}: {e}")))?;
                }
                Ok(())
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("concurrent connections: {e}"));
        step(&mut t, &format!("{} concurrent connections", PER_PORT * PORTS.len()));

        // No receiver saw a bad checksum...
        for ns in &receivers {
            assert_eq!(in_csum_errors(ns), 0, "{}: TCP segments with bad checksums arrived", ns.name());
        }
        // ...and the counter does count: a deliberately broken segment to b1 raises it.
        let b1 = &topo.backends()[0];
        let src = SocketAddrV4::new(topo.client_addr(), 12345);
        let dst = SocketAddrV4::new(topo.backend_addrs()[0], BACKEND_PORT);
        client.enter(|| peer::send_bad_checksum_syn(src, dst)).unwrap().expect("sending the bad segment");
        wait::poll(Duration::from_secs(5), Duration::from_millis(10), &format!("{}: InCsumErrors to count a bad checksum", b1.name()), || {
            (in_csum_errors(b1) > 0).then_some(())
        });
        assert_eq!(in_csum_errors(b1), 1, "exactly the one broken segment");
        step(&mut t, "checksum counters");

        for b in &backends {
            assert_eq!(b.problems(), Vec::<String>::new(), "{} had problems", b.identity());
        }
        drop(backends);

        let stopped = kpf.stop();
        eprintln!("  kpf log:\n{}", stopped.log.trim_end().lines().map(|l| format!("    {l}\n")).collect::<String>());
        assert!(
            stopped.is_clean(),
            "kpf did not stop cleanly: {stopped:?}"
        );
        // `kpf down` detaches: no XDP program may be left on the gateway's interfaces...
        for dev in topo.gateway_interfaces() {
            let link = topo.gateway().ip(&["-d", "link", "show", "dev", dev]).expect("ip link show");
            assert!(!link.contains("prog/xdp"), "XDP still attached to the gateway's {dev} after kpf stopped:\n{link}");
        }
        // ...nor any tc program: the frontend port is the gateway's own again, where nothing
        // listens.
        let refused = client.enter(|| peer::who(fe(PORTS[0]))).unwrap();
        assert!(
            matches!(&refused, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused),
            "port {} after kpf stopped: {refused:?}",
            PORTS[0]
        );
        let counters = kpf_proc::counters(&stopped.log).expect("kpf logs its counters when it stops");
        let drops: Vec<_> = counters.iter().filter(|(k, v)| k.starts_with("drop_") && **v > 0).collect();
        assert!(drops.is_empty(), "kpf dropped packets: {drops:?}");
        let connections = 3 + 1 + PER_PORT * PORTS.len();
        assert_eq!(counters.get("new_flows").copied(), Some(connections as u64), "one flow per connection");
        let stats = kpf_proc::frontend_stats(&stopped.log);
        for (i, port) in PORTS.iter().enumerate() {
            let label = format!("{}:{port}", topo.frontend_addr());
            let s = stats.get(&label).unwrap_or_else(|| panic!("no stats for frontend {label}"));
            let flows = 1 + PER_PORT + usize::from(i == 1);
            assert_eq!(s.new_flows, flows as u64, "{label}");
            if i == 1 {
                assert!(s.bytes >= 2 * BULK, "{label} forwarded {} bytes, less than the bulk transfer", s.bytes);
            }
        }
        step(&mut t, "kpf stopped");
    }

    let names: Vec<String> = topo.namespaces().iter().map(|n| n.name().to_owned()).collect();
    drop(topo);
    let left = netns::own_namespaces().expect("listing namespaces");
    assert!(left.is_empty(), "namespaces left behind: {left:?} (this topology had {names:?})");
    eprintln!("  total: {:.2?}", total.elapsed());
}

#[test]
fn one_nic_native() {
    e2e(OneNic::new, Mode::Native);
}

#[test]
fn one_nic_generic() {
    e2e(OneNic::new, Mode::Generic);
}

#[test]
fn two_nic_native() {
    e2e(TwoNic::new, Mode::Native);
}

#[test]
fn two_nic_generic() {
    e2e(TwoNic::new, Mode::Generic);
}

#[test]
fn one_nic_tc() {
    e2e(OneNic::new, Mode::Tc);
}

#[test]
fn two_nic_tc() {
    e2e(TwoNic::new, Mode::Tc);
}
