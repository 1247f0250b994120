//! Off-CPU collector: `sched:sched_switch` measures how long target threads stay off CPU, per
//! stack and reason, aggregated in the kernel (see `toe_common::offcpu`).

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_comm, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
    programs::{PerfEventContext, RawTracePointContext, TracePointContext},
};
use toe_common::{
    offcpu::{
        CONFIG_KERNEL_STACKS, CONFIG_USER_STACKS, COUNTER_COUNT, Counter, DEFAULT_MAX_WAITS,
        MAX_STACKS, MAX_THREADS, OffConfig, OffStart, Reason, SWITCH_NEXT_PID, SWITCH_PREV_STATE,
        TaskOffsets, WaitKey, WaitStats,
    },
    stacks::StoredStack,
};

use crate::{
    stacks::{self, StackError},
    targets::{add_to, atomic_add, current_is_target},
};

#[map(name = "TOE_OFF_CONFIG")]
static CONFIG: Array<OffConfig> = Array::with_max_entries(1, 0);

/// Preallocated: entries are inserted from inside the scheduler, where an allocation that can
/// fail under pressure would lose the wait.
#[map(name = "TOE_OFF_STARTS")]
static STARTS: HashMap<u64, OffStart> = HashMap::with_max_entries(MAX_THREADS, 0);

#[map(name = "TOE_OFF_WAITS")]
static WAITS: HashMap<WaitKey, WaitStats> =
    HashMap::with_max_entries(DEFAULT_MAX_WAITS, BPF_F_NO_PREALLOC);

/// Preallocated for the reason given at `TOE_MEM_STACKS`.
#[map(name = "TOE_OFF_STACKS")]
static STACKS: HashMap<u64, StoredStack> = HashMap::with_max_entries(MAX_STACKS, 0);

#[map(name = "TOE_OFF_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[inline(always)]
fn add(c: Counter, n: u64) {
    add_to(&COUNTERS, c as u32, n);
}

/// Classic tracepoint: runs in the task going off CPU (`current` is `prev`); threads are keyed
/// by thread id.
pub fn try_switch(ctx: &TracePointContext) {
    // SAFETY: offsets checked against the kernel's format file before attaching.
    if let Ok(next) = unsafe { ctx.read_at::<i32>(SWITCH_NEXT_PID) }
        && next > 0
    {
        #[expect(clippy::cast_sign_loss, reason = "checked positive")]
        switch_in(u64::from(next as u32));
    }
    // SAFETY: as above.
    let state = unsafe { ctx.read_at::<i64>(SWITCH_PREV_STATE) }.unwrap_or(0);
    #[expect(clippy::cast_sign_loss, reason = "a bit set")]
    let reason = Reason::from_state(state as u64);
    switch_out(ctx, u64::from(ctx.pid()), reason);
}

/// Raw tracepoint `sched_switch(bool preempt, struct task_struct *prev, struct task_struct
/// *next, unsigned int prev_state)`: threads are keyed by their task pointer, so the next task
/// is recognised without reading it.
pub fn try_switch_raw(ctx: &RawTracePointContext) {
    let preempt: u64 = ctx.arg(0);
    let prev: u64 = ctx.arg(1);
    let next: u64 = ctx.arg(2);
    let state: u64 = ctx.arg(3);
    if next != 0 {
        switch_in(next);
    }
    let reason = Reason::from_raw_state(preempt & 0xff != 0, state & 0xffff_ffff);
    switch_out(ctx, prev, reason);
}

/// The next task comes back: if it is a target thread that waited, its wait ends now.
#[inline(always)]
fn switch_in(key: u64) {
    let Some(start) = STARTS.get_ptr_mut(&key) else {
        return;
    };
    // The clock is read only for target threads: every other switch pays one lookup.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a thread's entry is written only when it switches out or in, both on the CPU
    // that runs this program for it, never concurrently.
    let s = unsafe { &mut *start };
    let began = s.ts;
    s.ts = 0;
    s.on_since = now;
    if began == 0 {
        return;
    }
    if now <= began {
        add(Counter::Unmatched, 1);
        return;
    }
    account(s, now - began);
}

