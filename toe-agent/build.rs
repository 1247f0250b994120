//! Builds toe-ebpf for the BPF target with the nightly toolchain and build-std, so a plain
//! `cargo build` picks up every change in the eBPF sources.

use std::{env, path::PathBuf};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    // The toolchain bootstrap (`cargo xtask bootstrap`) installs bpf-linker here so it never
    // collides with a system copy built against another LLVM.
    println!("cargo:rerun-if-env-changed=PATH");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    if let Some(home) = env::var_os("HOME") {
        let cached = PathBuf::from(home).join(".cache/toe/tools/bin");
        if !dirs.contains(&cached) {
            dirs.insert(0, cached);
        }
    }
    if !dirs.iter().any(|d| d.join("bpf-linker").is_file()) {
        bail!(
            "bpf-linker not found on PATH or in ~/.cache/toe/tools/bin: run `cargo xtask bootstrap`"
        );
    }
    let joined = env::join_paths(dirs).context("PATH")?;
    // SAFETY: build scripts are single-threaded; the child cargo inherits this PATH.
    unsafe { env::set_var("PATH", joined) };

    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../toe-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "toe-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF object (toe-ebpf) with the nightly toolchain")
}
