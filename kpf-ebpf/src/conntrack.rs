//! Connection tracking: find the flow a packet belongs to, or open one for a SYN to a mapped
//! frontend, then hand it to the rewrite and forward steps.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use aya_ebpf::maps::{LruHashMap, lpm_trie::Key};
use kpf_common::{
    AllowKey, Backend, Config, Counter, Direction, Flow, FlowKey, Frontend, FrontendKey,
    nat::Nat,
    select, snat,
    tcp::{self, State},
};

use crate::{
    forward,
    frame::Frame,
    maps::{ALLOW, BACKENDS, CONFIG, FLOWS, FRONTENDS, HALF_OPEN, LOCAL_ADDRS, MAGLEV, SCRATCH},
    parse::{self, Packet, Parsed},
    stats,
};

pub fn handle<C: Frame>(ctx: &C) -> Result<u32, u32> {
    let parsed = match parse::parse(ctx) {
        Ok(p) => p,
        Err(reason) => return Ok(pass::<C>(reason)),
    };
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(C::PASS);
    };
    let pkt = match parsed {
        Parsed::Tcp(p) => p,
        Parsed::Icmp { l4 } => return Ok(crate::icmp::translate(ctx, l4)),
    };
    // Coarse (jiffy) time is plenty for idle timeouts and much cheaper than the precise clock.
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };

    // Established connections first (the common case: one lookup), then handshakes.
    let (found, table): (_, &'static LruHashMap<FlowKey, Flow>) = match FLOWS.get_ptr_mut(&pkt.key) {
        Some(f) => (Some(f), &FLOWS),
        None => match HALF_OPEN.get_ptr_mut(&pkt.key) {
            Some(f) => (Some(f), &HALF_OPEN),
            // Another CPU may have just promoted this connection (it inserts into FLOWS, then
            // removes from HALF_OPEN): a packet that missed both looks again before it is handed
            // to the kernel, which would reset the connection. Packets of one connection reach
            // two CPUs at once in the skb modes (tc, generic XDP) on veth, and with RPS.
            None if !tcp::is_new_connection(pkt.flags) => (FLOWS.get_ptr_mut(&pkt.key), &FLOWS),
            None => (None, &HALF_OPEN),
        },
    };
    if let Some(flow) = found {
        // SAFETY: a live map value; concurrent writers only race on counters and timestamps.
        let flow = unsafe { &mut *flow };
        let live = !tcp::expired(&cfg.timeouts_ns, flow.state, flow.last_seen_ns, now);
        let reopen = tcp::is_new_connection(pkt.flags)
            && (!live || State::from_u8(flow.state).is_none_or(State::reusable));
        if live && !reopen {
            return Ok(established(ctx, &pkt, flow, table, cfg, now));
        }
        if reopen {
            // A new connection on a finished 4-tuple gets a fresh SNAT binding: both old entries
            // go, the reply one so its port is free again.
            let _ = table.remove(&FlowKey::reply_of(&flow.nat));
            let _ = table.remove(&pkt.key);
        }
    }

    let Some(fe) = frontend(&pkt.key) else {
        return Ok(pass::<C>(Counter::PassNotOurs));
    };
    if !tcp::is_new_connection(pkt.flags) {
        // No connection to continue: the kernel answers RST, so the client reconnects at once.
        return Ok(pass::<C>(Counter::PassNoFlow));
    }
    Ok(open(ctx, &pkt, &fe, cfg, now))
}

#[inline(always)]
fn pass<C: Frame>(reason: Counter) -> u32 {
    stats::count(reason);
    C::PASS
}

/// The frontend a packet without a connection is addressed to: its exact address and port, or
/// the port on any *local* address. The locality check keeps a wildcard frontend from capturing
/// traffic merely routed through the gateway.
#[inline(always)]
fn frontend(key: &FlowKey) -> Option<Frontend> {
    // SAFETY: Frontend is Copy plain data; copied out at once.
    if let Some(fe) = unsafe { FRONTENDS.get(FrontendKey::tcp(key.dst_addr, key.dst_port)) } {
        return Some(*fe);
    }
    // SAFETY: as above.
    let fe = unsafe { *FRONTENDS.get(FrontendKey::tcp(0, key.dst_port))? };
    // SAFETY: plain data, only tested for presence.
    unsafe { LOCAL_ADDRS.get(key.dst_addr) }.is_some().then_some(fe)
}

/// A route or neighbour changed since `flow` looked up its next hop: look again. A separate BPF
/// function, rarely called: its FIB parameter block stays off the forwarding path's stack.
#[inline(never)]
fn refresh_next_hop<C: Frame>(ctx: &C, flow: &mut Flow, fib_gen: u32) {
    let ingress = ctx.ingress_ifindex();
    match forward::route(ctx, flow.backend_id, flow.nat.dst_addr, ingress, fib_gen) {
        Ok(r) if r.src_addr == flow.nat.src_addr && ctx.can_send(r.next_hop.ifindex) => {
            flow.next_hop = r.next_hop
        }
        // The source address toward the backend would change (this connection cannot follow the
        // new route), or the route or neighbour is gone for now: keep the old next hop rather
        // than drop an established connection; the next routing change retries.
        Ok(_) | Err(_) => flow.next_hop.fib_gen = fib_gen,
    }
}

