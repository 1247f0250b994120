//! Off-CPU collector, user side: checks the tracepoint layout, configures and attaches the
//! `sched_switch` program, and reads the kernel's per-stack totals (and the waits still open).

use std::{collections::HashMap, os::fd::AsFd as _};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{PerfEvent, RawTracePoint, TracePoint},
};
use toe_common::{
    api::OffcpuProfileOptions,
    offcpu::{
        CONFIG_KERNEL_STACKS, CONFIG_MAP, CONFIG_USER_STACKS, COUNTER_COUNT, COUNTERS_MAP, Counter,
        EXIT_PROGRAM, OffConfig, OffStart, PERF_PROGRAM, PROGRAM, RAW_PROGRAM, STACKS_MAP,
        STARTS_MAP, SWITCH_NEXT_PID, SWITCH_PREV_STATE, TaskOffsets, WAITS_MAP, WaitKey, WaitStats,
    },
    stacks::StoredStack,
};

use super::perf::SwitchEvents;
use crate::{
    btf::Btf,
    ebpf::{LoadError, Loaded},
    symbolize::RawKey,
    targets::ResolvedTarget,
    tracefs,
};

/// The record layout the kernel side reads.
const FIELDS: &[(&str, &str, &str, usize, usize)] = &[
    ("sched", "sched_switch", "prev_state", SWITCH_PREV_STATE, 8),
    ("sched", "sched_switch", "next_pid", SWITCH_NEXT_PID, 4),
];

/// Kernel counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCounters(pub [u64; COUNTER_COUNT as usize]);

