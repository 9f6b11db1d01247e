//! Proxy counters: relaxed atomics, cheap to bump on every connection and chunk.
//!
//! Each direction (outbound, inbound) has the same set of counters ([`DirectionStats`]).
//! In `/stats` and `/metrics` the outbound ones keep their original, unprefixed names
//! (`connections_total`, ...) and the inbound ones are prefixed `inbound_`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::ser::SerializeMap;

use crate::metrics::{Destinations, Direction, Histogram};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Live counters of one direction.
#[derive(Debug, Default)]
pub struct DirectionStats {
    /// Connections accepted on this direction's listeners.
    pub connections_total: AtomicU64,
    /// Connections currently open (accepted and not yet closed).
    pub connections_active: AtomicU64,
    /// Connections forwarded to their original destination (upstream connect succeeded).
    pub forwarded_total: AtomicU64,
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
    /// Successful upstream connects: how long they took.
    pub upstream_connect_seconds: Histogram,
    /// Forwarded connections: time from the upstream connect to the close.
    pub connection_seconds: Histogram,
}

/// Live counters shared by the listeners, the connections and the admin server.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections redirected to the outbound listeners.
    pub outbound: DirectionStats,
    /// Outbound connections closed because getsockopt(SO_ORIGINAL_DST) gave no destination.
    pub orig_dst_missing: AtomicU64,
    /// Connections steered to the inbound listeners.
    pub inbound: DirectionStats,
    /// Per-destination counters (off unless switched on).
    pub destinations: Destinations,
}

/// A point-in-time copy of [`DirectionStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionSnapshot {
    pub connections_total: u64,
    pub connections_active: u64,
    pub forwarded_total: u64,
    pub loop_rejected: u64,
    pub upstream_connect_errors_refused: u64,
    pub upstream_connect_errors_timeout: u64,
    pub upstream_connect_errors_other: u64,
    pub bytes_client_to_upstream: u64,
    pub bytes_upstream_to_client: u64,
}

/// A point-in-time copy of [`Stats`]; serialized, this is the flat `/stats` JSON object
/// (outbound counters unprefixed, then `inbound_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub outbound: DirectionSnapshot,
    pub orig_dst_missing: u64,
    pub inbound: DirectionSnapshot,
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

impl DirectionStats {
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
    pub fn snapshot(&self) -> DirectionSnapshot {
        DirectionSnapshot {
            connections_total: self.connections_total.load(Relaxed),
            connections_active: self.connections_active.load(Relaxed),
            forwarded_total: self.forwarded_total.load(Relaxed),
            loop_rejected: self.loop_rejected.load(Relaxed),
            upstream_connect_errors_refused: self.upstream_connect_errors_refused.load(Relaxed),
            upstream_connect_errors_timeout: self.upstream_connect_errors_timeout.load(Relaxed),
            upstream_connect_errors_other: self.upstream_connect_errors_other.load(Relaxed),
            bytes_client_to_upstream: self.bytes_client_to_upstream.load(Relaxed),
            bytes_upstream_to_client: self.bytes_upstream_to_client.load(Relaxed),
        }
    }
}

impl DirectionStats {
    /// The counters in [`DirectionSnapshot::fields`] order.
    fn atomics(&self) -> [&AtomicU64; 9] {
        [
            &self.connections_total,
            &self.connections_active,
            &self.forwarded_total,
            &self.loop_rejected,
            &self.upstream_connect_errors_refused,
            &self.upstream_connect_errors_timeout,
            &self.upstream_connect_errors_other,
            &self.bytes_client_to_upstream,
            &self.bytes_upstream_to_client,
        ]
    }
}

impl Stats {
    /// The counters of one direction.
    pub fn direction(&self, d: Direction) -> &DirectionStats {
        match d {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
        }
    }

