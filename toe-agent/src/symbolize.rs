//! Symbolization. User addresses are resolved through blazesym while their process lives (it reads
//! `/proc/<pid>/maps` and the mapped files through `/proc/<pid>/map_files`, so containers work
//! without entering their mount namespace), and from the files and offsets [`images`] kept once
//! it has exited; kernel addresses through kallsyms. An address that does not resolve keeps
//! `module+0xoffset` and is counted as unresolved.

pub mod debuginfo;
pub mod go;
pub mod images;
pub mod jit;
pub mod unwind;
pub mod user_stacks;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, OnceLock, mpsc},
};

use blazesym::{
    MaybeDefault, Pid,
    normalize::{NormalizeOpts, Normalizer, UserMeta},
    symbolize::{
        CodeInfo, Symbolized, Symbolizer as Blaze,
        evict::{self, Evict},
        source::{Elf, Kernel, Process, Source},
    },
};
use toe_artifacts::{
    profile::{Frame, FrameId, Stack},
    summary::JitCode,
};
use toe_common::{api::JitNames, comm_to_string};

use self::{
    debuginfo::Supplementary,
    images::{Images, MappedFile, image_of},
};

/// A stack as a collector reports it, before symbolization.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RawKey {
    pub pid: u32,
    /// NUL-padded thread name; all zero when the collector does not know the thread.
    pub thread: [u8; toe_common::TASK_COMM_LEN],
    /// Leaf first, as the kernel reports them.
    pub kstack: Box<[u64]>,
    pub ustack: Box<[u64]>,
    /// The user leaf is a return address (stack taken at a function's return), not the
    /// instruction that was running.
    pub user_leaf_is_return: bool,
}

/// Frames for one address: the function first, then functions inlined into it, innermost last.
type Chain = Box<[FrameId]>;

#[derive(Default)]
struct Interner {
    frames: Vec<Frame>,
    ids: HashMap<Frame, FrameId>,
}

impl Interner {
    fn id(&mut self, f: Frame) -> FrameId {
        if let Some(&id) = self.ids.get(&f) {
            return id;
        }
        let id = FrameId::try_from(self.frames.len()).expect("fewer than 2^32 distinct frames");
        self.frames.push(f.clone());
        self.ids.insert(f, id);
        id
    }
}

/// Call sites are return addresses: the byte before them is inside the call instruction, which is
/// what belongs to the caller's line (and function, when the call is the last instruction).
fn lookup_addr(addr: u64, leaf: bool) -> u64 {
    if leaf { addr } else { addr.saturating_sub(1) }
}

fn file_of(ci: Option<&CodeInfo<'_>>) -> (Option<String>, Option<u32>) {
    match ci {
        Some(ci) => {
            let file = match &ci.dir {
                Some(dir) => dir.join(&ci.file).to_string_lossy().into_owned(),
                None => Path::new(&ci.file).to_string_lossy().into_owned(),
            };
            (Some(file), ci.line)
        }
        None => (None, None),
    }
}

/// A kernel symbol: function and module (None for the core kernel).
type KernelSym = Option<(String, Option<String>)>;
type KernelRequest = (Vec<u64>, mpsc::Sender<Vec<KernelSym>>);

/// Resolves kernel addresses through the one kallsyms symbolizer of this process. Its parsed
/// symbol table is about 18 MiB, and the node agent runs many profiles at once: each keeping
/// its own copy cost that much per run. blazesym's symbolizer is not `Send`, so it lives on its
/// own thread and answers over a channel.
fn kernel_symbols(addrs: Vec<u64>) -> Vec<KernelSym> {
    static SERVICE: OnceLock<mpsc::Sender<KernelRequest>> = OnceLock::new();
    let service = SERVICE.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<KernelRequest>();
        std::thread::Builder::new()
            .name("toe-kallsyms".into())
            .spawn(move || {
                let blaze = Blaze::new();
                // kallsyms only: addresses are already KASLR-adjusted and no vmlinux search is
                // needed.
                let src = Source::Kernel(Kernel {
                    vmlinux: MaybeDefault::None,
                    debug_syms: false,
                    ..Kernel::default()
                });
                for (addrs, reply) in rx {
                    let syms = blaze
                        .symbolize(&src, blazesym::symbolize::Input::AbsAddr(&addrs))
                        .unwrap_or_default();
                    let out = (0..addrs.len())
                        .map(|i| {
                            let sym = syms.get(i)?.as_sym()?;
                            let module = sym
                                .module
                                .as_ref()
                                .map(|m| m.to_string_lossy().into_owned());
                            Some((sym.name.clone().into_owned(), module))
                        })
                        .collect();
                    let _ = reply.send(out);
                }
            })
            .expect("spawning the kallsyms thread");
        tx
    });
    let (tx, rx) = mpsc::channel();
    if service.send((addrs, tx)).is_err() {
        return Vec::new();
    }
    rx.recv().unwrap_or_default()
}

