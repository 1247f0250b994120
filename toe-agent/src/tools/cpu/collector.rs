//! CPU sampler: a perf_event program on the software cpu-clock of every online CPU. Samples
//! arrive through a ring buffer and are aggregated by (process, thread name, stacks).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use aya::{
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{
        PerfEvent,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
    util::online_cpus,
};
use toe_artifacts::summary::UnwindAccounting;
use toe_common::{
    api::CpuProfileOptions,
    cpu::{
        CONFIG_KERNEL_STACKS, CONFIG_MAP, CONFIG_USER_STACK_COPY, CONFIG_USER_STACKS, COUNTERS_MAP,
        Counter, CpuConfig, FLAG_KSTACK_ERROR, FLAG_KSTACK_TRUNCATED, FLAG_USTACK_COPY_ERROR,
        FLAG_USTACK_ERROR, FLAG_USTACK_TRUNCATED, PROGRAM, PROGRAM_FP, SAMPLES_RING, Sample,
    },
};

pub use crate::symbolize::RawKey;
use crate::{
    drain::{self, Batches, Drain},
    ebpf::{LoadError, Loaded},
    symbolize::{images::Images, user_stacks::UserStacks},
};

/// What the collector received, before symbolization.
#[derive(Debug, Default)]
pub struct RawProfile {
    pub counts: HashMap<RawKey, u64>,
    /// Keys first seen since the last [`RawProfile::take_new`]: their user addresses still need
    /// symbolizing while the process lives.
    new_keys: Vec<RawKey>,
    pub received: u64,
    pub kstack_truncated: u64,
    pub ustack_truncated: u64,
    pub kstack_errors: u64,
    pub ustack_errors: u64,
    pub unwind: UnwindAccounting,
    pub first_ns: Option<u64>,
    pub last_ns: Option<u64>,
}

impl RawProfile {
    /// Adds one sample whose user stack is `ustack` (see [`UserStacks`]).
    pub fn add(&mut self, s: &Sample, ustack: &[u64]) {
        self.received += 1;
        let flag = |f: u32| u64::from(s.flags & f != 0);
        self.kstack_truncated += flag(FLAG_KSTACK_TRUNCATED);
        self.ustack_truncated += flag(FLAG_USTACK_TRUNCATED);
        self.kstack_errors += flag(FLAG_KSTACK_ERROR);
        self.ustack_errors += flag(FLAG_USTACK_ERROR);
        self.first_ns.get_or_insert(s.time_ns);
        self.last_ns = Some(s.time_ns);
        let klen = (s.kstack_len as usize).min(s.kstack.len());
        let key = RawKey {
            pid: s.pid,
            thread: s.comm,
            kstack: s.kstack[..klen].into(),
            ustack: ustack.into(),
            user_leaf_is_return: false,
        };
        if let Some(c) = self.counts.get_mut(&key) {
            *c += 1;
        } else {
            self.new_keys.push(key.clone());
            self.counts.insert(key, 1);
        }
    }

    pub fn take_new(&mut self) -> Vec<RawKey> {
        std::mem::take(&mut self.new_keys)
    }

    /// Adds what another collection received after this one's.
    fn merge(&mut self, other: Self) {
        self.received += other.received;
        self.kstack_truncated += other.kstack_truncated;
        self.ustack_truncated += other.ustack_truncated;
        self.kstack_errors += other.kstack_errors;
        self.ustack_errors += other.ustack_errors;
        self.unwind.add(&other.unwind);
        if self.first_ns.is_none() {
            self.first_ns = other.first_ns;
        }
        self.last_ns = other.last_ns.or(self.last_ns);
        for (key, n) in other.counts {
            if let Some(c) = self.counts.get_mut(&key) {
                *c += n;
            } else {
                self.new_keys.push(key.clone());
                self.counts.insert(key, n);
            }
        }
    }
}

