//! `toe`: the Temporary Observability Engine command line.

use std::{
    ffi::OsString,
    io::{IsTerminal as _, Read as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::SystemTime,
};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use toe_agent::{
    plan::{self, RunRequest},
    run::{self, Ui},
    sink::{ArtifactSink as _, ObjectStoreSink, SpoolingSink},
    targets::TargetSpec,
};
use toe_common::api::{ArgKind, catalogue, format_duration, format_size};

#[derive(Parser)]
#[command(
    name = "toe",
    version,
    about = "Temporary Observability Engine: short, targeted, safe deep-dives into running workloads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a PowerTool on this machine against a process, a cgroup or a command.
    Run(RunArgs),
    /// Validate a PowerTool without running it.
    Validate {
        /// PowerTool YAML (`-` for stdin).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        validation: ValidationArg,
    },
    /// List the built-in tools and their arguments.
    Tools,
    /// What this machine's kernel lets TOE do: each program type loaded for real, each tool's
    /// verdict, and the kernel mechanisms each tool uses here (needs root to load programs).
    Probe,
    /// Undo what faults of crashed runs left behind (every fault run also does this first).
    Cleanup,
    /// "Hello PowerTool": a guided walkthrough that profiles, refuses, terminates, finds a leak
    /// and reports, for real, on this machine (needs root).
    Tutorial(TutorialArgs),
    /// Node mode (the DaemonSet): run the PowerTools admitted for this node's containers.
    Agent(AgentArgs),
    /// Process runs into merged and differential flamegraphs, merged pprof, findings and an
    /// HTML report (what a PowerToolProcessing does in a cluster).
    Report(ReportArgs),
}

#[derive(Args)]
struct ReportArgs {
    /// Directories or object store URLs holding runs (each run directory has a summary.json).
    #[arg(default_value = "./toe-output")]
    sources: Vec<String>,
    /// Directory or object store URL; the report goes to a timestamped directory inside.
    #[arg(short = 'o', long, default_value = "./toe-output/reports")]
    output: String,
    /// Only runs that ended within this long (e.g. `1h`, `7d`); all runs by default.
    #[arg(long, value_parser = humantime::parse_duration)]
    window: Option<std::time::Duration>,
    /// What to produce (comma-separated): mergedFlamegraph, differentialFlamegraph, mergedPprof,
    /// htmlReport.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "mergedFlamegraph,differentialFlamegraph,mergedPprof,htmlReport"
    )]
    outputs: Vec<String>,
    /// An OpenAI-compatible API base (e.g. http://localhost:11434/v1) for the model step.
    #[arg(long, requires = "model")]
    model_url: Option<String>,
    /// The model to ask.
    #[arg(long, requires = "model_url")]
    model: Option<String>,
    /// Environment variable holding the model endpoint's API key.
    #[arg(long, default_value = "TOE_MODEL_API_KEY")]
    model_key_env: String,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    model_timeout: std::time::Duration,
    /// Tokens for the whole model exchange (prompt and answer).
    #[arg(long, default_value_t = 4000)]
    model_token_budget: u32,
    /// MiB of stacks each profile kind's merge holds in memory; beyond it, sorted runs go to the
    /// temporary directory and are merged from there (the outputs are the same).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=65536))]
    merge_memory_mib: u64,
}

#[derive(Args)]
struct TutorialArgs {
    /// Run every step without waiting for Enter (for CI and scripts).
    #[arg(long)]
    non_interactive: bool,
    /// Where the walkthrough's specs and artifacts go.
    #[arg(long, default_value = "./toe-tutorial")]
    workdir: PathBuf,
    /// The demo workload; default: `toe-demo` next to this binary, else on PATH.
    #[arg(long)]
    demo: Option<PathBuf>,
}

