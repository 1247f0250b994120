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
        kernel: crate::ebpf::kernel_release(),
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
        // The target's context-switch perf events (or sched_switch where they cannot be
        // used), and the exit tracepoint; --wall also samples with a perf_event program.
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
    caps.features = features(&caps.cgroup);
    caps
}

/// The kernel mechanisms whose presence changes how a tool works here.
fn features(cgroup: &str) -> std::collections::BTreeMap<String, String> {
    let mut f = std::collections::BTreeMap::new();
    let kprobes = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|t| std::path::Path::new(t).join("kprobe_events").exists());
    f.insert(
        "kprobes".into(),
        if kprobes {
            "present; unused (every tool runs on tracepoints, perf events and uprobes)"
        } else {
            "absent (no kprobe_events in tracefs); no tool needs them"
        }
        .into(),
    );
    let tracepoint = if crate::tools::offcpu::collector::raw_switch_has_state() {
        "the raw sched_switch tracepoint with prev_state (Linux 5.18+)"
    } else {
        "the classic sched_switch tracepoint (the raw one has no prev_state before Linux 5.18)"
    };
    f.insert(
        "off-CPU switches".into(),
        match crate::tools::offcpu::collector::task_offsets() {
            Ok(_) => format!(
                "the target's own context-switch perf events (task fields from BTF): other \
                 switches run no program; else {tracepoint}"
            ),
            Err(e) => format!("{tracepoint}, on every switch of the node (no task fields: {e})"),
        },
    );
    let exit = match crate::tracefs::has_field(toe_common::signals::GROUP_DEAD_FIELD) {
        Ok(true) => "sched_process_exit's group_dead marks a process's last thread".to_owned(),
        Ok(false) => "no group_dead in sched_process_exit (before Linux 6.16): a process \
                      ends when its leader thread exits, as bcc's exitsnoop counts it"
            .to_owned(),
        Err(e) => format!("unusable: {e}"),
    };
    f.insert("process exit".into(), exit);
    let ids = match (cgroup, targets::cgroup2_root()) {
        ("v2", _) => {
            "cgroup v2 ids of /sys/fs/cgroup (pure v2: limits in cpu.max, memory.max)".to_owned()
        }
        (_, Some(root)) => format!(
            "cgroup v2 ids of {} (hybrid: limits in the v1 controllers)",
            root.display()
        ),
        _ => "none: no cgroup v2 mount".to_owned(),
    };
    f.insert("cgroup ids".into(), ids);
    let memlock = match crate::ebpf::memlock() {
        crate::ebpf::Memlock::Cgroup => {
            "maps charged to the memory cgroup (Linux 5.11+): no CAP_SYS_RESOURCE needed".to_owned()
        }
        crate::ebpf::Memlock::Raised => {
            "maps charged to RLIMIT_MEMLOCK (before Linux 5.11): raised to unlimited".to_owned()
        }
        crate::ebpf::Memlock::Refused(why) => format!(
            "maps charged to RLIMIT_MEMLOCK (before Linux 5.11), which could not be raised \
             ({why}): add SYS_RESOURCE with the chart's agent.extraCapabilities"
        ),
    };
    f.insert("bpf memory".into(), memlock);
    f
}
