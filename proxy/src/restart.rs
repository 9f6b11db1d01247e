//! The proxy starts its own successor, and stays as a container's init.
//!
//! In a Kubernetes pod a container lives as long as its first process, so a new proxy
//! started beside it (`kubectl exec ... --upgrade`) dies with it when the old one drains
//! away. Instead (the nginx and Envoy hot-restarter model):
//!
//! - on SIGUSR2 (or `POST /upgrade` on the admin listener) the proxy starts `--upgrade-binary` (default: its own binary,
//!   `/proc/self/exe`) with its own arguments plus `--upgrade`, as its child; the hand-off
//!   goes over `--upgrade-socket` as for any upgrade ([`crate::upgrade`]). Without
//!   `--upgrade-socket` the signal is refused in the log and nothing is started;
//! - when the proxy is PID 1 of its PID namespace (a container's first process), after its
//!   own hand-off and drain it does not exit: it stays as a minimal init that holds no
//!   listener and no connection. It reaps its children (each generation it started, and
//!   orphans reparented to it), starts the next generation on SIGUSR2, forwards SIGTERM and
//!   SIGINT to the current generation, and exits with that generation's status (128 + the
//!   signal if it was killed) once no child is left.
//!
//! A proxy that is not PID 1 exits after its drain as always; its successor is reparented.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, Signal as Stream, SignalKind};
use tracing::{error, info, warn};

/// What a SIGUSR2 starts when no `--upgrade-binary` is given.
pub const SELF_EXE: &str = "/proc/self/exe";

/// Generations this process started or adopted that are still alive, oldest first; the
/// last one is the current generation.
static LIVE: Mutex<Vec<i32>> = Mutex::new(Vec::new());
/// The exit status of the last generation that was the current one when it ended.
static LAST_STATUS: Mutex<Option<i32>> = Mutex::new(None);
/// How this process starts its successor: set by the binary ([`Successor::install`]).
static LAUNCHER: std::sync::OnceLock<Successor> = std::sync::OnceLock::new();

/// `POST /upgrade`: starts the successor as a SIGUSR2 does. The error says why not.
pub fn request_upgrade() -> Result<i32, &'static str> {
    let successor = LAUNCHER.get().ok_or(
        "this process does not start successors (the library without the interceptor-proxy binary)",
    )?;
    if !successor.upgrade_socket {
        return Err("this proxy runs without --upgrade-socket, so no new process can take over; restart it with --upgrade-socket PATH to upgrade in place");
    }
    successor
        .spawn()
        .ok_or("the next proxy generation could not be started; see this proxy's log")
}

/// Whether this process is the first process of its PID namespace.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// The signals the restarter handles, installed at start (before the proxy binds, so a
/// SIGUSR2 never finds its default action, which ends the process).
pub struct Signals {
    usr2: Stream,
    chld: Stream,
}

impl Signals {
    /// Installs the handlers (inside a tokio runtime).
    pub fn install() -> io::Result<Signals> {
        Ok(Signals {
            usr2: signal(SignalKind::user_defined2())?,
            chld: signal(SignalKind::child())?,
        })
    }
}

/// How a successor is started: the binary, and the arguments (this process's own plus
/// `--upgrade`). `upgrade_socket`: whether this process serves upgrades at all.
#[derive(Clone, Debug)]
pub struct Successor {
    binary: PathBuf,
    args: Vec<OsString>,
    arg0: OsString,
    upgrade_socket: bool,
}

impl Successor {
    /// From this process's command line.
    pub fn from_env(binary: Option<&Path>, upgrade_socket: bool) -> Successor {
        let mut argv = std::env::args_os();
        let arg0 = argv.next().unwrap_or_else(|| "interceptor-proxy".into());
        let mut args: Vec<OsString> = argv.collect();
        if !args.iter().any(|a| a == "--upgrade") {
            args.push("--upgrade".into());
        }
        Successor {
            binary: binary.map_or_else(|| PathBuf::from(SELF_EXE), Path::to_owned),
            args,
            arg0,
            upgrade_socket,
        }
    }

    /// Makes this the launcher `POST /upgrade` uses (once; later calls change nothing).
    pub fn install(&self) {
        let _ = LAUNCHER.set(self.clone());
    }

    /// Starts the next generation as this process's child (stdin, stdout and stderr
    /// shared), and makes it the current one.
    fn spawn(&self) -> Option<i32> {
        if !self.upgrade_socket {
            error!("SIGUSR2: this proxy runs without --upgrade-socket, so no new process can take over; restart it with --upgrade-socket PATH to upgrade in place");
            return None;
        }
        match Command::new(&self.binary)
            .arg0(&self.arg0)
            .args(&self.args)
            .spawn()
        {
            Ok(child) => {
                // Reaped by `reap` (waitpid), never through the `Child`.
                let pid = child.id() as i32;
                LIVE.lock().unwrap().push(pid);
                info!(pid, binary = %self.binary.display(), "started the next proxy generation (--upgrade)");
                Some(pid)
            }
            Err(e) => {
                error!(error = %e, binary = %self.binary.display(), "cannot start the next proxy generation; check --upgrade-binary; this one keeps serving");
                None
            }
        }
    }
}

