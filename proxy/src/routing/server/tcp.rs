//! Opaque TCP connections to a routed service port: forwarded to one of the service's
//! own endpoints (or the original destination when it lists none).

use std::net::SocketAddr;

use tokio::net::TcpStream;

use crate::routing::reload::Routing;
use crate::routing::table::PortPlan;
use crate::stats::{Direction, Stats};
use crate::upstream::{connect_and_forward, UpstreamOptions};

/// Picks one of the service's endpoints and forwards the connection there.
pub async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    orig_dst: SocketAddr,
    plan: &PortPlan,
    routing: &Routing,
    opts: &UpstreamOptions,
    stats: &Stats,
) {
    let dst = routing.current().default_endpoint(plan, orig_dst);
    connect_and_forward(client, peer, dst, |_| *opts, stats, Direction::Outbound).await
}
