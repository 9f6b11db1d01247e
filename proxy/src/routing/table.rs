//! The compiled routing table: what a destination is (a service port and its protocol),
//! the HTTP routes and TLS rules of a virtual service, a service's own cluster.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;

use super::balance::{Cluster, WeightedCluster};
use super::file::Protocol;
use super::stats::RouteStats;

/// A compiled string match.
#[derive(Debug, Clone)]
pub enum Matcher {
    Exact(String),
    Prefix(String),
    /// Anchored, as Istio's (RE2 full match).
    Regex(Regex),
}

impl Matcher {
    pub fn matches(&self, v: &str) -> bool {
        match self {
            Matcher::Exact(s) => v == s,
            Matcher::Prefix(s) => v.starts_with(s.as_str()),
            Matcher::Regex(r) => r.is_match(v),
        }
    }
}

/// One `match` entry: every condition must hold.
#[derive(Debug, Clone, Default)]
pub struct Match {
    pub uri: Option<Matcher>,
    pub method: Option<Matcher>,
    pub headers: Vec<(::http::HeaderName, Matcher)>,
    pub query: Vec<(String, Matcher)>,
    pub grpc_service: Option<String>,
    pub grpc_method: Option<String>,
    pub source: Option<Matcher>,
    pub dubbo: Option<DubboMatch>,
}

impl Match {
    /// Whether it says anything about an HTTP request (so it cannot hold for a Dubbo one).
    pub fn has_http_conditions(&self) -> bool {
        self.uri.is_some()
            || self.method.is_some()
            || !self.headers.is_empty()
            || !self.query.is_empty()
            || self.grpc_service.is_some()
    }
}

/// The `dubbo` part of a match: every condition must hold.
#[derive(Debug, Clone, Default)]
pub struct DubboMatch {
    pub service: Option<Matcher>,
    pub version: Option<Matcher>,
    pub method: Option<Matcher>,
    /// (argument index, match)
    pub args: Vec<(usize, Matcher)>,
    /// (attachment key, match)
    pub attachments: Vec<(String, Matcher)>,
}

#[derive(Debug, Clone)]
pub struct HeaderOps {
    pub set: Vec<(::http::HeaderName, ::http::HeaderValue)>,
    pub add: Vec<(::http::HeaderName, ::http::HeaderValue)>,
    pub remove: Vec<::http::HeaderName>,
}

/// A compiled HTTP route.
#[derive(Debug, Clone)]
pub struct Route {
    pub virtual_service: String,
    pub name: String,
    /// Any of these (none: every request).
    pub matches: Vec<Match>,
    pub clusters: Vec<WeightedCluster>,
    pub total_weight: u32,
    pub timeout: Option<Duration>,
    pub connect_retries: u32,
    pub request_headers: Option<HeaderOps>,
    pub response_headers: Option<HeaderOps>,
    pub stats: Arc<RouteStats>,
}

#[derive(Debug, Clone)]
pub struct TlsRule {
    pub sni: Vec<String>,
    pub clusters: Vec<WeightedCluster>,
    pub total_weight: u32,
}

/// What a destination address:port is, for the routing table.
#[derive(Debug, Clone)]
pub struct PortPlan {
    pub service: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// A compiled routing file.
#[derive(Debug, Default)]
pub struct Table {
    /// Service address and port -> what it is.
    pub(super) by_addr: HashMap<SocketAddr, PortPlan>,
    /// host -> virtual service index.
    pub(super) vs_by_host: HashMap<String, usize>,
    /// Per virtual service: its HTTP routes, in order.
    pub(super) http: Vec<Vec<Route>>,
    /// Per virtual service: its TLS rules, in order.
    pub(super) tls: Vec<Vec<TlsRule>>,
    /// (service host, port) -> the cluster without subset.
    pub(super) default_clusters: HashMap<(String, u16), Arc<Cluster>>,
    /// (service host, port, subset or "") -> cluster: what a Wasm plugin may choose.
    pub(super) clusters: HashMap<(String, u16, String), Arc<Cluster>>,
    /// The Wasm routing plugins, in the order they run.
    pub plugins: crate::wasm::Plugins,
}

impl Table {
    /// How connections to `dst` are handled; `None`: opaque TCP to `dst`.
    pub fn plan(&self, dst: SocketAddr) -> Option<&PortPlan> {
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        self.by_addr.get(&dst)
    }

    /// The HTTP routes for a request to `host` (the Host header or :authority, port
    /// stripped) on a connection to `plan`'s service.
    pub fn http_routes(&self, host: &str, plan: &PortPlan) -> Option<&[Route]> {
        let i = self
            .vs_by_host
            .get(host)
            .or_else(|| self.vs_by_host.get(&plan.service))?;
        Some(&self.http[*i])
    }

    pub fn tls_rules(&self, plan: &PortPlan) -> &[TlsRule] {
        match self.vs_by_host.get(&plan.service) {
            Some(i) => &self.tls[*i],
            None => &[],
        }
    }

    /// The service's own cluster on `port` (every endpoint, no subset).
    pub fn default_cluster(&self, service: &str, port: u16) -> Option<&Arc<Cluster>> {
        self.default_clusters.get(&(service.to_owned(), port))
    }

    /// The cluster a plugin named: `host` or `host/subset`, on `port` (or the host's only
    /// port).
    pub fn cluster_named(&self, name: &str, port: u16) -> Option<&Arc<Cluster>> {
        let (host, subset) = name.split_once('/').unwrap_or((name, ""));
        let host = host.to_ascii_lowercase();
        self.clusters
            .get(&(host.clone(), port, subset.to_owned()))
            .or_else(|| {
                let mut on_host = self
                    .clusters
                    .iter()
                    .filter(|((h, _, s), _)| *h == host && s == subset);
                match (on_host.next(), on_host.next()) {
                    (Some((_, c)), None) => Some(c),
                    _ => None,
                }
            })
    }

    /// An endpoint of the service's own cluster, or `orig_dst` when the service lists none.
    pub fn default_endpoint(&self, plan: &PortPlan, orig_dst: SocketAddr) -> SocketAddr {
        self.default_cluster(&plan.service, plan.port)
            .and_then(|c| c.pick(&[]))
            .map_or(orig_dst, |e| e.addr)
    }
}

/// Whether `ip` is one of this table's service addresses (any port).
pub fn is_service_address(t: &Table, ip: IpAddr) -> bool {
    t.by_addr.keys().any(|a| a.ip() == ip)
}