/// While the proxy serves: starts a successor on each SIGUSR2 and reaps children (a
/// successor that failed before taking over). Never returns; abort it.
pub async fn while_serving(successor: Successor, usr2: &mut Stream, chld: &mut Stream) {
    loop {
        tokio::select! {
            Some(()) = usr2.recv() => { successor.spawn(); }
            Some(()) = chld.recv() => { reap(); }
        }
    }
}

/// Runs the proxy's serving future with the SIGUSR2 successor launcher beside it.
pub async fn serve_with<T>(
    successor: Successor,
    signals: &mut Signals,
    serving: impl std::future::Future<Output = T>,
) -> T {
    let Signals { usr2, chld } = signals;
    tokio::select! {
        out = serving => out,
        () = while_serving(successor, usr2, chld) => unreachable!("the launcher loops"),
    }
}

/// PID 1 after its own hand-off and drain: the init of the container. Returns the exit
/// code: the current generation's, or `own` if no generation was ever started.
pub async fn init(successor: Successor, signals: &mut Signals, own: i32) -> i32 {
    let Signals { usr2, chld } = signals;
    // Installed now, not at start: a SIGTERM this process got while it served was its own
    // (its serving loop has a handler since its start).
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            error!(error = %e, "PID 1: cannot handle SIGTERM/SIGINT; exiting");
            return own;
        }
    };
    let started = !LIVE.lock().unwrap().is_empty();
    info!(
        generations = ?LIVE.lock().unwrap(),
        "PID 1: stays as init (no listener, no connection): reaps, starts the next generation on SIGUSR2, forwards SIGTERM/SIGINT"
    );
    loop {
        if !reap() {
            break;
        }
        tokio::select! {
            Some(()) = usr2.recv() => { successor.spawn(); }
            Some(()) = chld.recv() => {}
            Some(()) = term.recv() => forward(Signal::SIGTERM),
            Some(()) = int.recv() => forward(Signal::SIGINT),
        }
    }
    let code = if started {
        LAST_STATUS.lock().unwrap().unwrap_or(own)
    } else {
        own
    };
    info!(
        exit_code = code,
        "PID 1: no child left; exiting with the last generation's status"
    );
    code
}

/// Sends `sig` to the current generation.
fn forward(sig: Signal) {
    let current = LIVE.lock().unwrap().last().copied();
    match current {
        Some(pid) => {
            info!(pid, signal = %sig, "PID 1: forwarding to the current generation");
            if let Err(e) = kill(Pid::from_raw(pid), sig) {
                warn!(pid, error = %e, "PID 1: forwarding the signal");
            }
        }
        None => warn!(signal = %sig, "PID 1: no current generation to forward the signal to"),
    }
}

/// Reaps every ended child without waiting. Returns whether any child is left.
fn reap() -> bool {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return true,
            Ok(status) => ended(status),
            Err(Errno::ECHILD) => return false,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                error!(error = %e, "waitpid");
                return true;
            }
        }
    }
}

/// Notes the end of a child: a generation (its status kept if it was the current one) or
/// an orphan.
fn ended(status: WaitStatus) {
    let (pid, code) = match status {
        WaitStatus::Exited(pid, code) => (pid, code),
        WaitStatus::Signaled(pid, sig, _) => (pid, 128 + sig as i32),
        _ => return,
    };
    let pid = pid.as_raw();
    let mut live = LIVE.lock().unwrap();
    let current = live.last() == Some(&pid);
    let generation = live.contains(&pid);
    live.retain(|p| *p != pid);
    if current {
        *LAST_STATUS.lock().unwrap() = Some(code);
    }
    // A generation that upgraded by itself (SIGUSR2 sent to it, not to us) left its
    // successor to us: it is the current one now.
    for orphan in adopted_children(&live) {
        info!(
            pid = orphan,
            "adopted a proxy generation reparented to this process"
        );
        live.push(orphan);
    }
    if generation {
        info!(pid, exit_code = code, current, "a proxy generation ended");
    } else {
        info!(
            pid,
            exit_code = code,
            "reaped a process reparented to this one"
        );
    }
}

/// This process's children that are not in `known`, oldest first (start time). Only PID 1
/// gets orphans; elsewhere the list is empty.
fn adopted_children(known: &[i32]) -> Vec<i32> {
    if !is_pid1() {
        return Vec::new();
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<(u64, i32)> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| !known.contains(pid))
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After the command's closing parenthesis: state, ppid, ... starttime (22nd).
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let (state, ppid) = (fields.first()?, fields.get(1)?.parse::<u32>().ok()?);
            let start = fields.get(19)?.parse::<u64>().ok()?;
            (ppid == std::process::id() && *state != "Z").then_some((start, pid))
        })
        .collect();
    found.sort_unstable();
    found.into_iter().map(|(_, pid)| pid).collect()
}
