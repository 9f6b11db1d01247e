//! The proxy under many idle connections (issue 13, item 3), end to end: the real programs
//! steer a peer namespace's connections (sk_lookup) into the real `interceptor-proxy`
//! binary, started under a 1,024 open-file soft limit and the highest hard limit this
//! machine grants, which must raise its soft limit and serve 10,000 idle connections and
//! one more request. Where the hard limit cannot hold 2 x 10,000 descriptors (20,000 on
//! machines without CAP_SYS_RESOURCE, as here), exactly as many as fit are served, the rest
//! are refused by `--max-connections` (fitted to the limit) and counted, never EMFILE, and
//! a new request is answered as soon as one closes.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use interceptor::{InboundSettings, PinLayout};
use interceptor_tests::{
    proxy_bin, proxy_stats, run_cmd, spawn_in, wait_proxy_ready, NetNs, PinDir, Proc,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const APP4: &str = "10.199.9.1";
const PEER4: &str = "10.199.9.2";
const ADMIN: &str = "127.0.0.1:15000";
/// Idle connections held through the proxy.
const IDLE: usize = 10_000;
/// What the proxy keeps aside from connections (`interceptor_proxy::limits::RESERVED_FDS`).
const RESERVED_FDS: u64 = 256;

/// Raises this process's soft open-file limit to its hard limit (prlimit(1)); returns it.
fn raise_own_nofile() -> u64 {
    let pid = std::process::id();
    let (_, hard) = nofile_of(pid);
    let mut c = std::process::Command::new("prlimit");
    c.args([
        "--pid",
        &pid.to_string(),
        &format!("--nofile={hard}:{hard}"),
    ]);
    let out = run_cmd(&mut c, Duration::from_secs(10)).expect("run prlimit");
    assert!(
        out.status.success(),
        "prlimit --pid {pid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    hard
}

/// The soft and hard "Max open files" of process `pid`.
fn nofile_of(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open-file line in /proc/{pid}/limits: {limits}"));
    let mut nums = line
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok());
    (nums.next().unwrap(), nums.next().unwrap())
}

/// The workload: an asyncio echo server on 0.0.0.0:8080 in its own process (its soft
/// open-file limit raised to its hard one), one coroutine per connection.
const ECHO_APP: &str = r#"
import asyncio, resource
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
async def echo(r, w):
    while True:
        d = await r.read(65536)
        if not d:
            break
        w.write(d)
        await w.drain()
    w.close()
async def main():
    srv = await asyncio.start_server(echo, "0.0.0.0", 8080, backlog=4096, reuse_address=True)
    await srv.serve_forever()
asyncio.run(main())
"#;

/// From inside `ns`: opens `n` connections to `dst`, each exchanging one message, and
/// returns them open (on a runtime that `f` may use further).
fn clients_in<T: Send>(ns: &NetNs, f: impl FnOnce(&tokio::runtime::Runtime) -> T + Send) -> T {
    let path = ns.path().to_owned();
    std::thread::scope(|s| {
        s.spawn(move || {
            interceptor_tests::enter_netns_current_thread(&path).expect("enter the peer");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            f(&rt)
        })
        .join()
        .expect("client thread")
    })
}

async fn echo_once(s: &mut tokio::net::TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg).await?;
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut got))
        .await
        .map_err(|_| std::io::Error::other("no echo within 20 s"))??;
    assert_eq!(got, msg);
    Ok(())
}

