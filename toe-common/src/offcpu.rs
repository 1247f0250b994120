//! Off-CPU collector: where target threads wait, and why.
//!
//! [`PERF_PROGRAM`] runs on software `context-switches` perf events that belong to the target:
//! one per target thread (inherited by the threads and processes it starts) or one per CPU for
//! each target cgroup. The kernel fires them only when a target thread leaves a CPU, so no other
//! switch on the node runs a program. At a switch-out the program keeps the time, the thread's
//! CPU time, its stacks and the reason in [`STARTS_MAP`] under its thread id; at its next
//! switch-out (or its exit) the wait that began at the last one ended at "now less the CPU time
//! used since", and is added to a per-(process, thread name, stacks, reason) total in
//! [`WAITS_MAP`]. Nothing is streamed per switch.
//!
//! Where the events cannot be used (no BTF to find the task's fields, no perf events for the
//! cgroup), [`RAW_PROGRAM`] or [`PROGRAM`] on the `sched_switch` tracepoint does the same with
//! the switch-in seen directly, at the cost of a program run on every switch of the node.
//!
//! Waits still open at the end (a thread blocked for the whole run: a deadlock, an idle pool) are
//! read from [`STARTS_MAP`] by user space and added up to the end of the run.

use crate::TASK_COMM_LEN;

/// On `sched:sched_switch` as a classic tracepoint (reads the trace record).
pub const PROGRAM: &str = "toe_offcpu_switch";
/// On `sched_switch` as a raw tracepoint (reads the tracepoint's arguments): no trace record is
/// built, which is most of what every other switch on the node pays. Needs the `prev_state`
/// argument, added in Linux 5.18.
pub const RAW_PROGRAM: &str = "toe_offcpu_switch_raw";
/// On a software `context-switches` perf event opened per target thread (inherited by the
/// threads and processes it starts) or per target cgroup and CPU: the kernel runs it only for
/// a target's own switches, so every other switch on the node pays no program at all. A wait's
/// end is not traced: it is the next switch-out's time less the CPU time the thread used since
/// (`se.sum_exec_runtime`, which the scheduler brings up to date before the switch).
pub const PERF_PROGRAM: &str = "toe_offcpu_perf";
/// With [`PERF_PROGRAM`], on `sched:sched_process_exit`: a thread's last wait ends when it
/// runs its exit, and a per-thread event is gone before its last switch.
pub const EXIT_PROGRAM: &str = "toe_offcpu_exit";
/// `Array<OffConfig>` with one entry.
pub const CONFIG_MAP: &str = "TOE_OFF_CONFIG";
/// `HashMap<u64, OffStart>`: target threads off CPU now (and the on-CPU stint of those that
/// came back), by thread id (classic program) or by task pointer (raw program, which gets the
/// next task as a pointer and so needs no field offset to recognise it).
pub const STARTS_MAP: &str = "TOE_OFF_STARTS";
/// `HashMap<WaitKey, WaitStats>`: per stack and reason totals.
pub const WAITS_MAP: &str = "TOE_OFF_WAITS";
/// `HashMap<u64, StoredStack>` referenced by [`WaitKey`] (see [`crate::stacks`]).
pub const STACKS_MAP: &str = "TOE_OFF_STACKS";
/// `PerCpuArray<u64>` indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "TOE_OFF_COUNTERS";

/// Threads of the target that can be off CPU at once (about 64 bytes each).
pub const MAX_THREADS: u32 = 1 << 15;
/// Compiled-in capacity of [`WAITS_MAP`]; the `max-waits` argument sets the real one.
pub const DEFAULT_MAX_WAITS: u32 = 1 << 14;
/// Distinct stacks (preallocated, about 1 KiB each).
pub const MAX_STACKS: u32 = 1 << 13;

/// `OffConfig::flags`: record user stacks.
pub const CONFIG_USER_STACKS: u32 = 1 << 0;
/// `OffConfig::flags`: record kernel stacks.
pub const CONFIG_KERNEL_STACKS: u32 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffConfig {
    pub flags: u32,
    pub reserved: u32,
    /// Waits shorter than this are counted (number and time), not recorded.
    pub min_block_ns: u64,
    /// Waits longer than this are counted, not recorded; 0: no bound.
    pub max_block_ns: u64,
    /// For [`PERF_PROGRAM`]: offsets in this kernel's `struct task_struct` (from its BTF).
    pub task: TaskOffsets,
}
const _: () = assert!(size_of::<OffConfig>() == 40);

