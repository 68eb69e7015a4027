use kpf::control::{self, Request};

use super::SocketArg;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub socket: SocketArg,
}

/// Prints what `metrics_addr` serves, through the control socket (works without `metrics_addr`).
pub fn run(args: Args) -> anyhow::Result<()> {
    let answer = control::call(&args.socket.socket, &Request::Metrics {})?;
    print!("{}", answer.as_str().unwrap_or_default());
    Ok(())
}
