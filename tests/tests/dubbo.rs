//! Dubbo 2 routing end to end: the workload's connections to Dubbo service addresses are
//! intercepted by the kernel programs and routed per request by `interceptor-proxy
//! --routes FILE`. The workload is dubbo-ssl-python 0.9.6 from PyPI (a Dubbo client with
//! its own Hessian 2 codec, nobody here wrote it); the providers are Python test servers
//! built on that package's Hessian 2 reader and writer (`tests/python/`), each answering
//! with its own name, so every answer shows where its request was routed.
//!
//! Needs `cargo xtask setup` (the venv in `target/dubbo-venv`). Run as root, one test at a
//! time: `cargo xtask test -- dubbo`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use interceptor::{PinLayout, ScopeSettings};
use interceptor_tests::dubbo::{dubbo_python, python_script};
use interceptor_tests::openmetrics::{parse_openmetrics, sum, Sample};
use interceptor_tests::{
    exec_command, run_cmd, spawn_in, start_proxy, wait_until, NetNs, PinDir, Proc, ScratchDir,
    TestCgroup,
};
use serde_json::Value;

const ADMIN: &str = "127.0.0.1:15000";
/// Service addresses the workload dials (nothing listens there: only the routes make them
/// reachable).
const GREETER: &str = "127.0.10.1:20880";
const STRICT: &str = "127.0.10.2:20880";
const AUTO: &str = "127.0.10.3:20880";
/// Two endpoints, one refusing connections (nothing listens on 127.0.20.9).
const FLAKY: &str = "127.0.10.4:20880";
/// The providers: name (= subset label) and address.
const PROVIDERS: [(&str, &str); 5] = [
    ("v1", "127.0.20.1:20880"),
    ("v2", "127.0.20.2:20880"),
    ("m", "127.0.20.3:20880"),
    ("a", "127.0.20.4:20880"),
    ("c", "127.0.20.5:20880"),
];

const ROUTES: &str = r#"
serviceEntries:
- hosts: [greeter]
  addresses: [127.0.10.1]
  ports: [{number: 20880, name: dubbo, protocol: DUBBO}]
  endpoints:
  - {address: 127.0.20.1, labels: {version: v1}}
  - {address: 127.0.20.2, labels: {version: v2}}
  - {address: 127.0.20.3, labels: {version: m}}
  - {address: 127.0.20.4, labels: {version: a}}
  - {address: 127.0.20.5, labels: {version: c}}
- hosts: [strict]
  addresses: [127.0.10.2]
  ports: [{number: 20880, name: dubbo, protocol: DUBBO}]
  endpoints: [{address: 127.0.20.1}]
- hosts: [auto]
  addresses: [127.0.10.3]
  ports: [{number: 20880, name: auto, protocol: AUTO}]
  endpoints:
  - {address: 127.0.20.1}
  - {address: 127.0.20.5, labels: {version: c}}
- hosts: [flaky]
  addresses: [127.0.10.4]
  ports: [{number: 20880, name: dubbo, protocol: DUBBO}]
  endpoints: [{address: 127.0.20.9}, {address: 127.0.20.1}]
virtualServices:
- name: greeter
  hosts: [greeter]
  http:
  - name: by-app
    match: [{dubbo: {attachments: {application: {exact: canary}}}}]
    route: [{destination: {host: greeter, subset: c}}]
  - name: by-method
    match: [{dubbo: {service: {exact: org.example.Greeter}, method: {exact: sayHello}}}]
    route: [{destination: {host: greeter, subset: m}}]
  - name: by-arg
    match: [{dubbo: {method: {exact: lookup}, args: [{index: 0, prefix: vip-}]}}]
    route: [{destination: {host: greeter, subset: a}}]
  - name: split
    route:
    - {destination: {host: greeter, subset: v1}, weight: 70}
    - {destination: {host: greeter, subset: v2}, weight: 30}
- name: strict
  hosts: [strict]
  http:
  - name: slow
    match: [{dubbo: {method: {exact: sleep}}}]
    route: [{destination: {host: strict}}]
    timeout: 300ms
  - name: hello-only
    match: [{dubbo: {method: {exact: sayHello}}}]
    route: [{destination: {host: strict}}]
- name: auto
  hosts: [auto]
  http:
  - name: hello
    match: [{dubbo: {method: {exact: sayHello}}}]
    route: [{destination: {host: auto, subset: c}}]
- name: flaky
  hosts: [flaky]
  http:
  - name: retried
    route: [{destination: {host: flaky}}]
    retries: {attempts: 1, retryOn: connect-failure}
