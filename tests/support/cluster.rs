//! A small cluster on the API server harness: the CRDs, identities bound to exactly the roles
//! TOE ships, the operator in-process, the node agent as a real `toe agent` process, and Pods
//! whose status the test reports the way a kubelet would (there is none).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{ConfigMap, Namespace, Node, Pod},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde::Deserialize as _;
use toe_common::api::PowerTool;

use crate::{
    TestProcess,
    apiserver::{AGENT_TOKEN, AGENT_USER, ApiServer, OPERATOR_TOKEN, OPERATOR_USER},
    bin,
};

#[must_use]
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The YAML documents of `file`, parsed as `T` (empty documents skipped).
#[must_use]
pub fn documents<T: serde::de::DeserializeOwned>(file: &Path) -> Vec<T> {
    yaml_documents(
        &std::fs::read_to_string(file).unwrap(),
        &file.display().to_string(),
    )
}

/// The YAML documents of `text` (from `source`, for messages), parsed as `T` (empty documents
/// skipped).
#[must_use]
pub fn yaml_documents<T: serde::de::DeserializeOwned>(text: &str, source: &str) -> Vec<T> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| serde_yaml::from_value(v).unwrap_or_else(|e| panic!("{source}: {e}")))
        .collect()
}

/// Installs the chart's CRDs and waits until each is Established.
pub async fn install_crds(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo().join("charts/toe/crds")).unwrap() {
        let path = entry.unwrap().path();
        for crd in documents::<CustomResourceDefinition>(&path) {
            let name = crd.metadata.name.clone().unwrap();
            crds.create(&PostParams::default(), &crd)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            names.push(name);
        }
    }
    assert_eq!(names.len(), 3, "{names:?}");
    for name in names {
        let mut established = false;
        for _ in 0..100 {
            let crd = crds.get(&name).await.unwrap();
            established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(established, "{name} never became Established");
    }
}

/// Binds `role` to `user` cluster-wide.
async fn bind(admin: &kube::Client, role: &ClusterRole, user: &str) {
    let apply = PatchParams::apply("toe-test").force();
    let name = role.metadata.name.clone().unwrap();
    Api::<ClusterRole>::all(admin.clone())
        .patch(&name, &apply, &Patch::Apply(role))
        .await
        .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(admin.clone())
        .patch(&name, &apply, &Patch::Apply(&binding))
        .await
        .unwrap();
}

/// A client for a namespace tenant (alice) bound in `ns` to exactly the role the chart
/// aggregates into `edit`: PowerTools and PowerToolProcessings, never their status.
pub async fn tenant_identity(server: &ApiServer, admin: &kube::Client, ns: &str) -> kube::Client {
    let role: ClusterRole = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "toe-tenant-edit"},
        "rules": toe_common::api::rbac::tenant_edit_rules(),
    }))
    .unwrap();
    let apply = PatchParams::apply("toe-test").force();
    Api::<ClusterRole>::all(admin.clone())
        .patch("toe-tenant-edit", &apply, &Patch::Apply(&role))
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "toe-tenant-alice"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "toe-tenant-edit"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                      "name": "alice"}],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .patch("toe-tenant-alice", &apply, &Patch::Apply(&binding))
        .await
        .unwrap();
    server.client_as(crate::apiserver::ALICE_TOKEN).await
}

/// Creates `pt` until the API server refuses it (it picks up a new webhook configuration within
/// a moment; until then creations pass and are undone), returning the refusal.
pub async fn first_refusal(api: &Api<PowerTool>, pt: &PowerTool) -> String {
    for _ in 0..100 {
        if let Err(e) = api.create(&PostParams::default(), pt).await {
            return e.to_string();
        }
        api.delete(
            pt.metadata.name.as_deref().unwrap(),
            &kube::api::DeleteParams::default(),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the webhook never refused");
}

/// Binds the namespaced `role` to `user` in the role's namespace.
async fn bind_in_namespace(admin: &kube::Client, role: &Role, user: &str) {
    let apply = PatchParams::apply("toe-test").force();
    let name = role.metadata.name.clone().unwrap();
    let ns = role.metadata.namespace.clone().unwrap();
    Api::<Role>::namespaced(admin.clone(), &ns)
        .patch(&name, &apply, &Patch::Apply(role))
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .patch(&name, &apply, &Patch::Apply(&binding))
        .await
        .unwrap();
}

/// A local port nobody listens on (for a server this test starts).
#[must_use]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

/// The operator's admission webhook, served by this test process on 127.0.0.1.
pub struct Webhook {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Webhook {
    /// Serves the webhook as `client` on 127.0.0.1:`port` with `tls`.
    #[must_use]
    pub fn serve(
        client: &kube::Client,
        port: u16,
        tls: axum_server::tls_rustls::RustlsConfig,
    ) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(toe_operator::webhook::serve(
            client.clone(),
            std::sync::Arc::default(),
            toe_operator::controller::protected_namespaces("toe-system"),
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            tls,
            async {
                let _ = stopped.await;
            },
        ));
        Self { stop, task }
    }

    /// Shuts it down; fails the test if serving failed.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Creates namespace `name` (and its labels).
pub async fn create_namespace(admin: &kube::Client, name: &str, labels: &serde_json::Value) {
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": labels}}))
            .unwrap();
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

/// TOE's own namespace, created once whichever component's identity asks first.
async fn release_namespace(admin: &kube::Client) {
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "toe-system"}})).unwrap();
    Api::<Namespace>::all(admin.clone())
        .patch(
            "toe-system",
            &PatchParams::apply("toe-test").force(),
            &Patch::Apply(&ns),
        )
        .await
        .unwrap();
}

