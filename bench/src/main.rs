//! `interceptor-bench`: direct (D), iptables -> our proxy (I), eBPF -> our proxy (E), the
//! same with kernel forwarding (EK), iptables -> HAProxy (H) and eBPF -> HAProxy (EH), side
//! by side on the same machine.
//! Run it with `cargo xtask bench [--quick|--smoke] [--out DIR]`; see bench/README.md.
//!
//! Modules: `world` (modes, namespaces, servers, proxies, interception), `workloads`
//! (what is measured in each world), `client` (the bench's own load clients, run as
//! hidden subcommands inside a world), `report` (statistics, tables, targets, JSON).

mod client;
mod detect;
mod dubbo;
mod report;
mod routing;
mod stats;
mod upgrade;
mod workloads;
mod world;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::json;

use workloads::{Load, RunResult};
use world::{Mode, Scratch, Threads, World};

#[derive(Parser, Debug)]
#[command(
    name = "interceptor-bench",
    about = "Benchmark: direct vs iptables vs eBPF interception, interceptor-proxy vs HAProxy",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    role: Option<client::Role>,
    /// Short profile, under 3 minutes: 2 s measurements, 2,000 idle connections, two
    /// repetitions at one thread and one at the default thread counts.
    #[arg(long, conflicts_with = "smoke")]
    quick: bool,
    /// Seconds-long check for CI: asserts only conntrack counts and that the proxied
    /// modes went through the proxy; exits non-zero on a violation.
    #[arg(long)]
    smoke: bool,
    /// Directory for the JSON and text results (default bench/results; smoke writes
    /// nothing unless given).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Repetitions (overrides the profile).
    #[arg(long)]
    reps: Option<u32>,
    /// Seconds per measurement (overrides the profile).
    #[arg(long)]
    duration: Option<f64>,
    /// Requests per second of the fixed-rate measurement (overrides the profile).
    #[arg(long)]
    rate: Option<u32>,
    /// Idle connections for the memory figure (overrides the profile).
    #[arg(long)]
    idle_conns: Option<u32>,
    /// Proxy thread configurations to run (overrides the profile).
    #[arg(long, value_enum)]
    threads: Option<ThreadsArg>,
    /// Record each world's keep-alive, new-connection and bulk measurements with `perf
    /// record -a -g` into DIR/<mode>-<threads>-rep<N>-<step>.data (read with `perf report
    /// -i FILE --no-children --sort comm,dso,sym`). Costs CPU: not for the figures.
    #[arg(long, value_name = "DIR")]
    perf: Option<PathBuf>,
    /// Modes to run (default all: D,I,E,EK,H,EH); ratios need both of their modes.
    #[arg(long, value_enum, value_delimiter = ',')]
    modes: Option<Vec<Mode>>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ThreadsArg {
    T1,
    Default,
    Both,
}

struct Profile {
    name: &'static str,
    reps: u32,
    load: Load,
    /// Thread configurations, each with its number of repetitions (at most `reps`).
    configs: Vec<(Threads, u32)>,
}

impl Profile {
    fn from_cli(cli: &Cli) -> Profile {
        let mut p = if cli.smoke {
            Profile {
                name: "smoke",
                reps: 1,
                load: Load {
                    duration_s: 1.0,
                    concurrency: 4,
                    rate: 500,
                    rate_conns: 4,
                    idle_conns: 100,
                },
                configs: vec![(Threads::One, 1)],
            }
        } else if cli.quick {
            Profile {
                name: "quick",
                reps: 2,
                load: Load {
                    duration_s: 2.0,
                    concurrency: 16,
                    rate: 2000,
                    rate_conns: 8,
                    idle_conns: 2000,
                },
                // The targets are defined at one thread: that configuration gets the
                // repetitions, the defaults one run, to stay under three minutes.
                configs: vec![(Threads::One, 2), (Threads::Default, 1)],
            }
        } else {
            Profile {
                name: "full",
                reps: 5,
                load: Load {
                    duration_s: 10.0,
                    concurrency: 16,
                    rate: 2000,
                    rate_conns: 8,
                    idle_conns: 10_000,
                },
                configs: vec![(Threads::One, 5), (Threads::Default, 5)],
            }
        };
        if let Some(r) = cli.reps {
            p.reps = r.max(1);
            for c in &mut p.configs {
                c.1 = p.reps;
            }
        }
        if let Some(d) = cli.duration {
            p.load.duration_s = d.clamp(0.5, 600.0);
        }
        if let Some(r) = cli.rate {
            p.load.rate = r.clamp(1, 1_000_000);
        }
        if let Some(n) = cli.idle_conns {
            p.load.idle_conns = n.min(50_000);
        }
        let n = p.reps;
        match cli.threads {
            Some(ThreadsArg::T1) => p.configs = vec![(Threads::One, n)],
            Some(ThreadsArg::Default) => p.configs = vec![(Threads::Default, n)],
            Some(ThreadsArg::Both) => p.configs = vec![(Threads::One, n), (Threads::Default, n)],
            None => {}
        }
        p
    }
}

