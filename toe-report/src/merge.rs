//! Merging folded stacks of any number of captures in bounded memory, and drawing them in bounded
//! time.
//!
//! [`Sorter`] sums each distinct stack's count per group (a group is a run, with or without a
//! fault) in memory until its budget is reached, then writes what it holds, sorted, to a run file
//! and starts again; [`Sorter::finish`] merges the run files into one stream of distinct stacks
//! in *frame order* (compared frame by frame, so every stack under a frame is contiguous, as a
//! depth-first walk of the flamegraph's tree visits them). Peak memory is the budget, whatever
//! the number of captures or distinct stacks; a pass that fits the budget never touches the disk.
//!
//! [`Pruner`] consumes that stream and keeps only the frames a flamegraph can draw: inferno leaves
//! out every frame narrower than [`NARROW_SHARE`] of the graph, so such frames are summed into one
//! `[narrow frames]` child of their parent before inferno sees them. The picture is the same,
//! the totals are the same, and inferno's work is bounded by what fits on the screen instead of by
//! the number of distinct stacks. It needs only the open path of the walk, so its memory is the
//! stack depth plus the frames it keeps.
//!
//! Run files are a private format (length-prefixed stack bytes and `(group, count)` pairs): they
//! live only as long as one pass, in the pass's own temporary directory, and are never read by
//! anything else, so no interchange format is needed and the cheapest to write and read is used.

use std::{
    cmp::Ordering,
    collections::{BinaryHeap, HashMap},
    fs::File,
    io::{self, BufReader, BufWriter, Read, Write},
    path::Path,
};

/// A stack's count per group, sorted by group.
pub type Counts = Vec<(u32, u64)>;

/// Frames narrower than this share of the graph are not drawn: inferno's default minimum width
/// (0.1 px) over its default image width (1200 px).
pub const NARROW_SHARE: f64 = 0.1 / 1200.0;

/// The frame that stands for the frames too narrow to draw under one parent.
pub const NARROW_FRAME: &str = "[narrow frames]";

/// Byte order of stacks compared frame by frame: the separator sorts before every byte a frame
/// name can hold, so `a;b;c` comes right after `a;b` and before `a;b x`.
#[must_use]
pub fn frame_order(a: &str, b: &str) -> Ordering {
    let key = |c: u8| if c == b';' { 0u16 } else { u16::from(c) + 1 };
    a.bytes().map(key).cmp(b.bytes().map(key))
}

/// A stack as the sorter keeps it, written into `key`: bytes, separators as NUL, so plain byte
/// order (memcmp) is [`frame_order`]. The bytes 0 and 1 inside a frame name (possible only in a
/// hostile capture) are escaped as `1 1` and `1 2`: the encoding keeps their order and stays
/// one-to-one, so no two stacks merge into one.
fn sort_key(stack: &str, key: &mut Vec<u8>) {
    key.clear();
    let bytes = stack.as_bytes();
    // The common case, no byte to escape, as one vectorisable pass.
    if memchr::memchr2(0, 1, bytes).is_none() {
        key.extend(bytes.iter().map(|&b| if b == b';' { 0 } else { b }));
        return;
    }
    for &b in bytes {
        match b {
            b';' => key.push(0),
            0 => key.extend_from_slice(&[1, 1]),
            1 => key.extend_from_slice(&[1, 2]),
            b => key.push(b),
        }
    }
}

