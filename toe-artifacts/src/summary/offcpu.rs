//! The off-CPU profile's section of the summary: every switch of a target thread off CPU and what
//! became of it, the time by reason, the top waits, and (with `--wall`) the on-CPU half.

use std::{collections::HashMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

use super::{Breakdown, SampleAccounting, render_breakdown, share};
use crate::profile::Profile;

/// Every switch-out of a target thread, by outcome.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SwitchAccounting {
    /// Target threads switched off CPU (kernel counter).
    pub switches: u64,
    /// Waits added to a per-stack total.
    pub recorded: u64,
    /// Waits still going at the end: recorded up to the end of the run.
    pub open_at_end: u64,
    /// Waits shorter than `min-block`: counted with their time, not recorded per stack.
    pub short: u64,
    pub short_ns: u64,
    /// Waits longer than `max-block`: counted with their time, not recorded.
    pub long: u64,
    pub long_ns: u64,
    /// Switch-outs not tracked: the table of threads off CPU was full.
    pub lost_thread_table_full: u64,
    /// Waits lost: the table of per-stack totals was full (`max-waits`).
    pub lost_totals_full: u64,
    pub lost_totals_full_ns: u64,
    pub user_stacks_lost: u64,
    pub kernel_stacks_lost: u64,
    pub stacks_lost_map_full: u64,
    /// Totals shown without a stack because the stored frames failed verification.
    pub stacks_unverified: u64,
    /// Target threads that exited during the run.
    pub threads_exited: u64,
    /// Waits whose end was never seen (the thread went off CPU again first, or is gone).
    pub unmatched: u64,
    /// Threads asleep through the whole run (their wait began before it): recorded for the
    /// whole window with the kernel stack procfs shows.
    pub asleep_whole_run: u64,
}

/// Off-CPU time of one reason.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ReasonTime {
    /// `blocked`, `uninterruptible`, `runnable` or `stopped`.
    pub reason: String,
    pub ns: u64,
    pub waits: u64,
    /// Of the target's thread-time (on-CPU plus off-CPU).
    pub share: f64,
}

/// A place the target waits: the function, the reason, the total time.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Wait {
    /// The wait's site in the program's own code: the deepest frame outside shared libraries,
    /// else the deepest user frame, else the kernel's.
    pub function: String,
    pub reason: String,
    pub ns: u64,
    pub waits: u64,
    /// Of the target's thread-time.
    pub share: f64,
}

/// The CPU quota of the target's cgroup and how often it bit during the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Throttling {
    pub cgroup: String,
    /// `cpu.max` / `cpu.cfs_quota_us` and the period, in microseconds; `None`: no quota.
    pub quota_us: Option<u64>,
    pub period_us: u64,
    /// Periods in which the cgroup was throttled, and for how long in total, during the run.
    pub throttled_periods: u64,
    pub throttled_ns: u64,
}

/// The on-CPU half of a wall-clock profile.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct WallSummary {
    pub frequency_hz: u64,
    pub samples: SampleAccounting,
    /// On-CPU time the samples stand for (samples times the period).
    pub on_cpu_ns: u64,
    pub off_cpu_ns: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct OffcpuSummary {
    /// How switches were traced (`raw tracepoint sched_switch`, or the classic tracepoint).
    pub mechanism: String,
    pub min_block_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_block_ns: Option<u64>,
    pub switches: SwitchAccounting,
    /// Recorded off-CPU time (waits between the bounds, open ones up to the end).
    pub off_cpu_ns: u64,
    /// On-CPU time of target threads from a switch-in to the next switch-out, as the kernel
    /// measured it (a thread that never left its CPU during the run is not in it).
    pub on_cpu_ns: u64,
    /// On-CPU plus every off-CPU time counted (recorded, short, long): what shares are of.
    pub thread_ns: u64,
    pub reasons: Vec<ReasonTime>,
    pub top_waits: Vec<Wait>,
    /// By function and process, over recorded off-CPU time.
    pub breakdown: Breakdown,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub throttling: Vec<Throttling>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall: Option<WallSummary>,
}

/// The synthetic frame that carries a wait's reason.
#[must_use]
pub fn reason_frame(reason: &str) -> String {
    format!("[off-CPU: {reason}]")
}

/// The reason a frame name carries, if it is a reason frame.
#[must_use]
pub fn frame_reason(frame: &str) -> Option<&str> {
    frame.strip_prefix("[off-CPU: ")?.strip_suffix(']')
}

/// The profile without its kernel frames: every off-CPU stack ends in the scheduler, so "self"
/// time by function is only meaningful for the user frames.
#[must_use]
pub fn user_view(profile: &Profile) -> Profile {
    let mut p = profile.clone();
    for s in &mut p.stacks {
        s.frames
            .retain(|&id| profile.frames.get(id as usize).is_some_and(|f| !f.kernel));
    }
    p
}

