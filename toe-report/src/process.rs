//! One processing pass over a set of captures: merged and differential flamegraphs, merged pprof,
//! findings (rules, then the optional model), and the HTML report, as named files ready to store.
//!
//! A pass takes captures one at a time ([`Pass::add`]): each is evaluated by the rules, its
//! stacks go to a bounded [`Sorter`] per profile kind and its pprof files to a streaming
//! [`pprof::Merger`], and only its metadata is kept. [`Pass::finish`] walks each kind's merged
//! stacks once, in frame order, writing the exact merged folded file and feeding the pruned
//! flamegraphs (merged, per run, differential) side by side. Memory is bounded by the sorter's
//! budget, the pprof tables and the frames a flamegraph can draw, not by the number of captures.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::{self, Read as _, Seek as _, Write as _},
    path::PathBuf,
};

use bytes::Bytes;
use toe_artifacts::folded::{self, Folded, Graph};

use crate::{
    capture::{Capture, ProfileKind},
    html,
    merge::{Counts, Pruned, Pruner, Sorter},
    model, pprof,
    rules::{self, Finding},
};

/// Memory a pass gives each profile kind's merge before it spills sorted runs to disk.
pub const DEFAULT_MEMORY_BUDGET: usize = 128 << 20;

/// What to produce.
#[derive(Clone, Debug, Default)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "four independent switches, one per output a processing may ask for"
)]
pub struct Options {
    pub merged_flamegraph: bool,
    pub differential_flamegraph: bool,
    pub merged_pprof: bool,
    pub html_report: bool,
    /// Report title, e.g. `team-a/checkout-weekly`.
    pub title: String,
    /// When and over which window, for the report's header.
    pub meta: String,
    pub model: Option<model::Endpoint>,
    /// Bytes of stacks each profile kind's merge holds in memory (0: [`DEFAULT_MEMORY_BUDGET`]).
    pub memory_budget: usize,
    /// Where merges spill and large outputs wait to be stored (the system's temporary directory
    /// when `None`).
    pub scratch: Option<PathBuf>,
}

/// An output's bytes: small ones in memory, large ones (the exact merged folded and pprof files)
/// in memory up to a size and in a temporary file beyond it.
#[derive(Debug)]
pub enum Content {
    Bytes(Bytes),
    Spooled(tempfile::SpooledTempFile),
}

impl Content {
    /// Every byte, read into memory: for small outputs and tests.
    pub fn bytes(&mut self) -> io::Result<Bytes> {
        match self {
            Self::Bytes(b) => Ok(b.clone()),
            Self::Spooled(f) => {
                f.rewind()?;
                let mut v = Vec::new();
                f.read_to_end(&mut v)?;
                Ok(Bytes::from(v))
            }
        }
    }
}

impl From<Vec<u8>> for Content {
    fn from(v: Vec<u8>) -> Self {
        Self::Bytes(Bytes::from(v))
    }
}

/// Files produced (name relative to the output directory, content) and what was found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub files: Vec<(String, Content)>,
    pub findings: Vec<Finding>,
    /// What the reader must know: inputs skipped, the model step failed.
    pub notes: Vec<String>,
    /// Why the model step failed, when it was asked and did (also among the notes).
    pub model_error: Option<String>,
    pub runs: usize,
    pub captures: usize,
    /// Captures left out because they could not be read, each with its reason (also among the
    /// notes).
    pub skipped: Vec<String>,
}

impl Outcome {
    /// The bytes of the output named `name`.
    pub fn file(&mut self, name: &str) -> Option<Bytes> {
        self.files
            .iter_mut()
            .find(|(n, _)| n == name)
            .and_then(|(_, c)| c.bytes().ok())
    }

    fn push(&mut self, name: String, content: impl Into<Content>) {
        self.files.push((name, content.into()));
    }
}

