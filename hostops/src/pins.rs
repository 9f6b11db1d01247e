//! Removal of bpffs pin directories.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::cmd::run_bounded;
use crate::Leftover;

/// Runs `INTERCEPTOR --pin-dir DIR detach --all` (when the binary is given), so the kernel
/// drops the links pinned there, then removes the directory tree. A missing directory is no
/// error; a failed detach is reported only if the directory cannot be removed afterwards
/// either (its links are then still pinned).
pub fn remove(dir: &Path, interceptor: Option<&Path>) -> Result<(), Leftover> {
    if !dir.exists() {
        return Ok(());
    }
    let mut detach_failure = None;
    if let Some(bin) = interceptor {
        let what = format!("{} --pin-dir {} detach --all", bin.display(), dir.display());
        match run_bounded(
            Command::new(bin)
                .arg("--pin-dir")
                .arg(dir)
                .args(["detach", "--all"]),
            Duration::from_secs(30),
        ) {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                detach_failure = Some(Leftover::Command {
                    what,
                    detail: format!(
                        "{}: {}",
                        o.status,
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                })
            }
            Err(e) => {
                detach_failure = Some(Leftover::Command {
                    what,
                    detail: e.to_string(),
                })
            }
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(detach_failure.unwrap_or(Leftover::Remove {
            what: format!("pin dir {}", dir.display()),
            source,
        })),
    }
}
