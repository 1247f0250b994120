//! Target selection: the pods a PowerTool's selectors matched -> the containers it acts on,
//! narrowed by its blast radius. Pure: the controller lists pods, this decides.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;
use toe_common::api::{BlastRadius, BlastRadiusMode, SelectedTarget, TargetPhase};

/// Why a matched pod or container is not a target (reported in the status message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub pod: String,
    pub why: String,
}

/// The containers of `pods` named in `containers` (every container when empty) that run on a
/// node and have a container id: only those can be acted on.
#[must_use]
pub fn containers_of(pods: &[Pod], containers: &[String]) -> (Vec<SelectedTarget>, Vec<Skipped>) {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for pod in pods {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let label = format!("{namespace}/{name}");
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            skipped.push(Skipped {
                pod: label,
                why: "not scheduled to a node yet".into(),
            });
            continue;
        };
        let statuses = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default();
        let declared: BTreeSet<&str> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter().map(|c| c.name.as_str()))
            .collect();
        for wanted in containers {
            if !declared.contains(wanted.as_str()) {
                skipped.push(Skipped {
                    pod: label.clone(),
                    why: format!("has no container {wanted}"),
                });
            }
        }
        for status in &statuses {
            if !containers.is_empty() && !containers.contains(&status.name) {
                continue;
            }
            let running = status.state.as_ref().is_some_and(|s| s.running.is_some());
            match (&status.container_id, running) {
                (Some(id), true) => out.push(SelectedTarget {
                    node: node.clone(),
                    namespace: namespace.clone(),
                    pod: name.clone(),
                    container: status.name.clone(),
                    container_id: id.clone(),
                    phase: None,
                    ..SelectedTarget::default()
                }),
                _ => skipped.push(Skipped {
                    pod: label.clone(),
                    why: format!("container {} is not running", status.name),
                }),
            }
        }
    }
    (out, skipped)
}

