//! A demo workload with a known CPU profile, for TOE's README run, tests and benchmarks.
//!
//! `toe-demo spin [SECONDS]`: one thread repeats a cycle that spends 70% of its CPU time in
//! `hot_loop`, 25% in `warm_loop` and 5% in `cold_loop`, split by counts of the same unit of
//! work, so the shares hold whatever the machine's speed or load.
//! `toe-demo spincpu CPU_SECONDS`: the same cycle until the process has used CPU_SECONDS of CPU
//! time: a fixed number of samples at a given frequency, however busy the machine is.
//! `toe-demo fork [SECONDS]`: starts a child that runs `spin` too (for "children are followed").
//! `toe-demo work N [wait]`: a fixed amount of work (N units of `mix`), then prints how long it
//! took; with `wait`, starts after a line on stdin. The benchmark's workload.
//! `toe-demo sleep [SECONDS]`: an idle process (a target that never runs).
//! `toe-demo leak [COUNT] [SIZE]`: leaks COUNT blocks of SIZE bytes at `leaky_site`, balances
//! 20000 allocations at `balanced_site` (another thread) and grows buffers at `realloc_site`,
//! prints what it did as JSON, and stays alive a second.
//! `toe-demo forkleak [COUNT] [SIZE] [DELAY_MS] [GOFILE]`: forks after DELAY_MS (300), or once
//! GOFILE exists and DELAY_MS more; the child waits DELAY_MS, then runs `leak`.
//! `toe-demo touch [MIB] [SECONDS]`: faults MIB MiB in at `touch_pages`, then stays alive.
//! `toe-demo allocs N [ROUNDS] [wait]`: N malloc/free iterations with ROUNDS of arithmetic each
//! (the memory benchmark's workload); prints seconds taken and allocations per second.
//! `toe-demo trap SECONDS READYFILE [FORK_AFTER_MS PIDFILE]`: counts SIGTERM/SIGUSR1/SIGUSR2
//! instead of dying (a hung graceful shutdown), writes its pid to READYFILE once ready;
//! optionally forks a child that does the same and writes the child's pid to PIDFILE.
//! `toe-demo contend [SECONDS] [THREADS]`: THREADS (default 4) threads fight over one mutex held
//! for a short burst of work at `locked_section`: a workload that spends its time in lock and
//! futex paths.
//! `toe-demo waits SECONDS OUTFILE`: threads that wait in known ways (sleep, a held lock, a pipe,
//! vfork's uninterruptible wait, and one that alternates CPU and sleep), each timing its waits;
//! see `waits.rs`.
//! `toe-demo pingpong N [wait|go] [SPIN_US]`: two threads pass a byte over pipes N times
//! (context-switch heavy), each working SPIN_US microseconds (default 0) on the CPU before it
//! passes it on; prints seconds and round trips per second. The off-CPU benchmark's workload.
//! `toe-demo send NAME PID SIGNAL COUNT`: renames itself NAME and sends SIGNAL to PID COUNT times;
//! prints the count sent and the seconds taken.
//! `toe-demo sendrate NAME PID SIGNAL RATE SECONDS`: the same, paced at RATE per second.
//! `toe-demo words BYTES`: writes BYTES of pseudo-random words to stdout, the same every time:
//! input a compressor works hard on but does compress.

mod memory;
mod signals;
mod waits;

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

/// Busy arithmetic that the optimizer cannot remove, in rounds of a fixed size.
#[inline(never)]
pub(crate) fn mix(mut x: u64, rounds: u32) -> u64 {
    for i in 0..rounds {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(u64::from(i))
            ^ (x >> 29);
    }
    x
}

/// Burns `rounds` fixed-size rounds of arithmetic (attributed to whichever loop calls it). A
/// count, not a CPU-time budget: each round costs the same wherever it runs, so the loops'
/// shares are their rounds' shares however coarse the kernel's thread CPU clock is (on some
/// virtual machines it moves in whole ticks, which made a 0.5 ms budget cost a full 1 ms tick).
#[inline(never)]
fn burn(rounds: u64, seed: u64) -> u64 {
    let mut x = seed;
    for _ in 0..rounds {
        x = mix(x, 2_000);
    }
    x
}

#[inline(never)]
fn hot_loop(seed: u64) -> u64 {
    black_box(burn(700, seed))
}

#[inline(never)]
fn warm_loop(seed: u64) -> u64 {
    black_box(burn(250, seed))
}

#[inline(never)]
fn cold_loop(seed: u64) -> u64 {
    black_box(burn(50, seed))
}

fn spin(secs: f64) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    spin_while(|| Instant::now() < end);
}

/// CPU time this process has used (all threads), from `CLOCK_PROCESS_CPUTIME_ID`.
fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

