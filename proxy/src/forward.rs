//! The copy loop between a client and its upstream.
//!
//! - Byte-exact in both directions, each direction independent.
//! - Half-close: EOF from one side becomes `shutdown(SHUT_WR)` on the other, and the other
//!   direction keeps flowing until it ends too. Then both sockets are closed (the second
//!   EOF is passed on by that close alone: its FIN, without a `shutdown` first).
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
//! - Moving to a new process at an upgrade: once asked ([`Deadline::current_move_requested`]),
//!   each direction stops reading at the point where it holds no byte (what it read is
//!   written first), and the forwarder returns the two sockets with the state to carry
//!   on from ([`Paused`]); [`forward_from`] carries on from such a state.
//! - Kernel forwarding ([`crate::kforward`], on unless `--kernel-forward off`): once a
//!   direction has written everything it read, it arms its source socket with the peer's
//!   cookie and the bytes read so far; from then on the kernel moves that direction's bytes
//!   (the direction still waits on its source, and reads what the kernel passed it instead:
//!   bytes that arrived before the pair was armed, or beyond the peer's backlog limit
//!   (`KFWD_MAX_UNACKED`), then arms again; it writes them once the peer holds every byte the
//!   kernel redirected before them). At EOF it waits until
//!   the peer socket has been handed every byte the kernel redirected (`TCP_INFO`) before it
//!   passes the EOF on, so the FIN never overtakes them. Errors and resets end the
//!   connection as before. A socket that cannot be armed (not in the kernel's map) is copied
//!   here (`kforward::FALLBACKS`). The byte totals take the kernel's redirected bytes every
//!   `FOLD_EVERY` while the connection lives, the rest when it ends (the per-destination
//!   counts and the connection's report take them all when it ends). Once the kernel has
//!   carried both directions for `WATCH_AFTER` with both arms in force, the connection is watched by [`crate::kwatch`] instead of
//!   polled (a poll for reading would be woken by each byte the kernel redirects), until an
//!   EOF, an error, a move, or bytes passed to it (found at its fold) bring it back.
//! - Idle timeout (`--tcp-idle-timeout`, default 1 h as in Envoy): a connection with no
//!   byte in either direction for that long is closed (FIN both ways). The timer is armed
//!   once and only moved when it fires early, so traffic costs a clock read per wake-up.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
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
use crate::kforward;
use crate::kwatch::{NotWatched, Watch};
use crate::stats::DirectionStats;

/// Size of one copy buffer.
pub const BUF_SIZE: usize = 64 * 1024;
/// Buffers kept per worker thread for reuse; more are freed when given back.
const POOL_PER_THREAD: usize = 16;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8; BUF_SIZE]>>> = const { RefCell::new(Vec::new()) };
}

/// A copy buffer on loan from the per-thread pool; returned to the pool on drop.
/// (A thin pointer: the connection's state holds it.)
struct PooledBuf(Option<Box<[u8; BUF_SIZE]>>);

impl PooledBuf {
    fn take() -> Self {
        let buf = POOL.try_with(|p| p.borrow_mut().pop()).ok().flatten();
        PooledBuf(Some(buf.unwrap_or_else(|| {
            vec![0u8; BUF_SIZE]
                .into_boxed_slice()
                .try_into()
                .expect("BUF_SIZE bytes")
        })))
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_deref().expect("held until dropped")
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().expect("held until dropped")
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let Some(buf) = self.0.take() else { return };
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
    /// Paused to move to a new process: the sockets, open, holding none of the bytes.
    pub paused: Option<Paused>,
}

/// A connection paused between two reads in both directions, to be moved.
#[derive(Debug)]
pub struct Paused {
    pub client: TcpStream,
    pub upstream: TcpStream,
    /// Where to carry on from.
    pub carried: Carried,
}

/// The state a forwarder starts from: fresh ([`Carried::default`]) or paused elsewhere.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    /// Bytes copied so far each way.
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    /// EOF from the client was passed on (the client-to-upstream direction is done).
    pub client_eof: bool,
    /// EOF from the upstream was passed on.
    pub upstream_eof: bool,
    /// Never pause to move (an offer failed here while moving goes on: it stays).
    pub stay: bool,
    /// Of the bytes the kernel redirected (client to upstream, upstream to client), those
    /// already in a process's byte totals ([`FOLD_EVERY`]).
    pub kernel_folded: (u64, u64),
}

/// Forwards between `client` and `upstream` until both directions are done (or one
/// fails, or nothing flowed for `idle`, or the connection's drain deadline passes:
/// [`Deadline::current_passed_or_move`]), then closes both sockets. Adds the bytes to `stats`
/// as they flow.
pub async fn forward(
    client: TcpStream,
    upstream: TcpStream,
    stats: &DirectionStats,
    idle: Option<Duration>,
) -> ForwardReport {
    forward_from(client, upstream, stats, idle, None).await
}

