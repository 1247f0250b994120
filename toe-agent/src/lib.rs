//! TOE's engine: spec -> validated plan ([`plan`]) -> execution ([`run`], driving the
//! [`tools`]) -> artifacts ([`sink`], in the formats of `toe_artifacts`). Local mode (`toe run`)
//! and node mode ([`node`]) share this path.

pub mod btf;
pub mod drain;
pub mod ebpf;
pub mod node;
pub mod plan;
pub mod run;
pub mod sink;
pub mod symbolize;
pub mod targets;
pub mod tools;
pub mod tracefs;
pub mod tutorial;
pub mod wake;

/// `clock` (a `libc::CLOCK_*` id) in nanoseconds.
#[must_use]
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; the clocks TOE reads always exist on Linux.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
