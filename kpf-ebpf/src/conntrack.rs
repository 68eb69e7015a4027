//! Connection tracking: find the flow a packet belongs to, or open one for a SYN to a mapped
//! frontend, then hand it to the rewrite and forward steps.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    programs::XdpContext,
};
use aya_ebpf::maps::lpm_trie::Key;
use kpf_common::{
    AllowKey, Backend, Config, Counter, Direction, Flow, FlowKey, Frontend, FrontendKey, NextHop,
    nat::{self, L4Csum, Nat},
    select, snat,
    tcp::{self, State},
};

use crate::{
    forward,
    maps::{ALLOW, BACKENDS, CONFIG, FLOWS, FRONTENDS, IFACES, MAGLEV},
    parse::{self, Packet},
    stats,
};

pub fn handle(ctx: &XdpContext) -> Result<u32, u32> {
    let pkt = match parse::parse(ctx) {
        Ok(p) => p,
        Err(reason) => return Ok(pass(reason)),
    };
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    // Coarse (jiffy) time is plenty for idle timeouts and much cheaper than the precise clock.
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };

    if let Some(flow) = FLOWS.get_ptr_mut(&pkt.key) {
        // SAFETY: a live map value; concurrent writers only race on counters and timestamps.
        let flow = unsafe { &mut *flow };
        let live = !tcp::expired(&cfg.timeouts_ns, flow.state, flow.last_seen_ns, now);
        let reopen = tcp::is_new_connection(pkt.flags)
            && (!live || State::from_u8(flow.state).is_none_or(State::reusable));
        if live && !reopen {
            return Ok(established(ctx, &pkt, flow, cfg, now));
        }
        if reopen {
            // A new connection on a finished 4-tuple: it gets a fresh SNAT binding, and the old
            // binding's reply entry must go so its port is free again.
            let _ = FLOWS.remove(&FlowKey::reply_of(&flow.nat));
        }
    }

    let Some(fe) = frontend(ctx, &pkt.key) else {
        return Ok(pass(Counter::PassNotOurs));
    };
    if !tcp::is_new_connection(pkt.flags) {
        // No connection to continue: the kernel answers RST, so the client reconnects at once.
        return Ok(pass(Counter::PassNoFlow));
    }
    Ok(match open(ctx, &pkt, &fe, cfg, now) {
        Ok(action) => action,
        Err(reason) => {
            stats::count(reason);
            xdp_action::XDP_DROP
        }
    })
}

#[inline(always)]
fn pass(reason: Counter) -> u32 {
    stats::count(reason);
    xdp_action::XDP_PASS
}

/// The frontend a packet without a connection is addressed to: its exact address and port, or
/// the port on any *local* address. The locality check keeps a wildcard frontend from capturing
/// traffic merely routed through the gateway; it costs a FIB lookup, so it runs last.
#[inline(always)]
fn frontend(ctx: &XdpContext, key: &FlowKey) -> Option<Frontend> {
    // SAFETY: Frontend is Copy plain data; copied out at once.
    if let Some(fe) = unsafe { FRONTENDS.get(FrontendKey::tcp(key.dst_addr, key.dst_port)) } {
        return Some(*fe);
    }
    // SAFETY: as above.
    let fe = unsafe { *FRONTENDS.get(FrontendKey::tcp(0, key.dst_port))? };
    forward::is_local(ctx, ctx.ingress_ifindex() as u32, key.dst_addr).then_some(fe)
}

