//! The `icpt-probe` protocol: a tiny TCP server and its clients.
//!
//! One request line per connection:
//!
//! * `HELLO\n` -> `peer=<addr the server saw> local=<server's local addr>\n`, then close.
//! * `BULK <n> <seed>\n` -> the server sends `n` bytes of [`stream`]`(seed)` while it
//!   reads the client's bytes to EOF, counting them and hashing them with xxh3-64;
//!   when both are done it sends the trailer `rx=<count> sum=<16 hex digits>\n` and
//!   closes. The client, knowing `n`, splits payload and trailer. The client sends
//!   [`stream`]`(`[`client_seed`]`(seed))`.
//!
//! Addresses are printed with IPv4-mapped IPv6 addresses turned back into IPv4,
//! so a dual-stack listener reports `127.0.0.1:port`, not `[::ffff:127.0.0.1]:port`.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use xxhash_rust::xxh3::Xxh3Default;

use crate::netns::enter_netns_current_thread;

/// How long a server connection may sit idle (no byte read or written).
const SERVER_IDLE: Duration = Duration::from_secs(60);
const CHUNK: usize = 256 * 1024;
const MAX_LINE: u64 = 256;

/// The deterministic byte streams both sides send.
pub mod stream {
    const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

    fn block(seed: u64, index: u64) -> [u8; 8] {
        // splitmix64 of (seed + (index + 1) * golden): stateless, so any offset can be generated.
        let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)).to_le_bytes()
    }

    /// Fills `buf` with bytes `offset..offset + buf.len()` of the stream for `seed`.
    pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
        let mut off = offset;
        let mut rest: &mut [u8] = buf;
        // Unaligned head.
        let head = ((8 - (off % 8)) % 8) as usize;
        if head > 0 {
            let b = block(seed, off / 8);
            let n = head.min(rest.len());
            let start = (off % 8) as usize;
            rest[..n].copy_from_slice(&b[start..start + n]);
            off += n as u64;
            rest = &mut rest[n..];
        }
        let mut chunks = rest.chunks_exact_mut(8);
        let mut idx = off / 8;
        for c in &mut chunks {
            c.copy_from_slice(&block(seed, idx));
            idx += 1;
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let b = block(seed, idx);
            let n = tail.len();
            tail.copy_from_slice(&b[..n]);
        }
    }

    /// The seed of the client-to-server stream of a `BULK` exchange with `seed`.
    pub fn client_seed(seed: u64) -> u64 {
        seed ^ 0xC1E4_7C1E_47C1_E47C
    }
}

pub use stream::client_seed;

/// Hex xxh3-64 of the first `n` bytes of the stream for `seed`.
pub fn stream_sum(seed: u64, n: u64) -> String {
    let mut h = Xxh3Default::new();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < n {
        let len = (n - off).min(CHUNK as u64) as usize;
        stream::fill(seed, off, &mut buf[..len]);
        h.update(&buf[..len]);
        off += len as u64;
    }
    format!("{:016x}", h.digest())
}

/// IPv4-mapped IPv6 -> IPv4; everything else unchanged.
pub fn normalize(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

// ---------------------------------------------------------------- errors

/// Coarse failure class, printed as `kind` in the probe's error JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// Connection refused (RST in answer to SYN).
    Refused,
    /// Connect or read/write timed out.
    Timeout,
    /// Connection reset, aborted, or closed by the peer before the expected reply.
    Reset,
    /// Anything else (unreachable, protocol error, bad reply, ...).
    Other,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Refused => "refused",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::Other => "other",
        }
    }

    fn of(e: &io::Error) -> ErrorKind {
        use io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => ErrorKind::Refused,
            K::TimedOut | K::WouldBlock => ErrorKind::Timeout,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                ErrorKind::Reset
            }
            _ => ErrorKind::Other,
        }
    }
}

/// A client failure with its class.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ProbeError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ProbeError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ProbeError {
        ProbeError {
            kind,
            message: message.into(),
        }
    }

    fn io(what: &str, e: io::Error) -> ProbeError {
        ProbeError {
            kind: ErrorKind::of(&e),
            message: format!("{what}: {e}"),
        }
    }

    /// `{"error": "...", "kind": "refused|timeout|reset|other"}`
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.message, "kind": self.kind.as_str() })
    }
}

