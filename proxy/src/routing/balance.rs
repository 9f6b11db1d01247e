//! Load balancing: a cluster's endpoints picked round robin or least-request, a route's
//! weighted clusters picked by weight.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use super::file::Lb;
use super::stats::ClusterStats;

/// An upstream cluster: a service's endpoints (of one subset) on one port.
#[derive(Debug)]
pub struct Cluster {
    /// `host|port|subset`, as in `/metrics`.
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub lb: Lb,
    /// Speak HTTP/2 to the endpoints (GRPC and HTTP2 ports).
    pub http2: bool,
    next: AtomicUsize,
    pub stats: Arc<ClusterStats>,
}

#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub active: AtomicU64,
}

/// One weighted destination of a route.
#[derive(Debug, Clone)]
pub struct WeightedCluster {
    pub cluster: Arc<Cluster>,
    pub weight: u32,
}

impl Cluster {
    /// A cluster with these endpoints, balanced by `lb`, counting into `stats`.
    pub fn new(
        name: String,
        endpoints: Vec<Endpoint>,
        lb: Lb,
        http2: bool,
        stats: Arc<ClusterStats>,
    ) -> Cluster {
        Cluster {
            name,
            endpoints,
            lb,
            http2,
            next: AtomicUsize::new(0),
            stats,
        }
    }

    /// The endpoint for the next request: round robin, or the less loaded of two (power of
    /// two choices) for least-request; `skip` endpoints are avoided when another exists.
    pub fn pick(&self, skip: &[SocketAddr]) -> Option<&Endpoint> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let avail = |e: &&Endpoint| !skip.contains(&e.addr);
        let candidates: Vec<&Endpoint> = self.endpoints.iter().filter(avail).collect();
        let pool: Vec<&Endpoint> = if candidates.is_empty() {
            self.endpoints.iter().collect()
        } else {
            candidates
        };
        let i = self.next.fetch_add(1, Relaxed);
        match self.lb {
            Lb::RoundRobin => Some(pool[i % pool.len()]),
            Lb::LeastRequest => {
                let a = pool[fastrand::usize(..pool.len())];
                let b = pool[fastrand::usize(..pool.len())];
                Some(if b.active.load(Relaxed) < a.active.load(Relaxed) {
                    b
                } else {
                    a
                })
            }
        }
    }
}

/// Picks a cluster by weight.
pub fn pick_weighted(clusters: &[WeightedCluster], total: u32) -> &Arc<Cluster> {
    let mut r = fastrand::u32(..total);
    for c in clusters {
        if r < c.weight {
            return &c.cluster;
        }
        r -= c.weight;
    }
    &clusters[clusters.len() - 1].cluster
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_request_prefers_the_idle_endpoint_and_round_robin_alternates() {
        let cluster = |lb| Cluster {
            name: "c".into(),
            endpoints: ["10.0.0.1:80", "10.0.0.2:80"]
                .iter()
                .map(|a| Endpoint {
                    addr: a.parse().unwrap(),
                    active: AtomicU64::new(0),
                })
                .collect(),
            lb,
            http2: false,
            next: AtomicUsize::new(0),
            stats: Arc::default(),
        };
        let busy: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let c = cluster(Lb::LeastRequest);
        c.endpoints[0].active.store(10, Relaxed);
        let to_busy = (0..1000)
            .filter(|_| c.pick(&[]).unwrap().addr == busy)
            .count();
        // Two random choices, the less loaded wins: the busy one only when drawn twice (1/4).
        assert!(to_busy < 350, "{to_busy} of 1000 to the busy endpoint");
        let c = cluster(Lb::RoundRobin);
        c.endpoints[0].active.store(10, Relaxed);
        let to_busy = (0..1000)
            .filter(|_| c.pick(&[]).unwrap().addr == busy)
            .count();
        assert_eq!(to_busy, 500);
        // An endpoint that failed this request is skipped while another exists.
        assert_ne!(c.pick(&[busy]).unwrap().addr, busy);
    }
}
