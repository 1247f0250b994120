//! `cargo xtask bench fuzz`: every fuzz target of `fuzz/` (specs, arguments, configs, captures,
//! pprof merges) run for a number of executions under libFuzzer, through cargo-fuzz on the
//! nightly toolchain. Prints executions, time and rate per target, and each crash input found;
//! fails if any target crashed. A crash input, once its cause is fixed, goes to
//! `fuzz/regressions/<target>/`, which the regression tests replay on every test run.
//!
//! Built without a sanitizer: every harnessed path is safe Rust, so what fuzzing finds is panics
//! (debug assertions, including integer overflow, stay on), aborts, stack overflows, timeouts
//! and runaway memory; AddressSanitizer would halve the rate and find nothing more in safe code.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{bootstrap::cache_dir, root, run};

/// The harnesses, as `fuzz/Cargo.toml` names them.
pub const TARGETS: &[&str] = &["spec", "config", "args", "capture", "pprof_merge"];

/// cargo-fuzz, from crates.io; 0.13 builds on the installed stable.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Installs cargo-fuzz into the cache once (about 2 minutes).
pub fn cargo_fuzz() -> Result<PathBuf> {
    let bin = cache_dir().join("tools/bin/cargo-fuzz");
    if !crate::bootstrap::runs(&bin, "--version") {
        eprintln!("bootstrap: building cargo-fuzz {CARGO_FUZZ_VERSION} (once)");
        run(Command::new("cargo")
            .args(["install", "--locked", "--root"])
            .arg(cache_dir().join("tools"))
            .args(["cargo-fuzz", "--version", &format!("={CARGO_FUZZ_VERSION}")]))
        .context("building cargo-fuzz failed; it needs crates.io")?;
    }
    Ok(bin)
}

struct Outcome {
    target: String,
    runs: u64,
    secs: f64,
    corpus: usize,
    crashes: Vec<PathBuf>,
}

/// Runs `targets` (all when empty) for `runs` executions each, split over `jobs` processes
/// sharing one corpus, each stopping by itself.
pub fn fuzz_bench(targets: &[String], runs: u64, jobs: u64, max_secs: u64) -> Result<()> {
    for t in targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("no fuzz target {t}; the targets are {}", TARGETS.join(", "));
        }
    }
    let targets: Vec<String> = if targets.is_empty() {
        TARGETS.iter().map(|&t| t.to_owned()).collect()
    } else {
        targets.to_vec()
    };
    let jobs = jobs.max(1);
    cargo_fuzz()?;
    let target_dir = cache_dir().join("fuzz-target");
    // cargo finds cargo-fuzz on PATH. PATH is changed only when it lacks the tools directory:
    // the agent's build script reruns whenever PATH changes.
    let tools_bin = cache_dir().join("tools/bin");
    let mut dirs: Vec<PathBuf> =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    if !dirs.contains(&tools_bin) {
        dirs.insert(0, tools_bin);
    }
    let path = std::env::join_paths(dirs)?;
    eprintln!("bench fuzz: building the harnesses (nightly, coverage-instrumented)");
    run(Command::new("cargo")
        .current_dir(root())
        .env("PATH", &path)
        .arg("+nightly")
        .arg("fuzz")
        .args([
            "build",
            "--fuzz-dir",
            "fuzz",
            "--sanitizer",
            "none",
            "--features",
            "fuzzing",
        ])
        .arg("--target-dir")
        .arg(&target_dir))
    .context("building the fuzz targets")?;
    let bins = target_dir.join("x86_64-unknown-linux-gnu/release");
    let work = cache_dir().join("fuzz");
    let mut outcomes = Vec::new();
    for t in &targets {
        let corpus = work.join("corpus").join(t);
        let crashes = work.join("crashes").join(t);
        std::fs::create_dir_all(&crashes)?;
        run(Command::new("cargo")
            .current_dir(root())
            .args([
                "run",
                "-q",
                "--release",
                "-p",
                "toe-fuzz",
                "--features",
                "seeds",
            ])
            .args(["--bin", "toe-fuzz-seeds", "--"])
            .arg(t)
            .arg(&corpus))
        .with_context(|| format!("writing the seed inputs of {t}"))?;
        let o = fuzz_one(&bins.join(t), t, &corpus, &crashes, runs, jobs, max_secs)?;
        if outcomes.is_empty() {
            print_header(runs);
        }
        print_row(&o);
        outcomes.push(o);
    }
    for o in &outcomes {
        for c in &o.crashes {
            println!("crash in {}: {}", o.target, c.display());
        }
    }
    let crashed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.crashes.is_empty()).collect();
    if !crashed.is_empty() {
        bail!(
            "{} target(s) crashed: {}; replay one with `{}/<target> <input>`",
            crashed.len(),
            crashed
                .iter()
                .map(|o| o.target.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            bins.display()
        );
    }
    Ok(())
}

