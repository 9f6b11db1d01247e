//! RPC-aware routing end to end: the workload's connections to service addresses are
//! intercepted by the kernel programs and routed by `interceptor-proxy --routes FILE`
//! to upstreams that answer differently: nginx over HTTP/1.1 and HTTP/2 (curl), gRPC
//! servers and client (tonic, `icpt-grpc`), TLS by SNI (openssl s_server), opaque and server-first TCP, live reload
//! under load, a refused file.
//!
//! Run as root, one test at a time: `cargo xtask test -- routing`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use interceptor::{PinLayout, ScopeSettings};
use interceptor_tests::openmetrics::{parse_openmetrics, sum};
use interceptor_tests::{
    exec_command, nginx_named_servers, run_cmd, spawn_in, start_proxy, wait_until, NetNs, PinDir,
    Proc, ScratchDir, TestCgroup, Wrk,
};

const ADMIN: &str = "127.0.0.1:15000";
const GRPC_BIN: &str = env!("CARGO_BIN_EXE_icpt-grpc");
/// Service addresses the workload dials (nothing listens there: only the routes make them
/// reachable).
const REVIEWS: &str = "127.0.10.1:8080";
const GREETER: &str = "127.0.10.2:8081";
const SECURE_VIP: &str = "127.0.10.3";
const SMTP_VIP: &str = "127.0.10.4:2525";

/// Fields drop in declaration order: processes, scratch, programs, cgroups, namespace.
struct World {
    proxy: Option<Proc>,
    servers: Vec<Proc>,
    dir: ScratchDir,
    pin: PinDir,
    other: TestCgroup,
    cg: TestCgroup,
    ns: NetNs,
}

fn routes(split_v1: u32) -> String {
    let split_v2 = 100 - split_v1;
    format!(
        r#"
serviceEntries:
- hosts: [reviews]
  addresses: [127.0.10.1]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.20.1, labels: {{version: v1}}}}
  - {{address: 127.0.20.2, labels: {{version: v2}}}}
- hosts: [greeter]
  addresses: [127.0.10.2]
  ports: [{{number: 8081, name: grpc, protocol: GRPC}}]
  endpoints:
  - {{address: 127.0.20.3, labels: {{version: v1}}}}
  - {{address: 127.0.20.4, labels: {{version: v2}}}}
- hosts: [secure]
  addresses: [127.0.10.3]
  ports: [{{number: 8443, name: tls, protocol: TLS}}]
  endpoints:
  - {{address: 127.0.20.5, labels: {{site: a}}}}
  - {{address: 127.0.20.6, labels: {{site: b}}}}
- hosts: [smtp]
  addresses: [127.0.10.4]
  ports: [{{number: 2525, name: smtp, protocol: AUTO}}]
  endpoints:
  - {{address: 127.0.20.7}}
- hosts: [flaky]
  addresses: [127.0.10.5]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.20.8}}
  - {{address: 127.0.20.1}}
- hosts: [slow]
  addresses: [127.0.10.6]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.20.9}}
virtualServices:
- name: flaky
  hosts: [flaky]
  http:
  - route: [{{destination: {{host: flaky}}}}]
    retries: {{attempts: 1, retryOn: connect-failure}}
    headers: {{response: {{remove: [x-upstream]}}}}
- name: slow
  hosts: [slow]
  http:
  - route: [{{destination: {{host: slow}}}}]
    timeout: 300ms
