//! Inbound interception (sk_lookup on the workload's network namespace), the proxy-down
//! policies of both directions, and the whole sidecar: real programs, real sockets, the real
//! proxy, a workload namespace joined to a peer namespace by a veth pair.
use std::net::SocketAddr;

use interceptor::{Counter, InboundSettings, PinLayout, ProxyDown, ScopeSettings, Stats};
use interceptor_tests::{
    probe_in, proxy_stats, start_proxy, NetNs, PinDir, ProbeServer, Proc, TestCgroup,
};
use serde_json::Value;

const APP4: &str = "10.199.7.1";
const PEER4: &str = "10.199.7.2";
const APP6: &str = "fd00:1c7::1";
const PEER6: &str = "fd00:1c7::2";
const ADMIN: &str = "127.0.0.1:15000";

/// A workload namespace (with its cgroup) and a peer namespace joined by a veth pair.
/// Fields drop in declaration order: processes, programs, cgroup, namespaces.
struct Sidecar {
    proxy: Option<Proc>,
    servers: Vec<ProbeServer>,
    pin: PinDir,
    cg: TestCgroup,
    peer: NetNs,
    ns: NetNs,
}

impl Sidecar {
    fn new(test: &str) -> Sidecar {
        interceptor_tests::register_helper_bins!();
        let ns = NetNs::new(test);
        let peer = NetNs::new(&format!("{test}-peer"));
        ns.link_to(
            "icwl0",
            &[&format!("{APP4}/24"), &format!("{APP6}/64")],
            &peer,
            "icpr0",
            &[&format!("{PEER4}/24"), &format!("{PEER6}/64")],
        );
        let cg = TestCgroup::new(test);
        let pin = PinDir::new(test);
        // The app listens on every address of its namespace.
        let app = ProbeServer::start_in(
            ns.path(),
            &[
                "0.0.0.0:8080".parse().unwrap(),
                "[::]:8080".parse().unwrap(),
            ],
        )
        .expect("app server");
        Sidecar {
            proxy: None,
            servers: vec![app],
            pin,
            cg,
            peer,
            ns,
        }
    }

    fn layout(&self) -> PinLayout {
        PinLayout::new(self.pin.path())
    }

    /// Starts the proxy in the workload's namespace with both directions.
    fn start_proxy(&mut self) {
        self.proxy = Some(start_proxy(
            &self.ns,
            &[
                "--admin",
                ADMIN,
                "--inbound",
                "0.0.0.0:15006",
                "--inbound",
                "[::]:15006",
            ],
        ));
    }

    fn register(&self) {
        let pid = self.proxy.as_ref().expect("proxy running").pid() as i32;
        let regs = interceptor::register(&self.layout(), self.ns.path(), pid)
            .unwrap_or_else(|e| panic!("register: {e}"));
        assert_eq!(regs.len(), 2, "one listener per family: {regs:?}");
    }

    fn kill_proxy(&mut self) {
        if let Some(mut p) = self.proxy.take() {
            p.kill();
        }
    }

    fn attach_inbound(&self, s: &InboundSettings) {
        interceptor::attach_inbound(&self.layout(), self.ns.path(), s)
            .unwrap_or_else(|e| panic!("attach --netns: {e}"));
    }

    fn stats(&self) -> Stats {
        interceptor::stats(&self.layout()).expect("stats")
    }

    fn inbound(&self, c: Counter) -> u64 {
        let id = interceptor::netns::resolve(self.ns.path())
            .unwrap()
            .scope_id();
        self.stats().get(id, c)
    }

    fn proxy_stat(&self, name: &str) -> u64 {
        proxy_stats(&self.ns, ADMIN)[name]
            .as_u64()
            .unwrap_or_else(|| panic!("proxy /stats has no counter {name}"))
    }

    /// `icpt-probe hello ADDR` from the peer namespace.
    fn peer_probe(&self, addr: &str) -> Value {
        probe_in(&self.peer, None, None, &["hello", addr])
    }

