//! The whole proxy in process, on 127.0.0.1 (and ::1 where available), without the eBPF
//! programs: a plain connection has no original destination; for the forwarding paths the
//! original-destination lookup is replaced by one that names a local test server.

mod common;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use interceptor_proxy::drain::Deadline;
use interceptor_proxy::inbound::Inbound;
use interceptor_proxy::listener::connection_task;
use interceptor_proxy::original_dst::OriginalDstError;
use interceptor_proxy::outbound::{getsockopt_lookup, Outbound};
use interceptor_proxy::{Config, OriginalDstLookup, Proxy, ProxyError, Stats, StatsSnapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Running {
    outbound: Vec<SocketAddr>,
    inbound: Vec<SocketAddr>,
    admin: Option<SocketAddr>,
    stats: Arc<Stats>,
    stop: Option<oneshot::Sender<()>>,
    serve: JoinHandle<StatsSnapshot>,
}

impl Running {
    fn listener(&self) -> SocketAddr {
        self.outbound[0]
    }

    async fn stop(mut self, within: Duration) -> StatsSnapshot {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(within, self.serve)
            .await
            .expect("proxy stopped in time")
            .unwrap()
    }

    async fn stats_json(&self) -> serde_json::Value {
        let (status, body) = http_get(self.admin.expect("admin enabled"), "/stats").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("/stats is JSON")
    }
}

fn config() -> Config {
    Config {
        outbound: vec!["127.0.0.1:0".parse().unwrap()],
        outbound_ipv6_optional: false,
        inbound: vec![],
        inbound_source: "127.0.0.6".parse().unwrap(),
        inbound_source6: std::net::Ipv6Addr::LOCALHOST,
        // SO_MARK needs CAP_NET_ADMIN; exercised when we have it, a reported skip otherwise.
        bypass_mark: if hostops::skip::root("proxy tests: the bypass mark (SO_MARK)") {
            0x539
        } else {
            0
        },
        connect_timeout: Duration::from_secs(2),
        admin: Some("127.0.0.1:0".parse().unwrap()),
        workers: 2,
        log_format: Default::default(),
        drain_timeout: Duration::from_secs(5),
        upgrade_socket: None,
        upgrade: false,
        ..Config::default()
    }
}

fn to(addr: SocketAddr) -> OriginalDstLookup {
    Arc::new(move |_: &TcpStream, _| Ok::<_, OriginalDstError>(addr))
}

async fn start(config: Config, lookup: Option<OriginalDstLookup>) -> Running {
    let mut proxy = Proxy::bind(config).await.expect("proxy binds");
    if let Some(l) = lookup {
        proxy.set_original_dst_lookup(l);
    }
    let (tx, rx) = oneshot::channel();
    let running = Running {
        outbound: proxy.outbound_addrs(),
        inbound: proxy.inbound_addrs(),
        admin: proxy.admin_addr(),
        stats: proxy.stats(),
        stop: Some(tx),
        serve: tokio::spawn(async move {
            proxy
                .serve(async move {
                    let _ = rx.await;
                })
                .await
                .expect("serves without an upgrade error")
        }),
    };
    if let Some(admin) = running.admin {
        let ready = async {
            loop {
                if http_get(admin, "/ready").await == (200, "ready\n".to_owned()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), ready)
            .await
            .expect("/ready turns 200");
    }
    running
}

/// A server that echoes each connection until EOF, then closes.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_connection_is_orig_dst_missing_and_closed() {
    let mut cfg = config();
    let v6 = std::net::TcpListener::bind("[::1]:0").is_ok();
    if v6 {
        cfg.outbound.push("[::1]:0".parse().unwrap());
    }
    let p = start(cfg, None).await;
    let mut expected = 0;
    for &addr in &p.outbound {
        // Not intercepted: getsockopt(SO_ORIGINAL_DST) has nothing to say. The reset may
        // even beat the end of our connect().
        let started = Instant::now();
        let outcome = connect_until_closed(addr, Duration::from_secs(2)).await;
        assert!(
            matches!(outcome, Ok(0)) || outcome.is_err(),
            "{addr}: closed, got {outcome:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        expected += 1;
    }
    assert!(
        eventually(Duration::from_secs(2), || p
            .stats
            .snapshot()
            .outbound
            .connections_active
            == 0)
        .await
    );
    let json = p.stats_json().await;
    assert_eq!(json["orig_dst_missing"], expected, "{json}");
    assert_eq!(json["connections_total"], expected, "{json}");
    assert_eq!(json["connections_active"], 0, "{json}");
    assert_eq!(json["forwarded_total"], 0, "{json}");
    for field in [
        "loop_rejected",
        "upstream_connect_errors_refused",
        "upstream_connect_errors_timeout",
        "upstream_connect_errors_other",
        "bytes_client_to_upstream",
        "bytes_upstream_to_client",
    ] {
        assert_eq!(json[field], 0, "{field} in {json}");
    }
    let (status, metrics) = http_get(p.admin.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(&format!(
            "interceptor_proxy_orig_dst_missing_connections_total {expected}\n"
        )),
        "{metrics}"
    );
    assert_eq!(http_get(p.admin.unwrap(), "/nope").await.0, 404);
    let last = p.stop(Duration::from_secs(5)).await;
    assert_eq!(last.orig_dst_missing, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_to_the_original_destination() {
    let echo = echo_server().await;
    let p = start(config(), Some(to(echo))).await;
    let payload = data(1024 * 1024, 7);
    let c = TcpStream::connect(p.listener()).await.unwrap();
    let got = {
        let payload = Arc::new(payload.clone());
        tokio::time::timeout(Duration::from_secs(10), async {
            let (mut r, mut w) = c.into_split();
            let writer = tokio::spawn(async move {
                w.write_all(&payload).await.unwrap();
                w.shutdown().await.unwrap();
                w
            });
            let got = drain(&mut r).await;
            drop(writer.await.unwrap());
            got
        })
        .await
        .expect("echo completes")
    };
    assert_eq!(got, (payload.len() as u64, hash(&payload)));
    assert!(
        eventually(Duration::from_secs(2), || p
            .stats
            .snapshot()
            .outbound
            .connections_active
            == 0)
        .await
    );
    let s = p.stats.snapshot().outbound;
    assert_eq!((s.connections_total, s.forwarded_total), (1, 1));
    assert_eq!(s.bytes_client_to_upstream, payload.len() as u64);
    assert_eq!(s.bytes_upstream_to_client, payload.len() as u64);
    p.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn upstream_refused_resets_the_client_promptly() {
    let p = start(config(), Some(to(free_port()))).await;
    let started = Instant::now();
    let err = connect_until_closed(p.listener(), Duration::from_secs(2))
        .await
        .expect_err("client gets an RST");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(2), || p
            .stats
            .snapshot()
            .outbound
            .upstream_connect_errors_refused
            == 1)
        .await
    );
    let s = p.stats.snapshot().outbound;
    assert_eq!(
        (
            s.forwarded_total,
            s.upstream_connect_errors_timeout,
            s.upstream_connect_errors_other
        ),
        (0, 0, 0)
    );
    p.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn upstream_timeout_resets_the_client() {
    // A listener whose accept queue is full drops further SYNs: the connect hangs.
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    full.listen(0).unwrap();
    let addr = full.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..2 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(s);
        }
    }
    let mut cfg = config();
    cfg.connect_timeout = Duration::from_millis(300);
    let p = start(cfg, Some(to(addr))).await;
    let started = Instant::now();
    let err = connect_until_closed(p.listener(), Duration::from_secs(3))
        .await
        .expect_err("client gets an RST");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(2), || p
            .stats
            .snapshot()
            .outbound
            .upstream_connect_errors_timeout
            == 1)
        .await
    );
    p.stop(Duration::from_secs(5)).await;
    drop(fillers);
}