/// Moves a connection whose client just completed the handshake from the half-open table to
/// the established one, and returns its entry there.
#[inline(always)]
fn promote(key: &FlowKey, reply_key: &FlowKey) -> Option<&'static mut Flow> {
    // Inserted straight from the half-open values: no copy on the 512-byte BPF stack.
    let (orig, reply) = (HALF_OPEN.get_ptr(key)?, HALF_OPEN.get_ptr(reply_key)?);
    // SAFETY: live map values, read by the helper.
    unsafe {
        FLOWS.insert(reply_key, &*reply, 0).ok()?;
        FLOWS.insert(key, &*orig, 0).ok()?;
    }
    let _ = HALF_OPEN.remove(key);
    let _ = HALF_OPEN.remove(reply_key);
    // SAFETY: a live map value.
    FLOWS.get_ptr_mut(key).map(|p| unsafe { &mut *p })
}

/// The common case: a packet of a known, live connection.
#[inline(always)]
fn established<C: Frame>(
    ctx: &C,
    pkt: &Packet,
    mut flow: &mut Flow,
    table: &'static LruHashMap<FlowKey, Flow>,
    cfg: &Config,
    now: u64,
) -> u32 {
    if let Some(state) = State::from_u8(flow.state)
        && tcp::may_change(state, pkt.flags)
    {
        let dir = if flow.direction == Direction::Original as u8 { Direction::Original } else { Direction::Reply };
        let next = tcp::next(state, dir, pkt.flags);
        if next != state {
            let reply_key = FlowKey::reply_of(&flow.nat);
            flow.state = next as u8;
            if let Some(peer) = table.get_ptr_mut(&reply_key) {
                // SAFETY: a live map value.
                unsafe { (*peer).state = next as u8 };
            }
            if core::ptr::eq(table, &HALF_OPEN) && next.handshake_done() {
                match promote(&pkt.key, &reply_key) {
                    Some(f) => flow = f,
                    None => {
                        stats::count(Counter::DropFlowTableFull);
                        return C::DROP;
                    }
                }
            }
        }
    }

    if flow.direction == Direction::Original as u8 && flow.next_hop.fib_gen != cfg.fib_gen {
        refresh_next_hop(ctx, flow, cfg.fib_gen);
    }

    if now != flow.last_seen_ns {
        flow.last_seen_ns = now;
    }
    flow.packets += 1;
    flow.bytes += pkt.ip_len as u64;
    flow.next_seq = pkt.next_seq();
    stats::traffic(flow.frontend_id, flow.backend_id, pkt.ip_len as u64, false);

    let nat = flow.nat;
    let nh = flow.next_hop;
    match ctx.forward(pkt, &nat, &nh, cfg) {
        Ok(action) => action,
        Err(reason) => {
            stats::count(reason);
            C::DROP
        }
    }
}

/// The backend a new connection to `fe` goes to, and its id; `Ok(None)`: refuse it with an RST.
#[inline(always)]
fn choose(pkt: &Packet, fe: &Frontend) -> Result<Option<(u32, Backend)>, Counter> {
    if fe.flags & Frontend::ALLOWLIST != 0 {
        let key = Key::new(AllowKey::prefix_len(32), AllowKey::new(fe.id, pkt.key.src_addr));
        if ALLOW.get(&key).is_none() {
            return Err(Counter::DropNotAllowed);
        }
    }
    if fe.flags & Frontend::REJECT != 0 {
        return Err(Counter::DropNoHealthyBackend);
    }
    let id = if fe.flags & Frontend::POOL != 0 {
        match MAGLEV.get(select::table_index(fe.target, select::slot(&pkt.key))) {
            Some(id) => *id,
            None => return Err(Counter::DropNoHealthyBackend),
        }
    } else {
        fe.target
    };
    let be = match BACKENDS.get(id) {
        Some(b) if b.flags & Backend::PRESENT != 0 => *b,
        _ => return Err(Counter::DropNoHealthyBackend),
    };
    if be.flags & Backend::DRAINING != 0 {
        return Ok(None);
    }
    Ok(Some((id, be)))
}

/// Opens a connection for a SYN to frontend `fe` and forwards the SYN, or drops it and counts
/// why. A separate BPF function (at most five register arguments, a plain return value): its
/// frame (two entries being built, the FIB parameters) does not weigh on the established path's
/// stack.
#[inline(never)]
fn open<C: Frame>(ctx: &C, pkt: &Packet, fe: &Frontend, cfg: &Config, now: u64) -> u32 {
    match try_open(ctx, pkt, fe, cfg, now) {
        Ok(action) => action,
        Err(reason) => {
            stats::count(reason);
            C::DROP
        }
    }
}

