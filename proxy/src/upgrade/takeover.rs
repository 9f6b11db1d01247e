//! The new process's side of an upgrade: receive the listening sockets and the counters,
//! say `ready` once it accepts, then follow the previous process until it exits and add
//! what it counted meanwhile.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use socket2::Socket;
use tokio::net::UnixStream;
use tracing::{debug, info, warn};

use super::control::{check_peer, ControlSocket};
use super::error::UpgradeError;
use super::wire::{Channel, Message, CONTROL_ID};
use crate::drain::{DrainWatch, MovedState};
use crate::listener::{run_connection, ConnectionLimit};
use crate::stats::{Stats, StatsSnapshot};

/// How long a new process waits for the running one's answers.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);

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
    chan: Channel,
    /// The previous process's pid.
    pub previous_pid: u32,
    /// Its counters when it sent the listeners.
    pub stats: StatsSnapshot,
    /// Its histogram cells then (empty from a sender without them).
    pub histograms: Vec<u64>,
    /// It answers each `taken` with `handed` or `kept` (see [`Predecessor::follow`]).
    commits: bool,
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
    info!(path = %path.display(), "asked the running proxy for its listening sockets");
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
            commits,
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
                    chan,
                    previous_pid: pid,
                    stats,
                    histograms,
                    commits,
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
            mut chan,
            previous_pid,
            stats: handed,
            histograms: handed_hist,
            commits,
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
                    commits,
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
    commits: bool,
}

/// What a connection moved here needs to carry on: the drain it joins (so it moves on at
/// the next upgrade), the connection limit it counts under, the counters, the idle timeout.
#[derive(Debug, Clone)]
pub struct Adopter {
    pub drain: DrainWatch,
    pub limit: Arc<ConnectionLimit>,
    pub stats: Arc<Stats>,
    pub idle_timeout: Option<Duration>,
}

impl Adopter {
    /// Carries on one moved connection in a task of its own.
    fn spawn(
        &self,
        client: tokio::net::TcpStream,
        upstream: tokio::net::TcpStream,
        state: MovedState,
    ) {
        let permit = self.limit.acquire_moved();
        let (stats, idle, deadline) =
            (self.stats.clone(), self.idle_timeout, self.drain.deadline());
        self.drain.track(async move {
            run_connection!(
                deadline,
                crate::upstream::resume(client, upstream, state, idle, &stats)
            );
            drop(permit);
        });
    }
}

/// A moved connection's client and upstream sockets, registered here.
type MovedPair = (tokio::net::TcpStream, tokio::net::TcpStream);

/// The moved sockets registered with this runtime, in pairs; an error (nothing taken)
/// when the count does not match or one cannot be registered.
fn register(fds: Vec<OwnedFd>, conns: &[MovedState]) -> Result<Vec<MovedPair>, String> {
    if fds.len() != 2 * conns.len() {
        return Err(format!(
            "received {} descriptors for {} connections",
            fds.len(),
            conns.len()
        ));
    }
    let wrap = |fd: OwnedFd| {
        let s = std::net::TcpStream::from(fd);
        s.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(s)
    };
    let mut fds = fds.into_iter();
    let mut pairs = Vec::with_capacity(conns.len());
    while let (Some(c), Some(u)) = (fds.next(), fds.next()) {
        let pair = wrap(c)
            .and_then(|c| Ok((c, wrap(u)?)))
            .map_err(|e| format!("registering a moved socket: {e}"))?;
        pairs.push(pair);
    }
    Ok(pairs)
}

impl Predecessor {
    /// Follows the previous process until it exits: takes over the connections it moves
    /// (each batch confirmed with `taken` once registered here, and copied only once the
    /// previous process answered `handed`; one it answered `kept` is closed here without
    /// touching the connections, which carry on there), and adds what it counted while
    /// draining. If the conversation ends between `taken` and the answer, the previous
    /// process is gone (it ends the conversation only when it exits), so are its copies:
    /// the batch is carried on here.
    pub async fn follow(mut self, adopter: Adopter) {
        let stats = adopter.stats.clone();
        let mut moved = 0u64;
        // A batch taken, waiting for `handed` or `kept`.
        let mut pending: Option<(Vec<MovedPair>, Vec<MovedState>)> = None;
        loop {
            let msg = self.chan.recv().await;
            if let Some((pairs, conns)) = pending.take() {
                match &msg {
                    Ok(Some(Message::Kept { count })) => {
                        warn!(previous_pid = self.pid, connections = count,
                            "the previous process keeps a batch it did not see confirmed in time; closing our copies");
                        drop(pairs);
                        continue;
                    }
                    Ok(Some(Message::Handed { .. })) => {
                        moved += pairs.len() as u64;
                        for ((client, upstream), state) in pairs.into_iter().zip(conns) {
                            adopter.spawn(client, upstream, state);
                        }
                        continue;
                    }
                    _ => {
                        // Gone (or an unexpected message): its copies are closed; ours carry on.
                        moved += pairs.len() as u64;
                        for ((client, upstream), state) in pairs.into_iter().zip(conns) {
                            adopter.spawn(client, upstream, state);
                        }
                    }
                }
            }
            match msg {
                Ok(Some(Message::Connections { conns })) => {
                    let fds = std::mem::take(&mut self.chan.fds);
                    let pairs = match register(fds, &conns) {
                        Ok(p) => p,
                        Err(reason) => {
                            // Closing the conversation leaves them all in the old process.
                            warn!(previous_pid = self.pid, reason = %reason,
                                "cannot take the moved connections; they stay in the previous process");
                            return;
                        }
                    };
                    let taken = Message::Taken { count: pairs.len() };
                    if let Err(e) = self.chan.send(&taken, &[]).await {
                        // The previous process is gone, so are its copies: these are ours.
                        warn!(previous_pid = self.pid, error = %e, "confirming moved connections");
                    }
                    if self.commits {
                        pending = Some((pairs, conns));
                        continue;
                    }
                    moved += pairs.len() as u64;
                    for ((client, upstream), state) in pairs.into_iter().zip(conns) {
                        adopter.spawn(client, upstream, state);
                    }
                }
                Ok(Some(Message::Exited {
                    stats: last,
                    histograms,
                    destinations,
                })) => {
                    stats.add_delta(&self.last, &last);
                    stats.add_histogram_delta(&self.last_histograms, &histograms);
                    stats.destinations.merge(&destinations);
                    info!(
                        previous_pid = self.pid,
                        moved_connections = moved,
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
