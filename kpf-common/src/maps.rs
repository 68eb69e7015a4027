//! The layout of every BPF map key and value. `#[repr(C)]`, explicit padding, sizes asserted:
//! the kernel and userspace must agree byte for byte.

use crate::nat::Nat;

/// Map names as they appear in the object file and under the pin directory.
pub mod names {
    pub const PROGRAM: &str = "kpf";
    pub const GENERIC_PROGRAM: &str = "kpf_generic";
    pub const TC_PROGRAM: &str = "kpf_tc";
    /// Reports the dataplane's clock (see `Config::tick_ns`) when test-run.
    pub const CLOCK_PROGRAM: &str = "kpf_clock";
    pub const FRONTENDS: &str = "KPF_FRONTENDS";
    pub const BACKENDS: &str = "KPF_BACKENDS";
    pub const MAGLEV: &str = "KPF_MAGLEV";
    pub const ALLOW: &str = "KPF_ALLOW";
    pub const BACKEND_STATS: &str = "KPF_BACKEND_STATS";
    pub const LOCAL_ADDRS: &str = "KPF_LOCAL_ADDRS";
    pub const FLOWS: &str = "KPF_FLOWS";
    pub const HALF_OPEN: &str = "KPF_HALF_OPEN";
    pub const CONFIG: &str = "KPF_CONFIG";
    pub const IFACES: &str = "KPF_IFACES";
    pub const DEVMAP: &str = "KPF_DEVMAP";
    pub const STATS: &str = "KPF_STATS";
    pub const FRONTEND_STATS: &str = "KPF_FRONTEND_STATS";
}

/// Most frontends (mapped ports) one gateway serves; also the size of the per-frontend stats array.
pub const MAX_FRONTENDS: u32 = 4096;
/// Most interfaces kpf attaches to at once.
pub const MAX_IFACES: u32 = 64;
/// Most distinct backends (`ip:port`) across all frontends.
pub const MAX_BACKENDS: u32 = 4096;
/// Slots in one Maglev table: a prime well above any frontend's backend count, so each backend's
/// share is even to within a fraction of a percent (Maglev paper: M > 100 N).
pub const MAGLEV_SIZE: u32 = 4093;
/// Maglev tables: two per frontend that has several backends (one live, one being rebuilt).
pub const MAX_TABLES: u32 = 256;
/// Source-allowlist entries (CIDRs) across all frontends.
pub const MAX_ALLOW: u32 = 16384;
/// The gateway's own IPv4 addresses (and VIPs routed to it as local) a wildcard frontend answers on.
pub const MAX_LOCAL_ADDRS: u32 = 1024;

pub const IPPROTO_TCP: u8 = 6;

/// A connection as seen on ingress, before any rewrite: the key of a conntrack entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16 && core::mem::align_of::<FlowKey>() == 4);

impl FlowKey {
    #[inline(always)]
    pub const fn tcp(src_addr: u32, src_port: u16, dst_addr: u32, dst_port: u16) -> Self {
        Self { src_addr, dst_addr, src_port, dst_port, proto: IPPROTO_TCP, _pad: [0; 3] }
    }

    /// The key of a TCP segment from its IPv4 addresses and its ports as they lie on the wire
    /// (source then destination), each pair read as one word. Built as whole 4-byte words, each
    /// then written with one store: the kernel hashes and compares a key 4 bytes at a time, and a
    /// load that spans several narrower stores cannot take its data from them but waits until
    /// they reach the cache (a store-forwarding stall, on every packet when the key on the BPF
    /// stack was assembled field by field).
    #[inline(always)]
    pub const fn tcp_from_wire(addrs: [u32; 2], ports: u32) -> Self {
        let words = [addrs[0], addrs[1], ports, u32::from_ne_bytes([IPPROTO_TCP, 0, 0, 0])];
        // SAFETY: the four words are the struct's 16 bytes in field order (all integers, no
        // padding the compiler adds; size and alignment asserted above).
        unsafe { core::mem::transmute::<[u32; 4], Self>(words) }
    }

    /// The key the other direction's packets carry once this one has been rewritten by `nat`.
    #[inline(always)]
    pub const fn reply_of(nat: &Nat) -> Self {
        Self::tcp(nat.dst_addr, nat.dst_port, nat.src_addr, nat.src_port)
    }
}

