//! A symbolized profile: the model the agent's symbolizer produces and every encoder reads
//! ([`crate::folded`], [`crate::pprof`], [`crate::summary::analyse`]). Plain data, tested without
//! a kernel.

/// One frame after symbolization. Unresolved frames keep their module and offset in `function`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frame {
    pub function: String,
    /// Path of the ELF file, `[kernel]`, or `None` when even the mapping is unknown.
    pub module: Option<String>,
    /// The module's GNU build-id, in hex: which build of the file at that path (two containers'
    /// `libc.so.6` are different files), and the key debug files are found by.
    pub build_id: Option<String>,
    /// An unresolved frame's ELF virtual address in its module: what a symbolizer given the
    /// module or its debug file looks up later (`go tool pprof` with `PPROF_BINARY_PATH`).
    pub address: Option<u64>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub kernel: bool,
    pub resolved: bool,
    /// Inlined into its caller (the previous frame).
    pub inlined: bool,
}

impl Frame {
    /// A frame known by name only (a synthetic one, or a kernel function procfs named): no
    /// file or line, counted as resolved.
    #[must_use]
    pub fn named(function: String, kernel: bool) -> Self {
        Self {
            function,
            module: kernel.then(|| "[kernel]".to_owned()),
            kernel,
            resolved: true,
            ..Self::default()
        }
    }
}

pub type FrameId = u32;

/// Values sharing a process, thread name and symbolized stack; one value per sample type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stack {
    pub pid: u32,
    pub process: String,
    pub thread: String,
    /// Root first; kernel frames (if any) follow the user frames.
    pub frames: Vec<FrameId>,
    pub values: Vec<u64>,
}

/// What a value measures, as pprof's `ValueType` (e.g. `inuse_space`/`bytes`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValueType {
    pub kind: String,
    pub unit: String,
}

impl ValueType {
    #[must_use]
    pub fn new(kind: &str, unit: &str) -> Self {
        Self {
            kind: kind.into(),
            unit: unit.into(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    pub frames: Vec<Frame>,
    pub stacks: Vec<Stack>,
    pub sample_types: Vec<ValueType>,
    /// The sample type shown by default (flamegraph, folded stacks, top functions).
    pub default_type: usize,
    /// What one sample stands for (CPU: nanoseconds per tick), if the profile is sampled.
    pub period: Option<(ValueType, u64)>,
    /// Wall-clock start of collection, ns since the Unix epoch.
    pub start_unix_ns: u64,
    pub duration_ns: u64,
    pub comment: String,
}

impl Profile {
    /// Sum of one sample type over all stacks.
    #[must_use]
    pub fn total(&self, index: usize) -> u64 {
        self.stacks
            .iter()
            .map(|s| s.values.get(index).copied().unwrap_or(0))
            .sum()
    }

    /// Sum of the default sample type.
    #[must_use]
    pub fn total_default(&self) -> u64 {
        self.total(self.default_type)
    }

    /// Frame occurrences weighted by the default value, and how many of them did not resolve.
    #[must_use]
    pub fn frame_counts(&self) -> (u64, u64) {
        let mut total = 0;
        let mut unresolved = 0;
        for s in &self.stacks {
            let v = s.values.get(self.default_type).copied().unwrap_or(0);
            for &f in &s.frames {
                total += v;
                if !self.frames[f as usize].resolved {
                    unresolved += v;
                }
            }
        }
        (total, unresolved)
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    fn frame(name: &str, kernel: bool, resolved: bool) -> Frame {
        Frame {
            function: name.into(),
            module: Some(if kernel {
                "[kernel]".into()
            } else {
                "/bin/demo".into()
            }),
            kernel,
            resolved,
            ..Frame::default()
        }
    }

    /// main -> hot (70), main -> warm (20), main -> cold -> [k] sys_write (10), one unresolved.
    pub fn profile() -> Profile {
        let frames = vec![
            frame("main", false, true),
            frame("hot", false, true),
            frame("warm", false, true),
            frame("cold", false, true),
            frame("ksys_write", true, true),
            frame("libx.so+0x1f", false, false),
        ];
        let st = |frames: Vec<u32>, count: u64| Stack {
            pid: 42,
            process: "demo".into(),
            thread: "demo".into(),
            frames,
            values: vec![count, count * 10_101_010],
        };
        Profile {
            frames,
            stacks: vec![
                st(vec![0, 1], 70),
                st(vec![0, 2, 5], 20),
                st(vec![0, 3, 4], 10),
            ],
            sample_types: vec![
                ValueType::new("samples", "count"),
                ValueType::new("cpu", "nanoseconds"),
            ],
            default_type: 0,
            period: Some((ValueType::new("cpu", "nanoseconds"), 10_101_010)),
            start_unix_ns: 1_700_000_000_000_000_000,
            duration_ns: 1_000_000_000,
            comment: "test".into(),
        }
    }
}
