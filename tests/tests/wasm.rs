//! Wasm routing plugins end to end: the workload's HTTP requests to a service address are
//! intercepted by the kernel programs and routed by `interceptor-proxy --routes FILE`, whose
//! `wasmPlugins` run plugins built with the proxy-wasm Rust SDK (tests/wasm-plugins) before
//! the declarative routes: a plugin that routes on what no rule can express, plugins that
//! trap or never return, and plugins reloaded under wrk load.
//!
//! Run as root, one test at a time: `cargo xtask test -- wasm`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hostops::wasm_plugins::plugin;
use interceptor::{PinLayout, ScopeSettings};
use interceptor_tests::openmetrics::parse_openmetrics;
use interceptor_tests::{
    exec_command, nginx_named_servers, run_cmd, start_proxy, NetNs, PinDir, Proc, ScratchDir,
    TestCgroup, Wrk,
};

const ADMIN: &str = "127.0.0.1:15000";
/// The service address the workload dials (nothing listens there).
const REVIEWS: &str = "127.0.10.1:8080";

/// Fields drop in declaration order: processes, scratch, programs, cgroup, namespace.
struct World {
    proxy: Option<Proc>,
    servers: Vec<Proc>,
    dir: ScratchDir,
    _pin: PinDir,
    cg: TestCgroup,
    ns: NetNs,
}

/// The routes: every request to `reviews` goes to v1, unless a plugin decides otherwise.
/// `plugins` is the `wasmPlugins` list.
fn routes(plugins: &str) -> String {
    format!(
        r#"
serviceEntries:
- hosts: [reviews]
  addresses: [127.0.10.1]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.20.1, labels: {{version: v1}}}}
  - {{address: 127.0.20.2, labels: {{version: v2}}}}
virtualServices:
- name: reviews
  hosts: [reviews]
  http:
  - name: canary
    match: [{{headers: {{x-never-sent: {{exact: "1"}}}}}}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - name: default
    route: [{{destination: {{host: reviews, subset: v1}}}}]
destinationRules:
- host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
wasmPlugins:
{plugins}
"#
    )
}

fn router_plugin(workload: &Path) -> String {
    format!(
        "- name: router\n  url: file://{}\n  targetRefs: [{{kind: Service, name: reviews}}]\n  \
         pluginConfig: {{threshold: 1000, workload: \"{}\", cluster: reviews/v2}}\n",
        plugin("router").display(),
        workload.display()
    )
}

fn named_plugin(name: &str, fixture: &str, fail: &str) -> String {
    format!(
        "- name: {name}\n  url: {}\n  failStrategy: {fail}\n",
        plugin(fixture).display()
    )
}

impl World {
    fn new(test: &str, plugins: &str) -> World {
        interceptor_tests::register_helper_bins!();
        let ns = NetNs::new(test);
        let cg = TestCgroup::new(test);
        let pin = PinDir::new(test);
        let dir = ScratchDir::new(test);
        let mut w = World {
            proxy: None,
            servers: Vec::new(),
            dir,
            _pin: pin,
            cg,
            ns,
        };
        interceptor::attach(
            &PinLayout::new(w._pin.path()),
            w.cg.path(),
            &ScopeSettings::default(),
        )
        .unwrap_or_else(|e| panic!("attach: {e}"));
        w.start_nginx();
        w.write_routes(plugins);
        let routes = w.routes_path();
        w.proxy = Some(start_proxy(
            &w.ns,
            &["--admin", ADMIN, "--routes", routes.to_str().unwrap()],
        ));
        w
    }

    fn routes_path(&self) -> PathBuf {
        self.dir.join("routes.yaml")
    }

    fn write_routes(&self, plugins: &str) {
        let tmp = self.routes_path().with_extension("tmp");
        std::fs::write(&tmp, routes(plugins)).unwrap();
        std::fs::rename(&tmp, self.routes_path()).unwrap();
    }

