//! Making the kernel's maps say what the desired config says: backends (stable ids, draining),
//! frontends (single backend or a Maglev pool), allowlists, and the health-dependent choice of
//! which backends a pool may pick. Idempotent: called at start-up (adopting whatever a previous
//! daemon left), after every change, and whenever health or draining changes.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use kpf_common::{Backend, Frontend, FrontendKey, MAX_BACKENDS, MAX_FRONTENDS, MAX_TABLES};

use crate::{
    config::{CheckKind, Config, FrontendConfig, Health, WhenAllUnhealthy},
    daemon::Daemon,
    error::{Error, Result},
    health, loader,
    maglev::{self, Candidate},
    reset,
};

/// What the daemon knows about one backend.
#[derive(Debug)]
pub struct BackendEntry {
    pub id: u32,
    pub health: health::State,
    /// Set while draining: when its remaining connections are reset.
    pub drain_deadline: Option<Instant>,
    /// Connections already reset at the deadline (the drain stays until undrained).
    pub drain_done: bool,
    pub checker: Option<tokio::task::JoinHandle<()>>,
}

/// A backend that left the config while draining (see `Daemon::removed_drains`).
#[derive(Debug)]
pub struct RemovedDrain {
    pub addr: SocketAddrV4,
    /// Its id then: another backend may get it later, so its connections are matched by
    /// address too.
    pub id: u32,
    pub deadline: Instant,
}

impl Drop for BackendEntry {
    fn drop(&mut self) {
        if let Some(c) = self.checker.take() {
            c.abort();
        }
    }
}

/// Lowest id in `0..max` not in `used`, searching from `*cursor` so a just-freed id (whose
/// connections may still be draining, counting toward it) is not handed out again at once.
fn allocate(cursor: &mut u32, max: u32, used: &HashSet<u32>, what: &str) -> Result<u32> {
    for i in 0..max {
        let id = (*cursor + i) % max;
        if !used.contains(&id) {
            *cursor = (id + 1) % max;
            return Ok(id);
        }
    }
    Err(Error::Rejected(format!("no room for another {what} (at most {max})")))
}

/// Every backend some frontend of `desired` names.
fn named_backends(desired: &[FrontendConfig]) -> HashSet<SocketAddrV4> {
    desired.iter().flat_map(|f| f.backends.iter().map(|b| b.addr.0)).collect()
}

impl Daemon {
    /// Picks up the ids a previous daemon gave backends and pools, so adoption changes nothing.
    pub(crate) fn adopt_ids(&mut self) -> Result<()> {
        for (id, b) in self.dp.backends()? {
            let addr = loader::endpoint(b.addr, b.port);
            self.backends.entry(addr).or_insert(BackendEntry {
                id,
                health: health::State::default(),
                drain_deadline: None,
                drain_done: false,
                checker: None,
            });
        }
        let mut max_frontend = None;
        for (key, fe) in self.dp.frontends()? {
            if fe.flags & Frontend::POOL != 0 {
                self.pools.insert(key, fe.target / 2);
            }
            max_frontend = max_frontend.max(Some(fe.id));
        }
        // Connections of removed frontends and backends may still be draining under their old
        // ids; new ids start past every id still in use so the two never mix (stats, --reset).
        let mut max_backend = self.backends.values().map(|e| e.id).max();
        for (_, f) in self.dp.flows()? {
            max_frontend = max_frontend.max(Some(f.frontend_id));
            max_backend = max_backend.max(Some(f.backend_id));
        }
        self.next_frontend_id = max_frontend.map_or(0, |m| (m + 1) % MAX_FRONTENDS);
        self.next_backend_id = max_backend.map_or(0, |m| (m + 1) % MAX_BACKENDS);
        Ok(())
    }

