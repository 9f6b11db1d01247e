//! From a parsed routing file to a [`Table`]: every reference resolved (hosts, ports,
//! subsets), every value checked, or a [`CompileError`] naming the YAML path of the first
//! problem, e.g. `virtualServices[0].http[1].route[0].destination.host: ...`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use ::http::{HeaderName, HeaderValue};
use regex::Regex;

use super::balance::{Cluster, Endpoint, WeightedCluster};
use super::file::{self, DestinationRule, Lb, Protocol, RoutingFile, ServiceEntry};
use super::stats::RoutingStats;
use super::table::{DubboMatch, HeaderOps, Match, Matcher, PortPlan, Route, Table, TlsRule};
use crate::config::parse_duration;

/// Why a routing file does not compile: where (the YAML path) and what.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct CompileError {
    /// The YAML path of the offending field, e.g. `virtualServices[2].http[5].route[1].destination.subset`.
    pub path: String,
    /// What is wrong there.
    pub problem: Problem,
}

/// What is wrong at a [`CompileError`]'s path.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("needs at least one host")]
    NoHosts,
    #[error("needs at least one port")]
    NoPorts,
    #[error("{0:?} is declared twice")]
    HostDeclaredTwice(String),
    #[error("must be 1..65535")]
    PortZero,
    #[error("{0} belongs to two services")]
    AddressInTwoServices(SocketAddr),
    #[error("{0:?} is not a host of any serviceEntries entry")]
    RuleForUnknownHost(String),
    #[error("a second rule for {0:?}")]
    SecondRule(String),
    #[error("{host:?} is not a host of any serviceEntries entry (known: {known:?})")]
    UnknownHost { host: String, known: Vec<String> },
    #[error("{host} has no port {port}")]
    NoSuchPort { host: String, port: u16 },
    #[error("{0} has several ports; say which with port.number")]
    PortNotChosen(String),
    #[error("{host} has no subset {subset:?} in destinationRules")]
    NoSuchSubset { host: String, subset: String },
    #[error("{host}{} has no endpoints", subset.as_ref().map_or(String::new(), |s| format!(" subset {s}")))]
    NoEndpoints {
        host: String,
        subset: Option<String>,
    },
    #[error("needs at least one destination")]
    NoDestinations,
    #[error("give every destination a weight, or none")]
    SomeWeightsMissing,
    #[error("weights add up to 0")]
    ZeroWeight,
    #[error("weights add up to {0}, not 100")]
    WeightsNot100(u64),
    #[error("{0:?} is in two virtual services")]
    HostInTwoVirtualServices(String),
    #[error("{regex:?} is not a valid regular expression: {error}")]
    BadRegex { regex: String, error: regex::Error },
    #[error("{0}")]
    BadHeaderName(::http::header::InvalidHeaderName),
    #[error("{0}")]
    BadHeaderValue(::http::header::InvalidHeaderValue),
    #[error("give the full service name, e.g. helloworld.Greeter")]
    GrpcServiceNotFull,
    /// The duration parser's own words for what is wrong with the value.
    #[error("{0}")]
    BadTimeout(String),
    #[error("{0:?}: only connect-failure is supported")]
    UnsupportedRetryOn(String),
    #[error("at most 10")]
    TooManyAttempts,
    #[error("needs sniHosts")]
    NoSniHosts,
    /// The plugin's own load error (it names the plugin and the cause).
    #[error("{0}")]
    WasmPlugin(crate::wasm::LoadError),
    #[error("{0:?} is the name of two plugins")]
    PluginNamedTwice(String),
    #[error("give exactly one of exact, prefix, regex")]
    ArgMatchKinds,
    #[error("index {0} is given twice")]
    ArgIndexTwice(usize),
}

fn at(path: impl Into<String>, problem: Problem) -> CompileError {
    CompileError {
        path: path.into(),
        problem,
    }
}

