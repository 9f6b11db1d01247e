use anyhow::{bail, Result};
use clap::Args;
use interceptor::{
    upgrade::{LinkUpgrade, Outcome},
    PinLayout,
};

#[derive(Args)]
pub struct UpgradeArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn opt(v: Option<u32>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn print_link(root: &std::path::Path, l: &LinkUpgrade) {
    let pin = l.pin.strip_prefix(root).unwrap_or(&l.pin).display();
    match &l.outcome {
        Outcome::Upgraded => println!(
            "upgraded     {pin:<32} link {:<6} prog {} -> {}",
            opt(l.link_id),
            opt(l.old_program),
            opt(l.new_program)
        ),
        Outcome::TargetGone => println!(
            "target gone  {pin:<32} link {:<6} prog {} (its cgroup or namespace was removed; `interceptor detach` removes the pin)",
            opt(l.link_id),
            opt(l.old_program)
        ),
        Outcome::Failed { reason } => println!(
            "NOT UPGRADED {pin:<32} link {:<6} prog {} still runs: {reason}",
            opt(l.link_id),
            opt(l.old_program)
        ),
    }
}

pub fn run(layout: &PinLayout, a: UpgradeArgs) -> Result<()> {
    let done = interceptor::upgrade(layout)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else if done.links.is_empty() {
        println!(
            "nothing is attached from {}; nothing to upgrade",
            layout.root().display()
        );
    } else {
        for l in &done.links {
            print_link(layout.root(), l);
        }
        println!(
            "{} of {} link(s) in {} run this interceptor's programs (layout {}){}",
            done.upgraded(),
            done.links.len(),
            layout.root().display(),
            opt(done.layout_version),
            match done.targets_gone() {
                0 => String::new(),
                n => format!("; {n} link(s) whose target is gone"),
            }
        );
    }
    if done.failed() > 0 {
        bail!(
            "{} link(s) could not be upgraded and still run their previous programs (which share the maps with the new ones, so interception works); rerun `interceptor upgrade`",
            done.failed()
        );
    }
    Ok(())
}
