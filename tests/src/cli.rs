//! Running the `kpf` CLI (`kpf map ...`, `kpf status`, ...) as a real process against a daemon's
//! control socket, and reading its answers.
//!
//! The control socket is a filesystem Unix socket, so the CLI does not need to run inside the
//! gateway's network namespace: it is started directly, with `KPF_SOCKET` set.

use std::{
    ffi::OsStr,
    io,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

/// What one CLI invocation did.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` -> {}\nstdout: {}\nstderr: {}",
            self.command,
            self.status,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// The kpf CLI pointed at one control socket.
#[derive(Debug, Clone)]
pub struct KpfCli {
    binary: PathBuf,
    socket: PathBuf,
}

impl KpfCli {
    pub fn new(binary: &Path, socket: &Path) -> KpfCli {
        KpfCli { binary: binary.to_owned(), socket: socket.to_owned() }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn command(&self, prefix: &[&str], args: &[&str]) -> (Command, String) {
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.binary);
                c
            }
            None => Command::new(&self.binary),
        };
        cmd.args(args).env("KPF_SOCKET", &self.socket).env_remove("RUST_LOG").stdin(Stdio::null());
        let mut text: Vec<String> = prefix.iter().map(|s| (*s).to_owned()).collect();
        text.push("kpf".into());
        text.extend(args.iter().map(|s| (*s).to_owned()));
        (cmd, text.join(" "))
    }

    fn output(mut cmd: Command, text: String) -> io::Result<CliOutput> {
        let out = cmd.output().map_err(|e| io::Error::new(e.kind(), format!("running `{text}`: {e}")))?;
        Ok(CliOutput {
            command: text,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs `kpf ARGS` with `KPF_SOCKET` set; any exit status is returned, not an error.
    pub fn run(&self, args: &[&str]) -> io::Result<CliOutput> {
        let (cmd, text) = self.command(&[], args);
        Self::output(cmd, text)
    }

    /// Runs `kpf ARGS` with extra environment.
    pub fn run_env(&self, args: &[&str], env: &[(&str, &OsStr)]) -> io::Result<CliOutput> {
        let (mut cmd, text) = self.command(&[], args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::output(cmd, text)
    }

    /// Runs `kpf ARGS` as user and group `uid` with no supplementary groups (through `setpriv`).
    pub fn run_as(&self, uid: u32, args: &[&str]) -> io::Result<CliOutput> {
        let (reuid, regid) = (format!("--reuid={uid}"), format!("--regid={uid}"));
        let (cmd, text) = self.command(&["setpriv", &reuid, &regid, "--clear-groups"], args);
        Self::output(cmd, text)
    }

    /// Runs `kpf ARGS` and returns its stdout, or an error carrying the whole output unless it
    /// exited 0.
    pub fn ok(&self, args: &[&str]) -> io::Result<String> {
        let out = self.run(args)?;
        if !out.success() {
            return Err(io::Error::other(out.to_string()));
        }
        Ok(out.stdout)
    }

    /// Runs `kpf ARGS` (which should include `--json`) and parses its stdout.
    pub fn json(&self, args: &[&str]) -> io::Result<serde_json::Value> {
        let text = self.ok(args)?;
        serde_json::from_str(&text)
            .map_err(|e| io::Error::other(format!("`kpf {}` printed no JSON ({e}): {text}", args.join(" "))))
    }
}
