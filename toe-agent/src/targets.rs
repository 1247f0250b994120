//! What "the target" is: a process (and the children it starts), a cgroup (and its descendants),
//! or a command TOE starts itself. Resolution turns user input into cgroup v2 ids and tgids the
//! kernel side filters on, and rejects anything that does not exist before anything is attached.

use std::{
    collections::{BTreeSet, HashMap},
    ffi::{CString, OsString},
    fs,
    io::{self, Read as _},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use nix::{
    sys::wait::{WaitStatus, waitpid},
    unistd::{ForkResult, Pid, fork, pipe},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetSpec {
    /// A process, its threads and every process it starts during the run.
    Pid(u32),
    /// A cgroup directory (v2, or a v1 directory mirrored in the v2 hierarchy) and its descendants.
    Cgroup(PathBuf),
    /// A command TOE starts and profiles from its first instruction.
    Command(Vec<OsString>),
    /// A container by id (or unique id prefix of at least 12 hex digits), optionally with its
    /// runtime's scheme as Kubernetes reports it (`containerd://`, `cri-o://`, `docker://`).
    Container(String),
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("--pid: 0 is not a process id")]
    PidZero,
    #[error("--pid {0}: no such process")]
    NoSuchPid(u32),
    #[error("--pid {tid}: that is a thread of process {tgid}; pass --pid {tgid}")]
    ThreadNotProcess { tid: u32, tgid: u32 },
    #[error("--cgroup {0}: no such directory")]
    NoSuchCgroup(PathBuf),
    #[error("--cgroup {0}: not a cgroup directory (it has no cgroup.procs)")]
    NotACgroup(PathBuf),
    #[error("--cgroup {path}: not under a mounted cgroup hierarchy ({mounts})")]
    NotUnderCgroupfs { path: PathBuf, mounts: String },
    #[error(
        "--cgroup {path}: cgroup v1 directory has no cgroup v2 counterpart at {v2}; TOE filters in the kernel by cgroup v2 id"
    )]
    NoV2Counterpart { path: PathBuf, v2: PathBuf },
    #[error("no cgroup v2 hierarchy is mounted (needed to filter by cgroup in the kernel)")]
    NoCgroup2,
    #[error("--: no command given")]
    EmptyCommand,
    #[error("{0}: command not found")]
    CommandNotFound(String),
    #[error("starting {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{0} has no processes: there is nothing to trace (start the workload first, or use -- COMMAND)"
    )]
    Empty(String),
    #[error("--container {0}: {1}")]
    Container(String, String),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupTarget {
    /// The directory in the cgroup v2 hierarchy.
    pub path: PathBuf,
    /// `bpf_get_current_cgroup_id()` value: the inode of the v2 directory.
    pub id: u64,
    /// Depth below the v2 root (the root is level 0).
    pub level: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvedTarget {
    pub description: String,
    pub cgroups: Vec<CgroupTarget>,
    /// Processes followed with their future children.
    pub tgids: Vec<u32>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TargetError + '_ {
    move |source| TargetError::Io {
        path: path.to_owned(),
        source,
    }
}

/// CPU time in ns of a process or thread (`se.sum_exec_runtime`, with the stint it is running
/// now): the first field of `/proc/<id>/schedstat`, which also exists (hidden) for thread ids.
pub(crate) fn cpu_ns(id: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{id}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The tgid of `/proc/<pid>`, which also exists (hidden) for thread ids.
pub(crate) fn tgid_of(pid: u32) -> Result<Option<u32>, TargetError> {
    let path = PathBuf::from(format!("/proc/{pid}/status"));
    let status = match fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok()))
}

pub fn resolve_pid(pid: u32) -> Result<ResolvedTarget, TargetError> {
    if pid == 0 {
        return Err(TargetError::PidZero);
    }
    match tgid_of(pid)? {
        None => Err(TargetError::NoSuchPid(pid)),
        Some(tgid) if tgid != pid => Err(TargetError::ThreadNotProcess { tid: pid, tgid }),
        Some(_) => Ok(ResolvedTarget {
            description: format!("pid {pid} ({})", process_name(pid).unwrap_or_default()),
            cgroups: Vec::new(),
            tgids: vec![pid],
        }),
    }
}

#[derive(Debug)]
pub(crate) struct Mount {
    /// The filesystem's device, `major:minor`.
    pub device: (u32, u32),
    /// The directory of the filesystem this mount shows (not `/` for bind mounts).
    pub root: PathBuf,
    pub point: PathBuf,
    pub fstype: String,
    /// Super options (for cgroup v1: the controllers of the hierarchy, e.g. `rw,cpu,cpuacct`).
    pub options: Vec<String>,
}