    /// Copies every counter (each one atomically; the set is not a consistent cut).
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            outbound: self.outbound.snapshot(),
            orig_dst_missing: self.orig_dst_missing.load(Relaxed),
            inbound: self.inbound.snapshot(),
        }
    }

    fn histograms(&self) -> [&Histogram; 4] {
        [
            &self.outbound.upstream_connect_seconds,
            &self.outbound.connection_seconds,
            &self.inbound.upstream_connect_seconds,
            &self.inbound.connection_seconds,
        ]
    }

    /// Every histogram cell, for carrying over to a new process at an upgrade.
    pub fn histogram_values(&self) -> Vec<u64> {
        self.histograms().iter().flat_map(|h| h.values()).collect()
    }

    /// Adds `to - from` to the histograms (both as [`Stats::histogram_values`] gives them);
    /// nothing when either is not of this layout (e.g. from a proxy without histograms).
    pub fn add_histogram_delta(&self, from: &[u64], to: &[u64]) {
        let n = Histogram::CELLS * 4;
        if to.len() != n || (from.len() != n && !from.is_empty()) {
            return;
        }
        let zeros = vec![0; n];
        let from = if from.is_empty() { &zeros[..] } else { from };
        for (i, h) in self.histograms().iter().enumerate() {
            let r = i * Histogram::CELLS..(i + 1) * Histogram::CELLS;
            h.add_delta(&from[r.clone()], &to[r]);
        }
    }

    /// Adds `to - from`, field by field, to the live counters (a gauge may go down). A
    /// process that took over from another one adds the other's counters this way, so
    /// its totals continue the old ones: first `(zero, at hand-off)`, then each later
    /// report of the old process as it drains.
    pub fn add_delta(&self, from: &StatsSnapshot, to: &StatsSnapshot) {
        let add = |a: &AtomicU64, from: u64, to: u64| {
            a.fetch_add(to.wrapping_sub(from), Relaxed);
        };
        for (d, f, t) in [
            (&self.outbound, &from.outbound, &to.outbound),
            (&self.inbound, &from.inbound, &to.inbound),
        ] {
            for ((a, (_, fv, _)), (_, tv, _)) in
                d.atomics().into_iter().zip(f.fields()).zip(t.fields())
            {
                add(a, fv, tv);
            }
        }
        add(
            &self.orig_dst_missing,
            from.orig_dst_missing,
            to.orig_dst_missing,
        );
    }
}

impl DirectionSnapshot {
    /// `(name, value, is_gauge)` for every counter, unprefixed.
    pub fn fields(&self) -> [(&'static str, u64, bool); 9] {
        [
            ("connections_total", self.connections_total, false),
            ("connections_active", self.connections_active, true),
            ("forwarded_total", self.forwarded_total, false),
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

    fn field_mut(&mut self, name: &str) -> Option<&mut u64> {
        Some(match name {
            "connections_total" => &mut self.connections_total,
            "connections_active" => &mut self.connections_active,
            "forwarded_total" => &mut self.forwarded_total,
            "loop_rejected" => &mut self.loop_rejected,
            "upstream_connect_errors_refused" => &mut self.upstream_connect_errors_refused,
            "upstream_connect_errors_timeout" => &mut self.upstream_connect_errors_timeout,
            "upstream_connect_errors_other" => &mut self.upstream_connect_errors_other,
            "bytes_client_to_upstream" => &mut self.bytes_client_to_upstream,
            "bytes_upstream_to_client" => &mut self.bytes_upstream_to_client,
            _ => return None,
        })
    }
}

/// Prefix of the inbound counters in `/stats` and `/metrics`.
pub const INBOUND_PREFIX: &str = "inbound_";

impl StatsSnapshot {
    /// `(name, value, is_gauge)` for every counter, in `/stats` order: the outbound
    /// counters under their original names (with `orig_dst_missing` after
    /// `forwarded_total`, as before), then the inbound ones prefixed `inbound_`.
    pub fn fields(&self) -> Vec<(Cow<'static, str>, u64, bool)> {
        let mut out = Vec::with_capacity(19);
        for (i, (name, value, gauge)) in self.outbound.fields().into_iter().enumerate() {
            if i == 3 {
                out.push((
                    Cow::Borrowed("orig_dst_missing"),
                    self.orig_dst_missing,
                    false,
                ));
            }
            out.push((Cow::Borrowed(name), value, gauge));
        }
        for (name, value, gauge) in self.inbound.fields() {
            out.push((Cow::Owned(format!("{INBOUND_PREFIX}{name}")), value, gauge));
        }
        out
    }
}

impl Serialize for StatsSnapshot {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let fields = self.fields();
        let mut map = serializer.serialize_map(Some(fields.len()))?;
        for (name, value, _) in &fields {
            map.serialize_entry(name.as_ref(), value)?;
        }
        map.end()
    }
}

/// Reads a `/stats` object back. Unknown names are ignored and missing ones are 0, so a
/// client keeps working across proxy versions.
impl<'de> Deserialize<'de> for StatsSnapshot {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, u64>::deserialize(deserializer)?;
        let mut s = StatsSnapshot::default();
        for (name, value) in map {
            let slot = if name == "orig_dst_missing" {
                Some(&mut s.orig_dst_missing)
            } else if let Some(rest) = name.strip_prefix(INBOUND_PREFIX) {
                s.inbound.field_mut(rest)
            } else {
                s.outbound.field_mut(&name)
            };
            if let Some(slot) = slot {
                *slot = value;
            }
        }
        Ok(s)
    }
}

/// Keeps `connections_active` up to date for one connection: +1 now, -1 on drop.
#[derive(Debug)]
pub struct ActiveGuard<'a>(&'a DirectionStats);

