//! The running process's side of an upgrade: offer copies of the listening sockets to one
//! new process at a time, wait until it is ready, then hand it the release; while this
//! process drains, report its counters to the new one.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::control::{check_peer, ControlSocket};
use super::wire::{Channel, Message, CONTROL_ID};
use crate::drain::{self, Deadline, DrainWatch, Handoff};
use crate::stats::Stats;

/// Most connections in one `connections` message (two descriptors each).
pub const MOVE_BATCH: usize = 256;

/// How long the running process waits for the new one to confirm a batch (`taken`), and
/// never past the drain deadline: a batch not confirmed by then stays here (`kept`), and
/// no more connections are offered.
pub const TAKEN_TIMEOUT: Duration = Duration::from_secs(1);

/// What moving the connections came to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MoveReport {
    /// Connections the new process took.
    pub moved: u64,
    /// Connections offered that stay here (the new process failed while taking over).
    pub kept: u64,
    /// Of `kept`, those of a batch the new process did not confirm within
    /// [`TAKEN_TIMEOUT`] (or before the drain deadline).
    pub unconfirmed: u64,
    /// Batches sent.
    pub batches: u64,
}

/// Why a batch was not moved.
enum BatchError {
    /// No `taken` within the timeout (it waited this long).
    Unconfirmed(Duration),
    /// The conversation broke or went wrong.
    Failed(String),
}

/// How long the running process waits for the new one to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the running process waits for `hello` after a connect.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the running process offers a new one: a copy of each listening socket.
pub struct Offer {
    listeners: Vec<(String, OwnedFd)>,
}

impl Offer {
    /// Copies (dup) `listeners`; the copies are closed when serving upgrades ends.
    pub fn new<'a>(
        listeners: impl IntoIterator<Item = (String, BorrowedFd<'a>)>,
    ) -> io::Result<Offer> {
        let listeners = listeners
            .into_iter()
            .map(|(id, fd)| fd.try_clone_to_owned().map(|fd| (id, fd)))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Offer { listeners })
    }
}

/// A new process that is ready: the old one sends it `released` and, after draining,
/// `exited`.
pub struct Successor {
    chan: Channel,
    pid: i32,
}

impl Successor {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Tells the new process that this one no longer accepts.
    pub async fn released(&self, stats: &Stats) {
        let msg = Message::Released {
            stats: stats.snapshot(),
            histograms: stats.histogram_values(),
        };
        if let Err(e) = self.chan.send(&msg, &[]).await {
            warn!(error = %e, "telling the new process about the release");
        }
    }

    /// Moves the connections offered on `offers` (see [`crate::drain::Drain::start_moving`]),
    /// in batches of up to [`MOVE_BATCH`], each confirmed by the new process before this
    /// process lets go of them, until the channel closes. If the new process fails (the
    /// conversation breaks), no connection is offered any more (`deadline`'s drain) and
    /// those offered get their sockets back and carry on here. A batch is the new
    /// process's only once it said `taken` and this process answered `handed`; one it does
    /// not confirm within [`TAKEN_TIMEOUT`] (and before `cut_at`, the drain deadline) is
    /// answered `kept` and stays here, as does every later one.
    pub async fn move_connections(
        &mut self,
        mut offers: mpsc::UnboundedReceiver<Handoff>,
        deadline: Deadline,
        cut_at: tokio::time::Instant,
    ) -> MoveReport {
        let mut report = MoveReport::default();
        let mut failed = false;
        while let Some(first) = offers.recv().await {
            let mut batch = vec![first];
            while batch.len() < MOVE_BATCH {
                match offers.try_recv() {
                    Ok(h) => batch.push(h),
                    Err(_) => break,
                }
            }
            if failed {
                // Dropped unanswered: each carries on here.
                report.kept += batch.len() as u64;
                continue;
            }
            match self.send_batch(&batch, cut_at).await {
                Ok(()) => {
                    report.moved += batch.len() as u64;
                    report.batches += 1;
                    for h in batch {
                        h.taken();
                    }
                }
                Err(BatchError::Unconfirmed(waited)) => {
                    warn!(new_pid = self.pid, connections = batch.len(),
                        waited_ms = waited.as_millis() as u64,
                        "the new process did not confirm moved connections in time; they and the rest stay in this process");
                    failed = true;
                    drain::stop_moving(&deadline);
                    report.kept += batch.len() as u64;
                    report.unconfirmed += batch.len() as u64;
                }
                Err(BatchError::Failed(reason)) => {
                    warn!(new_pid = self.pid, reason = %reason, connections = batch.len(),
                        "moving connections failed; they and the rest stay in this process");
                    failed = true;
                    drain::stop_moving(&deadline);
                    report.kept += batch.len() as u64;
                }
            }
        }
        report
    }

