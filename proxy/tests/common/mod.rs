//! Helpers shared by the proxy's integration tests. Everything stays on 127.0.0.1 / ::1.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// FNV-1a 64 over a stream of chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// `len` pseudo-random bytes (xorshift64*) from `seed`.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn hash(data: &[u8]) -> Fnv {
    let mut h = Fnv::default();
    h.update(data);
    h
}

/// Reads until EOF, returning (bytes, hash). Panics on error.
pub async fn drain<R: AsyncReadExt + Unpin>(r: &mut R) -> (u64, Fnv) {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut n, mut h) = (0u64, Fnv::default());
    loop {
        let k = r.read(&mut buf).await.expect("read until EOF");
        if k == 0 {
            return (n, h);
        }
        n += k as u64;
        h.update(&buf[..k]);
    }
}

/// A connected loopback pair: (connecting side, accepted side).
pub async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Closes with an RST.
pub fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

/// Reads once with a deadline: Ok(0) = EOF, Err = reset or other error. Panics on timeout.
pub async fn read_outcome(s: &mut TcpStream, within: Duration) -> std::io::Result<usize> {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, s.read(&mut buf))
        .await
        .expect("socket was not closed in time")
}

/// Minimal HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

/// [`http_get`], with an error for a refused, reset or silent connection (for a readiness
/// loop: a connect to a port nobody listens on yet can even succeed, connected to itself).
pub async fn try_http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await??;
    let text = String::from_utf8(raw).expect("utf-8 response");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A child process killed and reaped when dropped, also when the test panics.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `f` every 10 ms until it returns true or `within` passes.
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connects and waits for the proxy to close the connection: Ok(0) = FIN, Err = reset
/// (which may arrive before our connect() has even returned).
pub async fn connect_until_closed(addr: SocketAddr, within: Duration) -> std::io::Result<usize> {
    let mut s = TcpStream::connect(addr).await?;
    read_outcome(&mut s, within).await
}

/// Writes `dir/routes.yaml`: the HTTP service `web` at 127.0.10.1:`port` whose one endpoint
/// is 127.0.0.1 (the same port). Returns the service address and the file.
pub fn web_service_routes(dir: &std::path::Path, port: u16) -> (SocketAddr, std::path::PathBuf) {
    let routes = dir.join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "serviceEntries:\n- hosts: [web]\n  addresses: [127.0.10.1]\n  ports: [{{number: {port}, name: http, protocol: HTTP}}]\n  endpoints:\n  - {{address: 127.0.0.1}}\n"
        ),
    )
    .expect("write the routing file");
    (format!("127.0.10.1:{port}").parse().unwrap(), routes)
}
