//! The upgrade conversation on the wire: JSON lines over a Unix stream socket, listening
//! sockets passed alongside with SCM_RIGHTS, each under a stable listener id.
//!
//! | message | from | carries |
//! |---|---|---|
//! | `hello` | new process | its pid and version |
//! | `listeners` | running process | the listener ids, the counters so far; one descriptor per id, in order, with the line's first bytes (at most 64 per `sendmsg`: the first batches each ride on one byte of the line, the last on the rest, so any number of listeners passes) |
//! | `refused` | running process | why (another upgrade is in progress, a peer of another user) |
//! | `ready` | new process | nothing: it accepts on every listener |
//! | `released` | running process | its counters when it stopped accepting |
//! | `connections` | running process | a batch of opaque connections paused to move (their state; two descriptors each, client then upstream, batched as the listeners) |
//! | `taken` | new process | how many of the batch it holds now (registered, not yet copying) |
//! | `handed` | running process | the batch is the new process's: the running one closed its copies, the new one starts copying |
//! | `kept` | running process | the batch stays in the running process (no `taken` within its confirm timeout): the new one closes its copies without touching the connections |
//! | `exited` | running process | its final counters and per-destination series, at the end of its drain |

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::drain::MovedState;
use crate::stats::{DestinationSeries, StatsSnapshot};

/// Most descriptors one `sendmsg` carries; more go in batches (see `Channel::send`).
const MAX_FDS: usize = 64;
/// Longest message accepted.
const MAX_LINE: usize = 1 << 20;

/// Listener id of the Unix socket that serves upgrades.
pub const CONTROL_ID: &str = "upgrade";
/// Listener id of the admin listener.
pub const ADMIN_ID: &str = "admin";

/// Listener id of the `index`-th outbound listener of the configuration.
pub fn outbound_id(index: usize) -> String {
    format!("outbound.{index}")
}

/// Listener id of the `index`-th inbound listener of the configuration.
pub fn inbound_id(index: usize) -> String {
    format!("inbound.{index}")
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum Message {
    Hello {
        pid: u32,
        version: String,
    },
    /// Followed by one descriptor per id, in this order.
    Listeners {
        pid: u32,
        ids: Vec<String>,
        stats: StatsSnapshot,
        /// Histogram cells (`Stats::histogram_values`); absent from older senders.
        #[serde(default)]
        histograms: Vec<u64>,
        /// The sender answers each `taken` with `handed` or `kept` (the new process copies
        /// a batch only after `handed`); false from older senders, which close their
        /// copies at `taken` without a word.
        #[serde(default)]
        commits: bool,
    },
    Refused {
        reason: String,
    },
    Ready,
    Released {
        stats: StatsSnapshot,
        #[serde(default)]
        histograms: Vec<u64>,
    },
    /// Followed by two descriptors per connection (client, upstream), in this order.
    Connections {
        conns: Vec<MovedState>,
    },
    Taken {
        count: usize,
    },
    /// The batch just taken is the new process's now.
    Handed {
        count: usize,
    },
    /// The batch offered last stays in the running process.
    Kept {
        count: usize,
    },
    Exited {
        stats: StatsSnapshot,
        #[serde(default)]
        histograms: Vec<u64>,
        /// Per-destination series (empty when off); absent from older senders.
        #[serde(default)]
        destinations: Vec<DestinationSeries>,
    },
}

impl Message {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Listeners { .. } => "listeners",
            Message::Refused { .. } => "refused",
            Message::Ready => "ready",
            Message::Released { .. } => "released",
            Message::Connections { .. } => "connections",
            Message::Taken { .. } => "taken",
            Message::Handed { .. } => "handed",
            Message::Kept { .. } => "kept",
            Message::Exited { .. } => "exited",
        }
    }
}

/// The first whole message in `buf` (a JSON line), removed from it; `None` while no line
/// is complete. An error for a line that is not a message, or for more than 1 MiB without
/// a line end.
pub(super) fn take_message(buf: &mut Vec<u8>) -> io::Result<Option<Message>> {
    if let Some(end) = buf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = buf.drain(..=end).collect();
        return serde_json::from_slice(&line[..end])
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
    }
    if buf.len() > MAX_LINE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message longer than 1 MiB",
        ));
    }
    Ok(None)
}

/// Encodes `msg` as its line (JSON and the line end), as `Channel::send` sends it.
pub(super) fn encode(msg: &Message) -> io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
    line.push(b'\n');
    Ok(line)
}

/// One end of an upgrade conversation: JSON lines, descriptors alongside.
pub(super) struct Channel {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Descriptors received so far, in arrival order.
    pub(super) fds: Vec<OwnedFd>,
}

/// Says which it is without dumping buffers.
impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Channel")
    }
}

fn cmsg_space() -> Vec<MaybeUninit<u8>> {
    vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))]
}

