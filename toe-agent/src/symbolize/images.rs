//! What each target process has mapped, kept after it exits.
//!
//! blazesym reads a process's mappings and files from procfs, which is gone once the process
//! exits: a short-lived process (a shell's child, a job that runs a second) whose stacks reach
//! the symbolizer after its exit would have only `[unknown]` frames. perf avoids this by
//! recording every `mmap` in its event stream; TOE keeps the part it needs instead. A watcher
//! thread looks at a target process as soon as the kernel tells it forked or exec'd (and at
//! all of them now and then, see [`Watcher`]) and, for one it has not seen (or one that has
//! exec'd since), reads `/proc/<pid>/maps` and keeps each executable file mapping
//! with the file itself held open (through `/proc/<pid>/map_files`, so a container's files are
//! reached without entering its mount namespace, and a file deleted or replaced since stays
//! the one that ran). Addresses of an exited process are then symbolized from its file and file
//! offset.

use std::{
    collections::HashMap,
    fmt::Write as _,
    fs::File,
    os::{
        fd::{AsFd, AsRawFd as _},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};

use super::{
    debuginfo::{self, DebugFile, ElfFacts, Matched, OwnNames, Supplementary},
    go::GoTable,
    unwind::{
        self, FileTables, MappingTables, Miss, Outcome, ProcessUnwinder, StackCopy, UnwindCache,
    },
};

/// How often the watcher looks for new processes and execs.
pub const WATCH_EVERY: Duration = Duration::from_millis(20);

/// A process whose mappings changed less than this ago has them read again at every look (a
/// shell's child execs right after its fork, and the dynamic loader then maps its libraries);
/// one settled longer is checked for an exec every [`RECHECK_EVERY`], which bounds the cost
/// per process on a node with many.
const YOUNG: Duration = Duration::from_secs(2);
const RECHECK_EVERY: Duration = Duration::from_millis(500);

/// Bounds on what one run keeps: distinct files held open, and processes remembered. A
/// process over the bound is symbolized while it lives, as without this cache.
const MAX_FILES: usize = 4096;
const MAX_PROCESSES: usize = 16_384;
/// Distinct mapping sets shared between processes, and snapshots kept per process.
const MAX_SNAPSHOTS: usize = 65_536;
const HISTORY: usize = 32;

/// A file some target mapped executable, held open for as long as the run's symbolizer lives.
#[derive(Debug)]
pub struct MappedFile {
    /// The path the process saw (inside its mount namespace): what the profile names.
    pub path: String,
    file: File,
    /// Its unwind tables, read the first time a sample needs them.
    tables: OnceLock<Result<Arc<FileTables>, Miss>>,
    /// Its Go function table, read the first time an address in it has no ELF symbol.
    go: OnceLock<Option<GoTable>>,
    /// Its build-id and segments, read when it was first kept.
    pub elf: ElfFacts,
    /// Its separate debug file, found inside the root of the process that mapped it.
    pub debug: Option<DebugFile>,
}

impl MappedFile {
    fn tables(&self) -> Result<&FileTables, Miss> {
        self.tables
            .get_or_init(|| unwind::tables_of(&self.open_path()))
            .as_deref()
            .map_err(|m| *m)
    }

    /// The Go function table of a Go binary (see [`super::go`]).
    pub fn go_table(&self) -> Option<&GoTable> {
        self.go
            .get_or_init(|| GoTable::read(&self.open_path()))
            .as_ref()
    }

    /// Where the names of this file's frames come from, or why it has none, for the summary.
    #[must_use]
    pub fn symbol_source(&self) -> String {
        const NO_DEBUG_FILE: &str = "and no debug file in the target's root (by build-id or \
                                     debug link; install the -dbgsym package in the image)";
        if let Some(d) = &self.debug {
            let how = match d.matched {
                Matched::BuildId => "build-id",
                Matched::DebugLink => "debug link",
            };
            let mut source = format!("debug file {} (matched by {how})", d.path);
            match &d.supplementary {
                Some(Supplementary::Found { path, .. }) => {
                    let _ = write!(source, ", with its dwz supplementary file {path}");
                }
                Some(Supplementary::Missing(path)) => {
                    let _ = write!(
                        source,
                        "; its dwz supplementary file {path} is not in the target's root: names \
                         from its symbol table, without lines or inlined frames"
                    );
                }
                None => {}
            }
            return source;
        }
        match self.elf.names {
            OwnNames::NotElf => "not an ELF file this reader knows".to_owned(),
            OwnNames::Dwarf => "its own symbols and DWARF".to_owned(),
            OwnNames::Symbols => "its own symbol table (no DWARF: no lines)".to_owned(),
            _ if self.go_table().is_some() => "the Go function table (.gopclntab)".to_owned(),
            OwnNames::Exported => {
                format!("exported symbols only (.dynsym): stripped, {NO_DEBUG_FILE}")
            }
            OwnNames::Nothing => format!("none: stripped, {NO_DEBUG_FILE}"),
        }
    }

    /// A path that opens the very file that was mapped, while this is held.
    #[must_use]
    pub fn open_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// One executable mapping: `[start, end)` maps the file from `offset` on.
#[derive(Debug)]
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    file: Arc<MappedFile>,
}

/// A process's executable mappings at one moment, sorted by address.
#[derive(Debug, Default)]
struct Snapshot {
    mappings: Vec<Mapping>,
    /// Built the first time a sample of a process with these mappings is unwound.
    unwinder: OnceLock<ProcessUnwinder>,
}

impl Snapshot {
    fn unwinder(&self) -> &ProcessUnwinder {
        self.unwinder.get_or_init(|| {
            ProcessUnwinder::new(self.mappings.iter().filter_map(|m| {
                Some(MappingTables {
                    name: &m.file.path,
                    start: m.start,
                    end: m.end,
                    offset: m.offset,
                    tables: m.file.tables().ok()?,
                })
            }))
        })
    }

    fn find(&self, addr: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.start <= addr);
        let m = self.mappings.get(i.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }
}

/// One line of `/proc/<pid>/maps` that maps a file executable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct MapsLine {
    start: u64,
    end: u64,
    offset: u64,
    /// (device, inode) of the file, as the kernel prints them.
    file: (u64, u64),
    path: String,
}

