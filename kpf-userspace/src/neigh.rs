//! Keeps the backends' next hops resolved, and notices when they change.
//!
//! The XDP program cannot hand a rewritten packet to the kernel to resolve ARP (its source is a
//! local address, so the kernel would drop it as a martian); a SYN whose next hop has no
//! neighbour entry is dropped and counted. So the daemon asks the kernel to keep a *managed*
//! neighbour entry (`ip neigh ... managed`, Linux 5.16+) for every backend's next hop, which the
//! kernel resolves and refreshes by itself. Whenever a route or a resolved MAC changes, the
//! daemon bumps the FIB generation and connections look their next hop up again.
//!
//! The kernel keeps probing a managed entry for as long as it exists, even one for a broker that
//! is long gone. So the entries kpf makes managed carry its neighbour protocol ([`PROTOCOL`]),
//! which outlives the daemon, and a later daemon (or `kpf down`) hands those no backend needs
//! back to the kernel's usual ageing; entries an operator made are told apart by the tag.

use std::{collections::BTreeMap, net::Ipv4Addr, process::Command};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The protocol kpf tags its managed neighbour entries with (`ip neigh ... proto 107`), so it
/// finds them again across restarts without touching an operator's. Any value the kernel does
/// not use itself would do; 107 is in no iproute2 or kernel list.
pub const PROTOCOL: u8 = 107;

/// Where the kernel sends packets for one backend.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub dev: String,
    pub next_hop: Ipv4Addr,
    pub src: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextHopState {
    pub route: Route,
    pub mac: Option<String>,
    pub state: Vec<String>,
    pub managed: bool,
}

impl NextHopState {
    /// Has a MAC the FIB lookup can use.
    pub fn resolved(&self) -> bool {
        self.mac.is_some() && !self.state.iter().any(|s| s == "FAILED" || s == "INCOMPLETE")
    }

