//! `interceptor-proxy`: the companion proxy of the eBPF interception programs.
//!
//! The kernel programs redirect a workload's `connect()` to the outbound listener
//! (default 127.0.0.1:15001 and [::1]:15001) and answer `getsockopt(SO_ORIGINAL_DST)` on
//! the accepted socket. For each accepted connection this proxy:
//!
//! 1. asks for the original destination with that ordinary getsockopt ([`original_dst`]);
//! 2. refuses connections that were not intercepted or point back at itself;
//! 3. connects upstream from a socket carrying the bypass mark (SO_MARK, default 0x539),
//!    which the kernel programs let through;
//! 4. copies both ways with half-close and reset propagation ([`forward`]).
//!
//! With `--inbound`, it also accepts connections that the kernel's `sk_lookup` program
//! steers to the inbound listener for the workload's ports ([`inbound`]): the accepted
//! socket's local address is the original destination, and the proxy forwards there
//! from the inbound source address (default 127.0.0.6 / ::1). Both directions share the
//! accept loop, the upstream connect and the copy loop ([`conn`]).
//!
//! Use [`Proxy::bind`] then [`Proxy::serve`], or [`run`] which does both and stops on
//! SIGTERM/SIGINT. Counters are in [`stats`]; the admin server in [`admin`].
// One system call has no safe wrapper: the getsockopt of the calling workload
// (`original_dst::calling_workload`).
#![deny(unsafe_code)]

pub mod admin;
pub mod config;
pub mod conn;
pub mod forward;
pub mod inbound;
pub mod metrics;
pub mod original_dst;
pub mod outbound;
pub mod routing;
pub mod stats;
pub mod telemetry;
pub mod upgrade;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use std::os::fd::AsFd as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tracing::{error, info, warn};

pub use config::{Config, ConfigError, LogFormat};
pub use outbound::OriginalDstLookup;
pub use stats::{DirectionSnapshot, DirectionStats, Stats, StatsSnapshot};

use admin::{AdminState, ListenerAddrs, Readiness, ReadyState};
use conn::bind_listener;
use inbound::Inbound;
use outbound::Outbound;
use upgrade::{ControlSocket, Inherited, Offer, Takeover, UpgradeError};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A listener could not be bound.
    #[error("{what} {addr}: {}", describe_bind_error(what, error))]
    Bind {
        /// "outbound listener", "inbound listener" or "admin listener".
        what: &'static str,
        addr: SocketAddr,
        error: io::Error,
    },
    /// Every outbound listener was skipped (IPv6 unavailable and nothing else configured).
    #[error("no outbound listener could be bound; pass --outbound with an address this host has, e.g. 127.0.0.1:15001")]
    NoOutboundListeners,
    /// The bypass mark cannot be set on upstream sockets.
    #[error(
        "--bypass-mark {mark:#x}: cannot set SO_MARK on upstream sockets ({error}); upstream \
         connections would be intercepted again. Run the proxy with CAP_NET_ADMIN, or pass \
         --bypass-mark 0 if the proxy is exempt from interception another way (e.g. its uid)"
    )]
    BypassMark { mark: u32, error: io::Error },
    /// Signal handlers could not be installed.
    #[error("installing SIGTERM/SIGINT handlers: {0}")]
    Signal(io::Error),
    /// The routing file could not be loaded.
    #[error("{0}; fix the file given with --routes")]
    Routes(#[from] routing::RoutesError),
    /// Taking over from the running proxy, or serving upgrades, failed.
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
}

fn describe_bind_error(what: &str, e: &io::Error) -> String {
    let flag = if what.starts_with("admin") {
        "--admin ADDR or --admin off"
    } else if what.starts_with("inbound") {
        "--inbound ADDR"
    } else {
        "--outbound ADDR"
    };
    match e.kind() {
        io::ErrorKind::AddrInUse => "address already in use (is another proxy running?)".to_owned(),
        io::ErrorKind::AddrNotAvailable => {
            format!("address not available on this host ({e}); choose a local address with {flag}")
        }
        io::ErrorKind::PermissionDenied => format!(
            "permission denied ({e}); ports below 1024 need CAP_NET_BIND_SERVICE, or choose another port with {flag}"
        ),
        _ => format!("{e}; check the address given with {flag}"),
    }
}

fn is_ipv6_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
    )
}

