//! `cargo xtask bench cpu`: the cost of sampling a fixed CPU-bound workload, TOE versus perf, at
//! the same frequencies. `cargo xtask bench memory`: the cost of the memory collector's modes on an
//! allocation-heavy workload, versus the same probes as a bpftrace script. Every configuration
//! runs once per round, rounds are interleaved (the starting configuration rotates) and ratios
//! are taken within a round, because these machines drift 10-20% between runs.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;

use crate::{is_root, root};

#[derive(Subcommand)]
pub enum Which {
    /// Sampling overhead, agent RSS and CPU, time to artifacts.
    Cpu {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Units of fixed work per run (about 2 ms each on these machines; 1500 is ~3 s).
        #[arg(long, default_value_t = 1500)]
        work: u64,
        /// Skip the 30 s run that measures time-to-artifacts.
        #[arg(long)]
        quick: bool,
    },
    /// Allocation tracking overhead (exact, sampled, growth) versus bpftrace.
    Memory {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// malloc/free iterations per run.
        #[arg(long, default_value_t = 300_000)]
        allocs: u64,
        /// Arithmetic rounds between allocations; 5000 gives about 100k allocations/s here.
        #[arg(long, default_value_t = 5000)]
        work: u32,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    None,
    Toe(u64),
    Perf(u64),
}

impl Mode {
    fn label(self) -> String {
        match self {
            Self::None => "none".into(),
            Self::Toe(f) => format!("toe@{f}"),
            Self::Perf(f) => format!("perf@{f}"),
        }
    }
}

#[derive(Default, Clone)]
struct Measured {
    /// Workload wall time as the workload measured it.
    secs: f64,
    /// Profiler peak RSS (KiB) and CPU seconds, from wait4.
    maxrss_kib: i64,
    cpu_secs: f64,
    finalize_ms: u64,
    /// The profiler's `--json` summary, when it is TOE.
    summary: serde_json::Value,
}

fn spec(dir: &Path, freq: u64, duration: &str) -> Result<std::path::PathBuf> {
    let p = dir.join(format!("cpu-{freq}-{duration}.yaml"));
    std::fs::write(
        &p,
        format!(
            "apiVersion: toe.run/v1alpha1\nkind: PowerTool\nmetadata: {{name: bench}}\nspec:\n  tool:\n    name: cpu-profile\n    duration: {duration}\n    commandLineArguments: [\"--frequency={freq}\"]\n"
        ),
    )?;
    Ok(p)
}

/// Waits for `child` with wait4, returning (success, peak RSS KiB, CPU seconds) of that process.
fn wait4(child: &Child) -> Result<(bool, i64, f64)> {
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = i32::try_from(child.id())?;
    // SAFETY: pid is our own unreaped child.
    let r = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut usage) };
    if r != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    #[expect(clippy::cast_precision_loss, reason = "seconds for display")]
    let cpu = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        usage.ru_maxrss,
        cpu(usage.ru_utime) + cpu(usage.ru_stime),
    ))
}

fn once(mode: Mode, work: u64, tmp: &Path) -> Result<Measured> {
    let bin = root().join("target/release");
    let out = tmp.join("out");
    measure(&["work", &work.to_string(), "wait"], &mode.label(), |pid| {
        Ok(match mode {
            Mode::None => None,
            Mode::Toe(f) => Some(
                Command::new(bin.join("toe"))
                    .args(["run", "--no-progress", "--json", "-f"])
                    .arg(spec(tmp, f, "5m")?)
                    .args(["--pid", pid, "-o"])
                    .arg(&out)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()?,
            ),
            Mode::Perf(f) => Some(
                Command::new("perf")
                    .args(["record", "-q", "-g", "-F", &f.to_string(), "-p", pid, "-o"])
                    .arg(tmp.join("perf.data"))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting perf (Debian package linux-perf)")?,
            ),
        })
    })
}

/// Runs the demo with `workload` args (it waits for a line on stdin), starts the profiler that
/// `profiler` spawns for its pid, lets both settle, then times the workload.
fn measure(
    workload: &[&str],
    label: &str,
    profiler: impl FnOnce(&str) -> Result<Option<Child>>,
) -> Result<Measured> {
    let bin = root().join("target/release");
    let mut demo = Command::new(bin.join("toe-demo"))
        .args(workload)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = demo.id().to_string();
    let profiler = profiler(&pid)?;
    // Same settle time for every mode, so attach cost never lands inside the measured work.
    std::thread::sleep(Duration::from_secs(1));
    demo.stdin.take().expect("piped").write_all(b"go\n")?;
    let mut line = String::new();
    BufReader::new(demo.stdout.take().expect("piped")).read_line(&mut line)?;
    demo.wait()?;
    let secs: f64 = line
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("demo printed {line:?}"))?;
    let mut m = Measured {
        secs,
        ..Measured::default()
    };
    if let Some(mut p) = profiler {
        let stdout = p.stdout.take();
        let (ok, rss, cpu) = wait4(&p)?;
        if !ok {
            bail!("{label} failed");
        }
        m.maxrss_kib = rss;
        m.cpu_secs = cpu;
        if let Some(s) = stdout {
            let v: serde_json::Value = serde_json::from_reader(s).context("toe --json summary")?;
            m.finalize_ms = v["finalize_ms"].as_u64().unwrap_or(0);
            m.summary = v;
        }
    }
    Ok(m)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Per mode: median workload seconds, median per-round slowdown against mode 0 (percent), peak
