//! `cargo xtask bench cpu`: the cost of sampling a fixed CPU-bound workload, TOE versus perf, at
//! the same frequencies. `cargo xtask bench memory`: the cost of the memory collector's modes on an
//! allocation-heavy workload, versus the same probes as a bpftrace script. Every configuration
//! runs once per round, rounds are interleaved (the starting configuration rotates) and ratios
//! are taken within a round, because these machines drift 10-20% between runs.
//! `cargo xtask bench signals`: what tracing signals costs each kill(2) (TOE versus a bpftrace
//! script on the same tracepoints), and the highest signal rate TOE records without loss.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
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
    /// Operator: time from creating PowerTools over pods to all Admitted, against the real API
    /// server, and the operator's peak memory.
    Operator {
        #[arg(long, default_value_t = 500)]
        powertools: usize,
        #[arg(long, default_value_t = 5000)]
        pods: usize,
    },
    /// Node agent: latency from PowerTool creation to Running and from the end of the duration
    /// to Completed, and the agent's peak RSS and CPU, with 1, 10 and 50 concurrent PowerTools.
    Agent {
        /// Concurrent PowerTools per round.
        #[arg(long, default_value = "1,10,50")]
        counts: String,
        /// Seconds each PowerTool profiles.
        #[arg(long, default_value_t = 10)]
        secs: u32,
        /// Busy containers the PowerTools spread over.
        #[arg(long, default_value_t = 2)]
        pods: usize,
    },
    /// The chart on a real kubelet + containerd node (`cargo xtask cluster`): PowerTool
    /// creation to first sample, end of sampling to Completed, the agent pod's resident memory;
    /// each round followed by a one-PowerTool round of `bench agent`. Needs root.
    Cluster {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds each PowerTool profiles.
        #[arg(long, default_value_t = 10)]
        secs: u32,
    },
    /// Processing: time and peak memory to merge many profiles and render the report, beside
    /// inferno alone rendering the same stacks concatenated.
    Processing {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Numbers of profiles (captures), each measured on its own data.
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        profiles: Vec<u64>,
        /// Distinct stacks per profile.
        #[arg(long, default_value_t = 10_000)]
        stacks: u64,
    },
    /// Faults: asked versus achieved at a few settings, and rollback time after an abort.
    Faults {
        /// Seconds per fault run.
        #[arg(long, default_value_t = 4)]
        secs: u32,
        /// Abort runs timed.
        #[arg(long, default_value_t = 3)]
        aborts: usize,
    },
    /// Off-CPU profiling of a context-switch-heavy target versus none and a bpftrace
    /// equivalent of offcputime, and the cost to a non-target.
    Offcpu {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Round trips of the ping-pong workload (two context switches each).
        #[arg(long, default_value_t = 400_000)]
        trips: u64,
        /// Microseconds each thread works on the CPU before it passes the byte on: 0 switches
        /// as fast as the machine can (about a million a second here), 4 about 200k a second,
        /// a heavy but realistic rate.
        #[arg(long, default_value_t = 0.0)]
        spin_us: f64,
    },
    /// Stacks of software without frame pointers: complete-stack share, slowdown, CPU per
    /// sample, memory and time to output; TOE with unwind tables, TOE with frame pointers only,
    /// and `perf record --call-graph dwarf`, at 99 and 999 Hz.
    Unwind {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds of work per workload run (about).
        #[arg(long, default_value_t = 3)]
        secs: u64,
        /// Only the workloads whose name contains this (`deep-c`, `xz`, `python`); all by default.
        #[arg(long, default_value = "")]
        workload: String,
    },
    /// Fuzzing: each harness of `fuzz/` (specs, arguments, configs, captures, pprof merges) run
    /// under libFuzzer for a number of executions; fails on any crash.
    Fuzz {
        /// Targets to run (all when none): spec, config, args, capture, pprof_merge.
        targets: Vec<String>,
        /// Executions per target.
        #[arg(long, default_value_t = 10_000_000)]
        runs: u64,
        /// Fuzzing processes per target, sharing its corpus.
        #[arg(long, default_value_t = 2)]
        jobs: u64,
        /// Upper bound on each process's time, in seconds, whatever its executions.
        #[arg(long, default_value_t = 14_400)]
        max_secs: u64,
    },
    /// Per-signal overhead versus no tracing and bpftrace; loss-free event rate.
    Signals {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Signals per overhead run, sent as fast as one sender can.
        #[arg(long, default_value_t = 200_000)]
        count: u64,
        /// Paced rates (signals/s) for the throughput runs.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "50000,100000,150000,200000"
        )]
        rates: Vec<u64>,
        /// Seconds per throughput run.
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
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
pub(crate) struct Measured {
    /// Workload wall time as the workload measured it.
    pub(crate) secs: f64,
    /// Profiler peak RSS (KiB) and CPU seconds, from wait4.
    pub(crate) maxrss_kib: i64,
    pub(crate) cpu_secs: f64,
    pub(crate) finalize_ms: u64,
    /// The profiler's `--json` summary, when it is TOE.
    pub(crate) summary: serde_json::Value,
    /// How often the profiler's threads woke per second while the workload ran, where measured.
    pub(crate) wakeups_per_s: Option<f64>,
}