/// A client for the operator's own identity, bound to exactly the chart's operator role with image
/// tools and the model step enabled (the tests exercise both).
pub async fn operator_identity(server: &ApiServer, admin: &kube::Client) -> kube::Client {
    bind(
        admin,
        &toe_operator::rbac::operator_cluster_role_with_everything("toe-operator"),
        OPERATOR_USER,
    )
    .await;
    release_namespace(admin).await;
    bind_in_namespace(
        admin,
        &toe_operator::rbac::operator_namespace_role("toe-operator", "toe-system"),
        OPERATOR_USER,
    )
    .await;
    server.client_as(OPERATOR_TOKEN).await
}

/// The operator's controllers, in this process, as its own identity.
pub struct Operator {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Operator {
    /// The PowerTool controller.
    pub async fn start(server: &ApiServer, admin: &kube::Client) -> Self {
        Self::start_with(server, admin, None).await
    }

    /// The PowerTool controller and, with `artifacts` (the agents' store), the processing one.
    pub async fn start_with(
        server: &ApiServer,
        admin: &kube::Client,
        artifacts: Option<url::Url>,
    ) -> Self {
        Self::start_allowing(server, admin, artifacts, Vec::new()).await
    }

    /// As [`Self::start_with`], with stores besides `artifacts` an admin allows PowerTools to
    /// name (`--allowed-outputs`).
    pub async fn start_allowing(
        server: &ApiServer,
        admin: &kube::Client,
        artifacts: Option<url::Url>,
        allowed_outputs: Vec<url::Url>,
    ) -> Self {
        let client = operator_identity(server, admin).await;
        let metrics = std::sync::Arc::new(toe_operator::metrics::Metrics::default());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until_stopped = move || {
            let mut rx = stopped.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let mut tasks = vec![tokio::spawn(toe_operator::controller::run(
            client.clone(),
            metrics.clone(),
            toe_operator::controller::Options {
                artifacts: artifacts.clone().unwrap_or_else(|| {
                    url::Url::parse(toe_artifacts::layout::DEFAULT_NODE_STORE).expect("a URL")
                }),
                allowed_outputs: allowed_outputs.clone(),
                ..toe_operator::controller::Options::defaults()
            },
            until_stopped(),
        ))];
        if let Some(artifacts) = artifacts {
            tasks.push(tokio::spawn(toe_operator::processing::run(
                client,
                toe_operator::processing::ProcessingOptions {
                    artifacts,
                    // The one model endpoint the tests allow: a loopback port nothing serves.
                    model_endpoints: vec![url::Url::parse("http://127.0.0.1:9/").expect("a URL")],
                    allowed_outputs,
                    // Deleted processings' outputs are looked at every second here.
                    sweep_every: Duration::from_secs(1),
                },
                metrics,
                until_stopped(),
            )));
        }
        Self { stop, tasks }
    }

    /// Signals shutdown and waits for every controller to end; one still running well after its
    /// grace period fails the test instead of hanging it.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let bound = toe_operator::shutdown::GRACE + Duration::from_secs(30);
        for t in self.tasks {
            tokio::time::timeout(bound, t)
                .await
                .unwrap_or_else(|_| {
                    panic!("an operator controller still ran {bound:?} after shutdown")
                })
                .unwrap();
        }
    }
}

/// This machine's node name (its host name), as the agent and the test Pods use it.
#[must_use]
pub fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "toe-node".into(), |h| h.trim().to_ascii_lowercase())
}

/// The Node object for `name` (a kubelet would register it).
pub async fn create_node(admin: &kube::Client, name: &str) {
    let node: Node =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    Api::<Node>::all(admin.clone())
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
}

