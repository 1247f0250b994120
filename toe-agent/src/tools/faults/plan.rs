//! Pure planning: the tool's options and the target's measured facts become the exact setup a
//! fault runs with, or a refusal that says why.

use std::time::Duration;

use toe_common::api::{Amount, ToolOptions, format_size};

use super::{FaultError, FsFacts, Proc, TargetFacts, facts::main_process};

/// The exact setup a fault runs with.
#[derive(Clone, Debug, PartialEq)]
pub enum FaultPlan {
    Cpu {
        workers: u32,
        /// Fraction of each 100 ms period each worker burns.
        duty: f64,
        /// workers x duty, in CPUs.
        asked_cpus: f64,
        /// What the percentage is relative to, in words.
        basis: String,
    },
    Memory {
        bytes: u64,
        ramp: Duration,
        basis: String,
    },
    Fill {
        fs: FsFacts,
        bytes: u64,
        /// Used percentage expected once written.
        expect_percent: f64,
        basis: String,
    },
    Terminate {
        victims: Vec<Proc>,
        /// SIGTERM first, SIGKILL after `grace`; else SIGKILL at once.
        graceful: bool,
        grace: Duration,
    },
}

impl FaultPlan {
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cpu { .. } => "cpu-stress",
            Self::Memory { .. } => "memory-stress",
            Self::Terminate { .. } => "terminate",
            Self::Fill { .. } => "volume-fill",
        }
    }

    /// The plan in words, one line per decision (printed by a dry run, kept in the summary).
    #[must_use]
    pub fn describe(&self, facts: &TargetFacts) -> Vec<String> {
        let mut out = Vec::new();
        let files: Vec<String> = facts
            .cgroups
            .procs_files()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        match self {
            Self::Cpu {
                workers,
                duty,
                asked_cpus,
                basis,
            } => {
                out.push(format!(
                    "start {workers} CPU worker(s), each burning {:.1}% of every 100 ms ({basis})",
                    duty * 100.0
                ));
                out.push(format!("total asked: {asked_cpus:.3} CPUs"));
            }
            Self::Terminate { .. } => {}
            Self::Fill {
                fs,
                bytes,
                expect_percent,
                basis,
            } => {
                out.push(format!(
                    "write {} into {} as pid {} sees it ({basis}): the filesystem goes from \
                     {:.1}% to {expect_percent:.1}% used",
                    format_size(*bytes),
                    fs.path,
                    fs.pid,
                    fs.space.used_percent()
                ));
                out.push(
                    "roll back at the end, on Ctrl-C/SIGTERM, or (after a crash) on the next \
                     run: the file is removed"
                        .into(),
                );
                return out;
            }
            Self::Memory { bytes, ramp, basis } => {
                out.push(format!(
                    "start 1 memory worker that allocates and touches {} ({basis}){}",
                    format_size(*bytes),
                    if ramp.is_zero() {
                        String::new()
                    } else {
                        format!(" over {}", toe_common::api::format_duration(*ramp))
                    }
                ));
            }
        }
        if let Self::Terminate {
            victims,
            graceful,
            grace,
        } = self
        {
            let who: Vec<String> = victims
                .iter()
                .map(|p| format!("{} ({})", p.comm, p.pid))
                .collect();
            out.push(if *graceful {
                format!(
                    "send SIGTERM to {}; SIGKILL whatever is still alive {} later",
                    who.join(", "),
                    toe_common::api::format_duration(*grace)
                )
            } else {
                format!("send SIGKILL to {}", who.join(", "))
            });
            out.push("trace their signals and exits while they end".into());
            return out;
        }
        out.push(format!(
            "workers join the target's cgroups before they run: {}",
            files.join(", ")
        ));
        out.push(
            "roll back at the end, on Ctrl-C/SIGTERM, or (after a crash) on the next run: \
             workers are killed"
                .into(),
        );
        out
    }
}