    /// `icpt-probe ARGS` from the workload (its cgroup and namespace).
    fn app_probe(&self, args: &[&str]) -> Value {
        probe_in(&self.ns, Some(self.cg.path()), None, args)
    }
}

fn ip(v: &Value, field: &str) -> std::net::IpAddr {
    let a: SocketAddr = v[field].as_str().unwrap().parse().unwrap();
    interceptor_tests::probe::normalize(a).ip()
}

#[test]
fn inbound_ipv4_and_ipv6_go_through_the_proxy_without_rewriting() {
    let mut w = Sidecar::new("in-basic");
    w.start_proxy();
    w.attach_inbound(&InboundSettings::default());
    w.register();

    let app4 = format!("{APP4}:8080");
    let v = w.peer_probe(&app4);
    assert_eq!(v["proxied"], true, "{v}");
    assert_eq!(
        v["server_local"], app4,
        "the app is reached at the address dialled: {v}"
    );
    assert_eq!(
        ip(&v, "peer_seen_by_server").to_string(),
        "127.0.0.6",
        "{v}"
    );

    let app6 = format!("[{APP6}]:8080");
    let v = w.peer_probe(&app6);
    assert_eq!(v["proxied"], true, "{v}");
    assert_eq!(v["server_local"], app6, "{v}");
    assert_eq!(ip(&v, "peer_seen_by_server").to_string(), "::1", "{v}");

    assert_eq!(w.inbound(Counter::InboundRedirected), 2);
    assert_eq!(
        w.inbound(Counter::InboundLoopback),
        2,
        "the proxy's own hops to the app"
    );
    assert_eq!(w.proxy_stat("inbound_forwarded_total"), 2);
}

#[test]
fn excluded_and_not_included_inbound_ports_go_direct() {
    let mut w = Sidecar::new("in-excl");
    let mut app = w.servers.pop().unwrap();
    drop(app);
    app = ProbeServer::start_in(
        w.ns.path(),
        &[
            "0.0.0.0:8080".parse().unwrap(),
            "0.0.0.0:8081".parse().unwrap(),
            "0.0.0.0:8082".parse().unwrap(),
        ],
    )
    .unwrap();
    w.servers.push(app);
    w.start_proxy();
    let mut s = InboundSettings::default();
    s.exclude_ports.insert(8081);
    w.attach_inbound(&s);
    w.register();
    assert_eq!(w.peer_probe(&format!("{APP4}:8080"))["proxied"], true);
    assert_eq!(
        w.peer_probe(&format!("{APP4}:8081"))["proxied"],
        false,
        "excluded port"
    );
    assert_eq!(w.inbound(Counter::InboundExcludedPort), 1);

    // Only 8082 is intercepted now; updated in place, no re-attach and no re-register.
    s.exclude_ports.clear();
    s.include_ports.insert(8082);
    w.attach_inbound(&s);
    assert_eq!(
        w.peer_probe(&format!("{APP4}:8080"))["proxied"],
        false,
        "outside the include list"
    );
    assert_eq!(w.peer_probe(&format!("{APP4}:8082"))["proxied"], true);
    assert_eq!(w.inbound(Counter::InboundNotIncluded), 1);
}

#[test]
fn inbound_proxy_down_closed_refuses_and_open_goes_direct() {
    let mut w = Sidecar::new("in-down");
    w.start_proxy();
    w.attach_inbound(&InboundSettings::default());
    w.register();
    let app4 = format!("{APP4}:8080");
    assert_eq!(w.peer_probe(&app4)["proxied"], true);
    let served = w.servers[0].accepted();

    w.kill_proxy();
    let v = w.peer_probe(&app4);
    assert_eq!(
        v["kind"], "refused",
        "closed: refused while the proxy is down: {v}"
    );
    assert_eq!(
        w.servers[0].accepted(),
        served,
        "nothing reached the app unproxied"
    );
    assert_eq!(w.inbound(Counter::InboundProxyDownRefused), 1);

    let s = InboundSettings {
        on_proxy_down: ProxyDown::Open,
        ..InboundSettings::default()
    };
    w.attach_inbound(&s);
    let v = w.peer_probe(&app4);
    assert_eq!(
        v["proxied"], false,
        "open: direct while the proxy is down: {v}"
    );
    assert_eq!(w.inbound(Counter::InboundProxyDownDirect), 1);
}

