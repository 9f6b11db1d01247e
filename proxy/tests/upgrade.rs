//! Hot upgrade in process, on 127.0.0.1, without the eBPF programs (the original-destination
//! lookup names a local test server): established opaque connections move from each
//! generation to the next over the upgrade socket and keep copying byte-exact, a
//! half-closed one keeps its state, the old generation returns as soon as it holds
//! nothing, counters and per-destination series carry over; and a new process that dies
//! while taking the connections over leaves them working in the old one.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use interceptor_proxy::original_dst::OriginalDstError;
use interceptor_proxy::{Config, OriginalDstLookup, Proxy, Stats, StatsSnapshot};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Long enough that a generation still holding a connection is caught: with moving, an
/// old generation returns at once; without, only when the stream stops (much later).
const DRAIN: Duration = Duration::from_secs(60);
/// How long each stream runs after the last upgrade.
const AFTER: Duration = Duration::from_millis(300);
const CHUNK: usize = 16 * 1024;

struct Generation {
    stats: Arc<Stats>,
    stop: Option<oneshot::Sender<()>>,
    serve: JoinHandle<Result<StatsSnapshot, interceptor_proxy::ProxyError>>,
}

impl Generation {
    /// Waits until it holds no connection, stops it and returns its final counters.
    async fn stop_when_idle(mut self) -> StatsSnapshot {
        let stats = self.stats.clone();
        assert!(
            eventually(Duration::from_secs(10), || stats
                .snapshot()
                .outbound
                .connections_active
                == 0)
            .await,
            "the last generation still holds connections"
        );
        let _ = self.stop.take().unwrap().send(());
        self.serve
            .await
            .unwrap()
            .expect("the last generation stops cleanly")
    }
}

/// The test's scratch directory, removed on drop (a failing test too).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(test: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("icpt-t-upg-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

fn config_drain(socket: &Path, upgrade: bool, routes: Option<&Path>, drain: Duration) -> Config {
    Config {
        routes: routes.map(Path::to_owned),
        outbound: vec!["127.0.0.1:0".parse().unwrap()],
        outbound_ipv6_optional: false,
        inbound: vec![],
        bypass_mark: 0,
        // Long enough for a SYN sent again after 1 s, and again after 3 s.
        connect_timeout: Duration::from_secs(10),
        admin: None,
        workers: 2,
        drain_timeout: drain,
        upgrade_socket: Some(socket.to_owned()),
        upgrade,
        destination_stats: true,
        ..Config::default()
    }
}

fn to(addr: SocketAddr) -> OriginalDstLookup {
    Arc::new(move |_: &TcpStream, _| Ok::<_, OriginalDstError>(addr))
}

/// Binds a generation (taking over from the running one when `upgrade`) and serves it;
/// returns once it accepts (and, for an upgrade, the hand-off of the listeners is done).
async fn generation(socket: &Path, upgrade: bool, server: SocketAddr) -> (Generation, SocketAddr) {
    generation_routes(socket, upgrade, server, None).await
}

/// [`generation`] with a routing file.
async fn generation_routes(
    socket: &Path,
    upgrade: bool,
    server: SocketAddr,
    routes: Option<&Path>,
) -> (Generation, SocketAddr) {
    generation_drain(socket, upgrade, server, routes, DRAIN).await
}

/// [`generation_routes`] with a drain deadline of `drain`.
async fn generation_drain(
    socket: &Path,
    upgrade: bool,
    server: SocketAddr,
    routes: Option<&Path>,
    drain: Duration,
) -> (Generation, SocketAddr) {
    let mut proxy = Proxy::bind(config_drain(socket, upgrade, routes, drain))
        .await
        .expect("proxy binds");
    proxy.set_original_dst_lookup(to(server));
    let addr = proxy.outbound_addrs()[0];
    let stats = proxy.stats();
    let (tx, rx) = oneshot::channel();
    let serve = tokio::spawn(async move {
        proxy
            .serve(async move {
                let _ = rx.await;
            })
            .await
    });
    (
        Generation {
            stats,
            stop: Some(tx),
            serve,
        },
        addr,
    )
}

