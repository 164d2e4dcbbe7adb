//! The always-on allocation sampler: the allocator core's only way out
//! toward profiling. The core calls [`on_alloc`] for every sampled (or
//! recorded) allocation and [`on_free`] for its free; each calls the
//! probed hook, the `otel_memory` USDT probe ([`probes`]), the sampled
//! live heap an agent reads from outside ([`live_set`]), then gperftools
//! mode's recorder. gperftools mode sits behind this module: the core
//! never names it.
//!
//! Each thread counts down the bytes it allocates (one subtraction and a
//! branch on the fast path); when the count goes below zero, the slow path
//! samples that allocation and draws the next distance from an exponential
//! distribution of mean `PROFALLOC_SAMPLE_BYTES` (default 512 KiB, 0 = off),
//! which makes the sampled bytes a Poisson process over allocated bytes.
//! A sampled object gets its own span (or huge mapping) marked `sampled`
//! (except in record-all mode, where every object is recorded in place),
//! so its free is recognised by the free slow path at no cost to the fast
//! path. The hooks are the ABI described in `profiler_common::hooks`.
//!
//! Lock: none here (the rate and the mode are set once at start; the
//! recorders behind take their own). Owner: the allocator's slow paths.
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use profiler_common::hooks;

use crate::{counters, env::Settings, gperftools, live_set, probes};

/// Mean sampling distance in bytes; 0 = sampling off. Exported so that an
/// agent can read the rate of a running process.
#[unsafe(no_mangle)]
pub static profalloc_sample_bytes: AtomicU64 = AtomicU64::new(hooks::DEFAULT_SAMPLE_BYTES);

/// Every allocation is recorded in place (the heap checker): no sampling,
/// no span of its own; every free takes the slow path, which tells the
/// profiler. Set once at start, before any thread cache fills.
static RECORD_ALL: AtomicBool = AtomicBool::new(false);

/// Sets the rate and the mode from the settings and starts what gperftools
/// mode asks for. Called once, from the allocator's initialisation (busy
/// set, before any thread cache fills).
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) fn start(s: &Settings) {
    if let Some(n) = s.sample_bytes {
        profalloc_sample_bytes.store(n, Ordering::Relaxed);
    }
    if s.heap_check {
        // Every allocation is recorded: a stack for each, weight = size,
        // in place.
        profalloc_sample_bytes.store(1, Ordering::Relaxed);
        RECORD_ALL.store(true, Ordering::Relaxed);
    }
    // The live set keeps samples; the heap checker records every object
    // in its own table instead.
    let live = !s.heap_check
        && rate() != 0
        && live_set::live().start(
            s.live_heap_bytes.unwrap_or(hooks::DEFAULT_LIVE_HEAP_BYTES),
            rate(),
        );
    if live || s.gperftools_mode() {
        gperftools::start_stacks(s);
    }
    if s.gperftools_mode() {
        gperftools::start(s);
    }
}

/// Record-all mode (the heap checker): every allocation goes through
/// [`on_alloc`] with weight = size, and every free through [`on_free`].
#[inline]
pub(crate) fn record_all() -> bool {
    RECORD_ALL.load(Ordering::Relaxed)
}

/// A sampled (or recorded) allocation succeeded: the hook, the USDT
/// probe, then (with the allocation's stack, and in a CPython process its
/// thread's Python stack) the live set and the recorder. Inlined into the
/// allocation's slow path (which the fast path enters by a jump), with the
/// stack capture: the walk then starts one frame below the program's.
#[inline(always)]
pub(crate) fn on_alloc(p: *mut u8, size: usize, weight: u64) {
    counters::SAMPLED.add(1);
    profalloc_sample_alloc(p.cast(), size, weight);
    probes::alloc(p, size, weight);
    let live = live_set::live();
    let records = gperftools::records_stacks();
    if live.on() || records {
        let mut stack = gperftools::Stack::empty();
        stack.fill();
        gperftools::python::with_stack(records, live.on(), |walk, python| {
            live.insert(
                p as usize,
                size,
                weight,
                stack.frames(),
                stack.truncated(),
                python,
            );
            if records {
                if let Some(w) = walk {
                    stack.splice_python(w);
                }
                gperftools::record_alloc(p, size, weight, &stack);
            }
        });
    }
}

