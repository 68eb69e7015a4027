//! `kpf run`: load, configure and attach the program, then keep it fed and answer the CLI until
//! told to stop.
//!
//! The kernel state outlives the daemon: maps and XDP links are pinned (see `pin.rs`), so SIGTERM,
//! a crash or `kill -9` leaves forwarding running, and the next `kpf run` adopts what it finds
//! (same conntrack table, its own program swapped into the pinned links). `kpf down` is the one
//! way to detach and forget everything.
//!
//! Every change — start-up, `kpf map ...`, `kpf apply`, SIGHUP — goes the same way: build the
//! desired config, validate it whole, converge the kernel's frontend map to it, write the config
//! file. Any failure rolls the kernel back, so a rejected change changes nothing.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use kpf_common::{Config as KernelConfig, FrontendKey};
use serde::Serialize;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    config::{Backend, Config, FrontendConfig, Mode, check_frontends},
    control::{Request, Response},
    converge::BackendEntry,
    error::{Error, Result},
    gc, health,
    loader::{self, AttachMode, Attached, Dataplane},
    metrics, neigh,
    pin::{PinDir, PinLock},
    plan::{self, Plan},
    server, sysctl,
};

pub use crate::views::{BackendStatus, FlowView, FrontendStatus, Status};

const GC_INTERVAL: Duration = Duration::from_secs(5);
const NEIGH_INTERVAL: Duration = Duration::from_secs(2);
/// How long start-up waits for the kernel to resolve the backends' next hops, so the first SYN
/// is not dropped for want of a MAC. A backend still unresolved after that is logged, not fatal:
/// it may simply be down.
const NEIGH_STARTUP_WAIT: Duration = Duration::from_secs(3);
/// The same for a backend added while running.
const NEIGH_CHANGE_WAIT: Duration = Duration::from_secs(1);

pub struct Options {
    /// Overrides the config's attach mode.
    pub mode: Option<Mode>,
    /// Where accepted changes are written back; `None` keeps them in memory only.
    pub config_path: Option<PathBuf>,
}

/// How long `kpf backend drain` waits before resetting what is left, unless told otherwise.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Everything the running daemon owns.
pub struct Daemon {
    pub(crate) config: Config,
    pub(crate) config_path: Option<PathBuf>,
    pub(crate) pins: PinDir,
    /// The pin directory's lock, for as long as this daemon runs.
    _lock: PinLock,
    pub(crate) dp: Dataplane,
    pub(crate) kernel: KernelConfig,
    /// Last seen (route, MAC) of each backend's next hop.
    next_hops: BTreeMap<Ipv4Addr, neigh::Sample>,
    /// The route and MAC each backend's next hop last had resolved: what connections may hold.
    resolved_hops: BTreeMap<Ipv4Addr, (neigh::Route, String)>,
    /// Every backend some frontend names, by address.
    pub(crate) backends: BTreeMap<SocketAddrV4, BackendEntry>,
    /// Backends removed from the config while draining: their connections still get reset at
    /// the drain's deadline.
    pub(crate) removed_drains: Vec<crate::converge::RemovedDrain>,
    /// The table pair of each frontend with several backends.
    pub(crate) pools: HashMap<FrontendKey, u32>,
    /// What this daemon last wrote into each Maglev table.
    pub(crate) tables: HashMap<u32, Vec<u32>>,
    /// Where the searches for free ids start (see `converge::allocate`).
    pub(crate) next_frontend_id: u32,
    pub(crate) next_backend_id: u32,
    pub(crate) next_pool: u32,
    pub(crate) health_tx: mpsc::Sender<health::Outcome>,
    pub(crate) started: Instant,
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::Environment(
            "kpf run needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN) to load and attach its XDP program".into(),
        ));
    }
    Ok(())
}

