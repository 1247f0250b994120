//! Memory profiles and their summary: the heap profile (Go's four sample types, scaled back up in
//! sampled mode) and the growth profile (page faults per stack), plus the accounting of every
//! allocation and free the kernel saw.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use toe_common::memory::{Counter, SiteStats};

use super::{
    Profile, ValueType,
    summary::{Breakdown, render_breakdown},
};
use crate::{
    collectors::memory::{MemCounters, ProcessTracking},
    rss::RssSummary,
    symbolize::{RawKey, Symbolizer},
};

/// Index of `inuse_space` in the heap profile's sample types (Go's order).
pub const INUSE_SPACE: usize = 3;
pub const ALLOC_SPACE: usize = 1;

/// Scales a sampled (count, bytes) pair back to an estimate of the true totals, as pprof does
/// for Go heap profiles: with byte-sampling at mean `rate`, an allocation of `s` bytes is picked
/// with probability `1 - exp(-s/rate)`; the average size of the site stands in for `s`.
#[must_use]
#[expect(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "estimates; counts and sizes far below 2^52"
)]
pub fn scale(count: u64, bytes: u64, rate: u64) -> (u64, u64) {
    if rate == 0 || count == 0 {
        return (count, bytes);
    }
    let avg = bytes as f64 / count as f64;
    let p = 1.0 - (-avg / rate as f64).exp();
    if p <= 0.0 {
        return (count, bytes);
    }
    (
        (count as f64 / p).round() as u64,
        (bytes as f64 / p).round() as u64,
    )
}

/// Heap profile values per site: alloc_objects, alloc_space, inuse_objects, inuse_space.
#[must_use]
pub fn heap_values(s: &SiteStats, rate: u64) -> Vec<u64> {
    let (ao, ab) = scale(s.alloc_objects, s.alloc_bytes, rate);
    let inuse_objects = s.alloc_objects.saturating_sub(s.free_objects);
    let inuse_bytes = s.alloc_bytes.saturating_sub(s.free_bytes);
    let (io, ib) = scale(inuse_objects, inuse_bytes, rate);
    vec![ao, ab, io, ib]
}

fn meta(profile: &mut Profile, start_unix_ns: u64, duration_ns: u64) {
    profile.start_unix_ns = start_unix_ns;
    profile.duration_ns = duration_ns;
}

/// The heap profile (in-use and allocated) from per-site totals.
pub fn heap_profile(
    symbolizer: &mut Symbolizer,
    sites: &[(RawKey, SiteStats)],
    rate: u64,
    span: (u64, u64),
) -> Profile {
    let stacks = symbolizer.stacks(sites.iter().map(|(k, s)| (k, heap_values(s, rate))));
    let mut p = Profile {
        frames: symbolizer.frames(),
        stacks,
        sample_types: vec![
            ValueType::new("alloc_objects", "count"),
            ValueType::new("alloc_space", "bytes"),
            ValueType::new("inuse_objects", "count"),
            ValueType::new("inuse_space", "bytes"),
        ],
        default_type: INUSE_SPACE,
        period: (rate > 0).then(|| (ValueType::new("space", "bytes"), rate)),
        comment: if rate > 0 {
            format!("toe memory-profile, allocations sampled every {rate} bytes on average, scaled")
        } else {
            "toe memory-profile, every allocation tracked".into()
        },
        ..Profile::default()
    };
    meta(&mut p, span.0, span.1);
    p
}

/// The growth profile: page faults per stack, each unwound fault standing for `period`.
pub fn growth_profile(
    symbolizer: &mut Symbolizer,
    faults: &[(RawKey, u64)],
    period: u64,
    span: (u64, u64),
) -> Profile {
    let stacks = symbolizer.stacks(faults.iter().map(|(k, n)| (k, vec![n * period.max(1)])));
    let mut p = Profile {
        frames: symbolizer.frames(),
        stacks,
        sample_types: vec![ValueType::new("page_faults", "count")],
        default_type: 0,
        period: (period > 1).then(|| (ValueType::new("page_faults", "count"), period)),
        comment: format!("toe memory-profile growth: user page faults, every {period} unwound"),
        ..Profile::default()
    };
    meta(&mut p, span.0, span.1);
    p
}

