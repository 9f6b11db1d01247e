//! Admin HTTP/1.1 server:
//!
//! | request | answer |
//! |---|---|
//! | `GET /ready` | 200 `ready`, or 503 `starting` / `draining` |
//! | `GET /stats` | the counters, one flat JSON object ([`crate::stats::StatsSnapshot`]) |
//! | `GET /metrics` | OpenMetrics text ([`crate::metrics`]) |
//! | `GET /listeners` | JSON: the bound outbound and inbound addresses |
//! | `GET /config` | JSON: the running configuration |
//! | `GET /runtime`, `POST /runtime?destination_stats=on\|off` | JSON: the run-time switches |
//! | `GET /routes`, `POST /routes/reload` | JSON: the routing file in force, its version and reloads |
//! | `POST /upgrade` | 202 `{"started_pid": N}`: the successor started as on SIGUSR2 ([`crate::restart`]); 503 when it cannot be |
//!
//! The POST endpoints change the proxy, so they answer only a client on a loopback address
//! that names a loopback host (`127.0.0.1`, `[::1]`, `localhost`, with or without a port)
//! in `Host` and, when it sends one, in `Origin`; anything else gets 403. A web page in a
//! browser on the node can then neither post to them across sites nor through a DNS name
//! rebound to 127.0.0.1 (both carry a foreign `Host` or `Origin`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::stats::Stats;

/// Readiness as reported by `GET /ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Readiness {
    /// Listeners not yet serving: 503 "starting".
    Starting = 0,
    /// Serving: 200 "ready".
    Ready = 1,
    /// Shutdown requested, no longer accepting: 503 "draining".
    Draining = 2,
}

/// Shared readiness flag.
#[derive(Debug, Default)]
pub struct ReadyState(AtomicU8);

impl ReadyState {
    pub fn set(&self, r: Readiness) {
        self.0.store(r as u8, Ordering::Release);
    }

    pub fn get(&self) -> Readiness {
        match self.0.load(Ordering::Acquire) {
            0 => Readiness::Starting,
            1 => Readiness::Ready,
            _ => Readiness::Draining,
        }
    }
}

/// The proxy's bound listener addresses; this is the `/listeners` JSON object, e.g.
/// `{"outbound": ["127.0.0.1:15001"], "inbound": ["0.0.0.0:15006"]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ListenerAddrs {
    pub outbound: Vec<SocketAddr>,
    pub inbound: Vec<SocketAddr>,
}

/// What the admin handlers read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub stats: Arc<Stats>,
    pub ready: Arc<ReadyState>,
    pub listeners: Arc<ListenerAddrs>,
    pub metrics: Arc<Metrics>,
    /// `GET /config`.
    pub config: Arc<serde_json::Value>,
    /// `GET /routes`, `POST /routes/reload`.
    pub routing: Arc<crate::routing::Routing>,
}

impl AdminState {
    pub fn new(
        stats: Arc<Stats>,
        ready: Arc<ReadyState>,
        listeners: ListenerAddrs,
        config: serde_json::Value,
        routing: Arc<crate::routing::Routing>,
    ) -> Self {
        AdminState {
            metrics: Arc::new(Metrics::new(stats.clone(), routing.stats.clone())),
            routing,
            stats,
            ready,
            listeners: Arc::new(listeners),
            config: Arc::new(config),
        }
    }
}

/// Serves admin requests on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, state: AdminState, stop: CancellationToken) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "admin accept failed; retrying in 100ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let builder = builder.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&req, peer, &state)) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r { debug!(client = %peer, error = %e, "admin connection error") },
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// Routes one request from `peer`.
pub fn handle(
    req: &Request<Incoming>,
    peer: SocketAddr,
    state: &AdminState,
) -> Response<Full<Bytes>> {
    if req.method() == Method::POST {
        if let Err(why) = post_allowed(peer, req.headers()) {
            warn!(client = %peer, path = req.uri().path(), reason = why, "admin POST refused");
            return owned_text(
                StatusCode::FORBIDDEN,
                format!("{why}; POST to the admin endpoints only from the node itself, to http://127.0.0.1:<port>\n"),
            );
        }
    }
    route(req.method(), req.uri().path(), req.uri().query(), state)
}

