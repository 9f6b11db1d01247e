//! The daemon's HTTP endpoints (plain HTTP/1.1, one request per connection, GET only):
//!
//! | path | answer |
//! |---|---|
//! | `/healthz` | 200 while the reconcile loop runs (a pass within the last 10 s), else 503 |
//! | `/ready` | 200 once the first pass is done (and, as node agent, the pod list read), else 503 |
//! | `/metrics` | OpenMetrics: the kernel counters (`Stats::to_openmetrics`) and the daemon's scopes |
//! | `/scopes` | JSON: every scope the daemon keeps, its cgroup, ids, readiness and last error |
//! | `/pods/<namespace>/<name>/ready` | 200 once the pod's interception is in place; 503 (waiting, with why); 404 (unknown pod) |
use std::{
    fmt::Write as _,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::engine::Shared;
use interceptor::paths::PinLayout;

const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests served at once; one more is answered 503 at once and closed.
pub const MAX_CONCURRENT: usize = 64;
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n";

/// Serves forever: at most [`MAX_CONCURRENT`] requests at once (each bounded by a 5 s
/// deadline), and an accept error (out of file descriptors) backs off, 5 ms doubling to 1 s,
/// instead of spinning.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, layout: PinLayout, agent: bool) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    let mut backoff = Duration::from_millis(5);
    loop {
        let mut sock = match listener.accept().await {
            Ok((s, _)) => {
                backoff = Duration::from_millis(5);
                s
            }
            Err(e) => {
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accepting an HTTP connection failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Answered, then the request drained until the client closes (closing with it
            // unread would reset the connection and lose the answer); 1 s at most.
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
            continue;
        };
        let shared = shared.clone();
        let layout = layout.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(READ_TIMEOUT, handle(sock, shared, layout, agent)).await;
            drop(permit);
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

async fn handle(mut sock: TcpStream, shared: Arc<Shared>, layout: PinLayout, agent: bool) {
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
        route(path, &shared, &layout, agent).await
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

async fn route(path: &str, shared: &Shared, layout: &PinLayout, agent: bool) -> Reply {
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
            } else if agent && !shared.pods_synced.load(Ordering::SeqCst) {
                text(503, "waiting for the pod list\n")
            } else {
                text(200, "ready\n")
            }
        }
        "/scopes" => Reply {
            status: 200,
            content_type: "application/json",
            body: serde_json::to_string_pretty(&shared.states()).unwrap_or_default() + "\n",
        },
        "/metrics" => {
            let layout = layout.clone();
            let stats = tokio::task::spawn_blocking(move || interceptor::stats(&layout)).await;
            match stats {
                Ok(Ok(s)) => Reply {
                    status: 200,
                    content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body: metrics(&s.to_openmetrics(), shared),
                },
                Ok(Err(e)) => text(500, format!("reading the counters: {e}\n")),
                Err(e) => text(500, format!("reading the counters: {e}\n")),
            }
        }
        _ => pod_ready(path, shared),
    }
}

fn pod_ready(path: &str, shared: &Shared) -> Reply {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ["pods", ns, name, "ready"] = parts.as_slice() else {
        return text(
            404,
            "unknown path; see /healthz /ready /metrics /scopes /pods/NS/NAME/ready\n",
        );
    };
    let key = super::pods::key(ns, name);
    match shared.state(&key) {
        Some(s) if s.ready => text(200, "ready\n"),
        Some(s) => text(
            503,
            format!(
                "waiting: {}{}\n",
                s.waiting.as_deref().unwrap_or("not attached yet"),
                s.last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default()
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