    /// The kernel keeps it resolved by itself (or an operator pinned it).
    pub fn managed_or_static(&self) -> bool {
        self.managed || self.state.iter().any(|s| s == "PERMANENT" || s == "NOARP")
    }
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().map_err(Error::io("running `ip` (is iproute2 installed?)"))?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("ip {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Deserialize)]
struct RouteJson {
    dev: String,
    gateway: Option<Ipv4Addr>,
    prefsrc: Option<Ipv4Addr>,
}

#[derive(Deserialize)]
struct NeighJson {
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
    /// Present (as null) when the entry has the managed flag.
    #[serde(default, deserialize_with = "present")]
    managed: bool,
    /// Its protocol, as a number (`ip -N`); absent when unset.
    protocol: Option<String>,
}

impl NeighJson {
    fn ours(&self) -> bool {
        self.protocol.as_deref().and_then(|p| p.parse().ok()) == Some(PROTOCOL)
    }
}

/// One entry of a listing of one interface's neighbours.
#[derive(Deserialize)]
struct ListedNeighJson {
    dst: Ipv4Addr,
    #[serde(flatten)]
    neigh: NeighJson,
}

/// A managed neighbour entry kpf made.
#[derive(Debug, PartialEq, Eq)]
pub struct Ours {
    pub addr: Ipv4Addr,
    /// It has a MAC (is or was resolved).
    pub resolved: bool,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

#[derive(Deserialize)]
struct LocalRouteJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    dst: String,
}

/// Addresses the kernel delivers locally without their being on an interface: `local` routes of
/// single addresses (GCP's guest agent installs internal load balancers' VIPs this way).
pub fn local_routes() -> Result<Vec<Ipv4Addr>> {
    let text = ip(&["-4", "-j", "route", "show", "table", "local"])?;
    let routes: Vec<LocalRouteJson> = serde_json::from_str(&text)
        .map_err(|e| Error::Environment(format!("unexpected `ip -j route show table local` output: {e}")))?;
    Ok(routes
        .into_iter()
        .filter(|r| r.kind.as_deref() == Some("local"))
        .filter_map(|r| r.dst.strip_suffix("/32").unwrap_or(&r.dst).parse().ok())
        .collect())
}

pub fn route_to(backend: Ipv4Addr) -> Result<Route> {
    let text = ip(&["-j", "route", "get", &backend.to_string()])?;
    let routes: Vec<RouteJson> = serde_json::from_str(&text)
        .map_err(|e| Error::Environment(format!("unexpected `ip -j route get` output {text:?}: {e}")))?;
    let r = routes.into_iter().next().ok_or_else(|| Error::Environment(format!("no route to backend {backend}")))?;
    Ok(Route { dev: r.dev, next_hop: r.gateway.unwrap_or(backend), src: r.prefsrc })
}

fn neighbour(route: &Route) -> Result<Option<NeighJson>> {
    let text = ip(&["-N", "-j", "neigh", "show", &route.next_hop.to_string(), "dev", &route.dev])?;
    let n: Vec<NeighJson> = serde_json::from_str(&text)
        .map_err(|e| Error::Environment(format!("unexpected `ip -j neigh` output {text:?}: {e}")))?;
    Ok(n.into_iter().next())
}

/// Makes sure the kernel keeps `route`'s next hop resolved. A permanent (static) entry an
/// operator made is left alone, and one with a protocol of its own keeps it (so it is never
/// taken for kpf's and handed back).
pub fn keep_resolved(route: &Route) -> Result<()> {
    let existing = neighbour(route)?;
    if let Some(n) = &existing
        && n.state.iter().any(|s| s == "PERMANENT" || s == "NOARP")
    {
        return Ok(());
    }
    let (addr, proto) = (route.next_hop.to_string(), PROTOCOL.to_string());
    let mut args = vec!["neigh", "replace", &addr, "dev", &route.dev, "managed"];
    // Without a protocol attribute the kernel keeps the entry's own.
    if !existing.is_some_and(|n| n.protocol.is_some() && !n.ours()) {
        args.extend(["protocol", &proto]);
    }
    ip(&args).map(drop)
}

/// The managed entries kpf made (tagged with [`PROTOCOL`]) on `dev`.
pub fn ours(dev: &str) -> Result<Vec<Ours>> {
    ours_in(&ip(&["-4", "-N", "-j", "neigh", "show", "dev", dev, "proto", &PROTOCOL.to_string()])?)
}

fn ours_in(listing: &str) -> Result<Vec<Ours>> {
    let list: Vec<ListedNeighJson> = serde_json::from_str(listing)
        .map_err(|e| Error::Environment(format!("unexpected `ip -j neigh show` output: {e}")))?;
    Ok(list
        .into_iter()
        .filter(|n| n.neigh.managed && n.neigh.ours())
        .map(|n| Ours { addr: n.dst, resolved: n.neigh.lladdr.is_some() })
        .collect())
}

/// Hands one of kpf's managed entries back to the kernel's usual ageing: it stays, unmanaged and
/// stale, with the MAC it had (connections still draining to it can look it up; the kernel
/// confirms it again if anything sends there, or forgets it), or goes if it has no MAC.
pub fn release(dev: &str, entry: &Ours) -> Result<()> {
    let addr = entry.addr.to_string();
    if entry.resolved {
        ip(&["neigh", "change", &addr, "dev", dev, "nud", "stale"]).map(drop)
    } else {
        ip(&["neigh", "del", &addr, "dev", dev]).map(drop)
    }
}

/// The current routes and neighbour states of `backends`' next hops; an entry per backend.
pub fn snapshot(backends: &[Ipv4Addr]) -> BTreeMap<Ipv4Addr, Result<NextHopState, String>> {
    backends
        .iter()
        .map(|&b| {
            let state = route_to(b).and_then(|route| {
                let n = neighbour(&route)?;
                Ok(NextHopState {
                    mac: n.as_ref().and_then(|n| n.lladdr.clone()),
                    managed: n.as_ref().is_some_and(|n| n.managed),
                    state: n.map(|n| n.state).unwrap_or_default(),
                    route,
                })
            });
            (b, state.map_err(|e| e.to_string()))
        })
        .collect()
}

/// One sample of a backend's next hop: the route, and the neighbour's MAC if resolved; `None`
/// when there is no route.
pub type Sample = Option<(Route, Option<String>)>;

/// Whether connections that cached a backend's next hop must look it up again, given the last
/// sample (`previous`), this one (`now`), and `resolved`: the route and MAC last seen resolved.
/// Connections may hold that one through samples without a MAC (their lookups fail, and they
/// keep what they had), so a MAC that differs from it is a change even after such a gap.
pub fn cached_hop_moved(resolved: Option<&(Route, String)>, previous: Option<&Sample>, now: &Sample) -> bool {
    // A MAC appearing where there was none is no change by itself: no connection could open
    // without it.
    let sample_changed = match (previous, now) {
        (Some(Some((r0, m0))), Some((r1, m1))) => r0 != r1 || (m0.is_some() && m0 != m1),
        (Some(Some(_)), None) => true,
        _ => false,
    };
    let moved_since_resolved = match (resolved, now) {
        (Some((r0, m0)), Some((r1, Some(m1)))) => r0 != r1 || m0 != m1,
        _ => false,
    };
    sample_changed || moved_since_resolved
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> Route {
        Route { dev: "eth0".into(), next_hop: Ipv4Addr::new(10, 64, 0, 2), src: None }
    }

    /// Feeds samples in order, as the daemon does, and returns which ones bumped the generation.
    fn bumps(samples: &[Sample]) -> Vec<bool> {
        let (mut resolved, mut previous): (Option<(Route, String)>, Option<Sample>) = (None, None);
        samples
            .iter()
            .map(|now| {
                let moved = cached_hop_moved(resolved.as_ref(), previous.as_ref(), now);
                if let Some((r, Some(m))) = now {
                    resolved = Some((r.clone(), m.clone()));
                }
                previous = Some(now.clone());
                moved
            })
            .collect()
    }

    #[test]
    fn only_managed_entries_with_kpfs_protocol_are_ours() {
        // As `ip -4 -N -j neigh show dev eth0` prints them (the filter on the protocol aside).
        let listing = r#"[
            {"dst":"10.0.0.1","lladdr":"02:00:00:00:00:01","managed":null,"state":["REACHABLE"],"protocol":"107"},
            {"dst":"10.0.0.2","managed":null,"state":["FAILED"],"protocol":"107"},
            {"dst":"10.0.0.3","lladdr":"02:00:00:00:00:03","managed":null,"state":["REACHABLE"]},
            {"dst":"10.0.0.4","lladdr":"02:00:00:00:00:04","managed":null,"state":["STALE"],"protocol":"12"},
            {"dst":"10.0.0.5","lladdr":"02:00:00:00:00:05","state":["STALE"],"protocol":"107"},
            {"dst":"10.0.0.6","lladdr":"02:00:00:00:00:06","state":["PERMANENT"]}
        ]"#;
        let ours = ours_in(listing).unwrap();
        assert_eq!(
            ours,
            [
                Ours { addr: Ipv4Addr::new(10, 0, 0, 1), resolved: true },
                Ours { addr: Ipv4Addr::new(10, 0, 0, 2), resolved: false }
            ]
        );
        assert!(ours_in("not json").is_err());
    }

    #[test]
    fn a_mac_change_through_an_unresolved_gap_is_a_change() {
        let (a, b) = (Some("02:00:00:00:00:0a".to_owned()), Some("02:00:00:00:00:0b".to_owned()));
        let r = route();
        // A, then the entry unresolved (FAILED or INCOMPLETE hide the MAC), then B.
        assert_eq!(bumps(&[Some((r.clone(), a.clone())), Some((r.clone(), None)), Some((r.clone(), b.clone()))]), [false, true, true]);
        // The same through a moment without a route.
        assert_eq!(bumps(&[Some((r.clone(), a.clone())), None, Some((r.clone(), b.clone()))]), [false, true, true]);
        // Back to A after the gap: what connections kept is right again.
        assert_eq!(bumps(&[Some((r.clone(), a.clone())), Some((r.clone(), None)), Some((r.clone(), a.clone()))]), [false, true, false]);
        // First resolution, and no change.
        assert_eq!(bumps(&[Some((r.clone(), None)), Some((r.clone(), a.clone())), Some((r.clone(), a.clone()))]), [false, false, false]);
        // A route change is one at once.
        let other = Route { dev: "eth1".into(), ..r.clone() };
        assert_eq!(bumps(&[Some((r, a)), Some((other, None))]), [false, true]);
    }
}
