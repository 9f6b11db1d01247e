//! The Wasm plugin host on the proxy-wasm ABI, with plugins built by the proxy-wasm Rust SDK
//! (tests/wasm-plugins): what a plugin reads and changes, what it decides, and what happens
//! when it traps, loops or asks for too much memory. The routed end to end path (a real
//! HTTP client through the interception) is in tests/tests/wasm.rs.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderValue};
use interceptor_proxy::wasm::{Plugin, PluginStats, Plugins, RequestInfo, Verdict, WasmPluginSpec};
use serde_json::json;

use hostops::wasm_plugins::plugin;

fn spec(name: &str, fixture: &str, extra: serde_json::Value) -> WasmPluginSpec {
    let mut v = json!({"name": name, "url": format!("file://{}", plugin(fixture).display())});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    serde_json::from_value(v).expect("a valid spec")
}

fn load(s: &WasmPluginSpec) -> (Plugins, Arc<PluginStats>) {
    let stats = Arc::new(PluginStats::default());
    let p = Plugin::load(s, stats.clone()).unwrap_or_else(|e| panic!("{e}"));
    (Plugins::new(vec![(0, p)]), stats)
}

fn info(workload: &str) -> RequestInfo {
    RequestInfo {
        method: "POST".into(),
        path: "/api/pay?x=1".into(),
        host: "reviews".into(),
        source: Some("127.0.0.1:40000".parse().unwrap()),
        workload: Some(workload.into()),
        destination: Some("10.0.0.20:8080".parse().unwrap()),
        service: "reviews".into(),
        dubbo: Default::default(),
    }
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_static(v));
    }
    h
}

fn router() -> WasmPluginSpec {
    spec(
        "router",
        "router",
        json!({"pluginConfig": {"threshold": 1000, "workload": "frontend", "cluster": "reviews/v2"}}),
    )
}

#[test]
fn the_router_plugin_edits_headers_and_chooses_by_a_combination() {
    let (plugins, stats) = load(&router());
    // Amount above the threshold from the frontend: the plugin's cluster.
    let mut h = headers(&[("x-amount", "1500"), ("x-remove-me", "a"), ("x-added", "0")]);
    let v = plugins.on_request(&mut h, &info("/sys/fs/cgroup/frontend.slice"));
    assert!(
        matches!(&v, Verdict::Cluster(c) if c == "reviews/v2"),
        "{v:?}"
    );
    assert!(h.get("x-remove-me").is_none(), "{h:?}");
    assert_eq!(h.get("x-plugin").unwrap(), "router");
    let added: Vec<_> = h.get_all("x-added").iter().collect();
    assert_eq!(added, ["0", "1"], "add keeps the value there");
    // The count the plugin read with get_http_request_headers, after its own three edits.
    assert_eq!(h.get("x-header-count").unwrap(), "4");

    // Either condition alone: no choice, the declarative routes decide.
    for (amount, workload) in [
        ("1500", "/sys/fs/cgroup/batch"),
        ("999", "/sys/fs/cgroup/frontend"),
    ] {
        let mut h = HeaderMap::new();
        h.insert("x-amount", HeaderValue::from_str(amount).unwrap());
        let v = plugins.on_request(&mut h, &info(workload));
        assert!(matches!(v, Verdict::Continue), "{amount} {workload}: {v:?}");
    }
    // A route by name, and a local reply.
    let mut h = headers(&[("x-route-name", "canary")]);
    let v = plugins.on_request(&mut h, &info("w"));
    assert!(matches!(&v, Verdict::Route(r) if r == "canary"), "{v:?}");
    let mut h = headers(&[("x-deny", "1")]);
    match plugins.on_request(&mut h, &info("w")) {
        Verdict::Reply(r) => {
            assert_eq!(r.status, 403);
            assert_eq!(r.body, b"denied by plugin\n");
            assert_eq!(
                r.headers,
                [("x-denied-by".to_string(), "router".to_string())]
            );
        }
        v => panic!("{v:?}"),
    }
    assert_eq!(stats.calls.load(Relaxed), 5);
    assert_eq!(stats.routed.load(Relaxed), 2);
    assert_eq!(stats.local_replies.load(Relaxed), 1);
    assert_eq!(stats.traps.load(Relaxed), 0);
}

#[test]
fn the_router_plugin_reads_the_dubbo_properties() {
    let (plugins, _) = load(&router());
    let mut i = info("w");
    for (k, v) in [
        ("service", "org.example.Greeter"),
        ("method", "greet"),
        ("args.0", "vip-42"),
        ("attachments.application", "shop"),
    ] {
        i.dubbo.insert(k.into(), v.into());
    }
    let v = plugins.on_request(&mut HeaderMap::new(), &i);
    assert!(
        matches!(&v, Verdict::Cluster(c) if c == "reviews/v2"),
        "{v:?}"
    );
    i.dubbo.insert("args.0".into(), "plain".into());
    let v = plugins.on_request(&mut HeaderMap::new(), &i);
    assert!(matches!(v, Verdict::Continue), "{v:?}");
}

