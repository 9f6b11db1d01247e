//! Outbound interception end to end: the real programs in the real kernel, real sockets,
//! the real proxy (and an unmodified HAProxy), each test in its own network namespace,
//! cgroup and pin directory, all removed by guards.
//!
//! Run as root, one test at a time: `cargo xtask test` (or `cargo test --release -p
//! interceptor-tests -- --test-threads=1` after `cargo xtask build`).
use std::{net::SocketAddr, path::Path, time::Duration};

use interceptor::{Counter, PinLayout, ScopeSettings, Stats};
use interceptor_tests::{
    bpftool_cgroup_progs, exec_command, interceptor_bin, probe_bin, probe_in, proxy_stats, run_cmd,
    spawn_in, start_proxy, NetNs, PinDir, ProbeServer, Proc, ScratchDir, TestCgroup, DEFAULT_ADMIN,
};
use serde_json::Value;

const SERVER: &str = "127.0.0.1:8080";

/// The programs `attach` puts on a workload cgroup, sorted by name.
const SCOPE_PROGRAMS: [&str; 4] = [
    "redirect_connect4",
    "redirect_connect6",
    "restore_getpeername4",
    "restore_getpeername6",
];

/// One test's world: namespace, workload cgroup, pin dir, a server and the proxy.
/// Fields drop in declaration order: processes first, then the programs (pin dir), the
/// cgroup and the namespace.
struct World {
    proxy: Option<Proc>,
    servers: Vec<ProbeServer>,
    pin: PinDir,
    cg: TestCgroup,
    ns: NetNs,
}

impl World {
    fn new(test: &str, listen: &[&str]) -> World {
        interceptor_tests::register_helper_bins!();
        let ns = NetNs::new(test);
        let cg = TestCgroup::new(test);
        let pin = PinDir::new(test);
        let addrs: Vec<SocketAddr> = listen.iter().map(|a| a.parse().unwrap()).collect();
        let servers = vec![ProbeServer::start_in(ns.path(), &addrs).expect("start probe servers")];
        World {
            ns,
            cg,
            pin,
            servers,
            proxy: None,
        }
    }

    fn layout(&self) -> PinLayout {
        PinLayout::new(self.pin.path())
    }

    fn with_proxy(mut self) -> World {
        self.proxy = Some(start_proxy(&self.ns, &["--admin", DEFAULT_ADMIN]));
        self
    }

    fn attach(&self, settings: &ScopeSettings) {
        interceptor::attach(&self.layout(), self.cg.path(), settings)
            .unwrap_or_else(|e| panic!("attach {}: {e}", self.cg.path().display()));
    }

    fn stats(&self) -> Stats {
        interceptor::stats(&self.layout()).expect("stats")
    }

    fn counter(&self, c: Counter) -> u64 {
        self.stats().get(self.cg.id(), c)
    }

    fn proxy_stat(&self, name: &str) -> u64 {
        proxy_stats(&self.ns, DEFAULT_ADMIN)[name]
            .as_u64()
            .unwrap_or_else(|| panic!("proxy /stats has no counter {name}"))
    }

    /// Runs `icpt-probe ARGS` as a workload process (in the cgroup and the namespace).
    fn probe(&self, args: &[&str]) -> Value {
        self.probe_as(&self.cg, None, args)
    }

    fn probe_as(&self, cg: &TestCgroup, uid: Option<u32>, args: &[&str]) -> Value {
        probe_in(&self.ns, Some(cg.path()), uid, args)
    }

    /// A HELLO exchange from the workload; returns whether it went through a proxy.
    fn hello_proxied(&self, addr: &str, extra: &[&str]) -> bool {
        let mut args = vec!["hello", addr];
        args.extend_from_slice(extra);
        let v = self.probe(&args);
        assert!(
            v.get("error").is_none(),
            "hello {addr} {extra:?} failed: {v}"
        );
        v["proxied"].as_bool().expect("proxied field")
    }
}

