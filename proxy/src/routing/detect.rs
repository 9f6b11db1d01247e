//! What a client speaks, from its first bytes (peeked, never consumed), and the SNI of a
//! TLS ClientHello.

use std::io;
use std::time::Duration;

use rustix::net::RecvFlags;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The protocol a connection's first bytes show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// The HTTP/2 connection preface (prior knowledge: h2c, gRPC).
    Http2,
    /// An HTTP/1.x request line.
    Http1,
    /// A TLS handshake record.
    Tls,
    /// A Dubbo 2 frame (magic 0xdabb).
    Dubbo,
    /// Anything else, or nothing within the detection time (a server-first protocol).
    Opaque,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Classifies `buf`; `None` while it is too short to tell.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    if buf[0] == 0xda {
        return match buf.get(1) {
            None => None,
            Some(0xbb) => Some(Detected::Dubbo),
            Some(_) => Some(Detected::Opaque),
        };
    }
    if buf[0] == 0x16 {
        return Some(if buf.len() >= 3 && buf[1] == 3 {
            Detected::Tls
        } else if buf.len() < 3 {
            return None;
        } else {
            Detected::Opaque
        });
    }
    let prefix_of = |p: &[u8]| p.starts_with(&buf[..buf.len().min(p.len())]);
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    if prefix_of(H2_PREFACE) {
        return None;
    }
    for m in METHODS {
        if buf.len() >= m.len() && buf.starts_with(m) {
            return Some(Detected::Http1);
        }
        if prefix_of(m) {
            return None;
        }
    }
    Some(Detected::Opaque)
}

/// Peeks at the client's first bytes for up to `wait` (the data stays in the socket).
/// Returns what they show and how many bytes were seen. Between peeks it waits for the
/// socket to become readable again (new bytes, EOF or an error), never on a clock: a
/// client that sent part of a preface and went silent costs nothing until it sends more
/// or the time is up.
pub async fn detect(stream: &TcpStream, wait: Duration, buf: &mut [u8]) -> (Detected, usize) {
    let deadline = tokio::time::Instant::now() + wait;
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, peek_more(stream, buf, seen)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return (Detected::Opaque, 0),
            Err(_) => return (Detected::Opaque, seen),
        };
        if n == 0 {
            return (Detected::Opaque, 0);
        }
        if let Some(d) = classify(&buf[..n]) {
            return (d, n);
        }
        if n == buf.len() {
            return (Detected::Opaque, n);
        }
        // Not enough to tell yet: the rest of the first segment is on its way.
        seen = n;
    }
}

/// Peeks until a whole TLS record is there (or `wait` passes) and returns the ClientHello's
/// server name, if any. Waits for readiness between peeks, as [`detect`] does.
pub async fn peek_sni(stream: &TcpStream, wait: Duration) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024 + 5];
    let deadline = tokio::time::Instant::now() + wait;
    let mut seen = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, peek_more(stream, &mut buf, seen))
            .await
            .ok()?
            .ok()?;
        if n >= 5 {
            let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
            if n >= 5 + len || n == buf.len() {
                return client_hello_sni(&buf[..n]);
            }
        }
        if n == 0 || n == buf.len() {
            return None;
        }
        seen = n;
    }
}

/// Peeks into `buf` as soon as more than `seen` bytes are queued, or at EOF (0) or an
/// error. While no more have come it waits for the next readiness event: a peek that
/// finds nothing new counts as "would block", which clears tokio's readiness, so the
/// task sleeps until the kernel reports new data.
async fn peek_more(stream: &TcpStream, buf: &mut [u8], seen: usize) -> io::Result<usize> {
    stream
        .async_io(Interest::READABLE, || {
            let (n, _) =
                rustix::net::recv(stream, &mut *buf, RecvFlags::PEEK | RecvFlags::DONTWAIT)?;
            if n == 0 || n > seen {
                Ok(n)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            }
        })
        .await
}

/// The `server_name` of a ClientHello in its first TLS record (RFC 8446 4.1.2, RFC 6066 3).
pub fn client_hello_sni(rec: &[u8]) -> Option<String> {
    struct R<'a>(&'a [u8]);
    impl<'a> R<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Some(a)
        }
        fn u8(&mut self) -> Option<usize> {
            self.take(1).map(|b| b[0] as usize)
        }
        fn u16(&mut self) -> Option<usize> {
            self.take(2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
        }
        fn u24(&mut self) -> Option<usize> {
            self.take(3)
                .map(|b| ((b[0] as usize) << 16) | ((b[1] as usize) << 8) | b[2] as usize)
        }
    }
    let mut r = R(rec);
    if r.u8()? != 0x16 {
        return None;
    }
    r.take(2)?; // record version
    let len = r.u16()?;
    let mut r = R(r.take(len.min(r.0.len()))?);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = r.u24()?;
    let mut h = R(r.take(len.min(r.0.len()))?);
    h.take(2 + 32)?; // version, random
    let sid = h.u8()?;
    h.take(sid)?;
    let cs = h.u16()?;
    h.take(cs)?;
    let cm = h.u8()?;
    h.take(cm)?;
    let ext_len = h.u16()?;
    let mut e = R(h.take(ext_len)?);
    while !e.0.is_empty() {
        let kind = e.u16()?;
        let len = e.u16()?;
        let mut body = R(e.take(len)?);
        if kind != 0 {
            continue;
        }
        let list = body.u16()?;
        let mut l = R(body.take(list)?);
        while !l.0.is_empty() {
            let name_type = l.u8()?;
            let n = l.u16()?;
            let name = l.take(n)?;
            if name_type == 0 {
                return std::str::from_utf8(name)
                    .ok()
                    .map(|s| s.to_ascii_lowercase());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(&[0x16, 3, 1, 0, 10]), Some(Detected::Tls));
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"HELLO\n"), Some(Detected::Opaque));
        assert_eq!(classify(&[0xda]), None);
        assert_eq!(classify(&[0xda, 0xbb, 0xc2]), Some(Detected::Dubbo));
        assert_eq!(classify(&[0xda, 0xbc]), Some(Detected::Opaque));
    }

    /// A ClientHello with SNI `a.example` (handcrafted, minimal).
    fn hello(name: &str) -> Vec<u8> {
        let mut sni = vec![0u8];
        sni.extend((name.len() as u16).to_be_bytes());
        sni.extend(name.as_bytes());
        let mut list = (sni.len() as u16).to_be_bytes().to_vec();
        list.extend(sni);
        let mut ext = vec![0, 0];
        ext.extend((list.len() as u16).to_be_bytes());
        ext.extend(list);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn reads_sni() {
        assert_eq!(
            client_hello_sni(&hello("A.Example")),
            Some("a.example".into())
        );
        let h = hello("a.example");
        for cut in 0..h.len() {
            // Never panics on truncated input.
            let _ = client_hello_sni(&h[..cut]);
        }
        assert_eq!(client_hello_sni(b"GET / HTTP/1.1"), None);
    }
}
