//! The bench's own load clients and idle server, run as hidden subcommands of
//! `interceptor-bench` inside a world's namespace (and, for clients, its workload
//! cgroup as uid 2000). Each prints one JSON line on stdout.
//!
//! They exist where a Debian tool cannot measure honestly:
//! - `close`: one new connection per request, latency *including* connect (wrk starts
//!   its timer after connect);
//! - `rate`: open-loop requests at a fixed rate, latency measured without coordinated
//!   omission;
//! - `idle` + `hold`: many idle proxied connections held open, for the proxy's memory.
//!
//! Every loop is bounded by a deadline and a count.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::json;

/// A keep-alive GET for nginx.
const REQ_KEEPALIVE: &[u8] =
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: icpt-bench\r\n\r\n";
/// A GET after which nginx closes the connection.
const REQ_CLOSE: &[u8] =
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: icpt-bench\r\nConnection: close\r\n\r\n";
/// Upper bound on any request loop, whatever the duration.
const MAX_REQUESTS_PER_THREAD: u64 = 20_000_000;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Subcommand, Debug)]
pub enum Role {
    /// Closed loop, one new connection per request: connect, GET with `Connection:
    /// close`, read to EOF. Latency includes connect.
    #[command(hide = true)]
    Close {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 16)]
        threads: u32,
        #[arg(long)]
        duration_ms: u64,
    },
    /// Open loop at a fixed rate over keep-alive connections.
    #[command(hide = true)]
    Rate {
        #[arg(long)]
        addr: SocketAddr,
        /// Requests per second, over all connections.
        #[arg(long)]
        rate: u32,
        #[arg(long, default_value_t = 8)]
        conns: u32,
        #[arg(long)]
        duration_ms: u64,
    },
    /// Opens COUNT connections, exchanges one byte each way on each, prints `ready`,
    /// then holds them idle until killed (at most HOLD_S seconds).
    #[command(hide = true)]
    Idle {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: u32,
        #[arg(long, default_value_t = 300)]
        hold_s: u64,
    },
    /// COUNT connections, the i-th to FIRST + i (so COUNT distinct destination addresses),
    /// each a GET with `Connection: close` read to EOF, over THREADS threads.
    #[command(hide = true)]
    Spread {
        #[arg(long)]
        first: std::net::Ipv4Addr,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        count: u64,
        /// Destinations used in turn (0: COUNT of them, every connection its own).
        #[arg(long, default_value_t = 0)]
        distinct: u64,
        #[arg(long, default_value_t = 8)]
        threads: u32,
    },
    /// Per-destination statistics: memory with the switch off and on, bytes per series,
    /// scrape time, memory under destination churn (see bench/README.md).
    Stats(crate::stats::StatsArgs),
    /// HTTP routing against opaque passthrough, keep-alive (see bench/README.md).
    Routing(crate::routing::RoutingArgs),
    /// Proxy upgrade with 100, 1,000 and 10,000 established connections: time to the old
    /// process's exit, latency of a fixed-rate load meanwhile (see bench/README.md).
    Upgrade(crate::upgrade::UpgradeArgs),
    /// Proxy CPU while clients stay silent in protocol detection (see bench/README.md).
    DetectIdle(crate::detect::DetectArgs),
    /// Opens COUNT connections, writes PREFIX (may be empty) on each, prints `ready`, then
    /// holds them without another byte until killed (at most HOLD_S seconds).
    #[command(hide = true)]
    Silent {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: u32,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 300)]
        hold_s: u64,
    },
    /// Dubbo provider for `routing`: answers every request with the same value.
    #[command(hide = true)]
    DubboServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 600)]
        lifetime_s: u64,
    },
    /// Dubbo client for `routing`: CONNS connections, DEPTH requests in flight on each.
    #[command(hide = true)]
    DubboLoad {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 16)]
        conns: u32,
        #[arg(long, default_value_t = 4)]
        depth: u32,
        #[arg(long)]
        duration_ms: u64,
    },
    /// Idle server: accepts, writes one byte, holds the connection (never reads);
    /// exits after LIFETIME_S seconds.
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 600)]
        lifetime_s: u64,
    },
}

