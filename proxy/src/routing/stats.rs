//! Route, cluster and Wasm plugin counters, kept by name across reloads: a reloaded table gets the same
//! counters for a route or cluster of the same name.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::wasm::PluginStats;

/// Counters of one route, kept across reloads (by virtual service and route name).
#[derive(Debug, Default)]
pub struct RouteStats {
    pub requests: AtomicU64,
}

/// Counters of one cluster, kept across reloads (by name).
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub requests: AtomicU64,
    /// Responses by class: 1xx..5xx at index 1..5.
    pub responses: [AtomicU64; 6],
    pub connect_errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub other_errors: AtomicU64,
    pub retries: AtomicU64,
}

/// Route and cluster counters by name, shared by every table the proxy loads.
#[derive(Debug, Default)]
pub struct RoutingStats {
    routes: Mutex<BTreeMap<(String, String), Arc<RouteStats>>>,
    clusters: Mutex<BTreeMap<String, Arc<ClusterStats>>>,
    plugins: Mutex<BTreeMap<String, Arc<PluginStats>>>,
    pub reloads: AtomicU64,
    pub reload_errors: AtomicU64,
    pub no_route: AtomicU64,
    pub dubbo: DubboStats,
}

/// Counters of Dubbo connections (every port).
#[derive(Debug, Default)]
pub struct DubboStats {
    /// Requests read from clients (heartbeats not counted).
    pub requests: AtomicU64,
    /// Heartbeat requests answered, from clients and from upstreams.
    pub heartbeats: AtomicU64,
    /// Connections closed for a frame without the magic.
    pub bad_magic: AtomicU64,
    /// Connections closed for a frame body over `--dubbo-max-body`.
    pub over_cap: AtomicU64,
    /// Requests whose body did not decode, answered BAD_REQUEST.
    pub bad_requests: AtomicU64,
    /// Upstream responses whose request id was not waiting (late after a timeout).
    pub unmatched_responses: AtomicU64,
    /// Upstream connections opened (pooled, shared by every client connection).
    pub upstream_connections: AtomicU64,
}

impl RoutingStats {
    pub(super) fn route(&self, vs: &str, name: &str) -> Arc<RouteStats> {
        self.routes
            .lock()
            .expect("route stats")
            .entry((vs.to_owned(), name.to_owned()))
            .or_default()
            .clone()
    }

    pub(super) fn cluster(&self, name: &str) -> Arc<ClusterStats> {
        self.clusters
            .lock()
            .expect("cluster stats")
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    pub(super) fn plugin(&self, name: &str) -> Arc<PluginStats> {
        self.plugins
            .lock()
            .expect("plugin stats")
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    pub fn plugins(&self) -> Vec<(String, Arc<PluginStats>)> {
        let m = self.plugins.lock().expect("plugin stats");
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn routes(&self) -> Vec<((String, String), Arc<RouteStats>)> {
        let m = self.routes.lock().expect("route stats");
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn clusters(&self) -> Vec<(String, Arc<ClusterStats>)> {
        let m = self.clusters.lock().expect("cluster stats");
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}