/// The ring buffer's reader: a [`Drain`] thread moves records out every
/// [`DRAIN_EVERY`](crate::drain::DRAIN_EVERY) (the ring holds about six of those periods; see
/// [`ring_bytes`]), and a thread of its own unwinds them into a small profile. So nothing the run
/// loop or the unwinder does (symbolizing a large binary read for the first time takes seconds,
/// reading its tables milliseconds) stops the ring from being emptied while the kernel fills it.
///
/// [`ring_bytes`]: toe_common::cpu::ring_bytes
struct Reader {
    received: Arc<Mutex<RawProfile>>,
    drain: Drain,
    unwind: Option<std::thread::JoinHandle<()>>,
}

impl Reader {
    fn spawn(ring: RingBuf<MapData>, ring_bytes: usize, images: Arc<Images>) -> Self {
        let received = Arc::new(Mutex::new(RawProfile::default()));
        let (drain, batches) = Drain::spawn(
            "toe-cpu-ring",
            ring,
            drain::backlog_cap(ring_bytes),
            |record| drain::up_to_copy_end(record, UCOPY_AT),
        )
        .expect("spawning a thread");
        let unwind = {
            let received = Arc::clone(&received);
            std::thread::Builder::new()
                .name("toe-cpu-unwind".into())
                .spawn(move || unwind_loop(batches, &received, &images))
                .expect("spawning a thread")
        };
        Self {
            received,
            drain,
            unwind: Some(unwind),
        }
    }

    /// Moves what was read since the last call into `profile`.
    fn take_into(&self, profile: &mut RawProfile) {
        let got = std::mem::take(&mut *lock(&self.received));
        profile.merge(got);
    }

    /// Stops both threads after a last pass over the ring, once everything read is unwound.
    fn stop(&mut self) {
        self.drain.stop();
        if let Some(t) = self.unwind.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where a sample's stack copy starts.
const UCOPY_AT: usize = std::mem::offset_of!(Sample, ucopy);

/// The unwinder thread: each batch into the run loop's share of what was read.
fn unwind_loop(batches: Batches, received: &Mutex<RawProfile>, images: &Arc<Images>) {
    let mut stacks = UserStacks::new(Arc::clone(images));
    // One record at a time, boxed (a sample is 18 KiB, too much for a thread's stack to copy
    // around), zeroed once: a record fills it up to its copy's end, and what lies beyond is
    // never read.
    // SAFETY: every field of Sample is an integer or an array of them.
    let mut sample: Box<Sample> = unsafe { Box::new_zeroed().assume_init() };
    for batch in batches {
        let mut got = RawProfile::default();
        for record in batch {
            add_record(&mut sample, &record, &mut got, &mut stacks);
        }
        let mut seen: Vec<u32> = got.new_keys.iter().map(|k| k.pid).collect();
        lock(received).merge(got);
        // A process seen in a sample has its mappings read now, while it surely lives: the
        // watcher may be late on a busy machine, and a short-lived process can be gone before
        // the run loop symbolizes it.
        seen.sort_unstable();
        seen.dedup();
        for pid in seen {
            images.observe(pid);
        }
    }
}

/// One record (a sample up to its copy's end) into `profile`, through `sample`.
fn add_record(
    sample: &mut Sample,
    record: &[u8],
    profile: &mut RawProfile,
    stacks: &mut UserStacks,
) {
    const HEADER: usize = drain::copied_bytes_at(UCOPY_AT);
    // SAFETY: `Sample` is the kernel's repr(C) record, every bit pattern valid.
    if let Some(s) = unsafe { drain::read_prefix(record, sample, HEADER) } {
        let ustack = cpu_user_stack(stacks, s, &mut profile.unwind);
        profile.add(s, ustack);
    }
}

fn lock(m: &Mutex<RawProfile>) -> std::sync::MutexGuard<'_, RawProfile> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Kernel-side counts: every sample that hit a target, and those the ring buffer had no room for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuCounters {
    pub sampled: u64,
    pub ring_full: u64,
}

pub struct CpuCollector {
    reader: Reader,
    counters: PerCpuArray<MapData, u64>,
    pub cpus: Vec<u32>,
    /// Why user stacks are walked by frame pointers only although tables were asked for.
    pub fallback: Option<String>,
}

fn load_sampler(loaded: &mut Loaded, name: &'static str) -> Result<(), LoadError> {
    let prog: &mut PerfEvent = loaded
        .program_mut(name)?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })?;
    prog.load()
        .map_err(|source| LoadError::Program { name, source })
}

