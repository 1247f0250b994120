//! PowerTool and friends, exactly as the cluster stores them, plus the pure validation that turns
//! a spec into typed tool options. Local mode and the node agent both go through [`validate`].

mod args;
mod duration;
mod tools;

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

pub use self::{
    args::{Amount, ArgKind, ArgSpec, ArgValue, ParsedArgs, format_size, parse_size},
    duration::{format_duration, parse_duration},
    tools::{
        AllocationMode, CpuProfileOptions, CpuStressOptions, MemoryProfileOptions,
        MemoryStressOptions, SignalTraceOptions, TerminateOptions, ToolKind, ToolOptions,
        VolumeFillOptions, catalogue, default_options, find_tool,
    },
};

pub const GROUP: &str = "toe.run";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "toe.run/v1alpha1";
pub const POWER_TOOL_KIND: &str = "PowerTool";

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PowerTool {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: PowerToolSpec,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PowerToolSpec {
    pub tool: ToolSpec,
    /// Pod and container selection. Cluster-only: local mode takes its target from the command
    /// line and ignores this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputSpec>,
    /// Cluster-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blast_radius: Option<serde_json::Value>,
    /// Cluster-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ToolSpec {
    pub name: String,
    /// Go duration syntax, as in every Kubernetes API (`30s`, `1m30s`, `1.5h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// Extra arguments for the tool, each `--name=value`, `--flag`, or `--name` followed by its
    /// value as the next item. Validated against the tool's argument schema.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command_line_arguments: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {
    /// An object store URL (`file:///dir`, `s3://bucket/prefix`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// Why a PowerTool cannot run. Each variant names the field and the rule it broke.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("apiVersion: expected \"{API_VERSION}\", got \"{0}\"")]
    ApiVersion(String),
    #[error("kind: expected \"{POWER_TOOL_KIND}\", got \"{0}\"")]
    Kind(String),
    #[error("spec.tool.name: unknown tool \"{name}\" (known tools: {known})")]
    UnknownTool { name: String, known: String },
    #[error("spec.tool.duration: {0}")]
    Duration(String),
    #[error("spec.tool.commandLineArguments: {0}")]
    Argument(args::ArgError),
}

/// A PowerTool that passed validation: what to run, for how long, with which typed options.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedTool {
    pub name: String,
    pub duration: Duration,
    pub options: ToolOptions,
}

// By hand rather than `#[from]`, which would also chain the argument error as the source and
// print it twice after the message that already contains it.
impl From<args::ArgError> for SpecError {
    fn from(e: args::ArgError) -> Self {
        Self::Argument(e)
    }
}

/// Checks a PowerTool against the built-in tool catalogue: known tool, duration within the tool's
/// bounds, every argument known, typed and in range.
pub fn validate(tool: &PowerTool) -> Result<ValidatedTool, SpecError> {
    if tool.api_version != API_VERSION {
        return Err(SpecError::ApiVersion(tool.api_version.clone()));
    }
    if tool.kind != POWER_TOOL_KIND {
        return Err(SpecError::Kind(tool.kind.clone()));
    }
    let spec = &tool.spec.tool;
    let def = find_tool(&spec.name).ok_or_else(|| SpecError::UnknownTool {
        name: spec.name.clone(),
        known: catalogue()
            .iter()
            .map(|t| t.name)
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    let duration = match &spec.duration {
        None => def.default_duration,
        Some(text) => parse_duration(text).map_err(SpecError::Duration)?,
    };
    if duration.is_zero() {
        return Err(SpecError::Duration("must be greater than 0s".into()));
    }
    if duration > def.max_duration {
        return Err(SpecError::Duration(format!(
            "{} exceeds the maximum of {} for tool {}",
            format_duration(duration),
            format_duration(def.max_duration),
            def.name
        )));
    }
    let parsed = args::parse(def.args, &spec.command_line_arguments)?;
    let options = (def.build)(&parsed);
    Ok(ValidatedTool {
        name: def.name.to_owned(),
        duration,
        options,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(yaml: &str) -> PowerTool {
        serde_yaml::from_str(yaml).unwrap()
    }

    const BASE: &str = "apiVersion: toe.run/v1alpha1\nkind: PowerTool\nmetadata: {name: t}\nspec:\n  tool:\n    name: cpu-profile\n";

    #[test]
    fn defaults_apply() {
        let v = validate(&tool(BASE)).unwrap();
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
        let v = validate(&tool(&y)).unwrap();
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
        let v = validate(&tool(&y)).unwrap();
        let ToolOptions::MemoryProfile(o) = v.options else {
            panic!("memory options")
        };
        assert_eq!(o.allocations, AllocationMode::Sampled);
        assert_eq!(o.sample_bytes, 64 << 10);
        assert!(o.faults);
        let y = format!("{y}    commandLineArguments: [\"--mode=growth\", \"--faults=false\"]\n");
        let ToolOptions::MemoryProfile(o) = validate(&tool(&y)).unwrap().options else {
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
            let err = validate(&tool(&format!("{BASE}{extra}")))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{extra:?}: {err:?} lacks {want:?}");
        }
        let mut t = tool(BASE);
        t.spec.tool.name = "cpu-profiler".into();
        let err = validate(&t).unwrap_err().to_string();
        assert!(
            err.contains("unknown tool \"cpu-profiler\"") && err.contains("cpu-profile"),
            "{err}"
        );
        t = tool(BASE);
        t.kind = "Pod".into();
        assert_eq!(validate(&t).unwrap_err(), SpecError::Kind("Pod".into()));
    }
}
