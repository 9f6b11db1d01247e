//! Wasm routing plugins on the proxy-wasm ABI (0.2.1, the one Envoy and Istio's WasmPlugin
//! use), the subset routing needs, run by the [wasmi] interpreter.
//!
//! A plugin is configured in the routes file in the shape of Istio's `WasmPlugin`
//! (`wasmPlugins:`, see [`WasmPluginSpec`]) and loaded with it: a file that names a plugin
//! that does not load, does not validate, or refuses its configuration is refused as a whole,
//! and the routes in force stay. For each HTTP request to a service it targets, before the
//! declarative routes are matched, the plugin's `proxy_on_request_headers` runs and may:
//!
//! - read the request's properties (`request.path`, `request.method`, `request.host`,
//!   `source.address`, `source.workload` (the calling workload's cgroup),
//!   `destination.address`, `destination.service`; for Dubbo `dubbo.service`,
//!   `dubbo.version`, `dubbo.method`, `dubbo.args.N`, `dubbo.attachments.KEY`);
//! - get, set, add and remove request headers (the routes then match the edited request);
//! - log (`proxy_log`, to the proxy's log with the plugin's name);
//! - choose the cluster (`set_property(["icp", "cluster"], "host[/subset]")`) or the route of
//!   the virtual service by name (`["icp", "route"]`);
//! - answer the request itself (`proxy_send_local_response`).
//!
//! Budgets: each call runs with a fuel budget (`limits.fuel`, instructions; the default is
//! about 1 ms of this machine's interpreter, see ARCHITECTURE.md) and a memory cap
//! (`limits.memoryMiB`, 16 by default). A plugin that traps, runs out of fuel or is refused
//! memory is counted by kind and gives the request its fallback (`failStrategy`:
//! `FAIL_CLOSE`, Istio's default, answers 503; `FAIL_OPEN` leaves the request to the
//! declarative routes, with the headers it had before the plugin); the instance that failed
//! is dropped, never reused, and the proxy carries on.
//!
//! | file | what |
//! |---|---|
//! | `spec.rs` | the routes file's `wasmPlugins` entries |
//! | `host.rs` | one plugin instance: the store, the exports it calls, the per-request state |
//! | `abi.rs` | the host functions (proxy-wasm `env` and the few WASI ones the SDK imports) |

mod abi;
mod host;
mod spec;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

use http::HeaderMap;

pub use spec::{FailStrategy, Phase, PluginLimits, TargetRef, WasmPluginSpec};

use host::{Instance, RequestState};

/// Why a plugin could not be loaded: the message names the plugin and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

/// What a request's plugins decided.
#[derive(Debug, Default)]
pub enum Verdict {
    /// Route it (with the headers as the plugins left them): by the declarative routes, or
    /// to the cluster or route a plugin chose.
    #[default]
    Continue,
    /// Route it to this cluster (`host` or `host/subset`).
    Cluster(String),
    /// Route it by the virtual service's route of this name.
    Route(String),
    /// Answer it with this response.
    Reply(LocalReply),
    /// A fail-closed plugin failed: answer 503.
    Failed { plugin: String },
}

/// A response a plugin asked for.
#[derive(Debug, Clone, Default)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What a plugin may read of a request besides its headers.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    pub method: String,
    pub path: String,
    pub host: String,
    pub source: Option<SocketAddr>,
    pub workload: Option<String>,
    pub destination: Option<SocketAddr>,
    pub service: String,
    /// Dubbo requests: `service`, `version`, `method`, `args.N`, `attachments.KEY`.
    pub dubbo: BTreeMap<String, String>,
}

/// Counters of one plugin, kept by name across reloads.
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Requests the plugin ran for.
    pub calls: AtomicU64,
    /// Calls that trapped.
    pub traps: AtomicU64,
    /// Calls that ran out of fuel.
    pub fuel_exhausted: AtomicU64,
    /// Calls that were refused memory beyond the cap (and failed for it).
    pub memory_exceeded: AtomicU64,
    /// Requests answered by the plugin itself.
    pub local_replies: AtomicU64,
    /// Requests the plugin sent to a cluster or route of its choice.
    pub routed: AtomicU64,
    /// Requests a failing plugin answered 503 (fail closed).
    pub failed_closed: AtomicU64,
    /// Requests a failing plugin left to the declarative routes (fail open).
    pub failed_open: AtomicU64,
}

/// The engine every plugin runs on: fuel metering on, everything else wasmi's defaults.
fn engine() -> &'static wasmi::Engine {
    static ENGINE: OnceLock<wasmi::Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut c = wasmi::Config::default();
        c.consume_fuel(true);
        wasmi::Engine::new(&c)
    })
}

/// One loaded plugin: its compiled module, configuration, and idle instances.
pub struct Plugin {
    pub name: String,
    phase: Phase,
    priority: i64,
    services: Vec<String>,
    fail: FailStrategy,
    limits: PluginLimits,
    module: wasmi::Module,
    linker: Arc<wasmi::Linker<RequestState>>,
    config: Arc<[u8]>,
    /// Idle instances; a request takes one (or makes one) and gives it back unless it failed.
    idle: Mutex<Vec<Instance>>,
    pub stats: Arc<PluginStats>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("phase", &self.phase)
            .field("services", &self.services)
            .finish_non_exhaustive()
    }
}

/// How an instance failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Trap,
    Fuel,
    Memory,
}