/// Parses the executable file mappings of a `maps` text. Anonymous, special (`[vdso]`) and
/// non-executable mappings are left out: code addresses never fall in them, or blazesym has no
/// file to read for them.
fn parse_maps(text: &str) -> Vec<MapsLine> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(6, ' ');
            let (range, perms, offset, dev, inode) = (
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
                fields.next()?,
            );
            let path = fields.next()?.trim_start();
            if perms.as_bytes().get(2) != Some(&b'x') || !path.starts_with('/') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let (major, minor) = dev.split_once(':')?;
            let hex = |s: &str| u64::from_str_radix(s, 16).ok();
            let dev = (hex(major)? << 20) | hex(minor)?;
            let inode: u64 = inode.parse().ok()?;
            (inode != 0).then_some(())?;
            Some(MapsLine {
                start: hex(start)?,
                end: hex(end)?,
                offset: hex(offset)?,
                file: (dev, inode),
                path: path.strip_suffix(" (deleted)").unwrap_or(path).to_owned(),
            })
        })
        .collect()
}

/// Device and inode of the file `/proc/<pid>/exe` points at.
#[must_use]
pub fn image_of(pid: u32) -> Option<(u64, u64)> {
    std::fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

#[derive(Debug)]
struct Process {
    /// Oldest first; an exec adds one, and stacks sampled before it still find theirs.
    snapshots: Vec<Arc<Snapshot>>,
    image: Option<(u64, u64)>,
    /// When its mappings were last found changed (or first read).
    changed: Instant,
    checked: Instant,
}

#[derive(Debug, Default)]
struct State {
    processes: HashMap<u32, Process>,
    files: HashMap<(u64, u64), Arc<MappedFile>>,
    /// Identical mappings (a forked child that has not exec'd) share one snapshot.
    snapshots: HashMap<Vec<MapsLine>, Arc<Snapshot>>,
    /// When some process's mappings were last found changed: while that is less than
    /// [`YOUNG`] ago, the watcher looks every [`WATCH_EVERY`].
    last_change: Option<Instant>,
}

/// The mappings of every target process seen during one run. Shared between the watcher thread
/// and the symbolizer.
#[derive(Debug, Default)]
pub struct Images {
    state: Mutex<State>,
}

impl Images {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads `pid`'s mappings if it is new, if they changed lately (a process that has just
    /// exec'd is still mapping its libraries), or if it may have exec'd since they were read.
    pub fn observe(&self, pid: u32) {
        self.look(pid, false, false);
    }

    /// Reads the mappings of a process the kernel just saw fork or exec, now: however long ago
    /// it started, they have changed or are about to (the loader maps an exec'd program's
    /// libraries after the exec, and a program that exec'd itself has the same image).
    fn told(&self, pid: u32) {
        self.look(pid, true, true);
    }

    /// Reads `pid`'s mappings now: an address of it fell outside every mapping kept (a
    /// library loaded since, or mappings read mid-exec).
    pub fn refresh(&self, pid: u32) {
        self.look(pid, true, false);
    }

    fn look(&self, pid: u32, now_please: bool, told: bool) {
        let now = Instant::now();
        // A process first seen when it has run for longer than YOUNG (one that was there when
        // the run started) has mapped what it maps at start: it does not make the watcher look
        // at the fast pace.
        let (image, settled) = {
            let mut state = self.state();
            let known = state.processes.len();
            match state.processes.get_mut(&pid) {
                Some(p) => {
                    // Young: its mappings changed less than YOUNG ago, so they may still.
                    let young = now.duration_since(p.changed) < YOUNG;
                    if !now_please && !young && now.duration_since(p.checked) < RECHECK_EVERY {
                        return;
                    }
                    p.checked = now;
                    let image = image_of(pid);
                    if image.is_none() || (!now_please && !young && image == p.image) {
                        return;
                    }
                    (image, false)
                }
                None if known >= MAX_PROCESSES => return,
                None => {
                    drop(state);
                    let old = !told
                        && crate::targets::process_age_ms(pid)
                            .is_some_and(|ms| u128::from(ms) >= YOUNG.as_millis());
                    (image_of(pid), old)
                }
            }
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            return;
        };
        let lines = parse_maps(&text);
        if lines.is_empty() {
            // A zombie, or a kernel thread: nothing to keep.
            return;
        }
        let mut state = self.state();
        let snapshot = if let Some(s) = state.snapshots.get(&lines) {
            Arc::clone(s)
        } else {
            let mut mappings = Vec::with_capacity(lines.len());
            for l in &lines {
                if let Some(file) = state.file(pid, l) {
                    mappings.push(Mapping {
                        start: l.start,
                        end: l.end,
                        offset: l.offset,
                        file,
                    });
                }
            }
            mappings.sort_by_key(|m| m.start);
            let s = Arc::new(Snapshot {
                mappings,
                unwinder: OnceLock::new(),
            });
            if state.snapshots.len() < MAX_SNAPSHOTS {
                state.snapshots.insert(lines, Arc::clone(&s));
            }
            s
        };
        let settled_since = now.checked_sub(YOUNG).unwrap_or(now);
        let p = state.processes.entry(pid).or_insert_with(|| Process {
            snapshots: Vec::new(),
            image: None,
            changed: if settled { settled_since } else { now },
            checked: now,
        });
        p.image = image;
        p.checked = now;
        if !p
            .snapshots
            .last()
            .is_some_and(|s| Arc::ptr_eq(s, &snapshot))
        {
            let first_of_settled = settled && p.snapshots.is_empty();
            if p.snapshots.len() >= HISTORY {
                // The first (what it started as) and the newest stay.
                p.snapshots.remove(1);
            }
            p.snapshots.push(snapshot);
            if !first_of_settled {
                p.changed = now;
                state.last_change = Some(now);
            }
        }
    }

    /// Whether some process's mappings changed less than [`YOUNG`] ago, and so may still.
    fn settling(&self) -> bool {
        self.state()
            .last_change
            .is_some_and(|t| t.elapsed() < YOUNG)
    }

    /// A file some target mapped at `path` (the first found when several files had that path).
    #[must_use]
    pub fn file_at(&self, path: &str) -> Option<Arc<MappedFile>> {
        self.state()
            .files
            .values()
            .find(|f| f.path == path)
            .map(Arc::clone)
    }

    /// The file and file offset `addr` had in `pid`, from the newest mappings that hold it.
    #[must_use]
    pub fn locate(&self, pid: u32, addr: u64) -> Option<(Arc<MappedFile>, u64)> {
        let state = self.state();
        let p = state.processes.get(&pid)?;
        p.snapshots.iter().rev().find_map(|s| {
            let m = s.find(addr)?;
            Some((Arc::clone(&m.file), addr - m.start + m.offset))
        })
    }
}

/// How one sample's user stack was unwound, and why its leaf had no tables if it had none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unwound {
    pub outcome: Outcome,
    pub leaf_miss: Option<Miss>,
}

