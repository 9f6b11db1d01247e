//! Point-in-time copies of the counters: the flat `/stats` JSON object, and what an upgrade
//! carries from one process to the next.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point-in-time copy of [`DirectionStats`](super::DirectionStats).
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

/// A point-in-time copy of [`Stats`](super::Stats); serialized, this is the flat `/stats` JSON object
/// (outbound counters unprefixed, then `inbound_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub outbound: DirectionSnapshot,
    pub orig_dst_missing: u64,
    pub inbound: DirectionSnapshot,
    pub connections_refused_limit: u64,
    pub accept_errors_resources: u64,
    pub upgrade_moved_connections: u64,
    pub drain_cut_connections: u64,
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
        let mut out = Vec::with_capacity(23);
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
        out.push((
            Cow::Borrowed("connections_refused_limit"),
            self.connections_refused_limit,
            false,
        ));
        out.push((
            Cow::Borrowed("accept_errors_resources"),
            self.accept_errors_resources,
            false,
        ));
        out.push((
            Cow::Borrowed("upgrade_moved_connections"),
            self.upgrade_moved_connections,
            false,
        ));
        out.push((
            Cow::Borrowed("drain_cut_connections"),
            self.drain_cut_connections,
            false,
        ));
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
            } else if name == "connections_refused_limit" {
                Some(&mut s.connections_refused_limit)
            } else if name == "accept_errors_resources" {
                Some(&mut s.accept_errors_resources)
            } else if name == "upgrade_moved_connections" {
                Some(&mut s.upgrade_moved_connections)
            } else if name == "drain_cut_connections" {
                Some(&mut s.drain_cut_connections)
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
