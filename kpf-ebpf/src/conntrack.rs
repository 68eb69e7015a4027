//! Connection tracking: find the flow a packet belongs to, or open one for a SYN to a mapped
//! frontend, then hand it to the rewrite and forward steps.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::bpf_get_prandom_u32,
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
    maps::{ALLOW, BACKENDS, CONFIG, FLOWS, FRONTENDS, HALF_OPEN, LOCAL_ADDRS, MAGLEV, SCRATCH, SNAT_OLDEST},
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
    let now = crate::clock::now(cfg);

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
            // go, the reply one so its port is free again, if it is still this connection's
            // (once its own went, evicted or collected, a later connection may hold the port).
            remove_peer(table, &flow.nat, &pkt.key);
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
fn refresh_next_hop<C: Frame>(ctx: &C, flow: &mut Flow, fib_gen: u32, vlan: bool) {
    let ingress = ctx.ingress_ifindex();
    match forward::route(ctx, flow.backend_id, flow.nat.dst_addr, ingress, fib_gen) {
        Ok(r)
            if r.src_addr == flow.nat.src_addr
                && ctx.can_send(r.next_hop.ifindex)
                && (!vlan || r.next_hop.ifindex == ingress) =>
        {
            flow.next_hop = r.next_hop
        }
        // The source address toward the backend would change (this connection cannot follow the
        // new route), the route now leaves by another interface than a tagged frame came in on
        // (its 802.1Q tag is kept, so it may not: as in `try_open`), or the route or neighbour
        // is gone for now: keep the old next hop rather than drop an established connection;
        // the next routing change retries.
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

/// Applies a packet (travelling in `dir`, with `flags`) to the connection state in `entry`, as
/// one atomic update; returns the new state if it changed. Each direction's entry gets the
/// packet applied to its own current state: in the skb modes the two directions' packets can be
/// handled on two CPUs at once, and when each wrote its own result into both entries, a FIN
/// from each side at the same moment left both entries with one FIN (never `Closing`), holding
/// the connection's SNAT port until the FIN timeout. `crossed` answers, for a backend's FIN
/// found in `FinFromClient`, whether the FINs crossed (see [`transition`]).
#[inline(always)]
fn advance(entry: &mut Flow, dir: Direction, flags: u8, crossed: &impl Fn() -> bool) -> Option<State> {
    // BPF has compare-and-exchange on 4 and 8 bytes; `state` sits in the 8-byte-aligned word
    // (next_seq, state, direction, padding), asserted in kpf-common. A concurrent plain store to
    // next_seq only makes the exchange fail and retry; a successful one writes back the next_seq
    // it compared against, so no store is lost either way.
    let word = core::ptr::addr_of_mut!(entry.next_seq).cast::<u64>();
    // SAFETY: an aligned word inside the live map value.
    let mut cur = unsafe { core::ptr::read_volatile(word) };
    // Bounded: each failed exchange means another CPU changed the word; the state can move on
    // only a few times (the states form a short chain).
    for _ in 0..4 {
        let mut bytes = cur.to_ne_bytes();
        let state = State::from_u8(bytes[STATE_BYTE])?;
        // Asked only once this word reads FinFromClient: see `transition`.
        let crossing = tcp::may_cross(state, dir, flags) && crossed();
        let next = tcp::next(state, dir, flags, crossing);
        if next == state {
            return None;
        }
        bytes[STATE_BYTE] = next as u8;
        // SAFETY: as above.
        let found = unsafe { cmpxchg64(word, cur, u64::from_ne_bytes(bytes)) };
        if found == cur {
            return Some(next);
        }
        cur = found;
    }
    None
}

/// Where `Flow::state` is in the word [`advance`] exchanges.
const STATE_BYTE: usize = core::mem::offset_of!(Flow, state) - core::mem::offset_of!(Flow, next_seq);

/// BPF_CMPXCHG on 8 bytes: stores `new` at `ptr` if it holds `expected`; returns what it held.
/// (The BPF target has no `AtomicU64::compare_exchange`.)
///
/// # Safety
/// `ptr` must point to an 8-byte-aligned word of a map value.
#[inline(always)]
unsafe fn cmpxchg64(ptr: *mut u64, expected: u64, new: u64) -> u64 {
    let mut r0 = expected;
    // SAFETY: per the caller; the instruction compares with and returns through r0.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({p} + 0, r0, {n})",
            p = in(reg) ptr,
            n = in(reg) new,
            inout("r0") r0,
            options(nostack),
        );
    }
    r0
}

