//! Names for code a runtime generated while it ran (JIT output, interpreter stubs). Such code
//! lies in no file, so only the runtime can name it, through a perf map: `/tmp/perf-<pid>.map`
//! in the process's own mount and pid namespaces, which blazesym reads through
//! `/proc/<pid>/root`. Node and Python write one only when started with a flag. A HotSpot JVM
//! (JDK 17+) writes one on request, the `Compiler.perfmap` diagnostic command; TOE makes that
//! request itself, as `jcmd` does, because in an incident nobody restarts a service with new
//! flags to profile it.
//!
//! The maps are read here, not by blazesym: HotSpot writes its addresses with a `0x` prefix,
//! which perf accepts and blazesym 0.2 rejects (and a map it cannot parse fails the whole
//! batch of addresses of that process, file-backed ones included).

use std::{
    fs,
    io::{Read, Write},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{fs::MetadataExt, net::UnixStream},
    },
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::{Duration, Instant, SystemTime},
};

use nix::{
    fcntl::{OFlag, open, openat},
    sys::{
        signal::{Signal, kill},
        stat::Mode,
    },
    unistd::{Pid, UnlinkatFlags, unlinkat},
};

/// How long the JVM may take to start its attach listener after the signal, and then to
/// answer: `jcmd` waits up to 10 s in all; a run's end should not wait longer.
const ATTACH_WAIT: Duration = Duration::from_secs(5);
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// The runtime a process with code outside any file runs, as far as its mappings tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// HotSpot: maps `libjvm.so`.
    Jvm,
    Node,
    /// CPython 3.`minor`, when the version shows in a file name.
    Python {
        minor: Option<u32>,
    },
    Unknown,
}

impl Runtime {
    #[must_use]
    pub fn detect(pid: u32) -> Self {
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        let exe = fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        Self::from_maps(&maps, &exe)
    }

    fn from_maps(maps: &str, exe: &str) -> Self {
        let python = |name: &str| {
            let rest = name.strip_prefix("python3")?;
            let minor = rest.strip_prefix('.').map(|r| {
                r.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .ok()
            });
            Some(Self::Python {
                minor: minor.flatten(),
            })
        };
        for path in maps.lines().filter_map(|l| l.split_whitespace().nth(5)) {
            let base = path.rsplit('/').next().unwrap_or(path);
            if base == "libjvm.so" {
                return Self::Jvm;
            }
            if base.starts_with("libnode.so") {
                return Self::Node;
            }
            if let Some(p) = base.strip_prefix("lib").and_then(python) {
                return p;
            }
        }
        if exe == "node" || exe == "nodejs" {
            return Self::Node;
        }
        python(exe).unwrap_or(Self::Unknown)
    }

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Jvm => "JVM",
            Self::Node => "Node.js",
            Self::Python { .. } => "Python",
            Self::Unknown => "unknown runtime",
        }
    }

    /// How to get a perf map from this runtime, for code it did not name.
    #[must_use]
    pub fn hint(self) -> &'static str {
        match self {
            Self::Jvm => "jcmd <pid> Compiler.perfmap writes one (JDK 17+)",
            Self::Node => "start node with --perf-basic-prof to get a perf map",
            Self::Python { minor: Some(m) } if m < 12 => {
                "Python 3.12+ writes a perf map with -X perf; this version cannot"
            }
            Self::Python { .. } => "start Python with -X perf (or PYTHONPERFSUPPORT=1)",
            Self::Unknown => {
                "a runtime names generated code only through a perf map (/tmp/perf-<pid>.map)"
            }
        }
    }
}

/// The process's id in its own pid namespace (the last `NSpid` field), which names its files.
fn ns_tgid(status: &str, pid: u32) -> u32 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(pid)
}

/// The process's perf map, as the process sees it, and its pid there.
fn perf_map_name(pid: u32) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(format!("/tmp/perf-{}.map", ns_tgid(&status, pid)))
}

