//! RPC-aware routing of intercepted outbound connections.
//!
//! A connection whose original destination is a port of a `serviceEntries` address is
//! handled by that port's protocol: HTTP/1.1 and HTTP/2 (gRPC) requests are routed one by
//! one by the `virtualServices` rules ([`http`]), TLS by the SNI of its ClientHello, passed
//! through untouched ([`detect`]), TCP as opaque bytes; `AUTO` ports are inspected for a
//! short while (`--protocol-detection-timeout`) and go opaque when the client says nothing
//! (server-first protocols). Every other destination is forwarded as opaque TCP with no
//! delay, exactly as without routing.
//!
//! The file is read at start (`--routes FILE`), again when it changes (checked every
//! second) and on `POST /routes/reload`. A file that does not parse or validate is refused
//! with an error naming the field, and the routes in force stay; requests in flight keep the
//! table they started with, and new requests on open connections use the new one.

pub mod config;
pub mod detect;
pub mod http;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use regex::Regex;

pub use config::{Lb, Protocol, RoutingFile};

/// Why a routing file was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[error("routes {}: {message}", path.display())]
pub struct RoutesError {
    pub path: PathBuf,
    pub message: String,
}

fn invalid(field: String, problem: impl std::fmt::Display) -> String {
    format!("{field}: {problem}")
}

/// A compiled string match.
#[derive(Debug, Clone)]
pub enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl Matcher {
    fn compile(m: &config::StringMatch, field: &str) -> Result<Matcher, String> {
        Ok(match m {
            config::StringMatch::Exact(s) => Matcher::Exact(s.clone()),
            config::StringMatch::Prefix(s) => Matcher::Prefix(s.clone()),
            config::StringMatch::Regex(r) => Matcher::Regex(
                // Anchored, as Istio's (RE2 full match).
                Regex::new(&format!("^(?:{r})$")).map_err(|e| {
                    invalid(
                        format!("{field}.regex"),
                        format!("{r:?} is not a valid regular expression: {e}"),
                    )
                })?,
            ),
        })
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            Matcher::Exact(s) => v == s,
            Matcher::Prefix(s) => v.starts_with(s.as_str()),
            Matcher::Regex(r) => r.is_match(v),
        }
    }
}

/// One `match` entry: every condition must hold.
#[derive(Debug, Clone, Default)]
pub struct Match {
    pub uri: Option<Matcher>,
    pub method: Option<Matcher>,
    pub headers: Vec<(::http::HeaderName, Matcher)>,
    pub query: Vec<(String, Matcher)>,
    pub grpc_service: Option<String>,
    pub grpc_method: Option<String>,
    pub source: Option<Matcher>,
}

/// One weighted destination of a route.
#[derive(Debug, Clone)]
pub struct WeightedCluster {
    pub cluster: Arc<Cluster>,
    pub weight: u32,
}

#[derive(Debug, Clone)]
pub struct HeaderOps {
    pub set: Vec<(::http::HeaderName, ::http::HeaderValue)>,
    pub add: Vec<(::http::HeaderName, ::http::HeaderValue)>,
    pub remove: Vec<::http::HeaderName>,
}

/// A compiled HTTP route.
#[derive(Debug, Clone)]
pub struct Route {
    pub virtual_service: String,
    pub name: String,
    /// Any of these (none: every request).
    pub matches: Vec<Match>,
    pub clusters: Vec<WeightedCluster>,
    pub total_weight: u32,
    pub timeout: Option<Duration>,
    pub connect_retries: u32,
    pub request_headers: Option<HeaderOps>,
    pub response_headers: Option<HeaderOps>,
    pub stats: Arc<RouteStats>,
}

#[derive(Debug, Clone)]
pub struct TlsRule {
    pub sni: Vec<String>,
    pub clusters: Vec<WeightedCluster>,
    pub total_weight: u32,
}

/// An upstream cluster: a service's endpoints (of one subset) on one port.
#[derive(Debug)]
pub struct Cluster {
    /// `host|port|subset`, as in `/metrics`.
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub lb: Lb,
    /// Speak HTTP/2 to the endpoints (GRPC and HTTP2 ports).
    pub http2: bool,
    next: AtomicUsize,
    pub stats: Arc<ClusterStats>,
}

