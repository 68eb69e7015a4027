use std::path::PathBuf;

use kpf::{
    config::Config,
    control::{self, Request},
    pin::PinDir,
};

use super::SocketArg;

#[derive(clap::Args)]
pub struct Args {
    /// Take the socket and pin directory from this config file.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// Where the pinned state is, when no daemon is running to ask.
    #[arg(long, default_value = kpf::config::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    #[command(flatten)]
    pub socket: SocketArg,
}

/// Asks the running daemon to detach, unpin and exit; with no daemon, removes the pins itself.
pub fn run(mut args: Args) -> anyhow::Result<()> {
    if let Some(path) = &args.config {
        let c = Config::load(path)?;
        args.pin_dir = c.pin_dir;
        args.socket.socket = c.socket;
    }
    match control::call(&args.socket.socket, &Request::Down {}) {
        Ok(n) => {
            println!("kpf down: daemon detached and removed {n} pinned object(s)");
            Ok(())
        }
        // Only when nothing listens on the socket: any other failure (no permission, a daemon
        // that does not answer in time) may hide a running daemon, whose dataplane this would
        // pull out from under it.
        Err(kpf::Error::NotRunning(_)) => {
            let pins = PinDir::new(&args.pin_dir);
            // Held while unpinning, so no daemon starts on the directory meanwhile; refused if a
            // daemon that answers on another socket holds it.
            let lock = pins.lock()?;
            if lock.is_none() || !pins.exists()? {
                println!(
                    "kpf down: nothing to do: no daemon answers on {} and nothing is pinned in {}",
                    args.socket.socket.display(),
                    args.pin_dir.display()
                );
                return Ok(());
            }
            let removed = pins.remove_all()?;
            println!("kpf down: no daemon running; removed {} pinned object(s) from {}", removed.len(), args.pin_dir.display());
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
