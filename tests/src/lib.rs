//! Test harness shared by the end-to-end tests, the fixture tests, `cargo xtask demo` and
//! `cargo xtask bench`: network namespaces that always clean up, the topologies built from them,
//! traffic peers that run inside them, and a handle on a running `kpf`.
//!
//! Nothing here touches the root namespace's interfaces, routes or sysctls: every link is
//! created directly inside namespaces this process made, and dies with them.

pub mod bpffs;
pub mod byte_echo;
pub mod cli;
pub mod kafka;
pub mod kpf_proc;
pub mod netns;
pub mod peer;
pub mod streams;
pub mod topology;
pub mod wait;
pub mod xdp;
pub mod routed;
pub mod serial;
pub mod synflood;

/// The repository root (the workspace this crate is built in).
pub fn workspace_root() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("kpf-tests lives in the workspace")
}
