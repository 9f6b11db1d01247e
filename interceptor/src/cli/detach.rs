use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use interceptor::PinLayout;

#[derive(Args)]
pub struct DetachArgs {
    /// cgroup directory to stop intercepting (it may have been removed since attach).
    #[arg(long, required_unless_present = "all", conflicts_with = "all")]
    cgroup: Option<PathBuf>,
    /// Detach every cgroup attached from this pin dir and remove the pin dir.
    #[arg(long)]
    all: bool,
}

pub fn run(layout: &PinLayout, a: DetachArgs) -> Result<()> {
    let done = match &a.cgroup {
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
