//! Real Kubernetes binaries for the tests, built once per machine and cached: kube-apiserver
//! (the API server tests), and the rest of a node and control plane for `cargo xtask cluster`
//! (kubelet, kube-controller-manager, kube-scheduler, kube-proxy, a matching kubectl, and the
//! pause container's source).
//!
//! No registry reachable here ships Kubernetes binaries, so they are built from Debian
//! bookworm's `kubernetes` source package (1.20, vendored, builds offline) with Debian's Go.
//! Two vendored libraries crash under Go >= 1.18 on the first custom-object write; they are
//! replaced by the fixed versions Debian packages. etcd is Debian's `etcd-server`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    bootstrap::{cache_dir, installed},
    is_root, run,
};

/// The built binary; the tests find it here (or through `TOE_KUBE_APISERVER`).
#[must_use]
pub fn binary() -> PathBuf {
    bin_dir().join("kube-apiserver")
}

/// Where every built binary is cached.
#[must_use]
pub fn bin_dir() -> PathBuf {
    cache_dir().join("kube/bin")
}

/// What one `make` builds, all from the same tree.
pub const BINARIES: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
];

/// Kubernetes' pause program (the sandbox container of every pod), kept from the source tree.
#[must_use]
pub fn pause_source() -> PathBuf {
    bin_dir().join("pause.c")
}

fn all_built() -> bool {
    BINARIES.iter().all(|b| bin_dir().join(b).exists()) && pause_source().exists()
}

const PACKAGES: &[&str] = &[
    "golang-go",
    "rsync",
    "dpkg-dev",
    "etcd-server",
    "golang-github-modern-go-reflect2-dev",
    "golang-github-json-iterator-go-dev",
];

/// Vendored packages replaced by Debian's fixed sources: (vendor dir, Debian gocode dir).
const REPLACED: &[(&str, &str)] = &[
    (
        "vendor/github.com/modern-go/reflect2",
        "/usr/share/gocode/src/github.com/modern-go/reflect2",
    ),
    (
        "vendor/github.com/json-iterator/go",
        "/usr/share/gocode/src/github.com/json-iterator/go",
    ),
];

/// A `deb-src` entry for the mirror the machine already uses for bookworm.
fn ensure_deb_src() -> Result<()> {
    let list = Path::new("/etc/apt/sources.list.d/toe-deb-src.sources");
    if list.exists() {
        return Ok(());
    }
    let sources = fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .or_else(|_| fs::read_to_string("/etc/apt/sources.list"))
        .unwrap_or_default();
    let mirror = sources
        .lines()
        .find_map(|l| {
            l.strip_prefix("URIs:").map(str::trim).or_else(|| {
                l.strip_prefix("deb ")
                    .and_then(|r| r.split_whitespace().next())
            })
        })
        .filter(|u| !u.contains("security"))
        .unwrap_or("http://deb.debian.org/debian")
        .to_owned();
    fs::write(
        list,
        format!(
            "Types: deb-src\nURIs: {mirror}\nSuites: bookworm\nComponents: main\nSigned-By: \
             /usr/share/keyrings/debian-archive-keyring.gpg\n"
        ),
    )
    .with_context(|| format!("writing {}", list.display()))?;
    run(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update with the deb-src entry failed")
}

/// Builds and caches the binaries unless they are there; installs etcd.
pub fn ensure() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if all_built() && missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the Kubernetes tests need a kube-apiserver built from Debian's source package and \
             the packages {}: run `sudo -E cargo xtask bootstrap --tests`",
            PACKAGES.join(" ")
        );
    }
    if !missing.is_empty() {
        eprintln!("bootstrap: installing {}", missing.join(" "));
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .with_context(|| format!("apt-get install {} failed", missing.join(" ")))?;
    }
    if all_built() {
        return Ok(());
    }
    ensure_deb_src()?;
    let work = cache_dir().join("kube/src");
    // A half-finished earlier attempt is started over: the tree is cheap to unpack again.
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    eprintln!(
        "bootstrap: building Kubernetes 1.20 ({}) from Debian's kubernetes source package (once \
         per machine, 5-9 min; cached in {})",
        BINARIES.join(" "),
        bin_dir().display()
    );
    run(Command::new("apt-get")
        .current_dir(&work)
        .args(["source", "-qq", "kubernetes"]))
    .context("apt-get source kubernetes failed (is the deb-src mirror reachable?)")?;
    let tree = fs::read_dir(&work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir() && p.join("vendor").is_dir())
        .context("apt-get source unpacked no kubernetes tree with vendor/")?;
    for (vendored, fixed) in REPLACED {
        run(Command::new("rsync")
            .args(["-a", "--delete", "--exclude", "*_test.go"])
            .arg(format!("{fixed}/"))
            .arg(tree.join(vendored)))
        .with_context(|| format!("replacing {vendored} with {fixed}"))?;
    }
    let what: Vec<String> = BINARIES.iter().map(|b| format!("cmd/{b}")).collect();
    run(Command::new("nice")
        .current_dir(&tree)
        .args(["-n", "19", "make"])
        .arg(format!("WHAT={}", what.join(" ")))
        .env("CGO_ENABLED", "0")
        .env("GOFLAGS", "-mod=vendor")
        .env("GOPROXY", "off")
        .env("GOCACHE", cache_dir().join("kube/gocache")))
    .context("building Kubernetes failed")?;
    fs::create_dir_all(bin_dir())?;
    for b in BINARIES {
        let built = ["_output/bin", "_output/local/bin/linux/amd64"]
            .iter()
            .map(|d| tree.join(d).join(b))
            .find(|p| p.exists())
            .with_context(|| format!("make finished without a {b} binary"))?;
        let bin = bin_dir().join(b);
        let tmp = bin.with_extension("tmp");
        fs::copy(&built, &tmp)?;
        fs::rename(&tmp, &bin)?;
    }
    fs::copy(tree.join("build/pause/linux/pause.c"), pause_source())
        .context("the source tree has no build/pause/linux/pause.c")?;
    // ~3 GB of sources and objects: only the binaries are kept.
    let _ = fs::remove_dir_all(&work);
    let _ = fs::remove_dir_all(cache_dir().join("kube/gocache"));
    Ok(())
}
