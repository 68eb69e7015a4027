//! `cargo xtask demo` (being written).

use clap::Args;

#[derive(Args)]
pub struct Options {}

pub fn run(_opts: Options) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
