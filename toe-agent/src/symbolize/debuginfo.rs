//! Separate debug files, found inside the target's own root.
//!
//! Distribution packages ship binaries stripped of their symbol tables and DWARF and put both in
//! a separate file (Debian's `-dbgsym`, Fedora's `-debuginfo`), found by the binary's build-id
//! (`/usr/lib/debug/.build-id/ab/cdef....debug`) or by the name and CRC in its `.gnu_debuglink`
//! (next to the binary, in its `.debug/`, or under `/usr/lib/debug/` + its directory). Without
//! it a stripped library's internal functions are named after the nearest exported symbol, or
//! not at all.
//!
//! A container's binary must be matched with the container's debug file: the host's file of the
//! same name belongs to another build. blazesym looks for debug files by host path, so TOE gives
//! it no debug directories and finds the file itself: every candidate is opened inside the
//! process's root (`openat2` with `RESOLVE_IN_ROOT`, so a symlink cannot lead out of it) and
//! used only when its build-id equals the binary's, or, for a binary without one, when its CRC
//! is the one the debug link names.

use std::{
    fmt::Write as _,
    fs::File,
    io::Read as _,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use nix::{fcntl::OFlag, sys::stat::Mode};
use object::{Object, ObjectSegment};

/// A debug file bigger than this is not read for its CRC (the build-id match needs no read).
const CRC_READ_CAP: u64 = 4 << 30;

/// How a debug file was matched with its binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matched {
    BuildId,
    DebugLink,
}

/// The verified debug file of one mapped file, held open.
#[derive(Debug)]
pub struct DebugFile {
    file: File,
    /// Where it was found, inside the target's root.
    pub path: String,
    pub matched: Matched,
    /// The dwz file it names, when it names one.
    pub supplementary: Option<Supplementary>,
}

impl DebugFile {
    /// A path that opens the debug file while this is held.
    #[must_use]
    pub fn open_path(&self) -> PathBuf {
        fd_path(&self.file)
    }
}

fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// The supplementary file a debug file compressed with dwz names in `.gnu_debugaltlink` (an
/// absolute path and a build-id): dwz moves what several programs' DWARF shares into it, names
/// of functions among them, so without it some frames have no name and none has a line from
/// the shared part. Debian and Fedora ship most debug files so.
#[derive(Debug)]
pub enum Supplementary {
    /// Found inside the target's root with the build-id the debug file names, held open.
    Found { file: File, path: String },
    /// Not in the target's root: the path the debug file names.
    Missing(String),
}

impl Supplementary {
    /// A path that opens the file while this is held; None when it was not found.
    #[must_use]
    pub fn open_path(&self) -> Option<PathBuf> {
        match self {
            Self::Found { file, .. } => Some(fd_path(file)),
            Self::Missing(_) => None,
        }
    }
}

/// The supplementary file `debug` (found at `debug_path` inside `pid`'s root) names, looked
/// for inside the same root (blazesym would look by the host's path, and a container's debug
/// file belongs with the container's): at the path it names, then under the build-id it names,
/// and used only when that build-id matches.
fn supplementary(pid: u32, debug: &File, debug_path: &str) -> Option<Supplementary> {
    let cache = object::ReadCache::new(debug);
    let obj = object::File::parse(&cache).ok()?;
    let (name, id) = obj.gnu_debugaltlink().ok().flatten()?;
    let name = String::from_utf8_lossy(name).into_owned();
    let mut places = Vec::new();
    if name.starts_with('/') {
        places.push(name.clone());
    } else {
        let dir = Path::new(debug_path).parent().unwrap_or(Path::new("/"));
        places.push(dir.join(&name).to_string_lossy().into_owned());
    }
    if id.len() >= 2 {
        places.push(format!(
            "/usr/lib/debug/.build-id/{:02x}/{}.debug",
            id[0],
            hex(&id[1..])
        ));
    }
    let found = places.into_iter().find_map(|place| {
        let fd = crate::targets::open_in_root(pid, &place, OFlag::O_RDONLY, Mode::empty()).ok()?;
        let file = File::from(fd);
        let cache = object::ReadCache::new(&file);
        let matches = object::File::parse(&cache)
            .ok()
            .and_then(|o| o.build_id().ok().flatten().map(<[u8]>::to_vec))
            .is_some_and(|b| b == id);
        drop(cache);
        matches.then_some(Supplementary::Found { file, path: place })
    });
    Some(found.unwrap_or(Supplementary::Missing(name)))
}

/// The fullest names an ELF file carries itself, best last.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum OwnNames {
    /// Not an ELF file this reader knows.
    #[default]
    NotElf,
    /// Stripped of every symbol table.
    Nothing,
    /// The exported symbols (`.dynsym`) only.
    Exported,
    /// A full symbol table, no DWARF: no lines.
    Symbols,
    /// Its own DWARF, so it needs no debug file.
    Dwarf,
}

