//! A fault between start and rollback: workers inside the target's cgroups, sampled for what
//! they achieve, every worker and file in the crash-safe ledger until it is undone.

use std::{
    process::Child,
    time::{Duration, Instant},
};

use toe_artifacts::summary::fault::{FaultSample, FaultSummary, Termination};

use super::{
    FaultError, FaultPlan, Proc, TargetFacts,
    facts::stat_fields,
    fill,
    ledger::{self, Entry, Ledger, Owner, Recovered},
    worker,
};

/// Anonymous resident bytes of a process.
fn rss_anon(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// CPU achieved is measured after the workers' first second (start-up and the first period).
const WARMUP: Duration = Duration::from_secs(1);

/// A fault between start and rollback.
pub struct FaultWork {
    pub plan: FaultPlan,
    facts: TargetFacts,
    run: String,
    ledger: Ledger,
    children: Vec<Child>,
    pids: Vec<u32>,
    started: Instant,
    last: Option<(Instant, u64)>,
    warm: Option<(Instant, u64)>,
    peak_bytes: u64,
    oom_before: Option<u64>,
    recovered: Recovered,
    samples: Vec<FaultSample>,
    /// terminate: per victim, when it exited (since the first signal); escalations.
    exits: std::collections::BTreeMap<u32, Option<Duration>>,
    escalated: Vec<u32>,
    /// volume-fill: the directory, the file's name in it, and the bytes allocated.
    fill: Option<(std::os::fd::OwnedFd, String, u64)>,
    peak_used_percent: f64,
}

fn signal(p: &Proc, sig: nix::sys::signal::Signal) {
    // The pid is only signalled while it is still the process the plan chose.
    if stat_fields(p.pid).is_some_and(|(_, _, start)| start == p.start) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(p.pid).unwrap_or(0)),
            sig,
        );
    }
}

/// Gone, a zombie, or replaced by another process with the same pid.
fn has_exited(p: &Proc) -> bool {
    stat_fields(p.pid).is_none_or(|(_, state, start)| start != p.start || state == 'Z')
}

impl FaultWork {
    /// Recovers leftovers of crashed runs, records the run in the ledger, starts the workers.
    pub fn start(run: &str, plan: FaultPlan, facts: TargetFacts) -> Result<Self, FaultError> {
        let ledger_err = |l: &Ledger| {
            let path = l.path().display().to_string();
            move |source| FaultError::Ledger { path, source }
        };
        let ledger = Ledger::open_default().map_err(|source| FaultError::Ledger {
            path: ledger::DEFAULT_STATE_DIR.into(),
            source,
        })?;
        let recovered = ledger.recover().map_err(ledger_err(&ledger))?;
        for e in [
            Entry::Begin {
                run: run.into(),
                owner: Owner::current(),
            },
            Entry::Workers { run: run.into() },
        ] {
            ledger.record(&e).map_err(ledger_err(&ledger))?;
        }
        let files = facts.cgroups.procs_files();
        let (args, n) = match &plan {
            FaultPlan::Terminate { .. } | FaultPlan::Fill { .. } => (Vec::new(), 0),
            FaultPlan::Cpu { workers, duty, .. } => {
                (vec!["cpu".to_owned(), format!("{duty:.6}")], *workers)
            }
            FaultPlan::Memory { bytes, ramp, .. } => (
                vec![
                    "memory".to_owned(),
                    bytes.to_string(),
                    ramp.as_millis().to_string(),
                ],
                1,
            ),
        };
        let mut work = Self {
            oom_before: facts.cgroups.oom_kills(),
            plan,
            facts,
            run: run.into(),
            ledger,
            children: Vec::new(),
            pids: Vec::new(),
            started: Instant::now(),
            last: None,
            warm: None,
            peak_bytes: 0,
            recovered,
            samples: Vec::new(),
            exits: std::collections::BTreeMap::new(),
            escalated: Vec::new(),
            fill: None,
            peak_used_percent: 0.0,
        };
        match work.plan {
            FaultPlan::Fill { .. } => {
                work.start_fill()?;
                return Ok(work);
            }
            FaultPlan::Terminate { .. } => {
                work.start_terminate();
                return Ok(work);
            }
            _ => {}
        }
        for _ in 0..n {
            match worker::spawn(run, &args, &files) {
                Ok(c) => {
                    work.pids.push(c.id());
                    work.children.push(c);
                }
                Err(e) => {
                    work.rollback();
                    return Err(FaultError::Worker(e));
                }
            }
        }
        work.started = Instant::now();
        Ok(work)
    }

