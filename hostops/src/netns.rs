//! Removal of named network namespaces (`/run/netns/NAME`, as `ip netns` makes them).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cmd::run_bounded;
use crate::{wait_until, Leftover};

const IP_TIMEOUT: Duration = Duration::from_secs(30);

/// Names of the named network namespaces (`ip netns list`).
pub fn list() -> Result<Vec<String>, Leftover> {
    let out = ip(&["netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// Pids of the processes in a named network namespace (`ip netns pids`).
pub fn pids(name: &str) -> Result<Vec<i32>, Leftover> {
    Ok(ip(&["netns", "pids", name])?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// SIGKILLs every process of the namespace but the caller, waits (up to 5 s) until they are
/// gone or zombies, and deletes the namespace. A missing namespace is no error.
pub fn remove(name: &str) -> Result<(), Leftover> {
    let path = Path::new("/run/netns").join(name);
    if !path.exists() {
        return Ok(());
    }
    let me = std::process::id() as i32;
    let pids: Vec<i32> = pids(name)?.into_iter().filter(|&p| p != me).collect();
    for &p in &pids {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    let gone = wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        pids.iter().all(|&p| !alive(p))
    });
    if !gone {
        return Err(Leftover::Processes {
            what: format!("netns {name}"),
            pids: pids.into_iter().filter(|&p| alive(p)).collect(),
        });
    }
    match ip(&["netns", "delete", name]) {
        Err(_) if !path.exists() => Ok(()),
        r => r.map(drop),
    }
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

fn ip(args: &[&str]) -> Result<String, Leftover> {
    let what = format!("ip {}", args.join(" "));
    let out =
        run_bounded(Command::new("ip").args(args), IP_TIMEOUT).map_err(|e| Leftover::Command {
            what: what.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(Leftover::Command {
            what,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