/// Writes the stream of `seed` until `stop`, then shuts down writing; (bytes, hash).
async fn write_until(mut w: OwnedWriteHalf, seed: u64, stop: Arc<AtomicBool>) -> (u64, Fnv) {
    let data = data(1 << 20, seed);
    let (mut n, mut h) = (0u64, Fnv::default());
    let mut at = 0;
    while !stop.load(Relaxed) {
        let chunk = &data[at..at + CHUNK];
        w.write_all(chunk).await.expect("write");
        h.update(chunk);
        n += CHUNK as u64;
        at = (at + CHUNK) % data.len();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    w.shutdown().await.expect("shutdown(SHUT_WR)");
    (n, h)
}

async fn read_all(mut r: OwnedReadHalf) -> (u64, Fnv) {
    drain(&mut r).await
}

/// What each end of one connection saw: (sent, received) for the client, and the server's.
struct Ends {
    client: JoinHandle<((u64, Fnv), (u64, Fnv))>,
    stop: Arc<AtomicBool>,
}

/// A server that, per connection, reads to EOF and writes the stream of seed 2 until
/// `stop` (the same flag for all), reporting (sent, received) on `done`.
async fn stream_server(
    stop: Arc<AtomicBool>,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<((u64, Fnv), (u64, Fnv))>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let (r, w) = s.into_split();
            let (stop, tx) = (stop.clone(), tx.clone());
            tokio::spawn(async move {
                let (sent, got) = tokio::join!(write_until(w, 2, stop), read_all(r));
                let _ = tx.send((sent, got));
            });
        }
    });
    (addr, rx)
}

/// A client streaming both ways through the proxy at `addr`: the stream of seed 1 until
/// `stop`; with `half_close`, only 1,000 bytes, then its FIN at once.
async fn client(addr: SocketAddr, stop: Arc<AtomicBool>, half_close: bool) -> Ends {
    let s = TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    let (r, mut w) = s.into_split();
    let own_stop = if half_close {
        Arc::new(AtomicBool::new(false))
    } else {
        stop.clone()
    };
    let client = tokio::spawn(async move {
        let writer = async {
            if half_close {
                let d = data(1000, 1);
                w.write_all(&d).await.unwrap();
                w.shutdown().await.unwrap();
                (1000, hash(&d))
            } else {
                write_until(w, 1, own_stop).await
            }
        };
        tokio::join!(writer, read_all(r))
    });
    Ends { client, stop }
}

/// Bytes and hash sent, then received, by one end of a connection.
type Transfer = ((u64, Fnv), (u64, Fnv));

fn assert_exact(name: &str, client: Transfer, server: Transfer) {
    let ((c_sent, c_got), (s_sent, s_got)) = (client, server);
    assert_eq!(c_sent, s_got, "{name}: client to server not byte-exact");
    assert_eq!(s_sent, c_got, "{name}: server to client not byte-exact");
    println!(
        "{name}: {} bytes client to server, {} bytes server to client, byte-exact",
        c_sent.0, s_sent.0
    );
}

/// Stops the streaming client, checks both connections byte-exact at both ends, waits for
/// `gen` (which kept them) to return and checks it copied every byte the clients sent.
async fn finish_in_the_old_generation(
    full: Ends,
    half: Ends,
    done: &mut mpsc::UnboundedReceiver<Transfer>,
    gen: Generation,
) {
    full.stop.store(true, Relaxed);
    let c_full = full.client.await.unwrap();
    let c_half = half.client.await.unwrap();
    let s1 = done.recv().await.unwrap();
    let s2 = done.recv().await.unwrap();
    let (s_full, s_half) = if (s1.1).0 == 1000 { (s2, s1) } else { (s1, s2) };
    assert_exact("streaming both ways", c_full, s_full);
    assert_exact("half-closed", c_half, s_half);
    let snapshot = tokio::time::timeout(Duration::from_secs(30), gen.serve)
        .await
        .expect("the old generation returns once its connections ended")
        .unwrap()
        .expect("serves without an error");
    assert_eq!(
        snapshot.outbound.bytes_client_to_upstream,
        (c_full.0).0 + (c_half.0).0
    );
}