/// Resolves addresses incrementally and turns a [`RawProfile`] into a [`Profile`].
pub struct Symbolizer {
    blaze: Blaze,
    normalizer: Normalizer,
    frames: Interner,
    user: HashMap<(u32, u64), Chain>,
    kernel: HashMap<u64, Chain>,
    process_names: HashMap<u32, String>,
    /// The executable (device, inode) each process had when its addresses were last
    /// resolved: an exec replaces the image under the same pid, and everything learned about
    /// the old one must go.
    exes: HashMap<u32, (u64, u64)>,
    /// What target processes mapped, for those that exit before their addresses are resolved.
    images: Arc<Images>,
    /// Addresses of live processes that lay in no file and no perf map named: generated code,
    /// named again at the end of the run ([`Symbolizer::name_generated_code`]).
    generated: HashMap<u32, HashSet<u64>>,
    /// Each live process's perf map, as last read.
    perf_maps: HashMap<u32, jit::PerfMap>,
    /// Whether perf maps are read, and a JVM asked for one.
    jit_names: JitNames,
    /// The DWARF of debug files whose dwz supplementary file was found in the target's root,
    /// opened with it, per kept file (held, so its address stays its key); None where that
    /// failed.
    dwz: HashMap<*const MappedFile, (Arc<MappedFile>, Option<addr2line::Loader>)>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    #[must_use]
    pub fn new() -> Self {
        Self {
            // No debug directories: blazesym would look for debug files by host path, and a
            // container's binary has its debug file in its own root ([`debuginfo`]).
            blaze: Blaze::builder()
                .enable_inlined_fns(true)
                .enable_code_info(true)
                .set_debug_dirs(Some::<[&Path; 0]>([]))
                .build(),
            normalizer: Normalizer::new(),
            frames: Interner::default(),
            user: HashMap::new(),
            kernel: HashMap::new(),
            process_names: HashMap::new(),
            exes: HashMap::new(),
            images: Arc::default(),
            generated: HashMap::new(),
            perf_maps: HashMap::new(),
            jit_names: JitNames::default(),
            dwz: HashMap::new(),
        }
    }

    /// How generated code is named (`--jit-names`; the most restrictive of the run's tools).
    pub fn set_jit_names(&mut self, how: JitNames) {
        self.jit_names = how;
    }

    /// The mappings kept for this symbolizer; a [`images::Watcher`] fills them as processes
    /// start.
    #[must_use]
    pub fn images(&self) -> Arc<Images> {
        Arc::clone(&self.images)
    }
}

/// Where a user frame lies: the file as the process named it, which build of that file, and,
/// for an address no symbol covers, its ELF virtual address there (what a later symbolization
/// looks up).
#[derive(Clone, Debug, Default)]
struct Origin {
    module: Option<String>,
    build_id: Option<String>,
    address: Option<u64>,
}

impl Origin {
    fn file(file: &MappedFile) -> Self {
        Self {
            module: Some(file.path.clone()),
            build_id: file.elf.build_id_hex(),
            address: None,
        }
    }

    fn at(file: &MappedFile, offset: u64) -> Self {
        Self {
            address: file.elf.virtual_address(offset),
            ..Self::file(file)
        }
    }

    fn module(module: &str) -> Self {
        Self {
            module: Some(module.to_owned()),
            ..Self::default()
        }
    }
}

/// blazesym's answers for one file's addresses (file offsets, or ELF virtual addresses with
/// `virtual_addresses`), in order; `None` when it cannot read the file. `dwarf`: from its DWARF
/// where it has some, else from its symbol table only.
fn symbolize_file<'a>(
    blaze: &'a Blaze,
    path: PathBuf,
    found: &[(u64, u64, u64)],
    virtual_addresses: bool,
    dwarf: bool,
) -> Option<Vec<Symbolized<'a>>> {
    let at: Vec<u64> = found.iter().map(|&(_, _, at)| at).collect();
    let input = if virtual_addresses {
        blazesym::symbolize::Input::VirtOffset(at.as_slice())
    } else {
        blazesym::symbolize::Input::FileOffset(at.as_slice())
    };
    let elf = Elf {
        debug_syms: dwarf,
        ..Elf::new(path)
    };
    blaze.symbolize(&Source::Elf(elf), input).ok()
}

