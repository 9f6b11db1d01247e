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

use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;

use crate::drain::{Deadline, MovedState, Offered};
use crate::forward::{forward_from, reset_on_close, Carried, ForwardReport, Paused};
use crate::stats::{ActiveGuard, ConnectErrorKind, Direction, Stats};

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
    connect_upstream_with(dst, opts, false).await
}

/// [`connect_upstream`], asking for kernel forwarding of the socket first when `kernel` (an
/// opaque connection, with [`crate::kforward`] on): the kernel puts it into its map when it
/// is established. Failing to ask only leaves the connection to be copied here.
async fn connect_upstream_with(
    dst: SocketAddr,
    opts: &UpstreamOptions,
    kernel: bool,
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
    // Kernel forwarding is on only with a bypass mark (`kforward::start`: the programs take
    // the request only from a marked socket), which this socket carries by now.
    if kernel {
        let _ = crate::kforward::request_marked(&sock);
    }
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
    let kernel = crate::kforward::enabled();
    let connected = Box::pin(async { connect_upstream_with(dst, &opts(dst), kernel).await }).await;
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
    let report = forward_from(client, upstream, stats, opts(dst).idle_timeout, None).await;
    let conn = Conn {
        peer,
        dst,
        dir,
        started,
    };
    if let Some(moving) = after_forward(report, conn, opts(dst).idle_timeout, all) {
        moving.await
    }
}

/// What a forwarded connection is, besides its sockets and counts.
#[derive(Debug, Clone, Copy)]
struct Conn {
    peer: SocketAddr,
    dst: SocketAddr,
    dir: Direction,
    /// When the upstream connect completed (in whichever process).
    started: Instant,
}

/// Carries on a connection moved here from the previous process (see
/// [`crate::upgrade`]): counted active here, not accepted or forwarded again (the previous
/// process counted that), its duration and per-destination bytes counted here when it
/// closes, and moved on again at the next upgrade.
pub async fn resume(
    client: TcpStream,
    upstream: TcpStream,
    state: MovedState,
    idle: Option<Duration>,
    all: &Stats,
) {
    let dir = if state.inbound {
        Direction::Inbound
    } else {
        Direction::Outbound
    };
    let _active = ActiveGuard::resumed(all.direction(dir));
    let conn = Conn {
        peer: state.peer,
        dst: state.orig_dst,
        dir,
        started: state.started(),
    };
    let carried = Carried {
        client_to_upstream: state.bytes_client_to_upstream,
        upstream_to_client: state.bytes_upstream_to_client,
        client_eof: state.client_eof,
        upstream_eof: state.upstream_eof,
        stay: false,
        kernel_folded: (
            state.kernel_folded_client_to_upstream,
            state.kernel_folded_upstream_to_client,
        ),
    };
    carry_on(client, upstream, conn, carried, idle, all).await;
}

/// Forwards from `carried` until the connection closes (then counts its duration and its
/// destination's bytes) or it was taken by a new process (then counts nothing: the new
/// process does at the close). A connection the new process did not take carries on here.
async fn carry_on(
    client: TcpStream,
    upstream: TcpStream,
    conn: Conn,
    carried: Carried,
    idle: Option<Duration>,
    all: &Stats,
) {
    let report = forward_from(
        client,
        upstream,
        all.direction(conn.dir),
        idle,
        Some(&carried),
    )
    .await;
    if let Some(moving) = after_forward(report, conn, idle, all) {
        moving.await
    }
}

/// After the forwarder returned: counts the closed connection, or (paused to move) returns
/// the offer to the new process, boxed so that only a connection being moved pays for it.
/// Not async, so that the report is no part of the caller's future.
fn after_forward(
    mut report: ForwardReport,
    conn: Conn,
    idle: Option<Duration>,
    all: &Stats,
) -> Option<Pin<Box<impl Future<Output = ()> + Send + '_>>> {
    match report.paused.take() {
        None => {
            closed(&conn, &report, all);
            None
        }
        Some(paused) => Some(Box::pin(offer_or_carry_on(paused, conn, idle, all))),
    }
}

/// Offers a paused connection to the new process; carries on here if it does not take it
/// (and, when moving goes on nonetheless, without pausing again: it stays here).
async fn offer_or_carry_on(paused: Paused, conn: Conn, idle: Option<Duration>, all: &Stats) {
    let Paused {
        client,
        upstream,
        mut carried,
    } = paused;
    let (client, upstream) = match offer(client, upstream, &conn, carried).await {
        Some(kept) => kept,
        None => {
            debug!(direction = conn.dir.as_str(), client = %conn.peer, orig_dst = %conn.dst,
                "connection moved to the new process");
            return;
        }
    };
    carried.stay = Deadline::current_move_requested();
    Box::pin(carry_on(client, upstream, conn, carried, idle, all)).await
}

/// Offers the paused connection to the new process: both sockets (out of this process's
/// event loop) with its state. `None` once it took them; else the sockets back, or `None`
/// when they could not be taken out or put back (the connection is lost then).
async fn offer(
    client: TcpStream,
    upstream: TcpStream,
    conn: &Conn,
    c: Carried,
) -> Option<(TcpStream, TcpStream)> {
    let state = MovedState {
        inbound: conn.dir == Direction::Inbound,
        peer: conn.peer,
        orig_dst: conn.dst,
        age_ms: conn.started.elapsed().as_millis() as u64,
        bytes_client_to_upstream: c.client_to_upstream,
        bytes_upstream_to_client: c.upstream_to_client,
        client_eof: c.client_eof,
        upstream_eof: c.upstream_eof,
        kernel_folded_client_to_upstream: c.kernel_folded.0,
        kernel_folded_upstream_to_client: c.kernel_folded.1,
    };
    let lost = |e: io::Error| {
        warn!(client = %conn.peer, orig_dst = %conn.dst, error = %e,
            "cannot take a paused connection out of the event loop; closing it");
    };
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => (OwnedFd::from(c), OwnedFd::from(u)),
        (Err(e), _) | (_, Err(e)) => {
            lost(e);
            return None;
        }
    };
    match Deadline::offer_current(client, upstream, state).await {
        Offered::Taken => None,
        Offered::Kept(c, u) => {
            let back = |fd: OwnedFd| TcpStream::from_std(std::net::TcpStream::from(fd));
            match (back(c), back(u)) {
                (Ok(c), Ok(u)) => Some((c, u)),
                (Err(e), _) | (_, Err(e)) => {
                    lost(e);
                    None
                }
            }
        }
    }
}

/// Counts a closed connection: its duration, its destination's bytes; logs it.
fn closed(conn: &Conn, report: &ForwardReport, all: &Stats) {
    let stats = all.direction(conn.dir);
    let Conn {
        peer,
        dst,
        dir,
        started,
    } = *conn;
    stats.connection_seconds.observe(started.elapsed());
    all.destinations.closed(
        dir,
        dst,
        report.client_to_upstream,
        report.upstream_to_client,
    );
    debug!(
        direction = dir.as_str(),
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