/// Streams both ways through three upgrades: each old generation returns long before its
/// 60 s drain (it held nothing once its connections moved), the bytes are exact at both
/// ends, the half-closed connection stays half-closed, and the last generation's counters
/// and per-destination series hold the whole of both connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn established_connections_move_byte_exact_through_three_upgrades() {
    let dir = scratch("move");
    let socket = dir.0.join("proxy.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let (server, mut done) = stream_server(stop.clone()).await;
    let (mut gen, addr) = generation(&socket, false, server).await;
    let full = client(addr, stop.clone(), false).await;
    let half = client(addr, stop.clone(), true).await;
    // Both connections carry bytes through the first generation.
    assert!(
        eventually(Duration::from_secs(10), || {
            let s = gen.stats.snapshot().outbound;
            s.forwarded_total == 2 && s.bytes_upstream_to_client > 4 * CHUNK as u64
        })
        .await,
        "the streams did not start"
    );
    for g in 1..=3 {
        let (next, _) = generation(&socket, true, server).await;
        let old = std::mem::replace(&mut gen, next);
        let asked = Instant::now();
        let snapshot = tokio::time::timeout(Duration::from_secs(30), old.serve)
            .await
            .unwrap_or_else(|_| panic!("generation {} still holds its connections", g - 1))
            .unwrap()
            .expect("the old generation serves without an error");
        println!(
            "generation {} returned {:?} after the upgrade was asked for ({} connections active there at the end)",
            g - 1,
            asked.elapsed(),
            snapshot.outbound.connections_active
        );
        // The streams go on in the new generation.
        let before = gen.stats.snapshot().outbound.bytes_upstream_to_client;
        assert!(
            eventually(Duration::from_secs(10), || {
                gen.stats.snapshot().outbound.bytes_upstream_to_client > before + 4 * CHUNK as u64
            })
            .await,
            "generation {g} copies nothing of the moved streams"
        );
        assert_eq!(gen.stats.snapshot().outbound.connections_active, 2);
    }
    tokio::time::sleep(AFTER).await;
    full.stop.store(true, Relaxed);
    let c_full = full.client.await.unwrap();
    let c_half = half.client.await.unwrap();
    let s1 = done.recv().await.unwrap();
    let s2 = done.recv().await.unwrap();
    // Which server report is the half-closed one: it received 1,000 bytes.
    let (s_full, s_half) = if (s1.1).0 == 1000 { (s2, s1) } else { (s1, s2) };
    assert_exact("streaming both ways", c_full, s_full);
    assert_exact("half-closed from the start", c_half, s_half);

    let last = gen.stats.clone();
    let snapshot = gen.stop_when_idle().await;
    let total_up = (c_full.0).0 + (c_half.0).0;
    let total_down = (c_full.1).0 + (c_half.1).0;
    assert_eq!(snapshot.outbound.connections_total, 2);
    assert_eq!(snapshot.outbound.forwarded_total, 2);
    // Each of the three old generations moved both connections, and cut none.
    assert_eq!(snapshot.upgrade_moved_connections, 6);
    assert_eq!(snapshot.drain_cut_connections, 0);
    assert_eq!(snapshot.outbound.bytes_client_to_upstream, total_up);
    assert_eq!(snapshot.outbound.bytes_upstream_to_client, total_down);
    assert_eq!(last.outbound.connection_seconds.count(), 2);
    let series = last.destinations.series();
    let dest = series
        .iter()
        .find(|(_, d, _)| *d == server.to_string())
        .unwrap_or_else(|| panic!("no series for {server}: {series:?}"));
    assert_eq!(
        (dest.2.connections, dest.2.bytes_up, dest.2.bytes_down),
        (2, total_up, total_down),
        "per-destination series"
    );
    drop(dir);
}

/// A stand-in for a new process that takes the listeners, says ready, and dies when the
/// first batch of connections arrives (its descriptors are discarded unread): the old
/// generation keeps copying those connections byte-exact and returns when they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_dies_taking_connections_over_leaves_them_working() {
    let dir = scratch("die");
    let socket = dir.0.join("proxy.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let (server, mut done) = stream_server(stop.clone()).await;
    let (gen, addr) = generation(&socket, false, server).await;
    let full = client(addr, stop.clone(), false).await;
    let half = client(addr, stop.clone(), true).await;
    assert!(
        eventually(Duration::from_secs(10), || {
            gen.stats.snapshot().outbound.bytes_upstream_to_client > 4 * CHUNK as u64
        })
        .await
    );
    let sock = socket.clone();
    let fake = tokio::task::spawn_blocking(move || {
        let s =
            std::os::unix::net::UnixStream::connect(&sock).expect("connect to the upgrade socket");
        let mut w = s.try_clone().unwrap();
        let mut lines = BufReader::new(s);
        w.write_all(b"{\"type\":\"hello\",\"pid\":1,\"version\":\"stand-in\"}\n")
            .unwrap();
        let mut seen = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                lines.read_line(&mut line).unwrap() > 0,
                "closed after {seen:?}"
            );
            let kind = serde_json::from_str::<serde_json::Value>(&line).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned();
            seen.push(kind.clone());
            match kind.as_str() {
                "listeners" => w.write_all(b"{\"type\":\"ready\"}\n").unwrap(),
                "connections" => return seen, // dies here: the socket closes
                _ => {}
            }
        }
    });
    let seen = tokio::time::timeout(Duration::from_secs(30), fake)
        .await
        .expect("the stand-in got connections")
        .unwrap();
    println!("stand-in saw {seen:?}, then died");
    let before = gen.stats.snapshot().outbound.bytes_upstream_to_client;
    assert!(
        eventually(Duration::from_secs(10), || {
            gen.stats.snapshot().outbound.bytes_upstream_to_client > before + 8 * CHUNK as u64
        })
        .await,
        "the old generation no longer copies the connections the stand-in was offered"
    );
    tokio::time::sleep(AFTER).await;
    finish_in_the_old_generation(full, half, &mut done, gen).await;
    drop(dir);
}

