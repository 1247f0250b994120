//! RSS over time: each target process (`/proc/<pid>/status`) and each target cgroup
//! (`memory.stat`, cgroup v2 or the v1 memory controller), read at a fixed interval and written as
//! CSV, JSON and an SVG chart.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{profile::esc, targets::CgroupTarget};

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RssPoint {
    /// Milliseconds since collection started.
    pub t_ms: u64,
    pub rss: u64,
    pub anon: u64,
    pub file: u64,
    pub shmem: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Series {
    /// `process` or `cgroup`.
    pub kind: String,
    /// `name (pid)` or the cgroup path.
    pub source: String,
    pub pid: Option<u32>,
    pub points: Vec<RssPoint>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeriesSummary {
    pub kind: String,
    pub source: String,
    pub points: usize,
    pub first_rss: u64,
    pub last_rss: u64,
    pub peak_rss: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RssSummary {
    pub interval_ms: u64,
    pub series: Vec<SeriesSummary>,
}

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

/// The RSS curves as a lane of the run's shared timeline: every cgroup, and the processes with
/// the highest peaks (a lane of fifty lines reads as noise).
#[must_use]
pub fn timeline_lane(series: &[Series]) -> crate::profile::timeline::Lane {
    const PROCESSES: usize = 4;
    let peak = |s: &Series| s.points.iter().map(|p| p.rss).max().unwrap_or(0);
    let mut processes: Vec<&Series> = series.iter().filter(|s| s.kind != "cgroup").collect();
    processes.sort_by_key(|s| std::cmp::Reverse(peak(s)));
    let chosen = series
        .iter()
        .filter(|s| s.kind == "cgroup")
        .chain(processes.into_iter().take(PROCESSES));
    crate::profile::timeline::Lane {
        name: "memory-profile: RSS".into(),
        unit: "bytes".into(),
        series: chosen
            .map(|s| crate::profile::timeline::Series {
                name: s.source.clone(),
                #[expect(clippy::cast_precision_loss, reason = "values for display")]
                points: s
                    .points
                    .iter()
                    .map(|p| (p.t_ms as f64, p.rss as f64))
                    .collect(),
            })
            .collect(),
        ..crate::profile::timeline::Lane::default()
    }
}

#[must_use]
pub fn csv(series: &[Series]) -> String {
    let mut o =
        String::from("time_s,kind,source,pid,rss_bytes,anon_bytes,file_bytes,shmem_bytes\n");
    for s in series {
        // Sources are process names or paths: quote them, doubling quotes (RFC 4180).
        let source = format!("\"{}\"", s.source.replace('"', "\"\""));
        for p in &s.points {
            let _ = writeln!(
                o,
                "{}.{:03},{},{source},{},{},{},{},{}",
                p.t_ms / 1000,
                p.t_ms % 1000,
                s.kind,
                s.pid.map(|p| p.to_string()).unwrap_or_default(),
                p.rss,
                p.anon,
                p.file,
                p.shmem
            );
        }
    }
    o
}

/// A line chart of RSS per series. Written by hand: it is a handful of SVG elements, and the
/// plotting crates need a font stack just to measure axis labels.
#[must_use]
#[expect(clippy::cast_precision_loss, reason = "pixel coordinates")]
pub fn svg(series: &[Series], title: &str) -> String {
    const W: f64 = 960.0;
    const H: f64 = 420.0;
    const L: f64 = 80.0;
    const R: f64 = 260.0;
    const T: f64 = 40.0;
    const B: f64 = 40.0;
    const COLOURS: [&str; 8] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    ];
    let last_ms = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.t_ms))
        .max()
        .unwrap_or(0)
        .max(1);
    let peak = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.rss))
        .max()
        .unwrap_or(0)
        .max(1);
    let px = |t: u64| L + (t as f64 / last_ms as f64) * (W - L - R);
    let py = |v: u64| H - B - (v as f64 / peak as f64) * (H - T - B);
    let mut o = String::new();
    let _ = write!(
        o,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{L}" y="22" font-size="15">{}</text>
"#,
        esc(title)
    );
    for i in 0..=4u64 {
        let v = peak * i / 4;
        let yy = py(v);
        let _ = writeln!(
            o,
            r##"<line x1="{L}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - R,
            L - 6.0,
            yy + 4.0,
            esc(&crate::profile::memory::bytes(v))
        );
        let t = last_ms * i / 4;
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.1}s</text>"#,
            px(t),
            H - B + 18.0,
            t as f64 / 1000.0
        );
    }
    if series.iter().all(|s| s.points.is_empty()) {
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" text-anchor="middle">no RSS readings (targets gone before the first reading)</text>"#,
            f64::midpoint(W - R, L),
            H / 2.0
        );
    }
    let mut shown: Vec<&Series> = series.iter().filter(|s| !s.points.is_empty()).collect();
    shown.sort_by_key(|s| std::cmp::Reverse(s.points.iter().map(|p| p.rss).max()));
    for (i, s) in shown.iter().take(COLOURS.len()).enumerate() {
        let c = COLOURS[i];
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|p| format!("{:.1},{:.1}", px(p.t_ms), py(p.rss)))
            .collect();
        let _ = writeln!(
            o,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"><title>{}</title></polyline>"#,
            pts.join(" "),
            esc(&s.source)
        );
        let ly = T + 16.0 * i as f64;
        let _ = writeln!(
            o,
            r#"<rect x="{}" y="{:.1}" width="12" height="3" fill="{c}"/><text x="{}" y="{:.1}">{} {}</text>"#,
            W - R + 16.0,
            ly - 4.0,
            W - R + 34.0,
            ly,
            esc(&s.kind),
            esc(&s.source)
        );
    }
    if shown.len() > COLOURS.len() {
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{:.1}">+{} more in rss.csv</text>"#,
            W - R + 16.0,
            T + 16.0 * COLOURS.len() as f64,
            shown.len() - COLOURS.len()
        );
    }
    o.push_str("</svg>\n");
    o
}

pub fn render(o: &mut String, r: &RssSummary) {
    use crate::profile::memory::bytes;
    for s in r.series.iter().take(6) {
        let _ = writeln!(
            o,
            "  rss {} {}: {} -> {} (peak {}, {} readings every {} ms)",
            s.kind,
            s.source,
            bytes(s.first_rss),
            bytes(s.last_rss),
            bytes(s.peak_rss),
            s.points,
            r.interval_ms
        );
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