#[test]
fn ten_thousand_idle_connections_under_a_1024_soft_limit_all_served() {
    interceptor_tests::register_helper_bins!();
    let hard = raise_own_nofile();
    assert!(
        hard > IDLE as u64 + 512,
        "this test needs a hard open-file limit above {}",
        IDLE + 512
    );
    // Connections the proxy can hold at once: 2 descriptors each after its reserve.
    let capacity = ((hard - RESERVED_FDS) / 2) as usize;
    let ns = NetNs::new("nofile");
    let peer = NetNs::new("nofile-peer");
    ns.link_to(
        "icwl0",
        &[&format!("{APP4}/24")],
        &peer,
        "icpr0",
        &[&format!("{PEER4}/24")],
    );
    let pin = PinDir::new("nofile");
    let app: SocketAddr = format!("{APP4}:8080").parse().unwrap();
    let _app = spawn_in(&ns, None, &["python3", "-c", ECHO_APP]);
    let listening = Instant::now();
    while ns
        .in_ns(|| std::net::TcpStream::connect("127.0.0.1:8080"))
        .is_err()
    {
        assert!(
            listening.elapsed() < Duration::from_secs(10),
            "the echo app did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The proxy under a 1,024 soft limit.
    let bin = proxy_bin();
    let limit = format!("--nofile=1024:{hard}");
    let mut proxy: Proc = spawn_in(
        &ns,
        None,
        &[
            "prlimit",
            &limit,
            bin.to_str().unwrap(),
            "--admin",
            ADMIN,
            "--inbound",
            "0.0.0.0:15006",
            "--workers",
            "2",
        ],
    );
    if let Err(why) = wait_proxy_ready(&ns, &mut proxy, ADMIN, Duration::from_secs(10)) {
        panic!("proxy not ready: {why}\n{}", proxy.stderr());
    }
    assert_eq!(
        nofile_of(proxy.pid()),
        (hard, hard),
        "the proxy raised its soft limit to the hard limit"
    );
    assert!(
        proxy.stderr().contains("open-file limit") && proxy.stderr().contains("soft_before=1024"),
        "the result is logged: {}",
        proxy.stderr()
    );
    let layout = PinLayout::new(pin.path());
    interceptor::attach_inbound(&layout, ns.path(), &InboundSettings::default())
        .unwrap_or_else(|e| panic!("attach --netns: {e}"));
    let regs = interceptor::register(&layout, ns.path(), proxy.pid() as i32)
        .unwrap_or_else(|e| panic!("register: {e}"));
    assert_eq!(regs.len(), 1, "{regs:?}");

    let expect_served = IDLE.min(capacity);
    let (served, failed, after, again) = clients_in(&peer, |rt| {
        rt.block_on(async {
            let started = Instant::now();
            let mut open = Vec::with_capacity(IDLE);
            let mut failed = 0usize;
            // In batches, so the accept queues (1,024) are never the limit.
            for batch in 0..IDLE / 250 {
                let mut set = tokio::task::JoinSet::new();
                for i in 0..250 {
                    let n = batch * 250 + i;
                    set.spawn(async move {
                        let mut s = tokio::net::TcpStream::connect(app).await?;
                        echo_once(&mut s, format!("idle {n}\n").as_bytes()).await?;
                        Ok::<_, std::io::Error>(s)
                    });
                }
                while let Some(r) = set.join_next().await {
                    match r.unwrap() {
                        Ok(s) => open.push(s),
                        Err(_) => failed += 1,
                    }
                }
                assert!(
                    started.elapsed() < Duration::from_secs(240),
                    "bounded: {} connections after 240 s",
                    open.len()
                );
            }
            let served = open.len();
            if served == capacity {
                // At the maximum: a place is freed for the new request.
                drop(open.pop());
                let freed = Instant::now();
                while proxy_active_blocking(&ns) >= capacity as u64 {
                    assert!(
                        freed.elapsed() < Duration::from_secs(10),
                        "the close was not seen"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            // A new connection and request are answered...
            let mut one_more = tokio::net::TcpStream::connect(app).await.unwrap();
            echo_once(&mut one_more, b"one more request\n")
                .await
                .expect("a new connection is served with the others open");
            // ... and the idle ones still are (every 97th, so this stays short).
            let mut again = 0;
            for (i, s) in open.iter_mut().enumerate().step_by(97) {
                echo_once(s, format!("again {i}\n").as_bytes())
                    .await
                    .unwrap();
                again += 1;
            }
            (served, failed, proxy_active_blocking(&ns), again)
        })
    });
    println!(
        "hard open-file limit {hard}: {served} of {IDLE} idle connections served at once, {failed} refused (capacity {capacity})"
    );
    assert_eq!(served, expect_served, "served up to what the limit holds");
    assert_eq!(failed, IDLE - expect_served);
    assert!(again > 100);
    let open_now = if served == capacity {
        served
    } else {
        served + 1
    };
    assert_eq!(after, open_now as u64, "the proxy held them all at once");
    let stats = proxy_stats(&ns, ADMIN);
    assert_eq!(
        stats["connections_refused_limit"],
        (IDLE - expect_served) as u64,
        "{stats}"
    );
    assert_eq!(
        stats["accept_errors_resources"], 0,
        "never out of descriptors: {stats}"
    );
    assert_eq!(
        stats["inbound_forwarded_total"],
        served as u64 + 1,
        "{stats}"
    );
    drop(proxy);
}

/// `inbound_connections_active` of the proxy, from a helper thread in `ns` (the caller
/// sits in the peer namespace).
fn proxy_active_blocking(ns: &NetNs) -> u64 {
    std::thread::scope(|s| {
        s.spawn(|| {
            proxy_stats(ns, ADMIN)["inbound_connections_active"]
                .as_u64()
                .unwrap()
        })
        .join()
        .unwrap()
    })
}
