//! Katran-style fixture table for kpf's XDP program, run through `BPF_PROG_TEST_RUN`.
//!
//! A [`Fixture`] is an input frame, the interface it arrives on, the action the program must return
//! and, when it forwards, the exact bytes it must send (for PASS and DROP: the frame must come back
//! unchanged). Expected frames are built with `etherparse`, which computes its own checksums: nothing
//! here uses kpf's checksum or NAT code, so a wrong incremental update cannot hide behind itself.
//!
//! The table is stateful and runs in order: a SYN opens a connection whose SNAT port the later
//! fixtures of that connection learn from the conntrack map ([`Check::Learn`]).
//!
//! Used by `tests/fixtures.rs` (correctness) and meant for `cargo xtask bench` (ns/packet with a
//! large `repeat`): [`Topology::new`], [`Topology::run`], [`fixtures`], [`Harness::run_packet`].
//!
//! Note for benchmarks: with `repeat > 1` the kernel runs the program again on the frame the
//! previous iteration rewrote (the data is not reset between iterations), so a forwarded fixture
//! is only representative for its first iteration.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use aya::programs::{TestRun, TestRunOptions, TestRunResult};
use etherparse::{
    EtherType, Ethernet2Header, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options, SingleVlanHeader, TcpHeader, VlanId,
    VlanPcp,
};
use kpf::loader::{AttachMode, Dataplane, frontend_key};
use kpf_common::{Config, Counter, Direction, Flow, FlowKey, Frontend, tcp::State, wire};
use kpf_tests::netns::{Netns, veth};

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// Topology: one gateway namespace (the program's view), one namespace holding the veth peers.
// ---------------------------------------------------------------------------------------------

pub const C0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xc0, 0x00];
pub const B0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xb0, 0x00];
pub const X0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xe0, 0x00];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0x0c, 0, 0x10];
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0x0c, 0, 0xfe];
pub const TX_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0x0c, 0, 0x20];
pub const BACKEND_A_MAC: [u8; 6] = [0x02, 0, 0, 0x0b, 0, 0x02];
pub const BACKEND_B_MAC: [u8; 6] = [0x02, 0, 0, 0x0b, 0, 0x03];
pub const BACKEND_B_NEW_MAC: [u8; 6] = [0x02, 0, 0, 0x0b, 0x01, 0x03];
pub const UNATTACHED_BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0x0e, 0, 0x02];

pub const GW_C: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const GW_B: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 1);
pub const GW_X: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// A client on another network, reaching the gateway through a router on the client side.
pub const REMOTE_CLIENT: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 5);
/// Not an address of the gateway.
pub const OTHER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 99);
pub const BACKEND_A: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 2);
pub const BACKEND_B: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 3);
/// A backend on the clients' interface: forwarding to it is XDP_TX.
pub const TX_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);
/// Routed via b0 but without a neighbour entry.
pub const UNRESOLVED_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 9);
/// No route at all.
pub const UNROUTABLE_BACKEND: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Routed via x0, which is not registered with the program.
pub const UNATTACHED_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
pub const BACKEND_PORT: u16 = 39092;

/// The harness's `max_flows`: its established table holds twice this many entries.
pub const MAX_FLOWS: u32 = 1024;
pub const SNAT_MIN: u16 = 40000;
pub const SNAT_MAX: u16 = 59999;

/// The frontends the program is loaded with: (address or wildcard, port, id, backend).
pub const FRONTENDS: [(Option<Ipv4Addr>, u16, u32, Ipv4Addr); 6] = [
    (None, 9093, 0, BACKEND_A),
    (Some(GW_C), 9094, 1, BACKEND_B),
    (None, 9095, 2, TX_BACKEND),
    (None, 9096, 3, UNRESOLVED_BACKEND),
    (None, 9097, 4, UNROUTABLE_BACKEND),
    (None, 9098, 5, UNATTACHED_BACKEND),
];

/// The namespaces of one fixture run. Dropping it deletes them (and every link in them).
pub struct Topology {
    /// The gateway: c0 (clients, 10.0.0.1/24), b0 (backends, 10.64.0.1/24), x0 (not attached).
    pub gw: Netns,
    /// The far ends of the veths, unused except to keep the links up.
    pub peers: Netns,
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl Topology {
    pub fn new() -> Result<Topology> {
        let _ = kpf_tests::netns::sweep_stale();
        let t = Topology { gw: Netns::new("fxgw")?, peers: Netns::new("fxpeer")? };
        let gw = &t.gw;
        for (dev, peer, mac, cidr) in [
            ("c0", "c1", C0_MAC, "10.0.0.1/24"),
            ("b0", "b1", B0_MAC, "10.64.0.1/24"),
            ("x0", "x1", X0_MAC, "10.99.0.1/24"),
        ] {
            veth(gw, dev, &t.peers, peer)?;
            gw.ip(&["link", "set", "dev", dev, "address", &mac_str(mac)])?;
            gw.ip(&["addr", "add", cidr, "dev", dev])?;
        }
        gw.sysctl("net.ipv4.conf.all.forwarding", "1")?;
        for dev in ["c0", "b0", "x0"] {
            gw.sysctl(&format!("net.ipv4.conf.{dev}.forwarding"), "1")?;
        }
        for (addr, mac, dev) in [
            (CLIENT, CLIENT_MAC, "c0"),
            (TX_BACKEND, TX_BACKEND_MAC, "c0"),
            (BACKEND_A, BACKEND_A_MAC, "b0"),
            (BACKEND_B, BACKEND_B_MAC, "b0"),
            (UNATTACHED_BACKEND, UNATTACHED_BACKEND_MAC, "x0"),
        ] {
            set_neigh(gw, addr, mac, dev)?;
        }
        Ok(t)
    }

    /// Loads and configures the program inside the gateway namespace and runs `f` there (on a
    /// thread joined to it: BPF_PROG_TEST_RUN resolves the ingress ifindex and does its FIB lookups
    /// in the calling thread's namespace). The program is unloaded before this returns.
    pub fn run<T: Send>(&self, f: impl FnOnce(&mut Harness<'_>) -> T + Send) -> Result<T> {
        self.run_at(Attach::Xdp, f)
    }

    /// The same, running every packet through the program for `attach`.
    pub fn run_at<T: Send>(&self, attach: Attach, f: impl FnOnce(&mut Harness<'_>) -> T + Send) -> Result<T> {
        let gw = &self.gw;
        self.gw.enter(move || -> Result<T> {
            let mut h = Harness::new(gw)?;
            h.attach = attach;
            Ok(f(&mut h))
        })?
    }
}

fn set_neigh(ns: &Netns, addr: Ipv4Addr, mac: [u8; 6], dev: &str) -> Result<()> {
    ns.ip(&["neigh", "replace", &addr.to_string(), "lladdr", &mac_str(mac), "dev", dev, "nud", "permanent"])?;
    Ok(())
}

/// The gateway's interfaces as the program sees them.
#[derive(Clone, Copy, Debug)]
pub struct Ifaces {
    pub c0: u32,
    pub b0: u32,
    pub x0: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// c0: clients (and the same-interface backend).
    Client,
    /// b0: backends.
    Backend,
}

impl Ifaces {
    pub fn of(&self, side: Side) -> u32 {
        match side {
            Side::Client => self.c0,
            Side::Backend => self.b0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Packets, built with etherparse.
// ---------------------------------------------------------------------------------------------

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;
pub const ECE: u8 = 0x40;
pub const CWR: u8 = 0x80;

/// How the TCP checksum field of a built packet is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Sum {
    /// A complete checksum.
    Full,
    /// The folded, uncomplemented pseudo-header sum a CHECKSUM_PARTIAL (GSO) packet carries.
    Partial,
}

/// A TCP/IPv4 frame, field by field.
#[derive(Clone, Debug)]
pub struct Tcp4 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub ttl: u8,
    pub id: u16,
    pub df: bool,
    pub mf: bool,
    /// In 8-byte units.
    pub frag_offset: u16,
    /// Raw IPv4 options, a multiple of 4 bytes (IHL = 5 + len / 4).
    pub ip_options: Vec<u8>,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Raw TCP options, a multiple of 4 bytes.
    pub tcp_options: Vec<u8>,
    pub payload: Vec<u8>,
    /// Ethernet padding: zero bytes appended after the IP packet until the frame is this long.
    pub pad_to: usize,
    pub l4_sum: L4Sum,
}

/// MSS 1460, SACK permitted, timestamps, NOP, window scale 7: what Linux puts in a SYN.
pub const SYN_OPTIONS: [u8; 20] = [2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0x00, 0x01, 0xe2, 0x40, 0, 0, 0, 0, 1, 3, 3, 7];
/// NOP, NOP, timestamps: what Linux puts in every later segment.
pub const TS_OPTIONS: [u8; 12] = [1, 1, 8, 10, 0x00, 0x01, 0xe2, 0x41, 0x00, 0x02, 0x00, 0x01];

impl Tcp4 {
    pub fn new(src_mac: [u8; 6], dst_mac: [u8; 6], src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Tcp4 {
        Tcp4 {
            src_mac,
            dst_mac,
            vlan: None,
            src,
            dst,
            ttl: 64,
            id: 0x1234,
            df: true,
            mf: false,
            frag_offset: 0,
            ip_options: Vec::new(),
            seq: 1000,
            ack: 0,
            flags,
            window: 64240,
            tcp_options: if flags & SYN != 0 { SYN_OPTIONS.to_vec() } else { TS_OPTIONS.to_vec() },
            payload: Vec::new(),
            pad_to: 0,
            l4_sum: L4Sum::Full,
        }
    }

    pub fn with(mut self, f: impl FnOnce(&mut Tcp4)) -> Tcp4 {
        f(&mut self);
        self
    }

    pub fn ip_header(&self) -> Ipv4Header {
        let mut ip = Ipv4Header::new(0, self.ttl, IpNumber::TCP, self.src.ip().octets(), self.dst.ip().octets())
            .expect("ipv4 header");
        ip.identification = self.id;
        ip.dont_fragment = self.df;
        ip.more_fragments = self.mf;
        ip.fragment_offset = IpFragOffset::try_new(self.frag_offset).expect("fragment offset");
        ip.options = Ipv4Options::try_from(&self.ip_options[..]).expect("ip options");
        ip
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut tcp = TcpHeader::new(self.src.port(), self.dst.port(), self.seq, self.window);
        tcp.acknowledgment_number = self.ack;
        tcp.fin = self.flags & FIN != 0;
        tcp.syn = self.flags & SYN != 0;
        tcp.rst = self.flags & RST != 0;
        tcp.psh = self.flags & PSH != 0;
        tcp.ack = self.flags & ACK != 0;
        tcp.urg = self.flags & URG != 0;
        tcp.ece = self.flags & ECE != 0;
        tcp.cwr = self.flags & CWR != 0;
        tcp.set_options_raw(&self.tcp_options).expect("tcp options");
        let mut ip = self.ip_header();
        ip.set_payload_len(tcp.header_len() + self.payload.len()).expect("ip length");
        ip.header_checksum = ip.calc_header_checksum();
        tcp.checksum = match self.l4_sum {
            L4Sum::Full => tcp.calc_checksum_ipv4(&ip, &self.payload).expect("tcp checksum"),
            L4Sum::Partial => {
                pseudo_header_sum(ip.source, ip.destination, (tcp.header_len() + self.payload.len()) as u16)
            }
        };

        let mut out = Vec::with_capacity(64 + self.payload.len());
        write_eth(&mut out, self.src_mac, self.dst_mac, self.vlan, EtherType::IPV4);
        ip.write_raw(&mut out).expect("write ip");
        tcp.write(&mut out).expect("write tcp");
        out.extend_from_slice(&self.payload);
        if out.len() < self.pad_to {
            out.resize(self.pad_to, 0);
        }
        out
    }
}

/// The folded (uncomplemented) IPv4 pseudo-header sum for TCP, in wire order: what a
/// CHECKSUM_PARTIAL TCP checksum field holds. Written here on purpose, not taken from kpf.
pub fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], tcp_len: u16) -> u16 {
    let words = [
        u16::from_be_bytes([src[0], src[1]]),
        u16::from_be_bytes([src[2], src[3]]),
        u16::from_be_bytes([dst[0], dst[1]]),
        u16::from_be_bytes([dst[2], dst[3]]),
        6,
        tcp_len,
    ];
    let mut s: u32 = words.iter().map(|&w| w as u32).sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

pub fn write_eth(out: &mut Vec<u8>, src: [u8; 6], dst: [u8; 6], vlan: Option<u16>, ether_type: EtherType) {
    let outer = if vlan.is_some() { EtherType::VLAN_TAGGED_FRAME } else { ether_type };
    Ethernet2Header { source: src, destination: dst, ether_type: outer }.write(out).expect("write eth");
    if let Some(v) = vlan {
        SingleVlanHeader {
            pcp: VlanPcp::try_new(3).expect("pcp"),
            drop_eligible_indicator: false,
            vlan_id: VlanId::try_new(v).expect("vlan id"),
            ether_type,
        }
        .write(out)
        .expect("write vlan");
    }
}

/// A UDP/IPv4 frame.
pub fn udp4(src_mac: [u8; 6], dst_mac: [u8; 6], src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port())
        .write(&mut out, payload)
        .expect("udp");
    out
}

/// An ICMP echo request frame.
pub fn icmp_echo(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4_echo_request(0x4b50, 1)
        .write(&mut out, b"kpf fixture ping")
        .expect("icmp");
    out
}

/// A TCP/IPv6 SYN frame.
pub fn tcp6_syn(src_mac: [u8; 6], dst_mac: [u8; 6], dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let src = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
    let dst = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01];
    etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv6(src, dst, 64)
        .tcp(50000, dport, 1000, 64240)
        .syn()
        .write(&mut out, &[])
        .expect("tcp6");
    out
}

/// `frame` (Ethernet + IPv6) with an 8-byte hop-by-hop options header (one PadN) inserted before
/// its transport header.
pub fn with_hop_by_hop(mut frame: Vec<u8>) -> Vec<u8> {
    let (l3, next) = (14, 14 + 6);
    let transport = frame[next];
    frame[next] = 0; // hop-by-hop
    let len = u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]]) + 8;
    frame[l3 + 4..l3 + 6].copy_from_slice(&len.to_be_bytes());
    frame.splice(l3 + 40..l3 + 40, [transport, 0, 1, 4, 0, 0, 0, 0]);
    frame
}

