//! A ring buffer emptied by a thread that does nothing else, into a queue of the agent's own.
//!
//! A BPF ring buffer is mapped twice into the agent (so records can wrap) and touched whole as
//! it wraps: its size counts twice in the agent's RSS for the whole run. Records that carry a
//! stack copy are large (16 KiB of stack each), so a ring sized to ride out the stalls of the
//! thread that unwinds them (reading a new file's tables, a burst of new processes) is large
//! too. Here a thread only moves records out, every few milliseconds, keeping the part of each
//! that the kernel wrote (a stack copy is mostly shorter than its slot); the ring then only
//! needs to hold a few of those periods, and the queue takes the stalls, costing memory only
//! while it is not empty. The queue has a cap: past it the drain pauses and the ring fills, so
//! what is lost is lost in the kernel, where each program counts it and falls back as it always
//! did (a sample is counted lost; an allocation keeps its frame-pointer stack), and nothing
//! the kernel sent is dropped in between.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use toe_common::stacks::{STACK_COPY_BYTES, UserStackCopy};

/// How often the drain thread empties its ring.
pub const DRAIN_EVERY: Duration = Duration::from_millis(4);

/// Bytes of records drained but not yet consumed past which the drain pauses, for a ring of
/// `ring_bytes`: many rings' worth, at least 16 MiB.
#[must_use]
pub fn backlog_cap(ring_bytes: usize) -> usize {
    (16 << 20).max(4 * ring_bytes)
}

/// Where the stack bytes of a [`UserStackCopy`] at byte `at` of a record start: the shortest
/// record that holds its registers and length.
#[must_use]
pub const fn copied_bytes_at(at: usize) -> usize {
    at + std::mem::offset_of!(UserStackCopy, bytes)
}

/// The bytes of a record the kernel wrote, when a [`UserStackCopy`] at byte `at` ends it: up
/// to the end of the copied stack.
#[must_use]
pub fn up_to_copy_end(record: &[u8], at: usize) -> usize {
    let len_at = at + std::mem::offset_of!(UserStackCopy, len);
    let Some(len) = record.get(len_at..len_at + 4) else {
        return record.len();
    };
    let len = u32::from_ne_bytes(len.try_into().expect("four bytes")) as usize;
    let end = copied_bytes_at(at) + len.min(STACK_COPY_BYTES);
    record.len().min(end)
}

/// The drain thread of one ring.
pub struct Drain {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The drained records, in the ring's order, batch by batch; ends once the drain stopped and
/// every batch was taken.
pub struct Batches {
    rx: mpsc::Receiver<Vec<Box<[u8]>>>,
    queued: Arc<AtomicUsize>,
}

impl Iterator for Batches {
    type Item = Vec<Box<[u8]>>;

    fn next(&mut self) -> Option<Self::Item> {
        let batch = self.rx.recv().ok()?;
        let bytes = batch.iter().map(|r| r.len()).sum();
        self.queued.fetch_sub(bytes, Ordering::Relaxed);
        Some(batch)
    }
}

impl Drain {
    /// Starts draining `ring` on a thread named `name`, keeping of each record the first bytes
    /// `keep` says, while fewer than `cap` bytes are queued.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn spawn(
        name: &str,
        ring: RingBuf<MapData>,
        cap: usize,
        keep: fn(&[u8]) -> usize,
    ) -> std::io::Result<(Self, Batches)> {
        let stop = Arc::new(AtomicBool::new(false));
        let queued = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let thread = {
            let queue = Queue {
                tx,
                queued: Arc::clone(&queued),
                cap,
            };
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || drain_loop(ring, &queue, keep, &stop))?
        };
        Ok((
            Self {
                stop,
                thread: Some(thread),
            },
            Batches { rx, queued },
        ))
    }

    /// Stops the thread after a last pass over the ring; the [`Batches`] end after what it
    /// sent. Call once the programs writing the ring are detached: everything they sent is
    /// then drained.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::Release);
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Queue {
    tx: mpsc::Sender<Vec<Box<[u8]>>>,
    queued: Arc<AtomicUsize>,
    cap: usize,
}

impl Queue {
    fn has_room(&self) -> bool {
        self.queued.load(Ordering::Relaxed) < self.cap
    }

