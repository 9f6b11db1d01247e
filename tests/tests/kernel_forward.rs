//! Kernel forwarding (issue 16): the proxy's opaque connections carried by the sockmap
//! programs (`interceptor-ebpf/src/forward.rs`, `proxy/src/kforward.rs`), end to end: the
//! real programs, the real proxy (`--kernel-forward on`, its default), real sockets, each test
//! in its own namespace, cgroup and pin dir.
//!
//! Each test checks in the proxy's `/runtime` that the kernel carried the bytes
//! (`kernel_forward_bytes`) and that no connection fell back to copying, besides checking the
//! bytes themselves, so a proxy that silently copied would fail them.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use interceptor::{Counter, PinLayout, ScopeSettings, Stats};
use interceptor_common::KFWD_MAX_UNACKED;
use interceptor_tests::{
    chaos::{ChaosReport, ChaosServer},
    context_switches,
    echo::Echo,
    http_get_in, ping_rounds, probe, probe_bin, probe_in, proxy_stats, spawn_in, spawn_pinger,
    start_proxy, wait_until, NetNs, PinDir, ProbeServer, Proc, ScratchDir, TestCgroup,
    DEFAULT_ADMIN,
};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use serde_json::Value;

const SERVER: &str = "127.0.0.1:8080";
const CHAOS: &str = "127.0.0.1:8090";
const ECHO: &str = "127.0.0.1:8091";

/// The least a transfer's armed direction shows carried by the kernel, whatever the timing:
/// once a direction is armed the verdict redirects until its peer is `KFWD_MAX_UNACKED`
/// behind, less what the proxy copied before the arm and the peer has not acknowledged yet
/// (at most the peer's send buffer, 4 MiB, and what is in flight). How much more the kernel
/// carries depends on when the proxy finds the source drained and arms it again (the peer
/// falling behind a fast sender, the kernel's worker behind the sender, the scheduler): 9 %
/// to 96 % of a bulk transfer over this suite's runs (ARCHITECTURE.md item 4), the spread
/// that made the shares these tests once required fail now and then. The share is the
/// benchmark's measure (`kfwd_share_pct` in `cargo xtask bench`), not these tests'.
const KERNEL_FLOOR: u64 = KFWD_MAX_UNACKED / 2;

/// Asserts that the kernel carried at least [`KERNEL_FLOOR`] bytes of `total` (`rt`: the
/// proxy's `/runtime`), and prints its share.
fn assert_kernel_carried(rt: &Value, total: u64, what: &str) {
    let kernel = u(rt, "kernel_forward_bytes");
    println!(
        "{what}: the kernel carried {kernel} of {total} bytes ({} %)",
        kernel * 100 / total.max(1)
    );
    assert!(
        kernel >= KERNEL_FLOOR,
        "{what}: the kernel carried only {kernel} of {total} bytes: {rt}"
    );
}

/// One test's world (fields drop in declaration order: processes, servers, programs,
/// cgroup, namespace).
struct World {
    _proxy: Option<Proc>,
    chaos: Option<ChaosServer>,
    _servers: Vec<ProbeServer>,
    pin: PinDir,
    cg: TestCgroup,
    ns: NetNs,
}

impl World {
    /// The world with the proxy started `--kernel-forward KERNEL_FORWARD` (on or off).
    fn new(test: &str, kernel_forward: &str) -> World {
        World::build(test, kernel_forward, Attach::First)
    }

    /// The world with the proxy started `--kernel-forward on` before the programs are
    /// attached (`attach` attaches them).
    fn proxy_first(test: &str) -> World {
        World::build(test, "on", Attach::AfterProxy)
    }

    /// The world with the programs attached by the `interceptor` CLI on a kernel that refuses
    /// kernel forwarding's verdict (`INTERCEPTOR_TEST_REFUSE_VERDICT=1` makes its attach fail
    /// as a verifier's rejection would), then the proxy started `--kernel-forward on`.
    fn verdict_refused(test: &str) -> World {
        World::build(test, "on", Attach::FirstVerdictRefused)
    }

    fn attach(&self) {
        interceptor::attach(&self.layout(), self.cg.path(), &ScopeSettings::default())
            .unwrap_or_else(|e| panic!("attach: {e}"));
    }

    fn build(test: &str, kernel_forward: &str, attach: Attach) -> World {
        interceptor_tests::register_helper_bins!();
        let ns = NetNs::new(test);
        let cg = TestCgroup::new(test);
        let pin = PinDir::new(test);
        let servers = vec![
            ProbeServer::start_in(ns.path(), &[SERVER.parse().unwrap()]).expect("probe server")
        ];
        let w = World {
            _proxy: None,
            chaos: None,
            _servers: servers,
            pin,
            cg,
            ns,
        };
        // Attach first: the proxy probes kernel forwarding at start.
        match attach {
            Attach::First => w.attach(),
            Attach::AfterProxy => {}
            Attach::FirstVerdictRefused => {
                let out = std::process::Command::new(interceptor_tests::interceptor_bin())
                    .env("INTERCEPTOR_TEST_REFUSE_VERDICT", "1")
                    .arg("--pin-dir")
                    .arg(w.pin.path())
                    .arg("attach")
                    .arg("--cgroup")
                    .arg(w.cg.path())
                    .output()
                    .expect("running interceptor attach");
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(out.status.success(), "attach: {stderr}");
                assert!(
                    stderr.contains("kernel forwarding unavailable"),
                    "attach should say kernel forwarding is unavailable: {stderr}"
                );
            }
        }
        let args = ["--admin", DEFAULT_ADMIN, "--kernel-forward", kernel_forward];
        World {
            _proxy: Some(start_proxy(&w.ns, &args)),
            ..w
        }
    }