/// An ARP who-has request (hand-built: 28-byte ARP body after Ethernet).
pub fn arp_request(src_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::new();
    write_eth(&mut out, src_mac, [0xff; 6], None, EtherType::ARP);
    out.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    out.extend_from_slice(&src_mac);
    out.extend_from_slice(&sender.octets());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&target.octets());
    out
}

/// Offset of the IPv4 header in a frame built by this module (Ethernet, optional 802.1Q).
pub fn l3_offset(frame: &[u8]) -> usize {
    if frame.len() >= 14 && frame[12..14] == [0x81, 0x00] { 18 } else { 14 }
}

/// The IPv4 total length of a frame (what the frontend byte counters add).
pub fn ip_total_len(frame: &[u8]) -> u64 {
    let l3 = l3_offset(frame);
    u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]) as u64
}

/// Re-parses a forwarded frame with etherparse and recomputes both checksums.
pub fn verify_checksums(frame: &[u8], l4: L4Sum) -> Result<(), String> {
    let l3 = l3_offset(frame);
    let (ip, rest) = Ipv4Header::from_slice(&frame[l3..]).map_err(|e| format!("re-parse IPv4: {e}"))?;
    let want = ip.calc_header_checksum();
    if ip.header_checksum != want {
        return Err(format!("IPv4 header checksum {:#06x}, recomputed {want:#06x}", ip.header_checksum));
    }
    let seg_len = ip.total_len as usize - ip.header_len();
    if rest.len() < seg_len {
        return Err(format!("segment shorter ({}) than the IPv4 total length says ({seg_len})", rest.len()));
    }
    let seg = &rest[..seg_len];
    let (tcp, payload) = TcpHeader::from_slice(seg).map_err(|e| format!("re-parse TCP: {e}"))?;
    let want = match l4 {
        L4Sum::Full => tcp.calc_checksum_ipv4(&ip, payload).map_err(|e| e.to_string())?,
        L4Sum::Partial => pseudo_header_sum(ip.source, ip.destination, seg_len as u16),
    };
    if tcp.checksum != want {
        return Err(format!("TCP checksum ({l4:?}) {:#06x}, recomputed {want:#06x}", tcp.checksum));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Connections: the two sides of one forwarded TCP connection, and its expected rewrites.
// ---------------------------------------------------------------------------------------------

/// One client connection through a frontend, with everything needed to build both directions'
/// input and expected output. `name` keys the SNAT port learned at run time.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    pub name: &'static str,
    pub client: SocketAddrV4,
    /// The source MAC of the client's frames (the client, or the router in front of it).
    pub client_mac: [u8; 6],
    pub frontend: SocketAddrV4,
    pub frontend_id: u32,
    /// The destination MAC of the client's frames (the gateway's client-side interface).
    pub frontend_mac: [u8; 6],
    pub backend: SocketAddrV4,
    pub backend_mac: [u8; 6],
    /// The interface the backend is behind.
    pub backend_side: Side,
    /// The gateway's address and MAC toward the backend.
    pub gw_addr: Ipv4Addr,
    pub gw_mac: [u8; 6],
    pub vlan: Option<u16>,
}

impl Conn {
    /// A connection from 10.0.0.10:`cport` to `*:9093` -> 10.64.0.2:39092 (redirect to b0).
    pub fn to_a(name: &'static str, cport: u16) -> Conn {
        Conn {
            name,
            client: SocketAddrV4::new(CLIENT, cport),
            client_mac: CLIENT_MAC,
            frontend: SocketAddrV4::new(GW_C, 9093),
            frontend_id: 0,
            frontend_mac: C0_MAC,
            backend: SocketAddrV4::new(BACKEND_A, BACKEND_PORT),
            backend_mac: BACKEND_A_MAC,
            backend_side: Side::Backend,
            gw_addr: GW_B,
            gw_mac: B0_MAC,
            vlan: None,
        }
    }

    /// A connection to `10.0.0.1:9094` -> 10.64.0.3:39092 (address-specific frontend).
    pub fn to_b(name: &'static str, cport: u16) -> Conn {
        Conn {
            frontend: SocketAddrV4::new(GW_C, 9094),
            frontend_id: 1,
            backend: SocketAddrV4::new(BACKEND_B, BACKEND_PORT),
            backend_mac: BACKEND_B_MAC,
            ..Conn::to_a(name, cport)
        }
    }

    /// A connection to `*:9095` -> 10.0.0.20:39092, a backend on the clients' interface (XDP_TX).
    pub fn to_tx(name: &'static str, cport: u16) -> Conn {
        Conn {
            frontend: SocketAddrV4::new(GW_C, 9095),
            frontend_id: 2,
            backend: SocketAddrV4::new(TX_BACKEND, BACKEND_PORT),
            backend_mac: TX_BACKEND_MAC,
            backend_side: Side::Client,
            gw_addr: GW_C,
            gw_mac: C0_MAC,
            ..Conn::to_a(name, cport)
        }
    }

    pub fn backend_action(self) -> Action {
        if self.backend_side == Side::Client { Action::Tx } else { Action::Redirect }
    }

    pub fn client_action(self) -> Action {
        if self.backend_side == Side::Client { Action::Tx } else { Action::Redirect }
    }

    pub fn client_key(&self) -> FlowKey {
        FlowKey::tcp(
            wire::addr(*self.client.ip()),
            wire::port(self.client.port()),
            wire::addr(*self.frontend.ip()),
            wire::port(self.frontend.port()),
        )
    }

    pub fn reply_key(&self, snat_port: u16) -> FlowKey {
        FlowKey::tcp(
            wire::addr(*self.backend.ip()),
            wire::port(self.backend.port()),
            wire::addr(self.gw_addr),
            wire::port(snat_port),
        )
    }

    /// A segment as the client sends it.
    pub fn c2f(&self, flags: u8) -> Tcp4 {
        Tcp4::new(self.client_mac, self.frontend_mac, self.client, self.frontend, flags).with(|p| p.vlan = self.vlan)
    }

    /// What the gateway must send the backend for the client's segment `p`.
    pub fn g2b(&self, l: &Learned, p: &Tcp4) -> Tcp4 {
        p.clone().with(|q| {
            q.src_mac = self.gw_mac;
            q.dst_mac = self.backend_mac;
            q.src = SocketAddrV4::new(self.gw_addr, l.snat(self.name));
            q.dst = self.backend;
        })
    }

    /// A segment as the backend sends it (to the gateway's SNAT port).
    pub fn b2g(&self, l: &Learned, flags: u8) -> Tcp4 {
        Tcp4::new(
            self.backend_mac,
            self.gw_mac,
            self.backend,
            SocketAddrV4::new(self.gw_addr, l.snat(self.name)),
            flags,
        )
        .with(|p| {
            p.vlan = self.vlan;
            p.seq = 5000;
            p.id = 0x4321;
        })
    }

    /// What the gateway must send the client for the backend's segment `p`: back the way the SYN
    /// came, to the MAC it came from.
    pub fn f2c(&self, p: &Tcp4) -> Tcp4 {
        p.clone().with(|q| {
            q.src_mac = self.frontend_mac;
            q.dst_mac = self.client_mac;
            q.src = self.frontend;
            q.dst = self.client;
        })
    }
}

/// What the runner learned from the maps while running the table.
#[derive(Debug, Default)]
pub struct Learned {
    snat: HashMap<&'static str, u16>,
    /// The SNAT port a connection had before it was reopened.
    previous: HashMap<&'static str, u16>,
}

impl Learned {
    /// The SNAT port (host order) chosen for a connection; 0 if it was never learned (its
    /// fixtures then fail on their own, after the failure that prevented learning it).
    pub fn snat(&self, conn: &str) -> u16 {
        self.snat.get(conn).copied().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures.
// ---------------------------------------------------------------------------------------------

pub type PacketFn = Box<dyn Fn(&Learned) -> Vec<u8> + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Aborted = 0,
    Drop = 1,
    Pass = 2,
    Tx = 3,
    Redirect = 4,
}

impl Action {
    pub fn name(v: u32) -> &'static str {
        ["XDP_ABORTED", "XDP_DROP", "XDP_PASS", "XDP_TX", "XDP_REDIRECT"].get(v as usize).copied().unwrap_or("?")
    }
}

pub enum Expect {
    /// XDP_PASS with the frame unchanged, counted under this reason; no conntrack change.
    Pass(Counter),
    /// XDP_DROP counted under this reason; no conntrack change.
    Drop(Counter),
    /// Forwarded (XDP_TX or XDP_REDIRECT) as exactly `output`.
    Forward { action: Action, frontend_id: u32, new_flow: bool, l4: L4Sum, output: PacketFn },
}

/// Something to change before a fixture's packet is run.
#[derive(Clone, Debug)]
pub enum Setup {
    /// `ip neigh replace <addr> lladdr <mac> dev <dev> nud permanent` in the gateway namespace.
    Neigh { addr: Ipv4Addr, mac: [u8; 6], dev: &'static str },
    /// Bump the routing generation in the kernel config.
    FibGen(u32),
    /// `ip neigh del <addr> dev <dev>` in the gateway namespace.
    NeighDel { addr: Ipv4Addr, dev: &'static str },
    /// The SNAT port range in the kernel config.
    SnatRange(u16, u16),
    /// The idle timeout of one state in the kernel config.
    Timeout(State, u64),
    /// All idle timeouts back to their defaults.
    DefaultTimeouts,
    /// Wait (so that the coarse clock moves past a zero timeout).
    Sleep(Duration),
    /// `ip ARGS` in the gateway namespace.
    Ip(&'static [&'static str]),
    /// Remove one of the connection's entries, as the LRU evicts one when the table is full.
    Forget(Conn, Direction),
}

/// Conntrack assertions after a fixture's packet.
#[derive(Clone, Debug)]
pub enum Check {
    /// Read the connection's SNAT port back from its Original entry (run before the expected
    /// output is built), and check both entries' rewrites and next hops.
    Learn(Conn),
    /// Both entries of the connection exist and carry this state.
    State(Conn, State),
    /// The connection was just reopened on its 4-tuple: fresh entries, the old reply entry gone.
    Reopened(Conn),
    /// Two live connections to the same backend hold different SNAT ports.
    DistinctSnat(Conn, Conn),
    /// The Original entry's cached next hop has this destination MAC.
    NextHopMac(Conn, [u8; 6]),
    /// Both entries carry the 802.1Q tag control word the connection's frames had (the frames
    /// [`write_eth`] builds: priority 3 and `conn.vlan`), or 0 for an untagged connection.
    VlanTag(Conn),
    /// The Original entry was stamped during this run, in the clock the daemon reads
    /// (`Dataplane::now_ns`), which is what its idle timeouts and views compare against.
    Stamped(Conn),
    /// The connection holds the SNAT port one of these (ended or expired) connections held, and
    /// that one's two entries are gone.
    TookOver(Conn, Vec<Conn>),
    /// The entry of this direction holds this `next_seq`.
    NextSeq(Conn, Direction, u32),
}

pub struct Fixture {
    pub description: String,
    pub ingress: Side,
    /// XDP metadata bytes placed before the frame (lets frames shorter than Ethernet be run:
    /// BPF_PROG_TEST_RUN refuses data_in shorter than 14 bytes, but counts the metadata in it).
    pub meta_len: usize,
    /// Newer kernels refuse frames shorter than Ethernet outright (EINVAL), metadata or not: such
    /// a fixture is then reported as skipped, not failed, and left out of the totals.
    pub kernel_may_refuse: bool,
    pub setup: Vec<Setup>,
    pub input: PacketFn,
    pub expect: Expect,
    pub checks: Vec<Check>,
    /// Counter increments beyond the ones `expect` implies.
    pub also_counts: Vec<Counter>,
}

impl Fixture {
    pub fn new(description: impl Into<String>, ingress: Side, input: PacketFn, expect: Expect) -> Fixture {
        Fixture {
            description: description.into(),
            ingress,
            meta_len: 0,
            kernel_may_refuse: false,
            setup: Vec::new(),
            input,
            expect,
            checks: Vec::new(),
            also_counts: Vec::new(),
        }
    }

    /// A frame that must come back unchanged with XDP_PASS, counted under `reason`.
    pub fn pass(description: impl Into<String>, ingress: Side, frame: Vec<u8>, reason: Counter) -> Fixture {
        Fixture::new(description, ingress, Box::new(move |_| frame.clone()), Expect::Pass(reason))
    }

    /// A frame that must be dropped, counted under `reason`.
    pub fn drop(description: impl Into<String>, ingress: Side, frame: Vec<u8>, reason: Counter) -> Fixture {
        Fixture::new(description, ingress, Box::new(move |_| frame.clone()), Expect::Drop(reason))
    }

    /// A segment from the client of `conn`, forwarded to its backend.
    pub fn client_segment(
        description: impl Into<String>,
        conn: Conn,
        new_flow: bool,
        make: impl Fn(&Learned) -> Tcp4 + Send + Sync + 'static,
    ) -> Fixture {
        let make = std::sync::Arc::new(make);
        let m2 = make.clone();
        let l4 = make(&Learned::default()).l4_sum;
        let mut f = Fixture::new(
            description,
            Side::Client,
            Box::new(move |l| make(l).bytes()),
            Expect::Forward {
                action: conn.backend_action(),
                frontend_id: conn.frontend_id,
                new_flow,
                l4,
                output: Box::new(move |l| conn.g2b(l, &m2(l)).bytes()),
            },
        );
        if new_flow {
            f.checks.push(Check::Learn(conn));
        }
        f
    }

    /// A segment from the backend of `conn`, forwarded to the client.
    pub fn backend_segment(
        description: impl Into<String>,
        conn: Conn,
        make: impl Fn(&Learned) -> Tcp4 + Send + Sync + 'static,
    ) -> Fixture {
        let make = std::sync::Arc::new(make);
        let m2 = make.clone();
        let l4 = make(&Learned::default()).l4_sum;
        Fixture::new(
            description,
            conn.backend_side,
            Box::new(move |l| make(l).bytes()),
            Expect::Forward {
                action: conn.client_action(),
                frontend_id: conn.frontend_id,
                new_flow: false,
                l4,
                output: Box::new(move |l| conn.f2c(&m2(l)).bytes()),
            },
        )
    }

    pub fn check(mut self, c: Check) -> Fixture {
        self.checks.push(c);
        self
    }

    pub fn setup(mut self, s: Setup) -> Fixture {
        self.setup.push(s);
        self
    }

    /// The packet must also increment counter `c`.
    pub fn counts(mut self, c: Counter) -> Fixture {
        self.also_counts.push(c);
        self
    }

    /// Counter increments this fixture must cause.
    pub fn expected_counters(&self) -> Vec<Counter> {
        let mut v = match &self.expect {
            Expect::Pass(c) | Expect::Drop(c) => vec![*c],
            Expect::Forward { new_flow: true, .. } => vec![Counter::NewFlows],
            Expect::Forward { .. } => vec![],
        };
        v.extend_from_slice(&self.also_counts);
        v
    }
}

/// Takes a valid frame and breaks it with `f`.
fn broken(frame: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut v = frame.to_vec();
    f(&mut v);
    v
}

/// The fixture table, in run order.
pub fn fixtures() -> Vec<Fixture> {
    use Counter::*;
    use State::*;
    let mut t = Vec::new();

    // ---- A: full lifecycle through *:9093 -> 10.64.0.2 (redirect), client closes first --------
    let a = Conn::to_a("A", 50000);
    t.push(
        Fixture::client_segment(
            "A: SYN 10.0.0.10:50000 -> *:9093 opens a flow, redirected to 10.64.0.2",
            a,
            true,
            move |_| a.c2f(SYN),
        )
        .check(Check::State(a, SynSent))
        .check(Check::Stamped(a)),
    );
    t.push(
        Fixture::client_segment("A: retransmitted SYN keeps the binding (no new flow)", a, false, move |_| {
            a.c2f(SYN).with(|p| p.id = 0x1235)
        })
        .check(Check::State(a, SynSent)),
    );
    t.push(
        Fixture::backend_segment(
            "A: SYN-ACK from the backend, redirected to the client as 10.0.0.1:9093",
            a,
            move |l| {
                a.b2g(l, SYN | ACK).with(|p| {
                    p.ack = 1001;
                    p.tcp_options = SYN_OPTIONS.to_vec();
                })
            },
        )
        .check(Check::State(a, SynAcked)),
    );
    t.push(
        Fixture::client_segment("A: client ACK completes the handshake", a, false, move |_| {
            a.c2f(ACK).with(|p| {
                p.seq = 1001;
                p.ack = 5001;
                p.id = 0x1236;
            })
        })
        .check(Check::State(a, Established)),
    );
    t.push(
        Fixture::client_segment("A: client data, 1001 bytes (odd length)", a, false, move |_| {
            a.c2f(PSH | ACK).with(|p| {
                p.seq = 1001;
                p.ack = 5001;
                p.id = 0x1237;
                p.payload = (0..1001u32).map(|i| (i * 7 + 3) as u8).collect();
            })
        })
        .check(Check::State(a, Established))
        .check(Check::Stamped(a)),
    );
    t.push(
        Fixture::backend_segment("A: backend data, 1400 bytes", a, move |l| {
            a.b2g(l, PSH | ACK).with(|p| {
                p.seq = 5001;
                p.ack = 2002;
                p.payload = (0..1400u32).map(|i| (i * 13 + 1) as u8).collect();
            })
        })
        .check(Check::State(a, Established)),
    );
    t.push(
        Fixture::client_segment(
            "A: GSO aggregate from the client (IPv4 length 2000, CHECKSUM_PARTIAL pseudo-header sum)",
            a,
            false,
            move |_| {
                a.c2f(ACK).with(|p| {
                    p.seq = 2002;
                    p.ack = 6401;
                    p.id = 0x1238;
                    p.payload = (0..2000 - 20 - 32).map(|i: u32| (i * 31 + 5) as u8).collect();
                    p.l4_sum = L4Sum::Partial;
                })
            },
        )
        .check(Check::State(a, Established)),
    );
    t.push(
        Fixture::client_segment(
            "A: GRO aggregate of two short segments (IPv4 length 200, under the MTU, CHECKSUM_PARTIAL)",
            a,
            false,
            move |_| {
                a.c2f(PSH | ACK).with(|p| {
                    p.seq = 3950;
                    p.ack = 6401;
                    p.id = 0x1239;
                    p.payload = (0..200 - 20 - 32).map(|i: u32| (i * 17 + 9) as u8).collect();
                    p.l4_sum = L4Sum::Partial;
                })
            },
        )
        .check(Check::State(a, Established)),
    );
    t.push(
        Fixture::client_segment(
            "A: jumbo segment with a complete checksum (IPv4 length 2000, as a 9001-byte MTU allows)",
            a,
            false,
            move |_| {
                a.c2f(ACK).with(|p| {
                    p.seq = 4098;
                    p.ack = 6401;
                    p.id = 0x123a;
                    p.payload = (0..2000 - 20 - 32).map(|i: u32| (i * 29 + 1) as u8).collect();
                })
            },
        )
        .check(Check::State(a, Established)),
    );
    t.push(
        Fixture::client_segment("A: FIN from the client", a, false, move |_| {
            a.c2f(FIN | ACK).with(|p| {
                p.seq = 6046;
                p.ack = 6401;
                p.id = 0x123b;
            })
        })
        .check(Check::State(a, FinFromClient)),
    );
    t.push(
        Fixture::backend_segment("A: backend keeps sending on the half-closed connection", a, move |l| {
            a.b2g(l, PSH | ACK).with(|p| {
                p.seq = 6401;
                p.ack = 6047;
                p.payload = b"still here".to_vec();
            })
        })
        .check(Check::State(a, FinFromClient)),
    );
    t.push(
        Fixture::backend_segment("A: FIN from the backend", a, move |l| {
            a.b2g(l, FIN | ACK).with(|p| {
                p.seq = 6411;
                p.ack = 6047;
            })
        })
        .check(Check::State(a, Closing)),
    );
    t.push(
        Fixture::client_segment("A: last ACK from the client", a, false, move |_| {
            a.c2f(ACK).with(|p| {
                p.seq = 6047;
                p.ack = 6412;
                p.id = 0x123c;
            })
        })
        .check(Check::State(a, Closing)),
    );

    // ---- B: backend closes first; a SYN on a live tuple ------------------------------------------
    let b = Conn::to_a("B", 50001);
    handshake(&mut t, b);
    t.push(
        Fixture::client_segment("B: SYN on an established 4-tuple keeps the live binding", b, false, move |_| {
            b.c2f(SYN).with(|p| p.seq = 77777)
        })
        .check(Check::State(b, Established)),
    );
    t.push(
        Fixture::backend_segment("B: FIN from the backend", b, move |l| {
            b.b2g(l, FIN | ACK).with(|p| {
                p.seq = 5001;
                p.ack = 1001;
            })
        })
        .check(Check::State(b, FinFromBackend)),
    );
    t.push(
        Fixture::client_segment("B: FIN from the client: the backend is in TIME_WAIT", b, false, move |_| {
            b.c2f(FIN | ACK).with(|p| {
                p.seq = 1001;
                p.ack = 5002;
            })
        })
        .check(Check::State(b, BackendTimeWait)),
    );

    // ---- C: RST from the client; D: RST from the backend during the handshake ------------------
    let c = Conn::to_a("C", 50002);
    handshake(&mut t, c);
    t.push(
        Fixture::client_segment("C: RST from the client", c, false, move |_| {
            c.c2f(RST | ACK).with(|p| {
                p.seq = 1001;
                p.ack = 5001;
                p.tcp_options.clear();
            })
        })
        .check(Check::State(c, Reset)),
    );
    let d = Conn::to_a("D", 50003);
    t.push(Fixture::client_segment("D: SYN", d, true, move |_| d.c2f(SYN)).check(Check::State(d, SynSent)));
    t.push(
        Fixture::backend_segment("D: SYN-ACK", d, move |l| d.b2g(l, SYN | ACK).with(|p| p.ack = 1001))
            .check(Check::State(d, SynAcked)),
    );
    t.push(
        Fixture::backend_segment("D: RST from the backend", d, move |l| {
            d.b2g(l, RST | ACK).with(|p| {
                p.seq = 5001;
                p.ack = 1001;
                p.tcp_options.clear();
            })
        })
        .check(Check::State(d, Reset)),
    );

    // ---- S: blind RSTs and FINs (a sender that knows the 4-tuple, not the sequence numbers) --
    let sp = Conn::to_a("S", 50004);
    handshake(&mut t, sp);
    let far = 1u32 << 20;
    t.push(
        Fixture::client_segment("S: client data, 1000 bytes", sp, false, move |_| {
            sp.c2f(PSH | ACK).with(|p| {
                p.seq = 1001;
                p.ack = 5001;
                p.payload = vec![7; 1000];
            })
        })
        .check(Check::NextSeq(sp, Direction::Original, 2001)),
    );
    t.push(
        Fixture::client_segment("S: a retransmission of its first half does not pull next_seq back", sp, false, move |_| {
            sp.c2f(PSH | ACK).with(|p| {
                p.seq = 1001;
                p.ack = 5001;
                p.payload = vec![7; 500];
            })
        })
        .check(Check::NextSeq(sp, Direction::Original, 2001)),
    );
    t.push(
        Fixture::client_segment("S: a segment 1 MiB ahead is forwarded but does not move next_seq", sp, false, move |_| {
            sp.c2f(PSH | ACK).with(|p| {
                p.seq = 2001 + far;
                p.ack = 5001;
                p.payload = vec![7; 10];
            })
        })
        .check(Check::NextSeq(sp, Direction::Original, 2001)),
    );
    t.push(
        Fixture::client_segment("S: RST 1 MiB ahead of the client's data is forwarded but changes nothing", sp, false, move |_| {
            sp.c2f(RST | ACK).with(|p| {
                p.seq = 2001 + far;
                p.ack = 5001;
                p.tcp_options.clear();
            })
        })
        .check(Check::State(sp, Established)),
    );
    t.push(
        Fixture::backend_segment("S: RST 1 MiB behind the backend's data is forwarded but changes nothing", sp, move |l| {
            sp.b2g(l, RST | ACK).with(|p| {
                p.seq = 5001 - far;
                p.ack = 2001;
                p.tcp_options.clear();
            })
        })
        .check(Check::State(sp, Established)),
    );
    t.push(
        Fixture::client_segment("S: FIN 1 MiB ahead of the client's data changes nothing", sp, false, move |_| {
            sp.c2f(FIN | ACK).with(|p| {
                p.seq = 2001 + far;
                p.ack = 5001;
            })
        })
        .check(Check::State(sp, Established))
        .check(Check::NextSeq(sp, Direction::Original, 2001)),
    );
    t.push(
        Fixture::backend_segment("S: FIN from the backend 1 MiB ahead changes nothing", sp, move |l| {
            sp.b2g(l, FIN | ACK).with(|p| {
                p.seq = 5001 + far;
                p.ack = 2001;
            })
        })
        .check(Check::State(sp, Established))
        .check(Check::NextSeq(sp, Direction::Reply, 5001)),
    );
    t.push(
        Fixture::client_segment("S: RST at the client's next sequence number resets it", sp, false, move |_| {
            sp.c2f(RST | ACK).with(|p| {
                p.seq = 2001;
                p.ack = 5001;
                p.tcp_options.clear();
            })
        })
        .check(Check::State(sp, Reset)),
    );

    // ---- Reused 4-tuples --------------------------------------------------------------------------
    t.push(
        Fixture::client_segment("A: new SYN on the closed (Closing) 4-tuple gets a fresh flow", a, true, move |_| {
            a.c2f(SYN).with(|p| {
                p.seq = 900_000;
                p.id = 0x2000;
            })
        })
        .check(Check::Reopened(a))
        .check(Check::State(a, SynSent)),
    );
    t.push(
        Fixture::backend_segment("A: SYN-ACK of the reopened connection", a, move |l| {
            a.b2g(l, SYN | ACK).with(|p| {
                p.seq = 123_456;
                p.ack = 900_001;
                p.tcp_options = SYN_OPTIONS.to_vec();
            })
        })
        .check(Check::State(a, SynAcked)),
    );
    t.push(
        Fixture::client_segment("C: new SYN on the reset 4-tuple gets a fresh flow", c, true, move |_| {
            c.c2f(SYN).with(|p| p.seq = 800_000)
        })
        .check(Check::Reopened(c))
        .check(Check::State(c, SynSent)),
    );

    // ---- E: backend on the clients' interface (XDP_TX) -------------------------------------------
    let e = Conn::to_tx("E", 50010);
    t.push(
        Fixture::client_segment(
            "E: SYN to *:9095 (backend 10.0.0.20 on c0) is sent back out with XDP_TX",
            e,
            true,
            move |_| e.c2f(SYN),
        )
        .check(Check::State(e, SynSent)),
    );
    t.push(
        Fixture::backend_segment("E: SYN-ACK from 10.0.0.20 on c0, XDP_TX to the client", e, move |l| {
            e.b2g(l, SYN | ACK).with(|p| p.ack = 1001)
        })
        .check(Check::State(e, SynAcked)),
    );
    t.push(
        Fixture::client_segment("E: client ACK", e, false, move |_| {
            e.c2f(ACK).with(|p| {
                p.seq = 1001;
                p.ack = 5001;
            })
        })
        .check(Check::State(e, Established)),
    );

    // ---- F: address-specific frontend 10.0.0.1:9094 -> 10.64.0.3; next-hop change ----------------
    let f = Conn::to_b("F", 50020);
    t.push(
        Fixture::client_segment("F: SYN to the address-specific frontend 10.0.0.1:9094", f, true, move |_| f.c2f(SYN))
            .check(Check::State(f, SynSent))
            .check(Check::VlanTag(f)),
    );
    t.push(
        Fixture::backend_segment("F: SYN-ACK from 10.64.0.3", f, move |l| f.b2g(l, SYN | ACK).with(|p| p.ack = 1001))
            .check(Check::State(f, SynAcked)),
    );
    let f_moved = Conn { backend_mac: BACKEND_B_NEW_MAC, ..f };
    t.push(
        Fixture::client_segment(
            "F: after the backend's MAC changes and fib_gen is bumped, the next packet goes to the new MAC",
            f_moved,
            false,
            move |_| {
                f_moved.c2f(ACK).with(|p| {
                    p.seq = 1001;
                    p.ack = 5001;
                })
            },
        )
        .setup(Setup::Neigh { addr: BACKEND_B, mac: BACKEND_B_NEW_MAC, dev: "b0" })
        .setup(Setup::FibGen(1))
        .check(Check::NextHopMac(f, BACKEND_B_NEW_MAC))
        .check(Check::State(f, Established)),
    );
    t.push(
        Fixture::client_segment(
            "F: backend neighbour gone (fib_gen 2): forwarded on the cached next hop, no drop counted",
            f_moved,
            false,
            move |_| {
                f_moved.c2f(PSH | ACK).with(|p| {
                    p.seq = 1001;
                    p.ack = 5001;
                    p.payload = b"neighbour lost".to_vec();
                })
            },
        )
        .setup(Setup::NeighDel { addr: BACKEND_B, dev: "b0" })
        .setup(Setup::FibGen(2)),
    );
    t.push(
        Fixture::client_segment("F: neighbour back (fib_gen 3): next hop looked up again", f_moved, false, move |_| {
            f_moved.c2f(ACK).with(|p| {
                p.seq = 1015;
                p.ack = 5001;
            })
        })
        .setup(Setup::Neigh { addr: BACKEND_B, mac: BACKEND_B_NEW_MAC, dev: "b0" })
        .setup(Setup::FibGen(3))
        .check(Check::NextHopMac(f, BACKEND_B_NEW_MAC)),
    );
    let other_9094 = Conn { frontend: SocketAddrV4::new(OTHER, 9094), ..Conn::to_b("F-other", 50021) };
    t.push(Fixture::pass(
        "SYN to 10.0.0.99:9094 (no frontend on that address, no wildcard) is not ours",
        Side::Client,
        other_9094.c2f(SYN).bytes(),
        PassNotOurs,
    ));

    // ---- G: 802.1Q-tagged, same-interface backend ---------------------------------------------------
    let g = Conn { vlan: Some(100), ..Conn::to_tx("G", 50030) };
    t.push(
        Fixture::client_segment(
            "G: 802.1Q (VID 100) SYN to *:9095: XDP_TX, tag kept, inner headers rewritten",
            g,
            true,
            move |_| g.c2f(SYN),
        )
        .check(Check::State(g, SynSent))
        .check(Check::VlanTag(g)),
    );
    t.push(
        Fixture::backend_segment("G: tagged SYN-ACK back to the client, tag kept", g, move |l| {
            g.b2g(l, SYN | ACK).with(|p| p.ack = 1001)
        })
        .check(Check::State(g, SynAcked)),
    );
    // The backend's route moves to b0. A tagged frame's 802.1Q tag is kept, so its connection
    // may not follow (as a SYN routed out of another interface is dropped: DropVlanEgress).
    t.push(
        Fixture::client_segment(
            "G: tagged ACK after the backend's route moved to b0 (fib_gen 4): still XDP_TX, not out b0 with the tag",
            g,
            false,
            move |_| {
                g.c2f(ACK).with(|p| {
                    p.seq = 1001;
                    p.ack = 5001;
                })
            },
        )
        .setup(Setup::Ip(&["neigh", "replace", "10.0.0.20", "lladdr", "02:00:00:0c:00:20", "dev", "b0", "nud", "permanent"]))
        .setup(Setup::Ip(&["route", "add", "10.0.0.20/32", "dev", "b0", "src", "10.0.0.1"]))
        .setup(Setup::FibGen(4))
        .check(Check::State(g, Established)),
    );
    t.push(
        Fixture::client_segment("G: tagged data once the route is back (fib_gen 5)", g, false, move |_| {
            g.c2f(PSH | ACK).with(|p| {
                p.seq = 1001;
                p.ack = 5001;
                p.payload = b"route back".to_vec();
            })
        })
        .setup(Setup::Ip(&["route", "del", "10.0.0.20/32", "dev", "b0"]))
        .setup(Setup::Ip(&["neigh", "del", "10.0.0.20", "dev", "b0"]))
        .setup(Setup::FibGen(5)),
    );

    // ---- H: IPv4 options -----------------------------------------------------------------------------
    let h = Conn::to_a("H", 50040);
    // Record route with room for two addresses, then EOL: 12 bytes, IHL 8.
    let rr = vec![7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    t.push(
        Fixture::client_segment("H: SYN with an IPv4 record-route option (IHL 8), options kept", h, true, move |_| {
            h.c2f(SYN).with(|p| p.ip_options = rr.clone())
        })
        .check(Check::State(h, SynSent)),
    );
    t.push(
        Fixture::backend_segment("H: SYN-ACK", h, move |l| h.b2g(l, SYN | ACK).with(|p| p.ack = 1001))
            .check(Check::State(h, SynAcked)),
    );
    t.push(
        Fixture::client_segment("H: ACK with data and 40 bytes of IPv4 options (IHL 15)", h, false, move |_| {
            h.c2f(PSH | ACK).with(|p| {
                p.seq = 1001;
                p.ack = 5001;
                let mut o = vec![1u8; 39];
                o.push(0);
                p.ip_options = o;
                p.payload = b"options everywhere".to_vec();
            })
        })
        .check(Check::State(h, Established)),
    );
    t.push(Fixture::backend_segment("H: backend data with an IPv4 NOP option (IHL 6)", h, move |l| {
        h.b2g(l, PSH | ACK).with(|p| {
            p.seq = 5001;
            p.ack = 1019;
            p.ip_options = vec![1, 1, 1, 0];
            p.payload = b"ok".to_vec();
        })
    }));

    // ---- I: a client behind a router; J: ECN SYN with DF clear; K: padded minimum frame ------------
    let i = Conn { client: SocketAddrV4::new(REMOTE_CLIENT, 40404), client_mac: ROUTER_MAC, ..Conn::to_a("I", 0) };
    t.push(
        Fixture::client_segment("I: SYN from 172.16.0.5 via a router MAC", i, true, move |_| i.c2f(SYN))
            .check(Check::State(i, SynSent)),
    );
    t.push(
        Fixture::backend_segment("I: SYN-ACK goes back to the router's MAC (the SYN's source MAC)", i, move |l| {
            i.b2g(l, SYN | ACK).with(|p| p.ack = 1001)
        })
        .check(Check::State(i, SynAcked)),
    );
    let j = Conn::to_a("J", 50050);
    t.push(
        Fixture::client_segment(
            "J: ECN-setup SYN (SYN|ECE|CWR), DF clear: a normal, unfragmented packet",
            j,
            true,
            move |_| {
                j.c2f(SYN | ECE | CWR).with(|p| {
                    p.df = false;
                    p.id = 0xbeef;
                })
            },
        )
        .check(Check::State(j, SynSent)),
    );
    let k = Conn::to_a("K", 50060);
    t.push(
        Fixture::client_segment(
            "K: option-less SYN in a 60-byte frame with Ethernet padding, padding kept",
            k,
            true,
            move |_| {
                k.c2f(SYN).with(|p| {
                    p.tcp_options.clear();
                    p.pad_to = 60;
                })
            },
        )
        .check(Check::State(k, SynSent)),
    );

    // ---- Not ours ------------------------------------------------------------------------------------
    let x = Conn::to_a("X", 50070);
    t.push(Fixture::pass(
        "SYN to unmapped port 10.0.0.1:22",
        Side::Client,
        x.c2f(SYN).with(|p| p.dst.set_port(22)).bytes(),
        PassNotOurs,
    ));
    t.push(Fixture::pass(
        "UDP to 10.0.0.1:9093",
        Side::Client,
        udp4(CLIENT_MAC, C0_MAC, x.client, x.frontend, b"not tcp"),
        PassNotOurs,
    ));
    t.push(Fixture::pass(
        "ICMP echo request to 10.0.0.1",
        Side::Client,
        icmp_echo(CLIENT_MAC, C0_MAC, CLIENT, GW_C),
        PassNotOurs,
    ));
    t.push(Fixture::pass("ARP who-has 10.0.0.1", Side::Client, arp_request(CLIENT_MAC, CLIENT, GW_C), PassNotOurs));
    t.push(Fixture::pass("TCP/IPv6 SYN to port 9093", Side::Client, tcp6_syn(CLIENT_MAC, C0_MAC, 9093), PassNotOurs));
    t.push(Fixture::pass(
        "TCP/IPv6 SYN to port 9093 behind a hop-by-hop extension header",
        Side::Client,
        with_hop_by_hop(tcp6_syn(CLIENT_MAC, C0_MAC, 9093)),
        PassNotOurs,
    ));
    let zero_src = Tcp4::new(CLIENT_MAC, C0_MAC, SocketAddrV4::new(CLIENT, 0), SocketAddrV4::new(GW_C, 9093), SYN);
    t.push(Fixture::pass("SYN from source port 0 to *:9093", Side::Client, zero_src.bytes(), PassMalformed));
    let zero_dst = Tcp4::new(CLIENT_MAC, C0_MAC, SocketAddrV4::new(CLIENT, 50900), SocketAddrV4::new(GW_C, 0), SYN);
    t.push(Fixture::pass("SYN to port 0", Side::Client, zero_dst.bytes(), PassMalformed));
    t.push(Fixture::pass(
        "802.1ad (QinQ, 0x88a8) outer tag: not parsed",
        Side::Client,
        broken(&x.c2f(SYN).with(|p| p.vlan = Some(7)).bytes(), |v| v[12..14].copy_from_slice(&[0x88, 0xa8])),
        PassNotOurs,
    ));
    t.push(Fixture::pass(
        "SYN to 10.0.0.99:9093, not an address of the gateway (a wildcard frontend means any *local* address)",
        Side::Client,
        Conn { frontend: SocketAddrV4::new(OTHER, 9093), ..x }.c2f(SYN).bytes(),
        PassNotOurs,
    ));
    let ack_only = x.c2f(ACK).with(|p| {
        p.seq = 1001;
        p.ack = 5001;
    });
    t.push(Fixture::pass("ACK to *:9093 with no flow", Side::Client, ack_only.bytes(), PassNoFlow));
    t.push(Fixture::pass(
        "FIN to *:9093 with no flow",
        Side::Client,
        ack_only.clone().with(|p| p.flags = FIN | ACK).bytes(),
        PassNoFlow,
    ));
    t.push(Fixture::pass(
        "RST to *:9093 with no flow",
        Side::Client,
        ack_only.clone().with(|p| p.flags = RST).bytes(),
        PassNoFlow,
    ));
    t.push(Fixture::pass("SYN+FIN to *:9093 with no flow", Side::Client, x.c2f(SYN | FIN).bytes(), PassNoFlow));
    t.push(Fixture::pass("SYN+RST to *:9093 with no flow", Side::Client, x.c2f(SYN | RST).bytes(), PassNoFlow));
    t.push(Fixture::pass(
        "SYN+ACK from a client to *:9093 with no flow",
        Side::Client,
        x.c2f(SYN | ACK).bytes(),
        PassNoFlow,
    ));
    t.push(Fixture::pass(
        "segment from a backend to a SNAT-range port with no flow",
        Side::Backend,
        Tcp4::new(
            BACKEND_A_MAC,
            B0_MAC,
            SocketAddrV4::new(BACKEND_A, BACKEND_PORT),
            SocketAddrV4::new(GW_B, 40001),
            ACK,
        )
        .bytes(),
        PassNotOurs,
    ));

    // ---- Fragments ----------------------------------------------------------------------------------
    t.push(Fixture::pass(
        "first fragment (MF) of a SYN to *:9093",
        Side::Client,
        x.c2f(SYN)
            .with(|p| {
                p.df = false;
                p.mf = true;
            })
            .bytes(),
        PassFragment,
    ));
    t.push(Fixture::pass(
        "last fragment (offset 185, no MF) to *:9093",
        Side::Client,
        x.c2f(ACK)
            .with(|p| {
                p.df = false;
                p.frag_offset = 185;
                p.payload = vec![0xab; 40];
            })
            .bytes(),
        PassFragment,
    ));
    t.push(Fixture::pass(
        "middle fragment (MF, offset 1) to *:9093",
        Side::Client,
        x.c2f(ACK)
            .with(|p| {
                p.df = false;
                p.mf = true;
                p.frag_offset = 1;
            })
            .bytes(),
        PassFragment,
    ));

    // ---- Truncated and malformed ----------------------------------------------------------------------
    let syn = x.c2f(SYN).bytes(); // 14 + 20 + 40
    let mut short =
        Fixture::pass("frame shorter than Ethernet (10 bytes)", Side::Client, syn[..10].to_vec(), PassMalformed);
    short.meta_len = 4;
    short.kernel_may_refuse = true;
    t.push(short);
    let mut empty = Fixture::pass("empty frame", Side::Client, Vec::new(), PassMalformed);
    empty.meta_len = 16;
    empty.kernel_may_refuse = true;
    t.push(empty);
    let tagged = x.c2f(SYN).with(|p| p.vlan = Some(5)).bytes();
    t.push(Fixture::pass("802.1Q tag cut short (16 bytes)", Side::Client, tagged[..16].to_vec(), PassMalformed));
    t.push(Fixture::pass("802.1Q frame with the IPv4 header cut", Side::Client, tagged[..30].to_vec(), PassMalformed));
    t.push(Fixture::pass("IPv4 header cut (14 + 10 bytes)", Side::Client, syn[..24].to_vec(), PassMalformed));
    t.push(Fixture::pass("Ethernet header only, EtherType IPv4", Side::Client, syn[..14].to_vec(), PassMalformed));
    t.push(Fixture::pass(
        "IPv4 version 6 in an IPv4 EtherType",
        Side::Client,
        broken(&syn, |v| v[14] = 0x65),
        PassMalformed,
    ));
    t.push(Fixture::pass("IHL 4 (< 5)", Side::Client, broken(&syn, |v| v[14] = 0x44), PassMalformed));
    t.push(Fixture::pass("IHL 0", Side::Client, broken(&syn, |v| v[14] = 0x40), PassMalformed));
    t.push(Fixture::pass(
        "IHL 15 (60 bytes) beyond the IPv4 total length (40)",
        Side::Client,
        broken(&x.c2f(ACK).with(|p| p.tcp_options.clear()).bytes(), |v| v[14] = 0x4f),
        PassMalformed,
    ));
    t.push(Fixture::pass(
        "IPv4 total length 100 bytes more than the frame",
        Side::Client,
        broken(&syn, |v| {
            let n = u16::from_be_bytes([v[16], v[17]]) + 100;
            v[16..18].copy_from_slice(&n.to_be_bytes());
        }),
        PassMalformed,
    ));
    t.push(Fixture::pass(
        "IPv4 total length smaller than IHL",
        Side::Client,
        broken(&syn, |v| v[16..18].copy_from_slice(&16u16.to_be_bytes())),
        PassMalformed,
    ));
    t.push(Fixture::pass(
        "TCP header cut (IPv4 total length 30, frame ends there)",
        Side::Client,
        broken(&syn[..14 + 30], |v| v[16..18].copy_from_slice(&30u16.to_be_bytes())),
        PassMalformed,
    ));
    t.push(Fixture::pass(
        "TCP header cut by the IPv4 total length only (frame longer)",
        Side::Client,
        broken(&syn, |v| v[16..18].copy_from_slice(&30u16.to_be_bytes())),
        PassMalformed,
    ));
    t.push(Fixture::pass(
        "TCP data offset 4 (< 5)",
        Side::Client,
        broken(&syn, |v| v[14 + 20 + 12] = 0x42),
        PassMalformed,
    ));
    t.push(Fixture::pass(
        "TCP data offset 15 (60 bytes) beyond the IPv4 total length",
        Side::Client,
        broken(&syn, |v| v[14 + 20 + 12] = 0xf0),
        PassMalformed,
    ));
    t.push(Fixture::pass(
        "802.1Q-tagged SYN with TCP data offset beyond the IPv4 total length",
        Side::Client,
        broken(&tagged, |v| v[18 + 20 + 12] = 0xf0),
        PassMalformed,
    ));

    // ---- Drops -----------------------------------------------------------------------------------------
    for (port, what, reason) in [
        (9096, "backend 10.64.0.9 has no neighbour entry", DropFibNoNeigh),
        (9097, "backend 192.0.2.1 has no route", DropFibFailed),
        (9098, "backend 10.99.0.2 is routed out of x0, which is not attached", DropEgressNotAttached),
    ] {
        let frame = x.c2f(SYN).with(|p| p.dst.set_port(port)).bytes();
        t.push(Fixture::drop(format!("SYN to *:{port}: {what}"), Side::Client, frame, reason));
    }

    // ---- Q: idle expiry (SynSent timeout set to 0) -------------------------------------------------------
    let q = Conn::to_a("Q", 50080);
    t.push(Fixture::client_segment("Q: SYN", q, true, move |_| q.c2f(SYN)).check(Check::State(q, SynSent)));
    t.push(
        Fixture::new(
            "Q: SYN-ACK after the flow expired: not forwarded on the stale binding",
            Side::Backend,
            Box::new(move |l| q.b2g(l, SYN | ACK).with(|p| p.ack = 1001).bytes()),
            Expect::Pass(PassNotOurs),
        )
        .setup(Setup::Timeout(SynSent, 0))
        .setup(Setup::Sleep(Duration::from_millis(30))),
    );
    t.push(Fixture::pass(
        "Q: client ACK on the expired flow: no flow",
        Side::Client,
        q.c2f(ACK)
            .with(|p| {
                p.seq = 1001;
                p.ack = 5001;
            })
            .bytes(),
        PassNoFlow,
    ));
    t.push(
        Fixture::client_segment("Q: new SYN on the expired 4-tuple gets a fresh flow", q, true, move |_| {
            q.c2f(SYN).with(|p| p.seq = 7_000_000)
        })
        .check(Check::Reopened(q))
        .check(Check::State(q, SynSent)),
    );
    t.push(
        Fixture::backend_segment("Q: SYN-ACK of the fresh flow (timeouts back to default)", q, move |l| {
            q.b2g(l, SYN | ACK).with(|p| p.ack = 7_000_001)
        })
        .setup(Setup::DefaultTimeouts)
        .check(Check::State(q, SynAcked)),
    );

    // ---- R: a backend slow to answer (SynSent timeout 1 s) ---------------------------------------------
    // The client's retransmitted SYNs are all that refresh the connection until the backend
    // answers: the SYN-ACK to a late one must still find the reply entry live.
    let r = Conn::to_a("R", 50090);
    t.push(
        Fixture::client_segment("R: SYN", r, true, move |_| r.c2f(SYN))
            .setup(Setup::Timeout(SynSent, 1_000_000_000))
            .check(Check::State(r, SynSent)),
    );
    t.push(
        Fixture::client_segment("R: SYN retransmitted 600 ms later, backend still silent", r, false, move |_| r.c2f(SYN))
            .setup(Setup::Sleep(Duration::from_millis(600)))
            .check(Check::State(r, SynSent)),
    );
    t.push(
        Fixture::backend_segment(
            "R: SYN-ACK 1.2 s after the first SYN (past the timeout), 600 ms after the retransmission",
            r,
            move |l| r.b2g(l, SYN | ACK).with(|p| p.ack = 1001),
        )
        .setup(Setup::Sleep(Duration::from_millis(600)))
        .check(Check::State(r, SynAcked)),
    );
    t.push(
        Fixture::client_segment("R: ACK completes the handshake (timeouts back to default)", r, false, move |_| {
            r.c2f(ACK).with(|p| {
                p.seq = 1001;
                p.ack = 5001;
            })
        })
        .setup(Setup::DefaultTimeouts)
        .check(Check::State(r, Established)),
    );

    // ---- SNAT port probing with a two-port range ---------------------------------------------------------
    let p1 = Conn::to_a("P1", 51000);
    let p2 = Conn::to_a("P2", 51001);
    let p3 = Conn::to_a("P3", 51002);
    t.push(
        Fixture::client_segment("P1: SNAT range 60000-60001 (outside the default one, so no earlier connection holds them), first SYN takes one port", p1, true, move |_| p1.c2f(SYN))
            .setup(Setup::SnatRange(60000, 60001)),
    );
    t.push(
        Fixture::client_segment("P2: second SYN to the same backend probes to the other port", p2, true, move |_| {
            p2.c2f(SYN)
        })
        .check(Check::DistinctSnat(p1, p2)),
    );
    t.push(Fixture::drop("P3: third SYN finds both ports taken: dropped", Side::Client, p3.c2f(SYN).bytes(), DropSnatExhausted));
    t.push(
        Fixture::client_segment(
            "P3 again once both handshakes expired: takes over one of their ports, whose entries go",
            p3,
            true,
            move |_| p3.c2f(SYN),
        )
        .setup(Setup::Timeout(SynSent, 0))
        .setup(Setup::Sleep(Duration::from_millis(30)))
        .counts(SnatReclaimed)
        .check(Check::TookOver(p3, vec![p1, p2])),
    );

    // ---- SNAT last resort: every port held by a connection still in its grace ------------------------
    // Outside the default range, so no earlier connection can hold these ports.
    let l1 = Conn::to_a("L1", 51010);
    let l2 = Conn::to_a("L2", 51011);
    let l3 = Conn::to_a("L3", 51012);
    t.push(
        Fixture::client_segment("L1: SNAT range 60002-60003, SYN takes one port (timeouts back to default)", l1, true, move |_| {
            l1.c2f(SYN)
        })
        .setup(Setup::SnatRange(60002, 60003))
        .setup(Setup::DefaultTimeouts),
    );
    t.push(
        Fixture::client_segment("L2: SYN takes the other port", l2, true, move |_| l2.c2f(SYN))
            .check(Check::DistinctSnat(l1, l2)),
    );
    // The backend refuses both (as one whose listener is gone does): the reply entries, which a
    // port's quiet time is judged by (late backend packets are what a reused port would catch),
    // are last seen then.
    t.push(
        Fixture::backend_segment("L1: the backend refuses it (RST)", l1, move |l| l1.b2g(l, RST | ACK).with(|p| p.ack = 1001))
            .check(Check::State(l1, State::Reset)),
    );
    t.push(
        Fixture::backend_segment("L2: the backend refuses it too, a tick later", l2, move |l| {
            l2.b2g(l, RST | ACK).with(|p| p.ack = 1001)
        })
        // More than one tick (1-10 ms): L1 is then strictly the one quiet longest.
        .setup(Setup::Sleep(Duration::from_millis(25)))
        .check(Check::State(l2, State::Reset)),
    );
    t.push(Fixture::drop(
        "L3: SYN while both ports are in their grace and quiet under 250 ms: dropped",
        Side::Client,
        l3.c2f(SYN).bytes(),
        DropSnatExhausted,
    ));
    t.push(
        Fixture::client_segment(
            "L3 again 300 ms on: takes the port of the connection quiet longest (L1), whose entries go",
            l3,
            true,
            move |_| l3.c2f(SYN),
        )
        .setup(Setup::Sleep(Duration::from_millis(300)))
        .counts(SnatReclaimed)
        .check(Check::TookOver(l3, vec![l1])),
    );

    // ---- T: the last resort leaves a port the backend holds in TIME_WAIT for last ------------------
    // T1's backend closes first, so it holds T1's 4-tuple in TIME_WAIT for a minute; T2's client
    // closes first, a tick later. T3 then finds both ports in their grace: it must take T2's,
    // which is free in a second, not T1's, though T1 has been quiet longer.
    let t1 = Conn::to_a("T1", 51020);
    let t2 = Conn::to_a("T2", 51021);
    let t3 = Conn::to_a("T3", 51022);
    let first = t.len();
    handshake(&mut t, t1);
    // Outside the other blocks' ranges, so no earlier connection holds these ports.
    t[first].setup.push(Setup::SnatRange(60004, 60005));
    handshake(&mut t, t2);
    t.last_mut().expect("handshake pushed").checks.push(Check::DistinctSnat(t1, t2));
    t.push(
        Fixture::backend_segment("T1: FIN from the backend", t1, move |l| {
            t1.b2g(l, FIN | ACK).with(|p| {
                p.seq = 5001;
                p.ack = 1001;
            })
        })
        .check(Check::State(t1, FinFromBackend)),
    );
    t.push(
        Fixture::client_segment("T1: FIN from the client", t1, false, move |_| {
            t1.c2f(FIN | ACK).with(|p| {
                p.seq = 1001;
                p.ack = 5002;
            })
        })
        .check(Check::State(t1, BackendTimeWait)),
    );
    t.push(
        Fixture::backend_segment("T1: the backend's last ACK (it is in TIME_WAIT now)", t1, move |l| {
            t1.b2g(l, ACK).with(|p| {
                p.seq = 5002;
                p.ack = 1002;
            })
        })
        .check(Check::State(t1, BackendTimeWait)),
    );
    t.push(
        Fixture::client_segment("T2: FIN from the client, a tick later", t2, false, move |_| {
            t2.c2f(FIN | ACK).with(|p| {
                p.seq = 1001;
                p.ack = 5001;
            })
        })
        // More than one tick (1-10 ms), so T1's entries are strictly the ones quiet longest.
        .setup(Setup::Sleep(Duration::from_millis(25)))
        .check(Check::State(t2, FinFromClient)),
    );
    t.push(
        Fixture::backend_segment("T2: FIN from the backend", t2, move |l| {
            t2.b2g(l, FIN | ACK).with(|p| {
                p.seq = 5001;
                p.ack = 1002;
            })
        })
        .check(Check::State(t2, Closing)),
    );
    t.push(
        Fixture::client_segment(
            "T3: SYN 300 ms on, both ports in their grace: takes T2's (free in a second), not T1's (TIME_WAIT)",
            t3,
            true,
            move |_| t3.c2f(SYN),
        )
        .setup(Setup::Sleep(Duration::from_millis(300)))
        .counts(SnatReclaimed)
        .check(Check::TookOver(t3, vec![t2]))
        .check(Check::State(t1, BackendTimeWait)),
    );
    t.push(
        Fixture::client_segment(
            "T1: the client's FIN again, past a zero closing timeout: still forwarded (kept for the backend's TIME_WAIT)",
            t1,
            false,
            move |_| {
                t1.c2f(FIN | ACK).with(|p| {
                    p.seq = 1001;
                    p.ack = 5002;
                })
            },
        )
        .setup(Setup::Timeout(Closing, 0))
        .setup(Setup::Sleep(Duration::from_millis(30)))
        .check(Check::State(t1, BackendTimeWait)),
    );

    // ---- U: FINs that cross ------------------------------------------------------------------------
    // The client's FIN reaches the gateway first, but the backend had sent its own before the
    // client's reached it (its FIN acknowledges only the client's data): both ends close actively
    // and both hold TIME_WAIT, the backend's on the SNAT 4-tuple. (T2 above is the other case: the
    // backend's FIN acknowledges the client's, and the connection is `Closing`.)
    let u1 = Conn::to_a("U1", 51023);
    let first = t.len();
    handshake(&mut t, u1);
    // Block T's ports are still held.
    t[first].setup.push(Setup::SnatRange(60006, 60007));
    t.push(
        Fixture::client_segment("U1: FIN from the client", u1, false, move |_| {
            u1.c2f(FIN | ACK).with(|p| {
                p.seq = 1001;
                p.ack = 5001;
            })
        })
        .check(Check::State(u1, FinFromClient)),
    );
    t.push(
        Fixture::backend_segment("U1: the backend's FIN, sent before the client's arrived (FINs crossed)", u1, move |l| {
            u1.b2g(l, FIN | ACK).with(|p| {
                p.seq = 5001;
                p.ack = 1001;
            })
        })
        .check(Check::State(u1, BackendTimeWait)),
    );
    t.push(
        Fixture::backend_segment("U1: the backend acknowledges the client's FIN", u1, move |l| {
            u1.b2g(l, ACK).with(|p| {
                p.seq = 5002;
                p.ack = 1002;
            })
        })
        .check(Check::State(u1, BackendTimeWait)),
    );
    t.push(
        Fixture::client_segment(
            "U1: the client's FIN again, past a zero closing timeout: still forwarded (the backend's TIME_WAIT)",
            u1,
            false,
            move |_| {
                u1.c2f(FIN | ACK).with(|p| {
                    p.seq = 1001;
                    p.ack = 5002;
                })
            },
        )
        .setup(Setup::Timeout(Closing, 0))
        .setup(Setup::Sleep(Duration::from_millis(30)))
        .check(Check::State(u1, BackendTimeWait)),
    );

    // ---- V, W: removing a connection's other entry only while it is still that connection's -------
    // Once one of a connection's entries is gone (evicted when the table is full, or collected),
    // its key can go to a later connection, which must then not lose it with the old one.
    // V1's client entry goes; the client opens a new connection on the same 4-tuple (on another
    // port); V2 then takes over V1's old port, and with it removes the old connection's entries:
    // the client entry under V1's 4-tuple is the new connection's now, and must stay.
    let v1 = Conn::to_a("V1", 51024);
    let v2 = Conn::to_a("V2", 51025);
    let first = t.len();
    handshake(&mut t, v1);
    t[first].setup.extend([Setup::DefaultTimeouts, Setup::SnatRange(60008, 60008)]);
    close_client_first(&mut t, v1);
    let first = t.len();
    handshake(&mut t, v1);
    t[first].description = "V1: SYN again, its client entry evicted: a new connection (its old port is still in its grace)".into();
    t[first].setup.extend([Setup::Forget(v1, Direction::Original), Setup::SnatRange(60008, 60009)]);
    t.push(
        Fixture::client_segment("V2: SYN takes over V1's old port, expired", v2, true, move |_| v2.c2f(SYN))
            .setup(Setup::SnatRange(60008, 60008))
            .setup(Setup::Timeout(Closing, 0))
            .setup(Setup::Sleep(Duration::from_millis(30)))
            .counts(SnatReclaimed)
            .check(Check::State(v2, SynSent))
            .check(Check::State(v1, Established)),
    );
    t.push(
        Fixture::client_segment("V1: the new connection's data still forwarded", v1, false, move |_| {
            v1.c2f(ACK).with(|p| {
                p.seq = 1001;
                p.ack = 5001;
            })
        })
        .check(Check::State(v1, Established)),
    );
    // W1's reply entry goes, so its port is free; W2 takes it. W1's client then opens a new
    // connection on its 4-tuple, which removes the old one's entries: the reply entry under W1's
    // old port is W2's now, and must stay.
    let w1 = Conn::to_a("W1", 51026);
    let w2 = Conn::to_a("W2", 51027);
    let first = t.len();
    handshake(&mut t, w1);
    t[first].setup.extend([Setup::DefaultTimeouts, Setup::SnatRange(60010, 60010)]);
    close_client_first(&mut t, w1);
    let first = t.len();
    handshake(&mut t, w2);
    t[first].description = "W2: SYN, W1's reply entry evicted: takes its port, free".into();
    t[first].setup.push(Setup::Forget(w1, Direction::Reply));
    t.push(
        Fixture::client_segment("W1: SYN again on its 4-tuple: a new connection (its old port is W2's now)", w1, true, move |_| {
            w1.c2f(SYN).with(|p| p.seq = 700_000)
        })
        .setup(Setup::SnatRange(60010, 60011))
        .check(Check::State(w1, SynSent))
        .check(Check::State(w2, Established)),
    );
    t.push(
        Fixture::backend_segment("W2: the backend's data still reaches its client", w2, move |l| {
            w2.b2g(l, ACK).with(|p| {
                p.seq = 5001;
                p.ack = 1001;
            })
        })
        .check(Check::State(w2, Established)),
    );

    t
}

/// The client's FIN, then the backend's acknowledging it: `Closing`.
fn close_client_first(t: &mut Vec<Fixture>, c: Conn) {
    let n = c.name;
    t.push(
        Fixture::client_segment(format!("{n}: FIN from the client"), c, false, move |_| {
            c.c2f(FIN | ACK).with(|p| {
                p.seq = 1001;
                p.ack = 5001;
            })
        })
        .check(Check::State(c, State::FinFromClient)),
    );
    t.push(
        Fixture::backend_segment(format!("{n}: FIN from the backend"), c, move |l| {
            c.b2g(l, FIN | ACK).with(|p| {
                p.seq = 5001;
                p.ack = 1002;
            })
        })
        .check(Check::State(c, State::Closing)),
    );
}

/// SYN, SYN-ACK, ACK for `c` (client ISN 1000, backend ISN 5000).
pub fn handshake(t: &mut Vec<Fixture>, c: Conn) {
    let n = c.name;
    t.push(
        Fixture::client_segment(format!("{n}: SYN"), c, true, move |_| c.c2f(SYN))
            .check(Check::State(c, State::SynSent)),
    );
    t.push(
        Fixture::backend_segment(format!("{n}: SYN-ACK"), c, move |l| c.b2g(l, SYN | ACK).with(|p| p.ack = 1001))
            .check(Check::State(c, State::SynAcked)),
    );
    t.push(
        Fixture::client_segment(format!("{n}: ACK"), c, false, move |_| {
            c.c2f(ACK).with(|p| {
                p.seq = 1001;
                p.ack = 5001;
            })
        })
        .check(Check::State(c, State::Established)),
    );
}

// ---------------------------------------------------------------------------------------------
// The harness.
// ---------------------------------------------------------------------------------------------

/// What one BPF_PROG_TEST_RUN returned.
#[derive(Debug)]
pub struct Outcome {
    pub action: u32,
    pub output: Vec<u8>,
    pub duration: Duration,
}

/// Which of kpf's programs the harness runs packets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// `kpf` (native XDP), with an xdp_md context.
    Xdp,
    /// `kpf_generic` (generic XDP), the same way.
    XdpGeneric,
    /// `kpf_tc`, with a __sk_buff context; its verdicts are mapped onto the XDP ones
    /// (TC_ACT_UNSPEC: pass, TC_ACT_SHOT: drop, TC_ACT_REDIRECT: the XDP_TX or XDP_REDIRECT expected).
    Tc,
}

/// The loaded program in the gateway namespace, plus what the table has learned.
pub struct Harness<'a> {
    pub gw: &'a Netns,
    pub attach: Attach,
    pub dp: Dataplane,
    pub ifaces: Ifaces,
    pub config: Config,
    pub learned: Learned,
    /// Indices of fixtures the kernel refused to run.
    pub skipped: Vec<usize>,
}

type FlowMap = HashMap<FlowKey, Flow>;

/// One BPF_PROG_TEST_RUN of `program` on `data` with context `ctx`.
fn test_run<P>(program: &P, data: &[u8], ctx: &[u8], repeat: u32) -> Result<Outcome>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; data.len() + 256];
    let r = program.test_run(TestRunOptions {
        data_in: Some(data),
        data_out: Some(&mut out),
        ctx_in: Some(ctx),
        repeat,
        ..TestRunOptions::default()
    })?;
    out.truncate(r.data_size_out as usize);
    Ok(Outcome { action: r.return_value, output: out, duration: r.duration })
}

