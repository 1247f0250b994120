//! `toe run` against a real S3-compatible server (s3s-fs on loopback, checking signatures): every
//! artifact lands in the bucket; a store that will not take a write is refused before anything is
//! attached, with the reason in one line; a store that fails at the end loses nothing.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use toe_tests::{
    TestProcess, bin, cpu_spec, demo, require_root,
    s3::{S3Server, SECRET_KEY},
};

fn toe(dir: &Path, env: &[(String, String)], output: &str, target: u32) -> Command {
    std::fs::write(dir.join("spec.yaml"), cpu_spec("3s", &["--frequency=99"])).unwrap();
    let mut c = Command::new(bin("toe"));
    c.current_dir(dir)
        .env(
            toe_agent::tools::faults::ledger::STATE_DIR_ENV,
            dir.join("state"),
        )
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["run", "--no-progress", "-f", "spec.yaml", "-o", output])
        .args(["--pid", &target.to_string()])
        .stdin(Stdio::null());
    c
}

const ARTIFACTS: [&str; 4] = [
    "cpu.pb.gz",
    "flamegraph.svg",
    "stacks.folded",
    "summary.json",
];

/// The run directory (one) below `prefix` of the bucket, and the names in it.
fn run_files(s3: &S3Server, prefix: &str) -> (PathBuf, Vec<String>) {
    let objects = s3.objects(prefix);
    let dir = objects
        .first()
        .and_then(|p| p.parent())
        .expect("a run directory")
        .to_owned();
    assert!(objects.iter().all(|p| p.parent() == Some(dir.as_path())));
    let names = objects
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    (dir, names)
}

#[test]
fn a_local_run_writes_every_artifact_to_the_bucket() {
    if !require_root("a_local_run_writes_every_artifact_to_the_bucket") {
        return;
    }
    let Some(s3) = S3Server::start("a_local_run_writes_every_artifact_to_the_bucket") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = demo(&["spin", "30"], None);
    let out = toe(
        dir.path(),
        &s3.env(),
        "s3://toe-artifacts/runs",
        target.pid(),
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let (run, names) = run_files(&s3, "runs");
    assert_eq!(names, ARTIFACTS, "{stderr}");
    let summary: serde_json::Value =
        serde_json::from_slice(&s3.read(&run.join("summary.json"))).unwrap();
    assert!(summary["cpu"]["samples"]["recorded"].as_u64().unwrap() > 0);
    // The summary says where each artifact is: in the bucket, not on this machine.
    for (_, url) in summary["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_array().map(|a| (a[0].clone(), a[1].clone())))
    {
        assert!(
            url.as_str()
                .unwrap()
                .starts_with("s3://toe-artifacts/runs/"),
            "{url}"
        );
    }
    assert!(!dir.path().join("state/local-spool").exists());
    assert_eq!(
        s3.metadata_knocks(),
        0,
        "something asked the metadata address"
    );
}

/// Each way a store can refuse, before anything is attached, in one line that says which.
#[test]
fn a_store_that_will_not_take_a_write_is_refused_before_anything_starts() {
    if !require_root("a_store_that_will_not_take_a_write_is_refused_before_anything_starts") {
        return;
    }
    let Some(mut s3) =
        S3Server::start("a_store_that_will_not_take_a_write_is_refused_before_anything_starts")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = demo(&["spin", "60"], None);
    let endpoint = s3.endpoint();
    let refused = |env: &[(String, String)], output: &str| -> String {
        let out: Output = toe(dir.path(), env, output, target.pid()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{stderr}");
        assert!(!stderr.contains("toe: started"), "it started: {stderr}");
        assert!(stderr.contains("nothing was started"), "{stderr}");
        // One line, the store's address named once.
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert_eq!(stderr.matches(&endpoint).count(), 0, "{stderr}");
        stderr
    };
    let wrong_key = refused(
        &s3.env_with_secret(&format!("{SECRET_KEY}-wrong")),
        "s3://toe-artifacts/runs",
    );
    assert!(
        wrong_key.contains("the store refused the credentials")
            && wrong_key.contains("SignatureDoesNotMatch"),
        "{wrong_key}"
    );
    // A missing bucket is not among these: s3s-fs creates a bucket's directory on the first
    // write where S3 answers NoSuchBucket; that answer is explained in toe-artifacts' unit tests.
    s3.stop();
    let down = refused(&s3.env(), "s3://toe-artifacts/runs");
    assert!(
        down.contains("the store's endpoint cannot be reached"),
        "{down}"
    );
    assert!(s3.objects("").is_empty());
    assert!(!dir.path().join("state/local-spool").exists());
    assert_eq!(
        s3.metadata_knocks(),
        0,
        "something asked the metadata address"
    );
}

/// The store goes away while the profile runs: the artifacts are kept on this machine, the run
/// says where and fails, and not one is lost.
#[test]
fn a_store_that_fails_at_the_end_loses_nothing() {
    if !require_root("a_store_that_fails_at_the_end_loses_nothing") {
        return;
    }
    let Some(mut s3) = S3Server::start("a_store_that_fails_at_the_end_loses_nothing") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = demo(&["spin", "30"], None);
    let mut child = toe(
        dir.path(),
        &s3.env(),
        "s3://toe-artifacts/runs",
        target.pid(),
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    assert!(first.starts_with("toe: started on"), "{first}");
    // The write check passed; the store is gone before the first artifact is written.
    s3.stop();
    let child = TestProcess(child);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let mut child = child;
    let status = child.0.wait().unwrap();
    assert!(!status.success(), "{rest}");
    let line = rest
        .lines()
        .find(|l| l.contains("they are kept in"))
        .unwrap_or_else(|| panic!("no word of where the artifacts are: {rest}"));
    assert!(
        line.contains("the store's endpoint cannot be reached"),
        "{line}"
    );
    let kept = PathBuf::from(line.rsplit("they are kept in ").next().unwrap().trim());
    assert!(
        kept.starts_with(dir.path().join("state/local-spool")),
        "{line}"
    );
    let mut names: Vec<String> = std::fs::read_dir(&kept)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ARTIFACTS);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(kept.join("summary.json")).unwrap()).unwrap();
    assert!(summary["cpu"]["samples"]["recorded"].as_u64().unwrap() > 0);
    // The summary names where each artifact really is.
    assert!(
        summary["artifacts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a[1].as_str().unwrap().starts_with("file://")),
        "{summary}"
    );
    assert_eq!(
        s3.metadata_knocks(),
        0,
        "something asked the metadata address"
    );
}