#[derive(Args)]
struct AgentArgs {
    /// This node's name, as pods' spec.nodeName has it (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// The namespace TOE is installed in (the chart passes the agent pod's own): faults reach it,
    /// like kube-system, only where a PowerToolConfig names it.
    #[arg(long, env = "POD_NAMESPACE", default_value = "toe-system")]
    release_namespace: String,
    /// Output locations PowerTools may name in spec.output.url besides --output (comma-separated
    /// URL prefixes). Anything else is refused: the agent writes as root.
    #[arg(long, env = "TOE_ALLOWED_OUTPUTS", default_value = "")]
    allowed_outputs: String,
    /// Object store URL for PowerTools that name no spec.output.url.
    #[arg(
        long,
        env = "TOE_OUTPUT",
        default_value = toe_artifacts::layout::DEFAULT_NODE_STORE
    )]
    output: url::Url,
    /// How long an upload may take when a run ends before its artifacts wait on the node's disk
    /// and are retried with backoff.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    upload_timeout: std::time::Duration,
}

/// Resolves on SIGTERM (node drain, rollout) or Ctrl-C.
async fn stop_signal() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn tutorial(args: &TutorialArgs) -> Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "the tutorial loads eBPF programs and injects a fault, which needs root: `sudo toe tutorial`"
        );
    }
    let toe = std::env::current_exe().context("finding this toe binary")?;
    let sibling = toe.with_file_name("toe-demo");
    let demo = if let Some(d) = &args.demo {
        d.clone()
    } else if sibling.is_file() {
        sibling
    } else {
        which::which("toe-demo").context(
            "toe-demo is neither next to toe nor on PATH: pass --demo PATH (it ships in the release archive's bin/)",
        )?
    };
    std::fs::create_dir_all(&args.workdir)
        .with_context(|| format!("creating {}", args.workdir.display()))?;
    let workdir = args
        .workdir
        .canonicalize()
        .with_context(|| format!("{}", args.workdir.display()))?;
    let opts = toe_agent::tutorial::Options {
        interactive: !args.non_interactive,
        workdir,
        demo,
        toe,
    };
    let outcome =
        toe_agent::tutorial::run(&opts, &mut std::io::stdout(), &mut std::io::stdin().lock());
    Ok(if outcome.failed.is_empty() && !outcome.quit {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn agent(args: &AgentArgs) -> Result<ExitCode> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        // Installed before anything runs, so a SIGTERM during start-up is a stop, not a kill.
        let stop = tokio::spawn(stop_signal());
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster or $KUBECONFIG)")?;
        let opts = toe_agent::node::NodeOptions {
            node: args.node.clone(),
            output: args.output.clone(),
            upload_timeout: args.upload_timeout,
            release_namespace: args.release_namespace.clone(),
            allowed_outputs: toe_artifacts::layout::allowed_outputs(&args.allowed_outputs)
                .context("--allowed-outputs")?,
        };
        toe_agent::node::run(client, opts, async {
            let _ = stop.await;
        })
        .await
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Checks that every source `toe report` is given holds a run: a source that is not there, or
/// holds no run, is a mistake to say so, not an empty report.
async fn check_sources(given: &[String], job: &toe_report::store::Job) -> Result<()> {
    for (given, s) in given.iter().zip(&job.sources) {
        if s.url.scheme() == "file"
            && let Ok(path) = s.url.to_file_path()
            && !path.is_dir()
        {
            anyhow::bail!("{given}: no such directory");
        }
        if toe_report::store::count_captures(s).await? == 0 {
            anyhow::bail!(
                "{given}: holds no run (no summary.json below it); give a run directory or the \
                 directory runs are written to (e.g. ./toe-output)"
            );
        }
    }
    Ok(())
}

fn report(args: &ReportArgs) -> Result<ExitCode> {
    // Cloud stores and https model endpoints speak TLS through rustls, which leaves the crypto
    // provider to the application.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cwd = std::env::current_dir().context("current directory")?;
    let url =
        |given: &str| plan::output_base(given, &cwd).map_err(|e| anyhow::anyhow!("{given}: {e}"));
    let mut options = toe_report::process::Options {
        title: "TOE report".into(),
        memory_budget: usize::try_from(args.merge_memory_mib << 20).unwrap_or(usize::MAX),
        ..toe_report::process::Options::default()
    };
    for o in &args.outputs {
        match o.as_str() {
            "mergedFlamegraph" => options.merged_flamegraph = true,
            "differentialFlamegraph" => options.differential_flamegraph = true,
            "mergedPprof" => options.merged_pprof = true,
            "htmlReport" => options.html_report = true,
            other => anyhow::bail!(
                "--outputs: unknown output {other:?}; use mergedFlamegraph, differentialFlamegraph, mergedPprof or htmlReport"
            ),
        }
    }
    if let (Some(url), Some(model)) = (&args.model_url, &args.model) {
        options.model = Some(toe_report::model::Endpoint {
            url: url.clone(),
            model: model.clone(),
            api_key: std::env::var(&args.model_key_env).ok(),
            timeout: args.model_timeout,
            token_budget: args.model_token_budget,
        });
    }
    let now = SystemTime::now();
    options.meta = format!(
        "processed {} from {}{}",
        humantime::format_rfc3339_seconds(now),
        args.sources.join(", "),
        args.window.map_or_else(String::new, |w| format!(
            ", runs that ended in the last {}",
            humantime::format_duration(w)
        ))
    );
    let job = toe_report::store::Job {
        sources: args
            .sources
            .iter()
            .map(|s| {
                Ok(toe_report::store::Source {
                    url: url(s)?,
                    label: String::new(),
                })
            })
            .collect::<Result<_>>()?,
        window: args.window,
        now,
        output: url(&args.output)?,
        retention: None,
        options,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let done = runtime.block_on(async {
        check_sources(&args.sources, &job).await?;
        anyhow::Ok(toe_report::store::run(&job).await?)
    })?;
    let o = &done.outcome;
    eprintln!(
        "TOE report over {} capture(s) of {} run(s): {} finding(s)",
        o.captures,
        o.runs,
        o.findings.len()
    );
    for f in &o.findings {
        let source = match f.source {
            toe_report::rules::Source::Rule => format!("rule {}", f.rule),
            toe_report::rules::Source::Model => "model".to_owned(),
        };
        eprintln!("  [{:?}] {} ({source})", f.severity, f.title);
        for e in &f.evidence {
            eprintln!("      {e}");
        }
    }
    for n in &o.notes {
        eprintln!("  note: {n}");
    }
    eprintln!("  written to {}", done.dir);
    for w in &done.written {
        eprintln!("    {w}");
    }
    Ok(ExitCode::SUCCESS)
}

fn cleanup() -> Result<ExitCode> {
    let ledger = toe_agent::tools::faults::ledger::Ledger::open_default()
        .context("opening the fault ledger")?;
    let r = ledger
        .recover()
        .with_context(|| format!("recovering {}", ledger.path().display()))?;
    eprintln!(
        "toe: cleanup: {} abandoned run(s), {} worker(s) killed, {} file(s) removed",
        r.runs.len(),
        r.workers_killed,
        r.files_removed.len()
    );
    for f in &r.files_removed {
        eprintln!("toe: cleanup: removed {}", f.display());
    }
    if r.files_unreachable.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for f in &r.files_unreachable {
        eprintln!(
            "toe: cleanup: cannot reach {} now (its filesystem is mounted nowhere this host \
             sees); kept in the ledger for the next cleanup",
            f.display()
        );
    }
    Ok(ExitCode::FAILURE)
}

#[derive(Args)]
struct ConfigArg {
    /// PowerToolConfig YAML (one or more documents): only the tools it enables may run, with
    /// only the arguments it lists, within its caps. Without it, the built-in bounds apply.
    #[arg(long = "config", env = "TOE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    fn read(&self) -> Result<Option<(String, String)>> {
        self.config
            .as_ref()
            .map(|path| {
                std::fs::read_to_string(path)
                    .map(|text| (path.display().to_string(), text))
                    .with_context(|| format!("--config {}: cannot read", path.display()))
            })
            .transpose()
    }
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["pid", "cgroup", "container", "command"])))]
struct RunArgs {
    /// PowerTool YAML (`-` for stdin).
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Target this process, its threads and every process it starts.
    #[arg(long)]
    pid: Option<u32>,
    /// Target this cgroup directory and its descendants.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Target this container (id or unique prefix; `containerd://`-style schemes accepted).
    #[arg(long)]
    container: Option<String>,
    /// Directory or object store URL (file://, s3://, gs://, az://) for the artifacts; a
    /// directory per run is created inside. Overrides the spec's output URL.
    #[arg(short = 'o', long)]
    output: Option<String>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Print the summary as JSON on stdout instead of the readable one on stderr.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    config: ConfigArg,
    #[command(flatten)]
    validation: ValidationArg,
    /// Start this command and profile it from its first instruction until it exits.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Args)]
struct ValidationArg {
    /// Unknown fields in the spec: `strict` refuses them (naming the closest known field),
    /// `warn` prints a warning and ignores them.
    #[arg(long, value_enum, default_value = "strict")]
    validate: plan::FieldValidation,
}

fn read_spec(file: &PathBuf) -> Result<(String, String)> {
    if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the PowerTool from stdin")?;
        return Ok(("<stdin>".into(), s));
    }
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("-f {}: cannot read", file.display()))?;
    Ok((file.display().to_string(), text))
}