- name: reviews
  hosts: [reviews, reviews.example]
  http:
  - name: jason
    match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - name: api
    match: [{{uri: {{prefix: /api/}}, method: {{exact: GET}}}}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
    headers:
      request: {{set: {{x-route-tag: api}}}}
      response: {{add: {{x-routed: api}}}}
  - name: items
    match: [{{uri: {{regex: "/items/[0-9]+"}}}}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - name: debug
    match: [{{queryParams: {{debug: {{exact: "1"}}}}}}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - name: workload
    match: [{{uri: {{exact: /whoami}}, sourceWorkload: {{suffix-placeholder}}}}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - name: split
    route:
    - {{destination: {{host: reviews, subset: v1}}, weight: {split_v1}}}
    - {{destination: {{host: reviews, subset: v2}}, weight: {split_v2}}}
    timeout: 5s
    retries: {{attempts: 2, retryOn: connect-failure}}
- name: greeter
  hosts: [greeter]
  http:
  - name: say-hello
    match: [{{grpc: {{service: helloworld.Greeter, method: SayHello}}}}]
    route: [{{destination: {{host: greeter, subset: v2}}}}]
  - name: other-methods
    route: [{{destination: {{host: greeter, subset: v1}}}}]
- name: secure
  hosts: [secure]
  tls:
  - match: [{{sniHosts: [a.test]}}]
    route: [{{destination: {{host: secure, subset: a}}}}]
  - match: [{{sniHosts: [b.test]}}]
    route: [{{destination: {{host: secure, subset: b}}}}]
destinationRules:
- host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
- host: greeter
  trafficPolicy: {{loadBalancer: {{simple: LEAST_REQUEST}}}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
- host: secure
  subsets:
  - {{name: a, labels: {{site: a}}}}
  - {{name: b, labels: {{site: b}}}}
"#
    )
}

impl World {
    fn new(test: &str) -> World {
        interceptor_tests::register_helper_bins!();
        let ns = NetNs::new(test);
        let cg = TestCgroup::new(test);
        let other = TestCgroup::new(&format!("{test}-o"));
        let pin = PinDir::new(test);
        let dir = ScratchDir::new(test);
        let mut w = World {
            proxy: None,
            servers: Vec::new(),
            dir,
            pin,
            other,
            cg,
            ns,
        };
        let layout = PinLayout::new(w.pin.path());
        for cg in [&w.cg, &w.other] {
            interceptor::attach(&layout, cg.path(), &ScopeSettings::default())
                .unwrap_or_else(|e| panic!("attach: {e}"));
        }
        w.start_nginx();
        w.start_tls_servers();
        w.start_banner_server();
        w.write_routes(90);
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

    fn write_routes(&self, split_v1: u32) {
        // The workload route matches the test cgroup's path, as attach recorded it.
        let text = routes(split_v1).replace(
            "{suffix-placeholder}",
            &format!("{{exact: \"{}\"}}", self.cg.path().display()),
        );
        write_atomically(&self.routes_path(), &text);
    }

    fn start_nginx(&mut self) {
        let p = nginx_named_servers(
            &self.ns,
            &self.dir.join("nginx"),
            &[("127.0.20.1:8080", "v1"), ("127.0.20.2:8080", "v2")],
            "{name} uri=$request_uri tag=$http_x_route_tag proto=$server_protocol",
            8080,
        );
        self.servers.push(p);
        // The greeter's two versions: real gRPC servers (tonic).
        for (addr, name) in [
            ("127.0.20.3:8081", "greeter-v1"),
            ("127.0.20.4:8081", "greeter-v2"),
        ] {
            let p = spawn_in(
                &self.ns,
                None,
                &[GRPC_BIN, "serve", "--listen", addr, "--name", name],
            );
            self.servers.push(p);
        }
        assert!(wait_until(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                let out = self.ns.run(&["ss", "-Hltn", "sport = :8081"]);
                String::from_utf8_lossy(&out.stdout).lines().count() == 2
            }
        ));
    }

    fn start_tls_servers(&mut self) {
        for (site, addr) in [("a", "127.0.20.5"), ("b", "127.0.20.6")] {
            let d = self.dir.join(format!("tls-{site}"));
            std::fs::create_dir_all(&d).unwrap();
            let cn = format!("/CN={site}.test");
            let ok = std::process::Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", &cn,
                ])
                .arg("-keyout")
                .arg(d.join("key.pem"))
                .arg("-out")
                .arg(d.join("cert.pem"))
                .output()
                .expect("openssl req");
            assert!(
                ok.status.success(),
                "{}",
                String::from_utf8_lossy(&ok.stderr)
            );
            std::fs::write(d.join("id.txt"), format!("server-{site}\n")).unwrap();
            // 1 MiB of pseudo-random bytes, to check the passthrough byte for byte.
            let blob: Vec<u8> = (0u32..1 << 20)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect();
            std::fs::write(d.join("blob.bin"), blob).unwrap();
            let accept = format!("{addr}:8443");
            let cmd = format!(
                "cd {} && exec openssl s_server -quiet -WWW -accept {accept} -cert cert.pem -key key.pem",
                d.display()
            );
            let p = spawn_in(&self.ns, None, &["sh", "-c", &cmd]);
            self.servers.push(p);
        }
        let filter = "sport = :8443";
        assert!(wait_until(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                let out = self.ns.run(&["ss", "-Hltn", filter]);
                String::from_utf8_lossy(&out.stdout).lines().count() == 2
            }
        ));
    }

    /// A server-first protocol: says "220 banner" on accept, then echoes one line.
    fn start_banner_server(&mut self) {
        let script = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.20.7", 2525))
s.listen(64)
while True:
    c, _ = s.accept()
    c.sendall(b"220 banner\r\n")
    line = c.makefile("rb").readline()
    c.sendall(b"250 " + line)
    c.close()
"#;
        let p = spawn_in(&self.ns, None, &["/usr/bin/python3", "-c", script]);
        self.servers.push(p);
        assert!(wait_until(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                let out = self.ns.run(&["ss", "-Hltn", "sport = :2525"]);
                !String::from_utf8_lossy(&out.stdout).trim().is_empty()
            }
        ));
    }

    /// `cmd` as the workload (its cgroup, or `other`), stdout.
    fn run_as(&self, cg: &TestCgroup, cmd: &[&str]) -> String {
        let mut c = exec_command(Some(&self.ns), Some(cg), None, cmd);
        let out = run_cmd(&mut c, Duration::from_secs(120)).expect("run");
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn curl(&self, args: &[&str]) -> String {
        let mut cmd = vec!["curl", "-sS", "--max-time", "10"];
        cmd.extend_from_slice(args);
        self.run_as(&self.cg, &cmd)
    }

    fn admin(&self, args: &[&str]) -> String {
        let mut cmd = vec!["curl", "-sS", "--max-time", "10"];
        cmd.extend_from_slice(args);
        self.ns.run_ok(&cmd)
    }

    /// `n` keep-alive GETs of `url` from the workload; responses counted by their first word.
    fn tally(&self, url: &str, n: u32) -> BTreeMap<String, u32> {
        let script = r#"
import http.client, collections, sys
u = sys.argv[1].split("/", 3)
n = int(sys.argv[2])
c = http.client.HTTPConnection(u[2], timeout=10)
t = collections.Counter()
for i in range(n):
    c.request("GET", "/" + u[3])
    r = c.getresponse()
    b = r.read().decode()
    t[b.split()[0] if r.status == 200 else "status-%d" % r.status] += 1
print(" ".join("%s=%d" % kv for kv in sorted(t.items())))
"#;
        let n = n.to_string();
        let out = self.run_as(&self.cg, &["/usr/bin/python3", "-c", script, url, &n]);
        out.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
            .collect()
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn first_word(s: &str) -> &str {
    s.split_whitespace().next().unwrap_or("")
}

#[test]
fn each_match_kind_routes_to_its_upstream() {
    let w = World::new("rt-match");
    let url = format!("http://{REVIEWS}");
    // The default route (90/10) serves anything unmatched; these go to v2 by their match.
    assert_eq!(
        first_word(&w.curl(&["-H", "end-user: jason", &format!("{url}/x")])),
        "v2"
    );
    let api = w.curl(&["-i", &format!("{url}/api/list")]);
    assert!(
        api.contains("v2 uri=/api/list tag=api"),
        "header set upstream: {api}"
    );
    assert!(
        api.to_ascii_lowercase().contains("x-routed: api"),
        "header added downstream: {api}"
    );
    assert!(
        !w.curl(&["-X", "POST", &format!("{url}/api/list")])
            .contains("tag=api"),
        "method must be GET"
    );
    assert_eq!(first_word(&w.curl(&[&format!("{url}/items/42")])), "v2");
    assert_eq!(
        first_word(&w.curl(&[&format!("{url}/search?q=a&debug=1")])),
        "v2"
    );
    // The calling workload: the same request from another cgroup is not matched.
    for _ in 0..20 {
        assert_eq!(first_word(&w.curl(&[&format!("{url}/whoami")])), "v2");
    }
    let others: Vec<String> = (0..20)
        .map(|_| {
            w.run_as(
                &w.other,
                &["curl", "-sS", "--max-time", "10", &format!("{url}/whoami")],
            )
        })
        .collect();
    assert!(
        others.iter().any(|o| first_word(o) == "v1"),
        "from another workload /whoami takes the 90/10 split: {others:?}"
    );
    // Host header routing: a name of the virtual service picks it even when the address
    // dialled belongs to another service (`slow`, whose only route times out at 300 ms):
    // without Host matching the request would take slow's route.
    let slow = "http://127.0.10.6:8080/";
    let by_host = w.curl(&["-H", "Host: reviews.example", "-H", "end-user: jason", slow]);
    assert_eq!(
        first_word(&by_host),
        "v2",
        "Host: reviews.example to slow's address"
    );
    let by_address = w.curl(&["-H", "end-user: jason", slow]);
    assert_ne!(
        first_word(&by_address),
        "v2",
        "the same request without the Host override takes slow's route: {by_address}"
    );
    // HTTP/2 with prior knowledge downstream, HTTP/1.1 upstream.
    let h2 = w.curl(&[
        "--http2-prior-knowledge",
        "-H",
        "end-user: jason",
        &format!("{url}/h2"),
    ]);
    assert!(h2.starts_with("v2 uri=/h2"), "{h2}");
    // gRPC (a tonic client and servers): routed by service and method from :path.
    let grpc = |method: &str| -> Vec<String> {
        let out = w.run_as(
            &w.cg,
            &[
                GRPC_BIN, "call", GREETER, "--method", method, "--name", "ann", "--count", "5",
            ],
        );
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        v["replies"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        grpc("SayHello"),
        vec!["greeter-v2 SayHello hello ann".to_owned(); 5]
    );
    assert_eq!(
        grpc("SayGoodbye"),
        vec!["greeter-v1 SayGoodbye hello ann".to_owned(); 5]
    );

    // 2,000 requests on the 90/10 split.
    let t = w.tally(&format!("{url}/split"), 2000);
    let (v1, v2) = (
        t.get("v1").copied().unwrap_or(0),
        t.get("v2").copied().unwrap_or(0),
    );
    println!("90/10 split over 2,000 requests: v1 {v1}, v2 {v2} ({t:?})");
    assert_eq!(v1 + v2, 2000, "{t:?}");
    assert!(
        (1700..=1900).contains(&v1),
        "v1 {v1} of 2000 is outside 90% ± 5%"
    );
    // Upstream connections are reused: the ~1,800 requests to v1 went over a handful of
    // pooled connections, not one each (which would leave ~1,800 in TIME-WAIT).
    let count = |state: &str| {
        let out =
            w.ns.run(&["ss", "-Htn", "state", state, "dst", "127.0.20.1:8080"]);
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    let (open, closed) = (count("established"), count("time-wait"));
    println!("upstream connections to v1 after the split: {open} open, {closed} in TIME-WAIT");
    assert!(open <= 4 && closed < 100, "{open} open, {closed} closed");

    // Per route and per cluster in /metrics.
    let m = parse_openmetrics(&w.admin(&[&format!("http://{ADMIN}/metrics")])).unwrap();
    let split = sum(
        &m,
        "interceptor_proxy_route_requests_total",
        &[("virtual_service", "reviews"), ("route", "split")],
    );
    assert!(split >= 2000.0, "{split}");
    let c1 = sum(
        &m,
        "interceptor_proxy_cluster_requests_total",
        &[("cluster", "reviews|8080|v1")],
    );
    assert!(c1 >= v1 as f64);
    assert_eq!(
        sum(
            &m,
            "interceptor_proxy_route_requests_total",
            &[("virtual_service", "greeter"), ("route", "say-hello")]
        ),
        5.0
    );
}

#[test]
fn connect_failures_are_retried_and_slow_upstreams_time_out() {
    let w = World::new("rt-retry");
    // flaky: one endpoint of two refuses connections (nothing listens on 127.0.20.8), round
    // robin; one retry on connect failure sends those requests to the other one.
    let t = w.tally("http://127.0.10.5:8080/r", 40);
    assert_eq!(
        t.get("v1"),
        Some(&40),
        "every request served after its retry: {t:?}"
    );
    let headers = w.curl(&["-i", "http://127.0.10.5:8080/h"]);
    assert!(
        !headers.to_ascii_lowercase().contains("x-upstream"),
        "response header removed: {headers}"
    );
    let m = parse_openmetrics(&w.admin(&[&format!("http://{ADMIN}/metrics")])).unwrap();
    let retries = sum(
        &m,
        "interceptor_proxy_cluster_retries_total",
        &[("cluster", "flaky|8080|")],
    );
    assert!(
        retries >= 20.0,
        "half the requests met the dead endpoint first: {retries}"
    );
    // slow: an upstream that answers after 3 s, a route timeout of 300 ms: 504.
    let script = r#"
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.20.9", 8080))
s.listen(16)
while True:
    c, _ = s.accept()
    c.recv(4096)
    time.sleep(3)
    c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nlate\n")
    c.close()
"#;
    let slow = spawn_in(&w.ns, None, &["/usr/bin/python3", "-c", script]);
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            let out = w.ns.run(&["ss", "-Hltn"]);
            String::from_utf8_lossy(&out.stdout).contains("127.0.20.9:8080")
        }),
        "slow server: {}",
        slow.stderr()
    );
    let code = w.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://127.0.10.6:8080/",
    ]);
    assert_eq!(code, "504");
    let m = parse_openmetrics(&w.admin(&[&format!("http://{ADMIN}/metrics")])).unwrap();
    assert_eq!(
        sum(
            &m,
            "interceptor_proxy_cluster_upstream_errors_total",
            &[("cluster", "slow|8080|"), ("kind", "timeout")]
        ),
        1.0
    );
}

