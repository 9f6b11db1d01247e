use anyhow::Result;
use clap::Args;
use interceptor::{settings::Mark, status::LinkStatus, PinLayout};

#[derive(Args)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let v: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

fn print_link(prefix: &str, l: &LinkStatus) {
    let opt = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
    println!(
        "{prefix} {:<12} {} (link {}, prog {} {} tag {})",
        l.name,
        l.pin.display(),
        opt(l.link_id),
        opt(l.program_id),
        l.program_name.as_deref().unwrap_or("-"),
        l.program_tag.as_deref().unwrap_or("-"),
    );
}

pub fn run(layout: &PinLayout, a: StatusArgs) -> Result<()> {
    let st = interceptor::status(layout)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    println!("pin dir: {}", st.pin_dir.display());
    println!(
        "scope table: {} of {} in use (outbound and inbound scopes)",
        st.scopes.len() + st.inbound.len(),
        interceptor::SCOPE_TABLE_LIMIT
    );
    if st.scopes.is_empty() && st.inbound.is_empty() {
        println!("nothing attached");
        return Ok(());
    }
    println!(
        "kernel forwarding: {}",
        if st.kernel_forwarding {
            "ready (its verdict is attached; proxies started with --kernel-forward on use it)"
        } else {
            "unavailable (its verdict is not attached: the kernel refused it, as attach's log \
             says, or the maps are older than this check and `interceptor upgrade` sets it; \
             proxies copy every connection themselves)"
        }
    );
    for l in &st.root_links {
        print_link("root link", l);
    }
    for s in &st.scopes {
        let c = &s.settings;
        println!(
            "cgroup {} (id {}{})",
            s.cgroup,
            s.cgroup_id,
            if s.cgroup_exists { "" } else { ", REMOVED" }
        );
        println!(
            "  proxy port {}  proxy listener {:?}  bypass mark {}  bypass uids {}  on proxy down {:?}",
            c.proxy_port,
            c.proxy_listener,
            Mark(c.bypass_mark),
            list(&c.bypass_uids),
            c.on_proxy_down
        );
        println!(
            "  exclude ports {}  exclude cidrs {}  include cidrs {}",
            list(&c.exclude_ports),
            list(&c.exclude_cidrs),
            list(&c.include_cidrs)
        );
        for l in &s.links {
            print_link("  link", l);
        }
    }
    for s in &st.inbound {
        let c = &s.settings;
        println!(
            "netns {} (scope {}{})",
            s.netns,
            s.scope_id,
            if s.netns_exists { "" } else { ", REMOVED" }
        );
        println!(
            "  inbound port {}  exclude ports {}  include ports {}  on proxy down {:?}  registered {}",
            c.inbound_port,
            list(&c.exclude_ports),
            list(&c.include_ports),
            c.on_proxy_down,
            list(&s.registered)
        );
        for l in &s.links {
            print_link("  link", l);
        }
    }
    Ok(())
}
