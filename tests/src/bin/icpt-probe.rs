//! `icpt-probe`: TCP test server and clients (see `interceptor_tests::probe`).
//!
//! Every subcommand prints one JSON line on stdout (`http-get` prints the body);
//! on failure it prints `{"error": "...", "kind": "refused|timeout|reset|other"}`
//! on stdout and exits 1.

use std::net::SocketAddr;
use std::process::exit;
use std::time::Duration;

use clap::{Parser, Subcommand};
use interceptor_tests::escape::{self, EscapeKind};
use interceptor_tests::probe::{self, ClientOpts, ErrorKind, ProbeError, ProbeServer};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "TCP probe server and clients for the interceptor tests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct Conn {
    /// SO_MARK to set on the client socket (decimal or 0x hex).
    #[arg(long, value_parser = parse_u32)]
    mark: Option<u32>,
    /// Local address to bind the client socket to.
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Connect timeout and per-read/write idle timeout, in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// `bulk`: milliseconds to wait after the request before reading anything.
    #[arg(long, default_value_t = 0)]
    read_after_ms: u64,
    /// `bulk`: count the payload received without checking it (a reader that keeps up).
    #[arg(long)]
    unchecked: bool,
}

impl Conn {
    fn opts(&self, default_ms: u64) -> ClientOpts {
        ClientOpts {
            mark: self.mark,
            bind: self.bind,
            timeout: Duration::from_millis(self.timeout_ms.unwrap_or(default_ms)),
            read_after: Duration::from_millis(self.read_after_ms),
            unchecked: self.unchecked,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Threaded server: HELLO and BULK; prints {"listening": [...]} once bound, runs until killed.
    Serve {
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
    },
    /// One HELLO exchange.
    Hello {
        addr: SocketAddr,
        #[command(flatten)]
        conn: Conn,
    },
    /// Send and receive pseudo-random bytes over one connection and check both directions.
    Bulk {
        addr: SocketAddr,
        #[arg(long, default_value_t = 0)]
        send: u64,
        #[arg(long, default_value_t = 0)]
        recv: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Short HELLO connections over PARALLEL threads: COUNT of them, or for FOR_MS
    /// milliseconds, whichever ends first (at least one of the two is required).
    #[command(group(clap::ArgGroup::new("bound").required(true).multiple(true).args(["count", "for_ms"])))]
    Churn {
        addr: SocketAddr,
        #[arg(long)]
        count: Option<u64>,
        /// Run for this many milliseconds (each thread finishes the attempt it started).
        #[arg(long)]
        for_ms: Option<u64>,
        #[arg(long, default_value_t = 1)]
        parallel: u64,
        /// Spread the connections over this many consecutive IPv4 addresses from ADDR's.
        #[arg(long, default_value_t = 1)]
        spread: u32,
        #[command(flatten)]
        conn: Conn,
    },
    /// COUNT connections, each sending HELLO, all opened before any reply is read; prints
    /// {"queued": N} once they are, then the report of the replies (as churn's).
    Burst {
        addr: SocketAddr,
        #[arg(long)]
        count: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// COUNT connects toward ADDR (IPv4) that fail after the outbound program saw them, by
    /// KIND (see `interceptor_tests::escape`); prints the outcomes by errno.
    Escape {
        #[arg(value_enum)]
        kind: EscapeKind,
        addr: SocketAddr,
        #[arg(long)]
        count: u64,
    },
    /// COUNT idle connections to a line echo server at ADDR, each sending a ping line every
    /// EVERY_MS and checking the echo, round after round, until the file STOP exists.
    /// Prints {"connected": N} once all are open, {"round": R} after each full round in
    /// which every connection answered, and at the end {"rounds": R, "bytes": B (each way),
    /// "errors": [...]}; exits 1 if any error. A connection that failed is not used again.
    Ping {
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 500)]
        every_ms: u64,
        #[arg(long)]
        stop: std::path::PathBuf,
    },
    /// COUNT connections to a chaos server (`interceptor_tests::chaos`), seeds SEED.., PARALLEL
    /// at a time: random sizes, random write chunks (1 B to 1 MiB), random shutdown order,
    /// both directions checked byte for byte; prints the report, exits 2 on any failure.
    Chaos {
        addr: SocketAddr,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 1)]
        parallel: u64,
    },
    /// HTTP/1.0 GET ADDR/PATH (e.g. 127.0.0.1:15000/stats); prints the body; exits 1 unless 2xx.
    HttpGet {
        target: String,
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?}: {e}"))
}

