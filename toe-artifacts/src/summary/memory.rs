//! The memory profile's section of the summary: every allocation and free the kernel saw, the
//! heap totals, the page faults behind memory growth, and RSS.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{Breakdown, render_breakdown};
use crate::{profile::Profile, rss::RssSummary};

/// One target process as the memory collector saw it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ProcessTracking {
    pub pid: u32,
    pub name: String,
    /// True when the allocator probes are attached.
    pub tracked: bool,
    /// The allocator found, or why allocations of this process are not tracked.
    pub allocator: String,
    /// Milliseconds between the process start and its probes being attached: allocations in
    /// that window are not seen (their frees count as unknown frees).
    pub attached_after_ms: Option<u64>,
}

/// Every allocator call and free of the target, by outcome.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct AllocationAccounting {
    pub calls: u64,
    pub bytes_requested: u64,
    pub tracked: u64,
    pub below_min_size: u64,
    pub not_sampled: u64,
    pub failed: u64,
    pub nested_calls: u64,
    pub lost_live_map_full: u64,
    pub lost_sites_map_full: u64,
    pub lost_call_table_full: u64,
    pub stacks_lost: u64,
    pub frees_matched: u64,
    /// Frees of blocks the kernel did not track: allocated before the run (or before a process
    /// was attached), not sampled, or below the minimum size.
    pub frees_untracked: u64,
    pub frees_null: u64,
    /// A tracked address came back from the allocator before its free was seen.
    pub reused_without_free: u64,
    /// Tracked allocations whose stack copy the kernel's ring could not hold: walked by frame
    /// pointers instead (`--unwind=tables`).
    pub copies_lost: u64,
    /// Frees of blocks whose allocation was unwound from its copy that the ring could not hold:
    /// those blocks stay in use in the profile.
    pub free_events_lost: u64,
}

/// Page faults (memory growth), not chaos faults.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PageFaultAccounting {
    pub faults: u64,
    pub unwound: u64,
    pub stacks_lost: u64,
    pub lost_map_full: u64,
    /// Unwound faults whose stack copy found the ring full (`--unwind=tables`): walked by frame
    /// pointers instead.
    pub copies_lost: u64,
}

/// Totals of the heap profile (scaled estimates in sampled mode).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct HeapTotals {
    pub alloc_objects: u64,
    pub alloc_bytes: u64,
    pub inuse_objects: u64,
    pub inuse_bytes: u64,
}

