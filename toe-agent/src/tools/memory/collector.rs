//! Memory collector, user side: attaches the allocator probes to each target process (never
//! system-wide), picks up processes that appear during the run, and turns the kernel's per-site
//! totals into heap and growth profiles.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    num::NonZeroU32,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues, RingBuf},
    programs::{
        ProgramError, TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
pub use toe_artifacts::summary::memory::ProcessTracking;
use toe_common::{
    api::{AllocationMode, MemoryProfileOptions},
    memory::{
        ALLOCS_RING, CONFIG_MAP, COPY_STACKS, COUNTDOWN_MAP, COUNTER_COUNT, COUNTERS_MAP, Counter,
        ENTER_PROGRAM, EXP_TABLE_LEN, EXP_TABLE_MAP, FAULT_COPY_PROGRAM, FAULT_PROGRAM, FAULTS_MAP,
        Func, MemConfig, RETURN_COPY_PROGRAM, RETURN_PROGRAM, SITES_MAP, STACKS_MAP, SiteKey,
        SiteStats, TRACK_ALLOCATIONS, TRACK_FAULTS,
    },
    stacks::StoredStack,
};

use crate::{
    ebpf::{LoadError, Loaded},
    symbolize::{RawKey, images::Images, user_stacks::UserStacks},
    targets::{self, CgroupTarget},
    tools::memory::{
        allocator::{self, Allocator},
        copied::CopiedSites,
    },
};

struct ProcessState {
    info: ProcessTracking,
    exe: Option<PathBuf>,
    links: Vec<(bool, UProbeLinkId)>,
}

/// Kernel counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemCounters(pub [u64; COUNTER_COUNT as usize]);

impl MemCounters {
    #[must_use]
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }
}

/// Per-site values after the run, before symbolization.
pub struct RawSites {
    pub allocations: Vec<(RawKey, SiteStats)>,
    pub faults: Vec<(RawKey, u64)>,
    /// Sites shown without a stack because the stored frames failed verification.
    pub stacks_unverified: u64,
}

pub struct MemoryCollector {
    opts: MemoryProfileOptions,
    sites: BpfHashMap<MapData, SiteKey, SiteStats>,
    faults: BpfHashMap<MapData, SiteKey, u64>,
    stacks: BpfHashMap<MapData, u64, StoredStack>,
    /// Stored stacks whose frames do not hash to their key (see `STACKS_MAP`).
    stacks_unverified: u64,
    counters: PerCpuArray<MapData, u64>,
    processes: BTreeMap<u32, ProcessState>,
    alloc_keys: HashMap<SiteKey, RawKey>,
    fault_keys: HashMap<SiteKey, RawKey>,
    /// The return probe attached to each process: the one that copies stacks, or not.
    return_program: &'static str,
    /// Whether page-fault stacks are copied (`--unwind=tables`); allocation stacks are when
    /// `return_program` is the copying one.
    fault_copies: bool,
    /// Allocations and page faults unwound from their stack copies (`--unwind=tables`).
    copied: Option<CopiedSites>,
    /// Why allocation stacks are walked by frame pointers although tables were asked for.
    pub fallback: Option<String>,
}

fn prog_err(name: &'static str) -> impl Fn(ProgramError) -> LoadError {
    move |source| LoadError::Program { name, source }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> LoadError {
    move |source| LoadError::Map { name, source }
}

/// `-ln(u)` for `EXP_TABLE_LEN` evenly spaced `u` in (0, 1), in 16.16 fixed point: the
/// exponential variates the kernel draws sampling intervals from.
fn exp_table() -> Vec<u32> {
    (0..EXP_TABLE_LEN)
        .map(|i| {
            let u = (f64::from(i) + 0.5) / f64::from(EXP_TABLE_LEN);
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "-ln(u) in (0, 7.7) scaled by 2^16 fits u32"
            )]
            let v = (-u.ln() * 65536.0).round() as u32;
            v
        })
        .collect()
}

