//! Kernel forwarding of opaque connections (`--kernel-forward on|off`): the bytes between a
//! client socket and its upstream socket flow in the kernel, not through this process.
//!
//! The kernel side is the interceptor's (`interceptor-ebpf/src/forward.rs`); this process
//! needs no bpf privilege for it. It only calls `setsockopt`/`getsockopt` on its own sockets,
//! answered by the root `cgroup/setsockopt` and `cgroup/getsockopt` programs:
//! - `SO_ICP_KFWD` 1 on the listeners (accepted sockets inherit it) and on each opaque
//!   upstream socket before `connect()`, each carrying the bypass mark while it asks (taken
//!   only from a marked socket): the socket goes into the kernel's `ICP_FWD` map when
//!   it is established, where a verdict program sees every byte it receives (passing it to
//!   this process until the pair is armed);
//! - `SO_ICP_KFWD_ARM` {peer cookie, bytes read}: once everything read from a socket has been
//!   written to its peer, the forwarder arms it; the kernel then redirects the socket's bytes
//!   to the peer as long as it has passed none that this process did not read (so no byte
//!   overtakes another), and both sockets are armed with each other;
//! - `getsockopt(SO_ICP_KFWD_ARM)`: the socket's counts (`FwdState`: passed, redirected,
//!   trimmed).
//!
//! Probed once at start: without the programs (not attached) the kernel answers
//! `ENOPROTOOPT`, and when the kernel refused their verdict (a kernel without sockmap's stream
//! verdicts, a verifier that rejects it) they answer `EPERM`: either way the proxy copies as
//! before. A pair that cannot be armed (a socket not in the map: map full, or accepted
//! before the request) is copied by the proxy, counted in `kernel_forward_fallbacks`.

use std::io;
use std::os::fd::{AsFd, AsRawFd as _};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use interceptor_common::{FwdArm, FwdState, SOL_IP, SO_ICP_KFWD, SO_ICP_KFWD_ARM};

static ENABLED: AtomicBool = AtomicBool::new(false);
/// The bypass mark (`--bypass-mark`), set on a socket without a mark while it asks.
static MARK: AtomicU32 = AtomicU32::new(0);
/// `--kernel-forward on`: while the kernel does not answer, asked again now and then
/// ([`catch_up`]).
static WANTED: AtomicBool = AtomicBool::new(false);
/// When the kernel was last asked ([`catch_up`]), in milliseconds since [`epoch`].
static LAST_PROBE_MS: AtomicU64 = AtomicU64::new(0);
/// How often an accept loop asks the kernel again while kernel forwarding is wanted and off.
const REPROBE_EVERY: Duration = Duration::from_secs(1);
/// Connections whose two sockets were armed with each other.
pub static ARMED: AtomicU64 = AtomicU64::new(0);
/// Bytes the kernel redirected, counted when their connection ended here.
pub static BYTES: AtomicU64 = AtomicU64::new(0);
/// Bytes the kernel cut from received segments because they repeated bytes already handed
/// on (retransmitted overlap), counted when their connection ended here.
pub static TRIMMED: AtomicU64 = AtomicU64::new(0);
/// Repeated bytes the kernel found but could not cut (handed on twice): should stay 0.
pub static UNCUT: AtomicU64 = AtomicU64::new(0);
/// Segments whose TCP control block the kernel could not read as expected (nothing cut in
/// them): should stay 0; not 0, the kernel's `struct sk_buff` layout differs.
pub static UNCHECKED: AtomicU64 = AtomicU64::new(0);

/// Counts what the kernel did for `socket` when its connection ends here: the bytes it
/// redirected (`BYTES`, and returned) and its cuts of repeated bytes (`FwdState::trimmed`,
/// `uncut`, `unchecked`; a repeat not cut is an error worth a line).
pub fn count_ended<S: AsFd>(socket: &S) -> u64 {
    let s = state(socket).unwrap_or_default();
    BYTES.fetch_add(s.redirected, Relaxed);
    TRIMMED.fetch_add(s.trimmed, Relaxed);
    UNCUT.fetch_add(s.uncut, Relaxed);
    UNCHECKED.fetch_add(s.unchecked, Relaxed);
    if s.uncut > 0 || s.unchecked > 0 {
        tracing::error!(
            uncut_bytes = s.uncut,
            unchecked_segments = s.unchecked,
            "kernel forwarding handed repeated bytes on (a retransmitted segment's overlap not cut)"
        );
    }
    s.redirected
}

