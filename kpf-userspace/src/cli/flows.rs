use kpf::{
    control::{self, Request},
    daemon::FlowView,
};

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

pub fn run(args: Args) -> anyhow::Result<()> {
    let answer = control::call(&args.socket.socket, &Request::Flows { port: args.port })?;
    if args.json.json {
        print_json(&answer);
        return Ok(());
    }
    let flows: Vec<FlowView> = serde_json::from_value(answer)?;
    println!(
        "{:<22} {:<22} {:<22} {:<22} {:<17} {:>8} {:>8} {:>12}",
        "CLIENT", "FRONTEND", "GATEWAY", "BACKEND", "STATE", "AGE", "IDLE", "BYTES"
    );
    for f in &flows {
        println!(
            "{:<22} {:<22} {:<22} {:<22} {:<17} {:>7}s {:>7}s {:>12}",
            f.client, f.frontend, f.gateway, f.backend, f.state, f.age_s, f.idle_s, f.bytes
        );
    }
    println!("{} connection(s)", flows.len());
    Ok(())
}
