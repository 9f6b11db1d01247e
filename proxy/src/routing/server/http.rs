//! HTTP/1.1 and HTTP/2 (gRPC) connections to a routed service port: served by hyper, each
//! request routed on its own (first matching route, weighted cluster, endpoint by the
//! cluster's load balancing) and sent on a pooled upstream connection with the bypass mark.
//!
//! Bounds per downstream connection, so that a client cannot hold the proxy's memory or
//! descriptors for free:
//! - `--http-header-timeout`: an HTTP/1 request's headers must arrive within it (hyper's
//!   header read timeout; hyper starts that clock when it waits for a request head, so it
//!   also bounds the wait for the next request on a keep-alive connection);
//! - `--http-idle-timeout`: a connection with no request in progress (a response still being
//!   sent counts as in progress) for that long is shut down gracefully;
//! - at a drain (an upgrade or a shutdown) a connection ends between requests: hyper's
//!   graceful shutdown (idle: closed; HTTP/1 request in flight: answered with `Connection:
//!   close`; HTTP/2: GOAWAY, the streams in flight finish);
//! - bodies kept for retries: at most [`RETRY_BODY_LIMIT`] per request and
//!   [`RETRY_BUDGET_PER_CONNECTION`] over all streams of a connection at once; a request
//!   beyond either is answered 413.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::debug;

use crate::routing::balance::{pick_weighted, Cluster};
use crate::routing::file::Protocol;
use crate::routing::reload::Routing;
use crate::routing::table::{HeaderOps, PortPlan, Route};
use crate::upstream::{connect_upstream, UpstreamOptions};
use crate::wasm::{LocalReply, RequestInfo, Verdict};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides of the proxy.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Largest request body buffered so that a request can be retried on another endpoint.
pub const RETRY_BODY_LIMIT: usize = 1 << 20;
/// Most bytes of request bodies kept for retries at once over all streams of one
/// downstream connection (HTTP/2 multiplexes many).
pub const RETRY_BUDGET_PER_CONNECTION: usize = 4 << 20;

/// Timeouts of downstream HTTP connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpTimeouts {
    /// `--http-header-timeout`.
    pub header: Duration,
    /// `--http-idle-timeout`; `None`: never.
    pub idle: Option<Duration>,
}

/// What one downstream connection shares among its requests.
#[derive(Debug)]
struct ConnState {
    /// Requests in progress (until their response body has been sent or dropped).
    active: AtomicUsize,
    /// When the last request ended (or the connection started).
    last_end: Mutex<tokio::time::Instant>,
    /// Bytes of request bodies kept for retries now.
    retry_bytes: AtomicUsize,
}

/// One request in progress; ends it on drop.
struct InProgress(Arc<ConnState>);

impl InProgress {
    fn start(conn: &Arc<ConnState>) -> Self {
        conn.active.fetch_add(1, Relaxed);
        InProgress(conn.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        *self.0.last_end.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// Bytes taken from a connection's retry budget; given back on drop.
struct RetryReservation<'a> {
    conn: &'a ConnState,
    held: usize,
}

impl RetryReservation<'_> {
    /// Takes `n` more bytes, or fails (taking nothing) when the budget would be exceeded.
    fn take(&mut self, n: usize) -> bool {
        let ok = self
            .conn
            .retry_bytes
            .fetch_update(Relaxed, Relaxed, |held| {
                let after = held.checked_add(n)?;
                (after <= RETRY_BUDGET_PER_CONNECTION).then_some(after)
            })
            .is_ok();
        if ok {
            self.held += n;
        }
        ok
    }
}

impl Drop for RetryReservation<'_> {
    fn drop(&mut self) {
        self.conn.retry_bytes.fetch_sub(self.held, Relaxed);
    }
}

/// Connects to the endpoint named by a URI's authority, with the bypass mark.
#[derive(Clone, Debug)]
pub struct Connector {
    opts: UpstreamOptions,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let opts = self.opts;
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "no endpoint address")
                })?;
            connect_upstream(addr, &opts)
                .await
                .map(TokioIo::new)
                .map_err(|(_, e)| e)
        })
    }
}

/// Routes HTTP requests: the routes in force and the upstream connection pools (HTTP/1.1
/// and HTTP/2), shared by every routed connection of one proxy.
pub struct HttpRouter {
    routing: Arc<Routing>,
    h1: Client<Connector, Body>,
    h2: Client<Connector, Body>,
    timeouts: HttpTimeouts,
}

impl std::fmt::Debug for HttpRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRouter").finish_non_exhaustive()
    }
}

