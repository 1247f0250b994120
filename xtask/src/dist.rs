//! `cargo xtask dist`: every release artifact, built locally into one directory:
//! - `toe-<v>-x86_64-linux-gnu.tar.gz`: `toe` (CLI and node agent), `toe-operator`, `toe-demo`,
//!   the examples, README; portable across glibc 2.36+ Linux x86_64 (Debian 12, Ubuntu 22.10+,
//!   RHEL 10). `toe` and `toe-operator` keep their symbols but not their DWARF, which goes to
//!   `toe-<v>-x86_64-linux-gnu-debug.tar.gz` (linked back by .gnu_debuglink). glibc is linked
//!   dynamically because a static glibc cannot resolve host names
//!   without the very shared libraries static linking avoids, and musl is not among this
//!   project's toolchains;
//! - `toe-<v>.bpf.o`: the eBPF object the agent embeds, for inspection (`bpftool prog load`,
//!   `llvm-objdump`);
//! - `toe-crds-<v>.yaml`: the CRDs; `toe-<v>.tgz`: the packaged Helm chart;
//! - `toe-operator-<v>.oci.tar`, `toe-agent-<v>.oci.tar`: the images (also left in the local
//!   container storage as `localhost/toe-operator:<v>` and `localhost/toe-agent:<v>`), built
//!   from scratch with buildah: the binary, exactly the shared libraries it loads, CA
//!   certificates, a non-root user for the operator. No base image, so no registry is needed;
//!   `images/Containerfile` holds the two image targets, built from the context prepared here;
//! - `SHA256SUMS` over all of them.
//!
//! `--check` then verifies what was built: checksums, archive contents, the packaged chart
//! (helm lint and template), and both images started with podman, the agent's running a real
//! eBPF profile inside its image.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    bootstrap::{self, output},
    build_release, crds, root, run,
};

/// The workspace version (the chart, images and archives carry it).
#[must_use]
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// The binary archive's name (and its top directory's), without `.tar.gz`.
fn archive_name(v: &str) -> String {
    format!("toe-{v}-x86_64-linux-gnu")
}

/// `out/<name>.tar.gz` from the directory `out/<name>`, owned by root whoever builds it.
fn tar_gz(out: &Path, name: &str) -> Result<PathBuf> {
    let tarball = out.join(format!("{name}.tar.gz"));
    run(Command::new("tar")
        .arg("-C")
        .arg(out)
        .args(["--owner=0", "--group=0", "-czf"])
        .arg(&tarball)
        .arg(name))?;
    Ok(tarball)
}

/// One image: its name (the Containerfile's target, which sets the user and entrypoint) and the
/// binary it installs as /usr/local/bin/<binary>.
struct Image {
    name: &'static str,
    binary: &'static str,
}

const IMAGES: [Image; 2] = [
    Image {
        name: "toe-operator",
        binary: "toe-operator",
    },
    Image {
        name: "toe-agent",
        binary: "toe",
    },
];

/// The shared libraries `binary` loads (with the dynamic loader), as ldd resolves them here.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(binary))?;
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    ensure!(
        libs.iter()
            .any(|l| l.to_string_lossy().contains("ld-linux")),
        "ldd found no dynamic loader for {}: {text}",
        binary.display()
    );
    Ok(libs)
}

/// Copies `src` to `root/<src's absolute path>` (and, for a symlinked library, the file the
/// link resolves to under the link's name).
fn install_at_same_path(root: &Path, src: &Path) -> Result<()> {
    let dest = root.join(src.strip_prefix("/").expect("absolute"));
    fs::create_dir_all(dest.parent().expect("parent"))?;
    fs::copy(src, &dest).with_context(|| format!("copying {}", src.display()))?;
    Ok(())
}

/// The directory buildah builds from: `rootfs/` and the Containerfile.
fn image_context(dir: &Path, image: &Image, binary: &Path) -> Result<PathBuf> {
    let ctx = dir.join(format!("image-{}", image.name));
    let _ = fs::remove_dir_all(&ctx);
    let rootfs = ctx.join("rootfs");
    fs::create_dir_all(rootfs.join("usr/local/bin"))?;
    fs::copy(binary, rootfs.join("usr/local/bin").join(image.binary))?;
    for lib in shared_libraries(binary)? {
        install_at_same_path(&rootfs, &lib)?;
    }
    // Object stores over TLS (S3, GCS, Azure) verify against the system's roots.
    install_at_same_path(&rootfs, Path::new("/etc/ssl/certs/ca-certificates.crt"))?;
    fs::create_dir_all(rootfs.join("etc"))?;
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
    )?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\nnonroot:x:65532:\n")?;
    for d in ["tmp", "root", "home/nonroot", "var/lib/toe"] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    fs::copy(
        root().join("images/Containerfile"),
        ctx.join("Containerfile"),
    )?;
    Ok(ctx)
}

