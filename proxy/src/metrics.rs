//! `/metrics`: the proxy's counters, latency histograms and (behind a runtime switch) its
//! per-destination counters, in the OpenMetrics text format written by `prometheus-client`.
//!
//! The live values stay where the hot path keeps them (relaxed atomics in [`Stats`], the
//! histograms below, the sharded [`Destinations`] table); a [`Collector`] reads them at
//! scrape time, so counting costs nothing more than the atomic add it always was.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `interceptor_proxy_connections_total` | counter | `direction` |
//! | `interceptor_proxy_connections_active` | gauge | `direction` |
//! | `interceptor_proxy_forwarded_connections_total` | counter | `direction` |
//! | `interceptor_proxy_loop_rejected_connections_total` | counter | `direction` |
//! | `interceptor_proxy_orig_dst_missing_connections_total` | counter | |
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
//!
//! Both histograms share [`BUCKETS`]. The `destination` families exist only while
//! per-destination stats are on (see [`Destinations`]).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::routing::RoutingStats;
use crate::stats::{DirectionSnapshot, Stats};

/// Upper bounds (seconds) shared by every histogram: 50 µs to 5 min.
pub const BUCKETS: [f64; 20] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A histogram of durations over [`BUCKETS`]: lock-free, one atomic add per bucket hit.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Counts per bucket (not cumulative); the last slot is +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS.partition_point(|&b| b < secs);
        self.buckets[i].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Every cell (the buckets, then count and sum), for carrying over to another process.
    pub fn values(&self) -> impl Iterator<Item = u64> + '_ {
        self.buckets
            .iter()
            .chain([&self.count, &self.sum_nanos])
            .map(|a| a.load(Relaxed))
    }

    /// Adds `to - from`, cell by cell (as [`Histogram::values`] lists them).
    pub fn add_delta(&self, from: &[u64], to: &[u64]) {
        let cells = self.buckets.iter().chain([&self.count, &self.sum_nanos]);
        for ((a, f), t) in cells.zip(from).zip(to) {
            a.fetch_add(t.wrapping_sub(*f), Relaxed);
        }
    }

    /// Cells per histogram in [`Histogram::values`].
    pub const CELLS: usize = BUCKETS.len() + 3;

    fn encode(&self, mut enc: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        // The encoder accumulates the per-bucket counts itself; `count` is their total, so
        // the +Inf bucket and `_count` agree even while observations land meanwhile.
        let mut count = 0;
        let mut buckets = Vec::with_capacity(BUCKETS.len() + 1);
        for (i, bound) in BUCKETS.iter().chain([f64::MAX].iter()).enumerate() {
            let n = self.buckets[i].load(Relaxed);
            count += n;
            buckets.push((*bound, n));
        }
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        enc.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

/// Which listener kind a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Settings of the per-destination table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestinationLimits {
    /// Most destinations tracked at once; further ones count in the `other` series.
    pub cap: usize,
    /// A destination without a new connection or a close for this long is evicted (its
    /// counts move to the `other` series, so the family's totals stay exact).
    pub idle: Duration,
}

impl Default for DestinationLimits {
    fn default() -> Self {
        DestinationLimits {
            cap: 10_000,
            idle: Duration::from_secs(300),
        }
    }
}

const SHARDS: usize = 16;

/// One destination's counters. `last_seen` is in seconds since the table's epoch.
#[derive(Debug, Default, Clone, Copy)]
struct DestCounts {
    connections: u64,
    bytes_up: u64,
    bytes_down: u64,
    last_seen: u32,
}

impl DestCounts {
    fn add(&mut self, o: &DestCounts) {
        self.connections += o.connections;
        self.bytes_up += o.bytes_up;
        self.bytes_down += o.bytes_down;
    }
}

/// A destination: address bytes (IPv4 mapped into IPv6), port and direction, packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct DestKey {
    ip: [u8; 16],
    port: u16,
    inbound: bool,
}

impl DestKey {
    fn new(dir: Direction, dst: SocketAddr) -> Self {
        let ip = match dst.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        DestKey {
            ip: ip.octets(),
            port: dst.port(),
            inbound: dir == Direction::Inbound,
        }
    }

    fn addr(&self) -> SocketAddr {
        let ip = Ipv6Addr::from(self.ip);
        match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), self.port),
            None => SocketAddr::new(ip.into(), self.port),
        }
    }

    fn direction(&self) -> Direction {
        if self.inbound {
            Direction::Inbound
        } else {
            Direction::Outbound
        }
    }
}

/// Per-destination counters, off by default and switched at run time.
///
/// - Off: the hot path reads one flag; the table holds nothing (switching off frees it).
/// - On: a connection adds to its destination's entry when it starts and when it ends
///   (bytes), under one of 16 shard locks. At most `cap` destinations are tracked; the
///   others count in one `destination="other"` series per direction, as do evicted ones,
///   so the sum over a family is always the total since the switch was turned on.
/// - An entry is about 60 bytes for its three series (connections, bytes each way).
#[derive(Debug)]
pub struct Destinations {
    enabled: AtomicBool,
    limits: Mutex<DestinationLimits>,
    cap: AtomicUsize,
    tracked: AtomicUsize,
    evicted: AtomicU64,
    epoch: Instant,
    hasher: std::collections::hash_map::RandomState,
    shards: [Mutex<HashMap<DestKey, DestCounts>>; SHARDS],
    /// Untracked and evicted destinations, per direction (outbound, inbound).
    other: Mutex<[DestCounts; 2]>,
}

