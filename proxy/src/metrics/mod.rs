//! `/metrics`: the proxy's counters, latency histograms and (behind a runtime switch) its
//! per-destination counters, in the OpenMetrics text format written by `prometheus-client`.
//!
//! This module only renders. The live values stay where the hot path keeps them ([`crate::stats`]:
//! relaxed atomics, the histograms, the sharded per-destination table; the route and cluster
//! counters of [`crate::routing`]); a `prometheus-client` collector per source reads them at
//! scrape time, so counting costs nothing more than the atomic add it always was.
//! `connections.rs` renders [`Stats`], `routing.rs` renders [`RoutingStats`].
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `interceptor_proxy_connections_total` | counter | `direction` |
//! | `interceptor_proxy_connections_active` | gauge | `direction` |
//! | `interceptor_proxy_forwarded_connections_total` | counter | `direction` |
//! | `interceptor_proxy_loop_rejected_connections_total` | counter | `direction` |
//! | `interceptor_proxy_orig_dst_missing_connections_total` | counter | |
//! | `interceptor_proxy_refused_connections_total` | counter | (over `--max-connections`) |
//! | `interceptor_proxy_accept_errors_total` | counter | (EMFILE, ENFILE, ENOBUFS, ENOMEM) |
//! | `interceptor_proxy_upgrade_moved_connections_total` | counter | (moved to a new process at an upgrade) |
//! | `interceptor_proxy_drain_cut_connections_total` | counter | (closed at a drain's deadline) |
//! | `interceptor_proxy_upstream_connect_errors_total` | counter | `direction`, `kind` (refused, timeout, other) |
//! | `interceptor_proxy_client_to_upstream_bytes_total` | counter | `direction` |
//! | `interceptor_proxy_upstream_to_client_bytes_total` | counter | `direction` |
//! | `interceptor_proxy_upstream_connect_duration_seconds` | histogram | `direction` |
//! | `interceptor_proxy_connection_duration_seconds` | histogram | `direction` |
//! | `interceptor_proxy_destination_connections_total` | counter | `direction`, `destination` |
//! | `interceptor_proxy_destination_client_to_upstream_bytes_total` | counter | `direction`, `destination` |
//! | `interceptor_proxy_destination_upstream_to_client_bytes_total` | counter | `direction`, `destination` |
//! | `interceptor_proxy_destination_series` | gauge | |
//! | `interceptor_proxy_destination_evicted_total` | counter | |
//! | `interceptor_proxy_route_requests_total` | counter | `virtual_service`, `route` |
//! | `interceptor_proxy_cluster_requests_total` | counter | `cluster` |
//! | `interceptor_proxy_cluster_responses_total` | counter | `cluster`, `class` (1xx..5xx) |
//! | `interceptor_proxy_cluster_upstream_errors_total` | counter | `cluster`, `kind` (connect, timeout, other) |
//! | `interceptor_proxy_cluster_retries_total` | counter | `cluster` |
//! | `interceptor_proxy_no_route_requests_total` | counter | |
//! | `interceptor_proxy_route_reloads_total` | counter | |
//! | `interceptor_proxy_route_reload_errors_total` | counter | |
//! | `interceptor_proxy_dubbo_requests_total` | counter | |
//! | `interceptor_proxy_dubbo_heartbeats_total` | counter | |
//! | `interceptor_proxy_dubbo_bad_requests_total` | counter | |
//! | `interceptor_proxy_dubbo_unmatched_responses_total` | counter | |
//! | `interceptor_proxy_dubbo_upstream_connections_total` | counter | |
//! | `interceptor_proxy_dubbo_closed_connections_total` | counter | `reason` (bad_magic, over_cap) |
//!
//! Both histograms share [`crate::stats::BUCKETS`]. The `destination` families exist only
//! while per-destination stats are on (see [`crate::stats::Destinations`]).

mod connections;
mod routing;

use std::sync::Arc;

use prometheus_client::registry::Registry;

use crate::routing::RoutingStats;
use crate::stats::Stats;
use connections::StatsCollector;
use routing::RoutingCollector;

/// The `/metrics` registry of one proxy.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(stats: Arc<Stats>, routing: Arc<RoutingStats>) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(StatsCollector(stats)));
        registry.register_collector(Box::new(RoutingCollector(routing)));
        Metrics { registry }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
