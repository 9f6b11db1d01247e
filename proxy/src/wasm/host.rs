//! One instance of a plugin: its store (the per-call state the host functions read and
//! write, the memory cap), the exports the host calls, and the calls of one request.

use std::sync::Arc;

use http::HeaderMap;
use wasmi::{Engine, Linker, Memory, Module, Store, TypedFunc};

use super::request::{Failure, LocalReply, RequestInfo};
use super::spec::PluginLimits;

/// The root context's id: one per instance, configured once.
const ROOT_CONTEXT: i32 = 1;

/// What the host functions work on during one call (the store's data).
#[derive(Debug, Default)]
pub(super) struct RequestState {
    pub plugin: String,
    pub config: Arc<[u8]>,
    pub limiter: Limiter,
    /// The request being decided, while `proxy_on_request_headers` runs.
    pub request: Option<Request>,
}

/// The request as the plugin sees and changes it.
#[derive(Debug, Default)]
pub(super) struct Request {
    pub headers: HeaderMap,
    pub info: RequestInfo,
    /// Properties the plugin set that are not ours (read back by `get_property`).
    pub set: Vec<(Vec<u8>, Vec<u8>)>,
    pub out: Outcome,
}

/// What a plugin decided for a request.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    pub cluster: Option<String>,
    pub route: Option<String>,
    pub reply: Option<LocalReply>,
}

/// The memory cap; remembers a refusal, so that the failure it causes is counted as memory.
#[derive(Debug, Default)]
pub(super) struct Limiter {
    pub max_bytes: usize,
    pub refused: bool,
}

impl wasmi::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool, wasmi_core::LimiterError> {
        let ok = desired <= self.max_bytes && maximum.is_none_or(|m| desired <= m);
        if !ok {
            self.refused = true;
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool, wasmi_core::LimiterError> {
        Ok(desired <= 100_000 && maximum.is_none_or(|m| desired <= m))
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }

    fn memories(&self) -> usize {
        1
    }
}

/// A plugin instance, configured, ready for requests.
pub(super) struct Instance {
    store: Store<RequestState>,
    context_create: TypedFunc<(i32, i32), ()>,
    request_headers: TypedFunc<(i32, i32, i32), i32>,
    done: TypedFunc<i32, i32>,
    delete: TypedFunc<i32, ()>,
    next_context: i32,
}

/// The fuel an instance gets to start and configure itself.
const START_FUEL: u64 = 50_000_000;

impl Instance {
    /// Instantiates `module`, runs its start (`_initialize`), creates its root context and
    /// gives it its configuration.
    pub fn new(
        engine: &Engine,
        module: &Module,
        linker: &Linker<RequestState>,
        plugin: &str,
        config: &Arc<[u8]>,
        limits: &PluginLimits,
    ) -> Result<Instance, String> {
        let mut store = Store::new(
            engine,
            RequestState {
                plugin: plugin.to_owned(),
                config: config.clone(),
                limiter: Limiter {
                    max_bytes: limits.memory_mib as usize * 1024 * 1024,
                    refused: false,
                },
                request: None,
            },
        );
        store.limiter(|s| &mut s.limiter);
        store.set_fuel(START_FUEL).map_err(|e| e.to_string())?;
        let instance = linker
            .instantiate_and_start(&mut store, module)
            .map_err(|e| format!("cannot instantiate: {e}"))?;
        if let Ok(init) = instance.get_typed_func::<(), ()>(&store, "_initialize") {
            init.call(&mut store, ())
                .map_err(|e| format!("_initialize failed: {e}"))?;
        }
        let func = |name: &str| format!("does not export {name} (not a proxy-wasm 0.2.1 module)");
        if instance
            .get_export(&store, "proxy_abi_version_0_2_1")
            .is_none()
        {
            return Err(func("proxy_abi_version_0_2_1"));
        }
        if instance.get_memory(&store, "memory").is_none() {
            return Err(func("memory"));
        }
        let context_create = instance
            .get_typed_func::<(i32, i32), ()>(&store, "proxy_on_context_create")
            .map_err(|_| func("proxy_on_context_create"))?;
        let request_headers = instance
            .get_typed_func::<(i32, i32, i32), i32>(&store, "proxy_on_request_headers")
            .map_err(|_| func("proxy_on_request_headers"))?;
        let done = instance
            .get_typed_func::<i32, i32>(&store, "proxy_on_done")
            .map_err(|_| func("proxy_on_done"))?;
        let delete = instance
            .get_typed_func::<i32, ()>(&store, "proxy_on_delete")
            .map_err(|_| func("proxy_on_delete"))?;
        context_create
            .call(&mut store, (ROOT_CONTEXT, 0))
            .map_err(|e| format!("root context: {e}"))?;
        if let Ok(vm_start) =
            instance.get_typed_func::<(i32, i32), i32>(&store, "proxy_on_vm_start")
        {
            let ok = vm_start
                .call(&mut store, (ROOT_CONTEXT, 0))
                .map_err(|e| format!("proxy_on_vm_start: {e}"))?;
            if ok == 0 {
                return Err("proxy_on_vm_start refused to start".into());
            }
        }
        if let Ok(configure) =
            instance.get_typed_func::<(i32, i32), i32>(&store, "proxy_on_configure")
        {
            let size = i32::try_from(config.len()).map_err(|_| "configuration too large")?;
            let ok = configure
                .call(&mut store, (ROOT_CONTEXT, size))
                .map_err(|e| format!("proxy_on_configure: {e}"))?;
            if ok == 0 {
                return Err(
                    "the plugin refused its pluginConfig (proxy_on_configure returned false)"
                        .into(),
                );
            }
        }
        Ok(Instance {
            store,
            context_create,
            request_headers,
            done,
            delete,
            next_context: ROOT_CONTEXT + 1,
        })
    }