/// A stable order for choosing pods: the same PowerTool picks the same pods on every reconcile,
/// and different PowerTools spread over different pods (FNV-1a of the PowerTool's uid and the
/// pod's; std's hasher is randomly seeded per process, so it would not be stable).
fn rank(seed: &str, pod: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes().chain([0]).chain(pod.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The targets of the pods the blast radius allows: all, one, a count, or a percentage (rounded
/// up, at least one) of the distinct pods. Every selected container of a chosen pod is kept.
#[must_use]
pub fn blast_radius(
    targets: Vec<SelectedTarget>,
    radius: Option<&BlastRadius>,
    seed: &str,
) -> Vec<SelectedTarget> {
    let mut pods: Vec<(String, String)> = targets
        .iter()
        .map(|t| (t.namespace.clone(), t.pod.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let total = pods.len();
    let keep = match radius {
        None => total,
        Some(r) => match r.mode {
            BlastRadiusMode::All => total,
            BlastRadiusMode::One => 1,
            BlastRadiusMode::Count => r.count.map_or(total, |c| c as usize),
            BlastRadiusMode::Percent => {
                let p = r.percent.unwrap_or(100) as usize;
                (total * p).div_ceil(100).max(1)
            }
        },
    }
    .min(total);
    pods.sort_by_key(|(ns, name)| rank(seed, &format!("{ns}/{name}")));
    pods.truncate(keep);
    let mut out: Vec<SelectedTarget> = targets
        .into_iter()
        .filter(|t| pods.iter().any(|(ns, n)| *ns == t.namespace && *n == t.pod))
        .collect();
    out.sort_by(|a, b| {
        (&a.namespace, &a.pod, &a.container).cmp(&(&b.namespace, &b.pod, &b.container))
    });
    out
}

/// Honours `maxConcurrent`: pods past the limit wait (`Waiting`) and are released (`Pending`,
/// which the engines pick up) as others finish. Counts pods, like the blast radius. Returns
/// whether any target changed.
pub fn release_waiting(targets: &mut [SelectedTarget], max_concurrent: Option<u32>) -> bool {
    let pod = |t: &SelectedTarget| (t.namespace.clone(), t.pod.clone());
    let active =
        |t: &SelectedTarget| matches!(t.phase, Some(TargetPhase::Pending | TargetPhase::Running));
    let limit = max_concurrent.map_or(usize::MAX, |m| m as usize);
    let mut busy: BTreeSet<(String, String)> =
        targets.iter().filter(|t| active(t)).map(pod).collect();
    let mut changed = false;
    for t in targets.iter_mut() {
        let p = pod(t);
        let waiting = matches!(t.phase, None | Some(TargetPhase::Waiting));
        if !waiting {
            continue;
        }
        let next = if busy.contains(&p) || busy.len() < limit {
            busy.insert(p);
            TargetPhase::Pending
        } else {
            TargetPhase::Waiting
        };
        if t.phase != Some(next) {
            t.phase = Some(next);
            changed = true;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: Option<&str>, containers: &[(&str, Option<&str>, bool)]) -> Pod {
        let statuses: Vec<serde_json::Value> = containers
            .iter()
            .map(|(n, id, running)| {
                let state = if *running {
                    serde_json::json!({"running": {}})
                } else {
                    serde_json::json!({"waiting": {"reason": "ContainerCreating"}})
                };
                serde_json::json!({"name": n, "containerID": id, "state": state, "ready": running,
                    "restartCount": 0, "image": "x", "imageID": ""})
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"nodeName": node, "containers": containers.iter().map(|(n, ..)| serde_json::json!({"name": n})).collect::<Vec<_>>()},
            "status": {"containerStatuses": statuses},
        }))
        .unwrap()
    }

    #[test]
    fn only_running_containers_with_ids_on_a_node_are_targets() {
        let pods = [
            pod(
                "a",
                Some("n1"),
                &[
                    ("app", Some("containerd://1"), true),
                    ("sidecar", Some("containerd://2"), true),
                ],
            ),
            pod("b", None, &[("app", None, false)]),
            pod("c", Some("n2"), &[("app", None, false)]),
        ];
        let (t, skipped) = containers_of(&pods, &["sidecar".into()]);
        assert_eq!(t.len(), 1);
        assert_eq!(
            (
                t[0].pod.as_str(),
                t[0].container.as_str(),
                t[0].node.as_str()
            ),
            ("a", "sidecar", "n1")
        );
        assert_eq!(t[0].container_id, "containerd://2");
        let whys: Vec<String> = skipped
            .iter()
            .map(|s| format!("{}: {}", s.pod, s.why))
            .collect();
        assert_eq!(
            whys,
            [
                "shop/b: not scheduled to a node yet",
                "shop/c: has no container sidecar"
            ]
        );
        let (all, skipped) = containers_of(&pods, &[]);
        assert_eq!(all.len(), 2);
        assert!(
            skipped
                .iter()
                .any(|s| s.why == "container app is not running"),
            "{skipped:?}"
        );
    }

    #[test]
    fn at_most_max_concurrent_pods_run_and_the_rest_follow() {
        let pods: Vec<Pod> = (0..5)
            .map(|i| {
                pod(
                    &format!("p{i}"),
                    Some("n"),
                    &[("app", Some("c://a"), true), ("side", Some("c://b"), true)],
                )
            })
            .collect();
        let (mut t, _) = containers_of(&pods, &[]);
        assert!(release_waiting(&mut t, Some(2)));
        let phase = |t: &[SelectedTarget], want: TargetPhase| {
            t.iter()
                .filter(|x| x.phase == Some(want))
                .map(|x| x.pod.clone())
                .collect::<BTreeSet<_>>()
        };
        assert_eq!(
            phase(&t, TargetPhase::Pending).len(),
            2,
            "two pods, both containers each"
        );
        assert_eq!(
            t.iter()
                .filter(|x| x.phase == Some(TargetPhase::Pending))
                .count(),
            4
        );
        assert_eq!(phase(&t, TargetPhase::Waiting).len(), 3);
        assert!(
            !release_waiting(&mut t, Some(2)),
            "nothing finished, nothing released"
        );
        // One pod finishes: exactly one more is released.
        let done = phase(&t, TargetPhase::Pending).into_iter().next().unwrap();
        for x in t.iter_mut().filter(|x| x.pod == done) {
            x.phase = Some(TargetPhase::Completed);
        }
        assert!(release_waiting(&mut t, Some(2)));
        assert_eq!(phase(&t, TargetPhase::Pending).len(), 2);
        assert_eq!(phase(&t, TargetPhase::Waiting).len(), 2);
        let (mut all, _) = containers_of(&pods, &[]);
        release_waiting(&mut all, None);
        assert!(all.iter().all(|x| x.phase == Some(TargetPhase::Pending)));
    }

    #[test]
    fn blast_radius_is_stable_and_counts_pods_not_containers() {
        let pods: Vec<Pod> = (0..10)
            .map(|i| {
                pod(
                    &format!("p{i}"),
                    Some("n"),
                    &[("app", Some("c://a"), true), ("side", Some("c://b"), true)],
                )
            })
            .collect();
        let (targets, _) = containers_of(&pods, &[]);
        assert_eq!(targets.len(), 20);
        let radius = |mode, count, percent| BlastRadius {
            mode,
            count,
            percent,
            max_concurrent: None,
        };
        let pods_in =
            |t: &[SelectedTarget]| t.iter().map(|t| t.pod.clone()).collect::<BTreeSet<_>>();
        let one = blast_radius(
            targets.clone(),
            Some(&radius(BlastRadiusMode::One, None, None)),
            "uid-1",
        );
        assert_eq!(one.len(), 2, "both containers of the one pod");
        assert_eq!(pods_in(&one).len(), 1);
        // The same PowerTool picks the same pod again.
        assert_eq!(
            one,
            blast_radius(
                targets.clone(),
                Some(&radius(BlastRadiusMode::One, None, None)),
                "uid-1"
            )
        );
        let three = blast_radius(
            targets.clone(),
            Some(&radius(BlastRadiusMode::Count, Some(3), None)),
            "uid-1",
        );
        assert_eq!(pods_in(&three).len(), 3);
        let quarter = blast_radius(
            targets.clone(),
            Some(&radius(BlastRadiusMode::Percent, None, Some(25))),
            "uid-1",
        );
        assert_eq!(pods_in(&quarter).len(), 3, "25% of 10 pods, rounded up");
        assert_eq!(blast_radius(targets.clone(), None, "x").len(), 20);
        assert_eq!(
            blast_radius(
                targets.clone(),
                Some(&radius(BlastRadiusMode::Count, Some(50), None)),
                "x"
            )
            .len(),
            20
        );
        // Different PowerTools spread: over 20 seeds, more than one pod gets picked.
        let picked: BTreeSet<String> = (0..20)
            .flat_map(|s| {
                pods_in(&blast_radius(
                    targets.clone(),
                    Some(&radius(BlastRadiusMode::One, None, None)),
                    &format!("uid-{s}"),
                ))
            })
            .collect();
        assert!(picked.len() > 3, "{picked:?}");
    }
}