/// Whether a POST may change the proxy: a loopback client, a loopback `Host`, and no
/// `Origin` other than a loopback one.
pub fn post_allowed(peer: SocketAddr, headers: &hyper::HeaderMap) -> Result<(), &'static str> {
    if !peer.ip().to_canonical().is_loopback() {
        return Err("client is not on a loopback address");
    }
    let host = headers
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .ok_or("no Host header")?;
    if !is_loopback_host(host) {
        return Err("Host is not a loopback name or address");
    }
    if let Some(origin) = headers.get(hyper::header::ORIGIN) {
        let origin = origin.to_str().map_err(|_| "Origin is not text")?;
        let host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .ok_or("Origin is not a loopback http origin")?;
        if !is_loopback_host(host) {
            return Err("Origin is not a loopback origin");
        }
    }
    Ok(())
}

/// `localhost`, `127.x.y.z`, `[::1]` (IPv4-mapped too), each with an optional port.
fn is_loopback_host(host: &str) -> bool {
    let Ok(authority) = host.trim().parse::<http::uri::Authority>() else {
        return false;
    };
    let name = authority.host();
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let ip = name.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<IpAddr>()
        .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec(value).expect("JSON serializes");
    body.push(b'\n');
    with_type(StatusCode::OK, body.into(), "application/json")
}

fn routes_json(state: &AdminState) -> serde_json::Value {
    let r = &state.routing;
    serde_json::json!({
        "file": r.path().map(|p| p.display().to_string()),
        "version": r.version.load(std::sync::atomic::Ordering::Relaxed),
        "reloads": r.stats.reloads.load(std::sync::atomic::Ordering::Relaxed),
        "reload_errors": r.stats.reload_errors.load(std::sync::atomic::Ordering::Relaxed),
    })
}

