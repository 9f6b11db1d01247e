//! The workloads run in each world, in this order: keep-alive (wrk), one connection per
//! request (own client), fixed-rate latency (own open-loop client), bulk (iperf3), idle
//! connections (own client + idle server, proxy modes only). Each records figures into
//! a [`RunResult`]; a failed workload records an error and the run goes on.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use interceptor::Counter;
use interceptor_tests::{run_cmd, Proc};
use serde::Serialize;
use serde_json::Value;

use crate::world::{
    host_busy_usec, system_used_bytes, Mode, ProxyKind, World, HOLD_PORT, IPERF_PORT, NGINX_PORT,
};

/// What one measurement run needs to know.
#[derive(Clone, Debug, Serialize)]
pub struct Load {
    /// Duration of keep-alive, new-connection, fixed-rate and bulk measurements.
    pub duration_s: f64,
    /// Connections of the keep-alive run (wrk -c) and threads of the new-connection run.
    pub concurrency: u32,
    /// Requests per second of the fixed-rate run, the same in every mode.
    pub rate: u32,
    /// Keep-alive connections of the fixed-rate run.
    pub rate_conns: u32,
    /// Idle proxied connections held for the memory figure.
    pub idle_conns: u32,
}

/// Everything measured in one world.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunResult {
    pub rep: u32,
    pub mode: String,
    /// `t1`, `default`, or `-` for D (no proxy).
    pub threads: String,
    /// Figure key -> value (see `report::FIGURES`).
    pub figures: BTreeMap<String, f64>,
    /// Evidence of the path taken: conntrack, eBPF and proxy counters, rule hits.
    pub checks: BTreeMap<String, u64>,
    /// Raw tool outputs, parsed.
    pub raw: BTreeMap<String, Value>,
    /// Workloads that failed, with why.
    pub errors: Vec<String>,
    /// Seconds each workload took (wall clock).
    pub step_s: BTreeMap<String, f64>,
    pub wall_s: f64,
}

impl RunResult {
    fn set(&mut self, key: &str, v: Option<f64>) {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            self.figures.insert(key.to_string(), v);
        }
    }

    fn check(&mut self, key: &str, v: Option<u64>) {
        if let Some(v) = v {
            self.checks.insert(key.to_string(), v);
        }
    }

    fn note_conntrack(&mut self, w: &World) {
        let n = w.ns.conntrack_count();
        let e = self.checks.entry("conntrack_max".into()).or_insert(0);
        *e = (*e).max(n);
    }
}

/// Runs every workload in `w`.
pub fn run_all(w: &mut World, load: &Load, rep: u32) -> RunResult {
    let t0 = Instant::now();
    let mut r = RunResult {
        rep,
        mode: w.mode.name().to_string(),
        threads: if w.mode == Mode::D {
            "-".into()
        } else {
            w.threads.key().into()
        },
        ..Default::default()
    };
    r.note_conntrack(w);
    type Step = fn(&mut World, &Load, &mut RunResult) -> Result<()>;
    let steps: [(&str, Step); 5] = [
        ("keepalive", keepalive),
        ("newconn", newconn),
        ("fixedrate", fixedrate),
        ("bulk", bulk),
        ("idle", idle),
    ];
    for (name, step) in steps {
        if crate::interrupted() {
            r.errors.push("interrupted".into());
            break;
        }
        let t = Instant::now();
        let res = step(w, load, &mut r).and_then(|_| w.check_alive());
        if let Err(e) = res {
            eprintln!("  {} {}: {name} failed: {e:#}", r.mode, r.threads);
            r.errors.push(format!("{name}: {e:#}"));
        }
        r.note_conntrack(w);
        r.step_s.insert(name.to_string(), t.elapsed().as_secs_f64());
        // Let closing connections settle before the next measurement.
        std::thread::sleep(Duration::from_millis(100));
    }
    r.check("ebpf_redirected", w.ebpf_counter(Counter::Redirected));
    r.check(
        "ebpf_orig_dst_answered",
        w.ebpf_counter(Counter::OrigDstAnswered),
    );
    r.check("proxy_forwarded_total", w.proxy_counter("forwarded_total"));
    r.check(
        "proxy_orig_dst_missing",
        w.proxy_counter("orig_dst_missing"),
    );
    r.check("iptables_redirect_packets", w.redirect_rule_packets());
    if w.mode.kernel_forward() {
        note_kernel_forward(w, &mut r);
    }
    r.wall_s = t0.elapsed().as_secs_f64();
    r
}

