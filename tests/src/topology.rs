//! The two test networks, each built from namespaces that are deleted (with every link in them)
//! when the topology is dropped, also when building it failed half way or a test panicked.
//!
//! ```text
//! OneNic: everything on 10.100.0.0/24, one bridge; the gateway answers with XDP_TX on eth0.
//!
//!   client 10.100.0.10 ─┐
//!   gateway 10.100.0.1 ─┤ br0 (switch ns)
//!   b1 .21, b2 .22, b3 .23 ─┘
//!
//! TwoNic: the gateway redirects between its two interfaces.
//!
//!   client 10.100.1.10 ── eth0 gateway eth1 10.100.2.1 ── br0 (switch ns) ── b1 .21, b2 .22, b3 .23
//!                       10.100.1.1                                          (10.100.2.0/24)
//! ```
//!
//! What every topology applies, because of how veth behaves on these machines:
//! - A frame sent by XDP (XDP_TX, or a redirect) into a veth lands in the *peer's* NAPI ring; a
//!   peer without NAPI drops it silently. So the peer of every gateway interface (the bridge port,
//!   or the client's end) gets `gro on`, which gives it NAPI.
//! - Locally sent packets carry CHECKSUM_PARTIAL (the checksum is left to "hardware"), which
//!   native veth XDP loses. So every endpoint (client, backends) has `tx off rx off`: it computes
//!   full checksums in software and verifies every checksum it receives. The gateway interfaces
//!   and bridge ports have `rx off` too, so nothing along the way marks a packet as verified.
//! - XDP_TX is stricter still: the kernel only kicks the peer's NAPI after XDP_TX when the peer
//!   has an XDP program itself (`veth_xdp_flush`), so with `gro on` alone the frames sit in the
//!   peer's ring until unrelated traffic drains it. The peer of a gateway interface that answers
//!   with XDP_TX (OneNic's bridge port) therefore also gets a do-nothing XDP_PASS program
//!   ([`crate::xdp`]). Redirects flush the peer themselves and need only `gro on`.
//! - Senders get a `pfifo` qdisc: with the default `noqueue` a full veth ring drops packets; a
//!   qdisc queues them instead.

use std::{io, net::Ipv4Addr};

use crate::{
    netns::{Netns, veth},
    xdp::{self, XdpPass},
};

/// The port the backends listen on.
pub const BACKEND_PORT: u16 = 39092;

