//! `upgrade`: replace the program of every pinned link with the programs embedded in this
//! binary, in place, with BPF_LINK_UPDATE. The links, their pins and the pinned maps stay;
//! only the code they run changes.
//!
//! - Every scope has its own program instance (the object is loaded with the scope's id in
//!   the read-only global `SCOPE_ID`), so the object is loaded once per scope, reusing the
//!   pinned maps, and each of the scope's links gets the program of the same name from that
//!   load. The root links take the programs of any load.
//! - Nothing is swapped until every load has succeeded: a verifier failure changes nothing.
//! - Maps of another layout are refused before anything is loaded: the running programs stay.
//! - Each swap is atomic (a connection runs the old program or the new one) and conditional
//!   (BPF_F_REPLACE: it fails if someone else changed the link meanwhile). Between two swaps
//!   old and new programs run side by side on the same maps, which the layout check makes
//!   safe; a loader killed there leaves every link working, and a rerun finishes the job.
//! - A link whose target is gone (the cgroup was removed) is reported, not fatal.
use std::{
    fs,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::Ebpf;
use interceptor_common::LAYOUT_VERSION;
use serde::Serialize;

use crate::{
    attach,
    error::{Error, Result},
    lock::PinLock,
    maps, netns,
    object::EBPF_OBJECT,
    paths::{PinLayout, INBOUND_LINK, ROOT_LINKS, SCOPE_LINKS},
    sys, system,
};

/// What happened to one link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// The link now runs the new program.
    Upgraded,
    /// The link's cgroup or network namespace is gone; the kernel detached it. `detach`
    /// removes its pin.
    TargetGone,
    /// Not swapped; the link still runs its old program.
    Failed { reason: String },
}

/// One pinned link and what `upgrade` (or `attach`) did to it.
#[derive(Clone, Debug, Serialize)]
pub struct LinkUpgrade {
    /// Link name (`connect4`, `sock_ops`, ...).
    pub name: &'static str,
    pub pin: PathBuf,
    /// The scope the link belongs to; `None` for the root links.
    pub scope: Option<u64>,
    pub link_id: Option<u32>,
    /// The program the link ran before.
    pub old_program: Option<u32>,
    /// The program it runs now (`Upgraded` only).
    pub new_program: Option<u32>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What `upgrade` did.
#[derive(Clone, Debug, Serialize)]
pub struct Upgraded {
    pub pin_dir: PathBuf,
    /// The layout of the pinned maps (`None`: nothing is pinned).
    pub layout_version: Option<u32>,
    pub links: Vec<LinkUpgrade>,
}

impl Upgraded {
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.links.iter().filter(|l| f(&l.outcome)).count()
    }
    pub fn upgraded(&self) -> usize {
        self.count(|o| *o == Outcome::Upgraded)
    }
    pub fn targets_gone(&self) -> usize {
        self.count(|o| *o == Outcome::TargetGone)
    }
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed { .. }))
    }
}

/// Test-only hook: with `INTERCEPTOR_TEST_PAUSE_MS=N` in the environment, `attach` and
/// `upgrade` sleep N ms after each step that changes the pinned state (maps created and
/// stamped, settings written, each link pinned or swapped), so the end-to-end tests can kill
/// the loader between any two steps (tests/tests/upgrade_programs.rs). Unset, it does nothing.
pub(crate) fn test_pause() {
    static PAUSE: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    let pause = PAUSE.get_or_init(|| {
        std::env::var("INTERCEPTOR_TEST_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
    });
    if let Some(d) = pause {
        std::thread::sleep(*d);
    }
}

/// The kernel program each pinned link runs.
pub(crate) fn program_for_link(link: &str) -> &'static str {
    use interceptor_common::programs as p;
    match link {
        "connect4" => p::CONNECT4,
        "connect6" => p::CONNECT6,
        "getpeername4" => p::GETPEERNAME4,
        "getpeername6" => p::GETPEERNAME6,
        "sock_ops" => p::SOCK_OPS,
        "getsockopt" => p::GETSOCKOPT,
        INBOUND_LINK => p::SK_LOOKUP,
        other => unreachable!("no program for link {other}"),
    }
}

/// A pinned link: its name, pin path and scope.
struct Pinned {
    name: &'static str,
    pin: PathBuf,
    scope: Option<u64>,
}

/// Every link pinned under the pin dir: root links, then each scope's, by scope id.
fn pinned_links(layout: &PinLayout) -> Vec<Pinned> {
    let mut out: Vec<Pinned> = ROOT_LINKS
        .iter()
        .map(|n| Pinned {
            name: n,
            pin: layout.root_link(n),
            scope: None,
        })
        .filter(|p| p.pin.exists())
        .collect();
    let mut ids: Vec<u64> = fs::read_dir(layout.scopes_dir())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    for id in ids {
        let names: &[&'static str] = if netns::is_inbound(id) {
            &[INBOUND_LINK]
        } else {
            &SCOPE_LINKS
        };
        out.extend(
            names
                .iter()
                .map(|n| Pinned {
                    name: n,
                    pin: layout.scope_link(id, n),
                    scope: Some(id),
                })
                .filter(|p| p.pin.exists()),
        );
    }
    out
}

