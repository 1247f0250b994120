//! The agent (node mode), the operator's image tools and processing locate a target's artifacts
//! the same way, whatever `spec.output.url` says: a writer and its reader never disagree.

use toe_common::api::{PowerTool, SelectedTarget, run_name};
use url::Url;

fn powertool(output: Option<&str>) -> PowerTool {
    let mut spec = serde_json::json!({"tool": {"name": "cpu-profile"}});
    if let Some(url) = output {
        spec["output"] = serde_json::json!({ "url": url });
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "toe.run/v1alpha1",
        "kind": "PowerTool",
        "metadata": {
            "name": "checkout-cpu", "namespace": "team-a",
            "uid": "1a2b3c4d-0000-0000-0000-000000000000", "generation": 3,
        },
        "spec": spec,
    }))
    .expect("a PowerTool")
}

fn target() -> SelectedTarget {
    SelectedTarget {
        node: "node-1".into(),
        namespace: "shop".into(),
        pod: "web-0".into(),
        container: "app".into(),
        container_id: "containerd://abc".into(),
        ..SelectedTarget::default()
    }
}

#[test]
fn agent_image_tools_and_processing_agree_on_every_output_url() {
    let default = Url::parse(toe_artifacts::layout::DEFAULT_NODE_STORE).unwrap();
    let run = run_name("1a2b3c4d-0000-0000-0000-000000000000", 3);
    for (output, base) in [
        (Some("file:///data/toe"), "file:///data/toe/"),
        (Some("s3://bucket/profiles"), "s3://bucket/profiles/"),
        (Some("/data/toe"), "file:///data/toe/"),
        (None, toe_artifacts::layout::DEFAULT_NODE_STORE),
    ] {
        let pt = powertool(output);
        let agent = toe_agent::node::remote_dir(&default, &pt, &target()).unwrap();
        let image = toe_operator::image_tools::output_url(&pt, &target(), &default).unwrap();
        let runs = toe_operator::processing::runs_url(&pt, &default).unwrap();
        let want = format!("{base}team-a/checkout-cpu/{run}/shop_web-0/app/");
        assert_eq!(agent.as_str(), want, "agent, {output:?}");
        assert_eq!(image, agent, "image tool, {output:?}");
        // Processing reads the PowerTool's runs from the directory the targets are below.
        assert!(
            agent.as_str().starts_with(runs.as_str()),
            "{output:?}: processing reads {runs}, the agent writes {agent}"
        );
    }
}

#[test]
fn unusable_output_urls_fail_the_same_way_everywhere() {
    let default = Url::parse(toe_artifacts::layout::DEFAULT_NODE_STORE).unwrap();
    for output in ["toe-output", "ftp://host/x"] {
        let pt = powertool(Some(output));
        assert!(toe_agent::node::remote_dir(&default, &pt, &target()).is_err());
        assert!(toe_operator::image_tools::output_url(&pt, &target(), &default).is_err());
        assert!(toe_operator::processing::runs_url(&pt, &default).is_err());
    }
}
