//! The TOML config: parsing with every error located (`file:line:column: what`), validation that
//! rejects a partly invalid file whole, and the kernel-facing values derived from it.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::error::{Error, Result};

/// Where to attach kpf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// In the driver: fastest; not every driver supports it.
    Native,
    /// In the kernel's generic receive path: works everywhere, but slow (every packet is
    /// copied, GRO aggregates linearised).
    Generic,
    /// tc ingress (tcx, Linux ≥ 6.6): socket buffers, so GRO/GSO aggregates stay whole and
    /// checksum offload keeps working. The best choice for bulk traffic on veth and for drivers
    /// without native XDP.
    Tc,
    /// Native XDP where the driver supports it, else tc.
    #[default]
    Auto,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(Mode::Native),
            "generic" => Ok(Mode::Generic),
            "tc" => Ok(Mode::Tc),
            "auto" => Ok(Mode::Auto),
            _ => Err(format!("unknown mode {s:?}: expected native, generic, tc or auto")),
        }
    }
}

/// An inclusive port range written `"40000-59999"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.min..=self.max).contains(&port)
    }
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.min <= other.max && other.min <= self.max
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port range like \"40000-59999\"");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let min: u16 = a.trim().parse().map_err(|_| bad())?;
        let max: u16 = b.trim().parse().map_err(|_| bad())?;
        if min == 0 || min > max {
            return Err(format!("port range {s:?} must be non-empty and start above 0"));
        }
        Ok(PortRange { min, max })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A backend `ip:port`, validated as something a connection can be made to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend(pub SocketAddrV4);

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let a: SocketAddrV4 =
            s.parse().map_err(|_| format!("{s:?} is not an IPv4 address with a port, like \"10.64.0.2:39092\""))?;
        let ip = a.ip();
        if a.port() == 0 {
            return Err(format!("backend {s:?}: port 0 cannot be connected to"));
        }
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
            return Err(format!("backend {s:?}: {ip} cannot be a backend (unspecified, broadcast, multicast or loopback)"));
        }
        Ok(Backend(a))
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for Backend {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Backend {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A backend with its weight: `"10.64.0.2:39092"` (weight 1) or
/// `{ address = "10.64.0.2:39092", weight = 2 }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WeightedBackend {
    pub addr: Backend,
    pub weight: u32,
}

pub const MAX_WEIGHT: u32 = 100;

impl fmt::Display for WeightedBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.weight == 1 { write!(f, "{}", self.addr) } else { write!(f, "{} (weight {})", self.addr, self.weight) }
    }
}

impl<'de> Deserialize<'de> for WeightedBackend {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            address: Backend,
            #[serde(default = "one")]
            weight: u32,
        }
        fn one() -> u32 {
            1
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Plain(String),
            Table(Table),
        }
        let raw = Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "a backend is \"ip:port\" or { address = \"ip:port\", weight = N }",
            )
        })?;
        let (addr, weight) = match raw {
            Raw::Plain(s) => (s.parse().map_err(serde::de::Error::custom)?, 1),
            Raw::Table(t) => (t.address, t.weight),
        };
        if weight > MAX_WEIGHT {
            return Err(serde::de::Error::custom(format!("backend {addr}: weight {weight} is above {MAX_WEIGHT}")));
        }
        Ok(WeightedBackend { addr, weight })
    }
}

impl Serialize for WeightedBackend {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        if self.weight == 1 {
            return s.collect_str(&self.addr);
        }
        let mut t = s.serialize_struct("WeightedBackend", 2)?;
        t.serialize_field("address", &self.addr)?;
        t.serialize_field("weight", &self.weight)?;
        t.end()
    }
}

/// An IPv4 network `10.128.0.0/20`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub bits: u8,
}

