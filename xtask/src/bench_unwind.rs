//! `cargo xtask bench unwind`: stacks of software built without frame pointers. For each
//! workload (a C program 100 calls deep, built `-O2 -fomit-frame-pointer`; Debian's xz; Debian's
//! Python 3.11) and each profiler (none; TOE walking unwind tables; TOE walking frame pointers
//! only; `perf record --call-graph dwarf`), at 99 and 999 Hz: the share of samples whose stack
//! reaches the program's entry, the workload's slowdown, the profiler's CPU per sample, its peak
//! memory, the time from the end of the run to symbolized output, and TOE's unwind-table memory.
//! Every configuration runs once per round and rounds are interleaved (the starting
//! configuration rotates), because these machines drift 10-20% between runs.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use toe_common::stacks::{folded_reaches_entry, is_entry_frame};

use crate::{
    bench::{Ready, attached, median, powertool, spec_file, toe},
    is_root, root, run,
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Profiler {
    None,
    Tables(u64),
    FramePointers(u64),
    PerfDwarf(u64),
}

impl Profiler {
    fn label(self) -> String {
        match self {
            Self::None => "none".into(),
            Self::Tables(f) => format!("toe tables@{f}"),
            Self::FramePointers(f) => format!("toe fp@{f}"),
            Self::PerfDwarf(f) => format!("perf dwarf@{f}"),
        }
    }
}

const PROFILERS: [Profiler; 7] = [
    Profiler::None,
    Profiler::Tables(99),
    Profiler::FramePointers(99),
    Profiler::PerfDwarf(99),
    Profiler::Tables(999),
    Profiler::FramePointers(999),
    Profiler::PerfDwarf(999),
];

/// One run's readings.
#[derive(Clone, Default)]
struct Run {
    secs: f64,
    samples: u64,
    complete: u64,
    cpu_secs: f64,
    maxrss_kib: i64,
    to_output_ms: f64,
    table_kib: u64,
    /// Files whose tables TOE read, and how long that took.
    table_files: u64,
    table_ms: f64,
}

pub fn unwind_bench(rounds: usize, secs: u64, only: &str) -> Result<()> {
    if !is_root() {
        bail!("the benchmark loads eBPF programs and runs perf: run it as root");
    }
    let tmp = std::env::temp_dir().join(format!("toe-bench-unwind-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let deep = tmp.join("deep-c");
    run(Command::new("gcc")
        .args(["-O2", "-fomit-frame-pointer", "-fno-optimize-sibling-calls"])
        .arg(root().join("tests/workloads/deep.c"))
        .arg("-o")
        .arg(&deep))?;
    let input = tmp.join("input");
    run(Command::new(root().join("target/release/toe-demo"))
        .args(["words", &(secs << 21).to_string()])
        .stdout(std::fs::File::create(&input)?))?;
    // Fixed work sized to about `secs` seconds each on these machines (xz: 2 MiB of input
    // per second).
    let calls = (secs * 9000).to_string();
    let python = format!(
        "for _ in range({}):\n    sorted(str(i * 7919 % 1000) for i in range(2000))\n",
        secs * 4000
    );
    let workloads: Vec<(&str, Vec<String>)> = vec![
        (
            "deep-c (-fomit-frame-pointer, 100 deep)",
            vec![deep.display().to_string(), "100".into(), "0".into(), calls],
        ),
        (
            "xz -9 (Debian)",
            vec![
                "/usr/bin/xz".into(),
                "-9".into(),
                "-T1".into(),
                "-c".into(),
                "-k".into(),
                input.display().to_string(),
            ],
        ),
        (
            "python3.11 (Debian)",
            vec!["/usr/bin/python3.11".into(), "-c".into(), python],
        ),
    ];
    for (name, argv) in workloads.iter().filter(|(n, _)| n.contains(only)) {
        if !Path::new(&argv[0]).exists() {
            eprintln!("skipping {name}: {} is not installed", argv[0]);
            continue;
        }
        let mut results: Vec<Vec<Run>> = vec![Vec::new(); PROFILERS.len()];
        for round in 0..rounds {
            for k in 0..PROFILERS.len() {
                let i = (k + round) % PROFILERS.len();
                let r = once(PROFILERS[i], argv, &tmp)
                    .with_context(|| format!("{name} under {}", PROFILERS[i].label()))?;
                eprintln!(
                    "{name} round {}/{rounds} {:<16} {:.3}s, {} samples, {} complete",
                    round + 1,
                    PROFILERS[i].label(),
                    r.secs,
                    r.samples,
                    r.complete
                );
                results[i].push(r);
            }
        }
        report(name, rounds, &results);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

fn report(name: &str, rounds: usize, results: &[Vec<Run>]) {
    println!(
        "\n{name}: medians over {rounds} interleaved rounds (slowdown: median per-round ratio to no profiler)"
    );
    println!(
        "{:<16} {:>8} {:>9} {:>10} {:>12} {:>10} {:>12} {:>10}",
        "profiler",
        "time s",
        "slowdown",
        "complete",
        "CPU us/smpl",
        "peak MiB",
        "to output ms",
        "tables KiB"
    );
    for (i, p) in PROFILERS.iter().enumerate() {
        let rs = &results[i];
        let slowdown = median(
            rs.iter()
                .zip(&results[0])
                .map(|(r, base)| r.secs / base.secs)
                .collect(),
        );
        #[expect(clippy::cast_precision_loss, reason = "display")]
        let complete = median(
            rs.iter()
                .map(|r| r.complete as f64 / r.samples.max(1) as f64)
                .collect(),
        );
        #[expect(clippy::cast_precision_loss, reason = "display")]
        let per_sample = median(
            rs.iter()
                .map(|r| r.cpu_secs * 1e6 / r.samples.max(1) as f64)
                .collect(),
        );
        #[expect(clippy::cast_precision_loss, reason = "display")]
        let rss = rs.iter().map(|r| r.maxrss_kib).max().unwrap_or(0) as f64 / 1024.0;
        let out_ms = median(rs.iter().map(|r| r.to_output_ms).collect());
        let tables = rs.iter().map(|r| r.table_kib).max().unwrap_or(0);
        if *p == Profiler::None {
            println!(
                "{:<16} {:>8.3} {:>9} {:>10} {:>12} {:>10} {:>12} {:>10}",
                p.label(),
                median(rs.iter().map(|r| r.secs).collect()),
                "-",
                "-",
                "-",
                "-",
                "-",
                "-"
            );
            continue;
        }
        println!(
            "{:<16} {:>8.3} {:>+8.2}% {:>9.1}% {per_sample:>12.1} {rss:>10.1} {out_ms:>12.0} {tables:>10}",
            p.label(),
            median(rs.iter().map(|r| r.secs).collect()),
            (slowdown - 1.0) * 100.0,
            complete * 100.0,
        );
    }
    let tables = PROFILERS
        .iter()
        .position(|p| matches!(p, Profiler::Tables(_)))
        .expect("a tables profiler");
    let files = results[tables]
        .iter()
        .map(|r| r.table_files)
        .max()
        .unwrap_or(0);
    let ms = median(results[tables].iter().map(|r| r.table_ms).collect());
    println!("unwind tables read by TOE: {files} files in {ms:.1} ms (median)");
}

/// The workload, held by a shell until a line arrives on its stdin, then exec'd in the same
/// process: the profiler attaches to the pid first, so none of the work runs unprofiled.
fn held(argv: &[String]) -> Result<Child> {
    Ok(Command::new("sh")
        .args(["-c", "read _ && exec \"$0\" \"$@\""])
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?)
}

fn once(p: Profiler, argv: &[String], tmp: &Path) -> Result<Run> {
    let mut target = held(argv)?;
    let pid = target.id().to_string();
    let out = tmp.join("out");
    let _ = std::fs::remove_dir_all(&out);
    let perf_data = tmp.join("perf.data");
    let mut profiler = match p {
        Profiler::None => None,
        Profiler::Tables(f) | Profiler::FramePointers(f) => {
            let unwind = if matches!(p, Profiler::Tables(_)) {
                "--unwind=tables"
            } else {
                "--unwind=frame-pointers"
            };
            let freq = format!("--frequency={f}");
            let spec = spec_file(
                tmp,
                "unwind",
                &powertool("cpu-profile", "10m", &[&freq, unwind]),
            )?;
            let mut child = toe(&spec, &pid, &out)?;
            attached(&mut child, Ready::Stderr("toe: started"))?;
            Some(child)
        }
        Profiler::PerfDwarf(f) => {
            let mut child = Command::new("perf")
                .args([
                    "record",
                    "-q",
                    "--call-graph",
                    "dwarf",
                    "-F",
                    &f.to_string(),
                ])
                .args(["-p", &pid, "-o"])
                .arg(&perf_data)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting perf (Debian package linux-perf)")?;
            attached(&mut child, Ready::Settle(Duration::from_secs(1)))?;
            Some(child)
        }
    };
    let start = Instant::now();
    target
        .stdin
        .take()
        .context("stdin piped")?
        .write_all(b"go\n")?;
    let status = target.wait()?;
    let secs = start.elapsed().as_secs_f64();
    if !status.success() {
        bail!("the workload failed: {status}");
    }
    let mut r = Run {
        secs,
        ..Run::default()
    };
    let Some(child) = profiler.as_mut() else {
        return Ok(r);
    };
    let stdout = child.stdout.take();
    let (ok, rss, cpu) = crate::bench::wait4(child)?;
    if !ok {
        bail!("{} failed", p.label());
    }
    r.maxrss_kib = rss;
    r.cpu_secs = cpu;
    if let Some(s) = stdout {
        let v: serde_json::Value = serde_json::from_reader(s).context("toe --json summary")?;
        #[expect(clippy::cast_precision_loss, reason = "milliseconds")]
        {
            r.to_output_ms = v["finalize_ms"].as_u64().unwrap_or(0) as f64;
        }
        let unwind = &v["cpu"]["samples"]["unwind"];
        r.table_kib = unwind["table_memory_bytes"].as_u64().unwrap_or(0) / 1024;
        r.table_files = unwind["table_files_read"].as_u64().unwrap_or(0);
        r.table_ms = unwind["table_read_ms"].as_f64().unwrap_or(0.0);
        let (samples, complete) = toe_complete(&out)?;
        r.samples = samples;
        r.complete = complete;
    } else {
        let start = Instant::now();
        let (samples, complete) = perf_complete(&perf_data)?;
        r.to_output_ms = start.elapsed().as_secs_f64() * 1000.0;
        r.samples = samples;
        r.complete = complete;
    }
    Ok(r)
}

/// (samples, samples whose user stack reaches an entry) in TOE's folded stacks under `out`.
fn toe_complete(out: &Path) -> Result<(u64, u64)> {
    let folded = find(out, "stacks.folded")?.context("no stacks.folded written")?;
    let text = std::fs::read_to_string(folded)?;
    let (mut all, mut complete) = (0, 0);
    for line in text.lines() {
        let Some((stack, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let n: u64 = n.parse()?;
        all += n;
        // After the process root frame (and a thread frame, when there is one).
        if folded_reaches_entry(stack) {
            complete += n;
        }
    }
    Ok((all, complete))
}

fn find(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            if let Some(f) = find(&p, name)? {
                return Ok(Some(f));
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// The same from `perf script`: its samples are blank-line separated, callchains leaf first.
fn perf_complete(data: &Path) -> Result<(u64, u64)> {
    let mut script = Command::new("perf")
        .args(["script", "-F", "ip,sym", "-i"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let (mut all, mut complete) = (0, 0);
    let mut last: Option<String> = None;
    let mut in_sample = false;
    for line in BufReader::new(script.stdout.take().context("piped")?).lines() {
        let line = line?;
        let t = line.trim();
        if t.is_empty() {
            if in_sample {
                all += 1;
                if last.as_deref().is_some_and(is_entry_frame) {
                    complete += 1;
                }
            }
            in_sample = false;
            last = None;
            continue;
        }
        in_sample = true;
        // "ffffffff8100 sym+0x12 (dso)" -> "sym"; kernel frames come first, user frames last.
        if let Some((_, sym)) = t.split_once(' ') {
            last = Some(sym.trim().to_owned());
        }
    }
    if in_sample {
        all += 1;
        if last.as_deref().is_some_and(is_entry_frame) {
            complete += 1;
        }
    }
    script.wait()?;
    Ok((all, complete))
}
