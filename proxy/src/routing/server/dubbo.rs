//! Dubbo 2 connections to a routed service port: each request is decoded ([`dubbo`]),
//! routed on its own (first matching route of the service's virtual service, weighted
//! cluster, endpoint by the cluster's load balancing) and written to a pooled upstream
//! connection to that endpoint, shared by every client connection of the proxy (as Dubbo
//! consumers share one connection per provider). Its request id is replaced by one unique
//! on that upstream connection, and the response's id is put back before the response goes
//! to its caller; the response is otherwise forwarded byte for byte.
//!
//! - Heartbeats (event requests) are answered by the proxy, from clients and from upstreams.
//! - A frame without the magic, or announcing a body over `--dubbo-max-body`, closes the
//!   connection and is counted (`bad_magic`, `over_cap`).
//! - A body that does not decode is answered BAD_REQUEST (status 40) with the reason, and
//!   the connection stays up; a request no route matches is answered SERVICE_NOT_FOUND
//!   (60); a failed connect (after the route's retries) SERVER_ERROR (80); a route's
//!   timeout SERVER_TIMEOUT (31), and the late response is dropped.
//! - At most [`MAX_IN_FLIGHT`] requests of one client connection wait for responses;
//!   further ones wait to be read (TCP back-pressure), so a client cannot queue unbounded
//!   responses in the proxy.
//! - At a drain the connection stops reading requests, the responses in flight are sent
//!   until the drain deadline, then it closes.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use crate::routing::balance::{pick_weighted, Cluster};
use crate::routing::dubbo::{
    self, decode_request, error_response, heartbeat_response, set_id, status, FrameError, Header,
    Invocation, HEADER_LEN, HESSIAN2,
};
use crate::routing::reload::Routing;
use crate::routing::stats::RoutingStats;
use crate::routing::table::{DubboMatch, PortPlan, Route};
use crate::upstream::{connect_upstream, UpstreamOptions};
use crate::wasm::{RequestInfo, Verdict};

/// Most requests of one client connection waiting for their responses at once.
pub const MAX_IN_FLIGHT: usize = 1024;

/// A frame for a client, with the in-flight place it frees once written.
type ToClient = (Vec<u8>, Option<OwnedSemaphorePermit>);
type ClientTx = mpsc::UnboundedSender<ToClient>;

/// A request sent upstream, waiting for its response.
struct Pending {
    client: ClientTx,
    /// The client's own request id.
    id: u64,
    permit: OwnedSemaphorePermit,
    cluster: Option<Arc<Cluster>>,
    endpoint: SocketAddr,
}

impl Pending {
    /// The request is done (answered, failed or timed out): the endpoint has one fewer.
    fn finish(&self) {
        if let Some(e) = self
            .cluster
            .as_ref()
            .and_then(|c| c.endpoints.iter().find(|e| e.addr == self.endpoint))
        {
            e.active.fetch_sub(1, Relaxed);
        }
    }

    fn count_response(&self, status: u8) {
        if let Some(c) = &self.cluster {
            // Dubbo statuses by class: OK 2xx, BAD_REQUEST and CLIENT_ERROR 4xx, else 5xx.
            let class = match status {
                20 => 2,
                40 | 90 => 4,
                _ => 5,
            };
            c.stats.responses[class].fetch_add(1, Relaxed);
        }
    }
}

/// Requests in flight on one upstream connection, by upstream request id.
#[derive(Default)]
struct PendingTable {
    map: HashMap<u64, Pending>,
    /// The connection has ended: no request may wait on it any more.
    closed: bool,
}

/// A pooled upstream connection.
struct Upstream {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Mutex<PendingTable>,
    next_id: AtomicU64,
}

impl Upstream {
    fn is_closed(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed
    }

    fn take(&self, id: u64) -> Option<Pending> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map
            .remove(&id)
    }

    /// Marks the connection ended and answers every request waiting on it.
    fn close(&self, why: &str) {
        let waiting: Vec<Pending> = {
            let mut t = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            t.closed = true;
            t.map.drain().map(|(_, p)| p).collect()
        };
        for p in waiting {
            p.finish();
            if let Some(c) = &p.cluster {
                c.stats.other_errors.fetch_add(1, Relaxed);
            }
            let msg = format!("interceptor-proxy: upstream {} {why}", p.endpoint);
            let _ = p.client.send((
                error_response(p.id, status::SERVER_ERROR, &msg),
                Some(p.permit),
            ));
        }
    }
}

