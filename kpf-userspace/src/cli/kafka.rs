use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{anyhow, bail};
use kpf::{
    config::Config,
    daemon::StagedFile,
    kafka::{
        plan::{self, Broker, Pattern, Range},
        verify,
    },
};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Plan a cluster's exposure: each broker's listener lines, the kpf config, the console values.
    Plan(PlanArgs),
    /// Prove through the gateway that every advertised port reaches its own broker.
    Verify(VerifyArgs),
}

#[derive(clap::Args)]
pub struct PlanArgs {
    /// The advertised listener pattern from the console; on AWS one per AZ: `usw2-az1=PATTERN`.
    #[arg(long = "pattern", required = true)]
    patterns: Vec<Pattern>,
    /// A broker: `NODE_ID=IP`, or `NODE_ID=IP@AZ_ID` on AWS. Repeat for each broker.
    #[arg(long = "broker", required = true)]
    brokers: Vec<Broker>,
    /// The port the new listener binds on each broker.
    #[arg(long, default_value_t = 39092)]
    external_port: u16,
    /// The advertised port of the lowest node id; the others follow in node id order.
    #[arg(long, default_value_t = 9093)]
    first_port: u16,
    /// The listener name: EXTERNAL, or EXTERNAL2 for a second consumer project.
    #[arg(long, default_value = "EXTERNAL")]
    listener: String,
    /// Bootstrap port(s) forwarding to every broker.
    #[arg(long = "bootstrap-port", default_value = "9092")]
    bootstrap_ports: Vec<u16>,
    /// Advertised port range another listener set already uses (e.g. EXTERNAL's, when planning EXTERNAL2).
    #[arg(long = "taken")]
    taken: Vec<Range>,
    /// The broker port that listener set binds (with --taken; its plan's --external-port).
    #[arg(long, default_value_t = 39092, requires = "taken")]
    taken_external_port: u16,
    /// The gateway interface, for a new config file.
    #[arg(long, default_value = "eth0")]
    interface: String,
    /// Write the frontends to this kpf config: merged into it if it exists, else a new file.
    #[arg(long)]
    write_config: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The address cloud clients connect to (the endpoint, or the gateway's address).
    #[arg(long)]
    connect: IpAddr,
    #[arg(long, default_value_t = 9092)]
    bootstrap_port: u16,
    /// The verification topic: one single-replica partition per broker, created if missing
    /// (default: a fresh `__kpf_verify_<ms>` per run).
    #[arg(long)]
    topic: Option<String>,
    /// Keep the verification topic (default: delete it if this run created it).
    #[arg(long)]
    keep_topic: bool,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Plan(a) => run_plan(a),
        Command::Verify(a) => run_verify(a),
    }
}

fn run_plan(a: PlanArgs) -> anyhow::Result<()> {
    let out = plan::plan(plan::Input {
        patterns: a.patterns,
        brokers: a.brokers,
        external_port: a.external_port,
        first_port: a.first_port,
        listener: a.listener,
        bootstrap_ports: a.bootstrap_ports,
        taken_external_ports: if a.taken.is_empty() { vec![] } else { vec![a.taken_external_port] },
        taken: a.taken,
    })
    .map_err(|e| anyhow!(e))?;
    println!("== 1. On each broker (server.properties), then restart the brokers one at a time\n");
    print!("{}", out.broker_lines());
    println!("== 2. kpf frontends for the gateway\n");
    print!("{}", out.frontends_toml());
    println!("== 3. Cloud console\n");
    print!("{}", out.console_values());
    if let Some(path) = a.write_config {
        let text = merged_config(&path, &a.interface, &out.frontends_toml())?;
        StagedFile::write(&path, &text)?.commit()?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// The config file with the planned frontends added (a new file if there is none), validated
/// whole before anything is written.
fn merged_config(path: &std::path::Path, interface: &str, frontends: &str) -> anyhow::Result<String> {
    let name = path.display().to_string();
    let planned = Config::parse(&format!("interface = {interface:?}\n{frontends}"), "planned frontends")?;
    let Ok(existing) = std::fs::read_to_string(path) else {
        return Ok(planned.to_toml());
    };
    let mut config = Config::parse(&existing, &name)?;
    for f in planned.frontends {
        match config.frontend(f.address, f.port) {
            Some(have) if *have == f => {}
            Some(have) => bail!(
                "{name}: port {} already forwards to {}; remove it first or plan other ports",
                f.port,
                have.backends.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            ),
            None => config.frontends.push(f),
        }
    }
    let text = config.to_toml();
    Config::parse(&text, &name)?;
    Ok(text)
}

fn run_verify(a: VerifyArgs) -> anyhow::Result<()> {
    let report = verify::verify(&verify::Options {
        connect: a.connect,
        bootstrap_port: a.bootstrap_port,
        topic: a.topic,
        keep_topic: a.keep_topic,
        timeout: a.timeout,
    })
    .map_err(|e| anyhow!(e))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    if !report.ok {
        let bad: Vec<String> = report.rows.iter().filter(|r| !r.ok).map(|r| format!("port {} {}", r.port, r.detail)).collect();
        bail!("verification failed: {}", bad.join("; "));
    }
    Ok(())
}
