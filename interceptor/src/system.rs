//! Checks on the host: privileges and the bpf filesystem.
use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;
/// Where bpffs is conventionally mounted; the only place the loader mounts it itself.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// Fails with `NotPrivileged` unless this process may load and attach cgroup programs.
pub fn check_privileges() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status")
        .map_err(|e| Error::io("reading /proc/self/status", e))?;
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |c: u32| caps & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_NET_ADMIN)) {
        Ok(())
    } else {
        Err(Error::NotPrivileged)
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Makes sure `pin_dir` can be created on a bpf filesystem, mounting bpffs at /sys/fs/bpf
/// when that is where it belongs and nothing is mounted there. Does not create `pin_dir`.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let pin_err = |reason: String| Error::PinDir {
        path: pin_dir.into(),
        reason,
    };
    if !pin_dir.is_absolute() {
        return Err(pin_err(
            "must be an absolute path under a bpf filesystem such as /sys/fs/bpf".into(),
        ));
    }
    // The nearest existing ancestor tells which filesystem the directory would be on.
    let existing: PathBuf = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    if is_bpffs(&existing) {
        return Ok(());
    }
    let mount = Path::new(BPFFS_MOUNT);
    if pin_dir.starts_with(mount) && existing == mount {
        nix::mount::mount(
            Some("bpf"),
            mount,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| {
            pin_err(format!(
                "no bpf filesystem is mounted at {BPFFS_MOUNT} and mounting one failed ({e}); mount it with `mount -t bpf bpf {BPFFS_MOUNT}`"
            ))
        })?;
        tracing::info!(mount = BPFFS_MOUNT, "mounted bpffs");
        return Ok(());
    }
    Err(pin_err(format!(
        "{} is not on a bpf filesystem; choose a pin directory under {BPFFS_MOUNT} (mount it with `mount -t bpf bpf {BPFFS_MOUNT}`)",
        existing.display()
    )))
}

/// Whether the pin directory exists on a bpf filesystem.
pub fn pin_dir_present(pin_dir: &Path) -> bool {
    pin_dir.is_dir() && is_bpffs(pin_dir)
}
