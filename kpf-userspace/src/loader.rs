//! Loads the XDP program, attaches it, and reads and writes its maps.

use std::{ffi::CString, net::Ipv4Addr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use kpf_common::{
    COUNTER_COUNT, Config as KernelConfig, Counter, Flow, FlowKey, Frontend, FrontendKey, FrontendStats, IfaceInfo,
    names,
};

use crate::{
    config::Mode,
    error::{Error, Result},
};

/// The compiled XDP program, built by build.rs.
pub static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kpf"));

/// How a program ended up attached to one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Native,
    Generic,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        }
    }
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

impl Dataplane {
    /// Loads the program with room for `max_flows` connections (two conntrack entries each).
    pub fn load(max_flows: u32) -> Result<Self> {
        let ebpf = EbpfLoader::new()
            .map_max_entries(names::FLOWS, max_flows.saturating_mul(2))
            .load(PROGRAM)?;
        let mut dp = Dataplane { ebpf, attachments: Vec::new() };
        dp.program_mut()?.load()?;
        Ok(dp)
    }

    pub fn program_mut(&mut self) -> Result<&mut Xdp> {
        let p = self
            .ebpf
            .program_mut(names::PROGRAM)
            .ok_or_else(|| Error::Environment("the XDP program is missing from the object".into()))?;
        Ok(p.try_into()?)
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Attaches to `iface`. `Auto` tries native (driver) mode first and falls back to generic.
    /// The interface is registered as a redirect target before the program sees its packets.
    pub fn attach(&mut self, iface: &str, mode: Mode) -> Result<AttachMode> {
        let ifindex = ifindex(iface)?;
        let mtu = iface_mtu(iface)?;
        self.register_iface(ifindex, mtu)?;
        let tries: &[AttachMode] = match mode {
            Mode::Native => &[AttachMode::Native],
            Mode::Generic => &[AttachMode::Generic],
            Mode::Auto => &[AttachMode::Native, AttachMode::Generic],
        };
        let mut last = None;
        for &m in tries {
            let xdp_mode = match m {
                AttachMode::Native => XdpMode::Driver,
                AttachMode::Generic => XdpMode::Skb,
            };
            match self.program_mut()?.attach_to_if_index(ifindex, xdp_mode) {
                Ok(_) => {
                    self.attachments.push(Attachment { iface: iface.to_owned(), ifindex, mode: m });
                    return Ok(m);
                }
                Err(source) => {
                    if tries.len() > 1 {
                        log::warn!("{iface}: {} XDP unavailable ({source}); trying the next mode", m.as_str());
                    }
                    last = Some(Error::Attach { iface: iface.to_owned(), mode: m.as_str(), source });
                }
            }
        }
        Err(last.expect("at least one mode was tried"))
    }

    /// Makes `ifindex` a redirect target and records its MTU.
    pub fn register_iface(&mut self, ifindex: u32, mtu: u32) -> Result<()> {
        let mut devmap: DevMapHash<&mut MapData> = self.map_mut(names::DEVMAP)?;
        devmap.insert(ifindex, ifindex, None, 0).map_err(|e| Error::Environment(format!("devmap insert: {e}")))?;
        let mut ifaces: HashMap<&mut MapData, u32, IfaceInfo> = self.map_mut(names::IFACES)?;
        ifaces.insert(ifindex, IfaceInfo { mtu }, 0).map_err(Error::map(names::IFACES))
    }

    pub fn min_mtu(&self) -> Result<u32> {
        let ifaces: HashMap<&MapData, u32, IfaceInfo> = self.map(names::IFACES)?;
        let mut min = u32::MAX;
        for item in ifaces.iter() {
            let (_, info) = item.map_err(Error::map(names::IFACES))?;
            min = min.min(info.mtu);
        }
        Ok(if min == u32::MAX { 1500 } else { min })
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

    pub fn set_kernel_config(&mut self, c: &KernelConfig) -> Result<()> {
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
        let a: PerCpuArray<&MapData, FrontendStats> = self.map(names::FRONTEND_STATS)?;
        let per_cpu = a.get(&id, 0).map_err(Error::map(names::FRONTEND_STATS))?;
        Ok(per_cpu.iter().fold(FrontendStats::default(), |mut acc, s| {
            acc.packets += s.packets;
            acc.bytes += s.bytes;
            acc.new_flows += s.new_flows;
            acc
        }))
    }

    /// Zeroes a frontend id's counters, so a reused id starts from nothing.
    pub fn reset_frontend_stats(&mut self, id: u32) -> Result<()> {
        let mut a: PerCpuArray<&mut MapData, FrontendStats> = self.map_mut(names::FRONTEND_STATS)?;
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| Error::io(what)(e))?;
        let zero = aya::maps::PerCpuValues::try_from(vec![FrontendStats::default(); cpus])
            .map_err(Error::io("per-CPU values"))?;
        a.set(id, zero, 0).map_err(Error::map(names::FRONTEND_STATS))
    }

    /// Every conntrack entry (both directions of each connection).
    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>> {
        let m: HashMap<&MapData, FlowKey, Flow> = self.map(names::FLOWS)?;
        // Entries can vanish between the key walk and the lookup; skip those.
        let mut out = Vec::new();
        for item in m.iter() {
            match item {
                Ok(kv) => out.push(kv),
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(Error::map(names::FLOWS)(e)),
            }
        }
        Ok(out)
    }

    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        let mut m: HashMap<&mut MapData, FlowKey, Flow> = self.map_mut(names::FLOWS)?;
        match m.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(Error::map(names::FLOWS)(e)),
        }
    }
}

/// `10.0.0.1:9093` from wire-order parts.
pub fn endpoint(addr: u32, port: u16) -> std::net::SocketAddrV4 {
    std::net::SocketAddrV4::new(kpf_common::wire::to_addr(addr), kpf_common::wire::to_port(port))
}

/// The wire-order key of a frontend.
pub fn frontend_key(address: Option<Ipv4Addr>, port: u16) -> FrontendKey {
    FrontendKey::tcp(address.map_or(0, kpf_common::wire::addr), kpf_common::wire::port(port))
}
