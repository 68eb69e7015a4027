//! The Kafka client the Kafka end-to-end test and the bench's Kafka scenario drive: confluent-kafka
//! pinned at [`CLIENT_VERSION`], from PyPI into a virtualenv in the cache (its wheel bundles
//! librdkafka). Debian's python3-confluent-kafka is librdkafka 2.0, whose consumer idles for up to
//! a second each time a fast path fills its prefetch queue, so the bench would measure the client.

use std::process::Command;

use anyhow::{Result, bail};
use kpf_tests::kafka::{CLIENT_VERSION, client_dir, client_version, python};

use crate::util;

/// Debian's Python (python3-venv is an apt package of setup's): the `python3` on PATH may be a
/// pyenv or conda one that another user's shell set up.
const BASE_PYTHON: &str = "/usr/bin/python3";

/// Installs the pinned client unless the virtualenv already has it.
pub fn ensure() -> Result<()> {
    let dir = client_dir();
    let python = python();
    match client_version(&python) {
        Ok(v) if v.package == CLIENT_VERSION => {
            println!("setup: kafka client: confluent-kafka {} present in {}", v.package, dir.display());
            return Ok(());
        }
        Ok(v) => {
            println!("setup: kafka client: confluent-kafka {} in {}, installing {CLIENT_VERSION}", v.package, dir.display())
        }
        Err(_) => {
            println!("setup: kafka client: missing, creating a virtualenv in {}", dir.display());
            // --clear: a half-made virtualenv from an interrupted setup is started over.
            util::run(Command::new(BASE_PYTHON).args(["-m", "venv", "--clear"]).arg(&dir))?;
        }
    }
    util::run(
        Command::new(&python)
            // A wheel or nothing: building from source would need librdkafka's own headers and
            // fail with a compiler error instead of saying that no wheel fits this machine.
            .args(["-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--only-binary=confluent-kafka"])
            .arg(format!("confluent-kafka=={CLIENT_VERSION}")),
    )?;
    match client_version(&python) {
        Ok(v) if v.package == CLIENT_VERSION => {
            println!("setup: kafka client: installed confluent-kafka {} (librdkafka {})", v.package, v.librdkafka);
            Ok(())
        }
        Ok(v) => bail!("after installing confluent-kafka {CLIENT_VERSION}, {} imports {}", python.display(), v.package),
        Err(e) => bail!("after installing confluent-kafka {CLIENT_VERSION}: {e}"),
    }
}