/// The top waits of an off-CPU profile whose stacks start with a reason frame. `index` is the
/// nanoseconds value, `count` the waits.
#[must_use]
pub fn top_waits(profile: &Profile, ns: usize, count: usize, of: u64, n: usize) -> Vec<Wait> {
    let mut by: HashMap<(String, String), (u64, u64)> = HashMap::new();
    for s in &profile.stacks {
        let frames: Vec<&crate::profile::Frame> = s
            .frames
            .iter()
            .filter_map(|&id| profile.frames.get(id as usize))
            .collect();
        let Some(reason) = frames
            .iter()
            .find_map(|f| frame_reason(&f.function))
            .map(str::to_owned)
        else {
            continue;
        };
        // Synthetic frames (the reason, "asleep since before the run") name no place.
        let user = frames.iter().filter(|f| {
            !f.kernel && frame_reason(&f.function).is_none() && !f.function.starts_with("[asleep")
        });
        let own = user.clone().rfind(|f| {
            f.module
                .as_deref()
                .is_some_and(|m| !m.contains(".so") && !m.starts_with('['))
        });
        let site = own
            .or_else(|| user.clone().next_back())
            .or_else(|| frames.iter().rfind(|f| f.kernel))
            .map_or_else(|| "[no stack]".to_owned(), |f| f.function.clone());
        let e = by.entry((site, reason)).or_default();
        e.0 += s.values.get(ns).copied().unwrap_or(0);
        e.1 += s.values.get(count).copied().unwrap_or(0);
    }
    let mut v: Vec<Wait> = by
        .into_iter()
        .map(|((function, reason), (ns, waits))| Wait {
            function,
            reason,
            ns,
            waits,
            share: share(ns, of),
        })
        .collect();
    v.sort_by(|a, b| {
        b.ns.cmp(&a.ns)
            .then_with(|| a.function.cmp(&b.function))
            .then_with(|| a.reason.cmp(&b.reason))
    });
    v.truncate(n);
    v
}

#[expect(clippy::cast_precision_loss, reason = "for display")]
fn secs(ns: u64) -> String {
    format!("{:.3}s", ns as f64 / 1e9)
}

pub(super) fn render(o: &mut String, s: &OffcpuSummary) {
    let a = &s.switches;
    let _ = writeln!(o, "  traced with the {}", s.mechanism);
    let _ = writeln!(
        o,
        "  off-CPU: {} of {} thread-time ({:.1}%), {} waits recorded of {} switches ({} still \
         waiting at the end, {} threads asleep through the whole run)",
        secs(s.off_cpu_ns),
        secs(s.thread_ns),
        share(s.off_cpu_ns, s.thread_ns) * 100.0,
        a.recorded,
        a.switches,
        a.open_at_end,
        a.asleep_whole_run
    );
    let _ = writeln!(
        o,
        "  not recorded: {} waits under min-block ({}), {} over max-block ({}); lost: {} (thread \
         table full), {} ({}) totals table full, {} unmatched; stacks lost: {} user, {} kernel, {} map full, {} \
         unverified",
        a.short,
        secs(a.short_ns),
        a.long,
        secs(a.long_ns),
        a.lost_thread_table_full,
        a.lost_totals_full,
        secs(a.lost_totals_full_ns),
        a.unmatched,
        a.user_stacks_lost,
        a.kernel_stacks_lost,
        a.stacks_lost_map_full,
        a.stacks_unverified
    );
    for r in &s.reasons {
        let _ = writeln!(
            o,
            "    {:<16} {:>10} {:>5.1}%  {} waits",
            r.reason,
            secs(r.ns),
            r.share * 100.0,
            r.waits
        );
    }
    if !s.top_waits.is_empty() {
        let _ = writeln!(o, "  top waits:");
        for w in &s.top_waits {
            let _ = writeln!(
                o,
                "    {:>10} {:>5.1}%  {:<16} {}",
                secs(w.ns),
                w.share * 100.0,
                w.reason,
                w.function
            );
        }
    }
    for t in &s.throttling {
        let quota = t.quota_us.map_or_else(
            || "no CPU quota".to_owned(),
            |q| format!("quota {q}us per {}us", t.period_us),
        );
        let _ = writeln!(
            o,
            "  cgroup {}: {quota}; throttled in {} periods, {} in total",
            t.cgroup,
            t.throttled_periods,
            secs(t.throttled_ns)
        );
    }
    if let Some(w) = &s.wall {
        let _ = writeln!(
            o,
            "  wall-clock: {} on CPU ({} samples at {} Hz, {} lost) + {} off CPU",
            secs(w.on_cpu_ns),
            w.samples.recorded,
            w.frequency_hz,
            w.samples.lost(),
            secs(w.off_cpu_ns)
        );
    }
    render_breakdown(o, &s.breakdown, "off-CPU", &|v| secs(v));
}