fn run_cli(pin: &PinDir, args: &[&str]) -> (bool, String, String) {
    let mut c = std::process::Command::new(interceptor_bin());
    c.arg("--pin-dir").arg(pin.path()).args(args);
    let out = run_cmd(&mut c, Duration::from_secs(60)).expect("run interceptor");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn prog_names(cgroup: &Path) -> Vec<String> {
    let mut names: Vec<String> = bpftool_cgroup_progs(cgroup)
        .into_iter()
        .map(|p| p.name)
        .collect();
    names.sort();
    names
}

#[test]
fn client_reaches_server_at_original_address_through_proxy() {
    let w = World::new("redirect", &[SERVER]).with_proxy();
    assert!(
        !w.hello_proxied(SERVER, &[]),
        "before attach the connection is direct"
    );
    w.attach(&ScopeSettings::default());

    let v = w.probe(&["hello", SERVER]);
    assert_eq!(
        v["remote"], SERVER,
        "client asked for the original address: {v}"
    );
    assert_eq!(
        v["proxied"],
        true,
        "server saw the proxy, not the client: {v}; kernel counters: {:?}",
        w.stats()
    );
    assert_eq!(
        v["server_local"], SERVER,
        "server was reached at its own address: {v}"
    );
    assert_eq!(
        v["socket_peer"], SERVER,
        "getpeername() on the workload's socket shows the original destination: {v}"
    );
    assert_eq!(w.counter(Counter::Redirected), 1);
    assert_eq!(w.counter(Counter::OrigDstAnswered), 1);
    assert_eq!(w.proxy_stat("forwarded_total"), 1);
    assert_eq!(w.proxy_stat("orig_dst_missing"), 0);
}

#[test]
fn bulk_100mb_each_way_byte_exact_with_half_close() {
    let w = World::new("bulk", &[SERVER]).with_proxy();
    w.attach(&ScopeSettings::default());
    let n = (100u64 << 20).to_string();
    let v = w.probe(&["bulk", SERVER, "--send", &n, "--recv", &n, "--seed", "7"]);
    assert_eq!(v["ok"], true, "bulk transfer: {v}");
    assert_eq!(v["sent"].as_u64(), Some(100 << 20));
    assert_eq!(v["received"].as_u64(), Some(100 << 20));
    assert_eq!(v["server_rx"].as_u64(), Some(100 << 20));
    assert_eq!(w.counter(Counter::Redirected), 1, "went through the proxy");
    assert!(w.proxy_stat("bytes_client_to_upstream") >= 100 << 20);
    assert!(w.proxy_stat("bytes_upstream_to_client") >= 100 << 20);
}

#[test]
fn ipv6_loopback_veth_and_ipv4_mapped() {
    let ns_addr = "fd00:1c9::1";
    let w = World::new("ipv6", &[SERVER]);
    w.ns.add_veth_pair("icv6a", "icv6b", None);
    w.ns.add_addr("icv6a", &format!("{ns_addr}/64"));
    let v6_addrs: Vec<SocketAddr> = vec![
        "[::1]:8080".parse().unwrap(),
        format!("[{ns_addr}]:8080").parse().unwrap(),
    ];
    let mut w = w;
    w.servers
        .push(ProbeServer::start_in(w.ns.path(), &v6_addrs).expect("v6 servers"));
    let w = w.with_proxy();
    w.attach(&ScopeSettings::default());

    let veth = format!("[{ns_addr}]:8080");
    for target in ["[::1]:8080", veth.as_str(), "[::ffff:127.0.0.1]:8080"] {
        let v = w.probe(&["hello", target]);
        assert_eq!(v["proxied"], true, "{target}: {v}");
        let peer: SocketAddr = v["socket_peer"].as_str().unwrap().parse().unwrap();
        let want: SocketAddr = target.parse().unwrap();
        assert_eq!(
            interceptor_tests::probe::normalize(peer),
            interceptor_tests::probe::normalize(want),
            "getpeername() shows the original destination: {v}"
        );
    }
    assert_eq!(w.counter(Counter::Redirected), 3);
    assert_eq!(w.counter(Counter::OrigDstAnswered), 3);
    assert_eq!(w.proxy_stat("forwarded_total"), 3);
}

#[test]
fn each_exemption_bypasses_the_proxy() {
    let w = World::new(
        "exempt",
        &[SERVER, "127.0.0.1:9000", "127.0.0.2:8080", "127.0.0.3:8080"],
    )
    .with_proxy();
    let mut s = ScopeSettings::default();
    s.exclude_ports.insert(9000);
    s.exclude_cidrs.insert("127.0.0.2/32".parse().unwrap());
    w.attach(&s);

    assert!(
        w.hello_proxied(SERVER, &[]),
        "the control connection is proxied"
    );
    assert!(
        !w.hello_proxied(SERVER, &["--mark", "0x539"]),
        "bypass mark"
    );
    let v = w.probe_as(&w.cg, Some(1337), &["hello", SERVER]);
    assert_eq!(v["proxied"], false, "bypass uid: {v}");
    assert!(!w.hello_proxied("127.0.0.1:9000", &[]), "excluded port");
    assert!(!w.hello_proxied("127.0.0.2:8080", &[]), "excluded CIDR");
    // A workload that dials the proxy's listener itself is left alone; the proxy finds no
    // original destination and closes the connection instead of forwarding to itself.
    let v = w.probe(&["hello", "127.0.0.1:15001"]);
    assert!(
        v.get("error").is_some(),
        "proxy must not serve a self-connection: {v}"
    );

    let st = w.stats();
    let c = |c: Counter| st.get(w.cg.id(), c);
    assert_eq!(c(Counter::Redirected), 1);
    assert_eq!(c(Counter::BypassMark), 1);
    assert_eq!(c(Counter::BypassUid), 1);
    assert_eq!(c(Counter::ExcludedPort), 1);
    assert_eq!(c(Counter::ExcludedCidr), 1);
    assert_eq!(c(Counter::ToProxy), 1);
    assert_eq!(w.proxy_stat("orig_dst_missing"), 1);

    // An include list: only 127.0.0.3/32 is intercepted now (updated in place).
    s.include_cidrs.insert("127.0.0.3/32".parse().unwrap());
    w.attach(&s);
    assert!(!w.hello_proxied(SERVER, &[]), "outside the include list");
    assert!(
        w.hello_proxied("127.0.0.3:8080", &[]),
        "inside the include list"
    );
    assert_eq!(w.counter(Counter::NotIncluded), 1);
    assert_eq!(w.counter(Counter::Redirected), 2);
}

#[test]
fn cli_attach_outlives_the_cli_and_detach_restores_direct() {
    let w = World::new("cli", &[SERVER]).with_proxy();
    let cg = w.cg.path().to_str().unwrap();
    // The CLI attaches and exits: from here on no interceptor process runs.
    let (ok, out, err) = run_cli(
        &w.pin,
        &["attach", "--cgroup", cg, "--exclude-port", "9999"],
    );
    assert!(ok, "attach failed: {out} {err}");
    let running = std::process::Command::new("pgrep")
        .args(["-f", &format!("interceptor --pin-dir {}", w.pin.as_str())])
        .output()
        .unwrap();
    assert!(
        !running.status.success(),
        "no interceptor process is left running"
    );
    assert!(
        w.hello_proxied(SERVER, &[]),
        "interception outlives the CLI"
    );

    let (ok, out, _) = run_cli(&w.pin, &["status", "--json"]);
    assert!(ok);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["scopes"][0]["cgroup"], cg);
    assert_eq!(st["scopes"][0]["settings"]["exclude_ports"][0], 9999);
    assert_eq!(st["scopes"][0]["links"][0]["name"], "connect4");
    assert!(st["scopes"][0]["links"][0]["link_id"].is_u64(), "{st}");
    assert!(st["root_links"][1]["link_id"].is_u64(), "{st}");

    let (ok, out, _) = run_cli(&w.pin, &["stats", "--json"]);
    assert!(ok);
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["scopes"][0]["counters"]["redirected"], 1, "{stats}");

    let (ok, out, err) = run_cli(&w.pin, &["detach", "--cgroup", cg]);
    assert!(ok, "detach failed: {out} {err}");
    assert!(!w.hello_proxied(SERVER, &[]), "direct again after detach");
    assert!(
        prog_names(w.cg.path()).is_empty(),
        "programs left on the cgroup"
    );
    assert!(
        !w.pin.path().exists(),
        "the last detach removes the pin dir: {:?}",
        w.pin.pinned()
    );
}

