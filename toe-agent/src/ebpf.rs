//! The embedded eBPF object: loading it, finding its programs and maps, and turning kernel refusals
//! into messages that say what is missing.

use std::{
    io,
    os::fd::AsFd as _,
    sync::{OnceLock, mpsc},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError},
    programs::{ProgramError, TracePoint},
};
use toe_common::targets::{
    FILTER_BY_CGROUP, FILTER_BY_TGID, FILTER_CONFIG_MAP, FilterConfig, TARGET_CGROUPS_MAP,
    TARGET_TGIDS_MAP,
};

use crate::targets::ResolvedTarget;

/// The object built from toe-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/toe"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "loading eBPF programs needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN); run toe with sudo"
    )]
    NotPermitted,
    #[error("loading the eBPF object: {0}")]
    Object(#[source] EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("eBPF map {name} is missing from the object")]
    MissingMap { name: &'static str },
    #[error("eBPF program {name} is missing from the object")]
    MissingProgram { name: &'static str },
    #[error(
        "{0} (tracefs is needed for tracepoints: `mount -t tracefs tracefs /sys/kernel/tracing`)"
    )]
    Tracefs(#[source] ProgramError),
    #[error("this kernel's tracepoints differ from what TOE reads: {0}")]
    Layout(String),
    #[error("starting a collector thread: {0}")]
    Thread(#[source] io::Error),
    #[error("opening perf events: {0}")]
    PerfEvent(#[source] io::Error),
    #[error(
        "this kernel ({kernel}) charges eBPF maps to RLIMIT_MEMLOCK and the limit could not be \
         raised ({why}); grant CAP_SYS_RESOURCE (the chart's agent.extraCapabilities: \
         [SYS_RESOURCE]) or raise the limit before starting toe"
    )]
    Memlock { kernel: String, why: String },
}

/// How this kernel accounts eBPF map memory, and what was done about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Memlock {
    /// Linux 5.11+ charges maps to the memory cgroup; RLIMIT_MEMLOCK plays no part, so the
    /// agent needs no CAP_SYS_RESOURCE.
    Cgroup,
    /// An older kernel counts map memory against RLIMIT_MEMLOCK, whose default (8 MiB or
    /// less) is smaller than a profile's ring buffers; the limit was raised to unlimited.
    Raised,
    /// An older kernel, and raising the limit was refused (no CAP_SYS_RESOURCE).
    Refused(String),
}

/// Whether kernel `release` (as `uname -r` prints it) counts eBPF memory against
/// RLIMIT_MEMLOCK: every kernel before 5.11 does. An unparsable release is taken as new: the
/// limit is then left alone and a refusal still names the limit.
#[must_use]
pub fn charges_memlock(release: &str) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) < (5, 11),
        _ => false,
    }
}

#[must_use]
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// This process's memlock situation, settled once (raising the limit if the kernel needs it)
/// before the first load.
pub fn memlock() -> &'static Memlock {
    static STATE: OnceLock<Memlock> = OnceLock::new();
    STATE.get_or_init(|| {
        if !charges_memlock(&kernel_release()) {
            return Memlock::Cgroup;
        }
        let inf = nix::sys::resource::RLIM_INFINITY;
        match nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK, inf, inf)
        {
            Ok(()) => Memlock::Raised,
            Err(e) => Memlock::Refused(e.desc().to_owned()),
        }
    })
}

fn is_eperm(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        cur = e.source();
    }
    false
}

type LoadRequest = (Vec<(String, u32)>, mpsc::Sender<Result<Ebpf, EbpfError>>);

/// Loads the object on one thread for the whole process. Every load parses the kernel's BTF
/// (aya's loader does it when created): about 18 MiB while it lasts, which the allocator keeps
/// in the loading thread's arena afterwards. The node agent loads once per concurrent run, each
/// on its own thread: on one loader thread that memory is paid once and reused.
fn on_loader_thread(sizes: Vec<(String, u32)>) -> Result<Ebpf, EbpfError> {
    static LOADER: OnceLock<mpsc::Sender<LoadRequest>> = OnceLock::new();
    let loader = LOADER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<LoadRequest>();
        std::thread::Builder::new()
            .name("toe-ebpf-load".into())
            .spawn(move || {
                for (sizes, reply) in rx {
                    let mut loader = EbpfLoader::new();
                    for (name, size) in &sizes {
                        loader.map_max_entries(name, *size);
                    }
                    let _ = reply.send(loader.load(OBJECT));
                }
            })
            .expect("spawning the eBPF loader thread");
        tx
    });
    let (tx, rx) = mpsc::channel();
    loader
        .send((sizes, tx))
        .expect("the loader thread lives as long as the process");
    rx.recv().expect("the loader thread answers every request")
}

