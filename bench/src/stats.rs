//! `interceptor-bench stats`: what per-destination statistics cost the proxy.
//!
//! Each phase builds its own world (network namespace, workload cgroup with the eBPF
//! interception, nginx on 0.0.0.0 so it answers on every 127.x.y.z, `interceptor-proxy`)
//! and connects through the interception to distinct destination addresses 127.1.0.0 +
//! i, one `GET` with `Connection: close` each:
//!
//! 1. **off / on**: N destinations with per-destination stats off, then (fresh world)
//!    on with a cap above N. The proxy's Pss grows by `d_off` and `d_on`; the switch saves
//!    `1 - d_off/d_on`, and `(d_on - d_off) / (3 N)` is the memory per counter series.
//! 2. **scrape**: stats on with a cap of S/3 destinations, filled: the time of `GET
//!    /metrics` for about S series (median of 5, from inside the namespace).
//! 3. **churn**: the same capped world, then M more distinct destinations: the proxy's
//!    Pss after the first 100,000 and after all M; the difference shows whether memory
//!    stays flat once the cap is reached.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use interceptor::{PinLayout, ScopeSettings};
use interceptor_tests::{
    exec_command, http_get_in, run_cmd, start_proxy, NetNs, Nginx, PinDir, Proc, TestCgroup,
};
use serde_json::{json, Value};

const ADMIN: &str = "127.0.0.1:15000";
const PORT: u16 = 8090;

#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// Distinct destinations of the off/on comparison.
    #[arg(long, default_value_t = 100_000)]
    pub destinations: u64,
    /// Distinct destinations churned through the capped proxy.
    #[arg(long, default_value_t = 1_000_000)]
    pub churn: u64,
    /// Series in the timed scrape (the cap is a third of it: three series a destination).
    #[arg(long, default_value_t = 50_000)]
    pub scrape_series: u64,
    /// Smaller run (20,000 destinations, 200,000 churned), a few minutes.
    #[arg(long)]
    pub quick: bool,
    /// Directory for the results (default bench/results).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One world: fields drop in order (processes, programs, cgroup, namespace).
struct World {
    proxy: Proc,
    _nginx: Nginx,
    _pin: PinDir,
    cg: TestCgroup,
    ns: NetNs,
}

impl World {
    fn new(tag: &str, proxy_args: &[&str]) -> Result<World> {
        let ns = NetNs::new(&format!("bench-stats-{tag}"));
        let cg = TestCgroup::new(&format!("bench-stats-{tag}"));
        let pin = PinDir::new(&format!("bench-stats-{tag}"));
        interceptor::attach(
            &PinLayout::new(pin.path()),
            cg.path(),
            &ScopeSettings::default(),
        )
        .map_err(|e| anyhow!("attach: {e}"))?;
        let nginx = Nginx::start(&ns, &[&format!("0.0.0.0:{PORT}")]);
        let mut args = vec!["--admin", ADMIN];
        args.extend_from_slice(proxy_args);
        let proxy = start_proxy(&ns, &args);
        Ok(World {
            proxy,
            _nginx: nginx,
            _pin: pin,
            cg,
            ns,
        })
    }

    /// `count` connections from the workload; the i-th to `first` + i.
    fn spread(&self, first: &str, count: u64) -> Result<Value> {
        self.spread_over(first, count, 0)
    }

    /// `count` connections over `distinct` destinations from `first` (0: all distinct).
    fn spread_over(&self, first: &str, count: u64, distinct: u64) -> Result<Value> {
        let distinct_s = distinct.to_string();
        let exe = std::env::current_exe()?;
        let count_s = count.to_string();
        let port = PORT.to_string();
        let cmd = [
            exe.to_str().expect("UTF-8 path"),
            "spread",
            "--first",
            first,
            "--port",
            &port,
            "--count",
            &count_s,
            "--distinct",
            &distinct_s,
            "--threads",
            "8",
        ];
        let mut c = exec_command(Some(&self.ns), Some(&self.cg), None, &cmd);
        let bound = Duration::from_secs(60 + count / 2_000);
        let out = run_cmd(&mut c, bound).map_err(|e| anyhow!("spread client: {e}"))?;
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            anyhow!(
                "spread client output: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if v["errors"] != 0 || v["ok"] != count {
            bail!("spread client: {v}");
        }
        Ok(v)
    }

    /// Pss and Rss of the proxy, bytes.
    fn memory(&self) -> Result<(u64, u64)> {
        crate::world::process_memory(self.proxy.pid())
            .ok_or_else(|| anyhow!("cannot read the proxy's memory"))
    }

    fn get(&self, path: &str) -> Result<String> {
        let (code, body) = http_get_in(
            &self.ns,
            ADMIN.parse().unwrap(),
            path,
            Duration::from_secs(30),
        )
        .map_err(|e| anyhow!("GET {path}: {e:?}"))?;
        if code != 200 {
            bail!("GET {path}: {code} {body}");
        }
        Ok(body)
    }

    fn tracked(&self) -> Result<u64> {
        let v: Value = serde_json::from_str(&self.get("/runtime")?)?;
        v["destination_series"]
            .as_u64()
            .map(|s| s / 3)
            .ok_or_else(|| anyhow!("/runtime: {v}"))
    }

    /// Warms the proxy up (buffers, pools, runtime) on one destination, then settles.
    fn warm_up(&self) -> Result<()> {
        self.spread_over("127.250.0.1", 5_000, 1)?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }
}

fn mib(b: f64) -> String {
    format!("{:.2} MiB", b / 1048576.0)
}

