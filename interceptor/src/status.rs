//! `status`: every scope attached from a pin dir, its settings and its pinned links.
use std::path::{Path, PathBuf};

use std::os::fd::AsFd as _;

use interceptor_common::AF_INET;
use serde::Serialize;

use crate::{
    error::Result,
    maps,
    paths::{PinLayout, INBOUND_LINK, ROOT_LINKS, SCOPE_LINKS},
    settings::{InboundSettings, ScopeSettings},
    sys, system,
};

#[derive(Clone, Debug, Serialize)]
pub struct LinkStatus {
    pub name: &'static str,
    pub pin: PathBuf,
    /// Kernel link id, when the pin holds a live link.
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
    /// The program's name (`redirect_connect4`, ...).
    pub program_name: Option<String>,
    /// The kernel's tag of the program (hex): a hash of its instructions, equal for equal code,
    /// so links that run the same build of a program show the same tag.
    pub program_tag: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScopeStatus {
    pub cgroup: String,
    pub cgroup_id: u64,
    /// False when the cgroup was removed after attach (its links no longer act).
    pub cgroup_exists: bool,
    pub settings: ScopeSettings,
    pub links: Vec<LinkStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct InboundStatus {
    pub netns: String,
    pub scope_id: u64,
    /// False when the namespace file was removed after attach.
    pub netns_exists: bool,
    pub settings: InboundSettings,
    /// Families whose inbound listener is registered (`ipv4`, `ipv6`); empty while no proxy is.
    pub registered: Vec<&'static str>,
    pub links: Vec<LinkStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub pin_dir: PathBuf,
    pub layout_version: Option<u32>,
    /// Kernel forwarding's verdict is attached to its map (`ICP_FWD_READY`): the programs
    /// take the proxy's requests. False: not attached yet, or the kernel refused it
    /// (`attach` logged why), and the proxy copies every connection itself.
    pub kernel_forwarding: bool,
    pub root_links: Vec<LinkStatus>,
    /// Outbound scopes (cgroups).
    pub scopes: Vec<ScopeStatus>,
    /// Inbound scopes (network namespaces).
    pub inbound: Vec<InboundStatus>,
}

fn link_status(name: &'static str, pin: PathBuf) -> LinkStatus {
    let link = sys::obj_get(&pin).ok();
    let info = link.as_ref().and_then(|l| sys::link_info(l.as_fd()).ok());
    let prog = info
        .and_then(|i| sys::prog_fd_by_id(i.prog_id).ok())
        .and_then(|fd| sys::prog_info(fd.as_fd()).ok());
    LinkStatus {
        name,
        link_id: info.map(|i| i.id),
        program_id: info.map(|i| i.prog_id),
        program_name: prog.as_ref().map(|p| p.name.clone()),
        program_tag: prog.map(|p| p.tag.iter().map(|b| format!("{b:02x}")).collect()),
        pin,
    }
}

pub fn status(layout: &PinLayout) -> Result<Status> {
    system::check_privileges()?;
    let mut out = Status {
        pin_dir: layout.root().into(),
        layout_version: None,
        kernel_forwarding: false,
        root_links: Vec::new(),
        scopes: Vec::new(),
        inbound: Vec::new(),
    };
    if !system::pin_dir_present(layout.root()) {
        return Ok(out);
    }
    let _lock = crate::lock::PinLock::shared(layout)?;
    if !layout.map(interceptor_common::maps::CONFIG).exists() {
        return Ok(out);
    }
    out.layout_version = maps::stored_layout(layout)?;
    out.kernel_forwarding = maps::forwarding_ready(layout)?;
    out.root_links = ROOT_LINKS
        .iter()
        .filter(|n| layout.root_link(n).exists())
        .map(|n| link_status(n, layout.root_link(n)))
        .collect();
    for scope in maps::read_scopes(layout)? {
        out.scopes.push(ScopeStatus {
            cgroup_exists: Path::new(&scope.path).is_dir(),
            cgroup: scope.path,
            cgroup_id: scope.id,
            settings: scope.settings,
            links: SCOPE_LINKS
                .iter()
                .map(|n| link_status(n, layout.scope_link(scope.id, n)))
                .collect(),
        });
    }
    for scope in maps::read_inbound_scopes(layout)? {
        out.inbound.push(InboundStatus {
            netns_exists: Path::new(&scope.path).exists(),
            netns: scope.path,
            scope_id: scope.id,
            settings: scope.settings,
            registered: scope
                .registered
                .iter()
                .map(|f| if *f == AF_INET { "ipv4" } else { "ipv6" })
                .collect(),
            links: vec![link_status(
                INBOUND_LINK,
                layout.scope_link(scope.id, INBOUND_LINK),
            )],
        });
    }
    Ok(out)
}