    /// POST /routes/reload: (status, body).
    fn reload(&self) -> (u16, String) {
        let out = self.ns.run(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            "-X",
            "POST",
            &format!("http://{ADMIN}/routes/reload"),
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    fn start_nginx(&mut self) {
        let p = nginx_named_servers(
            &self.ns,
            &self.dir.join("nginx"),
            &[("127.0.20.1:8080", "v1"), ("127.0.20.2:8080", "v2")],
            "{name} plugin=$http_x_plugin removed=$http_x_remove_me",
            8080,
        );
        self.servers.push(p);
    }

    /// `n` keep-alive requests from the workload to `/PATH`, each with the headers `header`
    /// returns for its index; the responses counted by status and first word, e.g. `200 v1`.
    fn tally(&self, path: &str, n: u32, headers: &str) -> BTreeMap<String, u32> {
        // `headers` is a Python expression of `i`, a dict.
        let script = format!(
            r#"
import http.client, collections, sys
c = http.client.HTTPConnection("{REVIEWS}", timeout=10)
t = collections.Counter()
for i in range({n}):
    c.request("GET", "{path}", headers={headers})
    r = c.getresponse()
    b = r.read().decode()
    t["%d-%s" % (r.status, (b.split() or ["-"])[0])] += 1
print(" ".join("%s=%d" % kv for kv in sorted(t.items())))
"#
        );
        let mut c = exec_command(
            Some(&self.ns),
            Some(&self.cg),
            None,
            &["/usr/bin/python3", "-c", &script],
        );
        let out = run_cmd(&mut c, Duration::from_secs(120)).expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
            .collect()
    }

    /// One request from the workload with curl: the body, `-i` style with headers.
    fn curl(&self, args: &[&str]) -> String {
        let mut cmd = vec!["curl", "-sS", "-i", "--max-time", "10"];
        cmd.extend_from_slice(args);
        let mut c = exec_command(Some(&self.ns), Some(&self.cg), None, &cmd);
        let out = run_cmd(&mut c, Duration::from_secs(30)).expect("run");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A counter of /metrics with these labels (0 if absent would hide a missing family:
    /// panics then).
    fn metric(&self, family: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.ns.run_ok(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            &format!("http://{ADMIN}/metrics"),
        ]);
        let m = parse_openmetrics(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        m.iter()
            .find(|s| {
                s.name == format!("{family}_total")
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .unwrap_or_else(|| panic!("{family} {labels:?} not in /metrics:\n{text}"))
    }
}

#[test]
fn a_plugin_routes_on_what_no_rule_can_express() {
    let mut w = World::new("wasm-route", "  []");
    // The plugin's workload is this test's cgroup: requests over the threshold from it go to
    // v2, the rest to the declarative default (v1).
    w.write_routes(&router_plugin(w.cg.path()));
    let (code, body) = w.reload();
    assert_eq!(code, 200, "{body}");
    // 2,000 requests on one kept-alive connection: even ones over the threshold.
    let t = w.tally(
        "/pay",
        2000,
        "{'x-amount': str(1500 if i % 2 == 0 else 999), 'x-remove-me': 'gone'}",
    );
    assert_eq!(
        t,
        BTreeMap::from([("200-v1".to_string(), 1000), ("200-v2".to_string(), 1000)]),
        "{t:?}"
    );
    // The headers as the plugin left them reach the upstream.
    let r = w.curl(&[&format!("http://{REVIEWS}/h"), "-H", "x-remove-me: 1"]);
    assert!(r.contains("v1 plugin=router removed=\n"), "{r}");
    // A local reply.
    let r = w.curl(&[&format!("http://{REVIEWS}/"), "-H", "x-deny: 1"]);
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(
        r.to_ascii_lowercase().contains("x-denied-by: router"),
        "{r}"
    );
    assert!(r.ends_with("denied by plugin\n"), "{r}");
    // The route by name: the canary route, whose own match no request meets.
    let r = w.curl(&[&format!("http://{REVIEWS}/"), "-H", "x-route-name: canary"]);
    assert!(r.contains("\nv2 plugin=router"), "{r}");
    assert_eq!(
        w.metric(
            "interceptor_proxy_wasm_plugin_calls",
            &[("plugin", "router")]
        ),
        2003.0
    );
    assert_eq!(
        w.metric(
            "interceptor_proxy_wasm_plugin_decisions",
            &[("plugin", "router"), ("decision", "routed")]
        ),
        1001.0
    );
    assert_eq!(
        w.metric(
            "interceptor_proxy_wasm_plugin_decisions",
            &[("plugin", "router"), ("decision", "local_reply")]
        ),
        1.0
    );
    let p = w.proxy.as_mut().unwrap();
    assert!(p.is_running());
    assert!(
        p.stderr().contains("router: GET /pay from"),
        "the plugin's log lines reach the proxy's log"
    );
}

#[test]
fn trapping_and_endless_plugins_get_the_fallback_and_the_proxy_serves_on() {
    let mut w = World::new("wasm-fail", &named_plugin("trap", "trap", "FAIL_CLOSE"));
    let t = w.tally("/", 50, "{}");
    assert_eq!(
        t,
        BTreeMap::from([("503-routing".to_string(), 50)]),
        "{t:?}"
    );
    assert_eq!(
        w.metric(
            "interceptor_proxy_wasm_plugin_failures",
            &[("plugin", "trap"), ("kind", "trap")]
        ),
        50.0
    );
    // Fail open: the declarative routes serve.
    w.write_routes(&named_plugin("trap", "trap", "FAIL_OPEN"));
    assert_eq!(w.reload().0, 200);
    let t = w.tally("/", 50, "{}");
    assert_eq!(t, BTreeMap::from([("200-v1".to_string(), 50)]), "{t:?}");
    // An endless loop: stopped by its fuel budget, every time, the proxy serving on.
    w.write_routes(&named_plugin("spin", "spin", "FAIL_OPEN"));
    assert_eq!(w.reload().0, 200);
    let t = w.tally("/", 50, "{}");
    assert_eq!(t, BTreeMap::from([("200-v1".to_string(), 50)]), "{t:?}");
    assert_eq!(
        w.metric(
            "interceptor_proxy_wasm_plugin_failures",
            &[("plugin", "spin"), ("kind", "fuel")]
        ),
        50.0
    );
    assert_eq!(
        w.metric(
            "interceptor_proxy_wasm_plugin_decisions",
            &[("plugin", "trap"), ("decision", "failed_open")]
        ),
        50.0
    );
    assert!(w.proxy.as_mut().unwrap().is_running());
}

#[test]
fn a_plugin_reloaded_under_load_loses_nothing_and_a_bad_one_is_refused() {
    let w = World::new("wasm-reload", &router_plugin(Path::new("/nowhere")));
    let url = format!("http://{REVIEWS}/");
    let wrk = Wrk::start(&w.ns, Some(&w.cg), &url, 8, Duration::from_secs(8), false);
    std::thread::sleep(Duration::from_secs(1));
    // Six reloads while wrk runs, between the router and the trivial plugin.
    for i in 0..6 {
        let plugins = if i % 2 == 0 {
            named_plugin("noop", "noop", "FAIL_CLOSE")
        } else {
            router_plugin(w.cg.path())
        };
        w.write_routes(&plugins);
        let (code, body) = w.reload();
        assert_eq!(code, 200, "{body}");
        std::thread::sleep(Duration::from_millis(700));
    }
    // A plugin that does not load: the file is refused naming it, the routes in force stay.
    w.write_routes("- name: broken\n  url: /nonexistent/broken.wasm\n");
    let (code, body) = w.reload();
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("wasmPlugins[0].url") && body.contains("/nonexistent/broken.wasm"),
        "{body}"
    );
    let report = wrk.finish();
    println!(
        "plugin reloads under load: wrk {} requests, {} errors",
        report.requests,
        report.errors()
    );
    assert!(report.requests > 1000, "{}", report.output);
    assert_eq!(report.errors(), 0, "{}", report.output);
    // The last good file (the router) is in force.
    let t = w.tally("/", 10, "{'x-amount': '5000'}");
    assert_eq!(t, BTreeMap::from([("200-v2".to_string(), 10)]), "{t:?}");
}
