//! The built-in root-cause rules. Each rule reads one capture and, when its evidence is there,
//! says what it saw with the numbers behind it; the same finding from many targets or runs is
//! reported once with every place it was seen.
//!
//! Thresholds are deliberately conservative: a finding an SRE has to argue with costs more than a
//! finding left to the flamegraph.

use std::{collections::BTreeMap, sync::LazyLock};

use regex::Regex;
use serde::{Deserialize, Serialize};
use toe_artifacts::{
    folded::{Folded, function_name},
    summary::offcpu::{OffcpuSummary, frame_reason},
};

use crate::capture::{Capture, ProfileKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Warning,
    Info,
}

/// Where a finding came from; the report marks model findings as such.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Rule,
    Model,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// The rule's id (`dominant-function`, ...) or `model`.
    pub rule: String,
    pub source: Source,
    pub severity: Severity,
    pub title: String,
    pub evidence: Vec<String>,
    /// `run target` of every capture it was seen in.
    #[serde(default)]
    pub seen_in: Vec<String>,
}

/// What one rule saw in one capture. `key` groups the same cause across captures (the function,
/// the process name).
#[derive(Debug)]
struct Hit {
    key: String,
    severity: Severity,
    title: String,
    evidence: Vec<String>,
}

type Rule = fn(&Capture, &Facts) -> Vec<Hit>;

/// Every rule with its id, in report order.
const RULES: &[(&str, Rule)] = &[
    ("oom-kill", oom_kill),
    ("sigterm-unhandled", sigterm_unhandled),
    ("volume-fill-errors", volume_fill_errors),
    ("memory-leak-site", memory_leak_site),
    ("dominant-function", dominant_function),
    ("lock-contention", lock_contention),
    ("cpu-starvation", cpu_starvation),
    ("lock-wait", lock_wait),
    ("io-wait", io_wait),
    ("allocator-or-gc-hot", allocator_hot),
    ("fault-missed-target", fault_missed_target),
    ("data-loss", data_loss),
];

/// The rule ids, for documentation and the report's legend.
#[must_use]
pub fn rule_ids() -> Vec<&'static str> {
    RULES.iter().map(|(id, _)| *id).collect()
}

/// Evidence lines kept per finding; the rest is summarised in one line.
const MAX_EVIDENCE: usize = 8;

/// Runs every rule over every capture and groups the hits.
#[must_use]
pub fn evaluate(captures: &[Capture]) -> Vec<Finding> {
    let mut e = Evaluator::default();
    for c in captures {
        e.add(c);
    }
    e.finish()
}

/// The rules run capture by capture, so a processing pass need not hold every capture's
/// profiles at once: each capture is evaluated as it is read and its hits grouped here.
#[derive(Default)]
pub struct Evaluator {
    grouped: BTreeMap<(usize, String), Finding>,
}

impl Evaluator {
    /// Runs every rule over `c`.
    pub fn add(&mut self, c: &Capture) {
        let place = format!("{} {}", c.run, c.target);
        let facts = Facts::default();
        for (order, (id, rule)) in RULES.iter().enumerate() {
            for hit in rule(c, &facts) {
                let f = self
                    .grouped
                    .entry((order, hit.key.clone()))
                    .or_insert_with(|| Finding {
                        rule: (*id).to_owned(),
                        source: Source::Rule,
                        severity: hit.severity,
                        title: hit.title.clone(),
                        evidence: Vec::new(),
                        seen_in: Vec::new(),
                    });
                f.severity = f.severity.min(hit.severity);
                let first = f.seen_in.is_empty();
                f.seen_in.push(place.clone());
                for e in hit.evidence {
                    if f.evidence.len() < MAX_EVIDENCE {
                        f.evidence
                            .push(if first { e } else { format!("{place}: {e}") });
                    }
                }
            }
        }
    }

    /// The findings, most severe first; a cause seen in several captures is one finding.
    #[must_use]
    pub fn finish(self) -> Vec<Finding> {
        let mut out: Vec<Finding> = self.grouped.into_values().collect();
        for f in &mut out {
            if f.seen_in.len() > 1 {
                f.title = format!("{} (in {} captures)", f.title, f.seen_in.len());
            }
        }
        out.sort_by_key(|f| f.severity);
        out
    }
}

#[expect(clippy::cast_precision_loss, reason = "shares for display")]
fn share(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        part as f64 / total as f64
    }
}

#[expect(clippy::cast_precision_loss, reason = "sizes for display")]
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A stack shortened to its last frames, the part that says where.
fn tail(stack: &str, frames: usize) -> String {
    let parts: Vec<&str> = stack.split(';').collect();
    let from = parts.len().saturating_sub(frames);
    let mut s = parts[from..]
        .iter()
        .map(|f| function_name(f))
        .collect::<Vec<_>>()
        .join(" -> ");
    if from > 0 {
        s.insert_str(0, "... -> ");
    }
    s
}

