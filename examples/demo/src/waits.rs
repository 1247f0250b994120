//! Off-CPU workloads: threads that wait in known ways, each in its own function, timing every
//! wait themselves, so a profile's off-CPU time per function can be checked against the truth.
//!
//! `toe-demo waits SECONDS OUTFILE`: for SECONDS, thread `sleeper` sleeps 100 ms at a time in
//! `sleep_waits`; thread `locker` waits in `lock_waits` for a mutex thread `holder` keeps for
//! 60 ms at a time; thread `reader` waits in `pipe_waits` for a byte that thread `writer` sends
//! every 80 ms; thread `vforker` waits in `vfork_waits` (uninterruptible, `D`) for a vfork child
//! that sleeps 50 ms; thread `mixed` burns 20 ms of CPU in `mixed_burn` and sleeps 30 ms in
//! `mixed_sleep`. Then writes, per function, the total nanoseconds spent in its waits, and per
//! thread its lifetime and the CPU time it used, as JSON to OUTFILE.

use std::{
    fmt::Write as _,
    hint::black_box,
    io::{Read as _, Write as _},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawn thread")
}

#[inline(never)]
fn sleep_waits() -> Duration {
    let t = Instant::now();
    thread::sleep(Duration::from_millis(100));
    t.elapsed()
}

#[inline(never)]
fn lock_waits(m: &Mutex<u64>) -> Duration {
    let t = Instant::now();
    let mut g = m.lock().expect("lock");
    let waited = t.elapsed();
    *g += 1;
    waited
}

#[inline(never)]
fn pipe_waits(r: &mut std::fs::File) -> Option<Duration> {
    let mut b = [0u8; 1];
    let t = Instant::now();
    (r.read(&mut b).ok()? == 1).then(|| t.elapsed())
}

#[inline(never)]
fn vfork_waits() -> Duration {
    let t = Instant::now();
    let pid = vfork_child_sleeps();
    // The parent resumes when the child exits: the call above is the time it was held.
    let held = t.elapsed();
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    held
}

/// Its own function because a frame-pointer unwinder loses the caller of a libc function built
/// without them (vfork here): the lost frame is this one, and `vfork_waits` stays in the stack.
#[inline(never)]
fn vfork_child_sleeps() -> libc::pid_t {
    // SAFETY: the child shares our memory and stack until it exits: it only calls
    // async-signal-safe functions (nanosleep, _exit) and touches nothing of ours.
    #[expect(deprecated, reason = "vfork is the simplest way to wait in D state")]
    let pid = unsafe { libc::vfork() };
    if pid == 0 {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 50_000_000,
        };
        // SAFETY: see above.
        unsafe {
            libc::nanosleep(&raw const ts, std::ptr::null_mut());
            libc::_exit(0);
        }
    }
    pid
}

#[inline(never)]
fn mixed_burn() {
    let end = Instant::now() + Duration::from_millis(20);
    let mut x = 1u64;
    while Instant::now() < end {
        x = black_box(crate::mix(x, 1_000));
    }
}

#[inline(never)]
fn mixed_sleep() -> Duration {
    let t = Instant::now();
    thread::sleep(Duration::from_millis(30));
    t.elapsed()
}

/// Runs `f` until `until`, summing the waits it reports; returns (total, thread lifetime, CPU
/// time the thread used).
fn timed_loop(until: Instant, mut f: impl FnMut() -> Option<Duration>) -> (u128, u128, u128) {
    let born = Instant::now();
    let mut total = 0u128;
    while Instant::now() < until {
        if let Some(d) = f() {
            total += d.as_nanos();
        }
    }
    (total, born.elapsed().as_nanos(), thread_cpu_ns())
}

/// The calling thread's CPU time so far. A thread that burns for a wall-clock time on a busy
/// machine gets less than that on a CPU: the rest it waits runnable.
fn thread_cpu_ns() -> u128 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut t) };
    u128::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u128::try_from(t.tv_nsec).unwrap_or(0)
}

