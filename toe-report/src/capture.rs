//! What one target's run left in the store (a *capture*): its summary, folded profiles, pprof
//! files, signal events, RSS series and timeline, read back from any object store.
//!
//! Every file is read through the artifact contract's own types ([`toe_artifacts`]), the ones the
//! agent writes with; they read summaries of older and newer agents alike (missing fields take
//! their defaults, unknown ones are ignored).

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::TryStreamExt as _;
use object_store::{ObjectStore, ObjectStoreExt as _, path::Path as StorePath};
use toe_artifacts::{folded::Folded, names};

/// The profiles the agent writes, by the folded file's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProfileKind {
    Cpu,
    InUse,
    Alloc,
    Growth,
    OffCpu,
    Wall,
}

impl ProfileKind {
    pub const ALL: [Self; 6] = [
        Self::Cpu,
        Self::OffCpu,
        Self::Wall,
        Self::InUse,
        Self::Alloc,
        Self::Growth,
    ];

    #[must_use]
    pub fn folded_file(self) -> &'static str {
        match self {
            Self::Cpu => names::CPU_FOLDED.file,
            Self::InUse => names::INUSE_FOLDED.file,
            Self::Alloc => names::ALLOC_FOLDED.file,
            Self::Growth => names::GROWTH_FOLDED.file,
            Self::OffCpu => names::OFFCPU_FOLDED.file,
            Self::Wall => names::WALL_FOLDED.file,
        }
    }

    /// The pprof file carrying this profile (heap.pb.gz holds in-use and alloc together).
    #[must_use]
    pub fn pprof_file(self) -> &'static str {
        match self {
            Self::Cpu => names::CPU_PPROF.file,
            Self::InUse | Self::Alloc => names::HEAP_PPROF.file,
            Self::Growth => names::GROWTH_PPROF.file,
            Self::OffCpu => names::OFFCPU_PPROF.file,
            Self::Wall => names::WALL_PPROF.file,
        }
    }

    /// Short name used in output file names.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::InUse => "inuse",
            Self::Alloc => "alloc",
            Self::Growth => "growth",
            Self::OffCpu => "offcpu",
            Self::Wall => "wall",
        }
    }

    #[must_use]
    pub fn title(self) -> &'static str {
        match self {
            Self::Cpu => "CPU",
            Self::InUse => "Memory in use at the end",
            Self::Alloc => "Memory allocated",
            Self::Growth => "Memory faulted in (growth)",
            Self::OffCpu => "Off-CPU time (where threads wait, by reason)",
            Self::Wall => "Wall-clock time (on-CPU and off-CPU)",
        }
    }

    #[must_use]
    pub fn unit(self) -> &'static str {
        match self {
            Self::Cpu => "samples",
            Self::Growth => "pages",
            Self::InUse | Self::Alloc => "bytes",
            Self::OffCpu | Self::Wall => "ns",
        }
    }
}

pub use toe_artifacts::{
    rss::{RssPoint, Series as RssSeries},
    summary::{
        CpuSummary, FrameAccounting, SampleAccounting, Summary,
        fault::{FaultSummary, Termination},
        memory::{HeapTotals, MemorySummary},
        offcpu::OffcpuSummary,
        signals::{Event, ProcessEnd, Sender, SignalSummary},
    },
};

/// One target's artifacts of one run.
#[derive(Clone, Debug, Default)]
pub struct Capture {
    /// The directory below the processed base, e.g. `team-a/checkout-cpu/g3-1a2b3c4d/web-0/app`.
    pub dir: String,
    /// Which run it belongs to; captures of one run share it (`checkout-cpu/g3-1a2b3c4d`).
    pub run: String,
    /// Which target it is (`web-0/app`), or the summary's own description in local mode.
    pub target: String,
    pub summary: Summary,
    pub profiles: BTreeMap<ProfileKind, Folded>,
    /// Raw pprof files by name (`cpu.pb.gz`, `heap.pb.gz`, `growth.pb.gz`).
    pub pprof: BTreeMap<String, Bytes>,
    pub events: Vec<Event>,
    /// Events lines that did not parse (counted, never silently dropped).
    pub events_unreadable: u64,
    pub rss: Vec<RssSeries>,
    /// The agent's own run timeline (signals, exits, fault level) as SVG, shown inline.
    pub timeline_svg: Option<Bytes>,
    /// Each profile's total and heaviest functions, kept when a processing pass lets the
    /// profiles themselves go ([`Capture::lighten`]).
    pub digests: BTreeMap<ProfileKind, Digest>,
    /// Events let go by [`Capture::lighten`] beyond the ones a report shows.
    pub events_more: u64,
}