// ---------------------------------------------------------------- clients

/// Socket options for the clients.
#[derive(Debug, Clone)]
pub struct ClientOpts {
    /// SO_MARK for the socket (the interceptor lets the bypass mark through).
    pub mark: Option<u32>,
    /// Local address to bind before connecting.
    pub bind: Option<SocketAddr>,
    /// Connect timeout, and idle timeout of each read/write.
    pub timeout: Duration,
    /// `bulk`: how long to wait after sending the request before reading anything (a reader
    /// that lags behind its server).
    pub read_after: Duration,
    /// `bulk`: count the payload received without checking it against the stream (a reader
    /// that keeps up with a server; the sums in the report are then those of nothing).
    pub unchecked: bool,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts {
            mark: None,
            bind: None,
            timeout: Duration::from_secs(5),
            read_after: Duration::ZERO,
            unchecked: false,
        }
    }
}

/// Connects to `addr` with the options (SO_MARK, bind, timeouts, TCP_NODELAY).
pub fn connect(addr: SocketAddr, opts: &ClientOpts) -> Result<TcpStream, ProbeError> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| ProbeError::io("socket", e))?;
    if let Some(m) = opts.mark {
        sock.set_mark(m)
            .map_err(|e| ProbeError::io(&format!("setsockopt SO_MARK {m:#x}"), e))?;
    }
    if let Some(b) = opts.bind {
        sock.bind(&SockAddr::from(b))
            .map_err(|e| ProbeError::io(&format!("bind {b}"), e))?;
    }
    sock.connect_timeout(&SockAddr::from(addr), opts.timeout)
        .map_err(|e| ProbeError::io(&format!("connect {addr}"), e))?;
    let s: TcpStream = sock.into();
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(opts.timeout))
        .map_err(|e| ProbeError::io("set read timeout", e))?;
    s.set_write_timeout(Some(opts.timeout))
        .map_err(|e| ProbeError::io("set write timeout", e))?;
    Ok(s)
}

/// What `hello` learnt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// The client socket's local address.
    pub local: SocketAddr,
    /// The address the client asked to connect to.
    pub remote: SocketAddr,
    /// The client socket's peer address (getpeername) after connect.
    pub socket_peer: SocketAddr,
    /// The peer address the server saw on its accepted socket.
    pub peer_seen_by_server: SocketAddr,
    /// The server's local address on its accepted socket.
    pub server_local: SocketAddr,
    /// `peer_seen_by_server != local`: something (the proxy) sat in between.
    pub proxied: bool,
}

/// Connects, sends `HELLO`, and parses the reply.
pub fn hello(addr: SocketAddr, opts: &ClientOpts) -> Result<HelloReply, ProbeError> {
    hello_send(addr, opts)?.finish()
}

/// A `HELLO` sent, its reply not read yet.
#[derive(Debug)]
pub struct PendingHello {
    stream: TcpStream,
    addr: SocketAddr,
    local: SocketAddr,
    socket_peer: SocketAddr,
}

/// Connects and sends `HELLO`; [`PendingHello::finish`] reads the reply.
pub fn hello_send(addr: SocketAddr, opts: &ClientOpts) -> Result<PendingHello, ProbeError> {
    let mut s = connect(addr, opts)?;
    let local = normalize(
        s.local_addr()
            .map_err(|e| ProbeError::io("getsockname", e))?,
    );
    let socket_peer = normalize(
        s.peer_addr()
            .map_err(|e| ProbeError::io("getpeername", e))?,
    );
    s.write_all(b"HELLO\n")
        .map_err(|e| ProbeError::io("send HELLO", e))?;
    Ok(PendingHello {
        stream: s,
        addr,
        local,
        socket_peer,
    })
}

