//! `stats`: the kernel programs' decision counters, per scope, and the records held.
use std::collections::BTreeMap;

use interceptor_common::Counter;
use serde::Serialize;

use crate::{error::Result, maps, paths::PinLayout, system};

#[derive(Clone, Debug, Serialize)]
pub struct ScopeStats {
    pub cgroup: String,
    pub cgroup_id: u64,
    pub counters: BTreeMap<&'static str, u64>,
}

#[derive(Clone, Debug, Serialize, Default)]
pub struct Stats {
    pub scopes: Vec<ScopeStats>,
    /// Counts that belong to no scope (getsockopt on sockets without a record).
    pub global: BTreeMap<&'static str, u64>,
    /// Sockets between connect() and the established hand-off.
    pub pending_records: usize,
    /// Live intercepted connections whose record waits for, or served, the proxy.
    pub handoff_records: usize,
}

impl Stats {
    /// The counters of the scope attached to `cgroup`, if any.
    pub fn scope(&self, cgroup_id: u64) -> Option<&ScopeStats> {
        self.scopes.iter().find(|s| s.cgroup_id == cgroup_id)
    }

    /// One counter of one scope (0 when absent).
    pub fn get(&self, cgroup_id: u64, counter: Counter) -> u64 {
        self.scope(cgroup_id)
            .and_then(|s| s.counters.get(counter.name()).copied())
            .unwrap_or(0)
    }
}

pub fn stats(layout: &PinLayout) -> Result<Stats> {
    system::check_privileges()?;
    if !system::pin_dir_present(layout.root())
        || !layout.map(interceptor_common::maps::CONFIG).exists()
    {
        return Ok(Stats::default());
    }
    let mut counters = maps::read_counters(layout)?;
    let (pending_records, handoff_records) = maps::record_counts(layout)?;
    let global = counters.remove(&0).unwrap_or_default();
    let scopes = maps::read_scopes(layout)?
        .into_iter()
        .map(|s| {
            let mut c: BTreeMap<&'static str, u64> =
                Counter::ALL.iter().map(|c| (c.name(), 0)).collect();
            if let Some(found) = counters.remove(&s.id) {
                c.extend(found);
            }
            ScopeStats {
                cgroup: s.path,
                cgroup_id: s.id,
                counters: c,
            }
        })
        .collect();
    Ok(Stats {
        scopes,
        global,
        pending_records,
        handoff_records,
    })
}
