//! kpf: an XDP full-NAT forwarder from frontend ports to Kafka brokers.
//!
//! The binary (`src/main.rs`, `src/cli/`) is a thin clap layer over this library.

pub mod clock;
pub mod config;
pub mod control;
pub mod converge;
pub mod daemon;
pub mod error;
pub mod gc;
pub mod health;
pub mod kafka;
pub mod loader;
pub mod maglev;
pub mod metrics;
pub mod neigh;
pub mod pin;
pub mod plan;
pub mod reset;
pub mod server;
pub mod sysctl;
pub mod views;

pub use error::{Error, Result};
