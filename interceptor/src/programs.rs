//! The kernel programs of this binary: the embedded object loaded for a scope (reusing the
//! pinned maps), its programs verified and loaded one by one, and which program each pinned
//! link runs. `attach` and `upgrade` both load through here.
use std::{
    os::fd::{AsFd as _, BorrowedFd},
    path::Path,
};

use aya::{programs::Program, Ebpf, EbpfLoader};
use interceptor_common::SCOPE_ID_GLOBAL;

use crate::{
    error::{Error, Result},
    object::EBPF_OBJECT,
    paths::{PinLayout, INBOUND_LINK},
};

/// Loads the object for `scope`, reusing the pinned maps (creating and pinning them the first
/// time). Programs are verified and loaded later, one by one, by [`program_fd`].
pub(crate) fn load(layout: &PinLayout, scope: u64) -> Result<Ebpf> {
    let log_level = crate::kernel_log::level();
    EbpfLoader::new()
        .default_map_pin_directory(layout.maps_dir())
        .override_global(SCOPE_ID_GLOBAL, &scope, true)
        .override_global(crate::kernel_log::LEVEL_GLOBAL, &log_level, true)
        .load(EBPF_OBJECT)
        .map_err(|e| Error::bpf("loading the kernel programs", e))
}

/// The fd of program `name` of this load, loading (verifying) it the first time.
pub(crate) fn program_fd<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
    for_what: &Path,
) -> Result<BorrowedFd<'a>> {
    let err = |e: aya::programs::ProgramError| {
        Error::bpf(format!("loading {name} for {}", for_what.display()), e)
    };
    let prog = ebpf.program_mut(name).ok_or_else(|| {
        Error::bpf(
            "finding program",
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("program {name} is not in the embedded object"),
            ),
        )
    })?;
    if prog.fd().is_err() {
        match prog {
            Program::CgroupSockAddr(p) => p.load().map_err(err)?,
            Program::SockOps(p) => p.load().map_err(err)?,
            Program::CgroupSockopt(p) => p.load().map_err(err)?,
            Program::SkLookup(p) => p.load().map_err(err)?,
            Program::SkSkb(p) => p.load().map_err(err)?,
            _ => unreachable!("the object holds only these program types"),
        }
    }
    let prog = ebpf.program(name).expect("found above");
    Ok(prog.fd().map_err(err)?.as_fd())
}

/// Attaches this load's `forward_verdict` to the pinned `ICP_FWD` map (replacing the program
/// it had: sockets put in from now on run this one), then marks the map ready
/// (`ICP_FWD_READY`: the programs take the proxy's requests from then on). Kernel forwarding
/// is optional: a kernel that refuses it leaves the proxy copying every connection itself
/// (its requests refused), so the caller logs the error and goes on. A verdict attached
/// before stays attached and the map ready.
pub(crate) fn attach_verdict(ebpf: &mut Ebpf, layout: &PinLayout) -> Result<()> {
    use interceptor_common::{maps, programs as p};
    if let Some(e) = crate::test_hook::refuse_verdict() {
        return Err(e);
    }
    let map_path = layout.maps_dir().join(maps::FWD);
    let fd = program_fd(ebpf, p::VERDICT, &map_path)?;
    let map = crate::sys::obj_get(&map_path)
        .map_err(|e| Error::io(format!("opening {}", map_path.display()), e))?;
    crate::sys::prog_attach_map(fd, map.as_fd(), crate::sys::AttachType::SkSkbStreamVerdict)
        .map_err(|e| {
            Error::io(
                format!("attaching {} to {}", p::VERDICT, map_path.display()),
                e,
            )
        })?;
    crate::maps::mark_forwarding_ready(layout)
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
        "setsockopt" => p::SETSOCKOPT,
        INBOUND_LINK => p::SK_LOOKUP,
        other => unreachable!("no program for link {other}"),
    }
}
