//! Helpers for TOE's integration tests: real processes, real cgroups, real eBPF.
//!
//! Tests that need root skip with a stated reason when not root, unless
//! `TOE_REQUIRE_ROOT_TESTS=1` (set by `cargo xtask test` as root, so CI never skips silently).

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::SystemTime,
};

use toe_agent::{
    plan::{self, RunRequest},
    run::{self, Outcome, Ui},
    sink::MemorySink,
    targets::TargetSpec,
};

pub mod apiserver;
pub mod bench;
pub mod cluster;
pub mod node;
pub mod s3;

/// True when the test may proceed; prints why and returns false when it must skip.
#[must_use]
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("TOE_REQUIRE_ROOT_TESTS").is_none(),
        "{test}: needs root, and TOE_REQUIRE_ROOT_TESTS forbids skipping"
    );
    skip(
        test,
        "loading eBPF programs and creating cgroups needs root",
    );
    false
}

/// Skips `test` for a reason the machine gives (a kernel feature or controller it lacks), in the
/// one format every skip uses, so a run's skips can be counted and read.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIP {test}: {reason}");
}

/// Whether the tests run in an emulated VM (`cargo xtask vm-test` sets `TOE_VM_KERNEL`): there
/// memory-heavy work runs about 17 times slower than on the host, so a test whose workload must
/// outlast the agent's own pauses stretches it (never its assertions).
#[must_use]
pub fn emulated() -> bool {
    std::env::var_os("TOE_VM_KERNEL").is_some()
}

/// A tool the bootstrap installs (`cargo xtask bootstrap --tests`): from `env`, else at
/// `~/.cache/toe/<cached>`. `None`, with the reason printed, when it is missing and skipping is
/// allowed; in CI (`TOE_REQUIRE_ROOT_TESTS`) a missing tool is a failure.
#[must_use]
pub fn bootstrapped_tool(test: &str, env: &str, cached: &str) -> Option<PathBuf> {
    let path = std::env::var_os(env).map_or_else(
        || {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            Path::new(&home).join(".cache/toe").join(cached)
        },
        PathBuf::from,
    );
    if path.exists() {
        return Some(path);
    }
    skip_unbootstrapped(test, &path.display().to_string());
    None
}

/// Skips `test` for want of something `cargo xtask bootstrap --tests` installs; where skipping is
/// forbidden (`TOE_REQUIRE_ROOT_TESTS`, as `cargo xtask test` sets as root) that is a failure.
pub fn skip_unbootstrapped(test: &str, what: &str) {
    assert!(
        std::env::var_os("TOE_REQUIRE_ROOT_TESTS").is_none(),
        "{test}: {what} is missing: run `cargo xtask bootstrap --tests`"
    );
    skip(
        test,
        &format!("no {what} (`cargo xtask bootstrap --tests` installs it)"),
    );
}

/// A program of `tests/workloads`, built without frame pointers by the test crate's build script.
#[must_use]
pub fn workload(name: &str) -> PathBuf {
    Path::new(env!("TOE_WORKLOAD_DIR")).join(name)
}

/// A workload's source in `tests/workloads`, for those a runtime runs from source (Java).
#[must_use]
pub fn workload_source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("workloads")
        .join(name)
}

/// A binary of this workspace (`toe`, `toe-demo`), from `TOE_BIN_DIR` or the target directory.
#[must_use]
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("TOE_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} not built: run `cargo build --release -p toe-agent -p toe-demo` (cargo xtask test does)"
    );
}

/// A child process killed and reaped on drop, so a failing test leaves nothing running.
pub struct TestProcess(pub Child);

