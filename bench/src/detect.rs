//! `interceptor-bench detect-idle`: the proxy's CPU while clients stay silent during
//! protocol detection.
//!
//! A routed service port of protocol `AUTO` (127.0.10.1:8080, endpoint nginx) makes the
//! proxy peek at each connection's first bytes for up to `--protocol-detection-timeout`
//! (60 s here, so detection lasts the whole measurement). The workload (a cgroup with the
//! eBPF interception) opens N connections to it and then says nothing more, in two
//! variants, one after the other:
//!
//! - **silent**: no byte at all;
//! - **partial**: `GE`, the start of a request line that is not enough to classify it.
//!
//! The figure is the proxy's CPU time (utime + stime from `/proc/PID/stat`, 10 ms ticks)
//! over `--seconds` while they are held.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use interceptor::{PinLayout, ScopeSettings};
use interceptor_tests::{
    exec_command, proxy_stats, start_proxy, NetNs, Nginx, PinDir, Proc, TestCgroup,
};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct DetectArgs {
    /// Connections held in detection.
    #[arg(long, default_value_t = 1000)]
    pub conns: u32,
    /// Seconds of measurement per variant.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Directory for the results (default bench/results).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

const ROUTES: &str = r#"
serviceEntries:
- hosts: [web]
  addresses: [127.0.10.1]
  ports: [{number: 8080, name: auto, protocol: AUTO}]
  endpoints: [{address: 127.0.20.1}]
"#;

/// utime + stime of `pid` in microseconds (clock ticks of 10 ms).
fn cpu_usec(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) * 10_000
}

pub fn run(args: DetectArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root (network namespaces, cgroups, BPF)");
    }
    let ns = NetNs::new("bench-detect");
    let cg = TestCgroup::new("bench-detect");
    let pin = PinDir::new("bench-detect");
    interceptor::attach(
        &PinLayout::new(pin.path()),
        cg.path(),
        &ScopeSettings::default(),
    )
    .map_err(|e| anyhow!("attach: {e}"))?;
    let _nginx = Nginx::start(&ns, &["127.0.20.1:8080"]);
    let dir = std::env::temp_dir().join(format!("icpt-t-bench-detect-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let routes = dir.join("routes.yaml");
    std::fs::write(&routes, ROUTES)?;
    let proxy = start_proxy(
        &ns,
        &[
            "--admin",
            "127.0.0.1:15000",
            "--routes",
            routes.to_str().expect("UTF-8 path"),
            "--protocol-detection-timeout",
            "60s",
        ],
    );
    let exe = std::env::current_exe()?;
    let exe = exe.to_str().expect("UTF-8 path");
    let count = args.conns.to_string();
    let mut figures = Vec::new();
    for (variant, prefix) in [("silent", ""), ("partial", "GE")] {
        let mut cmd = vec![
            exe,
            "silent",
            "--addr",
            "127.0.10.1:8080",
            "--count",
            &count,
            "--hold-s",
            "120",
        ];
        if !prefix.is_empty() {
            cmd.extend(["--prefix", prefix]);
        }
        let mut client = Proc::spawn(
            "silent-client",
            exec_command(Some(&ns), Some(&cg), None, &cmd),
        );
        if !client.wait_for_stdout("\"ready\"", Duration::from_secs(60)) {
            bail!("client not ready: {}{}", client.stdout(), client.stderr());
        }
        let v: serde_json::Value =
            serde_json::from_str(client.stdout().lines().next().unwrap_or("{}"))?;
        // Let the accepts settle, then measure.
        std::thread::sleep(Duration::from_millis(500));
        let c0 = cpu_usec(proxy.pid());
        std::thread::sleep(Duration::from_secs(args.seconds));
        let c1 = cpu_usec(proxy.pid());
        let cpu_ms = (c1 - c0) as f64 / 1000.0;
        // They were all open in the proxy (still in detection: nothing was forwarded).
        let stats = proxy_stats(&ns, "127.0.0.1:15000");
        let active = stats["connections_active"].as_u64().unwrap_or(0);
        if active < u64::from(args.conns) {
            bail!("{variant}: only {active} connections open in the proxy: {stats}");
        }
        println!(
            "{variant}: {} connections in detection, proxy CPU {cpu_ms:.0} ms over {} s",
            v["ready"], args.seconds
        );
        figures.push(
            json!({"variant": variant, "connections": v["ready"], "failed": v["failed"],
                            "proxy_connections_active": active, "seconds": args.seconds, "proxy_cpu_ms": cpu_ms}),
        );
        drop(client);
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "Proxy CPU while {} clients stay in protocol detection (AUTO port, detection timeout 60 s), {} s each\n\n{}\n",
        args.conns,
        args.seconds,
        figures
            .iter()
            .map(|f| format!("{:<8} {:>8} ms CPU ({} connections)", f["variant"].as_str().unwrap_or(""), f["proxy_cpu_ms"], f["connections"]))
            .collect::<Vec<_>>()
            .join("\n")
    );
    println!("\n{text}");
    let doc = json!({"date_utc": crate::report::now_utc(), "figures": figures});
    let out = args.out.unwrap_or_else(|| {
        interceptor_tests::workspace_dir()
            .join("bench")
            .join("results")
    });
    crate::write_results(&out, &crate::result_stem("detect-idle"), &text, &doc)?;
    Ok(())
}
