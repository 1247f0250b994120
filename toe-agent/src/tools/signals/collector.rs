//! Signal and lifecycle collector: tracepoints on signal generation and delivery, fork, exec,
//! exit and the OOM killer, filtered in the kernel by the target tasks map (see
//! `toe_common::signals`). A dedicated thread drains the event ring so a burst is read while the
//! run's main loop symbolizes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    os::fd::AsFd as _,
    path::Path,
    ptr,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use toe_common::{
    TASK_COMM_LEN,
    api::SignalTraceOptions,
    signals::{
        CONFIG_FOLLOW_CGROUP_MOVES, CONFIG_KERNEL_STACKS, CONFIG_LEADER_EXIT_ENDS_PROCESS,
        CONFIG_MAP, CONFIG_USER_STACK_COPY, CONFIG_USER_STACKS, COPIES_RING, COUNTER_COUNT,
        COUNTERS_MAP, Counter, EVENTS_RING, Event, EventKind, FIELDS, GENERATE_COPY_PROGRAM,
        GROUP_DEAD_FIELD, MAX_SENDERS, PROGRAMS, STACKS_MAP, SenderCopy, SigConfig,
        TASK_TGID_UNKNOWN, TASKS_MAP, TaskInfo, counter_index,
    },
    stacks::StoredStack,
};

use crate::{
    ebpf::{LoadError, Loaded},
    symbolize::images::Images,
    targets::{self, CgroupTarget, ResolvedTarget},
    tracefs,
    wake::Stop,
};

/// Kernel counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SigCounters(pub [u64; COUNTER_COUNT as usize]);

impl SigCounters {
    #[must_use]
    pub fn emitted(&self, kind: EventKind) -> u64 {
        self.0[counter_index(kind, false) as usize]
    }

    #[must_use]
    pub fn lost(&self, kind: EventKind) -> u64 {
        self.0[counter_index(kind, true) as usize]
    }

    #[must_use]
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }

    #[must_use]
    pub fn total_lost(&self) -> u64 {
        EventKind::ALL.iter().map(|&k| self.lost(k)).sum()
    }
}

/// Sender stack copies by (`time_ns`, sender tid), the stamp of their `Generate` event.
pub type Copies = HashMap<(u64, u32), Box<SenderCopy>>;

/// Events read from the ring, shared with the drain thread.
#[derive(Default)]
struct Inbox {
    events: Vec<Event>,
    copies: Copies,
    received: u64,
}

pub struct SignalCollector {
    tasks: BpfHashMap<MapData, u32, TaskInfo>,
    stacks: BpfHashMap<MapData, u64, StoredStack>,
    counters: PerCpuArray<MapData, u64>,
    inbox: Arc<Mutex<Inbox>>,
    stop: Arc<Stop>,
    drainer: Option<JoinHandle<()>>,
    /// Tasks user space added after the start because the kernel had not seen them join.
    pub reconciled: u64,
    /// Stored stacks whose frames failed verification.
    pub stacks_unverified: u64,
    /// Why sender stacks are walked by frame pointers only although tables were asked for.
    pub fallback: Option<String>,
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> LoadError {
    move |source| LoadError::Map { name, source }
}

/// `comm` as the kernel stores it: NUL-padded, truncated to 15 bytes.
fn comm_bytes(name: &str) -> [u8; TASK_COMM_LEN] {
    let mut out = [0u8; TASK_COMM_LEN];
    let b = name.as_bytes();
    let n = b.len().min(TASK_COMM_LEN - 1);
    out[..n].copy_from_slice(&b[..n]);
    out
}

/// Every thread id of process `pid` (empty if it is gone).
fn threads(pid: u32) -> Vec<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The target cgroups and every cgroup below them.
fn cgroup_tree(roots: &[CgroupTarget]) -> Vec<CgroupTarget> {
    use std::os::unix::fs::MetadataExt as _;
    roots
        .iter()
        .flat_map(|r| {
            targets::cgroup_dirs(&r.path)
                .into_iter()
                .filter_map(move |(path, depth)| {
                    let id = fs::metadata(&path).ok()?.ino();
                    Some(CgroupTarget {
                        path,
                        id,
                        level: r.level + depth,
                    })
                })
        })
        .collect()
}

/// Thread ids listed in `cgroup.threads` of every cgroup in `tree`.
fn cgroup_threads(tree: &[CgroupTarget]) -> BTreeSet<u32> {
    tree.iter()
        .filter_map(|cg| fs::read_to_string(cg.path.join("cgroup.threads")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Every (tid, tgid) of the target right now: its processes, their descendants and the tasks
/// of its cgroups.
fn target_tasks(target: &ResolvedTarget, tree: &[CgroupTarget]) -> BTreeMap<u32, u32> {
    let mut out = BTreeMap::new();
    let pids = targets::descendants(&target.tgids);
    for pid in target.tgids.iter().copied().chain(pids) {
        for tid in threads(pid) {
            out.insert(tid, pid);
        }
    }
    for tid in cgroup_threads(tree) {
        if let Ok(Some(tgid)) = targets::tgid_of(tid) {
            out.insert(tid, tgid);
        }
    }
    out
}

fn tracepoint<'a>(
    loaded: &'a mut Loaded,
    name: &'static str,
) -> Result<&'a mut TracePoint, LoadError> {
    loaded
        .program_mut(name)?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })
}

