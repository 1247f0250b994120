//! `toe run` as a user meets it: bad input is rejected with a message naming the field or cause
//! and a non-zero exit, before anything is attached; interruptions write partial artifacts; and no
//! eBPF program outlives a run.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use toe_tests::{
    TestProcess, assert_rejected, bin, cpu_spec, demo, loaded_toe_programs, require_root,
};

fn toe(dir: &Path, spec: Option<&str>, args: &[&str]) -> Output {
    let spec_path = dir.join("spec.yaml");
    if let Some(s) = spec {
        std::fs::write(&spec_path, s).unwrap();
    }
    Command::new(bin("toe"))
        .current_dir(dir)
        .args(["run", "--no-progress", "-f"])
        .arg(&spec_path)
        .args(args)
        .output()
        .expect("run toe")
}

/// Every bad input fails before loading anything, so none of these needs root.
#[test]
fn bad_input_is_rejected_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = cpu_spec("2s", &[]);
    let cases: &[(&str, &[&str], &str)] = &[
        ("kind: [unclosed", &["--pid", "1"], "not a valid PowerTool"),
        (
            &good.replace("cpu-profile", "cpu-profiler"),
            &["--pid", "1"],
            "unknown tool \"cpu-profiler\"",
        ),
        (
            &cpu_spec("2s", &["--frequency=0"]),
            &["--pid", "1"],
            "--frequency: 0 is out of range 1..=1000",
        ),
        (
            &cpu_spec("2s", &["--frequency=100000"]),
            &["--pid", "1"],
            "--frequency: 100000 is out of range",
        ),
        (
            &cpu_spec("ten seconds", &[]),
            &["--pid", "1"],
            "spec.tool.duration",
        ),
        (
            &good,
            &["--pid", "4194305"],
            "--pid 4194305: no such process",
        ),
        (&good, &["--pid", "0"], "--pid: 0 is not a process id"),
        (
            &good,
            &["--cgroup", "/sys/fs/cgroup/no-such-cgroup"],
            "no such directory",
        ),
        (
            &good,
            &["--", "no-such-command-xyz"],
            "no-such-command-xyz: command not found",
        ),
    ];
    for (spec, args, want) in cases {
        let out = toe(d, Some(spec), args);
        assert_rejected(&out, want);
    }
    // No target at all: clap names the missing choice.
    assert_rejected(&toe(d, Some(&good), &[]), "--pid <PID>");
    // Missing spec file.
    let out = Command::new(bin("toe"))
        .args(["run", "-f", "/nonexistent.yaml", "--pid", "1"])
        .output()
        .unwrap();
    assert_rejected(&out, "/nonexistent.yaml: cannot read");
    // Nothing was written for any rejected run.
    assert!(
        !d.join("toe-output").exists(),
        "a rejected run left output behind"
    );
}

/// A misspelled field is an error naming the closest known one, not a silently dropped setting;
/// `--validate=warn` makes it a warning. Run and validate agree.
#[test]
fn a_misspelled_field_is_refused_with_the_field_it_meant() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let typo =
        cpu_spec("2s", &["--frequency=199"]).replace("commandLineArguments", "comandLineArguments");
    let out = toe(d, Some(&typo), &["--pid", "1"]);
    assert_rejected(
        &out,
        "unknown field spec.tool.comandLineArguments (did you mean commandLineArguments?)",
    );
    let validate = |extra: &[&str]| {
        Command::new(bin("toe"))
            .args(["validate", "-f"])
            .arg(d.join("spec.yaml"))
            .args(extra)
            .output()
            .unwrap()
    };
    assert_rejected(&validate(&[]), "did you mean commandLineArguments?");
    let warned = validate(&["--validate=warn"]);
    let err = String::from_utf8_lossy(&warned.stderr);
    assert!(warned.status.success(), "{err}");
    assert!(err.contains("warning") && err.contains("ignored"), "{err}");
}

/// `toe validate` says what will run in the words `toe tools` uses, every default included.
#[test]
fn validate_prints_the_run_in_the_tools_own_words() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.yaml");
    std::fs::write(&spec, cpu_spec("2s", &["--frequency=199"])).unwrap();
    let out = Command::new(bin("toe"))
        .args(["validate", "-f"])
        .arg(&spec)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(
            "valid: cpu-profile for 2s with --frequency=199 --jit-names=ask --kernel-stacks=true \
             --unwind=tables --user-stacks=true"
        ),
        "{err}"
    );
    assert!(!err.contains("Options {"), "a debug struct: {err}");
}

/// Every command ends quietly when the reader of its output goes away, as `ls | head` does.
#[test]
fn a_closed_output_pipe_ends_quietly() {
    let mut child = Command::new(bin("toe"))
        .arg("tools")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before toe writes: every write meets a closed pipe.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(!err.contains("panicked") && err.is_empty(), "{err}");
}

/// `toe report` over a source that is not there, or holds no run, is an error, not an empty
/// report.
#[test]
fn a_report_over_nothing_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let report = |source: &Path| {
        Command::new(bin("toe"))
            .current_dir(dir.path())
            .arg("report")
            .arg(source)
            .output()
            .unwrap()
    };
    assert_rejected(&report(&dir.path().join("missing")), "no such directory");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_rejected(&report(&empty), "holds no run");
    assert!(
        !dir.path().join("toe-output").exists(),
        "a report was written"
    );
}

