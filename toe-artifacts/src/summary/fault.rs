//! The fault's part of the contract: what was asked and achieved, the sampled series, the
//! processes a terminate fault signalled, and what the rollback left.

use std::{fmt::Write as _, path::PathBuf};

use serde::{Deserialize, Serialize};
use toe_common::format_size;

use crate::timeline::{Lane, Level, Series};

/// What recovering an abandoned run undid.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Recovered {
    pub runs: Vec<String>,
    pub workers_killed: u32,
    pub files_removed: Vec<PathBuf>,
    /// Files no way in reaches now; kept in the ledger and tried again by the next cleanup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files_unreachable: Vec<PathBuf>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
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
#[serde(default)]
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
#[serde(default)]
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

/// The fault as a lane of the run's shared timeline: what it achieved over time against what
/// was asked (and the limit it ran under).
#[must_use]
pub fn timeline_lane(s: &FaultSummary) -> Lane {
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
