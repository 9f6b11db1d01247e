//! The daemon (`interceptor run --config FILE`) end to end: systemd unit and slice names
//! resolved to real cgroups, traffic from them intercepted, a unit restart (its cgroup
//! removed and recreated) attached again within a second, SIGHUP reloads (a bad config
//! changes nothing; a scope removed from the config is detached), the HTTP endpoints, and
//! what stays attached when the daemon exits.
//!
//! There is no running systemd here: the test creates the cgroups a unit and a slice would
//! have (`system.slice/web.service`, `app.slice/app-batch.slice`) under its own cgroup, which
//! it gives the daemon as `cgroup_root`. All of it is removed by guards, also on failure.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use interceptor::PinLayout;
use interceptor_tests::{
    exec_bin, interceptor_bin, probe::http_get, probe_in, run_cmd, run_cmd_ok, start_proxy,
    wait_until, NetNs, PinDir, ProbeServer, Proc, ScratchDir, TestCgroup, DEFAULT_ADMIN,
};
use nix::sys::signal::Signal;

const SERVER: &str = "127.0.0.1:8080";

fn ino(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(p).unwrap().ino()
}

/// Cgroup ids of the outbound scopes attached from `pin` whose four links are live.
fn attached_ids(pin: &PinDir) -> Vec<u64> {
    let st = interceptor::status(&PinLayout::new(pin.path())).expect("status");
    st.scopes
        .iter()
        .filter(|s| s.cgroup_exists && s.links.iter().all(|l| l.link_id.is_some()))
        .map(|s| s.cgroup_id)
        .collect()
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_get(addr, path, Duration::from_secs(5)).unwrap_or((0, String::new()))
}

/// Starts `interceptor run --config FILE` (in the host namespace, in no test cgroup).
fn start_daemon(config: &Path) -> Proc {
    let mut c = Command::new(interceptor_bin());
    c.args(["--log-format", "json", "run", "--config"])
        .arg(config);
    Proc::spawn("interceptor-run", c)
}

/// `icpt-probe hello SERVER` from a process in cgroup `cg` and namespace `ns`: proxied?
fn hello_from(ns: &NetNs, cg: &Path) -> bool {
    let v = probe_in(ns, Some(cg), None, &["hello", SERVER]);
    assert!(v.get("error").is_none(), "hello from {}: {v}", cg.display());
    v["proxied"].as_bool().expect("proxied field")
}

/// The admin address (`/metrics`, `/scopes`) the tests give a daemon that listens at `listen`.
fn admin_of(listen: SocketAddr) -> SocketAddr {
    SocketAddr::new(listen.ip(), listen.port() + 20)
}

fn write_config(path: &Path, pin: &PinDir, listen: SocketAddr, root: &Path, extra: &str) {
    std::fs::write(
        path,
        format!(
            "pin_dir = \"{}\"\nlisten = \"{listen}\"\nadmin_listen = \"{}\"\ncgroup_root = \"{}\"\n{extra}",
            pin.as_str(),
            admin_of(listen),
            root.display()
        ),
    )
    .unwrap();
}