/// A PowerTool running `tool` for `duration` with `args`.
pub(crate) fn powertool(tool: &str, duration: &str, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "apiVersion: toe.run/v1alpha1\nkind: PowerTool\nmetadata: {{name: bench}}\nspec:\n  tool:\n    name: {tool}\n    duration: {duration}\n    commandLineArguments: [{}]\n",
        args.join(", ")
    )
}

/// `toe run` of the spec file `spec` against `pid`, writing to `out`: its JSON summary on stdout,
/// its progress messages (`toe: started`) on stderr.
pub(crate) fn toe(spec: &Path, pid: &str, out: &Path) -> Result<Child> {
    Ok(Command::new(root().join("target/release/toe"))
        .args(["run", "--no-progress", "--json", "-f"])
        .arg(spec)
        .args(["--pid", pid, "-o"])
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// [`powertool`] written to `dir/<name>.yaml`.
pub(crate) fn spec_file(dir: &Path, name: &str, text: &str) -> Result<std::path::PathBuf> {
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, text)?;
    Ok(p)
}

fn spec(dir: &Path, freq: u64, duration: &str) -> Result<std::path::PathBuf> {
    let f = format!("--frequency={freq}");
    spec_file(
        dir,
        &format!("cpu-{freq}-{duration}"),
        &powertool("cpu-profile", duration, &[&f]),
    )
}

/// Waits for `child` with wait4, returning (success, peak RSS KiB, CPU seconds) of that process.
pub(crate) fn wait4(child: &Child) -> Result<(bool, i64, f64)> {
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
            Mode::Toe(f) => Some((
                Command::new(bin.join("toe"))
                    .args(["run", "--no-progress", "--json", "-f"])
                    .arg(spec(tmp, f, "5m")?)
                    .args(["--pid", pid, "-o"])
                    .arg(&out)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()?,
                Ready::Stderr("toe: started"),
            )),
            Mode::Perf(f) => Some((
                Command::new("perf")
                    .args(["record", "-q", "-g", "-F", &f.to_string(), "-p", pid, "-o"])
                    .arg(tmp.join("perf.data"))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting perf (Debian package linux-perf)")?,
                Ready::Settle(Duration::from_secs(1)),
            )),
        })
    })
}

