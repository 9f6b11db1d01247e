//! TLS connections to a routed service port: the ClientHello's SNI picks a TLS rule (its
//! weighted clusters), else the service's own endpoints; the bytes pass untouched.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::debug;

use crate::routing::balance::pick_weighted;
use crate::routing::detect;
use crate::routing::reload::Routing;
use crate::routing::table::PortPlan;
use crate::stats::{Direction, Stats};
use crate::upstream::{connect_and_forward, UpstreamOptions};

/// Peeks at the SNI, picks the upstream and forwards the connection there untouched.
pub async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    orig_dst: SocketAddr,
    plan: &PortPlan,
    routing: &Routing,
    opts: &UpstreamOptions,
    stats: &Stats,
) {
    let sni = detect::peek_sni(&client, Duration::from_secs(10)).await;
    let table = routing.current();
    let rule = sni.as_deref().and_then(|s| {
        table
            .tls_rules(plan)
            .iter()
            .find(|r| r.sni.iter().any(|h| h == s))
    });
    let dst = match rule {
        Some(r) => pick_weighted(&r.clusters, r.total_weight)
            .pick(&[])
            .map_or(orig_dst, |e| e.addr),
        None => table.default_endpoint(plan, orig_dst),
    };
    debug!(client = %peer, sni = ?sni, upstream = %dst, "TLS passthrough");
    connect_and_forward(client, peer, dst, |_| *opts, stats, Direction::Outbound).await
}
