//! cgroup v2 test cgroups.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::names::{bounded_name, NAME_MAX};
use crate::util::wait_until;

/// Mount point of the cgroup2 hierarchy, read from `/proc/self/mountinfo`
/// (it is `/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` on pure v2).
/// Panics if no cgroup2 is mounted.
pub fn cgroup2_root() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let info = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
        find_mount(&info, "cgroup2").unwrap_or_else(|| {
            panic!("no cgroup2 filesystem is mounted (see /proc/self/mountinfo)")
        })
    })
    .clone()
}

/// First mount point whose filesystem type is `fstype` in mountinfo text.
pub(crate) fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let ty = post.split_whitespace().next()?;
        let mp = pre.split_whitespace().nth(4)?;
        (ty == fstype).then(|| PathBuf::from(unescape_mountinfo(mp)))
    })
}

pub(crate) fn mount_type_at(mountinfo: &str, path: &Path) -> Option<String> {
    // The last matching line wins (a later mount hides an earlier one).
    mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let ty = post.split_whitespace().next()?;
            let mp = pre.split_whitespace().nth(4)?;
            (Path::new(&unescape_mountinfo(mp)) == path).then(|| ty.to_string())
        })
        .next_back()
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup `<cgroup2 root>/icpt-t-<test>`. Processes join it with
/// [`add_pid`](Self::add_pid) or by being spawned with [`crate::spawn_in`].
///
/// Drop: writes `1` to `cgroup.kill`, waits (up to 5 s) for `cgroup.procs` to
/// empty, removes any child cgroups, then `rmdir`s it.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates the cgroup, first removing a stale one of the same name.
    pub fn new(test: &str) -> TestCgroup {
        crate::names::hold_run_lock();
        let path = cgroup2_root().join(bounded_name(test, NAME_MAX));
        if path.exists() {
            destroy_cgroup(&path);
        }
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        TestCgroup { path }
    }

    /// Creates a child cgroup `name` inside this one; it is removed with the parent.
    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        fs::create_dir(&p).unwrap_or_else(|e| panic!("create cgroup {}: {e}", p.display()));
        p
    }

    /// Absolute path of the cgroup directory (what `interceptor attach --cgroup` takes).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id: the inode number of its directory (what BPF's
    /// `bpf_get_current_cgroup_id()` and `bpftool` report).
    pub fn id(&self) -> u64 {
        fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.path.display()))
            .ino()
    }

    /// Pids currently in the cgroup itself (not its children).
    pub fn procs(&self) -> Vec<i32> {
        read_procs(&self.path)
    }

    /// Moves a process into the cgroup.
    pub fn add_pid(&self, pid: u32) {
        let f = self.path.join("cgroup.procs");
        fs::write(&f, pid.to_string())
            .unwrap_or_else(|e| panic!("write {pid} to {}: {e}", f.display()));
    }

    /// Kills every process in the cgroup tree and waits (up to 5 s) until none
    /// is left. Returns whether it emptied.
    pub fn kill_all(&self) -> bool {
        kill_cgroup(&self.path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        destroy_cgroup(&self.path);
    }
}

fn read_procs(path: &Path) -> Vec<i32> {
    fs::read_to_string(path.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn subtree_empty(path: &Path) -> bool {
    // cgroup.events has "populated 0" when no process is in the subtree.
    match fs::read_to_string(path.join("cgroup.events")) {
        Ok(ev) => ev.lines().any(|l| l.trim() == "populated 0"),
        Err(_) => read_procs(path).is_empty(),
    }
}

pub(crate) fn kill_cgroup(path: &Path) -> bool {
    if subtree_empty(path) {
        return true;
    }
    if fs::write(path.join("cgroup.kill"), "1").is_err() {
        // Kernels before 5.14 lack cgroup.kill: signal each process instead.
        for pid in read_procs(path) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        subtree_empty(path)
    })
}

/// Kills the processes of a cgroup tree and removes it, children first.
/// Never panics (used from Drop); reports problems on stderr.
pub(crate) fn destroy_cgroup(path: &Path) {
    if !path.exists() {
        return;
    }
    if !kill_cgroup(path) {
        eprintln!(
            "warning: processes still in {} after cgroup.kill: {:?}",
            path.display(),
            read_procs(path)
        );
    }
    remove_cgroup_tree(path, 0);
}

fn remove_cgroup_tree(path: &Path, depth: usize) {
    if depth < 16 {
        if let Ok(rd) = fs::read_dir(path) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_cgroup_tree(&e.path(), depth + 1);
                }
            }
        }
    }
    // rmdir can briefly fail with EBUSY while killed tasks are reaped.
    let mut last = None;
    let ok = wait_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || match fs::remove_dir(path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                last = Some(e);
                false
            }
        },
    );
    if !ok {
        eprintln!(
            "warning: cannot remove cgroup {}: {:?}",
            path.display(),
            last
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let mi = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                  50 23 0:40 / /sys/fs/b\\040pf rw - bpf bpf rw\n";
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
            Some("tmpfs")
        );
        assert_eq!(mount_type_at(mi, Path::new("/nope")), None);
    }
}
