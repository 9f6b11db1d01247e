//! `cargo xtask fuzz [--time SECS] [TARGET...]`: builds the cargo-fuzz targets of `fuzz/`
//! (their own workspace, nightly) and runs each for SECS seconds from its committed seeds
//! (`fuzz/seeds/TARGET`), growing a working corpus in `fuzz/corpus/TARGET` (not committed).
//! A crash, a panic, a timeout or an out-of-memory leaves its input in
//! `fuzz/artifacts/TARGET/` and fails the target.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{run_capture, workspace_root};

/// The fuzz targets (fuzz/fuzz_targets/*.rs), each a parser fed by untrusted or operator input.
pub const TARGETS: &[(&str, &str)] = &[
    (
        "tls_sni",
        "the SNI of a TLS ClientHello (routing/detect.rs)",
    ),
    (
        "detect",
        "protocol detection from the first bytes (routing/detect.rs)",
    ),
    (
        "routes_yaml",
        "the routes file, parsed and compiled (routing/reload.rs)",
    ),
    (
        "daemon_toml",
        "the daemon's config file (interceptor-daemon config.rs)",
    ),
    (
        "upgrade_wire",
        "the proxy upgrade's messages as received (upgrade/wire.rs)",
    ),
    (
        "dubbo_frame",
        "Dubbo 2 frames and request bodies as a DUBBO port reads them (routing/dubbo/mod.rs)",
    ),
    (
        "hessian2",
        "Hessian 2 values of a Dubbo body (routing/dubbo/hessian.rs)",
    ),
];

/// The cargo-fuzz this project is checked with.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// What one target's run showed.
#[derive(Debug, Default)]
pub struct Run {
    pub target: String,
    pub ok: bool,
    pub execs: u64,
    pub cov: u64,
    pub ft: u64,
    pub corpus: u64,
    /// Executions per second over the run (libFuzzer's `Done N runs in S second(s)`).
    pub exec_per_sec: u64,
    pub seconds: f64,
    /// The input that failed it, and why.
    pub finding: Option<String>,
}

/// `cargo +nightly` with the environment `cargo run` gave the xtask removed (its CARGO_*,
/// LD_LIBRARY_PATH, the stable toolchain's RUSTUP_TOOLCHAIN), so that a build from here and
/// one from a shell (`cargo +nightly fuzz run` by hand) see the same environment and do not
/// rebuild each other's dependencies.
fn nightly_cargo() -> Command {
    let mut c = Command::new("cargo");
    c.arg("+nightly");
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        let scrub = (k.starts_with("CARGO") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k.starts_with("RUSTDOC")
            || matches!(k, "RUSTFLAGS" | "RUSTUP_TOOLCHAIN" | "LD_LIBRARY_PATH");
        if scrub {
            c.env_remove(k);
        }
    }
    c
}

/// Installs cargo-fuzz when it is missing (`setup` style: one line, the command on failure).
pub fn ensure_cargo_fuzz() -> Result<()> {
    let present = || {
        run_capture(
            nightly_cargo().args(["fuzz", "--version"]),
            Duration::from_secs(30),
        )
        .is_ok_and(|o| o.status.success())
    };
    if present() {
        println!("setup: {:<30} ok", "cargo-fuzz");
        return Ok(());
    }
    let cmd = format!("cargo +nightly install cargo-fuzz --version {CARGO_FUZZ_VERSION} --locked");
    println!("setup: building cargo-fuzz {CARGO_FUZZ_VERSION} (about two minutes)");
    let mut c = nightly_cargo();
    c.args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ])
    .current_dir(std::env::temp_dir());
    if c.status().is_ok_and(|s| s.success()) && present() {
        println!("setup: {:<30} installed", "cargo-fuzz");
        Ok(())
    } else {
        println!("setup: {:<30} FAILED: run {cmd}", "cargo-fuzz");
        bail!("setup: cargo-fuzz is missing; run the command above")
    }
}

/// Arguments every build and run shares, so `run` never rebuilds with other flags: cargo-fuzz's
/// default build (release with debug assertions and overflow checks) without a sanitizer (the
/// parsers are safe Rust; AddressSanitizer would halve the executions looking for memory
/// errors safe code cannot make).
const BUILD_ARGS: &[&str] = &["--sanitizer", "none"];

