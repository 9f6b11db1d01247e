//! Proxy counters: relaxed atomics, cheap to bump on every connection and chunk.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// Live counters shared by the listeners, the connections and the admin server.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted on the outbound listeners.
    pub connections_total: AtomicU64,
    /// Connections currently open (accepted and not yet closed).
    pub connections_active: AtomicU64,
    /// Connections forwarded to their original destination (upstream connect succeeded).
    pub forwarded_total: AtomicU64,
    /// Connections closed because getsockopt(SO_ORIGINAL_DST) gave no destination.
    pub orig_dst_missing: AtomicU64,
    /// Connections closed because the original destination is the proxy itself.
    pub loop_rejected: AtomicU64,
    /// Upstream connects refused (RST from the destination).
    pub upstream_connect_errors_refused: AtomicU64,
    /// Upstream connects that did not complete within --connect-timeout.
    pub upstream_connect_errors_timeout: AtomicU64,
    /// Upstream connects that failed otherwise (unreachable, SO_MARK denied, ...).
    pub upstream_connect_errors_other: AtomicU64,
    /// Bytes read from clients and written upstream.
    pub bytes_client_to_upstream: AtomicU64,
    /// Bytes read from upstreams and written to clients.
    pub bytes_upstream_to_client: AtomicU64,
}

/// A point-in-time copy of [`Stats`]; this is the `/stats` JSON object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub connections_total: u64,
    pub connections_active: u64,
    pub forwarded_total: u64,
    pub orig_dst_missing: u64,
    pub loop_rejected: u64,
    pub upstream_connect_errors_refused: u64,
    pub upstream_connect_errors_timeout: u64,
    pub upstream_connect_errors_other: u64,
    pub bytes_client_to_upstream: u64,
    pub bytes_upstream_to_client: u64,
}

/// Why an upstream connect failed, for the `upstream_connect_errors_*` counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectErrorKind {
    Refused,
    Timeout,
    Other,
}

impl ConnectErrorKind {
    /// Short name used in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectErrorKind::Refused => "refused",
            ConnectErrorKind::Timeout => "timeout",
            ConnectErrorKind::Other => "other",
        }
    }
}

impl Stats {
    /// Counts a failed upstream connect.
    pub fn upstream_connect_error(&self, kind: ConnectErrorKind) {
        match kind {
            ConnectErrorKind::Refused => &self.upstream_connect_errors_refused,
            ConnectErrorKind::Timeout => &self.upstream_connect_errors_timeout,
            ConnectErrorKind::Other => &self.upstream_connect_errors_other,
        }
        .fetch_add(1, Relaxed);
    }

    /// Copies every counter (each one atomically; the set is not a consistent cut).
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            connections_total: self.connections_total.load(Relaxed),
            connections_active: self.connections_active.load(Relaxed),
            forwarded_total: self.forwarded_total.load(Relaxed),
            orig_dst_missing: self.orig_dst_missing.load(Relaxed),
            loop_rejected: self.loop_rejected.load(Relaxed),
            upstream_connect_errors_refused: self.upstream_connect_errors_refused.load(Relaxed),
            upstream_connect_errors_timeout: self.upstream_connect_errors_timeout.load(Relaxed),
            upstream_connect_errors_other: self.upstream_connect_errors_other.load(Relaxed),
            bytes_client_to_upstream: self.bytes_client_to_upstream.load(Relaxed),
            bytes_upstream_to_client: self.bytes_upstream_to_client.load(Relaxed),
        }
    }
}

impl StatsSnapshot {
    /// `(name, value, is_gauge)` for every counter, in `/stats` order.
    pub fn fields(&self) -> [(&'static str, u64, bool); 10] {
        [
            ("connections_total", self.connections_total, false),
            ("connections_active", self.connections_active, true),
            ("forwarded_total", self.forwarded_total, false),
            ("orig_dst_missing", self.orig_dst_missing, false),
            ("loop_rejected", self.loop_rejected, false),
            (
                "upstream_connect_errors_refused",
                self.upstream_connect_errors_refused,
                false,
            ),
            (
                "upstream_connect_errors_timeout",
                self.upstream_connect_errors_timeout,
                false,
            ),
            (
                "upstream_connect_errors_other",
                self.upstream_connect_errors_other,
                false,
            ),
            (
                "bytes_client_to_upstream",
                self.bytes_client_to_upstream,
                false,
            ),
            (
                "bytes_upstream_to_client",
                self.bytes_upstream_to_client,
                false,
            ),
        ]
    }

    /// Prometheus text exposition (`/metrics`), names prefixed `interceptor_proxy_`.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::with_capacity(1024);
        for (name, value, gauge) in self.fields() {
            let kind = if gauge { "gauge" } else { "counter" };
            let _ = writeln!(out, "# TYPE interceptor_proxy_{name} {kind}");
            let _ = writeln!(out, "interceptor_proxy_{name} {value}");
        }
        out
    }
}

/// Keeps `connections_active` up to date for one connection: +1 now, -1 on drop.
#[derive(Debug)]
pub struct ActiveGuard<'a>(&'a Stats);

impl<'a> ActiveGuard<'a> {
    /// Counts a newly accepted connection (total and active).
    pub fn accepted(stats: &'a Stats) -> Self {
        stats.connections_total.fetch_add(1, Relaxed);
        stats.connections_active.fetch_add(1, Relaxed);
        ActiveGuard(stats)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_field_names() {
        let s = Stats::default();
        s.upstream_connect_error(ConnectErrorKind::Timeout);
        {
            let _g = ActiveGuard::accepted(&s);
            assert_eq!(s.snapshot().connections_active, 1);
        }
        let v: serde_json::Value = serde_json::to_value(s.snapshot()).unwrap();
        let obj = v.as_object().unwrap();
        let names: Vec<_> = s.snapshot().fields().iter().map(|f| f.0).collect();
        assert_eq!(obj.len(), names.len());
        for n in names {
            assert!(obj.contains_key(n), "{n}");
        }
        assert_eq!(obj["upstream_connect_errors_timeout"], 1);
        assert_eq!(obj["connections_total"], 1);
        assert_eq!(obj["connections_active"], 0);
        assert!(s
            .snapshot()
            .to_prometheus()
            .contains("interceptor_proxy_connections_active 0\n"));
    }
}
