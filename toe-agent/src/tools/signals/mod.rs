//! signal-trace: every signal towards a target task (with its sender and the sender's stacks),
//! every delivery the target acts on, and the target's lifecycle (fork, exec, exit, OOM kill).
//! What the run keeps while events arrive, and how they become records, a summary section and
//! artifacts.

pub mod collector;
pub mod records;

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::Arc,
};

use bytes::Bytes;
use toe_artifacts::{names, summary::UnwindAccounting};
use toe_common::{
    api::SignalTraceOptions,
    comm_to_string,
    signals::{
        COPIES_RING, COPIES_RING_BYTES, Counter, Event, EventKind, TASK_EXIT_CALLED, code_name,
        result_name, signal_name,
    },
    stacks::stack_hash,
};

use self::{
    collector::{Copies, SigCounters, SignalCollector},
    records::{self as sigprof, Actor, Detail, KindAccounting, Record, SignalSummary},
};
use super::{Artifact, Attach, Finish, Finished, MapSizes, Prepare, Tick, Tool, ToolRun};
use crate::{
    run::RunError,
    symbolize::{
        RawKey, Symbolizer,
        user_stacks::{UserStacks, with_table_readings},
    },
    targets::{self, ResolvedTarget, TargetError},
};

pub struct Signals {
    opts: SignalTraceOptions,
}

impl Signals {
    #[must_use]
    pub fn new(opts: SignalTraceOptions) -> Self {
        Self { opts }
    }
}

impl Tool for Signals {
    fn map_sizes(&self, _cpus: u32) -> MapSizes {
        use toe_common::signals as sig;
        vec![
            (sig::STACKS_MAP, sig::MAX_STACKS),
            (sig::TASKS_MAP, sig::MAX_TASKS),
            (sig::EVENTS_RING, self.opts.ring_bytes),
            (
                COPIES_RING,
                if self.opts.user_stacks && self.opts.unwind_tables {
                    COPIES_RING_BYTES
                } else {
                    4096
                },
            ),
        ]
    }

    fn prepare(&mut self, cx: &Prepare<'_>) -> Result<(), RunError> {
        // Signals are followed per task: a target with no task yet has nothing to trace.
        if cx.target.tgids.is_empty() && cx.target.cgroups.iter().all(cgroup_is_empty) {
            return Err(RunError::Target(TargetError::Empty(
                cx.target.description.clone(),
            )));
        }
        Ok(())
    }

    fn attach(self: Box<Self>, cx: &mut Attach<'_>) -> Result<Box<dyn ToolRun>, RunError> {
        let mut collector = SignalCollector::attach(cx.loaded, &self.opts, cx.target, cx.images)?;
        if let Some(pid) = cx.held_pid {
            collector.add_process(pid)?;
        }
        Ok(Box::new(SignalWork::new(
            self.opts,
            collector,
            UserStacks::new(Arc::clone(cx.images)),
        )))
    }
}

/// Stacks of one sender: (process, user stack hash, kernel stack hash).
type StackKey = (u32, u64, u64);

struct SignalWork {
    pub opts: SignalTraceOptions,
    pub collector: SignalCollector,
    events: Vec<Event>,
    /// Sender stacks read from the kernel map, split so each side symbolizes on its own.
    stacks: HashMap<StackKey, (RawKey, RawKey)>,
    new_keys: Vec<RawKey>,
    /// Senders' user stacks unwound from their copies (`--unwind=tables`).
    user_stacks: UserStacks,
    unwind: UnwindAccounting,
    /// Copies whose event has not been read yet, by (`time_ns`, sender tid).
    copies: Copies,
    /// Memory cgroup of OOM victims, read as soon as the event arrives.
    oom_cgroups: HashMap<u32, String>,
    ticks: u64,
}

/// The memory controller's cgroup of a task (`memory` line on cgroup v1, else the v2 path).
fn memory_cgroup(tid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{tid}/cgroup")).ok()?;
    let field = |l: &str| l.splitn(3, ':').nth(2).map(str::to_owned);
    text.lines()
        .find(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|c| c == "memory"))
        })
        .and_then(field)
        .or_else(|| text.lines().find(|l| l.starts_with("0::")).and_then(field))
}

impl SignalWork {
    pub fn new(
        opts: SignalTraceOptions,
        collector: SignalCollector,
        user_stacks: UserStacks,
    ) -> Self {
        Self {
            opts,
            collector,
            events: Vec::new(),
            stacks: HashMap::new(),
            user_stacks,
            unwind: UnwindAccounting::default(),
            copies: HashMap::new(),
            new_keys: Vec::new(),
            oom_cgroups: HashMap::new(),
            ticks: 0,
        }
    }

