//! `interceptor-bench routing`: what HTTP routing costs against opaque TCP passthrough, in
//! one world and one run.
//!
//! The workload (a cgroup with the eBPF interception) runs `wrk -t2 -c16` with kept-alive
//! connections through `interceptor-proxy --routes FILE` to one nginx:
//!
//! - **opaque**: to nginx's own address, which no route names: the proxy copies bytes;
//! - **routed**: to a service address whose port is `HTTP`: the proxy parses each request,
//!   matches a route and sends it on a pooled upstream connection;
//! - **wasm**: routed to a second service address whose requests first run the trivial Wasm
//!   plugin (`noop`, tests/wasm-plugins): the plugin's own cost per request is its CPU per
//!   request minus routed's.
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
- hosts: [web-wasm]
  addresses: [127.0.10.3]
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

/// CPU time of the calling thread, in microseconds.
fn thread_cpu_us() -> f64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .expect("the thread CPU clock");
    t.tv_sec() as f64 * 1e6 + t.tv_nsec() as f64 / 1e3
}

/// The host's own cost of running plugin `fixture` for one request, in microseconds of CPU
/// (the median of `reps` runs of 20,000 calls on this thread, after a warm-up): what the
/// proxy's CPU per request adds, without the noise of the whole path.
fn plugin_call_us(fixture: &str, config: serde_json::Value, reps: u32) -> Result<f64> {
    use interceptor_proxy::wasm::{Plugin, PluginStats, Plugins, RequestInfo, WasmPluginSpec};
    let spec: WasmPluginSpec = serde_json::from_value(json!({
        "name": fixture,
        "url": hostops::wasm_plugins::plugin(fixture),
        "pluginConfig": config,
    }))?;
    let plugin = Plugin::load(&spec, std::sync::Arc::new(PluginStats::default()))
        .map_err(|e| anyhow!("{e}"))?;
    let plugins = Plugins::new(vec![(0, plugin)]);
    let info = RequestInfo {
        method: "GET".into(),
        path: "/api/items?page=2".into(),
        host: "web".into(),
        source: Some("127.0.0.1:40000".parse()?),
        workload: Some("/sys/fs/cgroup/bench".into()),
        destination: Some("127.0.10.1:8080".parse()?),
        service: "web".into(),
        dubbo: Default::default(),
    };
    let mut headers = http::HeaderMap::new();
    headers.insert("user-agent", http::HeaderValue::from_static("wrk"));
    headers.insert("x-amount", http::HeaderValue::from_static("5000"));
    const CALLS: u32 = 20_000;
    let mut runs = Vec::new();
    for rep in 0..=reps {
        let t0 = thread_cpu_us();
        for _ in 0..CALLS {
            let mut h = headers.clone();
            std::hint::black_box(plugins.on_request(&mut h, &info));
        }
        if rep > 0 {
            runs.push((thread_cpu_us() - t0) / f64::from(CALLS));
        }
    }
    Ok(median(&mut runs))
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
    let noop = hostops::wasm_plugins::plugin("noop");
    std::fs::write(
        &routes,
        ROUTES.replace("NOOP_PLUGIN", noop.to_str().expect("UTF-8 path")),
    )?;
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
    let (mut wasm, mut cpu_w, mut plugin_us) = (Vec::new(), Vec::new(), Vec::new());
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
    measure("http://127.0.10.3:8080/")?;
    for rep in 0..args.reps {
        let (o, co) = measure("http://127.0.20.1:8080/")?;
        let (r, cr) = measure("http://127.0.10.1:8080/")?;
        let (wr, cw) = measure("http://127.0.10.3:8080/")?;
        // core-ms per 1,000 requests = core-us per request.
        let pu = cw - cr;
        println!(
            "rep {rep}: opaque {o:.0} req/s ({co:.1} core-ms/1k), routed {r:.0} req/s ({cr:.1} core-ms/1k), routed/opaque {:.2}, wasm {wr:.0} req/s ({cw:.1} core-ms/1k, plugin {pu:.2} us/request)",
            r / o
        );
        rows.push(json!({"rep": rep, "opaque_rps": o, "routed_rps": r, "opaque_cpu_ms_per_1k": co, "routed_cpu_ms_per_1k": cr,
                         "wasm_rps": wr, "wasm_cpu_ms_per_1k": cw, "plugin_cpu_us_per_request": pu}));
        wasm.push(wr);
        cpu_w.push(cw);
        plugin_us.push(pu);
        opaque.push(o);
        routed.push(r);
        ratio.push(r / o);
        cpu_o.push(co);
        cpu_r.push(cr);
    }
    let (o, r, q) = (median(&mut opaque), median(&mut routed), median(&mut ratio));
    let (co, cr) = (median(&mut cpu_o), median(&mut cpu_r));
    let (wr, cw, pu) = (
        median(&mut wasm),
        median(&mut cpu_w),
        median(&mut plugin_us),
    );
    let noop_us = plugin_call_us("noop", json!(null), args.reps)?;
    let router_us = plugin_call_us(
        "router",
        json!({"threshold": 1000, "workload": "bench", "cluster": "web"}),
        args.reps,
    )?;
    let mut text = format!(
        "HTTP routing vs opaque TCP, wrk -t2 -c16 keep-alive through the eBPF interception, {} reps x {}s (medians)\n\n\
         {:<10} {:>12} {:>22}\n{:<10} {:>12.0} {:>22.1}\n{:<10} {:>12.0} {:>22.1}\n{:<10} {:>12.0} {:>22.1}\n\n\
         routed / opaque: {q:.2}\ntrivial Wasm plugin: {pu:.2} us of proxy CPU per request (wasm - routed, whole path; target <= 5)\n\
         plugin host, in process (thread CPU per request, median): noop {noop_us:.2} us, router {router_us:.2} us\n",
        args.reps, args.duration, "path", "req/s", "proxy core-ms per 1k", "opaque", o, co, "routed", r, cr, "wasm", wr, cw
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
                   "wasm_rps": wr, "wasm_cpu_ms_per_1k": cw, "plugin_cpu_us_per_request": pu,
                   "noop_plugin_call_us": noop_us, "router_plugin_call_us": router_us,
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
