//! `cargo xtask bench faults`: for each fault at a few settings, what was asked next to what TOE
//! measured it achieved, and how long a rollback takes after an abort (SIGTERM to TOE).
//! Targets are `toe-demo sleep` processes in cgroups with a CPU quota and a memory limit, and a
//! tmpfs for the fill; everything is removed at the end.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{bench::powertool as spec, is_root, root};

fn bin(name: &str) -> PathBuf {
    root().join("target/release").join(name)
}

/// A cgroup in the hierarchy that has `controller` (v1 on hybrid hosts, else v2).
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(
        controller: &str,
        v1_files: &[(&str, String)],
        v2_files: &[(&str, String)],
    ) -> Result<Self> {
        let v1 = Path::new("/sys/fs/cgroup").join(controller);
        let (base, files) = if v1.join("cgroup.procs").exists() {
            (v1, v1_files)
        } else {
            let base = PathBuf::from("/sys/fs/cgroup");
            std::fs::write(
                base.join("cgroup.subtree_control"),
                format!("+{controller}"),
            )
            .ok();
            (base, v2_files)
        };
        let dir = base.join(format!("toe-bench-{}-{controller}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        for (f, v) in files {
            std::fs::write(dir.join(f), v).with_context(|| format!("{f} = {v}"))?;
        }
        Ok(Self(dir))
    }

    /// `toe-demo sleep` inside the cgroup.
    fn sleeper(&self) -> Result<std::process::Child> {
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec {} sleep 600",
                self.0.display(),
                bin("toe-demo").display()
            ))
            .spawn()?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(child)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs TOE to the end and returns its JSON summary.
fn run(tmp: &Path, spec_text: &str, pid: u32) -> Result<serde_json::Value> {
    let file = tmp.join("spec.yaml");
    std::fs::write(&file, spec_text)?;
    let out = Command::new(bin("toe"))
        .args(["run", "--no-progress", "--json", "-f"])
        .arg(&file)
        .args(["--pid", &pid.to_string(), "-o"])
        .arg(tmp.join("out"))
        .stderr(Stdio::piped())
        .output()?;
    if !out.status.success() {
        bail!("toe failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn row(what: &str, v: &serde_json::Value) {
    let f = &v["fault"];
    let unit = f["unit"].as_str().unwrap_or("");
    let fmt = |x: f64| match unit {
        "bytes" => format!("{:.1} MiB", x / f64::from(1u32 << 20)),
        "CPUs" => format!("{x:.3} CPUs"),
        "% used" => format!("{x:.2}% used"),
        _ => format!("{x}"),
    };
    println!(
        "{what:<52} {:>16} {:>16} {:>+8.2}%",
        fmt(f["asked"].as_f64().unwrap_or(0.0)),
        fmt(f["achieved"].as_f64().unwrap_or(0.0)),
        f["error_percent"].as_f64().unwrap_or(0.0)
    );
}

struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

pub fn faults_bench(secs: u32, aborts: usize) -> Result<()> {
    if !is_root() {
        bail!("the benchmark creates cgroups and mounts a tmpfs: run it as root");
    }
    let tmp = std::env::temp_dir().join(format!("toe-bench-faults-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let d = format!("{secs}s");
    println!(
        "{:<44} {:>16} {:>16} {:>9}",
        "fault (target)", "asked", "achieved", "error"
    );

    let cpu = Cgroup::new(
        "cpu",
        &[
            ("cpu.cfs_period_us", "100000".into()),
            ("cpu.cfs_quota_us", "100000".into()),
        ],
        &[("cpu.max", "100000 100000".into())],
    )?;
    let mut t = cpu.sleeper()?;
    for (w, l) in [(1, 50), (2, 50), (2, 100), (4, 75)] {
        let (ws, ls) = (format!("--workers={w}"), format!("--load={l}"));
        let v = run(&tmp, &spec("cpu-stress", &d, &[&ws, &ls]), t.id())?;
        row(&format!("cpu-stress {ws} {ls} (1-CPU quota)"), &v);
    }
    t.kill()?;
    t.wait()?;

    let limit = (512u64 << 20).to_string();
    let mem = Cgroup::new(
        "memory",
        &[("memory.limit_in_bytes", limit.clone())],
        &[("memory.max", limit)],
    )?;
    let mut t = mem.sleeper()?;
    for args in [
        &["--size=25%"][..],
        &["--size=50%", "--ramp=1s"],
        &["--size=200MiB"],
    ] {
        let v = run(&tmp, &spec("memory-stress", &d, args), t.id())?;
        row(
            &format!("memory-stress {} (512 MiB limit)", args.join(" ")),
            &v,
        );
    }
    t.kill()?;
    t.wait()?;

    let fs = Tmpfs(tmp.join("fill"));
    std::fs::create_dir_all(&fs.0)?;
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256m", "tmpfs"])
        .arg(&fs.0)
        .status()?;
    if !st.success() {
        bail!("mounting a tmpfs failed");
    }
    let mut t = Command::new(bin("toe-demo"))
        .args(["sleep", "600"])
        .spawn()?;
    let path = format!("--path={}", fs.0.display());
    for fill in ["--fill=50%", "--fill=90%", "--fill=32MiB"] {
        let v = run(&tmp, &spec("volume-fill", &d, &[&path, fill]), t.id())?;
        row(&format!("volume-fill {fill} (256 MiB tmpfs)"), &v);
    }

    println!("\nTime to roll back after SIGTERM to TOE (cpu-stress, 4 workers)");
    println!(
        "{:>6} {:>16} {:>22}",
        "run", "TOE exit (ms)", "rollback in summary"
    );
    let spec_file = tmp.join("abort.yaml");
    std::fs::write(
        &spec_file,
        spec("cpu-stress", "5m", &["--workers=4", "--load=50"]),
    )?;
    for i in 0..aborts {
        let toe = Command::new(bin("toe"))
            .args(["run", "--no-progress", "--json", "-f"])
            .arg(&spec_file)
            .args(["--pid", &t.id().to_string(), "-o"])
            .arg(tmp.join("out"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_secs(2));
        let sent = Instant::now();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(i32::try_from(toe.id())?, libc::SIGTERM) };
        let out = toe.wait_with_output()?;
        let exit_ms = sent.elapsed().as_millis();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        println!(
            "{:>6} {exit_ms:>16} {:>19} ms",
            i + 1,
            v["fault"]["rollback_ms"]
        );
    }
    t.kill()?;
    t.wait()?;
    drop(fs);
    std::fs::remove_dir_all(&tmp).ok();
    Ok(())
}
