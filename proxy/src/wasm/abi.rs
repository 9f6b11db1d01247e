//! The host side of the proxy-wasm 0.2.1 ABI, the subset routing needs, plus the WASI calls
//! the Rust SDK's modules import (`wasm32-wasip1`). Everything else the SDK imports is
//! defined and answers `Unimplemented`-like statuses the SDK turns into `Err` (HTTP and gRPC
//! callouts, shared queues) or an empty result (shared data), so that a module built with the
//! SDK links whatever it uses, and fails only if it calls what routing does not offer.
//!
//! Data the host returns is written into memory the plugin allocates itself
//! (`proxy_on_memory_allocate`), as the ABI says; the SDK frees it.

use http::{HeaderName, HeaderValue};
use wasmi::{Caller, Engine, Linker};

use super::host::{memory, Request, RequestState};
use super::request::LocalReply;

/// proxy-wasm statuses.
const OK: i32 = 0;
const NOT_FOUND: i32 = 1;
const BAD_ARGUMENT: i32 = 2;
const INTERNAL_FAILURE: i32 = 10;
/// What the SDK gets for calls this host does not offer (it panics on no known status, so
/// this is one it turns into an `Err`).
const UNIMPLEMENTED: i32 = 12;

/// Header map types: only the request's headers are the plugin's.
const MAP_HTTP_REQUEST_HEADERS: i32 = 0;
/// Buffer types.
const BUFFER_VM_CONFIGURATION: i32 = 6;
const BUFFER_PLUGIN_CONFIGURATION: i32 = 7;

/// WASI errno values.
const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;

type C<'a> = Caller<'a, RequestState>;

fn read(c: &C<'_>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let mem = memory(c)?;
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    mem.read(c, usize::try_from(ptr).ok()?, &mut buf).ok()?;
    Some(buf)
}

fn write(c: &mut C<'_>, ptr: i32, data: &[u8]) -> bool {
    let (Some(mem), Ok(at)) = (memory(c), usize::try_from(ptr)) else {
        return false;
    };
    mem.write(c, at, data).is_ok()
}

fn write_u32(c: &mut C<'_>, ptr: i32, v: u32) -> bool {
    write(c, ptr, &v.to_le_bytes())
}

/// Copies `data` into memory the plugin allocates and stores its address and size at
/// `ret_ptr` / `ret_size`.
fn give(c: &mut C<'_>, data: &[u8], ret_ptr: i32, ret_size: i32) -> Result<i32, wasmi::Error> {
    let alloc = c
        .get_export("proxy_on_memory_allocate")
        .or_else(|| c.get_export("malloc"))
        .and_then(|e| e.into_func())
        .ok_or_else(|| wasmi::Error::new("the plugin exports no proxy_on_memory_allocate"))?
        .typed::<i32, i32>(&*c)?;
    let len = i32::try_from(data.len()).map_err(|_| wasmi::Error::new("value too large"))?;
    let at = alloc.call(&mut *c, len)?;
    if at == 0 && len > 0 {
        return Ok(INTERNAL_FAILURE);
    }
    if !(write(c, at, data)
        && write_u32(c, ret_ptr, at as u32)
        && write_u32(c, ret_size, len as u32))
    {
        return Ok(BAD_ARGUMENT);
    }
    Ok(OK)
}

fn request<'a>(c: &'a mut C<'_>) -> Option<&'a mut Request> {
    c.data_mut().request.as_mut()
}

