//! One guest: QEMU with TCG (KVM does not work on these machines), the kernel and the
//! initrd, two serial ports (console to a file, the suite's report to QEMU's stdout), a hard
//! timeout, and the report parsed into per-check results.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The outcome of one check in one guest.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Pass,
    Fail(String),
    /// Not run because a check it needs failed (the guest says which).
    Skip(String),
    /// The guest never reported it (it crashed, hung or timed out first).
    NotRun(String),
}

/// What one guest reported.
#[derive(Debug, Default)]
pub struct GuestReport {
    /// Checks in the order the guest announced them (`KC plan`).
    pub plan: Vec<String>,
    pub results: BTreeMap<String, (Outcome, f64)>,
    /// Link name -> (program name, verified instructions).
    pub insns: BTreeMap<String, (String, Option<u64>)>,
    pub release: Option<String>,
    /// The kernel features `interceptor check` found missing (`KC info missing ...`).
    pub missing: Option<String>,
    /// What the `kfwd` check saw of kernel forwarding (`KC info kfwd ...`).
    pub kfwd: Option<String>,
    pub finished: bool,
    /// Why the guest ended early, if it did.
    pub problem: Option<String>,
    pub seconds: f64,
}

impl GuestReport {
    /// Outcome of `check`; a check the guest planned but never reported is `NotRun`.
    pub fn outcome(&self, check: &str) -> Outcome {
        match self.results.get(check) {
            Some((o, _)) => o.clone(),
            None => Outcome::NotRun(
                self.problem
                    .clone()
                    .unwrap_or_else(|| "the guest did not report it".into()),
            ),
        }
    }

    fn line(&mut self, line: &str) {
        let mut w = line.splitn(3, ' ');
        let (Some("KC"), Some(kind)) = (w.next(), w.next()) else {
            return;
        };
        let rest = w.next().unwrap_or("");
        match kind {
            "plan" => self.plan = rest.split_whitespace().map(str::to_string).collect(),
            "info" => {
                if let Some(r) = rest.strip_prefix("release ") {
                    self.release = Some(r.trim().to_string());
                }
                if let Some(m) = rest.strip_prefix("missing ") {
                    self.missing = Some(m.trim().to_string());
                }
                if let Some(k) = rest.strip_prefix("kfwd ") {
                    self.kfwd = Some(k.trim().to_string());
                }
            }
            "check" => {
                let mut f = rest.splitn(4, ' ');
                let (Some(name), Some(st), Some(secs)) = (f.next(), f.next(), f.next()) else {
                    return;
                };
                let msg = f.next().unwrap_or("").to_string();
                let secs = secs.parse().unwrap_or(0.0);
                let o = match st {
                    "pass" => Outcome::Pass,
                    "skip" => Outcome::Skip(msg),
                    _ => Outcome::Fail(msg),
                };
                self.results.insert(name.to_string(), (o, secs));
            }
            "insns" => {
                let f: Vec<&str> = rest.split_whitespace().collect();
                if let [link, prog, n] = f[..] {
                    self.insns
                        .insert(link.to_string(), (prog.to_string(), n.parse().ok()));
                }
            }
            "end" => self.finished = true,
            _ => {}
        }
    }
}

pub struct Guest<'a> {
    pub label: &'a str,
    pub vmlinuz: &'a Path,
    pub initrd: &'a Path,
    pub console_log: &'a Path,
    pub memory_mib: u32,
    pub cpus: u32,
    pub timeout: Duration,
    /// A kernel below the minimum: `icpt.below_minimum` on its command line makes the guest
    /// run the refusal plan.
    pub below_minimum: bool,
}

/// Boots the guest, streams its report (each line echoed with the label), and returns it.
/// The guest is killed at `timeout`.
pub fn run(g: &Guest<'_>) -> Result<GuestReport> {
    let start = Instant::now();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max"])
        .args(["-m", &g.memory_mib.to_string()])
        .args(["-smp", &g.cpus.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(g.vmlinuz)
        .arg("-initrd")
        .arg(g.initrd)
        // panic=-1: a kernel panic reboots at once, which -no-reboot turns into QEMU's exit.
        // no_timer_check: under host load TCG's emulated 8254 can miss the kernel's early
        // IO-APIC timer test, and 5.10 then panics at boot ("IO-APIC + timer doesn't work",
        // seen here); the check is for real hardware, VMs are booted without it.
        .args([
            "-append",
            if g.below_minimum {
                "console=ttyS0 panic=-1 quiet no_timer_check icpt.below_minimum"
            } else {
                "console=ttyS0 panic=-1 quiet no_timer_check"
            },
        ])
        .arg("-serial")
        .arg(format!("file:{}", g.console_log.display()))
        .args(["-serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("cannot start qemu-system-x86_64 (run `cargo xtask setup`)")?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let mut rep = GuestReport::default();
    let deadline = start + g.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                if let Some(l) = line.find("KC ").map(|i| &line[i..]) {
                    rep.line(l);
                    if l.starts_with("KC check ") || l.starts_with("KC end") {
                        println!("kernels: [{}] {}", g.label, &l[3..]);
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            rep.problem = Some(format!(
                "the guest was killed at its {} s timeout",
                g.timeout.as_secs()
            ));
            break;
        }
    }
    let status = child.wait()?;
    let qemu_err = err_reader.join().unwrap_or_default();
    rep.seconds = start.elapsed().as_secs_f64();
    if rep.problem.is_none() && !rep.finished {
        rep.problem = Some(format!(
            "the guest stopped before the end of the suite (qemu {status}{}); see {}",
            if qemu_err.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", qemu_err.trim())
            },
            g.console_log.display()
        ));
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_report() {
        let mut r = GuestReport::default();
        for l in [
            "KC plan boot attach out-v4",
            "KC info release 6.1.0-57-cloud-amd64",
            "KC check boot pass 1.20",
            "KC check attach fail 3.00 verifier: R1 invalid mem access | more",
            "KC check out-v4 skip 0.00 needs attach",
            "KC insns connect4 redirect_connec 812",
            "KC insns sk_lookup steer_inbound -",
            "KC info kfwd on bytes=16 connections=1 fallbacks=0 uncut=0 of 2x8",
            "KC end 1 1 1",
        ] {
            r.line(l);
        }
        assert_eq!(r.plan, ["boot", "attach", "out-v4"]);
        assert_eq!(r.release.as_deref(), Some("6.1.0-57-cloud-amd64"));
        assert_eq!(
            r.kfwd.as_deref(),
            Some("on bytes=16 connections=1 fallbacks=0 uncut=0 of 2x8")
        );
        assert_eq!(r.outcome("boot"), Outcome::Pass);
        assert_eq!(
            r.outcome("attach"),
            Outcome::Fail("verifier: R1 invalid mem access | more".into())
        );
        assert_eq!(r.outcome("out-v4"), Outcome::Skip("needs attach".into()));
        assert!(matches!(r.outcome("detach"), Outcome::NotRun(_)));
        assert_eq!(r.insns["connect4"], ("redirect_connec".into(), Some(812)));
        assert_eq!(r.insns["sk_lookup"].1, None);
        assert!(r.finished);
    }
}