destinationRules:
- host: greeter
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: m, labels: {version: m}}
  - {name: a, labels: {version: a}}
  - {name: c, labels: {version: c}}
- host: auto
  subsets: [{name: c, labels: {version: c}}]
"#;

/// Fields drop in declaration order: processes, scratch, programs, cgroup, namespace.
struct World {
    proxy: Option<Proc>,
    providers: Vec<Proc>,
    dir: ScratchDir,
    pin: PinDir,
    cg: TestCgroup,
    ns: NetNs,
}

impl World {
    fn new(test: &str) -> World {
        World::with_routes(test, ROUTES)
    }

    fn with_routes(test: &str, routes_text: &str) -> World {
        interceptor_tests::register_helper_bins!();
        let python = dubbo_python();
        let ns = NetNs::new(test);
        let cg = TestCgroup::new(test);
        let pin = PinDir::new(test);
        let dir = ScratchDir::new(test);
        let mut w = World {
            proxy: None,
            providers: Vec::new(),
            dir,
            pin,
            cg,
            ns,
        };
        interceptor::attach(
            &PinLayout::new(w.pin.path()),
            w.cg.path(),
            &ScopeSettings::default(),
        )
        .unwrap_or_else(|e| panic!("attach: {e}"));
        let provider = python_script("dubbo_provider.py");
        for (name, addr) in PROVIDERS {
            let stats = w.stats_path(name);
            // Each provider also sends a heartbeat every 100 ms on each connection.
            let p = spawn_in(
                &w.ns,
                None,
                &[
                    python.to_str().unwrap(),
                    provider.to_str().unwrap(),
                    addr,
                    name,
                    stats.to_str().unwrap(),
                    "100",
                ],
            );
            w.providers.push(p);
        }
        assert!(
            wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
                let out = w.ns.run(&["ss", "-Hltn", "sport = :20880"]);
                String::from_utf8_lossy(&out.stdout).lines().count() == PROVIDERS.len()
            }),
            "providers did not start: {}",
            w.providers[0].stderr()
        );
        let routes = w.dir.join("routes.yaml");
        std::fs::write(&routes, routes_text).unwrap();
        w.proxy = Some(start_proxy(
            &w.ns,
            &[
                "--admin",
                ADMIN,
                "--routes",
                routes.to_str().unwrap(),
                "--dubbo-max-body",
                "64KiB",
                // The client sleeps 500 ms between its connect and its first request (its
                // connection pool does): an AUTO port must wait that long to see the magic.
                "--protocol-detection-timeout",
                "2s",
            ],
        ));
        w
    }

    fn stats_path(&self, provider: &str) -> PathBuf {
        self.dir.join(format!("{provider}.json"))
    }

    /// A provider's counters (requests, connections, heartbeats).
    fn provider_stats(&self, provider: &str) -> Value {
        read_json(&self.stats_path(provider))
    }

    /// `dubbo_client.py ARGS` as the workload (in its cgroup, so intercepted): its JSON.
    fn client(&self, args: &[&str]) -> Value {
        let python = dubbo_python();
        let script = python_script("dubbo_client.py");
        let mut cmd = vec![python.to_str().unwrap(), script.to_str().unwrap()];
        cmd.extend_from_slice(args);
        let mut c = exec_command(Some(&self.ns), Some(&self.cg), None, &cmd);
        let out = run_cmd(&mut c, Duration::from_secs(300)).expect("run the Dubbo client");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| {
            panic!(
                "{args:?}: {e}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Counts of a `tally` run to `GREETER`, by `METHOD:K>PROVIDER`.
    fn tally(&self, n: u32, methods: &str, args: &str, app: &str) -> BTreeMap<String, u64> {
        self.tally_to(GREETER, n, methods, args, app)
    }

    fn tally_to(
        &self,
        addr: &str,
        n: u32,
        methods: &str,
        args: &str,
        app: &str,
    ) -> BTreeMap<String, u64> {
        let n = n.to_string();
        let v = self.client(&["tally", addr, &n, methods, args, app]);
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
            .collect()
    }

    fn metrics(&self) -> Vec<Sample> {
        let text = self.ns.run_ok(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            &format!("http://{ADMIN}/metrics"),
        ]);
        parse_openmetrics(&text).unwrap()
    }
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

fn get(t: &BTreeMap<String, u64>, k: &str) -> u64 {
    t.get(k).copied().unwrap_or(0)
}

#[test]
fn dubbo_requests_route_by_method_argument_application_and_weight() {
    let w = World::new("db-route");
    // By method, over 2,000 requests: every sayHello to `m`, the others by the 70/30 split.
    let t = w.tally(2000, "sayHello,other", "u-{i}", "-");
    assert_eq!(get(&t, "sayHello:0>m"), 1000, "{t:?}");
    let (v1, v2) = (get(&t, "other:0>v1"), get(&t, "other:0>v2"));
    assert_eq!(v1 + v2, 1000, "the others only by the split: {t:?}");
    // 70/30 of 1,000: the standard deviation is 14.5, so 620..780 is over 5 of them.
    assert!((620..=780).contains(&v1), "weights 70/30: {t:?}");
    // By argument value, over 2,000 requests: lookup("vip-…") to `a`, lookup("user-…") not.
    let t = w.tally(2000, "lookup", "vip-{i};user-{i}", "-");
    assert_eq!(get(&t, "lookup:0>a"), 1000, "{t:?}");
    assert_eq!(
        get(&t, "lookup:1>v1") + get(&t, "lookup:1>v2"),
        1000,
        "{t:?}"
    );
    // By the calling application (an attachment): canary to `c`, before the method rule.
    let t = w.tally(200, "sayHello,other", "x", "canary");
    assert_eq!(get(&t, "sayHello:0>c") + get(&t, "other:0>c"), 200, "{t:?}");
    let t = w.tally(200, "other", "x", "web");
    assert_eq!(get(&t, "other:0>c"), 0, "{t:?}");
    // AUTO: the 0xdabb magic is detected and the request routed (to `c` by its method).
    let r = w.client(&["call", AUTO, "sayHello", "auto"]);
    assert_eq!(
        r["result"].as_str().unwrap(),
        "c|org.example.Greeter|sayHello|auto|",
        "{r}"
    );
    // Per-route and per-cluster metrics.
    let m = w.metrics();
    let route = |name: &str| {
        sum(
            &m,
            "interceptor_proxy_route_requests_total",
            &[("virtual_service", "greeter"), ("route", name)],
        )
    };
    assert_eq!(route("by-method"), 1000.0);
    assert_eq!(route("by-arg"), 1000.0);
    assert_eq!(route("by-app"), 200.0);
    assert_eq!(route("split"), 1000.0 + 1000.0 + 200.0);
    let cluster = |name: &str| {
        sum(
            &m,
            "interceptor_proxy_cluster_responses_total",
            &[("cluster", name), ("class", "2xx")],
        )
    };
    assert_eq!(cluster("greeter|20880|m"), 1000.0);
    assert_eq!(cluster("greeter|20880|a"), 1000.0);
    assert_eq!(
        sum(&m, "interceptor_proxy_dubbo_requests_total", &[]),
        4401.0
    );
}

#[test]
fn pipelined_requests_of_many_callers_share_upstream_connections_and_get_their_own_answers() {
    let w = World::new("db-pipe");
    // Two client processes (their request ids both count from 0), 16 threads each on the
    // client's one connection, answers delayed at random so that they come back out of
    // order: every answer must carry its own caller's argument.
    let python = dubbo_python();
    let script = python_script("dubbo_client.py");
    let clients: Vec<_> = ["p", "q"]
        .iter()
        .map(|tag| {
            let mut c = exec_command(
                Some(&w.ns),
                Some(&w.cg),
                None,
                &[
                    python.to_str().unwrap(),
                    script.to_str().unwrap(),
                    "pipeline",
                    GREETER,
                    "16",
                    "40",
                    tag,
                ],
            );
            c.stdout(std::process::Stdio::piped());
            c.stderr(std::process::Stdio::piped());
            c.spawn().expect("spawn the Dubbo client")
        })
        .collect();
    for c in clients {
        let out = c.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(v["ok"], 640, "{v}");
        assert_eq!(v["wrong"], 0, "{v}");
        assert_eq!(v["errors"], 0, "{v}");
    }
    // 1,280 requests from two client connections went over at most one upstream connection
    // per endpoint of the split (v1, v2).
    let m = w.metrics();
    assert_eq!(
        sum(&m, "interceptor_proxy_dubbo_requests_total", &[]),
        1280.0
    );
    let upstream = sum(
        &m,
        "interceptor_proxy_dubbo_upstream_connections_total",
        &[],
    );
    assert!((1.0..=2.0).contains(&upstream), "{upstream}");
    let served: u64 = ["v1", "v2"]
        .iter()
        .map(|p| w.provider_stats(p)["requests"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(served, 1280);
}

#[test]
fn heartbeats_are_answered_on_both_sides() {
    let w = World::new("db-heart");
    // The client's own heartbeat loop, every 30 ms for 1.5 s: each answered by the proxy
    // (the client reconnects after 3 unanswered ones), and the connection still serves.
    let v = w.client(&["heartbeat", GREETER, "1.5"]);
    let sent = v["sent"].as_u64().unwrap();
    let answered = v["answered"].as_u64().unwrap();
    assert!(sent >= 10, "{v}");
    assert!(answered + 1 >= sent, "{v}");
    assert_eq!(v["reconnected"], 0, "{v}");
    assert_eq!(v["last"], "m|org.example.Greeter|sayHello|hb|", "{v}");
    // The provider's heartbeats (every 100 ms on its connection from the proxy) are answered
    // by the proxy too.
    let mut s = Value::Null;
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            s = w.provider_stats("m");
            s["hb_answered"].as_u64().unwrap_or(0) >= 5
        }),
        "provider heartbeats unanswered: {s}"
    );
    assert!(
        s["hb_answered"].as_u64().unwrap() + 2 >= s["hb_sent"].as_u64().unwrap(),
        "{s}"
    );
    // None reached the provider as a request: the client's were answered by the proxy.
    assert_eq!(s["hb_from_peer"], 0, "{s}");
    assert_eq!(s["requests"], 2, "{s}");
    let m = w.metrics();
    assert!(sum(&m, "interceptor_proxy_dubbo_heartbeats_total", &[]) >= (sent + 5) as f64);
}

#[test]
fn bad_frames_close_the_connection_and_an_undecodable_body_gets_bad_request() {
    let w = World::new("db-bad");
    let v = w.client(&["badinput", GREETER]);
    let before = &v["before"];
    assert_eq!(
        (before[0].as_u64(), before[1].as_u64()),
        (Some(5), Some(20)),
        "{v}"
    );
    // The undecodable body: BAD_REQUEST (40) with its id and the reason, in Dubbo's format;
    // the connection stays up and serves the next request.
    let bad = &v["undecodable"];
    assert_eq!(
        (bad[0].as_u64(), bad[1].as_u64()),
        (Some(77), Some(40)),
        "{v}"
    );
    assert!(
        bad[2]
            .as_str()
            .unwrap()
            .contains("the request body does not decode"),
        "{v}"
    );
    assert_eq!(
        v["after"],
        serde_json::json!([6, 20, "m|org.example.Greeter|sayHello|after|"]),
        "{v}"
    );
    // A bad magic and a body over --dubbo-max-body (64 KiB here) close the connection; a
    // body under it is served.
    assert_eq!(v["bad_magic"], "closed", "{v}");
    assert_eq!(v["over_cap"], "closed", "{v}");
    let under = &v["under_cap"];
    assert_eq!(
        (under[0].as_u64(), under[1].as_u64()),
        (Some(9), Some(20)),
        "{v}"
    );
    assert!(under[2].as_u64().unwrap() > 30_000, "{v}");
    let m = w.metrics();
    let closed = |reason| {
        sum(
            &m,
            "interceptor_proxy_dubbo_closed_connections_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(closed("bad_magic"), 1.0);
    assert_eq!(closed("over_cap"), 1.0);
    assert_eq!(
        sum(&m, "interceptor_proxy_dubbo_bad_requests_total", &[]),
        1.0
    );
    // No route: SERVICE_NOT_FOUND; a route's timeout: SERVER_TIMEOUT; both with the
    // proxy's reason, as the client reports them.
    let r = w.client(&["call", STRICT, "other", "x"]);
    let r = r["result"].as_str().unwrap();
    assert!(
        r.contains("no route matched org.example.Greeter:1.0.0.other"),
        "{r}"
    );
    let r = w.client(&["call", STRICT, "sleep", "2000"]);
    let r = r["result"].as_str().unwrap();
    assert!(r.contains("within the route's timeout 300ms"), "{r}");
    let m = w.metrics();
    assert_eq!(
        sum(
            &m,
            "interceptor_proxy_cluster_upstream_errors_total",
            &[("cluster", "strict|20880|"), ("kind", "timeout")]
        ),
        1.0
    );
    assert_eq!(
        sum(&m, "interceptor_proxy_no_route_requests_total", &[]),
        1.0
    );
}

#[test]
fn a_failed_connect_is_retried_on_another_endpoint() {
    let w = World::new("db-retry");
    // Round robin over a dead endpoint and a live one, one retry on connect failure: every
    // request is served. The dead endpoint's pool slot tries to connect again each time, so
    // about half of the 40 requests meet it first.
    let t = w.tally_to(FLAKY, 40, "sayHello", "r{i}", "-");
    assert_eq!(get(&t, "sayHello:0>v1"), 40, "{t:?}");
    let m = w.metrics();
    let retries = sum(
        &m,
        "interceptor_proxy_cluster_retries_total",
        &[("cluster", "flaky|20880|")],
    );
    assert!(retries >= 10.0, "{retries}");
    assert_eq!(
        sum(
            &m,
            "interceptor_proxy_cluster_upstream_errors_total",
            &[("cluster", "flaky|20880|"), ("kind", "connect")]
        ),
        retries
    );
}

#[test]
fn requests_in_flight_on_an_upstream_that_dies_are_answered_and_the_pool_reconnects() {
    let mut w = World::new("db-died");
    // A call answered after 3 s (split route: v1 or v2, no timeout); both providers of the
    // split are killed while it waits.
    let python = dubbo_python();
    let script = python_script("dubbo_client.py");
    let mut cmd = exec_command(
        Some(&w.ns),
        Some(&w.cg),
        None,
        &[
            python.to_str().unwrap(),
            script.to_str().unwrap(),
            "call",
            GREETER,
            "sleep",
            "3000",
        ],
    );
    cmd.stdout(std::process::Stdio::piped());
    let client = cmd.spawn().expect("spawn the Dubbo client");
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            ["v1", "v2"]
                .iter()
                .any(|p| w.provider_stats(p)["requests"].as_u64() == Some(1))
        }),
        "the call did not reach a provider"
    );
    w.providers[0].kill();
    w.providers[1].kill();
    let out = client.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = v["result"].as_str().unwrap();
    assert!(
        r.starts_with("error:") && r.contains("closed the connection"),
        "{r}"
    );
    // Nothing listens now: refused, SERVER_ERROR naming it.
    let r = w.client(&["call", GREETER, "other", "x"]);
    assert!(
        r["result"].as_str().unwrap().contains("Connection refused"),
        "{r}"
    );
    // The providers back: the pool connects again.
    let python = python.to_str().unwrap().to_owned();
    let provider = python_script("dubbo_provider.py");
    for (i, (name, addr)) in PROVIDERS[..2].iter().enumerate() {
        let stats = w.stats_path(name);
        w.providers[i] = spawn_in(
            &w.ns,
            None,
            &[
                &python,
                provider.to_str().unwrap(),
                addr,
                name,
                stats.to_str().unwrap(),
                "0",
            ],
        );
    }
    assert!(wait_until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            let out = w.ns.run(&["ss", "-Hltn", "sport = :20880"]);
            String::from_utf8_lossy(&out.stdout).lines().count() == PROVIDERS.len()
        }
    ));
    let r = w.client(&["call", GREETER, "other", "x"]);
    let r = r["result"].as_str().unwrap();
    assert!(r.starts_with("v1|") || r.starts_with("v2|"), "{r}");
}