fn load_tracepoint(loaded: &mut Loaded, name: &'static str) -> Result<(), LoadError> {
    tracepoint(loaded, name)?
        .load()
        .map_err(|source| LoadError::Program { name, source })
}

/// Loads and attaches every program; returns why sender stacks are walked by frame pointers
/// although tables were asked for, if they are.
fn attach_programs(
    loaded: &mut Loaded,
    opts: &SignalTraceOptions,
) -> Result<Option<String>, LoadError> {
    // Stack copies need `bpf_task_pt_regs` (Linux 5.15): an older kernel refuses that
    // program, and senders' stacks are walked by frame pointers, with a warning.
    let mut fallback = None;
    let mut generate = PROGRAMS[0].0;
    if opts.user_stacks && opts.unwind_tables {
        match load_tracepoint(loaded, GENERATE_COPY_PROGRAM) {
            Ok(()) => generate = GENERATE_COPY_PROGRAM,
            Err(e) => {
                fallback = Some(format!(
                    "sender stacks walked by frame pointers only: this kernel refused the \
                     program that copies them for unwind tables (it needs Linux 5.15+): {e}"
                ));
            }
        }
    }
    let mut attached = BTreeSet::new();
    for &(name, category, event) in PROGRAMS {
        let name = if event == "signal_generate" {
            generate
        } else {
            name
        };
        if attached.insert(name) && name != GENERATE_COPY_PROGRAM {
            load_tracepoint(loaded, name)?;
        }
        tracepoint(loaded, name)?
            .attach(category, event)
            .map_err(LoadError::Tracefs)?;
    }
    Ok(fallback)
}