/// One pool slot per endpoint address; its lock is held while connecting.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Upstream>>>>;

/// Routes Dubbo requests: the routes in force and the upstream connection pool, shared by
/// every Dubbo connection of one proxy.
pub struct DubboRouter {
    routing: Arc<Routing>,
    opts: UpstreamOptions,
    max_body: u32,
    pool: Mutex<HashMap<SocketAddr, Slot>>,
}

impl std::fmt::Debug for DubboRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DubboRouter").finish_non_exhaustive()
    }
}

/// Reads one frame (header and body); `Ok(None)` at EOF between frames.
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    cap: u32,
) -> io::Result<Option<Result<(Header, Vec<u8>), FrameError>>> {
    let mut head = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut head[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
        // A wrong magic is known from the first two bytes: no need to wait for 16.
        if got >= 2 && head[..2] != dubbo::MAGIC {
            return Ok(Some(Err(FrameError::BadMagic([head[0], head[1]]))));
        }
    }
    let h = match Header::parse(&head, cap) {
        Ok(h) => h,
        Err(e) => return Ok(Some(Err(e))),
    };
    let mut frame = vec![0u8; HEADER_LEN + h.body_len as usize];
    frame[..HEADER_LEN].copy_from_slice(&head);
    r.read_exact(&mut frame[HEADER_LEN..]).await?;
    Ok(Some(Ok((h, frame))))
}

