//! TOE's eBPF programs. Entry points are thin: each calls a `try_*` function in the module of its
//! program family, mirrored by a module of the same name in toe-common and toe-agent.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic adds on shared map values (`memory::atomic_add`); this crate builds on nightly only.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
#![cfg_attr(not(target_arch = "bpf"), allow(dead_code, unused_imports))]

#[cfg(target_arch = "bpf")]
mod cpu;
#[cfg(target_arch = "bpf")]
mod memory;
#[cfg(target_arch = "bpf")]
mod offcpu;
#[cfg(target_arch = "bpf")]
mod signals;
#[cfg(target_arch = "bpf")]
mod stacks;
#[cfg(target_arch = "bpf")]
mod targets;

#[cfg(target_arch = "bpf")]
mod entries {
    use aya_ebpf::{
        macros::{perf_event, raw_tracepoint, tracepoint, uprobe, uretprobe},
        programs::{
            PerfEventContext, ProbeContext, RawTracePointContext, RetProbeContext,
            TracePointContext,
        },
    };

    #[perf_event]
    pub fn toe_cpu_sample(ctx: PerfEventContext) -> u32 {
        crate::cpu::try_sample::<true>(&ctx);
        0
    }

    /// The sampler without stack copies, for kernels before 5.15 (no `bpf_task_pt_regs`).
    #[perf_event]
    pub fn toe_cpu_sample_fp(ctx: PerfEventContext) -> u32 {
        crate::cpu::try_sample::<false>(&ctx);
        0
    }

    #[uprobe]
    pub fn toe_mem_enter(ctx: ProbeContext) -> u32 {
        crate::memory::try_enter(&ctx);
        0
    }

    #[uretprobe]
    pub fn toe_mem_return(ctx: RetProbeContext) -> u32 {
        crate::memory::try_return::<false>(&ctx);
        0
    }

    /// `toe_mem_return` that may also copy the caller's stack for unwind tables (Linux 5.15+).
    #[uretprobe]
    pub fn toe_mem_return_copy(ctx: RetProbeContext) -> u32 {
        crate::memory::try_return::<true>(&ctx);
        0
    }

    #[tracepoint]
    pub fn toe_mem_fault(ctx: TracePointContext) -> u32 {
        crate::memory::try_fault::<false>(&ctx);
        0
    }

    /// `toe_mem_fault` that copies the faulting task's stack for unwind tables (Linux 5.15+).
    #[tracepoint]
    pub fn toe_mem_fault_copy(ctx: TracePointContext) -> u32 {
        crate::memory::try_fault::<true>(&ctx);
        0
    }

    #[tracepoint]
    pub fn toe_offcpu_switch(ctx: TracePointContext) -> u32 {
        crate::offcpu::try_switch(&ctx);
        0
    }

    #[raw_tracepoint(tracepoint = "sched_switch")]
    pub fn toe_offcpu_switch_raw(ctx: RawTracePointContext) -> i32 {
        crate::offcpu::try_switch_raw(&ctx);
        0
    }

    #[perf_event]
    pub fn toe_offcpu_perf(ctx: PerfEventContext) -> u32 {
        crate::offcpu::try_switch_perf(&ctx);
        0
    }

    #[tracepoint]
    pub fn toe_offcpu_exit(ctx: TracePointContext) -> u32 {
        crate::offcpu::try_exit(&ctx);
        0
    }

    #[tracepoint]
    pub fn toe_task_newtask(ctx: TracePointContext) -> u32 {
        crate::targets::try_task_newtask(&ctx);
        0
    }

    #[tracepoint]
    pub fn toe_process_exec(ctx: TracePointContext) -> u32 {
        crate::targets::try_process_exec(&ctx);
        0
    }

    #[tracepoint]
    pub fn toe_process_exit(ctx: TracePointContext) -> u32 {
        crate::targets::try_process_exit(&ctx);
        0
    }

    #[tracepoint]
    pub fn toe_sig_generate(ctx: TracePointContext) -> u32 {
        crate::signals::try_generate::<false>(&ctx);
        0
    }

    /// `toe_sig_generate` that also copies the sender's stack for unwind tables (Linux 5.15+).
    #[tracepoint]
    pub fn toe_sig_generate_copy(ctx: TracePointContext) -> u32 {
        crate::signals::try_generate::<true>(&ctx);
        0
    }

    #[tracepoint]
    pub fn toe_sig_deliver(ctx: TracePointContext) -> u32 {
        crate::signals::try_deliver(&ctx);
        0
    }

    #[tracepoint]
    pub fn toe_sig_newtask(ctx: TracePointContext) -> u32 {
        crate::signals::try_newtask(&ctx);
        0
    }

    #[tracepoint]
    pub fn toe_sig_exit(ctx: TracePointContext) -> u32 {
        crate::signals::try_exit(&ctx);
        0
    }

    #[tracepoint]
    pub fn toe_sig_exec(ctx: TracePointContext) -> u32 {
        crate::signals::try_exec(&ctx);
        0
    }

    #[tracepoint]
    pub fn toe_sig_exit_call(ctx: TracePointContext) -> u32 {
        crate::signals::try_exit_call(&ctx);
        0
    }

    #[tracepoint]
    pub fn toe_sig_oom(ctx: TracePointContext) -> u32 {
        crate::signals::try_oom(&ctx);
        0
    }

    #[tracepoint]
    pub fn toe_sig_cgroup_attach(ctx: TracePointContext) -> u32 {
        crate::signals::try_cgroup_attach(&ctx);
        0
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach a real panic, so this is unreachable.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