    /// Takes what the drain thread read; reads new sender stacks while the map has them.
    pub fn tick(&mut self, target: &ResolvedTarget) {
        self.absorb();
        self.ticks += 1;
        if self.ticks.is_multiple_of(10) {
            self.collector.reconcile(target);
        }
    }

    fn absorb(&mut self) {
        let (mut events, copies) = self.collector.take_events();
        self.copies.extend(copies);
        for e in &mut events {
            if e.kind == EventKind::Oom as u32
                && let Some(cg) = memory_cgroup(e.tid)
            {
                self.oom_cgroups.insert(e.tid, cg);
            }
            // A sender's copy replaces its frame-pointer stack by the stack unwound from it,
            // and the event is keyed by that stack's hash from here on. Without a copy the
            // stored stack is read only for a key not seen before (one map lookup each).
            let copy = (e.kind == EventKind::Generate as u32)
                .then(|| self.copies.remove(&(e.time_ns, e.actor_tid)))
                .flatten();
            let unwound: Option<Box<[u64]>> = copy.map(|c| {
                let fp = self.collector.stack(e.ustack).unwrap_or_default();
                let frames: Box<[u64]> = self
                    .user_stacks
                    .of(e.actor_pid, &c.copy, c.failed != 0, &fp, &mut self.unwind)
                    .into();
                e.ustack = if frames.is_empty() {
                    0
                } else {
                    stack_hash(&frames).max(1)
                };
                frames
            });
            if e.ustack == 0 && e.kstack == 0 {
                continue;
            }
            let key = (e.actor_pid, e.ustack, e.kstack);
            if self.stacks.contains_key(&key) {
                continue;
            }
            let raw = |kstack: Box<[u64]>, ustack: Box<[u64]>| RawKey {
                pid: e.actor_pid,
                thread: [0; toe_common::TASK_COMM_LEN],
                kstack,
                ustack,
                user_leaf_is_return: false,
            };
            let ustack =
                unwound.unwrap_or_else(|| self.collector.stack(e.ustack).unwrap_or_default());
            let user = raw(Box::new([]), ustack);
            let kernel = raw(
                self.collector.stack(e.kstack).unwrap_or_default(),
                Box::new([]),
            );
            self.new_keys.push(user.clone());
            self.new_keys.push(kernel.clone());
            self.stacks.insert(key, (user, kernel));
        }
        // A copy is read in the same pass as its event, or its event was lost: what is left
        // after a second has no event to come.
        if let Some(last) = events.last().map(|e| e.time_ns) {
            self.copies
                .retain(|&(t, _), _| t.saturating_add(1_000_000_000) > last);
        }
        self.events.extend(events);
    }

    /// Symbolizes stacks of new senders (soon after they signalled, while they live).
    pub fn resolve(&mut self, symbolizer: &mut Symbolizer) {
        symbolizer.resolve(&std::mem::take(&mut self.new_keys));
    }

    pub fn progress(&self) -> String {
        let c = self.collector.counters();
        format!(
            "{} events, {} lost",
            self.collector.received(),
            c.total_lost()
        )
    }
}

/// Whether a target cgroup (and everything below it) has no task: nothing to trace.
fn cgroup_is_empty(cg: &targets::CgroupTarget) -> bool {
    targets::cgroup_dirs(&cg.path).iter().all(|(dir, _)| {
        !fs::read_to_string(dir.join("cgroup.threads")).is_ok_and(|s| !s.trim().is_empty())
    })
}

/// cgroup v2 id -> path below the v2 root, for the ids events name.
fn cgroup_paths(ids: &HashSet<u64>) -> HashMap<u64, String> {
    let Some(root) = targets::cgroup2_root() else {
        return HashMap::new();
    };
    targets::cgroup_dirs(&root)
        .into_iter()
        .filter_map(|(dir, _)| {
            let ino = fs::metadata(&dir).ok()?.ino();
            ids.contains(&ino).then(|| {
                let rel = dir.strip_prefix(&root).unwrap_or(Path::new(""));
                (ino, format!("/{}", rel.display()))
            })
        })
        .collect()
}

fn stack_names(symbolizer: &mut Symbolizer, key: &RawKey) -> Vec<String> {
    if key.ustack.is_empty() && key.kstack.is_empty() {
        return Vec::new();
    }
    let stacks = symbolizer.stacks([(key, vec![1])]);
    let frames = symbolizer.frames();
    stacks
        .first()
        .map(|s| {
            s.frames
                .iter()
                .rev()
                .map(|&f| frames[f as usize].function.clone())
                .collect()
        })
        .unwrap_or_default()
}

