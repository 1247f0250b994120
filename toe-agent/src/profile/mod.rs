//! The profile pipeline as pure stages: raw samples (collectors) -> symbolized [`Profile`]
//! (symbolize) -> encoders (folded stacks, flamegraph SVG, pprof, summary). Every stage is a plain
//! function over data, tested without a kernel.

pub mod folded;
pub mod pprof;
mod proto;
pub mod summary;
pub mod svg;

/// One frame after symbolization. Unresolved frames keep their module and offset in `function`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    pub function: String,
    /// Path of the ELF file, `[kernel]`, or `None` when even the mapping is unknown.
    pub module: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub kernel: bool,
    pub resolved: bool,
    /// Inlined into its caller (the previous frame).
    pub inlined: bool,
}

pub type FrameId = u32;

/// Samples sharing a process, thread name and symbolized stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stack {
    pub pid: u32,
    pub process: String,
    pub thread: String,
    /// Root first; kernel frames (if any) follow the user frames.
    pub frames: Vec<FrameId>,
    pub count: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    pub frames: Vec<Frame>,
    pub stacks: Vec<Stack>,
    pub frequency_hz: u64,
    /// Wall-clock start of sampling, ns since the Unix epoch.
    pub start_unix_ns: u64,
    pub duration_ns: u64,
}

impl Profile {
    #[must_use]
    pub fn total_samples(&self) -> u64 {
        self.stacks.iter().map(|s| s.count).sum()
    }

    /// CPU time one sample stands for.
    #[must_use]
    pub fn period_ns(&self) -> u64 {
        1_000_000_000 / self.frequency_hz.max(1)
    }

    /// Frame occurrences weighted by samples, and how many of them did not resolve.
    #[must_use]
    pub fn frame_counts(&self) -> (u64, u64) {
        let mut total = 0;
        let mut unresolved = 0;
        for s in &self.stacks {
            for &f in &s.frames {
                total += s.count;
                if !self.frames[f as usize].resolved {
                    unresolved += s.count;
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
            file: None,
            line: None,
            kernel,
            resolved,
            inlined: false,
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
        let st = |frames: Vec<u32>, count| Stack {
            pid: 42,
            process: "demo".into(),
            thread: "demo".into(),
            frames,
            count,
        };
        Profile {
            frames,
            stacks: vec![
                st(vec![0, 1], 70),
                st(vec![0, 2, 5], 20),
                st(vec![0, 3, 4], 10),
            ],
            frequency_hz: 99,
            start_unix_ns: 1_700_000_000_000_000_000,
            duration_ns: 1_000_000_000,
        }
    }
}
