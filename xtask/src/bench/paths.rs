//! The forwarding paths under comparison, as data: to add one, add a [`Kind`] and an entry to
//! [`ALL`], and teach [`PathSpec::start`] to set it up.
//!
//! Paths come in two groups by the endpoints' offload settings, and are only compared within
//! their group: with offloads off (what native veth XDP requires: it loses CHECKSUM_PARTIAL), and
//! with the senders' checksum and segmentation offload on (what Linux hosts normally send: 64 KB
//! GSO aggregates), which only the paths that handle socket buffers can take.
//!
//! A started path is an [`Active`] guard: dropping it (or [`Active::finish`]) tears the path down
//! (nft table deleted, HAProxy or kpf stopped), so two paths never overlap.

use std::{collections::BTreeMap, net::SocketAddrV4, time::Duration};

use anyhow::{Context as _, Result, bail};
use kpf_tests::{
    kafka,
    kpf_proc::{self, Kpf, Mode},
    netns::Netns,
    topology::Topology as _,
};

use super::{
    proc::{self, Child},
    topo::{Bench, Service, port_map, wait_listening_while},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The client connects to the backend's own address; the gateway routes (no NAT).
    Routing,
    /// nftables DNAT (prerouting) + masquerade (postrouting) in the gateway.
    Nftables,
    /// HAProxy in TCP mode in the gateway.
    Haproxy,
    /// The real kpf binary, attached in this mode.
    Kpf(Mode),
}

pub struct PathSpec {
    /// Short name used on the command line (`--paths`) and in results.json.
    pub id: &'static str,
    pub label: &'static str,
    pub kind: Kind,
    pub description: &'static str,
    /// The endpoints send with checksum and segmentation offload on (see the module docs).
    pub offloads: bool,
}

/// Every path, in run (and report) order. The first is the reference for "vs routing".
pub const ALL: &[PathSpec] = &[
    PathSpec {
        id: "routing",
        label: "plain routing",
        kind: Kind::Routing,
        description: "no NAT: the client connects straight to the backend's address; the gateway \
                      forwards with the kernel's IP routing (ip_forward=1). The limit for any forwarder.",
        offloads: false,
    },
    PathSpec {
        id: "nftables",
        label: "nftables NAT",
        kind: Kind::Nftables,
        description: "nftables in the gateway: `dnat to backend:port` per frontend port in prerouting, \
                      `masquerade` out of eth1 in postrouting (kernel conntrack). What a Linux admin would \
                      set up. IPVS would be the other in-kernel option, but this kernel is built without it.",
        offloads: false,
    },
    PathSpec {
        id: "haproxy",
        label: "HAProxy (TCP)",
        kind: Kind::Haproxy,
        description: "HAProxy in `mode tcp` in the gateway, one `listen` per frontend port, default \
                      threads (one per CPU): the userspace proxy users pick (stands in for kafka-proxy).",
        offloads: false,
    },
    PathSpec {
        id: "kpf-native",
        label: "kpf XDP native",
        kind: Kind::Kpf(Mode::Native),
        description: "the real kpf binary (`kpf run`, started with the harness's `Kpf::start`), XDP in \
                      the veth driver (native mode) on both gateway interfaces, default timeouts.",
        offloads: false,
    },
    PathSpec {
        id: "kpf-generic",
        label: "kpf XDP generic",
        kind: Kind::Kpf(Mode::Generic),
        description: "the same kpf binary and config, XDP in generic (skb) mode.",
        offloads: false,
    },
    PathSpec {
        id: "kpf-tc",
        label: "kpf tc",
        kind: Kind::Kpf(Mode::Tc),
        description: "the same kpf binary and config, attached at tc ingress (tcx) instead of XDP.",
        offloads: false,
    },
    PathSpec {
        id: "routing-offload",
        label: "plain routing, offloads on",
        kind: Kind::Routing,
        description: "plain routing, with the endpoints sending with checksum and segmentation offload.",
        offloads: true,
    },
    PathSpec {
        id: "nftables-offload",
        label: "nftables NAT, offloads on",
        kind: Kind::Nftables,
        description: "the same nftables rules, endpoints with offloads on.",
        offloads: true,
    },
    PathSpec {
        id: "haproxy-offload",
        label: "HAProxy (TCP), offloads on",
        kind: Kind::Haproxy,
        description: "the same HAProxy, endpoints with offloads on.",
        offloads: true,
    },
    PathSpec {
        id: "kpf-tc-offload",
        label: "kpf tc, offloads on",
        kind: Kind::Kpf(Mode::Tc),
        description: "kpf at tc ingress, endpoints with offloads on: it rewrites 64 KB CHECKSUM_PARTIAL \
                      aggregates whole (native veth XDP cannot take these settings).",
        offloads: true,
    },
];

