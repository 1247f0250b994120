//! The PowerToolProcessing controller: on its schedule, reads every capture of the selected
//! PowerTools' runs within the window from the object store, and writes merged profiles, findings
//! and the HTML report to `<output>/_reports/<namespace>/<name>/<stamp>/` (toe-report does the
//! work). The spec is checked first ([`plan`], pure); a bad spec is a `Ready=False` condition
//! saying what and why, and nothing runs.

use std::{
    fmt::Write as _,
    str::FromStr as _,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::{Controller, controller::Action, watcher},
};
use toe_common::api::{
    OutputsOnDelete, PowerTool, PowerToolProcessing, PowerToolProcessingSpec,
    PowerToolProcessingStatus, ProcessingOutput, parse_duration,
};
use toe_report::{
    model::Endpoint,
    process::Options,
    rules::{Severity, Source as FindingSource},
    store::{Job, Source},
};
use url::Url;

use crate::{
    controller::{FIELD_MANAGER, condition, selector_string},
    metrics::Metrics,
};

/// Runs that ended this long before a processing are included when the spec names no window.
pub const DEFAULT_WINDOW: Duration = Duration::from_hours(24);
/// Processed outputs are kept this long when the spec names no retention.
pub const DEFAULT_RETENTION: Duration = Duration::from_hours(7 * 24);
/// The shortest interval: processing reads the whole window from the store each time.
pub const MIN_INTERVAL: Duration = Duration::from_mins(1);
const DEFAULT_MODEL_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_TOKEN_BUDGET: u32 = 4000;
/// A failed processing is retried this soon (or at the next scheduled time, if sooner).
const RETRY: Duration = Duration::from_mins(1);
/// Output URLs listed in status; the rest are in the output directory.
const MAX_LISTED_OUTPUTS: usize = 40;
/// Findings listed in status; the report has them all.
const MAX_LISTED_FINDINGS: usize = 10;

/// When processing happens.
#[derive(Clone, Debug)]
pub enum Schedule {
    Every(Duration),
    Cron(Box<croner::Cron>),
}

impl Schedule {
    /// An interval in Go duration syntax (`15m`) or a 5-field cron expression (`0 * * * *`, UTC).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.split_whitespace().count() > 1 {
            let cron = croner::Cron::from_str(text).map_err(|e| {
                format!("schedule {text:?} is not a cron expression ({e}); use e.g. \"0 * * * *\" or an interval like 15m")
            })?;
            return Ok(Self::Cron(Box::new(cron)));
        }
        let every = parse_duration(text)
            .map_err(|e| format!("schedule: {e}; or a cron expression like \"0 * * * *\""))?;
        if every < MIN_INTERVAL {
            return Err(format!(
                "schedule {text:?} is shorter than the minimum interval of 1m"
            ));
        }
        Ok(Self::Every(every))
    }

    /// The first time after `t`.
    #[must_use]
    pub fn next_after(&self, t: SystemTime) -> Option<SystemTime> {
        match self {
            Self::Every(d) => t.checked_add(*d),
            Self::Cron(c) => {
                let now = chrono::DateTime::<chrono::Utc>::from(t);
                c.find_next_occurrence(&now, false)
                    .ok()
                    .map(SystemTime::from)
            }
        }
    }
}

/// A checked spec.
#[derive(Clone, Debug)]
pub struct Plan {
    pub schedule: Schedule,
    pub window: Duration,
    pub retention: Duration,
    pub options: Options,
    pub output: Option<Url>,
    pub model: Option<ModelPlan>,
    pub on_delete: OutputsOnDelete,
}

#[derive(Clone, Debug)]
pub struct ModelPlan {
    pub url: String,
    pub model: String,
    pub secret: Option<String>,
    pub timeout: Duration,
    pub token_budget: u32,
}

fn duration_field(name: &str, v: Option<&String>, default: Duration) -> Result<Duration, String> {
    match v {
        None => Ok(default),
        Some(t) => match parse_duration(t) {
            Ok(d) if d > Duration::ZERO => Ok(d),
            Ok(_) => Err(format!("{name} must be longer than 0")),
            Err(e) => Err(format!("{name}: {e}")),
        },
    }
}

