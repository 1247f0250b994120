//! The contract between TOE's eBPF programs (`toe-ebpf`) and user space (`toe-agent`).
//!
//! Every struct shared with the kernel is `#[repr(C)]`, `Copy`, free of implicit padding (flags are
//! `u32`, never `bool`) and has its size asserted, so both compilers agree on the layout.
#![cfg_attr(not(feature = "std"), no_std)]

pub mod cpu;
pub mod memory;
pub mod offcpu;
pub mod signals;
pub mod stacks;
pub mod targets;

#[cfg(feature = "api")]
pub mod api;

/// Length of `task_struct::comm`, including the terminating NUL.
pub const TASK_COMM_LEN: usize = 16;

/// Bytes of a NUL-padded kernel `comm` up to the first NUL, lossily decoded.
#[cfg(feature = "std")]
#[must_use]
pub fn comm_to_string(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(feature = "std")]
/// `bytes` in the largest binary unit that divides it, for messages.
#[must_use]
pub fn format_size(bytes: u64) -> String {
    for (unit, m) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes >= m && bytes.is_multiple_of(m) {
            return format!("{}{unit}", bytes / m);
        }
    }
    format!("{bytes}B")
}