/// The runs of `captures` in the order they started.
fn runs_in_order<'a>(captures: impl IntoIterator<Item = &'a Capture>) -> Vec<String> {
    let mut first: BTreeMap<&str, u64> = BTreeMap::new();
    for c in captures {
        let t = first.entry(&c.run).or_insert(u64::MAX);
        *t = (*t).min(c.summary.started_unix_ms);
    }
    let mut v: Vec<(&str, u64)> = first.into_iter().collect();
    v.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(b.0)));
    v.into_iter().map(|(r, _)| r.to_owned()).collect()
}

/// Which captures holding a `kind` profile are the baseline and which the comparison of a
/// differential flamegraph: runs without a fault against runs with one when both are present
/// (baseline window vs fault window), else the earlier runs against the latest. The reason when
/// neither holds.
fn split_for_diff(
    captures: &[Capture],
    kind: ProfileKind,
) -> Result<(Vec<&Capture>, Vec<&Capture>, String), String> {
    let with: Vec<&Capture> = captures.iter().filter(|c| c.has_profile(kind)).collect();
    let (faulted, quiet): (Vec<&Capture>, Vec<&Capture>) =
        with.iter().partition(|c| c.summary.fault.is_some());
    if !faulted.is_empty() && !quiet.is_empty() {
        return Ok((
            quiet,
            faulted,
            "runs without a fault -> runs with a fault".into(),
        ));
    }
    let runs = runs_in_order(with.iter().copied());
    match runs.split_last() {
        Some((latest, earlier)) if !earlier.is_empty() => Ok((
            with.iter().copied().filter(|c| &c.run != latest).collect(),
            with.iter().copied().filter(|c| &c.run == latest).collect(),
            format!("earlier runs -> {latest}"),
        )),
        _ => Err(format!(
            "no differential {} flamegraph: it needs two runs with a {} profile, or such runs with and without a fault",
            kind.name(),
            kind.name()
        )),
    }
}

fn file_name(run: &str) -> String {
    run.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A capture's group in the merges: its run, and whether it ran under a fault (what per-run and
/// differential flamegraphs select by).
type Group = (String, bool);

fn group_of(c: &Capture) -> Group {
    (c.run.clone(), c.summary.fault.is_some())
}

/// What a pass does with each capture besides merging its stacks: the rules and keeping its
/// metadata on one thread, the pprof merge on another, beside the reading and the stack merge.
#[derive(Default)]
struct Side {
    rules: rules::Evaluator,
    captures: Vec<Capture>,
}

impl Side {
    fn take(&mut self, mut c: Capture) {
        c.keep_digests();
        self.rules.add(&c);
        c.lighten();
        self.captures.push(c);
    }
}

/// A capture's pprof files, with where they came from.
struct PprofFiles {
    files: BTreeMap<String, Bytes>,
    target: String,
    run: String,
}

fn merge_pprof(rx: std::sync::mpsc::Receiver<PprofFiles>) -> BTreeMap<String, pprof::Merger> {
    let mut mergers: BTreeMap<String, pprof::Merger> = BTreeMap::new();
    for p in rx {
        for (name, data) in &p.files {
            mergers
                .entry(name.clone())
                .or_default()
                .push(&pprof::Input {
                    data,
                    target: &p.target,
                    run: &p.run,
                });
        }
    }
    mergers
}

/// A worker thread fed through a bounded queue.
type Worker<T, R> = (std::sync::mpsc::SyncSender<T>, std::thread::JoinHandle<R>);

fn worker<T: Send + 'static, R: Send + 'static>(
    name: &str,
    work: impl FnOnce(std::sync::mpsc::Receiver<T>) -> R + Send + 'static,
) -> io::Result<Worker<T, R>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<T>(SIDE_QUEUE);
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || work(rx))?;
    Ok((tx, handle))
}

/// Joins a worker, or says in `notes` that it failed.
fn join<T, R: Default>(w: Option<Worker<T, R>>, what: &str, notes: &mut Vec<String>) -> R {
    let Some((tx, handle)) = w else {
        return R::default();
    };
    drop(tx);
    handle.join().unwrap_or_else(|_| {
        notes.push(format!(
            "{what} stopped on an internal error: its results are missing"
        ));
        R::default()
    })
}

