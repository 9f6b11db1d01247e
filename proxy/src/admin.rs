//! Admin HTTP/1.1 server: `GET /ready`, `GET /stats` (JSON), `GET /metrics` (Prometheus),
//! `GET /listeners` (JSON: the bound outbound and inbound addresses).

use std::convert::Infallible;
use std::net::SocketAddr;
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
                async move { Ok::<_, Infallible>(handle(&req, &state)) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r { debug!(client = %peer, error = %e, "admin connection error") },
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// Routes one request.
pub fn handle(req: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    route(req.method(), req.uri().path(), state)
}

fn route(method: &Method, path: &str, state: &AdminState) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
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
            state.stats.snapshot().to_prometheus().into(),
            "text/plain; version=0.0.4",
        ),
        "/listeners" => {
            let mut body = serde_json::to_vec(&*state.listeners).expect("addresses serialize");
            body.push(b'\n');
            with_type(StatusCode::OK, body.into(), "application/json")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /ready, /stats, /metrics or /listeners\n",
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
        let state = AdminState {
            stats: Arc::default(),
            ready: Arc::default(),
            listeners: Arc::new(ListenerAddrs {
                outbound: vec!["127.0.0.1:15001".parse().unwrap()],
                inbound: vec![
                    "0.0.0.0:15006".parse().unwrap(),
                    "[::]:15006".parse().unwrap(),
                ],
            }),
        };
        assert_eq!(route(&Method::GET, "/ready", &state).status(), 503);
        state.ready.set(Readiness::Ready);
        assert_eq!(route(&Method::GET, "/ready", &state).status(), 200);
        state.ready.set(Readiness::Draining);
        assert_eq!(route(&Method::GET, "/ready", &state).status(), 503);
        assert_eq!(route(&Method::GET, "/stats", &state).status(), 200);
        assert_eq!(route(&Method::GET, "/metrics", &state).status(), 200);
        assert_eq!(route(&Method::GET, "/nope", &state).status(), 404);
        let r = route(&Method::GET, "/listeners", &state);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(route(&Method::POST, "/stats", &state).status(), 405);
    }
}
