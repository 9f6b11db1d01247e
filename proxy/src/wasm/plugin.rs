//! A loaded plugin (its module, configuration, idle instances and counters) and the plugins
//! of one routes file, in the order they run.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};

use http::HeaderMap;

use super::abi;
use super::host::{Instance, RequestState};
use super::request::{Failure, LoadError, PluginStats, RequestInfo, Verdict};
use super::spec::{FailStrategy, Phase, PluginLimits, WasmPluginSpec};

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