impl TestProcess {
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for TestProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the demo workload, optionally inside `cgroup` (joined before exec, so no instruction
/// of it runs elsewhere).
#[must_use]
pub fn demo(args: &[&str], cgroup: Option<&TestCgroup>) -> TestProcess {
    let mut cmd = Command::new(bin("toe-demo"));
    cmd.args(args).stdin(Stdio::null());
    if let Some(cg) = cgroup {
        let procs: Vec<PathBuf> = cg.dirs.iter().map(|d| d.join("cgroup.procs")).collect();
        // SAFETY: only writes to files between fork and exec (open/write/close).
        unsafe {
            cmd.pre_exec(move || {
                for p in &procs {
                    std::fs::write(p, b"0")?;
                }
                Ok(())
            });
        }
    }
    TestProcess(cmd.spawn().expect("start toe-demo"))
}

/// A cgroup created for one test in the v2 hierarchy (and the v1 cpu hierarchy when mounted, so
/// a hybrid machine behaves like production), removed on drop after killing its processes.
pub struct TestCgroup {
    /// The v2 directory first.
    pub dirs: Vec<PathBuf>,
}

fn cgroup2_root() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for line in mountinfo.lines() {
        if let Some((pre, post)) = line.split_once(" - ")
            && post.starts_with("cgroup2 ")
        {
            return PathBuf::from(pre.split(' ').nth(4).expect("mount point"));
        }
    }
    panic!("no cgroup2 mount");
}

impl TestCgroup {
    #[must_use]
    pub fn new(name: &str) -> Self {
        let unique = format!("toe-test-{}-{name}", std::process::id());
        let dir = cgroup2_root().join(&unique);
        std::fs::create_dir_all(&dir).expect("create v2 cgroup");
        Self { dirs: vec![dir] }
    }

    /// A cgroup whose memory (and swap) is limited to `limit` bytes: in the v1 memory hierarchy
    /// where one is mounted (hybrid hosts), else in the v2 tree with its memory controller
    /// enabled. `None` when the machine offers neither.
    #[must_use]
    pub fn with_memory_limit(name: &str, limit: u64) -> Option<Self> {
        let unique = format!("toe-test-{}-{name}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/memory");
        if v1.join("memory.limit_in_bytes").exists() {
            let dir = v1.join(&unique);
            std::fs::create_dir_all(&dir).expect("create v1 memory cgroup");
            std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string()).expect("limit");
            // With swap accounting, swap is limited too, so the OOM killer fires instead of swap.
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                std::fs::write(memsw, limit.to_string()).expect("memsw limit");
            }
            return Some(Self { dirs: vec![dir] });
        }
        let root = cgroup2_root();
        let offered = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        if !offered.split_whitespace().any(|c| c == "memory") {
            return None;
        }
        // Usually enabled already (systemd does); children get the controller only if it is.
        let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
        let dir = root.join(&unique);
        std::fs::create_dir_all(&dir).expect("create v2 cgroup");
        std::fs::write(dir.join("memory.max"), limit.to_string()).expect("memory.max");
        let swap = dir.join("memory.swap.max");
        if swap.exists() {
            std::fs::write(swap, "0").expect("memory.swap.max");
        }
        Some(Self { dirs: vec![dir] })
    }

    /// A cgroup whose CPU is limited to `quota_us` per `period_us`: in the v1 cpu hierarchy at
    /// the same path where one is mounted (hybrid hosts), else in the v2 tree with its cpu
    /// controller enabled. `None` when the machine offers neither.
    #[must_use]
    pub fn with_cpu_quota(name: &str, quota_us: u64, period_us: u64) -> Option<Self> {
        let mut cg = Self::new(name);
        let unique = cg.dirs[0].file_name().expect("name").to_owned();
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        if v1.join("cpu.cfs_quota_us").exists() {
            let dir = v1.join(unique);
            std::fs::create_dir_all(&dir).expect("create v1 cpu cgroup");
            std::fs::write(dir.join("cpu.cfs_period_us"), period_us.to_string()).expect("period");
            std::fs::write(dir.join("cpu.cfs_quota_us"), quota_us.to_string()).expect("quota");
            cg.dirs.push(dir);
            return Some(cg);
        }
        let root = cgroup2_root();
        let offered = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        if !offered.split_whitespace().any(|c| c == "cpu") {
            return None;
        }
        let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu");
        std::fs::write(
            cg.dirs[0].join("cpu.max"),
            format!("{quota_us} {period_us}"),
        )
        .expect("cpu.max");
        Some(cg)
    }

    /// A child cgroup inside this one.
    #[must_use]
    pub fn child(&self, name: &str) -> Self {
        let dir = self.dirs[0].join(name);
        std::fs::create_dir_all(&dir).expect("create child cgroup");
        Self { dirs: vec![dir] }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.dirs[0]
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for d in &self.dirs {
            // Children first (a nested TestCgroup is dropped before its parent in normal
            // order; this handles the rest).
            if let Ok(entries) = std::fs::read_dir(d) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::SIGKILL,
                    );
                }
            }
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// A PowerTool for the CPU profiler.
#[must_use]
pub fn cpu_spec(duration: &str, args: &[&str]) -> String {
    tool_spec("cpu-profile", duration, args)
}

