//! `cargo xtask bench agent`: the node agent with 1, 10 and 50 concurrent PowerTools (CPU
//! profiles of busy podman containers), against the real API server and operator.
//! Per round it reports the latency from PowerTool creation to the first sample (admitted,
//! dispatched, attached), from the end of sampling to Completed (artifacts in the store, status
//! written), and the agent process's peak RSS and average CPU. Each round starts a fresh agent
//! so its peak RSS is that round's. Lives beside the tests because it uses their harness.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};
use toe_common::api::{PowerTool, PowerToolConfig};
use toe_tests::{
    Container,
    apiserver::ApiServer,
    bench,
    cluster::{self, Agent, Operator},
};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .find(|w| w[0] == name)
        .map_or_else(|| default.to_owned(), |w| w[1].clone())
}

/// (peak RSS in KiB, CPU ticks user + system) of a live process.
fn usage(pid: u32) -> (u64, u64) {
    let (_, hwm) = bench::rss_kib(pid);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, r)| r.split_whitespace().collect());
    let ticks = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    (hwm, ticks)
}

/// Kernel memory of the eBPF maps a process holds (the `memlock` of each map fd), in KiB.
fn bpf_map_kib(pid: u32) -> u64 {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    fds.flatten()
        .filter_map(|f| std::fs::read_to_string(f.path()).ok())
        .filter(|info| info.contains("map_type:"))
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum::<u64>()
        / 1024
}

struct Round {
    tools: usize,
    to_running: Vec<f64>,
    to_done: Vec<f64>,
    rss_kib: u64,
    map_kib: u64,
    cpu_percent: f64,
}

#[expect(
    clippy::cast_precision_loss,
    reason = "milliseconds and percentages for display"
)]
async fn round(
    server: &ApiServer,
    node: &str,
    store: &str,
    state: &std::path::Path,
    tools: usize,
    secs: u64,
    pods: usize,
) -> Result<Round> {
    let api: Api<PowerTool> = Api::namespaced(server.client().await, "shop");
    let mut agent = Agent::start(server, node, state, store);
    // Settled: the agent has probed the kernel and synced its watches.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, cpu_before) = usage(agent.process.pid());
    let began = Instant::now();
    let mut created = Vec::new();
    for i in 0..tools {
        let pt: PowerTool = serde_json::from_value(serde_json::json!({
            "apiVersion": "toe.run/v1alpha1", "kind": "PowerTool",
            "metadata": {"name": format!("p{tools}-{i}")},
            "spec": {"tool": {"name": "cpu-profile", "duration": format!("{secs}s")},
                     "targets": {"labelSelector": {"matchLabels": {"app": format!("busy-{}", i % pods)}}}},
        }))?;
        let at = SystemTime::now();
        api.create(&PostParams::default(), &pt).await?;
        created.push((pt.metadata.name.unwrap(), at));
    }
    let mut map_kib = 0;
    let pid = agent.process.pid();
    let latencies = bench::until_completed(
        &api,
        &created,
        Duration::from_secs(secs) + Duration::from_mins(5),
        || map_kib = map_kib.max(bpf_map_kib(pid)),
        || agent.log_text(),
    )
    .await?;
    let wall = began.elapsed();
    let (rss_kib, cpu_after) = usage(agent.process.pid());
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let cpu_percent = (cpu_after - cpu_before) as f64 / hz / wall.as_secs_f64() * 100.0;
    agent.terminate(Duration::from_mins(1));
    api.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    Ok(Round {
        tools,
        to_running: latencies.iter().map(|l| l.to_sampling_ms).collect(),
        to_done: latencies.iter().map(|l| l.to_completed_ms).collect(),
        rss_kib,
        map_kib,
        cpu_percent,
    })
}

/// `json`: one line per round for another bench to read (`bench cluster` sets it).
async fn bench(counts: &[usize], secs: u64, pods: usize, json: bool) -> Result<()> {
    let Some(server) = ApiServer::start("bench agent") else {
        bail!("no kube-apiserver: run `cargo xtask bootstrap --tests`");
    };
    let admin = server.client().await;
    cluster::install_crds(&admin).await;
    cluster::agent_identity(&admin).await;
    let node = cluster::node_name();
    cluster::create_node(&admin, &node).await;
    cluster::create_namespace(&admin, "shop", &serde_json::json!({})).await;
    let configs: Api<PowerToolConfig> = Api::all(admin.clone());
    for c in cluster::documents::<PowerToolConfig>(&cluster::repo().join("examples/config.yaml")) {
        configs.create(&PostParams::default(), &c).await?;
    }
    let containers: Vec<Container> = (0..pods)
        .map(|i| Container::run(&format!("busy-{i}"), &["sh", "-c", "while :; do :; done"]))
        .collect();
    for (i, c) in containers.iter().enumerate() {
        let id = format!("containerd://{}", c.id);
        cluster::create_pod(
            &admin,
            "shop",
            &format!("busy-{i}"),
            &serde_json::json!({"app": format!("busy-{i}")}),
            &node,
            &[("app", &id)],
        )
        .await;
    }
    let operator = Operator::start(&server, &admin).await;
    let dir = tempfile::tempdir().context("temp dir")?;
    let store = format!("file://{}/", dir.path().join("store").display());
    if !json {
        println!(
            "agent: cpu-profile {secs}s on {pods} busy container(s); latencies median / max over the round's PowerTools"
        );
        println!(
            "PowerTools   created -> sampling     sampling end -> Completed   agent peak RSS   eBPF maps (kernel)   agent CPU"
        );
    }
    for &n in counts {
        let r = round(
            &server,
            &node,
            &store,
            &dir.path().join("state"),
            n,
            secs,
            pods,
        )
        .await?;
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "tools": r.tools, "to_sampling_ms": r.to_running,
                    "to_completed_ms": r.to_done, "rss_kib": r.rss_kib,
                })
            );
            continue;
        }
        #[expect(clippy::cast_precision_loss, reason = "display")]
        let rss_mib = r.rss_kib as f64 / 1024.0;
        #[expect(clippy::cast_precision_loss, reason = "display")]
        let maps_mib = r.map_kib as f64 / 1024.0;
        println!(
            "{:>10} {:>9.0} / {:>6.0} ms {:>15.0} / {:>6.0} ms {:>12.1} MiB {:>16.1} MiB {:>10.1}%",
            r.tools,
            bench::median(r.to_running.clone()),
            bench::max(&r.to_running),
            bench::median(r.to_done.clone()),
            bench::max(&r.to_done),
            rss_mib,
            maps_mib,
            r.cpu_percent
        );
    }
    operator.stop().await;
    Ok(())
}

fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let counts: Vec<usize> = arg("--counts", "1,10,50")
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("--counts: comma-separated numbers")?;
    let secs: u64 = arg("--secs", "10").parse().context("--secs")?;
    let pods: usize = arg("--pods", "2").parse().context("--pods")?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(
            &counts,
            secs,
            pods,
            std::env::args().any(|a| a == "--json"),
        ))
}