pub fn main(secs: f64, out: &str) {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let stop = Arc::new(AtomicBool::new(false));
    let lock = Arc::new(Mutex::new(0u64));
    let (mut rd, mut wr) = {
        let mut fds = [0; 2];
        // SAFETY: valid out-array of two fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
        // SAFETY: fresh fds we own.
        unsafe {
            use std::os::fd::FromRawFd as _;
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    };
    let holder = {
        let (lock, stop) = (Arc::clone(&lock), Arc::clone(&stop));
        spawn("holder", move || {
            while !stop.load(Ordering::Relaxed) {
                let g = lock.lock().expect("lock");
                thread::sleep(Duration::from_millis(60));
                drop(g);
                // Long enough for the waiter to take the lock in between.
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let writer = {
        let stop = Arc::clone(&stop);
        spawn("writer", move || {
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(80));
                let _ = wr.write_all(b"x");
            }
            // Closing the pipe ends the reader's last read.
            drop(wr);
        })
    };
    let waiters = [
        ("sleep_waits", "sleeper"),
        ("lock_waits", "locker"),
        ("pipe_waits", "reader"),
        ("vfork_waits", "vforker"),
        ("mixed_sleep", "mixed"),
    ];
    let handles: Vec<thread::JoinHandle<(u128, u128, u128)>> = waiters
        .iter()
        .map(|&(function, name)| {
            let lock = Arc::clone(&lock);
            let mut rd = (function == "pipe_waits").then(|| rd.try_clone().expect("dup"));
            spawn(name, move || match function {
                "sleep_waits" => timed_loop(until, || Some(sleep_waits())),
                "lock_waits" => timed_loop(until, || {
                    let w = lock_waits(&lock);
                    // Let the holder take it again.
                    thread::sleep(Duration::from_millis(2));
                    Some(w)
                }),
                "pipe_waits" => timed_loop(until, || pipe_waits(rd.as_mut().expect("pipe"))),
                "vfork_waits" => timed_loop(until, || Some(vfork_waits())),
                _ => timed_loop(until, || {
                    mixed_burn();
                    Some(mixed_sleep())
                }),
            })
        })
        .collect();
    let results: Vec<(u128, u128, u128)> = handles
        .into_iter()
        .map(|h| h.join().expect("waiter"))
        .collect();
    stop.store(true, Ordering::Relaxed);
    holder.join().expect("holder");
    writer.join().expect("writer");
    drop(rd.read(&mut [0u8; 0]));
    let mut json = String::from("{");
    for (i, ((function, thread), (waited, life, cpu))) in waiters.iter().zip(results).enumerate() {
        if i > 0 {
            json.push(',');
        }
        let _ = write!(
            json,
            "\"{function}\":{{\"thread\":\"{thread}\",\"waited_ns\":{waited},\"life_ns\":{life},\
             \"cpu_ns\":{cpu}}}"
        );
    }
    json.push('}');
    std::fs::write(out, json).expect("write result");
}

/// `toe-demo pingpong N [wait]`: two threads pass one byte back and forth over two pipes N
/// times, each blocking in read between turns; prints the seconds taken and round trips per
/// second. The off-CPU benchmark's workload. Both threads share one CPU, so every turn is a
/// direct switch from one to the other (two per round trip): on two CPUs the time would be
/// wakeup latency out of idle, which tracing can even shorten.
/// Work on the CPU for `d` (nothing when zero): what a workload does between two switches.
fn busy(d: Duration) {
    if d.is_zero() {
        return;
    }
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

pub fn pingpong(n: u64, wait: bool, spin: Duration) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it; affinity of this thread,
    // inherited by the thread it spawns.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
    }
    let pipe = || {
        let mut fds = [0; 2];
        // SAFETY: valid out-array of two fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
        // SAFETY: fresh fds we own.
        unsafe {
            use std::os::fd::FromRawFd as _;
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    };
    let ((mut a_rd, mut b_wr), (mut b_rd, mut a_wr)) = (pipe(), pipe());
    if wait {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).expect("stdin");
    }
    let t = Instant::now();
    let pong = spawn("pong", move || {
        let mut b = [0u8; 1];
        for _ in 0..n {
            if a_rd.read_exact(&mut b).is_err() {
                break;
            }
            busy(spin);
            if a_wr.write_all(&b).is_err() {
                break;
            }
        }
    });
    let mut b = [1u8; 1];
    for _ in 0..n {
        busy(spin);
        b_wr.write_all(&b).expect("write");
        b_rd.read_exact(&mut b).expect("read");
    }
    pong.join().expect("pong");
    let secs = t.elapsed().as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
    let rate = n as f64 / secs;
    println!("{secs:.6} {rate:.0}");
}
