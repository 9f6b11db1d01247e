//! The daemon's HTTP endpoints (plain HTTP/1.1, one request per connection, GET only), on two
//! addresses, so that what lists other workloads is never served to them:
//!
//! | path | `listen` (public: the pods' gate, probes) | `admin_listen` (loopback) |
//! |---|---|---|
//! | `/healthz` | 200 while the reconcile loop runs (a pass within the last 10 s), else 503 | same |
//! | `/ready` | 200 once the first pass is done (and, as node agent, the pod list read), else 503 | same |
//! | `/pods/<namespace>/<name>/ready` | 200 once the pod's interception is in place; 503 (waiting, why); 404 (unknown pod) | same, with the last error |
//! | `/metrics` | 404 | OpenMetrics: the kernel counters (read without the pin dir's lock, at most once a second) and the daemon's scopes |
//! | `/scopes` | 404 | JSON: every scope the daemon keeps, its cgroup, ids, readiness and last error |
//!
//! On the public address one peer address (a pod) holds at most [`MAX_PER_PEER`] requests at
//! once, so no pod can take the slots the other pods' gates need; loopback peers (the node's
//! own probes) are not limited per peer.
use std::{
    collections::HashMap,
    fmt::Write as _,
    net::IpAddr,
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::engine::Shared;
use interceptor::paths::PinLayout;

const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests served at once per address; one more is answered 503 at once and closed.
pub const MAX_CONCURRENT: usize = 64;
/// Requests one non-loopback peer address may have open at once on the public address.
pub const MAX_PER_PEER: usize = 8;
/// The kernel counters served at `/metrics` are at most this old: scrapers share one read.
pub const METRICS_MAX_AGE: Duration = Duration::from_secs(1);
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n";

/// Which endpoints an address serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `listen`: health, readiness and the per-pod gate only (reachable by pods as node agent).
    Public,
    /// `admin_listen`: everything, including what lists other workloads (`/scopes`, `/metrics`).
    Admin,
}

/// The kernel counters' text as last read, and when.
type MetricsCache = tokio::sync::Mutex<Option<(Instant, Arc<String>)>>;

/// Open requests per peer address (public address only).
#[derive(Default)]
struct PeerCounts(Mutex<HashMap<IpAddr, usize>>);

struct PeerSlot(Arc<PeerCounts>, IpAddr);

impl PeerCounts {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        let mut m = self.0.lock().unwrap();
        let n = m.entry(ip).or_default();
        if *n >= MAX_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerSlot(self.clone(), ip))
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut m = (self.0).0.lock().unwrap();
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

struct Ctx {
    shared: Arc<Shared>,
    layout: PinLayout,
    agent: bool,
    role: Role,
    metrics: MetricsCache,
}

/// Answers 503 busy, then drains the request until the client closes (closing with it unread
/// would reset the connection and lose the answer); 1 s at most.
fn busy(mut sock: TcpStream) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            sock.write_all(BUSY).await?;
            sock.shutdown().await?;
            let mut b = [0u8; 512];
            while sock.read(&mut b).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
    });
}

/// Serves forever: at most [`MAX_CONCURRENT`] requests at once (each bounded by a 5 s
/// deadline; on the public address at most [`MAX_PER_PEER`] per non-loopback peer), and an
/// accept error (out of file descriptors) backs off, 5 ms doubling to 1 s, instead of spinning.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    layout: PinLayout,
    agent: bool,
    role: Role,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    let peers = Arc::new(PeerCounts::default());
    let ctx = Arc::new(Ctx {
        shared,
        layout,
        agent,
        role,
        metrics: MetricsCache::default(),
    });
    let mut backoff = Duration::from_millis(5);
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accepting an HTTP connection failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let ip = peer.ip().to_canonical();
        let slot = if role == Role::Public && !ip.is_loopback() {
            match peers.take(ip) {
                Some(s) => Some(s),
                None => {
                    busy(sock);
                    continue;
                }
            }
        } else {
            None
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            busy(sock);
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(READ_TIMEOUT, handle(sock, &ctx)).await;
            drop(permit);
            drop(slot);
        });
    }
}

struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
}

fn text(status: u16, body: impl Into<String>) -> Reply {
    Reply {
        status,
        content_type: "text/plain; charset=utf-8",
        body: body.into(),
    }
}

async fn handle(mut sock: TcpStream, ctx: &Ctx) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let reply = if method != "GET" {
        text(405, "only GET\n")
    } else {
        route(path, ctx).await
    };
    let reason = match reply.status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    };
    let msg = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        reply.status,
        reply.content_type,
        reply.body.len(),
        reply.body
    );
    let _ = sock.write_all(msg.as_bytes()).await;
    let _ = sock.shutdown().await;
}

async fn route(path: &str, ctx: &Ctx) -> Reply {
    let shared = &ctx.shared;
    match path {
        "/healthz" => match shared.since_last_tick() {
            Some(t) if t < Duration::from_secs(10) => text(200, "ok\n"),
            Some(t) => text(
                503,
                format!("reconcile loop stalled for {:.1} s\n", t.as_secs_f64()),
            ),
            None => text(503, "starting\n"),
        },
        "/ready" => {
            if !shared.first_pass_done() {
                text(503, "starting\n")
            } else if ctx.agent && !shared.pods_synced.load(Ordering::SeqCst) {
                text(503, "waiting for the pod list\n")
            } else {
                text(200, "ready\n")
            }
        }
        "/scopes" | "/metrics" if ctx.role == Role::Public => text(
            404,
            "not served on this address (it lists every workload): see admin_listen\n",
        ),
        "/scopes" => Reply {
            status: 200,
            content_type: "application/json",
            body: serde_json::to_string_pretty(&shared.states()).unwrap_or_default() + "\n",
        },
        "/metrics" => match kernel_metrics(ctx).await {
            Ok(kernel) => Reply {
                status: 200,
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body: metrics(&kernel, shared),
            },
            Err(e) => text(500, format!("reading the counters: {e}\n")),
        },
        _ => pod_ready(path, shared, ctx.role),
    }
}

/// The kernel counters' OpenMetrics text, read without the pin dir's lock (attach and detach
/// take it exclusively and never wait for a scraper), at most once per [`METRICS_MAX_AGE`]:
/// concurrent scrapers wait for the one read in flight and share it. A failed read (the last
/// scope's maps removed meanwhile) serves the previous text when there is one.
async fn kernel_metrics(ctx: &Ctx) -> Result<Arc<String>, String> {
    let mut cache = ctx.metrics.lock().await;
    if let Some((at, text)) = cache.as_ref() {
        if at.elapsed() < METRICS_MAX_AGE {
            return Ok(text.clone());
        }
    }
    let layout = ctx.layout.clone();
    let read = tokio::task::spawn_blocking(move || interceptor::stats_unlocked(&layout))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    match read {
        Ok(s) => {
            let text = Arc::new(s.to_openmetrics());
            *cache = Some((Instant::now(), text.clone()));
            Ok(text)
        }
        Err(e) => match cache.as_ref() {
            Some((_, text)) => {
                tracing::debug!(error = %e, "reading the counters failed; serving the last read");
                Ok(text.clone())
            }
            None => Err(e),
        },
    }
}

fn pod_ready(path: &str, shared: &Shared, role: Role) -> Reply {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ["pods", ns, name, "ready"] = parts.as_slice() else {
        return text(
            404,
            match role {
                Role::Public => "unknown path; see /healthz /ready /pods/NS/NAME/ready\n",
                Role::Admin => {
                    "unknown path; see /healthz /ready /metrics /scopes /pods/NS/NAME/ready\n"
                }
            },
        );
    };
    let key = super::pods::key(ns, name);
    match shared.state(&key) {
        Some(s) if s.ready => text(200, "ready\n"),
        // The public answer says what the pod waits for, not the last error (it may name
        // paths and processes of the node).
        Some(s) => text(
            503,
            format!(
                "waiting: {}{}\n",
                s.waiting.as_deref().unwrap_or("not attached yet"),
                s.last_error
                    .filter(|_| role == Role::Admin)
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default()
            ),
        ),
        None => text(
            404,
            format!("pod {ns}/{name} is not known to this agent (not on this node, not opted in, or not seen yet)\n"),
        ),
    }
}

