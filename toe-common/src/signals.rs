//! Signal and process-lifecycle collector: who signalled whom, what the target did with it, and
//! how each target process ended.
//!
//! `signal:signal_generate` runs in the *sender's* context, so the cgroup of the running task says
//! nothing about the receiver. The kernel side therefore keeps [`TASKS_MAP`], every task (thread)
//! of every target process: user space seeds it from `/proc` and `cgroup.threads`, and the kernel
//! keeps it current from then on (clones of target tasks join, exits leave, moves into a target
//! cgroup join and moves out leave). A signal is emitted only when its receiver is in the map.
//! Everything else (delivery, exec, exit) runs in the target's own context.

use crate::TASK_COMM_LEN;

/// `HashMap<u32 tid, TaskInfo>`: tasks of target processes.
pub const TASKS_MAP: &str = "TOE_SIG_TASKS";
/// `RingBuf` of [`Event`].
pub const EVENTS_RING: &str = "TOE_SIG_EVENTS";
/// `HashMap<u64, StoredStack>`: sender stacks referenced by [`Event::ustack`]/[`Event::kstack`].
pub const STACKS_MAP: &str = "TOE_SIG_STACKS";
/// `Array<SigConfig>` with one entry.
pub const CONFIG_MAP: &str = "TOE_SIG_CONFIG";
/// `RingBuf` of [`SenderCopy`]: the sender's user stack for unwinding with unwind tables, apart
/// from the events so that copies the ring cannot hold never cost an event.
pub const COPIES_RING: &str = "TOE_SIG_COPIES";
/// Size of [`COPIES_RING`] when sender stacks are copied: 56 copies in flight, plenty for
/// signals (a burst beyond it keeps its events and falls back to frame pointers, counted).
pub const COPIES_RING_BYTES: u32 = 1 << 20;
/// The `signal_generate` program that also copies the sender's stack (needs
/// `bpf_task_pt_regs`, Linux 5.15); [`PROGRAMS`]' own one walks frame pointers only.
pub const GENERATE_COPY_PROGRAM: &str = "toe_sig_generate_copy";
/// `PerCpuArray<u64>` indexed by [`counter_index`] and [`Counter`].
pub const COUNTERS_MAP: &str = "TOE_SIG_COUNTERS";

pub const MAX_TASKS: u32 = 1 << 16;
/// Distinct sender stacks (preallocated, about 1 KiB each).
pub const MAX_STACKS: u32 = 1 << 12;
/// Compiled-in ring size; user space sets the real one (`--ring-size`) at load time.
pub const RING_BYTES: u32 = 1 << 23;
/// Sender comm names the kernel compares against (`--senders`).
pub const MAX_SENDERS: usize = 8;
/// Bytes of an exec'd file name or OOM victim name kept in an event.
pub const TEXT_LEN: usize = 128;

/// Programs and the tracepoints they attach to.
pub const PROGRAMS: &[(&str, &str, &str)] = &[
    ("toe_sig_generate", "signal", "signal_generate"),
    ("toe_sig_deliver", "signal", "signal_deliver"),
    ("toe_sig_newtask", "task", "task_newtask"),
    ("toe_sig_exit", "sched", "sched_process_exit"),
    ("toe_sig_exec", "sched", "sched_process_exec"),
    ("toe_sig_exit_call", "syscalls", "sys_enter_exit_group"),
    ("toe_sig_exit_call", "syscalls", "sys_enter_exit"),
    ("toe_sig_oom", "oom", "mark_victim"),
    ("toe_sig_cgroup_attach", "cgroup", "cgroup_attach_task"),
];