impl MemoryCollector {
    /// Configures the kernel side and attaches the page-fault tracepoint. Allocator probes are
    /// attached per process with [`MemoryCollector::track`].
    pub fn attach(
        loaded: &mut Loaded,
        opts: &MemoryProfileOptions,
        images: &Arc<Images>,
    ) -> Result<Self, LoadError> {
        let track_allocs = opts.allocations != AllocationMode::Off;
        let (return_program, fallback) = load_allocator_probes(loaded, opts)?;
        let copies = return_program == RETURN_COPY_PROGRAM;
        {
            let mut config: Array<&mut MapData, MemConfig> =
                Array::try_from(loaded.map_mut(CONFIG_MAP)?).map_err(map_err(CONFIG_MAP))?;
            let mut flags = 0;
            if track_allocs {
                flags |= TRACK_ALLOCATIONS;
            }
            if opts.faults {
                flags |= TRACK_FAULTS;
            }
            if copies {
                flags |= COPY_STACKS;
            }
            let cfg = MemConfig {
                flags,
                fault_period: opts.fault_period.max(1),
                sample_bytes: if opts.allocations == AllocationMode::Sampled {
                    opts.sample_bytes.max(1)
                } else {
                    0
                },
                min_size: opts.min_size,
            };
            config.set(0, cfg, 0).map_err(map_err(CONFIG_MAP))?;
        }
        {
            let mut exp: Array<&mut MapData, u32> =
                Array::try_from(loaded.map_mut(EXP_TABLE_MAP)?).map_err(map_err(EXP_TABLE_MAP))?;
            for (i, v) in (0u32..).zip(exp_table()) {
                exp.set(i, v, 0).map_err(map_err(EXP_TABLE_MAP))?;
            }
        }
        seed_countdown(loaded, opts)?;
        let mut fault_copies = false;
        let mut fallback = fallback;
        if opts.faults {
            let (program, refused) = load_fault_program(loaded, opts)?;
            fault_copies = program == FAULT_COPY_PROGRAM;
            if let Some(why) = refused {
                fallback = Some(fallback.map_or_else(|| why.clone(), |f| format!("{f}; {why}")));
            }
            let prog: &mut TracePoint = loaded
                .program_mut(program)?
                .try_into()
                .map_err(prog_err(program))?;
            prog.attach("exceptions", "page_fault_user")
                .map_err(LoadError::Tracefs)?;
        }
        Ok(Self {
            opts: *opts,
            sites: BpfHashMap::try_from(loaded.take_map(SITES_MAP)?).map_err(map_err(SITES_MAP))?,
            faults: BpfHashMap::try_from(loaded.take_map(FAULTS_MAP)?)
                .map_err(map_err(FAULTS_MAP))?,
            stacks: BpfHashMap::try_from(loaded.take_map(STACKS_MAP)?)
                .map_err(map_err(STACKS_MAP))?,
            stacks_unverified: 0,
            counters: PerCpuArray::try_from(loaded.take_map(COUNTERS_MAP)?)
                .map_err(map_err(COUNTERS_MAP))?,
            processes: BTreeMap::new(),
            alloc_keys: HashMap::new(),
            fault_keys: HashMap::new(),
            return_program,
            fault_copies,
            copied: if copies || fault_copies {
                let ring = RingBuf::try_from(loaded.take_map(ALLOCS_RING)?)
                    .map_err(map_err(ALLOCS_RING))?;
                Some(
                    CopiedSites::spawn(ring, UserStacks::new(Arc::clone(images)))
                        .map_err(LoadError::Thread)?,
                )
            } else {
                None
            },
            fallback,
        })
    }

    /// Reads the last allocations and frees the kernel sent with stack copies, and stops their
    /// reader. Call after the probes are detached.
    fn stop_copies(&mut self) {
        if let Some(c) = &mut self.copied {
            c.stop();
        }
    }

    /// How allocation stacks were unwound from their copies, when they were copied.
    #[must_use]
    pub fn unwind(&self) -> Option<toe_artifacts::summary::UnwindAccounting> {
        let copies = self.return_program == RETURN_COPY_PROGRAM;
        self.copied.as_ref().filter(|_| copies).map(|c| {
            if c.frees_unknown() > 0 {
                tracing::debug!(
                    "{} frees of copied blocks had no allocation",
                    c.frees_unknown()
                );
            }
            crate::symbolize::user_stacks::with_table_readings(&c.unwind())
        })
    }

    /// How page-fault stacks were unwound from their copies, when they were copied.
    #[must_use]
    pub fn fault_unwind(&self) -> Option<toe_artifacts::summary::UnwindAccounting> {
        self.copied
            .as_ref()
            .filter(|_| self.fault_copies)
            .map(|c| crate::symbolize::user_stacks::with_table_readings(&c.fault_unwind()))
    }

    fn tracks_allocations(&self) -> bool {
        self.opts.allocations != AllocationMode::Off
    }

