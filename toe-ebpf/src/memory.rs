//! Memory collector: allocator uprobes (attached per target process by user space, so no other
//! process ever hits them) aggregate into per-site totals in the kernel; a page-fault tracepoint
//! samples the stacks that fault memory in.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_NO_WAKEUP,
        BPF_RB_RING_SIZE,
    },
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_probe_read_user,
        generated::bpf_get_attach_cookie,
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf, ring_buf::RingBufEntry},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use toe_common::{
    memory::{
        ALLOCS_FREE_HEADROOM, AllocCopy, COPY_STACKS, COUNTER_COUNT, Counter, DEFAULT_MAX_LIVE,
        EXP_TABLE_LEN, Func, HEAP_ALLOC, HEAP_FAULT, HEAP_FREE, HeapEvent, INFLIGHT_TRACK,
        InFlight, LiveBlock, LiveKey, MAX_INFLIGHT, MAX_SITES, MAX_STACKS, MemConfig,
        SITE_IN_USER_SPACE, SiteKey, SiteStats,
    },
    stacks::StoredStack,
};

use crate::{
    stacks,
    targets::{add_to, atomic_add, bump, current_is_target},
};

#[map(name = "TOE_MEM_CONFIG")]
static CONFIG: Array<MemConfig> = Array::with_max_entries(1, 0);

#[map(name = "TOE_MEM_INFLIGHT")]
static INFLIGHT: HashMap<u64, InFlight> = HashMap::with_max_entries(MAX_INFLIGHT, 0);

/// Not preallocated: the capacity is sized for big heaps, the memory is only used as blocks
/// are tracked.
#[map(name = "TOE_MEM_LIVE")]
static LIVE: HashMap<LiveKey, LiveBlock> =
    HashMap::with_max_entries(DEFAULT_MAX_LIVE, BPF_F_NO_PREALLOC);

#[map(name = "TOE_MEM_SITES")]
static SITES: HashMap<SiteKey, SiteStats> = HashMap::with_max_entries(MAX_SITES, BPF_F_NO_PREALLOC);

#[map(name = "TOE_MEM_FAULTS")]
static FAULTS: HashMap<SiteKey, u64> = HashMap::with_max_entries(MAX_SITES, BPF_F_NO_PREALLOC);

#[map(name = "TOE_MEM_STACKS")]
/// Preallocated: a stack value is over 1 KiB, and the kernel's allocator keeps only one such
/// element ready per CPU for maps that are not, so a second new stack in quick succession would
/// fail. Sized at load (1 entry when the collector is not used).
static STACKS: HashMap<u64, StoredStack> = HashMap::with_max_entries(MAX_STACKS, 0);

/// Sized at load: a page unless stacks are copied.
#[map(name = "TOE_MEM_ALLOCS")]
static ALLOCS: RingBuf = RingBuf::with_byte_size(4096, 0);

#[map(name = "TOE_MEM_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map(name = "TOE_MEM_EXP")]
static EXP: Array<u32> = Array::with_max_entries(EXP_TABLE_LEN, 0);

/// [0]: bytes until the next sampled allocation; [1]: faults until the next unwound fault.
#[map(name = "TOE_MEM_COUNTDOWN")]
static COUNTDOWN: PerCpuArray<i64> = PerCpuArray::with_max_entries(2, 0);

#[inline(always)]
fn count(c: Counter) {
    bump(&COUNTERS, c as u32);
}

#[inline(always)]
fn add(c: Counter, n: u64) {
    add_to(&COUNTERS, c as u32, n);
}