/// Applies a packet that may change the connection's state (with `flags`, as far as they are
/// credible, and acknowledgment number `ack`) to both directions' entries; returns this entry's
/// new state if it changed. Out of line: only FINs, RSTs, SYNs and the handshake's last ACK come
/// here, and their locals would otherwise sit on the frame of the common path, whose deepest
/// call chain (a new connection's) is at the verifier's stack limit.
#[inline(never)]
fn transition(table: &'static LruHashMap<FlowKey, Flow>, flow: &mut Flow, flags: u8, ack: u32) -> Option<State> {
    let dir = if flow.direction == Direction::Original as u8 { Direction::Original } else { Direction::Reply };
    let peer = table.get_ptr_mut(&FlowKey::reply_of(&flow.nat));
    // The backend's FIN after the client's: whether the backend had the client's FIN when it
    // sent its own decides which end holds TIME_WAIT. The client's entry (the peer of the
    // backend's) knows how far the client got. Read only after an entry was seen in
    // FinFromClient: the client's FIN set that after its next_seq took the FIN in (`established`
    // tracks before it transitions), so the number read then includes it.
    let crossed = || match peer {
        // SAFETY: a live map value; one aligned 4-byte load.
        Some(client) => !kpf_common::seq::acknowledges(flags, ack, unsafe { core::ptr::read_volatile(&(*client).next_seq) }),
        None => false,
    };
    let next = advance(flow, dir, flags, &crossed)?;
    if let Some(peer) = peer {
        // SAFETY: a live map value.
        advance(unsafe { &mut *peer }, dir, flags, &crossed);
    }
    Some(next)
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
    let seq = pkt.seq();
    // Before the state changes, so another CPU that sees the new state sees this number too (see
    // `transition`). Not `!handshake_done()`, which also holds for Reset: a SYN there is a new
    // attempt on the 4-tuple (reopened before this when it has no ACK), not the sender's first
    // number.
    let handshaking = flow.state <= State::SynAcked as u8;
    let seen_seq = flow.next_seq;
    flow.next_seq = kpf_common::seq::track(seen_seq, seq, pkt.payload as u32, pkt.flags, handshaking);
    if let Some(state) = State::from_u8(flow.state)
        && tcp::may_change(state, pkt.flags)
    {
        let flags = kpf_common::seq::credible(pkt.flags, seq, pkt.payload as u32, seen_seq);
        // Only the CPU whose update completed the handshake moves the connection.
        if let Some(next) = transition(table, flow, flags, pkt.ack_seq())
            && core::ptr::eq(table, &HALF_OPEN)
            && next.handshake_done()
        {
            match promote(&pkt.key, &FlowKey::reply_of(&flow.nat)) {
                Some(f) => flow = f,
                None => {
                    stats::count(Counter::DropFlowTableFull);
                    return C::DROP;
                }
            }
        }
    }

    if flow.direction == Direction::Original as u8 && flow.next_hop.fib_gen != cfg.fib_gen {
        refresh_next_hop(ctx, flow, cfg.fib_gen, pkt.vlan);
    }

    if now != flow.last_seen_ns {
        flow.last_seen_ns = now;
        if tcp::is_new_connection(pkt.flags) {
            // A retransmitted SYN: until the backend answers, nothing else keeps the reply entry
            // alive, and the SYN-ACK to a late retransmission would find it expired.
            if let Some(peer) = table.get_ptr_mut(&FlowKey::reply_of(&flow.nat)) {
                // SAFETY: a live map value; one aligned 8-byte store, as the peer's own packets
                // make to this field.
                unsafe { (*peer).last_seen_ns = now };
            }
        }
    }
    flow.packets += 1;
    flow.bytes += pkt.ip_len as u64;
    stats::traffic(flow.frontend_id, flow.backend_id, pkt.ip_len as u64, false);

    // Read in place rather than copied to the stack first. A live entry's rewrite never changes;
    // its next hop only in a refresh after a routing change, which a packet of the same
    // connection on another CPU can race with (as it could with a copy): that packet leaves by
    // the old next hop or with a mix of old and new MAC addresses, once.
    match ctx.forward(pkt, &flow.nat, &flow.next_hop) {
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

/// [`reclaim`] took the port.
const TAKEN_OVER: u64 = u64::MAX;
/// [`reclaim`] found the port held by a connection that has not ended.
const IN_USE: u64 = 0;

/// Removes the other direction's entry of the connection whose entry under `key` has rewrite
/// `nat`, if that entry still belongs to it (its own rewrite leads back to `key`).
#[inline(always)]
fn remove_peer(table: &LruHashMap<FlowKey, Flow>, nat: &Nat, key: &FlowKey) {
    let peer_key = FlowKey::reply_of(nat);
    if let Some(peer) = table.get_ptr(&peer_key)
        // SAFETY: a live map value, read only.
        && unsafe { (*peer).nat.answered_by(key) }
    {
        let _ = table.remove(&peer_key);
    }
}

/// Takes over the SNAT port of the connection `table` holds under `reply_key` if that one has
/// ended past its grace, or expired ([`TAKEN_OVER`]). Otherwise: its `tcp::last_resort_rank` (0,
/// [`IN_USE`], when it is no last-resort candidate).
/// A separate BPF function: inlined into the probe loop it would multiply what the verifier walks.
#[inline(never)]
fn reclaim(
    table: &LruHashMap<FlowKey, Flow>,
    reply_key: &FlowKey,
    timeouts_ns: &[u64; kpf_common::tcp::STATE_COUNT],
    now: u64,
) -> u64 {
    let Some(old) = table.get_ptr(reply_key) else {
        // Gone since the caller looked: another CPU may be claiming it; the next probe is as good.
        return IN_USE;
    };
    // SAFETY: a live map value, read only.
    let old = unsafe { &*old };
    let state = old.state;
    if tcp::reclaimable(timeouts_ns, state, old.last_seen_ns, now) {
        return if take_over(table, reply_key, &old.nat) { TAKEN_OVER } else { IN_USE };
    }
    tcp::last_resort_rank(state, now.saturating_sub(old.last_seen_ns)).min(TAKEN_OVER - 1)
}

/// Removes both entries of the connection `table` holds under `reply_key` (whose rewrite is
/// `old_nat`) and puts the new reply entry (assembled in this CPU's scratch slot) into the
/// half-open table under that key. False if another CPU took it first.
#[inline(never)]
fn take_over(table: &LruHashMap<FlowKey, Flow>, reply_key: &FlowKey, old_nat: &Nat) -> bool {
    // The old connection's client entry, unless the client has opened a new one on that 4-tuple
    // since this entry lost it (evicted or collected).
    remove_peer(table, old_nat, reply_key);
    let _ = table.remove(reply_key);
    // Looked up here, not passed in: one argument fewer keeps `reclaim`'s frame, on the deepest
    // call chain, within the verifier's 512-byte stack.
    let Some(f) = SCRATCH.get_ptr(0) else {
        return false;
    };
    // SAFETY: this CPU's slot, which the caller filled; read by the helper.
    if HALF_OPEN.insert(reply_key, unsafe { &*f }, BPF_NOEXIST as u64).is_err() {
        return false;
    }
    stats::count(Counter::SnatReclaimed);
    true
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
    // SAFETY: this CPU's slot; only this program touches it while it runs here. `take_over`
    // reads it through a pointer of its own, so `f` is taken afresh after every call that may.
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
    f.vlan_tci = pkt.vlan_tci;

    // SAFETY: helper without arguments.
    let hash = snat::hash(k, unsafe { bpf_get_prandom_u32() });
    let mut claimed = None;
    // The probed port of an ended connection that is free soonest: the last resort.
    let oldest = SNAT_OLDEST.get_ptr_mut(0).ok_or(Counter::DropSnatExhausted)?;
    // SAFETY: this CPU's slot; nothing else touches it while the program runs here.
    let oldest = unsafe { &mut *oldest };
    oldest.rank = 0;
    for attempt in 0..snat::PROBES {
        // SAFETY: as above.
        let f = unsafe { &mut *slot };
        let port = snat::candidate(cfg.snat_port_min, cfg.snat_port_max, hash, attempt).to_be();
        let reply_key = FlowKey::tcp(be.addr, be.port, gw_addr, port);
        f.nat = Nat::new(&reply_key, k.dst_addr, k.dst_port, k.src_addr, k.src_port);
        // A port is taken while an established connection or a handshake holds it. One whose
        // connection has ended (and stayed quiet for the grace period) or expired is taken
        // over at once: under a steady stream of short connections most of the range is such
        // ports, and probing past them for a never-used one made each SYN try dozens of ports.
        let table: &LruHashMap<FlowKey, Flow> = if FLOWS.get_ptr(&reply_key).is_some() {
            &FLOWS
        } else if HALF_OPEN.insert(&reply_key, &*f, BPF_NOEXIST as u64).is_ok() {
            claimed = Some(port);
            break;
        } else {
            &HALF_OPEN
        };
        match reclaim(table, &reply_key, &cfg.timeouts_ns, now) {
            TAKEN_OVER => {
                claimed = Some(port);
                break;
            }
            IN_USE => {}
            rank => {
                if oldest.rank == 0 || rank < oldest.rank {
                    oldest.rank = rank;
                    oldest.port = port;
                    oldest.in_flows = core::ptr::eq(table, &FLOWS);
                }
            }
        }
    }
    let port = match claimed {
        Some(p) => p,
        // Every probed port is held. Rather than drop the SYN, take the one of an ended
        // connection that is free soonest, if it has been quiet long enough (see
        // tcp::RECLAIM_MIN_QUIET_NS).
        None if oldest.rank != 0 => {
            let port = oldest.port;
            let reply_key = FlowKey::tcp(be.addr, be.port, gw_addr, port);
            // SAFETY: as above.
            unsafe { (*slot).nat = Nat::new(&reply_key, k.dst_addr, k.dst_port, k.src_addr, k.src_port) };
            let table = if oldest.in_flows { &FLOWS } else { &HALF_OPEN };
            let old = table.get_ptr(&reply_key).ok_or(Counter::DropSnatExhausted)?;
            // SAFETY: a live map value, read only.
            if !take_over(table, &reply_key, unsafe { &(*old).nat }) {
                return Err(Counter::DropSnatExhausted);
            }
            port
        }
        None => return Err(Counter::DropSnatExhausted),
    };

    // SAFETY: as above.
    let f = unsafe { &mut *slot };
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

    ctx.forward(pkt, &f.nat, &f.next_hop)
}