/// Checks the spec; the error names the field and says why.
pub fn plan(spec: &PowerToolProcessingSpec) -> Result<Plan, String> {
    let schedule = Schedule::parse(&spec.schedule)?;
    if spec.selector.is_none() && spec.names.is_empty() {
        return Err("select PowerTools with spec.selector or spec.names".into());
    }
    if let Some(sel) = &spec.selector {
        selector_string(sel).map_err(|e| format!("selector: {e}"))?;
    }
    if spec.outputs.is_empty() {
        return Err("outputs: name at least one of mergedFlamegraph, differentialFlamegraph, mergedPprof, htmlReport".into());
    }
    let mut options = Options::default();
    for o in &spec.outputs {
        match o {
            ProcessingOutput::MergedFlamegraph => options.merged_flamegraph = true,
            ProcessingOutput::DifferentialFlamegraph => options.differential_flamegraph = true,
            ProcessingOutput::MergedPprof => options.merged_pprof = true,
            ProcessingOutput::HtmlReport => options.html_report = true,
        }
    }
    let output = match &spec.output {
        None => None,
        Some(o) if o.pvc.is_some() => {
            return Err("output.pvc is not supported for processing; use output.url".into());
        }
        Some(o) => match &o.url {
            None => None,
            // The same checks as a PowerTool's output: a known store, a bucket, a plain path.
            Some(u) => Some(
                toe_artifacts::layout::output_base(u, None)
                    .map_err(|e| format!("output.url: {e}"))?,
            ),
        },
    };
    let model = match &spec.model {
        None => None,
        Some(m) => {
            let url = Url::parse(&m.url).map_err(|e| format!("model.url {:?}: {e}", m.url))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(format!("model.url {:?}: use http:// or https://", m.url));
            }
            if m.model.trim().is_empty() {
                return Err("model.model: name the model to ask".into());
            }
            Some(ModelPlan {
                url: m.url.clone(),
                model: m.model.clone(),
                secret: m.secret_name.clone(),
                timeout: m
                    .timeout_seconds
                    .map_or(DEFAULT_MODEL_TIMEOUT, |s| Duration::from_secs(s.into())),
                token_budget: m.max_tokens.unwrap_or(DEFAULT_TOKEN_BUDGET),
            })
        }
    };
    Ok(Plan {
        schedule,
        window: duration_field("window", spec.window.as_ref(), DEFAULT_WINDOW)?,
        retention: duration_field("retention", spec.retention.as_ref(), DEFAULT_RETENTION)?,
        options,
        output,
        model,
        on_delete: spec.outputs_on_delete.unwrap_or_default(),
    })
}

/// What the processing controller needs besides the API.
#[derive(Clone, Debug)]
pub struct ProcessingOptions {
    /// Where node agents write when a PowerTool names no output URL (the agents' `--output`),
    /// and where reports go when a processing names none.
    pub artifacts: Url,
    /// Model endpoints an admin allows (URL prefixes); empty: no model step anywhere. A
    /// processing's author names the URL, and the operator sends it the key of a Secret: only
    /// where an admin said so.
    pub model_endpoints: Vec<Url>,
    /// Stores besides `artifacts` that PowerTools and processings may name (the agents' list).
    pub allowed_outputs: Vec<Url>,
    /// How often the outputs of deleted processings are looked at ([`OutputsOnDelete`]).
    pub sweep_every: Duration,
}

/// The default of [`ProcessingOptions::sweep_every`]: "within a minute" for
/// [`OutputsOnDelete::Now`].
pub const SWEEP_EVERY: Duration = Duration::from_mins(1);

/// The record a processing keeps beside its outputs (`<artifacts>/_reports/<namespace>/<name>/
/// processing.json`), read back once the processing is deleted: it outlives the object, so the
/// operator needs no finalizer (which would leave processings undeletable while it is down).
#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    output_dir: String,
    retention_seconds: u64,
    outputs_on_delete: OutputsOnDelete,
}

const RECORD: &str = "processing.json";

