//! The library's error type. Every variant names the input at fault and what to do about it.
use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cgroup {path}: no such directory; create the cgroup first (mkdir under the cgroup2 mount) or pass an existing one")]
    CgroupMissing { path: PathBuf },

    #[error("cgroup {path}: not a cgroup2 directory (the cgroup2 filesystem is mounted at {mount}); pass a directory under {mount}")]
    NotCgroup2 { path: PathBuf, mount: PathBuf },

    #[error("network namespace {path}: no such file; pass a namespace file such as /run/netns/NAME or /proc/PID/ns/net")]
    NetnsMissing { path: PathBuf },

    #[error("{path} is not a network namespace; pass a namespace file such as /run/netns/NAME or /proc/PID/ns/net")]
    NotNetns { path: PathBuf },

    #[error("process {pid}: {reason}")]
    Register { pid: i32, reason: String },

    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo); mount one with `mount -t cgroup2 none /sys/fs/cgroup`")]
    NoCgroup2,

    #[error("{setting} {value:?}: {reason}")]
    InvalidSetting {
        setting: &'static str,
        value: String,
        reason: String,
    },

    #[error("not privileged: loading and attaching eBPF programs needs root (or CAP_BPF with CAP_NET_ADMIN, or CAP_SYS_ADMIN); run `interceptor` as root")]
    NotPrivileged,

    #[error("this kernel ({kernel}) lacks what the interception needs: {missing}. It needs Linux {minimum} or newer (Debian 12's kernel or later); nothing was attached. `interceptor check` lists every feature")]
    KernelLacks {
        kernel: String,
        missing: String,
        minimum: &'static str,
    },

    #[error("pin directory {path}: {reason}")]
    PinDir { path: PathBuf, reason: String },

    #[error("pinned maps in {path} have layout version {found}, this interceptor's programs expect layout {expected} and cannot share them; nothing was changed and the programs attached now keep running. Use an interceptor built for layout {found} (`interceptor status` shows the layout), or move to this one: `interceptor detach --all` with the interceptor that attached them, then `interceptor attach` with this one (connections are not intercepted in between)")]
    LayoutMismatch {
        path: PathBuf,
        found: u32,
        expected: u32,
    },

    #[error("cgroup {path} is {relation} the attached cgroup {other}: scopes cannot be nested (the outer scope's connect program would remove the inner one's records and the proxy would reset every connection); nothing was attached. Attach only the outer cgroup (its programs intercept every cgroup below it), or `interceptor detach --cgroup {other}` first")]
    NestedScope {
        path: PathBuf,
        /// "inside" or "above".
        relation: &'static str,
        other: String,
    },

    #[error("{path} is not attached (see `interceptor status`)")]
    NotAttached { path: PathBuf },

    #[error("the kernel programs are not embedded in this build (it was built with AYA_BUILD_SKIP); rebuild with `cargo xtask build`")]
    NoObject,

    // The cause is part of the message (and deliberately not a `source`, so it is shown once).
    #[error("{context}: {cause}")]
    Bpf {
        context: String,
        cause: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("{context}: {cause}")]
    Io { context: String, cause: io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn bpf(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Bpf {
            context: context.into(),
            cause: Box::new(source),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            cause: source,
        }
    }
}
