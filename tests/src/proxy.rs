//! Starting `interceptor-proxy` in a namespace and reading its admin endpoints.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::bins::proxy_bin;
use crate::netns::NetNs;
use crate::probe::{http_get, ProbeError};
use crate::process::{spawn_in, Proc};

/// The proxy's default admin address (GET /ready, GET /stats).
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";

const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET http://<addr><path>` from inside `ns` (on a helper thread that entered it).
/// Returns status and body.
pub fn http_get_in(
    ns: &NetNs,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), ProbeError> {
    ns.in_ns(|| http_get(addr, path, timeout))
}

fn admin_of(args: &[&str]) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if *a == "--admin" {
            return it.next().map(|v| v.to_string());
        }
        if let Some(v) = a.strip_prefix("--admin=") {
            return Some(v.to_string());
        }
    }
    None
}

/// Starts `interceptor-proxy EXTRA_ARGS...` inside `ns` (not in any test cgroup, so
/// its own connections are never intercepted by cgroup scope), adding
/// `--admin 127.0.0.1:15000` unless `extra_args` has `--admin`, and waits (up to 10 s)
/// until `GET /ready` answers 2xx. Panics with the proxy's stderr if it exits or
/// does not become ready.
pub fn start_proxy(ns: &NetNs, extra_args: &[&str]) -> Proc {
    let bin = proxy_bin();
    let bin = bin.to_str().expect("proxy path is UTF-8");
    let mut cmd = vec![bin];
    cmd.extend_from_slice(extra_args);
    let admin = admin_of(extra_args);
    if admin.is_none() {
        cmd.extend_from_slice(&["--admin", DEFAULT_ADMIN]);
    }
    let admin = admin.unwrap_or_else(|| DEFAULT_ADMIN.to_string());
    let mut p = spawn_in(ns, None, &cmd);
    if let Err(why) = wait_proxy_ready(ns, &mut p, &admin, READY_TIMEOUT) {
        panic!(
            "interceptor-proxy in {} not ready: {why}\n---- stderr ----\n{}",
            ns.name(),
            p.stderr()
        );
    }
    p
}

/// Polls `GET /ready` on `admin` inside `ns` until it answers 2xx, `proxy` exits,
/// or `timeout` passes.
pub fn wait_proxy_ready(
    ns: &NetNs,
    proxy: &mut Proc,
    admin: &str,
    timeout: Duration,
) -> Result<(), String> {
    let addr: SocketAddr = admin
        .parse()
        .map_err(|e| format!("bad admin address {admin:?}: {e}"))?;
    let deadline = Instant::now() + timeout;
    let mut last: String;
    loop {
        if let Some(st) = proxy.try_status() {
            return Err(format!("exited with {st}"));
        }
        match http_get_in(ns, addr, "/ready", Duration::from_millis(500)) {
            Ok((code, _)) if (200..300).contains(&code) => return Ok(()),
            Ok((code, body)) => last = format!("GET /ready -> {code} {}", body.trim()),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(format!("after {timeout:?}: {last}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET /stats` on the proxy's admin address inside `ns`, parsed as JSON.
/// Panics on failure or non-2xx.
pub fn proxy_stats(ns: &NetNs, admin: &str) -> serde_json::Value {
    let addr: SocketAddr = admin
        .parse()
        .unwrap_or_else(|e| panic!("bad admin address {admin:?}: {e}"));
    let (code, body) = http_get_in(ns, addr, "/stats", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("GET {admin}/stats in {}: {e}", ns.name()));
    assert!(
        (200..300).contains(&code),
        "GET {admin}/stats -> {code}: {body}"
    );
    serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("GET {admin}/stats is not JSON ({e}): {body}"))
}
