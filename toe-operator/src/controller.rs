//! The PowerTool controller: admits each PowerTool against the PowerToolConfigs, selects its
//! target containers, and writes both into its status (server-side apply, field manager
//! `toe-operator`). A finalizer keeps a PowerTool until its run is aborted; a config change
//! re-reconciles every PowerTool.

use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{ConfigMap, Namespace, Pod},
    apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time},
    jiff::{self, Timestamp},
};
use kube::{
    Api, Client, Resource as _, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt as _,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        finalizer::{Event as Finalizer, finalizer},
        reflector::{self, Store},
        watcher,
    },
};
use toe_common::api::{
    CAPABILITIES_KEY, CAPABILITIES_NODE_KEY, Capabilities, PowerTool, PowerToolConfig,
    PowerToolPhase, PowerToolStatus, SelectedTarget, TargetPhase, ToolOptions, ValidatedRun,
    capabilities_config_map, target_finished,
};
use url::Url;

use crate::{
    admission,
    image_tools::{follow, image_of, image_tool, launch},
    metrics::{Decision, Metrics},
    selection,
};

pub const FIELD_MANAGER: &str = "toe-operator";
pub const FINALIZER: &str = "toe.run/abort-run";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

pub struct Context {
    pub client: Client,
    /// The store the node agents write to: image tools without `spec.output.url` write there
    /// too, in the same layout.
    pub artifacts: Url,
    /// Every store a PowerTool may write to: `artifacts` and what an admin added.
    pub allowed_outputs: Vec<Url>,
    /// Namespaces faults reach only where a config names them ([`protected_namespaces`]).
    pub protected: Vec<String>,
    /// TOE's own namespace, where the agents publish their nodes' capabilities.
    pub release_namespace: String,
    pub configs: Store<PowerToolConfig>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
}

/// `matchLabels` and `matchExpressions` as a label selector string for list calls.
pub fn selector_string(s: &LabelSelector) -> Result<String, String> {
    let mut parts: Vec<String> = s
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in s.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            other => return Err(format!("unknown selector operator {other}")),
        });
    }
    Ok(parts.join(","))
}

pub(crate) fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: i64,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: Some(generation),
        last_transition_time: Time(Timestamp::now()),
    }
}

/// What the controller is started with.
#[derive(Clone, Debug)]
pub struct Options {
    /// The store the node agents write to (`--artifacts`).
    pub artifacts: Url,
    /// The namespace TOE is installed in, protected from faults like `kube-system`.
    pub release_namespace: String,
    /// Stores besides `artifacts` that PowerTools may name in `spec.output.url` (the chart's
    /// `artifacts.allowedUrls`, the same list the agents are given).
    pub allowed_outputs: Vec<Url>,
}

impl Options {
    /// The chart's defaults: the agents' default store, release namespace `toe-system`.
    #[must_use]
    pub fn defaults() -> Self {
        Self {
            artifacts: Url::parse(toe_artifacts::layout::DEFAULT_NODE_STORE).expect("a URL"),
            release_namespace: "toe-system".into(),
            allowed_outputs: Vec::new(),
        }
    }
}

/// Namespaces the PowerTool targets: its own, or those its namespace selector matches.
pub async fn target_namespaces(client: &Client, pt: &PowerTool) -> Result<Vec<String>, String> {
    let own = pt.namespace().unwrap_or_else(|| "default".into());
    let Some(sel) = pt
        .spec
        .targets
        .as_ref()
        .and_then(|t| t.namespace_selector.as_ref())
    else {
        return Ok(vec![own]);
    };
    let lp = ListParams::default().labels(&selector_string(sel)?);
    let list = Api::<Namespace>::all(client.clone())
        .list(&lp)
        .await
        .map_err(|e| format!("listing namespaces: {e}"))?;
    Ok(list.items.iter().map(ResourceExt::name_any).collect())
}

pub use toe_common::api::{namespaces_allowed, protected_namespaces};

