//! Collectors: user-space halves of the eBPF program families in toe-ebpf, one module each.

pub mod cpu;
pub mod memory;
pub mod signals;
