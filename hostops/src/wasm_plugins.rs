//! The Wasm routing plugin fixtures (`tests/wasm-plugins`, built with the proxy-wasm Rust SDK
//! for `wasm32-wasip1`), for the proxy's tests, the end-to-end tests and the bench: built
//! once per process (cargo rebuilds only what changed).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The fixtures' workspace.
pub fn plugins_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/wasm-plugins")
}

/// The path of fixture `name` (`router`, `trap`, `spin`, `hog`, `noop`), built first.
/// Panics if the build fails (the message says what to install).
pub fn plugin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let dir = plugins_dir();
    BUILT.get_or_init(|| {
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip1",
                "--manifest-path",
            ])
            .arg(dir.join("Cargo.toml"))
            // Not the test binary's own target dir or flags.
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET")
            .output()
            .expect("cargo runs");
        assert!(
            out.status.success(),
            "building the Wasm plugin fixtures failed (is the wasm32-wasip1 target installed? \
             `rustup target add wasm32-wasip1`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let p = dir.join(format!("target/wasm32-wasip1/release/plugin_{name}.wasm"));
    assert!(p.is_file(), "{} missing after the build", p.display());
    p
}