/// Compiles and validates a parsed file. Route and cluster counters come from `stats`, so
/// a route or cluster keeps its counters across reloads.
pub fn compile(file: &RoutingFile, stats: &RoutingStats) -> Result<Table, CompileError> {
    let mut t = Table::default();
    let services = services(file, &mut t)?;
    let rules = destination_rules(file, &services)?;
    let c = Compiler {
        services,
        rules,
        stats,
    };
    for (host, (_, se)) in &c.services {
        for p in &se.ports {
            if !se.endpoints.is_empty() {
                let cluster = c.cluster(
                    host,
                    None,
                    Some(p.number),
                    &format!("serviceEntries[{host}]"),
                )?;
                t.default_clusters.insert((host.clone(), p.number), cluster);
            }
        }
    }
    for (i, vs) in file.virtual_services.iter().enumerate() {
        c.virtual_service(i, vs, &mut t)?;
    }
    if !file.wasm_plugins.is_empty() {
        c.plugin_clusters(&mut t)?;
        t.plugins = plugins(file, stats)?;
    }
    Ok(t)
}

/// The file's Wasm plugins, each loaded and configured (an instance made), or the first
/// that does not load.
fn plugins(file: &RoutingFile, stats: &RoutingStats) -> Result<crate::wasm::Plugins, CompileError> {
    let mut loaded = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, spec) in file.wasm_plugins.iter().enumerate() {
        let field = format!("wasmPlugins[{i}]");
        if !names.insert(spec.name.clone()) {
            return Err(at(
                format!("{field}.name"),
                Problem::PluginNamedTwice(spec.name.clone()),
            ));
        }
        for (j, t) in spec.target_refs.iter().enumerate() {
            if !file
                .service_entries
                .iter()
                .any(|se| se.hosts.iter().any(|h| h.eq_ignore_ascii_case(&t.name)))
            {
                return Err(at(
                    format!("{field}.targetRefs[{j}].name"),
                    Problem::RuleForUnknownHost(t.name.clone()),
                ));
            }
        }
        let plugin = crate::wasm::Plugin::load(spec, stats.plugin(&spec.name))
            .map_err(|e| at(format!("{field}.url"), Problem::WasmPlugin(e)))?;
        loaded.push((i, plugin));
    }
    Ok(crate::wasm::Plugins::new(loaded))
}

/// Services by host (lower case), with their addresses and ports entered into `t`.
fn services<'f>(
    file: &'f RoutingFile,
    t: &mut Table,
) -> Result<HashMap<String, (usize, &'f ServiceEntry)>, CompileError> {
    let mut services = HashMap::new();
    for (i, se) in file.service_entries.iter().enumerate() {
        let f = format!("serviceEntries[{i}]");
        if se.hosts.is_empty() {
            return Err(at(format!("{f}.hosts"), Problem::NoHosts));
        }
        if se.ports.is_empty() {
            return Err(at(format!("{f}.ports"), Problem::NoPorts));
        }
        for h in &se.hosts {
            if services.insert(h.to_ascii_lowercase(), (i, se)).is_some() {
                return Err(at(
                    format!("{f}.hosts"),
                    Problem::HostDeclaredTwice(h.clone()),
                ));
            }
        }
        for (j, p) in se.ports.iter().enumerate() {
            if p.number == 0 {
                return Err(at(format!("{f}.ports[{j}].number"), Problem::PortZero));
            }
            for a in &se.addresses {
                let key = SocketAddr::new(a.to_canonical(), p.number);
                let plan = PortPlan {
                    service: se.hosts[0].to_ascii_lowercase(),
                    protocol: p.protocol,
                    port: p.number,
                };
                if t.by_addr.insert(key, plan).is_some() {
                    return Err(at(
                        format!("{f}.addresses"),
                        Problem::AddressInTwoServices(key),
                    ));
                }
            }
        }
    }
    Ok(services)
}

/// Destination rules (subsets and load balancing) by host (lower case).
fn destination_rules<'f>(
    file: &'f RoutingFile,
    services: &HashMap<String, (usize, &ServiceEntry)>,
) -> Result<HashMap<String, &'f DestinationRule>, CompileError> {
    let mut rules = HashMap::new();
    for (i, dr) in file.destination_rules.iter().enumerate() {
        let host = dr.host.to_ascii_lowercase();
        if !services.contains_key(&host) {
            return Err(at(
                format!("destinationRules[{i}].host"),
                Problem::RuleForUnknownHost(dr.host.clone()),
            ));
        }
        if rules.insert(host, dr).is_some() {
            return Err(at(
                format!("destinationRules[{i}].host"),
                Problem::SecondRule(dr.host.clone()),
            ));
        }
    }
    Ok(rules)
}

