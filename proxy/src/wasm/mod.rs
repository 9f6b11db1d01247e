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
//! | `request.rs` | what a plugin sees of a request and what it decides; its counters |
//! | `plugin.rs` | a loaded plugin and the plugins of one file: instances taken and given back, failures counted, the fallback |
//! | `host.rs` | one plugin instance: the store, the exports it calls, the per-request state |
//! | `abi.rs` | the host functions (proxy-wasm `env` and the few WASI ones the SDK imports) |

mod abi;
mod host;
mod plugin;
mod request;
mod spec;

pub use plugin::{Plugin, Plugins, MAX_MODULE_BYTES};
pub use request::{LoadError, LocalReply, PluginStats, RequestInfo, Verdict};
pub use spec::{FailStrategy, Phase, PluginLimits, TargetRef, WasmPluginSpec};
