//! `kpf run`: load, configure and attach the program, then keep it fed until told to stop.

use std::{
    collections::BTreeMap,
    io::Write,
    net::Ipv4Addr,
    time::Duration,
};

use kpf_common::{Config as KernelConfig, Frontend};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    clock,
    config::{Config, Mode},
    error::{Error, Result},
    gc,
    loader::{self, Dataplane},
    neigh, sysctl,
};

const GC_INTERVAL: Duration = Duration::from_secs(5);
const NEIGH_INTERVAL: Duration = Duration::from_secs(2);
/// How long start-up waits for the kernel to resolve the backends' next hops, so the first SYN
/// is not dropped for want of a MAC. A backend still unresolved after that is logged, not fatal:
/// it may simply be down.
const NEIGH_STARTUP_WAIT: Duration = Duration::from_secs(3);

pub struct Options {
    pub mode: Option<Mode>,
}

/// Everything the running daemon owns.
pub struct Daemon {
    config: Config,
    dp: Dataplane,
    kernel: KernelConfig,
    /// Last seen (route, MAC) of each backend's next hop.
    next_hops: BTreeMap<Ipv4Addr, Option<(neigh::Route, Option<String>)>>,
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

impl Daemon {
    /// Checks the host, loads the program, fills its maps and attaches it.
    pub fn start(config: Config, opts: &Options) -> Result<Daemon> {
        require_root()?;
        for iface in &config.interfaces {
            loader::ifindex(iface)?;
            sysctl::ensure_forwarding(iface, config.manage_sysctls)?;
        }
        sysctl::ensure_snat_ports(config.snat_ports, config.manage_sysctls)?;

        let dp = Dataplane::load(config.max_flows)?;
        let kernel = KernelConfig {
            timeouts_ns: config.timeouts.to_kernel(),
            snat_port_min: config.snat_ports.min,
            snat_port_max: config.snat_ports.max,
            hash_seed: rand::random(),
            fib_gen: 0,
            min_mtu: 1500,
        };
        let mut d = Daemon { config, dp, kernel, next_hops: BTreeMap::new() };
        d.install_frontends()?;
        d.refresh_next_hops(true);
        d.await_next_hops(NEIGH_STARTUP_WAIT);

        let mode = opts.mode.unwrap_or(d.config.mode);
        for iface in d.config.interfaces.clone() {
            let m = d.dp.attach(&iface, mode)?;
            log::info!("attached to {iface} in {} mode", m.as_str());
        }
        d.kernel.min_mtu = d.dp.min_mtu()?;
        d.dp.set_kernel_config(&d.kernel)?;
        Ok(d)
    }

    fn install_frontends(&mut self) -> Result<()> {
        self.dp.set_kernel_config(&self.kernel)?;
        for (id, f) in self.config.frontends.iter().enumerate() {
            let b = f.backends[0].0;
            let fe = Frontend {
                id: id as u32,
                backend_addr: kpf_common::wire::addr(*b.ip()),
                backend_port: kpf_common::wire::port(b.port()),
                flags: 0,
            };
            self.dp.reset_frontend_stats(id as u32)?;
            self.dp.set_frontend(loader::frontend_key(f.address, f.port), fe)?;
            log::info!("frontend {} -> {b}", f.label());
        }
        Ok(())
    }

    fn backend_ips(&self) -> Vec<Ipv4Addr> {
        let mut v: Vec<Ipv4Addr> =
            self.config.frontends.iter().flat_map(|f| f.backends.iter().map(|b| *b.0.ip())).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Keeps next hops resolved; bumps the FIB generation when a route or MAC changed.
    fn refresh_next_hops(&mut self, first: bool) {
        let snapshot = neigh::snapshot(&self.backend_ips());
        let mut changed = false;
        for (backend, state) in snapshot {
            let now = match state {
                Ok(s) => {
                    if !s.resolved() || !s.managed_or_static() {
                        if let Err(e) = neigh::keep_resolved(&s.route) {
                            log::warn!("backend {backend}: cannot keep next hop {} resolved: {e}", s.route.next_hop);
                        }
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
            if self.next_hops.get(&backend) != Some(&now) {
                if !first {
                    log::info!("backend {backend}: next hop now {now:?}");
                }
                changed = true;
                self.next_hops.insert(backend, now);
            }
        }
        if changed && !first {
            self.kernel.fib_gen = self.kernel.fib_gen.wrapping_add(1);
            if let Err(e) = self.dp.set_kernel_config(&self.kernel) {
                log::error!("cannot publish the new FIB generation: {e}");
            }
        }
    }

    fn await_next_hops(&mut self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let pending: Vec<Ipv4Addr> = neigh::snapshot(&self.backend_ips())
                .into_iter()
                .filter(|(_, s)| !s.as_ref().is_ok_and(neigh::NextHopState::resolved))
                .map(|(b, _)| b)
                .collect();
            if pending.is_empty() {
                return;
            }
            if std::time::Instant::now() >= deadline {
                let list: Vec<String> = pending.iter().map(ToString::to_string).collect();
                log::warn!("next hop not resolved yet for backend(s) {}; their new connections wait for it", list.join(", "));
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn collect_garbage(&mut self) {
        match gc::collect(&mut self.dp, &self.kernel.timeouts_ns, clock::coarse_now_ns()) {
            Ok(0) => {}
            Ok(n) => log::debug!("expired {n} conntrack entries"),
            Err(e) => log::warn!("conntrack GC: {e}"),
        }
    }

    fn log_counters(&self) {
        if let Ok(counters) = self.dp.counters() {
            let text: Vec<String> =
                counters.iter().filter(|(_, v)| *v > 0).map(|(c, v)| format!("{}={v}", c.name())).collect();
            log::info!("counters: {}", if text.is_empty() { "all zero".into() } else { text.join(" ") });
        }
        for (id, f) in self.config.frontends.iter().enumerate() {
            if let Ok(s) = self.dp.frontend_stats(id as u32) {
                log::info!("frontend {}: packets={} bytes={} new_flows={}", f.label(), s.packets, s.bytes, s.new_flows);
            }
        }
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }
}

/// Runs until SIGTERM or SIGINT. Prints `ready` on stdout once traffic is being forwarded;
/// SIGUSR1 logs the counters.
pub async fn run(config: Config, opts: Options) -> Result<()> {
    let mut d = Daemon::start(config, &opts)?;
    let sig = |k| signal(k).map_err(Error::io("installing signal handlers"));
    let (mut term, mut int, mut hup) = (sig(SignalKind::terminate())?, sig(SignalKind::interrupt())?, sig(SignalKind::hangup())?);
    let mut usr1 = sig(SignalKind::user_defined1())?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ready");
        let _ = out.flush();
    }
    log::info!("kpf ready: {} frontend(s) on {}", d.config.frontends.len(), d.config.interfaces.join(", "));

    let mut gc_tick = tokio::time::interval(GC_INTERVAL);
    let mut neigh_tick = tokio::time::interval(NEIGH_INTERVAL);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => log::warn!("SIGHUP: live reload is not available in this version; restart kpf to apply config changes"),
            _ = usr1.recv() => d.log_counters(),
            _ = gc_tick.tick() => d.collect_garbage(),
            _ = neigh_tick.tick() => d.refresh_next_hops(false),
        }
    }
    d.log_counters();
    log::info!("stopping: detaching from {}", d.config.interfaces.join(", "));
    Ok(())
}
