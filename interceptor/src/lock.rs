//! One loader at a time per pin directory, and a pin directory only root can use.
//!
//! `attach`, `upgrade` and `detach` read the pinned state and change it in several steps;
//! two of them interleaved could, for example, stamp maps another one is about to remove. Each
//! takes an exclusive `flock` on the pin dir itself; `status` and `stats` take it shared, so
//! they never read a pin dir half way through a change (e.g. maps pinned one by one while an
//! attach loads the object). The kernel releases the lock when the process exits, also when
//! it is killed, so a killed loader never blocks the next one.
//!
//! The pin dir is created `0700`, and one found already there must be a directory (not a
//! symbolic link) owned by root and writable by nobody else (one only readable by others is
//! made `0700`): a directory another user can open could be locked by that user, stalling
//! every attach, and one they can write to could have its pins replaced. The checks are made on the opened directory (`fstat`), not on the
//! path, so nothing can be swapped in between. The pin dir comes and goes (the first attach
//! creates it, the last detach removes it): a loader that gets the lock of a directory that
//! was removed meanwhile lets go and starts again.
use std::{
    fs,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
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

/// The mode a pin dir is created with: only its owner (root) may enter it.
pub const PIN_DIR_MODE: u32 = 0o700;

/// Held while the pin dir is being changed; released on drop (or by the kernel at exit).
pub struct PinLock {
    _lock: Flock<fs::File>,
}

impl PinLock {
    /// Takes the lock, creating the pin dir (`0700`) when there is none, waiting up to 30 s
    /// for another loader. Also says whether this call created the pin dir.
    pub fn acquire_creating(layout: &PinLayout) -> Result<(PinLock, bool)> {
        let mut created = false;
        loop {
            match fs::DirBuilder::new()
                .mode(PIN_DIR_MODE)
                .create(layout.root())
            {
                Ok(()) => created = true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(pin_dir_error(
                        layout.root(),
                        format!("cannot create it: {e}"),
                    ))
                }
            }
            if let Some(lock) = Self::take(layout, FlockArg::LockExclusiveNonblock)? {
                return Ok((lock, created));
            }
        }
    }

    /// Takes the lock of an existing pin dir, waiting up to 30 s for another loader; `None`
    /// when there is no pin dir.
    pub fn acquire(layout: &PinLayout) -> Result<Option<PinLock>> {
        Self::take(layout, FlockArg::LockExclusiveNonblock)
    }

    /// Takes the lock shared with other readers, waiting up to 30 s for a loader; `None` when
    /// there is no pin dir.
    pub fn shared(layout: &PinLayout) -> Result<Option<PinLock>> {
        Self::take(layout, FlockArg::LockSharedNonblock)
    }

    fn take(layout: &PinLayout, how: FlockArg) -> Result<Option<PinLock>> {
        let root = layout.root();
        let deadline = Instant::now() + WAIT;
        let mut file = match open_checked(root)? {
            Some(f) => f,
            None => return Ok(None),
        };
        loop {
            match Flock::lock(file, how) {
                Ok(lock) => {
                    // The directory may have been removed (and another made) while we waited.
                    let same = fs::symlink_metadata(root)
                        .ok()
                        .zip(lock.metadata().ok())
                        .is_some_and(|(p, f)| p.ino() == f.ino() && p.dev() == f.dev());
                    if same {
                        return Ok(Some(PinLock { _lock: lock }));
                    }
                    drop(lock);
                    match open_checked(root)? {
                        Some(f) => file = f,
                        None => return Ok(None),
                    }
                }
                Err((f, Errno::EWOULDBLOCK)) | Err((f, Errno::EINTR)) => {
                    if Instant::now() >= deadline {
                        return Err(pin_dir_error(
                            root,
                            format!(
                                "another interceptor process has been changing it for {} s (it holds the lock on the directory); retry when it is done",
                                WAIT.as_secs()
                            ),
                        ));
                    }
                    file = f;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err((_, e)) => return Err(pin_dir_error(root, format!("cannot lock it: {e}"))),
            }
        }
    }
}

fn pin_dir_error(path: &Path, reason: String) -> Error {
    Error::PinDir {
        path: path.into(),
        reason,
    }
}

/// Opens the pin dir without following a symbolic link and checks that only root can use it;
/// `None` when it does not exist.
fn open_checked(root: &Path) -> Result<Option<fs::File>> {
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(root)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
            return Err(pin_dir_error(
                root,
                "is not a directory (a symbolic link or a file is in its place); remove it, and the next `interceptor attach` creates the directory".to_string(),
            ))
        }
        Err(e) => return Err(pin_dir_error(root, format!("cannot open it: {e}"))),
    };
    let meta = file
        .metadata()
        .map_err(|e| pin_dir_error(root, format!("cannot read its owner and mode: {e}")))?;
    let mode = meta.mode() & 0o7777;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(pin_dir_error(
            root,
            format!(
                "is owned by uid {} (mode {mode:04o}), not by root: another user could replace its pins or hold its lock; if nothing of yours is pinned in it, remove it (`rm -r {}`) and attach again, which creates it owned by root with mode 0700; otherwise `chown root:root {0}`",
                meta.uid(),
                root.display()
            ),
        ));
    }
    if mode & 0o022 != 0 {
        return Err(pin_dir_error(
            root,
            format!(
                "is writable by group or others (mode {mode:04o}): another user could replace its pins; make it root's alone: `chmod 0700 {}`",
                root.display()
            ),
        ));
    }
    if mode & 0o077 != 0 {
        // Readable by others (as an earlier version created it): they could open it and hold
        // its lock. Root's own directory, written by nobody else: close it to them.
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(fs::Permissions::from_mode(PIN_DIR_MODE))
            .map_err(|e| pin_dir_error(root, format!("cannot make it mode 0700: {e}")))?;
        tracing::info!(pin_dir = %root.display(), old_mode = format!("{mode:04o}"), "pin directory made mode 0700");
    }
    Ok(Some(file))
}
