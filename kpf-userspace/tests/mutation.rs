//! A million mutated packets through each real program, XDP and tc (BPF_PROG_TEST_RUN), checking
//! invariants after each one:
//!
//! 1. a forwarded packet never gets a checksum error from kpf: its IPv4 header, TCP and ICMP
//!    checksums are valid after the rewrite exactly when they were valid before (kpf does not
//!    verify TCP payload checksums, as no router does; it never turns a good one bad);
//! 2. nothing is forwarded unless it belongs to a tracked connection, opens one (a SYN to a
//!    mapped frontend), or is an ICMP error about one;
//! 3. no connection is created by anything but a SYN (SYN set; ACK, FIN, RST clear) to a mapped
//!    frontend port.
//!
//! Seeded and reproducible (pinned to one CPU, so the kernel's LRU eviction repeats too):
//! `KPF_MUTATION_SEED` (default fixed), `KPF_MUTATION_RUNS` (default 1,000,000). A violation
//! prints the seed, the iteration and both frames in hex.

mod fixture_support;

use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use fixture_support::{ACK, Action, Attach, Conn, FIN, PSH, RST, SNAT_MAX, SNAT_MIN, SYN, Side, Topology, Tcp4, l3_offset};
use kpf_tests::serial::is_root;
use kpf_common::{Counter, FlowKey, csum, wire};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

// Verdicts as the harness reports them, tc runs included (as patterns for `match`).
const XDP_DROP: u32 = Action::Drop as u32;
const XDP_PASS: u32 = Action::Pass as u32;
const XDP_TX: u32 = Action::Tx as u32;
const XDP_REDIRECT: u32 = Action::Redirect as u32;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What the invariants need to know about a frame, parsed independently of kpf.
struct View {
    ip_ok: bool,
    /// (src, sport, dst, dport, flags) of a TCP segment.
    tcp: Option<(Ipv4Addr, u16, Ipv4Addr, u16, u8)>,
    tcp_sum_ok: bool,
    /// The quoted 4-tuple of an ICMP error, and whether the ICMP checksum is right.
    icmp: Option<((Ipv4Addr, u16, Ipv4Addr, u16), bool)>,
}

fn view(frame: &[u8]) -> Option<View> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(NetSlice::Ipv4(ip)) = &p.net else { return None };
    let h = ip.header();
    let hdr = h.slice();
    let ip_ok = csum::fold(csum::sum(hdr, 0)) == 0xffff;
    let (src, dst) = (h.source_addr(), h.destination_addr());
    let payload = ip.payload().payload;
    let mut v = View { ip_ok, tcp: None, tcp_sum_ok: false, icmp: None };
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let flags = t.slice()[13];
            v.tcp = Some((src, t.source_port(), dst, t.destination_port(), flags));
            let pseudo = csum::pseudo_header(src.octets(), dst.octets(), 6, payload.len() as u16) as u32;
            v.tcp_sum_ok = csum::fold(csum::sum(payload, pseudo)) == 0xffff;
        }
        Some(TransportSlice::Icmpv4(_)) | None if h.protocol().0 == 1 && payload.len() >= 8 + 20 + 4 => {
            let ok = csum::fold(csum::sum(payload, 0)) == 0xffff;
            let q = &payload[8..];
            let ihl = ((q[0] & 0x0f) as usize) * 4;
            if q.len() >= ihl + 4 && q[9] == 6 {
                let a = |o: usize| Ipv4Addr::new(q[o], q[o + 1], q[o + 2], q[o + 3]);
                let port = |o: usize| u16::from_be_bytes([q[ihl + o], q[ihl + o + 1]]);
                v.icmp = Some(((a(12), port(0), a(16), port(2)), ok));
            }
        }
        _ => {}
    }
    Some(v)
}

