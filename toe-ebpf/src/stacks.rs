//! Stacks stored once under a hash of their frames (see `toe_common::stacks`).

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::generated::bpf_get_stack,
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use toe_common::stacks::{
    MAX_FRAMES, STACK_HASH_SEED, StoredStack, stack_hash_finish, stack_hash_step,
};

#[map(name = "TOE_STACK_SCRATCH")]
static SCRATCH: PerCpuArray<StoredStack> = PerCpuArray::with_max_entries(1, 0);

/// Why a stack could not be stored.
pub enum StackError {
    /// The unwinder returned nothing (no user context, unreadable frames).
    Unwind,
    /// The stack map is full.
    MapFull,
}

/// Unwinds the current task's user (`user`) or kernel stack into `map` under its hash and
/// returns the hash.
#[inline(always)]
pub fn store<C: EbpfContext>(
    ctx: &C,
    map: &HashMap<u64, StoredStack>,
    user: bool,
) -> Result<u64, StackError> {
    #[expect(clippy::cast_possible_truncation, reason = "1016 bytes")]
    const BYTES: u32 = (MAX_FRAMES * 8) as u32;
    let buf = SCRATCH.get_ptr_mut(0).ok_or(StackError::Unwind)?;
    let flags = if user { u64::from(BPF_F_USER_STACK) } else { 0 };
    // SAFETY: `buf` is this CPU's scratch slot; the helper writes at most BYTES into `ips`.
    let ret = unsafe { bpf_get_stack(ctx.as_ptr(), (&raw mut (*buf).ips).cast(), BYTES, flags) };
    if ret <= 0 {
        return Err(StackError::Unwind);
    }
    #[expect(clippy::cast_sign_loss, reason = "checked positive")]
    let frames = ret as u64 / 8;
    let mut h = STACK_HASH_SEED;
    for i in 0..MAX_FRAMES {
        if i as u64 >= frames {
            break;
        }
        // SAFETY: i < MAX_FRAMES, inside the scratch slot.
        h = stack_hash_step(h, unsafe { (*buf).ips[i] });
    }
    let h = stack_hash_finish(h, frames);
    if map.get_ptr(&h).is_none() {
        // SAFETY: as above; the whole slot is copied into the map.
        let stored = unsafe {
            #[expect(clippy::cast_possible_truncation, reason = "at most MAX_FRAMES")]
            {
                (*buf).len = frames as u32;
            }
            map.insert(&h, &*buf, u64::from(BPF_NOEXIST))
        };
        // EEXIST: another CPU stored the same stack first.
        if stored.is_err() && map.get_ptr(&h).is_none() {
            return Err(StackError::MapFull);
        }
    }
    Ok(h)
}