/// What resolving a route's destinations needs: the services and destination rules.
struct Compiler<'f, 's> {
    services: HashMap<String, (usize, &'f ServiceEntry)>,
    rules: HashMap<String, &'f DestinationRule>,
    stats: &'s RoutingStats,
}

impl Compiler<'_, '_> {
    /// The cluster of `host`'s endpoints (those of `subset`) on `port` (may be left out
    /// when the service has one port). `field` is the YAML path of the destination.
    fn cluster(
        &self,
        host: &str,
        subset: Option<&str>,
        port: Option<u16>,
        field: &str,
    ) -> Result<Arc<Cluster>, CompileError> {
        let host_l = host.to_ascii_lowercase();
        let Some((_, se)) = self.services.get(&host_l) else {
            let known = self.services.keys().cloned().collect();
            return Err(at(
                format!("{field}.host"),
                Problem::UnknownHost {
                    host: host.to_owned(),
                    known,
                },
            ));
        };
        let sp = match port {
            Some(n) => se.ports.iter().find(|p| p.number == n).ok_or_else(|| {
                at(
                    format!("{field}.port.number"),
                    Problem::NoSuchPort {
                        host: host.to_owned(),
                        port: n,
                    },
                )
            })?,
            None if se.ports.len() == 1 => &se.ports[0],
            None => {
                return Err(at(
                    format!("{field}.port"),
                    Problem::PortNotChosen(host.to_owned()),
                ))
            }
        };
        let rule = self.rules.get(&host_l);
        let mut lb = rule
            .and_then(|r| r.traffic_policy.as_ref())
            .and_then(|p| p.load_balancer.as_ref())
            .map_or(Lb::RoundRobin, |l| l.simple);
        let labels = match subset {
            None => None,
            Some(s) => {
                let sub = rule
                    .and_then(|r| r.subsets.iter().find(|x| x.name == s))
                    .ok_or_else(|| {
                        at(
                            format!("{field}.subset"),
                            Problem::NoSuchSubset {
                                host: host.to_owned(),
                                subset: s.to_owned(),
                            },
                        )
                    })?;
                if let Some(l) = sub
                    .traffic_policy
                    .as_ref()
                    .and_then(|p| p.load_balancer.as_ref())
                {
                    lb = l.simple;
                }
                Some(&sub.labels)
            }
        };
        let endpoints: Vec<Endpoint> = se
            .endpoints
            .iter()
            .filter(|e| labels.is_none_or(|l| l.iter().all(|(k, v)| e.labels.get(k) == Some(v))))
            .map(|e| Endpoint {
                addr: SocketAddr::new(
                    e.address,
                    e.ports
                        .get(&sp.name)
                        .copied()
                        .or(sp.target_port)
                        .unwrap_or(sp.number),
                ),
                active: AtomicU64::new(0),
            })
            .collect();
        if endpoints.is_empty() {
            return Err(at(
                field,
                Problem::NoEndpoints {
                    host: host.to_owned(),
                    subset: subset.map(str::to_owned),
                },
            ));
        }
        let name = format!("{host_l}|{}|{}", sp.number, subset.unwrap_or(""));
        Ok(Arc::new(Cluster::new(
            name.clone(),
            endpoints,
            lb,
            matches!(sp.protocol, Protocol::Grpc | Protocol::Http2),
            self.stats.cluster(&name),
        )))
    }