// ---- process ends -------------------------------------------------------------------------

fn oom_kill(c: &Capture, _: &Facts) -> Vec<Hit> {
    let mut hits = Vec::new();
    for e in c.events.iter().filter(|e| e.event == "oom_kill") {
        let victim = e.victim_comm.clone().unwrap_or_else(|| e.comm.clone());
        hits.push(Hit {
            key: victim.clone(),
            severity: Severity::Critical,
            title: format!("{victim} was killed by the OOM killer"),
            evidence: vec![format!(
                "oom_kill of {victim} ({}) at {:.0} ms into the run",
                e.pid, e.t_ms
            )],
        });
    }
    if let Some(s) = &c.summary.signals {
        for p in s.processes.iter().filter(|p| p.oom_killed == Some(true)) {
            if let Some(h) = hits.iter_mut().find(|h| h.key == p.comm) {
                h.evidence.push(p.explanation.clone());
            } else {
                hits.push(Hit {
                    key: p.comm.clone(),
                    severity: Severity::Critical,
                    title: format!("{} was killed by the OOM killer", p.comm),
                    evidence: vec![p.explanation.clone()],
                });
            }
        }
    }
    if let Some(f) = c
        .summary
        .fault
        .as_ref()
        .filter(|f| f.oom_kills.unwrap_or(0) > 0)
    {
        hits.push(Hit {
            key: format!("{} workers", f.fault),
            severity: Severity::Warning,
            title: format!("the {} fault's workers met the OOM killer", f.fault),
            evidence: vec![format!("{} worker(s) OOM-killed", f.oom_kills.unwrap_or(0))],
        });
    }
    hits
}

fn sigterm_unhandled(c: &Capture, _: &Facts) -> Vec<Hit> {
    let Some(s) = &c.summary.signals else {
        return Vec::new();
    };
    s.processes
        .iter()
        .filter(|p| p.sigkill_followed_sigterm)
        .map(|p| {
            let handled = c
                .events
                .iter()
                .find(|e| {
                    e.pid == p.pid
                        && e.event == "delivery"
                        && e.signal.as_deref() == Some("SIGTERM")
                })
                .and_then(|e| e.action.clone());
            let how = match handled.as_deref() {
                Some("handler") => "its SIGTERM handler ran but the process did not exit",
                Some("ignored") => "it ignores SIGTERM",
                Some("blocked") => "it blocks SIGTERM",
                _ => "it did not exit on SIGTERM",
            };
            let after = p
                .after_first_sigterm_ms
                .map_or_else(String::new, |ms| format!(" {ms:.0} ms after the SIGTERM"));
            Hit {
                key: p.comm.clone(),
                severity: Severity::Critical,
                title: format!(
                    "{} did not shut down on SIGTERM within its grace period; SIGKILL followed",
                    p.comm
                ),
                evidence: vec![format!("{how}; SIGKILL{after}"), p.explanation.clone()],
            }
        })
        .collect()
}