impl PendingHello {
    /// Reads and parses the reply.
    pub fn finish(mut self) -> Result<HelloReply, ProbeError> {
        let addr = self.addr;
        let mut reply = Vec::new();
        (&mut self.stream)
            .take(1024)
            .read_to_end(&mut reply)
            .map_err(|e| ProbeError::io("read HELLO reply", e))?;
        let text = String::from_utf8_lossy(&reply);
        let line = text.trim();
        if line.is_empty() {
            return Err(ProbeError::new(
                ErrorKind::Reset,
                format!("connection to {addr} closed without a reply"),
            ));
        }
        let (peer, server_local) = parse_hello_reply(line).ok_or_else(|| {
            ProbeError::new(
                ErrorKind::Other,
                format!("unexpected HELLO reply from {addr}: {line:?}"),
            )
        })?;
        // The server seeing our own address usually means a direct connection, but the
        // proxy's upstream socket may have picked the same local port as ours (another
        // 4-tuple, so the kernel allows it). Then the kernel's socket table decides: our
        // socket is really connected to something other than the server.
        let proxied =
            peer != self.local || connected_elsewhere(self.local, server_local).unwrap_or(false);
        Ok(HelloReply {
            local: self.local,
            remote: addr,
            socket_peer: self.socket_peer,
            peer_seen_by_server: peer,
            server_local,
            proxied,
        })
    }
}

/// Whether a TCP socket of this network namespace with local address `local` is connected
/// to a peer other than `server` (from `/proc/net/tcp` and `tcp6`, which show the real
/// peer: `getpeername()` may be rewritten by the interception). Only sockets in the states
/// ours can be in while we hold it count (ESTABLISHED, or CLOSE_WAIT once the peer closed):
/// an earlier connection from the same port, closed and now in TIME_WAIT, is not ours.
fn connected_elsewhere(local: SocketAddr, server: SocketAddr) -> io::Result<bool> {
    const ESTABLISHED: &str = "01";
    const CLOSE_WAIT: &str = "08";
    let (local, server) = (normalize(local), normalize(server));
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(file)?;
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace().skip(1);
            let (Some(l), Some(r), Some(state)) = (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if state != ESTABLISHED && state != CLOSE_WAIT {
                continue;
            }
            if let (Some(l), Some(r)) = (proc_net_addr(l), proc_net_addr(r)) {
                if normalize(l) == local && normalize(r) != server {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// Parses `0100007F:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6): each 32-bit word as the
/// kernel prints it, i.e. in host byte order.
fn proc_net_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(|w| w.to_ne_bytes());
    match ip.len() {
        8 => Some(SocketAddr::new(
            std::net::Ipv4Addr::from(word(ip)?).into(),
            port,
        )),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(&ip[i * 8..i * 8 + 8])?);
            }
            Some(SocketAddr::new(std::net::Ipv6Addr::from(b).into(), port))
        }
        _ => None,
    }
}

/// `count` connections opened and their `HELLO` sent one after the other, all before
/// any reply is read (they queue wherever the path is slow, e.g. in a stopped proxy's
/// accept queue); `on_queued` runs then; then every reply is read. Failures are counted
/// per phase in the report (`ok + failed == count`).
pub fn burst(
    addr: SocketAddr,
    count: u64,
    opts: &ClientOpts,
    on_queued: impl FnOnce(u64),
) -> ChurnReport {
    let start = Instant::now();
    let mut r = ChurnReport::default();
    let fail = |r: &mut ChurnReport, e: ProbeError| {
        r.failed += 1;
        *r.errors.entry(e.kind.as_str().to_string()).or_default() += 1;
        r.first_error.get_or_insert(e.message);
    };
    let mut pending = Vec::with_capacity(count as usize);
    for _ in 0..count {
        match hello_send(addr, opts) {
            Ok(p) => pending.push(p),
            Err(e) => fail(&mut r, e),
        }
    }
    on_queued(pending.len() as u64);
    for p in pending {
        match p.finish() {
            Ok(h) => {
                r.ok += 1;
                r.proxied += u64::from(h.proxied);
            }
            Err(e) => fail(&mut r, e),
        }
    }
    r.elapsed_ms = start.elapsed().as_millis() as u64;
    r
}

