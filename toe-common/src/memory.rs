//! Memory collector: allocation tracking through uprobes on the target's allocator, and sampled
//! page faults with stacks (the growth profile).
//!
//! Aggregation happens in the kernel. Each tracked block lives in [`LIVE_MAP`] until it is freed;
//! per call site (process, user stack, direct caller) [`SITES_MAP`] keeps allocated and freed
//! objects and bytes, so in-use = allocated - freed. Nothing is streamed per allocation: an
//! allocation-heavy target costs one map update per tracked call, never a ring-buffer record and
//! a user-space wakeup, which is where bcc's memleak spends much of its overhead.
//!
//! The exception is a tracked allocation whose stack is to be unwound with unwind tables
//! (`--unwind=tables`): a frame-pointer hash cannot tell its call chains apart where the code
//! has no frame pointers, so the kernel sends it to user space with a copy of its stack
//! ([`AllocCopy`] in [`ALLOCS_RING`]), user space keeps its site, and its free follows it there
//! ([`HeapEvent`] of kind [`HEAP_FREE`]). Sampling keeps those records few: one per
//! `sample_bytes` allocated on average.

pub const CONFIG_MAP: &str = "TOE_MEM_CONFIG";
/// `HashMap<u64 pid_tgid, InFlight>`: allocator calls between entry and return, per thread.
pub const INFLIGHT_MAP: &str = "TOE_MEM_INFLIGHT";
/// `HashMap<LiveKey, LiveBlock>`: tracked blocks not freed yet.
pub const LIVE_MAP: &str = "TOE_MEM_LIVE";
/// `HashMap<SiteKey, SiteStats>`: per allocation site totals.
pub const SITES_MAP: &str = "TOE_MEM_SITES";
/// `HashMap<SiteKey, u64>`: sampled page faults per faulting stack.
pub const FAULTS_MAP: &str = "TOE_MEM_FAULTS";
/// `HashMap<u64, StoredStack>`: user stacks referenced by [`SiteKey::stack`] (see
/// [`crate::stacks`]).
pub const STACKS_MAP: &str = "TOE_MEM_STACKS";
/// `PerCpuArray<u64>` indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "TOE_MEM_COUNTERS";
/// `Array<u32>` of [`EXP_TABLE_LEN`] exponential variates in 16.16 fixed point (mean 1.0), filled
/// by user space: the kernel has no floating point, and sampling intervals must be exponential
/// for the sampling probability of an allocation of `s` bytes to be `1 - exp(-s/rate)`.
pub const EXP_TABLE_MAP: &str = "TOE_MEM_EXP";
/// `PerCpuArray<i64>` of bytes until the next sampled allocation.
pub const COUNTDOWN_MAP: &str = "TOE_MEM_COUNTDOWN";
/// `RingBuf` of [`AllocCopy`] and [`HeapEvent`] records, in the order the kernel made them (one
/// ring for both, so a block's free never overtakes its allocation).
pub const ALLOCS_RING: &str = "TOE_MEM_ALLOCS";
/// Size of [`ALLOCS_RING`] when stacks are copied: 180 allocations in flight, each with its
/// 16 KiB stack copy, and room for frees. A burst beyond it is attributed by frame pointers,
/// counted.
pub const ALLOCS_RING_BYTES: u32 = 4 << 20;
/// Room in [`ALLOCS_RING`] no stack copy may take: it is kept for frees (40 bytes each), which
/// must reach user space or leave their block in use.
pub const ALLOCS_FREE_HEADROOM: u64 = 1 << 20;
pub const EXP_TABLE_LEN: u32 = 1024;

pub const ENTER_PROGRAM: &str = "toe_mem_enter";
pub const RETURN_PROGRAM: &str = "toe_mem_return";
/// The return probe that also copies the caller's stack for unwind tables (needs
/// `bpf_task_pt_regs`, Linux 5.15); [`RETURN_PROGRAM`] walks frame pointers only.
pub const RETURN_COPY_PROGRAM: &str = "toe_mem_return_copy";
pub const FAULT_PROGRAM: &str = "toe_mem_fault";
/// The page-fault tracepoint that copies the faulting task's stack for unwind tables (Linux
/// 5.15+), sending each unwound fault to user space through [`ALLOCS_RING`]; [`FAULT_PROGRAM`]
/// walks frame pointers only.
pub const FAULT_COPY_PROGRAM: &str = "toe_mem_fault_copy";

