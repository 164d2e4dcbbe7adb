//! Poisson sampling of allocations, done in the kernel from tables computed
//! here (BPF has no floating point).
//!
//! As in tcmalloc, each thread counts down the bytes it allocates from an
//! exponentially distributed interval with mean N (`--sample-bytes`); the
//! allocation that crosses zero is sampled and a new interval is drawn. An
//! allocation of size S is then sampled with probability 1 - exp(-S/N), so
//! weighting it by S / (1 - exp(-S/N)) bytes and 1 / (1 - exp(-S/N)) objects
//! makes every total an unbiased estimate — the formula libprofalloc.so's
//! sampler uses too.
use profiler_common::heap::{
    SAMPLE_TABLE_LEN, WEIGHT_ONE, WEIGHT_STEPS_PER_UNIT, WEIGHT_TABLE_LEN,
};

/// Default mean bytes between samples for heap profiles.
pub const DEFAULT_SAMPLE_BYTES: u64 = 512 * 1024;
/// Largest accepted rate: keeps the kernel's fixed-point products in 64 bits.
pub const MAX_SAMPLE_BYTES: u64 = 1 << 32;

/// [`SAMPLE_TABLE_LEN`] exponential intervals with mean `rate`: the
/// quantiles of Exp(1) at the midpoints of equal-probability strata, scaled
/// by `rate`, so a uniformly random index draws from the distribution.
pub fn intervals(rate: u64) -> Vec<u64> {
    let n = f64::from(SAMPLE_TABLE_LEN);
    (0..SAMPLE_TABLE_LEN)
        .map(|i| {
            let u = (f64::from(i) + 0.5) / n;
            ((-u.ln() * rate as f64).round() as u64).max(1)
        })
        .collect()
}

/// h(x) = x / (1 - exp(-x)) at x = i / [`WEIGHT_STEPS_PER_UNIT`], in
/// [`WEIGHT_ONE`] fixed point; the kernel interpolates linearly between
/// entries and weighs a sample of size S at rate N as N * h(S/N) bytes.
pub fn weights() -> Vec<u64> {
    (0..WEIGHT_TABLE_LEN)
        .map(|i| {
            (h(f64::from(i) / f64::from(WEIGHT_STEPS_PER_UNIT)) * WEIGHT_ONE as f64).round() as u64
        })
        .collect()
}

fn h(x: f64) -> f64 {
    if x == 0.0 { 1.0 } else { x / -(-x).exp_m1() }
}

/// The weight in bytes of a sample of `size` at `rate`, exactly: the
/// oracle the table is checked against.
#[cfg(test)]
fn weight_bytes(size: u64, rate: u64) -> f64 {
    let s = size as f64;
    s / -(-s / rate as f64).exp_m1()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_have_the_requested_mean() {
        let rate = DEFAULT_SAMPLE_BYTES;
        let table = intervals(rate);
        let mean = table.iter().sum::<u64>() as f64 / table.len() as f64;
        assert!((mean / rate as f64 - 1.0).abs() < 0.001, "mean {mean}");
        assert!(table.iter().all(|&v| v >= 1));
    }

    #[test]
    fn table_weights_match_the_formula() {
        // What the kernel computes (same integer steps as profiler-ebpf/src/heap.rs).
        let table = weights();
        let rate = DEFAULT_SAMPLE_BYTES;
        for size in [1u64, 100, 4096, 100_000, 524_288, 3_000_000, 8_000_000] {
            let x = size * u64::from(WEIGHT_STEPS_PER_UNIT) * 1024 / rate;
            let index = (x >> 10) as usize;
            let kernel = if index >= table.len() - 1 {
                size
            } else {
                let (lo, hi) = (table[index], table[index + 1]);
                let h = lo + (((hi - lo) * (x & 1023)) >> 10);
                (rate * h) >> 16
            };
            let exact = weight_bytes(size, rate);
            assert!(
                (kernel as f64 / exact - 1.0).abs() < 1e-4,
                "size {size}: kernel {kernel} exact {exact}"
            );
        }
    }
}