impl Cidr {
    fn mask(&self) -> u32 {
        if self.bits == 0 { 0 } else { u32::MAX << (32 - self.bits) }
    }
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.addr)
    }
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.bits)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IPv4 network like \"10.128.0.0/20\"");
        let (a, b) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let bits: u8 = b.parse().map_err(|_| bad())?;
        if bits > 32 {
            return Err(bad());
        }
        let c = Cidr { addr, bits };
        if u32::from(addr) & !c.mask() != 0 {
            let net = Ipv4Addr::from(u32::from(addr) & c.mask());
            return Err(format!("{s:?} has host bits set; did you mean \"{net}/{bits}\"?"));
        }
        Ok(c)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What a frontend does when every backend is unhealthy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenAllUnhealthy {
    /// Keep sending to all of them (AWS NLB's behaviour): a health check that is wrong must not
    /// take the whole cluster offline.
    #[default]
    FailOpen,
    /// Drop new connections (counted as drop_no_healthy_backend).
    Reject,
}

/// How backends are checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// A TCP connection that opens.
    #[default]
    Tcp,
    /// A Kafka ApiVersions request that gets an answer without error.
    Kafka,
    /// No checks: every backend is always healthy.
    None,
}

/// Active health checks, for every backend (NLB-style thresholds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    pub check: CheckKind,
    pub interval: Secs,
    pub timeout: Secs,
    /// Consecutive successes that make an unhealthy backend healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub unhealthy_threshold: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            check: CheckKind::Tcp,
            interval: Secs(Duration::from_secs(5)),
            timeout: Secs(Duration::from_secs(2)),
            healthy_threshold: 3,
            unhealthy_threshold: 3,
        }
    }
}

/// A duration written `"30s"`, `"2h4m"`, or a number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Secs(pub Duration);

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        let dur = match Raw::deserialize(d)? {
            Raw::Secs(s) => Duration::from_secs(s),
            Raw::Text(t) => humantime::parse_duration(&t)
                .map_err(|e| serde::de::Error::custom(format!("{t:?} is not a duration like \"30s\" or \"2h4m\": {e}")))?,
        };
        if dur.is_zero() {
            return Err(serde::de::Error::custom("a timeout must be longer than zero"));
        }
        Ok(Secs(dur))
    }
}

impl Serialize for Secs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

/// Idle timeouts per connection state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Half-open: SYN sent, handshake not finished.
    pub syn: Secs,
    pub established: Secs,
    /// One side has sent FIN.
    pub fin: Secs,
    /// Both sides have sent FIN. When the backend sent its FIN first, the connection (and its
    /// SNAT port) is kept at least for the backend's TIME_WAIT (`tcp::BACKEND_TIME_WAIT_NS`).
    pub closing: Secs,
    /// After RST.
    pub reset: Secs,
}

impl Default for Timeouts {
    fn default() -> Self {
        use kpf_common::tcp::{DEFAULT_TIMEOUTS_NS as D, State};
        let s = |st: State| Secs(Duration::from_nanos(D[st as usize]));
        Timeouts {
            syn: s(State::SynSent),
            established: s(State::Established),
            fin: s(State::FinFromClient),
            closing: s(State::Closing),
            reset: s(State::Reset),
        }
    }
}

impl Timeouts {
    pub fn to_kernel(&self) -> [u64; kpf_common::tcp::STATE_COUNT] {
        use kpf_common::tcp::State;
        let ns = |s: Secs| s.0.as_nanos().min(u64::MAX as u128) as u64;
        let mut t = [0u64; kpf_common::tcp::STATE_COUNT];
        t[State::SynSent as usize] = ns(self.syn);
        t[State::SynAcked as usize] = ns(self.syn);
        t[State::Established as usize] = ns(self.established);
        t[State::FinFromClient as usize] = ns(self.fin);
        t[State::FinFromBackend as usize] = ns(self.fin);
        t[State::Closing as usize] = ns(self.closing);
        t[State::Reset as usize] = ns(self.reset);
        t
    }
}

