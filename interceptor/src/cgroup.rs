//! Finding the cgroup2 mount and resolving the cgroups that scopes name.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

static MOUNT_OVERRIDE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes [`cgroup2_mount`] return `path` for the rest of the process: for a daemon in a
/// container whose own cgroup2 mount is its private cgroup namespace's view, with the host's
/// hierarchy mounted elsewhere (`cgroup2_mount` in the daemon's config). First call wins.
pub fn set_cgroup2_mount(path: PathBuf) {
    let _ = MOUNT_OVERRIDE.set(path);
}

/// The cgroup2 mount point, read from /proc/self/mountinfo (never assumed), unless
/// [`set_cgroup2_mount`] named another.
pub fn cgroup2_mount() -> Result<PathBuf> {
    if let Some(p) = MOUNT_OVERRIDE.get() {
        return Ok(p.clone());
    }
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))?;
    parse_cgroup2_mount(&info).ok_or(Error::NoCgroup2)
}

/// Finds the first cgroup2 mount point in the text of a mountinfo file.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let oct = &s[i + 1..i + 4];
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup a scope is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    /// Absolute, canonical path.
    pub path: PathBuf,
    /// The cgroup id: the inode number of its directory (what `bpf_get_current_cgroup_id` returns).
    pub id: u64,
}

/// Checks that `path` is an existing directory of the cgroup2 filesystem and returns it with
/// its id.
pub fn resolve(path: &Path) -> Result<Cgroup> {
    let mount = cgroup2_mount()?;
    let canonical = match fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::CgroupMissing { path: path.into() })
        }
        Err(e) => return Err(Error::io(format!("cgroup {}", path.display()), e)),
    };
    let meta =
        fs::metadata(&canonical).map_err(|e| Error::io(format!("cgroup {}", path.display()), e))?;
    let on_cgroup2 = nix::sys::statfs::statfs(&canonical)
        .map(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false);
    if !meta.is_dir() || !on_cgroup2 || !canonical.starts_with(&mount) {
        return Err(Error::NotCgroup2 {
            path: path.into(),
            mount,
        });
    }
    Ok(Cgroup {
        path: canonical,
        id: meta.ino(),
    })
}

/// Opens a cgroup directory for attaching.
pub fn open_dir(path: &Path) -> Result<fs::File> {
    fs::File::open(path).map_err(|e| Error::io(format!("opening cgroup {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mount() {
        let info = "22 1 0:21 / /proc rw - proc proc rw\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_cgroup2_mount("22 1 0:21 / /proc rw - proc proc rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_spaces() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
