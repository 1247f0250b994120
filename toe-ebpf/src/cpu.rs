//! CPU sampler: runs on every cpu-clock tick of every CPU; only ticks that land in a target task
//! are unwound and emitted.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_USER_STACK, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_smp_processor_id, bpf_ktime_get_ns, generated::bpf_get_stack,
    },
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
    programs::PerfEventContext,
};
use toe_common::cpu::{
    CONFIG_KERNEL_STACKS, CONFIG_USER_STACK_COPY, CONFIG_USER_STACKS, COUNTER_COUNT, Counter,
    CpuConfig, FLAG_KSTACK_ERROR, FLAG_KSTACK_TRUNCATED, FLAG_USTACK_COPY_ERROR, FLAG_USTACK_ERROR,
    FLAG_USTACK_TRUNCATED, MAX_STACK_DEPTH, RING_BYTES, Sample,
};

use crate::{
    stacks,
    targets::{bump, current_is_target},
};

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
            if !stacks::copy_user(&raw mut (*s).ucopy) {
                flags |= FLAG_USTACK_COPY_ERROR;
            }
        } else {
            (*s).ucopy.len = 0;
        }
        (*s).kstack_len = klen;
        (*s).ustack_len = ulen;
        (*s).flags = flags;
    }
    // No wakeup: user space drains on a short timer, which saves an irq_work on the target's CPU
    // for every sample.
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
}
