//! Faults against real processes in real cgroups: CPU load relative to a quota, memory relative
//! to a limit, OOM reporting, rollback at the end, on SIGTERM and after SIGKILL of TOE, the dry
//! run, and every refusal.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use toe_agent::{targets::TargetSpec, tools::faults::ledger};
use toe_tests::{
    assert_rejected, bin, demo, ledger_entries, profile, require_root, toe_run, tool_spec,
};

/// A cgroup in the hierarchy that holds `controller` (v1 on a hybrid host, else v2), with
/// `files` written into it; removed on drop.
struct LimitedCgroup {
    dir: PathBuf,
    /// A cgroup of the same name in v1 hierarchies that account what `dir`'s does not (a
    /// separate `cpuacct` beside `cpu`), joined by the same processes.
    also: Vec<PathBuf>,
}

impl LimitedCgroup {
    /// `v1` and `v2` list the (file, value) pairs for each kind of hierarchy.
    fn new(
        controller: &str,
        name: &str,
        v1_files: &[(&str, &str)],
        v2_files: &[(&str, &str)],
    ) -> Self {
        let v1 = Path::new("/sys/fs/cgroup").join(controller);
        let (root, v1) = if v1.join("cgroup.procs").exists() {
            (v1, true)
        } else {
            let unified = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.join("cgroup.controllers").exists())
                .expect("a cgroup v2 mount");
            std::fs::write(
                unified.join("cgroup.subtree_control"),
                format!("+{controller}"),
            )
            .ok();
            (unified, false)
        };
        let dir = root.join(format!("toe-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create cgroup");
        for (file, value) in if v1 { v1_files } else { v2_files } {
            std::fs::write(dir.join(file), value).unwrap_or_else(|e| panic!("{file}: {e}"));
        }
        // Where `cpuacct` is a hierarchy of its own, the CPU a v1 `cpu` cgroup's processes use
        // is counted there: a cgroup of the same name there too, so the cgroup's own counter
        // can be read.
        let acct = Path::new("/sys/fs/cgroup/cpuacct");
        let also = if v1 && controller == "cpu" && acct.join("cpuacct.usage").exists() {
            let d = acct.join(dir.file_name().expect("a name"));
            std::fs::create_dir_all(&d).expect("create cpuacct cgroup");
            vec![d]
        } else {
            Vec::new()
        };
        Self { dir, also }
    }

    /// A memory cgroup limited to `bytes`.
    fn memory(name: &str, bytes: u64) -> Self {
        let limit = bytes.to_string();
        Self::new(
            "memory",
            name,
            &[("memory.limit_in_bytes", &limit)],
            &[("memory.max", &limit)],
        )
    }

    /// Starts `toe-demo sleep` inside this cgroup.
    fn sleeper(&self) -> toe_tests::TestProcess {
        self.demo("sleep 60")
    }

