//! Stress workers: the `toe` binary re-executed as `toe __worker --run <id> cpu|memory ...`,
//! joined to the target's cgroups before exec (so every cycle and byte is charged to the target
//! from the first instruction) and killed with TOE if TOE dies (`PR_SET_PDEATHSIG`).

use std::{
    ffi::OsString,
    io,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::ledger::WORKER_ARG;

/// Environment variable naming the `toe` binary to run workers from (tests run the engine
/// in-process, from a test binary).
pub const BIN_ENV: &str = "TOE_BIN";

/// The `toe` binary: `$TOE_BIN`, this executable if it is `toe`, or `toe` next to it or one
/// directory up (cargo puts test binaries in `deps/`).
pub fn toe_binary() -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os(BIN_ENV) {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe()?;
    if me.file_name().is_some_and(|n| n == "toe") {
        return Ok(me);
    }
    me.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("toe"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("the toe binary (set {BIN_ENV})"),
            )
        })
}

/// Starts one worker with `args` (after `cpu`/`memory`), inside the cgroups whose
/// `cgroup.procs` files are given.
pub fn spawn(run: &str, args: &[String], procs_files: &[PathBuf]) -> io::Result<Child> {
    let mut cmd = Command::new(toe_binary()?);
    cmd.arg(WORKER_ARG)
        .args(["--run", run])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let files = procs_files.to_vec();
    // SAFETY: between fork and exec only prctl and open/write/close run, all async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            for f in &files {
                std::fs::write(f, b"0")?;
            }
            Ok(())
        });
    }
    cmd.spawn()
}

fn thread_cpu_ns() -> u64 {
    crate::clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

const PERIOD: Duration = Duration::from_millis(100);

/// Burns `duty` (0..=1) of each 100 ms period in CPU time, measured on this thread's CPU clock:
/// a throttled worker gets less, never more, than its cgroup allows.
fn cpu(duty: f64) -> ! {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "duty is clamped to 0..=1"
    )]
    let budget = (duty.clamp(0.0, 1.0) * 1e8) as u64;
    let mut next = Instant::now();
    let mut x: u64 = 1;
    loop {
        let end = thread_cpu_ns() + budget;
        while thread_cpu_ns() < end {
            for _ in 0..1000 {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            }
            std::hint::black_box(x);
        }
        next += PERIOD;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        } else {
            next = Instant::now();
        }
    }
}

/// Maps `bytes` of anonymous memory and writes every page, evenly over `ramp`, then holds it.
fn memory(bytes: usize, ramp: Duration) -> ! {
    // SAFETY: a fresh private anonymous mapping; only this function touches it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert!(p != libc::MAP_FAILED, "mmap of {bytes} bytes failed");
    // Small pages: the charge then grows page by page, as asked, whatever the THP setting.
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(p, bytes, libc::MADV_NOHUGEPAGE) };
    let base = p.cast::<u8>();
    let pages = bytes.div_ceil(4096);
    let start = Instant::now();
    for i in 0..pages {
        // SAFETY: i * 4096 < bytes rounded up to the page; the mapping covers whole pages.
        unsafe { base.add(i * 4096).write_volatile(1) };
        if !ramp.is_zero() && i % 256 == 0 {
            #[expect(clippy::cast_precision_loss, reason = "progress fraction")]
            let due = ramp.mul_f64(i as f64 / pages as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    loop {
        std::thread::sleep(Duration::from_hours(1));
    }
}

/// `toe __worker --run <id> cpu <duty> | memory <bytes> <ramp_ms>`.
pub fn main(args: &[OsString]) -> ! {
    // First in line for the OOM killer, before the target's own processes and the node's: a
    // worker inherits the agent's score (system-node-critical in a cluster), and the memory it
    // takes is the fault's, not a reason to kill a neighbour. Raising one's own score needs no
    // privilege; a worker that cannot (a kernel without the file) is refused rather than left
    // protected.
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "1000") {
        eprintln!("toe __worker: setting oom_score_adj: {e}");
        std::process::exit(2)
    }
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let kind = args.iter().skip_while(|a| *a != "--run").nth(2);
    let rest: Vec<&String> = args.iter().skip_while(|a| *a != "--run").skip(3).collect();
    let num = |i: usize| -> f64 {
        rest.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("worker argument {i} missing"))
    };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "parsed from TOE's own integers"
    )]
    match kind.map(String::as_str) {
        Some("cpu") => cpu(num(0)),
        Some("memory") => memory(num(0) as usize, Duration::from_millis(num(1) as u64)),
        other => {
            eprintln!("toe __worker: unknown kind {other:?}");
            std::process::exit(2)
        }
    }
}
