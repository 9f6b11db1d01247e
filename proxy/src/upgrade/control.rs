//! The Unix socket a proxy serves upgrades on, and who may take part in an upgrade.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use nix::sys::stat::{umask, Mode};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::net::{UnixListener, UnixStream};
use tracing::info;

use super::error::UpgradeError;

/// Whether the peer of `stream` may take part in an upgrade: the same effective user as
/// this process, or root. Returns the peer's pid.
pub(super) fn check_peer(stream: &UnixStream) -> Result<i32, String> {
    let cred = rustix::net::sockopt::socket_peercred(stream)
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let own = nix::unistd::geteuid().as_raw();
    let peer = cred.uid.as_raw();
    if peer != own && peer != 0 {
        return Err(format!(
            "peer pid {} runs as uid {peer}, this proxy as uid {own}; only the same user or \
             root may take part in an upgrade",
            cred.pid.as_raw_nonzero()
        ));
    }
    Ok(cred.pid.as_raw_nonzero().get())
}

/// The Unix socket a proxy serves upgrades on.
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ControlSocket {
    /// Creates the socket at `path` (mode 0600; the parent directory is created 0700 if
    /// missing). A socket file nobody listens on (left by a crash) is replaced; one a
    /// running proxy serves is an error.
    pub fn bind(path: &Path) -> Result<ControlSocket, UpgradeError> {
        let io_err = |what, error| UpgradeError::Io {
            path: path.to_owned(),
            what,
            error,
        };
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(UpgradeError::InUse {
                    path: path.to_owned(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!(path = %path.display(), "removing a stale upgrade socket");
                std::fs::remove_file(path)
                    .or_else(ignore_missing)
                    .map_err(|e| io_err("removing the stale socket file", e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("checking for a running proxy", e)),
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|e| io_err("creating its directory", e))?;
            }
        }
        let sock = Socket::new(Domain::UNIX, Type::STREAM, None)
            .map_err(|e| io_err("creating the socket", e))?;
        let addr = SockAddr::unix(path).map_err(|e| io_err("making its address", e))?;
        // Created 0600 by bind() itself, under a umask of 0177: never chmod by path, which
        // would follow a symlink swapped in for the socket by whoever can write in its
        // directory (and chmod of the socket's descriptor does not reach the file). The
        // umask is the process's; this runs once at start, before any other file is made.
        let old_umask = umask(Mode::from_bits_truncate(0o177));
        let bound = sock.bind(&addr);
        umask(old_umask);
        bound.map_err(|e| io_err("binding", e))?;
        // Before listen(), nobody can connect; check that the path is still our socket.
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() && m.permissions().mode() & 0o777 == 0o600 => {}
            Ok(_) => {
                return Err(io_err(
                    "checking it after bind",
                    io::Error::other(
                        "the path was replaced (not our 0600 socket any more); make its directory writable only by the proxy's user",
                    ),
                ))
            }
            Err(e) => return Err(io_err("checking it after bind", e)),
        }
        sock.listen(16).map_err(|e| io_err("listening", e))?;
        sock.set_nonblocking(true)
            .map_err(|e| io_err("setting it nonblocking", e))?;
        let listener = UnixListener::from_std(sock.into())
            .map_err(|e| io_err("registering it with the runtime", e))?;
        Ok(ControlSocket {
            path: path.to_owned(),
            listener,
        })
    }

    /// Wraps the control socket inherited from the previous process.
    pub(super) fn adopt(path: &Path, fd: OwnedFd) -> Result<ControlSocket, UpgradeError> {
        let sock = Socket::from(fd);
        let bad = |reason: String| UpgradeError::Protocol {
            path: path.to_owned(),
            reason,
        };
        match sock.domain() {
            Ok(d) if d == Domain::UNIX => {}
            other => {
                return Err(bad(format!(
                    "the inherited upgrade socket is not a Unix socket ({other:?})"
                )))
            }
        }
        sock.set_nonblocking(true)
            .map_err(|e| bad(format!("inherited upgrade socket: {e}")))?;
        let listener = UnixListener::from_std(sock.into())
            .map_err(|e| bad(format!("inherited upgrade socket: {e}")))?;
        Ok(ControlSocket {
            path: path.to_owned(),
            listener,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next connection of a process that wants to take over.
    pub(super) async fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().await.map(|(s, _)| s)
    }

    /// A copy of the listening socket, to pass to the next process.
    pub(super) fn dup(&self) -> io::Result<OwnedFd> {
        self.listener.as_fd().try_clone_to_owned()
    }
}

fn ignore_missing(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    use std::sync::Arc;

    /// Someone who can write in the socket's directory swaps the fresh socket for a
    /// symlink to another file, again and again: that file's mode must never change.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mode_is_never_set_through_a_swapped_in_symlink() {
        let dir = std::env::temp_dir().join(format!("icpt-t-ctlsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("victim");
        std::fs::write(&target, b"x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = dir.join("proxy.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let (dir, path, target, stop) =
                (dir.clone(), path.clone(), target.clone(), stop.clone());
            std::thread::spawn(move || {
                let link = dir.join("link");
                let mut swaps = 0u64;
                while !stop.load(Relaxed) {
                    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
                        let _ = std::fs::remove_file(&link);
                        if std::os::unix::fs::symlink(&target, &link).is_ok()
                            && std::fs::rename(&link, &path).is_ok()
                        {
                            swaps += 1;
                        }
                    }
                }
                swaps
            })
        };
        for _ in 0..2_000 {
            let _ = ControlSocket::bind(&path);
        }
        stop.store(true, Relaxed);
        let swaps = swapper.join().unwrap();
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(swaps > 0, "the swapper never got in");
        assert_eq!(
            mode, 0o644,
            "the mode was set through the symlink ({swaps} swaps)"
        );
    }
}
