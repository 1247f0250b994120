//! Ephemeral-container mode for image-based tools: one ephemeral container per target pod,
//! sharing the target container's process namespace (`targetContainerName`), running the tool's
//! image with the validated argv (never a shell). The request differs by server version: since
//! 1.22 the `ephemeralcontainers` subresource takes a Pod patch; before, an alpha
//! `EphemeralContainers` object (behind the EphemeralContainers feature gate).

use k8s_openapi::api::core::v1::Pod;
use toe_common::api::ImageOptions;

/// Which shape of the subresource the server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// 1.16-1.21: `EphemeralContainers` objects, alpha.
    Alpha,
    /// 1.22 and later: a strategic-merge patch of the Pod's `spec.ephemeralContainers`.
    Pod,
}

impl Api {
    /// From `/version`'s minor (`"20"`, `"27+"`).
    #[must_use]
    pub fn for_minor(minor: &str) -> Self {
        let n: u32 = minor.trim_end_matches('+').parse().unwrap_or(u32::MAX);
        if n < 22 { Self::Alpha } else { Self::Pod }
    }
}

/// The container's name: stable per PowerTool (a retried launch finds it), unique across
/// PowerTools (the uid), a valid DNS label.
#[must_use]
pub fn container_name(powertool: &str, uid: &str) -> String {
    let short: String = uid
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    let mut base: String = powertool.chars().take(63 - 5 - short.len()).collect();
    while base.ends_with('-') {
        base.pop();
    }
    format!("toe-{base}-{short}").to_ascii_lowercase()
}

/// What the tool is told: where to write (`TOE_OUTPUT_URL`) and how long to run
/// (`TOE_DURATION_SECONDS`); ephemeral containers cannot be stopped through the API, so the
/// tool must end itself.
#[must_use]
pub fn container(
    name: &str,
    opts: &ImageOptions,
    target_container: &str,
    output_url: &str,
    duration_s: u64,
) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "args": opts.argv,
        "targetContainerName": target_container,
        "env": [
            {"name": "TOE_OUTPUT_URL", "value": output_url},
            {"name": "TOE_DURATION_SECONDS", "value": duration_s.to_string()},
        ],
        "stdin": false,
        "tty": false,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })
}

/// The exact request that adds `container` to `pod`.
///
/// # Panics
/// Never: the URI is built from a namespace and name the API server already accepted.
#[must_use]
pub fn launch_request(
    api: Api,
    namespace: &str,
    pod: &str,
    container: &serde_json::Value,
) -> http::Request<Vec<u8>> {
    let body = match api {
        Api::Pod => serde_json::json!({"spec": {"ephemeralContainers": [container]}}),
        Api::Alpha => serde_json::json!({
            "apiVersion": "v1",
            "kind": "EphemeralContainers",
            "metadata": {"name": pod, "namespace": namespace},
            "ephemeralContainers": [container],
        }),
    };
    http::Request::builder()
        .method(http::Method::PATCH)
        .uri(format!(
            "/api/v1/namespaces/{namespace}/pods/{pod}/ephemeralcontainers"
        ))
        .header(
            http::header::CONTENT_TYPE,
            "application/strategic-merge-patch+json",
        )
        .header(http::header::ACCEPT, "application/json")
        .body(serde_json::to_vec(&body).expect("JSON"))
        .expect("a valid request")
}

/// Adds `container` to `pod` unless it is there already: the version decides the request's
/// shape; a retried reconcile never adds a second one.
pub async fn add(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
    container: &serde_json::Value,
) -> Result<(), kube::Error> {
    let api = Api::for_minor(&client.apiserver_version().await?.minor);
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
    let current = pods.get(pod).await?;
    let name = container["name"].as_str().unwrap_or_default();
    if launched(&current, name) {
        return Ok(());
    }
    client
        .request::<serde_json::Value>(launch_request(api, namespace, pod, container))
        .await?;
    Ok(())
}

/// Whether `pod` already has the ephemeral container `name` (a launch is never repeated).
#[must_use]
pub fn launched(pod: &Pod, name: &str) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.ephemeral_containers.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.name == name))
}

