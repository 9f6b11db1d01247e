//! What outbound and inbound listeners share: binding, the accept loop, the per-connection
//! task with its drain deadline, the upstream connect and the forward to it.
//!
//! A direction only decides where an accepted connection goes (or that it must be
//! refused); [`connect_and_forward`] does the rest the same way for both.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::forward::{forward, reset_on_close};
use crate::stats::Direction;
use crate::stats::{ConnectErrorKind, Stats};

/// Listen backlog of the proxy's listeners (capped by net.core.somaxconn).
const BACKLOG: i32 = 1024;

/// Binds one listening socket (SO_REUSEADDR; IPv6 sockets are IPv6-only so that
/// `0.0.0.0:P` and `[::]:P` can both be bound and IPv4 goes to the IPv4 one). TCP_NODELAY
/// is set here once: accepted sockets inherit it from the listener.
pub fn bind_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_tcp_nodelay(true)?;
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

/// Accepts until `stop` is cancelled, running each connection on `tracker` until it ends
/// or `kill` is cancelled (drain deadline).
pub async fn accept_loop<H: Handler>(
    listener: TcpListener,
    ctx: Arc<H>,
    tracker: TaskTracker,
    stop: CancellationToken,
    kill: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                tracker.spawn(connection_task(ctx.clone(), stream, peer, kill.clone()));
            }
            Err(e) if is_transient_accept_error(&e) => {}
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning; queued clients wait.
                warn!(listener = ?listener.local_addr().ok(), error = %e, "accept failed; retrying in 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
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

/// The task of one accepted connection: runs it to the end, or until `kill` (the drain
/// deadline) is cancelled, which closes both sockets.
pub async fn connection_task<H: Handler>(
    ctx: Arc<H>,
    client: TcpStream,
    peer: SocketAddr,
    kill: CancellationToken,
) {
    tokio::select! {
        biased;
        _ = kill.cancelled() => {}
        _ = ctx.handle(client, peer) => {}
    }
}

/// How upstream sockets are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamOptions {
    /// SO_MARK for the upstream socket; 0 = none.
    pub bypass_mark: u32,
    /// Source address to bind (port 0) before connecting; `None` lets the kernel choose.
    pub source: Option<IpAddr>,
    /// Connect timeout.
    pub connect_timeout: Duration,
}

/// Connects to `dst` from a fresh nonblocking socket carrying the bypass mark, bound to
/// `opts.source` if given, with TCP_NODELAY.
pub async fn connect_upstream(
    dst: SocketAddr,
    opts: &UpstreamOptions,
) -> Result<TcpStream, (ConnectErrorKind, io::Error)> {
    let other = |e| (ConnectErrorKind::Other, e);
    // Created nonblocking (SOCK_NONBLOCK): one system call fewer per connection.
    let sock = Socket::new(
        Domain::for_address(dst),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )
    .map_err(other)?;
    let mark = opts.bypass_mark;
    if mark != 0 {
        sock.set_mark(mark).map_err(|e| {
            other(io::Error::new(
                e.kind(),
                format!("setting SO_MARK {mark:#x}: {e}"),
            ))
        })?;
    }
    if let Some(ip) = opts.source {
        // Choose the source port at connect() time, by the whole 4-tuple, instead of
        // reserving one per bind: a fixed source address would otherwise cap the proxy
        // at one ephemeral port range of concurrent upstream connections in total.
        let _ = nix::sys::socket::setsockopt(
            &sock,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        );
        sock.bind(&SocketAddr::new(ip, 0).into()).map_err(|e| {
            other(io::Error::new(
                e.kind(),
                format!("binding source address {ip}: {e}"),
            ))
        })?;
    }
    sock.set_tcp_nodelay(true).map_err(other)?;
    let sock = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
    match tokio::time::timeout(opts.connect_timeout, sock.connect(dst)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err((classify_connect_error(&e), e)),
        Err(_) => Err((
            ConnectErrorKind::Timeout,
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {:?}", opts.connect_timeout),
            ),
        )),
    }
}

fn classify_connect_error(e: &io::Error) -> ConnectErrorKind {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ConnectErrorKind::Refused,
        io::ErrorKind::TimedOut => ConnectErrorKind::Timeout,
        _ => ConnectErrorKind::Other,
    }
}

/// Connects to `dst` and forwards between it and `client` until both are done. A failed
/// connect resets the client at once and is counted by kind; a successful one counts as
/// forwarded (and its connect time observed), the bytes are counted as they flow, the
/// connection's duration when it closes, and its destination's counters when
/// per-destination stats are on.
pub async fn connect_and_forward(
    client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    opts: &UpstreamOptions,
    all: &Stats,
    dir: Direction,
) {
    let stats = all.direction(dir);
    let direction = dir.as_str();
    all.destinations.connection(dir, dst);
    let started = Instant::now();
    // Boxed so the connect state does not grow every idle connection's future.
    let connected = Box::pin(connect_upstream(dst, opts)).await;
    let upstream = match connected {
        Ok(s) => s,
        Err((kind, e)) => {
            stats.upstream_connect_error(kind);
            warn!(direction, client = %peer, orig_dst = %dst, kind = kind.as_str(), error = %e,
                "upstream connect failed; resetting client");
            reset_on_close(&client);
            return;
        }
    };
    stats.forwarded_total.fetch_add(1, Relaxed);
    let started = {
        let now = Instant::now();
        stats.upstream_connect_seconds.observe(now - started);
        now
    };
    let report = forward(client, upstream, stats).await;
    stats.connection_seconds.observe(started.elapsed());
    all.destinations.closed(
        dir,
        dst,
        report.client_to_upstream,
        report.upstream_to_client,
    );
    debug!(
        direction,
        client = %peer,
        orig_dst = %dst,
        bytes_client_to_upstream = report.client_to_upstream,
        bytes_upstream_to_client = report.upstream_to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        error = report.result.as_ref().err().map(tracing::field::display),
        "connection closed"
    );
}