    /// Starts `toe-demo <args>` inside this cgroup.
    fn demo(&self, args: &str) -> toe_tests::TestProcess {
        let joins: Vec<String> = std::iter::once(&self.dir)
            .chain(&self.also)
            .map(|d| format!("echo $$ > {} && ", d.join("cgroup.procs").display()))
            .collect();
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "{}exec {} {args}",
                joins.concat(),
                bin("toe-demo").display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("start sleeper");
        // The shell joins, then execs: wait until the process is the demo.
        for _ in 0..100 {
            if std::fs::read_to_string(format!("/proc/{}/comm", child.id()))
                .is_ok_and(|c| c.trim() == "toe-demo")
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        toe_tests::TestProcess(child)
    }
}

impl Drop for LimitedCgroup {
    fn drop(&mut self) {
        for dir in std::iter::once(&self.dir).chain(&self.also) {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn no_workers_of(pids: &[u32]) -> bool {
    pids.iter().all(|p| {
        std::fs::read(format!("/proc/{p}/cmdline"))
            .map_or(true, |c| !c.windows(8).any(|w| w == b"__worker"))
    })
}

/// No process of the run `run` is left, whatever TOE's own list says: every process on the
/// machine whose command line is a worker's (`... __worker --run <run> ...`), found by scanning
/// `/proc` here, not by TOE's code.
fn no_process_of_run(run: &str) -> bool {
    let marker = format!("--run\0{run}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .all(|e| {
            std::fs::read(e.path().join("cmdline")).map_or(true, |c| {
                !(c.windows(8).any(|w| w == b"__worker")
                    && c.windows(marker.len()).any(|w| w == marker.as_bytes()))
            })
        })
}

/// Runs `f` while reading the memory usage of `pid`'s cgroup every 50 ms (the kernel's counter,
/// not TOE's): `f`'s result, the usage before, and the peak during.
fn memory_while<T>(pid: u32, f: impl FnOnce() -> T) -> (T, u64, u64) {
    let cg = toe_agent::tools::faults::cgroups::TargetCgroups::of_pid(pid).unwrap();
    let usage = move || cg.memory_usage().expect("memory usage");
    let baseline = usage();
    let (done, stopped) = std::sync::mpsc::channel::<()>();
    let watcher = std::thread::spawn(move || {
        let mut peak = 0;
        while stopped.recv_timeout(Duration::from_millis(50)).is_err() {
            peak = peak.max(usage());
        }
        peak
    });
    let out = f();
    done.send(()).unwrap();
    (out, baseline, watcher.join().unwrap())
}

/// Asserts that the cgroup grew by `asked` bytes within 5% at its peak.
fn assert_grew_by(baseline: u64, peak: u64, asked: f64) {
    #[expect(clippy::cast_precision_loss, reason = "bytes of a few hundred MiB")]
    let added = peak.saturating_sub(baseline) as f64;
    assert!(
        (added / asked - 1.0).abs() <= 0.05,
        "the cgroup grew by {added} bytes at its peak ({baseline} before), asked {asked}"
    );
}

/// Every worker gone, by TOE's list (which must name some) and by a scan of the machine.
fn assert_no_workers_left(outcome: &toe_agent::run::Outcome) {
    let f = outcome.summary.fault.as_ref().unwrap();
    assert!(!f.workers.is_empty(), "no workers recorded: {f:?}");
    assert!(
        no_workers_of(&f.workers),
        "workers survived: {:?}",
        f.workers
    );
    assert!(
        no_process_of_run(&outcome.summary.run),
        "a worker of run {} is still running",
        outcome.summary.run
    );
}

#[test]
fn cpu_load_is_relative_to_the_quota_and_achieved_within_5_percent() {
    if !require_root("cpu_load_is_relative_to_the_quota_and_achieved_within_5_percent") {
        return;
    }
    let cg = LimitedCgroup::new(
        "cpu",
        "quota",
        &[
            ("cpu.cfs_period_us", "100000"),
            ("cpu.cfs_quota_us", "50000"),
        ],
        &[("cpu.max", "50000 100000")],
    );
    let target = cg.sleeper();
    let ((outcome, sink), rate) = cpu_rate_while(target.pid(), || {
        profile(
            &tool_spec("cpu-stress", "6s", &["--workers=2", "--load=60"]),
            TargetSpec::Pid(target.pid()),
        )
    });
    let f = outcome.summary.fault.as_ref().expect("fault section");
    // 60% of each worker's half of a 0.5-CPU quota: 0.3 CPU, not 1.2 CPUs of the node.
    assert!((f.asked - 0.3).abs() < 1e-9, "{f:?}");
    assert!(
        f.error_percent.abs() <= 5.0,
        "asked {} achieved {}",
        f.asked,
        f.achieved
    );
    assert_charged_to_the_cgroup(rate, f);
    assert_eq!(f.cpu_limit, Some(0.5));
    assert_eq!(f.leftovers, 0);
    assert_no_workers_left(&outcome);
    assert!(sink.artifacts.lock().unwrap().contains_key("fault.csv"));
}

#[test]
fn memory_percent_of_the_limit_is_reached_within_5_percent_and_an_oom_is_reported() {
    if !require_root(
        "memory_percent_of_the_limit_is_reached_within_5_percent_and_an_oom_is_reported",
    ) {
        return;
    }
    let cg = LimitedCgroup::memory("limit", 200 << 20);
    let target = cg.sleeper();
    // The cgroup's own usage while the fault runs: its peak above the sleeper's is the stress.
    let (outcome, baseline, peak) = memory_while(target.pid(), || {
        profile(
            &tool_spec("memory-stress", "3s", &["--size=50%", "--ramp=500ms"]),
            TargetSpec::Pid(target.pid()),
        )
        .0
    });
    let f = outcome.summary.fault.as_ref().unwrap();
    assert!((f.asked - f64::from(100u32 << 20)).abs() < 1.0, "{f:?}");
    assert!(f.error_percent.abs() <= 5.0, "{f:?}");
    assert_grew_by(baseline, peak, f.asked);
    assert_eq!(f.oom_kills, Some(0));
    assert_no_workers_left(&outcome);
    // Beyond the limit: the OOM killer fires, and on the worker.
    let (outcome, _) = profile(
        &tool_spec("memory-stress", "3s", &["--size=300MiB"]),
        TargetSpec::Pid(target.pid()),
    );
    let f = outcome.summary.fault.as_ref().unwrap();
    assert!(f.oom_kills.is_some_and(|n| n >= 1), "{f:?}");
    assert_eq!(f.workers_killed, f.workers, "{f:?}");
}

/// Worker pids whose parent is `parent`.
fn workers_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            }) && !no_workers_of(&[*p])
        })
        .collect()
}

