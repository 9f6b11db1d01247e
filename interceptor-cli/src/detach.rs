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
    if done.kept_for_kernel_forwarding > 0 {
        println!(
            "no scope left, but the root programs and maps are kept: {} socket(s) are still \
             forwarded by the kernel (a proxy's open connections with --kernel-forward on), and \
             removing the maps now would lose the bytes queued in them; run `interceptor detach \
             --all` again once those connections have closed (or the proxy has stopped)",
            done.kept_for_kernel_forwarding
        );
    }
    Ok(())
}
