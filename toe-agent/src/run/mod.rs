//! Executes a [`RunPlan`]: resolve the target, load and attach, sample until the duration ends,
//! the target is gone or the user interrupts, then detach and write every artifact, including on
//! an interruption (marked partial).

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use toe_artifacts::{folded, names, profile::Profile, summary::Summary, timeline};
use toe_common::api::{ToolOptions, format_duration};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{oneshot, watch},
};

use crate::{
    ebpf::{LoadError, Loaded},
    plan::RunPlan,
    sink::{ArtifactSink, SinkError},
    symbolize::{
        Symbolizer,
        images::{self, Images},
    },
    targets::{self, HeldChild, ResolvedTarget, TargetError, TargetSpec},
    tools::{
        self, Artifact, Attach, Finish, Finished, Prepare, Tick, ToolRun,
        faults::{self, FaultError},
        signals::monotonic_ns,
    },
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

/// A run between attach and detach.
struct Session {
    target: ResolvedTarget,
    loaded: Loaded,
    /// One per tool of the PowerTool, collectors first, the fault (if any) last.
    works: Vec<Box<dyn ToolRun>>,
    /// Exit status of a command TOE started, delivered by a thread that waits for it.
    command_exit: Option<oneshot::Receiver<i32>>,
    started_at: SystemTime,
    started: Instant,
    /// The kernel's monotonic clock at the start, which event timestamps use.
    started_ns: u64,
    /// Keeps the mappings of target processes as they start, for those that exit before their
    /// stacks are symbolized.
    watcher: images::Watcher,
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
fn start(plan: &RunPlan, images: &Arc<Images>) -> Result<Session, RunError> {
    // Everything that can be rejected is checked before anything is loaded or attached.
    let (target, child) = resolve_target(&plan.target)?;
    let cpus = aya::util::online_cpus().map_or(1, |c| u32::try_from(c.len()).unwrap_or(u32::MAX));
    let mut tools: Vec<Box<dyn tools::Tool>> =
        run_tools(plan).iter().filter_map(tools::tool).collect();
    // Collectors attach first: they see the fault from its first moment.
    tools.sort_by_key(|t| t.is_fault());
    let prepare = Prepare {
        spec: &plan.target,
        target: &target,
        run_id: &plan.run_id,
    };
    for tool in &mut tools {
        tool.prepare(&prepare)?;
    }
    let refs: Vec<&dyn tools::Tool> = tools.iter().map(AsRef::as_ref).collect();
    let mut loaded = Loaded::load(&tools::map_sizes(&refs, cpus, &target))?;
    loaded.install_targets(&target)?;
    if matches!(plan.target, TargetSpec::Pid(_)) {
        // The fork tracepoint follows children from now on; this catches those started before.
        for pid in targets::descendants(&target.tgids) {
            loaded.add_tgid(pid)?;
        }
    }
    // Watching starts before the command is released, so its first image is seen.
    let watcher = images::Watcher::spawn(
        Arc::clone(images),
        images::Targets {
            tgids: Some(loaded.tgids_handle()?),
            counters: Some(loaded.target_counters_handle()?),
            cgroups: target.cgroups.iter().map(|c| c.path.clone()).collect(),
            news: Some(loaded.news()?),
        },
    )
    .map_err(LoadError::Thread)?;
    let mut attach = Attach {
        loaded: &mut loaded,
        target: &target,
        held_pid: child.as_ref().map(|c| c.pid),
        run_id: &plan.run_id,
        images,
    };
    let mut works = Vec::new();
    for tool in tools {
        works.push(tool.attach(&mut attach)?);
    }
    let started_ns = monotonic_ns();
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
        watcher,
    })
}

