//! The Dubbo 2 load of `interceptor-bench routing`: a provider and a pipelining client, run
//! as hidden subcommands in the world's namespace (the client in the workload cgroup).
//! Each request is the same frame (a `sayHello("user-0001")` call to
//! `org.example.Greeter` with an `application` attachment, Hessian 2, as Dubbo clients
//! send it); the provider answers each with the same value and the request's id.
//! Loops are bounded by a deadline and a count.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

const MAX_REQUESTS_PER_CONN: u64 = 50_000_000;

/// A Hessian 2 string of at most 31 ASCII characters.
fn short_string(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() <= 31 && s.is_ascii());
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

fn frame(flags: u8, status: u8, id: u64, body: &[u8]) -> Vec<u8> {
    let mut f = vec![0xda, 0xbb, flags, status];
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// The request frame (id 0; the client sets each one's id).
pub fn request() -> Vec<u8> {
    let mut b = Vec::new();
    for s in [
        "2.0.2",
        "org.example.Greeter",
        "1.0.0",
        "sayHello",
        "Ljava/lang/String;",
        "user-0001",
    ] {
        short_string(&mut b, s);
    }
    b.push(b'H');
    for (k, v) in [
        ("path", "org.example.Greeter"),
        ("interface", "org.example.Greeter"),
        ("version", "1.0.0"),
        ("application", "bench"),
    ] {
        short_string(&mut b, k);
        short_string(&mut b, v);
    }
    b.push(b'Z');
    frame(0xc2, 0, 0, &b)
}

fn read_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<[u8; 16]> {
    let mut head = [0u8; 16];
    s.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[12], head[13], head[14], head[15]]) as usize;
    if head[..2] != [0xda, 0xbb] || len > 1 << 20 {
        return Err(std::io::Error::other("not a Dubbo frame"));
    }
    buf.resize(len, 0);
    s.read_exact(buf)?;
    Ok(head)
}

/// Provider: answers every request with the same value and its id (heartbeats too);
/// exits after `lifetime`.
pub fn server(listen: SocketAddr, lifetime: Duration) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    std::thread::spawn(move || {
        let mut value = vec![0x91]; // RESPONSE_VALUE
        short_string(&mut value, "hello user-0001");
        for s in l.incoming().take(100_000).flatten() {
            let value = value.clone();
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut r = s.try_clone().expect("clone");
                let mut w = s;
                let mut buf = Vec::new();
                while let Ok(head) = read_frame(&mut r, &mut buf) {
                    let id = u64::from_be_bytes(head[4..12].try_into().unwrap());
                    let out = if head[2] & 0x20 != 0 {
                        frame(0x22, 20, id, b"N")
                    } else {
                        frame(0x02, 20, id, &value)
                    };
                    if w.write_all(&out).is_err() {
                        return;
                    }
                }
            });
        }
    });
    std::thread::sleep(lifetime);
    Ok(())
}

/// Client: `conns` connections, each keeping `depth` requests in flight for `duration`;
/// prints the responses counted and any error.
pub fn load(addr: SocketAddr, conns: u32, depth: u32, duration: Duration) -> Result<()> {
    let req = request();
    let deadline = Instant::now() + duration;
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let req = req.clone();
            std::thread::spawn(move || -> Result<(u64, u64)> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut next = 0u64;
                let send = |s: &mut TcpStream, n: &mut u64| -> std::io::Result<()> {
                    let mut f = req.clone();
                    f[4..12].copy_from_slice(&n.to_be_bytes());
                    *n += 1;
                    s.write_all(&f)
                };
                for _ in 0..depth {
                    send(&mut s, &mut next)?;
                }
                let (mut ok, mut bad) = (0u64, 0u64);
                let mut expect = 0u64;
                let mut buf = Vec::new();
                while ok + bad < MAX_REQUESTS_PER_CONN {
                    let head = read_frame(&mut s, &mut buf)?;
                    let id = u64::from_be_bytes(head[4..12].try_into().unwrap());
                    if head[3] == 20 && id == expect {
                        ok += 1;
                    } else {
                        bad += 1;
                    }
                    expect += 1;
                    if Instant::now() >= deadline {
                        break;
                    }
                    send(&mut s, &mut next)?;
                }
                Ok((ok, bad))
            })
        })
        .collect();
    let (mut ok, mut bad) = (0, 0);
    for h in handles {
        match h.join() {
            Ok(Ok((o, b))) => {
                ok += o;
                bad += b;
            }
            Ok(Err(e)) => bail!("connection failed: {e:#}"),
            Err(_) => bail!("client thread panicked"),
        }
    }
    println!("{}", json!({"responses": ok, "bad": bad}));
    Ok(())
}
