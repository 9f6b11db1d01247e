//! Serving, in phases: start accepting; complete a takeover (`--upgrade`); serve upgrades
//! until a shutdown signal or a new process is ready; stop accepting; drain with the
//! deadline; report the final counters (to the new process too).

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::{Proxy, ProxyError};
use crate::admin::{self, AdminState, ListenerAddrs, Readiness};
use crate::drain::{self, DrainWatch};
use crate::inbound::Inbound;
use crate::listener::{spawn_accept_loops, AcceptShared, ConnectionLimit};
use crate::outbound::Outbound;
use crate::routing::{self, RouteServer};
use crate::stats::{Stats, StatsSnapshot};
use crate::upgrade::{self, Adopter, ControlSocket, Offer, Takeover, UpgradeError};
use crate::upstream::UpstreamOptions;

/// How long the end of the drain waits for the last batch of moved connections to be
/// answered when the new process hangs.
const MOVER_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

impl Proxy {
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
        let offer = self.offer()?;
        let (drain, watch) = drain::new();
        let drain_timeout = self.config.drain_timeout;
        let (mut running, takeover, control) = self.start(&watch);
        let stats = running.stats.clone();

        // An upgrade: now that this process accepts, the previous one may stop; its
        // connections move here.
        let (mut predecessor, failed) = match takeover {
            None => (None, None),
            Some(t) => complete_takeover(t, running.adopter.clone()).await,
        };
        if failed.is_none() {
            // The unit's main process from now on (a cold start, or the previous one
            // released its listeners).
            crate::notify::ready();
        }
        // Serve upgrades ourselves until a new process is ready, or until shutdown.
        let (release_tx, release_rx) = oneshot::channel();
        let control_task = match (control, offer, &failed) {
            (Some(c), Some(offer), None) => Some(tokio::spawn(upgrade::serve(
                c,
                offer,
                stats.clone(),
                watch.clone(),
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

        // Stop accepting.
        running.ready.set(Readiness::Draining);
        drain.start();
        running.accept_loops_ended().await;
        if let Some(task) = control_task {
            let _ = task.await; // the copies offered for upgrades are closed too
        }
        if let Some(s) = &successor {
            // The new process serves the admin listener from now on.
            running.stop_admin().await;
            s.released(&stats).await;
            // The connections the previous process still moves here move on with ours,
            // and its final counters belong in ours (it exits by its own deadline).
            if let Some(task) = predecessor.take() {
                let bound = drain_timeout + upgrade::HANDOFF_TIMEOUT;
                let _ = tokio::time::timeout(bound, task).await;
            }
        }

        // Drain; with a successor, move the opaque connections to it.
        let open = drain.close();
        info!(
            open_connections = open,
            drain_timeout_ms = drain_timeout.as_millis() as u64,
            handed_over_to = successor.as_ref().map(|s| s.pid()),
            "stopped accepting; draining"
        );
        let started = std::time::Instant::now();
        let cut_at = tokio::time::Instant::now() + drain_timeout;
        let mover = successor.map(|mut s| {
            let offers = drain.start_moving();
            let deadline = watch.deadline();
            tokio::spawn(async move {
                let report = s.move_connections(offers, deadline, cut_at).await;
                (s, report)
            })
        });
        let deadline = watch.deadline();
        let cut = drain.wait(drain_timeout).await;
        stats.drain_cut_connections.fetch_add(cut as u64, Relaxed);
        drain::stop_moving(&deadline);
        let successor = match mover {
            // Every connection has ended here: the last batch is answered, unless the new
            // process hangs (then its final counters are not sent).
            Some(task) => match tokio::time::timeout(MOVER_GRACE, task).await {
                Ok(Ok((s, report))) => {
                    stats
                        .upgrade_moved_connections
                        .fetch_add(report.moved, Relaxed);
                    info!(
                        moved_connections = report.moved,
                        kept_connections = report.kept,
                        unconfirmed_connections = report.unconfirmed,
                        batches = report.batches,
                        drained_ms = started.elapsed().as_millis() as u64,
                        "connections moved to the new process; nothing left to drain"
                    );
                    Some(s)
                }
                Ok(Err(_)) => None,
                Err(_) => {
                    error!("the new process does not answer a batch of moved connections; exiting without waiting");
                    None
                }
            },
            None => None,
        };
        running.stop_admin().await;
        if let Some(task) = predecessor {
            // Its final counters belong in ours (it exits by its own drain deadline).
            let bound = drain_timeout + upgrade::HANDOFF_TIMEOUT;
            let _ = tokio::time::timeout(bound, task).await;
        }

        // Report.
        running.stop_background();
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

    /// Copies of the listening sockets, to offer a new process (with `--upgrade-socket`).
    fn offer(&self) -> Result<Option<Offer>, ProxyError> {
        let Some(control) = &self.control else {
            return Ok(None);
        };
        let ids = (self.outbound.iter().enumerate())
            .map(|(i, l)| (upgrade::outbound_id(i), l.as_fd()))
            .chain(
                (self.inbound.iter().enumerate()).map(|(i, l)| (upgrade::inbound_id(i), l.as_fd())),
            )
            .chain(
                self.admin
                    .iter()
                    .map(|l| (upgrade::ADMIN_ID.to_owned(), l.as_fd())),
            );
        let offer = Offer::new(ids).map_err(|error| UpgradeError::Io {
            path: control.path().to_owned(),
            what: "copying the listeners to offer them",
            error,
        })?;
        Ok(Some(offer))
    }

    /// Starts accepting on every listener (connections tracked by `drain`), the admin
    /// server, the route watcher and the idle-destination eviction; says ready. Returns
    /// what runs, and the parts of an upgrade still to do.
    fn start(self, drain: &DrainWatch) -> (Running, Option<Takeover>, Option<ControlSocket>) {
        let outbound_addrs = self.outbound_addrs();
        let inbound_addrs = self.inbound_addrs();
        let admin_addr = self.admin_addr();
        let Proxy {
            config,
            outbound,
            inbound,
            admin,
            control,
            takeover,
            routing,
            stats,
            ready,
            lookup,
        } = self;
        let routes = routing.path().is_some().then(|| {
            Arc::new(RouteServer::new(
                routing.clone(),
                stats.clone(),
                UpstreamOptions {
                    bypass_mark: config.bypass_mark,
                    source: None,
                    connect_timeout: config.connect_timeout,
                    idle_timeout: config.tcp_idle_timeout,
                },
                routing::HttpTimeouts {
                    header: config.http_header_timeout,
                    idle: config.http_idle_timeout,
                },
                config.dubbo_max_body,
            ))
        });
        let outbound_ctx = Arc::new(Outbound {
            listeners: outbound_addrs.clone(),
            bypass_mark: config.bypass_mark,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.tcp_idle_timeout,
            stats: stats.clone(),
            lookup,
            routes,
        });
        let inbound_ctx = Arc::new(Inbound {
            own_ports: own_ports(&outbound_addrs, &inbound_addrs, admin_addr),
            source_v4: config.inbound_source,
            source_v6: config.inbound_source6,
            bypass_mark: config.bypass_mark,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.tcp_idle_timeout,
            stats: stats.clone(),
        });
        let route_watcher = tokio::spawn(routing::watch(routing.clone()));

        if let Some(t) = &takeover {
            // Totals continue the previous process's.
            stats.add_delta(&StatsSnapshot::default(), &t.stats);
            stats.add_histogram_delta(&[], &t.histograms);
        }
        let shared = AcceptShared {
            limit: ConnectionLimit::new(crate::limits::effective_max_connections(
                config.max_connections,
            )),
            stats: stats.clone(),
        };
        let max_connections = shared.limit.max();
        let mut accept_loops = spawn_accept_loops(outbound, outbound_ctx, &shared, drain);
        accept_loops.extend(spawn_accept_loops(inbound, inbound_ctx, &shared, drain));
        let stop_admin = CancellationToken::new();
        let admin_task = admin.map(|l| {
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
            max_connections,
            "proxy ready"
        );
        let adopter = Adopter {
            drain: drain.clone(),
            limit: shared.limit.clone(),
            stats: stats.clone(),
            idle_timeout: config.tcp_idle_timeout,
        };
        let running = Running {
            adopter,
            stats,
            ready,
            accept_loops,
            admin_task,
            stop_admin,
            evictor,
            route_watcher,
        };
        (running, takeover, control)
    }
}

/// Ports of all of the proxy's own listeners, sorted, once each.
fn own_ports(
    outbound: &[SocketAddr],
    inbound: &[SocketAddr],
    admin: Option<SocketAddr>,
) -> Vec<u16> {
    let mut ports: Vec<u16> = outbound
        .iter()
        .chain(inbound)
        .chain(&admin)
        .map(|a| a.port())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Tells the previous process that this one accepts; on success, follows it until it has
/// drained, taking over the connections it moves. A failure is returned to stop this
/// process the ordinary way.
async fn complete_takeover(
    t: Takeover,
    adopter: Adopter,
) -> (Option<JoinHandle<()>>, Option<UpgradeError>) {
    match t.complete(&adopter.stats).await {
        Ok(p) => (Some(tokio::spawn(p.follow(adopter))), None),
        Err(e) => {
            error!(error = %e, "upgrade failed after this process started accepting; stopping");
            (None, Some(e))
        }
    }
}

/// What a serving proxy runs besides its connections.
struct Running {
    adopter: Adopter,
    stats: Arc<Stats>,
    ready: Arc<admin::ReadyState>,
    accept_loops: Vec<JoinHandle<()>>,
    admin_task: Option<JoinHandle<()>>,
    stop_admin: CancellationToken,
    evictor: JoinHandle<()>,
    route_watcher: JoinHandle<()>,
}

impl Running {
    /// Waits until every accept loop has returned after the drain started: each closed its
    /// listener (closed, never shut down: it may be shared with a new process).
    async fn accept_loops_ended(&mut self) {
        for task in self.accept_loops.drain(..) {
            let _ = task.await;
        }
    }

    /// Stops the admin server (once; a second call does nothing).
    async fn stop_admin(&mut self) {
        self.stop_admin.cancel();
        if let Some(task) = self.admin_task.take() {
            let _ = task.await;
        }
    }

    /// Stops the route watcher and the idle-destination eviction.
    fn stop_background(self) {
        self.evictor.abort();
        self.route_watcher.abort();
    }
}

/// The last log line: every counter.
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
