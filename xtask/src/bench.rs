//! `cargo xtask bench [--no-build] [ARGS...]`: setup, release build, clean stale
//! `icpt-t-*` state, then `target/release/interceptor-bench ARGS...` with the binaries
//! under test named in `INTERCEPTOR_BIN` / `INTERCEPTOR_PROXY_BIN`. Exits with the
//! bench's status (non-zero when a `--smoke` check fails).

use std::process::Command;

use anyhow::{Context, Result};

use crate::{setup, stale, util};

pub fn bench(no_build: bool, args: &[String]) -> Result<i32> {
    let help = args.iter().any(|a| a == "-h" || a == "--help");
    if !no_build && !help {
        setup::setup()?;
        crate::build()?;
    }
    let bins = util::Bins::locate(false);
    let bench = util::target_dir().join("release").join("interceptor-bench");
    let bench = bins.require(&bench)?;
    if help {
        let st = Command::new(&bench).args(args).status()?;
        return Ok(st.code().unwrap_or(1));
    }
    let interceptor = bins.require(&bins.interceptor)?;
    let proxy = bins.require(&bins.proxy)?;
    bins.require(&bins.exec)?;
    stale::clean_stale(Some(&interceptor));
    println!(
        "bench: INTERCEPTOR_BIN={} INTERCEPTOR_PROXY_BIN={} {} {}",
        interceptor.display(),
        proxy.display(),
        bench.display(),
        args.join(" ")
    );
    let st = Command::new(&bench)
        .args(args)
        .current_dir(util::workspace_root())
        .env("INTERCEPTOR_BIN", &interceptor)
        .env("INTERCEPTOR_PROXY_BIN", &proxy)
        .status()
        .with_context(|| format!("run {}", bench.display()))?;
    Ok(st.code().unwrap_or(1))
}