/// One loaded copy of TOE's eBPF object. Dropping it detaches every program and frees every map.
pub struct Loaded {
    pub ebpf: Ebpf,
}

impl Loaded {
    /// Loads the object with map capacities overridden by `sizes` (map name, max entries; for a
    /// ring buffer, its bytes: see [`toe_common::cpu::ring_bytes`]).
    pub fn load(sizes: &[(&str, u32)]) -> Result<Self, LoadError> {
        if !nix::unistd::geteuid().is_root() {
            // Checked up front so the user gets one clear line instead of a verifier log.
            return Err(LoadError::NotPermitted);
        }
        let memlock = memlock();
        let sizes: Vec<(String, u32)> = sizes.iter().map(|&(n, s)| (n.to_owned(), s)).collect();
        let ebpf = on_loader_thread(sizes).map_err(|e| {
            if let (true, Memlock::Refused(why)) = (is_eperm(&e), memlock) {
                LoadError::Memlock {
                    kernel: kernel_release(),
                    why: why.clone(),
                }
            } else if is_eperm(&e) {
                LoadError::NotPermitted
            } else {
                LoadError::Object(e)
            }
        })?;
        Ok(Self { ebpf })
    }

    pub fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, LoadError> {
        self.ebpf
            .map_mut(name)
            .ok_or(LoadError::MissingMap { name })
    }

    pub fn take_map(&mut self, name: &'static str) -> Result<aya::maps::Map, LoadError> {
        self.ebpf
            .take_map(name)
            .ok_or(LoadError::MissingMap { name })
    }

