//! PowerToolConfig: how an administrator enables a tool and narrows what users may ask of it.
//!
//! A config names one tool and lists the arguments users may pass, each with a rule (type, range,
//! allowed values or path prefixes, pattern, default). Anything the config does not list is
//! rejected, so enabling a tool never silently enables all its knobs. Rules only narrow the
//! built-in schema: a value must pass both. They are checked on the values the tool will
//! actually run with, defaults included, so a built-in default above an admin's cap is refused
//! rather than slipped through.

use std::{collections::BTreeMap, fmt, time::Duration};

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    args::{
        Amount, ArgKind, ArgSpec, ArgValue, ParsedArgs, format_size, parse_names, parse_signal_set,
        parse_size,
    },
    duration::{format_duration, parse_duration},
    tools::{ToolDef, find_tool},
};

pub const POWER_TOOL_CONFIG_KIND: &str = "PowerToolConfig";

/// The tool, how it runs, where and for how long it may run, and the arguments users may pass.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "toe.run",
    version = "v1alpha1",
    kind = "PowerToolConfig",
    doc = "Enables one tool cluster-wide and limits what PowerTools may ask of it.",
    shortname = "ptc",
    category = "toe",
    printcolumn = r#"{"name":"Tool","type":"string","jsonPath":".spec.tool"}"#,
    printcolumn = r#"{"name":"Engine","type":"string","jsonPath":".spec.engine"}"#,
    printcolumn = r#"{"name":"Max duration","type":"string","jsonPath":".spec.maxDuration"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PowerToolConfigSpec {
    /// The tool this config enables.
    pub tool: String,
    #[serde(default)]
    pub engine: Engine,
    /// The image of an image-based tool (engine `ephemeralContainer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Namespaces whose PowerTools may use the tool; empty: every namespace. A fault reaches
    /// `kube-system` and the operator's own namespace only when they are listed here by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_namespaces: Vec<String>,
    /// Namespaces whose PowerTools may select targets in other namespaces
    /// (`spec.targets.namespaceSelector`); empty: none. The operator enforces this itself, so
    /// it holds while the admission webhook is down; the webhook also checks that the creator
    /// may create PowerTools in every namespace selected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cross_namespace_from: Vec<String>,
    /// volume-fill may fill filesystems the node shares with every pod (a container's root
    /// filesystem, an emptyDir or hostPath on the node's disk); default false: only volumes of
    /// the target's own (a PersistentVolume, a sized tmpfs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_node_shared_filesystems: bool,
    /// memory-stress may stress targets without a memory limit, whose memory is the node's;
    /// default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_unlimited_targets: bool,
    /// At most this many targets of the tool run at once on one node (each agent holds the
    /// others back until one ends); absent: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_per_node: Option<u32>,
    /// At most this many PowerTools using the tool are admitted and unfinished at once in one
    /// namespace; absent: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_per_namespace: Option<u32>,
    /// Go duration syntax; at most the tool's built-in maximum. Absent: the built-in maximum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration: Option<String>,
    /// The arguments users may pass. An argument not listed here is rejected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arguments: Vec<ArgumentRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_resources: Option<Resources>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Engine {
    /// A built-in collector or fault run by the node agent (or by `toe run`).
    #[default]
    Agent,
    /// An image run as an ephemeral container in the target pod.
    EphemeralContainer,
}

/// Kubernetes-style resource quantities (`cpu: 500m`, `memory: 256Mi`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum RuleType {
    Integer,
    Boolean,
    Duration,
    Size,
    /// A percentage of some limit of the target (`50%`).
    Percentage,
    /// A size or a percentage.
    Amount,
    Enum,
    Path,
    String,
    Signals,
    Names,
}

/// A bound or default as written in YAML: `max: 8` and `max: "2Gi"` are both accepted (the
/// schema says int-or-string, as Kubernetes does for quantities and ports).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Scalar {
    Int(i64),
    Text(String),
}

impl JsonSchema for Scalar {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IntOrString".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "x-kubernetes-int-or-string": true })
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(v) => write!(f, "{v}"),
            Self::Text(v) => f.write_str(v),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ArgumentRule {
    /// Without the leading `--`.
    pub name: String,
    #[serde(rename = "type")]
    pub kind: RuleType,
    /// Lower bound: a number, a size, a duration or a percentage, by type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<Scalar>,
    /// Upper bound, as `min`. For `amount`, the byte bound; `maxPercent` bounds percentages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<Scalar>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_percent: Option<u32>,
    /// `enum`: the allowed values. `signals`, `names`: the allowed members.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// `path`: the path must be one of these or below one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_prefixes: Vec<String>,
    /// `string`, `names`: a regular expression each value must match as a whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// Replaces the tool's built-in default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Scalar>,
    /// Whether the argument may be given more than once (image-based tools only).
    #[serde(default)]
    pub repeated: bool,
}

/// A Kubernetes CPU quantity (`500m`, `2`, `1.5`) in millicores.
pub fn parse_cpu(q: &str) -> Result<u64, String> {
    let t = q.trim();
    let bad = || format!("\"{q}\" is not a CPU quantity (e.g. 500m, 2, 1.5)");
    if let Some(m) = t.strip_suffix('m') {
        return m.parse().map_err(|_| bad());
    }
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    if frac.len() > 3 || whole.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let frac_m: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<3}").parse().map_err(|_| bad())?
    };
    whole
        .checked_mul(1000)
        .and_then(|w| w.checked_add(frac_m))
        .ok_or_else(bad)
}