fn build_image(dir: &Path, image: &Image, binary: &Path) -> Result<PathBuf> {
    let ctx = image_context(dir, image, binary)?;
    let tag = format!("localhost/{}:{}", image.name, version());
    run(Command::new("buildah")
        .args(["build", "--quiet", "--layers=false", "--format", "oci"])
        .args(["--target", image.name])
        .args(["--build-arg", &format!("VERSION={}", version())])
        .args(["--tag", &tag, "--file"])
        .arg(ctx.join("Containerfile"))
        .arg(&ctx))
    .with_context(|| format!("building image {tag} with buildah"))?;
    let archive = dir.join(format!("{}-{}.oci.tar", image.name, version()));
    let _ = fs::remove_file(&archive);
    run(Command::new("buildah")
        .args(["push", "--quiet", &tag])
        .arg(format!("oci-archive:{}:{tag}", archive.display())))
    .with_context(|| format!("writing {}", archive.display()))?;
    fs::remove_dir_all(&ctx)?;
    Ok(archive)
}

/// Moves `binary`'s DWARF into `<debug_dir>/<name>.debug` and links it back (.gnu_debuglink),
/// keeping the symbol table: function names in backtraces stay, the binary shrinks about
/// fivefold (the release profile's line tables are most of its size), and gdb or a
/// symbolizer given the debug file gets the lines back.
fn split_debug_info(binary: &Path, debug_dir: &Path) -> Result<()> {
    let name = binary.file_name().expect("a file").to_string_lossy();
    let debug = debug_dir.join(format!("{name}.debug"));
    run(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(binary)
        .arg(&debug))
    .context("objcopy (binutils) --only-keep-debug")?;
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(format!("--add-gnu-debuglink={}", debug.display()))
        .arg(binary))
    .context("objcopy (binutils) --strip-debug")
}

/// Empties `out` for a new build, refusing a directory that is neither empty nor an earlier
/// build's (one with SHA256SUMS): `--out .` must not delete a checkout.
fn clear_out(out: &Path) -> Result<()> {
    let occupied = fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if occupied && !out.join("SHA256SUMS").is_file() {
        bail!(
            "--out {}: the directory is not empty and holds no earlier dist (no SHA256SUMS); \
             choose a new or empty directory",
            out.display()
        );
    }
    let _ = fs::remove_dir_all(out);
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))
}

/// Builds every artifact into `out`; returns the files written.
pub fn build(out: &Path) -> Result<Vec<PathBuf>> {
    bootstrap::toolchain()?;
    let helm = bootstrap::helm()?;
    if !bootstrap::runs("buildah", "--version") {
        bail!(
            "the images are built with buildah: `apt-get install buildah` (or `cargo xtask bootstrap --tests`)"
        );
    }
    clear_out(out)?;
    build_release()?;
    bootstrap::build_ebpf()?;
    let v = version();
    let release = root().join("target/release");
    let mut files = Vec::new();

    // The binaries, with what a newcomer needs to start (README, examples).
    let name = archive_name(v);
    let stage = out.join(&name);
    fs::create_dir_all(stage.join("bin"))?;
    let debug_name = format!("{name}-debug");
    let debug = out.join(&debug_name);
    fs::create_dir_all(&debug)?;
    for bin in ["toe", "toe-operator", "toe-demo"] {
        fs::copy(release.join(bin), stage.join("bin").join(bin))
            .with_context(|| format!("copying target/release/{bin}"))?;
    }
    // The demo keeps its full debug info: it exists to show inlined frames and source lines.
    for bin in ["toe", "toe-operator"] {
        split_debug_info(&stage.join("bin").join(bin), &debug)?;
    }
    fs::copy(root().join("README.md"), stage.join("README.md"))?;
    run(Command::new("cp")
        .arg("-r")
        .arg(root().join("examples"))
        .arg(stage.join("examples")))?;
    let _ = fs::remove_dir_all(stage.join("examples/demo/target"));
    files.push(tar_gz(out, &name)?);
    files.push(tar_gz(out, &debug_name)?);
    fs::remove_dir_all(&debug)?;

    let object = out.join(format!("toe-{v}.bpf.o"));
    fs::copy(
        root().join("target/bpfel-unknown-none/release/toe"),
        &object,
    )
    .context("copying the eBPF object")?;
    files.push(object);

    // The chart's CRD files, as `cargo xtask crds` writes them (a test keeps those in step).
    let crds = out.join(format!("toe-crds-{v}.yaml"));
    let mut bundle = String::new();
    for (_, yaml) in crds::crds()? {
        bundle.push_str("---\n");
        bundle.push_str(&yaml);
    }
    fs::write(&crds, bundle)?;
    files.push(crds);

    run(Command::new(&helm)
        .args(["package", "--version", v, "--app-version", v, "-d"])
        .arg(out)
        .arg(root().join("charts/toe")))
    .context("helm package")?;
    files.push(out.join(format!("toe-{v}.tgz")));

    for image in &IMAGES {
        files.push(build_image(
            out,
            image,
            &stage.join("bin").join(image.binary),
        )?);
    }
    fs::remove_dir_all(&stage)?;

    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let sums = output(Command::new("sha256sum").current_dir(out).args(&names))?;
    fs::write(out.join("SHA256SUMS"), format!("{sums}\n"))?;
    files.push(out.join("SHA256SUMS"));
    for f in &files {
        eprintln!("xtask: {}", f.display());
    }
    Ok(files)
}