/// Compiled-in capacity of [`LIVE_MAP`]; user space sets the real one at load time.
pub const DEFAULT_MAX_LIVE: u32 = 1 << 19;
pub const MAX_SITES: u32 = 1 << 16;
/// Distinct allocation and fault stacks (preallocated, about 1 KiB each).
pub const MAX_STACKS: u32 = 1 << 13;
pub const MAX_INFLIGHT: u32 = 1 << 14;

/// The allocator entry point a uprobe is attached to, passed as its attach cookie.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Func {
    Malloc = 0,
    Calloc = 1,
    Realloc = 2,
    Free = 3,
    PosixMemalign = 4,
    AlignedAlloc = 5,
    Memalign = 6,
    Valloc = 7,
    Pvalloc = 8,
    Reallocarray = 9,
}

impl Func {
    pub const ALL: [Self; 10] = [
        Self::Malloc,
        Self::Calloc,
        Self::Realloc,
        Self::Free,
        Self::PosixMemalign,
        Self::AlignedAlloc,
        Self::Memalign,
        Self::Valloc,
        Self::Pvalloc,
        Self::Reallocarray,
    ];

    #[must_use]
    pub const fn symbol(self) -> &'static str {
        match self {
            Self::Malloc => "malloc",
            Self::Calloc => "calloc",
            Self::Realloc => "realloc",
            Self::Free => "free",
            Self::PosixMemalign => "posix_memalign",
            Self::AlignedAlloc => "aligned_alloc",
            Self::Memalign => "memalign",
            Self::Valloc => "valloc",
            Self::Pvalloc => "pvalloc",
            Self::Reallocarray => "reallocarray",
        }
    }

    /// Entry points an allocator may lack (glibc before 2.26 has no reallocarray; pvalloc is
    /// being removed): their absence is not an error.
    #[must_use]
    pub const fn optional(self) -> bool {
        matches!(self, Self::Pvalloc | Self::Reallocarray | Self::Valloc)
    }

    #[must_use]
    pub const fn from_cookie(c: u64) -> Option<Self> {
        if c < Self::ALL.len() as u64 {
            #[expect(clippy::cast_possible_truncation, reason = "checked < 10 above")]
            Some(Self::ALL[c as usize])
        } else {
            None
        }
    }
}

/// `MemConfig::flags`: track allocations (uprobes attached).
pub const TRACK_ALLOCATIONS: u32 = 1 << 0;
/// `MemConfig::flags`: sample page faults.
pub const TRACK_FAULTS: u32 = 1 << 1;
/// `MemConfig::flags`: tracked allocations go to user space with a stack copy ([`AllocCopy`]).
pub const COPY_STACKS: u32 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemConfig {
    pub flags: u32,
    /// Every `fault_period`-th page fault of a target (per CPU) is unwound; 1 = all.
    pub fault_period: u32,
    /// Mean bytes between sampled allocations; 0 = exact mode (every allocation).
    pub sample_bytes: u64,
    /// Allocations smaller than this are counted but not tracked.
    pub min_size: u64,
}
const _: () = assert!(size_of::<MemConfig>() == 24);

/// `InFlight::flags`: this call's result is to be tracked (passed size and sampling filters).
pub const INFLIGHT_TRACK: u32 = 1 << 0;

/// Allocator call state saved at entry for the return probe.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    /// `Func` as u32.
    pub func: u32,
    /// Probed allocator functions entered from inside this call (glibc's realloc calls malloc
    /// and free, memalign calls malloc): they belong to this call and are not counted again.
    pub nested: u32,
    pub size: u64,
    /// realloc: the block being resized. posix_memalign: where the result is stored.
    pub ptr: u64,
    pub flags: u32,
    pub reserved: u32,
}
const _: () = assert!(size_of::<InFlight>() == 32);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LiveKey {
    pub tgid: u32,
    pub reserved: u32,
    pub addr: u64,
}
const _: () = assert!(size_of::<LiveKey>() == 16);

/// An allocation site: the process and its user stack (a [`crate::stacks::stack_hash`]). `stack` 0 means the
/// stack could not be stored (see [`Counter::StackLost`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SiteKey {
    pub tgid: u32,
    pub reserved: u32,
    pub stack: u64,
}
const _: () = assert!(size_of::<SiteKey>() == 16);

/// [`SiteKey::reserved`] of a block whose allocation went to user space with its stack copy:
/// its free goes there too, not to [`SITES_MAP`].
pub const SITE_IN_USER_SPACE: u32 = 1;

