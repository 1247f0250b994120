//! PowerTool and friends, exactly as the cluster stores them, plus the pure validation that turns
//! a spec into typed tool options. Local mode and the node agent both go through [`validate`].

mod args;
mod config;
mod duration;
mod image;
pub mod rbac;
mod resources;
mod tools;

use std::time::Duration;

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub use self::{
    args::{Amount, ArgKind, ArgSpec, ArgValue, ParsedArgs, format_size, parse_size},
    config::{
        ArgumentRule, CheckedConfig, ConfigError, Configs, Engine, POWER_TOOL_CONFIG_KIND,
        PowerToolConfig, PowerToolConfigSpec, Resources, RuleType, Scalar, check as check_config,
        parse_cpu, usable as usable_configs,
    },
    duration::{format_duration, parse_duration},
    resources::{
        BlastRadius, BlastRadiusMode, CAPABILITIES_KEY, CAPABILITIES_NODE_KEY, Capabilities,
        ModelSpec, OutputSpec, OutputsOnDelete, PowerTool, PowerToolPhase, PowerToolProcessing,
        PowerToolProcessingSpec, PowerToolProcessingStatus, PowerToolSpec, PowerToolStatus,
        ProcessingOutput, SelectedTarget, TargetPhase, Targets, ToolSpec, TypeMeta,
        capabilities_config_map, run_name, target_finished,
    },
    tools::{
        AllocationMode, CpuProfileOptions, CpuStressOptions, ImageOptions, JitNames,
        MemoryProfileOptions, MemoryStressOptions, OffcpuProfileOptions, SignalTraceOptions,
        TerminateOptions, ToolKind, ToolOptions, VolumeFillOptions, catalogue, default_options,
        find_tool,
    },
};

pub const GROUP: &str = "toe.run";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "toe.run/v1alpha1";
pub const POWER_TOOL_KIND: &str = "PowerTool";

/// Why a PowerTool cannot run. Each variant names the field and the rule it broke.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("apiVersion: expected \"{API_VERSION}\", got \"{0}\"")]
    ApiVersion(String),
    #[error("kind: expected \"{want}\", got \"{got}\"")]
    Kind { want: String, got: String },
    #[error("{field}.name: unknown tool \"{name}\" (known tools: {known})")]
    UnknownTool {
        field: String,
        name: String,
        known: String,
    },
    #[error("{field}.duration: {why}")]
    Duration { field: String, why: String },
    #[error("{field}.commandLineArguments: {why}")]
    Argument { field: String, why: String },
    #[error(
        "{field}.name: tool {tool} is not enabled here (no PowerToolConfig for it; enabled: {enabled})"
    )]
    NotEnabled {
        field: String,
        tool: String,
        enabled: String,
    },
    #[error(
        "metadata.namespace: PowerToolConfig {config} does not allow tool {tool} in namespace {namespace}"
    )]
    Namespace {
        config: String,
        tool: String,
        namespace: String,
    },
    #[error("spec.alongside: {0}")]
    Alongside(String),
}

/// A PowerTool that passed validation: what to run, for how long, with which typed options.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedTool {
    pub name: String,
    pub duration: Duration,
    pub options: ToolOptions,
    /// The arguments it runs with, defaults included, as `--name=value` (for people).
    pub arguments: Vec<String>,
}

/// A whole PowerTool that passed validation.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedRun {
    pub tool: ValidatedTool,
    /// `spec.alongside`, each with the run's duration.
    pub alongside: Vec<ValidatedTool>,
}

/// What a PowerTool is checked against.
#[derive(Clone, Copy, Debug)]
pub enum Policy<'a> {
    /// The built-in catalogue only: every tool, every argument within the tool's own bounds
    /// (local mode without a config file: the machine's owner is the administrator).
    Builtin,
    /// Only tools these configs enable, only the arguments they list, within their caps.
    Configs {
        configs: &'a Configs,
        /// The PowerTool's namespace, checked against each config's allowed namespaces.
        namespace: Option<&'a str>,
    },
}

