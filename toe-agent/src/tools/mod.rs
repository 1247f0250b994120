//! The tools a run drives, one folder each (collector, run glue, profile building), behind one
//! interface. The run loop ([`crate::run`]) knows only [`Tool`] and [`ToolRun`]; a new tool is a
//! new folder and one line in [`tool`].

pub mod cpu;
pub mod faults;
pub mod memory;
pub mod offcpu;
pub mod signals;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use toe_artifacts::{
    names::Name,
    summary::{
        CpuSummary, fault::FaultSummary, memory::MemorySummary, offcpu::OffcpuSummary,
        signals::SignalSummary,
    },
    timeline,
};
use toe_common::api::ToolOptions;

use crate::{
    ebpf::Loaded,
    run::RunError,
    symbolize::{Symbolizer, images::Images},
    targets::{ResolvedTarget, TargetSpec},
};

/// One artifact: its name and bytes.
pub type Artifact = (Name, Bytes);

/// What a tool leaves after detaching: its section of the summary and its artifacts.
#[derive(Default)]
pub struct Finished {
    pub cpu: Option<CpuSummary>,
    pub offcpu: Option<OffcpuSummary>,
    pub memory: Option<MemorySummary>,
    pub signals: Option<SignalSummary>,
    /// The run collected but must report failure (e.g. losses beyond the allowed bound).
    pub failed: Option<String>,
    pub fault: Option<FaultSummary>,
    pub artifacts: Vec<Artifact>,
    pub warnings: Vec<String>,
    /// This tool's part of the run's shared timeline.
    pub lanes: Vec<timeline::Lane>,
}

impl Finished {
    /// Adds another tool's results; each tool fills its own parts.
    pub fn merge(&mut self, other: Self) {
        self.cpu = self.cpu.take().or(other.cpu);
        self.offcpu = self.offcpu.take().or(other.offcpu);
        self.memory = self.memory.take().or(other.memory);
        self.signals = self.signals.take().or(other.signals);
        self.fault = self.fault.take().or(other.fault);
        self.failed = self.failed.take().or(other.failed);
        self.artifacts.extend(other.artifacts);
        self.warnings.extend(other.warnings);
        self.lanes.extend(other.lanes);
    }
}

/// What a tool may look at before anything is loaded.
pub struct Prepare<'a> {
    pub spec: &'a TargetSpec,
    pub target: &'a ResolvedTarget,
    pub run_id: &'a str,
}

/// What a tool attaches with.
pub struct Attach<'a> {
    pub loaded: &'a mut Loaded,
    pub target: &'a ResolvedTarget,
    /// A command TOE started and holds until every tool is attached.
    pub held_pid: Option<u32>,
    pub run_id: &'a str,
    /// The run's kept mappings: a collector that sees processes first (a ring reader) has
    /// them read at first sight.
    pub images: &'a Arc<Images>,
}

/// What a tool sees on every tick of the sampling loop.
pub struct Tick<'a> {
    pub loaded: &'a mut Loaded,
    pub target: &'a ResolvedTarget,
    pub symbolizer: &'a mut Symbolizer,
    /// Milliseconds since sampling began.
    pub elapsed_ms: f64,
}

/// The run's clock and context when tools finish.
pub struct Finish<'a> {
    pub symbolizer: &'a mut Symbolizer,
    /// Children the kernel followed and missed (`--pid` and command targets).
    pub children: (u64, u64),
    /// Wall-clock start (ns since the Unix epoch) and length of sampling (ns).
    pub span: (u64, u64),
    /// The kernel's monotonic clock at the start, which event timestamps use.
    pub started_ns: u64,
    pub sampled_for: Duration,
    /// Title of the run's charts: the PowerTool and its target.
    pub title: &'a str,
}

