use std::path::PathBuf;

use kpf::{
    config::{Config, Mode},
    daemon,
};

#[derive(clap::Args)]
pub struct Args {
    /// The TOML config file; accepted changes are written back to it.
    #[arg(short, long, default_value = "/etc/kpf/kpf.toml")]
    pub config: PathBuf,
    /// Override the config's attach mode: native, generic, tc or auto.
    #[arg(long, value_parser = |s: &str| s.parse::<Mode>())]
    pub mode: Option<Mode>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let opts = daemon::Options { mode: args.mode, config_path: Some(args.config) };
    rt.block_on(daemon::run(config, opts))?;
    Ok(())
}
