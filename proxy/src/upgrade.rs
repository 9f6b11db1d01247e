//! Hot upgrade: a new process takes over the listening sockets of the running one.
//!
//! A proxy started with `--upgrade-socket PATH` serves upgrades on that Unix socket
//! (mode 0600). A new proxy started with the same `--upgrade-socket PATH --upgrade`:
//!
//! 1. connects and says `hello`; each side checks the other's credentials (SO_PEERCRED:
//!    the same user, or root). The running proxy serves one upgrade at a time: a second
//!    one meanwhile is refused;
//! 2. receives every listening socket over SCM_RIGHTS, each under a stable listener id
//!    (`outbound.0`, `inbound.1`, `admin`, `upgrade`: the role and the position in the
//!    configuration, never the address), plus the counters so far;
//! 3. binds what it does not inherit, wraps everything, starts accepting (both processes
//!    now accept from the same kernel queues), and says `ready`;
//! 4. the old process stops accepting and closes its copies (close, never `shutdown`,
//!    which would break the shared socket), answers `released` with its counters, drains
//!    its open connections until they end or `--drain-timeout`, sends `exited` with its
//!    final counters and exits. The new process adds each report to its own counters, so
//!    totals continue across upgrades.
//!
//! If the new process fails before `ready` (a bad setting, a crash, a kill), the old one
//! sees the connection close and keeps serving as if nothing happened: it never stopped.
//! The new process serves upgrades on the inherited Unix socket once it is the only one
//! accepting, so the next upgrade works the same way.
//!
//! Messages are JSON lines over a stream socket; file descriptors travel with the first
//! byte of the `listeners` line.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::stats::{Stats, StatsSnapshot};

/// How long a new process waits for the running one's answers.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the running process waits for the new one to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the running process waits for `hello` after a connect.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most descriptors one message carries (listeners of a proxy: a handful).
const MAX_FDS: usize = 64;
/// Longest message accepted.
const MAX_LINE: usize = 1 << 20;

/// Listener id of the Unix socket that serves upgrades.
pub const CONTROL_ID: &str = "upgrade";
/// Listener id of the admin listener.
pub const ADMIN_ID: &str = "admin";

/// Listener id of the `index`-th outbound listener of the configuration.
pub fn outbound_id(index: usize) -> String {
    format!("outbound.{index}")
}

/// Listener id of the `index`-th inbound listener of the configuration.
pub fn inbound_id(index: usize) -> String {
    format!("inbound.{index}")
}

/// Why an upgrade, or serving upgrades, failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(
        "--upgrade-socket {}: a running proxy serves upgrades there; pass --upgrade to take \
         over from it, or give this proxy another --upgrade-socket",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error("--upgrade-socket {}: {what}: {error}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        error: io::Error,
    },
    #[error(
        "--upgrade --upgrade-socket {}: no running proxy serves upgrades there ({error}); start \
         without --upgrade, or point --upgrade-socket at the running proxy's socket",
        path.display()
    )]
    NoPredecessor { path: PathBuf, error: io::Error },
    #[error("upgrade through {}: the running proxy refused: {reason}", path.display())]
    Refused { path: PathBuf, reason: String },
    #[error("upgrade through {}: {reason}", path.display())]
    Protocol { path: PathBuf, reason: String },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    Hello {
        pid: u32,
        version: String,
    },
    /// Followed by one descriptor per id, in this order.
    Listeners {
        pid: u32,
        ids: Vec<String>,
        stats: StatsSnapshot,
        /// Histogram cells (`Stats::histogram_values`); absent from older senders.
        #[serde(default)]
        histograms: Vec<u64>,
    },
    Refused {
        reason: String,
    },
    Ready,
    Released {
        stats: StatsSnapshot,
        #[serde(default)]
        histograms: Vec<u64>,
    },
    Exited {
        stats: StatsSnapshot,
        #[serde(default)]
        histograms: Vec<u64>,
    },
}

impl Message {
    fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Listeners { .. } => "listeners",
            Message::Refused { .. } => "refused",
            Message::Ready => "ready",
            Message::Released { .. } => "released",
            Message::Exited { .. } => "exited",
        }
    }
}

