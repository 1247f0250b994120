//! Signal workloads: a target that handles (and survives) SIGTERM, and a named sender.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

static RECEIVED: AtomicU64 = AtomicU64::new(0);

extern "C" fn count(_: libc::c_int) {
    RECEIVED.fetch_add(1, Ordering::Relaxed);
}

fn install_handlers() {
    for sig in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM] {
        // SAFETY: the handler only touches an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, count as *const () as libc::sighandler_t) };
    }
}

/// Sleeps until `until`, through signal interruptions.
fn idle_until(until: Instant) {
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Handles SIGTERM, SIGUSR1 and SIGUSR2 by counting them, like a server whose graceful shutdown
/// hangs: only SIGKILL (or the end of `secs`) ends it. Writes its pid to `ready` once the
/// handlers are in place. With `fork`, starts a child that does the same after the given delay
/// and writes the child's pid to the given file.
pub fn trap(secs: f64, ready: &str, fork: Option<(Duration, String)>) {
    install_handlers();
    std::fs::write(ready, std::process::id().to_string()).expect("write ready file");
    let end = Instant::now() + Duration::from_secs_f64(secs);
    if let Some((after, pidfile)) = fork {
        std::thread::sleep(after);
        // SAFETY: single-threaded process; the child only sleeps and counts signals.
        match unsafe { libc::fork() } {
            0 => {
                idle_until(end);
                std::process::exit(0);
            }
            -1 => panic!("fork failed"),
            child => std::fs::write(&pidfile, child.to_string()).expect("write pid file"),
        }
    }
    idle_until(end);
}

fn rename(name: &str) {
    let mut comm = [0u8; 16];
    let n = name.len().min(15);
    comm[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, comm.as_ptr()) };
}

fn kill_n(pid: i32, sig: i32, n: u64) -> u64 {
    let mut ok = 0;
    for _ in 0..n {
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(pid, sig) } == 0 {
            ok += 1;
        }
    }
    ok
}

/// Renames itself to `name` (so it shows up as that sender) and sends `sig` to `pid` `count`
/// times as fast as it can; prints how many sends succeeded and the seconds it took.
pub fn send(name: &str, pid: i32, sig: i32, count: u64) {
    rename(name);
    let t = Instant::now();
    let ok = kill_n(pid, sig, count);
    println!("{ok} {:.6}", t.elapsed().as_secs_f64());
}

/// Like [`send`], paced at `rate` signals per second for `secs` (in 1 ms slots); prints the
/// signals sent and the rate achieved.
pub fn send_rate(name: &str, pid: i32, sig: i32, rate: u64, secs: f64) {
    rename(name);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let per_slot = (rate / 1000).max(1);
    let mut ok = 0;
    let mut slot = start;
    while Instant::now() < end {
        ok += kill_n(pid, sig, per_slot);
        slot += Duration::from_millis(1);
        if let Some(wait) = slot.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "display")]
    let achieved = ok as f64 / start.elapsed().as_secs_f64();
    println!("{ok} {achieved:.0}");
}

/// `trap`, `send` and `sendrate` from the command line (see the crate documentation).
pub fn main(mode: &str, args: &[String]) {
    let num = |i: usize| -> f64 {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{mode}: argument {i} must be a number"))
    };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "small integers given as numbers"
    )]
    match mode {
        "trap" => {
            let fork = match (args.get(4), args.get(5)) {
                (Some(_), Some(file)) => Some((Duration::from_millis(num(4) as u64), file.clone())),
                _ => None,
            };
            let ready = args.get(3).expect("trap SECONDS READYFILE");
            trap(num(2), ready, fork);
        }
        "send" => send(&args[2], num(3) as i32, num(4) as i32, num(5) as u64),
        _ => send_rate(
            &args[2],
            num(3) as i32,
            num(4) as i32,
            num(5) as u64,
            num(6),
        ),
    }
}