fn config() -> MemConfig {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// Byte sampling as tcmalloc and Go do it: a per-CPU countdown of bytes, reset to an exponential
/// variate with mean `rate` after each sample. Memorylessness makes the chance that an allocation
/// of `size` bytes is picked exactly `1 - exp(-size/rate)`, which user space inverts to scale.
#[inline(always)]
fn picked(size: u64, rate: u64) -> bool {
    let Some(left) = COUNTDOWN.get_ptr_mut(0) else {
        return true;
    };
    #[expect(clippy::cast_possible_wrap, reason = "sizes above 2^63 fail anyway")]
    let size = size as i64;
    // SAFETY: per-CPU slot owned by this program invocation.
    unsafe {
        if *left > size {
            *left -= size;
            return false;
        }
        let r = bpf_get_prandom_u32() % EXP_TABLE_LEN;
        let e = u64::from(EXP.get(r).copied().unwrap_or(1 << 16));
        #[expect(clippy::cast_possible_wrap, reason = "rate <= 1 GiB, e < 2^20")]
        let next = (rate.sat_mul(e) >> 16) as i64;
        *left = next.max(1);
    }
    true
}

/// `u64::saturating_mul` lowers to a 128-bit multiply, which BPF cannot call, and LLVM turns the
/// obvious division test back into one; the volatile read keeps the quotient a plain division.
trait SatMul {
    fn sat_mul(self, b: u64) -> u64;
}

impl SatMul for u64 {
    #[inline(always)]
    fn sat_mul(self, b: u64) -> u64 {
        if self == 0 {
            return 0;
        }
        let limit = u64::MAX / self;
        // SAFETY: reads a local.
        if b > unsafe { core::ptr::read_volatile(&raw const limit) } {
            u64::MAX
        } else {
            self * b
        }
    }
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

/// Entry of every probed allocator function; the attach cookie says which one.
pub fn try_enter(ctx: &ProbeContext) {
    // SAFETY: the context pointer is the program's own.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let Some(func) = Func::from_cookie(cookie) else {
        return;
    };
    let id = bpf_get_current_pid_tgid();
    if let Some(outer) = INFLIGHT.get_ptr_mut(id) {
        // Called by another probed function (glibc's realloc frees and mallocs, memalign
        // mallocs): the outer call accounts for it. Free has no return probe, so only
        // allocating calls bump the nesting depth their return will undo.
        if func != Func::Free {
            // SAFETY: entries of this thread are only touched by this thread.
            unsafe { (*outer).nested += 1 };
        }
        count(Counter::Nested);
        return;
    }
    let (size, ptr) = match func {
        Func::Free => {
            let ptr = arg(ctx, 0);
            if ptr == 0 {
                count(Counter::FreeNull);
            } else {
                #[expect(clippy::cast_possible_truncation, reason = "upper half is the tgid")]
                free_block((id >> 32) as u32, ptr);
            }
            return;
        }
        Func::Malloc | Func::Valloc => (arg(ctx, 0), 0),
        Func::Pvalloc => (arg(ctx, 0).saturating_add(4095) & !4095, 0),
        Func::Calloc => (arg(ctx, 0).sat_mul(arg(ctx, 1)), 0),
        Func::Realloc => (arg(ctx, 1), arg(ctx, 0)),
        Func::Reallocarray => (arg(ctx, 1).sat_mul(arg(ctx, 2)), arg(ctx, 0)),
        Func::PosixMemalign => (arg(ctx, 2), arg(ctx, 0)),
        Func::AlignedAlloc | Func::Memalign => (arg(ctx, 1), 0),
    };
    let resize = matches!(func, Func::Realloc | Func::Reallocarray);
    let mut flags = 0;
    if !(resize && ptr != 0 && size == 0) {
        count(Counter::AllocCalls);
        add(Counter::AllocBytes, size);
        let cfg = config();
        if size < cfg.min_size {
            count(Counter::BelowMinSize);
        } else if cfg.sample_bytes != 0 && !picked(size, cfg.sample_bytes) {
            count(Counter::NotSampled);
        } else {
            flags = INFLIGHT_TRACK;
        }
    }
    // A call whose result is not tracked still needs its return when it frees a block
    // (realloc), and its entry marks the thread so nested calls are not counted twice.
    let call = InFlight {
        func: func as u32,
        nested: 0,
        size,
        ptr,
        flags,
        reserved: 0,
    };
    if INFLIGHT.insert(id, call, u64::from(BPF_ANY)).is_err() {
        count(Counter::InflightFull);
    }
}

/// Return of every probed allocating function. `COPY`: tracked allocations may go to user space
/// with a copy of the caller's stack (the program variant for Linux 5.15+).
pub fn try_return<const COPY: bool>(ctx: &RetProbeContext) {
    let id = bpf_get_current_pid_tgid();
    let Some(slot) = INFLIGHT.get_ptr_mut(id) else {
        return;
    };
    // SAFETY: entries of this thread are only touched by this thread.
    let call = unsafe {
        if (*slot).nested > 0 {
            (*slot).nested -= 1;
            return;
        }
        *slot
    };
    let _ = INFLIGHT.remove(id);
    #[expect(clippy::cast_possible_truncation, reason = "upper half is the tgid")]
    let tgid = (id >> 32) as u32;
    let ret: u64 = ctx.ret();
    let track = call.flags & INFLIGHT_TRACK != 0;
    let addr = if call.func == Func::Realloc as u32 || call.func == Func::Reallocarray as u32 {
        if call.ptr != 0 {
            if ret == 0 && call.size != 0 {
                // Failed: the old block stays valid.
                count(Counter::Failed);
                return;
            }
            // Moved, resized in place or (size 0) freed: the old block is gone either way.
            free_block(tgid, call.ptr);
            if ret == 0 {
                return;
            }
        } else if ret == 0 {
            count(Counter::Failed);
            return;
        }
        ret
    } else if call.func == Func::PosixMemalign as u32 {
        if ret != 0 {
            count(Counter::Failed);
            return;
        }
        // SAFETY: reads the caller's out-pointer through the checked user-memory helper.
        match unsafe { bpf_probe_read_user(call.ptr as *const u64) } {
            Ok(p) if p != 0 => p,
            _ => {
                count(Counter::Failed);
                return;
            }
        }
    } else {
        if ret == 0 {
            count(Counter::Failed);
            return;
        }
        ret
    };
    if track {
        if COPY && config().flags & COPY_STACKS != 0 {
            record_copied(ctx, tgid, addr, call.size);
        } else {
            record(ctx, tgid, addr, call.size);
        }
    }
}

/// Stores the current task's user stack and returns its hash, or 0 (counted in `lost`).
#[inline(always)]
fn user_stack<C: EbpfContext>(ctx: &C, lost: Counter) -> u64 {
    stacks::store(ctx, &STACKS, true).unwrap_or_else(|_| {
        count(lost);
        0
    })
}

/// Adds to a site's totals, creating the site on first use. Several CPUs may update one site
/// at once, hence atomic adds.
#[inline(always)]
fn site_add(site: &SiteKey, alloc: bool, size: u64) -> bool {
    let mut stats = SITES.get_ptr_mut(site);
    if stats.is_none() {
        // EEXIST means another CPU created it first, which is fine.
        let _ = SITES.insert(site, SiteStats::default(), u64::from(BPF_NOEXIST));
        stats = SITES.get_ptr_mut(site);
    }
    let Some(stats) = stats else {
        count(Counter::SitesMapFull);
        return false;
    };
    // SAFETY: map values are 8-byte aligned and live while the program runs.
    unsafe {
        let (objects, bytes) = if alloc {
            (
                &raw mut (*stats).alloc_objects,
                &raw mut (*stats).alloc_bytes,
            )
        } else {
            (&raw mut (*stats).free_objects, &raw mut (*stats).free_bytes)
        };
        atomic_add(objects, 1);
        atomic_add(bytes, size);
    }
    true
}

fn record(ctx: &RetProbeContext, tgid: u32, addr: u64, size: u64) {
    // At the return probe the registers are the caller's (ip is the return address, the frame
    // pointer is restored), so the frame-pointer walk includes the direct caller, which an
    // entry-probe unwind would skip.
    let site = SiteKey {
        tgid,
        reserved: 0,
        stack: user_stack(ctx, Counter::StackLost),
    };
    let key = LiveKey {
        tgid,
        reserved: 0,
        addr,
    };
    let block = LiveBlock { size, site };
    if LIVE.insert(&key, &block, u64::from(BPF_NOEXIST)).is_err() {
        // Either full, or the address is tracked already: its free was not seen (freed by a
        // path without a probe), so the old block counts as freed before it is replaced.
        let Some(old) = (unsafe { LIVE.get(&key) }).copied() else {
            count(Counter::LiveMapFull);
            return;
        };
        release(tgid, addr, &old);
        count(Counter::Reused);
        if LIVE.insert(&key, &block, u64::from(BPF_ANY)).is_err() {
            count(Counter::LiveMapFull);
            return;
        }
    }
    site_add(&site, true, size);
    count(Counter::Tracked);
}

/// A tracked allocation sent to user space with its stack copy; its block is marked so its free
/// follows it there. When the ring is full it is recorded by frame pointers instead (counted).
fn record_copied(ctx: &RetProbeContext, tgid: u32, addr: u64, size: u64) {
    let key = LiveKey {
        tgid,
        reserved: 0,
        addr,
    };
    // An address still tracked (its free went by a path without a probe, or the process
    // re-executed) is replaced by `record`, which releases the old block before anything of the
    // new one is in the ring: a copy reserved first would reach user space before the old
    // block's free, which would then be matched to the new block.
    // SAFETY: only the presence of the entry is read.
    if unsafe { LIVE.get(&key) }.is_some() {
        record(ctx, tgid, addr, size);
        return;
    }
    let Some(entry) = reserve_copy() else {
        count(Counter::CopiesLost);
        record(ctx, tgid, addr, size);
        return;
    };
    let block = LiveBlock {
        size,
        site: SiteKey {
            tgid,
            reserved: SITE_IN_USER_SPACE,
            stack: 0,
        },
    };
    if LIVE.insert(&key, &block, u64::from(BPF_NOEXIST)).is_err() {
        // Full, or another thread tracked the address since the look-up above (the allocator
        // handed it out twice at once, which only a broken target does): the frame-pointer
        // path counts either case.
        entry.discard(0);
        record(ctx, tgid, addr, size);
        return;
    }
    send_copy(
        entry,
        HeapEvent {
            kind: HEAP_ALLOC,
            tgid,
            addr,
            size,
            failed: 0,
            reserved: 0,
        },
    );
    count(Counter::Tracked);
}

/// A ring record for a stack copy, when the ring has room for one beyond [`ALLOCS_FREE_HEADROOM`]:
/// copies leave room for the frees that must follow them, since a free that finds the ring
/// full leaves its block in use in the profile, while a stack not copied is only walked by
/// frame pointers.
#[inline(always)]
fn reserve_copy() -> Option<RingBufEntry<AllocCopy>> {
    let free = ALLOCS
        .query(u64::from(BPF_RB_RING_SIZE))
        .saturating_sub(ALLOCS.query(u64::from(BPF_RB_AVAIL_DATA)));
    let room = free > ALLOCS_FREE_HEADROOM + size_of::<AllocCopy>() as u64;
    room.then(|| ALLOCS.reserve::<AllocCopy>(0)).flatten()
}

/// Sends `event` in `entry` with a copy of the current task's registers and stack.
#[inline(always)]
fn send_copy(mut entry: RingBufEntry<AllocCopy>, event: HeapEvent) {
    let c = entry.as_mut_ptr();
    // SAFETY: `c` is an exclusively owned, reserved AllocCopy-sized record; `copy_user` writes
    // the copy's registers and length, and only `len` bytes are read from it.
    unsafe {
        (*c).event = event;
        (*c).event.failed = u32::from(!stacks::copy_user(&raw mut (*c).copy));
    }
    // User space reads the ring on its own clock (every few tens of milliseconds).
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
}

/// Sends an unwound fault of `tgid` to user space with a copy of the faulting task's stack;
/// false (counted) when the ring has no room for it.
#[inline(always)]
fn copy_fault(tgid: u32) -> bool {
    let Some(entry) = reserve_copy() else {
        count(Counter::FaultCopiesLost);
        return false;
    };
    send_copy(
        entry,
        HeapEvent {
            kind: HEAP_FAULT,
            tgid,
            addr: 0,
            size: 1,
            failed: 0,
            reserved: 0,
        },
    );
    true
}

/// Accounts a tracked block as freed: in its site's totals, or, for a block whose allocation
/// went to user space, by telling user space.
#[inline(always)]
fn release(tgid: u32, addr: u64, block: &LiveBlock) {
    if block.site.reserved & SITE_IN_USER_SPACE == 0 {
        site_add(&block.site, false, block.size);
        return;
    }
    let Some(mut entry) = ALLOCS.reserve::<HeapEvent>(0) else {
        count(Counter::FreeEventsLost);
        return;
    };
    entry.write(HeapEvent {
        kind: HEAP_FREE,
        tgid,
        addr,
        size: block.size,
        failed: 0,
        reserved: 0,
    });
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
}

fn free_block(tgid: u32, addr: u64) {
    let key = LiveKey {
        tgid,
        reserved: 0,
        addr,
    };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(block) = (unsafe { LIVE.get(&key) }).copied() else {
        count(Counter::FreesUnknown);
        return;
    };
    if LIVE.remove(&key).is_err() {
        // Another thread freed it between lookup and remove (a double free in the target).
        count(Counter::FreesUnknown);
        return;
    }
    release(tgid, addr, &block);
    count(Counter::FreesMatched);
}

/// `exceptions:page_fault_user`: runs in the faulting task, so the cgroup/tgid filter applies
/// directly; every `fault_period`-th target fault per CPU is unwound. `COPY`: that fault goes to
/// user space with a copy of the task's stack, unwound there with unwind tables (the program
/// variant for Linux 5.15+); when the ring has no room its stack is walked by frame pointers
/// here, counted.
pub fn try_fault<const COPY: bool>(ctx: &TracePointContext) {
    if !current_is_target() {
        return;
    }
    count(Counter::Faults);
    let period = i64::from(config().fault_period.max(1));
    if let Some(left) = COUNTDOWN.get_ptr_mut(1) {
        // SAFETY: per-CPU slot owned by this program invocation.
        unsafe {
            *left -= 1;
            if *left > 0 {
                return;
            }
            *left = period;
        }
    }
    if COPY && copy_fault(ctx.tgid()) {
        count(Counter::FaultsSampled);
        return;
    }
    let site = SiteKey {
        tgid: ctx.tgid(),
        reserved: 0,
        stack: user_stack(ctx, Counter::FaultStackLost),
    };
    let mut n = FAULTS.get_ptr_mut(site);
    if n.is_none() {
        let _ = FAULTS.insert(site, 0, u64::from(BPF_NOEXIST));
        n = FAULTS.get_ptr_mut(site);
    }
    let Some(n) = n else {
        count(Counter::FaultsMapFull);
        return;
    };
    // SAFETY: 8-byte aligned map value.
    unsafe { atomic_add(n, 1) };
    count(Counter::FaultsSampled);
}
