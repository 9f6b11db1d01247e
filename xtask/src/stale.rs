//! Removal of state left by a crashed test run (prefix `icpt-t-` only) and the
//! primitives the demo reuses for its own cleanup.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::util::{bpffs_mounted, cgroup2_root, run_capture, wait_until, BPFFS};

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

/// Names from `ip netns list`.
pub fn netns_list() -> Vec<String> {
    run_capture(
        Command::new("ip").args(["netns", "list"]),
        Duration::from_secs(30),
    )
    .map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    })
    .unwrap_or_default()
}

/// SIGKILLs every process of the netns, waits (bounded), deletes it.
pub fn remove_netns(name: &str) {
    let me = std::process::id() as i32;
    let pids: Vec<i32> = run_capture(
        Command::new("ip").args(["netns", "pids", name]),
        Duration::from_secs(30),
    )
    .map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    })
    .unwrap_or_default();
    let pids: Vec<i32> = pids.into_iter().filter(|&p| p != me).collect();
    for &p in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        pids.iter().all(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .map(|s| {
                    s.rsplit_once(')')
                        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                })
                .unwrap_or(true)
        })
    });
    match run_capture(
        Command::new("ip").args(["netns", "delete", name]),
        Duration::from_secs(30),
    ) {
        Ok(o) if !o.status.success() => {
            eprintln!(
                "warning: ip netns delete {name}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )
        }
        Err(e) => eprintln!("warning: ip netns delete {name}: {e}"),
        _ => {}
    }
}

fn populated(cg: &Path) -> bool {
    match fs::read_to_string(cg.join("cgroup.events")) {
        Ok(ev) => !ev.lines().any(|l| l.trim() == "populated 0"),
        Err(_) => fs::read_to_string(cg.join("cgroup.procs")).is_ok_and(|s| !s.trim().is_empty()),
    }
}

/// Kills the cgroup tree's processes (`cgroup.kill`), waits until empty (bounded),
/// removes child cgroups, then the cgroup.
pub fn remove_cgroup(cg: &Path) {
    if !cg.exists() {
        return;
    }
    if populated(cg) {
        if fs::write(cg.join("cgroup.kill"), "1").is_err() {
            for pid in fs::read_to_string(cg.join("cgroup.procs"))
                .unwrap_or_default()
                .split_whitespace()
            {
                if let Ok(p) = pid.parse() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        if !wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            !populated(cg)
        }) {
            eprintln!("warning: processes survive cgroup.kill in {}", cg.display());
        }
    }
    rmdir_tree(cg, 0);
}

fn rmdir_tree(p: &Path, depth: usize) {
    if depth < 16 {
        for e in fs::read_dir(p).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path(), depth + 1);
            }
        }
    }
    let mut last = None;
    let ok = wait_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || match fs::remove_dir(p) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                last = Some(e);
                false
            }
        },
    );
    if !ok {
        eprintln!("warning: cannot remove cgroup {}: {last:?}", p.display());
    }
}

/// `interceptor --pin-dir DIR detach --all` (if the binary exists; errors printed),
/// then `rm -r DIR`.
pub fn remove_pin_dir(dir: &Path, interceptor: Option<&Path>) {
    if !dir.exists() {
        return;
    }
    if let Some(bin) = interceptor {
        let res = run_capture(
            Command::new(bin)
                .arg("--pin-dir")
                .arg(dir)
                .args(["detach", "--all"]),
            Duration::from_secs(30),
        );
        match res {
            Ok(o) if !o.status.success() => eprintln!(
                "note: {} --pin-dir {} detach --all failed: {}",
                bin.display(),
                dir.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("note: cannot run {}: {e}", bin.display()),
            _ => {}
        }
    } else {
        eprintln!(
            "note: interceptor binary not built; removing {} without detaching",
            dir.display()
        );
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("warning: cannot remove {}: {e}", dir.display());
        }
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