/// What the status says will happen to the outputs.
fn on_delete_message(plan: &Plan) -> String {
    match plan.on_delete {
        OutputsOnDelete::AfterRetention => format!(
            "kept after this processing is deleted, each until it is older than {}",
            humantime::format_duration(plan.retention)
        ),
        OutputsOnDelete::Now => "removed within a minute once this processing is deleted".into(),
    }
}

/// Writes `record` beside the processing's outputs in the artifacts store.
async fn keep_record(
    opts: &ProcessingOptions,
    ns: &str,
    name: &str,
    record: &Record,
) -> Result<(), String> {
    let (store, root) = toe_artifacts::store::open(&opts.artifacts).map_err(|e| e.to_string())?;
    let path = root
        .join(crate::reports::REPORTS_DIR)
        .join(ns)
        .join(name)
        .join(RECORD);
    let body = serde_json::to_vec(record).map_err(|e| e.to_string())?;
    object_store::ObjectStoreExt::put(store.as_ref(), &path, object_store::PutPayload::from(body))
        .await
        .map(|_| ())
        .map_err(|e| toe_artifacts::store::explain(&e))
}

/// Says in `status` where the outputs go and what happens to them on deletion, and keeps the
/// record the sweeper reads after a deletion.
async fn note_outputs(
    opts: &ProcessingOptions,
    plan: &Plan,
    output: &Url,
    status: &mut PowerToolProcessingStatus,
    (ns, name): (&str, &str),
) -> Result<(), String> {
    status.output_dir = Some(output.to_string());
    status.outputs_on_delete = Some(on_delete_message(plan));
    let kept = Record {
        output_dir: output.to_string(),
        retention_seconds: plan.retention.as_secs(),
        outputs_on_delete: plan.on_delete,
    };
    keep_record(opts, ns, name, &kept).await.map_err(|e| {
        format!(
            "the record of where outputs go could not be written, so they stay if this processing is deleted: {e}"
        )
    })
}

/// Applies each deleted processing's [`OutputsOnDelete`] to its outputs; a record is removed
/// once no output is left. Returns the processings whose outputs are all gone.
pub async fn sweep(
    opts: &ProcessingOptions,
    exists: impl Fn(&str, &str) -> bool,
    now: SystemTime,
) -> Result<Vec<String>, String> {
    use futures::TryStreamExt as _;
    use object_store::ObjectStoreExt as _;
    let (store, root) = toe_artifacts::store::open(&opts.artifacts).map_err(|e| e.to_string())?;
    let base = root.join(crate::reports::REPORTS_DIR);
    let objects: Vec<object_store::ObjectMeta> = store
        .list(Some(&base))
        .try_collect()
        .await
        .map_err(|e| toe_artifacts::store::explain(&e))?;
    let mut gone = Vec::new();
    for o in objects {
        let rel: Vec<String> = o
            .location
            .prefix_match(&base)
            .map(|p| p.map(|x| x.as_ref().to_owned()).collect())
            .unwrap_or_default();
        let [ns, name, file] = &rel[..] else { continue };
        if file != RECORD || exists(ns, name) {
            continue;
        }
        let Ok(got) = store.get(&o.location).await else {
            continue;
        };
        let Ok(body) = got.bytes().await else {
            continue;
        };
        let Ok(record) = serde_json::from_slice::<Record>(&body) else {
            continue;
        };
        let Ok(url) = Url::parse(&record.output_dir) else {
            continue;
        };
        let Ok((out, dir)) = toe_artifacts::store::open(&url) else {
            continue;
        };
        let before = match record.outputs_on_delete {
            OutputsOnDelete::Now => now + Duration::from_secs(1),
            OutputsOnDelete::AfterRetention => now
                .checked_sub(Duration::from_secs(record.retention_seconds))
                .unwrap_or(SystemTime::UNIX_EPOCH),
        };
        toe_report::store::expire(out.as_ref(), &dir, before)
            .await
            .map_err(|e| e.to_string())?;
        let left = toe_report::store::list_outputs(out.as_ref(), &dir)
            .await
            .map_err(|e| e.to_string())?;
        if left.is_empty() {
            let _ = store.delete(&o.location).await;
            gone.push(format!("{ns}/{name}"));
        }
    }
    Ok(gone)
}