fn spin_cpu(secs: f64) {
    let budget = Duration::from_secs_f64(secs);
    spin_while(|| process_cpu_time() < budget);
}

fn spin_while(mut go_on: impl FnMut() -> bool) {
    let mut x = 1;
    while go_on() {
        x = hot_loop(x);
        x = warm_loop(x);
        x = cold_loop(x);
    }
    black_box(x);
}

#[inline(never)]
fn locked_section(shared: &std::sync::Mutex<u64>) {
    let mut guard = shared.lock().expect("not poisoned");
    *guard = mix(*guard, 20);
}

fn contend(secs: f64, threads: usize) {
    let shared = std::sync::Mutex::new(1);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while Instant::now() < end {
                    locked_section(&shared);
                }
            });
        }
    });
    black_box(shared.into_inner().expect("not poisoned"));
}

#[inline(never)]
fn fixed_work(million_rounds: u64) -> u64 {
    let mut x = 1;
    for _ in 0..million_rounds * 500 {
        x = mix(x, 2_000);
    }
    x
}

/// Four words and numbers drawn by a linear congruential generator (Knuth's MMIX constants):
/// fixed, so a benchmark's input is the same on every run.
fn words(bytes: usize) {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut written = 0;
    let mut x: u64 = 1;
    while written < bytes {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let word = ["alpha ", "beta ", "gamma ", "delta\n"][usize::try_from(x >> 62).unwrap_or(0)];
        let number = format!("{} ", x >> 50);
        out.write_all(word.as_bytes())
            .and_then(|()| out.write_all(number.as_bytes()))
            .expect("stdout");
        written += word.len() + number.len();
    }
    out.flush().expect("stdout");
}

fn arg_secs(args: &[String], default: f64) -> f64 {
    args.get(2).and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("spin") | None => spin(arg_secs(&args, 10.0)),
        Some("spincpu") => spin_cpu(arg_secs(&args, 5.0)),
        Some("fork") => {
            let secs = arg_secs(&args, 10.0);
            let me = std::env::current_exe().expect("own path");
            let mut child = std::process::Command::new(me)
                .args(["spin", &secs.to_string()])
                .spawn()
                .expect("spawn child");
            spin(secs);
            child.wait().expect("wait child");
        }
        Some("contend") => contend(
            arg_secs(&args, 10.0),
            args.get(3).and_then(|s| s.parse().ok()).unwrap_or(4),
        ),
        Some("work") => {
            let n = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100);
            if args.get(3).is_some_and(|a| a == "wait") {
                // Start only when told, so a profiler can attach first (benchmarks).
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).expect("stdin");
            }
            let t = Instant::now();
            black_box(fixed_work(n));
            println!("{:.6}", t.elapsed().as_secs_f64());
        }
        Some("leak") => {
            let count = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5_000);
            let size = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1024);
            memory::leak(count, size, Duration::from_secs(1));
        }
        Some("forkleak") => {
            let count = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5_000);
            let size = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1024);
            let delay = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(300);
            memory::fork_leak(
                count,
                size,
                Duration::from_millis(delay),
                args.get(5).map(std::path::Path::new),
            );
        }
        Some("touch") => {
            let mib = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
            black_box(memory::touch_pages(mib));
            std::thread::sleep(Duration::from_secs_f64(
                args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1.0),
            ));
        }
        Some("allocs") => {
            let n: u64 = args
                .get(2)
                .and_then(|s| s.parse().ok())
                .unwrap_or(1_000_000);
            let rounds: u32 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(400);
            if args.iter().skip(3).any(|a| a == "wait") {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).expect("stdin");
            }
            let secs = memory::allocs(n, rounds);
            #[expect(clippy::cast_precision_loss, reason = "display")]
            let rate = n as f64 / secs;
            println!("{secs:.6} {rate:.0}");
        }
        Some(mode @ ("trap" | "send" | "sendrate")) => signals::main(mode, &args),
        Some("waits") => waits::main(
            arg_secs(&args, 3.0),
            args.get(3).map_or("waits.json", String::as_str),
        ),
        Some("pingpong") => waits::pingpong(
            args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200_000),
            args.get(3).is_some_and(|a| a == "wait"),
            Duration::from_secs_f64(
                args.get(4)
                    .and_then(|s| s.parse::<f64>().ok())
                    .unwrap_or(0.0)
                    / 1e6,
            ),
        ),
        Some("sleep") => std::thread::sleep(Duration::from_secs_f64(arg_secs(&args, 10.0))),
        Some("words") => words(args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1 << 20)),
        Some(other) => {
            eprintln!(
                "toe-demo: unknown mode {other}; use spin|fork|contend|work|sleep|waits|pingpong|leak|forkleak|touch|allocs|trap|send|sendrate|words [ARGS]"
            );
            std::process::exit(2);
        }
    }
}
