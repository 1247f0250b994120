//! `toe tutorial`: "Hello PowerTool", a walkthrough on one machine. Each step explains what it is
//! about to do, shows the exact command, runs it for real (this same `toe` binary, as a user
//! would type it), and checks the result from the artifacts it wrote. Nothing is simulated: the
//! profiles, the refused argument, the SIGTERM and the leak are real.

use std::{
    io::{BufRead, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// How the walkthrough talks to its user.
pub struct Options {
    /// Wait for Enter before each step (q quits, s skips).
    pub interactive: bool,
    /// Where the specs, configs and artifacts go.
    pub workdir: PathBuf,
    /// The demo workload (`toe-demo`).
    pub demo: PathBuf,
    /// This `toe` binary.
    pub toe: PathBuf,
}

/// The outcome of a whole walkthrough.
#[derive(Debug, Default)]
pub struct Outcome {
    pub passed: Vec<&'static str>,
    pub failed: Vec<(&'static str, String)>,
    pub skipped: Vec<&'static str>,
    pub quit: bool,
}

struct Step {
    title: &'static str,
    explain: &'static str,
    run: fn(&mut Ctx) -> Result<String, String>,
}

struct Ctx<'a> {
    opts: &'a Options,
    out: &'a mut dyn Write,
    /// Run directories written so far (the report step reads them).
    runs: Vec<PathBuf>,
}

/// A PowerTool spec for one machine, as the walkthrough writes and shows it.
fn powertool(name: &str, tool: &str, duration: &str, args: &[&str]) -> String {
    let mut spec = format!(
        "apiVersion: toe.run/v1alpha1\nkind: PowerTool\nmetadata:\n  name: {name}\nspec:\n  tool:\n    \
         name: {tool}\n    duration: {duration}\n    commandLineArguments:\n"
    );
    spec.extend(args.iter().map(|arg| format!("      - {arg}\n")));
    spec
}

fn cpu_spec() -> String {
    powertool("hello-cpu", "cpu-profile", "5s", &["--frequency=99"])
}

const CONFIG: &str = "\
# What an administrator allows: cpu-profile, at most 199 Hz, at most 10 minutes.
apiVersion: toe.run/v1alpha1
kind: PowerToolConfig
metadata:
  name: cpu-profile
spec:
  tool: cpu-profile
  maxDuration: 10m
  arguments:
    - {name: frequency, type: integer, min: 1, max: 199}
";

const STEPS: [Step; 6] = [
    Step {
        title: "What a PowerTool is",
        explain: "\
A PowerTool is a short, declared deep-dive: which tool, for how long, with which typed
arguments. In a cluster it also selects pods and containers; on one machine you point it at a
process, a cgroup or a command. Here is the one the next step runs; `toe validate` checks it
without running anything.",
        run: step_validate,
    },
    Step {
        title: "Profile the demo workload",
        explain: "\
`toe-demo spin` spends 70% of its CPU in `hot_loop`. TOE samples its stacks 99 times a
second with an eBPF program that the kernel runs only for this process (filtered by cgroup
and pid in the kernel), then writes a flamegraph, pprof and a summary that counts every lost
sample.",
        run: step_profile,
    },
    Step {
        title: "A forbidden argument is refused, and why",
        explain: "\
An administrator's PowerToolConfig says which tools and arguments may run, within which caps.
A PowerTool asking for 999 Hz under a config that allows 199 Hz is refused before anything is
attached, with a message that names the argument and the rule.",
        run: step_refused,
    },
    Step {
        title: "Trace signals while a SIGTERM fault hits a process",
        explain: "\
The terminate fault sends SIGTERM to the target's main process and SIGKILL after the grace
period. `toe-demo trap` catches SIGTERM and carries on, like a server with a hung shutdown. TOE
traces every signal and exit while it works, so the summary says who sent what, and how the
process ended.",
        run: step_terminate,
    },
    Step {
        title: "Find a planted leak",
        explain: "\
`toe-demo leak` leaks 20000 blocks of 1 KiB at one call site while another thread allocates
and frees in balance. The memory profile follows every malloc and free (uprobes on glibc,
only in this process) and reports what is still in use, by call site.",
        run: step_leak,
    },
    Step {
        title: "Read the HTML report",
        explain: "\
`toe report` turns runs into findings (root-cause rules with their evidence), merged
flamegraphs and one self-contained HTML page: what a PowerToolProcessing produces in a cluster
on a schedule.",
        run: step_report,
    },
];

fn write_file(ctx: &Ctx, name: &str, text: &str) -> Result<PathBuf, String> {
    let path = ctx.opts.workdir.join(name);
    std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

/// Shows `args` as the command a user would type (the work directory as `$WORK`) and returns
/// it, ready to run.
fn toe_command(ctx: &mut Ctx, args: &[&str]) -> Command {
    let dir = ctx.opts.workdir.to_string_lossy();
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.replace(dir.as_ref(), "$WORK"))
        .collect();
    let _ = writeln!(ctx.out, "  $ toe {}", shown.join(" "));
    let _ = ctx.out.flush();
    let mut command = Command::new(&ctx.opts.toe);
    command.args(args).stdin(Stdio::null());
    command
}

/// Shows and runs `toe args`; TOE's messages (stderr) pass through, stdout (a target command's
/// own output) is kept off the walkthrough's screen.
fn toe(ctx: &mut Ctx, args: &[&str]) -> Result<std::process::ExitStatus, String> {
    let out = toe_command(ctx, args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("starting {}: {e}", ctx.opts.toe.display()))?;
    Ok(out.status)
}

/// `toe run` of `spec` (written to `file` in the work directory) against `target` (`--pid N`
/// or `-- CMD...`), then its run directory (named `<tool>-<time>`) and summary; the run is kept
/// for the report step.
fn run_tool(
    ctx: &mut Ctx,
    file: &str,
    spec: &str,
    tool: &str,
    target: &[&str],
) -> Result<(PathBuf, serde_json::Value), String> {
    let spec = write_file(ctx, file, spec)?;
    let out = output_dir(ctx);
    let (spec_arg, out_arg) = (spec.to_string_lossy(), out.to_string_lossy());
    let mut args = vec!["run", "-f", &spec_arg, "--no-progress", "-o", &out_arg];
    args.extend_from_slice(target);
    let status = toe(ctx, &args)?;
    if !status.success() {
        return Err(format!("toe run failed ({status})"));
    }
    let (run, summary) = latest_run(&out, &format!("{tool}-"))?;
    ctx.runs.push(run.clone());
    Ok((run, summary))
}

/// The newest entry of `dir` whose name starts with `prefix` (names end in their time, so the
/// greatest is the newest).
fn newest(dir: &Path, prefix: &str) -> Result<PathBuf, String> {
    std::fs::read_dir(dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .max()
        .ok_or_else(|| format!("nothing named {prefix}* in {}", dir.display()))
}

/// The newest run directory under `out` whose name starts with `prefix`, with its summary.
fn latest_run(out: &Path, prefix: &str) -> Result<(PathBuf, serde_json::Value), String> {
    let run = newest(out, prefix)?;
    let text = std::fs::read_to_string(run.join("summary.json"))
        .map_err(|e| format!("{}: {e}", run.join("summary.json").display()))?;
    let summary = serde_json::from_str(&text).map_err(|e| format!("summary.json: {e}"))?;
    Ok((run, summary))
}

fn output_dir(ctx: &Ctx) -> PathBuf {
    ctx.opts.workdir.join("toe-output")
}

fn step_validate(ctx: &mut Ctx) -> Result<String, String> {
    let text = cpu_spec();
    let spec = write_file(ctx, "hello-cpu.yaml", &text)?;
    for line in text.lines() {
        let _ = writeln!(ctx.out, "    {line}");
    }
    let status = toe(ctx, &["validate", "-f", &spec.to_string_lossy()])?;
    if !status.success() {
        return Err(format!("toe validate refused the example ({status})"));
    }
    Ok("the spec is valid: tool cpu-profile, 5 s, --frequency=99".to_owned())
}

fn step_profile(ctx: &mut Ctx) -> Result<String, String> {
    let demo = ctx.opts.demo.to_string_lossy().into_owned();
    let (run, summary) = run_tool(
        ctx,
        "hello-cpu.yaml",
        &cpu_spec(),
        "cpu-profile",
        &["--", &demo, "spin", "4"],
    )?;
    let samples = summary["cpu"]["samples"]["recorded"].as_u64().unwrap_or(0);
    if samples < 50 {
        return Err(format!("only {samples} samples recorded"));
    }
    // `hot_loop` holds 70% of the demo's CPU by construction (split by the thread's own CPU
    // clock), so its inclusive share is the number to check. Self time is not: it lands on
    // whichever frame the symbolizer names for the loop's instructions (`mix`, or an inlined
    // `wrapping_mul`), which varies between builds.
    let path = run.join(toe_artifacts::names::CPU_FOLDED.file);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let folded = toe_artifacts::folded::Folded::parse(&text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let hot = folded.count_matching(|f| f == "toe_demo::hot_loop");
    #[allow(clippy::cast_precision_loss)] // sample counts are far below 2^52
    let share = hot as f64 / folded.total().max(1) as f64;
    // 99 Hz for 4 s is ~400 samples: the share's standard error is ~2.3 points, so 60-80% is a
    // margin of four of them, and a profile that lost or misplaced stacks falls outside it.
    if !(0.6..=0.8).contains(&share) {
        return Err(format!(
            "toe_demo::hot_loop is on {:.0}% of the stacks, not about 70% as the demo is built",
            share * 100.0
        ));
    }
    let svg = run.join(toe_artifacts::names::CPU_FLAMEGRAPH.file);
    if !svg.is_file() {
        return Err(format!("no flamegraph at {}", svg.display()));
    }
    Ok(format!(
        "{samples} samples; toe_demo::hot_loop is on {:.0}% of them. Open the flamegraph in a browser:\n    {}",
        share * 100.0,
        svg.display()
    ))
}

fn step_refused(ctx: &mut Ctx) -> Result<String, String> {
    let config = write_file(ctx, "config.yaml", CONFIG)?;
    let greedy = powertool("too-greedy", "cpu-profile", "5s", &["--frequency=999"]);
    let spec = write_file(ctx, "too-greedy.yaml", &greedy)?;
    for line in CONFIG.lines() {
        let _ = writeln!(ctx.out, "    {line}");
    }
    let (config, spec) = (config.to_string_lossy(), spec.to_string_lossy());
    // stderr is kept here, not passed through: the refusal it holds is what this step checks.
    let out = toe_command(
        ctx,
        &[
            "run",
            "--config",
            &config,
            "-f",
            &spec,
            "--no-progress",
            "--",
            "true",
        ],
    )
    .output()
    .map_err(|e| format!("starting {}: {e}", ctx.opts.toe.display()))?;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    for line in said.lines() {
        let _ = writeln!(ctx.out, "    {line}");
    }
    if out.status.success() {
        return Err("the 999 Hz PowerTool ran although the config caps it at 199 Hz".to_owned());
    }
    if !said.contains("--frequency") || !said.contains("199") {
        return Err(format!(
            "the refusal does not name the argument and its cap: {said}"
        ));
    }
    Ok("refused before anything was attached, naming --frequency and its maximum".to_owned())
}

/// `toe-demo trap` in the background, once it is ready to be a target.
fn start_trap(ctx: &Ctx) -> Result<Child, String> {
    let ready = ctx.opts.workdir.join("trap.ready");
    let _ = std::fs::remove_file(&ready);
    let child = Command::new(&ctx.opts.demo)
        .arg("trap")
        .arg("60")
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {} trap: {e}", ctx.opts.demo.display()))?;
    let since = Instant::now();
    while !ready.exists() {
        if since.elapsed() > Duration::from_secs(10) {
            return Err("toe-demo trap never became ready".to_owned());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

fn step_terminate(ctx: &mut Ctx) -> Result<String, String> {
    let mut trap = start_trap(ctx)?;
    let pid_number = u64::from(trap.id());
    let pid = pid_number.to_string();
    let result = run_tool(
        ctx,
        "hello-sigterm.yaml",
        &powertool(
            "hello-sigterm",
            "terminate",
            "30s",
            &["--mode=graceful", "--grace=2s"],
        ),
        "terminate",
        &["--pid", &pid],
    );
    // The fault kills it; reap it (and never leave it behind if the step failed).
    let _ = trap.kill();
    let _ = trap.wait();
    let (run, summary) = result?;
    let ended = summary["signals"]["processes"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["pid"].as_u64() == Some(pid_number)))
        .ok_or_else(|| format!("the summary has no ending for pid {pid}"))?;
    if ended["sigkill_followed_sigterm"] != true {
        return Err(format!(
            "expected SIGKILL after the ignored SIGTERM: {ended}"
        ));
    }
    let events = std::fs::read_to_string(run.join("events.jsonl")).unwrap_or_default();
    if !events.contains("SIGTERM") {
        return Err("events.jsonl records no SIGTERM".to_owned());
    }
    Ok(format!(
        "{}\n    timeline: {}",
        ended["explanation"].as_str().unwrap_or(""),
        run.join("timeline.svg").display()
    ))
}

fn step_leak(ctx: &mut Ctx) -> Result<String, String> {
    let demo = ctx.opts.demo.to_string_lossy().into_owned();
    let (run, summary) = run_tool(
        ctx,
        "hello-leak.yaml",
        &powertool(
            "hello-leak",
            "memory-profile",
            "10s",
            &["--mode=exact", "--rss-interval=200ms"],
        ),
        "memory-profile",
        &["--", &demo, "leak", "20000", "1024"],
    )?;
    let top = &summary["memory"]["inuse"]["top_self"][0];
    let function = top["function"].as_str().unwrap_or("");
    let bytes = top["value"].as_u64().unwrap_or(0);
    if !function.contains("leaky_site") {
        return Err(format!(
            "the biggest in-use site is {function:?}, not the planted leaky_site"
        ));
    }
    Ok(format!(
        "{function} holds {} never freed. Flamegraph of what is in use:\n    {}",
        mib(bytes),
        run.join("inuse.svg").display()
    ))
}

#[expect(clippy::cast_precision_loss, reason = "a size shown to one decimal")]
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1_048_576.0)
}

fn step_report(ctx: &mut Ctx) -> Result<String, String> {
    let out = output_dir(ctx);
    let reports = ctx.opts.workdir.join("reports");
    let mut args: Vec<String> = vec![
        "report".into(),
        "-o".into(),
        reports.to_string_lossy().into_owned(),
    ];
    if ctx.runs.is_empty() {
        args.push(out.to_string_lossy().into_owned());
    } else {
        args.extend(ctx.runs.iter().map(|r| r.to_string_lossy().into_owned()));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let status = toe(ctx, &refs)?;
    if !status.success() {
        return Err(format!("toe report failed ({status})"));
    }
    let dir = newest(&reports, "")?;
    let html = dir.join("report.html");
    let text = std::fs::read_to_string(&html).map_err(|e| format!("{}: {e}", html.display()))?;
    if !text.contains("</html>") {
        return Err(format!("{} is not a whole page", html.display()));
    }
    let findings = std::fs::read_to_string(dir.join("findings.json")).unwrap_or_default();
    let mut found = Vec::new();
    for rule in ["dominant-function", "sigterm-unhandled", "memory-leak-site"] {
        if findings.contains(rule) {
            found.push(rule);
        }
    }
    if !ctx.runs.is_empty() && !found.contains(&"dominant-function") {
        return Err(format!(
            "the report does not find the demo's dominant function: {findings}"
        ));
    }
    Ok(format!(
        "findings: {}. Open the report:\n    {}",
        found.join(", "),
        html.display()
    ))
}

/// Runs the walkthrough, writing to `out` and (interactive) reading Enter/s/q from `input`.
pub fn run(opts: &Options, out: &mut dyn Write, input: &mut dyn BufRead) -> Outcome {
    let mut outcome = Outcome::default();
    let mut ctx = Ctx {
        opts,
        out,
        runs: Vec::new(),
    };
    let _ = writeln!(
        ctx.out,
        "Hello PowerTool: {} steps, about two minutes. Files go to {}.",
        STEPS.len(),
        opts.workdir.display()
    );
    for (i, step) in STEPS.iter().enumerate() {
        let _ = writeln!(ctx.out, "\n[{}/{}] {}\n", i + 1, STEPS.len(), step.title);
        let _ = writeln!(ctx.out, "{}\n", step.explain);
        if opts.interactive {
            let _ = write!(ctx.out, "Press Enter to run this step (s: skip, q: quit) ");
            let _ = ctx.out.flush();
            let mut line = String::new();
            if input.read_line(&mut line).unwrap_or(0) == 0 || line.trim() == "q" {
                let _ = writeln!(
                    ctx.out,
                    "\nStopped. Run `toe tutorial` again to start over."
                );
                outcome.quit = true;
                return outcome;
            }
            if line.trim() == "s" {
                let _ = writeln!(ctx.out, "  skipped");
                outcome.skipped.push(step.title);
                continue;
            }
        }
        match (step.run)(&mut ctx) {
            Ok(what) => {
                let _ = writeln!(ctx.out, "  ✓ {what}");
                outcome.passed.push(step.title);
            }
            Err(why) => {
                let _ = writeln!(ctx.out, "  ✗ {why}");
                outcome.failed.push((step.title, why));
            }
        }
    }
    let _ = writeln!(
        ctx.out,
        "\nDone: {} of {} steps passed{}. In a cluster the same PowerTools go through \
         `kubectl apply` (docs/cluster-walkthrough.md).",
        outcome.passed.len(),
        STEPS.len(),
        if outcome.failed.is_empty() {
            String::new()
        } else {
            format!(", {} failed", outcome.failed.len())
        }
    );
    outcome
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_specs_it_writes_are_the_powertools_it_means() {
        let text = super::powertool(
            "hello-sigterm",
            "terminate",
            "30s",
            &["--mode=graceful", "--grace=2s"],
        );
        let (pt, warnings) = crate::plan::parse_spec("hello-sigterm.yaml", &text).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(pt.metadata.name.as_deref(), Some("hello-sigterm"));
        assert_eq!(pt.spec.tool.name, "terminate");
        assert_eq!(pt.spec.tool.duration.as_deref(), Some("30s"));
        assert_eq!(
            pt.spec.tool.command_line_arguments,
            ["--mode=graceful", "--grace=2s"]
        );
    }
}