/// A Wasm routing plugin (tests/wasm-plugins/router) sees each Dubbo call's service, method,
/// arguments and attachments as properties: it sends `greet` calls whose first argument
/// starts with "vip" from a caller naming its application to the cluster of its
/// configuration (subset `m`, which no declarative route gives `greet`), the others to the
/// declarative routes (the 70/30 split).
#[test]
fn a_wasm_plugin_routes_dubbo_calls_by_their_properties() {
    let plugin = hostops::wasm_plugins::plugin("router");
    let routes = format!(
        "{ROUTES}wasmPlugins:\n- name: router\n  url: {}\n  targetRefs: [{{kind: Service, name: greeter}}]\n  \
         pluginConfig: {{cluster: greeter/m}}\n",
        plugin.display()
    );
    let w = World::with_routes("db-wasm", &routes);
    let t = w.tally(400, "greet", "vip-{i};user-{i}", "shop");
    assert_eq!(get(&t, "greet:0>m"), 200, "vip calls by the plugin: {t:?}");
    assert_eq!(
        get(&t, "greet:1>v1") + get(&t, "greet:1>v2"),
        200,
        "the others by the routes: {t:?}"
    );
    // Without an application attachment the plugin leaves every call to the routes.
    let t = w.tally(100, "greet", "vip-{i}", "-");
    assert_eq!(get(&t, "greet:0>m"), 0, "{t:?}");
    assert_eq!(get(&t, "greet:0>v1") + get(&t, "greet:0>v2"), 100, "{t:?}");
    let m = w.metrics();
    assert_eq!(
        sum(
            &m,
            "interceptor_proxy_wasm_plugin_calls_total",
            &[("plugin", "router")]
        ),
        500.0
    );
    assert_eq!(
        sum(
            &m,
            "interceptor_proxy_wasm_plugin_decisions_total",
            &[("plugin", "router"), ("decision", "routed")]
        ),
        200.0
    );
}
