//! `cargo xtask <command>`: machine setup, build, tests, demo and cleanup.
//!
//! | command | what it does |
//! |---|---|
//! | `setup` | checks/installs rust-src (nightly), the Debian packages, bpf-linker 0.13.0 (LLVM 22), mounts bpffs |
//! | `build` | `setup`, then `cargo build --release` (default members; embeds the eBPF object) |
//! | `test [-- ARGS]` | `setup`, `build`, `clean-stale`, then the whole test suite, one thread |
//! | `bench [ARGS]` | `setup`, `build`, `clean-stale`, then `target/release/interceptor-bench ARGS` (see bench/README.md) |
//! | `demo` | self-contained demo of interception in a throwaway netns + cgroup |
//! | `lint` | `setup` and cargo-deny, then `cargo fmt --check`, clippy `-D warnings` (host crates, and the eBPF crate for its target), `cargo deny check licenses bans sources` |
//! | `check-deploy` | only the deployment checks that `test` runs (manifests, units, configs) |
//! | `image [--tag T]` | static binaries, then `podman build` of the image (deploy/Containerfile, offline stage) |
//! | `clean-stale` | removes `icpt-t-*` netns, cgroups and pin dirs left by a crashed test run |
//! | `test-kernels` | the kernel matrix: the data-path suite in QEMU on Debian's 6.1, 6.12 and newest kernels, the refusal on 5.10 |
//! | `fuzz [--time SECS] [TARGET...]` | cargo-fuzz (installed if missing), builds the fuzz targets of `fuzz/` and runs each for SECS seconds |

mod bench;
mod demo;
mod deploy;
mod fuzz;
mod import_cycles;
mod kernels;
mod lint;
mod setup;
mod stale;
mod util;