/// The gateway's own IPv4 addresses.
fn local_addresses() -> Result<HashSet<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free once.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(Error::io("listing local addresses")(std::io::Error::last_os_error()));
    }
    let mut out = HashSet::new();
    let mut p = head;
    while !p.is_null() {
        // SAFETY: p walks the list getifaddrs returned; ifa_addr may be null.
        let ifa = unsafe { &*p };
        if !ifa.ifa_addr.is_null() && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            out.insert(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        }
        p = ifa.ifa_next;
    }
    // SAFETY: head came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The addresses of `config`'s backends, sorted, each once.
fn backend_ips(config: &Config) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = config.frontends.iter().flat_map(|f| f.backends.iter().map(|b| *b.addr.0.ip())).collect();
    v.sort();
    v.dedup();
    v
}

/// kpf forwards to other hosts only: a backend on one of the gateway's own addresses cannot be
/// reached by a forwarded packet (and with a matching frontend would loop).
fn check_backends_remote(config: &Config) -> Result<()> {
    let local = local_addresses()?;
    for f in &config.frontends {
        for b in &f.backends {
            if local.contains(b.addr.0.ip()) {
                return Err(Error::Rejected(format!(
                    "frontend {}: backend {b} is an address of this gateway; kpf forwards to other hosts only",
                    f.label()
                )));
            }
        }
    }
    Ok(())
}

/// A file written beside the one it will replace, not yet in its place: [`StagedFile::commit`]
/// renames it over the old one, so a reader sees the old file or the new one, never a mix;
/// dropped uncommitted, it is removed.
pub struct StagedFile {
    tmp: PathBuf,
    path: PathBuf,
    dir: PathBuf,
    committed: bool,
}