/// Recomputes the IPv4 and TCP (or ICMP) checksums of a frame that still parses, so the run also
/// covers well-formed but odd packets, not only ones already carrying checksum errors.
fn fix_checksums(frame: &mut [u8]) {
    let l3 = l3_offset(frame);
    if frame.len() < l3 + 20 || frame[l3] >> 4 != 4 {
        return;
    }
    let ihl = ((frame[l3] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]) as usize;
    if ihl < 20 || frame.len() < l3 + ihl || total < ihl || frame.len() < l3 + total {
        return;
    }
    let c = csum::ipv4_header(&frame[l3..l3 + ihl]);
    frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_ne_bytes());
    let (src, dst) = ([frame[l3 + 12], frame[l3 + 13], frame[l3 + 14], frame[l3 + 15]], [frame[l3 + 16], frame[l3 + 17], frame[l3 + 18], frame[l3 + 19]]);
    let seg = l3 + ihl..l3 + total;
    match frame[l3 + 9] {
        6 if seg.len() >= 20 => {
            let c = csum::transport(src, dst, 6, &frame[seg.clone()], 16);
            frame[seg.start + 16..seg.start + 18].copy_from_slice(&c.to_ne_bytes());
        }
        1 if seg.len() >= 8 => {
            frame[seg.start + 2..seg.start + 4].copy_from_slice(&[0, 0]);
            let c = !csum::fold(csum::sum(&frame[seg.clone()], 0));
            frame[seg.start + 2..seg.start + 4].copy_from_slice(&c.to_ne_bytes());
        }
        _ => {}
    }
}

fn mutate(rng: &mut StdRng, f: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..=3) {
        let l3 = l3_offset(f);
        match rng.random_range(0..10) {
            // A bit flip, mostly in the headers.
            0..=2 if !f.is_empty() => {
                let at = if rng.random_bool(0.8) { rng.random_range(0..f.len().min(80)) } else { rng.random_range(0..f.len()) };
                f[at] ^= 1 << rng.random_range(0..8);
            }
            3 if !f.is_empty() => {
                let at = rng.random_range(0..f.len());
                f[at] = rng.random();
            }
            4 => {
                let n = rng.random_range(0..=f.len());
                f.truncate(n);
            }
            5 => {
                let n = rng.random_range(1..64);
                f.extend((0..n).map(|_| rng.random::<u8>()));
            }
            // IHL, total length, protocol, fragment bits.
            6 if f.len() > l3 + 20 => match rng.random_range(0..4) {
                0 => f[l3] = 0x40 | rng.random_range(0..16),
                1 => f[l3 + 2..l3 + 4].copy_from_slice(&rng.random::<u16>().to_be_bytes()),
                2 => f[l3 + 9] = *[1u8, 6, 17, 0, 255].choose(rng).unwrap(),
                _ => f[l3 + 6] ^= *[0x20u8, 0x1f, 0x40, 0x80].choose(rng).unwrap(),
            },
            // TCP data offset and flags.
            7 if f.len() > l3 + 20 + 14 => {
                let l4 = l3 + ((f[l3] & 0x0f) as usize) * 4;
                if f.len() > l4 + 13 {
                    if rng.random_bool(0.5) {
                        f[l4 + 12] = rng.random_range(0..16u8) << 4;
                    } else {
                        f[l4 + 13] = *[SYN, SYN | ACK, SYN | FIN, SYN | RST, ACK, ACK | PSH, FIN | ACK, RST, 0, 0xff].choose(rng).unwrap();
                    }
                }
            }
            // Ports.
            8 if f.len() > l3 + 24 => {
                let l4 = l3 + ((f[l3] & 0x0f) as usize) * 4;
                if f.len() > l4 + 4 {
                    let at = l4 + if rng.random_bool(0.5) { 0 } else { 2 };
                    let port: u16 = *[9093u16, 9094, 9095, 9099, 22, 40000, 59999, 0, rng.random()].choose(rng).unwrap();
                    f[at..at + 2].copy_from_slice(&port.to_be_bytes());
                }
            }
            // An 802.1Q tag.
            _ if f.len() >= 14 && l3 == 14 => {
                let vid: u16 = rng.random_range(1..4095);
                let mut tag = vec![0x81, 0x00];
                tag.extend_from_slice(&vid.to_be_bytes());
                f.splice(12..12, tag);
            }
            _ => {}
        }
    }
    if rng.random_bool(0.5) {
        fix_checksums(f);
    }
}

