//! A bpffs that outlives `kpf run`, for restart tests.
//!
//! `ip netns exec` gives kpf a private mount namespace (and remounts /sys there), so a bpffs kpf
//! mounts itself vanishes, with everything pinned in it, when kpf exits. A bpffs mounted by the
//! test process, in its own mount namespace, on a fresh directory under the temp dir, is instead
//! inherited by every `ip netns exec` started afterwards and survives kpf's restarts: pass its
//! path as kpf's `pin_dir`.
//!
//! The guard, when dropped (also on panic): runs `kpf down` if told how (so a daemon still
//! running detaches and exits, and pins are removed), unmounts (lazily if busy), and removes the
//! directory.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const PREFIX: &str = "kpf-bpffs";
static NEXT: AtomicU32 = AtomicU32::new(0);

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other(format!("bad path {}", p.display())))
}

/// Whether `path` is the root of (or inside) a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = cstr(path) else { return false };
    // SAFETY: statfs writes into a zeroed struct through a valid pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) }) == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

fn umount(path: &Path) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EBUSY) {
        return Err(e);
    }
    // SAFETY: as above.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    Err(io::Error::last_os_error())
}

/// How the guard brings kpf down before unmounting.
#[derive(Clone, Debug)]
struct Down {
    binary: PathBuf,
    config: PathBuf,
    socket: PathBuf,
}

/// A bpffs mounted on `<tmp>/kpf-bpffs-<pid>-<n>`; unmounted and removed on drop.
#[derive(Debug)]
pub struct BpfFs {
    dir: PathBuf,
    down: Option<Down>,
}

impl BpfFs {
    /// Creates the directory and mounts a fresh bpffs on it.
    pub fn new() -> io::Result<BpfFs> {
        let dir = std::env::temp_dir().join(format!(
            "{PREFIX}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        if is_bpffs(&dir) {
            umount(&dir)?;
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let target = cstr(&dir)?;
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            return Err(io::Error::new(e.kind(), format!("mount -t bpf bpf {}: {e}", dir.display())));
        }
        Ok(BpfFs { dir, down: None })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// On drop, first run `binary down --config config` (falling back to
    /// `binary down --pin-dir <this> --socket socket`), so a daemon still running detaches and
    /// exits and nothing stays pinned.
    pub fn down_on_drop(&mut self, binary: &Path, config: &Path, socket: &Path) {
        self.down = Some(Down { binary: binary.to_owned(), config: config.to_owned(), socket: socket.to_owned() });
    }

    /// Names of everything under the mount, relative to it, sorted (`maps/KPF_FLOWS`, ...),
    /// without the `maps.debug` and `progs.debug` iterators the kernel puts in every bpffs.
    pub fn list(&self) -> io::Result<Vec<String>> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> io::Result<()> {
            for e in std::fs::read_dir(dir)? {
                let e = e?;
                let p = e.path();
                let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
                if e.file_type()?.is_dir() {
                    out.push(format!("{rel}/"));
                    walk(root, &p, out)?;
                } else {
                    out.push(rel);
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        walk(&self.dir, &self.dir, &mut out)?;
        out.retain(|n| n != "maps.debug" && n != "progs.debug");
        out.sort();
        Ok(out)
    }

    fn run_down(d: &Down, dir: &Path) {
        let run = |args: &[&std::ffi::OsStr]| Command::new(&d.binary).args(args).stdin(Stdio::null()).output();
        let by_config = d.config.is_file()
            && run(&["down".as_ref(), "--config".as_ref(), d.config.as_os_str()]).is_ok_and(|o| o.status.success());
        if !by_config {
            match run(&[
                "down".as_ref(),
                "--pin-dir".as_ref(),
                dir.as_os_str(),
                "--socket".as_ref(),
                d.socket.as_os_str(),
            ]) {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "warning: kpf down --pin-dir {}: {}: {}",
                    dir.display(),
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("warning: running kpf down: {e}"),
            }
        }
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        if let Some(d) = &self.down {
            Self::run_down(d, &self.dir);
        }
        if is_bpffs(&self.dir)
            && let Err(e) = umount(&self.dir)
        {
            eprintln!("warning: could not unmount the bpffs on {}: {e}", self.dir.display());
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("warning: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// The mount points of bpffs this harness mounted (in this mount namespace) for processes that
/// no longer exist, e.g. a test run killed with SIGKILL; unmounted and removed. Returns them.
pub fn sweep_stale() -> io::Result<Vec<PathBuf>> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    let prefix = std::env::temp_dir().join(format!("{PREFIX}-"));
    let prefix = prefix.display().to_string();
    let mut removed = Vec::new();
    for line in table.lines() {
        // mount ID, parent ID, major:minor, root, mount point, ...
        let Some(point) = line.split(' ').nth(4) else { continue };
        let Some(rest) = point.strip_prefix(&prefix) else { continue };
        let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<i32>) else { continue };
        // SAFETY: kill with signal 0 only checks for existence.
        let alive =
            unsafe { libc::kill(pid, 0) } == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if alive {
            continue;
        }
        let p = PathBuf::from(point);
        if umount(&p).is_ok() {
            let _ = std::fs::remove_dir(&p);
            removed.push(p);
        }
    }
    Ok(removed)
}

/// The bpffs mount points this process has (for cleanup checks).
pub fn own_mounts() -> io::Result<Vec<PathBuf>> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mine = std::env::temp_dir().join(format!("{PREFIX}-{}-", std::process::id())).display().to_string();
    Ok(table.lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| p.starts_with(&mine)).map(PathBuf::from).collect())
}
