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

use std::future::Future;
use std::time::Duration;

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

/// Passes when a drain's deadline does: a connection still open then is closed.
#[derive(Debug, Clone, Default)]
pub struct Deadline(CancellationToken);

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

    /// Whether the deadline of the connection the calling task serves has passed (see
    /// [`Deadline::scope`]); false outside one. It registers no waker: the connection's
    /// task is woken at the deadline by [`crate::listener::connection_task`], which polls
    /// its handler first, so a handler that checks this on every poll sees it then.
    pub fn current_has_passed() -> bool {
        CONNECTION_DEADLINE
            .try_with(|d| d.0.is_cancelled())
            .unwrap_or(false)
    }

    /// Completes when the deadline has passed.
    pub fn passed(&self) -> WaitForCancellationFuture<'_> {
        self.0.cancelled()
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
    }

    /// Takes no connection any more (call it once every accept loop has returned) and
    /// returns how many are open.
    pub fn close(&self) -> usize {
        self.watch.connections.close();
        self.watch.connections.len()
    }

    /// Waits until every connection has ended or `timeout` has passed; then lets the
    /// deadline pass, which closes the remaining ones, and waits until they are gone.
    pub async fn wait(self, timeout: Duration) {
        let connections = &self.watch.connections;
        if tokio::time::timeout(timeout, connections.wait())
            .await
            .is_err()
        {
            warn!(
                open_connections = connections.len(),
                "drain timeout reached; closing remaining connections"
            );
            self.watch.deadline.0.cancel();
            connections.wait().await;
        }
    }
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
        drain.wait(Duration::from_millis(300)).await;
        assert!(started.elapsed() >= Duration::from_millis(300));
        ended_rx
            .await
            .expect("the connection that ended by itself ran to its end");
        closed_rx
            .await
            .expect("the open connection was closed at the deadline");
    }
}