/// Sweeps every `opts.sweep_every` once the controller's view of the processings is complete (an
/// incomplete one would take live processings for deleted ones), until `stop`.
async fn sweep_loop(
    opts: ProcessingOptions,
    live: kube::runtime::reflector::Store<PowerToolProcessing>,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    tokio::select! {
        r = live.wait_until_ready() => if r.is_err() { return },
        () = &mut stop => return,
    }
    loop {
        let exists = |ns: &str, name: &str| {
            live.get(&kube::runtime::reflector::ObjectRef::new(name).within(ns))
                .is_some()
        };
        match sweep(&opts, exists, SystemTime::now()).await {
            Ok(gone) if !gone.is_empty() => {
                tracing::info!(processings = ?gone, "outputs of deleted processings removed");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweeping the outputs of deleted processings"),
        }
        tokio::select! {
            () = tokio::time::sleep(opts.sweep_every) => {}
            () = &mut stop => return,
        }
    }
}

impl ProcessingOptions {
    /// `artifacts` and every other store an admin allows.
    #[must_use]
    pub fn allowed_outputs(&self) -> Vec<Url> {
        std::iter::once(toe_artifacts::store::as_dir(&self.artifacts))
            .chain(self.allowed_outputs.iter().cloned())
            .collect()
    }
}

/// The label a Secret needs before the operator reads it for a model step: a Secret that merely
/// sits in the namespace is not the processing author's to hand out.
pub const MODEL_KEY_LABEL: &str = "toe.run/model-key";

struct Ctx {
    client: Client,
    opts: ProcessingOptions,
    metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

fn time(t: SystemTime) -> Option<Time> {
    Timestamp::try_from(t).ok().map(Time)
}

/// The directory of a PowerTool's runs, where the agents write them.
pub fn runs_url(pt: &PowerTool, artifacts: &Url) -> Result<Url, String> {
    toe_artifacts::layout::of_powertool(pt, artifacts)
        .map_err(|e| format!("{}: {e}", pt.name_any()))
}

/// The PowerTools a processing selects, and the names it lists that do not exist.
async fn selected(
    client: &Client,
    ns: &str,
    spec: &PowerToolProcessingSpec,
) -> Result<(Vec<PowerTool>, Vec<String>), Error> {
    let api: Api<PowerTool> = Api::namespaced(client.clone(), ns);
    let mut out: Vec<PowerTool> = Vec::new();
    let mut missing = Vec::new();
    for name in &spec.names {
        match api.get_opt(name).await? {
            Some(pt) => out.push(pt),
            None => missing.push(name.clone()),
        }
    }
    if let Some(sel) = &spec.selector {
        let sel = selector_string(sel).unwrap_or_default();
        for pt in api.list(&ListParams::default().labels(&sel)).await? {
            if !out.iter().any(|p| p.name_any() == pt.name_any()) {
                out.push(pt);
            }
        }
    }
    out.sort_by_key(ResourceExt::name_any);
    Ok((out, missing))
}

/// The model endpoint with its key when an admin allows it, or why the model step is skipped.
/// A Secret is never read for an endpoint no admin listed.
async fn allowed_endpoint(
    ctx: &Ctx,
    ns: &str,
    m: &ModelPlan,
) -> Result<Result<Endpoint, (String, String)>, Error> {
    let allowed = Url::parse(&m.url)
        .is_ok_and(|u| toe_artifacts::layout::is_allowed(&u, &ctx.opts.model_endpoints));
    if !allowed {
        return Ok(Err((
            "ModelNotAllowed".into(),
            "model.url is not among the model endpoints this cluster's admin allows (the \
             chart's reports.modelEndpoints); the model step is skipped and findings come from \
             the rules alone"
                .into(),
        )));
    }
    endpoint(&ctx.client, ns, m).await
}

/// The model endpoint with its key, or why the model step is skipped.
async fn endpoint(
    client: &Client,
    ns: &str,
    m: &ModelPlan,
) -> Result<Result<Endpoint, (String, String)>, Error> {
    let api_key = match &m.secret {
        None => None,
        Some(name) => {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
            let Some(secret) = secrets.get_opt(name).await? else {
                return Ok(Err((
                    "SecretNotFound".into(),
                    format!(
                        "model.secretName: Secret {ns}/{name} not found; the model step is skipped and findings come from the rules alone"
                    ),
                )));
            };
            let opted_in = secret
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MODEL_KEY_LABEL))
                .is_some_and(|v| v == "true");
            if !opted_in {
                return Ok(Err((
                    "SecretNotOptedIn".into(),
                    format!(
                        "model.secretName: Secret {ns}/{name} is not labelled \
                         {MODEL_KEY_LABEL}=true; the model step is skipped and findings come \
                         from the rules alone"
                    ),
                )));
            }
            let Some(key) = secret.data.as_ref().and_then(|d| d.get("apiKey")) else {
                return Ok(Err((
                    "SecretKeyMissing".into(),
                    format!(
                        "model.secretName: Secret {ns}/{name} has no apiKey; the model step is skipped and findings come from the rules alone"
                    ),
                )));
            };
            Some(String::from_utf8_lossy(&key.0).trim().to_owned())
        }
    };
    Ok(Ok(Endpoint {
        url: m.url.clone(),
        model: m.model.clone(),
        api_key,
        timeout: m.timeout,
        token_budget: m.token_budget,
    }))
}