/// Why `pt` would exceed a config's `maxConcurrentPerNamespace`: the other PowerTools of its
/// namespace that use the same tool and are admitted or running count against it.
async fn namespace_cap(
    client: &Client,
    pt: &PowerTool,
    configs: &[PowerToolConfig],
) -> Result<Option<String>, String> {
    let ns = pt.namespace().unwrap_or_else(|| "default".into());
    let tools: Vec<&str> = std::iter::once(&pt.spec.tool)
        .chain(&pt.spec.alongside)
        .map(|t| t.name.as_str())
        .collect();
    let caps: Vec<(&str, u32, &str)> = configs
        .iter()
        .filter(|c| tools.contains(&c.spec.tool.as_str()))
        .filter_map(|c| {
            c.spec.max_concurrent_per_namespace.map(|n| {
                (
                    c.spec.tool.as_str(),
                    n,
                    c.metadata.name.as_deref().unwrap_or(""),
                )
            })
        })
        .collect();
    if caps.is_empty() {
        return Ok(None);
    }
    let others = Api::<PowerTool>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing PowerTools in {ns}: {e}"))?
        .items;
    Ok(caps.into_iter().find_map(|(tool, cap, config)| {
        let busy: Vec<String> = others
            .iter()
            .filter(|o| o.uid() != pt.uid())
            .filter(|o| {
                std::iter::once(&o.spec.tool)
                    .chain(&o.spec.alongside)
                    .any(|t| t.name == tool)
            })
            .filter(|o| {
                o.status.as_ref().is_some_and(|s| {
                    matches!(s.phase, PowerToolPhase::Admitted | PowerToolPhase::Running)
                })
            })
            .map(ResourceExt::name_any)
            .collect();
        (u32::try_from(busy.len()).unwrap_or(u32::MAX) >= cap).then(|| {
            format!(
                "PowerToolConfig {config} allows {cap} {tool} run(s) at once in namespace {ns}, \
                 and {} are admitted or running ({}); change and re-apply it once one has ended",
                busy.len(),
                busy.join(", ")
            )
        })
    }))
}

/// Admission, then target selection: the status to write, and the run when admitted.
async fn decide(pt: &PowerTool, ctx: &Context) -> (PowerToolStatus, Option<ValidatedRun>) {
    let generation = pt.metadata.generation.unwrap_or(0);
    let configs = configs(ctx);
    let verdict = admission::admit(pt, &configs);
    let rejected = |reason: &str, message: &str| {
        let status = PowerToolStatus {
            phase: PowerToolPhase::Rejected,
            conditions: vec![condition("Admitted", false, reason, message, generation)],
            observed_generation: Some(generation),
            ..PowerToolStatus::default()
        };
        (status, None)
    };
    if !verdict.admitted() {
        return rejected(verdict.reason, &verdict.message);
    }
    let namespaces = match target_namespaces(&ctx.client, pt).await {
        Ok(n) => n,
        Err(e) => return rejected("InvalidTargets", &e),
    };
    if let Err(e) = namespaces_allowed(pt, &configs, &namespaces, &ctx.protected) {
        return rejected("NamespaceNotAllowed", &e);
    }
    if let Err(e) = output_allowed(pt, ctx) {
        return rejected("OutputNotAllowed", &e);
    }
    match namespace_cap(&ctx.client, pt, &configs).await {
        Ok(None) => {}
        Ok(Some(why)) => return rejected("ConcurrencyCapped", &why),
        Err(e) => return rejected("ConcurrencyCapped", &e),
    }
    let label_selector = pt
        .spec
        .targets
        .as_ref()
        .and_then(|t| t.label_selector.as_ref())
        .map(selector_string)
        .transpose();
    let label_selector = match label_selector {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => return rejected("InvalidTargets", &e),
    };
    let mut pods: Vec<Pod> = Vec::new();
    for ns in &namespaces {
        let lp = ListParams::default().labels(&label_selector);
        match Api::<Pod>::namespaced(ctx.client.clone(), ns)
            .list(&lp)
            .await
        {
            Ok(list) => pods.extend(list.items),
            Err(e) => return rejected("InvalidTargets", &format!("listing pods in {ns}: {e}")),
        }
    }
    let containers = pt
        .spec
        .targets
        .as_ref()
        .map(|t| t.containers.clone())
        .unwrap_or_default();
    let (matched, skipped) = selection::containers_of(&pods, &containers);
    let mut targets: Vec<SelectedTarget> = selection::blast_radius(
        matched,
        pt.spec.blast_radius.as_ref(),
        &pt.uid().unwrap_or_default(),
    );
    selection::release_waiting(
        &mut targets,
        pt.spec.blast_radius.as_ref().and_then(|b| b.max_concurrent),
    );
    if let Some(run) = &verdict.run
        && !matches!(run.tool.options, ToolOptions::Image(_))
    {
        refuse_incapable_nodes(ctx, run, &mut targets).await;
    }
    let mut message = format!("{}; {} target container(s)", verdict.message, targets.len());
    if !skipped.is_empty() {
        let notes: Vec<String> = skipped
            .iter()
            .map(|s| format!("{}: {}", s.pod, s.why))
            .collect();
        message = format!("{message}; skipped {}", notes.join("; "));
    }
    let mut status = PowerToolStatus {
        phase: PowerToolPhase::Admitted,
        conditions: vec![condition(
            "Admitted",
            true,
            verdict.reason,
            &message,
            generation,
        )],
        observed_generation: Some(generation),
        target_count: Some(u32::try_from(targets.len()).unwrap_or(u32::MAX)),
        targets,
        ..PowerToolStatus::default()
    };
    // Every target refused by its node's capabilities: the run is over before it starts.
    conclude(&mut status, generation);
    (status, verdict.run)
}

