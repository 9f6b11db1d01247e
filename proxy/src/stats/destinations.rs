//! Per-destination counters: a capped, sharded table of compact entries behind a run-time
//! switch, with an `other` series per direction for what is not (or no longer) tracked.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::direction::Direction;

/// Settings of the per-destination table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestinationLimits {
    /// Most destinations tracked at once; further ones count in the `other` series.
    pub cap: usize,
    /// A destination without a new connection or a close for this long is evicted (its
    /// counts move to the `other` series, so the family's totals stay exact).
    pub idle: Duration,
}

impl Default for DestinationLimits {
    fn default() -> Self {
        DestinationLimits {
            cap: 10_000,
            idle: Duration::from_secs(300),
        }
    }
}

const SHARDS: usize = 16;

/// One destination's counters (one entry for its three series). `last_seen` is in seconds
/// since the table's epoch.
#[derive(Debug, Default, Clone, Copy)]
pub struct DestinationCounts {
    /// Connections started.
    pub connections: u64,
    /// Bytes from clients to the destination, counted when a connection ends.
    pub bytes_up: u64,
    /// Bytes from the destination to clients, counted when a connection ends.
    pub bytes_down: u64,
    last_seen: u32,
}

impl DestinationCounts {
    fn add(&mut self, o: &DestinationCounts) {
        self.connections += o.connections;
        self.bytes_up += o.bytes_up;
        self.bytes_down += o.bytes_down;
    }
}

/// One destination's series as passed to a new process at an upgrade.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DestinationSeries {
    pub inbound: bool,
    /// The address, or `other`.
    pub destination: String,
    pub connections: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// A destination: address bytes (IPv4 mapped into IPv6), port and direction, packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct DestKey {
    ip: [u8; 16],
    port: u16,
    inbound: bool,
}

impl DestKey {
    fn new(dir: Direction, dst: SocketAddr) -> Self {
        let ip = match dst.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        DestKey {
            ip: ip.octets(),
            port: dst.port(),
            inbound: dir == Direction::Inbound,
        }
    }

    fn addr(&self) -> SocketAddr {
        let ip = Ipv6Addr::from(self.ip);
        match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), self.port),
            None => SocketAddr::new(ip.into(), self.port),
        }
    }

    fn direction(&self) -> Direction {
        if self.inbound {
            Direction::Inbound
        } else {
            Direction::Outbound
        }
    }
}

/// Per-destination counters, off by default and switched at run time.
///
/// - Off: the hot path reads one flag; the table holds nothing (switching off frees it).
/// - On: a connection adds to its destination's entry when it starts and when it ends
///   (bytes), under one of 16 shard locks. At most `cap` destinations are tracked; the
///   others count in one `destination="other"` series per direction, as do evicted ones,
///   so the sum over a family is always the total since the switch was turned on.
/// - A destination's three series (connections, bytes each way) share one entry: 56 bytes
///   of key and counts plus the hash table's slack, about 27 bytes per series as
///   `cargo xtask bench stats` measures it (bench/README.md).
#[derive(Debug)]
pub struct Destinations {
    enabled: AtomicBool,
    limits: Mutex<DestinationLimits>,
    cap: AtomicUsize,
    tracked: AtomicUsize,
    evicted: AtomicU64,
    epoch: Instant,
    hasher: std::collections::hash_map::RandomState,
    shards: [Mutex<HashMap<DestKey, DestinationCounts>>; SHARDS],
    /// Untracked and evicted destinations, per direction (outbound, inbound).
    other: Mutex<[DestinationCounts; 2]>,
}

impl Default for Destinations {
    fn default() -> Self {
        Destinations::new(false, DestinationLimits::default())
    }
}

impl Destinations {
    pub fn new(enabled: bool, limits: DestinationLimits) -> Self {
        Destinations {
            enabled: AtomicBool::new(enabled),
            limits: Mutex::new(limits),
            cap: AtomicUsize::new(limits.cap),
            tracked: AtomicUsize::new(0),
            evicted: AtomicU64::new(0),
            epoch: Instant::now(),
            hasher: Default::default(),
            shards: Default::default(),
            other: Mutex::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Relaxed)
    }

