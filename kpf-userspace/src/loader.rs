//! Loads kpf's programs (XDP, and tc for interfaces attached in tc mode), attaches them, and
//! reads and writes their maps.

use std::{
    ffi::CString,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd},
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, MapData, MapInfo, PerCpuArray, lpm_trie::{Key, LpmTrie}},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use kpf_common::{
    AllowKey, Backend, COUNTER_COUNT, Config as KernelConfig, Counter, Flow, FlowKey, Frontend, FrontendKey,
    FrontendStats, IfaceInfo, MAGLEV_SIZE, names,
};

use crate::{
    clock,
    config::Mode,
    error::{Error, Result},
    pin::PinDir,
};

const XDP_PASS: u32 = 2;

/// Every map, for pinning.
const MAP_NAMES: [&str; 13] = [
    names::FRONTENDS,
    names::LOCAL_ADDRS,
    names::HALF_OPEN,
    names::BACKENDS,
    names::MAGLEV,
    names::ALLOW,
    names::BACKEND_STATS,
    names::FLOWS,
    names::CONFIG,
    names::IFACES,
    names::DEVMAP,
    names::STATS,
    names::FRONTEND_STATS,
];

/// The compiled XDP program, built by build.rs.
pub static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kpf"));

/// How a program ended up attached to one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Native,
    Generic,
    /// tc ingress, through a tcx link (Linux ≥ 6.6).
    Tc,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
            AttachMode::Tc => "tc",
        }
    }

    /// How `kpf status` names it.
    pub fn describe(self) -> &'static str {
        match self {
            AttachMode::Native => "native XDP",
            AttachMode::Generic => "generic XDP",
            AttachMode::Tc => "tc ingress",
        }
    }

    fn parse(s: &str) -> Option<AttachMode> {
        match s {
            "native" => Some(AttachMode::Native),
            "generic" => Some(AttachMode::Generic),
            "tc" => Some(AttachMode::Tc),
            _ => None,
        }
    }

    /// The modes `mode` allows, in order of preference.
    fn candidates(mode: Mode) -> &'static [AttachMode] {
        match mode {
            Mode::Native => &[AttachMode::Native],
            Mode::Generic => &[AttachMode::Generic],
            Mode::Tc => &[AttachMode::Tc],
            // tc before generic XDP: it keeps GRO/GSO aggregates whole and costs no copy.
            Mode::Auto => &[AttachMode::Native, AttachMode::Tc],
        }
    }
}

/// What happened to an interface when the daemon started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attached {
    /// Newly attached.
    Fresh(AttachMode),
    /// A pinned link was found and this program swapped into it: no packet saw a gap.
    Adopted(AttachMode),
    /// The wanted XDP mode could not attach (the error); the XDP mode the interface had before
    /// was attached again.
    KeptOld(AttachMode, String),
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Attachment {
    pub iface: String,
    pub ifindex: u32,
    pub mode: AttachMode,
}

/// The loaded program and its maps. Dropping it detaches the program.
pub struct Dataplane {
    ebpf: Ebpf,
    attachments: Vec<Attachment>,
    /// The kernel's tick, which the program's clock counts in.
    tick_ns: u32,
}

pub fn ifindex(iface: &str) -> Result<u32> {
    let c = CString::new(iface).map_err(|_| Error::NoSuchInterface(iface.to_owned()))?;
    // SAFETY: c is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(Error::NoSuchInterface(iface.to_owned())),
        i => Ok(i),
    }
}

fn iface_mtu(iface: &str) -> Result<u32> {
    let path = format!("/sys/class/net/{iface}/mtu");
    let text = std::fs::read_to_string(&path).map_err(Error::io(format!("reading {path}")))?;
    text.trim()
        .parse()
        .map_err(|e| Error::Environment(format!("{path} holds {:?}: {e}", text.trim())))
}

