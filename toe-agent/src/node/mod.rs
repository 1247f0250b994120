//! Node mode (`toe agent`): the DaemonSet's engine. It watches PowerTools admitted for their
//! current generation, takes the selected targets on its own node, re-validates each against
//! the PowerToolConfigs (a client-side filter is no security boundary), resolves the container
//! to its cgroup and runs the same engine as local mode on it. Artifacts go through a spool on
//! the node's disk to the PowerTool's object store; each target's progress goes into the
//! PowerTool's status. Deleting the PowerTool stops its runs (faults rolled back, partial
//! artifacts kept); stopping the agent does the same for every run and marks them Interrupted.

pub mod probe;
pub mod spool;
pub mod status;
mod target;

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use toe_common::api::{PowerTool, PowerToolConfig, PowerToolPhase, SelectedTarget, TargetPhase};
use tokio::sync::{Notify, watch};
use url::Url;

pub use self::target::remote_dir;
use self::{
    spool::{Job, Spool},
    status::{TargetRef, update_target},
    target::run_target,
};
use crate::tools::faults::ledger::{self, Ledger};

pub struct NodeOptions {
    /// This node's name, as pods' `spec.nodeName` has it.
    pub node: String,
    /// Where artifacts go when a PowerTool names no output URL.
    pub output: Url,
    /// How long an upload attempt may take when a run ends (later attempts back off).
    pub upload_timeout: Duration,
    /// The namespace TOE is installed in: faults reach it (like kube-system) only where a
    /// config names it.
    pub release_namespace: String,
    /// Where PowerTools may have artifacts written besides `output` (which always is).
    pub allowed_outputs: Vec<Url>,
}

/// Which run of which target: a target is run at most once per PowerTool generation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    uid: String,
    generation: i64,
    target: (String, String, String),
}

impl Key {
    fn of(pt: &PowerTool, t: &SelectedTarget) -> Self {
        Self {
            uid: pt.uid().unwrap_or_default(),
            generation: pt.metadata.generation.unwrap_or(0),
            target: (t.namespace.clone(), t.pod.clone(), t.container.clone()),
        }
    }

    fn of_job(j: &Job) -> Self {
        Self {
            uid: j.uid.clone(),
            generation: j.generation,
            target: j.target.clone(),
        }
    }
}

struct Ctx {
    client: Client,
    node: String,
    manager: String,
    configs: Store<PowerToolConfig>,
    spool: Spool,
    output: Url,
    upload_timeout: Duration,
    /// Spool jobs a run task is uploading itself; the background uploader leaves them alone.
    claimed: Mutex<HashSet<PathBuf>>,
    /// Namespaces faults reach only where a config names them.
    protected: Vec<String>,
    /// Output locations a PowerTool may name: the default store and what the admin added.
    allowed_outputs: Vec<Url>,
}

struct Active {
    stop: watch::Sender<Option<&'static str>>,
    handle: tokio::task::JoinHandle<()>,
    /// The PowerTool's tools, for the per-node caps.
    tools: Vec<String>,
}

/// The tools of a PowerTool: its own and those alongside.
fn tools_of(pt: &PowerTool) -> Vec<String> {
    std::iter::once(&pt.spec.tool)
        .chain(&pt.spec.alongside)
        .map(|t| t.name.clone())
        .collect()
}

/// The first of `tools` whose config caps its runs per node at a number `running` has reached:
/// that target waits (stays Pending) until one of them ends.
fn capped<'a>(
    tools: &'a [String],
    configs: &[PowerToolConfig],
    running: &[&[String]],
) -> Option<(&'a str, u32)> {
    tools.iter().find_map(|t| {
        let cap = configs
            .iter()
            .filter(|c| c.spec.tool == *t)
            .find_map(|c| c.spec.max_concurrent_per_node)?;
        let n = running.iter().filter(|r| r.contains(t)).count();
        (u32::try_from(n).unwrap_or(u32::MAX) >= cap).then_some((t.as_str(), cap))
    })
}

