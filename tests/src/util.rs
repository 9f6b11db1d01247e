//! Small helpers: bounded command execution and polling.

use std::process::{Command, Output};
use std::time::Duration;

/// Default bound for one helper command (`ip`, `bpftool`, ...).
pub(crate) const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `cmd` with stdout/stderr captured, killing its process group if it
/// runs longer than `timeout`. Errors: it cannot be started, waited for or read.
pub fn run_cmd(cmd: &mut Command, timeout: Duration) -> std::io::Result<Output> {
    hostops::cmd::run_bounded(cmd, timeout)
}

/// Runs a program with arguments (bounded by 60 s) and panics with its stderr
/// unless it succeeds; returns its stdout.
pub fn run_cmd_ok(prog: &str, args: &[&str]) -> String {
    hostops::cmd::run_ok(prog, args, CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

pub use hostops::wait_until;

/// What a guard's Drop does with a resource it could not remove: the test that leaked it
/// fails (a panic from Drop), unless the test is already failing, where the leak is printed
/// next to the first failure.
pub(crate) fn leaked(e: impl std::fmt::Display) {
    if std::thread::panicking() {
        eprintln!("leaked while the test failed: {e}");
    } else {
        panic!("the test leaked: {e}");
    }
}
