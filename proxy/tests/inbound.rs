//! The inbound path without the kernel's sk_lookup program.
//!
//! What sk_lookup does is hand the inbound listener a connection whose local address is
//! the workload's address (e.g. 10.1.0.5:8080), where the workload itself listens. The
//! same situation is built here on loopback: a test listener stands for the workload, a
//! client connects to it, and the accepted socket (local address = the workload's
//! address) is given to the inbound handler as if the inbound listener had accepted it.
//! The handler must then connect to that address, from the inbound source address, and
//! the test listener sees that second connection as the workload would.

mod common;

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use interceptor_proxy::drain::Deadline;
use interceptor_proxy::inbound::Inbound;
use interceptor_proxy::listener::connection_task;
use interceptor_proxy::stats::ConnectErrorKind;
use interceptor_proxy::upstream::{connect_upstream, UpstreamOptions};
use interceptor_proxy::Stats;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const SOURCE4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

fn mark() -> u32 {
    // SO_MARK needs CAP_NET_ADMIN; exercised when we have it, a reported skip otherwise.
    static MARK: std::sync::LazyLock<u32> = std::sync::LazyLock::new(|| {
        if hostops::skip::root("proxy inbound tests: the bypass mark (SO_MARK)") {
            0x539
        } else {
            0
        }
    });
    *MARK
}

fn inbound(stats: &Arc<Stats>, connect_timeout: Duration) -> Arc<Inbound> {
    Arc::new(Inbound {
        // The proxy's own listeners are elsewhere; the test listener is "the workload".
        own_ports: vec![free_port().port()],
        source_v4: SOURCE4,
        source_v6: Ipv6Addr::LOCALHOST,
        bypass_mark: mark(),
        connect_timeout,
        idle_timeout: None,
        stats: stats.clone(),
    })
}

/// Connects a client to `workload` and hands the accepted side to the inbound handler,
/// as the inbound listener would get it from sk_lookup. Returns the client.
async fn steer(
    workload: &TcpListener,
    client_from: Option<IpAddr>,
    ctx: Arc<Inbound>,
) -> (TcpStream, JoinHandle<()>) {
    let addr = workload.local_addr().unwrap();
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4().unwrap()
    } else {
        tokio::net::TcpSocket::new_v6().unwrap()
    };
    if let Some(ip) = client_from {
        sock.bind(SocketAddr::new(ip, 0)).unwrap();
    }
    let client = sock.connect(addr).await.unwrap();
    let (accepted, peer) = workload.accept().await.unwrap();
    let task = tokio::spawn(connection_task(ctx, accepted, peer, Deadline::never()));
    (client, task)
}

/// Echoes one connection until EOF.
async fn echo(mut s: TcpStream) {
    let (mut r, mut w) = s.split();
    tokio::io::copy(&mut r, &mut w).await.unwrap();
    w.shutdown().await.unwrap();
}

async fn send_and_drain(c: TcpStream, payload: Arc<Vec<u8>>) -> (u64, Fnv) {
    let (mut r, mut w) = c.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let got = drain(&mut r).await;
    drop(writer.await.unwrap());
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_to_the_local_address_from_the_inbound_source() {
    let stats = Arc::new(Stats::default());
    let workload = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let orig_dst = workload.local_addr().unwrap();
    let (client, task) = steer(&workload, None, inbound(&stats, Duration::from_secs(2))).await;

    // The proxy's own connection to the workload, from 127.0.0.6.
    let (upstream, from) = tokio::time::timeout(Duration::from_secs(2), workload.accept())
        .await
        .expect("the proxy connects to the original destination")
        .unwrap();
    assert_eq!(
        from.ip(),
        IpAddr::V4(SOURCE4),
        "source address of the forward"
    );
    assert_eq!(upstream.local_addr().unwrap(), orig_dst);
    tokio::spawn(echo(upstream));

    let payload = Arc::new(data(1024 * 1024, 11));
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        send_and_drain(client, payload.clone()),
    )
    .await
    .expect("echo completes");
    assert_eq!(got, (payload.len() as u64, hash(&payload)));
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("connection task ends")
        .unwrap();

    let s = stats.snapshot();
    assert_eq!(
        (
            s.inbound.connections_total,
            s.inbound.connections_active,
            s.inbound.forwarded_total,
            s.inbound.loop_rejected
        ),
        (1, 0, 1, 0)
    );
    assert_eq!(s.inbound.bytes_client_to_upstream, payload.len() as u64);
    assert_eq!(s.inbound.bytes_upstream_to_client, payload.len() as u64);
    assert_eq!(
        s.outbound,
        Default::default(),
        "outbound counters untouched"
    );
}

