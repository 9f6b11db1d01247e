//! `cargo xtask test-kernels`: the kernel matrix. Each kernel of [`KERNELS`] (Debian packages,
//! fetched once into `target/kernels/`) boots in QEMU with TCG from an initramfs built here
//! (busybox, iproute2's `ip`, HAProxy, the release binaries and the kernel's own veth and
//! nf_conntrack modules), and its `/init` runs `icpt-kcheck` (tests/src/bin/icpt-kcheck.rs),
//! the data-path suite, whose report comes back over the second serial port. The result is a
//! table kernel x check and each program's verified instruction count per kernel.

mod fetch;
mod initramfs;
mod qemu;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::util;
pub use fetch::Pick;
use qemu::{GuestReport, Outcome};

/// A kernel of the matrix.
pub struct Spec {
    /// Its directory under target/kernels/ and its name for `--kernel`.
    pub label: &'static str,
    pub what: &'static str,
    pub pick: Pick,
    /// Part of the default matrix (the others run only when named with `--kernel`).
    pub default: bool,
    /// Below the minimum kernel: the guest checks that `interceptor check` names what is
    /// missing and that `attach` refuses, instead of the data path.
    pub below_minimum: bool,
}

/// The kernels: Debian 12's and Debian 13's, and the newest Debian builds (trixie-backports).
/// Debian 11's 5.10 is the proof of the lower bound: it lacks bpf_get_netns_cookie in sock_ops
/// (and in cgroup/getsockopt), so `interceptor check` must name that and `attach` must refuse,
/// attaching nothing. It is in the default matrix (about 25 s more): a refusal that was never
/// seen on a real old kernel is a refusal nobody knows works.
pub const KERNELS: &[Spec] = &[
    Spec {
        label: "debian12",
        what: "Debian 12 (bookworm), the newest 6.1 ABI",
        pick: Pick::Series("6.1"),
        default: true,
        below_minimum: false,
    },
    Spec {
        label: "debian13",
        what: "Debian 13 (trixie), the newest 6.12 ABI",
        pick: Pick::Series("6.12"),
        default: true,
        below_minimum: false,
    },
    Spec {
        label: "newest",
        what: "the newest Debian kernel (trixie-backports)",
        pick: Pick::Newest,
        default: true,
        below_minimum: false,
    },
    Spec {
        label: "debian11",
        what: "Debian 11 (bullseye), the newest 5.10 ABI: below the minimum",
        pick: Pick::Series("5.10"),
        default: true,
        below_minimum: true,
    },
];

/// Default hard limit of one guest (one takes 30-40 s here), so that three hung guests still
/// end the matrix within 12 minutes.
pub const DEFAULT_TIMEOUT_SECS: u64 = 240;

/// Options of `cargo xtask test-kernels`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Only these labels (default: all of [`KERNELS`]).
    pub only: Vec<String>,
    /// Look for newer packages than the ones cached in target/kernels/.
    pub refresh: bool,
    /// Hard limit of one guest, boot to power-off.
    pub timeout: Duration,
    /// Guests run at once.
    pub jobs: usize,
    /// Virtual CPUs per guest.
    pub cpus: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            only: Vec::new(),
            refresh: false,
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
            jobs: 1,
            cpus: 2,
        }
    }
}

/// Counts for the test suite's closing line: one per kernel x check.
pub struct Summary {
    pub passed: u64,
    pub failed: u64,
}