pub fn run(args: StatsArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root (network namespaces, cgroups, BPF)");
    }
    let (n, churn) = if args.quick {
        (20_000, 200_000)
    } else {
        (args.destinations, args.churn)
    };
    let cap_scrape = args.scrape_series.div_ceil(3);
    let started = Instant::now();
    let first = "127.1.0.0";

    // 1. off, then on.
    let phase = |on: bool| -> Result<(f64, u64, Value)> {
        let tag = if on { "on" } else { "off" };
        let cap = (n * 2).to_string();
        let w = World::new(
            tag,
            &[
                "--destination-stats",
                tag,
                "--destination-stats-cap",
                &cap,
                "--destination-stats-idle",
                "1h",
            ],
        )?;
        w.warm_up()?;
        let (pss0, rss0) = w.memory()?;
        let client = w.spread(first, n)?;
        std::thread::sleep(Duration::from_millis(500));
        let (pss1, rss1) = w.memory()?;
        let tracked = w.tracked()?;
        println!(
            "stats {tag}: {n} destinations at {:.0}/s, proxy Pss {} -> {} ({}), tracked {tracked}",
            client["conns_per_s"].as_f64().unwrap_or(0.0),
            mib(pss0 as f64),
            mib(pss1 as f64),
            mib(pss1 as f64 - pss0 as f64)
        );
        Ok((
            pss1 as f64 - pss0 as f64,
            tracked,
            json!({"pss_before": pss0, "pss_after": pss1, "rss_before": rss0, "rss_after": rss1,
                   "tracked": tracked, "client": client}),
        ))
    };
    let (d_off, tracked_off, raw_off) = phase(false)?;
    let (d_on, tracked_on, raw_on) = phase(true)?;
    // On: the N destinations plus the warm-up's one.
    if tracked_off != 0 || tracked_on != n + 1 {
        bail!(
            "tracked destinations: off {tracked_off}, on {tracked_on} (want 0 and {})",
            n + 1
        );
    }
    let ratio = d_off.max(0.0) / d_on;
    let per_series = (d_on - d_off.max(0.0)) / (3.0 * n as f64);

    // 2 and 3: the capped world.
    let cap = cap_scrape.to_string();
    let w = World::new(
        "cap",
        &[
            "--destination-stats",
            "on",
            "--destination-stats-cap",
            &cap,
            "--destination-stats-idle",
            "1h",
        ],
    )?;
    w.warm_up()?;
    w.spread(first, cap_scrape)?;
    let body = w.get("/metrics")?;
    let series = body
        .lines()
        .filter(|l| l.starts_with("interceptor_proxy_destination_") && l.contains("destination=\""))
        .count();
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        w.get("/metrics")?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let scrape_ms = times[2];
    println!(
        "scrape: {series} destination series, GET /metrics median {scrape_ms:.1} ms ({times:?})"
    );
    let first_part = 100_000.min(churn);
    w.spread("127.2.0.0", first_part)?;
    std::thread::sleep(Duration::from_millis(500));
    let (pss_a, _) = w.memory()?;
    w.spread("127.4.0.0", churn - first_part)?;
    std::thread::sleep(Duration::from_millis(500));
    let (pss_b, _) = w.memory()?;
    let drift = pss_b as f64 - pss_a as f64;
    println!(
        "churn: {churn} distinct destinations, cap {cap_scrape}: Pss {} after {first_part}, {} after all ({})",
        mib(pss_a as f64),
        mib(pss_b as f64),
        mib(drift)
    );
    let tracked_cap = w.tracked()?;
    drop(w);

    let targets = [
        ("stats memory off / on", ratio, "<= 0.10", ratio <= 0.10),
        (
            "bytes per counter series",
            per_series,
            "<= 64",
            per_series <= 64.0,
        ),
        (
            "scrape of ~50,000 series (ms)",
            scrape_ms,
            "< 50",
            scrape_ms < 50.0,
        ),
        (
            "Pss drift over the churn (MiB)",
            drift / 1048576.0,
            "<= 5",
            drift <= 5.0 * 1048576.0,
        ),
    ];
    let mut text = format!(
        "per-destination stats, {n} destinations (off: +{}, on: +{}), scrape at {series} series, churn {churn} with cap {cap_scrape}\n\n",
        mib(d_off),
        mib(d_on)
    );
    text.push_str(&format!(
        "{:<34} {:>12}  {:<8} {}\n",
        "figure", "measured", "target", "met"
    ));
    for (name, v, t, ok) in &targets {
        text.push_str(&format!(
            "{name:<34} {v:>12.3}  {t:<8} {}\n",
            if *ok { "yes" } else { "NO" }
        ));
    }
    println!("\n{text}");
    let doc = json!({
        "date_utc": crate::report::now_utc(),
        "destinations": n,
        "churn": churn,
        "cap": cap_scrape,
        "figures": {
            "stats_memory_off_bytes": d_off,
            "stats_memory_on_bytes": d_on,
            "off_over_on": ratio,
            "bytes_per_series": per_series,
            "scrape_series": series,
            "scrape_ms_median": scrape_ms,
            "scrape_ms": times,
            "churn_pss_after_first": pss_a,
            "churn_pss_after_all": pss_b,
            "churn_pss_drift_bytes": drift,
            "tracked_after_churn": tracked_cap,
        },
        "raw": {"off": raw_off, "on": raw_on},
        "targets": targets.iter().map(|(name, v, t, ok)| json!({"figure": name, "measured": v, "target": t, "met": ok})).collect::<Vec<_>>(),
        "elapsed_s": started.elapsed().as_secs(),
    });
    let dir = args.out.unwrap_or_else(|| {
        interceptor_tests::workspace_dir()
            .join("bench")
            .join("results")
    });
    let stem = crate::result_stem(if args.quick { "stats-quick" } else { "stats" });
    crate::write_results(&dir, &stem, &text, &doc)?;
    Ok(())
}
