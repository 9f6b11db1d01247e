//! The copy loop between a client and its upstream.
//!
//! - Byte-exact in both directions, each direction independent.
//! - Half-close: EOF from one side becomes `shutdown(SHUT_WR)` on the other, and the other
//!   direction keeps flowing until it ends too. Then both sockets are closed.
//! - An error on either side (e.g. an RST) ends both directions; both sockets are then
//!   closed with SO_LINGER 0, so the peer that is still there sees a reset, as it would
//!   have without the proxy in the way.
//! - Idle connections hold no buffer: a direction waits for readability with nothing
//!   allocated, takes a buffer from a small per-thread pool only while data flows and
//!   gives it back before it waits again. (tokio's `copy_bidirectional` keeps 2 x 8 KiB
//!   per connection forever.)
//! - The copy is a small hand-written future over the sockets' borrowed read and write
//!   halves: the wakers live in the sockets' registrations (one slot per direction, enough
//!   since each socket is read by one direction and written by the other, in one task), so
//!   the per-connection state is a few words per direction. Reads and writes go through
//!   tokio's `poll_read`/`poll_write`, which clear the readiness after a short read or
//!   write: a message costs one `read` and one `write`, not a third call that only returns
//!   EAGAIN. Polls use tokio's cooperative budget, so a busy connection yields to others.
//! - Idle timeout (`--tcp-idle-timeout`, default 1 h as in Envoy): a connection with no
//!   byte in either direction for that long is closed (FIN both ways). The timer is armed
//!   once and only moved when it fires early, so traffic costs a clock read per wake-up.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::drain::Deadline;
use crate::stats::DirectionStats;

/// Size of one copy buffer.
pub const BUF_SIZE: usize = 64 * 1024;
/// Buffers kept per worker thread for reuse; more are freed when given back.
const POOL_PER_THREAD: usize = 16;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A copy buffer on loan from the per-thread pool; returned to the pool on drop.
struct PooledBuf(Box<[u8]>);

impl PooledBuf {
    fn take() -> Self {
        let buf = POOL.try_with(|p| p.borrow_mut().pop()).ok().flatten();
        PooledBuf(buf.unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice()))
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_PER_THREAD {
                p.push(buf);
            }
        });
    }
}

/// Which side of a forwarded connection an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

/// An I/O error that ended a forwarded connection.
#[derive(Debug, thiserror::Error)]
#[error("{} side: {error}", side.as_str())]
pub struct ForwardError {
    /// The socket the failing call was made on.
    pub side: Side,
    #[source]
    pub error: io::Error,
}

/// What happened on one forwarded connection.
#[derive(Debug)]
pub struct ForwardReport {
    /// Bytes copied from the client to the upstream.
    pub client_to_upstream: u64,
    /// Bytes copied from the upstream to the client.
    pub upstream_to_client: u64,
    /// `Ok` when both directions ended with EOF, when the idle timeout closed the
    /// connection (`idle_timed_out`) or when the drain's deadline cut it (`cut`); the first
    /// error otherwise.
    pub result: Result<(), ForwardError>,
    /// The idle timeout closed the connection.
    pub idle_timed_out: bool,
    /// Closed (reset both ways) because the drain's deadline passed while it was open.
    pub cut: bool,
}

/// Forwards between `client` and `upstream` until both directions are done (or one
/// fails, or nothing flowed for `idle`, or the connection's drain deadline passes:
/// [`Deadline::current_has_passed`]), then closes both sockets. Adds the bytes to `stats`
/// as they flow.
pub async fn forward(
    mut client: TcpStream,
    mut upstream: TcpStream,
    stats: &DirectionStats,
    idle: Option<Duration>,
) -> ForwardReport {
    let (client_rd, client_wr) = client.split();
    let (upstream_rd, upstream_wr) = upstream.split();
    let mut copy = Bidirectional {
        client_rd,
        client_wr,
        upstream_rd,
        upstream_wr,
        stats,
        c2u: Direction::default(),
        u2c: Direction::default(),
        // Boxed: the timer is larger than the rest of the copy state.
        idle: idle.map(|after| IdleTimer {
            after,
            last: Instant::now(),
            sleep: Box::pin(tokio::time::sleep(after)),
        }),
        idle_timed_out: false,
    };
    // Checked before each poll of the copy (no future of its own: every open connection
    // holds this state).
    let (result, cut) = std::future::poll_fn(|cx| {
        if Deadline::current_has_passed() {
            return Poll::Ready((Ok(()), true));
        }
        Pin::new(&mut copy).poll(cx).map(|r| (r, false))
    })
    .await;
    let (client_to_upstream, upstream_to_client) = (copy.c2u.copied, copy.u2c.copied);
    let idle_timed_out = copy.idle_timed_out;
    drop(copy);
    if result.is_err() || cut {
        reset_on_close(&client);
        reset_on_close(&upstream);
    }
    drop(client);
    drop(upstream);
    ForwardReport {
        client_to_upstream,
        upstream_to_client,
        result,
        idle_timed_out,
        cut,
    }
}