static INTERRUPTED: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);

/// True once SIGINT or SIGTERM arrived: the bench stops after the current workload and
/// its guards remove everything.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn install_signal_handlers() -> Result<()> {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The flag is set from the handler; the bench polls it between workloads.
        signal_hook::flag::register(sig, Arc::clone(&INTERRUPTED))?;
    }
    Ok(())
}

/// Raises RLIMIT_NOFILE for this process and everything it starts (proxy, HAProxy,
/// nginx, clients): 10,000 idle proxied connections need 20,000 descriptors in a proxy.
/// Without CAP_SYS_RESOURCE the hard limit cannot be raised: the soft limit goes up to
/// it and the idle workload is sized to fit. Returns the limit in force.
fn raise_nofile(want: u64) -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    // Try the limit wanted first (raising the hard limit needs CAP_SYS_RESOURCE), then the
    // soft limit up to the hard one.
    let mut last = None;
    for (soft, hard) in [(want, want.max(hard)), (hard, hard)] {
        match setrlimit(Resource::RLIMIT_NOFILE, soft, hard) {
            Ok(()) => return Ok(soft),
            Err(e) => last = Some(e),
        }
    }
    bail!(
        "setrlimit(RLIMIT_NOFILE): {}",
        last.map_or_else(String::new, |e| e.to_string())
    )
}

fn check_tools() -> Result<()> {
    let missing: Vec<&str> = ["wrk", "iperf3", "nginx", "haproxy", "iptables", "ss", "ip"]
        .into_iter()
        .filter(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t} >/dev/null")])
                .status()
                .map_or(true, |s| !s.success())
        })
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools: {} (run `cargo xtask setup`)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Copies this executable where uid 2000 can run it (the client roles).
fn client_copy(scratch: &Scratch) -> Result<PathBuf> {
    let me = std::env::current_exe().context("current_exe")?;
    let dst = scratch.path().join("interceptor-bench");
    std::fs::copy(&me, &dst)
        .with_context(|| format!("copy {} to {}", me.display(), dst.display()))?;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))?;
    Ok(dst)
}

fn short(r: &RunResult) -> String {
    let f = |k: &str| r.figures.get(k).copied();
    let mut parts = Vec::new();
    if let Some(v) = f("ka_rps") {
        parts.push(format!("ka {} req/s", report::num(v)));
    }
    if let Some(v) = f("close_cps") {
        parts.push(format!("new {} conn/s", report::num(v)));
    }
    if let Some(v) = f("rate_p50_us") {
        parts.push(format!("rate p50 {}us", report::num(v)));
    }
    if let Some(v) = f("bulk_gbps") {
        parts.push(format!("bulk {} Gbit/s", report::num(v)));
    }
    if let Some(v) = f("idle_pss_per_conn") {
        parts.push(format!("idle {} B/conn", report::num(v)));
    }
    if let Some(v) = r.checks.get("conntrack_max") {
        parts.push(format!("conntrack {v}"));
    }
    if !r.errors.is_empty() {
        parts.push(format!("{} error(s)", r.errors.len()));
    }
    parts.join(", ")
}