/// An HTTP/1.1 keep-alive server: `GET /slow` is answered after 500 ms, anything else at once.
async fn http_server(l: TcpListener) {
    loop {
        let (mut s, _) = l.accept().await.unwrap();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    match tokio::io::AsyncReadExt::read(&mut s, &mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    continue;
                };
                let slow = buf.starts_with(b"GET /slow");
                buf.drain(..end + 4);
                if slow {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if s.write_all(r).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// [`http_server`] on a port of 127.0.0.1, and a routing file in `dir` that makes it the
/// HTTP service `web` at 127.0.10.1 on the same port: (the service address, the file).
async fn http_service(dir: &Scratch) -> (SocketAddr, PathBuf) {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = upstream.local_addr().unwrap().port();
    tokio::spawn(http_server(upstream));
    web_service_routes(&dir.0, port)
}

/// Sends one request on a kept-alive connection and reads its response head and body.
async fn request(c: &mut TcpStream, path: &str) -> String {
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: web\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.ends_with(b"ok") {
        let n = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read(c, &mut chunk),
        )
        .await
        .expect("a response within 10 s")
        .expect("read the response");
        assert!(
            n > 0,
            "closed before the response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&got).to_lowercase()
}

/// Routed HTTP/1.1 keep-alive connections are never cut mid-request at an upgrade: the
/// old generation answers the request in flight with `Connection: close` and then closes,
/// closes an idle one at once, and returns long before its 60 s drain; new requests go to
/// the new generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_http_connections_end_between_requests_at_an_upgrade() {
    let dir = scratch("http");
    let socket = dir.0.join("proxy.sock");
    let (service, routes) = http_service(&dir).await;
    let (old, addr) = generation_routes(&socket, false, service, Some(&routes)).await;
    let mut busy = TcpStream::connect(addr).await.unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    for c in [&mut busy, &mut idle] {
        let r = request(c, "/").await;
        assert!(r.starts_with("http/1.1 200"), "{r}");
        assert!(!r.contains("connection: close"), "{r}");
    }
    // A request in flight (answered after 500 ms) when the upgrade happens.
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (new, _) = generation_routes(&socket, true, service, Some(&routes)).await;
    let mut got = Vec::new();
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut busy, &mut got),
    )
    .await
    .expect("the busy connection is answered and closed within 10 s");
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(
        outcome.is_ok(),
        "the busy connection was reset: {outcome:?} after {text:?}"
    );
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(
        text.contains("connection: close"),
        "the response in flight says close: {text}"
    );
    assert!(text.ends_with("ok"), "{text}");
    let mut rest = [0u8; 16];
    let n = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut idle, &mut rest),
    )
    .await
    .expect("the idle connection is closed within 10 s");
    assert!(
        matches!(n, Ok(0)),
        "the idle connection ends with a FIN: {n:?}"
    );
    let asked = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), old.serve)
        .await
        .expect("the old generation returns long before its 60 s drain")
        .unwrap()
        .expect("serves without an error");
    println!(
        "old generation returned {:?} after the connections closed",
        asked.elapsed()
    );
    // The clients reconnect to the new generation.
    let mut again = TcpStream::connect(addr).await.unwrap();
    let r = request(&mut again, "/").await;
    assert!(r.starts_with("http/1.1 200"), "{r}");
    drop(again);
    let mut new = new;
    let _ = new.stop.take().unwrap().send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), new.serve).await;
}