/// Tracepoint fields the kernel side reads at fixed offsets: (category, event, field, offset,
/// size). User space checks each against the running kernel's `format` file before loading, so a
/// kernel with another layout gets a clear refusal instead of garbage events.
pub const FIELDS: &[(&str, &str, &str, usize, usize)] = &[
    ("signal", "signal_generate", "sig", 8, 4),
    ("signal", "signal_generate", "errno", 12, 4),
    ("signal", "signal_generate", "code", 16, 4),
    ("signal", "signal_generate", "comm", 20, 16),
    ("signal", "signal_generate", "pid", 36, 4),
    ("signal", "signal_generate", "group", 40, 4),
    ("signal", "signal_generate", "result", 44, 4),
    ("signal", "signal_deliver", "sig", 8, 4),
    ("signal", "signal_deliver", "errno", 12, 4),
    ("signal", "signal_deliver", "code", 16, 4),
    ("signal", "signal_deliver", "sa_handler", 24, 8),
    ("signal", "signal_deliver", "sa_flags", 32, 8),
    ("task", "task_newtask", "pid", 8, 4),
    ("task", "task_newtask", "comm", 12, 16),
    ("task", "task_newtask", "clone_flags", 32, 8),
    ("sched", "sched_process_exec", "filename", 8, 4),
    ("sched", "sched_process_exec", "pid", 12, 4),
    ("sched", "sched_process_exec", "old_pid", 16, 4),
    ("syscalls", "sys_enter_exit_group", "error_code", 16, 8),
    ("syscalls", "sys_enter_exit", "error_code", 16, 8),
    ("oom", "mark_victim", "pid", 8, 4),
    ("oom", "mark_victim", "comm", 12, 4),
    ("oom", "mark_victim", "total_vm", 16, 8),
    ("oom", "mark_victim", "anon_rss", 24, 8),
    ("oom", "mark_victim", "file_rss", 32, 8),
    ("oom", "mark_victim", "shmem_rss", 40, 8),
    ("oom", "mark_victim", "uid", 48, 4),
    ("oom", "mark_victim", "pgtables", 56, 8),
    ("oom", "mark_victim", "oom_score_adj", 64, 2),
    ("cgroup", "cgroup_attach_task", "dst_root", 8, 4),
    ("cgroup", "cgroup_attach_task", "dst_id", 16, 8),
    ("cgroup", "cgroup_attach_task", "pid", 24, 4),
];

/// `sched:sched_process_exit`'s `group_dead` (Linux 6.16 and later): whether the exiting thread
/// is the process's last. Older kernels lack it, and the program then takes the leader's exit for
/// the process's ([`CONFIG_LEADER_EXIT_ENDS_PROCESS`]).
pub const GROUP_DEAD_FIELD: (&str, &str, &str, usize, usize) =
    ("sched", "sched_process_exit", "group_dead", 32, 1);

/// [`TaskInfo::flags`]: the process called `exit`/`exit_group`; `exit_code` holds its argument.
pub const TASK_EXIT_CALLED: u32 = 1 << 0;
/// [`TaskInfo::flags`]: the last thread of the process has exited; user space removes the
/// process's entries once it has seen the exit (the kernel still needs the leader's entry for
/// the parent notification that follows the exit).
pub const TASK_DEAD: u32 = 1 << 1;
/// [`TaskInfo::flags`]: joined by a cgroup move; the kernel did not know its process id.
pub const TASK_TGID_UNKNOWN: u32 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskInfo {
    pub tgid: u32,
    pub flags: u32,
    pub exit_code: i32,
    pub reserved: u32,
}
const _: () = assert!(size_of::<TaskInfo>() == 16);

/// [`SigConfig::flags`]: unwind the sender's user stack.
pub const CONFIG_USER_STACKS: u32 = 1 << 0;
/// [`SigConfig::flags`]: unwind the sender's kernel stack.
pub const CONFIG_KERNEL_STACKS: u32 = 1 << 1;
/// [`SigConfig::flags`]: membership follows cgroup moves (the target is a cgroup).
pub const CONFIG_FOLLOW_CGROUP_MOVES: u32 = 1 << 2;
/// [`SigConfig::flags`]: the kernel has no [`GROUP_DEAD_FIELD`]; the process's exit is its
/// leader thread's, as bcc's `exitsnoop` counts it (a leader that leaves by `pthread_exit` while
/// other threads run ends the process early in the record).
pub const CONFIG_LEADER_EXIT_ENDS_PROCESS: u32 = 1 << 3;
/// [`SigConfig::flags`]: copy the sender's user registers and stack into [`COPIES_RING`].
pub const CONFIG_USER_STACK_COPY: u32 = 1 << 4;

