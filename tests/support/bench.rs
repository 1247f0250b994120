//! What the end-to-end benches (`cargo xtask bench agent`, `bench cluster`) measure the same
//! way: PowerTools followed by a watch from creation to Completed, on one machine's wall clock.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use kube::{
    Api,
    runtime::{WatchStreamExt as _, watcher},
};
use toe_common::api::{PowerTool, PowerToolPhase};

/// One PowerTool's two latencies, in milliseconds: from just before its creation to the start
/// of sampling (admitted, dispatched, attached), and from the end of sampling to Completed
/// seen by the watch (artifacts written, status updated). The sampling window is the run's
/// own summary's.
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    pub to_sampling_ms: f64,
    pub to_completed_ms: f64,
}

fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0
}

/// Watches `created` (name, time taken just before the create call) until every one is
/// Completed, calling `tick` every 250 ms meanwhile; fails on a Failed or Interrupted one
/// (adding `context()` to the error) or when `limit` passes.
pub async fn until_completed(
    api: &Api<PowerTool>,
    created: &[(String, SystemTime)],
    limit: Duration,
    mut tick: impl FnMut(),
    context: impl Fn() -> String,
) -> Result<Vec<Latency>> {
    let mut done: Vec<Option<Latency>> = vec![None; created.len()];
    // A watch sees each status change as it happens, whatever the number of PowerTools.
    let events = watcher(api.clone(), watcher::Config::default()).applied_objects();
    let mut events = std::pin::pin!(events);
    let deadline = Instant::now() + limit;
    let mut every = tokio::time::interval(Duration::from_millis(250));
    while done.iter().any(Option::is_none) {
        let next = tokio::select! {
            next = tokio::time::timeout_at(deadline.into(), events.next()) => next,
            _ = every.tick() => {
                tick();
                continue;
            }
        };
        let Ok(Some(pt)) = next else {
            bail!(
                "not all Completed within {} s\n{}",
                limit.as_secs(),
                context()
            );
        };
        let pt = pt?;
        let seen = SystemTime::now();
        let Some(i) = created
            .iter()
            .position(|c| Some(&c.0) == pt.metadata.name.as_ref())
        else {
            continue;
        };
        let status = pt.status.unwrap_or_default();
        match status.phase {
            PowerToolPhase::Completed if done[i].is_none() => {
                let url = status
                    .targets
                    .first()
                    .and_then(|t| t.artifacts.iter().find(|a| a.ends_with("/summary.json")))
                    .context("no summary.json among the artifacts")?;
                let path = url.strip_prefix("file://").context("a file:// store")?;
                let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
                let start = summary["started_unix_ms"].as_f64().unwrap_or(f64::NAN);
                let end =
                    start + summary["sampled_duration_s"].as_f64().unwrap_or(f64::NAN) * 1000.0;
                done[i] = Some(Latency {
                    to_sampling_ms: start - unix_ms(created[i].1),
                    to_completed_ms: unix_ms(seen) - end,
                });
            }
            PowerToolPhase::Failed | PowerToolPhase::Interrupted => {
                bail!("{}: {:?}\n{}", created[i].0, status.targets, context())
            }
            _ => {}
        }
    }
    Ok(done.into_iter().flatten().collect())
}

#[must_use]
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[must_use]
pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// (resident now, peak resident) of a live process, in KiB.
#[must_use]
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