/// A sampled (or recorded) object is being freed, before its memory is
/// reused. `reentrant`: the free runs on a thread already inside the
/// allocator (a signal handler), which must not wait for a lock (the
/// live set takes none).
#[inline]
pub(crate) fn on_free(p: *mut u8, reentrant: bool) {
    profalloc_sample_free(p.cast());
    probes::free(p);
    live_set::live().remove(p as usize);
    gperftools::record_free(p, reentrant);
}

/// The process exits: gperftools mode writes its files (and the heap
/// checker may exit with status 1).
pub(crate) fn at_exit() {
    gperftools::at_exit();
}

/// Called for every sampled allocation, after it succeeded. Does nothing:
/// it exists to be probed. Never inlined, never removed.
///
/// The body is a 5-byte `nop`, a 1-byte `nop`, then `ret`. A uprobe on the
/// 5-byte nop is turned by recent kernels (6.18) into a call to a trampoline
/// and a syscall, with no trap at all; older kernels emulate a probed 1-byte
/// `nop` in place. Either is far cheaper than a probed `ret`, which is
/// single-stepped out of line (a second trap). The agent picks the
/// instruction (see `prof-bpf`'s probe placement).
#[unsafe(no_mangle)]
#[inline(never)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub extern "C" fn profalloc_sample_alloc(ptr: *mut libc::c_void, size: usize, weight: u64) {
    // SAFETY: nops that only "use" the arguments, so the function keeps its
    // body and its call sites.
    unsafe {
        core::arch::asm!(".byte 0x0f, 0x1f, 0x44, 0x00, 0x00", "nop /* {0} {1} {2} */", in(reg) ptr, in(reg) size, in(reg) weight,
            options(nostack, preserves_flags));
    }
}

/// Called when a sampled allocation is freed, before its memory is reused.
#[unsafe(no_mangle)]
#[inline(never)]
#[unsafe(link_section = ".text.hot.profalloc")]
pub extern "C" fn profalloc_sample_free(ptr: *mut libc::c_void) {
    // SAFETY: as above.
    unsafe {
        core::arch::asm!(".byte 0x0f, 0x1f, 0x44, 0x00, 0x00", "nop /* {0} */", in(reg) ptr, options(nostack, preserves_flags));
    }
}

const _: hooks::SampleAllocFn = profalloc_sample_alloc;
const _: hooks::SampleFreeFn = profalloc_sample_free;

/// The current mean sampling distance (0 = off).
pub(crate) fn rate() -> u64 {
    profalloc_sample_bytes.load(Ordering::Relaxed)
}

/// Draws the distance to the next sample: exponential with mean `rate`
/// (never 0, so one allocation is never sampled twice). Off: far away.
pub(crate) fn next_distance(rng: &mut u64, rate: u64) -> isize {
    if rate == 0 {
        return isize::MAX / 2;
    }
    // xorshift64*: good enough for sampling, no allocation, no lock.
    let mut x = *rng | 1;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *rng = x;
    let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
    // Uniform in (0, 1].
    let u = ((r >> 11) + 1) as f64 / (1u64 << 53) as f64;
    let d = -ln(u) * rate as f64;
    (d as isize).clamp(1, isize::MAX / 2)
}

/// The unbiased weight of a sampled allocation of `size` bytes at mean
/// rate `rate`: size / P(sampled) = S / (1 - exp(-S/R)).
#[unsafe(link_section = ".text.hot.profalloc")]
pub(crate) fn weight(size: usize, rate: u64) -> u64 {
    if rate == 0 {
        return size as u64;
    }
    let s = size.max(1) as f64;
    let r = rate as f64;
    let x = s / r;
    if x <= 1.0 / 16.0 {
        // Nearly every sample: S / (1 - e^-x) = R x / (1 - e^-x), whose
        // series 1 + x/2 + x^2/12 - x^4/720 + ... stops here with a
        // relative error below x^6/30240 < 3e-12 (an `exp` costs about
        // 230 instructions and a chain of multiplies).
        let x2 = x * x;
        return (r * (1.0 + x / 2.0 + x2 / 12.0 - x2 * x2 / 720.0) + 0.5) as u64;
    }
    let p = 1.0 - exp(-x);
    (s / p + 0.5) as u64
}