/// The checks that hold whatever the noise: iptables modes pay conntrack entries, and the
/// proxied modes went through their proxy. (D, E and EH show 0 entries only because no rule
/// makes conntrack run in their namespaces: that proves nothing, so it is not checked here;
/// the kernel matrix runs the eBPF data path with nf_conntrack never loaded.)
fn violations(runs: &[RunResult]) -> Vec<String> {
    let mut v = Vec::new();
    for r in runs {
        let id = format!("rep {} {} {}", r.rep, r.mode, r.threads);
        let c = |k: &str| r.checks.get(k).copied();
        for e in &r.errors {
            v.push(format!("{id}: workload failed: {e}"));
        }
        let ct = c("conntrack_max").unwrap_or(0);
        if matches!(r.mode.as_str(), "I" | "H") && ct == 0 {
            v.push(format!(
                "{id}: no conntrack entry although iptables NAT is in use"
            ));
        }
        let conns = c("close_requests").unwrap_or(0);
        if matches!(r.mode.as_str(), "I" | "H") && c("iptables_redirect_packets").unwrap_or(0) == 0
        {
            v.push(format!("{id}: the REDIRECT rule matched no packet"));
        }
        if matches!(r.mode.as_str(), "E" | "EK" | "EH") {
            let red = c("ebpf_redirected").unwrap_or(0);
            if red < conns || red == 0 {
                v.push(format!(
                    "{id}: eBPF redirected {red} connections, fewer than the {conns} new-connection requests"
                ));
            }
            if c("ebpf_orig_dst_answered").unwrap_or(0) == 0 {
                v.push(format!(
                    "{id}: the proxy never got SO_ORIGINAL_DST from the eBPF programs"
                ));
            }
        }
        if matches!(r.mode.as_str(), "I" | "E" | "EK") {
            let fwd = c("proxy_forwarded_total").unwrap_or(0);
            if fwd < conns || fwd == 0 {
                v.push(format!(
                    "{id}: interceptor-proxy forwarded {fwd} connections, fewer than the {conns} new-connection requests"
                ));
            }
            if c("proxy_orig_dst_missing").unwrap_or(0) != 0 {
                v.push(format!(
                    "{id}: interceptor-proxy saw connections without an original destination"
                ));
            }
        }
        if r.mode == "EK" {
            // The kernel carried connections and bytes: a proxy that copied everything
            // (kernel forwarding refused at start, or never armed) fails here.
            if c("kfwd_on") != Some(1) {
                v.push(format!(
                    "{id}: interceptor-proxy --kernel-forward on reports kernel forwarding off \
                     (are the programs attached before it starts? see its log)"
                ));
            }
            let kc = c("kfwd_connections").unwrap_or(0);
            let kb = c("kfwd_bytes").unwrap_or(0);
            if kc == 0 || kb == 0 {
                v.push(format!(
                    "{id}: the kernel forwarded {kc} connections and {kb} bytes (want > 0 of each)"
                ));
            }
        }
    }
    v
}

fn main() {
    let cli = Cli::parse();
    if let Some(role) = cli.role {
        if let Err(e) = client::run(role) {
            eprintln!("interceptor-bench: {e:#}");
            exit(1);
        }
        return;
    }
    match bench(&cli) {
        Ok(code) => exit(code),
        Err(e) => {
            eprintln!("interceptor-bench: error: {e:#}");
            exit(1);
        }
    }
}