async fn write_status(
    api: &Api<PowerToolProcessing>,
    name: &str,
    status: &PowerToolProcessingStatus,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "apiVersion": "toe.run/v1alpha1",
        "kind": "PowerToolProcessing",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Keeps a condition's transition time when only its message changed.
fn carry_times(old: Option<&PowerToolProcessingStatus>, new: &mut [Condition]) {
    let Some(old) = old else { return };
    for c in new {
        if let Some(o) = old
            .conditions
            .iter()
            .find(|o| o.type_ == c.type_ && o.status == c.status)
        {
            c.last_transition_time = o.last_transition_time.clone();
        }
    }
}

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
        .max(Duration::from_secs(1))
}

async fn reconcile(ptp: Arc<PowerToolProcessing>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let ns = ptp.namespace().unwrap_or_default();
    let name = ptp.name_any();
    let generation = ptp.metadata.generation.unwrap_or(0);
    let api: Api<PowerToolProcessing> = Api::namespaced(ctx.client.clone(), &ns);
    let old = ptp.status.as_ref();
    let plan = match plan(&ptp.spec).and_then(|p| output_allowed(p, &ctx.opts)) {
        Ok(p) => p,
        Err(why) => {
            let mut status = old.cloned().unwrap_or_default();
            status.observed_generation = Some(generation);
            status.next_run = None;
            status.conditions = vec![condition("Ready", false, "InvalidSpec", &why, generation)];
            carry_times(old, &mut status.conditions);
            if old != Some(&status) {
                write_status(&api, &name, &status).await?;
            }
            return Ok(Action::await_change());
        }
    };
    let now = SystemTime::now();
    if let Some(s) = old.filter(|s| s.observed_generation == Some(generation))
        && let Some(next) = &s.next_run
        && SystemTime::from(next.0) > now
    {
        return Ok(Action::requeue(until(SystemTime::from(next.0))));
    }
    let status = process(&ctx, &ptp, &plan, now).await?;
    let next = status.next_run.as_ref().map(|t| SystemTime::from(t.0));
    write_status(&api, &name, &status).await?;
    Ok(next.map_or_else(Action::await_change, |t| Action::requeue(until(t))))
}

/// Where reports go must be one of the admin's stores: the operator writes with its own
/// credentials (and as root on a node-local file:// store).
fn output_allowed(plan: Plan, opts: &ProcessingOptions) -> Result<Plan, String> {
    match &plan.output {
        Some(u) if !toe_artifacts::layout::is_allowed(u, &opts.allowed_outputs()) => Err(
            "output.url is not among the output locations this cluster's admin allows (the \
             chart's artifacts.allowedUrls)"
                .into(),
        ),
        _ => Ok(plan),
    }
}