pub fn run(role: Role) -> Result<()> {
    let out = match role {
        Role::Close {
            addr,
            threads,
            duration_ms,
        } => close_loop(addr, threads, Duration::from_millis(duration_ms)),
        Role::Rate {
            addr,
            rate,
            conns,
            duration_ms,
        } => open_loop(addr, rate, conns, Duration::from_millis(duration_ms))?,
        Role::Spread {
            first,
            port,
            count,
            distinct,
            threads,
        } => spread(first, port, count, distinct, threads),
        Role::Stats(args) => return crate::stats::run(args),
        Role::Routing(args) => return crate::routing::run(args),
        Role::DetectIdle(args) => return crate::detect::run(args),
        Role::Upgrade(args) => return crate::upgrade::run(args),
        Role::Silent {
            addr,
            count,
            prefix,
            hold_s,
        } => return silent(addr, count, prefix.as_bytes(), Duration::from_secs(hold_s)),
        Role::Idle {
            addr,
            count,
            hold_s,
        } => return idle(addr, count, Duration::from_secs(hold_s)),
        Role::Hold { listen, lifetime_s } => return hold(listen, Duration::from_secs(lifetime_s)),
        Role::DubboServer { listen, lifetime_s } => {
            return crate::dubbo::server(listen, Duration::from_secs(lifetime_s))
        }
        Role::DubboLoad {
            addr,
            conns,
            depth,
            duration_ms,
        } => return crate::dubbo::load(addr, conns, depth, Duration::from_millis(duration_ms)),
    };
    println!("{out}");
    Ok(())
}

/// Percentile (0..=100) of sorted nanosecond samples, in microseconds.
pub fn percentile_us(sorted_ns: &[u64], p: f64) -> Option<f64> {
    if sorted_ns.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted_ns.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted_ns.len()) - 1;
    Some(sorted_ns[i] as f64 / 1000.0)
}

fn latency_json(mut ns: Vec<u64>) -> serde_json::Value {
    ns.sort_unstable();
    json!({
        "p50_us": percentile_us(&ns, 50.0),
        "p90_us": percentile_us(&ns, 90.0),
        "p99_us": percentile_us(&ns, 99.0),
        "p999_us": percentile_us(&ns, 99.9),
        "max_us": ns.last().map(|v| *v as f64 / 1000.0),
        "samples": ns.len(),
    })
}

/// Reads one HTTP/1.1 response framed by Content-Length; returns the status code.
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    let mut need: Option<usize> = None;
    loop {
        if let Some(n) = need {
            if buf.len() >= n {
                break;
            }
        }
        let r = s.read(&mut chunk)?;
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF in response",
            ));
        }
        buf.extend_from_slice(&chunk[..r]);
        if need.is_none() {
            if let Some(end) = find(buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]);
                let cl = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, "no Content-Length")
                    })?;
                need = Some(end + 4 + cl);
            }
        }
    }
    status_of(buf)
}

