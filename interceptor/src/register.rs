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
    /// The families it serves: `AF_INET`, `AF_INET6`, or both for a dual-stack `[::]`
    /// listener (one that is not IPv6-only).
    pub families: Vec<u16>,
}

/// A listening stream socket's address and whether it takes IPv4 too (an IPv6 socket bound
/// to `::` without `IPV6_V6ONLY`).
fn listener_addr(sock: &OwnedFd) -> Option<(SocketAddr, bool)> {
    let listening = getsockopt(sock, sockopt::AcceptConn).ok()?;
    let stream = getsockopt(sock, sockopt::SockType).ok()? == nix::sys::socket::SockType::Stream;
    if !listening || !stream {
        return None;
    }
    let addr: SockaddrStorage = getsockname(std::os::fd::AsRawFd::as_raw_fd(sock)).ok()?;
    if let Some(a) = addr.as_sockaddr_in() {
        Some((SocketAddr::from((a.ip(), a.port())), false))
    } else {
        let a = addr.as_sockaddr_in6()?;
        let dual = a.ip().is_unspecified() && !getsockopt(sock, sockopt::Ipv6V6Only).ok()?;
        Some((SocketAddr::from((a.ip(), a.port())), dual))
    }
}

/// Finds the TCP sockets of process `pid` that listen on the scope's inbound port inside the
/// namespace at `netns_path`, and registers them: one per family, where a dual-stack `[::]`
/// listener (not IPv6-only, Envoy's default) serves IPv4 too unless an IPv4 listener is
/// there. A listener that is not TCP (SCTP, MPTCP) is refused.
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
    // Per family, the listener that serves it: an IPv4 listener, else a dual-stack one.
    let mut v4: Option<(i32, OwnedFd, SocketAddr)> = None;
    let mut v6: Option<(i32, OwnedFd, SocketAddr, bool)> = None;
    let mut not_tcp: Vec<String> = Vec::new();
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
        let Some((addr, dual)) = listener_addr(&sock) else {
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
        match sys::socket_protocol(sock.as_fd()) {
            Ok(p) if p == libc::IPPROTO_TCP => {}
            Ok(p) => {
                not_tcp.push(format!("fd {n} on {addr} is protocol {p}, not TCP"));
                continue;
            }
            Err(e) => {
                not_tcp.push(format!("fd {n} on {addr}: cannot read its protocol: {e}"));
                continue;
            }
        }
        if addr.is_ipv4() {
            v4.get_or_insert((n, sock, addr));
        } else if v6.as_ref().is_none_or(|(_, _, _, d)| !d && dual) {
            v6 = Some((n, sock, addr, dual));
        }
    }
    let mut out = Vec::new();
    match (v4, v6) {
        (None, None) if !not_tcp.is_empty() => {
            return Err(fail(format!(
                "listens on port {port} in network namespace {} only with sockets that are not TCP ({}); the inbound listener must be a TCP socket (SOCK_STREAM, IPPROTO_TCP)",
                netns_path.display(),
                not_tcp.join("; ")
            )));
        }
        (None, None) => {
            return Err(fail(format!(
                "has no TCP socket listening on port {port} in network namespace {}; start the proxy with an inbound listener on that port (e.g. `interceptor-proxy --inbound 0.0.0.0:{port}`) or pass the proxy's pid",
                netns_path.display()
            )));
        }
        (v4, v6) => {
            let dual_serves_v4 = v4.is_none() && v6.as_ref().is_some_and(|(_, _, _, d)| *d);
            if let Some((n, sock, addr, _)) = v6 {
                let mut families = vec![AF_INET6];
                maps::register_listener(layout, scope, AF_INET6, &sock)?;
                if dual_serves_v4 {
                    maps::register_listener(layout, scope, AF_INET, &sock)?;
                    families.insert(0, AF_INET);
                }
                out.push(Registered {
                    fd: n,
                    addr,
                    families,
                });
            }
            if let Some((n, sock, addr)) = v4 {
                maps::register_listener(layout, scope, AF_INET, &sock)?;
                out.insert(
                    0,
                    Registered {
                        fd: n,
                        addr,
                        families: vec![AF_INET],
                    },
                );
            }
        }
    }
    Ok(out)
}
