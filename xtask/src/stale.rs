//! Removal of state left by a crashed test run (prefix `icpt-t-` only) and the
//! primitives the demo reuses for its own cleanup.

use std::fs;
use std::path::Path;

use crate::util::{bpffs_mounted, cgroup2_root, BPFFS};

/// Prefix of every resource the test harness creates.
pub const TEST_PREFIX: &str = "icpt-t-";
/// Lock held shared by live test processes (see `interceptor_tests::RUN_LOCK`).
pub const RUN_LOCK: &str = "/run/icpt-t.lock";

/// Removes `icpt-t-*` pin dirs (after `interceptor --pin-dir DIR detach --all`),
/// cgroups (after `cgroup.kill`) and netns (after killing their processes), and
/// stale harness log dirs. Best effort: problems are printed, not returned.
pub fn clean_stale(interceptor: Option<&Path>) {
    // Test processes hold RUN_LOCK shared while alive: if we cannot take it
    // exclusively, a test run is in progress and its resources are not stale.
    use nix::fcntl::{Flock, FlockArg};
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(RUN_LOCK);
    let _guard = match lock.map(|f| Flock::lock(f, FlockArg::LockExclusiveNonblock)) {
        Ok(Ok(g)) => Some(g),
        Ok(Err(_)) => {
            println!("clean-stale: a test run is in progress ({RUN_LOCK} is locked); leaving icpt-t-* alone");
            return;
        }
        Err(e) => {
            eprintln!("clean-stale: cannot open {RUN_LOCK} ({e}); cleaning anyway");
            None
        }
    };
    let mut n = 0;
    if bpffs_mounted() {
        for dir in entries_with_prefix(Path::new(BPFFS), TEST_PREFIX) {
            remove_pin_dir(&dir, interceptor);
            println!("clean-stale: removed pin dir {}", dir.display());
            n += 1;
        }
    }
    match cgroup2_root() {
        Ok(root) => {
            for cg in entries_with_prefix(&root, TEST_PREFIX) {
                if cg.is_dir() {
                    remove_cgroup(&cg);
                    println!("clean-stale: removed cgroup {}", cg.display());
                    n += 1;
                }
            }
        }
        Err(e) => eprintln!("clean-stale: {e}"),
    }
    for ns in netns_list()
        .into_iter()
        .filter(|n| n.starts_with(TEST_PREFIX))
    {
        remove_netns(&ns);
        println!("clean-stale: removed netns {ns}");
        n += 1;
    }
    clean_logs();
    if n == 0 {
        println!("clean-stale: nothing to clean");
    }
}

fn entries_with_prefix(dir: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Names of the named network namespaces (empty if `ip netns list` fails, which is printed).
pub fn netns_list() -> Vec<String> {
    hostops::netns::list().unwrap_or_else(|e| {
        eprintln!("warning: {e}");
        Vec::new()
    })
}

/// SIGKILLs every process of the netns, waits (bounded), deletes it; what is left is printed.
pub fn remove_netns(name: &str) {
    if let Err(e) = hostops::netns::remove(name) {
        eprintln!("warning: netns {name}: {e}");
    }
}

/// Kills the cgroup tree's processes (`cgroup.kill`), waits until empty (bounded), removes
/// child cgroups, then the cgroup; what is left is printed.
pub fn remove_cgroup(cg: &Path) {
    if let Err(e) = hostops::cgroup::remove_tree(cg) {
        eprintln!("warning: {e}");
    }
}

/// `interceptor --pin-dir DIR detach --all` (if the binary exists), then `rm -r DIR`; what is
/// left is printed.
pub fn remove_pin_dir(dir: &Path, interceptor: Option<&Path>) {
    if interceptor.is_none() && dir.exists() {
        eprintln!(
            "note: interceptor binary not built; removing {} without detaching",
            dir.display()
        );
    }
    if let Err(e) = hostops::pins::remove(dir, interceptor) {
        eprintln!("warning: {e}");
    }
}

/// Harness log dirs `$TMPDIR/icpt-t-logs/<pid>-...` whose process is gone.
fn clean_logs() {
    let base = std::env::temp_dir().join("icpt-t-logs");
    for e in fs::read_dir(&base).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.split('-').next().unwrap_or("");
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}