fn parse_hello_reply(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let mut peer = None;
    let mut local = None;
    for word in line.split_whitespace() {
        if let Some(v) = word.strip_prefix("peer=") {
            peer = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("local=") {
            local = v.parse().ok();
        }
    }
    Some((peer?, local?))
}

/// Result of a `bulk` exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkReport {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Bytes the client sent, and their xxh3-64.
    pub sent: u64,
    pub sent_sum: String,
    /// Payload bytes received (trailer excluded), their xxh3-64, and what they should hash to.
    pub received: u64,
    pub received_sum: String,
    pub expected_received_sum: String,
    /// Offset of the first received byte that differs from the expected stream.
    pub first_mismatch: Option<u64>,
    /// What the server's trailer says it received.
    pub server_rx: Option<u64>,
    pub server_sum: Option<String>,
    /// Received payload is exactly the expected stream.
    pub payload_ok: bool,
    /// Server received exactly what was sent.
    pub trailer_ok: bool,
    pub ok: bool,
    pub elapsed_ms: u64,
    /// Bytes on the connection each way: the request line and the payload sent, the payload
    /// and the trailer received (what a proxy between counts).
    pub wire_sent: u64,
    pub wire_received: u64,
}

/// Sends `send` bytes and receives `recv` bytes over one connection, concurrently,
/// and checks both directions byte-exactly (see the module docs).
/// `opts.timeout` bounds connect and each read/write.
pub fn bulk(
    addr: SocketAddr,
    send: u64,
    recv: u64,
    seed: u64,
    opts: &ClientOpts,
) -> Result<BulkReport, ProbeError> {
    let start = Instant::now();
    let mut s = connect(addr, opts)?;
    let local = normalize(
        s.local_addr()
            .map_err(|e| ProbeError::io("getsockname", e))?,
    );
    let request = format!("BULK {recv} {seed}\n");
    s.write_all(request.as_bytes())
        .map_err(|e| ProbeError::io("send BULK", e))?;
    let mut w = s.try_clone().map_err(|e| ProbeError::io("dup socket", e))?;
    let cseed = client_seed(seed);
    let writer = std::thread::spawn(move || -> io::Result<String> {
        let sum = write_stream(&mut w, cseed, send)?;
        w.shutdown(Shutdown::Write)?;
        Ok(sum)
    });

    let mut received = 0u64;
    let mut got = Xxh3Default::new();
    let mut want = Xxh3Default::new();
    let mut first_mismatch = None;
    let mut trailer = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    let mut expect = vec![0u8; CHUNK];
    std::thread::sleep(opts.read_after);
    let read_result: Result<(), ProbeError> = loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                break Err(ProbeError::io(
                    &format!("read after {received} payload bytes"),
                    e,
                ))
            }
        };
        let data = &buf[..n];
        let payload_len = (recv - received).min(n as u64) as usize;
        if payload_len > 0 && opts.unchecked {
            received += payload_len as u64;
        } else if payload_len > 0 {
            let p = &data[..payload_len];
            stream::fill(seed, received, &mut expect[..payload_len]);
            if first_mismatch.is_none() && p != &expect[..payload_len] {
                let i = p
                    .iter()
                    .zip(&expect[..payload_len])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                first_mismatch = Some(received + i as u64);
            }
            got.update(p);
            want.update(&expect[..payload_len]);
            received += payload_len as u64;
        }
        trailer.extend_from_slice(&data[payload_len..]);
        if trailer.len() > 1024 {
            break Err(ProbeError::new(
                ErrorKind::Other,
                "server sent more than the payload and a trailer",
            ));
        }
    };
    let write_result = writer
        .join()
        .map_err(|_| ProbeError::new(ErrorKind::Other, "writer thread panicked"))?;
    read_result?;
    let sent_sum = write_result.map_err(|e| ProbeError::io("send payload", e))?;
    // Finish the expected hash if the payload came up short.
    let mut off = if opts.unchecked { recv } else { received };
    while off < recv {
        let len = (recv - off).min(CHUNK as u64) as usize;
        stream::fill(seed, off, &mut expect[..len]);
        want.update(&expect[..len]);
        off += len as u64;
    }
    let text = String::from_utf8_lossy(&trailer);
    let (server_rx, server_sum) = parse_trailer(text.trim());
    let payload_ok = received == recv && first_mismatch.is_none();
    let trailer_ok = server_rx == Some(send) && server_sum.as_deref() == Some(sent_sum.as_str());
    Ok(BulkReport {
        local,
        remote: addr,
        sent: send,
        sent_sum,
        received,
        received_sum: format!("{:016x}", got.digest()),
        expected_received_sum: format!("{:016x}", want.digest()),
        first_mismatch,
        server_rx,
        server_sum,
        payload_ok,
        trailer_ok,
        ok: payload_ok && trailer_ok,
        elapsed_ms: start.elapsed().as_millis() as u64,
        wire_sent: request.len() as u64 + send,
        wire_received: received + trailer.len() as u64,
    })
}