#[test]
fn tls_passes_through_by_sni_and_tcp_stays_opaque() {
    let w = World::new("rt-tls");
    for site in ["a", "b"] {
        let host = format!("{site}.test");
        let resolve = format!("{host}:8443:{SECURE_VIP}");
        let id = w.curl(&[
            "-k",
            "--resolve",
            &resolve,
            &format!("https://{host}:8443/id.txt"),
        ]);
        assert_eq!(id, format!("server-{site}\n"), "SNI {host}");
        // 1 MiB through the TLS passthrough, byte for byte (TLS would fail on any change).
        let sum = w.run_as(
            &w.cg,
            &[
                "sh",
                "-c",
                &format!(
                    "curl -sS -k --resolve {resolve} https://{host}:8443/blob.bin | sha256sum"
                ),
            ],
        );
        let want = std::process::Command::new("sha256sum")
            .arg(w.dir.join(format!("tls-{site}/blob.bin")))
            .output()
            .unwrap();
        assert_eq!(
            first_word(&sum),
            first_word(&String::from_utf8_lossy(&want.stdout))
        );
    }
    // A server-first protocol: direct (not a service address: no delay) and through an AUTO
    // port (the client says nothing, so the proxy goes opaque after detection).
    let client = "import socket,sys\nh,p=sys.argv[1].rsplit(':',1)\n\
c=socket.create_connection((h,int(p)),timeout=10)\nf=c.makefile('rb')\n\
b=f.readline(); c.sendall(b'EHLO x\\r\\n'); r=f.readline(); print(b.decode().strip(), '|', r.decode().strip())\n";
    for target in ["127.0.20.7:2525", SMTP_VIP] {
        let out = w.run_as(&w.cg, &["/usr/bin/python3", "-c", client, target]);
        assert_eq!(out.trim(), "220 banner | 250 EHLO x", "{target}");
    }
}