/// Captures waiting for the side thread: a bound on the captures in memory at once.
const SIDE_QUEUE: usize = 2;

/// A processing pass in progress; see the module docs.
pub struct Pass {
    opts: Options,
    scratch: tempfile::TempDir,
    sorters: BTreeMap<ProfileKind, Sorter>,
    side: Option<Worker<Capture, Side>>,
    pprof: Option<Worker<PprofFiles, BTreeMap<String, pprof::Merger>>>,
    captures: Vec<Capture>,
    groups: HashMap<Group, u32>,
    notes: Vec<String>,
    skipped: Vec<String>,
    /// The first error writing a merge to scratch space, if any.
    failed: Option<String>,
}

impl Pass {
    /// A pass producing what `opts` asks for.
    pub fn new(opts: &Options) -> io::Result<Self> {
        let scratch = match &opts.scratch {
            Some(dir) => tempfile::Builder::new()
                .prefix("toe-processing-")
                .tempdir_in(dir)?,
            None => tempfile::Builder::new()
                .prefix("toe-processing-")
                .tempdir()?,
        };
        let side = worker("toe-rules", |rx| {
            let mut side = Side::default();
            for c in rx {
                side.take(c);
            }
            side
        })?;
        let pprof = if opts.merged_pprof {
            Some(worker("toe-pprof", merge_pprof)?)
        } else {
            None
        };
        Ok(Self {
            opts: opts.clone(),
            scratch,
            sorters: BTreeMap::new(),
            side: Some(side),
            pprof,
            captures: Vec::new(),
            groups: HashMap::new(),
            notes: Vec::new(),
            skipped: Vec::new(),
            failed: None,
        })
    }

    /// Merges one capture and keeps its metadata.
    pub fn add(&mut self, mut c: Capture) {
        let next = u32::try_from(self.groups.len()).unwrap_or(u32::MAX);
        let group = *self.groups.entry(group_of(&c)).or_insert(next);
        let budget = match self.opts.memory_budget {
            0 => DEFAULT_MEMORY_BUDGET,
            b => b,
        };
        for (kind, f) in &c.profiles {
            let sorter = self
                .sorters
                .entry(*kind)
                .or_insert_with(|| Sorter::new(budget, self.scratch.path()));
            for (stack, &count) in &f.stacks {
                if let Err(e) = sorter.add(stack, group, count) {
                    self.failed.get_or_insert_with(|| e.to_string());
                }
            }
        }
        // The workers end only when the pass does, so a send fails only if one panicked;
        // finish() reports that.
        let files = std::mem::take(&mut c.pprof);
        if let Some((tx, _)) = &self.pprof
            && !files.is_empty()
        {
            let _ = tx.send(PprofFiles {
                files,
                target: c.target.clone(),
                run: c.run.clone(),
            });
        }
        if let Some((tx, _)) = &self.side {
            let _ = tx.send(c);
        }
    }

    /// Leaves a capture out, with the reason (it could not be read).
    pub fn skip(&mut self, why: &str) {
        self.notes.push(format!("left out a capture: {why}"));
        self.skipped.push(why.to_owned());
    }