/// A profile's total and its heaviest functions by self count.
#[derive(Clone, Debug, Default)]
pub struct Digest {
    pub total: u64,
    pub top_self: Vec<(String, u64)>,
}

/// Functions a [`Digest`] keeps.
const DIGEST_TOP: usize = 5;

/// Events a lightened capture keeps: what a report shows of one capture.
pub const KEPT_EVENTS: usize = 200;

impl Capture {
    /// Each profile's digest: the kept ones once made ([`Self::keep_digests`]), else from the
    /// profiles.
    #[must_use]
    pub fn digests(&self) -> BTreeMap<ProfileKind, Digest> {
        if !self.digests.is_empty() || self.profiles.is_empty() {
            return self.digests.clone();
        }
        self.profiles
            .iter()
            .map(|(k, f)| {
                let mut top_self = f.self_by_function();
                top_self.truncate(DIGEST_TOP);
                (
                    *k,
                    Digest {
                        total: f.total(),
                        top_self,
                    },
                )
            })
            .collect()
    }

    /// Makes and keeps the profiles' digests (what rules and the model read of them).
    pub fn keep_digests(&mut self) {
        if self.digests.is_empty() {
            self.digests = self.digests();
        }
    }

    /// Whether it holds a non-empty `kind` profile (held or digested).
    #[must_use]
    pub fn has_profile(&self, kind: ProfileKind) -> bool {
        self.profiles.get(&kind).is_some_and(|f| !f.is_empty())
            || self.digests.get(&kind).is_some_and(|d| d.total > 0)
    }

    /// Lets go of what a processing pass has merged already (profiles, pprof bytes, events
    /// beyond those a report shows), keeping digests: what is left is small, whatever the run
    /// recorded, so a pass can keep every capture's metadata for the report.
    pub fn lighten(&mut self) {
        self.keep_digests();
        self.profiles.clear();
        self.pprof.clear();
        if self.events.len() > KEPT_EVENTS {
            self.events_more += (self.events.len() - KEPT_EVENTS) as u64;
            self.events.truncate(KEPT_EVENTS);
            self.events.shrink_to_fit();
        }
    }

    /// Which run and target a capture directory names. In the cluster layout
    /// (`[<namespace>/<powertool>/]<run>/<pod>/<container>`) the target is the last two parts and
    /// the run the rest; a local run directory (`cpu-profile-<stamp>-<id>`) is a run of one target.
    fn identify(dir: &str, summary: &Summary) -> (String, String) {
        let parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
        if parts.len() >= 3 {
            let n = parts.len();
            (parts[..n - 2].join("/"), parts[n - 2..].join("/"))
        } else {
            (dir.to_owned(), summary.target.clone())
        }
    }
}

/// Why a store could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("listing {prefix}: {source}")]
    List {
        prefix: String,
        #[source]
        source: object_store::Error,
    },
    #[error("reading {path}: {source}")]
    Get {
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
}

/// A capture directory's files: name and size.
pub type Files = Vec<(String, u64)>;

/// Frames kept of one stack. The agent records at most a few hundred; a deeper stack is a
/// hostile or broken capture, and drawing it would make a flamegraph as tall as the stack.
pub const MAX_DEPTH: usize = 1024;

/// The frame that ends a stack cut at [`MAX_DEPTH`].
pub const CUT_FRAME: &str = "[deeper frames cut]";

/// Cuts the stacks of `f` deeper than [`MAX_DEPTH`]; returns how many were cut.
fn limit_depth(f: &mut Folded) -> usize {
    let deep: Vec<String> = f
        .stacks
        .keys()
        .filter(|s| s.bytes().filter(|&b| b == b';').count() >= MAX_DEPTH)
        .cloned()
        .collect();
    for stack in &deep {
        let count = f.stacks.remove(stack).unwrap_or(0);
        let kept: Vec<&str> = stack.split(';').take(MAX_DEPTH).collect();
        f.add(format!("{};{CUT_FRAME}", kept.join(";")), count);
    }
    deep.len()
}