#[test]
fn a_trapping_plugin_fails_closed_or_open_and_is_counted() {
    let (plugins, stats) = load(&spec("trap", "trap", json!({})));
    let mut h = headers(&[("x-a", "1")]);
    let v = plugins.on_request(&mut h, &info("w"));
    assert!(
        matches!(&v, Verdict::Failed { plugin } if plugin == "trap"),
        "{v:?}"
    );
    assert_eq!(stats.traps.load(Relaxed), 1);
    assert_eq!(stats.failed_closed.load(Relaxed), 1);

    let (plugins, stats) = load(&spec("trap", "trap", json!({"failStrategy": "FAIL_OPEN"})));
    for _ in 0..20 {
        let mut h = headers(&[("x-a", "1")]);
        let v = plugins.on_request(&mut h, &info("w"));
        assert!(matches!(v, Verdict::Continue), "{v:?}");
        assert_eq!(
            h.get("x-a").unwrap(),
            "1",
            "the headers as before the plugin"
        );
    }
    // Each failed instance was dropped and a new one made: all 20 trapped the same way.
    assert_eq!(stats.traps.load(Relaxed), 20);
    assert_eq!(stats.failed_open.load(Relaxed), 20);
}

#[test]
fn an_endless_loop_runs_out_of_fuel() {
    let (plugins, stats) = load(&spec("spin", "spin", json!({"failStrategy": "FAIL_OPEN"})));
    let mut worst = std::time::Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        let v = plugins.on_request(&mut HeaderMap::new(), &info("w"));
        worst = worst.max(t.elapsed());
        assert!(matches!(v, Verdict::Continue), "{v:?}");
    }
    println!("an endless loop stopped after at most {worst:?} (default fuel 1,000,000)");
    assert_eq!(stats.fuel_exhausted.load(Relaxed), 5);
    assert_eq!(stats.traps.load(Relaxed), 0);
}

#[test]
fn a_plugin_over_its_memory_cap_fails_and_is_counted_as_memory() {
    let (plugins, stats) = load(&spec("hog", "hog", json!({"limits": {"memoryMiB": 16}})));
    let v = plugins.on_request(&mut HeaderMap::new(), &info("w"));
    assert!(matches!(v, Verdict::Failed { .. }), "{v:?}");
    assert_eq!(stats.memory_exceeded.load(Relaxed), 1);
    // With room for its 64 MiB the same plugin passes.
    let (plugins, stats) = load(&spec(
        "hog",
        "hog",
        json!({"limits": {"memoryMiB": 80, "fuel": 100000000}}),
    ));
    let v = plugins.on_request(&mut HeaderMap::new(), &info("w"));
    assert!(matches!(v, Verdict::Continue), "{v:?}");
    assert_eq!(stats.memory_exceeded.load(Relaxed), 0);
}

#[test]
fn plugins_that_cannot_load_are_refused_naming_the_cause() {
    let stats = Arc::new(PluginStats::default());
    let missing: WasmPluginSpec =
        serde_json::from_value(json!({"name": "gone", "url": "/nonexistent/p.wasm"})).unwrap();
    let e = Plugin::load(&missing, stats.clone())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"gone\"") && e.contains("/nonexistent/p.wasm"),
        "{e}"
    );
    let dir = std::env::temp_dir().join(format!("icpt-wasm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.wasm");
    std::fs::write(&junk, b"\0asm but not really").unwrap();
    let bad: WasmPluginSpec =
        serde_json::from_value(json!({"name": "junk", "url": junk.display().to_string()})).unwrap();
    let e = Plugin::load(&bad, stats).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(e.contains("not a valid Wasm module"), "{e}");
}

#[test]
fn many_threads_share_a_plugin() {
    let (plugins, stats) = load(&router());
    let plugins = Arc::new(plugins);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let plugins = plugins.clone();
            std::thread::spawn(move || {
                for i in 0..500u32 {
                    let mut h = HeaderMap::new();
                    let amount = if (i + t) % 2 == 0 { "5000" } else { "10" };
                    h.insert("x-amount", HeaderValue::from_static(amount));
                    let v = plugins.on_request(&mut h, &info("/frontend"));
                    assert_eq!(matches!(v, Verdict::Cluster(_)), amount == "5000");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(stats.calls.load(Relaxed), 4000);
    assert_eq!(stats.routed.load(Relaxed), 2000);
}

/// The systemd unit runs the proxy with `MemoryDenyWriteExecute=yes`, which a JIT engine
/// breaks (it needs memory that is written, then executed). The same rule, set on the
/// process with `prctl(PR_SET_MDWE)` (kept across exec): the proxy loads, configures and runs
/// a plugin (its `proxy_on_configure` logs), and serves, because wasmi interprets.
#[test]
fn plugins_run_where_memory_may_not_be_written_then_executed() {
    let dir = std::env::temp_dir().join(format!("icpt-wasm-mdwe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let routes = dir.join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "serviceEntries:\n- hosts: [web]\n  addresses: [127.0.10.1]\n  ports: [{{number: 8080, protocol: HTTP}}]\n\
             wasmPlugins:\n- name: router\n  url: {}\n  pluginConfig: {{cluster: web}}\n",
            plugin("router").display()
        ),
    )
    .unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // PR_SET_MDWE = 65, PR_MDWE_REFUSE_EXEC_GAIN = 1; then exec the proxy.
    let script = "import ctypes, os, sys\n\
                  assert ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) == 0, 'PR_SET_MDWE'\n\
                  os.execv(sys.argv[1], sys.argv[1:])\n";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script, env!("CARGO_BIN_EXE_interceptor-proxy")])
        .args(["--outbound", "127.0.0.1:0", "--bypass-mark", "0", "--admin"])
        .arg(admin.to_string())
        .arg("--routes")
        .arg(&routes)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ready = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::net::TcpStream::connect(admin).is_ok_and(|mut s| {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /ready HTTP/1.0\r\n\r\n");
            let mut r = String::new();
            let _ = s.read_to_string(&mut r);
            r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200")
        })
    });
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(ready, "the proxy under MDWE never got ready:\n{stderr}");
    assert!(
        stderr.contains("router: configured, cluster web"),
        "the plugin ran its configuration:\n{stderr}"
    );
}
