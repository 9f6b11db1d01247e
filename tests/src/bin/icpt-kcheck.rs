//! `icpt-kcheck`: the data-path suite that `cargo xtask test-kernels` runs inside each QEMU
//! guest (as root, in a throwaway VM whose `/init` mounted proc, sys, devtmpfs, /run, /tmp,
//! bpffs and cgroup2). It drives the release binaries through their command lines
//! (`interceptor attach/register/status/stats/upgrade/detach`, `interceptor-proxy`, HAProxy,
//! `icpt-probe`, `icpt-exec`) in two network namespaces joined by a veth pair, and reports one
//! line per check on `--report` (the guest's second serial port), which the xtask parses:
//!
//! ```text
//! KC plan boot attach out-v4 ...          the checks, in order, before any runs
//! KC info release 6.1.0-57-cloud-amd64    facts about the guest
//! KC check attach pass 2.31               a check passed (seconds it took)
//! KC check haproxy fail 0.40 MESSAGE      failed, with a one-line message
//! KC check out-v6 skip 0.00 needs attach  not run, because a check it needs failed
//! KC insns connect4 redirect_connec 812   verified instructions of the program on a link
//! KC end 11 1 0                           passed, failed, skipped
//! ```
//!
//! A kernel below the minimum (the xtask boots it with `icpt.below_minimum` on the kernel
//! command line: Debian 11's 5.10) runs another plan, [`BELOW_MINIMUM`]: `interceptor check`
//! must name what it lacks, and `attach` must refuse naming it and the minimum kernel,
//! leaving nothing attached and traffic direct.
//!
//! Every connection goes to 127.0.0.0/8, ::1 or an address of the veth pair inside the guest's
//! own namespaces. The program exits 0 when every check passed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Parser;
use interceptor_tests::{
    http_get_in, interceptor_bin, probe_in, proxy_stats, run_cmd, run_cmd_ok, spawn_in,
    start_proxy, wait_until, NetNs, PinDir, ProbeServer, Proc, TestCgroup,
};
use serde_json::Value;

const APP4: &str = "10.77.0.1";
const PEER4: &str = "10.77.0.2";
const APP6: &str = "fd77::1";
const PEER6: &str = "fd77::2";
const ADMIN: &str = "127.0.0.1:15000";
/// HAProxy's outbound listener (the second cgroup is attached with `--proxy-port 15002 --proxy-listener any`).
const HAPROXY_PORT: u16 = 15002;
/// Bytes each way of the byte-exact transfers.
const BULK: &str = "1048576";
/// Bytes each way of the `kfwd` check's transfer.
const KFWD_BULK: &str = "8388608";

#[derive(Parser)]
#[command(about = "Data-path checks run inside a kernel-matrix guest (cargo xtask test-kernels)")]
struct Cli {
    /// Where the `KC ...` report lines go (the guest's /dev/ttyS1); default stdout.
    #[arg(long)]
    report: Option<PathBuf>,
    /// HAProxy binary; the check is reported as failed when it is missing.
    #[arg(long, default_value = "/usr/sbin/haproxy")]
    haproxy: PathBuf,
}

type Outcome = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// One check: a name (a column of the xtask's table), the checks it needs, and its body.
struct Check {
    name: &'static str,
    needs: &'static [&'static str],
    run: fn(&mut Suite) -> Outcome,
}

const CHECKS: &[Check] = &[
    Check {
        name: "boot",
        needs: &[],
        run: boot,
    },
    Check {
        name: "features",
        needs: &["boot"],
        run: features,
    },
    Check {
        name: "attach",
        needs: &["boot"],
        run: attach,
    },
    Check {
        name: "out-v4",
        needs: &["attach"],
        run: |s| outbound(s, PEER4),
    },
    Check {
        name: "out-v6",
        needs: &["attach"],
        run: |s| outbound(s, PEER6),
    },
    Check {
        name: "kfwd",
        needs: &["out-v4"],
        run: kernel_forward,
    },
    Check {
        name: "haproxy",
        needs: &["attach"],
        run: haproxy,
    },
    Check {
        name: "in-v4",
        needs: &["attach"],
        run: |s| inbound(s, APP4, "127.0.0.6"),
    },
    Check {
        name: "in-v6",
        needs: &["attach"],
        run: |s| inbound(s, APP6, "::1"),
    },
    Check {
        name: "upgrade",
        needs: &["attach"],
        run: upgrade,
    },
    Check {
        name: "status-stats",
        needs: &["attach"],
        run: status_stats,
    },
    Check {
        name: "fail-closed",
        needs: &["attach"],
        run: fail_closed,
    },
    Check {
        name: "detach",
        needs: &["attach"],
        run: detach,
    },
    Check {
        name: "no-conntrack",
        needs: &["boot"],
        run: no_conntrack,
    },
];

/// The plan on a kernel below the minimum: the probe names what is missing, `attach` refuses.
const BELOW_MINIMUM: &[Check] = &[
    Check {
        name: "boot",
        needs: &[],
        run: boot,
    },
    Check {
        name: "features",
        needs: &["boot"],
        run: features_below_minimum,
    },
    Check {
        name: "refusal",
        needs: &["boot"],
        run: refusal,
    },
    Check {
        name: "no-conntrack",
        needs: &["boot"],
        run: no_conntrack,
    },
];

/// Whether the xtask booted this guest as a kernel below the minimum.
fn below_minimum() -> bool {
    fs::read_to_string("/proc/cmdline")
        .is_ok_and(|c| c.split_whitespace().any(|w| w == "icpt.below_minimum"))
}

/// The guest's world: two namespaces joined by a veth pair, the workload's cgroups, a pin dir,
/// the servers and the proxies. Fields drop in declaration order: processes first, then the
/// programs (pin dir), the cgroups, the namespaces.
struct World {
    proxy: Option<Proc>,
    haproxy: Option<Proc>,
    /// Held so that the servers run until the world is dropped.
    _servers: Vec<ProbeServer>,
    pin: PinDir,
    /// The cgroup whose connections HAProxy takes (attached with `--proxy-port 15002 --proxy-listener any`).
    cg_ha: TestCgroup,
    /// The workload's cgroup (attached with the defaults: `interceptor-proxy` on 15001).
    cg: TestCgroup,
    peer: NetNs,
    app: NetNs,
}