/// A PowerTool for `tool` with the given duration and arguments.
#[must_use]
pub fn tool_spec(tool: &str, duration: &str, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "apiVersion: toe.run/v1alpha1\nkind: PowerTool\nmetadata: {{name: test}}\nspec:\n  tool:\n    name: {tool}\n    duration: {duration}\n    commandLineArguments: [{}]\n",
        args.join(", ")
    )
}

/// Runs the engine in-process against `target`, collecting artifacts in memory.
#[must_use]
pub fn profile(spec: &str, target: TargetSpec) -> (Outcome, MemorySink) {
    let req = RunRequest {
        source_name: "test.yaml".into(),
        spec_yaml: spec.into(),
        config: None,
        target,
        output: Some("memory-unused".into()),
        cwd: std::env::temp_dir(),
        now: SystemTime::now(),
        nonce: 0,
        validation: plan::FieldValidation::Strict,
    };
    let plan = plan::plan(&req).expect("valid plan");
    let sink = MemorySink::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let outcome = rt
        .block_on(run::execute(
            &plan,
            &sink,
            Ui::default(),
            run::Control::new().1,
        ))
        .expect("run succeeds");
    (outcome, sink)
}

/// Folded stacks artifact parsed into (line, count).
#[must_use]
pub fn folded(sink: &MemorySink) -> Vec<(String, u64)> {
    folded_file(sink, "stacks.folded")
}

/// A folded-stacks artifact by file name, parsed into (line, value).
#[must_use]
pub fn folded_file(sink: &MemorySink, file: &str) -> Vec<(String, u64)> {
    let map = sink.artifacts.lock().expect("lock");
    parse_folded(std::str::from_utf8(&map[file]).expect("utf-8"))
}

/// Folded stacks text parsed into (line, value).
#[must_use]
pub fn parse_folded(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .map(|l| {
            let (stack, n) = l.rsplit_once(' ').expect("count");
            (stack.to_owned(), n.parse().expect("number"))
        })
        .collect()
}

/// The process id in a run's target description (`... (pid N)`).
#[must_use]
pub fn target_pid(description: &str) -> u32 {
    description
        .rsplit_once("(pid ")
        .and_then(|(_, p)| p.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no pid in {description:?}"))
}

/// The pid of a folded line's root frame `name (pid)`.
#[must_use]
pub fn root_pid(stack: &str) -> Option<u32> {
    stack
        .split(';')
        .next()?
        .rsplit_once('(')
        .and_then(|(_, p)| p.trim_end_matches(')').parse().ok())
}

/// Samples per pid, from the folded root frames `name (pid)`.
#[must_use]
pub fn samples_by_pid(folded: &[(String, u64)]) -> std::collections::BTreeMap<u32, u64> {
    let mut out = std::collections::BTreeMap::new();
    for (stack, n) in folded {
        let pid = root_pid(stack).expect("pid in root");
        *out.entry(pid).or_insert(0) += n;
    }
    out
}

/// CPU seconds (user + system) a live process has used, from /proc/<pid>/stat.
#[must_use]
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the comm.
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[expect(
        clippy::cast_precision_loss,
        reason = "clock ticks per second is small"
    )]
    let hz = hz as f64;
    ticks / hz
}

/// Names of TOE's programs currently loaded in the kernel.
#[must_use]
pub fn loaded_toe_programs() -> Vec<String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| p.name_as_str().map(str::to_owned))
        .filter(|n| n.starts_with("toe_"))
        .collect()
}

/// Runs the `toe` binary in `dir` with `spec` and target arguments; returns its output. Its
/// fault ledger lives in `dir/state`, apart from other tests running at the same time.
#[must_use]
pub fn toe_run(dir: &Path, spec: &str, target: &[&str]) -> std::process::Output {
    std::fs::write(dir.join("spec.yaml"), spec).expect("write spec");
    Command::new(bin("toe"))
        .current_dir(dir)
        .env(
            toe_agent::tools::faults::ledger::STATE_DIR_ENV,
            dir.join("state"),
        )
        .args(["run", "--no-progress", "-f", "spec.yaml"])
        .args(target)
        .stdin(Stdio::null())
        .output()
        .expect("run toe")
}