/// One mapped port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendConfig {
    /// The local address it answers on; `None` for every local address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    pub port: u16,
    pub backends: Vec<WeightedBackend>,
    /// Sources allowed to open connections; empty: everyone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub when_all_unhealthy: WhenAllUnhealthy,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

impl FrontendConfig {
    /// A frontend with one backend of weight 1 and no allowlist.
    pub fn single(address: Option<Ipv4Addr>, port: u16, backend: Backend) -> FrontendConfig {
        FrontendConfig {
            address,
            port,
            backends: vec![WeightedBackend { addr: backend, weight: 1 }],
            allow: Vec::new(),
            when_all_unhealthy: WhenAllUnhealthy::default(),
        }
    }
}

impl FrontendConfig {
    pub fn label(&self) -> String {
        match self.address {
            Some(a) => format!("{a}:{}", self.port),
            None => format!("*:{}", self.port),
        }
    }
}

/// A validated config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Config {
    pub interfaces: Vec<String>,
    pub mode: Mode,
    pub snat_ports: PortRange,
    pub max_flows: u32,
    /// Set `net.ipv4.conf.<iface>.forwarding=1` on the attached interfaces instead of only
    /// checking it.
    pub manage_sysctls: bool,
    pub timeouts: Timeouts,
    pub health: Health,
    /// Where to serve Prometheus metrics (`GET /metrics`); off unless set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// bpffs directory for the pinned maps and links that outlive the daemon.
    pub pin_dir: PathBuf,
    /// The control socket the CLI talks to.
    pub socket: PathBuf,
    #[serde(rename = "frontend")]
    pub frontends: Vec<FrontendConfig>,
}

pub const DEFAULT_PIN_DIR: &str = crate::pin::DEFAULT_DIR;
pub const DEFAULT_SOCKET: &str = "/run/kpf/kpf.sock";

pub const DEFAULT_SNAT_PORTS: PortRange = PortRange { min: 40000, max: 59999 };
pub const DEFAULT_MAX_FLOWS: u32 = 131_072;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: Option<Spanned<String>>,
    interfaces: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    mode: Mode,
    snat_ports: Option<Spanned<PortRange>>,
    max_flows: Option<Spanned<u32>>,
    #[serde(default)]
    manage_sysctls: bool,
    #[serde(default)]
    timeouts: Timeouts,
    health: Option<Spanned<Health>>,
    metrics_addr: Option<std::net::SocketAddr>,
    pin_dir: Option<Spanned<PathBuf>>,
    socket: Option<Spanned<PathBuf>>,
    #[serde(default)]
    frontend: Vec<RawFrontend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrontend {
    address: Option<Spanned<Ipv4Addr>>,
    port: Spanned<u16>,
    backends: Spanned<Vec<Spanned<WeightedBackend>>>,
    #[serde(default)]
    allow: Option<Spanned<Vec<Spanned<Cidr>>>>,
    #[serde(default)]
    when_all_unhealthy: WhenAllUnhealthy,
}

