//! Listening sockets and the one accept loop that outbound and inbound listeners share: a
//! direction ([`Handler`]) only decides what happens to an accepted connection.
//!
//! The loop never stalls the proxy:
//! - at most `--max-connections` are open at once over all listeners ([`ConnectionLimit`]);
//!   one more is accepted and closed at once (a reset), counted in
//!   `connections_refused_limit`, while the open ones keep being served;
//! - when accept fails for want of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM)
//!   it counts the failure (`accept_errors_resources`), logs at most once a second, and
//!   waits until a connection closes or [`RESOURCE_BACKOFF`] passes, never spinning;
//! - accepted sockets inherit TCP keepalive from the listener ([`KEEPALIVE`]), so a peer
//!   that vanished without a FIN or RST is found and closed.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::drain::{Deadline, DrainWatch};
use crate::forward::reset_on_close;
use crate::stats::Stats;

/// Listen backlog of the proxy's listeners (capped by net.core.somaxconn).
const BACKLOG: i32 = 1024;

/// TCP keepalive of every client socket (inherited from the listener) and every upstream
/// socket: first probe after 5 minutes idle, then every 75 s, 9 unanswered probes close the
/// connection. A peer that disappeared without a FIN or RST then costs at most ~16 minutes
/// of a descriptor instead of forever.
pub const KEEPALIVE: (Duration, Duration, u32) =
    (Duration::from_secs(300), Duration::from_secs(75), 9);

/// How long the accept loop waits after EMFILE/ENFILE/ENOBUFS/ENOMEM when no connection
/// closes meanwhile.
pub const RESOURCE_BACKOFF: Duration = Duration::from_millis(100);

/// Applies [`KEEPALIVE`] to a socket.
pub fn set_keepalive(sock: &Socket) -> io::Result<()> {
    let (time, interval, retries) = KEEPALIVE;
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(time)
            .with_interval(interval)
            .with_retries(retries),
    )
}

/// The most connections open at once over all listeners of one proxy, and the wake-up of
/// an accept loop that backs off after running out of descriptors.
#[derive(Debug)]
pub struct ConnectionLimit {
    max: usize,
    open: AtomicUsize,
    closed: Notify,
    last_warning: std::sync::Mutex<Option<Instant>>,
    warnings_suppressed: AtomicU64,
}

/// One open connection's place under the [`ConnectionLimit`]; given back on drop.
#[derive(Debug)]
pub struct ConnectionPermit(Arc<ConnectionLimit>);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
        self.0.closed.notify_waiters();
    }
}

impl ConnectionLimit {
    /// At most `max` connections at once.
    pub fn new(max: usize) -> Arc<ConnectionLimit> {
        Arc::new(ConnectionLimit {
            max,
            open: AtomicUsize::new(0),
            closed: Notify::new(),
            last_warning: std::sync::Mutex::new(None),
            warnings_suppressed: AtomicU64::new(0),
        })
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    /// A place for one more connection, or `None` when `max` are open.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnectionPermit> {
        self.open
            .fetch_update(Relaxed, Relaxed, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| ConnectionPermit(self.clone()))
    }

    /// A place for a connection moved here from the previous process: taken even over
    /// the limit (the connection is open already; refusing it would cut it).
    pub fn acquire_moved(self: &Arc<Self>) -> ConnectionPermit {
        self.open.fetch_add(1, Relaxed);
        ConnectionPermit(self.clone())
    }

    /// Runs `log` at most once a second; the calls skipped meanwhile are passed to it.
    fn rate_limited(&self, log: impl FnOnce(u64)) {
        let mut last = self.last_warning.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            self.warnings_suppressed.fetch_add(1, Relaxed);
            return;
        }
        *last = Some(now);
        log(self.warnings_suppressed.swap(0, Relaxed));
    }
}

/// Binds one listening socket (SO_REUSEADDR; IPv6 sockets are IPv6-only so that
/// `0.0.0.0:P` and `[::]:P` can both be bound and IPv4 goes to the IPv4 one). TCP_NODELAY
/// is set here once: accepted sockets inherit it from the listener. A non-zero `mark` is
/// set as the listener's SO_MARK before it listens (needs CAP_NET_ADMIN or CAP_NET_RAW).
pub fn bind_listener(addr: SocketAddr, mark: u32) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if mark != 0 {
        sock.set_mark(mark)?;
    }
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_tcp_nodelay(true)?;
    set_keepalive(&sock)?;
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// What a direction does with an accepted connection.
pub trait Handler: Send + Sync + 'static {
    /// Handles one accepted connection from start to close.
    fn handle(&self, client: TcpStream, peer: SocketAddr) -> impl Future<Output = ()> + Send;
}

