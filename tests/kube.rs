//! The CRDs against a real kube-apiserver: they install and become Established, every example
//! resource is accepted by their schemas, and the schemas refuse what they should.

use std::time::Duration;

use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::ValidatingWebhookConfiguration,
        core::v1::{Namespace, Pod},
        rbac::v1::{Role, RoleBinding},
    },
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use toe_common::api::{PowerTool, PowerToolConfig, PowerToolPhase, PowerToolProcessing};
use toe_tests::{
    apiserver::ApiServer,
    cluster::{
        Operator, OperatorProcess, Webhook, documents, first_refusal, free_port, install_crds,
        operator_identity, repo,
    },
};

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
    let examples = documents::<PowerToolConfig>(&repo().join("examples/config.yaml"));
    assert!(examples.len() >= 7, "{} example configs", examples.len());
    for c in &examples {
        let name = c.metadata.name.clone().unwrap();
        configs
            .patch(&name, &apply, &Patch::Apply(c))
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
        examples.len()
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
        if path.extension().is_none_or(|e| e != "yaml")
            || path.ends_with("config.yaml")
            || path.ends_with("processing.yaml")
        {
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
    let processings: Api<PowerToolProcessing> = Api::namespaced(client.clone(), "shop");
    for p in documents::<PowerToolProcessing>(&repo().join("examples/processing.yaml")) {
        let name = p.metadata.name.clone().unwrap();
        let back = processings
            .patch(&name, &apply, &Patch::Apply(&p))
            .await
            .unwrap_or_else(|e| panic!("processing.yaml: {e}"));
        assert_eq!(back.spec, p.spec, "processing.yaml changed on the way");
    }
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

/// Waits (up to 30 s) until the PowerTool's status has a phase other than Pending.
async fn decided(api: &Api<PowerTool>, name: &str) -> PowerTool {
    for _ in 0..300 {
        let pt = api.get(name).await.unwrap();
        if pt
            .status
            .as_ref()
            .is_some_and(|s| s.phase != PowerToolPhase::Pending)
        {
            return pt;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("PowerTool {name} got no decision within 30 s");
}

async fn create_pod(client: &kube::Client, ns: &str, name: &str, app: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"nodeName": "node-a", "containers": [
            {"name": "app", "image": "busybox"}, {"name": "sidecar", "image": "busybox"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    // There is no kubelet: the test reports the containers running, as one would.
    let status = serde_json::json!({"status": {"phase": "Running", "containerStatuses": [
        {"name": "app", "containerID": format!("containerd://{name}-app"), "ready": true,
         "restartCount": 0, "image": "busybox", "imageID": "", "state": {"running": {}}},
        {"name": "sidecar", "containerID": format!("containerd://{name}-sidecar"), "ready": true,
         "restartCount": 0, "image": "busybox", "imageID": "", "state": {"running": {}}},
    ]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// Namespaces `shop` and `payments`, four running pods in `shop` (web-1..3, db-1) on node-a, and
/// a PowerToolConfig enabling cpu-profile in `shop` only, with --frequency capped at 199.
async fn seed_cluster(client: &kube::Client) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for (ns, team) in [("shop", "shop"), ("payments", "payments")] {
        let n: Namespace = serde_json::from_value(
            serde_json::json!({"metadata": {"name": ns, "labels": {"team": team}}}),
        )
        .unwrap();
        namespaces.create(&PostParams::default(), &n).await.unwrap();
    }
    for pod in ["web-1", "web-2", "web-3"] {
        create_pod(client, "shop", pod, "web").await;
    }
    create_pod(client, "shop", "db-1", "db").await;
    let apply = PatchParams::apply("toe-test").force();
    let configs: Api<PowerToolConfig> = Api::all(client.clone());
    let config: PowerToolConfig = serde_json::from_value(serde_json::json!({
        "apiVersion": "toe.run/v1alpha1", "kind": "PowerToolConfig",
        "metadata": {"name": "cpu-profile"},
        "spec": {"tool": "cpu-profile", "allowedNamespaces": ["shop"], "maxDuration": "10m",
                 "arguments": [{"name": "frequency", "type": "integer", "max": 199}]},
    }))
    .unwrap();
    configs
        .patch("cpu-profile", &apply, &Patch::Apply(&config))
        .await
        .unwrap();
}

/// Each decision was counted once, told as an Event on its PowerTool, under the Lease.
async fn assert_told(client: &kube::Client, metrics: &toe_operator::metrics::Metrics) {
    // Each decision was counted once and told as an Event on its PowerTool.
    let text = metrics.encode();
    for reason in [
        "Validated",
        "InvalidArgument",
        "ToolNotEnabled",
        "NamespaceNotAllowed",
    ] {
        assert!(
            text.contains(&format!(
                "toe_operator_decisions_total{{reason=\"{reason}\"}} 1"
            )),
            "{text}"
        );
    }
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "shop");
    let events = events.list(&ListParams::default()).await.unwrap().items;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("InvalidArgument")
                && e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("too-fast")),
        "{events:?}"
    );
    let lease =
        Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), "toe-system")
            .get("toe-operator")
            .await
            .unwrap();
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("test-replica")
    );
}

/// One PowerTool the operator admits (two web pods' sidecars) and three it rejects.
async fn apply_powertools(tools: &Api<PowerTool>) {
    let apply = PatchParams::apply("toe-test").force();
    for (name, spec) in [
        (
            "web-sidecar",
            serde_json::json!({"tool": {"name": "cpu-profile", "duration": "1m"},
                "targets": {"labelSelector": {"matchLabels": {"app": "web"}}, "containers": ["sidecar"]},
                "blastRadius": {"mode": "Count", "count": 2}}),
        ),
        (
            "too-fast",
            serde_json::json!({"tool": {"name": "cpu-profile", "commandLineArguments": ["--frequency=999"]}}),
        ),
        (
            "not-enabled",
            serde_json::json!({"tool": {"name": "volume-fill"}}),
        ),
        (
            "other-team",
            serde_json::json!({"tool": {"name": "cpu-profile"},
                "targets": {"namespaceSelector": {"matchLabels": {"team": "payments"}}}}),
        ),
    ] {
        let pt: PowerTool = serde_json::from_value(serde_json::json!({
            "apiVersion": "toe.run/v1alpha1", "kind": "PowerTool",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap();
        tools.patch(name, &apply, &Patch::Apply(&pt)).await.unwrap();
    }
}

#[tokio::test]
async fn the_operator_admits_or_rejects_with_the_rule_and_selects_targets() {
    let Some(server) = ApiServer::start("the_operator_admits_or_rejects_with_the_rule") else {
        return;
    };
    let client = server.client().await;
    install_crds(&client).await;
    seed_cluster(&client).await;
    // The operator runs as its own identity with only its ClusterRole, under leader election.
    let operator_client = operator_identity(&server, &client).await;
    let metrics = std::sync::Arc::new(toe_operator::metrics::Metrics::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let elector = toe_operator::lease::Elector::new(
        operator_client.clone(),
        "toe-system",
        "toe-operator",
        "test-replica",
        Duration::from_secs(15),
    );
    let signal = toe_operator::shutdown::Signal::new(async {
        let _ = stopped.await;
    });
    let run = toe_operator::controller::run(
        operator_client,
        metrics.clone(),
        toe_operator::controller::Options::defaults(),
        signal.fired(),
    );
    let operator = tokio::spawn(async move { elector.lead(run, &signal).await });
    let tools: Api<PowerTool> = Api::namespaced(client.clone(), "shop");
    apply_powertools(&tools).await;
    let ok = decided(&tools, "web-sidecar").await;
    let status = ok.status.as_ref().unwrap();
    assert_eq!(status.phase, PowerToolPhase::Admitted, "{status:?}");
    assert_eq!(status.conditions[0].type_, "Admitted");
    assert_eq!(status.conditions[0].status, "True");
    assert_eq!(status.target_count, Some(2), "{status:?}");
    for t in &status.targets {
        assert!(t.pod.starts_with("web-"), "{t:?}");
        assert_eq!(t.container, "sidecar");
        assert_eq!(t.container_id, format!("containerd://{}-sidecar", t.pod));
        assert_eq!(t.node, "node-a");
    }
    assert_eq!(status.observed_generation, ok.metadata.generation);
    assert!(
        ok.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == toe_operator::controller::FINALIZER)
    );
    for (name, reason, want) in [
        (
            "too-fast",
            "InvalidArgument",
            "--frequency: 999 is above the maximum 199",
        ),
        (
            "not-enabled",
            "ToolNotEnabled",
            "tool volume-fill is not enabled here",
        ),
        (
            "other-team",
            "NamespaceNotAllowed",
            "namespace payments is not allowed by PowerToolConfig cpu-profile",
        ),
    ] {
        let pt = decided(&tools, name).await;
        let s = pt.status.unwrap();
        assert_eq!(s.phase, PowerToolPhase::Rejected, "{name}: {s:?}");
        assert_eq!(s.conditions[0].reason, reason, "{name}: {s:?}");
        assert!(s.conditions[0].message.contains(want), "{name}: {s:?}");
    }
    // Deletion goes through the finalizer and completes.
    tools
        .delete("web-sidecar", &kube::api::DeleteParams::default())
        .await
        .unwrap();
    let mut gone = false;
    for _ in 0..300 {
        if tools.get_opt("web-sidecar").await.unwrap().is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the finalizer never let the PowerTool go");
    assert_told(&client, &metrics).await;
    let _ = stop.send(());
    operator.await.unwrap();
}

/// Grants `user` create/get/patch on PowerTools in `ns`.
async fn grant_powertools(client: &kube::Client, ns: &str, user: &str) {
    let role: Role = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "powertool-author"},
        "rules": [{"apiGroups": ["toe.run"], "resources": ["powertools"],
                   "verbs": ["create", "get", "patch"]}],
    }))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("powertool-author-{user}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "powertool-author"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))
    .unwrap();
    let apply = PatchParams::apply("toe-test").force();
    Api::<Role>::namespaced(client.clone(), ns)
        .patch("powertool-author", &apply, &Patch::Apply(&role))
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .patch(
            &format!("powertool-author-{user}"),
            &apply,
            &Patch::Apply(&binding),
        )
        .await
        .unwrap();
}

fn powertool(name: &str, spec: &serde_json::Value) -> PowerTool {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "toe.run/v1alpha1", "kind": "PowerTool",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

/// Points the API server at the webhook on 127.0.0.1:`port` for PowerTool creates and updates.
async fn register_webhook(server: &ApiServer, client: &kube::Client, port: u16) {
    let config: ValidatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "toe"},
        "webhooks": [{
            "name": "powertools.toe.run",
            "clientConfig": {
                "url": format!("https://127.0.0.1:{port}{}", toe_operator::webhook::PATH),
                "caBundle": ByteString(server.ca_pem()),
            },
            "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": ["toe.run"],
                       "apiVersions": ["v1alpha1"], "resources": ["powertools"]}],
            "failurePolicy": "Fail", "sideEffects": "None",
            "admissionReviewVersions": ["v1"], "timeoutSeconds": 5,
        }],
    }))
    .unwrap();
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_webhook_refuses_at_apply_time_and_checks_access_to_targeted_namespaces() {
    let Some(server) = ApiServer::start("the_webhook_refuses_at_apply_time") else {
        return;
    };
    let client = server.client().await;
    install_crds(&client).await;
    seed_cluster(&client).await;
    let apply = PatchParams::apply("toe-test").force();
    // signal-trace may target any namespace, and PowerTools of `shop` may select others;
    // cpu-profile only `shop` (seed_cluster).
    let trace: PowerToolConfig = serde_json::from_value(serde_json::json!({
        "apiVersion": "toe.run/v1alpha1", "kind": "PowerToolConfig",
        "metadata": {"name": "signal-trace"},
        "spec": {"tool": "signal-trace", "crossNamespaceFrom": ["shop"]},
    }))
    .unwrap();
    Api::<PowerToolConfig>::all(client.clone())
        .patch("signal-trace", &apply, &Patch::Apply(&trace))
        .await
        .unwrap();
    let port = free_port();
    let (cert, key) = server.issue_cert("webhook");
    let tls = toe_operator::certs::serve_files(cert, key, toe_operator::certs::RECHECK)
        .await
        .unwrap();
    let webhook = Webhook::serve(&client, port, tls);
    register_webhook(&server, &client, port).await;
    // No operator runs here: a refusal can only come from the webhook. The API server picks a
    // new webhook configuration up within a moment; retry until it does.
    let admin_tools: Api<PowerTool> = Api::namespaced(client.clone(), "shop");
    let bad = powertool(
        "too-fast",
        &serde_json::json!({"tool": {"name": "cpu-profile", "commandLineArguments": ["--frequency=999"]}}),
    );
    let refusal = first_refusal(&admin_tools, &bad).await;
    assert!(
        refusal.contains(
            "InvalidArgument: spec.tool.commandLineArguments: --frequency: 999 is above the maximum 199"
        ),
        "{refusal}"
    );
    admin_tools
        .create(
            &PostParams::default(),
            &powertool(
                "fine",
                &serde_json::json!({"tool": {"name": "cpu-profile"}}),
            ),
        )
        .await
        .unwrap();
    // alice may create PowerTools in shop, not in payments: targeting payments is refused.
    grant_powertools(&client, "shop", "alice").await;
    let alice = server.client_as(toe_tests::apiserver::ALICE_TOKEN).await;
    let alice_tools: Api<PowerTool> = Api::namespaced(alice, "shop");
    let cross = powertool(
        "cross",
        &serde_json::json!({"tool": {"name": "signal-trace"},
            "targets": {"namespaceSelector": {"matchLabels": {"team": "payments"}}}}),
    );
    let err = alice_tools
        .create(&PostParams::default(), &cross)
        .await
        .expect_err("alice targeted payments")
        .to_string();
    assert!(
        err.contains("alice may not create PowerTools in namespace payments"),
        "{err}"
    );
    grant_powertools(&client, "payments", "alice").await;
    alice_tools
        .create(&PostParams::default(), &cross)
        .await
        .unwrap();
    webhook.stop().await;
}

