//! The signal trace's part of the contract: the records of `events.jsonl` (one JSON object per
//! line), the summary section that says how each target process ended, and a tolerant view of
//! an event line for readers of any agent version.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

/// The other party of an event: a signal's sender, a fork's child, whoever moved a task.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Actor {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// cgroup v2 path (relative to the v2 root) when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Detail {
    /// A signal generated towards the target task (pid/tid/comm are the receiver's).
    Signal {
        signal: String,
        signo: i32,
        code: String,
        /// delivered (queued), ignored, already_pending, overflow, lost_info.
        result: String,
        /// process (kill) or thread (tgkill).
        scope: String,
        sender: Actor,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        user_stack: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        kernel_stack: Vec<String>,
    },
    /// A target process reported its exit to its parent (its `SIGCHLD`).
    ExitNotice {
        code: String,
        parent: u32,
    },
    /// The target task took the signal off its queue to act on it.
    Delivery {
        signal: String,
        signo: i32,
        code: String,
        /// default, ignore, or handler.
        action: String,
    },
    Fork {
        child: Actor,
    },
    Exec {
        filename: String,
    },
    Exit {
        /// The status passed to exit/exit_group, if the process called it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
    },
    OomKill {
        victim_comm: String,
        /// The task whose allocation hit the limit.
        trigger: Actor,
        total_vm_kib: u64,
        anon_rss_kib: u64,
        file_rss_kib: u64,
        shmem_rss_kib: u64,
        oom_score_adj: i64,
        /// Memory cgroup (v1 or v2 path) of the victim, when it could still be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory_cgroup: Option<String>,
    },
    Joined {
        by: Actor,
        cgroup_id: u64,
    },
    Left {
        by: Actor,
        cgroup_id: u64,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// Milliseconds since the run started.
    pub t_ms: f64,
    pub time_unix_ns: u64,
    /// The process (tgid) and task the event is about; 0 when unknown.
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    #[serde(flatten)]
    pub detail: Detail,
}

/// How a target process ended, as far as the events show.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ProcessEnd {
    pub pid: u32,
    pub comm: String,
    /// "exited", "killed", "dumped core", or "still running".
    pub how: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// Who sent that signal (the kernel's OOM killer shows as the task that hit the limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_by: Option<Actor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_killed: Option<bool>,
    /// Milliseconds from the first SIGTERM to the exit: the graceful-shutdown time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_first_sigterm_ms: Option<f64>,
    /// A SIGKILL was sent after a SIGTERM.
    pub sigkill_followed_sigterm: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited_at_ms: Option<f64>,
    /// One line for people.
    pub explanation: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SignalCount {
    pub signal: String,
    pub sender: String,
    pub receiver: String,
    pub count: u64,
    /// Count per result (delivered, already_pending, ...).
    pub results: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct KindAccounting {
    pub event: String,
    /// Events the kernel tried to emit.
    pub emitted: u64,
    /// Read by TOE.
    pub recorded: u64,
    /// Lost because the ring buffer was full.
    pub lost: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SignalSummary {
    pub events: Vec<KindAccounting>,
    pub lost_total: u64,
    pub max_lost: u64,
    /// Signals towards targets left out by --signals/--senders.
    pub filtered: u64,
    pub stacks_unwind_failed: u64,
    pub stacks_map_full: u64,
    pub stacks_unverified: u64,
    /// How sender user stacks were unwound (with `--unwind=tables`).
    pub unwind: super::UnwindAccounting,
    /// Target tasks the kernel could not follow (tasks map full).
    pub tasks_missed: u64,
    /// Tasks found in a target cgroup by the kernel (born there) or by the periodic check.
    pub late_joins: u64,
    pub signals: Vec<SignalCount>,
    pub processes: Vec<ProcessEnd>,
}

/// One JSON object per line.
#[must_use]
pub fn jsonl(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        serde_json::to_writer(&mut out, r).expect("record serializes");
        out.push(b'\n');
    }
    out
}

/// One line of `events.jsonl` as a reader sees it: the fields every event kind shares, and the
/// ones the report shows, each optional, so lines of newer or older agents (and kinds this
/// version does not know) still read.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Event {
    pub t_ms: f64,
    pub pid: u32,
    pub comm: String,
    pub event: String,
    pub signal: Option<String>,
    pub result: Option<String>,
    pub action: Option<String>,
    pub exit_code: Option<i32>,
    pub victim_comm: Option<String>,
    pub sender: Option<Sender>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Sender {
    pub pid: u32,
    pub comm: String,
}

/// The signals section of the printed summary.
pub fn render(o: &mut String, s: &SignalSummary) {
    for p in &s.processes {
        let _ = writeln!(o, "  {}", p.explanation);
    }
    for c in s.signals.iter().take(10) {
        let results: Vec<String> = c.results.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(
            o,
            "  {} x{}: {} -> {} ({})",
            c.signal,
            c.count,
            c.sender,
            c.receiver,
            results.join(", ")
        );
    }
    let recorded: u64 = s.events.iter().map(|e| e.recorded).sum();
    let _ = writeln!(
        o,
        "  events: {recorded} recorded, {} lost (ring buffer full; bound {}), {} filtered out",
        s.lost_total, s.max_lost, s.filtered
    );
    if s.stacks_unwind_failed + s.stacks_map_full + s.stacks_unverified > 0 {
        let _ = writeln!(
            o,
            "  sender stacks missing: {} not unwindable, {} stack map full, {} failed verification",
            s.stacks_unwind_failed, s.stacks_map_full, s.stacks_unverified
        );
    }
    super::render_unwind(o, "sender stacks", &s.unwind);
    if s.tasks_missed > 0 {
        let _ = writeln!(
            o,
            "  {} target tasks could not be followed (tasks map full)",
            s.tasks_missed
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_record_reads_back_as_an_event() {
        let r = Record {
            t_ms: 12.5,
            time_unix_ns: 1,
            pid: 7,
            tid: 7,
            comm: "app".into(),
            detail: Detail::Signal {
                signal: "SIGTERM".into(),
                signo: 15,
                code: "SI_USER".into(),
                result: "delivered".into(),
                scope: "process".into(),
                sender: Actor {
                    pid: 9,
                    tid: 9,
                    comm: "kubelet".into(),
                    cgroup: None,
                },
                user_stack: Vec::new(),
                kernel_stack: Vec::new(),
            },
        };
        let line = jsonl(std::slice::from_ref(&r));
        let e: Event = serde_json::from_slice(&line).unwrap();
        assert_eq!((e.pid, e.event.as_str()), (7, "signal"));
        assert_eq!(e.signal.as_deref(), Some("SIGTERM"));
        assert_eq!(e.sender.map(|s| s.comm), Some("kubelet".into()));
    }

    #[test]
    fn an_old_process_end_without_newer_fields_reads() {
        let p: ProcessEnd = serde_json::from_str(r#"{"pid":3,"how":"exited"}"#).unwrap();
        assert_eq!((p.pid, p.how.as_str(), p.oom_killed), (3, "exited", None));
    }
}