/// One kept file and the addresses found in it: (address, file offset, the address its
/// symbolizer takes).
type InFile = (Arc<MappedFile>, Vec<(u64, u64, u64)>);

fn chain_from(
    frames: &mut Interner,
    sym: &Symbolized<'_>,
    kernel: bool,
    origin: Origin,
) -> Option<Chain> {
    let sym = sym.as_sym()?;
    // A symbol without a name (DWARF whose name string is in a file that was not read) names
    // nothing: the address is resolved another way, or counted as unresolved.
    if sym.name.is_empty() {
        return None;
    }
    // A descriptor path is how this process opened a kept file, not a name for it.
    let module = origin.module.or_else(|| {
        sym.module
            .as_ref()
            .map(|m| m.to_string_lossy().into_owned())
            .filter(|m| !m.starts_with("/proc/self/fd/"))
    });
    let mut out = Vec::with_capacity(1 + sym.inlined.len());
    let (file, line) = file_of(sym.code_info.as_deref());
    out.push(frames.id(Frame {
        function: sym.name.clone().into_owned(),
        module: module.clone(),
        build_id: origin.build_id.clone(),
        file,
        line,
        kernel,
        resolved: true,
        ..Frame::default()
    }));
    for inl in &sym.inlined {
        let (file, line) = file_of(inl.code_info.as_ref());
        out.push(frames.id(Frame {
            function: inl.name.clone().into_owned(),
            module: module.clone(),
            build_id: origin.build_id.clone(),
            file,
            line,
            kernel,
            resolved: true,
            inlined: true,
            ..Frame::default()
        }));
    }
    Some(out.into_boxed_slice())
}

/// Frames for ELF virtual address `at` from DWARF read with its dwz supplementary file: the
/// function, then the functions inlined into it, innermost last, each with its own file and
/// line. The symbol table names the function where the DWARF has no name for it.
fn dwarf_chain(
    frames: &mut Interner,
    loader: &addr2line::Loader,
    at: u64,
    origin: &Origin,
) -> Option<Chain> {
    let mut found = Vec::new();
    if let Ok(mut iter) = loader.find_frames(at) {
        while let Ok(Some(f)) = iter.next() {
            let name = f
                .function
                .as_ref()
                .and_then(|n| n.demangle().ok())
                .map(std::borrow::Cow::into_owned)
                .filter(|n| !n.is_empty());
            let (file, line) = f
                .location
                .map_or((None, None), |l| (l.file.map(str::to_owned), l.line));
            found.push((name, file, line));
        }
    }
    // addr2line gives the innermost first.
    found.reverse();
    match found.first_mut() {
        Some((name @ None, _, _)) => *name = Some(loader.find_symbol(at)?.to_owned()),
        Some(_) => {}
        None => found.push((Some(loader.find_symbol(at)?.to_owned()), None, None)),
    }
    let chain: Vec<u32> = found
        .into_iter()
        .enumerate()
        .filter_map(|(i, (name, file, line))| {
            Some(frames.id(Frame {
                function: name?,
                file,
                line,
                resolved: true,
                inlined: i > 0,
                ..frame_in(origin.clone())
            }))
        })
        .collect();
    Some(chain.into_boxed_slice())
}

/// Frames for `offset` in `file` from its Go function table (a Go binary without ELF
/// symbols): the function, then the functions inlined into it, innermost last.
fn go_chain(frames: &mut Interner, file: &MappedFile, offset: u64) -> Option<Chain> {
    let origin = Origin::file(file);
    let chain = file.go_table()?.lookup(offset)?;
    Some(
        chain
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                frames.id(Frame {
                    function: f.function,
                    file: f.file,
                    line: f.line,
                    resolved: true,
                    inlined: i > 0,
                    ..frame_in(origin.clone())
                })
            })
            .collect(),
    )
}

/// A user frame's fields from where it lies.
fn frame_in(origin: Origin) -> Frame {
    Frame {
        module: origin.module,
        build_id: origin.build_id,
        address: origin.address,
        ..Frame::default()
    }
}

/// How an address that did not resolve is named: its file's base name and the file offset,
/// which `addr2line` or a later symbolization can take.
fn offset_name(path: &str, offset: u64) -> String {
    let base = Path::new(path)
        .file_name()
        .map_or_else(|| path.to_owned(), |b| b.to_string_lossy().into_owned());
    format!("{base}+{offset:#x}")
}

