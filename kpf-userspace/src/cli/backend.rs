use std::time::Duration;

use kpf::control::{self, Request};

use super::SocketArg;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Take a backend out of selection for new connections; existing ones continue until they
    /// close or the timeout passes, then get an RST toward both sides.
    Drain {
        /// Backend `ip:port`.
        backend: String,
        /// How long existing connections may continue ("300s", "5m").
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Put a drained backend back into selection.
    Undrain {
        backend: String,
        #[command(flatten)]
        socket: SocketArg,
    },
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    let (socket, req) = match cmd {
        Command::Drain { backend, timeout, socket } => {
            (socket, Request::BackendDrain { backend, timeout_ms: timeout.map(|t| t.as_millis().clamp(1, u64::MAX as u128) as u64) })
        }
        Command::Undrain { backend, socket } => (socket, Request::BackendUndrain { backend }),
    };
    let answer = control::call(&socket.socket, &req)?;
    println!("{}", answer.as_str().unwrap_or_default());
    Ok(())
}
