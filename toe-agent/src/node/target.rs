//! One target of an admitted PowerTool on this node, start to end: re-validate, plan, run the
//! engine, spool the artifacts, upload them, and report the target's phase.

use std::{collections::BTreeSet, sync::Arc};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt as _};
use toe_common::api::{
    self, Configs, Policy, PowerTool, PowerToolConfig, SelectedTarget, TargetPhase, ToolOptions,
    run_name,
};
use tokio::sync::{oneshot, watch};
use url::Url;

use super::{
    Ctx,
    spool::{self, Job, JobDir},
    status::TargetRef,
    target_ref,
};
use crate::{
    plan,
    run::{self, Control, Ended, Outcome, RunError, Ui},
    targets::TargetSpec,
};

/// The agent trusts no status field: whoever can write `powertools/status` could aim it at any
/// container of the node. It acts only when the target's namespace is one the PowerTool may
/// reach under the configs as they are now, and when the pod, looked up by the agent itself, is
/// on this node and runs that container with that id.
pub(super) async fn verify_target(
    ctx: &Ctx,
    pt: &PowerTool,
    t: &SelectedTarget,
) -> Result<(), String> {
    let refused = |why: String| format!("refused by the node agent: {why}");
    let own = pt.namespace().unwrap_or_default();
    let selects = pt
        .spec
        .targets
        .as_ref()
        .is_some_and(|s| s.namespace_selector.is_some());
    if t.namespace != own && !selects {
        return Err(refused(format!(
            "the PowerTool selects only its own namespace {own}, not {}",
            t.namespace
        )));
    }
    let configs: Vec<PowerToolConfig> = ctx.configs.state().iter().map(|c| (**c).clone()).collect();
    api::namespaces_allowed(
        pt,
        &configs,
        std::slice::from_ref(&t.namespace),
        &ctx.protected,
    )
    .map_err(refused)?;
    let pod = Api::<Pod>::namespaced(ctx.client.clone(), &t.namespace)
        .get_opt(&t.pod)
        .await
        .map_err(|e| refused(format!("looking up pod {}/{}: {e}", t.namespace, t.pod)))?
        .ok_or_else(|| refused(format!("pod {}/{} does not exist", t.namespace, t.pod)))?;
    let on = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    if on != Some(ctx.node.as_str()) {
        return Err(refused(format!(
            "pod {}/{} is not on node {}",
            t.namespace, t.pod, ctx.node
        )));
    }
    let runs = pod
        .status
        .iter()
        .flat_map(|s| s.container_statuses.iter().flatten())
        .any(|c| c.name == t.container && c.container_id.as_deref() == Some(&t.container_id));
    if !runs {
        return Err(refused(format!(
            "pod {}/{} has no container {} with the id in the PowerTool's status",
            t.namespace, t.pod, t.container
        )));
    }
    Ok(())
}

/// The configs that are themselves valid, as one policy set (a broken config enables nothing,
/// as in admission).
pub(super) fn usable_configs(ctx: &Ctx) -> Result<Configs, String> {
    let all: Vec<PowerToolConfig> = ctx.configs.state().iter().map(|c| (**c).clone()).collect();
    Configs::new(&api::usable_configs(&all).0).map_err(|e| e.to_string())
}

/// The agent's own admission: the spec as it is now, under the configs as they are now, for
/// the PowerTool's namespace and the target's.
pub(super) fn revalidate(
    ctx: &Ctx,
    pt: &PowerTool,
    t: &SelectedTarget,
) -> Result<api::ValidatedRun, String> {
    let configs = usable_configs(ctx)?;
    let own = pt.namespace().unwrap_or_default();
    let mut run = None;
    for ns in BTreeSet::from([own.as_str(), t.namespace.as_str()]) {
        let policy = Policy::Configs {
            configs: &configs,
            namespace: Some(ns),
        };
        run = Some(api::validate(pt, policy).map_err(|e| e.to_string())?);
    }
    run.ok_or_else(|| "nothing to validate".into())
}