fn unresolved(frames: &mut Interner, function: String, origin: Origin, kernel: bool) -> Chain {
    Box::new([frames.id(Frame {
        function,
        kernel,
        ..frame_in(origin)
    })])
}

impl Symbolizer {
    /// Resolves the user addresses of `pid` not seen before: through the process while it
    /// lives, from its kept mappings once it has exited.
    fn resolve_user(&mut self, pid: u32, addrs: &[u64]) {
        let todo: Vec<u64> = addrs
            .iter()
            .copied()
            .filter(|a| !self.user.contains_key(&(pid, *a)))
            .collect();
        if todo.is_empty() {
            return;
        }
        if !crate::targets::running(pid) {
            let rest = self.resolve_from_debug_files(pid, &todo);
            self.resolve_exited(pid, &rest);
            return;
        }
        if todo.iter().any(|&a| self.images.locate(pid, a).is_none()) {
            self.images.refresh(pid);
        }
        let todo = self.resolve_from_debug_files(pid, &todo);
        if todo.is_empty() {
            return;
        }
        let mut process = Process::new(Pid::from(pid));
        // Perf maps are read by `name_from_perf_map` (see `jit`).
        process.perf_map = false;
        let src = Source::Process(process);
        let Self {
            blaze,
            frames,
            user,
            normalizer,
            images,
            ..
        } = self;
        let syms = blaze
            .symbolize(&src, blazesym::symbolize::Input::AbsAddr(&todo))
            .ok();
        let mut failed = Vec::new();
        for (i, &addr) in todo.iter().enumerate() {
            // The path the process mapped, as kept: blazesym caches one parser per file, and
            // names the module after whichever path opened it first (a descriptor path, when
            // an exited process's addresses were resolved first).
            let located = images.locate(pid, addr);
            let origin = located
                .as_ref()
                .map(|(f, _)| Origin::file(f))
                .unwrap_or_default();
            let chain = syms
                .as_ref()
                .and_then(|s| s.get(i))
                .and_then(|s| chain_from(frames, s, false, origin))
                .or_else(|| {
                    let (file, offset) = located?;
                    go_chain(frames, &file, offset)
                });
            match chain {
                Some(c) => {
                    user.insert((pid, addr), c);
                }
                None => failed.push(addr),
            }
        }
        if failed.is_empty() {
            return;
        }
        // Keep the module and file offset of what did not resolve, so it can be symbolized
        // later from the same binary (stripped binaries, JIT code without a perf map, ...).
        let opts = NormalizeOpts {
            sorted_addrs: false,
            ..NormalizeOpts::default()
        };
        let normalized = normalizer
            .normalize_user_addrs_opts(Pid::from(pid), &failed, &opts)
            .ok();
        let mut in_no_file = Vec::new();
        for (i, &addr) in failed.iter().enumerate() {
            if let Some((file, off)) = images.locate(pid, addr) {
                let name = offset_name(&file.path, off);
                let chain = unresolved(frames, name, Origin::at(&file, off), false);
                user.insert((pid, addr), chain);
                continue;
            }
            // A file the run does not keep (over its bound, or unreadable): named by path.
            let in_file = normalized.as_ref().and_then(|n| {
                let (off, meta) = *n.outputs.get(i)?;
                match n.meta.get(meta)? {
                    UserMeta::Elf(elf) => Some((off, elf.path.to_string_lossy().into_owned())),
                    _ => None,
                }
            });
            let Some((off, path)) = in_file else {
                in_no_file.push(addr);
                continue;
            };
            let name = offset_name(&path, off);
            let chain = unresolved(frames, name, Origin::module(&path), false);
            user.insert((pid, addr), chain);
        }
        if !in_no_file.is_empty() {
            self.name_from_perf_map(pid, &in_no_file, false);
        }
    }

    /// Names addresses of `pid` that lie in no file from its perf map, read again when it
    /// changed (`now`: whatever the time since the last read); the others become `[unknown]`
    /// and wait for [`Self::name_generated_code`].
    fn name_from_perf_map(&mut self, pid: u32, addrs: &[u64], now: bool) {
        let map = self.perf_maps.entry(pid).or_default();
        let read = self.jit_names != JitNames::Ignore;
        if read {
            map.refresh(pid, now);
        }
        for &addr in addrs {
            let chain = if let Some(name) = map.lookup(addr).filter(|_| read) {
                Box::new([self.frames.id(Frame {
                    function: name.to_string(),
                    resolved: true,
                    ..frame_in(Origin::module("[jit]"))
                })]) as Chain
            } else {
                self.generated.entry(pid).or_default().insert(addr);
                unresolved(
                    &mut self.frames,
                    format!("[unknown] {addr:#x}"),
                    Origin::default(),
                    false,
                )
            };
            self.user.insert((pid, addr), chain);
        }
    }

