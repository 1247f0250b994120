//! The release plumbing that cannot run here: the GitHub workflows are checked against
//! GitHub's workflow schema (action-validator) and must run the commands this repository tests
//! (`.ci/run`, `cargo xtask dist --check`); the Containerfile has a target for each image.

use std::{path::PathBuf, process::Command};

use toe_tests::{bootstrapped_tool, cluster::repo};

fn validator() -> Option<PathBuf> {
    bootstrapped_tool(
        "the_workflows_are_valid",
        "TOE_ACTION_VALIDATOR",
        "action-validator/node_modules/.bin/action-validator",
    )
}

#[test]
fn the_workflows_are_valid_and_run_the_tested_commands() {
    let workflows = repo().join(".github/workflows");
    let ci = std::fs::read_to_string(workflows.join("ci.yml")).unwrap();
    let release = std::fs::read_to_string(workflows.join("release.yml")).unwrap();
    assert!(ci.contains("run: bash .ci/run"), "ci.yml must run .ci/run");
    assert!(
        std::fs::read_to_string(repo().join(".ci/run"))
            .unwrap()
            .contains("cargo xtask test"),
        ".ci/run must run the README's test command"
    );
    assert!(
        release.contains("cargo xtask dist --check"),
        "release.yml must build with dist"
    );
    for artifact in [
        "toe-*.tar.gz",
        "toe-*.bpf.o",
        "toe-crds-*.yaml",
        "*.oci.tar",
        "SHA256SUMS",
    ] {
        assert!(
            release.contains(artifact),
            "release.yml does not attach {artifact}"
        );
    }
    let Some(validator) = validator() else {
        return;
    };
    for file in ["ci.yml", "release.yml"] {
        let out = Command::new(&validator)
            .arg(workflows.join(file))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file} fails GitHub's workflow schema:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The validator does refuse a broken workflow (so its success above means something).
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yml");
    std::fs::write(&broken, ci.replace("runs-on:", "runs_on:")).unwrap();
    let out = Command::new(&validator).arg(&broken).output().unwrap();
    assert!(!out.status.success(), "a workflow without runs-on passed");
}

#[test]
fn the_containerfile_builds_both_images_from_scratch() {
    let text = std::fs::read_to_string(repo().join("images/Containerfile")).unwrap();
    assert!(text.contains("FROM scratch AS base"), "{text}");
    for (target, entry) in [
        ("toe-operator", "/usr/local/bin/toe-operator"),
        ("toe-agent", "/usr/local/bin/toe"),
    ] {
        assert!(
            text.contains(&format!("FROM base AS {target}")),
            "no target {target}"
        );
        assert!(
            text.contains(&format!("ENTRYPOINT [\"{entry}\"]")),
            "{target}'s entrypoint"
        );
    }
}
