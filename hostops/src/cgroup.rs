//! Removal of cgroup v2 trees.

use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{wait_until, Leftover};

/// How deep [`remove_tree`] descends.
const MAX_DEPTH: usize = 16;

/// The pids in a cgroup's `cgroup.procs` (not its children's).
pub fn procs(path: &Path) -> Vec<i32> {
    fs::read_to_string(path.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether a process is in the cgroup's subtree (`cgroup.events`: `populated 1`).
pub fn populated(path: &Path) -> bool {
    match fs::read_to_string(path.join("cgroup.events")) {
        Ok(ev) => !ev.lines().any(|l| l.trim() == "populated 0"),
        Err(_) => !procs(path).is_empty(),
    }
}

/// SIGKILLs every process in the subtree (`cgroup.kill`, or each pid of `cgroup.procs` on
/// kernels before 5.14) and waits up to 5 s for it to empty.
pub fn kill_all(path: &Path) -> Result<(), Leftover> {
    if !populated(path) {
        return Ok(());
    }
    if fs::write(path.join("cgroup.kill"), "1").is_err() {
        for pid in procs(path) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    if wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        !populated(path)
    }) {
        Ok(())
    } else {
        Err(Leftover::Processes {
            what: format!("cgroup {}", path.display()),
            pids: procs(path),
        })
    }
}

/// Kills the processes of a cgroup tree and removes it, children first. A missing cgroup is
/// no error. Errors name what is left.
pub fn remove_tree(path: &Path) -> Result<(), Leftover> {
    if !path.exists() {
        return Ok(());
    }
    let killed = kill_all(path);
    rmdir_tree(path, 0)?;
    killed
}

fn rmdir_tree(path: &Path, depth: usize) -> Result<(), Leftover> {
    if depth < MAX_DEPTH {
        for e in fs::read_dir(path).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path(), depth + 1)?;
            }
        }
    }
    // rmdir can briefly fail with EBUSY while killed tasks are reaped.
    let mut last = None;
    let removed =
        wait_until(
            Duration::from_secs(5),
            Duration::from_millis(20),
            || match fs::remove_dir(path) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => true,
                Err(e) => {
                    last = Some(e);
                    false
                }
            },
        );
    match (removed, last) {
        (false, Some(source)) => Err(Leftover::Remove {
            what: format!("cgroup {}", path.display()),
            source,
        }),
        _ => Ok(()),
    }
}
