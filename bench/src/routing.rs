//! `interceptor-bench routing`: what HTTP routing costs against opaque TCP passthrough, in
//! one world and one run.
//!
//! The workload (a cgroup with the eBPF interception) runs `wrk -t2 -c16` with kept-alive
//! connections through `interceptor-proxy --routes FILE` to one nginx:
//!
//! - **opaque**: to nginx's own address, which no route names: the proxy copies bytes;
//! - **routed**: to a service address whose port is `HTTP`: the proxy parses each request,
//!   matches a route and sends it on a pooled upstream connection.
//!
//! The two alternate for `--reps` repetitions; the figures are medians, and the ratio is
//! taken within each repetition. Then the same for Dubbo 2 (`dubbo.rs`: a Rust provider and
//! a client keeping 4 requests in flight on each of 16 connections): **opaque** to the
//! provider's own address, **routed** to a service address whose port is `DUBBO` (the proxy
//! decodes each request's Hessian 2 body, evaluates a non-matching route then the
//! matching one, maps the request id onto its pooled upstream connection and back).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use interceptor::{PinLayout, ScopeSettings};
use interceptor_tests::{
    exec_command, run_cmd, spawn_in, start_proxy, wait_until, NetNs, Nginx, PinDir, Proc,
    TestCgroup, Wrk,
};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct RoutingArgs {
    /// Repetitions (each runs both).
    #[arg(long, default_value_t = 3)]
    pub reps: u32,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub duration: u64,
    /// Directory for the results (default bench/results).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

const ROUTES: &str = r#"
serviceEntries:
- hosts: [web]
  addresses: [127.0.10.1]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.20.1}]
- hosts: [greeter]
  addresses: [127.0.10.2]
  ports: [{number: 20880, name: dubbo, protocol: DUBBO}]
  endpoints: [{address: 127.0.20.2}]
virtualServices:
- name: web
  hosts: [web]
  http:
  - name: api
    match: [{uri: {prefix: /api/}, headers: {x-user: {exact: bench}}}]
    route: [{destination: {host: web}}]
  - name: default
    route: [{destination: {host: web}}]
- name: greeter
  hosts: [greeter]
  http:
  - name: vip
    match: [{dubbo: {method: {exact: lookup}, args: [{index: 0, prefix: vip-}]}}]
    route: [{destination: {host: greeter}}]
  - name: hello
    match: [{dubbo: {service: {exact: org.example.Greeter}, method: {exact: sayHello}, attachments: {application: {exact: bench}}}}]
    route: [{destination: {host: greeter}}]
"#;

