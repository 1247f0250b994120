//! `cargo xtask bench cluster`: TOE as a cluster runs it (the packaged chart, the release
//! images, the operator and the agent as pods of a real kubelet and containerd node), with one
//! cpu-profile PowerTool on a real pod per round: the latency from PowerTool creation to the
//! first sample, from the end of sampling to Completed, and the agent pod's resident memory.
//! Each round is followed by one round of `bench agent` (a bare API server, `toe agent` as a
//! process, a podman container) with the same PowerTool, so both columns come from the same
//! minutes of the same machine. Needs the cluster (`TOE_CLUSTER_KUBECONFIG`, as for the
//! cluster suite) and the bench-agent binary (`TOE_BENCH_AGENT`).

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use toe_common::api::PowerTool;
use toe_tests::{
    bench::{self, Latency},
    node::{Cluster, NAMESPACE, WORKLOAD_NAMESPACE, workload},
};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .find(|w| w[0] == name)
        .map_or_else(|| default.to_owned(), |w| w[1].clone())
}

/// The agent pod's `toe` process on this node, found through its container's cgroup.
fn agent_pid(c: &Cluster) -> Result<u32> {
    let (ok, id) = c.kubectl(&[
        "-n",
        NAMESPACE,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/component=agent",
        "-o",
        "jsonpath={.items[0].status.containerStatuses[0].containerID}",
    ]);
    let id = id.trim().trim_start_matches("containerd://").to_owned();
    if !ok || id.is_empty() {
        bail!("no agent container: {id}");
    }
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "toe")
                && std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                    .is_ok_and(|g| g.contains(&id))
        })
        .collect();
    pids.sort_unstable();
    pids.first()
        .copied()
        .context("the agent container has no toe process")
}

/// One PowerTool on the workload's app container; its latencies and the agent's largest
/// resident size meanwhile (KiB).
async fn cluster_round(
    c: &Cluster,
    api: &Api<PowerTool>,
    i: usize,
    secs: u64,
) -> Result<(Latency, u64)> {
    let name = format!("bench-{i}");
    let pt: PowerTool = serde_json::from_value(serde_json::json!({
        "apiVersion": "toe.run/v1alpha1", "kind": "PowerTool",
        "metadata": {"name": name, "namespace": WORKLOAD_NAMESPACE},
        "spec": {"tool": {"name": "cpu-profile", "duration": format!("{secs}s")},
                 "targets": {"labelSelector": {"matchLabels": {"app": "burn"}},
                             "containers": ["app"]}},
    }))?;
    let pid = agent_pid(c)?;
    let mut rss = 0;
    let at = SystemTime::now();
    api.create(&PostParams::default(), &pt).await?;
    let latency = bench::until_completed(
        api,
        &[(name.clone(), at)],
        Duration::from_secs(secs) + Duration::from_mins(3),
        || rss = rss.max(bench::rss_kib(pid).0),
        || c.diagnostics(),
    )
    .await?;
    api.delete(&name, &DeleteParams::default()).await?;
    Ok((latency[0], rss))
}

/// One round of `bench agent` with one PowerTool: (latency, the agent's peak RSS in KiB).
fn agent_round(bench_agent: &PathBuf, secs: u64) -> Result<(Latency, u64)> {
    let out = Command::new(bench_agent)
        .args([
            "--counts",
            "1",
            "--pods",
            "1",
            "--secs",
            &secs.to_string(),
            "--json",
        ])
        .output()
        .with_context(|| format!("running {}", bench_agent.display()))?;
    if !out.status.success() {
        bail!(
            "bench agent failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rfind(|l| l.starts_with('{'))
        .context("bench agent printed no result")?
        .to_owned();
    let r: serde_json::Value = serde_json::from_str(&line)?;
    let first = |key: &str| r[key][0].as_f64().unwrap_or(f64::NAN);
    Ok((
        Latency {
            to_sampling_ms: first("to_sampling_ms"),
            to_completed_ms: first("to_completed_ms"),
        },
        r["rss_kib"].as_u64().unwrap_or(0),
    ))
}

#[expect(clippy::cast_precision_loss, reason = "display")]
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn run(rounds: usize, secs: u64) -> Result<()> {
    let c = Cluster::get();
    let bench_agent = PathBuf::from(
        std::env::var_os("TOE_BENCH_AGENT").context("TOE_BENCH_AGENT: the bench-agent binary")?,
    );
    c.install_toe();
    workload(&c);
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&c.kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let api: Api<PowerTool> = Api::namespaced(kube::Client::try_from(config)?, WORKLOAD_NAMESPACE);
    let (mut node, mut bare) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        node.push(cluster_round(&c, &api, i, secs).await?);
        bare.push(agent_round(&bench_agent, secs)?);
        eprintln!("bench cluster: round {} of {rounds} done", i + 1);
    }
    let (_, agent_peak) = bench::rss_kib(agent_pid(&c)?);
    println!(
        "cluster: cpu-profile {secs}s of one container, {rounds} rounds, each followed by one round \
         of `bench agent` (bare API server, agent process, podman container); median / max"
    );
    println!(
        "{:<28} {:>22} {:>22} {:>8}",
        "", "real node (chart)", "bench agent", "ratio"
    );
    let pick = |v: &[(Latency, u64)], f: fn(&Latency) -> f64| -> Vec<f64> {
        v.iter().map(|(l, _)| f(l)).collect()
    };
    for (what, f) in [
        (
            "created -> sampling",
            (|l: &Latency| l.to_sampling_ms) as fn(&Latency) -> f64,
        ),
        ("sampling end -> Completed", |l: &Latency| l.to_completed_ms),
    ] {
        let (a, b) = (pick(&node, f), pick(&bare, f));
        println!(
            "{what:<28} {:>11.0} / {:>6.0} ms {:>11.0} / {:>6.0} ms {:>7.2}x",
            bench::median(a.clone()),
            bench::max(&a),
            bench::median(b.clone()),
            bench::max(&b),
            bench::median(a) / bench::median(b)
        );
    }
    let node_rss = node.iter().map(|r| r.1).max().unwrap_or(0);
    let bare_rss = bare.iter().map(|r| r.1).max().unwrap_or(0);
    println!(
        "{:<28} {:>18.1} MiB {:>18.1} MiB {:>7.2}x",
        "agent resident (max)",
        mib(node_rss),
        mib(bare_rss),
        mib(node_rss) / mib(bare_rss)
    );
    println!(
        "{:<28} {:>18.1} MiB   (the pod's agent since it started: probe, watches, every round)",
        "agent pod peak (VmHWM)",
        mib(agent_peak)
    );
    Ok(())
}

fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rounds: usize = arg("--rounds", "3").parse().context("--rounds")?;
    let secs: u64 = arg("--secs", "10").parse().context("--secs")?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(rounds, secs))
}
