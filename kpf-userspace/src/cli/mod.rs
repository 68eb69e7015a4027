//! One module per subcommand. Commands other than `run` and `check` talk to the running daemon
//! over its control socket.

pub mod apply;
pub mod backend;
pub mod check;
pub mod down;
pub mod flows;
pub mod kafka;
pub mod map;
pub mod metrics;
pub mod run;
pub mod status;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kpf", version, about = "XDP port-to-broker forwarder: one private endpoint, every Kafka broker on its own port")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the forwarder: attach the XDP program and forward the configured frontends.
    Run(run::Args),
    /// Validate a config file and print what it would forward.
    Check(check::Args),
    /// Add, remove, change or list mappings on the running daemon.
    #[command(subcommand)]
    Map(map::Command),
    /// Drain a backend (no new connections, existing ones reset after a timeout) or undrain it.
    #[command(subcommand)]
    Backend(backend::Command),
    /// Print the Prometheus metrics.
    Metrics(metrics::Args),
    /// Converge the running daemon to a config file: show the plan, then apply it.
    Apply(apply::Args),
    /// Attach mode, interfaces, frontends with their counters and live connections.
    Status(status::Args),
    /// Live connections: client, frontend, backend, state, age, bytes.
    Flows(flows::Args),
    /// Kafka-aware planning and verification.
    #[command(subcommand)]
    Kafka(kafka::Command),
    /// Detach the program and remove all pinned state (drops tracked connections).
    Down(down::Args),
}

/// Where the daemon listens; shared by every client command.
#[derive(clap::Args, Clone)]
pub struct SocketArg {
    /// The daemon's control socket.
    #[arg(long, env = "KPF_SOCKET", default_value = kpf::config::DEFAULT_SOCKET, global = true)]
    pub socket: PathBuf,
}

/// `--json` for read commands.
#[derive(clap::Args, Clone, Copy)]
pub struct JsonArg {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}