fn start_toe(dir: &Path, spec: &str, target: u32) -> std::process::Child {
    std::fs::write(dir.join("spec.yaml"), spec).unwrap();
    Command::new(bin("toe"))
        .current_dir(dir)
        .env(ledger::STATE_DIR_ENV, dir.join("state"))
        .args([
            "run",
            "--no-progress",
            "-f",
            "spec.yaml",
            "--pid",
            &target.to_string(),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start toe")
}

fn wait_for_workers(toe: u32, n: usize) -> Vec<u32> {
    for _ in 0..300 {
        let w = workers_of(toe);
        if w.len() == n {
            return w;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{n} workers of {toe} did not appear");
}

#[test]
fn sigterm_rolls_back_and_sigkill_leftovers_are_cleaned_by_the_ledger() {
    if !require_root("sigterm_rolls_back_and_sigkill_leftovers_are_cleaned_by_the_ledger") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = demo(&["sleep", "60"], None);
    let spec = tool_spec("cpu-stress", "60s", &["--workers=2", "--load=20"]);

    // Abort: SIGTERM; TOE exits 143 with a partial summary after every worker is gone.
    let toe = start_toe(dir.path(), &spec, target.pid());
    let workers = wait_for_workers(toe.id(), 2);
    // Workers are the first the OOM killer picks, whatever score TOE itself runs with.
    // (A worker sets it as its first act: give a just-started one a moment.)
    for w in &workers {
        let adj = || std::fs::read_to_string(format!("/proc/{w}/oom_score_adj")).unwrap();
        for _ in 0..100 {
            if adj().trim() == "1000" {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(adj().trim(), "1000", "worker {w}");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(toe.id()).unwrap()),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    let out = toe.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143));
    assert!(no_workers_of(&workers), "workers survived the abort");
    assert!(String::from_utf8_lossy(&out.stderr).contains("rolled back"));

    // Crash: SIGKILL leaves the ledger without an end; the next run's recovery (here
    // `toe cleanup`) finds the abandoned run and nothing of it is left.
    let toe = start_toe(dir.path(), &spec, target.pid());
    let workers = wait_for_workers(toe.id(), 2);
    let mut toe = toe;
    toe.kill().unwrap();
    toe.wait().unwrap();
    let ledger = std::fs::read_to_string(dir.path().join("state/ledger.jsonl")).unwrap();
    assert!(
        ledger.contains("\"op\":\"begin\"") && !ledger.contains("\"op\":\"end\""),
        "{ledger}"
    );
    let out = Command::new(bin("toe"))
        .env(ledger::STATE_DIR_ENV, dir.path().join("state"))
        .arg("cleanup")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("1 abandoned run"),
        "{err}"
    );
    for _ in 0..100 {
        if no_workers_of(&workers) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        no_workers_of(&workers),
        "workers survived the crash and the cleanup"
    );
    let ledger = std::fs::read_to_string(dir.path().join("state/ledger.jsonl")).unwrap();
    assert!(ledger.trim().is_empty(), "ledger not compacted: {ledger}");
}

#[test]
fn a_dry_run_prints_the_exact_plan_and_starts_nothing() {
    if !require_root("a_dry_run_prints_the_exact_plan_and_starts_nothing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = demo(&["sleep", "60"], None);
    let spec = format!(
        "{}  dryRun: true\n",
        tool_spec("cpu-stress", "30s", &["--workers=3", "--load=50"])
    );
    let out = toe_run(dir.path(), &spec, &["--pid", &target.pid().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("dry run: start 3 CPU worker(s), each burning 50.0%"),
        "{err}"
    );
    assert!(err.contains("cgroup.procs"), "{err}");
    assert_eq!(
        ledger_entries(dir.path()),
        Vec::<String>::new(),
        "a dry run recorded side effects"
    );
    assert!(
        !dir.path().join("toe-output").exists(),
        "a dry run wrote artifacts"
    );
}

#[test]
fn refusals_are_clear_and_happen_before_anything_starts() {
    if !require_root("refusals_are_clear_and_happen_before_anything_starts") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cpu = tool_spec("cpu-stress", "5s", &[]);
    let root_cgroup = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .find(|p| Path::new(p).join("cgroup.controllers").exists())
        .unwrap();
    for (spec, target, want) in [
        (cpu.clone(), vec!["--pid", "1"], "PID 1"),
        (cpu.clone(), vec!["--pid", "2"], "kernel thread"),
        (cpu.clone(), vec!["--cgroup", root_cgroup], "root cgroup"),
        (
            tool_spec("cpu-stress", "5s", &["--load=101"]),
            vec!["--pid", "1"],
            "out of range 1..=100",
        ),
        (
            tool_spec("cpu-stress", "2h", &[]),
            vec!["--pid", "1"],
            "exceeds the maximum",
        ),
        (
            tool_spec("memory-stress", "5s", &["--size=101%"]),
            vec!["--pid", "1"],
            "out of range 1%..=100%",
        ),
    ] {
        let out = toe_run(dir.path(), &spec, &target);
        assert_rejected(&out, want);
    }
    // A percentage of a limit the target does not have (a fresh memory cgroup, no limit on
    // the way to the root).
    let unlimited = LimitedCgroup::new("memory", "nolimit", &[], &[]);
    let sleeper = unlimited.sleeper();
    let out = toe_run(
        dir.path(),
        &tool_spec("memory-stress", "5s", &["--size=50%"]),
        &["--pid", &sleeper.pid().to_string()],
    );
    assert_rejected(&out, "needs a memory limit");
}

/// The admin's config: memory stress capped at 100 MiB or 40% of the limit, at most 10 s, only
/// --size may be passed; CPU stress not enabled at all.
const CONFIG: &str = "apiVersion: toe.run/v1alpha1
kind: PowerToolConfig
metadata: {name: memory-stress-capped}
spec:
  tool: memory-stress
  maxDuration: 10s
  defaultResources: {limits: {memory: 64Mi}}
  arguments:
    - {name: size, type: amount, max: 100Mi, maxPercent: 40, default: 10%}
---
apiVersion: toe.run/v1alpha1
kind: PowerToolConfig
metadata: {name: profiling}
spec:
  tool: cpu-profile
  arguments:
    - {name: frequency, type: integer, max: 199}
";

/// Under a PowerToolConfig (as in a cluster), a fault may not starve the node: no fill of a
/// filesystem the node shares, no memory stress of a target without a limit, unless an admin
/// allows it by name.
#[test]
fn under_a_config_a_fault_cannot_starve_the_node() {
    if !require_root("under_a_config_a_fault_cannot_starve_the_node") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = |allow: &str| {
        format!(
            "apiVersion: toe.run/v1alpha1\nkind: PowerToolConfig\nmetadata: {{name: fill}}\nspec:\n  tool: volume-fill\n  {allow}\n  arguments:\n    - {{name: path, type: path}}\n    - {{name: fill, type: amount}}\n---\napiVersion: toe.run/v1alpha1\nkind: PowerToolConfig\nmetadata: {{name: stress}}\nspec:\n  tool: memory-stress\n  arguments:\n    - {{name: size, type: amount}}\n"
        )
    };
    std::fs::write(dir.path().join("strict.yaml"), config("maxDuration: 10s")).unwrap();
    // A process of the host: its /tmp is the node's own disk, and it has no memory limit.
    let target = demo(&["sleep", "60"], None);
    let pid = target.pid().to_string();
    let strict = ["--config", "strict.yaml", "--pid", &pid];
    for (spec, want) in [
        (
            tool_spec("volume-fill", "5s", &["--path=/tmp", "--fill=1MiB"]),
            "/tmp is on a filesystem the node shares with its other pods",
        ),
        (
            tool_spec("memory-stress", "5s", &["--size=16MiB"]),
            "the target has no memory limit",
        ),
    ] {
        assert_rejected(&toe_run(dir.path(), &spec, &strict), want);
    }
    // Refused before anything started: no fault ever entered the ledger.
    assert_eq!(
        ledger_entries(dir.path()),
        Vec::<String>::new(),
        "a refused fault recorded side effects"
    );
    // What an admin allowed by name, a dry run plans.
    std::fs::write(
        dir.path().join("allowing.yaml"),
        config("allowNodeSharedFilesystems: true"),
    )
    .unwrap();
    let mut spec = tool_spec("volume-fill", "5s", &["--path=/tmp", "--fill=1MiB"]);
    spec.push_str("  dryRun: true\n");
    let out = toe_run(
        dir.path(),
        &spec,
        &["--config", "allowing.yaml", "--pid", &pid],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("dry run"), "{err}");
}

#[test]
fn caps_from_the_config_are_enforced_before_anything_starts() {
    if !require_root("caps_from_the_config_are_enforced_before_anything_starts") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), CONFIG).unwrap();
    let cg = LimitedCgroup::memory("caps", 200 << 20);
    let target = cg.sleeper();
    let pid = target.pid().to_string();
    let with_config = ["--config", "config.yaml", "--pid", &pid];
    for (spec, want) in [
        (
            tool_spec("memory-stress", "5s", &["--size=150MiB"]),
            "--size: 150MiB is above the maximum 100MiB (rule of PowerToolConfig memory-stress-capped)",
        ),
        (
            tool_spec("memory-stress", "5s", &["--size=50%"]),
            "--size: 50% is above the maximum 40%",
        ),
        (
            tool_spec("memory-stress", "5s", &["--size=35%"]),
            "70MiB (35% of the 200MiB memory limit) is above the 64MiB its PowerToolConfig allows",
        ),
        (
            tool_spec("memory-stress", "5s", &["--size=80MiB"]),
            "80MiB (as asked) is above the 64MiB its PowerToolConfig allows (spec.defaultResources.limits.memory)",
        ),
        (
            tool_spec("memory-stress", "30s", &[]),
            "30s exceeds the maximum of 10s for PowerToolConfig memory-stress-capped",
        ),
        (
            tool_spec("memory-stress", "5s", &["--ramp=1s"]),
            "--ramp is not allowed by PowerToolConfig memory-stress-capped (allowed: --size)",
        ),
        (
            tool_spec("cpu-stress", "5s", &[]),
            "tool cpu-stress is not enabled here (no PowerToolConfig for it; enabled: memory-stress, cpu-profile)",
        ),
        (
            format!(
                "{}  alongside:\n    - name: cpu-profile\n      commandLineArguments: [\"--frequency=999\"]\n",
                tool_spec("memory-stress", "5s", &[])
            ),
            "spec.alongside[0].commandLineArguments: --frequency: 999 is above the maximum 199",
        ),
    ] {
        let out = toe_run(dir.path(), &spec, &with_config);
        assert_rejected(&out, want);
    }
    assert_eq!(
        ledger_entries(dir.path()),
        Vec::<String>::new(),
        "a refused fault recorded side effects"
    );
    // A config that is itself wrong names its own field.
    std::fs::write(
        dir.path().join("bad.yaml"),
        CONFIG.replace("maxPercent: 40", "maxPercent: 400"),
    )
    .unwrap();
    let out = toe_run(
        dir.path(),
        &tool_spec("memory-stress", "5s", &[]),
        &["--config", "bad.yaml", "--pid", &pid],
    );
    assert_rejected(
        &out,
        "--config bad.yaml: PowerToolConfig memory-stress-capped: spec.arguments[0] (size): maxPercent: 400 is not in 1..=100",
    );
    // Within the caps the config's default (10% of the 200 MiB limit) applies.
    let out = toe_run(
        dir.path(),
        &format!("{}  dryRun: true\n", tool_spec("memory-stress", "5s", &[])),
        &with_config,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("allocates and touches 20MiB"), "{stderr}");
}

#[test]
fn a_profile_alongside_a_memory_stress_shares_its_timeline() {
    if !require_root("a_profile_alongside_a_memory_stress_shares_its_timeline") {
        return;
    }
    let cg = LimitedCgroup::memory("alongside", 300 << 20);
    let target = cg.demo("spin 30");
    let spec = format!(
        "{}  alongside:\n    - name: cpu-profile\n    - name: signal-trace\n",
        // A ramp long enough that a sampling gap (the collectors' first symbolization of a
        // large binary holds the loop for up to half a second) still sees it climb.
        if toe_tests::emulated() {
            tool_spec("memory-stress", "10s", &["--size=100MiB", "--ramp=8s"])
        } else {
            tool_spec("memory-stress", "3s", &["--size=100MiB", "--ramp=2s"])
        }
    );
    let (outcome, sink) = profile(&spec, TargetSpec::Pid(target.pid()));
    let s = &outcome.summary;
    assert_eq!(s.alongside, ["cpu-profile", "signal-trace"]);
    let f = s.fault.as_ref().expect("fault section");
    assert!(f.error_percent.abs() <= 5.0, "{f:?}");
    assert_no_workers_left(&outcome);
    let cpu = s.cpu.as_ref().expect("cpu section");
    assert!(cpu.samples.recorded > 0, "{cpu:?}");
    assert!(s.signals.is_some());
    let art = sink.artifacts.lock().unwrap();
    for name in [
        "flamegraph.svg",
        "fault.csv",
        "events.jsonl",
        "run-timeline.svg",
    ] {
        assert!(art.contains_key(name), "{name} missing: {:?}", art.keys());
    }
    let t: toe_artifacts::timeline::Timeline =
        serde_json::from_slice(&art["run-timeline.json"]).unwrap();
    let names: Vec<&str> = t.lanes.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "cpu-profile: on-CPU samples",
            "signals and exits",
            "memory-stress: asked vs achieved"
        ]
    );
    // The fault's curve climbs over the ramp to what was asked, on the same axis as the
    // profile's samples, which kept coming while memory was stressed.
    let fault = &t.lanes[2];
    assert!((fault.levels[0].value - f64::from(100u32 << 20)).abs() < 1.0);
    let held = &fault.series[0].points;
    let peak = held.iter().map(|p| p.1).fold(0.0, f64::max);
    let early = held.iter().find(|p| p.0 > 100.0).expect("samples").1;
    assert!(early < peak / 2.0, "no ramp: {held:?}");
    let on_cpu = &t.lanes[0].series[0].points;
    assert!(
        on_cpu.iter().filter(|p| p.0 > 1500.0 && p.1 > 0.0).count() >= 3,
        "{on_cpu:?}"
    );
    assert!(t.duration_ms >= 2900.0, "{}", t.duration_ms);
}

#[test]
fn terminate_escalates_to_sigkill_only_after_the_grace_period() {
    if !require_root("terminate_escalates_to_sigkill_only_after_the_grace_period") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    // Handles SIGTERM and keeps running: a hung graceful shutdown.
    let stubborn = demo(&["trap", "60", &ready.display().to_string()], None);
    let _ = toe_tests::wait_for_pid_file(&ready);
    let (outcome, sink) = profile(
        &tool_spec("terminate", "30s", &["--grace=1s"]),
        TargetSpec::Pid(stubborn.pid()),
    );
    let f = outcome.summary.fault.as_ref().unwrap();
    let t = &f.terminated[0];
    assert_eq!(
        (t.pid, t.signal.as_str(), t.escalated),
        (stubborn.pid(), "SIGTERM", true),
        "{t:?}"
    );
    assert!(t.exited_after_ms.is_some_and(|ms| ms >= 1000.0), "{t:?}");
    assert!(
        t.outcome
            .as_deref()
            .is_some_and(|o| o.contains("killed by SIGKILL")),
        "{t:?}"
    );
    // The trace shows the SIGTERM was handled, not ignored by accident.
    let events =
        String::from_utf8(sink.artifacts.lock().unwrap()["events.jsonl"].to_vec()).unwrap();
    assert!(events.contains("\"signal\":\"SIGTERM\"") && events.contains("\"action\":\"handler\""));

    // A process that dies of SIGTERM is never sent SIGKILL.
    let polite = demo(&["sleep", "60"], None);
    let (outcome, _) = profile(
        &tool_spec("terminate", "30s", &["--grace=10s"]),
        TargetSpec::Pid(polite.pid()),
    );
    let t = &outcome.summary.fault.as_ref().unwrap().terminated[0];
    assert!(!t.escalated, "{t:?}");
    assert!(
        t.outcome
            .as_deref()
            .is_some_and(|o| o.contains("killed by SIGTERM")),
        "{t:?}"
    );
}

#[test]
fn terminate_picks_the_main_process_or_all_of_them() {
    if !require_root("terminate_picks_the_main_process_or_all_of_them") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cg = toe_tests::TestCgroup::new("terminate");
    let file = |n: &str| dir.path().join(n).display().to_string();
    let main = demo(
        &["trap", "60", &file("main"), "100", &file("child")],
        Some(&cg),
    );
    let _ = toe_tests::wait_for_pid_file(&dir.path().join("main"));
    let child = toe_tests::wait_for_pid_file(&dir.path().join("child"));
    let (outcome, _) = profile(
        &tool_spec("terminate", "30s", &["--mode=kill"]),
        TargetSpec::Cgroup(cg.path().to_owned()),
    );
    let f = outcome.summary.fault.as_ref().unwrap();
    let pids: Vec<u32> = f.terminated.iter().map(|t| t.pid).collect();
    assert_eq!(pids, vec![main.pid()], "{f:?}");
    assert!(
        Path::new(&format!("/proc/{child}")).exists(),
        "the child was not a target"
    );
    // `all` on a fresh target whose main process and child are both alive: both are ended
    // (`main` would end only the first, and leave the child running). The first target's child
    // goes first.
    let _ = Command::new("kill")
        .args(["-9", &child.to_string()])
        .status();
    let cg = toe_tests::TestCgroup::new("terminate-all");
    let main = demo(
        &["trap", "60", &file("main2"), "100", &file("child2")],
        Some(&cg),
    );
    let _ = toe_tests::wait_for_pid_file(&dir.path().join("main2"));
    let child = toe_tests::wait_for_pid_file(&dir.path().join("child2"));
    let (outcome, _) = profile(
        &tool_spec("terminate", "30s", &["--mode=kill", "--scope=all"]),
        TargetSpec::Cgroup(cg.path().to_owned()),
    );
    let f = outcome.summary.fault.as_ref().unwrap();
    let mut pids: Vec<u32> = f.terminated.iter().map(|t| t.pid).collect();
    pids.sort_unstable();
    let mut want = vec![main.pid(), child];
    want.sort_unstable();
    assert_eq!(pids, want, "{f:?}");
    assert!(
        f.terminated
            .iter()
            .all(|t| t.signal == "SIGKILL" && t.exited_after_ms.is_some())
    );
}

/// A 64 MiB tmpfs mounted for one test, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=64m"),
        )
        .expect("mount tmpfs");
        Self(dir)
    }

    fn path(&self) -> String {
        self.0.path().display().to_string()
    }

    fn used_percent(&self) -> f64 {
        let st = nix::sys::statvfs::statvfs(self.0.path()).unwrap();
        let used = st.blocks() - st.blocks_free();
        #[expect(clippy::cast_precision_loss, reason = "a percentage")]
        let p = used as f64 / (used + st.blocks_available()) as f64 * 100.0;
        p
    }

    fn fill_files(&self) -> usize {
        std::fs::read_dir(self.0.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".toe-fill-"))
            .count()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn volume_fill_reaches_the_percentage_within_1_point_and_removes_its_file() {
    if !require_root("volume_fill_reaches_the_percentage_within_1_point_and_removes_its_file") {
        return;
    }
    let fs = Tmpfs::new();
    let target = demo(&["sleep", "60"], None);
    let path = format!("--path={}", fs.path());
    let (outcome, _) = profile(
        &tool_spec("volume-fill", "2s", &[&path, "--fill=50%"]),
        TargetSpec::Pid(target.pid()),
    );
    let f = outcome.summary.fault.as_ref().unwrap();
    assert_eq!(f.unit, "% used");
    assert!((f.achieved - 50.0).abs() <= 1.0, "{f:?}");
    assert_eq!(fs.fill_files(), 0, "fill file left behind");
    assert!(fs.used_percent() < 1.0);
    // Bytes: 16 MiB of 64 MiB.
    let (outcome, _) = profile(
        &tool_spec("volume-fill", "2s", &[&path, "--fill=16MiB"]),
        TargetSpec::Pid(target.pid()),
    );
    let f = outcome.summary.fault.as_ref().unwrap();
    assert!((f.achieved - 25.0).abs() <= 1.0, "{f:?}");
    // Never past 99%, and never outside the target's view of the tree.
    let dir = tempfile::tempdir().unwrap();
    for (args, want) in [
        (vec![path.as_str(), "--fill=70MiB"], "past 99% used"),
        (
            vec!["--path=/tmp/../etc", "--fill=1MiB"],
            "\"..\" is not allowed",
        ),
        (vec![path.as_str(), "--fill=100%"], "out of range 1%..=99%"),
        (vec!["--path=/no/such/dir"], "cannot open it as a directory"),
    ] {
        let out = toe_run(
            dir.path(),
            &tool_spec("volume-fill", "2s", &args),
            &["--pid", &target.pid().to_string()],
        );
        assert_rejected(&out, want);
    }
    assert_eq!(fs.fill_files(), 0);
}

