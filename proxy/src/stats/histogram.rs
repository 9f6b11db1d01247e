//! Latency histograms: lock-free storage, one atomic add per observation.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) shared by every histogram: 50 µs to 5 min.
pub const BUCKETS: [f64; 20] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A histogram of durations over [`BUCKETS`]: lock-free, one atomic add per bucket hit.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Counts per bucket (not cumulative); the last slot is +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS.partition_point(|&b| b < secs);
        self.buckets[i].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Every cell (the buckets, then count and sum), for carrying over to another process.
    pub fn values(&self) -> impl Iterator<Item = u64> + '_ {
        self.buckets
            .iter()
            .chain([&self.count, &self.sum_nanos])
            .map(|a| a.load(Relaxed))
    }

    /// Adds `to - from`, cell by cell (as [`Histogram::values`] lists them).
    pub fn add_delta(&self, from: &[u64], to: &[u64]) {
        let cells = self.buckets.iter().chain([&self.count, &self.sum_nanos]);
        for ((a, f), t) in cells.zip(from).zip(to) {
            a.fetch_add(t.wrapping_sub(*f), Relaxed);
        }
    }

    /// Cells per histogram in [`Histogram::values`].
    pub const CELLS: usize = BUCKETS.len() + 3;

    /// The buckets as (upper bound in seconds, observations in that bucket alone), the
    /// last one +Inf (`f64::MAX`).
    pub fn buckets(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        BUCKETS
            .iter()
            .chain([f64::MAX].iter())
            .zip(&self.buckets)
            .map(|(bound, n)| (*bound, n.load(Relaxed)))
    }

    /// The sum of the observations, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_nanos.load(Relaxed) as f64 / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_observation_lands_in_its_own_bucket() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(1000));
        assert_eq!(h.count(), 3);
        assert_eq!(h.buckets[0].load(Relaxed), 1);
        assert_eq!(h.buckets[BUCKETS.len()].load(Relaxed), 1, "+Inf");
    }
}
