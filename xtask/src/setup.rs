//! `cargo xtask setup`: make a Debian 12 machine ready. Idempotent; only checks
//! (well under 2 s) when everything is present. One line per piece:
//! `ok`, `installed`, or `FAILED: run <command>`; exits non-zero if anything failed.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::util::{bpffs_mounted, is_root, run_capture, BPFFS};

/// Needed to build the eBPF programs and bpf-linker.
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Needed at run time and by the tests.
const RUNTIME_PACKAGES: &[&str] = &[
    "iproute2",
    "nginx-light",
    "haproxy",
    "conntrack",
    "iptables",
    "bpftool",
    "kmod",
    "curl",
    "libcap2-bin",
    "util-linux",
    // The OpenMetrics parser that checks `/metrics` in the tests (used as /usr/bin/python3).
    "python3-prometheus-client",
    // Deployment checks: `systemd-analyze verify` of deploy/systemd, a venv for
    // kubernetes-validate (deploy/kubernetes).
    "systemd",
    "python3-venv",
    // `cargo xtask bench`: load tools, and perf to profile the proxy.
    "wrk",
    "iperf3",
    "linux-perf",
    // `cargo xtask test-kernels`: QEMU (TCG) and the guests' busybox; xz unpacks modules.
    "qemu-system-x86",
    "busybox-static",
    "xz-utils",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

enum State {
    Ok,
    Installed,
    Failed(String),
}

struct Report {
    failed: usize,
}

impl Report {
    fn line(&mut self, piece: &str, st: State) {
        match st {
            State::Ok => println!("setup: {piece:<30} ok"),
            State::Installed => println!("setup: {piece:<30} installed"),
            State::Failed(cmd) => {
                self.failed += 1;
                println!("setup: {piece:<30} FAILED: run {cmd}")
            }
        }
    }
}

fn sudo() -> &'static str {
    if is_root() {
        ""
    } else {
        "sudo "
    }
}

pub fn setup() -> Result<()> {
    let mut r = Report { failed: 0 };
    rust_src(&mut r);
    wasm_target(&mut r);
    let pkgs_ok = packages(&mut r);
    bpf_linker(&mut r, pkgs_ok);
    bpffs(&mut r);
    kubernetes_validate(&mut r);
    dubbo_client(&mut r);
    if r.failed > 0 {
        bail!(
            "setup: {} piece(s) missing; run the commands above",
            r.failed
        );
    }
    Ok(())
}

/// What `cargo xtask lint` needs beyond `setup`: cargo-deny (built from crates.io, about
/// five minutes on two cores; once per machine).
pub fn lint_tools() -> Result<()> {
    let mut r = Report { failed: 0 };
    let version = crate::lint::CARGO_DENY_VERSION;
    let piece = format!("cargo-deny {version}");
    let cmd = format!("cargo install cargo-deny --version {version} --locked");
    let present = || {
        run_capture(
            Command::new("cargo").args(["deny", "--version"]),
            Duration::from_secs(30),
        )
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).trim().ends_with(version)
        })
    };
    if present() {
        r.line(&piece, State::Ok);
    } else {
        println!("setup: building cargo-deny {version} (about five minutes)");
        let mut c = Command::new("cargo");
        c.args(["install", "cargo-deny", "--version", version, "--locked"]);
        for v in [
            "CARGO_TARGET_DIR",
            "RUSTFLAGS",
            "CARGO_BUILD_TARGET",
            "RUSTUP_TOOLCHAIN",
        ] {
            c.env_remove(v);
        }
        c.current_dir(std::env::temp_dir());
        if c.status().is_ok_and(|s| s.success()) && present() {
            r.line(&piece, State::Installed);
        } else {
            r.line(&piece, State::Failed(cmd));
        }
    }
    if r.failed > 0 {
        bail!("setup: cargo-deny is missing; run the command above");
    }
    Ok(())
}

fn quiet(cmd: &mut Command, secs: u64) -> bool {
    run_capture(cmd, Duration::from_secs(secs)).is_ok_and(|o| o.status.success())
}