impl Channel {
    pub(super) fn new(stream: UnixStream) -> Self {
        Channel {
            stream,
            buf: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// Sends `msg` as one line with `fds` alongside, in order. At most [`MAX_FDS`] ride on
    /// one `sendmsg`: batch k of several goes with byte k of the line and the last with
    /// the rest, so the receiver (whose control buffer holds [`MAX_FDS`]; a stream socket
    /// never merges two writes' descriptors into one read) gets every batch in turn.
    pub(super) async fn send(&self, msg: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let line = encode(msg)?;
        let batches: Vec<&[BorrowedFd<'_>]> = fds.chunks(MAX_FDS).collect();
        if batches.len() > line.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} descriptors do not fit a message of {} bytes",
                    fds.len(),
                    line.len()
                ),
            ));
        }
        let mut sent = 0;
        let mut batch = 0;
        while sent < line.len() {
            let with = batches.get(batch).copied();
            // One byte per batch but the last, which takes the rest of the line.
            let end = if batch + 1 < batches.len() {
                sent + 1
            } else {
                line.len()
            };
            let n = self
                .stream
                .async_io(Interest::WRITABLE, || {
                    let mut space = cmsg_space();
                    let mut control = SendAncillaryBuffer::new(&mut space);
                    if let Some(fds) = with {
                        control.push(SendAncillaryMessage::ScmRights(fds));
                    }
                    rustix::net::sendmsg(
                        &self.stream,
                        &[IoSlice::new(&line[sent..end])],
                        &mut control,
                        SendFlags::NOSIGNAL,
                    )
                    .map_err(io::Error::from)
                })
                .await?;
            sent += n;
            if with.is_some() {
                // Descriptors go with the first byte a sendmsg sends.
                batch += 1;
            }
        }
        Ok(())
    }

    /// The next message; `None` when the peer closed the connection between messages.
    pub(super) async fn recv(&mut self) -> io::Result<Option<Message>> {
        loop {
            if let Some(msg) = take_message(&mut self.buf)? {
                return Ok(Some(msg));
            }
            let mut chunk = [0u8; 4096];
            let (n, fds) = self
                .stream
                .async_io(Interest::READABLE, || {
                    let mut space = cmsg_space();
                    let mut control = RecvAncillaryBuffer::new(&mut space);
                    let r = rustix::net::recvmsg(
                        &self.stream,
                        &mut [IoSliceMut::new(&mut chunk)],
                        &mut control,
                        RecvFlags::CMSG_CLOEXEC,
                    )?;
                    let mut fds = Vec::new();
                    for m in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(received) = m {
                            fds.extend(received);
                        }
                    }
                    if r.flags.contains(ReturnFlags::CTRUNC) {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "more descriptors than expected (control data truncated)",
                        ));
                    }
                    Ok((r.bytes, fds))
                })
                .await?;
            self.fds.extend(fds);
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The fuzz target's entry (`fuzz/fuzz_targets/upgrade_wire.rs`): `data` arrives as the
/// receiving side reads it, in chunks of up to 4096 bytes; every message decoded must
/// encode to a line that decodes to the same message (the same encoding again).
#[cfg(feature = "fuzzing")]
pub fn fuzz_receive(data: &[u8]) {
    let mut buf = Vec::new();
    for chunk in data.chunks(4096) {
        buf.extend_from_slice(chunk);
        loop {
            match take_message(&mut buf) {
                Ok(Some(msg)) => {
                    let line = encode(&msg).expect("a decoded message encodes");
                    let mut again = line.clone();
                    let back = take_message(&mut again)
                        .expect("an encoded message decodes")
                        .expect("an encoded message is one whole line");
                    assert!(again.is_empty(), "encoding left bytes after the line");
                    assert_eq!(
                        encode(&back).expect("encodes"),
                        line,
                        "{} changed on a round trip",
                        msg.name()
                    );
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// More listeners than one message's descriptors (64): all arrive, in order, and the
    /// sender does not panic.
    #[tokio::test]
    async fn listeners_beyond_one_message_of_descriptors_all_arrive_in_order() {
        let listeners: Vec<std::net::TcpListener> = (0..150)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ids: Vec<String> = (0..listeners.len()).map(outbound_id).collect();
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, mut rx) = (Channel::new(a), Channel::new(b));
        let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|l| l.as_fd()).collect();
        let msg = Message::Listeners {
            pid: 1,
            ids: ids.clone(),
            stats: StatsSnapshot::default(),
            histograms: vec![],
            commits: true,
        };
        let (sent, got) = tokio::join!(tx.send(&msg, &fds), rx.recv());
        sent.expect("sent");
        match got.expect("received") {
            Some(Message::Listeners { ids: got, .. }) => assert_eq!(got, ids),
            other => panic!("{other:?}"),
        }
        assert_eq!(rx.fds.len(), listeners.len());
        for (fd, l) in rx.fds.drain(..).zip(&listeners) {
            let got = std::net::TcpListener::from(fd);
            assert_eq!(got.local_addr().unwrap(), l.local_addr().unwrap());
        }
    }
}