/// A wait of `waited` ns that began at `s`: recorded, or counted as too short or too long.
#[inline(always)]
fn account(s: &OffStart, waited: u64) {
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    if waited < cfg.min_block_ns {
        add(Counter::Short, 1);
        add(Counter::ShortNs, waited);
        return;
    }
    if cfg.max_block_ns != 0 && waited > cfg.max_block_ns {
        add(Counter::Long, 1);
        add(Counter::LongNs, waited);
        return;
    }
    if record(&WaitKey::of(s), waited) {
        add(Counter::Recorded, 1);
    } else {
        add(Counter::WaitsFull, 1);
        add(Counter::WaitsFullNs, waited);
    }
}

#[inline(always)]
fn record(key: &WaitKey, waited: u64) -> bool {
    if let Some(v) = WAITS.get_ptr_mut(key) {
        // SAFETY: a live map value; several CPUs may add to it at once, hence atomic adds.
        unsafe {
            atomic_add(&raw mut (*v).ns, waited);
            atomic_add(&raw mut (*v).count, 1);
        }
        return true;
    }
    let first = WaitStats {
        ns: waited,
        count: 1,
    };
    if WAITS.insert(key, &first, u64::from(BPF_NOEXIST)).is_ok() {
        return true;
    }
    // EEXIST: another CPU inserted the same key first.
    if let Some(v) = WAITS.get_ptr_mut(key) {
        // SAFETY: as above.
        unsafe {
            atomic_add(&raw mut (*v).ns, waited);
            atomic_add(&raw mut (*v).count, 1);
        }
        return true;
    }
    false
}

#[inline(always)]
fn stack<C: EbpfContext>(ctx: &C, user: bool) -> u64 {
    match stacks::store(ctx, &STACKS, user) {
        Ok(h) => h,
        Err(StackError::Unwind) => {
            add(
                if user {
                    Counter::UserStackLost
                } else {
                    Counter::KernelStackLost
                },
                1,
            );
            0
        }
        Err(StackError::MapFull) => {
            add(Counter::StacksFull, 1);
            0
        }
    }
}

/// The task going off CPU: if it is a target thread, its wait starts now. `reason` is `None`
/// for its last switch (it is exiting).
#[inline(always)]
fn switch_out<C: EbpfContext>(ctx: &C, key: u64, reason: Option<Reason>) {
    let Some(reason) = reason else {
        // Exiting: it never comes back. Checked before the target test, which a process's last
        // thread no longer passes (its tgid left the target map when it began to exit).
        if let Some(e) = STARTS.get_ptr(&key) {
            // SAFETY: a live map value, read before it is removed.
            if unsafe { (*e).ts } != 0 {
                // It ran and now exits, but its return to a CPU was not seen.
                add(Counter::Unmatched, 1);
            }
            if STARTS.remove(&key).is_ok() {
                add(Counter::Exited, 1);
            }
        }
        return;
    };
    if !current_is_target() {
        return;
    }
    start_wait(ctx, key, reason, unsafe { bpf_ktime_get_ns() }, (0, 0));
}

/// A target thread goes off CPU at `now`. `perf` is its (CPU time, switch count) for
/// [`try_switch_perf`], else zeros.
#[inline(always)]
fn start_wait<C: EbpfContext>(ctx: &C, key: u64, reason: Reason, now: u64, perf: (u64, u64)) {
    add(Counter::Switches, 1);
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    let ustack = if cfg.flags & CONFIG_USER_STACKS != 0 {
        stack(ctx, true)
    } else {
        0
    };
    let kstack = if cfg.flags & CONFIG_KERNEL_STACKS != 0 {
        stack(ctx, false)
    } else {
        0
    };
    let comm = bpf_get_current_comm().unwrap_or_default();
    if let Some(e) = STARTS.get_ptr_mut(&key) {
        // SAFETY: see `switch_in`.
        let e = unsafe { &mut *e };
        if perf.1 == 0 {
            if e.on_since != 0 && now > e.on_since {
                add(Counter::OnCpuNs, now - e.on_since);
            }
            if e.ts != 0 {
                add(Counter::Unmatched, 1);
            }
            e.on_since = 0;
        } else {
            e.on_since = perf.0;
        }
        e.ts = now;
        e.switches = perf.1;
        e.ustack = ustack;
        e.kstack = kstack;
        e.tgid = ctx.tgid();
        e.tid = ctx.pid();
        e.reason = reason as u32;
        e.comm = comm;
        return;
    }
    let start = OffStart {
        ts: now,
        on_since: perf.0,
        ustack,
        kstack,
        tgid: ctx.tgid(),
        reason: reason as u32,
        tid: ctx.pid(),
        reserved: 0,
        comm,
        switches: perf.1,
    };
    if STARTS.insert(&key, &start, 0).is_err() {
        add(Counter::StartsFull, 1);
    }
}