/// Pure: turns the tool's options and the target's facts into the exact plan.
pub fn plan(options: &ToolOptions, facts: &TargetFacts) -> Result<FaultPlan, FaultError> {
    match options {
        ToolOptions::CpuStress(o) => {
            // A percentage of the target's limit, not of the node: with a 0.5-CPU quota and 2
            // workers, 100% means 0.25 CPU each.
            let (share, basis) = match facts.cpu_limit {
                Some(limit) => (
                    (limit / f64::from(o.workers)).min(1.0),
                    format!("of its share of the cgroup's {limit:.2}-CPU limit"),
                ),
                None => (1.0, "of one core; the target has no CPU limit".into()),
            };
            let duty = f64::from(o.load_percent) / 100.0 * share;
            if let Some(m) = o.limit_millicores {
                #[expect(clippy::cast_precision_loss, reason = "millicores")]
                let limit = m as f64 / 1000.0;
                let asked = duty * f64::from(o.workers);
                if asked > limit + 1e-9 {
                    return Err(FaultError::Refused(format!(
                        "the workers would use {asked:.3} CPUs ({basis}), above the {limit:.3} \
                         CPUs its PowerToolConfig allows (spec.defaultResources.limits.cpu)"
                    )));
                }
            }
            Ok(FaultPlan::Cpu {
                workers: o.workers,
                duty,
                asked_cpus: duty * f64::from(o.workers),
                basis,
            })
        }
        ToolOptions::MemoryStress(o) => {
            let (bytes, basis) = match o.size {
                Amount::Bytes(b) => (b, "as asked".to_owned()),
                Amount::Percent(p) => {
                    let limit = facts.memory_limit.ok_or_else(|| {
                        FaultError::Refused(format!(
                            "--size={p}% needs a memory limit on the target, and it has none; \
                             give bytes instead (e.g. --size=512MiB)"
                        ))
                    })?;
                    (
                        limit / 100 * u64::from(p),
                        format!("{p}% of the {} memory limit", format_size(limit)),
                    )
                }
            };
            if let Some(limit) = o.limit_bytes
                && bytes > limit
            {
                return Err(FaultError::Refused(format!(
                    "{} ({basis}) is above the {} its PowerToolConfig allows \
                     (spec.defaultResources.limits.memory)",
                    format_size(bytes),
                    format_size(limit)
                )));
            }
            if facts.memory_limit.is_none() && !o.allow_unlimited {
                return Err(FaultError::Refused(
                    "the target has no memory limit, so the memory this fault takes is the \
                     node's and every pod of the node would feel it; stress a target with a \
                     limit, or an admin sets allowUnlimitedTargets in the tool's \
                     PowerToolConfig"
                        .into(),
                ));
            }
            // Without a cgroup limit, the node itself would run out: never plan for that.
            let ceiling = facts.host_memory / 10 * 9;
            if facts.memory_limit.is_none() && facts.host_memory > 0 && bytes > ceiling {
                return Err(FaultError::Refused(format!(
                    "{} is more than 90% of this machine's memory and the target has no memory \
                     limit: the whole node would run out",
                    format_size(bytes)
                )));
            }
            Ok(FaultPlan::Memory {
                bytes,
                ramp: o.ramp,
                basis,
            })
        }
        ToolOptions::Terminate(o) => plan_terminate(o, facts),
        ToolOptions::VolumeFill(o) => plan_fill(o, facts),
        other => Err(FaultError::Refused(format!("{other:?} is not a fault"))),
    }
}