fn parse_trailer(line: &str) -> (Option<u64>, Option<String>) {
    let mut rx = None;
    let mut sum = None;
    for word in line.split_whitespace() {
        if let Some(v) = word.strip_prefix("rx=") {
            rx = v.parse().ok();
        } else if let Some(v) = word.strip_prefix("sum=") {
            sum = Some(v.to_string());
        }
    }
    (rx, sum)
}

/// Writes `n` bytes of the stream for `seed`; returns their hex xxh3-64.
fn write_stream(w: &mut impl Write, seed: u64, n: u64) -> io::Result<String> {
    let mut h = Xxh3Default::new();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < n {
        let len = (n - off).min(CHUNK as u64) as usize;
        stream::fill(seed, off, &mut buf[..len]);
        w.write_all(&buf[..len])?;
        h.update(&buf[..len]);
        off += len as u64;
    }
    w.flush()?;
    Ok(format!("{:016x}", h.digest()))
}

/// Result of `churn`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChurnReport {
    pub ok: u64,
    pub failed: u64,
    /// Successful exchanges whose `peer_seen_by_server` differed from the client's local address.
    pub proxied: u64,
    /// Failures by kind (`refused`, `timeout`, `reset`, `other`).
    pub errors: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    pub elapsed_ms: u64,
}

/// `count` short `HELLO` connections, spread over `parallel` threads (each thread's
/// share runs sequentially). Bounded: each attempt is bounded by `opts.timeout`.
pub fn churn(addr: SocketAddr, count: u64, parallel: u64, opts: &ClientOpts) -> ChurnReport {
    churn_bounded(addr, Some(count), None, parallel, opts)
}

/// Short `HELLO` connections from `parallel` threads, each one after the other, until
/// `duration` has passed (an attempt started before the deadline is finished). Bounded:
/// the run takes at most `duration` plus one `opts.timeout`-bounded attempt.
pub fn churn_for(
    addr: SocketAddr,
    duration: Duration,
    parallel: u64,
    opts: &ClientOpts,
) -> ChurnReport {
    churn_bounded(addr, None, Some(duration), parallel, opts)
}

/// Short `HELLO` connections over `parallel` threads until `count` are done (spread
/// evenly over the threads) or `duration` has passed, whichever comes first. With
/// neither bound nothing is done.
pub fn churn_bounded(
    addr: SocketAddr,
    count: Option<u64>,
    duration: Option<Duration>,
    parallel: u64,
    opts: &ClientOpts,
) -> ChurnReport {
    churn_spread(addr, 1, count, duration, parallel, opts)
}

/// `addr` plus `i % spread` on the address (IPv4 only; spread 1 is `addr` itself): the
/// destination of the `i`-th connection of a spread churn.
pub fn spread_addr(addr: SocketAddr, i: u64, spread: u32) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if spread > 1 => {
            let ip = u32::from(*a.ip()).wrapping_add((i % spread as u64) as u32);
            SocketAddr::new(std::net::Ipv4Addr::from(ip).into(), a.port())
        }
        other => other,
    }
}

