use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Args;
use interceptor::PinLayout;

#[derive(Args)]
pub struct StatsArgs {
    /// Print JSON.
    #[arg(long, conflicts_with = "prometheus")]
    json: bool,
    /// Print the OpenMetrics text exposition (for a textfile collector or a scrape job).
    #[arg(long)]
    prometheus: bool,
    /// Only this cgroup's counters.
    #[arg(long, conflicts_with = "netns")]
    cgroup: Option<PathBuf>,
    /// Only this network namespace's (inbound) counters.
    #[arg(long)]
    netns: Option<PathBuf>,
}

pub fn run(layout: &PinLayout, a: StatsArgs) -> Result<()> {
    let mut st = interceptor::stats(layout)?;
    let only = match (&a.cgroup, &a.netns) {
        (Some(path), _) => Some((path, interceptor::cgroup::resolve(path)?.id)),
        (_, Some(path)) => Some((path, interceptor::netns::resolve(path)?.scope_id())),
        _ => None,
    };
    if let Some((path, id)) = only {
        st.scopes.retain(|s| s.id == id);
        if st.scopes.is_empty() {
            return Err(interceptor::Error::NotAttached { path: path.clone() }).context("stats");
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    if a.prometheus {
        print!("{}", st.to_openmetrics());
        return Ok(());
    }
    for s in &st.scopes {
        let what = if s.kind == "inbound" {
            "netns"
        } else {
            "cgroup"
        };
        println!("{what} {} ({} scope {})", s.path, s.kind, s.id);
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
    println!("records: {} awaiting the proxy's side", st.handoff_records);
    println!("kernel forwarding: {} sockets", st.kernel_forward_sockets);
    Ok(())
}