    /// `addrs` of `pid` grouped by the kept file they lie in, each as (address, file offset,
    /// what `lookup` makes of the two: the address the file's symbolizer takes); the addresses
    /// in no kept file, or that `lookup` refuses, apart.
    fn by_file(
        &self,
        pid: u32,
        addrs: &[u64],
        lookup: impl Fn(&MappedFile, u64) -> Option<u64>,
    ) -> (Vec<InFile>, Vec<u64>) {
        let mut per_file: HashMap<*const MappedFile, InFile> = HashMap::new();
        let mut apart = Vec::new();
        for &addr in addrs {
            let located = self.images.locate(pid, addr).and_then(|(file, offset)| {
                let at = lookup(&file, offset)?;
                Some((file, offset, at))
            });
            match located {
                Some((file, offset, at)) => per_file
                    .entry(Arc::as_ptr(&file))
                    .or_insert_with(|| (file, Vec::new()))
                    .1
                    .push((addr, offset, at)),
                None => apart.push(addr),
            }
        }
        (per_file.into_values().collect(), apart)
    }

    /// Resolves the addresses of `pid` that lie in a file with a separate debug file from that
    /// file (symbols, lines and inlined frames a stripped binary lacks); returns the others.
    fn resolve_from_debug_files(&mut self, pid: u32, addrs: &[u64]) -> Vec<u64> {
        let (files, mut left) = self.by_file(pid, addrs, |file, offset| {
            file.debug.as_ref()?;
            file.elf.virtual_address(offset)
        });
        for (file, found) in files {
            let Some(debug) = &file.debug else { continue };
            let chains: Vec<Option<Chain>> = match &debug.supplementary {
                Some(sup @ Supplementary::Found { .. }) => {
                    let (_, loader) = self.dwz.entry(Arc::as_ptr(&file)).or_insert_with(|| {
                        let loader =
                            addr2line::Loader::new_with_sup(debug.open_path(), sup.open_path());
                        if let Err(e) = &loader {
                            let path = &debug.path;
                            tracing::debug!(file = %path, error = %e, "reading DWARF");
                        }
                        (file.clone(), loader.ok())
                    });
                    found
                        .iter()
                        .map(|&(_, _, at)| {
                            dwarf_chain(
                                &mut self.frames,
                                loader.as_ref()?,
                                at,
                                &Origin::file(&file),
                            )
                        })
                        .collect()
                }
                // Without that file the DWARF is partial (names moved there come out empty):
                // the debug file's symbol table names every function, without lines.
                sup => {
                    let dwarf = sup.is_none();
                    let syms = symbolize_file(&self.blaze, debug.open_path(), &found, true, dwarf);
                    (0..found.len())
                        .map(|i| {
                            let s = syms.as_ref()?.get(i)?;
                            chain_from(&mut self.frames, s, false, Origin::file(&file))
                        })
                        .collect()
                }
            };
            for (&(addr, _, _), chain) in found.iter().zip(chains) {
                match chain {
                    Some(c) => {
                        self.user.insert((pid, addr), c);
                    }
                    None => left.push(addr),
                }
            }
        }
        left
    }

    /// Resolves addresses of a process that has exited, from the files it had mapped.
    fn resolve_exited(&mut self, pid: u32, addrs: &[u64]) {
        let (files, nowhere) = self.by_file(pid, addrs, |_, offset| Some(offset));
        for addr in nowhere {
            let name = format!("[unknown] {addr:#x}");
            let chain = unresolved(&mut self.frames, name, Origin::default(), false);
            self.user.insert((pid, addr), chain);
        }
        for (file, found) in files {
            let syms = symbolize_file(&self.blaze, file.open_path(), &found, false, true);
            let chains: Vec<Chain> = found
                .iter()
                .enumerate()
                .map(|(i, &(_, offset, _))| {
                    syms.as_ref()
                        .and_then(|s| s.get(i))
                        .and_then(|s| chain_from(&mut self.frames, s, false, Origin::file(&file)))
                        .or_else(|| go_chain(&mut self.frames, &file, offset))
                        .unwrap_or_else(|| {
                            let name = offset_name(&file.path, offset);
                            unresolved(&mut self.frames, name, Origin::at(&file, offset), false)
                        })
                })
                .collect();
            for (&(addr, _, _), chain) in found.iter().zip(chains) {
                self.user.insert((pid, addr), chain);
            }
        }
    }