/// Opens a file of the process's `/tmp` for reading, inside its root (a symlink it planted
/// cannot point the agent at a file of the node), refusing anything but a regular file.
fn open_regular(pid: u32, path: &str) -> std::io::Result<fs::File> {
    let fd = crate::targets::open_in_root(
        pid,
        path,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK,
        Mode::empty(),
    )?;
    let file = fs::File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(file)
}

/// A perf map larger than this is not read: a runtime's map is tens of MiB at most, and the
/// agent's memory is bounded.
const MAP_CAP: u64 = 256 << 20;
/// A map that changed is read again at most this often while the run goes on (Node appends to
/// its map with every compilation); at the end it is always read again.
const REREAD_EVERY: Duration = Duration::from_secs(1);

/// One process's perf map, as last read: functions by start address, each with its line
/// number (a later line wins where code was freed and its range reused).
#[derive(Default)]
pub struct PerfMap {
    /// (device, inode, size, modification time) of the file read.
    stamp: (u64, u64, u64, i64),
    read_at: Option<Instant>,
    functions: Vec<(u64, u64, usize, Arc<str>)>,
    /// Why the map could not be read, if it could not.
    pub error: Option<String>,
}

impl PerfMap {
    /// Parses a perf map: `START SIZE name` per line, hexadecimal with or without `0x`. Lines
    /// that do not parse are skipped: the map is the runtime's, written while it runs, and
    /// its last line may be half written.
    #[must_use]
    pub fn parse(text: &str) -> Vec<(u64, u64, usize, Arc<str>)> {
        let hex = |s: &str| u64::from_str_radix(s.strip_prefix("0x").unwrap_or(s), 16).ok();
        let mut out: Vec<_> = text
            .lines()
            .enumerate()
            .filter_map(|(i, line)| {
                let mut parts = line.splitn(3, ' ');
                let start = hex(parts.next()?)?;
                let size = hex(parts.next()?)?;
                let name = parts.next()?.trim();
                (size > 0 && !name.is_empty()).then(|| (start, size, i, Arc::from(name)))
            })
            .collect();
        out.sort_unstable_by_key(|f| (f.0, f.2));
        out
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.functions.is_empty()
    }

    /// The name of the function holding `addr`, the latest line's where ranges overlap.
    #[must_use]
    pub fn lookup(&self, addr: u64) -> Option<&Arc<str>> {
        let end = self.functions.partition_point(|f| f.0 <= addr);
        // Overlaps are rare and short-lived; a few entries back is far enough.
        self.functions[end.saturating_sub(32)..end]
            .iter()
            .filter(|f| addr - f.0 < f.1)
            .max_by_key(|f| f.2)
            .map(|f| &f.3)
    }

    /// Reads `pid`'s map again when it changed, unless it was read less than a second ago
    /// and `now` is not set. Returns whether the map has any function.
    pub fn refresh(&mut self, pid: u32, now: bool) -> bool {
        if !now && self.read_at.is_some_and(|t| t.elapsed() < REREAD_EVERY) {
            return !self.functions.is_empty();
        }
        self.read_at = Some(Instant::now());
        let Some(path) = perf_map_name(pid) else {
            return !self.functions.is_empty();
        };
        let Ok(file) = open_regular(pid, &path) else {
            return !self.functions.is_empty();
        };
        let Ok(meta) = file.metadata() else {
            return !self.functions.is_empty();
        };
        let stamp = (
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        );
        if stamp == self.stamp {
            return !self.functions.is_empty();
        }
        if meta.size() > MAP_CAP {
            self.error = Some(format!(
                "{path} is {} MiB, over the {} MiB read",
                meta.size() >> 20,
                MAP_CAP >> 20
            ));
            return !self.functions.is_empty();
        }
        let mut bytes = Vec::new();
        match file.take(MAP_CAP).read_to_end(&mut bytes) {
            Ok(_) => {
                self.functions = Self::parse(&String::from_utf8_lossy(&bytes));
                self.stamp = stamp;
                self.error = None;
            }
            Err(e) => self.error = Some(format!("cannot read {path}: {e}")),
        }
        !self.functions.is_empty()
    }
}

