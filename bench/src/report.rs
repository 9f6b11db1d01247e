//! Statistics over repetitions, the terminal table, the targets of issue 4 and of issue 16
//! (kernel forwarding, EK), machine facts and the JSON document.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::workloads::RunResult;

/// A figure the table shows: key in `RunResult::figures`, label, and whether a ratio to
/// D is meaningful (the figure exists without a proxy).
pub struct Figure {
    pub key: &'static str,
    pub label: &'static str,
    pub vs_direct: bool,
}

pub const FIGURES: &[Figure] = &[
    Figure {
        key: "ka_rps",
        label: "keep-alive req/s",
        vs_direct: true,
    },
    Figure {
        key: "ka_p50_us",
        label: "keep-alive p50 (us)",
        vs_direct: true,
    },
    Figure {
        key: "ka_p99_us",
        label: "keep-alive p99 (us)",
        vs_direct: true,
    },
    Figure {
        key: "close_cps",
        label: "new conns/s",
        vs_direct: true,
    },
    Figure {
        key: "close_p50_us",
        label: "new conn p50 (us)",
        vs_direct: true,
    },
    Figure {
        key: "close_p99_us",
        label: "new conn p99 (us)",
        vs_direct: true,
    },
    Figure {
        key: "rate_p50_us",
        label: "fixed-rate p50 (us)",
        vs_direct: true,
    },
    Figure {
        key: "rate_p99_us",
        label: "fixed-rate p99 (us)",
        vs_direct: true,
    },
    Figure {
        key: "rate_p50_added_us",
        label: "fixed-rate p50 - D (us)",
        vs_direct: false,
    },
    Figure {
        key: "rate_p99_added_us",
        label: "fixed-rate p99 - D (us)",
        vs_direct: false,
    },
    Figure {
        key: "bulk_gbps",
        label: "bulk Gbit/s",
        vs_direct: true,
    },
    Figure {
        key: "proxy_cpu_ms_per_1k",
        label: "proxy CPU/1k ka req (ms)",
        vs_direct: false,
    },
    Figure {
        key: "proxy_wakeups_per_req",
        label: "proxy wake-ups/ka req",
        vs_direct: false,
    },
    Figure {
        key: "server_cpu_ms_per_1k",
        label: "nginx CPU/1k ka req (ms)",
        vs_direct: true,
    },
    Figure {
        key: "host_cpu_ms_per_1k",
        label: "host CPU/1k ka req (ms)*",
        vs_direct: true,
    },
    Figure {
        key: "proxy_cpu_us_per_conn",
        label: "proxy CPU/new conn (us)",
        vs_direct: false,
    },
    Figure {
        key: "proxy_cpu_ms_per_gb",
        label: "proxy CPU/GB bulk (ms)",
        vs_direct: false,
    },
    Figure {
        key: "idle_pss_per_conn",
        label: "idle conn proxy Pss (B)",
        vs_direct: false,
    },
    Figure {
        key: "idle_rss_per_conn",
        label: "idle conn proxy Rss (B)",
        vs_direct: false,
    },
    Figure {
        key: "idle_sys_per_conn",
        label: "idle conn host mem (B)*",
        vs_direct: false,
    },
    Figure {
        key: "kfwd_share_pct",
        label: "kernel-forwarded bytes %",
        vs_direct: false,
    },
    Figure {
        key: "conntrack_max",
        label: "conntrack entries (max)",
        vs_direct: false,
    },
];

/// Ratios computed within each repetition, then summarised.
pub const RATIOS: &[(&str, &str)] = &[
    ("I", "D"),
    ("E", "D"),
    ("EK", "D"),
    ("H", "D"),
    ("EH", "D"),
    ("E", "I"),
    ("E", "H"),
    ("EK", "H"),
    ("EK", "E"),
    ("EH", "H"),
    ("E", "EH"),
];