/// The target's directory in the object store.
pub fn remote_dir(default: &Url, pt: &PowerTool, t: &SelectedTarget) -> Result<Url, String> {
    let out = pt.spec.output.as_ref();
    if out.and_then(|o| o.pvc.as_ref()).is_some() && out.and_then(|o| o.url.as_ref()).is_none() {
        return Err(
            "spec.output.pvc: the node agent writes to object stores; give spec.output.url \
                    (file:// on a node path, s3://, gs://, az://)"
                .into(),
        );
    }
    toe_artifacts::layout::of_target(pt, t, default).map_err(|e| format!("spec.output.url: {e}"))
}

pub(super) fn phase_of(o: &Outcome) -> TargetPhase {
    match (&o.ended, &o.summary.failed) {
        (Ended::Interrupted(_), _) => TargetPhase::Interrupted,
        (_, Some(_)) => TargetPhase::Failed,
        _ => TargetPhase::Completed,
    }
}

/// One line for `kubectl get -o yaml`: how it ended and what was counted.
pub(super) fn message_of(o: &Outcome) -> String {
    let s = &o.summary;
    let mut parts = vec![s.ended.clone()];
    if let Some(why) = &s.failed {
        parts.push(why.clone());
    }
    if let Some(cpu) = &s.cpu {
        parts.push(format!(
            "{} samples, {} lost",
            cpu.samples.recorded,
            cpu.samples.lost()
        ));
    }
    if let Some(sig) = &s.signals {
        parts.push(format!("{} signal events", sig.events.len()));
    }
    if !s.warnings.is_empty() {
        parts.push(format!("{} warning(s) in summary.json", s.warnings.len()));
    }
    parts.push(format!("{} artifact(s)", s.artifacts.len()));
    parts.join("; ")
}

/// Runs `plan` on its own thread and runtime: the engine blocks while it symbolizes and
/// encodes, and each run keeps its own loaded object and timers.
pub(super) async fn execute(
    plan: plan::RunPlan,
    sink: Result<spool::SpoolSink, url::ParseError>,
    control: Control,
) -> Result<Outcome, RunError> {
    let sink = sink.map_err(|e| RunError::Unsupported(format!("output URL: {e}")))?;
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(run::execute(&plan, &sink, Ui::default(), control))
    })
    .await
    .map_err(|e| RunError::Unsupported(format!("the run's thread failed: {e}")))?
}

/// The run's plan for this target, or why there is none (a message for the target's status).
/// `Ok(None)`: not this agent's to run (an image tool).
pub(super) fn prepare(
    ctx: &Ctx,
    pt: &PowerTool,
    t: &SelectedTarget,
) -> Result<Option<plan::RunPlan>, String> {
    let run = revalidate(ctx, pt, t)
        .map_err(|why| format!("refused by the node agent's own validation: {why}"))?;
    if matches!(run.tool.options, ToolOptions::Image(_)) {
        // The operator's engine: an ephemeral container, not this agent.
        return Ok(None);
    }
    let remote = remote_dir(&ctx.output, pt, t)?;
    if !toe_artifacts::layout::is_allowed(&remote, &ctx.allowed_outputs) {
        // Which paths exist, or where they lead, is not the tenant's to learn: no path here.
        return Err(
            "refused by the node agent: spec.output.url is not among the output locations \
             this cluster's admin allows (the chart's artifacts.allowedUrls)"
                .into(),
        );
    }
    let generation = pt.metadata.generation.unwrap_or(0);
    let run_id = format!(
        "{}-{}-{}",
        run_name(&pt.uid().unwrap_or_default(), generation),
        t.pod,
        t.container
    );
    let target = TargetSpec::Container(t.container_id.clone());
    Ok(Some(plan::for_target(pt, run, target, remote, run_id)))
}

/// A dry run's answer: the fault's exact plan from the target's measured limits.
pub(super) async fn dry_run(plan: plan::RunPlan) -> (TargetPhase, String) {
    match tokio::task::spawn_blocking(move || run::describe_fault(&plan)).await {
        Ok(Ok(lines)) if lines.is_empty() => (
            TargetPhase::Completed,
            "dry run: validated; nothing started".into(),
        ),
        Ok(Ok(lines)) => (
            TargetPhase::Completed,
            format!("dry run: would {}", lines.join("; ")),
        ),
        Ok(Err(e)) => (TargetPhase::Failed, format!("dry run: {e}")),
        Err(e) => (TargetPhase::Failed, format!("dry run: {e}")),
    }
}