/// Runs the matrix and prints its tables.
pub fn run(opts: &Options) -> Result<Summary> {
    let started = Instant::now();
    if !util::is_root() {
        bail!("test-kernels needs root (apt-get download into target/, depmod)");
    }
    for tool in [
        "qemu-system-x86_64",
        "busybox",
        "ldd",
        "dpkg",
        "apt-get",
        "depmod",
        "modinfo",
        "xz",
    ] {
        initramfs::which(tool)?;
    }
    for o in &opts.only {
        if !KERNELS.iter().any(|k| k.label == o) {
            bail!(
                "--kernel {o}: no such kernel; the matrix has {}",
                KERNELS
                    .iter()
                    .map(|k| k.label)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let selected: Vec<&Spec> = KERNELS
        .iter()
        .filter(|k| {
            if opts.only.is_empty() {
                k.default
            } else {
                opts.only.iter().any(|o| o == k.label)
            }
        })
        .collect();

    let bins = util::Bins::locate(false);
    let rel = util::target_dir().join("release");
    let payload = initramfs::Payload {
        bins: vec![
            ("usr/bin/interceptor".into(), bins.interceptor.clone()),
            ("usr/bin/interceptor-proxy".into(), bins.proxy.clone()),
            ("usr/bin/icpt-probe".into(), bins.probe.clone()),
            ("usr/bin/icpt-exec".into(), bins.exec.clone()),
            ("usr/bin/icpt-kcheck".into(), rel.join("icpt-kcheck")),
            ("usr/bin/ip".into(), initramfs::which("ip")?),
            ("usr/sbin/haproxy".into(), initramfs::which("haproxy")?),
        ],
    };
    let root = fetch::cache_root();
    std::fs::create_dir_all(&root)?;
    let base = root.join("base.cpio");
    let t = Instant::now();
    initramfs::build_base(&payload, &base)?;
    println!(
        "kernels: initramfs {} ({} MiB, written in {:.1} s)",
        base.display(),
        std::fs::metadata(&base)?.len() >> 20,
        t.elapsed().as_secs_f64()
    );

    let mut kernels = Vec::new();
    for spec in &selected {
        let label = spec.label;
        let k = fetch::kernel(label, spec.pick, opts.refresh)?;
        println!(
            "kernels: {label}: {} {} ({}), release {}",
            k.package, k.version, spec.what, k.release
        );
        let initrd = root.join(label).join("initrd.cpio");
        initramfs::concat(&base, &k.modules_cpio, &initrd)?;
        kernels.push((label.to_string(), k, initrd, spec.below_minimum));
    }

    // Guests in parallel up to `jobs` (each TCG vCPU is a host thread).
    let mut reports: BTreeMap<String, GuestReport> = BTreeMap::new();
    for chunk in kernels.chunks(opts.jobs.max(1)) {
        let done: Vec<(String, Result<GuestReport>)> = std::thread::scope(|s| {
            let hs: Vec<_> = chunk
                .iter()
                .map(|(label, k, initrd, below_minimum)| {
                    let console = root.join(label).join("console.log");
                    s.spawn(move || {
                        let g = qemu::Guest {
                            label,
                            vmlinuz: &k.vmlinuz,
                            initrd,
                            console_log: &console,
                            memory_mib: 1024,
                            cpus: opts.cpus,
                            timeout: opts.timeout,
                            below_minimum: *below_minimum,
                        };
                        println!("kernels: [{label}] booting {} in QEMU (TCG)", k.release);
                        let mut rep = qemu::run(&g);
                        // A guest that stopped before announcing its plan never got to the
                        // suite (the kernel's boot under TCG, not the project's code): its
                        // console is shown, and it is booted once more.
                        if let Ok(r) = &rep {
                            if r.plan.is_empty() {
                                println!(
                                    "kernels: [{label}] stopped before its plan ({}); console tail:\n{}\nkernels: [{label}] booting it once more",
                                    r.problem.as_deref().unwrap_or("no reason given"),
                                    console_tail(&console, 20)
                                );
                                rep = qemu::run(&g);
                            }
                        }
                        if let Ok(r) = &rep {
                            if !r.finished {
                                println!(
                                    "kernels: [{label}] console tail:\n{}",
                                    console_tail(&console, 20)
                                );
                            }
                        }
                        // Rebuilt on every run from base.cpio and the kernel's modules.
                        let _ = std::fs::remove_file(initrd);
                        (label.clone(), rep)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("guest thread"))
                .collect()
        });
        for (label, r) in done {
            let rep = r.unwrap_or_else(|e| GuestReport {
                problem: Some(format!("{e:#}")),
                ..GuestReport::default()
            });
            reports.insert(label, rep);
        }
    }
    let summary = print_tables(&kernels, &reports);
    println!(
        "kernels: {} kernel(s) in {:.0} s: {} passed, {} failed",
        kernels.len(),
        started.elapsed().as_secs_f64(),
        summary.passed,
        summary.failed
    );
    Ok(summary)
}

/// The last `n` lines of a guest's console log (what its kernel printed before it stopped).
fn console_tail(path: &std::path::Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let text = String::from_utf8_lossy(&b);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..]
                .iter()
                .map(|l| format!("  | {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        Err(e) => format!("  (cannot read {}: {e})", path.display()),
    }
}

/// The kernel keeps 15 characters of a program's name: mark the cut ones.
fn full_name(prog: &str) -> String {
    if prog.len() >= 15 {
        format!("{prog}…")
    } else {
        prog.to_string()
    }
}

fn column(label: &str, k: &fetch::Kernel) -> String {
    format!("{label} {}", k.release)
}

/// The table kernel x check, the failures in full, and the verified instruction counts.
fn print_tables(
    kernels: &[(String, fetch::Kernel, PathBuf, bool)],
    reports: &BTreeMap<String, GuestReport>,
) -> Summary {
    let mut checks: Vec<String> = Vec::new();
    for (label, _, _, _) in kernels {
        for c in &reports[label].plan {
            if !checks.contains(c) {
                checks.push(c.clone());
            }
        }
    }
    if checks.is_empty() {
        // No guest got as far as its plan: one row says so.
        checks.push("boot".into());
    }
    let cols: Vec<String> = kernels.iter().map(|(l, k, _, _)| column(l, k)).collect();
    let w0 = checks.iter().map(String::len).max().unwrap_or(5).max(14);
    let widths: Vec<usize> = cols.iter().map(|c| c.len().max(8)).collect();
    println!("\nkernel matrix (QEMU TCG):\n");
    print!("{:<w0$}", "check");
    for (c, w) in cols.iter().zip(&widths) {
        print!("  {c:<w$}");
    }
    println!();
    let mut s = Summary {
        passed: 0,
        failed: 0,
    };
    let mut failures = Vec::new();
    for check in &checks {
        print!("{check:<w0$}");
        for ((label, _, _, _), w) in kernels.iter().zip(&widths) {
            let rep = &reports[label];
            if !rep.plan.is_empty() && !rep.plan.contains(check) {
                // Not part of this kernel's plan (the data path below the minimum, the
                // refusal above it): nothing to count.
                print!("  {:<w$}", "-");
                continue;
            }
            let (cell, why) = match rep.outcome(check) {
                Outcome::Pass => {
                    s.passed += 1;
                    let secs = rep.results.get(check).map_or(0.0, |r| r.1);
                    (format!("pass {secs:.1}s"), None)
                }
                Outcome::Fail(m) => ("FAIL".to_string(), Some(m)),
                Outcome::Skip(m) => ("skip".to_string(), Some(format!("not run: {m}"))),
                Outcome::NotRun(m) => ("not run".to_string(), Some(m)),
            };
            if let Some(why) = why {
                s.failed += 1;
                failures.push(format!("{label} {check}: {why}"));
            }
            print!("  {cell:<w$}");
        }
        println!();
    }
    print!("{:<w0$}", "guest time");
    for ((label, _, _, _), w) in kernels.iter().zip(&widths) {
        print!("  {:<w$}", format!("{:.0}s", reports[label].seconds));
    }
    println!();
    println!("\nkernel features `interceptor check` found missing:");
    for (label, _, _, _) in kernels {
        let m = reports[label].missing.as_deref().unwrap_or("none");
        println!("  {label}: {m}");
    }
    println!("\nkernel forwarding (the kfwd check's transfer through interceptor-proxy, byte counts from its /runtime):");
    for (label, _, _, _) in kernels {
        let k = reports[label].kfwd.as_deref().unwrap_or("not reported");
        println!("  {label}: {k}");
    }
    if !failures.is_empty() {
        println!("\nfailures:");
        for f in &failures {
            println!("  {f}");
        }
    }

    let mut links: Vec<(String, String)> = Vec::new();
    for (label, _, _, _) in kernels {
        for (link, (prog, _)) in &reports[label].insns {
            if !links.iter().any(|l| &l.0 == link) {
                links.push((link.clone(), prog.clone()));
            }
        }
    }
    if !links.is_empty() {
        println!("\nverified instructions per program (bpf_prog_info.verified_insns):\n");
        let lw = links
            .iter()
            .map(|(l, p)| l.len() + full_name(p).chars().count() + 3)
            .max()
            .unwrap_or(10);
        print!("{:<lw$}", "link (program)");
        for (c, w) in cols.iter().zip(&widths) {
            print!("  {c:<w$}");
        }
        println!();
        for (link, prog) in &links {
            print!("{:<lw$}", format!("{link} ({})", full_name(prog)));
            for ((label, _, _, _), w) in kernels.iter().zip(&widths) {
                let n = reports[label]
                    .insns
                    .get(link)
                    .and_then(|x| x.1)
                    .map_or("-".to_string(), |n| n.to_string());
                print!("  {n:<w$}");
            }
            println!();
        }
    }
    println!();
    s
}
