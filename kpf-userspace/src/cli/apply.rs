use std::path::PathBuf;

use kpf::{
    control::{self, Request},
    plan::Plan,
};

use super::{JsonArg, SocketArg, print_json};

#[derive(clap::Args)]
pub struct Args {
    /// The desired config.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Show the plan without applying it.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub json: JsonArg,
    #[command(flatten)]
    pub socket: SocketArg,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = std::fs::read_to_string(&args.file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.file.display()))?;
    let req = Request::Apply { config, name: args.file.display().to_string(), dry_run: args.dry_run };
    let answer = control::call(&args.socket.socket, &req)?;
    if args.json.json {
        print_json(&answer);
        return Ok(());
    }
    if args.dry_run {
        println!("plan (not applied):");
    }
    print_plan(&answer);
    Ok(())
}

pub fn print_plan(answer: &serde_json::Value) {
    match serde_json::from_value::<Plan>(answer.clone()) {
        Ok(plan) => print!("{plan}"),
        Err(_) => print_json(answer),
    }
}
