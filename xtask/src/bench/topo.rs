//! The benchmark network: the harness's two-NIC topology (client -> gateway eth0 | eth1 ->
//! bridge -> b1, b2, b3) with one service per backend, and the endpoint settings read back.
//!
//! ```text
//!   client 10.100.1.10 ── eth0 gateway eth1 ── br0 ── b1 10.100.2.21  iperf3 -s      :5201
//!                      10.100.1.1   10.100.2.1        b2 10.100.2.22  sockperf server :11111
//!                                                     b3 10.100.2.23  1-byte echo     :7000
//! ```
//!
//! Every path uses this same network, built once per run; only the gateway's forwarding
//! machinery changes between paths.

use std::{
    cell::RefCell,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use kpf_tests::{
    byte_echo::ByteEcho,
    netns::Netns,
    topology::{self, Topology, TwoNic},
};
use serde::Serialize;

use super::proc::{self, Child};

/// kpf's SNAT source ports (as the bench's kpf config has them); reserved in the gateway for
/// every path, so all see the same sysctls.
pub use kpf_tests::kpf_proc::SNAT_PORTS;

/// The CPU both sockperf ends are pinned to. Unpinned, each run lands the two ends either on
/// one CPU or on two, and a cross-CPU wakeup of an idle vCPU costs ~20 µs here, so RTTs came out
/// bimodal (~20 or ~60 µs) whatever the path. On one CPU the RTT is the sum of the work along the
/// path (the gateway's softirq processing runs there too); a forwarder with its own threads
/// (HAProxy) still runs wherever the scheduler puts them.
pub const LATENCY_CPU: &str = "0";

/// What runs on the backends. Frontend port = backend port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Iperf,
    Sockperf,
    Echo,
}

impl Service {
    pub const ALL: [Service; 3] = [Service::Iperf, Service::Sockperf, Service::Echo];

    pub fn port(self) -> u16 {
        match self {
            Service::Iperf => 5201,
            Service::Sockperf => 11111,
            Service::Echo => 7000,
        }
    }

    /// Which backend (b1, b2, b3) runs it.
    pub fn backend(self) -> usize {
        match self {
            Service::Iperf => 0,
            Service::Sockperf => 1,
            Service::Echo => 2,
        }
    }
}

/// The topology and its long-running servers. Dropping it stops the servers and deletes every
/// namespace.
pub struct Bench {
    // Field order is drop order: servers first, then the namespaces they live in.
    sockperf: RefCell<Child>,
    echo: ByteEcho,
    pub net: TwoNic,
}

fn start_sockperf(net: &TwoNic) -> Result<Child> {
    let addr = net.backend_addrs()[Service::Sockperf.backend()];
    let ns = &net.backends()[Service::Sockperf.backend()];
    let port = Service::Sockperf.port().to_string();
    let child = Child::spawn(
        "sockperf server",
        ns.command("taskset").args([
            "-c",
            LATENCY_CPU,
            "sockperf",
            "server",
            "--tcp",
            "-i",
            &addr.to_string(),
            "-p",
            &port,
        ]),
    )?;
    let mut child = child;
    wait_listening_while(ns, Service::Sockperf.port(), Duration::from_secs(10), || child.check_running())?;
    Ok(child)
}

impl Bench {
    pub fn new() -> Result<Bench> {
        let net = TwoNic::new().context("building the two-NIC namespace topology")?;
        // Short connections by the ten thousand: let clients (and HAProxy's server side) reuse
        // TIME_WAIT ports, and give them the whole port range. Same for every path.
        for ns in [net.client(), net.gateway()] {
            ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        }
        net.gateway().sysctl("net.ipv4.ip_local_reserved_ports", SNAT_PORTS)?;

        let echo_ns = &net.backends()[Service::Echo.backend()];
        let echo_addr = SocketAddrV4::new(net.backend_addrs()[Service::Echo.backend()], Service::Echo.port());
        let echo = ByteEcho::start(echo_ns, echo_addr, 16)?;
        let sockperf = start_sockperf(&net)?;
        Ok(Bench { sockperf: RefCell::new(sockperf), echo, net })
    }

    pub fn client(&self) -> &Netns {
        self.net.client()
    }

    pub fn gateway(&self) -> &Netns {
        self.net.gateway()
    }

    pub fn backend_ns(&self, s: Service) -> &Netns {
        &self.net.backends()[s.backend()]
    }

    /// Where the service really listens.
    pub fn backend(&self, s: Service) -> SocketAddrV4 {
        SocketAddrV4::new(self.net.backend_addrs()[s.backend()], s.port())
    }

    /// The service's port on the gateway's client-side address.
    pub fn frontend(&self, s: Service) -> SocketAddrV4 {
        SocketAddrV4::new(self.net.frontend_addr(), s.port())
    }

    /// Restarts the sockperf server if it died.
    pub fn ensure_sockperf(&self) -> Result<()> {
        let mut current = self.sockperf.borrow_mut();
        if let Err(e) = current.check_running() {
            eprintln!("warning: {e:#}; restarting it");
            *current = start_sockperf(&self.net)?;
        }
        Ok(())
    }

    /// A one-off `iperf3 -s -1` on b1 (one test, then it exits): a failed test cannot leave a
    /// stuck server behind for the next one.
    pub fn iperf_server(&self) -> Result<Child> {
        let s = Service::Iperf;
        let ns = self.backend_ns(s);
        let child = Child::spawn(
            "iperf3 server",
            ns.command("iperf3").args([
                "-s",
                "-1",
                "-B",
                &self.backend(s).ip().to_string(),
                "-p",
                &s.port().to_string(),
            ]),
        )?;
        let mut child = child;
        wait_listening_while(ns, s.port(), Duration::from_secs(10), || child.check_running())?;
        Ok(child)
    }

