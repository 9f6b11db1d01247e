use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Result};
use clap::Args;

#[derive(Args)]
pub struct RunArgs {
    /// The daemon's config file (TOML: scopes, HTTP address, node agent mode).
    #[arg(long, default_value = "/etc/interceptor/config.toml")]
    config: PathBuf,
    /// Parse and check the config, print what it declares and exit.
    #[arg(long)]
    check: bool,
}

pub fn run(a: RunArgs) -> Result<()> {
    if a.check {
        let c = interceptor_daemon::config::load(&a.config)?;
        println!(
            "{}: ok: {} scope(s), listen {}, admin_listen {}, pin dir {}{}",
            a.config.display(),
            c.scopes.len(),
            c.listen,
            c.admin_listen,
            c.pin_dir.display(),
            c.kubernetes
                .map(|k| format!(", node agent for node {}", k.node_name))
                .unwrap_or_default()
        );
        return Ok(());
    }
    interceptor_daemon::run(&a.config)?;
    Ok(())
}

#[derive(Args)]
pub struct WaitReadyArgs {
    /// What to poll, e.g. http://$HOST_IP:15030/pods/$POD_NAMESPACE/$POD_NAME/ready.
    url: String,
    /// Give up (exit 1) after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Between two tries.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
}

pub fn wait_ready(a: WaitReadyArgs) -> Result<()> {
    match interceptor_daemon::http::wait_ready(
        &a.url,
        Duration::from_secs(a.timeout_secs),
        Duration::from_millis(a.interval_ms),
    ) {
        Ok(body) => {
            println!("{}: {body}", a.url);
            Ok(())
        }
        Err(last) => bail!(
            "{} not ready after {} s (last answer: {last})",
            a.url,
            a.timeout_secs
        ),
    }
}

#[derive(Args)]
pub struct MountBpffsArgs {
    /// Where bpffs belongs.
    #[arg(long, default_value = interceptor::system::BPFFS_MOUNT)]
    path: PathBuf,
}

/// `interceptor mount-bpffs`: mounts bpffs unless it is there (the DaemonSet's init step,
/// with the host's /sys/fs/bpf mounted Bidirectional, so the mount shows on the host).
pub fn mount_bpffs(a: MountBpffsArgs) -> Result<()> {
    let already = interceptor::system::pin_dir_present(&a.path);
    interceptor::system::ensure_bpffs(&a.path.join("interceptor"))?;
    println!(
        "{}: bpffs {}",
        a.path.display(),
        if already {
            "already mounted"
        } else {
            "mounted"
        }
    );
    Ok(())
}
