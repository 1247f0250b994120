//! Off-CPU collector: `sched:sched_switch` measures how long target threads stay off CPU, per
//! stack and reason, aggregated in the kernel (see `toe_common::offcpu`).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{bpf_get_current_comm, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
    programs::TracePointContext,
};
use toe_common::{
    offcpu::{
        CONFIG_KERNEL_STACKS, CONFIG_USER_STACKS, COUNTER_COUNT, Counter, DEFAULT_MAX_WAITS,
        MAX_STACKS, MAX_THREADS, OffConfig, OffStart, Reason, SWITCH_NEXT_PID, SWITCH_PREV_STATE,
        WaitKey, WaitStats,
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
static STARTS: HashMap<u32, OffStart> = HashMap::with_max_entries(MAX_THREADS, 0);

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

/// Runs in the task going off CPU (`current` is `prev`).
pub fn try_switch(ctx: &TracePointContext) {
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: offsets checked against the kernel's format file before attaching.
    if let Ok(next) = unsafe { ctx.read_at::<i32>(SWITCH_NEXT_PID) }
        && next > 0
    {
        #[expect(clippy::cast_sign_loss, reason = "checked positive")]
        switch_in(next as u32, now);
    }
    switch_out(ctx, now);
}

/// The next task comes back: if it is a target thread that waited, its wait ends now.
#[inline(always)]
fn switch_in(tid: u32, now: u64) {
    let Some(start) = STARTS.get_ptr_mut(&tid) else {
        return;
    };
    // SAFETY: a thread's entry is written only when it switches out or in, both on the CPU
    // that runs this program for it, never concurrently.
    let s = unsafe { &mut *start };
    let began = s.ts;
    s.ts = 0;
    s.on_since = now;
    if began == 0 || now <= began {
        return;
    }
    let waited = now - began;
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
    let key = WaitKey {
        tgid: s.tgid,
        reason: s.reason,
        ustack: s.ustack,
        kstack: s.kstack,
        comm: s.comm,
    };
    if record(&key, waited) {
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
fn stack(ctx: &TracePointContext, user: bool) -> u64 {
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

/// The task going off CPU: if it is a target thread, its wait starts now.
#[inline(always)]
fn switch_out(ctx: &TracePointContext, now: u64) {
    // SAFETY: offset checked against the kernel's format file before attaching.
    let state = unsafe { ctx.read_at::<i64>(SWITCH_PREV_STATE) }.unwrap_or(0);
    let tid = ctx.pid();
    #[expect(clippy::cast_sign_loss, reason = "a bit set")]
    let Some(reason) = Reason::from_state(state as u64) else {
        // Exiting: it never comes back. Checked before the target test, which a process's last
        // thread no longer passes (its tgid left the target map when it began to exit).
        if STARTS.remove(&tid).is_ok() {
            add(Counter::Exited, 1);
        }
        return;
    };
    if !current_is_target() {
        return;
    }
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
    if let Some(e) = STARTS.get_ptr_mut(&tid) {
        // SAFETY: see `switch_in`.
        let e = unsafe { &mut *e };
        if e.on_since != 0 && now > e.on_since {
            add(Counter::OnCpuNs, now - e.on_since);
        }
        e.ts = now;
        e.on_since = 0;
        e.ustack = ustack;
        e.kstack = kstack;
        e.tgid = ctx.tgid();
        e.reason = reason as u32;
        e.comm = comm;
        return;
    }
    let start = OffStart {
        ts: now,
        on_since: 0,
        ustack,
        kstack,
        tgid: ctx.tgid(),
        reason: reason as u32,
        comm,
    };
    if STARTS.insert(&tid, &start, 0).is_err() {
        add(Counter::StartsFull, 1);
    }
}