/// What an old generation must cut at its deadline is counted, and the count reaches the
/// new generation with the old one's final report (its counters and `/metrics`): a routed
/// HTTP/1.1 request whose response takes 500 ms is still in flight when the old
/// generation's 200 ms drain ends, so that connection is cut; nothing moves (routed HTTP
/// ends between requests, it is never moved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_at_the_drain_deadline_is_counted_in_the_new_generation() {
    let dir = scratch("cut");
    let socket = dir.0.join("proxy.sock");
    let (service, routes) = http_service(&dir).await;
    let drain = Duration::from_millis(200);
    let (old, addr) = generation_drain(&socket, false, service, Some(&routes), drain).await;
    let mut busy = TcpStream::connect(addr).await.unwrap();
    let r = request(&mut busy, "/").await;
    assert!(r.starts_with("http/1.1 200"), "{r}");
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut new, _) = generation_drain(&socket, true, service, Some(&routes), drain).await;
    let snapshot = tokio::time::timeout(Duration::from_secs(30), old.serve)
        .await
        .expect("the old generation returns at its deadline")
        .unwrap()
        .expect("serves without an error");
    assert_eq!(snapshot.drain_cut_connections, 1, "{snapshot:?}");
    assert_eq!(snapshot.upgrade_moved_connections, 0, "{snapshot:?}");
    // The client saw its connection end without the response.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut busy, &mut got),
    )
    .await
    .expect("the cut connection ends");
    assert!(
        !String::from_utf8_lossy(&got).contains("ok"),
        "the slow response arrived: the connection was not cut"
    );
    // The old generation's final report reached the new one.
    let stats = new.stats.clone();
    assert!(
        eventually(Duration::from_secs(10), || stats
            .snapshot()
            .drain_cut_connections
            == 1)
        .await,
        "the new generation did not count the cut: {:?}",
        stats.snapshot()
    );
    let metrics = interceptor_proxy::metrics::Metrics::new(
        stats,
        Arc::new(interceptor_proxy::routing::RoutingStats::default()),
    )
    .encode();
    assert!(
        metrics
            .lines()
            .any(|l| l == "interceptor_proxy_drain_cut_connections_total 1"),
        "{metrics}"
    );
    let _ = new.stop.take().unwrap().send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), new.serve).await;
}

/// What the HTTP/2 upstream of [`h2_server`] saw: connections accepted and ended.
#[derive(Default)]
struct H2Upstream {
    accepted: std::sync::atomic::AtomicU64,
    ended: std::sync::atomic::AtomicU64,
    /// `GET /stream` ends its body once this is set.
    finish: AtomicBool,
}

/// A response body fed from a channel, one data frame per message.
struct ChannelBody(mpsc::Receiver<bytes::Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(hyper::body::Frame::data(c))))
    }
}

/// An HTTP/2 (prior knowledge) server: `GET /stream` sends `chunk N\n` every 50 ms until
/// [`H2Upstream::finish`] is set (at most 20 s), then `end\n`; anything else `ok`.
async fn h2_server(l: TcpListener, seen: Arc<H2Upstream>) {
    loop {
        let (s, _) = l.accept().await.unwrap();
        seen.accepted.fetch_add(1, Relaxed);
        let seen = seen.clone();
        tokio::spawn(async move {
            let svc_seen = seen.clone();
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let seen = svc_seen.clone();
                    async move {
                        let (tx, rx) = mpsc::channel(4);
                        if req.uri().path() == "/stream" {
                            tokio::spawn(async move {
                                for i in 0..400 {
                                    if seen.finish.load(Relaxed) {
                                        break;
                                    }
                                    if tx.send(format!("chunk {i}\n").into()).await.is_err() {
                                        return;
                                    }
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                                let _ = tx.send("end\n".into()).await;
                            });
                        } else {
                            let _ = tx.try_send("ok".into());
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(ChannelBody(rx)))
                    }
                });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
            seen.ended.fetch_add(1, Relaxed);
        });
    }
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// An HTTP/2 (prior knowledge) client connection to `addr`: its sender and the task that
/// drives it (its result: how the connection ended).
async fn h2_client(addr: SocketAddr) -> (H2Sender, JoinHandle<hyper::Result<()>>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("HTTP/2 handshake through the proxy");
    (sender, tokio::spawn(conn))
}

