//! The guest's initramfs: newc (cpio) archives the kernel unpacks into its root file system.
//! One archive holds what every kernel shares (/init, busybox and its applet links, iproute2's
//! `ip`, HAProxy, the release binaries and their shared libraries); each kernel adds one with
//! its modules. Linux accepts archives concatenated in one initrd, so a guest boots
//! `base.cpio` + `<label>/modules.cpio`.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::util::run_capture;

/// The guest's /init: mounts, runs `icpt-kcheck`, powers off.
const INIT: &str = include_str!("init.sh");

/// One entry of an archive.
enum Entry {
    Dir,
    /// A regular file with this content, copied from the host.
    File {
        from: PathBuf,
        mode: u32,
    },
    Bytes {
        data: Vec<u8>,
        mode: u32,
    },
    Symlink(String),
}

/// Path in the archive (no leading `/`) -> entry; parents are added as directories.
#[derive(Default)]
struct Image {
    entries: std::collections::BTreeMap<String, Entry>,
}

impl Image {
    fn add(&mut self, path: &str, e: Entry) {
        let path = path.trim_start_matches('/').to_string();
        let mut parent = Path::new(&path).parent();
        while let Some(p) = parent {
            let s = p.to_string_lossy().into_owned();
            if s.is_empty() {
                break;
            }
            self.entries.entry(s).or_insert(Entry::Dir);
            parent = p.parent();
        }
        self.entries.insert(path, e);
    }

    /// Writes the archive: directories before what they hold (BTreeMap order is by path).
    fn write(&self, out: &Path) -> Result<()> {
        let tmp = out.with_extension("tmp");
        let mut w = BufWriter::new(
            File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?,
        );
        for (ino, (path, e)) in self.entries.iter().enumerate() {
            let b = cpio::NewcBuilder::new(path)
                .ino(ino as u32 + 1)
                .uid(0)
                .gid(0)
                .nlink(1);
            w = match e {
                Entry::Dir => b.mode(0o040755).write(w, 0).finish()?,
                Entry::Symlink(target) => {
                    let mut f = b.mode(0o120777).write(w, target.len() as u32);
                    f.write_all(target.as_bytes())?;
                    f.finish()?
                }
                Entry::Bytes { data, mode } => {
                    let mut f = b.mode(0o100000 | mode).write(w, data.len() as u32);
                    f.write_all(data)?;
                    f.finish()?
                }
                Entry::File { from, mode } => {
                    let mut src =
                        File::open(from).with_context(|| format!("open {}", from.display()))?;
                    let len = src.metadata()?.len();
                    let len32 = u32::try_from(len)
                        .map_err(|_| anyhow!("{} is too large for newc", from.display()))?;
                    let mut f = b.mode(0o100000 | mode).write(w, len32);
                    std::io::copy(&mut src, &mut f)?;
                    f.finish()?
                }
            };
        }
        let w = cpio::newc::trailer(w)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, out)?;
        Ok(())
    }
}

/// An archive of every file, directory and symlink under `dir`, named relative to it.
pub fn archive_tree(dir: &Path, out: &Path) -> Result<()> {
    let mut img = Image::default();
    walk(dir, dir, &mut img, 0)?;
    img.write(out)
}

fn walk(base: &Path, dir: &Path, img: &mut Image, depth: u32) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let e = e?;
        let p = e.path();
        let rel = p
            .strip_prefix(base)
            .expect("under base")
            .to_string_lossy()
            .into_owned();
        let t = e.file_type()?;
        if t.is_dir() {
            img.add(&rel, Entry::Dir);
            if depth < 32 {
                walk(base, &p, img, depth + 1)?;
            }
        } else if t.is_symlink() {
            img.add(
                &rel,
                Entry::Symlink(fs::read_link(&p)?.to_string_lossy().into_owned()),
            );
        } else {
            let mode = e.metadata()?.permissions().mode() & 0o7777;
            img.add(&rel, Entry::File { from: p, mode });
        }
    }
    Ok(())
}

/// What goes into the shared archive: (path in the guest, host file).
pub struct Payload {
    pub bins: Vec<(String, PathBuf)>,
}

/// The host file of a program found on PATH (symlinks resolved), e.g. iproute2's `ip`.
pub fn which(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .map(|p| fs::canonicalize(&p).unwrap_or(p))
        .ok_or_else(|| anyhow!("`{name}` is not installed (run `cargo xtask setup`)"))
}

/// The shared libraries `ldd` lists for `bin`, and its program interpreter.
fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = run_capture(Command::new("ldd").arg(bin), Duration::from_secs(30))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Static binaries make ldd fail with "not a dynamic executable".
        let all = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
        if all.contains("not a dynamic executable") || all.contains("statically linked") {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", bin.display(), all.trim());
    }
    let mut libs = Vec::new();
    for l in text.lines() {
        let l = l.trim();
        if l.contains("=> not found") {
            bail!("{} needs {}, which is not installed", bin.display(), l);
        }
        let path = match l.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => l.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Builds the shared archive at `out`.
pub fn build_base(payload: &Payload, out: &Path) -> Result<()> {
    let mut img = Image::default();
    for d in [
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "root",
        "etc",
        "var/tmp",
        "lib/modules",
    ] {
        img.add(d, Entry::Dir);
    }
    img.add(
        "init",
        Entry::Bytes {
            data: INIT.as_bytes().to_vec(),
            mode: 0o755,
        },
    );
    img.add(
        "etc/passwd",
        Entry::Bytes {
            data: b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
            mode: 0o644,
        },
    );
    img.add(
        "etc/group",
        Entry::Bytes {
            data: b"root:x:0:\n".to_vec(),
            mode: 0o644,
        },
    );
    let busybox = which("busybox")?;
    img.add(
        "bin/busybox",
        Entry::File {
            from: busybox.clone(),
            mode: 0o755,
        },
    );
    let mut libs = BTreeSet::new();
    libs.extend(shared_libs(&busybox)?);
    let ours: BTreeSet<String> = payload
        .bins
        .iter()
        .filter_map(|(g, _)| {
            Path::new(g)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .collect();
    // Busybox's applets as links, except those a real program replaces (its `ip` has no netns).
    let list = crate::util::run_ok(busybox.to_str().expect("UTF-8 path"), &["--list-full"])?;
    for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let name = Path::new(applet)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        if name.as_ref().is_some_and(|n| ours.contains(n)) || applet == "bin/busybox" {
            continue;
        }
        img.add(applet, Entry::Symlink("/bin/busybox".into()));
    }
    for (guest, host) in &payload.bins {
        if !host.is_file() {
            bail!("{} is missing (run `cargo xtask build`)", host.display());
        }
        img.add(
            guest,
            Entry::File {
                from: host.clone(),
                mode: 0o755,
            },
        );
        libs.extend(shared_libs(host)?);
    }
    for lib in libs {
        // Copy the file the path resolves to, under the path the binaries ask for.
        let real = fs::canonicalize(&lib).with_context(|| format!("resolve {}", lib.display()))?;
        img.add(
            &lib.to_string_lossy(),
            Entry::File {
                from: real,
                mode: 0o755,
            },
        );
    }
    img.write(out)
}

/// `base` followed by `modules`: the initrd of one kernel.
pub fn concat(base: &Path, modules: &Path, out: &Path) -> Result<()> {
    let mut w = BufWriter::new(File::create(out)?);
    for p in [base, modules] {
        let mut r = File::open(p).with_context(|| format!("open {}", p.display()))?;
        std::io::copy(&mut r, &mut w)?;
    }
    w.flush()?;
    Ok(())
}
