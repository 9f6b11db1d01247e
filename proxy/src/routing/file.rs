//! The routing file (YAML): a documented subset of Istio's `ServiceEntry`,
//! `VirtualService` and `DestinationRule`, with three extensions in `match` (`grpc`,
//! `sourceWorkload` and `dubbo`). Unknown fields are errors, so a typo is reported, not ignored.
//!
//! ```yaml
//! serviceEntries:
//! - hosts: [reviews]
//!   addresses: [10.0.0.20]          # the address(es) the workload dials
//!   ports: [{number: 8080, name: http, protocol: HTTP}]   # HTTP, HTTP2, GRPC, TLS, TCP, DUBBO, AUTO
//!   endpoints:
//!   - {address: 10.1.0.5, labels: {version: v1}}
//!   - {address: 10.1.0.6, ports: {http: 9080}, labels: {version: v2}}
//! virtualServices:
//! - name: reviews
//!   hosts: [reviews]
//!   http:
//!   - name: jason
//!     match:
//!     - headers: {end-user: {exact: jason}}
//!       uri: {prefix: /api}         # exact | prefix | regex
//!       method: {exact: GET}
//!       queryParams: {debug: {exact: "1"}}
//!       grpc: {service: helloworld.Greeter, method: SayHello}
//!       sourceWorkload: {prefix: /sys/fs/cgroup/frontend}
//!     route: [{destination: {host: reviews, subset: v2}}]
//!   - name: dubbo-vip             # on a DUBBO (or AUTO) port: per Dubbo request
//!     match:
//!     - dubbo:
//!         service: {exact: org.example.Greeter}
//!         version: {exact: 1.0.0}
//!         method: {prefix: say}
//!         args: [{index: 0, regex: "vip-.*"}]
//!         attachments: {application: {exact: web}}
//!     route: [{destination: {host: reviews, subset: v2}}]
//!   - route:
//!     - {destination: {host: reviews, subset: v1}, weight: 90}
//!     - {destination: {host: reviews, subset: v2}, weight: 10}
//!     timeout: 2s
//!     retries: {attempts: 2, retryOn: connect-failure}
//!     headers: {request: {set: {x-a: b}, remove: [x-c]}, response: {add: {x-d: e}}}
//!   tls:
//!   - match: [{sniHosts: [a.example.com]}]
//!     route: [{destination: {host: reviews, subset: v1}}]
//! destinationRules:
//! - host: reviews
//!   trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}   # or ROUND_ROBIN (default)
//!   subsets:
//!   - {name: v1, labels: {version: v1}}
//!   - {name: v2, labels: {version: v2}}
//! wasmPlugins:                      # see crate::wasm::spec
//! - {name: router, url: /etc/interceptor/router.wasm, targetRefs: [{kind: Service, name: reviews}]}
//! ```

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutingFile {
    #[serde(default)]
    pub service_entries: Vec<ServiceEntry>,
    #[serde(default)]
    pub virtual_services: Vec<VirtualService>,
    #[serde(default)]
    pub destination_rules: Vec<DestinationRule>,
    /// Wasm routing plugins ([`crate::wasm`]).
    #[serde(default)]
    pub wasm_plugins: Vec<crate::wasm::WasmPluginSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntry {
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tls,
    Tcp,
    Auto,
    /// Dubbo 2 frames with Hessian 2 bodies, routed per request.
    Dubbo,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub number: u16,
    #[serde(default)]
    pub name: String,
    pub protocol: Protocol,
    /// Endpoint port when an endpoint does not name one (default: `number`).
    #[serde(default)]
    pub target_port: Option<u16>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntry {
    pub address: IpAddr,
    /// Port name -> port, for ports that differ from the service port.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualService {
    #[serde(default)]
    pub name: Option<String>,
    pub hosts: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default)]
    pub tls: Vec<TlsRoute>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    pub route: Vec<RouteDestination>,
    /// e.g. `2s`, `500ms`.
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<Retries>,
    #[serde(default)]
    pub headers: Option<Headers>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(default)]
    pub uri: Option<StringMatch>,
    #[serde(default)]
    pub method: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    /// Extension: gRPC service and method, from `:path` (`/<service>/<method>`).
    #[serde(default)]
    pub grpc: Option<GrpcMatch>,
    /// Extension: the calling workload, as the kernel recorded it for the connection (the
    /// cgroup path the workload was attached with).
    #[serde(default)]
    pub source_workload: Option<StringMatch>,
    /// Extension: a Dubbo request's service, version, method, arguments and attachments
    /// (on `DUBBO` ports, and `AUTO` ports that detect Dubbo). A match with it never holds
    /// for an HTTP request, and one with HTTP conditions never holds for a Dubbo request.
    #[serde(default)]
    pub dubbo: Option<DubboMatch>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DubboMatch {
    /// The service path (interface), e.g. `{exact: org.example.DemoService}`.
    #[serde(default)]
    pub service: Option<StringMatch>,
    /// The service version.
    #[serde(default)]
    pub version: Option<StringMatch>,
    #[serde(default)]
    pub method: Option<StringMatch>,
    /// Arguments by position (0 first), as strings: numbers in decimal, booleans as
    /// `true`/`false`; null, lists, maps and objects match nothing.
    #[serde(default)]
    pub args: Vec<ArgMatch>,
    /// Attachments by key, e.g. `{application: {exact: web}}`.
    #[serde(default)]
    pub attachments: BTreeMap<String, StringMatch>,
}

/// One argument's match: its `index` and one of `exact`, `prefix`, `regex`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArgMatch {
    pub index: usize,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMatch {
    pub service: String,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDestination {
    pub destination: Destination,
    #[serde(default)]
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    pub host: String,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSelector {
    pub number: u16,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    pub attempts: u32,
    /// Only `connect-failure` (the default) is supported: a request is retried on another
    /// endpoint when the connect to its upstream fails, before anything was sent.
    #[serde(default)]
    pub retry_on: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Headers {
    #[serde(default)]
    pub request: Option<HeaderOps>,
    #[serde(default)]
    pub response: Option<HeaderOps>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOps {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsRoute {
    #[serde(rename = "match")]
    pub matches: Vec<TlsMatch>,
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsMatch {
    pub sni_hosts: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRule {
    pub host: String,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    pub simple: Lb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Lb {
    #[default]
    RoundRobin,
    LeastRequest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}