/// The largest capture file read. A capture is untrusted input (any node may have written it)
/// and is read whole, so a file beyond this is skipped with its reason instead of read.
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// The capture directories below `base` (each directory holding a `summary.json`) with their
/// files, in order.
pub async fn list(
    store: &dyn ObjectStore,
    base: &StorePath,
) -> Result<Vec<(StorePath, Files)>, ReadError> {
    let objects: Vec<object_store::ObjectMeta> = store
        .list(Some(base))
        .try_collect()
        .await
        .map_err(|source| ReadError::List {
            prefix: base.to_string(),
            source,
        })?;
    // Files by directory; a directory with a summary.json is a capture.
    let mut dirs: BTreeMap<StorePath, Files> = BTreeMap::new();
    for o in &objects {
        let parts: Vec<_> = o.location.parts().collect();
        if let Some((file, parent)) = parts.split_last() {
            dirs.entry(parent.iter().cloned().collect::<StorePath>())
                .or_default()
                .push((file.as_ref().to_owned(), o.size));
        }
    }
    Ok(dirs
        .into_iter()
        .filter(|(_, files)| files.iter().any(|f| f.0 == names::SUMMARY.file))
        .collect())
}

/// Loads the capture in `dir` (listed by [`list`] with its `files`). `label` (e.g. the
/// PowerTool's `namespace/name` when `base` is its directory) is put before its run's name.
pub async fn load_one(
    store: &dyn ObjectStore,
    base: &StorePath,
    dir: &StorePath,
    files: &[(String, u64)],
    label: &str,
) -> Result<Capture, ReadError> {
    let fetched = fetch(store, dir, files).await?;
    parse(base, dir, fetched, label)
}

/// Loads every capture below `base`; see [`list`] and [`load_one`].
pub async fn load_all(
    store: &dyn ObjectStore,
    base: &StorePath,
    label: &str,
) -> Result<Vec<Capture>, ReadError> {
    let mut out = Vec::new();
    for (dir, files) in list(store, base).await? {
        out.push(load_one(store, base, &dir, &files, label).await?);
    }
    Ok(out)
}

async fn get(store: &dyn ObjectStore, path: &StorePath) -> Result<Bytes, ReadError> {
    let r = store.get(path).await.map_err(|source| ReadError::Get {
        path: path.to_string(),
        source,
    })?;
    r.bytes().await.map_err(|source| ReadError::Get {
        path: path.to_string(),
        source,
    })
}

/// A capture's files as read from the store, by name, before any is parsed.
pub type Fetched = BTreeMap<&'static str, Bytes>;

/// The files of a capture that are read: the summary (which every capture has: its absence is
/// the read's error), and of those `present`, every folded profile and pprof file, signal
/// events, the RSS series and the first timeline.
fn wanted(present: &[(String, u64)]) -> Vec<&'static str> {
    let has = |name: &str| present.iter().any(|f| f.0 == name);
    let timeline = [names::RUN_TIMELINE, names::SIGNAL_TIMELINE]
        .into_iter()
        .map(|t| t.file)
        .find(|f| has(f));
    let optional = ProfileKind::ALL
        .map(ProfileKind::folded_file)
        .into_iter()
        .chain(names::PPROF_FILES.map(|n| n.file))
        .chain([names::SIGNAL_EVENTS.file, names::RSS_JSON.file])
        .filter(|f| has(f));
    std::iter::once(names::SUMMARY.file)
        .chain(optional)
        .chain(timeline)
        .collect()
}

/// Reads the files of the capture in `dir` that [`parse`] uses, all at once: against a remote
/// store each read is mostly waiting. Refuses a capture with a file over [`MAX_FILE_BYTES`]
/// before reading anything.
pub async fn fetch(
    store: &dyn ObjectStore,
    dir: &StorePath,
    present: &[(String, u64)],
) -> Result<Fetched, ReadError> {
    if let Some((name, size)) = present.iter().find(|f| f.1 > MAX_FILE_BYTES) {
        return Err(ReadError::Parse {
            path: dir.clone().join(name.as_str()).to_string(),
            message: format!(
                "{size} bytes, more than the {MAX_FILE_BYTES} a capture file may have"
            ),
        });
    }
    futures::future::try_join_all(
        wanted(present)
            .into_iter()
            .map(|name| async move { Ok((name, get(store, &dir.clone().join(name)).await?)) }),
    )
    .await
    .map(|files| files.into_iter().collect())
}

