//! No escape through the kernel's records (issue 13, item 1): connects that fail after the
//! outbound program saw them, 100,000 times from one cgroup, must neither leave records behind
//! nor change how a sibling cgroup is intercepted. Each test: two sibling cgroups attached with
//! the defaults (fail-closed) in one namespace with the proxy; the failing connects from the
//! first; then 1,000 connections from the second, every one proxied (the clients, the proxy's
//! and the kernel's counters agree); and the record map back to its occupancy before.
//!
//! Run as root, one test at a time: `cargo xtask test -- escape`.
use std::time::Duration;

use interceptor::{Counter, PinLayout, ScopeSettings, Stats};
use interceptor_tests::{
    probe_in, proxy_stats, start_proxy, NetNs, PinDir, ProbeServer, Proc, TestCgroup, DEFAULT_ADMIN,
};
use serde_json::Value;

const SERVER: &str = "127.0.0.1:8080";
const FAILING: u64 = 100_000;
const SIBLING: u64 = 1_000;

/// Fields drop in declaration order: processes, programs (pin dir), cgroups, namespace.
struct World {
    proxy: Proc,
    server: ProbeServer,
    pin: PinDir,
    a: TestCgroup,
    b: TestCgroup,
    ns: NetNs,
}

impl World {
    fn new(test: &str) -> World {
        interceptor_tests::register_helper_bins!();
        let ns = NetNs::new(test);
        let a = TestCgroup::new(&format!("{test}-a"));
        let b = TestCgroup::new(&format!("{test}-b"));
        let pin = PinDir::new(test);
        let server = ProbeServer::start_in(ns.path(), &[SERVER.parse().unwrap()])
            .expect("start probe server");
        let proxy = start_proxy(&ns, &["--admin", DEFAULT_ADMIN]);
        let w = World {
            proxy,
            server,
            pin,
            a,
            b,
            ns,
        };
        for cg in [&w.a, &w.b] {
            interceptor::attach(&w.layout(), cg.path(), &ScopeSettings::default())
                .unwrap_or_else(|e| panic!("attach {}: {e}", cg.path().display()));
        }
        w
    }

    fn layout(&self) -> PinLayout {
        PinLayout::new(self.pin.path())
    }

    fn stats(&self) -> Stats {
        interceptor::stats(&self.layout()).expect("stats")
    }

    fn forwarded(&self) -> u64 {
        proxy_stats(&self.ns, DEFAULT_ADMIN)["forwarded_total"]
            .as_u64()
            .expect("proxy /stats forwarded_total")
    }

    fn probe(&self, cg: &TestCgroup, args: &[&str]) -> Value {
        probe_in(&self.ns, Some(cg.path()), None, args)
    }

    /// The failing connects of `kind` from cgroup A; asserts they all failed as `errno`
    /// says (none connected). Returns the probe's report, or `None` when the kernel has no
    /// such socket (reported as skipped).
    fn fail_from_a(&self, kind: &str, errno: &str) -> Option<Value> {
        let count = FAILING.to_string();
        let v = self.probe(&self.a, &["escape", kind, SERVER, "--count", &count]);
        assert!(v.get("error").is_none(), "escape {kind} failed to run: {v}");
        if let Some(why) = v["unsupported"].as_str() {
            hostops::skip::report(&format!("escape::{kind}"), why);
            return None;
        }
        assert_eq!(v["attempts"], FAILING, "{v}");
        assert_eq!(
            v["outcomes"][errno], FAILING,
            "every {kind} connect fails with {errno}: {v}"
        );
        Some(v)
    }

    /// Records the kernel holds in maps with a capacity (those a scope could fill).
    fn occupancy(&self) -> usize {
        self.stats().handoff_records
    }