fn status_of(buf: &[u8]) -> io::Result<u16> {
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    std::str::from_utf8(line)
        .ok()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no status line"))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

#[derive(Default)]
struct CloseThread {
    lat_ns: Vec<u64>,
    errors_connect: u64,
    errors_io: u64,
    errors_status: u64,
}

fn close_loop(addr: SocketAddr, threads: u32, dur: Duration) -> serde_json::Value {
    let start = Instant::now();
    let deadline = start + dur;
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            std::thread::spawn(move || {
                let mut t = CloseThread::default();
                let mut buf = Vec::with_capacity(1024);
                let mut n = 0u64;
                while Instant::now() < deadline && n < MAX_REQUESTS_PER_THREAD {
                    n += 1;
                    let t0 = Instant::now();
                    let mut s = match connect(addr) {
                        Ok(s) => s,
                        Err(_) => {
                            t.errors_connect += 1;
                            std::thread::sleep(Duration::from_millis(1));
                            continue;
                        }
                    };
                    buf.clear();
                    let res = s.write_all(REQ_CLOSE).and_then(|_| s.read_to_end(&mut buf));
                    let dt = t0.elapsed();
                    match res {
                        Err(_) => {
                            t.errors_io += 1;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Ok(_) if status_of(&buf).ok() != Some(200) => t.errors_status += 1,
                        Ok(_) => t.lat_ns.push(dt.as_nanos() as u64),
                    }
                }
                t
            })
        })
        .collect();
    let mut all = CloseThread::default();
    for h in handles {
        let t = h.join().unwrap_or_default();
        all.lat_ns.extend(t.lat_ns);
        all.errors_connect += t.errors_connect;
        all.errors_io += t.errors_io;
        all.errors_status += t.errors_status;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ok = all.lat_ns.len() as u64;
    json!({
        "ok": ok,
        "errors": all.errors_connect + all.errors_io + all.errors_status,
        "errors_connect": all.errors_connect,
        "errors_io": all.errors_io,
        "errors_status": all.errors_status,
        "elapsed_s": elapsed,
        "conns_per_s": ok as f64 / elapsed,
        "latency": latency_json(all.lat_ns),
    })
}

fn spread(
    first: std::net::Ipv4Addr,
    port: u16,
    count: u64,
    distinct: u64,
    threads: u32,
) -> serde_json::Value {
    let distinct = if distinct == 0 {
        count.max(1)
    } else {
        distinct
    };
    use std::sync::atomic::{AtomicU64, Ordering};
    let start = Instant::now();
    let next = AtomicU64::new(0);
    let (ok, errors) = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    let (mut ok, mut errors) = (0u64, 0u64);
                    let mut buf = Vec::with_capacity(1024);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        let ip = std::net::Ipv4Addr::from(
                            u32::from(first).wrapping_add((i % distinct) as u32),
                        );
                        let addr = SocketAddr::new(ip.into(), port);
                        buf.clear();
                        let r = connect(addr).and_then(|mut s| {
                            s.write_all(REQ_CLOSE)?;
                            s.read_to_end(&mut buf)
                        });
                        match r {
                            Ok(_) if status_of(&buf).ok() == Some(200) => ok += 1,
                            _ => errors += 1,
                        }
                    }
                    (ok, errors)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or((0, 0)))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    let elapsed = start.elapsed().as_secs_f64();
    json!({"ok": ok, "errors": errors, "elapsed_s": elapsed, "conns_per_s": ok as f64 / elapsed})
}

/// Per-thread timer slack of 1 µs, so sleeping to an intended send time wakes on time.
fn tight_timer_slack() {
    // Best effort: without it the rate loop only wakes later.
    let _ = nix::sys::prctl::set_timerslack(1000);
}

#[derive(Default)]
struct RateThread {
    lat_ns: Vec<u64>,
    sent: u64,
    errors: u64,
    /// Requests whose connection was still busy at their intended send time.
    late: u64,
}

/// Open loop: request i is due at `start + i/rate`, spread round-robin over `conns`
/// keep-alive connections (one thread each). Latency runs from the actual send when the
/// connection was free at the due time (the client's own timer overshoot is not counted),
/// and from the due time when the previous response on that connection was late (the
/// queueing delay the system caused is counted: no coordinated omission).
fn open_loop(addr: SocketAddr, rate: u32, conns: u32, dur: Duration) -> Result<serde_json::Value> {
    if rate == 0 {
        bail!("rate must be > 0");
    }
    let conns = conns.clamp(1, rate);
    let total = (dur.as_secs_f64() * f64::from(rate)).round() as u64;
    let barrier = Arc::new(Barrier::new(conns as usize + 1));
    let start_at: Arc<std::sync::OnceLock<Instant>> = Arc::new(std::sync::OnceLock::new());
    let failed = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..conns)
        .map(|k| {
            let barrier = barrier.clone();
            let start_at = start_at.clone();
            let failed = failed.clone();
            std::thread::spawn(move || {
                tight_timer_slack();
                let mut t = RateThread::default();
                let conn = connect(addr);
                if conn.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                barrier.wait();
                let Ok(mut s) = conn else { return t };
                let start = *start_at.get().expect("start time set");
                let mut buf = Vec::with_capacity(1024);
                let mut free_at = start;
                let mut i = u64::from(k);
                while i < total {
                    let due = start + Duration::from_nanos(i * 1_000_000_000 / u64::from(rate));
                    i += u64::from(conns);
                    let from = if free_at <= due {
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        Instant::now()
                    } else {
                        t.late += 1;
                        due
                    };
                    t.sent += 1;
                    let res = s
                        .write_all(REQ_KEEPALIVE)
                        .and_then(|_| read_response(&mut s, &mut buf));
                    let done = Instant::now();
                    free_at = done;
                    match res {
                        Ok(200) => t.lat_ns.push((done - from).as_nanos() as u64),
                        Ok(_) => t.errors += 1,
                        Err(_) => {
                            t.errors += 1;
                            match connect(addr) {
                                Ok(n) => s = n,
                                Err(_) => break,
                            }
                        }
                    }
                    if done > start + dur + Duration::from_secs(30) {
                        break; // hard bound, whatever happens
                    }
                }
                t
            })
        })
        .collect();
    start_at
        .set(Instant::now() + Duration::from_millis(50))
        .expect("set once");
    barrier.wait();
    let mut all = RateThread::default();
    for h in handles {
        let t = h.join().unwrap_or_default();
        all.lat_ns.extend(t.lat_ns);
        all.sent += t.sent;
        all.errors += t.errors;
        all.late += t.late;
    }
    if failed.load(Ordering::Relaxed) {
        all.errors += 1;
    }
    Ok(json!({
        "rate": rate,
        "conns": conns,
        "planned": total,
        "sent": all.sent,
        "ok": all.lat_ns.len(),
        "errors": all.errors,
        "late": all.late,
        "latency": latency_json(all.lat_ns),
    }))
}