/// [`churn_bounded`] over `spread` consecutive destination addresses starting at `addr`,
/// taken in turn (see [`spread_addr`]).
pub fn churn_spread(
    addr: SocketAddr,
    spread: u32,
    count: Option<u64>,
    duration: Option<Duration>,
    parallel: u64,
    opts: &ClientOpts,
) -> ChurnReport {
    let next = AtomicU64::new(0);
    let next = &next;
    let start = Instant::now();
    let deadline = duration.map(|d| start + d);
    let parallel = match count {
        Some(c) => parallel.clamp(1, 256).min(c.max(1)),
        None => parallel.clamp(1, 256),
    };
    let report = Mutex::new(ChurnReport::default());
    std::thread::scope(|s| {
        for t in 0..parallel {
            let share = match (count, deadline) {
                (Some(c), _) => c / parallel + u64::from(t < c % parallel),
                (None, Some(_)) => u64::MAX,
                (None, None) => 0,
            };
            let report = &report;
            s.spawn(move || {
                let mut mine = ChurnReport::default();
                for _ in 0..share {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    let dst = spread_addr(addr, next.fetch_add(1, Ordering::Relaxed), spread);
                    match hello(dst, opts) {
                        Ok(r) => {
                            mine.ok += 1;
                            mine.proxied += u64::from(r.proxied);
                        }
                        Err(e) => {
                            mine.failed += 1;
                            *mine.errors.entry(e.kind.as_str().to_string()).or_default() += 1;
                            mine.first_error.get_or_insert(e.message);
                        }
                    }
                }
                let mut r = report.lock().unwrap();
                r.ok += mine.ok;
                r.failed += mine.failed;
                r.proxied += mine.proxied;
                for (k, v) in mine.errors {
                    *r.errors.entry(k).or_default() += v;
                }
                if r.first_error.is_none() {
                    r.first_error = mine.first_error;
                }
            });
        }
    });
    let mut r = report.into_inner().unwrap();
    r.elapsed_ms = start.elapsed().as_millis() as u64;
    r
}

/// Splits `127.0.0.1:15000/ready` (or `[::1]:15000/stats`, optional `http://`)
/// into address and path.
pub fn parse_http_target(target: &str) -> Result<(SocketAddr, String), ProbeError> {
    let t = target.strip_prefix("http://").unwrap_or(target);
    let (addr, path) = match t.find('/') {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, "/"),
    };
    let addr = addr.parse().map_err(|e| {
        ProbeError::new(
            ErrorKind::Other,
            format!("bad address {addr:?} in {target:?}: {e}"),
        )
    })?;
    Ok((addr, path.to_string()))
}

/// Minimal HTTP/1.0 GET; returns the status code and the body (chunked bodies are decoded).
pub fn http_get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), ProbeError> {
    let opts = ClientOpts {
        timeout,
        ..ClientOpts::default()
    };
    let mut s = connect(addr, &opts)?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: icpt-probe\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| ProbeError::io("send request", e))?;
    let mut raw = Vec::new();
    (&mut s)
        .take(16 << 20)
        .read_to_end(&mut raw)
        .map_err(|e| ProbeError::io("read response", e))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            ProbeError::new(
                ErrorKind::Reset,
                format!("incomplete HTTP response from {addr}"),
            )
        })?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = &raw[split + 4..];
    let status: u16 = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            ProbeError::new(
                ErrorKind::Other,
                format!("bad HTTP status line from {addr}: {head:?}"),
            )
        })?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size_txt = String::from_utf8_lossy(&b[..eol]);
        let Ok(size) = usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
        else {
            break;
        };
        b = &b[eol + 2..];
        if size == 0 || b.len() < size {
            out.extend_from_slice(&b[..size.min(b.len())]);
            break;
        }
        out.extend_from_slice(&b[..size]);
        b = b.get(size + 2..).unwrap_or(&[]);
    }
    out
}

// ---------------------------------------------------------------- server

/// A running probe server (the same code `icpt-probe serve` runs): one accept
/// thread per listener, one thread per connection.
///
/// Drop: stops accepting, shuts down live connections, joins the accept threads
/// (within ~100 ms).
pub struct ProbeServer {
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    live: Arc<Mutex<BTreeMap<u64, TcpStream>>>,
    threads: Vec<JoinHandle<()>>,
}