#[test]
fn daemon_units_reattach_reload_and_exit() {
    interceptor_tests::register_helper_bins!();
    let ns = NetNs::new("daemon");
    let cg = TestCgroup::new("daemon");
    let pin = PinDir::new("daemon");
    let scratch = ScratchDir::new("daemon");
    let _server = ProbeServer::start_in(ns.path(), &[SERVER.parse().unwrap()]).expect("server");
    let _proxy = start_proxy(&ns, &["--admin", DEFAULT_ADMIN]);
    let web = cg.path().join("system.slice/web.service");
    let batch = cg.path().join("app.slice/app-batch.slice");
    std::fs::create_dir_all(&web).unwrap();
    std::fs::create_dir_all(&batch).unwrap();
    let listen: SocketAddr = "127.0.0.1:15931".parse().unwrap();
    let config = scratch.join("config.toml");
    let scopes = "[[scope]]\nunit = \"web.service\"\nexclude_ports = [9]\n\n[[scope]]\nname = \"batch\"\nslice = \"app-batch.slice\"\n";
    write_config(&config, &pin, listen, cg.path(), scopes);

    let mut daemon = start_daemon(&config);
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || get(
            listen, "/ready"
        )
        .0
            == 200),
        "daemon not ready: {}",
        daemon.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            let ids = attached_ids(&pin);
            ids.contains(&ino(&web)) && ids.contains(&ino(&batch))
        }),
        "unit and slice not attached: {}",
        daemon.stderr()
    );
    let st = interceptor::status(&PinLayout::new(pin.path())).unwrap();
    let web_scope = st.scopes.iter().find(|s| s.cgroup_id == ino(&web)).unwrap();
    assert!(
        web_scope.settings.exclude_ports.contains(&9),
        "{:?}",
        web_scope.settings
    );
    assert!(
        hello_from(&ns, &web),
        "connection from web.service not proxied"
    );
    assert!(
        hello_from(&ns, &batch),
        "connection from app-batch.slice not proxied"
    );

    // A unit restart: systemd removes the unit's cgroup and creates it again.
    let mut figures = Vec::new();
    for round in 0..5 {
        std::fs::remove_dir(&web).unwrap();
        std::fs::create_dir(&web).unwrap();
        let t0 = Instant::now();
        let new_id = ino(&web);
        assert!(
            wait_until(Duration::from_secs(5), Duration::from_millis(2), || {
                attached_ids(&pin).contains(&new_id)
            }),
            "round {round}: recreated cgroup not attached again: {}",
            daemon.stderr()
        );
        let took = t0.elapsed();
        figures.push(took);
        assert!(
            took < Duration::from_secs(1),
            "round {round}: re-attached after {took:?}, the issue asks for under a second"
        );
    }
    figures.sort();
    println!(
        "re-attach after a cgroup was recreated (rescan interval 100 ms, 5 rounds): min {:?}, median {:?}, max {:?}",
        figures[0], figures[2], figures[4]
    );
    assert!(
        hello_from(&ns, &web),
        "connection from the recreated web.service not proxied"
    );
    // The old cgroup's scope is gone from the maps (detached), only the new one is there.
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            interceptor::status(&PinLayout::new(pin.path()))
                .unwrap()
                .scopes
                .len()
                == 2
        }),
        "stale scopes of removed cgroups left: {:?}",
        interceptor::status(&PinLayout::new(pin.path()))
            .unwrap()
            .scopes
    );

    let (code, metrics) = get(admin_of(listen), "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("interceptor_decisions_total{"),
        "{metrics}"
    );
    assert!(
        metrics.contains("interceptor_daemon_reattached_total 5"),
        "{metrics}"
    );
    assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");
    assert_eq!(get(listen, "/healthz").0, 200);
    let (code, scopes_json) = get(admin_of(listen), "/scopes");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&scopes_json).unwrap();
    assert_eq!(v["scope/web.service"]["ready"], true, "{v}");
    assert_eq!(v["scope/web.service"]["reattached"], 5, "{v}");

    // A reload with a bad config changes nothing and says where the error is.
    std::fs::write(
        &config,
        "pin_dir = \"/sys/fs/bpf/x\"\n[[scope]]\nunit = \"web.service\"\nproxy_port = \"many\"\n",
    )
    .unwrap();
    let before = attached_ids(&pin);
    daemon.signal(Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || daemon
            .stderr()
            .contains("reload refused")),
        "no reload error logged: {}",
        daemon.stderr()
    );
    let log = daemon.stderr();
    let line = log.lines().find(|l| l.contains("reload refused")).unwrap();
    assert!(
        line.contains("line 4, column") && line.contains("proxy_port"),
        "{line}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        attached_ids(&pin),
        before,
        "a bad reload changed what is attached"
    );

    // A good reload without the slice: it is detached, the unit stays.
    write_config(
        &config,
        &pin,
        listen,
        cg.path(),
        "[[scope]]\nunit = \"web.service\"\n",
    );
    daemon.signal(Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
            let ids = attached_ids(&pin);
            !ids.contains(&ino(&batch)) && ids.contains(&ino(&web))
        }),
        "slice not detached on reload: {}",
        daemon.stderr()
    );
    assert!(
        !hello_from(&ns, &batch),
        "the removed slice is still intercepted"
    );
    let st = interceptor::status(&PinLayout::new(pin.path())).unwrap();
    assert_eq!(st.scopes.len(), 1, "only the unit's scope is left: {st:?}");
    let web_scope = st
        .scopes
        .iter()
        .find(|s| s.cgroup_id == ino(&web))
        .expect("the unit's scope");
    assert!(
        web_scope.settings.exclude_ports.is_empty(),
        "settings not updated on reload: {web_scope:?}"
    );

    // SIGTERM: the daemon exits, interception stays in place.
    daemon.signal(Signal::SIGTERM);
    let exit = daemon
        .wait_timeout(Duration::from_secs(10))
        .expect("daemon did not exit on SIGTERM");
    assert!(exit.success(), "daemon exit {exit:?}: {}", daemon.stderr());
    assert!(
        attached_ids(&pin).contains(&ino(&web)),
        "interception removed at exit"
    );
    assert!(
        hello_from(&ns, &web),
        "not intercepted after the daemon exited"
    );
}

