//! Symbolization. User addresses are resolved through blazesym while their process lives (it reads
//! `/proc/<pid>/maps` and the mapped files through `/proc/<pid>/map_files`, so containers work
//! without entering their mount namespace), and from the files and offsets [`images`] kept once
//! it has exited; kernel addresses through kallsyms. An address that does not resolve keeps
//! `module+0xoffset` and is counted as unresolved.

pub mod images;
pub mod unwind;
pub mod user_stacks;

use std::{
    collections::{HashMap, HashSet},
    path::Path,
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
use toe_artifacts::profile::{Frame, FrameId, Stack};
use toe_common::comm_to_string;

use self::images::{Images, MappedFile, image_of};

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
            blaze: Blaze::builder()
                .enable_inlined_fns(true)
                .enable_code_info(true)
                .build(),
            normalizer: Normalizer::new(),
            frames: Interner::default(),
            user: HashMap::new(),
            kernel: HashMap::new(),
            process_names: HashMap::new(),
            exes: HashMap::new(),
            images: Arc::default(),
        }
    }

    /// The mappings kept for this symbolizer; a [`images::Watcher`] fills them as processes
    /// start.
    #[must_use]
    pub fn images(&self) -> Arc<Images> {
        Arc::clone(&self.images)
    }
}

fn chain_from(
    frames: &mut Interner,
    sym: &Symbolized<'_>,
    kernel: bool,
    module: Option<String>,
) -> Option<Chain> {
    let sym = sym.as_sym()?;
    // A descriptor path is how this process opened a kept file, not a name for it.
    let module = module.or_else(|| {
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
        file,
        line,
        kernel,
        resolved: true,
        inlined: false,
    }));
    for inl in &sym.inlined {
        let (file, line) = file_of(inl.code_info.as_ref());
        out.push(frames.id(Frame {
            function: inl.name.clone().into_owned(),
            module: module.clone(),
            file,
            line,
            kernel,
            resolved: true,
            inlined: true,
        }));
    }
    Some(out.into_boxed_slice())
}

/// How an address that did not resolve is named: its file's base name and the file offset,
/// which `addr2line` or a later symbolization can take.
fn offset_name(path: &str, offset: u64) -> String {
    let base = Path::new(path)
        .file_name()
        .map_or_else(|| path.to_owned(), |b| b.to_string_lossy().into_owned());
    format!("{base}+{offset:#x}")
}

fn unresolved(
    frames: &mut Interner,
    function: String,
    module: Option<String>,
    kernel: bool,
) -> Chain {
    Box::new([frames.id(Frame {
        function,
        module,
        file: None,
        line: None,
        kernel,
        resolved: false,
        inlined: false,
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
            self.resolve_exited(pid, &todo);
            return;
        }
        if todo.iter().any(|&a| self.images.locate(pid, a).is_none()) {
            self.images.refresh(pid);
        }
        let src = Source::Process(Process::new(Pid::from(pid)));
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
            let module = images.locate(pid, addr).map(|(f, _)| f.path.clone());
            let chain = syms
                .as_ref()
                .and_then(|s| s.get(i))
                .and_then(|s| chain_from(frames, s, false, module));
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
        for (i, &addr) in failed.iter().enumerate() {
            let (name, module) = match normalized.as_ref().and_then(|n| {
                let (off, meta) = *n.outputs.get(i)?;
                match n.meta.get(meta)? {
                    UserMeta::Elf(elf) => Some((off, elf.path.to_string_lossy().into_owned())),
                    _ => None,
                }
            }) {
                Some((off, path)) => (offset_name(&path, off), Some(path)),
                None => (format!("[unknown] {addr:#x}"), None),
            };
            let chain = unresolved(frames, name, module, false);
            user.insert((pid, addr), chain);
        }
    }

    /// Resolves addresses of a process that has exited, from the files it had mapped.
    fn resolve_exited(&mut self, pid: u32, addrs: &[u64]) {
        /// (address, file offset) pairs found in one file.
        type InFile = (Arc<MappedFile>, Vec<(u64, u64)>);
        let mut per_file: HashMap<*const MappedFile, InFile> = HashMap::new();
        for &addr in addrs {
            if let Some((file, offset)) = self.images.locate(pid, addr) {
                per_file
                    .entry(Arc::as_ptr(&file))
                    .or_insert_with(|| (file, Vec::new()))
                    .1
                    .push((addr, offset));
            } else {
                let chain = unresolved(
                    &mut self.frames,
                    format!("[unknown] {addr:#x}"),
                    None,
                    false,
                );
                self.user.insert((pid, addr), chain);
            }
        }
        for (file, found) in per_file.into_values() {
            let offsets: Vec<u64> = found.iter().map(|&(_, o)| o).collect();
            let src = Source::Elf(Elf::new(file.open_path()));
            let syms = self
                .blaze
                .symbolize(&src, blazesym::symbolize::Input::FileOffset(&offsets))
                .ok();
            for (i, &(addr, offset)) in found.iter().enumerate() {
                let chain = syms
                    .as_ref()
                    .and_then(|s| s.get(i))
                    .and_then(|s| chain_from(&mut self.frames, s, false, Some(file.path.clone())))
                    .unwrap_or_else(|| {
                        unresolved(
                            &mut self.frames,
                            offset_name(&file.path, offset),
                            Some(file.path.clone()),
                            false,
                        )
                    });
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
                    file: None,
                    line: None,
                    kernel: true,
                    resolved: true,
                    inlined: false,
                })]) as Chain,
                None => unresolved(
                    &mut self.frames,
                    format!("[kernel] {addr:#x}"),
                    Some("[kernel]".into()),
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

    /// Drops what the symbolizers cached about `pid`'s previous image (after an exec).
    /// Addresses already resolved stay: stacks sampled before the exec still need them, and an
    /// address of the new image equal to one of the old is improbable (both are randomized).
    fn forget_process(&mut self, pid: u32) {
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
                        None,
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
                        Some("[kernel]".into()),
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
