//! Builds the unwinding workloads (`workloads/`): programs without frame pointers, compiled
//! here rather than by cargo so that the workspace's `force-frame-pointers` does not apply.
//! Their paths reach the tests as `TOE_WORKLOAD_DIR`.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// Where the dwz'd debug files say their supplementary file is: a path no host has, so only
/// the copy inside a test's container can be it.
const DWZ_COMMON: &str = "/usr/lib/debug/.dwz/toe-tests-workloads.debug";

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
        ("workloads/leak.c", "leak-c"),
    ] {
        run(Command::new("gcc")
            .args(["-O2", "-fomit-frame-pointer", "-fno-optimize-sibling-calls"])
            .arg(source)
            .arg("-o")
            .arg(out.join(name)));
    }
    // The same C program as a distribution ships it: static (it runs in a bare container),
    // stripped of every symbol, its symbols and DWARF in a separate debug file that its build-id
    // and debug link name.
    let full = out.join("deep-c-full");
    run(Command::new("gcc")
        .args(["-O2", "-g", "-static", "-fomit-frame-pointer"])
        .args(["-fno-optimize-sibling-calls", "-Wl,--build-id"])
        .arg("workloads/deep.c")
        .arg("-o")
        .arg(&full));
    let debug = out.join("deep-c-split.debug");
    run(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&full)
        .arg(&debug));
    run(Command::new("objcopy")
        .arg("--strip-all")
        .arg(format!("--add-gnu-debuglink={}", debug.display()))
        .arg(&full)
        .arg(out.join("deep-c-split")));
    dwz_workloads(&out);
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
    // The Go workload four times: stripped as Go binaries ship (also position-independent, as
    // distributions build them, once by Go's own linker and once by the system's, as cgo
    // programs are linked), and with symbols to compare names. Offline (GOPROXY=off): it uses
    // the standard library only.
    for (name, flags, mode, cgo) in [
        ("go-hot", "", "exe", "0"),
        ("go-hot-stripped", "-s -w", "exe", "0"),
        ("go-hot-pie-stripped", "-s -w", "pie", "0"),
        (
            "go-hot-pie-external-stripped",
            "-s -w -linkmode=external",
            "pie",
            "1",
        ),
    ] {
        run(Command::new("go")
            .args([
                "build",
                "-trimpath",
                "-buildmode",
                mode,
                "-ldflags",
                flags,
                "-o",
            ])
            .arg(out.join(name))
            .arg("workloads/hot.go")
            .env("GOCACHE", out.join("go-cache"))
            .env("GOPATH", out.join("go-path"))
            .env("GOPROXY", "off")
            .env("CGO_ENABLED", cgo));
    }
    println!("cargo::rustc-env=TOE_WORKLOAD_DIR={}", out.display());
}

/// The C workloads again as Debian and Fedora ship debug files: compressed with dwz, which
/// moves what several programs' DWARF shares (here deep.c's and leak.c's) into one
/// supplementary file that each debug file names by absolute path and build-id in
/// `.gnu_debugaltlink`. The debug link is added after dwz, whose rewrite changes the CRC it
/// carries.
fn dwz_workloads(out: &Path) {
    let mut dwz_debug = Vec::new();
    for (source, name) in [
        ("workloads/deep.c", "deep-c-dwz"),
        ("workloads/leak.c", "leak-c-dwz"),
    ] {
        let full = out.join(format!("{name}-full"));
        run(Command::new("gcc")
            .args(["-O2", "-g", "-static", "-fomit-frame-pointer"])
            .args(["-fno-optimize-sibling-calls", "-Wl,--build-id"])
            .arg(source)
            .arg("-o")
            .arg(&full));
        let debug = out.join(format!("{name}.debug"));
        run(Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(&full)
            .arg(&debug));
        dwz_debug.push((full, debug, out.join(name)));
    }
    let common = out.join("dwz-common.debug");
    assert!(
        Command::new("dwz").arg("--version").output().is_ok(),
        "dwz is not installed: `cargo xtask bootstrap --tests` installs it (Debian package dwz)"
    );
    run(Command::new("dwz")
        .arg("-m")
        .arg(&common)
        .args(["-M", DWZ_COMMON])
        .args(dwz_debug.iter().map(|(_, debug, _)| debug)));
    for (full, debug, stripped) in &dwz_debug {
        run(Command::new("objcopy")
            .arg("--strip-all")
            .arg(format!("--add-gnu-debuglink={}", debug.display()))
            .arg(full)
            .arg(stripped));
    }
    println!("cargo::rustc-env=TOE_DWZ_COMMON={DWZ_COMMON}");
}