/// Map sizes the run's eBPF object is loaded with (name, entries or bytes).
pub type MapSizes = Vec<(&'static str, u32)>;

/// A tool of a PowerTool, before it attaches.
pub trait Tool: Send {
    /// Capacities this tool needs of the object's maps, at `cpus` online CPUs.
    fn map_sizes(&self, cpus: u32) -> MapSizes;

    /// Checks the target and measures what the tool needs, before anything is loaded: whatever
    /// can be refused is refused here.
    fn prepare(&mut self, _cx: &Prepare<'_>) -> Result<(), RunError> {
        Ok(())
    }

    /// Faults start after every collector has attached, so the collectors see them from their
    /// first moment.
    fn is_fault(&self) -> bool {
        false
    }

    /// Attaches (or starts, for a fault).
    fn attach(self: Box<Self>, cx: &mut Attach<'_>) -> Result<Box<dyn ToolRun>, RunError>;
}

/// A tool between attach and detach.
pub trait ToolRun: Send {
    /// Every drain period (25 ms): empty rings, follow new processes.
    fn fast_tick(&mut self, cx: &mut Tick<'_>) -> Result<(), RunError>;

    /// Whether [`Self::fast_tick`] has work at all. A run none of whose tools has skips the
    /// drain period's 40 wake-ups a second: each is a context switch on some workload's CPU.
    fn needs_fast_tick(&self) -> bool {
        true
    }

    /// Ticked before the others: a fault samples what it achieves on a fixed clock, which a
    /// collector's symbolization (hundreds of milliseconds for a large binary) must not delay.
    fn ticks_first(&self) -> bool {
        false
    }

    /// Every resolve period (250 ms): symbolize what is new while its processes live.
    fn slow_tick(&mut self, _cx: &mut Tick<'_>) {}

    /// One phrase for the progress line.
    fn progress(&self) -> String;

    /// The tool has nothing left to do (a terminate fault whose victims all exited).
    fn done(&self) -> bool {
        false
    }

    /// Sampling stopped; the programs are still attached.
    fn before_detach(&mut self, _cx: &mut Tick<'_>) -> Result<(), RunError> {
        Ok(())
    }

    /// Detached: what the tool accumulated becomes its summary section and artifacts.
    fn finish(self: Box<Self>, cx: &mut Finish<'_>) -> Result<Finished, RunError>;
}

/// The one registration of every built-in tool: its options to its implementation. Image tools
/// have none (the operator runs them as ephemeral containers; planning refuses them locally).
#[must_use]
pub fn tool(options: &ToolOptions) -> Option<Box<dyn Tool>> {
    match options {
        ToolOptions::CpuProfile(o) => Some(Box::new(cpu::Cpu::new(*o))),
        ToolOptions::OffcpuProfile(o) => Some(Box::new(offcpu::Offcpu::new(*o))),
        ToolOptions::MemoryProfile(o) => Some(Box::new(memory::Memory::new(*o))),
        ToolOptions::SignalTrace(o) => Some(Box::new(signals::Signals::new(o.clone()))),
        ToolOptions::CpuStress(_)
        | ToolOptions::MemoryStress(_)
        | ToolOptions::VolumeFill(_)
        | ToolOptions::Terminate(_) => Some(Box::new(faults::Fault::new(options.clone()))),
        ToolOptions::Image(_) => None,
    }
}

/// Every map at the smallest size the kernel accepts: hash maps are preallocated in the kernel,
/// and a node agent holds one object per concurrent run, so a collector that does not run gets
/// the least of its maps.
fn smallest_maps(target: &ResolvedTarget) -> MapSizes {
    use toe_common::{cpu, memory, offcpu, signals as sig, targets};
    let mut sizes = vec![
        (cpu::SAMPLES_RING, 4096),
        (sig::EVENTS_RING, 4096),
        (memory::STACKS_MAP, 1),
        (memory::INFLIGHT_MAP, 1),
        // Not preallocated, but their bucket arrays are (8 MiB for the live map).
        (memory::LIVE_MAP, 1),
        (memory::SITES_MAP, 1),
        (memory::FAULTS_MAP, 1),
        (sig::STACKS_MAP, 1),
        (sig::TASKS_MAP, 1),
        (offcpu::STARTS_MAP, 1),
        (offcpu::WAITS_MAP, 1),
        (offcpu::STACKS_MAP, 1),
    ];
    if !target.cgroups.is_empty() || target.tgids.is_empty() {
        // Processes are followed by cgroup; the process map stays empty.
        sizes.push((targets::TARGET_TGIDS_MAP, 1));
    }
    sizes
}

/// Capacities of the object's big maps for `tools`: each at the largest any tool asks for.
#[must_use]
pub fn map_sizes(tools: &[&dyn Tool], cpus: u32, target: &ResolvedTarget) -> MapSizes {
    let mut sizes = smallest_maps(target);
    for (name, size) in tools.iter().flat_map(|t| t.map_sizes(cpus)) {
        if let Some(s) = sizes.iter_mut().find(|(n, _)| *n == name) {
            s.1 = s.1.max(size);
        } else {
            sizes.push((name, size));
        }
    }
    sizes
}

#[cfg(test)]
mod tests {
    use toe_common::{api, cpu, memory, signals as sig, targets};

    use super::*;

    fn sizes_for(names: &[&str], target: &ResolvedTarget) -> MapSizes {
        let tools: Vec<Box<dyn Tool>> = names
            .iter()
            .map(|n| tool(&api::default_options(n).expect(n)).expect(n))
            .collect();
        let refs: Vec<&dyn Tool> = tools.iter().map(AsRef::as_ref).collect();
        map_sizes(&refs, 4, target)
    }

    fn size(sizes: &MapSizes, name: &str) -> u32 {
        sizes.iter().find(|(n, _)| *n == name).expect(name).1
    }

    fn by_pid() -> ResolvedTarget {
        ResolvedTarget {
            description: "pid 1".into(),
            cgroups: Vec::new(),
            tgids: vec![1],
        }
    }

    #[test]
    fn unused_collectors_get_their_smallest_maps() {
        let s = sizes_for(&["cpu-profile"], &by_pid());
        assert_eq!(size(&s, memory::LIVE_MAP), 1);
        assert_eq!(size(&s, sig::TASKS_MAP), 1);
        assert_eq!(size(&s, sig::EVENTS_RING), 4096);
        assert!(size(&s, cpu::SAMPLES_RING) >= cpu::ring_bytes(4, 99));
        // A pid target follows processes in the tgid map: it keeps its compiled size.
        assert!(s.iter().all(|(n, _)| *n != targets::TARGET_TGIDS_MAP));
    }

    #[test]
    fn each_tool_raises_only_its_own_maps_and_the_largest_ask_wins() {
        let s = sizes_for(&["memory-profile", "signal-trace"], &by_pid());
        assert_eq!(size(&s, memory::STACKS_MAP), memory::MAX_STACKS);
        assert_eq!(size(&s, sig::TASKS_MAP), sig::MAX_TASKS);
        assert_eq!(size(&s, cpu::SAMPLES_RING), 4096);
        // terminate traces its victims with the trace's ring; a larger trace ring wins.
        let t = sizes_for(&["terminate"], &by_pid());
        assert_eq!(size(&t, sig::EVENTS_RING), sig::RING_BYTES);
        let by_cgroup = ResolvedTarget {
            tgids: Vec::new(),
            ..by_pid()
        };
        let c = sizes_for(&["cpu-stress"], &by_cgroup);
        assert_eq!(size(&c, targets::TARGET_TGIDS_MAP), 1);
        assert_eq!(size(&c, memory::LIVE_MAP), 1);
    }

    #[test]
    fn every_built_in_tool_is_registered_and_faults_attach_last() {
        for def in api::catalogue() {
            let name = def.name;
            let options = api::default_options(name).expect(name);
            let t = tool(&options).unwrap_or_else(|| panic!("{name} has no implementation"));
            assert_eq!(t.is_fault(), options.is_fault(), "{name}");
        }
    }
}