impl Images {
    /// The newest mappings of `pid` that hold `addr`, or its newest mappings if none does.
    fn snapshot_for(&self, pid: u32, addr: u64) -> Option<(Arc<Snapshot>, bool)> {
        let state = self.state();
        let p = state.processes.get(&pid)?;
        p.snapshots
            .iter()
            .rev()
            .find(|s| s.find(addr).is_some())
            .map(|s| (Arc::clone(s), true))
            .or_else(|| p.snapshots.last().map(|s| (Arc::clone(s), false)))
    }

    /// Unwinds one sample of `pid` from its stack copy into `out` (leaf first, at most `max`
    /// frames), with the kernel's frame-pointer walk `fp` as the fallback. `may_look`: the
    /// process's mappings may be read again when no kept mapping holds the leaf (a library
    /// mapped since); the caller rate-limits it, as leaves in the vDSO or JIT code are never in
    /// a file and would have the mappings read for every sample.
    #[expect(
        clippy::too_many_arguments,
        reason = "one sample's inputs and the unwinder's state"
    )]
    pub fn unwind(
        &self,
        pid: u32,
        copy: &StackCopy<'_>,
        fp: &[u64],
        max: usize,
        cache: &mut UnwindCache,
        out: &mut Vec<u64>,
        may_look: bool,
    ) -> Unwound {
        let mut found = self.snapshot_for(pid, copy.ip);
        let holds = found.as_ref().is_some_and(|(_, holds)| *holds);
        if found.is_none() || (!holds && may_look) {
            self.observe(pid);
            found = self.snapshot_for(pid, copy.ip);
        }
        let Some((snapshot, holds)) = found else {
            out.clear();
            out.extend_from_slice(fp);
            return Unwound {
                outcome: Outcome::FramePointers,
                leaf_miss: Some(Miss::NotMapped),
            };
        };
        let leaf_miss = if holds {
            snapshot.find(copy.ip).and_then(|m| m.file.tables().err())
        } else {
            Some(Miss::NotMapped)
        };
        let outcome = unwind::unwind(snapshot.unwinder(), cache, copy, fp, max, out);
        // Go binaries with DWARF carry it compressed, which the tables do not read.
        if holds && let Some(m) = snapshot.find(copy.ip) {
            go_leaf_caller(m, copy, out, max);
        }
        Unwound { outcome, leaf_miss }
    }
}

