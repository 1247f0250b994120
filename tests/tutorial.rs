//! `toe tutorial`: the whole walkthrough non-interactively (every step runs for real and checks
//! its result), and the interactive path in a real terminal (tmux), answered keystroke by
//! keystroke: run, skip, run, quit.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use toe_tests::{bin, require_root};

#[test]
fn the_tutorial_runs_every_step_for_real_and_checks_it() {
    if !require_root("the_tutorial_runs_every_step_for_real") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("toe"))
        .args(["tutorial", "--non-interactive", "--workdir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tutorial failed:\n{text}\n{err}");
    assert!(text.contains("Done: 6 of 6 steps passed."), "{text}");
    assert_eq!(text.matches("  ✓ ").count(), 6, "{text}");
    assert!(!text.contains("✗"), "{text}");
    // What each step claims, it found in real artifacts.
    assert!(text.contains("toe_demo::hot_loop is on"), "{text}");
    assert!(text.contains("naming --frequency"), "{text}");
    assert!(text.contains("killed by SIGKILL"), "{text}");
    assert!(text.contains("leaky_site holds"), "{text}");
    assert!(
        text.contains("findings: dominant-function, sigterm-unhandled, memory-leak-site"),
        "{text}"
    );
    // Commands are shown as a user would type them, with the work directory abbreviated.
    assert!(text.contains("$ toe run -f $WORK/hello-cpu.yaml"), "{text}");
}

/// The visible text of tmux session `session`.
fn screen(session: &str) -> String {
    let out = Command::new("tmux")
        .args(["capture-pane", "-p", "-S", "-200", "-t", session])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the screen shows `text` `count` times.
fn wait_for(session: &str, text: &str, count: usize) -> String {
    let since = Instant::now();
    loop {
        let s = screen(session);
        if s.matches(text).count() >= count {
            return s;
        }
        assert!(
            since.elapsed() < Duration::from_mins(2),
            "{text:?} (x{count}) never appeared:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn keys(session: &str, keys: &[&str]) {
    let status = Command::new("tmux")
        .args(["send-keys", "-t", session])
        .args(keys)
        .status()
        .unwrap();
    assert!(status.success());
}

struct Session(String);

impl Drop for Session {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .status();
    }
}

#[test]
fn the_interactive_tutorial_waits_for_each_keystroke() {
    if !require_root("the_interactive_tutorial_waits_for_each_keystroke") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let session = Session(format!("toe-tutorial-{}", std::process::id()));
    let command = format!(
        "{} tutorial --workdir {}; echo EXIT=$?; sleep 600",
        bin("toe").display(),
        dir.path().display()
    );
    let status = Command::new("tmux")
        .args([
            "new-session",
            "-d",
            "-x",
            "160",
            "-y",
            "50",
            "-s",
            &session.0,
            &command,
        ])
        .status()
        .expect("tmux (Debian package tmux)");
    assert!(status.success());
    let prompt = "Press Enter to run this step";
    let s = wait_for(&session.0, prompt, 1);
    // Nothing runs before the user says so.
    assert!(
        !Path::new(&dir.path().join("hello-cpu.yaml")).exists(),
        "{s}"
    );
    keys(&session.0, &["Enter"]);
    wait_for(&session.0, "✓ the spec is valid", 1);
    wait_for(&session.0, prompt, 2);
    keys(&session.0, &["s", "Enter"]);
    wait_for(&session.0, "skipped", 1);
    wait_for(&session.0, prompt, 3);
    keys(&session.0, &["Enter"]);
    wait_for(&session.0, "✓ refused before anything was attached", 1);
    wait_for(&session.0, prompt, 4);
    keys(&session.0, &["q", "Enter"]);
    let s = wait_for(&session.0, "EXIT=", 1);
    assert!(s.contains("Stopped. Run `toe tutorial` again"), "{s}");
    assert!(s.contains("EXIT=1"), "quitting early is not success:\n{s}");
    // The skipped profile never ran.
    assert!(!dir.path().join("toe-output").exists(), "{s}");
}
