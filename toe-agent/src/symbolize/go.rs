//! Names for Go code in stripped binaries. Go binaries are usually shipped without `.symtab`
//! (`-ldflags "-s -w"`, as Kubernetes' own are), but every one keeps `.gopclntab`: the table
//! Go's runtime itself uses for tracebacks, with each function's entry, name, and pc-to-file
//! and pc-to-line tables. `go tool pprof` and the OpenTelemetry profiler symbolize from it.
//!
//! The reader is written here: blazesym does not read the table and no maintained crate made
//! for profilers does. The layout is the one Go's `runtime/symtab.go` and `debug/gosym`
//! define, for Go 1.16 and later (the three header versions below). The table is untrusted
//! input (a container's binary): every read is bounds-checked against the table, a lookup
//! reads only the entries it needs from the file (a large binary's table is tens of MiB), and
//! nothing in it can make the agent allocate more than the function count the table's size
//! allows.

use std::{fs::File, os::unix::fs::FileExt, path::Path};

use object::{Object, ObjectSection};

use super::debuginfo::Segments;

/// Header magics: Go 1.16-1.17, 1.18-1.19, 1.20 and later.
const GO116: u32 = 0xffff_fffa;
const GO118: u32 = 0xffff_fff0;
const GO120: u32 = 0xffff_fff1;

/// How far a pc-value table is decoded before it counts as corrupt: tables of real
/// functions are a few hundred bytes.
const PCTAB_READ: usize = 64 * 1024;
/// Largest function list read (8 million functions; kube-apiserver has about 100 thousand):
/// the list is held in memory, and a hostile binary must not make it huge.
const FUNCTAB_CAP: u64 = 64 << 20;
/// Longest function or file name read.
const NAME_READ: usize = 4096;
/// Bytes of a function record read: its fixed fields and its pc-data and func-data offsets
/// (a handful each in real binaries; offsets past this are not read).
const RECORD_READ: usize = 256;
/// Deepest chain of inlined calls followed at one address: Go's inliner nests a few levels;
/// a cycle in a corrupt tree must end.
const INLINE_DEPTH: usize = 64;
/// Largest inline-tree index read (the runtime's own bound).
const INLINE_INDEX_CAP: u64 = 1 << 20;
/// Largest `.noptrdata` searched for the module data (it is near its start in real binaries).
const MODULEDATA_SEARCH: u64 = 64 << 20;
/// The pc-data table that gives the inline-tree index at each pc, and the func-data slot of the
/// inline tree (Go's `_PCDATA_InlTreeIndex` and `_FUNCDATA_InlTree`, unchanged since 1.12).
const PCDATA_INL_TREE_INDEX: u32 = 2;
const FUNCDATA_INL_TREE: u32 = 3;

/// One function, file and line for an address: the function whose code it is, or one of the
/// functions it was inlined into, with the line of the call.
#[derive(Debug, PartialEq, Eq)]
pub struct GoFrame {
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
}

/// A Go binary's function table, with the file kept open to read names and line tables on
/// demand.
pub struct GoTable {
    file: File,
    /// File offset and length of the table.
    base: u64,
    len: u64,
    old: bool,
    /// Go 1.20 or later: a record field and an inline-tree layout differ.
    go120: bool,
    quantum: u64,
    funcname: u64,
    cu: u64,
    filetab: u64,
    pctab: u64,
    pcln: u64,
    /// Each function's entry address and its record's offset (from `pcln`), sorted, ending
    /// with the end of the last function.
    entries: Vec<(u64, u64)>,
    loads: Segments,
    /// The address func-data offsets are relative to (the module data's `gofunc`, Go 1.18 and
    /// later; func data are absolute addresses before): where inline trees are found. `None`
    /// when the module data was not found, and inlined frames are then not expanded. (A
    /// position-independent binary from Go's own linker has its link-time addresses written in
    /// place as well as in its relocations, so it is found there too.)
    gofunc: Option<u64>,
}

impl std::fmt::Debug for GoTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoTable")
            .field("functions", &self.functions())
            .finish_non_exhaustive()
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

enum Decoded {
    Value(i32),
    /// The table ended before `pc`.
    End,
    /// The bytes ended before the table did.
    Short,
}

