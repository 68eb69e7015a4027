//! `cargo xtask setup`: installs, idempotently, what building and testing kpf needs. Every item
//! is checked first; only what is missing is installed.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};
use clap::Args;

use crate::util::{self, cargo_bin_dir, path_with_prefix, probe};

/// Debian packages: LLVM 22 for bpf-linker (polly, zstd, zlib for linking it), and the tools
/// the integration tests and benchmarks drive.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "ethtool",
    "iperf3",
    "sockperf",
    "haproxy",
    "nftables",
    "hping3",
    "tcpdump",
    "bpftool",
    // A virtualenv for the Kafka client (kafka_client.rs installs it from PyPI).
    "python3-venv",
    // A C++ standard library to link bpf-linker against LLVM (llvm-22-dev does not pull one in),
    // and a C compiler for the broker's dependencies.
    "g++",
    // sysctl, which the namespace tests call.
    "procps",
];

/// The bpf-linker release setup installs: its llvm-22 feature matches LLVM_PREFIX, and it has
/// BPF_LINKER_FLAG. Pinned (with its lockfile) so that a fresh machine builds what CI built.
const BPF_LINKER_VERSION: &str = "0.13.0";

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Undated on purpose: a dated nightly cannot be fetched on the CI machines.
const NIGHTLY: &str = "nightly";

#[derive(Args)]
pub struct Options {
    /// Skip what only the Kafka test and benchmark need: the Kafka-compatible broker (built from
    /// source, ~11 minutes) and the Python Kafka client (from PyPI).
    #[arg(long, alias = "no-broker")]
    pub no_kafka: bool,
}

pub fn run(opts: Options) -> Result<()> {
    apt_packages()?;
    nightly()?;
    bpf_linker()?;
    if !opts.no_kafka {
        crate::kafka_client::ensure()?;
        crate::broker::ensure()?;
    }
    println!("setup: done");
    Ok(())
}

fn apt_installed(pkg: &str) -> bool {
    probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !apt_installed(p))
        .collect();
    if missing.is_empty() {
        println!(
            "setup: apt packages: all present ({})",
            APT_PACKAGES.join(" ")
        );
        return Ok(());
    }
    println!("setup: apt packages: missing {}", missing.join(" "));
    if !util::is_root() {
        bail!(
            "installing apt packages needs root; run `cargo xtask setup` as root, or install them \
             yourself: apt-get install {}",
            missing.join(" ")
        );
    }
    let apt = || {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    util::run(apt().args(["update"]))?;
    util::run(apt().args(["install", "-y"]).args(&missing))?;
    Ok(())
}

fn nightly() -> Result<()> {
    if probe(Command::new("rustup").arg("--version")).is_none() {
        bail!("rustup not found in PATH; kpf-ebpf needs rustup with a `{NIGHTLY}` toolchain");
    }
    if let Some(v) = probe(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--version"])) {
        println!("setup: {NIGHTLY} toolchain: present ({})", v.trim());
    } else {
        println!("setup: {NIGHTLY} toolchain: missing, installing");
        util::run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    let components = probe(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        NIGHTLY,
        "--installed",
    ]))
    .unwrap_or_default();
    if components
        .lines()
        .any(|l| l.trim() == "rust-src" || l.trim().starts_with("rust-src-"))
    {
        println!("setup: rust-src ({NIGHTLY}): present");
    } else {
        println!("setup: rust-src ({NIGHTLY}): missing, installing");
        util::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
    }
    // rustc emits LLVM bitcode that bpf-linker (built against LLVM 22) links: a nightly on
    // another LLVM major fails later, in the BPF build, with a bitcode error.
    let verbose = probe(Command::new("rustup").args(["run", NIGHTLY, "rustc", "-vV"])).unwrap_or_default();
    let llvm = verbose.lines().find_map(|l| l.strip_prefix("LLVM version: ")).unwrap_or("unknown");
    if !llvm.starts_with("22.") {
        bail!(
            "the {NIGHTLY} toolchain uses LLVM {llvm}, but bpf-linker here is built against LLVM 22 \
             (Debian's llvm-22-dev): install a nightly on LLVM 22"
        );
    }
    println!("setup: {NIGHTLY} uses LLVM {llvm}, as bpf-linker does");
    Ok(())
}

fn bpf_linker_version(program: &Path) -> Option<String> {
    probe(Command::new(program).arg("--version")).map(|v| v.trim().to_owned())
}

/// A flag kpf-ebpf's build script passes (it keeps small memset/memmove inline instead of calls
/// to out-of-line copies); bpf-linker releases without it cannot link kpf.
const BPF_LINKER_FLAG: &str = "--disable-expand-memcpy-in-order";

fn bpf_linker_has_flag(program: &Path) -> bool {
    probe(Command::new(program).arg("--help")).is_some_and(|h| h.contains(BPF_LINKER_FLAG))
}

fn bpf_linker() -> Result<()> {
    let mut outdated = false;
    if let Some(v) = bpf_linker_version(Path::new("bpf-linker")) {
        if bpf_linker_has_flag(Path::new("bpf-linker")) {
            println!("setup: bpf-linker: present ({v})");
            return Ok(());
        }
        println!("setup: bpf-linker: present ({v}) but without {BPF_LINKER_FLAG}: upgrading");
        outdated = true;
    }
    let bin_dir = cargo_bin_dir();
    if !outdated
        && let Some(dir) = &bin_dir
        && let Some(v) = bpf_linker_version(&dir.join("bpf-linker"))
        && bpf_linker_has_flag(&dir.join("bpf-linker"))
    {
        println!(
            "setup: bpf-linker: present ({v}) in {}, which is not on PATH; add it to PATH \
             (e.g. `. ~/.cargo/env`) before building kpf",
            dir.display()
        );
        return Ok(());
    }
    if !outdated {
        println!("setup: bpf-linker: missing, installing (builds against LLVM 22; takes a few minutes)");
    }
    let llvm_bin = Path::new(LLVM_PREFIX).join("bin");
    util::run(
        Command::new("cargo")
            .args([
                "install",
                "--force",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("PATH", path_with_prefix(&llvm_bin)?),
    )?;
    if bpf_linker_version(Path::new("bpf-linker")).is_none() {
        println!(
            "setup: note: bpf-linker was installed into {} which is not on PATH; add it before \
             building kpf",
            bin_dir.map_or_else(|| "~/.cargo/bin".to_owned(), |d| d.display().to_string())
        );
    } else if !bpf_linker_has_flag(Path::new("bpf-linker")) {
        // An older one earlier on PATH shadows the one just installed.
        let found = probe(Command::new("sh").args(["-c", "command -v bpf-linker"])).unwrap_or_default();
        bail!(
            "bpf-linker {BPF_LINKER_VERSION} was installed into {}, but the bpf-linker first on PATH ({}) \
             lacks {BPF_LINKER_FLAG}: remove it or put the new one first",
            bin_dir.map_or_else(|| "~/.cargo/bin".to_owned(), |d| d.display().to_string()),
            found.trim()
        );
    }
    Ok(())
}