    pub fn program_mut(
        &mut self,
        name: &'static str,
    ) -> Result<&mut aya::programs::Program, LoadError> {
        self.ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram { name })
    }

    /// Writes the target set into the kernel maps and starts following the target's processes:
    /// the children of a target by process id join it, and every new or exec'd target process
    /// is told to the image watcher ([`Self::news`]).
    pub fn install_targets(&mut self, target: &ResolvedTarget) -> Result<(), LoadError> {
        let map_err = |name| move |source| LoadError::Map { name, source };
        let mut mode = 0;
        let mut level_mask = 0u32;
        {
            let mut cgroups: HashMap<&mut MapData, u64, u32> =
                HashMap::try_from(self.map_mut(TARGET_CGROUPS_MAP)?)
                    .map_err(map_err(TARGET_CGROUPS_MAP))?;
            for cg in &target.cgroups {
                cgroups
                    .insert(cg.id, 0, 0)
                    .map_err(map_err(TARGET_CGROUPS_MAP))?;
                level_mask |= 1 << cg.level.min(toe_common::targets::MAX_CGROUP_LEVEL);
                mode |= FILTER_BY_CGROUP;
            }
        }
        self.follow_processes()?;
        if !target.tgids.is_empty() {
            mode |= FILTER_BY_TGID;
            for &pid in &target.tgids {
                self.add_tgid(pid)?;
            }
        }
        let mut config: Array<&mut MapData, FilterConfig> =
            Array::try_from(self.map_mut(FILTER_CONFIG_MAP)?)
                .map_err(map_err(FILTER_CONFIG_MAP))?;
        config
            .set(
                0,
                FilterConfig {
                    mode,
                    cgroup_level_mask: level_mask,
                },
                0,
            )
            .map_err(map_err(FILTER_CONFIG_MAP))
    }

    /// Adds a process to the target set while the collectors run (used for a command started
    /// by TOE).
    pub fn add_tgid(&mut self, pid: u32) -> Result<(), LoadError> {
        let mut tgids: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(self.map_mut(TARGET_TGIDS_MAP)?).map_err(|source| {
                LoadError::Map {
                    name: TARGET_TGIDS_MAP,
                    source,
                }
            })?;
        tgids.insert(pid, 0, 0).map_err(|source| LoadError::Map {
            name: TARGET_TGIDS_MAP,
            source,
        })
    }

    /// Adds a cgroup (by v2 id) to the target set while the collectors run.
    pub fn add_cgroup(&mut self, id: u64) -> Result<(), LoadError> {
        let name = TARGET_CGROUPS_MAP;
        let mut cgroups: HashMap<&mut MapData, u64, u32> =
            HashMap::try_from(self.map_mut(name)?)
                .map_err(|source| LoadError::Map { name, source })?;
        cgroups
            .insert(id, 0, 0)
            .map_err(|source| LoadError::Map { name, source })
    }

    /// Number of target processes the kernel still tracks (0 once they have all exited).
    /// Target processes alive now. The kernel drops a process's entry at its exit; one that
    /// exited before the programs were attached (a zombie its parent has not reaped yet, or
    /// gone) has an entry no exit will remove, so procfs decides.
    pub fn live_tgids(&mut self) -> Result<usize, LoadError> {
        Ok(self
            .tgids()?
            .into_iter()
            .filter(|&pid| crate::targets::running(pid))
            .count())
    }

    /// A descriptor of its own on map `name`, for a thread that reads it while the run goes on.
    fn own_map(&mut self, name: &'static str) -> Result<MapData, LoadError> {
        let map_err = move |source| LoadError::Map { name, source };
        let (aya::maps::Map::HashMap(data) | aya::maps::Map::PerCpuArray(data)) =
            self.map_mut(name)?
        else {
            return Err(LoadError::Layout(format!("{name}: unexpected map type")));
        };
        let fd = data.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
            map_err(MapError::from(aya::sys::SyscallError {
                call: "dup",
                io_error,
            }))
        })?;
        MapData::from_fd(fd).map_err(map_err)
    }

    /// A handle of its own on the map of target process ids, for a thread that reads it while
    /// the run goes on (the kernel adds the children it follows).
    pub fn tgids_handle(&mut self) -> Result<HashMap<MapData, u32, u32>, LoadError> {
        let name = TARGET_TGIDS_MAP;
        let data = self.own_map(name)?;
        HashMap::try_from(aya::maps::Map::HashMap(data))
            .map_err(|source| LoadError::Map { name, source })
    }

    /// A handle of its own on the target counters, whose count of children followed tells a
    /// reader of [`Self::tgids_handle`] when the set has grown.
    pub fn target_counters_handle(
        &mut self,
    ) -> Result<aya::maps::PerCpuArray<MapData, u64>, LoadError> {
        let name = toe_common::targets::TARGET_COUNTERS_MAP;
        let data = self.own_map(name)?;
        aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
            .map_err(|source| LoadError::Map { name, source })
    }

    /// Target processes the kernel tracks by process id (given ones and their children).
    pub fn tgids(&mut self) -> Result<Vec<u32>, LoadError> {
        let tgids: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(self.map_mut(TARGET_TGIDS_MAP)?).map_err(|source| {
                LoadError::Map {
                    name: TARGET_TGIDS_MAP,
                    source,
                }
            })?;
        Ok(tgids.keys().flatten().collect())
    }

    /// (children followed, children missed because the map was full), summed over CPUs.
    pub fn child_counters(&mut self) -> Result<(u64, u64), LoadError> {
        use toe_common::targets::{Counter, TARGET_COUNTERS_MAP};
        let name = TARGET_COUNTERS_MAP;
        let map: aya::maps::PerCpuArray<&mut MapData, u64> =
            aya::maps::PerCpuArray::try_from(self.map_mut(name)?)
                .map_err(|source| LoadError::Map { name, source })?;
        let sum = |c: Counter| map.get(&(c as u32), 0).map_or(0, |v| v.iter().sum::<u64>());
        Ok((sum(Counter::ChildrenFollowed), sum(Counter::TgidMapFull)))
    }

    /// The target processes' news: forks and execs, for a thread that waits on them (the image
    /// watcher; taken once).
    pub fn news(&mut self) -> Result<aya::maps::RingBuf<MapData>, LoadError> {
        let name = toe_common::targets::TARGET_NEWS_RING;
        aya::maps::RingBuf::try_from(self.take_map(name)?)
            .map_err(|source| LoadError::Map { name, source })
    }

    fn follow_processes(&mut self) -> Result<(), LoadError> {
        for (name, category, event) in [
            ("toe_task_newtask", "task", "task_newtask"),
            ("toe_process_exec", "sched", "sched_process_exec"),
            ("toe_process_exit", "sched", "sched_process_exit"),
        ] {
            let prog: &mut TracePoint = self
                .program_mut(name)?
                .try_into()
                .map_err(|source| LoadError::Program { name, source })?;
            prog.load()
                .map_err(|source| LoadError::Program { name, source })?;
            prog.attach(category, event).map_err(LoadError::Tracefs)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::charges_memlock;

    #[test]
    fn kernels_before_5_11_charge_memlock() {
        for old in ["4.19.0-27-amd64", "5.4.0", "5.10.209-1", "5.10"] {
            assert!(charges_memlock(old), "{old}");
        }
        for new in [
            "5.11.0",
            "5.15.0-91-generic",
            "6.1.0-28-amd64",
            "6.18.0",
            "10.0",
            "",
        ] {
            assert!(!charges_memlock(new), "{new}");
        }
    }
}