    /// Every service's cluster on each of its ports, whole and by subset (those with
    /// endpoints): what a Wasm plugin may choose by name.
    fn plugin_clusters(&self, t: &mut Table) -> Result<(), CompileError> {
        for (host, (_, se)) in &self.services {
            if se.endpoints.is_empty() {
                continue;
            }
            let subsets: Vec<&str> = self
                .rules
                .get(host)
                .map(|r| r.subsets.iter().map(|s| s.name.as_str()).collect())
                .unwrap_or_default();
            for p in &se.ports {
                let field = format!("serviceEntries[{host}]");
                let whole = self.cluster(host, None, Some(p.number), &field)?;
                t.clusters
                    .insert((host.clone(), p.number, String::new()), whole);
                for s in &subsets {
                    // A subset without endpoints cannot be chosen (it is an error only where a
                    // route names it).
                    if let Ok(c) = self.cluster(host, Some(s), Some(p.number), &field) {
                        t.clusters
                            .insert((host.clone(), p.number, (*s).to_owned()), c);
                    }
                }
            }
        }
        Ok(())
    }

    /// A route's weighted destinations and their total weight; `field` is the route's path.
    fn weighted(
        &self,
        dests: &[file::RouteDestination],
        field: &str,
    ) -> Result<(Vec<WeightedCluster>, u32), CompileError> {
        if dests.is_empty() {
            return Err(at(format!("{field}.route"), Problem::NoDestinations));
        }
        let mut out = Vec::new();
        let given: Vec<_> = dests.iter().filter(|d| d.weight.is_some()).collect();
        if !given.is_empty() && given.len() != dests.len() {
            return Err(at(format!("{field}.route"), Problem::SomeWeightsMissing));
        }
        // Added in u64: u32 weights could otherwise wrap around to exactly 100.
        let mut total: u64 = 0;
        for (k, d) in dests.iter().enumerate() {
            let f = format!("{field}.route[{k}].destination");
            let c = self.cluster(
                &d.destination.host,
                d.destination.subset.as_deref(),
                d.destination.port.as_ref().map(|p| p.number),
                &f,
            )?;
            let w = d.weight.unwrap_or(1);
            total += u64::from(w);
            out.push(WeightedCluster {
                cluster: c,
                weight: w,
            });
        }
        if total == 0 {
            return Err(at(format!("{field}.route"), Problem::ZeroWeight));
        }
        if !given.is_empty() && total != 100 {
            return Err(at(format!("{field}.route"), Problem::WeightsNot100(total)));
        }
        // 100 when weights are given; else one per destination, far below u32::MAX.
        let total = u32::try_from(total)
            .map_err(|_| at(format!("{field}.route"), Problem::WeightsNot100(total)))?;
        Ok((out, total))
    }

    /// The `i`-th virtual service: its hosts, HTTP routes and TLS rules, entered into `t`.
    fn virtual_service(
        &self,
        i: usize,
        vs: &file::VirtualService,
        t: &mut Table,
    ) -> Result<(), CompileError> {
        let f = format!("virtualServices[{i}]");
        let vs_name = vs
            .name
            .clone()
            .unwrap_or_else(|| vs.hosts.first().cloned().unwrap_or_default());
        if vs.hosts.is_empty() {
            return Err(at(format!("{f}.hosts"), Problem::NoHosts));
        }
        for h in &vs.hosts {
            if t.vs_by_host.insert(h.to_ascii_lowercase(), i).is_some() {
                return Err(at(
                    format!("{f}.hosts"),
                    Problem::HostInTwoVirtualServices(h.clone()),
                ));
            }
        }
        let mut routes = Vec::new();
        for (j, r) in vs.http.iter().enumerate() {
            routes.push(self.http_route(&format!("{f}.http[{j}]"), j, r, &vs_name)?);
        }
        let mut tls = Vec::new();
        for (j, r) in vs.tls.iter().enumerate() {
            tls.push(self.tls_route(&format!("{f}.tls[{j}]"), r)?);
        }
        t.http.push(routes);
        t.tls.push(tls);
        Ok(())
    }

