//! `attach`: load the programs, write a scope's settings, attach and pin the links.
//!
//! A failed attach undoes what it did, in reverse order: links it created are unpinned (which
//! detaches them), map entries it wrote are restored or removed, directories and maps it
//! created are removed. Attaching a scope that is already attached rewrites its settings in
//! place and keeps its links: a cgroup never gets two redirect programs from one pin dir; the
//! links it keeps are brought to this binary's programs (BPF_LINK_UPDATE, as `upgrade` does for
//! every scope), so re-running `attach` with a newer interceptor upgrades that scope.
//!
//! A loader killed at any point (no undo runs then) leaves a state the next `attach` completes:
//! directories and maps are reused, links already pinned are kept, missing ones are created.
//! The root links are attached before the scope's links, and the connect programs last, so
//! that no connection is ever redirected before the programs that hand its destination to the
//! proxy are in place: a half-done attach leaves each connection either proxied or direct.
use std::{
    fs,
    path::{Path, PathBuf},
};

use std::os::fd::{AsFd as _, OwnedFd};

use aya::Ebpf;
use interceptor_common::programs as progs;

use crate::{
    cgroup::{self, Cgroup},
    error::{Error, Result},
    links::{self, LinkUpgrade, Outcome},
    lock::PinLock,
    maps, netns,
    object::EBPF_OBJECT,
    paths::{PinLayout, INBOUND_LINK, ROOT_LINKS, SCOPE_LINKS},
    programs,
    settings::{InboundSettings, ScopeSettings},
    sys::{self, AttachType},
    system, test_hook,
};

/// What `attach` did.
#[derive(Clone, Debug)]
pub struct Attached {
    pub cgroup: Cgroup,
    /// False when the scope was attached already and only its settings were rewritten.
    pub created: bool,
    /// Links pinned by this call.
    pub new_links: Vec<PathBuf>,
    /// Links that were pinned already, brought to this binary's programs.
    pub updated_links: Vec<LinkUpgrade>,
}

/// One step to take back if the attach fails later on.
enum Undo {
    Unpin(PathBuf),
    RemoveScope(u64),
    RestoreScope(maps::StoredScope),
    RestoreInbound(maps::StoredInbound),
    RemoveDir(PathBuf),
    RemoveMaps,
}

#[derive(Default)]
struct UndoLog(Vec<Undo>);

impl UndoLog {
    fn run(self, layout: &PinLayout) {
        for step in self.0.into_iter().rev() {
            let outcome = match &step {
                Undo::Unpin(p) => crate::detach::unpin_link(p).map(|_| ()),
                Undo::RemoveScope(id) => maps::remove_scope(layout, *id),
                Undo::RestoreScope(s) => {
                    maps::write_scope(layout, s.id, Path::new(&s.path), &s.settings)
                }
                Undo::RestoreInbound(s) => {
                    maps::write_inbound_scope(layout, s.id, Path::new(&s.path), &s.settings)
                }
                Undo::RemoveDir(p) => fs::remove_dir(p)
                    .or_else(ignore_missing)
                    .map_err(|e| Error::io(format!("removing {}", p.display()), e)),
                Undo::RemoveMaps => {
                    crate::detach::remove_maps(layout);
                    Ok(())
                }
            };
            if let Err(e) = outcome {
                tracing::warn!(error = %e, "rolling back a failed attach");
            }
        }
    }
}