fn fail(e: ProbeError) -> ! {
    println!("{}", e.to_json());
    exit(1)
}

fn print<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string(v).expect("serialize"));
}

/// `icpt-probe ping`: see [`Cmd::Ping`].
fn ping(addr: SocketAddr, count: usize, every: Duration, stop: &std::path::Path) {
    let flush = || {
        let _ = std::io::Write::flush(&mut std::io::stdout());
    };
    let mut conns: Vec<Option<std::net::TcpStream>> = Vec::with_capacity(count);
    for i in 0..count {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(c) => {
                let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                conns.push(Some(c));
            }
            Err(e) => fail(ProbeError::new(
                ErrorKind::Other,
                format!("connection {i} to {addr}: {e}"),
            )),
        }
    }
    println!("{}", json!({ "connected": count }));
    flush();
    let (mut rounds, mut bytes, mut errors) = (0u64, 0u64, Vec::new());
    let mut round = 0u64;
    while !stop.exists() {
        let started = std::time::Instant::now();
        let mut clean = true;
        for (i, slot) in conns.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            let line = format!("ping {i} {round}\n");
            match probe::echo_round(c, line.as_bytes()) {
                Ok(()) => bytes += line.len() as u64,
                Err(e) => {
                    clean = false;
                    *slot = None;
                    errors.push(format!("connection {i}, round {round}: {e}"));
                }
            }
        }
        if clean {
            rounds += 1;
            println!("{}", json!({ "round": rounds }));
            flush();
        }
        round += 1;
        if let Some(rest) = every.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    println!(
        "{}",
        json!({ "rounds": rounds, "bytes": bytes, "errors": errors })
    );
    if !errors.is_empty() {
        exit(1);
    }
}

fn main() {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { listen } => {
            let srv = ProbeServer::start(&listen).unwrap_or_else(|e| {
                fail(ProbeError::new(ErrorKind::Other, format!("listen: {e}")))
            });
            println!("{}", json!({ "listening": srv.addrs() }));
            srv.wait();
        }
        Cmd::Hello { addr, conn } => match probe::hello(addr, &conn.opts(5000)) {
            Ok(r) => print(&r),
            Err(e) => fail(e),
        },
        Cmd::Bulk {
            addr,
            send,
            recv,
            seed,
            conn,
        } => match probe::bulk(addr, send, recv, seed, &conn.opts(30_000)) {
            Ok(r) => {
                print(&r);
                if !r.ok {
                    exit(2);
                }
            }
            Err(e) => fail(e),
        },
        Cmd::Churn {
            addr,
            count,
            for_ms,
            parallel,
            spread,
            conn,
        } => {
            let r = probe::churn_spread(
                addr,
                spread,
                count,
                for_ms.map(Duration::from_millis),
                parallel,
                &conn.opts(5000),
            );
            print(&r);
        }
        Cmd::Burst { addr, count, conn } => {
            let r = probe::burst(addr, count, &conn.opts(60_000), |queued| {
                println!("{}", json!({ "queued": queued }));
                let _ = std::io::Write::flush(&mut std::io::stdout());
            });
            print(&r);
        }
        Cmd::Ping {
            addr,
            count,
            every_ms,
            stop,
        } => ping(addr, count, Duration::from_millis(every_ms), &stop),
        Cmd::Chaos {
            addr,
            count,
            seed,
            parallel,
        } => {
            let r = interceptor_tests::chaos::run(addr, seed, count, parallel);
            print(&r);
            if r.failed > 0 {
                exit(2);
            }
        }
        Cmd::Escape { kind, addr, count } => match escape::escape(kind, addr, count) {
            Ok(r) => print(&r),
            Err(e) => fail(ProbeError::new(ErrorKind::Other, format!("escape: {e}"))),
        },
        Cmd::HttpGet { target, timeout_ms } => {
            let (addr, path) = probe::parse_http_target(&target).unwrap_or_else(|e| fail(e));
            match probe::http_get(addr, &path, Duration::from_millis(timeout_ms)) {
                Ok((code, body)) if (200..300).contains(&code) => {
                    print!("{body}");
                    if !body.ends_with('\n') {
                        println!();
                    }
                }
                Ok((code, body)) => {
                    println!(
                        "{}",
                        json!({ "error": format!("HTTP {code}: {}", body.trim()), "kind": "other", "status": code })
                    );
                    exit(1);
                }
                Err(e) => fail(e),
            }
        }
    }
}
