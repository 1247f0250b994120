//! The built-in tool catalogue: each tool's argument schema, duration bounds and the typed options
//! its parsed arguments become. Administrators narrow these further in PowerToolConfig.

use std::time::Duration;

use super::args::{ArgKind, ArgSpec, ParsedArgs};
use crate::cpu;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolKind {
    /// An eBPF collector run by the agent.
    Collector,
}

pub struct ToolDef {
    pub name: &'static str,
    pub kind: ToolKind,
    pub summary: &'static str,
    pub args: &'static [ArgSpec],
    pub default_duration: Duration,
    pub max_duration: Duration,
    pub(super) build: fn(&ParsedArgs) -> ToolOptions,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolOptions {
    CpuProfile(CpuProfileOptions),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuProfileOptions {
    pub frequency_hz: u64,
    pub kernel_stacks: bool,
    pub user_stacks: bool,
}

#[expect(clippy::cast_possible_wrap, reason = "small compile-time constants")]
const CPU_ARGS: &[ArgSpec] = &[
    ArgSpec {
        name: "frequency",
        kind: ArgKind::Integer {
            min: cpu::MIN_FREQUENCY_HZ as i64,
            max: cpu::MAX_FREQUENCY_HZ as i64,
        },
        default: Some("99"),
        help: "samples per second per CPU; 99 avoids lockstep with 100 Hz timers",
    },
    ArgSpec {
        name: "kernel-stacks",
        kind: ArgKind::Bool,
        default: Some("true"),
        help: "include kernel frames",
    },
    ArgSpec {
        name: "user-stacks",
        kind: ArgKind::Bool,
        default: Some("true"),
        help: "include user-space frames",
    },
];

fn build_cpu(args: &ParsedArgs) -> ToolOptions {
    ToolOptions::CpuProfile(CpuProfileOptions {
        frequency_hz: args.integer("frequency").unsigned_abs(),
        kernel_stacks: args.bool("kernel-stacks"),
        user_stacks: args.bool("user-stacks"),
    })
}

static CATALOGUE: [ToolDef; 1] = [ToolDef {
    name: "cpu-profile",
    kind: ToolKind::Collector,
    summary: "sample on-CPU stacks of the target into a flamegraph, pprof and folded stacks",
    args: CPU_ARGS,
    default_duration: Duration::from_secs(30),
    max_duration: Duration::from_hours(1),
    build: build_cpu,
}];

#[must_use]
pub fn catalogue() -> &'static [ToolDef] {
    &CATALOGUE
}

#[must_use]
pub fn find_tool(name: &str) -> Option<&'static ToolDef> {
    CATALOGUE.iter().find(|t| t.name == name)
}