    /// The `j`-th HTTP route of virtual service `vs_name`; `rf` is its path.
    fn http_route(
        &self,
        rf: &str,
        j: usize,
        r: &file::HttpRoute,
        vs_name: &str,
    ) -> Result<Route, CompileError> {
        let mut matches = Vec::new();
        for (k, m) in r.matches.iter().enumerate() {
            matches.push(http_match(&format!("{rf}.match[{k}]"), m)?);
        }
        let (clusters, total_weight) = self.weighted(&r.route, rf)?;
        let timeout = r
            .timeout
            .as_deref()
            .map(|s| {
                parse_duration("timeout", s)
                    .map_err(|e| at(format!("{rf}.timeout"), Problem::BadTimeout(e.problem)))
            })
            .transpose()?;
        let connect_retries = match &r.retries {
            None => 0,
            Some(x) => {
                if let Some(on) = &x.retry_on {
                    if on.split(',').any(|k| k.trim() != "connect-failure") {
                        return Err(at(
                            format!("{rf}.retries.retryOn"),
                            Problem::UnsupportedRetryOn(on.clone()),
                        ));
                    }
                }
                if x.attempts > 10 {
                    return Err(at(
                        format!("{rf}.retries.attempts"),
                        Problem::TooManyAttempts,
                    ));
                }
                x.attempts
            }
        };
        let headers = r.headers.clone().unwrap_or_default();
        let name = r.name.clone().unwrap_or_else(|| format!("http[{j}]"));
        let stats = self.stats.route(vs_name, &name);
        Ok(Route {
            stats,
            virtual_service: vs_name.to_owned(),
            name,
            matches,
            clusters,
            total_weight,
            timeout,
            connect_retries,
            request_headers: header_ops(rf, &headers.request, "request")?,
            response_headers: header_ops(rf, &headers.response, "response")?,
        })
    }

    /// A TLS rule; `rf` is its path.
    fn tls_route(&self, rf: &str, r: &file::TlsRoute) -> Result<TlsRule, CompileError> {
        let sni: Vec<String> = r
            .matches
            .iter()
            .flat_map(|m| m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()))
            .collect();
        if sni.is_empty() {
            return Err(at(format!("{rf}.match"), Problem::NoSniHosts));
        }
        let (clusters, total_weight) = self.weighted(&r.route, rf)?;
        Ok(TlsRule {
            sni,
            clusters,
            total_weight,
        })
    }
}

/// One `match` entry of an HTTP route; `mf` is its path.
fn http_match(mf: &str, m: &file::HttpMatch) -> Result<Match, CompileError> {
    let mut c = Match {
        uri: m
            .uri
            .as_ref()
            .map(|x| matcher(x, &format!("{mf}.uri")))
            .transpose()?,
        method: m
            .method
            .as_ref()
            .map(|x| matcher(x, &format!("{mf}.method")))
            .transpose()?,
        source: m
            .source_workload
            .as_ref()
            .map(|x| matcher(x, &format!("{mf}.sourceWorkload")))
            .transpose()?,
        ..Default::default()
    };
    for (name, x) in &m.headers {
        let field = format!("{mf}.headers.{name}");
        let hn = header_name(name).map_err(|e| at(field.clone(), e))?;
        c.headers.push((hn, matcher(x, &field)?));
    }
    for (name, x) in &m.query_params {
        c.query.push((
            name.clone(),
            matcher(x, &format!("{mf}.queryParams.{name}"))?,
        ));
    }
    if let Some(g) = &m.grpc {
        if g.service.is_empty() || g.service.contains('/') {
            return Err(at(
                format!("{mf}.grpc.service"),
                Problem::GrpcServiceNotFull,
            ));
        }
        c.grpc_service = Some(g.service.clone());
        c.grpc_method = g.method.clone();
    }
    if let Some(d) = &m.dubbo {
        c.dubbo = Some(dubbo_match(&format!("{mf}.dubbo"), d)?);
    }
    Ok(c)
}