/// profiler RSS (MB) and mean profiler CPU seconds.
fn columns(results: &[Vec<Measured>], i: usize) -> (f64, f64, f64, f64) {
    let ratios: Vec<f64> = results[i]
        .iter()
        .zip(&results[0])
        .map(|(m, base)| m.secs / base.secs)
        .collect();
    let rss = results[i].iter().map(|m| m.maxrss_kib).max().unwrap_or(0);
    #[expect(clippy::cast_precision_loss, reason = "display")]
    let cpu = results[i].iter().map(|m| m.cpu_secs).sum::<f64>() / results[i].len().max(1) as f64;
    #[expect(clippy::cast_precision_loss, reason = "display")]
    let rss_mb = rss as f64 / 1024.0;
    (
        median(results[i].iter().map(|m| m.secs).collect()),
        (median(ratios) - 1.0) * 100.0,
        rss_mb,
        cpu,
    )
}

fn cpu_bench(rounds: usize, work: u64, quick: bool) -> Result<()> {
    if !is_root() {
        bail!("the benchmark loads eBPF programs and runs perf: run it as root");
    }
    let tmp = std::env::temp_dir().join(format!("toe-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let modes = [
        Mode::None,
        Mode::Toe(99),
        Mode::Perf(99),
        Mode::Toe(999),
        Mode::Perf(999),
    ];
    let mut results: Vec<Vec<Measured>> = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        for k in 0..modes.len() {
            let i = (k + round) % modes.len();
            let m = once(modes[i], work, &tmp)?;
            eprintln!(
                "round {}/{rounds} {:<9} {:.3}s",
                round + 1,
                modes[i].label(),
                m.secs
            );
            results[i].push(m);
        }
    }
    println!(
        "\nCPU sampling overhead: median over {rounds} interleaved rounds of the per-round ratio to no profiler"
    );
    println!(
        "{:<9} {:>9} {:>10} {:>12} {:>12} {:>12}",
        "mode", "median s", "slowdown", "peak RSS MB", "CPU s", "finalize ms"
    );
    for (i, mode) in modes.iter().enumerate() {
        let (secs, slowdown, rss_mb, cpu) = columns(&results, i);
        let fin = results[i].iter().map(|m| m.finalize_ms).max().unwrap_or(0);
        println!(
            "{:<9} {secs:>9.3} {slowdown:>+9.2}% {rss_mb:>12.1} {cpu:>12.3} {fin:>12}",
            mode.label()
        );
    }
    for f in [99, 999] {
        let t = modes.iter().position(|m| *m == Mode::Toe(f)).expect("mode");
        let p = modes
            .iter()
            .position(|m| *m == Mode::Perf(f))
            .expect("mode");
        let r: Vec<f64> = results[t]
            .iter()
            .zip(&results[p])
            .map(|(a, b)| a.secs / b.secs)
            .collect();
        println!(
            "toe/perf workload time at {f} Hz: {:.4} (median per-round ratio; < 1 means TOE slows it less)",
            median(r)
        );
    }
    if !quick {
        let mut demo = Command::new(root().join("target/release/toe-demo"))
            .args(["spin", "40"])
            .spawn()?;
        let out = Command::new(root().join("target/release/toe"))
            .args(["run", "--no-progress", "--json", "-f"])
            .arg(spec(&tmp, 99, "30s")?)
            .args(["--pid", &demo.id().to_string(), "-o"])
            .arg(tmp.join("out"))
            .stderr(Stdio::null())
            .output()?;
        demo.kill()?;
        demo.wait()?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("toe --json summary")?;
        println!(
            "30 s run at 99 Hz: artifacts written {} ms after sampling ended",
            v["finalize_ms"]
        );
    }
    std::fs::remove_dir_all(&tmp).ok();
    Ok(())
}

