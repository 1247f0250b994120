//! The run summary (`summary.json`): what was asked, what was measured, every loss, and the
//! hottest functions. Common fields first, then one section per tool that ran. The agent writes
//! it next to the artifacts and prints it for the user; processing reads it back. The store holds
//! summaries of whatever agent version wrote them, so every struct reads with defaults for what
//! is missing and ignores what it does not know.

pub mod fault;
pub mod memory;
pub mod offcpu;
pub mod signals;

use std::{collections::HashMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

use crate::profile::Profile;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SampleAccounting {
    /// Samples that hit a target task (kernel counter).
    pub taken: u64,
    /// Samples delivered to user space and included in the profile.
    pub recorded: u64,
    /// Lost because the ring buffer was full.
    pub lost_ring_full: u64,
    /// taken - recorded - lost_ring_full: records the kernel had not yet submitted when
    /// sampling stopped (normally 0).
    pub unaccounted: u64,
    pub kernel_stack_truncated: u64,
    pub user_stack_truncated: u64,
    pub kernel_stack_errors: u64,
    pub user_stack_errors: u64,
    /// Child processes of a `--pid`/command target that the kernel started following.
    pub children_followed: u64,
    /// Child processes not followed because the target map was full.
    pub children_missed: u64,
    pub unwind: UnwindAccounting,
}

impl SampleAccounting {
    /// Samples taken that are not in the profile, whatever the reason.
    #[must_use]
    pub fn lost(&self) -> u64 {
        self.lost_ring_full + self.unaccounted
    }
}

/// How the user stacks of the recorded samples were unwound, and for those whose leaf had no
/// unwind tables, why.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct UnwindAccounting {
    /// Unwound from the binaries' unwind tables to a root frame.
    pub tables: u64,
    /// Unwound from tables over the copied stack, continued on the frame-pointer walk.
    pub joined: u64,
    /// The frame-pointer walk was kept: the tables gave no more frames.
    pub frame_pointers: u64,
    /// No user registers or stack could be read for the sample.
    pub copy_errors: u64,
    /// Copies the kernel's ring could not hold (a collector that keeps them apart from its
    /// events): those stacks were walked by frame pointers.
    pub copies_lost: u64,
    /// Samples whose leaf lay in a file without unwind tables (e.g. Go binaries).
    pub leaf_no_unwind_info: u64,
    /// ... in a file that could not be read.
    pub leaf_unreadable: u64,
    /// ... in a file whose tables did not fit the agent's table memory cap.
    pub leaf_memory_full: u64,
    /// ... in no mapped file (JIT code, or a process gone before its mappings were read).
    pub leaf_not_mapped: u64,
    /// Unwind-table memory the agent held at the end of the run (shared by concurrent runs).
    pub table_memory_bytes: u64,
    /// Files whose unwind tables the agent had read by the end of the run, and the time that
    /// took (agent-wide: a file is read once for every run).
    pub table_files_read: u64,
    pub table_read_ms: f64,
}

