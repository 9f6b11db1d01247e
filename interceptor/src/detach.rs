//! `detach`: unpin a scope's links (which detaches them) and remove its map entries. When the
//! last scope of a pin dir goes, the root links and the maps go too. Only links under the
//! pin dir, which this project created, are ever touched.
use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::programs::links::PinnedLink;
use interceptor_common::maps as names;

use crate::{
    cgroup,
    error::{Error, Result},
    lock::PinLock,
    maps, netns,
    paths::{PinLayout, INBOUND_LINK, ROOT_LINKS, SCOPE_LINKS},
    system,
};

/// What `detach` removed.
#[derive(Clone, Debug, Default)]
pub struct Detached {
    pub scopes: Vec<u64>,
    /// True when the root links and maps were removed as well (no scope left).
    pub cleaned_up: bool,
    /// No scope left, but the root links and maps were kept: this many sockets are still in
    /// `ICP_FWD`, forwarded by the kernel (a proxy's open connections with
    /// `--kernel-forward on`). Freeing the map would drop each one's psock, and with it the
    /// bytes queued in it (redirected and not yet sent, or passed and not yet read): those
    /// connections would lose bytes. A later detach (`detach --all`) finishes once they
    /// have closed.
    pub kept_for_kernel_forwarding: usize,
}

/// Unpins the link at `pin` and closes it: the kernel detaches it once nothing holds it.
/// Returns false when nothing was pinned there.
pub(crate) fn unpin_link(pin: &Path) -> Result<bool> {
    match PinnedLink::from_pin(pin) {
        Ok(link) => {
            let fd = link
                .unpin()
                .map_err(|e| Error::io(format!("unpinning {}", pin.display()), e))?;
            drop(fd);
            Ok(true)
        }
        Err(_) if !pin.exists() => Ok(false),
        Err(e) => Err(Error::bpf(
            format!("opening pinned link {}", pin.display()),
            e,
        )),
    }
}

/// Removes the pinned maps (the kernel frees them once no program uses them).
pub(crate) fn remove_maps(layout: &PinLayout) {
    for name in names::ALL {
        let _ = fs::remove_file(layout.map(name));
    }
    let _ = fs::remove_dir(layout.maps_dir());
}

/// Finds the scope id for a cgroup path: from the live cgroup if it still exists, else from
/// the path recorded at attach time (the cgroup may have been removed since).
fn scope_for(layout: &PinLayout, path: &Path) -> Result<u64> {
    let recorded = || -> Result<Option<u64>> {
        if !layout.map(names::CONFIG).exists() {
            return Ok(None);
        }
        let wanted: PathBuf = std::path::absolute(path).unwrap_or_else(|_| path.into());
        let outbound = maps::read_scopes(layout)?
            .into_iter()
            .map(|s| (s.id, s.path));
        let inbound = maps::read_inbound_scopes(layout)?
            .into_iter()
            .map(|s| (s.id, s.path));
        Ok(outbound
            .chain(inbound)
            .find(|(_, p)| Path::new(p) == wanted)
            .map(|(id, _)| id))
    };
    if let Ok(ns) = netns::resolve(path) {
        return Ok(ns.scope_id());
    }
    match cgroup::resolve(path) {
        Ok(cg) => Ok(cg.id),
        Err(Error::CgroupMissing { .. } | Error::NotCgroup2 { .. }) => {
            recorded()?.ok_or_else(|| Error::NotAttached { path: path.into() })
        }
        Err(e) => Err(e),
    }
}

/// Detaches the scope of the cgroup at `path`.
pub fn detach(layout: &PinLayout, path: &Path) -> Result<Detached> {
    system::check_privileges()?;
    let _lock = lock_if_present(layout)?;
    let id = scope_for(layout, path)?;
    let attached = layout.scope_dir(id).exists() || known_scopes(layout)?.contains(&id);
    if !attached {
        return Err(Error::NotAttached { path: path.into() });
    }
    detach_scope(layout, id)?;
    let (cleaned_up, kept_for_kernel_forwarding) = cleanup_if_unused(layout)?;
    Ok(Detached {
        scopes: vec![id],
        cleaned_up,
        kept_for_kernel_forwarding,
    })
}

