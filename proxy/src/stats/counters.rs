//! The live counters: relaxed atomics, cheap to bump on every connection and chunk.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::destinations::Destinations;
use super::direction::Direction;
use super::histogram::Histogram;
use super::snapshot::{DirectionSnapshot, StatsSnapshot};

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
    /// Connections accepted and closed at once because `--max-connections` were open.
    pub connections_refused_limit: AtomicU64,
    /// Accepts that failed for want of file descriptors (EMFILE/ENFILE) or kernel memory
    /// (ENOBUFS/ENOMEM); the accept loop backed off after each.
    pub accept_errors_resources: AtomicU64,
    /// Connections this process moved to a new one at an upgrade (see [`crate::upgrade`]).
    pub upgrade_moved_connections: AtomicU64,
    /// Connections a drain closed at its deadline (`--drain-timeout`): those that neither
    /// ended nor moved in time.
    pub drain_cut_connections: AtomicU64,
    /// Per-destination counters (off unless switched on).
    pub destinations: Destinations,
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
            connections_refused_limit: self.connections_refused_limit.load(Relaxed),
            accept_errors_resources: self.accept_errors_resources.load(Relaxed),
            upgrade_moved_connections: self.upgrade_moved_connections.load(Relaxed),
            drain_cut_connections: self.drain_cut_connections.load(Relaxed),
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
        add(
            &self.connections_refused_limit,
            from.connections_refused_limit,
            to.connections_refused_limit,
        );
        add(
            &self.accept_errors_resources,
            from.accept_errors_resources,
            to.accept_errors_resources,
        );
        add(
            &self.upgrade_moved_connections,
            from.upgrade_moved_connections,
            to.upgrade_moved_connections,
        );
        add(
            &self.drain_cut_connections,
            from.drain_cut_connections,
            to.drain_cut_connections,
        );
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

    /// Counts a connection moved here from the previous process (active only: it was
    /// accepted there).
    pub fn resumed(stats: &'a DirectionStats) -> Self {
        stats.connections_active.fetch_add(1, Relaxed);
        ActiveGuard(stats)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Relaxed);
    }
}