/// What `defaultResources` means for each engine and tool, checked when a config is loaded:
/// - a CPU or memory stress: `limits` cap what its workers may ask for (the workers run in the
///   target's cgroups, so they also count against the target's own limits);
/// - every other tool: refused, since nothing would honour it (collectors run in the kernel and
///   in the agent, bounded by their own arguments; fills and terminations use no CPU or memory
///   of note; Kubernetes refuses resources on ephemeral containers). `requests` are refused
///   everywhere: nothing schedules a tool's work.
fn check_resources(spec: &PowerToolConfigSpec) -> Result<(Option<u64>, Option<u64>), String> {
    let Some(r) = &spec.default_resources else {
        return Ok((None, None));
    };
    if !r.requests.is_empty() {
        return Err(
            "requests have no meaning here (nothing schedules a tool's work); use limits".into(),
        );
    }
    let stress = matches!(spec.tool.as_str(), "cpu-stress" | "memory-stress");
    if !stress && !r.limits.is_empty() {
        return Err(format!(
            "tool {} runs in the kernel and the node agent, bounded by its own arguments; no \
             limit could be applied to it (only cpu-stress and memory-stress take limits)",
            spec.tool
        ));
    }
    let mut cpu = None;
    let mut memory = None;
    for (k, v) in &r.limits {
        match (k.as_str(), spec.tool.as_str()) {
            ("cpu", "cpu-stress") => cpu = Some(parse_cpu(v)?),
            ("memory", "memory-stress") => memory = Some(parse_size(v)?),
            _ => {
                return Err(format!(
                    "limits.{k} does not apply to {} (cpu-stress takes cpu, memory-stress \
                     memory)",
                    spec.tool
                ));
            }
        }
    }
    Ok((cpu, memory))
}

/// A config that is itself wrong: which field, which rule, why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("PowerToolConfig {config}: {field}: {why}")]
pub struct ConfigError {
    pub config: String,
    pub field: String,
    pub why: String,
}

/// A bound parsed once when the config is checked.
#[derive(Clone, Debug, PartialEq)]
enum Bound {
    Int(i64),
    Bytes(u64),
    Time(Duration),
    Percent(u32),
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(v) => write!(f, "{v}"),
            Self::Bytes(v) => f.write_str(&format_size(*v)),
            Self::Time(v) => f.write_str(&format_duration(*v)),
            Self::Percent(v) => write!(f, "{v}%"),
        }
    }
}

/// One argument rule after checking: bounds parsed, pattern compiled.
#[derive(Clone, Debug)]
pub struct CheckedRule {
    pub rule: ArgumentRule,
    min: Option<Bound>,
    max: Option<Bound>,
    pattern: Option<regex::Regex>,
    /// `signals`: the allowed set as a mask.
    signal_mask: Option<u64>,
}

/// A config that passed [`check`]: safe to validate PowerTools against.
#[derive(Clone, Debug)]
pub struct CheckedConfig {
    pub name: String,
    pub spec: PowerToolConfigSpec,
    pub max_duration: Duration,
    pub rules: Vec<CheckedRule>,
    /// `defaultResources.limits` of a stress tool: (millicores, bytes).
    pub limits: (Option<u64>, Option<u64>),
}

/// Whether `kind` (a built-in argument's type) can be narrowed by a rule of type `rule`.
fn compatible(kind: &ArgKind, rule: RuleType) -> bool {
    matches!(
        (kind, rule),
        (ArgKind::Integer { .. }, RuleType::Integer)
            | (ArgKind::Bool, RuleType::Boolean)
            | (ArgKind::Duration { .. }, RuleType::Duration)
            | (ArgKind::Size { .. }, RuleType::Size)
            | (
                ArgKind::Amount { .. },
                RuleType::Amount | RuleType::Size | RuleType::Percentage
            )
            | (ArgKind::Enum(_), RuleType::Enum)
            | (ArgKind::Path { .. }, RuleType::Path)
            | (ArgKind::Signals, RuleType::Signals)
            | (ArgKind::Names { .. }, RuleType::Names)
    )
}

fn parse_percent(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let digits = t.strip_suffix('%').unwrap_or(t).trim();
    match digits.parse::<u32>() {
        Ok(v) if (1..=100).contains(&v) => Ok(v),
        _ => Err(format!("\"{text}\" is not a percentage 1%..=100%")),
    }
}

fn parse_bound(kind: RuleType, s: &Scalar) -> Result<Bound, String> {
    let text = s.to_string();
    match kind {
        RuleType::Integer => match s {
            Scalar::Int(v) => Ok(Bound::Int(*v)),
            Scalar::Text(_) => text
                .parse()
                .map(Bound::Int)
                .map_err(|_| format!("\"{text}\" is not an integer")),
        },
        RuleType::Size | RuleType::Amount => parse_size(&text).map(Bound::Bytes),
        RuleType::Duration => parse_duration(&text).map(Bound::Time),
        RuleType::Percentage => parse_percent(&text).map(Bound::Percent),
        _ => Err(format!("a {kind:?} argument takes no min or max")),
    }
}

/// The path components of `p` (no empty ones), for prefix checks that respect boundaries:
/// `/data` allows `/data/x`, never `/database`.
fn components(p: &str) -> Vec<&str> {
    p.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect()
}

