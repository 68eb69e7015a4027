use std::net::Ipv4Addr;

use kpf::{
    config::FrontendConfig,
    control::{self, Request},
};

use super::{JsonArg, SocketArg, print_json};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Map a new frontend port to a backend; new connections use it at once.
    Add {
        port: u16,
        /// Backend `ip:port`.
        backend: String,
        /// Only this local address (default: every local address).
        #[arg(long)]
        address: Option<Ipv4Addr>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Remove a frontend: no new connections; existing ones finish unless --reset.
    Rm {
        port: u16,
        #[arg(long)]
        address: Option<Ipv4Addr>,
        /// End the frontend's existing connections too.
        #[arg(long)]
        reset: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Point a frontend at another backend: new connections go there, existing ones stay.
    Set {
        port: u16,
        backend: String,
        #[arg(long)]
        address: Option<Ipv4Addr>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// List the mappings.
    Ls {
        #[command(flatten)]
        json: JsonArg,
        #[command(flatten)]
        socket: SocketArg,
    },
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    let (socket, req, json) = match cmd {
        Command::Add { port, backend, address, socket } => (socket, Request::MapAdd { port, address, backend }, false),
        Command::Rm { port, address, reset, socket } => (socket, Request::MapRm { port, address, reset }, false),
        Command::Set { port, backend, address, socket } => (socket, Request::MapSet { port, address, backend }, false),
        Command::Ls { json, socket } => (socket, Request::MapLs {}, json.json),
    };
    let listing = matches!(req, Request::MapLs {});
    let answer = control::call(&socket.socket, &req)?;
    if json {
        print_json(&answer);
    } else if listing {
        let frontends: Vec<FrontendConfig> = serde_json::from_value(answer)?;
        println!("{:<22} BACKENDS", "FRONTEND");
        for f in frontends {
            let b: Vec<String> = f.backends.iter().map(ToString::to_string).collect();
            println!("{:<22} {}", f.label(), b.join(", "));
        }
    } else {
        super::apply::print_plan(&answer);
    }
    Ok(())
}

