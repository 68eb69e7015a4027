//! The pinned state that outlives the daemon: maps and XDP links on a bpffs directory.
//!
//! Layout under the pin directory (default `/sys/fs/bpf/kpf`):
//! - `maps/<MAP_NAME>`: every map, so a restarted daemon finds the same conntrack table;
//! - `links/if<ifindex>-<mode>`: the XDP link per interface, which keeps the program attached
//!   while no daemon runs, and through which a new daemon swaps in its program
//!   (`bpf_link_update`). Named by ifindex because bpffs forbids dots in names and interface
//!   names may have them (`eth0.100`);
//! - `layout-<layout>`: an empty directory whose name records the map layout these were created
//!   with (bpffs holds only BPF objects and directories). A daemon with another layout refuses
//!   to adopt them rather than misread them.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use kpf_common::{AllowKey, Backend, Config, Flow, FlowKey, Frontend, FrontendKey, FrontendStats, IfaceInfo};

use crate::error::{Error, Result};

pub const DEFAULT_DIR: &str = "/sys/fs/bpf/kpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Names the map layout; change it whenever a shared type changes shape or meaning (v5: flow
/// timestamps count jiffies, not CLOCK_MONOTONIC_COARSE).
pub fn layout() -> String {
    use core::mem::size_of;
    format!(
        "v5-{}-{}-{}-{}-{}-{}-{}-{}-{}-{}-{}-{}-{}-{}",
        size_of::<FlowKey>(),
        size_of::<Flow>(),
        size_of::<FrontendKey>(),
        size_of::<Frontend>(),
        size_of::<Config>(),
        size_of::<IfaceInfo>(),
        size_of::<FrontendStats>(),
        kpf_common::COUNTER_COUNT,
        size_of::<Backend>(),
        size_of::<AllowKey>(),
        kpf_common::MAX_BACKENDS,
        kpf_common::MAGLEV_SIZE,
        kpf_common::MAX_TABLES,
        kpf_common::MAX_LOCAL_ADDRS,
    )
}

#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