/// Refuses a `spec.output.url` outside the stores an admin allows, before any agent or image tool
/// is told to write there (the agents check again: they do not trust what status says).
pub(crate) fn output_allowed(pt: &PowerTool, ctx: &Context) -> Result<(), String> {
    let url = toe_artifacts::layout::of_powertool(pt, &ctx.artifacts).map_err(|e| e.to_string())?;
    if toe_artifacts::layout::is_allowed(&url, &ctx.allowed_outputs) {
        Ok(())
    } else {
        Err(
            "spec.output.url is not among the output locations this cluster's admin allows \
             (the chart's artifacts.allowedUrls); leave it out to use the cluster's store"
                .into(),
        )
    }
}

/// Why `node` cannot run the run's tools, from the capabilities its agent published (its
/// ConfigMap in TOE's namespace); None when it can, or when no agent has published any yet.
fn incapable(node: &str, published: &ConfigMap, run: &ValidatedRun) -> Option<String> {
    let data = published.data.as_ref()?;
    // A shortened name could be another node's: the ConfigMap says which node it describes.
    if data.get(CAPABILITIES_NODE_KEY).map(String::as_str) != Some(node) {
        return None;
    }
    let caps: Capabilities = serde_json::from_str(data.get(CAPABILITIES_KEY)?).ok()?;
    std::iter::once(&run.tool)
        .chain(&run.alongside)
        .find_map(|t| {
            caps.missing(&t.name).map(|why| {
                format!(
                    "node {node} cannot run {}: {why} (its agent's probe, ConfigMap {})",
                    t.name,
                    capabilities_config_map(node)
                )
            })
        })
}

/// Marks targets on nodes whose agent reported they cannot run the tools Failed, with why.
async fn refuse_incapable_nodes(ctx: &Context, run: &ValidatedRun, targets: &mut [SelectedTarget]) {
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.release_namespace);
    let mut verdicts = std::collections::BTreeMap::<String, Option<String>>::new();
    for t in targets.iter_mut() {
        if !verdicts.contains_key(&t.node) {
            // A node whose agent published nothing readable has not told us anything: not
            // refused (its agent still checks before it runs anything).
            let why = match maps.get_opt(&capabilities_config_map(&t.node)).await {
                Ok(Some(published)) => incapable(&t.node, &published, run),
                _ => None,
            };
            verdicts.insert(t.node.clone(), why);
        }
        if let Some(Some(why)) = verdicts.get(&t.node) {
            t.phase = Some(TargetPhase::Failed);
            t.message = Some(why.clone());
        }
    }
}

/// The PowerToolConfigs as the reflector has them now.
pub(crate) fn configs(ctx: &Context) -> Vec<PowerToolConfig> {
    ctx.configs.state().iter().map(|c| (**c).clone()).collect()
}

/// Ends the run once every target has ended: Failed if any failed, else Interrupted if any was
/// interrupted, else Completed. Returns whether it ended it now.
pub(crate) fn conclude(status: &mut PowerToolStatus, generation: i64) -> bool {
    if status.finish_time.is_some()
        || status.targets.is_empty()
        || !status.targets.iter().all(|t| target_finished(t.phase))
    {
        return false;
    }
    let count = |phase: TargetPhase| {
        status
            .targets
            .iter()
            .filter(|t| t.phase == Some(phase))
            .count()
    };
    let (failed, interrupted, all) = (
        count(TargetPhase::Failed),
        count(TargetPhase::Interrupted),
        status.targets.len(),
    );
    let (phase, type_, reason, message) = if failed > 0 {
        (
            PowerToolPhase::Failed,
            "Failed",
            "TargetsFailed",
            format!("{failed} of {all} target(s) failed"),
        )
    } else if interrupted > 0 {
        (
            PowerToolPhase::Interrupted,
            "Interrupted",
            "TargetsInterrupted",
            format!("{interrupted} of {all} target(s) were interrupted; partial results kept"),
        )
    } else {
        (
            PowerToolPhase::Completed,
            "Completed",
            "AllTargetsCompleted",
            format!("all {all} target(s) completed"),
        )
    };
    status.phase = phase;
    status.finish_time = Some(Time(Timestamp::now()));
    status.conditions.retain(|c| c.type_ == "Admitted");
    status
        .conditions
        .push(condition(type_, true, reason, &message, generation));
    true
}