    /// Starts tracking `pid` if it is new, or re-checks it after an exec. Returns an error only
    /// for kernel refusals; a process without a supported allocator is recorded as untracked.
    pub fn track(&mut self, loaded: &mut Loaded, pid: u32) -> Result<(), LoadError> {
        let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
        if let Some(state) = self.processes.get(&pid)
            && state.exe == exe
        {
            return Ok(());
        }
        if exe.is_none() {
            // Gone already, exiting (a zombie has no exe either), or a kernel thread: what was
            // found about it stays as it was; an exiting process did not stop being tracked.
            return Ok(());
        }
        let name = targets::process_name(pid).unwrap_or_default();
        let mut state = self.processes.remove(&pid).unwrap_or(ProcessState {
            info: ProcessTracking {
                pid,
                name: name.clone(),
                ..ProcessTracking::default()
            },
            exe: None,
            links: Vec::new(),
        });
        state.exe.clone_from(&exe);
        state.info.name = name;
        if !self.tracks_allocations() {
            state.info.allocator = "not probed (mode growth)".into();
            self.processes.insert(pid, state);
            return Ok(());
        }
        let found = allocator::detect(pid).unwrap_or_else(|e| {
            Allocator::Unsupported(format!("its mappings could not be read: {e}"))
        });
        match found {
            Allocator::Glibc { attach_path, path } => {
                if !state.info.tracked {
                    match attach_probes(loaded, pid, &attach_path, self.return_program) {
                        Ok(links) => {
                            state.links = links;
                            state.info.tracked = true;
                            state.info.attached_after_ms = targets::process_age_ms(pid);
                        }
                        // A short-lived child can exit between being found and being probed:
                        // that is the process's end, not the run's.
                        Err(_) if fs::read_link(format!("/proc/{pid}/exe")).is_err() => {
                            state.info.allocator =
                                "not tracked: it exited before its probes were attached".into();
                            self.processes.insert(pid, state);
                            return Ok(());
                        }
                        Err(e) => return Err(e),
                    }
                }
                state.info.allocator = format!("glibc ({path})");
            }
            Allocator::Loading => {
                // Checked again on the next discovery (no exe recorded means "not settled").
                state.exe = None;
                state.info.allocator =
                    "not yet: its dynamic loader is still mapping its libraries".into();
            }
            Allocator::Unsupported(why) => {
                // After an exec into a binary without glibc the old probes are useless.
                detach_probes(
                    loaded,
                    std::mem::take(&mut state.links),
                    self.return_program,
                );
                state.info.tracked = false;
                state.info.allocator = format!("not tracked: {why}");
            }
        }
        self.processes.insert(pid, state);
        Ok(())
    }

    /// Finds target processes not tracked yet (children, processes that joined a target
    /// cgroup) and attaches to them; re-checks processes that exec'd. Returns the target
    /// processes alive now.
    pub fn discover(
        &mut self,
        loaded: &mut Loaded,
        cgroups: &[CgroupTarget],
    ) -> Result<Vec<u32>, LoadError> {
        let pids = target_pids(&loaded.tgids()?, cgroups);
        for &pid in &pids {
            self.track(loaded, pid)?;
        }
        Ok(pids)
    }

    /// `pid` is a command TOE holds before its `exec`: its probes are in place before it runs.
    pub fn attached_before_start(&mut self, pid: u32) {
        if let Some(p) = self.processes.get_mut(&pid)
            && p.info.tracked
        {
            p.info.attached_after_ms = Some(0);
        }
    }

    #[must_use]
    pub fn processes(&self) -> Vec<ProcessTracking> {
        self.processes.values().map(|p| p.info.clone()).collect()
    }

    #[must_use]
    pub fn counters(&self) -> MemCounters {
        let mut out = MemCounters::default();
        for (i, slot) in (0u32..).zip(out.0.iter_mut()) {
            *slot = self.counters.get(&i, 0).map_or(0, |v| v.iter().sum());
        }
        out
    }

    fn raw_key(&mut self, site: SiteKey, is_return: bool) -> RawKey {
        let mut ustack: Box<[u64]> = Box::new([]);
        if site.stack != 0
            && let Ok(st) = self.stacks.get(&site.stack, 0)
        {
            match st.verified(site.stack) {
                Some(frames) => ustack = frames.into(),
                None => self.stacks_unverified += 1,
            }
        }
        RawKey {
            pid: site.tgid,
            thread: [0; toe_common::TASK_COMM_LEN],
            kstack: Box::new([]),
            ustack,
            user_leaf_is_return: is_return,
        }
    }