/// Connections moved to the watcher ([`crate::kwatch`]) because the kernel carried both
/// directions (counted each time one is moved).
pub static WATCHED: AtomicU64 = AtomicU64::new(0);

/// Connections copied by the proxy although kernel forwarding is on (a socket not in the map).
pub static FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// Whether new opaque connections are forwarded in the kernel.
pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// Turns kernel forwarding on when `wanted` and the kernel answers the request on a throwaway
/// socket; returns whether it is on, and why not. `mark`: the bypass mark, which a socket
/// carries while it asks (the programs take the request only from a marked socket).
pub fn start(wanted: bool, mark: u32) -> Result<bool, io::Error> {
    MARK.store(mark, Relaxed);
    WANTED.store(wanted, Relaxed);
    if !wanted {
        ENABLED.store(false, Relaxed);
        return Ok(false);
    }
    LAST_PROBE_MS.store(millis_since_epoch(), Relaxed);
    let r = probe();
    ENABLED.store(r.is_ok(), Relaxed);
    if mark == 0 {
        // No socket of this process can carry a mark to ask with: never on, so `catch_up`
        // does not ask again (the probe's error says why).
        WANTED.store(false, Relaxed);
    }
    r.map(|()| true)
}

/// Whether kernel forwarding, wanted but not on, is asked for again at accepts
/// ([`catch_up`]); not with `--bypass-mark 0` (see [`start`]).
pub fn asks_again() -> bool {
    WANTED.load(Relaxed) && !enabled()
}

/// Asks the kernel on a throwaway socket.
fn probe() -> io::Result<()> {
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    request(&probe, true).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => io::Error::new(
            e.kind(),
            "the interceptor's programs refuse it: the kernel did not take kernel forwarding's \
             verdict program when they were attached (`interceptor attach` logged why)",
        ),
        Some(libc::ENOPROTOOPT) => io::Error::new(
            e.kind(),
            "the interceptor's programs are not attached on this host (or this kernel has no \
             cgroup sockopt programs)",
        ),
        _ => e,
    })
}

/// Called by an accept loop for each connection it accepts. Kernel forwarding wanted but not
/// available at start (the proxy started before the interceptor's programs were attached,
/// as a pod's sidecar may on a node where the node agent has not attached anything yet): the
/// kernel is asked again, at most once every [`REPROBE_EVERY`] over all loops, and once it
/// answers kernel forwarding is on for the connections that come next. Kernel forwarding on
/// and `listener` not asked yet (`asked`): asks for it on the listener. The connection just
/// accepted was established before that, so it is copied here (a fall-back).
pub fn catch_up<S: AsFd>(listener: &S, asked: &mut bool) {
    if *asked || !WANTED.load(Relaxed) {
        return;
    }
    if !enabled() {
        let now = millis_since_epoch();
        let last = LAST_PROBE_MS.load(Relaxed);
        if now.saturating_sub(last) < REPROBE_EVERY.as_millis() as u64
            || LAST_PROBE_MS
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        if probe().is_err() {
            return;
        }
        if !ENABLED.swap(true, Relaxed) {
            tracing::info!(
                "kernel forwarding on: the interceptor's programs answer now (they did not when \
                 the proxy started); opaque TCP bytes of new connections flow in the kernel"
            );
        }
    }
    match request(listener, true) {
        Ok(()) => *asked = true,
        Err(e) => {
            // Not asked: tried again at the next accept.
            tracing::debug!(error = %e, "cannot ask for kernel forwarding on a listener yet");
        }
    }
}

/// Milliseconds since the first call (a monotonic clock for [`catch_up`]'s spacing; never 0
/// after the first call, so the first probe is never throttled by the initial 0).
fn millis_since_epoch() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| Instant::now() - REPROBE_EVERY);
    epoch.elapsed().as_millis() as u64
}

