use std::path::PathBuf;

use kpf::config::Config;

#[derive(clap::Args)]
pub struct Args {
    /// The TOML config file.
    #[arg(short, long, default_value = "/etc/kpf/kpf.toml")]
    pub config: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let c = Config::load(&args.config)?;
    println!("{}: ok", args.config.display());
    println!("interfaces: {} (mode {:?})", c.interfaces.join(", "), c.mode);
    println!("snat ports: {}", c.snat_ports);
    for f in &c.frontends {
        let b: Vec<String> = f.backends.iter().map(ToString::to_string).collect();
        println!("  {} -> {}", f.label(), b.join(", "));
    }
    Ok(())
}