/// EK: whether the proxy had kernel forwarding on, how many connections the kernel carried
/// and how many bytes, against every byte the proxy forwarded (its `/stats` byte counts take
/// the kernel's bytes in when a connection ends, so every workload's connections count by
/// now: the idle step waited for them to close).
fn note_kernel_forward(w: &World, r: &mut RunResult) {
    let Some(rt) = w.proxy_runtime() else {
        r.errors
            .push("kernel forwarding: no answer from the proxy's /runtime".into());
        return;
    };
    let u = |k: &str| rt[k].as_u64();
    r.check("kfwd_on", rt["kernel_forward"].as_bool().map(u64::from));
    r.check("kfwd_connections", u("kernel_forward_connections"));
    r.check("kfwd_fallbacks", u("kernel_forward_fallbacks"));
    r.check("kfwd_bytes", u("kernel_forward_bytes"));
    let total = [
        w.proxy_counter("bytes_client_to_upstream"),
        w.proxy_counter("bytes_upstream_to_client"),
    ];
    if let [Some(a), Some(b)] = total {
        r.check("proxy_bytes_total", Some(a + b));
        if let Some(k) = u("kernel_forward_bytes").filter(|_| a + b > 0) {
            r.set("kfwd_share_pct", Some(100.0 * k as f64 / (a + b) as f64));
        }
    }
    r.raw.insert("runtime".into(), rt);
}

static PERF_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// `--perf DIR`: the keep-alive, new-connection and bulk measurements of every world are
/// recorded with `perf record -a -g` into `DIR/<mode>-<threads>-rep<N>-<step>.data`.
pub fn set_perf_dir(dir: PathBuf) {
    let _ = PERF_DIR.set(dir);
}

/// A whole-machine `perf record` over the measurement about to start (the same seconds).
struct PerfRecord {
    child: std::process::Child,
    path: PathBuf,
}

impl PerfRecord {
    fn start(r: &RunResult, step: &str, load: &Load) -> Option<PerfRecord> {
        let dir = PERF_DIR.get()?;
        let path = dir.join(format!(
            "{}-{}-rep{}-{step}.data",
            r.mode,
            r.threads,
            r.rep + 1
        ));
        let secs = (load.duration_s.ceil().max(1.0) as u64).to_string();
        let child = Command::new("perf")
            .args(["record", "-a", "-g", "-F", "499", "-q", "-o"])
            .arg(&path)
            .args(["--", "sleep", &secs])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| eprintln!("  perf record: {e} (is linux-perf installed?)"))
            .ok()?;
        Some(PerfRecord { child, path })
    }

    /// Waits for the recording (it ends with its `sleep`) and names its file in `raw`.
    fn finish(mut self, r: &mut RunResult, step: &str) {
        match self.child.wait() {
            Ok(st) if st.success() => {
                r.raw.insert(
                    format!("perf_{step}"),
                    Value::String(self.path.display().to_string()),
                );
            }
            Ok(st) => eprintln!("  perf record {}: {st}", self.path.display()),
            Err(e) => eprintln!("  perf record {}: {e}", self.path.display()),
        }
    }
}

fn run_json(mut cmd: Command, timeout: Duration, what: &str) -> Result<Value> {
    let out = run_cmd(&mut cmd, timeout).with_context(|| format!("run {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'));
    match line {
        Some(l) if out.status.success() => {
            serde_json::from_str(l).with_context(|| format!("{what}: bad JSON {l:?}"))
        }
        _ => bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.trim()
        ),
    }
}

fn bound(load: &Load) -> Duration {
    Duration::from_secs_f64(load.duration_s + 60.0)
}

fn ms(load: &Load) -> String {
    ((load.duration_s * 1000.0).round() as u64).to_string()
}

/// 1. Keep-alive request/response with wrk; proxy CPU over the same run.
fn keepalive(w: &mut World, load: &Load, r: &mut RunResult) -> Result<()> {
    let url = format!("http://127.0.0.1:{NGINX_PORT}/");
    let c = format!("-c{}", load.concurrency);
    let d = format!("-d{}s", load.duration_s.ceil().max(1.0) as u64);
    let cpu0 = w.proxy_cpu_usec();
    let srv0 = w.server_cpu_usec();
    let host0 = host_busy_usec();
    let wake0 = w.proxy_wakeups();
    let perf = PerfRecord::start(r, "keepalive", load);
    let mut cmd = w.client_command(&["wrk", "-t1", &c, &d, "--latency", &url]);
    let out = run_cmd(&mut cmd, bound(load)).context("run wrk");
    if let Some(p) = perf {
        p.finish(r, "keepalive");
    }
    let out = out?;
    let cpu1 = w.proxy_cpu_usec();
    let srv1 = w.server_cpu_usec();
    let host1 = host_busy_usec();
    let wake1 = w.proxy_wakeups();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let wrk = parse_wrk(&text).ok_or_else(|| anyhow!("cannot parse wrk output:\n{text}"))?;
    if wrk.requests == 0 {
        bail!("wrk completed no request:\n{text}");
    }
    r.set("ka_rps", Some(wrk.rps));
    r.set("ka_p50_us", Some(wrk.p50_us));
    r.set("ka_p99_us", Some(wrk.p99_us));
    r.check("ka_requests", Some(wrk.requests));
    r.check("ka_errors", Some(wrk.errors));
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        // usage_usec per 1000 requests, in core-milliseconds.
        r.set(
            "proxy_cpu_ms_per_1k",
            Some((b - a) as f64 / 1000.0 / (wrk.requests as f64 / 1000.0)),
        );
    }
    if let (Some(a), Some(b)) = (srv0, srv1) {
        r.set(
            "server_cpu_ms_per_1k",
            Some((b - a) as f64 / 1000.0 / (wrk.requests as f64 / 1000.0)),
        );
    }
    if let (Some(a), Some(b)) = (host0, host1) {
        // The whole machine: wrk, nginx, the proxy and the kernel's work on their behalf
        // wherever it runs (softirq, the sockmap's kworkers), plus anything else running.
        r.set(
            "host_cpu_ms_per_1k",
            Some(b.saturating_sub(a) as f64 / 1000.0 / (wrk.requests as f64 / 1000.0)),
        );
    }
    if let (Some(a), Some(b)) = (wake0, wake1) {
        r.set(
            "proxy_wakeups_per_req",
            Some(b.saturating_sub(a) as f64 / wrk.requests as f64),
        );
    }
    r.raw.insert("wrk".into(), Value::String(text));
    Ok(())
}