    /// Moves records from `ring` into one batch while the queue has room (or, on the `last`
    /// pass, whatever it holds: the programs are detached and nothing else will drain it).
    fn fill(&self, ring: &mut RingBuf<MapData>, keep: fn(&[u8]) -> usize, last: bool) -> bool {
        let mut batch = Vec::new();
        while last || self.has_room() {
            let Some(item) = ring.next() else {
                break;
            };
            let len = keep(&item).min(item.len());
            self.queued.fetch_add(len, Ordering::Relaxed);
            batch.push(Box::from(&item[..len]));
        }
        batch.is_empty() || self.tx.send(batch).is_ok()
    }
}

fn drain_loop(
    mut ring: RingBuf<MapData>,
    queue: &Queue,
    keep: fn(&[u8]) -> usize,
    stop: &AtomicBool,
) {
    loop {
        // Read the flag first: the last pass then drains what was there when asked to stop.
        let last = stop.load(Ordering::Acquire);
        if !queue.fill(&mut ring, keep, last) || last {
            return;
        }
        std::thread::park_timeout(DRAIN_EVERY);
    }
}

/// Reads a record (a prefix of a `T`, at least `min` bytes) into `slot`, whose bytes past the
/// record keep what they held.
///
/// # Safety
/// `T` must be a `repr(C)` record the kernel writes (its layout shared through toe-common) for
/// which every bit pattern is valid.
pub unsafe fn read_prefix<'a, T>(record: &[u8], slot: &'a mut T, min: usize) -> Option<&'a T> {
    if record.len() < min || record.len() > size_of::<T>() {
        return None;
    }
    // SAFETY: `record` fits in a `T`, and any bytes make a valid `T` (caller).
    unsafe {
        std::ptr::copy_nonoverlapping(
            record.as_ptr(),
            std::ptr::from_mut(slot).cast::<u8>(),
            record.len(),
        );
    }
    Some(slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(cap: usize) -> (Queue, Batches) {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let q = Queue {
            tx,
            queued: Arc::clone(&queued),
            cap,
        };
        (q, Batches { rx, queued })
    }

    #[test]
    fn the_queue_has_room_until_its_cap_and_taking_a_batch_frees_it() {
        let (q, mut batches) = queue(100);
        assert!(q.has_room());
        q.queued.fetch_add(80, Ordering::Relaxed);
        q.tx.send(vec![vec![0; 80].into()]).unwrap();
        assert!(q.has_room());
        q.queued.fetch_add(20, Ordering::Relaxed);
        q.tx.send(vec![vec![0; 20].into()]).unwrap();
        assert!(!q.has_room());
        assert_eq!(batches.next().map(|b| b[0].len()), Some(80));
        assert!(q.has_room());
        drop(q);
        assert_eq!(batches.next().map(|b| b[0].len()), Some(20));
        assert!(batches.next().is_none());
        assert_eq!(backlog_cap(1 << 20), 16 << 20);
        assert_eq!(backlog_cap(32 << 20), 128 << 20);
    }

    #[test]
    fn a_record_ends_with_its_copied_stack() {
        let mut copy = vec![0u8; 8 + size_of::<UserStackCopy>()];
        let len_at = 8 + std::mem::offset_of!(UserStackCopy, len);
        copy[len_at..len_at + 4].copy_from_slice(&100u32.to_ne_bytes());
        let header = copied_bytes_at(8);
        assert_eq!(up_to_copy_end(&copy, 8), header + 100);
        // A length past the slot (never written by the kernel) keeps to the record.
        copy[len_at..len_at + 4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(up_to_copy_end(&copy, 8), copy.len());
        // Too short to hold the length: kept whole.
        assert_eq!(up_to_copy_end(&copy[..len_at], 8), len_at);
    }

    #[test]
    fn a_prefix_is_read_over_what_the_slot_held() {
        let mut slot = [7u64; 4];
        let rec: Vec<u8> = [1u64, 2].iter().flat_map(|v| v.to_ne_bytes()).collect();
        // SAFETY: u64 arrays take any bytes.
        assert_eq!(
            unsafe { read_prefix(&rec, &mut slot, 8) },
            Some(&[1, 2, 7, 7])
        );
        // SAFETY: as above.
        assert!(unsafe { read_prefix(&rec[..4], &mut slot, 8) }.is_none());
        let long = vec![0u8; 40];
        // SAFETY: as above.
        assert!(unsafe { read_prefix(&long, &mut slot, 8) }.is_none());
    }
}
