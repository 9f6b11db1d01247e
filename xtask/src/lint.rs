//! `cargo xtask lint`: the gate CI runs before the tests.
//!
//! 1. `cargo fmt --all -- --check`;
//! 2. clippy with warnings as errors on every host crate and target (`--workspace
//!    --all-targets`, the eBPF crate excluded), with the lints of `[workspace.lints]`;
//! 3. clippy on the eBPF crate for its own target (`bpfel-unknown-none`, nightly,
//!    `-Z build-std=core`), warnings as errors;
//! 4. `cargo deny check licenses bans sources` against `deny.toml` (licences compatible with
//!    MIT OR Apache-2.0, no git or unknown registries). The advisory database needs the
//!    network, which CI does not have, so `advisories` is not checked here;
//! 5. no import circle between the modules of any crate ([`crate::import_cycles`]).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

use crate::import_cycles::crate_cycles;
use crate::util::{cargo, workspace_root};

/// The cargo-deny release the lint step installs and runs.
pub const CARGO_DENY_VERSION: &str = "0.20.2";

pub fn lint() -> Result<()> {
    let ws = workspace_root();
    let mut failed = Vec::new();
    let mut step = |name: &'static str, cmd: &mut Command| {
        println!("lint: {name}");
        let ok = cmd.current_dir(&ws).status().is_ok_and(|s| s.success());
        println!("lint: {name}: {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            failed.push(name);
        }
    };
    step(
        "cargo fmt --check",
        Command::new(cargo()).args(["fmt", "--all", "--", "--check"]),
    );
    step(
        "clippy (host crates)",
        Command::new(cargo()).args([
            "clippy",
            "--workspace",
            "--exclude",
            "interceptor-ebpf",
            "--all-targets",
            "--release",
            "--",
            "-D",
            "warnings",
        ]),
    );
    step(
        "clippy (eBPF crate, bpfel-unknown-none)",
        Command::new("cargo").args([
            "+nightly",
            "clippy",
            "-p",
            "interceptor-ebpf",
            "-Z",
            "build-std=core",
            "--target",
            "bpfel-unknown-none",
            "--release",
            "--",
            "-D",
            "warnings",
        ]),
    );
    step(
        "cargo deny check licenses bans sources",
        Command::new(cargo()).args(["deny", "check", "licenses", "bans", "sources"]),
    );
    println!("lint: import circles");
    let circles = import_circles(&ws)?;
    for c in &circles {
        println!("  {c}");
    }
    println!(
        "lint: import circles: {}",
        if circles.is_empty() { "ok" } else { "FAILED" }
    );
    if !circles.is_empty() {
        failed.push("import circles");
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join(", "));
    }
    println!("lint: all passed");
    Ok(())
}

/// The import circles of every crate in the workspace (a directory with a `Cargo.toml` and a
/// `src/`), each prefixed with its crate's directory.
fn import_circles(ws: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut dirs: Vec<_> = std::fs::read_dir(ws)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|d| d.join("Cargo.toml").is_file() && d.join("src").is_dir())
        .collect();
    dirs.sort();
    for d in dirs {
        let name = d
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        for c in crate_cycles(&d.join("src"))? {
            out.push(format!("{name}: {c}"));
        }
    }
    Ok(out)
}
