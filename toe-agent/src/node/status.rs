//! The agent's writes to a PowerTool's status: one target's entry at a time, by server-side
//! apply under the agent's own field manager. `status.targets` is one list shared with the
//! operator and the other nodes' agents, so every write is read-modify-write with the object's
//! resourceVersion as a precondition: a concurrent writer makes the API server answer 409 and
//! the write is redone on the new object, never lost and never undoing someone else's.

use std::time::Duration;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, ResourceExt as _,
    api::{Patch, PatchParams},
};
use toe_common::api::{PowerTool, PowerToolPhase, PowerToolStatus, SelectedTarget, TargetPhase};

/// Which PowerTool (by uid: a re-created one of the same name is another run) and which target.
#[derive(Clone, Debug)]
pub struct TargetRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: i64,
    pub target: SelectedTarget,
}

/// The agent's field manager on node `node` (managers are at most 128 bytes).
#[must_use]
pub fn field_manager(node: &str) -> String {
    let mut m = format!("toe-agent/{node}");
    m.truncate(128);
    m
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Applies `change` to the target's entry. The run's phase moves from Admitted to Running (with
/// its start time) when the first target leaves Pending. Returns false when there is nothing to
/// update: the PowerTool is gone, is another generation, or no longer lists the target.
pub async fn update_target(
    api: &Api<PowerTool>,
    manager: &str,
    r: &TargetRef,
    change: impl Fn(&mut SelectedTarget),
) -> Result<bool, kube::Error> {
    for attempt in 0u32.. {
        let Some(pt) = api.get_opt(&r.name).await? else {
            return Ok(false);
        };
        if pt.uid().as_deref() != Some(r.uid.as_str())
            || pt.metadata.generation != Some(r.generation)
        {
            return Ok(false);
        }
        let mut status: PowerToolStatus = pt.status.clone().unwrap_or_default();
        let Some(t) = status
            .targets
            .iter_mut()
            .find(|t| t.same_container(&r.target))
        else {
            return Ok(false);
        };
        let before = t.clone();
        change(t);
        if *t == before {
            return Ok(true);
        }
        let started = t.phase != Some(TargetPhase::Pending);
        if started && status.phase == PowerToolPhase::Admitted {
            status.phase = PowerToolPhase::Running;
            status.start_time = Some(Time(Timestamp::now()));
        }
        let patch = serde_json::json!({
            "apiVersion": "toe.run/v1alpha1",
            "kind": "PowerTool",
            "metadata": {"resourceVersion": pt.resource_version()},
            "status": status,
        });
        match api
            .patch_status(
                &r.name,
                &PatchParams::apply(manager).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => return Ok(true),
            Err(e) if conflict(&e) && attempt < 50 => {
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt.min(10)))).await;
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("the loop returns")
}
