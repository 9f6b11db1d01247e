//! The proxy does not stall (issue 13, item 3) and its admin POSTs answer only the node
//! (item 6): the whole proxy in process on 127.0.0.1, the original-destination lookup
//! replaced by one naming a local test server, as in `proxy.rs`.
//!
//! - `--max-connections`: one more connection is closed at once and counted, the open ones
//!   keep being served, and a place freed is used again;
//! - `--tcp-idle-timeout`: an idle forwarded connection is closed, a busy one is not; both
//!   of its sockets carry TCP keepalive;
//! - `--http-header-timeout`: a slowloris client is cut while a normal client is served;
//! - admin POSTs with a foreign `Host` or `Origin` get 403 and change nothing.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use interceptor_proxy::original_dst::OriginalDstError;
use interceptor_proxy::{Config, OriginalDstLookup, Proxy, Stats, StatsSnapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Running {
    outbound: SocketAddr,
    admin: SocketAddr,
    stats: Arc<Stats>,
    stop: Option<oneshot::Sender<()>>,
    serve: JoinHandle<StatsSnapshot>,
}

impl Running {
    async fn stop(mut self) -> StatsSnapshot {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.serve)
            .await
            .expect("proxy stopped in time")
            .unwrap()
    }
}

fn config() -> Config {
    Config {
        outbound: vec!["127.0.0.1:0".parse().unwrap()],
        outbound_ipv6_optional: false,
        admin: Some("127.0.0.1:0".parse().unwrap()),
        bypass_mark: 0,
        workers: 2,
        connect_timeout: Duration::from_secs(2),
        drain_timeout: Duration::from_secs(1),
        ..Config::default()
    }
}

fn to(addr: SocketAddr) -> OriginalDstLookup {
    Arc::new(move |_: &TcpStream, _| Ok::<_, OriginalDstError>(addr))
}