    fn layout(&self) -> PinLayout {
        PinLayout::new(self.pin.path())
    }

    fn stats(&self) -> Stats {
        interceptor::stats(&self.layout()).expect("stats")
    }

    fn probe(&self, args: &[&str]) -> Value {
        probe_in(&self.ns, Some(self.cg.path()), None, args)
    }

    /// `n` bytes each way over one connection from the workload's cgroup (the probe's report).
    fn transfer(&self, n: u64) -> Value {
        let n = n.to_string();
        self.probe(&["bulk", SERVER, "--send", &n, "--recv", &n])
    }

    /// A download of `n` bytes (the client sends nothing and shuts its side) with `extra`
    /// probe arguments (`--unchecked`, `--read-after-ms`).
    fn download(&self, n: u64, seed: &str, extra: &[&str]) -> Value {
        let n = n.to_string();
        let mut args = vec!["bulk", SERVER, "--send", "0", "--recv", &n, "--seed", seed];
        args.extend_from_slice(extra);
        self.probe(&args)
    }

    fn runtime(&self) -> Value {
        let addr: SocketAddr = DEFAULT_ADMIN.parse().unwrap();
        let (code, body) =
            http_get_in(&self.ns, addr, "/runtime", Duration::from_secs(5)).expect("GET /runtime");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("JSON")
    }

    /// `/runtime` once `active` connections are left open in the proxy: it counts the
    /// kernel's bytes of a connection when the connection ends there, which can come after
    /// the client has seen its end.
    fn runtime_when_active(&self, active: u64) -> Value {
        assert!(
            wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
                self.stat("connections_active") == active
            }),
            "{} connections open in the proxy, not {active}",
            self.stat("connections_active")
        );
        self.runtime()
    }

    fn stat(&self, name: &str) -> u64 {
        proxy_stats(&self.ns, DEFAULT_ADMIN)[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no {name} in /stats"))
    }

    fn chaos(&mut self) -> &ChaosServer {
        let s = ChaosServer::start_in(&self.ns, CHAOS.parse().unwrap());
        self.chaos.insert(s)
    }
}

/// When the programs are attached relative to the proxy's start.
enum Attach {
    First,
    AfterProxy,
    FirstVerdictRefused,
}

/// Keep-alive pings from the workload to an echo server in its namespace (intercepted
/// outbound): `icpt-probe ping` on `n` connections until [`Pings::finish`].
struct Pings {
    proc: Proc,
    stop: std::path::PathBuf,
    _scratch: ScratchDir,
    _echo: Echo,
}

impl Pings {
    /// `n` connections, a round every `every_ms` (0: back to back).
    fn start(w: &World, test: &str, n: u64, every_ms: u64) -> Pings {
        let echo = Echo::start_in(&w.ns, ECHO.parse().unwrap());
        let scratch = ScratchDir::new(test);
        let stop = scratch.join("ping-stop");
        let proc = spawn_pinger(&w.ns, Some(&w.cg), ECHO, n, every_ms, &stop);
        Pings {
            proc,
            stop,
            _scratch: scratch,
            _echo: echo,
        }
    }

    /// The last `{"round": N}` the probe printed.
    fn rounds(&self) -> u64 {
        ping_rounds(&self.proc)
    }