impl HeapTotals {
    #[must_use]
    pub fn of(p: &Profile) -> Self {
        Self {
            alloc_objects: p.total(0),
            alloc_bytes: p.total(1),
            inuse_objects: p.total(2),
            inuse_bytes: p.total(3),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct MemorySummary {
    /// exact, sampled or growth.
    pub mode: String,
    /// Mean bytes between sampled allocations (sampled mode).
    pub sample_bytes: Option<u64>,
    pub min_size: u64,
    /// Every n-th page fault is unwound (`fault_period` before it was renamed).
    #[serde(alias = "fault_period")]
    pub page_fault_period: Option<u32>,
    pub processes: Vec<ProcessTracking>,
    /// What was and was not tracked, in words.
    pub coverage: Vec<String>,
    pub allocations: Option<AllocationAccounting>,
    /// How allocation stacks were unwound from their copies (`--unwind=tables`).
    pub unwind: Option<super::UnwindAccounting>,
    pub heap: Option<HeapTotals>,
    /// Where in-use bytes sit (leaf = the function that called the allocator).
    pub inuse: Option<Breakdown>,
    /// Page faults behind memory growth (`faults` before it was renamed).
    #[serde(alias = "faults")]
    pub page_faults: Option<PageFaultAccounting>,
    /// How page-fault stacks were unwound from their copies (`--unwind=tables`).
    pub fault_unwind: Option<super::UnwindAccounting>,
    pub growth: Option<Breakdown>,
    pub rss: RssSummary,
}

/// Human-readable bytes.
#[must_use]
#[expect(clippy::cast_precision_loss, reason = "display")]
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn render(o: &mut String, m: &MemorySummary, seconds: f64) {
    let _ = writeln!(o, "  mode: {} over {seconds:.1}s", m.mode);
    for p in &m.processes {
        let _ = writeln!(
            o,
            "  process {} ({}): {}{}",
            p.name,
            p.pid,
            p.allocator,
            p.attached_after_ms
                .map(|ms| format!(", probes attached {ms} ms after it started"))
                .unwrap_or_default()
        );
    }
    for c in &m.coverage {
        let _ = writeln!(o, "  coverage: {c}");
    }
    if let (Some(a), Some(h)) = (&m.allocations, &m.heap) {
        let _ = writeln!(
            o,
            "  in use at end: {} in {} objects; allocated during run: {} in {} objects{}",
            bytes(h.inuse_bytes),
            h.inuse_objects,
            bytes(h.alloc_bytes),
            h.alloc_objects,
            if m.sample_bytes.is_some() {
                " (estimates from sampling)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            o,
            "  allocator calls: {} ({} requested), tracked {}, below min size {}, not sampled {}, failed {}, nested {}",
            a.calls,
            bytes(a.bytes_requested),
            a.tracked,
            a.below_min_size,
            a.not_sampled,
            a.failed,
            a.nested_calls
        );
        let _ = writeln!(
            o,
            "  frees: {} of tracked blocks, {} of untracked blocks (allocated before tracking or not sampled), {} free(NULL)",
            a.frees_matched, a.frees_untracked, a.frees_null
        );
        let _ = writeln!(
            o,
            "  lost: {} (live map full), {} (site map full), {} (call table full), {} stacks not stored, {} reused without free",
            a.lost_live_map_full,
            a.lost_sites_map_full,
            a.lost_call_table_full,
            a.stacks_lost,
            a.reused_without_free
        );
        if a.copies_lost + a.free_events_lost > 0 {
            let _ = writeln!(
                o,
                "  ring full: {} allocation stacks walked by frame pointers instead of tables, {} \
                 frees lost (their blocks stay in use)",
                a.copies_lost, a.free_events_lost
            );
        }
    }
    if let Some(u) = &m.unwind {
        super::render_unwind(o, "allocation stacks", u);
    }
    if let Some(b) = &m.inuse {
        render_breakdown(o, b, "in-use bytes", &bytes);
    }
    render_page_faults(o, m);
    crate::rss::render(o, &m.rss);
}

/// The page faults counted and unwound, how their stacks were unwound, and the functions that
/// faulted the most.
fn render_page_faults(o: &mut String, m: &MemorySummary) {
    if let Some(f) = &m.page_faults {
        let _ = writeln!(
            o,
            "  page faults: {} in targets, {} unwound, {} stacks lost, {} lost (map full)",
            f.faults, f.unwound, f.stacks_lost, f.lost_map_full
        );
        if f.copies_lost > 0 {
            let _ = writeln!(
                o,
                "  ring full: {} page-fault stacks walked by frame pointers instead of tables \
                 (a higher --fault-period copies fewer)",
                f.copies_lost
            );
        }
    }
    if let Some(u) = &m.fault_unwind {
        super::render_unwind(o, "page-fault stacks", u);
    }
    if let Some(b) = &m.growth
        && !b.top_self.is_empty()
    {
        let _ = writeln!(o, "  top functions by page faults (self):");
        for f in b.top_self.iter().take(5) {
            let _ = writeln!(
                o,
                "    {:5.1}%  {:>10}  {}",
                f.share * 100.0,
                f.value,
                f.function
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_formatting() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn page_fault_fields_read_under_their_old_names() {
        let old = r#"{"mode":"growth","fault_period":4,"faults":{"faults":9,"unwound":3,"stacks_lost":0,"lost_map_full":1}}"#;
        let m: MemorySummary = serde_json::from_str(old).unwrap();
        assert_eq!(m.page_fault_period, Some(4));
        let f = m.page_faults.unwrap();
        assert_eq!((f.faults, f.unwound, f.lost_map_full), (9, 3, 1));
        let new = serde_json::to_string(&MemorySummary::default()).unwrap();
        assert!(
            new.contains("page_faults") && !new.contains("\"faults\""),
            "{new}"
        );
    }
}
