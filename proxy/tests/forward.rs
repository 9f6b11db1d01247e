//! The copy loop over real loopback sockets: byte-exact, half-close, reset propagation.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use interceptor_proxy::forward::{forward, ForwardReport, Side};
use interceptor_proxy::DirectionStats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const MB20: usize = 20 * 1024 * 1024;

/// client_app <-> [forward(proxy_client, proxy_upstream)] <-> server_app
async fn setup() -> (
    TcpStream,
    TcpStream,
    JoinHandle<ForwardReport>,
    Arc<DirectionStats>,
) {
    let (client_app, proxy_client) = pair().await;
    let (proxy_upstream, server_app) = pair().await;
    let stats = Arc::new(DirectionStats::default());
    let s = stats.clone();
    let fwd = tokio::spawn(async move { forward(proxy_client, proxy_upstream, &s, None).await });
    (client_app, server_app, fwd, stats)
}

/// Writes `data` then half-closes, while reading the other direction to EOF.
async fn send_and_drain(s: TcpStream, data: Arc<Vec<u8>>) -> (u64, Fnv) {
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        w // keep the socket open until the reader is done
    });
    let got = drain(&mut r).await;
    drop(writer.await.unwrap());
    got
}

async fn finished(fwd: JoinHandle<ForwardReport>) -> ForwardReport {
    tokio::time::timeout(Duration::from_secs(5), fwd)
        .await
        .expect("forward ended")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_mb_each_way_concurrently_byte_exact() {
    let (client_app, server_app, fwd, stats) = setup().await;
    let up = Arc::new(data(MB20, 1));
    let down = Arc::new(data(MB20, 2));
    let (want_up, want_down) = (hash(&up), hash(&down));
    let c = tokio::spawn(send_and_drain(client_app, up));
    let s = tokio::spawn(send_and_drain(server_app, down));
    let (client_got, server_got) = (c.await.unwrap(), s.await.unwrap());
    assert_eq!(
        server_got,
        (MB20 as u64, want_up),
        "client -> upstream bytes differ"
    );
    assert_eq!(
        client_got,
        (MB20 as u64, want_down),
        "upstream -> client bytes differ"
    );
    let report = finished(fwd).await;
    assert!(report.result.is_ok(), "{:?}", report.result);
    assert_eq!(
        (report.client_to_upstream, report.upstream_to_client),
        (MB20 as u64, MB20 as u64)
    );
    let snap = stats.snapshot();
    assert_eq!(
        (snap.bytes_client_to_upstream, snap.bytes_upstream_to_client),
        (MB20 as u64, MB20 as u64)
    );
}

/// `first` sends everything and half-closes; `second` reads to EOF and only then answers
/// with its own data. That works only if the EOF crossed the proxy while the other
/// direction stayed open.
async fn half_close_then_answer(first: TcpStream, second: TcpStream) {
    let a = Arc::new(data(MB20, 3));
    let b = Arc::new(data(MB20, 4));
    let (ha, hb) = (hash(&a), hash(&b));
    let first = tokio::spawn(send_and_drain(first, a));
    let second = tokio::spawn(async move {
        let (mut r, mut w) = second.into_split();
        let got = drain(&mut r).await; // EOF from `first`, forwarded as a half-close
        w.write_all(&b).await.unwrap();
        w.shutdown().await.unwrap();
        got
    });
    assert_eq!(second.await.unwrap(), (MB20 as u64, ha));
    assert_eq!(first.await.unwrap(), (MB20 as u64, hb));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_then_upstream_answers() {
    let (client_app, server_app, fwd, _) = setup().await;
    half_close_then_answer(client_app, server_app).await;
    let report = finished(fwd).await;
    assert!(report.result.is_ok(), "{:?}", report.result);
    assert_eq!(
        (report.client_to_upstream, report.upstream_to_client),
        (MB20 as u64, MB20 as u64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_half_close_then_client_answers() {
    let (client_app, server_app, fwd, _) = setup().await;
    half_close_then_answer(server_app, client_app).await;
    let report = finished(fwd).await;
    assert!(report.result.is_ok(), "{:?}", report.result);
}

#[tokio::test]
async fn idle_connection_stays_open_and_closes_when_both_sides_do() {
    let (mut client_app, mut server_app, fwd, _) = setup().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!fwd.is_finished());
    client_app.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    server_app.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    client_app.shutdown().await.unwrap();
    assert_eq!(
        read_outcome(&mut server_app, Duration::from_secs(2))
            .await
            .unwrap(),
        0,
        "EOF forwarded"
    );
    assert!(!fwd.is_finished(), "one direction still open");
    server_app.write_all(b"bye").await.unwrap();
    server_app.shutdown().await.unwrap();
    let mut got = Vec::new();
    client_app.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"bye");
    let report = finished(fwd).await;
    assert!(report.result.is_ok());
    assert_eq!(
        (report.client_to_upstream, report.upstream_to_client),
        (5, 3)
    );
}

#[tokio::test]
async fn client_reset_resets_upstream() {
    let (mut client_app, mut server_app, fwd, _) = setup().await;
    client_app.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    server_app.read_exact(&mut one).await.unwrap();
    reset(client_app);
    let err = read_outcome(&mut server_app, Duration::from_secs(2))
        .await
        .expect_err("upstream must see a reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    let report = finished(fwd).await;
    assert_eq!(
        report.result.expect_err("forward reports the reset").side,
        Side::Client
    );
}

#[tokio::test]
async fn upstream_reset_resets_client_even_after_half_close() {
    let (mut client_app, server_app, fwd, _) = setup().await;
    client_app.shutdown().await.unwrap(); // client -> upstream done; upstream -> client open
    tokio::time::sleep(Duration::from_millis(50)).await;
    reset(server_app);
    let err = read_outcome(&mut client_app, Duration::from_secs(2))
        .await
        .expect_err("client must see a reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    let report = finished(fwd).await;
    assert_eq!(
        report.result.expect_err("forward reports the reset").side,
        Side::Upstream
    );
}
