//! `interceptor-proxy`: the companion proxy of the eBPF interception programs.
//!
//! The kernel programs redirect a workload's `connect()` to the outbound listener
//! (default 127.0.0.1:15001 and \[::1\]:15001) and answer `getsockopt(SO_ORIGINAL_DST)` on
//! the accepted socket. For each accepted connection this proxy:
//!
//! 1. asks for the original destination with that ordinary getsockopt ([`original_dst`]);
//! 2. refuses connections that were not intercepted or point back at itself;
//! 3. with `--routes`, hands connections to a service address to the route server
//!    ([`routing`]): HTTP/1.1, HTTP/2 and gRPC requests routed one by one, TLS by SNI;
//! 4. otherwise connects upstream from a socket carrying the bypass mark (SO_MARK, default
//!    0x539), which the kernel programs let through ([`upstream`]), and copies both ways
//!    with half-close and reset propagation ([`forward`]).
//!
//! With `--inbound`, it also accepts connections that the kernel's `sk_lookup` program
//! steers to the inbound listener for the workload's ports ([`inbound`]): the accepted
//! socket's local address is the original destination, and the proxy forwards there
//! from the inbound source address (default 127.0.0.6 / ::1). Both directions share the
//! accept loop ([`listener`]), the upstream connect and the copy loop.
//!
//! On SIGTERM/SIGINT it stops accepting and drains its connections until a deadline
//! ([`drain`]). With `--upgrade-socket` a new process can take over its listening sockets
//! and counters without refusing a connection, and its established opaque connections
//! without breaking one ([`upgrade`]); the old one then drains what is left and exits.
//!
//! Use [`Proxy::bind`] then [`Proxy::serve`], or [`run`] which does both and stops on
//! SIGTERM/SIGINT. Counters are in [`stats`], rendered for Prometheus by [`metrics`] and
//! served with the rest of the admin API by [`admin`]; the command line is [`config`].
// Two system calls have no safe wrapper: getsockopt and setsockopt with the kernel programs'
// own options (`original_dst::getsockopt`, for SO_ORIGINAL_DST, SO_ICP_WORKLOAD and the
// kernel-forwarding counts; `kforward::setsockopt`, for the kernel-forwarding requests).
#![deny(unsafe_code)]

pub mod admin;
pub mod config;
pub mod drain;
pub mod forward;
pub mod inbound;
pub mod kforward;
pub mod kwatch;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod notify;
pub mod original_dst;
pub mod outbound;
mod proxy;
pub mod restart;
pub mod routing;
pub mod stats;
pub mod telemetry;
pub mod upgrade;
pub mod upstream;
pub mod wasm;

use std::future::Future;
use std::io;

use tracing::info;

pub use config::{Config, ConfigError, LogFormat};
pub use outbound::OriginalDstLookup;
pub use proxy::{Proxy, ProxyError};
pub use stats::{DirectionSnapshot, DirectionStats, Stats, StatsSnapshot};

/// Binds, serves until SIGTERM or SIGINT, drains, and returns the final counters.
pub async fn run(config: Config) -> Result<StatsSnapshot, ProxyError> {
    let signals = shutdown_signals().map_err(ProxyError::Signal)?;
    let proxy = Proxy::bind(config).await?;
    proxy.serve(signals).await
}

/// Installs SIGTERM and SIGINT handlers now; the returned future completes on either.
pub fn shutdown_signals() -> io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(signal = name, "shutdown signal received");
    })
}

/// Builds the runtime for `workers` threads (1 = current-thread runtime).
pub fn runtime(workers: usize) -> io::Result<tokio::runtime::Runtime> {
    if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("interceptor-proxy")
            .enable_all()
            .build()
    }
}
