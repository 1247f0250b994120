//! The operator's and the node agent's least-privilege roles, as data: `cargo xtask crds` writes
//! their rules into the chart (`charts/toe/files/`), and the tests run each component under
//! exactly its role against a real API server.

use k8s_openapi::{
    api::rbac::v1::{ClusterRole, PolicyRule, Role},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// The ValidatingWebhookConfiguration the chart installs; a cluster-wide name, fixed so that the
/// operator may update exactly this one (`resourceNames`).
pub const WEBHOOK_CONFIGURATION: &str = "toe-validate-powertool";
/// The Secret in the operator's namespace holding the webhook's self-generated CA and certificate.
pub const WEBHOOK_SECRET: &str = "toe-webhook-tls";

fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..PolicyRule::default()
    }
}

/// What the controller, the webhook and the leader election use, and nothing else.
#[must_use]
pub fn operator_cluster_role(name: &str) -> ClusterRole {
    ClusterRole {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![
            // Watch PowerTools; add and remove the finalizer; delete after the TTL.
            rule(
                "toe.run",
                &["powertools"],
                &["get", "list", "watch", "patch", "update", "delete"],
            ),
            rule(
                "toe.run",
                &["powertools/status"],
                &["get", "patch", "update"],
            ),
            rule("toe.run", &["powertoolconfigs"], &["get", "list", "watch"]),
            // Scheduled processing: read the specs, write their status.
            rule(
                "toe.run",
                &["powertoolprocessings"],
                &["get", "list", "watch"],
            ),
            rule(
                "toe.run",
                &["powertoolprocessings/status"],
                &["get", "patch"],
            ),
            // Target selection.
            rule("", &["pods", "namespaces"], &["get", "list"]),
            // The webhook asks whether the requesting user may act in a targeted namespace; the
            // report server, whether a reader may read a namespace's reports.
            rule(
                "authorization.k8s.io",
                &["subjectaccessreviews"],
                &["create"],
            ),
            // The report server authenticates its readers' bearer tokens.
            rule("authentication.k8s.io", &["tokenreviews"], &["create"]),
            rule("events.k8s.io", &["events"], &["create", "patch"]),
            // Leader election.
            rule(
                "coordination.k8s.io",
                &["leases"],
                &["get", "create", "update"],
            ),
            // A self-generated webhook certificate: its CA goes into this one configuration.
            PolicyRule {
                resource_names: Some(vec![WEBHOOK_CONFIGURATION.to_owned()]),
                ..rule(
                    "admissionregistration.k8s.io",
                    &["validatingwebhookconfigurations"],
                    &["get", "update"],
                )
            },
        ]),
        ..ClusterRole::default()
    }
}

/// Added to the operator's cluster role only where an admin enables image-based tools (the chart's
/// `imageTools.enabled`): one ephemeral container per target pod. Without it a cluster's operator
/// cannot add a container to any pod.
#[must_use]
pub fn operator_image_tool_rules() -> Vec<PolicyRule> {
    vec![rule(
        "",
        &["pods/ephemeralcontainers"],
        &["get", "patch", "update"],
    )]
}

/// Added only where an admin allows model endpoints (the chart's `reports.modelEndpoints`): the
/// API key of the Secret a processing names (get by name only, no list or watch; the operator
/// reads only Secrets labelled `toe.run/model-key=true`). Without it the operator reads no Secret
/// outside its own namespace.
#[must_use]
pub fn operator_model_rules() -> Vec<PolicyRule> {
    vec![rule("", &["secrets"], &["get"])]
}

/// The operator's cluster role with every optional grant: what it needs with image tools and the
/// model step both enabled.
#[must_use]
pub fn operator_cluster_role_with_everything(name: &str) -> ClusterRole {
    let mut role = operator_cluster_role(name);
    role.rules.get_or_insert_with(Vec::new).extend(
        operator_image_tool_rules()
            .into_iter()
            .chain(operator_model_rules()),
    );
    role
}

/// What the operator needs in its own namespace only: the Secret that keeps its self-generated
/// webhook certificate, shared by every replica. `create` cannot be limited to one name
/// (Kubernetes checks resourceNames only for requests that name an object), hence two rules.
#[must_use]
pub fn operator_namespace_role(name: &str, namespace: &str) -> Role {
    Role {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![
            // What each node's agent reported it can run (one ConfigMap per node).
            rule("", &["configmaps"], &["get"]),
            rule("", &["secrets"], &["create"]),
            PolicyRule {
                resource_names: Some(vec![WEBHOOK_SECRET.to_owned()]),
                ..rule("", &["secrets"], &["get", "update"])
            },
        ]),
    }
}

/// What the node agent (`toe agent`) uses, and nothing else: it reads PowerTools and configs,
/// looks up each target's pod and writes its targets' progress into PowerTool status. It holds no
/// right on Node objects.
#[must_use]
pub fn agent_cluster_role(name: &str) -> ClusterRole {
    ClusterRole {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![
            rule("toe.run", &["powertools"], &["get", "list", "watch"]),
            rule("toe.run", &["powertools/status"], &["get", "patch"]),
            rule("toe.run", &["powertoolconfigs"], &["get", "list", "watch"]),
            // Each target's pod, looked up before acting: status is not trusted.
            rule("", &["pods"], &["get"]),
        ]),
        ..ClusterRole::default()
    }
}

/// What the node agent needs in TOE's own namespace: the ConfigMap where it publishes its node's
/// capabilities (`create` cannot be limited to a name, so any agent could write another node's:
/// at worst TOE itself sends a run to a node that cannot do it, and the agent there refuses it).
#[must_use]
pub fn agent_namespace_role(name: &str, namespace: &str) -> Role {
    Role {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![rule("", &["configmaps"], &["get", "create", "patch"])]),
    }
}

/// What a namespace tenant gets through the built-in `edit` and `admin` roles (the chart labels
/// the ClusterRole to aggregate into them): PowerTools and PowerToolProcessings, but never their
/// `status`, which the operator and the agents write and which no tenant may forge.
#[must_use]
pub fn tenant_edit_rules() -> Vec<PolicyRule> {
    vec![rule(
        "toe.run",
        &["powertools", "powertoolprocessings"],
        &[
            "get", "list", "watch", "create", "update", "patch", "delete",
        ],
    )]
}

/// What the built-in `view` role gets (aggregated): reading PowerTools, their status included,
/// and PowerToolProcessings. The configs are the admins'.
#[must_use]
pub fn tenant_view_rules() -> Vec<PolicyRule> {
    vec![rule(
        "toe.run",
        &[
            "powertools",
            "powertools/status",
            "powertoolprocessings",
            "powertoolprocessings/status",
        ],
        &["get", "list", "watch"],
    )]
}

#[cfg(test)]
mod tenant_tests {
    use super::*;

    #[test]
    fn tenants_never_write_status() {
        for r in tenant_edit_rules().iter().chain(&tenant_view_rules()) {
            let writes = r
                .verbs
                .iter()
                .any(|v| v != "get" && v != "list" && v != "watch");
            let status = r.resources.iter().flatten().any(|x| x.ends_with("/status"));
            assert!(!(writes && status), "{r:?}");
        }
    }
}
