//! The connection counters, latency histograms and per-destination families, read from
//! [`Stats`] at scrape time.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use crate::stats::{
    DestinationCounts, Direction, DirectionSnapshot, DirectionStats, Histogram, Stats,
};

/// Reads [`Stats`] at scrape time.
#[derive(Debug)]
pub(super) struct StatsCollector(pub(super) Arc<Stats>);

fn dir_label(d: Direction) -> [(&'static str, &'static str); 1] {
    [("direction", d.as_str())]
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snap = self.0.snapshot();
        let dirs = [
            (Direction::Outbound, &snap.outbound, &self.0.outbound),
            (Direction::Inbound, &snap.inbound, &self.0.inbound),
        ];
        type Field = fn(&DirectionSnapshot) -> u64;
        let counters: [(&str, &str, Option<Unit>, Field); 5] = [
            (
                "interceptor_proxy_connections",
                "Connections accepted.",
                None,
                |s| s.connections_total,
            ),
            (
                "interceptor_proxy_forwarded_connections",
                "Connections whose upstream connect succeeded.",
                None,
                |s| s.forwarded_total,
            ),
            (
                "interceptor_proxy_loop_rejected_connections",
                "Connections refused because their destination is the proxy itself.",
                None,
                |s| s.loop_rejected,
            ),
            (
                "interceptor_proxy_client_to_upstream",
                "Bytes copied from clients to upstreams.",
                Some(Unit::Bytes),
                |s| s.bytes_client_to_upstream,
            ),
            (
                "interceptor_proxy_upstream_to_client",
                "Bytes copied from upstreams to clients.",
                Some(Unit::Bytes),
                |s| s.bytes_upstream_to_client,
            ),
        ];
        for (name, help, unit, field) in &counters {
            let mut m =
                encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
            for (d, s, _) in &dirs {
                let labels = dir_label(*d);
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&field(s), None)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_connections_active",
            "Connections open now (including those of a previous process still draining after an upgrade).",
            None,
            MetricType::Gauge,
        )?;
        for (d, s, _) in &dirs {
            m.encode_family(&dir_label(*d))?
                .encode_gauge(&s.connections_active)?;
        }
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_orig_dst_missing_connections",
            "Outbound connections closed because the kernel had no original destination for them.",
            None,
            MetricType::Counter,
        )?;
        m.encode_counter::<NoLabelSet, _, u64>(&snap.orig_dst_missing, None)?;
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_refused_connections",
            "Connections accepted and closed at once because --max-connections were open.",
            None,
            MetricType::Counter,
        )?;
        m.encode_counter::<NoLabelSet, _, u64>(&snap.connections_refused_limit, None)?;
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_accept_errors",
            "Accepts that failed for want of file descriptors or kernel memory (EMFILE, ENFILE, ENOBUFS, ENOMEM); each was followed by a back-off.",
            None,
            MetricType::Counter,
        )?;
        m.encode_counter::<NoLabelSet, _, u64>(&snap.accept_errors_resources, None)?;
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_upgrade_moved_connections",
            "Established connections moved to a new proxy process at an upgrade (by this process and the ones before it).",
            None,
            MetricType::Counter,
        )?;
        m.encode_counter::<NoLabelSet, _, u64>(&snap.upgrade_moved_connections, None)?;
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_drain_cut_connections",
            "Connections closed at a drain's deadline (--drain-timeout) because they neither ended nor moved in time (by this process and the ones before it).",
            None,
            MetricType::Counter,
        )?;
        m.encode_counter::<NoLabelSet, _, u64>(&snap.drain_cut_connections, None)?;
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_upstream_connect_errors",
            "Failed upstream connects, by kind.",
            None,
            MetricType::Counter,
        )?;
        for (d, s, _) in &dirs {
            for (kind, v) in [
                ("refused", s.upstream_connect_errors_refused),
                ("timeout", s.upstream_connect_errors_timeout),
                ("other", s.upstream_connect_errors_other),
            ] {
                let labels = [("direction", d.as_str()), ("kind", kind)];
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }
        for (name, help, pick) in [
            (
                "interceptor_proxy_upstream_connect_duration",
                "Time to connect upstream (successful connects).",
                (|d| &d.upstream_connect_seconds) as fn(&DirectionStats) -> &Histogram,
            ),
            (
                "interceptor_proxy_connection_duration",
                "Time from the upstream connect to the close of a forwarded connection.",
                |d| &d.connection_seconds,
            ),
        ] {
            let mut m = encoder.encode_descriptor(
                name,
                help,
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (d, _, live) in &dirs {
                encode_histogram(pick(live), m.encode_family(&dir_label(*d))?)?;
            }
        }

        let dest = &self.0.destinations;
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_destination_series",
            "Destinations tracked by per-destination stats (three series each; 0 when off).",
            None,
            MetricType::Gauge,
        )?;
        m.encode_gauge(&(dest.tracked() as u64))?;
        let mut m = encoder.encode_descriptor(
            "interceptor_proxy_destination_evicted",
            "Idle destinations whose counts moved to the other series.",
            None,
            MetricType::Counter,
        )?;
        m.encode_counter::<NoLabelSet, _, u64>(&dest.evicted(), None)?;
        if dest.enabled() {
            let series = dest.series();
            type DestField = fn(&DestinationCounts) -> u64;
            let families: [(&str, &str, Option<Unit>, DestField); 3] = [
                (
                    "interceptor_proxy_destination_connections",
                    "Connections per destination.",
                    None,
                    |c| c.connections,
                ),
                (
                    "interceptor_proxy_destination_client_to_upstream",
                    "Bytes to each destination.",
                    Some(Unit::Bytes),
                    |c| c.bytes_up,
                ),
                (
                    "interceptor_proxy_destination_upstream_to_client",
                    "Bytes from each destination.",
                    Some(Unit::Bytes),
                    |c| c.bytes_down,
                ),
            ];
            for (name, help, unit, field) in &families {
                let mut m =
                    encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
                for (d, label, counts) in &series {
                    let labels = [("direction", d.as_str()), ("destination", label.as_str())];
                    m.encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&field(counts), None)?;
                }
            }
        }
        Ok(())
    }
}

/// Writes one histogram. The encoder accumulates the per-bucket counts itself; the count
/// written is their total, so the +Inf bucket and `_count` agree even while observations
/// land meanwhile.
fn encode_histogram(h: &Histogram, mut enc: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
    let buckets: Vec<(f64, u64)> = h.buckets().collect();
    let count = buckets.iter().map(|(_, n)| n).sum();
    enc.encode_histogram::<NoLabelSet>(h.sum_seconds(), count, &buckets, None)
}
