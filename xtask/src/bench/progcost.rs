//! kpf's own per-packet cost: the real XDP program (loaded by `kpf::loader::Dataplane` in the
//! fixture topology of `kpf-userspace/tests/fixture_support`) run through BPF_PROG_TEST_RUN, next
//! to an empty XDP_PASS program measured the same way in the same run.
//!
//! With `repeat > 1` the kernel runs the program again on the frame the previous iteration left
//! (no reset between iterations), so:
//! - *unmapped pass*: the program does not touch the frame; `repeat` is used directly.
//! - *established*: the connection's Original entry rewrites `C:cp -> F:fp` into
//!   `S:sp -> B:bp`. A second, bench-only entry keyed `S:sp -> B:bp` rewrites it back. Every
//!   iteration is then an established-path hit (lookup, rewrite with checksum deltas, MACs,
//!   devmap redirect), alternating between the two entries; after an even `repeat` the frame is
//!   the input again. The entries' packet counters prove it: together they grow by `repeat`.
//! - *new flow*: a bench-only frontend at the backend's own address and port maps it to that
//!   backend, so the SYN a new flow sends on (`gateway:snat -> backend:port`) is itself a SYN to
//!   a frontend with a 4-tuple never seen before: every iteration opens one more connection
//!   (backend choice, next hop, SNAT port, two half-open entries). The NewFlows counter proves it
//!   (it grows by `repeat`). The half-open entries are cleared between runs, so SNAT occupancy
//!   stays low, as on a gateway that is not under a SYN flood.
//! - *new flow, cold* (diagnostic): each of many distinct SYNs runs once (`repeat = 1`), averaged,
//!   alternately through a wildcard and an address-specific frontend, next to the empty program
//!   run the same way (a single run carries the test-run timer's overhead and starts with caches
//!   the syscall path has cooled).
//! - *floors* (diagnostic): raw programs making only the map operations and helper calls of the
//!   established and new-flow paths (see `baseline`), measured the same way: the new-flow floor
//!   runs by turns with kpf's chained SYNs, its half-open table cleared between runs like kpf's.

use std::net::SocketAddrV4;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use kpf_common::{Counter, Flow, FlowKey, Frontend, NextHop, names, nat::Nat, tcp::State, wire};
use serde::Serialize;

// Not copied: the fixture harness of kpf's own tests, compiled in here. Formatted by its owners.
#[path = "../../../kpf-userspace/tests/fixture_support/mod.rs"]
#[allow(clippy::all, unused_imports)]
#[rustfmt::skip]
mod fixture_support;

use fixture_support::{
    ACK, Action, B0_MAC, BACKEND_A_MAC, BACKEND_B, BACKEND_PORT, Conn, GW_B, GW_C, Harness, PSH, SYN, Tcp4, Topology,
};

use super::{
    baseline::{RawXdp, TableShape, xdp_md},
    proc,
    results::{Summary, summarize},
};

#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Iterations per BPF_PROG_TEST_RUN for the repeatable cases (made even).
    pub repeat: u32,
    /// Trials of each case (interleaved).
    pub trials: u32,
    /// Distinct SYNs per trial for the cold new-flow cases.
    pub syns: u32,
    /// Iterations of one chained new-flow run: connections opened before the table is cleared.
    /// The fixture's half-open table holds 1,024 entries per CPU, two per connection; past that
    /// the LRU evicts live entries and the chain can run into one of its own connections.
    pub chain: u32,
    /// Chained runs per trial.
    pub chain_runs: u32,
}