/// What the tests, the demo and the benchmark need from a topology.
pub trait Topology {
    /// Short name, e.g. `one-nic`.
    fn name(&self) -> &'static str;
    fn client(&self) -> &Netns;
    fn gateway(&self) -> &Netns;
    /// b1, b2, b3 in order.
    fn backends(&self) -> &[Netns];
    fn client_addr(&self) -> Ipv4Addr;
    /// The gateway address the client connects to (the frontends' address).
    fn frontend_addr(&self) -> Ipv4Addr;
    /// The backends' addresses, in the order of [`Topology::backends`].
    fn backend_addrs(&self) -> &[Ipv4Addr];
    /// The gateway interfaces kpf attaches to.
    fn gateway_interfaces(&self) -> &[&'static str];
    /// Every namespace of this topology (for cleanup checks).
    fn namespaces(&self) -> Vec<&Netns>;
    /// The switch, and its ports facing endpoints (client or backends).
    fn endpoint_ports(&self) -> (&Netns, Vec<String>);
}

/// Backend identities, in order.
pub const BACKEND_NAMES: [&str; 3] = ["b1", "b2", "b3"];

pub(crate) fn addr(ns: &Netns, dev: &str, cidr: &str) -> io::Result<()> {
    ns.ip(&["addr", "add", cidr, "dev", dev]).map(drop)
}

/// An endpoint's interface: software checksums both ways, and a queue in front of the veth.
pub(crate) fn endpoint(ns: &Netns, dev: &str) -> io::Result<()> {
    ns.ethtool_k(dev, &["tx", "off", "rx", "off"])?;
    ns.run("tc", &["qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "10000"]).map(drop)
}

/// Makes the endpoints send as Linux hosts normally do, with checksum and segmentation offload:
/// their segments reach the gateway as CHECKSUM_PARTIAL GSO aggregates (up to 64 KB, checksum
/// field holding only the pseudo-header sum), which is what kpf's tc and generic XDP modes have
/// to handle. The gateway's interfaces get `tx off`, so everything the gateway forwards has its
/// checksums completed, and is segmented, in software on the way out, from what kpf left in the
/// packet; the receivers keep `rx off` and verify every checksum. Not for native XDP: veth XDP
/// loses CHECKSUM_PARTIAL (see `endpoint`).
pub fn sender_offloads(topo: &impl Topology) -> io::Result<()> {
    endpoint_tx_offloads(topo, true)?;
    gateway_tx_off(topo)
}

/// As [`sender_offloads`], but the senders leave only their checksums to offload, and segment
/// themselves: every segment is CHECKSUM_PARTIAL and none is larger than the MTU.
pub fn sender_checksum_offload(topo: &impl Topology) -> io::Result<()> {
    endpoints_ethtool(topo, &["tx", "on", "tso", "off", "gso", "off"])?;
    gateway_tx_off(topo)
}

/// Makes the switch complete, in software, the checksum of every packet it delivers to an
/// endpoint (`tx off` on the endpoints' ports), so that the receiver verifies it. For generic XDP:
/// it sends with the driver's transmit directly (`generic_xdp_tx`), past the stack's software
/// checksum for a `tx off` gateway interface, and a receiver takes a CHECKSUM_PARTIAL packet as
/// verified, so without this nobody would check what kpf left in such a packet's checksum field.
/// (TwoNic's client is not behind the switch: only the packets to the backends are checked there.)
pub fn switch_completes_checksums(topo: &impl Topology) -> io::Result<()> {
    let (sw, ports) = topo.endpoint_ports();
    for port in &ports {
        sw.ethtool_k(port, &["tx", "off"])?;
    }
    Ok(())
}

fn gateway_tx_off(topo: &impl Topology) -> io::Result<()> {
    for dev in topo.gateway_interfaces() {
        topo.gateway().ethtool_k(dev, &["tx", "off"])?;
    }
    Ok(())
}

/// Turns the endpoints' (client's and backends') transmit checksum and segmentation offload on or
/// off. Receive checksumming stays off, so receivers verify every checksum either way.
pub fn endpoint_tx_offloads(topo: &impl Topology, on: bool) -> io::Result<()> {
    endpoints_ethtool(topo, if on { &["tx", "on", "tso", "on", "gso", "on"] } else { &["tx", "off"] })
}

/// `ethtool -K eth0 FEATURES` on the client and every backend.
fn endpoints_ethtool(topo: &impl Topology, features: &[&str]) -> io::Result<()> {
    for ns in std::iter::once(topo.client()).chain(topo.backends()) {
        ns.ethtool_k("eth0", features)?;
    }
    Ok(())
}

fn switch_with_bridge() -> io::Result<Netns> {
    let sw = Netns::new("sw")?;
    sw.ip(&["link", "add", "name", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"])?;
    sw.ip(&["link", "set", "dev", "br0", "up"])?;
    Ok(sw)
}

/// Plugs `ns`'s `dev` into the switch's bridge through port `port`. `gateway_side` marks the
/// port that faces a gateway interface: it receives XDP frames, so it needs NAPI (`gro on`).
fn plug(sw: &Netns, port: &str, ns: &Netns, dev: &str, gateway_side: bool) -> io::Result<()> {
    veth(ns, dev, sw, port)?;
    sw.ip(&["link", "set", "dev", port, "master", "br0"])?;
    let features: &[&str] = if gateway_side { &["rx", "off", "gro", "on"] } else { &["rx", "off"] };
    sw.ethtool_k(port, features)?;
    // The bridge sends into every port; queue rather than drop when a veth ring is full.
    sw.run("tc", &["qdisc", "replace", "dev", port, "root", "pfifo", "limit", "10000"]).map(drop)
}

pub(crate) fn gateway_ns() -> io::Result<Netns> {
    let gw = Netns::new("gw")?;
    gw.sysctl("net.ipv4.conf.all.forwarding", "1")?;
    Ok(gw)
}

fn backends(sw: &Netns, net: [u8; 3], default_via: Option<Ipv4Addr>) -> io::Result<(Vec<Netns>, Vec<Ipv4Addr>)> {
    let mut nses = Vec::new();
    let mut addrs = Vec::new();
    for (i, name) in BACKEND_NAMES.iter().enumerate() {
        let ns = Netns::new(name)?;
        let a = Ipv4Addr::new(net[0], net[1], net[2], 21 + i as u8);
        plug(sw, &format!("p-{name}"), &ns, "eth0", false)?;
        addr(&ns, "eth0", &format!("{a}/24"))?;
        endpoint(&ns, "eth0")?;
        if let Some(gw) = default_via {
            ns.ip(&["route", "add", "default", "via", &gw.to_string()])?;
        }
        nses.push(ns);
        addrs.push(a);
    }
    Ok((nses, addrs))
}

/// One gateway interface on a shared bridge: client, gateway and backends on 10.100.0.0/24.
#[derive(Debug)]
pub struct OneNic {
    pub switch: Netns,
    pub gateway: Netns,
    pub client: Netns,
    /// b1, b2, b3.
    pub backends: Vec<Netns>,
    /// 10.100.0.1 on the gateway's eth0.
    pub gateway_addr: Ipv4Addr,
    /// 10.100.0.10 on the client's eth0.
    pub client_addr: Ipv4Addr,
    /// 10.100.0.21, .22, .23.
    pub backend_addrs: Vec<Ipv4Addr>,
    /// `["eth0"]`.
    pub gateway_ifaces: Vec<&'static str>,
    /// XDP_PASS on the bridge port facing the gateway, so XDP_TX frames are picked up.
    pub peer_xdp: XdpPass,
}

impl OneNic {
    pub fn new() -> io::Result<OneNic> {
        let switch = switch_with_bridge()?;

        let gateway = gateway_ns()?;
        let gateway_addr = Ipv4Addr::new(10, 100, 0, 1);
        plug(&switch, "p-gw", &gateway, "eth0", true)?;
        addr(&gateway, "eth0", &format!("{gateway_addr}/24"))?;
        gateway.ethtool_k("eth0", &["rx", "off"])?;
        let peer_xdp = xdp::attach_pass(&switch, "p-gw")?;

        let client = Netns::new("cl")?;
        let client_addr = Ipv4Addr::new(10, 100, 0, 10);
        plug(&switch, "p-cl", &client, "eth0", false)?;
        addr(&client, "eth0", &format!("{client_addr}/24"))?;
        endpoint(&client, "eth0")?;

        let (backends, backend_addrs) = backends(&switch, [10, 100, 0], None)?;
        Ok(OneNic {
            switch,
            gateway,
            client,
            backends,
            gateway_addr,
            client_addr,
            backend_addrs,
            gateway_ifaces: vec!["eth0"],
            peer_xdp,
        })
    }
}

impl Topology for OneNic {
    fn name(&self) -> &'static str {
        "one-nic"
    }
    fn client(&self) -> &Netns {
        &self.client
    }
    fn gateway(&self) -> &Netns {
        &self.gateway
    }
    fn backends(&self) -> &[Netns] {
        &self.backends
    }
    fn client_addr(&self) -> Ipv4Addr {
        self.client_addr
    }
    fn frontend_addr(&self) -> Ipv4Addr {
        self.gateway_addr
    }
    fn backend_addrs(&self) -> &[Ipv4Addr] {
        &self.backend_addrs
    }
    fn gateway_interfaces(&self) -> &[&'static str] {
        &self.gateway_ifaces
    }
    fn namespaces(&self) -> Vec<&Netns> {
        let mut v = vec![&self.switch, &self.gateway, &self.client];
        v.extend(&self.backends);
        v
    }
    fn endpoint_ports(&self) -> (&Netns, Vec<String>) {
        (&self.switch, ["cl"].iter().chain(&BACKEND_NAMES).map(|n| format!("p-{n}")).collect())
    }
}

/// Two gateway interfaces: the client on 10.100.1.0/24 straight on eth0, the backends on
/// 10.100.2.0/24 behind a bridge on eth1.
#[derive(Debug)]
pub struct TwoNic {
    pub switch: Netns,
    pub gateway: Netns,
    pub client: Netns,
    /// b1, b2, b3.
    pub backends: Vec<Netns>,
    /// 10.100.1.1 on the gateway's eth0 (the client side): the frontends' address.
    pub gateway_client_addr: Ipv4Addr,
    /// 10.100.2.1 on the gateway's eth1 (the backend side): the SNAT source address.
    pub gateway_backend_addr: Ipv4Addr,
    /// 10.100.1.10.
    pub client_addr: Ipv4Addr,
    /// 10.100.2.21, .22, .23.
    pub backend_addrs: Vec<Ipv4Addr>,
    /// `["eth0", "eth1"]`: client side, backend side.
    pub gateway_ifaces: Vec<&'static str>,
}

impl TwoNic {
    pub fn new() -> io::Result<TwoNic> {
        let switch = switch_with_bridge()?;
        let gateway = gateway_ns()?;
        let client = Netns::new("cl")?;

        let gateway_client_addr = Ipv4Addr::new(10, 100, 1, 1);
        let client_addr = Ipv4Addr::new(10, 100, 1, 10);
        veth(&gateway, "eth0", &client, "eth0")?;
        addr(&gateway, "eth0", &format!("{gateway_client_addr}/24"))?;
        gateway.ethtool_k("eth0", &["rx", "off"])?;
        addr(&client, "eth0", &format!("{client_addr}/24"))?;
        endpoint(&client, "eth0")?;
        // The client's end is the peer of a gateway interface: it receives redirected frames.
        client.ethtool_k("eth0", &["gro", "on"])?;
        client.ip(&["route", "add", "default", "via", &gateway_client_addr.to_string()])?;

        let gateway_backend_addr = Ipv4Addr::new(10, 100, 2, 1);
        plug(&switch, "p-gw", &gateway, "eth1", true)?;
        addr(&gateway, "eth1", &format!("{gateway_backend_addr}/24"))?;
        gateway.ethtool_k("eth1", &["rx", "off"])?;

        let (backends, backend_addrs) = backends(&switch, [10, 100, 2], Some(gateway_backend_addr))?;
        Ok(TwoNic {
            switch,
            gateway,
            client,
            backends,
            gateway_client_addr,
            gateway_backend_addr,
            client_addr,
            backend_addrs,
            gateway_ifaces: vec!["eth0", "eth1"],
        })
    }
}

impl Topology for TwoNic {
    fn name(&self) -> &'static str {
        "two-nic"
    }
    fn client(&self) -> &Netns {
        &self.client
    }
    fn gateway(&self) -> &Netns {
        &self.gateway
    }
    fn backends(&self) -> &[Netns] {
        &self.backends
    }
    fn client_addr(&self) -> Ipv4Addr {
        self.client_addr
    }
    fn frontend_addr(&self) -> Ipv4Addr {
        self.gateway_client_addr
    }
    fn backend_addrs(&self) -> &[Ipv4Addr] {
        &self.backend_addrs
    }
    fn gateway_interfaces(&self) -> &[&'static str] {
        &self.gateway_ifaces
    }
    fn namespaces(&self) -> Vec<&Netns> {
        let mut v = vec![&self.switch, &self.gateway, &self.client];
        v.extend(&self.backends);
        v
    }
    fn endpoint_ports(&self) -> (&Netns, Vec<String>) {
        (&self.switch, BACKEND_NAMES.iter().map(|n| format!("p-{n}")).collect())
    }
}