#[test]
fn reload_under_load_changes_routes_without_errors_and_a_bad_file_is_refused() {
    let w = World::new("rt-reload");
    let url = format!("http://{REVIEWS}/");
    let wrk = Wrk::start(&w.ns, Some(&w.cg), &url, 8, Duration::from_secs(8), false);
    std::thread::sleep(Duration::from_secs(2));
    // Everything to v2, while wrk runs.
    w.write_routes(0);
    let r = w.admin(&["-X", "POST", &format!("http://{ADMIN}/routes/reload")]);
    assert!(r.contains("\"version\""), "{r}");
    std::thread::sleep(Duration::from_secs(1));
    let t = w.tally(&format!("{url}after"), 100);
    assert_eq!(t.get("v2"), Some(&100), "after the reload: {t:?}");
    // A bad file: refused with the field named, the routes in force stay.
    let good = std::fs::read_to_string(w.routes_path()).unwrap();
    write_atomically(
        &w.routes_path(),
        &good.replacen("subset: v2}, weight: 100", "subset: v3}, weight: 100", 1),
    );
    let out = w.ns.run(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        &format!("http://{ADMIN}/routes/reload"),
    ]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.ends_with("400"), "{body}");
    assert!(
        body.contains("virtualServices[2].http[5].route[1].destination.subset")
            && body.contains("no subset \"v3\""),
        "the error names the field: {body}"
    );
    let t = w.tally(&format!("{url}still"), 50);
    assert_eq!(t.get("v2"), Some(&50), "the old routes stay: {t:?}");
    let report = wrk.finish();
    println!(
        "reload under load: wrk {} requests, {} errors",
        report.requests,
        report.errors()
    );
    assert!(report.requests > 0);
    assert_eq!(report.errors(), 0, "{}", report.output);
    // The file watcher too: a syntax error is refused and counted, a fix is picked up. The
    // count is read just before: the watcher may have seen the bad file above before the POST
    // did, so it may already be 2.
    let reload_errors = || -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&w.admin(&[&format!("http://{ADMIN}/routes")])).unwrap();
        v["reload_errors"]
            .as_u64()
            .expect("reload_errors in /routes")
    };
    let before = reload_errors();
    write_atomically(&w.routes_path(), "virtualServices: [ {hosts: [x]\n");
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
            reload_errors() > before
        }),
        "the watcher refuses the syntax error and counts it (was {before})"
    );
    w.write_routes(100);
    assert!(wait_until(
        Duration::from_secs(10),
        Duration::from_millis(200),
        || { w.tally(&format!("{url}fixed"), 10).get("v1") == Some(&10) }
    ));
}
