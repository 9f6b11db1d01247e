//! systemd's notify protocol (sd_notify): one datagram to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). The proxy sends
//! `MAINPID=<its pid>` and `READY=1` once it accepts: at a cold start, and, in a process
//! started with `--upgrade`, once the previous one has released its listeners. Under
//! `Type=notify` with `NotifyAccess=all`, that makes the new process the unit's main
//! process, so that `systemctl reload` (which starts it) really upgrades the service and
//! the old process's exit does not count as the service's. Without `$NOTIFY_SOCKET`
//! nothing is sent.

use sd_notify::NotifyState;

/// Tells systemd that this process is the service's main process and is ready.
pub fn ready() {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let pid = std::process::id();
    match sd_notify::notify(&[NotifyState::MainPid(pid), NotifyState::Ready]) {
        Ok(()) => tracing::info!(pid, "told systemd: MAINPID and READY=1"),
        Err(e) => {
            tracing::warn!(error = %e, "telling systemd that the proxy is ready ($NOTIFY_SOCKET)")
        }
    }
}