    /// Makes the kernel hold exactly `desired`. Frontends in `reset` lose their connections too
    /// (RST toward both sides); every other connection is left alone, so removed frontends and
    /// backends drain.
    pub(crate) fn converge(&mut self, config: &Config, reset: &HashSet<FrontendKey>) -> Result<()> {
        let desired = &config.frontends[..];
        self.converge_backends(desired, config.health)?;
        let current: HashMap<FrontendKey, Frontend> = self.dp.frontends()?.into_iter().collect();
        let wanted: HashMap<FrontendKey, &FrontendConfig> =
            desired.iter().map(|f| (loader::frontend_key(f.address, f.port), f)).collect();
        let allow_now = self.dp.allow_entries()?;

        for (key, fe) in &current {
            // A removed frontend goes before its connections are reset: a client that reconnects
            // at once on the RST must not open a new connection (one no reset ends) meanwhile.
            if !wanted.contains_key(key) {
                self.dp.remove_frontend(*key)?;
                for (id, net, bits) in &allow_now {
                    if *id == fe.id {
                        self.dp.allow_remove(*id, *net, *bits)?;
                    }
                }
                self.pools.remove(key);
            }
            if reset.contains(key) {
                self.reset_where(|f| f.frontend_id == fe.id)?;
            }
        }
        let mut used: HashSet<u32> = current.iter().filter(|(k, _)| wanted.contains_key(k)).map(|(_, f)| f.id).collect();
        // Frontends that give up their pool first, so one that needs a pool may take it.
        let mut order: Vec<(&FrontendKey, &&FrontendConfig)> = wanted.iter().collect();
        order.sort_by_key(|(key, f)| !(f.backends.len() == 1 && self.pools.contains_key(key)));
        for (key, f) in order {
            let id = match current.get(key) {
                Some(old) => old.id,
                None => {
                    let id = allocate(&mut self.next_frontend_id, MAX_FRONTENDS, &used, "frontend")?;
                    used.insert(id);
                    self.dp.reset_frontend_stats(id)?;
                    id
                }
            };
            let mut fe = self.frontend_value(key, f, id, current.get(key))?;
            // Allowlist entries go in before the flag that makes the kernel consult them, and
            // stale ones go after, so no moment lets a wrong source through.
            let want: HashSet<(Ipv4Addr, u8)> = f.allow.iter().map(|c| (c.addr, c.bits)).collect();
            let have: HashSet<(Ipv4Addr, u8)> =
                allow_now.iter().filter(|(i, ..)| *i == id).map(|(_, n, b)| (*n, *b)).collect();
            for (net, bits) in want.difference(&have) {
                self.dp.allow_insert(id, *net, *bits)?;
            }
            if !want.is_empty() {
                fe.flags |= Frontend::ALLOWLIST;
            }
            if current.get(key) != Some(&fe) {
                self.dp.set_frontend(*key, fe)?;
            }
            for (net, bits) in have.difference(&want) {
                self.dp.allow_remove(id, *net, *bits)?;
            }
        }
        self.retire_backends(desired)
    }

    /// Clears the kernel slots of backends no frontend names any more. After the frontends are
    /// converged: until then one may still point at such a slot, and a SYN finding it empty
    /// would be dropped.
    fn retire_backends(&mut self, desired: &[FrontendConfig]) -> Result<()> {
        let wanted = named_backends(desired);
        let gone: Vec<SocketAddrV4> = self.backends.keys().filter(|a| !wanted.contains(a)).copied().collect();
        for addr in gone {
            if let Some(e) = self.backends.remove(&addr) {
                self.dp.set_backend(e.id, Backend::default())?;
                if let (Some(deadline), false) = (e.drain_deadline, e.drain_done) {
                    self.removed_drains.push(RemovedDrain { addr, id: e.id, deadline });
                }
            }
        }
        Ok(())
    }

    /// Gives every desired backend an id and a kernel slot, and keeps one health checker per
    /// backend.
    fn converge_backends(&mut self, desired: &[FrontendConfig], health: Health) -> Result<()> {
        let wanted = named_backends(desired);
        let mut used: HashSet<u32> = self.backends.values().map(|e| e.id).collect();
        let mut sorted: Vec<SocketAddrV4> = wanted.into_iter().collect();
        sorted.sort();
        for addr in sorted {
            if !self.backends.contains_key(&addr) {
                let id = allocate(&mut self.next_backend_id, MAX_BACKENDS, &used, "backend")?;
                used.insert(id);
                self.dp.reset_backend_stats(id)?;
                self.backends.insert(
                    addr,
                    BackendEntry { id, health: health::State::default(), drain_deadline: None, drain_done: false, checker: None },
                );
            }
            let tx = self.health_tx.clone();
            let e = self.backends.get_mut(&addr).expect("inserted above");
            let mut flags = Backend::PRESENT;
            if e.drain_deadline.is_some() {
                flags |= Backend::DRAINING;
            }
            let value = Backend { addr: kpf_common::wire::addr(*addr.ip()), port: kpf_common::wire::port(addr.port()), flags };
            let id = e.id;
            if health.check == CheckKind::None {
                if let Some(c) = e.checker.take() {
                    c.abort();
                }
                e.health = health::State::default();
            } else if e.checker.is_none() {
                e.checker = Some(health::spawn(addr, health, tx));
            }
            self.dp.set_backend(id, value)?;
        }
        Ok(())
    }

    /// Restarts every checker, e.g. after `[health]` changed.
    pub(crate) fn restart_checkers(&mut self) {
        for e in self.backends.values_mut() {
            if let Some(c) = e.checker.take() {
                c.abort();
            }
        }
    }