#[derive(Debug, PartialEq)]
pub struct Wrk {
    pub rps: f64,
    pub requests: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

fn parse_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * mul)
}

/// Parses wrk 4's text output (`--latency`).
pub fn parse_wrk(text: &str) -> Option<Wrk> {
    let mut rps = None;
    let mut requests = None;
    let (mut p50, mut p99) = (None, None);
    let mut errors = 0u64;
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = l.strip_prefix("50%") {
            p50 = parse_duration_us(v);
        } else if let Some(v) = l.strip_prefix("99%") {
            p99 = parse_duration_us(v);
        } else if l.contains(" requests in ") {
            requests = l.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Some(Wrk {
        rps: rps?,
        requests: requests?,
        p50_us: p50?,
        p99_us: p99?,
        errors,
    })
}

/// 2. One new connection per request (own closed-loop client).
fn newconn(w: &mut World, load: &Load, r: &mut RunResult) -> Result<()> {
    let addr = format!("127.0.0.1:{NGINX_PORT}");
    let threads = load.concurrency.to_string();
    let cpu0 = w.proxy_cpu_usec();
    let perf = PerfRecord::start(r, "newconn", load);
    let v = run_json(
        w.bench_client(&[
            "close",
            "--addr",
            &addr,
            "--threads",
            &threads,
            "--duration-ms",
            &ms(load),
        ]),
        bound(load),
        "new-connection client",
    );
    if let Some(p) = perf {
        p.finish(r, "newconn");
    }
    let v = v?;
    let cpu1 = w.proxy_cpu_usec();
    let ok = v["ok"].as_u64().unwrap_or(0);
    if ok == 0 {
        bail!("no request succeeded: {v}");
    }
    r.set("close_cps", v["conns_per_s"].as_f64());
    r.set("close_p50_us", v["latency"]["p50_us"].as_f64());
    r.set("close_p99_us", v["latency"]["p99_us"].as_f64());
    r.check("close_requests", Some(ok));
    r.check("close_errors", v["errors"].as_u64());
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        r.set("proxy_cpu_us_per_conn", Some((b - a) as f64 / ok as f64));
    }
    r.raw.insert("newconn".into(), v);
    Ok(())
}

/// 3. Latency at a fixed request rate (open loop, own client).
fn fixedrate(w: &mut World, load: &Load, r: &mut RunResult) -> Result<()> {
    let addr = format!("127.0.0.1:{NGINX_PORT}");
    let v = run_json(
        w.bench_client(&[
            "rate",
            "--addr",
            &addr,
            "--rate",
            &load.rate.to_string(),
            "--conns",
            &load.rate_conns.to_string(),
            "--duration-ms",
            &ms(load),
        ]),
        bound(load),
        "fixed-rate client",
    )?;
    if v["ok"].as_u64().unwrap_or(0) == 0 {
        bail!("no request succeeded: {v}");
    }
    r.set("rate_p50_us", v["latency"]["p50_us"].as_f64());
    r.set("rate_p99_us", v["latency"]["p99_us"].as_f64());
    r.check("rate_requests", v["ok"].as_u64());
    r.check("rate_errors", v["errors"].as_u64());
    r.check("rate_late", v["late"].as_u64());
    r.raw.insert("fixedrate".into(), v);
    Ok(())
}