fn h2_get(path: &str) -> hyper::Request<http_body_util::Empty<bytes::Bytes>> {
    hyper::Request::get(format!("http://web{path}"))
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// `GET path` on `sender`: the whole body, or the error (the request was refused).
async fn h2_fetch(sender: &mut H2Sender, path: &str) -> Result<String, hyper::Error> {
    use http_body_util::BodyExt as _;
    sender.ready().await?;
    let resp = sender.send_request(h2_get(path)).await?;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Routed HTTP/2 at an upgrade with a 2 s drain: the old generation sends GOAWAY (a new
/// request on the old connection is refused, never half-served), the stream in flight
/// then still runs to its end, byte for byte, and the connection closes cleanly; new
/// requests go to the new generation over a new connection, which reaches the upstream
/// over an upstream connection of its own (the pools are re-opened by the new process,
/// not moved: the upstream sees a second connection, and the old one ends with the old
/// generation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_http2_streams_in_flight_finish_after_goaway_at_an_upgrade() {
    use http_body_util::BodyExt as _;
    let dir = scratch("h2");
    let socket = dir.0.join("proxy.sock");
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = upstream.local_addr().unwrap().port();
    let seen = Arc::new(H2Upstream::default());
    tokio::spawn(h2_server(upstream, seen.clone()));
    let routes = dir.0.join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "serviceEntries:\n- hosts: [web]\n  addresses: [127.0.10.1]\n  ports: [{{number: {port}, name: h2, protocol: HTTP2}}]\n  endpoints:\n  - {{address: 127.0.0.1}}\n"
        ),
    )
    .unwrap();
    let service: SocketAddr = format!("127.0.10.1:{port}").parse().unwrap();
    let drain = Duration::from_secs(2);
    let (old, addr) = generation_drain(&socket, false, service, Some(&routes), drain).await;
    let (mut sender, conn) = h2_client(addr).await;
    assert_eq!(h2_fetch(&mut sender, "/").await.unwrap(), "ok");
    // A long stream in flight.
    sender.ready().await.unwrap();
    let resp = sender.send_request(h2_get("/stream")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a first chunk").unwrap();
    assert_eq!(first.into_data().unwrap(), "chunk 0\n");
    let chunks = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let counted = chunks.clone();
    let reader = tokio::spawn(async move {
        let mut got = String::from("chunk 0\n");
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("the stream broke after {got:?}: {e}"))?;
            if let Ok(data) = frame.into_data() {
                got.push_str(&String::from_utf8_lossy(&data));
                counted.fetch_add(1, Relaxed);
            }
        }
        Ok::<_, String>(got)
    });
    assert_eq!(
        seen.accepted.load(Relaxed),
        1,
        "one pooled upstream connection"
    );

    let (new, _) = generation_drain(&socket, true, service, Some(&routes), drain).await;
    // Until the old generation's GOAWAY, requests on the old connection are served there;
    // after it, a new one is refused (not half-served).
    let mut served_before = 0;
    let refused = loop {
        match tokio::time::timeout(Duration::from_secs(10), h2_fetch(&mut sender, "/"))
            .await
            .expect("a request on the old connection is answered or refused within 10 s")
        {
            Ok(body) => {
                assert_eq!(body, "ok");
                served_before += 1;
                assert!(served_before < 500, "no GOAWAY within 500 requests");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => break e,
        }
    };
    println!(
        "old connection: {served_before} requests served, then refused after GOAWAY: {refused}"
    );
    assert!(
        !reader.is_finished(),
        "the stream must still be in flight after the GOAWAY"
    );
    // The stream in flight goes on after the GOAWAY, then finishes, complete.
    let at_goaway = chunks.load(Relaxed);
    assert!(
        eventually(Duration::from_secs(10), || chunks.load(Relaxed)
            > at_goaway + 2)
        .await,
        "the stream in flight stopped at the GOAWAY"
    );
    seen.finish.store(true, Relaxed);
    let got = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the stream ends within 10 s")
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.last(), Some(&"end"), "{got}");
    for (i, l) in lines[..lines.len() - 1].iter().enumerate() {
        assert_eq!(
            *l,
            format!("chunk {i}"),
            "the stream is complete and in order"
        );
    }
    println!(
        "the stream in flight completed after the GOAWAY: {} chunks, {at_goaway} of them \
         before it",
        lines.len() - 1
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the old connection closes once its stream is done")
        .unwrap();
    assert!(ended.is_ok(), "the old connection ended with {ended:?}");
    tokio::time::timeout(Duration::from_secs(30), old.serve)
        .await
        .expect("the old generation returns")
        .unwrap()
        .expect("serves without an error");
    // New requests: a new connection, to the new generation, which opens its own
    // upstream connection; the old generation's pooled one has ended with it.
    let (mut again, conn2) = h2_client(addr).await;
    for _ in 0..3 {
        assert_eq!(h2_fetch(&mut again, "/").await.unwrap(), "ok");
    }
    assert_eq!(
        seen.accepted.load(Relaxed),
        2,
        "the new generation re-opened the upstream pool once"
    );
    assert!(
        eventually(Duration::from_secs(10), || seen.ended.load(Relaxed) == 1).await,
        "the old generation's upstream connection ends with it"
    );
    drop(again);
    let _ = conn2.await;
    let mut new = new;
    let _ = new.stop.take().unwrap().send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), new.serve).await;
    drop(dir);
}

