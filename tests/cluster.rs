//! TOE on a real node: the packaged chart installed with helm on the single-node cluster of
//! `cargo xtask cluster` (kubelet, containerd, runc), the operator and the agent as real pods
//! from the release images, PowerTools acting on real pods whose cgroups a kubelet made.
//!
//! These tests need that cluster, so they are `#[ignore]`d in the ordinary run; `cargo xtask
//! test` starts the cluster after the release images are built, runs them with `--ignored`,
//! and takes the cluster down (`TOE_CLUSTER_KUBECONFIG` says where it is).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use toe_agent::tools::faults::ledger::WORKER_ARG;
use toe_tests::{
    node::{
        APP_MEMORY, Cluster, NAMESPACE, WORKLOAD_NAMESPACE, folded_of, powertool, summary_of,
        workload,
    },
    root_pid,
    s3::{S3Server, SECRET_KEY},
};

#[test]
#[ignore = "needs the real cluster: `cargo xtask test` runs it in its own stage"]
fn a_cpu_profile_of_one_container_of_a_real_pod_samples_only_that_container() {
    let c = Cluster::get();
    c.install_toe();
    let pod = workload(&c);
    let name = "profile-app";
    c.apply(&powertool(
        name,
        "app",
        ("cpu-profile", "5s"),
        &["--frequency=99"],
        &[],
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
        Some(&powertool(
            "too-fast",
            "app",
            ("cpu-profile", "5s"),
            &["--frequency=1000000"],
            &[],
        )),
    );
    assert!(
        !ok && out.contains("admission webhook") && out.contains("frequency"),
        "the webhook did not refuse it: {out}"
    );
    c.assert_nothing_left_the_node();
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
    c.apply(&powertool(
        name,
        "sidecar",
        ("terminate", "30s"),
        &["--mode=graceful", "--grace=5s", "--scope=main"],
        &["signal-trace"],
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

/// The store a multi-node cluster needs: an S3 server (s3s-fs, checking every signature) on the
/// pods' bridge, its keys given to the agent and the operator by a Secret through the chart's
/// `artifacts.credentialsSecret` (envFrom). The agent writes a profile there, the operator reads
/// it back for a processing, and the report Service serves the report from there.
#[test]
#[ignore = "needs the real cluster: `cargo xtask test` runs it in its own stage"]
fn with_s3_keys_from_a_secret_the_agent_writes_and_the_operator_reads_and_serves_through_a_real_s3_store()
 {
    let c = Cluster::get();
    c.install_toe();
    workload(&c);
    let Some(s3) = S3Server::start_on("cluster s3", &c.bridge_ip()) else {
        return;
    };
    let secret = "toe-s3-keys";
    let url = "s3://toe-artifacts/cluster/";
    install_with_keys_from_a_secret(&c, &s3, secret, url);

    let name = "profile-to-s3";
    c.apply(&powertool(
        name,
        "app",
        ("cpu-profile", "5s"),
        &["--frequency=99"],
        &[],
    ));
    let phase = c.finished(name, Duration::from_mins(2));
    assert_eq!(phase, "Completed", "{}", c.diagnostics());
    let artifacts = c.wait_for(
        &["-n", WORKLOAD_NAMESPACE, "powertool", name],
        "{.status.targets[0].artifacts}",
        Duration::from_secs(5),
        |s| !s.is_empty(),
    );
    let urls: Vec<String> = serde_json::from_str(&artifacts).expect("a list of URLs");
    assert!(
        urls.iter().all(|u| u.starts_with(url)),
        "artifacts outside the store: {urls:?}"
    );
    let folded = urls
        .iter()
        .find(|u| u.ends_with("/stacks.folded"))
        .unwrap_or_else(|| panic!("no stacks.folded among {urls:?}"));
    let key = folded
        .strip_prefix("s3://toe-artifacts/")
        .expect("in the bucket");
    let text = String::from_utf8(s3.read(Path::new(key))).expect("UTF-8");
    let samples: Vec<&str> = text.lines().collect();
    assert!(!samples.is_empty(), "an empty profile in the store");
    assert!(
        samples.iter().all(|l| l.starts_with("md5sum")),
        "samples from outside the app container: {samples:?}"
    );
    let stored = s3.objects("cluster");
    for file in ["summary.json", "stacks.folded", "cpu.pb.gz"] {
        assert!(
            stored.iter().any(|p| p.ends_with(file)),
            "{file} not in the store: {stored:?}"
        );
    }

    // The operator reads the run back from the store and serves the report it wrote there.
    let processing = "profile-to-s3-report";
    c.apply(&format!(
        r"apiVersion: toe.run/v1alpha1
kind: PowerToolProcessing
metadata: {{name: {processing}, namespace: {WORKLOAD_NAMESPACE}}}
spec:
  names: [{name}]
  schedule: 1h
  window: 24h
  outputs: [htmlReport, mergedPprof]
"
    ));
    let report = c.wait_for(
        &["-n", WORKLOAD_NAMESPACE, "powertoolprocessing", processing],
        "{.status.report}",
        Duration::from_mins(2),
        |s| !s.is_empty(),
    );
    // Written by the operator configured with the S3 store, not by the replica it replaced.
    assert!(
        report.starts_with(url),
        "the report is outside the store: {report}\n{}",
        c.diagnostics()
    );
    let stored = s3.objects("cluster");
    assert!(
        stored.iter().any(|p| p.ends_with("report.html")),
        "no report.html in the store: {stored:?}"
    );
    let path = format!("/reports/{WORKLOAD_NAMESPACE}/{processing}/latest/report.html");
    let token = c.report_reader_token();
    let (status, html) = c.get_report(&path, Some(&token));
    assert_eq!(status, 200, "{html}");
    assert!(
        html.contains("md5sum"),
        "the report lacks the profile: {html}"
    );
    assert_eq!(
        s3.metadata_knocks(),
        0,
        "something asked for instance credentials"
    );

    for (kind, n) in [("powertoolprocessing", processing), ("powertool", name)] {
        let _ = c.kubectl(&["-n", WORKLOAD_NAMESPACE, "delete", kind, n]);
    }
    // Back to the node's own store for the other tests.
    c.install_toe();
    let _ = c.kubectl(&["-n", NAMESPACE, "delete", "secret", secret]);
    c.assert_nothing_left_the_node();
}

/// The chart with `url` as its store and `s3`'s keys in a Secret named `secret`, given to the
/// pods by `artifacts.credentialsSecret`.
fn install_with_keys_from_a_secret(c: &Cluster, s3: &S3Server, secret: &str, url: &str) {
    let keys: serde_json::Map<String, serde_json::Value> =
        s3.env().into_iter().map(|(k, v)| (k, v.into())).collect();
    c.apply(
        &serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": secret, "namespace": NAMESPACE},
            "stringData": keys,
        })
        .to_string(),
    );
    c.install_toe_with(&[
        &format!("artifacts.url={url}"),
        &format!("artifacts.credentialsSecret={secret}"),
    ]);
    // The keys reach the pods from the Secret, not written into their specs.
    let (_, specs) = c.kubectl(&[
        "-n",
        NAMESPACE,
        "get",
        "daemonsets,deployments",
        "-o",
        "yaml",
    ]);
    assert!(specs.contains(secret), "no envFrom of {secret}: {specs}");
    assert!(
        !specs.contains(SECRET_KEY),
        "the secret key is in a pod spec"
    );
}

/// The memory usage file of a container's memory cgroup, found by its id below the kubelet's
/// `kubepods` (cgroup v1's memory hierarchy, or the unified tree on a pure v2 node).
fn memory_usage_file(container_id: &str) -> PathBuf {
    let id = container_id
        .strip_prefix("containerd://")
        .unwrap_or(container_id);
    for (root, file) in [
        ("/sys/fs/cgroup/memory/kubepods", "memory.usage_in_bytes"),
        ("/sys/fs/cgroup/kubepods", "memory.current"),
    ] {
        let mut found = Vec::new();
        dirs_named(Path::new(root), id, 3, &mut found);
        if let Some(dir) = found.first() {
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
                .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(WORKER_ARG.as_bytes()))
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
    c.apply(&powertool(
        name,
        "app",
        ("memory-stress", "3m"),
        &["--size=50%"],
        &[],
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
    c.apply(&powertool(
        name,
        "app",
        ("volume-fill", "5m"),
        &["--path=/data", "--fill=80%"],
        &[],
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
    c.apply(&powertool(
        name,
        "app",
        ("toe-probe", "20s"),
        &["--seconds=2"],
        &[],
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
    let mut out = Vec::new();
    for root in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        if root.file_name() != "unified" {
            dirs_named(&root.path().join("kubepods"), name, 2, &mut out);
        }
    }
    dirs_named(Path::new("/sys/fs/cgroup/kubepods"), name, 2, &mut out);
    out
}

/// Adds the directories named `name` at most `depth` levels below `dir` to `out` (not looking
/// inside a match).
fn dirs_named(dir: &Path, name: &str, depth: u32, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if e.file_name() == name {
            out.push(e.path());
        } else if depth > 0 {
            dirs_named(&e.path(), name, depth - 1, out);
        }
    }
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
        ("last-squeeze", "memory-stress", &["--size=16MiB"][..]),
        ("last-fill", "volume-fill", &["--path=/data", "--fill=50%"]),
    ] {
        c.apply(&powertool(name, "app", (tool, "5m"), args, &[]));
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
