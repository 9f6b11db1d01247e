//! The route and cluster counters, read from [`RoutingStats`] at scrape time.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::routing::RoutingStats;

/// Reads the route and cluster counters at scrape time.
#[derive(Debug)]
pub(super) struct RoutingCollector(pub(super) Arc<RoutingStats>);

impl Collector for RoutingCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let r = &self.0;
        let routes = r.routes();
        let clusters = r.clusters();
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_route_requests",
            "HTTP requests that matched a route.",
            None,
            MetricType::Counter,
        )?;
        for ((vs, name), s) in &routes {
            let labels = [("virtual_service", vs.as_str()), ("route", name.as_str())];
            m.encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&s.requests.load(Relaxed), None)?;
        }
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_cluster_requests",
            "HTTP requests sent to a cluster (service, port and subset).",
            None,
            MetricType::Counter,
        )?;
        for (name, s) in &clusters {
            m.encode_family(&[("cluster", name.as_str())])?
                .encode_counter::<NoLabelSet, _, u64>(&s.requests.load(Relaxed), None)?;
        }
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_cluster_responses",
            "Upstream responses by status class.",
            None,
            MetricType::Counter,
        )?;
        for (name, s) in &clusters {
            for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                let labels = [("cluster", name.as_str()), ("class", *class)];
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(
                        &s.responses[i + 1].load(Relaxed),
                        None,
                    )?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_cluster_upstream_errors",
            "Requests that got no upstream response, by kind (connect, timeout, other).",
            None,
            MetricType::Counter,
        )?;
        for (name, s) in &clusters {
            for (kind, v) in [
                ("connect", &s.connect_errors),
                ("timeout", &s.timeouts),
                ("other", &s.other_errors),
            ] {
                let labels = [("cluster", name.as_str()), ("kind", kind)];
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&v.load(Relaxed), None)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_cluster_retries",
            "Requests retried on another endpoint after a connect failure.",
            None,
            MetricType::Counter,
        )?;
        for (name, s) in &clusters {
            m.encode_family(&[("cluster", name.as_str())])?
                .encode_counter::<NoLabelSet, _, u64>(&s.retries.load(Relaxed), None)?;
        }
        for (name, help, v) in [
            (
                "interceptor_proxy_no_route_requests",
                "Requests that matched no route (HTTP: 404, Dubbo: SERVICE_NOT_FOUND).",
                &r.no_route,
            ),
            (
                "interceptor_proxy_route_reloads",
                "Routing files loaded.",
                &r.reloads,
            ),
            (
                "interceptor_proxy_route_reload_errors",
                "Routing files refused (the previous routes stayed).",
                &r.reload_errors,
            ),
            (
                "interceptor_proxy_dubbo_requests",
                "Dubbo requests read from clients (heartbeats not counted).",
                &r.dubbo.requests,
            ),
            (
                "interceptor_proxy_dubbo_heartbeats",
                "Dubbo heartbeat requests answered (from clients and upstreams).",
                &r.dubbo.heartbeats,
            ),
            (
                "interceptor_proxy_dubbo_bad_requests",
                "Dubbo requests whose body did not decode (answered BAD_REQUEST).",
                &r.dubbo.bad_requests,
            ),
            (
                "interceptor_proxy_dubbo_unmatched_responses",
                "Dubbo responses for no waiting request (late after a timeout).",
                &r.dubbo.unmatched_responses,
            ),
            (
                "interceptor_proxy_dubbo_upstream_connections",
                "Pooled Dubbo upstream connections opened.",
                &r.dubbo.upstream_connections,
            ),
        ] {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            m.encode_counter::<NoLabelSet, _, u64>(&v.load(Relaxed), None)?;
        }
        let plugins = r.plugins();
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_wasm_plugin_calls",
            "Requests a Wasm routing plugin ran for.",
            None,
            MetricType::Counter,
        )?;
        for (name, s) in &plugins {
            m.encode_family(&[("plugin", name.as_str())])?
                .encode_counter::<NoLabelSet, _, u64>(&s.calls.load(Relaxed), None)?;
        }
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_wasm_plugin_failures",
            "Wasm plugin calls that failed, by kind (trap, fuel: out of its fuel budget, memory: over its memory cap).",
            None,
            MetricType::Counter,
        )?;
        for (name, s) in &plugins {
            for (kind, v) in [
                ("trap", &s.traps),
                ("fuel", &s.fuel_exhausted),
                ("memory", &s.memory_exceeded),
            ] {
                m.encode_family(&[("plugin", name.as_str()), ("kind", kind)])?
                    .encode_counter::<NoLabelSet, _, u64>(&v.load(Relaxed), None)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_wasm_plugin_decisions",
            "What Wasm plugins decided for requests (routed: a cluster or route of their choice; local_reply: answered; failed_closed: 503 after a failure; failed_open: the declarative routes after a failure).",
            None,
            MetricType::Counter,
        )?;
        for (name, s) in &plugins {
            for (decision, v) in [
                ("routed", &s.routed),
                ("local_reply", &s.local_replies),
                ("failed_closed", &s.failed_closed),
                ("failed_open", &s.failed_open),
            ] {
                m.encode_family(&[("plugin", name.as_str()), ("decision", decision)])?
                    .encode_counter::<NoLabelSet, _, u64>(&v.load(Relaxed), None)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_dubbo_closed_connections",
            "Dubbo connections closed for a bad frame, by reason (bad_magic, over_cap).",
            None,
            MetricType::Counter,
        )?;
        for (reason, v) in [
            ("bad_magic", &r.dubbo.bad_magic),
            ("over_cap", &r.dubbo.over_cap),
        ] {
            m.encode_family(&[("reason", reason)])?
                .encode_counter::<NoLabelSet, _, u64>(&v.load(Relaxed), None)?;
        }
        Ok(())
    }
}
