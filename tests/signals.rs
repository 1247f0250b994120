//! The signal and lifecycle collector against real processes: a named bystander signalling a
//! target that handles SIGTERM (a hung graceful shutdown), a non-target pair, a child forked
//! during the run, an OOM kill in a v1 memory cgroup, a 100k-signal burst, and bad input.
//!
//! Each target is a command TOE starts: it is held until every program is attached, and writes
//! its pid to a file when it runs, so the test knows when sending is observed.

use std::{
    path::Path,
    process::{Command, Stdio},
    thread,
};

use serde_json::Value;
use toe_agent::{run::Outcome, sink::MemorySink, targets::TargetSpec};
use toe_common::stacks::is_entry_frame;
use toe_tests::{
    TestCgroup, assert_rejected, bin, demo, profile, require_root, toe_run, tool_spec,
    wait_for_pid_file, wait_for_signal_target, workload,
};

const SIGUSR1: i32 = 10;
const SIGUSR2: i32 = 12;
const SIGTERM: i32 = 15;
const SIGKILL: i32 = 9;

/// Sends `sig` to `pid` `count` times from a process named `name`; returns (sender pid, sent).
fn send(name: &str, pid: u32, sig: i32, count: u64) -> (u32, u64) {
    let child = Command::new(bin("toe-demo"))
        .args([
            "send",
            name,
            &pid.to_string(),
            &sig.to_string(),
            &count.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start sender");
    let sender = child.id();
    let out = child.wait_with_output().expect("sender output");
    let sent = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("count");
    (sender, sent)
}

/// Runs signal-trace on `argv` (a command TOE starts) in the background.
fn trace(args: &[&str], argv: Vec<String>) -> thread::JoinHandle<(Outcome, MemorySink)> {
    let spec = tool_spec("signal-trace", "60s", args);
    thread::spawn(move || {
        profile(
            &spec,
            TargetSpec::Command(argv.into_iter().map(Into::into).collect()),
        )
    })
}

fn trap_command(ready: &Path, fork: Option<&Path>) -> Vec<String> {
    let mut v = vec![
        bin("toe-demo").display().to_string(),
        "trap".into(),
        "60".into(),
        ready.display().to_string(),
    ];
    if let Some(f) = fork {
        v.extend(["300".into(), f.display().to_string()]);
    }
    v
}

fn events(sink: &MemorySink) -> Vec<Value> {
    let map = sink.artifacts.lock().unwrap();
    std::str::from_utf8(&map["events.jsonl"])
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn signals_to(ev: &[Value], pid: u32, signal: &str) -> Vec<Value> {
    ev.iter()
        .filter(|e| e["event"] == "signal" && e["pid"] == pid && e["signal"] == signal)
        .cloned()
        .collect()
}

/// A sender built without frame pointers (`main` -> `send_all` -> `send_one` -> glibc's `kill`):
/// its user stack is unwound from the binary's and glibc's tables, through every one of its
/// frames, to the program's entry. By frame pointers it is `kill` alone.
#[test]
fn a_senders_stack_without_frame_pointers_reaches_its_main() {
    if !require_root("a_senders_stack_without_frame_pointers_reaches_its_main") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let run = trace(&[], trap_command(&ready, None));
    let target = wait_for_pid_file(&ready);
    let out = Command::new(workload("sender-c"))
        .args([&target.to_string(), &SIGUSR1.to_string(), "3"])
        .output()
        .expect("start sender-c");
    assert!(out.status.success(), "{out:?}");
    let _ = send("bystander", target, SIGKILL, 1);
    let (outcome, sink) = run.join().unwrap();
    let got = signals_to(&events(&sink), target, "SIGUSR1");
    assert_eq!(got.len(), 3, "{got:?}");
    // What the run says of its sender stacks, for a failure to name the cause.
    let accounting = {
        let map = sink.artifacts.lock().unwrap();
        let s: Value = serde_json::from_slice(&map["summary.json"]).unwrap_or_default();
        format!(
            "sender stacks {}; warnings {}",
            s["signals"]["unwind"], s["warnings"]
        )
    };
    for e in &got {
        assert_eq!(e["sender"]["comm"], "sender-c", "{e}");
        let user: Vec<&str> = e["user_stack"]
            .as_array()
            .expect("user_stack")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let at = |f: &str| user.iter().position(|u| u.split(' ').next() == Some(f));
        let (Some(one), Some(all), Some(main)) = (at("send_one"), at("send_all"), at("main"))
        else {
            panic!("sender frames missing: {user:?}; {accounting}");
        };
        // Leaf first, and nothing skipped between the program's own frames.
        assert_eq!((all - one, main - all), (1, 1), "{user:?}");
        assert!(
            user.iter().rev().take(3).any(|f| is_entry_frame(f)),
            "does not reach the entry: {user:?}"
        );
    }
    let unwind = &outcome.summary.signals.as_ref().unwrap().unwind;
    assert!(unwind.tables >= 3, "{unwind:?}");
    assert_eq!(unwind.copy_errors + unwind.copies_lost, 0, "{unwind:?}");
}

#[test]
fn a_named_bystanders_signals_are_recorded_and_sigkill_is_the_exit_cause() {
    if !require_root("a_named_bystanders_signals_are_recorded_and_sigkill_is_the_exit_cause") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let run = trace(&[], trap_command(&ready, None));
    let target = wait_for_pid_file(&ready);
    // Two processes that are not targets: one signals the other.
    let other = demo(
        &[
            "trap",
            "60",
            &dir.path().join("other").display().to_string(),
        ],
        None,
    );
    let _ = wait_for_pid_file(&dir.path().join("other"));
    let (outsider, _) = send("outsider", other.pid(), SIGUSR1, 5);
    let (usr1_from, _) = send("bystander", target, SIGUSR1, 3);
    let (term_from, _) = send("bystander", target, SIGTERM, 1);
    thread::sleep(std::time::Duration::from_millis(300));
    let (kill_from, _) = send("bystander", target, SIGKILL, 1);
    let (outcome, sink) = run.join().unwrap();
    let ev = events(&sink);

    for (signal, from, n) in [
        ("SIGUSR1", usr1_from, 3),
        ("SIGTERM", term_from, 1),
        ("SIGKILL", kill_from, 1),
    ] {
        let got = signals_to(&ev, target, signal);
        assert_eq!(got.len(), n, "{signal}: {got:?}");
        for e in got {
            assert_eq!(e["sender"]["pid"], from, "{e}");
            assert_eq!(e["sender"]["comm"], "bystander", "{e}");
            assert_eq!(e["tid"], target, "{e}");
            assert_eq!(e["comm"], "toe-demo", "{e}");
            assert_eq!(e["code"], "SI_USER", "{e}");
            // The sender's kernel stack shows the kill(2) path.
            let k = e["kernel_stack"].to_string();
            assert!(k.contains("kill"), "{k}");
        }
    }
    assert!(
        ev.iter()
            .all(|e| e["pid"] != other.pid() && e["sender"]["pid"] != outsider),
        "a non-target pair leaked into the events"
    );
    // The target handled SIGTERM itself (a handler, not a default action).
    assert!(ev.iter().any(|e| e["event"] == "delivery"
        && e["pid"] == target
        && e["signal"] == "SIGTERM"
        && e["action"] == "handler"));
    let s = outcome.summary.signals.as_ref().expect("signals section");
    let end = s
        .processes
        .iter()
        .find(|p| p.pid == target)
        .expect("target ending");
    assert_eq!(end.how, "killed", "{end:?}");
    assert_eq!(end.signal.as_deref(), Some("SIGKILL"), "{end:?}");
    assert_eq!(
        end.sent_by.as_ref().map(|a| a.pid),
        Some(kill_from),
        "{end:?}"
    );
    assert!(end.sigkill_followed_sigterm, "{end:?}");
    assert!(
        end.after_first_sigterm_ms.is_some_and(|ms| ms >= 300.0),
        "{end:?}"
    );
    assert_eq!(s.lost_total, 0);
    let art = sink.artifacts.lock().unwrap();
    let svg = std::str::from_utf8(&art["timeline.svg"]).unwrap();
    assert!(
        svg.contains("SIGKILL from bystander"),
        "timeline lacks the SIGKILL: {:?}",
        svg.split("<title>").skip(1).collect::<Vec<_>>()
    );
    assert!(art.contains_key("summary.json"));
}

#[test]
fn signal_and_sender_filters_apply_in_the_kernel_and_are_counted() {
    if !require_root("signal_and_sender_filters_apply_in_the_kernel_and_are_counted") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let run = trace(
        &["--signals=TERM,KILL", "--senders=chosen"],
        trap_command(&ready, None),
    );
    let target = wait_for_pid_file(&ready);
    send("chosen", target, SIGUSR1, 2); // signal not of interest
    send("other", target, SIGTERM, 3); // sender not of interest
    let (from, _) = send("chosen", target, SIGTERM, 1);
    send("chosen", target, SIGKILL, 1);
    let (outcome, sink) = run.join().unwrap();
    let ev = events(&sink);
    let signals: Vec<&Value> = ev.iter().filter(|e| e["event"] == "signal").collect();
    assert_eq!(signals.len(), 2, "{signals:?}");
    assert!(signals.iter().all(|e| e["sender"]["comm"] == "chosen"));
    assert_eq!(signals_to(&ev, target, "SIGTERM")[0]["sender"]["pid"], from);
    let s = outcome.summary.signals.as_ref().unwrap();
    // Generated: 2 USR1 (signal not wanted) and 3 TERM (sender not wanted); delivered: the USR1
    // the handler took (one or two: two USR1 pending at once merge into one delivery).
    assert!((6..=7).contains(&s.filtered), "{s:?}");
}

#[test]
fn a_child_forked_after_the_start_is_covered() {
    if !require_root("a_child_forked_after_the_start_is_covered") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let child_file = dir.path().join("child");
    let run = trace(&[], trap_command(&ready, Some(&child_file)));
    let parent = wait_for_pid_file(&ready);
    let child = wait_for_pid_file(&child_file);
    let (from, _) = send("bystander", child, SIGUSR2, 2);
    send("bystander", child, SIGKILL, 1);
    send("bystander", parent, SIGKILL, 1);
    let (outcome, sink) = run.join().unwrap();
    let ev = events(&sink);
    assert!(
        ev.iter()
            .any(|e| e["event"] == "fork" && e["pid"] == parent && e["child"]["pid"] == child),
        "no fork event for {child}"
    );
    let usr2 = signals_to(&ev, child, "SIGUSR2");
    assert_eq!(usr2.len(), 2, "{usr2:?}");
    assert!(usr2.iter().all(|e| e["sender"]["pid"] == from));
    let s = outcome.summary.signals.as_ref().unwrap();
    let end = s
        .processes
        .iter()
        .find(|p| p.pid == child)
        .expect("child ending");
    assert_eq!(end.signal.as_deref(), Some("SIGKILL"), "{end:?}");
}

#[test]
fn tasks_moved_into_and_out_of_a_target_cgroup_join_and_leave() {
    if !require_root("tasks_moved_into_and_out_of_a_target_cgroup_join_and_leave") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cg = TestCgroup::new("moves");
    let file = |n: &str| dir.path().join(n).display().to_string();
    let resident = demo(&["trap", "60", &file("resident")], Some(&cg));
    let newcomer = demo(&["trap", "60", &file("newcomer")], None);
    let _ = wait_for_pid_file(&dir.path().join("resident"));
    let _ = wait_for_pid_file(&dir.path().join("newcomer"));
    let spec = tool_spec("signal-trace", "3s", &[]);
    let path = cg.path().to_owned();
    let run = thread::spawn(move || profile(&spec, TargetSpec::Cgroup(path)));
    wait_for_signal_target(resident.pid());
    // In: the newcomer becomes a target; out: the resident stops being one.
    std::fs::write(cg.path().join("cgroup.procs"), newcomer.pid().to_string()).unwrap();
    let root = cg.path().parent().unwrap().join("cgroup.procs");
    send("bystander", newcomer.pid(), SIGUSR1, 1);
    send("bystander", resident.pid(), SIGUSR1, 1);
    std::fs::write(&root, resident.pid().to_string()).unwrap();
    send("bystander", resident.pid(), SIGUSR2, 1);
    let (_, sink) = run.join().unwrap();
    let ev = events(&sink);
    let about = |event: &str, pid: u32| ev.iter().any(|e| e["event"] == event && e["tid"] == pid);
    assert!(about("joined", newcomer.pid()), "{ev:?}");
    assert!(about("left", resident.pid()), "{ev:?}");
    assert_eq!(
        signals_to(&ev, newcomer.pid(), "SIGUSR1").len(),
        1,
        "{ev:?}"
    );
    assert_eq!(
        signals_to(&ev, resident.pid(), "SIGUSR1").len(),
        1,
        "{ev:?}"
    );
    assert!(
        signals_to(&ev, resident.pid(), "SIGUSR2").is_empty(),
        "{ev:?}"
    );
    std::fs::write(&root, newcomer.pid().to_string()).ok();
}

#[test]
fn a_burst_of_100k_signals_is_recorded_or_counted_as_lost_exactly() {
    if !require_root("a_burst_of_100k_signals_is_recorded_or_counted_as_lost_exactly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    // The smallest ring, so the burst outruns the reader and the loss path is exercised too.
    let run = trace(&["--ring-size=64KiB"], trap_command(&ready, None));
    let target = wait_for_pid_file(&ready);
    let (from, sent) = send("burster", target, SIGUSR1, 100_000);
    assert_eq!(sent, 100_000);
    send("bystander", target, SIGKILL, 1);
    let (outcome, sink) = run.join().unwrap();
    let ev = events(&sink);
    let recorded = ev
        .iter()
        .filter(|e| e["event"] == "signal" && e["sender"]["pid"] == from)
        .count() as u64;
    let s = outcome.summary.signals.as_ref().unwrap();
    let acct = s.events.iter().find(|k| k.event == "signal").unwrap();
    // One more signal (the SIGKILL) went to the target; nothing else signalled it.
    assert_eq!(acct.emitted, sent + 1, "{acct:?}");
    assert_eq!(acct.recorded + acct.lost, acct.emitted, "{acct:?}");
    let kill_recorded = u64::from(!signals_to(&ev, target, "SIGKILL").is_empty());
    assert_eq!(recorded + kill_recorded + acct.lost, sent + 1, "{acct:?}");
    // Losses beyond --max-lost (0) fail the run loudly, after writing what was recorded.
    assert_eq!(s.lost_total > 0, outcome.summary.failed.is_some());
    assert_eq!(s.lost_total > 0, outcome.exit_code == 3);
}

#[test]
fn an_oom_kill_in_a_memory_cgroup_is_recorded() {
    let test = "an_oom_kill_in_a_memory_cgroup_is_recorded";
    if !require_root(test) {
        return;
    }
    let Some(cg) = TestCgroup::with_memory_limit("oom", 64 << 20) else {
        toe_tests::skip(
            test,
            "no memory controller: neither a v1 memory hierarchy nor a v2 tree offering one",
        );
        return;
    };
    // The shell joins the limited cgroup, then becomes the demo, which touches 256 MiB.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {} touch 256 5",
        cg.path().display(),
        bin("toe-demo").display()
    );
    let run = trace(&[], vec!["/bin/sh".into(), "-c".into(), script]);
    let (outcome, sink) = run.join().unwrap();
    let ev = events(&sink);
    let oom: Vec<&Value> = ev.iter().filter(|e| e["event"] == "oom_kill").collect();
    assert!(!oom.is_empty(), "no OOM kill recorded: {ev:?}");
    let victim = oom[0]["tid"].as_u64().unwrap();
    assert_eq!(oom[0]["victim_comm"], "toe-demo", "{:?}", oom[0]);
    assert!(oom[0]["anon_rss_kib"].as_u64().unwrap() > 0);
    let s = outcome.summary.signals.as_ref().unwrap();
    let end = s
        .processes
        .iter()
        .find(|p| u64::from(p.pid) == victim)
        .expect("victim's ending");
    assert_eq!(end.oom_killed, Some(true), "{end:?}");
    assert_eq!(end.signal.as_deref(), Some("SIGKILL"), "{end:?}");
    assert!(end.explanation.contains("oom-killer"), "{end:?}");
}

#[test]
fn bad_signal_input_is_rejected_clearly() {
    let dir = tempfile::tempdir().unwrap();
    for (args, target, want) in [
        (
            &["--signals=TERM,SIGFOO"][..],
            &["--pid", "1"][..],
            "\"SIGFOO\" is not a signal",
        ),
        (&["--signals=99"], &["--pid", "1"], "out of range 1..=64"),
        (
            &["--senders=a;rm -rf"],
            &["--pid", "1"],
            "names may use letters",
        ),
        (&["--max-lost=-1"], &["--pid", "1"], "out of range"),
    ] {
        let out = toe_run(dir.path(), &tool_spec("signal-trace", "2s", args), target);
        assert_rejected(&out, want);
    }
}

#[test]
fn an_empty_cgroup_target_is_rejected_before_attaching() {
    if !require_root("an_empty_cgroup_target_is_rejected_before_attaching") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cg = TestCgroup::new("empty");
    let out = toe_run(
        dir.path(),
        &tool_spec("signal-trace", "2s", &[]),
        &["--cgroup", &cg.path().display().to_string()],
    );
    assert_rejected(&out, "has no processes");
}
