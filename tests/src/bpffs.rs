//! bpffs pin directories and `bpftool` queries.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::names::{bounded_name, NAME_MAX};
use crate::util::{leaked, run_cmd_ok};

/// Where bpffs is (or will be) mounted.
pub const BPFFS_ROOT: &str = hostops::mounts::BPFFS;

pub use hostops::mounts::bpffs_mounted;

/// Mounts bpffs at /sys/fs/bpf unless it is already there. Panics on failure.
pub fn ensure_bpffs() {
    if !bpffs_mounted() {
        run_cmd_ok("mount", &["-t", "bpf", "bpf", BPFFS_ROOT]);
    }
}

/// A pin directory `/sys/fs/bpf/icpt-t-<test>` to pass as `--pin-dir`.
///
/// `new` mounts bpffs if needed and removes a stale directory of that name; it
/// does not create the directory (the interceptor creates what it owns; call
/// [`create`](Self::create) to have it exist beforehand).
///
/// Drop: runs `$INTERCEPTOR_BIN --pin-dir DIR detach --all` (errors ignored,
/// skipped if the binary cannot be found), then removes the directory tree.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new(test: &str) -> PinDir {
        crate::names::hold_run_lock();
        ensure_bpffs();
        let path = Path::new(BPFFS_ROOT).join(bounded_name(test, NAME_MAX));
        destroy_pin_dir(&path).unwrap_or_else(|e| panic!("stale pin dir of an earlier run: {e}"));
        PinDir { path }
    }

    /// Creates the (empty) directory now.
    pub fn create(&self) {
        fs::create_dir_all(&self.path)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", self.path.display()));
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path as a `&str`, handy for command arguments.
    pub fn as_str(&self) -> &str {
        self.path.to_str().expect("pin dir path is UTF-8")
    }

    /// Every file pinned below the directory, relative to it, sorted.
    pub fn pinned(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        collect_files(&self.path, &self.path, &mut out, 0);
        out.sort();
        out
    }
}

fn collect_files(base: &Path, dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            if depth < 16 {
                collect_files(base, &p, out, depth + 1);
            }
        } else {
            out.push(p.strip_prefix(base).unwrap_or(&p).to_path_buf());
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = destroy_pin_dir(&self.path) {
            leaked(e);
        }
    }
}

/// Detach everything recorded in `dir` with the interceptor CLI (when it can be found), then
/// remove it.
pub(crate) fn destroy_pin_dir(dir: &Path) -> Result<(), hostops::Leftover> {
    hostops::pins::remove(dir, crate::bins::try_interceptor_bin().as_deref())
}

/// One program attached to a cgroup, as `bpftool --json cgroup show` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AttachedProg {
    pub id: u64,
    /// e.g. `cgroup_inet4_connect`, `sock_ops`, `cgroup_getsockopt`.
    pub attach_type: String,
    /// e.g. `""`, `"multi"`, `"override"`.
    #[serde(default)]
    pub attach_flags: String,
    #[serde(default)]
    pub name: String,
}

/// Programs attached directly to `cgroup` (`bpftool --json cgroup show PATH`).
pub fn bpftool_cgroup_progs(cgroup: &Path) -> Vec<AttachedProg> {
    bpftool_cgroup(cgroup, false)
}

/// Programs in effect for `cgroup`, including those inherited from ancestors
/// (`bpftool --json cgroup show PATH effective`).
pub fn bpftool_cgroup_progs_effective(cgroup: &Path) -> Vec<AttachedProg> {
    bpftool_cgroup(cgroup, true)
}

fn bpftool_cgroup(cgroup: &Path, effective: bool) -> Vec<AttachedProg> {
    let path = cgroup.to_str().expect("cgroup path is UTF-8");
    let mut args = vec!["--json", "cgroup", "show", path];
    if effective {
        args.push("effective");
    }
    let out = run_cmd_ok("bpftool", &args);
    if out.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!(
            "cannot parse `bpftool {}` output ({e}): {out}",
            args.join(" ")
        )
    })
}
