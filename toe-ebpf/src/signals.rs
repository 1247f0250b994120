//! Signal and lifecycle collector (see `toe_common::signals` for the membership model).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_kernel_str_bytes, generated::bpf_get_current_cgroup_id,
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use toe_common::{
    TASK_COMM_LEN,
    signals::{
        CLD_DUMPED, CLD_EXITED, CONFIG_FOLLOW_CGROUP_MOVES, CONFIG_KERNEL_STACKS,
        CONFIG_LEADER_EXIT_ENDS_PROCESS, CONFIG_USER_STACK_COPY, CONFIG_USER_STACKS, COUNTER_COUNT,
        Counter, Event, EventKind, MAX_SENDERS, MAX_STACKS, MAX_TASKS, RING_BYTES, SIGCHLD,
        SenderCopy, SigConfig, TASK_DEAD, TASK_EXIT_CALLED, TASK_TGID_UNKNOWN, TEXT_LEN, TaskInfo,
        counter_index,
    },
    stacks::StoredStack,
};

use crate::{
    stacks::{self, StackError},
    targets::{bump, cgroup_id_is_target, current_is_target},
};

#[map(name = "TOE_SIG_TASKS")]
static TASKS: HashMap<u32, TaskInfo> = HashMap::with_max_entries(MAX_TASKS, 0);

#[map(name = "TOE_SIG_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// Sized at load: [`toe_common::signals::COPIES_RING_BYTES`] when sender stacks are copied,
/// one page when not.
#[map(name = "TOE_SIG_COPIES")]
static COPIES: RingBuf = RingBuf::with_byte_size(4096, 0);

#[map(name = "TOE_SIG_STACKS")]
/// Preallocated: a stack value is over 1 KiB, and the kernel's allocator keeps only one such
/// element ready per CPU for maps that are not, so a second new stack in quick succession would
/// fail. Sized at load (1 entry when the collector is not used).
static STACKS: HashMap<u64, StoredStack> = HashMap::with_max_entries(MAX_STACKS, 0);

#[map(name = "TOE_SIG_CONFIG")]
static CONFIG: Array<SigConfig> = Array::with_max_entries(1, 0);

#[map(name = "TOE_SIG_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// `CLONE_THREAD` from include/uapi/linux/sched.h.
const CLONE_THREAD: u64 = 0x0001_0000;

#[inline(always)]
fn count(c: Counter) {
    bump(&COUNTERS, c as u32);
}

#[inline(always)]
fn current_ids() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    #[expect(clippy::cast_possible_truncation, reason = "two halves of one u64")]
    ((id >> 32) as u32, id as u32)
}

#[inline(always)]
fn read<T>(ctx: &TracePointContext, offset: usize) -> Option<T> {
    // SAFETY: offsets are those of the tracepoint's format, checked by user space at load.
    unsafe { ctx.read_at::<T>(offset) }.ok()
}

#[inline(always)]
fn signal_wanted(cfg: &SigConfig, sig: i32) -> bool {
    #[expect(clippy::cast_sign_loss, reason = "checked positive")]
    let bit = if (1..=64).contains(&sig) {
        1u64 << ((sig - 1) as u32)
    } else {
        0
    };
    cfg.signals & bit != 0
}

#[inline(always)]
fn sender_wanted(cfg: &SigConfig, comm: &[u8; TASK_COMM_LEN]) -> bool {
    if cfg.sender_count == 0 {
        return true;
    }
    let mut i = 0;
    while i < MAX_SENDERS {
        if i as u32 >= cfg.sender_count {
            break;
        }
        if cfg.senders[i] == *comm {
            return true;
        }
        i += 1;
    }
    false
}