// ln and exp without libm: the library must not pull libm into every
// process (it costs ~0.5 MiB of resident pages), and sampling needs only
// about 1e-7 relative accuracy.

/// Natural logarithm of `x` in (0, 1] (or any positive normal number).
fn ln(x: f64) -> f64 {
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    // m in [1, 2), then in [sqrt(1/2), sqrt(2)).
    let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    if m > core::f64::consts::SQRT_2 {
        m /= 2.0;
        e += 1;
    }
    // ln(m) = 2 atanh(t), t = (m-1)/(m+1), |t| < 0.172.
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let series = t
        * (1.0
            + t2 * (1.0 / 3.0
                + t2 * (1.0 / 5.0
                    + t2 * (1.0 / 7.0 + t2 * (1.0 / 9.0 + t2 * (1.0 / 11.0 + t2 / 13.0))))));
    e as f64 * core::f64::consts::LN_2 + 2.0 * series
}

/// 1/1, 1/2, ..., 1/12: the series of `exp` multiplies instead of dividing.
const INV_FACTORS: [f64; 12] = {
    let mut t = [0.0; 12];
    let mut i = 0;
    while i < 12 {
        t[i] = 1.0 / (i + 1) as f64;
        i += 1;
    }
    t
};

/// e^x for x <= 0.
fn exp(x: f64) -> f64 {
    if x < -700.0 {
        return 0.0;
    }
    // x = k ln2 + r, |r| <= ln2 / 2.
    let k = (x / core::f64::consts::LN_2 - 0.5) as i64;
    let k = if (x - k as f64 * core::f64::consts::LN_2) > core::f64::consts::LN_2 / 2.0 {
        k + 1
    } else {
        k
    };
    let r = x - k as f64 * core::f64::consts::LN_2;
    let mut term = 1.0;
    let mut sum = 1.0;
    for inv in INV_FACTORS {
        term *= r * inv;
        sum += term;
    }
    sum * f64::from_bits(((k + 1023) as u64) << 52)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_have_the_requested_mean() {
        let mut rng = 0x1234_5678;
        let n = 200_000;
        let rate = 524_288;
        let sum: f64 = (0..n).map(|_| next_distance(&mut rng, rate) as f64).sum();
        let mean = sum / n as f64;
        // Standard error of the mean: rate / sqrt(n) ~ 0.22% of rate.
        assert!((mean / rate as f64 - 1.0).abs() < 0.01, "mean {mean}");
        assert_eq!(next_distance(&mut rng, 0), isize::MAX / 2);
    }

    #[test]
    fn ln_and_exp_are_accurate() {
        for i in 1..10_000 {
            let x = i as f64 / 10_000.0;
            assert!((ln(x) - x.ln()).abs() < 1e-9, "ln {x}");
            let y = -(i as f64) / 100.0;
            assert!((exp(y) - y.exp()).abs() <= 1e-9 * y.exp(), "exp {y}");
        }
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
    }

    #[test]
    fn weights_are_unbiased() {
        // Large objects are always sampled: weight = size.
        assert_eq!(weight(64 << 20, 524_288), 64 << 20);
        // Small ones: about R (S / (S/R) for S << R).
        let w = weight(16, 524_288);
        assert!((524_288..=524_304).contains(&w), "{w}");
        assert_eq!(weight(1000, 0), 1000);
    }

    #[test]
    fn the_series_weight_matches_the_exact_one() {
        // Sizes on both sides of x = 1/16 (32 KiB at 512 KiB), at two rates.
        for rate in [524_288u64, 4096] {
            for size in (1..200_000).step_by(97).chain([rate as usize / 16]) {
                let (s, r) = (size as f64, rate as f64);
                let exact = s / (1.0 - (-s / r).exp());
                let w = weight(size, rate) as f64;
                assert!(
                    (w - exact).abs() <= 0.5 + exact * 1e-9,
                    "{size} {rate}: {w} {exact}"
                );
            }
        }
    }
}