/// [`forward`] from `carried` (a connection paused in another process; `None`: a new
/// one): its counts go on from there, and a direction that had ended stays ended. Returns
/// with `paused` set when asked to move ([`Deadline::current_move_requested`]).
///
/// Not an async fn: the copy state is built here and the future holds it once (an async
/// fn would hold its arguments besides the state made from them).
pub fn forward_from<'a>(
    client: TcpStream,
    upstream: TcpStream,
    stats: &'a DirectionStats,
    idle: Option<Duration>,
    carried: Option<&Carried>,
) -> impl Future<Output = ForwardReport> + Send + 'a {
    let moved = carried.is_some();
    let carried = carried.copied().unwrap_or_default();
    let kernel = kernel_pair(&client, &upstream);
    if kernel.is_none() && kforward::enabled() {
        kforward::FALLBACKS.fetch_add(1, Relaxed);
    }
    let check = kernel.is_some() || moved;
    let mut copy = Bidirectional {
        socks: Socks::Polled { client, upstream },
        watch_at: None,
        watch_not_before: None,
        stats,
        c2u: Direction::carried(carried.client_to_upstream, carried.client_eof, check),
        u2c: Direction::carried(carried.upstream_to_client, carried.upstream_eof, check),
        kernel,
        kernel_counted: false,
        pause: false,
        stay: carried.stay,
        paused: false,
        moved,
        folded: carried.kernel_folded,
        fold: None,
        fold_span: 0,
        // Boxed: the timer is larger than the rest of the copy state.
        idle: idle.map(|after| IdleTimer {
            after,
            last: Instant::now(),
            sleep: Box::pin(tokio::time::sleep(after)),
            kernel_moved: 0,
        }),
        idle_timed_out: false,
    };
    async move {
        // Checked before each poll of the copy (no future of its own: every open
        // connection holds this state).
        let (result, cut) = std::future::poll_fn(|cx| {
            let (passed, move_requested) = Deadline::current_passed_or_move(copy.stay);
            if passed {
                return Poll::Ready((Ok(()), true));
            }
            copy.pause = move_requested;
            Pin::new(&mut copy).poll(cx).map(|r| (r, false))
        })
        .await;
        copy.finish(result, cut)
    }
}

/// The cookies of the two sockets when both can be forwarded in the kernel: kernel
/// forwarding is on and each socket is in the kernel's map (the arm of a socket that is not
/// fails later, and that direction is copied here).
fn kernel_pair(client: &TcpStream, upstream: &TcpStream) -> Option<Pair> {
    if !kforward::enabled() {
        return None;
    }
    Some(Pair {
        client: kforward::cookie(client).ok()?,
        upstream: kforward::cookie(upstream).ok()?,
    })
}

/// The socket cookies of a kernel-forwarded pair.
#[derive(Clone, Copy)]
struct Pair {
    client: u64,
    upstream: u64,
}

impl Bidirectional<'_> {
    /// The report once the copy has returned: the sockets back if it paused, else closed
    /// (reset both ways after an error or at the deadline).
    fn finish(self, result: Result<(), ForwardError>, cut: bool) -> ForwardReport {
        let Bidirectional {
            socks,
            c2u,
            u2c,
            paused,
            idle_timed_out,
            stats,
            folded,
            ..
        } = self;
        let (mut client_to_upstream, mut upstream_to_client) = (c2u.copied, u2c.copied);
        // A watched connection ends here (it pauses only from tokio's poller).
        let socks = match socks {
            Socks::Polled { client, upstream } => Some(Ends::Polled(client, upstream)),
            Socks::Watched(w) => {
                let (c, u) = w.into_std();
                Some(Ends::Std(c, u))
            }
            Socks::Gone => None,
        };
        let paused = paused && result.is_ok() && !cut && matches!(socks, Some(Ends::Polled(..)));
        if let (false, Some((client, upstream))) = (paused, socks.as_ref().map(Ends::fds)) {
            // What the kernel moved, over the connection's life (also in earlier processes):
            // counted here, once, when the connection ends; the totals already hold what
            // was folded into them on the way.
            let mut folded = folded;
            if c2u.check {
                let r = kforward::count_ended(&client);
                client_to_upstream += r;
                fold_into(&stats.bytes_client_to_upstream, &mut folded.0, r);
            }
            if u2c.check {
                let r = kforward::count_ended(&upstream);
                upstream_to_client += r;
                fold_into(&stats.bytes_upstream_to_client, &mut folded.1, r);
            }
        }
        let paused = match socks {
            Some(Ends::Polled(client, upstream)) if paused => Some(Paused {
                client,
                upstream,
                // The bytes this process read (the kernel counts the rest): what the next
                // process arms with.
                carried: Carried {
                    client_to_upstream: c2u.copied,
                    upstream_to_client: u2c.copied,
                    client_eof: c2u.done,
                    upstream_eof: u2c.done,
                    stay: false,
                    kernel_folded: folded,
                },
            }),
            socks => {
                if let (true, Some((client, upstream))) =
                    (result.is_err() || cut, socks.as_ref().map(Ends::fds))
                {
                    reset_on_close(&client);
                    reset_on_close(&upstream);
                }
                None
            }
        };
        ForwardReport {
            client_to_upstream,
            upstream_to_client,
            result,
            idle_timed_out,
            cut,
            paused,
        }
    }
}

/// The connection's two sockets: polled by tokio, or watched while the kernel carries both
/// directions ([`kwatch`]).
enum Socks {
    Polled {
        client: TcpStream,
        upstream: TcpStream,
    },
    Watched(Watch),
    /// Lost between the two (taking them out of tokio's poller failed): the connection ends.
    Gone,
}

impl Socks {
    /// The two sockets (client, upstream), wherever they are.
    fn fds(&self) -> Option<(BorrowedFd<'_>, BorrowedFd<'_>)> {
        match self {
            Socks::Polled { client, upstream } => Some((client.as_fd(), upstream.as_fd())),
            Socks::Watched(w) => {
                let (c, u) = w.sockets();
                Some((c.as_fd(), u.as_fd()))
            }
            Socks::Gone => None,
        }
    }
}

/// The sockets of a connection as it ends: tokio's, or plain ones back from the watcher.
enum Ends {
    Polled(TcpStream, TcpStream),
    Std(std::net::TcpStream, std::net::TcpStream),
}

impl Ends {
    fn fds(&self) -> (BorrowedFd<'_>, BorrowedFd<'_>) {
        match self {
            Ends::Polled(c, u) => (c.as_fd(), u.as_fd()),
            Ends::Std(c, u) => (c.as_fd(), u.as_fd()),
        }
    }
}