    /// Produces every output.
    pub async fn finish(mut self) -> Outcome {
        let side = join(self.side.take(), "the rules", &mut self.notes);
        let merged_pprof = join(self.pprof.take(), "the pprof merge", &mut self.notes);
        self.captures = side.captures;
        let runs = runs_in_order(&self.captures);
        let mut out = Outcome {
            captures: self.captures.len(),
            runs: runs.len(),
            notes: std::mem::take(&mut self.notes),
            skipped: std::mem::take(&mut self.skipped),
            ..Outcome::default()
        };
        let mut merged: Vec<(ProfileKind, Folded)> = Vec::new();
        let mut drawings = Vec::new();
        for (kind, sorter) in std::mem::take(&mut self.sorters) {
            match self.walk(kind, sorter, &runs, &mut out, &mut drawings) {
                Ok(pruned) => merged.push((kind, pruned.folded())),
                Err(e) => out
                    .notes
                    .push(format!("merging the {} profiles: {e}", kind.name())),
            }
        }
        draw_all(&drawings, &mut out);
        for (name, m) in merged_pprof {
            out.notes
                .extend(m.skipped.iter().map(|s| format!("{name}: left out {s}")));
            match m.finish() {
                Ok(file) => out.push(name, Content::Spooled(file)),
                Err(e) => out.notes.push(format!("merging {name}: {e}")),
            }
        }
        if let Some(e) = &self.failed {
            out.notes.push(format!(
                "the merge's scratch space failed, so the merged profiles may miss stacks: {e}"
            ));
        }
        out.findings = side.rules.finish();
        let captures = &self.captures;
        if let Some(endpoint) = &self.opts.model {
            match model::ask(endpoint, captures, &out.findings).await {
                Ok(more) => out.findings.extend(more),
                Err(e) => {
                    out.model_error = Some(e.to_string());
                    out.notes.push(format!(
                        "the model step failed, so every finding below comes from the rules alone: {e}"
                    ));
                }
            }
        }
        out.push(
            "findings.json".into(),
            serde_json::to_vec_pretty(&out.findings).expect("findings serialize"),
        );
        if self.opts.html_report {
            let files: Vec<(String, String)> = out
                .files
                .iter()
                .map(|(name, _)| (name.clone(), name.clone()))
                .collect();
            let page = html::render(&html::Report {
                title: &self.opts.title,
                meta: &format!(
                    "{}; {} run(s), {} capture(s)",
                    self.opts.meta, out.runs, out.captures
                ),
                captures,
                merged: &merged,
                findings: &out.findings,
                notes: &out.notes,
                files: &files,
            });
            out.push("report.html".into(), page.into_bytes());
        }
        out
    }

    /// Walks `kind`'s merged stacks once: the exact merged folded file, and the merged, per-run
    /// and differential flamegraphs from pruners fed side by side. Returns the merged pruning
    /// (what the HTML report draws).
    fn walk(
        &self,
        kind: ProfileKind,
        sorter: Sorter,
        runs: &[String],
        out: &mut Outcome,
        drawings: &mut Vec<Drawing>,
    ) -> io::Result<Pruned> {
        let group_total = |groups: &[u32]| -> u64 {
            groups
                .iter()
                .filter_map(|g| sorter.totals.get(g))
                .sum::<u64>()
        };
        let groups_where = |keep: &dyn Fn(&Group) -> bool| -> Vec<u32> {
            let mut v: Vec<u32> = self
                .groups
                .iter()
                .filter(|(g, _)| keep(g))
                .map(|(_, &id)| id)
                .collect();
            v.sort_unstable();
            v
        };
        let total: u64 = sorter.totals.values().sum();
        let mut all = Pruner::new(total);
        let mut per_run: Vec<(String, Vec<u32>, Pruner)> = Vec::new();
        if self.opts.merged_flamegraph && runs.len() >= 2 {
            for run in runs {
                let groups = groups_where(&|g: &Group| &g.0 == run);
                let t = group_total(&groups);
                if t > 0 {
                    per_run.push((run.clone(), groups, Pruner::new(t)));
                }
            }
        }
        let mut diff = None;
        if self.opts.differential_flamegraph {
            match split_for_diff(&self.captures, kind) {
                Ok((before, after, how)) => {
                    let pick = |cs: Vec<&Capture>| {
                        let set: BTreeSet<Group> = cs.into_iter().map(group_of).collect();
                        groups_where(&|g: &Group| set.contains(g))
                    };
                    let (b, a) = (pick(before), pick(after));
                    let (tb, ta) = (group_total(&b), group_total(&a));
                    diff = Some((b, a, tb, ta, how, Pruner::new(ta)));
                }
                Err(why) => out.notes.push(why),
            }
        }
        let mut folded_out = if self.opts.merged_flamegraph {
            Some(io::BufWriter::new(tempfile::spooled_tempfile(
                pprof::SPOOL_IN_MEMORY,
            )))
        } else {
            None
        };
        let sum_of = |counts: &Counts, groups: &[u32]| -> u64 {
            counts
                .iter()
                .filter(|(g, _)| groups.binary_search(g).is_ok())
                .map(|x| x.1)
                .sum()
        };
        let mut merged = sorter.finish()?;
        while let Some((stack, counts)) = merged.next_stack()? {
            let sum: u64 = counts.iter().map(|x| x.1).sum();
            if let Some(w) = &mut folded_out {
                w.write_all(stack.as_bytes())?;
                writeln!(w, " {sum}")?;
            }
            let frames: Vec<&str> = stack.split(';').collect();
            all.add_frames(&frames, [sum, 0]);
            for (_, groups, p) in &mut per_run {
                p.add_frames(&frames, [sum_of(&counts, groups), 0]);
            }
            if let Some((b, a, tb, ta, _, p)) = &mut diff {
                let before = scale(sum_of(&counts, b), *ta, *tb);
                p.add_frames(&frames, [sum_of(&counts, a), before]);
            }
        }
        let all = all.finish();
        if let Some(w) = folded_out {
            let mut file = w.into_inner().map_err(io::IntoInnerError::into_error)?;
            file.rewind()?;
            let subtitle = format!(
                "{} {} over {} capture(s) of {} run(s){}",
                all.total,
                kind.unit(),
                out.captures,
                out.runs,
                all.note(kind.unit())
            );
            drawings.push(Drawing::of(
                format!("{}.svg", kind.name()),
                kind,
                subtitle,
                &all,
            ));
            out.push(format!("{}.folded", kind.name()), Content::Spooled(file));
        }
        run_and_diff_drawings(kind, per_run, diff, drawings);
        Ok(all)
    }
}

