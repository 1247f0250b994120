//! Admission: a PowerTool against the cluster's PowerToolConfigs. The same function serves the
//! controller and the validating webhook, so a user sees at `kubectl apply` time exactly what
//! the controller would decide.

use toe_common::api::{
    Configs, Policy, PowerTool, PowerToolConfig, SpecError, ValidatedRun, usable_configs,
};

/// The outcome, as it goes into the `Admitted` condition: a machine reason and a human message
/// naming the field and the rule.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub reason: &'static str,
    pub message: String,
    /// The validated run when admitted.
    pub run: Option<ValidatedRun>,
}

impl Verdict {
    #[must_use]
    pub fn admitted(&self) -> bool {
        self.run.is_some()
    }

    fn rejected(reason: &'static str, message: String) -> Self {
        Self {
            reason,
            message,
            run: None,
        }
    }
}

fn reason(e: &SpecError) -> &'static str {
    match e {
        SpecError::ApiVersion(_) | SpecError::Kind { .. } => "WrongType",
        SpecError::UnknownTool { .. } => "UnknownTool",
        SpecError::NotEnabled { .. } => "ToolNotEnabled",
        SpecError::Namespace { .. } => "NamespaceNotAllowed",
        SpecError::Duration { .. } => "InvalidDuration",
        SpecError::Argument { .. } => "InvalidArgument",
        SpecError::Alongside(_) => "InvalidAlongside",
    }
}

/// Admits `tool` under `configs`. A config that is itself invalid enables nothing; when it is
/// the one the tool needs, the message says what is wrong with it (the admin's mistake, not the
/// user's).
#[must_use]
pub fn admit(tool: &PowerTool, configs: &[PowerToolConfig]) -> Verdict {
    // Where the agents would write is checked first: a location only the agents could refuse
    // would fail every target after admission.
    if let Some(url) = tool.spec.output.as_ref().and_then(|o| o.url.as_deref())
        && let Err(e) = toe_artifacts::layout::output_base(url, None)
    {
        return Verdict::rejected("InvalidOutput", format!("spec.output.url: {e}"));
    }
    let (valid, broken) = usable_configs(configs);
    let configs = match Configs::new(&valid) {
        Ok(c) => c,
        Err(e) => return Verdict::rejected("ConfigInvalid", e.to_string()),
    };
    let policy = Policy::Configs {
        configs: &configs,
        namespace: Some(tool.metadata.namespace.as_deref().unwrap_or("default")),
    };
    match toe_common::api::validate(tool, policy) {
        Ok(run) => Verdict {
            reason: "Validated",
            message: format!(
                "{} for {} admitted",
                std::iter::once(&run.tool)
                    .chain(&run.alongside)
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" + "),
                toe_common::api::format_duration(run.tool.duration)
            ),
            run: Some(run),
        },
        Err(e @ SpecError::NotEnabled { .. }) => {
            let wanted = std::iter::once(&tool.spec.tool)
                .chain(&tool.spec.alongside)
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>();
            match broken.iter().find(|(t, _)| wanted.contains(&t.as_str())) {
                Some((_, why)) => Verdict::rejected("ConfigInvalid", why.clone()),
                None => Verdict::rejected(reason(&e), e.to_string()),
            }
        }
        Err(e) => Verdict::rejected(reason(&e), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(yaml: &str) -> PowerTool {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "toe.run/v1alpha1",
            "kind": "PowerTool",
            "metadata": {"name": "t", "namespace": "shop"},
            "spec": serde_json::from_str::<serde_json::Value>(yaml).unwrap(),
        }))
        .unwrap()
    }

    fn config(name: &str, spec: &serde_json::Value) -> PowerToolConfig {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "toe.run/v1alpha1",
            "kind": "PowerToolConfig",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn verdicts_name_the_rule() {
        let configs = [
            config(
                "cpu",
                &serde_json::json!({"tool": "cpu-profile", "allowedNamespaces": ["shop"],
                    "arguments": [{"name": "frequency", "type": "integer", "max": 199}]}),
            ),
            // Broken: its default is above its own cap.
            config(
                "fill",
                &serde_json::json!({"tool": "volume-fill",
                    "arguments": [{"name": "fill", "type": "percentage", "max": "50%"}]}),
            ),
        ];
        let ok = admit(&tool(r#"{"tool": {"name": "cpu-profile"}}"#), &configs);
        assert!(ok.admitted(), "{ok:?}");
        assert_eq!(ok.message, "cpu-profile for 30s admitted");
        for (spec, reason, want) in [
            (
                r#"{"tool": {"name": "cpu-profile", "commandLineArguments": ["--frequency=999"]}}"#,
                "InvalidArgument",
                "--frequency: 999 is above the maximum 199",
            ),
            (
                r#"{"tool": {"name": "cpu-profile", "commandLineArguments": ["--kernel-stacks=false"]}}"#,
                "InvalidArgument",
                "--kernel-stacks is not allowed by PowerToolConfig cpu",
            ),
            (
                r#"{"tool": {"name": "memory-stress"}}"#,
                "ToolNotEnabled",
                "tool memory-stress is not enabled here",
            ),
            (
                r#"{"tool": {"name": "volume-fill"}}"#,
                "ConfigInvalid",
                "PowerToolConfig fill: spec.arguments: default: --fill: 90% is above the maximum 50%",
            ),
            (
                r#"{"tool": {"name": "cpu-profile", "duration": "2h"}}"#,
                "InvalidDuration",
                "2h0m0s exceeds the maximum of 1h0m0s",
            ),
        ] {
            let v = admit(&tool(spec), &configs);
            assert!(!v.admitted(), "{spec}");
            assert_eq!(v.reason, reason, "{spec}: {}", v.message);
            assert!(v.message.contains(want), "{spec}: {}", v.message);
        }
        let mut elsewhere = tool(r#"{"tool": {"name": "cpu-profile"}}"#);
        elsewhere.metadata.namespace = Some("kube-system".into());
        let v = admit(&elsewhere, &configs);
        assert_eq!(v.reason, "NamespaceNotAllowed", "{}", v.message);
    }

    #[test]
    fn unusable_output_urls_are_refused_with_the_reason() {
        let configs = vec![
            serde_json::from_value(serde_json::json!({
                "apiVersion": "toe.run/v1alpha1", "kind": "PowerToolConfig",
                "metadata": {"name": "cpu-profile"},
                "spec": {"tool": "cpu-profile"},
            }))
            .unwrap(),
        ];
        for (url, why) in [
            ("toe-output", "relative path"),
            ("ftp://host/x", "unknown scheme"),
        ] {
            let t = tool(&format!(
                r#"{{"tool": {{"name": "cpu-profile"}}, "output": {{"url": "{url}"}}}}"#
            ));
            let v = admit(&t, &configs);
            assert!(!v.admitted(), "{url}");
            assert_eq!(v.reason, "InvalidOutput");
            assert!(v.message.contains(why), "{url}: {}", v.message);
        }
        for url in ["/data/toe", "file:///data/toe", "s3://bucket/profiles"] {
            let t = tool(&format!(
                r#"{{"tool": {{"name": "cpu-profile"}}, "output": {{"url": "{url}"}}}}"#
            ));
            assert!(admit(&t, &configs).admitted(), "{url}");
        }
    }
}
