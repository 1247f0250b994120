//! Memory profiles: the heap profile (Go's four sample types, scaled back up in sampled mode) and
//! the growth profile (page faults per stack), and the kernel counters as the summary's account
//! of every allocation, free and page fault.

use toe_artifacts::{
    profile::{Profile, ValueType},
    summary::memory::{AllocationAccounting, PageFaultAccounting},
};
use toe_common::memory::{Counter, SiteStats};

use super::collector::MemCounters;
use crate::symbolize::{RawKey, Symbolizer};

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

/// Every allocator call and free the kernel counted, by outcome.
#[must_use]
pub fn allocation_accounting(c: &MemCounters) -> AllocationAccounting {
    AllocationAccounting {
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
        copies_lost: c.get(Counter::CopiesLost),
        free_events_lost: c.get(Counter::FreeEventsLost),
    }
}

/// The page faults the kernel counted and unwound.
#[must_use]
pub fn page_fault_accounting(c: &MemCounters) -> PageFaultAccounting {
    PageFaultAccounting {
        faults: c.get(Counter::Faults),
        unwound: c.get(Counter::FaultsSampled),
        stacks_lost: c.get(Counter::FaultStackLost),
        lost_map_full: c.get(Counter::FaultsMapFull),
        copies_lost: c.get(Counter::FaultCopiesLost),
    }
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
}
