//! Draining with a deadline: when the proxy stops (a signal, or a new process took over its
//! listeners) it stops accepting, lets open connections finish until `--drain-timeout`,
//! then closes what is left.
//!
//! [`Drain`] is held by whoever decides when (the proxy's `serve`). [`DrainWatch`], cloned,
//! is held by what takes part: every accept loop and the upgrade server stop at
//! [`DrainWatch::signaled`]; every connection runs through [`DrainWatch::track`] (so the
//! drain knows when they have all ended) and ends at its [`Deadline`] at the latest.
//!
//! 1. [`Drain::start`]: the signal; accept loops return, their listeners are closed.
//! 2. [`Drain::close`]: no connection is added any more; says how many are open.
//! 3. [`Drain::wait`]: until they have all ended, or until the timeout; then the deadline
//!    passes, the remaining connections are dropped (both sockets closed), and it waits for
//!    that too.
//!
//! At an upgrade, between 2 and 3, [`Drain::start_moving`] asks every opaque forwarder to
//! pause where it holds none of its connection's bytes and offer the connection to the new
//! process ([`Handoff`], see [`crate::upgrade`]); a connection the new process confirmed
//! ends here without a close, any other one carries on here.

use std::future::Future;
use std::time::Duration;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio::task::futures::TaskLocalFuture;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;
use tracing::warn;

/// A new drain: the handle that starts it and the watch its participants hold.
pub fn new() -> (Drain, DrainWatch) {
    let watch = DrainWatch {
        signal: CancellationToken::new(),
        deadline: Deadline::never(),
        connections: TaskTracker::new(),
    };
    (
        Drain {
            watch: watch.clone(),
        },
        watch,
    )
}

/// Starts a drain and waits for it; see the module documentation.
#[derive(Debug)]
pub struct Drain {
    watch: DrainWatch,
}

/// What accept loops and connections hold to take part in a drain.
#[derive(Debug, Clone)]
pub struct DrainWatch {
    signal: CancellationToken,
    deadline: Deadline,
    connections: TaskTracker,
}

/// Passes when a drain's deadline does: a connection still open then is closed. Also
/// carries the drain's request to move connections to a new process.
#[derive(Debug, Clone, Default)]
pub struct Deadline(Arc<Moving>);

/// The deadline, and the request to move connections: set by [`Drain::start_moving`],
/// taken back by [`stop_moving`] (the new process failed, or the drain is over). One
/// allocation, so that the [`Deadline`] every connection holds is one pointer.
#[derive(Debug, Default)]
struct Moving {
    cut: CancellationToken,
    /// The drain has started: connections that end between requests (HTTP) end now.
    draining: CancellationToken,
    requested: CancellationToken,
    hub: Mutex<Option<mpsc::UnboundedSender<Handoff>>>,
}

/// What an opaque connection's state is when it is moved: everything the new process
/// needs to carry on copying where this one paused (it held none of the bytes then).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MovedState {
    /// `outbound` or `inbound`: the listener kind it came through (with `orig_dst`, its
    /// per-destination key).
    pub inbound: bool,
    /// The client's address.
    pub peer: SocketAddr,
    /// The original destination (the upstream).
    pub orig_dst: SocketAddr,
    /// Milliseconds since the upstream connect completed.
    pub age_ms: u64,
    /// Bytes copied so far each way.
    pub bytes_client_to_upstream: u64,
    pub bytes_upstream_to_client: u64,
    /// The client sent its FIN (passed on upstream): nothing more is read from it.
    pub client_eof: bool,
    /// The upstream sent its FIN (passed on to the client).
    pub upstream_eof: bool,
    /// Of the bytes the kernel redirected each way (its counts are the connection's, over
    /// every process it went through), those already added to a process's byte totals.
    /// Absent (0) from a process before kernel forwarding's totals were kept live.
    #[serde(default)]
    pub kernel_folded_client_to_upstream: u64,
    #[serde(default)]
    pub kernel_folded_upstream_to_client: u64,
}

impl MovedState {
    /// When the connection started, by this process's clock.
    pub fn started(&self) -> Instant {
        let now = Instant::now();
        now.checked_sub(std::time::Duration::from_millis(self.age_ms))
            .unwrap_or(now)
    }
}

