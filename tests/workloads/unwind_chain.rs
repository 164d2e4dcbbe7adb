//! The Rust variant of unwind_chain.c for `cargo xtask bench unwind`: the
//! same 6-deep chain main -> level1 -> ... -> level5 -> leaf, built as a
//! release build (no frame pointers).
//!
//!   unwind_chain alloc|spin SECONDS
//!
//! Prints "ready", waits for a "go" line, runs for SECONDS, prints "done"
//! and "calls N", then waits for stdin to close.
use std::{
    hint::black_box,
    io::BufRead as _,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

static SINK: AtomicU64 = AtomicU64::new(0);

#[inline(never)]
fn leaf(n: u64, alloc: bool) -> u64 {
    if alloc {
        let v = black_box(vec![n as u8; 100 + (n % 200) as usize]);
        return u64::from(v[v.len() / 2]);
    }
    let mut x = n;
    for _ in 0..300 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    }
    black_box(x) & 1
}

macro_rules! level {
    ($name:ident, $next:ident, $k:expr) => {
        #[inline(never)]
        fn $name(n: u64, alloc: bool) -> u64 {
            let r = $next(n + 1, alloc);
            SINK.fetch_add(r, Ordering::Relaxed);
            r + $k
        }
    };
}

level!(level5, leaf, 5);
level!(level4, level5, 4);
level!(level3, level4, 3);
level!(level2, level3, 2);
level!(level1, level2, 1);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let alloc = args.get(1).is_some_and(|m| m == "alloc");
    let seconds: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    println!("ready");
    let stdin = std::io::stdin();
    let mut line = String::new();
    stdin.lock().read_line(&mut line).unwrap();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut calls = 0u64;
    while Instant::now() < end {
        for i in 0..100 {
            level1(i, alloc);
        }
        calls += 100;
    }
    println!("done\ncalls {calls}");
    while stdin.lock().read_line(&mut line).is_ok_and(|n| n > 0) {}
}