/// Locates byte offsets in the source text.
struct Source<'a> {
    name: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn at(&self, span: Range<usize>) -> String {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("{}:{line}:{col}", self.name)
    }

    fn err(&self, span: Range<usize>, message: impl Into<String>) -> Error {
        Error::Config { at: self.at(span), message: message.into() }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadFile { path: path.into(), source })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates `text`; `name` is used in error locations.
    pub fn parse(text: &str, name: &str) -> Result<Config> {
        let src = Source { name, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or_else(|| name.to_owned(), |s| src.at(s));
            // One line: the toml crate's messages may span several.
            let message = e.message().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
            Error::Config { at, message }
        })?;
        Config::validate(raw, &src)
    }

    fn validate(raw: RawConfig, src: &Source<'_>) -> Result<Config> {
        let interfaces = match (raw.interface, raw.interfaces) {
            (Some(_), Some(list)) => {
                return Err(src.err(list.span(), "set either `interface` or `interfaces`, not both"));
            }
            (Some(one), None) => vec![one],
            (None, Some(list)) => {
                if list.get_ref().is_empty() {
                    return Err(src.err(list.span(), "`interfaces` is empty: name at least one interface"));
                }
                list.into_inner()
            }
            (None, None) => {
                return Err(src.err(0..0, "no interface: set `interface = \"eth0\"` (or `interfaces = [...]`)"));
            }
        };
        let mut seen = HashSet::new();
        for i in &interfaces {
            let name = i.get_ref();
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                return Err(src.err(i.span(), format!("{name:?} is not a valid interface name")));
            }
            if !seen.insert(name.clone()) {
                return Err(src.err(i.span(), format!("interface {name:?} is listed twice")));
            }
        }
        let interfaces = interfaces.into_iter().map(Spanned::into_inner).collect();

        let snat_ports = match raw.snat_ports {
            Some(r) => {
                if r.get_ref().min < 1024 {
                    return Err(src.err(r.span(), format!("snat_ports {}: must not include privileged ports below 1024", r.get_ref())));
                }
                if r.get_ref().max - r.get_ref().min < 63 {
                    return Err(src.err(r.span(), format!("snat_ports {}: too small; give at least 64 ports", r.get_ref())));
                }
                (*r.get_ref(), Some(r.span()))
            }
            None => (DEFAULT_SNAT_PORTS, None),
        };

        let max_flows = match raw.max_flows {
            Some(m) if !(1024..=16_777_216).contains(m.get_ref()) => {
                return Err(src.err(m.span(), format!("max_flows {} must be between 1024 and 16777216", m.get_ref())));
            }
            Some(m) => m.into_inner(),
            None => DEFAULT_MAX_FLOWS,
        };

        let frontends: Vec<FrontendConfig> = raw
            .frontend
            .iter()
            .map(|f| FrontendConfig {
                address: f.address.as_ref().map(|a| *a.get_ref()),
                port: *f.port.get_ref(),
                backends: f.backends.get_ref().iter().map(|b| *b.get_ref()).collect(),
                allow: f.allow.as_ref().map(|a| a.get_ref().iter().map(|c| *c.get_ref()).collect()).unwrap_or_default(),
                when_all_unhealthy: f.when_all_unhealthy,
            })
            .collect();
        if let Err(p) = check_frontends(&frontends, snat_ports.0) {
            let f = &raw.frontend[p.frontend];
            let span = match p.field {
                Field::Port => f.port.span(),
                Field::Address => f.address.as_ref().map_or(f.port.span(), Spanned::span),
                Field::Backends => f.backends.span(),
                Field::Backend(i) => f.backends.get_ref()[i].span(),
                Field::Allow(i) => f.allow.as_ref().map_or(f.port.span(), |a| a.get_ref()[i].span()),
            };
            return Err(src.err(span, format!("frontend #{}: {}", p.frontend + 1, p.message)));
        }
        let absolute = |p: Option<Spanned<PathBuf>>, default: &str, key: &str| -> Result<PathBuf> {
            match p {
                Some(p) if !p.get_ref().is_absolute() => {
                    Err(src.err(p.span(), format!("{key} must be an absolute path, not {:?}", p.get_ref())))
                }
                Some(p) => Ok(p.into_inner()),
                None => Ok(PathBuf::from(default)),
            }
        };
        let health = match raw.health {
            Some(h) => {
                let v = *h.get_ref();
                if v.timeout.0 >= v.interval.0 {
                    let msg = format!(
                        "health: timeout {} must be shorter than interval {}, or checks would overlap",
                        humantime::format_duration(v.timeout.0),
                        humantime::format_duration(v.interval.0)
                    );
                    return Err(src.err(h.span(), msg));
                }
                if v.healthy_threshold == 0 || v.unhealthy_threshold == 0 || v.healthy_threshold > 100 || v.unhealthy_threshold > 100 {
                    return Err(src.err(h.span(), "health: thresholds must be between 1 and 100"));
                }
                v
            }
            None => Health::default(),
        };
        let pin_dir = absolute(raw.pin_dir, DEFAULT_PIN_DIR, "pin_dir")?;
        let socket = absolute(raw.socket, DEFAULT_SOCKET, "socket")?;

        Ok(Config {
            interfaces,
            mode: raw.mode,
            snat_ports: snat_ports.0,
            max_flows,
            manage_sysctls: raw.manage_sysctls,
            timeouts: raw.timeouts,
            health,
            metrics_addr: raw.metrics_addr,
            pin_dir,
            socket,
            frontends,
        })
    }

    /// The config as TOML, for writing back.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).expect("a validated config always serialises");
        format!("# kpf config. `kpf map ...` and `kpf apply` rewrite this file; comments are not kept.\n{body}")
    }

    pub fn frontend(&self, address: Option<Ipv4Addr>, port: u16) -> Option<&FrontendConfig> {
        self.frontends.iter().find(|f| f.address == address && f.port == port)
    }
}