#[test]
fn attaching_twice_updates_in_place() {
    let w = World::new("update", &[SERVER, "127.0.0.1:9000"]).with_proxy();
    let mut s = ScopeSettings::default();
    w.attach(&s);
    assert!(w.hello_proxied("127.0.0.1:9000", &[]));
    s.exclude_ports.insert(9000);
    let again = interceptor::attach(&w.layout(), w.cg.path(), &s).unwrap();
    assert!(!again.created && again.new_links.is_empty(), "{again:?}");
    let names = prog_names(w.cg.path());
    assert_eq!(
        names, SCOPE_PROGRAMS,
        "one program of each kind on the cgroup"
    );
    assert!(
        !w.hello_proxied("127.0.0.1:9000", &[]),
        "new exclusion applies"
    );
    assert!(w.hello_proxied(SERVER, &[]), "still proxied, once");
    assert_eq!(w.proxy_stat("forwarded_total"), 2);
}

#[test]
fn sibling_cgroups_behave_independently() {
    let w = World::new("siblings", &[SERVER, "127.0.0.1:8081"]);
    let a = TestCgroup::new("siblings-a");
    let b = TestCgroup::new("siblings-b");
    let _proxy_a = start_proxy(&w.ns, &["--admin", "127.0.0.1:15000"]);
    let _proxy_b = start_proxy(
        &w.ns,
        &[
            "--outbound",
            "127.0.0.1:15002",
            "--admin",
            "127.0.0.1:15010",
        ],
    );
    let layout = w.layout();
    let mut sa = ScopeSettings::default();
    sa.exclude_ports.insert(8081);
    let mut sb = ScopeSettings {
        proxy_port: 15002,
        ..ScopeSettings::default()
    };
    sb.exclude_ports.insert(8080);
    interceptor::attach(&layout, a.path(), &sa).unwrap();
    interceptor::attach(&layout, b.path(), &sb).unwrap();

    // A HELLO that must succeed; whether it went through a proxy. (A failed probe is a
    // failure, never "not proxied".)
    let hello = |cg: &TestCgroup, addr: &str| {
        let v = w.probe_as(cg, None, &["hello", addr]);
        assert!(v.get("error").is_none(), "hello {addr} failed: {v}");
        v["proxied"].as_bool().expect("proxied field")
    };
    assert!(hello(&a, SERVER));
    assert!(!hello(&a, "127.0.0.1:8081"));
    assert!(!hello(&b, SERVER));
    assert!(hello(&b, "127.0.0.1:8081"));
    let fwd = |admin: &str| {
        proxy_stats(&w.ns, admin)["forwarded_total"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(fwd("127.0.0.1:15000"), 1, "scope A used proxy A");
    assert_eq!(fwd("127.0.0.1:15010"), 1, "scope B used proxy B");
    let st = w.stats();
    assert_eq!(st.get(a.id(), Counter::Redirected), 1);
    assert_eq!(st.get(a.id(), Counter::ExcludedPort), 1);
    assert_eq!(st.get(b.id(), Counter::Redirected), 1);
    assert_eq!(st.get(b.id(), Counter::ExcludedPort), 1);

    interceptor::detach(&layout, a.path()).unwrap();
    assert!(!hello(&a, SERVER), "A detached");
    assert!(hello(&b, "127.0.0.1:8081"), "B still attached");
    assert_eq!(
        fwd("127.0.0.1:15000"),
        1,
        "A's connection went direct, not through proxy A"
    );
    assert_eq!(fwd("127.0.0.1:15010"), 2, "B's went through proxy B");
    let st = w.stats();
    assert_eq!(st.get(b.id(), Counter::Redirected), 2);
    assert_eq!(
        st.get(a.id(), Counter::Redirected),
        0,
        "A has no counters once detached"
    );
}

#[test]
fn records_do_not_accumulate() {
    let w = World::new("churn", &[SERVER]).with_proxy();
    w.attach(&ScopeSettings::default());
    let v = w.probe(&["churn", SERVER, "--count", "100000", "--parallel", "4"]);
    assert_eq!(v["ok"], 100_000, "{v}");
    assert_eq!(v["proxied"], 100_000, "{v}");
    assert_eq!(w.counter(Counter::Redirected), 100_000);
    // Every record goes when its client socket reaches TCP_CLOSE; the probe has exited, and
    // the last closes finish on loopback within moments.
    let mut left = 0;
    let empty =
        interceptor_tests::wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            left = w.stats().handoff_records;
            left == 0
        });
    assert!(
        empty,
        "hand-off entries left after 100,000 closed connections: {left}"
    );
}

