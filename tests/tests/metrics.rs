//! Metrics end to end: the proxy's `/metrics` read with a real OpenMetrics parser after
//! real intercepted traffic; per-destination stats switched on and off at run time under
//! traffic, their cap and their eviction; the kernel counters in Prometheus form.
//!
//! Run as root, one test at a time: `cargo xtask test -- metrics`.
use std::time::Duration;

use interceptor::{Counter, PinLayout, ScopeSettings};
use interceptor_tests::openmetrics::{parse_openmetrics, samples, sum, Sample};
use interceptor_tests::{
    exec_command, interceptor_bin, probe_bin, run_cmd, spawn_in, start_proxy, wait_until, NetNs,
    PinDir, ProbeServer, Proc, TestCgroup,
};
use serde_json::Value;

const ADMIN: &str = "127.0.0.1:15000";

/// Fields drop in declaration order: processes, programs, cgroup, namespace.
struct World {
    proxy: Option<Proc>,
    _server: ProbeServer,
    pin: PinDir,
    cg: TestCgroup,
    ns: NetNs,
}

impl World {
    fn new(test: &str, proxy_args: &[&str]) -> World {
        interceptor_tests::register_helper_bins!();
        let ns = NetNs::new(test);
        let cg = TestCgroup::new(test);
        let pin = PinDir::new(test);
        // Bound to 0.0.0.0: answers on every 127.x.y.z of the namespace.
        let server =
            ProbeServer::start_in(ns.path(), &["0.0.0.0:8080".parse().unwrap()]).expect("server");
        interceptor::attach(
            &PinLayout::new(pin.path()),
            cg.path(),
            &ScopeSettings::default(),
        )
        .unwrap_or_else(|e| panic!("attach: {e}"));
        let mut args = vec!["--admin", ADMIN];
        args.extend_from_slice(proxy_args);
        let proxy = Some(start_proxy(&ns, &args));
        World {
            proxy,
            _server: server,
            pin,
            cg,
            ns,
        }
    }

    fn layout(&self) -> PinLayout {
        PinLayout::new(self.pin.path())
    }

    fn curl(&self, args: &[&str]) -> String {
        let mut cmd = vec!["curl", "-sS", "--fail-with-body", "--max-time", "10"];
        cmd.extend_from_slice(args);
        self.ns.run_ok(&cmd)
    }

    fn metrics_text(&self) -> String {
        self.curl(&[&format!("http://{ADMIN}/metrics")])
    }

    fn metrics(&self) -> Vec<Sample> {
        let text = self.metrics_text();
        parse_openmetrics(&text).unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"))
    }

    fn runtime(&self, setting: Option<&str>) -> Value {
        let out = match setting {
            Some(q) => self.curl(&["-X", "POST", &format!("http://{ADMIN}/runtime?{q}")]),
            None => self.curl(&[&format!("http://{ADMIN}/runtime")]),
        };
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("/runtime: {e}: {out}"))
    }

    /// `icpt-probe churn` from the workload, to SPREAD addresses from `first`.
    fn churn(&self, first: &str, spread: u32, bound: &[&str]) -> Vec<String> {
        let mut cmd = vec![
            probe_bin().to_str().unwrap().to_owned(),
            "churn".into(),
            format!("{first}:8080"),
            "--spread".into(),
            spread.to_string(),
        ];
        cmd.extend(bound.iter().map(|s| s.to_string()));
        cmd
    }

    fn run_churn(&self, first: &str, spread: u32, count: u64) -> Value {
        let cmd = self.churn(
            first,
            spread,
            &["--count", &count.to_string(), "--parallel", "4"],
        );
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let mut c = exec_command(Some(&self.ns), Some(&self.cg), None, &cmd);
        let out = run_cmd(&mut c, Duration::from_secs(120)).expect("churn runs");
        let v: Value = serde_json::from_slice(&out.stdout).expect("churn JSON");
        assert_eq!(v["failed"], 0, "{v}");
        assert_eq!(v["ok"], count, "{v}");
        v
    }
}

fn one(all: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let s = samples(all, name, labels);
    assert_eq!(s.len(), 1, "{name} {labels:?}: {s:?}");
    s[0].value
}

fn destination_series(all: &[Sample]) -> Vec<&Sample> {
    samples(all, "interceptor_proxy_destination_connections_total", &[])
}