#[test]
fn a_fill_file_left_by_a_killed_run_is_removed_by_cleanup() {
    if !require_root("a_fill_file_left_by_a_killed_run_is_removed_by_cleanup") {
        return;
    }
    let fs = Tmpfs::new();
    let dir = tempfile::tempdir().unwrap();
    let target = demo(&["sleep", "60"], None);
    let path = format!("--path={}", fs.path());
    let mut toe = start_toe(
        dir.path(),
        &tool_spec("volume-fill", "60s", &[&path, "--fill=10MiB"]),
        target.pid(),
    );
    for _ in 0..300 {
        if fs.fill_files() == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fs.fill_files(), 1, "the fill never started");
    toe.kill().unwrap();
    toe.wait().unwrap();
    assert_eq!(fs.fill_files(), 1, "SIGKILL cannot have rolled back");
    let out = Command::new(bin("toe"))
        .env(ledger::STATE_DIR_ENV, dir.path().join("state"))
        .arg("cleanup")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 file(s) removed"), "{err}");
    assert_eq!(fs.fill_files(), 0);
}

/// The target saw the volume at /mnt in its own mount namespace (as a container sees a PV), and
/// both TOE (SIGKILL) and the target are gone: cleanup finds the directory again through the
/// host's mount of the same filesystem, checks it is the same directory, and removes the file.
#[test]
fn a_fill_file_is_removed_after_a_crash_even_when_the_target_is_gone() {
    if !require_root("a_fill_file_is_removed_after_a_crash_even_when_the_target_is_gone") {
        return;
    }
    let fs = Tmpfs::new();
    let volume = Path::new(&fs.path()).join("volume");
    std::fs::create_dir(&volume).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = toe_tests::TestProcess(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
            .arg(format!(
                "mount --bind {} /mnt && exec {} sleep 60",
                volume.display(),
                bin("toe-demo").display()
            ))
            .spawn()
            .unwrap(),
    );
    for _ in 0..100 {
        if std::fs::read_to_string(format!("/proc/{}/comm", target.pid()))
            .is_ok_and(|c| c.trim() == "toe-demo")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let files = || {
        std::fs::read_dir(&volume)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".toe-fill-"))
            .count()
    };
    let mut toe = start_toe(
        dir.path(),
        &tool_spec("volume-fill", "60s", &["--path=/mnt", "--fill=10MiB"]),
        target.pid(),
    );
    for _ in 0..300 {
        if files() == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(files(), 1, "the fill never started");
    toe.kill().unwrap();
    toe.wait().unwrap();
    // The target goes too, and with it its mount namespace: /proc/<pid>/root leads nowhere.
    drop(target);
    let out = Command::new(bin("toe"))
        .env(ledger::STATE_DIR_ENV, dir.path().join("state"))
        .arg("cleanup")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("removed {}/.toe-fill-", volume.display())),
        "{err}"
    );
    assert_eq!(files(), 0);
}