impl CpuCollector {
    /// Loads the sampler and attaches it to every online CPU. Target maps must already be set.
    pub fn attach(
        loaded: &mut Loaded,
        opts: &CpuProfileOptions,
        images: &Arc<Images>,
    ) -> Result<Self, LoadError> {
        let map_err = |name| move |source| LoadError::Map { name, source };
        {
            let mut config: Array<&mut MapData, CpuConfig> =
                Array::try_from(loaded.map_mut(CONFIG_MAP)?).map_err(map_err(CONFIG_MAP))?;
            let mut flags = 0;
            if opts.kernel_stacks {
                flags |= CONFIG_KERNEL_STACKS;
            }
            if opts.user_stacks {
                flags |= CONFIG_USER_STACKS;
                if opts.unwind_tables {
                    flags |= CONFIG_USER_STACK_COPY;
                }
            }
            config
                .set(0, CpuConfig { flags, reserved: 0 }, 0)
                .map_err(map_err(CONFIG_MAP))?;
        }
        let ring =
            RingBuf::try_from(loaded.take_map(SAMPLES_RING)?).map_err(map_err(SAMPLES_RING))?;
        let counters =
            PerCpuArray::try_from(loaded.take_map(COUNTERS_MAP)?).map_err(map_err(COUNTERS_MAP))?;
        let cpus = online_cpus().map_err(|(path, e)| LoadError::Program {
            name: PROGRAM,
            source: aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                call: path,
                io_error: e,
            }),
        })?;
        // Stack copies need `bpf_task_pt_regs` (Linux 5.15): an older kernel refuses that
        // sampler, and gets the one that walks frame pointers only, with a warning.
        let mut fallback = None;
        let name = if opts.user_stacks && opts.unwind_tables {
            match load_sampler(loaded, PROGRAM) {
                Ok(()) => PROGRAM,
                Err(e) => {
                    fallback = Some(format!(
                        "user stacks walked by frame pointers only: this kernel refused the \
                         sampler that copies stacks for unwind tables (it needs Linux 5.15+): {e}"
                    ));
                    load_sampler(loaded, PROGRAM_FP)?;
                    PROGRAM_FP
                }
            }
        } else {
            load_sampler(loaded, PROGRAM_FP)?;
            PROGRAM_FP
        };
        let prog: &mut PerfEvent = loaded
            .program_mut(name)?
            .try_into()
            .map_err(|source| LoadError::Program { name, source })?;
        for &cpu in &cpus {
            prog.attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Frequency(opts.frequency_hz),
                false,
            )
            .map_err(|source| LoadError::Program { name, source })?;
        }
        Ok(Self {
            reader: Reader::spawn(
                ring,
                toe_common::cpu::ring_bytes(
                    u32::try_from(cpus.len()).unwrap_or(u32::MAX),
                    opts.frequency_hz,
                ) as usize,
                Arc::clone(images),
            ),
            counters,
            cpus,
            fallback,
        })
    }

    /// Moves every record read from the ring buffer so far into `profile`.
    pub fn drain(&self, profile: &mut RawProfile) {
        self.reader.take_into(profile);
    }

    /// Moves every record into `profile` after a last read of the ring buffer, once the kernel
    /// stopped sampling (the programs are detached before tools finish).
    pub fn drain_last(&mut self, profile: &mut RawProfile) {
        self.reader.stop();
        self.reader.take_into(profile);
    }

    #[must_use]
    pub fn counters(&self) -> CpuCounters {
        let sum = |c: Counter| {
            self.counters
                .get(&(c as u32), 0)
                .map_or(0, |v| v.iter().sum::<u64>())
        };
        CpuCounters {
            sampled: sum(Counter::Sampled),
            ring_full: sum(Counter::RingFull),
        }
    }
}

