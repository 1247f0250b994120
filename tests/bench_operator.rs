//! `cargo xtask bench operator`: time from creating N PowerTools over M pods to all of them
//! Admitted, against the real API server, and the operator process's peak memory (VmHWM).
//! Lives beside the tests because it uses their API server harness.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use futures::{StreamExt as _, stream};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use toe_common::api::{PowerTool, PowerToolConfig, PowerToolPhase};
use toe_tests::apiserver::ApiServer;

const NAMESPACES: usize = 10;
/// Pods per app label: a PowerTool selects one app.
const PODS_PER_APP: usize = 10;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .find(|w| w[0] == name)
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(default)
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

async fn seed(client: &kube::Client, pods: usize) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/toe/crds");
    for entry in std::fs::read_dir(dir)? {
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&std::fs::read_to_string(entry?.path())?)?;
        crds.create(&PostParams::default(), &crd).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let config: PowerToolConfig = serde_json::from_value(serde_json::json!({
        "apiVersion": "toe.run/v1alpha1", "kind": "PowerToolConfig",
        "metadata": {"name": "cpu-profile"}, "spec": {"tool": "cpu-profile"},
    }))?;
    Api::<PowerToolConfig>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await?;
    for n in 0..NAMESPACES {
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": format!("ns-{n}")}}))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
    }
    // Pods, with running containers reported (there is no kubelet), 16 requests in flight.
    let results: Vec<Result<()>> = stream::iter(0..pods)
        .map(|i| {
            let client = client.clone();
            async move {
                let ns = format!("ns-{}", i % NAMESPACES);
                let name = format!("pod-{i}");
                // In each namespace, app-k has PODS_PER_APP pods.
                let app = format!("app-{}", i / (NAMESPACES * PODS_PER_APP));
                let api: Api<Pod> = Api::namespaced(client, &ns);
                let pod: Pod = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "labels": {"app": app}},
                    "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "x"}]},
                }))?;
                api.create(&PostParams::default(), &pod).await?;
                let status = serde_json::json!({"status": {"containerStatuses": [
                    {"name": "app", "containerID": format!("containerd://{name}"), "ready": true,
                     "restartCount": 0, "image": "x", "imageID": "", "state": {"running": {}}}]}});
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await?;
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(())
}

async fn bench(tools: usize, pods: usize) -> Result<()> {
    let Some(server) = ApiServer::start("bench operator") else {
        bail!("no kube-apiserver: run `cargo xtask bootstrap --tests`");
    };
    let client = server.client().await;
    let t = Instant::now();
    seed(&client, pods).await?;
    eprintln!(
        "bench: {pods} pods in {NAMESPACES} namespaces seeded in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let bin = std::env::var_os("TOE_BIN_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release"),
        std::path::PathBuf::from,
    );
    let mut operator = Command::new(bin.join("toe-operator"))
        .env("KUBECONFIG", server.kubeconfig())
        .env("TOE_LOG", "warn")
        .args(["--lease-name", "", "--metrics-addr", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .spawn()
        .context("starting toe-operator (cargo build --release -p toe-operator)")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let apps = (pods / (NAMESPACES * PODS_PER_APP)).max(1);
    let started = Instant::now();
    let created: Vec<Result<()>> = stream::iter(0..tools)
        .map(|i| {
            let client = client.clone();
            async move {
                let app = i % apps;
                let ns = format!("ns-{}", i % NAMESPACES);
                let pt: PowerTool = serde_json::from_value(serde_json::json!({
                    "apiVersion": "toe.run/v1alpha1", "kind": "PowerTool",
                    "metadata": {"name": format!("pt-{i}")},
                    "spec": {"tool": {"name": "cpu-profile"},
                             "targets": {"labelSelector": {"matchLabels": {"app": format!("app-{app}")}}}},
                }))?;
                Api::<PowerTool>::namespaced(client, &ns)
                    .create(&PostParams::default(), &pt)
                    .await?;
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    created.into_iter().collect::<Result<Vec<()>>>()?;
    let all: Api<PowerTool> = Api::all(client.clone());
    let admitted = loop {
        let list = all.list(&ListParams::default()).await?;
        let n = list
            .items
            .iter()
            .filter(|p| {
                p.status
                    .as_ref()
                    .is_some_and(|s| s.phase == PowerToolPhase::Admitted)
            })
            .count();
        if n == tools {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_mins(10) {
            bail!("only {n} of {tools} admitted after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let rss = peak_rss_kib(operator.id());
    let _ = operator.kill();
    let _ = operator.wait();
    println!("PowerTools  pods   all Admitted after   per PowerTool   operator peak RSS");
    #[expect(clippy::cast_precision_loss, reason = "display")]
    let per = admitted.as_secs_f64() * 1000.0 / tools as f64;
    #[expect(clippy::cast_precision_loss, reason = "display")]
    let rss_mib = rss as f64 / 1024.0;
    println!(
        "{tools:>10} {pods:>5} {:>17.2} s {per:>12.1} ms {rss_mib:>15.1} MiB",
        admitted.as_secs_f64(),
    );
    Ok(())
}

fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tools = arg("--powertools", 500);
    let pods = arg("--pods", 5000);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(tools, pods))
}