/// CPU time charged to the cgroup of `pid` in nanoseconds (v1 cpuacct, else v2 cpu.stat).
/// Runs `f` while reading the CPU time of `pid`'s cgroup every 100 ms (the kernel's counter, not
/// TOE's): `f`'s result and the cgroup's CPU rate in its steady state, from a second after the
/// counter starts rising to half a second before it stops. Starting and stopping the workers
/// (exec, joining cgroups) is not what a load level promises, and takes far longer on a slow
/// machine than on a fast one.
fn cpu_rate_while<T>(pid: u32, f: impl FnOnce() -> T) -> (T, f64) {
    let (done, stopped) = std::sync::mpsc::channel::<()>();
    let watcher = std::thread::spawn(move || {
        let mut samples = vec![(std::time::Instant::now(), cgroup_cpu_ns(pid))];
        while stopped.recv_timeout(Duration::from_millis(100)).is_err() {
            samples.push((std::time::Instant::now(), cgroup_cpu_ns(pid)));
        }
        samples
    });
    let out = f();
    done.send(()).unwrap();
    let samples = watcher.join().unwrap();
    // The sleeper's own wake-ups are noise next to the workers' load: a rise is 1 ms or more.
    let rising: Vec<usize> = (1..samples.len())
        .filter(|&i| samples[i].1 - samples[i - 1].1 > 1_000_000)
        .collect();
    let (first, last) = (
        samples[*rising.first().expect("the cgroup never ran")].0,
        samples[*rising.last().expect("the cgroup never ran")].0,
    );
    let from = samples
        .iter()
        .find(|s| s.0 >= first + Duration::from_secs(1))
        .expect("samples");
    let to = samples
        .iter()
        .rev()
        .find(|s| s.0 + Duration::from_millis(500) <= last)
        .expect("samples");
    let span = to.0.duration_since(from.0).as_secs_f64();
    assert!(span >= 2.0, "the workers ran a steady {span:.2} s only");

    #[expect(clippy::cast_precision_loss, reason = "nanoseconds of a few seconds")]
    let rate = (to.1 - from.1) as f64 / 1e9 / span;
    (out, rate)
}