/// How often the byte totals take what the kernel redirected for a connection since the
/// last time: a kernel-carried connection's bytes pass by no counter of this process, and
/// totals that stood still for the life of a long transfer (until its end) are not what an
/// operator's dashboards expect. Each time costs two `getsockopt` per connection the kernel
/// carries. The timer is made at the connection's first arm, which comes at its first drain:
/// a connection of one exchange makes it too, and ends before it fires (quick bench with it:
/// new connections EK÷E 0.84, as before it).
const FOLD_EVERY: Duration = Duration::from_secs(1);

/// A watched connection's bytes passed to this process (its peer fell `KFWD_MAX_UNACKED`
/// behind) announce themselves by no event the watcher waits for: its fold finds them. So a
/// watched connection's next fold comes before the kernel can have moved this much more of
/// one direction at the pace it moved since the last fold (a quarter of the limit: at that
/// pace the peer falls no further behind than that between two folds), [`FOLD_EVERY`] at the most and
/// [`FOLD_MIN`] at the least. A connection moving 1 GB/s each way is folded every 4 ms (two
/// `getsockopt`), one of keep-alive requests every second. Before this, a transfer watched
/// as it began stalled until its first fold, a second after its arm: 128 MiB each way took
/// 1.1 s instead of 0.14 s.
const FOLD_ROOM: u64 = interceptor_common::KFWD_MAX_UNACKED / 4;
/// See [`FOLD_ROOM`].
const FOLD_MIN: Duration = Duration::from_millis(2);

/// When a watched connection's next fold comes: `fastest` bytes moved by the kernel in one
/// direction over the `elapsed` since the last fold (see [`FOLD_ROOM`]). It comes sooner at
/// once, later by twice `elapsed` at the most: a transfer that paused (its receiver behind,
/// not yet by the limit) is not left for a second when it goes on.
fn next_fold(fastest: u64, elapsed: Duration) -> Duration {
    let paced = if fastest == 0 {
        FOLD_EVERY
    } else {
        elapsed.mul_f64(FOLD_ROOM as f64 / fastest as f64)
    };
    paced.min(elapsed * 2).clamp(FOLD_MIN, FOLD_EVERY)
}

/// The unit of a fold's span: 100 µs, up to 6.5 s (a span is a second or so).
const SPAN_UNIT: Duration = Duration::from_micros(100);

/// `d` in [`SPAN_UNIT`]s, rounded down, saturating.
fn span_of(d: Duration) -> u16 {
    u16::try_from(d.as_micros() / SPAN_UNIT.as_micros()).unwrap_or(u16::MAX)
}

/// The span `s` (see [`span_of`]).
fn span(s: u16) -> Duration {
    SPAN_UNIT * u32::from(s)
}

/// Adds to `total` what the kernel's `redirected` count holds beyond `folded` (what is in
/// the totals already), and takes note that it is in now. Returns what it added.
fn fold_into(total: &AtomicU64, folded: &mut u64, redirected: u64) -> u64 {
    if redirected > *folded {
        let added = redirected - *folded;
        total.fetch_add(added, Relaxed);
        *folded = redirected;
        return added;
    }
    0
}

/// How long the kernel carries both directions of a connection before it is watched
/// instead of polled ([`kwatch`]): a connection of one request and its answer is over by
/// then, and not worth the move's system calls; a keep-alive one has only begun.
const WATCH_AFTER: Duration = Duration::from_millis(10);

/// How long a connection is not watched after its fold found bytes the kernel passed to this
/// process while it was watched (its peer fell `KFWD_MAX_UNACKED` behind: a slow receiver, a
/// transfer that will fall behind again). Polled, such bytes are read as they come.
const WATCH_HOLD: Duration = Duration::from_secs(5);

/// The idle timeout of one connection: `sleep` fires at `last + after` at the earliest.
struct IdleTimer {
    after: Duration,
    /// When a byte last moved.
    last: Instant,
    sleep: Pin<Box<Sleep>>,
    /// Bytes the kernel had moved (both ways) when the timer last fired.
    kernel_moved: u64,
}

/// Makes the coming close send an RST instead of a FIN (SO_LINGER 0). Best effort.
pub fn reset_on_close<S: AsFd>(stream: &S) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Both directions of one connection.
struct Bidirectional<'a> {
    socks: Socks,
    /// Since the kernel carried both directions: when to watch the connection instead of
    /// polling it ([`WATCH_AFTER`]).
    watch_at: Option<Pin<Box<Sleep>>>,
    /// No watching before this: the kernel passed bytes to this process while it was watched
    /// ([`WATCH_HOLD`]).
    watch_not_before: Option<Instant>,
    stats: &'a DirectionStats,
    c2u: Direction,
    u2c: Direction,
    /// Forwarded in the kernel (`None`: copied here).
    kernel: Option<Pair>,
    /// Counted in `kforward::ARMED` or `kforward::FALLBACKS` already.
    kernel_counted: bool,
    idle: Option<IdleTimer>,
    idle_timed_out: bool,
    /// Asked to move: stop reading once nothing read is unwritten.
    pause: bool,
    /// Never pause (see [`Carried::stay`]).
    stay: bool,
    /// Ended because of `pause` (not every direction is done).
    paused: bool,
    /// Moved here from another process, which may still hold the sockets' descriptors for
    /// a moment after handing them over: a close here alone would not send a FIN then.
    moved: bool,
    /// Of the kernel's `redirected` counts (client socket, upstream socket), what is in the
    /// byte totals already ([`FOLD_EVERY`]).
    folded: (u64, u64),
    /// The next fold, from the connection's first arm here on.
    fold: Option<Pin<Box<Sleep>>>,
    /// From the last fold (or the fold timer's making) to the next fold's deadline, in
    /// [`SPAN_UNIT`]s: the last fold came at that deadline less this span (two bytes, not
    /// the instant: the connection's future stays within `connection_future_is_small`).
    fold_span: u16,
}