/// Where [`PERF_PROGRAM`] reads a task's state, CPU time and switch counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskOffsets {
    /// `__state` (`state` before Linux 5.14; its low 32 bits on little-endian).
    pub state: u32,
    /// `se.sum_exec_runtime`: CPU time in ns, updated when the task leaves the CPU.
    pub runtime: u32,
    /// `nvcsw` and `nivcsw`, counted before the switch's events fire: two firings that see
    /// the same sum are one switch (a thread whose event was also inherited).
    pub nvcsw: u32,
    pub nivcsw: u32,
}

// `sched:sched_switch` record layout (include/trace/events/sched.h, unchanged since 4.x);
// user space checks it against the running kernel's format file before attaching.
pub const SWITCH_PREV_STATE: usize = 32;
pub const SWITCH_NEXT_PID: usize = 56;

/// Why a thread went off CPU, from the tracepoint's `prev_state`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Sleeping (`S`, `TASK_INTERRUPTIBLE`): locks, sleeps, waits for input.
    Blocked = 0,
    /// `D` (`TASK_UNINTERRUPTIBLE`): disk and similar I/O, some kernel locks, vfork.
    Uninterruptible = 1,
    /// Still runnable (`R`, or `R+` when preempted): waiting for a CPU, because another task
    /// had it or because the cgroup's CPU quota was used up (throttled).
    Runnable = 2,
    /// Stopped (`T`) or traced (`t`).
    Stopped = 3,
}
pub const REASON_COUNT: usize = 4;

/// `prev_state` bits as the tracepoint reports them (`__trace_sched_switch_state`): one bit per
/// state in `TASK_REPORT`, above them a bit for "preempted while running".
const STATE_INTERRUPTIBLE: u64 = 0x01;
const STATE_UNINTERRUPTIBLE: u64 = 0x02;
const STATE_STOPPED: u64 = 0x04 | 0x08;
const STATE_EXITING: u64 = 0x10 | 0x20;
const STATE_REPORTED: u64 = 0x7f;

impl Reason {
    pub const ALL: [Self; REASON_COUNT] = [
        Self::Blocked,
        Self::Uninterruptible,
        Self::Runnable,
        Self::Stopped,
    ];

    /// The reason for a `prev_state`; `None` for a task that is exiting (it never comes back).
    #[must_use]
    pub const fn from_state(state: u64) -> Option<Self> {
        if state & STATE_EXITING != 0 {
            None
        } else if state & STATE_REPORTED == 0 {
            // 0 (`R`), the preempted bit (`R+`), or `I` (an idle kernel thread) alone.
            if state & 0x80 != 0 {
                Some(Self::Blocked)
            } else {
                Some(Self::Runnable)
            }
        } else {
            Some(Self::asleep(state, false))
        }
    }

    /// The reason for the raw tracepoint's `preempt` and `prev_state` (the task's `__state`, not
    /// the record's report bits); `None` for a task making its last switch (`TASK_DEAD`).
    #[must_use]
    pub const fn from_raw_state(preempt: bool, state: u64) -> Option<Self> {
        const TASK_DEAD: u64 = 0x80;
        const TASK_NOLOAD: u64 = 0x400;
        if state & TASK_DEAD != 0 {
            None
        } else if preempt || state == 0 {
            Some(Self::Runnable)
        } else {
            // TASK_IDLE (uninterruptible without load) is an idle kernel thread, not I/O.
            Some(Self::asleep(state, state & TASK_NOLOAD != 0))
        }
    }

    /// A thread that went to sleep, by its state bits (the same in both encodings).
    const fn asleep(state: u64, idle: bool) -> Self {
        if state & STATE_UNINTERRUPTIBLE != 0 && !idle {
            Self::Uninterruptible
        } else if state & (STATE_INTERRUPTIBLE | STATE_UNINTERRUPTIBLE) != 0 {
            Self::Blocked
        } else if state & STATE_STOPPED != 0 {
            Self::Stopped
        } else {
            Self::Blocked
        }
    }

    #[must_use]
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Blocked),
            1 => Some(Self::Uninterruptible),
            2 => Some(Self::Runnable),
            3 => Some(Self::Stopped),
            _ => None,
        }
    }

    /// The label value and the name of the synthetic frame that carries it.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Blocked => "blocked",
            Self::Uninterruptible => "uninterruptible",
            Self::Runnable => "runnable",
            Self::Stopped => "stopped",
        }
    }
}