/// Opens `count` connections from 16 threads (a SYN that conntrack drops under NAT costs
/// a 1 s retransmission; in parallel those overlap), one byte each way on each, then holds.
fn idle(addr: SocketAddr, count: u32, hold: Duration) -> Result<()> {
    const THREADS: u32 = 16;
    let deadline = Instant::now() + Duration::from_secs(120);
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let n = count / THREADS + u32::from(t < count % THREADS);
            std::thread::spawn(move || {
                let mut socks = Vec::with_capacity(n as usize);
                let mut failed = 0u64;
                for _ in 0..n {
                    if Instant::now() > deadline {
                        failed += 1;
                        continue;
                    }
                    match connect(addr).and_then(|mut s| s.write_all(b"i").map(|_| s)) {
                        Ok(s) => socks.push(s),
                        Err(_) => failed += 1,
                    }
                }
                let mut ready = Vec::with_capacity(socks.len());
                for mut s in socks {
                    let mut b = [0u8; 1];
                    if Instant::now() < deadline && s.read_exact(&mut b).is_ok() {
                        ready.push(s);
                    } else {
                        failed += 1;
                    }
                }
                (ready, failed)
            })
        })
        .collect();
    let mut ready = Vec::with_capacity(count as usize);
    let mut failed = 0u64;
    for h in handles {
        let (r, f) = h.join().unwrap_or_default();
        ready.extend(r);
        failed += f;
    }
    println!("{}", json!({"ready": ready.len(), "failed": failed}));
    io::stdout().flush().context("flush stdout")?;
    std::thread::sleep(hold);
    drop(ready);
    Ok(())
}

/// Opens `count` connections, writes `prefix` on each, then holds them silent.
fn silent(addr: SocketAddr, count: u32, prefix: &[u8], hold: Duration) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut socks = Vec::with_capacity(count as usize);
    let mut failed = 0u64;
    for _ in 0..count {
        if Instant::now() > deadline {
            failed += 1;
            continue;
        }
        match connect(addr).and_then(|mut s| s.write_all(prefix).map(|_| s)) {
            Ok(s) => socks.push(s),
            Err(_) => failed += 1,
        }
    }
    println!("{}", json!({"ready": socks.len(), "failed": failed}));
    io::stdout().flush().context("flush stdout")?;
    std::thread::sleep(hold);
    drop(socks);
    Ok(())
}

fn hold(listen: SocketAddr, lifetime: Duration) -> Result<()> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(listen), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.bind(&listen.into())
        .with_context(|| format!("bind {listen}"))?;
    sock.listen(4096)?;
    let listener: std::net::TcpListener = sock.into();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut s in listener.incoming().take(1_000_000).flatten() {
            if s.write_all(b"h").is_ok() {
                held.push(s);
            }
        }
    });
    std::thread::sleep(lifetime);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_sorted_samples() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_us(&v, 50.0), Some(50.0));
        assert_eq!(percentile_us(&v, 99.0), Some(99.0));
        assert_eq!(percentile_us(&v, 100.0), Some(100.0));
        assert_eq!(percentile_us(&[], 50.0), None);
    }

    #[test]
    fn status_line() {
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\n").unwrap(), 200);
        assert!(status_of(b"garbage").is_err());
    }
}
