//! Fault injection. Planning is pure ([`plan`]: options + measured facts about the target -> the
//! exact worker setup); running spawns workers inside the target's cgroups, samples what they
//! achieve, and rolls everything back at the end, on abort, or (through the [`ledger`]) in the
//! next run after a crash.

pub mod cgroups;
pub mod fill;
pub mod ledger;
pub mod worker;

use std::{
    fmt::Write as _,
    process::Child,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use toe_common::api::{Amount, ToolOptions, format_size};

use self::{
    cgroups::TargetCgroups,
    ledger::{Entry, Ledger, Owner, Recovered},
};
use crate::targets::{ResolvedTarget, TargetError};

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("fault ledger {path}: {source}")]
    Ledger {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting a worker in the target's cgroups: {0}")]
    Worker(#[source] std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What planning needs to know about the target, measured (read-only) beforehand.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TargetFacts {
    pub cgroups: TargetCgroups,
    /// CPUs the target's cgroup may use (its quota), if limited.
    pub cpu_limit: Option<f64>,
    pub memory_limit: Option<u64>,
    pub online_cpus: u32,
    /// Host memory (MemTotal).
    pub host_memory: u64,
    /// The target's processes: (pid, parent pid, name, start time).
    pub processes: Vec<Proc>,
    /// volume-fill: the filesystem at the path, as the target's main process sees it.
    pub fs: Option<FsFacts>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FsFacts {
    /// Whose root and mount namespace the path is resolved in.
    pub pid: u32,
    pub path: String,
    pub space: fill::FsSpace,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
    /// Clock ticks since boot: tells a process from a later one with the same pid.
    pub start: u64,
}

/// (ppid, state, start time) from `/proc/<pid>/stat`.
fn stat_fields(pid: u32) -> Option<(u32, char, u64)> {
    let f = crate::targets::proc_stat(pid)?;
    Some((
        f.get(1)?.parse().ok()?,
        f.first()?.chars().next()?,
        f.get(19)?.parse().ok()?,
    ))
}

fn proc_info(pid: u32) -> Option<Proc> {
    let (ppid, _, start) = stat_fields(pid)?;
    Some(Proc {
        pid,
        ppid,
        comm: crate::targets::process_name(pid)?,
        start,
    })
}

/// The target's main process: the oldest whose parent is outside the target.
fn main_process(processes: &[Proc]) -> Option<&Proc> {
    let set: std::collections::HashSet<u32> = processes.iter().map(|p| p.pid).collect();
    processes
        .iter()
        .filter(|p| !set.contains(&p.ppid))
        .min_by_key(|p| (p.start, p.pid))
}

/// Processes of a cgroup directory and every cgroup below it.
fn cgroup_members(dir: &std::path::Path) -> Vec<u32> {
    crate::targets::cgroup_dirs(dir)
        .iter()
        .filter_map(|(d, _)| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `PF_KTHREAD` in the flags field of `/proc/<pid>/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

fn is_kernel_thread(pid: u32) -> bool {
    crate::targets::proc_stat(pid)
        .and_then(|f| f.get(6)?.parse::<u64>().ok())
        .is_some_and(|f| f & PF_KTHREAD != 0)
}

fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Measures the target and refuses targets no fault may touch: TOE itself, PID 1, kernel
/// threads, and the root cgroup (the whole machine).
pub fn facts(target: &ResolvedTarget, options: &ToolOptions) -> Result<TargetFacts, FaultError> {
    let me = std::process::id();
    let cgroups = if let Some(&pid) = target.tgids.first() {
        if pid == me {
            return Err(FaultError::Refused("the target is TOE itself".into()));
        }
        if pid == 1 {
            return Err(FaultError::Refused(
                "the target is PID 1 (the host's init); faults never touch it".into(),
            ));
        }
        if is_kernel_thread(pid) {
            return Err(FaultError::Refused(format!(
                "pid {pid} is a kernel thread; it has no cgroup to stress"
            )));
        }
        TargetCgroups::of_pid(pid)?
    } else if let Some(cg) = target.cgroups.first() {
        if cg.level == 0 {
            return Err(FaultError::Refused(
                "the target is the root cgroup, i.e. the whole machine".into(),
            ));
        }
        let own = TargetCgroups::of_pid(me)?;
        if own.v2.as_ref().is_some_and(|d| d.starts_with(&cg.path)) {
            return Err(FaultError::Refused(format!(
                "{} contains TOE itself",
                cg.path.display()
            )));
        }
        TargetCgroups::of_v2_dir(&cg.path)?
    } else {
        return Err(FaultError::Refused("the target has no process".into()));
    };
    let pids: Vec<u32> = if target.tgids.is_empty() {
        target
            .cgroups
            .iter()
            .flat_map(|c| cgroup_members(&c.path))
            .collect()
    } else {
        target
            .tgids
            .iter()
            .copied()
            .chain(crate::targets::descendants(&target.tgids))
            .collect()
    };
    let processes: Vec<Proc> = pids.into_iter().filter_map(proc_info).collect();
    let fs = match options {
        ToolOptions::VolumeFill(o) => {
            let pid = main_process(&processes)
                .map(|p| p.pid)
                .ok_or_else(|| FaultError::Refused("the target has no process".into()))?;
            let dir = fill::open_dir(pid, &o.path)?;
            Some(FsFacts {
                pid,
                path: o.path.clone(),
                space: fill::space(&dir)?,
            })
        }
        _ => None,
    };
    Ok(TargetFacts {
        fs,
        processes,
        cpu_limit: cgroups.cpu_limit(),
        memory_limit: cgroups.memory_limit(),
        cgroups,
        online_cpus: aya::util::online_cpus().map_or(1, |c| u32::try_from(c.len()).unwrap_or(1)),
        host_memory: host_memory(),
    })
}

/// The exact setup a fault runs with.
#[derive(Clone, Debug, PartialEq)]
pub enum FaultPlan {
    Cpu {
        workers: u32,
        /// Fraction of each 100 ms period each worker burns.
        duty: f64,
        /// workers x duty, in CPUs.
        asked_cpus: f64,
        /// What the percentage is relative to, in words.
        basis: String,
    },
    Memory {
        bytes: u64,
        ramp: Duration,
        basis: String,
    },
    Fill {
        fs: FsFacts,
        bytes: u64,
        /// Used percentage expected once written.
        expect_percent: f64,
        basis: String,
    },
    Terminate {
        victims: Vec<Proc>,
        /// SIGTERM first, SIGKILL after `grace`; else SIGKILL at once.
        graceful: bool,
        grace: Duration,
    },
}

impl FaultPlan {
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cpu { .. } => "cpu-stress",
            Self::Memory { .. } => "memory-stress",
            Self::Terminate { .. } => "terminate",
            Self::Fill { .. } => "volume-fill",
        }
    }

    /// The plan in words, one line per decision (printed by a dry run, kept in the summary).
    #[must_use]
    pub fn describe(&self, facts: &TargetFacts) -> Vec<String> {
        let mut out = Vec::new();
        let files: Vec<String> = facts
            .cgroups
            .procs_files()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        match self {
            Self::Cpu {
                workers,
                duty,
                asked_cpus,
                basis,
            } => {
                out.push(format!(
                    "start {workers} CPU worker(s), each burning {:.1}% of every 100 ms ({basis})",
                    duty * 100.0
                ));
                out.push(format!("total asked: {asked_cpus:.3} CPUs"));
            }
            Self::Terminate { .. } => {}
            Self::Fill {
                fs,
                bytes,
                expect_percent,
                basis,
            } => {
                out.push(format!(
                    "write {} into {} as pid {} sees it ({basis}): the filesystem goes from \
                     {:.1}% to {expect_percent:.1}% used",
                    format_size(*bytes),
                    fs.path,
                    fs.pid,
                    fs.space.used_percent()
                ));
                out.push(
                    "roll back at the end, on Ctrl-C/SIGTERM, or (after a crash) on the next \
                     run: the file is removed"
                        .into(),
                );
                return out;
            }
            Self::Memory { bytes, ramp, basis } => {
                out.push(format!(
                    "start 1 memory worker that allocates and touches {} ({basis}){}",
                    format_size(*bytes),
                    if ramp.is_zero() {
                        String::new()
                    } else {
                        format!(" over {}", toe_common::api::format_duration(*ramp))
                    }
                ));
            }
        }
        if let Self::Terminate {
            victims,
            graceful,
            grace,
        } = self
        {
            let who: Vec<String> = victims
                .iter()
                .map(|p| format!("{} ({})", p.comm, p.pid))
                .collect();
            out.push(if *graceful {
                format!(
                    "send SIGTERM to {}; SIGKILL whatever is still alive {} later",
                    who.join(", "),
                    toe_common::api::format_duration(*grace)
                )
            } else {
                format!("send SIGKILL to {}", who.join(", "))
            });
            out.push("trace their signals and exits while they end".into());
            return out;
        }
        out.push(format!(
            "workers join the target's cgroups before they run: {}",
            files.join(", ")
        ));
        out.push(
            "roll back at the end, on Ctrl-C/SIGTERM, or (after a crash) on the next run: \
             workers are killed"
                .into(),
        );
        out
    }
}

/// Pure: turns the tool's options and the target's facts into the exact plan.
pub fn plan(options: &ToolOptions, facts: &TargetFacts) -> Result<FaultPlan, FaultError> {
    match options {
        ToolOptions::CpuStress(o) => {
            // A percentage of the target's limit, not of the node: with a 0.5-CPU quota and 2
            // workers, 100% means 0.25 CPU each.
            let (share, basis) = match facts.cpu_limit {
                Some(limit) => (
                    (limit / f64::from(o.workers)).min(1.0),
                    format!("of its share of the cgroup's {limit:.2}-CPU limit"),
                ),
                None => (1.0, "of one core; the target has no CPU limit".into()),
            };
            let duty = f64::from(o.load_percent) / 100.0 * share;
            if let Some(m) = o.limit_millicores {
                #[expect(clippy::cast_precision_loss, reason = "millicores")]
                let limit = m as f64 / 1000.0;
                let asked = duty * f64::from(o.workers);
                if asked > limit + 1e-9 {
                    return Err(FaultError::Refused(format!(
                        "the workers would use {asked:.3} CPUs ({basis}), above the {limit:.3} \
                         CPUs its PowerToolConfig allows (spec.defaultResources.limits.cpu)"
                    )));
                }
            }
            Ok(FaultPlan::Cpu {
                workers: o.workers,
                duty,
                asked_cpus: duty * f64::from(o.workers),
                basis,
            })
        }
        ToolOptions::MemoryStress(o) => {
            let (bytes, basis) = match o.size {
                Amount::Bytes(b) => (b, "as asked".to_owned()),
                Amount::Percent(p) => {
                    let limit = facts.memory_limit.ok_or_else(|| {
                        FaultError::Refused(format!(
                            "--size={p}% needs a memory limit on the target, and it has none; \
                             give bytes instead (e.g. --size=512MiB)"
                        ))
                    })?;
                    (
                        limit / 100 * u64::from(p),
                        format!("{p}% of the {} memory limit", format_size(limit)),
                    )
                }
            };
            if let Some(limit) = o.limit_bytes
                && bytes > limit
            {
                return Err(FaultError::Refused(format!(
                    "{} ({basis}) is above the {} its PowerToolConfig allows \
                     (spec.defaultResources.limits.memory)",
                    format_size(bytes),
                    format_size(limit)
                )));
            }
            // Without a cgroup limit, the node itself would run out: never plan for that.
            let ceiling = facts.host_memory / 10 * 9;
            if facts.memory_limit.is_none() && facts.host_memory > 0 && bytes > ceiling {
                return Err(FaultError::Refused(format!(
                    "{} is more than 90% of this machine's memory and the target has no memory \
                     limit: the whole node would run out",
                    format_size(bytes)
                )));
            }
            Ok(FaultPlan::Memory {
                bytes,
                ramp: o.ramp,
                basis,
            })
        }
        ToolOptions::Terminate(o) => plan_terminate(o, facts),
        ToolOptions::VolumeFill(o) => plan_fill(o, facts),
        other => Err(FaultError::Refused(format!("{other:?} is not a fault"))),
    }
}

fn plan_terminate(
    o: &toe_common::api::TerminateOptions,
    facts: &TargetFacts,
) -> Result<FaultPlan, FaultError> {
    let main = main_process(&facts.processes);
    let victims: Vec<Proc> = facts
        .processes
        .iter()
        .filter(|p| o.all || main.is_some_and(|m| m.pid == p.pid))
        .filter(|p| o.names.is_empty() || o.names.contains(&p.comm))
        .cloned()
        .collect();
    if victims.is_empty() {
        return Err(FaultError::Refused(format!(
            "no process of the target matches (scope {}, names {:?}); it has: {}",
            if o.all { "all" } else { "main" },
            o.names,
            facts
                .processes
                .iter()
                .map(|p| format!("{} ({})", p.comm, p.pid))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if let Some(p) = victims.iter().find(|p| p.pid == 1) {
        return Err(FaultError::Refused(format!(
            "{} is PID 1 (the host's init); faults never touch it",
            p.comm
        )));
    }
    Ok(FaultPlan::Terminate {
        victims,
        graceful: o.graceful,
        grace: o.grace,
    })
}

fn plan_fill(
    o: &toe_common::api::VolumeFillOptions,
    facts: &TargetFacts,
) -> Result<FaultPlan, FaultError> {
    let fs = facts
        .fs
        .clone()
        .ok_or_else(|| FaultError::Refused("no filesystem measured".into()))?;
    let sp = fs.space;
    let total = sp.used + sp.avail;
    // Never past 99% of what the filesystem offers.
    let ceiling = (total / 100 * 99).saturating_sub(sp.used);
    let (bytes, basis) = match o.fill {
        Amount::Bytes(b) => (b, "as asked".to_owned()),
        Amount::Percent(p) => (
            (total / 100 * u64::from(p)).saturating_sub(sp.used),
            format!("to {p}% used"),
        ),
    };
    if bytes == 0 {
        return Err(FaultError::Refused(format!(
            "{} is already {:.1}% used; nothing to fill",
            fs.path,
            sp.used_percent()
        )));
    }
    if bytes > ceiling {
        return Err(FaultError::Refused(format!(
            "{} would take {} past 99% used (it is {:.1}% used, {} free)",
            format_size(bytes),
            fs.path,
            sp.used_percent(),
            format_size(sp.avail)
        )));
    }
    #[expect(clippy::cast_precision_loss, reason = "a percentage")]
    let expect_percent = (sp.used + bytes) as f64 / total.max(1) as f64 * 100.0;
    Ok(FaultPlan::Fill {
        fs,
        bytes,
        expect_percent,
        basis,
    })
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FaultSample {
    pub t_s: f64,
    /// CPUs the workers used since the previous sample (cpu-stress), or bytes they hold
    /// (memory-stress).
    pub workers: f64,
    /// The target cgroup's memory usage, when accounted in its own cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_memory: Option<u64>,
}

/// What happened to one process a terminate fault signalled.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Termination {
    pub pid: u32,
    pub comm: String,
    /// The first signal sent.
    pub signal: String,
    /// SIGKILL followed because the process outlived the grace period.
    pub escalated: bool,
    /// From the first signal to the process's exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited_after_ms: Option<f64>,
    /// How it ended, from the signal/lifecycle trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FaultSummary {
    pub fault: String,
    pub plan: Vec<String>,
    /// CPUs or bytes.
    pub unit: String,
    pub asked: f64,
    /// Measured: CPUs the workers used after their first second, or the most memory they held.
    pub achieved: f64,
    /// (achieved - asked) / asked, percent.
    pub error_percent: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<u64>,
    /// OOM kills in the target's memory cgroup during the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_kills: Option<u64>,
    /// Workers that died of SIGKILL before the end (the OOM killer chose them).
    pub workers_killed: Vec<u32>,
    pub workers: Vec<u32>,
    /// From the end of the run until every worker was gone.
    pub rollback_ms: u64,
    /// Workers still alive after rollback (must be 0).
    pub leftovers: u32,
    /// What earlier crashed runs had left and this run removed first.
    pub recovered: Recovered,
    pub samples: Vec<FaultSample>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub terminated: Vec<Termination>,
}

/// Per-process CPU time in ns (`/proc/<pid>/schedstat`, first field).
fn cpu_ns(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

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
        self.pids.iter().filter_map(|&p| cpu_ns(p)).sum()
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

/// The fault as a lane of the run's shared timeline: what it achieved over time against what
/// was asked (and the limit it ran under).
#[must_use]
pub fn timeline_lane(s: &FaultSummary) -> crate::profile::timeline::Lane {
    use crate::profile::timeline::{Lane, Level, Series};
    let (unit, series_name) = match s.unit.as_str() {
        "CPUs" => ("CPUs", "workers' CPU use"),
        "bytes" => ("bytes", "memory the workers hold"),
        "% used" => ("percent", "filesystem used"),
        _ => ("processes", "signalled processes still alive"),
    };
    let mut series = vec![Series {
        name: series_name.into(),
        points: s
            .samples
            .iter()
            .map(|x| (x.t_s * 1000.0, x.workers))
            .collect(),
    }];
    let mut levels = vec![Level {
        name: if unit == "processes" {
            "signalled".into()
        } else {
            "asked".into()
        },
        value: s.asked,
    }];
    if unit == "bytes" {
        #[expect(clippy::cast_precision_loss, reason = "bytes for display")]
        let cgroup: Vec<(f64, f64)> = s
            .samples
            .iter()
            .filter_map(|x| x.cgroup_memory.map(|m| (x.t_s * 1000.0, m as f64)))
            .collect();
        if !cgroup.is_empty() {
            series.push(Series {
                name: "target cgroup's memory usage".into(),
                points: cgroup,
            });
        }
        if let Some(limit) = s.memory_limit {
            #[expect(clippy::cast_precision_loss, reason = "bytes for display")]
            levels.push(Level {
                name: "limit".into(),
                value: limit as f64,
            });
        }
    }
    Lane {
        name: format!("{}: asked vs achieved", s.fault),
        unit: unit.into(),
        series,
        levels,
        events: Vec::new(),
    }
}

/// The time series as CSV.
#[must_use]
pub fn csv(s: &FaultSummary) -> String {
    let mut o = format!(
        "t_s,workers_{},cgroup_memory_bytes\n",
        s.unit.to_lowercase()
    );
    for x in &s.samples {
        let _ = writeln!(
            o,
            "{:.3},{:.4},{}",
            x.t_s,
            x.workers,
            x.cgroup_memory.map_or_else(String::new, |m| m.to_string())
        );
    }
    o
}

/// The fault section of the printed summary.
pub fn render(o: &mut String, s: &FaultSummary) {
    for line in &s.plan {
        let _ = writeln!(o, "  plan: {line}");
    }
    let fmt = |v: f64| {
        if s.unit == "processes" {
            format!("{v:.0} process(es) ended")
        } else if s.unit == "% used" {
            format!("{v:.2}% used")
        } else if s.unit == "bytes" {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "display"
            )]
            format_size(v as u64)
        } else {
            format!("{v:.3} CPUs")
        }
    };
    let _ = writeln!(
        o,
        "  asked {}, achieved {} ({:+.1}%)",
        fmt(s.asked),
        fmt(s.achieved),
        s.error_percent
    );
    for t in &s.terminated {
        let _ = writeln!(
            o,
            "  {} ({}): {}{}, {}{}",
            t.comm,
            t.pid,
            t.signal,
            if t.escalated {
                " then SIGKILL after the grace period"
            } else {
                ""
            },
            t.exited_after_ms.map_or_else(
                || "still alive".into(),
                |ms| format!("exited after {ms:.0} ms")
            ),
            t.outcome
                .as_deref()
                .map(|o| format!(" ({o})"))
                .unwrap_or_default()
        );
    }
    if let Some(n) = s.oom_kills.filter(|&n| n > 0) {
        let _ = writeln!(
            o,
            "  the OOM killer fired {n} time(s) in the target's memory cgroup; workers killed: {:?}",
            s.workers_killed
        );
    }
    let _ = writeln!(
        o,
        "  rolled back in {} ms; {} worker(s) left",
        s.rollback_ms, s.leftovers
    );
    if !s.recovered.runs.is_empty() {
        let _ = writeln!(
            o,
            "  cleaned up after crashed runs {:?}: {} worker(s) killed, {} file(s) removed",
            s.recovered.runs,
            s.recovered.workers_killed,
            s.recovered.files_removed.len()
        );
    }
    for f in &s.recovered.files_unreachable {
        let _ = writeln!(
            o,
            "  WARNING: a crashed run's fill file {} cannot be reached now; kept for the next \
             cleanup",
            f.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use toe_common::api::{CpuStressOptions, MemoryStressOptions};

    use super::*;

    fn facts(cpu: Option<f64>, mem: Option<u64>) -> TargetFacts {
        TargetFacts {
            cpu_limit: cpu,
            memory_limit: mem,
            online_cpus: 2,
            host_memory: 8 << 30,
            ..TargetFacts::default()
        }
    }

    #[test]
    fn cpu_load_is_relative_to_the_cgroup_limit_not_the_node() {
        let o = ToolOptions::CpuStress(CpuStressOptions {
            limit_millicores: None,
            workers: 2,
            load_percent: 60,
        });
        let FaultPlan::Cpu {
            duty, asked_cpus, ..
        } = plan(&o, &facts(Some(0.5), None)).unwrap()
        else {
            panic!()
        };
        assert!((duty - 0.15).abs() < 1e-9 && (asked_cpus - 0.3).abs() < 1e-9);
        let FaultPlan::Cpu { asked_cpus, .. } = plan(&o, &facts(None, None)).unwrap() else {
            panic!()
        };
        assert!((asked_cpus - 1.2).abs() < 1e-9);
    }

    #[test]
    fn memory_percent_needs_a_limit_and_the_node_is_protected() {
        let pct = ToolOptions::MemoryStress(MemoryStressOptions {
            limit_bytes: None,
            size: Amount::Percent(50),
            ramp: Duration::ZERO,
        });
        let FaultPlan::Memory { bytes, .. } = plan(&pct, &facts(None, Some(200 << 20))).unwrap()
        else {
            panic!()
        };
        assert_eq!(bytes, 100 << 20);
        let err = plan(&pct, &facts(None, None)).unwrap_err().to_string();
        assert!(err.contains("needs a memory limit"), "{err}");
        let huge = ToolOptions::MemoryStress(MemoryStressOptions {
            limit_bytes: None,
            size: Amount::Bytes(8 << 30),
            ramp: Duration::ZERO,
        });
        let err = plan(&huge, &facts(None, None)).unwrap_err().to_string();
        assert!(err.contains("whole node"), "{err}");
        assert!(plan(&huge, &facts(None, Some(1 << 30))).is_ok());
    }
}