/// What the agent keeps of a mapped ELF file's headers: which build it is, where its loadable
/// segments sit (file offsets become the virtual addresses symbolizers and debug files take),
/// and what it says about its debug file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ElfFacts {
    pub build_id: Option<Vec<u8>>,
    /// The same in hex, as frames carry it.
    build_id_hex: Option<String>,
    link: Option<(String, u32)>,
    /// The fullest names it carries itself.
    pub names: OwnNames,
    loads: Segments,
}

/// An ELF file's loadable segments: (file offset, virtual address, file size) each, to turn
/// file offsets (what a process's mappings give) into the addresses its tables speak of, and
/// back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segments(Vec<(u64, u64, u64)>);

impl Segments {
    #[must_use]
    pub fn of<'d, R: object::ReadRef<'d>>(obj: &object::File<'d, R>) -> Self {
        Self(
            obj.segments()
                .map(|s| {
                    let (off, size) = s.file_range();
                    (off, s.address(), size)
                })
                .collect(),
        )
    }

    /// The virtual address of file offset `offset`.
    #[must_use]
    pub fn address(&self, offset: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|&&(off, _, size)| offset >= off && offset - off < size)
            .map(|&(off, vaddr, _)| vaddr + (offset - off))
    }

    /// The file offset of virtual address `address`.
    #[must_use]
    pub fn offset(&self, address: u64) -> Option<u64> {
        self.0
            .iter()
            .find(|&&(_, a, size)| address >= a && address - a < size)
            .map(|&(o, a, _)| o + (address - a))
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl ElfFacts {
    /// The facts of `binary`; empty for a file that is not ELF.
    #[must_use]
    pub fn read(binary: &File) -> Self {
        let cache = object::ReadCache::new(binary);
        let Ok(obj) = object::File::parse(&cache) else {
            return Self::default();
        };
        let build_id = obj
            .build_id()
            .ok()
            .flatten()
            .filter(|b| b.len() >= 2)
            .map(<[u8]>::to_vec);
        let has = |name: &str| obj.section_by_name(name).is_some();
        Self {
            build_id_hex: build_id.as_deref().map(hex),
            build_id,
            link: obj
                .gnu_debuglink()
                .ok()
                .flatten()
                .and_then(|(name, crc)| Some((link_name(name)?, crc))),
            names: if has(".debug_info") {
                OwnNames::Dwarf
            } else if has(".symtab") {
                OwnNames::Symbols
            } else if has(".dynsym") {
                OwnNames::Exported
            } else {
                OwnNames::Nothing
            },
            loads: Segments::of(&obj),
        }
    }

    /// The ELF virtual address of `offset` in the file (what its symbol table, its DWARF and
    /// its debug file's speak of).
    #[must_use]
    pub fn virtual_address(&self, offset: u64) -> Option<u64> {
        self.loads.address(offset)
    }

    /// The build-id in lower-case hex, as `readelf -n` and pprof write it.
    #[must_use]
    pub fn build_id_hex(&self) -> Option<String> {
        self.build_id_hex.clone()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A debug link names a file, never a path: anything else is refused.
fn link_name(raw: &[u8]) -> Option<String> {
    let name = std::str::from_utf8(raw).ok()?;
    let plain = !name.is_empty()
        && name.len() <= 255
        && !name.contains('/')
        && name != "."
        && name != ".."
        && !name.contains('\0');
    plain.then(|| name.to_owned())
}

/// Where GDB's order looks for the debug file of `binary` (its path inside the root).
fn candidates(binary: &str, w: &ElfFacts) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(id) = &w.build_id {
        let rest = hex(&id[1..]);
        out.push(format!(
            "/usr/lib/debug/.build-id/{:02x}/{rest}.debug",
            id[0]
        ));
    }
    if let Some((name, _)) = &w.link {
        let dir = Path::new(binary)
            .parent()
            .map_or_else(|| "/".to_owned(), |d| d.to_string_lossy().into_owned());
        let dir = dir.trim_end_matches('/');
        out.push(format!("{dir}/{name}"));
        out.push(format!("{dir}/.debug/{name}"));
        out.push(format!("/usr/lib/debug{dir}/{name}"));
        // `/proc/<pid>/maps` names a file as the agent's mount namespace reaches it: where the
        // container's root is a directory of a larger mount, the path carries that directory
        // in front. The same places under each shorter tail of the directory, then (the match
        // is still checked, so a guess cannot pick another build's file).
        let mut tail = dir;
        while let Some(i) = tail.get(1..).and_then(|t| t.find('/')) {
            tail = &tail[i + 1..];
            out.push(format!("{tail}/{name}"));
            out.push(format!("{tail}/.debug/{name}"));
        }
    }
    out.retain(|c| c != binary);
    out
}

/// Whether `candidate` is the debug file `w` asks for.
fn verified(candidate: &File, w: &ElfFacts) -> bool {
    let Ok(meta) = candidate.metadata() else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    if let Some(id) = &w.build_id {
        let cache = object::ReadCache::new(candidate);
        let Ok(obj) = object::File::parse(&cache) else {
            return false;
        };
        return obj.build_id().ok().flatten() == Some(id.as_slice())
            && (obj.section_by_name(".debug_info").is_some()
                || obj.section_by_name(".symtab").is_some());
    }
    let Some((_, crc)) = &w.link else {
        return false;
    };
    if meta.len() > CRC_READ_CAP {
        return false;
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut reader = candidate;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(_) => return false,
        }
    }
    hasher.finalize() == *crc
}

/// The debug file of the binary `w` describes (mapped by `pid` at `path`), looked for inside
/// `pid`'s root. `None` when the binary has its own DWARF, names no debug file, or none of the
/// candidates is the one it names.
#[must_use]
pub fn find(pid: u32, path: &str, w: &ElfFacts) -> Option<DebugFile> {
    if w.names == OwnNames::Dwarf || (w.build_id.is_none() && w.link.is_none()) {
        return None;
    }
    candidates(path, w).into_iter().find_map(|c| {
        let fd = crate::targets::open_in_root(pid, &c, OFlag::O_RDONLY, Mode::empty()).ok()?;
        let file = File::from(fd);
        if !verified(&file, w) {
            return None;
        }
        Some(DebugFile {
            supplementary: supplementary(pid, &file, &c),
            file,
            path: c,
            matched: if w.build_id.is_some() {
                Matched::BuildId
            } else {
                Matched::DebugLink
            },
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_follow_gdbs_order_and_stay_paths_inside_the_root() {
        let w = ElfFacts {
            build_id: Some(vec![0xab, 0xcd, 0xef]),
            link: Some(("libz.so.1.debug".into(), 7)),
            ..ElfFacts::default()
        };
        assert_eq!(
            candidates("/usr/lib/x86_64-linux-gnu/libz.so.1", &w),
            [
                "/usr/lib/debug/.build-id/ab/cdef.debug",
                "/usr/lib/x86_64-linux-gnu/libz.so.1.debug",
                "/usr/lib/x86_64-linux-gnu/.debug/libz.so.1.debug",
                "/usr/lib/debug/usr/lib/x86_64-linux-gnu/libz.so.1.debug",
                "/lib/x86_64-linux-gnu/libz.so.1.debug",
                "/lib/x86_64-linux-gnu/.debug/libz.so.1.debug",
                "/x86_64-linux-gnu/libz.so.1.debug",
                "/x86_64-linux-gnu/.debug/libz.so.1.debug",
            ]
        );
        let at_root = ElfFacts {
            link: Some(("x.debug".into(), 7)),
            ..ElfFacts::default()
        };
        assert_eq!(
            candidates("/x", &at_root),
            ["/x.debug", "/.debug/x.debug", "/usr/lib/debug/x.debug"]
        );
    }

    #[test]
    fn a_debug_link_that_is_a_path_is_refused() {
        assert_eq!(
            link_name(b"libc.so.6.debug").as_deref(),
            Some("libc.so.6.debug")
        );
        for bad in [&b"../../etc/shadow"[..], b"a/b", b"..", b"", b"\xff\xfe"] {
            assert_eq!(link_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn file_offsets_become_the_binarys_virtual_addresses() {
        let f = ElfFacts {
            loads: Segments(vec![(0, 0, 0x1000), (0x1000, 0x40_1000, 0x2000)]),
            ..ElfFacts::default()
        };
        assert_eq!(f.virtual_address(0x1500), Some(0x40_1500));
        assert_eq!(f.virtual_address(0x10), Some(0x10));
        assert_eq!(f.virtual_address(0x3000), None);
        assert_eq!(hex(&[0x0a, 0xbc]), "0abc");
    }

    #[test]
    fn the_agents_own_binary_has_its_facts_read() {
        let f = ElfFacts::read(&File::open("/proc/self/exe").unwrap());
        assert!(!f.loads.is_empty(), "{f:?}");
        // A test binary keeps its symbols.
        assert!(f.names >= OwnNames::Symbols, "{f:?}");
        assert_eq!(f.build_id_hex(), f.build_id.as_deref().map(hex));
        let not_elf = ElfFacts::read(&File::open("/proc/self/status").unwrap());
        assert_eq!(not_elf, ElfFacts::default());
    }
}