impl SignalCollector {
    /// Checks the kernel's tracepoint layouts, loads and attaches every program, and seeds the
    /// tasks map. Target maps must already be set.
    pub fn attach(
        loaded: &mut Loaded,
        opts: &SignalTraceOptions,
        target: &ResolvedTarget,
        images: &Arc<Images>,
    ) -> Result<Self, LoadError> {
        tracefs::check_fields(FIELDS).map_err(LoadError::Layout)?;
        let group_dead = tracefs::has_field(GROUP_DEAD_FIELD).map_err(LoadError::Layout)?;
        if !group_dead {
            tracing::info!(
                "this kernel's sched_process_exit has no group_dead (Linux < 6.16): a process's \
                 exit is recorded when its leader thread exits"
            );
        }
        let tree = cgroup_tree(&target.cgroups);
        // Below a target cgroup every cgroup is a target too; the kernel's move check matches
        // ids exactly, so it needs them all.
        for cg in &tree {
            loaded.add_cgroup(cg.id)?;
        }
        {
            let mut senders = [[0u8; TASK_COMM_LEN]; MAX_SENDERS];
            for (slot, name) in senders.iter_mut().zip(&opts.senders) {
                *slot = comm_bytes(name);
            }
            let mut flags = 0;
            if opts.user_stacks {
                flags |= CONFIG_USER_STACKS;
                if opts.unwind_tables {
                    flags |= CONFIG_USER_STACK_COPY;
                }
            }
            if opts.kernel_stacks {
                flags |= CONFIG_KERNEL_STACKS;
            }
            if target.tgids.is_empty() {
                flags |= CONFIG_FOLLOW_CGROUP_MOVES;
            }
            if !group_dead {
                flags |= CONFIG_LEADER_EXIT_ENDS_PROCESS;
            }
            let mut config: Array<&mut MapData, SigConfig> =
                Array::try_from(loaded.map_mut(CONFIG_MAP)?).map_err(map_err(CONFIG_MAP))?;
            config
                .set(
                    0,
                    SigConfig {
                        signals: opts.signals,
                        flags,
                        sender_count: u32::try_from(opts.senders.len().min(MAX_SENDERS))
                            .unwrap_or(0),
                        senders,
                    },
                    0,
                )
                .map_err(map_err(CONFIG_MAP))?;
        }
        let mut tasks: BpfHashMap<MapData, u32, TaskInfo> =
            BpfHashMap::try_from(loaded.take_map(TASKS_MAP)?).map_err(map_err(TASKS_MAP))?;
        let ring: RingBuf<MapData> =
            RingBuf::try_from(loaded.take_map(EVENTS_RING)?).map_err(map_err(EVENTS_RING))?;
        let copies: RingBuf<MapData> =
            RingBuf::try_from(loaded.take_map(COPIES_RING)?).map_err(map_err(COPIES_RING))?;
        let fallback = attach_programs(loaded, opts)?;
        // Seeded after the programs are attached: a task created meanwhile is added by the
        // kernel (its parent is a target) or is found here, never missed in between.
        for (tid, tgid) in target_tasks(target, &tree) {
            let info = TaskInfo {
                tgid,
                ..TaskInfo::default()
            };
            tasks.insert(tid, info, 0).map_err(map_err(TASKS_MAP))?;
        }
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let stop = Arc::new(Stop::new().map_err(LoadError::Thread)?);
        let drainer = {
            let images = Arc::clone(images);
            let inbox = Arc::clone(&inbox);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("toe-signals".into())
                .spawn(move || drain_loop(ring, copies, &images, &inbox, &stop))
                .map_err(LoadError::Thread)?
        };
        Ok(Self {
            tasks,
            stacks: BpfHashMap::try_from(loaded.take_map(STACKS_MAP)?)
                .map_err(map_err(STACKS_MAP))?,
            counters: PerCpuArray::try_from(loaded.take_map(COUNTERS_MAP)?)
                .map_err(map_err(COUNTERS_MAP))?,
            inbox,
            stop,
            drainer: Some(drainer),
            fallback,
            reconciled: 0,
            stacks_unverified: 0,
        })
    }

    /// Adds a process TOE started (held before exec) with its threads.
    pub fn add_process(&mut self, pid: u32) -> Result<(), LoadError> {
        for tid in threads(pid) {
            let info = TaskInfo {
                tgid: pid,
                ..TaskInfo::default()
            };
            self.tasks
                .insert(tid, info, 0)
                .map_err(map_err(TASKS_MAP))?;
        }
        Ok(())
    }

    /// Brings the tasks map in line with `/proc` and the cgroups: adds tasks the kernel could
    /// not have seen join (counted), fills in process ids of tasks that joined by a cgroup move,
    /// and removes entries of processes that are gone (dead and reaped).
    pub fn reconcile(&mut self, target: &ResolvedTarget) {
        let tree = cgroup_tree(&target.cgroups);
        let now = target_tasks(target, &tree);
        let known: HashMap<u32, TaskInfo> = self.tasks.iter().flatten().collect();
        for (&tid, &tgid) in &now {
            match known.get(&tid) {
                None => {
                    let info = TaskInfo {
                        tgid,
                        ..TaskInfo::default()
                    };
                    if self.tasks.insert(tid, info, 0).is_ok() {
                        self.reconciled += 1;
                    }
                }
                Some(info) if info.flags & TASK_TGID_UNKNOWN != 0 => {
                    let fixed = TaskInfo {
                        tgid,
                        flags: info.flags & !TASK_TGID_UNKNOWN,
                        ..*info
                    };
                    let _ = self.tasks.insert(tid, fixed, 0);
                }
                Some(_) => {}
            }
        }
        // A dead process's leader entry stays while it is a zombie (its parent has not reaped
        // it, so the pid cannot be reused yet); once /proc forgets the task, so does the map.
        for tid in known.keys() {
            if !Path::new(&format!("/proc/{tid}")).exists() {
                let _ = self.tasks.remove(tid);
            }
        }
    }