/// One measured case.
#[derive(Clone, Debug, Serialize)]
pub struct Case {
    pub id: &'static str,
    pub label: &'static str,
    /// Iterations per test run (1 for the per-SYN cases).
    pub repeat: u32,
    /// Test runs averaged per trial (1, or the number of SYNs).
    pub runs_per_trial: u32,
    /// Mean ns per iteration, one value per trial.
    pub ns: Vec<f64>,
    pub summary: Summary,
    /// The baseline this case is compared with (`empty` or `empty-once`).
    pub baseline: Option<&'static str>,
    /// Measured only to explain the others (which part of a new flow costs what).
    pub diagnostic: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProgCost {
    pub cases: Vec<Case>,
    /// Established cycle evidence: the two entries' packet counters grew by this much over all
    /// trials, against `repeat * trials` iterations run.
    pub established_hits: u64,
    pub established_iterations: u64,
    /// The frame after an even number of iterations equals the input.
    pub established_frame_restored: bool,
    pub syns_opened: u64,
    /// Connections the chained new-flow runs opened (NewFlows), against `chain * trials`.
    pub chain_opened: u64,
    pub chain_iterations: u64,
}

impl ProgCost {
    pub fn case(&self, id: &str) -> Option<&Case> {
        self.cases.iter().find(|c| c.id == id)
    }
}

/// One of the loaded program's maps, by name, opened by id.
fn program_map(h: &mut Harness<'_>, name: &str) -> Result<MapData> {
    let info = h.dp.program_mut().map_err(|e| anyhow!("{e}"))?.info()?;
    for id in info.map_ids()?.unwrap_or_default() {
        let md = MapData::from_id(id)?;
        if md.info()?.name_as_str() == Some(name) {
            return Ok(md);
        }
    }
    bail!("kpf's program has no {name} map")
}

fn flows_map(h: &mut Harness<'_>) -> Result<BpfHashMap<MapData, FlowKey, Flow>> {
    // The Dataplane has no insert for conntrack entries; open its flow table by id instead.
    Ok(BpfHashMap::try_from(Map::from_map_data(program_map(h, names::FLOWS)?)?)?)
}

/// The size the fixture gave one of kpf's maps (the floors' maps are made the same).
fn map_entries(h: &mut Harness<'_>, name: &str) -> Result<u32> {
    Ok(program_map(h, name)?.info()?.max_entries())
}

fn table_shape(h: &mut Harness<'_>, name: &str) -> Result<TableShape> {
    let info = program_map(h, name)?.info()?;
    Ok(TableShape { entries: info.max_entries(), flags: info.map_flags() })
}

fn counter(h: &Harness<'_>, c: Counter) -> Result<u64> {
    h.dp.counter(c).map_err(|e| anyhow!("{e}"))
}

fn flow(h: &Harness<'_>, key: &FlowKey) -> Result<Option<Flow>> {
    h.dp.flow(key).map_err(|e| anyhow!("{e}"))
}

fn run(h: &mut Harness<'_>, ingress: u32, frame: &[u8], repeat: u32, want: Action) -> Result<(f64, Vec<u8>)> {
    let o = h.run_packet(ingress, 0, frame, repeat).map_err(|e| anyhow!("BPF_PROG_TEST_RUN: {e}"))?;
    ensure!(
        o.action == want as u32,
        "kpf returned {} where {} was expected",
        Action::name(o.action),
        Action::name(want as u32)
    );
    Ok((o.duration.as_nanos() as f64, o.output))
}

/// Opens `conn` with a real handshake (SYN, SYN-ACK, ACK, each run once) and returns its
/// Original key and entry, now established.
fn open_established(h: &mut Harness<'_>, conn: &Conn) -> Result<(FlowKey, Flow)> {
    let (c0, b0) = (h.ifaces.c0, h.ifaces.b0);
    run(h, c0, &conn.c2f(SYN).bytes(), 1, Action::Redirect).context("SYN")?;
    let key = conn.client_key();
    let orig = flow(h, &key)?.context("no Original entry after the SYN")?;
    let snat = wire::to_port(orig.nat.src_port);
    let synack = Tcp4::new(BACKEND_A_MAC, B0_MAC, conn.backend, SocketAddrV4::new(GW_B, snat), SYN | ACK)
        .with(|p| p.seq = 5000)
        .bytes();
    run(h, b0, &synack, 1, Action::Redirect).context("SYN-ACK")?;
    run(h, c0, &conn.c2f(ACK).with(|p| p.seq = 1001).bytes(), 1, Action::Redirect).context("ACK")?;
    let orig = flow(h, &key)?.context("Original entry vanished")?;
    ensure!(orig.state == State::Established as u8, "connection state {} after the handshake", orig.state);
    Ok((key, orig))
}

fn measure_in(h: &mut Harness<'_>, o: Options) -> Result<ProgCost> {
    let repeat = (o.repeat.max(2) + 1) & !1;
    let c0 = h.ifaces.c0;
    let empty = RawXdp::pass()?;
    let flows = table_shape(h, names::FLOWS)?;
    let lookup = RawXdp::lru_lookup(flows)?;
    let floor_est = RawXdp::floor_established(flows)?;
    let floor_new =
        RawXdp::floor_new_flow(flows, table_shape(h, names::HALF_OPEN)?, map_entries(h, names::FRONTENDS)?)?;

    // Unmapped: a segment to a gateway port no frontend maps.
    let to_port = |name, cport, port| Conn { frontend: SocketAddrV4::new(GW_C, port), ..Conn::to_a(name, cport) };
    let unmapped = to_port("unmapped", 50001, 9999).c2f(ACK).bytes();

    // Diagnostic: a SYN to *:9096, whose backend has a route but no neighbour entry: the
    // frontend and locality lookups and the route lookup (a failed one is not cached) run, then
    // it is dropped (frame untouched), so it repeats like the unmapped case.
    let no_neigh = to_port("no-neighbour", 50002, 9096).c2f(SYN).bytes();

    // Established: a real connection through *:9093 plus the bench-only return entry.
    let conn = Conn::to_a("bench", 50000);
    let (x_key, x) = open_established(h, &conn)?;
    let y_key = FlowKey::tcp(x.nat.src_addr, x.nat.src_port, x.nat.dst_addr, x.nat.dst_port);
    // Same egress (a devmap redirect to b0) as X, but the MACs of the client's frame, so that
    // the frame after X then Y is byte for byte the input again.
    let y = Flow {
        nat: Nat::new(&y_key, x_key.src_addr, x_key.src_port, x_key.dst_addr, x_key.dst_port),
        next_hop: NextHop { src_mac: fixture_support::CLIENT_MAC, dst_mac: fixture_support::C0_MAC, ..x.next_hop },
        packets: 0,
        bytes: 0,
        ..x
    };
    flows_map(h)?.insert(y_key, y, 0).context("inserting the return entry")?;
    let reply_key = FlowKey::reply_of(&x.nat);
    let data = conn.c2f(ACK | PSH).with(|p| {
        p.seq = 1001;
        p.payload = vec![0x5a; 64];
    });
    let established = data.bytes();
    let packets = |h: &Harness<'_>| -> Result<u64> {
        Ok(flow(h, &x_key)?.map_or(0, |f| f.packets) + flow(h, &y_key)?.map_or(0, |f| f.packets))
    };