/// One end of an upgrade conversation: JSON lines, descriptors alongside.
struct Channel {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

fn cmsg_space() -> Vec<MaybeUninit<u8>> {
    vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))]
}

impl Channel {
    fn new(stream: UnixStream) -> Self {
        Channel {
            stream,
            buf: Vec::new(),
            fds: Vec::new(),
        }
    }

    async fn send(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        assert!(fds.len() <= MAX_FDS, "too many descriptors for one message");
        let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut sent = 0;
        while sent < line.len() {
            let n = self
                .stream
                .async_io(Interest::WRITABLE, || {
                    let mut space = cmsg_space();
                    let mut control = SendAncillaryBuffer::new(&mut space);
                    if sent == 0 && !fds.is_empty() {
                        control.push(SendAncillaryMessage::ScmRights(fds));
                    }
                    rustix::net::sendmsg(
                        &self.stream,
                        &[IoSlice::new(&line[sent..])],
                        &mut control,
                        SendFlags::NOSIGNAL,
                    )
                    .map_err(io::Error::from)
                })
                .await?;
            sent += n;
        }
        Ok(())
    }

    /// The next message; `None` when the peer closed the connection between messages.
    async fn recv(&mut self) -> io::Result<Option<Message>> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return serde_json::from_slice(&line[..end])
                    .map(Some)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            }
            if self.buf.len() > MAX_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "message longer than 1 MiB",
                ));
            }
            let mut chunk = [0u8; 4096];
            let (n, fds) = self
                .stream
                .async_io(Interest::READABLE, || {
                    let mut space = cmsg_space();
                    let mut control = RecvAncillaryBuffer::new(&mut space);
                    let r = rustix::net::recvmsg(
                        &self.stream,
                        &mut [IoSliceMut::new(&mut chunk)],
                        &mut control,
                        RecvFlags::CMSG_CLOEXEC,
                    )?;
                    let mut fds = Vec::new();
                    for m in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(received) = m {
                            fds.extend(received);
                        }
                    }
                    if r.flags.contains(ReturnFlags::CTRUNC) {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "more descriptors than expected (control data truncated)",
                        ));
                    }
                    Ok((r.bytes, fds))
                })
                .await?;
            self.fds.extend(fds);
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Whether the peer of `stream` may take part in an upgrade: the same effective user as
/// this process, or root. Returns the peer's pid.
fn check_peer(stream: &UnixStream) -> Result<i32, String> {
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
        sock.bind(&addr).map_err(|e| io_err("binding", e))?;
        // Before listen(): nobody can connect before the mode is set.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err("setting its mode to 0600", e))?;
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
    fn adopt(path: &Path, fd: OwnedFd) -> Result<ControlSocket, UpgradeError> {
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

    fn dup(&self) -> io::Result<OwnedFd> {
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

/// Listening sockets received from the previous process, by listener id.
#[derive(Debug, Default)]
pub struct Inherited {
    fds: HashMap<String, OwnedFd>,
    path: Option<PathBuf>,
}

impl Inherited {
    /// The inherited TCP listener `id` if it is listening on `want` (port 0: any port on
    /// that address); `None` when there is none or it does not match (it is then closed,
    /// and a fresh listener is bound).
    pub fn tcp_listener(&mut self, id: &str, want: SocketAddr) -> Option<std::net::TcpListener> {
        let fd = self.fds.remove(id)?;
        let sock = Socket::from(fd);
        let local = sock.local_addr().ok().and_then(|a| a.as_socket());
        let listening = sock.is_listener().unwrap_or(false);
        let matches = local
            .is_some_and(|l| l.ip() == want.ip() && (want.port() == 0 || l.port() == want.port()));
        if !(listening && matches) {
            warn!(listener = id, inherited = ?local, configured = %want,
                "inherited listener does not match the configuration; binding a new one");
            return None;
        }
        if let Err(e) = sock.set_nonblocking(true) {
            warn!(listener = id, error = %e, "inherited listener unusable; binding a new one");
            return None;
        }
        debug!(listener = id, addr = ?local, "listener inherited");
        Some(sock.into())
    }

    /// The inherited control socket, if the previous process passed one.
    pub fn control(&mut self, path: &Path) -> Result<Option<ControlSocket>, UpgradeError> {
        match self.fds.remove(CONTROL_ID) {
            Some(fd) => ControlSocket::adopt(path, fd).map(Some),
            None => Ok(None),
        }
    }

    /// Closes what the configuration no longer has (the listening socket goes away once
    /// the previous process closes its copy too).
    pub fn close_rest(&mut self) {
        for (id, _) in self.fds.drain() {
            info!(
                listener = id,
                "inherited listener is not in the configuration; closing it"
            );
        }
    }

    /// Whether listeners were inherited (this process is an upgrade).
    pub fn is_upgrade(&self) -> bool {
        self.path.is_some()
    }
}

/// A hand-off in progress, on the new process's side.
#[derive(Debug)]
pub struct Takeover {
    path: PathBuf,
    chan: ChannelDebug,
    /// The previous process's pid.
    pub previous_pid: u32,
    /// Its counters when it sent the listeners.
    pub stats: StatsSnapshot,
    /// Its histogram cells then (empty from a sender without them).
    pub histograms: Vec<u64>,
}

/// `Channel` with a `Debug` that does not dump buffers.
struct ChannelDebug(Channel);

impl std::fmt::Debug for ChannelDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Channel")
    }
}

/// Connects to the running proxy at `path` and receives its listeners.
pub async fn take_over(path: &Path) -> Result<(Takeover, Inherited), UpgradeError> {
    let protocol = |reason: String| UpgradeError::Protocol {
        path: path.to_owned(),
        reason,
    };
    let stream = UnixStream::connect(path)
        .await
        .map_err(|error| UpgradeError::NoPredecessor {
            path: path.to_owned(),
            error,
        })?;
    check_peer(&stream).map_err(protocol)?;
    let mut chan = Channel::new(stream);
    chan.send(
        &Message::Hello {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        },
        &[],
    )
    .await
    .map_err(|e| protocol(format!("sending hello: {e}")))?;
    let reply = tokio::time::timeout(HANDOFF_TIMEOUT, chan.recv())
        .await
        .map_err(|_| {
            protocol(format!(
                "no answer within {HANDOFF_TIMEOUT:?}; the running proxy may be stopped or busy"
            ))
        })?
        .map_err(|e| protocol(format!("reading its answer: {e}")))?;
    match reply {
        Some(Message::Listeners {
            pid,
            ids,
            stats,
            histograms,
        }) => {
            let fds = std::mem::take(&mut chan.fds);
            if fds.len() != ids.len() {
                return Err(protocol(format!(
                    "received {} descriptors for {} listeners",
                    fds.len(),
                    ids.len()
                )));
            }
            info!(previous_pid = pid, listeners = ?ids, "received the listening sockets");
            let inherited = Inherited {
                fds: ids.into_iter().zip(fds).collect(),
                path: Some(path.to_owned()),
            };
            Ok((
                Takeover {
                    path: path.to_owned(),
                    chan: ChannelDebug(chan),
                    previous_pid: pid,
                    stats,
                    histograms,
                },
                inherited,
            ))
        }
        Some(Message::Refused { reason }) => Err(UpgradeError::Refused {
            path: path.to_owned(),
            reason,
        }),
        Some(other) => Err(protocol(format!(
            "unexpected {} message instead of the listeners",
            other.name()
        ))),
        None => Err(protocol(
            "the running proxy closed the connection without sending its listeners".to_owned(),
        )),
    }
}

impl Takeover {
    /// Called once this process accepts on every listener: tells the previous process,
    /// which stops accepting and answers with its counters (added to `stats`). Returns
    /// what follows the previous process until it exits.
    pub async fn complete(self, stats: &Stats) -> Result<Predecessor, UpgradeError> {
        let Takeover {
            path,
            chan: ChannelDebug(mut chan),
            previous_pid,
            stats: handed,
            histograms: handed_hist,
        } = self;
        let protocol = |reason: String| UpgradeError::Protocol {
            path: path.clone(),
            reason,
        };
        chan.send(&Message::Ready, &[])
            .await
            .map_err(|e| protocol(format!("sending ready: {e}")))?;
        let reply = tokio::time::timeout(HANDOFF_TIMEOUT, chan.recv())
            .await
            .map_err(|_| protocol(format!("no release within {HANDOFF_TIMEOUT:?}")))?
            .map_err(|e| protocol(format!("waiting for the release: {e}")))?;
        match reply {
            Some(Message::Released {
                stats: released,
                histograms,
            }) => {
                stats.add_delta(&handed, &released);
                stats.add_histogram_delta(&handed_hist, &histograms);
                info!(
                    previous_pid,
                    "upgrade complete: the previous process stopped accepting and drains"
                );
                Ok(Predecessor {
                    chan,
                    last: released,
                    last_histograms: histograms,
                    pid: previous_pid,
                })
            }
            Some(other) => Err(protocol(format!(
                "unexpected {} message instead of released",
                other.name()
            ))),
            None => Err(protocol(
                "the previous process closed the connection before releasing".to_owned(),
            )),
        }
    }
}

/// The previous process while it drains.
pub struct Predecessor {
    chan: Channel,
    last: StatsSnapshot,
    last_histograms: Vec<u64>,
    pid: u32,
}

impl Predecessor {
    /// Waits until the previous process exits and adds what it counted while draining.
    pub async fn follow(mut self, stats: Arc<Stats>) {
        loop {
            match self.chan.recv().await {
                Ok(Some(Message::Exited {
                    stats: last,
                    histograms,
                })) => {
                    stats.add_delta(&self.last, &last);
                    stats.add_histogram_delta(&self.last_histograms, &histograms);
                    info!(
                        previous_pid = self.pid,
                        "previous process drained and exited"
                    );
                    return;
                }
                Ok(Some(other)) => {
                    debug!(
                        message = other.name(),
                        "ignoring message from the previous process"
                    )
                }
                Ok(None) | Err(_) => {
                    warn!(
                        previous_pid = self.pid,
                        "previous process went away without its final counters"
                    );
                    return;
                }
            }
        }
    }
}

/// A new process that is ready: the old one sends it `released` and, after draining,
/// `exited`.
pub struct Successor {
    chan: Channel,
    pid: i32,
}

impl Successor {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Tells the new process that this one no longer accepts.
    pub async fn released(&self, stats: &Stats) {
        let msg = Message::Released {
            stats: stats.snapshot(),
            histograms: stats.histogram_values(),
        };
        if let Err(e) = self.chan.send(&msg, &[]).await {
            warn!(error = %e, "telling the new process about the release");
        }
    }

    /// Sends the final counters; the new process adds them to its own.
    pub async fn exited(&self, stats: &Stats) {
        let msg = Message::Exited {
            stats: stats.snapshot(),
            histograms: stats.histogram_values(),
        };
        if let Err(e) = self.chan.send(&msg, &[]).await {
            warn!(error = %e, "sending the final counters to the new process");
        }
    }
}

/// What the running process offers a new one: a copy of each listening socket.
pub struct Offer {
    listeners: Vec<(String, OwnedFd)>,
}

impl Offer {
    /// Copies (dup) `listeners`; the copies are closed when serving upgrades ends.
    pub fn new<'a>(
        listeners: impl IntoIterator<Item = (String, BorrowedFd<'a>)>,
    ) -> io::Result<Offer> {
        let listeners = listeners
            .into_iter()
            .map(|(id, fd)| fd.try_clone_to_owned().map(|fd| (id, fd)))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Offer { listeners })
    }
}