/// What every accept loop of one proxy shares: the connection limit and the counters.
#[derive(Debug, Clone)]
pub struct AcceptShared {
    pub limit: Arc<ConnectionLimit>,
    pub stats: Arc<Stats>,
}

/// Spawns an accept loop per listener, every one with the same handler.
pub fn spawn_accept_loops<H: Handler>(
    listeners: Vec<TcpListener>,
    ctx: Arc<H>,
    shared: &AcceptShared,
    drain: &DrainWatch,
) -> Vec<JoinHandle<()>> {
    listeners
        .into_iter()
        .map(|l| tokio::spawn(accept_loop(l, ctx.clone(), shared.clone(), drain.clone())))
        .collect()
}

/// Accepts until the drain starts, each connection running (tracked by the drain) until it
/// ends or the drain's deadline passes. Over the limit, a connection is closed at once
/// with a reset; out of descriptors, the loop waits for a close (see the module).
pub async fn accept_loop<H: Handler>(
    listener: TcpListener,
    ctx: Arc<H>,
    shared: AcceptShared,
    drain: DrainWatch,
) {
    let AcceptShared { limit, stats } = shared;
    // Kernel forwarding asked for on this listener (at bind, when it was on then).
    let mut kfwd_asked = crate::kforward::enabled();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = drain.signaled() => break,
            r = listener.accept() => r,
        };
        if accepted.is_ok() {
            crate::kforward::catch_up(&listener, &mut kfwd_asked);
        }
        match accepted {
            Ok((stream, peer)) => match limit.try_acquire() {
                Some(permit) => {
                    let task = connection_task(ctx.clone(), stream, peer, drain.deadline());
                    drain.track(async move {
                        task.await;
                        drop(permit);
                    });
                }
                None => {
                    stats.connections_refused_limit.fetch_add(1, Relaxed);
                    reset_on_close(&stream);
                    drop(stream);
                    limit.rate_limited(|suppressed| {
                        warn!(listener = ?listener.local_addr().ok(), client = %peer,
                            max_connections = limit.max(), similar_suppressed = suppressed,
                            "connection limit reached; refusing new connections (--max-connections)");
                    });
                }
            },
            Err(e) if is_transient_accept_error(&e) => {}
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS/ENOMEM: the connection stays queued in the kernel;
                // wait until one of ours closes (a descriptor is free again) or a short
                // while, instead of spinning on the same error.
                stats.accept_errors_resources.fetch_add(1, Relaxed);
                limit.rate_limited(|suppressed| {
                    warn!(listener = ?listener.local_addr().ok(), error = %e,
                        open_connections = limit.open(), similar_suppressed = suppressed,
                        "accept failed; waiting for a connection to close (raise the open-file limit or lower --max-connections)");
                });
                let closed = limit.closed.notified();
                tokio::select! {
                    biased;
                    _ = drain.signaled() => break,
                    _ = closed => {}
                    _ = tokio::time::sleep(RESOURCE_BACKOFF) => {}
                }
            }
        }
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// The task of one accepted connection: runs it to the end, or until `deadline` (the
/// drain's) passes, which closes both sockets.
pub async fn connection_task<H: Handler>(
    ctx: Arc<H>,
    client: TcpStream,
    peer: SocketAddr,
    deadline: Deadline,
) {
    run_connection!(deadline, ctx.handle(client, peer))
}

