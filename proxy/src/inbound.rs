//! Inbound listeners: accept a connection that the kernel's `sk_lookup` program steered
//! here for one of the workload's ports, and forward it to that port.
//!
//! Nothing is rewritten on the way in, so the accepted socket's *local* address is the
//! original destination (e.g. 10.1.0.5:8080) although the listener is bound to
//! 0.0.0.0:15006. The proxy connects there from the inbound source address (default
//! 127.0.0.6 / ::1), which the kernel program lets through to the workload, with the
//! bypass mark, and copies both ways exactly as the outbound path does.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::warn;

use crate::forward::reset_on_close;
use crate::listener::Handler;
use crate::stats::Direction;
use crate::stats::{ActiveGuard, Stats};
use crate::upstream::{connect_and_forward, UpstreamOptions};

/// What every inbound connection needs; shared by all inbound listeners of one proxy.
#[derive(Debug)]
pub struct Inbound {
    /// Ports of all of the proxy's own listeners (inbound, outbound, admin): a connection
    /// whose destination has one of these ports is never forwarded.
    pub own_ports: Vec<u16>,
    /// Source address of upstream connections to IPv4 destinations.
    pub source_v4: Ipv4Addr,
    /// Source address of upstream connections to IPv6 destinations.
    pub source_v6: Ipv6Addr,
    /// SO_MARK for upstream sockets; 0 = none.
    pub bypass_mark: u32,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Idle timeout of forwarded connections; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Counters (this direction uses `stats.inbound`).
    pub stats: Arc<Stats>,
}

impl Inbound {
    /// The source address to bind for an upstream connection to `dst`.
    pub fn source_for(&self, dst: SocketAddr) -> IpAddr {
        match dst {
            SocketAddr::V4(_) => self.source_v4.into(),
            SocketAddr::V6(_) => self.source_v6.into(),
        }
    }
}

/// The original destination of a steered connection: the accepted socket's local
/// address, IPv4-mapped IPv6 turned into IPv4.
pub fn original_destination(client: &TcpStream) -> io::Result<SocketAddr> {
    client.local_addr().map(canonical)
}

/// `addr` with an IPv4-mapped IPv6 address turned into IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Why forwarding a connection from `peer` to `dst` would loop back into the proxy, if it
/// would:
/// - `dst` has the port of one of the proxy's own listeners (`own_ports`), e.g. someone
///   connected to the inbound listener directly;
/// - `peer` is the proxy's own inbound source address for that family: a connection the
///   proxy itself made was steered back, so the kernel programs do not exempt that
///   source, and forwarding it again would repeat forever.
pub fn loop_reason(
    dst: SocketAddr,
    peer: SocketAddr,
    own_ports: &[u16],
    source_v4: Ipv4Addr,
    source_v6: Ipv6Addr,
) -> Option<&'static str> {
    if own_ports.contains(&dst.port()) {
        return Some("destination port is one of the proxy's own listeners");
    }
    let from_own_source = match peer.ip().to_canonical() {
        IpAddr::V4(ip) => ip == source_v4,
        IpAddr::V6(ip) => ip == source_v6,
    };
    if from_own_source {
        return Some(
            "connection comes from the proxy's own inbound source address (not exempted from interception?)",
        );
    }
    None
}

impl Handler for Inbound {
    /// Handles one steered connection from start to close.
    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let stats = &self.stats.inbound;
        let _active = ActiveGuard::accepted(stats);
        let peer = canonical(peer);
        let orig_dst = match original_destination(&client) {
            Ok(a) => a,
            Err(e) => {
                warn!(client = %peer, error = %e, "inbound: getsockname on the accepted socket failed; closing");
                reset_on_close(&client);
                return;
            }
        };
        if let Some(reason) = loop_reason(
            orig_dst,
            peer,
            &self.own_ports,
            self.source_v4,
            self.source_v6,
        ) {
            stats.loop_rejected.fetch_add(1, Relaxed);
            warn!(direction = "inbound", client = %peer, orig_dst = %orig_dst, reason,
                "refusing to forward to itself; closing");
            reset_on_close(&client);
            return;
        }
        let opts = |dst| UpstreamOptions {
            bypass_mark: self.bypass_mark,
            source: Some(self.source_for(dst)),
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
        };
        connect_and_forward(
            client,
            peer,
            orig_dst,
            opts,
            &self.stats,
            Direction::Inbound,
        )
        .await;
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
        let own = [15001, 15006, 15000];
        let (s4, s6): (Ipv4Addr, Ipv6Addr) = ("127.0.0.6".parse().unwrap(), Ipv6Addr::LOCALHOST);
        let client = a("10.0.0.9:40000");
        let client6 = a("[fd00::9]:40000");
        // The workload's ports are forwarded.
        assert_eq!(loop_reason(a("10.1.0.5:8080"), client, &own, s4, s6), None);
        assert_eq!(
            loop_reason(a("[fd00::5]:8080"), client6, &own, s4, s6),
            None
        );
        assert_eq!(loop_reason(a("127.0.0.1:8080"), client, &own, s4, s6), None);
        // Any address on one of our own ports is not, whichever listener it is.
        for port in own {
            for ip in ["10.1.0.5", "127.0.0.1", "0.0.0.0"] {
                let dst = SocketAddr::new(ip.parse().unwrap(), port);
                assert!(loop_reason(dst, client, &own, s4, s6).is_some(), "{dst}");
            }
            let dst = SocketAddr::new("fd00::5".parse().unwrap(), port);
            assert!(loop_reason(dst, client6, &own, s4, s6).is_some(), "{dst}");
        }
        // Nor is a connection the proxy made itself that came back.
        assert!(loop_reason(a("10.1.0.5:8080"), a("127.0.0.6:5555"), &own, s4, s6).is_some());
        assert!(loop_reason(a("[fd00::5]:8080"), a("[::1]:5555"), &own, s4, s6).is_some());
        assert!(loop_reason(
            a("10.1.0.5:8080"),
            a("[::ffff:127.0.0.6]:5555"),
            &own,
            s4,
            s6
        )
        .is_some());
        // Other loopback clients are fine.
        assert_eq!(
            loop_reason(a("10.1.0.5:8080"), a("127.0.0.1:5555"), &own, s4, s6),
            None
        );
    }

    #[test]
    fn mapped_destinations_become_ipv4() {
        assert_eq!(canonical(a("[::ffff:10.1.0.5]:8080")), a("10.1.0.5:8080"));
        assert_eq!(canonical(a("[fd00::5]:8080")), a("[fd00::5]:8080"));
        assert_eq!(canonical(a("10.1.0.5:8080")), a("10.1.0.5:8080"));
    }

    #[test]
    fn source_by_family() {
        let ctx = Inbound {
            own_ports: vec![],
            source_v4: "127.0.0.6".parse().unwrap(),
            source_v6: Ipv6Addr::LOCALHOST,
            bypass_mark: 0,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: None,
            stats: Arc::default(),
        };
        assert_eq!(
            ctx.source_for(a("10.1.0.5:80")),
            "127.0.0.6".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            ctx.source_for(a("[fd00::5]:80")),
            "::1".parse::<IpAddr>().unwrap()
        );
    }
}