/// A Go leaf function without a frame of its own leaves the frame pointer to its caller's
/// frame, so the walk goes from the leaf straight to the caller's caller. The function table
/// says where the return address lies (`sp` plus the function's stack delta at the leaf's
/// pc); when the walk's next frame is not it, it is put in.
fn go_leaf_caller(m: &Mapping, copy: &StackCopy<'_>, out: &mut Vec<u64>, max: usize) {
    let Some(go) = m.file.go_table() else {
        return;
    };
    let Some(delta) = go.sp_delta(copy.ip - m.start + m.offset) else {
        return;
    };
    let Some(at) = usize::try_from(delta)
        .ok()
        .filter(|d| d + 8 <= copy.bytes.len())
    else {
        return;
    };
    let ra = u64::from_le_bytes(copy.bytes[at..at + 8].try_into().expect("8 bytes"));
    if out.first() == Some(&copy.ip) && out.get(1) != Some(&ra) && ra != 0 {
        out.insert(1, ra);
        out.truncate(max);
    }
}

impl State {
    /// The open file behind one mapping, opened once per (device, inode) for the whole run.
    fn file(&mut self, pid: u32, l: &MapsLine) -> Option<Arc<MappedFile>> {
        if let Some(f) = self.files.get(&l.file) {
            return Some(Arc::clone(f));
        }
        if self.files.len() >= MAX_FILES {
            return None;
        }
        raise_open_files_limit();
        // map_files needs CAP_SYS_ADMIN (the agent has it); the root path is a fallback that
        // reaches the same file unless it was replaced since.
        let file = File::open(format!("/proc/{pid}/map_files/{:x}-{:x}", l.start, l.end))
            .or_else(|_| {
                File::open(
                    Path::new(&format!("/proc/{pid}/root")).join(l.path.trim_start_matches('/')),
                )
            })
            .ok()?;
        // Looked for now, while the process (and so its root) exists.
        let elf = ElfFacts::read(&file);
        let debug = debuginfo::find(pid, &l.path, &elf);
        let f = Arc::new(MappedFile {
            path: l.path.clone(),
            file,
            tables: OnceLock::new(),
            go: OnceLock::new(),
            elf,
            debug,
        });
        self.files.insert(l.file, Arc::clone(&f));
        Some(f)
    }
}

