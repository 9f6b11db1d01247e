//! systemd's notify protocol (sd_notify): one datagram to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). The proxy sends
//! `MAINPID=<its pid>` and `READY=1` once it accepts: at a cold start, and, in a process
//! started with `--upgrade`, once the previous one has released its listeners. Under
//! `Type=notify` with `NotifyAccess=all`, that makes the new process the unit's main
//! process, so that `systemctl reload` (which starts it) really upgrades the service and
//! the old process's exit does not count as the service's. Without `$NOTIFY_SOCKET`
//! nothing is sent.

use std::os::unix::{ffi::OsStrExt as _, net::UnixDatagram};

/// Sends `state` to `$NOTIFY_SOCKET`; `Ok(false)` when it is not set.
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

/// Tells systemd that this process is the service's main process and is ready.
pub fn ready() {
    let state = format!("MAINPID={}\nREADY=1", std::process::id());
    match notify(&state) {
        Ok(true) => tracing::info!(
            pid = std::process::id(),
            "told systemd: MAINPID and READY=1"
        ),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %e, "telling systemd that the proxy is ready ($NOTIFY_SOCKET)")
        }
    }
}