/// Every allocator call and free of the target, by outcome.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
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
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FaultAccounting {
    pub faults: u64,
    pub unwound: u64,
    pub stacks_lost: u64,
    pub lost_map_full: u64,
}

impl AllocationAccounting {
    #[must_use]
    pub fn from_counters(c: &MemCounters) -> Self {
        Self {
            calls: c.get(Counter::AllocCalls),
            bytes_requested: c.get(Counter::AllocBytes),
            tracked: c.get(Counter::Tracked),
            below_min_size: c.get(Counter::BelowMinSize),
            not_sampled: c.get(Counter::NotSampled),
            failed: c.get(Counter::Failed),
            nested_calls: c.get(Counter::Nested),
            lost_live_map_full: c.get(Counter::LiveMapFull),
            lost_sites_map_full: c.get(Counter::SitesMapFull),
            lost_call_table_full: c.get(Counter::InflightFull),
            stacks_lost: c.get(Counter::StackLost),
            frees_matched: c.get(Counter::FreesMatched),
            frees_untracked: c.get(Counter::FreesUnknown),
            frees_null: c.get(Counter::FreeNull),
            reused_without_free: c.get(Counter::Reused),
        }
    }
}

impl FaultAccounting {
    #[must_use]
    pub fn from_counters(c: &MemCounters) -> Self {
        Self {
            faults: c.get(Counter::Faults),
            unwound: c.get(Counter::FaultsSampled),
            stacks_lost: c.get(Counter::FaultStackLost),
            lost_map_full: c.get(Counter::FaultsMapFull),
        }
    }
}

/// Totals of the heap profile (scaled estimates in sampled mode).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
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
pub struct MemorySummary {
    /// exact, sampled or growth.
    pub mode: String,
    /// Mean bytes between sampled allocations (sampled mode).
    pub sample_bytes: Option<u64>,
    pub min_size: u64,
    pub fault_period: Option<u32>,
    pub processes: Vec<ProcessTracking>,
    /// What was and was not tracked, in words.
    pub coverage: Vec<String>,
    pub allocations: Option<AllocationAccounting>,
    pub heap: Option<HeapTotals>,
    /// Where in-use bytes sit (leaf = the function that called the allocator).
    pub inuse: Option<Breakdown>,
    pub faults: Option<FaultAccounting>,
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
    }
    if let Some(b) = &m.inuse {
        render_breakdown(o, b, "in-use bytes", &bytes);
    }
    if let Some(f) = &m.faults {
        let _ = writeln!(
            o,
            "  page faults: {} in targets, {} unwound, {} stacks lost, {} lost (map full)",
            f.faults, f.unwound, f.stacks_lost, f.lost_map_full
        );
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
    crate::rss::render(o, &m.rss);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_mode_is_not_scaled_and_inuse_is_alloc_minus_free() {
        let s = SiteStats {
            alloc_objects: 10,
            alloc_bytes: 1000,
            free_objects: 4,
            free_bytes: 400,
        };
        assert_eq!(heap_values(&s, 0), vec![10, 1000, 6, 600]);
    }

    #[test]
    fn sampled_scaling_inverts_the_pick_probability() {
        // 1 MiB objects at a 64 KiB rate are always picked: no scaling.
        assert_eq!(scale(3, 3 << 20, 64 << 10), (3, 3 << 20));
        // 1 KiB objects at 64 KiB: p = 1 - e^(-1/64) ~ 1/64.5.
        let (n, b) = scale(100, 100 << 10, 64 << 10);
        assert!((6400..6500).contains(&n), "{n}");
        assert_eq!(b / n, 1024);
    }

    #[test]
    fn byte_formatting() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }
}