fn runtime_json(state: &AdminState) -> serde_json::Value {
    let d = &state.stats.destinations;
    let limits = d.limits();
    serde_json::json!({
        "destination_stats": d.enabled(),
        "destination_stats_cap": limits.cap,
        "destination_stats_idle_ms": limits.idle.as_millis() as u64,
        "destination_series": d.tracked() * 3,
        "kernel_forward": crate::kforward::enabled(),
        "kernel_forward_connections": crate::kforward::ARMED.load(std::sync::atomic::Ordering::Relaxed),
        "kernel_forward_fallbacks": crate::kforward::FALLBACKS.load(std::sync::atomic::Ordering::Relaxed),
        "kernel_forward_watched": crate::kforward::WATCHED.load(std::sync::atomic::Ordering::Relaxed),
        "kernel_forward_bytes": crate::kforward::BYTES.load(std::sync::atomic::Ordering::Relaxed),
        "kernel_forward_trimmed_bytes": crate::kforward::TRIMMED.load(std::sync::atomic::Ordering::Relaxed),
        "kernel_forward_uncut_bytes": crate::kforward::UNCUT.load(std::sync::atomic::Ordering::Relaxed),
        "kernel_forward_unchecked_segments": crate::kforward::UNCHECKED.load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// `POST /runtime?destination_stats=on|off`: applies every setting given, or none when one
/// is invalid.
fn set_runtime(query: Option<&str>, state: &AdminState) -> Response<Full<Bytes>> {
    let mut switch = None;
    for (k, v) in query
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
    {
        match k {
            "destination_stats" => match crate::config::parse_switch("destination_stats", v) {
                Ok(on) => switch = Some(on),
                Err(e) => return owned_text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            },
            _ => {
                return owned_text(
                    StatusCode::BAD_REQUEST,
                    format!(
                    "unknown runtime setting {k:?}; the settings are: destination_stats=on|off\n"
                ),
                )
            }
        }
    }
    let Some(on) = switch else {
        return owned_text(
            StatusCode::BAD_REQUEST,
            "nothing to change; e.g. POST /runtime?destination_stats=on\n".to_owned(),
        );
    };
    let was = state.stats.destinations.set_enabled(on);
    if was != on {
        tracing::info!(destination_stats = on, "runtime switch changed");
    }
    json(&runtime_json(state))
}

fn route(
    method: &Method,
    path: &str,
    query: Option<&str>,
    state: &AdminState,
) -> Response<Full<Bytes>> {
    if method == Method::POST && path == "/runtime" {
        return set_runtime(query, state);
    }
    if method == Method::POST && path == "/upgrade" {
        return match crate::restart::request_upgrade() {
            Ok(pid) => {
                let mut r = json(&serde_json::json!({ "started_pid": pid }));
                *r.status_mut() = StatusCode::ACCEPTED;
                r
            }
            Err(why) => owned_text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        };
    }
    if method == Method::POST && path == "/routes/reload" {
        return match state.routing.reload() {
            Ok(()) => json(&routes_json(state)),
            Err(e) => owned_text(
                StatusCode::BAD_REQUEST,
                format!("{e}\nthe routes in force stay\n"),
            ),
        };
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported here (and POST /runtime, POST /routes/reload)\n",
        );
        r.headers_mut()
            .insert("allow", HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/ready" => match state.ready.get() {
            Readiness::Ready => text(StatusCode::OK, "ready\n"),
            Readiness::Starting => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
            Readiness::Draining => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        },
        "/stats" => {
            let mut body = serde_json::to_vec(&state.stats.snapshot()).expect("counters serialize");
            body.push(b'\n');
            with_type(StatusCode::OK, body.into(), "application/json")
        }
        "/metrics" => with_type(
            StatusCode::OK,
            state.metrics.encode().into(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/config" => json(&*state.config),
        "/runtime" => json(&runtime_json(state)),
        "/routes" => json(&routes_json(state)),
        "/listeners" => {
            let mut body = serde_json::to_vec(&*state.listeners).expect("addresses serialize");
            body.push(b'\n');
            with_type(StatusCode::OK, body.into(), "application/json")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /ready, /stats, /metrics, /listeners, /config, /runtime or /routes\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    with_type(
        status,
        Bytes::from_static(body.as_bytes()),
        "text/plain; charset=utf-8",
    )
}

fn owned_text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_type(status, body.into(), "text/plain; charset=utf-8")
}

fn with_type(status: StatusCode, body: Bytes, ctype: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let state = AdminState::new(
            Arc::default(),
            Arc::default(),
            ListenerAddrs {
                outbound: vec!["127.0.0.1:15001".parse().unwrap()],
                inbound: vec![
                    "0.0.0.0:15006".parse().unwrap(),
                    "[::]:15006".parse().unwrap(),
                ],
            },
            crate::config::Config::default().to_json(),
            Arc::new(crate::routing::Routing::none()),
        );
        assert_eq!(route(&Method::GET, "/ready", None, &state).status(), 503);
        state.ready.set(Readiness::Ready);
        assert_eq!(route(&Method::GET, "/ready", None, &state).status(), 200);
        state.ready.set(Readiness::Draining);
        assert_eq!(route(&Method::GET, "/ready", None, &state).status(), 503);
        assert_eq!(route(&Method::GET, "/stats", None, &state).status(), 200);
        assert_eq!(route(&Method::GET, "/metrics", None, &state).status(), 200);
        assert_eq!(route(&Method::GET, "/nope", None, &state).status(), 404);
        let r = route(&Method::GET, "/listeners", None, &state);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(route(&Method::POST, "/stats", None, &state).status(), 405);
        assert_eq!(route(&Method::GET, "/config", None, &state).status(), 200);
        assert!(!state.stats.destinations.enabled());
        let on = Some("destination_stats=on");
        assert_eq!(route(&Method::POST, "/runtime", on, &state).status(), 200);
        assert!(state.stats.destinations.enabled());
        for bad in [None, Some("destination_stats=maybe"), Some("x=1")] {
            assert_eq!(
                route(&Method::POST, "/runtime", bad, &state).status(),
                400,
                "{bad:?}"
            );
        }
        assert!(
            state.stats.destinations.enabled(),
            "a bad request changes nothing"
        );
    }

    #[test]
    fn post_only_from_loopback_with_a_loopback_host() {
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = hyper::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        for host in [
            "127.0.0.1:15000",
            "127.0.0.1",
            "localhost:15000",
            "LOCALHOST",
            "[::1]:15000",
            "127.1.2.3",
        ] {
            let h = headers(&[("host", host)]);
            assert_eq!(post_allowed(local, &h), Ok(()), "{host}");
        }
        assert_eq!(
            post_allowed(
                "[::1]:4000".parse().unwrap(),
                &headers(&[("host", "[::1]")])
            ),
            Ok(())
        );
        for host in [
            "evil.example",
            "evil.example:15000",
            "localhost.evil.example",
            "10.0.0.1:15000",
            "",
        ] {
            let h = headers(&[("host", host)]);
            assert!(post_allowed(local, &h).is_err(), "{host}");
        }
        assert!(post_allowed(local, &headers(&[])).is_err());
        for origin in ["https://evil.example", "null", "http://evil.example:15000"] {
            let h = headers(&[("host", "127.0.0.1:15000"), ("origin", origin)]);
            assert!(post_allowed(local, &h).is_err(), "{origin}");
        }
        let h = headers(&[
            ("host", "127.0.0.1:15000"),
            ("origin", "http://127.0.0.1:15000"),
        ]);
        assert_eq!(post_allowed(local, &h), Ok(()));
        let h = headers(&[("host", "127.0.0.1:15000")]);
        assert!(post_allowed("10.1.2.3:5000".parse().unwrap(), &h).is_err());
    }
}