/// Writes `status` unless it says what the current one says (conditions compared without their
/// transition times, which would otherwise change on every reconcile).
/// The object's resourceVersion is a precondition: the node agents write targets' progress into
/// the same status, and a stale write must fail (and be redone) rather than undo theirs.
/// Returns the object as written, or None when nothing needed writing.
async fn write_status(
    api: &Api<PowerTool>,
    pt: &PowerTool,
    mut status: PowerToolStatus,
) -> Result<Option<PowerTool>, Error> {
    if let Some(current) = &pt.status {
        let same = |a: &[Condition], b: &[Condition]| {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| {
                    (&x.type_, &x.status, &x.reason, &x.message)
                        == (&y.type_, &y.status, &y.reason, &y.message)
                })
        };
        if current.phase == status.phase
            && current.targets == status.targets
            && current.observed_generation == status.observed_generation
            && same(&current.conditions, &status.conditions)
        {
            return Ok(None);
        }
        // A condition that did not change keeps the time it last changed.
        for c in &mut status.conditions {
            if let Some(old) = current
                .conditions
                .iter()
                .find(|o| o.type_ == c.type_ && o.status == c.status)
            {
                c.last_transition_time = old.last_transition_time.clone();
            }
        }
    }
    let patch = serde_json::json!({
        "apiVersion": "toe.run/v1alpha1",
        "kind": "PowerTool",
        "metadata": {"resourceVersion": pt.resource_version()},
        "status": status,
    });
    let written = api
        .patch_status(
            &pt.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(Some(written))
}