/// Builds the targets; returns the seconds it took.
pub fn build(targets: &[String]) -> Result<f64> {
    let start = Instant::now();
    for t in targets {
        let st = nightly_cargo()
            .args(["fuzz", "build"])
            .args(BUILD_ARGS)
            .arg(t)
            // The loader's build script would build the kernel programs; the fuzz targets
            // never load them.
            .env("AYA_BUILD_SKIP", "1")
            .current_dir(workspace_root())
            .status()
            .context("cannot run cargo +nightly fuzz")?;
        if !st.success() {
            bail!("cargo +nightly fuzz build {t} failed ({st})");
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Parses libFuzzer's status lines (`#123 DONE cov: 45 ft: 67 corp: 8/1Kb ...`) and final
/// stats (`stat::number_of_executed_units: 123`).
fn parse_line(r: &mut Run, line: &str) {
    if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
        r.execs = n.trim().parse().unwrap_or(r.execs);
        return;
    }
    // `Done 123 runs in 6 second(s)`: the rate over the whole run.
    if let Some(rest) = line.strip_prefix("Done ") {
        let w: Vec<&str> = rest.split_whitespace().collect();
        if let [n, "runs", "in", secs, ..] = w[..] {
            if let (Ok(n), Ok(secs)) = (n.parse::<u64>(), secs.parse::<u64>()) {
                r.exec_per_sec = n / secs.max(1);
            }
        }
        return;
    }
    if !line.starts_with('#') {
        return;
    }
    let mut words = line.split_whitespace();
    let execs = words.next().and_then(|w| w[1..].parse().ok());
    let mut prev = "";
    for w in words {
        match prev {
            "cov:" => r.cov = w.parse().unwrap_or(r.cov),
            "ft:" => r.ft = w.parse().unwrap_or(r.ft),
            "corp:" => {
                r.corpus = w
                    .split('/')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(r.corpus)
            }
            _ => {}
        }
        prev = w;
    }
    if let Some(n) = execs {
        r.execs = r.execs.max(n);
    }
}

/// Runs one built target for `secs` seconds.
pub fn run_target(target: &str, secs: u64) -> Result<Run> {
    let root = workspace_root();
    let corpus = root.join("fuzz/corpus").join(target);
    let seeds = root.join("fuzz/seeds").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("mkdir {}", corpus.display()))?;
    let start = Instant::now();
    let mut child = nightly_cargo()
        .args(["fuzz", "run"])
        .args(BUILD_ARGS)
        .arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .args(["-print_final_stats=1", "-timeout=10", "-rss_limit_mb=2048"])
        .env("AYA_BUILD_SKIP", "1")
        .current_dir(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run cargo +nightly fuzz")?;
    let mut r = Run {
        target: target.to_string(),
        ..Run::default()
    };
    let mut tail: Vec<String> = Vec::new();
    let stderr = child.stderr.take().expect("piped");
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        parse_line(&mut r, &line);
        if line.contains("Test unit written to") || line.contains("panicked at") {
            tail.push(line.trim().to_string());
        }
        if line.starts_with("==") || line.contains("ERROR: libFuzzer") {
            tail.push(line.trim().to_string());
        }
    }
    let st = child.wait()?;
    r.seconds = start.elapsed().as_secs_f64();
    r.ok = st.success();
    if !r.ok {
        r.finding = Some(if tail.is_empty() {
            format!("exit status {st}")
        } else {
            tail.join(" | ")
        });
    }
    Ok(r)
}

/// Counts for the test suite's closing line: one per target.
pub struct Summary {
    pub passed: u64,
    pub failed: u64,
}

/// `cargo xtask fuzz`: checks cargo-fuzz, builds, runs each target, prints a table.
pub fn fuzz(secs: u64, only: &[String]) -> Result<Summary> {
    for t in only {
        if !TARGETS.iter().any(|(n, _)| n == t) {
            bail!(
                "fuzz target {t:?}: no such target; the targets are {}",
                TARGETS.iter().map(|t| t.0).collect::<Vec<_>>().join(", ")
            );
        }
    }
    if secs == 0 {
        bail!("--time 0: give the seconds each target runs (e.g. --time 30)");
    }
    ensure_cargo_fuzz()?;
    let targets: Vec<String> = if only.is_empty() {
        TARGETS.iter().map(|t| t.0.to_string()).collect()
    } else {
        only.to_vec()
    };
    println!(
        "fuzz: building {} target(s) (cargo +nightly fuzz build)",
        targets.len()
    );
    let build_secs = build(&targets)?;
    println!("fuzz: built in {build_secs:.0} s");
    let mut runs = Vec::new();
    for t in &targets {
        println!("fuzz: {t}: running {secs} s");
        let r = run_target(t, secs)?;
        println!(
            "fuzz: {t}: {} ({} execs, cov {}, ft {}, corpus {})",
            if r.ok { "ok" } else { "FAILED" },
            r.execs,
            r.cov,
            r.ft,
            r.corpus
        );
        runs.push(r);
    }
    println!("\nfuzz targets ({secs} s each; build {build_secs:.0} s):\n");
    println!(
        "{:<14} {:>12} {:>8} {:>8} {:>8} {:>8}  result",
        "target", "execs", "exec/s", "cov", "ft", "corpus"
    );
    let mut s = Summary {
        passed: 0,
        failed: 0,
    };
    for r in &runs {
        println!(
            "{:<14} {:>12} {:>8} {:>8} {:>8} {:>8}  {}",
            r.target,
            r.execs,
            r.exec_per_sec,
            r.cov,
            r.ft,
            r.corpus,
            match &r.finding {
                None => "no finding".to_string(),
                Some(f) => format!("FINDING: {f}"),
            }
        );
        if r.ok {
            s.passed += 1;
        } else {
            s.failed += 1;
        }
    }
    let artifacts: PathBuf = workspace_root().join("fuzz/artifacts");
    if s.failed > 0 {
        println!(
            "\nfuzz: the failing inputs are in {} (replay: cargo +nightly fuzz run -s none -a TARGET FILE)",
            artifacts.display()
        );
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_status() {
        let mut r = Run::default();
        parse_line(
            &mut r,
            "#1048576 DONE   cov: 812 ft: 2301 corp: 244/19Kb lim: 4096 exec/s: 34952 rss: 61Mb",
        );
        parse_line(&mut r, "stat::number_of_executed_units: 1048577");
        assert_eq!(
            (r.execs, r.cov, r.ft, r.corpus),
            (1_048_577, 812, 2301, 244)
        );
        parse_line(&mut r, "INFO: Seed: 123");
        assert_eq!(r.cov, 812);
    }
}