/// Where and how a rewritten packet leaves: the result of a FIB lookup, cached per flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// The routing generation this was looked up in (see [`Config::fib_gen`]).
    pub fib_gen: u32,
}
const _: () = assert!(core::mem::size_of::<NextHop>() == 20);

/// A backend's route as one CPU last looked it up: new connections to that backend reuse it
/// instead of a FIB lookup each, until the routing generation changes. Kept per CPU, so no entry
/// is ever read half-written.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendRoute {
    pub next_hop: NextHop,
    /// The gateway's address toward the backend (the SNAT source).
    pub src_addr: u32,
    /// The backend address looked up: ids are reused for other backends.
    pub dst_addr: u32,
    /// The interface the lookup was made for (routing may depend on it); 0: never looked up.
    pub ingress: u32,
}
const _: () = assert!(core::mem::size_of::<BackendRoute>() == 32);

impl BackendRoute {
    /// Whether this entry answers a lookup of `dst_addr` from `ingress` in generation `fib_gen`.
    #[inline(always)]
    pub fn answers(&self, dst_addr: u32, ingress: u32, fib_gen: u32) -> bool {
        self.ingress != 0 && self.ingress == ingress && self.dst_addr == dst_addr && self.next_hop.fib_gen == fib_gen
    }
}

/// Which side a conntrack entry's packets come from.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client -> frontend, rewritten to gateway -> backend.
    Original = 0,
    /// Backend -> gateway, rewritten to frontend -> client.
    Reply = 1,
}

/// One direction of a tracked connection: the value of a conntrack entry.
///
/// Both directions of a connection carry the same `state`: a packet that changes it (SYN-ACK, the
/// first ACK, FIN, RST; rare) is applied to both entries, each atomically, so no CPU undoes
/// another's change. The common packet touches only its own entry. One exception: when FINs
/// from both sides are applied on two CPUs at once, each entry records whichever came first to
/// it, so one may read `Closing` and the other `BackendTimeWait`; both are ended, and the port's
/// hold follows the reply entry's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub nat: Nat,
    pub next_hop: NextHop,
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Index into the per-frontend stats.
    pub frontend_id: u32,
    /// The backend this connection went to (index into the backends array and its stats).
    pub backend_id: u32,
    /// The highest sequence number this direction's sender has used, plus one (host order; see
    /// [`crate::seq::track`]): what an RST toward the other side must carry to be accepted, and
    /// what an RST or FIN from this side must be near to count.
    pub next_seq: u32,
    /// A [`crate::tcp::State`].
    pub state: u8,
    /// A [`Direction`].
    pub direction: u8,
    /// The 802.1Q tag control word (wire order) of the frames that opened the connection, 0 if
    /// they were untagged: kpf keeps a frame's tag, and the RSTs it sends itself need it too.
    pub vlan_tci: u16,
}
const _: () = assert!(core::mem::size_of::<Flow>() == 88);
// The kernel updates `state` with an 8-byte compare-and-exchange on (next_seq, state, direction,
// vlan_tci): one aligned word.
const _: () = assert!(core::mem::offset_of!(Flow, next_seq) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(Flow, state) == core::mem::offset_of!(Flow, next_seq) + 4);

/// A mapped frontend: the key of [`Frontend`]. `addr == 0` matches any local address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FrontendKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FrontendKey>() == 8);

impl FrontendKey {
    #[inline(always)]
    pub const fn tcp(addr: u32, port: u16) -> Self {
        Self { addr, port, proto: IPPROTO_TCP, _pad: 0 }
    }
}

/// Where new connections to a frontend go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    /// Index into the per-frontend stats.
    pub id: u32,
    /// With [`Frontend::POOL`]: the Maglev table to pick from; otherwise the one backend's id.
    pub target: u32,
    pub flags: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Frontend>() == 12);

impl Frontend {
    /// Several backends: `target` is a Maglev table.
    pub const POOL: u16 = 1;
    /// New connections only from the sources in the allowlist trie.
    pub const ALLOWLIST: u16 = 2;
    /// Refuse new connections (drop the SYN, counted): no healthy backend takes new connections
    /// and the frontend is configured to reject rather than fail open, or every backend of a pool
    /// is draining.
    pub const REJECT: u16 = 4;
}

