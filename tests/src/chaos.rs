//! Byte-exactness under irregular traffic: random write sizes and random shutdown order.
//!
//! One connection per seed. The client sends `CHAOS <seed>\n`, then both sides derive the
//! same plan from the seed: how many bytes each way (0, a few, or up to 8 MiB), written in
//! chunks of random size from 1 byte to 1 MiB (log-uniform, so most are small) with an
//! occasional pause of up to 2 ms (rarely 12 to 30 ms), then `shutdown(SHUT_WR)`. Each side reads the other's
//! stream to EOF at the same time and checks it byte for byte, so which side shuts down
//! first, and how far the other still has to go, varies from seed to seed. The server side
//! runs in the test process ([`ChaosServer`]); the client side runs as `icpt-probe chaos`
//! in the workload's cgroup.
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::probe::stream;

/// splitmix64: a small deterministic generator both sides run from the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Bytes each way for `seed`: (client to server, server to client).
pub fn plan(seed: u64) -> (u64, u64) {
    let mut r = Rng(seed ^ 0x5EED);
    let size = |r: &mut Rng| match r.below(8) {
        0 => 0,
        1 => 1 + r.below(16),
        2 | 3 => 1 + r.below(64 << 10),
        _ => 1 + r.below(8 << 20),
    };
    (size(&mut r), size(&mut r))
}

/// The seeds of the two streams and of the two writers' chunking.
fn seeds(seed: u64) -> (u64, u64) {
    (stream::client_seed(seed), seed)
}

/// Writes `n` bytes of the stream for `stream_seed` in random chunks (1 B to 1 MiB,
/// log-uniform) with occasional short pauses, then shuts the write side down.
fn write_random(s: &TcpStream, stream_seed: u64, n: u64, chunk_seed: u64) -> io::Result<()> {
    let mut r = Rng(chunk_seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    let mut w = s;
    while off < n {
        // 2^k for k in 0..=20, then a random length up to it.
        let cap = 1u64 << r.below(21);
        let len = (1 + r.below(cap)).min(n - off) as usize;
        stream::fill(stream_seed, off, &mut buf[..len]);
        w.write_all(&buf[..len])?;
        off += len as u64;
        match r.below(256) {
            // Longer than the proxy waits before it watches a connection whose two
            // directions the kernel carries (10 ms), so that connections are also watched,
            // and their EOFs seen, in the middle of a stream.
            0 => std::thread::sleep(Duration::from_micros(12_000 + r.below(18_000))),
            1..=3 => std::thread::sleep(Duration::from_micros(r.below(2000))),
            _ => {}
        }
    }
    s.shutdown(Shutdown::Write)
}

/// Reads to EOF and checks that exactly the first `n` bytes of the stream for `stream_seed`
/// arrived. Returns the count read.
fn read_exact_stream(s: &TcpStream, stream_seed: u64, n: u64) -> Result<u64, String> {
    let mut buf = vec![0u8; 256 << 10];
    let mut want = vec![0u8; 256 << 10];
    let mut got = 0u64;
    let mut rd = s;
    loop {
        let k = match rd.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read after {got} of {n} bytes: {e}")),
        };
        if got + k as u64 > n {
            return Err(format!("{} bytes arrived, {n} were sent", got + k as u64));
        }
        stream::fill(stream_seed, got, &mut want[..k]);
        if buf[..k] != want[..k] {
            let i = buf[..k].iter().zip(&want[..k]).position(|(a, b)| a != b);
            let i = i.unwrap_or(0);
            return Err(format!(
                "byte {} of {n} differs ({})",
                got + i as u64,
                shift(stream_seed, got + i as u64, &buf[i..k])
            ));
        }
        got += k as u64;
    }
    if got != n {
        return Err(format!("EOF after {got} of {n} bytes"));
    }
    Ok(got)
}

/// Where the bytes that arrived at stream offset `at` (`seen`, from the first wrong byte on)
/// were sent from: "repeated N bytes" (they were sent N bytes earlier: bytes arrived twice),
/// "skipped N bytes" (N bytes never arrived), or neither within 1 MiB.
fn shift(stream_seed: u64, at: u64, seen: &[u8]) -> String {
    let seen = &seen[..seen.len().min(64)];
    let mut want = vec![0u8; seen.len()];
    for d in 1..=(1u64 << 20) {
        if d <= at {
            stream::fill(stream_seed, at - d, &mut want);
            if want == seen {
                return format!("repeated {d} bytes");
            }
        }
        stream::fill(stream_seed, at + d, &mut want);
        if want == seen {
            return format!("skipped {d} bytes");
        }
    }
    format!("{} bytes seen match no offset within 1 MiB", seen.len())
}