fn volume_fill_errors(c: &Capture, _: &Facts) -> Vec<Hit> {
    let (Some(f), Some(s)) = (&c.summary.fault, &c.summary.signals) else {
        return Vec::new();
    };
    if f.fault != "volume-fill" {
        return Vec::new();
    }
    let failed: Vec<&crate::capture::ProcessEnd> = s
        .processes
        .iter()
        .filter(|p| {
            (p.how == "exited" && p.exit_code.is_some_and(|c| c != 0))
                || (p.how == "killed" && p.oom_killed != Some(true))
        })
        .collect();
    if failed.is_empty() {
        return Vec::new();
    }
    let mut evidence = vec![format!(
        "the volume was filled to {:.1}{} (asked {:.1}{})",
        f.achieved, f.unit, f.asked, f.unit
    )];
    evidence.extend(failed.iter().map(|p| {
        format!(
            "{} at {:.0} ms into the fill",
            p.explanation,
            p.exited_at_ms.unwrap_or(0.0)
        )
    }));
    vec![Hit {
        key: "volume-fill".into(),
        severity: Severity::Warning,
        title: format!(
            "{} process(es) failed while the volume was full: {}",
            failed.len(),
            failed
                .iter()
                .map(|p| p.comm.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        evidence,
    }]
}

// ---- memory ---------------------------------------------------------------------------------

/// Smallest in-use growth at one site worth calling a leak: below it, a short run's live
/// buffers look the same.
const LEAK_MIN_BYTES: u64 = 4 << 20;

fn memory_leak_site(c: &Capture, _: &Facts) -> Vec<Hit> {
    let Some(inuse) = c.profiles.get(&ProfileKind::InUse) else {
        return Vec::new();
    };
    let total = inuse.total();
    let Some((site, bytes)) = attributed_sites(inuse).into_iter().next() else {
        return Vec::new();
    };
    if bytes < LEAK_MIN_BYTES || share(bytes, total) < 0.5 {
        return Vec::new();
    }
    let rss = c.summary.memory.as_ref().and_then(|m| {
        m.rss
            .series
            .iter()
            .max_by_key(|s| s.last_rss.saturating_sub(s.first_rss))
    });
    let mut evidence = vec![format!(
        "{} still allocated at {site} at the end ({:.0}% of all in-use memory)",
        mib(bytes),
        share(bytes, total) * 100.0
    )];
    if let Some(heap) = c.summary.memory.as_ref().and_then(|m| m.heap.as_ref()) {
        evidence.push(format!(
            "{} objects in use of {} allocated during the run",
            heap.inuse_objects, heap.alloc_objects
        ));
    }
    if let Some(r) = rss {
        let grew = r.last_rss.saturating_sub(r.first_rss);
        if grew < bytes / 2 {
            return Vec::new();
        }
        evidence.push(format!(
            "RSS of {} grew by {} ({} -> {})",
            r.source,
            mib(grew),
            mib(r.first_rss),
            mib(r.last_rss)
        ));
    }
    if let Some((stack, _)) = inuse.heaviest_path_to(&site) {
        evidence.push(format!("allocated from {}", tail(stack, 4)));
    }
    vec![Hit {
        key: site.clone(),
        severity: Severity::Warning,
        title: format!("memory grows at {site}: {} not freed", mib(bytes)),
        evidence,
    }]
}

/// Count by the first frame from the leaf that is not the allocator or the kernel: the code that
/// asked for the memory.
fn attributed_sites(f: &Folded) -> Vec<(String, u64)> {
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    for (stack, &count) in &f.stacks {
        let site = stack
            .rsplit(';')
            .find(|fr| !fr.ends_with("_[k]") && !ALLOCATOR.is_match(function_name(fr)))
            .map_or("[unknown]", function_name);
        *by.entry(site.to_owned()).or_insert(0) += count;
    }
    let mut v: Vec<(String, u64)> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

// ---- CPU ------------------------------------------------------------------------------------

/// Below this many samples a share says little (half a second of one CPU at 99 Hz).
const CPU_MIN_SAMPLES: u64 = 50;

fn cpu(c: &Capture) -> Option<&Folded> {
    c.profiles
        .get(&ProfileKind::Cpu)
        .filter(|f| f.total() >= CPU_MIN_SAMPLES)
}

fn dominant_function(c: &Capture, _: &Facts) -> Vec<Hit> {
    let Some(f) = cpu(c) else {
        return Vec::new();
    };
    let total = f.total();
    let top = c
        .digests()
        .remove(&ProfileKind::Cpu)
        .map(|d| d.top_self)
        .unwrap_or_default();
    let Some((func, n)) = top.first() else {
        return Vec::new();
    };
    if share(*n, total) < 0.4 {
        return Vec::new();
    }
    let mut evidence = vec![format!(
        "{func}: {n} of {total} samples ({:.0}%) on CPU in the function itself",
        share(*n, total) * 100.0
    )];
    evidence.extend(
        top.iter()
            .skip(1)
            .take(2)
            .map(|(g, m)| format!("next: {g} {:.0}%", share(*m, total) * 100.0)),
    );
    if let Some((stack, m)) = f.heaviest_path_to(func) {
        evidence.push(format!(
            "hottest path ({:.0}%): {}",
            share(m, total) * 100.0,
            tail(stack, 5)
        ));
    }
    vec![Hit {
        key: func.clone(),
        severity: Severity::Warning,
        title: format!(
            "{func} dominates CPU: {:.0}% of samples",
            share(*n, total) * 100.0
        ),
        evidence,
    }]
}

static LOCKS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)futex|mutex|lock_contended|__lll_lock|pthread_(rwlock|spin|cond)|rwlock|spin_?lock|queued_spin|osq_lock|semaphore|parking_lot|runtime\.lock|runtime\.semacquire|monitorenter|ObjectMonitor",
    )
    .expect("valid pattern")
});