/// The bpftrace peer: the same entry/return/free probes and per-stack accounting, attached to
/// the one process (`-p`) as TOE attaches per process.
const BPFTRACE_PEER: &str = r"
uprobe:LIBC:malloc { @req[tid] = arg0; }
uretprobe:LIBC:malloc /@req[tid]/ { @sz[retval] = @req[tid]; @site[ustack] = sum(@req[tid]); delete(@req[tid]); }
uprobe:LIBC:free /@sz[arg0]/ { delete(@sz[arg0]); }
";

fn memory_spec(dir: &Path, mode: &str) -> Result<std::path::PathBuf> {
    let p = dir.join(format!("memory-{mode}.yaml"));
    std::fs::write(
        &p,
        format!(
            "apiVersion: toe.run/v1alpha1\nkind: PowerTool\nmetadata: {{name: bench}}\nspec:\n  tool:\n    name: memory-profile\n    duration: 5m\n    commandLineArguments: [\"--mode={mode}\"]\n"
        ),
    )?;
    Ok(p)
}

fn memory_bench(rounds: usize, allocs: u64, work: u32) -> Result<()> {
    if !is_root() {
        bail!("the benchmark loads eBPF programs and runs bpftrace: run it as root");
    }
    let bpftrace =
        which::which("bpftrace").context("bpftrace (Debian package bpftrace) is the peer")?;
    let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    let tmp = std::env::temp_dir().join(format!("toe-bench-mem-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let script = tmp.join("peer.bt");
    std::fs::write(&script, BPFTRACE_PEER.replace("LIBC", libc))?;
    let modes = ["none", "exact", "sampled", "growth", "bpftrace"];
    let workload = [
        "allocs".to_owned(),
        allocs.to_string(),
        work.to_string(),
        "wait".to_owned(),
    ];
    let workload: Vec<&str> = workload.iter().map(String::as_str).collect();
    let mut results: Vec<Vec<Measured>> = vec![Vec::new(); modes.len()];
    let mut rate = Vec::new();
    for round in 0..rounds {
        for k in 0..modes.len() {
            let i = (k + round) % modes.len();
            let mode = modes[i];
            let m = measure(&workload, mode, |pid| {
                Ok(match mode {
                    "none" => None,
                    "bpftrace" => Some(
                        Command::new(&bpftrace)
                            .arg("-p")
                            .arg(pid)
                            .arg(&script)
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()?,
                    ),
                    toe_mode => Some(
                        Command::new(root().join("target/release/toe"))
                            .args(["run", "--no-progress", "--json", "-f"])
                            .arg(memory_spec(&tmp, toe_mode)?)
                            .args(["--pid", pid, "-o"])
                            .arg(tmp.join("out"))
                            .stdout(Stdio::piped())
                            .stderr(Stdio::null())
                            .spawn()?,
                    ),
                })
            })?;
            if mode == "none" {
                #[expect(clippy::cast_precision_loss, reason = "display")]
                rate.push(allocs as f64 / m.secs);
            }
            eprintln!("round {}/{rounds} {mode:<9} {:.3}s", round + 1, m.secs);
            results[i].push(m);
        }
    }
    println!(
        "\nMemory collector overhead on `toe-demo allocs` ({:.0} allocations/s unprofiled, plus as many frees): median over {rounds} interleaved rounds of the per-round ratio to no profiler",
        median(rate)
    );
    println!(
        "{:<9} {:>9} {:>10} {:>12} {:>12} {:>10}",
        "mode", "median s", "slowdown", "peak RSS MB", "CPU s", "tracked"
    );
    for (i, mode) in modes.iter().enumerate() {
        let (secs, slowdown, rss_mb, cpu) = columns(&results, i);
        let tracked = results[i]
            .last()
            .and_then(|m| m.summary["memory"]["allocations"]["tracked"].as_u64())
            .map_or_else(|| "-".to_owned(), |t| t.to_string());
        println!(
            "{mode:<9} {secs:>9.3} {slowdown:>+9.2}% {rss_mb:>12.1} {cpu:>12.3} {tracked:>10}"
        );
    }
    let exact = 1;
    let peer = modes.len() - 1;
    let r: Vec<f64> = results[exact]
        .iter()
        .zip(&results[peer])
        .map(|(a, b)| a.secs / b.secs)
        .collect();
    println!(
        "toe exact / bpftrace workload time: {:.4} (median per-round ratio; < 1 means TOE slows it less)",
        median(r)
    );
    std::fs::remove_dir_all(&tmp).ok();
    Ok(())
}

pub fn run(which: &Which) -> Result<()> {
    match which {
        Which::Cpu {
            rounds,
            work,
            quick,
        } => cpu_bench(*rounds, *work, *quick),
        Which::Memory {
            rounds,
            allocs,
            work,
        } => memory_bench(*rounds, *allocs, *work),
    }
}