/// The modes in the order of the table's columns.
pub const MODES: &[&str] = &["D", "I", "E", "EK", "H", "EH"];

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// Summary of one thread configuration: D's runs plus the proxy modes' runs at it.
#[derive(Debug, Serialize)]
pub struct ConfigSummary {
    pub threads: String,
    pub description: String,
    /// Repetitions that ran at this configuration.
    pub reps: usize,
    /// figure -> mode -> spread of the absolute values.
    pub absolute: BTreeMap<String, BTreeMap<String, Spread>>,
    /// figure -> "E/D" etc. -> spread of the per-repetition ratios.
    pub ratios: BTreeMap<String, BTreeMap<String, Spread>>,
}

/// Value of `key` for `mode` in repetition `rep` at configuration `threads`
/// (D is shared by every configuration). Derived figures (`*_added_us`) are computed.
fn value(runs: &[RunResult], rep: u32, mode: &str, threads: &str, key: &str) -> Option<f64> {
    let find = |m: &str| {
        runs.iter()
            .find(|r| r.rep == rep && r.mode == m && (m == "D" || r.threads == threads))
    };
    if let Some(base) = key.strip_suffix("_added_us") {
        let k = format!("{base}_us");
        let a = *find(mode)?.figures.get(&k)?;
        let d = *find("D")?.figures.get(&k)?;
        return Some(a - d);
    }
    let r = find(mode)?;
    if key == "conntrack_max" {
        return r.checks.get("conntrack_max").map(|v| *v as f64);
    }
    r.figures.get(key).copied()
}

pub fn summarise(runs: &[RunResult], threads: &str, description: &str) -> ConfigSummary {
    let mut reps: Vec<u32> = runs
        .iter()
        .filter(|r| r.threads == threads)
        .map(|r| r.rep)
        .collect();
    reps.sort_unstable();
    reps.dedup();
    let mut absolute = BTreeMap::new();
    let mut ratios = BTreeMap::new();
    for f in FIGURES {
        let mut per_mode = BTreeMap::new();
        for m in MODES {
            let vals: Vec<f64> = reps
                .iter()
                .filter_map(|&rep| value(runs, rep, m, threads, f.key))
                .collect();
            if let Some(s) = spread(&vals) {
                per_mode.insert(m.to_string(), s);
            }
        }
        absolute.insert(f.key.to_string(), per_mode);
        // Differences, counts and the noisy whole-host memory (can be negative): no ratios.
        if f.key == "conntrack_max" || f.key == "idle_sys_per_conn" || f.key.ends_with("_added_us")
        {
            continue;
        }
        let mut per_ratio = BTreeMap::new();
        for (a, b) in RATIOS {
            if *b == "D" && !f.vs_direct {
                continue;
            }
            let vals: Vec<f64> = reps
                .iter()
                .filter_map(|&rep| {
                    let x = value(runs, rep, a, threads, f.key)?;
                    let y = value(runs, rep, b, threads, f.key)?;
                    (y != 0.0).then(|| x / y)
                })
                .collect();
            if let Some(s) = spread(&vals) {
                per_ratio.insert(format!("{a}/{b}"), s);
            }
        }
        ratios.insert(f.key.to_string(), per_ratio);
    }
    ConfigSummary {
        threads: threads.to_string(),
        description: description.to_string(),
        reps: reps.len(),
        absolute,
        ratios,
    }
}

/// Number with about three significant digits.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn cell(s: Option<&Spread>, show_spread: bool) -> String {
    match s {
        None => "-".into(),
        Some(s) if !show_spread || s.n < 2 => num(s.median),
        Some(s) => format!("{} ({}-{})", num(s.median), num(s.min), num(s.max)),
    }
}

