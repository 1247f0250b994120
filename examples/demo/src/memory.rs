//! Allocation workloads with known answers: a leaking call site, a balanced one, a realloc-heavy
//! one, a page-touching one, and an allocation-heavy loop for benchmarks. They call libc's
//! allocator directly so each call site is one function with a known name.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

/// Allocates `size` bytes `count` times and never frees them. The pointers are kept in `keep`
/// (allocated by the caller beforehand) so nothing is reported twice.
#[inline(never)]
pub fn leaky_site(count: usize, size: usize, keep: &mut Vec<*mut libc::c_void>) {
    for _ in 0..count {
        // SAFETY: plain malloc; the block is written once so it is really used.
        let p = unsafe { libc::malloc(size) };
        assert!(!p.is_null(), "malloc failed");
        unsafe { p.cast::<u8>().write_volatile(1) };
        keep.push(p);
    }
}

/// Allocates and frees the same number of blocks: nothing stays in use.
#[inline(never)]
pub fn balanced_site(count: usize, size: usize) {
    for i in 0..count {
        // SAFETY: every block is freed right after use; calloc's product cannot overflow here.
        unsafe {
            let p = if i % 2 == 0 {
                libc::malloc(size)
            } else {
                libc::calloc(1, size)
            };
            assert!(!p.is_null(), "allocation failed");
            p.cast::<u8>().write_volatile(2);
            black_box(p);
            libc::free(p);
        }
        // free(NULL) is legal and must be accounted as a no-op. black_box keeps LLVM from
        // deleting the call, which it knows does nothing.
        unsafe { libc::free(black_box(std::ptr::null_mut())) };
    }
}

/// Grows a buffer with realloc from 16 bytes to `max` (doubling, so blocks move), then frees it;
/// also exercises realloc(NULL, n) and realloc(p, 0).
#[inline(never)]
pub fn realloc_site(cycles: usize, max: usize) {
    for _ in 0..cycles {
        // SAFETY: each realloc result replaces the previous pointer; the last one is freed.
        unsafe {
            let mut p = libc::realloc(std::ptr::null_mut(), 16);
            let mut size = 16;
            while size < max {
                size *= 2;
                p = libc::realloc(p, size);
                assert!(!p.is_null(), "realloc failed");
                p.cast::<u8>().add(size - 1).write_volatile(3);
            }
            // glibc frees the block and returns NULL.
            let q = libc::realloc(p, 0);
            if !q.is_null() {
                libc::free(q);
            }
        }
    }
}

/// Writes one byte to every page of a fresh `mib` MiB block: each write faults a page in here.
#[inline(never)]
pub fn touch_pages(mib: usize) -> *mut u8 {
    let len = mib << 20;
    // SAFETY: large malloc (served by mmap); every page written is inside the block.
    let p = unsafe { libc::malloc(len) }.cast::<u8>();
    assert!(!p.is_null(), "malloc failed");
    // Small pages only: with transparent huge pages one fault can map 2 MiB, and the number of
    // faults would depend on the host's THP setting instead of on the pages touched.
    let start = (p as usize) & !4095;
    // SAFETY: advice on the mapping that backs this block; it changes no contents.
    unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            len + (p as usize - start),
            libc::MADV_NOHUGEPAGE,
        );
    }
    let mut off = 0;
    while off < len {
        unsafe { p.add(off).write_volatile(4) };
        off += 4096;
    }
    p
}

/// What `leak` did, printed as JSON for tests.
pub fn leak(count: usize, size: usize, settle: Duration) {
    let mut keep = Vec::with_capacity(count);
    // The balanced site runs in a second thread: per-thread accounting must hold.
    let balanced = std::thread::spawn(move || balanced_site(20_000, 512));
    leaky_site(count, size, &mut keep);
    realloc_site(2_000, 64 << 10);
    balanced.join().expect("balanced thread");
    println!(
        "{{\"leaked_bytes\":{},\"leaked_objects\":{count},\"balanced_objects\":20000,\"balanced_bytes\":{}}}",
        count * size,
        20_000 * 512
    );
    // Live long enough for the profiler to symbolize the last call sites.
    std::thread::sleep(settle);
    black_box(keep);
}

/// Forks after `delay` (counted from when `go` exists, if given; at most a minute's wait); the
/// child waits `delay` more, then runs `leak`.
pub fn fork_leak(count: usize, size: usize, delay: Duration, go: Option<&std::path::Path>) {
    if let Some(go) = go {
        let t = Instant::now();
        while !go.exists() && t.elapsed() < Duration::from_mins(1) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    std::thread::sleep(delay);
    // SAFETY: single-threaded here; the child only sleeps, allocates and exits.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork failed");
    if child == 0 {
        std::thread::sleep(delay);
        leak(count, size, Duration::from_secs(1));
        std::process::exit(0);
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(child, &raw mut status, 0) };
    eprintln!("child {child} exited");
}

/// An allocation-heavy loop: `n` iterations of malloc, a little work, and free, with a quarter of
/// the blocks kept alive in a ring for a while (a realistic live set). Prints seconds taken.
#[inline(never)]
pub fn allocs(n: u64, rounds: u32) -> f64 {
    const RING: usize = 1024;
    let mut ring = [std::ptr::null_mut::<libc::c_void>(); RING];
    let t = Instant::now();
    let mut x = 1u64;
    for i in 0..n {
        let size = 16 + usize::try_from(x % 1008).unwrap_or(0);
        // SAFETY: blocks are freed exactly once (immediately, or when their ring slot is reused).
        unsafe {
            let p = libc::malloc(size);
            p.cast::<u8>().write_volatile(5);
            x = crate::mix(x, rounds);
            if i % 4 == 0 {
                let slot = usize::try_from(i / 4).unwrap_or(0) % RING;
                libc::free(ring[slot]);
                ring[slot] = p;
            } else {
                libc::free(p);
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    for p in ring {
        // SAFETY: the remaining ring blocks, freed once.
        unsafe { libc::free(p) };
    }
    black_box(x);
    secs
}
