//! `interceptor run --config FILE`: the long-running daemon over the loader library
//! (`interceptor`), and its node agent mode. A crate of its own so that the loader library,
//! which every embedder and test links, carries no async runtime, Kubernetes client or TOML
//! parser (ARCHITECTURE.md, "Where the daemon lives").
//!
//! It keeps the config's scopes (cgroup paths, systemd units and slices) attached, attaches
//! again when a scope's cgroup is recreated (a unit restart), detaches scopes dropped from the
//! config on reload (SIGHUP; a config that does not parse changes nothing), serves health,
//! readiness and the kernel counters over HTTP, and in node agent mode (`[kubernetes]`) does
//! the same for the pods of its node that opt in. On SIGTERM or SIGINT it exits and leaves the
//! interception in place (the links are pinned), unless `detach_on_exit = true`.
#![deny(unsafe_code)]
pub mod agent;
pub mod config;
pub mod engine;
pub mod error;
pub mod http;
pub mod pods;
pub mod resolve;

use std::{path::Path, sync::Arc};

use tokio::signal::unix::{signal, SignalKind};

use self::{
    config::Config,
    engine::{Resolver, ScopeSpec, Shared, SpecTarget},
};
use interceptor::paths::PinLayout;

pub use crate::error::{Error, Result};

/// The engine's scopes for the config's `[[scope]]`s.
pub fn config_specs(cfg: &Config) -> Vec<ScopeSpec> {
    cfg.scopes
        .iter()
        .map(|s| ScopeSpec {
            key: format!("scope/{}", s.name),
            target: SpecTarget::Config(s.target.clone()),
            settings: s.settings.clone(),
            inbound: s.inbound.as_ref().map(|(ns, ib)| engine::InboundSpec {
                netns: Some(ns.clone()),
                settings: ib.clone(),
            }),
            invalid: None,
        })
        .collect()
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config_path: &Path) -> Result<()> {
    let cfg = config::load(config_path)?;
    interceptor::system::check_privileges()?;
    if let Some(m) = &cfg.cgroup2_mount {
        interceptor::cgroup::set_cgroup2_mount(m.clone());
    }
    let mount = interceptor::cgroup::cgroup2_mount()?;
    let resolver = Resolver {
        cgroup_root: cfg.cgroup_root.clone().unwrap_or_else(|| mount.clone()),
        kubepods_parent: cfg
            .kubernetes
            .as_ref()
            .and_then(|k| k.kubepods_parent.clone())
            .unwrap_or_else(|| mount.clone()),
        driver: cfg
            .kubernetes
            .as_ref()
            .map_or(config::CgroupDriver::Auto, |k| k.cgroup_driver),
    };
    let layout = PinLayout::new(&cfg.pin_dir);
    let shared = Shared::new();
    shared.agent.store(
        cfg.kubernetes.is_some(),
        std::sync::atomic::Ordering::SeqCst,
    );
    shared.set_config_scopes(config_specs(&cfg), cfg.detach_on_exit);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runtime", e))?;
    let engine = {
        let (shared, layout, interval) = (shared.clone(), layout.clone(), cfg.rescan_interval);
        std::thread::Builder::new()
            .name("reconcile".into())
            .spawn(move || engine::run(shared, layout, resolver, interval))
            .map_err(|e| Error::io("starting the reconcile thread", e))?
    };
    let result = rt.block_on(serve(config_path, cfg, shared.clone(), layout));
    shared.stop();
    let _ = engine.join();
    result
}

async fn serve(
    config_path: &Path,
    cfg: Config,
    shared: Arc<Shared>,
    layout: PinLayout,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| {
            Error::io(
                format!("listen {} (is another daemon running?)", cfg.listen),
                e,
            )
        })?;
    tracing::info!(
        config = %config_path.display(),
        listen = %cfg.listen,
        admin_listen = %cfg.admin_listen,
        pin_dir = %cfg.pin_dir.display(),
        scopes = cfg.scopes.len(),
        node_agent = cfg.kubernetes.is_some(),
        "interceptor daemon running"
    );
    let admin = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(|e| {
            Error::io(
                format!(
                    "admin_listen {} (is another daemon running?)",
                    cfg.admin_listen
                ),
                e,
            )
        })?;
    if !cfg.admin_listen.ip().is_loopback() {
        tracing::warn!(admin_listen = %cfg.admin_listen, "admin_listen is not a loopback address: /scopes and /metrics (every scope's cgroup and counters) are served to whoever reaches it");
    }
    let agent = cfg.kubernetes.is_some();
    tokio::spawn(http::serve(
        listener,
        shared.clone(),
        layout.clone(),
        agent,
        http::Role::Public,
    ));
    tokio::spawn(http::serve(
        admin,
        shared.clone(),
        layout,
        agent,
        http::Role::Admin,
    ));
    if let Some(k) = cfg.kubernetes.clone() {
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = agent::run(k, shared).await {
                tracing::error!(error = %e, "node agent stopped");
            }
        });
    }
    let sig = |k| signal(k).map_err(|e| Error::io("installing a signal handler", e));
    let (mut hup, mut term, mut int) = (
        sig(SignalKind::hangup())?,
        sig(SignalKind::terminate())?,
        sig(SignalKind::interrupt())?,
    );
    let mut running = cfg;
    loop {
        tokio::select! {
            _ = hup.recv() => reload(config_path, &mut running, &shared),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stopping");
    Ok(())
}

/// SIGHUP: reads the config again; a config with an error changes nothing.
fn reload(path: &Path, running: &mut Config, shared: &Shared) {
    let new = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: the running config stays in force");
            return;
        }
    };
    for (what, same) in [
        ("pin_dir", new.pin_dir == running.pin_dir),
        ("listen", new.listen == running.listen),
        ("admin_listen", new.admin_listen == running.admin_listen),
        (
            "rescan_interval_ms",
            new.rescan_interval == running.rescan_interval,
        ),
        ("cgroup_root", new.cgroup_root == running.cgroup_root),
        ("cgroup2_mount", new.cgroup2_mount == running.cgroup2_mount),
        ("kubernetes", new.kubernetes == running.kubernetes),
    ] {
        if !same {
            tracing::warn!(
                setting = what,
                "changed in the config: takes effect at the next start, not on reload"
            );
        }
    }
    let before: Vec<String> = running.scopes.iter().map(|s| s.name.clone()).collect();
    let after: Vec<String> = new.scopes.iter().map(|s| s.name.clone()).collect();
    tracing::info!(
        scopes = after.len(),
        added = ?after.iter().filter(|n| !before.contains(n)).collect::<Vec<_>>(),
        removed = ?before.iter().filter(|n| !after.contains(n)).collect::<Vec<_>>(),
        "config reloaded"
    );
    running.scopes = new.scopes.clone();
    running.detach_on_exit = new.detach_on_exit;
    shared.set_config_scopes(config_specs(&new), new.detach_on_exit);
}
