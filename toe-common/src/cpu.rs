//! CPU sampler: one ring-buffer record per sample taken in a target task.
//!
//! Each record carries its own stacks (copied with `bpf_get_stack`) instead of a stack-trace map
//! id: stack-map ids are hash buckets that collide and get reused once drained, which either loses
//! stacks or mislabels them. A record is self-contained, so draining can never race the sampler.

use crate::{TASK_COMM_LEN, stacks::UserStackCopy};

pub const SAMPLES_RING: &str = "TOE_CPU_SAMPLES";
/// `PerCpuArray<u64>` indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "TOE_CPU_COUNTERS";
pub const PROGRAM: &str = "toe_cpu_sample";
/// The same sampler without stack copies: kernels before 5.15 have no `bpf_task_pt_regs`, and
/// refuse [`PROGRAM`].
pub const PROGRAM_FP: &str = "toe_cpu_sample_fp";

/// `PERF_MAX_STACK_DEPTH`, the kernel's default `kernel.perf_event_max_stack`.
pub const MAX_STACK_DEPTH: usize = 127;
/// Compiled-in ring size; user space resizes it at load time with [`ring_bytes`].
pub const RING_BYTES: u32 = 1 << 20;

/// Ring-buffer size for a run: 25 ms of every CPU sampling a target at `frequency_hz`, the
/// worst case, rounded up to a power of two (a kernel requirement). A thread that does nothing
/// else drains it every 4 ms into the agent's own queue, so that is six reads of slack, while the
/// buffer (kernel memory, mapped twice into the agent so records can wrap, and touched whole as
/// they do) stays small although each record has room for a copy of the top of the user stack:
/// 256 KiB for 2 CPUs at 99 Hz, 1 MiB at 999 Hz. A record the ring has no room for is counted
/// as lost.
#[must_use]
pub const fn ring_bytes(cpus: u32, frequency_hz: u64) -> u32 {
    let want = (cpus as u64) * frequency_hz * (size_of::<Sample>() as u64) / 40;
    let min = 256 << 10;
    let max = 64 << 20;
    let clamped = if want < min {
        min
    } else if want > max {
        max
    } else {
        want
    };
    #[expect(clippy::cast_possible_truncation, reason = "clamped to 64 MiB above")]
    let bytes = clamped.next_power_of_two() as u32;
    bytes
}
pub const MIN_FREQUENCY_HZ: u64 = 1;
pub const MAX_FREQUENCY_HZ: u64 = 1000;
pub const DEFAULT_FREQUENCY_HZ: u64 = 99;

/// `Sample::flags`: the kernel stack filled all [`MAX_STACK_DEPTH`] slots and may be cut short.
pub const FLAG_KSTACK_TRUNCATED: u32 = 1 << 0;
/// `Sample::flags`: the user stack filled all slots and may be cut short.
pub const FLAG_USTACK_TRUNCATED: u32 = 1 << 1;
/// `Sample::flags`: `bpf_get_stack` failed for the user stack (e.g. a kernel thread).
pub const FLAG_USTACK_ERROR: u32 = 1 << 2;
/// `Sample::flags`: `bpf_get_stack` failed for the kernel stack.
pub const FLAG_KSTACK_ERROR: u32 = 1 << 3;

/// `CpuConfig::flags`: collect kernel stacks.
pub const CONFIG_KERNEL_STACKS: u32 = 1 << 0;
/// `CpuConfig::flags`: collect user stacks.
pub const CONFIG_USER_STACKS: u32 = 1 << 1;
/// `CpuConfig::flags`: copy the user registers and the top of the user stack into each sample,
/// for unwinding from the binaries' unwind tables in user space.
pub const CONFIG_USER_STACK_COPY: u32 = 1 << 2;

/// `Sample::flags`: the user registers or the top of the user stack could not be read.
pub const FLAG_USTACK_COPY_ERROR: u32 = 1 << 4;

/// `Array<CpuConfig>` with one entry.
pub const CONFIG_MAP: &str = "TOE_CPU_CONFIG";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuConfig {
    pub flags: u32,
    pub reserved: u32,
}
const _: () = assert!(size_of::<CpuConfig>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub time_ns: u64,
    /// Thread id (kernel `pid`).
    pub tid: u32,
    /// Process id (kernel `tgid`).
    pub pid: u32,
    pub cpu: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Number of valid entries in `kstack`.
    pub kstack_len: u32,
    /// Number of valid entries in `ustack`.
    pub ustack_len: u32,
    pub comm: [u8; TASK_COMM_LEN],
    /// Leaf first.
    pub kstack: [u64; MAX_STACK_DEPTH],
    /// Leaf first.
    pub ustack: [u64; MAX_STACK_DEPTH],
    /// For unwinding with tables, when [`CONFIG_USER_STACK_COPY`] is set.
    pub ucopy: UserStackCopy,
}
const _: () =
    assert!(size_of::<Sample>() == 48 + 2 * 8 * MAX_STACK_DEPTH + size_of::<UserStackCopy>());

/// Indices into [`COUNTERS_MAP`]. Together they account for every sample taken in a target:
/// `Sampled = delivered records + RingFull`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Samples that hit a target task.
    Sampled = 0,
    /// Samples lost because the ring buffer was full.
    RingFull = 1,
}
pub const COUNTER_COUNT: u32 = 2;

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), Copy, no padding (sizes asserted above), every bit pattern valid.
    unsafe impl aya::Pod for super::CpuConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_is_a_power_of_two_within_bounds() {
        assert_eq!(ring_bytes(2, 99), 256 << 10);
        assert_eq!(ring_bytes(2, 999), 1 << 20);
        assert_eq!(ring_bytes(64, 999), 32 << 20);
        assert_eq!(ring_bytes(1, 1), 256 << 10);
        assert_eq!(ring_bytes(512, 1000), 64 << 20);
        let r = ring_bytes(2, 1000);
        assert!(r.is_power_of_two() && u64::from(r) >= 2 * 1000 * size_of::<Sample>() as u64 / 40);
    }
}
