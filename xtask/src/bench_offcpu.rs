//! `cargo xtask bench offcpu`: what off-CPU profiling costs a context-switch-heavy target (two
//! threads passing a byte over pipes), and what it costs a process that is not the target, side
//! by side and interleaved.
//!
//! The peer is a bpftrace program doing what bcc's `offcputime` does (time from switch-out to
//! switch-in per kernel and user stack, for one process) on the `sched_switch` tracepoint:
//! `offcputime` itself attaches a kprobe to `finish_task_switch`, and kernels without kprobes
//! (this machine's) cannot run it.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    bench::{Measured, Ready, attached, columns, measure, median, powertool, spec_file, toe},
    is_root, root,
};

/// offcputime's method on the tracepoint: stacks kept at switch-out, time summed at switch-in.
/// The program exits when the target's main thread does.
const PEER: &str = r"
tracepoint:sched:sched_switch
{
  if (pid == $1) {
    @start[tid] = nsecs;
    @ks[tid] = kstack;
    @us[tid] = ustack;
  }
  $s = @start[args->next_pid];
  if ($s) {
    @off[@ks[args->next_pid], @us[args->next_pid]] = sum(nsecs - $s);
    delete(@start[args->next_pid]);
  }
}
tracepoint:sched:sched_process_exit /pid == $1 && tid == $1/ { exit(); }
";

/// Who watches the sleeping process while the bystander runs.
enum Watcher<'a> {
    Toe,
    /// bpftrace with the peer script.
    Bpftrace(&'a Path, &'a Path),
    /// `perf stat -e context-switches -p PID`: a counting event of the same kind TOE attaches
    /// to, with no program: the scheduler's perf hook alone, the floor for any tool that sees
    /// a target's switches without a program on every switch.
    PerfFloor(&'a Path),
}

/// The workload alone while a tool profiles another process (a sleeping one): what every other
/// context switch of the node pays for it.
fn bystander_round(
    workload: &[&str],
    spec: &Path,
    out: &Path,
    watcher: &Watcher<'_>,
) -> Result<Measured> {
    let bin = root().join("target/release");
    let mut sleeper = Command::new(bin.join("toe-demo"))
        .args(["sleep", "600"])
        .spawn()?;
    let pid = sleeper.id().to_string();
    let mut profiler = match watcher {
        Watcher::Toe => {
            let mut p = toe(spec, &pid, out)?;
            attached(&mut p, Ready::Stderr("toe: started"))?;
            p
        }
        Watcher::Bpftrace(bpftrace, script) => {
            let mut p = Command::new(bpftrace)
                .arg(script)
                .arg(&pid)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            attached(&mut p, Ready::Stdout("Attaching"))?;
            p
        }
        Watcher::PerfFloor(perf) => {
            // perf stat prints nothing until it ends: it has opened its event once it sleeps.
            let p = Command::new(perf)
                .args([
                    "stat",
                    "-e",
                    "context-switches",
                    "-p",
                    &pid,
                    "-o",
                    "/dev/null",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            std::thread::sleep(std::time::Duration::from_millis(500));
            p
        }
    };
    let woke = wakeups(profiler.id());
    let run = Command::new(bin.join("toe-demo"))
        .args(workload)
        .stderr(Stdio::inherit())
        .output()?;
    let woke = wakeups(profiler.id()) - woke;
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    // perf stat ends when its target does.
    let status = profiler.wait()?;
    if !run.status.success() || !status.success() {
        bail!("bystander round failed");
    }
    let line = String::from_utf8_lossy(&run.stdout);
    let secs = line
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("pingpong printed {line:?}"))?;
    #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
    let wakeups_per_s = Some(woke as f64 / secs);
    Ok(Measured {
        secs,
        wakeups_per_s,
        ..Measured::default()
    })
}

/// How many times the threads of `pid` have gone to sleep so far (their voluntary context
/// switches): each is a wake-up later, a context switch on some CPU a workload may be using.
fn wakeups(pid: u32) -> i64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<i64>().ok())
        })
        .sum()
}