/// A field of the task at `task`, `off` bytes in.
#[inline(always)]
fn task_field<T>(task: u64, off: u32) -> Option<T> {
    // SAFETY: a fault-safe kernel read; the offset comes from this kernel's BTF.
    unsafe { bpf_probe_read_kernel((task + u64::from(off)) as *const T) }.ok()
}

/// The current task's CPU time (ns) and switch count.
#[inline(always)]
fn runtime_and_switches(task: u64, off: &TaskOffsets) -> Option<(u64, u64)> {
    let runtime = task_field::<u64>(task, off.runtime)?;
    let voluntary = task_field::<u64>(task, off.nvcsw)?;
    let involuntary = task_field::<u64>(task, off.nivcsw)?;
    Some((runtime, voluntary.wrapping_add(involuntary)))
}

/// The wait that began at `s` ended when the thread came back, which is `now` less the CPU
/// time it has used since (`runtime` against the value kept at the switch-out).
#[inline(always)]
fn close_wait(s: &mut OffStart, now: u64, runtime: u64) {
    let began = s.ts;
    if began == 0 {
        return;
    }
    s.ts = 0;
    let ran = runtime.saturating_sub(s.on_since);
    add(Counter::OnCpuNs, ran);
    // The CPU time is brought up to date a moment before the event fires, so a wait comes
    // out at most that moment long; a thread that was hardly away can come out below zero,
    // which is a wait of nothing.
    account(s, (now - began.min(now)).saturating_sub(ran));
}

/// The software `context-switches` event of a target thread (or target cgroup): runs in the
/// thread going off CPU, before the switch, and only for target threads.
pub fn try_switch_perf(ctx: &PerfEventContext) {
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let (Some(state), Some((runtime, switches))) = (
        task_field::<u32>(task, cfg.task.state),
        runtime_and_switches(task, &cfg.task),
    ) else {
        add(Counter::Unmatched, 1);
        return;
    };
    let key = u64::from(ctx.pid());
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(e) = STARTS.get_ptr_mut(&key) {
        // SAFETY: a thread's entry is written only by its own switches and exit, which run on
        // the CPU it is on, one at a time.
        let e = unsafe { &mut *e };
        if e.switches == switches {
            // A second event for this one switch (a thread that both inherited an event and
            // got its own, or a cgroup inside another target cgroup).
            return;
        }
        close_wait(e, now, runtime);
    }
    // The event cannot tell preemption from a switch with the state already set to sleep
    // (rare: the few instructions between setting it and calling the scheduler): that wait is
    // counted as a sleep.
    let Some(reason) = Reason::from_raw_state(false, u64::from(state)) else {
        if STARTS.remove(&key).is_ok() {
            add(Counter::Exited, 1);
        }
        return;
    };
    if !current_is_target() {
        return;
    }
    start_wait(ctx, key, reason, now, (runtime, switches));
}

/// `sched:sched_process_exit`, in the exiting thread: its last wait is over (it is running its
/// exit), and a per-thread event is removed before the thread's last switch.
pub fn try_exit(ctx: &TracePointContext) {
    let key = u64::from(ctx.pid());
    let Some(e) = STARTS.get_ptr_mut(&key) else {
        return;
    };
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    // SAFETY: helper without arguments; the entry as in `try_switch_perf`.
    let task = unsafe { bpf_get_current_task() };
    let e = unsafe { &mut *e };
    if let Some((runtime, _)) = runtime_and_switches(task, &cfg.task) {
        close_wait(e, unsafe { bpf_ktime_get_ns() }, runtime);
    }
    if STARTS.remove(&key).is_ok() {
        add(Counter::Exited, 1);
    }
}