/// A Pod on `node` whose containers (name, container id) the test reports running.
pub async fn create_pod(
    admin: &kube::Client,
    ns: &str,
    name: &str,
    labels: &serde_json::Value,
    node: &str,
    containers: &[(&str, &str)],
) {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let specs: Vec<serde_json::Value> = containers
        .iter()
        .map(|(c, _)| serde_json::json!({"name": c, "image": "busybox"}))
        .collect();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": specs},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let statuses: Vec<serde_json::Value> = containers
        .iter()
        .map(|(c, id)| {
            serde_json::json!({"name": c, "containerID": id, "ready": true, "restartCount": 0,
                               "image": "busybox", "imageID": "", "state": {"running": {}}})
        })
        .collect();
    let status = serde_json::json!({"status": {"phase": "Running", "containerStatuses": statuses}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// `toe agent` for `node`, as its own identity (bound to exactly the agent's roles),
/// with its own state directory.
pub struct Agent {
    pub process: TestProcess,
    pub state: PathBuf,
    pub log: PathBuf,
}

/// What `node`'s agent published about its kernel (its ConfigMap in TOE's namespace), once it has.
pub async fn published_capabilities(admin: &kube::Client, node: &str) -> Option<serde_json::Value> {
    let maps: Api<ConfigMap> = Api::namespaced(admin.clone(), "toe-system");
    let name = toe_common::api::capabilities_config_map(node);
    let data = maps.get_opt(&name).await.ok()??.data?;
    assert_eq!(
        data.get(toe_common::api::CAPABILITIES_NODE_KEY)
            .map(String::as_str),
        Some(node)
    );
    serde_json::from_str(data.get(toe_common::api::CAPABILITIES_KEY)?).ok()
}

/// Binds the agent's roles to its identity (once per cluster): the cluster role, and the one in
/// TOE's namespace where it publishes its node's capabilities.
pub async fn agent_identity(admin: &kube::Client) {
    bind(
        admin,
        &toe_operator::rbac::agent_cluster_role("toe-agent"),
        AGENT_USER,
    )
    .await;
    release_namespace(admin).await;
    bind_in_namespace(
        admin,
        &toe_operator::rbac::agent_namespace_role("toe-agent", "toe-system"),
        AGENT_USER,
    )
    .await;
}

impl Agent {
    /// Starts the agent; `state` survives restarts (the node's `/var/lib/toe`).
    #[must_use]
    pub fn start(server: &ApiServer, node: &str, state: &Path, output: &str) -> Self {
        Self::start_with_env(server, node, state, output, &[])
    }

    /// As [`Self::start`], with `env` added to the agent's environment (a store's credentials).
    #[must_use]
    pub fn start_with_env(
        server: &ApiServer,
        node: &str,
        state: &Path,
        output: &str,
        env: &[(String, String)],
    ) -> Self {
        std::fs::create_dir_all(state).unwrap();
        let log = state.join(format!(
            "agent-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = Command::new(bin("toe"))
            .args([
                "agent",
                "--node",
                node,
                "--output",
                output,
                "--upload-timeout",
                "3s",
            ])
            .env("KUBECONFIG", server.kubeconfig_as(AGENT_TOKEN))
            .env("TOE_STATE_DIR", state)
            // A test's other stores sit beside its state directory; nothing else is allowed.
            .env(
                "TOE_ALLOWED_OUTPUTS",
                format!("file://{}/", state.parent().unwrap_or(state).display()),
            )
            .env("TOE_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("toe agent");
        Self {
            process: TestProcess(child),
            state: state.to_owned(),
            log,
        }
    }

    /// Sends SIGTERM and waits for the agent to exit (at most `within`); its exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        terminate(&mut self.process, within, &self.log)
    }

    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Sends SIGTERM to `process` and waits for it to exit (at most `within`, else the test fails
/// with the process's `log`); its exit status.
pub fn terminate(
    process: &mut TestProcess,
    within: Duration,
    log: &Path,
) -> std::process::ExitStatus {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(process.pid()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = process.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the process logging to {} did not exit within {within:?} of SIGTERM; log:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `toe-operator` as a process of its own, as its own identity, with leader election over the
/// `toe-operator` Lease in `toe-system` as `identity`; its output goes to `log`.
pub struct OperatorProcess {
    pub process: TestProcess,
    pub log: PathBuf,
}

impl OperatorProcess {
    /// Starts it; [`operator_identity`] must have set its identity up. `dir` holds its store and
    /// its log.
    #[must_use]
    pub fn start(server: &ApiServer, identity: &str, dir: &Path) -> Self {
        let log = dir.join(format!("operator-{identity}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin("toe-operator"))
            .args([
                "--identity",
                identity,
                "--lease-namespace",
                "toe-system",
                "--metrics-addr",
                "127.0.0.1:0",
                "--report-addr",
                "",
                "--artifacts",
            ])
            .arg(format!("file://{}/", dir.display()))
            .env("KUBECONFIG", server.kubeconfig_as(OPERATOR_TOKEN))
            .env("TOE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("toe-operator (cargo build --release -p toe-operator)");
        Self {
            process: TestProcess(child),
            log,
        }
    }

    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for it to exit (at most `within`); its exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        terminate(&mut self.process, within, &self.log)
    }
}
