//! offcpu-profile: where the target's threads wait off CPU, per stack and reason, measured in the
//! kernel; with `--wall`, on-CPU samples and off-CPU time in one wall-clock profile.

pub mod before;
pub mod collector;
pub mod perf;

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use toe_artifacts::{
    folded, names, pprof,
    profile::{Frame, FrameId, Profile, Stack, ValueType},
    summary::{
        self,
        offcpu::{
            OffcpuSummary, ReasonTime, SwitchAccounting, Throttling, WallSummary, reason_frame,
            top_waits, user_view,
        },
        share,
    },
    timeline,
};
use toe_common::{
    api::{CpuProfileOptions, OffcpuProfileOptions},
    offcpu::{self as kernel, Counter, REASON_COUNT, Reason},
};

use self::collector::{OffCounters, OffcpuCollector, OpenWaits, monotonic_ns};
use super::{
    Attach, Finish, Finished, MapSizes, Prepare, Tick, Tool, ToolRun,
    cpu::collector::{CpuCollector, RawProfile},
    faults::cgroups::TargetCgroups,
};
use crate::{
    run::{RunError, flamegraph},
    symbolize::{RawKey, Symbolizer},
    targets::ResolvedTarget,
};

/// Slow ticks between two reads of the kernel's totals once the table is large: each read walks
/// the whole table (two system calls per entry). A small table is read every slow tick, so the
/// stacks of short-lived processes are symbolized while they still exist.
const SCAN_EVERY: u32 = 4;
const SMALL_TABLE: usize = 2048;

pub struct Offcpu {
    opts: OffcpuProfileOptions,
    cgroups: Vec<TargetCgroups>,
    target: ResolvedTarget,
}

impl Offcpu {
    #[must_use]
    pub fn new(opts: OffcpuProfileOptions) -> Self {
        Self {
            opts,
            cgroups: Vec::new(),
            target: ResolvedTarget::default(),
        }
    }

    fn cpu_options(&self) -> CpuProfileOptions {
        CpuProfileOptions {
            frequency_hz: self.opts.frequency_hz,
            kernel_stacks: self.opts.kernel_stacks,
            user_stacks: self.opts.user_stacks,
            // Off-CPU stacks are walked by frame pointer in the kernel: on-CPU stacks walked
            // the same way keep one wall-clock flamegraph consistent.
            unwind_tables: false,
            jit_names: self.opts.jit_names,
        }
    }
}

/// One throttling snapshot per target cgroup that has the cpu controller.
type ThrottleSnapshot = Vec<(std::path::PathBuf, Option<u64>, u64, u64, u64)>;

fn throttling(cgroups: &[TargetCgroups]) -> ThrottleSnapshot {
    cgroups
        .iter()
        .filter(|c| !c.is_root("cpu"))
        .filter_map(TargetCgroups::cpu_throttling)
        .collect()
}

impl Tool for Offcpu {
    fn map_sizes(&self, cpus: u32) -> MapSizes {
        let mut sizes = vec![
            (kernel::WAITS_MAP, self.opts.max_waits),
            (kernel::STACKS_MAP, kernel::MAX_STACKS),
            (kernel::STARTS_MAP, kernel::MAX_THREADS),
        ];
        if self.opts.wall {
            sizes.push((
                toe_common::cpu::SAMPLES_RING,
                toe_common::cpu::ring_bytes(cpus, self.opts.frequency_hz),
            ));
        }
        sizes
    }

    fn prepare(&mut self, cx: &Prepare<'_>) -> Result<(), RunError> {
        // The cgroups whose CPU quota can starve the target: read before and after, so the
        // runnable time can be set against the throttling that explains it.
        self.cgroups = if cx.target.cgroups.is_empty() {
            cx.target
                .tgids
                .iter()
                .filter_map(|&p| TargetCgroups::of_pid(p).ok())
                .collect()
        } else {
            cx.target
                .cgroups
                .iter()
                .filter_map(|c| TargetCgroups::of_v2_dir(&c.path).ok())
                .collect()
        };
        self.cgroups.dedup();
        self.target = cx.target.clone();
        Ok(())
    }

    fn attach(self: Box<Self>, cx: &mut Attach<'_>) -> Result<Box<dyn ToolRun>, RunError> {
        let sampler = if self.opts.wall {
            Some(CpuCollector::attach(
                cx.loaded,
                &self.cpu_options(),
                cx.images,
            )?)
        } else {
            None
        };
        let tgids = cx.loaded.tgids()?;
        let collector = OffcpuCollector::attach(cx.loaded, &self.opts, cx.target, &tgids)?;
        Ok(Box::new(OffcpuRun {
            throttled_before: throttling(&self.cgroups),
            opts: self.opts,
            cgroups: self.cgroups,
            target: self.target,
            collector,
            sampler,
            on_cpu: RawProfile::default(),
            ticks: 0,
            by_reason: Vec::new(),
            recorded_ns: 0,
            stopped_ns: None,
        }))
    }
}

