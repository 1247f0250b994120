//! Builds the unwinding workloads (`workloads/`): programs without frame pointers, compiled
//! here rather than by cargo so that the workspace's `force-frame-pointers` does not apply.
//! Their paths reach the tests as `TOE_WORKLOAD_DIR`.

use std::{env, path::PathBuf, process::Command};

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo::rerun-if-changed=workloads");
    for (source, name) in [
        ("workloads/deep.c", "deep-c"),
        ("workloads/sender.c", "sender-c"),
    ] {
        run(Command::new("gcc")
            .args(["-O2", "-fomit-frame-pointer", "-fno-optimize-sibling-calls"])
            .arg(source)
            .arg("-o")
            .arg(out.join(name)));
    }
    run(
        Command::new(env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
            .args([
                "--edition",
                "2024",
                "-C",
                "opt-level=3",
                "-C",
                "force-frame-pointers=no",
            ])
            .arg("workloads/deep.rs")
            .arg("-o")
            .arg(out.join("deep-rust")),
    );
    println!("cargo::rustc-env=TOE_WORKLOAD_DIR={}", out.display());
}
