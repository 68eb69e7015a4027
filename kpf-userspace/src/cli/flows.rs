use kpf::control::{self, Request};
use serde::Deserialize;

use super::{JsonArg, SocketArg, print_json};

#[derive(clap::Args)]
pub struct Args {
    /// Only connections to this frontend port.
    #[arg(long)]
    pub port: Option<u16>,
    #[command(flatten)]
    pub json: JsonArg,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Deserialize)]
struct Flow {
    client: String,
    frontend: String,
    gateway: String,
    backend: String,
    state: String,
    age_s: f64,
    idle_s: f64,
    bytes: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let answer = control::call(&args.socket.socket, &Request::Flows { port: args.port })?;
    if args.json.json {
        print_json(&answer);
        return Ok(());
    }
    let flows: Vec<Flow> = serde_json::from_value(answer)?;
    println!(
        "{:<22} {:<22} {:<22} {:<22} {:<16} {:>8} {:>8} {:>12}",
        "CLIENT", "FRONTEND", "GATEWAY", "BACKEND", "STATE", "AGE", "IDLE", "BYTES"
    );
    for f in &flows {
        println!(
            "{:<22} {:<22} {:<22} {:<22} {:<16} {:>7}s {:>7}s {:>12}",
            f.client, f.frontend, f.gateway, f.backend, f.state, f.age_s, f.idle_s, f.bytes
        );
    }
    println!("{} connection(s)", flows.len());
    Ok(())
}
