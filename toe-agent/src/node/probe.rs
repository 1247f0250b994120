//! What this node's kernel lets TOE do, measured at agent start by loading every program of
//! the embedded object (the verifier's answer is the only reliable one), and published on the
//! Node so a user can see why a node cannot run a tool.

use aya::programs::Program;
pub use toe_common::api::Capabilities;

use crate::{ebpf::Loaded, targets};

fn kind(p: &Program) -> &'static str {
    match p {
        Program::PerfEvent(_) => "perf_event",
        Program::TracePoint(_) => "tracepoint",
        Program::RawTracePoint(_) => "raw_tracepoint",
        Program::UProbe(_) => "uprobe",
        _ => "other",
    }
}

fn load(p: &mut Program) -> Result<(), String> {
    let r = match p {
        Program::PerfEvent(p) => p.load(),
        Program::TracePoint(p) => p.load(),
        Program::RawTracePoint(p) => p.load(),
        Program::UProbe(p) => p.load(),
        _ => return Ok(()),
    };
    r.map_err(|e| format!("{e}"))
}

fn cgroup_layout() -> String {
    let unified = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    match (unified, targets::cgroup2_root().is_some()) {
        (true, _) => "v2",
        (false, true) => "hybrid",
        (false, false) => "v1",
    }
    .into()
}

/// Probes this machine. Loading needs the agent's privileges; without them every program
/// reports the permission error, which is itself the answer a user needs.
#[must_use]
pub fn probe() -> Capabilities {
    let mut caps = Capabilities {
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        btf: std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
        cgroup: cgroup_layout(),
        ..Capabilities::default()
    };
    match Loaded::load(&[]) {
        Ok(mut loaded) => {
            for (_, p) in loaded.ebpf.programs_mut() {
                let k = kind(p);
                let result = load(p);
                // One failure of a type is the type's answer.
                let entry = caps.programs.entry(k.into()).or_insert_with(|| "ok".into());
                if let Err(e) = result
                    && entry == "ok"
                {
                    *entry = e;
                }
            }
        }
        Err(e) => {
            for k in ["perf_event", "tracepoint", "raw_tracepoint", "uprobe"] {
                caps.programs.insert(k.into(), e.to_string());
            }
        }
    }
    let needs: [(&str, &[&str]); 8] = [
        ("cpu-profile", &["perf_event"]),
        // sched_switch (raw where the kernel passes prev_state, else classic); --wall also
        // samples with a perf_event program.
        ("offcpu-profile", &["tracepoint", "perf_event"]),
        ("memory-profile", &["uprobe", "tracepoint"]),
        ("signal-trace", &["tracepoint"]),
        // The terminate fault reports its victims through the signal trace.
        ("terminate", &["tracepoint"]),
        ("cpu-stress", &[]),
        ("memory-stress", &[]),
        ("volume-fill", &[]),
    ];
    for (tool, types) in needs {
        let missing: Vec<String> = types
            .iter()
            .filter_map(|t| match caps.programs.get(*t).map(String::as_str) {
                Some("ok") => None,
                Some(why) => Some(format!("{t}: {why}")),
                None => Some(format!("{t}: not in the object")),
            })
            .collect();
        let verdict = if caps.cgroup == "v1" {
            "containers are found through a cgroup v2 hierarchy (unified or hybrid); this node has none".to_owned()
        } else if missing.is_empty() {
            "ok".to_owned()
        } else {
            missing.join("; ")
        };
        caps.tools.insert(tool.into(), verdict);
    }
    caps
}