impl Future for Bidirectional<'_> {
    type Output = Result<(), ForwardError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Socks::Watched(w) = &this.socks {
            if !this.pause && !w.fired(cx) {
                if !this.poll_fold(cx) {
                    return this.poll_idle(cx, false).map(Ok);
                }
                // The kernel passed bytes to this process while it watched (the verdict
                // stops redirecting to a socket too far behind, `KFWD_MAX_UNACKED`): nothing
                // the watcher waits for announces them, the fold found them. Back to
                // polling, to read and write them, and not watched again for a while.
                this.watch_not_before = Some(Instant::now() + WATCH_HOLD);
            }
            this.unwatch()?;
        }
        let Socks::Polled { client, upstream } = &mut this.socks else {
            return Poll::Ready(Err(ForwardError {
                side: Side::Client,
                error: io::Error::other("the sockets were lost leaving tokio's poller"),
            }));
        };
        let moved_before = this.c2u.copied + this.u2c.copied;
        let pause = this.pause;
        let (mut client_rd, mut client_wr) = client.split();
        let (mut upstream_rd, mut upstream_wr) = upstream.split();
        let (to_upstream, to_client) = this.kernel.map_or((0, 0), |k| (k.upstream, k.client));
        this.c2u.other_done = this.u2c.done && !this.moved;
        let c2u = this.c2u.poll_copy(
            cx,
            (&mut client_rd, Side::Client),
            (&mut upstream_wr, Side::Upstream),
            &this.stats.bytes_client_to_upstream,
            pause,
            to_upstream,
        )?;
        this.u2c.other_done = this.c2u.done && !this.moved;
        let u2c = this.u2c.poll_copy(
            cx,
            (&mut upstream_rd, Side::Upstream),
            (&mut client_wr, Side::Client),
            &this.stats.bytes_upstream_to_client,
            pause,
            to_client,
        )?;
        if this.kernel.is_some() && !this.kernel_counted {
            if this.c2u.arm_failed || this.u2c.arm_failed {
                this.kernel_counted = true;
                kforward::FALLBACKS.fetch_add(1, Relaxed);
            } else if this.c2u.armed_at.is_some() && this.u2c.armed_at.is_some() {
                this.kernel_counted = true;
                kforward::ARMED.fetch_add(1, Relaxed);
            }
        }
        if let (Poll::Ready(()), Poll::Ready(())) = (c2u, u2c) {
            this.paused = !(this.c2u.done && this.u2c.done);
            this.c2u.room.give_back(upstream);
            this.u2c.room.give_back(client);
            return Poll::Ready(Ok(()));
        }
        let moved = this.c2u.copied + this.u2c.copied != moved_before;
        if this.poll_idle(cx, moved).is_ready() {
            return Poll::Ready(Ok(()));
        }
        if this.kernel.is_some() && !pause {
            this.poll_watch(cx);
        }
        this.poll_fold(cx);
        Poll::Pending
    }
}

