//! Every artifact a run writes: its file name in the target's directory and the key it is listed
//! under in the summary's `artifacts`. Writer and reader both name files through these.

/// One artifact's summary key and file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Name {
    /// The key in `summary.json`'s `artifacts` list.
    pub kind: &'static str,
    pub file: &'static str,
}

const fn name(kind: &'static str, file: &'static str) -> Name {
    Name { kind, file }
}

/// The run's summary, written last: it lists every other artifact.
pub const SUMMARY: Name = name("summary", "summary.json");

pub const CPU_FLAMEGRAPH: Name = name("flamegraph", "flamegraph.svg");
pub const CPU_PPROF: Name = name("pprof", "cpu.pb.gz");
pub const CPU_FOLDED: Name = name("folded", "stacks.folded");

pub const OFFCPU_FLAMEGRAPH: Name = name("offcpu-flamegraph", "offcpu.svg");
/// Off-CPU nanoseconds and wait counts.
pub const OFFCPU_PPROF: Name = name("offcpu-pprof", "offcpu.pb.gz");
pub const OFFCPU_FOLDED: Name = name("offcpu-folded", "offcpu.folded");
/// On-CPU samples and off-CPU time on one scale (`--wall`).
pub const WALL_FLAMEGRAPH: Name = name("wall-flamegraph", "wall.svg");
pub const WALL_PPROF: Name = name("wall-pprof", "wall.pb.gz");
pub const WALL_FOLDED: Name = name("wall-folded", "wall.folded");

pub const INUSE_FLAMEGRAPH: Name = name("inuse-flamegraph", "inuse.svg");
pub const ALLOC_FLAMEGRAPH: Name = name("alloc-flamegraph", "alloc.svg");
/// In-use and allocated together, as Go's heap profiles are.
pub const HEAP_PPROF: Name = name("heap-pprof", "heap.pb.gz");
pub const INUSE_FOLDED: Name = name("inuse-folded", "inuse.folded");
pub const ALLOC_FOLDED: Name = name("alloc-folded", "alloc.folded");
pub const GROWTH_FLAMEGRAPH: Name = name("growth-flamegraph", "growth.svg");
pub const GROWTH_PPROF: Name = name("growth-pprof", "growth.pb.gz");
pub const GROWTH_FOLDED: Name = name("growth-folded", "growth.folded");
pub const RSS_CSV: Name = name("rss-csv", "rss.csv");
pub const RSS_JSON: Name = name("rss-json", "rss.json");
pub const RSS_CHART: Name = name("rss-chart", "rss.svg");

pub const SIGNAL_EVENTS: Name = name("events", "events.jsonl");
pub const SIGNAL_TIMELINE: Name = name("timeline", "timeline.svg");

pub const FAULT_SERIES: Name = name("fault-series", "fault.csv");

/// The run's shared timeline, written when a fault or several tools ran.
pub const RUN_TIMELINE: Name = name("run-timeline", "run-timeline.svg");
pub const RUN_TIMELINE_JSON: Name = name("run-timeline-json", "run-timeline.json");

/// The pprof files processing merges.
pub const PPROF_FILES: [Name; 5] = [
    CPU_PPROF,
    HEAP_PPROF,
    GROWTH_PPROF,
    OFFCPU_PPROF,
    WALL_PPROF,
];