/// Whether generic receive offload is on for `iface` (ETHTOOL_GGRO).
pub fn gro_enabled(iface: &str) -> Result<bool> {
    const ETHTOOL_GGRO: u32 = 0x2b;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let err = |e: std::io::Error| Error::Environment(format!("reading {iface}'s GRO setting: {e}"));
    let name = iface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return Err(Error::Environment(format!("interface name {iface:?} is too long")));
    }
    let mut value = EthtoolValue { cmd: ETHTOOL_GGRO, data: 0 };
    // SAFETY: a zeroed ifreq is valid; the name fits with its terminating zero (checked above).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &b) in req.ifr_name.iter_mut().zip(name) {
        *dst = b as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: plain socket call; the descriptor is owned (and closed) at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCETHTOOL with an ifreq pointing at a live ethtool_value, for the call only.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) } < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(value.data != 0)
}

impl Dataplane {
    /// Loads the program with room for `max_flows` connections (two conntrack entries each).
    pub fn load(max_flows: u32) -> Result<Self> {
        let ebpf = EbpfLoader::new()
            .map_max_entries(names::FLOWS, max_flows.saturating_mul(2))
            .map_max_entries(names::HALF_OPEN, half_open_entries(max_flows))
            .load(PROGRAM)?;
        Dataplane::new(ebpf)
    }

    /// Loads the forwarding program and the clock program of a loaded object.
    fn new(ebpf: Ebpf) -> Result<Self> {
        let mut dp = Dataplane { ebpf, attachments: Vec::new(), tick_ns: clock::tick_ns()? };
        dp.program_mut()?.load()?;
        dp.clock_program_mut()?.load()?;
        Ok(dp)
    }

    fn clock_program_mut(&mut self) -> Result<&mut Xdp> {
        Ok(self.object_program_mut(names::CLOCK_PROGRAM)?.try_into()?)
    }

    /// A program of the object by name (all are built in, so a missing one is a broken build).
    fn object_program(&self, name: &str) -> Result<&aya::programs::Program> {
        self.ebpf.program(name).ok_or_else(|| missing_program(name))
    }

    fn object_program_mut(&mut self, name: &str) -> Result<&mut aya::programs::Program> {
        self.ebpf.program_mut(name).ok_or_else(|| missing_program(name))
    }