/// The ABI's map serialisation: count, (key length, value length) each, then each key and
/// value followed by a NUL.
fn serialize_map(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

fn deserialize_map(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    let n = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let mut sizes = Vec::with_capacity(n.min(1024));
    let mut at = 4;
    for _ in 0..n {
        let k = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
        let v = u32::from_le_bytes(bytes.get(at + 4..at + 8)?.try_into().ok()?) as usize;
        sizes.push((k, v));
        at += 8;
    }
    let mut out = Vec::with_capacity(sizes.len());
    for (k, v) in sizes {
        let key = bytes.get(at..at + k)?;
        at += k + 1;
        let value = bytes.get(at..at + v)?;
        at += v + 1;
        out.push((
            String::from_utf8_lossy(key).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    Some(out)
}

/// A property's value: the request's attributes, the Dubbo call's, or one the plugin set.
fn property(r: &Request, path: &[u8]) -> Option<Vec<u8>> {
    if let Some((_, v)) = r.set.iter().rev().find(|(p, _)| p == path) {
        return Some(v.clone());
    }
    let path = String::from_utf8_lossy(path);
    let parts: Vec<&str> = path.split('\0').collect();
    let i = &r.info;
    let text = match parts.as_slice() {
        ["request", "path"] | ["request", "url_path"] => i.path.clone(),
        ["request", "method"] => i.method.clone(),
        ["request", "host"] => i.host.clone(),
        ["source", "address"] => i.source?.to_string(),
        ["source", "workload"] => i.workload.clone()?,
        ["destination", "address"] => i.destination?.to_string(),
        ["destination", "service"] => i.service.clone(),
        ["dubbo", rest @ ..] if !rest.is_empty() => i.dubbo.get(&rest.join("."))?.clone(),
        _ => return None,
    };
    Some(text.into_bytes())
}

/// Sets a property: `icp.cluster` and `icp.route` choose where the request goes; others are
/// kept for the plugin to read back.
fn set_property(r: &mut Request, path: Vec<u8>, value: Vec<u8>) {
    let text = || String::from_utf8_lossy(&value).into_owned();
    match path.as_slice() {
        b"icp\0cluster" => r.out.cluster = Some(text()),
        b"icp\0route" => r.out.route = Some(text()),
        _ => r.set.push((path, value)),
    }
}

/// The linker with every host function.
pub(super) fn linker(engine: &Engine) -> Linker<RequestState> {
    let mut l = Linker::new(engine);
    env(&mut l).expect("host functions are defined once");
    wasi(&mut l).expect("WASI functions are defined once");
    l
}

fn env(l: &mut Linker<RequestState>) -> Result<(), wasmi::errors::LinkerError> {
    l.func_wrap(
        "env",
        "proxy_log",
        |c: C<'_>, level: i32, ptr: i32, len: i32| -> i32 {
            let Some(msg) = read(&c, ptr, len) else {
                return BAD_ARGUMENT;
            };
            let msg = String::from_utf8_lossy(&msg);
            let plugin = c.data().plugin.as_str();
            match level {
                0 => tracing::trace!(plugin, "{msg}"),
                1 => tracing::debug!(plugin, "{msg}"),
                2 => tracing::info!(plugin, "{msg}"),
                3 => tracing::warn!(plugin, "{msg}"),
                _ => tracing::error!(plugin, "{msg}"),
            }
            OK
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: C<'_>, ret: i32| -> i32 {
            // Info: what the proxy logs by default.
            if write_u32(&mut c, ret, 2) {
                OK
            } else {
                BAD_ARGUMENT
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ret: i32| -> i32 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            if write(&mut c, ret, &now.to_le_bytes()) {
                OK
            } else {
                BAD_ARGUMENT
            }
        },
    )?;
    // Ticks are not offered: a routing plugin decides per request.
    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |_: C<'_>, _period: i32| -> i32 { OK },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, max: i32, ret_ptr: i32, ret_size: i32| {
            let data = match kind {
                BUFFER_PLUGIN_CONFIGURATION => c.data().config.clone(),
                BUFFER_VM_CONFIGURATION => std::sync::Arc::from(&[][..]),
                _ => return Ok(NOT_FOUND),
            };
            // Sizes are the module's usize (u32): the SDK asks for `usize::MAX` bytes.
            let start = (start as u32 as usize).min(data.len());
            let end = start.saturating_add(max as u32 as usize).min(data.len());
            if start == end {
                return Ok(NOT_FOUND);
            }
            give(&mut c, &data[start..end], ret_ptr, ret_size)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32| -> i32 { NOT_FOUND },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, map: i32, ret_ptr: i32, ret_size: i32| {
            let Some(r) = request(&mut c).filter(|_| map == MAP_HTTP_REQUEST_HEADERS) else {
                return Ok(NOT_FOUND);
            };
            let pairs: Vec<(&[u8], &[u8])> = r
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes()))
                .collect();
            let bytes = serialize_map(&pairs);
            give(&mut c, &bytes, ret_ptr, ret_size)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, map: i32, ptr: i32, len: i32| -> i32 {
            let Some(pairs) = read(&c, ptr, len).and_then(|b| deserialize_map(&b)) else {
                return BAD_ARGUMENT;
            };
            let Some(r) = request(&mut c).filter(|_| map == MAP_HTTP_REQUEST_HEADERS) else {
                return NOT_FOUND;
            };
            let mut headers = http::HeaderMap::new();
            for (k, v) in pairs {
                match (HeaderName::try_from(k), HeaderValue::try_from(v)) {
                    (Ok(k), Ok(v)) => {
                        headers.append(k, v);
                    }
                    _ => return BAD_ARGUMENT,
                }
            }
            r.headers = headers;
            OK
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C<'_>, map: i32, kp: i32, kl: i32, ret_ptr: i32, ret_size: i32| {
            let Some(key) = read(&c, kp, kl) else {
                return Ok(BAD_ARGUMENT);
            };
            let Some(r) = request(&mut c).filter(|_| map == MAP_HTTP_REQUEST_HEADERS) else {
                return Ok(NOT_FOUND);
            };
            // Several values of one name: joined with ", ", as Envoy does.
            let values: Vec<&[u8]> = r
                .headers
                .get_all(match HeaderName::from_bytes(&key) {
                    Ok(k) => k,
                    Err(_) => return Ok(NOT_FOUND),
                })
                .iter()
                .map(HeaderValue::as_bytes)
                .collect();
            if values.is_empty() {
                return Ok(NOT_FOUND);
            }
            let value = values.join(&b", "[..]);
            give(&mut c, &value, ret_ptr, ret_size)
        },
    )?;
    for (name, add) in [
        ("proxy_replace_header_map_value", false),
        ("proxy_add_header_map_value", true),
    ] {
        l.func_wrap(
            "env",
            name,
            move |mut c: C<'_>, map: i32, kp: i32, kl: i32, vp: i32, vl: i32| -> i32 {
                let (Some(k), Some(v)) = (read(&c, kp, kl), read(&c, vp, vl)) else {
                    return BAD_ARGUMENT;
                };
                let (Ok(k), Ok(v)) = (HeaderName::from_bytes(&k), HeaderValue::from_bytes(&v))
                else {
                    return BAD_ARGUMENT;
                };
                let Some(r) = request(&mut c).filter(|_| map == MAP_HTTP_REQUEST_HEADERS) else {
                    return NOT_FOUND;
                };
                if add {
                    r.headers.append(k, v);
                } else {
                    r.headers.insert(k, v);
                }
                OK
            },
        )?;
    }
    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, map: i32, kp: i32, kl: i32| -> i32 {
            let Some(k) = read(&c, kp, kl) else {
                return BAD_ARGUMENT;
            };
            let Some(r) = request(&mut c).filter(|_| map == MAP_HTTP_REQUEST_HEADERS) else {
                return NOT_FOUND;
            };
            if let Ok(k) = HeaderName::from_bytes(&k) {
                r.headers.remove(k);
            }
            OK
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, pp: i32, pl: i32, ret_ptr: i32, ret_size: i32| {
            let Some(path) = read(&c, pp, pl) else {
                return Ok(BAD_ARGUMENT);
            };
            let plugin = c.data().plugin.clone();
            let value = match request(&mut c) {
                Some(r) => property(r, &path),
                None if path == b"plugin_name" => Some(plugin.into_bytes()),
                None => None,
            };
            match value {
                Some(v) => give(&mut c, &v, ret_ptr, ret_size),
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, pp: i32, pl: i32, vp: i32, vl: i32| -> i32 {
            let (Some(path), Some(value)) = (read(&c, pp, pl), read(&c, vp, vl)) else {
                return BAD_ARGUMENT;
            };
            match request(&mut c) {
                Some(r) => {
                    set_property(r, path, value);
                    OK
                }
                None => NOT_FOUND,
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         status: i32,
         _dp: i32,
         _dl: i32,
         bp: i32,
         bl: i32,
         hp: i32,
         hl: i32,
         _grpc: i32|
         -> i32 {
            let body = read(&c, bp, bl).unwrap_or_default();
            let headers = if hl > 0 {
                match read(&c, hp, hl).and_then(|b| deserialize_map(&b)) {
                    Some(h) => h,
                    None => return BAD_ARGUMENT,
                }
            } else {
                Vec::new()
            };
            let Ok(status) = u16::try_from(status) else {
                return BAD_ARGUMENT;
            };
            if !(200..=599).contains(&status) {
                return BAD_ARGUMENT;
            }
            match request(&mut c) {
                Some(r) => {
                    r.out.reply = Some(LocalReply {
                        status,
                        headers,
                        body,
                    });
                    OK
                }
                None => NOT_FOUND,
            }
        },
    )?;
    // The request is decided when the hook returns: continuing or closing it is implied.
    l.func_wrap("env", "proxy_continue_stream", |_: C<'_>, _: i32| -> i32 {
        OK
    })?;
    l.func_wrap("env", "proxy_close_stream", |_: C<'_>, _: i32| -> i32 {
        OK
    })?;
    l.func_wrap("env", "proxy_continue_request", |_: C<'_>| -> i32 { OK })?;
    l.func_wrap("env", "proxy_continue_response", |_: C<'_>| -> i32 { OK })?;
    l.func_wrap("env", "proxy_done", |_: C<'_>| -> i32 { OK })?;
    l.func_wrap(
        "env",
        "proxy_set_effective_context",
        |_: C<'_>, _: i32| -> i32 { OK },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_status",
        |_: C<'_>, _: i32, _: i32, _: i32| -> i32 { NOT_FOUND },
    )?;
    // Shared data: none (each instance is on its own); queues, callouts, foreign
    // functions: not offered to routing plugins. Each answers one status, whatever its
    // arguments (all i32).
    for (name, params, status) in [
        ("proxy_get_shared_data", 5, NOT_FOUND),
        ("proxy_set_shared_data", 5, UNIMPLEMENTED),
        ("proxy_register_shared_queue", 3, UNIMPLEMENTED),
        ("proxy_resolve_shared_queue", 5, NOT_FOUND),
        ("proxy_dequeue_shared_queue", 3, NOT_FOUND),
        ("proxy_enqueue_shared_queue", 3, NOT_FOUND),
        ("proxy_http_call", 10, UNIMPLEMENTED),
        ("proxy_grpc_call", 12, UNIMPLEMENTED),
        ("proxy_grpc_stream", 9, UNIMPLEMENTED),
        ("proxy_grpc_send", 4, NOT_FOUND),
        ("proxy_grpc_cancel", 1, NOT_FOUND),
        ("proxy_grpc_close", 1, NOT_FOUND),
        ("proxy_call_foreign_function", 6, NOT_FOUND),
    ] {
        let ty = wasmi::FuncType::new(vec![wasmi::ValType::I32; params], [wasmi::ValType::I32]);
        l.func_new("env", name, ty, move |_, _, results| {
            results[0] = wasmi::Val::I32(status);
            Ok(())
        })?;
    }
    Ok(())
}

/// The WASI calls a `wasm32-wasip1` module built with the SDK imports: no environment, no
/// files; what it writes to stdout or stderr goes to the log.
fn wasi(l: &mut Linker<RequestState>) -> Result<(), wasmi::errors::LinkerError> {
    const W: &str = "wasi_snapshot_preview1";
    // No environment variables and no arguments: zero of each.
    for (sizes, get) in [
        ("environ_sizes_get", "environ_get"),
        ("args_sizes_get", "args_get"),
    ] {
        l.func_wrap(W, sizes, |mut c: C<'_>, count: i32, size: i32| -> i32 {
            if write_u32(&mut c, count, 0) && write_u32(&mut c, size, 0) {
                ERRNO_SUCCESS
            } else {
                ERRNO_BADF
            }
        })?;
        l.func_wrap(W, get, |_: C<'_>, _: i32, _: i32| -> i32 { ERRNO_SUCCESS })?;
    }
    l.func_wrap(
        W,
        "fd_write",
        |mut c: C<'_>, fd: i32, iovs: i32, n: i32, written: i32| -> i32 {
            if fd != 1 && fd != 2 {
                return ERRNO_BADF;
            }
            let mut text = Vec::new();
            for k in 0..n.clamp(0, 64) {
                let Some(iov) = read(&c, iovs + k * 8, 8) else {
                    return ERRNO_BADF;
                };
                let ptr = i32::from_le_bytes(iov[..4].try_into().expect("4 bytes"));
                let len = i32::from_le_bytes(iov[4..].try_into().expect("4 bytes"));
                match read(&c, ptr, len.min(64 * 1024)) {
                    Some(b) => text.extend_from_slice(&b),
                    None => return ERRNO_BADF,
                }
            }
            tracing::info!(plugin = %c.data().plugin, fd, "{}", String::from_utf8_lossy(&text).trim_end());
            if write_u32(&mut c, written, text.len() as u32) {
                ERRNO_SUCCESS
            } else {
                ERRNO_BADF
            }
        },
    )?;
    l.func_wrap(
        W,
        "proc_exit",
        |_: C<'_>, code: i32| -> Result<(), wasmi::Error> { Err(wasmi::Error::i32_exit(code)) },
    )?;
    l.func_wrap(W, "random_get", |mut c: C<'_>, ptr: i32, len: i32| -> i32 {
        let bytes: Vec<u8> = (0..len.clamp(0, 1 << 16))
            .map(|_| fastrand::u8(..))
            .collect();
        if write(&mut c, ptr, &bytes) {
            ERRNO_SUCCESS
        } else {
            ERRNO_BADF
        }
    })?;
    l.func_wrap(
        W,
        "clock_time_get",
        |mut c: C<'_>, _id: i32, _precision: i64, ret: i32| -> i32 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            if write(&mut c, ret, &now.to_le_bytes()) {
                ERRNO_SUCCESS
            } else {
                ERRNO_BADF
            }
        },
    )?;
    l.func_wrap(W, "sched_yield", |_: C<'_>| -> i32 { ERRNO_SUCCESS })?;
    l.func_wrap(W, "fd_close", |_: C<'_>, _: i32| -> i32 { ERRNO_BADF })?;
    l.func_wrap(W, "fd_fdstat_get", |_: C<'_>, _: i32, _: i32| -> i32 {
        ERRNO_BADF
    })?;
    l.func_wrap(
        W,
        "fd_seek",
        |_: C<'_>, _: i32, _: i64, _: i32, _: i32| -> i32 { ERRNO_BADF },
    )?;
    Ok(())
}