/// Runs one connection (an expression, so that its future is stored once, in the select)
/// with `deadline` as its [`Deadline::scope`]: to its end, or until the deadline passes
/// (the connection is dropped then, both sockets closed). The task is woken when
/// connections are asked to move, so that an opaque forwarder sees it.
macro_rules! run_connection {
    ($deadline:expr, $connection:expr) => {{
        let deadline: $crate::drain::Deadline = $deadline;
        // The connection is polled first: the opaque forwarder watches the same deadline
        // ([`Deadline::current_passed_or_move`]), so once it has passed the forwarder ends on
        // that poll with its connection counted; any other handler is dropped right
        // after. The move request only wakes the task (the forwarder sees it then).
        // One future for both wake-ups: the deadline also sets the move request (see
        // `Drain::wait`), so that the request is always the first to come.
        //
        // Each wake-up is followed by a yield, so that the connection is polled once more
        // after this future saw it: the request (or the deadline) may come while the task
        // is being polled, after the connection looked and before this future did; this
        // future then sees it without being woken for it (the notifier had not reached
        // this task yet, and never does: a completed wait leaves the waiters' list), and
        // without the yield nothing would poll the connection again for it.
        tokio::select! {
            biased;
            _ = deadline.clone().scope($connection) => {}
            _ = async {
                deadline.move_requested().await;
                tokio::task::yield_now().await;
                deadline.passed().await;
                tokio::task::yield_now().await
            } => {}
        }
    }};
}
pub(crate) use run_connection;

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::Poll;

    use super::*;
    use crate::drain;

    /// Busy for `d`, as a forwarder is while it reads and writes a ping.
    fn busy(d: Duration) {
        let start = Instant::now();
        while start.elapsed() < d {
            std::hint::spin_loop();
        }
    }

    /// What the connections of [`missed`] wait for.
    #[derive(Clone, Copy)]
    enum Event {
        /// The request to move.
        Move,
        /// The drain's deadline.
        Cut,
    }

    /// One round: `CONNECTIONS` connections run as the proxy runs them
    /// ([`run_connection`]), each polled when a ping comes, then one ping for all and, while
    /// the runtime's two threads poll them for it, `event`. Returns how many connections
    /// never saw it (each looks on every poll, as the opaque forwarder does: see
    /// `forward::forward_from`).
    fn missed(rt: &tokio::runtime::Runtime, round: u64, event: Event) -> usize {
        const CONNECTIONS: usize = 2000;
        rt.block_on(async {
            let (drain, watch) = drain::new();
            let ping = Arc::new(Notify::new());
            let seen = Arc::new(AtomicUsize::new(0));
            for _ in 0..CONNECTIONS {
                let (deadline, ping, seen) = (watch.deadline(), ping.clone(), seen.clone());
                watch.track(async move {
                    run_connection!(deadline, async {
                        let mut pinged = Box::pin(ping.notified());
                        std::future::poll_fn(|cx| {
                            let (passed, move_requested) = Deadline::current_passed_or_move(false);
                            let saw = match event {
                                Event::Move => move_requested,
                                Event::Cut => passed,
                            };
                            if saw {
                                return Poll::Ready(());
                            }
                            busy(Duration::from_micros(20));
                            while pinged.as_mut().poll(cx).is_ready() {
                                pinged.set(ping.notified());
                            }
                            Poll::Pending
                        })
                        .await;
                        seen.fetch_add(1, Relaxed);
                    })
                });
            }
            // Every connection waits for its ping.
            tokio::time::sleep(Duration::from_millis(50)).await;
            drain.start();
            assert_eq!(drain.close(), CONNECTIONS);
            ping.notify_waiters();
            busy(Duration::from_micros(round * 10));
            match event {
                Event::Move => {
                    let _offers = drain.start_moving();
                    let asked = Instant::now();
                    while seen.load(Relaxed) < CONNECTIONS
                        && asked.elapsed() < Duration::from_secs(2)
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let missed = CONNECTIONS - seen.load(Relaxed);
                    drain.wait(Duration::ZERO).await;
                    missed
                }
                Event::Cut => {
                    // Every connection has ended when it returns: seen, or dropped unseen.
                    assert_eq!(drain.wait(Duration::ZERO).await, CONNECTIONS);
                    CONNECTIONS - seen.load(Relaxed)
                }
            }
        })
    }

    /// 100 rounds of [`missed`]: in none may a connection miss `event` (`what` it missed).
    fn assert_none_missed(event: Event, what: &str) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let missed: Vec<usize> = (0..100)
            .map(|round| missed(&rt, round % 30, event))
            .collect();
        assert!(
            missed.iter().all(|&m| m == 0),
            "connections that {what}, per round: {missed:?}"
        );
    }

    /// A request to move that comes while a connection's task is being polled (a ping
    /// arrived) reaches the connection all the same: the task's wake-up for it
    /// ([`run_connection`]) must not be spent without the connection being polled again.
    #[test]
    fn a_move_request_that_comes_during_a_poll_reaches_the_connection() {
        assert_none_missed(Event::Move, "never saw the request to move");
    }

    /// Likewise the drain's deadline: the connection sees it (the opaque forwarder ends
    /// then with its connection counted and logged as cut) before it is dropped.
    #[test]
    fn a_deadline_that_passes_during_a_poll_reaches_the_connection() {
        assert_none_missed(Event::Cut, "were dropped at the deadline without seeing it");
    }
}
