//! Target selection shared by every collector: which tasks are "the target" is decided in the
//! kernel, so non-target work is never unwound, copied or emitted.

/// `HashMap<u64 cgroup v2 id, u32 reserved>`: target cgroups; their descendants are targets too.
pub const TARGET_CGROUPS_MAP: &str = "TOE_TARGET_CGROUPS";
/// `HashMap<u32 tgid, u32 reserved>`: target processes. Kept current by the kernel side: a
/// non-thread clone of a target process is inserted, a target's group leader exit removes it.
pub const TARGET_TGIDS_MAP: &str = "TOE_TARGET_TGIDS";
/// `RingBuf` of `u32` process ids: a target process forked or exec'd (see the image watcher).
pub const TARGET_NEWS_RING: &str = "TOE_TARGET_NEWS";
/// One page: notices are 16 bytes with their header, and the reader wakes at the first.
pub const NEWS_RING_BYTES: u32 = 4096;
/// `Array<FilterConfig>` with one entry.
pub const FILTER_CONFIG_MAP: &str = "TOE_FILTER_CONFIG";
/// `PerCpuArray<u64>` indexed by [`Counter`].
pub const TARGET_COUNTERS_MAP: &str = "TOE_TARGET_COUNTERS";

pub const MAX_TARGET_CGROUPS: u32 = 1024;
/// Room for a fork-heavy target (a shell loop, a pre-fork server) over a long run.
pub const MAX_TARGET_TGIDS: u32 = 65_536;
/// cgroup v2 levels the kernel side walks when looking for a target ancestor. Kubernetes
/// containers sit at level 3-5; nested runtimes rarely pass 10.
pub const MAX_CGROUP_LEVEL: u32 = 31;

/// Match tasks whose cgroup (or an ancestor) is in [`TARGET_CGROUPS_MAP`].
pub const FILTER_BY_CGROUP: u32 = 1 << 0;
/// Match tasks whose tgid is in [`TARGET_TGIDS_MAP`].
pub const FILTER_BY_TGID: u32 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterConfig {
    /// `FILTER_BY_*` bits; 0 matches nothing.
    pub mode: u32,
    /// Bit `n` set: some target cgroup lives at level `n`, so the ancestor at that level is looked
    /// up. Saves up to 31 map lookups per event.
    pub cgroup_level_mask: u32,
}
const _: () = assert!(size_of::<FilterConfig>() == 8);

/// Indices into [`TARGET_COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A target process forked a child but [`TARGET_TGIDS_MAP`] was full: the child is not
    /// followed.
    TgidMapFull = 0,
    /// Children of target processes added to [`TARGET_TGIDS_MAP`].
    ChildrenFollowed = 1,
}
pub const TARGET_COUNTER_COUNT: u32 = 2;

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), Copy, no padding (size asserted above), every bit pattern valid.
    unsafe impl aya::Pod for super::FilterConfig {}
}