/// The paths named in `list` (comma-separated ids), in [`ALL`] order; all if `None`.
pub fn select(list: Option<&str>) -> Result<Vec<&'static PathSpec>> {
    let Some(list) = list else { return Ok(ALL.iter().collect()) };
    let wanted: Vec<&str> = list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    for w in &wanted {
        if !ALL.iter().any(|p| p.id == *w) {
            let ids: Vec<&str> = ALL.iter().map(|p| p.id).collect();
            bail!("unknown path {w:?}; known paths: {}", ids.join(", "));
        }
    }
    if wanted.is_empty() {
        bail!("--paths names no path");
    }
    Ok(ALL.iter().filter(|p| wanted.contains(&p.id)).collect())
}

pub fn by_id(id: &str) -> Option<&'static PathSpec> {
    ALL.iter().find(|p| p.id == id)
}

/// The id of the path playing `role` ("routing", "nftables", "haproxy") in `path_id`'s offload
/// group: what every ratio, target and chart bar of that path is measured against.
pub fn reference_id(path_id: &str, role: &str) -> String {
    match by_id(path_id) {
        Some(s) if s.offloads => format!("{role}-offload"),
        _ => role.to_owned(),
    }
}

const NFT_TABLE: &str = "kpfbench";

/// What the gateway runs while a path is active.
enum Guard<'a> {
    None,
    Nft(&'a Netns),
    Haproxy(Child),
    Kpf(Kpf),
}

/// A path set up in the gateway. Dropping it tears the path down.
pub struct Active<'a> {
    pub spec: &'static PathSpec,
    bench: &'a Bench,
    guard: Guard<'a>,
}

/// kpf's conntrack entries for the client connection from `client_port` to frontend port
/// `frontend_port`, in words, for the report.
pub fn describe_client(kpf: &kpf_proc::Control, frontend_port: u16, client_port: u16) -> String {
    let flows: Vec<kpf::daemon::FlowView> =
        match kpf.cli(&["flows", "--json", "--port", &frontend_port.to_string()]).map(|out| serde_json::from_str(&out)) {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => return format!("kpf flows answered what is not a flow list: {e}"),
            Err(e) => return e.to_string(),
        };
    let suffix = format!(":{client_port}");
    let mine: Vec<String> = flows
        .iter()
        .filter(|f| f.client.ends_with(&suffix))
        .map(|f| {
            format!(
                "kpf tracks it: state {}, {} packets, {} bytes, age {:.2} s, idle {:.2} s, via {} to {}",
                f.state, f.packets, f.bytes, f.age_s, f.idle_s, f.gateway, f.backend
            )
        })
        .collect();
    if mine.is_empty() {
        format!("kpf has no connection from client port {client_port} (of {} to port {frontend_port})", flows.len())
    } else {
        mine.join("; ")
    }
}

/// What was learned while tearing a path down.
#[derive(Default)]
pub struct Finished {
    /// kpf's global counters at exit (`new_flows`, `pass_*`, `drop_*`).
    pub kpf_counters: Option<BTreeMap<String, u64>>,
    /// Problems that do not invalidate the numbers but belong in the report.
    pub warnings: Vec<String>,
}

impl PathSpec {
    /// Sets this path up in `bench`'s gateway. Call from the main thread (kpf and HAProxy die
    /// with the thread that started them).
    pub fn start<'a>(&'static self, bench: &'a Bench) -> Result<Active<'a>> {
        let gw = bench.gateway();
        let guard = match self.kind {
            Kind::Routing => Guard::None,
            Kind::Nftables => {
                // Installed before the guard exists: on failure there is nothing to remove.
                let rules = nft_rules(bench);
                let file = std::env::temp_dir().join(format!("kpf-bench-{}.nft", std::process::id()));
                std::fs::write(&file, &rules)?;
                let r = proc::run(gw.command("nft").arg("-f").arg(&file), Duration::from_secs(10));
                let _ = std::fs::remove_file(&file);
                r.context("loading the nftables NAT rules")?;
                Guard::Nft(gw)
            }
            Kind::Haproxy => {
                let file = std::env::temp_dir().join(format!("kpf-bench-{}-haproxy.cfg", std::process::id()));
                std::fs::write(&file, haproxy_config(bench))?;
                let started = Child::spawn("haproxy", gw.command("haproxy").arg("-db").arg("-f").arg(&file)).and_then(
                    |mut child| {
                        for (fe, _) in port_map(bench) {
                            wait_listening_while(gw, fe.port(), Duration::from_secs(10), || child.check_running())?;
                        }
                        Ok(child)
                    },
                );
                // HAProxy has read its config once it listens (or it failed): the file goes either way.
                let _ = std::fs::remove_file(&file);
                Guard::Haproxy(started?)
            }
            Kind::Kpf(mode) => {
                let cfg = kpf_proc::config_toml(&bench.net.gateway_ifaces, mode, &port_map(bench));
                Guard::Kpf(Kpf::start(gw, &cfg, mode).context("starting kpf")?)
            }
        };
        Ok(Active { spec: self, bench, guard })
    }
}

