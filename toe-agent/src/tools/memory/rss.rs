//! RSS over time: each target process (`/proc/<pid>/status`) and each target cgroup
//! (`memory.stat`, cgroup v2 or the v1 memory controller), read at a fixed interval. The series
//! and their encodings (CSV, JSON, SVG chart) are the artifact contract's ([`toe_artifacts::rss`]).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

pub use toe_artifacts::rss::{RssPoint, RssSummary, Series, SeriesSummary, csv, svg};

use crate::targets::CgroupTarget;

/// Parses `/proc/<pid>/status` memory lines (kB) into bytes.
#[must_use]
pub fn parse_status(status: &str) -> Option<(u64, u64, u64, u64)> {
    let mut v = [None; 4];
    for line in status.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let slot = match key {
            "VmRSS" => 0,
            "RssAnon" => 1,
            "RssFile" => 2,
            "RssShmem" => 3,
            _ => continue,
        };
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        v[slot] = Some(kb * 1024);
    }
    Some((v[0]?, v[1]?, v[2]?, v[3]?))
}

/// Parses a cgroup `memory.stat` (v2 keys `anon`/`file`/`shmem`, or v1 hierarchical
/// `total_rss`/`total_cache`/`total_shmem`) into (anon, file, shmem) bytes.
#[must_use]
pub fn parse_memory_stat(stat: &str) -> Option<(u64, u64, u64)> {
    let mut kv = BTreeMap::new();
    for line in stat.lines() {
        if let Some((k, v)) = line.split_once(' ')
            && let Ok(v) = v.trim().parse::<u64>()
        {
            kv.insert(k, v);
        }
    }
    if let (Some(&a), Some(&f)) = (kv.get("anon"), kv.get("file")) {
        return Some((a, f, kv.get("shmem").copied().unwrap_or(0)));
    }
    Some((
        *kv.get("total_rss")?,
        *kv.get("total_cache")?,
        kv.get("total_shmem").copied().unwrap_or(0),
    ))
}

/// The `memory.stat` that accounts for `cg`: its own (cgroup v2 with the memory controller), or
/// the v1 memory cgroup of a process inside it (hybrid hierarchies keep memory on v1).
fn memory_stat_path(cg: &CgroupTarget) -> Option<PathBuf> {
    let own = cg.path.join("memory.stat");
    if own.exists() {
        return Some(own);
    }
    let procs = fs::read_to_string(cg.path.join("cgroup.procs")).ok()?;
    let pid = procs.lines().next()?.trim();
    let membership = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = membership.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        ctrls.split(',').any(|c| c == "memory").then_some(path)
    })?;
    let p = Path::new("/sys/fs/cgroup/memory")
        .join(rel.trim_start_matches('/'))
        .join("memory.stat");
    p.exists().then_some(p)
}

pub struct RssSampler {
    interval: Duration,
    started: Instant,
    next: Instant,
    series: BTreeMap<(u8, String), Series>,
    cgroup_stats: BTreeMap<String, Option<PathBuf>>,
}

impl RssSampler {
    #[must_use]
    pub fn new(interval: Duration) -> Self {
        let now = Instant::now();
        Self {
            interval,
            started: now,
            next: now,
            series: BTreeMap::new(),
            cgroup_stats: BTreeMap::new(),
        }
    }

