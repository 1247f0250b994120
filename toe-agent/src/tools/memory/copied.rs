//! Allocation and page-fault sites kept in user space: tracked allocations and unwound page
//! faults the kernel sent with a copy of their task's stack (`--unwind=tables`), unwound with
//! the binaries' unwind tables, and the frees of those blocks. A frame-pointer hash in the
//! kernel cannot tell the call chains of code without frame pointers apart, so these sites are
//! keyed by the unwound stack here.

use std::{
    collections::HashMap,
    ptr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use aya::maps::{MapData, RingBuf};
use toe_artifacts::summary::UnwindAccounting;
use toe_common::{
    memory::{AllocCopy, HEAP_ALLOC, HEAP_FAULT, HEAP_FREE, HeapEvent, SiteStats},
    stacks::stack_hash,
};

use crate::{
    drain::{self, Batches, Drain},
    symbolize::{RawKey, user_stacks::UserStacks},
};

/// (process, hash of the unwound stack).
type Site = (u32, u64);

/// The ring's reader: a [`Drain`] thread empties it every few milliseconds (the ring holds
/// about 190 copies of 16 KiB, so this keeps up with tens of thousands of copied allocations a
/// second), and a thread of its own unwinds what was drained. So neither the run loop (which
/// can spend seconds symbolizing a large binary read for the first time) nor the unwinder
/// leaves the ring full while allocations are copied into it; a copy that finds no room falls
/// back to a frame-pointer stack in the kernel.
pub struct CopiedSites {
    state: Arc<Mutex<State>>,
    drain: Drain,
    reader: Option<std::thread::JoinHandle<()>>,
}

struct State {
    stacks: UserStacks,
    /// How allocation stacks were unwound, and page-fault stacks: a fault that grows the stack
    /// has the page at its stack pointer missing, so its copy can fail where an allocation's
    /// does not.
    unwind: UnwindAccounting,
    fault_unwind: UnwindAccounting,
    sites: HashMap<Site, (RawKey, SiteStats)>,
    /// Unwound page faults per faulting stack.
    faults: HashMap<Site, (RawKey, u64)>,
    /// Blocks not freed yet: (process, address) -> (site, size).
    live: HashMap<(u32, u64), (Site, u64)>,
    /// Sites first seen since the last [`CopiedSites::take_new`].
    new: Vec<RawKey>,
    /// Frees whose allocation was never read: none unless records were reordered.
    frees_unknown: u64,
}

impl CopiedSites {
    /// Starts reading `ring`.
    ///
    /// # Errors
    /// When a thread cannot be started.
    pub fn spawn(ring: RingBuf<MapData>, stacks: UserStacks) -> std::io::Result<Self> {
        let state = Arc::new(Mutex::new(State {
            stacks,
            unwind: UnwindAccounting::default(),
            fault_unwind: UnwindAccounting::default(),
            sites: HashMap::new(),
            faults: HashMap::new(),
            live: HashMap::new(),
            new: Vec::new(),
            frees_unknown: 0,
        }));
        let (drain, batches) = Drain::spawn(
            "toe-mem-ring",
            ring,
            drain::backlog_cap(toe_common::memory::ALLOCS_RING_BYTES as usize),
            keep,
        )?;
        let reader = {
            let state = Arc::clone(&state);
            std::thread::Builder::new()
                .name("toe-mem-unwind".into())
                .spawn(move || read_loop(batches, &state))?
        };
        Ok(Self {
            state,
            drain,
            reader: Some(reader),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops the reader after a last pass over the ring. Call after the probes are detached:
    /// everything they sent is then read.
    pub fn stop(&mut self) {
        self.drain.stop();
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }

    /// Sites first seen since the last call, for the symbolizer while their processes live.
    pub fn take_new(&mut self) -> Vec<RawKey> {
        std::mem::take(&mut self.state().new)
    }

    /// Every site with its totals.
    #[must_use]
    pub fn sites(&self) -> Vec<(RawKey, SiteStats)> {
        self.state()
            .sites
            .values()
            .map(|(k, s)| (k.clone(), *s))
            .collect()
    }

    /// Every faulting stack with its unwound faults.
    #[must_use]
    pub fn faults(&self) -> Vec<(RawKey, u64)> {
        self.state()
            .faults
            .values()
            .map(|(k, n)| (k.clone(), *n))
            .collect()
    }

    /// How allocation stacks were unwound.
    #[must_use]
    pub fn unwind(&self) -> UnwindAccounting {
        self.state().unwind.clone()
    }

    /// How page-fault stacks were unwound.
    #[must_use]
    pub fn fault_unwind(&self) -> UnwindAccounting {
        self.state().fault_unwind.clone()
    }

    #[must_use]
    pub fn frees_unknown(&self) -> u64 {
        self.state().frees_unknown
    }
}

impl Drop for CopiedSites {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where an allocation's or a fault's stack copy starts in its record.
const COPY_AT: usize = std::mem::offset_of!(AllocCopy, copy);

/// What the queue keeps of a record: a copy up to its stack's end, the event of a free.
fn keep(record: &[u8]) -> usize {
    let kind = record
        .get(..4)
        .map_or(0, |k| u32::from_ne_bytes(k.try_into().expect("four bytes")));
    if matches!(kind, HEAP_ALLOC | HEAP_FAULT) {
        drain::up_to_copy_end(record, COPY_AT)
    } else {
        size_of::<HeapEvent>()
    }
}

/// Reads every record drained, in order (a block's free always follows its allocation in the
/// one ring), until the drain stops.
fn read_loop(batches: Batches, state: &Mutex<State>) {
    const HEADER: usize = drain::copied_bytes_at(COPY_AT);
    // Zeroed once: a record fills it up to its copy's end, and what lies beyond is never read.
    // SAFETY: every field of AllocCopy is an integer or an array of them.
    let mut slot: Box<AllocCopy> = unsafe { Box::new_zeroed().assume_init() };
    for item in batches.flatten() {
        if item.len() < size_of::<HeapEvent>() {
            continue;
        }
        // SAFETY: the kernel wrote at least a whole HeapEvent (same repr(C) layout via
        // toe-common, every bit pattern valid); read_unaligned as records are only 8-byte
        // aligned.
        let event = unsafe { ptr::read_unaligned(item.as_ptr().cast::<HeapEvent>()) };
        // Locked per record: the run loop's reads wait for one unwinding at most.
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        match event.kind {
            HEAP_ALLOC | HEAP_FAULT => {
                // SAFETY: `AllocCopy` is the kernel's repr(C) record, every bit pattern valid.
                if let Some(copy) = unsafe { drain::read_prefix(&item, &mut *slot, HEADER) } {
                    if event.kind == HEAP_ALLOC {
                        state.alloc(copy);
                    } else {
                        state.fault(copy);
                    }
                }
            }
            HEAP_FREE => state.free(&event),
            _ => {}
        }
    }
}

impl State {
    /// The site of a copied stack (of a page fault, or else of an allocation): its process and
    /// the hash of the unwound stack (0 when nothing unwound), and the key the symbolizer gets
    /// the first time the site is seen.
    fn site_of(&mut self, c: &AllocCopy, fault: bool) -> (Site, RawKey) {
        let e = &c.event;
        let accounting = if fault {
            &mut self.fault_unwind
        } else {
            &mut self.unwind
        };
        let frames: Box<[u64]> = self
            .stacks
            .of(e.tgid, &c.copy, e.failed != 0, &[], accounting)
            .into();
        let hash = if frames.is_empty() {
            0
        } else {
            stack_hash(&frames).max(1)
        };
        let key = RawKey {
            pid: e.tgid,
            thread: [0; toe_common::TASK_COMM_LEN],
            kstack: Box::new([]),
            ustack: frames,
            // At the allocator's return the registers are its caller's: the leaf is a return
            // address, as the frame-pointer sites' are. At a fault it is the faulting
            // instruction.
            user_leaf_is_return: !fault,
        };
        ((e.tgid, hash), key)
    }

    fn alloc(&mut self, c: &AllocCopy) {
        let e = &c.event;
        let (site, key) = self.site_of(c, false);
        let new = &mut self.new;
        let (_, stats) = self.sites.entry(site).or_insert_with(|| {
            new.push(key.clone());
            (key, SiteStats::default())
        });
        stats.alloc_objects += 1;
        stats.alloc_bytes += e.size;
        // The kernel sends the free of an address reused before its free was seen (counted
        // there), so an entry left here is a block still in use.
        self.live.insert((e.tgid, e.addr), (site, e.size));
    }

    fn fault(&mut self, c: &AllocCopy) {
        let (site, key) = self.site_of(c, true);
        let new = &mut self.new;
        let (_, n) = self.faults.entry(site).or_insert_with(|| {
            new.push(key.clone());
            (key, 0)
        });
        *n += c.event.size;
    }

    fn free(&mut self, e: &HeapEvent) {
        let Some((site, size)) = self.live.remove(&(e.tgid, e.addr)) else {
            self.frees_unknown += 1;
            return;
        };
        if let Some((_, stats)) = self.sites.get_mut(&site) {
            stats.free_objects += 1;
            stats.free_bytes += size;
        }
    }
}