/// What conntrack began to track in one phase (`NetNs::conntrack_events`): connections whose
/// original destination port is the server's or the proxy's, and how many of all were NATed
/// (their reply tuple does not come from their original destination).
#[derive(Debug, Default, PartialEq, Eq)]
struct Tracked {
    to_server: usize,
    to_proxy: usize,
    natted: usize,
}

fn tracked(events: &[String]) -> Tracked {
    let mut t = Tracked::default();
    for l in events {
        let field = |key: &str, nth: usize| {
            l.split_whitespace()
                .filter_map(|f| f.strip_prefix(key))
                .nth(nth)
                .map(str::to_string)
        };
        match field("dport=", 0).as_deref() {
            Some("8080") => t.to_server += 1,
            Some("15001") => t.to_proxy += 1,
            _ => {}
        }
        // Original tuple first, reply tuple second: unchanged, the reply comes from the
        // original destination's address and port.
        if field("src=", 1) != field("dst=", 0) || field("sport=", 1) != field("dport=", 0) {
            t.natted += 1;
        }
    }
    t
}

/// For a message: the namespace's table (fewer entries than connections where the kernel
/// gave a new loopback connection the 4-tuple of one in TIME_WAIT).
fn conntrack_summary(ns: &NetNs) -> String {
    format!(
        "nf_conntrack_count {}, {} TCP entries listed",
        ns.conntrack_count(),
        ns.conntrack_entries(false).len()
    )
}

