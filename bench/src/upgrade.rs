//! `interceptor-bench upgrade`: how long a proxy upgrade takes with established
//! connections, which now move to the new process.
//!
//! For each count N (100, 1,000, 10,000), a fresh world (network namespace, workload
//! cgroup with the eBPF interception, nginx, the idle server, `interceptor-proxy
//! --upgrade-socket S --drain-timeout 10s`): N idle connections from the workload through the proxy
//! to the idle server, a fixed-rate keep-alive load on nginx, and, 1 s into it, a new
//! `interceptor-proxy --upgrade`. Measured: the time from starting the new process to
//! the old one's exit (every connection moved), the old process's own figures (connections
//! moved, time from its drain's start to holding nothing), and the fixed-rate load's
//! latency over the run (p99, max; no error allowed) against the same load without an
//! upgrade.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use interceptor::{PinLayout, ScopeSettings};
use interceptor_tests::{
    exec_command, start_proxy, NetNs, Nginx, PinDir, Proc, ScratchDir, TestCgroup,
};
use serde_json::{json, Value};

const ADMIN: &str = "127.0.0.1:15000";
const NGINX_PORT: u16 = 8090;
const HOLD_PORT: u16 = 9091;
const RATE: u32 = 2000;
const RATE_MS: u64 = 4000;

#[derive(clap::Args, Debug)]
pub struct UpgradeArgs {
    /// Established connections at the upgrade (one run each).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    pub conns: Vec<u32>,
    /// Directory for the results (default bench/results).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

struct World {
    proxies: Vec<Proc>,
    _servers: Vec<Proc>,
    _nginx: Nginx,
    scratch: ScratchDir,
    _pin: PinDir,
    cg: TestCgroup,
    ns: NetNs,
}

impl World {
    fn new() -> Result<World> {
        let ns = NetNs::new("bench-upgrade");
        let cg = TestCgroup::new("bench-upgrade");
        let pin = PinDir::new("bench-upgrade");
        let scratch = ScratchDir::new("bench-upgrade");
        interceptor::attach(
            &PinLayout::new(pin.path()),
            cg.path(),
            &ScopeSettings::default(),
        )
        .map_err(|e| anyhow!("attach: {e}"))?;
        let nginx = Nginx::start(&ns, &[&format!("0.0.0.0:{NGINX_PORT}")]);
        let exe = std::env::current_exe()?;
        let listen = format!("0.0.0.0:{HOLD_PORT}");
        let hold = Proc::spawn(
            "hold",
            exec_command(
                Some(&ns),
                None,
                None,
                &[exe.to_str().unwrap(), "hold", "--listen", &listen],
            ),
        );
        let mut w = World {
            proxies: Vec::new(),
            _servers: vec![hold],
            _nginx: nginx,
            scratch,
            _pin: pin,
            cg,
            ns,
        };
        let args = w.proxy_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        w.proxies.push(start_proxy(&w.ns, &args));
        Ok(w)
    }

    fn proxy_args(&self) -> Vec<String> {
        let sock = self.scratch.join("proxy.sock").display().to_string();
        [
            "--admin",
            ADMIN,
            "--upgrade-socket",
            &sock,
            "--drain-timeout",
            "10s",
        ]
        .map(String::from)
        .to_vec()
    }

    fn client(&self, args: &[&str]) -> Proc {
        let exe = std::env::current_exe().expect("own path");
        let mut cmd = vec![exe.to_str().unwrap()];
        cmd.extend_from_slice(args);
        Proc::spawn(
            "bench client",
            exec_command(Some(&self.ns), Some(&self.cg), None, &cmd),
        )
    }

    /// A fixed-rate load for RATE_MS, started now; its JSON when done.
    fn rate(&self) -> Proc {
        let addr = format!("127.0.0.1:{NGINX_PORT}");
        let (rate, ms) = (RATE.to_string(), RATE_MS.to_string());
        self.client(&[
            "rate",
            "--addr",
            &addr,
            "--rate",
            &rate,
            "--conns",
            "8",
            "--duration-ms",
            &ms,
        ])
    }
}

fn wait_json(p: &mut Proc, within: Duration) -> Result<Value> {
    p.wait_timeout(within)
        .ok_or_else(|| anyhow!("client did not finish within {within:?}"))?;
    let out = p.stdout();
    serde_json::from_str(out.lines().last().unwrap_or(""))
        .map_err(|e| anyhow!("client output {out:?}: {e}\n{}", p.stderr()))
}

/// The old process's "connections moved" log line: (moved, drained ms).
fn moved(log: &str) -> Option<(u64, u64)> {
    let line = log
        .lines()
        .rfind(|l| l.contains("connections moved to the new process"))?;
    let f = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
    };
    Some((f("moved_connections=")?, f("drained_ms=")?))
}

