//! The kernel programs' object file, embedded at build time (see `build.rs`).

/// The ELF object holding every program and map of `interceptor-ebpf`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor"));