/// One target, start to end: validate, run, spool, upload, report.
pub(super) async fn run_target(
    ctx: Arc<Ctx>,
    pt: Arc<PowerTool>,
    t: SelectedTarget,
    stop: watch::Receiver<Option<&'static str>>,
) {
    let r = target_ref(&pt, &t);
    if let Err(why) = verify_target(&ctx, &pt, &t).await {
        tracing::warn!(powertool = %r.name, pod = %t.pod, %why, "refused a target");
        ctx.set(&r, TargetPhase::Failed, why, None).await;
        return;
    }
    let plan = match prepare(&ctx, &pt, &t) {
        Ok(Some(plan)) => plan,
        Ok(None) => return,
        Err(why) => {
            ctx.set(&r, TargetPhase::Failed, why, None).await;
            return;
        }
    };
    if plan.dry_run {
        let (phase, message) = dry_run(plan).await;
        ctx.set(&r, phase, message, None).await;
        return;
    }
    let job = Job {
        namespace: r.namespace.clone(),
        powertool: r.name.clone(),
        uid: r.uid.clone(),
        generation: r.generation,
        target: (t.namespace.clone(), t.pod.clone(), t.container.clone()),
        remote: plan.output.to_string(),
        ..Job::default()
    };
    let job = match ctx.spool.create(job) {
        Ok(j) => j,
        Err(e) => {
            let msg = format!("the node's spool directory: {e}");
            ctx.set(&r, TargetPhase::Failed, msg, None).await;
            return;
        }
    };
    ctx.claimed
        .lock()
        .expect("not poisoned")
        .insert(job.path().to_owned());
    let (started_tx, started_rx) = oneshot::channel();
    let control = Control {
        stop,
        started: Some(started_tx),
    };
    let running = execute(plan, job.sink(), control);
    tokio::pin!(running);
    let outcome = tokio::select! {
        outcome = &mut running => outcome,
        Ok(description) = started_rx => {
            let msg = format!("running on {description} ({})", ctx.node);
            ctx.set(&r, TargetPhase::Running, msg, None).await;
            running.await
        }
    };
    deliver(&ctx, &r, job, &outcome).await;
}

/// Records how the run ended in its spool job, uploads, and reports: the final phase once the
/// store has every artifact, `Uploading` (and the background uploader's retries) until then.
pub(super) async fn deliver(
    ctx: &Ctx,
    r: &TargetRef,
    mut job: JobDir,
    outcome: &Result<Outcome, RunError>,
) {
    let (phase, message, artifacts) = match outcome {
        Ok(o) => (
            phase_of(o),
            message_of(o),
            o.summary.artifacts.iter().map(|(_, u)| u.clone()).collect(),
        ),
        Err(RunError::Stopped(why)) => (
            TargetPhase::Interrupted,
            format!("stopped before it started: {why}"),
            Vec::new(),
        ),
        Err(e) => (TargetPhase::Failed, e.to_string(), Vec::new()),
    };
    job.job.phase = Some(phase);
    job.job.message = Some(message.clone());
    job.job.artifacts.clone_from(&artifacts);
    if let Err(e) = job.save() {
        tracing::warn!(error = %e, "recording a finished run in the spool");
    }
    let uploaded =
        match tokio::time::timeout(ctx.upload_timeout, job.upload(&ctx.allowed_outputs)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "no answer within {}",
                api::format_duration(ctx.upload_timeout)
            )),
        };
    match uploaded {
        Ok(_) => {
            ctx.set(r, phase, message, Some(artifacts)).await;
            if let Err(e) = job.remove() {
                tracing::warn!(error = %e, "removing an uploaded spool job");
            }
        }
        Err(why) => {
            let msg = format!(
                "{phase}: {message}; {} artifact(s) kept on node {} in {} until the object \
                 store takes them ({why}); retrying",
                job.waiting().len(),
                ctx.node,
                job.path().display()
            );
            ctx.set(r, TargetPhase::Uploading, msg, Some(artifacts))
                .await;
            ctx.claimed.lock().expect("not poisoned").remove(job.path());
        }
    }
}