/// An Event on the PowerTool for a new decision, so `kubectl describe` tells the story.
async fn record(ctx: &Context, pt: &PowerTool, status: &PowerToolStatus) {
    let Some(c) = status.conditions.first() else {
        return;
    };
    let admitted = status.phase == PowerToolPhase::Admitted;
    let event = Event {
        type_: if admitted {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: c.reason.clone(),
        note: Some(c.message.chars().take(1000).collect()),
        action: if admitted { "Admit" } else { "Reject" }.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &pt.object_ref(&())).await {
        tracing::warn!(error = %e, "publishing an event");
    }
}

/// What to do with a finished PowerTool whose `ttlSecondsAfterFinished` is set: delete it now,
/// or look again when it expires. `None`: not finished, or no TTL.
fn ttl_action(pt: &PowerTool, now: Timestamp) -> Option<Result<(), Duration>> {
    let ttl = pt.spec.ttl_seconds_after_finished?;
    let status = pt.status.as_ref()?;
    if !matches!(
        status.phase,
        PowerToolPhase::Completed | PowerToolPhase::Failed | PowerToolPhase::Interrupted
    ) {
        return None;
    }
    let finished = status.finish_time.as_ref()?.0;
    let expires = finished
        .checked_add(jiff::SignedDuration::from_secs(
            i64::try_from(ttl).unwrap_or(i64::MAX),
        ))
        .ok()?;
    if now >= expires {
        Some(Ok(()))
    } else {
        let left = expires.duration_since(now);
        Some(Err(
            Duration::try_from(left).unwrap_or(Duration::from_secs(1))
        ))
    }
}

async fn apply(pt: Arc<PowerTool>, ctx: &Context) -> Result<Action, Error> {
    let api: Api<PowerTool> =
        Api::namespaced(ctx.client.clone(), &pt.namespace().unwrap_or_default());
    match ttl_action(&pt, Timestamp::now()) {
        Some(Ok(())) => {
            api.delete(&pt.name_any(), &kube::api::DeleteParams::background())
                .await?;
            return Ok(Action::await_change());
        }
        Some(Err(left)) => return Ok(Action::requeue(left)),
        None => {}
    }
    // Once the agents run it, the run's phase is theirs; admission is decided again only for a
    // new generation of the spec.
    let current_generation = pt.status.as_ref().and_then(|s| s.observed_generation);
    let running = pt.status.as_ref().is_some_and(|s| {
        !matches!(
            s.phase,
            PowerToolPhase::Pending | PowerToolPhase::Admitted | PowerToolPhase::Rejected
        )
    });
    if running && current_generation == pt.metadata.generation {
        // Image tools are the operator's own engine: it follows them to the end.
        if pt
            .status
            .as_ref()
            .is_some_and(|s| s.phase == PowerToolPhase::Running)
            && let Some((opts, tool)) = image_tool(&pt, ctx)
        {
            let status = follow(&pt, ctx, &opts, &tool).await?;
            let done = status.finish_time.is_some();
            write_status(&api, &pt, status).await?;
            return Ok(if done {
                Action::requeue(Duration::from_mins(5))
            } else {
                Action::requeue(Duration::from_secs(5))
            });
        }
        // The agents move targets through Running to their end; as pods finish, waiting ones
        // are released within maxConcurrent, and the run ends with its last target.
        if let Some(mut status) = pt.status.clone() {
            let max = pt.spec.blast_radius.as_ref().and_then(|b| b.max_concurrent);
            let released = selection::release_waiting(&mut status.targets, max);
            let ended = conclude(&mut status, pt.metadata.generation.unwrap_or(0));
            if released || ended {
                write_status(&api, &pt, status).await?;
            }
        }
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    let (status, run) = decide(&pt, ctx).await;
    let written = write_status(&api, &pt, status.clone()).await?;
    if written.is_some() {
        let reason = status
            .conditions
            .first()
            .map_or_else(String::new, |c| c.reason.clone());
        ctx.metrics
            .decisions
            .get_or_create(&Decision { reason })
            .inc();
        record(ctx, &pt, &status).await;
    }
    if status.phase == PowerToolPhase::Admitted
        && pt.spec.dry_run != Some(true)
        && let Some((opts, tool)) = run.and_then(image_of)
    {
        let mut launched = written.unwrap_or_else(|| (*pt).clone());
        launched.status = Some(status);
        let running = launch(&launched, ctx, &opts, &tool).await?;
        write_status(&api, &launched, running).await?;
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    Ok(Action::requeue(Duration::from_mins(5)))
}

async fn reconcile(pt: Arc<PowerTool>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let api: Api<PowerTool> =
        Api::namespaced(ctx.client.clone(), &pt.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, pt, |event| async {
        match event {
            Finalizer::Apply(pt) => apply(pt, &ctx).await,
            // The node agents see the deletion timestamp and abort their part of the run; the
            // operator has nothing of its own to undo.
            Finalizer::Cleanup(_) => Ok(Action::await_change()),
        }
    })
    .await
    .map_err(|e| Error::Finalizer(e.to_string()))
}

#[expect(
    clippy::needless_pass_by_value,
    reason = "the signature kube's Controller::run calls"
)]
fn error_policy(_: Arc<PowerTool>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.inc();
    tracing::warn!(%error, "reconcile failed; retrying in 15 s");
    Action::requeue(Duration::from_secs(15))
}

/// Runs the controller until `shutdown` resolves. Nothing is reconciled before the configs are
/// known: an empty cache would reject every PowerTool as "not enabled".
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    opts: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let signal = crate::shutdown::Signal::new(shutdown);
    let configs_api: Api<PowerToolConfig> = Api::all(client.clone());
    let (store, writer) = reflector::store();
    let (changed, config_events) = futures::channel::mpsc::channel::<()>(16);
    let configs = reflector::reflector(writer, watcher(configs_api, watcher::Config::default()))
        .applied_objects();
    tokio::spawn(async move {
        let mut changed = changed;
        let mut configs = std::pin::pin!(configs);
        while let Some(event) = configs.next().await {
            match event {
                // A full channel already holds a pending "reconcile everything".
                Ok(_) => {
                    let _ = changed.try_send(());
                }
                Err(e) => tracing::warn!(error = %e, "watching PowerToolConfigs"),
            }
        }
    });
    if !matches!(
        signal.unless_fired(store.wait_until_ready()).await,
        Some(Ok(()))
    ) {
        return;
    }
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        allowed_outputs: std::iter::once(toe_artifacts::store::as_dir(&opts.artifacts))
            .chain(opts.allowed_outputs)
            .collect(),
        artifacts: opts.artifacts,
        protected: protected_namespaces(&opts.release_namespace),
        release_namespace: opts.release_namespace,
        configs: store,
        metrics,
        recorder,
    });
    let controller = Controller::new(Api::<PowerTool>::all(client), watcher::Config::default())
        .reconcile_all_on(config_events)
        .graceful_shutdown_on(signal.fired());
    let powertools = controller.store();
    let results = controller.run(reconcile, error_policy, ctx);
    signal
        .bound(results, move || crate::shutdown::listed(&powertools))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile");
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tool: &str, extra: &serde_json::Value) -> PowerToolConfig {
        let mut spec = serde_json::json!({ "tool": tool });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "toe.run/v1alpha1", "kind": "PowerToolConfig",
            "metadata": {"name": tool}, "spec": spec,
        }))
        .unwrap()
    }

    fn tenant_tool(tool: &str, cross: bool) -> PowerTool {
        let mut spec = serde_json::json!({"tool": {"name": tool}});
        if cross {
            spec["targets"] =
                serde_json::json!({"namespaceSelector": {"matchLabels": {"team": "x"}}});
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "toe.run/v1alpha1", "kind": "PowerTool",
            "metadata": {"name": "t", "namespace": "shop"}, "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn other_namespaces_only_from_namespaces_an_admin_lists() {
        let protected = protected_namespaces("toe-system");
        let open = [config("cpu-profile", &serde_json::json!({}))];
        let err = namespaces_allowed(
            &tenant_tool("cpu-profile", true),
            &open,
            &["payments".into()],
            &protected,
        )
        .unwrap_err();
        assert!(err.contains("only from no namespace"), "{err}");
        // Its own namespace needs no permission.
        assert!(
            namespaces_allowed(
                &tenant_tool("cpu-profile", false),
                &open,
                &["shop".into()],
                &protected
            )
            .is_ok()
        );
        let listed = [config(
            "cpu-profile",
            &serde_json::json!({"crossNamespaceFrom": ["shop"]}),
        )];
        assert!(
            namespaces_allowed(
                &tenant_tool("cpu-profile", true),
                &listed,
                &["payments".into()],
                &protected
            )
            .is_ok()
        );
    }

    #[test]
    fn faults_reach_the_control_plane_and_toe_only_where_named() {
        let protected = protected_namespaces("toe-system");
        let open = [config(
            "terminate",
            &serde_json::json!({"crossNamespaceFrom": ["shop"]}),
        )];
        for ns in ["kube-system", "toe-system"] {
            let err = namespaces_allowed(
                &tenant_tool("terminate", true),
                &open,
                &[ns.into()],
                &protected,
            )
            .unwrap_err();
            assert!(
                err.contains(&format!("namespace {ns} is protected")),
                "{err}"
            );
        }
        // A collector may look; a fault named by the admin may act.
        let trace = [config(
            "signal-trace",
            &serde_json::json!({"crossNamespaceFrom": ["shop"]}),
        )];
        assert!(
            namespaces_allowed(
                &tenant_tool("signal-trace", true),
                &trace,
                &["kube-system".into()],
                &protected
            )
            .is_ok()
        );
        let named = [config(
            "terminate",
            &serde_json::json!({"crossNamespaceFrom": ["shop"],
                                "allowedNamespaces": ["shop", "kube-system"]}),
        )];
        assert!(
            namespaces_allowed(
                &tenant_tool("terminate", true),
                &named,
                &["kube-system".into()],
                &protected
            )
            .is_ok()
        );
    }

    fn finished(phase: PowerToolPhase, ttl: Option<u64>, at: &str) -> PowerTool {
        let mut pt = PowerTool::new("t", toe_common::api::PowerToolSpec::default());
        pt.spec.ttl_seconds_after_finished = ttl;
        pt.status = Some(PowerToolStatus {
            phase,
            finish_time: Some(Time(at.parse().unwrap())),
            ..PowerToolStatus::default()
        });
        pt
    }

    #[test]
    fn a_node_whose_agent_cannot_run_a_tool_says_why() {
        let pt = powertool(&["--frequency=99"]);
        let configs: Vec<PowerToolConfig> = vec![
            serde_json::from_value(serde_json::json!({
                "apiVersion": "toe.run/v1alpha1", "kind": "PowerToolConfig",
                "metadata": {"name": "c"}, "spec": {"tool": "cpu-profile",
                    "arguments": [{"name": "frequency", "type": "integer"}]},
            }))
            .unwrap(),
        ];
        let run = admission::admit(&pt, &configs).run.unwrap();
        let published = |node: &str, caps: Option<&str>| -> ConfigMap {
            let mut data = serde_json::json!({CAPABILITIES_NODE_KEY: node});
            if let Some(c) = caps {
                data[CAPABILITIES_KEY] = c.into();
            }
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": capabilities_config_map(node)}, "data": data}))
            .unwrap()
        };
        assert_eq!(
            incapable("n1", &published("n1", None), &run),
            None,
            "no agent report yet"
        );
        let ok = r#"{"tools": {"cpu-profile": "ok"}}"#;
        assert_eq!(incapable("n1", &published("n1", Some(ok)), &run), None);
        let eperm = r#"{"tools": {"cpu-profile": "perf_event: Operation not permitted"}}"#;
        // Another node's report under this node's name says nothing about this node.
        assert_eq!(incapable("n1", &published("n2", Some(eperm)), &run), None);
        let why = incapable("n1", &published("n1", Some(eperm)), &run).unwrap();
        assert!(
            why.contains("node n1 cannot run cpu-profile: perf_event: Operation not permitted"),
            "{why}"
        );
    }

    #[test]
    fn a_run_ends_with_its_last_target_failed_before_interrupted_before_completed() {
        use TargetPhase::{Completed, Failed, Interrupted, Running, Uploading, Waiting};
        let with = |phases: &[TargetPhase]| PowerToolStatus {
            phase: PowerToolPhase::Running,
            targets: phases
                .iter()
                .map(|p| SelectedTarget {
                    phase: Some(*p),
                    ..SelectedTarget::default()
                })
                .collect(),
            ..PowerToolStatus::default()
        };
        for (phases, want) in [
            (&[Completed, Completed][..], PowerToolPhase::Completed),
            (&[Completed, Interrupted], PowerToolPhase::Interrupted),
            (&[Failed, Interrupted], PowerToolPhase::Failed),
        ] {
            let mut s = with(phases);
            assert!(conclude(&mut s, 1), "{phases:?}");
            assert_eq!(s.phase, want, "{phases:?}");
            assert!(s.finish_time.is_some());
            assert_eq!(s.conditions.len(), 1);
            assert!(!conclude(&mut s, 1), "concluded once");
        }
        for phases in [&[Completed, Running][..], &[Uploading], &[Waiting], &[]] {
            let mut s = with(phases);
            assert!(!conclude(&mut s, 1), "{phases:?} is not over");
            assert_eq!(s.phase, PowerToolPhase::Running);
        }
    }

    #[test]
    fn finished_powertools_go_when_their_ttl_expires() {
        let now: Timestamp = "2026-11-26T12:00:00Z".parse().unwrap();
        let done = finished(PowerToolPhase::Completed, Some(60), "2026-11-26T11:59:30Z");
        assert_eq!(ttl_action(&done, now), Some(Err(Duration::from_secs(30))));
        let old = finished(PowerToolPhase::Failed, Some(60), "2026-11-26T11:58:00Z");
        assert_eq!(ttl_action(&old, now), Some(Ok(())));
        let running = finished(PowerToolPhase::Running, Some(60), "2026-11-26T11:00:00Z");
        assert_eq!(ttl_action(&running, now), None);
        let kept = finished(PowerToolPhase::Completed, None, "2026-11-26T11:00:00Z");
        assert_eq!(ttl_action(&kept, now), None);
    }

    /// Plays the API server: answers each request from `answer` and records (method, path and
    /// query, body).
    async fn serve_mock(
        mut handle: tower_test::mock::Handle<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >,
        answer: fn(&http::Method, &str) -> String,
    ) -> Vec<(http::Method, String, serde_json::Value)> {
        let mut seen = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().clone();
            let uri = req.uri().to_string();
            let body = req.into_body().collect_bytes().await.unwrap();
            let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
            let reply = answer(&method, &uri);
            seen.push((method, uri, json));
            send.send_response(
                http::Response::builder()
                    .status(200)
                    .body(kube::client::Body::from(reply.into_bytes()))
                    .unwrap(),
            );
        }
        seen
    }

    fn context(client: Client) -> Context {
        let (store, mut writer) = reflector::store::<PowerToolConfig>();
        let config: PowerToolConfig = serde_json::from_value(serde_json::json!({
            "apiVersion": "toe.run/v1alpha1", "kind": "PowerToolConfig",
            "metadata": {"name": "cpu-profile"},
            "spec": {"tool": "cpu-profile", "arguments": [{"name": "frequency", "type": "integer", "max": 199}]},
        }))
        .unwrap();
        writer.apply_watcher_event(&watcher::Event::Apply(config));
        Context {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: FIELD_MANAGER.into(),
                    instance: None,
                },
            ),
            client,
            artifacts: Url::parse(toe_artifacts::layout::DEFAULT_NODE_STORE).unwrap(),
            allowed_outputs: vec![Url::parse(toe_artifacts::layout::DEFAULT_NODE_STORE).unwrap()],
            protected: protected_namespaces("toe-system"),
            release_namespace: "toe-system".into(),
            configs: store,
            metrics: Arc::default(),
        }
    }

    fn powertool(args: &[&str]) -> Arc<PowerTool> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "toe.run/v1alpha1", "kind": "PowerTool",
                "metadata": {"name": "t", "namespace": "shop", "uid": "u-1", "generation": 3},
                "spec": {"tool": {"name": "cpu-profile", "commandLineArguments": args},
                         "targets": {"labelSelector": {"matchLabels": {"app": "web"}}}},
            }))
            .unwrap(),
        )
    }

    fn answer(method: &http::Method, uri: &str) -> String {
        match (method.as_str(), uri.split('?').next().unwrap_or_default()) {
            ("GET", "/api/v1/namespaces/shop/pods") => serde_json::json!({
                "apiVersion": "v1", "kind": "PodList", "metadata": {},
                "items": [{"metadata": {"name": "web-1", "namespace": "shop"},
                           "spec": {"nodeName": "n1", "containers": [{"name": "app"}]},
                           "status": {"containerStatuses": [{"name": "app", "containerID": "containerd://abc",
                               "ready": true, "restartCount": 0, "image": "x", "imageID": "",
                               "state": {"running": {}}}]}}],
            })
            .to_string(),
            ("GET", "/api/v1/namespaces/toe-system/configmaps/toe-node-n1") => serde_json::json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "toe-node-n1", "namespace": "toe-system"},
                "data": {CAPABILITIES_NODE_KEY: "n1",
                         CAPABILITIES_KEY: r#"{"tools": {"cpu-profile": "ok"}}"#},
            })
            .to_string(),
            ("PATCH", path) if path.ends_with("/status") => serde_json::json!({
                "apiVersion": "toe.run/v1alpha1", "kind": "PowerTool",
                "metadata": {"name": "t", "namespace": "shop"}, "spec": {"tool": {"name": "cpu-profile"}},
            })
            .to_string(),
            _ => serde_json::json!({
                "apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"},
                "eventTime": null,
            })
            .to_string(),
        }
    }

    /// The reconcile path without a server: an admitted PowerTool lists pods with its selector,
    /// reads its targets' nodes' capabilities and writes its targets by server-side apply; a rejected one lists nothing and writes the
    /// rule it broke; each decision is told as an Event.
    #[tokio::test]
    async fn reconcile_paths_against_a_mock_api() {
        let (service, handle) = tower_test::mock::pair();
        let client = Client::new(service, "shop");
        let server = tokio::spawn(serve_mock(handle, answer));
        let ctx = context(client);
        apply(powertool(&["--frequency=99"]), &ctx).await.unwrap();
        apply(powertool(&["--frequency=999"]), &ctx).await.unwrap();
        drop(ctx);
        let seen = server.await.unwrap();
        let paths: Vec<String> = seen
            .iter()
            .map(|(m, u, _)| format!("{m} {}", u.split('?').next().unwrap_or_default()))
            .collect();
        assert_eq!(
            paths,
            [
                "GET /api/v1/namespaces/shop/pods",
                "GET /api/v1/namespaces/toe-system/configmaps/toe-node-n1",
                "PATCH /apis/toe.run/v1alpha1/namespaces/shop/powertools/t/status",
                "POST /apis/events.k8s.io/v1/namespaces/shop/events",
                "PATCH /apis/toe.run/v1alpha1/namespaces/shop/powertools/t/status",
                "POST /apis/events.k8s.io/v1/namespaces/shop/events",
            ]
        );
        assert!(
            seen[0].1.contains("labelSelector=app%3Dweb"),
            "{}",
            seen[0].1
        );
        assert!(
            seen[2].1.contains("fieldManager=toe-operator"),
            "{}",
            seen[2].1
        );
        let admitted = &seen[2].2["status"];
        assert_eq!(admitted["phase"], "Admitted");
        assert_eq!(admitted["observedGeneration"], 3);
        assert_eq!(
            admitted["targets"][0]["containerID"], "containerd://abc",
            "{admitted}"
        );
        assert_eq!(admitted["targets"][0]["phase"], "Pending");
        let rejected = &seen[4].2["status"];
        assert_eq!(rejected["phase"], "Rejected");
        assert_eq!(rejected["conditions"][0]["reason"], "InvalidArgument");
        assert!(
            rejected["conditions"][0]["message"]
                .as_str()
                .unwrap()
                .contains("--frequency: 999 is above the maximum 199")
        );
        assert_eq!(seen[5].2["type"], "Warning");
    }

    #[test]
    fn selectors_become_list_strings() {
        let s: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "canary", "operator": "DoesNotExist"},
            ],
        }))
        .unwrap();
        assert_eq!(
            selector_string(&s).unwrap(),
            "app=web,tier in (a,b),!canary"
        );
        let bad: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchExpressions": [{"key": "x", "operator": "Near"}],
        }))
        .unwrap();
        assert!(selector_string(&bad).unwrap_err().contains("Near"));
    }
}
