//! The deployment files' checks (part of `cargo xtask test`) and `cargo xtask image`.
//!
//! | check | what |
//! |---|---|
//! | `deploy/kubernetes` | `kubernetes-validate --strict` of every manifest against the Kubernetes API schemas (offline) |
//! | `deploy/systemd` | `systemd-analyze verify` of the units in a scratch root that holds the built binaries; any warning fails |
//! | `deploy configs` | `interceptor run --check` of the example config and of the ConfigMap's config |

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::util::{run_capture, target_dir, workspace_root};

/// The kubernetes-validate release the checks use (it carries the schemas, up to 1.37).
pub const KUBERNETES_VALIDATE: &str = "1.37.0";

/// The venv that holds kubernetes-validate (made by `cargo xtask setup`).
pub fn venv() -> PathBuf {
    target_dir().join("kube-validate-venv")
}

pub fn kubernetes_validate_bin() -> PathBuf {
    venv().join("bin/kubernetes-validate")
}

/// The version of the installed kubernetes-validate, if any.
pub fn kubernetes_validate_version() -> Option<String> {
    let out = run_capture(
        Command::new(kubernetes_validate_bin()).arg("--version"),
        Duration::from_secs(60),
    )
    .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Creates the venv and installs kubernetes-validate from PyPI. Returns whether it is there.
pub fn install_kubernetes_validate() -> bool {
    let venv = venv();
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
    if !venv.join("bin/pip").exists() && !ok(Command::new(python).arg("-m").arg("venv").arg(&venv))
    {
        return false;
    }
    ok(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("kubernetes-validate=={KUBERNETES_VALIDATE}"),
    ])) && kubernetes_validate_version().as_deref() == Some(KUBERNETES_VALIDATE)
}

/// The shell command that installs it, for a setup failure line.
pub fn install_command() -> String {
    format!(
        "/usr/bin/python3 -m venv {v} && {v}/bin/pip install kubernetes-validate=={KUBERNETES_VALIDATE}",
        v = venv().display()
    )
}

/// Runs every deployment check; returns (passed, failed).
pub fn checks(interceptor: &Path, proxy: &Path) -> (u64, u64) {
    let mut passed = 0;
    let mut failed = 0;
    let results = [
        (
            "deploy/kubernetes: kubernetes-validate --strict",
            kubernetes(),
        ),
        (
            "deploy/systemd: systemd-analyze verify",
            systemd(interceptor, proxy),
        ),
        (
            "deploy configs: interceptor run --check",
            configs(interceptor),
        ),
    ];
    for (name, r) in results {
        match r {
            Ok(detail) => {
                passed += 1;
                println!("check {name} ... ok\n{detail}");
            }
            Err(e) => {
                failed += 1;
                println!("check {name} ... FAILED: {e:#}");
            }
        }
    }
    (passed, failed)
}

fn manifests() -> Result<Vec<PathBuf>> {
    let dir = workspace_root().join("deploy/kubernetes");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    v.sort();
    if v.is_empty() {
        bail!("no manifests in {}", dir.display());
    }
    Ok(v)
}

fn kubernetes() -> Result<String> {
    let bin = kubernetes_validate_bin();
    if !bin.exists() {
        bail!(
            "{} is missing: run `cargo xtask setup` (or {})",
            bin.display(),
            install_command()
        );
    }
    let out = run_capture(
        Command::new(&bin)
            .args(["--strict", "--kubernetes-version", "1.37.0"])
            .args(manifests()?),
        Duration::from_secs(120),
    )?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || text.contains("ERROR") {
        bail!("{}", text.trim());
    }
    Ok(text.trim_end().to_string())
}