/// Fields drop in order: processes, programs, cgroup, namespace.
struct World {
    proxy: Proc,
    _nginx: Nginx,
    _pin: PinDir,
    cg: TestCgroup,
    ns: NetNs,
    dir: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cpu_usec(pid: u32) -> u64 {
    // utime + stime of the proxy process, in clock ticks (100 Hz) -> microseconds.
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

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(args: RoutingArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root (network namespaces, cgroups, BPF)");
    }
    let ns = NetNs::new("bench-routing");
    let cg = TestCgroup::new("bench-routing");
    let pin = PinDir::new("bench-routing");
    interceptor::attach(
        &PinLayout::new(pin.path()),
        cg.path(),
        &ScopeSettings::default(),
    )
    .map_err(|e| anyhow!("attach: {e}"))?;
    let nginx = Nginx::start(&ns, &["127.0.20.1:8080"]);
    let dir = std::env::temp_dir().join(format!("icpt-t-bench-routing-{}", std::process::id()));
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
        ],
    );
    let w = World {
        proxy,
        _nginx: nginx,
        _pin: pin,
        cg,
        ns,
        dir,
    };
    let dur = Duration::from_secs(args.duration);
    let mut rows = Vec::new();
    let (mut opaque, mut routed, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cpu_o, mut cpu_r) = (Vec::new(), Vec::new());
    let measure = |url: &str| -> Result<(f64, f64)> {
        let c0 = cpu_usec(w.proxy.pid());
        let r = Wrk::start(&w.ns, Some(&w.cg), url, 16, dur, false).finish();
        let c1 = cpu_usec(w.proxy.pid());
        if r.errors() != 0 {
            bail!("wrk {url}: {} errors\n{}", r.errors(), r.output);
        }
        let rps = r.requests as f64 / dur.as_secs_f64();
        let cpu_ms_per_1k = (c1 - c0) as f64 / 1000.0 / (r.requests as f64 / 1000.0);
        Ok((rps, cpu_ms_per_1k))
    };
    // Warm up both paths.
    measure("http://127.0.20.1:8080/")?;
    measure("http://127.0.10.1:8080/")?;
    for rep in 0..args.reps {
        let (o, co) = measure("http://127.0.20.1:8080/")?;
        let (r, cr) = measure("http://127.0.10.1:8080/")?;
        println!(
            "rep {rep}: opaque {o:.0} req/s ({co:.1} core-ms/1k), routed {r:.0} req/s ({cr:.1} core-ms/1k), routed/opaque {:.2}",
            r / o
        );
        rows.push(json!({"rep": rep, "opaque_rps": o, "routed_rps": r, "opaque_cpu_ms_per_1k": co, "routed_cpu_ms_per_1k": cr}));
        opaque.push(o);
        routed.push(r);
        ratio.push(r / o);
        cpu_o.push(co);
        cpu_r.push(cr);
    }
    let (o, r, q) = (median(&mut opaque), median(&mut routed), median(&mut ratio));
    let (co, cr) = (median(&mut cpu_o), median(&mut cpu_r));
    let mut text = format!(
        "HTTP routing vs opaque TCP, wrk -t2 -c16 keep-alive through the eBPF interception, {} reps x {}s (medians)\n\n\
         {:<10} {:>12} {:>22}\n{:<10} {:>12.0} {:>22.1}\n{:<10} {:>12.0} {:>22.1}\n\nrouted / opaque: {q:.2}\n",
        args.reps, args.duration, "path", "req/s", "proxy core-ms per 1k", "opaque", o, co, "routed", r, cr
    );

    // Dubbo 2: a provider on 127.0.20.2:20880, the client pipelining from the workload.
    let exe = std::env::current_exe()?;
    let exe = exe.to_str().expect("UTF-8 path").to_owned();
    let provider = spawn_in(
        &w.ns,
        None,
        &[&exe, "dubbo-server", "--listen", "127.0.20.2:20880"],
    );
    if !wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let out = w.ns.run(&["ss", "-Hltn", "sport = :20880"]);
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    }) {
        bail!("Dubbo provider did not start: {}", provider.stderr());
    }
    let duration_ms = (args.duration * 1000).to_string();
    let measure_dubbo = |addr: &str| -> Result<(f64, f64)> {
        let c0 = cpu_usec(w.proxy.pid());
        let mut cmd = exec_command(
            Some(&w.ns),
            Some(&w.cg),
            None,
            &[
                &exe,
                "dubbo-load",
                "--addr",
                addr,
                "--conns",
                "16",
                "--depth",
                "4",
                "--duration-ms",
                &duration_ms,
            ],
        );
        let out = run_cmd(&mut cmd, dur + Duration::from_secs(60))?;
        let c1 = cpu_usec(w.proxy.pid());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).map_err(|e| {
            anyhow!(
                "Dubbo client {addr}: {e}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let n = v["responses"].as_u64().unwrap_or(0);
        if n == 0 || v["bad"].as_u64() != Some(0) {
            bail!("Dubbo client {addr}: {v}");
        }
        Ok((
            n as f64 / dur.as_secs_f64(),
            (c1 - c0) as f64 / 1000.0 / (n as f64 / 1000.0),
        ))
    };
    measure_dubbo("127.0.20.2:20880")?;
    measure_dubbo("127.0.10.2:20880")?;
    let (mut d_o, mut d_r, mut d_q, mut d_co, mut d_cr) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..args.reps {
        let (o, co) = measure_dubbo("127.0.20.2:20880")?;
        let (r, cr) = measure_dubbo("127.0.10.2:20880")?;
        println!(
            "rep {rep}: Dubbo opaque {o:.0} req/s ({co:.1} core-ms/1k), routed {r:.0} req/s ({cr:.1} core-ms/1k), routed/opaque {:.2}",
            r / o
        );
        rows.push(json!({"rep": rep, "dubbo_opaque_rps": o, "dubbo_routed_rps": r, "dubbo_opaque_cpu_ms_per_1k": co, "dubbo_routed_cpu_ms_per_1k": cr}));
        d_o.push(o);
        d_r.push(r);
        d_q.push(r / o);
        d_co.push(co);
        d_cr.push(cr);
    }
    let (dq, dco, dcr) = (median(&mut d_q), median(&mut d_co), median(&mut d_cr));
    let (dro, drr) = (median(&mut d_o), median(&mut d_r));
    text.push_str(&format!(
        "\nDubbo 2 routing vs opaque TCP, 16 connections x 4 requests in flight, same reps (medians)\n\n\
         {:<10} {:>12} {:>22}\n{:<10} {:>12.0} {:>22.1}\n{:<10} {:>12.0} {:>22.1}\n\nrouted / opaque: {dq:.2}\n",
        "path", "req/s", "proxy core-ms per 1k", "opaque", dro, dco, "routed", drr, dcr
    ));
    drop(provider);
    println!("\n{text}");
    let doc = json!({
        "date_utc": crate::report::now_utc(),
        "reps": rows,
        "median": {"opaque_rps": o, "routed_rps": r, "routed_over_opaque": q,
                   "opaque_cpu_ms_per_1k": co, "routed_cpu_ms_per_1k": cr,
                   "dubbo_opaque_rps": dro, "dubbo_routed_rps": drr, "dubbo_routed_over_opaque": dq,
                   "dubbo_opaque_cpu_ms_per_1k": dco, "dubbo_routed_cpu_ms_per_1k": dcr},
    });
    let out = args.out.unwrap_or_else(|| {
        interceptor_tests::workspace_dir()
            .join("bench")
            .join("results")
    });
    crate::write_results(&out, &crate::result_stem("routing"), &text, &doc)?;
    Ok(())
}