impl ProbeServer {
    /// Listens on `listen` (port 0 picks a free port) in the caller's network namespace.
    pub fn start(listen: &[SocketAddr]) -> io::Result<ProbeServer> {
        let listeners = listen
            .iter()
            .map(|a| bind_listener(*a))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self::run(listeners))
    }

    /// Listens on `listen` inside the network namespace at `netns` (e.g.
    /// `NetNs::path()`): the sockets are created on a helper thread that has
    /// entered it, so the calling thread stays where it is.
    pub fn start_in(netns: &Path, listen: &[SocketAddr]) -> io::Result<ProbeServer> {
        let listeners = std::thread::scope(|s| {
            s.spawn(|| -> io::Result<Vec<TcpListener>> {
                enter_netns_current_thread(netns)?;
                listen.iter().map(|a| bind_listener(*a)).collect()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("listener thread panicked")))
        })?;
        Ok(Self::run(listeners))
    }

    fn run(listeners: Vec<TcpListener>) -> ProbeServer {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let live = Arc::new(Mutex::new(BTreeMap::new()));
        let addrs = listeners
            .iter()
            .map(|l| normalize(l.local_addr().expect("listener address")))
            .collect();
        let threads = listeners
            .into_iter()
            .map(|l| {
                let (stop, accepted, live) = (stop.clone(), accepted.clone(), live.clone());
                std::thread::spawn(move || accept_loop(l, stop, accepted, live))
            })
            .collect();
        ProbeServer {
            addrs,
            stop,
            accepted,
            live,
            threads,
        }
    }

    /// Bound addresses, in the order given (ports resolved).
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The first bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Blocks until the server is stopped (never, for `icpt-probe serve`).
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for ProbeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Ok(live) = self.live.lock() {
            for s in live.values() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // [::]:p and 0.0.0.0:p can then both be listened on.
        sock.set_only_v6(true)?;
    }
    sock.bind(&SockAddr::from(addr))
        .map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

fn accept_loop(
    l: TcpListener,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    live: Arc<Mutex<BTreeMap<u64, TcpStream>>>,
) {
    use nix::poll::{poll, PollFd, PollFlags};
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(l.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, 100u16) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        match l.accept() {
            Ok((s, _)) => {
                let id = accepted.fetch_add(1, Ordering::Relaxed);
                if let Ok(c) = s.try_clone() {
                    live.lock().unwrap().insert(id, c);
                }
                let live = live.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("probe-conn".into())
                        .spawn(move || {
                            let _ = handle_conn(s);
                            live.lock().unwrap().remove(&id);
                        });
                if spawned.is_err() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => std::thread::sleep(Duration::from_millis(10)), // EMFILE and friends
        }
    }
}

/// Bytes of `BULK` streams that the servers of this process have handed to their sockets.
static SERVED: AtomicU64 = AtomicU64::new(0);

/// Bytes of `BULK` streams that every [`ProbeServer`] of this process has handed to its
/// sockets so far (all connections): how far a server got while its client did not read.
pub fn bulk_bytes_served() -> u64 {
    SERVED.load(Ordering::Relaxed)
}

/// A server connection's writer, counting into [`SERVED`].
struct Counted(TcpStream);

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        SERVED.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

fn handle_conn(s: TcpStream) -> io::Result<()> {
    s.set_nonblocking(false)?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(SERVER_IDLE))?;
    s.set_write_timeout(Some(SERVER_IDLE))?;
    let peer = normalize(s.peer_addr()?);
    let local = normalize(s.local_addr()?);
    let mut reader = BufReader::with_capacity(CHUNK, s.try_clone()?);
    let mut line = Vec::new();
    (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)?;
    let line = String::from_utf8_lossy(&line);
    let mut words = line.split_whitespace();
    match words.next() {
        Some("HELLO") => {
            (&s).write_all(format!("peer={peer} local={local}\n").as_bytes())?;
            s.shutdown(Shutdown::Write)
        }
        Some("BULK") => {
            let n: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            let seed: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            let mut w = Counted(s.try_clone()?);
            let writer = std::thread::spawn(move || write_stream(&mut w, seed, n));
            let mut h = Xxh3Default::new();
            let mut count = 0u64;
            let read_res: io::Result<()> = loop {
                let buf = match reader.fill_buf() {
                    Ok(b) => b,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => break Err(e),
                };
                if buf.is_empty() {
                    break Ok(());
                }
                h.update(buf);
                count += buf.len() as u64;
                let len = buf.len();
                reader.consume(len);
            };
            let write_res = writer
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("writer panicked")));
            if read_res.is_err() || write_res.is_err() {
                let _ = s.shutdown(Shutdown::Both);
                return read_res.and(write_res.map(|_| ()));
            }
            (&s).write_all(format!("rx={count} sum={:016x}\n", h.digest()).as_bytes())?;
            s.shutdown(Shutdown::Write)
        }
        _ => {
            (&s).write_all(b"ERR unknown command (HELLO | BULK <n> <seed>)\n")?;
            s.shutdown(Shutdown::Write)
        }
    }
}