    /// Records the fill file in the ledger, then creates it.
    fn start_fill(&mut self) -> Result<(), FaultError> {
        let FaultPlan::Fill { fs, bytes, .. } = &self.plan else {
            return Ok(());
        };
        {
            let dir = fill::open_dir(fs.pid, &fs.path)?;
            let name = format!(".toe-fill-{}", self.run);
            // Recorded first: a crash between the two leaves a ledger entry, never an orphan.
            let through_proc = std::path::Path::new(&format!("/proc/{}/root", fs.pid))
                .join(fs.path.trim_start_matches('/'))
                .join(&name);
            let place = fill::Place::new(fs.pid, &fs.path, &dir, &name)?;
            self.ledger
                .record(&Entry::File {
                    run: self.run.clone(),
                    path: through_proc,
                    place: Some(place),
                })
                .map_err(|source| FaultError::Ledger {
                    path: self.ledger.path().display().to_string(),
                    source,
                })?;
            let written = fill::create(&dir, &name, *bytes)?;
            self.fill = Some((dir, name, written));
            self.started = Instant::now();
        }
        Ok(())
    }

    /// Sends the first signal to every victim.
    fn start_terminate(&mut self) {
        if let FaultPlan::Terminate {
            victims, graceful, ..
        } = &self.plan
        {
            let sig = if *graceful {
                nix::sys::signal::Signal::SIGTERM
            } else {
                nix::sys::signal::Signal::SIGKILL
            };
            self.started = Instant::now();
            for v in victims {
                signal(v, sig);
                self.exits.insert(v.pid, None);
            }
        }
    }

    fn workers_cpu_ns(&self) -> u64 {
        self.pids
            .iter()
            .filter_map(|&p| crate::targets::cpu_ns(p))
            .sum()
    }

    /// A terminate fault is done when every victim has exited.
    #[must_use]
    pub fn done(&self) -> bool {
        matches!(self.plan, FaultPlan::Terminate { .. }) && self.exits.values().all(Option::is_some)
    }

    /// terminate: notes exits, escalates to SIGKILL once the grace period is over.
    fn watch_victims(&mut self) {
        let FaultPlan::Terminate {
            victims,
            graceful,
            grace,
        } = &self.plan
        else {
            return;
        };
        let since = self.started.elapsed();
        for v in victims {
            if self.exits.get(&v.pid).is_some_and(Option::is_none) && has_exited(v) {
                self.exits.insert(v.pid, Some(since));
            }
        }
        if *graceful && since >= *grace {
            for v in victims {
                if self.exits.get(&v.pid).is_some_and(Option::is_none)
                    && !self.escalated.contains(&v.pid)
                {
                    signal(v, nix::sys::signal::Signal::SIGKILL);
                    self.escalated.push(v.pid);
                }
            }
        }
    }

    /// Samples what the workers achieve (rate-limited to every 250 ms); a terminate fault
    /// watches its victims on every call.
    pub fn tick(&mut self) {
        self.watch_victims();
        let now = Instant::now();
        if self.last.is_some_and(|(t, _)| now - t < SAMPLE_EVERY) {
            return;
        }
        let t_s = (now - self.started).as_secs_f64();
        let cgroup_memory = (!self.facts.cgroups.is_root("memory"))
            .then(|| self.facts.cgroups.memory_usage())
            .flatten();
        let workers = match self.plan {
            FaultPlan::Fill { .. } => {
                let used = self
                    .fill
                    .as_ref()
                    .and_then(|(dir, ..)| fill::space(dir).ok())
                    .map_or(0.0, |s| s.used_percent());
                self.peak_used_percent = self.peak_used_percent.max(used);
                self.last = Some((now, 0));
                used
            }
            FaultPlan::Terminate { .. } => {
                #[expect(clippy::cast_precision_loss, reason = "a count")]
                let alive = self.exits.values().filter(|e| e.is_none()).count() as f64;
                self.last = Some((now, 0));
                alive
            }
            FaultPlan::Cpu { .. } => {
                let ns = self.workers_cpu_ns();
                if self.warm.is_none() && now - self.started >= WARMUP {
                    self.warm = Some((now, ns));
                }
                #[expect(clippy::cast_precision_loss, reason = "CPU rate")]
                let rate = self.last.map_or(0.0, |(t, prev)| {
                    ns.saturating_sub(prev) as f64 / (now - t).as_nanos() as f64
                });
                self.last = Some((now, ns));
                rate
            }
            FaultPlan::Memory { .. } => {
                let b: u64 = self.pids.iter().filter_map(|&p| rss_anon(p)).sum();
                self.peak_bytes = self.peak_bytes.max(b);
                self.last = Some((now, 0));
                #[expect(clippy::cast_precision_loss, reason = "bytes for display")]
                let b = b as f64;
                b
            }
        };
        self.samples.push(FaultSample {
            t_s,
            workers,
            cgroup_memory,
        });
    }

