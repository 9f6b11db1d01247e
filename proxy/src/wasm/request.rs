//! What a plugin sees of a request and what it decides: shared by the instances
//! ([`super::host`]) and the plugins ([`super::plugin`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;

/// Why a plugin could not be loaded: the message names the plugin and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

/// What a request's plugins decided.
#[derive(Debug, Default)]
pub enum Verdict {
    /// Route it (with the headers as the plugins left them): by the declarative routes, or
    /// to the cluster or route a plugin chose.
    #[default]
    Continue,
    /// Route it to this cluster (`host` or `host/subset`).
    Cluster(String),
    /// Route it by the virtual service's route of this name.
    Route(String),
    /// Answer it with this response.
    Reply(LocalReply),
    /// A fail-closed plugin failed: answer 503.
    Failed { plugin: String },
}

/// A response a plugin asked for.
#[derive(Debug, Clone, Default)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What a plugin may read of a request besides its headers.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    pub method: String,
    pub path: String,
    pub host: String,
    pub source: Option<SocketAddr>,
    pub workload: Option<String>,
    pub destination: Option<SocketAddr>,
    pub service: String,
    /// Dubbo requests: `service`, `version`, `method`, `args.N`, `attachments.KEY`.
    pub dubbo: BTreeMap<String, String>,
}

/// Counters of one plugin, kept by name across reloads.
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Requests the plugin ran for.
    pub calls: AtomicU64,
    /// Calls that trapped.
    pub traps: AtomicU64,
    /// Calls that ran out of fuel.
    pub fuel_exhausted: AtomicU64,
    /// Calls that were refused memory beyond the cap (and failed for it).
    pub memory_exceeded: AtomicU64,
    /// Requests answered by the plugin itself.
    pub local_replies: AtomicU64,
    /// Requests the plugin sent to a cluster or route of its choice.
    pub routed: AtomicU64,
    /// Requests a failing plugin answered 503 (fail closed).
    pub failed_closed: AtomicU64,
    /// Requests a failing plugin left to the declarative routes (fail open).
    pub failed_open: AtomicU64,
}

/// How an instance failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Trap,
    Fuel,
    Memory,
}