/// A quoted TCP/IPv4 header inside an ICMP "fragmentation needed" error about `quoted`.
fn icmp_error(src_mac: [u8; 6], dst_mac: [u8; 6], from: Ipv4Addr, to: Ipv4Addr, quoted: &Tcp4) -> Vec<u8> {
    let q = quoted.bytes();
    let l3 = l3_offset(&q);
    let inner = &q[l3..(l3 + 20 + 20).min(q.len())];
    let mut icmp = vec![3u8, 4, 0, 0, 0, 0, 0x04, 0xb0];
    icmp.extend_from_slice(inner);
    let c = !csum::fold(csum::sum(&icmp, 0));
    icmp[2..4].copy_from_slice(&c.to_ne_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
    ip[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&to.octets());
    let c = csum::ipv4_header(&ip);
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

#[test]
fn a_million_mutated_packets_keep_the_invariants() {
    mutations_through(Attach::Xdp);
}

/// The same through the tc program (its verdicts mapped onto XDP's by the harness).
#[test]
fn a_million_mutated_packets_keep_the_invariants_in_tc() {
    mutations_through(Attach::Tc);
}

fn mutations_through(attach: Attach) {
    if !is_root() {
        eprintln!("skipped: needs root (BPF and network namespaces)");
        return;
    }
    let seed = env_u64("KPF_MUTATION_SEED", 0x6b70_6631);
    let runs = env_u64("KPF_MUTATION_RUNS", 1_000_000);
    let topo = Topology::new().expect("fixture topology");
    let report = topo
        .run_at(attach, |h| {
            // One CPU: the kernel's LRU tables keep per-CPU lists, so this makes a run (and any
            // failure) repeat exactly for the same seed.
            // SAFETY: a zeroed cpu_set_t is empty; we add CPU 0 and apply it to this thread.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(0, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
            // Three established connections to draw established and reply packets from.
            let conns = [Conn::to_a("M1", 61001), Conn::to_b("M2", 61002), Conn::to_a("M3", 61003)];
            let mut snat = Vec::new();
            for c in &conns {
                let cif = h.ifaces.of(Side::Client);
                let bif = h.ifaces.of(c.backend_side);
                h.run_packet(cif, 0, &c.c2f(SYN).bytes(), 1).expect("SYN");
                let f = h.dp.flow(&c.client_key()).expect("flow lookup").expect("the SYN opened a flow");
                let port = wire::to_port(f.nat.src_port);
                snat.push(port);
                let syn_ack = Tcp4::new(c.backend_mac, c.gw_mac, c.backend, SocketAddrV4::new(c.gw_addr, port), SYN | ACK)
                    .with(|p| p.ack = 1001);
                h.run_packet(bif, 0, &syn_ack.bytes(), 1).expect("SYN-ACK");
                h.run_packet(cif, 0, &c.c2f(ACK).with(|p| p.seq = 1001).bytes(), 1).expect("ACK");
            }
            // The base frames mutations start from: (name, ingress side, frame).
            let mut bases: Vec<(String, Side, Vec<u8>)> = Vec::new();
            for (c, port) in conns.iter().zip(&snat) {
                let gw = SocketAddrV4::new(c.gw_addr, *port);
                bases.push((format!("{} SYN", c.name), Side::Client, c.c2f(SYN).bytes()));
                let data = c.c2f(ACK | PSH).with(|p| p.payload = (0..200u8).collect());
                bases.push((format!("{} data", c.name), Side::Client, data.bytes()));
                let reply = Tcp4::new(c.backend_mac, c.gw_mac, c.backend, gw, ACK | PSH).with(|p| p.payload = vec![7; 100]);
                bases.push((format!("{} reply", c.name), c.backend_side, reply.bytes()));
                let sent = Tcp4::new(c.gw_mac, c.backend_mac, gw, c.backend, ACK | PSH).with(|p| p.payload = vec![1; 1400]);
                let router = Ipv4Addr::new(10, 64, 0, 254);
                bases.push((format!("{} frag-needed", c.name), c.backend_side, icmp_error(c.backend_mac, c.gw_mac, router, c.gw_addr, &sent)));
            }
            let c = conns[0];
            bases.push(("unmapped SYN".into(), Side::Client, Tcp4::new(c.client_mac, c.frontend_mac, c.client, SocketAddrV4::new(*c.frontend.ip(), 22), SYN).bytes()));

            let mapped_ports: Vec<u16> = fixture_support::FRONTENDS.iter().map(|f| f.1).collect();
            let mut rng = StdRng::seed_from_u64(seed);
            let (mut forwarded, mut opened, mut passed, mut dropped, mut refused) = (0u64, 0u64, 0u64, 0u64, 0u64);
            let mut new_flows = h.dp.counter(Counter::NewFlows).expect("counter");
            for i in 0..runs {
                let (name, side, base) = bases.choose(&mut rng).unwrap();
                let mut input = base.clone();
                mutate(&mut rng, &mut input);
                if input.len() < 14 {
                    continue; // the kernel refuses test runs shorter than an Ethernet header
                }
                let before = view(&input);
                // Which tracked connection (if any) the input belongs to, looked up before the run.
                let key_of = |t: (Ipv4Addr, u16, Ipv4Addr, u16)| FlowKey::tcp(wire::addr(t.0), wire::port(t.1), wire::addr(t.2), wire::port(t.3));
                let tracked = match &before {
                    Some(View { tcp: Some((s, sp, d, dp, _)), .. }) => h.dp.flow(&key_of((*s, *sp, *d, *dp))).unwrap().is_some(),
                    Some(View { icmp: Some(((s, sp, d, dp), _)), .. }) => h.dp.flow(&key_of((*d, *dp, *s, *sp))).unwrap().is_some(),
                    _ => false,
                };
                let out = match h.run_packet(h.ifaces.of(*side), 0, &input, 1) {
                    Ok(out) => out,
                    Err(e) if h.skb_test_run_refused(&input, &*e) => {
                        refused += 1;
                        continue;
                    }
                    Err(e) => panic!("test run of {} bytes: {}\n  input: {}", input.len(), fixture_support::error_chain(&*e), hex(&input)),
                };
                let now_new = h.dp.counter(Counter::NewFlows).expect("counter");
                let created = now_new > new_flows;
                new_flows = now_new;

                let mut violation = None;
                let new_conn_allowed = matches!(&before, Some(View { tcp: Some((_, _, _, dp, f)), .. }) if f & (SYN | ACK | FIN | RST) == SYN && mapped_ports.contains(dp));
                if created && !new_conn_allowed {
                    violation = Some("a connection was created by something other than a SYN to a mapped port".to_owned());
                }
                match out.action {
                    XDP_TX | XDP_REDIRECT => {
                        forwarded += 1;
                        opened += created as u64;
                        let after = view(&out.output);
                        match (&before, &after) {
                            (Some(b), Some(a)) => {
                                if !(tracked || created) {
                                    violation = Some("forwarded a packet of no tracked connection that opened none".into());
                                } else if b.ip_ok != a.ip_ok {
                                    violation = Some(format!("IPv4 header checksum valid before: {}, after: {}", b.ip_ok, a.ip_ok));
                                } else if b.tcp.is_some() && out.output.len() <= 1518 && b.tcp_sum_ok != a.tcp_sum_ok {
                                    violation = Some(format!("TCP checksum valid before: {}, after: {}", b.tcp_sum_ok, a.tcp_sum_ok));
                                } else if let (Some((_, bok)), Some((_, aok))) = (&b.icmp, &a.icmp)
                                    && bok != aok
                                {
                                    violation = Some(format!("ICMP checksum valid before: {bok}, after: {aok}"));
                                } else if let Some((_, sp, _, _, _)) = a.tcp
                                    && b.tcp.is_some_and(|t| mapped_ports.contains(&t.3))
                                    && !(SNAT_MIN..=SNAT_MAX).contains(&sp)
                                {
                                    violation = Some(format!("forwarded to a backend from port {sp}, outside the SNAT range"));
                                }
                            }
                            _ => violation = Some("forwarded a frame that does not parse as IPv4".into()),
                        }
                    }
                    XDP_PASS => {
                        passed += 1;
                        if out.output != input {
                            violation = Some("a passed frame was modified".into());
                        }
                    }
                    XDP_DROP => dropped += 1,
                    other => violation = Some(format!("unexpected action {other}")),
                }
                if let Some(v) = violation {
                    return Err(format!(
                        "invariant broken at iteration {i} (KPF_MUTATION_SEED={seed}; rerun with KPF_MUTATION_RUNS={}): {v}\n  base: {name}\n  input:  {}\n  action: {}\n  output: {}",
                        i + 1,
                        hex(&input),
                        out.action,
                        hex(&out.output)
                    ));
                }
            }
            Ok(format!(
                "{attach:?}: {runs} mutated packets (seed {seed}): {forwarded} forwarded ({opened} opened a connection), {passed} passed unchanged, {dropped} dropped, {refused} refused by the test run"
            ))
        })
        .expect("running in the gateway namespace");
    match report {
        Ok(summary) => eprintln!("{summary}"),
        Err(e) => panic!("{e}"),
    }
}