pub fn offcpu_bench(rounds: usize, trips: u64, spin_us: f64) -> Result<()> {
    if !is_root() {
        bail!("the benchmark loads eBPF programs and runs bpftrace: run it as root");
    }
    let bpftrace = which::which("bpftrace").ok();
    let tmp = std::env::temp_dir().join(format!("toe-bench-offcpu-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let spec = spec_file(&tmp, "offcpu", &powertool("offcpu-profile", "5m", &[]))?;
    let peer = tmp.join("offcputime.bt");
    std::fs::write(&peer, PEER)?;
    let out = tmp.join("out");
    let perf = which::which("perf").ok();
    let mut modes = vec!["none", "toe", "bystander"];
    if perf.is_some() {
        modes.push("perf-floor");
    } else {
        eprintln!("perf not installed (apt-get install linux-perf): no floor column");
    }
    if bpftrace.is_some() {
        modes.extend(["bpftrace", "bt-bystand"]);
    } else {
        eprintln!("bpftrace not installed (apt-get install bpftrace): no peer column");
    }
    let n = trips.to_string();
    let spin = spin_us.to_string();
    // Released by a line on stdin (target modes), or at once (bystanders).
    let target = ["pingpong", &n, "wait", &spin];
    let bystander = ["pingpong", &n, "go", &spin];
    let mut results: Vec<Vec<Measured>> = vec![Vec::new(); modes.len()];
    let mut recorded = Vec::new();
    for round in 0..rounds {
        for k in 0..modes.len() {
            let i = (k + round) % modes.len();
            let m = match modes[i] {
                "bystander" => bystander_round(&bystander, &spec, &out, &Watcher::Toe)?,
                "perf-floor" => bystander_round(
                    &bystander,
                    &spec,
                    &out,
                    &Watcher::PerfFloor(perf.as_deref().context("perf")?),
                )?,
                "bt-bystand" => bystander_round(
                    &bystander,
                    &spec,
                    &out,
                    &Watcher::Bpftrace(bpftrace.as_deref().context("bpftrace")?, &peer),
                )?,
                mode => measure(&target, mode, |pid| {
                    Ok(match mode {
                        "toe" => Some((toe(&spec, pid, &out)?, Ready::Stderr("toe: started"))),
                        "bpftrace" => Some((
                            Command::new(bpftrace.as_deref().context("bpftrace")?)
                                .arg(&peer)
                                .arg(pid)
                                .stdout(Stdio::piped())
                                .stderr(Stdio::null())
                                .spawn()?,
                            Ready::Stdout("Attaching"),
                        )),
                        _ => None,
                    })
                })?,
            };
            if modes[i] == "toe" {
                recorded.push(m.summary["offcpu"]["switches"].clone());
            }
            eprintln!(
                "round {}/{rounds} {:<9} {:.3}s",
                round + 1,
                modes[i],
                m.secs
            );
            results[i].push(m);
        }
    }
    report(&modes, &results, trips, rounds, spin_us);
    if let Some(s) = recorded.last() {
        println!("toe's last accounting: {s}");
    }
    std::fs::remove_dir_all(&tmp).ok();
    Ok(())
}

/// The table of one run of the benchmark.
fn report(modes: &[&str], results: &[Vec<Measured>], trips: u64, rounds: usize, spin_us: f64) {
    #[expect(clippy::cast_precision_loss, reason = "display")]
    let rate = trips as f64 * 2.0 / median(results[0].iter().map(|m| m.secs).collect());
    println!(
        "\nOff-CPU profiling overhead: {trips} pipe round trips between two threads, each \
         working {spin_us} us before passing on (about {:.0}k context switches/s unprofiled), \
         median over {rounds} interleaved rounds",
        rate / 1000.0
    );
    println!(
        "{:<10} {:>9} {:>10} {:>11} {:>9} {:>8} {:>8}",
        "mode", "median s", "slowdown", "ns/switch", "peak MB", "CPU s", "wake/s"
    );
    let base = median(results[0].iter().map(|m| m.secs).collect());
    for (i, mode) in modes.iter().enumerate() {
        let (secs, slowdown, rss, cpu) = columns(results, i);
        // What each of the workload's switches paid, on the one CPU they share (from the
        // per-round slowdown, which pairs each round with its own baseline).
        #[expect(clippy::cast_precision_loss, reason = "display")]
        let per_switch = slowdown / 100.0 * base * 1e9 / (trips as f64 * 2.0);
        let woke: Vec<f64> = results[i].iter().filter_map(|m| m.wakeups_per_s).collect();
        let woke = if woke.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.0}", median(woke))
        };
        println!(
            "{mode:<10} {secs:>9.3} {slowdown:>+9.1}% {per_switch:>11.0} {rss:>9.1} {cpu:>8.2} \
             {woke:>8}"
        );
    }
    if let Some(p) = modes.iter().position(|m| *m == "bpftrace") {
        let ratio = median(
            results[1]
                .iter()
                .zip(&results[p])
                .map(|(t, b)| t.secs / b.secs)
                .collect(),
        );
        println!(
            "toe / bpftrace (offcputime's method) target time: {ratio:.4} (median per-round \
             ratio; < 1 means TOE slows the target less)"
        );
    }
    println!(
        "(bystander, bt-bystand: the same workload, not a target, while TOE or the bpftrace \
         program profiles a sleeping process: what every other switch on the node pays; \
         perf-floor: the same with only a perf context-switch counter on the sleeping process, \
         the scheduler's perf hook that TOE's events enable; wake/s: how often the profiler's \
         threads woke meanwhile, each a context switch on a CPU of the node)"
    );
}