#[tokio::test]
async fn destination_that_is_the_listener_itself_is_rejected() {
    let listener_addr = Arc::new(std::sync::OnceLock::<SocketAddr>::new());
    let which = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let lookup: OriginalDstLookup = {
        let (listener_addr, which) = (listener_addr.clone(), which.clone());
        Arc::new(move |_: &TcpStream, _| {
            let l = *listener_addr.get().unwrap();
            // The listener exactly, then another loopback address on its port.
            Ok(
                match which.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                    0 => l,
                    _ => SocketAddr::new("127.0.0.9".parse().unwrap(), l.port()),
                },
            )
        })
    };
    let p = start(config(), Some(lookup)).await;
    listener_addr.set(p.listener()).unwrap();
    for _ in 0..2 {
        let outcome = connect_until_closed(p.listener(), Duration::from_secs(2)).await;
        assert!(
            matches!(outcome, Ok(0)) || outcome.is_err(),
            "closed, got {outcome:?}"
        );
    }
    assert!(
        eventually(Duration::from_secs(2), || p
            .stats
            .snapshot()
            .outbound
            .loop_rejected
            == 2)
        .await
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = p.stats.snapshot().outbound;
    // Had it forwarded, the proxy would have accepted its own connection (total 3+).
    assert_eq!((s.connections_total, s.forwarded_total), (2, 0), "{s:?}");
    assert_eq!(p.stats_json().await["loop_rejected"], 2);
    p.stop(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_drains_open_connections() {
    let echo = echo_server().await;
    let p = start(config(), Some(to(echo))).await;
    let listener = p.listener();
    let admin = p.admin.unwrap();
    let mut c = TcpStream::connect(listener).await.unwrap();
    let mut buf = [0u8; 4];
    c.write_all(b"ping").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();

    let Running { stop, serve, .. } = p;
    stop.unwrap().send(()).unwrap();
    // New connections are refused once the listener is closed... (A probe that gets in
    // before the listener closes may still be accepted and forwarded; count those.)
    let mut probes_connected = 0u64;
    let refused = async {
        loop {
            match TcpStream::connect(listener).await {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
                Ok(_) => probes_connected += 1,
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(2), refused)
        .await
        .expect("listener closed on shutdown");
    assert_eq!(
        http_get(admin, "/ready").await,
        (503, "draining\n".to_owned())
    );
    // ...while the open one keeps working until it ends.
    c.write_all(b"pong").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    assert!(!serve.is_finished());
    c.shutdown().await.unwrap();
    assert_eq!(
        read_outcome(&mut c, Duration::from_secs(2)).await.unwrap(),
        0
    );
    let last = tokio::time::timeout(Duration::from_secs(2), serve)
        .await
        .expect("exits once drained")
        .unwrap();
    assert_eq!(last.outbound.connections_active, 0);
    let forwarded = last.outbound.forwarded_total;
    assert!(
        (1..=1 + probes_connected).contains(&forwarded),
        "forwarded {forwarded}, probes that connected {probes_connected}"
    );
    assert_eq!(last.outbound.bytes_client_to_upstream, 8);
}

#[tokio::test]
async fn drain_timeout_closes_what_is_left() {
    let echo = echo_server().await;
    let mut cfg = config();
    cfg.drain_timeout = Duration::from_millis(300);
    let p = start(cfg, Some(to(echo))).await;
    let mut c = TcpStream::connect(p.listener()).await.unwrap();
    c.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    c.read_exact(&mut buf).await.unwrap();
    let started = Instant::now();
    let last = p.stop(Duration::from_secs(3)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "waited for the drain timeout"
    );
    assert_eq!(last.outbound.connections_active, 0);
    let outcome = read_outcome(&mut c, Duration::from_secs(2)).await;
    assert!(
        matches!(outcome, Ok(0)) || outcome.is_err(),
        "closed, got {outcome:?}"
    );
}

#[tokio::test]
async fn bind_errors_name_the_listener_and_the_cause() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut cfg = config();
    cfg.outbound = vec![addr];
    let err = Proxy::bind(cfg).await.expect_err("port is taken");
    assert!(matches!(err, ProxyError::Bind { .. }));
    assert_eq!(
        err.to_string(),
        format!("outbound listener {addr}: address already in use (is another proxy running?)")
    );
    let mut cfg = config();
    cfg.admin = Some(addr);
    let err = Proxy::bind(cfg)
        .await
        .expect_err("port is taken")
        .to_string();
    assert!(
        err.starts_with(&format!("admin listener {addr}: address already in use")),
        "{err}"
    );
    let mut cfg = config();
    cfg.outbound = vec!["192.0.2.1:15001".parse().unwrap()]; // TEST-NET, not on this host
    let err = Proxy::bind(cfg)
        .await
        .expect_err("address not local")
        .to_string();
    assert!(
        err.contains("not available on this host") && err.contains("--outbound"),
        "{err}"
    );
}

/// Without the kernel's sk_lookup steering, a connection to the inbound listener has the
/// listener's own address as its local address: it must be refused as a loop, never
/// forwarded to the proxy itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_connection_to_its_own_listener_is_a_loop() {
    let mut cfg = config();
    cfg.inbound = vec!["127.0.0.1:0".parse().unwrap()];
    let v6 =
        hostops::skip::ipv6("inbound_connection_to_its_own_listener_is_a_loop: its IPv6 listener");
    if v6 {
        cfg.inbound.push("[::1]:0".parse().unwrap());
    }
    let p = start(cfg, None).await;
    assert_eq!(p.inbound.len(), if v6 { 2 } else { 1 });
    let mut expected = 0u64;
    for &addr in &p.inbound {
        assert_ne!(addr.port(), 0);
        let outcome = connect_until_closed(addr, Duration::from_secs(2)).await;
        assert!(
            matches!(outcome, Ok(0)) || outcome.is_err(),
            "{addr}: closed, got {outcome:?}"
        );
        expected += 1;
    }
    assert!(
        eventually(Duration::from_secs(2), || {
            let s = p.stats.snapshot().inbound;
            s.loop_rejected == expected && s.connections_active == 0
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let json = p.stats_json().await;
    assert_eq!(json["inbound_loop_rejected"], expected, "{json}");
    // Had it forwarded, the proxy would have accepted its own connection too.
    assert_eq!(json["inbound_connections_total"], expected, "{json}");
    assert_eq!(json["inbound_connections_active"], 0, "{json}");
    for field in [
        "inbound_forwarded_total",
        "inbound_upstream_connect_errors_refused",
        "inbound_upstream_connect_errors_timeout",
        "inbound_upstream_connect_errors_other",
        "inbound_bytes_client_to_upstream",
        "inbound_bytes_upstream_to_client",
        // The outbound side saw nothing.
        "connections_total",
        "loop_rejected",
        "orig_dst_missing",
    ] {
        assert_eq!(json[field], 0, "{field} in {json}");
    }
    let (status, metrics) = http_get(p.admin.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        format!(
            "interceptor_proxy_loop_rejected_connections_total{{direction=\"inbound\"}} {expected}\n"
        ),
        format!("interceptor_proxy_connections_total{{direction=\"inbound\"}} {expected}\n"),
        "# TYPE interceptor_proxy_connections_active gauge\n".to_owned(),
        "interceptor_proxy_upstream_to_client_bytes_total{direction=\"inbound\"} 0\n".to_owned(),
        "interceptor_proxy_connections_total{direction=\"outbound\"} 0\n".to_owned(),
    ] {
        assert!(metrics.contains(&line), "{line:?} in {metrics}");
    }
    let last = p.stop(Duration::from_secs(5)).await;
    assert_eq!(last.inbound.loop_rejected, expected);
}

#[tokio::test]
async fn listeners_endpoint_lists_bound_addresses() {
    let mut cfg = config();
    cfg.inbound = vec!["127.0.0.1:0".parse().unwrap()];
    if hostops::skip::ipv6("listeners_endpoint_lists_bound_addresses: its IPv6 listener") {
        cfg.inbound.push("[::1]:0".parse().unwrap());
    }
    let p = start(cfg, None).await;
    let (status, body) = http_get(p.admin.unwrap(), "/listeners").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("/listeners is JSON");
    let strings = |v: &[SocketAddr]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    assert_eq!(
        json["outbound"],
        serde_json::json!(strings(&p.outbound)),
        "{json}"
    );
    assert_eq!(
        json["inbound"],
        serde_json::json!(strings(&p.inbound)),
        "{json}"
    );
    assert_eq!(json.as_object().unwrap().len(), 2, "{json}");
    p.stop(Duration::from_secs(5)).await;

    // No --inbound: an empty list.
    let p = start(config(), None).await;
    let (_, body) = http_get(p.admin.unwrap(), "/listeners").await;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["inbound"], serde_json::json!([]), "{json}");
    assert_eq!(json["outbound"][0], p.outbound[0].to_string(), "{json}");
    p.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn shutdown_closes_inbound_listeners_too() {
    let mut cfg = config();
    cfg.inbound = vec!["127.0.0.1:0".parse().unwrap()];
    let p = start(cfg, None).await;
    let inbound = p.inbound[0];
    let last = p.stop(Duration::from_secs(5)).await;
    assert_eq!(last.inbound.connections_active, 0);
    let err = TcpStream::connect(inbound)
        .await
        .expect_err("inbound listener closed");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn inbound_bind_errors_name_the_listener_and_the_cause() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut cfg = config();
    cfg.inbound = vec![addr];
    let err = Proxy::bind(cfg).await.expect_err("port is taken");
    assert!(matches!(err, ProxyError::Bind { .. }));
    assert_eq!(
        err.to_string(),
        format!("inbound listener {addr}: address already in use (is another proxy running?)")
    );
    let mut cfg = config();
    cfg.inbound = vec!["192.0.2.1:15006".parse().unwrap()]; // TEST-NET, not on this host
    let err = Proxy::bind(cfg)
        .await
        .expect_err("address not local")
        .to_string();
    assert!(
        err.starts_with("inbound listener 192.0.2.1:15006: address not available")
            && err.contains("--inbound ADDR"),
        "{err}"
    );
}

/// Every open connection costs one of these futures (plus its two sockets); keep it small,
/// in both directions.
#[tokio::test]
async fn connection_future_is_small() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let accepted = || async {
        let _c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        l.accept().await.unwrap()
    };
    let stats = Arc::new(Stats::default());
    let (s, peer) = accepted().await;
    let outbound = Arc::new(Outbound {
        listeners: vec![],
        bypass_mark: 0,
        connect_timeout: Duration::from_secs(1),
        idle_timeout: None,
        stats: stats.clone(),
        lookup: getsockopt_lookup(),
        routes: None,
    });
    let task = connection_task(outbound, s, peer, Deadline::never());
    let outbound_size = std::mem::size_of_val(&task);
    let (s, peer) = accepted().await;
    let inbound = Arc::new(Inbound {
        own_ports: vec![],
        source_v4: "127.0.0.6".parse().unwrap(),
        source_v6: std::net::Ipv6Addr::LOCALHOST,
        bypass_mark: 0,
        connect_timeout: Duration::from_secs(1),
        idle_timeout: None,
        stats,
    });
    let task = connection_task(inbound, s, peer, Deadline::never());
    let inbound_size = std::mem::size_of_val(&task);
    println!(
        "connection task future: outbound {outbound_size} bytes, inbound {inbound_size} bytes"
    );
    assert!(
        outbound_size < 1024,
        "outbound connection task future is {outbound_size} bytes"
    );
    assert!(
        inbound_size < 1024,
        "inbound connection task future is {inbound_size} bytes"
    );
}