/// Backend, next hop, SNAT port, both conntrack entries.
#[inline(always)]
fn try_open<C: Frame>(ctx: &C, pkt: &Packet, fe: &Frontend, cfg: &Config, now: u64) -> Result<u32, Counter> {
    let Some((backend_id, be)) = choose(pkt, fe)? else {
        // The frontend's only backend is draining: the kernel's RST makes the client fail fast.
        return Ok(pass::<C>(Counter::PassBackendDraining));
    };
    let ingress = ctx.ingress_ifindex();
    let route = forward::route(ctx, backend_id, be.addr, ingress, cfg.fib_gen)?;
    let gw_addr = route.src_addr;
    if !ctx.can_send(route.next_hop.ifindex) {
        return Err(Counter::DropEgressNotAttached);
    }
    if pkt.vlan && route.next_hop.ifindex != ingress {
        return Err(Counter::DropVlanEgress);
    }

    let k = &pkt.key;
    // Both entries are assembled in the per-CPU scratch slot, field by field, not on the stack.
    let slot = SCRATCH.get_ptr_mut(0).ok_or(Counter::DropFlowTableFull)?;
    // SAFETY: this CPU's slot; nothing else touches it while the program runs here.
    let f = unsafe { &mut *slot };
    // Replies go back the way the SYN came: out the same interface, to the MAC that sent it.
    // SAFETY: parse bounds-checked the Ethernet header.
    let eth = unsafe { &*pkt.eth };
    f.next_hop.ifindex = ingress;
    f.next_hop.src_mac = eth.dst_addr;
    f.next_hop.dst_mac = eth.src_addr;
    f.next_hop.fib_gen = cfg.fib_gen;
    f.created_ns = now;
    f.last_seen_ns = now;
    f.packets = 0;
    f.bytes = 0;
    f.frontend_id = fe.id;
    f.backend_id = backend_id;
    f.next_seq = 0;
    f.state = State::SynSent as u8;
    f.direction = Direction::Reply as u8;
    f._pad = [0; 2];

    // SAFETY: helper without arguments.
    let hash = snat::hash(k, unsafe { bpf_get_prandom_u32() });
    let mut claimed = None;
    // The first probed port whose connection has ended, and whether the established table holds
    // it: used only if no probed port is free.
    let mut ended: Option<(u16, bool)> = None;
    for attempt in 0..snat::PROBES {
        let port = snat::candidate(cfg.snat_port_min, cfg.snat_port_max, hash, attempt).to_be();
        let reply_key = FlowKey::tcp(be.addr, be.port, gw_addr, port);
        // A port is taken if an established connection or a handshake holds it.
        if let Some(old) = FLOWS.get_ptr(&reply_key) {
            // SAFETY: a live map value, read only.
            let old = unsafe { &*old };
            if ended.is_none() && tcp::reclaimable(&cfg.timeouts_ns, old.state, old.last_seen_ns, now) {
                ended = Some((port, true));
            }
            continue;
        }
        f.nat = Nat::new(&reply_key, k.dst_addr, k.dst_port, k.src_addr, k.src_port);
        if HALF_OPEN.insert(&reply_key, &*f, BPF_NOEXIST as u64).is_ok() {
            claimed = Some(port);
            break;
        }
        if ended.is_none()
            && let Some(old) = HALF_OPEN.get_ptr(&reply_key)
        {
            // SAFETY: a live map value, read only.
            let old = unsafe { &*old };
            if tcp::reclaimable(&cfg.timeouts_ns, old.state, old.last_seen_ns, now) {
                ended = Some((port, false));
            }
        }
    }
    let port = match claimed {
        Some(p) => p,
        None => {
            let (port, established) = ended.ok_or(Counter::DropSnatExhausted)?;
            let reply_key = FlowKey::tcp(be.addr, be.port, gw_addr, port);
            let table = if established { &FLOWS } else { &HALF_OPEN };
            // The ended connection's two entries go; its port serves the new one.
            if let Some(old) = table.get_ptr(&reply_key) {
                // SAFETY: a live map value, read only.
                let _ = table.remove(&FlowKey::reply_of(unsafe { &(*old).nat }));
            }
            let _ = table.remove(&reply_key);
            f.nat = Nat::new(&reply_key, k.dst_addr, k.dst_port, k.src_addr, k.src_port);
            HALF_OPEN.insert(&reply_key, &*f, BPF_NOEXIST as u64).map_err(|_| Counter::DropSnatExhausted)?;
            stats::count(Counter::SnatReclaimed);
            port
        }
    };

    f.nat = Nat::new(k, gw_addr, port, be.addr, be.port);
    f.next_hop = route.next_hop;
    f.packets = 1;
    f.bytes = pkt.ip_len as u64;
    f.next_seq = pkt.next_seq();
    f.direction = Direction::Original as u8;
    if HALF_OPEN.insert(k, &*f, 0).is_err() {
        let _ = HALF_OPEN.remove(&FlowKey::tcp(be.addr, be.port, gw_addr, port));
        return Err(Counter::DropFlowTableFull);
    }
    stats::count(Counter::NewFlows);
    stats::traffic(fe.id, backend_id, pkt.ip_len as u64, true);

    ctx.forward(pkt, &f.nat, &f.next_hop, cfg)
}