/// Which part of a frontend a [`Problem`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Port,
    Address,
    Backends,
    Backend(usize),
    Allow(usize),
}

/// A frontend that cannot be accepted: its index, the field, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub frontend: usize,
    pub field: Field,
    pub message: String,
}

/// Every rule a set of frontends must satisfy, whether it comes from a file or the CLI.
pub fn check_frontends(frontends: &[FrontendConfig], snat_ports: PortRange) -> Result<(), Problem> {
    let problem = |frontend, field, message: String| Err(Problem { frontend, field, message });
    let mut keys = BTreeMap::new();
    for (n, f) in frontends.iter().enumerate() {
        if f.port == 0 {
            return problem(n, Field::Port, "port 0 cannot be a frontend".into());
        }
        if snat_ports.contains(f.port) {
            return problem(n, Field::Port, format!("port {} is inside snat_ports {snat_ports}; move one of them", f.port));
        }
        if let Some(a) = f.address
            && (a.is_multicast() || a.is_broadcast() || a.is_unspecified())
        {
            return problem(n, Field::Address, format!("{a} cannot be a frontend address"));
        }
        if let Some(prev) = keys.insert((f.address, f.port), n) {
            return problem(n, Field::Port, format!("duplicate frontend {}, same as frontend #{}", f.label(), prev + 1));
        }
        if f.backends.is_empty() {
            return problem(n, Field::Backends, "`backends` is empty".into());
        }
        if f.backends.iter().all(|b| b.weight == 0) {
            return problem(n, Field::Backends, "every backend has weight 0, so none could be chosen".into());
        }
        let mut seen = HashSet::new();
        for (i, b) in f.backends.iter().enumerate() {
            if !seen.insert(b.addr) {
                return problem(n, Field::Backend(i), format!("backend {} is listed twice", b.addr));
            }
        }
        for (i, c) in f.allow.iter().enumerate() {
            if let Some(j) = f.allow[..i].iter().position(|d| d.overlaps(c)) {
                return problem(n, Field::Allow(i), format!("allow {c} overlaps {}; list each network once", f.allow[j]));
            }
        }
    }
    // The limits of the kernel's maps, each named at the first frontend past it.
    if frontends.len() > kpf_common::MAX_FRONTENDS as usize {
        let n = kpf_common::MAX_FRONTENDS as usize;
        return problem(n, Field::Port, format!("{} frontends; at most {n}", frontends.len()));
    }
    let (mut pools, mut distinct, mut allows) = (0u32, HashSet::<Backend>::new(), 0u32);
    for (n, f) in frontends.iter().enumerate() {
        pools += u32::from(f.backends.len() > 1);
        if pools > kpf_common::MAX_TABLES / 2 {
            let most = kpf_common::MAX_TABLES / 2;
            return problem(n, Field::Backends, format!("more than {most} frontends have several backends; at most {most}"));
        }
        distinct.extend(f.backends.iter().map(|b| b.addr));
        if distinct.len() as u32 > kpf_common::MAX_BACKENDS {
            let most = kpf_common::MAX_BACKENDS;
            return problem(n, Field::Backends, format!("more than {most} distinct backends; at most {most}"));
        }
        allows += f.allow.len() as u32;
        if allows > kpf_common::MAX_ALLOW {
            let most = kpf_common::MAX_ALLOW;
            return problem(n, Field::Port, format!("more than {most} allowlist entries; at most {most}"));
        }
    }
    // A backend that is itself a frontend would loop through the gateway.
    for (n, f) in frontends.iter().enumerate() {
        for (i, b) in f.backends.iter().enumerate() {
            let ip = *b.addr.0.ip();
            if keys.contains_key(&(Some(ip), b.addr.0.port())) {
                return problem(n, Field::Backend(i), format!("backend {b} is itself a frontend of this gateway"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interface = "eth0"
mode = "native"
snat_ports = "40000-59999"

[timeouts]
established = "3h"
syn = 20

[[frontend]]
port = 9093
backends = ["10.64.0.2:39092"]

[[frontend]]
port = 9094
address = "10.0.0.5"
backends = ["10.64.0.3:39092"]
"#;

    #[test]
    fn bootstrap_frontend_with_weights_allowlist_and_health() {
        let text = r#"
interface = "eth0"
metrics_addr = "127.0.0.1:9464"
[health]
check = "kafka"
interval = "3s"
timeout = "1s"
unhealthy_threshold = 2
[[frontend]]
port = 9092
backends = ["10.64.0.2:39092", { address = "10.64.0.3:39092", weight = 2 }]
allow = ["10.128.0.0/20", "192.168.5.7/32"]
when_all_unhealthy = "reject"
"#;
        let c = Config::parse(text, "kpf.toml").unwrap();
        let f = &c.frontends[0];
        assert_eq!(f.backends[1].weight, 2);
        assert_eq!(f.allow.len(), 2);
        assert!(f.allow[0].contains("10.128.15.255".parse().unwrap()) && !f.allow[0].contains("10.128.16.0".parse().unwrap()));
        assert_eq!(f.when_all_unhealthy, WhenAllUnhealthy::Reject);
        assert_eq!(c.health.check, CheckKind::Kafka);
        assert_eq!(c.health.unhealthy_threshold, 2);
        assert_eq!(c.health.healthy_threshold, 3, "defaults fill the rest");
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9464".parse().unwrap()));
        // What kpf writes back parses to the same config.
        assert_eq!(Config::parse(&c.to_toml(), "written").unwrap(), c);
    }

    #[test]
    fn parses_the_documented_example() {
        let c = Config::parse(GOOD, "kpf.toml").unwrap();
        assert_eq!(c.interfaces, ["eth0"]);
        assert_eq!(c.mode, Mode::Native);
        assert_eq!(c.snat_ports, PortRange { min: 40000, max: 59999 });
        assert_eq!(c.timeouts.established.0, Duration::from_secs(3 * 3600));
        assert_eq!(c.timeouts.syn.0, Duration::from_secs(20));
        assert_eq!(c.timeouts.fin, Timeouts::default().fin);
        assert_eq!(c.frontends.len(), 2);
        assert_eq!(c.frontends[1].address, Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(c.frontends[1].backends, [WeightedBackend { addr: "10.64.0.3:39092".parse().unwrap(), weight: 1 }]);
    }

    fn err(text: &str) -> String {
        Config::parse(text, "kpf.toml").unwrap_err().to_string()
    }

    /// The maps' limits, each reported at the first frontend past it (not frontend #1).
    #[test]
    fn limits_name_the_first_frontend_past_them() {
        let many = |n: usize, backends: &dyn Fn(usize) -> String| {
            let mut t = String::from("interface = \"eth0\"\nsnat_ports = \"61000-65000\"\n");
            for i in 0..n {
                t += &format!("[[frontend]]\nport = {}\nbackends = [{}]\n", 1 + i, backends(i));
            }
            t
        };
        let one = |i: usize| format!("\"10.64.{}.{}:39092\"", i / 250, 1 + i % 250);
        let max = kpf_common::MAX_FRONTENDS as usize;
        assert!(Config::parse(&many(max, &one), "kpf.toml").is_ok());
        let e = err(&many(max + 1, &one));
        assert!(e.contains(&format!("{} frontends; at most {max}", max + 1)), "{e}");
        assert!(e.contains(&format!("frontend #{}:", max + 1)), "{e}");

        let pools = (kpf_common::MAX_TABLES / 2) as usize;
        let two = |_| "\"10.64.0.1:39092\", \"10.64.0.2:39092\"".to_string();
        assert!(Config::parse(&many(pools, &two), "kpf.toml").is_ok());
        let e = err(&many(pools + 1, &two));
        assert!(e.contains(&format!("more than {pools} frontends have several backends")), "{e}");
        assert!(e.contains(&format!("frontend #{}:", pools + 1)), "{e}");
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            ("interface = \"eth0\"\nbogus = 1\n", "kpf.toml:2:1", "unknown field `bogus`"),
            ("interface = \"eth0\"\n[[frontend]\n", "kpf.toml:2:11", "invalid table header; expected"),
            ("interface = \"eth0\"\nmode = \"fast\"\n", "kpf.toml:2:8", "unknown variant `fast`"),
            ("interface = \"eth0\"\n[[frontend]]\nport = 9093\nbackends = [\"10.64.0.x:39092\"]\n", "kpf.toml:4:12", "is not an IPv4 address"),
            ("interface = \"eth0\"\n[[frontend]]\nport = 0\nbackends = [\"10.64.0.2:39092\"]\n", "kpf.toml:3:8", "port 0"),
            ("interface = \"eth0\"\n[[frontend]]\nport = 70000\nbackends = [\"10.64.0.2:39092\"]\n", "kpf.toml:3:8", ""),
            ("interface = \"eth0\"\nsnat_ports = \"50000-40000\"\n", "kpf.toml:2:14", "non-empty"),
            ("interface = \"eth0\"\n[[frontend]]\nport = 45000\nbackends = [\"10.64.0.2:39092\"]\n", "kpf.toml:3:8", "inside snat_ports"),
            (
                "interface = \"eth0\"\n[[frontend]]\nport = 9093\nbackends = [\"10.64.0.2:39092\"]\n[[frontend]]\nport = 9093\nbackends = [\"10.64.0.3:39092\"]\n",
                "kpf.toml:6:8",
                "duplicate frontend",
            ),
            ("interface = \"eth0\"\n[[frontend]]\nport = 9093\nbackends = []\n", "kpf.toml:4:12", "empty"),
            ("interface = \"eth0\"\n[[frontend]]\nport = 9093\nbackends = [\"10.64.0.2:0\"]\n", "kpf.toml:4:12", "port 0"),
            ("interface = \"eth0\"\n[[frontend]]\nport = 9093\nbackends = [\"127.0.0.1:39092\"]\n", "kpf.toml:4:12", "loopback"),
            (
                "interface = \"eth0\"\n[[frontend]]\naddress = \"10.0.0.5\"\nport = 9093\nbackends = [\"10.0.0.5:9093\"]\n",
                "kpf.toml:5:13",
                "itself a frontend",
            ),
            ("interface = \"eth0\"\n[timeouts]\nsyn = \"soon\"\n", "kpf.toml:3:7", "not a duration"),
            ("interface = \"eth0\"\n[timeouts]\nsyn = 0\n", "kpf.toml:3:7", "longer than zero"),
            ("mode = \"auto\"\n", "kpf.toml", "no interface"),
            ("interface = \"eth0\"\ninterfaces = [\"eth1\"]\n", "kpf.toml:2:14", "not both"),
            ("interfaces = [\"eth0\", \"eth0\"]\n", "kpf.toml:1:23", "listed twice"),
            ("interface = \"eth0\"\nmax_flows = 10\n", "kpf.toml:2:13", "max_flows"),
            ("interface = \"eth0\"\n[[frontend]]\nport = 9092\nbackends = [{ address = \"10.64.0.2:39092\", weight = 0 }]\n", "kpf.toml:4:12", "weight 0"),
            ("interface = \"eth0\"\n[[frontend]]\nport = 9092\nbackends = [\"10.64.0.2:39092\", \"10.64.0.2:39092\"]\n", "kpf.toml:4:32", "listed twice"),
            ("interface = \"eth0\"\n[[frontend]]\nport = 9092\nbackends = [{ address = \"10.64.0.2:39092\", weight = 500 }]\n", "kpf.toml:4:12", "above 100"),
            ("interface = \"eth0\"\n[[frontend]]\nport = 9092\nbackends = [\"10.64.0.2:39092\"]\nallow = [\"10.0.0.0/8\", \"10.1.0.0/16\"]\n", "kpf.toml:5:24", "overlaps"),
            ("interface = \"eth0\"\n[[frontend]]\nport = 9092\nbackends = [\"10.64.0.2:39092\"]\nallow = [\"10.1.2.3/16\"]\n", "kpf.toml:5:9", "host bits"),
            ("interface = \"eth0\"\n[[frontend]]\nport = 9092\nbackends = [\"10.64.0.2:39092\"]\nallow = [\"10.1.2.0/40\"]\n", "kpf.toml:5:9", "not an IPv4 network"),
            ("interface = \"eth0\"\n[health]\ninterval = \"2s\"\ntimeout = \"2s\"\n", "kpf.toml:2:1", "shorter than interval"),
            ("interface = \"eth0\"\n[health]\ncheck = \"ping\"\n", "kpf.toml:3:9", "unknown variant"),
            ("interface = \"eth0\"\n[[frontend]]\nport = 9092\nbackends = [\"10.64.0.2:39092\"]\nwhen_all_unhealthy = \"panic\"\n", "kpf.toml:5:22", "unknown variant"),
        ];
        let mut wrong = Vec::new();
        for (text, at, what) in cases {
            let e = err(text);
            if !e.starts_with(&format!("{at}:")) && e != *at && !e.starts_with(&format!("{at}: ")) || !e.contains(what) || e.contains('\n') {
                wrong.push(format!("{text:?}\n  want {at} ... {what:?}\n  got  {e}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    /// Every config a user may copy: the README's and the guides' TOML blocks and `examples/`.
    /// (The README's once set `metrics_addr` after `[timeouts]`, making it a timeout.)
    #[test]
    fn documented_configs_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut configs = Vec::new();
        let mut docs = vec![root.join("README.md")];
        for dir in ["docs", "examples"] {
            let mut files: Vec<_> = std::fs::read_dir(root.join(dir)).unwrap().map(|e| e.unwrap().path()).collect();
            files.sort();
            for f in files {
                match f.extension().and_then(|e| e.to_str()) {
                    Some("md") => docs.push(f),
                    Some("toml") => configs.push((f.display().to_string(), std::fs::read_to_string(&f).unwrap())),
                    _ => {}
                }
            }
        }
        for doc in docs {
            let text = std::fs::read_to_string(&doc).unwrap();
            for (i, block) in text.split("```toml\n").skip(1).enumerate() {
                let block = block.split("```").next().unwrap();
                configs.push((format!("{} (TOML block {})", doc.display(), i + 1), block.to_owned()));
            }
        }
        assert!(configs.len() >= 3, "the README's config and the two examples, found {}", configs.len());
        let bad: Vec<String> =
            configs.iter().filter_map(|(name, text)| Config::parse(text, name).err().map(|e| e.to_string())).collect();
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }
}