/// The kernel counters plus the daemon's own families, one `# EOF` at the end.
fn metrics(kernel: &str, shared: &Shared) -> String {
    let mut out = kernel.trim_end().trim_end_matches("# EOF").to_string();
    let states = shared.states();
    let ready = states.values().filter(|s| s.ready).count();
    let reattached: u64 = states.values().map(|s| s.reattached).sum();
    let _ = writeln!(
        out,
        "# HELP interceptor_daemon_scopes Scopes the daemon keeps attached, by readiness."
    );
    let _ = writeln!(out, "# TYPE interceptor_daemon_scopes gauge");
    let _ = writeln!(out, "interceptor_daemon_scopes{{state=\"ready\"}} {ready}");
    let _ = writeln!(
        out,
        "interceptor_daemon_scopes{{state=\"waiting\"}} {}",
        states.len() - ready
    );
    let _ = writeln!(out, "# HELP interceptor_daemon_reattached Scopes attached again after their cgroup was recreated.");
    let _ = writeln!(out, "# TYPE interceptor_daemon_reattached counter");
    let _ = writeln!(out, "interceptor_daemon_reattached_total {reattached}");
    let _ = writeln!(out, "# HELP interceptor_daemon_annotation_errors Invalid annotation values refused (once per pod and value); a running pod keeps its last good settings.");
    let _ = writeln!(out, "# TYPE interceptor_daemon_annotation_errors counter");
    let _ = writeln!(
        out,
        "interceptor_daemon_annotation_errors_total {}",
        shared.annotation_errors.load(Ordering::SeqCst)
    );
    let _ = writeln!(out, "# HELP interceptor_daemon_scope_table Entries of the kernel's scope table (outbound and inbound scopes share it): in use at the last pass, and its limit.");
    let _ = writeln!(out, "# TYPE interceptor_daemon_scope_table gauge");
    let _ = writeln!(
        out,
        "interceptor_daemon_scope_table{{state=\"used\"}} {}",
        shared.scope_table_used.load(Ordering::SeqCst)
    );
    let _ = writeln!(
        out,
        "interceptor_daemon_scope_table{{state=\"limit\"}} {}",
        interceptor::SCOPE_TABLE_LIMIT
    );
    let _ = writeln!(out, "# HELP interceptor_daemon_orphans_detached Scopes detached by the start reconciliation (their pod or unit went away while the daemon was stopped).");
    let _ = writeln!(out, "# TYPE interceptor_daemon_orphans_detached counter");
    let _ = writeln!(
        out,
        "interceptor_daemon_orphans_detached_total {}",
        shared.orphans_detached.load(Ordering::SeqCst)
    );
    let _ = writeln!(
        out,
        "# HELP interceptor_daemon_passes Passes of the reconcile loop."
    );
    let _ = writeln!(out, "# TYPE interceptor_daemon_passes counter");
    let _ = writeln!(
        out,
        "interceptor_daemon_passes_total {}",
        shared.passes.load(Ordering::SeqCst)
    );
    out.push_str("# EOF\n");
    out
}

/// `interceptor wait-ready URL`: GETs `http://HOST:PORT/PATH` until it answers 200 or
/// `timeout` passes (the readiness gate's client; no TLS, no proxy). Returns the last answer.
pub fn wait_ready(
    url: &str,
    timeout: Duration,
    interval: Duration,
) -> std::result::Result<String, String> {
    use std::io::{Read as _, Write as _};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let attempt = || -> std::io::Result<(u16, String)> {
            use std::net::ToSocketAddrs as _;
            let addr = hostport
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| std::io::Error::other("no address"))?;
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
            )?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            let status = resp
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body = resp
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.trim().to_string());
            Ok((status, body.unwrap_or_default()))
        };
        let last = match attempt() {
            Ok((200, body)) => return Ok(body),
            Ok((code, body)) => format!("{code} {body}"),
            Err(e) => e.to_string(),
        };
        if std::time::Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(interval);
    }
}