impl Bidirectional<'_> {
    /// Every [`FOLD_EVERY`] from the connection's first arm here on, adds to
    /// the byte totals what the kernel redirected since the last time. True when it found
    /// bytes the kernel passed to this process that it has not read.
    fn poll_fold(&mut self, cx: &mut Context<'_>) -> bool {
        if !(self.c2u.check || self.u2c.check) {
            return false;
        }
        if self.fold.is_none() {
            if self.c2u.armed_at.is_none() && self.u2c.armed_at.is_none() {
                return false;
            }
            self.fold = Some(Box::pin(tokio::time::sleep(FOLD_EVERY)));
            self.fold_span = span_of(FOLD_EVERY);
        }
        let watched = matches!(self.socks, Socks::Watched(_));
        let Some(fold) = self.fold.as_mut() else {
            return false;
        };
        let mut unread = false;
        while fold.as_mut().poll(cx).is_ready() {
            let now = tokio::time::Instant::now();
            let last = fold.deadline() - span(self.fold_span);
            let elapsed = now - last;
            let Some((client, upstream)) = self.socks.fds() else {
                fold.as_mut().reset(now + FOLD_EVERY);
                self.fold_span = span_of(FOLD_EVERY);
                return unread;
            };
            let mut fastest = 0;
            for (d, sock, folded, total) in [
                (
                    &self.c2u,
                    client,
                    &mut self.folded.0,
                    &self.stats.bytes_client_to_upstream,
                ),
                (
                    &self.u2c,
                    upstream,
                    &mut self.folded.1,
                    &self.stats.bytes_upstream_to_client,
                ),
            ] {
                if let (true, Ok(st)) = (d.check, kforward::state(&sock)) {
                    fastest = fastest.max(fold_into(total, folded, st.redirected));
                    unread |= !d.done && st.passed > d.copied;
                }
            }
            // Polled, passed bytes wake this task as they come: the fold only counts.
            let next = if watched {
                next_fold(fastest, elapsed)
            } else {
                FOLD_EVERY
            };
            fold.as_mut().reset(now + next);
            self.fold_span = span_of(next);
        }
        unread
    }

    /// The idle timeout: Ready when it closes the connection. `moved`: bytes moved here
    /// since the last poll.
    fn poll_idle(&mut self, cx: &mut Context<'_>, moved: bool) -> Poll<()> {
        let Some(idle) = &mut self.idle else {
            return Poll::Pending;
        };
        if moved {
            idle.last = Instant::now();
        }
        while idle.sleep.as_mut().poll(cx).is_ready() {
            if let (true, Some((client, upstream))) =
                (self.c2u.check || self.u2c.check, self.socks.fds())
            {
                // Bytes the kernel moved count as traffic too.
                let moved = [client, upstream]
                    .iter()
                    .map(|s| kforward::state(s).map_or(0, |st| st.redirected))
                    .sum();
                if moved != idle.kernel_moved {
                    idle.kernel_moved = moved;
                    idle.last = Instant::now();
                }
            }
            let due = idle.last + idle.after;
            if Instant::now() >= due {
                self.idle_timed_out = true;
                return Poll::Ready(());
            }
            // Bytes moved since it was armed: arm it again for the new due time.
            idle.sleep.as_mut().reset(due.into());
        }
        Poll::Pending
    }

    /// Once the kernel has carried both directions (or one, the other done) for
    /// [`WATCH_AFTER`], moves the connection to the watcher ([`kwatch`]) if the kernel's state
    /// shows the arms in force: each socket of an open direction armed with its peer and
    /// every byte it passed read here.
    fn poll_watch(&mut self, cx: &mut Context<'_>) {
        // Each direction carried by the kernel, or done (a half-closed connection: its EOF
        // passed on, nothing more to read from that source).
        let watchable = |d: &Direction| d.done || d.kernel_carries();
        if !(watchable(&self.c2u) && watchable(&self.u2c))
            || (self.c2u.done && self.u2c.done)
            || self.watch_held()
        {
            self.watch_at = None;
            return;
        }
        let at = self
            .watch_at
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WATCH_AFTER)));
        if at.as_mut().poll(cx).is_pending() {
            return;
        }
        self.watch_at = None;
        let (Some(k), Socks::Polled { client, upstream }) = (self.kernel, &self.socks) else {
            return;
        };
        let in_force = |s: &TcpStream, peer: u64, d: &Direction| {
            d.done
                || kforward::state(s).is_ok_and(|st| {
                    st.peer == peer && st.armed == d.copied + 1 && st.passed == d.copied
                })
        };
        if !in_force(client, k.upstream, &self.c2u) || !in_force(upstream, k.client, &self.u2c) {
            return;
        }
        let Socks::Polled { client, upstream } = std::mem::replace(&mut self.socks, Socks::Gone)
        else {
            return;
        };
        // A source whose EOF was read reports `EPOLLRDHUP` for good: not an event to wait for.
        let ends = (!self.c2u.done, !self.u2c.done);
        self.socks = match Watch::start(client, upstream, ends, cx) {
            Ok(w) => {
                kforward::WATCHED.fetch_add(1, Relaxed);
                // Watched, the fold is what finds passed bytes: the next one soon, to take
                // the connection's pace (see `FOLD_ROOM`).
                if let Some(fold) = self.fold.as_mut() {
                    let last = fold.deadline() - span(self.fold_span);
                    let next = tokio::time::Instant::now() + FOLD_MIN;
                    fold.as_mut().reset(next);
                    self.fold_span = span_of(next - last);
                }
                Socks::Watched(w)
            }
            Err(NotWatched::Back(client, upstream)) => Socks::Polled { client, upstream },
            Err(NotWatched::Lost(e)) => {
                tracing::error!(error = %e, "a kernel-forwarded connection's sockets were lost leaving tokio's poller");
                cx.waker().wake_by_ref();
                Socks::Gone
            }
        };
    }

    /// Whether [`WATCH_HOLD`] still keeps the connection polled (a clock read only while a
    /// hold is set; it is cleared once over).
    fn watch_held(&mut self) -> bool {
        match self.watch_not_before {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                self.watch_not_before = None;
                false
            }
            None => false,
        }
    }

    /// Back from the watcher to tokio's poller (watched again only [`WATCH_AFTER`] after
    /// the kernel carries both directions again).
    fn unwatch(&mut self) -> Result<(), ForwardError> {
        let Socks::Watched(w) = std::mem::replace(&mut self.socks, Socks::Gone) else {
            return Ok(());
        };
        let (client, upstream) = w.stop().map_err(|error| ForwardError {
            side: Side::Client,
            error,
        })?;
        self.socks = Socks::Polled { client, upstream };
        Ok(())
    }
}

/// One direction: `buf[start..end]` is read but not yet written; `buf` is `None` while
/// nothing is in flight.
#[derive(Default)]
struct Direction {
    buf: Option<PooledBuf>,
    // u32: within one buffer of BUF_SIZE.
    start: u32,
    end: u32,
    copied: u64,
    done: bool,
    /// The source may be under kernel forwarding (armed here, or moved here from a process
    /// that may have armed it): its EOF waits for the kernel's bytes, its count takes them.
    check: bool,
    /// Kernel forwarding: `copied` at the last arm (`None`: not armed here yet).
    armed_at: Option<u64>,
    /// The source cannot be armed: copied here.
    arm_failed: bool,
    /// EOF read from the source, not yet passed on (waiting for the kernel's bytes).
    eof: bool,
    /// At EOF, or before writing what was read, waiting for the peer to be handed the
    /// kernel's bytes.
    wait: Option<Pin<Box<Sleep>>>,
    /// The source's `redirected` count when the peer was last seen holding every byte the
    /// kernel redirected to it: while it is unchanged there is nothing to wait for.
    drained_redirected: u64,
    /// `buf[start..end]` may be written: the peer holds every byte redirected before it.
    ordered: bool,
    /// Armed (or moved here) and nothing read since: the kernel may have redirected bytes
    /// that come before the next ones read, so those wait for the peer to hold them (after
    /// a read the kernel redirects nothing more until the next arm).
    armed_since_read: bool,
    /// Looks at the kernel's counts since the wait for them began (EOF or ordered write):
    /// a wait that lasts is logged once ([`WAIT_LOGGED_AFTER`]).
    waits: u32,
    /// Room made in the peer's send queue for this direction's bytes, asked to move.
    room: Room,
    /// The other direction is done (on a connection not moved here): this one's EOF needs no
    /// `shutdown`, the close of both sockets that follows at once sends the FIN (one system
    /// call fewer per connection).
    other_done: bool,
}