/// The workers' CPU time landed in the target's cgroup: while they ran, its own counter rose by
/// what the workers' clocks measured (the target itself sleeps). Held to `achieved`, not
/// `asked`: the cgroup's window is the test's, not the agent's, and on a loaded machine (two
/// emulated CPUs shared with other tests) a duty cycle overshoots by a few percent in both;
/// `error_percent` holds the rate to what was asked.
fn assert_charged_to_the_cgroup(rate: f64, f: &toe_artifacts::summary::fault::FaultSummary) {
    assert!(
        (rate / f.achieved - 1.0).abs() <= 0.05,
        "the target's cgroup used {rate:.3} CPU while the workers measured {:.3}: {f:?}",
        f.achieved
    );
}

fn cgroup_cpu_ns(pid: u32) -> u64 {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in own.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrls, path) = (f.next(), f.next().unwrap(), f.next().unwrap());
        if ctrls.split(',').any(|c| c == "cpuacct") {
            let file = format!("/sys/fs/cgroup/{ctrls}{path}/cpuacct.usage");
            return std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{file}: {e}"))
                .trim()
                .parse()
                .unwrap();
        }
    }
    let path = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .find(|p| Path::new(p).join("cgroup.controllers").exists())
        .unwrap();
    let stat = std::fs::read_to_string(format!("{root}{path}/cpu.stat")).unwrap();
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1000
}

