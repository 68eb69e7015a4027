//! One module per subcommand.

pub mod check;
pub mod run;

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
}
