use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use interceptor::{
    settings::{self, Mark, ScopeSettings},
    PinLayout,
};
use ipnet::IpNet;

#[derive(Args)]
pub struct AttachArgs {
    /// cgroup directory (on the cgroup2 mount) whose processes are intercepted.
    #[arg(long)]
    cgroup: PathBuf,
    /// Port of the proxy's outbound listener on 127.0.0.1 and [::1].
    #[arg(long, default_value_t = settings::DEFAULT_PROXY_PORT, value_parser = port)]
    proxy_port: u16,
    /// Sockets with this SO_MARK go direct (hex or decimal; 0 disables the check).
    #[arg(long, default_value = "0x539", value_parser = mark)]
    bypass_mark: u32,
    /// Sockets of this uid go direct (repeatable; default 1337).
    #[arg(long = "bypass-uid", value_parser = uid)]
    bypass_uids: Vec<u32>,
    /// Intercept no uid's sockets by uid (clears the default bypass uid).
    #[arg(long, conflicts_with = "bypass_uids")]
    no_bypass_uid: bool,
    /// Destination port that goes direct (repeatable).
    #[arg(long = "exclude-port", value_parser = port)]
    exclude_ports: Vec<u16>,
    /// Destination network that goes direct (repeatable), e.g. 10.0.0.0/8.
    #[arg(long = "exclude-cidr", value_parser = cidr)]
    exclude_cidrs: Vec<IpNet>,
    /// When given, only destinations in these networks are intercepted (repeatable, per family).
    #[arg(long = "include-cidr", value_parser = cidr)]
    include_cidrs: Vec<IpNet>,
}

fn port(s: &str) -> Result<u16, String> {
    settings::parse_port(s).map_err(|e| e.to_string())
}
fn mark(s: &str) -> Result<u32, String> {
    settings::parse_mark(s).map_err(|e| e.to_string())
}
fn uid(s: &str) -> Result<u32, String> {
    settings::parse_uid(s).map_err(|e| e.to_string())
}
fn cidr(s: &str) -> Result<IpNet, String> {
    settings::parse_cidr(s).map_err(|e| e.to_string())
}

pub fn run(layout: &PinLayout, a: AttachArgs) -> Result<()> {
    let mut s = ScopeSettings {
        proxy_port: a.proxy_port,
        bypass_mark: a.bypass_mark,
        exclude_ports: a.exclude_ports.into_iter().collect(),
        exclude_cidrs: a.exclude_cidrs.into_iter().collect(),
        include_cidrs: a.include_cidrs.into_iter().collect(),
        ..ScopeSettings::default()
    };
    if a.no_bypass_uid {
        s.bypass_uids.clear();
    } else if !a.bypass_uids.is_empty() {
        s.bypass_uids = a.bypass_uids.into_iter().collect();
    }
    let done = interceptor::attach(layout, &a.cgroup, &s)?;
    tracing::info!(
        cgroup = %done.cgroup.path.display(),
        cgroup_id = done.cgroup.id,
        proxy_port = s.proxy_port,
        bypass_mark = %Mark(s.bypass_mark),
        updated = !done.created,
        new_links = done.new_links.len(),
        "attached"
    );
    println!(
        "{} {} (cgroup id {}): connections go to port {}",
        if done.created { "attached" } else { "updated" },
        done.cgroup.path.display(),
        done.cgroup.id,
        s.proxy_port
    );
    Ok(())
}