fn target_ref(pt: &PowerTool, t: &SelectedTarget) -> TargetRef {
    TargetRef {
        namespace: pt.namespace().unwrap_or_default(),
        name: pt.name_any(),
        uid: pt.uid().unwrap_or_default(),
        generation: pt.metadata.generation.unwrap_or(0),
        target: t.clone(),
    }
}

impl Ctx {
    fn api(&self, namespace: &str) -> Api<PowerTool> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Sets the target's phase and message (and artifacts when given). An API error is logged
    /// and returned as false: the run's result is already safe in the store or the spool.
    async fn set(
        &self,
        r: &TargetRef,
        phase: TargetPhase,
        message: String,
        artifacts: Option<Vec<String>>,
    ) -> bool {
        let result = update_target(&self.api(&r.namespace), &self.manager, r, |t| {
            t.phase = Some(phase);
            t.message = Some(message.clone());
            if let Some(a) = &artifacts {
                t.artifacts.clone_from(a);
            }
        })
        .await;
        result
            .inspect_err(|e| {
                tracing::warn!(powertool = %r.name, pod = %r.target.pod, error = %e, "writing the target's status");
            })
            .is_ok()
    }
}

/// The status entry a spool job reports into.
fn job_target(j: &Job) -> TargetRef {
    let (namespace, pod, container) = j.target.clone();
    TargetRef {
        namespace: j.namespace.clone(),
        name: j.powertool.clone(),
        uid: j.uid.clone(),
        generation: j.generation,
        target: SelectedTarget {
            namespace,
            pod,
            container,
            ..SelectedTarget::default()
        },
    }
}

/// Uploads what runs left on disk (an unreachable store, an agent restart), with backoff per
/// job, and reports each target's final phase once its artifacts are in the store.
async fn uploader(ctx: Arc<Ctx>) {
    let mut next: BTreeMap<PathBuf, (Instant, u32)> = BTreeMap::new();
    loop {
        for job in ctx.spool.jobs() {
            if job.job.phase.is_none()
                || ctx
                    .claimed
                    .lock()
                    .expect("not poisoned")
                    .contains(job.path())
            {
                continue;
            }
            let (due, attempt) = next.get(job.path()).copied().unwrap_or((Instant::now(), 0));
            if Instant::now() < due {
                continue;
            }
            match tokio::time::timeout(ctx.upload_timeout, job.upload(&ctx.allowed_outputs)).await {
                Ok(Ok(_)) => {
                    let j = &job.job;
                    let r = job_target(j);
                    let phase = j.phase.unwrap_or(TargetPhase::Completed);
                    let message = j.message.clone().unwrap_or_default();
                    if !ctx.set(&r, phase, message, Some(j.artifacts.clone())).await {
                        let retry = Instant::now() + spool::backoff(attempt);
                        next.insert(job.path().to_owned(), (retry, attempt + 1));
                        continue;
                    }
                    next.remove(job.path());
                    tracing::info!(job = %job.path().display(), "spooled artifacts uploaded");
                    let _ = job.remove();
                }
                outcome => {
                    let why = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    tracing::warn!(job = %job.path().display(), %why, attempt, "upload failed; retrying");
                    next.insert(
                        job.path().to_owned(),
                        (Instant::now() + spool::backoff(attempt), attempt + 1),
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Publishes the probe in this node's ConfigMap in TOE's namespace (server-side apply: created
/// on the first start, replaced on every later one).
async fn publish(client: &Client, node: &str, namespace: &str, caps: &probe::Capabilities) {
    let json = serde_json::to_string(caps).expect("capabilities serialize");
    let name = toe_common::api::capabilities_config_map(node);
    let cm = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/component": "capabilities"}},
        "data": {
            toe_common::api::CAPABILITIES_NODE_KEY: node,
            toe_common::api::CAPABILITIES_KEY: json,
        },
    });
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    if let Err(e) = maps
        .patch(
            &name,
            &PatchParams::apply("toe-agent").force(),
            &Patch::Apply(&cm),
        )
        .await
    {
        tracing::warn!(%node, %namespace, error = %e, "publishing the node's capabilities");
    }
}

/// Keeps `store` filled from a watch and pokes `changed` on every event.
fn follow<K>(api: Api<K>, changed: Arc<Notify>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(error = %e, "watch");
            }
            changed.notify_one();
        }
    });
    store
}

/// Whether the agent acts on this PowerTool now.
fn admitted(pt: &PowerTool) -> bool {
    pt.metadata.deletion_timestamp.is_none()
        && pt.status.as_ref().is_some_and(|s| {
            s.observed_generation == pt.metadata.generation
                && matches!(s.phase, PowerToolPhase::Admitted | PowerToolPhase::Running)
        })
}

/// Why a run must stop now, if it must.
fn stop_reason(key: &Key, pts: &[Arc<PowerTool>]) -> Option<&'static str> {
    let Some(pt) = pts
        .iter()
        .find(|p| p.uid().as_deref() == Some(key.uid.as_str()))
    else {
        return Some("the PowerTool was deleted");
    };
    if pt.metadata.deletion_timestamp.is_some() {
        return Some("the PowerTool was deleted");
    }
    if pt.metadata.generation != Some(key.generation) {
        return Some("the PowerTool's spec changed");
    }
    None
}