/// Runs both halves on `s`: writes `send` bytes of `send_seed` (chunked by `chunk_seed`) on
/// a thread while reading `recv` bytes of `recv_seed` here.
fn exchange(
    s: TcpStream,
    (send_seed, send, chunk_seed): (u64, u64, u64),
    (recv_seed, recv): (u64, u64),
) -> Result<(), String> {
    let w = s.try_clone().map_err(|e| format!("dup: {e}"))?;
    let writer = std::thread::spawn(move || write_random(&w, send_seed, send, chunk_seed));
    let ends = format!("{:?} -> {:?}", s.local_addr().ok(), s.peer_addr().ok());
    let read = read_exact_stream(&s, recv_seed, recv).map_err(|e| format!("{e} ({ends})"));
    let wrote = writer.join().map_err(|_| "writer panicked".to_string())?;
    read?;
    wrote.map_err(|e| format!("write of {send} bytes: {e}"))
}

/// The client's side of one connection.
pub fn client(addr: SocketAddr, seed: u64, timeout: Duration) -> Result<(u64, u64), String> {
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    (&s).write_all(format!("CHAOS {seed}\n").as_bytes())
        .map_err(|e| format!("send header: {e}"))?;
    let (up, down) = plan(seed);
    let (cseed, sseed) = seeds(seed);
    exchange(s, (cseed, up, seed ^ 0xC11E), (sseed, down))?;
    Ok((up, down))
}

/// The server's side of one connection: reads the header, then runs the plan.
fn serve_one(s: TcpStream) -> Result<u64, String> {
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match (&s).read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            Ok(_) => return Err("EOF before the header".into()),
            Err(e) => return Err(format!("header: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&line);
    let seed: u64 = text
        .strip_prefix("CHAOS ")
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("bad header {text:?}"))?;
    let (up, down) = plan(seed);
    let (cseed, sseed) = seeds(seed);
    exchange(s, (sseed, down, seed ^ 0x5E7E), (cseed, up))?;
    Ok(seed)
}

/// Outcome of the server's side of every connection it took.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ChaosServerReport {
    pub ok: u64,
    pub errors: Vec<String>,
}

/// The server, in the test process: one thread per connection.
pub struct ChaosServer {
    addr: SocketAddr,
    report: Arc<Mutex<ChaosServerReport>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    _accept: JoinHandle<()>,
}

impl ChaosServer {
    /// Listens on `addr` in the namespace `ns` and serves until the test ends.
    pub fn start_in(ns: &crate::NetNs, addr: SocketAddr) -> ChaosServer {
        let l = ns
            .in_ns(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("chaos server on {addr}: {e}"));
        let report = Arc::new(Mutex::new(ChaosServerReport::default()));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let (r, t) = (report.clone(), threads.clone());
        let accept = std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let r = r.clone();
                t.lock().unwrap().push(std::thread::spawn(move || {
                    let out = serve_one(s);
                    let mut r = r.lock().unwrap();
                    match out {
                        Ok(_) => r.ok += 1,
                        Err(e) => r.errors.push(e),
                    }
                }));
            }
        });
        ChaosServer {
            addr,
            report,
            threads,
            _accept: accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for the connections served so far to finish, and returns the report.
    pub fn report(&self) -> ChaosServerReport {
        let done: Vec<_> = std::mem::take(&mut *self.threads.lock().unwrap());
        for t in done {
            let _ = t.join();
        }
        self.report.lock().unwrap().clone()
    }
}

/// What `icpt-probe chaos` prints.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ChaosReport {
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    /// Bytes sent and received, summed over the connections that succeeded.
    pub up: u64,
    pub down: u64,
}

/// `count` connections with seeds `seed..seed + count`, `parallel` at a time.
pub fn run(addr: SocketAddr, seed: u64, count: u64, parallel: u64) -> ChaosReport {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let report = Arc::new(Mutex::new(ChaosReport::default()));
    let workers: Vec<_> = (0..parallel.max(1))
        .map(|_| {
            let (next, report) = (next.clone(), report.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return;
                }
                let out = client(addr, seed + i, Duration::from_secs(60));
                let mut r = report.lock().unwrap();
                match out {
                    Ok((up, down)) => {
                        r.ok += 1;
                        r.up += up;
                        r.down += down;
                    }
                    Err(e) => {
                        r.failed += 1;
                        if r.first_error.is_none() {
                            r.first_error = Some(format!("seed {}: {e}", seed + i));
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let r = report.lock().unwrap().clone();
    r
}