/// `SO_ICP_KFWD`: asks for (or withdraws) kernel forwarding of `socket` (a listener: of the
/// sockets it accepts from now on). The programs take a request only from a socket carrying
/// a mark (a workload's sockets cannot fill their map): one without (an inbound listener,
/// the probe's socket) carries the bypass mark while it asks, and no mark after, so that the
/// sockets it accepts carry none either. Without a bypass mark (`--bypass-mark 0`) nothing
/// can be asked.
pub fn request<S: AsFd>(socket: &S, on: bool) -> io::Result<()> {
    let value = u32::from(on).to_ne_bytes();
    let sock = socket2::SockRef::from(socket);
    if !on || sock.mark()? != 0 {
        return setsockopt(socket, SO_ICP_KFWD, &value);
    }
    let mark = MARK.load(Relaxed);
    if mark == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "kernel forwarding needs the bypass mark (--bypass-mark 0 sets none): the \
             interceptor's programs take the request only from a socket carrying a mark",
        ));
    }
    sock.set_mark(mark)?;
    let asked = setsockopt(socket, SO_ICP_KFWD, &value);
    if let Err(e) = sock.set_mark(0) {
        tracing::warn!(error = %e, mark,
            "cannot take the bypass mark off a socket that asked for kernel forwarding: the \
             sockets it accepts carry the mark");
    }
    asked
}

/// `SO_ICP_KFWD` 1 on a socket that carries the bypass mark already (an upstream socket):
/// [`request`] without its look at the socket's mark, one system call fewer per connection.
pub fn request_marked<S: AsFd>(socket: &S) -> io::Result<()> {
    setsockopt(socket, SO_ICP_KFWD, &1u32.to_ne_bytes())
}

/// The socket's cookie (`SO_COOKIE`), by which the kernel's map knows it.
pub fn cookie<S: AsFd>(socket: &S) -> io::Result<u64> {
    rustix::net::sockopt::socket_cookie(socket).map_err(io::Error::from)
}

/// `SO_ICP_KFWD_ARM`: redirect `socket`'s bytes to `peer` (0: stop) once `read` bytes have
/// been read from it (all of them already written to the peer).
pub fn arm<S: AsFd>(socket: &S, peer: u64, read: u64) -> io::Result<()> {
    let a = FwdArm { peer, read };
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&a.peer.to_ne_bytes());
    b[8..].copy_from_slice(&a.read.to_ne_bytes());
    setsockopt(socket, SO_ICP_KFWD_ARM, &b)
}

/// The kernel's counts for `socket` (bytes passed to this process, bytes redirected).
pub fn state<S: AsFd>(socket: &S) -> io::Result<FwdState> {
    let mut b = [0u8; 56];
    let n = crate::original_dst::getsockopt(socket, SOL_IP, SO_ICP_KFWD_ARM, &mut b)?;
    if n < 56 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SO_ICP_KFWD_ARM answered {n} bytes, not 56"),
        ));
    }
    let u = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    Ok(FwdState {
        peer: u(0),
        armed: u(8),
        passed: u(16),
        redirected: u(24),
        trimmed: u(32),
        uncut: u(40),
        unchecked: u(48),
        ..FwdState::default()
    })
}

/// Bytes ever handed to `socket` for sending (its `write_seq` since the handshake), from one
/// `TCP_INFO` snapshot: data bytes sent once (`bytes_sent - bytes_retrans`) plus those not
/// yet sent (`notsent_bytes`). Also whether the socket is still open for sending (not
/// closed by an error or a reset).
pub fn queued<S: AsFd>(socket: &S) -> io::Result<(u64, bool)> {
    let mut b = [0u8; 216];
    let n = crate::original_dst::getsockopt(socket, libc::IPPROTO_TCP, libc::TCP_INFO, &mut b)?;
    if n < 216 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("TCP_INFO of {n} bytes has no bytes_sent"),
        ));
    }
    let u64_at = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let notsent = u32::from_ne_bytes(b[144..148].try_into().expect("4 bytes"));
    let (sent, retrans) = (u64_at(200), u64_at(208));
    // tcpi_state: TCP_CLOSE (7) after a reset or an error.
    let open = b[0] != 7;
    Ok((sent.saturating_sub(retrans) + u64::from(notsent), open))
}

fn setsockopt<S: AsFd>(socket: &S, name: libc::c_int, value: &[u8]) -> io::Result<()> {
    let len = libc::socklen_t::try_from(value.len()).map_err(io::Error::other)?;
    // SAFETY: `value` is valid for reads of `len` bytes; the fd is borrowed for the call.
    // The options are the kernel programs' (no crate knows them), so the raw call it is.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            SOL_IP,
            name,
            value.as_ptr().cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
