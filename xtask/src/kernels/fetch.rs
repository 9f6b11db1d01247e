//! Debian kernels for the matrix: which package, fetched with `apt-get download` from
//! deb.debian.org through a private sources list, unpacked with `dpkg -x`, reduced to the
//! kernel image and the few modules the guest loads. Everything lives under
//! `target/kernels/`; a kernel already there is used as is (nothing downloaded) unless
//! `--refresh` asks to look for a newer one.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::util::run_capture;

/// Where the private apt state, the .deb files and each kernel's files are kept.
pub fn cache_root() -> PathBuf {
    crate::util::target_dir().join("kernels")
}

/// The suites the matrix may take kernels from. deb.debian.org is Debian's package registry;
/// this list is used only by the commands below (the machine's own sources are not touched).
/// Debian 12's 6.1 comes from bookworm(-security); the newest kernel Debian builds for this
/// release line is in trixie-backports (trixie, Debian 13, ships 6.12).
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security trixie-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
";

/// Modules the guest needs from the kernel package (with what they depend on): veth for the
/// namespaces' link, and nf_conntrack, which nothing may load (the no-conntrack check loads it
/// at the very end as its control).
pub const MODULES: &[&str] = &["veth", "nf_conntrack"];

/// How a kernel of the matrix is chosen among Debian's `linux-image-*-cloud-amd64` packages.
#[derive(Clone, Copy, Debug)]
pub enum Pick {
    /// The newest ABI of one upstream series (`6.1` picks `linux-image-6.1.0-<newest>-cloud-amd64`).
    Series(&'static str),
    /// The highest version in any of the suites.
    Newest,
}

/// A kernel ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// `uname -r` of the kernel (the modules directory's name).
    pub release: String,
    /// The Debian package and version it came from.
    pub package: String,
    pub version: String,
    pub vmlinuz: PathBuf,
    /// A newc archive with `lib/modules/<release>/` (the modules above and modules.dep).
    pub modules_cpio: PathBuf,
}