    /// 1,000 connections from cgroup B, each proxied: the clients saw the proxy, the kernel
    /// redirected and answered each one under B's scope, the proxy forwarded each.
    fn sibling_all_proxied(&self) {
        let before = self.stats();
        let fwd_before = self.forwarded();
        let count = SIBLING.to_string();
        let v = self.probe(
            &self.b,
            &["churn", SERVER, "--count", &count, "--parallel", "4"],
        );
        assert_eq!(v["ok"], SIBLING, "sibling's connections: {v}");
        assert_eq!(
            v["proxied"], SIBLING,
            "every sibling connection proxied: {v}"
        );
        let st = self.stats();
        let grew = |c: Counter| st.get(self.b.id(), c) - before.get(self.b.id(), c);
        assert_eq!(grew(Counter::Redirected), SIBLING, "kernel: redirected");
        assert_eq!(
            grew(Counter::OrigDstAnswered),
            SIBLING,
            "kernel: original destination answered"
        );
        assert_eq!(grew(Counter::RecordFailed), 0, "kernel: record_failed");
        assert_eq!(
            self.forwarded() - fwd_before,
            SIBLING,
            "proxy: forwarded_total"
        );
    }

    /// The record maps return to their occupancy before once the sockets are closed.
    fn occupancy_back_to(&self, before: usize) {
        let mut now = usize::MAX;
        let back = interceptor_tests::wait_until(
            Duration::from_secs(5),
            Duration::from_millis(50),
            || {
                now = self.occupancy();
                now == before
            },
        );
        assert!(
            back,
            "records held: {now}, before the failing connects: {before}"
        );
    }
}

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

fn escape_then_sibling(test: &str, kind: &str, errno: &str, narrow_ports: bool) {
    let mut w = World::new(test);
    let before = w.occupancy();
    let range = w.ns.run_ok(&["cat", PORT_RANGE]);
    if narrow_ports {
        // Four ephemeral ports: four connections to the proxy use them up.
        w.ns.run_ok(&["sh", "-c", &format!("echo 40000 40003 > {PORT_RANGE}")]);
    }
    let report = w.fail_from_a(kind, errno);
    if narrow_ports {
        let range = range.split_whitespace().collect::<Vec<_>>().join(" ");
        w.ns.run_ok(&["sh", "-c", &format!("echo {range} > {PORT_RANGE}")]);
    }
    let Some(report) = report else {
        return;
    };
    eprintln!("{kind}: {report}");
    w.sibling_all_proxied();
    w.occupancy_back_to(before);
    assert!(w.proxy.is_running(), "the proxy is still running");
}

#[test]
fn v6only_mapped_connects_leave_no_record() {
    escape_then_sibling("esc-v6only", "v6only", "ENETUNREACH", false);
}

#[test]
fn port_exhaustion_toward_the_proxy_leaves_no_record() {
    escape_then_sibling("esc-ports", "port-exhaust", "EADDRNOTAVAIL", true);
}

#[test]
fn reuseaddr_tuple_collisions_leave_no_record() {
    escape_then_sibling("esc-reuse", "reuseaddr", "EADDRNOTAVAIL", false);
}

#[test]
fn sctp_stream_sockets_are_not_redirected() {
    let w = World::new("esc-sctp");
    let before = w.occupancy();
    let redirected = w.stats().get(w.a.id(), Counter::Redirected);
    let count = FAILING.to_string();
    let v = w.probe(&w.a, &["escape", "sctp", SERVER, "--count", &count]);
    assert!(v.get("error").is_none(), "escape sctp failed to run: {v}");
    if let Some(why) = v["unsupported"].as_str() {
        hostops::skip::report("escape::sctp_stream_sockets_are_not_redirected", why);
        return;
    }
    assert_eq!(v["attempts"], FAILING, "{v}");
    assert_eq!(
        w.stats().get(w.a.id(), Counter::Redirected),
        redirected,
        "only TCP is redirected: {v}"
    );
    w.sibling_all_proxied();
    w.occupancy_back_to(before);
}