    fn resolve_kernel(&mut self, addrs: &[u64]) {
        let todo: Vec<u64> = addrs
            .iter()
            .copied()
            .filter(|a| !self.kernel.contains_key(a))
            .collect();
        if todo.is_empty() {
            return;
        }
        let syms = kernel_symbols(todo.clone());
        for (i, &addr) in todo.iter().enumerate() {
            let chain = match syms.get(i).cloned().flatten() {
                Some((function, module)) => Box::new([self.frames.id(Frame {
                    function,
                    module: Some(module.unwrap_or_else(|| "[kernel]".into())),
                    kernel: true,
                    resolved: true,
                    ..Frame::default()
                })]) as Chain,
                None => unresolved(
                    &mut self.frames,
                    format!("[kernel] {addr:#x}"),
                    Origin::module("[kernel]"),
                    true,
                ),
            };
            self.kernel.insert(addr, chain);
        }
    }

    /// Resolves everything `keys` reference that is not known yet. Called for new stacks while
    /// the run goes on, so processes that exit early are still symbolized.
    pub fn resolve(&mut self, keys: &[RawKey]) {
        let mut per_pid: HashMap<u32, HashSet<u64>> = HashMap::new();
        let mut kernel: HashSet<u64> = HashSet::new();
        for k in keys {
            let set = per_pid.entry(k.pid).or_default();
            for (i, &a) in k.ustack.iter().enumerate() {
                set.insert(lookup_addr(a, i == 0 && !k.user_leaf_is_return));
            }
            for (i, &a) in k.kstack.iter().enumerate() {
                kernel.insert(lookup_addr(a, i == 0));
            }
        }
        for (pid, addrs) in per_pid {
            if let Some(name) = crate::targets::process_name(pid) {
                self.process_names.insert(pid, name);
            }
            self.images.observe(pid);
            if let Some(image) = image_of(pid)
                && self.exes.insert(pid, image).is_some_and(|old| old != image)
            {
                self.forget_process(pid);
            }
            let addrs: Vec<u64> = addrs.into_iter().collect();
            self.resolve_user(pid, &addrs);
        }
        let kernel: Vec<u64> = kernel.into_iter().collect();
        self.resolve_kernel(&kernel);
    }

    /// Says, for each binary a profile of `summary` lists, where its names came from or why it
    /// had none.
    pub fn describe_binaries(&self, summary: &mut toe_artifacts::summary::Summary) {
        let mut known: HashMap<String, String> = HashMap::new();
        for b in summary.binary_frames_mut() {
            let symbols =
                known
                    .entry(b.module.clone())
                    .or_insert_with(|| match b.module.as_str() {
                        "[unknown]" => {
                            "in no file: generated code (see the generated-code lines)".to_owned()
                        }
                        "[jit]" => "a perf map".to_owned(),
                        path => self.images.file_at(path).map_or_else(
                            || "blazesym, from the live process (the file was not kept)".to_owned(),
                            |f| f.symbol_source(),
                        ),
                    });
            b.symbols.clone_from(symbols);
        }
    }

