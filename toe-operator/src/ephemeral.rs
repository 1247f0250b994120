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

    /// The ephemeralcontainers subresource of a 1.22+ API server, as its handler and validation
    /// treat a PATCH (`k8s.io/kubernetes` `pkg/registry/core/pod/storage` and
    /// `pkg/apis/core/validation` `validateEphemeralContainers`): only the patch media types are
    /// accepted (415 otherwise); the patch is a Pod, merged into the stored one by container name;
    /// a name used by any container, or `resources`, `ports` or probes on an ephemeral container,
    /// or a target container that does not exist, is a 422 with the field named. The pod it holds
    /// changes only when a patch is valid, so a request of the wrong shape leaves no container.
    struct Modern {
        pod: serde_json::Value,
    }

    impl Modern {
        fn status(code: u16, reason: &str, message: &str) -> (u16, serde_json::Value) {
            (
                code,
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "message": message, "reason": reason, "code": code}),
            )
        }

        fn handle(
            &mut self,
            method: &http::Method,
            uri: &str,
            content_type: &str,
            body: &[u8],
        ) -> (u16, serde_json::Value) {
            match (method.as_str(), uri.split('?').next().unwrap_or_default()) {
                ("GET", "/version") => (
                    200,
                    serde_json::json!({"major": "1", "minor": "27+", "gitVersion": "v1.27.3"}),
                ),
                ("GET", "/api/v1/namespaces/shop/pods/web-1") => (200, self.pod.clone()),
                ("PATCH", "/api/v1/namespaces/shop/pods/web-1/ephemeralcontainers") => {
                    self.patch(content_type, body)
                }
                _ => Self::status(404, "NotFound", "the server could not find the resource"),
            }
        }

        fn patch(&mut self, content_type: &str, body: &[u8]) -> (u16, serde_json::Value) {
            const PATCHES: [&str; 4] = [
                "application/json-patch+json",
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
                "application/apply-patch+yaml",
            ];
            if !PATCHES.contains(&content_type) {
                return Self::status(
                    415,
                    "UnsupportedMediaType",
                    &format!(
                        "the body of the request was in an unknown format - accepted media types include: {}",
                        PATCHES.join(", ")
                    ),
                );
            }
            let Ok(patch) = serde_json::from_slice::<serde_json::Value>(body) else {
                return Self::status(400, "BadRequest", "invalid JSON");
            };
            // Fields a Pod does not have are dropped (a strategic merge of an EphemeralContainers
            // object into a Pod changes nothing).
            let added = patch["spec"]["ephemeralContainers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let names = |key: &str, pod: &serde_json::Value| -> Vec<String> {
                pod["spec"][key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["name"].as_str().map(str::to_owned))
                    .collect()
            };
            let containers = names("containers", &self.pod);
            let mut ephemeral = names("ephemeralContainers", &self.pod);
            for (i, c) in added.iter().enumerate() {
                let field = format!("spec.ephemeralContainers[{i}]");
                let name = c["name"].as_str().unwrap_or_default();
                if ephemeral.iter().any(|n| n == name) {
                    // Merged by name: the same container again is no change.
                    continue;
                }
                if containers.iter().any(|n| n == name) {
                    return Self::status(
                        422,
                        "Invalid",
                        &format!(
                            "Pod \"web-1\" is invalid: {field}.name: Duplicate value: \"{name}\""
                        ),
                    );
                }
                for forbidden in ["resources", "ports", "livenessProbe", "readinessProbe"] {
                    if c.get(forbidden).is_some() {
                        return Self::status(
                            422,
                            "Invalid",
                            &format!(
                                "Pod \"web-1\" is invalid: {field}.{forbidden}: Forbidden: cannot be set for an Ephemeral Container"
                            ),
                        );
                    }
                }
                let target = c["targetContainerName"].as_str().unwrap_or_default();
                if !target.is_empty() && !containers.iter().any(|n| n == target) {
                    return Self::status(
                        422,
                        "Invalid",
                        &format!(
                            "Pod \"web-1\" is invalid: {field}.targetContainerName: Not found: \"{target}\""
                        ),
                    );
                }
                ephemeral.push(name.to_owned());
                let list = self.pod["spec"]["ephemeralContainers"]
                    .as_array_mut()
                    .map(std::mem::take)
                    .unwrap_or_default();
                let mut list = list;
                list.push(c.clone());
                self.pod["spec"]["ephemeralContainers"] = list.into();
            }
            (200, self.pod.clone())
        }
    }

    fn web_1() -> Modern {
        Modern {
            pod: serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web-1", "namespace": "shop"},
                "spec": {"containers": [{"name": "app", "image": "x"}]}}),
        }
    }

    /// The server as it ended, and every request it saw.
    type Served = tokio::task::JoinHandle<(Modern, Vec<(http::Method, String)>)>;

    /// Serves `server` to a kube client until the client goes away.
    fn serve(mut server: Modern) -> (kube::Client, Served) {
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let method = req.method().clone();
                let uri = req.uri().to_string();
                let content_type = req
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let body = req.into_body().collect_bytes().await.unwrap();
                let (code, answer) = server.handle(&method, &uri, &content_type, &body);
                seen.push((method, uri));
                send.send_response(
                    Response::builder()
                        .status(code)
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            }
            (server, seen)
        });
        (kube::Client::new(service, "shop"), task)
    }

    fn aperf(name: &str) -> serde_json::Value {
        let opts = ImageOptions {
            image: "registry.example/aperf:1.2".into(),
            argv: vec!["--interval=5".into()],
        };
        container(name, &opts, "app", "s3://b/x/", 60)
    }

    /// Against a 1.22+ server: one PATCH of the Pod-shaped subresource adds the container (the
    /// server's pod has it afterwards); a second call finds it and sends nothing.
    #[tokio::test]
    async fn a_modern_server_gets_one_valid_pod_patch() {
        let c = aperf("toe-aperf-1234");
        let (client, server) = serve(web_1());
        add(&client, "shop", "web-1", &c).await.unwrap();
        add(&client, "shop", "web-1", &c).await.unwrap();
        drop(client);
        let (server, seen) = server.await.unwrap();
        let patches = seen
            .iter()
            .filter(|(m, _)| m == http::Method::PATCH)
            .count();
        assert_eq!(patches, 1, "{seen:?}");
        assert_eq!(
            server.pod["spec"]["ephemeralContainers"][0], c,
            "the server's pod lacks the container"
        );
    }

    /// The mock refuses what a real server refuses, so a wrong request cannot pass the test above.
    #[tokio::test]
    async fn what_a_real_server_refuses_is_refused() {
        let ok = aperf("toe-aperf-1");
        let wrong = |mut req: http::Request<Vec<u8>>, content_type: &str| {
            req.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_str(content_type).unwrap(),
            );
            req
        };
        let mut with_resources = aperf("toe-aperf-2");
        with_resources["resources"] = serde_json::json!({"limits": {"cpu": "1"}});
        let cases = [
            (
                wrong(
                    launch_request(Api::Pod, "shop", "web-1", &ok),
                    "application/json",
                ),
                "415",
            ),
            (
                launch_request(Api::Pod, "shop", "web-1", &aperf("app")),
                "Duplicate value: \"app\"",
            ),
            (
                launch_request(Api::Pod, "shop", "web-1", &with_resources),
                "resources: Forbidden",
            ),
        ];
        for (req, want) in cases {
            let (client, server) = serve(web_1());
            let err = client
                .request::<serde_json::Value>(req)
                .await
                .expect_err(want);
            assert!(err.to_string().contains(want), "{want}: {err}");
            drop(client);
            let (server, _) = server.await.unwrap();
            assert!(server.pod["spec"]["ephemeralContainers"].is_null());
        }
        // The pre-1.22 shape against a modern server: accepted, and nothing is added.
        let (client, server) = serve(web_1());
        let _ = client
            .request::<serde_json::Value>(launch_request(Api::Alpha, "shop", "web-1", &ok))
            .await;
        drop(client);
        let (server, _) = server.await.unwrap();
        assert!(server.pod["spec"]["ephemeralContainers"].is_null());
    }
}