/// The `dubbo` part of a match; `df` is its path.
fn dubbo_match(df: &str, d: &file::DubboMatch) -> Result<DubboMatch, CompileError> {
    let opt = |x: &Option<file::StringMatch>, name: &str| {
        x.as_ref()
            .map(|x| matcher(x, &format!("{df}.{name}")))
            .transpose()
    };
    let mut args: Vec<(usize, Matcher)> = Vec::new();
    for (k, a) in d.args.iter().enumerate() {
        let af = format!("{df}.args[{k}]");
        let one = match (&a.exact, &a.prefix, &a.regex) {
            (Some(s), None, None) => file::StringMatch::Exact(s.clone()),
            (None, Some(s), None) => file::StringMatch::Prefix(s.clone()),
            (None, None, Some(s)) => file::StringMatch::Regex(s.clone()),
            _ => return Err(at(af, Problem::ArgMatchKinds)),
        };
        if args.iter().any(|(i, _)| *i == a.index) {
            return Err(at(format!("{af}.index"), Problem::ArgIndexTwice(a.index)));
        }
        args.push((a.index, matcher(&one, &af)?));
    }
    let mut attachments = Vec::new();
    for (key, x) in &d.attachments {
        attachments.push((key.clone(), matcher(x, &format!("{df}.attachments.{key}"))?));
    }
    Ok(DubboMatch {
        service: opt(&d.service, "service")?,
        version: opt(&d.version, "version")?,
        method: opt(&d.method, "method")?,
        args,
        attachments,
    })
}

/// A string match; `field` is its path.
fn matcher(m: &file::StringMatch, field: &str) -> Result<Matcher, CompileError> {
    Ok(match m {
        file::StringMatch::Exact(s) => Matcher::Exact(s.clone()),
        file::StringMatch::Prefix(s) => Matcher::Prefix(s.clone()),
        file::StringMatch::Regex(r) => Matcher::Regex(
            // Anchored, as Istio's (RE2 full match).
            Regex::new(&format!("^(?:{r})$")).map_err(|error| {
                at(
                    format!("{field}.regex"),
                    Problem::BadRegex {
                        regex: r.clone(),
                        error,
                    },
                )
            })?,
        ),
    })
}

fn header_name(name: &str) -> Result<HeaderName, Problem> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).map_err(Problem::BadHeaderName)
}

/// The `which` (request or response) header operations of the route at `rf`.
fn header_ops(
    rf: &str,
    o: &Option<file::HeaderOps>,
    which: &str,
) -> Result<Option<HeaderOps>, CompileError> {
    let Some(o) = o else { return Ok(None) };
    let hf = format!("{rf}.headers.{which}");
    let pair = |(k, v): (&String, &String)| -> Result<(HeaderName, HeaderValue), CompileError> {
        let at_k = |p| at(format!("{hf}.{k}"), p);
        Ok((
            header_name(k).map_err(at_k)?,
            HeaderValue::from_str(v).map_err(|e| at_k(Problem::BadHeaderValue(e)))?,
        ))
    };
    Ok(Some(HeaderOps {
        set: o.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: o.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: o
            .remove
            .iter()
            .map(|k| header_name(k).map_err(|e| at(format!("{hf}.remove"), e)))
            .collect::<Result<_, _>>()?,
    }))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A small valid file; the other tests break it in one place each.
    pub(in crate::routing) const GOOD: &str = r#"
serviceEntries:
- hosts: [reviews]
  addresses: [10.96.0.20]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.1.0.5, labels: {version: v1}}
  - {address: 10.1.0.6, ports: {http: 9999}, labels: {version: v2}}