    /// One request: a new HTTP context, its request headers hook within `fuel`, done and
    /// deleted. The headers are the plugin's to change; on a failure the instance must be
    /// dropped.
    pub fn on_request_headers(
        &mut self,
        headers: &mut HeaderMap,
        info: &RequestInfo,
        fuel: u64,
    ) -> Result<Outcome, (Failure, String)> {
        let ctx = self.next_context;
        self.next_context = if ctx == i32::MAX {
            ROOT_CONTEXT + 1
        } else {
            ctx + 1
        };
        let n = i32::try_from(headers.len()).unwrap_or(i32::MAX);
        self.store.data_mut().request = Some(Request {
            headers: std::mem::take(headers),
            info: info.clone(),
            set: Vec::new(),
            out: Outcome::default(),
        });
        self.store.data_mut().limiter.refused = false;
        let result = self.calls(ctx, n, fuel);
        let request = self.store.data_mut().request.take().unwrap_or_default();
        *headers = request.headers;
        match result {
            Ok(()) => Ok(request.out),
            Err(e) => {
                let failure = if self.store.data().limiter.refused {
                    Failure::Memory
                } else if e.as_trap_code() == Some(wasmi::TrapCode::OutOfFuel) {
                    Failure::Fuel
                } else {
                    Failure::Trap
                };
                Err((failure, e.to_string()))
            }
        }
    }

    fn calls(&mut self, ctx: i32, headers: i32, fuel: u64) -> Result<(), wasmi::Error> {
        self.store.set_fuel(fuel)?;
        self.context_create
            .call(&mut self.store, (ctx, ROOT_CONTEXT))?;
        // end_of_stream: the body (if any) is not the plugin's to see.
        self.request_headers
            .call(&mut self.store, (ctx, headers, 0))?;
        self.done.call(&mut self.store, ctx)?;
        self.delete.call(&mut self.store, ctx)?;
        Ok(())
    }
}

/// The instance's exported memory, from inside a host function.
pub(super) fn memory(caller: &wasmi::Caller<'_, RequestState>) -> Option<Memory> {
    caller.get_export("memory").and_then(|e| e.into_memory())
}
