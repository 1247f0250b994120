//! The validating admission webhook: the controller's admission, applied at `kubectl apply`
//! time so users see the error at once. It also checks that the requesting user may act in every
//! namespace the PowerTool targets (a SubjectAccessReview for creating PowerTools there), which
//! the controller cannot: only the webhook sees who asked. The controller's own check stays,
//! since a webhook can be bypassed or down.

use std::{net::SocketAddr, sync::Arc};

use axum::{Json, Router, extract::State, routing::post};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    },
};
use toe_common::api::{PowerTool, PowerToolConfig};

use crate::{
    admission, controller,
    metrics::{Decision, Metrics},
};

pub const PATH: &str = "/validate-powertool";

struct WebhookState {
    client: Client,
    metrics: Arc<Metrics>,
    /// Namespaces faults reach only where a config names them.
    protected: Vec<String>,
}

/// Whether `req`'s user may create PowerTools in `namespace`.
async fn may_create_powertools(
    client: &Client,
    req: &AdmissionRequest<PowerTool>,
    namespace: &str,
) -> Result<bool, kube::Error> {
    let u = &req.user_info;
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: u.username.clone(),
            groups: u.groups.clone(),
            uid: u.uid.clone(),
            extra: u.extra.clone().map(|e| {
                e.into_iter()
                    .map(|(k, v)| (k, v.into_iter().collect()))
                    .collect()
            }),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_owned()),
                verb: Some("create".into()),
                group: Some("toe.run".into()),
                resource: Some("powertools".into()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let done = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(done.status.is_some_and(|s| s.allowed))
}

/// The decision for one request: `Err` holds the message the user sees.
async fn decide(
    client: &Client,
    req: &AdmissionRequest<PowerTool>,
    protected: &[String],
) -> Result<(), String> {
    if matches!(req.operation, Operation::Delete | Operation::Connect) {
        return Ok(());
    }
    let Some(pt) = &req.object else {
        return Err("no object in the request".into());
    };
    let mut pt = pt.clone();
    if pt.metadata.namespace.is_none() {
        pt.metadata.namespace.clone_from(&req.namespace);
    }
    let configs: Vec<PowerToolConfig> = Api::<PowerToolConfig>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing PowerToolConfigs: {e}"))?
        .items;
    let verdict = admission::admit(&pt, &configs);
    if !verdict.admitted() {
        return Err(format!("{}: {}", verdict.reason, verdict.message));
    }
    let namespaces = controller::target_namespaces(client, &pt).await?;
    controller::namespaces_allowed(&pt, &configs, &namespaces, protected)?;
    let own = pt.metadata.namespace.clone().unwrap_or_default();
    for ns in namespaces.iter().filter(|ns| **ns != own) {
        let allowed = may_create_powertools(client, req, ns)
            .await
            .map_err(|e| format!("checking access to namespace {ns}: {e}"))?;
        if !allowed {
            return Err(format!(
                "spec.targets.namespaceSelector: {} may not create PowerTools in namespace {ns}, \
                 so may not target it",
                req.user_info.username.as_deref().unwrap_or("this user")
            ));
        }
    }
    Ok(())
}

async fn validate(
    State(state): State<Arc<WebhookState>>,
    Json(review): Json<AdmissionReview<PowerTool>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let req: AdmissionRequest<PowerTool> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            return Json(
                AdmissionResponse::invalid(format!("bad AdmissionReview: {e}")).into_review(),
            );
        }
    };
    let resp = AdmissionResponse::from(&req);
    let decision = decide(&state.client, &req, &state.protected).await;
    let reason = match &decision {
        Ok(()) => "Allowed".to_owned(),
        // "InvalidArgument: ..." -> "InvalidArgument"; other refusals count as "Denied".
        Err(m) => m
            .split_once(": ")
            .map(|(r, _)| r)
            .filter(|r| r.chars().all(|c| c.is_ascii_alphabetic()))
            .unwrap_or("Denied")
            .to_owned(),
    };
    state
        .metrics
        .webhook_requests
        .get_or_create(&Decision { reason })
        .inc();
    let resp = match decision {
        Ok(()) => resp,
        Err(message) => resp.deny(message),
    };
    Json(resp.into_review())
}

/// Serves the webhook over TLS on `addr` until `shutdown` resolves.
pub async fn serve(
    client: Client,
    metrics: Arc<Metrics>,
    protected: Vec<String>,
    addr: SocketAddr,
    tls: axum_server::tls_rustls::RustlsConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route(PATH, post(validate))
        .with_state(Arc::new(WebhookState {
            client,
            metrics,
            protected,
        }));
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
    });
    axum_server::bind_rustls(addr, tls)
        .handle(handle)
        .serve(app.into_make_service())
        .await?;
    Ok(())
}
