//! Shared target maps and the in-kernel target test used by every collector.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id},
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use toe_common::targets::{
    Counter, FILTER_BY_CGROUP, FILTER_BY_TGID, FilterConfig, MAX_CGROUP_LEVEL, MAX_TARGET_CGROUPS,
    MAX_TARGET_TGIDS, NEWS_RING_BYTES, TARGET_COUNTER_COUNT,
};

#[map(name = "TOE_TARGET_CGROUPS")]
static TARGET_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_TARGET_CGROUPS, 0);

#[map(name = "TOE_TARGET_TGIDS")]
static TARGET_TGIDS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TARGET_TGIDS, 0);

#[map(name = "TOE_FILTER_CONFIG")]
static FILTER_CONFIG: Array<FilterConfig> = Array::with_max_entries(1, 0);

#[map(name = "TOE_TARGET_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TARGET_COUNTER_COUNT, 0);

#[map(name = "TOE_TARGET_NEWS")]
static NEWS: RingBuf = RingBuf::with_byte_size(NEWS_RING_BYTES, 0);

pub fn bump(map: &PerCpuArray<u64>, index: u32) {
    add_to(map, index, 1);
}

#[inline(always)]
pub fn add_to(map: &PerCpuArray<u64>, index: u32, n: u64) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // Per-CPU slot: no other writer can race this add.
        unsafe { *slot += n };
    }
}

/// `lock *(u64 *)(dst) += v`. The BPF target does not expose `AtomicU64::fetch_add` (it lacks
/// compare-and-swap in its baseline), but the add itself is a plain BPF atomic instruction.
///
/// # Safety
/// `dst` must be a valid, 8-byte aligned map value.
#[inline(always)]
pub unsafe fn atomic_add(dst: *mut u64, v: u64) {
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(dst, v) };
}

/// Whether `id` (a cgroup v2 id) is one of the target cgroups. Descendants count only when user
/// space has listed them too.
#[inline(always)]
pub fn cgroup_id_is_target(id: u64) -> bool {
    unsafe { TARGET_CGROUPS.get(&id) }.is_some()
}

fn config() -> FilterConfig {
    FILTER_CONFIG.get(0).copied().unwrap_or_default()
}

fn tgid_is_target(tgid: u32) -> bool {
    unsafe { TARGET_TGIDS.get(&tgid) }.is_some()
}

fn cgroup_is_target(level_mask: u32) -> bool {
    // SAFETY: helpers without pointer arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    if unsafe { TARGET_CGROUPS.get(&own) }.is_some() {
        return true;
    }
    let mut level = 0;
    while level <= MAX_CGROUP_LEVEL {
        if level_mask & (1 << level) != 0 {
            #[expect(clippy::cast_possible_wrap, reason = "level <= 31")]
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            if id == 0 {
                // Deeper than the current task's cgroup: no further ancestors.
                return false;
            }
            if unsafe { TARGET_CGROUPS.get(&id) }.is_some() {
                return true;
            }
        }
        level += 1;
    }
    false
}

/// Whether the current task belongs to a target (by process or by cgroup).
#[inline(always)]
pub fn current_is_target() -> bool {
    let cfg = config();
    if cfg.mode & FILTER_BY_TGID != 0 {
        #[expect(clippy::cast_possible_truncation, reason = "upper half is the tgid")]
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if tgid_is_target(tgid) {
            return true;
        }
    }
    cfg.mode & FILTER_BY_CGROUP != 0 && cgroup_is_target(cfg.cgroup_level_mask)
}

/// `CLONE_THREAD` from include/uapi/linux/sched.h.
const CLONE_THREAD: u64 = 0x0001_0000;
// Offsets in /sys/kernel/tracing/events/task/task_newtask/format (stable since 3.x):
// pid at 8, comm[16] at 12, clone_flags at 32.
const NEWTASK_PID: usize = 8;
const NEWTASK_CLONE_FLAGS: usize = 32;

/// `task:task_newtask` runs in the parent: a new process (not thread) of a target process
/// becomes a target before it can run, so a `--pid` target's children are followed race-free.
/// A new process of a target (by process or by cgroup: the child starts in its parent's
/// cgroup) is also told to user space, whose image watcher then reads its mappings at once.
pub fn try_task_newtask(ctx: &TracePointContext) {
    let cfg = config();
    let by_tgid = cfg.mode & FILTER_BY_TGID != 0 && tgid_is_target(ctx.tgid());
    if !by_tgid && !(cfg.mode & FILTER_BY_CGROUP != 0 && cgroup_is_target(cfg.cgroup_level_mask)) {
        return;
    }
    let Ok(flags) = (unsafe { ctx.read_at::<u64>(NEWTASK_CLONE_FLAGS) }) else {
        return;
    };
    if flags & CLONE_THREAD != 0 {
        return;
    }
    let Ok(child) = (unsafe { ctx.read_at::<i32>(NEWTASK_PID) }) else {
        return;
    };
    #[expect(clippy::cast_sign_loss, reason = "pids are positive")]
    let child = child as u32;
    if by_tgid {
        if TARGET_TGIDS.insert(&child, &0, 0).is_ok() {
            bump(&COUNTERS, Counter::ChildrenFollowed as u32);
        } else {
            bump(&COUNTERS, Counter::TgidMapFull as u32);
            return;
        }
    }
    tell(child);
}

/// `sched:sched_process_exec` runs in the task that exec'd, with its new image mapped: a target
/// process that changed its program (or a process that entered a target cgroup and exec'd
/// there, as `kubectl exec` does) is told to user space.
pub fn try_process_exec(ctx: &TracePointContext) {
    if current_is_target() {
        tell(ctx.tgid());
    }
}

/// A process user space should look at now. The record only wakes the watcher early: when the
/// ring is full, the watcher is awake and behind, and its next full look of the target set
/// finds the process anyway, so a failed output loses nothing worth counting.
fn tell(tgid: u32) {
    let _ = NEWS.output::<u32>(tgid, 0);
}

/// `sched:sched_process_exit` runs in the exiting task: when a target's group leader exits, its
/// tgid leaves the map so a recycled pid is never mistaken for the target.
pub fn try_process_exit(ctx: &TracePointContext) {
    if ctx.pid() == ctx.tgid() && config().mode & FILTER_BY_TGID != 0 {
        let tgid = ctx.tgid();
        let _ = TARGET_TGIDS.remove(&tgid);
    }
}