/// Checks an image-based tool of a PowerTool against its config.
fn validate_image(
    spec: &ToolSpec,
    field: &str,
    c: &CheckedConfig,
    namespace: Option<&str>,
    run_duration: Option<Duration>,
) -> Result<ValidatedTool, SpecError> {
    if let Some(ns) = namespace
        && !c.allows_namespace(ns)
    {
        return Err(SpecError::Namespace {
            config: c.name.clone(),
            tool: spec.name.clone(),
            namespace: ns.to_owned(),
        });
    }
    image::validate(spec, c, run_duration).map_err(|(is_duration, why)| {
        if is_duration {
            SpecError::Duration {
                field: field.to_owned(),
                why,
            }
        } else {
            SpecError::Argument {
                field: field.to_owned(),
                why,
            }
        }
    })
}

/// Checks one tool of a PowerTool (`field` names it in messages). `run_duration`: the duration
/// an `alongside` tool inherits.
/// The config's limits and allowances travel with the options into planning, which refuses a
/// fault that would ask for more.
fn apply_config(options: &mut ToolOptions, c: &CheckedConfig) {
    match options {
        ToolOptions::CpuStress(o) => o.limit_millicores = c.limits.0,
        ToolOptions::MemoryStress(o) => {
            o.limit_bytes = c.limits.1;
            o.allow_unlimited = c.spec.allow_unlimited_targets;
        }
        ToolOptions::VolumeFill(o) => {
            o.allow_node_shared = c.spec.allow_node_shared_filesystems;
        }
        _ => {}
    }
}