/// Runs a crash cut short are over: their spool jobs are marked Interrupted (and uploaded and
/// reported by the uploader), and they are never started again. Returns every spooled run.
fn resume(spool: &Spool, recovered: &ledger::Recovered) -> anyhow::Result<HashSet<Key>> {
    let mut started = HashSet::new();
    for mut job in spool.jobs() {
        started.insert(Key::of_job(&job.job));
        if job.job.phase.is_none() {
            job.job.phase = Some(TargetPhase::Interrupted);
            job.job.message = Some(format!(
                "the node agent stopped during the run (crash or kill); its faults were rolled \
                 back from the ledger when it restarted ({} worker(s) killed, {} file(s) \
                 removed); artifacts saved: {}",
                recovered.workers_killed,
                recovered.files_removed.len(),
                job.waiting().len()
            ));
            job.save().context("recording an interrupted run")?;
        }
    }
    Ok(started)
}

/// One pass over the PowerTools: stop runs whose PowerTool went away or changed, start this
/// node's Pending targets, and settle targets a lost state directory left Running.
fn sweep(
    ctx: &Arc<Ctx>,
    pts: &[Arc<PowerTool>],
    active: &mut BTreeMap<Key, Active>,
    started: &mut HashSet<Key>,
) {
    for (key, a) in active.iter() {
        if let Some(why) = stop_reason(key, pts) {
            a.stop.send_if_modified(|s| s.replace(why).is_none());
        }
    }
    active.retain(|_, a| !a.handle.is_finished());
    // Read only when a target is about to start: most sweeps start nothing.
    let mut configs: Option<Vec<PowerToolConfig>> = None;
    for pt in pts.iter().filter(|p| admitted(p)) {
        let status = pt.status.as_ref().expect("admitted has a status");
        let tools = tools_of(pt);
        for t in status.targets.iter().filter(|t| t.node == ctx.node) {
            let key = Key::of(pt, t);
            match t.phase {
                Some(TargetPhase::Pending) if !started.contains(&key) => {
                    let running: Vec<&[String]> =
                        active.values().map(|a| a.tools.as_slice()).collect();
                    let configs = configs.get_or_insert_with(|| {
                        ctx.configs.state().iter().map(|c| (**c).clone()).collect()
                    });
                    if let Some((tool, cap)) = capped(&tools, configs, &running) {
                        tracing::debug!(tool, cap, pod = %t.pod, "held back by the per-node cap");
                        continue;
                    }
                    started.insert(key.clone());
                    let (stop, rx) = watch::channel(None);
                    let handle = tokio::spawn(run_target(ctx.clone(), pt.clone(), t.clone(), rx));
                    active.insert(
                        key,
                        Active {
                            stop,
                            handle,
                            tools: tools.clone(),
                        },
                    );
                }
                Some(TargetPhase::Running | TargetPhase::Uploading)
                    if started.insert(key.clone()) =>
                {
                    let r = target_ref(pt, t);
                    let msg = "the node agent restarted during the run and has no record of it \
                               (its state directory was lost); faults it started were in that \
                               directory's ledger"
                        .to_owned();
                    let c = ctx.clone();
                    tokio::spawn(
                        async move { c.set(&r, TargetPhase::Interrupted, msg, None).await },
                    );
                }
                _ => {}
            }
        }
    }
}

