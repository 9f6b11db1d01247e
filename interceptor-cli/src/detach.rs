use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use interceptor::PinLayout;

#[derive(Args)]
pub struct DetachArgs {
    /// cgroup directory to stop intercepting (it may have been removed since attach).
    #[arg(long, conflicts_with_all = ["all", "netns"])]
    cgroup: Option<PathBuf>,
    /// Network namespace to stop intercepting (it may have been removed since attach).
    #[arg(long, conflicts_with = "all")]
    netns: Option<PathBuf>,
    /// Detach every scope attached from this pin dir and remove the pin dir.
    #[arg(long, required_unless_present_any = ["cgroup", "netns"])]
    all: bool,
}

pub fn run(layout: &PinLayout, a: DetachArgs) -> Result<()> {
    let done = match a.cgroup.as_ref().or(a.netns.as_ref()) {
        Some(path) => interceptor::detach(layout, path)?,
        None => interceptor::detach_all(layout)?,
    };
    println!(
        "detached {} scope(s){}",
        done.scopes.len(),
        if done.cleaned_up {
            "; no scope left, root programs and maps removed"
        } else {
            ""
        }
    );
    Ok(())
}
