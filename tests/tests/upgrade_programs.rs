//! In-place kernel program upgrade (`interceptor upgrade`, BPF_LINK_UPDATE) end to end: the
//! real programs in the real kernel, real traffic through the real proxy, each test in its
//! own network namespace, cgroups and pin directory, all removed by guards.
//!
//! - ten upgrades in a row under load (wrk keep-alive plus a churn of new connections):
//!   0 client errors, every link on a new program after every upgrade, old programs freed;
//! - maps of another layout: `upgrade` and `attach` refuse with the message, change nothing;
//! - the loader SIGKILLed at stepped points of `upgrade` and of `attach` (first attach, a new
//!   scope under load, a re-attach): traffic keeps working, a rerun completes the state.
//!
//! Run as root, one test at a time: `cargo xtask test -- upgrade_programs`.
use std::{collections::BTreeMap, net::SocketAddr, path::Path, process::Command, time::Duration};

use interceptor::{Counter, PinLayout};
use interceptor_tests::{
    bpftool_cgroup_progs, cgroup2_root, interceptor_bin, listen_drops, proxy_stats, run_cmd,
    run_cmd_ok, run_in, wait_until, Churn, NetNs, Nginx, PinDir, ProbeServer, Proc, TestCgroup,
    Wrk, DEFAULT_ADMIN,
};
use serde_json::Value;

const SERVER: &str = "127.0.0.1:8080";
const HTTP: &str = "127.0.0.1:8088";

/// One test's world. Fields drop in declaration order: processes first, then the programs
/// (pin dir), the cgroups and the namespace.
struct World {
    _proxy: Option<Proc>,
    nginx: Option<Nginx>,
    _server: ProbeServer,
    pin: PinDir,
    cg: TestCgroup,
    ns: NetNs,
}

impl World {
    fn new(test: &str) -> World {
        interceptor_tests::register_helper_bins!();
        let ns = NetNs::new(test);
        let cg = TestCgroup::new(test);
        let pin = PinDir::new(test);
        let addr: SocketAddr = SERVER.parse().unwrap();
        let server = ProbeServer::start_in(ns.path(), &[addr]).expect("probe server");
        let proxy = Some(interceptor_tests::start_proxy(
            &ns,
            &["--admin", DEFAULT_ADMIN],
        ));
        World {
            _proxy: proxy,
            nginx: None,
            _server: server,
            pin,
            cg,
            ns,
        }
    }

    fn with_nginx(mut self) -> World {
        self.nginx = Some(Nginx::start(&self.ns, &[HTTP]));
        self
    }

    fn layout(&self) -> PinLayout {
        PinLayout::new(self.pin.path())
    }

    fn cli(&self, args: &[&str]) -> Cli {
        cli(&self.pin, args, &[])
    }

    fn attach(&self, cg: &TestCgroup) {
        let r = self.cli(&["attach", "--cgroup", cg.path().to_str().unwrap()]);
        assert!(r.ok, "attach {}: {r:?}", cg.path().display());
    }

    fn proxy_forwarded(&self) -> u64 {
        proxy_stats(&self.ns, DEFAULT_ADMIN)["forwarded_total"]
            .as_u64()
            .expect("forwarded_total")
    }

    fn redirected(&self, cg: &TestCgroup) -> u64 {
        interceptor::stats(&self.layout())
            .expect("stats")
            .get(cg.id(), Counter::Redirected)
    }

