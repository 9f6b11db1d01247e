//! Which pods the node agent intercepts, and with which settings: the opt-in annotation
//! (Istio's `sidecar.istio.io/inject` honoured too) and Istio's
//! `traffic.sidecar.istio.io/*` exclusion annotations.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;

use super::{
    engine::{InboundSpec, ScopeSpec, SpecTarget},
    resolve::Qos,
};
use interceptor::settings::{self, InboundSettings, ScopeSettings};

/// The project's opt-in annotation (or label): `"true"` intercepts the pod.
pub const INJECT: &str = "interceptor.io/inject";
/// Istio's opt-in, honoured the same way.
pub const ISTIO_INJECT: &str = "sidecar.istio.io/inject";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";

/// The key of a pod in the daemon (`pod/<namespace>/<name>`, as in `/pods/NS/NAME/ready`).
pub fn key(namespace: &str, name: &str) -> String {
    format!("pod/{namespace}/{name}")
}

fn truthy(v: Option<&String>) -> bool {
    v.is_some_and(|v| matches!(v.trim(), "true" | "enabled" | "yes"))
}

/// Whether the pod asks to be intercepted (annotation or label, ours or Istio's), and can be:
/// a pod in the host's network namespace never is (its inbound scope would be the node's).
pub fn opted_in(pod: &Pod) -> bool {
    let empty = BTreeMap::new();
    let ann = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let asked = [INJECT, ISTIO_INJECT]
        .iter()
        .any(|k| truthy(ann.get(*k)) || truthy(labels.get(*k)));
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    // A terminating pod (deletionTimestamp set) still runs: it stays intercepted until it
    // is gone from the API.
    asked && !host_network && !finished
}

fn port_list(v: &str) -> Result<BTreeSet<u16>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|p| settings::parse_port(p).map_err(|e| e.to_string()))
        .collect()
}

fn cidr_list(v: &str) -> Result<BTreeSet<ipnet::IpNet>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|c| settings::parse_cidr(c).map_err(|e| e.to_string()))
        .collect()
}

/// The scope the agent keeps attached for `pod`, or `None` when it does not opt in.
/// No port is excluded for the agent: the readiness gate (`interceptor wait-ready` in an init
/// container) runs as the bypass uid (1337, in every scope's `bypass_uids`), so its call to
/// the agent goes direct while any other process's connection to port 15030 is intercepted.
pub fn spec(pod: &Pod, inbound: bool) -> Option<ScopeSpec> {
    if !opted_in(pod) {
        return None;
    }
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref()?;
    let uid = pod.metadata.uid.clone()?;
    let qos = pod
        .status
        .as_ref()
        .and_then(|s| s.qos_class.as_deref())
        .and_then(Qos::from_class);
    let empty = BTreeMap::new();
    let ann = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let mut out = ScopeSettings::default();
    let mut ib = InboundSettings::default();
    let mut inbound_on = inbound;
    let mut invalid = None;
    let mut bad = |k: &str, e: String| {
        invalid.get_or_insert(format!("annotation {k}: {e}"));
    };
    if let Some(v) = ann.get(EXCLUDE_OUTBOUND_PORTS) {
        match port_list(v) {
            Ok(p) => out.exclude_ports.extend(p),
            Err(e) => bad(EXCLUDE_OUTBOUND_PORTS, e),
        }
    }
    if let Some(v) = ann.get(EXCLUDE_OUTBOUND_IP_RANGES) {
        match cidr_list(v) {
            Ok(c) => out.exclude_cidrs = c,
            Err(e) => bad(EXCLUDE_OUTBOUND_IP_RANGES, e),
        }
    }
    if let Some(v) = ann.get(INCLUDE_OUTBOUND_IP_RANGES) {
        // `*` (Istio's default) and an empty value mean every destination.
        if v.trim() != "*" {
            match cidr_list(v) {
                Ok(c) => out.include_cidrs = c,
                Err(e) => bad(INCLUDE_OUTBOUND_IP_RANGES, e),
            }
        }
    }
    if let Some(v) = ann.get(EXCLUDE_INBOUND_PORTS) {
        match port_list(v) {
            Ok(p) => ib.exclude_ports = p,
            Err(e) => bad(EXCLUDE_INBOUND_PORTS, e),
        }
    }
    if let Some(v) = ann.get(INCLUDE_INBOUND_PORTS) {
        match v.trim() {
            "*" => {}
            // Istio: an empty list intercepts no inbound port.
            "" => inbound_on = false,
            _ => match port_list(v) {
                Ok(p) => ib.include_ports = p,
                Err(e) => bad(INCLUDE_INBOUND_PORTS, e),
            },
        }
    }
    if invalid.is_none() {
        if let Err(e) = ib.validate() {
            invalid = Some(e.to_string());
        }
    }
    Some(ScopeSpec {
        key: key(namespace, name),
        target: SpecTarget::Pod { uid, qos },
        settings: out,
        inbound: inbound_on.then_some(InboundSpec {
            netns: None,
            settings: ib,
        }),
        invalid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ann: &[(&str, &str)], labels: &[(&str, &str)]) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some("web-0".into());
        p.metadata.namespace = Some("shop".into());
        p.metadata.uid = Some("0000aaaa-1111-2222-3333-444455556666".into());
        p.metadata.annotations = Some(
            ann.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p
    }

    #[test]
    fn opt_in() {
        assert!(spec(&pod(&[], &[]), true).is_none());
        assert!(spec(&pod(&[(INJECT, "false")], &[]), true).is_none());
        assert!(spec(&pod(&[(INJECT, "true")], &[]), true).is_some());
        assert!(spec(&pod(&[(ISTIO_INJECT, "true")], &[]), true).is_some());
        assert!(spec(&pod(&[], &[(ISTIO_INJECT, "true")]), true).is_some());
        let mut host = pod(&[(INJECT, "true")], &[]);
        host.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            host_network: Some(true),
            ..Default::default()
        });
        assert!(spec(&host, true).is_none());
    }

    #[test]
    fn istio_exclusions() {
        let s = spec(
            &pod(
                &[
                    (INJECT, "true"),
                    (EXCLUDE_OUTBOUND_PORTS, "5432, 6379"),
                    (
                        EXCLUDE_OUTBOUND_IP_RANGES,
                        "169.254.169.254/32,10.96.0.0/12",
                    ),
                    (EXCLUDE_INBOUND_PORTS, "15021,8081"),
                    (INCLUDE_OUTBOUND_IP_RANGES, "*"),
                ],
                &[],
            ),
            true,
        )
        .unwrap();
        assert_eq!(s.key, "pod/shop/web-0");
        assert!(s.invalid.is_none());
        assert_eq!(s.settings.exclude_ports, BTreeSet::from([5432, 6379]));
        assert_eq!(s.settings.exclude_cidrs.len(), 2);
        assert!(s.settings.include_cidrs.is_empty());
        let ib = s.inbound.unwrap();
        assert_eq!(ib.settings.exclude_ports, BTreeSet::from([8081, 15021]));
        assert_eq!(ib.netns, None);

        let s = spec(
            &pod(&[(INJECT, "true"), (INCLUDE_INBOUND_PORTS, "")], &[]),
            true,
        )
        .unwrap();
        assert!(s.inbound.is_none());

        let s = spec(
            &pod(&[(INJECT, "true"), (EXCLUDE_OUTBOUND_PORTS, "http")], &[]),
            true,
        )
        .unwrap();
        assert!(s.invalid.unwrap().contains("excludeOutboundPorts"));
    }
}
