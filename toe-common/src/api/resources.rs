//! The custom resources of `toe.run/v1alpha1`, as Rust types from which the CRDs (schemas,
//! printer columns, short names, status subresources) are generated: `cargo xtask crds`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `apiVersion` and `kind` of a document, read before it is parsed as a typed resource.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TypeMeta {
    pub api_version: String,
    pub kind: String,
}

/// Which pods and containers, which tool, for how long, where the results go, how many targets
/// at once.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "toe.run",
    version = "v1alpha1",
    kind = "PowerTool",
    doc = "A short, targeted deep-dive into selected pods and containers with one tool (and collectors alongside it).",
    namespaced,
    status = "PowerToolStatus",
    shortname = "pt",
    category = "toe",
    printcolumn = r#"{"name":"Tool","type":"string","jsonPath":".spec.tool.name"}"#,
    printcolumn = r#"{"name":"Duration","type":"string","jsonPath":".spec.tool.duration"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Targets","type":"integer","jsonPath":".status.targetCount"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PowerToolSpec {
    pub tool: ToolSpec,
    /// More tools over the same targets and the same window, e.g. a CPU profile while memory is
    /// stressed. They take no duration of their own; at most one tool of a PowerTool is a fault.
    /// Their results share the run's timeline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alongside: Vec<ToolSpec>,
    /// Pod and container selection. Cluster-only: local mode takes its target from the command
    /// line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Targets>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputSpec>,
    /// How many of the selected pods are acted on. Cluster-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blast_radius: Option<BlastRadius>,
    /// Deleted this long after it finished. Cluster-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<u64>,
    /// Plan and report, change nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ToolSpec {
    /// A tool enabled by a PowerToolConfig (`toe tools` lists the built-in ones).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Go duration syntax, as in every Kubernetes API (`30s`, `1m30s`, `1.5h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"))]
    pub duration: Option<String>,
    /// Extra arguments for the tool, each `--name=value`, `--flag`, or `--name` followed by its
    /// value as the next item. Validated against the tool's argument schema and its
    /// PowerToolConfig; never passed through a shell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub command_line_arguments: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Targets {
    /// Namespaces to select pods in; absent: the PowerTool's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods to act on, within the selected namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<LabelSelector>,
    /// Names of the containers to act on in each pod; empty: every container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {
    /// An object store URL (`file:///dir`, `s3://bucket/prefix`, `gs://...`, `az://...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A PersistentVolumeClaim in the PowerTool's namespace to write to instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum BlastRadiusMode {
    #[default]
    All,
    One,
    Count,
    Percent,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BlastRadius {
    #[serde(default)]
    pub mode: BlastRadiusMode,
    /// Pods for mode `Count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub count: Option<u32>,
    /// Percent of the selected pods for mode `Percent` (rounded up, at least one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub percent: Option<u32>,
    /// Pods acted on at the same time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum PowerToolPhase {
    #[default]
    Pending,
    Admitted,
    Rejected,
    Running,
    Completed,
    Failed,
    Interrupted,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PowerToolStatus {
    // Not an Option: the schema of an optional enum would list `null` among its values, which
    // the API server's structural schema check refuses.
    #[serde(default)]
    pub phase: PowerToolPhase,
    /// `Admitted`, `Rejected`, `Running`, `Completed`, `Failed`, with reasons and messages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<SelectedTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<Time>,
}

/// One container the run acts on, and how far it got.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SelectedTarget {
    pub node: String,
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// As the pod status has it (`containerd://...`, `cri-o://...`); named as Kubernetes names
    /// it there.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `Waiting` (held back by maxConcurrent), `Pending`, `Running`, `Uploading` (the run is
    /// over; its artifacts wait on the node for the object store), `Completed`, `Failed`,
    /// `Interrupted`.
    // A string in the schema: an optional enum's schema lists `null` among its values, which
    // the API server's structural schema check refuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub phase: Option<TargetPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
}

