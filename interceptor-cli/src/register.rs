use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use interceptor::PinLayout;
use interceptor::AF_INET;

#[derive(Args)]
pub struct RegisterArgs {
    /// The attached network namespace (as given to `attach --netns`).
    #[arg(long)]
    netns: PathBuf,
    /// The proxy's process id; its listening socket on the inbound port is taken from it.
    #[arg(long)]
    pid: i32,
}

pub fn run(layout: &PinLayout, a: RegisterArgs) -> Result<()> {
    for r in interceptor::register(layout, &a.netns, a.pid)? {
        let families: Vec<&str> = r
            .families
            .iter()
            .map(|f| if *f == AF_INET { "IPv4" } else { "IPv6" })
            .collect();
        println!(
            "registered {} (fd {} of pid {}) for {} ({})",
            r.addr,
            r.fd,
            a.pid,
            a.netns.display(),
            families.join(" and ")
        );
    }
    Ok(())
}