fn check_rule(rule: &ArgumentRule, builtin: Option<&ArgSpec>) -> Result<CheckedRule, String> {
    if let Some(spec) = builtin {
        if !compatible(&spec.kind, rule.kind) {
            return Err(format!(
                "type {:?} does not fit the tool's argument (a {})",
                rule.kind,
                kind_name(&spec.kind)
            ));
        }
        if rule.repeated {
            return Err("built-in tools take each argument once; repeated must be false".into());
        }
        if let (ArgKind::Enum(known), RuleType::Enum) = (&spec.kind, rule.kind)
            && let Some(v) = rule.values.iter().find(|v| !known.contains(&v.as_str()))
        {
            return Err(format!(
                "value \"{v}\" is not one the tool knows ({})",
                known.join(", ")
            ));
        }
    }
    let min = rule
        .min
        .as_ref()
        .map(|s| parse_bound(rule.kind, s))
        .transpose()
        .map_err(|e| format!("min: {e}"))?;
    let mut max = rule
        .max
        .as_ref()
        .map(|s| parse_bound(rule.kind, s))
        .transpose()
        .map_err(|e| format!("max: {e}"))?;
    if rule.kind == RuleType::Percentage
        && let Some(p) = rule.max_percent
    {
        max = Some(Bound::Percent(p));
    }
    if let Some(p) = rule.max_percent
        && !(1..=100).contains(&p)
    {
        return Err(format!("maxPercent: {p} is not in 1..=100"));
    }
    if rule.max_percent.is_some() && !matches!(rule.kind, RuleType::Amount | RuleType::Percentage) {
        return Err("maxPercent applies to amount and percentage arguments only".into());
    }
    if let (Some(lo), Some(hi)) = (&min, &max)
        && bound_above(lo, hi)
    {
        return Err(format!("min {lo} is above max {hi}"));
    }
    if !rule.values.is_empty()
        && !matches!(
            rule.kind,
            RuleType::Enum | RuleType::Signals | RuleType::Names
        )
    {
        return Err("values applies to enum, signals and names arguments only".into());
    }
    if rule.kind == RuleType::Enum && rule.values.is_empty() && builtin.is_none() {
        return Err("an enum needs values".into());
    }
    if !rule.allowed_prefixes.is_empty() && rule.kind != RuleType::Path {
        return Err("allowedPrefixes applies to path arguments only".into());
    }
    for p in &rule.allowed_prefixes {
        if !p.starts_with('/') || p.split('/').any(|c| c == "..") {
            return Err(format!(
                "allowedPrefixes: \"{p}\" must be absolute, without \"..\""
            ));
        }
    }
    let pattern = match &rule.pattern {
        Some(_) if !matches!(rule.kind, RuleType::String | RuleType::Names) => {
            return Err("pattern applies to string and names arguments only".into());
        }
        // Anchored: the whole value must match, not some part of it.
        Some(p) => {
            Some(regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| format!("pattern: {e}"))?)
        }
        None => None,
    };
    let signal_mask = if rule.kind == RuleType::Signals && !rule.values.is_empty() {
        Some(parse_signal_set(&rule.values.join(",")).map_err(|e| format!("values: {e}"))?)
    } else {
        None
    };
    if rule.kind == RuleType::Names {
        for v in &rule.values {
            parse_names(v, 1, 255).map_err(|e| format!("values: {e}"))?;
        }
    }
    Ok(CheckedRule {
        rule: rule.clone(),
        min,
        max,
        pattern,
        signal_mask,
    })
}

/// `lo > hi` for bounds of one type.
fn bound_above(lo: &Bound, hi: &Bound) -> bool {
    match (lo, hi) {
        (Bound::Int(a), Bound::Int(b)) => a > b,
        (Bound::Bytes(a), Bound::Bytes(b)) => a > b,
        (Bound::Time(a), Bound::Time(b)) => a > b,
        (Bound::Percent(a), Bound::Percent(b)) => a > b,
        _ => false,
    }
}

fn kind_name(kind: &ArgKind) -> &'static str {
    match kind {
        ArgKind::Integer { .. } => "integer",
        ArgKind::Bool => "boolean",
        ArgKind::Duration { .. } => "duration",
        ArgKind::Enum(_) => "enum",
        ArgKind::Size { .. } => "size",
        ArgKind::Amount { .. } => "size or percentage",
        ArgKind::Path { .. } => "path",
        ArgKind::Signals => "signal set",
        ArgKind::Names { .. } => "list of names",
    }
}

