//! The built-in tool catalogue: each tool's argument schema, duration bounds and the typed options
//! its parsed arguments become. Administrators narrow these further in PowerToolConfig.

use std::time::Duration;

use super::args::{Amount, ArgKind, ArgSpec, ParsedArgs};
use crate::cpu;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolKind {
    /// An eBPF collector run by the agent.
    Collector,
    /// A fault the agent injects into the target and rolls back.
    Fault,
}

pub struct ToolDef {
    pub name: &'static str,
    pub kind: ToolKind,
    pub summary: &'static str,
    pub args: &'static [ArgSpec],
    pub default_duration: Duration,
    pub max_duration: Duration,
    pub(super) build: fn(&ParsedArgs) -> ToolOptions,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolOptions {
    CpuProfile(CpuProfileOptions),
    OffcpuProfile(OffcpuProfileOptions),
    MemoryProfile(MemoryProfileOptions),
    SignalTrace(SignalTraceOptions),
    CpuStress(CpuStressOptions),
    MemoryStress(MemoryStressOptions),
    Terminate(TerminateOptions),
    VolumeFill(VolumeFillOptions),
    /// An image-based tool (a PowerToolConfig with engine `ephemeralContainer`): run by the
    /// operator as an ephemeral container in each target pod.
    Image(ImageOptions),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageOptions {
    pub image: String,
    /// The container's arguments: the config's defaults and the validated
    /// `commandLineArguments`, each `--name=value`. Never a shell command line.
    pub argv: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeFillOptions {
    /// A directory as the target sees it (inside its mount namespace).
    pub path: String,
    /// Bytes to write, or the used percentage of the filesystem to reach.
    pub fill: Amount,
    /// May fill a filesystem the node shares (the container's root, the node's own disk). True
    /// for the built-in catalogue (`toe run` on one's own machine); under a PowerToolConfig,
    /// only where an admin set `allowNodeSharedFilesystems`.
    pub allow_node_shared: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TerminateOptions {
    /// SIGTERM, then SIGKILL after `grace` if still alive (as the kubelet does); false: SIGKILL
    /// at once.
    pub graceful: bool,
    pub grace: Duration,
    /// Every process of the target instead of its main process only.
    pub all: bool,
    /// Only processes with one of these names (comm); empty: any.
    pub names: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuStressOptions {
    pub workers: u32,
    /// Percent of one worker's share of the target's CPU capacity (its cgroup limit, else one
    /// core).
    pub load_percent: u32,
    /// `spec.defaultResources.limits.cpu` of the tool's PowerToolConfig, in millicores: the
    /// most CPU the workers may ask for together.
    pub limit_millicores: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryStressOptions {
    /// Bytes, or a percentage of the target's memory limit.
    pub size: Amount,
    /// Time over which the memory is touched in; zero: at once.
    pub ramp: Duration,
    /// `spec.defaultResources.limits.memory` of the tool's PowerToolConfig: the most the
    /// workers may allocate.
    pub limit_bytes: Option<u64>,
    /// May stress a target without a memory limit (its memory is the node's). True for the
    /// built-in catalogue; under a PowerToolConfig, only where an admin set
    /// `allowUnlimitedTargets`.
    pub allow_unlimited: bool,
}

impl ToolOptions {
    /// Checks between arguments that each passed alone; the message names them.
    pub fn check(&self) -> Result<(), String> {
        if let Self::OffcpuProfile(o) = self
            && let Some(max) = o.max_block
            && o.min_block >= max
        {
            return Err(format!(
                "--min-block ({}) must be below --max-block ({}): no wait would be recorded",
                super::format_duration(o.min_block),
                super::format_duration(max)
            ));
        }
        Ok(())
    }

    /// How the tool's stacks name generated code; `None` for a tool that records no user
    /// stacks.
    #[must_use]
    pub fn jit_names(&self) -> Option<JitNames> {
        match self {
            Self::CpuProfile(o) => o.user_stacks.then_some(o.jit_names),
            Self::OffcpuProfile(o) => o.user_stacks.then_some(o.jit_names),
            Self::MemoryProfile(o) => Some(o.jit_names),
            Self::SignalTrace(o) => o.user_stacks.then_some(o.jit_names),
            _ => None,
        }
    }

    /// Whether the tool changes the target (and must be rolled back) rather than observe it.
    #[must_use]
    pub fn is_fault(&self) -> bool {
        matches!(
            self,
            Self::CpuStress(_) | Self::MemoryStress(_) | Self::Terminate(_) | Self::VolumeFill(_)
        )
    }
}

/// How names of generated (JIT-compiled) code in user stacks are found. Ordered from most to
/// least reach into the target: tools run together use the most restrictive of theirs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum JitNames {
    /// Read the perf maps runtimes write, and ask a HotSpot JVM to write one.
    #[default]
    Ask,
    /// Read the perf maps runtimes already write; never ask a process for one.
    Read,
    /// Read no perf map: generated code stays unnamed.
    Ignore,
}

impl JitNames {
    fn parse(args: &ParsedArgs) -> Self {
        match args.choice("jit-names") {
            "read" => Self::Read,
            "ignore" => Self::Ignore,
            _ => Self::Ask,
        }
    }

    /// As the argument is written.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ask => "ask",
            Self::Read => "read",
            Self::Ignore => "ignore",
        }
    }
}

/// How generated code is named, for every collector that records user stacks. An admin who
/// must not have the agent act on a target process (the JVM's attach mechanism makes the JVM
/// run a diagnostic command and write a file in the container) narrows it in PowerToolConfig
/// with an enum rule: `values: [read, ignore]`. No value is a YAML 1.1 boolean (`off`, `no`):
/// helm and kubectl would read it as `false`.
const JIT_ARG: ArgSpec = ArgSpec {
    name: "jit-names",
    kind: ArgKind::Enum(&["ask", "read", "ignore"]),
    default: Some("ask"),
    help: "names of JIT-compiled code: `ask` reads the perf maps runtimes write \
           (/tmp/perf-<pid>.map in the target's root) and asks a HotSpot JVM to write one (its \
           Compiler.perfmap diagnostic command, through its attach socket, as jcmd does); \
           `read` reads existing maps only; `ignore` reads none",
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalTraceOptions {
    /// Bit `n - 1` set: signal `n` is recorded.
    pub signals: u64,
    /// Sender process names (comm); empty: any sender.
    pub senders: Vec<String>,
    pub user_stacks: bool,
    /// Walk the sender's user stack with the binaries' unwind tables (a stack copy per
    /// signal), not by frame pointers only.
    pub unwind_tables: bool,
    pub kernel_stacks: bool,
    /// Ring buffer bytes (a power of two).
    pub ring_bytes: u32,
    /// Events lost beyond this fail the run.
    pub max_lost: u64,
    pub jit_names: JitNames,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocationMode {
    /// Every allocation at or above the minimum size is tracked.
    Exact,
    /// One allocation per `sample_bytes` allocated bytes on average, scaled back up.
    Sampled,
    /// No allocator probes: page faults and RSS only, for any language or allocator.
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryProfileOptions {
    pub allocations: AllocationMode,
    pub sample_bytes: u64,
    pub min_size: u64,
    /// Sample page faults with stacks (the growth profile).
    pub faults: bool,
    pub fault_period: u32,
    pub rss_interval: Duration,
    /// Capacity of the kernel's table of live tracked blocks.
    pub max_tracked: u32,
    /// Walk allocation stacks with the binaries' unwind tables (a stack copy per tracked
    /// allocation), not by frame pointers only.
    pub unwind_tables: bool,
    pub jit_names: JitNames,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffcpuProfileOptions {
    /// Waits shorter than this are counted with their time, not recorded per stack.
    pub min_block: Duration,
    /// Waits longer than this are counted, not recorded; `None`: no bound.
    pub max_block: Option<Duration>,
    /// Also sample on-CPU stacks and write the wall-clock profile (on-CPU plus off-CPU time).
    pub wall: bool,
    /// On-CPU sampling frequency of the wall-clock profile.
    pub frequency_hz: u64,
    pub kernel_stacks: bool,
    pub user_stacks: bool,
    /// Capacity of the kernel's table of per-stack totals.
    pub max_waits: u32,
    pub jit_names: JitNames,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuProfileOptions {
    pub frequency_hz: u64,
    pub kernel_stacks: bool,
    pub user_stacks: bool,
    /// Walk user stacks with the binaries' unwind tables (a stack copy per sample), not by
    /// frame pointers only.
    pub unwind_tables: bool,
    pub jit_names: JitNames,
}

#[expect(clippy::cast_possible_wrap, reason = "small compile-time constants")]
const CPU_ARGS: &[ArgSpec] = &[
    ArgSpec {
        name: "frequency",
        kind: ArgKind::Integer {
            min: cpu::MIN_FREQUENCY_HZ as i64,
            max: cpu::MAX_FREQUENCY_HZ as i64,
        },
        default: Some("99"),
        help: "samples per second per CPU; 99 avoids lockstep with 100 Hz timers",
    },
    ArgSpec {
        name: "kernel-stacks",
        kind: ArgKind::Bool,
        default: Some("true"),
        help: "include kernel frames",
    },
    ArgSpec {
        name: "user-stacks",
        kind: ArgKind::Bool,
        default: Some("true"),
        help: "include user-space frames",
    },
    UNWIND_ARG,
    JIT_ARG,
];

/// How user stacks are walked, for every collector that records them.
const UNWIND_ARG: ArgSpec = ArgSpec {
    name: "unwind",
    kind: ArgKind::Enum(&["tables", "frame-pointers"]),
    default: Some("tables"),
    help: "how user stacks are walked: with the binaries' unwind tables (.eh_frame; copies \
           16 KiB of stack per sample, signal or tracked allocation), or by frame pointers only \
           (cheaper; stacks of code built without them stop after a frame or two)",
};

fn build_cpu(args: &ParsedArgs) -> ToolOptions {
    ToolOptions::CpuProfile(CpuProfileOptions {
        frequency_hz: args.integer("frequency").unsigned_abs(),
        kernel_stacks: args.bool("kernel-stacks"),
        user_stacks: args.bool("user-stacks"),
        unwind_tables: args.choice("unwind") == "tables",
        jit_names: JitNames::parse(args),
    })
}

#[expect(clippy::cast_possible_wrap, reason = "small compile-time constants")]
const OFFCPU_ARGS: &[ArgSpec] = &[
    ArgSpec {
        name: "min-block",
        kind: ArgKind::Duration {
            min: Duration::ZERO,
            max: Duration::from_secs(10),
        },
        // bcc's offcputime uses 1us too: below it a switch is scheduler noise (a wakeup on the
        // same CPU), and the time of shorter waits is still counted in the summary.
        default: Some("1us"),
        help: "waits shorter than this are counted (number and time), not recorded per stack",
    },
    ArgSpec {
        name: "max-block",
        kind: ArgKind::Duration {
            min: Duration::ZERO,
            max: Duration::from_hours(24),
        },
        default: Some("0s"),
        help: "waits longer than this are counted, not recorded (e.g. to leave idle pools \
               out); 0s: no bound",
    },
    ArgSpec {
        name: "wall",
        kind: ArgKind::Bool,
        default: Some("false"),
        help: "also sample on-CPU stacks and write a wall-clock profile: on-CPU and off-CPU \
               time in one flamegraph",
    },
    ArgSpec {
        name: "frequency",
        kind: ArgKind::Integer {
            min: cpu::MIN_FREQUENCY_HZ as i64,
            max: cpu::MAX_FREQUENCY_HZ as i64,
        },
        default: Some("99"),
        help: "with --wall: on-CPU samples per second per CPU",
    },
    ArgSpec {
        name: "kernel-stacks",
        kind: ArgKind::Bool,
        default: Some("true"),
        help: "include kernel frames (they name what a thread waits in: futex, pipe, disk)",
    },
    ArgSpec {
        name: "user-stacks",
        kind: ArgKind::Bool,
        default: Some("true"),
        help: "include user-space frames",
    },
    ArgSpec {
        name: "max-waits",
        kind: ArgKind::Integer {
            min: 1024,
            max: 1 << 20,
        },
        default: Some("16384"),
        help: "distinct (process, thread, stack, reason) totals the kernel keeps; waits beyond \
               are counted as lost",
    },
    JIT_ARG,
];

fn build_offcpu(args: &ParsedArgs) -> ToolOptions {
    let max = args.duration("max-block");
    ToolOptions::OffcpuProfile(OffcpuProfileOptions {
        min_block: args.duration("min-block"),
        max_block: (!max.is_zero()).then_some(max),
        wall: args.bool("wall"),
        frequency_hz: args.integer("frequency").unsigned_abs(),
        kernel_stacks: args.bool("kernel-stacks"),
        user_stacks: args.bool("user-stacks"),
        max_waits: u32::try_from(args.integer("max-waits")).unwrap_or(1 << 20),
        jit_names: JitNames::parse(args),
    })
}

const MEMORY_ARGS: &[ArgSpec] = &[
    ArgSpec {
        name: "mode",
        kind: ArgKind::Enum(&["sampled", "exact", "growth"]),
        default: Some("sampled"),
        help: "sampled: allocations sampled by bytes (low overhead); exact: every allocation; \
               growth: no allocator probes, page faults and RSS only (any language)",
    },
    ArgSpec {
        name: "sample-bytes",
        kind: ArgKind::Size {
            min: 1,
            max: 1 << 30,
        },
        default: Some("64KiB"),
        help: "sampled mode: mean bytes allocated between two sampled allocations",
    },
    ArgSpec {
        name: "min-size",
        kind: ArgKind::Size {
            min: 0,
            max: 1 << 30,
        },
        default: Some("0"),
        help: "allocations smaller than this are counted but not tracked",
    },
    ArgSpec {
        name: "faults",
        kind: ArgKind::Bool,
        default: Some("true"),
        help: "record page faults with stacks (memory growth profile)",
    },
    ArgSpec {
        name: "fault-period",
        kind: ArgKind::Integer {
            min: 1,
            max: 65_536,
        },
        default: Some("1"),
        help: "unwind every n-th page fault of the target (per CPU); counts stay exact",
    },
    ArgSpec {
        name: "rss-interval",
        kind: ArgKind::Duration {
            min: Duration::from_millis(100),
            max: Duration::from_mins(1),
        },
        default: Some("1s"),
        help: "how often RSS of each target process and cgroup is read",
    },
    ArgSpec {
        name: "max-tracked",
        kind: ArgKind::Integer {
            min: 1024,
            max: 1 << 24,
        },
        default: Some("524288"),
        help: "live blocks the kernel can track at once; more are counted as lost",
    },
    UNWIND_ARG,
    JIT_ARG,
];

fn build_memory(args: &ParsedArgs) -> ToolOptions {
    let allocations = match args.choice("mode") {
        "exact" => AllocationMode::Exact,
        "growth" => AllocationMode::Off,
        _ => AllocationMode::Sampled,
    };
    ToolOptions::MemoryProfile(MemoryProfileOptions {
        allocations,
        sample_bytes: args.size("sample-bytes"),
        min_size: args.size("min-size"),
        faults: args.bool("faults") || allocations == AllocationMode::Off,
        fault_period: u32::try_from(args.integer("fault-period")).unwrap_or(1),
        rss_interval: args.duration("rss-interval"),
        max_tracked: u32::try_from(args.integer("max-tracked")).unwrap_or(u32::MAX),
        unwind_tables: args.choice("unwind") == "tables",
        jit_names: JitNames::parse(args),
    })
}

const SIGNAL_ARGS: &[ArgSpec] = &[
    ArgSpec {
        name: "signals",
        kind: ArgKind::Signals,
        default: Some("all"),
        help: "signals to record (lifecycle events are always recorded)",
    },
    ArgSpec {
        name: "senders",
        kind: ArgKind::Names {
            max_count: crate::signals::MAX_SENDERS,
            max_len: crate::TASK_COMM_LEN - 1,
        },
        default: Some(""),
        help: "record only signals sent by processes with these names (comm); empty: any",
    },
    ArgSpec {
        name: "user-stacks",
        kind: ArgKind::Bool,
        default: Some("true"),
        help: "record the sender's user stack",
    },
    UNWIND_ARG,
    ArgSpec {
        name: "kernel-stacks",
        kind: ArgKind::Bool,
        default: Some("true"),
        help: "record the sender's kernel stack (shows kill(2), the OOM killer, a tty, a pipe...)",
    },
    ArgSpec {
        name: "ring-size",
        kind: ArgKind::Size {
            min: 1 << 16,
            max: 1 << 30,
        },
        default: Some("8MiB"),
        help: "kernel ring buffer for events, rounded up to a power of two",
    },
    ArgSpec {
        name: "max-lost",
        kind: ArgKind::Integer {
            min: 0,
            max: i64::MAX,
        },
        default: Some("0"),
        help: "the run fails when more events than this are lost (all are counted either way)",
    },
    JIT_ARG,
];

fn build_signals(args: &ParsedArgs) -> ToolOptions {
    let ring = args.size("ring-size").next_power_of_two();
    ToolOptions::SignalTrace(SignalTraceOptions {
        signals: args.signals("signals"),
        senders: args.names("senders").to_vec(),
        user_stacks: args.bool("user-stacks"),
        unwind_tables: args.choice("unwind") == "tables",
        kernel_stacks: args.bool("kernel-stacks"),
        ring_bytes: u32::try_from(ring).unwrap_or(1 << 30),
        max_lost: args.integer("max-lost").unsigned_abs(),
        jit_names: JitNames::parse(args),
    })
}

const CPU_STRESS_ARGS: &[ArgSpec] = &[
    ArgSpec {
        name: "workers",
        kind: ArgKind::Integer { min: 1, max: 64 },
        default: Some("1"),
        help: "worker processes, each placed in the target's cgroups",
    },
    ArgSpec {
        name: "load",
        kind: ArgKind::Integer { min: 1, max: 100 },
        default: Some("100"),
        help: "percent each worker burns of its share of the target's CPU limit (of one core \
               when the target has no limit)",
    },
];

fn build_cpu_stress(args: &ParsedArgs) -> ToolOptions {
    ToolOptions::CpuStress(CpuStressOptions {
        workers: u32::try_from(args.integer("workers")).unwrap_or(1),
        load_percent: u32::try_from(args.integer("load")).unwrap_or(100),
        limit_millicores: None,
    })
}

const MEMORY_STRESS_ARGS: &[ArgSpec] = &[
    ArgSpec {
        name: "size",
        kind: ArgKind::Amount {
            max_bytes: 64 << 30,
            max_percent: 100,
        },
        default: Some("256MiB"),
        help: "memory to allocate and touch, charged to the target's memory cgroup: bytes, or a \
               percentage of its memory limit",
    },
    ArgSpec {
        name: "ramp",
        kind: ArgKind::Duration {
            min: Duration::ZERO,
            max: Duration::from_hours(1),
        },
        default: Some("0s"),
        help: "reach the size gradually over this time",
    },
];

fn build_memory_stress(args: &ParsedArgs) -> ToolOptions {
    ToolOptions::MemoryStress(MemoryStressOptions {
        size: args.amount("size"),
        ramp: args.duration("ramp"),
        limit_bytes: None,
        allow_unlimited: true,
    })
}

const TERMINATE_ARGS: &[ArgSpec] = &[
    ArgSpec {
        name: "mode",
        kind: ArgKind::Enum(&["graceful", "kill"]),
        default: Some("graceful"),
        help: "graceful: SIGTERM, then SIGKILL after the grace period if still alive; kill: \
               SIGKILL at once",
    },
    ArgSpec {
        name: "grace",
        kind: ArgKind::Duration {
            min: Duration::ZERO,
            max: Duration::from_mins(10),
        },
        default: Some("30s"),
        help: "time between SIGTERM and SIGKILL (the kubelet's default is 30s)",
    },
    ArgSpec {
        name: "scope",
        kind: ArgKind::Enum(&["main", "all"]),
        default: Some("main"),
        help: "main: the target's main process (the one whose parent is outside the target); \
               all: every process of the target",
    },
    ArgSpec {
        name: "match",
        kind: ArgKind::Names {
            max_count: 8,
            max_len: crate::TASK_COMM_LEN - 1,
        },
        default: Some(""),
        help: "only processes with one of these names (comm)",
    },
];

fn build_terminate(args: &ParsedArgs) -> ToolOptions {
    ToolOptions::Terminate(TerminateOptions {
        graceful: args.choice("mode") == "graceful",
        grace: args.duration("grace"),
        all: args.choice("scope") == "all",
        names: args.names("match").to_vec(),
    })
}

const FILL_ARGS: &[ArgSpec] = &[
    ArgSpec {
        name: "path",
        kind: ArgKind::Path { max_len: 4096 },
        default: Some("/tmp"),
        help: "directory to fill, as the target sees it (e.g. a volume's mount point)",
    },
    ArgSpec {
        name: "fill",
        kind: ArgKind::Amount {
            max_bytes: 1 << 40,
            max_percent: 99,
        },
        default: Some("90%"),
        help: "bytes to write, or how full the filesystem should get (never past 99%)",
    },
];

fn build_fill(args: &ParsedArgs) -> ToolOptions {
    ToolOptions::VolumeFill(VolumeFillOptions {
        path: args.path("path").to_owned(),
        fill: args.amount("fill"),
        allow_node_shared: true,
    })
}

static CATALOGUE: [ToolDef; 8] = [
    ToolDef {
        name: "cpu-profile",
        kind: ToolKind::Collector,
        summary: "sample on-CPU stacks of the target into a flamegraph, pprof and folded stacks",
        args: CPU_ARGS,
        default_duration: Duration::from_secs(30),
        max_duration: Duration::from_hours(1),
        build: build_cpu,
    },
    ToolDef {
        name: "offcpu-profile",
        kind: ToolKind::Collector,
        summary: "measure where the target's threads wait off CPU (blocked, in uninterruptible \
                  I/O, or runnable but starved of CPU), per stack; with --wall, one wall-clock \
                  profile of on-CPU and off-CPU time",
        args: OFFCPU_ARGS,
        default_duration: Duration::from_secs(30),
        max_duration: Duration::from_hours(1),
        build: build_offcpu,
    },
    ToolDef {
        name: "memory-profile",
        kind: ToolKind::Collector,
        summary: "track the target's allocations (in-use/leak and allocation profiles), the code \
                  that faults memory in, and RSS over time",
        args: MEMORY_ARGS,
        default_duration: Duration::from_mins(1),
        max_duration: Duration::from_hours(1),
        build: build_memory,
    },
    ToolDef {
        name: "signal-trace",
        kind: ToolKind::Collector,
        summary: "record every signal sent to the target (sender, stacks, result), its \
                  deliveries, and how each target process started and ended (exec, fork, exit, \
                  OOM kill)",
        args: SIGNAL_ARGS,
        default_duration: Duration::from_mins(5),
        max_duration: Duration::from_hours(24),
        build: build_signals,
    },
    ToolDef {
        name: "cpu-stress",
        kind: ToolKind::Fault,
        summary: "burn CPU inside the target's cgroups (counted against its limits), relative to \
                  its CPU limit; rolled back at the end, on abort, or by the next run after a crash",
        args: CPU_STRESS_ARGS,
        default_duration: Duration::from_mins(1),
        max_duration: Duration::from_hours(1),
        build: build_cpu_stress,
    },
    ToolDef {
        name: "memory-stress",
        kind: ToolKind::Fault,
        summary: "allocate and touch memory charged to the target's memory cgroup (bytes or % of \
                  its limit, optional ramp); reports OOM kills",
        args: MEMORY_STRESS_ARGS,
        default_duration: Duration::from_mins(1),
        max_duration: Duration::from_hours(1),
        build: build_memory_stress,
    },
    ToolDef {
        name: "terminate",
        kind: ToolKind::Fault,
        summary: "SIGTERM the target's main process (or all, or by name), SIGKILL after a grace \
                  period if it is still alive; traces what it did and how it ended",
        args: TERMINATE_ARGS,
        default_duration: Duration::from_mins(2),
        max_duration: Duration::from_mins(15),
        build: build_terminate,
    },
    ToolDef {
        name: "volume-fill",
        kind: ToolKind::Fault,
        summary: "fill a directory of the target's filesystem (reached through its mount \
                  namespace) to a percentage or by bytes, never past 99%; the file is removed \
                  at the end, on abort, or after a crash",
        args: FILL_ARGS,
        default_duration: Duration::from_mins(5),
        max_duration: Duration::from_hours(1),
        build: build_fill,
    },
];

#[must_use]
pub fn catalogue() -> &'static [ToolDef] {
    &CATALOGUE
}

/// The options a tool runs with when given no arguments (used when one tool runs another, e.g.
/// terminate traces signals).
#[must_use]
pub fn default_options(name: &str) -> Option<ToolOptions> {
    let def = find_tool(name)?;
    super::args::parse(def.args, &[])
        .ok()
        .map(|a| (def.build)(&a))
}

#[must_use]
pub fn find_tool(name: &str) -> Option<&'static ToolDef> {
    CATALOGUE.iter().find(|t| t.name == name)
}