#[test]
fn restarted_proxy_is_registered_again_without_reattaching() {
    let mut w = Sidecar::new("in-restart");
    w.start_proxy();
    w.attach_inbound(&InboundSettings::default());
    w.register();
    let link = |w: &Sidecar| interceptor::status(&w.layout()).unwrap().inbound[0].links[0].link_id;
    let before = link(&w);
    let app4 = format!("{APP4}:8080");
    assert_eq!(w.peer_probe(&app4)["proxied"], true);

    w.kill_proxy();
    w.start_proxy();
    assert_eq!(
        w.peer_probe(&app4)["kind"],
        "refused",
        "a new proxy is not used before it is registered"
    );
    w.register();
    let v = w.peer_probe(&app4);
    assert_eq!(v["proxied"], true, "{v}");
    let v = w.peer_probe(&format!("[{APP6}]:8080"));
    assert_eq!(v["proxied"], true, "{v}");
    assert_eq!(link(&w), before, "the same link: nothing was re-attached");
    let st = interceptor::status(&w.layout()).unwrap();
    assert_eq!(st.inbound[0].registered, vec!["ipv4", "ipv6"]);
}

#[test]
fn outbound_proxy_down_closed_refuses_and_open_goes_direct() {
    let mut w = Sidecar::new("out-down");
    let layout = w.layout();
    let local = "127.0.0.1:8080";
    w.start_proxy();
    interceptor::attach(&layout, w.cg.path(), &ScopeSettings::default()).unwrap();
    assert_eq!(w.app_probe(&["hello", local])["proxied"], true);
    w.kill_proxy();
    let v = w.app_probe(&["hello", local]);
    assert_eq!(
        v["kind"], "refused",
        "closed: no proxy, connect refused: {v}"
    );
    let id = w.cg.id();
    assert_eq!(w.stats().get(id, Counter::ProxyDownRefused), 1);

    let open = ScopeSettings {
        on_proxy_down: ProxyDown::Open,
        ..ScopeSettings::default()
    };
    interceptor::attach(&layout, w.cg.path(), &open).unwrap();
    let v = w.app_probe(&["hello", local]);
    assert_eq!(
        v["proxied"], false,
        "open: direct while no proxy listens: {v}"
    );
    assert_eq!(w.stats().get(id, Counter::ProxyDownDirect), 1);
    assert_eq!(
        w.stats().get(id, Counter::Redirected),
        1,
        "only while the proxy ran"
    );
}

