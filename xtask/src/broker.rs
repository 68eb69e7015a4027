//! The Kafka-compatible broker the Kafka end-to-end test runs (crabka 0.3.8; Apache Kafka
//! cannot be downloaded on these machines). Its crates are yanked on crates.io, so only a
//! lockfile naming them fetches them: `../shared/kafka-broker/` holds that seed. Built once,
//! cached outside the repository (a cold build takes ~11 minutes), reused after.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kpf_tests::workspace_root;

use crate::util;

const BINARIES: [&str; 2] = ["crabka-broker", "crabka"];

fn seed_dir() -> PathBuf {
    workspace_root().join("../shared/kafka-broker")
}

/// Builds the broker and its CLI into the cache unless they are there already.
pub fn ensure() -> Result<()> {
    let bin = kpf_tests::kafka::crabka_cache_bin_dir();
    if BINARIES.iter().all(|b| bin.join(b).is_file()) {
        println!("setup: kafka broker: present in {}", bin.display());
        return Ok(());
    }
    let seed = seed_dir();
    if !seed.join("Cargo.lock").is_file() {
        bail!(
            "the Kafka end-to-end test needs crabka, built from the seed in {} (missing); \
             put shared/ beside the repository",
            seed.display()
        );
    }
    println!("setup: kafka broker: building crabka 0.3.8 into {} (about 11 minutes, once)", bin.display());
    let work = bin.parent().expect("bin has a parent").to_owned();
    let project = work.join("seed");
    std::fs::create_dir_all(project.join("src"))?;
    for f in ["Cargo.toml", "Cargo.lock", "src/main.rs"] {
        let mut text = std::fs::read(seed.join(f)).with_context(|| format!("reading the seed's {f}"))?;
        if f == "Cargo.toml" && !String::from_utf8_lossy(&text).contains("[workspace]") {
            // A cache directory inside this repository (a relative KPF_CACHE_DIR) would otherwise
            // make cargo take the seed for a stray member of kpf's workspace.
            text.extend_from_slice(b"\n[workspace]\n");
        }
        // Written afresh, not copied: the seed's files are read-only, and a copy keeps that mode,
        // so a retry after a failed build could not overwrite them.
        let dst = project.join(f);
        let _ = std::fs::remove_file(&dst);
        std::fs::write(&dst, text).with_context(|| format!("writing the seed's {f} to {}", dst.display()))?;
    }
    // The seed's lockfile is what makes cargo fetch the yanked crates into the registry.
    util::run(util::cargo().arg("fetch").current_dir(&project))?;
    let target = work.join("target");
    for (package, bin_flag) in [("crabka-broker", Some("crabka-broker")), ("crabka-cli", None)] {
        let src = registry_source(package)?;
        let mut cmd = util::cargo();
        cmd.args(["build", "--release", "--locked", "--ignore-rust-version", "--target-dir"]).arg(&target);
        if let Some(b) = bin_flag {
            cmd.args(["--bin", b]);
        }
        util::run(cmd.current_dir(&src))?;
    }
    std::fs::create_dir_all(&bin)?;
    for b in BINARIES {
        std::fs::copy(target.join("release").join(b), bin.join(b)).with_context(|| format!("installing {b}"))?;
    }
    println!("setup: kafka broker: installed {}", BINARIES.join(", "));
    Ok(())
}

/// The unpacked source of `package`-0.3.8 in cargo's registry.
fn registry_source(package: &str) -> Result<PathBuf> {
    let home = std::env::var_os("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(&std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
    });
    let src = home.join("registry/src");
    for index in std::fs::read_dir(&src).with_context(|| format!("reading {}", src.display()))? {
        let dir = index?.path().join(format!("{package}-0.3.8"));
        if dir.join("Cargo.lock").is_file() {
            return Ok(dir);
        }
    }
    bail!("{package}-0.3.8 is not in {} after `cargo fetch`", src.display())
}
