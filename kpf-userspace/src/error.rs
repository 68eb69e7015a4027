//! The library's one error type. Every message names what is wrong and, where it helps, what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config file that does not parse or does not validate; `at` is `file:line:column`.
    #[error("{at}: {message}")]
    Config { at: String, message: String },

    #[error("cannot read {}: {source}", path.display())]
    ReadFile { path: PathBuf, source: std::io::Error },

    #[error("{0}")]
    Environment(String),

    /// Nothing listens on the control socket (no such file, or a stale one).
    #[error("kpf is not running (nothing answers on {}): start it with `kpf run`, or pass --socket", .0.display())]
    NotRunning(PathBuf),

    #[error("interface {0:?} does not exist")]
    NoSuchInterface(String),

    #[error("cannot attach to {iface} in {mode} mode: {source}")]
    Attach { iface: String, mode: &'static str, source: aya::programs::ProgramError },

    #[error("cannot load the XDP program: {0}")]
    Load(#[from] aya::EbpfError),

    #[error("XDP program: {0}")]
    Program(#[from] aya::programs::ProgramError),

    #[error("BPF map {map}: {source}")]
    Map { map: &'static str, source: aya::maps::MapError },

    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },

    /// The daemon refused a request; the text says why.
    #[error("{0}")]
    Rejected(String),

    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
}

impl Error {
    pub(crate) fn map(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
        move |source| Error::Map { map, source }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
