//! Builds the XDP program (kpf-ebpf) for the BPF target with nightly + bpf-linker, into OUT_DIR,
//! where src/loader.rs embeds it. `cargo xtask setup` installs that toolchain.
fn main() -> anyhow::Result<()> {
    let ebpf_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../kpf-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package { name: "kpf-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