static ALLOCATOR: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^(malloc|free|calloc|realloc|reallocarray|cfree|memalign|posix_memalign|aligned_alloc|valloc|pvalloc|__libc_(malloc|free|calloc|realloc|memalign)|__GI___libc_(malloc|free|calloc|realloc)|_int_(malloc|free|realloc|memalign)|_int_free_.*|tcache_.*|malloc_consolidate|sysmalloc|unlink_chunk.*|__rust_(alloc|dealloc|realloc|alloc_zeroed)|__rdl_.*|alloc::alloc::.*|<alloc::alloc::Global as .*|je_.*|tc_.*|mi_.*|operator new.*|operator delete.*)$",
    )
    .expect("valid pattern")
});

static GC: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^(runtime\.(mallocgc|gcBgMarkWorker|gcDrain.*|scanobject|markroot.*|sweepone|gcAssistAlloc.*|bgsweep|bgscavenge)|.*G1.*|.*GCTaskThread.*|.*ParallelGC.*|_PyObject_GC_.*|gc_collect.*|v8::internal::(Heap|Scavenger|MarkCompact).*)$",
    )
    .expect("valid pattern")
});

/// What several rules ask of one capture, computed once for all of them.
#[derive(Default)]
pub(crate) struct Facts {
    /// CPU samples whose stack passes through lock, allocator and GC frames.
    under: std::cell::OnceCell<[u64; 3]>,
}

impl Facts {
    /// CPU samples under frames matching [`LOCKS`], [`ALLOCATOR`] and [`GC`], in one walk of `f`.
    fn under(&self, f: &Folded) -> [u64; 3] {
        *self.under.get_or_init(|| {
            let counts = f.count_matching_each(&[
                &|n: &str| LOCKS.is_match(n),
                &|n: &str| ALLOCATOR.is_match(n),
                &|n: &str| GC.is_match(n),
            ]);
            [counts[0], counts[1], counts[2]]
        })
    }
}

/// The frames matching `pattern` that samples spend the most time under, for evidence.
fn top_matching(f: &Folded, pattern: &Regex) -> Vec<String> {
    let mut by: BTreeMap<&str, u64> = BTreeMap::new();
    for (stack, &count) in &f.stacks {
        if let Some(fr) = stack
            .split(';')
            .skip(1)
            .map(function_name)
            .find(|n| pattern.is_match(n))
        {
            *by.entry(fr).or_insert(0) += count;
        }
    }
    let total = f.total();
    let mut v: Vec<(&str, u64)> = by.into_iter().collect();
    v.sort_by_key(|x| std::cmp::Reverse(x.1));
    v.into_iter()
        .take(3)
        .map(|(n, c)| format!("under {n}: {:.0}% of samples", share(c, total) * 100.0))
        .collect()
}

fn lock_contention(c: &Capture, facts: &Facts) -> Vec<Hit> {
    let Some(f) = cpu(c) else {
        return Vec::new();
    };
    let (n, total) = (facts.under(f)[0], f.total());
    if share(n, total) < 0.2 {
        return Vec::new();
    }
    let mut evidence = vec![format!(
        "{n} of {total} CPU samples ({:.0}%) are in lock or futex paths",
        share(n, total) * 100.0
    )];
    evidence.extend(top_matching(f, &LOCKS));
    vec![Hit {
        key: "locks".into(),
        severity: Severity::Warning,
        title: format!(
            "lock contention: {:.0}% of CPU time is spent in lock or futex paths",
            share(n, total) * 100.0
        ),
        evidence,
    }]
}

// ---- off-CPU ------------------------------------------------------------------------------

/// Less recorded off-CPU time than this in a capture is too little to judge.
const OFFCPU_MIN_NS: u64 = 100_000_000;

fn offcpu(c: &Capture) -> Option<(&OffcpuSummary, &Folded)> {
    let s = c.summary.offcpu.as_ref()?;
    let f = c.profiles.get(&ProfileKind::OffCpu)?;
    (s.off_cpu_ns >= OFFCPU_MIN_NS).then_some((s, f))
}

fn reason_ns(s: &OffcpuSummary, reason: &str) -> u64 {
    s.reasons
        .iter()
        .filter(|r| r.reason == reason)
        .map(|r| r.ns)
        .sum()
}

#[expect(clippy::cast_precision_loss, reason = "for display")]
fn secs(ns: u64) -> String {
    format!("{:.2} s", ns as f64 / 1e9)
}

/// The reason a folded off-CPU line carries (its frame after the process).
fn line_reason(stack: &str) -> Option<&str> {
    frame_reason(stack.split(';').nth(1)?)
}

/// The kernel function a wait sits in: the deepest kernel frame that is not the scheduler
/// itself (`wait_for_completion_io_timeout`, `futex_wait_queue`, `pipe_read`).
fn kernel_wait_site(stack: &str) -> Option<&str> {
    stack
        .split(';')
        .filter_map(|f| f.strip_suffix("_[k]"))
        .rfind(|f| {
            !(f.contains("schedule")
                || f.starts_with("__traceiter")
                || f.starts_with("finish_task"))
        })
}