/// The sample's user stack, leaf first: unwound from its copy when it has one, else the
/// kernel's frame-pointer walk.
fn cpu_user_stack<'a>(
    stacks: &'a mut UserStacks,
    s: &'a Sample,
    counts: &mut UnwindAccounting,
) -> &'a [u64] {
    let fp = &s.ustack[..(s.ustack_len as usize).min(s.ustack.len())];
    let failed = s.flags & FLAG_USTACK_COPY_ERROR != 0;
    stacks.of(s.pid, &s.ucopy, failed, fp, counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pid: u32, k: &[u64], u: &[u64], flags: u32) -> Box<Sample> {
        // SAFETY: every field of Sample is an integer or an array of them.
        let mut s: Box<Sample> = unsafe { Box::new_zeroed().assume_init() };
        s.time_ns = 1;
        s.tid = pid;
        s.pid = pid;
        s.flags = flags;
        s.kstack_len = u32::try_from(k.len()).unwrap();
        s.ustack_len = u32::try_from(u.len()).unwrap();
        s.comm = *b"demo\0\0\0\0\0\0\0\0\0\0\0\0";
        s.kstack[..k.len()].copy_from_slice(k);
        s.ustack[..u.len()].copy_from_slice(u);
        s
    }

    fn as_bytes(s: &Sample) -> &[u8] {
        // SAFETY: a Sample is plain integers, all of it initialized (zeroed, then written).
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(s).cast::<u8>(), size_of::<Sample>())
        }
    }

    #[test]
    fn a_record_is_queued_up_to_the_end_of_its_stack_copy_and_read_back_whole() {
        let mut s = sample(7, &[10, 11], &[20, 21, 22], 0);
        s.ucopy.len = 100;
        s.ucopy.bytes[..100].fill(0xab);
        let bytes = as_bytes(&s);
        let record = &bytes[..drain::up_to_copy_end(bytes, UCOPY_AT)];
        let header = size_of::<Sample>() - toe_common::stacks::STACK_COPY_BYTES;
        assert_eq!(record.len(), header + 100);
        // Read back into a slot that held a longer record: the copy's length bounds what counts.
        let mut slot = sample(1, &[1; 50], &[2; 60], 0);
        slot.ucopy.len = 16 << 10;
        let (mut p, mut stacks) = (RawProfile::default(), UserStacks::new(Arc::default()));
        add_record(&mut slot, record, &mut p, &mut stacks);
        assert_eq!(
            (slot.pid, slot.ucopy.len, slot.ucopy.bytes[99]),
            (7, 100, 0xab)
        );
        let key = p.counts.keys().next().expect("one stack");
        assert_eq!(
            (&*key.kstack, &*key.ustack),
            (&[10, 11][..], &[20, 21, 22][..])
        );
        // Too short to hold the header: not a sample.
        add_record(&mut slot, &record[..header - 1], &mut p, &mut stacks);
        assert_eq!(p.received, 1);
    }

    #[test]
    fn identical_stacks_merge_and_flags_count() {
        let mut p = RawProfile::default();
        let mut stacks = UserStacks::new(Arc::default());
        let mut add = |p: &mut RawProfile, s: &Sample| {
            let u = cpu_user_stack(&mut stacks, s, &mut p.unwind);
            p.add(s, u);
        };
        add(&mut p, &sample(1, &[10], &[20, 21], 0));
        add(&mut p, &sample(1, &[10], &[20, 21], FLAG_USTACK_TRUNCATED));
        add(&mut p, &sample(2, &[10], &[20, 21], FLAG_KSTACK_ERROR));
        let copy_failed = sample(2, &[10], &[20, 21], FLAG_USTACK_COPY_ERROR);
        add(&mut p, &copy_failed);
        assert_eq!(p.received, 4);
        assert_eq!(p.counts.len(), 2);
        assert_eq!(p.ustack_truncated, 1);
        assert_eq!(p.kstack_errors, 1);
        // Without a copy the frame-pointer walk is the stack; a failed copy is counted.
        assert_eq!(p.unwind.copy_errors, 1);
        assert_eq!(p.unwind.frame_pointers, 0);
        assert_eq!(p.take_new().len(), 2);
        assert!(p.take_new().is_empty());
        assert_eq!(p.counts.values().sum::<u64>(), 4);
    }
}
