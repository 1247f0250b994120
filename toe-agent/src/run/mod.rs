//! Executes a [`RunPlan`]: resolve the target, load and attach, sample until the duration ends,
//! the target is gone or the user interrupts, then detach and write every artifact, including on
//! an interruption (marked partial).

mod signals;

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use toe_common::api::{
    AllocationMode, CpuProfileOptions, MemoryProfileOptions, ToolOptions, format_duration,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{oneshot, watch},
};

use crate::{
    allocator::{self, Allocator},
    collectors::{
        cpu::{CpuCollector, CpuCounters, RawProfile},
        memory::MemoryCollector,
        signals::SignalCollector,
    },
    ebpf::{LoadError, Loaded},
    faults::{self, FaultError, FaultWork},
    plan::RunPlan,
    profile::{
        Profile, ValueType, folded,
        memory::{
            self as memprof, AllocationAccounting, FaultAccounting, HeapTotals, MemorySummary,
        },
        pprof,
        summary::{self, CpuSummary, SampleAccounting, Summary},
        svg, timeline,
    },
    rss::{self, RssSampler, RssThread},
    sink::{ArtifactSink, SinkError},
    symbolize::Symbolizer,
    targets::{self, HeldChild, ResolvedTarget, TargetError, TargetSpec},
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("encoding the flamegraph: {0}")]
    Svg(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Fault(#[from] FaultError),
    #[error("stopped before it started: {0}")]
    Stopped(&'static str),
}

/// Why sampling stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    Duration,
    TargetExited,
    CommandExited(i32),
    CgroupRemoved,
    /// A terminate fault saw every process it signalled exit.
    FaultDone,
    Interrupted(&'static str),
}

impl Ended {
    fn describe(&self) -> String {
        match self {
            Self::Duration => "duration reached".into(),
            Self::TargetExited => "all target processes exited".into(),
            Self::CommandExited(code) => format!("command exited with status {code}"),
            Self::CgroupRemoved => "target cgroup was removed".into(),
            Self::FaultDone => "every process the fault signalled has exited".into(),
            Self::Interrupted(sig) => format!("interrupted by {sig}; partial results"),
        }
    }
}

pub struct Outcome {
    pub summary: Summary,
    pub ended: Ended,
    /// The process exit code TOE should use.
    pub exit_code: i32,
}

/// How the run talks to the user.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ui {
    pub progress: bool,
}

/// The ring holds a second of worst-case samples (`toe_common::cpu::ring_bytes`); draining 40
/// times a second keeps it nearly empty while waking the agent rarely.
const DRAIN_EVERY: Duration = Duration::from_millis(25);
const RESOLVE_EVERY: Duration = Duration::from_millis(250);

fn resolve_target(spec: &TargetSpec) -> Result<(ResolvedTarget, Option<HeldChild>), TargetError> {
    match spec {
        TargetSpec::Pid(pid) => Ok((targets::resolve_pid(*pid)?, None)),
        TargetSpec::Cgroup(path) => Ok((targets::resolve_cgroup(path)?, None)),
        TargetSpec::Container(id) => Ok((targets::resolve_container(id)?, None)),
        TargetSpec::Command(argv) => {
            let child = HeldChild::spawn(argv)?;
            let target = ResolvedTarget {
                description: format!("command {} (pid {})", argv[0].to_string_lossy(), child.pid),
                cgroups: Vec::new(),
                tgids: vec![child.pid],
            };
            Ok((target, Some(child)))
        }
    }
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn progress_bar(ui: Ui, total: Duration) -> ProgressBar {
    let target = if ui.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(
        Some(u64::try_from(total.as_millis()).unwrap_or(u64::MAX)),
        target,
    );
    bar.set_style(
        ProgressStyle::with_template("{spinner} sampling [{bar:30}] {elapsed}/{prefix} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format_duration(total));
    bar
}

/// The collector a run drives, with what it accumulates.
enum Work {
    Cpu {
        opts: CpuProfileOptions,
        collector: CpuCollector,
        raw: RawProfile,
        /// Samples received so far, at each slow tick (ms since the start), for the run's
        /// shared timeline.
        received: Vec<(f64, u64)>,
    },
    Memory {
        opts: MemoryProfileOptions,
        collector: MemoryCollector,
        rss: RssThread,
        /// Target processes seen at the last discovery.
        pids: Vec<u32>,
        ticks: u64,
    },
    Signals(signals::SignalWork),
    Fault(Box<FaultWork>),
}

/// A run between attach and detach.
struct Session {
    target: ResolvedTarget,
    loaded: Loaded,
    /// One per tool of the PowerTool, collectors first, the fault (if any) last.
    works: Vec<Work>,
    /// Exit status of a command TOE started, delivered by a thread that waits for it.
    command_exit: Option<oneshot::Receiver<i32>>,
    started_at: SystemTime,
    started: Instant,
    /// The kernel's monotonic clock at the start, which event timestamps use.
    started_ns: u64,
}

/// A `--pid` memory target whose allocations cannot be tracked is refused before anything is
/// loaded: the user asked for allocations and would get none. (Cgroup targets and commands are
/// checked per process as they appear and reported in the summary instead.)
fn check_allocator(spec: &TargetSpec, target: &ResolvedTarget) -> Result<(), RunError> {
    let TargetSpec::Pid(pid) = spec else {
        return Ok(());
    };
    let mut reasons = Vec::new();
    for p in std::iter::once(*pid).chain(targets::descendants(&target.tgids)) {
        // A process that has just exec'd gets up to 2 s for its loader to map libc.
        let mut found = allocator::detect(p);
        for _ in 0..200 {
            if !matches!(found, Ok(Allocator::Loading)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            found = allocator::detect(p);
        }
        match found {
            Ok(Allocator::Glibc { .. }) => return Ok(()),
            Ok(Allocator::Unsupported(why)) => reasons.push(format!(
                "pid {p} ({}): {why}",
                targets::process_name(p).unwrap_or_default()
            )),
            Ok(Allocator::Loading) => reasons.push(format!(
                "pid {p} ({}): its dynamic loader did not map libc within 2 s",
                targets::process_name(p).unwrap_or_default()
            )),
            Err(e) => reasons.push(format!("pid {p}: reading its mappings: {e}")),
        }
    }
    Err(RunError::Unsupported(format!(
        "allocation tracking cannot see this target's allocations: {}; use --mode=growth (page \
         faults and RSS work for any language and allocator)",
        reasons.join("; ")
    )))
}

/// Capacities of the object's big maps for `tools`. Rings and preallocated maps of collectors no
/// tool uses get the smallest size the kernel accepts.
fn map_sizes(
    tools: &[&ToolOptions],
    cpus: u32,
    target: &ResolvedTarget,
) -> Vec<(&'static str, u32)> {
    use toe_common::{cpu, memory, signals as sig, targets};
    // Hash maps are preallocated in the kernel: a collector that does not run gets the smallest
    // of its maps (a node agent holds one object per concurrent run).
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
    ];
    if !target.cgroups.is_empty() || target.tgids.is_empty() {
        // Processes are followed by cgroup; the process map stays empty.
        sizes.push((targets::TARGET_TGIDS_MAP, 1));
    }
    let mut set = |name: &'static str, size: u32| {
        if let Some(s) = sizes.iter_mut().find(|(n, _)| *n == name) {
            s.1 = s.1.max(size);
        } else {
            sizes.push((name, size));
        }
    };
    for tool in tools {
        match tool {
            ToolOptions::CpuProfile(o) => {
                set(cpu::SAMPLES_RING, cpu::ring_bytes(cpus, o.frequency_hz));
            }
            ToolOptions::MemoryProfile(o) => {
                set(memory::STACKS_MAP, memory::MAX_STACKS);
                set(memory::INFLIGHT_MAP, memory::MAX_INFLIGHT);
                set(memory::SITES_MAP, memory::MAX_SITES);
                set(memory::FAULTS_MAP, memory::MAX_SITES);
                set(memory::LIVE_MAP, o.max_tracked);
            }
            ToolOptions::SignalTrace(o) => {
                set(sig::STACKS_MAP, sig::MAX_STACKS);
                set(sig::TASKS_MAP, sig::MAX_TASKS);
                set(sig::EVENTS_RING, o.ring_bytes);
            }
            ToolOptions::CpuStress(_)
            | ToolOptions::MemoryStress(_)
            | ToolOptions::VolumeFill(_)
            // Image tools never reach a local run (planning refuses them).
            | ToolOptions::Image(_) => {}
            // terminate traces its victims' signals and exits.
            ToolOptions::Terminate(_) => {
                set(sig::STACKS_MAP, sig::MAX_STACKS);
                set(sig::TASKS_MAP, sig::MAX_TASKS);
                set(sig::EVENTS_RING, sig::RING_BYTES);
            }
        }
    }
    sizes
}

/// The tools a run drives: the PowerTool's own, then those alongside it; a terminate fault also
/// traces signals (with the trace's defaults) unless a signal trace is already among them.
fn run_tools(plan: &RunPlan) -> Vec<ToolOptions> {
    let mut tools: Vec<ToolOptions> = std::iter::once(&plan.tool)
        .chain(&plan.alongside)
        .map(|t| t.options.clone())
        .collect();
    let traced = tools
        .iter()
        .any(|t| matches!(t, ToolOptions::SignalTrace(_)));
    if !traced
        && tools.iter().any(|t| matches!(t, ToolOptions::Terminate(_)))
        && let Some(trace) = toe_common::api::default_options("signal-trace")
    {
        tools.push(trace);
    }
    tools
}

/// A fault's exact plan for a dry run: the target is measured (read-only), nothing is started.
pub fn describe_fault(plan: &RunPlan) -> Result<Vec<String>, RunError> {
    let target = match &plan.target {
        TargetSpec::Pid(pid) => targets::resolve_pid(*pid)?,
        TargetSpec::Cgroup(path) => targets::resolve_cgroup(path)?,
        TargetSpec::Container(id) => targets::resolve_container(id)?,
        TargetSpec::Command(_) => {
            return Ok(vec![
                "the command's own cgroups are stressed once it starts (run without dry-run)"
                    .into(),
            ]);
        }
    };
    let Some(fault) = run_tools(plan).into_iter().find(ToolOptions::is_fault) else {
        return Ok(Vec::new());
    };
    let facts = faults::facts(&target, &fault)?;
    let fault_plan = faults::plan(&fault, &facts)?;
    Ok(fault_plan.describe(&facts))
}

/// Resolves the target and attaches; the command (if any) runs from here on.
fn start(plan: &RunPlan) -> Result<Session, RunError> {
    // Everything that can be rejected is checked before anything is loaded or attached.
    let tools = run_tools(plan);
    let (target, child) = resolve_target(&plan.target)?;
    let cpus = aya::util::online_cpus().map_or(1, |c| u32::try_from(c.len()).unwrap_or(u32::MAX));
    for tool in &tools {
        match tool {
            ToolOptions::MemoryProfile(opts) if opts.allocations != AllocationMode::Off => {
                check_allocator(&plan.target, &target)?;
            }
            ToolOptions::SignalTrace(_)
                if target.tgids.is_empty()
                    && target.cgroups.iter().all(signals::cgroup_is_empty) =>
            {
                return Err(RunError::Target(TargetError::Empty(
                    target.description.clone(),
                )));
            }
            _ => {}
        }
    }
    // A fault is planned from the target's measured limits before anything is loaded.
    let fault = match tools.iter().find(|t| t.is_fault()) {
        Some(options) => {
            let facts = faults::facts(&target, options)?;
            let fault_plan = faults::plan(options, &facts)?;
            Some((fault_plan, facts))
        }
        None => None,
    };
    let mut loaded = Loaded::load(&map_sizes(&tools.iter().collect::<Vec<_>>(), cpus, &target))?;
    loaded.install_targets(&target)?;
    if matches!(plan.target, TargetSpec::Pid(_)) {
        // The fork tracepoint follows children from now on; this catches those started before.
        for pid in targets::descendants(&target.tgids) {
            loaded.add_tgid(pid)?;
        }
    }
    // Collectors attach first: they see the fault from its first moment.
    let mut works = Vec::new();
    for tool in &tools {
        works.push(match tool {
            ToolOptions::CpuProfile(opts) => Work::Cpu {
                opts: *opts,
                collector: CpuCollector::attach(&mut loaded, opts)?,
                raw: RawProfile::default(),
                received: Vec::new(),
            },
            ToolOptions::MemoryProfile(opts) => {
                let mut collector = MemoryCollector::attach(&mut loaded, opts)?;
                // Attached before a held command is released, so its first allocation is seen.
                let pids = collector.discover(&mut loaded, &target.cgroups)?;
                if let Some(c) = &child {
                    collector.attached_before_start(c.pid);
                }
                let rss = RssThread::spawn(opts.rss_interval, pids.clone(), target.cgroups.clone());
                Work::Memory {
                    opts: *opts,
                    collector,
                    rss,
                    pids,
                    ticks: 0,
                }
            }
            ToolOptions::SignalTrace(opts) => {
                let mut collector = SignalCollector::attach(&mut loaded, opts, &target)?;
                if let Some(c) = &child {
                    collector.add_process(c.pid)?;
                }
                Work::Signals(signals::SignalWork::new(opts.clone(), collector))
            }
            // Faults start below, once every collector is attached; image tools never reach a
            // local run (planning refuses them).
            ToolOptions::CpuStress(_)
            | ToolOptions::MemoryStress(_)
            | ToolOptions::Terminate(_)
            | ToolOptions::VolumeFill(_)
            | ToolOptions::Image(_) => continue,
        });
    }
    if let Some((fault_plan, facts)) = fault {
        works.push(Work::Fault(Box::new(FaultWork::start(
            &plan.run_id,
            fault_plan,
            facts,
        )?)));
    }
    let started_ns = signals::monotonic_ns();
    let command_exit = match child {
        Some(mut c) => {
            c.release()?;
            let (tx, rx) = oneshot::channel();
            std::thread::spawn(move || {
                let _ = tx.send(c.wait());
            });
            Some(rx)
        }
        None => None,
    };
    Ok(Session {
        target,
        loaded,
        works,
        command_exit,
        started_at: SystemTime::now(),
        started: Instant::now(),
        started_ns,
    })
}

impl Session {
    /// Every [`DRAIN_EVERY`]: empty rings, attach to new processes, read RSS when due.
    fn fast_tick(&mut self, symbolizer: &mut Symbolizer) -> Result<(), RunError> {
        for work in &mut self.works {
            match work {
                Work::Cpu { collector, raw, .. } => {
                    collector.drain(raw);
                    // New stacks are symbolized at once: a short-lived process (or one about
                    // to exec) may be gone by the next slow tick.
                    let new = raw.take_new();
                    if !new.is_empty() {
                        symbolizer.resolve(&new);
                    }
                }
                Work::Memory {
                    opts,
                    collector,
                    rss,
                    pids,
                    ticks,
                } => {
                    // New processes are looked for every other tick (50 ms): the delay between
                    // a fork and its probes is reported per process. Without allocator probes,
                    // discovery only feeds RSS: every 250 ms is enough.
                    *ticks += 1;
                    let every = if opts.allocations == AllocationMode::Off {
                        10
                    } else {
                        2
                    };
                    if *ticks % every == 0 {
                        *pids = collector.discover(&mut self.loaded, &self.target.cgroups)?;
                        rss.set_pids(pids);
                    }
                }
                Work::Signals(w) => w.tick(&self.target),
                Work::Fault(f) => f.tick(),
            }
        }
        Ok(())
    }

    /// Every [`RESOLVE_EVERY`]: symbolize what is new while its processes live.
    fn slow_tick(&mut self, symbolizer: &mut Symbolizer) {
        let now_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        for work in &mut self.works {
            match work {
                Work::Cpu { raw, received, .. } => {
                    symbolizer.resolve(&raw.take_new());
                    received.push((now_ms, raw.received));
                }
                Work::Memory { collector, .. } => symbolizer.resolve(&collector.take_new()),
                Work::Signals(w) => w.resolve(symbolizer),
                Work::Fault(_) => {}
            }
        }
    }

    fn fault_done(&self) -> bool {
        self.works
            .iter()
            .any(|w| matches!(w, Work::Fault(f) if f.done()))
    }

    fn progress(&self) -> String {
        let parts: Vec<String> = self.works.iter().map(Work::progress).collect();
        parts.join("; ")
    }
}

impl Work {
    fn progress(&self) -> String {
        match self {
            Work::Cpu { raw, collector, .. } => format!(
                "{} samples, {} lost",
                raw.received,
                collector.counters().ring_full
            ),
            Work::Memory {
                collector, pids, ..
            } => {
                let c = collector.counters();
                format!(
                    "{} processes, {} allocations tracked, {} page faults",
                    pids.len(),
                    c.get(toe_common::memory::Counter::Tracked),
                    c.get(toe_common::memory::Counter::Faults)
                )
            }
            Work::Signals(w) => w.progress(),
            Work::Fault(f) => format!("{} running", f.plan.name()),
        }
    }
}

/// What ends a run early: a reason to stop (`SIGINT`, `the PowerTool was deleted`, ...), sent
/// once. The run also says when it has attached and started its fault.
pub struct Control {
    pub stop: watch::Receiver<Option<&'static str>>,
    /// Told the target's description once sampling has begun.
    pub started: Option<oneshot::Sender<String>>,
}

impl Control {
    /// A run no one stops early except by the returned sender.
    #[must_use]
    pub fn new() -> (watch::Sender<Option<&'static str>>, Self) {
        let (tx, stop) = watch::channel(None);
        (
            tx,
            Self {
                stop,
                started: None,
            },
        )
    }

    /// Stops on SIGINT or SIGTERM. The listeners are installed here, before anything is
    /// attached or started: a signal that arrives while a fault starts must roll it back, not
    /// kill TOE with its default action.
    pub fn on_signals() -> Result<Self, RunError> {
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let (tx, control) = Self::new();
        tokio::spawn(async move {
            let why = tokio::select! {
                _ = sigint.recv() => "SIGINT",
                _ = sigterm.recv() => "SIGTERM",
            };
            let _ = tx.send(Some(why));
            // Keep the listeners (and so the sender) alive: a second signal is also absorbed.
            std::future::pending::<()>().await;
        });
        Ok(control)
    }
}

/// Resolves with the stop reason once one is sent (never, if the sender is gone without one).
async fn stopped(stop: &mut watch::Receiver<Option<&'static str>>) -> &'static str {
    match stop.wait_for(Option::is_some).await {
        Ok(why) => why.expect("waited for Some"),
        Err(_) => std::future::pending().await,
    }
}

/// Drains and symbolizes until the duration ends, the target is gone, or it is stopped.
/// Returns why it stopped and the command's exit status if it already exited.
async fn sample(
    s: &mut Session,
    symbolizer: &mut Symbolizer,
    duration: Duration,
    ui: Ui,
    stop: &mut watch::Receiver<Option<&'static str>>,
) -> Result<(Ended, Option<i32>), RunError> {
    let bar = progress_bar(ui, duration);
    let deadline = tokio::time::sleep(duration);
    tokio::pin!(deadline);
    let mut drain = tokio::time::interval(DRAIN_EVERY);
    let mut resolve = tokio::time::interval(RESOLVE_EVERY);
    let mut command_status = None;
    let by_pid = !s.target.tgids.is_empty() && s.target.cgroups.is_empty();
    let ended = loop {
        tokio::select! {
            () = &mut deadline => break Ended::Duration,
            why = stopped(stop) => break Ended::Interrupted(why),
            code = async { s.command_exit.as_mut().expect("guarded").await }, if s.command_exit.is_some() && command_status.is_none() => {
                let code = code.unwrap_or(127);
                command_status = Some(code);
                // Children it left behind are still targets; stop only when none is left.
                if s.loaded.live_tgids()? == 0 {
                    break Ended::CommandExited(code);
                }
            }
            _ = drain.tick() => {
                s.fast_tick(symbolizer)?;
                if s.fault_done() {
                    break Ended::FaultDone;
                }
            }
            _ = resolve.tick() => {
                s.slow_tick(symbolizer);
                bar.set_position(u64::try_from(s.started.elapsed().as_millis()).unwrap_or(u64::MAX));
                bar.set_message(s.progress());
                // A command's own exit is reported by its waiter thread, which may lag the kernel's
                // exit by a moment: wait for it rather than call the command gone early.
                let awaiting_command = s.command_exit.is_some() && command_status.is_none();
                if by_pid && !awaiting_command && s.loaded.live_tgids()? == 0 {
                    break command_status.map_or(Ended::TargetExited, Ended::CommandExited);
                }
                if !s.target.cgroups.is_empty() && s.target.cgroups.iter().all(|c| !c.path.exists()) {
                    break Ended::CgroupRemoved;
                }
            }
        }
    };
    bar.finish_and_clear();
    Ok((ended, command_status))
}

/// One artifact: summary name, file name, bytes.
type Artifact = (&'static str, &'static str, Bytes);

fn flamegraph(
    profile: &Profile,
    index: usize,
    title: &str,
    subtitle: &str,
    unit: &str,
) -> Result<Bytes, RunError> {
    svg::encode(profile, index, title, subtitle, unit)
        .map(Bytes::from)
        .map_err(|e| RunError::Svg(e.to_string()))
}

/// Writes every artifact, then the summary last (it lists the others).
async fn write_artifacts(
    artifacts: Vec<Artifact>,
    summary: &mut Summary,
    sink: &dyn ArtifactSink,
    stopped: Instant,
) -> Result<(), RunError> {
    for (kind, file, data) in artifacts {
        let url = sink.put(file, data).await?;
        summary.artifacts.push((kind.to_owned(), url));
    }
    summary.finalize_ms = u64::try_from(stopped.elapsed().as_millis()).unwrap_or(u64::MAX);
    let json = serde_json::to_vec_pretty(&summary).expect("summary serializes");
    let url = sink.put("summary.json", Bytes::from(json)).await?;
    summary.artifacts.push(("summary".into(), url));
    Ok(())
}

/// What a collector leaves after detaching: its section of the summary and its artifacts.
#[derive(Default)]
struct Finished {
    cpu: Option<CpuSummary>,
    memory: Option<MemorySummary>,
    signals: Option<crate::profile::signals::SignalSummary>,
    /// The run collected but must report failure (e.g. losses beyond the allowed bound).
    failed: Option<String>,
    fault: Option<faults::FaultSummary>,
    artifacts: Vec<Artifact>,
    warnings: Vec<String>,
    /// This tool's part of the run's shared timeline.
    lanes: Vec<timeline::Lane>,
}

impl Finished {
    /// Adds another tool's results; each tool fills its own parts.
    fn merge(&mut self, other: Self) {
        self.cpu = self.cpu.take().or(other.cpu);
        self.memory = self.memory.take().or(other.memory);
        self.signals = self.signals.take().or(other.signals);
        self.fault = self.fault.take().or(other.fault);
        self.failed = self.failed.take().or(other.failed);
        self.artifacts.extend(other.artifacts);
        self.warnings.extend(other.warnings);
        self.lanes.extend(other.lanes);
    }
}

fn finish_cpu(
    opts: CpuProfileOptions,
    mut collector: CpuCollector,
    (mut raw, received): (RawProfile, Vec<(f64, u64)>),
    symbolizer: &mut Symbolizer,
    children: (u64, u64),
    span: (u64, u64),
    title: &str,
) -> Result<Finished, RunError> {
    collector.drain(&mut raw);
    let counters = collector.counters();
    symbolizer.resolve(&raw.take_new());
    let period = 1_000_000_000 / opts.frequency_hz.max(1);
    let stacks = symbolizer.stacks(raw.counts.iter().map(|(k, &c)| (k, vec![c, c * period])));
    let cpu_ns = ValueType::new("cpu", "nanoseconds");
    let profile = Profile {
        frames: symbolizer.frames(),
        stacks,
        sample_types: vec![ValueType::new("samples", "count"), cpu_ns.clone()],
        default_type: 0,
        period: Some((cpu_ns, period)),
        start_unix_ns: span.0,
        duration_ns: span.1,
        comment: format!("toe cpu-profile at {} Hz", opts.frequency_hz),
    };
    let breakdown = summary::analyse(&profile);
    let mut warnings = Vec::new();
    if breakdown.total == 0 {
        warnings.push(
            "no samples: the target did not run on a CPU while sampling (idle, or exited at once)"
                .into(),
        );
    }
    let subtitle = format!(
        "{} samples at {} Hz",
        profile.total_default(),
        opts.frequency_hz
    );
    let artifacts = vec![
        (
            "flamegraph",
            "flamegraph.svg",
            flamegraph(&profile, 0, title, &subtitle, "samples")?,
        ),
        ("pprof", "cpu.pb.gz", Bytes::from(pprof::encode(&profile))),
        (
            "folded",
            "stacks.folded",
            Bytes::from(folded::encode(&profile, 0)),
        ),
    ];
    let cpu = CpuSummary {
        frequency_hz: opts.frequency_hz,
        cpus: collector.cpus.len(),
        samples: SampleAccounting {
            children_followed: children.0,
            children_missed: children.1,
            ..accounting(&raw, counters)
        },
        breakdown,
    };
    let lane = timeline::Lane {
        name: "cpu-profile: on-CPU samples".into(),
        unit: "samples/s".into(),
        series: vec![timeline::Series {
            name: "target on CPU".into(),
            points: timeline::rate_per_second(&received),
        }],
        ..timeline::Lane::default()
    };
    Ok(Finished {
        cpu: Some(cpu),
        artifacts,
        warnings,
        lanes: vec![lane],
        ..Finished::default()
    })
}

/// What was and was not tracked, in words, so an empty profile is never mistaken for "no leaks".
fn coverage(opts: &MemoryProfileOptions, m: &MemorySummary) -> Vec<String> {
    let mut out = Vec::new();
    if opts.allocations == AllocationMode::Off {
        out.push("allocations: not tracked (mode growth); page faults and RSS only".into());
    } else {
        let tracked = m.processes.iter().filter(|p| p.tracked).count();
        let untracked: Vec<String> = m
            .processes
            .iter()
            .filter(|p| !p.tracked)
            .map(|p| format!("{} ({})", p.name, p.pid))
            .collect();
        if tracked == 0 {
            out.push(
                "allocations: NOT TRACKED in any target process (no supported allocator); the \
                 heap profile is empty because nothing was observed, not because nothing leaked"
                    .into(),
            );
        } else {
            out.push(format!(
                "allocations: glibc malloc family (malloc, calloc, realloc, reallocarray, free, \
                 posix_memalign, aligned_alloc, memalign, valloc, pvalloc) probed in {tracked} \
                 process(es); memory the application maps itself (mmap) and allocators other \
                 than glibc's are not allocations here but show in page faults and RSS"
            ));
        }
        if !untracked.is_empty() {
            out.push(format!(
                "allocations not tracked in: {} (reasons per process above)",
                untracked.join(", ")
            ));
        }
        if opts.min_size > 0 {
            out.push(format!(
                "allocations below {} are counted, not tracked",
                memprof::bytes(opts.min_size)
            ));
        }
    }
    if opts.faults {
        out.push("page faults: every user page fault in the target, filtered in the kernel".into());
    }
    out
}

/// The heap profile's artifacts and summary parts.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename them"
)]
fn heap_artifacts(
    m: &mut MemorySummary,
    artifacts: &mut Vec<Artifact>,
    warnings: &mut Vec<String>,
    symbolizer: &mut Symbolizer,
    sites: &[(crate::symbolize::RawKey, toe_common::memory::SiteStats)],
    counters: &crate::collectors::memory::MemCounters,
    span: (u64, u64),
    title: &str,
) -> Result<(), RunError> {
    let rate = m.sample_bytes.unwrap_or(0);
    let heap = memprof::heap_profile(symbolizer, sites, rate, span);
    let totals = HeapTotals::of(&heap);
    let subtitle = format!(
        "{} in use at the end of the run{}",
        memprof::bytes(totals.inuse_bytes),
        if rate > 0 {
            " (estimated from sampling)"
        } else {
            ""
        }
    );
    artifacts.push((
        "inuse-flamegraph",
        "inuse.svg",
        flamegraph(
            &heap,
            memprof::INUSE_SPACE,
            &format!("{title} — in-use bytes"),
            &subtitle,
            "bytes",
        )?,
    ));
    artifacts.push((
        "alloc-flamegraph",
        "alloc.svg",
        flamegraph(
            &heap,
            memprof::ALLOC_SPACE,
            &format!("{title} — allocated bytes"),
            &format!(
                "{} allocated during the run",
                memprof::bytes(totals.alloc_bytes)
            ),
            "bytes",
        )?,
    ));
    artifacts.push((
        "heap-pprof",
        "heap.pb.gz",
        Bytes::from(pprof::encode(&heap)),
    ));
    artifacts.push((
        "inuse-folded",
        "inuse.folded",
        Bytes::from(folded::encode(&heap, memprof::INUSE_SPACE)),
    ));
    artifacts.push((
        "alloc-folded",
        "alloc.folded",
        Bytes::from(folded::encode(&heap, memprof::ALLOC_SPACE)),
    ));
    m.inuse = Some(summary::analyse(&heap));
    m.heap = Some(totals);
    let acc = AllocationAccounting::from_counters(counters);
    if acc.lost_live_map_full + acc.lost_sites_map_full + acc.lost_call_table_full > 0 {
        warnings.push(format!(
                "allocations lost: {} (live map full: raise --max-tracked), {} (site map full), {} (call table full)",
                acc.lost_live_map_full, acc.lost_sites_map_full, acc.lost_call_table_full
            ));
    }
    m.allocations = Some(acc);
    Ok(())
}

fn finish_memory(
    opts: MemoryProfileOptions,
    mut collector: MemoryCollector,
    rss: &RssSampler,
    symbolizer: &mut Symbolizer,
    span: (u64, u64),
    title: &str,
) -> Result<Finished, RunError> {
    let (sites, new) = collector.finish();
    symbolizer.resolve(&new);
    let counters = collector.counters();
    let mut m = MemorySummary {
        mode: match opts.allocations {
            AllocationMode::Exact => "exact",
            AllocationMode::Sampled => "sampled",
            AllocationMode::Off => "growth",
        }
        .into(),
        sample_bytes: (opts.allocations == AllocationMode::Sampled).then_some(opts.sample_bytes),
        min_size: opts.min_size,
        fault_period: opts.faults.then_some(opts.fault_period),
        processes: collector.processes(),
        rss: rss.summary(),
        ..MemorySummary::default()
    };
    m.coverage = coverage(&opts, &m);
    let mut artifacts: Vec<Artifact> = Vec::new();
    let mut warnings = Vec::new();
    if sites.stacks_unverified > 0 {
        warnings.push(format!(
            "{} call sites shown without a stack: their stored frames failed verification",
            sites.stacks_unverified
        ));
    }
    if opts.allocations != AllocationMode::Off {
        heap_artifacts(
            &mut m,
            &mut artifacts,
            &mut warnings,
            symbolizer,
            &sites.allocations,
            &counters,
            span,
            title,
        )?;
    }
    if opts.faults {
        let growth = memprof::growth_profile(
            symbolizer,
            &sites.faults,
            u64::from(opts.fault_period),
            span,
        );
        let f = FaultAccounting::from_counters(&counters);
        artifacts.push((
            "growth-flamegraph",
            "growth.svg",
            flamegraph(
                &growth,
                0,
                &format!("{title} — page faults (memory growth)"),
                &format!("{} page faults in the target", f.faults),
                "faults",
            )?,
        ));
        artifacts.push((
            "growth-pprof",
            "growth.pb.gz",
            Bytes::from(pprof::encode(&growth)),
        ));
        artifacts.push((
            "growth-folded",
            "growth.folded",
            Bytes::from(folded::encode(&growth, 0)),
        ));
        m.growth = Some(summary::analyse(&growth));
        m.faults = Some(f);
    }
    let series = rss.series();
    artifacts.push(("rss-csv", "rss.csv", Bytes::from(rss::csv(&series))));
    artifacts.push((
        "rss-json",
        "rss.json",
        Bytes::from(serde_json::to_vec_pretty(&series).expect("series serialize")),
    ));
    artifacts.push((
        "rss-chart",
        "rss.svg",
        Bytes::from(rss::svg(&series, &format!("{title} — RSS"))),
    ));
    Ok(Finished {
        memory: Some(m),
        artifacts,
        warnings,
        lanes: vec![rss::timeline_lane(&series)],
        ..Finished::default()
    })
}

/// Detached: turns what the collector accumulated into its summary section and artifacts.
fn finish_work(
    work: Work,
    symbolizer: &mut Symbolizer,
    children: (u64, u64),
    (span, started_ns): ((u64, u64), u64),
    sampled_for: Duration,
    title: &str,
) -> Result<Finished, RunError> {
    Ok(match work {
        Work::Cpu {
            opts,
            collector,
            raw,
            received,
        } => finish_cpu(
            opts,
            collector,
            (raw, received),
            symbolizer,
            children,
            span,
            title,
        )?,
        Work::Memory {
            opts,
            collector,
            rss,
            ..
        } => finish_memory(opts, collector, &rss.finish(), symbolizer, span, title)?,
        Work::Signals(w) => signals::finish(
            w,
            symbolizer,
            (started_ns, span.0),
            sampled_for.as_secs_f64() * 1000.0,
            title,
        ),
        Work::Fault(f) => {
            let summary = (*f).finish();
            let mut finished = Finished::default();
            if summary.leftovers > 0 {
                finished.warnings.push(format!(
                    "{} worker(s) survived the rollback",
                    summary.leftovers
                ));
            }
            finished.artifacts.push((
                "fault-series",
                "fault.csv",
                Bytes::from(faults::csv(&summary)),
            ));
            finished.lanes.push(faults::timeline_lane(&summary));
            finished.fault = Some(summary);
            finished
        }
    })
}

/// Every tool's results together; a terminate fault's victims get their ending from the trace.
fn finish_all(
    works: Vec<Work>,
    symbolizer: &mut Symbolizer,
    children: (u64, u64),
    clock: ((u64, u64), u64),
    sampled_for: Duration,
    title: &str,
) -> Result<Finished, RunError> {
    let tools = works.len();
    let mut all = Finished::default();
    for work in works {
        all.merge(finish_work(
            work,
            symbolizer,
            children,
            clock,
            sampled_for,
            title,
        )?);
    }
    if let (Some(fault), Some(sig)) = (&mut all.fault, &all.signals) {
        for t in &mut fault.terminated {
            t.outcome = sig
                .processes
                .iter()
                .find(|p| p.pid == t.pid)
                .map(|p| p.explanation.clone());
        }
    }
    // The shared timeline, when there is something to line up: a fault (asked versus achieved
    // over time) or several tools.
    if all.fault.is_some() || tools > 1 {
        let t = timeline::Timeline {
            start_unix_ns: clock.0.0,
            duration_ms: sampled_for.as_secs_f64() * 1000.0,
            lanes: std::mem::take(&mut all.lanes),
        };
        all.artifacts.push((
            "run-timeline",
            "run-timeline.svg",
            Bytes::from(timeline::svg(&t, &format!("{title} — run timeline"))),
        ));
        all.artifacts.push((
            "run-timeline-json",
            "run-timeline.json",
            Bytes::from(serde_json::to_vec_pretty(&t).expect("timeline serializes")),
        ));
    }
    Ok(all)
}

/// Runs the plan to the end and writes its artifacts to `sink`.
pub async fn execute(
    plan: &RunPlan,
    sink: &dyn ArtifactSink,
    ui: Ui,
    mut control: Control,
) -> Result<Outcome, RunError> {
    if let Some(why) = *control.stop.borrow() {
        return Err(RunError::Stopped(why));
    }
    let mut session = start(plan)?;
    if let Some(tx) = control.started.take() {
        let _ = tx.send(session.target.description.clone());
    }
    let mut symbolizer = Symbolizer::new();
    let (ended, command_status) = sample(
        &mut session,
        &mut symbolizer,
        plan.tool.duration,
        ui,
        &mut control.stop,
    )
    .await?;
    let children = session.loaded.child_counters()?;
    for work in &mut session.works {
        if let Work::Memory {
            collector,
            rss,
            pids,
            ..
        } = work
        {
            *pids = collector.discover(&mut session.loaded, &session.target.cgroups)?;
            rss.set_pids(pids);
        }
    }
    let Session {
        target,
        loaded,
        works,
        command_exit,
        started_at,
        started,
        started_ns,
    } = session;
    // Stop collecting: dropping the object detaches every program and closes the perf events.
    drop(loaded);
    let stopped = Instant::now();
    let sampled_for = started.elapsed();
    let span = (
        unix_ns(started_at),
        u64::try_from(sampled_for.as_nanos()).unwrap_or(u64::MAX),
    );
    let title = format!(
        "{} — {}",
        plan.name.as_deref().unwrap_or(&plan.tool.name),
        target.description
    );
    let finished = finish_all(
        works,
        &mut symbolizer,
        children,
        (span, started_ns),
        sampled_for,
        &title,
    )?;
    let mut summary = Summary {
        run: plan.run_id.clone(),
        tool: plan.tool.name.clone(),
        alongside: plan.alongside.iter().map(|t| t.name.clone()).collect(),
        target: target.description.clone(),
        complete: !matches!(ended, Ended::Interrupted(_)),
        ended: ended.describe(),
        started_unix_ms: span.0 / 1_000_000,
        requested_duration_s: plan.tool.duration.as_secs_f64(),
        sampled_duration_s: sampled_for.as_secs_f64(),
        cpu: finished.cpu,
        memory: finished.memory,
        signals: finished.signals,
        failed: finished.failed,
        fault: finished.fault,
        warnings: plan.warnings.clone(),
        ..Summary::default()
    };
    summary.warnings.extend(finished.warnings);
    write_artifacts(finished.artifacts, &mut summary, sink, stopped).await?;

    let exit_code = match (&ended, command_status, command_exit) {
        (Ended::Interrupted("SIGINT"), _, _) => 130,
        (Ended::Interrupted(_), _, _) => 143,
        _ if summary.failed.is_some() => 3,
        (_, Some(code), _) => code,
        (_, None, Some(rx)) => {
            // Duration ended first: the command keeps running and keeps its terminal; TOE
            // waits for it so scripts still get its exit status.
            eprintln!(
                "toe: collection stopped ({}); waiting for the command to exit",
                ended.describe()
            );
            rx.await.unwrap_or(127)
        }
        (_, None, None) => 0,
    };
    Ok(Outcome {
        summary,
        ended,
        exit_code,
    })
}

fn accounting(raw: &RawProfile, c: CpuCounters) -> SampleAccounting {
    SampleAccounting {
        taken: c.sampled,
        recorded: raw.received,
        lost_ring_full: c.ring_full,
        unaccounted: c.sampled.saturating_sub(raw.received + c.ring_full),
        kernel_stack_truncated: raw.kstack_truncated,
        user_stack_truncated: raw.ustack_truncated,
        kernel_stack_errors: raw.kstack_errors,
        user_stack_errors: raw.ustack_errors,
        children_followed: 0,
        children_missed: 0,
    }
}