/// Where each node agent publishes its [`Capabilities`]: one ConfigMap per node in TOE's own
/// namespace ([`capabilities_config_map`]), with the JSON under this key. Not a Node annotation:
/// writing one would need `patch` on every Node of the cluster (labels and taints included),
/// which no agent should hold.
pub const CAPABILITIES_KEY: &str = "capabilities.json";
/// The key that names the node a capabilities ConfigMap describes (its name may be shortened).
pub const CAPABILITIES_NODE_KEY: &str = "node";

/// The name of `node`'s capabilities ConfigMap: `toe-node-<node>`, or for a node name too long
/// for that, its first 200 characters and a hash of the whole (FNV-1a: stable across builds and
/// languages, unlike std's hasher).
#[must_use]
pub fn capabilities_config_map(node: &str) -> String {
    const MAX: usize = 253;
    let name = format!("toe-node-{node}");
    if name.len() <= MAX {
        return name;
    }
    let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let head: String = node.chars().take(200).collect();
    format!("toe-node-{}-{hash:016x}", head.trim_end_matches(['.', '-']))
}

/// What a node's kernel lets its agent run, measured by the agent at start and read by the
/// operator before it sends a run to the node.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct Capabilities {
    pub kernel: String,
    /// `/sys/kernel/btf/vmlinux` is present.
    pub btf: bool,
    /// `v2` (unified), `hybrid` (v1 controllers, v2 for process tracking) or `v1`.
    pub cgroup: String,
    /// Program type -> `ok` or why it does not load.
    pub programs: std::collections::BTreeMap<String, String>,
    /// Tool -> `ok` or what it is missing.
    pub tools: std::collections::BTreeMap<String, String>,
    /// Kernel mechanism -> what TOE uses of it here, or that it is absent and what stands in.
    pub features: std::collections::BTreeMap<String, String>,
}

impl Capabilities {
    /// Why `tool` cannot run here; `None` when it can, or when the agent did not say.
    #[must_use]
    pub fn missing(&self, tool: &str) -> Option<&str> {
        self.tools
            .get(tool)
            .map(String::as_str)
            .filter(|why| *why != "ok")
    }
}

/// How far one target of a run got. Operator and agents write it into `status.targets`, and
/// both read it back, so it is one type (stored as the variant's name).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
pub enum TargetPhase {
    /// Held back by `blastRadius.maxConcurrent`.
    Waiting,
    /// Released to run; its node's agent (or the operator, for image tools) starts it.
    Pending,
    Running,
    /// The run is over; its artifacts wait on the node for the object store.
    Uploading,
    Completed,
    Failed,
    Interrupted,
}

impl TargetPhase {
    /// A phase that no longer changes.
    #[must_use]
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Interrupted)
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "Waiting",
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Uploading => "Uploading",
            Self::Completed => "Completed",
            Self::Failed => "Failed",
            Self::Interrupted => "Interrupted",
        }
    }
}

impl std::fmt::Display for TargetPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A target phase that no longer changes.
#[must_use]
pub fn target_finished(phase: Option<TargetPhase>) -> bool {
    phase.is_some_and(TargetPhase::is_finished)
}

/// The run of a PowerTool generation, as it appears in artifact paths: `g<generation>-<uid[..8]>`.
/// Every node's agent computes the same name, so one run's targets share a directory.
#[must_use]
pub fn run_name(uid: &str, generation: i64) -> String {
    format!("g{generation}-{}", uid.get(..8).unwrap_or(uid))
}