    /// `count` new connections from `cg` over 2 threads; panics on any failure. Returns how
    /// many of them the scope's connect program redirected to the proxy (the delta of its
    /// `redirected` counter: nothing else connects from `cg` meanwhile), 0 when `cg` is not
    /// attached. (The probe's own `proxied` flag compares ports and is fooled, about once in
    /// a few thousand connections, when the proxy's upstream socket gets the client's port.)
    fn churn_ok(&self, cg: &TestCgroup, count: u32, what: &str) -> u64 {
        let red0 = self.redirected_if_attached(cg);
        let bin = interceptor_tests::probe_bin();
        let n = count.to_string();
        let out = run_in(
            &self.ns,
            Some(cg),
            &[
                bin.to_str().unwrap(),
                "churn",
                SERVER,
                "--count",
                &n,
                "--parallel",
                "2",
            ],
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{what}: churn output is not JSON ({e}): {out:?}");
        });
        assert_eq!(v["failed"], 0, "{what}: client errors: {v}");
        assert_eq!(v["ok"], u64::from(count), "{what}: {v}");
        self.redirected_if_attached(cg).saturating_sub(red0)
    }

    fn redirected_if_attached(&self, cg: &TestCgroup) -> u64 {
        if !self.pin.path().join("maps/ICP_COUNTERS").exists() {
            return 0;
        }
        interceptor::stats(&self.layout())
            .map(|s| s.get(cg.id(), Counter::Redirected))
            .unwrap_or(0)
    }
}

#[derive(Debug)]
struct Cli {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn cli(pin: &PinDir, args: &[&str], env: &[(&str, &str)]) -> Cli {
    let mut c = Command::new(interceptor_bin());
    c.arg("--pin-dir").arg(pin.path()).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = run_cmd(&mut c, Duration::from_secs(120)).expect("run interceptor");
    Cli {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every link pinned under the pin dir (relative path) -> (link id, program id, program
/// name), read with bpftool, independently of the interceptor's own code.
fn links(pin: &Path) -> BTreeMap<String, (u64, u64, String)> {
    let mut out = BTreeMap::new();
    for dir in ["root", "scopes"] {
        collect_links(pin, &pin.join(dir), &mut out);
    }
    out
}

fn collect_links(base: &Path, dir: &Path, out: &mut BTreeMap<String, (u64, u64, String)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_links(base, &p, out);
            continue;
        }
        let l: Value = serde_json::from_str(&run_cmd_ok(
            "bpftool",
            &["--json", "link", "show", "pinned", p.to_str().unwrap()],
        ))
        .unwrap();
        let prog = l["prog_id"].as_u64().unwrap_or_else(|| panic!("{l}"));
        let info: Value = serde_json::from_str(&run_cmd_ok(
            "bpftool",
            &["--json", "prog", "show", "id", &prog.to_string()],
        ))
        .unwrap();
        let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
        out.insert(
            rel,
            (
                l["id"].as_u64().unwrap(),
                prog,
                info["name"].as_str().unwrap_or_default().to_string(),
            ),
        );
    }
}

/// The program a link must run (the kernel keeps 15 characters of a name; bpftool may show
/// the full name from BTF).
fn expected_program(link: &str) -> &'static str {
    match link.rsplit('/').next().unwrap() {
        "connect4" => "redirect_connect4",
        "connect6" => "redirect_connect6",
        "getpeername4" => "restore_getpeername4",
        "getpeername6" => "restore_getpeername6",
        "sock_ops" => "track_sockops",
        "getsockopt" => "answer_getsockopt",
        "setsockopt" => "answer_setsockopt",
        "sk_lookup" => "steer_inbound",
        other => panic!("unexpected pin {other}"),
    }
}

/// Asserts the full set of links for `scopes` plus the root links, each on a live program
/// of the right name. Returns the map.
fn assert_complete(
    pin: &Path,
    scopes: &[&TestCgroup],
    what: &str,
) -> BTreeMap<String, (u64, u64, String)> {
    let l = links(pin);
    let mut want: Vec<String> = vec![
        "root/getsockopt".into(),
        "root/setsockopt".into(),
        "root/sock_ops".into(),
    ];
    for cg in scopes {
        for n in ["connect4", "connect6", "getpeername4", "getpeername6"] {
            want.push(format!("scopes/{}/{n}", cg.id()));
        }
    }
    want.sort();
    let have: Vec<String> = l.keys().cloned().collect();
    assert_eq!(have, want, "{what}: pinned links");
    for (k, (_, _, name)) in &l {
        let exp = expected_program(k);
        assert!(
            !name.is_empty() && exp.starts_with(name.as_str()),
            "{what}: {k} runs {name:?}, expected {exp}"
        );
    }
    // The cgroups carry exactly the linked programs, once each.
    for cg in scopes {
        let mut on_cg: Vec<u64> = bpftool_cgroup_progs(cg.path())
            .iter()
            .map(|p| p.id)
            .collect();
        on_cg.sort();
        let mut linked: Vec<u64> = l
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("scopes/{}/", cg.id())))
            .map(|(_, v)| v.1)
            .collect();
        linked.sort();
        assert_eq!(on_cg, linked, "{what}: programs on {}", cg.path().display());
    }
    l
}