/// Stress against a real container with podman's own limits: the load is relative to its CPU
/// quota and charged to its cgroup, the memory is a share of its memory limit.
#[test]
fn stress_in_a_real_container_is_relative_to_its_limits_and_charged_to_it() {
    if !require_root("stress_in_a_real_container_is_relative_to_its_limits_and_charged_to_it") {
        return;
    }
    let c = toe_tests::Container::run_with(
        "limits",
        &["--cpus=0.5", "--memory=200m"],
        &["sleep", "300"],
    );
    let pid = c.pid();
    assert!(pid > 0);
    let ((outcome, _), rate) = cpu_rate_while(pid, || {
        profile(
            &tool_spec("cpu-stress", "5s", &["--workers=2", "--load=60"]),
            TargetSpec::Container(c.id.clone()),
        )
    });
    let f = outcome.summary.fault.as_ref().unwrap();
    assert_eq!(f.cpu_limit, Some(0.5), "{f:?}");
    assert!((f.asked - 0.3).abs() < 1e-9, "{f:?}");
    assert!(
        f.error_percent.abs() <= 5.0,
        "asked {} achieved {}",
        f.asked,
        f.achieved
    );
    assert_charged_to_the_cgroup(rate, f);
    assert_no_workers_left(&outcome);
    // The worker touches its memory under the container's 0.5-CPU quota, while parallel tests
    // load both CPUs: give it time to get there. The container's own counter carries it.
    let (outcome, baseline, peak) = memory_while(pid, || {
        profile(
            &tool_spec("memory-stress", "6s", &["--size=50%"]),
            TargetSpec::Container(c.id.clone()),
        )
        .0
    });
    let f = outcome.summary.fault.as_ref().unwrap();
    assert_eq!(f.memory_limit, Some(200 << 20), "{f:?}");
    assert!((f.asked - f64::from(100u32 << 20)).abs() < 1.0, "{f:?}");
    assert!(f.error_percent.abs() <= 5.0, "{f:?}");
    assert_grew_by(baseline, peak, f.asked);
    assert_no_workers_left(&outcome);
}