    /// Turns the endpoints' transmit checksum and segmentation offload on or off (receivers keep
    /// verifying every checksum in software either way).
    pub fn set_sender_offloads(&self, on: bool) -> Result<()> {
        topology::endpoint_tx_offloads(&self.net, on).context("setting the endpoints' offloads")
    }

    pub fn echo_served(&self) -> u64 {
        self.echo.served()
    }

    /// Every interface's settings, endpoints first.
    pub fn settings(&self) -> Result<Vec<IfaceSettings>> {
        let mut out = Vec::new();
        out.push(IfaceSettings::read("client", self.net.client(), "eth0", true)?);
        for (i, ns) in self.net.backends().iter().enumerate() {
            out.push(IfaceSettings::read(&format!("b{}", i + 1), ns, "eth0", true)?);
        }
        for dev in ["eth0", "eth1"] {
            out.push(IfaceSettings::read("gateway", self.net.gateway(), dev, false)?);
        }
        for port in ["p-gw", "p-b1", "p-b2", "p-b3"] {
            out.push(IfaceSettings::read("bridge", &self.net.switch, port, false)?);
        }
        Ok(out)
    }
}

/// Waits until something listens on TCP `port` (any address) inside `ns`; `alive` is asked
/// between polls and ends the wait early with its error (a server that exited).
pub fn wait_listening_while(
    ns: &Netns,
    port: u16,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let table = ns.enter(|| std::fs::read_to_string("/proc/thread-self/net/tcp"))??;
        if listening(&table, port) {
            return Ok(());
        }
        proc::check_interrupted()?;
        alive()?;
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} in {} after {timeout:?}", ns.name());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a `/proc/net/tcp` table has a LISTEN (state 0A) socket on `port`.
fn listening(table: &str, port: u16) -> bool {
    let want = format!(":{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}

/// The settings of one interface that matter for a fair comparison.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IfaceSettings {
    /// client, b1..b3 (endpoints), gateway, bridge.
    pub role: String,
    pub dev: String,
    pub endpoint: bool,
    pub mtu: u32,
    /// `tc qdisc show` of the root qdisc, handle and refcount left out.
    pub qdisc: String,
    /// (feature, value) from `ethtool -k`, in [`FEATURES`] order.
    pub features: Vec<(String, String)>,
}

/// The `ethtool -k` features reported.
pub const FEATURES: [&str; 7] = [
    "rx-checksumming",
    "tx-checksumming",
    "scatter-gather",
    "tx-tcp-segmentation",
    "generic-segmentation-offload",
    "generic-receive-offload",
    "large-receive-offload",
];

impl IfaceSettings {
    fn read(role: &str, ns: &Netns, dev: &str, endpoint: bool) -> Result<IfaceSettings> {
        let k = ns.run("ethtool", &["-k", dev]).with_context(|| format!("ethtool -k {dev} in {}", ns.name()))?;
        let features = FEATURES
            .iter()
            .map(|f| {
                let v = k
                    .lines()
                    .find_map(|l| l.trim().strip_prefix(&format!("{f}:")))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_else(|| "?".into());
                (f.to_string(), v)
            })
            .collect();
        let link = ns.ip(&["-o", "link", "show", "dev", dev])?;
        let mtu = link.split_whitespace().skip_while(|w| *w != "mtu").nth(1).and_then(|m| m.parse().ok()).unwrap_or(0);
        let q = ns.run("tc", &["qdisc", "show", "dev", dev])?;
        let qdisc = q.lines().next().map(clean_qdisc).unwrap_or_default();
        Ok(IfaceSettings { role: role.into(), dev: dev.into(), endpoint, mtu, qdisc, features })
    }

    pub fn feature(&self, name: &str) -> &str {
        self.features.iter().find(|(f, _)| f == name).map_or("?", |(_, v)| v.as_str())
    }
}

/// `qdisc pfifo 8001: root refcnt 2 limit 10000p` -> `pfifo limit 10000p`.
fn clean_qdisc(line: &str) -> String {
    let w: Vec<&str> = line.split_whitespace().collect();
    let mut out = vec![*w.get(1).unwrap_or(&"?")];
    let mut i = 2;
    while i < w.len() {
        match w[i] {
            "root" => i += 1,
            "refcnt" | "parent" => i += 2,
            x if x.ends_with(':') => i += 1,
            x => {
                out.push(x);
                i += 1;
            }
        }
    }
    out.join(" ")
}

/// The frontend/backend pairs for a forwarder that maps each service port, then each Kafka
/// broker's advertised port.
pub fn port_map(b: &Bench) -> Vec<(SocketAddrV4, SocketAddrV4)> {
    let services = Service::ALL.iter().map(|&s| (b.frontend(s), b.backend(s)));
    services.chain(super::kafka::frontends(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qdisc_line_is_cleaned() {
        assert_eq!(clean_qdisc("qdisc pfifo 8001: root refcnt 2 limit 10000p"), "pfifo limit 10000p");
        assert_eq!(clean_qdisc("qdisc noqueue 0: root refcnt 2"), "noqueue");
    }

    #[test]
    fn listen_table_is_parsed() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue\n   0: 1564640A:1451 00000000:0000 0A 00000000:00000000\n";
        assert!(listening(t, 5201));
        assert!(!listening(t, 5202));
    }
}