#[test]
fn sidecar_both_directions_through_one_proxy_without_nat() {
    let mut w = Sidecar::new("sidecar");
    // Conntrack active in both namespaces, as under a host firewall (a stateful filter rule,
    // no NAT): every connection gets an entry, and none may have its destination rewritten.
    w.ns.enable_stateful_filter();
    w.peer.enable_stateful_filter();
    let peer_server = ProbeServer::start_in(
        w.peer.path(),
        &[
            format!("{PEER4}:9090").parse().unwrap(),
            format!("[{PEER6}]:9090").parse().unwrap(),
        ],
    )
    .unwrap();
    w.servers.push(peer_server);
    w.start_proxy();
    let layout = w.layout();
    interceptor::attach(&layout, w.cg.path(), &ScopeSettings::default()).unwrap();
    w.attach_inbound(&InboundSettings::default());
    w.register();

    // peer -> app: through the proxy's inbound listener.
    let v = w.peer_probe(&format!("{APP4}:8080"));
    assert_eq!(v["proxied"], true, "peer -> app: {v}");
    // app -> peer: through the proxy's outbound listener, to the address dialled.
    for target in [format!("{PEER4}:9090"), format!("[{PEER6}]:9090")] {
        let v = w.app_probe(&["hello", &target]);
        assert_eq!(v["proxied"], true, "app -> peer {target}: {v}");
        assert_eq!(v["server_local"], target, "{v}");
        assert_eq!(
            v["socket_peer"], target,
            "the app sees the address it dialled: {v}"
        );
    }
    // The app calling itself on loopback: one trip through the outbound listener; the
    // proxy's hop to the app comes from loopback and is not steered inbound again.
    let v = w.app_probe(&["hello", "127.0.0.1:8080"]);
    assert_eq!(v["proxied"], true, "app -> itself: {v}");
    // A bulk exchange both ways across the veth, through both listeners.
    let v = w.app_probe(&[
        "bulk",
        &format!("{PEER4}:9090"),
        "--send",
        "10000000",
        "--recv",
        "10000000",
        "--seed",
        "3",
    ]);
    assert_eq!(v["ok"], true, "{v}");

    let st = w.stats();
    let out_id = w.cg.id();
    let in_id = interceptor::netns::resolve(w.ns.path()).unwrap().scope_id();
    assert_eq!(
        st.get(out_id, Counter::Redirected),
        4,
        "three hellos and one bulk out"
    );
    assert_eq!(st.get(out_id, Counter::OrigDstAnswered), 4);
    assert_eq!(
        st.get(in_id, Counter::InboundRedirected),
        1,
        "one connection in"
    );
    // Loopback connections in the workload's namespace pass sk_lookup untouched: the four
    // connections of the app to the proxy's outbound listener, the proxy's hop for the app's
    // call to itself, and the proxy's inbound hop to the app.
    assert_eq!(st.get(in_id, Counter::InboundLoopback), 6);
    assert_eq!(w.proxy_stat("forwarded_total"), 4);
    assert_eq!(w.proxy_stat("inbound_forwarded_total"), 1);
    for (ns, what) in [(&w.ns, "workload namespace"), (&w.peer, "peer namespace")] {
        assert!(
            !ns.conntrack_entries(false).is_empty(),
            "conntrack is active in the {what}"
        );
        let natted = ns.conntrack_entries(true);
        assert!(natted.is_empty(), "no NAT in the {what}: {natted:?}");
    }
}

#[test]
fn cli_attach_netns_register_status_detach() {
    let mut w = Sidecar::new("in-cli");
    w.start_proxy();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(interceptor_tests::interceptor_bin())
            .arg("--pin-dir")
            .arg(w.pin.path())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ns = w.ns.path_str();
    let (ok, _, err) = cli(&["attach", "--netns", ns, "--exclude-inbound-port", "15021"]);
    assert!(ok, "{err}");
    let pid = w.proxy.as_ref().unwrap().pid().to_string();
    let (ok, out, err) = cli(&["register", "--netns", ns, "--pid", &pid]);
    assert!(ok, "{err}");
    assert!(
        out.contains("0.0.0.0:15006") && out.contains("[::]:15006"),
        "{out}"
    );
    assert_eq!(w.peer_probe(&format!("{APP4}:8080"))["proxied"], true);

    let (ok, out, _) = cli(&["status", "--json"]);
    assert!(ok);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["inbound"][0]["netns"], ns, "{st}");
    assert_eq!(st["inbound"][0]["settings"]["exclude_ports"][0], 15021);
    assert_eq!(st["inbound"][0]["settings"]["on_proxy_down"], "closed");
    assert!(st["inbound"][0]["links"][0]["link_id"].is_u64(), "{st}");
    let (ok, out, _) = cli(&["stats", "--json", "--netns", ns]);
    assert!(ok);
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["scopes"][0]["kind"], "inbound");
    assert_eq!(
        stats["scopes"][0]["counters"]["inbound_redirected"], 1,
        "{stats}"
    );

    // Registering a process that has no inbound listener is refused clearly.
    let me = std::process::id().to_string();
    let (ok, _, err) = cli(&["register", "--netns", ns, "--pid", &me]);
    assert!(
        !ok && err.contains("no TCP socket listening on port 15006"),
        "{err}"
    );

    let (ok, _, err) = cli(&["detach", "--netns", ns]);
    assert!(ok, "{err}");
    assert_eq!(
        w.peer_probe(&format!("{APP4}:8080"))["proxied"],
        false,
        "direct after detach"
    );
    assert!(
        !w.pin.path().exists(),
        "the last detach removes the pin dir"
    );
}

