//! Node agent mode: watch the pods on this node (kube-rs `runtime::watcher` with the field
//! selector `spec.nodeName=<node>`) and hand the ones that opt in to the engine, which
//! attaches their cgroup and network namespace and detaches them when they go.
//!
//! RBAC cannot limit a ClusterRole to one node's pods: the agent is granted list/watch on
//! pods (all the watcher uses) and restricts itself with the field selector (the API server filters, so the agent
//! only ever receives its node's pods).
use std::{collections::BTreeMap, sync::atomic::Ordering, sync::Arc};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Client,
};

use super::{config::KubeConfig, engine::Shared, pods};
use crate::error::{Error, Result};

async fn client(cfg: &KubeConfig) -> Result<Client> {
    let err = |context: &str, e: String| Error::Kubernetes {
        context: context.into(),
        cause: e,
    };
    match &cfg.api_server {
        Some(url) => {
            let uri = url
                .parse()
                .map_err(|e| err("api_server", format!("{url:?}: {e}")))?;
            let mut c = kube::Config::new(uri);
            c.default_namespace = "default".into();
            // A given server without credentials: the service account's token when mounted.
            if let Ok(incluster) = kube::Config::incluster() {
                c.auth_info = incluster.auth_info;
                c.root_cert = incluster.root_cert;
            }
            Client::try_from(c).map_err(|e| err("creating the client", e.to_string()))
        }
        None => Client::try_default().await.map_err(|e| {
            err(
                "no in-cluster config and no kubeconfig",
                format!("{e}; run in a pod with a service account, set KUBECONFIG, or set kubernetes.api_server"),
            )
        }),
    }
}

/// Watches the node's pods until the stream ends (it does not: the watcher retries with
/// backoff on errors, which are logged).
pub async fn run(cfg: KubeConfig, shared: Arc<Shared>) -> Result<()> {
    let client = client(&cfg).await?;
    let api: Api<Pod> = Api::all(client);
    let selector = format!("spec.nodeName={}", cfg.node_name);
    tracing::info!(node = %cfg.node_name, field_selector = %selector, "watching pods");
    let wc = watcher::Config::default().fields(&selector);
    let mut stream = watcher(api, wc).default_backoff().boxed();
    let mut initial: Option<BTreeMap<String, super::engine::ScopeSpec>> = None;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => initial = Some(BTreeMap::new()),
            Ok(watcher::Event::InitApply(p)) => {
                if let (Some(m), Some(s)) = (initial.as_mut(), pods::spec(&p, cfg.inbound)) {
                    m.insert(s.key.clone(), s);
                }
            }
            Ok(watcher::Event::InitDone) => {
                let m = initial.take().unwrap_or_default();
                tracing::info!(
                    pods = m.len(),
                    "pod list read: intercepting the pods that opt in"
                );
                shared.set_pods(m);
                shared.pods_synced.store(true, Ordering::SeqCst);
            }
            Ok(watcher::Event::Apply(p)) => {
                let key = pods::key(
                    p.metadata.namespace.as_deref().unwrap_or("default"),
                    p.metadata.name.as_deref().unwrap_or(""),
                );
                let spec = pods::spec(&p, cfg.inbound);
                tracing::debug!(pod = %key, intercept = spec.is_some(), "pod changed");
                shared.put_pod(&key, spec);
            }
            Ok(watcher::Event::Delete(p)) => {
                let key = pods::key(
                    p.metadata.namespace.as_deref().unwrap_or("default"),
                    p.metadata.name.as_deref().unwrap_or(""),
                );
                tracing::info!(pod = %key, "pod deleted");
                shared.put_pod(&key, None);
            }
            Err(e) => tracing::warn!(error = %e, "watching pods (retrying with backoff)"),
        }
    }
    Ok(())
}