fn fe_stats_tuple(s: kpf_common::FrontendStats) -> (u64, u64, u64) {
    (s.packets, s.bytes, s.new_flows)
}

impl<'a> Harness<'a> {
    /// Must run on a thread inside `gw`.
    pub fn new(gw: &'a Netns) -> Result<Harness<'a>> {
        let ifaces = Ifaces {
            c0: kpf::loader::ifindex("c0")?,
            b0: kpf::loader::ifindex("b0")?,
            x0: kpf::loader::ifindex("x0")?,
        };
        let mut dp = Dataplane::load(MAX_FLOWS)?;
        dp.register_iface(ifaces.c0, 1500)?;
        dp.register_iface(ifaces.b0, 1500)?;
        let config = Config::default();
        assert_eq!((config.snat_port_min, config.snat_port_max), (SNAT_MIN, SNAT_MAX));
        dp.set_kernel_config(&config)?;
        // What the daemon keeps there: the gateway's own addresses, where wildcard frontends answer.
        dp.set_local_addrs(&[GW_C, GW_B, GW_X].into_iter().collect())?;
        for (addr, port, id, backend) in FRONTENDS {
            // Each frontend's one backend gets the frontend's id as its backend id.
            let flags = kpf_common::Backend::PRESENT;
            dp.set_backend(id, kpf_common::Backend { addr: wire::addr(backend), port: wire::port(BACKEND_PORT), flags })?;
            dp.set_frontend(frontend_key(addr, port), Frontend { id, target: id, ..Frontend::default() })?;
        }
        Ok(Harness { gw, attach: Attach::Xdp, dp, ifaces, config, learned: Learned::default(), skipped: Vec::new() })
    }

    /// Whether `e` is the tc test run refusing `data` as too short: the skb test run wants a whole
    /// IPv4 header behind an IPv4 EtherType.
    pub fn skb_test_run_refused(&self, data: &[u8], e: &(dyn std::error::Error + 'static)) -> bool {
        self.attach == Attach::Tc && data.len() < 14 + 20 && errno_of(e) == Some(libc::EINVAL)
    }

    /// Runs the program once (or `repeat` times) on `data` (`meta_len` bytes of metadata, then
    /// the frame) arriving on `ingress`.
    pub fn run_packet(&mut self, ingress: u32, meta_len: usize, data: &[u8], repeat: u32) -> Result<Outcome> {
        if self.attach == Attach::Tc {
            return self.run_packet_tc(ingress, data, repeat);
        }
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        // The kernel wants data_end == data_size_in and data == the metadata length.
        let md: [u32; 6] = [meta_len as u32, data.len() as u32, 0, ingress, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mode = if self.attach == Attach::XdpGeneric { AttachMode::Generic } else { AttachMode::Native };
        test_run(self.dp.xdp_program_mut(mode)?, data, &ctx, repeat)
    }

    /// [`Harness::run_packet`] through the tc program; the action is mapped to an XDP one.
    fn run_packet_tc(&mut self, ingress: u32, data: &[u8], repeat: u32) -> Result<Outcome> {
        // struct __sk_buff (192 bytes): the kernel takes ingress_ifindex (offset 36) and ifindex
        // (40), and wants every field it does not take left zero.
        let mut ctx = vec![0u8; 192];
        ctx[36..40].copy_from_slice(&ingress.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ingress.to_ne_bytes());
        let mut out = test_run(self.dp.tc_program_mut()?, data, &ctx, repeat)?;
        // kpf passes with TC_ACT_UNSPEC (tcx: on to the next program, then the kernel).
        const TC_ACT_UNSPEC: u32 = -1i32 as u32;
        const TC_ACT_SHOT: u32 = 2;
        const TC_ACT_REDIRECT: u32 = 7;
        out.action = match out.action {
            TC_ACT_UNSPEC => Action::Pass as u32,
            TC_ACT_SHOT => Action::Drop as u32,
            TC_ACT_REDIRECT => Action::Redirect as u32,
            // Nothing kpf returns: shown as is, plus 100, so it cannot match an expectation.
            other => 100 + other,
        };
        Ok(out)
    }

    fn counters(&self) -> Result<Vec<u64>> {
        Ok(self.dp.counters()?.into_iter().map(|(_, v)| v).collect())
    }

    fn flow_map(&self) -> Result<FlowMap> {
        Ok(self.dp.flows()?.into_iter().collect())
    }

    fn fe_stats(&self) -> Result<Vec<(u64, u64, u64)>> {
        FRONTENDS.iter().map(|f| Ok(fe_stats_tuple(self.dp.frontend_stats(f.2)?))).collect()
    }

    fn apply(&mut self, s: &Setup) -> Result<()> {
        match *s {
            Setup::Neigh { addr, mac, dev } => set_neigh(self.gw, addr, mac, dev)?,
            Setup::FibGen(g) => {
                self.config.fib_gen = g;
                self.dp.set_kernel_config(&self.config)?;
            }
            Setup::NeighDel { addr, dev } => {
                self.gw.ip(&["neigh", "del", &addr.to_string(), "dev", dev])?;
            }
            Setup::SnatRange(min, max) => {
                self.config.snat_port_min = min;
                self.config.snat_port_max = max;
                self.dp.set_kernel_config(&self.config)?;
            }
            Setup::Timeout(state, ns) => {
                self.config.timeouts_ns[State::slot(state as u8)] = ns;
                self.dp.set_kernel_config(&self.config)?;
            }
            Setup::DefaultTimeouts => {
                self.config.timeouts_ns = Config::default().timeouts_ns;
                self.dp.set_kernel_config(&self.config)?;
            }
            Setup::Sleep(d) => std::thread::sleep(d),
            Setup::Ip(args) => {
                self.gw.ip(args)?;
            }
            Setup::Forget(conn, dir) => {
                let key = match dir {
                    Direction::Original => conn.client_key(),
                    Direction::Reply => conn.reply_key(self.learned.snat(conn.name)),
                };
                self.dp.remove_flow(&key)?;
            }
        }
        Ok(())
    }

    /// Runs one fixture and says how it went.
    pub fn run_fixture(&mut self, f: &Fixture) -> Verdict {
        let mut errs = Vec::new();
        match self.run_fixture_inner(f, &mut errs) {
            Ok(Some(skip)) => return Verdict::Skipped(skip),
            Ok(None) => {}
            Err(e) => errs.push(format!("harness error: {}", error_chain(&*e))),
        }
        if errs.is_empty() { Verdict::Ok } else { Verdict::Failed(errs) }
    }

    fn run_fixture_inner(&mut self, f: &Fixture, errs: &mut Vec<String>) -> Result<Option<String>> {
        if self.attach == Attach::Tc && f.meta_len > 0 {
            return Ok(Some("XDP only: runs a frame shorter than Ethernet behind XDP metadata".into()));
        }
        if matches!(f.expect, Expect::Forward { l4: L4Sum::Partial, .. }) {
            match self.attach {
                Attach::XdpGeneric => {}
                // tc asks the kernel, and a test-run skb is never CHECKSUM_PARTIAL (the e2e tests
                // cover it).
                Attach::Tc => return Ok(Some("generic XDP only: a CHECKSUM_PARTIAL socket buffer".into())),
                // A driver hands native XDP complete checksums only.
                Attach::Xdp => return Ok(Some("generic XDP only: native XDP never sees CHECKSUM_PARTIAL".into())),
            }
        }
        for s in &f.setup {
            self.apply(s)?;
        }
        let frame = (f.input)(&self.learned);
        let mut data = vec![0u8; f.meta_len];
        data.extend_from_slice(&frame);

        let counters_before = self.counters()?;
        let flows_before = self.flow_map()?;
        let fe_before = self.fe_stats()?;
        // The dataplane's clock, read only for the fixtures that check stamps (a test run each).
        let stamped = f.checks.iter().any(|c| matches!(c, Check::Stamped(_)));
        let clock_before = if stamped { self.dp.now_ns()? } else { 0 };
        let out = match self.run_packet(self.ifaces.of(f.ingress), f.meta_len, &data, 1) {
            Ok(out) => out,
            Err(e) if f.kernel_may_refuse && errno_of(&*e) == Some(libc::EINVAL) => {
                return Ok(Some(format!("this kernel refuses the input ({})", error_chain(&*e))));
            }
            Err(e) if self.skb_test_run_refused(&data, &*e) => {
                return Ok(Some(format!("the skb test run refuses a {}-byte frame ({})", data.len(), error_chain(&*e))));
            }
            Err(e) => return Err(e),
        };
        let clock_after = if stamped { self.dp.now_ns()? } else { 0 };
        let counters_after = self.counters()?;
        let flows_after = self.flow_map()?;
        let fe_after = self.fe_stats()?;

        // Learn SNAT ports first: expected outputs depend on them.
        for c in &f.checks {
            if let Check::Learn(conn) = c
                && let Err(e) = self.learn(conn, &flows_after, self.ifaces.of(f.ingress))
            {
                errs.push(e);
            }
        }

        let (want_action, want_counters) = (
            match &f.expect {
                Expect::Pass(_) => Action::Pass,
                Expect::Drop(_) => Action::Drop,
                // tc has one way out: a redirect (to the ingress interface's egress for XDP_TX).
                Expect::Forward { .. } if self.attach == Attach::Tc => Action::Redirect,
                Expect::Forward { action, .. } => *action,
            },
            f.expected_counters(),
        );
        if out.action != want_action as u32 {
            errs.push(format!(
                "action: got {} ({}), expected {}",
                Action::name(out.action),
                out.action,
                Action::name(want_action as u32)
            ));
        }

        match &f.expect {
            Expect::Pass(_) | Expect::Drop(_) => {
                if matches!(f.expect, Expect::Pass(_)) && out.output != data {
                    errs.push(format!("XDP_PASS frame was modified:\n{}", hex_diff(&data, &out.output)));
                }
                if flows_before != flows_after {
                    errs.push(format!(
                        "conntrack changed ({} -> {} entries); new keys: {:?}",
                        flows_before.len(),
                        flows_after.len(),
                        flows_after.keys().filter(|k| !flows_before.contains_key(k)).map(fmt_key).collect::<Vec<_>>()
                    ));
                }
                if fe_before != fe_after {
                    errs.push(format!("frontend stats changed: {fe_before:?} -> {fe_after:?}"));
                }
            }
            Expect::Forward { frontend_id, new_flow, l4, output, .. } => {
                let mut want = vec![0u8; f.meta_len];
                want.extend_from_slice(&output(&self.learned));
                if out.output != want {
                    errs.push(format!("output differs from expected:\n{}", hex_diff(&want, &out.output)));
                }
                if out.output.len() >= f.meta_len
                    && let Err(e) = verify_checksums(&out.output[f.meta_len..], *l4)
                {
                    errs.push(format!("checksum re-verification: {e}"));
                }
                let idx = FRONTENDS.iter().position(|fe| fe.2 == *frontend_id).expect("known frontend");
                let mut want_fe = fe_before.clone();
                want_fe[idx].0 += 1;
                want_fe[idx].1 += ip_total_len(&frame);
                want_fe[idx].2 += *new_flow as u64;
                if fe_after != want_fe {
                    errs.push(format!(
                        "frontend stats (packets, bytes, new_flows) by id: got {fe_after:?}, expected {want_fe:?}"
                    ));
                }
            }
        }

        for c in Counter::ALL {
            let i = c as usize;
            let delta = counters_after[i] - counters_before[i];
            let want = want_counters.iter().filter(|&&w| w == c).count() as u64;
            if delta != want {
                errs.push(format!("counter {}: +{delta}, expected +{want}", c.name()));
            }
        }

        for c in &f.checks {
            let r = match c {
                Check::Learn(_) => Ok(()),
                Check::State(conn, s) => self.check_state(conn, *s, &flows_after),
                Check::Reopened(conn) => self.check_reopened(conn, &flows_before, &flows_after),
                Check::DistinctSnat(x, y) => {
                    let (px, py) = (self.learned.snat(x.name), self.learned.snat(y.name));
                    if px == py { Err(format!("{} and {} both hold SNAT port {px}", x.name, y.name)) } else { Ok(()) }
                }
                Check::TookOver(conn, olds) => {
                    let port = self.learned.snat(conn.name);
                    match olds.iter().find(|o| self.learned.snat(o.name) == port) {
                        None => Err(format!(
                            "{}: SNAT port {port} was none of {:?}'s",
                            conn.name,
                            olds.iter().map(|o| o.name).collect::<Vec<_>>()
                        )),
                        Some(o) if flows_after.contains_key(&o.client_key()) => {
                            Err(format!("{}: took {}'s port but {}'s Original entry is still there", conn.name, o.name, o.name))
                        }
                        Some(_) => Ok(()),
                    }
                }
                Check::Stamped(conn) => match flows_after.get(&conn.client_key()) {
                    Some(fl) if (clock_before..=clock_after).contains(&fl.last_seen_ns) && fl.created_ns <= fl.last_seen_ns => {
                        Ok(())
                    }
                    Some(fl) => Err(format!(
                        "{}: stamped created {} / last seen {} ns, outside this run ({clock_before}..={clock_after} ns by the dataplane's clock)",
                        conn.name, fl.created_ns, fl.last_seen_ns
                    )),
                    None => Err(format!("{}: no Original entry", conn.name)),
                },
                Check::NextSeq(conn, dir, want) => {
                    let key = match dir {
                        Direction::Original => conn.client_key(),
                        Direction::Reply => conn.reply_key(self.learned.snat(conn.name)),
                    };
                    match flows_after.get(&key) {
                        Some(fl) if fl.next_seq == *want => Ok(()),
                        Some(fl) => Err(format!("{}: {dir:?} next_seq {}, expected {want}", conn.name, fl.next_seq)),
                        None => Err(format!("{}: no {dir:?} entry", conn.name)),
                    }
                }
                Check::NextHopMac(conn, mac) => match flows_after.get(&conn.client_key()) {
                    Some(fl) if fl.next_hop.dst_mac == *mac && fl.next_hop.fib_gen == self.config.fib_gen => Ok(()),
                    Some(fl) => Err(format!(
                        "{}: cached next hop {} (fib_gen {}), expected {} (fib_gen {})",
                        conn.name,
                        mac_str(fl.next_hop.dst_mac),
                        fl.next_hop.fib_gen,
                        mac_str(*mac),
                        self.config.fib_gen
                    )),
                    None => Err(format!("{}: no Original entry", conn.name)),
                },
                Check::VlanTag(conn) => {
                    let want = conn.vlan.map_or(0, |vid| u16::from_ne_bytes(((3 << 13) | vid).to_be_bytes()));
                    let port = self.learned.snat(conn.name);
                    let got = [conn.client_key(), conn.reply_key(port)].map(|k| flows_after.get(&k).map(|f| f.vlan_tci));
                    if got == [Some(want); 2] {
                        Ok(())
                    } else {
                        Err(format!("{}: entries' tag words {got:04x?}, expected {want:04x} on both", conn.name))
                    }
                }
            };
            if let Err(e) = r {
                errs.push(e);
            }
        }
        Ok(None)
    }

    /// Reads the SNAT port of `conn` from its Original entry and checks both entries.
    fn learn(&mut self, conn: &Conn, flows: &FlowMap, client_ifindex: u32) -> Result<(), String> {
        let n = conn.name;
        let orig = flows.get(&conn.client_key()).ok_or_else(|| format!("{n}: no Original entry after the SYN"))?;
        let port = wire::to_port(orig.nat.src_port);
        let (min, max) = (self.config.snat_port_min, self.config.snat_port_max);
        let mut errs = Vec::new();
        if !(min..=max).contains(&port) {
            errs.push(format!("{n}: SNAT port {port} outside {min}..={max}"));
        }
        let egress = self.ifaces.of(conn.backend_side);
        let want_nat = (wire::addr(conn.gw_addr), wire::addr(*conn.backend.ip()), wire::port(conn.backend.port()));
        if (orig.nat.src_addr, orig.nat.dst_addr, orig.nat.dst_port) != want_nat {
            errs.push(format!("{n}: Original rewrite {:?}", orig.nat));
        }
        if orig.direction != Direction::Original as u8 || orig.frontend_id != conn.frontend_id {
            errs.push(format!("{n}: Original entry direction {} frontend {}", orig.direction, orig.frontend_id));
        }
        if (orig.next_hop.ifindex, orig.next_hop.src_mac, orig.next_hop.dst_mac)
            != (egress, conn.gw_mac, conn.backend_mac)
        {
            errs.push(format!("{n}: Original next hop {:?}, expected ifindex {egress}", orig.next_hop));
        }
        match flows.get(&conn.reply_key(port)) {
            None => errs.push(format!("{n}: no Reply entry for SNAT port {port}")),
            Some(r) => {
                let want = (
                    wire::addr(*conn.frontend.ip()),
                    wire::port(conn.frontend.port()),
                    wire::addr(*conn.client.ip()),
                    wire::port(conn.client.port()),
                );
                if (r.nat.src_addr, r.nat.src_port, r.nat.dst_addr, r.nat.dst_port) != want {
                    errs.push(format!("{n}: Reply rewrite {:?}", r.nat));
                }
                if r.direction != Direction::Reply as u8 || r.frontend_id != conn.frontend_id {
                    errs.push(format!("{n}: Reply entry direction {} frontend {}", r.direction, r.frontend_id));
                }
                if (r.next_hop.ifindex, r.next_hop.src_mac, r.next_hop.dst_mac)
                    != (client_ifindex, conn.frontend_mac, conn.client_mac)
                {
                    errs.push(format!("{n}: Reply next hop {:?}, expected ifindex {client_ifindex}", r.next_hop));
                }
            }
        }
        if let Some(old) = self.learned.snat.insert(n, port) {
            println!("     {n}: reopened, SNAT port {old} -> {port}");
            self.learned.previous.insert(n, old);
        }
        if errs.is_empty() { Ok(()) } else { Err(errs.join("\n")) }
    }

    fn check_state(&self, conn: &Conn, want: State, flows: &FlowMap) -> Result<(), String> {
        let n = conn.name;
        let port = self.learned.snat(n);
        let o = flows.get(&conn.client_key()).map(|f| f.state);
        let r = flows.get(&conn.reply_key(port)).map(|f| f.state);
        let name = |s: Option<u8>| match s {
            None => "missing".to_string(),
            Some(v) => State::from_u8(v).map_or(format!("invalid {v}"), |s| s.name().to_string()),
        };
        if o == Some(want as u8) && r == Some(want as u8) {
            Ok(())
        } else {
            Err(format!("{n}: state Original {} / Reply {}, expected {} on both", name(o), name(r), want.name()))
        }
    }

    fn check_reopened(&self, conn: &Conn, before: &FlowMap, after: &FlowMap) -> Result<(), String> {
        let n = conn.name;
        let Some(&old) = self.learned.previous.get(n) else {
            return Err(format!("{n}: no previous SNAT port recorded"));
        };
        let new = self.learned.snat(n);
        let mut errs = Vec::new();
        let old_key = conn.reply_key(old);
        if !before.contains_key(&old_key) {
            errs.push(format!("{n}: the old reply entry (port {old}) was not there before the new SYN"));
        }
        if new != old {
            if after.contains_key(&old_key) {
                errs.push(format!("{n}: old reply entry (SNAT port {old}) still present after reopening on {new}"));
            }
        } else if let Some(r) = after.get(&old_key)
            && r.packets != 0
        {
            // Same port number chosen again: the entry under it must be the new one.
            errs.push(format!("{n}: reply entry for port {old} is the old one ({} packets)", r.packets));
        }
        match after.get(&conn.client_key()) {
            Some(o) if o.packets == 1 => {}
            Some(o) => errs.push(format!("{n}: Original entry not fresh ({} packets)", o.packets)),
            None => errs.push(format!("{n}: no Original entry")),
        }
        if before.len() != after.len() {
            errs.push(format!(
                "{n}: conntrack went from {} to {} entries (expected a replacement)",
                before.len(),
                after.len()
            ));
        }
        if errs.is_empty() { Ok(()) } else { Err(errs.join("\n")) }
    }

    /// Runs the whole table; returns one report per failing fixture.
    pub fn run_table(&mut self, table: &[Fixture]) -> Vec<String> {
        let mut failures = Vec::new();
        for (i, f) in table.iter().enumerate() {
            match self.run_fixture(f) {
                Verdict::Ok => println!("ok   #{i:02} {}", f.description),
                Verdict::Skipped(why) => {
                    println!("skip #{i:02} {}: {why}", f.description);
                    self.skipped.push(i);
                }
                Verdict::Failed(errs) => {
                    println!("FAIL #{i:02} {}", f.description);
                    let text = format!("#{i:02} {}\n    {}", f.description, errs.join("\n").replace('\n', "\n    "));
                    failures.push(text);
                }
            }
        }
        failures
    }

    /// After the table: the global counters and per-frontend stats equal what the table says its
    /// fixtures should have caused, summed.
    pub fn check_totals(&self, table: &[Fixture]) -> Vec<String> {
        let ran: Vec<&Fixture> =
            table.iter().enumerate().filter(|(i, _)| !self.skipped.contains(i)).map(|(_, f)| f).collect();
        let table = &ran[..];
        let mut failures = Vec::new();
        let got = match self.dp.counters() {
            Ok(c) => c,
            Err(e) => return vec![format!("reading counters: {e}")],
        };
        for (c, v) in got {
            let want = table.iter().flat_map(|f| f.expected_counters()).filter(|&w| w == c).count() as u64;
            println!("counter {:<26} {v:>4} (table expects {want})", c.name());
            if v != want {
                failures.push(format!("totals: counter {} = {v}, the table expects {want}", c.name()));
            }
        }
        for (_, port, id, _) in FRONTENDS {
            let want_new = table
                .iter()
                .filter(
                    |f| matches!(f.expect, Expect::Forward { frontend_id, new_flow: true, .. } if frontend_id == id),
                )
                .count() as u64;
            let want_packets = table
                .iter()
                .filter(|f| matches!(f.expect, Expect::Forward { frontend_id, .. } if frontend_id == id))
                .count() as u64;
            match self.dp.frontend_stats(id) {
                Ok(s) if (s.packets, s.new_flows) == (want_packets, want_new) => {}
                Ok(s) => failures.push(format!(
                    "totals: frontend {id} (:{port}) packets {} new_flows {}, the table expects {want_packets} / {want_new}",
                    s.packets, s.new_flows
                )),
                Err(e) => failures.push(format!("reading frontend {id} stats: {e}")),
            }
        }
        failures
    }
}

/// `10.0.0.10:50000 -> 10.0.0.1:9093` from a wire-order conntrack key.
pub fn fmt_key(k: &FlowKey) -> String {
    format!(
        "{}:{} -> {}:{}",
        wire::to_addr(k.src_addr),
        wire::to_port(k.src_port),
        wire::to_addr(k.dst_addr),
        wire::to_port(k.dst_port)
    )
}

/// How one fixture went.
#[derive(Debug)]
pub enum Verdict {
    Ok,
    Skipped(String),
    Failed(Vec<String>),
}

/// An error with all its sources, `outer: inner: innermost`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

/// The OS error number somewhere in an error's chain.
pub fn errno_of(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && let Some(n) = io.raw_os_error()
        {
            return Some(n);
        }
        cur = c.source();
    }
    None
}

/// A 16-bytes-per-row hex dump of both frames, with `^^` under every differing byte.
pub fn hex_diff(expected: &[u8], got: &[u8]) -> String {
    let mut s = String::new();
    let n = expected.len().max(got.len());
    let _ = writeln!(s, "expected {} bytes, got {} bytes", expected.len(), got.len());
    let cell = |b: Option<&u8>| b.map_or("  ".to_string(), |b| format!("{b:02x}"));
    let mut first = None;
    for row in (0..n).step_by(16) {
        let end = (row + 16).min(n);
        let exp: Vec<String> = (row..end).map(|i| cell(expected.get(i))).collect();
        let gt: Vec<String> = (row..end).map(|i| cell(got.get(i))).collect();
        let diff: Vec<&str> = (row..end).map(|i| if expected.get(i) != got.get(i) { "^^" } else { "  " }).collect();
        if diff.contains(&"^^") {
            first.get_or_insert(row + diff.iter().position(|d| *d == "^^").unwrap_or(0));
            let _ = writeln!(s, "{row:04x} want {}", exp.join(" "));
            let _ = writeln!(s, "{row:04x} got  {}", gt.join(" "));
            let _ = writeln!(s, "          {}", diff.join(" "));
        }
    }
    if let Some(i) = first {
        let _ = writeln!(s, "first difference at byte {i} (0x{i:x})");
    }
    s
}