/// One connection offered to the new process: its two sockets (client, upstream; taken
/// out of this process's event loop, not closed) and its state. [`Handoff::taken`] once the
/// new process confirmed it holds them closes this process's descriptors; dropped
/// otherwise (the new process failed, or the move stopped), the handoff gives the sockets
/// back to the connection, which carries on here.
#[derive(Debug)]
pub struct Handoff {
    pub state: MovedState,
    fds: Option<(OwnedFd, OwnedFd)>,
    answer: Option<oneshot::Sender<Option<(OwnedFd, OwnedFd)>>>,
}

impl Handoff {
    /// The client and upstream sockets.
    pub fn fds(&self) -> [std::os::fd::BorrowedFd<'_>; 2] {
        use std::os::fd::AsFd as _;
        let (c, u) = self.fds.as_ref().expect("held until taken or dropped");
        [c.as_fd(), u.as_fd()]
    }

    /// The new process holds the sockets: close this process's descriptors (a close, so
    /// the connection itself is not touched) and let the connection's task end.
    pub fn taken(mut self) {
        if let Some(answer) = self.answer.take() {
            let _ = answer.send(None);
        }
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        if let (Some(answer), Some(fds)) = (self.answer.take(), self.fds.take()) {
            let _ = answer.send(Some(fds));
        }
    }
}

/// What became of a connection offered to the new process.
#[derive(Debug)]
pub enum Offered {
    /// The new process holds it.
    Taken,
    /// It stays here: its sockets back.
    Kept(OwnedFd, OwnedFd),
}

tokio::task_local! {
    /// The deadline of the connection the current task serves.
    static CONNECTION_DEADLINE: Deadline;
}

impl Deadline {
    /// A deadline that passes only if a drain says so; a fresh one never does (for a
    /// connection served outside any drain).
    pub fn never() -> Deadline {
        Deadline::default()
    }

    /// Runs `connection` with this as its deadline, for [`Deadline::current`] within it.
    pub fn scope<F: Future>(self, connection: F) -> TaskLocalFuture<Deadline, F> {
        CONNECTION_DEADLINE.scope(self, connection)
    }

    /// Whether the deadline of the connection the calling task serves has passed and,
    /// unless `stay`, whether it is asked to move ([`Deadline::current_move_requested`]),
    /// in one look-up of the task's deadline (see [`Deadline::scope`]); both false outside
    /// one. It registers no waker: the connection's task is woken at the deadline (and at
    /// the request) by [`crate::listener::connection_task`], which polls its handler first
    /// and polls it once more after it saw either itself, so the opaque forwarder, which
    /// checks this on every poll, sees it then.
    pub fn current_passed_or_move(stay: bool) -> (bool, bool) {
        CONNECTION_DEADLINE
            .try_with(|d| {
                let d = &d.0;
                (
                    d.cut.is_cancelled(),
                    !stay && d.requested.is_cancelled() && d.open(),
                )
            })
            .unwrap_or((false, false))
    }

    /// Whether the connection the calling task serves is asked to move to a new process
    /// (see [`Drain::start_moving`]); false outside a [`Deadline::scope`]. Like
    /// [`Deadline::current_passed_or_move`], it registers no waker: the connection's task is
    /// woken when the request comes ([`Deadline::move_requested`]).
    pub fn current_move_requested() -> bool {
        CONNECTION_DEADLINE
            .try_with(|d| d.0.requested.is_cancelled() && d.0.open())
            .unwrap_or(false)
    }

    /// Offers the calling task's connection to the new process: [`Offered::Taken`] once it
    /// holds it, else [`Offered::Kept`] with the sockets back.
    pub async fn offer_current(client: OwnedFd, upstream: OwnedFd, state: MovedState) -> Offered {
        let hub = CONNECTION_DEADLINE.try_with(|d| d.0.hub()).ok().flatten();
        let Some(hub) = hub else {
            return Offered::Kept(client, upstream);
        };
        let (tx, answer) = oneshot::channel();
        // Not sent: dropped here, it answers with the sockets at once.
        let _ = hub.send(Handoff {
            state,
            fds: Some((client, upstream)),
            answer: Some(tx),
        });
        match answer.await {
            Ok(Some((client, upstream))) => Offered::Kept(client, upstream),
            // Taken (the handoff always answers, whether taken or dropped).
            Ok(None) | Err(_) => Offered::Taken,
        }
    }