async fn start(config: Config, lookup: OriginalDstLookup) -> Running {
    let mut proxy = Proxy::bind(config).await.expect("proxy binds");
    proxy.set_original_dst_lookup(lookup);
    let (tx, rx) = oneshot::channel();
    let running = Running {
        outbound: proxy.outbound_addrs()[0],
        admin: proxy.admin_addr().unwrap(),
        stats: proxy.stats(),
        stop: Some(tx),
        serve: tokio::spawn(async move {
            proxy
                .serve(async move {
                    let _ = rx.await;
                })
                .await
                .expect("serves")
        }),
    };
    let admin = running.admin;
    tokio::time::timeout(Duration::from_secs(5), async {
        while http_get(admin, "/ready").await != (200, "ready\n".to_owned()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("/ready turns 200");
    running
}

/// A server that echoes each connection until EOF.
async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Sends `msg` and reads the same bytes back.
async fn echo_once(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .expect("echo within 5 s")
        .expect("echo read");
    assert_eq!(got, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_maximum_are_refused_and_counted_others_served() {
    const MAX: usize = 20;
    let echo = echo_server().await;
    let p = start(
        Config {
            max_connections: MAX,
            ..config()
        },
        to(echo),
    )
    .await;
    let mut open = Vec::new();
    for i in 0..MAX {
        let mut s = TcpStream::connect(p.outbound).await.unwrap();
        echo_once(&mut s, format!("hello {i}").as_bytes()).await;
        open.push(s);
    }
    // Every further connection is accepted by the kernel, then closed by the proxy at once.
    const EXTRA: u64 = 30;
    for _ in 0..EXTRA {
        let outcome = connect_until_closed(p.outbound, Duration::from_secs(5)).await;
        assert!(
            matches!(outcome, Ok(0)) || outcome.is_err(),
            "over the maximum: closed, got {outcome:?}"
        );
    }
    // The open ones are still served.
    for (i, s) in open.iter_mut().enumerate() {
        echo_once(s, format!("still here {i}").as_bytes()).await;
    }
    let snap = p.stats.snapshot();
    assert_eq!(snap.connections_refused_limit, EXTRA);
    assert_eq!(snap.outbound.connections_total, MAX as u64);
    assert_eq!(snap.outbound.connections_active, MAX as u64);
    assert_eq!(snap.accept_errors_resources, 0);
    let (_, json) = http_get(p.admin, "/stats").await;
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["connections_refused_limit"], EXTRA, "{json}");
    let (_, metrics) = http_get(p.admin, "/metrics").await;
    assert!(
        metrics.contains(&format!(
            "interceptor_proxy_refused_connections_total {EXTRA}\n"
        )),
        "{metrics}"
    );
    // A place freed is taken by the next connection.
    drop(open.pop());
    assert!(
        eventually(Duration::from_secs(5), || p
            .stats
            .snapshot()
            .outbound
            .connections_active
            == MAX as u64 - 1)
        .await
    );
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    echo_once(&mut s, b"after a close").await;
    assert_eq!(p.stats.snapshot().connections_refused_limit, EXTRA);
    drop(s);
    drop(open);
    p.stop().await;
}

/// `ss -tno` lines of established TCP sockets whose local (`local = true`) or peer
/// address is `addr`.
fn ss_lines(addr: SocketAddr, local: bool) -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .output()
        .expect("run ss (iproute2)");
    let column = if local { 2 } else { 3 };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().nth(column) == Some(addr.to_string().as_str()))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tcp_connection_is_closed_busy_one_kept_and_both_sides_keepalive() {
    let echo = echo_server().await;
    let p = start(
        Config {
            tcp_idle_timeout: Some(Duration::from_secs(1)),
            ..config()
        },
        to(echo),
    )
    .await;
    let mut idle = TcpStream::connect(p.outbound).await.unwrap();
    echo_once(&mut idle, b"then silence").await;
    let mut busy = TcpStream::connect(p.outbound).await.unwrap();
    echo_once(&mut busy, b"first").await;

    // Keepalive on the proxy's side of the client connection and on its upstream socket:
    // ss shows a keepalive timer on the proxy's sockets (local port = the listener's, and
    // peer port = the echo server's).
    let client_side = ss_lines(p.outbound, true);
    let upstream_side = ss_lines(echo, false);
    assert_eq!(client_side.len(), 2, "{client_side:?}");
    assert_eq!(upstream_side.len(), 2, "{upstream_side:?}");
    for l in client_side.iter().chain(&upstream_side) {
        assert!(l.contains("timer:(keepalive"), "no keepalive: {l}");
    }

    // The busy connection moves a byte every 100 ms for 3 s (three idle periods) and
    // stays; the silent one is closed meanwhile.
    for i in 0..30 {
        echo_once(&mut busy, format!("{i}").as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outcome = read_outcome(&mut idle, Duration::from_secs(10)).await;
    assert!(
        matches!(outcome, Ok(0)),
        "idle connection closed with a FIN: {outcome:?}"
    );
    echo_once(&mut busy, b"still open").await;
    drop(busy);
    p.stop().await;
}

/// A minimal HTTP/1.1 server answering every request `200 ok`.
async fn http_ok_server(l: TcpListener) {
    loop {
        let (mut s, _) = l.accept().await.unwrap();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    buf.drain(..end + 4);
                    let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(r).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_client_is_cut_at_the_header_timeout_while_others_are_served() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = upstream.local_addr().unwrap().port();
    tokio::spawn(http_ok_server(upstream));
    // A routed HTTP service at 127.0.10.1:<port>, its one endpoint the server above.
    let dir = TempDir::new("slowloris");
    let (service, routes) = web_service_routes(&dir.0, port);
    let p = start(
        Config {
            routes: Some(routes),
            http_header_timeout: Duration::from_secs(1),
            ..config()
        },
        to(service),
    )
    .await;

    // The slowloris client: a request line, then one header byte every 100 ms, never the
    // blank line.
    let mut slow = TcpStream::connect(p.outbound).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nX-Slow: ")
        .await
        .unwrap();
    let mut cut = false;
    let mut normal_served = 0;
    for _ in 0..100 {
        // 10 s at most
        if slow.write_all(b"a").await.is_err() {
            cut = true;
            break;
        }
        let mut probe = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = true;
                break;
            }
            Ok(Ok(_)) | Err(_) => {}
        }
        // Meanwhile a normal client is served.
        if normal_served < 3 {
            let mut c = TcpStream::connect(p.outbound).await.unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut resp = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut resp))
                .await
                .expect("normal client answered within 5 s")
                .unwrap();
            let text = String::from_utf8_lossy(&resp);
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            assert!(text.ends_with("ok"), "{text}");
            normal_served += 1;
        }
    }
    assert!(cut, "the slowloris client was never cut");
    assert_eq!(normal_served, 3, "normal clients served while it trickled");
    p.stop().await;
}

/// A scratch directory removed on drop, also when the test panics.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("icpt-t-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A raw HTTP/1.1 request to the admin listener: (status, body).
async fn admin_request(addr: SocketAddr, head: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .expect("admin answered")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_post_needs_a_loopback_host_and_origin() {
    let echo = echo_server().await;
    let p = start(config(), to(echo)).await;
    let post = |host: &str, extra: &str| {
        format!(
            "POST /runtime?destination_stats=on HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    // DNS rebinding: a foreign name resolved to 127.0.0.1.
    let (status, body) = admin_request(p.admin, &post("evil.example", "")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("Host"), "{body}");
    let (status, _) = admin_request(p.admin, &post("evil.example:15000", "")).await;
    assert_eq!(status, 403);
    // Cross-site: the right Host, a foreign Origin.
    let (status, body) = admin_request(
        p.admin,
        &post(&p.admin.to_string(), "Origin: https://evil.example\r\n"),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = admin_request(p.admin, &post("routes.evil.example", "")).await;
    assert_eq!(status, 403);
    assert!(
        !p.stats.destinations.enabled(),
        "refused POSTs changed nothing"
    );
    // GETs are not affected; a POST from the node is.
    assert_eq!(
        admin_request(
            p.admin,
            "GET /ready HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
        )
        .await
        .0,
        200
    );
    let (status, body) = admin_request(p.admin, &post(&p.admin.to_string(), "")).await;
    assert_eq!(status, 200, "{body}");
    assert!(p.stats.destinations.enabled());
    let (status, _) = admin_request(
        p.admin,
        &post("localhost", "Origin: http://localhost:15000\r\n"),
    )
    .await;
    assert_eq!(status, 200);
    p.stop().await;
}

/// Fills every free descriptor number below the highest open one (with /dev/null, held
/// by the returned files), so that new descriptors come above it; returns the next free
/// number. The open-file limit bounds descriptor *numbers*.
fn fill_descriptor_gaps() -> (u64, Vec<std::fs::File>) {
    use std::os::fd::AsRawFd;
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    let mut held = Vec::new();
    loop {
        let f = std::fs::File::open("/dev/null").unwrap();
        let n = f.as_raw_fd() as u64;
        held.push(f);
        if n >= highest {
            return (n + 1, held);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_accept_loop_backs_off_and_resumes() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let echo = echo_server().await;
    let p = start(config(), to(echo)).await;
    // The client socket is made before the limit is lowered, so only the proxy runs short.
    let c = tokio::net::TcpSocket::new_v4().unwrap();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // Let the admin server close the connections of the readiness checks first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // No descriptor number left: the proxy's accept fails with EMFILE.
    let (next, _held) = fill_descriptor_gaps();
    setrlimit(Resource::RLIMIT_NOFILE, next, hard).unwrap();
    let outcome = async {
        // Queued by the kernel (the handshake needs no descriptor); not accepted yet.
        let mut c = c.connect(p.outbound).await?;
        c.write_all(b"queued").await?;
        let mut got = [0u8; 6];
        let early = tokio::time::timeout(Duration::from_secs(1), c.read_exact(&mut got)).await;
        let errors_while_short = p.stats.snapshot().accept_errors_resources;
        // Descriptors again (the limit restored; a close would wake the loop at once):
        // within its back-off the loop accepts and the connection is served.
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
        tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut got))
            .await
            .expect("the queued connection is served once descriptors are free")?;
        Ok::<_, std::io::Error>((early.is_err(), errors_while_short, got))
    }
    .await;
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    let (waited, errors, got) = outcome.expect("client");
    assert!(waited, "the connection had to wait for a descriptor");
    assert_eq!(&got, b"queued");
    // Counted, and backed off: about 10 a second, where a spinning loop makes thousands.
    assert!(
        (1..=50).contains(&errors),
        "accept errors while out of descriptors: {errors}"
    );
    assert_eq!(p.stats.snapshot().connections_refused_limit, 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http_connection_is_closed_at_the_http_idle_timeout() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = upstream.local_addr().unwrap().port();
    tokio::spawn(http_ok_server(upstream));
    let dir = TempDir::new("httpidle");
    let routes = dir.0.join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "serviceEntries:\n- hosts: [web]\n  addresses: [127.0.10.1]\n  ports: [{{number: {port}, name: http, protocol: HTTP}}]\n  endpoints:\n  - {{address: 127.0.0.1}}\n"
        ),
    )
    .unwrap();
    let service: SocketAddr = format!("127.0.10.1:{port}").parse().unwrap();
    let p = start(
        Config {
            routes: Some(routes),
            // The header timeout (which hyper also applies between keep-alive requests)
            // far longer, so that the idle timeout is what closes.
            http_header_timeout: Duration::from_secs(60),
            http_idle_timeout: Some(Duration::from_secs(1)),
            ..config()
        },
        to(service),
    )
    .await;
    let mut c = TcpStream::connect(p.outbound).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("answered")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // Then nothing: the proxy closes the kept-alive connection.
    let outcome = read_outcome(&mut c, Duration::from_secs(20)).await;
    assert!(matches!(outcome, Ok(0)), "closed: {outcome:?}");
    p.stop().await;
}
