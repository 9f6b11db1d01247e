//! The route server: serves a connection to a routed service port by the port's protocol.
//! `AUTO` ports are classified from the client's first bytes (for up to
//! `--protocol-detection-timeout`) and go opaque when the client says nothing.
//!
//! | file | protocol |
//! |---|---|
//! | `http.rs` | HTTP/1.1, HTTP/2, gRPC: each request routed on its own |
//! | `dubbo.rs` | Dubbo 2: each request routed on its own, onto pooled upstream connections |
//! | `tls.rs` | TLS: by the ClientHello's SNI, passed through untouched |
//! | `tcp.rs` | TCP: opaque, to one of the service's endpoints |

pub mod dubbo;
pub mod http;
pub mod tcp;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::net::TcpStream;

use self::dubbo::DubboRouter;
use self::http::{HttpRouter, HttpTimeouts};
use super::detect::{self, Detected};
use super::file::Protocol;
use super::reload::Routing;
use super::table::PortPlan;
use crate::stats::Stats;
use crate::upstream::UpstreamOptions;

/// Serves connections to routed service ports; shared by every such connection of one
/// proxy.
pub struct RouteServer {
    /// The routes in force.
    pub routing: Arc<Routing>,
    /// The proxy's counters (routed connections count as outbound).
    pub stats: Arc<Stats>,
    /// How upstream connections are made.
    pub opts: UpstreamOptions,
    http: Arc<HttpRouter>,
    dubbo: Arc<DubboRouter>,
}

impl std::fmt::Debug for RouteServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteServer").finish_non_exhaustive()
    }
}

impl RouteServer {
    pub fn new(
        routing: Arc<Routing>,
        stats: Arc<Stats>,
        opts: UpstreamOptions,
        http: HttpTimeouts,
        dubbo_max_body: u32,
    ) -> Self {
        RouteServer {
            http: Arc::new(HttpRouter::new(routing.clone(), opts, http)),
            dubbo: Arc::new(DubboRouter::new(routing.clone(), opts, dubbo_max_body)),
            routing,
            stats,
            opts,
        }
    }

    /// Handles a connection to a routed service port, by the port's protocol.
    pub async fn handle(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        orig_dst: SocketAddr,
        plan: PortPlan,
        workload: Option<String>,
    ) {
        let proto = match plan.protocol {
            Protocol::Auto => {
                let mut buf = [0u8; 32];
                match detect::detect(&client, self.routing.detection_timeout, &mut buf)
                    .await
                    .0
                {
                    Detected::Http1 | Detected::Http2 => Protocol::Http,
                    Detected::Tls => Protocol::Tls,
                    Detected::Dubbo => Protocol::Dubbo,
                    Detected::Opaque => Protocol::Tcp,
                }
            }
            p => p,
        };
        match proto {
            Protocol::Http | Protocol::Http2 | Protocol::Grpc => {
                self.stats.outbound.forwarded_total.fetch_add(1, Relaxed);
                self.http
                    .clone()
                    .serve(client, peer, orig_dst, plan, workload)
                    .await
            }
            Protocol::Dubbo => {
                self.stats.outbound.forwarded_total.fetch_add(1, Relaxed);
                self.dubbo
                    .clone()
                    .serve(client, peer, orig_dst, plan, workload)
                    .await
            }
            Protocol::Tls => {
                tls::serve(
                    client,
                    peer,
                    orig_dst,
                    &plan,
                    &self.routing,
                    &self.opts,
                    &self.stats,
                )
                .await
            }
            Protocol::Tcp | Protocol::Auto => {
                tcp::serve(
                    client,
                    peer,
                    orig_dst,
                    &plan,
                    &self.routing,
                    &self.opts,
                    &self.stats,
                )
                .await
            }
        }
    }
}