virtualServices:
- name: reviews
  hosts: [reviews]
  http:
  - match: [{uri: {regex: "/items/[0-9]+"}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
destinationRules:
- host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
"#;

    fn compile_text(text: &str) -> Result<Table, String> {
        let file: RoutingFile = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        compile(&file, &RoutingStats::default()).map_err(|e| e.to_string())
    }

    #[test]
    fn a_good_file_compiles() {
        let t = compile_text(GOOD).unwrap();
        let plan = t.plan("10.96.0.20:9080".parse().unwrap()).unwrap();
        assert_eq!(plan.protocol, Protocol::Http);
        assert!(t.plan("10.96.0.20:80".parse().unwrap()).is_none());
        let routes = t.http_routes("reviews", plan).unwrap();
        assert_eq!(routes.len(), 2);
        assert!(routes[0].matches[0]
            .uri
            .as_ref()
            .unwrap()
            .matches("/items/42"));
        assert!(
            !routes[0].matches[0]
                .uri
                .as_ref()
                .unwrap()
                .matches("/items/42/x"),
            "anchored"
        );
        let v2 = &routes[0].clusters[0].cluster;
        assert_eq!(v2.name, "reviews|9080|v2");
        assert_eq!(
            v2.endpoints[0].addr,
            "10.1.0.6:9999".parse().unwrap(),
            "named port"
        );
        assert_eq!(routes[1].total_weight, 100);
    }

    #[test]
    fn errors_name_the_field() {
        for (from, to, want) in [
            ("subset: v2}}]", "subset: v9}}]", "virtualServices[0].http[0].route[0].destination.subset: reviews has no subset \"v9\""),
            ("host: reviews, subset: v1}, weight: 90", "host: ratings, subset: v1}, weight: 90", "virtualServices[0].http[1].route[0].destination.host: \"ratings\" is not a host"),
            ("weight: 10}", "weight: 20}", "virtualServices[0].http[1].route: weights add up to 110, not 100"),
            ("regex: \"/items/[0-9]+\"", "regex: \"/items/[0-9\"", "virtualServices[0].http[0].match[0].uri.regex"),
            ("protocol: HTTP}", "protocol: SMTP}", "SMTP"),
            ("  http:\n", "  htp:\n", "htp"),
        ] {
            let bad = GOOD.replacen(from, to, 1);
            assert_ne!(bad, GOOD, "{from}");
            let e = compile_text(&bad).err().unwrap_or_else(|| panic!("{to} accepted"));
            assert!(e.contains(want), "{to}: {e}");
        }
    }

    #[test]
    fn dubbo_matches_compile_and_bad_ones_name_the_field() {
        let with = |m: &str| {
            GOOD.replacen("protocol: HTTP}", "protocol: DUBBO}", 1)
                .replacen(
                    "  - match: [{uri: {regex: \"/items/[0-9]+\"}}]",
                    &format!("  - match: [{{dubbo: {m}}}]"),
                    1,
                )
        };
        let t = compile_text(&with(
            "{service: {exact: org.example.Greeter}, method: {prefix: say}, args: [{index: 1, regex: \"vip-.*\"}], attachments: {application: {exact: web}}}",
        ))
        .unwrap();
        let plan = t.plan("10.96.0.20:9080".parse().unwrap()).unwrap();
        assert_eq!(plan.protocol, Protocol::Dubbo);
        let d = t.http_routes("reviews", plan).unwrap()[0].matches[0]
            .dubbo
            .clone()
            .unwrap();
        assert!(d.args[0].1.matches("vip-1") && !d.args[0].1.matches("xvip-1"));
        assert_eq!(d.attachments[0].0, "application");
        for (m, want) in [
            (
                "{args: [{index: 0, exact: a, prefix: b}]}",
                "virtualServices[0].http[0].match[0].dubbo.args[0]: give exactly one of exact, prefix, regex",
            ),
            (
                "{args: [{index: 0, exact: a}, {index: 0, exact: b}]}",
                "virtualServices[0].http[0].match[0].dubbo.args[1].index: index 0 is given twice",
            ),
            (
                "{args: [{index: 0, regex: \"(\"}]}",
                "virtualServices[0].http[0].match[0].dubbo.args[0].regex",
            ),
            (
                "{attachments: {application: {regex: \"[\"}}}",
                "virtualServices[0].http[0].match[0].dubbo.attachments.application.regex",
            ),
            ("{servce: {exact: a}}", "servce"),
        ] {
            let e = compile_text(&with(m)).expect_err(m);
            assert!(e.contains(want), "{m}: {e}");
        }
    }

    /// Weights that overflow `u32` when added must not wrap around to a valid sum.
    #[test]
    fn weights_that_overflow_u32_are_refused() {
        // 4294967206 + 190 = 2^32 + 100.
        let bad = GOOD
            .replacen("weight: 90}", "weight: 4294967206}", 1)
            .replacen("weight: 10}", "weight: 190}", 1);
        assert_ne!(bad, GOOD);
        let e = compile_text(&bad).expect_err("overflowing weights accepted");
        assert!(
            e.contains("virtualServices[0].http[1].route: weights add up to 4294967396, not 100"),
            "{e}"
        );
    }
}
