//! `cargo xtask <task>`: the project's build, bootstrap, demo, test and benchmark entry points.

mod apiserver;
mod bench;
mod bench_faults;
mod bench_fuzz;
mod bench_offcpu;
mod bench_unwind;
mod bootstrap;
mod cluster;
mod crds;
mod dist;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing TOE needs (idempotent; fast when done).
    Bootstrap {
        /// Also install what the test suite uses: go (`go tool pprof`), podman, and a
        /// kube-apiserver with etcd (built once from Debian's source package and cached), and an
        /// S3-compatible server (s3s-fs, built once).
        #[arg(long)]
        tests: bool,
    },
    /// Build the eBPF object alone (the agent's build does this automatically).
    BuildEbpf,
    /// Build everything and profile the bundled demo workload (the README's first command).
    Demo,
    /// Formatting, lints and the whole test suite, as CI runs it (the README's second command).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Write the CRDs and RBAC rules generated from the Rust types into the chart.
    Crds,
    /// Build every release artifact (binaries, eBPF object, CRDs, packaged chart, images,
    /// checksums) into one directory.
    Dist {
        #[arg(long, default_value = "target/dist")]
        out: PathBuf,
        /// Then verify them: checksums, contents, the chart, and the images run with podman.
        #[arg(long)]
        check: bool,
    },
    /// A real single-node Kubernetes 1.20 cluster (kubelet, containerd) on this machine, for
    /// the tests that need one.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// The kernel test suites (collectors, faults) on other kernels with pure cgroup v2, each
    /// booted in an emulated VM (Debian's kernel packages, downloaded once and cached).
    VmTest {
        /// Which kernels; all by default.
        #[arg(long, value_enum)]
        kernel: Vec<vm::Series>,
        /// Only this suite (a test target: cpu, memory, signals, offcpu, faults, cli,
        /// toe_agent-unit); repeat for more. All by default.
        #[arg(long)]
        suite: Vec<String>,
        /// A test name filter, as for `cargo test`.
        #[arg(last = true)]
        filter: Vec<String>,
    },
    /// Benchmarks; ratios are measured side by side, interleaved, in one run.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Start it (building what it needs once) and wait until the node is Ready; fast and
    /// harmless when it is already up.
    Up,
    /// Stop it and remove everything it made.
    Down,
    /// Each component's state and the node's; fails unless all are up.
    Status,
    /// Import OCI image archives into its containerd (no registry is involved).
    Import { archives: Vec<PathBuf> },
    /// The cluster suite alone, as `cargo xtask test` runs it: release artifacts built and
    /// checked into target/dist-check, a cluster started for them and taken down after.
    Test {
        /// Only the tests whose names contain one of these.
        filter: Vec<String>,
    },
}

#[must_use]
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Runs `cmd`, failing with the command line when it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

#[must_use]
pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub(crate) fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

pub(crate) fn build_release() -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "toe-agent",
        "-p",
        "toe-operator",
        "-p",
        "toe-demo",
    ]))
}

fn demo() -> Result<()> {
    bootstrap::toolchain()?;
    bootstrap::tracefs()?;
    build_release()?;
    if !is_root() {
        bail!("profiling loads eBPF programs, which needs root: run `sudo -E cargo xtask demo`");
    }
    let r = root();
    eprintln!(
        "xtask: profiling the demo workload for 10 s (its hot function takes 70% of its CPU time)"
    );
    run(Command::new(r.join("target/release/toe"))
        .current_dir(&r)
        .args(["run", "-f", "examples/cpu-profile.yaml", "--"])
        .arg(r.join("target/release/toe-demo"))
        .args(["spin", "10"]))?;
    eprintln!(
        "xtask: open flamegraph.svg in a browser; `go tool pprof -top cpu.pb.gz` reads the pprof"
    );
    eprintln!("xtask: processing that run into findings and an HTML report (`toe report`)");
    run(Command::new(r.join("target/release/toe"))
        .current_dir(&r)
        .args([
            "report",
            "--window",
            "2m",
            "-o",
            "toe-output/reports",
            "toe-output",
        ]))?;
    eprintln!("xtask: open the report.html above in a browser");
    Ok(())
}

/// Everything `cargo xtask test` needs; returns helm's path.
fn bootstrap_tests() -> Result<PathBuf> {
    bootstrap::toolchain()?;
    bootstrap::tracefs()?;
    bootstrap::test_packages()?;
    let helm = bootstrap::helm()?;
    bootstrap::action_validator()?;
    bootstrap::manifest_validator()?;
    bootstrap::s3_server()?;
    // The API server tests' kube-apiserver, and everything the real cluster needs.
    cluster::prepare()?;
    Ok(helm)
}

/// The wall time of each stage of `cargo xtask test`, printed as each ends and all together when
/// the run ends (passed or not), so a slow or cut-off CI run shows where its time went.
struct Stages {
    start: std::time::Instant,
    done: Vec<(&'static str, std::time::Duration)>,
}

impl Stages {
    fn new() -> Self {
        Self {
            start: std::time::Instant::now(),
            done: Vec::new(),
        }
    }