fn plan_terminate(
    o: &toe_common::api::TerminateOptions,
    facts: &TargetFacts,
) -> Result<FaultPlan, FaultError> {
    let main = main_process(&facts.processes);
    let victims: Vec<Proc> = facts
        .processes
        .iter()
        .filter(|p| o.all || main.is_some_and(|m| m.pid == p.pid))
        .filter(|p| o.names.is_empty() || o.names.contains(&p.comm))
        .cloned()
        .collect();
    if victims.is_empty() {
        return Err(FaultError::Refused(format!(
            "no process of the target matches (scope {}, names {:?}); it has: {}",
            if o.all { "all" } else { "main" },
            o.names,
            facts
                .processes
                .iter()
                .map(|p| format!("{} ({})", p.comm, p.pid))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if let Some(p) = victims.iter().find(|p| p.pid == 1) {
        return Err(FaultError::Refused(format!(
            "{} is PID 1 (the host's init); faults never touch it",
            p.comm
        )));
    }
    Ok(FaultPlan::Terminate {
        victims,
        graceful: o.graceful,
        grace: o.grace,
    })
}

fn plan_fill(
    o: &toe_common::api::VolumeFillOptions,
    facts: &TargetFacts,
) -> Result<FaultPlan, FaultError> {
    let fs = facts
        .fs
        .clone()
        .ok_or_else(|| FaultError::Refused("no filesystem measured".into()))?;
    if fs.node_shared && !o.allow_node_shared {
        return Err(FaultError::Refused(format!(
            "{} is on a filesystem the node shares with its other pods (the container's root \
             filesystem or the node's own disk): filling it would put the whole node under \
             disk pressure; fill a volume of the target's own (a PersistentVolume, a sized \
             tmpfs), or an admin sets allowNodeSharedFilesystems in the tool's PowerToolConfig",
            fs.path
        )));
    }
    let sp = fs.space;
    let total = sp.used + sp.avail;
    // Never past 99% of what the filesystem offers.
    let ceiling = (total / 100 * 99).saturating_sub(sp.used);
    let (bytes, basis) = match o.fill {
        Amount::Bytes(b) => (b, "as asked".to_owned()),
        Amount::Percent(p) => (
            (total / 100 * u64::from(p)).saturating_sub(sp.used),
            format!("to {p}% used"),
        ),
    };
    if bytes == 0 {
        return Err(FaultError::Refused(format!(
            "{} is already {:.1}% used; nothing to fill",
            fs.path,
            sp.used_percent()
        )));
    }
    if bytes > ceiling {
        return Err(FaultError::Refused(format!(
            "{} would take {} past 99% used (it is {:.1}% used, {} free)",
            format_size(bytes),
            fs.path,
            sp.used_percent(),
            format_size(sp.avail)
        )));
    }
    #[expect(clippy::cast_precision_loss, reason = "a percentage")]
    let expect_percent = (sp.used + bytes) as f64 / total.max(1) as f64 * 100.0;
    Ok(FaultPlan::Fill {
        fs,
        bytes,
        expect_percent,
        basis,
    })
}

#[cfg(test)]
mod tests {
    use toe_common::api::{CpuStressOptions, MemoryStressOptions};

    use super::*;
    use crate::tools::faults::TargetFacts;

    fn facts(cpu: Option<f64>, mem: Option<u64>) -> TargetFacts {
        TargetFacts {
            cpu_limit: cpu,
            memory_limit: mem,
            online_cpus: 2,
            host_memory: 8 << 30,
            ..TargetFacts::default()
        }
    }

    #[test]
    fn cpu_load_is_relative_to_the_cgroup_limit_not_the_node() {
        let o = ToolOptions::CpuStress(CpuStressOptions {
            limit_millicores: None,
            workers: 2,
            load_percent: 60,
        });
        let FaultPlan::Cpu {
            duty, asked_cpus, ..
        } = plan(&o, &facts(Some(0.5), None)).unwrap()
        else {
            panic!()
        };
        assert!((duty - 0.15).abs() < 1e-9 && (asked_cpus - 0.3).abs() < 1e-9);
        let FaultPlan::Cpu { asked_cpus, .. } = plan(&o, &facts(None, None)).unwrap() else {
            panic!()
        };
        assert!((asked_cpus - 1.2).abs() < 1e-9);
    }

    #[test]
    fn under_a_config_node_shared_fills_and_unlimited_targets_are_refused() {
        let fill = |allow: bool| {
            ToolOptions::VolumeFill(toe_common::api::VolumeFillOptions {
                path: "/tmp".into(),
                fill: Amount::Percent(50),
                allow_node_shared: allow,
            })
        };
        let shared = TargetFacts {
            fs: Some(FsFacts {
                pid: 1,
                path: "/tmp".into(),
                space: super::super::fill::FsSpace {
                    size: 100 << 20,
                    used: 10 << 20,
                    avail: 90 << 20,
                },
                node_shared: true,
            }),
            ..facts(None, None)
        };
        let err = plan(&fill(false), &shared).unwrap_err().to_string();
        assert!(err.contains("filesystem the node shares"), "{err}");
        assert!(plan(&fill(true), &shared).is_ok());
        let stress = |allow: bool| {
            ToolOptions::MemoryStress(MemoryStressOptions {
                limit_bytes: None,
                size: Amount::Bytes(64 << 20),
                ramp: Duration::ZERO,
                allow_unlimited: allow,
            })
        };
        let err = plan(&stress(false), &facts(None, None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no memory limit"), "{err}");
        assert!(plan(&stress(false), &facts(None, Some(1 << 30))).is_ok());
        assert!(plan(&stress(true), &facts(None, None)).is_ok());
    }

    #[test]
    fn memory_percent_needs_a_limit_and_the_node_is_protected() {
        let pct = ToolOptions::MemoryStress(MemoryStressOptions {
            limit_bytes: None,
            size: Amount::Percent(50),
            ramp: Duration::ZERO,
            allow_unlimited: true,
        });
        let FaultPlan::Memory { bytes, .. } = plan(&pct, &facts(None, Some(200 << 20))).unwrap()
        else {
            panic!()
        };
        assert_eq!(bytes, 100 << 20);
        let err = plan(&pct, &facts(None, None)).unwrap_err().to_string();
        assert!(err.contains("needs a memory limit"), "{err}");
        let huge = ToolOptions::MemoryStress(MemoryStressOptions {
            limit_bytes: None,
            size: Amount::Bytes(8 << 30),
            ramp: Duration::ZERO,
            allow_unlimited: true,
        });
        let err = plan(&huge, &facts(None, None)).unwrap_err().to_string();
        assert!(err.contains("whole node"), "{err}");
        assert!(plan(&huge, &facts(None, Some(1 << 30))).is_ok());
    }
}