/// How the ephemeral container `name` ended: (exit code, reason), or None while it runs.
#[must_use]
pub fn outcome(pod: &Pod, name: &str) -> Option<(i32, String)> {
    let status = pod
        .status
        .as_ref()?
        .ephemeral_container_statuses
        .as_ref()?
        .iter()
        .find(|s| s.name == name)?;
    let t = status.state.as_ref()?.terminated.as_ref()?;
    Some((t.exit_code, t.reason.clone().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_dns_labels() {
        let n = container_name(
            "profile-checkout-with-a-rather-long-name-for-a-powertool",
            "3f2a-91bc-77de",
        );
        assert!(n.len() <= 63, "{n}");
        assert!(n.starts_with("toe-profile-checkout"));
        assert!(n.ends_with("-3f2a91bc"));
        assert_eq!(
            n,
            container_name(
                "profile-checkout-with-a-rather-long-name-for-a-powertool",
                "3f2a-91bc-77de"
            )
        );
        assert_eq!(Api::for_minor("20"), Api::Alpha);
        assert_eq!(Api::for_minor("27+"), Api::Pod);
    }

    #[test]
    fn the_request_has_the_shape_each_server_expects() {
        let opts = ImageOptions {
            image: "registry.example/aperf:1.2".into(),
            argv: vec!["--interval=1".into()],
        };
        let c = container("toe-x-1", &opts, "app", "s3://b/shop/x/", 60);
        let modern = launch_request(Api::Pod, "shop", "web-1", &c);
        assert_eq!(modern.method(), http::Method::PATCH);
        assert_eq!(
            modern.uri(),
            "/api/v1/namespaces/shop/pods/web-1/ephemeralcontainers"
        );
        let body: serde_json::Value = serde_json::from_slice(modern.body()).unwrap();
        let ec = &body["spec"]["ephemeralContainers"][0];
        assert_eq!(ec["targetContainerName"], "app");
        assert_eq!(ec["args"], serde_json::json!(["--interval=1"]));
        assert!(
            ec.get("command").is_none(),
            "the image's entrypoint runs, never a shell"
        );
        assert!(ec.get("resources").is_none());
        let alpha: serde_json::Value =
            serde_json::from_slice(launch_request(Api::Alpha, "shop", "web-1", &c).body()).unwrap();
        assert_eq!(alpha["kind"], "EphemeralContainers");
        assert_eq!(alpha["ephemeralContainers"][0], c);
    }

    /// A 1.27 API server, played back from recorded responses: the operator asks the version,
    /// reads the pod, and patches the Pod-shaped subresource once; a second call finds the
    /// container and sends nothing.
    #[tokio::test]
    async fn a_modern_server_gets_a_pod_patch_once() {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "shop");
        let opts = ImageOptions {
            image: "registry.example/aperf:1.2".into(),
            argv: vec!["--interval=5".into()],
        };
        let c = container("toe-aperf-1234", &opts, "app", "s3://b/x/", 60);
        let version = r#"{"major":"1","minor":"27+","gitVersion":"v1.27.3","gitCommit":"","gitTreeState":"","buildDate":"","goVersion":"","compiler":"","platform":""}"#;
        let pod_without = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web-1","namespace":"shop"},"spec":{"containers":[{"name":"app","image":"x"}]}}"#;
        let pod_with = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web-1","namespace":"shop"},"spec":{"containers":[{"name":"app","image":"x"}],"ephemeralContainers":[{"name":"toe-aperf-1234","image":"registry.example/aperf:1.2","targetContainerName":"app"}]}}"#;
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for (respond, with) in [
                (true, version),
                (true, pod_without),
                (true, pod_with),
                (true, version),
                (true, pod_with),
            ] {
                let (req, send) = handle.next_request().await.expect("a request");
                let method = req.method().clone();
                let uri = req.uri().to_string();
                let body = req.into_body().collect_bytes().await.unwrap();
                seen.push((method, uri, body));
                if respond {
                    send.send_response(
                        Response::builder()
                            .status(200)
                            .body(Body::from(with.as_bytes().to_vec()))
                            .unwrap(),
                    );
                }
            }
            seen
        });
        add(&client, "shop", "web-1", &c).await.unwrap();
        add(&client, "shop", "web-1", &c).await.unwrap();
        let seen = server.await.unwrap();
        let patches: Vec<_> = seen
            .iter()
            .filter(|(m, ..)| m == http::Method::PATCH)
            .collect();
        assert_eq!(patches.len(), 1, "{seen:?}");
        let (_, uri, body) = patches[0];
        assert_eq!(
            uri,
            "/api/v1/namespaces/shop/pods/web-1/ephemeralcontainers"
        );
        let body: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(body["spec"]["ephemeralContainers"][0], c);
    }
}