pub fn table(sum: &ConfigSummary) -> String {
    let reps = sum.reps;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "== {} — {}; median of {reps} repetition(s), (min-max) ==",
        sum.threads, sum.description
    );
    // Columns of modes that ran at this configuration only.
    let modes: Vec<&str> = MODES
        .iter()
        .copied()
        .filter(|m| sum.absolute.values().any(|row| row.contains_key(*m)))
        .collect();
    let _ = write!(out, "{:<26}", "figure");
    for m in &modes {
        let _ = write!(out, "{m:>11}");
    }
    out.push('\n');
    for f in FIGURES {
        let row = &sum.absolute[f.key];
        if row.is_empty() {
            continue;
        }
        let _ = write!(out, "{:<26}", f.label);
        for m in &modes {
            let _ = write!(out, "{:>11}", cell(row.get(*m), false));
        }
        out.push('\n');
    }
    let ran = |(a, b): &&(&str, &str)| modes.contains(a) && modes.contains(b);
    let to_d: Vec<(&str, &str)> = RATIOS
        .iter()
        .filter(|r| r.1 == "D")
        .filter(ran)
        .copied()
        .collect();
    let other: Vec<(&str, &str)> = RATIOS
        .iter()
        .filter(|r| r.1 != "D")
        .filter(ran)
        .copied()
        .collect();
    for (title, cols) in [("ratio to D", &to_d), ("head to head", &other)] {
        if cols.is_empty() {
            continue;
        }
        let width = if reps >= 2 { 20 } else { 9 };
        let _ = write!(out, "\n{:<26}", title);
        for (a, b) in cols.iter() {
            let _ = write!(out, "{:>width$}", format!("{a}/{b}"));
        }
        out.push('\n');
        for f in FIGURES {
            let Some(row) = sum.ratios.get(f.key) else {
                continue;
            };
            if cols
                .iter()
                .all(|(a, b)| !row.contains_key(&format!("{a}/{b}")))
            {
                continue;
            }
            let _ = write!(out, "{:<26}", f.label);
            for (a, b) in cols.iter() {
                let c = cell(row.get(&format!("{a}/{b}")), reps >= 2);
                let _ = write!(out, "{c:>width$}");
            }
            out.push('\n');
        }
    }
    out
}

#[derive(Debug, Serialize)]
pub struct TargetResult {
    /// The issue that set the target (4: interception; 16: kernel forwarding).
    pub issue: u32,
    pub figure: String,
    pub threads: String,
    pub target: String,
    pub measured: Option<Spread>,
    pub pass: bool,
}

enum Cmp {
    AtLeast(f64),
    AtMost(f64),
}