/// Off-CPU time by a key of each line of one reason, heaviest first.
fn top_by(
    f: &Folded,
    reason: &str,
    key: impl Fn(&str) -> Option<String>,
    n: usize,
) -> Vec<(String, u64)> {
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    for (stack, &ns) in &f.stacks {
        if line_reason(stack) == Some(reason)
            && let Some(k) = key(stack)
        {
            *by.entry(k).or_insert(0) += ns;
        }
    }
    let mut v: Vec<(String, u64)> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

fn lock_wait(c: &Capture, _: &Facts) -> Vec<Hit> {
    let Some((_, f)) = offcpu(c) else {
        return Vec::new();
    };
    let (mut locked, mut waiting) = (0, 0);
    let mut by: BTreeMap<&str, u64> = BTreeMap::new();
    for (stack, &ns) in &f.stacks {
        if !matches!(line_reason(stack), Some("blocked" | "uninterruptible")) {
            continue;
        }
        waiting += ns;
        // The outermost lock frame names the lock's user; the futex below it is the mechanism.
        if let Some(fr) = stack
            .split(';')
            .skip(2)
            .map(function_name)
            .find(|n| LOCKS.is_match(n))
        {
            locked += ns;
            *by.entry(fr).or_insert(0) += ns;
        }
    }
    if waiting < OFFCPU_MIN_NS || share(locked, waiting) < 0.3 {
        return Vec::new();
    }
    let mut evidence = vec![format!(
        "{} of the {} threads spent blocked ({:.0}%) was in lock or futex waits",
        secs(locked),
        secs(waiting),
        share(locked, waiting) * 100.0
    )];
    let mut v: Vec<(&str, u64)> = by.into_iter().collect();
    v.sort_by_key(|x| std::cmp::Reverse(x.1));
    evidence.extend(
        v.into_iter()
            .take(3)
            .map(|(n, ns)| format!("waiting under {n}: {}", secs(ns))),
    );
    vec![Hit {
        key: "lock-wait".into(),
        severity: Severity::Warning,
        title: format!(
            "lock wait: threads spend {:.0}% of their blocked time waiting for locks held by \
             other threads",
            share(locked, waiting) * 100.0
        ),
        evidence,
    }]
}

fn io_wait(c: &Capture, _: &Facts) -> Vec<Hit> {
    let Some((s, f)) = offcpu(c) else {
        return Vec::new();
    };
    let d = reason_ns(s, "uninterruptible");
    if d < OFFCPU_MIN_NS || share(d, s.off_cpu_ns) < 0.25 {
        return Vec::new();
    }
    let mut evidence = vec![format!(
        "{} of {} off CPU ({:.0}%) in uninterruptible sleep (D state): disk or similar I/O, or \
         a kernel lock",
        secs(d),
        secs(s.off_cpu_ns),
        share(d, s.off_cpu_ns) * 100.0
    )];
    evidence.extend(
        top_by(
            f,
            "uninterruptible",
            |l| kernel_wait_site(l).map(str::to_owned),
            3,
        )
        .into_iter()
        .map(|(site, ns)| format!("waiting in the kernel at {site}: {}", secs(ns))),
    );
    vec![Hit {
        key: "io-wait".into(),
        severity: Severity::Warning,
        title: format!(
            "I/O wait: {:.0}% of the off-CPU time is uninterruptible (D state)",
            share(d, s.off_cpu_ns) * 100.0
        ),
        evidence,
    }]
}

fn cpu_starvation(c: &Capture, _: &Facts) -> Vec<Hit> {
    let Some(s) = c.summary.offcpu.as_ref() else {
        return Vec::new();
    };
    let r = reason_ns(s, "runnable");
    let part = share(r, s.thread_ns);
    if r < OFFCPU_MIN_NS || part < 0.1 {
        return Vec::new();
    }
    let mut evidence = vec![format!(
        "threads were runnable but not running for {} ({:.0}% of their {} thread-time)",
        secs(r),
        part * 100.0,
        secs(s.thread_ns)
    )];
    let mut quota = false;
    for t in &s.throttling {
        if let Some(q) = t.quota_us {
            quota = true;
            #[expect(clippy::cast_precision_loss, reason = "a CPU count")]
            let cpus = q as f64 / t.period_us.max(1) as f64;
            evidence.push(format!(
                "cgroup {} has a CPU quota of {cpus:.2} CPUs ({q}us per {}us) and was throttled \
                 in {} periods, {} in total during the run ({:.0}% of the runnable time)",
                t.cgroup,
                t.period_us,
                t.throttled_periods,
                secs(t.throttled_ns),
                share(t.throttled_ns, r) * 100.0
            ));
        } else {
            evidence.push(format!(
                "cgroup {} has no CPU quota: the wait is for CPUs that other work on the node \
                 holds",
                t.cgroup
            ));
        }
    }
    let stress = c
        .summary
        .fault
        .as_ref()
        .filter(|f| f.fault == "cpu-stress" || c.summary.tool == "cpu-stress");
    if let Some(f) = stress {
        evidence.push(format!(
            "a cpu-stress fault ran alongside over the same window ({:.2} CPUs asked, {:.2} \
             achieved{}): its workers compete for the same CPU, so this is the fault's effect \
             on the target",
            f.asked,
            f.achieved,
            f.cpu_limit
                .map_or_else(String::new, |l| format!(", against a limit of {l:.2} CPUs"))
        ));
    }
    evidence.extend(
        s.top_waits
            .iter()
            .filter(|w| w.reason == "runnable")
            .take(3)
            .map(|w| format!("preempted in {}: {}", w.function, secs(w.ns))),
    );
    let cause = if stress.is_some() {
        "during a cpu-stress fault"
    } else if quota {
        "throttled by the cgroup's CPU quota"
    } else {
        "CPUs busy with other work"
    };
    vec![Hit {
        key: "starved".into(),
        severity: if stress.is_some() {
            Severity::Info
        } else if part >= 0.3 {
            Severity::Critical
        } else {
            Severity::Warning
        },
        title: format!(
            "CPU starvation: threads waited {:.0}% of their time for a CPU ({cause})",
            part * 100.0
        ),
        evidence,
    }]
}

fn allocator_hot(c: &Capture, facts: &Facts) -> Vec<Hit> {
    let Some(f) = cpu(c) else {
        return Vec::new();
    };
    let mut hits = Vec::new();
    let under = facts.under(f);
    for (key, pattern, n, what) in [
        (
            "allocator",
            &*ALLOCATOR,
            under[1],
            "the memory allocator (malloc/free)",
        ),
        ("gc", &*GC, under[2], "garbage collection"),
    ] {
        let total = f.total();
        if share(n, total) < 0.2 {
            continue;
        }
        let mut evidence = vec![format!(
            "{n} of {total} CPU samples ({:.0}%) are in {what}",
            share(n, total) * 100.0
        )];
        evidence.extend(top_matching(f, pattern));
        hits.push(Hit {
            key: key.into(),
            severity: Severity::Warning,
            title: format!("{what} is hot: {:.0}% of CPU", share(n, total) * 100.0),
            evidence,
        });
    }
    hits
}

// ---- the engine's own honesty ---------------------------------------------------------------

fn fault_missed_target(c: &Capture, _: &Facts) -> Vec<Hit> {
    let Some(f) = &c.summary.fault else {
        return Vec::new();
    };
    if f.error_percent.abs() <= 10.0 && f.leftovers == 0 {
        return Vec::new();
    }
    let mut evidence = vec![format!(
        "asked {:.1} {}, achieved {:.1} {} ({:+.1}%)",
        f.asked, f.unit, f.achieved, f.unit, f.error_percent
    )];
    if f.leftovers > 0 {
        evidence.push(format!("{} leftover(s) after rollback", f.leftovers));
    }
    vec![Hit {
        key: f.fault.clone(),
        severity: if f.leftovers > 0 {
            Severity::Critical
        } else {
            Severity::Info
        },
        title: format!("the {} fault did not reach what was asked", f.fault),
        evidence,
    }]
}

fn data_loss(c: &Capture, _: &Facts) -> Vec<Hit> {
    let mut evidence = Vec::new();
    if let Some(cpu) = &c.summary.cpu {
        let lost = cpu.samples.lost();
        if lost > 0 {
            evidence.push(format!(
                "{lost} of {} CPU samples lost ({:.1}%)",
                cpu.samples.taken,
                share(lost, cpu.samples.taken) * 100.0
            ));
        }
        if share(cpu.breakdown.frames.unresolved, cpu.breakdown.frames.total) > 0.2 {
            evidence.push(format!(
                "{:.0}% of CPU frames unsymbolized",
                share(cpu.breakdown.frames.unresolved, cpu.breakdown.frames.total) * 100.0
            ));
        }
    }
    if let Some(m) = &c.summary.memory {
        if let Some(a) = &m.allocations {
            let lost = a.lost_live_map_full
                + a.lost_sites_map_full
                + a.lost_call_table_full
                + a.stacks_lost;
            if lost > 0 {
                evidence.push(format!(
                    "{lost} of {} allocator calls lost or without a stack ({} live map full, {} \
                     site map full, {} call table full, {} stacks not stored)",
                    a.calls,
                    a.lost_live_map_full,
                    a.lost_sites_map_full,
                    a.lost_call_table_full,
                    a.stacks_lost
                ));
            }
        }
        if let Some(f) = &m.page_faults {
            let lost = f.stacks_lost + f.lost_map_full;
            if lost > 0 {
                evidence.push(format!(
                    "{lost} of {} page faults lost or without a stack",
                    f.faults
                ));
            }
        }
    }
    if let Some(o) = &c.summary.offcpu {
        let a = &o.switches;
        let lost = a.lost_thread_table_full + a.lost_totals_full;
        if lost > 0 {
            evidence.push(format!(
                "{lost} of {} off-CPU waits lost ({} thread table full, {} totals table full)",
                a.switches, a.lost_thread_table_full, a.lost_totals_full
            ));
        }
        let stacks = a.user_stacks_lost + a.kernel_stacks_lost + a.stacks_lost_map_full;
        if stacks > 0 {
            evidence.push(format!("{stacks} off-CPU waits without a stack"));
        }
    }
    if let Some(s) = c.summary.signals.as_ref().filter(|s| s.lost_total > 0) {
        evidence.push(format!("{} signal events lost", s.lost_total));
    }
    if c.events_unreadable > 0 {
        evidence.push(format!("{} event lines unreadable", c.events_unreadable));
    }
    if !c.summary.complete {
        evidence.push(format!("the run is partial: {}", c.summary.ended));
    }
    if let Some(why) = &c.summary.failed {
        evidence.push(format!("the run failed: {why}"));
    }
    if evidence.is_empty() {
        return Vec::new();
    }
    vec![Hit {
        key: "data".into(),
        severity: Severity::Info,
        title: "some data is missing; read the numbers with that in mind".into(),
        evidence,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::fixtures::capture;

    const ALL: &[&str] = &[
        "allocs",
        "balanced",
        "contend",
        "cpu",
        "fill",
        "fill-quiet",
        "gc",
        "leak",
        "offcpu-contend",
        "offcpu-io",
        "offcpu-starved",
        "offcpu-stress",
        "offcpu-waits",
        "oom",
        "stress",
        "term-clean",
        "term-hung",
    ];

    /// Which recorded captures `rule` fires on.
    fn fires_on(rule: &str) -> Vec<&'static str> {
        ALL.iter()
            .copied()
            .filter(|name| evaluate(&[capture(name)]).iter().any(|f| f.rule == rule))
            .collect()
    }

    #[test]
    fn each_rule_fires_on_its_evidence_and_not_on_clean_data() {
        assert_eq!(fires_on("oom-kill"), ["oom"]);
        assert_eq!(fires_on("sigterm-unhandled"), ["term-hung"]);
        assert_eq!(fires_on("volume-fill-errors"), ["fill"]);
        assert_eq!(fires_on("memory-leak-site"), ["leak"]);
        assert_eq!(fires_on("dominant-function"), ["cpu"]);
        assert_eq!(fires_on("lock-contention"), ["contend"]);
        assert_eq!(fires_on("allocator-or-gc-hot"), ["allocs", "gc"]);
        assert_eq!(fires_on("lock-wait"), ["offcpu-contend"]);
        assert_eq!(fires_on("io-wait"), ["offcpu-io"]);
        assert_eq!(
            fires_on("cpu-starvation"),
            ["offcpu-contend", "offcpu-starved", "offcpu-stress"]
        );
    }

    #[test]
    fn off_cpu_findings_name_the_wait_and_what_explains_it() {
        let find = |capture_name: &str, rule: &str| {
            evaluate(&[capture(capture_name)])
                .into_iter()
                .find(|f| f.rule == rule)
                .unwrap_or_else(|| panic!("{rule} on {capture_name}"))
        };
        let lock = find("offcpu-contend", "lock-wait");
        assert!(
            lock.evidence.iter().any(|e| e.contains("Mutex")),
            "{lock:?}"
        );
        let io = find("offcpu-io", "io-wait");
        assert!(
            io.evidence
                .iter()
                .any(|e| e.contains("waiting in the kernel at")),
            "{io:?}"
        );
        // A quota explains the starvation: its numbers are in the evidence, and the critical
        // severity says so without a fault to blame.
        let starved = find("offcpu-starved", "cpu-starvation");
        assert_eq!(starved.severity, Severity::Critical, "{starved:?}");
        assert!(starved.title.contains("quota"), "{starved:?}");
        assert!(
            starved
                .evidence
                .iter()
                .any(|e| e.contains("CPU quota of 0.20 CPUs") && e.contains("throttled in")),
            "{starved:?}"
        );
        // With a cpu-stress fault alongside, the starvation is the fault's expected effect.
        let stress = find("offcpu-stress", "cpu-starvation");
        assert_eq!(stress.severity, Severity::Info, "{stress:?}");
        assert!(stress.title.contains("cpu-stress"), "{stress:?}");
        assert!(
            stress
                .evidence
                .iter()
                .any(|e| e.contains("cpu-stress fault ran alongside")),
            "{stress:?}"
        );
    }

    #[test]
    fn a_fault_that_missed_its_target_or_left_something_behind_is_a_finding() {
        // The recorded stress with a quota the workers share with the target reaches half of
        // what it asked: a true finding.
        assert_eq!(fires_on("fault-missed-target"), ["offcpu-stress"]);
        let mut c = capture("stress");
        let f = c.summary.fault.as_mut().unwrap();
        f.error_percent = -30.0;
        let hit = &fault_missed_target(&c, &Facts::default())[0];
        assert_eq!(hit.severity, Severity::Info);
        assert!(hit.evidence[0].contains("(-30.0%)"), "{hit:?}");
        // Within 10% but with something left behind after rollback: critical.
        let f = c.summary.fault.as_mut().unwrap();
        f.error_percent = 2.0;
        f.leftovers = 1;
        let hit = &fault_missed_target(&c, &Facts::default())[0];
        assert_eq!(hit.severity, Severity::Critical);
        assert!(hit.evidence[1].contains("1 leftover"), "{hit:?}");
    }

    #[test]
    fn data_loss_counts_every_collector_including_memory() {
        let clean: Vec<&str> = fires_on("data-loss");
        for name in ["leak", "cpu", "term-clean"] {
            assert!(!clean.contains(&name), "{name} is complete: {clean:?}");
        }
        let mut c = capture("leak");
        let m = c.summary.memory.as_mut().unwrap();
        m.allocations.as_mut().unwrap().lost_live_map_full = 7;
        m.page_faults
            .get_or_insert_with(Default::default)
            .stacks_lost = 3;
        let hit = &data_loss(&c, &Facts::default())[0];
        assert!(
            hit.evidence
                .iter()
                .any(|e| e.starts_with("7 of ") && e.contains("7 live map full")),
            "{hit:?}"
        );
        assert!(
            hit.evidence
                .iter()
                .any(|e| e.starts_with("3 of ") && e.contains("page faults")),
            "{hit:?}"
        );
        let mut c = capture("cpu");
        c.summary.cpu.as_mut().unwrap().samples.lost_ring_full = 5;
        assert!(data_loss(&c, &Facts::default())[0].evidence[0].starts_with("5 of "));
    }

    #[test]
    fn findings_name_the_cause_and_show_the_numbers() {
        let f = evaluate(&[capture("leak")]);
        let leak = f.iter().find(|f| f.rule == "memory-leak-site").unwrap();
        assert!(
            leak.title.contains("toe_demo::memory::leaky_site"),
            "{leak:?}"
        );
        assert!(leak.evidence.iter().any(|e| e.contains("RSS")), "{leak:?}");
        let hung = evaluate(&[capture("term-hung")]);
        let t = hung.iter().find(|f| f.rule == "sigterm-unhandled").unwrap();
        assert!(t.evidence[0].contains("handler ran"), "{t:?}");
        let gc = evaluate(&[capture("gc")]);
        let g = gc.iter().find(|f| f.rule == "allocator-or-gc-hot").unwrap();
        assert!(g.title.starts_with("garbage collection is hot"), "{g:?}");
        assert!(g.evidence.iter().any(|e| e.contains("runtime.")), "{g:?}");
        let cpu = evaluate(&[capture("cpu")]);
        let d = cpu.iter().find(|f| f.rule == "dominant-function").unwrap();
        assert!(d.title.starts_with("toe_demo::mix dominates CPU"), "{d:?}");
    }

    #[test]
    fn the_same_cause_in_two_captures_is_one_finding() {
        let mut a = capture("oom");
        let mut b = capture("oom");
        a.target = "web-0/app".into();
        b.target = "web-1/app".into();
        let f = evaluate(&[a, b]);
        let oom: Vec<_> = f.iter().filter(|f| f.rule == "oom-kill").collect();
        assert_eq!(oom.len(), 1, "{f:?}");
        assert_eq!(oom[0].seen_in.len(), 2);
        assert!(oom[0].title.contains("in 2 captures"));
        assert_eq!(oom[0].severity, Severity::Critical);
    }
}