#[test]
fn daemon_detach_on_exit() {
    interceptor_tests::register_helper_bins!();
    let cg = TestCgroup::new("daemon_detach_on_exit");
    let pin = PinDir::new("daemon_detach_on_exit");
    let scratch = ScratchDir::new("daemon_detach_on_exit");
    let listen: SocketAddr = "127.0.0.1:15932".parse().unwrap();
    let config = scratch.join("config.toml");
    let app = cg.child("app");
    write_config(
        &config,
        &pin,
        listen,
        cg.path(),
        &format!(
            "detach_on_exit = true\n[[scope]]\ncgroup = \"{}\"\n",
            app.display()
        ),
    );
    let mut daemon = start_daemon(&config);
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            attached_ids(&pin).contains(&ino(&app))
        }),
        "not attached: {}",
        daemon.stderr()
    );
    daemon.signal(Signal::SIGTERM);
    let exit = daemon
        .wait_timeout(Duration::from_secs(10))
        .expect("no exit");
    assert!(exit.success(), "{}", daemon.stderr());
    let st = interceptor::status(&PinLayout::new(pin.path())).unwrap();
    assert!(st.scopes.is_empty(), "detach_on_exit left {:?}", st.scopes);
    assert!(
        !pin.path().exists(),
        "pin dir left after the last scope was detached"
    );
}

#[test]
fn daemon_config_errors_name_line_and_field() {
    let scratch = ScratchDir::new("daemon_config_errors");
    let config = scratch.join("config.toml");
    for (text, want) in [
        (
            "[[scope]]\nunit = \"web.service\"\nexclude_cidrs = [\"10.1.2.3/8\"]\n",
            "line 3, column 1: web.service.exclude_cidrs",
        ),
        (
            "[[scope]]\nslice = \"app\"\n",
            "line 2, column 1: app.slice",
        ),
        ("listen = \"nowhere\"\n", "line 1, column 1: listen"),
        (
            "[[scope]]\nunit = \"a.service\"\nexclude_portz = [1]\n",
            "line 3, column 1: exclude_portz: unknown field",
        ),
    ] {
        std::fs::write(&config, text).unwrap();
        for args in [
            &["run", "--check", "--config"][..],
            &["run", "--config"][..],
        ] {
            let mut c = Command::new(interceptor_bin());
            c.args(args).arg(&config);
            let out = run_cmd(&mut c, Duration::from_secs(30)).unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} accepted {text:?}");
            assert!(
                err.contains(want),
                "{args:?} {text:?}: want {want:?} in: {err}"
            );
            println!("{}", err.trim());
        }
    }
}