fn systemd(interceptor: &Path, proxy: &Path) -> Result<String> {
    // A scratch root with what the units name: the binaries where they install them, the
    // config, /bin/sh and /bin/kill, and the system's own units (targets they order against).
    let root = target_dir().join("systemd-verify-root");
    let _ = std::fs::remove_dir_all(&root);
    let units_src = workspace_root().join("deploy/systemd");
    let copy = |from: &Path, to: &str| -> Result<()> {
        let to = root.join(to);
        std::fs::create_dir_all(to.parent().unwrap())?;
        std::fs::copy(from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        Ok(())
    };
    copy(interceptor, "usr/local/bin/interceptor")?;
    copy(proxy, "usr/local/bin/interceptor-proxy")?;
    copy(
        &units_src.join("config.toml"),
        "etc/interceptor/config.toml",
    )?;
    for b in ["sh", "kill"] {
        copy(&Path::new("/bin").join(b), &format!("bin/{b}"))?;
    }
    let mut units = Vec::new();
    for e in std::fs::read_dir(&units_src)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".service") {
            copy(&e.path(), &format!("etc/systemd/system/{name}"))?;
            units.push(name);
        }
    }
    units.sort();
    let system_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|p| Path::new(p).is_dir())
        .context("no /usr/lib/systemd/system: install the systemd package")?;
    std::fs::create_dir_all(root.join("usr/lib/systemd"))?;
    let st = Command::new("cp")
        .args(["-a", system_units])
        .arg(root.join("usr/lib/systemd/"))
        .status()?;
    if !st.success() {
        bail!("copying {system_units}");
    }
    let out = run_capture(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(format!("--root={}", root.display()))
            .args(&units),
        Duration::from_secs(120),
    )
    .context("running systemd-analyze (install the systemd package)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&root);
    // systemd-analyze exits 0 on unknown keys and bad values ("..., ignoring"): any output fails.
    if !out.status.success() || !text.trim().is_empty() {
        bail!("{}", text.trim());
    }
    Ok(format!("  {} verified, no warnings", units.join(", ")))
}

/// The TOML of the ConfigMap's `config.toml: |` block.
fn configmap_config(yaml: &str) -> Option<String> {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "config.toml: |");
    let head = lines.next()?;
    let indent = head.len() - head.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        .collect();
    let strip = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()?;
    Some(
        body.iter()
            .map(|l| l.get(strip..).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

fn configs(interceptor: &Path) -> Result<String> {
    let ws = workspace_root();
    let cm = std::fs::read_to_string(ws.join("deploy/kubernetes/configmap.yaml"))?;
    let agent = configmap_config(&cm).context("no `config.toml: |` block in configmap.yaml")?;
    let scratch = target_dir().join("configmap-config.toml");
    std::fs::write(&scratch, agent)?;
    let mut detail = String::new();
    for (file, node) in [
        (ws.join("deploy/systemd/config.toml"), None),
        (scratch.clone(), Some("node-1")),
    ] {
        let mut c = Command::new(interceptor);
        c.args(["run", "--check", "--config"]).arg(&file);
        if let Some(n) = node {
            c.env("NODE_NAME", n);
        }
        let out = run_capture(&mut c, Duration::from_secs(30))?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        detail.push_str(&format!("  {}", String::from_utf8_lossy(&out.stdout)));
    }
    let _ = std::fs::remove_file(&scratch);
    Ok(detail.trim_end().to_string())
}

/// `cargo xtask image`: static binaries built here, then `podman build` of the image's
/// `image-prebuilt` stage (no registry needed). Returns the image's tag.
pub fn image(tag: &str) -> Result<()> {
    let ws = workspace_root();
    println!("image: static binaries (cargo build --release --target x86_64-unknown-linux-gnu, crt-static)");
    let st = Command::new(crate::util::cargo())
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
            "-p",
            "interceptor-cli",
            "-p",
            "interceptor-proxy",
        ])
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .current_dir(&ws)
        .status()?;
    if !st.success() {
        bail!("static build failed ({st})");
    }
    let bins = target_dir().join("x86_64-unknown-linux-gnu/release");
    let ctx = target_dir().join("image-context");
    let _ = std::fs::remove_dir_all(&ctx);
    std::fs::create_dir_all(ctx.join("bin"))?;
    for b in ["interceptor", "interceptor-proxy"] {
        std::fs::copy(bins.join(b), ctx.join("bin").join(b))?;
    }
    let containerfile = ws.join("deploy/Containerfile");
    println!(
        "image: podman build --storage-driver vfs --target image-prebuilt -f {} -t {tag} {}",
        containerfile.display(),
        ctx.display()
    );
    let st = Command::new("podman")
        .args([
            "--storage-driver",
            "vfs",
            "build",
            "--target",
            "image-prebuilt",
            "-f",
        ])
        .arg(&containerfile)
        .args(["-t", tag])
        .arg(&ctx)
        .status()
        .context("running podman (apt-get install podman)")?;
    if !st.success() {
        bail!("podman build failed ({st})");
    }
    println!(
        "image: built {tag}; `podman --storage-driver vfs save {tag} -o interceptor.tar` to export"
    );
    Ok(())
}