/// Room in a peer's send queue for the bytes of a direction asked to move, whose receiver
/// does not read ([`make_room`]).
/// One `u32`, not a flag and a size: it is in every connection's future (two directions).
#[derive(Default)]
struct Room {
    /// 0 until room is looked for (once a pause); then the peer's send buffer before the
    /// room was made, which it gets back once paused ([`Room::give_back`]), or [`Room::NONE`].
    from: u32,
}

impl Room {
    /// Looked for, and none made (or given back): no send buffer is that large.
    const NONE: u32 = u32::MAX;

    /// Makes room for `bytes` more in `dst`'s send queue, the first time it is asked; whether
    /// there is room.
    fn make(&mut self, dst: &TcpStream, bytes: u64) -> bool {
        if self.from == 0 {
            self.from = match make_room(dst, bytes) {
                0 => Room::NONE,
                before => before,
            };
        }
        self.from != Room::NONE
    }

    /// Once paused: the peer's send buffer gets back the size it had before room was made
    /// for this direction's bytes, so that a connection moved at an upgrade can queue no
    /// more for a receiver that does not read than before.
    fn give_back(&mut self, dst: &TcpStream) {
        if self.from != 0 && self.from != Room::NONE {
            let _ = set_send_buffer(dst, u64::from(self.from));
            self.from = Room::NONE;
        }
    }
}

/// How long an EOF waits before it looks at the peer's send queue again: first, then after.
const EOF_WAIT_FIRST: Duration = Duration::from_micros(200);
const EOF_WAIT_NEXT: Duration = Duration::from_millis(2);
/// Timer rounds of `EOF_WAIT_NEXT` after which a wait for the kernel's bytes is logged, once
/// (a second: the kernel hands such bytes on in microseconds; a wait that lasts is a defect).
const WAIT_LOGGED_AFTER: u32 = 500;

impl Direction {
    /// Whether the kernel carries this direction: armed with everything read, nothing held
    /// or awaited here.
    fn kernel_carries(&self) -> bool {
        !self.done
            && !self.eof
            && !self.arm_failed
            && self.buf.is_none()
            && self.wait.is_none()
            && self.armed_at == Some(self.copied)
    }

    fn carried(copied: u64, done: bool, check: bool) -> Direction {
        Direction {
            copied,
            done,
            check,
            armed_since_read: check,
            ..Direction::default()
        }
    }

    /// Counts a look at the kernel's counts made after the wait's timer fired; true once, at
    /// the `rounds`-th (then the wait is logged).
    fn waited_long(&mut self, rounds: u32) -> bool {
        if self.wait.as_ref().is_some_and(|w| w.is_elapsed()) {
            self.waits = self.waits.saturating_add(1);
        }
        if self.waits == rounds {
            self.waits += 1;
            return true;
        }
        false
    }

