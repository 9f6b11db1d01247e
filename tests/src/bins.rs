//! Where the binaries under test and the helper binaries are.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static HELPERS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();

/// The workspace root (parent of this crate's manifest dir, fixed at compile time).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub(crate) fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_dir().join(d)
            }
        }
        None => workspace_dir().join("target"),
    }
}

/// Directory holding the running test binary's sibling executables:
/// `target/<profile>/deps/<test>` -> `target/<profile>`.
fn profile_dir_of_current_exe() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

fn find_bin(env: &str, name: &str, prefer_current_profile: bool) -> PathBuf {
    try_find_bin(env, name, prefer_current_profile).unwrap_or_else(|msg| panic!("{msg}"))
}

fn try_find_bin(env: &str, name: &str, prefer_current_profile: bool) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(format!(
                "{env}={} does not exist (unset it or build the binary)",
                p.display()
            ));
        }
        return Ok(p);
    }
    let mut candidates = Vec::new();
    if prefer_current_profile {
        candidates.extend(profile_dir_of_current_exe().map(|d| d.join(name)));
    }
    candidates.push(target_dir().join("release").join(name));
    candidates.push(target_dir().join("debug").join(name));
    if !prefer_current_profile {
        candidates.extend(profile_dir_of_current_exe().map(|d| d.join(name)));
    }
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    Err(format!(
        "binary `{name}` not found: set {env}, or build it (`cargo build --release`, or `cargo xtask build`); looked in {}",
        candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
    ))
}

/// The interceptor CLI if it can be found; never panics (for use in Drop).
pub(crate) fn try_interceptor_bin() -> Option<PathBuf> {
    try_find_bin("INTERCEPTOR_BIN", "interceptor", false).ok()
}

/// `interceptor` CLI: `$INTERCEPTOR_BIN`, else `target/release`, else `target/debug`.
pub fn interceptor_bin() -> PathBuf {
    find_bin("INTERCEPTOR_BIN", "interceptor", false)
}

/// `interceptor-proxy`: `$INTERCEPTOR_PROXY_BIN`, else `target/release`, else `target/debug`.
pub fn proxy_bin() -> PathBuf {
    find_bin("INTERCEPTOR_PROXY_BIN", "interceptor-proxy", false)
}

/// `icpt-probe`: registered by [`register_helper_bins!`](crate::register_helper_bins),
/// else `$ICPT_PROBE_BIN`, else next to the running test binary.
pub fn probe_bin() -> PathBuf {
    match HELPERS.get() {
        Some((p, _)) => p.clone(),
        None => find_bin("ICPT_PROBE_BIN", "icpt-probe", true),
    }
}

/// `icpt-exec`: registered, else `$ICPT_EXEC_BIN`, else next to the running test binary.
pub fn exec_bin() -> PathBuf {
    match HELPERS.get() {
        Some((_, e)) => e.clone(),
        None => find_bin("ICPT_EXEC_BIN", "icpt-exec", true),
    }
}

/// Records the helper binaries' paths (use the `register_helper_bins!` macro).
pub fn set_helper_bins(probe: &str, exec: &str) {
    let _ = HELPERS.set((PathBuf::from(probe), PathBuf::from(exec)));
}
