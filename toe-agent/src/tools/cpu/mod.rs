//! cpu-profile: on-CPU stack samples of the target at a fixed frequency, filtered in the kernel,
//! written as a flamegraph, pprof and folded stacks.

pub mod collector;

use bytes::Bytes;
use toe_artifacts::{
    folded, names, pprof,
    profile::{Profile, ValueType},
    summary::{self, CpuSummary, SampleAccounting},
    timeline,
};
use toe_common::api::CpuProfileOptions;

use self::collector::{CpuCollector, CpuCounters, RawProfile};
use super::{Attach, Finish, Finished, MapSizes, Tick, Tool, ToolRun};
use crate::run::{RunError, flamegraph};

pub struct Cpu {
    opts: CpuProfileOptions,
}

impl Cpu {
    #[must_use]
    pub fn new(opts: CpuProfileOptions) -> Self {
        Self { opts }
    }
}

impl Tool for Cpu {
    fn map_sizes(&self, cpus: u32) -> MapSizes {
        vec![(
            toe_common::cpu::SAMPLES_RING,
            toe_common::cpu::ring_bytes(cpus, self.opts.frequency_hz),
        )]
    }

    fn attach(self: Box<Self>, cx: &mut Attach<'_>) -> Result<Box<dyn ToolRun>, RunError> {
        Ok(Box::new(CpuRun {
            opts: self.opts,
            collector: CpuCollector::attach(cx.loaded, &self.opts, cx.images)?,
            raw: RawProfile::default(),
            received: Vec::new(),
        }))
    }
}

struct CpuRun {
    opts: CpuProfileOptions,
    collector: CpuCollector,
    raw: RawProfile,
    /// Samples received so far, at each slow tick (ms since the start), for the run's shared
    /// timeline.
    received: Vec<(f64, u64)>,
}

impl ToolRun for CpuRun {
    fn fast_tick(&mut self, cx: &mut Tick<'_>) -> Result<(), RunError> {
        self.collector.drain(&mut self.raw);
        // New stacks are symbolized at once: a short-lived process (or one about to exec) may
        // be gone by the next slow tick.
        let new = self.raw.take_new();
        if !new.is_empty() {
            cx.symbolizer.resolve(&new);
        }
        Ok(())
    }

    fn slow_tick(&mut self, cx: &mut Tick<'_>) {
        cx.symbolizer.resolve(&self.raw.take_new());
        self.received.push((cx.elapsed_ms, self.raw.received));
    }

    fn progress(&self) -> String {
        format!(
            "{} samples, {} lost",
            self.raw.received,
            self.collector.counters().ring_full
        )
    }

    fn finish(mut self: Box<Self>, cx: &mut Finish<'_>) -> Result<Finished, RunError> {
        self.collector.drain_last(&mut self.raw);
        let counters = self.collector.counters();
        let symbolizer = &mut *cx.symbolizer;
        symbolizer.resolve(&self.raw.take_new());
        let opts = self.opts;
        let period = 1_000_000_000 / opts.frequency_hz.max(1);
        let stacks = symbolizer.stacks(
            self.raw
                .counts
                .iter()
                .map(|(k, &c)| (k, vec![c, c * period])),
        );
        let cpu_ns = ValueType::new("cpu", "nanoseconds");
        let profile = Profile {
            frames: symbolizer.frames(),
            stacks,
            sample_types: vec![ValueType::new("samples", "count"), cpu_ns.clone()],
            default_type: 0,
            period: Some((cpu_ns, period)),
            start_unix_ns: cx.span.0,
            duration_ns: cx.span.1,
            comment: format!("toe cpu-profile at {} Hz", opts.frequency_hz),
        };
        let breakdown = summary::analyse(&profile);
        let mut warnings: Vec<String> = self.collector.fallback.iter().cloned().collect();
        if breakdown.total == 0 {
            warnings.push(
                "no samples: the target did not run on a CPU while sampling (idle, or exited at \
                 once)"
                    .into(),
            );
        }
        let subtitle = format!(
            "{} samples at {} Hz",
            profile.total_default(),
            opts.frequency_hz
        );
        let artifacts = vec![
            (
                names::CPU_FLAMEGRAPH,
                flamegraph(&profile, 0, cx.title, &subtitle, "samples")?,
            ),
            (names::CPU_PPROF, Bytes::from(pprof::encode(&profile))),
            (names::CPU_FOLDED, Bytes::from(folded::encode(&profile, 0))),
        ];
        let cpu = CpuSummary {
            frequency_hz: opts.frequency_hz,
            cpus: self.collector.cpus.len(),
            samples: SampleAccounting {
                children_followed: cx.children.0,
                children_missed: cx.children.1,
                ..accounting(&self.raw, counters)
            },
            breakdown,
        };
        let lane = timeline::Lane {
            name: "cpu-profile: on-CPU samples".into(),
            unit: "samples/s".into(),
            series: vec![timeline::Series {
                name: "target on CPU".into(),
                points: timeline::rate_per_second(&self.received),
            }],
            ..timeline::Lane::default()
        };
        Ok(Finished {
            cpu: Some(cpu),
            artifacts,
            warnings,
            lanes: vec![lane],
            ..Finished::default()
        })
    }
}

/// Every sample the kernel took, by what became of it.
pub(crate) fn accounting(raw: &RawProfile, c: CpuCounters) -> SampleAccounting {
    SampleAccounting {
        taken: c.sampled,
        recorded: raw.received,
        lost_ring_full: c.ring_full,
        unaccounted: c.sampled.saturating_sub(raw.received + c.ring_full),
        kernel_stack_truncated: raw.kstack_truncated,
        user_stack_truncated: raw.ustack_truncated,
        kernel_stack_errors: raw.kstack_errors,
        user_stack_errors: raw.ustack_errors,
        children_followed: 0,
        children_missed: 0,
        unwind: crate::symbolize::user_stacks::with_table_readings(&raw.unwind),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_is_recorded_lost_or_unaccounted() {
        let mut raw = RawProfile::default();
        raw.received = 90;
        let c = CpuCounters {
            sampled: 100,
            ring_full: 7,
        };
        let a = accounting(&raw, c);
        assert_eq!((a.recorded, a.lost_ring_full, a.unaccounted), (90, 7, 3));
        // More received than taken (counters read a moment apart) never underflows.
        raw.received = 120;
        let a = accounting(&raw, c);
        assert_eq!(a.unaccounted, 0);
    }
}