/// The common case: a packet of a known, live connection.
#[inline(always)]
fn established(ctx: &XdpContext, pkt: &Packet, flow: &mut Flow, cfg: &Config, now: u64) -> u32 {
    if let Some(state) = State::from_u8(flow.state)
        && tcp::may_change(state, pkt.flags)
    {
        let dir = if flow.direction == Direction::Original as u8 { Direction::Original } else { Direction::Reply };
        let next = tcp::next(state, dir, pkt.flags);
        if next != state {
            flow.state = next as u8;
            if let Some(peer) = FLOWS.get_ptr_mut(&FlowKey::reply_of(&flow.nat)) {
                // SAFETY: a live map value.
                unsafe { (*peer).state = next as u8 };
            }
        }
    }

    if flow.direction == Direction::Original as u8 && flow.next_hop.fib_gen != cfg.fib_gen {
        // A route or neighbour changed since this flow looked up its next hop.
        match forward::lookup(ctx, ctx.ingress_ifindex() as u32, flow.nat.dst_addr, cfg.fib_gen) {
            Ok((nh, src)) if src == flow.nat.src_addr && forward::can_send(ctx, nh.ifindex) => flow.next_hop = nh,
            // The source address toward the backend would change (this connection cannot follow
            // the new route), or the route or neighbour is gone for now: keep the old next hop
            // rather than drop an established connection; the next routing change retries.
            Ok(_) | Err(_) => flow.next_hop.fib_gen = cfg.fib_gen,
        }
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
    rewrite(ctx, pkt, &nat, cfg);
    match forward::send(ctx, pkt, &nh) {
        Ok(action) => action,
        Err(reason) => {
            stats::count(reason);
            xdp_action::XDP_DROP
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

/// Opens a connection for a SYN to frontend `fe`: backend, next hop, SNAT port, both conntrack
/// entries.
#[inline(always)]
fn open(ctx: &XdpContext, pkt: &Packet, fe: &Frontend, cfg: &Config, now: u64) -> Result<u32, Counter> {
    let Some((backend_id, be)) = choose(pkt, fe)? else {
        // The frontend's only backend is draining: the kernel's RST makes the client fail fast.
        return Ok(pass(Counter::PassBackendDraining));
    };
    let ingress = ctx.ingress_ifindex() as u32;
    let (to_backend, gw_addr) = forward::lookup(ctx, ingress, be.addr, cfg.fib_gen)?;
    if !forward::can_send(ctx, to_backend.ifindex) {
        return Err(Counter::DropEgressNotAttached);
    }
    if pkt.vlan && to_backend.ifindex != ingress {
        return Err(Counter::DropVlanEgress);
    }
    // Replies go back the way the SYN came: out the same interface, to the MAC that sent it.
    // SAFETY: parse bounds-checked the Ethernet header.
    let eth = unsafe { &*pkt.eth };
    let to_client = NextHop { ifindex: ingress, src_mac: eth.dst_addr, dst_mac: eth.src_addr, fib_gen: cfg.fib_gen };

    let k = &pkt.key;
    // SAFETY: helper without arguments.
    let hash = snat::hash(k, unsafe { bpf_get_prandom_u32() });
    let mut claimed = None;
    for attempt in 0..snat::PROBES {
        let port = snat::candidate(cfg.snat_port_min, cfg.snat_port_max, hash, attempt).to_be();
        let reply_key = FlowKey::tcp(be.addr, be.port, gw_addr, port);
        let reply = Flow {
            nat: Nat::new(&reply_key, k.dst_addr, k.dst_port, k.src_addr, k.src_port),
            next_hop: to_client,
            created_ns: now,
            last_seen_ns: now,
            frontend_id: fe.id,
            backend_id,
            state: State::SynSent as u8,
            direction: Direction::Reply as u8,
            ..Flow::default()
        };
        if FLOWS.insert(&reply_key, &reply, BPF_NOEXIST as u64).is_ok() {
            claimed = Some(port);
            break;
        }
    }
    let port = claimed.ok_or(Counter::DropSnatExhausted)?;

    let original = Flow {
        nat: Nat::new(k, gw_addr, port, be.addr, be.port),
        next_hop: to_backend,
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: pkt.ip_len as u64,
        frontend_id: fe.id,
        backend_id,
        next_seq: pkt.next_seq(),
        state: State::SynSent as u8,
        direction: Direction::Original as u8,
        ..Flow::default()
    };
    if FLOWS.insert(k, &original, 0).is_err() {
        let _ = FLOWS.remove(&FlowKey::tcp(be.addr, be.port, gw_addr, port));
        return Err(Counter::DropFlowTableFull);
    }
    stats::count(Counter::NewFlows);
    stats::traffic(fe.id, backend_id, pkt.ip_len as u64, true);

    rewrite(ctx, pkt, &original.nat, cfg);
    forward::send(ctx, pkt, &to_backend)
}

#[inline(always)]
fn rewrite(ctx: &XdpContext, pkt: &Packet, nat: &Nat, cfg: &Config) {
    // SAFETY: parse bounds-checked both headers.
    let (ip, tcp) = unsafe { (&mut *pkt.ip, &mut *pkt.tcp) };
    nat::rewrite(nat, ip, tcp, l4_csum(ctx, pkt.ip_len, cfg));
}

/// An IPv4 packet longer than its interface's MTU can only be a GRO/GSO aggregate (generic XDP
/// sees those), whose TCP checksum field is a CHECKSUM_PARTIAL pseudo-header sum. Anything that
/// fits the MTU came off a wire with a complete checksum (see README, "Checksums").
#[inline(always)]
fn l4_csum(ctx: &XdpContext, ip_len: u16, cfg: &Config) -> L4Csum {
    if (ip_len as u32) <= cfg.min_mtu {
        return L4Csum::Full;
    }
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: IfaceInfo is plain data.
    match unsafe { IFACES.get(ifindex) } {
        Some(i) if ip_len as u32 > i.mtu => L4Csum::Partial,
        _ => L4Csum::Full,
    }
}