fn prog_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Our programs left at the cgroup2 root (by id), for the end-of-test check.
fn root_progs(ids: &[u64]) -> Vec<u64> {
    bpftool_cgroup_progs(&cgroup2_root())
        .into_iter()
        .map(|p| p.id)
        .filter(|id| ids.contains(id))
        .collect()
}

#[test]
fn ten_upgrades_under_load_without_a_client_error() {
    let w = World::new("upg-load").with_nginx();
    w.attach(&w.cg);
    let first = assert_complete(w.pin.path(), &[&w.cg], "after attach");
    assert!(
        w.churn_ok(&w.cg, 20, "before") == 20,
        "proxied before the upgrades"
    );
    let fwd0 = w.proxy_forwarded();
    let red0 = w.redirected(&w.cg);
    let (drops0, overflows0) = listen_drops(&w.ns);

    // Each upgrade runs inside its own load segment: wrk with a new connection per request
    // (8 at a time) and a churn of new connections start, the upgrade runs 300 ms later,
    // then both are waited for and added up. Every request of wrk runs the connect
    // programs, before, while and after the links move to new programs (a kept-alive
    // connection would run them once, before). No segment has to outlast a fixed number of
    // upgrades.
    let segment = Duration::from_secs(2);
    let mut report = interceptor_tests::WrkReport::default();
    let mut churned = interceptor_tests::ChurnReport::default();
    let mut wrk_conns = 0;
    let mut all_ids: Vec<u64> = first.values().map(|v| v.1).collect();
    let mut before = first;
    for i in 1..=10 {
        let wrk = Wrk::start(
            &w.ns,
            Some(&w.cg),
            &format!("http://{HTTP}/"),
            8,
            segment,
            true,
        );
        let churn = Churn::start(&w.ns, Some(&w.cg), SERVER, 2, segment);
        std::thread::sleep(Duration::from_millis(300));
        let r = w.cli(&["upgrade", "--json"]);
        assert!(r.ok, "upgrade {i}: {r:?}");
        let report_json: Value = serde_json::from_str(&r.stdout).expect("upgrade --json");
        let after = assert_complete(w.pin.path(), &[&w.cg], &format!("upgrade {i}"));
        for (k, (link, prog, _)) in &after {
            let (old_link, old_prog, _) = &before[k];
            assert_eq!(link, old_link, "upgrade {i}: {k} is the same link");
            assert_ne!(prog, old_prog, "upgrade {i}: {k} runs a new program");
            let reported = report_json["links"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["pin"].as_str().unwrap().ends_with(k.as_str()))
                .unwrap_or_else(|| panic!("upgrade {i}: {k} not in the report {report_json}"));
            assert_eq!(reported["result"], "upgraded", "{reported}");
            assert_eq!(reported["old_program"], *old_prog, "{reported}");
            assert_eq!(reported["new_program"], *prog, "{reported}");
        }
        // The replaced programs are freed: nothing holds them any more.
        for (_, old_prog, _) in before.values() {
            assert!(
                wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
                    !prog_exists(*old_prog)
                }),
                "upgrade {i}: replaced program {old_prog} is still loaded"
            );
        }
        all_ids.extend(after.values().map(|v| v.1));
        before = after;
        let wr = wrk.finish();
        assert_eq!(wr.errors(), 0, "upgrade {i}: wrk saw errors: {wr:?}");
        report.requests += wr.requests;
        // One connection per request, each counted once it completed.
        wrk_conns += wr.requests;
        let cr = churn.finish();
        assert_eq!(cr.failed, 0, "upgrade {i}: churn saw errors: {cr:?}");
        churned.ok += cr.ok;
        churned.proxied += cr.proxied;
    }

    eprintln!(
        "10 upgrades under load: wrk {} requests, {} errors; churn {} connections ({} proxied), {} failed",
        report.requests,
        report.errors(),
        churned.ok,
        churned.proxied,
        churned.failed
    );
    assert!(report.requests > 0, "{}", report.output);
    assert_eq!(report.errors(), 0, "wrk saw errors: {report:?}");
    assert!(churned.ok > 0, "{churned:?}");
    assert_eq!(churned.failed, 0, "churn saw errors: {churned:?}");
    assert_eq!(
        churned.proxied, churned.ok,
        "every new connection was proxied: {churned:?}"
    );
    // Every connection of the cgroup (churn plus one per wrk request) was redirected, counted
    // in the same maps by old and new programs, and forwarded by the proxy.
    let red = w.redirected(&w.cg) - red0;
    let fwd = w.proxy_forwarded() - fwd0;
    eprintln!("redirected {red}, forwarded by the proxy {fwd}");
    assert!(
        red >= churned.ok + wrk_conns,
        "redirected {red} < {} + {wrk_conns}",
        churned.ok
    );
    assert!(
        fwd >= churned.ok + wrk_conns,
        "forwarded {fwd} < {} + {wrk_conns}",
        churned.ok
    );
    assert_eq!(
        w.churn_ok(&w.cg, 20, "after"),
        20,
        "still proxied after the upgrades"
    );
    let (drops, overflows) = listen_drops(&w.ns);
    eprintln!(
        "listen drops during the run: {} drops, {} overflows",
        drops - drops0,
        overflows - overflows0
    );
    // No connection was dropped at the proxy's listener while its programs were replaced.
    assert_eq!(
        (drops, overflows),
        (drops0, overflows0),
        "ListenDrops/ListenOverflows grew during the upgrades"
    );

    drop(w);
    assert!(
        root_progs(&all_ids).is_empty(),
        "programs left at the cgroup2 root"
    );
}

