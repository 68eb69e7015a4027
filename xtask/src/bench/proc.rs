//! Child processes of the benchmark (servers, HAProxy, traffic clients) and Ctrl-C handling.
//!
//! Every child gets `PR_SET_PDEATHSIG = SIGKILL`, so it dies with xtask even if xtask is killed
//! outright; a [`Child`] guard stops it on drop; and SIGINT/SIGTERM only set a flag, which the
//! run checks between steps, so the Drop guards (namespaces, kpf, servers) always run.

use std::{
    io::Read,
    os::unix::process::CommandExt,
    process::{Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::util::describe;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set the interrupted flag instead of killing xtask.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails if Ctrl-C (or SIGTERM) was received.
pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// The child gets SIGKILL when xtask dies, however it dies.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn reader(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// Spawns `cmd` (dying with this process) with stdin closed and stdout and stderr collected by
/// one thread each.
fn spawn_collected(cmd: &mut Command, what: impl FnOnce() -> String) -> Result<(std::process::Child, [JoinHandle<Vec<u8>>; 2])> {
    die_with_parent(cmd);
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(what)?;
    let readers = [reader(child.stdout.take().expect("piped")), reader(child.stderr.take().expect("piped"))];
    Ok((child, readers))
}

/// What a finished command printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion, capturing its output; kills it (and fails) after `timeout` or on
/// Ctrl-C. Fails if it exits unsuccessfully, with its stderr.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let out = run_unchecked(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            describe(cmd),
            out.status,
            out.stderr.trim(),
            if out.stderr.trim().is_empty() { out.stdout.trim() } else { "" }
        );
    }
    Ok(out)
}

/// Like [`run`], but returns the output whatever the exit status.
pub fn run_unchecked(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let desc = describe(cmd);
    let (mut child, [out, err]) = spawn_collected(cmd, || format!("starting `{desc}`"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if interrupted() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            check_interrupted()?;
            bail!("`{desc}` did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    Ok(Output { status, stdout, stderr })
}

/// A long-running child (a server, HAProxy), stopped with SIGTERM (then SIGKILL) on drop. Its
/// output is collected for error messages.
pub struct Child {
    name: String,
    child: Option<std::process::Child>,
    readers: Vec<JoinHandle<Vec<u8>>>,
}

impl Child {
    /// Spawns `cmd`. Call this from the main thread: the child's parent-death signal fires when
    /// the *thread* that spawned it ends.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Child> {
        let desc = describe(cmd);
        let (child, readers) = spawn_collected(cmd, || format!("starting {name}: `{desc}`"))?;
        Ok(Child { name: name.to_owned(), child: Some(child), readers: readers.into() })
    }

    /// `Err` with the child's output if it has exited.
    pub fn check_running(&mut self) -> Result<()> {
        let Some(c) = self.child.as_mut() else { bail!("{} was stopped", self.name) };
        if let Some(status) = c.try_wait()? {
            let output = self.stop();
            bail!("{} exited ({status}): {}", self.name, output.trim());
        }
        Ok(())
    }

    /// Stops the child (SIGTERM, SIGKILL after 3 s) and returns everything it printed.
    pub fn stop(&mut self) -> String {
        if let Some(mut c) = self.child.take() {
            if c.try_wait().ok().flatten().is_none() {
                // SAFETY: signalling our own, not yet reaped child.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(3);
                while c.try_wait().ok().flatten().is_none() {
                    if Instant::now() > deadline {
                        let _ = c.kill();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let _ = c.wait();
        }
        let mut text = String::new();
        for r in self.readers.drain(..) {
            text += &String::from_utf8_lossy(&r.join().unwrap_or_default());
        }
        text
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stop();
    }
}