/// The `status` field `key` (e.g. `SigCgt`) as a hexadecimal mask.
fn status_mask(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

/// The effective id of a `Uid:`/`Gid:` line (real, effective, saved, fs).
fn status_effective(status: &str, key: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Why the JVM cannot be asked without harm, from its status and options, or `None`.
fn refusal(status: &str, options: &str) -> Option<&'static str> {
    // Without a handler SIGQUIT's default action ends the process with a core dump.
    let quit = 1u64 << (Signal::SIGQUIT as u32 - 1);
    if status_mask(status, "SigCgt") & quit == 0 {
        return Some(
            "the JVM does not handle SIGQUIT (-Xrs), and the signal that starts its attach \
             listener would end it",
        );
    }
    if options.contains("-XX:+DisableAttachMechanism") {
        return Some("the JVM runs with -XX:+DisableAttachMechanism");
    }
    None
}

/// The attach trigger file, removed however the request ends (when this request made it).
struct Trigger {
    dir: OwnedFd,
    name: String,
    ours: bool,
}

impl Drop for Trigger {
    fn drop(&mut self) {
        if self.ours {
            let _ = unlinkat(&self.dir, self.name.as_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// Creates the file that makes the JVM start its attach listener on SIGQUIT: in its working
/// directory, else its `/tmp`, owned by the JVM's user (the JVM ignores a trigger owned by
/// another user who is not root). Never through a symlink: the file is created new, in a
/// directory opened inside the process's root.
fn create_trigger(pid: u32, ns: u32, owner: (Option<u32>, Option<u32>)) -> Result<Trigger, String> {
    let name = format!(".attach_pid{ns}");
    let dirs = [
        open(
            format!("/proc/{pid}/cwd").as_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(std::io::Error::from),
        crate::targets::open_in_root(
            pid,
            "/tmp",
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Mode::empty(),
        ),
    ];
    let mut last = String::from("no directory to create it in");
    for dir in dirs {
        let dir = match dir {
            Ok(d) => d,
            Err(e) => {
                last = format!("cannot open the directory for {name}: {e}");
                continue;
            }
        };
        let made = openat(
            &dir,
            name.as_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        );
        match made {
            Ok(fd) => {
                let _ = std::os::unix::fs::fchown(&fd, owner.0, owner.1);
                return Ok(Trigger {
                    dir,
                    name,
                    ours: true,
                });
            }
            // Another attach (a jcmd) is under way: its trigger serves this one too.
            Err(nix::errno::Errno::EEXIST) => {
                return Ok(Trigger {
                    dir,
                    name,
                    ours: false,
                });
            }
            Err(e) => last = format!("cannot create {name}: {e}"),
        }
    }
    Err(last)
}

/// The JVM's attach socket, opened (as a path, not for I/O) inside its root when it exists.
fn attach_socket(pid: u32, ns: u32) -> Option<OwnedFd> {
    let fd = crate::targets::open_in_root(
        pid,
        &format!("/tmp/.java_pid{ns}"),
        OFlag::O_PATH | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .ok()?;
    nix::sys::stat::fstat(&fd)
        .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
        .then_some(fd)
}

/// Asks the HotSpot JVM `pid` to write its perf map (`Compiler.perfmap`) through its attach
/// mechanism, as `jcmd` does: a trigger file and SIGQUIT start the listener (unless it runs),
/// then one command on its Unix socket. Returns how long it took, or why it could not.
///
/// The protocol is HotSpot's own (a version, the command and three NUL-terminated arguments;
/// the answer is a status line and the command's output); no maintained crate speaks it, and
/// it is a few writes and one read.
pub fn request_jvm_perf_map(pid: u32) -> Result<Duration, String> {
    let started = Instant::now();
    let since = SystemTime::now();
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read the JVM's status: {e}"))?;
    let mut options = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    // JAVA_TOOL_OPTIONS and JDK_JAVA_OPTIONS carry options too.
    options.extend(fs::read(format!("/proc/{pid}/environ")).unwrap_or_default());
    if let Some(why) = refusal(&status, &String::from_utf8_lossy(&options)) {
        return Err(why.into());
    }
    let ns = ns_tgid(&status, pid);
    let socket = if let Some(fd) = attach_socket(pid, ns) {
        fd
    } else {
        let owner = (
            status_effective(&status, "Uid"),
            status_effective(&status, "Gid"),
        );
        let _trigger = create_trigger(pid, ns, owner)?;
        kill(Pid::from_raw(pid.cast_signed()), Signal::SIGQUIT)
            .map_err(|e| format!("cannot signal the JVM: {e}"))?;
        let deadline = Instant::now() + ATTACH_WAIT;
        loop {
            if let Some(fd) = attach_socket(pid, ns) {
                break fd;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the JVM did not open its attach socket within {} s",
                    ATTACH_WAIT.as_secs()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    };
    // Connecting through the descriptor reaches the socket that was checked, inside the
    // process's root, whatever its path resolves to from here.
    let socket = PathBuf::from(format!("/proc/self/fd/{}", socket.as_raw_fd()));
    let answer = command(&socket, "Compiler.perfmap")?;
    let (code, output) = answer.split_once('\n').unwrap_or((&answer, ""));
    let output = output.trim();
    if code.trim() != "0" {
        return Err(format!("the JVM refused Compiler.perfmap: {code} {output}"));
    }
    let written = perf_map_name(pid)
        .and_then(|p| open_regular(pid, &p).ok()?.metadata().ok()?.modified().ok())
        .is_some_and(|m| m >= since - Duration::from_secs(1));
    if !written {
        let said = output.lines().next().unwrap_or("nothing");
        return Err(format!(
            "the JVM wrote no perf map (JDK 17+ has Compiler.perfmap); it said: {said}"
        ));
    }
    Ok(started.elapsed())
}

/// Sends one `jcmd` command on the attach socket and returns the whole answer (bounded).
fn command(socket: &Path, cmd: &str) -> Result<String, String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to the JVM's attach socket: {e}"))?;
    s.set_read_timeout(Some(ANSWER_WAIT))
        .and_then(|()| s.set_write_timeout(Some(ANSWER_WAIT)))
        .map_err(|e| e.to_string())?;
    let mut request = Vec::new();
    for part in ["1", "jcmd", cmd, "", ""] {
        request.extend_from_slice(part.as_bytes());
        request.push(0);
    }
    s.write_all(&request)
        .map_err(|e| format!("cannot send the command: {e}"))?;
    let mut answer = Vec::new();
    s.take(64 * 1024)
        .read_to_end(&mut answer)
        .map_err(|e| format!("no answer from the JVM: {e}"))?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtimes_are_told_apart_by_their_files() {
        let line = |p: &str| format!("7f0000000000-7f0000001000 r-xp 00000000 08:01 42 {p}\n");
        let jvm = line("/usr/lib/jvm/java-17/lib/server/libjvm.so");
        assert_eq!(Runtime::from_maps(&jvm, "java"), Runtime::Jvm);
        assert_eq!(Runtime::from_maps("", "node"), Runtime::Node);
        let py = line("/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0");
        assert_eq!(
            Runtime::from_maps(&py, "python3"),
            Runtime::Python { minor: Some(11) }
        );
        assert_eq!(
            Runtime::from_maps("", "python3.12"),
            Runtime::Python { minor: Some(12) }
        );
        assert_eq!(
            Runtime::from_maps("", "python3"),
            Runtime::Python { minor: None }
        );
        assert_eq!(
            Runtime::from_maps(&line("/bin/cat"), "cat"),
            Runtime::Unknown
        );
        assert!(
            Runtime::Python { minor: Some(11) }
                .hint()
                .contains("cannot")
        );
        assert!(
            Runtime::Python { minor: Some(12) }
                .hint()
                .contains("-X perf")
        );
    }

    #[test]
    fn perf_maps_of_every_runtime_parse_and_later_lines_win() {
        let map = PerfMap {
            functions: PerfMap::parse(
                "0x00007f2b24f200a0 0x00000000000003d8 long Hot.spin(long)\n\
                 3e8a4c0 80 LazyCompile:*fib /app/fib.js:3\n\
                 not a line\n\
                 1000 100 old\n\
                 1040 10 new\n\
                 2000 0 empty\n\
                 30",
            ),
            ..PerfMap::default()
        };
        assert_eq!(map.functions.len(), 4);
        assert_eq!(
            map.lookup(0x7f2b_24f2_01ec).map(AsRef::as_ref),
            Some("long Hot.spin(long)")
        );
        assert_eq!(
            map.lookup(0x3e8_a4c0 + 0x7f).map(AsRef::as_ref),
            Some("LazyCompile:*fib /app/fib.js:3")
        );
        assert_eq!(map.lookup(0x3e8_a4c0 + 0x80), None);
        assert_eq!(map.lookup(0x1045).map(AsRef::as_ref), Some("new"));
        assert_eq!(map.lookup(0x1060).map(AsRef::as_ref), Some("old"));
        assert_eq!(map.lookup(0x2000), None);
        assert_eq!(map.lookup(0), None);
    }

    /// The map is the target's file: one that is a symlink (which could name a node file) or
    /// not a regular file (a FIFO, which would block, or a device, which would never end) is
    /// not read; a regular one is, and again when it changes.
    #[test]
    fn only_a_regular_perf_map_is_read() {
        struct Gone(PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = fs::remove_file(&self.0);
            }
        }
        let pid = std::process::id();
        let path = PathBuf::from(format!("/tmp/perf-{pid}.map"));
        let _ = fs::remove_file(&path);
        let _gone = Gone(path.clone());
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        let mut map = PerfMap::default();
        assert!(!map.refresh(pid, true));
        fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, Mode::from_bits_truncate(0o600)).unwrap();
        assert!(!map.refresh(pid, true));
        fs::remove_file(&path).unwrap();
        fs::write(&path, "1000 10 first\n").unwrap();
        assert!(map.refresh(pid, true));
        assert_eq!(map.lookup(0x1005).map(AsRef::as_ref), Some("first"));
        fs::write(&path, "1000 10 first\n2000 10 second\n").unwrap();
        assert!(map.refresh(pid, true));
        assert_eq!(map.lookup(0x2005).map(AsRef::as_ref), Some("second"));
    }

    #[test]
    fn a_jvm_that_would_die_of_sigquit_is_not_asked() {
        let caught = "SigCgt:\t0000000181005ccf\n";
        assert_eq!(refusal(caught, "java\0-cp\0."), None);
        let xrs = "SigCgt:\t0000000181005ccb\n";
        assert!(refusal(xrs, "java\0-Xrs").unwrap().contains("-Xrs"));
        assert!(
            refusal(caught, "JAVA_TOOL_OPTIONS=-XX:+DisableAttachMechanism")
                .unwrap()
                .contains("DisableAttach")
        );
        assert_eq!(ns_tgid("Name:\tjava\nNSpid:\t4242\t7\n", 4242), 7);
        assert_eq!(ns_tgid("Name:\tjava\n", 4242), 4242);
        assert_eq!(
            status_effective("Uid:\t1000\t1001\t1001\t1001\n", "Uid"),
            Some(1001)
        );
    }
}