    /// Whether `dst` has been handed every byte meant for it so far, so that EOF, or bytes
    /// read here, may follow: the bytes written here plus those the kernel redirected from
    /// `src` (the counts of the connection's whole life). Ready when so (or when there is
    /// nothing to wait for: no redirect since the last time it was so), Pending while
    /// waiting (a timer wakes the task).
    /// With `pause` (asked to move), what the peer's receiver has not taken waits in the
    /// peer's send queue, made room for ([`make_room`]), rather than for the receiver.
    fn poll_kernel_drained(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        pause: bool,
    ) -> Poll<()> {
        loop {
            let Ok(st) = kforward::state(src) else {
                self.wait = None;
                return Poll::Ready(());
            };
            if st.redirected == self.drained_redirected {
                self.wait = None;
                self.waits = 0;
                return Poll::Ready(());
            }
            let target = self.copied + st.redirected;
            match kforward::queued(dst) {
                Ok((queued, open)) if open && queued < target => {
                    if pause {
                        // The peer's receiver does not read: the kernel's bytes and what
                        // this direction holds go to its send queue, so that it can pause.
                        let held = u64::from(self.end.saturating_sub(self.start));
                        self.room.make(dst, target - queued + held);
                    }
                    // Timer rounds of 2 ms.
                    if self.waited_long(WAIT_LOGGED_AFTER) {
                        tracing::warn!(
                            copied = self.copied,
                            redirected = st.redirected,
                            peer_queued = queued,
                            passed = st.passed,
                            armed = st.armed,
                            eof = self.eof,
                            "still waiting for the peer to be handed the bytes the kernel redirected to it"
                        );
                    }
                }
                Ok((_, true)) => {
                    self.drained_redirected = st.redirected;
                    self.wait = None;
                    self.waits = 0;
                    return Poll::Ready(());
                }
                _ => {
                    self.wait = None;
                    self.waits = 0;
                    return Poll::Ready(());
                }
            }
            let sleep = self
                .wait
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(EOF_WAIT_FIRST)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + EOF_WAIT_NEXT);
        }
    }

    /// Everything read is written and the source has nothing more to read now: (re)arms the
    /// kernel with what was read (see [`crate::kforward`]). Arming only when the source is
    /// drained gives the kernel its best chance to find every byte it passed read.
    fn arm(&mut self, src: &TcpStream, peer_cookie: u64) {
        if peer_cookie == 0 || self.arm_failed || self.armed_at == Some(self.copied) {
            return;
        }
        match kforward::arm(src, peer_cookie, self.copied) {
            Ok(()) => {
                self.check = true;
                self.armed_since_read = true;
                self.armed_at = Some(self.copied);
            }
            // Refused: this direction is copied here from now on. The kernel may have taken
            // the arm all the same: every loader's programs at the cgroup2 root answer the
            // call, and one refusal fails it (a second loader on the host, whose map could
            // not take the socket, refuses while the first one's took it). So the kernel's
            // bytes are waited for before the next write and before the EOF, and counted,
            // as after an arm that succeeded.
            Err(_) => {
                self.arm_failed = true;
                self.check = true;
                self.armed_since_read = true;
            }
        }
    }

    /// [`Direction::poll_eof`], then, once the EOF is passed on, `src` armed with its peer if
    /// it was not: the kernel redirects the other direction's bytes only between two sockets
    /// armed with each other, and a client that half-closes right after its request (its EOF
    /// read before this direction was ever drained) would otherwise leave the other direction
    /// (the download) to be copied here. Nothing more arrives on `src`, so the arm moves none
    /// of its bytes.
    fn poll_end(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        dst_side: Side,
        peer_cookie: u64,
        pause: bool,
    ) -> Poll<Result<(), ForwardError>> {
        let r = ready!(self.poll_eof(cx, src, dst, dst_side, pause));
        if r.is_ok() {
            self.arm(src, peer_cookie);
        }
        Poll::Ready(r)
    }

    /// EOF from `src` (seen now or earlier): passed on as `shutdown(SHUT_WR)` on `dst` once
    /// `dst` has every byte meant for it.
    fn poll_eof(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        dst_side: Side,
        pause: bool,
    ) -> Poll<Result<(), ForwardError>> {
        self.buf = None;
        if self.check && !self.eof {
            // A read of 0 while bytes the kernel passed to the socket are still on their way
            // into it (queued behind the socket's receive memory) is not the end: read on.
            if let Ok(st) = kforward::state(src) {
                if st.passed > self.copied {
                    // Timer rounds of 200 µs: logged after a second.
                    if self.waited_long(10 * WAIT_LOGGED_AFTER) {
                        tracing::warn!(
                            copied = self.copied,
                            passed = st.passed,
                            redirected = st.redirected,
                            armed = st.armed,
                            "EOF read, still waiting for bytes the kernel passed to the socket"
                        );
                    }
                    let sleep = self
                        .wait
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(EOF_WAIT_FIRST)));
                    sleep
                        .as_mut()
                        .reset(tokio::time::Instant::now() + EOF_WAIT_FIRST);
                    let _ = sleep.as_mut().poll(cx);
                    return Poll::Pending;
                }
            }
        }
        if !self.eof {
            self.eof = true;
            self.waits = 0;
        }
        if self.check {
            ready!(self.poll_kernel_drained(cx, src, dst, pause));
        }
        self.done = true;
        if self.other_done {
            // The other direction read `dst`'s EOF, so its receive queue is empty and the
            // close sends a FIN, not a reset.
            return Poll::Ready(Ok(()));
        }
        Poll::Ready(match SockRef::from(dst).shutdown(Shutdown::Write) {
            Ok(()) => Ok(()),
            // The peer is gone already; its own direction reports how.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            Err(error) => Err(ForwardError {
                side: dst_side,
                error,
            }),
        })
    }

    /// Copies `src` to `dst` until `src` would block (Pending, holding no buffer), or until
    /// EOF on `src` has been passed on as `shutdown(SHUT_WR)` on `dst` (Ready). With
    /// `pause`, Ready (not done) as soon as everything read has been written.
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        (src, src_side): (&mut ReadHalf<'_>, Side),
        (dst, dst_side): (&mut WriteHalf<'_>, Side),
        total: &AtomicU64,
        pause: bool,
        peer_cookie: u64,
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
        if self.eof {
            return self.poll_end(cx, src.as_ref(), dst.as_ref(), dst_side, peer_cookie, pause);
        }
        loop {
            // Bytes the kernel passed to the source after it had redirected others (because
            // the peer stopped being armed, or the source closed and left the map) go to
            // the peer only once the peer holds the redirected ones: the kernel sends those
            // from a queue of its own, which a write from here would overtake.
            if !self.ordered && self.buf.is_some() && self.start < self.end {
                if self.armed_since_read {
                    ready!(self.poll_kernel_drained(cx, src.as_ref(), dst.as_ref(), pause));
                    self.armed_since_read = false;
                }
                self.ordered = true;
            }
            // Flush what was read. Waiting for the peer to take it keeps the buffer.
            if let Some(buf) = &self.buf {
                while self.start < self.end {
                    let unwritten = &buf.bytes()[self.start as usize..self.end as usize];
                    let written = match Pin::new(&mut *dst).poll_write(cx, unwritten) {
                        Poll::Ready(r) => r,
                        // Asked to move, and the peer's receiver does not read: without
                        // the room, the connection could not pause before it reads again
                        // and would be cut at the drain's deadline.
                        Poll::Pending if pause => {
                            if !self.room.make(dst.as_ref(), unwritten.len() as u64) {
                                // No room: the bytes wait for the receiver.
                                return Poll::Pending;
                            }
                            // Tried past tokio's readiness, which a write that would have
                            // blocked before the room was made has cleared.
                            match SockRef::from(dst.as_ref()).send(unwritten) {
                                Err(e) if is_retry(&e) => return Poll::Pending,
                                r => r,
                            }
                        }
                        Poll::Pending => return Poll::Pending,
                    };
                    match written {
                        Ok(0) => return Poll::Ready(Err(dst_err(io::ErrorKind::WriteZero.into()))),
                        Ok(n) => {
                            self.start += n as u32;
                            self.copied += n as u64;
                            total.fetch_add(n as u64, Relaxed);
                        }
                        Err(e) if is_retry(&e) => {}
                        Err(e) => return Poll::Ready(Err(dst_err(e))),
                    }
                }
            }
            if pause {
                // Nothing read is unwritten: a point to hand the connection over at.
                self.buf = None;
                return Poll::Ready(Ok(()));
            }
            // Wait for data with no buffer held. After a short read tokio has cleared the
            // readiness, so this returns Pending without another system call.
            match src.as_ref().poll_read_ready(cx) {
                Poll::Pending => {
                    self.buf = None;
                    self.arm(src.as_ref(), peer_cookie);
                    return Poll::Pending;
                }
                Poll::Ready(r) => r.map_err(src_err)?,
            }
            let buf = self.buf.get_or_insert_with(PooledBuf::take);
            let mut rb = ReadBuf::new(buf.bytes_mut());
            match Pin::new(&mut *src).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    self.buf = None;
                    self.arm(src.as_ref(), peer_cookie);
                    return Poll::Pending;
                }
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    return self.poll_end(
                        cx,
                        src.as_ref(),
                        dst.as_ref(),
                        dst_side,
                        peer_cookie,
                        pause,
                    );
                }
                Poll::Ready(Ok(())) => {
                    self.end = rb.filled().len() as u32;
                    self.start = 0;
                    self.ordered = false;
                }
                Poll::Ready(Err(e)) if is_retry(&e) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(src_err(e))),
            }
        }
    }
}