/// A stand-in proxy in Python (as Envoy binds it): one listener on `ADDR`:15006 of the given
/// family and protocol; to each accepted connection it writes its local address and closes.
fn python_listener(ns: &NetNs, family: &str, addr: &str, protocol: u32, v6only: bool) -> Proc {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.{family}, socket.SOCK_STREAM, {protocol})\n\
         if s.family == socket.AF_INET6:\n    \
             s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, {v6only})\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{addr}', 15006))\n\
         s.listen(64)\n\
         print('listening', flush=True)\n\
         while True:\n    \
             c, _ = s.accept()\n    \
             host, port = c.getsockname()[:2]\n    \
             c.sendall(f'{{host}} {{port}}\\n'.encode())\n    \
             c.close()\n",
        v6only = u8::from(v6only),
    );
    let mut p = ns.spawn(&["/usr/bin/python3", "-c", &script]);
    assert!(
        p.wait_for_stdout("listening", std::time::Duration::from_secs(10)),
        "python listener on {addr}:15006 did not start: {}",
        p.stderr()
    );
    p
}

/// From the peer namespace: connect to `addr` and read the line the listener writes.
fn peer_line(w: &Sidecar, addr: &str) -> String {
    let addr: SocketAddr = addr.parse().unwrap();
    w.peer.in_ns(|| {
        use std::io::Read as _;
        let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {addr} from the peer: {e}"));
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut line = String::new();
        s.read_to_string(&mut line)
            .unwrap_or_else(|e| panic!("read from {addr}: {e}"));
        line.trim().to_string()
    })
}

#[test]
fn register_takes_a_dual_stack_listener_for_both_families_and_refuses_non_tcp() {
    let w = Sidecar::new("in-dual");
    w.attach_inbound(&InboundSettings::default());
    let layout = w.layout();

    // A stream listener that is not TCP (MPTCP, protocol 262) on the inbound port: refused.
    let mut mptcp = python_listener(&w.ns, "AF_INET", "0.0.0.0", 262, false);
    let err = interceptor::register(&layout, w.ns.path(), mptcp.pid() as i32)
        .expect_err("an MPTCP listener must not be registered")
        .to_string();
    assert!(
        err.contains("not TCP") && err.contains("protocol 262") && err.contains("15006"),
        "the error names the socket and why: {err}"
    );
    mptcp.kill();

    // `[::]:15006` without IPV6_V6ONLY (Envoy's default): one socket, both families.
    let dual = python_listener(&w.ns, "AF_INET6", "::", 6, false);
    let regs = interceptor::register(&layout, w.ns.path(), dual.pid() as i32)
        .unwrap_or_else(|e| panic!("register the dual-stack listener: {e}"));
    assert_eq!(regs.len(), 1, "{regs:?}");
    assert_eq!(
        regs[0].families,
        vec![interceptor::AF_INET, interceptor::AF_INET6],
        "{regs:?}"
    );
    let st = interceptor::status(&layout).expect("status");
    let shown = serde_json::to_value(&st).unwrap().to_string();
    assert!(
        shown.contains(r#""registered":["ipv4","ipv6"]"#),
        "status shows both families registered: {shown}"
    );

    // Both families from the peer reach the listener, at the address they dialled.
    assert_eq!(
        peer_line(&w, &format!("{APP4}:8080")),
        format!("::ffff:{APP4} 8080"),
        "IPv4 steered into the dual-stack listener"
    );
    assert_eq!(
        peer_line(&w, &format!("[{APP6}]:8080")),
        format!("{APP6} 8080"),
        "IPv6 steered into the dual-stack listener"
    );
    assert_eq!(w.inbound(Counter::InboundRedirected), 2);
}