/// What the suite did so far, to compare with the kernel's and the proxy's counters exactly.
#[derive(Default)]
struct Expected {
    /// Connections from `cg` the programs redirected to `interceptor-proxy`.
    redirected: u64,
    /// Connections from `cg_ha` redirected to HAProxy.
    redirected_ha: u64,
    /// Connections from the peer steered into the proxy's inbound listener.
    inbound: u64,
    /// Connects from `cg` refused because no proxy listened (outbound fail-closed).
    refused: u64,
    /// SYNs to the workload refused because no listener was registered (inbound fail-closed).
    inbound_refused: u64,
}

struct Suite {
    world: Option<World>,
    expected: Expected,
    haproxy_bin: PathBuf,
    /// Link name -> (program name, verified instructions), from the first attach.
    insns: BTreeMap<String, (String, Option<u32>)>,
    /// The features `interceptor check` found missing (required or optional).
    missing: Vec<String>,
    /// When nf_conntrack was first seen loaded: after which check.
    conntrack_seen_after: Option<String>,
    conntrack_at_start: Option<String>,
    /// What the `kfwd` check saw of kernel forwarding (`KC info kfwd ...`).
    kfwd: Option<String>,
}

impl Suite {
    fn w(&mut self) -> &mut World {
        self.world
            .as_mut()
            .expect("the boot check builds the world")
    }
}

fn main() {
    let cli = Cli::parse();
    let mut out: Box<dyn std::io::Write> = match &cli.report {
        Some(p) => Box::new(
            fs::OpenOptions::new()
                .write(true)
                .open(p)
                .unwrap_or_else(|e| panic!("open report {}: {e}", p.display())),
        ),
        None => Box::new(std::io::stdout()),
    };
    let mut say = |line: String| {
        // The report is the suite's only result: a write error ends the run visibly.
        writeln!(out, "{line}")
            .and_then(|_| out.flush())
            .unwrap_or_else(|e| panic!("cannot write the report: {e}"));
        eprintln!("kcheck: {line}");
    };
    let checks = if below_minimum() {
        BELOW_MINIMUM
    } else {
        CHECKS
    };
    say(format!(
        "KC plan {}",
        checks.iter().map(|c| c.name).collect::<Vec<_>>().join(" ")
    ));
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    say(format!("KC info release {}", release.trim()));

    let mut suite = Suite {
        world: None,
        expected: Expected::default(),
        haproxy_bin: cli.haproxy.clone(),
        insns: BTreeMap::new(),
        missing: Vec::new(),
        conntrack_seen_after: None,
        conntrack_at_start: conntrack_loaded(),
        kfwd: None,
    };
    let mut results: BTreeMap<&str, bool> = BTreeMap::new();
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for check in checks {
        if let Some(missing) = check.needs.iter().find(|n| results.get(*n) != Some(&true)) {
            say(format!("KC check {} skip 0.00 needs {missing}", check.name));
            skipped += 1;
            results.insert(check.name, false);
            continue;
        }
        if check.name == "no-conntrack" {
            // Everything else is over: stop the processes, detach whatever a failed check left,
            // remove the namespaces and cgroups, so that the last look at the modules comes
            // after the whole run.
            drop(suite.world.take());
            note_conntrack(&mut suite, "cleanup");
        }
        let start = Instant::now();
        let res = catch_unwind(AssertUnwindSafe(|| (check.run)(&mut suite)))
            .unwrap_or_else(|p| Err(panic_message(p)));
        let secs = start.elapsed().as_secs_f64();
        note_conntrack(&mut suite, check.name);
        match &res {
            Ok(()) => {
                passed += 1;
                say(format!("KC check {} pass {secs:.2}", check.name));
            }
            Err(msg) => {
                failed += 1;
                eprintln!("kcheck: {} failed:\n{msg}", check.name);
                say(format!(
                    "KC check {} fail {secs:.2} {}",
                    check.name,
                    one_line(msg)
                ));
            }
        }
        results.insert(check.name, res.is_ok());
        if check.name == "features" && !suite.missing.is_empty() {
            say(format!("KC info missing {}", suite.missing.join(", ")));
        }
        if let Some(k) = suite.kfwd.take() {
            say(format!("KC info kfwd {k}"));
        }
        if check.name == "attach" {
            for (link, (prog, n)) in &suite.insns {
                let n = n.map_or("-".to_string(), |n| n.to_string());
                say(format!("KC insns {link} {prog} {n}"));
            }
        }
    }
    say(format!("KC end {passed} {failed} {skipped}"));
    std::process::exit(i32::from(failed > 0 || skipped > 0));
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "panicked".to_string()
    }
}

/// The message on one line (` | ` between lines). A long one keeps its head and its tail,
/// where a verifier log says what it rejected; the console has it in full.
fn one_line(s: &str) -> String {
    let out: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let out = out.join(" | ");
    const HEAD: usize = 400;
    const TAIL: usize = 1600;
    if out.len() <= HEAD + TAIL {
        return out;
    }
    let mut h = HEAD;
    while !out.is_char_boundary(h) {
        h -= 1;
    }
    let mut t = out.len() - TAIL;
    while !out.is_char_boundary(t) {
        t += 1;
    }
    format!("{} ... {}", &out[..h], &out[t..])
}

// ---------------------------------------------------------------------------------------------
// Running the CLIs