fn request(args: &RunArgs) -> Result<RunRequest> {
    let (source_name, spec_yaml) = read_spec(&args.file)?;
    let target = match (&args.pid, &args.cgroup, &args.container) {
        (Some(pid), _, _) => TargetSpec::Pid(*pid),
        (_, Some(dir), _) => TargetSpec::Cgroup(dir.clone()),
        (_, _, Some(id)) => TargetSpec::Container(id.clone()),
        _ => TargetSpec::Command(args.command.clone()),
    };
    Ok(RunRequest {
        source_name,
        spec_yaml,
        config: args.config.read()?,
        target,
        output: args.output.clone(),
        cwd: std::env::current_dir().context("current directory")?,
        now: SystemTime::now(),
        nonce: std::process::id(),
        validation: args.validation.validate,
    })
}

fn run_cmd(args: &RunArgs) -> Result<ExitCode> {
    let plan = plan::plan(&request(args)?)?;
    // A real run reports the plan's warnings in its summary; a dry run has no summary.
    if plan.dry_run {
        for w in &plan.warnings {
            eprintln!("toe: warning: {w}");
        }
        if plan.tool.options.is_fault() {
            // The exact plan, from the target's measured limits; nothing is started.
            for line in run::describe_fault(&plan)? {
                eprintln!("toe: dry run: {line}");
            }
        }
        eprintln!(
            "toe: dry run: would run {} for {} on {:?}, writing to {}",
            plan.tool.name,
            format_duration(plan.tool.duration),
            plan.target,
            plan.output
        );
        return Ok(ExitCode::SUCCESS);
    }
    // Where the artifacts go if the store fails at the end: kept on this machine, never lost.
    let run_id = plan
        .output
        .path_segments()
        .and_then(|mut s| s.rfind(|p| !p.is_empty()))
        .unwrap_or("run")
        .to_owned();
    let sink = SpoolingSink::new(
        Box::new(ObjectStoreSink::new(&plan.output)?),
        toe_agent::tools::faults::ledger::state_dir()
            .join("local-spool")
            .join(run_id),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let ui = Ui {
        progress: !args.no_progress && std::io::stderr().is_terminal(),
    };
    // Before anything is attached: a run must not collect what it then cannot keep.
    runtime.block_on(sink.check()).map_err(|e| {
        anyhow::anyhow!(
            "the output {} does not take a write: {}; nothing was started",
            plan.output,
            e.reason()
        )
    })?;
    let outcome = runtime.block_on(async {
        let mut control = run::Control::on_signals()?;
        if !ui.progress {
            // Without a progress bar, one line says when sampling (or the fault) has begun: the
            // moment a user (or a benchmark) can start the load to observe.
            let (tx, rx) = tokio::sync::oneshot::channel();
            control.started = Some(tx);
            tokio::spawn(async move {
                if let Ok(target) = rx.await {
                    eprintln!("toe: started on {target}");
                }
            });
        }
        run::execute(&plan, &sink, ui, control).await
    })?;
    if args.json {
        let json = serde_json::to_string_pretty(&outcome.summary)?;
        // A reader that went away (`| head`) does not change how the run ended.
        let _ = writeln!(std::io::stdout().lock(), "{json}");
    } else {
        eprint!("{}", toe_artifacts::summary::render(&outcome.summary));
    }
    if let Some((dir, why)) = sink.spooled() {
        eprintln!(
            "toe: error: the store did not take the artifacts ({why}); they are kept in {}",
            dir.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::from(
        u8::try_from(outcome.exit_code.clamp(0, 255)).unwrap_or(1),
    ))
}

/// Whether `e` is a write to a pipe whose reader has gone.
fn closed_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn tools(out: &mut impl std::io::Write) -> std::io::Result<()> {
    for t in catalogue() {
        writeln!(
            out,
            "{}  ({:?}; default duration {}, max {})",
            t.name,
            t.kind,
            format_duration(t.default_duration),
            format_duration(t.max_duration)
        )?;
        writeln!(out, "    {}", t.summary)?;
        for a in t.args {
            let kind = match &a.kind {
                ArgKind::Integer { min, max } => format!("integer {min}..={max}"),
                ArgKind::Bool => "true|false".into(),
                ArgKind::Duration { min, max } => format!(
                    "duration {}..={}",
                    format_duration(*min),
                    format_duration(*max)
                ),
                ArgKind::Enum(v) => v.join("|"),
                ArgKind::Signals => "signals, e.g. TERM,KILL,USR1 or all".into(),
                ArgKind::Path { .. } => "absolute path".into(),
                ArgKind::Amount {
                    max_bytes,
                    max_percent,
                } => format!(
                    "size up to {} or percentage up to {max_percent}%",
                    format_size(*max_bytes)
                ),
                ArgKind::Names { max_count, max_len } => {
                    format!("up to {max_count} comma-separated names of at most {max_len} bytes")
                }
                ArgKind::Size { min, max } => {
                    format!("size {}..={}", format_size(*min), format_size(*max))
                }
            };
            writeln!(
                out,
                "    --{}=<{kind}>  {} (default {})",
                a.name,
                a.help,
                a.default.unwrap_or("none")
            )?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    if argv
        .get(1)
        .is_some_and(|a| a == toe_agent::tools::faults::ledger::WORKER_ARG)
    {
        // A stress worker TOE started for a fault; never returns.
        toe_agent::tools::faults::worker::main(&argv);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run_cmd(args),
        Command::Validate {
            file,
            config,
            validation,
        } => read_spec(file).and_then(|(name, yaml)| {
            let (tool, warnings) = plan::parse_spec_checked(&name, &yaml, validation.validate)?;
            for w in warnings {
                eprintln!("toe: warning: {w}");
            }
            let v = plan::validate(&name, &tool, config.read()?.as_ref())?;
            for t in std::iter::once(&v.tool).chain(&v.alongside) {
                eprintln!(
                    "{name}: valid: {} for {}{}{}",
                    t.name,
                    format_duration(t.duration),
                    if t.arguments.is_empty() { "" } else { " with " },
                    t.arguments.join(" ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }),
        Command::Tools => tools(&mut std::io::stdout().lock())
            .map(|()| ExitCode::SUCCESS)
            .map_err(Into::into),
        Command::Probe => {
            let caps = toe_agent::node::probe::probe();
            serde_yaml::to_writer(std::io::stdout().lock(), &caps)
                .map(|()| ExitCode::SUCCESS)
                .map_err(Into::into)
        }
        Command::Cleanup => cleanup(),
        Command::Agent(args) => agent(args),
        Command::Tutorial(args) => tutorial(args),
        Command::Report(args) => report(args),
    };
    result.unwrap_or_else(|e| {
        if closed_pipe(&e) {
            // The reader went away (`toe tools | head`): end quietly, as `ls | head` does.
            return ExitCode::SUCCESS;
        }
        eprintln!("toe: error: {e:#}");
        ExitCode::FAILURE
    })
}