/// Runs the agent until `shutdown` resolves, then stops every run (partial artifacts written,
/// faults rolled back, targets marked Interrupted) before returning.
pub async fn run(
    client: Client,
    opts: NodeOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let state = ledger::state_dir();
    // Leftovers of faults a crashed agent started are undone before anything else.
    let ledger = Ledger::open(&state).context("opening the fault ledger")?;
    let recovered = ledger
        .recover()
        .with_context(|| format!("recovering {}", ledger.path().display()))?;
    tracing::info!(
        runs = recovered.runs.len(),
        workers_killed = recovered.workers_killed,
        files_removed = recovered.files_removed.len(),
        "fault ledger recovered"
    );
    let caps = tokio::task::spawn_blocking(probe::probe).await?;
    tracing::info!(?caps, "kernel capabilities");
    publish(&client, &opts.node, &opts.release_namespace, &caps).await;

    let changed = Arc::new(Notify::new());
    let configs = follow(Api::<PowerToolConfig>::all(client.clone()), changed.clone());
    let powertools = follow(Api::<PowerTool>::all(client.clone()), changed.clone());
    tokio::pin!(shutdown);
    // A SIGTERM before the first lists (an API server that does not answer) ends the agent: it
    // has started nothing yet.
    tokio::select! {
        biased;
        () = &mut shutdown => {
            tracing::info!("stopping before the first list of PowerTools");
            return Ok(());
        }
        r = async {
            configs.wait_until_ready().await?;
            powertools.wait_until_ready().await
        } => r?,
    }

    let spool = Spool::open(&state).context("opening the spool")?;
    let mut started = resume(&spool, &recovered)?;
    let allowed_outputs = std::iter::once(toe_artifacts::store::as_dir(&opts.output))
        .chain(opts.allowed_outputs)
        .collect();
    let ctx = Arc::new(Ctx {
        manager: status::field_manager(&opts.node),
        node: opts.node,
        client,
        configs,
        spool,
        output: opts.output,
        upload_timeout: opts.upload_timeout,
        claimed: Mutex::new(HashSet::new()),
        protected: toe_common::api::protected_namespaces(&opts.release_namespace),
        allowed_outputs,
    });
    let uploads = tokio::spawn(uploader(ctx.clone()));
    let mut active: BTreeMap<Key, Active> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = changed.notified() => {}
            _ = tick.tick() => {}
        }
        sweep(&ctx, &powertools.state(), &mut active, &mut started);
    }
    tracing::info!(runs = active.len(), "stopping: interrupting every run");
    for a in active.values() {
        a.stop
            .send_if_modified(|s| s.replace("the node agent is stopping (SIGTERM)").is_none());
    }
    for (_, a) in active {
        let _ = a.handle.await;
    }
    uploads.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use toe_common::api::{OutputSpec, PowerToolSpec, PowerToolStatus};

    use super::{target::*, *};

    #[test]
    fn a_per_node_cap_holds_targets_back_until_a_run_ends() {
        let config: PowerToolConfig = serde_json::from_value(serde_json::json!({
            "apiVersion": "toe.run/v1alpha1", "kind": "PowerToolConfig",
            "metadata": {"name": "memory-stress"},
            "spec": {"tool": "memory-stress", "maxConcurrentPerNode": 2},
        }))
        .unwrap();
        let stress = vec!["memory-stress".to_owned()];
        let profile = vec!["cpu-profile".to_owned()];
        let configs = [config];
        assert_eq!(capped(&stress, &configs, &[&stress]), None);
        assert_eq!(
            capped(&stress, &configs, &[&stress, &profile, &stress]),
            Some(("memory-stress", 2))
        );
        // Tools without a cap are never held back.
        assert_eq!(capped(&profile, &configs, &[&profile, &profile]), None);
    }

    fn powertool(output: Option<OutputSpec>) -> PowerTool {
        let mut pt = PowerTool::new(
            "p",
            PowerToolSpec {
                output,
                ..PowerToolSpec::default()
            },
        );
        pt.metadata.namespace = Some("shop".into());
        pt.metadata.uid = Some("0123456789abcdef".into());
        pt.metadata.generation = Some(2);
        pt
    }

    fn target() -> SelectedTarget {
        SelectedTarget {
            node: "n".into(),
            namespace: "shop".into(),
            pod: "web-1".into(),
            container: "app".into(),
            ..SelectedTarget::default()
        }
    }

    #[test]
    fn artifacts_go_under_namespace_powertool_run_pod_container() {
        let default = Url::parse("file:///var/lib/toe/artifacts/").unwrap();
        let url = |out| remote_dir(&default, &powertool(out), &target());
        assert_eq!(
            url(None).unwrap().as_str(),
            "file:///var/lib/toe/artifacts/shop/p/g2-01234567/web-1/app/"
        );
        let s3 = OutputSpec {
            url: Some("s3://bucket/prefix".into()),
            pvc: None,
        };
        assert_eq!(
            url(Some(s3)).unwrap().as_str(),
            "s3://bucket/prefix/shop/p/g2-01234567/web-1/app/"
        );
        let path = OutputSpec {
            url: Some("/data/toe".into()),
            pvc: None,
        };
        assert_eq!(
            url(Some(path)).unwrap().as_str(),
            "file:///data/toe/shop/p/g2-01234567/web-1/app/"
        );
        let relative = OutputSpec {
            url: Some("toe-output".into()),
            pvc: None,
        };
        assert!(
            url(Some(relative))
                .unwrap_err()
                .contains("object store URL")
        );
        let pvc = OutputSpec {
            url: None,
            pvc: Some("claim".into()),
        };
        assert!(url(Some(pvc)).unwrap_err().contains("spec.output.url"));
    }

    #[test]
    fn only_the_current_generation_of_an_admitted_powertool_runs() {
        let mut pt = powertool(None);
        assert!(!admitted(&pt), "no status yet");
        let status = |phase, generation| PowerToolStatus {
            phase,
            observed_generation: Some(generation),
            ..PowerToolStatus::default()
        };
        pt.status = Some(status(PowerToolPhase::Admitted, 2));
        assert!(admitted(&pt));
        pt.status = Some(status(PowerToolPhase::Running, 2));
        assert!(admitted(&pt));
        pt.status = Some(status(PowerToolPhase::Admitted, 1));
        assert!(!admitted(&pt), "admitted for an older spec");
        pt.status = Some(status(PowerToolPhase::Rejected, 2));
        assert!(!admitted(&pt));
        pt.status = Some(status(PowerToolPhase::Admitted, 2));
        pt.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        assert!(!admitted(&pt), "being deleted");
    }

    #[test]
    fn runs_stop_when_their_powertool_goes_or_changes() {
        let pt = Arc::new(powertool(None));
        let key = Key::of(&pt, &target());
        assert_eq!(stop_reason(&key, std::slice::from_ref(&pt)), None);
        assert_eq!(stop_reason(&key, &[]), Some("the PowerTool was deleted"));
        let mut changed = (*pt).clone();
        changed.metadata.generation = Some(3);
        assert_eq!(
            stop_reason(&key, &[Arc::new(changed)]),
            Some("the PowerTool's spec changed")
        );
        let mut recreated = (*pt).clone();
        recreated.metadata.uid = Some("another".into());
        assert_eq!(
            stop_reason(&key, &[Arc::new(recreated)]),
            Some("the PowerTool was deleted"),
            "same name, another object"
        );
    }
}