/// A target thread off CPU (`ts != 0`), or back on it since `on_since`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffStart {
    /// When it went off CPU (kernel monotonic ns); 0 while it runs.
    pub ts: u64,
    /// When it came back on CPU (for the on-CPU time of target threads); 0 when unknown.
    /// With [`PERF_PROGRAM`], which never sees a switch-in: its CPU time at the switch-out.
    pub on_since: u64,
    pub ustack: u64,
    pub kstack: u64,
    pub tgid: u32,
    /// [`Reason`].
    pub reason: u32,
    pub tid: u32,
    pub reserved: u32,
    pub comm: [u8; TASK_COMM_LEN],
    /// With [`PERF_PROGRAM`]: the thread's switch count at the switch-out.
    pub switches: u64,
}
const _: () = assert!(size_of::<OffStart>() == 72);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WaitKey {
    pub tgid: u32,
    /// [`Reason`].
    pub reason: u32,
    /// Stack hashes in the stack map; 0: none (off, or lost and counted).
    pub ustack: u64,
    pub kstack: u64,
    pub comm: [u8; TASK_COMM_LEN],
}
const _: () = assert!(size_of::<WaitKey>() == 40);

impl WaitKey {
    /// The total a wait that began at `start` is added to.
    #[must_use]
    pub const fn of(start: &OffStart) -> Self {
        Self {
            tgid: start.tgid,
            reason: start.reason,
            ustack: start.ustack,
            kstack: start.kstack,
            comm: start.comm,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaitStats {
    pub ns: u64,
    pub count: u64,
}
const _: () = assert!(size_of::<WaitStats>() == 16);

/// Indices into [`COUNTERS_MAP`]. `Switches = Recorded + Short + Long + Unmatched + open at the
/// end`, where Unmatched is what the map-full counters explain.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Target threads switched off CPU.
    Switches = 0,
    /// Waits added to a total.
    Recorded = 1,
    /// Waits shorter than `min-block` (counted, not recorded) and their time.
    Short = 2,
    ShortNs = 3,
    /// Waits longer than `max-block`, and their time.
    Long = 4,
    LongNs = 5,
    /// Switch-outs not tracked: [`STARTS_MAP`] was full.
    StartsFull = 6,
    /// Waits lost: [`WAITS_MAP`] was full.
    WaitsFull = 7,
    WaitsFullNs = 8,
    /// Stacks that could not be unwound, or stored (the stack map was full).
    UserStackLost = 9,
    KernelStackLost = 10,
    StacksFull = 11,
    /// On-CPU time of target threads between a switch-in and the next switch-out.
    OnCpuNs = 12,
    /// Target threads that exited (their start entries were removed).
    Exited = 13,
    /// Waits whose end was never seen: the thread went off CPU again first, or came back with
    /// a clock reading before its start.
    Unmatched = 14,
}
pub const COUNTER_COUNT: u32 = 15;

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), Copy, no padding (sizes asserted above), every bit pattern valid.
    unsafe impl aya::Pod for super::OffConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OffStart {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WaitKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WaitStats {}
}

#[cfg(test)]
mod tests {
    use super::Reason;

    #[test]
    fn states_map_to_reasons_as_the_tracepoint_prints_them() {
        assert_eq!(Reason::from_state(0), Some(Reason::Runnable)); // R
        assert_eq!(Reason::from_state(0x100), Some(Reason::Runnable)); // R+
        assert_eq!(Reason::from_state(0x01), Some(Reason::Blocked)); // S
        assert_eq!(Reason::from_state(0x02), Some(Reason::Uninterruptible)); // D
        assert_eq!(Reason::from_state(0x04), Some(Reason::Stopped)); // T
        assert_eq!(Reason::from_state(0x08), Some(Reason::Stopped)); // t
        assert_eq!(Reason::from_state(0x80), Some(Reason::Blocked)); // I
        assert_eq!(Reason::from_state(0x10), None); // X
        assert_eq!(Reason::from_state(0x20), None); // Z
        assert_eq!(Reason::from_raw_state(true, 0x01), Some(Reason::Runnable));
        assert_eq!(Reason::from_raw_state(false, 0), Some(Reason::Runnable));
        assert_eq!(Reason::from_raw_state(false, 0x01), Some(Reason::Blocked));
        assert_eq!(
            Reason::from_raw_state(false, 0x102),
            Some(Reason::Uninterruptible)
        );
        assert_eq!(Reason::from_raw_state(false, 0x402), Some(Reason::Blocked));
        assert_eq!(Reason::from_raw_state(false, 0x2001), Some(Reason::Blocked));
        assert_eq!(Reason::from_raw_state(false, 0x04), Some(Reason::Stopped));
        assert_eq!(Reason::from_raw_state(false, 0x80), None);
        for r in Reason::ALL {
            assert_eq!(Reason::from_u32(r as u32), Some(r));
        }
    }
}