/// A stand-in new process on the upgrade socket at `socket`: hello, `ready` after the
/// listeners; at the first `connections` it does not answer (a new process that hangs
/// while taking connections over) until `answer_late` is set, then says `taken` anyway.
/// Returns the message types it saw until the socket closed.
fn hanging_stand_in(socket: PathBuf, answer_late: Arc<AtomicBool>) -> JoinHandle<Vec<String>> {
    tokio::task::spawn_blocking(move || {
        let s = std::os::unix::net::UnixStream::connect(&socket)
            .expect("connect to the upgrade socket");
        let mut w = s.try_clone().unwrap();
        let mut lines = BufReader::new(s);
        w.write_all(b"{\"type\":\"hello\",\"pid\":1,\"version\":\"stand-in\"}\n")
            .unwrap();
        let mut seen = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            if lines.read_line(&mut line).unwrap_or(0) == 0 {
                return seen;
            }
            let v = serde_json::from_str::<serde_json::Value>(&line).unwrap();
            let kind = v["type"].as_str().unwrap().to_owned();
            seen.push(kind.clone());
            match kind.as_str() {
                "listeners" => w.write_all(b"{\"type\":\"ready\"}\n").unwrap(),
                "connections" => {
                    let n = v["conns"].as_array().unwrap().len();
                    // Bounded, so that a failing test does not hang in its runtime's drop.
                    let asked = Instant::now();
                    while !answer_late.load(Relaxed) && asked.elapsed() < Duration::from_secs(60) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let _ =
                        w.write_all(format!("{{\"type\":\"taken\",\"count\":{n}}}\n").as_bytes());
                }
                "exited" => return seen,
                _ => {}
            }
        }
    })
}

/// A new process that takes the listeners and then hangs when the first batch of
/// connections arrives (alive, never confirming): the old generation waits for `taken`
/// only for its own timeout (1 s, within its 60 s drain), answers `kept`, and keeps copying
/// those connections byte-exact; a `taken` that comes after that changes nothing; the
/// old generation returns once the connections end, long before its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_does_not_confirm_in_time_leaves_the_connections_working() {
    let dir = scratch("hang");
    let socket = dir.0.join("proxy.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let (server, mut done) = stream_server(stop.clone()).await;
    let (gen, addr) = generation(&socket, false, server).await;
    let full = client(addr, stop.clone(), false).await;
    let half = client(addr, stop.clone(), true).await;
    assert!(
        eventually(Duration::from_secs(10), || {
            gen.stats.snapshot().outbound.bytes_upstream_to_client > 4 * CHUNK as u64
        })
        .await
    );
    let answer_late = Arc::new(AtomicBool::new(false));
    let stand_in = hanging_stand_in(socket.clone(), answer_late.clone());
    // The old generation goes on copying after its timeout.
    let before = gen.stats.snapshot().outbound.bytes_upstream_to_client;
    assert!(
        eventually(Duration::from_secs(20), || {
            gen.stats.snapshot().outbound.bytes_upstream_to_client > before + 64 * CHUNK as u64
        })
        .await,
        "the old generation no longer copies the connections the hanging process was offered"
    );
    // The late `taken`: the batch stays where it is.
    answer_late.store(true, Relaxed);
    let at_taken = gen.stats.snapshot().outbound.bytes_upstream_to_client;
    assert!(
        eventually(Duration::from_secs(10), || {
            gen.stats.snapshot().outbound.bytes_upstream_to_client > at_taken + 16 * CHUNK as u64
        })
        .await,
        "the old generation stopped copying after a late taken"
    );
    finish_in_the_old_generation(full, half, &mut done, gen).await;
    let seen = tokio::time::timeout(Duration::from_secs(10), stand_in)
        .await
        .expect("the stand-in's conversation ends with the old generation")
        .unwrap();
    println!("the hanging stand-in saw {seen:?}");
    let at = seen
        .iter()
        .position(|m| m == "connections")
        .expect("a batch was offered");
    assert_eq!(
        seen.get(at + 1).map(String::as_str),
        Some("kept"),
        "the batch not confirmed in time is answered kept: {seen:?}"
    );
    assert!(
        !seen.iter().any(|m| m == "handed"),
        "nothing was handed over: {seen:?}"
    );
    drop(dir);
}