impl OffCounters {
    #[must_use]
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> LoadError {
    move |source| LoadError::Map { name, source }
}

/// The kernel's monotonic clock, which `bpf_ktime_get_ns` reads.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Whether this kernel's raw `sched_switch` tracepoint passes `prev_state` (Linux 5.18+).
#[must_use]
pub fn raw_switch_has_state() -> bool {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    matches!((it.next(), it.next()), (Some(major), Some(minor)) if (major, minor) >= (5, 18))
}

/// Where the program reads a task's fields, from this kernel's BTF.
pub fn task_offsets() -> Result<TaskOffsets, String> {
    let btf = Btf::kernel()?;
    let task = |path: &[&str]| btf.offset("task_struct", path);
    Ok(TaskOffsets {
        state: task(&["__state"]).or_else(|_| task(&["state"]))?,
        runtime: task(&["se", "sum_exec_runtime"])?,
        nvcsw: task(&["nvcsw"])?,
        nivcsw: task(&["nivcsw"])?,
    })
}

/// Set (to anything) to trace every switch on the `sched_switch` tracepoint, as kernels that
/// cannot open the perf events do (for comparing the two).
pub const TRACEPOINT_ENV: &str = "TOE_OFFCPU_TRACEPOINT";

fn prog_err(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> LoadError {
    move |source| LoadError::Program { name, source }
}

pub struct OffcpuCollector {
    opts: OffcpuProfileOptions,
    /// How the switches are traced, for the summary.
    pub mechanism: String,
    /// The perf events the program runs on (with the perf-event mechanism).
    events: Option<SwitchEvents>,
    /// With the perf events: each thread's CPU time when recording stopped (see `stop`).
    runtimes: HashMap<u32, u64>,
    starts: BpfHashMap<MapData, u64, OffStart>,
    waits: BpfHashMap<MapData, WaitKey, WaitStats>,
    stacks: BpfHashMap<MapData, u64, StoredStack>,
    counters: PerCpuArray<MapData, u64>,
    /// Each kernel key with its stacks read, so a stack is read (and verified) once.
    keys: HashMap<WaitKey, RawKey>,
    pub stacks_unverified: u64,
}

impl OffcpuCollector {
    /// Configures and attaches: on the target's own context-switch perf events where this
    /// kernel's BTF gives the task fields the program reads and the events open, else the raw
    /// tracepoint where the kernel passes the state it needs, else the classic one after
    /// checking the record layout. Target maps must already be set; `tgids` are the target
    /// processes now.
    pub fn attach(
        loaded: &mut Loaded,
        opts: &OffcpuProfileOptions,
        target: &ResolvedTarget,
        tgids: &[u32],
    ) -> Result<Self, LoadError> {
        let offsets = if std::env::var_os(TRACEPOINT_ENV).is_some() {
            Err(format!("{TRACEPOINT_ENV} is set"))
        } else {
            task_offsets()
        };
        {
            let mut flags = 0;
            if opts.user_stacks {
                flags |= CONFIG_USER_STACKS;
            }
            if opts.kernel_stacks {
                flags |= CONFIG_KERNEL_STACKS;
            }
            let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            let mut config: Array<&mut MapData, OffConfig> =
                Array::try_from(loaded.map_mut(CONFIG_MAP)?).map_err(map_err(CONFIG_MAP))?;
            config
                .set(
                    0,
                    OffConfig {
                        flags,
                        reserved: 0,
                        min_block_ns: ns(opts.min_block),
                        max_block_ns: opts.max_block.map_or(0, ns),
                        task: offsets.clone().unwrap_or_default(),
                    },
                    0,
                )
                .map_err(map_err(CONFIG_MAP))?;
        }
        let take = |loaded: &mut Loaded, name| loaded.take_map(name);
        let starts =
            BpfHashMap::try_from(take(loaded, STARTS_MAP)?).map_err(map_err(STARTS_MAP))?;
        let waits = BpfHashMap::try_from(take(loaded, WAITS_MAP)?).map_err(map_err(WAITS_MAP))?;
        let stacks =
            BpfHashMap::try_from(take(loaded, STACKS_MAP)?).map_err(map_err(STACKS_MAP))?;
        let counters =
            PerCpuArray::try_from(take(loaded, COUNTERS_MAP)?).map_err(map_err(COUNTERS_MAP))?;
        let (mechanism, events) = match offsets
            .and_then(|_| Self::attach_events(loaded, target, tgids).map_err(|e| e.to_string()))
        {
            Ok(events) => (
                format!(
                    "context-switch perf events of the target ({} events; other switches run no \
                     program)",
                    events.len()
                ),
                Some(events),
            ),
            Err(why) => {
                tracing::info!(
                    "off-CPU: tracing every switch on sched_switch (the target's own perf \
                     events: {why})"
                );
                (Self::attach_tracepoint(loaded)?.to_owned(), None)
            }
        };
        Ok(Self {
            opts: *opts,
            mechanism,
            events,
            runtimes: HashMap::new(),
            starts,
            waits,
            stacks,
            counters,
            keys: HashMap::new(),
            stacks_unverified: 0,
        })
    }

    fn attach_events(
        loaded: &mut Loaded,
        target: &ResolvedTarget,
        tgids: &[u32],
    ) -> Result<SwitchEvents, LoadError> {
        let prog: &mut PerfEvent = loaded
            .program_mut(PERF_PROGRAM)?
            .try_into()
            .map_err(prog_err(PERF_PROGRAM))?;
        prog.load().map_err(prog_err(PERF_PROGRAM))?;
        let fd = prog.fd().map_err(prog_err(PERF_PROGRAM))?;
        let cpus = aya::util::online_cpus().map_err(|(_, e)| LoadError::PerfEvent(e))?;
        let events =
            SwitchEvents::attach(target, tgids, fd.as_fd(), &cpus).map_err(LoadError::PerfEvent)?;
        // Before the events start: no wait is left open by a thread's exit.
        let exit: &mut TracePoint = loaded
            .program_mut(EXIT_PROGRAM)?
            .try_into()
            .map_err(prog_err(EXIT_PROGRAM))?;
        exit.load().map_err(prog_err(EXIT_PROGRAM))?;
        exit.attach("sched", "sched_process_exit")
            .map_err(LoadError::Tracefs)?;
        events.enable().map_err(LoadError::PerfEvent)?;
        Ok(events)
    }

    fn attach_tracepoint(loaded: &mut Loaded) -> Result<&'static str, LoadError> {
        Ok(if raw_switch_has_state() {
            let prog: &mut RawTracePoint = loaded
                .program_mut(RAW_PROGRAM)?
                .try_into()
                .map_err(prog_err(RAW_PROGRAM))?;
            prog.load().map_err(prog_err(RAW_PROGRAM))?;
            prog.attach("sched_switch").map_err(prog_err(RAW_PROGRAM))?;
            "raw tracepoint sched_switch"
        } else {
            tracefs::check_fields(FIELDS).map_err(LoadError::Layout)?;
            let prog: &mut TracePoint = loaded
                .program_mut(PROGRAM)?
                .try_into()
                .map_err(prog_err(PROGRAM))?;
            prog.load().map_err(prog_err(PROGRAM))?;
            prog.attach("sched", "sched_switch")
                .map_err(LoadError::Tracefs)?;
            "tracepoint sched:sched_switch"
        })
    }

    #[must_use]
    pub fn counters(&self) -> OffCounters {
        let mut out = OffCounters::default();
        for (i, slot) in (0u32..).zip(out.0.iter_mut()) {
            *slot = self.counters.get(&i, 0).map_or(0, |v| v.iter().sum());
        }
        out
    }

    fn stack(&mut self, hash: u64) -> Box<[u64]> {
        if hash == 0 {
            return Box::default();
        }
        match self.stacks.get(&hash, 0) {
            Ok(st) => {
                if let Some(f) = st.verified(hash) {
                    f.into()
                } else {
                    self.stacks_unverified += 1;
                    Box::default()
                }
            }
            Err(_) => Box::default(),
        }
    }

    fn raw_key(&mut self, k: &WaitKey) -> (RawKey, bool) {
        if let Some(r) = self.keys.get(k) {
            return (r.clone(), false);
        }
        let r = RawKey {
            pid: k.tgid,
            thread: k.comm,
            kstack: self.stack(k.kstack),
            ustack: self.stack(k.ustack),
            // Taken where the thread called into the kernel and stopped: the user leaf is the
            // instruction after the system call, a return address.
            user_leaf_is_return: true,
        };
        self.keys.insert(*k, r.clone());
        (r, true)
    }

    /// Per-stack totals seen so far.
    #[must_use]
    pub fn known(&self) -> usize {
        self.keys.len()
    }

    /// Every per-stack total so far, and the keys first seen (to symbolize while their
    /// processes live).
    pub fn totals(&mut self) -> (Vec<(WaitKey, RawKey, WaitStats)>, Vec<RawKey>) {
        let entries: Vec<(WaitKey, WaitStats)> = self.waits.iter().filter_map(Result::ok).collect();
        let mut out = Vec::with_capacity(entries.len());
        let mut new = Vec::new();
        for (k, v) in entries {
            let (raw, fresh) = self.raw_key(&k);
            if fresh {
                new.push(raw.clone());
            }
            out.push((k, raw, v));
        }
        (out, new)
    }

    /// Recording stops now: with the perf events, which see no switch-in, the CPU time each
    /// thread with an open wait has used so far tells whether and when that wait ended.
    pub fn stop(&mut self) {
        if self.events.is_none() {
            return;
        }
        let tids: Vec<u32> = self
            .starts
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, s)| s.ts != 0)
            .map(|(_, s)| s.tid)
            .collect();
        self.runtimes = tids
            .into_iter()
            .filter_map(|tid| Some((tid, crate::targets::cpu_ns(tid)?)))
            .collect();
    }

    /// Waits still going at `now`, as totals of their time so far (within the bounds, as the
    /// kernel would have recorded them had they ended now), plus on-CPU stints still running.
    /// With the perf events, a wait whose thread came back since is closed here as the kernel
    /// would have closed it at the thread's next switch.
    pub fn open_waits(&mut self, now: u64) -> OpenWaits {
        let entries: Vec<(u64, OffStart)> = self.starts.iter().filter_map(Result::ok).collect();
        let min = u64::try_from(self.opts.min_block.as_nanos()).unwrap_or(u64::MAX);
        let max = self
            .opts
            .max_block
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let perf = self.events.is_some();
        let mut out = OpenWaits::default();
        for (_, s) in entries {
            out.seen.insert(s.tid);
            // A thread whose exit the kernel side did not see is neither waiting nor running.
            let runtime = self.runtimes.get(&s.tid).copied();
            if (perf && s.ts != 0 && runtime.is_none())
                || !std::path::Path::new(&format!("/proc/{}", s.tid)).exists()
            {
                out.gone += u64::from(s.ts != 0);
                continue;
            }
            if s.ts == 0 {
                if s.on_since != 0 && !perf {
                    out.on_cpu_ns += now.saturating_sub(s.on_since);
                }
                continue;
            }
            let ran = runtime.map_or(0, |r| r.saturating_sub(s.on_since));
            out.on_cpu_ns += ran;
            let waited = now.saturating_sub(s.ts).saturating_sub(ran);
            let ended = ran > 0;
            if waited < min {
                out.short += 1;
                out.short_ns += waited;
                continue;
            }
            if max.is_some_and(|m| waited > m) {
                out.long += 1;
                out.long_ns += waited;
                continue;
            }
            out.ended += u64::from(ended);
            let key = WaitKey::of(&s);
            let (raw, _) = self.raw_key(&key);
            out.waits.push((key, raw, waited));
        }
        out
    }
}

/// What [`OffcpuCollector::open_waits`] found.
#[derive(Default)]
pub struct OpenWaits {
    /// Waits still open, and (with the perf events) those that ended after the thread's last
    /// switch the kernel saw.
    pub waits: Vec<(WaitKey, RawKey, u64)>,
    /// Of `waits`, those that ended.
    pub ended: u64,
    pub short: u64,
    pub short_ns: u64,
    pub long: u64,
    pub long_ns: u64,
    pub on_cpu_ns: u64,
    /// Waits of threads that are gone although their exit was not seen.
    pub gone: u64,
    /// Threads the kernel side saw switch during the run.
    pub seen: std::collections::HashSet<u32>,
}