    /// Waits until the probe has done `n` rounds (panics if it ends or takes a minute).
    fn await_rounds(&mut self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.rounds() < n {
            assert!(
                self.proc.is_running(),
                "the pinger ended: {}{}",
                self.proc.stdout(),
                self.proc.stderr()
            );
            assert!(
                Instant::now() < deadline,
                "{n} ping rounds not done within 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops: each client closes, its EOF reaching the echo server through the proxy,
    /// whose close comes back. Panics if a round failed; the bytes sent (each came back).
    fn finish(mut self) -> u64 {
        std::fs::write(&self.stop, b"").unwrap();
        self.proc
            .wait_timeout(Duration::from_secs(30))
            .expect("the pinger ends");
        let out = self.proc.stdout();
        let last: Value = serde_json::from_str(out.lines().last().unwrap_or("{}")).unwrap();
        assert_eq!(last["errors"].as_array().map(Vec::len), Some(0), "{last}");
        last["bytes"].as_u64().expect("bytes")
    }
}

/// Every chaos connection byte-exact on both sides (`v`: the client's report as printed).
fn assert_chaos_clean(v: &Value, r: &ChaosReport, server_errors: &[String], count: u64) {
    assert_eq!(
        r.failed, 0,
        "client side: {v}; server side: {server_errors:?}"
    );
    assert_eq!(r.ok, count, "{v}");
    assert!(server_errors.is_empty(), "server side: {server_errors:?}");
}

/// The bytes `icpt-probe ping` sends (and gets back) on `conns` connections in `rounds`
/// rounds: `ping {i} {round}\n` each.
fn ping_bytes(conns: u64, rounds: u64) -> u64 {
    (0..rounds)
        .flat_map(|r| (0..conns).map(move |i| format!("ping {i} {r}\n").len() as u64))
        .sum()
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// 100 MiB each way with half-close (the client shuts its side once sent, the server sends
/// its part meanwhile and its trailer after the client's EOF), `n` bytes each way.
fn bulk_each_way(w: &World, n: u64) {
    let s = n.to_string();
    let v = w.probe(&["bulk", SERVER, "--send", &s, "--recv", &s, "--seed", "7"]);
    assert_eq!(v["ok"], true, "bulk transfer: {v}");
    assert_eq!(v["sent"].as_u64(), Some(n));
    assert_eq!(v["received"].as_u64(), Some(n));
    assert_eq!(v["server_rx"].as_u64(), Some(n));
    assert_eq!(w.stats().get(w.cg.id(), Counter::Redirected), 1);
    let rt = w.runtime_when_active(0);
    assert_eq!(rt["kernel_forward"], true, "{rt}");
    assert_eq!(u(&rt, "kernel_forward_connections"), 1, "{rt}");
    assert_eq!(u(&rt, "kernel_forward_fallbacks"), 0, "{rt}");
    // Not all: the proxy copies what arrived before the pair was armed, and a direction's
    // bytes from the moment its peer is `KFWD_MAX_UNACKED` behind (the client checks every byte
    // it reads and falls behind its server; so does the kernel's worker behind a fast sender)
    // until it finds the source drained and arms it again.
    assert_kernel_carried(&rt, 2 * n, "each way");
    // The proxy's byte counters include the kernel's bytes (request line and trailer too).
    let up = w.stat("bytes_client_to_upstream");
    let down = w.stat("bytes_upstream_to_client");
    assert!((n..n + 64).contains(&up), "bytes_client_to_upstream {up}");
    assert!(
        (n..n + 64).contains(&down),
        "bytes_upstream_to_client {down}"
    );
}

/// Bytes that reach the proxy's socket before the proxy accepts it (a busy or paused proxy)
/// wait in TCP's queue, where the kernel's verdict does not see them until the socket is
/// accepted (`sk_psock_verdict_data_ready` needs the socket's `struct socket`), and the
/// proxy reads them from TCP's queue directly: each byte still arrives once, in order.
#[test]
fn kernel_forward_bytes_sent_before_the_accept_arrive_once() {
    let w = World::new("kf-early", "on");
    let proxy = Pid::from_raw(w._proxy.as_ref().expect("proxy").pid() as i32);
    kill(proxy, Signal::SIGSTOP).expect("SIGSTOP the proxy");
    let n = (16u64 << 20).to_string();
    let bulk = std::thread::scope(|s| {
        let t = s.spawn(|| w.probe(&["bulk", SERVER, "--send", &n, "--recv", &n, "--seed", "9"]));
        // Long enough for the client to connect (the kernel completes the handshake) and
        // fill the accepted socket's receive queue.
        std::thread::sleep(Duration::from_millis(500));
        kill(proxy, Signal::SIGCONT).expect("SIGCONT the proxy");
        t.join().expect("bulk thread")
    });
    assert_eq!(bulk["ok"], true, "bulk transfer: {bulk}");
    assert_eq!(bulk["received"].to_string(), n, "{bulk}");
    assert_eq!(bulk["server_rx"].to_string(), n, "{bulk}");
    let rt = w.runtime_when_active(0);
    assert_eq!(u(&rt, "kernel_forward_fallbacks"), 0, "{rt}");
    assert!(u(&rt, "kernel_forward_bytes") > 0, "{rt}");
}

/// The client's FIN reaches the client socket while the server's bytes are still queued for
/// it in the kernel, and the server's trailer follows the proxy's half-close: the two cases
/// that lost bytes before (see ARCHITECTURE.md "Kernel forwarding").
/// Keep-alive connections whose bytes the kernel carries both ways do not wake the proxy
/// for each request: sockmap's reader calls the receiving socket's data-ready callback
/// after every redirect, which through tokio's poller woke a proxy thread for a `read` that
/// found nothing (0.82 per request in the bench). Such a connection is moved to the proxy's
/// watcher (`proxy/src/kwatch.rs`), which waits only for the sockets' ends and errors; its
/// EOFs are still passed on and its bytes still counted when it closes.
#[test]
fn kernel_forward_keep_alive_requests_do_not_wake_the_proxy() {
    const CONNS: u64 = 16;
    const ROUNDS: u64 = 300;
    let w = World::new("kfwd-quiet", "on");
    let mut ping = Pings::start(&w, "kfwd-quiet", CONNS, 0);
    // A few rounds: each connection is armed both ways, then watched 10 ms later.
    ping.await_rounds(20);
    std::thread::sleep(Duration::from_millis(200));
    let rt = w.runtime();
    assert_eq!(u(&rt, "kernel_forward_connections"), CONNS, "{rt}");
    assert_eq!(u(&rt, "kernel_forward_fallbacks"), 0, "{rt}");
    assert!(
        u(&rt, "kernel_forward_watched") >= CONNS,
        "every connection watched: {rt}"
    );
    let proxy = w._proxy.as_ref().expect("the proxy").pid();
    let (rounds_before, switches_before) = (ping.rounds(), context_switches(proxy));
    ping.await_rounds(rounds_before + ROUNDS);
    let (rounds_after, switches_after) = (ping.rounds(), context_switches(proxy));
    let requests = (rounds_after - rounds_before) * CONNS;
    let wakeups = switches_after - switches_before;
    println!("{requests} requests through the kernel woke the proxy's threads {wakeups} times");
    // Polled for reading, it was at least one wake-up per request, in practice.
    assert!(
        wakeups * 20 < requests,
        "{requests} requests woke the proxy's threads {wakeups} times"
    );
    // The byte totals take what the kernel carries while the connections live (every
    // second: `FOLD_EVERY` in proxy/src/forward.rs), not only when they end: within 3 s they
    // hold at least every byte of the rounds done by now, each way.
    let sent = ping_bytes(CONNS, ping.rounds());
    let mut totals = (0, 0);
    let live = wait_until(Duration::from_secs(3), Duration::from_millis(50), || {
        totals = (
            w.stat("bytes_client_to_upstream"),
            w.stat("bytes_upstream_to_client"),
        );
        totals.0 >= sent && totals.1 >= sent
    });
    assert!(
        live,
        "byte totals (to upstream, to client) {totals:?} with {sent} bytes sent each way \
         on connections still open: {}",
        w.runtime()
    );
    // The end: each client closes; its EOF reaches the echo server through the proxy,
    // whose close comes back. Every connection then ends in the proxy, counting the
    // kernel's bytes.
    let bytes = ping.finish();
    let rt = w.runtime_when_active(0);
    assert_eq!(u(&rt, "kernel_forward_uncut_bytes"), 0, "{rt}");
    assert!(u(&rt, "kernel_forward_bytes") > bytes, "{rt}");
    assert_eq!(w.stat("bytes_client_to_upstream"), bytes);
    assert_eq!(w.stat("bytes_upstream_to_client"), bytes);
}

/// A half-closed connection's open direction is carried by the kernel: the client asks for
/// a download and shuts its side at once (as `curl`'s upload-less requests through `nc -N`,
/// or a client that half-closes after its request), and the server streams 1 GiB. The
/// client's socket is armed at its EOF, without which the kernel would not redirect the
/// download to it (a redirect needs both sockets armed with each other) when the EOF came
/// with the request (reproduced first: the proxy copied the whole GiB). The direction that is
/// done leaves nothing to read, so such a connection can be watched with that socket's EOF
/// (already seen) left out of the events that end the watch.
///
/// Until `KFWD_MAX_UNACKED` this test also required the proxy to be woken fewer than 600
/// times for the GiB: the kernel then queued for the client's socket whatever the server
/// sent, faster than the kernel's worker sends it on. Now the bytes beyond the limit go
/// through the proxy, which is polled for them (4,900 to 9,300 wake-ups here), so the
/// wake-ups are printed, not bounded.
#[test]
fn kernel_forward_half_closed_download_is_carried_by_the_kernel() {
    let w = World::new("kf-halfdl", "on");
    let proxy = w._proxy.as_ref().expect("the proxy").pid();
    let n = 1u64 << 30;
    let before = context_switches(proxy);
    // A client that only counts what it reads keeps up with the server (one that checks
    // every byte falls further behind).
    let bulk = w.download(n, "3", &["--unchecked"]);
    let wakeups = context_switches(proxy) - before;
    assert_eq!(bulk["ok"], true, "download: {bulk}");
    assert_eq!(bulk["received"].as_u64(), Some(n), "{bulk}");
    let rt = w.runtime_when_active(0);
    println!("a half-closed 1 GiB download woke the proxy's threads {wakeups} times: {rt}");
    assert_eq!(u(&rt, "kernel_forward_fallbacks"), 0, "{rt}");
    // Armed at all (before the fix: nothing). How much: the kernel's worker falls behind the
    // server now and then, and the proxy copies from then on, possibly to the end (as in
    // `bulk_each_way`): 42 % to 93 % over 7 runs.
    assert_kernel_carried(&rt, n, "a half-closed 1 GiB download");
}

/// A client that reads slower than its server sends (here: not at all for 3 s after its
/// request, then as fast as it can). Sockmap queues the bytes its verdict redirects for the
/// client's socket whatever that socket's backlog, and the server's socket counts them as
/// read, so before the verdict's limit (`KFWD_MAX_UNACKED`) the server sent on at full speed
/// into kernel memory: one such connection held the whole transfer (about 9.6 GB in one
/// upgrade test run, with the whole node's TCP under memory pressure). Now the verdict stops
/// redirecting to a socket that has 16 MiB not acknowledged, the proxy takes the bytes and
/// writes them as the client takes them, and TCP holds the server back as it does with the
/// proxy's own copy.
#[test]
fn kernel_forward_holds_a_fast_server_back_for_a_slow_client() {
    const N: u64 = 512 << 20;
    const PAUSE_MS: u64 = 3000;
    let w = World::new("kf-slow", "on");
    let pause = PAUSE_MS.to_string();
    let before = probe::bulk_bytes_served();
    let (bulk, served) = std::thread::scope(|s| {
        let t = s.spawn(|| w.download(N, "5", &["--read-after-ms", &pause]));
        // Well into the client's pause (the server starts within milliseconds).
        std::thread::sleep(Duration::from_millis(PAUSE_MS - 500));
        let served = probe::bulk_bytes_served() - before;
        (t.join().expect("bulk thread"), served)
    });
    assert_eq!(bulk["ok"], true, "download to a slow client: {bulk}");
    assert_eq!(bulk["received"].as_u64(), Some(N), "{bulk}");
    let rt = w.runtime_when_active(0);
    println!(
        "the server had sent {} MiB of {} MiB while its client read nothing; {rt}",
        served >> 20,
        N >> 20
    );
    assert_eq!(u(&rt, "kernel_forward_fallbacks"), 0, "{rt}");
    assert!(u(&rt, "kernel_forward_bytes") > 0, "{rt}");
    // What the sockets' buffers between hold (the client's receive buffer, the 4 MiB the
    // kernel may have in flight to it, the proxy's sockets, the server's send buffer): tens
    // of MiB. Unbounded, all of it.
    assert!(
        served < 128 << 20,
        "the server sent {} MiB while its client read nothing",
        served >> 20
    );
}

/// A direction the proxy took over because its peer fell behind goes back to the kernel once
/// the peer has caught up: a client that reads nothing for a second after asking for 1 GiB
/// (so the verdict passes the server's bytes beyond `KFWD_MAX_UNACKED` to the proxy, and the
/// server is held back), then reads as fast as it can. The proxy copies what piled up and
/// arms the source again when it finds it drained. Measured: 65 % to 93 % of the GiB carried
/// by the kernel over 8 runs (with the verdict re-arming a caught-up source itself, tried
/// and not kept: 52 % to 81 % over 4; ARCHITECTURE.md).
///
/// Before the pause ends the kernel can have carried at most `KFWD_MAX_UNACKED` plus what
/// the client's receive buffer and the path hold (6 MiB and 4 MiB at most by default): a
/// kernel share above four times the limit was carried after the direction was taken back.
#[test]
fn kernel_forward_takes_a_direction_back_once_its_peer_caught_up() {
    let w = World::new("kf-back", "on");
    let n = 1u64 << 30;
    let bulk = w.download(n, "9", &["--read-after-ms", "1000", "--unchecked"]);
    assert_eq!(bulk["ok"], true, "download: {bulk}");
    assert_eq!(bulk["received"].as_u64(), Some(n), "{bulk}");
    let rt = w.runtime_when_active(0);
    let kernel = u(&rt, "kernel_forward_bytes");
    println!(
        "1 GiB to a client that paused a second: the kernel carried {kernel} bytes ({} %)",
        kernel * 100 / n
    );
    assert_eq!(u(&rt, "kernel_forward_fallbacks"), 0, "{rt}");
    assert!(
        kernel > 4 * KFWD_MAX_UNACKED,
        "the kernel carried {kernel} of {n} bytes: the direction was not taken back: {rt}"
    );
}

/// The programs' in-place upgrade (`interceptor upgrade`) under kernel forwarding (issue 16
/// item 6): the maps are kept and each new verdict replaces the old one on `ICP_FWD`, so the
/// connections armed before go on being carried by the kernel (keep-alive pings that do not
/// wake the proxy, a transfer in flight, byte-exact), and new ones are carried too.
#[test]
fn kernel_forward_goes_on_through_the_programs_in_place_upgrade() {
    const CONNS: u64 = 16;
    let w = World::new("kfwd-upg", "on");
    let mut ping = Pings::start(&w, "kfwd-upg", CONNS, 1);
    ping.await_rounds(20);
    // A transfer sized from a first one alone (3 s of it): in flight through the upgrades.
    let first = w.probe(&["bulk", SERVER, "--send", "268435456", "--recv", "268435456"]);
    assert_eq!(first["ok"], true, "{first}");
    let ms = first["elapsed_ms"].as_u64().unwrap().max(1);
    let size = ((256u64 << 20) * 3_000 / ms)
        .clamp(256 << 20, 64 << 30)
        .to_string();
    let bin = probe_bin();
    let bulk_cmd = [
        bin.to_str().unwrap(),
        "bulk",
        SERVER,
        "--send",
        &size,
        "--recv",
        &size,
    ];
    let mut bulk = spawn_in(&w.ns, Some(&w.cg), &bulk_cmd);
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..3 {
        let up = interceptor::upgrade(&w.layout()).unwrap_or_else(|e| panic!("upgrade {i}: {e}"));
        assert!(up.upgraded() > 0, "upgrade {i}: {up:?}");
        let r = ping.rounds();
        ping.await_rounds(r + 5);
    }
    assert!(
        bulk.is_running(),
        "the transfer ended before the third upgrade: the claim needs it in flight"
    );
    bulk.wait_timeout(Duration::from_secs(300))
        .expect("the transfer ends");
    let r: Value = serde_json::from_str(bulk.stdout().lines().last().unwrap_or("{}")).unwrap();
    assert_eq!(r["ok"], true, "the transfer through three upgrades: {r}");
    // The pings are still carried by the kernel (what it passed would wake the proxy).
    let proxy = w._proxy.as_ref().expect("the proxy").pid();
    let (rounds_before, switches_before) = (ping.rounds(), context_switches(proxy));
    ping.await_rounds(rounds_before + 100);
    let requests = (ping.rounds() - rounds_before) * CONNS;
    let wakeups = context_switches(proxy) - switches_before;
    println!("after the upgrades {requests} requests woke the proxy's threads {wakeups} times");
    assert!(
        wakeups * 10 < requests,
        "{requests} requests woke the proxy {wakeups} times"
    );
    // A new connection is carried by the new programs: its upload (the server only reads
    // and hashes, it keeps up) all but its first bytes; its download only in part, the
    // client checking every byte falls behind the server and the proxy takes the bytes
    // beyond `KFWD_MAX_UNACKED`.
    let carried = u(&w.runtime(), "kernel_forward_bytes");
    let n = 64u64 << 20;
    let v = w.transfer(n);
    assert_eq!(v["ok"], true, "{v}");
    let rt = w.runtime_when_active(CONNS);
    let new = u(&rt, "kernel_forward_bytes") - carried;
    println!(
        "the new programs carried {new} of the new connection's {} bytes",
        2 * n
    );
    assert!(new >= KERNEL_FLOOR, "{rt}");
    ping.finish();
    let rt = w.runtime_when_active(0);
    assert_eq!(u(&rt, "kernel_forward_fallbacks"), 0, "{rt}");
    assert_eq!(u(&rt, "kernel_forward_uncut_bytes"), 0, "{rt}");
}

/// A second loader on the host (another pin dir with its own programs at the cgroup2 root,
/// as while one node agent replaces another, or the bench beside the tests), attached first:
/// its programs answer the proxy's requests first, so the proxy's sockets go into its
/// `ICP_FWD` (a socket takes one verdict: the first loader's insert fails). Then its scope is
/// detached while the traffic flows: the last one, whose detach removes the root programs and
/// maps. Freeing `ICP_FWD` would drop the psock of each socket in it and the bytes queued there
/// (`sk_psock_destroy` purges them), so the detach keeps the root programs and maps while
/// sockets are in it, and says so. Its setsockopt program also refuses each arm the first
/// one takes: the proxy must order its writes after the kernel's bytes all the same. The
/// connections in flight do not lose a byte, nor their counts. (Reproduced first: without
/// the keep the proxy's counts fell short in 6 runs of 6; without the proxy's wait after a
/// refused arm, 2 runs of 4 had a stream whose bytes were overtaken.)
#[test]
fn kernel_forward_stays_byte_exact_when_a_second_loader_comes_and_goes() {
    let cg_b = TestCgroup::new("kf-two-b");
    let pin_b = PinDir::new("kf-two-b");
    interceptor::attach(
        &PinLayout::new(pin_b.path()),
        cg_b.path(),
        &ScopeSettings::default(),
    )
    .unwrap_or_else(|e| panic!("attach of the second loader: {e}"));
    let mut w = World::new("kf-two", "on");
    let count = 300u64;
    w.chaos();
    let bin = probe_bin();
    let n = count.to_string();
    let mut chaos = spawn_in(
        &w.ns,
        Some(&w.cg),
        &[
            bin.to_str().unwrap(),
            "chaos",
            CHAOS,
            "--count",
            &n,
            "--seed",
            "5000",
            "--parallel",
            "4",
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        chaos.is_running(),
        "the traffic ended before the second loader went"
    );
    let layout_b = PinLayout::new(pin_b.path());
    let detached = interceptor::detach(&layout_b, cg_b.path()).expect("detach");
    assert!(!detached.cleaned_up, "{detached:?}");
    assert!(detached.kept_for_kernel_forwarding > 0, "{detached:?}");
    assert!(layout_b.maps_dir().exists());
    chaos
        .wait_timeout(Duration::from_secs(120))
        .expect("the chaos client ends");
    let v: Value = serde_json::from_str(chaos.stdout().lines().last().unwrap_or("{}"))
        .unwrap_or_else(|e| panic!("chaos output {}: {e}", chaos.stdout()));
    let r: ChaosReport = serde_json::from_value(v.clone()).expect("chaos report");
    let srv = w.chaos.as_ref().unwrap().report();
    let rt = w.runtime_when_active(0);
    println!(
        "a second loader came and went: {count} connections, {} bytes up, {} down, {} carried \
         by the kernel, {} fall-backs",
        r.up,
        r.down,
        u(&rt, "kernel_forward_bytes"),
        u(&rt, "kernel_forward_fallbacks")
    );
    assert_chaos_clean(&v, &r, &srv.errors, count);
    assert_eq!(u(&rt, "kernel_forward_uncut_bytes"), 0, "{rt}");
    // The proxy's counts include what the kernel carried (and each `CHAOS <seed>` line: 11
    // bytes for seeds of four digits).
    assert_eq!(w.stat("bytes_client_to_upstream"), r.up + 11 * count);
    assert_eq!(w.stat("bytes_upstream_to_client"), r.down);
    // Once the proxy's connections are closed, a detach of everything finishes.
    drop(w);
    let done = interceptor::detach_all(&layout_b).expect("detach --all");
    assert!(done.cleaned_up, "{done:?}");
    assert!(!layout_b.maps_dir().exists());
}

#[test]
fn kernel_forward_100mb_each_way_byte_exact_with_half_close() {
    let w = World::new("kf-bulk", "on");
    let st = interceptor::status(&w.layout()).expect("status");
    assert!(
        st.kernel_forwarding,
        "status says kernel forwarding is unavailable"
    );
    bulk_each_way(&w, 100 << 20);
}

#[test]
fn kernel_forward_1gib_each_way_byte_exact() {
    let w = World::new("kf-1g", "on");
    bulk_each_way(&w, 1 << 30);
}

/// 900 connections, each with random write sizes (1 byte to 1 MiB), random pauses and a
/// random side shutting down first, 4 at a time: every byte arrives once, in order, both ways.
/// Under this load TCP drops and retransmits segments that then partly overlap bytes already
/// received; the kernel's verdict must cut the overlap (`kernel_forward_trimmed_bytes`, not 0
/// in about one run in five; without the cut, one run in two had a connection with repeated
/// bytes), and none may be left uncut.
#[test]
fn kernel_forward_random_write_sizes_and_shutdowns_byte_exact() {
    let mut w = World::new("kf-chaos", "on");
    let count = 900u64;
    w.chaos();
    let v = w.probe(&[
        "chaos",
        CHAOS,
        "--count",
        &count.to_string(),
        "--seed",
        "1000",
        "--parallel",
        "4",
    ]);
    let r: ChaosReport = serde_json::from_value(v.clone()).expect("chaos report");
    let srv = w.chaos.as_ref().unwrap().report();
    let rt = w.runtime_when_active(0);
    println!(
        "chaos: {count} connections, {} bytes up, {} down, {} carried by the kernel, {} repeated \
         bytes cut by the kernel, {} times a connection was watched",
        r.up,
        r.down,
        u(&rt, "kernel_forward_bytes"),
        u(&rt, "kernel_forward_trimmed_bytes"),
        u(&rt, "kernel_forward_watched")
    );
    assert_chaos_clean(&v, &r, &srv.errors, count);
    assert_eq!(srv.ok, count);
    assert_eq!(u(&rt, "kernel_forward_fallbacks"), 0, "{rt}");
    assert_eq!(u(&rt, "kernel_forward_uncut_bytes"), 0, "{rt}");
    assert_eq!(u(&rt, "kernel_forward_unchecked_segments"), 0, "{rt}");
    // Both directions armed: most connections (one whose exchange ends before its second
    // arm is counted in neither).
    assert!(u(&rt, "kernel_forward_connections") >= count / 2, "{rt}");
    // A real share went through the kernel (the rest the proxy copied while a direction was
    // not armed; how large the share is, is the bench's measure, not this test's).
    assert!(
        u(&rt, "kernel_forward_bytes") > (r.up + r.down) / 4,
        "the kernel carried little of {} bytes: {rt}",
        r.up + r.down
    );
    // The watcher's ends were exercised: connections whose pauses got them watched mid-stream
    // (56 to 72 of 900 in three runs here) had their EOFs and resets seen from it.
    assert!(
        u(&rt, "kernel_forward_watched") > 0,
        "no connection was watched: the watcher's ends are untested here: {rt}"
    );
    // Armed connections, ended by EOFs and resets in every order, leave nothing behind.
    assert_no_entries_left(&w, "the chaos connections");
}

/// 100,000 short connections: each socket goes into the kernel's map at its establishment
/// and most pairs are armed, and nothing is left behind (the chaos test checks the same
/// after its connections' EOFs and resets in every order).
#[test]
fn kernel_forward_100k_short_connections_leave_no_map_entries() {
    let w = World::new("kf-churn", "on");
    let v = w.probe(&["churn", SERVER, "--count", "100000", "--parallel", "4"]);
    assert_eq!(v["ok"], 100_000, "{v}");
    assert_eq!(v["proxied"], 100_000, "{v}");
    let rt = w.runtime();
    assert_eq!(u(&rt, "kernel_forward_fallbacks"), 0, "{rt}");
    // Both directions armed before the exchange ended: most, not all (a HELLO exchange can
    // end before the second arm).
    assert!(u(&rt, "kernel_forward_connections") > 50_000, "{rt}");
    assert_no_entries_left(&w, "100,000 closed connections");
}

/// Waits (10 s at most) for the kernel-forwarding maps to be empty once every connection
/// has closed.
fn assert_no_entries_left(w: &World, what: &str) {
    let mut left = (0, 0);
    let empty =
        interceptor_tests::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            let s = w.stats();
            left = (s.kernel_forward_sockets, s.kernel_forward_sockhash);
            left == (0, 0)
        });
    assert!(
        empty,
        "kernel-forwarding entries left after {what} (state, sockhash): {left:?}"
    );
}

/// Kernel forwarding comes on in a proxy started `--kernel-forward on` before the
/// interceptor's programs were attached (a sidecar that comes up before the node agent
/// attached anything on its node): the kernel did not answer its probe at start, so it asks
/// again at accepts
/// (at most once a second) and, once answered, asks on its listeners; the connection that
/// found it out is copied by the proxy, the next ones are carried by the kernel.
#[test]
fn kernel_forward_comes_on_when_the_programs_come_after_the_proxy() {
    let w = World::proxy_first("kf-late");
    assert_eq!(w.runtime()["kernel_forward"], false, "{}", w.runtime());
    w.attach();
    let mut hellos = 0u64;
    let on = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let v = w.probe(&["hello", SERVER]);
        assert_eq!(v["proxied"], true, "{v}");
        hellos += 1;
        w.runtime()["kernel_forward"] == true
    });
    assert!(
        on,
        "kernel forwarding still off after {hellos} connections: {}",
        w.runtime()
    );
    let n = 16u64 << 20;
    let v = w.transfer(n);
    assert_eq!(v["ok"], true, "bulk transfer: {v}");
    assert_eq!(v["received"].as_u64(), Some(n), "{v}");
    assert_eq!(v["server_rx"].as_u64(), Some(n), "{v}");
    let rt = w.runtime_when_active(0);
    println!("kernel forwarding came on after {hellos} connections: {rt}");
    // The transfer was carried by the kernel (how much of it is the bulk tests' and the
    // bench's measure: a direction can lose the race of its arms throughout).
    assert!(u(&rt, "kernel_forward_connections") >= 1, "{rt}");
    assert!(u(&rt, "kernel_forward_bytes") > 0, "{rt}");
    // At most one fall-back: the connection that found it out, accepted before its listener
    // asked, so its client socket is not in the kernel's map and its arm fails (whether its
    // exchange ended before that arm is a race); every later one is accepted after.
    assert!(u(&rt, "kernel_forward_fallbacks") <= 1, "{rt}");
}

#[test]
fn kernel_forward_off_copies_in_the_proxy() {
    let w = World::new("kf-off", "off");
    let n = 10u64 << 20;
    let s = n.to_string();
    let v = w.probe(&["bulk", SERVER, "--send", &s, "--recv", &s, "--seed", "3"]);
    assert_eq!(v["ok"], true, "bulk transfer: {v}");
    let rt = w.runtime();
    assert_eq!(rt["kernel_forward"], false, "{rt}");
    assert_eq!(u(&rt, "kernel_forward_bytes"), 0, "{rt}");
    assert_eq!(u(&rt, "kernel_forward_connections"), 0, "{rt}");
    assert_eq!(w.stats().kernel_forward_sockets, 0);
}

/// A kernel that refuses kernel forwarding's verdict (a verifier that rejects it): `attach`
/// goes on without it and says so, and the programs must then refuse the proxy's request
/// (`SO_ICP_KFWD`), so that a proxy started `--kernel-forward on` copies every connection
/// itself. Answered, it would put its sockets into `ICP_FWD` with no verdict to carry their
/// bytes and believe the kernel carries them.
#[test]
fn kernel_forward_stays_off_when_the_kernel_refuses_the_verdict() {
    let w = World::verdict_refused("kf-noverdict");
    let st = interceptor::status(&w.layout()).expect("status");
    assert!(
        !st.kernel_forwarding,
        "status says kernel forwarding is ready"
    );
    let rt = w.runtime();
    assert_eq!(rt["kernel_forward"], false, "{rt}");
    let mut pings = Pings::start(&w, "kf-noverdict", 4, 0);
    pings.await_rounds(50);
    let n = 16u64 << 20;
    let s = n.to_string();
    let v = w.probe(&["bulk", SERVER, "--send", &s, "--recv", &s, "--seed", "5"]);
    assert_eq!(v["ok"], true, "bulk transfer: {v}");
    assert_eq!(v["received"].as_u64(), Some(n), "{v}");
    assert_eq!(v["server_rx"].as_u64(), Some(n), "{v}");
    // While the pings' connections are open: none of their sockets went into the map.
    let s = w.stats();
    assert_eq!(
        (s.kernel_forward_sockets, s.kernel_forward_sockhash),
        (0, 0),
        "sockets put into ICP_FWD without a verdict"
    );
    let sent = pings.finish();
    assert!(sent > 0);
    let rt = w.runtime_when_active(0);
    println!("verdict refused: {rt}");
    assert_eq!(rt["kernel_forward"], false, "{rt}");
    assert_eq!(u(&rt, "kernel_forward_connections"), 0, "{rt}");
    assert_eq!(u(&rt, "kernel_forward_fallbacks"), 0, "{rt}");
}

/// A workload cannot put its own sockets into the kernel's forwarding map: the programs take
/// `SO_ICP_KFWD` only on a socket carrying a mark (`SO_MARK` needs `CAP_NET_ADMIN` or
/// `CAP_NET_RAW`, which the proxy has and a workload that could use them would need no
/// trick: a marked socket is not intercepted at all). Taken from anyone, a workload's
/// sockets would fill `ICP_FWD` (131,072 sockets for the whole node) and leave every proxy's
/// connections to be copied, and each of its segments would run the verdict. The proxy's own
/// requests are still taken: its connections are carried after the workload's attempts.
#[test]
fn kernel_forward_is_refused_to_a_workload_socket() {
    const COUNT: u64 = 64;
    let w = World::new("kf-workload", "on");
    let count = COUNT.to_string();
    let v = w.probe(&["escape", "kernel-forward", SERVER, "--count", &count]);
    assert!(v.get("error").is_none(), "escape kernel-forward: {v}");
    assert_eq!(v["held"], COUNT, "{v}");
    assert_eq!(v["outcomes"]["EPERM"], COUNT, "every request refused: {v}");
    assert_eq!(v["in_kernel_map"], 0, "workload sockets in ICP_FWD: {v}");
    let n = 64u64 << 20;
    let t = w.transfer(n);
    assert_eq!(t["ok"], true, "{t}");
    let rt = w.runtime_when_active(0);
    assert_eq!(rt["kernel_forward"], true, "{rt}");
    assert_eq!(u(&rt, "kernel_forward_fallbacks"), 0, "{rt}");
    assert_kernel_carried(&rt, 2 * n, "after the workload's requests");
}
