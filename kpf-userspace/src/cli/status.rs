use kpf::{
    control::{self, Request},
    daemon::{BackendStatus, FrontendStatus},
    loader::AttachMode,
};
use serde::Deserialize;

use super::{JsonArg, SocketArg, print_json};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub json: JsonArg,
    #[command(flatten)]
    pub socket: SocketArg,
}

#[derive(Deserialize)]
struct Iface {
    iface: String,
    mode: AttachMode,
}

#[derive(Deserialize)]
struct Status {
    pid: u32,
    uptime_s: u64,
    pin_dir: String,
    interfaces: Vec<Iface>,
    frontends: Vec<FrontendStatus>,
    backends: Vec<BackendStatus>,
    tracked_connections: u64,
    counters: std::collections::BTreeMap<String, u64>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let answer = control::call(&args.socket.socket, &Request::Status {})?;
    if args.json.json {
        print_json(&answer);
        return Ok(());
    }
    let s: Status = serde_json::from_value(answer)?;
    println!("kpf pid {} up {}s, pinned in {}", s.pid, s.uptime_s, s.pin_dir);
    for i in &s.interfaces {
        println!("interface {} ({})", i.iface, i.mode.describe());
    }
    println!("{} live connection(s)\n", s.tracked_connections);
    println!("{:<22} {:<22} {:>10} {:>14} {:>10} {:>6}", "FRONTEND", "BACKEND", "PACKETS", "BYTES", "NEW", "LIVE");
    for f in &s.frontends {
        println!(
            "{:<22} {:<22} {:>10} {:>14} {:>10} {:>6}",
            f.frontend,
            f.backends.join(","),
            f.packets,
            f.bytes,
            f.new_flows,
            f.live_flows
        );
    }
    println!(
        "\n{:<22} {:<10} {:>10} {:>14} {:>10} {:>6}  LAST CHECK",
        "BACKEND", "HEALTH", "PACKETS", "BYTES", "NEW", "LIVE"
    );
    for b in &s.backends {
        let health = match (b.healthy, b.draining) {
            (_, true) => "draining",
            (true, false) => "healthy",
            (false, false) => "UNHEALTHY",
        };
        println!(
            "{:<22} {:<10} {:>10} {:>14} {:>10} {:>6}  {}",
            b.backend,
            health,
            b.packets,
            b.bytes,
            b.new_flows,
            b.live_flows,
            b.last_error.as_deref().unwrap_or("ok")
        );
    }
    let nonzero: Vec<String> = s.counters.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    println!("\ncounters: {}", if nonzero.is_empty() { "all zero".to_owned() } else { nonzero.join(" ") });
    Ok(())
}
