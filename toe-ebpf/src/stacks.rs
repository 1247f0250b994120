//! Stacks stored once under a hash of their frames, and copies of the top of a user stack for
//! unwinding with tables in user space (see `toe_common::stacks`).

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST, pt_regs},
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{
            bpf_get_current_task_btf, bpf_get_stack, bpf_probe_read_user, bpf_task_pt_regs,
        },
    },
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use toe_common::stacks::{
    MAX_FRAMES, STACK_COPY_BYTES, STACK_COPY_CHUNK, STACK_HASH_SEED, StoredStack, UserStackCopy,
    stack_hash_finish, stack_hash_step,
};

#[map(name = "TOE_STACK_SCRATCH")]
static SCRATCH: PerCpuArray<StoredStack> = PerCpuArray::with_max_entries(1, 0);

/// Where a thread's stack ends, as a copy of it found (the first address past its mapping),
/// and how often it was used since.
#[derive(Clone, Copy)]
#[repr(C)]
struct StackTop {
    top: u64,
    uses: u64,
}

/// Stack ends per thread. Without one, a copy reads 1 KiB chunks until one fails and then
/// halves the failing chunk down to a word: about five faulting reads per copy of a stack less
/// than 16 KiB deep, each a page-fault exception taken and fixed up in the kernel, which made up
/// most of the cost of a copy. With one it is a single read of exactly what is there. A thread
/// keeps its stack for life; a tid reused by a thread with another stack reads short or fails
/// (then the chunks find the new end), and every [`RELEARN_EVERY`]-th copy finds it again
/// anyway.
#[map(name = "TOE_STACK_TOPS")]
static STACK_TOPS: LruHashMap<u32, StackTop> = LruHashMap::with_max_entries(16384, 0);

const RELEARN_EVERY: u64 = 64;

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

/// Copies the current task's user registers and the top of its user stack into `dst`; false
/// when there is nothing to unwind from.
///
/// The registers are those saved when the task entered the kernel (`task_pt_regs`), not a
/// program context's: a perf sample that interrupts a system call, or a tracepoint, has kernel
/// registers in its context, while the user stack to unwind is where the task left user mode.
/// `bpf_task_pt_regs` needs Linux 5.15; a program calling this is refused before.
///
/// # Safety
/// `dst` must point at writable memory for one `UserStackCopy` (a ring-buffer reservation).
#[inline(always)]
pub unsafe fn copy_user(dst: *mut UserStackCopy) -> bool {
    // SAFETY (whole body): `dst` is writable (caller); every read of foreign memory goes
    // through a probe-read helper, which fails instead of faulting.
    unsafe {
        (*dst).len = 0;
        #[expect(clippy::cast_sign_loss, reason = "a kernel pointer returned as a long")]
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as u64 as *const pt_regs;
        let (Ok(ip), Ok(sp), Ok(bp)) = (
            bpf_probe_read_kernel(&raw const (*regs).rip),
            bpf_probe_read_kernel(&raw const (*regs).rsp),
            bpf_probe_read_kernel(&raw const (*regs).rbp),
        ) else {
            return false;
        };
        (*dst).regs = [ip, sp, bp];
        if sp == 0 {
            return false;
        }
        let bytes = (&raw mut (*dst).bytes).cast::<u8>();
        #[expect(clippy::cast_possible_truncation, reason = "the thread id half")]
        let tid = bpf_get_current_pid_tgid() as u32;
        let len = match copy_to_known_top(bytes, sp, tid) {
            Some(len) => len,
            None => {
                let len = copy_chunks(bytes, sp);
                // Short of the whole copy: the end of the stack's mapping was found.
                if len != 0 && len < STACK_COPY_BYTES {
                    let top = StackTop {
                        top: sp + len as u64,
                        uses: 0,
                    };
                    let _ = STACK_TOPS.insert(&tid, &top, 0);
                }
                len
            }
        };
        #[expect(clippy::cast_possible_truncation, reason = "at most STACK_COPY_BYTES")]
        {
            (*dst).len = len as u32;
        }
        len != 0
    }
}

/// Copies the stack from `sp` up to the thread's known end (or [`STACK_COPY_BYTES`]) in one
/// read; `None` when its end is not known, is due to be found again, or the read failed.
///
/// # Safety
/// `bytes` must be writable for [`STACK_COPY_BYTES`].
#[inline(always)]
unsafe fn copy_to_known_top(bytes: *mut u8, sp: u64, tid: u32) -> Option<usize> {
    let known = STACK_TOPS.get_ptr_mut(&tid)?;
    // SAFETY: a value of this program's map, read and written in place (a lost update of
    // `uses` between CPUs only moves the next relearning).
    let (top, uses) = unsafe {
        let uses = (*known).uses + 1;
        (*known).uses = uses;
        ((*known).top, uses)
    };
    if top <= sp || uses % RELEARN_EVERY == 0 {
        return None;
    }
    let n = (top - sp).min(STACK_COPY_BYTES as u64);
    // Bounds the verifier can see: 0 < n <= STACK_COPY_BYTES.
    if n == 0 || n > STACK_COPY_BYTES as u64 {
        return None;
    }
    #[expect(clippy::cast_possible_truncation, reason = "at most STACK_COPY_BYTES")]
    let n = n as u32;
    // SAFETY: `bytes` is writable for STACK_COPY_BYTES >= n (caller); the source is read
    // through the fault-safe helper.
    let ret = unsafe { bpf_probe_read_user(bytes.cast(), n, sp as *const _) };
    (ret == 0).then_some(n as usize)
}

/// Copies the stack from `sp` in [`STACK_COPY_CHUNK`]s until one fails, then the readable part
/// of that one in halves, down to a word; returns the bytes copied.
///
/// # Safety
/// `bytes` must be writable for [`STACK_COPY_BYTES`].
#[inline(always)]
unsafe fn copy_chunks(bytes: *mut u8, sp: u64) -> usize {
    // SAFETY (whole body): every write stays inside `bytes` (bounds checked below), every read
    // of user memory goes through the fault-safe helper.
    unsafe {
        let mut len = 0;
        for i in 0..STACK_COPY_BYTES / STACK_COPY_CHUNK {
            let off = i * STACK_COPY_CHUNK;
            #[expect(clippy::cast_possible_truncation, reason = "one KiB")]
            let ret = bpf_probe_read_user(
                bytes.add(off).cast(),
                STACK_COPY_CHUNK as u32,
                (sp + off as u64) as *const _,
            );
            if ret != 0 {
                break;
            }
            len = off + STACK_COPY_CHUNK;
        }
        // The chunk that failed held the top of the stack's mapping: its readable part is taken
        // in halves, down to one word. Where the top lies depends on the stack's random offset
        // (up to 8 KiB), so without this the outermost frames (`main`, the C runtime's entry)
        // would be cut now and then, for a process with little above its `main`.
        if len < STACK_COPY_BYTES {
            let mut part = STACK_COPY_CHUNK / 2;
            while part >= 8 {
                // Bounds the verifier can see: the part read lies inside `bytes`.
                if len > STACK_COPY_BYTES - part {
                    break;
                }
                #[expect(clippy::cast_possible_truncation, reason = "under one KiB")]
                let ret = bpf_probe_read_user(
                    bytes.add(len).cast(),
                    part as u32,
                    (sp + len as u64) as *const _,
                );
                if ret == 0 {
                    len += part;
                }
                part /= 2;
            }
        }
        len
    }
}