/// The per-run and differential flamegraphs of one kind, from their pruners.
fn run_and_diff_drawings(
    kind: ProfileKind,
    per_run: Vec<(String, Vec<u32>, Pruner)>,
    diff: Option<Diff>,
    drawings: &mut Vec<Drawing>,
) {
    for (run, _, p) in per_run {
        let p = p.finish();
        let sub = format!(
            "{} {} in run {run}{}",
            p.total,
            kind.unit(),
            p.note(kind.unit())
        );
        let name = format!("runs/{}/{}.svg", file_name(&run), kind.name());
        drawings.push(Drawing::of(name, kind, sub, &p));
    }
    if let Some((_, _, tb, ta, how, p)) = diff {
        let p = p.finish();
        let sub = format!("{how}: {tb} -> {ta} {}{}", kind.unit(), p.note(kind.unit()));
        drawings.push(Drawing {
            file: format!("{}.diff.svg", kind.name()),
            kind,
            subtitle: sub,
            lines: p
                .lines
                .iter()
                .map(|(s, v)| format!("{s} {} {}", v[1], v[0]))
                .collect(),
            differential: true,
        });
    }
}

/// A differential flamegraph in progress: the groups before and after, their totals, how they
/// were split, and its pruner.
type Diff = (Vec<u32>, Vec<u32>, u64, u64, String, Pruner);

/// A flamegraph to draw: its file, titles and folded lines (`stack count`, or `stack before
/// after` when differential).
struct Drawing {
    file: String,
    kind: ProfileKind,
    subtitle: String,
    lines: Vec<String>,
    differential: bool,
}

impl Drawing {
    fn of(file: String, kind: ProfileKind, subtitle: String, p: &Pruned) -> Self {
        Self {
            file,
            kind,
            subtitle,
            lines: p
                .lines
                .iter()
                .map(|(s, v)| format!("{s} {}", v[0]))
                .collect(),
            differential: false,
        }
    }

    fn draw(&self) -> Result<Vec<u8>, String> {
        let graph = Graph {
            title: self.kind.title(),
            subtitle: &self.subtitle,
            count_name: self.kind.unit(),
        };
        let drawn = if self.differential {
            let lines: Vec<&str> = self.lines.iter().map(String::as_str).collect();
            folded::differential_of_lines(&lines, &graph)
        } else {
            folded::flamegraph_of_lines(&self.lines, &graph)
        };
        drawn.map_err(|e| format!("rendering {}: {e}", self.file))
    }
}