    /// Sends one batch, waits for the new process to say it holds it (`taken`, within
    /// [`TAKEN_TIMEOUT`] and before `cut_at`) and hands it over (`handed`): the new process
    /// copies a batch only after `handed`, so that the two never both copy one connection.
    /// Without `taken` in time, the batch is answered `kept` (the new process closes its
    /// copies) and stays here.
    async fn send_batch(
        &mut self,
        batch: &[Handoff],
        cut_at: tokio::time::Instant,
    ) -> Result<(), BatchError> {
        let failed = |s: String| BatchError::Failed(s);
        let conns = batch.iter().map(|h| h.state).collect();
        let fds: Vec<BorrowedFd<'_>> = batch.iter().flat_map(|h| h.fds()).collect();
        let count = batch.len();
        self.chan
            .send(&Message::Connections { conns }, &fds)
            .await
            .map_err(|e| failed(format!("sending a batch: {e}")))?;
        let sent = tokio::time::Instant::now();
        let until = (sent + TAKEN_TIMEOUT).min(cut_at);
        let answer = match tokio::time::timeout_at(until, self.chan.recv()).await {
            Ok(answer) => answer,
            Err(_) => {
                // Not ours to copy: the new process closes its copies when it reads this.
                if let Err(e) = self.chan.send(&Message::Kept { count }, &[]).await {
                    warn!(new_pid = self.pid, error = %e, "telling the new process a batch stays here");
                }
                return Err(BatchError::Unconfirmed(sent.elapsed()));
            }
        };
        match answer {
            Ok(Some(Message::Taken { count: n })) if n == count => {}
            Ok(Some(Message::Taken { count: n })) => {
                return Err(failed(format!(
                    "the new process took {n} of {count} connections"
                )))
            }
            Ok(Some(other)) => return Err(failed(format!("expected taken, got {}", other.name()))),
            Ok(None) => {
                return Err(failed(
                    "the new process closed the upgrade connection".to_owned(),
                ))
            }
            Err(e) => return Err(failed(format!("waiting for taken: {e}"))),
        }
        // Without `handed` the new process does not copy: if this fails, it died, and the
        // connections carry on here.
        self.chan
            .send(&Message::Handed { count }, &[])
            .await
            .map_err(|e| failed(format!("handing over a batch: {e}")))
    }

    /// Sends the final counters; the new process adds them to its own.
    pub async fn exited(&self, stats: &Stats) {
        let msg = Message::Exited {
            stats: stats.snapshot(),
            histograms: stats.histogram_values(),
            destinations: stats.destinations.export(),
        };
        if let Err(e) = self.chan.send(&msg, &[]).await {
            warn!(error = %e, "sending the final counters to the new process");
        }
    }
}

/// Serves upgrades on `control` until the drain starts (this process stops accepting: a
/// shutdown, or a new process is ready); the ready one is sent on `release`. Closes the offered copies and the control socket
/// before it returns.
pub async fn serve(
    control: ControlSocket,
    offer: Offer,
    stats: Arc<Stats>,
    stop: DrainWatch,
    release: oneshot::Sender<Successor>,
) {
    let mut offer = offer;
    match control.dup() {
        Ok(fd) => offer.listeners.push((CONTROL_ID.to_owned(), fd)),
        Err(e) => warn!(error = %e, "cannot offer the upgrade socket itself"),
    }
    let offer = Arc::new(offer);
    let busy = Arc::new(AtomicBool::new(false));
    let release = Arc::new(Mutex::new(Some(release)));
    let sessions = tokio_util::task::TaskTracker::new();
    info!(path = %control.path().display(), "serving upgrades");
    loop {
        let stream = tokio::select! {
            biased;
            _ = stop.signaled() => break,
            r = control.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "accepting on the upgrade socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        sessions.spawn(session(
            stream,
            offer.clone(),
            stats.clone(),
            busy.clone(),
            release.clone(),
            stop.clone(),
        ));
    }
    drop(offer);
    sessions.close();
    sessions.wait().await;
    drop(control);
}

/// Clears the busy flag when a session ends without a successor; after one, the flag stays
/// set ([`Busy::keep`]): this process has handed over and takes no other new process.
struct Busy(Option<Arc<AtomicBool>>);

impl Busy {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(flag) = &self.0 {
            flag.store(false, Ordering::Release);
        }
    }
}

/// Why a request is refused while this process stops accepting.
const STOPPING: &str = "another upgrade is in progress or this proxy is shutting down; retry \
    when it has finished (a new process then answers on this socket)";

/// Answers `refused` with `reason`.
async fn refuse(chan: &Channel, reason: String) {
    warn!(reason = %reason, "upgrade refused");
    let _ = chan.send(&Message::Refused { reason }, &[]).await;
}

