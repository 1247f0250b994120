//! The operator's side of image-based tools: it starts them itself, as ephemeral containers
//! ([`crate::ephemeral`]) in each target pod released to run, tells each where to write (the
//! agents' own layout), and follows them to their end.

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{Api, ResourceExt as _};
use toe_common::api::{
    ImageOptions, PowerTool, PowerToolPhase, PowerToolStatus, SelectedTarget, TargetPhase,
    ToolOptions, ValidatedRun, ValidatedTool,
};
use url::Url;

use crate::{
    admission,
    controller::{Context, Error, conclude, configs},
    ephemeral, selection,
};

/// The image tool of an admitted run, if its tool is one.
pub(crate) fn image_tool(pt: &PowerTool, ctx: &Context) -> Option<(ImageOptions, ValidatedTool)> {
    image_of(admission::admit(pt, &configs(ctx)).run?)
}

pub(crate) fn image_of(run: ValidatedRun) -> Option<(ImageOptions, ValidatedTool)> {
    match &run.tool.options {
        ToolOptions::Image(o) => Some((o.clone(), run.tool)),
        _ => None,
    }
}

/// Where a target's tool writes: the same location the node agents would use.
pub fn output_url(pt: &PowerTool, t: &SelectedTarget, artifacts: &Url) -> Result<Url, String> {
    toe_artifacts::layout::of_target(pt, t, artifacts).map_err(|e| format!("spec.output.url: {e}"))
}

/// Starts the image tool in every target pod as an ephemeral container; targets that cannot
/// get one are marked Failed with the API server's reason.
pub(crate) async fn launch(
    pt: &PowerTool,
    ctx: &Context,
    opts: &ImageOptions,
    tool: &ValidatedTool,
) -> Result<PowerToolStatus, Error> {
    let mut status = pt.status.clone().unwrap_or_default();
    start_pending(pt, &mut status, ctx, opts, tool).await;
    status.phase = PowerToolPhase::Running;
    status.start_time = Some(Time(Timestamp::now()));
    Ok(status)
}

/// Adds the ephemeral container to every target released to run (`Pending`).
async fn start_pending(
    pt: &PowerTool,
    status: &mut PowerToolStatus,
    ctx: &Context,
    opts: &ImageOptions,
    tool: &ValidatedTool,
) {
    let name = ephemeral::container_name(&pt.name_any(), &pt.uid().unwrap_or_default());
    // One answer for the whole PowerTool: its output URL is the same for every target.
    let allowed = crate::controller::output_allowed(pt, ctx);
    for t in status
        .targets
        .iter_mut()
        .filter(|t| t.phase == Some(TargetPhase::Pending))
    {
        let url = match allowed
            .clone()
            .and_then(|()| output_url(pt, t, &ctx.artifacts))
        {
            Ok(url) => url.to_string(),
            Err(e) => {
                t.phase = Some(TargetPhase::Failed);
                t.message = Some(e);
                continue;
            }
        };
        let c = ephemeral::container(&name, opts, &t.container, &url, tool.duration.as_secs());
        if let Err(e) = ephemeral::add(&ctx.client, &t.namespace, &t.pod, &c).await {
            t.phase = Some(TargetPhase::Failed);
            t.message = Some(format!(
                "adding the ephemeral container failed: {e} (the chart grants ephemeral \
                 containers only with imageTools.enabled=true; servers before 1.23 need the \
                 EphemeralContainers feature gate)"
            ));
            continue;
        }
        t.phase = Some(TargetPhase::Running);
        t.message = Some(format!("ephemeral container {name} in {}", t.pod));
        t.artifacts = vec![url];
    }
}

/// Follows the ephemeral containers: each target ends Completed (exit 0) or Failed (another
/// exit, the pod gone, or still running long after its duration: ephemeral containers cannot be
/// stopped through the API, so that is reported rather than waited on forever).
pub(crate) async fn follow(
    pt: &PowerTool,
    ctx: &Context,
    opts: &ImageOptions,
    tool: &ValidatedTool,
) -> Result<PowerToolStatus, Error> {
    let mut status = pt.status.clone().unwrap_or_default();
    let name = ephemeral::container_name(&pt.name_any(), &pt.uid().unwrap_or_default());
    let started = status
        .start_time
        .as_ref()
        .map_or_else(Timestamp::now, |t| t.0);
    let overdue = Timestamp::now().duration_since(started).as_secs()
        > i64::try_from(tool.duration.as_secs()).unwrap_or(i64::MAX) + 120;
    for t in status
        .targets
        .iter_mut()
        .filter(|t| t.phase == Some(TargetPhase::Running))
    {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &t.namespace);
        let (phase, message) = match pods.get_opt(&t.pod).await? {
            None => (TargetPhase::Failed, "the pod was deleted".to_owned()),
            Some(pod) => match ephemeral::outcome(&pod, &name) {
                Some((0, _)) => (TargetPhase::Completed, "exited 0".to_owned()),
                Some((code, reason)) => (TargetPhase::Failed, format!("exited {code} ({reason})")),
                None if overdue => (
                    TargetPhase::Failed,
                    "still running 2 minutes after its duration; ephemeral containers cannot be \
                     stopped through the API"
                        .to_owned(),
                ),
                None => continue,
            },
        };
        t.phase = Some(phase);
        t.message = Some(message);
    }
    let max = pt.spec.blast_radius.as_ref().and_then(|b| b.max_concurrent);
    if selection::release_waiting(&mut status.targets, max) {
        start_pending(pt, &mut status, ctx, opts, tool).await;
    }
    conclude(&mut status, pt.metadata.generation.unwrap_or(0));
    Ok(status)
}