fn bench(cli: &Cli) -> Result<i32> {
    // SAFETY: geteuid has no preconditions.
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root (network namespaces, cgroups, BPF, iptables)");
    }
    check_tools()?;
    let nofile = raise_nofile(131_072)?;
    world::set_nofile(nofile);
    install_signal_handlers()?;
    let mut profile = Profile::from_cli(cli);
    if let Some(dir) = &cli.perf {
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        workloads::set_perf_dir(dir.clone());
    }
    // A proxy holds two descriptors per proxied connection.
    let idle_max = (nofile.saturating_sub(200) / 2) as u32;
    if profile.load.idle_conns > idle_max {
        println!(
            "note: RLIMIT_NOFILE is {nofile} and cannot be raised (no CAP_SYS_RESOURCE): \
             {idle_max} idle connections instead of {}",
            profile.load.idle_conns
        );
        profile.load.idle_conns = idle_max;
    }
    let ws = interceptor_tests::workspace_dir();
    let proxy_bin = interceptor_tests::proxy_bin();
    let _ = interceptor_tests::interceptor_bin(); // fail early: the pin-dir guard needs it
    let machine = report::machine(&ws, &proxy_bin);
    let scratch = Scratch::new("bench")?;
    let client_bin = client_copy(&scratch)?;

    println!(
        "interceptor-bench {} profile: {} rep(s) ({}), {} s per measurement, keep-alive/new-conn concurrency {}, \
         fixed rate {} req/s over {} conns, {} idle conns",
        profile.name,
        profile.reps,
        profile.configs.iter().map(|(t, n)| format!("{} x{n}", t.key())).collect::<Vec<_>>().join(", "),
        profile.load.duration_s,
        profile.load.concurrency,
        profile.load.rate,
        profile.load.rate_conns,
        profile.load.idle_conns
    );
    println!(
        "machine: {} · {} · {} cores · kernel {} · commit {}{}",
        machine.host,
        machine.cpu_model,
        machine.cores,
        machine.kernel,
        &machine.git_commit[..machine.git_commit.len().min(12)],
        if machine.git_dirty { " (dirty)" } else { "" }
    );
    println!("proxy: {}", proxy_bin.display());
    if !machine.root_programs_at_start.is_empty() {
        println!(
            "warning: programs are already attached at the cgroup2 root ({}); they run for every \
             socket, also in D, I and H: detach them for clean figures",
            machine.root_programs_at_start.join(", ")
        );
    }
    println!("load average at start: {}", machine.loadavg_at_start);
    for m in Mode::ALL {
        println!("  {:<2} {}", m.name(), m.describe());
    }

    let started = Instant::now();
    let mut runs: Vec<RunResult> = Vec::new();
    // Interleaved: every repetition runs D once, then each proxy mode at each thread
    // configuration, each in a fresh namespace.
    'reps: for rep in 0..profile.reps {
        let wanted = |m: &Mode| cli.modes.as_ref().is_none_or(|v| v.contains(m));
        let mut plan: Vec<(Mode, Threads)> = Vec::new();
        if wanted(&Mode::D) {
            plan.push((Mode::D, Threads::One));
        }
        for &(t, n) in &profile.configs {
            if rep < n {
                plan.extend(
                    [Mode::I, Mode::E, Mode::EK, Mode::H, Mode::EH]
                        .iter()
                        .filter(|m| wanted(m))
                        .map(|&m| (m, t)),
                );
            }
        }
        for &(mode, threads) in &plan {
            if interrupted() {
                break 'reps;
            }
            let tag = if mode == Mode::D {
                mode.name().to_string()
            } else {
                format!("{}-{}", mode.name(), threads.key())
            };
            print!("rep {}/{} {:<10} ", rep + 1, profile.reps, tag);
            let _ = std::io::stdout().flush();
            let w_start = Instant::now();
            let res = World::new(mode, threads, &tag, &scratch, &client_bin);
            let r = match res {
                Ok(mut w) => {
                    let r = workloads::run_all(&mut w, &profile.load, rep);
                    drop(w);
                    r
                }
                Err(e) => RunResult {
                    rep,
                    mode: mode.name().into(),
                    threads: if mode == Mode::D {
                        "-".into()
                    } else {
                        threads.key().into()
                    },
                    errors: vec![format!("setup: {e:#}")],
                    ..Default::default()
                },
            };
            println!("{} ({:.1} s)", short(&r), w_start.elapsed().as_secs_f64());
            runs.push(r);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();

    let sums: Vec<report::ConfigSummary> = profile
        .configs
        .iter()
        .map(|(t, _)| report::summarise(&runs, t.key(), t.describe()))
        .collect();
    let mut text = String::new();
    for s in &sums {
        text.push_str(&report::table(s));
        text.push('\n');
    }
    text.push_str(
        "* host mem: whole-machine MemTotal-MemAvailable delta per connection (both ends' sockets, \
         client and server included; noisy)\n\
         * host CPU: whole-machine busy time of /proc/stat over the keep-alive run per 1,000 requests \
         (wrk, nginx, the proxy, the kernel's work wherever it runs, e.g. sockmap kworkers; and \
         anything else on the machine)\n\n",
    );
    let targets = report::targets(&sums);
    if profile.name == "smoke" {
        text.push_str("(targets are informational here: --smoke asserts only the checks below)\n");
    }
    text.push_str(&report::targets_table(&targets));
    let viol = violations(&runs);
    text.push('\n');
    if viol.is_empty() {
        text.push_str(
            "checks: conntrack entries > 0 for I/H; E/EK/EH redirected by eBPF; I/E/EK forwarded by \
             interceptor-proxy; EK forwarded by the kernel: ok\n",
        );
    } else {
        text.push_str(&format!("checks: {} violation(s):\n", viol.len()));
        for v in &viol {
            text.push_str(&format!("  - {v}\n"));
        }
    }
    text.push_str(&format!(
        "\n{} profile, {} run(s) in {:.0} s; {} · {} · {} cores · kernel {} · {} · commit {}\n",
        profile.name,
        runs.len(),
        elapsed,
        machine.host,
        machine.cpu_model,
        machine.cores,
        machine.kernel,
        machine.date_utc,
        machine.git_commit
    ));
    println!("\n{text}");

    let out_dir = match (&cli.out, cli.smoke) {
        (Some(d), _) => Some(d.clone()),
        (None, true) => None,
        (None, false) => Some(ws.join("bench").join("results")),
    };
    if let Some(dir) = out_dir {
        let stem = format!(
            "{}-{}{}",
            &machine.date_utc[..10],
            machine.host,
            match profile.name {
                "full" => String::new(),
                p => format!("-{p}"),
            }
        );
        write_results(
            &dir,
            &stem,
            &text,
            &json!({
                "machine": machine,
                "profile": {
                    "name": profile.name,
                    "reps": profile.reps,
                    "load": profile.load,
                    "configs": profile.configs.iter().map(|(t, n)| json!({"threads": t.key(), "reps": n})).collect::<Vec<_>>(),
                    "modes": Mode::ALL.iter().map(|m| json!({"mode": m.name(), "what": m.describe()})).collect::<Vec<_>>(),
                },
                "elapsed_s": elapsed,
                "summary": sums,
                "targets": targets,
                "violations": viol,
                "runs": runs,
            }),
        )?;
    }
    if interrupted() {
        return Ok(130);
    }
    Ok(if viol.is_empty() { 0 } else { 1 })
}