impl SelectedTarget {
    /// Whether `other` names the same container of the same pod.
    #[must_use]
    pub fn same_container(&self, other: &Self) -> bool {
        (&self.namespace, &self.pod, &self.container)
            == (&other.namespace, &other.pod, &other.container)
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ProcessingOutput {
    /// One flamegraph over every target of a run, and over runs.
    MergedFlamegraph,
    /// Baseline window against the fault window, or run against run.
    DifferentialFlamegraph,
    MergedPprof,
    /// A self-contained HTML report with the findings.
    HtmlReport,
}

/// What happens to a processing's outputs once the processing is deleted.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum OutputsOnDelete {
    /// Each output is removed when it is older than `retention`, as while the processing exists.
    #[default]
    AfterRetention,
    /// Every output is removed within a minute of the deletion.
    Now,
}

/// Which PowerTools to process, how often, into what.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "toe.run",
    version = "v1alpha1",
    kind = "PowerToolProcessing",
    doc = "Scheduled processing of PowerTool results into merged profiles, HTML reports and findings.",
    namespaced,
    status = "PowerToolProcessingStatus",
    shortname = "ptp",
    category = "toe",
    printcolumn = r#"{"name":"Schedule","type":"string","jsonPath":".spec.schedule"}"#,
    printcolumn = r#"{"name":"Last run","type":"date","jsonPath":".status.lastRun"}"#,
    printcolumn = r#"{"name":"Next run","type":"date","jsonPath":".status.nextRun"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PowerToolProcessingSpec {
    /// PowerTools in this namespace to process, by label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Or by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// An interval (Go duration, at least `1m`, e.g. `15m`) or a 5-field cron expression in UTC
    /// (`0 * * * *`).
    pub schedule: String,
    /// Runs that ended within this long before each processing are included (Go duration;
    /// default 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    #[schemars(length(min = 1))]
    pub outputs: Vec<ProcessingOutput>,
    /// Processed outputs older than this are deleted (Go duration; default 168h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
    /// Where outputs are written (`<url>/_reports/<namespace>/<name>/<time>/`); absent: the
    /// operator's artifact store, where its report server lists them. `pvc` is not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputSpec>,
    /// What happens to the outputs once this processing is deleted (default `afterRetention`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs_on_delete: Option<OutputsOnDelete>,
    /// An OpenAI-compatible chat-completions endpoint for the optional model step of the
    /// root-cause analysis; absent: rules only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// The API base (`https://api.example.com/v1`) or the full `.../chat/completions` URL.
    pub url: String,
    pub model: String,
    /// A Secret in the same namespace with the API key under `apiKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// How long the model may take to answer (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600))]
    pub timeout_seconds: Option<u32>,
    /// Token budget for the whole exchange: three quarters for the (cut, redacted) prompt, the
    /// rest for the answer (default 4000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 64))]
    pub max_tokens: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PowerToolProcessingStatus {
    /// When the last processing started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<Time>,
    /// When the next one is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<Time>,
    /// URLs of the files the last processing wrote.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// URL of the last HTML report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
    /// Where this processing writes its outputs (`<store>/_reports/<namespace>/<name>/`), set
    /// by the operator; the report server serves reports from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_dir: Option<String>,
    /// What will happen to the outputs once this processing is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs_on_delete: Option<String>,
    /// Captures (one target's artifacts of one run) and runs the last processing read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<u32>,
    /// The last processing's findings, most severe first: `severity: title (rule or model)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<String>,
    /// `Ready` (the spec is valid and the last processing succeeded) and `ModelAvailable`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::capabilities_config_map;

    #[test]
    fn every_node_name_gives_a_valid_distinct_config_map_name() {
        assert_eq!(capabilities_config_map("worker-1"), "toe-node-worker-1");
        let long = |c: char| format!("{}.example.com", c.to_string().repeat(240));
        let (a, b) = (
            capabilities_config_map(&long('a')),
            capabilities_config_map(&long('b')),
        );
        let twin = format!("{}.example.org", "a".repeat(240));
        for name in [&a, &b] {
            assert!(name.len() <= 253, "{name}");
            assert!(!name.contains(".-") && !name.ends_with('-'), "{name}");
        }
        assert_ne!(a, capabilities_config_map(&twin));
        assert_eq!(a, capabilities_config_map(&long('a')), "stable");
    }
}