/// Every mount in a `mountinfo` file (`/proc/<pid>/mountinfo`: that process's namespace).
pub(crate) fn mounts(path: &Path) -> Result<Vec<Mount>, TargetError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

pub(crate) fn cgroup_mounts() -> Result<Vec<Mount>, TargetError> {
    Ok(mounts(Path::new("/proc/self/mountinfo"))?
        .into_iter()
        .filter(|m| m.fstype.starts_with("cgroup"))
        .collect())
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw` (proc(5)); octal escapes
/// (`\040`) in the mount point are decoded.
fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let (pre, post) = line.split_once(" - ")?;
    let mut pre = pre.split(' ').skip(2);
    let (major, minor) = pre.next()?.split_once(':')?;
    let root = pre.next()?;
    let point = pre.next()?;
    let mut post = post.split(' ');
    let fstype = post.next()?;
    let options = post
        .nth(1)
        .map(|o| o.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    Some(Mount {
        device: (major.parse().ok()?, minor.parse().ok()?),
        root: PathBuf::from(unescape_octal(root)),
        point: PathBuf::from(unescape_octal(point)),
        fstype: fstype.to_owned(),
        options,
    })
}

fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let digits = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let (b'\\', Some(d)) = (b[i], digits) {
            out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The container id in a cgroup directory name, for the layouts runtimes use:
/// `libpod-<id>` (podman), `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`,
/// and a bare `<id>` (cgroupfs drivers).
fn container_id_of(dir_name: &str) -> &str {
    let name = dir_name.strip_suffix(".scope").unwrap_or(dir_name);
    ["libpod-", "cri-containerd-", "crio-", "docker-"]
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name)
}

/// Finds the cgroup of container `id` in the v2 hierarchy.
pub fn resolve_container(given: &str) -> Result<ResolvedTarget, TargetError> {
    let id = given.split_once("://").map_or(given, |(_, id)| id);
    let err = |why: String| TargetError::Container(given.to_owned(), why);
    if id.len() < 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(err(
            "expected a container id of at least 12 hex digits".into()
        ));
    }
    let root = cgroup2_root().ok_or(TargetError::NoCgroup2)?;
    match container_dirs(&root, id).as_slice() {
        [] => Err(err(
            "no cgroup of such a container (is it running on this machine?)".into(),
        )),
        [one] => {
            let mut t = resolve_cgroup(one)?;
            t.description = format!("container {} ({})", &id[..12], one.display());
            Ok(t)
        }
        many => Err(err(format!(
            "the prefix matches {} containers; give more digits",
            many.len()
        ))),
    }
}

/// The cgroup directories below `root` of the container whose id starts with `id`: what each
/// runtime names them (containerd, CRI-O, Docker, podman; systemd or cgroupfs driver). A runtime
/// may nest a cgroup inside the container's own (podman's `container`): the outermost match.
fn container_dirs(root: &Path, id: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = cgroup_dirs(root)
        .into_iter()
        .map(|(d, _)| d)
        .filter(|d| {
            d.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| container_id_of(n).starts_with(id))
        })
        .collect();
    found.sort();
    found.dedup_by(|b, a| b.starts_with(a));
    found
}

/// A cgroup directory and every cgroup below it (parents before children), with their depth
/// below `root` (0 for `root` itself).
#[must_use]
pub fn cgroup_dirs(root: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_owned(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        if let Ok(rd) = fs::read_dir(&dir) {
            stack.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| (e.path(), depth + 1)),
            );
        }
        out.push((dir, depth));
    }
    out
}

/// Adds the processes of the cgroup `root` and of every cgroup below it (any cgroup version).
pub fn cgroup_pids(root: &Path, out: &mut Vec<u32>) {
    for (dir, _) in cgroup_dirs(root) {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
    }
}

/// Whether process `pid` exists and has not exited (a zombie has: only its parent's wait is
/// left).
#[must_use]
pub fn running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the parenthesised name, which may itself hold ") ".
        stat.rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| !matches!(state, 'Z' | 'X'))
    })
}

/// Where the cgroup v2 hierarchy is mounted, if it is.
#[must_use]
pub fn cgroup2_root() -> Option<PathBuf> {
    cgroup_mounts()
        .ok()?
        .into_iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.point)
}

pub fn resolve_cgroup(path: &Path) -> Result<ResolvedTarget, TargetError> {
    if !path.is_dir() {
        return Err(TargetError::NoSuchCgroup(path.to_owned()));
    }
    let path = path.canonicalize().map_err(io_err(path))?;
    if !path.join("cgroup.procs").is_file() {
        return Err(TargetError::NotACgroup(path));
    }
    let mounts = cgroup_mounts()?;
    let v2 = mounts
        .iter()
        .find(|m| m.fstype == "cgroup2")
        .ok_or(TargetError::NoCgroup2)?;
    // The most specific mount containing the path decides which hierarchy it belongs to.
    let owner = mounts
        .iter()
        .filter(|m| path.starts_with(&m.point))
        .max_by_key(|m| m.point.as_os_str().len())
        .ok_or_else(|| TargetError::NotUnderCgroupfs {
            path: path.clone(),
            mounts: mounts
                .iter()
                .map(|m| m.point.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let rel = path
        .strip_prefix(&owner.point)
        .expect("filtered by starts_with")
        .to_owned();
    let v2_path = v2.point.join(&rel);
    if owner.fstype != "cgroup2" && !v2_path.join("cgroup.procs").is_file() {
        return Err(TargetError::NoV2Counterpart { path, v2: v2_path });
    }
    let meta = fs::metadata(&v2_path).map_err(io_err(&v2_path))?;
    let level = u32::try_from(rel.components().count()).unwrap_or(u32::MAX);
    Ok(ResolvedTarget {
        description: format!("cgroup {}", path.display()),
        cgroups: vec![CgroupTarget {
            path: v2_path,
            id: meta.ino(),
            level,
        }],
        tgids: Vec::new(),
    })
}

/// Opens `path` as process `pid` sees it, with `flags`: resolved inside the process's root
/// (`openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`), so neither `..` nor a symlink the
/// process planted, absolute or relative, reaches a file of the node.
pub fn open_in_root(
    pid: u32,
    path: &str,
    flags: nix::fcntl::OFlag,
    mode: nix::sys::stat::Mode,
) -> io::Result<OwnedFd> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
    let root = open(
        format!("/proc/{pid}/root").as_str(),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let rel = match path.trim_start_matches('/') {
        "" => ".",
        rel => rel,
    };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(mode)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    Ok(openat2(&root, rel, how)?)
}

/// `/proc/<pid>/comm`, if the process still exists.
#[must_use]
pub fn process_name(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}

/// The fields of `/proc/<pid>/stat` after `comm`, so index 0 is field 3 (state), 1 the ppid,
/// 6 the flags, 19 the start time. `comm` may hold spaces and parentheses: the split is after
/// its last closing parenthesis.
#[must_use]
pub fn proc_stat(pid: u32) -> Option<Vec<String>> {
    stat_fields_of(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks since boot.
#[must_use]
pub fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid)?.get(19)?.parse().ok()
}

/// How long ago `pid` started, in milliseconds ([`start_time`] against the uptime).
#[must_use]
pub fn process_age_ms(pid: u32) -> Option<u64> {
    let start_ticks = start_time(pid)?;
    let uptime: f64 = fs::read_to_string("/proc/uptime")
        .ok()?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|&h| h > 0)?;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "uptime in ms fits u64"
    )]
    let now_ms = (uptime * 1000.0) as u64;
    Some(now_ms.saturating_sub(start_ticks * 1000 / hz))
}

fn stat_fields_of(stat: &str) -> Option<Vec<String>> {
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// Every live descendant of `roots` (not including the roots), from `/proc/*/stat`.
#[must_use]
pub fn descendants(roots: &[u32]) -> BTreeSet<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(fields) = fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| stat_fields_of(&s))
        else {
            continue;
        };
        if let Some(ppid) = fields.get(1).and_then(|s| s.parse().ok()) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = BTreeSet::new();
    let mut stack: Vec<u32> = roots.to_vec();
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            if out.insert(c) {
                stack.push(c);
            }
        }
    }
    out
}

/// Finds `cmd` the way a shell would (a path with `/` is used as is).
fn find_program(cmd: &OsString) -> Option<PathBuf> {
    let p = Path::new(cmd);
    if cmd.as_bytes().contains(&b'/') {
        return p.is_file().then(|| p.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(p))
        .find(|c| fs::metadata(c).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
}

/// A command forked and held just before `execv`, so it can be made a target before its first
/// instruction runs. Dropping it unreleased makes the child exit without running the command.
pub struct HeldChild {
    pub pid: u32,
    go: Option<OwnedFd>,
    exec_status: OwnedFd,
    display: String,
}

impl HeldChild {
    pub fn spawn(argv: &[OsString]) -> Result<Self, TargetError> {
        let first = argv.first().ok_or(TargetError::EmptyCommand)?;
        let display = first.to_string_lossy().into_owned();
        let program =
            find_program(first).ok_or_else(|| TargetError::CommandNotFound(display.clone()))?;
        let to_c = |s: &[u8]| {
            CString::new(s).map_err(|e| TargetError::Spawn {
                cmd: display.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, e),
            })
        };
        let c_program = to_c(program.as_os_str().as_bytes())?;
        let c_args = argv
            .iter()
            .map(|a| to_c(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut c_argv: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
        c_argv.push(std::ptr::null());
        let spawn_err = |e: nix::Error| TargetError::Spawn {
            cmd: display.clone(),
            source: e.into(),
        };
        let (go_rx, go_tx) = pipe().map_err(spawn_err)?;
        let (st_rx, st_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(spawn_err)?;
        // SAFETY: the child only calls async-signal-safe functions (close, read, write, execv,
        // _exit) on data prepared before the fork.
        match unsafe { fork() }.map_err(spawn_err)? {
            ForkResult::Child => unsafe {
                libc::close(go_tx.as_raw_fd());
                libc::close(st_rx.as_raw_fd());
                let mut byte = 0u8;
                if libc::read(go_rx.as_raw_fd(), (&raw mut byte).cast(), 1) != 1 {
                    libc::_exit(127);
                }
                libc::close(go_rx.as_raw_fd());
                libc::execv(c_program.as_ptr(), c_argv.as_ptr());
                let errno = *libc::__errno_location();
                libc::write(
                    st_tx.as_raw_fd(),
                    (&raw const errno).cast(),
                    size_of::<i32>(),
                );
                libc::_exit(127);
            },
            ForkResult::Parent { child } => {
                drop(go_rx);
                drop(st_tx);
                Ok(Self {
                    pid: child.as_raw().unsigned_abs(),
                    go: Some(go_tx),
                    exec_status: st_rx,
                    display,
                })
            }
        }
    }

    /// Lets the child exec; returns once the exec has happened (or failed).
    pub fn release(&mut self) -> Result<(), TargetError> {
        let go = self.go.take().expect("released once");
        nix::unistd::write(&go, &[1]).map_err(|e| TargetError::Spawn {
            cmd: self.display.clone(),
            source: e.into(),
        })?;
        drop(go);
        let mut buf = [0u8; 4];
        let mut file =
            fs::File::from(
                self.exec_status
                    .try_clone()
                    .map_err(|source| TargetError::Spawn {
                        cmd: self.display.clone(),
                        source,
                    })?,
            );
        match file.read(&mut buf) {
            Ok(4) => {
                let _ = waitpid(Pid::from_raw(self.pid.cast_signed()), None);
                Err(TargetError::Spawn {
                    cmd: self.display.clone(),
                    source: io::Error::from_raw_os_error(i32::from_ne_bytes(buf)),
                })
            }
            _ => Ok(()),
        }
    }

    /// Blocks until the command exits; returns its exit code (128 + signal if killed).
    #[must_use]
    pub fn wait(&self) -> i32 {
        loop {
            match waitpid(Pid::from_raw(self.pid.cast_signed()), None) {
                Ok(WaitStatus::Exited(_, code)) => return code,
                Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(_) => return 127,
            }
        }
    }
}

impl Drop for HeldChild {
    fn drop(&mut self) {
        if self.go.take().is_some() {
            // Never released: closing the pipe makes the child _exit(127); reap it.
            let _ = waitpid(Pid::from_raw(self.pid.cast_signed()), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parsing() {
        let m = parse_mountinfo_line(
            "35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw",
        )
        .unwrap();
        assert_eq!(m.point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(m.fstype, "cgroup2");
        let m = parse_mountinfo_line("1 2 0:1 / /a\\040b rw - cgroup cgroup rw,cpu").unwrap();
        assert_eq!(m.point, PathBuf::from("/a b"));
        // A bind mount of a directory of /dev/sda1 into a container.
        let m = parse_mountinfo_line(
            "812 790 8:1 /var/lib/kubelet/pods/x/volumes/data /data rw,relatime - ext4 /dev/sda1 rw",
        )
        .unwrap();
        assert_eq!(m.device, (8, 1));
        assert_eq!(
            m.root,
            PathBuf::from("/var/lib/kubelet/pods/x/volumes/data")
        );
        assert_eq!(m.point, PathBuf::from("/data"));
    }

    /// The cgroup trees each runtime and driver makes (as recorded from their nodes): the
    /// container's own cgroup is found by its id, never its runtime's monitor (CRI-O's conmon)
    /// or a sibling, and a nested cgroup (podman's) resolves to the container's.
    #[test]
    fn every_runtime_layout_resolves_to_the_container_cgroup() {
        let id = "4f1e0a7c2b9d8e3f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f";
        let other = "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b";
        let pod = "kubepods-burstable-pod1b2c3d4e_5f60_7182_93a4_b5c6d7e8f901.slice";
        let layouts: [(&str, Vec<String>); 6] = [
            (
                "containerd, systemd driver",
                vec![
                    format!(
                        "kubepods.slice/kubepods-burstable.slice/{pod}/cri-containerd-{id}.scope"
                    ),
                    format!(
                        "kubepods.slice/kubepods-burstable.slice/{pod}/cri-containerd-{other}.scope"
                    ),
                ],
            ),
            (
                "containerd, cgroupfs driver",
                vec![
                    format!("kubepods/burstable/pod1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901/{id}"),
                    format!("kubepods/burstable/pod1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901/{other}"),
                ],
            ),
            (
                "CRI-O, systemd driver",
                vec![
                    format!("kubepods.slice/kubepods-burstable.slice/{pod}/crio-{id}.scope"),
                    format!("kubepods.slice/kubepods-burstable.slice/{pod}/crio-conmon-{id}.scope"),
                ],
            ),
            (
                "Docker, systemd driver",
                vec![format!("system.slice/docker-{id}.scope")],
            ),
            ("Docker, cgroupfs driver", vec![format!("docker/{id}")]),
            (
                "podman",
                vec![format!("machine.slice/libpod-{id}.scope/container")],
            ),
        ];
        for (runtime, dirs) in layouts {
            let root = tempfile::tempdir().unwrap();
            for d in &dirs {
                fs::create_dir_all(root.path().join(d)).unwrap();
            }
            let want = root
                .path()
                .join(dirs[0].strip_suffix("/container").unwrap_or(&dirs[0]));
            assert_eq!(container_dirs(root.path(), &id[..12]), [want], "{runtime}");
            assert_eq!(
                container_dirs(root.path(), "0123456789ab"),
                Vec::<PathBuf>::new(),
                "{runtime}"
            );
        }
    }

    #[test]
    fn bad_pids_are_named() {
        assert!(matches!(resolve_pid(0), Err(TargetError::PidZero)));
        // pid_max is at most 2^22, so this can never exist.
        assert!(matches!(
            resolve_pid(4_194_305),
            Err(TargetError::NoSuchPid(4_194_305))
        ));
        let me = std::process::id();
        assert_eq!(resolve_pid(me).unwrap().tgids, vec![me]);
    }

    #[test]
    fn thread_ids_are_redirected_to_their_process() {
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            tx.send(nix::unistd::gettid().as_raw().unsigned_abs())
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
        });
        let tid = rx.recv().unwrap();
        let err = resolve_pid(tid).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pass --pid {}", std::process::id())),
            "{err}"
        );
        h.join().unwrap();
    }

    #[test]
    fn bad_cgroups_are_named() {
        let err = resolve_cgroup(Path::new("/sys/fs/cgroup/does-not-exist")).unwrap_err();
        assert!(err.to_string().contains("no such directory"), "{err}");
        let err = resolve_cgroup(Path::new("/tmp")).unwrap_err();
        assert!(err.to_string().contains("not a cgroup directory"), "{err}");
    }

    #[test]
    fn held_child_runs_only_when_released() {
        let mut child = HeldChild::spawn(&["sh".into(), "-c".into(), "exit 7".into()]).unwrap();
        child.release().unwrap();
        assert_eq!(child.wait(), 7);
        let err = HeldChild::spawn(&["definitely-not-a-command-xyz".into()])
            .err()
            .unwrap();
        assert!(err.to_string().contains("command not found"));
        // Dropped unreleased: the child must not run the command (it would create the file).
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let cmd = format!("touch {}", marker.display());
        drop(HeldChild::spawn(&["sh".into(), "-c".into(), cmd.into()]).unwrap());
        assert!(!marker.exists());
    }
}
