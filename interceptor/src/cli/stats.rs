use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Args;
use interceptor::PinLayout;

#[derive(Args)]
pub struct StatsArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Only this cgroup's counters.
    #[arg(long)]
    cgroup: Option<PathBuf>,
}

pub fn run(layout: &PinLayout, a: StatsArgs) -> Result<()> {
    let mut st = interceptor::stats(layout)?;
    if let Some(path) = &a.cgroup {
        let cg = interceptor::cgroup::resolve(path)?;
        st.scopes.retain(|s| s.cgroup_id == cg.id);
        if st.scopes.is_empty() {
            return Err(interceptor::Error::NotAttached { path: path.clone() }).context("stats");
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    for s in &st.scopes {
        println!("cgroup {} (id {})", s.cgroup, s.cgroup_id);
        for (name, v) in &s.counters {
            println!("  {name:<18} {v}");
        }
    }
    if !st.global.is_empty() {
        println!("no scope");
        for (name, v) in &st.global {
            println!("  {name:<18} {v}");
        }
    }
    println!(
        "records: {} pending, {} handed off",
        st.pending_records, st.handoff_records
    );
    Ok(())
}
