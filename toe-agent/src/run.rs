//! Executes a [`RunPlan`]: resolve the target, load and attach, sample until the duration ends,
//! the target is gone or the user interrupts, then detach and write every artifact, including on
//! an interruption (marked partial).

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use toe_common::api::{CpuProfileOptions, ToolOptions, format_duration};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::oneshot,
};

use crate::{
    collectors::cpu::{CpuCollector, CpuCounters, RawProfile},
    ebpf::{LoadError, Loaded},
    plan::RunPlan,
    profile::{
        Profile, folded, pprof,
        summary::{self, SampleAccounting, Summary},
        svg,
    },
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
}

/// Why sampling stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    Duration,
    TargetExited,
    CommandExited(i32),
    CgroupRemoved,
    Interrupted(&'static str),
}

impl Ended {
    fn describe(&self) -> String {
        match self {
            Self::Duration => "duration reached".into(),
            Self::TargetExited => "all target processes exited".into(),
            Self::CommandExited(code) => format!("command exited with status {code}"),
            Self::CgroupRemoved => "target cgroup was removed".into(),
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
    collector: CpuCollector,
    /// Exit status of a command TOE started, delivered by a thread that waits for it.
    command_exit: Option<oneshot::Receiver<i32>>,
    started_at: SystemTime,
    started: Instant,
}

/// Resolves the target and attaches; the command (if any) runs from here on.
fn start(plan: &RunPlan, opts: &CpuProfileOptions) -> Result<Session, RunError> {
    // Everything that can be rejected is checked before anything is loaded or attached.
    let (target, child) = resolve_target(&plan.target)?;
    let cpus = aya::util::online_cpus().map_or(1, |c| u32::try_from(c.len()).unwrap_or(u32::MAX));
    let mut loaded = Loaded::load(toe_common::cpu::ring_bytes(cpus, opts.frequency_hz))?;
    loaded.install_targets(&target)?;
    if matches!(plan.target, TargetSpec::Pid(_)) {
        // The fork tracepoint follows children from now on; this catches those started before.
        for pid in targets::descendants(&target.tgids) {
            loaded.add_tgid(pid)?;
        }
    }
    let collector = CpuCollector::attach(&mut loaded, opts)?;
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
        collector,
        command_exit,
        started_at: SystemTime::now(),
        started: Instant::now(),
    })
}