/// As an unprivileged user, the run fails with one clear line and the command is never started.
#[test]
fn without_root_the_error_says_so() {
    if !require_root("without_root_the_error_says_so (needs root to drop to nobody)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("spec.yaml"), cpu_spec("2s", &[])).unwrap();
    nix::unistd::chown(dir.path(), Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let marker = dir.path().join("ran");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin("toe"))
        .current_dir(dir.path())
        .args(["run", "--no-progress", "-f", "spec.yaml", "--", "touch"])
        .arg(&marker)
        .output()
        .unwrap();
    assert_rejected(&out, "needs root");
    assert!(!marker.exists(), "the command ran although the run failed");
}

fn wait_for_programs(present: bool) -> Vec<String> {
    for _ in 0..100 {
        let p = loaded_toe_programs();
        if p.is_empty() != present {
            return p;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    loaded_toe_programs()
}

/// One test, so no other test in this binary loads programs while it checks that none remain.
#[test]
fn interruption_writes_partial_artifacts_and_nothing_stays_attached() {
    if !require_root("interruption_writes_partial_artifacts_and_nothing_stays_attached") {
        return;
    }
    let before = loaded_toe_programs();
    assert!(
        before.is_empty(),
        "TOE programs loaded before the test: {before:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("spec.yaml"),
        cpu_spec("60s", &["--frequency=199"]),
    )
    .unwrap();
    for (signal, code) in [
        (nix::sys::signal::SIGINT, 130),
        (nix::sys::signal::SIGTERM, 143),
    ] {
        let target = demo(&["spin", "60"], None);
        let out_dir = dir.path().join(format!("out-{signal}"));
        let child = Command::new(bin("toe"))
            .args(["run", "--no-progress", "--json", "-f"])
            .arg(dir.path().join("spec.yaml"))
            .args(["--pid", &target.pid().to_string(), "-o"])
            .arg(&out_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let toe_proc = TestProcess(child);
        assert!(!wait_for_programs(true).is_empty(), "toe never attached");
        std::thread::sleep(Duration::from_millis(1500));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(toe_proc.pid()).unwrap()),
            signal,
        )
        .unwrap();
        let mut toe_proc = toe_proc;
        let status = toe_proc.0.wait().unwrap();
        let mut stdout = String::new();
        std::io::Read::read_to_string(toe_proc.0.stdout.as_mut().unwrap(), &mut stdout).unwrap();
        assert_eq!(status.code(), Some(code), "{signal}: exit status");
        let summary: serde_json::Value =
            serde_json::from_str(&stdout).expect("summary JSON on stdout");
        assert_eq!(summary["complete"], false);
        assert!(summary["ended"].as_str().unwrap().contains(signal.as_str()));
        assert!(summary["cpu"]["samples"]["recorded"].as_u64().unwrap() > 0);
        let run_dir = std::fs::read_dir(&out_dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        for f in [
            "flamegraph.svg",
            "cpu.pb.gz",
            "stacks.folded",
            "summary.json",
        ] {
            assert!(run_dir.join(f).is_file(), "{signal}: {f} missing");
        }
        assert!(
            wait_for_programs(false).is_empty(),
            "{signal}: programs left loaded"
        );
        // The target is untouched by the profiler's exit.
        assert!(Path::new(&format!("/proc/{}", target.pid())).exists());
    }
    // A run that fails after loading (the command cannot be executed) detaches too.
    let out = Command::new(bin("toe"))
        .args(["run", "--no-progress", "-f"])
        .arg(dir.path().join("spec.yaml"))
        .args(["--", "/etc/hostname"])
        .output()
        .unwrap();
    assert_rejected(&out, "/etc/hostname");
    assert!(
        wait_for_programs(false).is_empty(),
        "programs left loaded after a failed run"
    );
}

/// `toe report` over recorded runs: the findings on stderr, the report and merged outputs in a
/// timestamped directory; a bad output kind is refused before anything is read.
#[test]
fn report_processes_local_runs_and_refuses_unknown_outputs() {
    let out = tempfile::tempdir().unwrap();
    let fixtures = toe_tests::cluster::repo().join("toe-report/fixtures");
    let run = Command::new(bin("toe"))
        .arg("report")
        .arg(&fixtures)
        .arg("-o")
        .arg(out.path())
        .output()
        .expect("run toe report");
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    for rule in [
        "(rule oom-kill)",
        "(rule sigterm-unhandled)",
        "(rule memory-leak-site)",
    ] {
        assert!(err.contains(rule), "{rule} missing: {err}");
    }
    let dirs: Vec<_> = std::fs::read_dir(out.path()).unwrap().collect();
    assert_eq!(dirs.len(), 1);
    let dir = dirs.into_iter().next().unwrap().unwrap().path();
    for file in [
        "report.html",
        "findings.json",
        "cpu.svg",
        "cpu.pb.gz",
        "inuse.svg",
    ] {
        assert!(
            dir.join(file).is_file(),
            "{file} missing in {}",
            dir.display()
        );
    }
    let bad = Command::new(bin("toe"))
        .args(["report", "--outputs", "pdfReport"])
        .arg(&fixtures)
        .output()
        .expect("run toe report");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("unknown output \"pdfReport\""), "{err}");
}