#[test]
fn terminate_in_a_real_container_hits_the_named_sidecar_not_the_app() {
    if !require_root("terminate_in_a_real_container_hits_the_named_sidecar_not_the_app") {
        return;
    }
    // Two containers of one "pod": the app and a sidecar. Both main processes are a container's
    // PID 1, which ignores SIGTERM from outside without a handler: the graceful path must
    // escalate, and only in the sidecar.
    let app = toe_tests::Container::run("app", &["sleep", "300"]);
    let sidecar = toe_tests::Container::run("sidecar", &["sleep", "300"]);
    let (app_pid, sidecar_pid) = (app.pid(), sidecar.pid());
    assert!(app_pid > 0 && sidecar_pid > 0);
    let (outcome, _) = profile(
        &tool_spec("terminate", "30s", &["--grace=1s"]),
        TargetSpec::Container(format!("containerd://{}", &sidecar.id[..16])),
    );
    let f = outcome.summary.fault.as_ref().unwrap();
    assert_eq!(f.terminated.len(), 1, "{f:?}");
    let t = &f.terminated[0];
    assert_eq!(t.pid, sidecar_pid, "{t:?}");
    assert!(
        t.escalated,
        "PID 1 ignored SIGTERM, so SIGKILL must follow: {t:?}"
    );
    assert!(
        t.outcome.as_deref().is_some_and(|o| o.contains("SIGKILL")),
        "{t:?}"
    );
    assert_eq!(app.pid(), app_pid, "the app container was touched");
    // A container id that matches nothing is a clear error before anything happens.
    let dir = tempfile::tempdir().unwrap();
    let out = toe_run(
        dir.path(),
        &tool_spec("terminate", "5s", &[]),
        &["--container", "0123456789abcdef"],
    );
    assert_rejected(&out, "no cgroup of such a container");
}
