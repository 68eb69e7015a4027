//! Shared between the kernel program (`kpf-ebpf`) and userspace (`kpf`).
//!
//! Everything that decides what happens to a packet lives here as plain functions, so that the
//! kernel runs the same code that `cargo test` checks without a kernel.
//!
//! Byte order: every address and port stored in a map type is in *wire order* (the bytes as they
//! sit in the packet, read with `from_ne_bytes`). The kernel then copies them without swapping;
//! userspace converts with the helpers in [`wire`].
#![no_std]

pub mod csum;
pub mod maps;
pub mod nat;
pub mod select;
pub mod seq;
pub mod snat;
pub mod tcp;
pub mod wire;

pub use maps::*;