fn rust_src(r: &mut Report) {
    rustup_piece(r, "rust-src (nightly)", "component", "nightly", "rust-src");
}

/// The Wasm target the routing plugin fixtures are built for (tests/wasm-plugins).
fn wasm_target(r: &mut Report) {
    rustup_piece(
        r,
        "wasm32-wasip1 (stable)",
        "target",
        "stable",
        "wasm32-wasip1",
    );
}

/// A rustup component or target (`kind`) of `toolchain`: added unless installed.
fn rustup_piece(r: &mut Report, piece: &str, kind: &str, toolchain: &str, name: &str) {
    let cmd = format!("rustup {kind} add {name} --toolchain {toolchain}");
    let present = || {
        run_capture(
            Command::new("rustup").args([kind, "list", "--toolchain", toolchain, "--installed"]),
            Duration::from_secs(30),
        )
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.trim().starts_with(name))
        })
    };
    if present() {
        return r.line(piece, State::Ok);
    }
    let st = Command::new("rustup")
        .args([kind, "add", name, "--toolchain", toolchain])
        .status();
    if st.is_ok_and(|s| s.success()) && present() {
        r.line(piece, State::Installed)
    } else {
        r.line(piece, State::Failed(cmd))
    }
}

/// `dpkg-query` status of each package: true when "install ok installed".
fn installed(pkgs: &[&str]) -> BTreeMap<String, bool> {
    let mut m: BTreeMap<String, bool> = pkgs.iter().map(|p| (p.to_string(), false)).collect();
    let out = run_capture(
        Command::new("dpkg-query")
            .arg("-W")
            .arg("-f=${Package} ${Status}\\n")
            .args(pkgs),
        Duration::from_secs(30),
    );
    if let Ok(out) = out {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((name, status)) = line.split_once(' ') {
                let name = name.split(':').next().unwrap_or(name); // strip :amd64
                if let Some(v) = m.get_mut(name) {
                    *v = status.trim() == "install ok installed";
                }
            }
        }
    }
    m
}

fn apt_install_cmd(pkgs: &[&str]) -> String {
    format!(
        "{s}apt-get update && {s}apt-get install -y --no-install-recommends {}",
        pkgs.join(" "),
        s = sudo()
    )
}

/// Returns whether the build packages are all present afterwards.
fn packages(r: &mut Report) -> bool {
    let all: Vec<&str> = BUILD_PACKAGES
        .iter()
        .chain(RUNTIME_PACKAGES)
        .copied()
        .collect();
    let before = installed(&all);
    let missing: Vec<&str> = all.iter().copied().filter(|p| !before[*p]).collect();
    if !missing.is_empty() {
        println!("setup: installing {} with apt-get", missing.join(" "));
        let apt = |args: &[&str]| {
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success())
        };
        if apt(&["update"]) {
            let mut args = vec!["install", "-y", "--no-install-recommends"];
            args.extend(&missing);
            if !apt(&args) && missing.len() > 1 {
                // Find out which ones fail by installing them one at a time.
                for p in &missing {
                    apt(&["install", "-y", "--no-install-recommends", p]);
                }
            }
        }
    }
    let after = if missing.is_empty() {
        before.clone()
    } else {
        installed(&all)
    };
    for p in &all {
        let st = match (before[*p], after[*p]) {
            (true, _) => State::Ok,
            (false, true) => State::Installed,
            (false, false) => State::Failed(apt_install_cmd(&[p])),
        };
        r.line(&format!("package {p}"), st);
    }
    BUILD_PACKAGES.iter().all(|p| after[*p])
}

fn bpf_linker_version() -> Option<String> {
    let out = run_capture(
        Command::new("bpf-linker").arg("--version"),
        Duration::from_secs(30),
    )
    .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    out.status
        .success()
        .then(|| text.split_whitespace().last().unwrap_or("").to_string())
}