/// Where each selected PowerTool's runs are, and what could not be read (names not found, bad
/// output URLs).
fn sources(
    ns: &str,
    pts: &[PowerTool],
    missing: &[String],
    opts: &ProcessingOptions,
) -> (Vec<Source>, Vec<String>) {
    let mut out = Vec::new();
    let mut problems: Vec<String> = missing
        .iter()
        .map(|n| format!("PowerTool {ns}/{n} not found"))
        .collect();
    for pt in pts {
        match runs_url(pt, &opts.artifacts).and_then(|u| {
            if toe_artifacts::layout::is_allowed(&u, &opts.allowed_outputs()) {
                Ok(u)
            } else {
                Err(format!(
                    "PowerTool {ns}/{}: its output.url is not among the allowed output locations",
                    pt.name_any()
                ))
            }
        }) {
            Ok(url) => out.push(Source {
                url,
                label: pt.name_any(),
            }),
            Err(e) => problems.push(e),
        }
    }
    (out, problems)
}

/// What a finished job wrote and found, into the status.
fn record(status: &mut PowerToolProcessingStatus, done: &toe_report::store::JobOutcome) {
    let o = &done.outcome;
    status.captures = u32::try_from(o.captures).ok();
    status.runs = u32::try_from(o.runs).ok();
    status.report = done
        .written
        .iter()
        .find(|u| u.ends_with("/report.html"))
        .cloned();
    // Per-run flamegraphs stay in the directory; the status lists what a reader opens first.
    status.outputs = done
        .written
        .iter()
        .filter(|u| !u.contains("/runs/"))
        .take(MAX_LISTED_OUTPUTS)
        .cloned()
        .collect();
    status.findings = o
        .findings
        .iter()
        .take(MAX_LISTED_FINDINGS)
        .map(|f| {
            let severity = match f.severity {
                Severity::Critical => "critical",
                Severity::Warning => "warning",
                Severity::Info => "info",
            };
            let by = match f.source {
                FindingSource::Rule => format!("rule {}", f.rule),
                FindingSource::Model => "model".into(),
            };
            format!("{severity}: {} ({by})", f.title)
        })
        .collect();
}

/// Whether the model answered.
/// The Ready condition's message after a processing that ran.
fn processed_message(
    o: &toe_report::process::Outcome,
    powertools: usize,
    problems: &[String],
) -> String {
    let mut message = format!(
        "{} capture(s) of {} run(s) from {powertools} PowerTool(s); {} finding(s)",
        o.captures,
        o.runs,
        o.findings.len()
    );
    for p in problems {
        message.push_str("; ");
        message.push_str(p);
    }
    if let Some(first) = o.skipped.first() {
        let _ = write!(
            message,
            "; {} capture(s) left out as unreadable (the report lists each), first: {first}",
            o.skipped.len()
        );
    }
    message
}

fn model_condition(error: Option<&str>, generation: i64) -> Condition {
    match error {
        Some(e) => condition(
            "ModelAvailable",
            false,
            "ModelFailed",
            &format!("the model step failed, so the findings come from the rules alone: {e}"),
            generation,
        ),
        None => condition(
            "ModelAvailable",
            true,
            "Answered",
            "the model's findings are in the report, marked as such",
            generation,
        ),
    }
}

