//! `cargo xtask demo`: the seeds' layout in miniature. A client, a one-NIC gateway running the real
//! `kpf`, and three backends that say who they are, each in its own network namespace. Real TCP
//! goes through every mapped port; the demo prints where it went, changes a mapping live, and
//! removes everything it made.

use std::{
    net::{SocketAddr, SocketAddrV4},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use kpf_tests::{
    kpf_proc::{Kpf, Mode, SNAT_PORTS, kpf_binary},
    netns::Netns,
    peer::{Backend, stream, who},
    topology::{BACKEND_NAMES, BACKEND_PORT, OneNic, Topology},
};

use crate::util::{self, cargo, is_root};

#[derive(Args)]
pub struct Options {
    /// Bytes each way through each port in the bulk step.
    #[arg(long, default_value_t = 64 << 20)]
    pub bytes: u64,
    /// XDP mode for kpf: native or generic.
    #[arg(long, default_value = "native")]
    pub mode: String,
}

/// The demo's embedded config: the seeds' mapping, one broker per port.
fn config(topo: &OneNic) -> String {
    let mut text = format!(
        "# The demo's kpf config: each frontend port forwards to one broker's EXTERNAL listener.\n\
         interface = \"{}\"\nsnat_ports = \"{SNAT_PORTS}\"\nmanage_sysctls = true\n",
        topo.gateway_interfaces()[0]
    );
    for (i, b) in topo.backend_addrs().iter().enumerate() {
        text += &format!("\n[[frontend]]\nport = {}\nbackends = [\"{b}:{BACKEND_PORT}\"]\n", 9093 + i);
    }
    text
}

fn kpf_cli(kpf: &Kpf, args: &[&str]) -> Result<String> {
    let out = Command::new(kpf_binary()?).args(args).arg("--socket").arg(kpf.socket()).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "kpf {}: {text}", args.join(" "));
    Ok(text)
}

fn in_client<T: Send>(client: &Netns, f: impl FnOnce() -> std::io::Result<T> + Send) -> Result<T> {
    Ok(client.enter(f)??)
}

pub fn run(opts: Options) -> Result<()> {
    if !is_root() {
        bail!("the demo creates network namespaces and loads an XDP program: run it as root");
    }
    let mode = match opts.mode.as_str() {
        "native" => Mode::Native,
        "generic" => Mode::Generic,
        other => bail!("unknown mode {other:?}: native or generic"),
    };
    util::run(cargo().args(["build", "--release", "-p", "kpf"]))?;
    for name in kpf_tests::netns::sweep_stale()? {
        println!("removed namespace {name} left by an earlier, killed run");
    }

    println!("\n== topology: client -- switch -- gateway (kpf, one NIC) -- switch -- b1 b2 b3");
    let topo = OneNic::new().context("building the namespace topology")?;
    let _servers: Vec<Backend> = topo
        .backends()
        .iter()
        .zip(BACKEND_NAMES)
        .map(|(ns, name)| Backend::new(ns, name))
        .collect::<std::io::Result<_>>()?;
    println!("client {}, gateway {}, backends {:?} on port {BACKEND_PORT}", topo.client_addr(), topo.frontend_addr(), topo.backend_addrs());

    let cfg = config(&topo);
    println!("\n== kpf config\n{cfg}");
    let kpf = Kpf::start(topo.gateway(), &cfg, mode).context("starting kpf")?;
    println!("kpf is running ({mode} XDP on {})", topo.gateway_interfaces()[0]);

    let frontend = |port: u16| SocketAddr::V4(SocketAddrV4::new(topo.frontend_addr(), port));
    println!("\n== who answers on each gateway port (5 new connections each)");
    println!("{:<22} {:<12} {:<12} result", "gateway port", "expected", "reached");
    let mut wrong = 0;
    for (i, expected) in BACKEND_NAMES.iter().enumerate() {
        let port = 9093 + i as u16;
        for _ in 0..5 {
            let got = in_client(topo.client(), || who(frontend(port)))?;
            if got != *expected {
                wrong += 1;
            }
            println!("{:<22} {:<12} {:<12} {}", frontend(port), expected, got, if got == *expected { "ok" } else { "WRONG" });
        }
    }

    println!("\n== bulk: {} MiB each way through each port, verified by hash on both ends", opts.bytes >> 20);
    for (i, expected) in BACKEND_NAMES.iter().enumerate() {
        let port = 9093 + i as u16;
        let started = Instant::now();
        let r = in_client(topo.client(), || stream(frontend(port), 1000 + i as u64, opts.bytes))?;
        println!(
            "{} -> {}: {} MiB sent, {} MiB received, {:.2} Gbit/s each way, {:.2}s, backend says {}",
            frontend(port),
            r.identity,
            r.sent >> 20,
            r.received >> 20,
            r.gbit_per_s(),
            started.elapsed().as_secs_f64(),
            r.verdict.split_whitespace().next().unwrap_or("?"),
        );
        ensure!(r.identity == *expected, "port {port} reached {} instead of {expected}", r.identity);
    }

    println!("\n== live change, no restart: `kpf map set 9095 {}:{BACKEND_PORT}`", topo.backend_addrs()[0]);
    let b1 = format!("{}:{BACKEND_PORT}", topo.backend_addrs()[0]);
    print!("{}", kpf_cli(&kpf, &["map", "set", "9095", &b1])?);
    let got = in_client(topo.client(), || who(frontend(9095)))?;
    println!("a new connection to port 9095 now reaches {got}");
    ensure!(got == BACKEND_NAMES[0], "after `map set`, 9095 reached {got}");
    let b3 = format!("{}:{BACKEND_PORT}", topo.backend_addrs()[2]);
    print!("{}", kpf_cli(&kpf, &["map", "set", "9095", &b3])?);

    println!("\n== kpf status");
    print!("{}", kpf_cli(&kpf, &["status"])?);

    let stopped = kpf.stop();
    println!("\n== kpf stopped ({}); its log:", stopped.status);
    for line in stopped.log.lines() {
        println!("  {line}");
    }
    drop(topo);
    ensure!(wrong == 0, "{wrong} connection(s) reached the wrong backend");
    println!("\nall namespaces removed. Every port reached its own broker.");
    Ok(())
}
