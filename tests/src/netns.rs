//! Network namespaces as Drop guards.

use std::{
    ffi::OsStr,
    fs::File,
    io,
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);
const PREFIX: &str = "kpft";

/// A network namespace named `kpft-<pid>-<n>-<role>`, deleted (with every link in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

fn check(cmd: &mut Command) -> io::Result<String> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip <args>` in the root namespace's view (use `-n NS` in args to target a namespace).
pub fn ip(args: &[&str]) -> io::Result<String> {
    check(Command::new("ip").args(args))
}

impl Netns {
    /// Creates a fresh namespace with loopback up. `role` should be short (names are limited).
    pub fn new(role: &str) -> io::Result<Netns> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}-{}-{n}-{role}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "dev", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that will run inside this namespace (`ip netns exec`). Note that `ip netns exec`
    /// remounts /sys, so bpffs under /sys/fs/bpf is not visible to it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `program args` inside the namespace and returns its stdout; fails on non-zero exit.
    pub fn run(&self, program: &str, args: &[&str]) -> io::Result<String> {
        check(self.command(program).args(args))
    }

    /// Sets a sysctl inside this namespace (never the root's).
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        self.run("sysctl", &["-qw", &format!("{key}={value}")]).map(drop)
    }

    /// `ethtool -K <dev> <features...>` inside this namespace.
    pub fn ethtool_k(&self, dev: &str, features: &[&str]) -> io::Result<()> {
        let mut args = vec!["-K", dev];
        args.extend_from_slice(features);
        self.run("ethtool", &args).map(drop)
    }

    /// Runs `f` on a new thread that has joined this namespace: sockets it creates live here.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let file = File::open(format!("/run/netns/{}", self.name))?;
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on this thread only, with a valid netns fd.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other("thread in namespace panicked"))?
        })
    }

    /// A counter of this namespace's `/proc/net/snmp`, e.g. `snmp("Tcp", "InCsumErrors")`.
    pub fn snmp(&self, section: &str, field: &str) -> io::Result<i64> {
        let table = self.enter(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
        snmp_field(&table, section, field)
            .ok_or_else(|| io::Error::other(format!("{}: no {section} {field} in /proc/net/snmp", self.name)))
    }

    /// Joins the *calling* thread to this namespace for good. For threads that exist only to
    /// work inside one namespace (e.g. a spawned server thread).
    pub fn join_current_thread(&self) -> io::Result<()> {
        let file = File::open(format!("/run/netns/{}", self.name))?;
        // SAFETY: as above.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: could not delete namespace {}: {e}", self.name);
        }
    }
}

/// A veth pair `a_dev` (in `a`) <-> `b_dev` (in `b`), created directly inside the namespaces,
/// both ends up. It disappears with either namespace.
pub fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> io::Result<()> {
    a.ip(&["link", "add", "name", a_dev, "type", "veth", "peer", "name", b_dev, "netns", b.name()])?;
    a.ip(&["link", "set", "dev", a_dev, "up"])?;
    b.ip(&["link", "set", "dev", b_dev, "up"])?;
    Ok(())
}

/// The namespaces this process created that still exist (named `kpft-<this pid>-...`).
pub fn own_namespaces() -> io::Result<Vec<String>> {
    let mine = format!("{PREFIX}-{}-", std::process::id());
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&mine))
        .map(str::to_owned)
        .collect())
}

/// Looks `field` up in a `/proc/net/snmp`-style table (`Tcp: A B ...` header line followed by a
/// `Tcp: 1 2 ...` value line).
pub fn snmp_field(table: &str, section: &str, field: &str) -> Option<i64> {
    let prefix = format!("{section}:");
    let mut rows = table.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(head), Some(values)) = (rows.next(), rows.next()) {
        let i = head.split_whitespace().position(|h| h == field);
        if let Some(i) = i {
            return values.split_whitespace().nth(i)?.parse().ok();
        }
    }
    None
}

/// Deletes namespaces left by test processes that no longer exist (e.g. killed with SIGKILL,
/// which skips Drop). Returns their names.
pub fn sweep_stale() -> io::Result<Vec<String>> {
    let list = ip(&["netns", "list"])?;
    let mut removed = Vec::new();
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let mut parts = name.splitn(3, '-');
        if parts.next() != Some(PREFIX) {
            continue;
        }
        let Some(Ok(pid)) = parts.next().map(str::parse::<i32>) else { continue };
        // SAFETY: kill with signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive && ip(&["netns", "del", name]).is_ok() {
            removed.push(name.to_owned());
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn namespace_and_its_links_go_away_on_drop() {
        if !root() {
            eprintln!("skipped: needs root");
            return;
        }
        let (a, b) = (Netns::new("a").unwrap(), Netns::new("b").unwrap());
        let (an, bn) = (a.name().to_owned(), b.name().to_owned());
        veth(&a, "x0", &b, "y0").unwrap();
        assert!(a.ip(&["link", "show", "x0"]).unwrap().contains("x0"));
        let inside = a.enter(|| std::fs::read_to_string("/proc/thread-self/net/dev").unwrap()).unwrap();
        assert!(inside.contains("x0:"), "enter() runs inside the namespace");
        drop(a);
        drop(b);
        let list = ip(&["netns", "list"]).unwrap();
        assert!(!list.contains(&an) && !list.contains(&bn), "{list}");
    }
}