    /// Reads sites first seen since the last call, so their stacks are symbolized while the
    /// processes live. Returns them for the symbolizer.
    pub fn take_new(&mut self) -> Vec<RawKey> {
        let mut new = self
            .copied
            .as_mut()
            .map(CopiedSites::take_new)
            .unwrap_or_default();
        let alloc_sites: Vec<SiteKey> = self.sites.keys().flatten().collect();
        let fault_sites: Vec<SiteKey> = self.faults.keys().flatten().collect();
        for (sites, is_return) in [(alloc_sites, true), (fault_sites, false)] {
            for site in sites {
                let known = if is_return {
                    &self.alloc_keys
                } else {
                    &self.fault_keys
                };
                if known.contains_key(&site) {
                    continue;
                }
                let key = self.raw_key(site, is_return);
                new.push(key.clone());
                if is_return {
                    self.alloc_keys.insert(site, key);
                } else {
                    self.fault_keys.insert(site, key);
                }
            }
        }
        new
    }

    /// Final per-site values. Call after the probes are detached.
    pub fn finish(&mut self) -> (RawSites, Vec<RawKey>) {
        self.stop_copies();
        let new = self.take_new();
        let mut allocations: Vec<(RawKey, SiteStats)> = self
            .sites
            .iter()
            .flatten()
            .filter_map(|(site, stats)| Some((self.alloc_keys.get(&site)?.clone(), stats)))
            .collect();
        if let Some(c) = &self.copied {
            allocations.extend(c.sites());
        }
        let mut faults: Vec<(RawKey, u64)> = self
            .faults
            .iter()
            .flatten()
            .filter_map(|(site, n)| Some((self.fault_keys.get(&site)?.clone(), n)))
            .collect();
        if let Some(c) = &self.copied {
            faults.extend(c.faults());
        }
        (
            RawSites {
                allocations,
                faults,
                stacks_unverified: self.stacks_unverified,
            },
            new,
        )
    }
}

/// Starts each CPU at its own random point of the sampling process, as if it had been
/// running: starting all at 0 would sample every CPU's first allocation.
fn seed_countdown(loaded: &mut Loaded, opts: &MemoryProfileOptions) -> Result<(), LoadError> {
    let mut countdown: PerCpuArray<&mut MapData, i64> =
        PerCpuArray::try_from(loaded.map_mut(COUNTDOWN_MAP)?).map_err(map_err(COUNTDOWN_MAP))?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| LoadError::Map {
        name: COUNTDOWN_MAP,
        source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "nr_cpus",
            io_error: e,
        }),
    })?;
    let table = exp_table();
    let seed = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::from(d.subsec_nanos()));
    let first: Vec<i64> = (0..cpus)
        .map(|c| {
            let idx = (seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(c as u64 * 1_442_695_040_888_963_407)
                >> 33)
                % u64::from(EXP_TABLE_LEN);
            let e = u64::from(table[usize::try_from(idx).unwrap_or(0)]);
            i64::try_from(opts.sample_bytes.saturating_mul(e) >> 16).unwrap_or(i64::MAX)
        })
        .collect();
    let values = PerCpuValues::try_from(first).map_err(|e| LoadError::Map {
        name: COUNTDOWN_MAP,
        source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "per-cpu values",
            io_error: e,
        }),
    })?;
    countdown
        .set(0, values, 0)
        .map_err(map_err(COUNTDOWN_MAP))?;
    Ok(())
}

/// Loads the allocator probes (attached per process later): the return probe that copies
/// stacks when tables are asked for and the kernel takes it. Returns the return probe loaded,
/// and why stacks are walked by frame pointers although tables were asked for, if they are.
fn load_allocator_probes(
    loaded: &mut Loaded,
    opts: &MemoryProfileOptions,
) -> Result<(&'static str, Option<String>), LoadError> {
    if opts.allocations == AllocationMode::Off {
        return Ok((RETURN_PROGRAM, None));
    }
    // Stack copies need `bpf_task_pt_regs` (Linux 5.15): an older kernel refuses that return
    // probe, and allocation stacks are walked by frame pointers, with a warning.
    let mut fallback = None;
    if opts.unwind_tables {
        match load_uprobe(loaded, RETURN_COPY_PROGRAM) {
            Ok(()) => {
                load_uprobe(loaded, ENTER_PROGRAM)?;
                return Ok((RETURN_COPY_PROGRAM, None));
            }
            Err(e) => {
                fallback = Some(format!(
                    "allocation stacks walked by frame pointers only: this kernel refused the \
                     probe that copies them for unwind tables (it needs Linux 5.15+): {e}"
                ));
            }
        }
    }
    load_uprobe(loaded, ENTER_PROGRAM)?;
    load_uprobe(loaded, RETURN_PROGRAM)?;
    Ok((RETURN_PROGRAM, fallback))
}

