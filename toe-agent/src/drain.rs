//! A ring buffer emptied by a thread that does nothing else, into a queue of the agent's own.
//!
//! A BPF ring buffer is mapped twice into the agent (so records can wrap) and touched whole as
//! it wraps: its size counts twice in the agent's RSS for the whole run. Records that carry a
//! stack copy are large (16 KiB of stack each), so a ring sized to ride out the stalls of the
//! thread that unwinds them (reading a new file's tables, a burst of new processes) is large
//! too. Here a thread only moves records out, every few milliseconds, keeping the part of each
//! that the kernel wrote (a stack copy is mostly shorter than its slot); the ring then only
//! needs to hold a few of those periods, and the queue takes the stalls, costing memory only
//! while it is not empty. The queue has a cap: a record past it is dropped and counted, unless
//! losing it would corrupt what the consumer keeps (a free), which is small and always kept.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use toe_common::stacks::{STACK_COPY_BYTES, UserStackCopy};

/// How often the drain thread empties its ring.
pub const DRAIN_EVERY: Duration = Duration::from_millis(4);

/// Kinds of records whose drops are counted apart.
pub const CLASSES: usize = 2;

/// What to keep of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Its first bytes; dropped when the queue is full, and counted in its class (below
    /// [`CLASSES`]).
    Droppable { len: usize, class: usize },
    /// Its first bytes, whatever the queue holds: records whose loss would make the consumer
    /// wrong rather than incomplete. They must be small.
    Always(usize),
}

/// Records drained but not yet consumed that the agent holds at most, for a ring of
/// `ring_bytes`: many rings' worth, at least 16 MiB.
#[must_use]
pub fn backlog_cap(ring_bytes: usize) -> usize {
    (16 << 20).max(4 * ring_bytes)
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
    let end = at + std::mem::offset_of!(UserStackCopy, bytes) + len.min(STACK_COPY_BYTES);
    record.len().min(end)
}

/// The drain thread of one ring.
pub struct Drain {
    stop: Arc<AtomicBool>,
    dropped: Arc<[AtomicU64; CLASSES]>,
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
    /// Starts draining `ring` on a thread named `name`, keeping of each record what `keep`
    /// says, up to `cap` bytes queued.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn spawn(
        name: &str,
        ring: RingBuf<MapData>,
        cap: usize,
        keep: fn(&[u8]) -> Keep,
    ) -> std::io::Result<(Self, Batches)> {
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new([const { AtomicU64::new(0) }; CLASSES]);
        let queued = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        let thread = {
            let queue = Queue {
                tx,
                queued: Arc::clone(&queued),
                cap,
                dropped: Arc::clone(&dropped),
            };
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || drain_loop(ring, &queue, keep, &stop))?
        };
        Ok((
            Self {
                stop,
                dropped,
                thread: Some(thread),
            },
            Batches { rx, queued },
        ))
    }

    /// Records of `class` dropped for want of room since the last call.
    #[must_use]
    pub fn take_dropped(&self, class: usize) -> u64 {
        self.dropped[class].swap(0, Ordering::Relaxed)
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
    dropped: Arc<[AtomicU64; CLASSES]>,
}

impl Queue {
    /// Whether `len` more bytes may be queued; if so they are counted as queued.
    fn admit(&self, keep: Keep) -> Option<usize> {
        match keep {
            Keep::Always(len) => {
                self.queued.fetch_add(len, Ordering::Relaxed);
                Some(len)
            }
            Keep::Droppable { len, class } => {
                if self.queued.fetch_add(len, Ordering::Relaxed) + len > self.cap {
                    self.queued.fetch_sub(len, Ordering::Relaxed);
                    self.dropped[class.min(CLASSES - 1)].fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                Some(len)
            }
        }
    }
}

fn drain_loop(
    mut ring: RingBuf<MapData>,
    queue: &Queue,
    keep: fn(&[u8]) -> Keep,
    stop: &AtomicBool,
) {
    loop {
        // Read the flag first: the last pass then drains what was there when asked to stop.
        let last = stop.load(Ordering::Acquire);
        let mut batch = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(len) = queue.admit(keep(&item)) {
                batch.push(Box::from(&item[..len.min(item.len())]));
            }
        }
        if !batch.is_empty() && queue.tx.send(batch).is_err() {
            return;
        }
        if last {
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

    fn queue(cap: usize) -> (Queue, mpsc::Receiver<Vec<Box<[u8]>>>) {
        let (tx, rx) = mpsc::channel();
        let q = Queue {
            tx,
            queued: Arc::default(),
            cap,
            dropped: Arc::default(),
        };
        (q, rx)
    }

    #[test]
    fn droppable_records_fill_the_queue_up_to_its_cap_and_the_rest_are_counted() {
        let (q, _rx) = queue(100);
        assert_eq!(q.admit(Keep::Droppable { len: 60, class: 0 }), Some(60));
        assert_eq!(q.admit(Keep::Droppable { len: 41, class: 0 }), None);
        assert_eq!(q.admit(Keep::Droppable { len: 40, class: 0 }), Some(40));
        // A record that must not be lost is queued past the cap.
        assert_eq!(q.admit(Keep::Always(32)), Some(32));
        assert_eq!(q.queued.load(Ordering::Relaxed), 132);
        assert_eq!(q.admit(Keep::Droppable { len: 1, class: 1 }), None);
        assert_eq!(q.dropped[0].load(Ordering::Relaxed), 1);
        assert_eq!(q.dropped[1].load(Ordering::Relaxed), 1);
        assert_eq!(backlog_cap(1 << 20), 16 << 20);
        assert_eq!(backlog_cap(32 << 20), 128 << 20);
    }

    #[test]
    fn taking_a_batch_frees_its_room() {
        let (q, rx) = queue(100);
        let mut batches = Batches {
            rx,
            queued: Arc::clone(&q.queued),
        };
        let len = q.admit(Keep::Droppable { len: 80, class: 0 }).unwrap();
        q.tx.send(vec![vec![0; len].into()]).unwrap();
        assert_eq!(q.admit(Keep::Droppable { len: 40, class: 0 }), None);
        assert_eq!(batches.next().map(|b| b.len()), Some(1));
        assert_eq!(q.admit(Keep::Droppable { len: 40, class: 0 }), Some(40));
        drop(q);
        assert!(batches.next().is_none());
    }

    #[test]
    fn a_record_ends_with_its_copied_stack() {
        let mut copy = vec![0u8; 8 + size_of::<UserStackCopy>()];
        let len_at = 8 + std::mem::offset_of!(UserStackCopy, len);
        copy[len_at..len_at + 4].copy_from_slice(&100u32.to_ne_bytes());
        let header = 8 + std::mem::offset_of!(UserStackCopy, bytes);
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