    /// Events received since the last call, and the sender stack copies received with them
    /// (and any not paired yet).
    #[must_use]
    pub fn take_events(&self) -> (Vec<Event>, Copies) {
        let mut inbox = self.inbox.lock().expect("inbox lock");
        (
            std::mem::take(&mut inbox.events),
            std::mem::take(&mut inbox.copies),
        )
    }

    #[must_use]
    pub fn received(&self) -> u64 {
        self.inbox.lock().expect("inbox lock").received
    }

    #[must_use]
    pub fn counters(&self) -> SigCounters {
        let mut out = SigCounters::default();
        for (i, slot) in (0u32..).zip(out.0.iter_mut()) {
            *slot = self.counters.get(&i, 0).map_or(0, |v| v.iter().sum());
        }
        out
    }

    /// The frames of a stored stack, if present and intact.
    pub fn stack(&mut self, hash: u64) -> Option<Box<[u64]>> {
        if hash == 0 {
            return None;
        }
        let st = self.stacks.get(&hash, 0).ok()?;
        if let Some(f) = st.verified(hash) {
            Some(f.into())
        } else {
            self.stacks_unverified += 1;
            None
        }
    }

    /// Stops the drain thread after it has read everything the kernel submitted. Call after the
    /// programs are detached.
    pub fn stop(&mut self) {
        self.stop.ask();
        if let Some(t) = self.drainer.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SignalCollector {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads the rings until told to stop, then once more to empty them. Waits in poll(2) between
/// bursts: the kernel wakes it when an event lands in an empty ring, and a stop at once, so
/// between events it does not wake at all. Copies are read after the
/// events: the kernel submits a copy before its event, so every event read has its copy read by
/// the same pass (or, when the copy was lost, never). A sender's mappings are read as soon as
/// its copy arrives: a process that signals and exits is gone by the run loop's next tick.
/// The longest the drain thread sleeps without an event. Nothing needs it to wake: the bound
/// only caps what a wake-up the kernel never sent would delay.
const QUIET_WAIT: Duration = Duration::from_secs(1);

fn drain_loop(
    mut ring: RingBuf<MapData>,
    mut copies: RingBuf<MapData>,
    images: &Images,
    inbox: &Mutex<Inbox>,
    stop: &Stop,
) {
    let mut batch = Vec::with_capacity(4096);
    let mut copied = HashMap::new();
    loop {
        let stopping = stop.asked();
        while let Some(item) = ring.next() {
            if item.len() >= size_of::<Event>() {
                // SAFETY: the kernel wrote a whole Event (same repr(C) layout via toe-common);
                // ring records are only 8-byte aligned, hence read_unaligned.
                batch.push(unsafe { ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
            }
            if batch.len() == batch.capacity() {
                drain_copies(&mut copies, &mut copied);
                flush(inbox, &mut batch, &mut copied);
            }
        }
        drain_copies(&mut copies, &mut copied);
        let mut senders: Vec<u32> = copied.values().map(|c| c.pid).collect();
        senders.sort_unstable();
        senders.dedup();
        for pid in senders {
            images.observe(pid);
        }
        flush(inbox, &mut batch, &mut copied);
        if stopping {
            return;
        }
        stop.wait(Some(ring.as_fd()), QUIET_WAIT);
    }
}

fn drain_copies(ring: &mut RingBuf<MapData>, out: &mut Copies) {
    while let Some(item) = ring.next() {
        if item.len() >= size_of::<SenderCopy>() {
            // SAFETY: the kernel wrote a whole SenderCopy (same repr(C) layout via toe-common,
            // every bit pattern valid); copied byte-wise into a heap slot, as records are only
            // 8-byte aligned and 16 KiB is too much for this thread's stack.
            let copy = unsafe {
                let mut slot: Box<std::mem::MaybeUninit<SenderCopy>> = Box::new_uninit();
                ptr::copy_nonoverlapping(
                    item.as_ptr(),
                    slot.as_mut_ptr().cast::<u8>(),
                    size_of::<SenderCopy>(),
                );
                slot.assume_init()
            };
            out.insert((copy.time_ns, copy.tid), copy);
        }
    }
}

fn flush(inbox: &Mutex<Inbox>, batch: &mut Vec<Event>, copies: &mut Copies) {
    if batch.is_empty() && copies.is_empty() {
        return;
    }
    let mut i = inbox.lock().expect("inbox lock");
    i.received += batch.len() as u64;
    i.events.append(batch);
    i.copies.extend(copies.drain());
}