use std::process::{exit, Command};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Project automation for the interceptor workspace"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check and install everything the build and the tests need (idempotent).
    Setup,
    /// Setup check, then `cargo build --release` of the workspace default members.
    Build,
    /// Setup, build, clean stale test state, run the whole test suite (`--test-threads=1`).
    Test {
        /// Skip setup and build; use the binaries already in target/release.
        #[arg(long)]
        no_build: bool,
        /// Extra arguments for the test binaries (after `--`), e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        extra: Vec<String>,
    },
    /// Setup, build, then show interception end to end in a throwaway netns and cgroup.
    Demo {
        /// Skip setup and build; use the binaries already built (target/release, or
        /// $INTERCEPTOR_BIN / $INTERCEPTOR_PROXY_BIN).
        #[arg(long)]
        no_build: bool,
    },
    /// Setup, build, then benchmark direct / iptables / eBPF interception with our proxy and
    /// HAProxy (`interceptor-bench`; arguments are passed through: --quick, --smoke, --out DIR, ...).
    #[command(disable_help_flag = true)]
    Bench {
        /// Skip setup and build; use the binaries already in target/release.
        #[arg(long)]
        no_build: bool,
        /// Arguments for interceptor-bench (e.g. --quick, --smoke, --out DIR, --help).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup (and cargo-deny), then the lint gate: rustfmt, clippy with warnings as errors
    /// on the host crates and on the eBPF crate for its target, cargo-deny's licence check.
    Lint,
    /// Remove netns, cgroups and bpffs pin dirs named `icpt-t-*` left by a crashed test run.
    CleanStale,
    /// The kernel matrix: boot Debian's 5.10, 6.1, 6.12 and newest kernels in QEMU (TCG) and run the
    /// data-path suite (icpt-kcheck) in each; prints kernel x check and verified instructions.
    TestKernels {
        /// Skip setup and build; use the binaries already in target/release.
        #[arg(long)]
        no_build: bool,
        /// Only this kernel (debian12, debian13, newest, debian11); repeatable.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Look for newer kernel packages than those cached in target/kernels/.
        #[arg(long)]
        refresh: bool,
        /// Hard limit per guest, boot to power-off, in seconds (a guest takes 30-40 s here).
        #[arg(long, default_value_t = kernels::DEFAULT_TIMEOUT_SECS)]
        timeout: u64,
        /// Guests run at once.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Virtual CPUs per guest.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
    },
    /// Build the cargo-fuzz targets (fuzz/, nightly; cargo-fuzz installed if missing) and run
    /// each for --time seconds from its seeds; a crash fails it and keeps the input.
    Fuzz {
        /// Seconds each target runs.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Only these targets (tls_sni, detect, routes_yaml, daemon_toml, upgrade_wire).
        targets: Vec<String>,
    },
    /// Only the deployment checks of `test` (kubernetes-validate, systemd-analyze verify,
    /// the example configs), with the binaries already in target/release.
    CheckDeploy,
    /// Cargo's runner for the suite's test binaries (`cargo xtask test` sets it): runs those of
    /// the packages in `ISOLATED_PACKAGES` in a network namespace of their own (loopback
    /// only, gone with them), the others as they are.
    #[command(hide = true)]
    TestRunner {
        /// The test binary and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// Build the container image offline: static binaries with this machine's toolchain, then
    /// `podman --storage-driver vfs build --target image-prebuilt -f deploy/Containerfile`.
    Image {
        /// Image tag.
        #[arg(long, default_value = "localhost/interceptor:0.1.0")]
        tag: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Build => setup::setup().and_then(|_| build()),
        Cmd::Test { no_build, extra } => test(no_build, &extra).map(|code| exit(code)),
        Cmd::TestRunner { cmd } => test_runner(&cmd),
        Cmd::Bench { no_build, args } => {
            // `--no-build` is ours wherever it appears; everything else is the bench's.
            let no_build = no_build || args.iter().any(|a| a == "--no-build");
            let args: Vec<String> = args.into_iter().filter(|a| a != "--no-build").collect();
            bench::bench(no_build, &args).map(|code| exit(code))
        }
        Cmd::Demo { no_build } => {
            if no_build {
                demo::demo()
            } else {
                setup::setup()
                    .and_then(|_| build())
                    .and_then(|_| demo::demo())
            }
        }
        Cmd::CheckDeploy => check_deploy().map(|code| exit(code)),
        Cmd::Fuzz { time, targets } => {
            fuzz::fuzz(time, &targets).map(|s| exit(i32::from(s.failed > 0)))
        }
        Cmd::Lint => setup::setup()
            .and_then(|_| setup::lint_tools())
            .and_then(|_| lint::lint()),
        Cmd::Image { tag } => setup::setup().and_then(|_| deploy::image(&tag)),
        Cmd::TestKernels {
            no_build,
            kernels,
            refresh,
            timeout,
            jobs,
            cpus,
        } => {
            let opts = kernels::Options {
                only: kernels,
                refresh,
                timeout: std::time::Duration::from_secs(timeout),
                jobs,
                cpus,
            };
            let prep = if no_build {
                Ok(())
            } else {
                setup::setup().and_then(|_| build())
            };
            prep.and_then(|_| kernels::run(&opts))
                .map(|s| exit(i32::from(s.failed > 0)))
        }
        Cmd::CleanStale => {
            let bins = util::Bins::locate(true);
            stale::clean_stale(bins.interceptor_if_built().as_deref());
            Ok(())
        }
    };
    if let Err(e) = res {
        eprintln!("xtask: error: {e:#}");
        exit(1);
    }
}

/// `cargo build --release` at the workspace root (default members).
pub(crate) fn build() -> Result<()> {
    let ws = util::workspace_root();
    println!("build: cargo build --release (in {})", ws.display());
    let st = Command::new(util::cargo())
        .arg("build")
        .arg("--release")
        .current_dir(&ws)
        .status()?;
    if !st.success() {
        bail!("cargo build --release failed ({st})");
    }
    Ok(())
}

/// `cargo xtask check-deploy`; returns the exit code.
fn check_deploy() -> Result<i32> {
    let bins = util::Bins::locate(true);
    let (i, p) = (bins.require(&bins.interceptor)?, bins.require(&bins.proxy)?);
    let (passed, failed) = deploy::checks(&i, &p);
    println!("deploy checks: {passed} passed, {failed} failed");
    Ok(i32::from(failed > 0))
}

/// The packages whose test binaries open sockets in the network namespace they start in (the
/// proxy's own tests: listeners, upstreams and clients on 127.0.0.1 and `::1`) instead of
/// namespaces they create: [`test_runner`] runs them in a namespace of their own, so that
/// nothing they open is in the host's.
const ISOLATED_PACKAGES: [&str; 1] = ["interceptor-proxy"];

/// `cargo xtask test-runner BIN ARGS...`, cargo's runner for the suite (it sets
/// `CARGO_PKG_NAME` for each test binary): a binary of [`ISOLATED_PACKAGES`] gets a new
/// network namespace with loopback up (`unshare(CLONE_NEWNET)`; it goes when the binary and
/// its children exit), then is executed in place of this process; any other is executed as
/// it is.
fn test_runner(cmd: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let pkg = std::env::var("CARGO_PKG_NAME").unwrap_or_default();
    if ISOLATED_PACKAGES.contains(&pkg.as_str()) {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| {
            format!("a network namespace for the tests of {pkg} (unshare; run as root)")
        })?;
        util::run_ok("ip", &["link", "set", "lo", "up"])?;
    }
    let err = Command::new(&cmd[0]).args(&cmd[1..]).exec();
    Err(err).with_context(|| format!("running test binary {}", cmd[0]))
}

