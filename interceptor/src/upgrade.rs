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
use std::path::PathBuf;

use aya::Ebpf;
use interceptor_common::LAYOUT_VERSION;
use serde::Serialize;

pub use crate::links::{LinkUpgrade, Outcome};
use crate::{
    error::{Error, Result},
    links,
    lock::PinLock,
    maps,
    object::EBPF_OBJECT,
    paths::PinLayout,
    programs, system, test_hook,
};

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
    let links = links::pinned_links(layout);
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
                loads.push((key, programs::load(layout, key.unwrap_or(0))?));
                loads.len() - 1
            }
        };
        programs::program_fd(
            &mut loads[idx].1,
            programs::program_for_link(l.name),
            &l.pin,
        )?;
    }
    // Kernel forwarding's verdict on its map, before the links: sockets put in from now on
    // run the new one (those in the map keep theirs, which shares the maps of this same
    // layout), and the map is marked ready before the new setsockopt program, which asks for
    // it, takes the proxy's requests (maps pinned by a loader older than `ICP_FWD_READY` get
    // it now, unset).
    if let Some((_, ebpf)) = loads.first_mut() {
        if let Err(e) = programs::attach_verdict(ebpf, layout) {
            tracing::warn!(error = %e, "kernel forwarding's verdict not upgraded");
        }
    }
    // The root links come first in `links`; they use the first load, whatever its scope.
    for l in &links {
        let idx = loads.iter().position(|(s, _)| *s == l.scope).unwrap_or(0);
        let fd = programs::program_fd(
            &mut loads[idx].1,
            programs::program_for_link(l.name),
            &l.pin,
        )?;
        let r = links::replace_program(l.name, &l.pin, l.scope, fd);
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
        test_hook::test_pause();
    }
    Ok(out)
}