impl Default for Destinations {
    fn default() -> Self {
        Destinations::new(false, DestinationLimits::default())
    }
}

impl Destinations {
    pub fn new(enabled: bool, limits: DestinationLimits) -> Self {
        Destinations {
            enabled: AtomicBool::new(enabled),
            limits: Mutex::new(limits),
            cap: AtomicUsize::new(limits.cap),
            tracked: AtomicUsize::new(0),
            evicted: AtomicU64::new(0),
            epoch: Instant::now(),
            hasher: Default::default(),
            shards: Default::default(),
            other: Mutex::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Relaxed)
    }

    pub fn limits(&self) -> DestinationLimits {
        *self.limits.lock().expect("limits lock")
    }

    /// Destinations tracked now (each has three series).
    pub fn tracked(&self) -> usize {
        self.tracked.load(Relaxed)
    }

    /// Turns the family on (empty) or off (dropped, memory freed). Returns the old state.
    pub fn set_enabled(&self, on: bool) -> bool {
        let was = self.enabled.swap(on, Relaxed);
        if was && !on {
            for shard in &self.shards {
                let mut m = shard.lock().expect("shard lock");
                *m = HashMap::new();
            }
            *self.other.lock().expect("other lock") = Default::default();
            self.tracked.store(0, Relaxed);
        }
        was
    }

    fn now(&self) -> u32 {
        self.epoch.elapsed().as_secs() as u32
    }

    fn shard(&self, key: &DestKey) -> &Mutex<HashMap<DestKey, DestCounts>> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    fn update(&self, dir: Direction, dst: SocketAddr, delta: DestCounts) {
        if !self.enabled() {
            return;
        }
        let key = DestKey::new(dir, dst);
        let now = self.now();
        let mut shard = self.shard(&key).lock().expect("shard lock");
        if let Some(e) = shard.get_mut(&key) {
            e.add(&delta);
            e.last_seen = now;
            return;
        }
        // A new destination: tracked while under the cap, else counted as `other`.
        let cap = self.cap.load(Relaxed);
        if self
            .tracked
            .fetch_update(Relaxed, Relaxed, |n| (n < cap).then_some(n + 1))
            .is_ok()
        {
            shard.insert(
                key,
                DestCounts {
                    last_seen: now,
                    ..delta
                },
            );
        } else {
            drop(shard);
            self.other.lock().expect("other lock")[key.inbound as usize].add(&delta);
        }
    }

    /// A connection to `dst` started.
    pub fn connection(&self, dir: Direction, dst: SocketAddr) {
        self.update(
            dir,
            dst,
            DestCounts {
                connections: 1,
                ..Default::default()
            },
        );
    }

    /// A connection to `dst` ended after moving these bytes.
    pub fn closed(&self, dir: Direction, dst: SocketAddr, up: u64, down: u64) {
        if up == 0 && down == 0 {
            return;
        }
        self.update(
            dir,
            dst,
            DestCounts {
                bytes_up: up,
                bytes_down: down,
                ..Default::default()
            },
        );
    }

    /// Moves every destination idle for longer than the limit into `other`. Returns how
    /// many were evicted.
    pub fn evict_idle(&self) -> usize {
        if !self.enabled() {
            return 0;
        }
        let idle = self.limits().idle.as_secs().min(u32::MAX as u64) as u32;
        let now = self.now();
        let mut moved = [DestCounts::default(); 2];
        let mut n = 0;
        for shard in &self.shards {
            let mut m = shard.lock().expect("shard lock");
            m.retain(|k, v| {
                if now.saturating_sub(v.last_seen) >= idle {
                    moved[k.inbound as usize].add(v);
                    n += 1;
                    false
                } else {
                    true
                }
            });
            // Give memory back once the table has mostly emptied.
            if m.capacity() > 64 && m.len() < m.capacity() / 4 {
                m.shrink_to_fit();
            }
        }
        if n > 0 {
            let mut other = self.other.lock().expect("other lock");
            other[0].add(&moved[0]);
            other[1].add(&moved[1]);
            self.tracked.fetch_sub(n, Relaxed);
            self.evicted.fetch_add(n as u64, Relaxed);
        }
        n
    }

    /// Changes the cap and idle time; a lower cap takes effect for new destinations.
    pub fn set_limits(&self, limits: DestinationLimits) {
        *self.limits.lock().expect("limits lock") = limits;
        self.cap.store(limits.cap, Relaxed);
    }