#[test]
fn incompatible_layout_is_refused_and_nothing_changes() {
    let w = World::new("upg-layout");
    w.attach(&w.cg);
    let before = assert_complete(w.pin.path(), &[&w.cg], "after attach");
    // The layout this interceptor stamps (and expects).
    let ours = interceptor::status(&w.layout())
        .unwrap()
        .layout_version
        .expect("a stamped layout") as u8;
    let stamp = w.pin.path().join("maps/ICP_LAYOUT");
    let set_layout = |v: u8| {
        run_cmd_ok(
            "bpftool",
            &[
                "map",
                "update",
                "pinned",
                stamp.to_str().unwrap(),
                "key",
                "0",
                "0",
                "0",
                "0",
                "value",
                &v.to_string(),
                "0",
                "0",
                "0",
            ],
        );
    };
    let other = TestCgroup::new("upg-layout-b");
    // What maps of an older and a newer release look like.
    for found in [ours - 1, ours + 1] {
        set_layout(found);
        let maps_dir = w.pin.path().join("maps");
        for args in [
            vec!["upgrade"],
            vec!["attach", "--cgroup", w.cg.path().to_str().unwrap()],
            vec!["attach", "--cgroup", other.path().to_str().unwrap()],
        ] {
            let r = w.cli(&args);
            assert!(!r.ok, "{args:?} with layout {found} must fail: {r:?}");
            for needle in [
                maps_dir.to_str().unwrap().to_string(),
                format!("layout version {found}"),
                format!("expect layout {ours}"),
                "nothing was changed".to_string(),
                "interceptor detach --all".to_string(),
            ] {
                assert!(
                    r.stderr.contains(&needle),
                    "{args:?}: message lacks {needle:?}: {}",
                    r.stderr
                );
            }
        }
        let now = assert_complete(w.pin.path(), &[&w.cg], "after the refusals");
        assert_eq!(now, before, "layout {found}: the links kept their programs");
        assert!(
            bpftool_cgroup_progs(other.path()).is_empty(),
            "nothing attached to the other cgroup"
        );
        assert_eq!(
            w.churn_ok(&w.cg, 50, "after the refusal"),
            50,
            "still proxied"
        );
    }
    // Back to this release's layout, an upgrade goes through.
    set_layout(ours);
    let r = w.cli(&["upgrade"]);
    assert!(r.ok, "{r:?}");
    assert!(r.stdout.contains("7 of 7 link(s)"), "{}", r.stdout);
    assert_eq!(w.churn_ok(&w.cg, 50, "after the upgrade"), 50);
}