/// Each argument rule against the tool's schema; errors as (field, why).
fn check_rules(
    spec: &PowerToolConfigSpec,
    def: Option<&ToolDef>,
) -> Result<Vec<CheckedRule>, (String, String)> {
    let mut rules = Vec::new();
    for (i, rule) in spec.arguments.iter().enumerate() {
        let field = format!("spec.arguments[{i}] ({})", rule.name);
        if spec.arguments[..i].iter().any(|r| r.name == rule.name) {
            return Err((field, "listed more than once".into()));
        }
        let builtin = match def {
            Some(d) => Some(d.args.iter().find(|a| a.name == rule.name).ok_or_else(|| {
                (
                    field.clone(),
                    format!(
                        "tool {} has no argument --{} (it has: {})",
                        d.name,
                        rule.name,
                        d.args
                            .iter()
                            .map(|a| format!("--{}", a.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?),
            None => None,
        };
        let checked = check_rule(rule, builtin).map_err(|why| (field.clone(), why))?;
        rules.push(checked);
    }
    Ok(rules)
}

/// The configs that pass [`check`], and (tool, error) for each that does not: a broken config
/// enables nothing, and whoever needed it is told why.
#[must_use]
pub fn usable(configs: &[PowerToolConfig]) -> (Vec<PowerToolConfig>, Vec<(String, String)>) {
    let mut valid = Vec::new();
    let mut broken = Vec::new();
    for c in configs {
        match check(c) {
            Ok(_) => valid.push(c.clone()),
            Err(e) => broken.push((c.spec.tool.clone(), e.to_string())),
        }
    }
    (valid, broken)
}

/// Checks a config on its own: known tool, rules that fit the tool's schema, bounds that parse,
/// defaults that pass both the schema and the rule.
pub fn check(config: &PowerToolConfig) -> Result<CheckedConfig, ConfigError> {
    let name = config
        .metadata
        .name
        .clone()
        .unwrap_or_else(|| config.spec.tool.clone());
    let err = |field: &str, why: String| ConfigError {
        config: name.clone(),
        field: field.to_owned(),
        why,
    };
    let spec = &config.spec;
    let def: Option<&ToolDef> = match spec.engine {
        Engine::Agent => Some(find_tool(&spec.tool).ok_or_else(|| {
            err(
                "spec.tool",
                format!(
                    "\"{}\" is not a built-in tool (image-based tools use engine \
                     ephemeralContainer)",
                    spec.tool
                ),
            )
        })?),
        Engine::EphemeralContainer => {
            if spec.image.as_deref().is_none_or(str::is_empty) {
                return Err(err(
                    "spec.image",
                    "an ephemeralContainer tool needs an image".into(),
                ));
            }
            if find_tool(&spec.tool).is_some() {
                return Err(err(
                    "spec.tool",
                    format!(
                        "\"{}\" is a built-in tool; an image-based tool needs its own name",
                        spec.tool
                    ),
                ));
            }
            if spec.default_resources.is_some() {
                // Said here rather than dropped later: a user would believe the limits hold.
                return Err(err(
                    "spec.defaultResources",
                    "Kubernetes refuses resources on ephemeral containers, so they cannot apply \
                     to an ephemeralContainer tool; remove them"
                        .into(),
                ));
            }
            None
        }
    };
    if spec.engine == Engine::Agent && spec.image.is_some() {
        return Err(err(
            "spec.image",
            "built-in tools run in the agent; an image applies to engine ephemeralContainer only"
                .into(),
        ));
    }
    let builtin_max = def.map_or(Duration::from_hours(24), |d| d.max_duration);
    let max_duration = match &spec.max_duration {
        None => builtin_max,
        Some(t) => {
            let d = parse_duration(t).map_err(|e| err("spec.maxDuration", e))?;
            if d.is_zero() || d > builtin_max {
                return Err(err(
                    "spec.maxDuration",
                    format!(
                        "{t} must be in (0s, {}] (the tool's own maximum)",
                        format_duration(builtin_max)
                    ),
                ));
            }
            d
        }
    };
    let rules = check_rules(spec, def).map_err(|(field, why)| err(&field, why))?;
    let limits = if spec.engine == Engine::Agent {
        check_resources(spec).map_err(|e| err("spec.defaultResources", e))?
    } else {
        (None, None)
    };
    let checked = CheckedConfig {
        name: name.clone(),
        spec: spec.clone(),
        max_duration,
        rules,
        limits,
    };
    if def.is_none() {
        for r in &checked.rules {
            super::image::check_default(r)
                .map_err(|e| err("spec.arguments", format!("default: {e}")))?;
        }
    }
    // Defaults, the config's or the tool's, must themselves pass: a PowerTool without arguments
    // has to be admissible.
    if let Some(d) = def {
        let parsed = super::args::parse_with_defaults(d.args, &[], &checked.defaults())
            .map_err(|e| err("spec.arguments", format!("default: {e}")))?;
        checked
            .admits(&parsed)
            .map_err(|e| err("spec.arguments", format!("default: {e}")))?;
    }
    Ok(checked)
}

impl CheckedConfig {
    /// The config's defaults, replacing the tool's.
    #[must_use]
    pub fn defaults(&self) -> BTreeMap<String, String> {
        self.rules
            .iter()
            .filter_map(|r| {
                r.rule
                    .default
                    .as_ref()
                    .map(|d| (r.rule.name.clone(), d.to_string()))
            })
            .collect()
    }

    #[must_use]
    pub fn allows_namespace(&self, namespace: &str) -> bool {
        self.spec.allowed_namespaces.is_empty() || self.names_namespace(namespace)
    }

    /// The admin listed `namespace` by name (an empty list names none).
    #[must_use]
    pub fn names_namespace(&self, namespace: &str) -> bool {
        self.spec.allowed_namespaces.iter().any(|n| n == namespace)
    }

    /// PowerTools of `namespace` may select targets in other namespaces.
    #[must_use]
    pub fn allows_cross_namespace_from(&self, namespace: &str) -> bool {
        self.spec
            .cross_namespace_from
            .iter()
            .any(|n| n == namespace)
    }

    #[must_use]
    pub fn rule(&self, name: &str) -> Option<&CheckedRule> {
        self.rules.iter().find(|r| r.rule.name == name)
    }

    /// Every argument a user passed must be listed in the config.
    pub fn allows_arguments(&self, args: &[String]) -> Result<(), String> {
        for arg in args {
            let Some(body) = arg.strip_prefix("--") else {
                // The schema parser reports what is wrong with it.
                continue;
            };
            let name = body.split_once('=').map_or(body, |(n, _)| n);
            if self.rule(name).is_none() {
                let allowed: Vec<String> = self
                    .rules
                    .iter()
                    .map(|r| format!("--{}", r.rule.name))
                    .collect();
                return Err(format!(
                    "--{name} is not allowed by PowerToolConfig {} (allowed: {})",
                    self.name,
                    if allowed.is_empty() {
                        "none".to_owned()
                    } else {
                        allowed.join(", ")
                    }
                ));
            }
        }
        Ok(())
    }

    /// Every value the tool will run with passes its rule.
    pub fn admits(&self, parsed: &ParsedArgs) -> Result<(), String> {
        for r in &self.rules {
            if let Some(v) = parsed.get(&r.rule.name) {
                r.admits(v).map_err(|why| {
                    format!(
                        "--{}: {why} (rule of PowerToolConfig {})",
                        r.rule.name, self.name
                    )
                })?;
            }
        }
        Ok(())
    }
}

impl CheckedRule {
    fn range(&self, v: &Bound, shown: &str) -> Result<(), String> {
        if let Some(lo) = &self.min
            && bound_above(lo, v)
        {
            return Err(format!("{shown} is below the minimum {lo}"));
        }
        if let Some(hi) = &self.max
            && bound_above(v, hi)
        {
            return Err(format!("{shown} is above the maximum {hi}"));
        }
        Ok(())
    }

    /// Whether `value` passes this rule.
    pub fn admits(&self, value: &ArgValue) -> Result<(), String> {
        let rule = &self.rule;
        match value {
            ArgValue::Integer(v) => self.range(&Bound::Int(*v), &v.to_string()),
            ArgValue::Duration(d) => self.range(&Bound::Time(*d), &format_duration(*d)),
            ArgValue::Size(b) => self.range(&Bound::Bytes(*b), &format_size(*b)),
            ArgValue::Amount(Amount::Bytes(b)) => {
                if rule.kind == RuleType::Percentage {
                    return Err(format!(
                        "{} given; only a percentage is allowed",
                        format_size(*b)
                    ));
                }
                self.range(&Bound::Bytes(*b), &format_size(*b))
            }
            ArgValue::Amount(Amount::Percent(p)) => {
                if rule.kind == RuleType::Size {
                    return Err(format!("{p}% given; only a size is allowed"));
                }
                if rule.kind == RuleType::Percentage {
                    return self.range(&Bound::Percent(*p), &format!("{p}%"));
                }
                match rule.max_percent {
                    Some(m) if *p > m => Err(format!("{p}% is above the maximum {m}%")),
                    _ => Ok(()),
                }
            }
            ArgValue::Enum(v) => {
                if rule.values.is_empty() || rule.values.iter().any(|a| a == v) {
                    Ok(())
                } else {
                    Err(format!(
                        "\"{v}\" is not allowed (allowed: {})",
                        rule.values.join(", ")
                    ))
                }
            }
            ArgValue::Path(p) => {
                if rule.allowed_prefixes.is_empty()
                    || rule.allowed_prefixes.iter().any(|pre| {
                        let pre = components(pre);
                        components(p).starts_with(&pre)
                    })
                {
                    Ok(())
                } else {
                    Err(format!(
                        "{p} is outside the allowed prefixes {}",
                        rule.allowed_prefixes.join(", ")
                    ))
                }
            }
            ArgValue::Signals(mask) => match self.signal_mask {
                Some(allowed) if mask & !allowed != 0 => Err(format!(
                    "signals outside the allowed set {} requested",
                    rule.values.join(",")
                )),
                _ => Ok(()),
            },
            ArgValue::Names(names) => {
                for n in names {
                    if let Some(max) = rule.max_length
                        && n.len() > max
                    {
                        return Err(format!("\"{n}\" is longer than {max} bytes"));
                    }
                    if let Some(re) = &self.pattern
                        && !re.is_match(n)
                    {
                        return Err(format!(
                            "\"{n}\" does not match the pattern {}",
                            rule.pattern.as_deref().unwrap_or_default()
                        ));
                    }
                    if !rule.values.is_empty() && !rule.values.contains(n) {
                        return Err(format!(
                            "\"{n}\" is not allowed (allowed: {})",
                            rule.values.join(", ")
                        ));
                    }
                }
                Ok(())
            }
            ArgValue::Bool(_) => Ok(()),
        }
    }
}

/// Several configs, e.g. every document of a config file, checked. One per tool.
#[derive(Clone, Debug, Default)]
pub struct Configs(Vec<CheckedConfig>);

impl Configs {
    /// # Errors
    /// A config that fails [`check`], or two configs for one tool.
    pub fn new(configs: &[PowerToolConfig]) -> Result<Self, ConfigError> {
        let mut out: Vec<CheckedConfig> = Vec::new();
        for c in configs {
            let checked = check(c)?;
            if let Some(other) = out.iter().find(|o| o.spec.tool == checked.spec.tool) {
                return Err(ConfigError {
                    config: checked.name.clone(),
                    field: "spec.tool".into(),
                    why: format!(
                        "{} is already configured by PowerToolConfig {}",
                        checked.spec.tool, other.name
                    ),
                });
            }
            out.push(checked);
        }
        Ok(Self(out))
    }

    #[must_use]
    pub fn for_tool(&self, tool: &str) -> Option<&CheckedConfig> {
        self.0.iter().find(|c| c.spec.tool == tool)
    }

    #[must_use]
    pub fn tools(&self) -> Vec<&str> {
        self.0.iter().map(|c| c.spec.tool.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{super::*, *};

    fn configs(yaml: &str) -> Result<Configs, ConfigError> {
        let docs: Vec<PowerToolConfig> = serde_yaml::Deserializer::from_str(yaml)
            .map(|d| PowerToolConfig::deserialize(d).unwrap())
            .collect();
        Configs::new(&docs)
    }

    fn config_doc(name: &str, body: &str) -> String {
        format!(
            "apiVersion: toe.run/v1alpha1\nkind: PowerToolConfig\nmetadata: {{name: {name}}}\nspec:\n{body}"
        )
    }

    const STRESS: &str = "  tool: memory-stress\n  maxDuration: 5m\n  allowedNamespaces: [shop]\n  arguments:\n    - {name: size, type: amount, max: 1Gi, maxPercent: 80, default: 50%}\n";

    fn run(tool_yaml: &str, cfg: &Configs, ns: Option<&str>) -> Result<ValidatedRun, SpecError> {
        let t: PowerTool = serde_yaml::from_str(&format!(
            "apiVersion: toe.run/v1alpha1\nkind: PowerTool\nmetadata: {{name: t}}\nspec:\n{tool_yaml}"
        ))
        .unwrap();
        validate(
            &t,
            Policy::Configs {
                configs: cfg,
                namespace: ns,
            },
        )
    }

    #[test]
    fn caps_narrow_the_builtin_schema() {
        let cfg = configs(&config_doc("mem", STRESS)).unwrap();
        let ok = run(
            "  tool: {name: memory-stress, commandLineArguments: [--size=512Mi]}\n",
            &cfg,
            Some("shop"),
        )
        .unwrap();
        assert_eq!(
            ok.tool.options,
            ToolOptions::MemoryStress(MemoryStressOptions {
                size: Amount::Bytes(512 << 20),
                ramp: Duration::ZERO,
                limit_bytes: None,
                // A config allows unlimited targets only when it says so.
                allow_unlimited: false,
            })
        );
        // The config's default replaces the tool's.
        let d = run("  tool: {name: memory-stress}\n", &cfg, None).unwrap();
        let ToolOptions::MemoryStress(o) = d.tool.options else {
            panic!("memory stress")
        };
        assert_eq!(o.size, Amount::Percent(50));
        for (tool, want) in [
            (
                "  tool: {name: memory-stress, commandLineArguments: [--size=2Gi]}\n",
                "--size: 2GiB is above the maximum 1GiB (rule of PowerToolConfig mem)",
            ),
            (
                "  tool: {name: memory-stress, commandLineArguments: [--size=90%]}\n",
                "--size: 90% is above the maximum 80%",
            ),
            (
                "  tool: {name: memory-stress, commandLineArguments: [--ramp=10s]}\n",
                "--ramp is not allowed by PowerToolConfig mem (allowed: --size)",
            ),
            (
                "  tool: {name: memory-stress, duration: 10m}\n",
                "10m0s exceeds the maximum of 5m0s for PowerToolConfig mem",
            ),
            (
                "  tool: {name: cpu-stress}\n",
                "tool cpu-stress is not enabled here (no PowerToolConfig for it; enabled: memory-stress)",
            ),
        ] {
            let e = run(tool, &cfg, Some("shop")).unwrap_err().to_string();
            assert!(e.contains(want), "{tool}: {e}");
        }
        let e = run("  tool: {name: memory-stress}\n", &cfg, Some("kube-system"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not allow tool memory-stress in namespace kube-system"),
            "{e}"
        );
    }

    #[test]
    fn paths_enums_names_and_signals() {
        let cfg = configs(&[
            config_doc("fill", "  tool: volume-fill\n  arguments:\n    - {name: path, type: path, allowedPrefixes: [/data], default: /data}\n    - {name: fill, type: percentage, max: 90%}\n"),
            config_doc("term", "  tool: terminate\n  arguments:\n    - {name: match, type: names, pattern: '[a-z]+', maxLength: 8}\n"),
            config_doc("sig", "  tool: signal-trace\n  arguments:\n    - {name: signals, type: signals, values: [TERM, KILL], default: 'TERM,KILL'}\n"),
            config_doc("mem", "  tool: memory-profile\n  arguments:\n    - {name: mode, type: enum, values: [sampled, growth]}\n"),
        ].join("---\n"))
        .unwrap();
        let ok = [
            "  tool: {name: volume-fill, commandLineArguments: [--path=/data/cache, --fill=80%]}\n",
            "  tool: {name: volume-fill, commandLineArguments: [--path=/data]}\n",
            "  tool: {name: terminate, commandLineArguments: [--match=nginx]}\n",
            "  tool: {name: signal-trace, commandLineArguments: [--signals=TERM]}\n",
            "  tool: {name: memory-profile, commandLineArguments: [--mode=growth]}\n",
        ];
        for t in ok {
            run(t, &cfg, None).unwrap_or_else(|e| panic!("{t}: {e}"));
        }
        for (tool, want) in [
            (
                "  tool: {name: volume-fill, commandLineArguments: [--path=/database]}\n",
                "outside the allowed prefixes /data",
            ),
            (
                "  tool: {name: volume-fill, commandLineArguments: [--path=/etc]}\n",
                "outside the allowed prefixes",
            ),
            (
                "  tool: {name: volume-fill, commandLineArguments: [--path=/data/../etc]}\n",
                "\"..\" is not allowed",
            ),
            (
                "  tool: {name: volume-fill, commandLineArguments: [--fill=1Gi]}\n",
                "only a percentage is allowed",
            ),
            (
                "  tool: {name: terminate, commandLineArguments: [--match=nginx2]}\n",
                "does not match the pattern [a-z]+",
            ),
            (
                "  tool: {name: terminate, commandLineArguments: [--match=abcdefghij]}\n",
                "longer than 8 bytes",
            ),
            (
                "  tool: {name: terminate, commandLineArguments: [\"--match=a;b\"]}\n",
                "names may use letters",
            ),
            (
                "  tool: {name: signal-trace, commandLineArguments: [--signals=all]}\n",
                "outside the allowed set TERM,KILL",
            ),
            (
                "  tool: {name: memory-profile, commandLineArguments: [--mode=exact]}\n",
                "\"exact\" is not allowed (allowed: sampled, growth)",
            ),
        ] {
            let e = run(tool, &cfg, None).unwrap_err().to_string();
            assert!(e.contains(want), "{tool}: {e}");
        }
    }

    #[test]
    fn bad_configs_are_refused_with_the_field() {
        for (body, want) in [
            (
                "  tool: cpu-profiler\n",
                "spec.tool: \"cpu-profiler\" is not a built-in tool",
            ),
            (
                "  tool: cpu-stress\n  maxDuration: 2h\n",
                "spec.maxDuration: 2h must be in (0s, 1h0m0s]",
            ),
            (
                "  tool: cpu-stress\n  arguments:\n    - {name: cores, type: integer}\n",
                "spec.arguments[0] (cores): tool cpu-stress has no argument --cores",
            ),
            (
                "  tool: cpu-stress\n  arguments:\n    - {name: workers, type: size}\n",
                "type Size does not fit the tool's argument (a integer)",
            ),
            (
                "  tool: cpu-stress\n  arguments:\n    - {name: workers, type: integer, min: 4, max: 2}\n",
                "min 4 is above max 2",
            ),
            (
                "  tool: cpu-stress\n  arguments:\n    - {name: workers, type: integer}\n    - {name: workers, type: integer}\n",
                "listed more than once",
            ),
            // The tool's default of 90% is above the admin's cap and the config gives none.
            (
                "  tool: volume-fill\n  arguments:\n    - {name: fill, type: percentage, max: 50%}\n",
                "spec.arguments: default: --fill: 90% is above the maximum 50%",
            ),
            (
                "  tool: memory-profile\n  arguments:\n    - {name: mode, type: enum, values: [fast]}\n",
                "value \"fast\" is not one the tool knows",
            ),
            (
                "  tool: terminate\n  arguments:\n    - {name: match, type: names, pattern: '(['}\n",
                "pattern:",
            ),
            (
                "  tool: aperf\n  engine: ephemeralContainer\n",
                "spec.image: an ephemeralContainer tool needs an image",
            ),
            (
                "  tool: cpu-profile\n  image: x\n",
                "an image applies to engine ephemeralContainer only",
            ),
        ] {
            let e = configs(&config_doc("c", body)).unwrap_err().to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
        let two = [
            config_doc("a", "  tool: cpu-stress\n"),
            config_doc("b", "  tool: cpu-stress\n"),
        ]
        .join("---\n");
        let e = configs(&two).unwrap_err().to_string();
        assert!(e.contains("already configured by PowerToolConfig a"), "{e}");
    }

    #[test]
    fn an_admin_can_forbid_asking_a_jvm_for_its_perf_map() {
        use crate::api::JitNames;
        let body = |tool: &str, default: &str| {
            format!(
                "  tool: {tool}\n  arguments:\n    - {{name: jit-names, type: enum, values: [read, \
                 ignore]{default}}}\n"
            )
        };
        let cfg = configs(
            &[
                "cpu-profile",
                "offcpu-profile",
                "memory-profile",
                "signal-trace",
            ]
            .map(|t| config_doc(t, &body(t, ", default: read")))
            .join("---\n"),
        )
        .unwrap();
        for tool in [
            "cpu-profile",
            "offcpu-profile",
            "memory-profile",
            "signal-trace",
        ] {
            let jit = |args: &str| {
                run(
                    &format!("  tool: {{name: {tool}, commandLineArguments: [{args}]}}\n"),
                    &cfg,
                    None,
                )
                .map(|r| r.tool.options.jit_names())
            };
            assert_eq!(jit(""), Ok(Some(JitNames::Read)), "{tool}");
            assert_eq!(
                jit("--jit-names=ignore"),
                Ok(Some(JitNames::Ignore)),
                "{tool}"
            );
            let e = jit("--jit-names=ask").unwrap_err().to_string();
            assert!(
                e.contains("--jit-names") && e.contains("ask"),
                "{tool}: {e}"
            );
        }
        // Without a default of its own, the built-in `ask` is not allowed: said at once.
        let e = configs(&config_doc("c", &body("cpu-profile", "")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("jit-names"), "{e}");
        // Without a config, asking is the default, and tools without user stacks have none.
        assert_eq!(
            default_options("cpu-profile").and_then(|o| o.jit_names()),
            Some(JitNames::Ask)
        );
        assert_eq!(
            default_options("cpu-stress").and_then(|o| o.jit_names()),
            None
        );
    }

    #[test]
    fn image_tools_get_typed_arguments_and_a_plain_argv() {
        let cfg = configs(&config_doc(
            "aperf",
            "  tool: aperf\n  engine: ephemeralContainer\n  image: registry.example/aperf:1.2\n  maxDuration: 10m\n  arguments:\n    - {name: interval, type: integer, min: 1, max: 60, default: 1}\n    - {name: profile, type: boolean}\n    - {name: out, type: path, allowedPrefixes: [/tmp]}\n    - {name: tag, type: string, maxLength: 8, repeated: true}\n    - {name: mode, type: enum, values: [cpu, all]}\n",
        ))
        .unwrap();
        let v = run(
            "  tool: {name: aperf, duration: 2m, commandLineArguments: [--profile, --out, /tmp/x, --tag=a, --tag=b, --mode=cpu]}\n",
            &cfg,
            None,
        )
        .unwrap();
        assert_eq!(v.tool.duration, Duration::from_mins(2));
        assert_eq!(
            v.tool.options,
            ToolOptions::Image(ImageOptions {
                image: "registry.example/aperf:1.2".into(),
                argv: [
                    "--profile=true",
                    "--out=/tmp/x",
                    "--tag=a",
                    "--tag=b",
                    "--mode=cpu",
                    "--interval=1"
                ]
                .map(String::from)
                .to_vec(),
            })
        );
        for (args, want) in [
            ("[--interval=99]", "--interval: 99 is above the maximum 60"),
            ("[--out=/etc/passwd]", "outside the allowed prefixes /tmp"),
            ("[\"--out=/tmp/a;b\"]", "only letters, digits"),
            (
                "[\"--tag=$(id)\"]",
                "only letters, digits and ._-:@+=, are allowed",
            ),
            ("[--tag=toolongtag]", "longer than 8 bytes"),
            ("[--mode=gpu]", "\"gpu\" is not one of cpu, all"),
            (
                "[--interval=1, --interval=2]",
                "--interval: given more than once",
            ),
            (
                "[--shell=sh]",
                "--shell is not allowed by PowerToolConfig aperf",
            ),
            ("[rm]", "\"rm\" is not an argument"),
        ] {
            let e = run(
                &format!("  tool: {{name: aperf, commandLineArguments: {args}}}\n"),
                &cfg,
                None,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{args}: {e}");
        }
        for (body, want) in [
            (
                "  tool: cpu-profile\n  engine: ephemeralContainer\n  image: x\n",
                "is a built-in tool",
            ),
            (
                "  tool: aperf\n  engine: ephemeralContainer\n  image: x\n  defaultResources: {limits: {cpu: 500m}}\n",
                "Kubernetes refuses resources on ephemeral containers",
            ),
            (
                "  tool: aperf\n  engine: ephemeralContainer\n  image: x\n  arguments:\n    - {name: n, type: integer, max: 5, default: 9}\n",
                "default: 9 is above the maximum 5",
            ),
        ] {
            let e = configs(&config_doc("c", body)).unwrap_err().to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn resource_limits_cap_stress_and_are_refused_where_nothing_would_honour_them() {
        assert_eq!(parse_cpu("500m"), Ok(500));
        assert_eq!(parse_cpu("2"), Ok(2000));
        assert_eq!(parse_cpu("1.5"), Ok(1500));
        assert_eq!(parse_cpu(".25"), Ok(250));
        assert!(parse_cpu("1.2345").is_err() && parse_cpu("lots").is_err());
        let cfg = configs(&config_doc(
            "cpu",
            "  tool: cpu-stress\n  defaultResources: {limits: {cpu: 750m}}\n  arguments:\n    - {name: workers, type: integer}\n",
        ))
        .unwrap();
        let v = run(
            "  tool: {name: cpu-stress, commandLineArguments: [--workers=2]}\n",
            &cfg,
            None,
        )
        .unwrap();
        let ToolOptions::CpuStress(o) = v.tool.options else {
            panic!("cpu stress")
        };
        assert_eq!(o.limit_millicores, Some(750));
        for (body, want) in [
            (
                "  tool: cpu-profile\n  defaultResources: {limits: {cpu: 500m}}\n",
                "tool cpu-profile runs in the kernel and the node agent",
            ),
            (
                "  tool: cpu-stress\n  defaultResources: {requests: {cpu: 500m}}\n",
                "requests have no meaning here",
            ),
            (
                "  tool: cpu-stress\n  defaultResources: {limits: {memory: 1Gi}}\n",
                "limits.memory does not apply to cpu-stress",
            ),
            (
                "  tool: memory-stress\n  defaultResources: {limits: {memory: lots}}\n",
                "\"lots\" is not a size",
            ),
        ] {
            let e = configs(&config_doc("c", body)).unwrap_err().to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn alongside_shares_the_window_and_allows_one_fault() {
        let t = |yaml: &str| -> Result<ValidatedRun, SpecError> {
            let t: PowerTool = serde_yaml::from_str(&format!(
                "apiVersion: toe.run/v1alpha1\nkind: PowerTool\nmetadata: {{}}\nspec:\n{yaml}"
            ))
            .unwrap();
            validate(&t, Policy::Builtin)
        };
        let v = t("  tool: {name: memory-stress, duration: 20s}\n  alongside: [{name: cpu-profile}, {name: signal-trace}]\n").unwrap();
        assert_eq!(v.alongside.len(), 2);
        assert!(
            v.alongside
                .iter()
                .all(|a| a.duration == Duration::from_secs(20))
        );
        for (yaml, want) in [
            (
                "  tool: {name: memory-stress}\n  alongside: [{name: cpu-stress}]\n",
                "at most one fault per PowerTool (memory-stress, cpu-stress given)",
            ),
            (
                "  tool: {name: cpu-profile}\n  alongside: [{name: cpu-profile}]\n",
                "cpu-profile appears twice",
            ),
            (
                "  tool: {name: cpu-stress}\n  alongside: [{name: cpu-profile, duration: 5s}]\n",
                "spec.alongside[0].duration: a tool alongside runs for the whole run",
            ),
            (
                "  tool: {name: cpu-stress}\n  alongside: [{name: cpu-profile, commandLineArguments: [--frequency=0]}]\n",
                "spec.alongside[0].commandLineArguments: --frequency: 0 is out of range",
            ),
        ] {
            let e = t(yaml).unwrap_err().to_string();
            assert!(e.contains(want), "{yaml}: {e}");
        }
    }
}