fn ignore_missing(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// Attaches the interception to the cgroup at `path` (or updates it in place).
pub fn attach(layout: &PinLayout, path: &Path, settings: &ScopeSettings) -> Result<Attached> {
    settings.validate()?;
    let cg = cgroup::resolve(path)?;
    locked_with_undo(layout, |undo| attach_steps(layout, &cg, settings, undo))
}

/// Checks what every attach needs, takes the pin dir lock and runs `steps`; when they fail,
/// undoes what they did, in reverse order.
fn locked_with_undo<T>(
    layout: &PinLayout,
    steps: impl FnOnce(&mut UndoLog) -> Result<T>,
) -> Result<T> {
    system::check_privileges()?;
    if EBPF_OBJECT.is_empty() {
        return Err(Error::NoObject);
    }
    // Before anything changes: a kernel without a required hook, helper or map type is
    // refused here, naming what it lacks, instead of half way through by the verifier.
    crate::features::require()?;
    system::ensure_bpffs(layout.root())?;
    let (_lock, created) = PinLock::acquire_creating(layout)?;
    let mut undo = UndoLog::default();
    if created {
        undo.0.push(Undo::RemoveDir(layout.root().into()));
    }
    steps(&mut undo).inspect_err(|_| undo.run(layout))
}

fn make_dir(p: &Path, undo: &mut UndoLog) -> Result<()> {
    match fs::create_dir(p) {
        Ok(()) => {
            undo.0.push(Undo::RemoveDir(p.into()));
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => Ok(()),
        Err(e) => Err(Error::PinDir {
            path: p.into(),
            reason: format!("cannot create it: {e}"),
        }),
    }
}

/// Creates the pin dir and maps if needed (refusing maps of another layout) and loads the
/// object for `scope`.
fn prepare(layout: &PinLayout, scope: u64, undo: &mut UndoLog) -> Result<Ebpf> {
    make_dir(layout.root(), undo)?;
    make_dir(&layout.maps_dir(), undo)?;
    maps::check_layout(layout)?;
    if maps::stored_layout(layout)? == Some(0) && !links::any_link_pinned(layout) {
        // Maps created by a loader that was killed before it stamped them, and nothing uses
        // them: start afresh rather than trust maps whose layout nobody recorded.
        tracing::info!(maps = %layout.maps_dir().display(), "removing unstamped maps left by an interrupted attach");
        crate::detach::remove_maps(layout);
        make_dir(&layout.maps_dir(), undo)?;
    }
    let maps_existed = layout.map(interceptor_common::maps::LAYOUT).exists();
    let ebpf = programs::load(layout, scope)?;
    if !maps_existed {
        undo.0.push(Undo::RemoveMaps);
    }
    maps::stamp_layout(layout)?;
    test_hook::test_pause();
    Ok(ebpf)
}

/// Attaches inbound interception to the network namespace at `path` (or updates it in
/// place): new TCP connections to the namespace's ports are steered into the proxy's inbound
/// listener once it is registered (see `register`).
pub fn attach_inbound(
    layout: &PinLayout,
    path: &Path,
    settings: &InboundSettings,
) -> Result<AttachedInbound> {
    settings.validate()?;
    let ns = netns::resolve(path)?;
    locked_with_undo(layout, |undo| {
        attach_inbound_steps(layout, &ns, settings, undo)
    })
}

/// What `attach_inbound` did.
#[derive(Clone, Debug)]
pub struct AttachedInbound {
    pub netns: PathBuf,
    pub scope_id: u64,
    /// False when the namespace was attached already and only its settings were rewritten.
    pub created: bool,
    pub new_links: Vec<PathBuf>,
    /// The link, when it was pinned already, brought to this binary's program.
    pub updated_links: Vec<LinkUpgrade>,
}

fn attach_inbound_steps(
    layout: &PinLayout,
    ns: &netns::Netns,
    settings: &InboundSettings,
    undo: &mut UndoLog,
) -> Result<AttachedInbound> {
    let scope = ns.scope_id();
    let mut ebpf = prepare(layout, scope, undo)?;
    let previous = maps::read_inbound_scopes(layout)?
        .into_iter()
        .find(|s| s.id == scope);
    let created = previous.is_none();
    undo.0.push(match previous {
        Some(p) => Undo::RestoreInbound(p),
        None => Undo::RemoveScope(scope),
    });
    maps::write_inbound_scope(layout, scope, &ns.path, settings)?;
    test_hook::test_pause();
    make_dir(&layout.scopes_dir(), undo)?;
    make_dir(&layout.scope_dir(scope), undo)?;
    let mut new_links = Vec::new();
    let mut updated_links = Vec::new();
    let pin = layout.scope_link(scope, INBOUND_LINK);
    if links::link_is_pinned(&pin) {
        updated_links.push(bring_up_to_date(
            &mut ebpf,
            INBOUND_LINK,
            &pin,
            Some(scope),
        )?);
    } else {
        let link = link_program(
            &mut ebpf,
            progs::SK_LOOKUP,
            AttachType::SkLookup,
            &ns.file,
            &ns.path,
        )?;
        pin_link(link, &pin, undo)?;
        new_links.push(pin);
    }
    Ok(AttachedInbound {
        netns: ns.path.clone(),
        scope_id: scope,
        created,
        new_links,
        updated_links,
    })
}

/// Refuses a cgroup inside, or above, another attached scope's cgroup. The connect programs
/// of a cgroup run before its ancestors'; the outer one would see a connect to the proxy and
/// clear the record the inner one just made. (A scope of the same path with another id is a
/// removed cgroup's, not a nesting.)
fn refuse_nested(cg: &Cgroup, scopes: &[maps::StoredScope]) -> Result<()> {
    for s in scopes.iter().filter(|s| s.id != cg.id) {
        let other = Path::new(&s.path);
        let relation = if other == cg.path {
            continue;
        } else if cg.path.starts_with(other) {
            "inside"
        } else if other.starts_with(&cg.path) {
            "above"
        } else {
            continue;
        };
        return Err(Error::NestedScope {
            path: cg.path.clone(),
            relation,
            other: s.path.clone(),
        });
    }
    Ok(())
}

fn attach_steps(
    layout: &PinLayout,
    cg: &Cgroup,
    settings: &ScopeSettings,
    undo: &mut UndoLog,
) -> Result<Attached> {
    let mut ebpf = prepare(layout, cg.id, undo)?;
    let scopes = maps::read_scopes(layout)?;
    refuse_nested(cg, &scopes)?;
    let previous = scopes.into_iter().find(|s| s.id == cg.id);
    let created = previous.is_none();
    undo.0.push(match previous {
        Some(p) => Undo::RestoreScope(p),
        None => Undo::RemoveScope(cg.id),
    });
    maps::write_scope(layout, cg.id, &cg.path, settings)?;
    test_hook::test_pause();

    let mut new_links = Vec::new();
    let mut updated_links = Vec::new();

    // Kernel forwarding's verdict, on its map (optional: without it the programs refuse the
    // proxy's requests and it copies). Before the root links, whose setsockopt program takes
    // those requests only once the verdict is there.
    if let Err(e) = programs::attach_verdict(&mut ebpf, layout) {
        tracing::warn!(error = %e, "kernel forwarding unavailable: the proxy copies the bytes itself");
    }

    // The programs that serve the proxy's side sit at the cgroup2 root, once per pin dir (the
    // proxy may run in any cgroup). They go first: they act only on connections that have a
    // record, and no connection has one before the scope's connect programs are attached.
    make_dir(&layout.root_links_dir(), undo)?;
    let root = cgroup::cgroup2_mount()?;
    let root_dir = cgroup::open_dir(&root)?;
    let root_progs = [
        (progs::SOCK_OPS, AttachType::SockOps),
        (progs::GETSOCKOPT, AttachType::CgroupGetsockopt),
        (progs::SETSOCKOPT, AttachType::CgroupSetsockopt),
    ];
    for (name, (prog, kind)) in ROOT_LINKS.iter().zip(root_progs) {
        let pin = layout.root_link(name);
        if links::link_is_pinned(&pin) {
            updated_links.push(bring_up_to_date(&mut ebpf, name, &pin, None)?);
            continue;
        }
        let link = link_program(&mut ebpf, prog, kind, &root_dir, &root)?;
        pin_link(link, &pin, undo)?;
        new_links.push(pin);
    }

    make_dir(&layout.scopes_dir(), undo)?;
    make_dir(&layout.scope_dir(cg.id), undo)?;
    let cgroup_dir = cgroup::open_dir(&cg.path)?;
    // getpeername first, the connect programs (which start the redirection) last.
    let scope_progs = [
        (
            "getpeername4",
            progs::GETPEERNAME4,
            AttachType::Inet4Getpeername,
        ),
        (
            "getpeername6",
            progs::GETPEERNAME6,
            AttachType::Inet6Getpeername,
        ),
        ("connect4", progs::CONNECT4, AttachType::Inet4Connect),
        ("connect6", progs::CONNECT6, AttachType::Inet6Connect),
    ];
    debug_assert!(scope_progs.iter().all(|(n, _, _)| SCOPE_LINKS.contains(n)));
    for (name, prog, kind) in scope_progs {
        let pin = layout.scope_link(cg.id, name);
        if links::link_is_pinned(&pin) {
            updated_links.push(bring_up_to_date(&mut ebpf, name, &pin, Some(cg.id))?);
            continue;
        }
        let link = link_program(&mut ebpf, prog, kind, &cgroup_dir, &cg.path)?;
        pin_link(link, &pin, undo)?;
        new_links.push(pin);
    }
    Ok(Attached {
        cgroup: cg.clone(),
        created,
        new_links,
        updated_links,
    })
}

/// Makes the pinned link run this load's program of the same name. A failure is an error
/// here (unlike in `upgrade`, which reports and goes on): the scope is being attached.
fn bring_up_to_date(
    ebpf: &mut Ebpf,
    name: &'static str,
    pin: &Path,
    scope: Option<u64>,
) -> Result<LinkUpgrade> {
    let fd = programs::program_fd(ebpf, programs::program_for_link(name), pin)?;
    let r = links::replace_program(name, pin, scope, fd);
    test_hook::test_pause();
    match &r.outcome {
        Outcome::Upgraded => Ok(r),
        Outcome::TargetGone => Err(Error::PinDir {
            path: pin.into(),
            reason: "the link's target is gone; detach the scope and attach it again".into(),
        }),
        Outcome::Failed { reason } => Err(Error::PinDir {
            path: pin.into(),
            reason: format!("cannot bring the link to this interceptor's program: {reason}"),
        }),
    }
}

fn pin_link(link: OwnedFd, pin: &Path, undo: &mut UndoLog) -> Result<()> {
    // On failure the link's fd is dropped, which detaches the program again.
    sys::obj_pin(link.as_fd(), pin)
        .map_err(|e| Error::io(format!("pinning link {}", pin.display()), e))?;
    undo.0.push(Undo::Unpin(pin.into()));
    test_hook::test_pause();
    Ok(())
}

/// Loads program `name` (once) and links it to `target` (a cgroup or a network namespace).
fn link_program(
    ebpf: &mut Ebpf,
    name: &str,
    kind: AttachType,
    target: &fs::File,
    target_path: &Path,
) -> Result<OwnedFd> {
    let fd = programs::program_fd(ebpf, name, target_path)?;
    sys::link_create(fd, target.as_fd(), kind)
        .map_err(|e| Error::io(format!("attaching {name} to {}", target_path.display()), e))
}