    /// Now, in the clock the program stamps flows with (`Flow::last_seen_ns`, `created_ns`):
    /// read by running the program's own clock code. Needs the kernel config set.
    pub fn now_ns(&self) -> Result<u64> {
        let p: &Xdp = self.object_program(names::CLOCK_PROGRAM)?.try_into()?;
        // The shortest frame a test run takes; the program writes the time over its start.
        let frame = [0u8; 14];
        let mut out = [0u8; 14];
        let r = p.test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..TestRunOptions::default()
        })?;
        if r.return_value != XDP_PASS {
            return Err(Error::Environment(format!(
                "the clock program returned {} (no kernel config yet?)",
                r.return_value
            )));
        }
        Ok(u64::from_ne_bytes(out[..8].try_into().expect("8 bytes")))
    }

    /// The native XDP program (loaded with the object).
    pub fn program_mut(&mut self) -> Result<&mut Xdp> {
        Ok(self.object_program_mut(names::PROGRAM)?.try_into()?)
    }

    /// The XDP program for mode `m`: native, or generic, which reads checksums the way socket
    /// buffers carry them and is loaded into the kernel on first use.
    pub fn xdp_program_mut(&mut self, m: AttachMode) -> Result<&mut Xdp> {
        if m != AttachMode::Generic {
            return self.program_mut();
        }
        let p: &mut Xdp = self.object_program_mut(names::GENERIC_PROGRAM)?.try_into()?;
        if p.fd().is_err() {
            p.load()?;
        }
        Ok(p)
    }

    /// The tc program, loaded into the kernel on first use (most gateways never need it).
    pub fn tc_program_mut(&mut self) -> Result<&mut SchedClassifier> {
        let p: &mut SchedClassifier = self.object_program_mut(names::TC_PROGRAM)?.try_into()?;
        if p.fd().is_err() {
            p.load()?;
        }
        Ok(p)
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Loads the program with every map pinned under `pins` (reusing maps a previous daemon
    /// pinned there: the same conntrack table, frontends and counters).
    pub fn load_pinned(max_flows: u32, pins: &PinDir) -> Result<Self> {
        let want = max_flows.saturating_mul(2);
        if let Ok(info) = MapInfo::from_pin(pins.map(names::FLOWS))
            && info.max_entries() != want
        {
            return Err(Error::Environment(format!(
                "the pinned flow table in {} holds {} connections but max_flows is {max_flows}; \
                 restore max_flows = {} or run `kpf down` first (it drops tracked connections)",
                pins.root().display(),
                info.max_entries() / 2,
                info.max_entries() / 2,
            )));
        }
        for table in [names::FLOWS, names::HALF_OPEN] {
            if let Ok(info) = MapInfo::from_pin(pins.map(table))
                && info.map_flags() & BPF_F_NO_COMMON_LRU != 0
            {
                log::warn!(
                    "the pinned {table} in {} has per-CPU LRU lists (made by an older kpf): each CPU may fill only \
                     its own share of it, so connections may be evicted before max_flows; it is kept (with every \
                     connection), and `kpf down` then `kpf run` at a quiet moment recreates it",
                    pins.root().display()
                );
            }
        }
        let paths: Vec<(&'static str, std::path::PathBuf)> = MAP_NAMES.iter().map(|n| (*n, pins.map(n))).collect();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::FLOWS, want);
        loader.map_max_entries(names::HALF_OPEN, half_open_entries(max_flows));
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let ebpf = loader.load(PROGRAM)?;
        pins.record_layout()?;
        Dataplane::new(ebpf)
    }

    /// Attaches to `iface` (`Auto`: native where the driver can, else tc), registering it
    /// as a redirect target before the program sees its packets.
    fn attach_new(&mut self, iface: &str, mode: Mode) -> Result<(AttachMode, FdLink)> {
        let ifindex = ifindex(iface)?;
        self.register_iface(ifindex, iface_mtu(iface)?)?;
        let tries = AttachMode::candidates(mode);
        let mut last = None;
        for &m in tries {
            let attached = match m {
                AttachMode::Tc => self.attach_tc(iface),
                xdp => self.attach_xdp(iface, ifindex, xdp),
            };
            match attached {
                Ok(link) => {
                    self.attachments.push(Attachment { iface: iface.to_owned(), ifindex, mode: m });
                    return Ok((m, link));
                }
                Err(e) => {
                    if tries.len() > 1 {
                        log::warn!("{iface}: {} unavailable ({e}); trying the next mode", m.describe());
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one mode was tried"))
    }

    /// An XDP link on `ifindex` in mode `m` (native or generic), taken from aya (so that it
    /// outlives this process once pinned).
    fn attach_xdp(&mut self, iface: &str, ifindex: u32, m: AttachMode) -> Result<FdLink> {
        let mode = if m == AttachMode::Native { XdpMode::Driver } else { XdpMode::Skb };
        let attach_err = |source| Error::Attach { iface: iface.to_owned(), mode: m.as_str(), source };
        let p = self.xdp_program_mut(m)?;
        let id = p.attach_to_if_index(ifindex, mode).map_err(attach_err)?;
        FdLink::try_from(p.take_link(id).map_err(attach_err)?).map_err(|e| {
            Error::Environment(format!("{iface}: the kernel attached XDP without a BPF link ({e}); kpf needs Linux ≥ 5.9"))
        })
    }

    /// A tcx ingress link on `iface`, first in line.
    fn attach_tc(&mut self, iface: &str) -> Result<FdLink> {
        let attach_err = |source| Error::Attach { iface: iface.to_owned(), mode: AttachMode::Tc.as_str(), source };
        let p = self.tc_program_mut()?;
        let id = p
            .attach_with_options(iface, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::first()))
            .map_err(attach_err)?;
        FdLink::try_from(p.take_link(id).map_err(attach_err)?).map_err(|e| {
            Error::Environment(format!("{iface}: the kernel attached tc without a tcx link ({e}); tc mode needs Linux ≥ 6.6"))
        })
    }

    /// Attaches to `iface` through a link pinned under `pins`, which keeps the program attached
    /// after this process exits. If a previous daemon pinned a link there in a mode `mode`
    /// allows, this program replaces the old one inside that link atomically.
    pub fn attach_pinned(&mut self, iface: &str, mode: Mode, pins: &PinDir) -> Result<Attached> {
        let ifindex = ifindex(iface)?;
        let mut existing = pinned_link_modes(pins, ifindex)?;
        let wanted = AttachMode::candidates(mode);
        if let Some(&m) = wanted.iter().find(|m| existing.contains(m)) {
            self.register_iface(ifindex, iface_mtu(iface)?)?;
            let path = pins.link(ifindex, m.as_str());
            let pinned = PinnedLink::from_pin(&path)
                .map_err(|e| Error::Environment(format!("opening pinned link {}: {e}", path.display())))?;
            if m == AttachMode::Tc {
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                    .map_err(|e| Error::Environment(format!("pinned link {} is not a tcx link: {e}", path.display())))?;
                self.tc_program_mut()?.attach_to_link(link)?;
            } else {
                let link = XdpLink::try_from(FdLink::from(pinned))
                    .map_err(|e| Error::Environment(format!("pinned link {} is not an XDP link: {e}", path.display())))?;
                self.xdp_program_mut(m)?.attach_to_link(link)?;
            }
            self.attachments.push(Attachment { iface: iface.to_owned(), ifindex, mode: m });
            // A switch between XDP and tc interrupted after its first half left a second link.
            for other in existing.into_iter().filter(|o| *o != m) {
                unpin_link_mode(pins, ifindex, other)?;
            }
            return Ok(Attached::Adopted(m));
        }
        let has_xdp = |modes: &[AttachMode]| modes.iter().any(|m| *m != AttachMode::Tc);
        if has_xdp(&existing) && wanted.contains(&AttachMode::Tc) {
            match self.attach_new(iface, Mode::Tc) {
                Ok((_, tc)) => return self.switch_through_tc(iface, ifindex, mode, existing, tc, pins),
                Err(e) => log::warn!("{iface}: {} unavailable ({e}); switching XDP mode directly", AttachMode::Tc.describe()),
            }
        }
        let mut replaced = None;
        if has_xdp(&existing) && has_xdp(wanted) {
            // One XDP program per interface: the old one must go first, and for that moment
            // packets reach the kernel (new connections are refused, established ones reset).
            log::warn!("{iface}: switching XDP mode to {mode:?}: forwarding stops for a moment");
            for old in existing.drain(..) {
                unpin_link_mode(pins, ifindex, old)?;
                replaced = replaced.or((old != AttachMode::Tc).then_some(old));
            }
        }
        let (m, fd_link) = match (self.attach_new(iface, mode), replaced) {
            (Ok(attached), _) => attached,
            // Going on in the old mode rather than stopping: a supervisor restarting kpf would
            // repeat the switch, and its gap in forwarding, every time.
            (Err(e), Some(old)) => {
                self.reattach_xdp(iface, ifindex, old, pins).map_err(|r| {
                    Error::Environment(format!("{e}; attaching in {} mode again failed too: {r}", old.as_str()))
                })?;
                self.attachments.push(Attachment { iface: iface.to_owned(), ifindex, mode: old });
                return Ok(Attached::KeptOld(old, e.to_string()));
            }
            (Err(e), None) => return Err(e),
        };
        pin_link(fd_link, &pins.link(ifindex, m.as_str()))?;
        // Between XDP and tc there is no gap: both share the maps, and while both are attached
        // XDP, which runs first, handles every packet; removing the old link hands over. (`m` is
        // not among `existing`: that case was adopted above.)
        for old in existing {
            log::info!("{iface}: switched from {} to {} without a gap", old.describe(), m.describe());
            unpin_link_mode(pins, ifindex, old)?;
        }
        Ok(Attached::Fresh(m))
    }

    /// From an XDP mode `mode` does not allow (generic, under `auto`) to `mode`'s, without a
    /// moment unforwarded: `tc`, just attached, runs beside the old XDP link (XDP, first in line,
    /// goes on handling every packet); then the old link goes, then native XDP is attached if
    /// `mode` prefers it and the driver takes it (it runs before tc from its first packet), and
    /// tc goes.
    fn switch_through_tc(
        &mut self,
        iface: &str,
        ifindex: u32,
        mode: Mode,
        existing: Vec<AttachMode>,
        tc: FdLink,
        pins: &PinDir,
    ) -> Result<Attached> {
        pin_link(tc, &pins.link(ifindex, AttachMode::Tc.as_str()))?;
        let from = existing.iter().find(|m| **m != AttachMode::Tc).copied().unwrap_or(AttachMode::Generic);
        for old in existing {
            unpin_link_mode(pins, ifindex, old)?;
        }
        if AttachMode::candidates(mode).contains(&AttachMode::Native) {
            match self.attach_xdp(iface, ifindex, AttachMode::Native) {
                Ok(link) => {
                    pin_link(link, &pins.link(ifindex, AttachMode::Native.as_str()))?;
                    unpin_link_mode(pins, ifindex, AttachMode::Tc)?;
                    if let Some(a) = self.attachments.iter_mut().find(|a| a.ifindex == ifindex) {
                        a.mode = AttachMode::Native;
                    }
                    log::info!(
                        "{iface}: switched from {} to {} without a gap (through tc ingress)",
                        from.describe(),
                        AttachMode::Native.describe()
                    );
                    return Ok(Attached::Fresh(AttachMode::Native));
                }
                Err(e) => log::warn!("{iface}: {} unavailable ({e}); staying in tc", AttachMode::Native.describe()),
            }
        }
        log::info!("{iface}: switched from {} to {} without a gap", from.describe(), AttachMode::Tc.describe());
        Ok(Attached::Fresh(AttachMode::Tc))
    }

    /// Puts back (and pins) the XDP link in mode `m` that a failed switch to another XDP mode
    /// removed, so that the interface goes on forwarding as before.
    fn reattach_xdp(&mut self, iface: &str, ifindex: u32, m: AttachMode, pins: &PinDir) -> Result<()> {
        let link = self.attach_xdp(iface, ifindex, m)?;
        pin_link(link, &pins.link(ifindex, m.as_str()))
    }

    /// Makes `ifindex` a redirect target and records its MTU.
    pub fn register_iface(&mut self, ifindex: u32, mtu: u32) -> Result<()> {
        let mut devmap: DevMapHash<&mut MapData> = self.map_mut(names::DEVMAP)?;
        devmap.insert(ifindex, ifindex, None, 0).map_err(|e| Error::Environment(format!("devmap insert: {e}")))?;
        let mut ifaces: HashMap<&mut MapData, u32, IfaceInfo> = self.map_mut(names::IFACES)?;
        ifaces.insert(ifindex, IfaceInfo { mtu }, 0).map_err(Error::map(names::IFACES))
    }

    /// Removes every interface but `keep` from the redirect targets and MTUs: ones a previous
    /// daemon attached to and this one no longer does (their links are unpinned). Returns their
    /// ifindexes.
    pub fn retain_ifaces(&mut self, keep: &std::collections::HashSet<u32>) -> Result<Vec<u32>> {
        let ifaces: HashMap<&MapData, u32, IfaceInfo> = self.map(names::IFACES)?;
        let devmap: DevMapHash<&MapData> = self.map(names::DEVMAP)?;
        let gone: Vec<u32> = ifaces
            .keys()
            .chain(devmap.keys())
            .filter_map(|k| k.ok())
            .filter(|i| !keep.contains(i))
            .collect::<std::collections::BTreeSet<u32>>()
            .into_iter()
            .collect();
        for &ifindex in &gone {
            let mut devmap: DevMapHash<&mut MapData> = self.map_mut(names::DEVMAP)?;
            let _ = devmap.remove(ifindex);
            let mut ifaces: HashMap<&mut MapData, u32, IfaceInfo> = self.map_mut(names::IFACES)?;
            let _ = ifaces.remove(&ifindex);
        }
        Ok(gone)
    }

    fn map<'a, T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>>(&'a self, name: &'static str) -> Result<T> {
        let m = self.ebpf.map(name).ok_or_else(|| Error::Environment(format!("map {name} missing")))?;
        T::try_from(m).map_err(Error::map(name))
    }

    fn map_mut<'a, T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>>(
        &'a mut self,
        name: &'static str,
    ) -> Result<T> {
        let m = self.ebpf.map_mut(name).ok_or_else(|| Error::Environment(format!("map {name} missing")))?;
        T::try_from(m).map_err(Error::map(name))
    }

    pub fn kernel_config(&self) -> Result<KernelConfig> {
        let a: Array<&MapData, KernelConfig> = self.map(names::CONFIG)?;
        a.get(&0, 0).map_err(Error::map(names::CONFIG))
    }

    /// Sets the program's config; its `tick_ns` is always this machine's.
    pub fn set_kernel_config(&mut self, c: &KernelConfig) -> Result<()> {
        let c = KernelConfig { tick_ns: self.tick_ns, ..*c };
        let mut a: Array<&mut MapData, KernelConfig> = self.map_mut(names::CONFIG)?;
        a.set(0, c, 0).map_err(Error::map(names::CONFIG))
    }

    pub fn set_frontend(&mut self, key: FrontendKey, fe: Frontend) -> Result<()> {
        let mut m: HashMap<&mut MapData, FrontendKey, Frontend> = self.map_mut(names::FRONTENDS)?;
        m.insert(key, fe, 0).map_err(Error::map(names::FRONTENDS))
    }

    pub fn remove_frontend(&mut self, key: FrontendKey) -> Result<()> {
        let mut m: HashMap<&mut MapData, FrontendKey, Frontend> = self.map_mut(names::FRONTENDS)?;
        m.remove(&key).map_err(Error::map(names::FRONTENDS))
    }

    pub fn frontends(&self) -> Result<Vec<(FrontendKey, Frontend)>> {
        let m: HashMap<&MapData, FrontendKey, Frontend> = self.map(names::FRONTENDS)?;
        m.iter().collect::<Result<_, _>>().map_err(Error::map(names::FRONTENDS))
    }

    /// The local addresses wildcard frontends answer on.
    pub fn local_addrs(&self) -> Result<std::collections::BTreeSet<Ipv4Addr>> {
        let m: HashMap<&MapData, u32, u8> = self.map(names::LOCAL_ADDRS)?;
        m.keys()
            .map(|k| k.map(kpf_common::wire::to_addr).map_err(Error::map(names::LOCAL_ADDRS)))
            .collect()
    }

    /// Makes the local-address map hold exactly `addrs` (new ones first, so none is missing
    /// for a moment).
    pub fn set_local_addrs(&mut self, addrs: &std::collections::BTreeSet<Ipv4Addr>) -> Result<()> {
        let have = self.local_addrs()?;
        let mut m: HashMap<&mut MapData, u32, u8> = self.map_mut(names::LOCAL_ADDRS)?;
        for a in addrs.difference(&have) {
            m.insert(kpf_common::wire::addr(*a), 1, 0).map_err(Error::map(names::LOCAL_ADDRS))?;
        }
        for a in have.difference(addrs) {
            match m.remove(&kpf_common::wire::addr(*a)) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(Error::map(names::LOCAL_ADDRS)(e)),
            }
        }
        Ok(())
    }

    /// One global counter summed over CPUs.
    pub fn counter(&self, c: Counter) -> Result<u64> {
        let a: PerCpuArray<&MapData, u64> = self.map(names::STATS)?;
        Ok(a.get(&(c as u32), 0).map_err(Error::map(names::STATS))?.iter().sum())
    }

    /// The conntrack entry for `key`, established or half-open.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<Flow>> {
        for table in [names::FLOWS, names::HALF_OPEN] {
            let m: HashMap<&MapData, FlowKey, Flow> = self.map(table)?;
            match m.get(key, 0) {
                Ok(f) => return Ok(Some(f)),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(Error::map(table)(e)),
            }
        }
        Ok(None)
    }

    /// Global counters summed over CPUs, in `Counter::ALL` order.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        let a: PerCpuArray<&MapData, u64> = self.map(names::STATS)?;
        let mut out = Vec::with_capacity(COUNTER_COUNT as usize);
        for c in Counter::ALL {
            let v = a.get(&(c as u32), 0).map_err(Error::map(names::STATS))?;
            out.push((c, v.iter().sum()));
        }
        Ok(out)
    }

    pub fn frontend_stats(&self, id: u32) -> Result<FrontendStats> {
        self.traffic(names::FRONTEND_STATS, id)
    }

    pub fn backend_stats(&self, id: u32) -> Result<FrontendStats> {
        self.traffic(names::BACKEND_STATS, id)
    }

    fn traffic(&self, map: &'static str, id: u32) -> Result<FrontendStats> {
        let a: PerCpuArray<&MapData, FrontendStats> = self.map(map)?;
        let per_cpu = a.get(&id, 0).map_err(Error::map(map))?;
        Ok(per_cpu.iter().fold(FrontendStats::default(), |mut acc, s| {
            acc.packets += s.packets;
            acc.bytes += s.bytes;
            acc.new_flows += s.new_flows;
            acc
        }))
    }

    /// Zeroes a frontend id's counters, so a reused id starts from nothing.
    pub fn reset_frontend_stats(&mut self, id: u32) -> Result<()> {
        self.reset_traffic(names::FRONTEND_STATS, id)
    }

    pub fn reset_backend_stats(&mut self, id: u32) -> Result<()> {
        self.reset_traffic(names::BACKEND_STATS, id)
    }

    fn reset_traffic(&mut self, map: &'static str, id: u32) -> Result<()> {
        let mut a: PerCpuArray<&mut MapData, FrontendStats> = self.map_mut(map)?;
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| Error::io(what)(e))?;
        let zero = aya::maps::PerCpuValues::try_from(vec![FrontendStats::default(); cpus])
            .map_err(Error::io("per-CPU values"))?;
        a.set(id, zero, 0).map_err(Error::map(map))
    }

    pub fn set_backend(&mut self, id: u32, b: Backend) -> Result<()> {
        let mut a: Array<&mut MapData, Backend> = self.map_mut(names::BACKENDS)?;
        a.set(id, b, 0).map_err(Error::map(names::BACKENDS))
    }

    /// The backends slots in use, by id.
    pub fn backends(&self) -> Result<Vec<(u32, Backend)>> {
        let a: Array<&MapData, Backend> = self.map(names::BACKENDS)?;
        let mut out = Vec::new();
        for (id, b) in a.iter().enumerate() {
            let b = b.map_err(Error::map(names::BACKENDS))?;
            if b.flags & Backend::PRESENT != 0 {
                out.push((id as u32, b));
            }
        }
        Ok(out)
    }

    /// Writes a whole Maglev table (`MAGLEV_SIZE` backend ids).
    pub fn write_table(&mut self, table: u32, ids: &[u32]) -> Result<()> {
        debug_assert_eq!(ids.len(), MAGLEV_SIZE as usize);
        let mut a: Array<&mut MapData, u32> = self.map_mut(names::MAGLEV)?;
        for (slot, id) in ids.iter().enumerate() {
            a.set(kpf_common::select::table_index(table, slot as u32), id, 0).map_err(Error::map(names::MAGLEV))?;
        }
        Ok(())
    }

    /// Allowlist entries as (frontend id, network address in host order, prefix bits).
    pub fn allow_entries(&self) -> Result<Vec<(u32, std::net::Ipv4Addr, u8)>> {
        let t: LpmTrie<&MapData, AllowKey, u8> = self.map(names::ALLOW)?;
        let mut out = Vec::new();
        for k in t.keys() {
            let k = k.map_err(Error::map(names::ALLOW))?;
            let d = k.data();
            out.push((u32::from_be_bytes(d.frontend), std::net::Ipv4Addr::from(d.addr), (k.prefix_len() - 32) as u8));
        }
        Ok(out)
    }

    pub fn allow_insert(&mut self, frontend_id: u32, net: std::net::Ipv4Addr, bits: u8) -> Result<()> {
        let mut t: LpmTrie<&mut MapData, AllowKey, u8> = self.map_mut(names::ALLOW)?;
        let key = Key::new(AllowKey::prefix_len(bits as u32), AllowKey::new(frontend_id, kpf_common::wire::addr(net)));
        t.insert(&key, 1, 0).map_err(Error::map(names::ALLOW))
    }

    pub fn allow_remove(&mut self, frontend_id: u32, net: std::net::Ipv4Addr, bits: u8) -> Result<()> {
        let mut t: LpmTrie<&mut MapData, AllowKey, u8> = self.map_mut(names::ALLOW)?;
        let key = Key::new(AllowKey::prefix_len(bits as u32), AllowKey::new(frontend_id, kpf_common::wire::addr(net)));
        match t.remove(&key) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(Error::map(names::ALLOW)(e)),
        }
    }

    /// Every conntrack entry (both directions of each connection).
    /// Every conntrack entry (both directions of each connection), established and half-open.
    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>> {
        let mut out = Vec::new();
        for table in [names::FLOWS, names::HALF_OPEN] {
            let m: HashMap<&MapData, FlowKey, Flow> = self.map(table)?;
            // Entries can vanish between the key walk and the lookup; skip those.
            for item in m.iter() {
                match item {
                    Ok(kv) => out.push(kv),
                    Err(aya::maps::MapError::KeyNotFound) => continue,
                    Err(e) => return Err(Error::map(table)(e)),
                }
            }
        }
        Ok(out)
    }

    /// Removes the entry under `key` from whichever table holds it if, read again now, it still
    /// satisfies `stale`: between a walk of the tables and a removal the dataplane may have
    /// refreshed it, or put a new connection's entry under the same key (a reopened 4-tuple, a
    /// SNAT port taken over). Returns whether an entry went.
    pub fn remove_flow_if(&mut self, key: &FlowKey, stale: impl Fn(&Flow) -> bool) -> Result<bool> {
        let mut removed = false;
        for table in [names::FLOWS, names::HALF_OPEN] {
            let mut m: HashMap<&mut MapData, FlowKey, Flow> = self.map_mut(table)?;
            let now = match m.get(key, 0) {
                Ok(f) => f,
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(Error::map(table)(e)),
            };
            if !stale(&now) {
                continue;
            }
            match m.remove(key) {
                Ok(()) => removed = true,
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(Error::map(table)(e)),
            }
        }
        Ok(removed)
    }

    /// Removes a conntrack entry from whichever table holds it.
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        self.remove_flow_if(key, |_| true).map(drop)
    }
}

