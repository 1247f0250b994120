//! The node agent end to end: a real API server, the operator, `toe agent` as a real process
//! for this machine's node, real podman containers, and Pods whose status (reported by the
//! test: there is no kubelet) carries those containers' ids and this node. PowerTools go in
//! through the API; artifacts come out of a file:// object store.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use toe_common::api::{PowerTool, PowerToolConfig, PowerToolPhase, SelectedTarget};
use toe_tests::{
    Container,
    apiserver::ApiServer,
    cluster::{self, Agent, Operator},
    require_root,
    s3::S3Server,
};

/// A started cluster with the CRDs, the example configs, namespace `shop`, this node, and the
/// agent's identity; plus an object store and a state directory for the agent.
struct Cluster {
    server: ApiServer,
    admin: kube::Client,
    /// A tenant of `shop` with only the chart's tenant role: PowerTools go in as them.
    tenant: kube::Client,
    node: String,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(test: &str) -> Option<Self> {
        if !require_root(test) {
            return None;
        }
        let server = ApiServer::start(test)?;
        let admin = server.client().await;
        cluster::install_crds(&admin).await;
        cluster::agent_identity(&admin).await;
        let node = cluster::node_name();
        cluster::create_node(&admin, &node).await;
        cluster::create_namespace(&admin, "shop", &serde_json::json!({"team": "shop"})).await;
        let configs: Api<PowerToolConfig> = Api::all(admin.clone());
        for c in
            cluster::documents::<PowerToolConfig>(&cluster::repo().join("examples/config.yaml"))
        {
            configs.create(&PostParams::default(), &c).await.unwrap();
        }
        let tenant = cluster::tenant_identity(&server, &admin, "shop").await;
        Some(Self {
            server,
            admin,
            tenant,
            node,
            dir: tempfile::tempdir().unwrap(),
        })
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn agent(&self) -> Agent {
        let url = url_of(&self.store());
        Agent::start(&self.server, &self.node, &self.state(), &url)
    }

    fn tools(&self) -> Api<PowerTool> {
        Api::namespaced(self.admin.clone(), "shop")
    }

    /// A Pod in `shop` on this node whose containers are the given podman containers.
    async fn pod(&self, name: &str, app: &str, containers: &[(&str, &Container)]) {
        let ids: Vec<(&str, String)> = containers
            .iter()
            .map(|(n, c)| (*n, format!("containerd://{}", c.id)))
            .collect();
        let refs: Vec<(&str, &str)> = ids.iter().map(|(n, id)| (*n, id.as_str())).collect();
        cluster::create_pod(
            &self.admin,
            "shop",
            name,
            &serde_json::json!({"app": app}),
            &self.node,
            &refs,
        )
        .await;
    }

    /// A busy container in pod web-1 (app web) and a cpu-profile PowerTool `name` of it for
    /// `duration`, `extra` merged into its spec. The container lives as long as it is held.
    async fn profile_busy_web(
        &self,
        name: &str,
        duration: &str,
        extra: serde_json::Value,
    ) -> Container {
        let target = busy("target");
        self.pod("web-1", "web", &[("app", &target)]).await;
        let mut spec = serde_json::json!({
            "tool": {"name": "cpu-profile", "duration": duration},
            "targets": {"labelSelector": {"matchLabels": {"app": "web"}}},
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            spec[k] = v.clone();
        }
        self.create(name, spec).await;
        target
    }

    /// Waits until web-1's run of PowerTool `name` waits on the node for its store; the
    /// target's status message then.
    async fn uploading_message(&self, name: &str, agent: &Agent) -> String {
        let pt = self
            .wait(name, "uploading", 60, Some(agent), |p| {
                target_phase(p, "web-1").as_deref() == Some("Uploading")
            })
            .await;
        targets(&pt)[0].message.clone().unwrap()
    }

    async fn create(&self, name: &str, spec: serde_json::Value) {
        let pt: PowerTool = serde_json::from_value(serde_json::json!({
            "apiVersion": "toe.run/v1alpha1", "kind": "PowerTool",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap();
        Api::<PowerTool>::namespaced(self.tenant.clone(), "shop")
            .create(&PostParams::default(), &pt)
            .await
            .unwrap();
    }

    /// Polls until `done` holds for the PowerTool (at most `secs`), and returns it. A timeout
    /// shows the status and the agent's log.
    async fn wait(
        &self,
        name: &str,
        what: &str,
        secs: u64,
        agent: Option<&Agent>,
        done: impl Fn(&PowerTool) -> bool,
    ) -> PowerTool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let pt = self.tools().get_opt(name).await.unwrap();
            if let Some(pt) = &pt
                && done(pt)
            {
                return pt.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{name}: not {what} within {secs} s: {:#?}\nagent log:\n{}",
                pt.and_then(|p| p.status),
                agent.map(Agent::log_text).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn url_of(dir: &Path) -> String {
    format!("file://{}/", dir.display())
}

fn targets(pt: &PowerTool) -> &[SelectedTarget] {
    pt.status.as_ref().map_or(&[], |s| s.targets.as_slice())
}

fn target_phase(pt: &PowerTool, pod: &str) -> Option<String> {
    targets(pt)
        .iter()
        .find(|t| t.pod == pod)
        .and_then(|t| t.phase.map(|p| p.as_str().to_owned()))
}

fn phase(pt: &PowerTool) -> PowerToolPhase {
    pt.status
        .as_ref()
        .map_or(PowerToolPhase::Pending, |s| s.phase)
}

/// The local path of an artifact URL in the file:// store.
fn local(url: &str) -> PathBuf {
    PathBuf::from(url.strip_prefix("file://").expect("a file:// URL"))
}

fn artifact<'a>(t: &'a SelectedTarget, name: &str) -> &'a str {
    t.artifacts
        .iter()
        .find(|a| a.ends_with(&format!("/{name}")))
        .unwrap_or_else(|| panic!("no {name} in {:?}", t.artifacts))
}

fn busy(name: &str) -> Container {
    Container::run(name, &["sh", "-c", "while :; do :; done"])
}

/// A folded-stacks file of the store: its text and its (stack, value) lines.
fn read_folded(path: &Path) -> (String, Vec<(String, u64)>) {
    let text = std::fs::read_to_string(path).unwrap();
    let folded = text
        .lines()
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(s, n)| (s.to_owned(), n.parse().unwrap()))
        .collect();
    (text, folded)
}

/// Processes of a container's cgroup, as the host sees them.
fn container_pids(c: &Container) -> Vec<u32> {
    let out = std::process::Command::new("podman")
        .args(["top", &c.id, "hpid"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[tokio::test]
async fn a_cpu_profile_of_one_container_lands_in_the_store_with_only_its_samples() {
    let Some(c) =
        Cluster::start("a_cpu_profile_of_one_container_lands_in_the_store_with_only_its_samples")
            .await
    else {
        return;
    };
    let operator = Operator::start(&c.server, &c.admin).await;
    let agent = c.agent();
    // Two busy containers; only web-1's `app` is the target.
    let target = busy("target");
    let other = busy("other");
    c.pod("web-1", "web", &[("app", &target)]).await;
    c.pod("db-1", "db", &[("app", &other)]).await;
    // The target's CPU rate over the whole run (the busy loop's share of a core on a shared
    // machine), to know how many samples 199 Hz over the sampled window should give.
    let main = container_pids(&target)[0];
    let (t0, cpu0) = (Instant::now(), toe_tests::cpu_seconds(main));
    c.create(
        "profile",
        serde_json::json!({
            "tool": {"name": "cpu-profile", "duration": "3s",
                     "commandLineArguments": ["--frequency=199"]},
            "targets": {"labelSelector": {"matchLabels": {"app": "web"}}, "containers": ["app"]},
        }),
    )
    .await;
    let pt = c
        .wait("profile", "Completed", 60, Some(&agent), |p| {
            phase(p) == PowerToolPhase::Completed
        })
        .await;
    let t = &targets(&pt)[0];
    assert_eq!(
        (
            t.pod.as_str(),
            t.phase.map(toe_common::api::TargetPhase::as_str)
        ),
        ("web-1", Some("Completed")),
        "{t:?}"
    );
    // The store's layout: namespace / powertool / run / pod / container / artifact.
    let uid = pt.metadata.uid.clone().unwrap();
    let run = toe_common::api::run_name(&uid, pt.metadata.generation.unwrap());
    let dir = c.store().join(format!("shop/profile/{run}/web-1/app"));
    for name in [
        "flamegraph.svg",
        "cpu.pb.gz",
        "stacks.folded",
        "summary.json",
    ] {
        let url = artifact(t, name);
        assert_eq!(local(url), dir.join(name), "{url}");
        assert!(
            dir.join(name).is_file(),
            "{name} missing in {}",
            dir.display()
        );
    }
    // Only the target container's process was sampled, and it was sampled a lot.
    let (_, folded) = read_folded(&dir.join("stacks.folded"));
    let by_pid = toe_tests::samples_by_pid(&folded);
    let inside = container_pids(&target);
    let outside = container_pids(&other);
    assert!(!inside.is_empty() && !outside.is_empty());
    assert!(
        by_pid.keys().all(|p| inside.contains(p)),
        "samples from outside the target container: {by_pid:?} (target {inside:?}, other {outside:?})"
    );
    let rate = (toe_tests::cpu_seconds(main) - cpu0) / t0.elapsed().as_secs_f64();
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    let window = summary["sampled_duration_s"].as_f64().unwrap();
    let expected = 199.0 * rate * window;
    #[expect(clippy::cast_precision_loss, reason = "sample counts are small")]
    let got = by_pid.values().sum::<u64>() as f64;
    // 20%: the rate is measured over the whole run, the samples over the sampled window.
    assert!(
        (got / expected - 1.0).abs() < 0.2,
        "{got} samples, expected {expected:.0} (199 Hz x {rate:.2} CPU x {window:.2} s)"
    );
    // The agent published what this node's kernel can do.
    let caps = cluster::published_capabilities(&c.admin, &c.node)
        .await
        .unwrap();
    assert_eq!(caps["tools"]["cpu-profile"], "ok", "{caps}");
    assert_eq!(caps["programs"]["perf_event"], "ok", "{caps}");
    operator.stop().await;
}

/// An off-CPU profile of a container whose shell waits on a sleeping child: where it waits, only
/// from that container, with the wall-clock profile beside it.
#[tokio::test]
async fn an_offcpu_profile_of_one_container_shows_where_it_waits() {
    let Some(c) = Cluster::start("an_offcpu_profile_of_one_container_shows_where_it_waits").await
    else {
        return;
    };
    let operator = Operator::start(&c.server, &c.admin).await;
    let agent = c.agent();
    let target = Container::run("waiter", &["sh", "-c", "while :; do sleep 0.2; done"]);
    let other = busy("other");
    c.pod("web-1", "web", &[("app", &target)]).await;
    c.pod("db-1", "db", &[("app", &other)]).await;
    c.create(
        "waits",
        serde_json::json!({
            "tool": {"name": "offcpu-profile", "duration": "3s",
                     "commandLineArguments": ["--wall=true"]},
            "targets": {"labelSelector": {"matchLabels": {"app": "web"}}, "containers": ["app"]},
        }),
    )
    .await;
    let pt = c
        .wait("waits", "Completed", 60, Some(&agent), |p| {
            phase(p) == PowerToolPhase::Completed
        })
        .await;
    let t = &targets(&pt)[0];
    let dir = local(artifact(t, "summary.json"))
        .parent()
        .unwrap()
        .to_owned();
    for name in [
        "offcpu.svg",
        "offcpu.pb.gz",
        "offcpu.folded",
        "wall.svg",
        "wall.pb.gz",
    ] {
        assert!(
            dir.join(name).is_file(),
            "{name} missing in {}",
            dir.display()
        );
    }
    let (text, folded) = read_folded(&dir.join("offcpu.folded"));
    let by_pid = toe_tests::samples_by_pid(&folded);
    let outside = container_pids(&other);
    assert!(
        by_pid.keys().all(|p| !outside.contains(p)),
        "waits from the other container: {by_pid:?} (other {outside:?})"
    );
    // The shell waits for its child the whole time: nearly all of the window is off CPU.
    let shell = container_pids(&target)[0];
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    let window = summary["sampled_duration_s"].as_f64().unwrap() * 1e9;
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds of a short run")]
    let waited = by_pid.get(&shell).copied().unwrap_or(0) as f64;
    assert!(
        waited > 0.9 * window,
        "the shell waited {waited} ns of a {window} ns window: {by_pid:?}"
    );
    assert!(
        folded
            .iter()
            .any(|(s, _)| s.contains("[off-CPU: blocked]") && s.contains("wait")),
        "{text}"
    );
    let caps = cluster::published_capabilities(&c.admin, &c.node)
        .await
        .unwrap();
    assert_eq!(caps["tools"]["offcpu-profile"], "ok", "{caps}");
    operator.stop().await;
}

#[tokio::test]
async fn a_sigterm_fault_on_a_sidecar_is_traced_with_its_graceful_exit() {
    let Some(c) =
        Cluster::start("a_sigterm_fault_on_a_sidecar_is_traced_with_its_graceful_exit").await
    else {
        return;
    };
    let operator = Operator::start(&c.server, &c.admin).await;
    let agent = c.agent();
    let app = Container::run("app", &["sleep", "300"]);
    // A sidecar that shuts down cleanly on SIGTERM.
    let sidecar = Container::run(
        "sidecar",
        &[
            "sh",
            "-c",
            "trap 'exit 0' TERM; while :; do sleep 0.2; done",
        ],
    );
    let (app_pid, sidecar_pid) = (app.pid(), sidecar.pid());
    assert!(app_pid > 0 && sidecar_pid > 0);
    c.pod("web-1", "web", &[("app", &app), ("sidecar", &sidecar)])
        .await;
    c.create(
        "stop-sidecar",
        serde_json::json!({
            "tool": {"name": "terminate", "duration": "30s",
                     "commandLineArguments": ["--grace=10s"]},
            "alongside": [{"name": "signal-trace"}],
            "targets": {"labelSelector": {"matchLabels": {"app": "web"}}, "containers": ["sidecar"]},
        }),
    )
    .await;
    let pt = c
        .wait("stop-sidecar", "finished", 60, Some(&agent), |p| {
            p.status.as_ref().is_some_and(|s| s.finish_time.is_some())
        })
        .await;
    assert_eq!(phase(&pt), PowerToolPhase::Completed, "{:?}", pt.status);
    let t = &targets(&pt)[0];
    assert_eq!(t.container, "sidecar");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(local(artifact(t, "summary.json"))).unwrap())
            .unwrap();
    let victim = &summary["fault"]["terminated"][0];
    assert_eq!(victim["pid"], sidecar_pid, "{summary:#}");
    assert_eq!(victim["signal"], "SIGTERM", "{victim}");
    assert_eq!(
        victim["escalated"], false,
        "no SIGKILL was needed: {victim}"
    );
    let events = std::fs::read_to_string(local(artifact(t, "events.jsonl"))).unwrap();
    assert!(
        events.contains("\"signal\":\"SIGTERM\"") && events.contains("\"action\":\"handler\""),
        "the trace shows the handled SIGTERM: {events}"
    );
    assert!(
        victim["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("exited with status 0")),
        "{victim}"
    );
    assert_eq!(app.pid(), app_pid, "the app container was touched");
    operator.stop().await;
}

/// Live stress workers of the runs in the agent's fault ledger.
fn workers_alive(state: &Path) -> Vec<u32> {
    let ledger = std::fs::read_to_string(state.join("ledger.jsonl")).unwrap_or_default();
    let runs: std::collections::BTreeSet<String> = ledger
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["op"] == "begin")
        .filter_map(|v| v["run"].as_str().map(str::to_owned))
        .collect();
    runs.iter()
        .flat_map(|r| toe_agent::tools::faults::ledger::worker_pids(r))
        .collect()
}

/// The memory cgroup usage of a container's main process, in bytes: v1, hybrid or v2, through
/// the agent's own cgroup reader.
fn memory_usage(pid: u32) -> u64 {
    toe_agent::tools::faults::cgroups::TargetCgroups::of_pid(pid)
        .ok()
        .and_then(|cg| cg.memory_usage())
        .unwrap_or_else(|| panic!("no memory cgroup usage for pid {pid}"))
}

/// A 200 MiB container in pod web-1 and PowerTool `squeeze` stressing half its memory, once the
/// target is Running: the container, its main pid and its memory usage before.
async fn squeeze(c: &Cluster, agent: &Agent) -> (Container, u32, u64) {
    let app = Container::run_with("app", &["--memory=200m"], &["sleep", "300"]);
    let pid = app.pid();
    let before = memory_usage(pid);
    c.pod("web-1", "web", &[("app", &app)]).await;
    c.create(
        "squeeze",
        serde_json::json!({
            "tool": {"name": "memory-stress", "duration": "2m",
                     "commandLineArguments": ["--size=50%"]},
            "targets": {"labelSelector": {"matchLabels": {"app": "web"}}},
        }),
    )
    .await;
    c.wait("squeeze", "running", 60, Some(agent), |p| {
        target_phase(p, "web-1").as_deref() == Some("Running")
    })
    .await;
    (app, pid, before)
}

/// Until the stress reaches the container's memory cgroup (100 MiB of its 200 MiB), with its
/// workers alive.
async fn wait_squeezed(c: &Cluster, pid: u32, before: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while memory_usage(pid) < before + 90 * 1024 * 1024 {
        assert!(
            Instant::now() < deadline,
            "the container's memory never grew: {} -> {}",
            before,
            memory_usage(pid)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!workers_alive(&c.state()).is_empty());
}

#[tokio::test]
async fn deleting_a_powertool_mid_run_rolls_back_its_memory_stress() {
    let Some(c) = Cluster::start("deleting_a_powertool_mid_run_rolls_back_its_memory_stress").await
    else {
        return;
    };
    let operator = Operator::start(&c.server, &c.admin).await;
    let agent = c.agent();
    // Held to the end: dropping the container removes it.
    let (_app, pid, before) = squeeze(&c, &agent).await;
    wait_squeezed(&c, pid, before).await;
    c.tools()
        .delete("squeeze", &DeleteParams::default())
        .await
        .unwrap();
    // Rolled back: the workers are gone and the memory is given back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !workers_alive(&c.state()).is_empty() || memory_usage(pid) > before + 20 * 1024 * 1024 {
        assert!(
            Instant::now() < deadline,
            "not rolled back: workers {:?}, memory {} (before {before}); agent log:\n{}",
            workers_alive(&c.state()),
            memory_usage(pid),
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The partial results still reached the store.
    let deadline = Instant::now() + Duration::from_secs(30);
    let summary = loop {
        let found = walk(&c.store())
            .into_iter()
            .find(|p| p.ends_with("web-1/app/summary.json"));
        if let Some(p) = found {
            break p;
        }
        assert!(Instant::now() < deadline, "no partial summary in the store");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(summary).unwrap()).unwrap();
    assert_eq!(s["complete"], false, "{s:#}");
    assert!(
        s["ended"]
            .as_str()
            .unwrap()
            .contains("the PowerTool was deleted"),
        "{s:#}"
    );
    operator.stop().await;
}

/// Every file below `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn sigterm_to_the_agent_mid_profile_saves_partial_artifacts_and_marks_interrupted() {
    let Some(c) = Cluster::start(
        "sigterm_to_the_agent_mid_profile_saves_partial_artifacts_and_marks_interrupted",
    )
    .await
    else {
        return;
    };
    let operator = Operator::start(&c.server, &c.admin).await;
    let mut agent = c.agent();
    let _target = c
        .profile_busy_web("long-profile", "5m", serde_json::json!({}))
        .await;
    c.wait("long-profile", "running", 60, Some(&agent), |p| {
        target_phase(p, "web-1").as_deref() == Some("Running")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A node drain: the kubelet's SIGTERM, within the default 30 s grace period.
    let status = agent.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}: {}", agent.log_text());
    let pt = c
        .wait("long-profile", "Interrupted", 30, Some(&agent), |p| {
            phase(p) == PowerToolPhase::Interrupted
        })
        .await;
    let t = &targets(&pt)[0];
    assert_eq!(
        t.phase.map(toe_common::api::TargetPhase::as_str),
        Some("Interrupted"),
        "{t:?}"
    );
    assert!(
        t.message
            .as_deref()
            .is_some_and(|m| m.contains("the node agent is stopping")),
        "{t:?}"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(local(artifact(t, "summary.json"))).unwrap())
            .unwrap();
    assert_eq!(summary["complete"], false);
    assert!(
        summary["cpu"]["samples"]["recorded"].as_u64().unwrap() > 0,
        "the partial profile kept what was sampled: {summary:#}"
    );
    assert!(local(artifact(t, "flamegraph.svg")).is_file());
    operator.stop().await;
}

#[tokio::test]
async fn the_agent_acts_only_on_admitted_powertools_and_validates_them_itself() {
    let Some(c) =
        Cluster::start("the_agent_acts_only_on_admitted_powertools_and_validates_them_itself")
            .await
    else {
        return;
    };
    // No operator: the test writes the statuses an operator (or an attacker with status
    // access) would, and the agent must judge them.
    let agent = c.agent();
    let target = busy("target");
    c.pod("web-1", "web", &[("app", &target)]).await;
    let forged = |phase: &str, generation: i64| {
        serde_json::json!({
            "apiVersion": "toe.run/v1alpha1", "kind": "PowerTool",
            "status": {"phase": phase, "observedGeneration": generation, "targets": [{
                "node": c.node, "namespace": "shop", "pod": "web-1", "container": "app",
                "containerID": format!("containerd://{}", target.id), "phase": "Pending"}]},
        })
    };
    let profile = serde_json::json!({"tool": {"name": "cpu-profile", "duration": "1s"}});
    let cases = [
        // Admitted: the control that shows the agent is live.
        ("admitted", profile.clone(), "Admitted", 1),
        ("rejected", profile.clone(), "Rejected", 1),
        // Admitted, but for an older generation of the spec.
        ("stale", profile.clone(), "Admitted", 0),
        // "Admitted" although the config caps --frequency at 499.
        (
            "over-cap",
            serde_json::json!({"tool": {"name": "cpu-profile", "duration": "1s",
                                        "commandLineArguments": ["--frequency=999"]}}),
            "Admitted",
            1,
        ),
    ];
    for (name, spec, phase, generation) in &cases {
        c.create(name, spec.clone()).await;
        c.tools()
            .patch_status(
                name,
                &PatchParams::apply("forger").force(),
                &Patch::Apply(forged(phase, *generation)),
            )
            .await
            .unwrap();
    }
    c.wait("admitted", "run", 60, Some(&agent), |p| {
        target_phase(p, "web-1").as_deref() == Some("Completed")
    })
    .await;
    let refused = c
        .wait("over-cap", "refused", 30, Some(&agent), |p| {
            target_phase(p, "web-1").as_deref() == Some("Failed")
        })
        .await;
    let msg = targets(&refused)[0].message.clone().unwrap();
    assert!(
        msg.contains("node agent's own validation") && msg.contains("frequency"),
        "{msg}"
    );
    // The agent has seen them all (it answered the later-created over-cap one) and never
    // touched the two that are not admitted.
    for name in ["rejected", "stale"] {
        let pt = c.tools().get(name).await.unwrap();
        assert_eq!(
            target_phase(&pt, "web-1").as_deref(),
            Some("Pending"),
            "{name}"
        );
        assert!(!c.store().join("shop").join(name).exists(), "{name}");
    }
}

#[tokio::test]
async fn an_object_store_outage_loses_nothing_even_across_an_agent_restart() {
    let Some(c) =
        Cluster::start("an_object_store_outage_loses_nothing_even_across_an_agent_restart").await
    else {
        return;
    };
    // The PowerTool's store is a path whose parent is a regular file: unwritable until the
    // file goes away. The admin allows it, as the agents' TOE_ALLOWED_OUTPUTS does.
    let blocked = c.dir.path().join("outage");
    let allowed = vec![url::Url::parse(&url_of(&blocked)).unwrap()];
    let operator = Operator::start_allowing(&c.server, &c.admin, None, allowed).await;
    let mut agent = c.agent();
    std::fs::write(&blocked, b"in the way").unwrap();
    let store = blocked.join("store");
    let _target = c
        .profile_busy_web(
            "profile",
            "2s",
            serde_json::json!({"output": {"url": url_of(&store)}}),
        )
        .await;
    let msg = c.uploading_message("profile", &agent).await;
    assert!(
        msg.contains("kept on node") && msg.contains("retrying"),
        "{msg}"
    );
    // The agent is killed outright while the artifacts wait on its disk, and comes back.
    agent.process.0.kill().unwrap();
    agent.process.0.wait().unwrap();
    let agent = c.agent();
    std::fs::remove_file(&blocked).unwrap();
    let pt = c
        .wait("profile", "Completed", 120, Some(&agent), |p| {
            phase(p) == PowerToolPhase::Completed
        })
        .await;
    let t = &targets(&pt)[0];
    for name in [
        "flamegraph.svg",
        "cpu.pb.gz",
        "stacks.folded",
        "summary.json",
    ] {
        assert!(local(artifact(t, name)).is_file(), "{name} lost");
        assert!(local(artifact(t, name)).starts_with(&store));
    }
    // Nothing left waiting on the node.
    assert!(walk(&c.state().join("spool")).is_empty());
    operator.stop().await;
}

/// The same outage on a real S3 server (s3s-fs, checking signatures): the agent's credentials
/// come from its environment, the store is down while the run ends, the agent is killed and
/// restarted, and once the store is back every artifact is in the bucket.
#[tokio::test]
async fn an_s3_outage_loses_nothing_even_across_an_agent_restart() {
    let test = "an_s3_outage_loses_nothing_even_across_an_agent_restart";
    let Some(c) = Cluster::start(test).await else {
        return;
    };
    let Some(mut s3) = S3Server::start(test) else {
        return;
    };
    let operator = Operator::start(&c.server, &c.admin).await;
    let bucket = s3.url("");
    let start_agent = |s3: &S3Server| {
        Agent::start_with_env(&c.server, &c.node, &c.state(), bucket.as_str(), &s3.env())
    };
    s3.stop();
    let mut agent = start_agent(&s3);
    let _target = c
        .profile_busy_web("profile", "2s", serde_json::json!({}))
        .await;
    let msg = c.uploading_message("profile", &agent).await;
    assert!(
        msg.contains("kept on node")
            && msg.contains("retrying")
            // Refused connections are retried with backoff; on a loaded machine the agent's 3 s
            // upload timeout can come first, and then that is the reason given.
            && (msg.contains("the store's endpoint cannot be reached")
                || msg.contains("no answer within 3s")),
        "{msg}"
    );
    agent.process.0.kill().unwrap();
    agent.process.0.wait().unwrap();
    let agent = start_agent(&s3);
    s3.resume();
    let pt = c
        .wait("profile", "Completed", 120, Some(&agent), |p| {
            phase(p) == PowerToolPhase::Completed
        })
        .await;
    let t = &targets(&pt)[0];
    let objects = s3.objects("");
    for name in [
        "flamegraph.svg",
        "cpu.pb.gz",
        "stacks.folded",
        "summary.json",
    ] {
        let url = artifact(t, name);
        let key = url
            .strip_prefix(bucket.as_str())
            .unwrap_or_else(|| panic!("{url} is not in the bucket"));
        assert!(
            objects.contains(&PathBuf::from(key)),
            "{name} lost: {objects:?}"
        );
    }
    assert!(walk(&c.state().join("spool")).is_empty());
    assert_eq!(
        s3.metadata_knocks(),
        0,
        "something asked the metadata address"
    );
    operator.stop().await;
}

#[tokio::test]
async fn an_agent_killed_mid_fault_rolls_back_on_restart_and_never_runs_it_again() {
    let Some(c) =
        Cluster::start("an_agent_killed_mid_fault_rolls_back_on_restart_and_never_runs_it_again")
            .await
    else {
        return;
    };
    let operator = Operator::start(&c.server, &c.admin).await;
    let mut agent = c.agent();
    // Held to the end: dropping the container removes it.
    let (_app, pid, before) = squeeze(&c, &agent).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while workers_alive(&c.state()).is_empty() {
        assert!(Instant::now() < deadline, "no stress workers started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A crash: no chance to roll back or report.
    agent.process.0.kill().unwrap();
    agent.process.0.wait().unwrap();
    let agent = c.agent();
    let pt = c
        .wait("squeeze", "Interrupted", 60, Some(&agent), |p| {
            phase(p) == PowerToolPhase::Interrupted
        })
        .await;
    let msg = targets(&pt)[0].message.clone().unwrap();
    assert!(msg.contains("stopped during the run"), "{msg}");
    assert!(workers_alive(&c.state()).is_empty());
    assert!(memory_usage(pid) < before + 20 * 1024 * 1024);
    // Recovery settled the crashed run (and compacted it away); the restarted agent began no
    // fault run of its own: a second start would be a `begin` entry of a live owner.
    let ledger = std::fs::read_to_string(c.state().join("ledger.jsonl")).unwrap();
    assert!(!ledger.contains("\"begin\""), "{ledger}");
    assert!(agent.log_text().contains("fault ledger recovered"));
    operator.stop().await;
}

#[tokio::test]
async fn targets_on_a_node_whose_agent_cannot_run_the_tool_fail_with_its_reason() {
    let Some(c) =
        Cluster::start("targets_on_a_node_whose_agent_cannot_run_the_tool_fail_with_its_reason")
            .await
    else {
        return;
    };
    let operator = Operator::start(&c.server, &c.admin).await;
    // A node whose agent's probe found no perf events (e.g. a locked-down kernel).
    let caps = r#"{"tools": {"cpu-profile": "perf_event: Operation not permitted"}}"#;
    let node: Node =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "locked-down"}})).unwrap();
    Api::<Node>::all(c.admin.clone())
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
    let name = toe_common::api::capabilities_config_map("locked-down");
    let published: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "data": {toe_common::api::CAPABILITIES_NODE_KEY: "locked-down",
                 toe_common::api::CAPABILITIES_KEY: caps}}))
    .unwrap();
    Api::<ConfigMap>::namespaced(c.admin.clone(), "toe-system")
        .create(&PostParams::default(), &published)
        .await
        .unwrap();
    cluster::create_pod(
        &c.admin,
        "shop",
        "web-1",
        &serde_json::json!({"app": "web"}),
        "locked-down",
        &[("app", "containerd://0123456789abcdef")],
    )
    .await;
    c.create(
        "profile",
        serde_json::json!({
            "tool": {"name": "cpu-profile", "duration": "5s"},
            "targets": {"labelSelector": {"matchLabels": {"app": "web"}}},
        }),
    )
    .await;
    let pt = c
        .wait("profile", "Failed", 30, None, |p| {
            phase(p) == PowerToolPhase::Failed
        })
        .await;
    let t = &targets(&pt)[0];
    assert_eq!(
        t.phase.map(toe_common::api::TargetPhase::as_str),
        Some("Failed")
    );
    assert!(
        t.message.as_deref().is_some_and(|m| m.contains(
            "node locked-down cannot run cpu-profile: perf_event: Operation not permitted"
        )),
        "{t:?}"
    );
    operator.stop().await;
}

/// Whoever can write `powertools/status` must not be able to aim the agent at a container the
/// PowerTool did not select: the agent looks each target's pod up itself.
#[tokio::test]
async fn a_forged_status_cannot_aim_the_agent_at_another_container() {
    let Some(c) = Cluster::start("a_forged_status_cannot_aim_the_agent_at_another_container").await
    else {
        return;
    };
    let agent = c.agent();
    let target = busy("target");
    let victim = busy("victim");
    c.pod("web-1", "web", &[("app", &target)]).await;
    cluster::create_namespace(
        &c.admin,
        "payments",
        &serde_json::json!({"team": "payments"}),
    )
    .await;
    cluster::create_pod(
        &c.admin,
        "payments",
        "db-1",
        &serde_json::json!({"app": "db"}),
        &c.node,
        &[("app", &format!("containerd://{}", victim.id))],
    )
    .await;
    let forged = |namespace: &str, pod: &str, id: &str| {
        serde_json::json!({
            "apiVersion": "toe.run/v1alpha1", "kind": "PowerTool",
            "status": {"phase": "Admitted", "observedGeneration": 1, "targets": [{
                "node": c.node, "namespace": namespace, "pod": pod, "container": "app",
                "containerID": format!("containerd://{id}"), "phase": "Pending"}]},
        })
    };
    let cases = [
        // The control: the target the PowerTool selects.
        ("control", forged("shop", "web-1", &target.id)),
        // Another namespace's pod, from a PowerTool without a namespaceSelector.
        ("other-namespace", forged("payments", "db-1", &victim.id)),
        // The PowerTool's own pod, with another namespace's container id.
        ("other-container", forged("shop", "web-1", &victim.id)),
        // A pod that does not exist, with that container id.
        ("no-such-pod", forged("shop", "web-9", &victim.id)),
    ];
    // The right target, but artifacts aimed at the host's filesystem through /proc.
    let escape = format!("/proc/1/root/tmp/toe-escape-{}", std::process::id());
    let cases: Vec<(&str, serde_json::Value)> = cases
        .into_iter()
        .chain([("proc-root", forged("shop", "web-1", &target.id))])
        .collect();
    for (name, status) in &cases {
        let mut spec = serde_json::json!({"tool": {"name": "cpu-profile", "duration": "1s"}});
        if *name == "proc-root" {
            spec["output"] = serde_json::json!({ "url": format!("file://{escape}") });
        }
        c.create(name, spec).await;
        c.tools()
            .patch_status(
                name,
                &PatchParams::apply("forger").force(),
                &Patch::Apply(status),
            )
            .await
            .unwrap();
    }
    c.wait("control", "run", 60, Some(&agent), |p| {
        target_phase(p, "web-1").as_deref() == Some("Completed")
    })
    .await;
    for (name, pod, want) in [
        (
            "other-namespace",
            "db-1",
            "selects only its own namespace shop",
        ),
        (
            "other-container",
            "web-1",
            "has no container app with the id in the PowerTool's status",
        ),
        ("no-such-pod", "web-9", "pod shop/web-9 does not exist"),
        (
            "proc-root",
            "web-1",
            "spec.output.url is not among the output locations this cluster's admin allows",
        ),
    ] {
        let pt = c
            .wait(name, "refused", 30, Some(&agent), |p| {
                target_phase(p, pod).as_deref() == Some("Failed")
            })
            .await;
        let msg = targets(&pt)[0].message.clone().unwrap();
        assert!(
            msg.contains("refused by the node agent") && msg.contains(want),
            "{name}: {msg}"
        );
        assert!(
            !c.store().join("shop").join(name).exists(),
            "{name} wrote artifacts"
        );
    }
}

/// A node drain during a fault: the agent's SIGTERM rolls the running memory stress back before
/// it exits (workers gone, the container's memory given back, with no restart needed) and marks
/// the target Interrupted.
#[tokio::test]
async fn sigterm_to_the_agent_mid_fault_rolls_it_back_before_exiting() {
    let Some(c) =
        Cluster::start("sigterm_to_the_agent_mid_fault_rolls_it_back_before_exiting").await
    else {
        return;
    };
    let operator = Operator::start(&c.server, &c.admin).await;
    let mut agent = c.agent();
    let (_app, pid, before) = squeeze(&c, &agent).await;
    wait_squeezed(&c, pid, before).await;
    let status = agent.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}: {}", agent.log_text());
    // Undone by the time the agent has exited: nothing is left for a restart to clean.
    assert!(
        workers_alive(&c.state()).is_empty(),
        "workers outlived the agent: {:?}",
        workers_alive(&c.state())
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while memory_usage(pid) > before + 20 * 1024 * 1024 {
        assert!(
            Instant::now() < deadline,
            "the memory was not given back: {} (before {before})",
            memory_usage(pid)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pt = c
        .wait("squeeze", "Interrupted", 30, Some(&agent), |p| {
            target_phase(p, "web-1").as_deref() == Some("Interrupted")
        })
        .await;
    assert!(
        targets(&pt)[0]
            .message
            .as_deref()
            .is_some_and(|m| m.contains("the node agent is stopping")),
        "{:?}",
        targets(&pt)[0]
    );
    operator.stop().await;
}