/// A dual-stack socket reports an IPv4 client's destination as ::ffff:a.b.c.d; the
/// forward must go to the IPv4 address, from the IPv4 inbound source.
#[tokio::test]
async fn ipv4_mapped_destination_is_forwarded_as_ipv4() {
    if !hostops::skip::ipv6("ipv4_mapped_destination_is_forwarded_as_ipv4") {
        return;
    }
    let sock = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    sock.set_only_v6(false).unwrap();
    sock.bind(&"[::]:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.listen(16).unwrap();
    sock.set_nonblocking(true).unwrap();
    let workload = TcpListener::from_std(sock.into()).unwrap();
    let port = workload.local_addr().unwrap().port();

    let stats = Arc::new(Stats::default());
    let ctx = inbound(&stats, Duration::from_secs(2));
    let client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (accepted, peer) = workload.accept().await.unwrap();
    assert_eq!(
        accepted.local_addr().unwrap(),
        format!("[::ffff:127.0.0.1]:{port}").parse().unwrap()
    );
    let task = tokio::spawn(connection_task(ctx, accepted, peer, Deadline::never()));
    let (upstream, from) = tokio::time::timeout(Duration::from_secs(2), workload.accept())
        .await
        .expect("the proxy connects")
        .unwrap();
    assert_eq!(from.ip().to_canonical(), IpAddr::V4(SOURCE4));
    tokio::spawn(echo(upstream));
    let got = send_and_drain(client, Arc::new(b"hello".to_vec())).await;
    assert_eq!(got, (5, hash(b"hello")));
    task.await.unwrap();
    assert_eq!(stats.snapshot().inbound.forwarded_total, 1);
}

#[tokio::test]
async fn upstream_refused_resets_the_client() {
    let stats = Arc::new(Stats::default());
    let workload = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let started = Instant::now();
    // Accept the "steered" connection, then the workload stops listening.
    let addr = workload.local_addr().unwrap();
    let mut client = TcpStream::connect(addr).await.unwrap();
    let (accepted, peer) = workload.accept().await.unwrap();
    drop(workload);
    let task = tokio::spawn(connection_task(
        inbound(&stats, Duration::from_secs(2)),
        accepted,
        peer,
        Deadline::never(),
    ));
    let err = read_outcome(&mut client, Duration::from_secs(2))
        .await
        .expect_err("client gets an RST");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    assert!(started.elapsed() < Duration::from_millis(500));
    task.await.unwrap();
    let s = stats.snapshot().inbound;
    assert_eq!(
        (
            s.upstream_connect_errors_refused,
            s.upstream_connect_errors_timeout,
            s.upstream_connect_errors_other,
            s.forwarded_total,
            s.connections_active
        ),
        (1, 0, 0, 0, 0)
    );
}

#[tokio::test]
async fn upstream_timeout_resets_the_client() {
    // A listener whose accept queue is full drops further SYNs: the connect hangs.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.listen(0).unwrap();
    sock.set_nonblocking(true).unwrap();
    let workload = TcpListener::from_std(sock.into()).unwrap();
    let addr = workload.local_addr().unwrap();
    let mut client = TcpStream::connect(addr).await.unwrap();
    let (accepted, peer) = workload.accept().await.unwrap();
    let mut fillers = Vec::new();
    for _ in 0..2 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(s);
        }
    }
    let stats = Arc::new(Stats::default());
    let started = Instant::now();
    let task = tokio::spawn(connection_task(
        inbound(&stats, Duration::from_millis(300)),
        accepted,
        peer,
        Deadline::never(),
    ));
    let err = read_outcome(&mut client, Duration::from_secs(3))
        .await
        .expect_err("client gets an RST");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    assert!(started.elapsed() >= Duration::from_millis(250));
    task.await.unwrap();
    assert_eq!(stats.snapshot().inbound.upstream_connect_errors_timeout, 1);
    drop(fillers);
}