impl Active<'_> {
    /// Where the client connects for `s` on this path.
    pub fn target(&self, s: Service) -> SocketAddrV4 {
        match self.spec.kind {
            Kind::Routing => self.bench.backend(s),
            _ => self.bench.frontend(s),
        }
    }

    /// Where the Kafka client bootstraps on this path: the gateway's port for broker 1. `None` for
    /// plain routing, which maps none of the gateway ports the brokers advertise.
    pub fn kafka_bootstrap(&self) -> Option<SocketAddrV4> {
        match self.spec.kind {
            Kind::Routing => None,
            _ => Some(SocketAddrV4::new(self.bench.net.frontend_addr(), kafka::advertised_port(1))),
        }
    }

    /// kpf's control socket, on a kpf path.
    pub fn kpf_control(&self) -> Option<kpf_proc::Control> {
        match &self.guard {
            Guard::Kpf(k) => Some(k.control()),
            _ => None,
        }
    }

    /// Fails if the path's process died.
    pub fn check(&mut self) -> Result<()> {
        if let Guard::Haproxy(c) = &mut self.guard {
            c.check_running()?;
        }
        Ok(())
    }

    /// Tears the path down, reporting what its process said.
    pub fn finish(mut self) -> Result<Finished> {
        let mut out = Finished::default();
        match std::mem::replace(&mut self.guard, Guard::None) {
            Guard::None => {}
            Guard::Nft(gw) => remove_nft(gw)?,
            Guard::Haproxy(mut c) => {
                let log = c.stop();
                let alerts: Vec<&str> = log.lines().filter(|l| l.contains("[ALERT]")).collect();
                if !alerts.is_empty() {
                    out.warnings.push(format!("haproxy: {}", alerts.join("; ")));
                }
            }
            Guard::Kpf(kpf) => {
                let stopped = kpf.stop();
                out.kpf_counters = kpf_proc::counters(&stopped.log);
                // A failed `kpf down` leaves the program attached (the kernel may release it only
                // later), so the next path could run through it: not a clean stop either.
                if !stopped.is_clean() {
                    bail!(
                        "kpf did not stop cleanly ({}{}{}); its log:\n{}",
                        stopped.status,
                        if stopped.killed { ", killed" } else { "" },
                        stopped.down_failed.as_deref().map(|d| format!(", {d}")).unwrap_or_default(),
                        stopped.log
                    );
                }
                if let Some(c) = &out.kpf_counters {
                    let drops: Vec<String> = c
                        .iter()
                        .filter(|(k, v)| k.starts_with("drop_") && **v > 0)
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    if !drops.is_empty() {
                        out.warnings.push(format!("kpf dropped packets: {}", drops.join(" ")));
                    }
                }
            }
        }
        Ok(out)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        // Only reached without `finish` (an error or Ctrl-C): Kpf and Child stop themselves.
        if let Guard::Nft(gw) = self.guard
            && let Err(e) = remove_nft(gw)
        {
            eprintln!("warning: {e:#}");
        }
    }
}

fn remove_nft(gw: &Netns) -> Result<()> {
    proc::run(gw.command("nft").args(["delete", "table", "ip", NFT_TABLE]), Duration::from_secs(10))
        .context("removing the nftables NAT rules")?;
    Ok(())
}

fn nft_rules(b: &Bench) -> String {
    let mut dnat = String::new();
    for (fe, be) in port_map(b) {
        dnat += &format!("        ip daddr {} tcp dport {} dnat to {be}\n", fe.ip(), fe.port());
    }
    let backend_dev = b.net.gateway_ifaces[1];
    format!(
        "table ip {NFT_TABLE} {{\n\
         \x20   chain prerouting {{\n\
         \x20       type nat hook prerouting priority dstnat; policy accept;\n\
         {dnat}\
         \x20   }}\n\
         \x20   chain postrouting {{\n\
         \x20       type nat hook postrouting priority srcnat; policy accept;\n\
         \x20       oifname \"{backend_dev}\" masquerade\n\
         \x20   }}\n\
         }}\n"
    )
}

fn haproxy_config(b: &Bench) -> String {
    let mut s = String::from(
        "global\n    maxconn 4000\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    \
         timeout client 1m\n    timeout server 1m\n",
    );
    for (fe, be) in port_map(b) {
        let port = fe.port();
        s += &format!("\nlisten fe-{port}\n    bind {fe}\n    server be-{port} {be}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_is_compared_within_its_offload_group() {
        for p in ALL {
            for role in ["routing", "nftables", "haproxy"] {
                let r = by_id(&reference_id(p.id, role)).unwrap_or_else(|| panic!("{}'s {role} is no path", p.id));
                assert_eq!(r.offloads, p.offloads, "{} is compared with {}", p.id, r.id);
            }
        }
        assert_eq!(reference_id("kpf-tc-offload", "routing"), "routing-offload");
        assert_eq!(reference_id("kpf-native", "nftables"), "nftables");
    }
}