/// A sender's stack copy, for the `Generate` event of the same `time_ns` and `actor_tid`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SenderCopy {
    pub time_ns: u64,
    pub pid: u32,
    pub tid: u32,
    /// 1 when the registers or the stack could not be read.
    pub failed: u32,
    pub reserved: u32,
    pub copy: crate::stacks::UserStackCopy,
}
const _: () = assert!(size_of::<SenderCopy>() == 24 + size_of::<crate::stacks::UserStackCopy>());

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SigConfig {
    /// Bit `n - 1` set: signal `n` is of interest. All ones: every signal.
    pub signals: u64,
    pub flags: u32,
    /// Entries of `senders` in use; 0: any sender.
    pub sender_count: u32,
    /// Sender comm names, NUL-padded.
    pub senders: [[u8; TASK_COMM_LEN]; MAX_SENDERS],
}
const _: () = assert!(size_of::<SigConfig>() == 16 + 16 * MAX_SENDERS);

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// A signal was generated towards a target task (sender's context).
    Generate = 0,
    /// A target task dequeued a signal to act on it (its own context).
    Deliver = 1,
    /// A target task created a process or thread.
    Fork = 2,
    Exec = 3,
    /// The last thread of a target process exited.
    Exit = 4,
    /// The OOM killer chose a victim that is a target, or a target's allocation invoked it.
    Oom = 5,
    /// A task became a target by moving into a target cgroup.
    Joined = 6,
    /// A target task moved out of the target cgroups.
    Left = 7,
    /// A target process notified its (non-target) parent of its exit: `SIGCHLD` whose `si_code`
    /// says exited, killed or dumped core. Laid out as `Generate`.
    ExitNotice = 8,
}

pub const EVENT_KINDS: u32 = 9;

impl EventKind {
    pub const ALL: [Self; EVENT_KINDS as usize] = [
        Self::Generate,
        Self::Deliver,
        Self::Fork,
        Self::Exec,
        Self::Exit,
        Self::Oom,
        Self::Joined,
        Self::Left,
        Self::ExitNotice,
    ];

    #[must_use]
    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Generate => "signal",
            Self::Deliver => "delivery",
            Self::Fork => "fork",
            Self::Exec => "exec",
            Self::Exit => "exit",
            Self::Oom => "oom_kill",
            Self::Joined => "joined",
            Self::Left => "left",
            Self::ExitNotice => "exit_notice",
        }
    }
}

/// One record of [`EVENTS_RING`]. Which fields mean what depends on `kind`:
///
/// | kind     | pid/tid/comm          | actor                    | args                                   | text     |
/// |----------|-----------------------|--------------------------|----------------------------------------|----------|
/// | Generate | receiver              | sender (+cgroup, stacks) | -                                      | -        |
/// | Deliver  | receiver              | -                        | sa_handler, sa_flags                   | -        |
/// | Fork     | parent                | child (tid = new task)   | clone_flags                            | -        |
/// | Exec     | the process           | - (actor_tid: old tid)   | -                                      | filename |
/// | Exit     | the process           | -                        | exit code, task flags                  | -        |
/// | Oom      | victim                | task that hit the limit  | total_vm, anon, file, shmem, pgtables (KiB), oom_score_adj | victim comm |
/// | Joined   | moved task            | mover                    | destination cgroup id                  | -        |
/// | Left     | moved task            | mover                    | destination cgroup id                  | -        |
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub time_ns: u64,
    pub kind: u32,
    pub sig: i32,
    pub code: i32,
    pub errno: i32,
    /// Generate: the kernel's `TRACE_SIGNAL_*` result.
    pub result: i32,
    /// Generate: 1 when the signal is for the whole process (kill), 0 for one thread (tgkill).
    pub group: u32,
    /// Process id (tgid) of the task the event is about; 0 when the kernel did not know it.
    pub pid: u32,
    pub tid: u32,
    pub actor_pid: u32,
    pub actor_tid: u32,
    /// cgroup v2 id of the actor.
    pub actor_cgroup: u64,
    /// Hashes of the actor's stacks in [`STACKS_MAP`]; 0: not taken or lost.
    pub ustack: u64,
    pub kstack: u64,
    pub comm: [u8; TASK_COMM_LEN],
    pub actor_comm: [u8; TASK_COMM_LEN],
    pub args: [u64; 6],
    pub text: [u8; TEXT_LEN],
}
const _: () = assert!(size_of::<Event>() == 280);

/// Per event kind, two counters: events the kernel tried to emit and events lost because the
/// ring was full. `emitted - lost` must equal what user space received.
#[must_use]
pub const fn counter_index(kind: EventKind, lost: bool) -> u32 {
    kind as u32 * 2 + lost as u32
}