/// Serves upgrades on `control` until `stop` is cancelled or a new process is ready; the
/// ready one is sent on `release`. Closes the offered copies and the control socket
/// before it returns.
pub async fn serve(
    control: ControlSocket,
    offer: Offer,
    stats: Arc<Stats>,
    stop: CancellationToken,
    release: oneshot::Sender<Successor>,
) {
    let mut offer = offer;
    match control.dup() {
        Ok(fd) => offer.listeners.push((CONTROL_ID.to_owned(), fd)),
        Err(e) => warn!(error = %e, "cannot offer the upgrade socket itself"),
    }
    let offer = Arc::new(offer);
    let busy = Arc::new(AtomicBool::new(false));
    let release = Arc::new(Mutex::new(Some(release)));
    let sessions = tokio_util::task::TaskTracker::new();
    info!(path = %control.path.display(), "serving upgrades");
    loop {
        let stream = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = control.listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "accepting on the upgrade socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        sessions.spawn(session(
            stream,
            offer.clone(),
            stats.clone(),
            busy.clone(),
            release.clone(),
            stop.clone(),
        ));
    }
    drop(offer);
    sessions.close();
    sessions.wait().await;
    drop(control);
}

/// Clears the busy flag when a session ends.
struct Busy(Arc<AtomicBool>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

async fn session(
    stream: UnixStream,
    offer: Arc<Offer>,
    stats: Arc<Stats>,
    busy: Arc<AtomicBool>,
    release: Arc<Mutex<Option<oneshot::Sender<Successor>>>>,
    stop: CancellationToken,
) {
    let peer = check_peer(&stream);
    let mut chan = Channel::new(stream);
    let hello = tokio::select! {
        _ = stop.cancelled() => return,
        r = tokio::time::timeout(HELLO_TIMEOUT, chan.recv()) => r,
    };
    match hello {
        Ok(Ok(Some(Message::Hello { .. }))) => {}
        // A connect without hello: e.g. a starting proxy checking whether one runs here.
        Ok(Ok(None)) => return,
        Ok(Ok(Some(other))) => {
            warn!(message = other.name(), "upgrade socket: expected hello");
            return;
        }
        Ok(Err(e)) => {
            warn!(error = %e, "upgrade socket: reading hello");
            return;
        }
        Err(_) => {
            warn!("upgrade socket: no hello within {HELLO_TIMEOUT:?}");
            return;
        }
    }
    let refuse = |reason: String| async {
        warn!(reason = %reason, "upgrade refused");
        let _ = chan.send(&Message::Refused { reason }, &[]).await;
    };
    let pid = match peer {
        Ok(pid) => pid,
        Err(reason) => return refuse(reason).await,
    };
    if busy.swap(true, Ordering::AcqRel) {
        return refuse("another upgrade is in progress; retry when it has finished".to_owned())
            .await;
    }
    let _busy = Busy(busy);
    info!(
        new_pid = pid,
        "upgrade requested; handing over the listening sockets"
    );
    let ids = offer.listeners.iter().map(|(id, _)| id.clone()).collect();
    let fds: Vec<BorrowedFd<'_>> = offer.listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
    let sent = chan
        .send(
            &Message::Listeners {
                pid: std::process::id(),
                ids,
                stats: stats.snapshot(),
                histograms: stats.histogram_values(),
            },
            &fds,
        )
        .await;
    drop(fds);
    if let Err(e) = sent {
        warn!(new_pid = pid, error = %e, "sending the listeners; upgrade aborted, still serving");
        return;
    }
    let answer = tokio::select! {
        _ = stop.cancelled() => return,
        r = tokio::time::timeout(READY_TIMEOUT, chan.recv()) => r,
    };
    match answer {
        Ok(Ok(Some(Message::Ready))) => {}
        Ok(Ok(None)) | Ok(Err(_)) => {
            warn!(
                new_pid = pid,
                "the new process exited before it was ready; upgrade aborted, still serving"
            );
            return;
        }
        Ok(Ok(Some(other))) => {
            warn!(
                new_pid = pid,
                message = other.name(),
                "expected ready; upgrade aborted, still serving"
            );
            return;
        }
        Err(_) => {
            warn!(new_pid = pid, "the new process was not ready within {READY_TIMEOUT:?}; upgrade aborted, still serving");
            return;
        }
    }
    // Our copies must be closed before this process reports the release.
    drop(offer);
    let tx = release.lock().expect("release lock").take();
    if let Some(tx) = tx {
        info!(
            new_pid = pid,
            "the new process is ready; stopping accepting"
        );
        let _ = tx.send(Successor { chan, pid });
    }
}
