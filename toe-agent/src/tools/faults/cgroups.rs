//! The target's cgroups in both hierarchies behind one interface. On a hybrid host (this one) the
//! limits live in cgroup v1 controllers while the v2 tree has none; on a v2-only host everything is
//! in v2 (`cpu.max`, `memory.max`). Each question goes to the hierarchy that has the controller.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use crate::targets::{self, TargetError};

/// Where a target's processes are accounted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetCgroups {
    /// The v2 directory, when a v2 hierarchy is mounted.
    pub v2: Option<PathBuf>,
    /// v1 controller name -> directory (co-mounted controllers share one).
    pub v1: BTreeMap<String, PathBuf>,
}

/// Controllers whose v1 hierarchy a stress worker joins so it is charged like the target.
const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "cpuset"];

fn read_trim(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

impl TargetCgroups {
    /// The cgroups of process `pid`, from `/proc/<pid>/cgroup`.
    pub fn of_pid(pid: u32) -> Result<Self, TargetError> {
        let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
        let text = fs::read_to_string(&path).map_err(|source| TargetError::Io {
            path: path.clone(),
            source,
        })?;
        let mounts = targets::cgroup_mounts()?;
        let mut out = Self::default();
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(rel)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rel = rel.trim_start_matches('/');
            if controllers.is_empty() {
                out.v2 = mounts
                    .iter()
                    .find(|m| m.fstype == "cgroup2")
                    .map(|m| m.point.join(rel));
                continue;
            }
            for c in controllers.split(',') {
                if !V1_CONTROLLERS.contains(&c) {
                    continue;
                }
                if let Some(m) = mounts
                    .iter()
                    .find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == c))
                {
                    out.v1.insert(c.to_owned(), m.point.join(rel));
                }
            }
        }
        Ok(out)
    }

    /// A v2 cgroup directory and, on a hybrid host, the v1 directories at the same path.
    pub fn of_v2_dir(dir: &Path) -> Result<Self, TargetError> {
        let mounts = targets::cgroup_mounts()?;
        let root = mounts
            .iter()
            .find(|m| m.fstype == "cgroup2")
            .ok_or(TargetError::NoCgroup2)?;
        let rel = dir.strip_prefix(&root.point).unwrap_or(Path::new(""));
        let mut out = Self {
            v2: Some(dir.to_owned()),
            v1: BTreeMap::new(),
        };
        for c in V1_CONTROLLERS {
            if let Some(m) = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == c))
            {
                let d = m.point.join(rel);
                if d.is_dir() {
                    out.v1.insert(c.to_owned(), d);
                }
            }
        }
        Ok(out)
    }

    /// The directory that answers for `controller`: its v1 hierarchy when it has one, else v2.
    fn dir(&self, controller: &str) -> Option<(&Path, bool)> {
        self.v1
            .get(controller)
            .map(|d| (d.as_path(), true))
            .or_else(|| self.v2.as_deref().map(|d| (d, false)))
    }

    /// Every `cgroup.procs` a process must be written to to live where the target lives.
    #[must_use]
    pub fn procs_files(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<&PathBuf> = self.v2.iter().chain(self.v1.values()).collect();
        dirs.sort();
        dirs.dedup();
        dirs.into_iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Effective CPU limit in CPUs: the smallest quota on the path from the cgroup to the root.
    #[must_use]
    pub fn cpu_limit(&self) -> Option<f64> {
        let (dir, v1) = self.dir("cpu")?;
        let mut best: Option<f64> = None;
        for d in dir.ancestors() {
            // Above the hierarchy's root the files end: so does the walk.
            let limit = if v1 {
                let (Some(quota), Some(period)) = (
                    read_trim(&d.join("cpu.cfs_quota_us")).and_then(|q| q.parse::<i64>().ok()),
                    read_trim(&d.join("cpu.cfs_period_us")).and_then(|p| p.parse::<i64>().ok()),
                ) else {
                    break;
                };
                #[expect(clippy::cast_precision_loss, reason = "microseconds")]
                (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
            } else {
                let Some(text) = read_trim(&d.join("cpu.max")) else {
                    break;
                };
                let mut it = text.split_whitespace();
                match (it.next(), it.next().and_then(|p| p.parse::<f64>().ok())) {
                    (Some(q), Some(period)) if q != "max" => {
                        q.parse::<f64>().ok().map(|q| q / period)
                    }
                    _ => None,
                }
            };
            if let Some(l) = limit {
                best = Some(best.map_or(l, |b: f64| b.min(l)));
            }
        }
        best
    }

    /// Effective memory limit in bytes (smallest on the path to the root).
    #[must_use]
    pub fn memory_limit(&self) -> Option<u64> {
        let (dir, v1) = self.dir("memory")?;
        let file = if v1 {
            "memory.limit_in_bytes"
        } else {
            "memory.max"
        };
        dir.ancestors()
            .filter_map(|d| read_trim(&d.join(file)))
            .filter_map(|t| t.parse::<u64>().ok())
            // v1 reports "no limit" as a huge page-aligned number.
            .filter(|&l| l < 1 << 62)
            .min()
    }

    /// Bytes charged to the memory cgroup now.
    #[must_use]
    pub fn memory_usage(&self) -> Option<u64> {
        let (dir, v1) = self.dir("memory")?;
        let file = if v1 {
            "memory.usage_in_bytes"
        } else {
            "memory.current"
        };
        read_trim(&dir.join(file))?.parse().ok()
    }

    /// OOM kills in the memory cgroup so far.
    #[must_use]
    pub fn oom_kills(&self) -> Option<u64> {
        let (dir, v1) = self.dir("memory")?;
        let file = if v1 {
            "memory.oom_control"
        } else {
            "memory.events"
        };
        let text = fs::read_to_string(dir.join(file)).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// The cgroup's own CPU quota (µs per period; `None`: none) and period, and its throttling
    /// counters so far (periods throttled, ns throttled), from the hierarchy that has the cpu
    /// controller: `cpu.cfs_quota_us`/`cpu.stat` in v1, `cpu.max`/`cpu.stat` in v2.
    #[must_use]
    pub fn cpu_throttling(&self) -> Option<(PathBuf, Option<u64>, u64, u64, u64)> {
        let (dir, v1) = self.dir("cpu")?;
        let (quota, period) = if v1 {
            let q = read_trim(&dir.join("cpu.cfs_quota_us"))?
                .parse::<i64>()
                .ok()?;
            let p = read_trim(&dir.join("cpu.cfs_period_us"))?
                .parse::<u64>()
                .ok()?;
            (u64::try_from(q).ok(), p)
        } else {
            let text = read_trim(&dir.join("cpu.max"))?;
            let mut it = text.split_whitespace();
            let q = it.next()?;
            let p = it.next()?.parse::<u64>().ok()?;
            (q.parse::<u64>().ok(), p)
        };
        let stat = fs::read_to_string(dir.join("cpu.stat")).ok()?;
        let field = |name: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let periods = field("nr_throttled").unwrap_or(0);
        let ns = if v1 {
            field("throttled_time").unwrap_or(0)
        } else {
            field("throttled_usec").unwrap_or(0).saturating_mul(1000)
        };
        Some((dir.to_owned(), quota, period, periods, ns))
    }

    /// Whether the target sits in the root of the hierarchy that accounts `controller` (its
    /// usage counters are then the whole machine's).
    #[must_use]
    pub fn is_root(&self, controller: &str) -> bool {
        self.dir(controller)
            .is_none_or(|(d, _)| !d.parent().is_some_and(|p| p.join("cgroup.procs").exists()))
    }
}