/// Every kept file holds a descriptor, and so does its debug file: up to twice [`MAX_FILES`],
/// more than the soft limit most services start with (1024); the off-CPU collector holds one
/// per target thread too. The soft limit is raised to the
/// hard one, once per process, which needs no privilege. Where the hard limit is lower, a file
/// that cannot be opened is not kept and its addresses resolve while the process lives, as
/// without the cache.
pub(crate) fn raise_open_files_limit() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
            && soft < hard
            && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        {
            tracing::debug!("raising the open files limit from {soft} to {hard}: {e}");
        }
    });
}

/// Looks at a run's target processes until dropped: at once for a process the kernel tells of
/// (a target's fork or exec), every [`WATCH_EVERY`] while some process's mappings are settling,
/// and every [`IDLE_LOOK`] otherwise. An idle run so wakes its node about once a second, not
/// fifty times.
pub struct Watcher {
    stop: Arc<crate::wake::Stop>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where the watcher finds the target processes: the kernel's own set of target process ids
/// (given ones and the children it followed), the processes of the target cgroups, and the
/// kernel's news of target processes that forked or exec'd.
pub struct Targets {
    pub tgids: Option<BpfHashMap<MapData, u32, u32>>,
    /// The kernel's target counters: the set is read again when its count of children followed
    /// moves, or [`REREAD_AFTER`] after it was last read (for the processes that left it).
    /// Reading a hash map walks every bucket of it, 65536 for the process set, which at every
    /// look was most of the agent's CPU while nothing changed.
    pub counters: Option<PerCpuArray<MapData, u64>>,
    pub cgroups: Vec<PathBuf>,
    /// Process ids of new and exec'd target processes, as the kernel saw them. Without it
    /// (never in practice: it is part of the object) every look is [`WATCH_EVERY`] apart.
    pub news: Option<RingBuf<MapData>>,
}

/// The longest a look waits while nothing settles: a process that joined a target cgroup
/// without forking or exec'ing there, and a missed notice, are found by then.
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// Time between two full reads of an unchanged process set.
const REREAD_AFTER: Duration = Duration::from_secs(1);

/// What a watcher last read of its [`Targets`].
#[derive(Default)]
struct Known {
    tgids: Vec<u32>,
    followed: Option<u64>,
    read_at: Option<Instant>,
}

impl Targets {
    fn followed(&self) -> Option<u64> {
        let c = self.counters.as_ref()?;
        c.get(&(toe_common::targets::Counter::ChildrenFollowed as u32), 0)
            .ok()
            .map(|v| v.iter().sum())
    }

