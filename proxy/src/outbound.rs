//! Outbound listeners: accept a redirected connection, learn where it was going, connect
//! there with the bypass mark and forward.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::warn;

use crate::forward::reset_on_close;
use crate::listener::Handler;
use crate::original_dst::{original_dst, OriginalDstError};
use crate::stats::Direction;
use crate::stats::{ActiveGuard, Stats};
use crate::upstream::{connect_and_forward, UpstreamOptions};

/// How the original destination of an accepted connection is found, from the socket and
/// the peer address `accept` gave. The default is [`original_dst`] (getsockopt); tests
/// and embedders may substitute their own.
pub type OriginalDstLookup =
    Arc<dyn Fn(&TcpStream, SocketAddr) -> Result<SocketAddr, OriginalDstError> + Send + Sync>;

/// The default lookup: getsockopt(SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST).
pub fn getsockopt_lookup() -> OriginalDstLookup {
    Arc::new(|s: &TcpStream, peer| original_dst(s, peer))
}

/// What every outbound connection needs; shared by all listeners of one proxy.
pub struct Outbound {
    /// Addresses the outbound listeners are bound to (a connection to one of them is a loop).
    pub listeners: Vec<SocketAddr>,
    /// SO_MARK for upstream sockets; 0 = none.
    pub bypass_mark: u32,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Idle timeout of forwarded connections; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Counters (this direction uses `stats.outbound` and `stats.orig_dst_missing`).
    pub stats: Arc<Stats>,
    /// Original destination lookup.
    pub lookup: OriginalDstLookup,
    /// Routing of connections to service ports (with `--routes`).
    pub routes: Option<Arc<crate::routing::RouteServer>>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("listeners", &self.listeners)
            .field("bypass_mark", &format_args!("{:#x}", self.bypass_mark))
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl Handler for Outbound {
    /// Handles one redirected connection from start to close.
    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let stats = &self.stats.outbound;
        let _active = ActiveGuard::accepted(stats);
        let orig_dst = match (self.lookup)(&client, peer) {
            Ok(a) => a,
            Err(e) => {
                self.stats.orig_dst_missing.fetch_add(1, Relaxed);
                warn!(client = %peer, reason = %e, "no original destination (connection not intercepted?); closing");
                reset_on_close(&client);
                return;
            }
        };
        if is_own_listener(orig_dst, &self.listeners) {
            stats.loop_rejected.fetch_add(1, Relaxed);
            warn!(client = %peer, orig_dst = %orig_dst, reason = "original destination is the proxy's own listener",
                "refusing to forward to itself; closing");
            reset_on_close(&client);
            return;
        }
        if let Some(routes) = &self.routes {
            let plan = routes.routing.current().plan(orig_dst).cloned();
            if let Some(plan) = plan {
                let workload = crate::original_dst::calling_workload(&client);
                // Boxed: only routed connections pay for the routing state.
                Box::pin(
                    routes
                        .clone()
                        .handle(client, peer, orig_dst, plan, workload),
                )
                .await;
                return;
            }
        }
        let opts = |_| UpstreamOptions {
            bypass_mark: self.bypass_mark,
            source: None,
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
        };
        connect_and_forward(
            client,
            peer,
            orig_dst,
            opts,
            &self.stats,
            Direction::Outbound,
        )
        .await;
    }
}

/// True when forwarding to `dst` would connect back to one of our own listeners: it is a
/// listener address exactly, or it has a listener's port and a loopback, unspecified,
/// listener or local interface address.
pub fn is_own_listener(dst: SocketAddr, listeners: &[SocketAddr]) -> bool {
    let ip = canonical(dst.ip());
    let mut same_port = false;
    for l in listeners {
        if l.port() != dst.port() {
            continue;
        }
        if canonical(l.ip()) == ip || ip.is_loopback() || ip.is_unspecified() {
            return true;
        }
        same_port = true;
    }
    same_port && is_local_interface_address(ip)
}

fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Whether `ip` is configured on a local interface. Only asked on the rare path where the
/// port already matches a listener, so a getifaddrs call per question is fine.
fn is_local_interface_address(ip: IpAddr) -> bool {
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => addrs.into_iter().any(|a| {
            a.address.is_some_and(|s| {
                s.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())) == Some(ip)
                    || s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())) == Some(ip)
            })
        }),
        // Can't tell: err on the side of not forwarding to ourselves.
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loop_detection() {
        let ls = [a("127.0.0.1:15001"), a("[::1]:15001")];
        assert!(is_own_listener(a("127.0.0.1:15001"), &ls));
        assert!(is_own_listener(a("127.0.0.2:15001"), &ls));
        assert!(is_own_listener(a("[::1]:15001"), &ls));
        assert!(is_own_listener(a("[::ffff:127.0.0.1]:15001"), &ls));
        assert!(is_own_listener(a("0.0.0.0:15001"), &ls));
        assert!(!is_own_listener(a("127.0.0.1:15002"), &ls));
        assert!(
            !is_own_listener(a("192.0.2.1:15001"), &ls),
            "TEST-NET address is not local"
        );
        assert!(!is_own_listener(a("192.0.2.1:80"), &ls));
        // Non-loopback listener: exact match, or another local address on its port.
        let wild = [a("0.0.0.0:15001")];
        assert!(is_own_listener(a("127.0.0.1:15001"), &wild));
        assert!(!is_own_listener(a("198.51.100.7:15001"), &wild));
    }
}