/// Runs `interceptor ARGS` and SIGKILLs it after `delay`. Returns whether it had already
/// exited by itself.
fn kill_after(pin: &PinDir, args: &[&str], delay: Duration, pause_ms: Option<u64>) -> bool {
    let mut c = Command::new(interceptor_bin());
    c.arg("--pin-dir").arg(pin.path()).args(args);
    if let Some(ms) = pause_ms {
        c.env("INTERCEPTOR_TEST_PAUSE_MS", ms.to_string());
    }
    let mut p = Proc::spawn("interceptor", c);
    std::thread::sleep(delay);
    let done = p.try_status().is_some();
    p.kill();
    done
}

/// Kill points: without the test pause, every 4 ms over the command's natural run (about
/// twice a measured run); with a 15 ms pause after each step, every 9 ms over the paused
/// run, so that the kills fall between any two steps.
fn kill_points(natural: Duration, steps: u32) -> Vec<(Duration, Option<u64>)> {
    let mut out = Vec::new();
    let natural_ms = (natural.as_millis() as u64 * 2).clamp(20, 300);
    for ms in (0..natural_ms).step_by(4) {
        out.push((Duration::from_millis(ms), None));
    }
    let paused_ms = (natural.as_millis() as u64 + u64::from(steps) * 15).min(600);
    for ms in (0..paused_ms).step_by(9) {
        out.push((Duration::from_millis(ms), Some(15)));
    }
    out
}

/// How long each background churn runs: it starts just before the loader and overlaps the
/// kill and the checks after it.
const BACKGROUND: Duration = Duration::from_millis(400);

/// The background churns of a kill loop, added up.
#[derive(Default)]
struct Background(interceptor_tests::ChurnReport);

impl Background {
    fn add(&mut self, c: Churn, what: &str) {
        let r = c.finish();
        assert_eq!(r.failed, 0, "{what}: background client errors: {r:?}");
        self.0.ok += r.ok;
        self.0.failed += r.failed;
        self.0.proxied += r.proxied;
    }
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = std::time::Instant::now();
    f();
    t.elapsed()
}

