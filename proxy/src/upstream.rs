//! The upstream side of a connection, the same for both directions: a socket carrying the
//! bypass mark (and, inbound, the inbound source address), the connect, and the forward
//! between the client and it with its counters.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::forward::{forward, reset_on_close};
use crate::stats::{ConnectErrorKind, Direction, Stats};

/// How upstream sockets are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamOptions {
    /// SO_MARK for the upstream socket; 0 = none.
    pub bypass_mark: u32,
    /// Source address to bind (port 0) before connecting; `None` lets the kernel choose.
    pub source: Option<IpAddr>,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Opaque TCP: close after this long without a byte either way; `None`: never.
    pub idle_timeout: Option<Duration>,
}

/// Connects to `dst` from a fresh nonblocking socket carrying the bypass mark, bound to
/// `opts.source` if given, with TCP_NODELAY and keepalive ([`crate::listener::KEEPALIVE`]).
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
    crate::listener::set_keepalive(&sock).map_err(other)?;
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
///
/// `opts` makes the upstream options for `dst` when they are needed (for the connect, then
/// the idle timeout), so that no copy of them is held in every open connection's future.
pub async fn connect_and_forward(
    client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    opts: impl Fn(SocketAddr) -> UpstreamOptions,
    all: &Stats,
    dir: Direction,
) {
    let stats = all.direction(dir);
    let direction = dir.as_str();
    all.destinations.connection(dir, dst);
    let started = Instant::now();
    // Boxed so the connect state does not grow every idle connection's future.
    let connected = Box::pin(async { connect_upstream(dst, &opts(dst)).await }).await;
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
    let report = forward(client, upstream, stats, opts(dst).idle_timeout).await;
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
        idle_timed_out = report.idle_timed_out,
        cut_at_drain_deadline = report.cut,
        "connection closed"
    );
}
