//! Test harness shared by the end-to-end tests, the fixture tests, `cargo xtask demo` and
//! `cargo xtask bench`: network namespaces that always clean up, and the topologies built from them.
//!
//! Nothing here touches the root namespace's interfaces, routes or sysctls: every link is
//! created directly inside namespaces this process made, and dies with them.

pub mod netns;