#[test]
fn loader_killed_mid_upgrade_leaves_traffic_working_and_a_rerun_completes() {
    let w = World::new("upg-kill");
    // Scope A gets the checks after each kill, scope C a background churn all along.
    let c_cg = TestCgroup::new("upg-kill-c");
    w.attach(&w.cg);
    w.attach(&c_cg);
    let scopes = [&w.cg, &c_cg];
    assert_complete(w.pin.path(), &scopes, "after attach");
    let natural = timed(|| assert!(w.cli(&["upgrade"]).ok));
    let points = kill_points(natural, 10);
    let c_red0 = w.redirected(&c_cg);
    let mut bg = Background::default();
    let (mut partial, mut untouched, mut complete, mut exited) = (0, 0, 0, 0);
    for (i, (delay, pause)) in points.iter().enumerate() {
        let what = format!("kill {i} after {delay:?} (pause {pause:?})");
        let before = links(w.pin.path());
        let churn = Churn::start(&w.ns, Some(&c_cg), SERVER, 2, BACKGROUND);
        if kill_after(&w.pin, &["upgrade"], *delay, *pause) {
            exited += 1;
        }
        let after = assert_complete(w.pin.path(), &scopes, &what);
        let changed = after.iter().filter(|(k, v)| before[*k].1 != v.1).count();
        match changed {
            0 => untouched += 1,
            n if n == after.len() => complete += 1,
            _ => partial += 1,
        }
        assert_eq!(w.churn_ok(&w.cg, 30, &what), 30, "{what}: still proxied");
        let r = w.cli(&["upgrade"]);
        assert!(r.ok, "{what}: rerun: {r:?}");
        let fixed = assert_complete(w.pin.path(), &scopes, &format!("{what}, rerun"));
        for (k, v) in &fixed {
            assert_ne!(v.1, after[k].1, "{what}: the rerun upgraded {k}");
        }
        bg.add(churn, &what);
    }
    let c = bg.0;
    let c_red = w.redirected(&c_cg) - c_red0;
    eprintln!(
        "upgrade killed {} times ({} before any swap, {} between swaps, {} after all swaps, {} had exited): background churn {} connections ({} redirected), {} failed",
        points.len(),
        untouched,
        partial,
        complete,
        exited,
        c.ok,
        c_red,
        c.failed
    );
    assert!(partial > 0, "no kill fell between two link swaps");
    assert_eq!(c.failed, 0, "client errors during the kills: {c:?}");
    assert_eq!(
        c_red, c.ok,
        "every background connection was redirected: {c:?}"
    );
}

#[test]
fn loader_killed_mid_attach_leaves_traffic_working_and_a_rerun_completes() {
    let w = World::new("att-kill");
    let cg = w.cg.path().to_str().unwrap().to_string();

    // 1. The first attach of a pin dir (maps, stamp, settings, root links, scope links),
    //    killed at stepped points; each time a rerun completes it, then it is detached.
    let natural = timed(|| w.attach(&w.cg));
    assert!(w.cli(&["detach", "--all"]).ok);
    let points = kill_points(natural, 8);
    let mut states: BTreeMap<usize, u32> = BTreeMap::new();
    for (i, (delay, pause)) in points.iter().enumerate() {
        let what = format!("first attach, kill {i} after {delay:?} (pause {pause:?})");
        kill_after(&w.pin, &["attach", "--cgroup", &cg], *delay, *pause);
        *states.entry(links(w.pin.path()).len()).or_default() += 1;
        // Each connection goes through the proxy or direct; none fails.
        w.churn_ok(&w.cg, 30, &what);
        let r = w.cli(&["attach", "--cgroup", &cg]);
        assert!(r.ok, "{what}: rerun: {r:?}");
        assert_complete(w.pin.path(), &[&w.cg], &format!("{what}, rerun"));
        assert_eq!(
            w.churn_ok(&w.cg, 30, &what),
            30,
            "{what}: proxied after the rerun"
        );
        let st = interceptor::status(&w.layout()).unwrap();
        assert!(st.layout_version.is_some_and(|v| v > 0), "{what}: stamped");
        assert_eq!(st.scopes.len(), 1, "{what}");
        assert!(w.cli(&["detach", "--all"]).ok, "{what}: detach");
        assert!(!w.pin.path().exists(), "{what}: detach removed the pin dir");
    }
    eprintln!(
        "first attach killed {} times; links found after the kill -> times: {states:?}",
        points.len()
    );
    assert!(
        states.keys().any(|n| *n > 0 && *n < 6),
        "no kill fell between two links: {states:?}"
    );

    // 2. Under load on an attached scope: a second scope's attach killed, and a re-attach
    //    of the loaded scope (which swaps its programs) killed.
    w.attach(&w.cg);
    let b = TestCgroup::new("att-kill-b");
    let c_cg = TestCgroup::new("att-kill-c");
    w.attach(&c_cg);
    let c_red0 = w.redirected(&c_cg);
    let b_path = b.path().to_str().unwrap().to_string();
    let mut bg = Background::default();
    for (i, (delay, pause)) in points.iter().enumerate() {
        let what = format!("second scope, kill {i} after {delay:?} (pause {pause:?})");
        let churn = Churn::start(&w.ns, Some(&c_cg), SERVER, 2, BACKGROUND);
        kill_after(&w.pin, &["attach", "--cgroup", &b_path], *delay, *pause);
        w.churn_ok(&b, 20, &what);
        assert_eq!(w.churn_ok(&w.cg, 20, &what), 20, "{what}: A still proxied");
        let r = w.cli(&["attach", "--cgroup", &b_path]);
        assert!(r.ok, "{what}: rerun: {r:?}");
        assert_complete(w.pin.path(), &[&w.cg, &b, &c_cg], &format!("{what}, rerun"));
        assert_eq!(
            w.churn_ok(&b, 20, &what),
            20,
            "{what}: B proxied after the rerun"
        );
        let r = w.cli(&["detach", "--cgroup", &b_path]);
        assert!(r.ok, "{what}: detach B: {r:?}");

        bg.add(churn, &what);

        let what = format!("re-attach, kill {i} after {delay:?} (pause {pause:?})");
        let churn = Churn::start(&w.ns, Some(&c_cg), SERVER, 2, BACKGROUND);
        kill_after(&w.pin, &["attach", "--cgroup", &cg], *delay, *pause);
        assert_complete(w.pin.path(), &[&w.cg, &c_cg], &what);
        assert_eq!(w.churn_ok(&w.cg, 20, &what), 20, "{what}: still proxied");
        bg.add(churn, &what);
    }
    let r = w.cli(&["attach", "--cgroup", &cg]);
    assert!(r.ok, "{r:?}");
    let c = bg.0;
    let c_red = w.redirected(&c_cg) - c_red0;
    eprintln!(
        "attach killed {} times under load: background churn {} connections ({} redirected), {} failed",
        points.len() * 2,
        c.ok,
        c_red,
        c.failed
    );
    assert_eq!(c.failed, 0, "client errors during the kills: {c:?}");
    assert_eq!(
        c_red, c.ok,
        "every background connection was redirected: {c:?}"
    );
    drop(b);
}

