//! Watching a kernel-forwarded connection without being woken by its bytes.
//!
//! Sockmap's reader calls a socket's own data-ready callback after its verdict has redirected
//! a segment, so whoever polls the socket for reading is woken although there is nothing to
//! read: through tokio, a worker-thread wake-up, a poll of the connection and a `read` that
//! returns `EAGAIN`, for every request the kernel carries (0.82 per keep-alive request in the
//! bench before this).
//!
//! So a connection whose two directions the kernel carries leaves tokio's poller for this
//! one, which waits on its two sockets for `EPOLLRDHUP`, `EPOLLHUP` and `EPOLLERR` only: a
//! received byte's wake-up (`EPOLLIN`) is filtered out by the kernel before it wakes anyone,
//! the end of either side, a reset or an error is not. The forwarder hands a connection over
//! only when the kernel's state shows both arms in force (each socket armed with its peer and
//! every byte it passed read: while both stay so, nothing more is passed to this process), so
//! that nothing arrives for it to read while it is watched here. What ends that state is an
//! event watched here: the peer leaves the kernel's map when it closes (`EPOLLHUP`, or
//! `EPOLLERR` after a reset), and the sockets' EOFs are `EPOLLRDHUP`. Then the connection goes
//! back to tokio (also when asked to move to a new process, or when its deadline passes).
//! One thing ends it that no event here announces: the verdict passes bytes to this process
//! when the peer falls `KFWD_MAX_UNACKED` behind. The connection's fold finds them
//! (`forward.rs`, paced by `FOLD_ROOM` while it moves bytes) and takes it back.
//!
//! One epoll instance and one thread for the process: the thread sleeps in `epoll_wait` and
//! only wakes for those events, once per watched connection's end.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Waker};

use rustix::event::epoll;
use tokio::net::TcpStream;

/// The events that end a watch: the socket's EOF when `eof` (not for a socket whose EOF was
/// read already: it would report it at once); `EPOLLERR` and `EPOLLHUP` are always reported.
fn flags(eof: bool) -> epoll::EventFlags {
    if eof {
        epoll::EventFlags::RDHUP | epoll::EventFlags::ET
    } else {
        epoll::EventFlags::ET
    }
}

/// Whether a watched connection saw one of its events, and the task to wake then.
#[derive(Default)]
struct Slot {
    fired: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Slot {
    fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

struct Watcher {
    epoll: OwnedFd,
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    next: AtomicU64,
}

static WATCHER: OnceLock<Option<Watcher>> = OnceLock::new();

/// The process's watcher, started on first use; `None` if it could not be (the connection
/// then stays with tokio, as before).
fn watcher() -> Option<&'static Watcher> {
    WATCHER
        .get_or_init(|| {
            let started = (|| -> io::Result<OwnedFd> {
                let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
                let fd = epoll.try_clone()?;
                std::thread::Builder::new()
                    .name("kforward-watch".into())
                    .spawn(move || run(&fd))?;
                Ok(epoll)
            })();
            match started {
                Ok(epoll) => Some(Watcher {
                    epoll,
                    slots: Mutex::default(),
                    next: AtomicU64::new(1),
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the kernel-forwarding watcher; \
                        kernel-forwarded connections stay polled for reading");
                    None
                }
            }
        })
        .as_ref()
}

/// The watcher thread: marks each watched connection that saw an event and wakes its task.
fn run(epoll_fd: &OwnedFd) {
    let empty = epoll::Event {
        flags: epoll::EventFlags::empty(),
        data: epoll::EventData::new_u64(0),
    };
    let mut events = [empty; 64];
    loop {
        let n = match epoll::wait(epoll_fd, &mut events, None) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "the kernel-forwarding watcher stopped");
                return;
            }
        };
        let Some(w) = WATCHER.get().and_then(Option::as_ref) else {
            continue;
        };
        for ev in &events[..n] {
            let token = ev.data.u64();
            let slot = w
                .slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&token)
                .cloned();
            if let Some(slot) = slot {
                slot.fire();
            }
        }
    }
}

/// A connection watched here: its two sockets, out of tokio's poller.
pub struct Watch {
    token: u64,
    slot: Arc<Slot>,
    client: std::net::TcpStream,
    upstream: std::net::TcpStream,
}

/// Why a connection could not be watched: its sockets back (still with tokio), or the
/// error that lost them (taking a socket out of tokio's poller failed, which it does not for
/// a registered socket).
pub enum NotWatched {
    Back(TcpStream, TcpStream),
    Lost(io::Error),
}

impl Watch {
    /// Moves `client` and `upstream` from tokio's poller to the watcher; `cx`'s task is
    /// woken when either sees an event. Only for a connection that the kernel forwards with
    /// the arms in force, each way that is not done (see the module's documentation).
    /// `eofs`: whether the EOF of the client, of the upstream, is an event to wait for (not
    /// once read).
    pub fn start(
        client: TcpStream,
        upstream: TcpStream,
        (client_eof, upstream_eof): (bool, bool),
        cx: &Context<'_>,
    ) -> Result<Watch, NotWatched> {
        let Some(w) = watcher() else {
            return Err(NotWatched::Back(client, upstream));
        };
        let client = client.into_std().map_err(NotWatched::Lost)?;
        let upstream = match upstream.into_std() {
            Ok(u) => u,
            Err(e) => return Err(NotWatched::Lost(e)),
        };
        let token = w.next.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            fired: AtomicBool::new(false),
            waker: Mutex::new(Some(cx.waker().clone())),
        });
        w.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token, slot.clone());
        let watch = Watch {
            token,
            slot,
            client,
            upstream,
        };
        let data = epoll::EventData::new_u64(token);
        let added = epoll::add(&w.epoll, &watch.client, data, flags(client_eof))
            .and_then(|()| epoll::add(&w.epoll, &watch.upstream, data, flags(upstream_eof)));
        if added.is_err() {
            // Not watched after all: straight back (`fired` makes `stop` the next step).
            watch.slot.fire();
        }
        Ok(watch)
    }

    /// Whether an event came (or the watch could not start): then [`Watch::stop`]; if not,
    /// `cx`'s task is the one woken when it comes.
    pub fn fired(&self, cx: &Context<'_>) -> bool {
        if self.slot.fired.load(Ordering::Acquire) {
            return true;
        }
        {
            let mut waker = self.slot.waker.lock().unwrap_or_else(|p| p.into_inner());
            match &*waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
        }
        // An event between the first look and the waker's update found no waker to wake.
        self.slot.fired.load(Ordering::Acquire)
    }

    /// The two sockets (client, upstream), for the kernel's state and at the end.
    pub fn sockets(&self) -> (&std::net::TcpStream, &std::net::TcpStream) {
        (&self.client, &self.upstream)
    }

    /// Back to tokio's poller (which reports what is readable by then at once).
    pub fn stop(self) -> io::Result<(TcpStream, TcpStream)> {
        let (client, upstream) = self.into_std();
        Ok((TcpStream::from_std(client)?, TcpStream::from_std(upstream)?))
    }

    /// Out of the watcher, as plain sockets (for a connection that ends here).
    pub fn into_std(self) -> (std::net::TcpStream, std::net::TcpStream) {
        if let Some(w) = WATCHER.get().and_then(Option::as_ref) {
            let _ = epoll::delete(&w.epoll, &self.client);
            let _ = epoll::delete(&w.epoll, &self.upstream);
            w.slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.token);
        }
        (self.client, self.upstream)
    }
}