/// Whether any link is pinned under the pin dir.
pub(crate) fn any_link_pinned(layout: &PinLayout) -> bool {
    !pinned_links(layout).is_empty()
}

/// Replaces the program of every pinned link with this binary's (see the module docs).
pub fn upgrade(layout: &PinLayout) -> Result<Upgraded> {
    system::check_privileges()?;
    if EBPF_OBJECT.is_empty() {
        return Err(Error::NoObject);
    }
    let mut out = Upgraded {
        pin_dir: layout.root().into(),
        layout_version: None,
        links: Vec::new(),
    };
    if !system::pin_dir_present(layout.root()) {
        return Ok(out);
    }
    let _lock = PinLock::acquire(layout)?;
    out.layout_version = maps::stored_layout(layout)?;
    let links = pinned_links(layout);
    if links.is_empty() {
        return Ok(out);
    }
    match out.layout_version {
        Some(v) if v == LAYOUT_VERSION => {}
        Some(found) => {
            return Err(Error::LayoutMismatch {
                path: layout.maps_dir(),
                found,
                expected: LAYOUT_VERSION,
            })
        }
        None => {
            return Err(Error::PinDir {
                path: layout.root().into(),
                reason: format!(
                    "links are pinned but the maps are not ({} is missing); nothing was changed; remove the links with `interceptor detach --all` and attach again",
                    layout.map(interceptor_common::maps::LAYOUT).display()
                ),
            })
        }
    }

    // Load everything first: one instance per scope, programs verified, before any swap.
    let mut loads: Vec<(Option<u64>, Ebpf)> = Vec::new();
    for l in &links {
        let key = l.scope;
        let idx = match loads.iter().position(|(s, _)| *s == key) {
            Some(i) => i,
            None if key.is_none() && !loads.is_empty() => 0,
            None => {
                loads.push((key, attach::load(layout, key.unwrap_or(0))?));
                loads.len() - 1
            }
        };
        attach::program_fd(&mut loads[idx].1, program_for_link(l.name), &l.pin)?;
    }
    // The root links come first in `links`; they use the first load, whatever its scope.
    for l in &links {
        let idx = loads.iter().position(|(s, _)| *s == l.scope).unwrap_or(0);
        let fd = attach::program_fd(&mut loads[idx].1, program_for_link(l.name), &l.pin)?;
        let r = replace_program(l.name, &l.pin, l.scope, fd);
        match &r.outcome {
            Outcome::Upgraded => tracing::debug!(
                link = %l.pin.display(),
                old_program = r.old_program,
                new_program = r.new_program,
                "upgraded"
            ),
            Outcome::TargetGone => tracing::warn!(link = %l.pin.display(), "target gone"),
            Outcome::Failed { reason } => {
                tracing::warn!(link = %l.pin.display(), reason, "not upgraded")
            }
        }
        out.links.push(r);
        test_pause();
    }
    Ok(out)
}

/// Makes the link pinned at `pin` run `new_prog` (BPF_LINK_UPDATE with BPF_F_REPLACE).
pub(crate) fn replace_program(
    name: &'static str,
    pin: &Path,
    scope: Option<u64>,
    new_prog: BorrowedFd<'_>,
) -> LinkUpgrade {
    let mut r = LinkUpgrade {
        name,
        pin: pin.into(),
        scope,
        link_id: None,
        old_program: None,
        new_program: None,
        outcome: Outcome::Upgraded,
    };
    let fail = |mut r: LinkUpgrade, reason: String| {
        r.outcome = Outcome::Failed { reason };
        r
    };
    let link = match sys::obj_get(pin) {
        Ok(fd) => fd,
        Err(e) => return fail(r, format!("opening the pinned link: {e}")),
    };
    let info = match sys::link_info(link.as_fd()) {
        Ok(i) => i,
        Err(e) => return fail(r, format!("reading the link's info: {e}")),
    };
    r.link_id = Some(info.id);
    r.old_program = Some(info.prog_id);
    let new_id = match sys::prog_info(new_prog) {
        Ok(i) => i.id,
        Err(e) => return fail(r, format!("reading the new program's info: {e}")),
    };
    if info.prog_id == new_id {
        r.new_program = Some(new_id);
        return r;
    }
    let old = match sys::prog_fd_by_id(info.prog_id) {
        Ok(fd) => fd,
        Err(e) => {
            return fail(
                r,
                format!(
                    "opening its program {}: {e}; rerun `interceptor upgrade`",
                    info.prog_id
                ),
            )
        }
    };
    match sys::link_update(link.as_fd(), new_prog, old.as_fd()) {
        Ok(()) => {
            r.new_program = Some(new_id);
            r
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {
            r.outcome = Outcome::TargetGone;
            r
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => fail(
            r,
            format!(
                "the link changed while it was being upgraded ({e}); rerun `interceptor upgrade`"
            ),
        ),
        Err(e) => fail(r, format!("BPF_LINK_UPDATE: {e}")),
    }
}
