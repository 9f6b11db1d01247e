//! The mount table (`/proc/self/mountinfo`).

use std::io;
use std::path::{Path, PathBuf};

/// Where bpffs is expected.
pub const BPFFS: &str = "/sys/fs/bpf";

/// `/proc/self/mountinfo`.
pub fn mountinfo() -> io::Result<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
}

/// (mount point, filesystem type) of each line of mountinfo text, in order.
pub fn mounts(mountinfo: &str) -> impl Iterator<Item = (PathBuf, &str)> {
    mountinfo.lines().filter_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let ty = post.split_whitespace().next()?;
        let mp = pre.split_whitespace().nth(4)?;
        Some((PathBuf::from(unescape(mp)), ty))
    })
}

/// The first mount point of filesystem type `fstype`.
pub fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mounts(mountinfo)
        .find(|(_, t)| *t == fstype)
        .map(|(p, _)| p)
}

/// The filesystem type mounted at `path` (the last mount there hides the earlier ones).
pub fn mount_type_at(mountinfo: &str, path: &Path) -> Option<String> {
    mounts(mountinfo)
        .filter(|(p, _)| p == path)
        .last()
        .map(|(_, t)| t.to_string())
}

/// The cgroup2 mount point (`/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` on
/// pure v2 ones).
pub fn cgroup2_root() -> io::Result<PathBuf> {
    find_mount(&mountinfo()?, "cgroup2").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 filesystem is mounted (see /proc/self/mountinfo)",
        )
    })
}

/// Whether bpffs is mounted at [`BPFFS`].
pub fn bpffs_mounted() -> bool {
    mountinfo().is_ok_and(|mi| mount_type_at(&mi, Path::new(BPFFS)).as_deref() == Some("bpf"))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let mi = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                  50 23 0:40 / /sys/fs/b\\040pf rw - bpf bpf rw\n\
                  51 23 0:41 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_mount(mi, "cgroup2").unwrap(),
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        assert_eq!(
            find_mount(mi, "bpf").unwrap(),
            PathBuf::from("/sys/fs/b pf")
        );
        assert_eq!(
            mount_type_at(mi, Path::new("/sys/fs/cgroup")).as_deref(),
            Some("cgroup2")
        );
        assert_eq!(mount_type_at(mi, Path::new("/nope")), None);
    }
}