impl<'a> ActiveGuard<'a> {
    /// Counts a newly accepted connection (total and active).
    pub fn accepted(stats: &'a DirectionStats) -> Self {
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
        s.outbound.upstream_connect_error(ConnectErrorKind::Timeout);
        s.inbound.upstream_connect_error(ConnectErrorKind::Refused);
        s.inbound.loop_rejected.fetch_add(2, Relaxed);
        {
            let _g = ActiveGuard::accepted(&s.outbound);
            assert_eq!(s.snapshot().outbound.connections_active, 1);
            let _h = ActiveGuard::accepted(&s.inbound);
            assert_eq!(s.snapshot().inbound.connections_active, 1);
        }
        let v: serde_json::Value = serde_json::to_value(s.snapshot()).unwrap();
        let obj = v.as_object().unwrap();
        let names: Vec<_> = s.snapshot().fields().into_iter().map(|f| f.0).collect();
        assert_eq!(names.len(), 19);
        assert_eq!(obj.len(), names.len());
        for n in &names {
            assert!(obj.contains_key(n.as_ref()), "{n}");
        }
        // The outbound names are the original ones, in the original order.
        assert_eq!(
            names[..10],
            [
                "connections_total",
                "connections_active",
                "forwarded_total",
                "orig_dst_missing",
                "loop_rejected",
                "upstream_connect_errors_refused",
                "upstream_connect_errors_timeout",
                "upstream_connect_errors_other",
                "bytes_client_to_upstream",
                "bytes_upstream_to_client",
            ]
        );
        assert_eq!(
            names[10..],
            [
                "inbound_connections_total",
                "inbound_connections_active",
                "inbound_forwarded_total",
                "inbound_loop_rejected",
                "inbound_upstream_connect_errors_refused",
                "inbound_upstream_connect_errors_timeout",
                "inbound_upstream_connect_errors_other",
                "inbound_bytes_client_to_upstream",
                "inbound_bytes_upstream_to_client",
            ]
        );
        assert_eq!(obj["upstream_connect_errors_timeout"], 1);
        assert_eq!(obj["connections_total"], 1);
        assert_eq!(obj["connections_active"], 0);
        assert_eq!(obj["inbound_upstream_connect_errors_refused"], 1);
        assert_eq!(obj["inbound_loop_rejected"], 2);
        assert_eq!(obj["inbound_connections_total"], 1);
        assert_eq!(obj["inbound_connections_active"], 0);
        // Another process's counters carry over, a gauge going down too.
        let carried = Stats::default();
        let mut handed = s.snapshot();
        handed.outbound.connections_active = 3;
        carried.add_delta(&StatsSnapshot::default(), &handed);
        assert_eq!(carried.snapshot(), handed);
        let mut exited = handed;
        exited.outbound.connections_active = 0;
        exited.outbound.bytes_client_to_upstream += 10;
        carried.add_delta(&handed, &exited);
        assert_eq!(carried.snapshot(), exited);
        // Histograms too, cell by cell.
        s.outbound
            .connection_seconds
            .observe(std::time::Duration::from_millis(3));
        let carried = Stats::default();
        carried.add_histogram_delta(&[], &s.histogram_values());
        assert_eq!(carried.histogram_values(), s.histogram_values());
        assert_eq!(carried.outbound.connection_seconds.count(), 1);
        carried.add_histogram_delta(&[1, 2, 3], &s.histogram_values());
        assert_eq!(
            carried.outbound.connection_seconds.count(),
            1,
            "wrong layout ignored"
        );
        // And back.
        let back: StatsSnapshot = serde_json::from_value(v).unwrap();
        assert_eq!(back, s.snapshot());
    }
}
