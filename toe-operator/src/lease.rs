//! Leader election over a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! one reconciles at a time. kube-rs ships no elector; this follows client-go's: take the lease
//! when it is free or its holder stopped renewing, renew it well within its duration, and write
//! with the lease's resourceVersion so two candidates can never both win the same round.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{Api, Client, api::PostParams};

use crate::shutdown::Signal;

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

/// Whether `spec` lets `identity` take or keep the lease at `now`.
fn may_hold(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> bool {
    let Some(spec) = spec else {
        return true;
    };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(h) if h == identity => true,
        Some(_) => {
            let (Some(renewed), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds)
            else {
                return true;
            };
            renewed
                .0
                .checked_add(SignedDuration::from_secs(i64::from(secs)))
                .is_ok_and(|expiry| now >= expiry)
        }
    }
}

impl Elector {
    #[must_use]
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
        }
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One round: true when this candidate holds the lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                // Another candidate created it first.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        if !may_hold(lease.spec.as_ref(), &self.identity, now) {
            return Ok(false);
        }
        let old = lease.spec.clone().unwrap_or_default();
        let ours = old.holder_identity.as_deref() == Some(self.identity.as_str());
        let transitions = old.lease_transitions.unwrap_or(0) + i32::from(!ours);
        lease.spec = Some(self.spec(now, ours.then_some(old.acquire_time).flatten(), transitions));
        // The replace carries the resourceVersion read above: a concurrent writer makes it fail.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this candidate leads, then runs `work` while renewing the lease. Returns when
    /// `work` ends, when leadership is lost (the caller must stop reconciling at once), or,
    /// without ever leading, when `stop` fires while it waits: a replica told to stop (the old
    /// one in a rolling update) must not start leading later with what may be an old
    /// configuration. `work` must end by itself once `stop` fires; a leader that ends that way
    /// gives the lease up, so the next replica leads at once rather than a lease duration later.
    pub async fn lead<F: Future<Output = ()>>(&self, work: F, stop: &Signal) {
        let retry = self.duration / 3;
        let waited = stop
            .unless_fired(async {
                let mut told = false;
                loop {
                    match self.try_acquire_or_renew().await {
                        Ok(true) => break,
                        Ok(false) if !told => {
                            tracing::info!(lease = %self.name, "another replica leads; waiting");
                            told = true;
                        }
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "leader election"),
                    }
                    tokio::time::sleep(retry).await;
                }
            })
            .await;
        if waited.is_none() {
            tracing::info!("stopped before leading");
            // The signal may have come as the lease was taken: it is not kept.
            self.release().await;
            return;
        }
        tracing::info!(identity = %self.identity, lease = %self.name, "leading");
        let renew = async {
            loop {
                tokio::time::sleep(retry).await;
                match self.try_acquire_or_renew().await {
                    Ok(true) => {}
                    Ok(false) => return,
                    // A failed renewal is retried; the lease only lapses after its duration.
                    Err(e) => tracing::warn!(error = %e, "renewing the lease"),
                }
            }
        };
        tokio::select! {
            () = work => self.release().await,
            () = renew => tracing::warn!("lost the lease; stopping"),
        }
    }

    /// Gives the lease up if this candidate still holds it, as client-go's `ReleaseOnCancel`
    /// does: no holder and a one-second duration. Written with the resourceVersion just read, so
    /// a lease another replica took meanwhile is left alone.
    async fn release(&self) {
        let released = async {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok(false);
            };
            let spec = lease.spec.get_or_insert_default();
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(false);
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
                .map(|_| true)
        }
        .await;
        match released {
            Ok(true) => tracing::info!(lease = %self.name, "gave the lease up"),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "giving the lease up (the next replica leads once it expires)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(by: &str, renewed: &str, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            renew_time: Some(MicroTime(renewed.parse().unwrap())),
            lease_duration_seconds: Some(secs),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_lease_is_taken_only_when_free_ours_or_expired() {
        let now: Timestamp = "2026-11-26T12:00:00Z".parse().unwrap();
        assert!(may_hold(None, "a", now));
        assert!(may_hold(Some(&LeaseSpec::default()), "a", now));
        assert!(may_hold(
            Some(&held("a", "2026-11-26T11:59:59Z", 15)),
            "a",
            now
        ));
        assert!(!may_hold(
            Some(&held("b", "2026-11-26T11:59:50Z", 15)),
            "a",
            now
        ));
        assert!(may_hold(
            Some(&held("b", "2026-11-26T11:59:40Z", 15)),
            "a",
            now
        ));
    }
}