fn bpf_linker(r: &mut Report, llvm_present: bool) {
    let piece = format!("bpf-linker {BPF_LINKER_VERSION} (LLVM 22)");
    let cmd = format!(
        "PATH={LLVM_BIN}:$PATH cargo install bpf-linker --version {BPF_LINKER_VERSION} --locked --no-default-features --features llvm-22"
    );
    if bpf_linker_version().as_deref() == Some(BPF_LINKER_VERSION) {
        return r.line(&piece, State::Ok);
    }
    if !llvm_present || !Path::new(LLVM_BIN).is_dir() {
        return r.line(
            &piece,
            State::Failed(format!("{} && {cmd}", apt_install_cmd(BUILD_PACKAGES))),
        );
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    for locked in [true, false] {
        let mut c = Command::new("cargo");
        c.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION]);
        if locked {
            c.arg("--locked");
        }
        c.args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", &path);
        // Do not leak this workspace's build settings into the install.
        for v in [
            "CARGO_TARGET_DIR",
            "RUSTFLAGS",
            "CARGO_BUILD_TARGET",
            "RUSTUP_TOOLCHAIN",
        ] {
            c.env_remove(v);
        }
        c.current_dir(std::env::temp_dir());
        if c.status().is_ok_and(|s| s.success())
            && bpf_linker_version().as_deref() == Some(BPF_LINKER_VERSION)
        {
            return r.line(&piece, State::Installed);
        }
        if locked {
            println!("setup: bpf-linker install with --locked failed; retrying without --locked");
        }
    }
    r.line(&piece, State::Failed(cmd))
}

fn kubernetes_validate(r: &mut Report) {
    let piece = format!(
        "kubernetes-validate {} (venv)",
        crate::deploy::KUBERNETES_VALIDATE
    );
    if crate::deploy::kubernetes_validate_version().as_deref()
        == Some(crate::deploy::KUBERNETES_VALIDATE)
    {
        return r.line(&piece, State::Ok);
    }
    println!(
        "setup: installing kubernetes-validate from PyPI into {}",
        crate::deploy::venv().display()
    );
    if crate::deploy::install_kubernetes_validate() {
        r.line(&piece, State::Installed)
    } else {
        r.line(&piece, State::Failed(crate::deploy::install_command()))
    }
}

/// The Dubbo 2 client (with its Hessian 2 codec) that tests/tests/dubbo.rs runs as the
/// workload and builds its test provider on.
pub const DUBBO_CLIENT: &str = "dubbo-ssl-python";
pub const DUBBO_CLIENT_VERSION: &str = "0.9.6";

fn dubbo_client(r: &mut Report) {
    let piece = format!("{DUBBO_CLIENT} {DUBBO_CLIENT_VERSION} (venv)");
    let venv = crate::util::target_dir().join("dubbo-venv");
    let python = venv.join("bin/python");
    let installed = || {
        Command::new(&python)
            .args([
                "-c",
                "import importlib.metadata as m; print(m.version('dubbo-ssl-python'))",
            ])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == DUBBO_CLIENT_VERSION)
    };
    if installed() {
        return r.line(&piece, State::Ok);
    }
    println!(
        "setup: installing {DUBBO_CLIENT} from PyPI into {}",
        venv.display()
    );
    let ok = (python.exists()
        || quiet(
            Command::new("/usr/bin/python3")
                .arg("-m")
                .arg("venv")
                .arg(&venv),
            120,
        ))
        && quiet(
            Command::new(venv.join("bin/pip")).args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                &format!("{DUBBO_CLIENT}=={DUBBO_CLIENT_VERSION}"),
            ]),
            300,
        );
    if ok && installed() {
        r.line(&piece, State::Installed)
    } else {
        r.line(
            &piece,
            State::Failed(format!(
                "/usr/bin/python3 -m venv {v} && {v}/bin/pip install {DUBBO_CLIENT}=={DUBBO_CLIENT_VERSION}",
                v = venv.display()
            )),
        )
    }
}

fn bpffs(r: &mut Report) {
    let piece = format!("bpffs at {BPFFS}");
    if bpffs_mounted() {
        return r.line(&piece, State::Ok);
    }
    if quiet(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]), 30) && bpffs_mounted() {
        r.line(&piece, State::Installed)
    } else {
        r.line(
            &piece,
            State::Failed(format!("{}mount -t bpf bpf {BPFFS}", sudo())),
        )
    }
}