    pub fn limits(&self) -> DestinationLimits {
        *self.limits.lock().expect("limits lock")
    }

    /// Destinations tracked now (each has three series).
    pub fn tracked(&self) -> usize {
        self.tracked.load(Relaxed)
    }

    /// Turns the family on (empty) or off (dropped, memory freed). Returns the old state.
    ///
    /// `tracked` is kept exact under concurrent counting and eviction: an entry is added
    /// and counted, or removed and uncounted, under its shard's lock, and [`Self::update`]
    /// looks at the switch again under that lock; so switching off subtracts exactly what
    /// it removed (never a blind reset to 0, which a racing insert or eviction would turn
    /// into a count below the entries, or below zero).
    pub fn set_enabled(&self, on: bool) -> bool {
        let was = self.enabled.swap(on, Relaxed);
        if was && !on {
            for shard in &self.shards {
                let mut m = shard.lock().expect("shard lock");
                let removed = m.len();
                *m = HashMap::new();
                self.tracked.fetch_sub(removed, Relaxed);
            }
            *self.other.lock().expect("other lock") = Default::default();
        }
        was
    }

    fn now(&self) -> u32 {
        self.epoch.elapsed().as_secs() as u32
    }

    fn shard(&self, key: &DestKey) -> &Mutex<HashMap<DestKey, DestinationCounts>> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    fn update(&self, dir: Direction, dst: SocketAddr, delta: DestinationCounts) {
        if !self.enabled() {
            return;
        }
        let key = DestKey::new(dir, dst);
        let now = self.now();
        let mut shard = self.shard(&key).lock().expect("shard lock");
        // Switched off since the check above: this shard may be cleared already.
        if !self.enabled() {
            return;
        }
        if let Some(e) = shard.get_mut(&key) {
            e.add(&delta);
            e.last_seen = now;
            return;
        }
        // A new destination: tracked while under the cap, else counted as `other`.
        let cap = self.cap.load(Relaxed);
        if self
            .tracked
            .fetch_update(Relaxed, Relaxed, |n| (n < cap).then_some(n + 1))
            .is_ok()
        {
            shard.insert(
                key,
                DestinationCounts {
                    last_seen: now,
                    ..delta
                },
            );
        } else {
            drop(shard);
            let mut other = self.other.lock().expect("other lock");
            if self.enabled() {
                other[key.inbound as usize].add(&delta);
            }
        }
    }

    /// A connection to `dst` started.
    pub fn connection(&self, dir: Direction, dst: SocketAddr) {
        self.update(
            dir,
            dst,
            DestinationCounts {
                connections: 1,
                ..Default::default()
            },
        );
    }

    /// A connection to `dst` ended after moving these bytes.
    pub fn closed(&self, dir: Direction, dst: SocketAddr, up: u64, down: u64) {
        if up == 0 && down == 0 {
            return;
        }
        self.update(
            dir,
            dst,
            DestinationCounts {
                bytes_up: up,
                bytes_down: down,
                ..Default::default()
            },
        );
    }

    /// Moves every destination idle for longer than the limit into `other`. Returns how
    /// many were evicted.
    pub fn evict_idle(&self) -> usize {
        if !self.enabled() {
            return 0;
        }
        let idle = self.limits().idle.as_secs().min(u32::MAX as u64) as u32;
        let now = self.now();
        let mut moved = [DestinationCounts::default(); 2];
        let mut n = 0;
        for shard in &self.shards {
            let mut m = shard.lock().expect("shard lock");
            let before = n;
            m.retain(|k, v| {
                if now.saturating_sub(v.last_seen) >= idle {
                    moved[k.inbound as usize].add(v);
                    n += 1;
                    false
                } else {
                    true
                }
            });
            // Uncounted under the lock that removed them (see `set_enabled`).
            self.tracked.fetch_sub(n - before, Relaxed);
            // Give memory back once the table has mostly emptied.
            if m.capacity() > 64 && m.len() < m.capacity() / 4 {
                m.shrink_to_fit();
            }
        }
        if n > 0 {
            let mut other = self.other.lock().expect("other lock");
            // Switched off meanwhile: `other` was reset, and these belong to the old family.
            if self.enabled() {
                other[0].add(&moved[0]);
                other[1].add(&moved[1]);
            }
            self.evicted.fetch_add(n as u64, Relaxed);
        }
        n
    }

