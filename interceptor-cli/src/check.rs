use anyhow::{bail, Result};
use clap::Args;
use interceptor::features::{self, MIN_KERNEL};

#[derive(Args)]
pub struct CheckArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Probes the running kernel for every hook, helper, map type and link kind the programs
/// use and prints what is there; exits 1 when a required feature is missing.
pub fn run(a: CheckArgs) -> Result<()> {
    interceptor::system::check_privileges()?;
    let f = features::probe();
    let missing: Vec<_> = f.missing_required().collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(f)?);
    } else {
        println!("kernel {}", f.kernel);
        println!("{:<8} {:<44} {:<40} state", "kind", "feature", "used by");
        for x in &f.features {
            let state = match (x.present, x.required) {
                (true, _) => "ok".to_string(),
                (false, true) => format!("MISSING: {}", x.detail.as_deref().unwrap_or("")),
                (false, false) => format!(
                    "missing (optional, off): {}",
                    x.detail.as_deref().unwrap_or("")
                ),
            };
            println!(
                "{:<8} {:<44} {:<40} {state}",
                format!("{:?}", x.kind).to_lowercase(),
                x.name,
                x.used_by
            );
        }
        let optional = f.missing_optional().count();
        if missing.is_empty() {
            println!(
                "every required feature is present{}",
                if optional > 0 {
                    format!("; {optional} optional feature(s) missing (they stay off)")
                } else {
                    String::new()
                }
            );
        }
    }
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(|m| m.label()).collect();
        bail!(
            "this kernel ({}) lacks {} required feature(s): {}; the interception needs Linux {MIN_KERNEL} or newer, and `attach` refuses here",
            f.kernel,
            missing.len(),
            names.join(", ")
        );
    }
    Ok(())
}