/// Applies PowerToolConfigs by name and spec.
async fn apply_configs(client: &kube::Client, configs: &[(&str, serde_json::Value)]) {
    let apply = PatchParams::apply("toe-test").force();
    for (name, spec) in configs {
        let c: PowerToolConfig = serde_json::from_value(serde_json::json!({
            "apiVersion": "toe.run/v1alpha1", "kind": "PowerToolConfig",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap();
        Api::<PowerToolConfig>::all(client.clone())
            .patch(name, &apply, &Patch::Apply(&c))
            .await
            .unwrap();
    }
}

/// The operator alone (no webhook, as while it is down or disabled) keeps a tenant of `shop` in
/// `shop`: selecting other namespaces needs an admin's `crossNamespaceFrom`, and no fault
/// reaches kube-system or TOE's own namespace unless a config names it.
#[tokio::test]
async fn with_the_webhook_down_a_tenant_reaches_no_other_namespace() {
    let Some(server) = ApiServer::start("with_the_webhook_down_a_tenant_reaches_no_other") else {
        return;
    };
    let client = server.client().await;
    install_crds(&client).await;
    seed_cluster(&client).await;
    apply_configs(
        &client,
        &[
            // Every namespace allowed, but other namespaces selectable from none.
            ("terminate", serde_json::json!({"tool": "terminate"})),
            // An admin let shop's PowerTools select other namespaces.
            (
                "memory-stress",
                serde_json::json!({"tool": "memory-stress", "crossNamespaceFrom": ["shop"]}),
            ),
        ],
    )
    .await;
    let operator_client = operator_identity(&server, &client).await;
    // Labelled after operator_identity creates toe-system.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for (ns, team) in [("kube-system", "system"), ("toe-system", "toe")] {
        let n: Namespace = serde_json::from_value(
            serde_json::json!({"metadata": {"name": ns, "labels": {"team": team}}}),
        )
        .unwrap();
        namespaces
            .patch(
                ns,
                &PatchParams::apply("toe-test").force(),
                &Patch::Apply(&n),
            )
            .await
            .unwrap();
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(toe_operator::controller::run(
        operator_client,
        std::sync::Arc::default(),
        toe_operator::controller::Options::defaults(),
        async {
            let _ = stopped.await;
        },
    ));
    // alice has the chart's tenant role in shop only; nothing checks her at apply time.
    let alice = toe_tests::cluster::tenant_identity(&server, &client, "shop").await;
    let tools: Api<PowerTool> = Api::namespaced(alice, "shop");
    for (name, spec, want) in [
        (
            "kill-payments",
            serde_json::json!({"tool": {"name": "terminate"},
                "targets": {"namespaceSelector": {"matchLabels": {"team": "payments"}}}}),
            "lets PowerTools select other namespaces only from no namespace",
        ),
        (
            "kill-control-plane",
            serde_json::json!({"tool": {"name": "terminate"},
                "targets": {"namespaceSelector": {"matchLabels": {"team": "system"}}}}),
            "lets PowerTools select other namespaces only from no namespace",
        ),
        (
            "starve-control-plane",
            serde_json::json!({"tool": {"name": "memory-stress"},
                "targets": {"namespaceSelector": {"matchLabels": {"team": "system"}}}}),
            "namespace kube-system is protected from faults",
        ),
        (
            "starve-toe",
            serde_json::json!({"tool": {"name": "memory-stress"},
                "targets": {"namespaceSelector": {"matchLabels": {"team": "toe"}}}}),
            "namespace toe-system is protected from faults",
        ),
    ] {
        tools
            .create(&PostParams::default(), &powertool(name, &spec))
            .await
            .unwrap();
        let pt = decided(&tools, name).await;
        let s = pt.status.unwrap();
        assert_eq!(s.phase, PowerToolPhase::Rejected, "{name}: {s:?}");
        assert_eq!(
            s.conditions[0].reason, "NamespaceNotAllowed",
            "{name}: {s:?}"
        );
        assert!(s.conditions[0].message.contains(want), "{name}: {s:?}");
        assert!(s.targets.is_empty(), "{name}: {s:?}");
    }
    tenant_outputs_stay_in_the_admin_stores(&tools).await;
    // Nor can she write a status of her own (the agents would refuse it anyway).
    let forged = serde_json::json!({
        "apiVersion": "toe.run/v1alpha1", "kind": "PowerTool",
        "status": {"phase": "Admitted", "observedGeneration": 1},
    });
    let err = tools
        .patch_status(
            "kill-payments",
            &PatchParams::apply("alice").force(),
            &Patch::Apply(forged),
        )
        .await
        .expect_err("a tenant wrote a PowerTool's status");
    assert!(err.to_string().contains("forbidden"), "{err}");
    let _ = stop.send(());
    operator.await.unwrap();
}

/// A tenant cannot aim the agents' or an image tool's writes at the node, or at a store the admin
/// did not list; the cluster's own store stays hers to use.
async fn tenant_outputs_stay_in_the_admin_stores(tools: &Api<PowerTool>) {
    for (name, url, refused) in [
        ("write-host", "file:///proc/1/root/tmp/toe-escape", true),
        ("write-other-bucket", "s3://someone-elses-bucket/x", true),
        (
            "write-store",
            "file:///var/lib/toe/artifacts/shop-runs",
            false,
        ),
    ] {
        let spec = serde_json::json!({"tool": {"name": "terminate"}, "output": {"url": url}});
        tools
            .create(&PostParams::default(), &powertool(name, &spec))
            .await
            .unwrap();
        let s = decided(tools, name).await.status.unwrap();
        let reason = &s.conditions[0].reason;
        if refused {
            assert_eq!(s.phase, PowerToolPhase::Rejected, "{name}: {s:?}");
            assert_eq!(reason, "OutputNotAllowed", "{name}: {s:?}");
            assert!(!s.conditions[0].message.contains("/proc"), "{name}: {s:?}");
        } else {
            assert_ne!(reason, "OutputNotAllowed", "{name}: {s:?}");
        }
    }
}

/// A namespace gets no more runs of a tool at once than its config allows.
#[tokio::test]
async fn a_namespace_cap_admits_no_more_runs_than_it_allows() {
    let Some(server) = ApiServer::start("a_namespace_cap_admits_no_more_runs_than_it_allows")
    else {
        return;
    };
    let client = server.client().await;
    install_crds(&client).await;
    seed_cluster(&client).await;
    apply_configs(
        &client,
        &[(
            "cpu-profile",
            serde_json::json!({"tool": "cpu-profile", "allowedNamespaces": ["shop"],
                               "maxConcurrentPerNamespace": 1}),
        )],
    )
    .await;
    let operator = Operator::start(&server, &client).await;
    let tools: Api<PowerTool> = Api::namespaced(client.clone(), "shop");
    let spec = serde_json::json!({"tool": {"name": "cpu-profile", "duration": "5m"},
        "targets": {"labelSelector": {"matchLabels": {"app": "web"}}}});
    tools
        .create(&PostParams::default(), &powertool("first", &spec))
        .await
        .unwrap();
    let first = decided(&tools, "first").await.status.unwrap();
    assert_eq!(first.phase, PowerToolPhase::Admitted, "{first:?}");
    tools
        .create(&PostParams::default(), &powertool("second", &spec))
        .await
        .unwrap();
    let second = decided(&tools, "second").await.status.unwrap();
    assert_eq!(second.phase, PowerToolPhase::Rejected, "{second:?}");
    assert_eq!(second.conditions[0].reason, "ConcurrencyCapped");
    assert!(
        second.conditions[0]
            .message
            .contains("allows 1 cpu-profile run(s) at once in namespace shop")
            && second.conditions[0].message.contains("first"),
        "{second:?}"
    );
    operator.stop().await;
}

/// Waits (up to 30 s) until the PowerTool reaches `phase`.
async fn reached(api: &Api<PowerTool>, name: &str, phase: PowerToolPhase) -> PowerTool {
    for _ in 0..300 {
        let pt = api.get(name).await.unwrap();
        if pt.status.as_ref().is_some_and(|s| s.phase == phase) {
            return pt;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "PowerTool {name} did not reach {phase:?} within 30 s: {:?}",
        api.get(name).await.unwrap().status
    );
}

#[tokio::test]
async fn image_tools_run_as_ephemeral_containers_with_the_validated_argv() {
    let Some(server) = ApiServer::start("image_tools_run_as_ephemeral_containers") else {
        return;
    };
    let client = server.client().await;
    install_crds(&client).await;
    seed_cluster(&client).await;
    let apply = PatchParams::apply("toe-test").force();
    let aperf: PowerToolConfig = serde_json::from_value(serde_json::json!({
        "apiVersion": "toe.run/v1alpha1", "kind": "PowerToolConfig",
        "metadata": {"name": "aperf"},
        "spec": {"tool": "aperf", "engine": "ephemeralContainer",
                 "image": "registry.example/aperf:1.2", "maxDuration": "10m",
                 "arguments": [{"name": "interval", "type": "integer", "min": 1, "max": 60, "default": 1},
                               {"name": "profile", "type": "boolean"}]},
    }))
    .unwrap();
    Api::<PowerToolConfig>::all(client.clone())
        .patch("aperf", &apply, &Patch::Apply(&aperf))
        .await
        .unwrap();
    // The cluster's store is the bucket the PowerTool names (a URL outside the admin's stores is
    // refused before any container is added: `tenant_outputs_stay_in_the_admin_stores`).
    let store = url::Url::parse("s3://bucket/toe/").unwrap();
    let operator = Operator::start_with(&server, &client, Some(store)).await;
    let tools: Api<PowerTool> = Api::namespaced(client.clone(), "shop");
    let pt = powertool(
        "aperf-web",
        &serde_json::json!({
            "tool": {"name": "aperf", "duration": "1m", "commandLineArguments": ["--interval=5", "--profile"]},
            "targets": {"labelSelector": {"matchLabels": {"app": "web"}}, "containers": ["app"]},
            "blastRadius": {"mode": "One"},
            "output": {"url": "s3://bucket/toe"},
        }),
    );
    tools
        .patch("aperf-web", &apply, &Patch::Apply(&pt))
        .await
        .unwrap();
    let running = reached(&tools, "aperf-web", PowerToolPhase::Running).await;
    let status = running.status.unwrap();
    assert_eq!(status.targets.len(), 1, "{status:?}");
    let target = &status.targets[0];
    // The node agents' layout: namespace / powertool / run / pod / container.
    let run = toe_common::api::run_name(running.metadata.uid.as_deref().unwrap(), 1);
    let url = format!("s3://bucket/toe/shop/aperf-web/{run}/{}/app/", target.pod);
    assert_eq!(target.artifacts, std::slice::from_ref(&url));
    // The pod got the ephemeral container: the image, the argv as validated (the config's
    // default appended), aimed at the app container, told where to write.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let pod = pods.get(&target.pod).await.unwrap();
    let ec = pod.spec.unwrap().ephemeral_containers.unwrap();
    assert_eq!(ec.len(), 1);
    assert_eq!(ec[0].image.as_deref(), Some("registry.example/aperf:1.2"));
    // The argv exactly as validated; the config's default for an argument given is not added.
    assert_eq!(
        ec[0].args.as_ref().unwrap(),
        &["--interval=5", "--profile=true"]
    );
    assert!(ec[0].command.is_none());
    assert_eq!(ec[0].target_container_name.as_deref(), Some("app"));
    let env = ec[0].env.clone().unwrap();
    assert!(
        env.iter()
            .any(|e| e.name == "TOE_OUTPUT_URL" && e.value.as_deref() == Some(url.as_str()))
    );
    // There is no kubelet: the test reports the container's exit as one would.
    let name = ec[0].name.clone();
    let exited = serde_json::json!({"status": {"ephemeralContainerStatuses": [
        {"name": name, "ready": false, "restartCount": 0, "image": "registry.example/aperf:1.2",
         "imageID": "", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}});
    pods.patch_status(&target.pod, &PatchParams::default(), &Patch::Merge(&exited))
        .await
        .unwrap();
    let done = reached(&tools, "aperf-web", PowerToolPhase::Completed).await;
    let status = done.status.unwrap();
    assert_eq!(
        status.targets[0]
            .phase
            .map(toe_common::api::TargetPhase::as_str),
        Some("Completed")
    );
    assert!(status.finish_time.is_some());
    operator.stop().await;
}

/// Eight agents write their own targets' progress into one PowerTool's status at once, each
/// read-modify-write under the resourceVersion precondition: every write lands (a 409 redoes it
/// on the new object), and none undoes another's.
#[tokio::test]
async fn concurrent_status_writers_retry_and_never_undo_each_other() {
    let Some(server) = ApiServer::start("concurrent_status_writers_retry_and_never_undo") else {
        return;
    };
    let client = server.client().await;
    install_crds(&client).await;
    toe_tests::cluster::create_namespace(&client, "shop", &serde_json::json!({})).await;
    let tools: Api<PowerTool> = Api::namespaced(client.clone(), "shop");
    let pt = tools
        .create(
            &PostParams::default(),
            &powertool(
                "shared",
                &serde_json::json!({"tool": {"name": "cpu-profile"}}),
            ),
        )
        .await
        .unwrap();
    let targets: Vec<serde_json::Value> = (0..8)
        .map(|i| {
            serde_json::json!({"node": format!("node-{i}"), "namespace": "shop",
                "pod": format!("web-{i}"), "container": "app",
                "containerID": format!("containerd://{i:064x}"), "phase": "Pending"})
        })
        .collect();
    tools
        .patch_status(
            "shared",
            &PatchParams::apply("toe-operator").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "toe.run/v1alpha1", "kind": "PowerTool",
                "status": {"phase": "Admitted", "observedGeneration": 1, "targets": targets},
            })),
        )
        .await
        .unwrap();
    let status = tools.get("shared").await.unwrap().status.unwrap();
    let writers = status.targets.iter().enumerate().map(|(i, t)| {
        let api = tools.clone();
        let r = toe_agent::node::status::TargetRef {
            namespace: "shop".into(),
            name: "shared".into(),
            uid: pt.metadata.uid.clone().unwrap(),
            generation: 1,
            target: t.clone(),
        };
        async move {
            let manager = toe_agent::node::status::field_manager(&format!("node-{i}"));
            for (phase, message) in [
                (toe_common::api::TargetPhase::Running, "running"),
                (toe_common::api::TargetPhase::Completed, "done"),
            ] {
                let wrote = toe_agent::node::status::update_target(&api, &manager, &r, |t| {
                    t.phase = Some(phase);
                    t.message = Some(format!("{message} on node-{i}"));
                })
                .await
                .unwrap();
                assert!(wrote, "node-{i}: the target vanished");
            }
        }
    });
    futures::future::join_all(writers).await;
    let status = tools.get("shared").await.unwrap().status.unwrap();
    assert_eq!(status.targets.len(), 8);
    for (i, t) in status.targets.iter().enumerate() {
        assert_eq!(
            (t.phase, t.message.clone()),
            (
                Some(toe_common::api::TargetPhase::Completed),
                Some(format!("done on node-{i}"))
            ),
            "an update of {} was undone: {status:?}",
            t.pod
        );
    }
    assert_eq!(status.phase, PowerToolPhase::Running);
}

/// An admin who tightens a PowerToolConfig re-checks what it admitted and no agent has started
/// yet: a PowerTool the new rule forbids is Rejected, with the rule, before anything runs.
#[tokio::test]
async fn a_config_change_rechecks_admitted_powertools() {
    let Some(server) = ApiServer::start("a_config_change_rechecks_admitted_powertools") else {
        return;
    };
    let client = server.client().await;
    install_crds(&client).await;
    seed_cluster(&client).await;
    let operator = Operator::start(&server, &client).await;
    let tools: Api<PowerTool> = Api::namespaced(client.clone(), "shop");
    let spec = serde_json::json!({"tool": {"name": "cpu-profile", "duration": "5m",
        "commandLineArguments": ["--frequency=150"]},
        "targets": {"labelSelector": {"matchLabels": {"app": "db"}}, "containers": ["app"]}});
    tools
        .create(&PostParams::default(), &powertool("slow", &spec))
        .await
        .unwrap();
    // No agent runs here: the run stays Admitted, its target Pending.
    let admitted = reached(&tools, "slow", PowerToolPhase::Admitted).await;
    assert_eq!(admitted.status.unwrap().targets.len(), 1);
    apply_configs(
        &client,
        &[(
            "cpu-profile",
            serde_json::json!({"tool": "cpu-profile", "allowedNamespaces": ["shop"],
                "maxDuration": "1m",
                "arguments": [{"name": "frequency", "type": "integer", "max": 199}]}),
        )],
    )
    .await;
    let rejected = reached(&tools, "slow", PowerToolPhase::Rejected).await;
    let s = rejected.status.unwrap();
    assert!(s.targets.is_empty(), "{s:?}");
    let message = &s.conditions[0].message;
    assert!(
        message.contains("1m") && message.contains("cpu-profile"),
        "{message}"
    );
    operator.stop().await;
}

/// A shutdown that comes before the controllers have listed anything (an operator pod deleted as
/// it starts, or an API server slow to answer) ends them, rather than waiting for the first list
/// that the shutdown itself cancelled.
#[tokio::test]
async fn an_operator_stopped_as_it_starts_stops() {
    let Some(server) = ApiServer::start("an_operator_stopped_as_it_starts_stops") else {
        return;
    };
    let admin = server.client().await;
    install_crds(&admin).await;
    let store = tempfile::tempdir().unwrap();
    let artifacts = url::Url::from_directory_path(store.path()).unwrap();
    Operator::start_with(&server, &admin, Some(artifacts))
        .await
        .stop()
        .await;
}

/// Who holds the operator's Lease now (None when nobody does).
async fn lease_holder(admin: &kube::Client) -> Option<String> {
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(admin.clone(), "toe-system")
        .get_opt("toe-operator")
        .await
        .unwrap()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

/// Polls `check` every 100 ms for at most `within`; whether it came true.
async fn eventually<F: Future<Output = bool>>(
    within: Duration,
    mut check: impl FnMut() -> F,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A rolling update's two replicas, as real `toe-operator` processes: the old one leads; the new
/// one waits for the lease. The old one's configuration (its store, its allowed outputs) is the
/// one being replaced, so once told to stop it must never lead again: a replica stopped while it
/// waits exits without leading, and a leader that stops gives the lease up rather than leaving
/// the next replica a lease duration without an operator.
#[tokio::test]
async fn a_replica_stopped_while_it_waits_never_leads_and_a_stopped_leader_gives_the_lease_up() {
    let Some(server) = ApiServer::start("a_replica_stopped_while_it_waits_never_leads") else {
        return;
    };
    let admin = server.client().await;
    install_crds(&admin).await;
    let _ = operator_identity(&server, &admin).await;
    let dir = tempfile::tempdir().unwrap();
    let mut old = OperatorProcess::start(&server, "replica-old", dir.path());
    assert!(
        eventually(Duration::from_mins(1), || async {
            lease_holder(&admin).await.as_deref() == Some("replica-old")
        })
        .await,
        "the first replica never led: {}",
        old.log_text()
    );
    let mut new = OperatorProcess::start(&server, "replica-new", dir.path());
    assert!(
        eventually(Duration::from_mins(1), || async {
            new.log_text().contains("another replica leads")
        })
        .await,
        "the second replica never waited for the lease: {}",
        new.log_text()
    );
    // The waiting replica is told to stop: it exits at once, without ever leading.
    let status = new.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}: {}", new.log_text());
    let log = new.log_text();
    assert!(log.contains("stopped before leading"), "{log}");
    assert!(
        !log.contains("\"leading\"") && !log.contains(" leading "),
        "{log}"
    );
    assert_eq!(lease_holder(&admin).await.as_deref(), Some("replica-old"));
    // The leader is told to stop: its controllers end, and it gives the lease up on its way out.
    let status = old.terminate(toe_operator::shutdown::GRACE + Duration::from_secs(30));
    assert!(status.success(), "{status}: {}", old.log_text());
    assert!(
        old.log_text().contains("gave the lease up"),
        "{}",
        old.log_text()
    );
    assert_eq!(lease_holder(&admin).await, None, "{}", old.log_text());
}
