//! The run summary: what was asked, what was measured, every loss, and the hottest functions.
//! Written as JSON next to the artifacts and printed for the user.

use std::{collections::HashMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

use super::Profile;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
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
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FrameAccounting {
    /// Frame occurrences, weighted by samples.
    pub total: u64,
    pub unresolved: u64,
    pub unresolved_share: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProcessSamples {
    pub pid: u32,
    pub name: String,
    pub samples: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FunctionShare {
    pub function: String,
    pub samples: u64,
    /// Of all recorded samples.
    pub share: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub run: String,
    pub tool: String,
    pub target: String,
    /// False when the run was interrupted or failed before its planned end.
    pub complete: bool,
    pub ended: String,
    pub frequency_hz: u64,
    pub requested_duration_s: f64,
    pub sampled_duration_s: f64,
    pub cpus: usize,
    pub samples: SampleAccounting,
    pub frames: FrameAccounting,
    pub processes: Vec<ProcessSamples>,
    /// Functions by samples where they are the leaf (self time).
    pub top_self: Vec<FunctionShare>,
    /// Functions by samples where they appear anywhere on the stack (total time).
    pub top_total: Vec<FunctionShare>,
    /// Artifact name -> URL.
    pub artifacts: Vec<(String, String)>,
    /// Milliseconds from the end of sampling until the artifacts were written.
    pub finalize_ms: u64,
    pub warnings: Vec<String>,
}

#[expect(clippy::cast_precision_loss, reason = "shares are for display")]
fn share(n: u64, of: u64) -> f64 {
    if of == 0 { 0.0 } else { n as f64 / of as f64 }
}

fn top(map: HashMap<String, u64>, total: u64, n: usize) -> Vec<FunctionShare> {
    let mut v: Vec<(String, u64)> = map.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.into_iter()
        .take(n)
        .map(|(function, samples)| FunctionShare {
            function,
            samples,
            share: share(samples, total),
        })
        .collect()
}

/// Fills the profile-derived parts of `summary`.
pub fn analyse(profile: &Profile, summary: &mut Summary) {
    let total = profile.total_samples();
    let mut self_time: HashMap<String, u64> = HashMap::new();
    let mut total_time: HashMap<String, u64> = HashMap::new();
    let mut processes: HashMap<(u32, String), u64> = HashMap::new();
    for s in &profile.stacks {
        *processes.entry((s.pid, s.process.clone())).or_insert(0) += s.count;
        if let Some(&leaf) = s.frames.last() {
            *self_time
                .entry(profile.frames[leaf as usize].function.clone())
                .or_insert(0) += s.count;
        }
        // Each function counts once per stack, however deep its recursion.
        let mut seen = std::collections::HashSet::new();
        for &f in &s.frames {
            let name = &profile.frames[f as usize].function;
            if seen.insert(name) {
                *total_time.entry(name.clone()).or_insert(0) += s.count;
            }
        }
    }
    summary.top_self = top(self_time, total, 10);
    summary.top_total = top(total_time, total, 10);
    let mut procs: Vec<ProcessSamples> = processes
        .into_iter()
        .map(|((pid, name), samples)| ProcessSamples { pid, name, samples })
        .collect();
    procs.sort_by(|a, b| b.samples.cmp(&a.samples).then(a.pid.cmp(&b.pid)));
    summary.processes = procs;
    let (frames, unresolved) = profile.frame_counts();
    summary.frames = FrameAccounting {
        total: frames,
        unresolved,
        unresolved_share: share(unresolved, frames),
    };
}

/// The human-readable version printed at the end of a run.
#[must_use]
pub fn render(s: &Summary) -> String {
    let mut o = String::new();
    let status = if s.complete { "complete" } else { "PARTIAL" };
    let _ = writeln!(o, "TOE {} on {}: {status} ({})", s.tool, s.target, s.ended);
    let a = &s.samples;
    let _ = writeln!(
        o,
        "  samples: {} recorded of {} taken at {} Hz over {:.1}s on {} CPUs",
        a.recorded, a.taken, s.frequency_hz, s.sampled_duration_s, s.cpus
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
    let _ = writeln!(
        o,
        "  unsymbolized frames: {:.1}% ({} of {})",
        s.frames.unresolved_share * 100.0,
        s.frames.unresolved,
        s.frames.total
    );
    if s.processes.len() > 1 {
        let list: Vec<String> = s
            .processes
            .iter()
            .take(5)
            .map(|p| format!("{} ({}) {}", p.name, p.pid, p.samples))
            .collect();
        let _ = writeln!(o, "  processes: {}", list.join(", "));
    }
    if !s.top_self.is_empty() {
        let _ = writeln!(o, "  top functions (self):");
        for f in s.top_self.iter().take(5) {
            let _ = writeln!(o, "    {:5.1}%  {}", f.share * 100.0, f.function);
        }
    }
    for w in &s.warnings {
        let _ = writeln!(o, "  warning: {w}");
    }
    let _ = writeln!(
        o,
        "  artifacts (written {} ms after sampling ended):",
        s.finalize_ms
    );
    for (name, url) in &s.artifacts {
        let _ = writeln!(o, "    {name:<10} {url}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::{super::fixtures, *};

    #[test]
    fn self_and_total_time() {
        let mut s = Summary::default();
        analyse(&fixtures::profile(), &mut s);
        assert_eq!(s.top_self[0].function, "hot");
        assert!((s.top_self[0].share - 0.7).abs() < 1e-9);
        assert_eq!(s.top_total[0].function, "main");
        assert_eq!(s.top_total[0].samples, 100);
        assert_eq!(
            s.processes,
            vec![ProcessSamples {
                pid: 42,
                name: "demo".into(),
                samples: 100
            }]
        );
        assert_eq!(s.frames.unresolved, 20);
        let text = render(&s);
        assert!(text.contains("70.0%  hot"), "{text}");
    }
}
