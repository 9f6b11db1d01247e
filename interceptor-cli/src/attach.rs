use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use interceptor::{
    settings::{self, InboundSettings, Mark, ProxyDown, ProxyListener, ScopeSettings},
    PinLayout,
};
use ipnet::IpNet;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("scope").required(true).args(["cgroup", "netns"])))]
pub struct AttachArgs {
    /// Outbound: cgroup directory (on the cgroup2 mount) whose connections are intercepted.
    #[arg(long, conflicts_with = "netns")]
    cgroup: Option<PathBuf>,
    /// Inbound: network namespace file (/run/netns/NAME, /proc/PID/ns/net) whose incoming
    /// connections are steered to the proxy's inbound listener.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// While no proxy listens: `closed` refuses connections, `open` lets them go direct.
    #[arg(long, default_value = "closed", value_parser = proxy_down)]
    on_proxy_down: ProxyDown,
    /// Inbound: port of the proxy's inbound listener.
    #[arg(long, default_value_t = settings::DEFAULT_INBOUND_PORT, value_parser = port, requires = "netns")]
    inbound_port: u16,
    /// Inbound: local port whose connections go straight to the workload (repeatable).
    #[arg(long = "exclude-inbound-port", value_parser = port, requires = "netns")]
    exclude_inbound_ports: Vec<u16>,
    /// Inbound: when given, only these local ports are intercepted (repeatable).
    #[arg(long = "include-inbound-port", value_parser = port, requires = "netns")]
    include_inbound_ports: Vec<u16>,
    /// Port of the proxy's outbound listener on 127.0.0.1 and [::1].
    #[arg(long, default_value_t = settings::DEFAULT_PROXY_PORT, value_parser = port)]
    proxy_port: u16,
    /// Sockets with this SO_MARK go direct (hex or decimal; 0 disables the check).
    #[arg(long, default_value_t = Mark(settings::DEFAULT_BYPASS_MARK), value_parser = mark)]
    bypass_mark: Mark,
    /// Which listener on the proxy port is the proxy: `marked` (only one carrying the bypass
    /// mark, as interceptor-proxy's are; another process listening there gets nothing) or
    /// `any` (for a proxy that cannot mark its listener, e.g. HAProxy).
    #[arg(long, default_value = "marked", value_parser = proxy_listener)]
    proxy_listener: ProxyListener,
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
fn mark(s: &str) -> Result<Mark, String> {
    settings::parse_mark(s).map(Mark).map_err(|e| e.to_string())
}
fn uid(s: &str) -> Result<u32, String> {
    settings::parse_uid(s).map_err(|e| e.to_string())
}
fn cidr(s: &str) -> Result<IpNet, String> {
    settings::parse_cidr(s).map_err(|e| e.to_string())
}
fn proxy_listener(s: &str) -> Result<ProxyListener, String> {
    s.parse().map_err(|e: interceptor::Error| e.to_string())
}
fn proxy_down(s: &str) -> Result<ProxyDown, String> {
    s.parse().map_err(|e: interceptor::Error| e.to_string())
}

pub fn run(layout: &PinLayout, a: AttachArgs) -> Result<()> {
    if let Some(netns) = &a.netns {
        return run_inbound(layout, netns, &a);
    }
    let Some(cgroup) = &a.cgroup else {
        unreachable!("clap requires --cgroup or --netns");
    };
    let mut s = ScopeSettings {
        proxy_port: a.proxy_port,
        bypass_mark: a.bypass_mark.0,
        exclude_ports: a.exclude_ports.iter().copied().collect(),
        exclude_cidrs: a.exclude_cidrs.iter().copied().collect(),
        include_cidrs: a.include_cidrs.iter().copied().collect(),
        on_proxy_down: a.on_proxy_down,
        proxy_listener: a.proxy_listener,
        ..ScopeSettings::default()
    };
    if a.no_bypass_uid {
        s.bypass_uids.clear();
    } else if !a.bypass_uids.is_empty() {
        s.bypass_uids = a.bypass_uids.iter().copied().collect();
    }
    let done = interceptor::attach(layout, cgroup, &s)?;
    tracing::info!(
        cgroup = %done.cgroup.path.display(),
        cgroup_id = done.cgroup.id,
        proxy_port = s.proxy_port,
        bypass_mark = %Mark(s.bypass_mark),
        updated = !done.created,
        new_links = done.new_links.len(),
        links_brought_to_this_build = done.updated_links.len(),
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

fn run_inbound(layout: &PinLayout, netns: &std::path::Path, a: &AttachArgs) -> Result<()> {
    let s = InboundSettings {
        inbound_port: a.inbound_port,
        exclude_ports: a.exclude_inbound_ports.iter().copied().collect(),
        include_ports: a.include_inbound_ports.iter().copied().collect(),
        on_proxy_down: a.on_proxy_down,
    };
    let done = interceptor::attach_inbound(layout, netns, &s)?;
    tracing::info!(
        netns = %done.netns.display(),
        scope_id = done.scope_id,
        inbound_port = s.inbound_port,
        updated = !done.created,
        "attached inbound"
    );
    println!(
        "{} {}: inbound connections go to the listener on port {} once it is registered (`interceptor register --netns {} --pid PROXY_PID`)",
        if done.created { "attached" } else { "updated" },
        done.netns.display(),
        s.inbound_port,
        netns.display()
    );
    Ok(())
}
