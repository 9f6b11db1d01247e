//! Shared helpers: paths, bounded command execution, mount lookups.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}

/// The cargo that runs us (`$CARGO`), else `cargo` from PATH.
pub fn cargo() -> PathBuf {
    std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("cargo"))
}

/// The workspace's target directory (honours CARGO_TARGET_DIR and config via `cargo metadata`).
pub fn target_dir() -> PathBuf {
    let out = Command::new(cargo())
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(workspace_root())
        .stderr(Stdio::null())
        .output();
    if let Ok(out) = out {
        if out.status.success() {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                if let Some(t) = v["target_directory"].as_str() {
                    return PathBuf::from(t);
                }
            }
        }
    }
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => workspace_root().join(d),
        None => workspace_root().join("target"),
    }
}

/// The release binaries the demo and the tests use.
pub struct Bins {
    pub interceptor: PathBuf,
    pub proxy: PathBuf,
    pub probe: PathBuf,
    pub exec: PathBuf,
}

impl Bins {
    /// The binaries in `target/release`; with `honor_env`, `$INTERCEPTOR_BIN` and
    /// `$INTERCEPTOR_PROXY_BIN` override the first two.
    pub fn locate(honor_env: bool) -> Bins {
        let rel = target_dir().join("release");
        let pick = |env: &str, name: &str| match std::env::var_os(env) {
            Some(p) if honor_env => PathBuf::from(p),
            _ => rel.join(name),
        };
        Bins {
            interceptor: pick("INTERCEPTOR_BIN", "interceptor"),
            proxy: pick("INTERCEPTOR_PROXY_BIN", "interceptor-proxy"),
            probe: rel.join("icpt-probe"),
            exec: rel.join("icpt-exec"),
        }
    }

    pub fn require(&self, p: &Path) -> Result<PathBuf> {
        if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            bail!("{} is not built (run `cargo xtask build`)", p.display())
        }
    }

    /// The interceptor binary, if it exists.
    pub fn interceptor_if_built(&self) -> Option<PathBuf> {
        self.interceptor.is_file().then(|| self.interceptor.clone())
    }
}

/// Runs a command with captured output, killing its process group after `timeout`.
pub fn run_capture(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
    let pipes: [(bool, Option<Box<dyn Read + Send>>); 2] = [
        (
            true,
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
        (
            false,
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
    ];
    for (is_out, pipe) in pipes {
        if let Some(mut p) = pipe {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = p.read_to_end(&mut buf);
                let _ = tx.send((is_out, buf));
            });
        }
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let grace = Instant::now() + Duration::from_secs(2);
    for _ in 0..2 {
        match rx.recv_timeout(grace.saturating_duration_since(Instant::now())) {
            Ok((true, b)) => stdout = b,
            Ok((false, b)) => stderr = b,
            Err(_) => break,
        }
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs `prog args` (bounded by 60 s); error with stderr unless it succeeds.
pub fn run_ok(prog: &str, args: &[&str]) -> Result<String> {
    let out = run_capture(Command::new(prog).args(args), Duration::from_secs(60))?;
    if !out.status.success() {
        bail!(
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mountinfo() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()
}

/// (mount point, fs type) for each line of /proc/self/mountinfo.
fn mounts() -> Vec<(PathBuf, String)> {
    mountinfo()
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let ty = post.split_whitespace().next()?.to_string();
            let mp = pre.split_whitespace().nth(4)?.replace("\\040", " ");
            Some((PathBuf::from(mp), ty))
        })
        .collect()
}

/// The cgroup2 mount point (e.g. /sys/fs/cgroup/unified on hybrid hosts).
pub fn cgroup2_root() -> Result<PathBuf> {
    mounts()
        .into_iter()
        .find(|(_, t)| t == "cgroup2")
        .map(|(p, _)| p)
        .ok_or_else(|| anyhow!("no cgroup2 filesystem is mounted (see /proc/self/mountinfo)"))
}

pub const BPFFS: &str = "/sys/fs/bpf";

pub fn bpffs_mounted() -> bool {
    mounts()
        .into_iter()
        .rfind(|(p, _)| p == Path::new(BPFFS))
        .is_some_and(|(_, t)| t == "bpf")
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Polls `f` until true or `timeout`; returns whether it became true.
pub fn wait_until(timeout: Duration, interval: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(interval);
    }
}