fn missing_program(name: &str) -> Error {
    Error::Environment(format!("program {name} is missing from the object"))
}

/// A delete of a key that is not there: aya reports it as ENOENT from the syscall.
fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// The LRU map flag older kpf versions created the conntrack tables with.
const BPF_F_NO_COMMON_LRU: u32 = 2;

/// Entries of the half-open table: room for a quarter of `max_flows` handshakes at once, which a
/// SYN flood fills (evicting only its own entries) while established connections stay put.
pub fn half_open_entries(max_flows: u32) -> u32 {
    (max_flows / 4).max(1024).saturating_mul(2)
}

/// The modes of every link pinned for interface `ifindex` (two only while switching between XDP
/// and tc, or after a crash in the middle of that).
pub fn pinned_link_modes(pins: &PinDir, ifindex: u32) -> Result<Vec<AttachMode>> {
    Ok(pins.pinned_links()?.iter().filter(|(i, _)| *i == ifindex).filter_map(|(_, m)| AttachMode::parse(m)).collect())
}

/// Unpins interface `ifindex`'s links: once no process holds them, the program is detached.
pub fn unpin_link(pins: &PinDir, ifindex: u32) -> Result<()> {
    for m in pinned_link_modes(pins, ifindex)? {
        unpin_link_mode(pins, ifindex, m)?;
    }
    Ok(())
}

fn pin_link(link: FdLink, path: &Path) -> Result<()> {
    link.pin(path).map_err(|e| Error::Environment(format!("pinning {}: {e}", path.display())))?;
    Ok(())
}

fn unpin_link_mode(pins: &PinDir, ifindex: u32, mode: AttachMode) -> Result<()> {
    let path = pins.link(ifindex, mode.as_str());
    crate::pin::detach_link(&path);
    std::fs::remove_file(&path).map_err(Error::io(format!("removing {}", path.display())))
}

/// `10.0.0.1:9093` from wire-order parts.
pub fn endpoint(addr: u32, port: u16) -> std::net::SocketAddrV4 {
    std::net::SocketAddrV4::new(kpf_common::wire::to_addr(addr), kpf_common::wire::to_port(port))
}

/// The wire-order key of a frontend.
pub fn frontend_key(address: Option<Ipv4Addr>, port: u16) -> FrontendKey {
    FrontendKey::tcp(address.map_or(0, kpf_common::wire::addr), kpf_common::wire::port(port))
}