struct OffcpuRun {
    opts: OffcpuProfileOptions,
    cgroups: Vec<TargetCgroups>,
    target: ResolvedTarget,
    throttled_before: ThrottleSnapshot,
    collector: OffcpuCollector,
    /// The on-CPU sampler of `--wall`.
    sampler: Option<CpuCollector>,
    on_cpu: RawProfile,
    ticks: u32,
    /// Recorded off-CPU ns so far per reason, at each scan (ms since the start).
    by_reason: Vec<(f64, [u64; REASON_COUNT])>,
    recorded_ns: u64,
    /// The kernel clock when recording stopped: waits still open end there.
    stopped_ns: Option<u64>,
}

impl OffcpuRun {
    fn scan(&mut self, symbolizer: &mut Symbolizer, elapsed_ms: f64) {
        let (totals, new) = self.collector.totals();
        if !new.is_empty() {
            symbolizer.resolve(&new);
        }
        let mut sums = [0u64; REASON_COUNT];
        for (k, _, v) in &totals {
            if let Some(slot) = sums.get_mut(k.reason as usize) {
                *slot += v.ns;
            }
        }
        self.recorded_ns = sums.iter().sum();
        self.by_reason.push((elapsed_ms, sums));
    }
}

impl ToolRun for OffcpuRun {
    fn fast_tick(&mut self, cx: &mut Tick<'_>) -> Result<(), RunError> {
        if let Some(s) = &mut self.sampler {
            s.drain(&mut self.on_cpu);
            let new = self.on_cpu.take_new();
            if !new.is_empty() {
                cx.symbolizer.resolve(&new);
            }
        }
        Ok(())
    }

    /// Off-CPU time is summed in the kernel and read by the slow tick; only `--wall`'s on-CPU
    /// samples arrive through a ring.
    fn needs_fast_tick(&self) -> bool {
        self.sampler.is_some()
    }

    fn slow_tick(&mut self, cx: &mut Tick<'_>) {
        self.ticks += 1;
        if self.collector.known() < SMALL_TABLE || self.ticks.is_multiple_of(SCAN_EVERY) {
            self.scan(cx.symbolizer, cx.elapsed_ms);
        }
    }

    fn progress(&self) -> String {
        #[expect(clippy::cast_precision_loss, reason = "for display")]
        let secs = self.recorded_ns as f64 / 1e9;
        format!("{secs:.1}s off CPU")
    }

    fn before_detach(&mut self, cx: &mut Tick<'_>) -> Result<(), RunError> {
        // The last totals while the programs still run and the processes still live, so new
        // stacks are symbolized before the processes can go.
        self.stopped_ns = Some(monotonic_ns());
        self.collector.stop();
        self.scan(cx.symbolizer, cx.elapsed_ms);
        Ok(())
    }