    /// The kernel value for frontend `f`: its one backend, or a freshly built Maglev table of
    /// the backends it may pick now.
    fn frontend_value(&mut self, key: &FrontendKey, f: &FrontendConfig, id: u32, old: Option<&Frontend>) -> Result<Frontend> {
        let entry = |a: &SocketAddrV4| self.backends.get(a).expect("converge_backends registered every backend");
        let mut fe = Frontend { id, ..Frontend::default() };
        let reject = f.when_all_unhealthy == WhenAllUnhealthy::Reject;
        if f.backends.len() == 1 {
            // A lone backend that is draining is refused with an RST by the dataplane, healthy or
            // not: only its health decides here.
            let (b, e) = (&f.backends[0], entry(&f.backends[0].addr.0));
            if reject && !(b.weight > 0 && e.health.healthy) {
                fe.flags |= Frontend::REJECT;
            }
            fe.target = e.id;
            // No longer a pool (the caller writes this value before anything else could take
            // the pool's tables).
            self.pools.remove(key);
            return Ok(fe);
        }
        let open = |healthy_only: bool| -> Vec<Candidate> {
            f.backends
                .iter()
                .filter(|b| {
                    let e = entry(&b.addr.0);
                    e.drain_deadline.is_none() && (!healthy_only || e.health.healthy)
                })
                .map(|b| Candidate { addr: b.addr.0, id: entry(&b.addr.0).id, weight: b.weight })
                .collect()
        };
        // With no healthy backend that takes new connections (a draining one takes none): reject,
        // or fail open, to every backend not being drained.
        let mut table = maglev::build(&open(true));
        if table.is_empty() && !reject {
            table = maglev::build(&open(false));
        }
        if table.is_empty() {
            // Rejecting, or every backend is draining (or has weight 0): nothing may take new
            // connections.
            fe.flags |= Frontend::REJECT;
        }
        let pool = match self.pools.get(key) {
            Some(p) => *p,
            None => {
                let used: HashSet<u32> = self.pools.values().copied().collect();
                let p = allocate(&mut self.next_pool, MAX_TABLES / 2, &used, "frontend with several backends")?;
                self.pools.insert(*key, p);
                p
            }
        };
        fe.flags |= Frontend::POOL;
        let live = old.filter(|o| o.flags & Frontend::POOL != 0 && o.target / 2 == pool).map(|o| o.target);
        if table.is_empty() {
            fe.target = live.unwrap_or(pool * 2);
            return Ok(fe);
        }
        if let Some(t) = live
            && self.tables.get(&t) == Some(&table)
        {
            fe.target = t;
            return Ok(fe);
        }
        // Fill the table the kernel is not reading, then switch the frontend to it in one update.
        let spare = match live {
            Some(t) => t ^ 1,
            None => pool * 2,
        };
        self.dp.write_table(spare, &table)?;
        self.tables.insert(spare, table);
        fe.target = spare;
        Ok(fe)
    }

    /// Ends every connection whose entry matches: both conntrack entries go, then an RST goes to
    /// each side of a connection that was still open. Returns how many connections were ended.
    pub(crate) fn reset_where(&mut self, matches: impl Fn(&kpf_common::Flow) -> bool) -> Result<usize> {
        let all = crate::gc::snapshot(&self.dp)?;
        reset::end_where(&mut self.dp, &all, matches, &reset::Sender::new()?)
    }

    /// Resets the connections of backends whose drain deadline has passed.
    pub(crate) fn expire_drains(&mut self) {
        let now = Instant::now();
        let due: Vec<(SocketAddrV4, u32)> = self
            .backends
            .iter()
            .filter(|(_, e)| !e.drain_done && e.drain_deadline.is_some_and(|d| d <= now))
            .map(|(a, e)| (*a, e.id))
            .collect();
        for (addr, id) in due {
            match self.reset_where(|f| f.backend_id == id) {
                Ok(n) => log::info!("drain of {addr} timed out: reset {n} remaining connection(s)"),
                Err(e) => log::error!("drain of {addr}: resetting its connections failed: {e}"),
            }
            if let Some(e) = self.backends.get_mut(&addr) {
                e.drain_done = true;
            }
        }
        let (due, pending): (Vec<RemovedDrain>, Vec<RemovedDrain>) =
            std::mem::take(&mut self.removed_drains).into_iter().partition(|d| d.deadline <= now);
        self.removed_drains = pending;
        for d in due {
            let (addr, port) = (kpf_common::wire::addr(*d.addr.ip()), kpf_common::wire::port(d.addr.port()));
            match self.reset_where(|f| f.backend_id == d.id && f.nat.dst_addr == addr && f.nat.dst_port == port) {
                Ok(n) => log::info!("drain of {} (no longer configured) timed out: reset {n} remaining connection(s)", d.addr),
                Err(e) => log::error!("drain of {}: resetting its connections failed: {e}", d.addr),
            }
        }
    }

    /// Health verdicts as seen now, for status.
    pub(crate) fn backend_health(&self) -> BTreeMap<SocketAddrV4, (u32, bool, bool, Option<String>)> {
        self.backends
            .iter()
            .map(|(a, e)| (*a, (e.id, e.health.healthy, e.drain_deadline.is_some(), e.health.last_error.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_skips_used_and_recent_ids() {
        let mut cursor = 0;
        let used: HashSet<u32> = [0, 1, 3].into();
        assert_eq!(allocate(&mut cursor, 5, &used, "x").unwrap(), 2);
        assert_eq!(allocate(&mut cursor, 5, &used, "x").unwrap(), 4, "does not go back to 2 at once");
        let full: HashSet<u32> = (0..5).collect();
        assert!(allocate(&mut cursor, 5, &full, "x").unwrap_err().to_string().contains("at most 5"));
    }
}