/// Detaches the scope with id `id` (a cgroup id, or a network namespace's scope id), for
/// callers that know the id rather than a live path: the daemon, after a scope's cgroup was
/// removed and recreated under the same path. Removing an id that is not attached is not an
/// error (`scopes` is then empty).
pub fn detach_id(layout: &PinLayout, id: u64) -> Result<Detached> {
    system::check_privileges()?;
    let _lock = lock_if_present(layout)?;
    let attached = layout.scope_dir(id).exists() || known_scopes(layout)?.contains(&id);
    if !attached {
        return Ok(Detached::default());
    }
    detach_scope(layout, id)?;
    let (cleaned_up, kept_for_kernel_forwarding) = cleanup_if_unused(layout)?;
    Ok(Detached {
        scopes: vec![id],
        cleaned_up,
        kept_for_kernel_forwarding,
    })
}

/// Detaches every scope of the pin dir and removes the pin dir.
pub fn detach_all(layout: &PinLayout) -> Result<Detached> {
    system::check_privileges()?;
    let _lock = lock_if_present(layout)?;
    let mut ids: Vec<u64> = Vec::new();
    if let Ok(entries) = fs::read_dir(layout.scopes_dir()) {
        ids.extend(
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok()),
        );
    }
    ids.extend(known_scopes(layout)?);
    ids.sort_unstable();
    ids.dedup();
    for id in &ids {
        detach_scope(layout, *id)?;
    }
    let (cleaned_up, kept_for_kernel_forwarding) = cleanup_if_unused(layout)?;
    Ok(Detached {
        scopes: ids,
        cleaned_up,
        kept_for_kernel_forwarding,
    })
}

/// Takes the loaders' lock when there is a pin dir at all.
fn lock_if_present(layout: &PinLayout) -> Result<Option<PinLock>> {
    PinLock::acquire(layout)
}

/// Ids of every scope, outbound and inbound, that has entries in the maps.
fn known_scopes(layout: &PinLayout) -> Result<Vec<u64>> {
    if !layout.map(names::CONFIG).exists() {
        return Ok(Vec::new());
    }
    let mut ids: Vec<u64> = maps::read_scopes(layout)?
        .into_iter()
        .map(|s| s.id)
        .collect();
    ids.extend(maps::read_inbound_scopes(layout)?.into_iter().map(|s| s.id));
    Ok(ids)
}

fn detach_scope(layout: &PinLayout, id: u64) -> Result<()> {
    // Links first: from here on no connection of the scope is redirected.
    for name in SCOPE_LINKS.iter().chain([&INBOUND_LINK]) {
        unpin_link(&layout.scope_link(id, name))?;
    }
    if layout.map(names::CONFIG).exists() {
        maps::remove_scope(layout, id)?;
    }
    match fs::remove_dir(layout.scope_dir(id)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(
            format!("removing {}", layout.scope_dir(id).display()),
            e,
        )),
    }
}

/// With no scope left, removes the root links, the maps and the directories (true), unless
/// sockets are still forwarded by the kernel (their count: see
/// [`Detached::kept_for_kernel_forwarding`]).
fn cleanup_if_unused(layout: &PinLayout) -> Result<(bool, usize)> {
    let scopes_left = fs::read_dir(layout.scopes_dir())
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
        || !known_scopes(layout)?.is_empty();
    if scopes_left {
        return Ok((false, 0));
    }
    // The root links stay with the maps: the proxy still arms those sockets and reads their
    // counts (`getsockopt`) before it passes an EOF on, and `track_sockops` removes their
    // state when they close.
    let (_, forwarded) = maps::kernel_forward_count(layout).unwrap_or((0, 0));
    if forwarded > 0 {
        return Ok((false, forwarded));
    }
    for name in ROOT_LINKS {
        unpin_link(&layout.root_link(name))?;
    }
    remove_maps(layout);
    for dir in [
        layout.root_links_dir(),
        layout.scopes_dir(),
        layout.root().to_path_buf(),
    ] {
        let _ = fs::remove_dir(dir);
    }
    Ok((true, 0))
}
