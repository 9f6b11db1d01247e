//! [`Proxy`]: bind every listener (or take them over from the running process), then
//! serve until a shutdown signal or a hand-over to a new process, then drain.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | [`Proxy`], [`ProxyError`], what a bound proxy reports |
//! | `bind.rs` | [`Proxy::bind`]: routes loaded, listeners taken over or bound, the bypass mark checked |
//! | `serve.rs` | [`Proxy::serve`]: start accepting, complete a takeover, serve upgrades, stop, drain, report |

mod bind;
mod serve;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::admin::ReadyState;
use crate::config::Config;
use crate::outbound::OriginalDstLookup;
use crate::routing::{RoutesError, Routing};
use crate::stats::Stats;
use crate::upgrade::{ControlSocket, Takeover, UpgradeError};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A listener could not be bound.
    #[error("{what} {addr}: {}", describe_bind_error(what, error))]
    Bind {
        /// "outbound listener", "inbound listener" or "admin listener".
        what: &'static str,
        addr: SocketAddr,
        error: io::Error,
    },
    /// Every outbound listener was skipped (IPv6 unavailable and nothing else configured).
    #[error("no outbound listener could be bound; pass --outbound with an address this host has, e.g. 127.0.0.1:15001")]
    NoOutboundListeners,
    /// The bypass mark cannot be set on upstream sockets.
    #[error(
        "--bypass-mark {mark:#x}: cannot set SO_MARK on upstream sockets ({error}); upstream \
         connections would be intercepted again. Run the proxy with CAP_NET_ADMIN, or pass \
         --bypass-mark 0 if the proxy is exempt from interception another way (e.g. its uid)"
    )]
    BypassMark { mark: u32, error: io::Error },
    /// Signal handlers could not be installed.
    #[error("installing SIGTERM/SIGINT handlers: {0}")]
    Signal(io::Error),
    /// The routing file could not be loaded.
    #[error("{0}; fix the file given with --routes")]
    Routes(#[from] RoutesError),
    /// Taking over from the running proxy, or serving upgrades, failed.
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
}

fn describe_bind_error(what: &str, e: &io::Error) -> String {
    let flag = if what.starts_with("admin") {
        "--admin ADDR or --admin off"
    } else if what.starts_with("inbound") {
        "--inbound ADDR"
    } else {
        "--outbound ADDR"
    };
    match e.kind() {
        io::ErrorKind::AddrInUse => "address already in use (is another proxy running?)".to_owned(),
        io::ErrorKind::AddrNotAvailable => {
            format!("address not available on this host ({e}); choose a local address with {flag}")
        }
        io::ErrorKind::PermissionDenied => format!(
            "permission denied ({e}); ports below 1024 need CAP_NET_BIND_SERVICE, or choose another port with {flag}"
        ),
        _ => format!("{e}; check the address given with {flag}"),
    }
}

/// A proxy whose listeners are bound but which does not accept yet.
pub struct Proxy {
    config: Config,
    outbound: Vec<TcpListener>,
    inbound: Vec<TcpListener>,
    admin: Option<TcpListener>,
    control: Option<ControlSocket>,
    takeover: Option<Takeover>,
    routing: Arc<Routing>,
    stats: Arc<Stats>,
    ready: Arc<ReadyState>,
    lookup: OriginalDstLookup,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("outbound", &self.outbound_addrs())
            .field("inbound", &self.inbound_addrs())
            .field("admin", &self.admin_addr())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// The bound outbound listener addresses (IPv6 ones may have been skipped).
    pub fn outbound_addrs(&self) -> Vec<SocketAddr> {
        self.outbound
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The bound inbound listener addresses (empty without `--inbound`).
    pub fn inbound_addrs(&self) -> Vec<SocketAddr> {
        self.inbound
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The bound admin address, if the admin server is enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The live counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The configuration the proxy was bound with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Replaces how original destinations are found (default: getsockopt). For tests, and
    /// for embedding behind something that records destinations differently.
    pub fn set_original_dst_lookup(&mut self, lookup: OriginalDstLookup) {
        self.lookup = lookup;
    }
}