/// The stack a sort key stands for.
fn stack_of(key: &[u8]) -> String {
    let bytes: Vec<u8> = if memchr::memchr(1, key).is_none() {
        key.iter().map(|&b| if b == 0 { b';' } else { b }).collect()
    } else {
        let mut bytes = Vec::with_capacity(key.len());
        let mut it = key.iter();
        while let Some(&b) = it.next() {
            bytes.push(match b {
                0 => b';',
                1 => it.next().map_or(1, |&e| e - 1),
                b => b,
            });
        }
        bytes
    };
    // Keys are made from `&str`s and only ASCII bytes were changed: always UTF-8.
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Approximate heap cost of one distinct stack in memory: its bytes, the box, the map slot and
/// the counts vector.
const ENTRY_OVERHEAD: usize = 96;

/// Sums stacks per group within a memory budget, spilling sorted runs to disk beyond it.
pub struct Sorter {
    mem: foldhash::HashMap<Box<[u8]>, Counts>,
    bytes: usize,
    budget: usize,
    dir: std::path::PathBuf,
    runs: Vec<tempfile::NamedTempFile>,
    key: Vec<u8>,
    /// Sum of every count added, per group.
    pub totals: HashMap<u32, u64>,
}

impl Sorter {
    /// A sorter that holds about `budget` bytes of stacks and spills into `dir`.
    #[must_use]
    pub fn new(budget: usize, dir: &Path) -> Self {
        Self {
            mem: foldhash::HashMap::default(),
            bytes: 0,
            budget,
            dir: dir.to_owned(),
            runs: Vec::new(),
            key: Vec::new(),
            totals: HashMap::new(),
        }
    }

    /// Adds `count` to `stack` in `group`.
    pub fn add(&mut self, stack: &str, group: u32, count: u64) -> io::Result<()> {
        if count == 0 {
            return Ok(());
        }
        *self.totals.entry(group).or_insert(0) += count;
        sort_key(stack, &mut self.key);
        let counts = if let Some(c) = self.mem.get_mut(self.key.as_slice()) {
            c
        } else {
            self.bytes += self.key.len() + ENTRY_OVERHEAD;
            self.mem.entry(self.key.as_slice().into()).or_default()
        };
        match counts.binary_search_by_key(&group, |&(g, _)| g) {
            Ok(i) => counts[i].1 = counts[i].1.saturating_add(count),
            Err(i) => {
                counts.insert(i, (group, count));
                self.bytes += 16;
            }
        }
        if self.bytes > self.budget {
            self.spill()?;
        }
        Ok(())
    }

    /// Bytes the spilled runs take on disk (0 when everything fitted in memory).
    #[must_use]
    pub fn spilled(&self) -> u64 {
        self.runs
            .iter()
            .filter_map(|r| r.as_file().metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    fn sorted(&mut self) -> Vec<(Box<[u8]>, Counts)> {
        let mut v: Vec<(Box<[u8]>, Counts)> = self.mem.drain().collect();
        self.bytes = 0;
        v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn spill(&mut self) -> io::Result<()> {
        let sorted = self.sorted();
        let mut file = tempfile::NamedTempFile::new_in(&self.dir)?;
        {
            let mut w = BufWriter::with_capacity(1 << 16, file.as_file_mut());
            for (stack, counts) in &sorted {
                write_record(&mut w, stack, counts)?;
            }
            w.flush()?;
        }
        self.runs.push(file);
        Ok(())
    }

    /// Every distinct stack with its counts per group, in frame order.
    pub fn finish(mut self) -> io::Result<Merged> {
        let mut sources: Vec<Source> = Vec::with_capacity(self.runs.len() + 1);
        for run in &self.runs {
            let file = run.reopen()?;
            sources.push(Source::File(BufReader::with_capacity(1 << 16, file)));
        }
        sources.push(Source::Mem(self.sorted().into_iter()));
        let mut heap = BinaryHeap::new();
        for (i, s) in sources.iter_mut().enumerate() {
            if let Some((stack, counts)) = s.next()? {
                heap.push(Head {
                    stack,
                    counts,
                    source: i,
                });
            }
        }
        Ok(Merged {
            sources,
            heap,
            _runs: self.runs,
        })
    }
}

fn write_record(w: &mut impl Write, stack: &[u8], counts: &Counts) -> io::Result<()> {
    let len = u32::try_from(stack.len()).map_err(|_| io::Error::other("stack too long"))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(stack)?;
    let n = u32::try_from(counts.len()).map_err(|_| io::Error::other("too many groups"))?;
    w.write_all(&n.to_le_bytes())?;
    for &(g, c) in counts {
        w.write_all(&g.to_le_bytes())?;
        w.write_all(&c.to_le_bytes())?;
    }
    Ok(())
}

enum Source {
    Mem(std::vec::IntoIter<(Box<[u8]>, Counts)>),
    File(BufReader<File>),
}

impl Source {
    fn next(&mut self) -> io::Result<Option<(Box<[u8]>, Counts)>> {
        match self {
            Self::Mem(it) => Ok(it.next()),
            Self::File(r) => {
                let mut len = [0u8; 4];
                match r.read_exact(&mut len) {
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                    other => other?,
                }
                let mut stack = vec![0u8; u32::from_le_bytes(len) as usize];
                r.read_exact(&mut stack)?;
                r.read_exact(&mut len)?;
                let n = u32::from_le_bytes(len) as usize;
                let mut counts = Vec::with_capacity(n);
                for _ in 0..n {
                    let mut g = [0u8; 4];
                    let mut c = [0u8; 8];
                    r.read_exact(&mut g)?;
                    r.read_exact(&mut c)?;
                    counts.push((u32::from_le_bytes(g), u64::from_le_bytes(c)));
                }
                Ok(Some((stack.into_boxed_slice(), counts)))
            }
        }
    }
}

struct Head {
    stack: Box<[u8]>,
    counts: Counts,
    source: usize,
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head {
    // Reversed: BinaryHeap pops the greatest, the merge wants the first in frame order.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .stack
            .cmp(&self.stack)
            .then(other.source.cmp(&self.source))
    }
}

/// The merged stream: each distinct stack once, in frame order, with its counts per group.
pub struct Merged {
    sources: Vec<Source>,
    heap: BinaryHeap<Head>,
    _runs: Vec<tempfile::NamedTempFile>,
}

impl Merged {
    /// The next distinct stack, or `None` at the end.
    pub fn next_stack(&mut self) -> io::Result<Option<(String, Counts)>> {
        let Some(first) = self.heap.pop() else {
            return Ok(None);
        };
        let (stack, mut counts) = (first.stack, first.counts);
        self.refill(first.source)?;
        while self.heap.peek().is_some_and(|h| h.stack == stack) {
            let same = self.heap.pop().expect("peeked");
            for (g, c) in same.counts {
                match counts.binary_search_by_key(&g, |&(x, _)| x) {
                    Ok(i) => counts[i].1 = counts[i].1.saturating_add(c),
                    Err(i) => counts.insert(i, (g, c)),
                }
            }
            self.refill(same.source)?;
        }
        Ok(Some((stack_of(&stack), counts)))
    }

    fn refill(&mut self, source: usize) -> io::Result<()> {
        if let Some((stack, counts)) = self.sources[source].next()? {
            self.heap.push(Head {
                stack,
                counts,
                source,
            });
        }
        Ok(())
    }
}

/// One node on the open path of the walk. `values[0]` is the width (the count drawn), `values[1]`
/// a second count carried along (the "before" of a differential graph).
#[derive(Default)]
struct Open {
    name: String,
    own: [u64; 2],
    narrow: [u64; 2],
    children: [u64; 2],
}

fn add2(a: &mut [u64; 2], b: [u64; 2]) {
    a[0] = a[0].saturating_add(b[0]);
    a[1] = a[1].saturating_add(b[1]);
}

/// Keeps the frames at least `min` wide of a stream of stacks in frame order; see the module
/// docs.
pub struct Pruner {
    min: u64,
    open: Vec<Open>,
    /// The kept lines: stack and its one or two counts.
    lines: Vec<(String, [u64; 2])>,
    top_narrow: [u64; 2],
    /// Subtrees folded into `[narrow frames]`, and the count they held.
    pub folded_frames: u64,
    pub folded_value: u64,
    pub total: u64,
}

impl Pruner {
    /// A pruner for a graph whose width is `total`: frames under [`NARROW_SHARE`] of it fold.
    #[must_use]
    pub fn new(total: u64) -> Self {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "a threshold in counts"
        )]
        let min = (total as f64 * NARROW_SHARE).ceil() as u64;
        Self {
            min: min.max(1),
            open: Vec::new(),
            lines: Vec::new(),
            top_narrow: [0; 2],
            folded_frames: 0,
            folded_value: 0,
            total: 0,
        }
    }

    /// Adds one stack (frames separated by `;`), which must not come before the previous one in
    /// [`frame_order`].
    pub fn add(&mut self, stack: &str, values: [u64; 2]) {
        let frames: Vec<&str> = stack.split(';').collect();
        self.add_frames(&frames, values);
    }

    /// [`Self::add`] of a stack already split into its frames.
    pub fn add_frames(&mut self, frames: &[&str], values: [u64; 2]) {
        if values == [0, 0] || frames.is_empty() {
            return;
        }
        self.total = self.total.saturating_add(values[0]);
        let common = self
            .open
            .iter()
            .zip(frames)
            .take_while(|(o, f)| o.name == **f)
            .count();
        while self.open.len() > common {
            self.close();
        }
        for f in &frames[common..] {
            self.open.push(Open {
                name: (*f).to_owned(),
                ..Open::default()
            });
        }
        add2(&mut self.open.last_mut().expect("pushed").own, values);
    }

    fn path(&self, last: &str) -> String {
        let mut p = String::new();
        for o in &self.open {
            p.push_str(&o.name);
            p.push(';');
        }
        p.push_str(last);
        p
    }

    fn close(&mut self) {
        let node = self.open.pop().expect("an open node");
        let mut total = node.own;
        add2(&mut total, node.narrow);
        add2(&mut total, node.children);
        if total[0] >= self.min {
            let path = self.path(&node.name);
            if node.narrow != [0, 0] {
                self.lines
                    .push((format!("{path};{NARROW_FRAME}"), node.narrow));
            }
            if node.own != [0, 0] {
                self.lines.push((path, node.own));
            }
            if let Some(parent) = self.open.last_mut() {
                add2(&mut parent.children, total);
            }
        } else {
            self.folded_frames += 1;
            self.folded_value = self.folded_value.saturating_add(total[0]);
            match self.open.last_mut() {
                Some(parent) => add2(&mut parent.narrow, total),
                None => add2(&mut self.top_narrow, total),
            }
        }
    }

    /// The kept lines, with every count accounted for.
    #[must_use]
    pub fn finish(mut self) -> Pruned {
        while !self.open.is_empty() {
            self.close();
        }
        if self.top_narrow != [0, 0] {
            self.lines.push((NARROW_FRAME.to_owned(), self.top_narrow));
        }
        Pruned {
            lines: self.lines,
            folded_frames: self.folded_frames,
            folded_value: self.folded_value,
            total: self.total,
        }
    }
}

/// What a [`Pruner`] kept.
#[derive(Debug, Default)]
pub struct Pruned {
    pub lines: Vec<(String, [u64; 2])>,
    pub folded_frames: u64,
    pub folded_value: u64,
    pub total: u64,
}

impl Pruned {
    /// The kept stacks with their first count, as folded stacks.
    #[must_use]
    pub fn folded(&self) -> toe_artifacts::folded::Folded {
        let mut f = toe_artifacts::folded::Folded::default();
        for (s, v) in &self.lines {
            f.add(s.clone(), v[0]);
        }
        f
    }

    /// What the graph's subtitle says about the folding, empty when nothing was folded.
    #[must_use]
    pub fn note(&self, unit: &str) -> String {
        if self.folded_frames == 0 {
            String::new()
        } else {
            format!(
                "; {} {unit} in {} frames too narrow to draw shown as {NARROW_FRAME}",
                self.folded_value, self.folded_frames
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_bytes_in_frames_neither_split_nor_merge_stacks() {
        let stacks = ["a;b", "a\0;b", "a\u{1};b", "a\0\u{1}", "a;\u{1}\0", "a"];
        let dir = tempfile::tempdir().unwrap();
        // A budget of one byte spills every stack, so the file round trip runs too.
        let mut s = Sorter::new(1, dir.path());
        for (i, st) in stacks.iter().enumerate() {
            s.add(st, 0, i as u64 + 1).unwrap();
        }
        let mut m = s.finish().unwrap();
        let mut got = Vec::new();
        while let Some((st, counts)) = m.next_stack().unwrap() {
            got.push((st, counts[0].1));
        }
        let mut want: Vec<(String, u64)> = stacks
            .iter()
            .enumerate()
            .map(|(i, st)| ((*st).to_owned(), i as u64 + 1))
            .collect();
        want.sort_by(|x, y| frame_order(&x.0, &y.0));
        assert_eq!(got, want);
    }

    #[test]
    fn frame_order_keeps_every_subtree_together() {
        let mut v = vec!["a;b x;d", "a;b;e", "a;b", "a;b;c", "a", "a b"];
        v.sort_by(|x, y| frame_order(x, y));
        assert_eq!(v, ["a", "a;b", "a;b;c", "a;b;e", "a;b x;d", "a b"]);
    }

    fn merged(sorter: Sorter) -> Vec<(String, Counts)> {
        let mut m = sorter.finish().unwrap();
        let mut out = Vec::new();
        while let Some((s, c)) = m.next_stack().unwrap() {
            out.push((s, c));
        }
        out
    }

    #[test]
    fn spilled_and_in_memory_merges_agree() {
        let dir = tempfile::tempdir().unwrap();
        let stacks: Vec<String> = (0..3000)
            .map(|i| format!("p;f{};g{};h{}", i % 7, i % 13, i % 101))
            .collect();
        let fill = |s: &mut Sorter| {
            for (i, st) in stacks.iter().enumerate() {
                s.add(st, u32::try_from(i % 3).unwrap(), 1 + i as u64 % 5)
                    .unwrap();
            }
        };
        let mut small = Sorter::new(4096, dir.path());
        fill(&mut small);
        assert!(small.spilled() > 0, "a small budget spills");
        let mut big = Sorter::new(1 << 30, dir.path());
        fill(&mut big);
        assert_eq!(big.spilled(), 0);
        assert_eq!(small.totals, big.totals);
        let (a, b) = (merged(small), merged(big));
        assert_eq!(a, b);
        let mut want: HashMap<&str, u64> = HashMap::new();
        for (i, st) in stacks.iter().enumerate() {
            *want.entry(st).or_default() += 1 + i as u64 % 5;
        }
        assert_eq!(a.len(), want.len());
        for (s, c) in &a {
            assert_eq!(c.iter().map(|x| x.1).sum::<u64>(), want[s.as_str()], "{s}");
        }
        assert!(a.windows(2).all(|w| frame_order(&w[0].0, &w[1].0).is_lt()));
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "run files removed"
        );
    }

    #[test]
    fn pruning_keeps_totals_and_wide_frames() {
        let mut p = Pruner::new(950_002);
        let mut stacks = vec![("app;main;hot".to_owned(), 900_000u64)];
        for i in 0..1000 {
            stacks.push((format!("app;main;cold;c{i:04}"), 50));
        }
        stacks.push(("app;main;tiny".to_owned(), 1));
        stacks.push(("other".to_owned(), 1));
        stacks.sort_by(|a, b| frame_order(&a.0, &b.0));
        for (s, v) in &stacks {
            p.add(s, [*v, 0]);
        }
        let out = p.finish();
        let total: u64 = out.lines.iter().map(|l| l.1[0]).sum();
        assert_eq!(total, 950_002);
        assert_eq!(out.total, 950_002);
        let f = out.folded();
        assert_eq!(f.stacks["app;main;hot"], 900_000);
        // Each c#### is 50 < 80 (0.1 px of 1200), their parent is 50k: one narrow frame.
        assert_eq!(f.stacks["app;main;cold;[narrow frames]"], 50_000);
        assert_eq!(f.stacks["app;main;[narrow frames]"], 1);
        assert_eq!(f.stacks["[narrow frames]"], 1);
        assert_eq!(out.folded_frames, 1002);
        assert!(
            out.note("samples").contains("1002 frames"),
            "{}",
            out.note("samples")
        );
        assert_eq!(f.stacks.len(), 4);
    }
}