    /// Kills and reaps every worker; returns how long that took.
    fn rollback(&mut self) -> Duration {
        let t = Instant::now();
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        // Anything of this run the children list does not hold (cannot happen, but the
        // ledger's search is cheap and authoritative).
        let _ = ledger::kill_workers(&self.run);
        if let Some((dir, name, _)) = self.fill.take() {
            let _ = fill::remove(&dir, &name);
        }
        let _ = self.ledger.record(&Entry::End {
            run: self.run.clone(),
        });
        t.elapsed()
    }

    /// Rolls back and reports asked versus achieved.
    #[must_use]
    pub fn finish(mut self) -> FaultSummary {
        self.tick();
        let cpu_end = self.workers_cpu_ns();
        let end = Instant::now();
        // Workers that died before the end: only a SIGKILL from outside (the OOM killer).
        let mut killed = Vec::new();
        for c in &mut self.children {
            if let Ok(Some(status)) = c.try_wait() {
                use std::os::unix::process::ExitStatusExt as _;
                if status.signal() == Some(libc::SIGKILL) {
                    killed.push(c.id());
                }
            }
        }
        let oom_kills = match (self.oom_before, self.facts.cgroups.oom_kills()) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let rollback = self.rollback();
        let leftovers = u32::try_from(ledger::worker_pids(&self.run).len()).unwrap_or(u32::MAX);
        let (unit, asked, achieved) = match &self.plan {
            FaultPlan::Cpu { asked_cpus, .. } => {
                #[expect(clippy::cast_precision_loss, reason = "CPU rate")]
                let achieved = self.warm.map_or(0.0, |(t, ns)| {
                    cpu_end.saturating_sub(ns) as f64 / (end - t).as_nanos().max(1) as f64
                });
                ("CPUs", *asked_cpus, achieved)
            }
            #[expect(clippy::cast_precision_loss, reason = "bytes for display")]
            FaultPlan::Memory { bytes, .. } => ("bytes", *bytes as f64, self.peak_bytes as f64),
            FaultPlan::Fill { expect_percent, .. } => {
                ("% used", *expect_percent, self.peak_used_percent)
            }
            #[expect(clippy::cast_precision_loss, reason = "counts")]
            FaultPlan::Terminate { victims, .. } => (
                "processes",
                victims.len() as f64,
                self.exits.values().filter(|e| e.is_some()).count() as f64,
            ),
        };
        let terminated = match &self.plan {
            FaultPlan::Terminate {
                victims, graceful, ..
            } => victims
                .iter()
                .map(|v| Termination {
                    pid: v.pid,
                    comm: v.comm.clone(),
                    signal: if *graceful { "SIGTERM" } else { "SIGKILL" }.into(),
                    escalated: self.escalated.contains(&v.pid),
                    exited_after_ms: self
                        .exits
                        .get(&v.pid)
                        .copied()
                        .flatten()
                        .map(|d| d.as_secs_f64() * 1000.0),
                    outcome: None,
                })
                .collect(),
            _ => Vec::new(),
        };
        FaultSummary {
            fault: self.plan.name().into(),
            plan: self.plan.describe(&self.facts),
            unit: unit.into(),
            asked,
            achieved,
            error_percent: if asked > 0.0 {
                (achieved - asked) / asked * 100.0
            } else {
                0.0
            },
            cpu_limit: self.facts.cpu_limit,
            memory_limit: self.facts.memory_limit,
            oom_kills,
            workers_killed: killed,
            workers: self.pids.clone(),
            rollback_ms: u64::try_from(rollback.as_millis()).unwrap_or(u64::MAX),
            leftovers,
            recovered: std::mem::take(&mut self.recovered),
            samples: std::mem::take(&mut self.samples),
            terminated,
        }
    }
}

impl Drop for FaultWork {
    /// A run that unwinds (an error, a panic) still rolls back.
    fn drop(&mut self) {
        if self
            .children
            .iter_mut()
            .any(|c| matches!(c.try_wait(), Ok(None)))
        {
            self.rollback();
        }
    }
}