/// The private apt: `apt-get`/`apt-cache` with the sources above and state under `dir`.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(root: &Path) -> Result<Apt> {
        let dir = root.join("apt");
        for d in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(d))
                .with_context(|| format!("create {}", dir.join(d).display()))?;
        }
        fs::write(dir.join("sources.list"), SOURCES)?;
        Ok(Apt { dir })
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        let d = self.dir.display();
        c.args([
            "-o",
            &format!("Dir::Etc::sourcelist={d}/sources.list"),
            "-o",
            "Dir::Etc::sourceparts=-",
            "-o",
            &format!("Dir::State::Lists={d}/lists"),
            "-o",
            &format!("Dir::Cache={d}/cache"),
            // Downloads go into target/, which apt's unprivileged `_apt` user cannot write.
            "-o",
            "APT::Sandbox::User=root",
            // Only the package lists; no AppStream metadata.
            "-o",
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false",
            "-o",
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false",
            "-o",
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    fn has_lists(&self) -> bool {
        fs::read_dir(self.dir.join("lists")).is_ok_and(|rd| {
            rd.flatten().any(|e| {
                e.file_name().to_string_lossy().ends_with("_Packages.lz4")
                    || e.file_name().to_string_lossy().contains("_Packages")
            })
        })
    }

    fn update(&self) -> Result<()> {
        println!(
            "kernels: apt-get update (private lists in {})",
            self.dir.display()
        );
        let out = run_capture(self.cmd("apt-get").arg("update"), Duration::from_secs(600))?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success()
            || err
                .lines()
                .any(|l| l.starts_with("E:") || l.starts_with("W: Failed"))
        {
            bail!(
                "apt-get update of the kernel sources ({}) failed ({}): {}; is deb.debian.org reachable?",
                self.dir.join("sources.list").display(),
                out.status,
                err.trim()
            );
        }
        Ok(())
    }

    fn output(&self, prog: &str, args: &[&str]) -> Result<String> {
        let out = run_capture(self.cmd(prog).args(args), Duration::from_secs(120))?;
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

    /// Names of the signed cloud kernel images (`linux-image-<abi>-cloud-amd64`).
    fn cloud_images(&self) -> Result<Vec<String>> {
        let text = self.output(
            "apt-cache",
            &[
                "search",
                "--names-only",
                "^linux-image-[0-9].*-cloud-amd64$",
            ],
        )?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect())
    }

    /// `Version` and `Depends` of the candidate version of `pkg`.
    fn show(&self, pkg: &str) -> Result<(String, String)> {
        let text = self.output("apt-cache", &["show", "--no-all-versions", pkg])?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
                .unwrap_or_default()
        };
        let version = field("Version:");
        if version.is_empty() {
            bail!("apt-cache show {pkg}: no Version field");
        }
        Ok((version, field("Depends:")))
    }

    fn download(&self, pkgs: &[String], into: &Path) -> Result<()> {
        fs::create_dir_all(into)?;
        println!("kernels: apt-get download {}", pkgs.join(" "));
        let out = run_capture(
            self.cmd("apt-get")
                .arg("download")
                .args(pkgs)
                .current_dir(into),
            Duration::from_secs(900),
        )?;
        if !out.status.success() {
            bail!(
                "apt-get download {} failed ({}): {}",
                pkgs.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

/// The numbers in a kernel package's name, for ordering: `6.1.0-57` -> [6, 1, 0, 57],
/// `7.3.4+deb13` -> [7, 3, 4, 13].
fn abi_key(abi: &str) -> Vec<u64> {
    abi.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn abi_of(pkg: &str) -> Option<&str> {
    pkg.strip_prefix("linux-image-")?
        .strip_suffix("-cloud-amd64")
}

/// The package `pick` chooses among `names`.
pub fn choose(pick: Pick, names: &[String]) -> Option<String> {
    names
        .iter()
        .filter_map(|n| Some((n, abi_of(n)?)))
        .filter(|(_, abi)| match pick {
            Pick::Series(s) => {
                abi.starts_with(&format!("{s}.")) && {
                    // `6.1` must not match `6.12`.
                    let rest = &abi[s.len() + 1..];
                    rest.starts_with(|c: char| c.is_ascii_digit())
                }
            }
            Pick::Newest => true,
        })
        .max_by_key(|(_, abi)| abi_key(abi))
        .map(|(n, _)| n.clone())
}

fn read_meta(dir: &Path) -> Option<Kernel> {
    let text = fs::read_to_string(dir.join("kernel.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    // An archive staged for another module list is rebuilt (from the kept .deb files).
    if v["modules"].as_str()? != MODULES.join(" ") {
        return None;
    }
    let k = Kernel {
        release: v["release"].as_str()?.to_string(),
        package: v["package"].as_str()?.to_string(),
        version: v["version"].as_str()?.to_string(),
        vmlinuz: dir.join("vmlinuz"),
        modules_cpio: dir.join("modules.cpio"),
    };
    (k.vmlinuz.is_file() && k.modules_cpio.is_file()).then_some(k)
}

/// The kernel for `label` chosen by `pick`: from `target/kernels/<label>/` when it is there
/// (and `refresh` is off), else resolved with the private apt, downloaded and unpacked.
pub fn kernel(label: &str, pick: Pick, refresh: bool) -> Result<Kernel> {
    let root = cache_root();
    let dir = root.join(label);
    let cached = read_meta(&dir);
    if let (Some(k), false) = (&cached, refresh) {
        return Ok(k.clone());
    }
    let apt = Apt::new(&root)?;
    if refresh || !apt.has_lists() {
        apt.update()?;
    }
    let names = apt.cloud_images()?;
    let pkg = choose(pick, &names).ok_or_else(|| {
        anyhow!(
            "no linux-image-*-cloud-amd64 package matches {pick:?} in {}",
            apt.dir.join("sources.list").display()
        )
    })?;
    let (version, depends) = apt.show(&pkg)?;
    if let Some(k) = cached {
        if k.package == pkg && k.version == version {
            return Ok(k);
        }
    }
    // Since 6.17 Debian splits the image into linux-binary-* (vmlinuz) and linux-modules-*,
    // which linux-image-* depends on; 6.1 and 6.12 have both in linux-image-* itself.
    let mut pkgs = vec![format!("{pkg}={version}")];
    for dep in depends.split(',') {
        let name = dep.split_whitespace().next().unwrap_or("");
        if name.starts_with("linux-binary-") || name.starts_with("linux-modules-") {
            pkgs.push(format!("{name}={version}"));
        }
    }
    let debs = root.join("debs").join(label);
    if !have_debs(&debs, &pkgs) {
        let _ = fs::remove_dir_all(&debs);
        apt.download(&pkgs, &debs)?;
    }
    unpack(label, &pkg, &version, &debs, &dir)
}

/// Whether `dir` holds the .deb of every `name=version` in `pkgs` (apt writes an epoch's `:`
/// as `%3a` in file names).
fn have_debs(dir: &Path, pkgs: &[String]) -> bool {
    let files: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    pkgs.iter().all(|p| {
        let (name, version) = p.split_once('=').unwrap_or((p, ""));
        let prefix = format!("{name}_{}_", version.replace(':', "%3a"));
        files
            .iter()
            .any(|f| f.starts_with(&prefix) && f.ends_with(".deb"))
    })
}

/// `dpkg -x` of every .deb in `debs`, then the kernel image and the modules' archive into `dir`.
fn unpack(label: &str, pkg: &str, version: &str, debs: &Path, dir: &Path) -> Result<Kernel> {
    let tree = debs.join("tree");
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(&tree)?;
    for e in fs::read_dir(debs)?.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "deb") {
            let out = run_capture(
                Command::new("dpkg").arg("-x").arg(&p).arg(&tree),
                Duration::from_secs(300),
            )?;
            if !out.status.success() {
                bail!(
                    "dpkg -x {} failed: {}",
                    p.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
    }
    // The modules directory: lib/modules/<release> (6.1, 6.12) or usr/lib/modules/<release>.
    let modroot = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| tree.join(d))
        .filter(|d| d.is_dir())
        .flat_map(|d| fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.path())
        .find(|p| p.join("kernel").is_dir())
        .ok_or_else(|| anyhow!("no lib/modules/<release>/kernel in {}", tree.display()))?;
    let release = modroot
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("bad modules directory {}", modroot.display()))?
        .to_string();
    let vmlinuz = [
        tree.join(format!("boot/vmlinuz-{release}")),
        modroot.join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .ok_or_else(|| anyhow!("no vmlinuz for {release} in {}", tree.display()))?;

    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    fs::copy(&vmlinuz, dir.join("vmlinuz"))?;
    let stage = debs.join("stage");
    let _ = fs::remove_dir_all(&stage);
    stage_modules(&modroot, &release, &stage)?;
    let cpio = dir.join("modules.cpio");
    super::initramfs::archive_tree(&stage, &cpio)?;
    let meta = serde_json::json!({
        "label": label,
        "package": pkg,
        "version": version,
        "release": release,
        "modules": MODULES.join(" "),
    });
    fs::write(
        dir.join("kernel.json"),
        serde_json::to_string_pretty(&meta)?,
    )?;
    let _ = fs::remove_dir_all(&tree);
    let _ = fs::remove_dir_all(&stage);
    read_meta(dir).ok_or_else(|| anyhow!("{} is incomplete", dir.display()))
}

/// Copies MODULES and their dependencies (from `modinfo -F depends`), decompressed, into
/// `stage/lib/modules/<release>/`, and runs `depmod` there so the guest's modprobe finds them.
fn stage_modules(modroot: &Path, release: &str, stage: &Path) -> Result<()> {
    let mut index = std::collections::BTreeMap::new();
    index_modules(&modroot.join("kernel"), &mut index, 0);
    let dest = stage.join("lib/modules").join(release);
    let mut todo: Vec<String> = MODULES.iter().map(|m| m.to_string()).collect();
    let mut done = std::collections::BTreeSet::new();
    while let Some(name) = todo.pop() {
        if !done.insert(name.clone()) {
            continue;
        }
        let src: &PathBuf = index.get(&name).ok_or_else(|| {
            anyhow!(
                "module {name} is not in {} (built in, or not built?)",
                modroot.display()
            )
        })?;
        let deps = crate::util::run_ok("modinfo", &["-F", "depends", &src.to_string_lossy()])?;
        todo.extend(
            deps.trim()
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.replace('-', "_")),
        );
        let rel = src.strip_prefix(modroot).expect("indexed under modroot");
        let rel = rel.to_string_lossy();
        let (plain, tool) = match rel.rsplit_once(".ko") {
            Some((base, ".xz")) => (format!("{base}.ko"), Some("xz")),
            Some((base, ".zst")) => (format!("{base}.ko"), Some("zstd")),
            Some((base, ".gz")) => (format!("{base}.ko"), Some("gzip")),
            _ => (rel.to_string(), None),
        };
        let to = dest.join(&plain);
        fs::create_dir_all(to.parent().expect("has a parent"))?;
        match tool {
            None => {
                fs::copy(src, &to)?;
            }
            Some(tool) => {
                let out = run_capture(
                    Command::new(tool).arg("-dc").arg(src),
                    Duration::from_secs(60),
                )?;
                if !out.status.success() {
                    bail!(
                        "{tool} -dc {} failed: {} (install {tool})",
                        src.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                fs::write(&to, out.stdout)?;
            }
        }
    }
    for f in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        if modroot.join(f).is_file() {
            fs::copy(modroot.join(f), dest.join(f))?;
        }
    }
    crate::util::run_ok("depmod", &["-b", &stage.to_string_lossy(), release])
        .context("depmod of the guest's modules")?;
    Ok(())
}

/// Module name (`-` as `_`) -> file, for every `*.ko*` under `dir`.
fn index_modules(dir: &Path, index: &mut std::collections::BTreeMap<String, PathBuf>, depth: u32) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            if depth < 16 {
                index_modules(&p, index, depth + 1);
            }
        } else if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
            if let Some((stem, _)) = name.split_once(".ko") {
                index.insert(stem.replace('-', "_"), p.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_of_a_series_and_overall() {
        let names: Vec<String> = [
            "linux-image-6.1.0-9-cloud-amd64",
            "linux-image-6.1.0-57-cloud-amd64",
            "linux-image-6.1.0-48-cloud-amd64",
            "linux-image-6.12.117+deb12-cloud-amd64",
            "linux-image-6.12.118+deb13-cloud-amd64",
            "linux-image-7.3.4+deb13-cloud-amd64",
            "linux-image-7.2.12+deb13-cloud-amd64",
            "linux-image-cloud-amd64",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            choose(Pick::Series("6.1"), &names).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64")
        );
        assert_eq!(
            choose(Pick::Series("6.12"), &names).as_deref(),
            Some("linux-image-6.12.118+deb13-cloud-amd64")
        );
        assert_eq!(
            choose(Pick::Newest, &names).as_deref(),
            Some("linux-image-7.3.4+deb13-cloud-amd64")
        );
        assert_eq!(choose(Pick::Series("5.10"), &names), None);
    }
}