/// The targets of issue 4 and of issue 16 item 7 (EK), evaluated on the medians. A target
/// whose modes did not run is left out.
pub fn targets(sums: &[ConfigSummary]) -> Vec<TargetResult> {
    let mut out = Vec::new();
    for s in sums {
        let ratio = |fig: &str, r: &str| s.ratios.get(fig).and_then(|m| m.get(r)).copied();
        let abs = |fig: &str, m: &str| s.absolute.get(fig).and_then(|x| x.get(m)).copied();
        let conntrack_zero = {
            let e = abs("conntrack_max", "E").map(|x| x.max);
            let eh = abs("conntrack_max", "EH").map(|x| x.max);
            match (e, eh) {
                (Some(a), Some(b)) => Some(Spread {
                    median: a.max(b),
                    min: a.min(b),
                    max: a.max(b),
                    n: 1,
                }),
                (Some(a), None) | (None, Some(a)) => Some(Spread {
                    median: a,
                    min: a,
                    max: a,
                    n: 1,
                }),
                _ => None,
            }
        };
        let mut rows: Vec<(u32, &str, Option<Spread>, Cmp, &str)> = vec![
            (
                4,
                "new conns/s, EH/H (interception alone)",
                ratio("close_cps", "EH/H"),
                Cmp::AtLeast(1.3),
                ">= 1.3",
            ),
            (
                4,
                "new conns/s, E/H",
                ratio("close_cps", "E/H"),
                Cmp::AtLeast(1.5),
                ">= 1.5",
            ),
            (
                4,
                "keep-alive req/s, E/EH (our proxy vs HAProxy)",
                ratio("ka_rps", "E/EH"),
                Cmp::AtLeast(1.0),
                ">= 1.0",
            ),
            (
                4,
                "added p50 latency at fixed rate, E - D (us)",
                abs("rate_p50_added_us", "E"),
                Cmp::AtMost(50.0),
                "<= 50",
            ),
            (
                4,
                "conntrack entries, E and EH (max)",
                conntrack_zero,
                Cmp::AtMost(0.0),
                "= 0",
            ),
            (
                4,
                "proxy memory per idle conn, E Pss (B)",
                abs("idle_pss_per_conn", "E"),
                Cmp::AtMost(4096.0),
                "<= 4096",
            ),
            (
                4,
                "proxy CPU per 1k keep-alive req, E (core-ms)",
                abs("proxy_cpu_ms_per_1k", "E"),
                Cmp::AtMost(20.0),
                "<= 20",
            ),
            // Issue 16 item 7: kernel forwarding (EK).
            (
                16,
                "keep-alive req/s, EK/D",
                ratio("ka_rps", "EK/D"),
                Cmp::AtLeast(0.8),
                ">= 0.8",
            ),
            (
                16,
                "bulk Gbit/s, EK/D",
                ratio("bulk_gbps", "EK/D"),
                Cmp::AtLeast(0.8),
                ">= 0.8",
            ),
            (
                16,
                "proxy CPU per 1k keep-alive req, EK (core-ms)",
                abs("proxy_cpu_ms_per_1k", "EK"),
                Cmp::AtMost(3.0),
                "<= 3",
            ),
            (
                16,
                "added p50 latency at fixed rate, EK - D (us)",
                abs("rate_p50_added_us", "EK"),
                Cmp::AtMost(20.0),
                "<= 20",
            ),
            (
                16,
                "new conns/s, EK/H",
                ratio("close_cps", "EK/H"),
                Cmp::AtLeast(1.5),
                ">= 1.5",
            ),
        ];
        if s.threads != "t1" {
            // "1 thread each" is the definition of the E/EH keep-alive target.
            rows.retain(|r| !r.1.starts_with("keep-alive req/s, E/EH"));
        }
        for (issue, figure, measured, cmp, target) in rows {
            let Some(m) = measured else {
                continue;
            };
            let pass = match cmp {
                Cmp::AtLeast(t) => m.median >= t,
                Cmp::AtMost(t) => m.median <= t,
            };
            out.push(TargetResult {
                issue,
                figure: figure.to_string(),
                threads: s.threads.clone(),
                target: target.to_string(),
                measured: Some(m),
                pass,
            });
        }
    }
    out
}

pub fn targets_table(t: &[TargetResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6}{:<48}{:>9}{:>26}{:>10}  result",
        "issue", "target", "threads", "measured (min-max)", "target"
    );
    for r in t {
        let _ = writeln!(
            out,
            "{:<6}{:<48}{:>9}{:>26}{:>10}  {}",
            r.issue,
            r.figure,
            r.threads,
            cell(r.measured.as_ref(), true),
            r.target,
            if r.pass { "PASS" } else { "FAIL" }
        );
    }
    out
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub host: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cores: usize,
    pub date_utc: String,
    pub git_commit: String,
    pub git_dirty: bool,
    pub tools: BTreeMap<String, String>,
    /// /proc/loadavg when the bench started: other load on the machine skews everything.
    pub loadavg_at_start: String,
    /// Programs attached at the cgroup2 root before the bench attached anything (another
    /// pin dir's sock_ops/getsockopt run for every socket, also in D, I and H).
    pub root_programs_at_start: Vec<String>,
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let s = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&s)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

