//! `stats`: the kernel programs' decision counters, per scope, and the records held.
use std::collections::BTreeMap;

use interceptor_common::Counter;
use serde::Serialize;

use crate::{error::Result, maps, paths::PinLayout, system};

#[derive(Clone, Debug, Serialize)]
pub struct ScopeStats {
    /// `outbound` (a cgroup) or `inbound` (a network namespace).
    pub kind: &'static str,
    /// The cgroup or network namespace path given at attach time.
    pub path: String,
    /// Scope id: the cgroup id, or the namespace inode with bit 63 set.
    pub id: u64,
    pub counters: BTreeMap<&'static str, u64>,
}

#[derive(Clone, Debug, Serialize, Default)]
pub struct Stats {
    pub scopes: Vec<ScopeStats>,
    /// Counts that belong to no scope (getsockopt on sockets without a record).
    pub global: BTreeMap<&'static str, u64>,
    /// Entries of `ICP_HANDOFF`: connections established on the client's side whose proxy's
    /// side is not yet (records themselves live in socket storage and go with their sockets).
    pub handoff_records: usize,
    /// Sockets under kernel forwarding now: entries of `ICP_FWD_STATE` and of the `ICP_FWD`
    /// sockhash (each removed when its socket closes).
    pub kernel_forward_sockets: usize,
    pub kernel_forward_sockhash: usize,
}

impl Stats {
    /// The counters of the scope attached to `cgroup`, if any.
    pub fn scope(&self, id: u64) -> Option<&ScopeStats> {
        self.scopes.iter().find(|s| s.id == id)
    }

    /// One counter of one scope (0 when absent).
    pub fn get(&self, id: u64, counter: Counter) -> u64 {
        self.scope(id)
            .and_then(|s| s.counters.get(counter.name()).copied())
            .unwrap_or(0)
    }
}

impl Stats {
    /// The counters in the OpenMetrics text format (`interceptor stats --prometheus`):
    ///
    /// - `interceptor_decisions_total{kind, scope, path, decision}`: one series per scope
    ///   and decision counter (`kind` is outbound or inbound; counts that belong to no
    ///   scope have `scope="none"`);
    /// - `interceptor_records{state="handoff"}`: entries of `ICP_HANDOFF` now.
    pub fn to_openmetrics(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Collector(self.clone())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[derive(Debug)]
struct Collector(Stats);

impl prometheus_client::collector::Collector for Collector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::result::Result<(), std::fmt::Error> {
        use prometheus_client::encoding::NoLabelSet;
        use prometheus_client::metrics::MetricType;
        let mut m = encoder.encode_descriptor(
            "interceptor_decisions",
            "Decisions of the kernel programs, per attached scope.",
            None,
            MetricType::Counter,
        )?;
        for s in &self.0.scopes {
            let scope = s.id.to_string();
            for (name, v) in &s.counters {
                let labels = [
                    ("kind", s.kind),
                    ("scope", scope.as_str()),
                    ("path", s.path.as_str()),
                    ("decision", name),
                ];
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(v, None)?;
            }
        }
        for (name, v) in &self.0.global {
            let labels = [
                ("kind", "none"),
                ("scope", "none"),
                ("path", ""),
                ("decision", name),
            ];
            m.encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(v, None)?;
        }
        let mut m = encoder.encode_descriptor(
            "interceptor_records",
            "Connection records held by the kernel programs now.",
            None,
            MetricType::Gauge,
        )?;
        m.encode_family(&[("state", "handoff")])?
            .encode_gauge(&(self.0.handoff_records as u64))?;
        m.encode_family(&[("state", "kernel_forward")])?
            .encode_gauge(&(self.0.kernel_forward_sockets as u64))?;
        Ok(())
    }
}

/// The counters, read under the pin dir's shared lock (a consistent view between two
/// loader changes).
pub fn stats(layout: &PinLayout) -> Result<Stats> {
    system::check_privileges()?;
    if !system::pin_dir_present(layout.root()) {
        return Ok(Stats::default());
    }
    let _lock = crate::lock::PinLock::shared(layout)?;
    read(layout)
}

/// The same counters read WITHOUT the pin dir's lock, for frequent readers that must never
/// delay `attach` or `detach` (the daemon's `/metrics`): every map is read on its own, so a
/// scope attached or detached meanwhile may be missing or show no counters yet, and a read
/// racing the removal of the last scope's maps fails (the caller keeps its previous answer).
pub fn stats_unlocked(layout: &PinLayout) -> Result<Stats> {
    system::check_privileges()?;
    if !system::pin_dir_present(layout.root()) {
        return Ok(Stats::default());
    }
    read(layout)
}

fn read(layout: &PinLayout) -> Result<Stats> {
    if !layout.map(interceptor_common::maps::CONFIG).exists() {
        return Ok(Stats::default());
    }
    let mut counters = maps::read_counters(layout)?;
    let handoff_records = maps::handoff_count(layout)?;
    let (kernel_forward_sockets, kernel_forward_sockhash) = maps::kernel_forward_count(layout)?;
    let global = counters.remove(&0).unwrap_or_default();
    let mut scope = |kind, path, id, names: &[Counter]| {
        let mut c: BTreeMap<&'static str, u64> = names.iter().map(|c| (c.name(), 0)).collect();
        if let Some(found) = counters.remove(&id) {
            c.extend(found);
        }
        ScopeStats {
            kind,
            path,
            id,
            counters: c,
        }
    };
    let mut scopes: Vec<ScopeStats> = maps::read_scopes(layout)?
        .into_iter()
        .map(|s| scope("outbound", s.path, s.id, &Counter::OUTBOUND))
        .collect();
    scopes.extend(
        maps::read_inbound_scopes(layout)?
            .into_iter()
            .map(|s| scope("inbound", s.path, s.id, &Counter::INBOUND)),
    );
    Ok(Stats {
        scopes,
        global,
        handoff_records,
        kernel_forward_sockets,
        kernel_forward_sockhash,
    })
}
