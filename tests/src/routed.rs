//! A routed topology with a path-MTU bottleneck on each side of a two-NIC gateway, for path-MTU
//! discovery through kpf. Every namespace is deleted (with its links) when the topology drops.
//!
//! ```text
//!  client ───────── rc ───────────── gateway ───────────── rb ───────── backend
//!  10.100.4.10   .4.254 | .1.254   eth0 10.100.1.1   10.100.2.254 | .3.254   10.100.3.21
//!                       |          eth1 10.100.2.1                  |
//!      rc forwards to 10.100.4.0/24 with route MTU 1200    rb forwards to 10.100.3.0/24 with route MTU 1200
//! ```
//!
//! Every interface keeps MTU 1500, so the endpoints advertise MSS 1460 and the bottlenecks can
//! only be found through ICMP "fragmentation needed" from the routers:
//! - client -> backend: rb cannot forward the gateway's 1500-byte packets toward the backend and
//!   tells their source, the gateway's 10.100.2.1; kpf must translate that to the client.
//! - backend -> client: rc cannot forward kpf's 1500-byte packets (from the frontend address
//!   10.100.1.1) toward the client and tells 10.100.1.1; kpf must translate that to the backend.
//!
//! The bottleneck is a route MTU (`ip route ... mtu 1200`), which the kernel uses for forwarded
//! packets, rather than a 1200-byte device MTU: a veth end drops, silently, any frame larger than
//! its own MTU that its peer sends, so a 1200-byte router interface facing a 1500-byte endpoint is
//! a black hole in the endpoint-to-router direction, not a path-MTU bottleneck.
//!
//! The settings of `topology.rs` apply: endpoints (client, backend) have `tx off rx off` and a
//! `pfifo` qdisc; every other interface has `rx off`; the peers of the gateway's interfaces (rc's
//! and rb's) receive redirected frames and get `gro on` for NAPI. (No frame here is XDP_TX'd: the
//! gateway always forwards from one interface to the other.)

use std::{io, net::Ipv4Addr};

use crate::{
    netns::{Netns, veth},
    topology::{addr, endpoint, gateway_ns},
};

/// The route MTU of the routers' links toward the endpoints.
pub const BOTTLENECK_MTU: u32 = 1200;

#[derive(Debug)]
pub struct Routed {
    pub client: Netns,
    /// The router between the client and the gateway.
    pub client_router: Netns,
    pub gateway: Netns,
    /// The router between the gateway and the backend.
    pub backend_router: Netns,
    /// One backend, `backends[0]`.
    pub backends: Vec<Netns>,
    /// 10.100.4.10.
    pub client_addr: Ipv4Addr,
    /// 10.100.1.1 on the gateway's eth0: the frontends' address.
    pub gateway_client_addr: Ipv4Addr,
    /// 10.100.2.1 on the gateway's eth1: the SNAT source toward the backend.
    pub gateway_backend_addr: Ipv4Addr,
    /// 10.100.3.21.
    pub backend_addrs: Vec<Ipv4Addr>,
}

/// A router's interface: nothing marks a packet as verified; a queue in front of the veth;
/// `gro on` (NAPI) where it faces a gateway interface that redirects into it.
fn router_side(ns: &Netns, dev: &str, faces_gateway: bool) -> io::Result<()> {
    let features: &[&str] = if faces_gateway { &["rx", "off", "gro", "on"] } else { &["rx", "off"] };
    ns.ethtool_k(dev, features)?;
    ns.run("tc", &["qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "10000"]).map(drop)
}

fn router(role: &str) -> io::Result<Netns> {
    let r = Netns::new(role)?;
    r.sysctl("net.ipv4.conf.all.forwarding", "1")?;
    Ok(r)
}

/// Replaces the connected route of `net` on `dev` with one of route MTU [`BOTTLENECK_MTU`].
fn bottleneck(r: &Netns, net: &str, dev: &str, src: &str) -> io::Result<()> {
    let mtu = BOTTLENECK_MTU.to_string();
    r.ip(&["route", "replace", net, "dev", dev, "proto", "kernel", "scope", "link", "src", src, "mtu", &mtu]).map(drop)
}

impl Routed {
    pub fn new() -> io::Result<Routed> {
        let client = Netns::new("cl")?;
        let client_router = router("rc")?;
        let gateway = gateway_ns()?;
        let backend_router = router("rb")?;
        let backend = Netns::new("b1")?;

        // client <-> rc
        veth(&client, "eth0", &client_router, "eth0")?;
        addr(&client, "eth0", "10.100.4.10/24")?;
        endpoint(&client, "eth0")?;
        client.ip(&["route", "add", "default", "via", "10.100.4.254"])?;
        addr(&client_router, "eth0", "10.100.4.254/24")?;
        router_side(&client_router, "eth0", false)?;
        bottleneck(&client_router, "10.100.4.0/24", "eth0", "10.100.4.254")?;

        // rc <-> gateway eth0
        veth(&client_router, "eth1", &gateway, "eth0")?;
        addr(&client_router, "eth1", "10.100.1.254/24")?;
        router_side(&client_router, "eth1", true)?;
        addr(&gateway, "eth0", "10.100.1.1/24")?;
        gateway.ethtool_k("eth0", &["rx", "off"])?;
        gateway.ip(&["route", "add", "10.100.4.0/24", "via", "10.100.1.254"])?;

        // gateway eth1 <-> rb
        veth(&gateway, "eth1", &backend_router, "eth0")?;
        addr(&gateway, "eth1", "10.100.2.1/24")?;
        gateway.ethtool_k("eth1", &["rx", "off"])?;
        gateway.ip(&["route", "add", "10.100.3.0/24", "via", "10.100.2.254"])?;
        addr(&backend_router, "eth0", "10.100.2.254/24")?;
        router_side(&backend_router, "eth0", true)?;

        // rb <-> backend
        veth(&backend_router, "eth1", &backend, "eth0")?;
        addr(&backend_router, "eth1", "10.100.3.254/24")?;
        router_side(&backend_router, "eth1", false)?;
        bottleneck(&backend_router, "10.100.3.0/24", "eth1", "10.100.3.254")?;
        addr(&backend, "eth0", "10.100.3.21/24")?;
        endpoint(&backend, "eth0")?;
        backend.ip(&["route", "add", "default", "via", "10.100.3.254"])?;

        Ok(Routed {
            client,
            client_router,
            gateway,
            backend_router,
            backends: vec![backend],
            client_addr: Ipv4Addr::new(10, 100, 4, 10),
            gateway_client_addr: Ipv4Addr::new(10, 100, 1, 1),
            gateway_backend_addr: Ipv4Addr::new(10, 100, 2, 1),
            backend_addrs: vec![Ipv4Addr::new(10, 100, 3, 21)],
        })
    }
}
