//! Shared helpers: paths, bounded command execution, mount lookups.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}

/// The cargo that runs us (`$CARGO`), else `cargo` from PATH.
pub fn cargo() -> PathBuf {
    std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("cargo"))
}

/// The workspace's target directory (honours CARGO_TARGET_DIR and config via `cargo metadata`).
pub fn target_dir() -> PathBuf {
    let out = Command::new(cargo())
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(workspace_root())
        .stderr(Stdio::null())
        .output();
    if let Ok(out) = out {
        if out.status.success() {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                if let Some(t) = v["target_directory"].as_str() {
                    return PathBuf::from(t);
                }
            }
        }
    }
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => workspace_root().join(d),
        None => workspace_root().join("target"),
    }
}

/// The release binaries the demo and the tests use.
pub struct Bins {
    pub interceptor: PathBuf,
    pub proxy: PathBuf,
    pub probe: PathBuf,
    pub exec: PathBuf,
}

impl Bins {
    /// The binaries in `target/release`; with `honor_env`, `$INTERCEPTOR_BIN` and
    /// `$INTERCEPTOR_PROXY_BIN` override the first two.
    pub fn locate(honor_env: bool) -> Bins {
        let rel = target_dir().join("release");
        let pick = |env: &str, name: &str| match std::env::var_os(env) {
            Some(p) if honor_env => PathBuf::from(p),
            _ => rel.join(name),
        };
        Bins {
            interceptor: pick("INTERCEPTOR_BIN", "interceptor"),
            proxy: pick("INTERCEPTOR_PROXY_BIN", "interceptor-proxy"),
            probe: rel.join("icpt-probe"),
            exec: rel.join("icpt-exec"),
        }
    }

    pub fn require(&self, p: &Path) -> Result<PathBuf> {
        if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            bail!("{} is not built (run `cargo xtask build`)", p.display())
        }
    }

    /// The interceptor binary, if it exists.
    pub fn interceptor_if_built(&self) -> Option<PathBuf> {
        self.interceptor.is_file().then(|| self.interceptor.clone())
    }
}

/// Runs a command with captured output, killing its process group after `timeout`.
pub fn run_capture(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    hostops::cmd::run_bounded(cmd, timeout).with_context(|| format!("cannot run {cmd:?}"))
}

/// Runs `prog args` (bounded by 60 s); error with stderr unless it succeeds.
pub fn run_ok(prog: &str, args: &[&str]) -> Result<String> {
    Ok(hostops::cmd::run_ok(prog, args, Duration::from_secs(60))?)
}

/// The cgroup2 mount point (e.g. /sys/fs/cgroup/unified on hybrid hosts).
pub fn cgroup2_root() -> Result<PathBuf> {
    Ok(hostops::mounts::cgroup2_root()?)
}

pub use hostops::mounts::{bpffs_mounted, BPFFS};

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}