fn is_bpffs(path: &Path) -> Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Environment(format!("bad path {}", path.display())))?;
    // SAFETY: statfs writes into a zeroed struct through a valid pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io(format!("statfs {}", path.display()))(std::io::Error::last_os_error()));
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Environment(format!("bad path {}", path.display())))?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(Error::io(format!("mounting bpffs on {}", path.display()))(std::io::Error::last_os_error()));
    }
    log::info!("mounted bpffs on {}", path.display());
    Ok(())
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> PinDir {
        PinDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    pub fn link(&self, ifindex: u32, mode: &str) -> PathBuf {
        self.root.join("links").join(format!("if{ifindex}-{mode}"))
    }

    /// The layout recorded here, if a daemon pinned state.
    fn recorded_layout(&self) -> Result<Option<String>> {
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", self.root.display()))(e)),
        };
        Ok(rd.flatten().find_map(|e| e.file_name().to_str()?.strip_prefix("layout-").map(str::to_owned)))
    }

    /// Whether a previous daemon left state here.
    pub fn exists(&self) -> Result<bool> {
        Ok(self.recorded_layout()?.is_some())
    }

    /// Takes the directory's lock, which a daemon holds for as long as it runs (the kernel drops
    /// it when the process ends, however it ends): two daemons converging the same maps to
    /// different configs, or `kpf down` unpinning a daemon it cannot reach, would each break
    /// forwarding. `Ok(None)`: the directory does not exist.
    pub fn lock(&self) -> Result<Option<PinLock>> {
        let dir = match std::fs::File::open(&self.root) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("opening {}", self.root.display()))(e)),
        };
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Err(Error::Environment(format!(
                    "a kpf daemon is running on {} (it holds the directory's lock): stop it, reach it \
                     with its own --socket or --config, or give another daemon its own `pin_dir`",
                    self.root.display()
                )));
            }
            return Err(Error::io(format!("locking {}", self.root.display()))(e));
        }
        Ok(Some(PinLock(dir)))
    }

    /// Makes sure the directory is on a bpffs (mounting one on the directory if its filesystem
    /// is not), and that pinned state here, if any, has this build's layout.
    pub fn prepare(&self) -> Result<()> {
        if let Err(e) = std::fs::create_dir_all(&self.root) {
            // /sys/fs/bpf is where systemd mounts bpffs; on a host where nobody did, the
            // directory exists on sysfs and nothing can be created under it until it is mounted.
            let standard = Path::new("/sys/fs/bpf");
            if !(self.root.starts_with(standard) && standard.is_dir() && !is_bpffs(standard)?) {
                return Err(Error::io(format!("creating {}", self.root.display()))(e));
            }
            mount_bpffs(standard)?;
            std::fs::create_dir_all(&self.root).map_err(Error::io(format!("creating {}", self.root.display())))?;
        }
        if !is_bpffs(&self.root)? {
            mount_bpffs(&self.root)?;
        }
        for sub in ["maps", "links"] {
            let p = self.root.join(sub);
            std::fs::create_dir_all(&p).map_err(Error::io(format!("creating {}", p.display())))?;
        }
        let want = layout();
        match self.recorded_layout()? {
            Some(have) if have != want => Err(Error::Environment(format!(
                "{} holds state from an incompatible kpf (map layout {have}, this kpf has {want}); \
                 run `kpf down --pin-dir {}` first (it drops tracked connections)",
                self.root.display(),
                self.root.display()
            ))),
            _ => Ok(()),
        }
    }

    /// Records the layout, once the maps are pinned.
    pub fn record_layout(&self) -> Result<()> {
        let p = self.root.join(format!("layout-{}", layout()));
        std::fs::create_dir_all(&p).map_err(Error::io(format!("creating {}", p.display())))
    }

    /// Pinned XDP links as (ifindex, mode name).
    pub fn pinned_links(&self) -> Result<Vec<(u32, String)>> {
        let dir = self.root.join("links");
        let mut v = Vec::new();
        match std::fs::read_dir(&dir) {
            Ok(rd) => {
                for e in rd {
                    let e = e.map_err(Error::io(format!("reading {}", dir.display())))?;
                    let name = e.file_name().to_string_lossy().into_owned();
                    let parsed = name.strip_prefix("if").and_then(|r| r.split_once('-'));
                    if let Some((i, m)) = parsed
                        && let Ok(i) = i.parse()
                    {
                        v.push((i, m.to_owned()));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("reading {}", dir.display()))(e)),
        }
        v.sort();
        Ok(v)
    }

    /// Removes everything kpf pinned here: unpinning the links detaches the program.
    pub fn remove_all(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for sub in ["links", "maps"] {
            let dir = self.root.join(sub);
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    if sub == "links" {
                        detach_link(&e.path());
                    }
                    std::fs::remove_file(e.path()).map_err(Error::io(format!("removing {}", e.path().display())))?;
                    removed.push(e.path());
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
        if let Some(l) = self.recorded_layout()? {
            let _ = std::fs::remove_dir(self.root.join(format!("layout-{l}")));
        }
        Ok(removed)
    }
}

/// A pin directory's lock ([`PinDir::lock`]), held until dropped.
#[derive(Debug)]
pub struct PinLock(#[allow(dead_code)] std::fs::File);

/// Detaches the link pinned at `path` now, before its pin goes. Removing the pin only drops a
/// reference, and the kernel releases an unreferenced link later, from a work queue: until then
/// the interface keeps the program, and attaching another XDP program there fails (EBUSY). A
/// failure is logged; removing the pin still detaches the link, later.
pub fn detach_link(path: &Path) {
    if let Err(e) = try_detach_link(path) {
        log::warn!("detaching the link pinned at {} at once: {e}", path.display());
    }
}

fn try_detach_link(path: &Path) -> std::io::Result<()> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let bpf = |cmd: libc::c_long, attr: &mut [u64; 3]| {
        // SAFETY: attr is a zero-padded bpf_attr of the size passed; the pointer in it (a
        // NUL-terminated path) outlives the call.
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr) as u32) };
        if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r) }
    };
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let fd = bpf(BPF_OBJ_GET, &mut [c_path.as_ptr() as u64, 0, 0])?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    bpf(BPF_LINK_DETACH, &mut [fd.as_raw_fd() as u64, 0, 0])?;
    Ok(())
}