    fn pids(&self, known: &mut Known) -> Vec<u32> {
        let followed = self.followed();
        if followed.is_none()
            || followed != known.followed
            || known.read_at.is_none_or(|t| t.elapsed() >= REREAD_AFTER)
        {
            known.tgids = self
                .tgids
                .as_ref()
                .map(|m| m.keys().flatten().collect())
                .unwrap_or_default();
            known.followed = followed;
            known.read_at = Some(Instant::now());
        }
        let mut pids = known.tgids.clone();
        for root in &self.cgroups {
            crate::targets::cgroup_pids(root, &mut pids);
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// The process ids the kernel told of since the last call, without repeats.
    fn told(&mut self) -> Vec<u32> {
        let mut told = Vec::new();
        if let Some(ring) = &mut self.news {
            while let Some(item) = ring.next() {
                if let Some(b) = item.first_chunk::<4>() {
                    told.push(u32::from_ne_bytes(*b));
                }
            }
        }
        told.sort_unstable();
        told.dedup();
        told
    }
}

impl Watcher {
    /// Starts watching `targets`; fails only when the thread or its stop signal cannot be made.
    pub fn spawn(images: Arc<Images>, mut targets: Targets) -> std::io::Result<Self> {
        let stop = Arc::new(crate::wake::Stop::new()?);
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("toe-images".into())
                .spawn(move || {
                    let mut known = Known::default();
                    let mut next_look = Instant::now();
                    while !stop.asked() {
                        if Instant::now() >= next_look {
                            for pid in targets.pids(&mut known) {
                                images.observe(pid);
                            }
                            let pause = if images.settling() || targets.news.is_none() {
                                WATCH_EVERY
                            } else {
                                IDLE_LOOK
                            };
                            next_look = Instant::now() + pause;
                        }
                        let fd = targets.news.as_ref().map(AsFd::as_fd);
                        if stop.wait(fd, next_look.saturating_duration_since(Instant::now())) {
                            for pid in targets.told() {
                                images.told(pid);
                            }
                            // What it told of is settling now: look again soon.
                            next_look = next_look.min(Instant::now() + WATCH_EVERY);
                        }
                    }
                })?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.ask();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_keep_executable_files_only() {
        let text = "\
55d5c6a00000-55d5c6a2a000 r--p 00000000 fd:01 1311 /usr/bin/demo
55d5c6a2a000-55d5c6b00000 r-xp 0002a000 fd:01 1311 /usr/bin/demo
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 
7f1000000000-7f1000200000 r-xp 00028000 103:02 77 /lib/x86_64-linux-gnu/libc.so.6 (deleted)
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
7f2000000000-7f2000001000 r-xp 00000000 00:05 12 /memfd:jit (deleted)
";
        let lines = parse_maps(text);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0].start, 0x55d5_c6a2_a000);
        assert_eq!(lines[0].offset, 0x2a000);
        assert_eq!(lines[0].file, ((0xfd << 20) | 1, 1311));
        assert_eq!(lines[1].path, "/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(lines[1].file, ((0x103 << 20) | 2, 77));
        assert_eq!(lines[2].path, "/memfd:jit");
    }

    #[test]
    fn an_exited_process_keeps_its_files_and_offsets() {
        // A child that execs `sleep` and is gone before it is looked up.
        let mut child = std::process::Command::new("sleep")
            .arg("1")
            .spawn()
            .expect("sleep");
        let pid = child.id();
        let images = Images::default();
        // Until the exec, the child is a copy of this test binary, and the exec names the new
        // executable before it maps it: wait until sleep's code is in its mappings.
        let deadline = Instant::now() + Duration::from_secs(5);
        let text = loop {
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
            if let Some(l) = parse_maps(&maps)
                .into_iter()
                .find(|l| l.offset > 0 && l.path.ends_with("sleep"))
            {
                break l;
            }
            assert!(Instant::now() < deadline, "sleep's code never mapped");
            std::thread::sleep(Duration::from_millis(5));
        };
        images.observe(pid);
        child.wait().expect("wait");
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        let (file, off) = images
            .locate(pid, text.start + 0x10)
            .expect("kept after exit");
        assert_eq!(off, text.offset + 0x10);
        assert_eq!(file.path, text.path);
        let held = std::fs::metadata(file.open_path()).expect("still open");
        assert_eq!((held.ino(), held.len() > 0), (text.file.1, true));
        assert!(images.locate(pid, 0x10).is_none());
    }
}