pub fn run(args: UpgradeArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root (network namespaces, cgroups, BPF)");
    }
    // Two descriptors per connection in the proxy, one in each client and server.
    let nofile = crate::raise_nofile(131_072)?;
    // The proxy fits its --max-connections to the same limit (less some descriptors of
    // its own); the fixed-rate load adds 8.
    let fits = (nofile.saturating_sub(256) / 2).saturating_sub(16) as u32;
    let mut rows = Vec::new();
    let mut text = format!(
        "proxy upgrade with established connections (they move to the new process); fixed-rate \
         keep-alive load {RATE} req/s over 8 connections for {} s, the upgrade 1 s into it\n\n\
         {:>8} {:>12} {:>8} {:>11} {:>13} {:>13} {:>12}\n",
        RATE_MS / 1000,
        "conns",
        "upgrade ms",
        "moved",
        "drained ms",
        "p99 us (upg)",
        "max us (upg)",
        "p99 us (no)"
    );
    for &asked in &args.conns {
        let n = asked.min(fits);
        if n < asked {
            let note = format!(
                "note: RLIMIT_NOFILE is {nofile} and cannot be raised (no CAP_SYS_RESOURCE): \
                 {n} connections instead of {asked} (the proxy holds two descriptors each)\n"
            );
            print!("{note}");
            text.push_str(&note);
        }
        // A fresh world each time (the idle server never closes its side, so a proxy would
        // keep the half-closed connections of an earlier run).
        let mut w = World::new()?;
        // The idle connections, through the interception to the idle server.
        let addr = format!("127.0.0.1:{HOLD_PORT}");
        let count = n.to_string();
        let mut idle = w.client(&["idle", "--addr", &addr, "--count", &count]);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !idle.stdout().contains("\"ready\"") {
            if Instant::now() > deadline || !idle.is_running() {
                bail!("idle client: {}{}", idle.stdout(), idle.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let ready: Value = serde_json::from_str(idle.stdout().lines().next().unwrap_or(""))?;
        if ready["ready"] != n {
            bail!("idle client: {ready}");
        }
        // Without an upgrade, for comparison.
        let mut base = w.rate();
        let base = wait_json(&mut base, Duration::from_secs(60))?;
        // With one, 1 s into the load.
        let mut load = w.rate();
        std::thread::sleep(Duration::from_secs(1));
        let started = Instant::now();
        let mut cmd = vec![interceptor_tests::proxy_bin().display().to_string()];
        cmd.extend(w.proxy_args());
        cmd.push("--upgrade".into());
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let new = Proc::spawn(
            "interceptor-proxy",
            exec_command(Some(&w.ns), None, None, &cmd),
        );
        let old = w.proxies.last_mut().expect("a proxy runs");
        let status = old
            .wait_timeout(Duration::from_secs(60))
            .ok_or_else(|| anyhow!("the old proxy still runs 60 s after the upgrade"))?;
        let took = started.elapsed();
        if !status.success() {
            bail!("old proxy: {status}\n{}", old.stderr());
        }
        let (moved_n, drained_ms) =
            moved(&old.stderr()).ok_or_else(|| anyhow!("no moved line:\n{}", old.stderr()))?;
        w.proxies.push(new);
        let load = wait_json(&mut load, Duration::from_secs(60))?;
        if load["errors"] != 0 || base["errors"] != 0 {
            bail!("the fixed-rate load failed: {load} / {base}");
        }
        idle.kill();
        let _ = idle.wait_timeout(Duration::from_secs(10));
        let p99 = load["latency"]["p99_us"].as_f64().unwrap_or(f64::NAN);
        let max = load["latency"]["max_us"].as_f64().unwrap_or(f64::NAN);
        let base_p99 = base["latency"]["p99_us"].as_f64().unwrap_or(f64::NAN);
        text.push_str(&format!(
            "{n:>8} {:>12.1} {moved_n:>8} {drained_ms:>11} {p99:>13.0} {max:>13.0} {base_p99:>12.0}\n",
            took.as_secs_f64() * 1000.0
        ));
        rows.push(json!({
            "conns": n, "upgrade_ms": took.as_secs_f64() * 1000.0, "moved": moved_n,
            "drained_ms": drained_ms, "load": load, "load_without_upgrade": base,
        }));
        println!("{}", text.lines().last().unwrap_or(""));
    }
    println!("\n{text}");
    let doc = json!({"date_utc": crate::report::now_utc(), "runs": rows});
    let out = args.out.unwrap_or_else(|| {
        interceptor_tests::workspace_dir()
            .join("bench")
            .join("results")
    });
    crate::write_results(&out, &crate::result_stem("upgrade"), &text, &doc)?;
    Ok(())
}