    /// Names the generated code (JIT output) of the live processes whose addresses lay in no
    /// file, once more at the end of the run: a runtime's perf map grows while it compiles,
    /// and a HotSpot JVM is asked to write one (`Compiler.perfmap`) now, when its code cache
    /// holds what the run saw. Call it once, before the stacks are made; it reports, per
    /// process, how many addresses were named and how.
    pub fn name_generated_code(&mut self) -> Vec<JitCode> {
        let mut pending: Vec<(u32, HashSet<u64>)> =
            std::mem::take(&mut self.generated).into_iter().collect();
        pending.sort_unstable_by_key(|(pid, _)| *pid);
        let mut out = Vec::with_capacity(pending.len());
        for (pid, addrs) in pending {
            let process = self.process_names.get(&pid).cloned().unwrap_or_default();
            let addresses = addrs.len() as u64;
            if !crate::targets::running(pid) {
                out.push(JitCode {
                    pid,
                    process,
                    runtime: String::new(),
                    addresses,
                    named: 0,
                    source: "the process exited before its generated code was named".into(),
                    hint: None,
                });
                continue;
            }
            let runtime = jit::Runtime::detect(pid);
            let asked = (runtime == jit::Runtime::Jvm && self.jit_names == JitNames::Ask)
                .then(|| jit::request_jvm_perf_map(pid));
            let addrs: Vec<u64> = addrs.into_iter().collect();
            self.name_from_perf_map(pid, &addrs, true);
            let unnamed = self.generated.remove(&pid).map_or(0, |s| s.len() as u64);
            let map = self.perf_maps.get(&pid);
            let has_map = map.is_some_and(|m| !m.is_empty());
            let map_error = map.and_then(|m| m.error.clone());
            let mut source = match (asked, has_map) {
                (Some(Ok(took)), _) => format!(
                    "perf map written by the JVM on request (Compiler.perfmap, {} ms)",
                    took.as_millis()
                ),
                (Some(Err(why)), true) => {
                    format!("the JVM's own perf map; asking it for a fresh one failed: {why}")
                }
                (Some(Err(why)), false) => format!("no perf map: asking the JVM failed: {why}"),
                (None, true) => "the process's perf map".into(),
                (None, false) => match (self.jit_names, runtime) {
                    (JitNames::Ignore, _) => {
                        "not named: --jit-names=ignore reads no perf map".into()
                    }
                    (JitNames::Read, jit::Runtime::Jvm) => {
                        "no perf map (the JVM was not asked for one: --jit-names=read)".into()
                    }
                    _ => "no perf map".into(),
                },
            };
            if let Some(why) = map_error {
                source = format!("{source} ({why})");
            }
            out.push(JitCode {
                pid,
                process,
                runtime: runtime.name().into(),
                addresses,
                named: addresses - unnamed,
                // With a map, what it does not name is code the runtime did not list (or an
                // address a broken frame-pointer walk produced): no flag would change that.
                hint: (unnamed > 0 && !has_map && self.jit_names != JitNames::Ignore)
                    .then(|| runtime.hint().into()),
                source,
            });
        }
        out
    }

    /// Drops what the symbolizers cached about `pid`'s previous image (after an exec).
    /// Addresses already resolved stay: stacks sampled before the exec still need them, and an
    /// address of the new image equal to one of the old is improbable (both are randomized).
    fn forget_process(&mut self, pid: u32) {
        // The new image's runtime writes a new map under the same pid.
        self.perf_maps.remove(&pid);
        let _ = self
            .blaze
            .evict(&Evict::Process(evict::Process::new(Pid::from(pid))));
        // The normalizer has no per-process eviction; a fresh one holds no state about it.
        self.normalizer = Normalizer::new();
    }

    /// Every frame interned so far; stack frame ids index into it.
    #[must_use]
    pub fn frames(&self) -> Vec<Frame> {
        self.frames.frames.clone()
    }