/// The capabilities `deploy/systemd/interceptor.service` grants (`CapabilityBoundingSet=`),
/// as setpriv names them (`+bpf,+net_admin,...`).
fn unit_capabilities() -> String {
    let unit = interceptor_tests::workspace_dir().join("deploy/systemd/interceptor.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    let caps = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet=");
    caps.split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The capabilities the DaemonSet's agent container adds (`capabilities.add`, after
/// `drop: ["ALL"]`), as setpriv names them.
fn daemonset_capabilities() -> String {
    let ds = interceptor_tests::workspace_dir().join("deploy/kubernetes/daemonset.yaml");
    let text = std::fs::read_to_string(&ds).unwrap();
    assert!(
        text.contains("drop: [\"ALL\"]"),
        "the DaemonSet drops ALL first"
    );
    let adds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("add: ["))
        .collect();
    assert_eq!(
        adds.len(),
        1,
        "one capabilities.add list in {}",
        ds.display()
    );
    adds[0]
        .trim_end_matches(']')
        .split(',')
        .map(|c| {
            let c = c.trim().trim_matches('"');
            format!("+{}", c.trim_start_matches("CAP_").to_lowercase())
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The daemon with nothing but the systemd unit's capabilities (and no_new_privs, as the
/// unit sets): outbound and inbound attach, and the proxy's listener registered.
#[test]
fn daemon_runs_with_only_the_units_capabilities() {
    runs_with_only(unit_capabilities(), "daemon_caps");
}

/// The same with exactly the DaemonSet's capability set (not privileged).
#[test]
fn daemon_runs_with_only_the_daemonsets_capabilities() {
    let ds = daemonset_capabilities();
    println!("the DaemonSet's capabilities: {ds}");
    runs_with_only(ds, "daemon_caps_ds");
}

fn runs_with_only(caps: String, name: &str) {
    interceptor_tests::register_helper_bins!();
    let ns = NetNs::new(name);
    let cg = TestCgroup::new(name);
    let pin = PinDir::new(name);
    let scratch = ScratchDir::new(name);
    let _server = ProbeServer::start_in(ns.path(), &[SERVER.parse().unwrap()]).expect("server");
    let app = cg.child("app");
    let proxy = interceptor_tests::proxy_bin();
    let mut pc = Command::new(exec_bin());
    pc.arg("--cgroup")
        .arg(&app)
        .arg("--netns")
        .arg(ns.path())
        .arg("--")
        .arg(&proxy);
    pc.args(["--inbound", "0.0.0.0:15006", "--admin", DEFAULT_ADMIN]);
    let _proxy = Proc::spawn("proxy", pc);
    let listen: SocketAddr = "127.0.0.1:15934".parse().unwrap();
    let config = scratch.join("config.toml");
    write_config(
        &config,
        &pin,
        listen,
        cg.path(),
        &format!(
            "[[scope]]\nname = \"app\"\ncgroup = \"{}\"\nnetns = \"{}\"\n",
            app.display(),
            ns.path().display()
        ),
    );
    println!("capabilities: {caps}");
    let mut c = Command::new("setpriv");
    c.args([
        "--no-new-privs",
        "--bounding-set",
        &format!("-all,{caps}"),
        "--inh-caps",
        "-all",
        "--",
    ])
    .arg(interceptor_bin())
    .args(["run", "--config"])
    .arg(&config);
    let mut daemon = Proc::spawn("interceptor-run-caps", c);
    let layout = PinLayout::new(pin.path());
    assert!(
        wait_until(Duration::from_secs(15), Duration::from_millis(20), || {
            let st = interceptor::status(&layout).unwrap();
            st.scopes.iter().any(|s| s.cgroup_id == ino(&app))
                && st.inbound.iter().any(|i| i.registered.contains(&"ipv4"))
        }),
        "not attached and registered with the unit's capabilities: {:?}\n{}",
        interceptor::status(&layout).unwrap(),
        daemon.stderr()
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    let eff = status
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .unwrap()
        .to_string();
    println!("daemon {eff}");
    // Exactly the unit's capabilities are effective: no more (the bounding set held), and
    // no fewer (what attached and registered above did it with these).
    let hex = eff.split_whitespace().nth(1).expect("CapEff value");
    let decoded = run_cmd_ok("capsh", &[&format!("--decode={hex}")]);
    let effective: BTreeSet<String> = decoded
        .trim()
        .split_once('=')
        .map(|(_, names)| names.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let unit: BTreeSet<String> = caps
        .split(',')
        .map(|c| format!("cap_{}", c.trim_start_matches('+')))
        .collect();
    assert_eq!(
        effective, unit,
        "the daemon's effective capabilities ({hex}) against {caps}"
    );
    assert!(hello_from(&ns, &app), "outbound from the scope not proxied");
    assert!(daemon.is_running(), "{}", daemon.stderr());
}

/// systemd readiness: with `$NOTIFY_SOCKET` set (here a datagram socket the test binds, as
/// systemd does for `Type=notify`), the daemon sends `READY=1` once, and only after its first
/// attach pass: when the datagram arrives, the configured scope is already attached.
#[test]
fn daemon_notifies_systemd_ready_after_first_attach() {
    interceptor_tests::register_helper_bins!();
    let cg = TestCgroup::new("daemon_notify");
    let pin = PinDir::new("daemon_notify");
    let scratch = ScratchDir::new("daemon_notify");
    let listen: SocketAddr = "127.0.0.1:15934".parse().unwrap();
    let config = scratch.join("config.toml");
    let app = cg.child("app");
    write_config(
        &config,
        &pin,
        listen,
        cg.path(),
        &format!("[[scope]]\ncgroup = \"{}\"\n", app.display()),
    );
    let sock_path = scratch.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert!(attached_ids(&pin).is_empty());
    let started = Instant::now();
    let mut daemon = {
        let mut c = Command::new(interceptor_bin());
        c.args(["--log-format", "json", "run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &sock_path);
        Proc::spawn("interceptor-run", c)
    };
    let mut buf = [0u8; 256];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification: {e}\n{}", daemon.stderr()));
    // Checked at once: an early READY=1 would find the scope not yet attached.
    let attached = attached_ids(&pin);
    // States are newline-separated (sd_notify ends each with one).
    let msg = String::from_utf8_lossy(&buf[..n]).trim_end().to_string();
    println!("READY=1 after {:?}: {msg:?}", started.elapsed());
    assert_eq!(msg, "READY=1");
    assert!(
        attached.contains(&ino(&app)),
        "READY=1 sent before the scope was attached: {attached:?}\n{}",
        daemon.stderr()
    );
    // Once only.
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(sock.recv(&mut buf).is_err(), "a second notification");
    daemon.signal(Signal::SIGTERM);
    let exit = daemon
        .wait_timeout(Duration::from_secs(10))
        .expect("no exit");
    assert!(exit.success(), "{}", daemon.stderr());
    interceptor::detach_all(&PinLayout::new(pin.path())).unwrap();
}

/// The HTTP server bounds the requests it serves at once: with 64 connections held open
/// (no request sent), one more is answered 503 `busy` at once rather than queued; once they
/// are closed, requests are served again.
#[test]
fn daemon_http_bounds_concurrent_requests() {
    interceptor_tests::register_helper_bins!();
    let cg = TestCgroup::new("daemon_http_bound");
    let pin = PinDir::new("daemon_http_bound");
    let scratch = ScratchDir::new("daemon_http_bound");
    let listen: SocketAddr = "127.0.0.1:15935".parse().unwrap();
    let config = scratch.join("config.toml");
    write_config(&config, &pin, listen, cg.path(), "");
    let mut daemon = start_daemon(&config);
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || get(
            listen, "/healthz"
        )
        .0
            == 200),
        "{}",
        daemon.stderr()
    );
    let held: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(listen).unwrap())
        .collect();
    let (code, body) = get(listen, "/healthz");
    println!("with 64 connections held: {code} {body:?}");
    assert_eq!(
        (code, body.trim()),
        (503, "busy"),
        "a 65th request served while 64 are in flight"
    );
    drop(held);
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || get(
            listen, "/healthz"
        )
        .0
            == 200),
        "not served again after the held connections closed"
    );
    assert!(daemon.is_running(), "{}", daemon.stderr());
    daemon.signal(Signal::SIGTERM);
    assert!(daemon
        .wait_timeout(Duration::from_secs(10))
        .expect("no exit")
        .success());
}

/// The window after a unit restart (issue 18, item 7), before and after. A unit restart
/// makes a new cgroup, which the daemon sees and attaches only after it appears: connections
/// made at once by the new process go out unintercepted. Attaching at a slice closes it: the
/// slice's cgroup outlives the restarts of the units in it, and the kernel gives each new
/// child cgroup its parent's programs at creation (cgroup links are multi-attach), before any
/// process is in it. The test restarts a unit configured by name (`unit = "web.service"` in
/// `system.slice`) and a unit in a slice configured as the scope (`slice = "intercept.slice"`,
/// the unit `intercept.slice/web2.service`) 8 times each; after each restart a process is
/// started in the new cgroup at once and connects as its first action, then again and again
/// until a connection is proxied. Printed per kind: how many first connections went direct
/// and the window (from the cgroup's creation to the start of the first proxied process).
/// Asserted: in the slice, every first connection is proxied; with the rescan set to 10 s,
/// the unit's new cgroup is still attached within 3 s of each restart (the daemon watches
/// the directory that holds a unit's cgroup, and is woken when the new one is made).
#[test]
fn daemon_unit_restart_window_closed_by_a_slice() {
    interceptor_tests::register_helper_bins!();
    const RESTARTS: usize = 8;
    let ns = NetNs::new("daemon_window");
    let cg = TestCgroup::new("daemon_window");
    let pin = PinDir::new("daemon_window");
    let scratch = ScratchDir::new("daemon_window");
    let _server = ProbeServer::start_in(ns.path(), &[SERVER.parse().unwrap()]).expect("server");
    let _proxy = start_proxy(&ns, &["--admin", DEFAULT_ADMIN]);
    let web = cg.path().join("system.slice/web.service");
    let slice = cg.path().join("intercept.slice");
    let web2 = slice.join("web2.service");
    for d in [&web, &web2] {
        std::fs::create_dir_all(d).unwrap();
    }
    let listen: SocketAddr = "127.0.0.1:15936".parse().unwrap();
    let config = scratch.join("config.toml");
    write_config(
        &config,
        &pin,
        listen,
        cg.path(),
        // A rescan far above the windows measured: the unit's new cgroup is found through
        // the daemon's inotify watch on `system.slice`, not by the rescan.
        "rescan_interval_ms = 10000\n[[scope]]\nunit = \"web.service\"\n\n[[scope]]\nslice = \"intercept.slice\"\n",
    );
    let mut daemon = start_daemon(&config);
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            let ids = attached_ids(&pin);
            get(listen, "/ready").0 == 200 && ids.contains(&ino(&web)) && ids.contains(&ino(&slice))
        }),
        "unit and slice not attached: {}",
        daemon.stderr()
    );
    assert!(hello_from(&ns, &web), "web.service not proxied");
    assert!(
        hello_from(&ns, &web2),
        "intercept.slice/web2.service not proxied"
    );

    // One restart: the cgroup removed and made again, then processes started in it at once,
    // one after the other, each connecting first thing, until one is proxied. Returns whether
    // the first was proxied and the window (zero when it was).
    let restart = |unit: &Path| -> (bool, Duration) {
        std::fs::remove_dir(unit).unwrap();
        std::fs::create_dir(unit).unwrap();
        let made = Instant::now();
        let mut first = None;
        loop {
            let started = made.elapsed();
            let proxied = hello_from(&ns, unit);
            first.get_or_insert(proxied);
            if proxied {
                return (
                    first.unwrap(),
                    if first == Some(true) {
                        Duration::ZERO
                    } else {
                        started
                    },
                );
            }
            assert!(
                made.elapsed() < Duration::from_secs(10),
                "{} never intercepted after its restart: {}",
                unit.display(),
                daemon.stderr()
            );
        }
    };
    let mut report = Vec::new();
    for (kind, unit) in [
        ("unit scope (web.service)", &web),
        ("slice scope (intercept.slice)", &slice.join("web2.service")),
    ] {
        let mut direct = 0;
        let mut windows = Vec::new();
        for _ in 0..RESTARTS {
            let (first_proxied, window) = restart(unit);
            if !first_proxied {
                direct += 1;
            }
            windows.push(window);
        }
        windows.sort();
        println!(
            "{kind}: {RESTARTS} restarts, {direct} first connections went direct; window min {:?}, median {:?}, max {:?}",
            windows[0],
            windows[RESTARTS / 2],
            windows[RESTARTS - 1]
        );
        report.push((kind, direct, windows));
    }
    let (_, _, unit_windows) = &report[0];
    assert!(
        unit_windows[RESTARTS - 1] < Duration::from_secs(3),
        "with a 10 s rescan a restarted unit waited {:?}: the new cgroup was not seen when made",
        unit_windows[RESTARTS - 1]
    );
    let (_, slice_direct, slice_windows) = &report[1];
    assert_eq!(
        *slice_direct, 0,
        "a unit in an attached slice ran unintercepted after a restart: windows {slice_windows:?}"
    );
    daemon.signal(Signal::SIGTERM);
    assert!(daemon
        .wait_timeout(Duration::from_secs(10))
        .expect("daemon did not exit")
        .success());
}