/// Draws every flamegraph, on as many threads as there are cores (each is independent), and
/// adds them to `out` in order.
fn draw_all(drawings: &[Drawing], out: &mut Outcome) {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(drawings.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<(usize, Result<Vec<u8>, String>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(d) = drawings.get(i) else { break done };
                        done.push((i, d.draw()));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    });
    results.sort_by_key(|r| r.0);
    for (i, r) in results {
        match r {
            Ok(svg) => out.push(drawings[i].file.clone(), svg),
            Err(e) => out.notes.push(e),
        }
    }
}

/// `value` of a baseline totalling `from`, on the scale of a comparison totalling `to` (the
/// normalisation of a differential flamegraph, so runs of different lengths compare).
fn scale(value: u64, to: u64, from: u64) -> u64 {
    if from == 0 {
        return 0;
    }
    let v = (u128::from(value) * u128::from(to) + u128::from(from) / 2) / u128::from(from);
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// Runs one processing pass over captures already read.
pub async fn process(captures: &[Capture], opts: &Options) -> Outcome {
    let mut pass = match Pass::new(opts) {
        Ok(p) => p,
        Err(e) => {
            return Outcome {
                notes: vec![format!("no scratch space for the merge: {e}")],
                ..Outcome::default()
            };
        }
    };
    for c in captures {
        pass.add(c.clone());
    }
    pass.finish().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::fixtures::capture;

    fn all() -> Options {
        Options {
            merged_flamegraph: true,
            differential_flamegraph: true,
            merged_pprof: true,
            html_report: true,
            title: "t".into(),
            meta: "m".into(),
            ..Options::default()
        }
    }

    #[tokio::test]
    async fn every_output_is_produced_and_totals_hold() {
        let mut a = capture("cpu");
        let mut b = capture("contend");
        let stress = capture("stress");
        a.summary.started_unix_ms = 1;
        b.summary.started_unix_ms = 2;
        // The contended run under a fault: the baseline is the run without one.
        b.summary.fault.clone_from(&stress.summary.fault);
        let caps = vec![a, b, stress];
        let mut out = process(&caps, &all()).await;
        let names: Vec<&str> = out.files.iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "cpu.svg",
            "cpu.folded",
            "cpu.diff.svg",
            "cpu.pb.gz",
            "findings.json",
            "report.html",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(names.iter().any(|n| n.starts_with("runs/")), "{names:?}");
        let folded = out.file("cpu.folded").unwrap();
        let merged = Folded::parse(std::str::from_utf8(&folded).unwrap()).unwrap();
        let sum: u64 = caps
            .iter()
            .map(|c| c.profiles[&ProfileKind::Cpu].total())
            .sum();
        assert_eq!(merged.total(), sum);
        let pb = out.file("cpu.pb.gz").unwrap();
        let p = pprof::decode(&pb).unwrap();
        assert_eq!(u64::try_from(pprof::totals(&p)[0]).unwrap(), sum);
        assert!(out.findings.iter().any(|f| f.rule == "dominant-function"));
        assert!(out.findings.iter().any(|f| f.rule == "lock-contention"));
    }

    #[tokio::test]
    async fn one_run_says_why_there_is_no_differential() {
        let out = process(&[capture("cpu")], &all()).await;
        assert!(!out.files.iter().any(|(n, _)| n == "cpu.diff.svg"));
        assert!(
            out.notes
                .iter()
                .any(|n| n.contains("needs two runs with a cpu profile")),
            "{:?}",
            out.notes
        );
    }

    /// The root's total an inferno SVG shows (`all (1,234 samples, 100%)`).
    fn svg_total(svg: &[u8]) -> u64 {
        let text = std::str::from_utf8(svg).unwrap();
        let at = text.find("<title>all (").expect("a root frame") + "<title>all (".len();
        let digits: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == ',')
            .filter(char::is_ascii_digit)
            .collect();
        digits.parse().unwrap()
    }

    /// Two runs of many captures whose stacks are mostly too narrow to draw.
    fn wide_and_narrow() -> Vec<Capture> {
        (0..12u64)
            .map(|i| {
                let mut c = capture("cpu");
                c.run = format!("r{}", i % 2);
                c.target = format!("pod-{i}/app");
                c.summary.started_unix_ms = i % 2;
                let mut f = Folded::default();
                f.add("app;main;hot".into(), 50_000 + i);
                for n in 0..2000 {
                    f.add(
                        format!("app;main;cold;c{};c{}", n % 40, n * 7 + i),
                        1 + n % 3,
                    );
                }
                c.profiles.insert(ProfileKind::Cpu, f);
                c.pprof.clear();
                c
            })
            .collect()
    }

    #[tokio::test]
    async fn pruned_flamegraphs_keep_the_totals_of_the_unpruned_ones() {
        let caps = wide_and_narrow();
        let mut out = process(&caps, &all()).await;
        let exact =
            Folded::parse(std::str::from_utf8(&out.file("cpu.folded").unwrap()).unwrap()).unwrap();
        let want: u64 = caps
            .iter()
            .map(|c| c.profiles[&ProfileKind::Cpu].total())
            .sum();
        assert_eq!(exact.total(), want);
        assert_eq!(
            exact.stacks.len(),
            1 + 12 * 2000,
            "every distinct stack, exactly"
        );
        let graph = Graph {
            title: "t",
            subtitle: "s",
            count_name: "samples",
        };
        let unpruned = folded::flamegraph(&exact, &graph).unwrap();
        let pruned = out.file("cpu.svg").unwrap();
        assert_eq!(svg_total(&pruned), svg_total(&unpruned));
        assert_eq!(svg_total(&pruned), want);
        let text = std::str::from_utf8(&pruned).unwrap();
        assert!(
            text.contains("too narrow to draw"),
            "the SVG says what it folded"
        );
        for run in ["r0", "r1"] {
            let per = out.file(&format!("runs/{run}/cpu.svg")).unwrap();
            let run_total: u64 = caps
                .iter()
                .filter(|c| c.run == run)
                .map(|c| c.profiles[&ProfileKind::Cpu].total())
                .sum();
            assert_eq!(svg_total(&per), run_total, "{run}");
        }
        let diff = out.file("cpu.diff.svg").unwrap();
        let after: u64 = caps
            .iter()
            .filter(|c| c.run == "r1")
            .map(|c| c.profiles[&ProfileKind::Cpu].total())
            .sum();
        assert_eq!(
            svg_total(&diff),
            after,
            "a differential's width is the later run"
        );
    }

    #[tokio::test]
    async fn a_merge_that_spills_to_disk_writes_the_same_outputs() {
        let caps = wide_and_narrow();
        let scratch = tempfile::tempdir().unwrap();
        let small = Options {
            memory_budget: 64 << 10,
            scratch: Some(scratch.path().to_owned()),
            ..all()
        };
        let mut spilled = process(&caps, &small).await;
        let mut in_memory = process(&caps, &all()).await;
        assert_eq!(spilled.file("cpu.folded"), in_memory.file("cpu.folded"));
        // inferno picks colours at random: the frames and their widths must agree.
        let frames = |svg: Bytes| {
            let text = String::from_utf8(svg.to_vec()).unwrap();
            let mut v: Vec<String> = text
                .split("<title>")
                .skip(1)
                .map(|t| t.split("</title>").next().unwrap().to_owned())
                .collect();
            v.sort();
            v
        };
        for name in ["cpu.svg", "runs/r0/cpu.svg", "cpu.diff.svg"] {
            let (a, b) = (spilled.file(name).unwrap(), in_memory.file(name).unwrap());
            assert_eq!(frames(a), frames(b), "{name}");
        }
        assert!(
            std::fs::read_dir(scratch.path()).unwrap().next().is_none(),
            "scratch space is removed"
        );
    }
}