/// Conntrack is not needed (the kernel matrix boots kernels where nf_conntrack is never
/// loaded), but where a host firewall makes it active the interception adds only what any
/// proxy adds, the proxy's own connection, and no NAT: measured against iptables REDIRECT
/// under the same stateful rule. Counted from conntrack's events (each connection it begins
/// to track), not from its table, where a loopback 4-tuple used again replaces an entry.
#[test]
fn with_conntrack_active_interception_adds_the_proxy_hop_and_no_nat() {
    const N: usize = 200;
    let w = World::new("ct_active", &[SERVER]).with_proxy();
    w.ns.enable_stateful_filter();
    // Direct first (the scope is not attached yet): one tracked connection per connection.
    let events = w.ns.conntrack_events();
    let v = w.probe(&["churn", SERVER, "--count", &N.to_string()]);
    assert_eq!(v["ok"], N, "{v}");
    let direct = tracked(&events.finish());
    assert_eq!(
        direct,
        Tracked {
            to_server: N,
            ..Tracked::default()
        },
        "one tracked connection per direct connection ({})",
        conntrack_summary(&w.ns)
    );

    w.attach(&ScopeSettings::default());
    let events = w.ns.conntrack_events();
    let v = w.probe(&["churn", SERVER, "--count", &N.to_string()]);
    assert_eq!(v["ok"], N, "{v}");
    assert_eq!(v["proxied"], N, "{v}");
    let intercepted = tracked(&events.finish());
    let natted = w.ns.conntrack_entries(true);
    println!(
        "conntrack active: {N} connections tracked as {direct:?} direct, {intercepted:?} with eBPF interception ({})",
        conntrack_summary(&w.ns)
    );
    assert_eq!(
        intercepted,
        Tracked {
            to_server: N,
            to_proxy: N,
            natted: 0
        },
        "the workload's connection to the proxy and the proxy's upstream connection, none NATed"
    );
    assert!(natted.is_empty(), "no entry is NATed: {natted:?}");

    // Control: iptables REDIRECT under the same rule tracks as many connections, each client
    // connection with its destination rewritten.
    let control = NetNs::new("ct_active-ctl");
    control.enable_stateful_filter();
    let _srv = ProbeServer::start_in(control.path(), &[SERVER.parse().unwrap()]).unwrap();
    let _proxy = start_proxy(&control, &["--admin", DEFAULT_ADMIN]);
    control.run_ok(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "127.0.0.1",
        "--dport",
        "8080",
        "-m",
        "mark",
        "!",
        "--mark",
        "0x539",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ]);
    let bin = probe_bin();
    let events = control.conntrack_events();
    let out = control.run(&[
        bin.to_str().unwrap(),
        "churn",
        SERVER,
        "--count",
        &N.to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let redirect = tracked(&events.finish());
    println!("iptables REDIRECT: {N} connections tracked as {redirect:?}");
    assert_eq!(
        redirect,
        Tracked {
            to_server: 2 * N,
            to_proxy: 0,
            natted: N
        },
        "each client connection NATed to the proxy, and the proxy's own ({})",
        conntrack_summary(&control)
    );
}

#[test]
fn unmodified_haproxy_forwards_to_original_destination() {
    // HAProxy 2.6 asks SO_ORIGINAL_DST only on IPv4 sockets (on IPv6 it takes the local
    // address and would connect to itself), so it listens on IPv4 only.
    let w = World::new("haproxy", &[SERVER]);
    let scratch = ScratchDir::new("haproxy");
    let cfg = scratch.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
         frontend outbound\n  bind 127.0.0.1:15001\n  default_backend original\n\
         backend original\n  server s 0.0.0.0:0\n",
    )
    .unwrap();
    let _haproxy = spawn_in(
        &w.ns,
        None,
        &["haproxy", "-db", "-f", cfg.to_str().unwrap()],
    );
    let listening =
        interceptor_tests::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            w.ns.run(&["sh", "-c", "ss -ltn | grep -q ':15001'"])
                .status
                .success()
        });
    assert!(listening, "HAProxy did not start listening");
    // HAProxy cannot put the bypass mark on its listener: any listener is the proxy here.
    w.attach(&ScopeSettings {
        proxy_listener: interceptor::ProxyListener::Any,
        ..ScopeSettings::default()
    });
    assert!(w.hello_proxied(SERVER, &[]), "IPv4 through HAProxy");
    assert!(
        w.hello_proxied("[::ffff:127.0.0.1]:8080", &[]),
        "IPv4-mapped through HAProxy"
    );
    assert_eq!(
        w.counter(Counter::OrigDstAnswered),
        2,
        "HAProxy asked the kernel"
    );
}