/// Sends `line` on `c` and reads the same back (an echo server's round): an error if the
/// connection ends first or the bytes differ.
pub fn echo_round(c: &mut TcpStream, line: &[u8]) -> io::Result<()> {
    c.write_all(line)?;
    let mut got = Vec::with_capacity(line.len());
    let mut buf = [0u8; 64];
    while got.len() < line.len() {
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..n]);
    }
    if got != line {
        return Err(io::Error::other(format!(
            "sent {:?}, got {:?}",
            String::from_utf8_lossy(line),
            String::from_utf8_lossy(&got)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses_parse() {
        assert_eq!(
            proc_net_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            proc_net_addr("00000000000000000000000001000000:3A99"),
            Some("[::1]:15001".parse().unwrap())
        );
        assert_eq!(
            proc_net_addr("0000000000000000FFFF00000100007F:0050"),
            Some("[::ffff:127.0.0.1]:80".parse().unwrap())
        );
        assert_eq!(proc_net_addr("zz:1"), None);
    }

    /// A socket left in TIME_WAIT by an earlier connection from the same local port (to
    /// another peer) is not a live connection: it does not make a direct one look proxied.
    #[test]
    fn a_time_wait_socket_on_the_same_port_is_not_connected_elsewhere() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let earlier = TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let local = earlier.local_addr().unwrap();
        let (accepted, _) = server.accept().unwrap();
        // The client closes first: its end (local port `local`) goes to TIME_WAIT.
        drop(earlier);
        let mut rest = Vec::new();
        let _ = (&accepted).read_to_end(&mut rest);
        drop(accepted);
        let other: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .any(|l| l.contains(&format!(":{:04X} ", local.port())) && l.contains(" 06 "))
        {
            assert!(Instant::now() < deadline, "no TIME_WAIT socket on {local}");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!connected_elsewhere(local, other).unwrap());
    }

    #[test]
    fn stream_is_offset_independent() {
        let mut whole = vec![0u8; 1000];
        stream::fill(7, 0, &mut whole);
        for (off, len) in [(0, 3), (3, 5), (5, 17), (999, 1), (13, 0), (8, 16)] {
            let mut part = vec![0u8; len];
            stream::fill(7, off as u64, &mut part);
            assert_eq!(part, whole[off..off + len], "off {off} len {len}");
        }
        let mut other = vec![0u8; 1000];
        stream::fill(8, 0, &mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn parses_replies() {
        let (p, l) = parse_hello_reply("peer=127.0.0.1:5 local=[::1]:8080").unwrap();
        assert_eq!(p, "127.0.0.1:5".parse().unwrap());
        assert_eq!(l, "[::1]:8080".parse().unwrap());
        assert_eq!(
            parse_trailer("rx=10 sum=00ff"),
            (Some(10), Some("00ff".into()))
        );
        let (a, p) = parse_http_target("[::1]:15000/stats").unwrap();
        assert_eq!((a, p.as_str()), ("[::1]:15000".parse().unwrap(), "/stats"));
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), b"abcde");
    }

    #[test]
    fn loopback_exchange() {
        let srv = ProbeServer::start(&["127.0.0.1:0".parse().unwrap()]).unwrap();
        let r = hello(srv.addr(), &ClientOpts::default()).unwrap();
        assert_eq!(r.peer_seen_by_server, r.local);
        assert!(!r.proxied);
        let b = bulk(srv.addr(), 300_001, 200_003, 42, &ClientOpts::default()).unwrap();
        assert!(b.ok, "{b:?}");
        assert_eq!(b.expected_received_sum, stream_sum(42, 200_003));
        let c = churn(srv.addr(), 20, 3, &ClientOpts::default());
        assert_eq!((c.ok, c.failed, c.proxied), (20, 0, 0));
        let c = churn_for(
            srv.addr(),
            Duration::from_millis(200),
            2,
            &ClientOpts::default(),
        );
        assert!(c.ok > 0 && c.failed == 0, "{c:?}");
        let c = churn_bounded(
            srv.addr(),
            Some(7),
            Some(Duration::from_secs(60)),
            2,
            &ClientOpts::default(),
        );
        assert_eq!((c.ok, c.failed), (7, 0));
    }
}