fn fuzz_one(
    bin: &Path,
    target: &str,
    corpus: &Path,
    crashes: &Path,
    runs: u64,
    jobs: u64,
    max_secs: u64,
) -> Result<Outcome> {
    let before: Vec<PathBuf> = files(crashes)?;
    let started = Instant::now();
    eprintln!("bench fuzz: {target}: {runs} executions over {jobs} process(es)");
    let mut children = Vec::new();
    for job in 0..jobs {
        let share = runs / jobs + u64::from(job < runs % jobs);
        let mut prefix = crashes.as_os_str().to_owned();
        prefix.push("/");
        // libFuzzer's own output, to follow a long run (`tail -f`) and read its stats after.
        let log = crashes.with_file_name(format!("{target}-{job}.log"));
        eprintln!("bench fuzz: {target}: job {job} logs to {}", log.display());
        children.push((
            Command::new(bin)
                .arg(corpus)
                .arg(format!("-runs={share}"))
                .arg(format!("-max_total_time={max_secs}"))
                .arg("-artifact_prefix=".to_owned() + &prefix.to_string_lossy())
                // One input may take this long before it counts as a hang.
                .arg("-timeout=10")
                .arg("-rss_limit_mb=2048")
                .arg("-print_final_stats=1")
                .arg(format!("-seed={}", 1 + job))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?,
            log,
        ));
    }
    let mut executed = 0;
    for (mut child, log) in children {
        let status = child.wait()?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        executed += text
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if !status.success() {
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!(
                "bench fuzz: {target} stopped with {status}:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    // libFuzzer also writes `slow-unit-*` files: inputs slower than a few seconds, worth a
    // look but not failures (a loaded machine makes them).
    let found: Vec<PathBuf> = files(crashes)?
        .into_iter()
        .filter(|p| !before.contains(p))
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                ["crash-", "timeout-", "oom-", "leak-"]
                    .iter()
                    .any(|k| n.starts_with(k))
            })
        })
        .collect();
    Ok(Outcome {
        target: target.to_owned(),
        runs: executed,
        secs: started.elapsed().as_secs_f64(),
        corpus: files(corpus)?.len(),
        crashes: found,
    })
}

fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    if dir.is_dir() {
        for e in std::fs::read_dir(dir)? {
            v.push(e?.path());
        }
    }
    v.sort();
    Ok(v)
}

fn print_header(asked: u64) {
    println!("\n## fuzzing, {asked} executions asked per target\n");
    println!("| target | executions | time | executions/s | corpus inputs | crashes |");
    println!("| --- | --- | --- | --- | --- | --- |");
}

/// One target's row, printed as soon as it is done (a long run stopped early keeps the rows of
/// the targets before).
#[allow(clippy::cast_precision_loss)] // counts far below 2^52
fn print_row(o: &Outcome) {
    println!(
        "| {} | {} | {:.0} s | {:.0} | {} | {} |",
        o.target,
        o.runs,
        o.secs,
        o.runs as f64 / o.secs.max(0.001),
        o.corpus,
        o.crashes.len()
    );
}