/// `podman run` as it works on hybrid-cgroup hosts: runc (crun fails there) and explicit
/// rlimits (runc may not raise the defaults it would otherwise copy).
const PODMAN_RUN: [&str; 9] = [
    "--runtime",
    "runc",
    "run",
    "--rm",
    // The checks need no network: nothing they run may reach another address.
    "--network=none",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

/// The binary archive holds what a newcomer needs, with binaries split from their DWARF, and
/// the debug archive holds that DWARF.
fn check_archives(out: &Path, v: &str) -> Result<()> {
    let name = archive_name(v);
    let archive = out.join(format!("{name}.tar.gz"));
    let listing = output(Command::new("tar").arg("-tzf").arg(&archive))?;
    for want in [
        "bin/toe",
        "bin/toe-operator",
        "bin/toe-demo",
        "README.md",
        "examples/cpu-profile.yaml",
    ] {
        ensure!(
            listing.lines().any(|l| l.ends_with(want)),
            "the archive lacks {want}:\n{listing}"
        );
    }

    // Shipped binaries carry symbols and a debug link, not the DWARF (that is in -debug).
    let unpacked = tempfile_dir()?;
    run(Command::new("tar")
        .arg("-C")
        .arg(&unpacked)
        .arg("-xzf")
        .arg(&archive))?;
    let bin = unpacked.join(&name).join("bin/toe");
    let sections = output(Command::new("readelf").arg("-SW").arg(&bin))?;
    ensure!(
        sections.contains(".gnu_debuglink")
            && sections.contains(".symtab")
            && !sections.contains(".debug_info"),
        "the archive's toe is not split from its debug info:\n{sections}"
    );
    fs::remove_dir_all(&unpacked)?;
    let debug_listing = output(
        Command::new("tar")
            .arg("-tzf")
            .arg(out.join(format!("{name}-debug.tar.gz"))),
    )?;
    for want in ["toe.debug", "toe-operator.debug"] {
        ensure!(
            debug_listing.lines().any(|l| l.ends_with(want)),
            "the debug archive lacks {want}:\n{debug_listing}"
        );
    }
    Ok(())
}

/// Verifies a `build` in `out` the way a user receives it.
pub fn check(out: &Path) -> Result<()> {
    let v = version();
    run(Command::new("sha256sum")
        .current_dir(out)
        .args(["--check", "--quiet", "SHA256SUMS"]))
    .context("SHA256SUMS does not match the artifacts")?;

    check_archives(out, v)?;

    let object = fs::read(out.join(format!("toe-{v}.bpf.o")))?;
    ensure!(
        object.starts_with(b"\x7fELF") && object.get(18) == Some(&247),
        "toe-{v}.bpf.o is not a BPF ELF object (e_machine 247)"
    );

    let crds = fs::read_to_string(out.join(format!("toe-crds-{v}.yaml")))?;
    for kind in [
        "kind: PowerTool\n",
        "kind: PowerToolConfig\n",
        "kind: PowerToolProcessing\n",
    ] {
        ensure!(crds.contains(kind), "the CRD bundle lacks {kind}");
    }

    let helm = bootstrap::helm_path();
    let chart = out.join(format!("toe-{v}.tgz"));
    run(Command::new(&helm).args(["lint", "--strict"]).arg(&chart))
        .context("helm lint of the packaged chart")?;
    let rendered = output(
        Command::new(&helm)
            .args(["template", "toe", "--include-crds", "-n", "toe-system"])
            .arg(&chart),
    )?;
    ensure!(
        rendered.contains(&format!("image: ghcr.io/toe-run/toe-agent:{v}")),
        "the packaged chart does not default to this version's agent image"
    );
    ensure!(
        rendered.contains("name: powertools.toe.run"),
        "the packaged chart lacks its CRDs"
    );

    // Each image starts and reports this version.
    for Image { name: image, .. } in &IMAGES {
        let out = output(
            Command::new("podman")
                .args(PODMAN_RUN)
                .arg(format!("localhost/{image}:{v}"))
                .arg("--version"),
        )
        .with_context(|| format!("running the {image} image"))?;
        ensure!(out.contains(v), "{image} --version printed {out:?}");
    }
    let user = output(Command::new("podman").args([
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}",
        &format!("localhost/toe-operator:{v}"),
    ]))?;
    ensure!(
        user.trim() == "65532:65532",
        "the operator image runs as {user:?}, not as non-root"
    );
    check_agent_image_profiles(v)
}