#[test]
fn metrics_parse_and_match_what_the_clients_did() {
    let w = World::new("met-totals", &["--destination-stats", "on"]);
    // 200 connections over 20 destinations, 127.0.1.1 to 127.0.1.20: 10 each.
    w.run_churn("127.0.1.1", 20, 200);
    let m = w.metrics();
    let out = [("direction", "outbound")];
    assert_eq!(one(&m, "interceptor_proxy_connections_total", &out), 200.0);
    assert_eq!(
        interceptor::stats(&w.layout())
            .unwrap()
            .get(w.cg.id(), Counter::Redirected),
        200
    );
    assert_eq!(
        one(&m, "interceptor_proxy_forwarded_connections_total", &out),
        200.0
    );
    assert_eq!(one(&m, "interceptor_proxy_connections_active", &out), 0.0);
    assert_eq!(
        one(
            &m,
            "interceptor_proxy_connections_total",
            &[("direction", "inbound")]
        ),
        0.0
    );
    // Zero errors, read from a family that is there (a missing family also sums to 0).
    let errors = samples(&m, "interceptor_proxy_upstream_connect_errors_total", &[]);
    assert!(!errors.is_empty(), "the connect-error family is exposed");
    assert!(errors.iter().all(|s| s.value == 0.0), "{errors:?}");
    // Histograms: one observation per forwarded connection, cumulative buckets.
    for h in [
        "interceptor_proxy_upstream_connect_duration_seconds",
        "interceptor_proxy_connection_duration_seconds",
    ] {
        assert_eq!(one(&m, &format!("{h}_count"), &out), 200.0, "{h}");
        let inf = [("direction", "outbound"), ("le", "+Inf")];
        assert_eq!(one(&m, &format!("{h}_bucket"), &inf), 200.0, "{h}");
        assert!(one(&m, &format!("{h}_sum"), &out) > 0.0);
    }
    // "HELLO\n" is 6 bytes up per connection.
    let up = one(&m, "interceptor_proxy_client_to_upstream_bytes_total", &out);
    let down = one(&m, "interceptor_proxy_upstream_to_client_bytes_total", &out);
    assert_eq!(up, 1200.0);
    assert!(down > 0.0);

    // Per destination: each of the 20 saw 10 connections; the sums equal the totals.
    for i in 1..=20 {
        let dst = format!("127.0.1.{i}:8080");
        let l = [("direction", "outbound"), ("destination", dst.as_str())];
        assert_eq!(
            one(&m, "interceptor_proxy_destination_connections_total", &l),
            10.0,
            "{dst}"
        );
    }
    let other = [("direction", "outbound"), ("destination", "other")];
    assert_eq!(
        one(
            &m,
            "interceptor_proxy_destination_connections_total",
            &other
        ),
        0.0
    );
    assert_eq!(
        destination_series(&m).len(),
        20 + 2,
        "20 destinations + other per direction"
    );
    assert_eq!(one(&m, "interceptor_proxy_destination_series", &[]), 20.0);
    assert_eq!(
        sum(
            &m,
            "interceptor_proxy_destination_client_to_upstream_bytes_total",
            &out
        ),
        up
    );
    assert_eq!(
        sum(
            &m,
            "interceptor_proxy_destination_upstream_to_client_bytes_total",
            &out
        ),
        down
    );
    // /stats says the same; /config shows the running settings.
    let stats: Value = serde_json::from_str(&w.curl(&[&format!("http://{ADMIN}/stats")])).unwrap();
    assert_eq!(stats["connections_total"], 200);
    assert_eq!(stats["bytes_client_to_upstream"], 1200);
    let config: Value =
        serde_json::from_str(&w.curl(&[&format!("http://{ADMIN}/config")])).unwrap();
    assert_eq!(config["destination_stats"], true);
    assert_eq!(config["destination_stats_cap"], 10000);

    // The kernel's side, from `interceptor stats --prometheus`: the same 200.
    let out = std::process::Command::new(interceptor_bin())
        .args(["--pin-dir", w.pin.as_str(), "stats", "--prometheus"])
        .output()
        .expect("run interceptor stats");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let k = parse_openmetrics(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let scope = w.cg.id().to_string();
    let mine = |decision: &str| {
        one(
            &k,
            "interceptor_decisions_total",
            &[
                ("kind", "outbound"),
                ("scope", scope.as_str()),
                ("decision", decision),
            ],
        )
    };
    assert_eq!(mine("redirected"), 200.0);
    assert_eq!(mine("orig_dst_answered"), 200.0);
    assert_eq!(mine("record_failed"), 0.0);
    assert_eq!(one(&k, "interceptor_records", &[("state", "handoff")]), 0.0);
}

#[test]
fn destination_stats_switch_cap_and_eviction_under_traffic() {
    let w = World::new(
        "met-switch",
        &[
            "--destination-stats-cap",
            "10",
            "--destination-stats-idle",
            "2s",
        ],
    );
    // 50 destinations in turn, for 10 s, while the switch is flipped.
    let cmd = w.churn("127.0.2.1", 50, &["--for-ms", "10000", "--parallel", "2"]);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let mut churn = spawn_in(&w.ns, Some(&w.cg), &cmd);
    std::thread::sleep(Duration::from_millis(500));

    // Off by default: no destination family at all.
    assert_eq!(w.runtime(None)["destination_stats"], false);
    let m = w.metrics();
    assert!(destination_series(&m).is_empty());
    assert!(
        one(
            &m,
            "interceptor_proxy_connections_total",
            &[("direction", "outbound")]
        ) > 0.0
    );

    // On: the cap holds at 10 destinations; the other 40 count as `other`.
    let r = w.runtime(Some("destination_stats=on"));
    assert_eq!(r["destination_stats"], true);
    std::thread::sleep(Duration::from_millis(1000));
    let m = w.metrics();
    let named: Vec<_> = destination_series(&m)
        .into_iter()
        .filter(|s| s.labels["destination"] != "other")
        .collect();
    assert_eq!(named.len(), 10, "cap of 10: {named:?}");
    assert!(
        one(
            &m,
            "interceptor_proxy_destination_connections_total",
            &[("direction", "outbound"), ("destination", "other")]
        ) > 0.0
    );
    assert_eq!(w.runtime(None)["destination_series"], 30);

    // Off under traffic: the whole family goes.
    assert_eq!(
        w.runtime(Some("destination_stats=off"))["destination_series"],
        0
    );
    std::thread::sleep(Duration::from_millis(300));
    let m = w.metrics();
    assert!(destination_series(&m).is_empty());
    assert!(samples(
        &m,
        "interceptor_proxy_destination_client_to_upstream_bytes_total",
        &[]
    )
    .is_empty());

    // On again: a fresh family, capped again.
    w.runtime(Some("destination_stats=on"));
    std::thread::sleep(Duration::from_millis(500));
    let m = w.metrics();
    let named = destination_series(&m)
        .into_iter()
        .filter(|s| s.labels["destination"] != "other")
        .count();
    assert_eq!(named, 10);

    assert!(
        churn.wait_timeout(Duration::from_secs(60)).is_some(),
        "churn ends"
    );
    let report: Value = serde_json::from_str(churn.stdout().lines().last().unwrap()).unwrap();
    assert_eq!(
        report["failed"], 0,
        "no client error while switching: {report}"
    );
    assert_eq!(report["ok"], report["proxied"], "{report}");

    // Idle for 2 s: every destination moves to `other`; the family's sums do not change.
    let before = w.metrics();
    let total_before = sum(
        &before,
        "interceptor_proxy_destination_connections_total",
        &[],
    );
    assert!(
        wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
            w.runtime(None)["destination_series"] == 0
        }),
        "idle destinations were not evicted"
    );
    let after = w.metrics();
    assert_eq!(
        destination_series(&after).len(),
        2,
        "only the two other series remain"
    );
    assert!(one(&after, "interceptor_proxy_destination_evicted_total", &[]) >= 10.0);
    assert_eq!(
        sum(
            &after,
            "interceptor_proxy_destination_connections_total",
            &[]
        ),
        total_before,
        "eviction keeps the family's total"
    );
    println!(
        "switch test: {} connections, {} counted per destination since the last switch-on",
        report["ok"], total_before
    );
    drop(w.proxy);
}