/// How a profiler says it has attached, so that the workload starts only then: a tool that
/// attaches late must not have the start of the work run untraced (and look faster for it).
#[derive(Clone, Copy)]
pub(crate) enum Ready {
    /// A line on its stderr containing this (`toe: started on ...`).
    Stderr(&'static str),
    /// A line on its stdout containing this (bpftrace's `Attaching N probes...`).
    Stdout(&'static str),
    /// No message: perf attaches before its first read of the counters, within milliseconds;
    /// a fixed wait well above that.
    Settle(Duration),
}

/// Lines of `stream` are read on a thread of their own until one contains `marker` (then the
/// rest is drained, so the writer never blocks); waits at most two minutes for it.
fn wait_for_line(stream: impl std::io::Read + Send + 'static, marker: &'static str) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if line.contains(marker)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_mins(2))
        .map_err(|_| anyhow::anyhow!("the profiler never printed {marker:?}"))
}

/// Waits until the profiler `child` says it is attached.
pub(crate) fn attached(child: &mut Child, ready: Ready) -> Result<()> {
    match ready {
        Ready::Stderr(m) => wait_for_line(child.stderr.take().context("stderr piped")?, m),
        Ready::Stdout(m) => wait_for_line(child.stdout.take().context("stdout piped")?, m),
        Ready::Settle(d) => {
            std::thread::sleep(d);
            Ok(())
        }
    }
}