    fn finish(mut self: Box<Self>, cx: &mut Finish<'_>) -> Result<Finished, RunError> {
        let symbolizer = &mut *cx.symbolizer;
        let (totals, open, counters) = self.read_kernel(symbolizer);
        let waits = per_reason(totals, &open);
        let period = 1_000_000_000 / self.opts.frequency_hz.max(1);
        let (mut frames, mut off_stacks, mut reasons, on_stacks) = symbolized(
            symbolizer,
            &waits,
            self.sampler.as_ref().map(|_| (&self.on_cpu, period)),
        );
        let sleepers = before::sleepers(&self.target, &open.seen);
        add_sleepers(
            &mut frames,
            &mut off_stacks,
            &mut reasons,
            &sleepers,
            cx.span.1,
        );
        let off_ns = ValueType::new("off_cpu", "nanoseconds");
        let profile = Profile {
            frames: frames.clone(),
            stacks: off_stacks.clone(),
            sample_types: vec![off_ns.clone(), ValueType::new("waits", "count")],
            default_type: 0,
            period: None,
            start_unix_ns: cx.span.0,
            duration_ns: cx.span.1,
            comment: "toe offcpu-profile".into(),
        };
        let off_cpu_ns = profile.total(0);
        let mut accounting = switch_accounting(counters, &open, self.collector.stacks_unverified);
        accounting.asleep_whole_run = sleepers.len() as u64;
        let on_cpu_ns = counters.get(Counter::OnCpuNs) + open.on_cpu_ns;
        let thread_ns = on_cpu_ns + off_cpu_ns + accounting.short_ns + accounting.long_ns;
        let reasons = reasons
            .into_iter()
            .map(|(r, ns, waits)| ReasonTime {
                reason: r.label().into(),
                ns,
                waits,
                share: share(ns, thread_ns),
            })
            .collect();
        let title = cx.title;
        let subtitle = format!(
            "{} s off CPU, {} waits",
            fmt_secs(off_cpu_ns),
            accounting.recorded + accounting.open_at_end
        );
        let mut artifacts = vec![
            (
                names::OFFCPU_FLAMEGRAPH,
                flamegraph(&profile, 0, title, &subtitle, "ns")?,
            ),
            (names::OFFCPU_PPROF, Bytes::from(pprof::encode(&profile))),
            (
                names::OFFCPU_FOLDED,
                Bytes::from(folded::encode(&profile, 0)),
            ),
        ];
        let wall = match on_stacks {
            Some(on) => {
                let (files, w) = self.wall(&frames, on, &off_stacks, off_cpu_ns, cx)?;
                artifacts.extend(files);
                Some(w)
            }
            None => None,
        };
        let warnings = warnings(off_cpu_ns, &accounting);
        let throttling = self.throttling_during();
        let summary = OffcpuSummary {
            mechanism: self.collector.mechanism.clone(),
            min_block_ns: u64::try_from(self.opts.min_block.as_nanos()).unwrap_or(u64::MAX),
            max_block_ns: self
                .opts
                .max_block
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            top_waits: top_waits(&profile, 0, 1, thread_ns, 10),
            breakdown: summary::analyse(&user_view(&profile)),
            switches: accounting,
            off_cpu_ns,
            on_cpu_ns,
            thread_ns,
            reasons,
            throttling,
            wall,
        };
        Ok(Finished {
            offcpu: Some(summary),
            artifacts,
            warnings,
            lanes: vec![self.lane()],
            ..Finished::default()
        })
    }
}

impl OffcpuRun {
    /// Everything the kernel side holds, its new stacks symbolized: the totals, the waits still
    /// open at the end of recording, the counters.
    fn read_kernel(&mut self, symbolizer: &mut Symbolizer) -> (Totals, OpenWaits, OffCounters) {
        let now = self.stopped_ns.unwrap_or_else(monotonic_ns);
        let (totals, new) = self.collector.totals();
        let open = self.collector.open_waits(now);
        let counters = self.collector.counters();
        symbolizer.resolve(&new);
        let open_new: Vec<RawKey> = open.waits.iter().map(|w| w.1.clone()).collect();
        symbolizer.resolve(&open_new);
        if let Some(s) = &mut self.sampler {
            s.drain_last(&mut self.on_cpu);
            symbolizer.resolve(&self.on_cpu.take_new());
        }
        (totals, open, counters)
    }

    /// The wall-clock profile's artifacts and summary.
    fn wall(
        &self,
        frames: &[Frame],
        on_stacks: Vec<Stack>,
        off_stacks: &[Stack],
        off_cpu_ns: u64,
        cx: &Finish<'_>,
    ) -> Result<(Vec<super::Artifact>, WallSummary), RunError> {
        let on_cpu = on_stacks.iter().map(|s| s.values[0]).sum();
        let wall = wall_profile(frames, on_stacks, off_stacks, cx.span);
        let subtitle = format!(
            "{} s on CPU ({} samples at {} Hz) + {} s off CPU",
            fmt_secs(on_cpu),
            self.on_cpu.received,
            self.opts.frequency_hz,
            fmt_secs(off_cpu_ns)
        );
        let files = vec![
            (
                names::WALL_FLAMEGRAPH,
                flamegraph(&wall, 0, cx.title, &subtitle, "ns")?,
            ),
            (names::WALL_PPROF, Bytes::from(pprof::encode(&wall))),
            (names::WALL_FOLDED, Bytes::from(folded::encode(&wall, 0))),
        ];
        let counters = self
            .sampler
            .as_ref()
            .map(CpuCollector::counters)
            .unwrap_or_default();
        Ok((
            files,
            WallSummary {
                frequency_hz: self.opts.frequency_hz,
                samples: super::cpu::accounting(&self.on_cpu, counters),
                on_cpu_ns: on_cpu,
                off_cpu_ns,
            },
        ))
    }

