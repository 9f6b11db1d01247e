//! The routes file's `wasmPlugins` entries, in the shape of Istio's `WasmPlugin` spec:
//!
//! ```yaml
//! wasmPlugins:
//! - name: route-by-amount
//!   url: file:///etc/interceptor/plugins/router.wasm   # or a plain path
//!   phase: AUTHZ               # AUTHN, AUTHZ, STATS or UNSPECIFIED_PHASE (default): run order
//!   priority: 10               # within a phase, higher first
//!   pluginConfig: {threshold: 1000, cluster: reviews/v2}   # given to the plugin as JSON
//!   failStrategy: FAIL_OPEN    # or FAIL_CLOSE (default, as Istio): 503 when the plugin fails
//!   targetRefs: [{kind: Service, name: reviews}]           # none: every routed HTTP service
//!   limits: {fuel: 2000000, memoryMiB: 16}                 # per call; this project's field
//! ```

use std::path::PathBuf;

use serde::Deserialize;

/// One `wasmPlugins` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WasmPluginSpec {
    pub name: String,
    /// `file://PATH` or a path.
    pub url: String,
    #[serde(default)]
    pub phase: Phase,
    #[serde(default)]
    pub priority: i64,
    /// Any YAML; the plugin reads it as JSON (`get_plugin_configuration`).
    #[serde(default)]
    pub plugin_config: Option<serde_json::Value>,
    #[serde(default)]
    pub fail_strategy: FailStrategy,
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    #[serde(default)]
    pub limits: PluginLimits,
}

/// When a plugin runs among the others (Istio's phases; all run before routing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    Authn,
    Authz,
    Stats,
    #[default]
    UnspecifiedPhase,
}

/// What a request gets when its plugin fails (traps, runs out of fuel or memory).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailStrategy {
    /// 503.
    #[default]
    FailClose,
    /// The declarative routes, as if the plugin were not there.
    FailOpen,
}

/// A service the plugin runs for.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// `Service` (the only kind here).
    pub kind: TargetKind,
    /// A `serviceEntries` host.
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TargetKind {
    Service,
}

/// What one call of the plugin may use.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginLimits {
    /// Wasm instructions per call (wasmi's fuel).
    #[serde(default = "default_fuel")]
    pub fuel: u64,
    /// The instance's linear memory, at most.
    #[serde(default = "default_memory_mib", rename = "memoryMiB")]
    pub memory_mib: u32,
}

/// About 1 ms of this machine's interpreter (measured by `cargo xtask bench routing`).
pub const DEFAULT_FUEL: u64 = 1_000_000;
pub const DEFAULT_MEMORY_MIB: u32 = 16;

fn default_fuel() -> u64 {
    DEFAULT_FUEL
}

fn default_memory_mib() -> u32 {
    DEFAULT_MEMORY_MIB
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            fuel: DEFAULT_FUEL,
            memory_mib: DEFAULT_MEMORY_MIB,
        }
    }
}

impl WasmPluginSpec {
    /// The module's file.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(self.url.strip_prefix("file://").unwrap_or(&self.url))
    }

    /// The plugin's configuration as the plugin reads it: JSON, or nothing.
    pub fn config_bytes(&self) -> Vec<u8> {
        self.plugin_config
            .as_ref()
            .map(|v| serde_json::to_vec(v).expect("a JSON value serialises"))
            .unwrap_or_default()
    }

    /// The services it targets (lower case); none: all.
    pub fn services(&self) -> Vec<String> {
        self.target_refs
            .iter()
            .map(|t| t.name.to_ascii_lowercase())
            .collect()
    }
}