fn validate_tool(
    spec: &ToolSpec,
    field: &str,
    policy: Policy<'_>,
    run_duration: Option<Duration>,
) -> Result<ValidatedTool, SpecError> {
    if let Policy::Configs { configs, namespace } = policy
        && let Some(c) = configs.for_tool(&spec.name)
        && c.spec.engine == Engine::EphemeralContainer
    {
        return validate_image(spec, field, c, namespace, run_duration);
    }
    let def = find_tool(&spec.name).ok_or_else(|| SpecError::UnknownTool {
        field: field.to_owned(),
        name: spec.name.clone(),
        known: catalogue()
            .iter()
            .map(|t| t.name)
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    let config = match policy {
        Policy::Builtin => None,
        Policy::Configs { configs, namespace } => {
            let c = configs
                .for_tool(def.name)
                .ok_or_else(|| SpecError::NotEnabled {
                    field: field.to_owned(),
                    tool: def.name.to_owned(),
                    enabled: match configs.tools() {
                        t if t.is_empty() => "none".to_owned(),
                        t => t.join(", "),
                    },
                })?;
            if let Some(ns) = namespace
                && !c.allows_namespace(ns)
            {
                return Err(SpecError::Namespace {
                    config: c.name.clone(),
                    tool: def.name.to_owned(),
                    namespace: ns.to_owned(),
                });
            }
            Some(c)
        }
    };
    let duration_err = |why: String| SpecError::Duration {
        field: field.to_owned(),
        why,
    };
    let duration = match (&spec.duration, run_duration) {
        (Some(_), Some(_)) => {
            return Err(duration_err(
                "a tool alongside runs for the whole run (spec.tool.duration); remove this".into(),
            ));
        }
        (None, Some(d)) => d,
        (None, None) => def.default_duration,
        (Some(text), None) => parse_duration(text).map_err(duration_err)?,
    };
    if duration.is_zero() {
        return Err(duration_err("must be greater than 0s".into()));
    }
    let (max, whose) = match config {
        Some(c) => (c.max_duration, format!("PowerToolConfig {}", c.name)),
        None => (def.max_duration, format!("tool {}", def.name)),
    };
    if duration > max {
        return Err(duration_err(format!(
            "{} exceeds the maximum of {} for {whose}",
            format_duration(duration),
            format_duration(max),
        )));
    }
    let arg_err = |why: String| SpecError::Argument {
        field: field.to_owned(),
        why,
    };
    if let Some(c) = config {
        c.allows_arguments(&spec.command_line_arguments)
            .map_err(arg_err)?;
    }
    let defaults = config.map(CheckedConfig::defaults).unwrap_or_default();
    let parsed = args::parse_with_defaults(def.args, &spec.command_line_arguments, &defaults)
        .map_err(|e| arg_err(e.to_string()))?;
    if let Some(c) = config {
        c.admits(&parsed).map_err(arg_err)?;
    }
    let mut options = (def.build)(&parsed);
    options.check().map_err(arg_err)?;
    if let Some(c) = config {
        apply_config(&mut options, c);
    }
    Ok(ValidatedTool {
        name: def.name.to_owned(),
        duration,
        options,
        arguments: parsed.describe(),
    })
}

/// A document's `apiVersion` and `kind` are those of `kind` in TOE's API group. (The typed
/// resources do not keep them, so files are checked before they are parsed into one.)
pub fn check_type(meta: &TypeMeta, kind: &str) -> Result<(), SpecError> {
    if meta.api_version != API_VERSION {
        return Err(SpecError::ApiVersion(meta.api_version.clone()));
    }
    if meta.kind != kind {
        return Err(SpecError::Kind {
            want: kind.to_owned(),
            got: meta.kind.clone(),
        });
    }
    Ok(())
}

/// Checks a PowerTool: known tools, durations within bounds, every argument known, typed and in
/// range; under [`Policy::Configs`] also enabled, allowed in the namespace, and within the caps.
pub fn validate(tool: &PowerTool, policy: Policy<'_>) -> Result<ValidatedRun, SpecError> {
    let primary = validate_tool(&tool.spec.tool, "spec.tool", policy, None)?;
    let mut alongside: Vec<ValidatedTool> = Vec::new();
    for (i, spec) in tool.spec.alongside.iter().enumerate() {
        let v = validate_tool(
            spec,
            &format!("spec.alongside[{i}]"),
            policy,
            Some(primary.duration),
        )?;
        if v.name == primary.name || alongside.iter().any(|a| a.name == v.name) {
            return Err(SpecError::Alongside(format!(
                "{} appears twice; one PowerTool runs each tool once",
                v.name
            )));
        }
        alongside.push(v);
    }
    let all = || std::iter::once(&primary).chain(&alongside);
    if all().any(|t| matches!(t.options, ToolOptions::OffcpuProfile(o) if o.wall))
        && all().any(|t| matches!(t.options, ToolOptions::CpuProfile(_)))
    {
        return Err(SpecError::Alongside(
            "offcpu-profile --wall=true samples on-CPU stacks itself, with the one CPU sampler \
             cpu-profile needs: drop cpu-profile (the wall profile holds its samples) or set \
             --wall=false"
                .into(),
        ));
    }
    let faults: Vec<&str> = std::iter::once(&primary)
        .chain(&alongside)
        .filter(|t| t.options.is_fault())
        .map(|t| t.name.as_str())
        .collect();
    if faults.len() > 1 {
        return Err(SpecError::Alongside(format!(
            "at most one fault per PowerTool ({} given): their effects could not be told apart",
            faults.join(", ")
        )));
    }
    Ok(ValidatedRun {
        tool: primary,
        alongside,
    })
}

/// Namespaces no fault reaches unless a PowerToolConfig of the fault names them in
/// `allowedNamespaces`: the control plane's and the operator's own (where TOE itself runs).
#[must_use]
pub fn protected_namespaces(release_namespace: &str) -> Vec<String> {
    let mut v = vec!["kube-system".to_owned()];
    if release_namespace != "kube-system" {
        v.push(release_namespace.to_owned());
    }
    v
}

/// Every targeted namespace must be allowed by the config of every tool of the run; selecting
/// other namespaces at all must be allowed for the PowerTool's own namespace; and a fault
/// reaches a `protected` namespace only where its config names it. Pure: the controller applies
/// it to every PowerTool, so it holds with the webhook down or absent.
pub fn namespaces_allowed(
    pt: &PowerTool,
    configs: &[PowerToolConfig],
    namespaces: &[String],
    protected: &[String],
) -> Result<(), String> {
    let Ok(checked) = Configs::new(configs) else {
        // Admission already refused a broken set of configs.
        return Ok(());
    };
    let own = pt.metadata.namespace.as_deref().unwrap_or("default");
    let selects_namespaces = pt
        .spec
        .targets
        .as_ref()
        .is_some_and(|t| t.namespace_selector.is_some());
    for t in std::iter::once(&pt.spec.tool).chain(&pt.spec.alongside) {
        let Some(c) = checked.for_tool(&t.name) else {
            continue;
        };
        if let Some(ns) = namespaces.iter().find(|ns| !c.allows_namespace(ns)) {
            return Err(format!(
                "spec.targets.namespaceSelector: namespace {ns} is not allowed by \
                 PowerToolConfig {} for tool {}",
                c.name, t.name
            ));
        }
        if selects_namespaces && !c.allows_cross_namespace_from(own) {
            return Err(format!(
                "spec.targets.namespaceSelector: PowerToolConfig {} lets PowerTools select other \
                 namespaces only from {}; {own} is not one (an admin adds it to \
                 crossNamespaceFrom)",
                c.name,
                if c.spec.cross_namespace_from.is_empty() {
                    "no namespace".to_owned()
                } else {
                    c.spec.cross_namespace_from.join(", ")
                }
            ));
        }
        let fault = find_tool(&t.name).is_some_and(|d| d.kind == ToolKind::Fault);
        if fault
            && let Some(ns) = namespaces
                .iter()
                .find(|ns| protected.contains(ns) && !c.names_namespace(ns))
        {
            return Err(format!(
                "namespace {ns} is protected from faults: PowerToolConfig {} must name it in \
                 allowedNamespaces for {} to reach it",
                c.name, t.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(yaml: &str) -> PowerTool {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn builtin(t: &PowerTool) -> Result<ValidatedTool, SpecError> {
        validate(t, Policy::Builtin).map(|v| v.tool)
    }

    const BASE: &str = "apiVersion: toe.run/v1alpha1\nkind: PowerTool\nmetadata: {name: t}\nspec:\n  tool:\n    name: cpu-profile\n";

    #[test]
    fn defaults_apply() {
        let v = builtin(&tool(BASE)).unwrap();
        assert_eq!(v.duration, Duration::from_secs(30));
        let ToolOptions::CpuProfile(o) = v.options else {
            panic!("cpu options")
        };
        assert_eq!(o.frequency_hz, 99);
        assert!(o.kernel_stacks);
    }

    #[test]
    fn arguments_are_typed() {
        let y = format!(
            "{BASE}    duration: 1m30s\n    commandLineArguments: [\"--frequency=199\", \"--kernel-stacks=false\"]\n"
        );
        let v = builtin(&tool(&y)).unwrap();
        assert_eq!(v.duration, Duration::from_secs(90));
        let ToolOptions::CpuProfile(o) = v.options else {
            panic!("cpu options")
        };
        assert_eq!(o.frequency_hz, 199);
        assert!(!o.kernel_stacks);
    }

    #[test]
    fn memory_defaults_and_modes() {
        let y = BASE.replace("cpu-profile", "memory-profile");
        let v = builtin(&tool(&y)).unwrap();
        let ToolOptions::MemoryProfile(o) = v.options else {
            panic!("memory options")
        };
        assert_eq!(o.allocations, AllocationMode::Sampled);
        assert_eq!(o.sample_bytes, 64 << 10);
        assert!(o.faults);
        let y = format!("{y}    commandLineArguments: [\"--mode=growth\", \"--faults=false\"]\n");
        let ToolOptions::MemoryProfile(o) = builtin(&tool(&y)).unwrap().options else {
            panic!("memory options")
        };
        // Growth mode is the fault profile: it cannot be switched off there.
        assert_eq!(o.allocations, AllocationMode::Off);
        assert!(o.faults);
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (
                "    commandLineArguments: [\"--frequency=0\"]\n",
                "--frequency: 0 is out of range 1..=1000",
            ),
            (
                "    commandLineArguments: [\"--frequency=100000\"]\n",
                "--frequency: 100000 is out of range 1..=1000",
            ),
            (
                "    commandLineArguments: [\"--frequency=fast\"]\n",
                "--frequency: \"fast\" is not an integer",
            ),
            (
                "    commandLineArguments: [\"--frequncy=9\"]\n",
                "unknown argument --frequncy",
            ),
            ("    duration: 10 minutes\n", "spec.tool.duration"),
            ("    duration: 0s\n", "must be greater than 0s"),
            ("    duration: 2h\n", "exceeds the maximum"),
        ];
        for (extra, want) in cases {
            let err = builtin(&tool(&format!("{BASE}{extra}")))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{extra:?}: {err:?} lacks {want:?}");
        }
        let mut t = tool(BASE);
        t.spec.tool.name = "cpu-profiler".into();
        let err = builtin(&t).unwrap_err().to_string();
        assert!(
            err.contains("unknown tool \"cpu-profiler\"") && err.contains("cpu-profile"),
            "{err}"
        );
        let meta = TypeMeta {
            api_version: API_VERSION.into(),
            kind: "Pod".into(),
        };
        assert_eq!(
            check_type(&meta, POWER_TOOL_KIND).unwrap_err().to_string(),
            "kind: expected \"PowerTool\", got \"Pod\""
        );
    }
}