/// The current task's entry, adding it when the task is in a target cgroup (or is a target
/// process) but missing from the map: a task born straight into the cgroup.
#[inline(always)]
fn current_task(tgid: u32, tid: u32) -> Option<TaskInfo> {
    if let Some(t) = unsafe { TASKS.get(&tid) } {
        return Some(*t);
    }
    if !current_is_target() {
        return None;
    }
    let info = TaskInfo {
        tgid,
        ..TaskInfo::default()
    };
    if TASKS.insert(&tid, &info, u64::from(BPF_NOEXIST)).is_ok() {
        count(Counter::LateJoins);
    } else if unsafe { TASKS.get(&tid) }.is_none() {
        count(Counter::TasksMapFull);
    }
    if tid != tgid && unsafe { TASKS.get(&tgid) }.is_none() {
        // The process's leader entry carries its exit code; it joins with its first thread.
        let _ = TASKS.insert(&tgid, &info, u64::from(BPF_NOEXIST));
    }
    Some(info)
}

/// Reserves an event of `kind`, fills the common fields, lets `fill` write the rest, submits.
/// Counts the attempt and, when the ring is full, the loss.
#[inline(always)]
fn emit(kind: EventKind, fill: impl FnOnce(*mut Event)) {
    bump(&COUNTERS, counter_index(kind, false));
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        bump(&COUNTERS, counter_index(kind, true));
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` is an exclusively owned, reserved Event-sized record; every field is written
    // here or by `fill` before submit (text only for the kinds that use it).
    unsafe {
        (*e).time_ns = bpf_ktime_get_ns();
        (*e).kind = kind as u32;
        (*e).sig = 0;
        (*e).code = 0;
        (*e).errno = 0;
        (*e).result = 0;
        (*e).group = 0;
        (*e).pid = 0;
        (*e).tid = 0;
        (*e).actor_pid = 0;
        (*e).actor_tid = 0;
        (*e).actor_cgroup = 0;
        (*e).ustack = 0;
        (*e).kstack = 0;
        (*e).comm = [0; TASK_COMM_LEN];
        (*e).actor_comm = [0; TASK_COMM_LEN];
        (*e).args = [0; 6];
        (*e).text[0] = 0;
    }
    fill(e);
    // Default wakeup policy: the kernel wakes the reader only when it has caught up, so a
    // burst costs one wakeup, not one per event.
    entry.submit(0);
}

#[inline(always)]
fn stack(ctx: &TracePointContext, user: bool) -> u64 {
    match stacks::store(ctx, &STACKS, user) {
        Ok(h) => h,
        Err(StackError::Unwind) => {
            count(Counter::StackUnwind);
            0
        }
        Err(StackError::MapFull) => {
            count(Counter::StackMapFull);
            0
        }
    }
}

/// Copies the sender's registers and user stack for the event stamped `time_ns`; a full ring
/// is counted and leaves the event its frame-pointer stack.
#[inline(always)]
fn copy_sender(time_ns: u64, pid: u32, tid: u32) {
    let Some(mut entry) = COPIES.reserve::<SenderCopy>(0) else {
        count(Counter::CopiesLost);
        return;
    };
    let c = entry.as_mut_ptr();
    // SAFETY: `c` is an exclusively owned, reserved SenderCopy-sized record; `copy_user`
    // writes the copy's registers and length, and only `len` bytes are read from it.
    unsafe {
        (*c).time_ns = time_ns;
        (*c).pid = pid;
        (*c).tid = tid;
        (*c).reserved = 0;
        (*c).failed = u32::from(!stacks::copy_user(&raw mut (*c).copy));
    }
    // The event that follows wakes the reader.
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
}

/// `signal:signal_generate`, in the sender's context. `COPY`: also copy the sender's stack
/// when asked (the program variant for Linux 5.15+).
pub fn try_generate<const COPY: bool>(ctx: &TracePointContext) {
    let Some(receiver) = read::<i32>(ctx, 36) else {
        return;
    };
    #[expect(clippy::cast_sign_loss, reason = "pids are positive")]
    let receiver = receiver as u32;
    let sig = read::<i32>(ctx, 8).unwrap_or(0);
    let code = read::<i32>(ctx, 16).unwrap_or(0);
    let (tgid, tid) = current_ids();
    let target = unsafe { TASKS.get(&receiver) }.copied();
    let exit_notice = target.is_none()
        && sig == SIGCHLD
        && (CLD_EXITED..=CLD_DUMPED).contains(&code)
        && unsafe { TASKS.get(&tgid) }.is_some();
    if target.is_none() && !exit_notice {
        return;
    }
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    let comm = bpf_get_current_comm().unwrap_or_default();
    if !exit_notice && !(signal_wanted(&cfg, sig) && sender_wanted(&cfg, &comm)) {
        count(Counter::Filtered);
        return;
    }
    let ustack = if cfg.flags & CONFIG_USER_STACKS != 0 && !exit_notice {
        stack(ctx, true)
    } else {
        0
    };
    let kstack = if cfg.flags & CONFIG_KERNEL_STACKS != 0 && !exit_notice {
        stack(ctx, false)
    } else {
        0
    };
    // SAFETY: a helper without arguments.
    let time_ns = unsafe { bpf_ktime_get_ns() };
    if COPY && cfg.flags & CONFIG_USER_STACK_COPY != 0 && !exit_notice {
        copy_sender(time_ns, tgid, tid);
    }
    let receiver_tgid = target.map_or(0, |t| t.tgid);
    let kind = if exit_notice {
        EventKind::ExitNotice
    } else {
        EventKind::Generate
    };
    emit(kind, |e| unsafe {
        // The stamp the stack copy carries, so user space pairs the two.
        (*e).time_ns = time_ns;
        (*e).sig = sig;
        (*e).code = code;
        (*e).errno = read::<i32>(ctx, 12).unwrap_or(0);
        (*e).result = read::<i32>(ctx, 44).unwrap_or(0);
        #[expect(clippy::cast_sign_loss, reason = "0 or 1")]
        {
            (*e).group = read::<i32>(ctx, 40).unwrap_or(0) as u32;
        }
        (*e).pid = receiver_tgid;
        (*e).tid = receiver;
        (*e).comm = read::<[u8; TASK_COMM_LEN]>(ctx, 20).unwrap_or_default();
        (*e).actor_pid = tgid;
        (*e).actor_tid = tid;
        (*e).actor_comm = comm;
        (*e).actor_cgroup = bpf_get_current_cgroup_id();
        (*e).ustack = ustack;
        (*e).kstack = kstack;
    });
}

/// `signal:signal_deliver`, in the receiver's context.
pub fn try_deliver(ctx: &TracePointContext) {
    let (tgid, tid) = current_ids();
    if current_task(tgid, tid).is_none() {
        return;
    }
    let sig = read::<i32>(ctx, 8).unwrap_or(0);
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    if !signal_wanted(&cfg, sig) {
        count(Counter::Filtered);
        return;
    }
    emit(EventKind::Deliver, |e| unsafe {
        (*e).sig = sig;
        (*e).errno = read::<i32>(ctx, 12).unwrap_or(0);
        (*e).code = read::<i32>(ctx, 16).unwrap_or(0);
        (*e).pid = tgid;
        (*e).tid = tid;
        (*e).comm = bpf_get_current_comm().unwrap_or_default();
        (*e).args[0] = read::<u64>(ctx, 24).unwrap_or(0);
        (*e).args[1] = read::<u64>(ctx, 32).unwrap_or(0);
    });
}

/// `task:task_newtask`, in the parent: the child joins before it can run or be signalled.
pub fn try_newtask(ctx: &TracePointContext) {
    let (tgid, tid) = current_ids();
    if current_task(tgid, tid).is_none() {
        return;
    }
    let Some(child) = read::<i32>(ctx, 8) else {
        return;
    };
    #[expect(clippy::cast_sign_loss, reason = "pids are positive")]
    let child = child as u32;
    let flags = read::<u64>(ctx, 32).unwrap_or(0);
    let thread = flags & CLONE_THREAD != 0;
    let info = TaskInfo {
        tgid: if thread { tgid } else { child },
        ..TaskInfo::default()
    };
    if TASKS.insert(&child, &info, u64::from(BPF_ANY)).is_err() {
        count(Counter::TasksMapFull);
    }
    if thread {
        // Threads are covered (signals to them are recorded) but not reported one by one.
        return;
    }
    emit(EventKind::Fork, |e| unsafe {
        (*e).pid = tgid;
        (*e).tid = tid;
        (*e).comm = bpf_get_current_comm().unwrap_or_default();
        (*e).actor_pid = child;
        (*e).actor_tid = child;
        (*e).actor_comm = read::<[u8; TASK_COMM_LEN]>(ctx, 12).unwrap_or_default();
        (*e).args[0] = flags;
    });
}

/// `syscalls:sys_enter_exit_group` and `sys_enter_exit`: the status a process asks to exit
/// with, kept on its leader's entry until the exit itself.
pub fn try_exit_call(ctx: &TracePointContext) {
    let (tgid, tid) = current_ids();
    if current_task(tgid, tid).is_none() {
        return;
    }
    let code = read::<u64>(ctx, 16).unwrap_or(0);
    if let Some(leader) = TASKS.get_ptr_mut(&tgid) {
        // SAFETY: map value; a racing exit of another thread writes the same fields.
        unsafe {
            #[expect(clippy::cast_possible_truncation, reason = "an int in the kernel")]
            {
                (*leader).exit_code = code as i32;
            }
            (*leader).flags |= TASK_EXIT_CALLED;
        }
    }
}

/// `sched:sched_process_exit`, in the exiting task. A thread's entry goes at once; the last
/// thread reports the process's exit, and the leader's entry stays (flagged dead) for the
/// parent notification that follows and until user space has read the exit.
pub fn try_exit(ctx: &TracePointContext) {
    let (tgid, tid) = current_ids();
    if current_task(tgid, tid).is_none() {
        return;
    }
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    let group_dead = if cfg.flags & CONFIG_LEADER_EXIT_ENDS_PROCESS == 0 {
        read::<u8>(ctx, 32).unwrap_or(0) != 0
    } else {
        tid == tgid
    };
    if tid != tgid {
        let _ = TASKS.remove(&tid);
    }
    if !group_dead {
        return;
    }
    let mut leader = TaskInfo::default();
    if let Some(l) = TASKS.get_ptr_mut(&tgid) {
        // SAFETY: map value of this process, whose last thread is running this.
        unsafe {
            (*l).flags |= TASK_DEAD;
            leader = *l;
        }
    }
    emit(EventKind::Exit, |e| unsafe {
        (*e).pid = tgid;
        (*e).tid = tid;
        (*e).comm = bpf_get_current_comm().unwrap_or_default();
        #[expect(clippy::cast_sign_loss, reason = "raw bits, decoded by user space")]
        {
            (*e).args[0] = leader.exit_code as u32 as u64;
        }
        (*e).args[1] = u64::from(leader.flags);
    });
}

/// `sched:sched_process_exec`, in the process after the new image is in place.
pub fn try_exec(ctx: &TracePointContext) {
    let (tgid, tid) = current_ids();
    if current_task(tgid, tid).is_none() {
        return;
    }
    #[expect(clippy::cast_sign_loss, reason = "pids are positive")]
    let old = read::<i32>(ctx, 16).unwrap_or(0) as u32;
    if old != tid {
        // A non-leader thread exec'd: it took over the leader's pid, its old tid is gone.
        let _ = TASKS.remove(&old);
    }
    let loc = read::<u32>(ctx, 8).unwrap_or(0);
    emit(EventKind::Exec, |e| unsafe {
        (*e).pid = tgid;
        (*e).tid = tid;
        (*e).actor_tid = old;
        (*e).comm = bpf_get_current_comm().unwrap_or_default();
        let src = ctx.as_ptr().cast::<u8>().add((loc & 0xffff) as usize);
        if bpf_probe_read_kernel_str_bytes(src, &mut (*e).text).is_err() {
            (*e).text[0] = 0;
        }
    });
}

/// `oom:mark_victim`, in the task whose allocation invoked the OOM killer.
pub fn try_oom(ctx: &TracePointContext) {
    let Some(victim) = read::<i32>(ctx, 8) else {
        return;
    };
    #[expect(clippy::cast_sign_loss, reason = "pids are positive")]
    let victim = victim as u32;
    let (tgid, tid) = current_ids();
    let target = unsafe { TASKS.get(&victim) }.copied();
    if target.is_none() && current_task(tgid, tid).is_none() {
        return;
    }
    let loc = read::<u32>(ctx, 12).unwrap_or(0);
    emit(EventKind::Oom, |e| unsafe {
        (*e).pid = target.map_or(0, |t| t.tgid);
        (*e).tid = victim;
        (*e).actor_pid = tgid;
        (*e).actor_tid = tid;
        (*e).actor_comm = bpf_get_current_comm().unwrap_or_default();
        (*e).actor_cgroup = bpf_get_current_cgroup_id();
        for (i, off) in [16usize, 24, 32, 40, 56].into_iter().enumerate() {
            (*e).args[i] = read::<u64>(ctx, off).unwrap_or(0);
        }
        #[expect(clippy::cast_sign_loss, reason = "raw bits, decoded by user space")]
        {
            (*e).args[5] = i64::from(read::<i16>(ctx, 64).unwrap_or(0)) as u64;
        }
        let src = ctx.as_ptr().cast::<u8>().add((loc & 0xffff) as usize);
        let n = TEXT_LEN.min(TASK_COMM_LEN);
        if bpf_probe_read_kernel_str_bytes(src, &mut (&mut (*e).text)[..n]).is_err() {
            (*e).text[0] = 0;
        }
    });
}

/// `cgroup:cgroup_attach_task`, in the task writing `cgroup.procs` (a runtime, systemd, a
/// shell): a task moved into a target cgroup joins, one moved out leaves. Only the v2 hierarchy
/// (root 0) is followed; target cgroups are v2 cgroups.
pub fn try_cgroup_attach(ctx: &TracePointContext) {
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    if cfg.flags & CONFIG_FOLLOW_CGROUP_MOVES == 0 || read::<i32>(ctx, 8) != Some(0) {
        return;
    }
    let (Some(dst), Some(pid)) = (read::<u64>(ctx, 16), read::<i32>(ctx, 24)) else {
        return;
    };
    #[expect(clippy::cast_sign_loss, reason = "pids are positive")]
    let pid = pid as u32;
    let member = unsafe { TASKS.get(&pid) }.copied();
    let kind = match (cgroup_id_is_target(dst), member) {
        (true, None) => {
            let info = TaskInfo {
                tgid: 0,
                flags: TASK_TGID_UNKNOWN,
                ..TaskInfo::default()
            };
            if TASKS.insert(&pid, &info, u64::from(BPF_NOEXIST)).is_err() {
                count(Counter::TasksMapFull);
                return;
            }
            EventKind::Joined
        }
        (false, Some(_)) => {
            let _ = TASKS.remove(&pid);
            EventKind::Left
        }
        _ => return,
    };
    let (tgid, tid) = current_ids();
    emit(kind, |e| unsafe {
        (*e).pid = member.map_or(0, |m| m.tgid);
        (*e).tid = pid;
        (*e).actor_pid = tgid;
        (*e).actor_tid = tid;
        (*e).actor_comm = bpf_get_current_comm().unwrap_or_default();
        (*e).args[0] = dst;
    });
}