/// The most a peer's send buffer is made to hold by [`make_room`].
const ROOM_MAX: u64 = 64 << 20;

/// Makes room in `dst`'s send queue for `bytes` more, when its receiver stopped reading and
/// the connection is asked to move: its send buffer grows by twice that (`SO_SNDBUFFORCE`,
/// the proxy's `CAP_NET_ADMIN`; `SO_SNDBUF` stops at `net.core.wmem_max`, below what the
/// kernel's own tuning reaches), which also wakes the kernel's sender of redirected bytes.
/// The kernel then keeps what this process read (and what the kernel redirected) for the
/// receiver, as it keeps the bytes queued before, and the connection holds none of its
/// bytes: it pauses and moves instead of being cut at the drain's deadline. The bytes were
/// in memory already (this process's buffer, the kernel's queue). Once the connection has
/// paused, the send buffer gets its size back ([`Room::give_back`]: what is queued
/// stays, more is queued only once the receiver has read below it), without the kernel's
/// automatic tuning from then on; at most [`ROOM_MAX`]. Returns the size before (0 when
/// nothing changed: the bytes wait for the receiver).
fn make_room(dst: &TcpStream, bytes: u64) -> u32 {
    let Ok(now) = SockRef::from(dst).send_buffer_size() else {
        return 0;
    };
    let want = (now as u64).saturating_add(bytes.saturating_mul(2));
    if want > ROOM_MAX {
        return 0;
    }
    match set_send_buffer(dst, want) {
        Ok(()) => u32::try_from(now).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Sets `dst`'s send buffer to `bytes` as the kernel accounts it (`SO_SNDBUFFORCE`).
fn set_send_buffer(dst: &TcpStream, bytes: u64) -> nix::Result<()> {
    // The kernel doubles what it is given (its own accounting), as `SO_SNDBUF` reads it.
    nix::sys::socket::setsockopt(
        dst,
        nix::sys::socket::sockopt::SndBufForce,
        &((bytes / 2) as usize),
    )
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
    fn a_watched_fold_is_paced_by_the_kernels_bytes() {
        let ms = Duration::from_millis;
        // 1 GB/s (4 MiB moved in 4 ms): every 4 ms, a quarter of the limit.
        assert_eq!(next_fold(FOLD_ROOM, ms(4)), ms(4));
        // Faster than FOLD_MIN allows: FOLD_MIN.
        assert_eq!(next_fold(FOLD_ROOM * 100, ms(4)), FOLD_MIN);
        // Slower: later, but by twice the last span at the most.
        assert_eq!(next_fold(FOLD_ROOM / 16, ms(4)), ms(8));
        assert_eq!(next_fold(FOLD_ROOM / 16, ms(100)), ms(200));
        // Nothing moved: the span doubles up to FOLD_EVERY.
        assert_eq!(next_fold(0, ms(10)), ms(20));
        assert_eq!(next_fold(0, ms(800)), FOLD_EVERY);
        assert_eq!(next_fold(1, FOLD_EVERY), FOLD_EVERY);
    }

    #[test]
    fn a_fold_span_keeps_its_unit_and_saturates() {
        assert_eq!(
            span(span_of(Duration::from_micros(2_350))),
            Duration::from_micros(2_300)
        );
        assert_eq!(span(span_of(FOLD_EVERY)), FOLD_EVERY);
        assert_eq!(span_of(Duration::from_secs(3600)), u16::MAX);
    }

    #[test]
    fn pool_reuses_and_bounds() {
        let bufs: Vec<_> = (0..POOL_PER_THREAD + 4)
            .map(|_| PooledBuf::take())
            .collect();
        drop(bufs);
        assert_eq!(POOL.with(|p| p.borrow().len()), POOL_PER_THREAD);
        let b = PooledBuf::take();
        assert_eq!(b.bytes().len(), BUF_SIZE);
        assert_eq!(POOL.with(|p| p.borrow().len()), POOL_PER_THREAD - 1);
    }
}