/// Writes frames as they come, flushing when none is waiting.
async fn write_loop<W, T>(w: W, mut rx: mpsc::UnboundedReceiver<T>, bytes: impl Fn(&T) -> &[u8])
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(64 * 1024, w);
    while let Some(item) = rx.recv().await {
        if w.write_all(bytes(&item)).await.is_err() {
            return;
        }
        drop(item);
        while let Ok(item) = rx.try_recv() {
            if w.write_all(bytes(&item)).await.is_err() {
                return;
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

fn count_frame_error(stats: &RoutingStats, e: &FrameError) {
    match e {
        FrameError::BadMagic(_) => stats.dubbo.bad_magic.fetch_add(1, Relaxed),
        FrameError::OverCap { .. } => stats.dubbo.over_cap.fetch_add(1, Relaxed),
    };
}

impl DubboRouter {
    pub fn new(routing: Arc<Routing>, opts: UpstreamOptions, max_body: u32) -> Self {
        DubboRouter {
            routing,
            opts,
            max_body,
            pool: Mutex::new(HashMap::new()),
        }
    }

    /// Serves a Dubbo connection to a routed service port, routing each request on its own.
    pub async fn serve(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        orig_dst: SocketAddr,
        plan: PortPlan,
        workload: Option<String>,
    ) {
        let (rd, wr) = client.into_split();
        let (tx, rx) = mpsc::unbounded_channel::<ToClient>();
        let mut writer = tokio::spawn(write_loop::<OwnedWriteHalf, ToClient>(wr, rx, |t| &t.0));
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut rd = BufReader::with_capacity(16 * 1024, rd);
        let stats = self.routing.stats.clone();
        let deadline = crate::drain::Deadline::current();
        let draining = async {
            match &deadline {
                Some(d) => d.draining().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(draining);
        loop {
            let frame = tokio::select! {
                f = read_frame(&mut rd, self.max_body) => f,
                _ = &mut draining => {
                    debug!(client = %peer, "draining: Dubbo connection ends after the responses in flight");
                    break;
                }
            };
            match frame {
                Ok(None) => break,
                Err(e) => {
                    debug!(client = %peer, error = %e, "Dubbo connection read error");
                    break;
                }
                Ok(Some(Err(e))) => {
                    count_frame_error(&stats, &e);
                    debug!(client = %peer, error = %e, "closing the Dubbo connection");
                    writer.abort();
                    return;
                }
                Ok(Some(Ok((h, frame)))) => {
                    self.request(
                        h,
                        frame,
                        &tx,
                        &permits,
                        orig_dst,
                        &plan,
                        workload.as_deref(),
                    )
                    .await
                }
            }
        }
        // The responses in flight still go out (until the drain deadline, at a drain).
        drop(tx);
        let passed = async {
            match &deadline {
                Some(d) => d.passed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut writer => {}
            _ = passed => writer.abort(),
        }
    }

    /// Handles one frame from a client.
    #[allow(clippy::too_many_arguments)]
    async fn request(
        &self,
        h: Header,
        mut frame: Vec<u8>,
        tx: &ClientTx,
        permits: &Arc<Semaphore>,
        orig_dst: SocketAddr,
        plan: &PortPlan,
        workload: Option<&str>,
    ) {
        let stats = &self.routing.stats;
        if h.is_event() {
            if h.is_request() {
                stats.dubbo.heartbeats.fetch_add(1, Relaxed);
                if h.is_two_way() {
                    let _ = tx.send((heartbeat_response(h.id, h.serialization()), None));
                }
            }
            return;
        }
        if !h.is_request() {
            // A response from a client (Dubbo callbacks) has no request here to answer.
            stats.dubbo.unmatched_responses.fetch_add(1, Relaxed);
            return;
        }
        stats.dubbo.requests.fetch_add(1, Relaxed);
        let reply = |code: u8, msg: &str| {
            if h.is_two_way() {
                let _ = tx.send((error_response(h.id, code, msg), None));
            }
        };
        let decoded = if h.serialization() == HESSIAN2 {
            decode_request(&frame[HEADER_LEN..]).map_err(|e| e.to_string())
        } else {
            Err(format!(
                "serialization {} is not supported (only Hessian 2, id 2)",
                h.serialization()
            ))
        };
        let inv = match decoded {
            Ok(inv) => inv,
            Err(e) => {
                stats.dubbo.bad_requests.fetch_add(1, Relaxed);
                reply(
                    status::BAD_REQUEST,
                    &format!("interceptor-proxy: the request body does not decode: {e}"),
                );
                return;
            }
        };
        let table = self.routing.current();
        // Wasm plugins first, with the call's service, method, arguments and attachments as
        // properties: they may choose the cluster or route, or answer.
        let mut chosen_route: Option<String> = None;
        let mut chosen_cluster: Option<Arc<Cluster>> = None;
        if table.plugins.any_for(&plan.service) {
            match table.plugins.on_request(
                &mut http::HeaderMap::new(),
                &plugin_info(&inv, orig_dst, plan, workload),
            ) {
                Verdict::Continue => {}
                Verdict::Reply(r) => {
                    // An HTTP-style answer in Dubbo's terms: the body is the message.
                    let code = if r.status < 500 {
                        status::BAD_REQUEST
                    } else {
                        status::SERVER_ERROR
                    };
                    reply(code, &String::from_utf8_lossy(&r.body));
                    return;
                }
                Verdict::Failed { plugin } => {
                    reply(
                        status::SERVER_ERROR,
                        &format!("interceptor-proxy: routing plugin {plugin} failed"),
                    );
                    return;
                }
                Verdict::Cluster(name) => match table.cluster_named(&name, plan.port) {
                    Some(c) => chosen_cluster = Some(c.clone()),
                    None => {
                        stats.no_route.fetch_add(1, Relaxed);
                        reply(
                            status::SERVICE_NOT_FOUND,
                            &format!("interceptor-proxy: a routing plugin chose {name:?}, which is no cluster"),
                        );
                        return;
                    }
                },
                Verdict::Route(name) => chosen_route = Some(name),
            }
        }
        let (cluster, route): (Option<Arc<Cluster>>, Option<&Route>) =
            if let Some(c) = chosen_cluster {
                (Some(c), None)
            } else {
                match table.http_routes(&plan.service, plan) {
                    Some(routes) => match routes.iter().find(|r| match &chosen_route {
                        Some(name) => r.name == *name,
                        None => route_matches(r, &inv, workload),
                    }) {
                        Some(r) => {
                            r.stats.requests.fetch_add(1, Relaxed);
                            (
                                Some(pick_weighted(&r.clusters, r.total_weight).clone()),
                                Some(r),
                            )
                        }
                        None => {
                            stats.no_route.fetch_add(1, Relaxed);
                            reply(
                                status::SERVICE_NOT_FOUND,
                                &format!(
                                    "interceptor-proxy: no route matched {}:{}.{}",
                                    inv.service, inv.version, inv.method
                                ),
                            );
                            return;
                        }
                    },
                    None => (
                        table.default_cluster(&plan.service, plan.port).cloned(),
                        None,
                    ),
                }
            };
        let retries = route.map_or(0, |r| r.connect_retries);
        let timeout = route.and_then(|r| r.timeout);
        drop(table);
        // A place among the requests in flight: waits (and stops reading) when all are taken.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last_error = String::new();
        for attempt in 0..=retries {
            let endpoint = match &cluster {
                Some(c) => match c.pick(&tried) {
                    Some(e) => e.addr,
                    None => break,
                },
                None => orig_dst,
            };
            let up = match self.upstream(endpoint).await {
                Ok(up) => up,
                Err(e) => {
                    if let Some(c) = &cluster {
                        c.stats.connect_errors.fetch_add(1, Relaxed);
                        if attempt < retries {
                            c.stats.retries.fetch_add(1, Relaxed);
                        }
                    }
                    debug!(upstream = %endpoint, error = %e, "Dubbo upstream connect failed");
                    last_error = format!("connecting to {endpoint}: {e}");
                    tried.push(endpoint);
                    continue;
                }
            };
            let uid = up.next_id.fetch_add(1, Relaxed);
            set_id(&mut frame, uid);
            if let Some(c) = &cluster {
                c.stats.requests.fetch_add(1, Relaxed);
                if let Some(e) = c.endpoints.iter().find(|e| e.addr == endpoint) {
                    e.active.fetch_add(1, Relaxed);
                }
            }
            if h.is_two_way() {
                let p = Pending {
                    client: tx.clone(),
                    id: h.id,
                    permit,
                    cluster: cluster.clone(),
                    endpoint,
                };
                {
                    let mut t = up.pending.lock().unwrap_or_else(|e| e.into_inner());
                    if t.closed {
                        drop(t);
                        p.finish();
                        reply(
                            status::SERVER_ERROR,
                            &format!("interceptor-proxy: upstream {endpoint} closed"),
                        );
                        return;
                    }
                    t.map.insert(uid, p);
                }
                if let Some(after) = timeout {
                    let up = up.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        if let Some(p) = up.take(uid) {
                            p.finish();
                            if let Some(c) = &p.cluster {
                                c.stats.timeouts.fetch_add(1, Relaxed);
                            }
                            let msg = format!(
                                "interceptor-proxy: no response from {} within the route's timeout {after:?}",
                                p.endpoint
                            );
                            let _ = p.client.send((
                                error_response(p.id, status::SERVER_TIMEOUT, &msg),
                                Some(p.permit),
                            ));
                        }
                    });
                }
            } else if let Some(e) = cluster
                .as_ref()
                .and_then(|c| c.endpoints.iter().find(|e| e.addr == endpoint))
            {
                // One-way: nothing to wait for.
                e.active.fetch_sub(1, Relaxed);
            }
            // If the connection has just ended, its reader answers what was waiting on it.
            let _ = up.tx.send(frame);
            return;
        }
        reply(
            status::SERVER_ERROR,
            &format!("interceptor-proxy: no upstream reachable: {last_error}"),
        );
    }

    /// The pooled connection to `addr`, connected if there is none (or it has ended).
    async fn upstream(&self, addr: SocketAddr) -> io::Result<Arc<Upstream>> {
        let slot = self
            .pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(addr)
            .or_default()
            .clone();
        let mut g = slot.lock().await;
        if let Some(u) = g.as_ref().filter(|u| !u.is_closed()) {
            return Ok(u.clone());
        }
        let s = connect_upstream(addr, &self.opts)
            .await
            .map_err(|(_, e)| e)?;
        self.routing
            .stats
            .dubbo
            .upstream_connections
            .fetch_add(1, Relaxed);
        let (rd, wr) = s.into_split();
        let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let up = Arc::new(Upstream {
            tx,
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(write_loop(wr, rx, |f: &Vec<u8>| f.as_slice()));
        let reader = up.clone();
        let stats = self.routing.stats.clone();
        let cap = self.max_body;
        tokio::spawn(async move {
            let why = upstream_read_loop(&reader, rd, cap, &stats).await;
            debug!(upstream = %addr, why, "Dubbo upstream connection ended");
            reader.close(why);
        });
        *g = Some(up.clone());
        Ok(up)
    }
}

/// Reads an upstream connection's frames until it ends: responses go back to their
/// callers, heartbeats are answered. Returns why it ended.
async fn upstream_read_loop(
    up: &Upstream,
    rd: tokio::net::tcp::OwnedReadHalf,
    cap: u32,
    stats: &RoutingStats,
) -> &'static str {
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    loop {
        let (h, mut frame) = match read_frame(&mut rd, cap).await {
            Ok(None) => return "closed the connection",
            Err(_) => return "failed (read error)",
            Ok(Some(Err(e))) => {
                count_frame_error(stats, &e);
                return match e {
                    FrameError::BadMagic(_) => "sent a frame without the Dubbo magic",
                    FrameError::OverCap { .. } => "sent a frame over --dubbo-max-body",
                };
            }
            Ok(Some(Ok(f))) => f,
        };
        if h.is_event() {
            if h.is_request() {
                stats.dubbo.heartbeats.fetch_add(1, Relaxed);
                if h.is_two_way() {
                    let _ = up.tx.send(heartbeat_response(h.id, h.serialization()));
                }
            }
            continue;
        }
        if h.is_request() {
            // Requests from a provider (callbacks) are not routed.
            continue;
        }
        match up.take(h.id) {
            Some(p) => {
                p.finish();
                p.count_response(h.status);
                set_id(&mut frame, p.id);
                let _ = p.client.send((frame, Some(p.permit)));
            }
            None => {
                stats.dubbo.unmatched_responses.fetch_add(1, Relaxed);
            }
        }
    }
}

/// What a Wasm plugin sees of a Dubbo call: `dubbo.service`, `dubbo.version`,
/// `dubbo.method`, `dubbo.args.N` (as strings, as a `dubbo` match sees them) and
/// `dubbo.attachments.KEY`; `request.path` is `/service/method`.
fn plugin_info(
    inv: &Invocation,
    orig_dst: SocketAddr,
    plan: &PortPlan,
    workload: Option<&str>,
) -> RequestInfo {
    let mut dubbo = std::collections::BTreeMap::new();
    dubbo.insert("service".to_owned(), inv.service.clone());
    dubbo.insert("version".to_owned(), inv.version.clone());
    dubbo.insert("method".to_owned(), inv.method.clone());
    for (i, a) in inv.args.iter().enumerate() {
        if let Some(a) = a {
            dubbo.insert(format!("args.{i}"), a.clone());
        }
    }
    for (k, v) in &inv.attachments {
        dubbo.insert(format!("attachments.{k}"), v.clone());
    }
    RequestInfo {
        method: inv.method.clone(),
        path: format!("/{}/{}", inv.service, inv.method),
        host: plan.service.clone(),
        source: None,
        workload: workload.map(str::to_owned),
        destination: Some(orig_dst),
        service: plan.service.clone(),
        dubbo,
    }
}

fn route_matches(r: &Route, inv: &Invocation, workload: Option<&str>) -> bool {
    if r.matches.is_empty() {
        return true;
    }
    r.matches.iter().any(|m| {
        // A match with HTTP conditions never holds for a Dubbo request.
        !m.has_http_conditions()
            && m.source
                .as_ref()
                .is_none_or(|x| workload.is_some_and(|w| x.matches(w)))
            && m.dubbo.as_ref().is_none_or(|d| dubbo_matches(d, inv))
    })
}

/// Whether every condition of `d` holds for `inv`.
pub fn dubbo_matches(d: &DubboMatch, inv: &Invocation) -> bool {
    d.service.as_ref().is_none_or(|x| x.matches(&inv.service))
        && d.version.as_ref().is_none_or(|x| x.matches(&inv.version))
        && d.method.as_ref().is_none_or(|x| x.matches(&inv.method))
        && d.args.iter().all(|(i, x)| {
            inv.args
                .get(*i)
                .and_then(|a| a.as_deref())
                .is_some_and(|a| x.matches(a))
        })
        && d.attachments
            .iter()
            .all(|(k, x)| inv.attachment(k).is_some_and(|v| x.matches(v)))
}
