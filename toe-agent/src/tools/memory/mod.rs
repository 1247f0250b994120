//! memory-profile: allocations through uprobes on the target's allocator (heap profile), page
//! faults behind memory growth (growth profile), and RSS per process and cgroup over time.

pub mod allocator;
pub mod collector;
pub mod copied;
pub mod profile;
pub mod rss;

use std::time::Duration;

use bytes::Bytes;
use toe_artifacts::{
    bytes, folded, names, pprof,
    summary::{
        self,
        memory::{HeapTotals, MemorySummary},
    },
};
use toe_common::api::{AllocationMode, MemoryProfileOptions};

use self::{
    allocator::Allocator,
    collector::{MemCounters, MemoryCollector},
    rss::{RssSampler, RssThread},
};
use super::{Artifact, Attach, Finish, Finished, MapSizes, Prepare, Tick, Tool, ToolRun};
use crate::{
    run::{RunError, flamegraph},
    symbolize::{RawKey, Symbolizer},
    targets::{self, ResolvedTarget, TargetSpec},
};

pub struct Memory {
    opts: MemoryProfileOptions,
}

impl Memory {
    #[must_use]
    pub fn new(opts: MemoryProfileOptions) -> Self {
        Self { opts }
    }
}

impl Tool for Memory {
    fn map_sizes(&self, _cpus: u32) -> MapSizes {
        use toe_common::memory;
        vec![
            (memory::STACKS_MAP, memory::MAX_STACKS),
            (memory::INFLIGHT_MAP, memory::MAX_INFLIGHT),
            (memory::SITES_MAP, memory::MAX_SITES),
            (memory::FAULTS_MAP, memory::MAX_SITES),
            (memory::LIVE_MAP, self.opts.max_tracked),
            (
                memory::ALLOCS_RING,
                if (self.opts.allocations != AllocationMode::Off || self.opts.faults)
                    && self.opts.unwind_tables
                {
                    memory::ALLOCS_RING_BYTES
                } else {
                    4096
                },
            ),
        ]
    }

    fn prepare(&mut self, cx: &Prepare<'_>) -> Result<(), RunError> {
        if self.opts.allocations != AllocationMode::Off {
            check_allocator(cx.spec, cx.target)?;
        }
        Ok(())
    }

    fn attach(self: Box<Self>, cx: &mut Attach<'_>) -> Result<Box<dyn ToolRun>, RunError> {
        let mut collector = MemoryCollector::attach(cx.loaded, &self.opts, cx.images)?;
        // Attached before a held command is released, so its first allocation is seen.
        let pids = collector.discover(cx.loaded, &cx.target.cgroups)?;
        if let Some(pid) = cx.held_pid {
            collector.attached_before_start(pid);
        }
        let rss = RssThread::spawn(
            self.opts.rss_interval,
            pids.clone(),
            cx.target.cgroups.clone(),
        );
        Ok(Box::new(MemoryRun {
            opts: self.opts,
            collector,
            rss,
            pids,
            ticks: 0,
        }))
    }
}