    /// Symbolized stacks, one per distinct (process, thread, frames), values summed element-wise
    /// and sorted heaviest first. Addresses never resolved (the process was gone before its
    /// first resolve) become `[unknown]` frames and count as unresolved.
    pub fn stacks<'a>(
        &mut self,
        entries: impl IntoIterator<Item = (&'a RawKey, Vec<u64>)>,
    ) -> Vec<Stack> {
        let mut merged: HashMap<(u32, String, Vec<FrameId>), Vec<u64>> = HashMap::new();
        for (key, values) in entries {
            let mut frames = Vec::with_capacity(key.ustack.len() + key.kstack.len());
            for (i, &a) in key.ustack.iter().enumerate().rev() {
                let addr = lookup_addr(a, i == 0 && !key.user_leaf_is_return);
                let chain = if let Some(c) = self.user.get(&(key.pid, addr)) {
                    c.clone()
                } else {
                    let c = unresolved(
                        &mut self.frames,
                        format!("[unknown] {addr:#x}"),
                        Origin::default(),
                        false,
                    );
                    self.user.insert((key.pid, addr), c.clone());
                    c
                };
                frames.extend_from_slice(&chain);
            }
            for (i, &a) in key.kstack.iter().enumerate().rev() {
                let addr = lookup_addr(a, i == 0);
                if let Some(c) = self.kernel.get(&addr) {
                    frames.extend_from_slice(c);
                } else {
                    let c = unresolved(
                        &mut self.frames,
                        format!("[kernel] {addr:#x}"),
                        Origin::module("[kernel]"),
                        true,
                    );
                    frames.extend_from_slice(&c);
                }
            }
            let sum = merged
                .entry((key.pid, comm_to_string(&key.thread), frames))
                .or_insert_with(|| vec![0; values.len()]);
            for (acc, v) in sum.iter_mut().zip(values) {
                *acc += v;
            }
        }
        let mut stacks: Vec<Stack> = merged
            .into_iter()
            .map(|((pid, thread, frames), values)| {
                let process = self
                    .process_names
                    .get(&pid)
                    .cloned()
                    .unwrap_or_else(|| thread.clone());
                Stack {
                    pid,
                    thread: if thread.is_empty() {
                        process.clone()
                    } else {
                        thread
                    },
                    process,
                    frames,
                    values,
                }
            })
            .collect();
        stacks.sort_by(|a, b| {
            b.values
                .cmp(&a.values)
                .then_with(|| a.frames.cmp(&b.frames))
        });
        stacks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn marker_function_for_symbolization() -> u64 {
        std::hint::black_box(7)
    }

    #[test]
    fn resolves_own_functions_and_keeps_unknowns_honest() {
        let me = std::process::id();
        let addr = marker_function_for_symbolization as *const () as u64;
        let key = RawKey {
            pid: me,
            thread: [0; 16],
            kstack: Box::new([]),
            ustack: vec![addr + 1, 0x10].into(),
            user_leaf_is_return: false,
        };
        let mut s = Symbolizer::new();
        s.resolve(std::slice::from_ref(&key));
        let stacks = s.stacks([(&key, vec![3])]);
        let frames = s.frames();
        assert_eq!(stacks[0].values, vec![3]);
        let p = toe_artifacts::profile::Profile {
            frames,
            stacks,
            sample_types: vec![toe_artifacts::profile::ValueType::new("samples", "count")],
            ..Default::default()
        };
        let names: Vec<&str> = p.stacks[0]
            .frames
            .iter()
            .map(|&f| p.frames[f as usize].function.as_str())
            .collect();
        assert!(
            names
                .last()
                .unwrap()
                .contains("marker_function_for_symbolization"),
            "{names:?}"
        );
        assert!(names[0].starts_with("[unknown]"), "{names:?}");
        assert_eq!(p.frame_counts(), (6, 3));
    }

    #[test]
    fn a_process_that_exited_is_symbolized_from_what_it_had_mapped() {
        // A forked copy of this test process: the same mappings, so this binary's functions
        // are at the same addresses in it. It only sleeps (async-signal-safe) and is gone before
        // its addresses are resolved.
        // SAFETY: the child calls only async-signal-safe functions before `_exit`.
        let child = match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => unsafe {
                libc::sleep(30);
                libc::_exit(0)
            },
            nix::unistd::ForkResult::Parent { child } => child,
        };
        let pid = u32::try_from(child.as_raw()).unwrap();
        let mut s = Symbolizer::new();
        s.images().observe(pid);
        nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL).expect("kill");
        nix::sys::wait::waitpid(child, None).expect("wait");
        assert!(!crate::targets::running(pid));
        let addr = marker_function_for_symbolization as *const () as u64;
        let key = RawKey {
            pid,
            thread: [0; 16],
            kstack: Box::new([]),
            ustack: vec![addr + 1, 0x10].into(),
            user_leaf_is_return: false,
        };
        s.resolve(std::slice::from_ref(&key));
        let stacks = s.stacks([(&key, vec![1])]);
        let frames = s.frames();
        let named: Vec<(&str, Option<&str>)> = stacks[0]
            .frames
            .iter()
            .map(|&f| {
                let f = &frames[f as usize];
                (f.function.as_str(), f.module.as_deref())
            })
            .collect();
        let (leaf, module) = named.last().copied().unwrap();
        assert!(
            leaf.contains("marker_function_for_symbolization"),
            "{named:?}"
        );
        // Named by the path the process saw, not the descriptor it was read through.
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        assert_eq!(module, exe.to_str(), "{named:?}");
        assert!(named[0].0.starts_with("[unknown]"), "{named:?}");
        // The same file in a live process (this one) keeps its own path, though blazesym's
        // parser of it was opened through a descriptor path above.
        let me = std::process::id();
        s.images().observe(me);
        let live = RawKey { pid: me, ..key };
        s.resolve(std::slice::from_ref(&live));
        let stacks = s.stacks([(&live, vec![1])]);
        let frames = s.frames();
        let leaf = &frames[*stacks[0].frames.last().unwrap() as usize];
        assert_eq!(leaf.module.as_deref(), exe.to_str(), "{leaf:?}");
    }
}