impl StagedFile {
    /// Writes `text` (synced, with `path`'s permissions) next to `path`.
    pub fn write(path: &Path, text: &str) -> Result<StagedFile> {
        use std::os::unix::fs::PermissionsExt;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("config");
        let tmp = dir.join(format!(".{name}.kpf-{}.tmp", std::process::id()));
        let staged = StagedFile { tmp, path: path.to_owned(), dir: dir.to_owned(), committed: false };
        let what = |w: &str| format!("{w} {}", staged.tmp.display());
        let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o600);
        let mut f = std::fs::File::create(&staged.tmp).map_err(Error::io(what("creating")))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(Error::io(what("chmod")))?;
        f.write_all(text.as_bytes()).map_err(Error::io(what("writing")))?;
        f.sync_all().map_err(Error::io(what("syncing")))?;
        Ok(staged)
    }

    /// Puts the file in place.
    pub fn commit(mut self) -> Result<()> {
        std::fs::rename(&self.tmp, &self.path).map_err(Error::io(format!("replacing {}", self.path.display())))?;
        self.committed = true;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Daemon {
    /// Checks the host, loads the program (adopting pinned state), fills its maps and attaches.
    /// [`run`] has checked the rights already.
    fn start(config: Config, opts: Options, health_tx: mpsc::Sender<health::Outcome>) -> Result<Daemon> {
        // `--mode` is for this run only: the config (and the file every change rewrites) keeps
        // the file's mode.
        let mode = opts.mode.unwrap_or(config.mode);
        // First, so that a second daemon on these maps changes nothing, not even a sysctl.
        let pins = PinDir::new(&config.pin_dir);
        pins.prepare()?;
        let lock = pins.lock()?.ok_or_else(|| Error::Environment(format!("{} vanished", config.pin_dir.display())))?;
        for iface in &config.interfaces {
            loader::ifindex(iface)?;
            sysctl::ensure_forwarding(iface, config.manage_sysctls)?;
        }
        sysctl::ensure_snat_ports(config.snat_ports, config.manage_sysctls)?;
        check_backends_remote(&config)?;

        let adopting = pins.exists()?;
        let dp = Dataplane::load_pinned(config.max_flows, &pins)?;
        // An adopted table keeps its routing generation (which moves on once at the end of the
        // start, for next hops that changed while no daemon ran).
        let previous = if adopting { dp.kernel_config().ok().filter(|k| k.snat_port_max != 0) } else { None };
        // The tick is always this machine's: Dataplane::set_kernel_config fills it in.
        let kernel = KernelConfig {
            timeouts_ns: config.timeouts.to_kernel(),
            snat_port_min: config.snat_ports.min,
            snat_port_max: config.snat_ports.max,
            ..previous.unwrap_or_default()
        };
        let mut d = Daemon {
            config: config.clone(),
            config_path: opts.config_path,
            pins,
            _lock: lock,
            dp,
            kernel,
            next_hops: BTreeMap::new(),
            resolved_hops: BTreeMap::new(),
            backends: BTreeMap::new(),
            removed_drains: Vec::new(),
            pools: HashMap::new(),
            tables: HashMap::new(),
            next_frontend_id: 0,
            next_backend_id: 0,
            next_pool: 0,
            health_tx,
            started: Instant::now(),
        };
        d.dp.set_kernel_config(&d.kernel)?;
        d.refresh_local_addrs()?;
        if adopting {
            d.adopt_ids()?;
        }
        d.converge(&config, &HashSet::new())?;
        d.refresh_next_hops(true);
        d.await_next_hops(NEIGH_STARTUP_WAIT);

        for iface in &config.interfaces {
            match d.dp.attach_pinned(iface, mode, &d.pins)? {
                Attached::Fresh(m) => log::info!("attached to {iface} in {} mode", m.as_str()),
                Attached::Adopted(m) => {
                    log::info!("adopted the pinned {} link on {iface}: new program swapped in", m.as_str())
                }
                Attached::KeptOld(m, e) => log::error!(
                    "{iface}: cannot switch to {mode:?} mode ({e}); attached in {} mode again, as before, and running so",
                    m.as_str()
                ),
            }
        }
        warn_of_generic_gro(d.dp.attachments());
        let configured: HashSet<u32> = d.dp.attachments().iter().map(|a| a.ifindex).collect();
        for (ifindex, _) in d.pins.pinned_links()? {
            if !configured.contains(&ifindex) {
                log::info!("detaching from interface #{ifindex}: no longer configured");
                loader::unpin_link(&d.pins, ifindex)?;
            }
        }
        for ifindex in d.dp.retain_ifaces(&configured)? {
            log::info!("interface #{ifindex} is no longer a redirect target");
        }
        if adopting {
            // A next hop may have moved while no daemon watched: adopted connections look
            // their routes up once more (one that fails keeps what it had).
            d.kernel.fib_gen = d.kernel.fib_gen.wrapping_add(1);
        }
        d.dp.set_kernel_config(&d.kernel)?;
        if adopting {
            log::info!("adopted pinned state in {}", d.pins.root().display());
        }
        Ok(d)
    }

    /// Converges everything to `desired` and records it; on any failure restores the previous
    /// state and reports why. Returns what changed.
    fn change(&mut self, desired: Config, reset: &HashSet<FrontendKey>) -> Result<Plan> {
        let plan = plan::plan(&self.config, &desired);
        if plan.is_empty() && reset.is_empty() {
            return Ok(plan);
        }
        if desired.snat_ports != self.config.snat_ports {
            sysctl::ensure_snat_ports(desired.snat_ports, desired.manage_sysctls)?;
        }
        // The new file is written before any map changes (and put in place after): writing is
        // what fails in practice (a full or read-only filesystem), and a change refused before
        // it touches the maps leaves every id, counter, drain and health state as it was.
        let staged = match &self.config_path {
            Some(path) => Some(StagedFile::write(path, &desired.to_toml())?),
            None => None,
        };
        let old = self.config.clone();
        let old_kernel = self.kernel;
        let health_changed = desired.health != self.config.health;
        let result = (|| {
            self.kernel.timeouts_ns = desired.timeouts.to_kernel();
            self.kernel.snat_port_min = desired.snat_ports.min;
            self.kernel.snat_port_max = desired.snat_ports.max;
            self.dp.set_kernel_config(&self.kernel)?;
            if health_changed {
                self.restart_checkers();
            }
            self.converge(&desired, reset)?;
            staged.map_or(Ok(()), StagedFile::commit)
        })();
        if let Err(e) = result {
            self.kernel = old_kernel;
            if health_changed {
                // Checkers started with the refused settings go; converging respawns them.
                self.restart_checkers();
            }
            let restored = self.dp.set_kernel_config(&self.kernel).and_then(|()| self.converge(&old, &HashSet::new()));
            if let Err(r) = restored {
                log::error!("could not restore the previous mappings after a failed change: {r}");
            }
            return Err(e);
        }
        self.config = desired;
        for c in &plan.changes {
            log::info!("applied: {c}");
        }
        // Only backends this change introduced need their next hop resolved now (a backend
        // removed before may have had its entry handed back); the periodic refresh covers the rest.
        let before = backend_ips(&old);
        let fresh: Vec<Ipv4Addr> = self.backend_ips().into_iter().filter(|b| before.binary_search(b).is_err()).collect();
        if !fresh.is_empty() {
            self.resolve(&fresh, NEIGH_CHANGE_WAIT);
        }
        Ok(plan)
    }

    /// Keeps the kernel's list of the gateway's own addresses (where wildcard frontends answer)
    /// equal to the interfaces' addresses plus single-address `local` routes.
    fn refresh_local_addrs(&mut self) -> Result<()> {
        let mut addrs: std::collections::BTreeSet<Ipv4Addr> = local_addresses()?.into_iter().collect();
        match neigh::local_routes() {
            Ok(r) => addrs.extend(r),
            Err(e) => log::warn!("local routes: {e}"),
        }
        addrs.retain(|a| !a.is_loopback());
        self.dp.set_local_addrs(&addrs)
    }

    fn backend_ips(&self) -> Vec<Ipv4Addr> {
        backend_ips(&self.config)
    }

    /// Keeps next hops resolved; bumps the FIB generation when a route or MAC changed.
    fn refresh_next_hops(&mut self, first: bool) {
        let snapshot = neigh::snapshot(&self.backend_ips());
        let mut changed = false;
        for (backend, state) in snapshot {
            let now = match state {
                Ok(s) => {
                    if (!s.resolved() || !s.managed_or_static())
                        && let Err(e) = neigh::keep_resolved(&s.route)
                    {
                        log::warn!("backend {backend}: cannot keep next hop {} resolved: {e}", s.route.next_hop);
                    }
                    Some((s.route, s.mac))
                }
                Err(e) => {
                    if first || self.next_hops.get(&backend).is_some_and(Option::is_some) {
                        log::warn!("backend {backend}: {e}");
                    }
                    None
                }
            };
            // Connections cache a route and a MAC; only a change to one they could have cached
            // makes them look again.
            let resolved = self.resolved_hops.get(&backend).cloned();
            let previous = self.record_next_hop(backend, now.clone());
            let stale = neigh::cached_hop_moved(resolved.as_ref(), previous.as_ref(), &now);
            if stale {
                log::info!("backend {backend}: next hop now {now:?}");
                changed = true;
            }
        }
        if changed {
            self.kernel.fib_gen = self.kernel.fib_gen.wrapping_add(1);
            if let Err(e) = self.dp.set_kernel_config(&self.kernel) {
                log::error!("cannot publish the new FIB generation: {e}");
            }
        }
        let needed = self.needed_next_hops();
        self.release_next_hops(|dev, addr| !needed.contains(&(dev.to_owned(), addr)));
    }

    /// The (interface, next hop) pairs the configured and still-draining backends use: each
    /// backend's route as last sampled, or as last resolved while its route cannot be looked up
    /// (a moment without a route must not lose its entry).
    fn needed_next_hops(&self) -> HashSet<(String, Ipv4Addr)> {
        let drained = self.removed_drains.iter().map(|d| *d.addr.ip());
        self.backend_ips()
            .into_iter()
            .chain(drained)
            .filter_map(|b| match self.next_hops.get(&b) {
                Some(Some((route, _))) => Some(route),
                _ => self.resolved_hops.get(&b).map(|(route, _)| route),
            })
            .map(|r| (r.dev.clone(), r.next_hop))
            .collect()
    }

    /// Hands kpf's managed neighbour entries on this daemon's interfaces that `unneeded` picks
    /// back to the kernel (see `neigh`): made by this daemon or an earlier one, for backends
    /// since removed or moved. Entries on other interfaces are no next hop this daemon can
    /// forward to, and may be another kpf's.
    fn release_next_hops(&self, unneeded: impl Fn(&str, Ipv4Addr) -> bool) {
        for dev in &self.config.interfaces {
            let ours = match neigh::ours(dev) {
                Ok(list) => list,
                Err(e) => {
                    log::warn!("listing kpf's neighbour entries on {dev}: {e}");
                    continue;
                }
            };
            for entry in ours.into_iter().filter(|e| unneeded(dev, e.addr)) {
                let addr = entry.addr;
                match neigh::release(dev, &entry) {
                    Ok(()) => log::info!("next hop {addr} on {dev}: no backend uses it; no longer kept resolved"),
                    Err(e) => log::warn!("next hop {addr} on {dev}: cannot stop keeping it resolved: {e}"),
                }
            }
        }
    }

    /// Records a sample of `backend`'s next hop (and, if resolved, as what connections may
    /// cache); returns the sample before it.
    fn record_next_hop(&mut self, backend: Ipv4Addr, sample: neigh::Sample) -> Option<neigh::Sample> {
        if let Some((route, Some(mac))) = &sample {
            self.resolved_hops.insert(backend, (route.clone(), mac.clone()));
        }
        self.next_hops.insert(backend, sample)
    }

    /// Asks the kernel to resolve `backends`' next hops and waits (up to `limit`) until it has.
    fn resolve(&mut self, backends: &[Ipv4Addr], limit: Duration) {
        for (b, state) in neigh::snapshot(backends) {
            match state {
                Ok(s) => {
                    if (!s.resolved() || !s.managed_or_static())
                        && let Err(e) = neigh::keep_resolved(&s.route)
                    {
                        log::warn!("backend {b}: cannot keep next hop {} resolved: {e}", s.route.next_hop);
                    }
                    self.record_next_hop(b, Some((s.route, s.mac)));
                }
                Err(e) => {
                    log::warn!("backend {b}: {e}");
                    self.record_next_hop(b, None);
                }
            }
        }
        self.wait_resolved(backends, limit);
    }

    fn await_next_hops(&mut self, limit: Duration) {
        let all = self.backend_ips();
        self.wait_resolved(&all, limit);
    }

    fn wait_resolved(&self, backends: &[Ipv4Addr], limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let pending: Vec<Ipv4Addr> = neigh::snapshot(backends)
                .into_iter()
                .filter(|(_, s)| !s.as_ref().is_ok_and(neigh::NextHopState::resolved))
                .map(|(b, _)| b)
                .collect();
            if pending.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                let list: Vec<String> = pending.iter().map(ToString::to_string).collect();
                log::warn!("next hop not resolved yet for backend(s) {}; their new connections wait for it", list.join(", "));
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn collect_garbage(&mut self) {
        let now = match self.dp.now_ns() {
            Ok(now) => now,
            Err(e) => return log::warn!("conntrack GC: reading the dataplane's clock: {e}"),
        };
        match gc::collect(&mut self.dp, &self.kernel.timeouts_ns, now) {
            Ok(0) => {}
            Ok(n) => log::debug!("expired {n} conntrack entries"),
            Err(e) => log::warn!("conntrack GC: {e}"),
        }
    }

    fn find(&self, address: Option<Ipv4Addr>, port: u16) -> Result<usize> {
        self.config.frontends.iter().position(|f| f.address == address && f.port == port).ok_or_else(|| {
            let label = label(address, port);
            Error::Rejected(format!("no frontend {label}; `kpf map ls` lists them"))
        })
    }

    fn validated(&self, desired: Config) -> Result<Config> {
        check_frontends(&desired.frontends, desired.snat_ports).map_err(|p| {
            let label = desired.frontends.get(p.frontend).map_or_else(String::new, FrontendConfig::label);
            Error::Rejected(format!("frontend {label}: {}", p.message))
        })?;
        check_backends_remote(&desired)?;
        Ok(desired)
    }

    fn backend(text: &str) -> Result<Backend> {
        text.parse().map_err(Error::Rejected)
    }

    fn known_backend(&self, text: &str) -> Result<SocketAddrV4> {
        let b = Self::backend(text)?;
        if !self.backends.contains_key(&b.0) {
            return Err(Error::Rejected(format!("no frontend uses backend {b}; `kpf status` lists them")));
        }
        Ok(b.0)
    }

    /// Applies one health check result; a flipped verdict changes what pools may pick.
    fn on_health(&mut self, o: health::Outcome) {
        let h = self.config.health;
        let Some(e) = self.backends.get_mut(&o.backend) else { return };
        if !e.health.record(&o.result, &h) {
            return;
        }
        match &o.result {
            Ok(()) => log::info!("backend {} is healthy again", o.backend),
            Err(why) => log::warn!("backend {} is unhealthy: {why}", o.backend),
        }
        let config = self.config.clone();
        if let Err(e) = self.converge(&config, &HashSet::new()) {
            log::error!("applying the health change of {}: {e}", o.backend);
        }
    }

    /// Answers one control request; the bool asks the daemon to exit afterwards.
    pub fn handle(&mut self, req: Request, uid: u32) -> (Response, bool) {
        if req.mutates() && uid != 0 {
            let msg = format!("permission denied: changing kpf needs root; this request came from uid {uid}");
            return (Response::Err { error: msg }, false);
        }
        let exit = matches!(req, Request::Down {});
        let result = self.dispatch(req);
        match result {
            Ok(v) => (Response::Ok { ok: v }, exit),
            Err(e) => (Response::Err { error: e.to_string() }, false),
        }
    }

    fn dispatch(&mut self, req: Request) -> Result<serde_json::Value> {
        match req {
            Request::MapLs {} => json(&self.config.frontends),
            Request::Status {} => json(&self.status()?),
            Request::Flows { port } => json(&self.flows(port)?),
            Request::MapAdd { port, address, backend } => {
                let b = Self::backend(&backend)?;
                if self.find(address, port).is_ok() {
                    let label = label(address, port);
                    return Err(Error::Rejected(format!(
                        "frontend {label} already exists; `kpf map set` changes its backend"
                    )));
                }
                let mut desired = self.config.clone();
                desired.frontends.push(FrontendConfig::single(address, port, b));
                let desired = self.validated(desired)?;
                json(&self.change(desired, &HashSet::new())?)
            }
            Request::MapSet { port, address, backend } => {
                let b = Self::backend(&backend)?;
                let i = self.find(address, port)?;
                let mut desired = self.config.clone();
                desired.frontends[i].backends = vec![crate::config::WeightedBackend { addr: b, weight: 1 }];
                let desired = self.validated(desired)?;
                json(&self.change(desired, &HashSet::new())?)
            }
            Request::MapRm { port, address, reset } => {
                let i = self.find(address, port)?;
                let mut desired = self.config.clone();
                desired.frontends.remove(i);
                let keys: HashSet<FrontendKey> =
                    if reset { [loader::frontend_key(address, port)].into() } else { HashSet::new() };
                let plan = self.change(desired, &keys)?;
                json(&if reset { plan.with_resets() } else { plan })
            }
            Request::Apply { config, name, dry_run } => {
                let desired = self.validated(Config::parse(&config, &name)?)?;
                if dry_run {
                    return json(&plan::plan(&self.config, &desired));
                }
                json(&self.change(desired, &HashSet::new())?)
            }
            Request::Reload {} => {
                let path = self.config_path.clone().ok_or_else(|| {
                    Error::Rejected("this daemon was started without a config file; use `kpf apply -f`".into())
                })?;
                let desired = self.validated(Config::load(&path)?)?;
                json(&self.change(desired, &HashSet::new())?)
            }
            Request::BackendDrain { backend, timeout_ms } => {
                let addr = self.known_backend(&backend)?;
                let timeout = timeout_ms.map_or(DEFAULT_DRAIN_TIMEOUT, Duration::from_millis);
                let e = self.backends.get_mut(&addr).expect("known_backend checked");
                e.drain_deadline = Some(Instant::now() + timeout);
                e.drain_done = false;
                let config = self.config.clone();
                self.converge(&config, &HashSet::new())?;
                log::info!("draining {addr}: no new connections; the rest are reset in {}", humantime::format_duration(timeout));
                json(&format!("draining {addr}; remaining connections are reset in {}", humantime::format_duration(timeout)))
            }
            Request::BackendUndrain { backend } => {
                let addr = self.known_backend(&backend)?;
                let e = self.backends.get_mut(&addr).expect("known_backend checked");
                let was = e.drain_deadline.take().is_some();
                e.drain_done = false;
                let config = self.config.clone();
                self.converge(&config, &HashSet::new())?;
                log::info!("{addr} back in selection");
                json(&if was { format!("{addr} takes new connections again") } else { format!("{addr} was not draining") })
            }
            Request::Metrics {} => json(&metrics::render(&self.status()?)),
            Request::Down {} => {
                let removed = self.pins.remove_all()?;
                log::info!("down: unpinned {} object(s) from {}; detaching", removed.len(), self.pins.root().display());
                self.release_next_hops(|_, _| true);
                json(&removed.len())
            }
        }
    }
}

/// Generic XDP cannot redirect a GRO aggregate to another interface (the kernel drops packets
/// longer than that interface's MTU there): with more than one interface, each in generic mode
/// with GRO on is named.
fn warn_of_generic_gro(attachments: &[loader::Attachment]) {
    if attachments.len() < 2 {
        return;
    }
    for a in attachments.iter().filter(|a| a.mode == AttachMode::Generic) {
        match loader::gro_enabled(&a.iface) {
            Ok(false) => {}
            Ok(true) => log::warn!(
                "{iface}: GRO is on, and generic XDP cannot redirect a GRO aggregate to another interface \
                 (the kernel drops packets longer than that interface's MTU there), so bulk transfers \
                 stall: turn it off (`ethtool -K {iface} gro off`) or use tc mode",
                iface = a.iface
            ),
            Err(e) => log::warn!("{e}"),
        }
    }
}

fn label(address: Option<Ipv4Addr>, port: u16) -> String {
    match address {
        Some(a) => format!("{a}:{port}"),
        None => format!("*:{port}"),
    }
}

fn json<T: Serialize + ?Sized>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::Environment(format!("encoding the answer: {e}")))
}