/// A `--pid` memory target whose allocations cannot be tracked is refused before anything is
/// loaded: the user asked for allocations and would get none. (Cgroup targets and commands are
/// checked per process as they appear and reported in the summary instead.)
fn check_allocator(spec: &TargetSpec, target: &ResolvedTarget) -> Result<(), RunError> {
    let TargetSpec::Pid(pid) = spec else {
        return Ok(());
    };
    let mut reasons = Vec::new();
    for p in std::iter::once(*pid).chain(targets::descendants(&target.tgids)) {
        // A process that has just exec'd gets up to 2 s for its loader to map libc.
        let mut found = allocator::detect(p);
        for _ in 0..200 {
            if !matches!(found, Ok(Allocator::Loading)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            found = allocator::detect(p);
        }
        match found {
            Ok(Allocator::Glibc { .. }) => return Ok(()),
            Ok(Allocator::Unsupported(why)) => reasons.push(format!(
                "pid {p} ({}): {why}",
                targets::process_name(p).unwrap_or_default()
            )),
            Ok(Allocator::Loading) => reasons.push(format!(
                "pid {p} ({}): its dynamic loader did not map libc within 2 s",
                targets::process_name(p).unwrap_or_default()
            )),
            Err(e) => reasons.push(format!("pid {p}: reading its mappings: {e}")),
        }
    }
    Err(RunError::Unsupported(format!(
        "allocation tracking cannot see this target's allocations: {}; use --mode=growth (page \
         faults and RSS work for any language and allocator)",
        reasons.join("; ")
    )))
}

struct MemoryRun {
    opts: MemoryProfileOptions,
    collector: MemoryCollector,
    rss: RssThread,
    /// Target processes seen at the last discovery.
    pids: Vec<u32>,
    ticks: u64,
}

impl MemoryRun {
    fn discover(&mut self, cx: &mut Tick<'_>) -> Result<(), RunError> {
        self.pids = self.collector.discover(cx.loaded, &cx.target.cgroups)?;
        self.rss.set_pids(&self.pids);
        Ok(())
    }
}

impl ToolRun for MemoryRun {
    fn fast_tick(&mut self, cx: &mut Tick<'_>) -> Result<(), RunError> {
        // New processes are looked for every other tick (50 ms): the delay between a fork and
        // its probes is reported per process. Without allocator probes, discovery only feeds
        // RSS: every 250 ms is enough.
        self.ticks += 1;
        let every = if self.opts.allocations == AllocationMode::Off {
            10
        } else {
            2
        };
        if self.ticks.is_multiple_of(every) {
            self.discover(cx)?;
        }
        Ok(())
    }

    fn slow_tick(&mut self, cx: &mut Tick<'_>) {
        cx.symbolizer.resolve(&self.collector.take_new());
    }

    fn progress(&self) -> String {
        let c = self.collector.counters();
        format!(
            "{} processes, {} allocations tracked, {} page faults",
            self.pids.len(),
            c.get(toe_common::memory::Counter::Tracked),
            c.get(toe_common::memory::Counter::Faults)
        )
    }

    fn before_detach(&mut self, cx: &mut Tick<'_>) -> Result<(), RunError> {
        // The last discovery: processes that appeared since the last tick get their RSS read.
        self.discover(cx)
    }

    fn finish(self: Box<Self>, cx: &mut Finish<'_>) -> Result<Finished, RunError> {
        let Self {
            opts,
            collector,
            rss,
            ..
        } = *self;
        finish(opts, collector, &rss.finish(), cx)
    }
}

/// What was and was not tracked, in words, so an empty profile is never mistaken for "no leaks".
fn coverage(opts: &MemoryProfileOptions, m: &MemorySummary) -> Vec<String> {
    let mut out = Vec::new();
    if opts.allocations == AllocationMode::Off {
        out.push("allocations: not tracked (mode growth); page faults and RSS only".into());
    } else {
        let tracked = m.processes.iter().filter(|p| p.tracked).count();
        let untracked: Vec<String> = m
            .processes
            .iter()
            .filter(|p| !p.tracked)
            .map(|p| format!("{} ({})", p.name, p.pid))
            .collect();
        if tracked == 0 {
            out.push(
                "allocations: NOT TRACKED in any target process (no supported allocator); the \
                 heap profile is empty because nothing was observed, not because nothing leaked"
                    .into(),
            );
        } else {
            out.push(format!(
                "allocations: glibc malloc family (malloc, calloc, realloc, reallocarray, free, \
                 posix_memalign, aligned_alloc, memalign, valloc, pvalloc) probed in {tracked} \
                 process(es); memory the application maps itself (mmap) and allocators other \
                 than glibc's are not allocations here but show in page faults and RSS"
            ));
        }
        if !untracked.is_empty() {
            out.push(format!(
                "allocations not tracked in: {} (reasons per process above)",
                untracked.join(", ")
            ));
        }
        if opts.min_size > 0 {
            out.push(format!(
                "allocations below {} are counted, not tracked",
                bytes(opts.min_size)
            ));
        }
    }
    if opts.faults {
        out.push("page faults: every user page fault in the target, filtered in the kernel".into());
    }
    out
}

/// The heap profile's artifacts and summary parts.
fn heap_artifacts(
    m: &mut MemorySummary,
    out: &mut Finished,
    symbolizer: &mut Symbolizer,
    sites: &[(RawKey, toe_common::memory::SiteStats)],
    counters: &MemCounters,
    (span, title): ((u64, u64), &str),
) -> Result<(), RunError> {
    let rate = m.sample_bytes.unwrap_or(0);
    let heap = profile::heap_profile(symbolizer, sites, rate, span);
    let totals = HeapTotals::of(&heap);
    let subtitle = format!(
        "{} in use at the end of the run{}",
        bytes(totals.inuse_bytes),
        if rate > 0 {
            " (estimated from sampling)"
        } else {
            ""
        }
    );
    out.artifacts.extend([
        (
            names::INUSE_FLAMEGRAPH,
            flamegraph(
                &heap,
                profile::INUSE_SPACE,
                &format!("{title} — in-use bytes"),
                &subtitle,
                "bytes",
            )?,
        ),
        (
            names::ALLOC_FLAMEGRAPH,
            flamegraph(
                &heap,
                profile::ALLOC_SPACE,
                &format!("{title} — allocated bytes"),
                &format!("{} allocated during the run", bytes(totals.alloc_bytes)),
                "bytes",
            )?,
        ),
        (names::HEAP_PPROF, Bytes::from(pprof::encode(&heap))),
        (
            names::INUSE_FOLDED,
            Bytes::from(folded::encode(&heap, profile::INUSE_SPACE)),
        ),
        (
            names::ALLOC_FOLDED,
            Bytes::from(folded::encode(&heap, profile::ALLOC_SPACE)),
        ),
    ]);
    m.inuse = Some(summary::analyse(&heap));
    m.heap = Some(totals);
    let acc = profile::allocation_accounting(counters);
    if acc.free_events_lost > 0 {
        out.warnings.push(format!(
            "{} frees lost (the kernel's ring was full): their blocks stay in use in the heap \
             profile",
            acc.free_events_lost
        ));
    }
    if acc.lost_live_map_full + acc.lost_sites_map_full + acc.lost_call_table_full > 0 {
        out.warnings.push(format!(
            "allocations lost: {} (live map full: raise --max-tracked), {} (site map full), {} \
             (call table full)",
            acc.lost_live_map_full, acc.lost_sites_map_full, acc.lost_call_table_full
        ));
    }
    m.allocations = Some(acc);
    Ok(())
}

fn finish(
    opts: MemoryProfileOptions,
    mut collector: MemoryCollector,
    rss: &RssSampler,
    cx: &mut Finish<'_>,
) -> Result<Finished, RunError> {
    let (sites, new) = collector.finish();
    cx.symbolizer.resolve(&new);
    let counters = collector.counters();
    let mut m = MemorySummary {
        unwind: collector.unwind(),
        fault_unwind: collector.fault_unwind(),
        mode: match opts.allocations {
            AllocationMode::Exact => "exact",
            AllocationMode::Sampled => "sampled",
            AllocationMode::Off => "growth",
        }
        .into(),
        sample_bytes: (opts.allocations == AllocationMode::Sampled).then_some(opts.sample_bytes),
        min_size: opts.min_size,
        page_fault_period: opts.faults.then_some(opts.fault_period),
        processes: collector.processes(),
        rss: rss.summary(),
        ..MemorySummary::default()
    };
    m.coverage = coverage(&opts, &m);
    let mut out = Finished::default();
    out.warnings.extend(collector.fallback.take());
    if sites.stacks_unverified > 0 {
        out.warnings.push(format!(
            "{} call sites shown without a stack: their stored frames failed verification",
            sites.stacks_unverified
        ));
    }
    if opts.allocations != AllocationMode::Off {
        heap_artifacts(
            &mut m,
            &mut out,
            cx.symbolizer,
            &sites.allocations,
            &counters,
            (cx.span, cx.title),
        )?;
    }
    if opts.faults {
        let growth = profile::growth_profile(
            cx.symbolizer,
            &sites.faults,
            u64::from(opts.fault_period),
            cx.span,
        );
        let f = profile::page_fault_accounting(&counters);
        out.artifacts.extend([
            (
                names::GROWTH_FLAMEGRAPH,
                flamegraph(
                    &growth,
                    0,
                    &format!("{} — page faults (memory growth)", cx.title),
                    &format!("{} page faults in the target", f.faults),
                    "faults",
                )?,
            ),
            (names::GROWTH_PPROF, Bytes::from(pprof::encode(&growth))),
            (
                names::GROWTH_FOLDED,
                Bytes::from(folded::encode(&growth, 0)),
            ),
        ]);
        m.growth = Some(summary::analyse(&growth));
        m.page_faults = Some(f);
    }
    let series = rss.series();
    let rss_artifacts: [Artifact; 3] = [
        (names::RSS_CSV, Bytes::from(rss::csv(&series))),
        (
            names::RSS_JSON,
            Bytes::from(serde_json::to_vec_pretty(&series).expect("series serialize")),
        ),
        (
            names::RSS_CHART,
            Bytes::from(rss::svg(&series, &format!("{} — RSS", cx.title))),
        ),
    ];
    out.artifacts.extend(rss_artifacts);
    out.memory = Some(m);
    out.lanes.push(toe_artifacts::rss::timeline_lane(&series));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use toe_artifacts::summary::memory::ProcessTracking;

    use super::*;

    fn opts(mode: &str) -> MemoryProfileOptions {
        let Some(toe_common::api::ToolOptions::MemoryProfile(o)) =
            toe_common::api::default_options("memory-profile")
        else {
            panic!("memory-profile has default options")
        };
        MemoryProfileOptions {
            allocations: match mode {
                "growth" => AllocationMode::Off,
                "exact" => AllocationMode::Exact,
                _ => AllocationMode::Sampled,
            },
            ..o
        }
    }

    fn process(pid: u32, tracked: bool) -> ProcessTracking {
        ProcessTracking {
            pid,
            name: format!("p{pid}"),
            tracked,
            allocator: String::new(),
            attached_after_ms: None,
        }
    }

    #[test]
    fn an_untracked_target_never_reads_as_no_leaks() {
        let m = MemorySummary {
            processes: vec![process(1, false)],
            ..MemorySummary::default()
        };
        let c = coverage(&opts("sampled"), &m);
        assert!(c[0].contains("NOT TRACKED"), "{c:?}");
        assert!(c.iter().any(|l| l.contains("p1 (1)")), "{c:?}");
    }

    #[test]
    fn coverage_names_what_each_mode_sees() {
        let m = MemorySummary {
            processes: vec![process(1, true), process(2, false)],
            ..MemorySummary::default()
        };
        let c = coverage(&opts("exact"), &m);
        assert!(c[0].contains("probed in 1 process"), "{c:?}");
        assert!(
            c.iter().any(|l| l.contains("not tracked in: p2 (2)")),
            "{c:?}"
        );
        let g = coverage(&opts("growth"), &m);
        assert!(g[0].contains("not tracked (mode growth)"), "{g:?}");
        assert!(g.iter().any(|l| l.starts_with("page faults")), "{g:?}");
    }
}