    /// Changes the cap and idle time; a lower cap takes effect for new destinations.
    pub fn set_limits(&self, limits: DestinationLimits) {
        *self.limits.lock().expect("limits lock") = limits;
        self.cap.store(limits.cap, Relaxed);
    }

    /// Idle destinations evicted so far.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Relaxed)
    }

    /// Every series: (direction, destination label, counts), `other` last per direction.
    pub fn series(&self) -> Vec<(Direction, String, DestinationCounts)> {
        let mut out = Vec::with_capacity(self.tracked() + 2);
        for shard in &self.shards {
            let m = shard.lock().expect("shard lock");
            for (k, v) in m.iter() {
                out.push((k.direction(), k.addr().to_string(), *v));
            }
        }
        let other = *self.other.lock().expect("other lock");
        out.push((Direction::Outbound, "other".to_owned(), other[0]));
        out.push((Direction::Inbound, "other".to_owned(), other[1]));
        out
    }

    /// Every series with counts, for a new process to add to its own at an upgrade.
    pub fn export(&self) -> Vec<DestinationSeries> {
        if !self.enabled() {
            return Vec::new();
        }
        self.series()
            .into_iter()
            .filter(|(_, _, c)| c.connections + c.bytes_up + c.bytes_down > 0)
            .map(|(dir, destination, c)| DestinationSeries {
                inbound: dir == Direction::Inbound,
                destination,
                connections: c.connections,
                bytes_up: c.bytes_up,
                bytes_down: c.bytes_down,
            })
            .collect()
    }

    /// Adds the previous process's series ([`Destinations::export`]) to these (nothing
    /// when the family is off here).
    pub fn merge(&self, series: &[DestinationSeries]) {
        for s in series {
            let dir = if s.inbound {
                Direction::Inbound
            } else {
                Direction::Outbound
            };
            let delta = DestinationCounts {
                connections: s.connections,
                bytes_up: s.bytes_up,
                bytes_down: s.bytes_down,
                last_seen: 0,
            };
            match s.destination.parse::<SocketAddr>() {
                Ok(dst) => self.update(dir, dst, delta),
                Err(_) => {
                    let mut other = self.other.lock().expect("other lock");
                    if self.enabled() {
                        other[s.inbound as usize].add(&delta);
                    }
                }
            }
        }
    }

    /// Evicts idle destinations periodically, for as long as the future is polled.
    pub async fn evict_idle_loop(&self) {
        loop {
            let idle = self.limits().idle;
            let period = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
            tokio::time::sleep(period).await;
            let n = self.evict_idle();
            if n > 0 {
                tracing::debug!(evicted = n, "idle destinations moved to the other series");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn sums(d: &Destinations) -> (u64, u64, u64) {
        d.series().iter().fold((0, 0, 0), |(c, u, w), (_, _, n)| {
            (c + n.connections, u + n.bytes_up, w + n.bytes_down)
        })
    }

    /// The figure the documentation gives for an entry (key and counts, before the hash
    /// table's own slack).
    #[test]
    fn an_entry_is_56_bytes() {
        assert_eq!(std::mem::size_of::<(DestKey, DestinationCounts)>(), 56);
    }

    #[test]
    fn off_counts_nothing_and_switching_off_frees() {
        let d = Destinations::new(false, DestinationLimits::default());
        d.connection(Direction::Outbound, a("10.0.0.1:80"));
        assert_eq!(d.tracked(), 0);
        assert_eq!(sums(&d), (0, 0, 0));
        d.set_enabled(true);
        for i in 0..100 {
            d.connection(Direction::Outbound, a(&format!("10.0.1.{i}:80")));
        }
        assert_eq!(d.tracked(), 100);
        d.set_enabled(false);
        assert_eq!(d.tracked(), 0);
        assert!(d.shards.iter().all(|s| s.lock().unwrap().capacity() == 0));
        d.set_enabled(true);
        assert_eq!(sums(&d), (0, 0, 0), "switched on again: a fresh family");
    }

    #[test]
    fn cap_holds_and_totals_stay_exact() {
        let d = Destinations::new(
            true,
            DestinationLimits {
                cap: 10,
                idle: Duration::from_secs(60),
            },
        );
        for i in 0..50u32 {
            let dst = a(&format!("127.0.{}.{}:8080", i / 200, i % 200));
            d.connection(Direction::Outbound, dst);
            d.closed(Direction::Outbound, dst, 6, 40);
        }
        d.connection(Direction::Inbound, a("[fd00::1]:443"));
        assert_eq!(d.tracked(), 10);
        let series = d.series();
        assert_eq!(series.len(), 10 + 2);
        let other = |d: Direction| {
            series
                .iter()
                .find(|(dir, l, _)| *dir == d && l == "other")
                .unwrap()
                .2
                .connections
        };
        // The cap is shared by both directions; each has its own `other`.
        assert_eq!(other(Direction::Outbound), 40);
        assert_eq!(other(Direction::Inbound), 1);
        assert_eq!(sums(&d), (51, 300, 2000));
    }

    #[test]
    fn idle_destinations_move_to_other() {
        let d = Destinations::new(
            true,
            DestinationLimits {
                cap: 100,
                idle: Duration::from_secs(0),
            },
        );
        for i in 0..20 {
            d.connection(Direction::Outbound, a(&format!("10.1.0.{i}:80")));
        }
        let before = sums(&d);
        assert_eq!(d.evict_idle(), 20);
        assert_eq!(d.tracked(), 0);
        assert_eq!(d.evicted.load(Relaxed), 20);
        assert_eq!(sums(&d), before, "evicted counts live on in other");
        d.connection(Direction::Outbound, a("10.1.0.1:80"));
        assert_eq!(d.tracked(), 1, "an evicted destination can come back");
    }

    /// Switching off while connections are counted and idle ones evicted on other
    /// threads: once they have stopped, an off family holds nothing and counts nothing,
    /// and switched on again `tracked` equals the entries (series) that exist.
    #[test]
    fn tracked_equals_live_series_after_switching_under_traffic() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let live =
            |d: &Destinations| -> usize { d.shards.iter().map(|s| s.lock().unwrap().len()).sum() };
        let d = Arc::new(Destinations::new(
            true,
            DestinationLimits {
                cap: 1_000_000,
                idle: Duration::ZERO, // the eviction moves everything to `other`
            },
        ));
        let mut bad = Vec::new();
        for round in 0..300 {
            d.set_enabled(true);
            let stop = Arc::new(AtomicBool::new(false));
            let mut threads: Vec<_> = (0..2u8)
                .map(|t| {
                    let (d, stop) = (d.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let mut i = 0u16;
                        while !stop.load(Relaxed) {
                            let [hi, lo] = i.to_be_bytes();
                            d.connection(
                                Direction::Outbound,
                                SocketAddr::from(([10, t, hi, lo], 80)),
                            );
                            i = i.wrapping_add(1);
                        }
                    })
                })
                .collect();
            threads.push({
                let (d, stop) = (d.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Relaxed) {
                        d.evict_idle();
                    }
                })
            });
            while d.tracked() == 0 {
                std::thread::yield_now();
            }
            d.set_enabled(false);
            std::thread::yield_now();
            stop.store(true, Relaxed);
            for t in threads {
                t.join().unwrap();
            }
            if (d.tracked(), live(&d)) != (0, 0) {
                bad.push((round, d.tracked(), live(&d)));
            }
        }
        assert!(bad.is_empty(), "off yet (round, tracked, entries): {bad:?}");
        d.set_enabled(true);
        d.set_limits(DestinationLimits {
            cap: 1_000_000,
            idle: Duration::from_secs(600),
        });
        for i in 0..10u8 {
            d.connection(Direction::Inbound, SocketAddr::from(([10, 9, 9, i], 80)));
        }
        assert_eq!(
            d.tracked(),
            live(&d),
            "tracked equals the entries that exist"
        );
        assert_eq!(d.series().len(), d.tracked() + 2);
        assert_eq!(d.tracked(), 10);
    }
}