impl HttpRouter {
    /// A router over `routing` whose upstream connections are made with `opts`.
    pub fn new(routing: Arc<Routing>, opts: UpstreamOptions, timeouts: HttpTimeouts) -> Self {
        let connector = Connector { opts };
        let h1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        HttpRouter {
            routing,
            h1,
            h2,
            timeouts,
        }
    }

    /// Serves an HTTP/1.1 or HTTP/2 connection to a routed service port, routing each
    /// request on its own.
    pub async fn serve(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        orig_dst: SocketAddr,
        plan: PortPlan,
        workload: Option<String>,
    ) {
        let plan = Arc::new(plan);
        let workload = Arc::new(workload);
        let conn_state = Arc::new(ConnState {
            active: AtomicUsize::new(0),
            last_end: Mutex::new(tokio::time::Instant::now()),
            retry_bytes: AtomicUsize::new(0),
        });
        let this = self.clone();
        let state = conn_state.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let this = this.clone();
            let plan = plan.clone();
            let workload = workload.clone();
            let state = state.clone();
            async move {
                let in_progress = InProgress::start(&state);
                let resp = this
                    .route(req, peer, orig_dst, &plan, workload.as_deref(), &state)
                    .await;
                // The request is in progress until its response body is done with.
                let (parts, body) = resp.into_parts();
                let body = body
                    .map_frame(move |f| {
                        let _ = &in_progress;
                        f
                    })
                    .boxed_unsync();
                Ok::<_, Infallible>(Response::from_parts(parts, body))
            }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.timeouts.header);
        builder.http2().timer(TokioTimer::new());
        let conn = builder.serve_connection(TokioIo::new(client), svc);
        tokio::pin!(conn);
        // At a drain (an upgrade or a shutdown) the connection ends between requests:
        // hyper's graceful shutdown closes it if idle, else answers the request in flight
        // with `Connection: close` (HTTP/1) or sends GOAWAY and lets the streams in flight
        // finish (HTTP/2).
        let deadline = crate::drain::Deadline::current();
        let draining = async {
            match &deadline {
                Some(d) => d.draining().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(draining);
        let idle = self.timeouts.idle;
        let result = loop {
            let due = idle.map(|idle| {
                *conn_state
                    .last_end
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    + idle
            });
            tokio::select! {
                r = conn.as_mut() => break r,
                _ = &mut draining => {
                    debug!(client = %peer, "draining: HTTP connection ends after the requests in flight");
                    conn.as_mut().graceful_shutdown();
                    break conn.await;
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    let idle = idle.expect("checked");
                    let last = *conn_state.last_end.lock().unwrap_or_else(|e| e.into_inner());
                    if conn_state.active.load(Relaxed) == 0 && last + idle <= tokio::time::Instant::now() {
                        debug!(client = %peer, idle_ms = idle.as_millis() as u64, "HTTP connection idle; closing");
                        conn.as_mut().graceful_shutdown();
                        break conn.await;
                    }
                    if conn_state.active.load(Relaxed) > 0 {
                        // Busy: look again one idle period from now at the latest.
                        *conn_state.last_end.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
                    }
                }
            }
        };
        if let Err(e) = result {
            debug!(client = %peer, error = %e, "HTTP connection ended with an error");
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn route(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        orig_dst: SocketAddr,
        plan: &PortPlan,
        workload: Option<&str>,
        conn: &ConnState,
    ) -> Response<Body> {
        let table = self.routing.current();
        let host = request_host(&req);
        let mut req = req;
        // Wasm plugins first: they may edit the headers the routes match, answer, or choose
        // the cluster or route themselves.
        let mut chosen_route: Option<String> = None;
        let mut chosen_cluster: Option<Arc<Cluster>> = None;
        if table.plugins.any_for(&plan.service) {
            let info = RequestInfo {
                method: req.method().as_str().to_owned(),
                path: req
                    .uri()
                    .path_and_query()
                    .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned()),
                host: host.clone(),
                source: Some(peer),
                workload: workload.map(str::to_owned),
                destination: Some(orig_dst),
                service: plan.service.clone(),
                dubbo: Default::default(),
            };
            match table.plugins.on_request(req.headers_mut(), &info) {
                Verdict::Continue => {}
                Verdict::Reply(r) => return local_reply(r),
                Verdict::Failed { plugin } => {
                    debug!(%plugin, "wasm plugin failed (fail closed): 503");
                    return plain(StatusCode::SERVICE_UNAVAILABLE, "routing plugin failed\n");
                }
                Verdict::Cluster(name) => match table.cluster_named(&name, plan.port) {
                    Some(c) => chosen_cluster = Some(c.clone()),
                    None => {
                        debug!(cluster = %name, "a wasm plugin chose a cluster that does not exist");
                        self.routing.stats.no_route.fetch_add(1, Relaxed);
                        return plain(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "a routing plugin chose an unknown cluster\n",
                        );
                    }
                },
                Verdict::Route(name) => chosen_route = Some(name),
            }
        }
        let (cluster, route): (Option<Arc<Cluster>>, Option<&Route>) =
            if let Some(c) = chosen_cluster {
                (Some(c), None)
            } else {
                match table.http_routes(&host, plan) {
                    Some(routes) => match routes.iter().find(|r| match &chosen_route {
                        Some(name) => r.name == *name,
                        None => route_matches(r, &req, workload),
                    }) {
                        Some(r) => {
                            r.stats.requests.fetch_add(1, Relaxed);
                            (
                                Some(pick_weighted(&r.clusters, r.total_weight).clone()),
                                Some(r),
                            )
                        }
                        None => {
                            self.routing.stats.no_route.fetch_add(1, Relaxed);
                            return plain(StatusCode::NOT_FOUND, "no route matched this request\n");
                        }
                    },
                    None => (
                        table.default_cluster(&plan.service, plan.port).cloned(),
                        None,
                    ),
                }
            };
        if let Some(ops) = route.and_then(|r| r.request_headers.as_ref()) {
            apply(ops, req.headers_mut());
        }
        let retries = route.map_or(0, |r| r.connect_retries);
        let timeout = route.and_then(|r| r.timeout);
        let http2 = cluster.as_ref().is_some_and(|c| c.http2) || plan.protocol == Protocol::Grpc;
        if let Some(c) = &cluster {
            c.stats.requests.fetch_add(1, Relaxed);
        }

        // The body: streamed, or kept for a retry on another endpoint.
        let (parts, body) = req.into_parts();
        let mut kept: Option<Bytes> = None;
        let mut streamed: Option<Body> = None;
        let mut reservation = RetryReservation { conn, held: 0 };
        if retries > 0 {
            match keep_for_retry(body, &mut reservation).await {
                Ok(b) => kept = Some(b),
                Err(problem) => return plain(StatusCode::PAYLOAD_TOO_LARGE, problem),
            }
        } else {
            streamed = Some(body.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
        }

        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt = 0;
        loop {
            let endpoint = cluster.as_ref().and_then(|c| c.pick(&tried));
            let target = endpoint.map_or(orig_dst, |e| e.addr);
            let body = match (&kept, streamed.take()) {
                (Some(b), _) => Full::new(b.clone()).map_err(|e| match e {}).boxed_unsync(),
                (None, Some(b)) => b,
                (None, None) => unreachable!("a streamed body is sent once"),
            };
            let up = upstream_request(&parts, body, target, http2);
            if let Some(e) = endpoint {
                e.active.fetch_add(1, Relaxed);
            }
            let client = if http2 { &self.h2 } else { &self.h1 };
            let sent = client.request(up);
            let result = match timeout {
                Some(t) => tokio::time::timeout(t, sent).await.map_err(|_| ()),
                None => Ok(sent.await),
            };
            if let Some(e) = endpoint {
                e.active.fetch_sub(1, Relaxed);
            }
            let cstats = cluster.as_ref().map(|c| &c.stats);
            match result {
                Ok(Ok(resp)) => {
                    if let Some(s) = cstats {
                        let class = (resp.status().as_u16() / 100).min(5) as usize;
                        s.responses[class].fetch_add(1, Relaxed);
                    }
                    let (mut rparts, rbody) = resp.into_parts();
                    if let Some(ops) = route.and_then(|r| r.response_headers.as_ref()) {
                        apply(ops, &mut rparts.headers);
                    }
                    strip_hop_by_hop(&mut rparts.headers);
                    return Response::from_parts(
                        rparts,
                        rbody.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
                    );
                }
                Ok(Err(e)) if e.is_connect() => {
                    if let Some(s) = cstats {
                        s.connect_errors.fetch_add(1, Relaxed);
                    }
                    tried.push(target);
                    if attempt < retries && kept.is_some() {
                        attempt += 1;
                        if let Some(s) = cstats {
                            s.retries.fetch_add(1, Relaxed);
                        }
                        continue;
                    }
                    return plain(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error\n");
                }
                Ok(Err(e)) => {
                    if let Some(s) = cstats {
                        s.other_errors.fetch_add(1, Relaxed);
                    }
                    debug!(upstream = %target, error = %e, "upstream request failed");
                    return plain(StatusCode::BAD_GATEWAY, "upstream request failed\n");
                }
                Err(()) => {
                    if let Some(s) = cstats {
                        s.timeouts.fetch_add(1, Relaxed);
                    }
                    return plain(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout\n");
                }
            }
        }
    }
}

/// Reads a whole request body to keep it for retries, within [`RETRY_BODY_LIMIT`] and the
/// connection's [`RETRY_BUDGET_PER_CONNECTION`] (taken as the bytes arrive).
async fn keep_for_retry(
    mut body: Incoming,
    reservation: &mut RetryReservation<'_>,
) -> Result<Bytes, &'static str> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err("request body could not be read\n");
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > RETRY_BODY_LIMIT {
                return Err("request body too large to retry\n");
            }
            if !reservation.take(data.len()) {
                return Err(
                    "request bodies kept for retries on this connection exceed its budget\n",
                );
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// The request's host (Host header, or the :authority of HTTP/2), lower case, no port.
fn request_host<B>(req: &Request<B>) -> String {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.host().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| {
                    h.parse::<http::uri::Authority>()
                        .map(|a| a.host().to_owned())
                        .unwrap_or_else(|_| h.to_owned())
                })
        })
        .unwrap_or_default();
    raw.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

fn route_matches<B>(r: &Route, req: &Request<B>, workload: Option<&str>) -> bool {
    if r.matches.is_empty() {
        return true;
    }
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    r.matches.iter().any(|m| {
        // A Dubbo match never holds for an HTTP request.
        m.dubbo.is_none()
            && m.uri.as_ref().is_none_or(|u| u.matches(path))
            && m.method
                .as_ref()
                .is_none_or(|x| x.matches(req.method().as_str()))
            && m.headers.iter().all(|(name, x)| {
                req.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| x.matches(v))
            })
            && m.query.iter().all(|(name, x)| {
                query.split('&').any(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    k == name && x.matches(v)
                })
            })
            && m.grpc_service.as_ref().is_none_or(|svc| {
                let mut it = path.trim_start_matches('/').splitn(2, '/');
                let (s, meth) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
                s == svc && m.grpc_method.as_ref().is_none_or(|x| x == meth)
            })
            && m.source
                .as_ref()
                .is_none_or(|x| workload.is_some_and(|w| x.matches(w)))
    })
}

fn apply(ops: &HeaderOps, h: &mut HeaderMap) {
    for name in &ops.remove {
        h.remove(name);
    }
    for (k, v) in &ops.set {
        h.insert(k.clone(), v.clone());
    }
    for (k, v) in &ops.add {
        h.append(k.clone(), v.clone());
    }
}

const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        if name == "te" && h.get("te").is_some_and(|v| v == "trailers") {
            continue;
        }
        h.remove(name);
    }
}

