//! What planning needs to know about a fault's target, read from /proc and the cgroup tree
//! beforehand (read-only), and the targets no fault may touch.

use toe_common::api::ToolOptions;

use super::{FaultError, cgroups::TargetCgroups, fill};
use crate::targets::ResolvedTarget;

/// What planning needs to know about the target, measured (read-only) beforehand.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TargetFacts {
    pub cgroups: TargetCgroups,
    /// CPUs the target's cgroup may use (its quota), if limited.
    pub cpu_limit: Option<f64>,
    pub memory_limit: Option<u64>,
    pub online_cpus: u32,
    /// Host memory (MemTotal).
    pub host_memory: u64,
    /// The target's processes: (pid, parent pid, name, start time).
    pub processes: Vec<Proc>,
    /// volume-fill: the filesystem at the path, as the target's main process sees it.
    pub fs: Option<FsFacts>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FsFacts {
    /// Whose root and mount namespace the path is resolved in.
    pub pid: u32,
    pub path: String,
    pub space: fill::FsSpace,
    /// The filesystem is one the node shares with its other pods: the target's own root
    /// filesystem, or the node's root or container/kubelet storage.
    pub node_shared: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
    /// Clock ticks since boot: tells a process from a later one with the same pid.
    pub start: u64,
}

/// (ppid, state, start time) from `/proc/<pid>/stat`.
pub(super) fn stat_fields(pid: u32) -> Option<(u32, char, u64)> {
    let f = crate::targets::proc_stat(pid)?;
    Some((
        f.get(1)?.parse().ok()?,
        f.first()?.chars().next()?,
        f.get(19)?.parse().ok()?,
    ))
}

fn proc_info(pid: u32) -> Option<Proc> {
    let (ppid, _, start) = stat_fields(pid)?;
    Some(Proc {
        pid,
        ppid,
        comm: crate::targets::process_name(pid)?,
        start,
    })
}

/// The target's main process: the oldest whose parent is outside the target.
pub(super) fn main_process(processes: &[Proc]) -> Option<&Proc> {
    let set: std::collections::HashSet<u32> = processes.iter().map(|p| p.pid).collect();
    processes
        .iter()
        .filter(|p| !set.contains(&p.ppid))
        .min_by_key(|p| (p.start, p.pid))
}

/// Processes of a cgroup directory and every cgroup below it.
fn cgroup_members(dir: &std::path::Path) -> Vec<u32> {
    crate::targets::cgroup_dirs(dir)
        .iter()
        .filter_map(|(d, _)| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `PF_KTHREAD` in the flags field of `/proc/<pid>/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

fn is_kernel_thread(pid: u32) -> bool {
    crate::targets::proc_stat(pid)
        .and_then(|f| f.get(6)?.parse::<u64>().ok())
        .is_some_and(|f| f & PF_KTHREAD != 0)
}

/// Whether `dir` is on a filesystem the node shares with its other pods: the device of the
/// target's root (a container's overlay lives on the node's disk), of the node's root, or of
/// where kubelet and the container runtimes keep volumes and layers. A volume of the target's
/// own (a PersistentVolume, a sized tmpfs) is a device of its own.
fn node_shared(dir: &std::os::fd::OwnedFd, pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(dev) = nix::sys::stat::fstat(dir).map(|s| s.st_dev) else {
        return true;
    };
    let shared = [
        format!("/proc/{pid}/root/"),
        "/proc/1/root/".to_owned(),
        "/proc/1/root/var".to_owned(),
        "/proc/1/root/var/lib/kubelet".to_owned(),
        "/proc/1/root/var/lib/containerd".to_owned(),
        "/proc/1/root/var/lib/containers".to_owned(),
        "/proc/1/root/var/lib/docker".to_owned(),
    ];
    shared
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .any(|m| m.dev() == dev)
}

fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Measures the target and refuses targets no fault may touch: TOE itself, PID 1, kernel
/// threads, and the root cgroup (the whole machine).
pub fn facts(target: &ResolvedTarget, options: &ToolOptions) -> Result<TargetFacts, FaultError> {
    let me = std::process::id();
    let cgroups = if let Some(&pid) = target.tgids.first() {
        if pid == me {
            return Err(FaultError::Refused("the target is TOE itself".into()));
        }
        if pid == 1 {
            return Err(FaultError::Refused(
                "the target is PID 1 (the host's init); faults never touch it".into(),
            ));
        }
        if is_kernel_thread(pid) {
            return Err(FaultError::Refused(format!(
                "pid {pid} is a kernel thread; it has no cgroup to stress"
            )));
        }
        TargetCgroups::of_pid(pid)?
    } else if let Some(cg) = target.cgroups.first() {
        if cg.level == 0 {
            return Err(FaultError::Refused(
                "the target is the root cgroup, i.e. the whole machine".into(),
            ));
        }
        let own = TargetCgroups::of_pid(me)?;
        if own.v2.as_ref().is_some_and(|d| d.starts_with(&cg.path)) {
            return Err(FaultError::Refused(format!(
                "{} contains TOE itself",
                cg.path.display()
            )));
        }
        TargetCgroups::of_v2_dir(&cg.path)?
    } else {
        return Err(FaultError::Refused("the target has no process".into()));
    };
    let pids: Vec<u32> = if target.tgids.is_empty() {
        target
            .cgroups
            .iter()
            .flat_map(|c| cgroup_members(&c.path))
            .collect()
    } else {
        target
            .tgids
            .iter()
            .copied()
            .chain(crate::targets::descendants(&target.tgids))
            .collect()
    };
    let processes: Vec<Proc> = pids.into_iter().filter_map(proc_info).collect();
    let fs = match options {
        ToolOptions::VolumeFill(o) => {
            let pid = main_process(&processes)
                .map(|p| p.pid)
                .ok_or_else(|| FaultError::Refused("the target has no process".into()))?;
            let dir = fill::open_dir(pid, &o.path)?;
            Some(FsFacts {
                pid,
                path: o.path.clone(),
                space: fill::space(&dir)?,
                node_shared: node_shared(&dir, pid),
            })
        }
        _ => None,
    };
    Ok(TargetFacts {
        fs,
        processes,
        cpu_limit: cgroups.cpu_limit(),
        memory_limit: cgroups.memory_limit(),
        cgroups,
        online_cpus: aya::util::online_cpus().map_or(1, |c| u32::try_from(c.len()).unwrap_or(1)),
        host_memory: host_memory(),
    })
}
