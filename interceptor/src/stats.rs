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
    /// Sockets between connect() and the established hand-off.
    pub pending_records: usize,
    /// Live intercepted connections whose record waits for, or served, the proxy.
    pub handoff_records: usize,
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
        pending_records,
        handoff_records,
    })
}