/// Scopes cannot be nested: a unit configured by name inside a slice that is configured too
/// would have its connections reset (the slice's connect program runs after the unit's and
/// removes the record of a connect already sent to the proxy). The daemon refuses the inner
/// scope, says why in `/scopes` and the log, and the unit's connections are intercepted by
/// the slice's programs. The unit is listed first, so order does not decide. Fails with the
/// unit attached as well: its connection is reset by the proxy (no original destination).
#[test]
fn daemon_refuses_a_scope_inside_another() {
    interceptor_tests::register_helper_bins!();
    let ns = NetNs::new("daemon_nested");
    let cg = TestCgroup::new("daemon_nested");
    let pin = PinDir::new("daemon_nested");
    let scratch = ScratchDir::new("daemon_nested");
    let _server = ProbeServer::start_in(ns.path(), &[SERVER.parse().unwrap()]).expect("server");
    let _proxy = start_proxy(&ns, &["--admin", DEFAULT_ADMIN]);
    let slice = cg.path().join("intercept.slice");
    let web2 = slice.join("web2.service");
    std::fs::create_dir_all(&web2).unwrap();
    let listen: SocketAddr = "127.0.0.1:15937".parse().unwrap();
    let config = scratch.join("config.toml");
    write_config(
        &config,
        &pin,
        listen,
        cg.path(),
        "[[scope]]\nunit = \"web2.service\"\nexclude_ports = [9]\n\n[[scope]]\nslice = \"intercept.slice\"\n",
    );
    let mut daemon = start_daemon(&config);
    assert!(
        wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            get(listen, "/ready").0 == 200 && attached_ids(&pin).contains(&ino(&slice))
        }),
        "slice not attached: {}",
        daemon.stderr()
    );
    let v = probe_in(&ns, Some(&web2), None, &["hello", SERVER]);
    assert!(
        v.get("error").is_none() && v["proxied"] == true,
        "a connection from the unit inside the attached slice: {v}\n{}",
        daemon.stderr()
    );
    assert!(
        !attached_ids(&pin).contains(&ino(&web2)),
        "the unit inside the slice was attached too"
    );
    let (code, scopes) = get(admin_of(listen), "/scopes");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&scopes).unwrap();
    let waiting = v["scope/web2.service"]["waiting"]
        .as_str()
        .unwrap_or_default();
    assert!(
        waiting.contains("inside scope scope/intercept.slice") && waiting.contains("remove one"),
        "{v}"
    );
    assert!(daemon
        .stderr()
        .contains("scope inside another scope: refused"));
    daemon.signal(Signal::SIGTERM);
    assert!(daemon
        .wait_timeout(Duration::from_secs(10))
        .expect("daemon did not exit")
        .success());
}