/// `ICP_HANDOFF` full (filled from user space with entries no socket can match: network
/// namespace cookie 0): a redirected connection's hand-off fails, is counted as
/// `handoff_failed` under its scope (shown by `interceptor stats`), and the connection reaches
/// neither the proxy's upstream nor the server directly: the proxy, finding no original
/// destination, closes it. With the filler removed the next connection is proxied.
#[test]
fn handoff_map_full_is_counted_and_never_bypasses() {
    use aya::maps::{HashMap, Map, MapData};
    let w = World::new("esc-handoff");
    let path = w.layout().map("ICP_HANDOFF");
    let data = MapData::from_pin(&path).expect("open the pinned ICP_HANDOFF");
    // Key: TupleKey (48 bytes, netns cookie first); value: OrigDst (32 bytes).
    let mut handoff: HashMap<MapData, [u8; 48], [u8; 32]> =
        HashMap::try_from(Map::HashMap(data)).expect("ICP_HANDOFF is a hash");
    let key = |i: u32| {
        let mut k = [0u8; 48];
        k[8..12].copy_from_slice(&i.to_ne_bytes());
        k
    };
    let mut filled = 0u32;
    while handoff.insert(key(filled), [0u8; 32], 0).is_ok() {
        filled += 1;
        assert!(filled <= 1 << 20, "ICP_HANDOFF never filled up");
    }
    eprintln!("ICP_HANDOFF full after {filled} entries");
    let accepted = w.server.accepted();
    let fwd = w.forwarded();

    let v = w.probe(&w.a, &["hello", SERVER]);
    assert!(
        v.get("error").is_some(),
        "with no record the proxy must not serve the connection: {v}"
    );
    let st = w.stats();
    assert_eq!(
        st.get(w.a.id(), Counter::HandoffFailed),
        1,
        "handoff_failed"
    );
    assert_eq!(st.get(w.a.id(), Counter::Redirected), 1, "redirected");
    assert_eq!(w.forwarded(), fwd, "the proxy forwarded nothing");
    assert_eq!(w.server.accepted(), accepted, "nothing reached the server");
    let (ok, out, _) = {
        let mut c = std::process::Command::new(interceptor_tests::interceptor_bin());
        c.arg("--pin-dir").arg(w.pin.path()).arg("stats");
        let o = interceptor_tests::run_cmd(&mut c, Duration::from_secs(60)).expect("stats");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert!(
        ok && out.lines().any(|l| {
            let mut f = l.split_whitespace();
            f.next() == Some("handoff_failed") && f.next() == Some("1")
        }),
        "`interceptor stats` shows handoff_failed 1: {out}"
    );

    for i in 0..filled {
        handoff.remove(&key(i)).expect("remove filler");
    }
    let v = w.probe(&w.a, &["hello", SERVER]);
    assert_eq!(v["proxied"], true, "with room again: {v}");
    assert_eq!(w.stats().get(w.a.id(), Counter::HandoffFailed), 1);
}

/// No socket storage for a record (the namespace's `net.core.optmem_max` set to 0, which the
/// storage is charged against): the scope's policy decides, counted as `record_failed`. Under
/// `closed` (A) the connect fails with `EPERM` and nothing reaches the server; under `open`
/// (B, re-attached so) it goes direct. Never redirected without a record.
#[test]
fn no_record_storage_follows_the_scopes_policy() {
    let w = World::new("esc-optmem");
    let open = ScopeSettings {
        on_proxy_down: interceptor::ProxyDown::Open,
        ..ScopeSettings::default()
    };
    interceptor::attach(&w.layout(), w.b.path(), &open).expect("re-attach B fail-open");
    const OPTMEM: &str = "/proc/sys/net/core/optmem_max";
    let saved = w.ns.run_ok(&["cat", OPTMEM]);
    w.ns.run_ok(&["sh", "-c", &format!("echo 0 > {OPTMEM}")]);
    let accepted = w.server.accepted();
    let closed = w.probe(&w.a, &["hello", SERVER]);
    let opened = w.probe(&w.b, &["hello", SERVER]);
    w.ns.run_ok(&["sh", "-c", &format!("echo {} > {OPTMEM}", saved.trim())]);

    let err = closed["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("Operation not permitted"),
        "closed: the connect fails with EPERM: {closed}"
    );
    assert_eq!(
        opened["proxied"], false,
        "open: the connect goes direct: {opened}"
    );
    assert_eq!(
        w.server.accepted(),
        accepted + 1,
        "only the open scope's connection reached the server"
    );
    let st = w.stats();
    for cg in [&w.a, &w.b] {
        assert_eq!(st.get(cg.id(), Counter::RecordFailed), 1, "record_failed");
        assert_eq!(st.get(cg.id(), Counter::Redirected), 0, "redirected");
    }
    assert_eq!(w.forwarded(), 0, "the proxy forwarded nothing");

    // With the memory back, both scopes are proxied again.
    for cg in [&w.a, &w.b] {
        let v = w.probe(cg, &["hello", SERVER]);
        assert_eq!(v["proxied"], true, "{v}");
    }
}

/// A stand-in listener on the proxy's outbound port (127.0.0.1:15001) while no proxy runs,
/// started by `uid` (root when `None`). With `mark` it first sets the bypass mark on its
/// socket (`mark=ok`, or `mark=errno N` when it may not); with `then_uid` it drops to that
/// uid once listening. It accepts one connection within 3 s (`accepted` or `none`), asks
/// `SO_ORIGINAL_DST` and `SO_ICP_WORKLOAD` and prints what it got (`orig=IP:PORT` or
/// `orig=errno N`, `workload=PATH` or `workload=errno N`), then `done`.
fn stand_in_listener(w: &World, uid: Option<u32>, mark: bool, then_uid: Option<u32>) -> Proc {
    let script = format!(
        "import os, socket, struct\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         if {mark}:\n    \
             try:\n        \
                 s.setsockopt(socket.SOL_SOCKET, 36, 0x539)\n        \
                 print('mark=ok', flush=True)\n    \
             except OSError as e:\n        \
                 print('mark=errno %d' % e.errno, flush=True)\n\
         s.bind(('127.0.0.1', 15001))\n\
         s.listen(8)\n\
         if {then}:\n    \
             os.setgid({then}); os.setuid({then})\n\
         print('listening', flush=True)\n\
         s.settimeout(3)\n\
         try:\n    \
             c, _ = s.accept()\n\
         except socket.timeout:\n    \
             print('none', flush=True); print('done', flush=True); raise SystemExit(0)\n\
         print('accepted', flush=True)\n\
         try:\n    \
             b = c.getsockopt(socket.SOL_IP, 80, 16)\n    \
             print('orig=%s:%d' % (socket.inet_ntoa(b[4:8]), struct.unpack('!H', b[2:4])[0]), flush=True)\n\
         except OSError as e:\n    \
             print('orig=errno %d' % e.errno, flush=True)\n\
         try:\n    \
             print('workload=%s' % c.getsockopt(socket.SOL_IP, 0x4943, 256).decode(), flush=True)\n\
         except OSError as e:\n    \
             print('workload=errno %d' % e.errno, flush=True)\n\
         c.close()\n\
         print('done', flush=True)\n",
        mark = if mark { "True" } else { "False" },
        then = then_uid.unwrap_or(0),
    );
    let cmd = interceptor_tests::exec_command(
        Some(&w.ns),
        None,
        uid,
        &["/usr/bin/python3", "-c", &script],
    );
    let mut p = Proc::spawn("stand-in-listener", cmd);
    assert!(
        p.wait_for_stdout("listening", Duration::from_secs(10)),
        "stand-in listener did not start: {} {}",
        p.stdout(),
        p.stderr()
    );
    p
}

/// Runs the workload's connect against a stand-in listener; returns the probe's answer and
/// what the listener printed.
fn connect_to_stand_in(w: &World, mut l: Proc) -> (Value, String) {
    let v = w.probe(&w.a, &["hello", SERVER]);
    assert!(
        l.wait_for_stdout("done", Duration::from_secs(10)),
        "the stand-in listener did not finish: {} {}",
        l.stdout(),
        l.stderr()
    );
    let out = l.stdout();
    l.kill();
    (v, out)
}

/// Only the proxy is the proxy (issue 13, item 2). With the proxy stopped, a listener on its
/// outbound port run by `nobody` (which cannot set the bypass mark) gets no connection: the
/// workload's connect fails (`EPERM`, the closed policy), counted as `listener_not_proxy`.
/// The control: the same listener run by root with the bypass mark, as interceptor-proxy's
/// are, gets the connection and is told its original destination and workload.
#[test]
fn a_listener_without_the_bypass_mark_gets_no_redirected_connection() {
    let mut w = World::new("esc-impostor");
    w.proxy.kill();
    let accepted = w.server.accepted();

    let (v, out) = connect_to_stand_in(&w, stand_in_listener(&w, Some(65534), true, None));
    assert!(
        out.contains("mark=errno 1"),
        "nobody may not set the bypass mark: {out}"
    );
    assert!(out.contains("none"), "nobody's listener got nothing: {out}");
    let err = v["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("Operation not permitted"),
        "closed policy: the workload's connect fails with EPERM: {v}"
    );
    let st = w.stats();
    assert_eq!(
        st.get(w.a.id(), Counter::ListenerNotProxy),
        1,
        "listener_not_proxy"
    );
    assert_eq!(st.get(w.a.id(), Counter::Redirected), 0, "redirected");
    assert_eq!(w.server.accepted(), accepted, "nothing went direct");

    let (v, out) = connect_to_stand_in(&w, stand_in_listener(&w, None, true, None));
    assert!(out.contains("mark=ok"), "root sets the mark: {out}");
    assert!(
        out.contains("accepted"),
        "the marked listener is taken for the proxy: {out} {v}"
    );
    assert!(
        out.contains(&format!("orig={SERVER}")),
        "and answered: {out}"
    );
    assert!(
        out.contains(&format!("workload={}", w.a.path().display())),
        "and told the workload: {out}"
    );
    let st = w.stats();
    assert_eq!(
        st.get(w.a.id(), Counter::ListenerNotProxy),
        1,
        "listener_not_proxy"
    );
    assert_eq!(st.get(w.a.id(), Counter::Redirected), 1, "redirected");
}

/// With `--proxy-listener any` (a proxy that cannot mark its listener, e.g. HAProxy) any
/// listener on the port receives the connections, as the security model says; the kernel
/// still tells only root or a bypass uid where they were going. The same holds with the
/// mark for an accepted socket whose process dropped to another uid.
#[test]
fn only_root_or_the_proxy_uid_is_told_the_original_destination() {
    let mut w = World::new("esc-orig-dst");
    w.proxy.kill();
    let any = ScopeSettings {
        proxy_listener: interceptor::ProxyListener::Any,
        ..ScopeSettings::default()
    };
    interceptor::attach(&w.layout(), w.a.path(), &any).expect("re-attach A, any listener");
    let cases = [
        ("root, any listener", None, false, None, true),
        ("nobody, any listener", Some(65534), false, None, false),
        ("root marked, then nobody", None, true, Some(65534), false),
    ];
    for (what, uid, mark, then_uid, answered) in cases {
        let (v, out) = connect_to_stand_in(&w, stand_in_listener(&w, uid, mark, then_uid));
        assert!(
            out.contains("accepted"),
            "{what}: got the connection: {out} {v}"
        );
        if answered {
            assert!(
                out.contains(&format!("orig={SERVER}")),
                "{what}: answered: {out}"
            );
            assert!(
                out.contains(&format!("workload={}", w.a.path().display())),
                "{what}: told the workload: {out}"
            );
        } else {
            assert!(
                out.contains("orig=errno") && out.contains("workload=errno"),
                "{what}: told nothing: {out}"
            );
        }
    }
    let st = w.stats();
    assert_eq!(
        st.get(w.a.id(), Counter::OrigDstNotProxy),
        4,
        "orig_dst_not_proxy: two questions each from the two non-root askers"
    );
    assert_eq!(
        st.get(w.a.id(), Counter::ListenerNotProxy),
        0,
        "listener_not_proxy"
    );
}