    /// Each target cgroup's quota, and how much it throttled since the run attached.
    fn throttling_during(&self) -> Vec<Throttling> {
        throttling(&self.cgroups)
            .into_iter()
            .map(|(dir, quota, period, periods, ns)| {
                let before = self.throttled_before.iter().find(|b| b.0 == dir);
                Throttling {
                    cgroup: dir.display().to_string(),
                    quota_us: quota,
                    period_us: period,
                    throttled_periods: periods.saturating_sub(before.map_or(0, |b| b.3)),
                    throttled_ns: ns.saturating_sub(before.map_or(0, |b| b.4)),
                }
            })
            .collect()
    }

    /// Threads off CPU on average, per reason, between scans.
    fn lane(&self) -> timeline::Lane {
        let series = Reason::ALL
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let cumulative: Vec<(f64, u64)> =
                    self.by_reason.iter().map(|(t, v)| (*t, v[i])).collect();
                timeline::Series {
                    name: r.label().into(),
                    points: timeline::rate_per_second(&cumulative)
                        .into_iter()
                        .map(|(t, ns_per_s)| (t, ns_per_s / 1e9))
                        .collect(),
                }
            })
            .filter(|s| s.points.iter().any(|p| p.1 > 0.0))
            .collect();
        timeline::Lane {
            name: "offcpu-profile: threads off CPU".into(),
            unit: "threads".into(),
            series,
            ..timeline::Lane::default()
        }
    }
}

type Totals = Vec<(kernel::WaitKey, RawKey, kernel::WaitStats)>;

/// Per reason, per raw stack: [ns, waits], the kernel's totals and the waits still open.
fn per_reason(totals: Totals, open: &OpenWaits) -> [HashMap<RawKey, [u64; 2]>; REASON_COUNT] {
    let mut waits: [HashMap<RawKey, [u64; 2]>; REASON_COUNT] = Default::default();
    for (k, raw, v) in totals {
        if let Some(m) = waits.get_mut(k.reason as usize) {
            let e = m.entry(raw).or_default();
            e[0] += v.ns;
            e[1] += v.count;
        }
    }
    for (k, raw, ns) in &open.waits {
        if let Some(m) = waits.get_mut(k.reason as usize) {
            let e = m.entry(raw.clone()).or_default();
            e[0] += ns;
            e[1] += 1;
        }
    }
    waits
}

/// Frames and stacks of the off-CPU profile (reason frames at the root) and of the on-CPU
/// samples of `--wall` (at `period` ns each), with each reason's time and waits. Every stack is
/// symbolized before the frame table is taken, so the reason frames go after every frame the
/// symbolizer interned.
#[expect(clippy::type_complexity, reason = "one private caller")]
fn symbolized(
    symbolizer: &mut Symbolizer,
    waits: &[HashMap<RawKey, [u64; 2]>; REASON_COUNT],
    on_cpu: Option<(&RawProfile, u64)>,
) -> (
    Vec<Frame>,
    Vec<Stack>,
    Vec<(Reason, u64, u64)>,
    Option<Vec<Stack>>,
) {
    let per_reason: Vec<Vec<Stack>> = waits
        .iter()
        .map(|m| symbolizer.stacks(m.iter().map(|(k, v)| (k, v.to_vec()))))
        .collect();
    let on_stacks = on_cpu.map(|(raw, period)| {
        symbolizer.stacks(raw.counts.iter().map(|(k, &c)| (k, vec![c * period])))
    });
    let mut frames = symbolizer.frames();
    let mut off_stacks = Vec::new();
    let mut reasons = Vec::new();
    for (reason, stacks) in Reason::ALL.iter().zip(per_reason) {
        let id = intern_reason(&mut frames, reason.label());
        let (ns, count) = stacks.iter().fold((0, 0), |(a, b), s| {
            (a + s.values[0], b + s.values.get(1).copied().unwrap_or(0))
        });
        reasons.push((*reason, ns, count));
        off_stacks.extend(stacks.into_iter().map(|mut s| {
            // The reason at the root: one flamegraph shows each kind of wait as one tower.
            s.frames.insert(0, id);
            s
        }));
    }
    off_stacks.sort_by(|a, b| b.values[0].cmp(&a.values[0]));
    (frames, off_stacks, reasons, on_stacks)
}