/// The capabilities the chart gives the agent container (its `capabilities.add` list, read from
/// the template so that this check runs the image exactly as the DaemonSet does).
fn chart_agent_capabilities() -> Result<Vec<String>> {
    let template = fs::read_to_string(root().join("charts/toe/templates/agent.yaml"))?;
    let caps: Vec<String> = template
        .lines()
        .skip_while(|l| l.trim() != "add:")
        .skip(1)
        .take_while(|l| !l.contains("{{"))
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(str::to_owned)
        .collect();
    ensure!(
        caps.iter().any(|c| c == "BPF"),
        "no capabilities.add list in the agent template: {caps:?}"
    );
    Ok(caps)
}

/// The agent's image loads its eBPF programs and profiles for real: `toe run` inside it, with the
/// chart's capabilities (not `--privileged`) and the host's PIDs and kernel file systems as the
/// DaemonSet mounts them, profiling a busy process on the host for a few seconds. The samples
/// must be at least 80% of frequency x seconds: a profile of nothing would not pass.
fn check_agent_image_profiles(v: &str) -> Result<()> {
    const HZ: f64 = 99.0;
    let dir = tempfile_dir()?;
    fs::write(
        dir.join("spec.yaml"),
        "apiVersion: toe.run/v1alpha1\nkind: PowerTool\nmetadata: {name: image-check}\nspec:\n  tool: {name: cpu-profile, duration: 3s, commandLineArguments: [--frequency=99]}\n",
    )?;
    let mut busy = Command::new(root().join("target/release/toe-demo"))
        .args(["spin", "30"])
        .spawn()
        .context("starting toe-demo spin on the host")?;
    let caps = chart_agent_capabilities()?;
    let result = output(
        Command::new("podman")
            .args(PODMAN_RUN)
            // The chart's pod: read-only root with an emptyDir at /tmp.
            .args([
                "--pid=host",
                "--cap-drop=ALL",
                "--read-only",
                "--tmpfs=/tmp",
            ])
            .arg(format!("--cap-add={}", caps.join(",")))
            .args(["--security-opt", "no-new-privileges"])
            .args(["-v", "/sys/kernel/tracing:/sys/kernel/tracing:ro"])
            .args(["-v", "/sys/fs/cgroup:/sys/fs/cgroup"])
            .arg("-v")
            .arg(format!("{}:/work", dir.display()))
            .arg(format!("localhost/toe-agent:{v}"))
            .args([
                "run",
                "-f",
                "/work/spec.yaml",
                "--json",
                "--no-progress",
                "-o",
                "/work/out",
                "--pid",
                &busy.id().to_string(),
            ]),
    );
    let _ = busy.kill();
    let _ = busy.wait();
    let out = result.context("profiling inside the agent image with the chart's capabilities")?;
    let summary: serde_json::Value = serde_json::from_str(
        out.lines()
            .skip_while(|l| !l.starts_with('{'))
            .collect::<Vec<_>>()
            .join("\n")
            .as_str(),
    )
    .with_context(|| format!("the agent image printed no JSON summary: {out}"))?;
    let recorded = summary["cpu"]["samples"]["recorded"]
        .as_f64()
        .unwrap_or(0.0);
    let secs = summary["sampled_duration_s"].as_f64().unwrap_or(0.0);
    ensure!(
        secs >= 2.5 && recorded >= 0.8 * HZ * secs,
        "the agent image recorded {recorded} samples of a busy process in {secs:.2} s at 99 Hz \
         (at least {:.0} expected)",
        0.8 * HZ * secs
    );
    let runs: Vec<_> = fs::read_dir(dir.join("out"))?.flatten().collect();
    ensure!(
        runs.iter()
            .any(|r| r.path().join("flamegraph.svg").is_file()),
        "the agent image wrote no flamegraph under {}",
        dir.join("out").display()
    );
    fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = root().join(format!("target/tmp/dist-check-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}