fn actor(e: &Event, cgroups: &HashMap<u64, String>) -> Actor {
    Actor {
        pid: e.actor_pid,
        tid: e.actor_tid,
        comm: comm_to_string(&e.actor_comm),
        cgroup: cgroups.get(&e.actor_cgroup).cloned(),
    }
}

/// Names resolved once for all events: sender cgroups and symbolized stacks.
struct Names {
    cgroups: HashMap<u64, String>,
    stacks: HashMap<StackKey, (Vec<String>, Vec<String>)>,
}

fn detail(e: &Event, kind: EventKind, n: &Names, oom_cgroups: &HashMap<u32, String>) -> Detail {
    let text = comm_to_string(&e.text);
    match kind {
        EventKind::Generate => {
            let (user_stack, kernel_stack) = n
                .stacks
                .get(&(e.actor_pid, e.ustack, e.kstack))
                .cloned()
                .unwrap_or_default();
            Detail::Signal {
                signal: signal_name(e.sig),
                signo: e.sig,
                code: code_name(e.sig, e.code),
                result: result_name(e.result).into(),
                scope: if e.group != 0 { "process" } else { "thread" }.into(),
                sender: actor(e, &n.cgroups),
                user_stack,
                kernel_stack,
            }
        }
        EventKind::ExitNotice => Detail::ExitNotice {
            code: code_name(e.sig, e.code),
            parent: e.tid,
        },
        EventKind::Deliver => Detail::Delivery {
            signal: signal_name(e.sig),
            signo: e.sig,
            code: code_name(e.sig, e.code),
            action: match e.args[0] {
                0 => "default",
                1 => "ignore",
                _ => "handler",
            }
            .into(),
        },
        EventKind::Fork => Detail::Fork {
            child: Actor {
                cgroup: None,
                ..actor(e, &n.cgroups)
            },
        },
        EventKind::Exec => Detail::Exec { filename: text },
        EventKind::Exit => Detail::Exit {
            #[expect(clippy::cast_possible_truncation, reason = "an int in the kernel")]
            exit_code: (e.args[1] & u64::from(TASK_EXIT_CALLED) != 0)
                .then_some((e.args[0] as u32).cast_signed()),
        },
        EventKind::Oom => Detail::OomKill {
            victim_comm: text,
            trigger: actor(e, &n.cgroups),
            total_vm_kib: e.args[0],
            anon_rss_kib: e.args[1],
            file_rss_kib: e.args[2],
            shmem_rss_kib: e.args[3],
            #[expect(
                clippy::cast_possible_wrap,
                reason = "sign-extended by the kernel side"
            )]
            oom_score_adj: e.args[5] as i64,
            memory_cgroup: oom_cgroups.get(&e.tid).cloned(),
        },
        EventKind::Joined => Detail::Joined {
            by: actor(e, &n.cgroups),
            cgroup_id: e.args[0],
        },
        EventKind::Left => Detail::Left {
            by: actor(e, &n.cgroups),
            cgroup_id: e.args[0],
        },
    }
}

/// Decodes events in arrival order into records; stacks are leaf first.
fn records(
    work: &SignalWork,
    symbolizer: &mut Symbolizer,
    start_ns: u64,
    start_unix_ns: u64,
) -> Vec<Record> {
    let ids: HashSet<u64> = work
        .events
        .iter()
        .map(|e| e.actor_cgroup)
        .filter(|&id| id != 0)
        .collect();
    let names = Names {
        cgroups: cgroup_paths(&ids),
        stacks: work
            .stacks
            .iter()
            .map(|(k, (u, kern))| {
                (
                    *k,
                    (stack_names(symbolizer, u), stack_names(symbolizer, kern)),
                )
            })
            .collect(),
    };
    let mut tgids: HashMap<u32, u32> = HashMap::new();
    let mut out = Vec::with_capacity(work.events.len());
    for e in &work.events {
        let Some(kind) = EventKind::from_u32(e.kind) else {
            continue;
        };
        // An exit notice is about its sender, the exiting target.
        let (pid, tid, comm) = if kind == EventKind::ExitNotice {
            (e.actor_pid, e.actor_tid, &e.actor_comm)
        } else {
            (e.pid, e.tid, &e.comm)
        };
        // A task that joined by a cgroup move has no process id in the kernel; /proc may
        // still know it.
        let pid = if pid == 0 && tid != 0 {
            *tgids
                .entry(tid)
                .or_insert_with(|| targets::tgid_of(tid).ok().flatten().unwrap_or(0))
        } else {
            pid
        };
        out.push(Record {
            t_ms: ms_since(e.time_ns, start_ns),
            time_unix_ns: start_unix_ns + e.time_ns.saturating_sub(start_ns),
            pid,
            tid,
            comm: comm_to_string(comm),
            detail: detail(e, kind, &names, &work.oom_cgroups),
        });
    }
    out
}