/// Threads asleep through the whole window go in with the window as their wait: the reason at
/// the root as for every wait, a frame saying the user stack was not read, then the kernel
/// functions procfs names.
fn add_sleepers(
    frames: &mut Vec<Frame>,
    stacks: &mut Vec<Stack>,
    reasons: &mut [(Reason, u64, u64)],
    sleepers: &[before::Sleeper],
    window_ns: u64,
) {
    let intern = |frames: &mut Vec<Frame>, function: String, kernel: bool| -> FrameId {
        let found = frames
            .iter()
            .position(|f| f.function == function && f.kernel == kernel && !f.inlined);
        let i = found.unwrap_or_else(|| {
            frames.push(Frame::named(function, kernel));
            frames.len() - 1
        });
        FrameId::try_from(i).expect("fewer than 2^32 frames")
    };
    for s in sleepers {
        let mut ids = vec![
            intern(frames, reason_frame(s.reason.label()), false),
            intern(
                frames,
                "[asleep since before the run: user stack not read]".into(),
                false,
            ),
        ];
        ids.extend(s.kernel.iter().map(|k| intern(frames, k.clone(), true)));
        stacks.push(Stack {
            pid: s.pid,
            process: s.process.clone(),
            thread: s.thread.clone(),
            frames: ids,
            values: vec![window_ns, 1],
        });
        if let Some(r) = reasons.iter_mut().find(|r| r.0 == s.reason) {
            r.1 += window_ns;
            r.2 += 1;
        }
    }
}

fn warnings(off_cpu_ns: u64, accounting: &SwitchAccounting) -> Vec<String> {
    let mut warnings = Vec::new();
    if off_cpu_ns == 0 {
        warnings.push(
            "no off-CPU time recorded: no target thread left a CPU and came back while \
             recording (or every wait was outside --min-block/--max-block)"
                .into(),
        );
    }
    if accounting.lost_totals_full > 0 {
        warnings.push(format!(
            "{} waits were lost because the table of per-stack totals was full: raise \
             --max-waits",
            accounting.lost_totals_full
        ));
    }
    warnings
}

fn intern_reason(frames: &mut Vec<Frame>, label: &str) -> FrameId {
    frames.push(Frame::named(reason_frame(label), false));
    FrameId::try_from(frames.len() - 1).expect("fewer than 2^32 frames")
}

fn fmt_secs(ns: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "for display")]
    let s = ns as f64 / 1e9;
    format!("{s:.2}")
}

/// Every switch-out of a target thread, by what became of it.
fn switch_accounting(c: OffCounters, open: &OpenWaits, unverified: u64) -> SwitchAccounting {
    SwitchAccounting {
        switches: c.get(Counter::Switches),
        recorded: c.get(Counter::Recorded) + open.ended,
        open_at_end: open.waits.len() as u64 - open.ended,
        short: c.get(Counter::Short) + open.short,
        short_ns: c.get(Counter::ShortNs) + open.short_ns,
        long: c.get(Counter::Long) + open.long,
        long_ns: c.get(Counter::LongNs) + open.long_ns,
        lost_thread_table_full: c.get(Counter::StartsFull),
        lost_totals_full: c.get(Counter::WaitsFull),
        lost_totals_full_ns: c.get(Counter::WaitsFullNs),
        user_stacks_lost: c.get(Counter::UserStackLost),
        kernel_stacks_lost: c.get(Counter::KernelStackLost),
        stacks_lost_map_full: c.get(Counter::StacksFull),
        stacks_unverified: unverified,
        threads_exited: c.get(Counter::Exited),
        unmatched: c.get(Counter::Unmatched) + open.gone,
        asleep_whole_run: 0,
    }
}

/// On-CPU samples (as time) and off-CPU time on one scale. The reason goes at the leaf here, not
/// the root: a function's running and waiting time then share one tower, and the leaf says
/// which part of it waited and why.
fn wall_profile(frames: &[Frame], on: Vec<Stack>, off: &[Stack], span: (u64, u64)) -> Profile {
    let mut merged: BTreeMap<(u32, String, Vec<FrameId>), (String, u64)> = BTreeMap::new();
    let off = off.iter().map(|s| {
        let mut f = s.frames.clone();
        let reason = f.remove(0);
        f.push(reason);
        Stack {
            frames: f,
            values: vec![s.values[0]],
            ..s.clone()
        }
    });
    for s in on.into_iter().chain(off) {
        let e = merged
            .entry((s.pid, s.thread.clone(), s.frames))
            .or_insert((s.process, 0));
        e.1 += s.values[0];
    }
    let mut stacks: Vec<Stack> = merged
        .into_iter()
        .map(|((pid, thread, frames), (process, v))| Stack {
            pid,
            process,
            thread,
            frames,
            values: vec![v],
        })
        .collect();
    stacks.sort_by(|a, b| b.values[0].cmp(&a.values[0]));
    Profile {
        frames: frames.to_vec(),
        stacks,
        sample_types: vec![ValueType::new("wall", "nanoseconds")],
        default_type: 0,
        period: None,
        start_unix_ns: span.0,
        duration_ns: span.1,
        comment: "toe offcpu-profile --wall: on-CPU samples and off-CPU time".into(),
    }
}