/// Parses the files [`fetch`] read from the capture in `dir` (below `base`); `label` as in
/// [`load_one`]. CPU-bound (a folded profile of megabytes), so callers that read many
/// captures run it beside the reads of the next ones.
pub fn parse(
    base: &StorePath,
    dir: &StorePath,
    mut fetched: Fetched,
    label: &str,
) -> Result<Capture, ReadError> {
    let parse_err = |name: &str, message: String| ReadError::Parse {
        path: dir.clone().join(name).to_string(),
        message,
    };
    let raw = fetched.remove(names::SUMMARY.file).unwrap_or_default();
    let summary: Summary =
        serde_json::from_slice(&raw).map_err(|e| parse_err(names::SUMMARY.file, e.to_string()))?;
    let rel: Vec<String> = match dir.prefix_match(base) {
        Some(parts) => parts.map(|p| p.as_ref().to_owned()).collect(),
        None => dir.parts().map(|p| p.as_ref().to_owned()).collect(),
    };
    let rel = rel.join("/");
    let (run, target) = Capture::identify(&rel, &summary);
    let mut c = Capture {
        dir: rel,
        run,
        target,
        summary,
        ..Capture::default()
    };
    for kind in ProfileKind::ALL {
        if let Some(raw) = fetched.remove(kind.folded_file()) {
            let mut folded = Folded::parse(&String::from_utf8_lossy(&raw))
                .map_err(|e| parse_err(kind.folded_file(), e.to_string()))?;
            let cut = limit_depth(&mut folded);
            if cut > 0 {
                c.summary.warnings.push(format!(
                    "{}: {cut} stack(s) deeper than {MAX_DEPTH} frames were cut there",
                    kind.folded_file()
                ));
            }
            c.profiles.insert(kind, folded);
        }
    }
    for name in names::PPROF_FILES.map(|n| n.file) {
        if let Some(raw) = fetched.remove(name) {
            c.pprof.insert(name.to_owned(), raw);
        }
    }
    if let Some(raw) = fetched.remove(names::SIGNAL_EVENTS.file) {
        for line in String::from_utf8_lossy(&raw)
            .lines()
            .filter(|l| !l.is_empty())
        {
            match serde_json::from_str(line) {
                Ok(e) => c.events.push(e),
                Err(_) => c.events_unreadable += 1,
            }
        }
    }
    if let Some(raw) = fetched.remove(names::RSS_JSON.file) {
        c.rss = serde_json::from_slice(&raw)
            .map_err(|e| parse_err(names::RSS_JSON.file, e.to_string()))?;
    }
    c.timeline_svg = [names::RUN_TIMELINE, names::SIGNAL_TIMELINE]
        .into_iter()
        .find_map(|t| fetched.remove(t.file));
    if !label.is_empty() {
        c.run = format!("{label}/{}", c.run);
    }
    Ok(c)
}

#[cfg(test)]
pub(crate) mod fixtures {
    use std::path::PathBuf;

    use super::*;

    /// A recorded capture from `fixtures/<name>` (real runs of the demo workload and containers).
    pub fn capture(name: &str) -> Capture {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(name);
        // A thread of its own: callers may already be inside a runtime.
        let mut all = std::thread::spawn(move || {
            let store = object_store::local::LocalFileSystem::new_with_prefix(&dir).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(load_all(&store, &StorePath::default(), ""))
                .unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(all.len(), 1, "{name}");
        let mut c = all.remove(0);
        c.dir = name.to_owned();
        c.run = name.to_owned();
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_captures_load_every_artifact() {
        let leak = fixtures::capture("leak");
        assert!(leak.profiles.contains_key(&ProfileKind::InUse));
        assert!(leak.profiles.contains_key(&ProfileKind::Growth));
        assert!(leak.pprof.contains_key("heap.pb.gz"));
        assert!(!leak.rss.is_empty() && leak.rss[0].points.len() > 2);
        let oom = fixtures::capture("oom");
        assert!(oom.events.iter().any(|e| e.event == "oom_kill"));
        assert_eq!(oom.events_unreadable, 0);
        let cpu = fixtures::capture("cpu");
        assert_eq!(
            cpu.profiles[&ProfileKind::Cpu].total(),
            cpu.summary.cpu.as_ref().unwrap().samples.recorded
        );
    }

    #[test]
    fn cluster_layout_names_run_and_target() {
        let s = Summary::default();
        assert_eq!(
            Capture::identify("ns/pt/g1-abcd/web-0/app", &s),
            ("ns/pt/g1-abcd".into(), "web-0/app".into())
        );
        assert_eq!(
            Capture::identify("g1-abcd/web-0/app", &s),
            ("g1-abcd".into(), "web-0/app".into())
        );
        let local = Summary {
            target: "pid 42".into(),
            ..Summary::default()
        };
        assert_eq!(
            Capture::identify("cpu-profile-x", &local),
            ("cpu-profile-x".into(), "pid 42".into())
        );
    }
}