/// One connection on the upgrade socket: `hello`, the listeners, `ready`; then the new
/// process is handed to `serve`'s caller as the [`Successor`].
async fn session(
    stream: UnixStream,
    offer: Arc<Offer>,
    stats: Arc<Stats>,
    busy: Arc<AtomicBool>,
    release: Arc<Mutex<Option<oneshot::Sender<Successor>>>>,
    stop: DrainWatch,
) {
    let peer = check_peer(&stream);
    let mut chan = Channel::new(stream);
    // A request still waiting when this process stops accepting (it has a successor, or
    // shuts down) is answered, not dropped: on a busy process its session can start late.
    let hello = tokio::select! {
        biased;
        _ = stop.signaled() => return refuse(&chan, STOPPING.to_owned()).await,
        r = tokio::time::timeout(HELLO_TIMEOUT, chan.recv()) => r,
    };
    match hello {
        Ok(Ok(Some(Message::Hello { .. }))) => {}
        // A connect without hello: e.g. a starting proxy checking whether one runs here.
        Ok(Ok(None)) => return,
        Ok(Ok(Some(other))) => {
            warn!(message = other.name(), "upgrade socket: expected hello");
            return;
        }
        Ok(Err(e)) => {
            warn!(error = %e, "upgrade socket: reading hello");
            return;
        }
        Err(_) => {
            warn!("upgrade socket: no hello within {HELLO_TIMEOUT:?}");
            return;
        }
    }
    let pid = match peer {
        Ok(pid) => pid,
        Err(reason) => return refuse(&chan, reason).await,
    };
    if busy.swap(true, Ordering::AcqRel) {
        return refuse(&chan, STOPPING.to_owned()).await;
    }
    let busy = Busy(Some(busy));
    info!(
        new_pid = pid,
        "upgrade requested; handing over the listening sockets"
    );
    let ids = offer.listeners.iter().map(|(id, _)| id.clone()).collect();
    let fds: Vec<BorrowedFd<'_>> = offer.listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
    let sent = chan
        .send(
            &Message::Listeners {
                pid: std::process::id(),
                ids,
                stats: stats.snapshot(),
                histograms: stats.histogram_values(),
                commits: true,
            },
            &fds,
        )
        .await;
    drop(fds);
    if let Err(e) = sent {
        warn!(new_pid = pid, error = %e, "sending the listeners; upgrade aborted, still serving");
        return;
    }
    let answer = tokio::select! {
        _ = stop.signaled() => return,
        r = tokio::time::timeout(READY_TIMEOUT, chan.recv()) => r,
    };
    match answer {
        Ok(Ok(Some(Message::Ready))) => {}
        Ok(Ok(None)) | Ok(Err(_)) => {
            warn!(
                new_pid = pid,
                "the new process exited before it was ready; upgrade aborted, still serving"
            );
            return;
        }
        Ok(Ok(Some(other))) => {
            warn!(
                new_pid = pid,
                message = other.name(),
                "expected ready; upgrade aborted, still serving"
            );
            return;
        }
        Err(_) => {
            warn!(new_pid = pid, "the new process was not ready within {READY_TIMEOUT:?}; upgrade aborted, still serving");
            return;
        }
    }
    // Our copies must be closed before this process reports the release.
    drop(offer);
    let tx = release.lock().expect("release lock").take();
    if let Some(tx) = tx {
        info!(
            new_pid = pid,
            "the new process is ready; stopping accepting"
        );
        // No other new process from now on, whatever asks while this one stops accepting.
        busy.keep();
        let _ = tx.send(Successor { chan, pid });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain;

    /// A new process's first message.
    fn hello() -> Message {
        Message::Hello {
            pid: std::process::id(),
            version: "test".to_owned(),
        }
    }

    /// Connects to the upgrade socket and says hello, as a new process does.
    async fn ask(path: &std::path::Path) -> Channel {
        let chan = Channel::new(UnixStream::connect(path).await.unwrap());
        chan.send(&hello(), &[]).await.unwrap();
        chan
    }

    /// A second request that reaches the running process after a first new process is ready
    /// (before or while this one stops accepting: on a busy process, its session can run
    /// that late) is refused with the reason, never handed the listeners a second time nor
    /// closed without an answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_after_the_successor_is_ready_is_refused() {
        let dir = std::env::temp_dir().join(format!("icpt-t-handover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("proxy.sock");
        let control = ControlSocket::bind(&path).unwrap();
        let (drain, watch) = drain::new();
        let (tx, rx) = oneshot::channel();
        let stats = Arc::new(Stats::default());
        let served = tokio::spawn(serve(control, Offer::new([]).unwrap(), stats, watch, tx));
        let mut first = ask(&path).await;
        let listeners = first.recv().await.unwrap();
        assert!(matches!(listeners, Some(Message::Listeners { .. })));
        first.send(&Message::Ready, &[]).await.unwrap();
        let successor = rx.await.expect("the ready process is handed over");
        // Connected, its hello not sent yet (accepted before the second: in order).
        let mut third = Channel::new(UnixStream::connect(&path).await.unwrap());
        // Asked after the hand-over, before this process has stopped accepting.
        let mut second = ask(&path).await;
        let answer = second.recv().await.unwrap();
        assert!(
            matches!(&answer, Some(Message::Refused { reason }) if reason.contains("another upgrade is in progress")),
            "{:?}",
            answer.as_ref().map(Message::name)
        );
        // Its hello comes once this process stops accepting: answered too.
        drain.start();
        let _ = third.send(&hello(), &[]).await;
        let answer = third.recv().await.unwrap();
        assert!(
            matches!(&answer, Some(Message::Refused { .. })),
            "{:?}",
            answer.as_ref().map(Message::name)
        );
        drop(successor);
        served.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
