//! Latency histogram: a small log-linear (HDR-style) histogram of microsecond values with
//! about 1.6% relative precision, mergeable across worker processes and serialisable as a
//! sparse list so workers can ship it over a pipe. Owns the percentile math used by every
//! report; knows nothing of sockets or scenarios.

use serde::{Deserialize, Serialize};

/// Values below this are counted exactly; above it each power of two has `HALF` buckets.
const LINEAR: u64 = 128;
const HALF: u64 = 64;
/// Enough buckets for any u64.
const BUCKETS: usize = (64 * 57 + 128) as usize;

/// Index of the bucket holding `v`.
fn index(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let msb = 63 - u64::from(v.leading_zeros());
    let shift = msb - 6;
    (HALF * shift + (v >> shift)) as usize
}

/// Lowest and highest value that land in bucket `idx`.
fn bounds(idx: usize) -> (u64, u64) {
    let idx = idx as u64;
    if idx < LINEAR {
        return (idx, idx);
    }
    let shift = idx / HALF - 1;
    let mant = idx - HALF * shift;
    let hi = (u128::from(mant + 1) << shift) - 1;
    (mant << shift, u64::try_from(hi).unwrap_or(u64::MAX))
}

#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    min: u64,
    max: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// Wire form: `(bucket, count)` pairs plus the exact min, max and sum.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Sparse {
    pub buckets: Vec<(u32, u64)>,
    pub min: u64,
    pub max: u64,
    pub sum: u64,
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
            min: u64::MAX,
            max: 0,
            sum: 0,
        }
    }

    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += u128::from(v);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        if self.total == 0 { 0 } else { self.max }
    }

    pub fn min(&self) -> u64 {
        if self.total == 0 { 0 } else { self.min }
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value at quantile `q` (0..=1): the upper bound of the bucket holding the
    /// `ceil(q * count)`-th smallest value, clamped to the exact max. 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bounds(i).1.min(self.max).max(self.min);
            }
        }
        self.max
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        if other.total > 0 {
            self.min = self.min.min(other.min);
            self.max = self.max.max(other.max);
        }
    }

    pub fn to_sparse(&self) -> Sparse {
        Sparse {
            buckets: self
                .counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| (i as u32, *c))
                .collect(),
            min: self.min(),
            max: self.max(),
            sum: u64::try_from(self.sum).unwrap_or(u64::MAX),
        }
    }

    pub fn from_sparse(s: &Sparse) -> Self {
        let mut h = Self::new();
        for &(i, c) in &s.buckets {
            if let Some(slot) = h.counts.get_mut(i as usize) {
                *slot += c;
                h.total += c;
            }
        }
        if h.total > 0 {
            h.min = s.min;
            h.max = s.max;
            h.sum = u128::from(s.sum);
        }
        h
    }

    /// Non-empty buckets as `(low, high, count)`, for plots.
    pub fn bars(&self) -> Vec<(u64, u64, u64)> {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| {
                let (lo, hi) = bounds(i);
                (lo, hi, *c)
            })
            .collect()
    }

    /// The usual summary, in milliseconds.
    pub fn summary(&self) -> Summary {
        let ms = |v: u64| v as f64 / 1000.0;
        Summary {
            count: self.total,
            mean_ms: self.mean() / 1000.0,
            p50_ms: ms(self.quantile(0.50)),
            p90_ms: ms(self.quantile(0.90)),
            p99_ms: ms(self.quantile(0.99)),
            p999_ms: ms(self.quantile(0.999)),
            max_ms: ms(self.max()),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_contain_their_values() {
        let mut prev_hi = None;
        for i in 0..BUCKETS {
            let (lo, hi) = bounds(i);
            assert!(lo <= hi);
            if let Some(p) = prev_hi {
                assert_eq!(lo, p + 1, "bucket {i} starts right after the previous");
            }
            prev_hi = Some(hi);
            assert_eq!(index(lo), i);
            assert_eq!(index(hi), i);
        }
        for v in [
            0,
            1,
            127,
            128,
            129,
            255,
            256,
            1_000,
            65_537,
            10_000_000,
            u64::MAX,
        ] {
            let (lo, hi) = bounds(index(v));
            assert!(lo <= v && v <= hi, "{v} in [{lo},{hi}]");
        }
    }

    #[test]
    fn relative_error_is_small() {
        for v in [200u64, 1_234, 50_000, 987_654, 3_600_000_000] {
            let (lo, hi) = bounds(index(v));
            assert!((hi - lo) as f64 / v as f64 <= 1.0 / 63.0, "{v}");
        }
    }

    #[test]
    fn quantiles_of_a_uniform_range() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        assert_eq!(h.count(), 10_000);
        let close = |got: u64, want: f64| (got as f64 - want).abs() / want < 0.02;
        assert!(close(h.quantile(0.5), 5_000.0), "{}", h.quantile(0.5));
        assert!(close(h.quantile(0.99), 9_900.0), "{}", h.quantile(0.99));
        assert!(close(h.quantile(0.999), 9_990.0), "{}", h.quantile(0.999));
        assert_eq!(h.quantile(1.0), 10_000);
        assert_eq!(h.quantile(0.0), 1);
        assert!((h.mean() - 5_000.5).abs() < 1e-9);
        // Small values are exact.
        let mut s = Histogram::new();
        for v in [3, 1, 2] {
            s.record(v);
        }
        assert_eq!(s.quantile(0.5), 2);
        assert_eq!(s.min(), 1);
        assert_eq!(s.max(), 3);
    }

    #[test]
    fn empty_histogram_is_all_zero() {
        let h = Histogram::new();
        assert_eq!(h.quantile(0.99), 0);
        assert_eq!(h.summary(), Summary::default());
    }

    #[test]
    fn merge_and_sparse_round_trip() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        for v in 0..1000 {
            a.record(v * 3);
            b.record(v * 7 + 100_000);
        }
        let mut m = a.clone();
        m.merge(&b);
        assert_eq!(m.count(), 2000);
        assert_eq!(m.min(), 0);
        assert_eq!(m.max(), 999 * 7 + 100_000);
        let wire = serde_json::to_string(&m.to_sparse()).unwrap();
        let back = Histogram::from_sparse(&serde_json::from_str(&wire).unwrap());
        assert_eq!(back.count(), m.count());
        for q in [0.1, 0.5, 0.9, 0.99, 0.999] {
            assert_eq!(back.quantile(q), m.quantile(q));
        }
        assert_eq!(back.summary(), m.summary());
        // Merging an empty histogram changes nothing.
        m.merge(&Histogram::new());
        assert_eq!(m.min(), 0);
        assert_eq!(m.count(), 2000);
    }
}