/// Counters after the per-kind pairs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A stack could not be unwound (no user context, e.g. a kernel thread sender).
    StackUnwind = EVENT_KINDS * 2,
    /// The stack map was full.
    StackMapFull = EVENT_KINDS * 2 + 1,
    /// A task of a target could not be added to the tasks map (full): it is not covered.
    TasksMapFull = EVENT_KINDS * 2 + 2,
    /// Signals towards targets dropped by the `--signals`/`--senders` filters.
    Filtered = EVENT_KINDS * 2 + 3,
    /// Tasks found by the kernel in a target cgroup that were missing from the map (started in
    /// the cgroup directly, e.g. `clone3(CLONE_INTO_CGROUP)`).
    LateJoins = EVENT_KINDS * 2 + 4,
    /// Sender stack copies lost because [`COPIES_RING`] was full (the event keeps its
    /// frame-pointer stack).
    CopiesLost = EVENT_KINDS * 2 + 5,
}
pub const COUNTER_COUNT: u32 = EVENT_KINDS * 2 + 6;

/// `TRACE_SIGNAL_*` from include/trace/events/signal.h.
#[must_use]
pub fn result_name(result: i32) -> &'static str {
    match result {
        0 => "delivered",
        1 => "ignored",
        2 => "already_pending",
        3 => "overflow",
        4 => "lost_info",
        _ => "unknown",
    }
}

pub const SIGKILL: i32 = 9;
pub const SIGTERM: i32 = 15;
pub const SIGCHLD: i32 = 17;
/// `CLD_EXITED`, `CLD_KILLED`, `CLD_DUMPED`: `si_code` of the `SIGCHLD` that reports an exit.
pub const CLD_EXITED: i32 = 1;
pub const CLD_KILLED: i32 = 2;
pub const CLD_DUMPED: i32 = 3;
/// The highest signal number (`_NSIG`).
pub const MAX_SIGNAL: i32 = 64;

/// What a signal does when its handler is `SIG_DFL` (signal(7)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultAction {
    Terminate,
    Core,
    Ignore,
    Stop,
    Continue,
}

#[cfg(feature = "std")]
/// x86-64 and arm64 numbering (the generic Linux ABI; `SIGSTKFLT` exists on both).
const NAMES: [&str; 31] = [
    "SIGHUP",
    "SIGINT",
    "SIGQUIT",
    "SIGILL",
    "SIGTRAP",
    "SIGABRT",
    "SIGBUS",
    "SIGFPE",
    "SIGKILL",
    "SIGUSR1",
    "SIGSEGV",
    "SIGUSR2",
    "SIGPIPE",
    "SIGALRM",
    "SIGTERM",
    "SIGSTKFLT",
    "SIGCHLD",
    "SIGCONT",
    "SIGSTOP",
    "SIGTSTP",
    "SIGTTIN",
    "SIGTTOU",
    "SIGURG",
    "SIGXCPU",
    "SIGXFSZ",
    "SIGVTALRM",
    "SIGPROF",
    "SIGWINCH",
    "SIGIO",
    "SIGPWR",
    "SIGSYS",
];

/// Real-time signals start here (the kernel's `SIGRTMIN`; glibc reserves 32 and 33).
pub const SIGRTMIN: i32 = 32;

#[cfg(feature = "std")]
mod names {
    use super::{DefaultAction, MAX_SIGNAL, NAMES, SIGRTMIN};

    /// `SIGTERM`, or `SIGRT_2` for real-time signals (strace's spelling, counted from the
    /// kernel's `SIGRTMIN`), or the number.
    #[must_use]
    pub fn signal_name(sig: i32) -> String {
        match usize::try_from(sig) {
            Ok(n @ 1..=31) => NAMES[n - 1].to_owned(),
            _ if (SIGRTMIN..=MAX_SIGNAL).contains(&sig) => format!("SIGRT_{}", sig - SIGRTMIN),
            _ => sig.to_string(),
        }
    }

    /// Parses `TERM`, `SIGTERM`, `sigterm`, `15`, `SIGRT_2` or `RTMIN+2` (both 34).
    pub fn parse_signal(raw: &str) -> Result<i32, String> {
        let t = raw.trim();
        if let Ok(n) = t.parse::<i32>() {
            return if (1..=MAX_SIGNAL).contains(&n) {
                Ok(n)
            } else {
                Err(format!("signal {n} is out of range 1..={MAX_SIGNAL}"))
            };
        }
        let upper = t.to_ascii_uppercase();
        let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
        if let Some(i) = NAMES.iter().position(|n| &n[3..] == bare) {
            return Ok(i32::try_from(i).unwrap_or(0) + 1);
        }
        let aliases = [("IOT", 6), ("POLL", 29), ("CLD", 17)];
        if let Some((_, n)) = aliases.iter().find(|(a, _)| *a == bare) {
            return Ok(*n);
        }
        let rt = bare
            .strip_prefix("RT_")
            .map(|n| (n, SIGRTMIN))
            .or_else(|| bare.strip_prefix("RTMIN+").map(|n| (n, SIGRTMIN)));
        if let Some((n, base)) = rt
            && let Ok(off) = n.parse::<i32>()
            && (0..=MAX_SIGNAL - base).contains(&off)
        {
            return Ok(base + off);
        }
        Err(format!(
            "\"{raw}\" is not a signal (use a name such as TERM, SIGKILL, USR1, or a number 1..={MAX_SIGNAL})"
        ))
    }

