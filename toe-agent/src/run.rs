//! Executes a [`RunPlan`]: resolve the target, load and attach, sample until the duration ends,
//! the target is gone or the user interrupts, then detach and write every artifact, including on
//! an interruption (marked partial).

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use toe_common::api::{ToolOptions, format_duration};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::oneshot,
};

use crate::{
    collectors::cpu::{CpuCollector, CpuCounters, RawProfile},
    ebpf::{LoadError, Loaded},
    plan::RunPlan,
    profile::{
        folded, pprof,
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

const DRAIN_EVERY: Duration = Duration::from_millis(10);
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

/// Runs the plan to the end and writes its artifacts to `sink`.
pub async fn execute(plan: &RunPlan, sink: &dyn ArtifactSink, ui: Ui) -> Result<Outcome, RunError> {
    let ToolOptions::CpuProfile(opts) = plan.tool.options;
    // Everything that can be rejected is checked before anything is loaded or attached.
    let (target, mut child) = resolve_target(&plan.target)?;
    let mut loaded = Loaded::load()?;
    loaded.install_targets(&target)?;
    if matches!(plan.target, TargetSpec::Pid(_)) {
        // The fork tracepoint follows children from now on; this catches those started before.
        for pid in targets::descendants(&target.tgids) {
            loaded.add_tgid(pid)?;
        }
    }
    let mut collector = CpuCollector::attach(&mut loaded, &opts)?;
    let started_at = SystemTime::now();
    let started = Instant::now();
    let (exit_tx, mut exit_rx) = oneshot::channel::<i32>();
    let child_pid = child.as_ref().map(|c| c.pid);
    if let Some(c) = child.as_mut() {
        c.release()?;
        let waiter = child.take().expect("present");
        std::thread::spawn(move || {
            let _ = exit_tx.send(waiter.wait());
        });
    } else {
        drop(exit_tx);
    }

    let bar = progress_bar(ui, plan.tool.duration);
    let mut raw = RawProfile::default();
    let mut symbolizer = Symbolizer::new();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let deadline = tokio::time::sleep(plan.tool.duration);
    tokio::pin!(deadline);
    let mut drain = tokio::time::interval(DRAIN_EVERY);
    let mut resolve = tokio::time::interval(RESOLVE_EVERY);
    let mut command_status = None;
    let cgroup_paths: Vec<PathBuf> = target.cgroups.iter().map(|c| c.path.clone()).collect();
    let ended = loop {
        tokio::select! {
            () = &mut deadline => break Ended::Duration,
            _ = sigint.recv() => break Ended::Interrupted("SIGINT"),
            _ = sigterm.recv() => break Ended::Interrupted("SIGTERM"),
            code = &mut exit_rx, if child_pid.is_some() && command_status.is_none() => {
                let code = code.unwrap_or(127);
                command_status = Some(code);
                // Children it left behind are still targets; stop only when none is left.
                if loaded.live_tgids()? == 0 {
                    break Ended::CommandExited(code);
                }
            }
            _ = drain.tick() => {
                collector.drain(&mut raw);
            }
            _ = resolve.tick() => {
                symbolizer.resolve(&raw.take_new());
                let c = collector.counters();
                bar.set_position(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
                bar.set_message(format!("{} samples, {} lost", raw.received, c.ring_full));
                if !target.tgids.is_empty() && target.cgroups.is_empty() && loaded.live_tgids()? == 0 {
                    break command_status.map_or(Ended::TargetExited, Ended::CommandExited);
                }
                if !cgroup_paths.is_empty() && cgroup_paths.iter().all(|p| !p.exists()) {
                    break Ended::CgroupRemoved;
                }
            }
        }
    };
    let children = loaded.child_counters()?;
    // Stop sampling: dropping the object detaches every program and closes the perf events.
    drop(loaded);
    let stopped = Instant::now();
    let sampled_for = started.elapsed();
    bar.finish_and_clear();
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
    let title = format!(
        "{} — {}",
        plan.name.as_deref().unwrap_or(&plan.tool.name),
        target.description
    );
    let svg = svg::encode(&profile, &title).map_err(|e| RunError::Svg(e.to_string()))?;
    for (name, data) in [
        ("flamegraph", "flamegraph.svg", Bytes::from(svg)),
        ("pprof", "cpu.pb.gz", Bytes::from(pprof::encode(&profile))),
        (
            "folded",
            "stacks.folded",
            Bytes::from(folded::encode(&profile)),
        ),
    ]
    .map(|(kind, file, data)| ((kind, file), data))
    {
        let url = sink.put(name.1, data).await?;
        summary.artifacts.push((name.0.to_owned(), url));
    }
    let summary_url_name = "summary.json";
    summary.artifacts.push(("summary".into(), String::new()));
    summary.finalize_ms = u64::try_from(stopped.elapsed().as_millis()).unwrap_or(u64::MAX);
    let json = serde_json::to_vec_pretty(&summary).expect("summary serializes");
    let url = sink.put(summary_url_name, Bytes::from(json)).await?;
    summary.artifacts.last_mut().expect("pushed above").1 = url;

    let exit_code = match &ended {
        Ended::Interrupted("SIGINT") => 130,
        Ended::Interrupted(_) => 143,
        _ => 0,
    };
    let exit_code = match (exit_code, command_status, child_pid) {
        (0, Some(code), _) => code,
        (0, None, Some(_)) => {
            // Duration ended first: the command keeps running and keeps its terminal; TOE
            // waits for it so scripts still get its exit status.
            eprintln!(
                "toe: sampling stopped ({}); waiting for the command to exit",
                ended.describe()
            );
            exit_rx.await.unwrap_or(127)
        }
        (code, _, _) => code,
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