/// A proxy whose listeners are bound but which does not accept yet.
pub struct Proxy {
    config: Config,
    listeners: Vec<TcpListener>,
    inbound: Vec<TcpListener>,
    admin: Option<TcpListener>,
    control: Option<ControlSocket>,
    takeover: Option<Takeover>,
    routing: Arc<routing::Routing>,
    stats: Arc<Stats>,
    ready: Arc<ReadyState>,
    lookup: OriginalDstLookup,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("outbound", &self.outbound_addrs())
            .field("inbound", &self.inbound_addrs())
            .field("admin", &self.admin_addr())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Checks the bypass mark and binds the outbound, inbound and admin listeners. Must
    /// be called inside a tokio runtime. Port 0 in an address picks a free port (see
    /// [`Proxy::outbound_addrs`], [`Proxy::inbound_addrs`]).
    ///
    /// With `--upgrade`, first takes over the listening sockets of the proxy serving
    /// upgrades on `--upgrade-socket` (see [`upgrade`]); listeners it does not pass are
    /// bound here. Nothing is accepted before [`Proxy::serve`].
    pub async fn bind(config: Config) -> Result<Proxy, ProxyError> {
        let routing = Arc::new(match &config.routes {
            Some(path) => routing::Routing::load(path, config.protocol_detection_timeout)?,
            None => routing::Routing::none(),
        });
        let (takeover, mut inherited) = match (&config.upgrade_socket, config.upgrade) {
            (Some(path), true) => {
                let (t, i) = upgrade::take_over(path).await?;
                (Some(t), i)
            }
            _ => (None, Inherited::default()),
        };
        let control = match &config.upgrade_socket {
            None => None,
            Some(path) => Some(match inherited.control(path)? {
                Some(c) => c,
                None if inherited.is_upgrade() => {
                    return Err(UpgradeError::Protocol {
                        path: path.clone(),
                        reason: "the running proxy did not pass its upgrade socket".to_owned(),
                    }
                    .into())
                }
                None => ControlSocket::bind(path)?,
            }),
        };
        let mut listeners = Vec::with_capacity(config.outbound.len());
        for (i, &addr) in config.outbound.iter().enumerate() {
            let bound = match inherited.tcp_listener(&upgrade::outbound_id(i), addr) {
                Some(l) => Ok(l),
                None => bind_listener(addr),
            };
            match bound.and_then(TcpListener::from_std) {
                Ok(l) => listeners.push(l),
                Err(e)
                    if addr.is_ipv6()
                        && config.outbound_ipv6_optional
                        && is_ipv6_unavailable(&e) =>
                {
                    warn!(listener = %addr, error = %e, "IPv6 unavailable on this host; skipping this outbound listener");
                }
                Err(error) => {
                    return Err(ProxyError::Bind {
                        what: "outbound listener",
                        addr,
                        error,
                    })
                }
            }
        }
        if listeners.is_empty() {
            return Err(ProxyError::NoOutboundListeners);
        }
        let inbound = config
            .inbound
            .iter()
            .enumerate()
            .map(|(i, &addr)| {
                inherited
                    .tcp_listener(&upgrade::inbound_id(i), addr)
                    .map_or_else(|| bind_listener(addr), Ok)
                    .and_then(TcpListener::from_std)
                    .map_err(|error| ProxyError::Bind {
                        what: "inbound listener",
                        addr,
                        error,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if config.bypass_mark != 0 {
            let domain = if config.outbound[0].is_ipv6() {
                Domain::IPV6
            } else {
                Domain::IPV4
            };
            Socket::new(domain, Type::STREAM, Some(Protocol::TCP))
                .and_then(|s| s.set_mark(config.bypass_mark))
                .map_err(|error| ProxyError::BypassMark {
                    mark: config.bypass_mark,
                    error,
                })?;
        }
        let admin = match config.admin {
            None => None,
            Some(addr) => Some(
                inherited
                    .tcp_listener(upgrade::ADMIN_ID, addr)
                    .map_or_else(|| bind_listener(addr), Ok)
                    .and_then(TcpListener::from_std)
                    .map_err(|error| ProxyError::Bind {
                        what: "admin listener",
                        addr,
                        error,
                    })?,
            ),
        };
        inherited.close_rest();
        let stats = Arc::new(Stats {
            destinations: stats::Destinations::new(
                config.destination_stats,
                config.destination_limits,
            ),
            ..Stats::default()
        });
        Ok(Proxy {
            config,
            listeners,
            inbound,
            admin,
            control,
            takeover,
            routing,
            stats,
            ready: Arc::default(),
            lookup: outbound::getsockopt_lookup(),
        })
    }

    /// The bound outbound listener addresses (IPv6 ones may have been skipped).
    pub fn outbound_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The bound inbound listener addresses (empty without `--inbound`).
    pub fn inbound_addrs(&self) -> Vec<SocketAddr> {
        self.inbound
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The bound admin address, if the admin server is enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The live counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The configuration the proxy was bound with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Replaces how original destinations are found (default: getsockopt). For tests, and
    /// for embedding behind something that records destinations differently.
    pub fn set_original_dst_lookup(&mut self, lookup: OriginalDstLookup) {
        self.lookup = lookup;
    }

    /// Serves until `shutdown` completes, or until a new process has taken over the
    /// listeners (see [`upgrade`]); then stops accepting (closes its listeners), lets open
    /// connections finish for up to `drain_timeout`, closes what is left and returns the
    /// final counters. A process that was started with `--upgrade` first completes the
    /// hand-off; if that fails after it started accepting, it stops the same way and
    /// returns the error.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<StatsSnapshot, ProxyError> {
        let outbound_addrs = self.outbound_addrs();
        let inbound_addrs = self.inbound_addrs();
        let admin_addr = self.admin_addr();
        let Proxy {
            config,
            listeners,
            inbound,
            admin,
            control,
            takeover,
            routing,
            stats,
            ready,
            lookup,
        } = self;
        let offer = match &control {
            None => None,
            Some(c) => {
                let ids = (listeners.iter().enumerate())
                    .map(|(i, l)| (upgrade::outbound_id(i), l.as_fd()))
                    .chain(
                        (inbound.iter().enumerate())
                            .map(|(i, l)| (upgrade::inbound_id(i), l.as_fd())),
                    )
                    .chain(
                        admin
                            .iter()
                            .map(|l| (upgrade::ADMIN_ID.to_owned(), l.as_fd())),
                    );
                Some(Offer::new(ids).map_err(|error| UpgradeError::Io {
                    path: c.path().to_owned(),
                    what: "copying the listeners to offer them",
                    error,
                })?)
            }
        };
        let routes = routing.path().is_some().then(|| {
            Arc::new(routing::RouteServer::new(
                routing.clone(),
                stats.clone(),
                conn::UpstreamOptions {
                    bypass_mark: config.bypass_mark,
                    source: None,
                    connect_timeout: config.connect_timeout,
                },
            ))
        });
        let outbound_ctx = Arc::new(Outbound {
            listeners: outbound_addrs.clone(),
            bypass_mark: config.bypass_mark,
            connect_timeout: config.connect_timeout,
            stats: stats.clone(),
            lookup,
            routes,
        });
        let route_watcher = tokio::spawn(routing::watch(routing.clone()));
        let mut own_ports: Vec<u16> = outbound_addrs
            .iter()
            .chain(&inbound_addrs)
            .chain(&admin_addr)
            .map(|a| a.port())
            .collect();
        own_ports.sort_unstable();
        own_ports.dedup();
        let inbound_ctx = Arc::new(Inbound {
            own_ports,
            source_v4: config.inbound_source,
            source_v6: config.inbound_source6,
            bypass_mark: config.bypass_mark,
            connect_timeout: config.connect_timeout,
            stats: stats.clone(),
        });

        let stop_accepting = CancellationToken::new();
        let kill = CancellationToken::new();
        let stop_admin = CancellationToken::new();
        let tracker = TaskTracker::new();

        if let Some(t) = &takeover {
            // Totals continue the previous process's.
            stats.add_delta(&StatsSnapshot::default(), &t.stats);
            stats.add_histogram_delta(&[], &t.histograms);
        }
        let mut accept_loops = Vec::with_capacity(listeners.len() + inbound.len());
        for l in listeners {
            accept_loops.push(tokio::spawn(conn::accept_loop(
                l,
                outbound_ctx.clone(),
                tracker.clone(),
                stop_accepting.clone(),
                kill.clone(),
            )));
        }
        for l in inbound {
            accept_loops.push(tokio::spawn(conn::accept_loop(
                l,
                inbound_ctx.clone(),
                tracker.clone(),
                stop_accepting.clone(),
                kill.clone(),
            )));
        }
        let mut admin_task = admin.map(|l| {
            let state = AdminState::new(
                stats.clone(),
                ready.clone(),
                ListenerAddrs {
                    outbound: outbound_addrs.clone(),
                    inbound: inbound_addrs.clone(),
                },
                config.to_json(),
                routing.clone(),
            );
            tokio::spawn(admin::serve(l, state, stop_admin.clone()))
        });
        let evictor = {
            let stats = stats.clone();
            tokio::spawn(async move { stats.destinations.evict_idle_loop().await })
        };
        ready.set(Readiness::Ready);
        info!(
            outbound = ?outbound_addrs,
            inbound = ?inbound_addrs,
            inbound_source = %config.inbound_source,
            inbound_source6 = %config.inbound_source6,
            admin = %admin_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
            upgrade_socket = %control.as_ref().map_or_else(|| "off".to_owned(), |c| c.path().display().to_string()),
            bypass_mark = %format_args!("{:#x}", config.bypass_mark),
            connect_timeout_ms = config.connect_timeout.as_millis() as u64,
            "proxy ready"
        );

        // An upgrade: now that this process accepts, the previous one may stop.
        let mut failed = None;
        let mut predecessor = None;
        if let Some(t) = takeover {
            match t.complete(&stats).await {
                Ok(p) => predecessor = Some(tokio::spawn(p.follow(stats.clone()))),
                Err(e) => {
                    error!(error = %e, "upgrade failed after this process started accepting; stopping");
                    failed = Some(e);
                }
            }
        }
        let (release_tx, release_rx) = oneshot::channel();
        let control_task = match (control, offer, &failed) {
            (Some(c), Some(offer), None) => Some(tokio::spawn(upgrade::serve(
                c,
                offer,
                stats.clone(),
                stop_accepting.clone(),
                release_tx,
            ))),
            _ => None,
        };

        let successor = if failed.is_some() {
            None
        } else {
            tokio::select! {
                _ = shutdown => None,
                Ok(s) = release_rx => Some(s),
            }
        };

        ready.set(Readiness::Draining);
        stop_accepting.cancel();
        for task in accept_loops {
            let _ = task.await; // the listener is closed, never shut down: it may be shared
        }
        if let Some(task) = control_task {
            let _ = task.await; // the copies offered for upgrades are closed too
        }
        if let Some(s) = &successor {
            // The new process serves the admin listener from now on.
            stop_admin.cancel();
            if let Some(task) = admin_task.take() {
                let _ = task.await;
            }
            s.released(&stats).await;
        }
        tracker.close();
        let open = tracker.len();
        info!(
            open_connections = open,
            drain_timeout_ms = config.drain_timeout.as_millis() as u64,
            handed_over_to = successor.as_ref().map(|s| s.pid()),
            "stopped accepting; draining"
        );
        if tokio::time::timeout(config.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                open_connections = tracker.len(),
                "drain timeout reached; closing remaining connections"
            );
            kill.cancel();
            tracker.wait().await;
        }
        stop_admin.cancel();
        if let Some(task) = admin_task {
            let _ = task.await;
        }
        if let Some(task) = predecessor {
            // Its final counters belong in ours (it exits by its own drain deadline).
            let bound = config.drain_timeout + upgrade::HANDOFF_TIMEOUT;
            let _ = tokio::time::timeout(bound, task).await;
        }

        evictor.abort();
        route_watcher.abort();
        let snapshot = stats.snapshot();
        if let Some(s) = &successor {
            s.exited(&stats).await;
        }
        log_final(&snapshot);
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(snapshot),
        }
    }
}

fn log_final(snapshot: &StatsSnapshot) {
    let (s, i) = (&snapshot.outbound, &snapshot.inbound);
    info!(
        connections_total = s.connections_total,
        connections_active = s.connections_active,
        forwarded_total = s.forwarded_total,
        orig_dst_missing = snapshot.orig_dst_missing,
        loop_rejected = s.loop_rejected,
        upstream_connect_errors_refused = s.upstream_connect_errors_refused,
        upstream_connect_errors_timeout = s.upstream_connect_errors_timeout,
        upstream_connect_errors_other = s.upstream_connect_errors_other,
        bytes_client_to_upstream = s.bytes_client_to_upstream,
        bytes_upstream_to_client = s.bytes_upstream_to_client,
        inbound_connections_total = i.connections_total,
        inbound_connections_active = i.connections_active,
        inbound_forwarded_total = i.forwarded_total,
        inbound_loop_rejected = i.loop_rejected,
        inbound_upstream_connect_errors_refused = i.upstream_connect_errors_refused,
        inbound_upstream_connect_errors_timeout = i.upstream_connect_errors_timeout,
        inbound_upstream_connect_errors_other = i.upstream_connect_errors_other,
        inbound_bytes_client_to_upstream = i.bytes_client_to_upstream,
        inbound_bytes_upstream_to_client = i.bytes_upstream_to_client,
        "proxy stopped"
    );
}

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
