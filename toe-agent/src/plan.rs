//! Pure planning: PowerTool YAML + command-line choices -> a validated [`RunPlan`]. No side
//! effects beyond reading nothing at all; everything here is unit-tested without root.

use std::{path::Path, sync::OnceLock, time::SystemTime};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray,
};
use serde::Deserialize as _;
use toe_common::api::{self, Configs, Policy, PowerTool, PowerToolConfig, ValidatedTool};
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
    /// Fields nobody reads, with the closest known name of each: a typo must not silently drop
    /// what the user meant (kubectl's strict field validation does the same).
    #[error(
        "{source_name}: {}; fix the spelling, or pass --validate=warn to ignore unknown fields",
        fields.join("; ")
    )]
    UnknownFields {
        source_name: String,
        fields: Vec<String>,
    },
    #[error("{source_name}: {message}")]
    Unsupported {
        source_name: String,
        message: String,
    },
    #[error("--config {source_name}: {message}")]
    Config {
        source_name: String,
        message: String,
    },
}

/// What the command line asked for, besides the spec.
#[derive(Clone, Debug)]
pub struct RunRequest {
    /// Name of the spec's source, for messages (a path or `<stdin>`).
    pub source_name: String,
    pub spec_yaml: String,
    /// `--config`: the PowerToolConfig documents (source name, YAML) that enable tools and cap
    /// their arguments. None: the built-in catalogue's own bounds.
    pub config: Option<(String, String)>,
    pub target: TargetSpec,
    /// `--output`: a directory or an object store URL; overrides `spec.output.url`.
    pub output: Option<String>,
    /// Directory relative outputs resolve against (the working directory).
    pub cwd: std::path::PathBuf,
    pub now: SystemTime,
    /// Distinguishes runs started in the same second.
    pub nonce: u32,
    /// Whether unknown fields in the spec are errors or warnings.
    pub validation: FieldValidation,
}

#[derive(Clone, Debug)]
pub struct RunPlan {
    pub run_id: String,
    pub name: Option<String>,
    pub tool: ValidatedTool,
    /// Tools run over the same target and window (`spec.alongside`).
    pub alongside: Vec<ValidatedTool>,
    pub target: TargetSpec,
    /// The run's own directory (ends with `/`).
    pub output: Url,
    pub dry_run: bool,
    /// Spec fields TOE did not recognise (probably typos), reported but not fatal.
    pub warnings: Vec<String>,
}

pub const DEFAULT_OUTPUT_DIR: &str = "toe-output";

/// One YAML document as a typed TOE resource of `kind`: `apiVersion` and `kind` checked first
/// (the typed resources do not keep them), a missing `metadata` tolerated in local files, and the
/// paths of fields nobody reads collected as warnings (probably typos).
fn parse_document<T: serde::de::DeserializeOwned>(
    source_name: &str,
    mut value: serde_yaml::Value,
    kind: &str,
) -> Result<(T, Vec<String>), PlanError> {
    let yaml_err = |message: String| PlanError::Yaml {
        source_name: source_name.to_owned(),
        message,
    };
    let meta: api::TypeMeta =
        serde_yaml::from_value(value.clone()).map_err(|e| yaml_err(e.to_string()))?;
    api::check_type(&meta, kind).map_err(|error| PlanError::Spec {
        source_name: source_name.to_owned(),
        error,
    })?;
    if let Some(map) = value.as_mapping_mut()
        && !map.contains_key("metadata")
    {
        map.insert(
            "metadata".into(),
            serde_yaml::Value::Mapping(serde_yaml::Mapping::new()),
        );
    }
    let mut unknown = Vec::new();
    let doc: T = serde_ignored::deserialize(value, |path| unknown.push(path.to_string()))
        .map_err(|e| yaml_err(e.to_string()))?;
    let warnings = unknown
        .into_iter()
        .filter(|p| p != "apiVersion" && p != "kind")
        .map(|p| format!("{source_name}: {}", describe_unknown(kind, &p)))
        .collect();
    Ok((doc, warnings))
}

/// How unknown fields are treated (kubectl's `--validate`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FieldValidation {
    /// An unknown field is an error.
    #[default]
    Strict,
    /// An unknown field is a warning, and ignored.
    Warn,
}

/// `unknown field spec.tool.comandLineArguments (did you mean commandLineArguments?)`: the
/// closest name the schema knows at the same place, when one is close.
fn describe_unknown(kind: &str, path: &str) -> String {
    let (parent, field) = path.rsplit_once('.').unwrap_or(("", path));
    let known = known_fields(kind, parent);
    let closest = known
        .iter()
        .map(|k| {
            (
                strsim::damerau_levenshtein(&k.to_lowercase(), &field.to_lowercase()),
                k,
            )
        })
        .filter(|(d, _)| *d <= field.len().div_ceil(3).max(2))
        .min();
    match closest {
        Some((_, k)) => format!("unknown field {path} (did you mean {k}?)"),
        None if known.is_empty() => format!("unknown field {path}"),
        None => format!("unknown field {path} (known here: {})", known.join(", ")),
    }
}