pub fn machine(ws: &Path, proxy_bin: &Path) -> Machine {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let ws_s = ws.to_str().unwrap_or(".");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(ws_s)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let mut tools = BTreeMap::new();
    tools.insert("wrk".into(), first_line("wrk", &["-v"]));
    tools.insert("iperf3".into(), first_line("iperf3", &["--version"]));
    tools.insert("haproxy".into(), first_line("haproxy", &["-v"]));
    tools.insert("nginx".into(), first_line("nginx", &["-v"]));
    tools.insert("iptables".into(), first_line("iptables", &["-V"]));
    tools.insert("interceptor-proxy".into(), proxy_bin.display().to_string());
    Machine {
        host: read("/proc/sys/kernel/hostname"),
        kernel: read("/proc/sys/kernel/osrelease"),
        cpu_model,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        date_utc: now_utc(),
        git_commit: git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into()),
        git_dirty: git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty()),
        tools,
        loadavg_at_start: read("/proc/loadavg"),
        root_programs_at_start: root_programs(),
    }
}

/// `name (attach type)` of each program attached at the cgroup2 root.
pub fn root_programs() -> Vec<String> {
    std::panic::catch_unwind(|| {
        interceptor_tests::bpftool_cgroup_progs(&interceptor_tests::cgroup2_root())
    })
    .map(|v| {
        v.into_iter()
            .map(|p| format!("{} ({})", p.name, p.attach_type))
            .collect()
    })
    .unwrap_or_default()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for now (civil-from-days, no date crate needed).
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_median() {
        let s = spread(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(spread(&[1.0, 2.0]).unwrap().median, 1.5);
        assert!(spread(&[]).is_none());
    }

    #[test]
    fn ratios_within_a_repetition() {
        let mk = |rep, mode: &str, threads: &str, v: f64| {
            let mut r = RunResult {
                rep,
                mode: mode.into(),
                threads: threads.into(),
                ..Default::default()
            };
            r.figures.insert("close_cps".into(), v);
            r.figures.insert("rate_p50_us".into(), v);
            r
        };
        let runs = vec![
            mk(0, "D", "-", 100.0),
            mk(0, "E", "t1", 50.0),
            mk(1, "D", "-", 200.0),
            mk(1, "E", "t1", 120.0),
        ];
        let s = summarise(&runs, "t1", "");
        let r = s.ratios["close_cps"]["E/D"];
        assert_eq!((r.min, r.max), (0.5, 0.6));
        let added = s.absolute["rate_p50_added_us"]["E"];
        assert_eq!((added.min, added.max), (-80.0, -50.0));
    }

    #[test]
    fn kernel_forward_targets_only_when_ek_ran() {
        let mk = |mode: &str, threads: &str, ka: f64, cpu: f64| {
            let mut r = RunResult {
                rep: 0,
                mode: mode.into(),
                threads: threads.into(),
                ..Default::default()
            };
            r.figures.insert("ka_rps".into(), ka);
            r.figures.insert("proxy_cpu_ms_per_1k".into(), cpu);
            r
        };
        let mut runs = vec![mk("D", "-", 100.0, 0.0), mk("E", "t1", 50.0, 10.0)];
        let t = targets(&[summarise(&runs, "t1", "")]);
        assert!(t.iter().all(|t| t.issue == 4), "{t:?}");
        runs.push(mk("EK", "t1", 85.0, 2.5));
        let t = targets(&[summarise(&runs, "t1", "")]);
        let ek: Vec<_> = t.iter().filter(|t| t.issue == 16).collect();
        // keep-alive EK/D 0.85 >= 0.8 and 2.5 core-ms <= 3; the others have no figures.
        assert_eq!(ek.len(), 2, "{ek:?}");
        assert!(ek.iter().all(|t| t.pass), "{ek:?}");
        assert!(table(&summarise(&runs, "t1", "")).contains("EK/D"));
    }

    #[test]
    fn date_format() {
        let d = now_utc();
        assert_eq!(d.len(), 20);
        assert!(d.starts_with("20"));
    }
}