    /// Reads every target now. Processes that are gone simply end their series.
    pub fn sample(&mut self, pids: &[u32], cgroups: &[CgroupTarget]) {
        let now = Instant::now();
        self.next = now + self.interval;
        let t_ms = u64::try_from(now.duration_since(self.started).as_millis()).unwrap_or(u64::MAX);
        for &pid in pids {
            let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
                continue;
            };
            let Some((rss, anon, file, shmem)) = parse_status(&status) else {
                // Kernel threads and zombies have no memory lines.
                continue;
            };
            let name = crate::targets::process_name(pid).unwrap_or_default();
            let series = self
                .series
                .entry((0, format!("{pid:>10}")))
                .or_insert_with(|| Series {
                    kind: "process".into(),
                    source: format!("{name} ({pid})"),
                    pid: Some(pid),
                    points: Vec::new(),
                });
            // The name changes when the process execs; the latest one labels the series.
            series.source = format!("{name} ({pid})");
            series.points.push(RssPoint {
                t_ms,
                rss,
                anon,
                file,
                shmem,
            });
        }
        for cg in cgroups {
            let key = cg.path.to_string_lossy().into_owned();
            let stat_path = self
                .cgroup_stats
                .entry(key.clone())
                .or_insert_with(|| memory_stat_path(cg))
                .clone();
            let Some(stat) = stat_path.and_then(|p| fs::read_to_string(p).ok()) else {
                continue;
            };
            let Some((anon, file, shmem)) = parse_memory_stat(&stat) else {
                continue;
            };
            let series = self
                .series
                .entry((1, key.clone()))
                .or_insert_with(|| Series {
                    kind: "cgroup".into(),
                    source: key,
                    pid: None,
                    points: Vec::new(),
                });
            series.points.push(RssPoint {
                t_ms,
                rss: anon + file,
                anon,
                file,
                shmem,
            });
        }
    }

    #[must_use]
    pub fn series(&self) -> Vec<Series> {
        self.series.values().cloned().collect()
    }

    #[must_use]
    pub fn summary(&self) -> RssSummary {
        RssSummary {
            interval_ms: u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX),
            series: self
                .series
                .values()
                .map(|s| SeriesSummary {
                    kind: s.kind.clone(),
                    source: s.source.clone(),
                    points: s.points.len(),
                    first_rss: s.points.first().map_or(0, |p| p.rss),
                    last_rss: s.points.last().map_or(0, |p| p.rss),
                    peak_rss: s.points.iter().map(|p| p.rss).max().unwrap_or(0),
                })
                .collect(),
        }
    }
}

/// Runs an [`RssSampler`] on its own thread, so readings keep their interval while the run's
/// task is busy (symbolizing a large binary can take a second).
pub struct RssThread {
    pids: Arc<Mutex<Vec<u32>>>,
    stop: mpsc::Sender<()>,
    handle: thread::JoinHandle<RssSampler>,
}

impl RssThread {
    #[must_use]
    pub fn spawn(interval: Duration, pids: Vec<u32>, cgroups: Vec<CgroupTarget>) -> Self {
        let pids = Arc::new(Mutex::new(pids));
        let (stop, stopped) = mpsc::channel();
        let shared = Arc::clone(&pids);
        let handle = thread::spawn(move || {
            let mut sampler = RssSampler::new(interval);
            loop {
                let now: Vec<u32> = shared.lock().map(|p| p.clone()).unwrap_or_default();
                sampler.sample(&now, &cgroups);
                let wait = sampler.next.saturating_duration_since(Instant::now());
                if !matches!(
                    stopped.recv_timeout(wait),
                    Err(mpsc::RecvTimeoutError::Timeout)
                ) {
                    // A last reading, so the series ends where collection ended.
                    let now: Vec<u32> = shared.lock().map(|p| p.clone()).unwrap_or_default();
                    sampler.sample(&now, &cgroups);
                    return sampler;
                }
            }
        });
        Self { pids, stop, handle }
    }

    /// The target processes to read from now on.
    pub fn set_pids(&self, pids: &[u32]) {
        if let Ok(mut p) = self.pids.lock() {
            pids.clone_into(&mut p);
        }
    }

    /// Takes a final reading and returns everything read.
    #[must_use]
    pub fn finish(self) -> RssSampler {
        let _ = self.stop.send(());
        self.handle
            .join()
            .unwrap_or_else(|_| RssSampler::new(Duration::from_secs(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_memory_stat() {
        let st = "Name:\tx\nVmRSS:\t  1000 kB\nRssAnon:\t 600 kB\nRssFile:\t 300 kB\nRssShmem:\t 100 kB\n";
        assert_eq!(
            parse_status(st),
            Some((1_024_000, 614_400, 307_200, 102_400))
        );
        assert_eq!(parse_status("Name:\tkthreadd\n"), None);
        assert_eq!(
            parse_memory_stat("anon 10\nfile 20\nshmem 5\n"),
            Some((10, 20, 5))
        );
        assert_eq!(
            parse_memory_stat("rss 1\ncache 2\ntotal_rss 10\ntotal_cache 20\ntotal_shmem 3\n"),
            Some((10, 20, 3))
        );
    }

    #[test]
    fn sampling_self_and_encoding() {
        let mut s = RssSampler::new(Duration::from_millis(100));
        s.sample(&[std::process::id()], &[]);
        let series = s.series();
        assert_eq!(series.len(), 1);
        assert!(series[0].points[0].rss > 0);
        let text = csv(&series);
        assert!(text.lines().nth(1).unwrap().starts_with("0.0"), "{text}");
        let chart = svg(&series, "t <&>");
        assert!(chart.contains("<polyline") && chart.contains("t &lt;&amp;&gt;"));
    }
}