    /// The deadline of the connection the calling task serves, if any.
    pub fn current() -> Option<Deadline> {
        CONNECTION_DEADLINE.try_with(Deadline::clone).ok()
    }

    /// Completes when the drain has started: a connection that can end between requests
    /// (routed HTTP) should end at its next chance.
    pub fn draining(&self) -> WaitForCancellationFuture<'_> {
        self.0.draining.cancelled()
    }

    /// Completes when the deadline has passed.
    pub fn passed(&self) -> WaitForCancellationFuture<'_> {
        self.0.cut.cancelled()
    }

    /// Completes when connections are asked to move (it may be taken back after).
    pub fn move_requested(&self) -> WaitForCancellationFuture<'_> {
        self.0.requested.cancelled()
    }
}

impl Moving {
    fn hub(&self) -> Option<mpsc::UnboundedSender<Handoff>> {
        self.hub.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn open(&self) -> bool {
        self.hub.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

impl DrainWatch {
    /// Completes once the drain has started: time to stop accepting.
    pub fn signaled(&self) -> WaitForCancellationFuture<'_> {
        self.signal.cancelled()
    }

    /// Runs `connection` as one of those the drain waits for. It must end at
    /// [`DrainWatch::deadline`] at the latest.
    pub fn track<F>(&self, connection: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.connections.spawn(connection);
    }

    /// The deadline of this drain's connections.
    pub fn deadline(&self) -> Deadline {
        self.deadline.clone()
    }
}

impl Drain {
    /// Starts the drain: [`DrainWatch::signaled`] completes everywhere.
    pub fn start(&self) {
        self.watch.signal.cancel();
        self.watch.deadline.0.draining.cancel();
    }

    /// Takes no connection any more (call it once every accept loop has returned) and
    /// returns how many are open.
    pub fn close(&self) -> usize {
        self.watch.connections.close();
        self.watch.connections.len()
    }

    /// Asks every opaque connection to move: each pauses where it holds none of its
    /// bytes and is offered on the returned channel (see [`Handoff`]).
    pub fn start_moving(&self) -> mpsc::UnboundedReceiver<Handoff> {
        let (tx, rx) = mpsc::unbounded_channel();
        let moving = &self.watch.deadline.0;
        *moving.hub.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        moving.requested.cancel();
        rx
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.watch.connections.len()
    }

    /// Waits until every connection has ended or `timeout` has passed; then lets the
    /// deadline pass, which closes the remaining ones, and waits until they are gone.
    /// Returns how many it closed so (0 when all ended in time).
    pub async fn wait(self, timeout: Duration) -> usize {
        let connections = &self.watch.connections;
        if tokio::time::timeout(timeout, connections.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let cut = connections.len();
        warn!(
            open_connections = cut,
            "drain timeout reached; closing remaining connections"
        );
        // The request first: a connection task waits for it before the deadline (see
        // `listener::run_connection`); with no hub, no connection pauses for it.
        self.watch.deadline.0.requested.cancel();
        self.watch.deadline.0.cut.cancel();
        connections.wait().await;
        cut
    }
}

/// Takes back the request to move connections of `deadline`'s drain: the new process
/// failed, or the move is over.
pub fn stop_moving(deadline: &Deadline) {
    *deadline.0.hub.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that ends by itself is waited for; one that does not is closed when
    /// the timeout has passed, and the wait ends then.
    #[tokio::test]
    async fn waits_for_connections_then_closes_the_rest_at_the_deadline() {
        let (drain, watch) = new();
        let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
        watch.track(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = ended_tx.send(());
        });
        let deadline = watch.deadline();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        watch.track(async move {
            deadline.passed().await;
            let _ = closed_tx.send(());
        });
        let stopped = watch.clone();
        let accept_loop = tokio::spawn(async move { stopped.signaled().await });
        drain.start();
        accept_loop.await.unwrap();
        assert_eq!(drain.close(), 2);
        let started = std::time::Instant::now();
        assert_eq!(drain.wait(Duration::from_millis(300)).await, 1);
        assert!(started.elapsed() >= Duration::from_millis(300));
        ended_rx
            .await
            .expect("the connection that ended by itself ran to its end");
        closed_rx
            .await
            .expect("the open connection was closed at the deadline");
    }
}
