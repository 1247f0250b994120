//! The operator's and the node agent's least-privilege ClusterRoles, as data: the chart renders
//! them and the tests run each under exactly its role against a real API server.

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use kube::api::ObjectMeta;

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
            // The model endpoint's API key, from the Secret a processing names (get by name only:
            // no list or watch of Secrets).
            rule("", &["secrets"], &["get"]),
            // Target selection.
            rule("", &["pods", "namespaces"], &["get", "list"]),
            // What each node's agent reported it can run (an annotation).
            rule("", &["nodes"], &["get"]),
            // Image-based tools: one ephemeral container per target pod.
            rule(
                "",
                &["pods/ephemeralcontainers"],
                &["get", "patch", "update"],
            ),
            // The webhook asks whether the requesting user may act in a targeted namespace.
            rule(
                "authorization.k8s.io",
                &["subjectaccessreviews"],
                &["create"],
            ),
            rule("events.k8s.io", &["events"], &["create", "patch"]),
            // Leader election.
            rule(
                "coordination.k8s.io",
                &["leases"],
                &["get", "create", "update"],
            ),
        ]),
        ..ClusterRole::default()
    }
}

/// What the node agent (`toe agent`) uses, and nothing else: it reads PowerTools and configs,
/// writes its targets' progress into PowerTool status, and publishes its node's capabilities.
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
            // The capability probe's annotation on its own Node.
            rule("", &["nodes"], &["get", "patch"]),
        ]),
        ..ClusterRole::default()
    }
}
