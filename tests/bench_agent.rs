//! `cargo xtask bench agent`: the node agent with 1, 10 and 50 concurrent PowerTools (CPU
//! profiles of busy podman containers), against the real API server and operator.
//! Per round it reports the latency from PowerTool creation to the first sample (admitted,
//! dispatched, attached), from the end of sampling to Completed (artifacts in the store, status
//! written), and the agent process's peak RSS and average CPU. Each round starts a fresh agent
//! so its peak RSS is that round's. Lives beside the tests because it uses their harness.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use toe_common::api::{PowerTool, PowerToolConfig, PowerToolPhase};
use toe_tests::{
    Container,
    apiserver::ApiServer,
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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
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
        created.push((pt.metadata.name.unwrap(), at, None, None));
    }
    let duration = Duration::from_secs(secs);
    // A watch sees each status change as it happens, whatever the number of PowerTools.
    let events = watcher(api.clone(), watcher::Config::default()).applied_objects();
    let mut events = std::pin::pin!(events);
    let deadline = began + duration + Duration::from_mins(5);
    let mut map_kib = 0;
    let mut sample = tokio::time::interval(Duration::from_millis(250));
    while created.iter().any(|c| c.3.is_none()) {
        let next = tokio::select! {
            next = tokio::time::timeout_at(deadline.into(), events.next()) => next,
            _ = sample.tick() => {
                map_kib = map_kib.max(bpf_map_kib(agent.process.pid()));
                continue;
            }
        };
        let Ok(Some(pt)) = next else {
            bail!("not all Completed within 5 minutes past the duration");
        };
        let pt = pt?;
        let Some((name, _, summary, done)) = created
            .iter_mut()
            .find(|c| Some(&c.0) == pt.metadata.name.as_ref())
        else {
            continue;
        };
        let status = pt.status.unwrap_or_default();
        match status.phase {
            PowerToolPhase::Completed => {
                *done = Some(SystemTime::now());
                let url = status.targets[0]
                    .artifacts
                    .iter()
                    .find(|a| a.ends_with("/summary.json"))
                    .context("no summary.json among the artifacts")?;
                let path = url.strip_prefix("file://").context("a file:// store")?;
                *summary = Some(serde_json::from_slice::<serde_json::Value>(
                    &std::fs::read(path)?,
                )?);
            }
            PowerToolPhase::Failed | PowerToolPhase::Interrupted => {
                bail!("{name}: {:?}\n{}", status.targets, agent.log_text())
            }
            _ => {}
        }
    }
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
    // All on the wall clock of this one machine: created (before the create call), sampling
    // start and length (the run's summary), Completed seen (the watch).
    let ms = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
            * 1000.0
    };
    let window = |s: &serde_json::Value| {
        let start = s["started_unix_ms"].as_f64().unwrap_or(f64::NAN);
        (
            start,
            start + s["sampled_duration_s"].as_f64().unwrap_or(f64::NAN) * 1000.0,
        )
    };
    Ok(Round {
        tools,
        to_running: created
            .iter()
            .map(|c| window(c.2.as_ref().unwrap()).0 - ms(c.1))
            .collect(),
        to_done: created
            .iter()
            .map(|c| ms(c.3.unwrap()) - window(c.2.as_ref().unwrap()).1)
            .collect(),
        rss_kib,
        map_kib,
        cpu_percent,
    })
}

async fn bench(counts: &[usize], secs: u64, pods: usize) -> Result<()> {
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
    println!(
        "agent: cpu-profile {secs}s on {pods} busy container(s); latencies median / max over the round's PowerTools"
    );
    println!(
        "PowerTools   created -> sampling     sampling end -> Completed   agent peak RSS   eBPF maps (kernel)   agent CPU"
    );
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
        #[expect(clippy::cast_precision_loss, reason = "display")]
        let rss_mib = r.rss_kib as f64 / 1024.0;
        #[expect(clippy::cast_precision_loss, reason = "display")]
        let maps_mib = r.map_kib as f64 / 1024.0;
        println!(
            "{:>10} {:>9.0} / {:>6.0} ms {:>15.0} / {:>6.0} ms {:>12.1} MiB {:>16.1} MiB {:>10.1}%",
            r.tools,
            median(r.to_running.clone()),
            max(&r.to_running),
            median(r.to_done.clone()),
            max(&r.to_done),
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
        .block_on(bench(&counts, secs, pods))
}
