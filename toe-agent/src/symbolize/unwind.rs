//! User stacks unwound from the binaries' own unwind tables, for code built without frame
//! pointers (distribution packages, glibc, C/C++ and Rust release builds, interpreters).
//!
//! The CPU sampler copies the user registers and the top of the user stack (16 KiB) into each
//! sample of a target thread; here the copy is walked with the call frame information of each
//! mapped file (`.eh_frame` through `.eh_frame_hdr`, else `.debug_frame`) by framehop. Frames
//! that no table covers (JIT code, a file without tables) are walked by frame pointer, and a
//! stack deeper than the copy continues on the kernel's frame-pointer walk when the two meet.
//!
//! Why a stack copy and not an unwinder in the kernel (the OpenTelemetry profiler's and
//! lightswitch's design): a copy is one bounded read per sample (perf's `--call-graph dwarf`
//! does the same), needs no table memory in the kernel and no verifier-bounded walk over
//! `bpf_loop`, and unwinds a process whose tables are read after the sample was taken: a
//! short-lived process or a library it `dlopen`ed a moment ago unwinds like the rest, where an
//! in-kernel walker misses every sample until its tables are loaded. Only target samples are
//! copied (the target filter runs first). `cargo xtask bench unwind` measures the cost beside
//! perf's.
//!
//! Tables are read once per file (device, inode, size and change time) for the whole agent:
//! libc's are shared by every process and every concurrent run, and dropped when the last run
//! that used them ends. Their memory has a cap; a file over it is unwound by frame pointer and
//! counted.

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::{
        Arc, Mutex, OnceLock, Weak,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder as _,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _, SegmentFlags};
use toe_common::stacks::UserStackCopy;

/// Unwind-table memory the agent keeps at most, for every run together. libc's tables are
/// about 80 KiB and a large C++ binary's a few MiB, so this holds the files of many processes.
pub const TABLE_MEMORY_CAP: usize = 256 << 20;

static TABLE_MEMORY: AtomicUsize = AtomicUsize::new(0);
/// Files whose tables were read, and the time reading them took, since the agent started.
static FILES_READ: AtomicUsize = AtomicUsize::new(0);
static READ_MICROS: AtomicUsize = AtomicUsize::new(0);

/// Why a file mapped by a target has no tables to unwind with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Miss {
    /// No `.eh_frame` nor `.debug_frame` (Go binaries, some hand-written assembly).
    NoUnwindInfo,
    /// The file could not be read or is not an ELF file.
    Unreadable,
    /// Loading its tables would pass [`TABLE_MEMORY_CAP`].
    MemoryFull,
    /// No file of the process maps the address (JIT code, or a process gone before its
    /// mappings were read).
    NotMapped,
}

/// An executable segment: file bytes from `offset` are loaded at `vaddr`.
#[derive(Clone, Copy, Debug)]
struct Segment {
    offset: u64,
    vaddr: u64,
    size: u64,
}

/// What one file offers for unwinding.
#[derive(Debug)]
pub struct FileTables {
    sections: ExplicitModuleSectionInfo<Bytes>,
    segments: Vec<Segment>,
    bytes: usize,
}