#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub active: AtomicU64,
}

impl Cluster {
    /// The endpoint for the next request: round robin, or the less loaded of two (power of
    /// two choices) for least-request; `skip` endpoints are avoided when another exists.
    pub fn pick(&self, skip: &[SocketAddr]) -> Option<&Endpoint> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let avail = |e: &&Endpoint| !skip.contains(&e.addr);
        let candidates: Vec<&Endpoint> = self.endpoints.iter().filter(avail).collect();
        let pool: Vec<&Endpoint> = if candidates.is_empty() {
            self.endpoints.iter().collect()
        } else {
            candidates
        };
        let i = self.next.fetch_add(1, Relaxed);
        match self.lb {
            Lb::RoundRobin => Some(pool[i % pool.len()]),
            Lb::LeastRequest => {
                let a = pool[fastrand::usize(..pool.len())];
                let b = pool[fastrand::usize(..pool.len())];
                Some(if b.active.load(Relaxed) < a.active.load(Relaxed) {
                    b
                } else {
                    a
                })
            }
        }
    }
}

/// Counters of one route, kept across reloads (by virtual service and route name).
#[derive(Debug, Default)]
pub struct RouteStats {
    pub requests: AtomicU64,
}

/// Counters of one cluster, kept across reloads (by name).
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub requests: AtomicU64,
    /// Responses by class: 1xx..5xx at index 1..5.
    pub responses: [AtomicU64; 6],
    pub connect_errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub other_errors: AtomicU64,
    pub retries: AtomicU64,
}

/// Route and cluster counters by name, shared by every table the proxy loads.
#[derive(Debug, Default)]
pub struct RoutingStats {
    routes: Mutex<BTreeMap<(String, String), Arc<RouteStats>>>,
    clusters: Mutex<BTreeMap<String, Arc<ClusterStats>>>,
    pub reloads: AtomicU64,
    pub reload_errors: AtomicU64,
    pub no_route: AtomicU64,
}

impl RoutingStats {
    fn route(&self, vs: &str, name: &str) -> Arc<RouteStats> {
        self.routes
            .lock()
            .expect("route stats")
            .entry((vs.to_owned(), name.to_owned()))
            .or_default()
            .clone()
    }

