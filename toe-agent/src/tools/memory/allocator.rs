//! Which allocator a process uses, decided before any probe is attached. Allocation tracking
//! probes glibc's malloc family; a process whose `malloc` comes from elsewhere (a statically
//! linked binary, musl, the Go runtime, jemalloc/tcmalloc/mimalloc interposed or linked in) would
//! produce an empty profile that looks like "no leaks", so it is classified and stated instead.

use std::{
    fs,
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectSymbol as _, ReadCache};

/// How allocation tracking treats one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allocator {
    /// glibc's malloc in `libc`: probed through `attach_path`.
    Glibc {
        /// `/proc/<pid>/map_files/<range>` of libc: works across mount namespaces and for a
        /// library replaced on disk since it was mapped.
        attach_path: PathBuf,
        /// libc's path as the process sees it, for messages.
        path: String,
    },
    /// Not tracked, with the reason shown to the user.
    Unsupported(String),
    /// Just exec'd: the dynamic loader is mapped but has not mapped the libraries yet. Asking
    /// again in a moment gives the answer.
    Loading,
}

/// One file mapped by a process: its path and the `map_files` entry of its first mapping.
#[derive(Clone, Debug)]
struct Mapped {
    path: String,
    map_file: PathBuf,
}

fn mapped_files(pid: u32) -> std::io::Result<Vec<Mapped>> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut out: Vec<Mapped> = Vec::new();
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut f = line.split_ascii_whitespace();
        let (Some(range), _, _, _, Some(inode), Some(path)) =
            (f.next(), f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if inode == "0" || !path.starts_with('/') || out.iter().any(|m| m.path == path) {
            continue;
        }
        out.push(Mapped {
            path: path.to_owned(),
            map_file: PathBuf::from(format!("/proc/{pid}/map_files/{range}")),
        });
    }
    Ok(out)
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

// ELF names on Linux are case-sensitive: `LIBC.SO.6` is not libc.
#[expect(
    clippy::case_sensitive_file_extension_comparisons,
    reason = "see above"
)]
fn is_glibc(path: &str) -> bool {
    let b = basename(path);
    b == "libc.so.6" || (b.starts_with("libc-2.") && b.ends_with(".so"))
}

fn is_musl(path: &str) -> bool {
    let b = basename(path);
    b.starts_with("ld-musl-") || b.starts_with("libc.musl")
}

/// What an ELF file tells about allocation: whether it exports a defined `malloc`, and whether it
/// is a Go binary.
#[derive(Default)]
struct ElfFacts {
    defines_malloc: bool,
    go: bool,
    /// Has a program interpreter (`PT_INTERP`): linked dynamically, so libc will be mapped.
    dynamic: bool,
}

fn elf_facts(path: &Path) -> Option<ElfFacts> {
    let file = fs::File::open(path).ok()?;
    let cache = ReadCache::new(file);
    let elf = object::File::parse(&cache).ok()?;
    let go = elf.section_by_name(".go.buildinfo").is_some()
        || elf.section_by_name(".gopclntab").is_some();
    let is_malloc = |s: &object::Symbol<'_, '_, &ReadCache<fs::File>>| {
        s.is_definition() && s.name() == Ok("malloc")
    };
    let defines_malloc =
        elf.dynamic_symbols().any(|s| is_malloc(&s)) || elf.symbols().any(|s| is_malloc(&s));
    let dynamic = elf.section_by_name(".interp").is_some();
    Some(ElfFacts {
        defines_malloc,
        go,
        dynamic,
    })
}

fn allocator_name(path: &str) -> &'static str {
    let b = basename(path);
    if b.contains("jemalloc") {
        "jemalloc"
    } else if b.contains("tcmalloc") {
        "tcmalloc"
    } else if b.contains("mimalloc") {
        "mimalloc"
    } else {
        "a custom allocator"
    }
}

/// Classifies the allocator of `pid` from its mappings and the ELF files behind them.
#[expect(
    clippy::case_sensitive_file_extension_comparisons,
    reason = "ELF names are case-sensitive"
)]
pub fn detect(pid: u32) -> std::io::Result<Allocator> {
    let mapped = mapped_files(pid)?;
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let exe_map = mapped
        .iter()
        .find(|m| m.path == exe.trim_end_matches(" (deleted)"));
    // Read once: the executable can be large, and its facts decide twice below.
    let exe_facts = exe_map.map(|m| elf_facts(&m.map_file).unwrap_or_default());
    if let (Some(m), Some(facts)) = (exe_map, &exe_facts) {
        if facts.go {
            return Ok(Allocator::Unsupported(format!(
                "{} is a Go binary: the Go runtime allocates without malloc (use Go's own heap \
                 profile, or mode growth)",
                basename(&m.path)
            )));
        }
        if facts.defines_malloc {
            return Ok(Allocator::Unsupported(format!(
                "{} has its own malloc ({}, linked in): only glibc's malloc is probed",
                basename(&m.path),
                allocator_name(&m.path)
            )));
        }
    }
    if let Some(m) = mapped.iter().find(|m| is_musl(&m.path)) {
        return Ok(Allocator::Unsupported(format!(
            "uses musl libc ({}): only glibc's malloc is probed",
            m.path
        )));
    }
    // An interposed allocator (LD_PRELOAD or linked before libc) wins symbol resolution.
    for m in &mapped {
        if is_glibc(&m.path) || Some(m.path.as_str()) == exe_map.map(|e| e.path.as_str()) {
            continue;
        }
        let b = basename(&m.path);
        if !(b.ends_with(".so") || b.contains(".so.")) || b.starts_with("ld-linux") {
            continue;
        }
        if elf_facts(&m.map_file).is_some_and(|f| f.defines_malloc) {
            return Ok(Allocator::Unsupported(format!(
                "malloc comes from {} ({}): only glibc's malloc is probed",
                m.path,
                allocator_name(&m.path)
            )));
        }
    }
    if let Some(m) = mapped.iter().find(|m| is_glibc(&m.path)) {
        return Ok(Allocator::Glibc {
            attach_path: m.map_file.clone(),
            path: m.path.clone(),
        });
    }
    // The kernel maps the executable and its interpreter at exec (a read during the exec itself
    // can see neither, or the executable alone); libc follows when the loader runs. Only a
    // mapped executable without an interpreter is a static one.
    let exe_is_dynamic = exe_facts.as_ref().is_none_or(|f| f.dynamic);
    if exe_is_dynamic
        || mapped.iter().any(|m| {
            basename(&m.path).starts_with("ld-linux") || basename(&m.path).starts_with("ld-")
        })
    {
        return Ok(Allocator::Loading);
    }
    Ok(Allocator::Unsupported(
        "no libc is mapped: a statically linked binary, whose allocator is compiled in".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_process_uses_glibc() {
        match detect(std::process::id()).unwrap() {
            Allocator::Glibc { path, attach_path } => {
                assert!(is_glibc(&path), "{path}");
                assert!(attach_path.starts_with("/proc"), "{attach_path:?}");
            }
            Allocator::Unsupported(why) => panic!("{why}"),
            Allocator::Loading => panic!("a running test process has its libraries mapped"),
        }
    }

    #[test]
    fn names() {
        assert!(is_glibc("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(is_glibc("/lib64/libc-2.17.so"));
        assert!(!is_glibc("/usr/lib/libcrypto.so.3"));
        assert!(is_musl("/lib/ld-musl-x86_64.so.1"));
        assert_eq!(allocator_name("/usr/lib/libjemalloc.so.2"), "jemalloc");
    }
}