#[test]
fn curl_reaches_nginx_through_the_proxy() {
    let w = World::new("nginx", &[]).with_proxy();
    let scratch = ScratchDir::new("nginx");
    let dir = scratch.path();
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(dir.join("www/index.html"), "hello from nginx\n").unwrap();
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log {d}/access.log; client_body_temp_path {d}; proxy_temp_path {d};\n\
             fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ listen 127.0.0.1:8088; listen [::1]:8088; root {d}/www; }} }}\n"
        ),
    )
    .unwrap();
    let conf = dir.join("nginx.conf");
    let _nginx = spawn_in(&w.ns, None, &["nginx", "-c", conf.to_str().unwrap()]);
    let up =
        interceptor_tests::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            w.ns.run(&["sh", "-c", "ss -ltn | grep -q '127.0.0.1:8088'"])
                .status
                .success()
        });
    assert!(
        up,
        "nginx did not start: {:?}",
        std::fs::read_to_string(dir.join("error.log"))
    );
    w.attach(&ScopeSettings::default());

    for url in ["http://127.0.0.1:8088/", "http://[::1]:8088/"] {
        let mut c = exec_command(
            Some(&w.ns),
            Some(&w.cg),
            None,
            &["curl", "-sS", "--max-time", "5", url],
        );
        let out = run_cmd(&mut c, Duration::from_secs(30)).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello from nginx\n",
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(w.counter(Counter::Redirected), 2);
    assert_eq!(w.proxy_stat("forwarded_total"), 2);
}