/// 4. Bulk transfer with iperf3 (one stream, client -> server).
fn bulk(w: &mut World, load: &Load, r: &mut RunResult) -> Result<()> {
    let t = format!("{}", load.duration_s.ceil().max(1.0) as u64);
    let port = IPERF_PORT.to_string();
    let cpu0 = w.proxy_cpu_usec();
    let perf = PerfRecord::start(r, "bulk", load);
    let mut cmd = w.client_command(&["iperf3", "-c", "127.0.0.1", "-p", &port, "-t", &t, "-J"]);
    let out = run_cmd(&mut cmd, bound(load)).context("run iperf3");
    if let Some(p) = perf {
        p.finish(r, "bulk");
    }
    let out = out?;
    let cpu1 = w.proxy_cpu_usec();
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow!(
            "iperf3 output is not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(err) = v["error"].as_str() {
        bail!("iperf3: {err}");
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("iperf3 JSON has no end.sum_received.bits_per_second"))?;
    let bytes = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    r.set("bulk_gbps", Some(bps / 1e9));
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        if bytes > 0.0 {
            r.set(
                "proxy_cpu_ms_per_gb",
                Some((b - a) as f64 / 1000.0 / (bytes / 1e9)),
            );
        }
    }
    r.raw.insert(
        "iperf3".into(),
        serde_json::json!({"end": v["end"]["sum_received"], "cpu": v["end"]["cpu_utilization_percent"]}),
    );
    Ok(())
}

/// 5. Idle proxied connections: the proxy's memory before and while they are held.
fn idle(w: &mut World, load: &Load, r: &mut RunResult) -> Result<()> {
    if w.mode.proxy() == ProxyKind::None || load.idle_conns == 0 {
        return Ok(());
    }
    let hold = w.start_hold_server()?;
    std::thread::sleep(Duration::from_millis(200));
    let (pss0, rss0) = w
        .proxy_memory()
        .ok_or_else(|| anyhow!("cannot read proxy memory"))?;
    let sys0 = system_used_bytes();
    let addr = format!("127.0.0.1:{HOLD_PORT}");
    let count = load.idle_conns.to_string();
    let mut client = Proc::spawn(
        "idle-client",
        w.bench_client(&[
            "idle", "--addr", &addr, "--count", &count, "--hold-s", "300",
        ]),
    );
    let ready = client.wait_for_stdout("\"ready\"", Duration::from_secs(150));
    if !ready {
        bail!(
            "idle client did not get ready: {}{}",
            client.stdout(),
            client.stderr()
        );
    }
    let v: Value = serde_json::from_str(client.stdout().lines().next().unwrap_or("{}"))?;
    let n = v["ready"].as_u64().unwrap_or(0);
    if n == 0 {
        bail!("no idle connection was established: {v}");
    }
    // Let the proxy finish its bookkeeping, then read memory while the connections are held.
    std::thread::sleep(Duration::from_millis(300));
    let (pss1, rss1) = w
        .proxy_memory()
        .ok_or_else(|| anyhow!("cannot read proxy memory"))?;
    let sys1 = system_used_bytes();
    r.note_conntrack(w);
    let per = |a: u64, b: u64| (b as f64 - a as f64) / n as f64;
    r.set("idle_pss_per_conn", Some(per(pss0, pss1)));
    r.set("idle_rss_per_conn", Some(per(rss0, rss1)));
    if let (Some(a), Some(b)) = (sys0, sys1) {
        r.set("idle_sys_per_conn", Some(per(a, b)));
    }
    r.check("idle_conns", Some(n));
    r.check("idle_failed", v["failed"].as_u64());
    r.raw.insert(
        "idle".into(),
        serde_json::json!({"pss_before": pss0, "pss_after": pss1, "rss_before": rss0, "rss_after": rss1,
                           "sys_before": sys0, "sys_after": sys1, "client": v}),
    );
    drop(client);
    drop(hold);
    // Wait (bounded) for the proxy to close its side before the world goes on.
    if w.mode.proxy() == ProxyKind::Ours {
        interceptor_tests::wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            w.proxy_counter("connections_active") == Some(0)
        });
    } else {
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 2s test @ http://127.0.0.1:8080/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   208.47us   50.26us   2.09ms   89.44%
    Req/Sec    71.80k     3.51k   76.83k    80.00%
  Latency Distribution
     50%  200.00us
     75%  222.00us
     90%  247.00us
     99%    1.38ms
  143022 requests in 2.00s, 28.78MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  71463.62
Transfer/sec:     14.38MB
";

    #[test]
    fn parses_wrk() {
        let w = parse_wrk(WRK).unwrap();
        assert_eq!(
            w,
            Wrk {
                rps: 71463.62,
                requests: 143022,
                p50_us: 200.0,
                p99_us: 1380.0,
                errors: 8
            }
        );
        assert_eq!(parse_duration_us("1.50s"), Some(1.5e6));
        assert!(parse_wrk("garbage").is_none());
    }
}