/// A connection from the proxy's own inbound source that reaches the inbound listener
/// means the interception steered the proxy's forward back: forwarding it again would
/// loop forever. Refused as a loop, like one to the proxy's own port.
#[tokio::test]
async fn connection_from_the_inbound_source_is_a_loop() {
    let stats = Arc::new(Stats::default());
    let workload = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (mut client, task) = steer(
        &workload,
        Some(SOURCE4.into()),
        inbound(&stats, Duration::from_secs(2)),
    )
    .await;
    let outcome = read_outcome(&mut client, Duration::from_secs(2)).await;
    assert!(matches!(outcome, Ok(0)) || outcome.is_err(), "{outcome:?}");
    task.await.unwrap();
    // Nothing reached the workload.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), workload.accept())
            .await
            .is_err()
    );
    let s = stats.snapshot().inbound;
    assert_eq!(
        (s.loop_rejected, s.forwarded_total, s.connections_total),
        (1, 0, 1)
    );

    if hostops::skip::ipv6("connection_from_the_inbound_source_is_a_loop: its IPv6 half") {
        // ::1 is the default IPv6 source, so any ::1 client is "us".
        let workload = TcpListener::bind("[::1]:0").await.unwrap();
        let (mut client, task) =
            steer(&workload, None, inbound(&stats, Duration::from_secs(2))).await;
        let outcome = read_outcome(&mut client, Duration::from_secs(2)).await;
        assert!(matches!(outcome, Ok(0)) || outcome.is_err(), "{outcome:?}");
        task.await.unwrap();
        assert_eq!(stats.snapshot().inbound.loop_rejected, 2);
    }
}

#[tokio::test]
async fn connection_to_an_own_port_is_a_loop() {
    let stats = Arc::new(Stats::default());
    let workload = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ctx = Inbound {
        own_ports: vec![15001, workload.local_addr().unwrap().port(), 15000],
        source_v4: SOURCE4,
        source_v6: Ipv6Addr::LOCALHOST,
        bypass_mark: mark(),
        connect_timeout: Duration::from_secs(2),
        idle_timeout: None,
        stats: stats.clone(),
    };
    let (mut client, task) = steer(&workload, None, Arc::new(ctx)).await;
    let outcome = read_outcome(&mut client, Duration::from_secs(2)).await;
    assert!(matches!(outcome, Ok(0)) || outcome.is_err(), "{outcome:?}");
    task.await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), workload.accept())
            .await
            .is_err(),
        "not forwarded"
    );
    assert_eq!(stats.snapshot().inbound.loop_rejected, 1);
}

#[tokio::test]
async fn connect_upstream_binds_the_source_address() {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dst = server.local_addr().unwrap();
    let opts = UpstreamOptions {
        bypass_mark: mark(),
        source: Some(SOURCE4.into()),
        connect_timeout: Duration::from_secs(2),
        idle_timeout: None,
    };
    // Many at once: the source port is chosen per 4-tuple at connect time.
    let mut streams = Vec::new();
    for _ in 0..20 {
        let s = connect_upstream(dst, &opts).await.expect("connects");
        let (_, peer) = server.accept().await.unwrap();
        assert_eq!(peer.ip(), IpAddr::V4(SOURCE4), "server sees the source");
        assert_eq!(s.local_addr().unwrap(), peer);
        assert!(s.nodelay().unwrap());
        if opts.bypass_mark != 0 {
            assert_eq!(socket2::SockRef::from(&s).mark().unwrap(), 0x539);
        }
        streams.push(s);
    }

    if hostops::skip::ipv6("connect_upstream_binds_the_source_address: its IPv6 half") {
        let server = TcpListener::bind("[::1]:0").await.unwrap();
        let opts = UpstreamOptions {
            source: Some(Ipv6Addr::LOCALHOST.into()),
            ..opts
        };
        let _s = connect_upstream(server.local_addr().unwrap(), &opts)
            .await
            .expect("connects over IPv6");
        let (_, peer) = server.accept().await.unwrap();
        assert_eq!(peer.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
    }

    // Refused and unusable-source errors are classified.
    let (kind, _) = connect_upstream(free_port(), &opts)
        .await
        .expect_err("nothing listens");
    assert_eq!(kind, ConnectErrorKind::Refused);
    let bad = UpstreamOptions {
        source: Some("192.0.2.1".parse().unwrap()), // TEST-NET, not on this host
        ..opts
    };
    let (kind, e) = connect_upstream(dst, &bad)
        .await
        .expect_err("source not local");
    assert_eq!(kind, ConnectErrorKind::Other);
    assert!(
        e.to_string().contains("binding source address 192.0.2.1"),
        "{e}"
    );
}
