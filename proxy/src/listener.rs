//! Listening sockets and the one accept loop that outbound and inbound listeners share: a
//! direction ([`Handler`]) only decides what happens to an accepted connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::drain::{Deadline, DrainWatch};

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

/// Spawns an accept loop per listener, every one with the same handler.
pub fn spawn_accept_loops<H: Handler>(
    listeners: Vec<TcpListener>,
    ctx: Arc<H>,
    drain: &DrainWatch,
) -> Vec<JoinHandle<()>> {
    listeners
        .into_iter()
        .map(|l| tokio::spawn(accept_loop(l, ctx.clone(), drain.clone())))
        .collect()
}

/// Accepts until the drain starts, each connection running (tracked by the drain) until it
/// ends or the drain's deadline passes.
pub async fn accept_loop<H: Handler>(listener: TcpListener, ctx: Arc<H>, drain: DrainWatch) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = drain.signaled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                drain.track(connection_task(ctx.clone(), stream, peer, drain.deadline()));
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

/// The task of one accepted connection: runs it to the end, or until `deadline` (the
/// drain's) passes, which closes both sockets.
pub async fn connection_task<H: Handler>(
    ctx: Arc<H>,
    client: TcpStream,
    peer: SocketAddr,
    deadline: Deadline,
) {
    // The handler is polled first: the opaque forwarder watches the same deadline
    // ([`Deadline::current_has_passed`]), so once it has passed the forwarder ends on that poll with
    // its connection counted; any other handler is dropped right after.
    tokio::select! {
        biased;
        _ = deadline.clone().scope(ctx.handle(client, peer)) => {}
        _ = deadline.passed() => {}
    }
}