#[expect(clippy::cast_precision_loss, reason = "milliseconds for display")]
fn ms_since(t: u64, start: u64) -> f64 {
    t.saturating_sub(start) as f64 / 1e6
}

fn accounting(c: &SigCounters, received: &HashMap<u32, u64>) -> Vec<KindAccounting> {
    EventKind::ALL
        .iter()
        .map(|&k| KindAccounting {
            event: k.name().into(),
            emitted: c.emitted(k),
            recorded: received.get(&(k as u32)).copied().unwrap_or(0),
            lost: c.lost(k),
        })
        .collect()
}

/// Monotonic clock (the kernel's `bpf_ktime_get_ns`) now.
#[must_use]
pub fn monotonic_ns() -> u64 {
    crate::clock_ns(libc::CLOCK_MONOTONIC)
}

/// Stops the drain thread (programs are detached by now), decodes everything, writes the
/// events, the timeline and the summary section.
fn finish(
    mut work: SignalWork,
    symbolizer: &mut Symbolizer,
    start: (u64, u64),
    duration_ms: f64,
    title: &str,
) -> Finished {
    work.collector.stop();
    work.absorb();
    symbolizer.resolve(&std::mem::take(&mut work.new_keys));
    let counters = work.collector.counters();
    let recs = records(&work, symbolizer, start.0, start.1);
    let mut received: HashMap<u32, u64> = HashMap::new();
    for e in &work.events {
        *received.entry(e.kind).or_insert(0) += 1;
    }
    let lost_total = counters.total_lost();
    let summary = SignalSummary {
        events: accounting(&counters, &received),
        lost_total,
        max_lost: work.opts.max_lost,
        filtered: counters.get(Counter::Filtered),
        stacks_unwind_failed: counters.get(Counter::StackUnwind),
        stacks_map_full: counters.get(Counter::StackMapFull),
        stacks_unverified: work.collector.stacks_unverified,
        unwind: with_table_readings(&UnwindAccounting {
            copies_lost: counters.get(Counter::CopiesLost),
            ..work.unwind.clone()
        }),
        tasks_missed: counters.get(Counter::TasksMapFull),
        late_joins: counters.get(Counter::LateJoins) + work.collector.reconciled,
        signals: sigprof::signal_counts(&recs),
        processes: sigprof::endings(&recs),
    };
    let mut warnings: Vec<String> = work.collector.fallback.iter().cloned().collect();
    let failed = (lost_total > work.opts.max_lost).then(|| {
        format!(
            "{lost_total} events lost (ring buffer full), more than --max-lost={}; raise \
             --ring-size or narrow --signals/--senders",
            work.opts.max_lost
        )
    });
    if lost_total > 0 && failed.is_none() {
        warnings.push(format!("{lost_total} events lost (ring buffer full)"));
    }
    let artifacts: Vec<Artifact> = vec![
        (names::SIGNAL_EVENTS, Bytes::from(sigprof::jsonl(&recs))),
        (
            names::SIGNAL_TIMELINE,
            Bytes::from(sigprof::timeline_svg(
                &recs,
                duration_ms,
                &format!("{title} — signals and lifecycle"),
            )),
        ),
    ];
    Finished {
        signals: Some(summary),
        failed,
        artifacts,
        warnings,
        lanes: vec![sigprof::timeline_lane(&recs)],
        ..Finished::default()
    }
}

impl ToolRun for SignalWork {
    fn fast_tick(&mut self, cx: &mut Tick<'_>) -> Result<(), RunError> {
        self.tick(cx.target);
        Ok(())
    }

    fn slow_tick(&mut self, cx: &mut Tick<'_>) {
        self.resolve(cx.symbolizer);
    }

    fn progress(&self) -> String {
        SignalWork::progress(self)
    }

    fn finish(self: Box<Self>, cx: &mut Finish<'_>) -> Result<Finished, RunError> {
        Ok(finish(
            *self,
            cx.symbolizer,
            (cx.started_ns, cx.span.0),
            cx.sampled_for.as_secs_f64() * 1000.0,
            cx.title,
        ))
    }
}