    fn cluster(&self, name: &str) -> Arc<ClusterStats> {
        self.clusters
            .lock()
            .expect("cluster stats")
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    pub fn routes(&self) -> Vec<((String, String), Arc<RouteStats>)> {
        let m = self.routes.lock().expect("route stats");
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn clusters(&self) -> Vec<(String, Arc<ClusterStats>)> {
        let m = self.clusters.lock().expect("cluster stats");
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// What a destination address:port is, for the routing table.
#[derive(Debug, Clone)]
pub struct PortPlan {
    pub service: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// A compiled routing file.
#[derive(Debug, Default)]
pub struct Table {
    by_addr: HashMap<SocketAddr, PortPlan>,
    /// host -> virtual service index.
    vs_by_host: HashMap<String, usize>,
    http: Vec<Vec<Route>>,
    tls: Vec<Vec<TlsRule>>,
    /// (service host, port) -> the cluster without subset.
    default_clusters: HashMap<(String, u16), Arc<Cluster>>,
}

impl Table {
    /// How connections to `dst` are handled; `None`: opaque TCP to `dst`.
    pub fn plan(&self, dst: SocketAddr) -> Option<&PortPlan> {
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        self.by_addr.get(&dst)
    }

    /// The HTTP routes for a request to `host` (the Host header or :authority, port
    /// stripped) on a connection to `plan`'s service.
    pub fn http_routes(&self, host: &str, plan: &PortPlan) -> Option<&[Route]> {
        let i = self
            .vs_by_host
            .get(host)
            .or_else(|| self.vs_by_host.get(&plan.service))?;
        Some(&self.http[*i])
    }

    pub fn tls_rules(&self, plan: &PortPlan) -> &[TlsRule] {
        match self.vs_by_host.get(&plan.service) {
            Some(i) => &self.tls[*i],
            None => &[],
        }
    }

    /// The service's own cluster on `port` (every endpoint, no subset).
    pub fn default_cluster(&self, service: &str, port: u16) -> Option<&Arc<Cluster>> {
        self.default_clusters.get(&(service.to_owned(), port))
    }

    /// Compiles and validates a parsed file. Errors name the field, e.g.
    /// `virtualServices[0].http[1].route[0].destination.host: ...`.
    pub fn compile(file: &RoutingFile, stats: &RoutingStats) -> Result<Table, String> {
        let mut t = Table::default();
        // Services: their addresses and ports.
        let mut services: HashMap<String, (usize, &config::ServiceEntry)> = HashMap::new();
        for (i, se) in file.service_entries.iter().enumerate() {
            let f = format!("serviceEntries[{i}]");
            if se.hosts.is_empty() {
                return Err(invalid(format!("{f}.hosts"), "needs at least one host"));
            }
            if se.ports.is_empty() {
                return Err(invalid(format!("{f}.ports"), "needs at least one port"));
            }
            for h in &se.hosts {
                if services.insert(h.to_ascii_lowercase(), (i, se)).is_some() {
                    return Err(invalid(
                        format!("{f}.hosts"),
                        format!("{h:?} is declared twice"),
                    ));
                }
            }
            for (j, p) in se.ports.iter().enumerate() {
                if p.number == 0 {
                    return Err(invalid(
                        format!("{f}.ports[{j}].number"),
                        "must be 1..65535",
                    ));
                }
                for a in &se.addresses {
                    let key = SocketAddr::new(a.to_canonical(), p.number);
                    let plan = PortPlan {
                        service: se.hosts[0].to_ascii_lowercase(),
                        protocol: p.protocol,
                        port: p.number,
                    };
                    if t.by_addr.insert(key, plan).is_some() {
                        return Err(invalid(
                            format!("{f}.addresses"),
                            format!("{key} belongs to two services"),
                        ));
                    }
                }
            }
        }
        // Destination rules: subsets and load balancing per host.
        let mut rules: HashMap<String, &config::DestinationRule> = HashMap::new();
        for (i, dr) in file.destination_rules.iter().enumerate() {
            let host = dr.host.to_ascii_lowercase();
            if !services.contains_key(&host) {
                return Err(invalid(
                    format!("destinationRules[{i}].host"),
                    format!("{:?} is not a host of any serviceEntries entry", dr.host),
                ));
            }
            if rules.insert(host, dr).is_some() {
                return Err(invalid(
                    format!("destinationRules[{i}].host"),
                    format!("a second rule for {:?}", dr.host),
                ));
            }
        }
        let cluster_for = |host: &str,
                           subset: Option<&str>,
                           port: Option<u16>,
                           field: &str|
         -> Result<Arc<Cluster>, String> {
            let host_l = host.to_ascii_lowercase();
            let Some((_, se)) = services.get(&host_l) else {
                let known: Vec<&String> = services.keys().collect();
                return Err(invalid(
                    format!("{field}.host"),
                    format!(
                        "{host:?} is not a host of any serviceEntries entry (known: {known:?})"
                    ),
                ));
            };
            let sp = match port {
                Some(n) => se.ports.iter().find(|p| p.number == n).ok_or_else(|| {
                    invalid(
                        format!("{field}.port.number"),
                        format!("{host} has no port {n}"),
                    )
                })?,
                None if se.ports.len() == 1 => &se.ports[0],
                None => {
                    return Err(invalid(
                        format!("{field}.port"),
                        format!("{host} has several ports; say which with port.number"),
                    ))
                }
            };
            let rule = rules.get(&host_l);
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
                            invalid(
                                format!("{field}.subset"),
                                format!("{host} has no subset {s:?} in destinationRules"),
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
                .filter(|e| {
                    labels.is_none_or(|l| l.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
                })
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
                return Err(invalid(
                    field.to_owned(),
                    format!(
                        "{host}{} has no endpoints",
                        subset.map_or(String::new(), |s| format!(" subset {s}"))
                    ),
                ));
            }
            let name = format!("{host_l}|{}|{}", sp.number, subset.unwrap_or(""));
            Ok(Arc::new(Cluster {
                stats: stats.cluster(&name),
                name,
                endpoints,
                lb,
                http2: matches!(sp.protocol, Protocol::Grpc | Protocol::Http2),
                next: AtomicUsize::new(0),
            }))
        };
        for (host, (_, se)) in &services {
            for p in &se.ports {
                if !se.endpoints.is_empty() {
                    let c = cluster_for(
                        host,
                        None,
                        Some(p.number),
                        &format!("serviceEntries[{host}]"),
                    )?;
                    t.default_clusters.insert((host.clone(), p.number), c);
                }
            }
        }
        let weighted = |dests: &[config::RouteDestination],
                        field: &str|
         -> Result<(Vec<WeightedCluster>, u32), String> {
            if dests.is_empty() {
                return Err(invalid(
                    format!("{field}.route"),
                    "needs at least one destination",
                ));
            }
            let mut out = Vec::new();
            let given: Vec<_> = dests.iter().filter(|d| d.weight.is_some()).collect();
            if !given.is_empty() && given.len() != dests.len() {
                return Err(invalid(
                    format!("{field}.route"),
                    "give every destination a weight, or none",
                ));
            }
            let mut total = 0;
            for (k, d) in dests.iter().enumerate() {
                let f = format!("{field}.route[{k}].destination");
                let c = cluster_for(
                    &d.destination.host,
                    d.destination.subset.as_deref(),
                    d.destination.port.as_ref().map(|p| p.number),
                    &f,
                )?;
                let w = d.weight.unwrap_or(1);
                total += w;
                out.push(WeightedCluster {
                    cluster: c,
                    weight: w,
                });
            }
            if total == 0 {
                return Err(invalid(format!("{field}.route"), "weights add up to 0"));
            }
            if !given.is_empty() && total != 100 {
                return Err(invalid(
                    format!("{field}.route"),
                    format!("weights add up to {total}, not 100"),
                ));
            }
            Ok((out, total))
        };
        for (i, vs) in file.virtual_services.iter().enumerate() {
            let f = format!("virtualServices[{i}]");
            let vs_name = vs
                .name
                .clone()
                .unwrap_or_else(|| vs.hosts.first().cloned().unwrap_or_default());
            if vs.hosts.is_empty() {
                return Err(invalid(format!("{f}.hosts"), "needs at least one host"));
            }
            for h in &vs.hosts {
                if t.vs_by_host.insert(h.to_ascii_lowercase(), i).is_some() {
                    return Err(invalid(
                        format!("{f}.hosts"),
                        format!("{h:?} is in two virtual services"),
                    ));
                }
            }
            let mut routes = Vec::new();
            for (j, r) in vs.http.iter().enumerate() {
                let rf = format!("{f}.http[{j}]");
                let mut matches = Vec::new();
                for (k, m) in r.matches.iter().enumerate() {
                    let mf = format!("{rf}.match[{k}]");
                    let mut c = Match {
                        uri: m
                            .uri
                            .as_ref()
                            .map(|x| Matcher::compile(x, &format!("{mf}.uri")))
                            .transpose()?,
                        method: m
                            .method
                            .as_ref()
                            .map(|x| Matcher::compile(x, &format!("{mf}.method")))
                            .transpose()?,
                        source: m
                            .source_workload
                            .as_ref()
                            .map(|x| Matcher::compile(x, &format!("{mf}.sourceWorkload")))
                            .transpose()?,
                        ..Default::default()
                    };
                    for (name, x) in &m.headers {
                        let hn =
                            ::http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                                .map_err(|e| invalid(format!("{mf}.headers.{name}"), e))?;
                        c.headers
                            .push((hn, Matcher::compile(x, &format!("{mf}.headers.{name}"))?));
                    }
                    for (name, x) in &m.query_params {
                        c.query.push((
                            name.clone(),
                            Matcher::compile(x, &format!("{mf}.queryParams.{name}"))?,
                        ));
                    }
                    if let Some(g) = &m.grpc {
                        if g.service.is_empty() || g.service.contains('/') {
                            return Err(invalid(
                                format!("{mf}.grpc.service"),
                                "give the full service name, e.g. helloworld.Greeter",
                            ));
                        }
                        c.grpc_service = Some(g.service.clone());
                        c.grpc_method = g.method.clone();
                    }
                    matches.push(c);
                }
                let (clusters, total_weight) = weighted(&r.route, &rf)?;
                let timeout = r
                    .timeout
                    .as_deref()
                    .map(|s| {
                        crate::config::parse_duration("timeout", s)
                            .map_err(|e| invalid(format!("{rf}.timeout"), e.problem))
                    })
                    .transpose()?;
                let connect_retries = match &r.retries {
                    None => 0,
                    Some(x) => {
                        if let Some(on) = &x.retry_on {
                            if on.split(',').any(|k| k.trim() != "connect-failure") {
                                return Err(invalid(
                                    format!("{rf}.retries.retryOn"),
                                    format!("{on:?}: only connect-failure is supported"),
                                ));
                            }
                        }
                        if x.attempts > 10 {
                            return Err(invalid(format!("{rf}.retries.attempts"), "at most 10"));
                        }
                        x.attempts
                    }
                };
                let ops = |o: &Option<config::HeaderOps>,
                           which: &str|
                 -> Result<Option<HeaderOps>, String> {
                    let Some(o) = o else { return Ok(None) };
                    let hf = format!("{rf}.headers.{which}");
                    let pair = |(k, v): (&String, &String)| -> Result<(::http::HeaderName, ::http::HeaderValue), String> {
                        Ok((
                            ::http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes()).map_err(|e| invalid(format!("{hf}.{k}"), e))?,
                            ::http::HeaderValue::from_str(v).map_err(|e| invalid(format!("{hf}.{k}"), e))?,
                        ))
                    };
                    Ok(Some(HeaderOps {
                        set: o.set.iter().map(pair).collect::<Result<_, _>>()?,
                        add: o.add.iter().map(pair).collect::<Result<_, _>>()?,
                        remove: o
                            .remove
                            .iter()
                            .map(|k| {
                                ::http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                                    .map_err(|e| invalid(format!("{hf}.remove"), e))
                            })
                            .collect::<Result<_, _>>()?,
                    }))
                };
                let headers = r.headers.clone().unwrap_or_default();
                let name = r.name.clone().unwrap_or_else(|| format!("http[{j}]"));
                routes.push(Route {
                    stats: stats.route(&vs_name, &name),
                    virtual_service: vs_name.clone(),
                    name,
                    matches,
                    clusters,
                    total_weight,
                    timeout,
                    connect_retries,
                    request_headers: ops(&headers.request, "request")?,
                    response_headers: ops(&headers.response, "response")?,
                });
            }
            let mut tls = Vec::new();
            for (j, r) in vs.tls.iter().enumerate() {
                let rf = format!("{f}.tls[{j}]");
                let sni: Vec<String> = r
                    .matches
                    .iter()
                    .flat_map(|m| m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()))
                    .collect();
                if sni.is_empty() {
                    return Err(invalid(format!("{rf}.match"), "needs sniHosts"));
                }
                let (clusters, total_weight) = weighted(&r.route, &rf)?;
                tls.push(TlsRule {
                    sni,
                    clusters,
                    total_weight,
                });
            }
            t.http.push(routes);
            t.tls.push(tls);
        }
        Ok(t)
    }
}

/// Picks a cluster by weight.
pub fn pick_weighted(clusters: &[WeightedCluster], total: u32) -> &Arc<Cluster> {
    let mut r = fastrand::u32(..total);
    for c in clusters {
        if r < c.weight {
            return &c.cluster;
        }
        r -= c.weight;
    }
    &clusters[clusters.len() - 1].cluster
}

/// The routes in force, reloadable.
#[derive(Debug)]
pub struct Routing {
    path: Option<PathBuf>,
    table: RwLock<Arc<Table>>,
    pub stats: Arc<RoutingStats>,
    /// (mtime, len) of the file last loaded.
    seen: Mutex<Option<(SystemTime, u64)>>,
    pub detection_timeout: Duration,
    pub version: AtomicU64,
}

impl Routing {
    /// No routes: every destination is opaque TCP.
    pub fn none() -> Routing {
        Routing {
            path: None,
            table: RwLock::new(Arc::new(Table::default())),
            stats: Arc::default(),
            seen: Mutex::new(None),
            detection_timeout: Duration::from_millis(100),
            version: AtomicU64::new(0),
        }
    }

    /// Loads `path`; an error names the file and the field.
    pub fn load(path: &Path, detection_timeout: Duration) -> Result<Routing, RoutesError> {
        let r = Routing {
            path: Some(path.to_owned()),
            detection_timeout,
            ..Routing::none()
        };
        r.reload()?;
        Ok(r)
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn current(&self) -> Arc<Table> {
        self.table.read().expect("routes lock").clone()
    }

    /// Reads, parses and compiles the file; on success it replaces the table, on failure
    /// nothing changes.
    pub fn reload(&self) -> Result<(), RoutesError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let err = |message: String| RoutesError {
            path: path.clone(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read it: {e}")))?;
        let text =
            std::fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?;
        let result = serde_saphyr::from_str::<RoutingFile>(&text)
            .map_err(|e| err(e.to_string()))
            .and_then(|file| Table::compile(&file, &self.stats).map_err(err));
        *self.seen.lock().expect("seen") = Some((
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        ));
        match result {
            Ok(t) => {
                *self.table.write().expect("routes lock") = Arc::new(t);
                self.version.fetch_add(1, Relaxed);
                self.stats.reloads.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(e) => {
                self.stats.reload_errors.fetch_add(1, Relaxed);
                Err(e)
            }
        }
    }

    /// Whether the file changed since it was last read.
    fn changed(&self) -> bool {
        let Some(path) = &self.path else { return false };
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        let now = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        *self.seen.lock().expect("seen") != Some(now)
    }
}

/// Reloads the routes when the file changes, until the runtime ends.
pub async fn watch(routing: Arc<Routing>) {
    if routing.path().is_none() {
        return;
    }
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if routing.changed() {
            match routing.reload() {
                Ok(()) => {
                    tracing::info!(routes = %routing.path().unwrap().display(), "routes reloaded")
                }
                Err(e) => {
                    tracing::error!(error = %e, "routes not reloaded; the previous ones stay")
                }
            }
        }
    }
}

/// Whether `ip` is one of this table's service addresses (any port).
pub fn is_service_address(t: &Table, ip: IpAddr) -> bool {
    t.by_addr.keys().any(|a| a.ip() == ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
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

    fn compile(text: &str) -> Result<Table, String> {
        let file: RoutingFile = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        Table::compile(&file, &RoutingStats::default())
    }

    #[test]
    fn a_good_file_compiles() {
        let t = compile(GOOD).unwrap();
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
            let e = compile(&bad).err().unwrap_or_else(|| panic!("{to} accepted"));
            assert!(e.contains(want), "{to}: {e}");
        }
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint_and_round_robin_alternates() {
        let cluster = |lb| Cluster {
            name: "c".into(),
            endpoints: ["10.0.0.1:80", "10.0.0.2:80"]
                .iter()
                .map(|a| Endpoint {
                    addr: a.parse().unwrap(),
                    active: AtomicU64::new(0),
                })
                .collect(),
            lb,
            http2: false,
            next: AtomicUsize::new(0),
            stats: Arc::default(),
        };
        let busy: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let c = cluster(Lb::LeastRequest);
        c.endpoints[0].active.store(10, Relaxed);
        let to_busy = (0..1000)
            .filter(|_| c.pick(&[]).unwrap().addr == busy)
            .count();
        // Two random choices, the less loaded wins: the busy one only when drawn twice (1/4).
        assert!(to_busy < 350, "{to_busy} of 1000 to the busy endpoint");
        let c = cluster(Lb::RoundRobin);
        c.endpoints[0].active.store(10, Relaxed);
        let to_busy = (0..1000)
            .filter(|_| c.pick(&[]).unwrap().addr == busy)
            .count();
        assert_eq!(to_busy, 500);
        // An endpoint that failed this request is skipped while another exists.
        assert_ne!(c.pick(&[busy]).unwrap().addr, busy);
    }

    #[test]
    fn a_refused_reload_keeps_the_routes() {
        let dir = std::env::temp_dir().join(format!("icpt-routes-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("routes.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let r = Routing::load(&path, Duration::from_millis(100)).unwrap();
        let before = r.current();
        std::fs::write(&path, GOOD.replace("subset: v2}}]", "subset: v9}}]")).unwrap();
        let e = r.reload().unwrap_err();
        assert!(e.to_string().contains("v9"), "{e}");
        assert!(
            Arc::ptr_eq(&before, &r.current()),
            "the routes in force stay"
        );
        assert_eq!(r.stats.reload_errors.load(Relaxed), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