/// A backend, by id (index into the backends array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub flags: u16,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 8);

impl Backend {
    /// Being drained: no new connections (a pool's table already leaves it out; a frontend with
    /// only this backend refuses new connections).
    pub const DRAINING: u16 = 1;
    /// The slot is in use (a zeroed slot is no backend).
    pub const PRESENT: u16 = 2;
}

/// Key of the source allowlist trie: the frontend id then the source address, so one trie holds
/// every frontend's list and a lookup matches only its own frontend's CIDRs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllowKey {
    /// Frontend id, big-endian, so the trie's prefix bits cover it first.
    pub frontend: [u8; 4],
    /// Source address, wire order.
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<AllowKey>() == 8);

impl AllowKey {
    pub const fn new(frontend_id: u32, addr: u32) -> Self {
        Self { frontend: frontend_id.to_be_bytes(), addr: addr.to_ne_bytes() }
    }
    /// The trie prefix length for a CIDR of `bits` under one frontend.
    pub const fn prefix_len(bits: u32) -> u32 {
        32 + bits
    }
}

/// An attached interface. Its presence is what the tc program checks before redirecting to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceInfo {
    /// Recorded at attach, not read by this version's programs: an earlier version's generic XDP
    /// program compared packet lengths with it, and may still be attached during a restart.
    pub mtu: u32,
}
const _: () = assert!(core::mem::size_of::<IfaceInfo>() == 4);

/// Run-time settings, in the single slot of the config array. Written by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Idle timeout per [`crate::tcp::State`], in nanoseconds; index 0 is unused.
    pub timeouts_ns: [u64; crate::tcp::STATE_COUNT],
    /// SNAT source port range, inclusive, host order.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Nanoseconds per kernel tick (jiffy). The program's clock, which stamps flows, is jiffies
    /// times this (bpf_jiffies64 is a plain load; the kernel's clock helpers are calls); the
    /// daemon reads the same clock through [`names::CLOCK_PROGRAM`].
    pub tick_ns: u32,
    /// Bumped by the daemon whenever a route or neighbour toward a backend changes: flows whose
    /// cached next hop is from an older generation look it up again.
    pub fib_gen: u32,
    /// Unused. Held the smallest MTU of the attached interfaces, which generic XDP once told
    /// GRO aggregates by; kept so that the layout (and a hitless restart from that version) stays.
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 8 * crate::tcp::STATE_COUNT + 16);

impl Default for Config {
    fn default() -> Self {
        Self {
            timeouts_ns: crate::tcp::DEFAULT_TIMEOUTS_NS,
            snat_port_min: 40000,
            snat_port_max: 59999,
            tick_ns: 0,
            fib_gen: 0,
            _reserved: 0,
        }
    }
}

/// Traffic of one frontend, both directions (per CPU in the kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub _reserved: u64,
}
const _: () = assert!(core::mem::size_of::<FrontendStats>() == 32);

/// Global counters, indices into the per-CPU stats array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// New connections created (forwarded traffic is counted per frontend).
    NewFlows = 0,
    /// Not ours (no flow, no frontend, not TCP/IPv4): handed to the kernel untouched.
    PassNotOurs,
    /// Too short or malformed for its headers: handed to the kernel untouched.
    PassMalformed,
    /// IPv4 fragments: the ports are not in every fragment, so they are handed to the kernel.
    PassFragment,
    /// A non-SYN packet for a mapped frontend without a live flow: the kernel answers RST.
    PassNoFlow,
    /// SYN dropped because every probed SNAT port toward that backend was taken.
    DropSnatExhausted,
    /// SYN dropped because the backend's next hop has no resolved neighbour (MAC).
    DropFibNoNeigh,
    /// SYN dropped because the FIB has no usable route to the backend.
    DropFibFailed,
    /// SYN dropped because the route to the backend leaves through an interface kpf is not on.
    DropEgressNotAttached,
    /// Packet dropped because the conntrack table refused an insert.
    DropFlowTableFull,
    /// Packet dropped because the redirect to the egress interface failed.
    DropRedirectFailed,
    /// SYN dropped: it carried an 802.1Q tag but its backend is out another interface; kpf sends
    /// tagged frames only back out the interface (and VLAN) they came in on.
    DropVlanEgress,
    /// SYN dropped: its source is not in the frontend's allowlist. No state was created.
    DropNotAllowed,
    /// SYN dropped: every backend of the frontend is unhealthy and it is set to reject.
    DropNoHealthyBackend,
    /// SYN passed to the kernel (which answers RST): the frontend's only backend is draining.
    PassBackendDraining,
    /// ICMP errors about a forwarded connection, translated and sent to its other side.
    IcmpTranslated,
    /// New connections that took the SNAT port of a connection that had ended (closed, reset or
    /// expired) because every probed port was in use.
    SnatReclaimed,
}