/// One processing pass and the status that reports it.
async fn process(
    ctx: &Ctx,
    ptp: &PowerToolProcessing,
    plan: &Plan,
    now: SystemTime,
) -> Result<PowerToolProcessingStatus, Error> {
    let ns = ptp.namespace().unwrap_or_default();
    let name = ptp.name_any();
    let generation = ptp.metadata.generation.unwrap_or(0);
    let mut status = PowerToolProcessingStatus {
        last_run: time(now),
        observed_generation: Some(generation),
        ..PowerToolProcessingStatus::default()
    };
    let mut conditions = Vec::new();
    let (pts, missing) = selected(&ctx.client, &ns, &ptp.spec).await?;
    let mut options = plan.options.clone();
    options.title = format!("{ns}/{name}");
    if let Some(m) = &plan.model {
        match allowed_endpoint(ctx, &ns, m).await? {
            Ok(e) => options.model = Some(e),
            Err((reason, message)) => {
                conditions.push(condition(
                    "ModelAvailable",
                    false,
                    &reason,
                    &message,
                    generation,
                ));
            }
        }
    }
    let (sources, mut problems) = sources(&ns, &pts, &missing, &ctx.opts);
    options.meta = format!(
        "processed {} for PowerTools {} (runs that ended in the last {}); schedule {}",
        humantime::format_rfc3339_seconds(now),
        pts.iter()
            .map(ResourceExt::name_any)
            .collect::<Vec<_>>()
            .join(", "),
        humantime::format_duration(plan.window),
        ptp.spec.schedule
    );
    let output = toe_artifacts::store::as_dir(plan.output.as_ref().unwrap_or(&ctx.opts.artifacts))
        .join(&format!("_reports/{ns}/{name}/"))
        .expect("a relative path joins a directory URL");
    let job = Job {
        sources,
        window: Some(plan.window),
        now,
        output,
        retention: Some(plan.retention),
        options,
    };
    if let Err(e) = note_outputs(&ctx.opts, plan, &job.output, &mut status, (&ns, &name)).await {
        problems.push(e);
    }
    let next = plan.schedule.next_after(now);
    let asked_model = job.options.model.is_some();
    // Merging and rendering are CPU-bound for seconds on large windows: off the async workers,
    // so the other controllers and the report server keep answering.
    let handle = tokio::runtime::Handle::current();
    let result = tokio::task::spawn_blocking(move || handle.block_on(toe_report::store::run(&job)))
        .await
        .unwrap_or_else(|e| Err(toe_report::store::StoreError::Aborted(e.to_string())));
    match result {
        Ok(done) => {
            let o = &done.outcome;
            record(&mut status, &done);
            if asked_model {
                conditions.push(model_condition(o.model_error.as_deref(), generation));
            }
            let message = processed_message(o, pts.len(), &problems);
            conditions.insert(
                0,
                condition("Ready", true, "Processed", &message, generation),
            );
            status.next_run = next.and_then(time);
        }
        Err(e) => {
            problems.insert(0, e.to_string());
            conditions.insert(
                0,
                condition(
                    "Ready",
                    false,
                    "ProcessingFailed",
                    &problems.join("; "),
                    generation,
                ),
            );
            let retry = now + RETRY;
            status.next_run = time(next.map_or(retry, |n| n.min(retry)));
            ctx.metrics.reconcile_errors.inc();
        }
    }
    carry_times(ptp.status.as_ref(), &mut conditions);
    status.conditions = conditions;
    Ok(status)
}

#[expect(
    clippy::needless_pass_by_value,
    reason = "the signature kube's Controller::run calls"
)]
fn error_policy(_: Arc<PowerToolProcessing>, error: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.reconcile_errors.inc();
    tracing::warn!(%error, "processing reconcile failed; retrying in 15 s");
    Action::requeue(Duration::from_secs(15))
}