/// A connection still connecting upstream when the upgrade starts (the upstream's accept
/// queue is full, so its SYN goes unanswered until the queue has room and the SYN is
/// sent again): it is not lost, and once connected it moves to the new generation: the
/// old generation returns (60 s drain) while the connection is still open, and it keeps
/// working in the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_connecting_upstream_at_the_upgrade_moves_once_connected() {
    use tokio::io::AsyncReadExt as _;
    let dir = scratch("connecting");
    let socket = dir.0.join("proxy.sock");
    // A listener whose accept queue holds one connection; a filler takes that place.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.listen(0).unwrap();
    let server: SocketAddr = sock.local_addr().unwrap().as_socket().unwrap();
    let filler = std::net::TcpStream::connect(server).unwrap();
    let (old, addr) = generation(&socket, false, server).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"early\n").await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || old
            .stats
            .snapshot()
            .outbound
            .connections_total
            == 1)
        .await
    );
    // The upstream connect is under way (unanswered) when the new generation takes over.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        old.stats.snapshot().outbound.forwarded_total,
        0,
        "still connecting"
    );
    let (new, _) = generation(&socket, true, server).await;
    // Room in the queue: the SYN sent again is answered.
    sock.set_nonblocking(true).unwrap();
    let upstream = std::net::TcpListener::from(sock);
    let _ = upstream.accept().unwrap();
    drop(filler);
    let upstream = TcpListener::from_std(upstream).unwrap();
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(10), upstream.accept())
        .await
        .expect("the connect completes once the queue has room")
        .unwrap();
    let mut got = [0u8; 6];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"early\n");
    // The old generation moves it and returns while it is open.
    tokio::time::timeout(Duration::from_secs(30), old.serve)
        .await
        .expect("the old generation returns long before its 60 s drain: it moved the connection")
        .unwrap()
        .expect("serves without an error");
    // It works in the new generation, both ways.
    for i in 0..3 {
        let line = format!("ping {i}\n");
        c.write_all(line.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; line.len()];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, line.as_bytes());
        s.write_all(line.as_bytes()).await.unwrap();
        let mut back = vec![0u8; line.len()];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, line.as_bytes());
    }
    let snap = new.stats.snapshot();
    println!(
        "moved once connected: the new generation counts {} outbound connection(s) active",
        snap.outbound.connections_active
    );
    assert_eq!(snap.outbound.connections_active, 1);
    drop((c, s));
    let mut new = new;
    let _ = new.stop.take().unwrap().send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), new.serve).await;
    drop(dir);
}

/// A routed TCP connection (a service port of protocol TCP in the routing file, forwarded
/// to the service's endpoint, not to the address dialled) moves at an upgrade like an
/// opaque one: the old generation returns long before its 60 s drain, the stream goes on
/// byte-exact in the new generation, and the last generation's counters and the
/// per-destination series of the endpoint hold the whole connection (TCP routes keep no
/// counters of their own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_tcp_connections_move_with_their_endpoint_series() {
    let dir = scratch("rtcp");
    let socket = dir.0.join("proxy.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let (server, mut done) = stream_server(stop.clone()).await;
    let routes = dir.0.join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "serviceEntries:\n- hosts: [db]\n  addresses: [127.0.10.1]\n  ports: [{{number: {}, name: tcp, protocol: TCP}}]\n  endpoints:\n  - {{address: 127.0.0.1}}\n",
            server.port()
        ),
    )
    .unwrap();
    let service: SocketAddr = format!("127.0.10.1:{}", server.port()).parse().unwrap();
    let (old, addr) = generation_routes(&socket, false, service, Some(&routes)).await;
    let full = client(addr, stop.clone(), false).await;
    assert!(
        eventually(Duration::from_secs(10), || {
            let s = old.stats.snapshot().outbound;
            s.forwarded_total == 1 && s.bytes_upstream_to_client > 4 * CHUNK as u64
        })
        .await,
        "the routed stream did not start"
    );
    let (gen, _) = generation_routes(&socket, true, service, Some(&routes)).await;
    tokio::time::timeout(Duration::from_secs(30), old.serve)
        .await
        .expect("the old generation returns long before its 60 s drain: the connection moved")
        .unwrap()
        .expect("serves without an error");
    let before = gen.stats.snapshot().outbound.bytes_upstream_to_client;
    assert!(
        eventually(Duration::from_secs(10), || {
            gen.stats.snapshot().outbound.bytes_upstream_to_client > before + 4 * CHUNK as u64
        })
        .await,
        "the new generation copies nothing of the moved routed stream"
    );
    assert_eq!(gen.stats.snapshot().outbound.connections_active, 1);
    tokio::time::sleep(AFTER).await;
    full.stop.store(true, Relaxed);
    let c_full = full.client.await.unwrap();
    let s_full = done.recv().await.unwrap();
    assert_exact("routed TCP", c_full, s_full);
    let last = gen.stats.clone();
    let snapshot = gen.stop_when_idle().await;
    assert_eq!(snapshot.outbound.forwarded_total, 1);
    assert_eq!(snapshot.outbound.bytes_client_to_upstream, (c_full.0).0);
    assert_eq!(snapshot.outbound.bytes_upstream_to_client, (c_full.1).0);
    let series = last.destinations.series();
    let dest = series
        .iter()
        .find(|(_, d, _)| *d == server.to_string())
        .unwrap_or_else(|| panic!("no series for the endpoint {server}: {series:?}"));
    assert_eq!(
        (dest.2.connections, dest.2.bytes_up, dest.2.bytes_down),
        (1, (c_full.0).0, (c_full.1).0),
        "the endpoint's per-destination series"
    );
    println!(
        "routed TCP moved: {} bytes up, {} down, all in the endpoint's series",
        (c_full.0).0,
        (c_full.1).0
    );
    drop(dir);
}
