//! `register`: put the proxy's inbound listening socket into the inbound scope's SOCKHASH.
//!
//! The loader takes a copy of the socket from the proxy's process with `pidfd_getfd`, so the
//! proxy needs no access to bpf and any proxy works (Envoy, HAProxy, `interceptor-proxy`).
//! The kernel drops the entry when the proxy closes the socket; a restarted proxy is
//! registered again with the same call, without re-attaching.
use std::{
    fs,
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
    path::Path,
};

use interceptor_common::{AF_INET, AF_INET6};
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockaddrStorage};

use crate::{
    error::{Error, Result},
    maps, netns,
    paths::PinLayout,
    sys, system,
};

/// A listener that was registered.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Registered {
    pub fd: i32,
    pub addr: SocketAddr,
}

fn listener_addr(sock: &OwnedFd) -> Option<SocketAddr> {
    let listening = getsockopt(sock, sockopt::AcceptConn).ok()?;
    let stream = getsockopt(sock, sockopt::SockType).ok()? == nix::sys::socket::SockType::Stream;
    if !listening || !stream {
        return None;
    }
    let addr: SockaddrStorage = getsockname(std::os::fd::AsRawFd::as_raw_fd(sock)).ok()?;
    if let Some(a) = addr.as_sockaddr_in() {
        Some(SocketAddr::from((a.ip(), a.port())))
    } else {
        addr.as_sockaddr_in6()
            .map(|a| SocketAddr::from((a.ip(), a.port())))
    }
}

/// Finds the TCP sockets of process `pid` that listen on the scope's inbound port inside the
/// namespace at `netns_path`, and registers them (one per family).
pub fn register(layout: &PinLayout, netns_path: &Path, pid: i32) -> Result<Vec<Registered>> {
    system::check_privileges()?;
    let ns = netns::resolve(netns_path)?;
    let scope = ns.scope_id();
    let inbound = maps::read_inbound_scopes(layout)?
        .into_iter()
        .find(|s| s.id == scope)
        .ok_or_else(|| Error::NotAttached {
            path: netns_path.into(),
        })?;
    let port = inbound.settings.inbound_port;
    let fail = |reason: String| Error::Register { pid, reason };
    let pidfd = sys::pidfd_open(pid).map_err(|e| fail(format!("cannot open it: {e}")))?;
    let fd_dir = format!("/proc/{pid}/fd");
    let entries = fs::read_dir(&fd_dir).map_err(|e| fail(format!("cannot list {fd_dir}: {e}")))?;
    let mut found: Vec<(u16, OwnedFd, Registered)> = Vec::new();
    for entry in entries.flatten() {
        let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let is_socket = fs::read_link(entry.path())
            .map(|t| t.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false);
        if !is_socket {
            continue;
        }
        let Ok(sock) = sys::pidfd_getfd(pidfd.as_fd(), n) else {
            continue;
        };
        let Some(addr) = listener_addr(&sock) else {
            continue;
        };
        if addr.port() != port {
            continue;
        }
        let same_ns = sys::socket_netns(sock.as_fd())
            .and_then(|f| fs::File::from(f).metadata())
            .map(|m| m.ino() == ns.ino)
            .unwrap_or(false);
        if !same_ns {
            continue;
        }
        let family = if addr.is_ipv4() { AF_INET } else { AF_INET6 };
        if found.iter().all(|(f, _, _)| *f != family) {
            found.push((family, sock, Registered { fd: n, addr }));
        }
    }
    if found.is_empty() {
        return Err(fail(format!(
            "has no TCP socket listening on port {port} in network namespace {}; start the proxy with an inbound listener on that port (e.g. `interceptor-proxy --inbound 0.0.0.0:{port}`) or pass the proxy's pid",
            netns_path.display()
        )));
    }
    let mut out = Vec::new();
    for (family, sock, reg) in found {
        maps::register_listener(layout, scope, family, &sock)?;
        out.push(reg);
    }
    Ok(out)
}
