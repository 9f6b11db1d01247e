//! The pinned links: which are pinned under a pin dir, and swapping the program a pinned link
//! runs in place (BPF_LINK_UPDATE), which `upgrade` does for every link and `attach` for the
//! links of the scope it attaches.
use std::{
    fs,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{
    netns,
    paths::{PinLayout, INBOUND_LINK, ROOT_LINKS, SCOPE_LINKS},
    sys,
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

/// Whether a live link is pinned at `pin`.
pub(crate) fn link_is_pinned(pin: &Path) -> bool {
    aya::programs::links::PinnedLink::from_pin(pin).is_ok()
}

/// A pinned link: its name, pin path and scope.
pub(crate) struct Pinned {
    pub(crate) name: &'static str,
    pub(crate) pin: PathBuf,
    pub(crate) scope: Option<u64>,
}

/// Every link pinned under the pin dir: root links, then each scope's, by scope id.
pub(crate) fn pinned_links(layout: &PinLayout) -> Vec<Pinned> {
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