/// The fault ledger entries `toe_run` in `dir` left: any entry means a side effect was about to
/// happen. (Counting stress workers on the machine would also see other tests' workers.)
#[must_use]
pub fn ledger_entries(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("state/ledger.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits (up to 30 s) for `path` to hold a pid (written by a demo once it is ready).
#[must_use]
pub fn wait_for_pid_file(path: &Path) -> u32 {
    for _ in 0..600 {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{} did not appear within 30 s", path.display());
}

/// Waits (up to 30 s) until task `tid` is in a loaded `TOE_SIG_TASKS` map: a signal-trace run on
/// a cgroup has attached and seeded its tasks, so what happens next is observed.
pub fn wait_for_signal_target(tid: u32) {
    use aya::maps::{HashMap, Map, MapData};
    for _ in 0..600 {
        let found = aya::maps::loaded_maps()
            .filter_map(Result::ok)
            .filter(|m| m.name_as_str() == Some(toe_common::signals::TASKS_MAP))
            .filter_map(|m| MapData::from_id(m.id()).ok())
            .filter_map(|d| Map::from_map_data(d).ok())
            .filter_map(|m| HashMap::<_, u32, toe_common::signals::TaskInfo>::try_from(m).ok())
            .any(|h| h.get(&tid, 0).is_ok());
        if found {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("task {tid} was not tracked within 30 s");
}

/// A real container run by podman (runc) from a busybox rootfs; removed on drop.
pub struct Container {
    pub id: String,
    _rootfs: tempfile::TempDir,
}

impl Container {
    /// Runs `argv` (busybox applets) in a new container named after the test.
    #[must_use]
    pub fn run(name: &str, argv: &[&str]) -> Self {
        Self::run_with(name, &[], argv)
    }

    /// [`Container::run`] with more `podman run` options (limits: `--cpus`, `--memory`).
    #[must_use]
    pub fn run_with(name: &str, options: &[&str], argv: &[&str]) -> Self {
        Self::run_in(name, options, |_| {}, argv)
    }

    /// [`Container::run_with`], with `setup` adding files to the rootfs (its path) first.
    #[must_use]
    pub fn run_in(name: &str, options: &[&str], setup: impl FnOnce(&Path), argv: &[&str]) -> Self {
        // Tests of one binary run in parallel and may reuse a name.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let rootfs = tempfile::tempdir().expect("rootfs dir");
        let bin = rootfs.path().join("bin");
        std::fs::create_dir_all(&bin).expect("rootfs/bin");
        for d in ["proc", "sys", "dev", "tmp", "etc"] {
            std::fs::create_dir_all(rootfs.path().join(d)).expect("rootfs dir");
        }
        std::fs::copy("/bin/busybox", bin.join("busybox"))
            .expect("/bin/busybox (Debian busybox-static; `cargo xtask bootstrap --tests`)");
        for applet in ["sh", "sleep", "cat", "trap"] {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
        setup(rootfs.path());
        let unique = format!(
            "toe-test-{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let out = Command::new("podman")
            .args([
                "--runtime",
                "runc",
                "run",
                "-d",
                "--rm",
                "--network",
                "none",
            ])
            .args([
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .args(options)
            .args(["--name", &unique, "--rootfs"])
            .arg(rootfs.path())
            .args(argv)
            .output()
            .expect("podman (Debian podman + runc; `cargo xtask bootstrap --tests`)");
        assert!(
            out.status.success(),
            "podman run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            id: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            _rootfs: rootfs,
        }
    }

    /// The container's main process as the host sees it (0 once it has exited).
    #[must_use]
    pub fn pid(&self) -> u32 {
        Command::new("podman")
            .args(["inspect", "--format", "{{.State.Pid}}", &self.id])
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "-f", "-t", "0", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `out` is a failed run whose stderr says `want`.
pub fn assert_rejected(out: &std::process::Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted; stderr: {err}");
    assert!(err.contains(want), "stderr lacks {want:?}:\n{err}");
}