impl Drop for FileTables {
    fn drop(&mut self) {
        TABLE_MEMORY.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Identity of a file's contents: the same (device, inode) with another size or change time
/// was rewritten in place.
type FileKey = (u64, u64, u64, i64, i64);

/// Tables in use by some run, shared with every other run that maps the same file.
fn shared() -> &'static Mutex<HashMap<FileKey, Weak<FileTables>>> {
    static SHARED: OnceLock<Mutex<HashMap<FileKey, Weak<FileTables>>>> = OnceLock::new();
    SHARED.get_or_init(Mutex::default)
}

/// The tables of the file at `path` (a path that opens the very file a process mapped), read
/// once per file for the whole agent.
pub fn tables_of(path: &Path) -> Result<Arc<FileTables>, Miss> {
    let file = File::open(path).map_err(|_| Miss::Unreadable)?;
    let meta = file.metadata().map_err(|_| Miss::Unreadable)?;
    let key = (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.ctime(),
        meta.ctime_nsec(),
    );
    let mut shared = shared()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(t) = shared.get(&key).and_then(Weak::upgrade) {
        return Ok(t);
    }
    shared.retain(|_, w| w.strong_count() > 0);
    let start = std::time::Instant::now();
    let read = read_tables(file);
    FILES_READ.fetch_add(1, Ordering::Relaxed);
    READ_MICROS.fetch_add(
        usize::try_from(start.elapsed().as_micros()).unwrap_or(usize::MAX),
        Ordering::Relaxed,
    );
    let tables = Arc::new(read?);
    shared.insert(key, Arc::downgrade(&tables));
    Ok(tables)
}

fn read_tables(file: File) -> Result<FileTables, Miss> {
    let cache = object::ReadCache::new(file);
    let obj = object::File::parse(&cache).map_err(|_| Miss::Unreadable)?;
    let range = |name: &str| {
        obj.section_by_name(name)
            .map(|s| s.address()..s.address() + s.size())
    };
    let data = |name: &str| -> Option<Bytes> {
        let s = obj.section_by_name(name)?;
        let d = s.data().ok()?;
        (!d.is_empty()).then(|| Bytes::copy_from_slice(d))
    };
    let eh_frame = data(".eh_frame");
    let (eh_frame_hdr, debug_frame) = if eh_frame.is_some() {
        (data(".eh_frame_hdr"), None)
    } else {
        // Only when there is no .eh_frame: .debug_frame can be large, and describes the same.
        (None, data(".debug_frame"))
    };
    if eh_frame.is_none() && debug_frame.is_none() {
        return Err(Miss::NoUnwindInfo);
    }
    let bytes = [&eh_frame, &eh_frame_hdr, &debug_frame]
        .iter()
        .filter_map(|d| d.as_ref().map(Bytes::len))
        .sum();
    if TABLE_MEMORY.fetch_add(bytes, Ordering::Relaxed) + bytes > TABLE_MEMORY_CAP {
        TABLE_MEMORY.fetch_sub(bytes, Ordering::Relaxed);
        return Err(Miss::MemoryFull);
    }
    let segments = obj
        .segments()
        .filter(|s| matches!(s.flags(), SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0))
        .map(|s| {
            let (offset, size) = s.file_range();
            Segment {
                offset,
                vaddr: s.address(),
                size,
            }
        })
        .collect();
    Ok(FileTables {
        sections: ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: range(".text"),
            got_svma: range(".got"),
            eh_frame_svma: range(".eh_frame"),
            eh_frame,
            eh_frame_hdr_svma: range(".eh_frame_hdr"),
            eh_frame_hdr,
            debug_frame,
            ..ExplicitModuleSectionInfo::default()
        },
        segments,
        bytes,
    })
}

/// Unwind-table memory held by the agent now, for every run.
#[must_use]
pub fn table_memory() -> usize {
    TABLE_MEMORY.load(Ordering::Relaxed)
}

/// Files whose tables the agent has read, and the milliseconds that took, since it started.
#[must_use]
pub fn tables_read() -> (u64, f64) {
    #[expect(clippy::cast_precision_loss, reason = "milliseconds for display")]
    let ms = READ_MICROS.load(Ordering::Relaxed) as f64 / 1000.0;
    (FILES_READ.load(Ordering::Relaxed) as u64, ms)
}

/// One process's view for unwinding: a module per executable mapping with tables.
pub struct ProcessUnwinder(UnwinderX86_64<Bytes>);

impl std::fmt::Debug for ProcessUnwinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProcessUnwinder")
    }
}

/// One executable mapping of a process: `[start, end)` maps the file from `offset` on.
pub struct MappingTables<'a> {
    pub name: &'a str,
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub tables: &'a FileTables,
}

impl ProcessUnwinder {
    #[must_use]
    pub fn new<'a>(mappings: impl IntoIterator<Item = MappingTables<'a>>) -> Self {
        let mut u = UnwinderX86_64::new();
        for m in mappings {
            // The segment this mapping loads; addresses in the file's tables are its virtual
            // addresses, so the module's base is where virtual address 0 would be.
            // The mapping starts at the page below the segment's file offset when a linker
            // (lld) does not align segments to pages in the file: overlap is what matches.
            let len = m.end - m.start;
            let Some(seg) = m
                .tables
                .segments
                .iter()
                .find(|s| s.offset < m.offset + len && m.offset < s.offset + s.size)
            else {
                continue;
            };
            let base = m
                .start
                .wrapping_add(seg.offset)
                .wrapping_sub(seg.vaddr)
                .wrapping_sub(m.offset);
            u.add_module(Module::new(
                m.name.to_owned(),
                m.start..m.end,
                base,
                m.tables.sections.clone(),
            ));
        }
        Self(u)
    }
}

/// How a sample's user stack was unwound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// From tables (and frame pointers where no table covers a frame) to a root frame.
    Tables,
    /// From tables over the copied stack, continued on the kernel's frame-pointer walk.
    Joined,
    /// The tables gave no more frames than the kernel's frame-pointer walk, which was kept.
    FramePointers,
}

/// The user registers and stack bytes a sample carries.
pub struct StackCopy<'a> {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub bytes: &'a [u8],
}

impl<'a> StackCopy<'a> {
    /// The registers and bytes the kernel copied; None when it copied nothing.
    #[must_use]
    pub fn of(c: &'a UserStackCopy) -> Option<Self> {
        let len = (c.len as usize).min(c.bytes.len());
        (len > 0).then(|| Self {
            ip: c.regs[0],
            sp: c.regs[1],
            bp: c.regs[2],
            bytes: &c.bytes[..len],
        })
    }
}