/// `interceptor --pin-dir PIN ARGS...`, bounded by 120 s; stdout, or an error with stderr.
fn icpt(pin: &Path, args: &[&str]) -> Result<String, String> {
    let bin = interceptor_bin();
    let out = run_cmd(
        Command::new(&bin).arg("--pin-dir").arg(pin).args(args),
        Duration::from_secs(120),
    )
    .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`interceptor {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn icpt_json(pin: &Path, args: &[&str]) -> Result<Value, String> {
    let text = icpt(pin, args)?;
    serde_json::from_str(&text).map_err(|e| {
        format!(
            "`interceptor {}` printed no JSON ({e}): {text}",
            args.join(" ")
        )
    })
}

/// `icpt-probe ARGS` in the workload's namespace and `cgroup`.
fn from_cgroup(w: &World, cgroup: &TestCgroup, args: &[&str]) -> Value {
    probe_in(&w.app, Some(cgroup.path()), None, args)
}

/// `icpt-probe ARGS` in the peer namespace.
fn from_peer(w: &World, args: &[&str]) -> Value {
    probe_in(&w.peer, None, None, args)
}

/// Kernel forwarding (`interceptor-proxy --kernel-forward on`): the proxy started before the
/// programs were attached, so its probe at start found it off; it must have turned it on at
/// the outbound checks' accepts (`kforward::catch_up`). A transfer each way through it is
/// byte-exact; what the kernel carried of it is reported (`KC info kfwd`), not required (the
/// proxy hands a direction to the kernel only from its second drain, which a guest as slow
/// as TCG may not give a transfer).
fn kernel_forward(s: &mut Suite) -> Outcome {
    let target = addr(PEER4, 8080);
    let runtime = |w: &World| -> Result<Value, String> {
        let admin: SocketAddr = ADMIN.parse().expect("address");
        let (code, body) = http_get_in(&w.app, admin, "/runtime", Duration::from_secs(10))
            .map_err(|e| format!("GET /runtime: {e}"))?;
        ensure!(code == 200, "GET /runtime answered {code}: {body}");
        serde_json::from_str(&body).map_err(|e| format!("/runtime is not JSON ({e}): {body}"))
    };
    let w = s.w();
    let before = runtime(w)?;
    ensure!(
        before["kernel_forward"] == Value::Bool(true),
        "kernel forwarding is off in the proxy after the outbound checks (it started before the \
         programs and should have turned it on at an accept): {before}"
    );
    let v = from_cgroup(
        w,
        &w.cg,
        &[
            "bulk", &target, "--send", KFWD_BULK, "--recv", KFWD_BULK, "--seed", "11",
        ],
    );
    s.expected.redirected += 1;
    let w = s.w();
    bulk_ok("bulk (kernel forwarding)", v)?;
    // The proxy counts the kernel's bytes when the connection ends there.
    let _ = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        proxy_counter(w, "connections_active").is_ok_and(|n| n == 0)
    });
    let after = runtime(w)?;
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    s.kfwd = Some(format!(
        "on bytes={} connections={} fallbacks={} uncut={} of 2x{KFWD_BULK}",
        n(&after, "kernel_forward_bytes") - n(&before, "kernel_forward_bytes"),
        n(&after, "kernel_forward_connections") - n(&before, "kernel_forward_connections"),
        n(&after, "kernel_forward_fallbacks"),
        n(&after, "kernel_forward_uncut_bytes"),
    ));
    ensure!(
        n(&after, "kernel_forward_uncut_bytes") == 0,
        "the kernel handed repeated bytes on: {after}"
    );
    Ok(())
}

fn addr(ip: &str, port: u16) -> String {
    SocketAddr::new(ip.parse().expect("IP literal"), port).to_string()
}

fn sock(v: &Value, field: &str) -> Result<SocketAddr, String> {
    v[field]
        .as_str()
        .and_then(|s| s.parse().ok())
        .map(interceptor_tests::probe::normalize)
        .ok_or_else(|| format!("probe reply has no {field}: {v}"))
}

/// A probe reply that is not an error.
fn ok_reply(what: &str, v: Value) -> Result<Value, String> {
    match v.get("error") {
        Some(e) => Err(format!("{what}: {e} (kind {})", v["kind"])),
        None => Ok(v),
    }
}

/// A byte-exact transfer of BULK bytes each way to `target`.
fn bulk_ok(what: &str, v: Value) -> Outcome {
    let v = ok_reply(what, v)?;
    ensure!(
        v["ok"] == Value::Bool(true),
        "{what}: transfer not byte-exact: {v}"
    );
    Ok(())
}

/// The kernel's decision counters of one scope, by kind and path (`stats --json`).
fn scope_counters(stats: &Value, path: &str) -> Result<BTreeMap<String, u64>, String> {
    let scope = stats["scopes"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["path"] == path))
        .ok_or_else(|| format!("`stats --json` has no scope {path}: {stats}"))?;
    Ok(scope["counters"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default())
}

fn counter(c: &BTreeMap<String, u64>, name: &str) -> u64 {
    c.get(name).copied().unwrap_or(0)
}

fn proxy_counter(w: &World, name: &str) -> Result<u64, String> {
    proxy_stats(&w.app, ADMIN)[name]
        .as_u64()
        .ok_or_else(|| format!("the proxy's /stats has no counter {name}"))
}

/// Every pinned link of `status --json`: (link name, pin path, program id, program name).
fn links(status: &Value) -> Vec<(String, String, Option<u64>, String)> {
    let mut all: Vec<&Value> = Vec::new();
    if let Some(a) = status["root_links"].as_array() {
        all.extend(a);
    }
    for group in ["scopes", "inbound"] {
        for s in status[group].as_array().into_iter().flatten() {
            all.extend(s["links"].as_array().into_iter().flatten());
        }
    }
    all.into_iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap_or("?").to_string(),
                l["pin"].as_str().unwrap_or("?").to_string(),
                l["program_id"].as_u64(),
                l["program_name"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// nf_conntrack

/// The evidence that conntrack is in the kernel, if any: its module in /proc/modules, or its
/// /proc files (these exist when it is built in, too).
fn conntrack_loaded() -> Option<String> {
    let modules = fs::read_to_string("/proc/modules").unwrap_or_default();
    if let Some(l) = modules.lines().find(|l| l.starts_with("nf_conntrack ")) {
        return Some(format!("/proc/modules: {l}"));
    }
    for f in [
        "/proc/net/nf_conntrack",
        "/proc/sys/net/netfilter/nf_conntrack_count",
    ] {
        if Path::new(f).exists() {
            return Some(format!("{f} exists"));
        }
    }
    None
}

fn note_conntrack(s: &mut Suite, after: &str) {
    if s.conntrack_seen_after.is_none() && conntrack_loaded().is_some() {
        s.conntrack_seen_after = Some(after.to_string());
    }
}

// ---------------------------------------------------------------------------------------------
// The checks

/// The guest is fit to run the rest: cgroup2 and bpffs mounted, veth loaded (modprobe from the
/// kernel package's modules), two namespaces joined by a veth pair, the servers listening.
fn boot(s: &mut Suite) -> Outcome {
    let mi = fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    ensure!(
        mi.lines().any(|l| l.contains(" - cgroup2 ")),
        "no cgroup2 mount in the guest:\n{mi}"
    );
    ensure!(
        interceptor_tests::bpffs_mounted(),
        "bpffs is not mounted at /sys/fs/bpf in the guest:\n{mi}"
    );
    let out = run_cmd(
        Command::new("modprobe").arg("veth"),
        Duration::from_secs(60),
    )
    .map_err(|e| format!("cannot run modprobe: {e}"))?;
    ensure!(
        out.status.success() && Path::new("/sys/module/veth").exists(),
        "modprobe veth failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let app = NetNs::new("kc-app");
    let peer = NetNs::new("kc-peer");
    app.link_to(
        "kcapp0",
        &[&format!("{APP4}/24"), &format!("{APP6}/64")],
        &peer,
        "kcpeer0",
        &[&format!("{PEER4}/24"), &format!("{PEER6}/64")],
    );
    let cg = TestCgroup::new("kc-work");
    let cg_ha = TestCgroup::new("kc-haproxy");
    let pin = PinDir::new("kc");
    let any = |ip: &str| addr(ip, 8080).parse::<SocketAddr>().expect("address");
    // The outbound destination lives in the peer namespace, the inbound one (the workload's
    // server) in the workload's namespace, both on port 8080.
    let servers = vec![
        ProbeServer::start_in(peer.path(), &[any(PEER4), any(PEER6)])
            .map_err(|e| format!("peer server: {e}"))?,
        ProbeServer::start_in(app.path(), &[any("0.0.0.0"), any("::")])
            .map_err(|e| format!("workload server: {e}"))?,
    ];
    s.world = Some(World {
        proxy: None,
        haproxy: None,
        _servers: servers,
        pin,
        cg_ha,
        cg,
        peer,
        app,
    });
    Ok(())
}

/// The programs load and verify on this kernel: the proxy starts, `attach --cgroup`,
/// `attach --netns` and `register` succeed and `status --json` shows every link with its
/// program; records each program's verified instruction count.
fn attach(s: &mut Suite) -> Outcome {
    let w = s.w();
    let proxy = start_proxy(
        &w.app,
        &[
            "--admin",
            ADMIN,
            "--inbound",
            "0.0.0.0:15006",
            "--inbound",
            "[::]:15006",
            "--kernel-forward",
            "on",
        ],
    );
    let pid = proxy.pid().to_string();
    w.proxy = Some(proxy);
    let pin = w.pin.path().to_path_buf();
    let cg = w.cg.path().to_str().expect("UTF-8").to_string();
    let ns = w.app.path_str().to_string();
    icpt(&pin, &["attach", "--cgroup", &cg])?;
    icpt(&pin, &["attach", "--netns", &ns])?;
    icpt(&pin, &["register", "--netns", &ns, "--pid", &pid])?;
    let status = icpt_json(&pin, &["status", "--json"])?;
    let links = links(&status);
    let names: BTreeSet<&str> = links.iter().map(|l| l.0.as_str()).collect();
    for want in [
        "sock_ops",
        "getsockopt",
        "connect4",
        "connect6",
        "getpeername4",
        "getpeername6",
        "sk_lookup",
    ] {
        ensure!(
            names.contains(want),
            "`status --json` shows no {want} link: {status}"
        );
    }
    for (name, pin, id, _) in &links {
        ensure!(id.is_some(), "link {name} ({pin}) has no live program");
    }
    let registered = &status["inbound"][0]["registered"];
    ensure!(
        registered.as_array().map(Vec::len) == Some(2),
        "the proxy's inbound listeners are not registered for both families: {registered}"
    );
    let verified: BTreeMap<u32, Option<u32>> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| (p.id(), p.verified_instruction_count()))
        .collect();
    for (name, _, id, prog) in links {
        let id = id.expect("checked above") as u32;
        s.insns
            .entry(name)
            .or_insert((prog, verified.get(&id).copied().flatten()));
    }
    // Kernel forwarding's verdict is attached to its map, not by a link, and its load failing
    // is only a warning to the loader (the proxy then copies): on a supported kernel it must
    // have loaded.
    let verdict = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some("forward_verdict"))
        .map(|p| p.verified_instruction_count())
        .last();
    let Some(insns) = verdict else {
        return Err("the kernel-forwarding verdict (forward_verdict) did not load".into());
    };
    s.insns
        .entry("sk_skb_verdict".to_string())
        .or_insert(("forward_verdict".to_string(), insns));
    Ok(())
}

/// `interceptor check --json`, started with RLIMIT_MEMLOCK at the kernel's 64 KiB default
/// (which kernels before 5.11 charge bpf memory to): (exit status success, the JSON report,
/// stderr).
fn check_report(pin: &Path) -> Result<(bool, Value, String), String> {
    let bin = interceptor_bin();
    let out = run_cmd(
        Command::new("sh")
            .args(["-c", "ulimit -l 64 && exec \"$0\" \"$@\""])
            .arg(&bin)
            .arg("--pin-dir")
            .arg(pin)
            .args(["check", "--json"]),
        Duration::from_secs(60),
    )
    .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let json: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "`interceptor check --json` printed no JSON ({e}): {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let features = json["features"].as_array().map_or(0, Vec::len);
    ensure!(
        features >= 30,
        "`interceptor check` probed {features} features: {json}"
    );
    Ok((
        out.status.success(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// (label, required, how the probe answered) of each feature the report shows missing.
fn missing_features(json: &Value) -> Vec<(String, bool, String)> {
    json["features"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["present"] == Value::Bool(false))
        .map(|f| {
            (
                format!(
                    "{} {}",
                    f["kind"].as_str().unwrap_or("?"),
                    f["name"].as_str().unwrap_or("?")
                ),
                f["required"] == Value::Bool(true),
                f["detail"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// `label [detail]` per missing feature, `(optional)` marked, for the `KC info missing` line.
fn describe_missing(missing: &[(String, bool, String)]) -> Vec<String> {
    missing
        .iter()
        .map(|(l, r, d)| format!("{l}{} [{d}]", if *r { "" } else { " (optional)" }))
        .collect()
}

/// `interceptor check` on a supported kernel: exit 0, every required hook, helper, map type
/// and link kind present (the optional ones it lacks are reported as info).
fn features(s: &mut Suite) -> Outcome {
    let pin = s.w().pin.path().to_path_buf();
    let (ok, json, stderr) = check_report(&pin)?;
    let missing = missing_features(&json);
    s.missing = describe_missing(&missing);
    let required: Vec<&String> = missing.iter().filter(|m| m.1).map(|m| &m.0).collect();
    ensure!(
        missing.iter().all(|m| !m.2.contains("os error")),
        "a probe failed for another reason than the feature: {:?}",
        describe_missing(&missing)
    );
    ensure!(
        ok && required.is_empty(),
        "`interceptor check` on a supported kernel: exit ok={ok}, required missing {required:?}: {}",
        stderr.trim()
    );
    let text = icpt(&pin, &["check"])?;
    ensure!(
        text.contains("every required feature is present"),
        "`interceptor check` text: {text}"
    );
    Ok(())
}

/// `interceptor check` below the minimum: exit 1, naming bpf_get_netns_cookie in sock_ops (the
/// helper 5.10 does not offer there) as missing and the minimum kernel; the hooks themselves
/// are there.
fn features_below_minimum(s: &mut Suite) -> Outcome {
    let pin = s.w().pin.path().to_path_buf();
    let (ok, json, stderr) = check_report(&pin)?;
    let missing = missing_features(&json);
    s.missing = describe_missing(&missing);
    ensure!(
        !ok,
        "`interceptor check` exited 0 below the minimum: {json}"
    );
    // Exactly what 5.10 lacks, each for the kernel's own reason: a probe failing for another
    // one (EPERM of an exhausted RLIMIT_MEMLOCK) would read as a missing feature.
    let required: BTreeSet<&str> = missing
        .iter()
        .filter(|m| m.1)
        .map(|m| m.0.as_str())
        .collect();
    ensure!(
        required == BTreeSet::from(["helper bpf_get_netns_cookie in sock_ops"]),
        "required features missing below the minimum: {:?}",
        describe_missing(&missing)
    );
    ensure!(
        missing.iter().all(|m| !m.2.contains("os error")),
        "a probe failed for another reason than the feature: {:?}",
        describe_missing(&missing)
    );
    let want = "helper bpf_get_netns_cookie in sock_ops";
    ensure!(
        missing.iter().any(|(l, r, _)| l == want && *r),
        "`interceptor check` does not name {want:?} missing: {missing:?}"
    );
    ensure!(
        stderr.contains("bpf_get_netns_cookie in sock_ops") && stderr.contains("Linux 6.1"),
        "`interceptor check`'s error does not name the helper and Linux 6.1: {}",
        stderr.trim()
    );
    ensure!(
        !missing.iter().any(|(l, _, _)| l == "hook sock_ops"),
        "the sock_ops hook itself reported missing: {missing:?}"
    );
    Ok(())
}

/// `attach` below the minimum: both kinds refused before anything changed, the message naming
/// the missing helper and Linux 6.1; no pin, no link, no program, no map of ours in the kernel,
/// and outbound goes direct.
fn refusal(s: &mut Suite) -> Outcome {
    let w = s.w();
    let pin = w.pin.path().to_path_buf();
    let cg = w.cg.path().to_str().expect("UTF-8").to_string();
    let ns = w.app.path_str().to_string();
    for args in [["attach", "--cgroup", &cg], ["attach", "--netns", &ns]] {
        match icpt(&pin, &args) {
            Ok(out) => {
                return Err(format!(
                    "`{}` succeeded below the minimum: {out}",
                    args.join(" ")
                ))
            }
            Err(e) => ensure!(
                e.contains("bpf_get_netns_cookie in sock_ops")
                    && e.contains("Linux 6.1")
                    && e.contains("nothing was attached"),
                "`{}` refused without naming the helper and Linux 6.1: {e}",
                args.join(" ")
            ),
        }
    }
    ensure!(
        !pin.exists(),
        "pins after the refused attach: {}",
        run_cmd_ok("find", &[pin.to_str().expect("UTF-8")]).trim()
    );
    // The guest runs nothing else with bpf: any link, program or ICP_ map is ours (the probe
    // programs of `check` are freed after their last reference goes, RCU: bounded wait).
    let mut left = String::new();
    let clean = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        left.clear();
        for l in aya::programs::loaded_links().filter_map(Result::ok) {
            let _ = write!(left, "link {} (prog {}) ", l.id(), l.program_id());
        }
        for p in aya::programs::loaded_programs().filter_map(Result::ok) {
            let _ = write!(left, "prog {} {} ", p.id(), p.name_as_str().unwrap_or("?"));
        }
        for m in aya::maps::loaded_maps().filter_map(Result::ok) {
            if m.name_as_str().is_some_and(|n| n.starts_with("ICP_")) {
                let _ = write!(left, "map {} {} ", m.id(), m.name_as_str().unwrap_or("?"));
            }
        }
        left.is_empty()
    });
    ensure!(clean, "in the kernel 10 s after the refused attach: {left}");
    let target = addr(PEER4, 8080);
    let v = ok_reply("hello", from_cgroup(w, &w.cg, &["hello", &target]))?;
    ensure!(
        v["proxied"] == Value::Bool(false),
        "after the refused attach, outbound was proxied: {v}"
    );
    Ok(())
}

/// Outbound through `interceptor-proxy`: HELLO (the server saw the proxy's socket, the client's
/// getpeername shows the original destination) and a byte-exact transfer each way; the kernel's
/// `redirected` and the proxy's `forwarded_total` grow by exactly the connections made.
fn outbound(s: &mut Suite, dst: &str) -> Outcome {
    let before_proxy;
    let target = addr(dst, 8080);
    {
        let w = s.w();
        before_proxy = proxy_counter(w, "forwarded_total")?;
        let v = ok_reply("hello", from_cgroup(w, &w.cg, &["hello", &target]))?;
        ensure!(
            v["proxied"] == Value::Bool(true),
            "HELLO to {target} was not proxied (the server saw the client's own socket): {v}"
        );
        ensure!(
            sock(&v, "socket_peer")? == target.parse::<SocketAddr>().expect("address"),
            "getpeername on the client shows {} instead of the original destination {target}",
            v["socket_peer"]
        );
        bulk_ok(
            "bulk",
            from_cgroup(
                w,
                &w.cg,
                &[
                    "bulk", &target, "--send", BULK, "--recv", BULK, "--seed", "7",
                ],
            ),
        )?;
    }
    s.expected.redirected += 2;
    let w = s.w();
    let after_proxy = proxy_counter(w, "forwarded_total")?;
    ensure!(
        after_proxy == before_proxy + 2,
        "the proxy forwarded {} outbound connections to {target}, not 2",
        after_proxy - before_proxy
    );
    let pin = w.pin.path().to_path_buf();
    let cg = w.cg.path().to_str().expect("UTF-8").to_string();
    let c = scope_counters(&icpt_json(&pin, &["stats", "--json"])?, &cg)?;
    ensure!(
        counter(&c, "redirected") == s.expected.redirected,
        "the kernel counted {} redirected connects, the suite made {}",
        counter(&c, "redirected"),
        s.expected.redirected
    );
    Ok(())
}

/// An unmodified HAProxy (`server s 0.0.0.0:0`) as the proxy of a second cgroup: it learns the
/// original destination with getsockopt(SO_ORIGINAL_DST), answered by the kernel program.
fn haproxy(s: &mut Suite) -> Outcome {
    ensure!(
        s.haproxy_bin.is_file(),
        "{} is not in the guest image",
        s.haproxy_bin.display()
    );
    let bin = s.haproxy_bin.to_str().expect("UTF-8").to_string();
    let w = s.w();
    let cfg = "/tmp/kcheck-haproxy.cfg";
    fs::write(
        cfg,
        format!(
            "global\n  maxconn 64\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend outbound\n  bind 127.0.0.1:{HAPROXY_PORT}\n  default_backend original\nbackend original\n  server s 0.0.0.0:0\n"
        ),
    )
    .map_err(|e| format!("write {cfg}: {e}"))?;
    let mut ha = spawn_in(&w.app, None, &[&bin, "-db", "-f", cfg]);
    let listening = wait_until(Duration::from_secs(30), Duration::from_millis(50), || {
        w.app.in_ns(|| tcp_listening(HAPROXY_PORT))
    });
    if !listening {
        let st = ha.try_status();
        return Err(format!(
            "HAProxy does not listen on 127.0.0.1:{HAPROXY_PORT} after 30 s (exit status {st:?}); stderr: {}",
            ha.stderr()
        ));
    }
    w.haproxy = Some(ha);
    let pin = w.pin.path().to_path_buf();
    let cg = w.cg_ha.path().to_str().expect("UTF-8").to_string();
    icpt(
        &pin,
        &[
            "attach",
            "--cgroup",
            &cg,
            "--proxy-port",
            &HAPROXY_PORT.to_string(),
            // HAProxy cannot put the bypass mark on its listener.
            "--proxy-listener",
            "any",
        ],
    )?;
    let target = addr(PEER4, 8080);
    let v = ok_reply(
        "hello through HAProxy",
        from_cgroup(w, &w.cg_ha, &["hello", &target]),
    )?;
    ensure!(
        v["proxied"] == Value::Bool(true),
        "HELLO to {target} was not proxied by HAProxy: {v}"
    );
    bulk_ok(
        "bulk through HAProxy",
        from_cgroup(
            w,
            &w.cg_ha,
            &[
                "bulk", &target, "--send", BULK, "--recv", BULK, "--seed", "8",
            ],
        ),
    )?;
    let c = scope_counters(&icpt_json(&pin, &["stats", "--json"])?, &cg)?;
    s.expected.redirected_ha += 2;
    ensure!(
        counter(&c, "redirected") == 2 && counter(&c, "orig_dst_answered") == 2,
        "HAProxy's cgroup: redirected {} and orig_dst_answered {}, expected 2 and 2",
        counter(&c, "redirected"),
        counter(&c, "orig_dst_answered")
    );
    Ok(())
}

/// The namespace's TcpExt counters that tell of lost or repeated handshakes (for messages).
fn tcp_ext(ns: &NetNs) -> String {
    let text = ns.in_ns(|| fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default());
    let wanted = [
        "ListenOverflows",
        "ListenDrops",
        "TCPReqQFullDrop",
        "SyncookiesSent",
        "SyncookiesRecv",
        "TCPSynRetrans",
        "TCPTimeouts",
        "TCPAbortOnData",
    ];
    interceptor_tests::netstat_section(&text, "TcpExt")
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, v)| *v > 0 && wanted.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether a TCP listener on 127.0.0.1:`port` is in the calling thread's namespace.
fn tcp_listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    fs::read_to_string("/proc/thread-self/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        })
    })
}

/// Inbound from the peer namespace over the veth pair, steered by sk_lookup into the proxy's
/// inbound listener: the workload's server sees the proxy's passthrough source (`via`), the
/// client still talks to the address it dialled (nothing rewritten), a transfer is byte-exact.
fn inbound(s: &mut Suite, dst: &str, via: &str) -> Outcome {
    let target = addr(dst, 8080);
    {
        let w = s.w();
        let pin = w.pin.path().to_path_buf();
        let ns = w.app.path_str().to_string();
        let before = proxy_counter(w, "inbound_forwarded_total")?;
        // The kernel's counters around the two connections only: `inbound_loopback` counts every
        // SYN from a loopback source in the namespace (also requests to the proxy's admin port),
        // so nothing else may connect in between.
        let k0 = scope_counters(&icpt_json(&pin, &["stats", "--json"])?, &ns)?;
        let v = ok_reply("hello", from_peer(w, &["hello", &target]))?;
        let seen = sock(&v, "peer_seen_by_server")?;
        ensure!(
            seen.ip().to_string() == via,
            "the workload's server saw {seen}, not the proxy's source {via}: {v}"
        );
        ensure!(
            sock(&v, "server_local")? == target.parse::<SocketAddr>().expect("address")
                && sock(&v, "socket_peer")? == target.parse::<SocketAddr>().expect("address"),
            "the address was rewritten (server_local {}, client's peer {}), dialled {target}",
            v["server_local"],
            v["socket_peer"]
        );
        bulk_ok(
            "bulk",
            from_peer(
                w,
                &[
                    "bulk", &target, "--send", BULK, "--recv", BULK, "--seed", "9",
                ],
            ),
        )?;
        let k1 = scope_counters(&icpt_json(&pin, &["stats", "--json"])?, &ns)?;
        let after = proxy_counter(w, "inbound_forwarded_total")?;
        ensure!(
            after == before + 2,
            "the proxy forwarded {} inbound connections, not 2",
            after - before
        );
        for (name, what) in [
            ("inbound_redirected", "connections steered into the proxy"),
            (
                "inbound_loopback",
                "the proxy's hops to the workload let through",
            ),
        ] {
            let d = counter(&k1, name) - counter(&k0, name);
            ensure!(
                d == 2,
                "{name} ({what}) grew by {d} for 2 connections: {k1:?}"
            );
        }
    }
    s.expected.inbound += 2;
    Ok(())
}

/// `interceptor upgrade`: every link gets a new program (BPF_LINK_UPDATE) while connections
/// keep coming in both directions, before, during and after it (none fails, every one
/// proxied), and the links stay.
fn upgrade(s: &mut Suite) -> Outcome {
    let w = s.w();
    let pin = w.pin.path().to_path_buf();
    let before = links(&icpt_json(&pin, &["status", "--json"])?);
    let stop = AtomicBool::new(false);
    let out_target = addr(PEER4, 8080);
    let in_target = addr(APP4, 8080);
    let (out_log, in_log) = (Mutex::new(Vec::new()), Mutex::new(Vec::new()));
    let w: &World = w;
    // Until each direction has finished a connection started after `t` (bounded).
    let settled = |t: Instant| {
        wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
            [&out_log, &in_log]
                .iter()
                .all(|l: &&Mutex<Vec<Conn>>| l.lock().expect("log").iter().any(|c| c.0 >= t))
        })
    };
    let (report, window) = std::thread::scope(|sc| {
        sc.spawn(|| {
            hello_loop(&stop, &out_log, None, || {
                from_cgroup(w, &w.cg, &["hello", &out_target])
            })
        });
        sc.spawn(|| {
            hello_loop(&stop, &in_log, Some("127.0.0.6"), || {
                from_peer(w, &["hello", &in_target])
            })
        });
        // Connections before, then the upgrade, then connections after it.
        settled(Instant::now());
        let t0 = Instant::now();
        let report = icpt_json(&pin, &["upgrade", "--json"]);
        let t1 = Instant::now();
        settled(t1);
        stop.store(true, Ordering::SeqCst);
        (report, (t0, t1))
    });
    let (out_log, in_log) = (
        out_log.into_inner().expect("log"),
        in_log.into_inner().expect("log"),
    );
    s.expected.redirected += out_log.len() as u64;
    s.expected.inbound += in_log.len() as u64;
    let report = report?;
    for (what, log) in [("outbound", &out_log), ("inbound", &in_log)] {
        let bad: Vec<&String> = log.iter().filter_map(|c| c.2.as_ref().err()).collect();
        ensure!(
            bad.is_empty(),
            "{} of {} {what} connections across the upgrade failed or were not proxied; first: {}",
            bad.len(),
            log.len(),
            bad[0]
        );
        let (t0, t1) = window;
        let before_n = log.iter().filter(|c| c.1 < t0).count();
        let during_n = log.iter().filter(|c| c.0 > t0 && c.1 < t1).count();
        let after_n = log.iter().filter(|c| c.0 > t1).count();
        ensure!(
            before_n > 0 && during_n > 0 && after_n > 0,
            "{what}: {before_n} connections before the upgrade, {during_n} while it ran ({:?}), {after_n} after: each must be at least one",
            t1 - t0
        );
    }
    let after = links(&icpt_json(&pin, &["status", "--json"])?);
    ensure!(
        before.len() == after.len(),
        "{} links before the upgrade, {} after",
        before.len(),
        after.len()
    );
    for (name, pin_path, old, _) in &before {
        let new = after
            .iter()
            .find(|l| &l.1 == pin_path)
            .ok_or_else(|| format!("link {pin_path} is gone after the upgrade"))?;
        ensure!(
            new.2.is_some() && new.2 != *old,
            "link {name} ({pin_path}) still runs program {old:?} after the upgrade: {report}"
        );
    }
    Ok(())
}

/// One HELLO connection: when it started and ended, and Ok, or why it failed or was not
/// proxied.
type Conn = (Instant, Instant, Result<(), String>);

/// HELLOs one after the other until `stop`, each appended to `log`; each must be proxied
/// (`proxied`, and for inbound the server must have seen the proxy's source `via`).
fn hello_loop(
    stop: &AtomicBool,
    log: &Mutex<Vec<Conn>>,
    via: Option<&str>,
    hello: impl Fn() -> Value,
) {
    // Bounded: the caller stops it within a minute; the cap guards against a runaway loop.
    for _ in 0..10_000 {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let t = Instant::now();
        let v = hello();
        let res = match ok_reply("hello", v) {
            Err(e) => Err(e),
            Ok(v) if v["proxied"] != Value::Bool(true) => Err(format!("not proxied: {v}")),
            Ok(v)
                if via.is_some_and(|via| {
                    sock(&v, "peer_seen_by_server")
                        .map(|a| a.ip().to_string())
                        .as_deref()
                        != Ok(via)
                }) =>
            {
                Err(format!(
                    "the server did not see the proxy's source {via:?}: {v}"
                ))
            }
            Ok(_) => Ok(()),
        };
        log.lock().expect("log").push((t, Instant::now(), res));
    }
}

/// `status` shows the scopes and `stats` counts exactly what the suite did: every redirected
/// connect answered once, every inbound connection steered once, the proxy's counters equal
/// to the kernel's, no record left once the connections closed.
fn status_stats(s: &mut Suite) -> Outcome {
    let e = &s.expected;
    let (redirected, redirected_ha, inbound) = (e.redirected, e.redirected_ha, e.inbound);
    let w = s.w();
    let pin = w.pin.path().to_path_buf();
    let cg = w.cg.path().to_str().expect("UTF-8").to_string();
    let cg_ha = w.cg_ha.path().to_str().expect("UTF-8").to_string();
    let ns = w.app.path_str().to_string();
    let status = icpt_json(&pin, &["status", "--json"])?;
    let cgroups: Vec<&str> = status["scopes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["cgroup"].as_str())
        .collect();
    ensure!(
        cgroups.contains(&cg.as_str()),
        "`status` does not show {cg}: {status}"
    );
    ensure!(
        status["inbound"][0]["netns"] == ns.as_str(),
        "`status` does not show the namespace {ns}: {status}"
    );
    ensure!(
        status["layout_version"].as_u64().is_some(),
        "`status` shows no layout version: {status}"
    );
    let mut msg = String::new();
    // Records go when the client socket closes; the probes have exited, allow the kernel a
    // moment to run the close callbacks.
    let mut stats = Value::Null;
    let settled = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        stats = icpt_json(&pin, &["stats", "--json"]).unwrap_or(Value::Null);
        stats["handoff_records"] == 0
    });
    if !settled {
        let _ = write!(
            msg,
            "records left after every connection closed: handoff {}; ",
            stats["handoff_records"]
        );
    }
    let out = scope_counters(&stats, &cg)?;
    let ha = scope_counters(&stats, &cg_ha)?;
    let inb = scope_counters(&stats, &ns)?;
    let mut want = |what: &str, got: u64, exp: u64| {
        if got != exp {
            let _ = write!(msg, "{what} is {got}, expected {exp}; ");
        }
    };
    want("redirected", counter(&out, "redirected"), redirected);
    want(
        "orig_dst_answered",
        counter(&out, "orig_dst_answered"),
        redirected,
    );
    want(
        "haproxy redirected",
        counter(&ha, "redirected"),
        redirected_ha,
    );
    want(
        "haproxy orig_dst_answered",
        counter(&ha, "orig_dst_answered"),
        redirected_ha,
    );
    want(
        "inbound_redirected",
        counter(&inb, "inbound_redirected"),
        inbound,
    );
    want(
        "the proxy's forwarded_total",
        proxy_counter(w, "forwarded_total")?,
        redirected,
    );
    want(
        "the proxy's inbound_forwarded_total",
        proxy_counter(w, "inbound_forwarded_total")?,
        inbound,
    );
    ensure!(
        msg.is_empty(),
        "{msg}stats: {stats}; TCP counters: workload namespace {}, peer namespace {}",
        tcp_ext(&w.app),
        tcp_ext(&w.peer)
    );
    Ok(())
}

/// With the proxy killed (both directions fail closed by default), an outbound connect from the
/// workload and an inbound SYN from the peer are refused, and the kernel counts both.
fn fail_closed(s: &mut Suite) -> Outcome {
    let w = s.w();
    if let Some(mut p) = w.proxy.take() {
        p.kill();
    }
    let pin = w.pin.path().to_path_buf();
    let cg = w.cg.path().to_str().expect("UTF-8").to_string();
    let ns = w.app.path_str().to_string();
    // The kernel drops the proxy's sockets from the inbound map when the process is gone.
    let status_ok = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        icpt_json(&pin, &["status", "--json"]).is_ok_and(|s| {
            s["inbound"][0]["registered"]
                .as_array()
                .is_some_and(Vec::is_empty)
        })
    });
    ensure!(
        status_ok,
        "the killed proxy's inbound listeners are still registered after 10 s"
    );
    for dst in [PEER4, PEER6] {
        let target = addr(dst, 8080);
        let v = from_cgroup(w, &w.cg, &["hello", &target, "--timeout-ms", "5000"]);
        ensure!(
            v["kind"] == "refused",
            "outbound to {target} with the proxy gone was not refused: {v}"
        );
    }
    let target = addr(APP4, 8080);
    let v = from_peer(w, &["hello", &target, "--timeout-ms", "5000"]);
    ensure!(
        v["kind"] == "refused",
        "inbound to {target} with the proxy gone was not refused: {v}"
    );
    s.expected.refused += 2;
    s.expected.inbound_refused += 1;
    let stats = icpt_json(&pin, &["stats", "--json"])?;
    let out = scope_counters(&stats, &cg)?;
    let inb = scope_counters(&stats, &ns)?;
    ensure!(
        counter(&out, "proxy_down_refused") == s.expected.refused
            && counter(&inb, "inbound_proxy_down_refused") == s.expected.inbound_refused,
        "proxy_down_refused {} (expected {}), inbound_proxy_down_refused {} (expected {})",
        counter(&out, "proxy_down_refused"),
        s.expected.refused,
        counter(&inb, "inbound_proxy_down_refused"),
        s.expected.inbound_refused
    );
    Ok(())
}

/// `detach --all` leaves nothing: no pin, no link in the kernel, none of the programs or maps,
/// `status` empty; and connections go direct again.
fn detach(s: &mut Suite) -> Outcome {
    let w = s.w();
    let pin = w.pin.path().to_path_buf();
    let ours: BTreeSet<u64> = links(&icpt_json(&pin, &["status", "--json"])?)
        .into_iter()
        .filter_map(|l| l.2)
        .collect();
    if let Some(mut h) = w.haproxy.take() {
        h.kill();
    }
    icpt(&pin, &["detach", "--all"])?;
    let mut msg = String::new();
    if pin.exists() {
        let left = run_cmd_ok("find", &[pin.to_str().expect("UTF-8")]);
        let _ = write!(msg, "pins left under {}: {}; ", pin.display(), left.trim());
    }
    let status = icpt(&pin, &["status"])?;
    if !status.contains("nothing attached") {
        let _ = write!(msg, "`status` after detach: {}; ", status.trim());
    }
    // Programs and maps are freed after their last reference goes (RCU): bounded wait.
    let mut left = String::new();
    let gone = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        left.clear();
        for l in aya::programs::loaded_links().filter_map(Result::ok) {
            let _ = write!(left, "link {} (prog {}) ", l.id(), l.program_id());
        }
        for p in aya::programs::loaded_programs().filter_map(Result::ok) {
            if ours.contains(&u64::from(p.id())) {
                let _ = write!(left, "prog {} ", p.id());
            }
        }
        for m in aya::maps::loaded_maps().filter_map(Result::ok) {
            if m.name_as_str().is_some_and(|n| n.starts_with("ICP_")) {
                let _ = write!(left, "map {} {} ", m.id(), m.name_as_str().unwrap_or("?"));
            }
        }
        left.is_empty()
    });
    if !gone {
        let _ = write!(msg, "still in the kernel 10 s after detach: {left}; ");
    }
    let target = addr(PEER4, 8080);
    match ok_reply("hello", from_cgroup(w, &w.cg, &["hello", &target])) {
        Ok(v) if v["proxied"] == Value::Bool(false) => {}
        Ok(v) => {
            let _ = write!(msg, "after detach, outbound was still proxied: {v}; ");
        }
        Err(e) => {
            let _ = write!(msg, "after detach, outbound does not go direct: {e}; ");
        }
    }
    let target = addr(APP4, 8080);
    match ok_reply("hello", from_peer(w, &["hello", &target])) {
        Ok(v) if sock(&v, "peer_seen_by_server")?.ip().to_string() == PEER4 => {}
        Ok(v) => {
            let _ = write!(msg, "after detach, inbound did not go direct: {v}; ");
        }
        Err(e) => {
            let _ = write!(
                msg,
                "after detach, inbound does not reach the workload: {e}; "
            );
        }
    }
    ensure!(msg.is_empty(), "{msg}");
    Ok(())
}

/// The interception needs no conntrack: nf_conntrack (a module of the kernel package, in the
/// image) was not loaded at any point of the run; then, as the control that the look can see
/// it, `modprobe nf_conntrack` loads it and the look finds it.
fn no_conntrack(s: &mut Suite) -> Outcome {
    if let Some(e) = &s.conntrack_at_start {
        return Err(format!(
            "conntrack was in the kernel before the run started ({e}): built in, or loaded at boot; this kernel cannot show that the interception works without it"
        ));
    }
    if let Some(after) = &s.conntrack_seen_after {
        return Err(format!(
            "nf_conntrack was loaded during the run (first seen after the {after} check): {}",
            conntrack_loaded().unwrap_or_default()
        ));
    }
    let out = run_cmd(
        Command::new("modprobe").arg("nf_conntrack"),
        Duration::from_secs(60),
    )
    .map_err(|e| format!("cannot run modprobe: {e}"))?;
    ensure!(
        out.status.success(),
        "control failed: `modprobe nf_conntrack` ({}): {}; without it, its absence proves nothing",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    ensure!(
        conntrack_loaded().is_some(),
        "control failed: nf_conntrack loaded by modprobe is not seen in /proc/modules or /proc/net/nf_conntrack"
    );
    Ok(())
}
