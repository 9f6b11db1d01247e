//! Host plumbing shared by the test harness (`interceptor-tests`), the benchmark and `xtask`:
//! commands bounded in time, the mount table, and the removal of cgroup trees and network
//! namespaces. Every function reports what it could not do instead of printing it, so each
//! caller decides whether a leftover is a failure (a test that leaked) or a note (a cleanup of
//! a crashed run).

pub mod cgroup;
pub mod cmd;
pub mod mounts;
pub mod netns;
pub mod pins;
pub mod skip;
pub mod wasm_plugins;

use std::time::{Duration, Instant};

/// Polls `f` every `interval` until it returns true or `timeout` passes; returns whether it
/// became true.
pub fn wait_until(timeout: Duration, interval: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(interval);
    }
}

/// What a removal left behind.
#[derive(Debug, thiserror::Error)]
pub enum Leftover {
    #[error("processes {pids:?} of {what} survive SIGKILL")]
    Processes { what: String, pids: Vec<i32> },
    #[error("cannot remove {what}: {source}")]
    Remove {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {detail}")]
    Command { what: String, detail: String },
}