/// The request to send upstream: same method, path, headers and body, to `target`.
fn upstream_request(
    parts: &http::request::Parts,
    body: Body,
    target: SocketAddr,
    http2: bool,
) -> Request<Body> {
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let uri = Uri::builder()
        .scheme("http")
        .authority(target.to_string())
        .path_and_query(pq)
        .build()
        .expect("a valid URI from valid parts");
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    if !http2 && !headers.contains_key(header::HOST) {
        if let Some(a) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                headers.insert(header::HOST, v);
            }
        }
    }
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = if http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    *req.headers_mut() = headers;
    req
}

/// The response a Wasm plugin asked for.
fn local_reply(r: LocalReply) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(r.body))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FORBIDDEN);
    for (k, v) in r.headers {
        if let (Ok(k), Ok(v)) = (http::HeaderName::try_from(k), HeaderValue::try_from(v)) {
            resp.headers_mut().append(k, v);
        }
    }
    resp
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    /// Bodies kept for retries by concurrent streams of one connection share one budget;
    /// what a finished request kept is given back.
    #[test]
    fn retry_bodies_share_one_budget_per_connection() {
        let conn = ConnState {
            active: AtomicUsize::new(0),
            last_end: Mutex::new(tokio::time::Instant::now()),
            retry_bytes: AtomicUsize::new(0),
        };
        let mut streams: Vec<RetryReservation<'_>> = Vec::new();
        // Four streams of 1 MiB each fill the 4 MiB budget...
        for _ in 0..4 {
            let mut r = RetryReservation {
                conn: &conn,
                held: 0,
            };
            assert!(r.take(RETRY_BODY_LIMIT));
            streams.push(r);
        }
        // ... so a fifth cannot keep even one byte, and takes nothing.
        let mut fifth = RetryReservation {
            conn: &conn,
            held: 0,
        };
        assert!(!fifth.take(1));
        assert_eq!(conn.retry_bytes.load(Relaxed), RETRY_BUDGET_PER_CONNECTION);
        // One stream ends: its bytes are free again.
        drop(streams.pop());
        assert!(fifth.take(RETRY_BODY_LIMIT));
        drop(fifth);
        drop(streams);
        assert_eq!(conn.retry_bytes.load(Relaxed), 0);
    }
}
