//! The software `context-switches` perf events the off-CPU program runs on: one per thread of a
//! target process (inherited by the threads and processes it starts later), or one per CPU for
//! each target cgroup. The kernel fires them only when a target thread leaves a CPU, so a
//! thread of any other workload pays the scheduler's perf hook, not a BPF program.
//!
//! Opened with `perf_event_open(2)` directly: aya's `PerfEvent::attach` has no cgroup scope, and
//! the fds must be kept by the run (closing them detaches the program).

use std::{
    collections::BTreeSet,
    fs, io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya_obj::generated::{
    PERF_EVENT_IOC_ENABLE, PERF_EVENT_IOC_SET_BPF, PERF_FLAG_FD_CLOEXEC, PERF_FLAG_PID_CGROUP,
    perf_event_attr, perf_sw_ids, perf_type_id,
};

use crate::targets::ResolvedTarget;

/// Rescans of a process's threads after opening events for those seen: each pass catches the
/// threads started meanwhile, which the events opened before them did not pass on.
const THREAD_SCANS: usize = 8;

fn open(pid: i32, cpu: i32, inherit: bool, flags: u32) -> io::Result<OwnedFd> {
    // SAFETY: a plain C struct; all-zero is its documented default.
    let mut attr: perf_event_attr = unsafe { std::mem::zeroed() };
    attr.type_ = perf_type_id::PERF_TYPE_SOFTWARE as u32;
    attr.size = u32::try_from(size_of::<perf_event_attr>()).unwrap_or(u32::MAX);
    attr.config = perf_sw_ids::PERF_COUNT_SW_CONTEXT_SWITCHES as u64;
    // Every switch is a sample, so the program sees each one.
    attr.__bindgen_anon_1.sample_period = 1;
    attr.set_disabled(1);
    attr.set_inherit(u64::from(inherit));
    // SAFETY: a valid attr of the size it states; the kernel returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            pid,
            cpu,
            -1,
            flags | PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap_or(-1)) })
}

fn ioctl(event: &OwnedFd, request: u32, arg: i32) -> io::Result<()> {
    // SAFETY: a perf ioctl on a perf fd; SET_BPF takes a program fd, ENABLE no argument.
    if unsafe { libc::ioctl(event.as_raw_fd(), libc::Ioctl::from(request), arg) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn threads(tgid: u32) -> BTreeSet<u32> {
    fs::read_dir(format!("/proc/{tgid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The events of one run; dropping them detaches the program.
pub struct SwitchEvents {
    fds: Vec<OwnedFd>,
}

impl SwitchEvents {
    /// Opens the events of every target thread and cgroup, disabled, with `prog` attached. Any
    /// failure is returned (the caller falls back to the tracepoint), and what was opened is
    /// closed.
    pub fn attach(
        target: &ResolvedTarget,
        tgids: &[u32],
        prog: BorrowedFd<'_>,
        cpus: &[u32],
    ) -> io::Result<Self> {
        // One descriptor per thread of the target: a thread pool can pass the soft limit.
        crate::symbolize::images::raise_open_files_limit();
        let mut fds = Vec::new();
        // Cgroups inside another target cgroup are already under its events.
        let cgroups: Vec<&Path> = target.cgroups.iter().map(|c| c.path.as_path()).collect();
        for dir in cgroups
            .iter()
            .filter(|d| !cgroups.iter().any(|o| o != *d && d.starts_with(o)))
        {
            let cg = fs::File::open(dir)?;
            for &cpu in cpus {
                let fd = open(
                    cg.as_raw_fd(),
                    i32::try_from(cpu).unwrap_or(0),
                    false,
                    PERF_FLAG_PID_CGROUP,
                )?;
                ioctl(&fd, PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd())?;
                fds.push(fd);
            }
        }
        for &tgid in tgids {
            let mut done = BTreeSet::new();
            for _ in 0..THREAD_SCANS {
                let new: Vec<u32> = threads(tgid).difference(&done).copied().collect();
                if new.is_empty() {
                    break;
                }
                for tid in new {
                    done.insert(tid);
                    match open(i32::try_from(tid).unwrap_or(0), -1, true, 0) {
                        Ok(fd) => {
                            ioctl(&fd, PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd())?;
                            fds.push(fd);
                        }
                        // Exited since the scan.
                        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(Self { fds })
    }

    /// Starts the events. Enabling one enables the copies its thread passed on since it was
    /// opened (the kernel applies it to the event's children).
    pub fn enable(&self) -> io::Result<()> {
        self.fds
            .iter()
            .try_for_each(|fd| ioctl(fd, PERF_EVENT_IOC_ENABLE, 0))
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }
}