impl Plugin {
    /// Loads `spec`'s module, links it, and makes one instance (which runs the plugin's
    /// start and its `proxy_on_configure`): a plugin that does not load or refuses its
    /// configuration is an error here, never at a request.
    pub fn load(spec: &WasmPluginSpec, stats: Arc<PluginStats>) -> Result<Plugin, LoadError> {
        let name = spec.name.clone();
        let path = spec.path();
        let bytes = read_module(&path).map_err(|e| {
            LoadError(format!(
                "wasm plugin {name:?}: cannot read {}: {e}",
                path.display()
            ))
        })?;
        let module = wasmi::Module::new(engine(), &bytes[..]).map_err(|e| {
            LoadError(format!(
                "wasm plugin {name:?}: {} is not a valid Wasm module: {e}",
                path.display()
            ))
        })?;
        let linker = Arc::new(abi::linker(engine()));
        let config: Arc<[u8]> = spec.config_bytes().into();
        let plugin = Plugin {
            name,
            phase: spec.phase,
            priority: spec.priority,
            services: spec.services(),
            fail: spec.fail_strategy,
            limits: spec.limits.clone(),
            module,
            linker,
            config,
            idle: Mutex::new(Vec::new()),
            stats,
        };
        let first = plugin
            .instance()
            .map_err(|e| LoadError(format!("wasm plugin {:?}: {e}", plugin.name)))?;
        plugin.give_back(first);
        Ok(plugin)
    }

    fn instance(&self) -> Result<Instance, String> {
        Instance::new(
            engine(),
            &self.module,
            &self.linker,
            &self.name,
            &self.config,
            &self.limits,
        )
    }

    fn give_back(&self, i: Instance) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(i);
    }

    /// Whether the plugin runs for requests to `service`.
    pub fn targets(&self, service: &str) -> bool {
        self.services.is_empty() || self.services.iter().any(|s| s == service)
    }

    /// Runs the plugin's request hook on `headers` and `info`.
    fn on_request(&self, headers: &mut HeaderMap, info: &RequestInfo) -> Verdict {
        self.stats.calls.fetch_add(1, Relaxed);
        let taken = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let instance = match taken {
            Some(i) => Ok(i),
            None => self.instance(),
        };
        let mut instance = match instance {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(plugin = %self.name, error = %e, "wasm plugin: no instance");
                return self.failed(Failure::Trap, headers, None);
            }
        };
        let before = (self.fail == FailStrategy::FailOpen).then(|| headers.clone());
        match instance.on_request_headers(headers, info, self.limits.fuel) {
            Ok(out) => {
                self.give_back(instance);
                if let Some(reply) = out.reply {
                    self.stats.local_replies.fetch_add(1, Relaxed);
                    return Verdict::Reply(reply);
                }
                if let Some(c) = out.cluster {
                    self.stats.routed.fetch_add(1, Relaxed);
                    return Verdict::Cluster(c);
                }
                if let Some(r) = out.route {
                    self.stats.routed.fetch_add(1, Relaxed);
                    return Verdict::Route(r);
                }
                Verdict::Continue
            }
            Err((failure, e)) => {
                // The instance that failed is dropped: its memory may be in any state.
                tracing::warn!(plugin = %self.name, kind = ?failure, error = %e, "wasm plugin failed; request gets the fallback");
                self.failed(failure, headers, before)
            }
        }
    }

    fn failed(&self, f: Failure, headers: &mut HeaderMap, before: Option<HeaderMap>) -> Verdict {
        let counter = match f {
            Failure::Trap => &self.stats.traps,
            Failure::Fuel => &self.stats.fuel_exhausted,
            Failure::Memory => &self.stats.memory_exceeded,
        };
        counter.fetch_add(1, Relaxed);
        match self.fail {
            FailStrategy::FailClose => {
                self.stats.failed_closed.fetch_add(1, Relaxed);
                Verdict::Failed {
                    plugin: self.name.clone(),
                }
            }
            FailStrategy::FailOpen => {
                self.stats.failed_open.fetch_add(1, Relaxed);
                if let Some(h) = before {
                    *headers = h;
                }
                Verdict::Continue
            }
        }
    }
}

/// Largest plugin module read.
pub const MAX_MODULE_BYTES: u64 = 64 << 20;

/// A regular file of at most [`MAX_MODULE_BYTES`].
fn read_module(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > MAX_MODULE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("larger than {} MiB", MAX_MODULE_BYTES >> 20),
        ));
    }
    let mut bytes = Vec::new();
    f.take(MAX_MODULE_BYTES).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The plugins of one routes file, in the order they run (by phase, then priority, highest
/// first, then file order).
#[derive(Debug, Default)]
pub struct Plugins {
    list: Vec<Arc<Plugin>>,
}

impl Plugins {
    pub fn new(mut list: Vec<(usize, Plugin)>) -> Plugins {
        list.sort_by_key(|(i, p)| (p.phase, std::cmp::Reverse(p.priority), *i));
        Plugins {
            list: list.into_iter().map(|(_, p)| Arc::new(p)).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Whether any plugin runs for `service`.
    pub fn any_for(&self, service: &str) -> bool {
        self.list.iter().any(|p| p.targets(service))
    }

    /// Runs the plugins that target `info.service`, in order, until one decides (a route,
    /// a cluster, a reply, or a fail-closed failure).
    pub fn on_request(&self, headers: &mut HeaderMap, info: &RequestInfo) -> Verdict {
        for p in self.list.iter().filter(|p| p.targets(&info.service)) {
            match p.on_request(headers, info) {
                Verdict::Continue => continue,
                decided => return decided,
            }
        }
        Verdict::Continue
    }
}