    // Frees the table (and SNAT ports) after a batch of SYNs; keeps the established pair.
    let clear = |h: &mut Harness<'_>| -> Result<()> {
        for (k, _) in h.dp.flows().map_err(|e| anyhow!("{e}"))? {
            if k != x_key && k != y_key && k != reply_key {
                h.dp.remove_flow(&k).map_err(|e| anyhow!("{e}"))?;
            }
        }
        Ok(())
    };

    // New flows, chained: a frontend at backend B's own address and port, to backend B. (Not A:
    // a chained SYN from the established pair's SNAT port to A would hit the pair's entry.)
    let b_id = h
        .dp
        .backends()
        .map_err(|e| anyhow!("{e}"))?
        .into_iter()
        .find(|(_, b)| b.addr == kpf_common::wire::addr(BACKEND_B))
        .map(|(id, _)| id)
        .context("backend B is not loaded")?;
    let chain_id = fixture_support::FRONTENDS.len() as u32;
    h.dp
        .set_frontend(
            kpf::loader::frontend_key(Some(BACKEND_B), BACKEND_PORT),
            Frontend { id: chain_id, target: b_id, ..Default::default() },
        )
        .map_err(|e| anyhow!("{e}"))?;
    let chain = o.chain.max(1);

    let ctx = xdp_md(established.len(), c0);
    let (mut e_ns, mut u_ns, mut est_ns, mut e1_ns, mut syn_ns) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut nn_ns, mut exact_ns, mut lookup_ns) = (vec![], vec![], vec![]);
    let (mut chain_ns, mut floor_est_ns, mut floor_new_ns) = (vec![], vec![], vec![]);
    let (mut hits, mut restored, mut opened, mut chained) = (0u64, true, 0u64, 0u64);
    let mut next_port: u32 = 1024;
    for trial in 0..o.trials {
        proc::check_interrupted()?;
        let r = empty.test_run(&established, &ctx, repeat)?;
        ensure!(r.retval == 2, "the empty program returned {}", r.retval);
        e_ns.push(r.duration_ns as f64);
        let r = lookup.test_run(&established, &ctx, repeat)?;
        ensure!(r.retval == 2, "the lookup program returned {}", r.retval);
        lookup_ns.push(r.duration_ns as f64);
        let r = floor_est.test_run(&established, &ctx, repeat)?;
        ensure!(r.retval == Action::Redirect as u32, "the established floor returned {}", r.retval);
        floor_est_ns.push(r.duration_ns as f64);

        let before = counter(h, Counter::PassNotOurs)?;
        let (ns, out) = run(h, c0, &unmapped, repeat, Action::Pass)?;
        ensure!(out == unmapped, "the unmapped frame was changed");
        ensure!(counter(h, Counter::PassNotOurs)? - before == repeat as u64, "not every unmapped run passed");
        u_ns.push(ns);

        let before = counter(h, Counter::DropFibNoNeigh)?;
        let (ns, out) = run(h, c0, &no_neigh, repeat, Action::Drop)?;
        ensure!(out == no_neigh, "the dropped SYN was changed");
        ensure!(
            counter(h, Counter::DropFibNoNeigh)? - before == repeat as u64,
            "not every no-neighbour SYN was dropped"
        );
        nn_ns.push(ns);

        let before = packets(h)?;
        let (ns, out) = run(h, c0, &established, repeat, Action::Redirect)?;
        hits += packets(h)? - before;
        if out != established {
            restored = false;
            let at = out.iter().zip(&established).position(|(a, b)| a != b).unwrap_or(out.len().min(established.len()));
            eprintln!(
                "[prog] note: the established frame differs from the input after {repeat} runs, first at byte {at}"
            );
        }
        est_ns.push(ns);

        // New flows, and the empty program as many times with repeat = 1.
        let mut once = 0.0;
        for _ in 0..o.syns {
            once += empty.test_run(&established, &ctx, 1)?.duration_ns as f64;
        }
        e1_ns.push(once / o.syns as f64);
        // SYNs through the wildcard *:9093 and the address-specific 10.0.0.1:9094 (no locality
        // lookup), alternately: measured one loop after the other, whichever ran first read
        // ~250 ns more per SYN (it follows the empty program's runs), which had passed for the
        // cost of the locality lookup.
        let before = counter(h, Counter::NewFlows)?;
        let (mut wild, mut exact) = (0.0, 0.0);
        for i in 0..o.syns {
            // Distinct client ports (cycling through 1024..=65535 across trials).
            let mut port = (next_port % 64512 + 1024) as u16;
            next_port += 1;
            if port == conn.client.port() {
                port = (next_port % 64512 + 1024) as u16;
                next_port += 1;
            }
            let syn = Conn::to_a("syn", port).c2f(SYN).bytes();
            wild += run(h, c0, &syn, 1, Action::Redirect)
                .with_context(|| format!("trial {trial}: SYN from port {port}"))?
                .0;
            let syn = Conn::to_b("syn-exact", port).c2f(SYN).bytes();
            exact += run(h, c0, &syn, 1, Action::Redirect).with_context(|| format!("trial {trial}: SYN to 9094"))?.0;
            // Within the fixture's half-open table (1,024 entries per CPU, two per SYN).
            if i % 200 == 199 {
                clear(h)?;
            }
        }
        let new = counter(h, Counter::NewFlows)? - before;
        ensure!(new == 2 * o.syns as u64, "{new} of {} SYNs opened a flow", 2 * o.syns);
        opened += new;
        syn_ns.push(wild / o.syns as f64);
        exact_ns.push(exact / o.syns as f64);
        clear(h)?;

        // kpf's chained SYNs and the floor's, run by run in turn (a burst of a few hundred µs
        // each, so the machine's drift hits both alike).
        let (mut total, mut floor_total) = (0.0, 0.0);
        for r in 0..o.chain_runs {
            let before = counter(h, Counter::NewFlows)?;
            let syn = Conn::to_b("chain", 1024 + (trial * o.chain_runs + r) as u16).c2f(SYN).bytes();
            let (ns, _) =
                run(h, c0, &syn, chain, Action::Redirect).with_context(|| format!("trial {trial}: chained SYNs"))?;
            let new = counter(h, Counter::NewFlows)? - before;
            ensure!(new == chain as u64, "chained SYNs: {new} of {chain} iterations opened a connection");
            chained += new;
            total += ns;
            clear(h)?;

            let f = floor_new.test_run(&established, &ctx, chain)?;
            ensure!(f.retval == Action::Redirect as u32, "the new-flow floor returned {}", f.retval);
            floor_total += f.duration_ns as f64;
            floor_new.clear()?;
        }
        chain_ns.push(total / o.chain_runs as f64);
        floor_new_ns.push(floor_total / o.chain_runs as f64);
    }
    ensure!(
        hits == repeat as u64 * o.trials as u64,
        "established cycle: {hits} established hits for {} iterations",
        repeat as u64 * o.trials as u64
    );

    let case = |id, label, repeat, runs_per_trial, ns: Vec<f64>, baseline| Case {
        id,
        label,
        repeat,
        runs_per_trial,
        summary: summarize(&ns).expect("at least one trial"),
        ns,
        baseline,
        diagnostic: false,
    };
    let diagnostic = |c: Case| Case { diagnostic: true, ..c };
    Ok(ProgCost {
        cases: vec![
            case("empty", "empty XDP program (XDP_PASS)", repeat, 1, e_ns, None),
            diagnostic(case(
                "one-lookup",
                "one LRU hash lookup (hit), conntrack-shaped map, then XDP_PASS",
                repeat,
                1,
                lookup_ns,
                Some("empty"),
            )),
            diagnostic(case(
                "floor-established",
                "floor of an established packet: one conntrack lookup (hit) and a devmap redirect, nothing else",
                repeat,
                1,
                floor_est_ns,
                Some("empty"),
            )),
            case("unmapped", "kpf: unmapped packet, passed to the kernel", repeat, 1, u_ns, Some("empty")),
            case("established", "kpf: established flow, rewritten and redirected", repeat, 1, est_ns, Some("empty")),
            case(
                "new-flow",
                "kpf: new flow (SYN: backend, next hop, SNAT port, 2 half-open entries), one per iteration",
                chain,
                o.chain_runs,
                chain_ns,
                Some("empty"),
            ),
            diagnostic(case(
                "floor-new-flow",
                "floor of a new flow: the map operations and helper calls of kpf's SYN to an address-specific \
                 frontend (2 half-open inserts, 4 lookups, a devmap lookup, a random number, a redirect), nothing else",
                chain,
                o.chain_runs,
                floor_new_ns,
                Some("empty"),
            )),
            case("empty-once", "empty XDP program, one run per test run", 1, o.syns, e1_ns, None),
            diagnostic(case(
                "new-flow-cold",
                "kpf: new flow, one SYN per test run (cold caches), via a wildcard frontend",
                1,
                o.syns,
                syn_ns,
                Some("empty-once"),
            )),
            diagnostic(case(
                "syn-no-neighbour",
                "kpf: SYN dropped after its route lookup (backend has no neighbour)",
                repeat,
                1,
                nn_ns,
                Some("empty"),
            )),
            diagnostic(case(
                "new-flow-exact",
                "kpf: new flow, cold, via an address-specific frontend (no locality lookup)",
                1,
                o.syns,
                exact_ns,
                Some("empty-once"),
            )),
        ],
        established_hits: hits,
        established_iterations: repeat as u64 * o.trials as u64,
        established_frame_restored: restored,
        syns_opened: opened,
        chain_opened: chained,
        chain_iterations: chain as u64 * o.chain_runs as u64 * o.trials as u64,
    })
}

/// Builds the fixture topology, measures, and removes it.
pub fn measure(o: Options) -> Result<ProgCost> {
    let topo = Topology::new().map_err(|e| anyhow!("building the fixture topology: {e}"))?;
    topo.run(|h| measure_in(h, o)).map_err(|e| anyhow!("loading kpf's program: {e}"))?
}
