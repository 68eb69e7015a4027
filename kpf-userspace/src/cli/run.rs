use std::path::PathBuf;

use kpf::{
    config::{Config, Mode},
    daemon,
};

#[derive(clap::Args)]
pub struct Args {
    /// The TOML config file.
    #[arg(short, long, default_value = "/etc/kpf/kpf.toml")]
    pub config: PathBuf,
    /// Override the config's attach mode: native, generic or auto.
    #[arg(long, value_parser = |s: &str| s.parse::<Mode>())]
    pub mode: Option<Mode>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(daemon::run(config, daemon::Options { mode: args.mode }))?;
    Ok(())
}
