//! One loader at a time per bpf filesystem directory.
//!
//! `attach`, `upgrade` and `detach` read the pinned state and change it in several steps;
//! two of them interleaved could, for example, stamp maps another one is about to remove. Each
//! takes an exclusive `flock` on the pin dir's parent directory (the pin dir itself comes and
//! goes with the first attach and the last detach). `status` and `stats` take it shared, so
//! they never read a pin dir half way through a change (e.g. maps pinned one by one while an
//! attach loads the object). The kernel releases the lock when the process exits, also when
//! it is killed, so a killed loader never blocks the next one.
use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use crate::{
    error::{Error, Result},
    paths::PinLayout,
};

/// How long a loader waits for another one to finish.
const WAIT: Duration = Duration::from_secs(30);

/// Held while the pin dir is being changed; released on drop (or by the kernel at exit).
pub struct PinLock {
    _lock: Flock<fs::File>,
}

impl PinLock {
    /// Takes the lock, waiting up to 30 s for another loader.
    pub fn acquire(layout: &PinLayout) -> Result<PinLock> {
        Self::take(layout, FlockArg::LockExclusiveNonblock)
    }

    /// Takes the lock shared with other readers, waiting up to 30 s for a loader.
    pub fn shared(layout: &PinLayout) -> Result<PinLock> {
        Self::take(layout, FlockArg::LockSharedNonblock)
    }

    fn take(layout: &PinLayout, how: FlockArg) -> Result<PinLock> {
        let root = layout.root();
        let parent = root.parent().unwrap_or(Path::new("/"));
        let deadline = Instant::now() + WAIT;
        let mut file = fs::File::open(parent).map_err(|e| Error::PinDir {
            path: root.into(),
            reason: format!("cannot open its parent directory to lock it: {e}"),
        })?;
        loop {
            match Flock::lock(file, how) {
                Ok(lock) => return Ok(PinLock { _lock: lock }),
                Err((f, Errno::EWOULDBLOCK)) | Err((f, Errno::EINTR)) => {
                    if Instant::now() >= deadline {
                        return Err(Error::PinDir {
                            path: root.into(),
                            reason: format!(
                                "another interceptor process has been changing it for {} s (it holds a lock on {}); retry when it is done",
                                WAIT.as_secs(),
                                parent.display()
                            ),
                        });
                    }
                    file = f;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err((_, e)) => {
                    return Err(Error::PinDir {
                        path: root.into(),
                        reason: format!("cannot lock {}: {e}", parent.display()),
                    })
                }
            }
        }
    }
}
