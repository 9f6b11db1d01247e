use std::io::Write as _;

use anyhow::Result;
use clap::Args;
use interceptor::PinLayout;

#[derive(Args)]
pub struct LogsArgs {
    /// Stop after this many seconds (default: run until interrupted).
    #[arg(long, value_name = "SECONDS")]
    for_secs: Option<u64>,
}

/// Prints each log line of the kernel programs under the pin dir as it comes. Only programs
/// loaded with `--kernel-log debug` write any. Once it reads them, it says so on stderr
/// (`interceptor logs: following N program(s)`).
pub fn run(layout: &PinLayout, a: LogsArgs) -> Result<()> {
    let limit = a.for_secs.map(std::time::Duration::from_secs);
    let mut out = std::io::stdout().lock();
    let ready = |n| eprintln!("interceptor logs: following {n} program(s)");
    interceptor::kernel_log::follow(layout, limit, ready, |line| {
        writeln!(out, "{line}").and_then(|_| out.flush()).is_ok()
    })?;
    Ok(())
}
