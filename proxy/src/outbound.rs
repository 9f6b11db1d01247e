//! Outbound listeners: accept a redirected connection, learn where it was going, connect
//! there with the bypass mark and forward.

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
use crate::original_dst::{original_dst, OriginalDstError};
use crate::stats::{ActiveGuard, ConnectErrorKind, Stats};

/// Listen backlog of the outbound listeners (capped by net.core.somaxconn).
const BACKLOG: i32 = 1024;

/// How the original destination of an accepted connection is found. The default is
/// [`original_dst`] (getsockopt); tests and embedders may substitute their own.
pub type OriginalDstLookup =
    Arc<dyn Fn(&TcpStream) -> Result<SocketAddr, OriginalDstError> + Send + Sync>;

/// The default lookup: getsockopt(SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST).
pub fn getsockopt_lookup() -> OriginalDstLookup {
    Arc::new(|s: &TcpStream| original_dst(s))
}

/// What every outbound connection needs; shared by all listeners of one proxy.
pub struct Outbound {
    /// Addresses the outbound listeners are bound to (a connection to one of them is a loop).
    pub listeners: Vec<SocketAddr>,
    /// SO_MARK for upstream sockets; 0 = none.
    pub bypass_mark: u32,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Original destination lookup.
    pub lookup: OriginalDstLookup,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("listeners", &self.listeners)
            .field("bypass_mark", &format_args!("{:#x}", self.bypass_mark))
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

/// Binds one listening socket (SO_REUSEADDR; IPv6 sockets are IPv6-only so that
/// `0.0.0.0:P` and `[::]:P` can both be bound).
pub fn bind_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Accepts until `stop` is cancelled, running each connection on `tracker` until it ends
/// or `kill` is cancelled (drain deadline).
pub async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Outbound>,
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
pub async fn connection_task(
    ctx: Arc<Outbound>,
    client: TcpStream,
    peer: SocketAddr,
    kill: CancellationToken,
) {
    tokio::select! {
        biased;
        _ = kill.cancelled() => {}
        _ = handle_connection(&ctx, client, peer) => {}
    }
}

/// Handles one accepted connection from start to close.
pub async fn handle_connection(ctx: &Outbound, client: TcpStream, peer: SocketAddr) {
    let _active = ActiveGuard::accepted(&ctx.stats);
    let orig_dst = match (ctx.lookup)(&client) {
        Ok(a) => a,
        Err(e) => {
            ctx.stats.orig_dst_missing.fetch_add(1, Relaxed);
            warn!(client = %peer, reason = %e, "no original destination (connection not intercepted?); closing");
            reset_on_close(&client);
            return;
        }
    };
    if is_own_listener(orig_dst, &ctx.listeners) {
        ctx.stats.loop_rejected.fetch_add(1, Relaxed);
        warn!(client = %peer, orig_dst = %orig_dst, reason = "original destination is the proxy's own listener",
            "refusing to forward to itself; closing");
        reset_on_close(&client);
        return;
    }
    let _ = client.set_nodelay(true);

    // Boxed so the connect state does not grow every idle connection's future.
    let connected = Box::pin(connect_upstream(
        orig_dst,
        ctx.bypass_mark,
        ctx.connect_timeout,
    ))
    .await;
    let upstream = match connected {
        Ok(s) => s,
        Err((kind, e)) => {
            ctx.stats.upstream_connect_error(kind);
            warn!(client = %peer, orig_dst = %orig_dst, kind = kind.as_str(), error = %e,
                "upstream connect failed; resetting client");
            reset_on_close(&client);
            return;
        }
    };
    ctx.stats.forwarded_total.fetch_add(1, Relaxed);

    let started = Instant::now();
    let report = forward(client, upstream, &ctx.stats).await;
    debug!(
        client = %peer,
        orig_dst = %orig_dst,
        bytes_client_to_upstream = report.client_to_upstream,
        bytes_upstream_to_client = report.upstream_to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        error = report.result.as_ref().err().map(tracing::field::display),
        "connection closed"
    );
}

/// Connects to `dst` from a fresh socket carrying the bypass mark.
pub async fn connect_upstream(
    dst: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> Result<TcpStream, (ConnectErrorKind, io::Error)> {
    let other = |e| (ConnectErrorKind::Other, e);
    let sock =
        Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP)).map_err(other)?;
    if mark != 0 {
        sock.set_mark(mark).map_err(|e| {
            other(io::Error::new(
                e.kind(),
                format!("setting SO_MARK {mark:#x}: {e}"),
            ))
        })?;
    }
    sock.set_tcp_nodelay(true).map_err(other)?;
    sock.set_nonblocking(true).map_err(other)?;
    let sock = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
    match tokio::time::timeout(timeout, sock.connect(dst)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err((classify_connect_error(&e), e)),
        Err(_) => Err((
            ConnectErrorKind::Timeout,
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
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

/// True when forwarding to `dst` would connect back to one of our own listeners: it is a
/// listener address exactly, or it has a listener's port and a loopback, unspecified,
/// listener or local interface address.
pub fn is_own_listener(dst: SocketAddr, listeners: &[SocketAddr]) -> bool {
    let ip = canonical(dst.ip());
    let mut same_port = false;
    for l in listeners {
        if l.port() != dst.port() {
            continue;
        }
        if canonical(l.ip()) == ip || ip.is_loopback() || ip.is_unspecified() {
            return true;
        }
        same_port = true;
    }
    same_port && is_local_interface_address(ip)
}

fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Whether `ip` is configured on a local interface. Only asked on the rare path where the
/// port already matches a listener, so a getifaddrs call per question is fine.
fn is_local_interface_address(ip: IpAddr) -> bool {
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => addrs.into_iter().any(|a| {
            a.address.is_some_and(|s| {
                s.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())) == Some(ip)
                    || s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())) == Some(ip)
            })
        }),
        // Can't tell: err on the side of not forwarding to ourselves.
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loop_detection() {
        let ls = [a("127.0.0.1:15001"), a("[::1]:15001")];
        assert!(is_own_listener(a("127.0.0.1:15001"), &ls));
        assert!(is_own_listener(a("127.0.0.2:15001"), &ls));
        assert!(is_own_listener(a("[::1]:15001"), &ls));
        assert!(is_own_listener(a("[::ffff:127.0.0.1]:15001"), &ls));
        assert!(is_own_listener(a("0.0.0.0:15001"), &ls));
        assert!(!is_own_listener(a("127.0.0.1:15002"), &ls));
        assert!(
            !is_own_listener(a("192.0.2.1:15001"), &ls),
            "TEST-NET address is not local"
        );
        assert!(!is_own_listener(a("192.0.2.1:80"), &ls));
        // Non-loopback listener: exact match, or another local address on its port.
        let wild = [a("0.0.0.0:15001")];
        assert!(is_own_listener(a("127.0.0.1:15001"), &wild));
        assert!(!is_own_listener(a("198.51.100.7:15001"), &wild));
    }

    /// Every open connection costs one of these futures (plus its two sockets); keep it small.
    #[tokio::test]
    async fn connection_future_is_small() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, peer) = l.accept().await.unwrap();
        let ctx = Arc::new(Outbound {
            listeners: vec![],
            bypass_mark: 0,
            connect_timeout: Duration::from_secs(1),
            stats: Arc::default(),
            lookup: getsockopt_lookup(),
        });
        let task = connection_task(ctx, s, peer, CancellationToken::new());
        let size = std::mem::size_of_val(&task);
        println!("connection task future: {size} bytes");
        assert!(size < 1024, "connection task future is {size} bytes");
    }
}