#[test]
fn upgrade_reports_a_removed_cgroup_and_an_empty_pin_dir() {
    let w = World::new("upg-gone");
    let r = w.cli(&["upgrade"]);
    assert!(r.ok, "{r:?}");
    assert!(r.stdout.contains("nothing to upgrade"), "{}", r.stdout);
    w.attach(&w.cg);
    // A cgroup of its own (scopes cannot be nested, so not one inside the attached one).
    let holder = TestCgroup::new("upg-gone-holder");
    let gone = holder.child("gone");
    let r = w.cli(&["attach", "--cgroup", gone.to_str().unwrap()]);
    assert!(r.ok, "{r:?}");
    std::fs::remove_dir(&gone).unwrap();
    // The kernel detaches the removed cgroup's links asynchronously.
    let mut last = None;
    let reported = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let r = w.cli(&["upgrade", "--json"]);
        let v: Value = serde_json::from_str(&r.stdout).unwrap_or(Value::Null);
        let gone_links = v["links"]
            .as_array()
            .map(|a| a.iter().filter(|l| l["result"] == "target_gone").count())
            .unwrap_or(0);
        let ok = r.ok && gone_links == 4;
        last = Some((r, v));
        ok
    });
    assert!(
        reported,
        "the removed cgroup's 4 links are reported: {last:?}"
    );
    let (_, v) = last.unwrap();
    let upgraded = v["links"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["result"] == "upgraded")
        .count();
    // 3 root links and the live scope's 4.
    assert_eq!(upgraded, 7, "the live links were upgraded: {v}");
    assert_eq!(w.churn_ok(&w.cg, 20, "after"), 20);
    let r = w.cli(&["detach", "--cgroup", gone.to_str().unwrap()]);
    assert!(r.ok, "{r:?}");
    let r = w.cli(&["upgrade"]);
    assert!(r.ok && r.stdout.contains("7 of 7 link(s)"), "{r:?}");
}
