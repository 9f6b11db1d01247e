//! Builds the kernel programs (`interceptor-ebpf`) with aya-build and leaves the object in
//! OUT_DIR, where `src/object.rs` embeds it. With AYA_BUILD_SKIP=1 (for `cargo check` or
//! clippy on a machine without bpf-linker) an empty object is embedded instead and loading
//! fails at run time with a message that says so.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("interceptor");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../interceptor-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "interceptor-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )?;
    if skip && !object.exists() {
        fs::write(&object, b"")?;
    }
    Ok(())
}
