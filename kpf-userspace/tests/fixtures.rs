//! kpf's programs (native XDP, generic XDP and tc) against a table of input frames and expected outputs, through
//! BPF_PROG_TEST_RUN (see `fixture_support` for the table and the harness). Needs root.

mod fixture_support;

use fixture_support::{ACK, Action, Attach, Check, Conn, Fixture, MAX_FLOWS, PSH, SYN, Topology, fixtures, handshake};
use kpf::{gc, reset};
use kpf_common::{Counter, FlowKey};
use kpf_common::tcp::State;
use kpf_tests::serial::is_root;

#[test]
fn fixture_table() {
    table_through(Attach::Xdp);
}

/// The same table through the generic XDP program: the same results, and it also rewrites the
/// CHECKSUM_PARTIAL fixtures, which only socket buffers carry.
#[test]
fn fixture_table_generic() {
    table_through(Attach::XdpGeneric);
}

/// The same table through the tc program: the same verdicts, outputs, counters and conntrack
/// state, but for the few XDP-only cases it reports as skipped.
#[test]
fn fixture_table_tc() {
    table_through(Attach::Tc);
}

/// The fixture topology; `None` (and a note) without root.
fn topology() -> Option<Topology> {
    if !is_root() {
        eprintln!("skipped: the fixture tests need root (BPF and network namespaces)");
        return None;
    }
    Some(Topology::new().expect("building the fixture topology"))
}

fn table_through(attach: Attach) {
    // Dropped at the end of this function, and during unwinding if an assertion fails.
    let Some(topo) = topology() else { return };
    let table = fixtures();
    let failures = topo
        .run_at(attach, |h| {
            let mut failures = h.run_table(&table);
            failures.extend(h.check_totals(&table));
            failures
        })
        .expect("running the fixtures in the gateway namespace");
    for f in &failures {
        eprintln!("\n{f}");
    }
    assert!(
        failures.is_empty(),
        "{attach:?}: {} of {} fixtures (or totals) failed; see above",
        failures.len(),
        table.len()
    );
}

/// The established table holds `max_flows` connections whichever CPU opens them. Every
/// connection here is opened and used on CPU 0, far past the share one CPU had of a table whose
/// LRU lists were per CPU (BPF_F_NO_COMMON_LRU splits the capacity: on a 2-CPU machine, 176 of
/// 600 such connections lost their reply entry to eviction; on a 1-CPU machine this cannot fail).
#[test]
fn flow_table_is_not_split_between_cpus() {
    let conns: Vec<Conn> = (0..MAX_FLOWS as u16 * 3 / 4)
        .map(|i| Conn::to_a(Box::leak(format!("capacity-{i}").into_boxed_str()), 20_000 + i))
        .collect();
    let mut table = Vec::new();
    for &c in &conns {
        handshake(&mut table, c);
    }
    for &c in &conns {
        let data = move |_: &_| {
            c.c2f(ACK | PSH).with(|p| {
                p.seq = 1001;
                p.ack = 5001;
                p.payload = b"still here".to_vec();
            })
        };
        table.push(
            Fixture::client_segment(format!("{}: data, after all connections opened", c.name), c, false, data)
                .check(Check::State(c, State::Established)),
        );
    }
    let Some(topo) = topology() else { return };
    let failures = topo
        .run(|h| {
            // SAFETY: a zeroed cpu_set_t with CPU 0 set, for the calling thread (pid 0).
            let pinned = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(0, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
            };
            assert_eq!(pinned, 0, "pinning the test thread to CPU 0: {}", std::io::Error::last_os_error());
            h.run_table(&table)
        })
        .expect("running the fixtures in the gateway namespace");
    let shown: Vec<&String> = failures.iter().take(5).collect();
    assert!(failures.is_empty(), "{} of {} fixtures failed, the first: {shown:#?}", failures.len(), table.len());
}

/// An interface a previous daemon attached to and this one does not (`Dataplane::retain_ifaces`,
/// at start) stops being a redirect target: a SYN whose backend is routed out of it is dropped
/// and counted, not sent where no kpf sees the replies.
#[test]
fn dropped_interfaces_are_no_redirect_target() {
    let Some(topo) = topology() else { return };
    topo.run(|h| {
        // *:9098 maps to a backend routed out of x0.
        let syn = |cport| Conn::to_a("X", cport).c2f(SYN).with(|p| p.dst.set_port(9098)).bytes();
        let (c0, b0, x0) = (h.ifaces.c0, h.ifaces.b0, h.ifaces.x0);
        h.dp.register_iface(x0, 1500).expect("registering x0");
        let out = h.run_packet(c0, 0, &syn(50071), 1).expect("running the SYN");
        assert_eq!(out.action, Action::Redirect as u32, "a SYN out of a registered x0 is forwarded");
        let gone = h.dp.retain_ifaces(&[c0, b0].into()).expect("retain_ifaces");
        assert_eq!(gone, vec![x0]);
        let out = h.run_packet(c0, 0, &syn(50072), 1).expect("running the SYN");
        assert_eq!(out.action, Action::Drop as u32, "a SYN out of x0, no longer registered");
        assert_eq!(h.dp.counter(Counter::DropEgressNotAttached).expect("reading the counter"), 1);
        assert_eq!(h.dp.retain_ifaces(&[c0, b0].into()).expect("retain_ifaces"), Vec::<u32>::new());
    })
    .expect("running in the gateway namespace");
}