/// Runs until SIGTERM or SIGINT (leaving the dataplane forwarding, pinned) or `kpf down`
/// (detaching it). Prints `ready` on stdout once traffic is being forwarded and the control
/// socket answers; SIGHUP re-reads the config file; SIGUSR1 logs the counters.
pub async fn run(config: Config, opts: Options) -> Result<()> {
    // Rights first: nothing (not even the socket) may be touched by a process that cannot run.
    require_root()?;
    // Before anything that takes time: until a handler exists, SIGHUP or SIGUSR1 (a `systemctl
    // reload` during a start) would end the process by default, which systemd counts as a
    // clean exit and does not restart. Signals that arrive during the start wait for the loop.
    let sig = |k| signal(k).map_err(Error::io("installing signal handlers"));
    let (mut term, mut int, mut hup, mut usr1) =
        (sig(SignalKind::terminate())?, sig(SignalKind::interrupt())?, sig(SignalKind::hangup())?, sig(SignalKind::user_defined1())?);
    let socket_path = config.socket.clone();
    let listener = server::bind(&socket_path)?;
    let started = async {
        let metrics_listener = match config.metrics_addr {
            Some(a) => Some(metrics::bind(a).await?),
            None => None,
        };
        let (health_tx, health_rx) = mpsc::channel(256);
        Ok::<_, Error>((metrics_listener, health_rx, Daemon::start(config, opts, health_tx)?))
    };
    let (metrics_listener, mut health_rx, mut d) = match started.await {
        Ok(s) => s,
        Err(e) => {
            // Our socket must not outlive a failed start (a CLI would take it for a daemon).
            let _ = std::fs::remove_file(&socket_path);
            return Err(e);
        }
    };
    let (requests, mut incoming) = mpsc::channel(16);
    let accept = tokio::spawn(server::serve(listener, requests.clone()));
    let metrics_task = metrics_listener.map(|l| {
        log::info!("serving metrics on http://{}/metrics", l.local_addr().map(|a| a.to_string()).unwrap_or_default());
        tokio::spawn(metrics::serve(l, requests))
    });

    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ready");
        let _ = out.flush();
    }
    log::info!(
        "kpf ready: {} frontend(s) on {}; control socket {}",
        d.config.frontends.len(),
        d.config.interfaces.join(", "),
        socket_path.display()
    );

    let mut gc_tick = tokio::time::interval(GC_INTERVAL);
    let mut neigh_tick = tokio::time::interval(NEIGH_INTERVAL);
    // Drain deadlines are honoured to within this.
    let mut drain_tick = tokio::time::interval(Duration::from_millis(200));
    let mut down = false;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match d.dispatch(Request::Reload {}) {
                Ok(_) => log::info!("SIGHUP: config re-read"),
                Err(e) => log::error!("SIGHUP: config not applied: {e}"),
            },
            _ = usr1.recv() => log_counters(&d),
            _ = gc_tick.tick() => d.collect_garbage(),
            _ = neigh_tick.tick() => {
                d.refresh_next_hops(false);
                if let Err(e) = d.refresh_local_addrs() {
                    log::warn!("refreshing local addresses: {e}");
                }
            }
            _ = drain_tick.tick() => d.expire_drains(),
            Some(outcome) = health_rx.recv() => d.on_health(outcome),
            Some(server::Call { request, uid, reply, written }) = incoming.recv() => {
                let (response, exit) = d.handle(request, uid);
                let _ = reply.send(response);
                if exit {
                    let _ = tokio::time::timeout(Duration::from_secs(2), written).await;
                    down = true;
                    break;
                }
            }
        }
    }
    accept.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&socket_path);
    log_counters(&d);
    if down {
        log::info!("stopped: detached and unpinned");
    } else {
        log::info!(
            "stopped: the dataplane stays attached and forwarding (pinned in {}); `kpf run` adopts it, `kpf down` removes it",
            d.pins.root().display()
        );
    }
    Ok(())
}

fn log_counters(d: &Daemon) {
    match d.status() {
        Ok(s) => {
            let text: Vec<String> = s.counters.iter().filter(|(_, v)| **v > 0).map(|(c, v)| format!("{c}={v}")).collect();
            log::info!("counters: {}", if text.is_empty() { "all zero".into() } else { text.join(" ") });
            for f in s.frontends {
                log::info!(
                    "frontend {}: packets={} bytes={} new_flows={} live_flows={}",
                    f.frontend, f.packets, f.bytes, f.new_flows, f.live_flows
                );
            }
        }
        Err(e) => log::warn!("cannot read counters: {e}"),
    }
}