/// Runs the demo with `workload` args (it waits for a line on stdin), starts the profiler that
/// `profiler` spawns for its pid, waits until it has attached, then times the workload.
pub(crate) fn measure(
    workload: &[&str],
    label: &str,
    profiler: impl FnOnce(&str) -> Result<Option<(Child, Ready)>>,
) -> Result<Measured> {
    let bin = root().join("target/release");
    let mut demo = Command::new(bin.join("toe-demo"))
        .args(workload)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = demo.id().to_string();
    let profiler = match profiler(&pid)? {
        Some((mut child, ready)) => {
            attached(&mut child, ready)?;
            Some(child)
        }
        None => None,
    };
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

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Per mode: median workload seconds, median per-round slowdown against mode 0 (percent), peak
/// profiler RSS (MB) and mean profiler CPU seconds.
pub(crate) fn columns(results: &[Vec<Measured>], i: usize) -> (f64, f64, f64, f64) {
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

/// A memory-profile spec for a bench mode: a `--mode` value, or `exact-fp` (exact, its stacks
/// walked by frame pointers instead of copied and unwound with tables, the default).
fn memory_spec(dir: &Path, mode: &str) -> Result<std::path::PathBuf> {
    let args = match mode.strip_suffix("-fp") {
        Some(m) => vec![format!("--mode={m}"), "--unwind=frame-pointers".to_owned()],
        None => vec![format!("--mode={mode}")],
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spec_file(
        dir,
        &format!("memory-{mode}"),
        &powertool("memory-profile", "5m", &args),
    )
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
    let modes = ["none", "exact", "exact-fp", "sampled", "growth", "bpftrace"];
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
                    "bpftrace" => Some((
                        Command::new(&bpftrace)
                            .arg("-p")
                            .arg(pid)
                            .arg(&script)
                            .stdout(Stdio::piped())
                            .stderr(Stdio::null())
                            .spawn()?,
                        Ready::Stdout("Attaching"),
                    )),
                    toe_mode => Some((
                        Command::new(root().join("target/release/toe"))
                            .args(["run", "--no-progress", "--json", "-f"])
                            .arg(memory_spec(&tmp, toe_mode)?)
                            .args(["--pid", pid, "-o"])
                            .arg(tmp.join("out"))
                            .stdout(Stdio::piped())
                            .stderr(Stdio::piped())
                            .spawn()?,
                        Ready::Stderr("toe: started"),
                    )),
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

/// The bpftrace peer: per event a line out (as killsnoop and trace_signal stream events) and the
/// sender's stacks aggregated in the kernel, filtered to the target.
const SIGNALS_PEER: &str = r#"
tracepoint:signal:signal_generate /args->pid == TARGET/ {
  printf("%d %s %d %d %d\n", pid, comm, args->sig, args->pid, args->result);
  @k[kstack] = count(); @u[ustack] = count();
}
tracepoint:signal:signal_deliver /pid == TARGET/ { printf("deliver %d %d\n", tid, args->sig); }
"#;

fn signals_spec(dir: &Path, stacks: bool) -> Result<std::path::PathBuf> {
    let (u, k) = (
        format!("--user-stacks={stacks}"),
        format!("--kernel-stacks={stacks}"),
    );
    spec_file(
        dir,
        &format!("signals-{stacks}"),
        &powertool("signal-trace", "5m", &["--max-lost=1000000000", &u, &k]),
    )
}

/// One signal run: a `trap` target, the tracer `mode` on it, then `sender` (demo arguments with
/// `PID` replaced); returns the sender's two printed numbers and TOE's summary.
fn signal_run(
    mode: &str,
    sender: &[&str],
    tmp: &Path,
    bpftrace: Option<&Path>,
) -> Result<(f64, f64, serde_json::Value)> {
    let bin = root().join("target/release");
    let ready = tmp.join("ready");
    std::fs::remove_file(&ready).ok();
    let mut target = Command::new(bin.join("toe-demo"))
        .args(["trap", "600"])
        .arg(&ready)
        .spawn()?;
    let pid = target.id().to_string();
    for _ in 0..200 {
        if ready.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let tracer = match mode {
        "toe" | "toe-nostk" => Some((
            Command::new(bin.join("toe"))
                .args(["run", "--no-progress", "--json", "-f"])
                .arg(signals_spec(tmp, mode == "toe")?)
                .args(["--pid", &pid, "-o"])
                .arg(tmp.join("out"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?,
            Ready::Stderr("toe: started"),
        )),
        "bpftrace" => {
            let script = tmp.join("signals.bt");
            std::fs::write(&script, SIGNALS_PEER.replace("TARGET", &pid))?;
            Some((
                Command::new(bpftrace.context("bpftrace (Debian package bpftrace) is the peer")?)
                    .arg(&script)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()?,
                Ready::Stdout("Attaching"),
            ))
        }
        _ => None,
    };
    // Sending starts once the tracer says it is attached (bpftrace after its compile), never
    // after a fixed wait that a slow attach could overrun.
    let tracer = match tracer {
        Some((mut t, ready)) => {
            attached(&mut t, ready)?;
            Some(t)
        }
        None => None,
    };
    let args: Vec<&str> = sender
        .iter()
        .map(|a| if *a == "PID" { pid.as_str() } else { a })
        .collect();
    let out = Command::new(bin.join("toe-demo")).args(&args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut nums = text.split_whitespace().map(str::parse::<f64>);
    let (Some(Ok(a)), Some(Ok(b))) = (nums.next(), nums.next()) else {
        bail!("sender printed {text:?}")
    };
    target.kill()?;
    target.wait()?;
    let mut summary = serde_json::Value::Null;
    if let Some(mut t) = tracer {
        if mode == "bpftrace" {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(i32::try_from(t.id())?, libc::SIGINT) };
        }
        let stdout = t.stdout.take();
        t.wait()?;
        if let Some(s) = stdout {
            summary = serde_json::from_reader(s).context("toe --json summary")?;
        }
    }
    Ok((a, b, summary))
}

fn signal_events(summary: &serde_json::Value, kind: &str, field: &str) -> u64 {
    summary["signals"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| kind == "*" || e["event"] == kind)
        .map(|e| e[field].as_u64().unwrap_or(0))
        .sum()
}

fn signals_bench(rounds: usize, count: u64, rates: &[u64], secs: f64) -> Result<()> {
    if !is_root() {
        bail!("the benchmark loads eBPF programs and runs bpftrace: run it as root");
    }
    let bpftrace = which::which("bpftrace").ok();
    let tmp = std::env::temp_dir().join(format!("toe-bench-sig-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let modes: Vec<&str> = if bpftrace.is_some() {
        vec!["none", "toe", "toe-nostk", "bpftrace"]
    } else {
        eprintln!(
            "bpftrace not installed (apt-get install bpftrace): comparing with no tracing only"
        );
        vec!["none", "toe", "toe-nostk"]
    };
    let n = count.to_string();
    let sender = ["send", "bench", "PID", "10", n.as_str()];
    let mut results: Vec<Vec<Measured>> = vec![Vec::new(); modes.len()];
    let mut lost = 0;
    for round in 0..rounds {
        for k in 0..modes.len() {
            let i = (k + round) % modes.len();
            let (sent, took, summary) = signal_run(modes[i], &sender, &tmp, bpftrace.as_deref())?;
            if modes[i] == "toe" {
                lost += signal_events(&summary, "signal", "lost");
            }
            eprintln!(
                "round {}/{rounds} {:<9} {sent} signals in {took:.3}s",
                round + 1,
                modes[i]
            );
            results[i].push(Measured {
                secs: took,
                ..Measured::default()
            });
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "display")]
    let per_signal = |s: f64| s / count as f64 * 1e6;
    println!(
        "\nSignal tracing overhead: {count} kill(2) calls from one sender to a target that handles them, median over {rounds} interleaved rounds"
    );
    println!(
        "{:<9} {:>9} {:>12} {:>10}",
        "mode", "median s", "us/signal", "slowdown"
    );
    for (i, mode) in modes.iter().enumerate() {
        let (secs, slowdown, _, _) = columns(&results, i);
        println!(
            "{mode:<9} {secs:>9.3} {:>12.3} {slowdown:>+9.1}%",
            per_signal(secs)
        );
    }
    let ratio = |a: usize, b: usize| {
        median(
            results[a]
                .iter()
                .zip(&results[b])
                .map(|(x, y)| x.secs / y.secs)
                .collect(),
        )
    };
    if modes.len() == 4 {
        println!(
            "toe / bpftrace sender time: {:.4} (median per-round ratio; < 1 means TOE costs the sender less)",
            ratio(1, 3)
        );
    }
    println!("(toe-nostk: --user-stacks=false --kernel-stacks=false)");
    println!("toe lost {lost} signal events over all overhead rounds (default 8 MiB ring)");

    loss_free_rates(rates, secs, &tmp)?;
    std::fs::remove_dir_all(&tmp).ok();
    Ok(())
}

/// Paced runs at each rate: the events TOE recorded and lost.
fn loss_free_rates(rates: &[u64], secs: f64, tmp: &Path) -> Result<()> {
    println!("\nLoss-free rate: signals paced for {secs} s, TOE with its default ring");
    println!(
        "{:>10} {:>10} {:>10} {:>12} {:>8} {:>10}",
        "asked/s", "sent/s", "sent", "events", "lost", "events/s"
    );
    let mut best = 0.0f64;
    let secs_s = secs.to_string();
    for &rate in rates {
        let r = rate.to_string();
        let (sent, achieved, summary) = signal_run(
            "toe",
            &[
                "sendrate",
                "bench",
                "PID",
                "10",
                r.as_str(),
                secs_s.as_str(),
            ],
            tmp,
            None,
        )?;
        let events = signal_events(&summary, "*", "recorded");
        let lost = signal_events(&summary, "*", "lost");
        #[expect(clippy::cast_precision_loss, reason = "display")]
        let per_s = events as f64 / secs;
        println!("{rate:>10} {achieved:>10.0} {sent:>10.0} {events:>12} {lost:>8} {per_s:>10.0}");
        if lost == 0 {
            best = best.max(per_s);
        }
    }
    println!("highest loss-free event rate measured: {best:.0} events/s (signals + deliveries)");
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
        Which::Faults { secs, aborts } => crate::bench_faults::faults_bench(*secs, *aborts),
        Which::Operator { powertools, pods } => operator_bench(*powertools, *pods),
        Which::Agent { counts, secs, pods } => agent_bench(counts, *secs, *pods),
        Which::Cluster { rounds, secs } => cluster_bench(*rounds, *secs),
        Which::Processing {
            rounds,
            profiles,
            stacks,
        } => {
            for &p in profiles {
                processing_bench(*rounds, p, *stacks)?;
            }
            Ok(())
        }
        Which::Signals {
            rounds,
            count,
            rates,
            secs,
        } => signals_bench(*rounds, *count, rates, *secs),
        Which::Offcpu {
            rounds,
            trips,
            spin_us,
        } => crate::bench_offcpu::offcpu_bench(*rounds, *trips, *spin_us),
        Which::Unwind {
            rounds,
            secs,
            workload,
        } => crate::bench_unwind::unwind_bench(*rounds, *secs, workload),
        Which::Fuzz {
            targets,
            runs,
            jobs,
            max_secs,
        } => crate::bench_fuzz::fuzz_bench(targets, *runs, *jobs, *max_secs),
    }
}

/// Builds `bins` of `package` and the bench binary `bench` (in toe-tests, beside the API server
/// harness), then runs it with `args` against the cached API server.
fn api_server_bench(package: &str, bins: &[&str], bench: &str, args: &[String]) -> Result<()> {
    crate::apiserver::ensure()?;
    let mut build = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    build
        .current_dir(root())
        .args(["build", "--release", "-p", package, "-p", "toe-tests"]);
    for bin in bins.iter().chain([&bench]) {
        build.args(["--bin", bin]);
    }
    crate::run(&mut build)?;
    crate::run(
        Command::new(root().join("target/release").join(bench))
            .env("TOE_KUBE_APISERVER", crate::apiserver::binary())
            .args(args),
    )
}

fn agent_bench(counts: &str, secs: u32, pods: usize) -> Result<()> {
    let args = [
        "--counts".to_owned(),
        counts.to_owned(),
        "--secs".to_owned(),
        secs.to_string(),
        "--pods".to_owned(),
        pods.to_string(),
    ];
    api_server_bench("toe-agent", &["toe"], "bench-agent", &args)
}

fn cluster_bench(rounds: usize, secs: u32) -> Result<()> {
    if !is_root() {
        bail!("bench cluster needs root (it starts a kubelet and containerd)");
    }
    let helm = crate::bootstrap::helm()?;
    let dist = root().join("target/dist-check");
    crate::dist::build(&dist)?;
    crate::run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(root())
            .args(["build", "--release", "-p", "toe-agent", "-p", "toe-tests"])
            .args([
                "--bin",
                "toe",
                "--bin",
                "bench-agent",
                "--bin",
                "bench-cluster",
            ]),
    )?;
    let bin = root().join("target/release");
    crate::cluster::with_release(&dist, || {
        crate::run(
            Command::new(bin.join("bench-cluster"))
                .args(["--rounds", &rounds.to_string(), "--secs", &secs.to_string()])
                .env("TOE_CLUSTER_KUBECONFIG", crate::cluster::kubeconfig())
                .env("TOE_KUBECTL", crate::cluster::kubectl())
                .env("TOE_HELM", &helm)
                .env("TOE_BENCH_AGENT", bin.join("bench-agent"))
                .env("TOE_KUBE_APISERVER", crate::apiserver::binary()),
        )
    })
}

fn operator_bench(powertools: usize, pods: usize) -> Result<()> {
    let args = [
        "--powertools".to_owned(),
        powertools.to_string(),
        "--pods".to_owned(),
        pods.to_string(),
    ];
    api_server_bench("toe-operator", &["toe-operator"], "bench-operator", &args)
}

/// One processing bench run as its own process: wall seconds, peak RSS (KiB) and what it printed.
fn processing_once(
    mode: &str,
    data: &str,
    out: &str,
    env: &[(String, String)],
) -> Result<(f64, i64, String)> {
    if !out.contains("://") {
        let _ = std::fs::remove_dir_all(out);
    }
    let start = std::time::Instant::now();
    let mut child = Command::new(root().join("target/release/bench-processing"))
        .args([mode, data, out])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)?;
    let (ok, rss, _) = wait4(&child)?;
    let secs = start.elapsed().as_secs_f64();
    if !ok {
        bail!("bench-processing {mode} {data} failed");
    }
    Ok((secs, rss, stdout))
}

/// s3s-fs serving `root` (each directory a bucket) on a loopback port, with the environment a
/// client needs; `None` when it is not bootstrapped.
struct S3 {
    child: Child,
    env: Vec<(String, String)>,
}

impl S3 {
    const BUCKET: &str = "toe-artifacts";

    fn start(root: &Path) -> Result<Option<Self>> {
        let bin = crate::bootstrap::s3_server_path();
        if !bin.exists() {
            return Ok(None);
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let (key, secret) = ("toe-bench-access-key", "toe-bench-secret-key");
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", key, "--secret-key", secret])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        // Bounded: s3s-fs listens within a second here.
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                let env = [
                    ("AWS_ACCESS_KEY_ID", key.to_owned()),
                    ("AWS_SECRET_ACCESS_KEY", secret.to_owned()),
                    ("AWS_ENDPOINT", format!("http://127.0.0.1:{port}")),
                    ("AWS_ALLOW_HTTP", "true".to_owned()),
                    ("AWS_REGION", "us-east-1".to_owned()),
                    // Never the cloud's metadata address: a closed loopback port.
                    ("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9".to_owned()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
                return Ok(Some(Self { child, env }));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("s3s-fs did not listen on 127.0.0.1:{port} within 10 s")
    }
}

impl S3 {
    /// CPU seconds the server has used so far (user and system, from /proc).
    fn cpu_secs(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start at ") ".
        let fields: Vec<&str> = stat
            .rsplit_once(") ")
            .map_or(Vec::new(), |(_, rest)| rest.split(' ').collect());
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<f64>().ok()))
            .sum();
        // SAFETY: sysconf has no preconditions.
        #[expect(
            clippy::cast_precision_loss,
            reason = "ticks per second, a small number"
        )]
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        ticks / hz.max(1.0)
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Above this many profiles inferno alone is not run: it holds every line of every profile in
/// memory at once (about 13 GiB at 1000 profiles of 10k stacks), which is the point of the
/// comparison at 100 and no longer a useful baseline beyond.
const INFERNO_UP_TO: u64 = 100;

/// One run's measurements: wall seconds, peak RSS (KiB), what it printed.
type Run = (f64, i64, String);

/// The processing bench's table and ratios.
fn print_processing(
    profiles: u64,
    stacks: u64,
    rounds: usize,
    toe: &[Run],
    on_s3: &[Run],
    inferno: &[Run],
) {
    let med = |v: &[(f64, i64, String)]| median(v.iter().map(|x| x.0).collect());
    let peak = |v: &[(f64, i64, String)]| v.iter().map(|x| x.1).max().unwrap_or(0);
    let report_bytes = toe
        .last()
        .and_then(|t| t.2.split_whitespace().nth(2))
        .unwrap_or("?")
        .to_owned();
    println!(
        "processing {profiles} profiles x {stacks} distinct stacks ({rounds} rounds, interleaved)"
    );
    println!("| | median time | peak RSS |");
    println!("| --- | --- | --- |");
    println!(
        "| toe, file://: merged + differential flamegraphs, merged pprof, rules, HTML report ({report_bytes} bytes) | {:.2} s | {:.1} MiB |",
        med(toe),
        kib_to_mib(peak(toe))
    );
    if !on_s3.is_empty() {
        println!(
            "| toe, s3:// (s3s-fs on loopback): the same | {:.2} s | {:.1} MiB |",
            med(on_s3),
            kib_to_mib(peak(on_s3))
        );
    }
    if !inferno.is_empty() {
        println!(
            "| inferno alone: one flamegraph of the concatenated folded stacks | {:.2} s | {:.1} MiB |",
            med(inferno),
            kib_to_mib(peak(inferno))
        );
        #[expect(clippy::cast_precision_loss, reason = "ratio for display")]
        let rss_ratio = peak(toe) as f64 / peak(inferno).max(1) as f64;
        println!(
            "ratio toe / inferno alone: time {:.2}x, peak RSS {rss_ratio:.2}x",
            med(toe) / med(inferno)
        );
    }
    if !on_s3.is_empty() {
        println!("ratio s3:// / file://: time {:.2}x", med(on_s3) / med(toe));
    }
}

fn processing_bench(rounds: usize, profiles: u64, stacks: u64) -> Result<()> {
    crate::run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(root())
            .args([
                "build",
                "--release",
                "-p",
                "toe-tests",
                "--bin",
                "bench-processing",
            ]),
    )?;
    let tmp = tempfile_dir("toe-bench-processing")?;
    // The bucket's directory is the file:// data too, so both stores serve the same bytes.
    let data = tmp.join("s3").join(S3::BUCKET);
    eprintln!("bench processing: generating {profiles} profiles of {stacks} distinct stacks");
    crate::run(
        Command::new(root().join("target/release/bench-processing"))
            .arg("generate")
            .arg(&data)
            .args([profiles.to_string(), stacks.to_string()]),
    )?;
    let s3 = S3::start(&tmp.join("s3"))?;
    match &s3 {
        None => eprintln!(
            "bench processing: no S3 server (run `cargo xtask bootstrap --tests`): file:// only"
        ),
        // Written again through the server's API, as agents write captures: objects the
        // server did not write carry none of its metadata, and it would hash each one whole on
        // every read (work no store does on objects it holds).
        Some(s3) => crate::run(
            Command::new(root().join("target/release/bench-processing"))
                .arg("upload")
                .arg(data.join("bench"))
                .arg(format!("s3://{}/bench/", S3::BUCKET))
                .envs(s3.env.iter().map(|(k, v)| (k, v))),
        )?,
    }
    let file_src = data.join("bench/cpu").display().to_string();
    let file_out = tmp.join("out-toe").display().to_string();
    let s3_src = format!("s3://{}/bench/cpu/", S3::BUCKET);
    let s3_out = format!("s3://{}/out-toe/", S3::BUCKET);
    let mut toe = Vec::new();
    let mut on_s3 = Vec::new();
    let mut inferno = Vec::new();
    for round in 0..rounds {
        // Interleaved, so drift in the machine's speed hits every side alike.
        let t = processing_once("toe", &file_src, &file_out, &[])?;
        let mut line = format!(
            "round {}: toe file:// {:.2} s {:.1} MiB",
            round + 1,
            t.0,
            kib_to_mib(t.1)
        );
        toe.push(t);
        if let Some(s3) = &s3 {
            let before = s3.cpu_secs();
            let t = processing_once("toe", &s3_src, &s3_out, &s3.env)?;
            let server = s3.cpu_secs() - before;
            let _ = write!(
                line,
                " | toe s3:// {:.2} s {:.1} MiB (the server used {server:.2} CPU s)",
                t.0,
                kib_to_mib(t.1)
            );
            on_s3.push(t);
        }
        if profiles <= INFERNO_UP_TO {
            let i = processing_once(
                "inferno",
                &file_src,
                &tmp.join("out-inferno").display().to_string(),
                &[],
            )?;
            let _ = write!(
                line,
                " | inferno alone {:.2} s {:.1} MiB",
                i.0,
                kib_to_mib(i.1)
            );
            inferno.push(i);
        }
        eprintln!("{line}");
    }
    print_processing(profiles, stacks, rounds, &toe, &on_s3, &inferno);
    drop(s3);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

#[expect(clippy::cast_precision_loss, reason = "MiB for display")]
fn kib_to_mib(kib: i64) -> f64 {
    kib as f64 / 1024.0
}

fn tempfile_dir(name: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
