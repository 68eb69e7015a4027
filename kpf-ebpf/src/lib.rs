#![no_std]
// Present so that kpf-userspace can name this crate as a build dependency (aya-build builds the
// binary target for the BPF target); the program itself is src/main.rs.
