//! `cargo xtask bench` (work in progress).

use clap::Args;

#[derive(Args)]
pub struct Options {
    /// Tiny durations, to keep the harness working (run by `cargo xtask test`).
    #[arg(long)]
    pub smoke: bool,
}

pub fn run(_opts: Options) -> anyhow::Result<()> {
    anyhow::bail!("cargo xtask bench is not implemented yet")
}