/// Go's `pcvalue`: pairs of a zig-zag value delta and a pc delta (in units of `quantum`), in
/// varints, from the value -1 at the function's `entry`; a zero value delta after the first
/// pair ends the table.
fn decode_pcvalue(table: &[u8], entry: u64, pc: u64, quantum: u64) -> Decoded {
    let mut p = table;
    let mut varint = || -> Option<u32> {
        let mut v: u32 = 0;
        for shift in (0..35).step_by(7) {
            let (&b, rest) = p.split_first()?;
            p = rest;
            v |= u32::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    };
    let mut value: i32 = -1;
    let mut at = entry;
    let mut first = true;
    loop {
        let Some(delta) = varint() else {
            return Decoded::Short;
        };
        if delta == 0 && !first {
            return Decoded::End;
        }
        first = false;
        value = value.wrapping_add((delta >> 1).cast_signed() ^ -((delta & 1).cast_signed()));
        let Some(step) = varint() else {
            return Decoded::Short;
        };
        match at.checked_add(u64::from(step) * quantum) {
            Some(next) => at = next,
            None => return Decoded::End,
        }
        if pc < at {
            return Decoded::Value(value);
        }
    }
}

/// Where the table starts in `data`: at 0 for a section of its own; searched for in
/// `.data.rel.ro`, where an external linker puts it in a position-independent Go binary.
fn find_header(data: &[u8], search: bool) -> Option<usize> {
    let valid = |at: usize| {
        let h = data.get(at..at + 8)?;
        let ok = matches!(u32_at(h, 0)?, GO116 | GO118 | GO120)
            && h[4..6] == [0, 0]
            && matches!(h[6], 1 | 2 | 4)
            && h[7] == 8;
        ok.then_some(at)
    };
    if !search {
        return valid(0);
    }
    (0..data.len().saturating_sub(8)).step_by(8).find_map(valid)
}

impl GoTable {
    /// Reads the table of the Go binary at `path`; `None` when it is not a 64-bit Go binary
    /// with a table this reader understands.
    #[must_use]
    pub fn read(path: &Path) -> Option<Self> {
        let file = File::open(path).ok()?;
        let (base, len, loads, text, noptrdata) = {
            let cache = object::ReadCache::new(&file);
            let obj = object::File::parse(&cache).ok()?;
            let loads = Segments::of(&obj);
            let text = obj.section_by_name(".text").map(|s| s.address());
            // Where the linker puts the module data, which says where inline trees are.
            let noptrdata = obj
                .section_by_name(".noptrdata")
                .and_then(|s| s.file_range());
            // Position-independent builds name it `.data.rel.ro.gopclntab` (Go's own linker)
            // or merge it into `.data.rel.ro` (an external linker).
            let own = obj
                .section_by_name(".gopclntab")
                .or_else(|| obj.section_by_name(".data.rel.ro.gopclntab"));
            let (section, search) = match own {
                Some(s) => (s, false),
                // A Go binary says so in a section of its own; only then is the search worth it.
                None if obj.section_by_name(".go.buildinfo").is_some() => {
                    (obj.section_by_name(".data.rel.ro")?, true)
                }
                None => return None,
            };
            let (off, size) = section.file_range()?;
            let data = section.data().ok()?;
            let at = find_header(data, search)?;
            let address = section.address() + at as u64;
            (
                off + at as u64,
                size - at as u64,
                loads,
                text,
                noptrdata.map(|n| (n, address)),
            )
        };
        let mut header = [0u8; 72];
        file.read_exact_at(&mut header, base).ok()?;
        let magic = u32_at(&header, 0)?;
        let quantum = u64::from(header[6]);
        let word = |i: usize| u64_at(&header, 8 + 8 * i);
        let nfunc = word(0)?;
        // Go 1.16's header has no text start; later ones do, before the offsets.
        let (text_start, first) = if magic == GO116 {
            (0, 2)
        } else {
            (word(2)?, 3)
        };
        let text_start = if text_start == 0 { text? } else { text_start };
        let [funcname, cu, filetab, pctab, pcln] =
            [0, 1, 2, 3, 4].map(|i| word(first + i).unwrap_or(u64::MAX));
        let old = magic == GO116;
        let entries = read_functab(&file, base, len, pcln, nfunc, old, text_start)?;
        let gofunc = match magic {
            GO116 => Some(0),
            _ => noptrdata.and_then(|((at, size), table)| {
                find_gofunc(
                    &file,
                    (at, size),
                    table,
                    table.wrapping_add(funcname),
                    text_start,
                    magic == GO120,
                )
            }),
        };
        Some(Self {
            file,
            base,
            len,
            old,
            go120: magic == GO120,
            quantum,
            funcname,
            cu,
            filetab,
            pctab,
            pcln,
            entries,
            loads,
            gofunc,
        })
    }

    /// How many functions the table names.
    #[must_use]
    pub fn functions(&self) -> usize {
        self.entries.len().saturating_sub(1)
    }

    /// Reads `n` bytes at `at` within the table, fewer at its end.
    fn bytes(&self, at: u64, n: usize) -> Option<Vec<u8>> {
        let n = usize::try_from(self.len.checked_sub(at)?).map_or(n, |left| left.min(n));
        let mut b = vec![0u8; n];
        self.file.read_exact_at(&mut b, self.base + at).ok()?;
        Some(b)
    }

    /// A NUL-terminated string at `at` within the table.
    fn string(&self, at: u64) -> Option<String> {
        let b = self.bytes(at, NAME_READ)?;
        let end = b.iter().position(|&c| c == 0)?;
        Some(String::from_utf8_lossy(&b[..end]).into_owned())
    }

    /// The value a pc-value table at `off` gives `pc`, in the function starting at `entry`.
    /// Read a little first (real tables are short), then up to [`PCTAB_READ`] when that
    /// was not enough.
    fn pcvalue(&self, off: u32, entry: u64, pc: u64) -> Option<i32> {
        if off == 0 {
            return None;
        }
        let at = self.pctab.checked_add(u64::from(off))?;
        for read in [1024, PCTAB_READ] {
            let table = self.bytes(at, read)?;
            match decode_pcvalue(&table, entry, pc, self.quantum) {
                Decoded::Value(v) => return Some(v),
                Decoded::End => return None,
                Decoded::Short if table.len() < read => return None,
                Decoded::Short => {}
            }
        }
        None
    }

    /// The address of file offset `offset`, the entry of the function holding it, and that
    /// function's record.
    fn function_at(&self, offset: u64) -> Option<(u64, u64, Vec<u8>)> {
        let pc = self.loads.address(offset)?;
        let i = self.entries.partition_point(|e| e.0 <= pc);
        if i == 0 || i >= self.entries.len() {
            return None;
        }
        let (entry, funcoff) = self.entries[i - 1];
        let record = self.bytes(self.pcln.checked_add(funcoff)?, RECORD_READ)?;
        Some((pc, entry, record))
    }

    /// Where a record's fixed fields end and its pc-data offsets begin, and where its func-data
    /// count is: Go 1.16's record starts with an 8-byte entry, 1.20's has a start line more.
    fn layout(&self) -> (usize, usize) {
        if self.old || self.go120 {
            (44, 43)
        } else {
            (40, 39)
        }
    }

    /// The value pc-data table `table` of a function gives `pc`; `None` when the function has
    /// no such table.
    fn pcdata(&self, record: &[u8], table: u32, entry: u64, pc: u64) -> Option<i32> {
        if table >= self.field(record, 7)? {
            return None;
        }
        let (start, _) = self.layout();
        let off = u32_at(record, start + 4 * table as usize)?;
        self.pcvalue(off, entry, pc)
    }

    /// The file offset of a function's inline tree, if it has one.
    fn inline_tree(&self, record: &[u8]) -> Option<u64> {
        let gofunc = self.gofunc?;
        let (start, count) = self.layout();
        if FUNCDATA_INL_TREE >= u32::from(*record.get(count)?) {
            return None;
        }
        let npcdata = self.field(record, 7)? as usize;
        let slots = start.checked_add(npcdata.checked_mul(4)?)?;
        let address = if self.old {
            // Go 1.16-1.17: absolute addresses, aligned to 8 bytes in memory (the record is
            // 8-aligned in the table, and the table in its section).
            let slots = slots.next_multiple_of(8);
            u64_at(record, slots + 8 * FUNCDATA_INL_TREE as usize).filter(|&a| a != 0)?
        } else {
            let off = u32_at(record, slots + 4 * FUNCDATA_INL_TREE as usize)?;
            if off == u32::MAX {
                return None;
            }
            gofunc.checked_add(u64::from(off))?
        };
        self.loads.offset(address)
    }

    /// Entry `index` of the inline tree at `tree`: the called function's name offset and the
    /// offset from the function's entry of an instruction at the call site.
    fn inlined_call(&self, tree: u64, index: i32) -> Option<(i32, u32)> {
        let index = u64::try_from(index)
            .ok()
            .filter(|&i| i < INLINE_INDEX_CAP)?;
        // Go 1.20 and later: {funcID u8, _ [3]u8, nameOff i32, parentPc i32, startLine i32};
        // before: {parent i16, funcID u8, _ u8, file i32, line i32, func_ i32, parentPc i32}.
        let (size, name, parent_pc) = if self.go120 { (16, 4, 8) } else { (20, 12, 16) };
        let mut e = [0u8; 20];
        self.file
            .read_exact_at(&mut e[..size], tree.checked_add(index * size as u64)?)
            .ok()?;
        Some((u32_at(&e, name)?.cast_signed(), u32_at(&e, parent_pc)?))
    }

    /// A name in the function-name table.
    fn name(&self, off: i32) -> Option<String> {
        self.string(
            self.funcname
                .checked_add(u64::from(off.max(0).cast_unsigned()))?,
        )
    }

    /// The file and line at `pc` in a function: of the innermost function inlined there.
    fn position(&self, record: &[u8], entry: u64, pc: u64) -> (Option<String>, Option<u32>) {
        let field = |n: usize| self.field(record, n);
        let file = field(8).zip(field(5)).and_then(|(cu_offset, pcfile)| {
            let n = self.pcvalue(pcfile, entry, pc)?;
            let index = u64::from(cu_offset.checked_add(u32::try_from(n).ok()?)?);
            let at = u32_at(&self.bytes(self.cu.checked_add(index * 4)?, 4)?, 0)?;
            (at != u32::MAX).then(|| self.string(self.filetab.checked_add(u64::from(at))?))?
        });
        let line = field(6)
            .and_then(|pcln| self.pcvalue(pcln, entry, pc))
            .and_then(|l| u32::try_from(l).ok());
        (file, line)
    }

    /// Field `n` of a function record (Go 1.16's starts with an 8-byte entry, later ones with
    /// a 4-byte offset): 1 name, 4 pc-to-SP table, 5 pc-to-file, 6 pc-to-line, 8 CU offset.
    fn field(&self, record: &[u8], n: usize) -> Option<u32> {
        u32_at(record, if self.old { 4 } else { 0 } + 4 * n)
    }

    /// How far the stack pointer at file offset `offset` lies below its value at the
    /// function's entry: the return address is at `sp + delta`. Go code has no unwind tables,
    /// and a leaf function without a frame of its own does not set the frame pointer, so a
    /// frame-pointer walk from it skips its caller; this finds the caller.
    #[must_use]
    pub fn sp_delta(&self, offset: u64) -> Option<u64> {
        let (pc, entry, record) = self.function_at(offset)?;
        let delta = self.pcvalue(self.field(&record, 4)?, entry, pc)?;
        u64::try_from(delta).ok()
    }

    /// The frames at file offset `offset`: the function holding it first, then each function
    /// inlined there, the one whose code it is last; each with its file and line (the call's,
    /// for all but the last), as Go's own tracebacks expand them.
    #[must_use]
    pub fn lookup(&self, offset: u64) -> Option<Vec<GoFrame>> {
        let (pc, entry, record) = self.function_at(offset)?;
        let function = self.name(self.field(&record, 1)?.cast_signed())?;
        let mut frames = Vec::new();
        let mut at = pc;
        if let Some(tree) = self.inline_tree(&record) {
            // The inline-tree index at a pc names the function inlined there; its call site is
            // an instruction of the caller, whose own index (or -1: the function itself) comes
            // next.
            while frames.len() < INLINE_DEPTH {
                let Some(index) = self
                    .pcdata(&record, PCDATA_INL_TREE_INDEX, entry, at)
                    .filter(|&i| i >= 0)
                else {
                    break;
                };
                let Some((name, parent_pc)) = self.inlined_call(tree, index) else {
                    break;
                };
                let (file, line) = self.position(&record, entry, at);
                frames.push(GoFrame {
                    function: self.name(name).unwrap_or_else(|| "[inlined]".to_owned()),
                    file,
                    line,
                });
                at = entry.checked_add(u64::from(parent_pc))?;
            }
        }
        let (file, line) = self.position(&record, entry, at);
        frames.push(GoFrame {
            function,
            file,
            line,
        });
        frames.reverse();
        Some(frames)
    }
}

/// The function list: each function's entry address and record offset, sorted, ending with the
/// end of the last function.
fn read_functab(
    file: &File,
    base: u64,
    len: u64,
    pcln: u64,
    nfunc: u64,
    old: bool,
    text_start: u64,
) -> Option<Vec<(u64, u64)>> {
    let entry_size: u64 = if old { 16 } else { 8 };
    let functab = nfunc.checked_add(1)?.checked_mul(entry_size)?;
    if pcln.checked_add(functab)? > len || nfunc == 0 || functab > FUNCTAB_CAP {
        return None;
    }
    let mut raw = vec![0u8; usize::try_from(functab).ok()?];
    file.read_exact_at(&mut raw, base + pcln).ok()?;
    let entries: Vec<_> = raw
        .chunks_exact(usize::try_from(entry_size).ok()?)
        .map(|e| {
            if old {
                (u64_at(e, 0).unwrap_or(0), u64_at(e, 8).unwrap_or(0))
            } else {
                (
                    text_start.wrapping_add(u64::from(u32_at(e, 0).unwrap_or(0))),
                    u64::from(u32_at(e, 4).unwrap_or(0)),
                )
            }
        })
        .collect();
    // The table is sorted by entry in every binary Go links; one that is not is corrupt.
    if !entries.is_sorted_by_key(|e| e.0) {
        return None;
    }
    Some(entries)
}

/// The module data's `gofunc` of a Go 1.18+ binary: the runtime's `firstmoduledata` lies in
/// `.noptrdata` and starts with the table's address, then the function-name table's; its
/// `text` field must be the table's text start. Its offset differs by version: Go 1.20 added
/// two coverage fields before it.
fn find_gofunc(
    file: &File,
    (at, size): (u64, u64),
    table: u64,
    funcnames: u64,
    text_start: u64,
    go120: bool,
) -> Option<u64> {
    const TEXT: usize = 22 * 8;
    let gofunc_at = if go120 { 40 * 8 } else { 38 * 8 };
    if size > MODULEDATA_SEARCH {
        return None;
    }
    let mut data = vec![0u8; usize::try_from(size).ok()?];
    file.read_exact_at(&mut data, at).ok()?;
    (0..=data.len().checked_sub(gofunc_at + 8)?)
        .step_by(8)
        .find(|&i| {
            u64_at(&data, i) == Some(table)
                && u64_at(&data, i + 8) == Some(funcnames)
                && u64_at(&data, i + TEXT) == Some(text_start)
        })
        .and_then(|i| u64_at(&data, i + gofunc_at))
        .filter(|&g| g != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_found_only_where_valid() {
        let mut data = vec![0u8; 64];
        data[16..20].copy_from_slice(&GO120.to_le_bytes());
        data[22] = 1;
        data[23] = 8;
        assert_eq!(find_header(&data, true), Some(16));
        assert_eq!(find_header(&data, false), None);
        data[23] = 4;
        assert_eq!(find_header(&data, true), None);
    }

    #[test]
    fn pc_value_tables_decode_as_go_writes_them() {
        // From -1: +1 over 4 bytes (value 0), +8 over 16 (value 8), -8 over 2 (value 0), end.
        let table = [0x02, 0x04, 0x10, 0x10, 0x0f, 0x02, 0x00];
        let at = |pc| match decode_pcvalue(&table, 0x1000, pc, 1) {
            Decoded::Value(v) => Some(v),
            _ => None,
        };
        assert_eq!(at(0x1000), Some(0));
        assert_eq!(at(0x1003), Some(0));
        assert_eq!(at(0x1004), Some(8));
        assert_eq!(at(0x1013), Some(8));
        assert_eq!(at(0x1014), Some(0));
        assert_eq!(at(0x1016), None);
        assert!(matches!(
            decode_pcvalue(&table[..3], 0x1000, 0x1010, 1),
            Decoded::Short
        ));
    }

    #[test]
    fn module_data_is_found_by_its_pointers_and_text() {
        // Module data at 24 in a fake `.noptrdata` (at file offset 8): the table's address, the
        // name table's, `text` at 22 words, `gofunc` at 38 words (Go 1.18) or 40 (1.20).
        let mut data = vec![0u8; 8 + 24 + 41 * 8];
        let module = 8 + 24;
        let mut put = |word: usize, v: u64| {
            data[module + 8 * word..module + 8 * word + 8].copy_from_slice(&v.to_le_bytes());
        };
        put(0, 0x48_f4c0);
        put(1, 0x48_f540);
        put(22, 0x40_1000);
        put(38, 0x47_a960);
        put(40, 0x47_b000);
        let path = std::env::temp_dir().join(format!("toe-go-moduledata-{}", std::process::id()));
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let range = (8, data.len() as u64 - 8);
        let find = |table, text, go120| find_gofunc(&file, range, table, 0x48_f540, text, go120);
        assert_eq!(find(0x48_f4c0, 0x40_1000, false), Some(0x47_a960));
        assert_eq!(find(0x48_f4c0, 0x40_1000, true), Some(0x47_b000));
        // Another table's address, or another text start: not this module.
        assert_eq!(find(0x48_f4c8, 0x40_1000, false), None);
        assert_eq!(find(0x48_f4c0, 0x40_2000, false), None);
    }

    #[test]
    fn binaries_without_a_go_table_have_none() {
        assert!(GoTable::read(Path::new("/bin/sh")).is_none());
        assert!(GoTable::read(Path::new("/nonexistent")).is_none());
    }
}
