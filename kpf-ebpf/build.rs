// bpf-linker is an undeclared build dependency of the eBPF binary: rebuild when it changes.
fn main() {
    // By default bpf-linker has LLVM expand only memcpy inline; every memset and memmove (a
    // struct zeroed field by field, a MAC copied between two map values) became a BPF-to-BPF call
    // into a byte loop: 15 ns on the established path and most of those calls on the new-flow
    // path. Without the option LLVM expands them inline too (up to its usual size limit).
    println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found ({e}); run `cargo xtask setup`"),
    }
}