/// `<date>-<host>-<what>`, the name of a results file without its extension.
pub(crate) fn result_stem(what: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{}-{host}-{what}", &report::now_utc()[..10])
}

pub(crate) fn write_results(
    dir: &Path,
    stem: &str,
    text: &str,
    doc: &serde_json::Value,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let json_path = dir.join(format!("{stem}.json"));
    let txt_path = dir.join(format!("{stem}.txt"));
    std::fs::write(&json_path, serde_json::to_string_pretty(doc)? + "\n")
        .with_context(|| format!("write {}", json_path.display()))?;
    std::fs::write(&txt_path, text).with_context(|| format!("write {}", txt_path.display()))?;
    println!(
        "results: {} and {}",
        json_path.display(),
        txt_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: &str, checks: &[(&str, u64)]) -> RunResult {
        RunResult {
            mode: mode.into(),
            threads: "t1".into(),
            checks: checks.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn checks_catch_a_missing_nat_cost_and_a_bypassed_proxy() {
        let good = vec![
            run("D", &[("conntrack_max", 0), ("close_requests", 10)]),
            run(
                "I",
                &[
                    ("conntrack_max", 20),
                    ("close_requests", 10),
                    ("iptables_redirect_packets", 30),
                    ("proxy_forwarded_total", 12),
                ],
            ),
            run(
                "E",
                &[
                    ("conntrack_max", 0),
                    ("close_requests", 10),
                    ("ebpf_redirected", 12),
                    ("ebpf_orig_dst_answered", 12),
                    ("proxy_forwarded_total", 12),
                ],
            ),
            run(
                "EK",
                &[
                    ("close_requests", 10),
                    ("ebpf_redirected", 12),
                    ("ebpf_orig_dst_answered", 12),
                    ("proxy_forwarded_total", 12),
                    ("kfwd_on", 1),
                    ("kfwd_connections", 5),
                    ("kfwd_bytes", 4000),
                ],
            ),
            run(
                "H",
                &[
                    ("conntrack_max", 20),
                    ("close_requests", 10),
                    ("iptables_redirect_packets", 30),
                ],
            ),
            run(
                "EH",
                &[
                    ("conntrack_max", 0),
                    ("close_requests", 10),
                    ("ebpf_redirected", 12),
                    ("ebpf_orig_dst_answered", 12),
                ],
            ),
        ];
        assert!(violations(&good).is_empty(), "{:?}", violations(&good));
        let bad = vec![
            run(
                "E",
                &[
                    ("conntrack_max", 3),
                    ("close_requests", 10),
                    ("ebpf_redirected", 2),
                    ("ebpf_orig_dst_answered", 2),
                    ("proxy_forwarded_total", 2),
                ],
            ),
            run("H", &[("conntrack_max", 0), ("close_requests", 10)]),
            // Through the proxy, but the proxy copied every byte itself.
            run(
                "EK",
                &[
                    ("close_requests", 10),
                    ("ebpf_redirected", 12),
                    ("ebpf_orig_dst_answered", 12),
                    ("proxy_forwarded_total", 12),
                    ("kfwd_on", 1),
                    ("kfwd_connections", 0),
                    ("kfwd_bytes", 0),
                ],
            ),
            // Kernel forwarding refused at start, and the eBPF programs bypassed.
            run(
                "EK",
                &[
                    ("close_requests", 10),
                    ("ebpf_redirected", 0),
                    ("proxy_forwarded_total", 12),
                    ("kfwd_on", 0),
                ],
            ),
        ];
        let v = violations(&bad);
        // E: too few redirected, too few forwarded (its conntrack count is no check); H: no
        // conntrack entry, no REDIRECT packet; first EK: nothing carried by the kernel;
        // second EK: not redirected, no SO_ORIGINAL_DST, kernel forwarding off, nothing carried.
        assert_eq!(v.len(), 9, "{v:?}");
    }
}
