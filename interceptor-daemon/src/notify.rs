//! systemd readiness (the sd_notify protocol): one datagram, `READY=1`, to the Unix socket
//! named by `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). Sent once, after the
//! first reconcile pass (scopes attached, orphans detached), so that a unit ordered
//! `After=interceptor.service` starts with its interception in place. Without
//! `$NOTIFY_SOCKET` (not under systemd, or `Type=` other than `notify`) nothing is sent.
use std::os::unix::{ffi::OsStrExt as _, net::UnixDatagram};

/// Sends `state` (e.g. `READY=1`) to `$NOTIFY_SOCKET`; `Ok(false)` when it is not set.
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    match target.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(state.as_bytes(), &target)?;
        }
    }
    Ok(true)
}
