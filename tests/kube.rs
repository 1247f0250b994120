//! The CRDs against a real kube-apiserver: they install and become Established, every example
//! resource is accepted by their schemas, and the schemas refuse what they should.

use std::{path::Path, time::Duration};

use k8s_openapi::{
    api::core::v1::Namespace,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde::Deserialize as _;
use toe_common::api::{PowerTool, PowerToolConfig};
use toe_tests::apiserver::ApiServer;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The YAML documents of `file`, parsed as `T` (empty documents skipped).
fn documents<T: serde::de::DeserializeOwned>(file: &Path) -> Vec<T> {
    let text = std::fs::read_to_string(file).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| serde_yaml::from_value(v).unwrap_or_else(|e| panic!("{}: {e}", file.display())))
        .collect()
}

async fn install_crds(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo().join("charts/toe/crds")).unwrap() {
        let path = entry.unwrap().path();
        for crd in documents::<CustomResourceDefinition>(&path) {
            let name = crd.metadata.name.clone().unwrap();
            crds.create(&PostParams::default(), &crd)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            names.push(name);
        }
    }
    assert_eq!(names.len(), 3, "{names:?}");
    for name in names {
        let mut established = false;
        for _ in 0..100 {
            let crd = crds.get(&name).await.unwrap();
            established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(established, "{name} never became Established");
    }
}

#[tokio::test]
async fn crds_install_and_their_schemas_accept_the_examples_and_refuse_bad_fields() {
    let Some(server) = ApiServer::start("crds_install_and_their_schemas_accept_the_examples")
    else {
        return;
    };
    let client = server.client().await;
    install_crds(&client).await;
    let apply = PatchParams::apply("toe-test").force();
    // Every example config and PowerTool is accepted as written.
    let configs: Api<PowerToolConfig> = Api::all(client.clone());
    for c in documents::<PowerToolConfig>(&repo().join("examples/config.yaml")) {
        let name = c.metadata.name.clone().unwrap();
        configs
            .patch(&name, &apply, &Patch::Apply(&c))
            .await
            .unwrap_or_else(|e| panic!("PowerToolConfig {name}: {e}"));
    }
    assert_eq!(
        configs
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        7
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": "shop"}}))
        .expect("namespace");
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let tools: Api<PowerTool> = Api::namespaced(client.clone(), "shop");
    let mut applied = 0;
    for entry in std::fs::read_dir(repo().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") || path.ends_with("config.yaml") {
            continue;
        }
        for mut t in documents::<PowerTool>(&path) {
            t.metadata.namespace = Some("shop".into());
            let name = t.metadata.name.clone().unwrap();
            let back = tools
                .patch(&name, &apply, &Patch::Apply(&t))
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(back.spec, t.spec, "{} changed on the way", path.display());
            applied += 1;
        }
    }
    assert!(applied >= 8, "{applied}");
    // The schema refuses out-of-range and unknown enum values, naming the field.
    for (yaml, want) in [
        (
            "spec: {tool: {name: cpu-profile}, blastRadius: {mode: Percent, percent: 200}}",
            "spec.blastRadius.percent",
        ),
        (
            "spec: {tool: {name: cpu-profile}, blastRadius: {mode: Half}}",
            "spec.blastRadius.mode",
        ),
        (
            "spec: {tool: {name: 'cpu profile; rm -rf /'}}",
            "spec.tool.name",
        ),
        (
            "spec: {tool: {name: cpu-profile, duration: soon}}",
            "spec.tool.duration",
        ),
    ] {
        let mut value: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
        value["apiVersion"] = "toe.run/v1alpha1".into();
        value["kind"] = "PowerTool".into();
        value["metadata"] = serde_json::json!({"name": "bad"});
        let err = tools
            .patch("bad", &apply, &Patch::Apply(&value))
            .await
            .expect_err(yaml)
            .to_string();
        assert!(err.contains(want), "{yaml}: {err}");
    }
}
