//! A CPU-bound Rust program built without frame pointers (the default of a release build): a
//! 100-deep recursion under `descend`, then a hot loop in `burn`, for as many seconds as asked.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

#[inline(never)]
fn burn(mut x: u64) -> u64 {
    for _ in 0..100_000 {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    }
    x
}

#[inline(never)]
fn descend(depth: u32, acc: u64, until: Instant) -> u64 {
    if depth == 0 {
        let mut x = acc;
        while Instant::now() < until {
            x = black_box(burn(x));
        }
        return x;
    }
    let r = descend(depth - 1, black_box(acc + u64::from(depth)), until);
    // Work after the call, so the recursion stays a recursion.
    black_box(r) + 1
}

fn main() {
    let mut args = std::env::args().skip(1);
    let depth = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let seconds = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let until = Instant::now() + Duration::from_secs(seconds);
    std::process::exit(i32::from(descend(depth, 1, until) == 0));
}
