//! cgroup v2 test cgroups.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::names::{bounded_name, NAME_MAX};
use crate::util::leaked;

/// Mount point of the cgroup2 hierarchy, read from `/proc/self/mountinfo`
/// (it is `/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` on pure v2).
/// Panics if no cgroup2 is mounted.
pub fn cgroup2_root() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| hostops::mounts::cgroup2_root().unwrap_or_else(|e| panic!("{e}")))
        .clone()
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
        hostops::cgroup::remove_tree(&path)
            .unwrap_or_else(|e| panic!("stale cgroup of an earlier run: {e}"));
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
        hostops::cgroup::procs(&self.path)
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
        hostops::cgroup::kill_all(&self.path).is_ok()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = hostops::cgroup::remove_tree(&self.path) {
            leaked(e);
        }
    }
}