    /// Every series: (direction, destination label, counts), `other` last per direction.
    fn series(&self) -> Vec<(Direction, String, DestCounts)> {
        let mut out = Vec::with_capacity(self.tracked() + 2);
        for shard in &self.shards {
            let m = shard.lock().expect("shard lock");
            for (k, v) in m.iter() {
                out.push((k.direction(), k.addr().to_string(), *v));
            }
        }
        let other = *self.other.lock().expect("other lock");
        out.push((Direction::Outbound, "other".to_owned(), other[0]));
        out.push((Direction::Inbound, "other".to_owned(), other[1]));
        out
    }
}

/// Evicts idle destinations periodically until the runtime ends.
pub async fn evict_idle_loop(stats: Arc<Stats>) {
    loop {
        let idle = stats.destinations.limits().idle;
        let period = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        tokio::time::sleep(period).await;
        let n = stats.destinations.evict_idle();
        if n > 0 {
            tracing::debug!(evicted = n, "idle destinations moved to the other series");
        }
    }
}

/// Reads [`Stats`] at scrape time.
#[derive(Debug)]
struct StatsCollector(Arc<Stats>);

fn dir_label(d: Direction) -> [(&'static str, &'static str); 1] {
    [("direction", d.as_str())]
}

impl Collector for StatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
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
                (|d| &d.upstream_connect_seconds)
                    as fn(&crate::stats::DirectionStats) -> &Histogram,
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
                pick(live).encode(m.encode_family(&dir_label(*d))?)?;
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
        m.encode_counter::<NoLabelSet, _, u64>(&dest.evicted.load(Relaxed), None)?;
        if dest.enabled() {
            let series = dest.series();
            type DestField = fn(&DestCounts) -> u64;
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

/// Reads the route and cluster counters at scrape time.
#[derive(Debug)]
struct RoutingCollector(Arc<RoutingStats>);

impl Collector for RoutingCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
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
                "HTTP requests that matched no route (404).",
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
        ] {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            m.encode_counter::<NoLabelSet, _, u64>(&v.load(Relaxed), None)?;
        }
        Ok(())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn sums(d: &Destinations) -> (u64, u64, u64) {
        d.series().iter().fold((0, 0, 0), |(c, u, w), (_, _, n)| {
            (c + n.connections, u + n.bytes_up, w + n.bytes_down)
        })
    }

    #[test]
    fn histogram_buckets_are_cumulative_at_encode() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(1000));
        assert_eq!(h.count(), 3);
        assert_eq!(h.buckets[0].load(Relaxed), 1);
        assert_eq!(h.buckets[BUCKETS.len()].load(Relaxed), 1, "+Inf");
    }

    #[test]
    fn off_counts_nothing_and_switching_off_frees() {
        let d = Destinations::new(false, DestinationLimits::default());
        d.connection(Direction::Outbound, a("10.0.0.1:80"));
        assert_eq!(d.tracked(), 0);
        assert_eq!(sums(&d), (0, 0, 0));
        d.set_enabled(true);
        for i in 0..100 {
            d.connection(Direction::Outbound, a(&format!("10.0.1.{i}:80")));
        }
        assert_eq!(d.tracked(), 100);
        d.set_enabled(false);
        assert_eq!(d.tracked(), 0);
        assert!(d.shards.iter().all(|s| s.lock().unwrap().capacity() == 0));
        d.set_enabled(true);
        assert_eq!(sums(&d), (0, 0, 0), "switched on again: a fresh family");
    }

    #[test]
    fn cap_holds_and_totals_stay_exact() {
        let d = Destinations::new(
            true,
            DestinationLimits {
                cap: 10,
                idle: Duration::from_secs(60),
            },
        );
        for i in 0..50u32 {
            let dst = a(&format!("127.0.{}.{}:8080", i / 200, i % 200));
            d.connection(Direction::Outbound, dst);
            d.closed(Direction::Outbound, dst, 6, 40);
        }
        d.connection(Direction::Inbound, a("[fd00::1]:443"));
        assert_eq!(d.tracked(), 10);
        let series = d.series();
        assert_eq!(series.len(), 10 + 2);
        let other = |d: Direction| {
            series
                .iter()
                .find(|(dir, l, _)| *dir == d && l == "other")
                .unwrap()
                .2
                .connections
        };
        // The cap is shared by both directions; each has its own `other`.
        assert_eq!(other(Direction::Outbound), 40);
        assert_eq!(other(Direction::Inbound), 1);
        assert_eq!(sums(&d), (51, 300, 2000));
    }

    #[test]
    fn idle_destinations_move_to_other() {
        let d = Destinations::new(
            true,
            DestinationLimits {
                cap: 100,
                idle: Duration::from_secs(0),
            },
        );
        for i in 0..20 {
            d.connection(Direction::Outbound, a(&format!("10.1.0.{i}:80")));
        }
        let before = sums(&d);
        assert_eq!(d.evict_idle(), 20);
        assert_eq!(d.tracked(), 0);
        assert_eq!(d.evicted.load(Relaxed), 20);
        assert_eq!(sums(&d), before, "evicted counts live on in other");
        d.connection(Direction::Outbound, a("10.1.0.1:80"));
        assert_eq!(d.tracked(), 1, "an evicted destination can come back");
    }
}