/// Runs the processing controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    opts: ProcessingOptions,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let signal = crate::shutdown::Signal::new(shutdown);
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        opts,
        metrics,
    });
    let controller = Controller::new(
        Api::<PowerToolProcessing>::all(client),
        watcher::Config::default(),
    )
    // One processing at a time: each may use its whole merge budget and scratch space.
    .with_config(kube::runtime::controller::Config::default().concurrency(1))
    .graceful_shutdown_on(signal.fired());
    let processings = controller.store();
    // Boxed: the callers' futures hold this one, and the sweeper's is large.
    let sweeper = Box::pin(sweep_loop(
        ctx.opts.clone(),
        processings.clone(),
        signal.fired(),
    ));
    let results = controller.run(reconcile, error_policy, ctx);
    let reconciles = signal
        .bound(results, move || crate::shutdown::listed(&processings))
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "processing reconcile");
            }
        });
    tokio::join!(reconciles, sweeper);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(schedule: &str) -> PowerToolProcessingSpec {
        PowerToolProcessingSpec {
            names: vec!["cpu".into()],
            schedule: schedule.into(),
            outputs: vec![ProcessingOutput::HtmlReport],
            ..PowerToolProcessingSpec::default()
        }
    }

    #[test]
    fn schedules_are_intervals_or_cron() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_123);
        let every = plan(&spec("15m")).unwrap().schedule;
        assert_eq!(every.next_after(t), Some(t + Duration::from_mins(15)));
        let hourly = plan(&spec("0 * * * *")).unwrap().schedule;
        let next = hourly.next_after(t).unwrap();
        let secs = next
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(secs % 3600, 0);
        assert!(next > t && next <= t + Duration::from_hours(1));
    }

    #[test]
    fn bad_specs_say_what_and_why() {
        let err = plan(&spec("every tuesday")).unwrap_err();
        assert!(err.contains("cron"), "{err}");
        let err = plan(&spec("10s")).unwrap_err();
        assert!(err.contains("minimum interval"), "{err}");
        let err = plan(&spec("fortnightly")).unwrap_err();
        assert!(err.contains("schedule"), "{err}");
        let mut s = spec("1h");
        s.names.clear();
        assert!(
            plan(&s)
                .unwrap_err()
                .contains("spec.selector or spec.names")
        );
        let mut s = spec("1h");
        s.window = Some("-1h".into());
        assert!(plan(&s).unwrap_err().starts_with("window:"));
        let mut s = spec("1h");
        s.model = Some(toe_common::api::ModelSpec {
            url: "ftp://x".into(),
            model: "m".into(),
            ..Default::default()
        });
        assert!(plan(&s).unwrap_err().contains("http://"));
    }

    #[test]
    fn defaults_apply() {
        let p = plan(&spec("1h")).unwrap();
        assert_eq!((p.window, p.retention), (DEFAULT_WINDOW, DEFAULT_RETENTION));
        assert!(p.options.html_report && !p.options.merged_pprof);
    }

    #[tokio::test]
    async fn the_sweep_applies_each_deleted_processings_choice() {
        let store = tempfile::tempdir().unwrap();
        let artifacts = Url::from_directory_path(store.path()).unwrap();
        let opts = ProcessingOptions {
            artifacts: artifacts.clone(),
            model_endpoints: Vec::new(),
            allowed_outputs: Vec::new(),
            sweep_every: SWEEP_EVERY,
        };
        let now = SystemTime::now();
        let (fresh, old) = (
            toe_artifacts::store::stamp(now),
            toe_artifacts::store::stamp(now - Duration::from_hours(72)),
        );
        for (name, on_delete) in [
            ("now", OutputsOnDelete::Now),
            ("kept", OutputsOnDelete::AfterRetention),
            ("live", OutputsOnDelete::Now),
        ] {
            let dir = store.path().join("_reports/shop").join(name);
            for stamp in [&fresh, &old] {
                std::fs::create_dir_all(dir.join(stamp)).unwrap();
                std::fs::write(dir.join(stamp).join("report.html"), "r").unwrap();
            }
            let record = Record {
                output_dir: Url::from_directory_path(&dir).unwrap().to_string(),
                retention_seconds: 48 * 3600,
                outputs_on_delete: on_delete,
            };
            keep_record(&opts, "shop", name, &record).await.unwrap();
        }
        let gone = sweep(&opts, |_, name| name == "live", now).await.unwrap();
        assert_eq!(gone, ["shop/now"]);
        // What is left with files in it (a file:// store leaves emptied directories behind).
        let left = |name: &str| {
            let mut v: Vec<String> =
                std::fs::read_dir(store.path().join("_reports/shop").join(name))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| {
                        !e.path().is_dir()
                            || std::fs::read_dir(e.path()).is_ok_and(|mut f| f.next().is_some())
                    })
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
            v.sort();
            v
        };
        assert_eq!(left("now"), Vec::<String>::new());
        assert_eq!(left("kept"), [fresh.clone(), RECORD.to_owned()]);
        assert_eq!(
            left("live").len(),
            3,
            "a processing that exists is not touched"
        );
    }
}