impl UnwindAccounting {
    /// Adds another collection's counts (the table memory is a reading, not a count: the
    /// newer one is kept).
    pub fn add(&mut self, o: &Self) {
        self.tables += o.tables;
        self.joined += o.joined;
        self.frame_pointers += o.frame_pointers;
        self.copy_errors += o.copy_errors;
        self.copies_lost += o.copies_lost;
        self.leaf_no_unwind_info += o.leaf_no_unwind_info;
        self.leaf_unreadable += o.leaf_unreadable;
        self.leaf_memory_full += o.leaf_memory_full;
        self.leaf_not_mapped += o.leaf_not_mapped;
        self.table_memory_bytes = self.table_memory_bytes.max(o.table_memory_bytes);
        self.table_files_read = self.table_files_read.max(o.table_files_read);
        self.table_read_ms = self.table_read_ms.max(o.table_read_ms);
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct FrameAccounting {
    /// Frame occurrences, weighted by samples.
    pub total: u64,
    pub unresolved: u64,
    pub unresolved_share: f64,
    /// The same per user-space binary, those with the most unsymbolized frames first
    /// ([`MAX_BINARIES`] at most).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binaries: Vec<BinaryFrames>,
}

/// Binaries listed per profile in [`FrameAccounting::binaries`].
pub const MAX_BINARIES: usize = 12;

/// One binary's frames in a profile, and where its names came from.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct BinaryFrames {
    /// Its path as the process saw it; `[unknown]` for code in no file.
    pub module: String,
    pub frames: u64,
    pub unresolved: u64,
    pub unresolved_share: f64,
    /// Where its symbols came from, or why there were none (filled in by the agent, which
    /// has the file).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub symbols: String,
}

impl Summary {
    /// Every per-binary frame list of the summary's profiles.
    pub fn binary_frames_mut(&mut self) -> impl Iterator<Item = &mut BinaryFrames> {
        let cpu = self.cpu.as_mut().map(|c| &mut c.breakdown);
        let offcpu = self.offcpu.as_mut().map(|o| &mut o.breakdown);
        let (inuse, growth) = match self.memory.as_mut() {
            Some(m) => (m.inuse.as_mut(), m.growth.as_mut()),
            None => (None, None),
        };
        [cpu, offcpu, inuse, growth]
            .into_iter()
            .flatten()
            .flat_map(|b| b.frames.binaries.iter_mut())
    }
}

/// Per user-space binary: (frames, unresolved), weighted by the default sample type.
fn binary_frames(profile: &Profile) -> Vec<BinaryFrames> {
    let mut per: HashMap<&str, (u64, u64)> = HashMap::new();
    for s in &profile.stacks {
        let v = s.values.get(profile.default_type).copied().unwrap_or(0);
        if v == 0 {
            continue;
        }
        for &f in &s.frames {
            let frame = &profile.frames[f as usize];
            if frame.kernel {
                continue;
            }
            let e = per
                .entry(frame.module.as_deref().unwrap_or("[unknown]"))
                .or_default();
            e.0 += v;
            if !frame.resolved {
                e.1 += v;
            }
        }
    }
    let mut out: Vec<BinaryFrames> = per
        .into_iter()
        .map(|(module, (frames, unresolved))| BinaryFrames {
            module: module.to_owned(),
            frames,
            unresolved,
            unresolved_share: share(unresolved, frames),
            symbols: String::new(),
        })
        .collect();
    out.sort_by(|a, b| {
        (b.unresolved, b.frames, &a.module).cmp(&(a.unresolved, a.frames, &b.module))
    });
    out.truncate(MAX_BINARIES);
    out
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ProcessShare {
    pub pid: u32,
    pub name: String,
    /// In the profile's default unit (samples, bytes, faults).
    pub value: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct FunctionShare {
    pub function: String,
    pub value: u64,
    /// Of the profile's total.
    pub share: f64,
}

/// Where a profile's weight sits: per process, per function, and how much of it is unsymbolized.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Breakdown {
    pub total: u64,
    pub frames: FrameAccounting,
    pub processes: Vec<ProcessShare>,
    /// Functions by weight where they are the leaf (self).
    pub top_self: Vec<FunctionShare>,
    /// Functions by weight where they appear anywhere on the stack (total).
    pub top_total: Vec<FunctionShare>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct CpuSummary {
    pub frequency_hz: u64,
    pub cpus: usize,
    pub samples: SampleAccounting,
    #[serde(flatten)]
    pub breakdown: Breakdown,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Summary {
    pub run: String,
    pub tool: String,
    /// Tools that ran alongside it over the same window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alongside: Vec<String>,
    pub target: String,
    /// False when the run was interrupted or failed before its planned end.
    pub complete: bool,
    pub ended: String,
    /// When sampling began (Unix time, milliseconds): with `sampled_duration_s`, the run's
    /// window on the wall clock, for lining runs up.
    #[serde(default)]
    pub started_unix_ms: u64,
    pub requested_duration_s: f64,
    pub sampled_duration_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offcpu: Option<offcpu::OffcpuSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<memory::MemorySummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signals: Option<signals::SignalSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<fault::FaultSummary>,
    /// Why the run failed although it collected (e.g. more events lost than allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// Artifact name -> URL.
    pub artifacts: Vec<(String, String)>,
    /// Milliseconds from the end of sampling until the artifacts were written.
    pub finalize_ms: u64,
    /// Target processes with frames in code no file holds (JIT output), and how it was named.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jit: Vec<JitCode>,
    pub warnings: Vec<String>,
}

/// One process's frames in generated code (outside any mapped file): how many distinct
/// addresses its stacks held there, how many a perf map named, and where the names came from
/// or how to get them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct JitCode {
    pub pid: u32,
    pub process: String,
    /// `JVM`, `Node.js`, `Python` or `unknown runtime`.
    pub runtime: String,
    pub addresses: u64,
    pub named: u64,
    /// Where the names came from, or why there were none.
    pub source: String,
    /// How to get a perf map when addresses stayed unnamed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Summary {
    /// When sampling ended, ms since the Unix epoch.
    #[must_use]
    pub fn ended_unix_ms(&self) -> u64 {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a run's length in ms, non-negative and far below u64::MAX"
        )]
        let ms = (self.sampled_duration_s.max(0.0) * 1000.0) as u64;
        self.started_unix_ms + ms
    }
}

#[expect(clippy::cast_precision_loss, reason = "shares are for display")]
/// `n` as a share of `of` (0 when `of` is 0).
#[must_use]
pub fn share(n: u64, of: u64) -> f64 {
    if of == 0 { 0.0 } else { n as f64 / of as f64 }
}

fn top(map: HashMap<String, u64>, total: u64, n: usize) -> Vec<FunctionShare> {
    let mut v: Vec<(String, u64)> = map.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.into_iter()
        .take(n)
        .map(|(function, value)| FunctionShare {
            function,
            value,
            share: share(value, total),
        })
        .collect()
}

/// Where the weight of the profile's default sample type sits.
#[must_use]
pub fn analyse(profile: &Profile) -> Breakdown {
    let index = profile.default_type;
    let total = profile.total(index);
    let mut self_time: HashMap<String, u64> = HashMap::new();
    let mut total_time: HashMap<String, u64> = HashMap::new();
    let mut processes: HashMap<(u32, String), u64> = HashMap::new();
    for s in &profile.stacks {
        let value = s.values.get(index).copied().unwrap_or(0);
        if value == 0 {
            continue;
        }
        *processes.entry((s.pid, s.process.clone())).or_insert(0) += value;
        if let Some(&leaf) = s.frames.last() {
            *self_time
                .entry(profile.frames[leaf as usize].function.clone())
                .or_insert(0) += value;
        }
        // Each function counts once per stack, however deep its recursion.
        let mut seen = std::collections::HashSet::new();
        for &f in &s.frames {
            let name = &profile.frames[f as usize].function;
            if seen.insert(name) {
                *total_time.entry(name.clone()).or_insert(0) += value;
            }
        }
    }
    let mut procs: Vec<ProcessShare> = processes
        .into_iter()
        .map(|((pid, name), value)| ProcessShare { pid, name, value })
        .collect();
    procs.sort_by(|a, b| b.value.cmp(&a.value).then(a.pid.cmp(&b.pid)));
    let (frames, unresolved) = profile.frame_counts();
    Breakdown {
        total,
        frames: FrameAccounting {
            total: frames,
            unresolved,
            unresolved_share: share(unresolved, frames),
            binaries: binary_frames(profile),
        },
        processes: procs,
        top_self: top(self_time, total, 10),
        top_total: top(total_time, total, 10),
    }
}

/// Top functions and processes as text lines, `unit` formatting a value.
pub(crate) fn render_breakdown(
    o: &mut String,
    b: &Breakdown,
    what: &str,
    unit: &dyn Fn(u64) -> String,
) {
    let _ = writeln!(
        o,
        "  unsymbolized frames: {:.1}% ({} of {})",
        b.frames.unresolved_share * 100.0,
        b.frames.unresolved,
        b.frames.total
    );
    for bin in b.frames.binaries.iter().filter(|b| b.unresolved > 0) {
        let why = if bin.symbols.is_empty() {
            String::new()
        } else {
            format!(": {}", bin.symbols)
        };
        let _ = writeln!(
            o,
            "    {}: {:.1}% of its {} frames{why}",
            bin.module,
            bin.unresolved_share * 100.0,
            bin.frames,
        );
    }
    if b.processes.len() > 1 {
        let list: Vec<String> = b
            .processes
            .iter()
            .take(5)
            .map(|p| format!("{} ({}) {}", p.name, p.pid, unit(p.value)))
            .collect();
        let _ = writeln!(o, "  processes: {}", list.join(", "));
    }
    if !b.top_self.is_empty() {
        let _ = writeln!(o, "  top functions by {what} (self):");
        for f in b.top_self.iter().take(5) {
            let _ = writeln!(
                o,
                "    {:5.1}%  {:>10}  {}",
                f.share * 100.0,
                unit(f.value),
                f.function
            );
        }
    }
}

/// The human-readable version printed at the end of a run.
#[must_use]
pub fn render(s: &Summary) -> String {
    let mut o = String::new();
    let status = if s.complete { "complete" } else { "PARTIAL" };
    let alongside = if s.alongside.is_empty() {
        String::new()
    } else {
        format!(" with {} alongside", s.alongside.join(", "))
    };
    let _ = writeln!(
        o,
        "TOE {}{alongside} on {}: {status} ({})",
        s.tool, s.target, s.ended
    );
    if let Some(cpu) = &s.cpu {
        render_cpu(&mut o, cpu, s.sampled_duration_s);
    }
    if let Some(off) = &s.offcpu {
        offcpu::render(&mut o, off);
    }
    if let Some(m) = &s.memory {
        memory::render(&mut o, m, s.sampled_duration_s);
    }
    if let Some(sig) = &s.signals {
        signals::render(&mut o, sig);
    }
    if let Some(f) = &s.fault {
        fault::render(&mut o, f);
    }
    if let Some(f) = &s.failed {
        let _ = writeln!(o, "  FAILED: {f}");
    }
    for j in &s.jit {
        let hint = j
            .hint
            .as_ref()
            .map_or_else(String::new, |h| format!("; {h}"));
        let _ = writeln!(
            o,
            "  generated code of {} ({}, {}): {} of {} addresses named; {}{hint}",
            j.process, j.pid, j.runtime, j.named, j.addresses, j.source
        );
    }
    for w in &s.warnings {
        let _ = writeln!(o, "  warning: {w}");
    }
    let _ = writeln!(
        o,
        "  artifacts (written {} ms after collection ended):",
        s.finalize_ms
    );
    for (name, url) in &s.artifacts {
        let _ = writeln!(o, "    {name:<10} {url}");
    }
    o
}

fn render_cpu(o: &mut String, c: &CpuSummary, seconds: f64) {
    let a = &c.samples;
    let _ = writeln!(
        o,
        "  samples: {} recorded of {} taken at {} Hz over {seconds:.1}s on {} CPUs",
        a.recorded, a.taken, c.frequency_hz, c.cpus
    );
    let _ = writeln!(
        o,
        "  lost: {} (ring buffer full), {} unaccounted; truncated stacks: {} kernel, {} user; stack errors: {} kernel, {} user",
        a.lost_ring_full,
        a.unaccounted,
        a.kernel_stack_truncated,
        a.user_stack_truncated,
        a.kernel_stack_errors,
        a.user_stack_errors
    );
    if a.children_followed + a.children_missed > 0 {
        let _ = writeln!(
            o,
            "  child processes followed: {} (missed: {})",
            a.children_followed, a.children_missed
        );
    }
    render_unwind(o, "user stacks", &a.unwind);
    render_breakdown(o, &c.breakdown, "CPU", &|v| format!("{v}"));
}

/// How `what` (user stacks, sender stacks) were unwound, and why a leaf had no tables.
pub(crate) fn render_unwind(o: &mut String, what: &str, u: &UnwindAccounting) {
    if u.tables + u.joined + u.frame_pointers + u.copy_errors + u.copies_lost == 0 {
        return;
    }
    let lost = if u.copies_lost > 0 {
        format!(", {} copies lost (ring full)", u.copies_lost)
    } else {
        String::new()
    };
    let _ = writeln!(
        o,
        "  {what}: {} unwound from tables to their root, {} continued by frame pointers past \
         the copied stack, {} by frame pointers only, {} without registers{lost}; unwind tables \
         {} KiB from {} files read in {:.1} ms",
        u.tables,
        u.joined,
        u.frame_pointers,
        u.copy_errors,
        u.table_memory_bytes / 1024,
        u.table_files_read,
        u.table_read_ms
    );
    let misses = u.leaf_no_unwind_info + u.leaf_unreadable + u.leaf_memory_full + u.leaf_not_mapped;
    if misses > 0 {
        let _ = writeln!(
            o,
            "  leaf without tables: {} in files without unwind info, {} unreadable, {} over the \
             table memory cap, {} in no file (JIT code)",
            u.leaf_no_unwind_info, u.leaf_unreadable, u.leaf_memory_full, u.leaf_not_mapped
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::fixtures;

    #[test]
    fn self_and_total_time() {
        let b = analyse(&fixtures::profile());
        assert_eq!(b.top_self[0].function, "hot");
        assert!((b.top_self[0].share - 0.7).abs() < 1e-9);
        assert_eq!(b.top_total[0].function, "main");
        assert_eq!(b.top_total[0].value, 100);
        assert_eq!(
            b.processes,
            vec![ProcessShare {
                pid: 42,
                name: "demo".into(),
                value: 100
            }]
        );
        assert_eq!(b.frames.unresolved, 20);
        // Per binary, user frames only: the kernel's ksys_write is not a binary's.
        assert_eq!(
            b.frames.binaries,
            vec![BinaryFrames {
                module: "/bin/demo".into(),
                frames: 220,
                unresolved: 20,
                unresolved_share: share(20, 220),
                symbols: String::new(),
            }]
        );
        let mut s = Summary {
            cpu: Some(CpuSummary {
                breakdown: b,
                ..CpuSummary::default()
            }),
            ..Summary::default()
        };
        for bin in s.binary_frames_mut() {
            bin.symbols = "none: stripped".into();
        }
        let text = render(&s);
        assert!(text.contains("70.0%          70  hot"), "{text}");
        assert!(
            text.contains("/bin/demo: 9.1% of its 220 frames: none: stripped"),
            "{text}"
        );
    }
}