impl Session {
    /// Calls `f` on every tool with the run's tick context.
    fn each(
        &mut self,
        symbolizer: &mut Symbolizer,
        mut f: impl FnMut(&mut dyn ToolRun, &mut Tick<'_>) -> Result<(), RunError>,
    ) -> Result<(), RunError> {
        let mut cx = Tick {
            loaded: &mut self.loaded,
            target: &self.target,
            symbolizer,
            elapsed_ms: self.started.elapsed().as_secs_f64() * 1000.0,
        };
        for work in &mut self.works {
            f(work.as_mut(), &mut cx)?;
        }
        Ok(())
    }

    /// Every [`DRAIN_EVERY`]: empty rings, attach to new processes, read RSS when due; tools
    /// that sample on a clock (faults) first.
    fn fast_tick(&mut self, symbolizer: &mut Symbolizer) -> Result<(), RunError> {
        self.each(symbolizer, |w, cx| {
            if w.ticks_first() {
                w.fast_tick(cx)?;
            }
            Ok(())
        })?;
        self.each(symbolizer, |w, cx| {
            if w.ticks_first() {
                Ok(())
            } else {
                w.fast_tick(cx)
            }
        })
    }

    /// Every [`RESOLVE_EVERY`]: symbolize what is new while its processes live.
    fn slow_tick(&mut self, symbolizer: &mut Symbolizer) {
        let _ = self.each(symbolizer, |w, cx| {
            w.slow_tick(cx);
            Ok(())
        });
    }

    fn needs_fast_tick(&self) -> bool {
        self.works.iter().any(|w| w.needs_fast_tick())
    }

    fn fault_done(&self) -> bool {
        self.works.iter().any(|w| w.done())
    }

    fn progress(&self) -> String {
        let parts: Vec<String> = self.works.iter().map(|w| w.progress()).collect();
        parts.join("; ")
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
    let fast = s.needs_fast_tick();
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
            _ = drain.tick(), if fast => {
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

/// A flamegraph of sample type `index` of `profile`, for a tool's artifacts.
pub(crate) fn flamegraph(
    profile: &Profile,
    index: usize,
    title: &str,
    subtitle: &str,
    unit: &str,
) -> Result<Bytes, RunError> {
    folded::profile_flamegraph(profile, index, title, subtitle, unit)
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
    for (name, data) in artifacts {
        let url = sink.put(name.file, data).await?;
        summary.artifacts.push((name.kind.to_owned(), url));
    }
    summary.finalize_ms = u64::try_from(stopped.elapsed().as_millis()).unwrap_or(u64::MAX);
    let json = serde_json::to_vec_pretty(&summary).expect("summary serializes");
    let url = sink.put(names::SUMMARY.file, Bytes::from(json)).await?;
    summary.artifacts.push((names::SUMMARY.kind.into(), url));
    Ok(())
}

/// Every tool's results together; a terminate fault's victims get their ending from the trace.
fn finish_all(works: Vec<Box<dyn ToolRun>>, cx: &mut Finish<'_>) -> Result<Finished, RunError> {
    let tools = works.len();
    let mut all = Finished::default();
    for work in works {
        all.merge(work.finish(cx)?);
    }
    combine(&mut all, tools, cx);
    Ok(all)
}

/// What the tools' results say together: a terminate fault's victims get their ending from the
/// trace, and the run gets a shared timeline when there is something to line up (a fault, asked
/// versus achieved over time, or several tools).
fn combine(all: &mut Finished, tools: usize, cx: &Finish<'_>) {
    if let (Some(fault), Some(sig)) = (&mut all.fault, &all.signals) {
        for t in &mut fault.terminated {
            t.outcome = sig
                .processes
                .iter()
                .find(|p| p.pid == t.pid)
                .map(|p| p.explanation.clone());
        }
    }
    if all.fault.is_some() || tools > 1 {
        let t = timeline::Timeline {
            start_unix_ns: cx.span.0,
            duration_ms: cx.sampled_for.as_secs_f64() * 1000.0,
            lanes: std::mem::take(&mut all.lanes),
        };
        all.artifacts.push((
            names::RUN_TIMELINE,
            Bytes::from(timeline::svg(&t, &format!("{} — run timeline", cx.title))),
        ));
        all.artifacts.push((
            names::RUN_TIMELINE_JSON,
            Bytes::from(serde_json::to_vec_pretty(&t).expect("timeline serializes")),
        ));
    }
}

/// The process exit code of a run: 130/143 when interrupted, 3 when it collected but failed
/// (losses beyond the allowed bound), else the command's own status, else 0. `None` means the
/// command still runs and its status is to be waited for.
fn exit_code(ended: &Ended, failed: bool, command_status: Option<i32>) -> Option<i32> {
    match (ended, command_status) {
        (Ended::Interrupted("SIGINT"), _) => Some(130),
        (Ended::Interrupted(_), _) => Some(143),
        _ if failed => Some(3),
        (_, Some(code)) => Some(code),
        (_, None) => None,
    }
}

/// The run's symbolizer. Tools run together share it: the most restrictive `--jit-names` holds.
fn symbolizer_for(plan: &RunPlan) -> Symbolizer {
    let mut symbolizer = Symbolizer::new();
    if let Some(how) = std::iter::once(&plan.tool)
        .chain(&plan.alongside)
        .filter_map(|t| t.options.jit_names())
        .max()
    {
        symbolizer.set_jit_names(how);
    }
    symbolizer
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
    let mut symbolizer = symbolizer_for(plan);
    let mut session = start(plan, &symbolizer.images())?;
    if let Some(tx) = control.started.take() {
        let _ = tx.send(session.target.description.clone());
    }
    let (ended, command_status) = sample(
        &mut session,
        &mut symbolizer,
        plan.tool.duration,
        ui,
        &mut control.stop,
    )
    .await?;
    let children = session.loaded.child_counters()?;
    session.each(&mut symbolizer, |w, cx| w.before_detach(cx))?;
    let Session {
        target,
        loaded,
        works,
        command_exit,
        started_at,
        started,
        started_ns,
        watcher,
    } = session;
    // Stop collecting: dropping the object detaches every program and closes the perf events.
    drop(loaded);
    drop(watcher);
    let stopped = Instant::now();
    let sampled_for = started.elapsed();
    let jit = symbolizer.name_generated_code();
    let title = format!(
        "{} — {}",
        plan.name.as_deref().unwrap_or(&plan.tool.name),
        target.description
    );
    let mut cx = Finish {
        symbolizer: &mut symbolizer,
        children,
        span: (
            unix_ns(started_at),
            u64::try_from(sampled_for.as_nanos()).unwrap_or(u64::MAX),
        ),
        started_ns,
        sampled_for,
        title: &title,
    };
    let finished = finish_all(works, &mut cx)?;
    let mut summary = Summary {
        run: plan.run_id.clone(),
        tool: plan.tool.name.clone(),
        alongside: plan.alongside.iter().map(|t| t.name.clone()).collect(),
        target: target.description.clone(),
        complete: !matches!(ended, Ended::Interrupted(_)),
        ended: ended.describe(),
        started_unix_ms: cx.span.0 / 1_000_000,
        requested_duration_s: plan.tool.duration.as_secs_f64(),
        sampled_duration_s: sampled_for.as_secs_f64(),
        cpu: finished.cpu,
        offcpu: finished.offcpu,
        memory: finished.memory,
        signals: finished.signals,
        failed: finished.failed,
        fault: finished.fault,
        jit,
        warnings: plan.warnings.clone(),
        ..Summary::default()
    };
    summary.warnings.extend(finished.warnings);
    symbolizer.describe_binaries(&mut summary);
    write_artifacts(finished.artifacts, &mut summary, sink, stopped).await?;

    let exit_code = match (
        exit_code(&ended, summary.failed.is_some(), command_status),
        command_exit,
    ) {
        (Some(code), _) => code,
        (None, Some(rx)) => {
            // Duration ended first: the command keeps running and keeps its terminal; TOE
            // waits for it so scripts still get its exit status.
            eprintln!(
                "toe: collection stopped ({}); waiting for the command to exit",
                ended.describe()
            );
            rx.await.unwrap_or(127)
        }
        (None, None) => 0,
    };
    Ok(Outcome {
        summary,
        ended,
        exit_code,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use toe_artifacts::summary::{
        fault::{FaultSummary, Termination},
        signals::{ProcessEnd, SignalSummary},
    };

    use super::*;

    #[test]
    fn exit_codes_follow_how_the_run_ended() {
        assert_eq!(
            exit_code(&Ended::Interrupted("SIGINT"), true, Some(1)),
            Some(130)
        );
        assert_eq!(
            exit_code(&Ended::Interrupted("SIGTERM"), false, None),
            Some(143)
        );
        assert_eq!(exit_code(&Ended::Duration, true, Some(0)), Some(3));
        assert_eq!(exit_code(&Ended::CommandExited(7), false, Some(7)), Some(7));
        assert_eq!(exit_code(&Ended::Duration, false, None), None);
    }

    fn finish_cx(symbolizer: &mut Symbolizer) -> Finish<'_> {
        Finish {
            symbolizer,
            children: (0, 0),
            span: (1_700_000_000_000_000_000, 2_000_000_000),
            started_ns: 0,
            sampled_for: Duration::from_secs(2),
            title: "t",
        }
    }

    #[test]
    fn a_terminated_process_gets_its_ending_from_the_trace_and_the_run_a_timeline() {
        let mut all = Finished {
            fault: Some(FaultSummary {
                terminated: vec![Termination {
                    pid: 42,
                    ..Termination::default()
                }],
                ..FaultSummary::default()
            }),
            signals: Some(SignalSummary {
                processes: vec![ProcessEnd {
                    pid: 42,
                    explanation: "app (42) exited with 0 after SIGTERM".into(),
                    ..ProcessEnd::default()
                }],
                ..SignalSummary::default()
            }),
            ..Finished::default()
        };
        let mut symbolizer = Symbolizer::new();
        combine(&mut all, 2, &finish_cx(&mut symbolizer));
        let t = &all.fault.as_ref().unwrap().terminated[0];
        assert_eq!(
            t.outcome.as_deref(),
            Some("app (42) exited with 0 after SIGTERM")
        );
        let written: Vec<&str> = all.artifacts.iter().map(|(n, _)| n.file).collect();
        assert_eq!(
            written,
            [names::RUN_TIMELINE.file, names::RUN_TIMELINE_JSON.file]
        );
    }

    #[test]
    fn one_collector_alone_gets_no_shared_timeline() {
        let mut all = Finished::default();
        let mut symbolizer = Symbolizer::new();
        combine(&mut all, 1, &finish_cx(&mut symbolizer));
        assert!(all.artifacts.is_empty());
    }
}