    /// signal(7)'s default dispositions; real-time signals terminate.
    #[must_use]
    pub fn default_action(sig: i32) -> DefaultAction {
        match sig {
            3..=8 | 11 | 24 | 25 | 31 => DefaultAction::Core,
            17 | 23 | 28 => DefaultAction::Ignore,
            19..=22 => DefaultAction::Stop,
            18 => DefaultAction::Continue,
            _ => DefaultAction::Terminate,
        }
    }

    /// Names of `si_code` values: the generic ones, and those of the signals whose codes an
    /// incident is likely to show.
    #[must_use]
    pub fn code_name(sig: i32, code: i32) -> String {
        let generic = match code {
            0 => Some("SI_USER"),
            0x80 => Some("SI_KERNEL"),
            -1 => Some("SI_QUEUE"),
            -2 => Some("SI_TIMER"),
            -3 => Some("SI_MESGQ"),
            -4 => Some("SI_ASYNCIO"),
            -5 => Some("SI_SIGIO"),
            -6 => Some("SI_TKILL"),
            _ => None,
        };
        if let Some(g) = generic {
            return g.into();
        }
        let specific: &[&str] = match sig {
            17 => &[
                "CLD_EXITED",
                "CLD_KILLED",
                "CLD_DUMPED",
                "CLD_TRAPPED",
                "CLD_STOPPED",
                "CLD_CONTINUED",
            ],
            11 => &["SEGV_MAPERR", "SEGV_ACCERR", "SEGV_BNDERR", "SEGV_PKUERR"],
            7 => &["BUS_ADRALN", "BUS_ADRERR", "BUS_OBJERR", "BUS_MCEERR_AR"],
            4 => &["ILL_ILLOPC", "ILL_ILLOPN", "ILL_ILLADR", "ILL_ILLTRP"],
            8 => &["FPE_INTDIV", "FPE_INTOVF", "FPE_FLTDIV", "FPE_FLTOVF"],
            _ => &[],
        };
        usize::try_from(code)
            .ok()
            .and_then(|c| c.checked_sub(1))
            .and_then(|i| specific.get(i))
            .map_or_else(|| code.to_string(), |s| (*s).to_owned())
    }
}

#[cfg(feature = "std")]
pub use names::{code_name, default_action, parse_signal, signal_name};

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), Copy, no padding (sizes asserted above), every bit pattern valid.
    unsafe impl aya::Pod for super::TaskInfo {}
    unsafe impl aya::Pod for super::SigConfig {}
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn signal_names_round_trip() {
        for sig in 1..=MAX_SIGNAL {
            assert_eq!(parse_signal(&signal_name(sig)), Ok(sig), "{sig}");
        }
        assert_eq!(parse_signal("term"), Ok(SIGTERM));
        assert_eq!(parse_signal("SIGKILL"), Ok(SIGKILL));
        assert_eq!(parse_signal("RTMIN+2"), Ok(34));
        assert!(parse_signal("SIGFOO").unwrap_err().contains("not a signal"));
        assert!(parse_signal("65").unwrap_err().contains("out of range"));
    }

    #[test]
    fn default_actions_follow_signal_7() {
        assert_eq!(default_action(SIGTERM), DefaultAction::Terminate);
        assert_eq!(default_action(11), DefaultAction::Core);
        assert_eq!(default_action(SIGCHLD), DefaultAction::Ignore);
        assert_eq!(default_action(19), DefaultAction::Stop);
        assert_eq!(default_action(40), DefaultAction::Terminate);
    }

    #[test]
    fn codes_are_named_per_signal() {
        assert_eq!(code_name(SIGCHLD, CLD_DUMPED), "CLD_DUMPED");
        assert_eq!(code_name(SIGTERM, 0), "SI_USER");
        assert_eq!(code_name(SIGTERM, -6), "SI_TKILL");
        assert_eq!(code_name(SIGTERM, 7), "7");
    }
}