/// Per-thread state of the unwinder (framehop's rule cache).
pub struct UnwindCache(Box<CacheX86_64>);

impl Default for UnwindCache {
    fn default() -> Self {
        Self(Box::new(CacheX86_64::new()))
    }
}

/// Unwinds `copy` with `unwinder` into `out` (leaf first, as the kernel reports stacks), up to
/// `max` frames, then decides between it and the kernel's frame-pointer walk `fp`.
pub fn unwind(
    unwinder: &ProcessUnwinder,
    cache: &mut UnwindCache,
    copy: &StackCopy<'_>,
    fp: &[u64],
    max: usize,
    out: &mut Vec<u64>,
) -> Outcome {
    out.clear();
    let mut read = |addr: u64| -> Result<u64, ()> {
        let off = usize::try_from(addr.checked_sub(copy.sp).ok_or(())?).map_err(|_| ())?;
        let word = copy.bytes.get(off..off + 8).ok_or(())?;
        Ok(u64::from_le_bytes(word.try_into().map_err(|_| ())?))
    };
    let mut frames = unwinder.0.iter_frames(
        copy.ip,
        UnwindRegsX86_64::new(copy.ip, copy.sp, copy.bp),
        &mut cache.0,
        &mut read,
    );
    let mut complete = false;
    while out.len() < max {
        match frames.next() {
            Ok(Some(FrameAddress::InstructionPointer(a))) => out.push(a),
            Ok(Some(FrameAddress::ReturnAddress(a))) => out.push(a.get()),
            Ok(None) => {
                complete = true;
                break;
            }
            Err(_) => break,
        }
    }
    if complete {
        return Outcome::Tables;
    }
    // The copy ended before the stack did: continue where the frame-pointer walk passes the
    // same return address (searched from the root end, so recursion joins at its deepest
    // point the walk shares).
    if out.len() > 1
        && let Some(&last) = out.last()
        && let Some(j) = fp.iter().skip(1).rposition(|&a| a == last)
    {
        let rest = &fp[j + 2..];
        let room = max.saturating_sub(out.len());
        out.extend_from_slice(&rest[..rest.len().min(room)]);
        return Outcome::Joined;
    }
    if out.len() > fp.len() {
        return Outcome::Tables;
    }
    out.clear();
    out.extend_from_slice(fp);
    Outcome::FramePointers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_tables() -> Arc<FileTables> {
        tables_of(Path::new("/proc/self/exe")).expect("this test binary has .eh_frame")
    }

    #[test]
    fn own_binary_has_tables_and_an_executable_segment() {
        let t = own_tables();
        assert!(t.sections.eh_frame.is_some() && t.sections.eh_frame_hdr.is_some());
        assert!(!t.segments.is_empty());
        assert!(table_memory() >= t.bytes);
        // Read once: a second look shares the same tables.
        assert!(Arc::ptr_eq(&t, &own_tables()));
    }

    #[test]
    fn a_file_without_tables_is_a_miss_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("text");
        std::fs::write(&text, "not an ELF file").unwrap();
        assert_eq!(tables_of(&text).unwrap_err(), Miss::Unreadable);
    }

    #[test]
    fn joins_the_frame_pointer_walk_where_the_copy_ends() {
        // No modules: framehop walks by frame pointer over the copied bytes. A frame at bp
        // holds (caller's bp, return address); the second frame's bp points past the copy.
        let sp = 0x1000u64;
        let mut bytes = vec![0u8; 32];
        bytes[16..24].copy_from_slice(&0x9000u64.to_le_bytes());
        bytes[24..32].copy_from_slice(&0x4242u64.to_le_bytes());
        let copy = StackCopy {
            ip: 0x4000,
            sp,
            bp: sp + 16,
            bytes: &bytes,
        };
        let u = ProcessUnwinder::new([]);
        let mut cache = UnwindCache::default();
        let mut out = Vec::new();
        let fp = [0x4000, 0x4242, 0x5555, 0x6666];
        assert_eq!(
            unwind(&u, &mut cache, &copy, &fp, 127, &mut out),
            Outcome::Joined
        );
        assert_eq!(out, fp);
        // Nothing in common: the longer walk wins.
        let fp = [0x4000, 0x7777, 0x5555];
        assert_eq!(
            unwind(&u, &mut cache, &copy, &fp, 127, &mut out),
            Outcome::FramePointers
        );
        assert_eq!(out, fp);
        // And the depth cap holds.
        let fp = [0x4000, 0x4242, 0x5555, 0x6666];
        unwind(&u, &mut cache, &copy, &fp, 3, &mut out);
        assert_eq!(out, [0x4000, 0x4242, 0x5555]);
    }
}