/// The idle timeout of one connection: `sleep` fires at `last + after` at the earliest.
struct IdleTimer {
    after: Duration,
    /// When a byte last moved.
    last: Instant,
    sleep: Pin<Box<Sleep>>,
}

/// Makes the coming close send an RST instead of a FIN (SO_LINGER 0). Best effort.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Both directions of one connection.
struct Bidirectional<'a> {
    client_rd: ReadHalf<'a>,
    client_wr: WriteHalf<'a>,
    upstream_rd: ReadHalf<'a>,
    upstream_wr: WriteHalf<'a>,
    stats: &'a DirectionStats,
    c2u: Direction,
    u2c: Direction,
    idle: Option<IdleTimer>,
    idle_timed_out: bool,
}

impl Future for Bidirectional<'_> {
    type Output = Result<(), ForwardError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let moved_before = this.c2u.copied + this.u2c.copied;
        let c2u = this.c2u.poll_copy(
            cx,
            (&mut this.client_rd, Side::Client),
            (&mut this.upstream_wr, Side::Upstream),
            &this.stats.bytes_client_to_upstream,
        )?;
        let u2c = this.u2c.poll_copy(
            cx,
            (&mut this.upstream_rd, Side::Upstream),
            (&mut this.client_wr, Side::Client),
            &this.stats.bytes_upstream_to_client,
        )?;
        if let (Poll::Ready(()), Poll::Ready(())) = (c2u, u2c) {
            return Poll::Ready(Ok(()));
        }
        let Some(idle) = &mut this.idle else {
            return Poll::Pending;
        };
        if this.c2u.copied + this.u2c.copied != moved_before {
            idle.last = Instant::now();
        }
        while idle.sleep.as_mut().poll(cx).is_ready() {
            let due = idle.last + idle.after;
            if Instant::now() >= due {
                this.idle_timed_out = true;
                return Poll::Ready(Ok(()));
            }
            // Bytes moved since it was armed: arm it again for the new due time.
            idle.sleep.as_mut().reset(due.into());
        }
        Poll::Pending
    }
}

/// One direction: `buf[start..end]` is read but not yet written; `buf` is `None` while
/// nothing is in flight.
#[derive(Default)]
struct Direction {
    buf: Option<PooledBuf>,
    start: usize,
    end: usize,
    copied: u64,
    done: bool,
}

impl Direction {
    /// Copies `src` to `dst` until `src` would block (Pending, holding no buffer), or until
    /// EOF on `src` has been passed on as `shutdown(SHUT_WR)` on `dst` (Ready).
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        (src, src_side): (&mut ReadHalf<'_>, Side),
        (dst, dst_side): (&mut WriteHalf<'_>, Side),
        total: &AtomicU64,
    ) -> Poll<Result<(), ForwardError>> {
        let src_err = |error| ForwardError {
            side: src_side,
            error,
        };
        let dst_err = |error| ForwardError {
            side: dst_side,
            error,
        };
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Flush what was read. Waiting for the peer to take it keeps the buffer.
            if let Some(buf) = &self.buf {
                while self.start < self.end {
                    let written =
                        ready!(Pin::new(&mut *dst).poll_write(cx, &buf.0[self.start..self.end]));
                    match written {
                        Ok(0) => return Poll::Ready(Err(dst_err(io::ErrorKind::WriteZero.into()))),
                        Ok(n) => {
                            self.start += n;
                            self.copied += n as u64;
                            total.fetch_add(n as u64, Relaxed);
                        }
                        Err(e) if is_retry(&e) => {}
                        Err(e) => return Poll::Ready(Err(dst_err(e))),
                    }
                }
            }
            // Wait for data with no buffer held. After a short read tokio has cleared the
            // readiness, so this returns Pending without another system call.
            match src.as_ref().poll_read_ready(cx) {
                Poll::Pending => {
                    self.buf = None;
                    return Poll::Pending;
                }
                Poll::Ready(r) => r.map_err(src_err)?,
            }
            let buf = self.buf.get_or_insert_with(PooledBuf::take);
            let mut rb = ReadBuf::new(&mut buf.0);
            match Pin::new(&mut *src).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    self.buf = None;
                    return Poll::Pending;
                }
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    self.buf = None;
                    self.done = true;
                    return Poll::Ready(
                        match SockRef::from(dst.as_ref()).shutdown(Shutdown::Write) {
                            Ok(()) => Ok(()),
                            // The peer is gone already; its own direction reports how.
                            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                            Err(e) => Err(dst_err(e)),
                        },
                    );
                }
                Poll::Ready(Ok(())) => {
                    self.end = rb.filled().len();
                    self.start = 0;
                }
                Poll::Ready(Err(e)) if is_retry(&e) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(src_err(e))),
            }
        }
    }
}

fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_and_bounds() {
        let bufs: Vec<_> = (0..POOL_PER_THREAD + 4)
            .map(|_| PooledBuf::take())
            .collect();
        drop(bufs);
        assert_eq!(POOL.with(|p| p.borrow().len()), POOL_PER_THREAD);
        let b = PooledBuf::take();
        assert_eq!(b.0.len(), BUF_SIZE);
        assert_eq!(POOL.with(|p| p.borrow().len()), POOL_PER_THREAD - 1);
    }
}