/// Drains and symbolizes until the duration ends, the target is gone, or a signal arrives.
/// Returns why it stopped and the command's exit status if it already exited.
async fn sample(
    s: &mut Session,
    raw: &mut RawProfile,
    symbolizer: &mut Symbolizer,
    duration: Duration,
    ui: Ui,
) -> Result<(Ended, Option<i32>), RunError> {
    let bar = progress_bar(ui, duration);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let deadline = tokio::time::sleep(duration);
    tokio::pin!(deadline);
    let mut drain = tokio::time::interval(DRAIN_EVERY);
    let mut resolve = tokio::time::interval(RESOLVE_EVERY);
    let mut command_status = None;
    let by_pid = !s.target.tgids.is_empty() && s.target.cgroups.is_empty();
    let ended = loop {
        tokio::select! {
            () = &mut deadline => break Ended::Duration,
            _ = sigint.recv() => break Ended::Interrupted("SIGINT"),
            _ = sigterm.recv() => break Ended::Interrupted("SIGTERM"),
            code = async { s.command_exit.as_mut().expect("guarded").await }, if s.command_exit.is_some() && command_status.is_none() => {
                let code = code.unwrap_or(127);
                command_status = Some(code);
                // Children it left behind are still targets; stop only when none is left.
                if s.loaded.live_tgids()? == 0 {
                    break Ended::CommandExited(code);
                }
            }
            _ = drain.tick() => {
                s.collector.drain(raw);
            }
            _ = resolve.tick() => {
                symbolizer.resolve(&raw.take_new());
                bar.set_position(u64::try_from(s.started.elapsed().as_millis()).unwrap_or(u64::MAX));
                bar.set_message(format!("{} samples, {} lost", raw.received, s.collector.counters().ring_full));
                if by_pid && s.loaded.live_tgids()? == 0 {
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

/// Encodes the profile and writes every artifact, the summary last (it lists the others).
async fn write_artifacts(
    plan: &RunPlan,
    profile: &Profile,
    summary: &mut Summary,
    sink: &dyn ArtifactSink,
    stopped: Instant,
) -> Result<(), RunError> {
    let title = format!(
        "{} — {}",
        plan.name.as_deref().unwrap_or(&plan.tool.name),
        summary.target
    );
    let svg = svg::encode(profile, &title).map_err(|e| RunError::Svg(e.to_string()))?;
    for (kind, file, data) in [
        ("flamegraph", "flamegraph.svg", Bytes::from(svg)),
        ("pprof", "cpu.pb.gz", Bytes::from(pprof::encode(profile))),
        (
            "folded",
            "stacks.folded",
            Bytes::from(folded::encode(profile)),
        ),
    ] {
        let url = sink.put(file, data).await?;
        summary.artifacts.push((kind.to_owned(), url));
    }
    summary.finalize_ms = u64::try_from(stopped.elapsed().as_millis()).unwrap_or(u64::MAX);
    let json = serde_json::to_vec_pretty(&summary).expect("summary serializes");
    let url = sink.put("summary.json", Bytes::from(json)).await?;
    summary.artifacts.push(("summary".into(), url));
    Ok(())
}

/// Runs the plan to the end and writes its artifacts to `sink`.
pub async fn execute(plan: &RunPlan, sink: &dyn ArtifactSink, ui: Ui) -> Result<Outcome, RunError> {
    let ToolOptions::CpuProfile(opts) = plan.tool.options;
    let mut session = start(plan, &opts)?;
    let mut raw = RawProfile::default();
    let mut symbolizer = Symbolizer::new();
    let (ended, command_status) = sample(
        &mut session,
        &mut raw,
        &mut symbolizer,
        plan.tool.duration,
        ui,
    )
    .await?;
    let children = session.loaded.child_counters()?;
    let Session {
        target,
        loaded,
        mut collector,
        command_exit,
        started_at,
        started,
    } = session;
    // Stop sampling: dropping the object detaches every program and closes the perf events.
    drop(loaded);
    let stopped = Instant::now();
    let sampled_for = started.elapsed();
    collector.drain(&mut raw);
    let counters = collector.counters();
    symbolizer.resolve(&raw.take_new());
    let profile = symbolizer.build(
        &raw,
        opts.frequency_hz,
        unix_ns(started_at),
        u64::try_from(sampled_for.as_nanos()).unwrap_or(u64::MAX),
    );

    let mut summary = Summary {
        run: plan.run_id.clone(),
        tool: plan.tool.name.clone(),
        target: target.description.clone(),
        complete: !matches!(ended, Ended::Interrupted(_)),
        ended: ended.describe(),
        frequency_hz: opts.frequency_hz,
        requested_duration_s: plan.tool.duration.as_secs_f64(),
        sampled_duration_s: sampled_for.as_secs_f64(),
        cpus: collector.cpus.len(),
        samples: SampleAccounting {
            children_followed: children.0,
            children_missed: children.1,
            ..accounting(&raw, counters)
        },
        warnings: plan.warnings.clone(),
        ..Summary::default()
    };
    summary::analyse(&profile, &mut summary);
    if profile.total_samples() == 0 {
        summary.warnings.push(
            "no samples: the target did not run on a CPU while sampling (idle, or exited at once)"
                .into(),
        );
    }
    write_artifacts(plan, &profile, &mut summary, sink, stopped).await?;

    let exit_code = match (&ended, command_status, command_exit) {
        (Ended::Interrupted("SIGINT"), _, _) => 130,
        (Ended::Interrupted(_), _, _) => 143,
        (_, Some(code), _) => code,
        (_, None, Some(rx)) => {
            // Duration ended first: the command keeps running and keeps its terminal; TOE
            // waits for it so scripts still get its exit status.
            eprintln!(
                "toe: sampling stopped ({}); waiting for the command to exit",
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
