//! Pure planning: PowerTool YAML + command-line choices -> a validated [`RunPlan`]. No side
//! effects beyond reading nothing at all; everything here is unit-tested without root.

use std::{path::Path, time::SystemTime};

use toe_common::api::{self, PowerTool, ValidatedTool};
use url::Url;

use crate::targets::TargetSpec;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{source_name}: not a valid PowerTool: {message}")]
    Yaml {
        source_name: String,
        message: String,
    },
    /// The message already contains the spec error: it is not chained again as a source.
    #[error("{source_name}: {error}")]
    Spec {
        source_name: String,
        error: api::SpecError,
    },
    #[error("{source_name}: spec.output.url {given}: {why}")]
    SpecOutput {
        source_name: String,
        given: String,
        why: String,
    },
    #[error("--output {given}: {why}")]
    Output { given: String, why: String },
}

/// What the command line asked for, besides the spec.
#[derive(Clone, Debug)]
pub struct RunRequest {
    /// Name of the spec's source, for messages (a path or `<stdin>`).
    pub source_name: String,
    pub spec_yaml: String,
    pub target: TargetSpec,
    /// `--output`: a directory or an object store URL; overrides `spec.output.url`.
    pub output: Option<String>,
    /// Directory relative outputs resolve against (the working directory).
    pub cwd: std::path::PathBuf,
    pub now: SystemTime,
    /// Distinguishes runs started in the same second.
    pub nonce: u32,
}

#[derive(Clone, Debug)]
pub struct RunPlan {
    pub run_id: String,
    pub name: Option<String>,
    pub tool: ValidatedTool,
    pub target: TargetSpec,
    /// The run's own directory (ends with `/`).
    pub output: Url,
    pub dry_run: bool,
    /// Spec fields TOE did not recognise (probably typos), reported but not fatal.
    pub warnings: Vec<String>,
}

pub const DEFAULT_OUTPUT_DIR: &str = "toe-output";

/// Parses YAML into a PowerTool, collecting the paths of fields nobody reads.
pub fn parse_spec(source_name: &str, yaml: &str) -> Result<(PowerTool, Vec<String>), PlanError> {
    let de = serde_yaml::Deserializer::from_str(yaml);
    let mut unknown = Vec::new();
    let tool: PowerTool = serde_ignored::deserialize(de, |path| unknown.push(path.to_string()))
        .map_err(|e| PlanError::Yaml {
            source_name: source_name.to_owned(),
            message: e.to_string(),
        })?;
    let warnings = unknown
        .into_iter()
        .map(|p| format!("{source_name}: unknown field {p} ignored"))
        .collect();
    Ok((tool, warnings))
}

fn output_base(given: &str, cwd: &Path) -> Result<Url, String> {
    if given.contains("://") {
        return Url::parse(given).map_err(|e| e.to_string());
    }
    let path = cwd.join(given);
    Url::from_directory_path(&path)
        .map_err(|()| format!("{} is not an absolute directory path", path.display()))
}

/// `2026-11-26T10:15:00Z` -> `20261126T101500Z`, sortable and safe in any object store.
fn timestamp(now: SystemTime) -> String {
    humantime::format_rfc3339_seconds(now)
        .to_string()
        .replace(['-', ':'], "")
}

pub fn plan(req: &RunRequest) -> Result<RunPlan, PlanError> {
    let (tool, mut warnings) = parse_spec(&req.source_name, &req.spec_yaml)?;
    let validated = api::validate(&tool).map_err(|error| PlanError::Spec {
        source_name: req.source_name.clone(),
        error,
    })?;
    let (given, from_flag) = match (
        &req.output,
        tool.spec.output.as_ref().and_then(|o| o.url.as_ref()),
    ) {
        (Some(flag), _) => (flag.clone(), true),
        (None, Some(url)) => (url.clone(), false),
        (None, None) => (DEFAULT_OUTPUT_DIR.to_owned(), true),
    };
    let mut base = output_base(&given, &req.cwd).map_err(|why| {
        if from_flag {
            PlanError::Output {
                given: given.clone(),
                why,
            }
        } else {
            PlanError::SpecOutput {
                source_name: req.source_name.clone(),
                given: given.clone(),
                why,
            }
        }
    })?;
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    let run_id = format!(
        "{}-{}-{:04x}",
        validated.name,
        timestamp(req.now),
        req.nonce & 0xffff
    );
    let output = base
        .join(&format!("{run_id}/"))
        .map_err(|e| PlanError::Output {
            given,
            why: e.to_string(),
        })?;
    if tool.spec.targets.is_some() {
        warnings.push(format!("{}: spec.targets is used in the cluster only; local mode profiles the command-line target", req.source_name));
    }
    Ok(RunPlan {
        run_id,
        name: tool.metadata.name.clone(),
        tool: validated,
        target: req.target.clone(),
        output,
        dry_run: tool.spec.dry_run.unwrap_or(false),
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SPEC: &str = "apiVersion: toe.run/v1alpha1\nkind: PowerTool\nmetadata:\n  name: demo\nspec:\n  tool:\n    name: cpu-profile\n    duration: 5s\n";

    fn req(yaml: &str, output: Option<&str>) -> RunRequest {
        RunRequest {
            source_name: "spec.yaml".into(),
            spec_yaml: yaml.into(),
            target: TargetSpec::Pid(1),
            output: output.map(Into::into),
            cwd: "/work".into(),
            now: SystemTime::UNIX_EPOCH + Duration::from_hours(500_000),
            nonce: 0xbeef,
        }
    }

    #[test]
    fn default_output_is_a_run_directory_under_toe_output() {
        let p = plan(&req(SPEC, None)).unwrap();
        assert_eq!(p.run_id, "cpu-profile-20270115T080000Z-beef");
        assert_eq!(
            p.output.as_str(),
            "file:///work/toe-output/cpu-profile-20270115T080000Z-beef/"
        );
        assert_eq!(p.tool.duration, Duration::from_secs(5));
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn output_flag_beats_spec_url() {
        let yaml = format!("{SPEC}  output:\n    url: s3://bucket/profiles\n");
        let p = plan(&req(&yaml, None)).unwrap();
        assert!(
            p.output
                .as_str()
                .starts_with("s3://bucket/profiles/cpu-profile-"),
            "{}",
            p.output
        );
        let p = plan(&req(&yaml, Some("/tmp/out"))).unwrap();
        assert!(
            p.output
                .as_str()
                .starts_with("file:///tmp/out/cpu-profile-"),
            "{}",
            p.output
        );
    }

    #[test]
    fn malformed_yaml_and_typos_are_reported() {
        let err = plan(&req("apiVersion: [unclosed", None))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("spec.yaml: not a valid PowerTool"), "{err}");
        let err = plan(&req(
            "apiVersion: toe.run/v1alpha1\nkind: PowerTool\nspec: {}\n",
            None,
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("missing field `tool`"), "{err}");
        let yaml = SPEC.replace("duration: 5s", "duraton: 5s");
        let p = plan(&req(&yaml, None)).unwrap();
        assert_eq!(
            p.warnings,
            vec!["spec.yaml: unknown field spec.tool.duraton ignored".to_owned()]
        );
    }

    #[test]
    fn cluster_fields_are_accepted_and_noted() {
        let yaml = format!(
            "{SPEC}  targets:\n    labelSelector: {{matchLabels: {{app: x}}}}\n  blastRadius: {{mode: one}}\n"
        );
        let p = plan(&req(&yaml, None)).unwrap();
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(p.warnings[0].contains("cluster only"));
    }
}