    fn run<T>(&mut self, name: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let t = std::time::Instant::now();
        let r = f();
        let took = t.elapsed();
        eprintln!("xtask: {name}: {}", minutes(took));
        self.done.push((name, took));
        r
    }
}

impl Drop for Stages {
    fn drop(&mut self) {
        let each: Vec<String> = self
            .done
            .iter()
            .map(|(n, d)| format!("{n} {}", minutes(*d)))
            .collect();
        eprintln!(
            "xtask: {} in all ({})",
            minutes(self.start.elapsed()),
            each.join(", ")
        );
    }
}

pub(crate) fn minutes(d: std::time::Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

fn test(extra: &[String]) -> Result<()> {
    let mut stages = Stages::new();
    let helm = stages.run("bootstrap", bootstrap_tests)?;
    stages.run("format and lints", || {
        // rustfmt.toml uses nightly-only options (import grouping), so formatting is nightly's.
        run(Command::new("rustup")
            .current_dir(root())
            .args(["run", "nightly", "cargo", "fmt", "--all", "--check"]))
        .context("formatting differs: run `cargo +nightly fmt --all`")?;
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--release",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    stages.run("release build", build_release)?;
    let mut c = cargo();
    c.args(["test", "--workspace", "--release"]);
    // Root-only tests must not skip in CI: a skip there would hide a broken kernel path.
    if is_root() {
        c.env("TOE_REQUIRE_ROOT_TESTS", "1");
    } else if std::env::var_os("CI").is_some() {
        // A CI run without root would pass with every kernel test skipped.
        bail!(
            "CI is set but this is not root: the kernel tests (eBPF, cgroups, faults) need root \
             and CI must run them; run the job as root (sudo -E cargo xtask test)"
        );
    } else {
        eprintln!("xtask: not root: tests that load eBPF programs will skip (CI runs as root)");
    }
    c.env("TOE_BIN_DIR", root().join("target/release"));
    c.env("TOE_KUBE_APISERVER", apiserver::binary());
    c.env("TOE_HELM", &helm);
    c.env("TOE_ACTION_VALIDATOR", bootstrap::action_validator_path());
    c.env("TOE_S3_SERVER", bootstrap::s3_server_path());
    // An S3 client without credentials asks the cloud's instance-metadata address; in the tests
    // that question goes to a loopback port nothing serves (the S3 tests point it at a trap that
    // counts, and fail if anything knocked).
    c.env("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9");
    c.env("AWS_EC2_METADATA_DISABLED", "true");
    c.args(extra);
    stages.run("tests (build and run)", || run(&mut c))?;
    // The kernel suites again on the kernels production nodes run, with pure cgroup v2, each in
    // an emulated VM (a filtered run is for one test on this machine, not for this).
    if extra.is_empty() {
        if is_root() {
            stages.run("kernel VMs (6.1 and 6.12, pure cgroup v2)", || {
                vm::test(&vm::Options {
                    series: vm::Series::ALL.to_vec(),
                    suites: Vec::new(),
                    filter: Vec::new(),
                })
            })?;
        } else {
            eprintln!(
                "xtask: not root: skipping the kernel VMs (the host's files are shared read-only as root)"
            );
        }
    }
    // The release artifacts, as `cargo xtask dist --check` builds and verifies them (a filtered
    // run is for one test, not for this).
    if extra.is_empty() {
        if is_root() {
            let out = root().join("target/dist-check");
            stages.run("release artifacts", || {
                dist::build(&out)?;
                dist::check(&out).context("cargo xtask dist --check")
            })?;
            // TOE as a cluster runs it: the packaged chart and the release images just
            // checked, on a real kubelet and containerd node.
            stages.run("real cluster", || cluster::test(&out, &helm, &[]))?;
        } else {
            eprintln!("xtask: not root: skipping the release artifacts' check (images need root)");
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Bootstrap { tests } => {
            if tests {
                bootstrap_tests()?;
            } else {
                bootstrap::toolchain()?;
                bootstrap::tracefs()?;
            }
            Ok(())
        }
        Task::BuildEbpf => bootstrap::toolchain().and_then(|()| bootstrap::build_ebpf()),
        Task::Demo => demo(),
        Task::Test { args } => test(&args),
        Task::Crds => crds::write(),
        Task::Dist { out, check } => {
            let out = root().join(out);
            dist::build(&out)?;
            if check {
                dist::check(&out)?;
                eprintln!(
                    "xtask: the release artifacts in {} check out",
                    out.display()
                );
            }
            Ok(())
        }
        Task::Cluster { action } => match action {
            ClusterAction::Up => cluster::up(),
            ClusterAction::Down => cluster::down(),
            ClusterAction::Status => cluster::status(),
            ClusterAction::Import { archives } => cluster::import(&archives),
            ClusterAction::Test { filter } => {
                let helm = bootstrap_tests()?;
                build_release()?;
                let out = root().join("target/dist-check");
                dist::build(&out)?;
                dist::check(&out).context("cargo xtask dist --check")?;
                cluster::test(&out, &helm, &filter)
            }
        },
        Task::VmTest {
            kernel,
            suite,
            filter,
        } => {
            bootstrap::toolchain()?;
            let series = if kernel.is_empty() {
                vm::Series::ALL.to_vec()
            } else {
                kernel
            };
            vm::test(&vm::Options {
                series,
                suites: suite,
                filter,
            })
        }
        Task::Bench { which } => {
            bootstrap::toolchain()?;
            bootstrap::tracefs()?;
            build_release()?;
            bench::run(&which)
        }
    }
}