/// Cargo's environment variable for the runner of this host's target (`x86_64` and the like,
/// Linux with glibc: where the suite runs).
fn runner_env() -> String {
    format!(
        "CARGO_TARGET_{}_UNKNOWN_LINUX_GNU_RUNNER",
        std::env::consts::ARCH.to_uppercase()
    )
}

/// The packages whose tests `cargo xtask test` runs (every workspace member but the eBPF
/// crate, which builds only for its own target, and the bench, whose smoke runs apart).
const TEST_PACKAGES: [&str; 8] = [
    "interceptor-common",
    "interceptor",
    "interceptor-daemon",
    "interceptor-cli",
    "interceptor-proxy",
    "interceptor-tests",
    "interceptor-hostops",
    "xtask",
];

/// Seconds each fuzz target runs in the whole suite.
const FUZZ_SMOKE_SECS: u64 = 30;

/// Runs the suite; returns the test exit code.
fn test(no_build: bool, extra: &[String]) -> Result<i32> {
    if !no_build {
        setup::setup()?;
        build()?;
    }
    let bins = util::Bins::locate(false);
    let interceptor = bins.require(&bins.interceptor)?;
    let proxy = bins.require(&bins.proxy)?;
    stale::clean_stale(Some(&interceptor));
    // Tests that cannot run a part here (no IPv6, not root) write it to this log, so the
    // closing line counts it as skipped instead of passed (hostops::skip).
    let skip_log = util::target_dir().join(format!("icpt-skips-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&skip_log);
    let mut cmd = Command::new(util::cargo());
    cmd.env(hostops::skip::SKIP_LOG_ENV, &skip_log);
    cmd.current_dir(util::workspace_root())
        // Every test binary runs even when an earlier one failed: the closing line then counts
        // the whole suite, not the part before the first failure.
        .args(["test", "--release", "--no-fail-fast"])
        .args(TEST_PACKAGES.iter().flat_map(|p| ["-p", p]))
        .args(["--", "--test-threads=1"])
        .args(extra)
        .env("INTERCEPTOR_BIN", &interceptor)
        .env("INTERCEPTOR_PROXY_BIN", &proxy);
    // The proxy's own tests run in a network namespace of their own (`test_runner`). Cargo
    // splits the runner at whitespace: a path with a space runs them as they are, and says so.
    let me = std::env::current_exe().context("the path of this xtask binary")?;
    match me.to_str() {
        Some(path) if !path.contains(char::is_whitespace) => {
            cmd.env(runner_env(), format!("{path} test-runner"));
        }
        _ => println!(
            "test: {} has a space in its path: the tests of {} run in this network namespace",
            me.display(),
            ISOLATED_PACKAGES.join(", ")
        ),
    }
    println!(
        "test: INTERCEPTOR_BIN={} INTERCEPTOR_PROXY_BIN={} cargo test --release --no-fail-fast {} -- --test-threads=1 {}",
        interceptor.display(),
        proxy.display(),
        TEST_PACKAGES.map(|p| format!("-p {p}")).join(" "),
        extra.join(" ")
    );
    // Stream cargo's output and add up its per-binary results: the suite ends with one plain
    // "N passed, N failed" line, not with the last binary's (often doc-test) summary.
    cmd.stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (mut passed, mut failed, mut ignored, mut filtered) = (0u64, 0u64, 0u64, 0u64);
    let mut panics = PanicDigest::default();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        panics.feed(&line);
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                if let Some(n) = part.trim().strip_suffix(" filtered out") {
                    filtered += n.trim().parse::<u64>().unwrap_or(0);
                    continue;
                }
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(n) = n.parse::<u64>() else { continue };
                match what {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    let st = child.wait()?;
    let mut code = st.code().unwrap_or(1);
    if !st.success() && failed == 0 {
        // cargo failed without a failing test: the tests did not build or a binary crashed.
        println!("\ntest: cargo test failed ({st}) without a failing test (see the errors above)");
        failed += 1;
    }
    let skips = hostops::skip::read_log(&skip_log)
        .with_context(|| format!("reading the skip log {}", skip_log.display()))?;
    let _ = std::fs::remove_file(&skip_log);
    if !skips.is_empty() {
        println!(
            "
test: {} part(s) could not run here and are counted as skipped:",
            skips.len()
        );
        for s in &skips {
            println!("  skipped: {s}");
        }
        ignored += skips.len() as u64;
    }
    if !extra.is_empty() {
        println!(
            "
test: a filtered run ({}): left out the bench smoke, the deployment checks, the kernel matrix, the fuzz smoke, and {filtered} test(s) that did not match",
            extra.join(" ")
        );
    }
    // The bench smoke (orderings and conntrack zeros only) is part of the whole suite; a
    // filtered run (extra arguments) skips it.
    if extra.is_empty() {
        println!("\ntest: bench smoke (cargo xtask bench --smoke)");
        let smoke = bench::bench(true, &["--smoke".to_string()])?;
        if smoke == 0 {
            passed += 1;
        } else {
            failed += 1;
            code = if code == 0 { smoke } else { code };
        }
    }
    // The deployment files' checks (manifests, units, configs), also whole-suite only.
    if extra.is_empty() {
        println!("\ntest: deployment checks (deploy/)");
        let (p, f) = deploy::checks(&interceptor, &proxy);
        passed += p;
        failed += f;
        if f > 0 && code == 0 {
            code = 1;
        }
    }
    // The kernel matrix (QEMU guests, about 2 minutes), also whole-suite only: one check per
    // kernel x check.
    if extra.is_empty() {
        println!("\ntest: kernel matrix (cargo xtask test-kernels)");
        let (p, f) = match kernels::run(&kernels::Options::default()) {
            Ok(s) => (s.passed, s.failed),
            Err(e) => {
                println!("test: kernel matrix FAILED: {e:#}");
                (0, 1)
            }
        };
        passed += p;
        failed += f;
        if f > 0 && code == 0 {
            code = 1;
        }
    }
    // The fuzz targets, 30 s each (about 2.5 minutes plus their build), also whole-suite
    // only: one check per target.
    if extra.is_empty() {
        println!("\ntest: fuzz smoke (cargo xtask fuzz --time {FUZZ_SMOKE_SECS})");
        let (p, f) = match fuzz::fuzz(FUZZ_SMOKE_SECS, &[]) {
            Ok(s) => (s.passed, s.failed),
            Err(e) => {
                println!("test: fuzz smoke FAILED: {e:#}");
                (0, 1)
            }
        };
        passed += p;
        failed += f;
        if f > 0 && code == 0 {
            code = 1;
        }
    }
    panics.print();
    println!("\nsuite: {passed} passed, {failed} failed, {ignored} skipped");
    Ok(code)
}

/// The first lines of each test's panic, gathered from cargo's output and printed again just
/// before the suite's last line: a failing test's message is otherwise somewhere in
/// thousands of lines (its processes' output tails follow it), far from the end that a CI
/// log's reader (or a truncated copy of it) sees first.
#[derive(Default)]
struct PanicDigest {
    done: Vec<Vec<String>>,
    open: Option<Vec<String>>,
}

impl PanicDigest {
    /// Lines kept of one panic (its "thread ... panicked at" line and the message's first).
    const LINES: usize = 6;
    /// Characters kept of one line.
    const WIDTH: usize = 400;
    /// Panics listed.
    const MAX: usize = 20;

    fn feed(&mut self, line: &str) {
        if line.starts_with("thread '") && line.contains("panicked at") {
            self.close();
            self.open = Some(vec![Self::clip(line)]);
            return;
        }
        let Some(lines) = self.open.as_mut() else {
            return;
        };
        let ends = line.trim().is_empty()
            || line.starts_with("stack backtrace:")
            || line.starts_with("note: ")
            || line.starts_with("---- ");
        if ends {
            self.close();
        } else {
            lines.push(Self::clip(line));
            if lines.len() >= Self::LINES {
                self.close();
            }
        }
    }

    fn close(&mut self) {
        if let Some(lines) = self.open.take() {
            if self.done.len() < Self::MAX {
                self.done.push(lines);
            }
        }
    }

    fn clip(line: &str) -> String {
        match line.char_indices().nth(Self::WIDTH) {
            Some((i, _)) => format!("{} [...]", &line[..i]),
            None => line.to_string(),
        }
    }

    fn print(mut self) {
        self.close();
        if self.done.is_empty() {
            return;
        }
        println!("\ntest: the panics above, their first lines:");
        for lines in &self.done {
            for (i, l) in lines.iter().enumerate() {
                println!("{}{l}", if i == 0 { "  " } else { "    " });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PanicDigest;

    #[test]
    fn the_digest_keeps_each_panics_first_lines_and_nothing_else() {
        let mut d = PanicDigest::default();
        for l in [
            "running 2 tests",
            "---- a stdout ----",
            "thread 'a' (7) panicked at tests/x.rs:1:5:",
            "assertion `left == right` failed: counted",
            "  left: 1",
            " right: 2",
            "stack backtrace:",
            "   0: frame",
            "---- b stdout ----",
            "some output",
            "thread 'b' (8) panicked at tests/y.rs:2:5:",
            "byte totals",
            "",
            "{\"round\":1}",
        ] {
            d.feed(l);
        }
        d.close();
        assert_eq!(
            d.done,
            [
                vec![
                    "thread 'a' (7) panicked at tests/x.rs:1:5:",
                    "assertion `left == right` failed: counted",
                    "  left: 1",
                    " right: 2",
                ],
                vec!["thread 'b' (8) panicked at tests/y.rs:2:5:", "byte totals"],
            ]
        );
        let long = "x".repeat(1000);
        assert_eq!(PanicDigest::clip(&long).len(), PanicDigest::WIDTH + 6);
    }
}
