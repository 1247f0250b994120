//! CPU sampler: runs on every cpu-clock tick of every CPU; only ticks that land in a target task
//! are unwound and emitted.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_USER_STACK, BPF_RB_NO_WAKEUP, pt_regs},
    helpers::{
        bpf_get_current_comm, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{
            bpf_get_current_task_btf, bpf_get_stack, bpf_probe_read_user, bpf_task_pt_regs,
        },
    },
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
    programs::PerfEventContext,
};
use toe_common::cpu::{
    CONFIG_KERNEL_STACKS, CONFIG_USER_STACK_COPY, CONFIG_USER_STACKS, COUNTER_COUNT, Counter,
    CpuConfig, FLAG_KSTACK_ERROR, FLAG_KSTACK_TRUNCATED, FLAG_USTACK_COPY_ERROR, FLAG_USTACK_ERROR,
    FLAG_USTACK_TRUNCATED, MAX_STACK_DEPTH, RING_BYTES, STACK_COPY_BYTES, STACK_COPY_CHUNK, Sample,
};

use crate::targets::{bump, current_is_target};

#[map(name = "TOE_CPU_SAMPLES")]
static SAMPLES: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map(name = "TOE_CPU_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map(name = "TOE_CPU_CONFIG")]
static CONFIG: Array<CpuConfig> = Array::with_max_entries(1, 0);

const STACK_BYTES: u32 = (MAX_STACK_DEPTH * 8) as u32;

/// Copies one stack into `buf`; returns (frames, flags).
#[inline(always)]
fn stack(ctx: &PerfEventContext, buf: &mut [u64; MAX_STACK_DEPTH], user: bool) -> (u32, u32) {
    let (flags, truncated, error) = if user {
        (
            u64::from(BPF_F_USER_STACK),
            FLAG_USTACK_TRUNCATED,
            FLAG_USTACK_ERROR,
        )
    } else {
        (0, FLAG_KSTACK_TRUNCATED, FLAG_KSTACK_ERROR)
    };
    // SAFETY: buf is STACK_BYTES of ring-buffer memory we reserved.
    let ret = unsafe { bpf_get_stack(ctx.as_ptr(), buf.as_mut_ptr().cast(), STACK_BYTES, flags) };
    if ret < 0 {
        return (0, error);
    }
    #[expect(clippy::cast_sign_loss, reason = "checked non-negative")]
    let frames = (ret as u32) / 8;
    (
        frames,
        if frames as usize >= MAX_STACK_DEPTH {
            truncated
        } else {
            0
        },
    )
}

/// Copies the task's user registers and the top of its user stack into the sample; returns
/// `FLAG_USTACK_COPY_ERROR` when there is nothing to unwind from.
///
/// The registers are those saved when the task entered the kernel (`task_pt_regs`), not the
/// perf context's: a sample that interrupts a system call has kernel registers in its context,
/// while the user stack to unwind is where the task left user mode.
#[inline(always)]
unsafe fn copy_user_stack(s: *mut Sample) -> u32 {
    // SAFETY (whole body): `s` is a reserved record; every read of foreign memory goes through
    // a probe-read helper, which fails instead of faulting.
    unsafe {
        (*s).ustack_copy_len = 0;
        #[expect(clippy::cast_sign_loss, reason = "a kernel pointer returned as a long")]
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as u64 as *const pt_regs;
        let (Ok(ip), Ok(sp), Ok(bp)) = (
            bpf_probe_read_kernel(&raw const (*regs).rip),
            bpf_probe_read_kernel(&raw const (*regs).rsp),
            bpf_probe_read_kernel(&raw const (*regs).rbp),
        ) else {
            return FLAG_USTACK_COPY_ERROR;
        };
        (*s).uregs = [ip, sp, bp];
        if sp == 0 {
            return FLAG_USTACK_COPY_ERROR;
        }
        let dst = (&raw mut (*s).ustack_copy).cast::<u8>();
        let mut len = 0;
        for i in 0..STACK_COPY_BYTES / STACK_COPY_CHUNK {
            let off = i * STACK_COPY_CHUNK;
            #[expect(clippy::cast_possible_truncation, reason = "one KiB")]
            let ret = bpf_probe_read_user(
                dst.add(off).cast(),
                STACK_COPY_CHUNK as u32,
                (sp + off as u64) as *const _,
            );
            if ret != 0 {
                break;
            }
            len = off + STACK_COPY_CHUNK;
        }
        #[expect(clippy::cast_possible_truncation, reason = "at most STACK_COPY_BYTES")]
        {
            (*s).ustack_copy_len = len as u32;
        }
        if len == 0 { FLAG_USTACK_COPY_ERROR } else { 0 }
    }
}

pub fn try_sample<const COPY: bool>(ctx: &PerfEventContext) {
    if !current_is_target() {
        return;
    }
    bump(&COUNTERS, Counter::Sampled as u32);
    let Some(mut entry) = SAMPLES.reserve::<Sample>(0) else {
        bump(&COUNTERS, Counter::RingFull as u32);
        return;
    };
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    let s = entry.as_mut_ptr();
    // SAFETY: `s` points at a reserved, exclusively owned Sample-sized ring-buffer record; every
    // field is written before submit.
    unsafe {
        (*s).time_ns = bpf_ktime_get_ns();
        (*s).tid = ctx.pid();
        (*s).pid = ctx.tgid();
        (*s).cpu = bpf_get_smp_processor_id();
        (*s).comm = bpf_get_current_comm().unwrap_or_default();
        let mut flags = 0;
        let (mut klen, mut ulen) = (0, 0);
        if cfg.flags & CONFIG_KERNEL_STACKS != 0 {
            let (n, f) = stack(ctx, &mut (*s).kstack, false);
            klen = n;
            flags |= f;
        }
        if cfg.flags & CONFIG_USER_STACKS != 0 {
            let (n, f) = stack(ctx, &mut (*s).ustack, true);
            ulen = n;
            flags |= f;
        }
        if COPY && cfg.flags & CONFIG_USER_STACK_COPY != 0 {
            flags |= copy_user_stack(s);
        } else {
            (*s).ustack_copy_len = 0;
        }
        (*s).kstack_len = klen;
        (*s).ustack_len = ulen;
        (*s).flags = flags;
    }
    // No wakeup: user space drains on a short timer, which saves an irq_work on the target's CPU
    // for every sample.
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
}
