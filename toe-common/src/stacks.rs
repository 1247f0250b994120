//! Stacks stored once and referenced by a 64-bit hash of their frames.
//!
//! Collectors that aggregate in the kernel (per call site) or emit many events with the same
//! stacks keep each distinct stack once in a `HashMap<u64, StoredStack>` and refer to it by
//! [`stack_hash`]. Not a `BPF_MAP_TYPE_STACK_TRACE`: that map keeps one stack per hash bucket and
//! fails a second stack that lands in an occupied bucket, so with a few dozen stacks in 8192
//! buckets one run in several loses a whole call site's attribution (ASLR moves the addresses,
//! hence the buckets, on every run). With a 64-bit hash of the frames as the key a collision is
//! practically impossible, and user space recomputes the hash to catch the one remaining failure:
//! the per-CPU scratch slot overwritten by a probe that preempted the writer on the same CPU.

/// `PerCpuArray<StoredStack>` of one, shared by every collector: where a stack is unwound before
/// it is hashed and stored (it is too large for the 512-byte BPF stack).
pub const STACK_SCRATCH_MAP: &str = "TOE_STACK_SCRATCH";

/// Frames kept per stack: `PERF_MAX_STACK_DEPTH`, the kernel's default `kernel.perf_event_max_stack`.
pub const MAX_FRAMES: usize = 127;

/// A stack, leaf first; `len` frames of `ips` are valid.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StoredStack {
    pub len: u32,
    pub reserved: u32,
    pub ips: [u64; MAX_FRAMES],
}
const _: () = assert!(size_of::<StoredStack>() == 1024);

/// Functions at the root of a user stack walked all the way to its program's entry: the main
/// thread's `_start` (and glibc's `__libc_start_*` above it, when `_start` is a tail call), a
/// thread's `clone` / `clone3` / `start_thread`. A stack that ends elsewhere was cut short.
pub const ENTRY_FUNCTIONS: &[&str] = &[
    "_start",
    "__libc_start_main",
    "__libc_start_main_impl",
    "__libc_start_call_main",
    "clone3",
    "__clone3",
    "__clone",
    "start_thread",
];

/// Whether a symbolized frame (`name`, `name+0x12`, `name (file)`, as folded stacks and
/// `perf script` print them) is one of [`ENTRY_FUNCTIONS`].
#[must_use]
pub fn is_entry_frame(frame: &str) -> bool {
    let name = frame.split([' ', '+']).next().unwrap_or(frame);
    ENTRY_FUNCTIONS.contains(&name)
}

/// Whether a folded stack as TOE writes it (`process (pid);[thread;]root;...;leaf`) reaches a
/// program entry: its first user frames after the process frame.
#[must_use]
pub fn folded_reaches_entry(stack: &str) -> bool {
    stack.split(';').skip(1).take(3).any(is_entry_frame)
}

/// Bytes of user stack copied per [`UserStackCopy`], from the stack pointer up: twice perf's
/// default `--call-graph dwarf` size, enough for the 100-deep recursion of a C program without
/// frame pointers and the frames of an interpreter's loop.
pub const STACK_COPY_BYTES: usize = 16 << 10;
/// The copy goes by chunks up to the first that cannot be read (it holds the top of the stack's
/// mapping), then reads what it can of that one in halves down to a word: a stack with less
/// above its pointer than the whole copy still gets all there is.
pub const STACK_COPY_CHUNK: usize = 1 << 10;

/// A task's user registers where it left user mode (or was interrupted in it) and the top of
/// its user stack, copied in the kernel for unwinding with the binaries' unwind tables in user
/// space (`.eh_frame`), where frame pointers are missing.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UserStackCopy {
    /// `ip`, `sp` and `bp`.
    pub regs: [u64; 3],
    /// Bytes of `bytes` that were read, from `regs[1]` up; 0 when nothing could be.
    pub len: u32,
    pub reserved: u32,
    pub bytes: [u8; STACK_COPY_BYTES],
}
const _: () = assert!(size_of::<UserStackCopy>() == 32 + STACK_COPY_BYTES);

/// Start value of [`stack_hash`].
pub const STACK_HASH_SEED: u64 = 0x243f_6a88_85a3_08d3;
const HASH_MUL: u64 = 0x9e37_79b9_7f4a_7c15;

/// One step of [`stack_hash`], split out so the kernel side can run it in a bounded loop.
#[inline]
#[must_use]
pub fn stack_hash_step(h: u64, ip: u64) -> u64 {
    // A multiply-xorshift mix per frame (as in splitmix64's finalizer), so every bit of every
    // frame and the frame order reach every bit of the result.
    let x = (h ^ ip).wrapping_mul(HASH_MUL);
    x ^ (x >> 29)
}

/// Folds the frame count in and keeps 0 free to mean "no stack".
#[inline]
#[must_use]
pub fn stack_hash_finish(h: u64, frames: u64) -> u64 {
    let h = stack_hash_step(h, frames).wrapping_mul(HASH_MUL);
    let h = h ^ (h >> 32);
    if h == 0 { 1 } else { h }
}

/// The key of a stack in a collector's stack map; the kernel computes the same thing frame by
/// frame.
#[must_use]
pub fn stack_hash(ips: &[u64]) -> u64 {
    let h = ips
        .iter()
        .fold(STACK_HASH_SEED, |h, &ip| stack_hash_step(h, ip));
    stack_hash_finish(h, ips.len() as u64)
}

impl StoredStack {
    /// The frames, if they hash to `key` (see the module comment for when they do not).
    #[must_use]
    pub fn verified(&self, key: u64) -> Option<&[u64]> {
        let frames = &self.ips[..(self.len as usize).min(MAX_FRAMES)];
        (stack_hash(frames) == key).then_some(frames)
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), Copy, no padding (size asserted above), every bit pattern valid.
    unsafe impl aya::Pod for super::StoredStack {}
}

#[cfg(test)]
mod tests {
    use super::{folded_reaches_entry, is_entry_frame, stack_hash};

    #[test]
    fn entry_frames_are_named_as_folded_stacks_and_perf_print_them() {
        assert!(is_entry_frame("_start"));
        assert!(is_entry_frame("__libc_start_main+0x80"));
        assert!(is_entry_frame("start_thread (libc.so.6)"));
        assert!(!is_entry_frame("_start_impl"));
        assert!(!is_entry_frame("main"));
        assert!(folded_reaches_entry(
            "xz (41);_start;__libc_start_main;main;lzma_code"
        ));
        assert!(folded_reaches_entry(
            "app (7);worker-1;clone3;start_thread;run"
        ));
        // Cut short: the root is a frame in the middle of the program.
        assert!(!folded_reaches_entry("xz (41);lzma_code;lz_encode;bt_find"));
        // An entry deep in the stack does not count: it is not where the walk ended.
        assert!(!folded_reaches_entry("xz (41);a;b;c;_start"));
    }

    #[test]
    fn stack_hash_depends_on_every_frame_their_order_and_count() {
        let a = stack_hash(&[0x1000, 0x2000, 0x3000]);
        assert_ne!(a, stack_hash(&[0x1000, 0x2000, 0x3001]));
        assert_ne!(a, stack_hash(&[0x2000, 0x1000, 0x3000]));
        assert_ne!(a, stack_hash(&[0x1000, 0x2000, 0x3000, 0]));
        assert_eq!(a, stack_hash(&[0x1000, 0x2000, 0x3000]));
        // 0 is reserved for "no stack".
        assert_ne!(stack_hash(&[]), 0);
    }
}
