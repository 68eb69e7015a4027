//! The program's maps. Sizes here are defaults; the daemon sets the flow table size at load time.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use kpf_common::{
    AllowKey, Backend, BackendRoute, COUNTER_COUNT, Config, Flow, FlowKey, Frontend, FrontendKey, FrontendStats, IfaceInfo,
    MAGLEV_SIZE, MAX_ALLOW, MAX_BACKENDS, MAX_FRONTENDS, MAX_IFACES, MAX_TABLES,
};

/// Mapped frontends: (address or 0, port) -> backend.
#[map(name = "KPF_FRONTENDS")]
pub static FRONTENDS: HashMap<FrontendKey, Frontend> = HashMap::with_max_entries(MAX_FRONTENDS, 0);

/// Backends by id.
#[map(name = "KPF_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Maglev tables, flat: table t's slot s is at t * MAGLEV_SIZE + s; values are backend ids.
#[map(name = "KPF_MAGLEV")]
pub static MAGLEV: Array<u32> = Array::with_max_entries(MAX_TABLES * MAGLEV_SIZE, 0);

/// The gateway's local addresses (wire order; value unused), kept by the daemon: what a
/// wildcard frontend (`*:port`) answers on.
#[map(name = "KPF_LOCAL_ADDRS")]
pub static LOCAL_ADDRS: HashMap<u32, u8> = HashMap::with_max_entries(kpf_common::MAX_LOCAL_ADDRS, 0);

/// Source allowlists of every frontend that has one (value unused).
#[map(name = "KPF_ALLOW")]
pub static ALLOW: LpmTrie<AllowKey, u8> = LpmTrie::with_max_entries(MAX_ALLOW, BPF_F_NO_PREALLOC);

/// Conntrack: one entry per direction of each connection, keyed by the packet as it arrives.
/// Only connections whose client completed the handshake live here. One LRU list for all CPUs
/// (each CPU still keeps a small local free list): with BPF_F_NO_COMMON_LRU the kernel splits
/// the capacity into equal per-CPU shares and an insert can only evict within its own CPU's, so
/// a table filled from fewer CPUs than the machine may have (one RX queue, RSS on some CPUs,
/// veth, CPUs that could be hot-plugged) evicted live connections at a fraction of max_flows.
#[map(name = "KPF_FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(262_144, 0);

/// Connections still in their handshake. Kept apart so that a flood of SYNs (which never
/// complete) can only evict each other, never an established connection. One LRU list, as
/// [`FLOWS`].
#[map(name = "KPF_HALF_OPEN")]
pub static HALF_OPEN: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(65_536, 0);

#[map(name = "KPF_CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Attached interfaces by ifindex.
#[map(name = "KPF_IFACES")]
pub static IFACES: HashMap<u32, IfaceInfo> = HashMap::with_max_entries(MAX_IFACES, 0);

/// Redirect targets (the attached interfaces), by ifindex.
#[map(name = "KPF_DEVMAP")]
pub static DEVMAP: DevMapHash = DevMapHash::with_max_entries(MAX_IFACES, 0);

/// One entry per CPU where `open` assembles new conntrack entries: the BPF stack (512 bytes
/// for the whole call chain) has no room for them.
#[map(name = "KPF_SCRATCH")]
pub static SCRATCH: PerCpuArray<Flow> = PerCpuArray::with_max_entries(1, 0);

/// The last-resort SNAT port a SYN's probes found (see `conntrack::try_open`), per CPU: kept in a
/// map rather than in registers, where the verifier would follow every value it takes through
/// all 64 probes (and give up).
#[map(name = "KPF_SNAT_OLDEST")]
pub static SNAT_OLDEST: PerCpuArray<SnatOldest> = PerCpuArray::with_max_entries(1, 0);

/// See [`SNAT_OLDEST`]. `rank == 0`: none found yet.
pub struct SnatOldest {
    /// `tcp::last_resort_rank` of the port's connection: the lowest is taken.
    pub rank: u64,
    pub port: u16,
    pub in_flows: bool,
}

/// Each CPU's last route to each backend, by backend id: spares new connections (and flows
/// re-routed after a routing change) a FIB lookup each. Not pinned: a cache.
#[map(name = "KPF_ROUTES")]
pub static ROUTES: PerCpuArray<BackendRoute> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Per-CPU parameter block for bpf_fib_lookup, for the same reason.
#[map(name = "KPF_FIB_SCRATCH")]
pub static FIB_SCRATCH: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "KPF_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map(name = "KPF_FRONTEND_STATS")]
pub static FRONTEND_STATS: PerCpuArray<FrontendStats> = PerCpuArray::with_max_entries(MAX_FRONTENDS, 0);

#[map(name = "KPF_BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<FrontendStats> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