/// The open API schema of `kind`'s CRD, made once: generating it walks every type of the
/// resource, which a spec with many unknown fields would otherwise pay per field.
fn crd_schema(kind: &str) -> Option<&'static JSONSchemaProps> {
    use kube::CustomResourceExt as _;
    static POWER_TOOL: OnceLock<Option<JSONSchemaProps>> = OnceLock::new();
    static POWER_TOOL_CONFIG: OnceLock<Option<JSONSchemaProps>> = OnceLock::new();
    let of = |crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        crd.spec
            .versions
            .into_iter()
            .next()
            .and_then(|v| v.schema)
            .and_then(|s| s.open_api_v3_schema)
    };
    match kind {
        api::POWER_TOOL_KIND => POWER_TOOL.get_or_init(|| of(PowerTool::crd())).as_ref(),
        api::POWER_TOOL_CONFIG_KIND => POWER_TOOL_CONFIG
            .get_or_init(|| of(PowerToolConfig::crd()))
            .as_ref(),
        _ => None,
    }
}

/// The field names the CRD schema of `kind` has below `parent` (a dotted path; list indices as
/// numbers, as serde_ignored writes them).
fn known_fields(kind: &str, parent: &str) -> Vec<String> {
    let Some(mut schema) = crd_schema(kind) else {
        return Vec::new();
    };
    for part in parent.split('.').filter(|p| !p.is_empty()) {
        let next = if part.bytes().all(|b| b.is_ascii_digit()) {
            match &schema.items {
                Some(JSONSchemaPropsOrArray::Schema(s)) => Some(&**s),
                _ => None,
            }
        } else {
            schema.properties.as_ref().and_then(|p| p.get(part))
        };
        match next {
            Some(s) => schema = s,
            None => return Vec::new(),
        }
    }
    schema
        .properties
        .as_ref()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

/// Parses YAML into a PowerTool, describing the fields nobody reads (probably typos).
pub fn parse_spec(source_name: &str, yaml: &str) -> Result<(PowerTool, Vec<String>), PlanError> {
    let value: serde_yaml::Value = serde_yaml::from_str(yaml).map_err(|e| PlanError::Yaml {
        source_name: source_name.to_owned(),
        message: e.to_string(),
    })?;
    parse_document(source_name, value, api::POWER_TOOL_KIND)
}

/// [`parse_spec`], with unknown fields an error under [`FieldValidation::Strict`] and warnings
/// (returned) under [`FieldValidation::Warn`].
pub fn parse_spec_checked(
    source_name: &str,
    yaml: &str,
    validation: FieldValidation,
) -> Result<(PowerTool, Vec<String>), PlanError> {
    let (tool, unknown) = parse_spec(source_name, yaml)?;
    if validation == FieldValidation::Strict && !unknown.is_empty() {
        let prefix = format!("{source_name}: ");
        return Err(PlanError::UnknownFields {
            source_name: source_name.to_owned(),
            fields: unknown
                .iter()
                .map(|w| w.trim_start_matches(&prefix).to_owned())
                .collect(),
        });
    }
    Ok((
        tool,
        unknown
            .into_iter()
            .map(|w| format!("{w}; ignored"))
            .collect(),
    ))
}

/// A directory (relative to `cwd`) or an object store URL, as a directory URL.
pub fn output_base(given: &str, cwd: &Path) -> Result<Url, String> {
    toe_artifacts::layout::output_base(given, Some(cwd)).map_err(|e| e.why)
}

/// Every PowerToolConfig document of a config file, checked together.
pub fn parse_configs(source_name: &str, yaml: &str) -> Result<Configs, PlanError> {
    let err = |message: String| PlanError::Config {
        source_name: source_name.to_owned(),
        message,
    };
    let mut docs = Vec::new();
    for de in serde_yaml::Deserializer::from_str(yaml) {
        let value =
            serde_yaml::Value::deserialize(de).map_err(|e| err(format!("not YAML: {e}")))?;
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        let (doc, _): (PowerToolConfig, _) =
            parse_document(source_name, value, api::POWER_TOOL_CONFIG_KIND)
                .map_err(|e| err(format!("not a valid PowerToolConfig: {e}")))?;
        docs.push(doc);
    }
    if docs.is_empty() {
        return Err(err("no PowerToolConfig in it".into()));
    }
    Configs::new(&docs).map_err(|e| err(e.to_string()))
}

/// Validates a parsed PowerTool under the request's configs (or the built-in bounds).
pub fn validate(
    source_name: &str,
    tool: &PowerTool,
    config: Option<&(String, String)>,
) -> Result<api::ValidatedRun, PlanError> {
    let configs = config
        .map(|(name, yaml)| parse_configs(name, yaml))
        .transpose()?;
    let policy = match &configs {
        None => Policy::Builtin,
        Some(configs) => Policy::Configs {
            configs,
            namespace: tool.metadata.namespace.as_deref(),
        },
    };
    api::validate(tool, policy).map_err(|error| PlanError::Spec {
        source_name: source_name.to_owned(),
        error,
    })
}

pub fn plan(req: &RunRequest) -> Result<RunPlan, PlanError> {
    let (tool, mut warnings) =
        parse_spec_checked(&req.source_name, &req.spec_yaml, req.validation)?;
    let api::ValidatedRun {
        tool: validated,
        alongside,
    } = validate(&req.source_name, &tool, req.config.as_ref())?;
    if let Some(t) = std::iter::once(&validated)
        .chain(&alongside)
        .find(|t| matches!(t.options, api::ToolOptions::Image(_)))
    {
        return Err(PlanError::Unsupported {
            source_name: req.source_name.clone(),
            message: format!(
                "tool {} is image-based: the operator runs it as an ephemeral container in a \
                 cluster; local mode runs the built-in tools",
                t.name
            ),
        });
    }
    let (given, from_flag) = match (
        &req.output,
        tool.spec.output.as_ref().and_then(|o| o.url.as_ref()),
    ) {
        (Some(flag), _) => (flag.clone(), true),
        (None, Some(url)) => (url.clone(), false),
        (None, None) => (DEFAULT_OUTPUT_DIR.to_owned(), true),
    };
    let base = output_base(&given, &req.cwd).map_err(|why| {
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
    let run_id = format!(
        "{}-{}-{:04x}",
        validated.name,
        toe_artifacts::store::stamp(req.now),
        req.nonce & 0xffff
    );
    let output = toe_artifacts::layout::local_run_dir(&base, &run_id)
        .map_err(|e| PlanError::Output { given, why: e.why })?;
    if tool.spec.targets.is_some() {
        warnings.push(format!("{}: spec.targets is used in the cluster only; local mode profiles the command-line target", req.source_name));
    }
    Ok(RunPlan {
        run_id,
        name: tool.metadata.name.clone(),
        tool: validated,
        alongside,
        target: req.target.clone(),
        output,
        dry_run: tool.spec.dry_run.unwrap_or(false),
        warnings,
    })
}

/// The plan for one container of an admitted PowerTool (node mode): `run` is the validated
/// spec, `output` the target's own directory in the object store.
#[must_use]
pub fn for_target(
    tool: &PowerTool,
    run: api::ValidatedRun,
    target: TargetSpec,
    output: Url,
    run_id: String,
) -> RunPlan {
    RunPlan {
        run_id,
        name: tool.metadata.name.clone(),
        tool: run.tool,
        alongside: run.alongside,
        target,
        output,
        dry_run: tool.spec.dry_run.unwrap_or(false),
        warnings: Vec::new(),
    }
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
            config: None,
            target: TargetSpec::Pid(1),
            output: output.map(Into::into),
            cwd: "/work".into(),
            now: SystemTime::UNIX_EPOCH + Duration::from_hours(500_000),
            nonce: 0xbeef,
            validation: FieldValidation::Strict,
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
        // A typo is an error naming the field it meant; under --validate=warn, a warning.
        let yaml = SPEC.replace("duration: 5s", "duraton: 5s");
        let err = plan(&req(&yaml, None)).unwrap_err().to_string();
        assert!(
            err.contains("unknown field spec.tool.duraton (did you mean duration?)"),
            "{err}"
        );
        let p = plan(&RunRequest {
            validation: FieldValidation::Warn,
            ..req(&yaml, None)
        })
        .unwrap();
        assert_eq!(
            p.warnings,
            vec![
                "spec.yaml: unknown field spec.tool.duraton (did you mean duration?); ignored"
                    .to_owned()
            ]
        );
        // A field far from every known one lists what is known at its place.
        let yaml = SPEC.replace("duration: 5s", "zzzzzzzzzz: 5s");
        let err = plan(&req(&yaml, None)).unwrap_err().to_string();
        assert!(err.contains("known here:") && err.contains("name"), "{err}");
    }

    #[test]
    fn cluster_fields_are_accepted_and_noted() {
        let yaml = format!(
            "{SPEC}  targets:\n    labelSelector: {{matchLabels: {{app: x}}}}\n  blastRadius: {{mode: One}}\n"
        );
        let p = plan(&req(&yaml, None)).unwrap();
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(p.warnings[0].contains("cluster only"));
    }

    /// Every example PowerTool is valid as shipped, and within the example config's caps.
    #[test]
    fn examples_validate_with_and_without_the_example_config() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let config = std::fs::read_to_string(dir.join("config.yaml")).unwrap();
        let config = Some(("config.yaml".to_owned(), config));
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") || path.ends_with("config.yaml") {
                continue;
            }
            let name = path.display().to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
            if doc["kind"] != "PowerTool" {
                continue;
            }
            let (tool, warnings) = parse_spec(&name, &text).unwrap();
            assert!(warnings.is_empty(), "{warnings:?}");
            validate(&name, &tool, None).unwrap_or_else(|e| panic!("{e}"));
            validate(&name, &tool, config.as_ref()).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
        assert!(checked >= 8, "{checked} examples");
    }
}