pub const COUNTER_COUNT: u32 = 17;

impl Counter {
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::NewFlows,
        Counter::PassNotOurs,
        Counter::PassMalformed,
        Counter::PassFragment,
        Counter::PassNoFlow,
        Counter::DropSnatExhausted,
        Counter::DropFibNoNeigh,
        Counter::DropFibFailed,
        Counter::DropEgressNotAttached,
        Counter::DropFlowTableFull,
        Counter::DropRedirectFailed,
        Counter::DropVlanEgress,
        Counter::DropNotAllowed,
        Counter::DropNoHealthyBackend,
        Counter::PassBackendDraining,
        Counter::IcmpTranslated,
        Counter::SnatReclaimed,
    ];

    /// Stable snake_case name, used in `kpf status` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::NewFlows => "new_flows",
            Counter::PassNotOurs => "pass_not_ours",
            Counter::PassMalformed => "pass_malformed",
            Counter::PassFragment => "pass_fragment",
            Counter::PassNoFlow => "pass_no_flow",
            Counter::DropSnatExhausted => "drop_snat_exhausted",
            Counter::DropFibNoNeigh => "drop_fib_no_neigh",
            Counter::DropFibFailed => "drop_fib_failed",
            Counter::DropEgressNotAttached => "drop_egress_not_attached",
            Counter::DropFlowTableFull => "drop_flow_table_full",
            Counter::DropRedirectFailed => "drop_redirect_failed",
            Counter::DropVlanEgress => "drop_vlan_egress",
            Counter::DropNotAllowed => "drop_not_allowed",
            Counter::DropNoHealthyBackend => "drop_no_healthy_backend",
            Counter::PassBackendDraining => "pass_backend_draining",
            Counter::IcmpTranslated => "icmp_translated",
            Counter::SnatReclaimed => "snat_reclaimed",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), Copy, with every padding byte an explicit field, valid for any bits.
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for AllowKey {}
    unsafe impl aya::Pod for IfaceInfo {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for FrontendStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_from_wire_words_equals_the_key_from_fields() {
        // An IPv4 header's addresses (bytes 12..20) and a TCP header's ports (0..4), as the
        // program loads them: each word straight from memory.
        let ip_addrs = [10u8, 0, 0, 10, 192, 168, 7, 1];
        let tcp_ports = [0xc3u8, 0x50, 0x23, 0x85];
        let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        let key = FlowKey::tcp_from_wire([word(&ip_addrs[..4]), word(&ip_addrs[4..])], word(&tcp_ports));
        let fields = FlowKey::tcp(
            word(&ip_addrs[..4]),
            u16::from_ne_bytes([0xc3, 0x50]),
            word(&ip_addrs[4..]),
            u16::from_ne_bytes([0x23, 0x85]),
        );
        assert_eq!(key, fields);
        assert_eq!((u16::from_be(key.src_port), u16::from_be(key.dst_port)), (50000, 9093));
        assert_eq!((key.proto, key._pad), (IPPROTO_TCP, [0; 3]));
    }

    #[test]
    fn counter_table_is_complete_and_ordered() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{} out of place", c.name());
        }
    }

    #[test]
    fn a_backend_route_answers_only_its_own_lookup() {
        assert!(!BackendRoute::default().answers(0, 0, 0), "a never-filled entry answered");
        let r = BackendRoute {
            next_hop: NextHop { ifindex: 3, fib_gen: 7, ..Default::default() },
            src_addr: 1,
            dst_addr: 2,
            ingress: 5,
        };
        assert!(r.answers(2, 5, 7));
        assert!(!r.answers(9, 5, 7), "another backend reusing the id");
        assert!(!r.answers(2, 6, 7), "another ingress interface");
        assert!(!r.answers(2, 5, 8), "a newer routing generation");
    }
}
