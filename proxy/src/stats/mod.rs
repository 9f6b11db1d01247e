//! Proxy counters: relaxed atomics, cheap to bump on every connection and chunk.
//!
//! Each direction (outbound, inbound) has the same set of counters ([`DirectionStats`]).
//! In `/stats` and `/metrics` the outbound ones keep their original, unprefixed names
//! (`connections_total`, ...) and the inbound ones are prefixed `inbound_`.
//!
//! This module keeps the numbers; [`crate::metrics`] renders them for `/metrics` and the
//! admin server serves `/stats` from [`StatsSnapshot`].
//!
//! | file | what |
//! |---|---|
//! | `counters.rs` | [`Stats`], [`DirectionStats`]: the live counters, carried over at an upgrade |
//! | `snapshot.rs` | [`StatsSnapshot`]: a copy of them, its `/stats` JSON shape |
//! | `histogram.rs` | [`Histogram`] over [`BUCKETS`] |
//! | `destinations.rs` | [`Destinations`]: per-destination counters behind a run-time switch |
//! | `direction.rs` | [`Direction`]: outbound or inbound |

mod counters;
mod destinations;
mod direction;
mod histogram;
mod snapshot;

pub use counters::{ActiveGuard, ConnectErrorKind, DirectionStats, Stats};
pub use destinations::{DestinationCounts, DestinationLimits, DestinationSeries, Destinations};
pub use direction::Direction;
pub use histogram::{Histogram, BUCKETS};
pub use snapshot::{DirectionSnapshot, StatsSnapshot, INBOUND_PREFIX};

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

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
        assert_eq!(names.len(), 23);
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
            names[10..19],
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
        assert_eq!(
            names[19..],
            [
                "connections_refused_limit",
                "accept_errors_resources",
                "upgrade_moved_connections",
                "drain_cut_connections"
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
        handed.connections_refused_limit = 4;
        handed.accept_errors_resources = 5;
        handed.upgrade_moved_connections = 6;
        handed.drain_cut_connections = 7;
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