/// What [`walk_then_reopen`] leaves: the tables as walked, and the two connections on one 4-tuple.
struct Reopened {
    timeouts: [u64; kpf_common::tcp::STATE_COUNT],
    /// The dataplane's clock after the first connection expired.
    now: u64,
    first: kpf_common::Flow,
    walked: std::collections::HashMap<FlowKey, kpf_common::Flow>,
    reopened: kpf_common::Flow,
}

/// Opens `c` (SYN only, with no SYN-sent timeout), walks the tables once it has expired, then
/// reopens its 4-tuple with another SYN: the walk holds a connection whose key is now another's.
fn walk_then_reopen(h: &mut fixture_support::Harness, c: &Conn) -> Reopened {
    let c0 = h.ifaces.c0;
    let mut timeouts = h.config.timeouts_ns;
    timeouts[State::SynSent as usize] = 0;
    h.config.timeouts_ns = timeouts;
    h.dp.set_kernel_config(&h.config).expect("setting the timeouts");
    let out = h.run_packet(c0, 0, &c.c2f(SYN).bytes(), 1).expect("the first SYN");
    assert_eq!(out.action, Action::Redirect as u32);
    // Past a tick of the dataplane's clock, so the connection has expired.
    let first = h.dp.flow(&c.client_key()).unwrap().expect("the first SYN's entry");
    let now = loop {
        let now = h.dp.now_ns().expect("reading the dataplane's clock");
        if now > first.last_seen_ns {
            break now;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    let walked = gc::snapshot(&h.dp).expect("walking the tables");
    assert!(walked.contains_key(&c.client_key()));

    let out = h.run_packet(c0, 0, &c.c2f(SYN).with(|p| p.seq = 9_000_000).bytes(), 1).expect("the second SYN");
    assert_eq!(out.action, Action::Redirect as u32, "a SYN on the expired 4-tuple opens it again");
    let reopened = h.dp.flow(&c.client_key()).unwrap().expect("the reopened connection's entry");
    assert!(reopened.created_ns >= now, "the entry under the key is the new connection's");
    Reopened { timeouts, now, first, walked, reopened }
}

/// Ending a frontend's or backend's connections (`map rm --reset`, a drain's deadline) walks the
/// tables, then removes what matched; a connection that took one of those keys in between (here:
/// a SYN reopening an expired 4-tuple) is not one of them and keeps its entries.
#[test]
fn reset_spares_a_key_reused_after_its_walk() {
    let Some(topo) = topology() else { return };
    topo.run(|h| {
        let c = Conn::to_a("G", 50210);
        let Reopened { first, walked, reopened, .. } = walk_then_reopen(h, &c);
        let sender = reset::Sender::new().expect("a raw socket for RSTs");
        let frontend = first.frontend_id;
        let ended = reset::end_where(&mut h.dp, &walked, |f| f.frontend_id == frontend, &sender).expect("ending");
        assert_eq!(ended, 0, "the walked connection is gone; the one under its key now is another");
        let kept = h.dp.flow(&c.client_key()).unwrap();
        assert_eq!(kept.map(|f| f.next_seq), Some(9_000_001), "the reopened connection lost its entry");
        assert!(h.dp.flow(&FlowKey::reply_of(&reopened.nat)).unwrap().is_some(), "its reply entry is gone");

        // Walked again, it is ended, both entries.
        let walked = gc::snapshot(&h.dp).expect("walking the tables");
        let ended = reset::end_where(&mut h.dp, &walked, |f| f.frontend_id == frontend, &sender).expect("ending");
        assert_eq!(ended, 1);
        assert!(h.dp.flow(&c.client_key()).unwrap().is_none(), "its original entry is still there");
        assert!(h.dp.flow(&FlowKey::reply_of(&reopened.nat)).unwrap().is_none(), "its reply entry is still there");
    })
    .expect("running in the gateway namespace");
}

/// The GC walks the tables, then removes what had expired; a key the dataplane gives to a new
/// connection in between (here: a SYN reopening an expired 4-tuple) must keep its new entry.
#[test]
fn gc_spares_a_key_reused_after_its_walk() {
    let Some(topo) = topology() else { return };
    topo.run(|h| {
        let c = Conn::to_a("G", 50200);
        let Reopened { timeouts, now, walked, reopened, .. } = walk_then_reopen(h, &c);
        let removed = gc::sweep(&mut h.dp, &walked, &timeouts, now).expect("the sweep");
        assert_eq!(removed, 0, "nothing the walk saw expired is still there");
        let kept = h.dp.flow(&c.client_key()).unwrap();
        assert_eq!(kept.map(|f| f.next_seq), Some(9_000_001), "the reopened connection lost its entry to the GC");
        assert!(h.dp.flow(&FlowKey::reply_of(&reopened.nat)).unwrap().is_some(), "its reply entry is gone");
    })
    .expect("running in the gateway namespace");
}