/// Loads the page-fault program: the one that copies stacks for unwind tables
/// (`--unwind=tables`), or the frame-pointer one, with why when a kernel before 5.15 refused
/// the first.
fn load_fault_program(
    loaded: &mut Loaded,
    opts: &MemoryProfileOptions,
) -> Result<(&'static str, Option<String>), LoadError> {
    let load = |loaded: &mut Loaded, name: &'static str| -> Result<(), LoadError> {
        let prog: &mut TracePoint = loaded
            .program_mut(name)?
            .try_into()
            .map_err(prog_err(name))?;
        prog.load().map_err(prog_err(name))
    };
    let mut refused = None;
    if opts.unwind_tables {
        match load(loaded, FAULT_COPY_PROGRAM) {
            Ok(()) => return Ok((FAULT_COPY_PROGRAM, None)),
            Err(e) => {
                refused = Some(format!(
                    "page-fault stacks walked by frame pointers only: this kernel refused the \
                     program that copies them for unwind tables (it needs Linux 5.15+): {e}"
                ));
            }
        }
    }
    load(loaded, FAULT_PROGRAM)?;
    Ok((FAULT_PROGRAM, refused))
}

fn load_uprobe(loaded: &mut Loaded, name: &'static str) -> Result<(), LoadError> {
    let prog: &mut UProbe = loaded
        .program_mut(name)?
        .try_into()
        .map_err(prog_err(name))?;
    prog.load().map_err(prog_err(name))
}

fn attach_probes(
    loaded: &mut Loaded,
    pid: u32,
    libc: &Path,
    return_program: &'static str,
) -> Result<Vec<(bool, UProbeLinkId)>, LoadError> {
    let Some(scope) = NonZeroU32::new(pid).map(UProbeScope::OneProcess) else {
        return Ok(Vec::new());
    };
    let mut links = Vec::new();
    for func in Func::ALL {
        for (is_return, name) in [(false, ENTER_PROGRAM), (true, return_program)] {
            if is_return && func == Func::Free {
                continue;
            }
            let prog: &mut UProbe = loaded
                .program_mut(name)?
                .try_into()
                .map_err(prog_err(name))?;
            let point = UProbeAttachPoint {
                location: UProbeAttachLocation::Symbol(func.symbol()),
                cookie: Some(func as u64),
            };
            match prog.attach(point, libc, scope) {
                Ok(id) => links.push((is_return, id)),
                Err(ProgramError::UProbeError(
                    aya::programs::uprobe::UProbeError::SymbolError { .. },
                )) if func.optional() => {
                    // Old glibc without reallocarray, or one built without pvalloc.
                    break;
                }
                Err(source) => {
                    detach_probes(loaded, links, return_program);
                    return Err(LoadError::Program { name, source });
                }
            }
        }
    }
    Ok(links)
}

fn detach_probes(
    loaded: &mut Loaded,
    links: Vec<(bool, UProbeLinkId)>,
    return_program: &'static str,
) {
    for (is_return, id) in links {
        let name = if is_return {
            return_program
        } else {
            ENTER_PROGRAM
        };
        if let Ok(prog) = loaded.program_mut(name)
            && let Ok(prog) = <&mut UProbe>::try_from(prog)
        {
            // The process may be gone; its link is released either way.
            let _ = prog.detach(id);
        }
    }
}

/// The target's processes right now, for callers that need a list (RSS).
#[must_use]
pub fn target_pids(tgids: &[u32], cgroups: &[CgroupTarget]) -> Vec<u32> {
    let mut v = tgids.to_vec();
    for cg in cgroups {
        targets::cgroup_pids(&cg.path, &mut v);
    }
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_table_has_mean_one() {
        let t = exp_table();
        let mean =
            t.iter().map(|&v| f64::from(v) / 65536.0).sum::<f64>() / f64::from(EXP_TABLE_LEN);
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        assert!(t.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn own_age_is_known() {
        assert!(targets::process_age_ms(std::process::id()).is_some());
    }
}