/// [`HeapEvent::kind`]: a tracked allocation, followed by its stack copy ([`AllocCopy`]).
pub const HEAP_ALLOC: u32 = 1;
/// [`HeapEvent::kind`]: the free of a block whose allocation went to user space.
pub const HEAP_FREE: u32 = 2;
/// [`HeapEvent::kind`]: an unwound page fault with its stack copy ([`AllocCopy`]); `size` is 1.
pub const HEAP_FAULT: u32 = 3;

/// One record of [`ALLOCS_RING`]: a free as it is, an allocation at the head of an
/// [`AllocCopy`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapEvent {
    pub kind: u32,
    pub tgid: u32,
    pub addr: u64,
    pub size: u64,
    /// 1 when the registers or the stack could not be read (allocations only).
    pub failed: u32,
    pub reserved: u32,
}
const _: () = assert!(size_of::<HeapEvent>() == 32);

/// A tracked allocation with the caller's user stack, copied at the allocator's return.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AllocCopy {
    pub event: HeapEvent,
    pub copy: crate::stacks::UserStackCopy,
}
const _: () = assert!(size_of::<AllocCopy>() == 32 + size_of::<crate::stacks::UserStackCopy>());

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveBlock {
    pub size: u64,
    pub site: SiteKey,
}
const _: () = assert!(size_of::<LiveBlock>() == 24);

/// Updated with atomic adds: several threads of a process allocate at the same site at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteStats {
    pub alloc_objects: u64,
    pub alloc_bytes: u64,
    pub free_objects: u64,
    pub free_bytes: u64,
}
const _: () = assert!(size_of::<SiteStats>() == 32);

/// Indices into [`COUNTERS_MAP`]. Every allocator call of a target ends in exactly one of the
/// allocation outcomes, every free in one of the free outcomes, so the summary can account for
/// all of them.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Allocating calls (malloc, calloc, realloc, memalign family) seen at entry, outermost only.
    AllocCalls = 0,
    /// Bytes asked for by those calls.
    AllocBytes = 1,
    /// Smaller than the minimum size: counted, not tracked.
    BelowMinSize = 2,
    /// Not picked by byte sampling.
    NotSampled = 3,
    /// Tracked and stored in the live map.
    Tracked = 4,
    /// The allocator returned NULL (or an error for posix_memalign).
    Failed = 5,
    /// The live map was full: a tracked allocation could not be stored.
    LiveMapFull = 6,
    /// The sites map was full: a tracked allocation could not be attributed.
    SitesMapFull = 7,
    /// The stack could not be stored (unwinding failed, or the stack map was full): the
    /// allocation is attributed to an unknown stack.
    StackLost = 8,
    /// The per-thread call table was full: the call was not seen.
    InflightFull = 9,
    /// Allocator calls made from inside another probed call (not counted twice).
    Nested = 10,
    /// free/realloc of a tracked block.
    FreesMatched = 11,
    /// free/realloc of a block not in the live map: allocated before the run started, not
    /// sampled, or below the minimum size.
    FreesUnknown = 12,
    /// free(NULL), a no-op.
    FreeNull = 13,
    /// A tracked address was returned again before its free was seen: the old block is
    /// counted as freed.
    Reused = 14,
    /// Page faults in target tasks.
    Faults = 15,
    /// Page faults unwound and recorded.
    FaultsSampled = 16,
    /// Faults whose stack could not be stored.
    FaultStackLost = 17,
    /// The faults map was full.
    FaultsMapFull = 18,
    /// [`ALLOCS_RING`] was full: a tracked allocation was attributed by its frame-pointer
    /// stack in the kernel instead.
    CopiesLost = 19,
    /// [`ALLOCS_RING`] was full when a block whose allocation went to user space was freed:
    /// the block stays in use in the profile.
    FreeEventsLost = 20,
    /// [`ALLOCS_RING`] had no room for an unwound page fault's stack copy: its stack was walked
    /// by frame pointers in the kernel instead.
    FaultCopiesLost = 21,
}
pub const COUNTER_COUNT: u32 = 22;

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), Copy, no padding (sizes asserted above), every bit pattern valid.
    unsafe impl aya::Pod for super::MemConfig {}
    unsafe impl aya::Pod for super::LiveKey {}
    unsafe impl aya::Pod for super::LiveBlock {}
    unsafe impl aya::Pod for super::SiteKey {}
    unsafe impl aya::Pod for super::SiteStats {}
    unsafe impl aya::Pod for super::InFlight {}
}