/// `interceptor logs` for `secs` seconds while `during` runs; its output.
fn kernel_log_lines(w: &World, secs: u64, during: impl FnOnce()) -> String {
    let mut child = std::process::Command::new(interceptor_bin())
        .args([
            "--pin-dir",
            w.pin.as_str(),
            "logs",
            "--for-secs",
            &secs.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run interceptor logs");
    // Wait until it reads the programs' logs (its first line on stderr), not a guessed time.
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut first).expect("read interceptor logs' stderr");
    assert!(
        first.starts_with("interceptor logs: following"),
        "interceptor logs did not start: {first}"
    );
    during();
    let out = child.wait_with_output().expect("interceptor logs ends");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).expect("read interceptor logs' stderr");
    assert!(out.status.success(), "{first}{rest}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kernel_programs_log_their_decisions_only_at_debug() {
    let w = World::new("met-klog", &[]);
    let upgrade = |level: &str| {
        let out = std::process::Command::new(interceptor_bin())
            .args([
                "--pin-dir",
                w.pin.as_str(),
                "--kernel-log",
                level,
                "upgrade",
            ])
            .output()
            .expect("run interceptor upgrade");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Attached with logging off (the default): nothing to read.
    let quiet = kernel_log_lines(&w, 4, || {
        w.run_churn("127.0.3.1", 1, 5);
    });
    assert!(quiet.trim().is_empty(), "logging is off: {quiet}");
    // The same scope, its programs swapped for ones that log at debug.
    upgrade("debug");
    let scope = w.cg.id();
    let lines = kernel_log_lines(&w, 4, || {
        w.run_churn("127.0.3.1", 1, 5);
    });
    let redirected = format!("scope {scope} redirected");
    assert_eq!(
        lines.lines().filter(|l| *l == redirected).count(),
        5,
        "one line per redirected connect:\n{lines}"
    );
    assert!(
        lines.lines().any(|l| l.ends_with("orig_dst_answered")),
        "{lines}"
    );
    // And back off.
    upgrade("off");
    let quiet = kernel_log_lines(&w, 4, || {
        w.run_churn("127.0.3.1", 1, 5);
    });
    assert!(quiet.trim().is_empty(), "logging is off again: {quiet}");
    println!("kernel log lines at debug:\n{lines}");
}
