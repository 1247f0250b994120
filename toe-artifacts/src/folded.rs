//! Folded stacks (`root;child;leaf count`, the interchange format of flamegraph tools): written
//! from a [`Profile`] by the agent, read back and merged across targets and runs by processing,
//! and turned into flamegraphs (inferno) on both sides.

use std::{collections::BTreeMap, fmt::Write as _};

use crate::profile::{Frame, Profile};

/// Stacks and their counts. The first frame is the process (`name (pid)` as the agent writes
/// it); [`Folded::parse`] drops the pid so the same program merges across pods and runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Folded {
    pub stacks: foldhash::HashMap<String, u64>,
}

/// A line that is not `stack count`.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: not `frames count`: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub text: String,
}

/// `name (1234)` -> `name`: pids differ between targets and runs of the same program.
fn without_pid(root: &str) -> &str {
    match root.rsplit_once(" (") {
        Some((name, pid))
            if pid.ends_with(')') && pid[..pid.len() - 1].bytes().all(|b| b.is_ascii_digit()) =>
        {
            name
        }
        _ => root,
    }
}

/// A frame's function name without the `_[k]`/`_[i]` markers flamegraph palettes read.
#[must_use]
pub fn function_name(frame: &str) -> &str {
    frame
        .strip_suffix("_[k]")
        .or_else(|| frame.strip_suffix("_[i]"))
        .unwrap_or(frame)
}

impl Folded {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut out = Self::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = || ParseError {
                line: i + 1,
                text: line.chars().take(120).collect(),
            };
            let (stack, count) = line.rsplit_once(' ').ok_or_else(bad)?;
            let count: u64 = count.parse().map_err(|_| bad())?;
            let stack = match stack.split_once(';') {
                Some((root, rest)) => format!("{};{rest}", without_pid(root)),
                None => without_pid(stack).to_owned(),
            };
            out.add(stack, count);
        }
        Ok(out)
    }

    pub fn add(&mut self, stack: String, count: u64) {
        if count > 0 {
            *self.stacks.entry(stack).or_insert(0) += count;
        }
    }

    /// Adds every stack of `other`, each under `root` when given (a target or run label as the
    /// flamegraph's first frame).
    pub fn merge(&mut self, other: &Self, root: Option<&str>) {
        for (stack, &count) in &other.stacks {
            match root {
                Some(r) => self.add(format!("{};{stack}", r.replace(';', ",")), count),
                None => self.add(stack.clone(), count),
            }
        }
    }

    #[must_use]
    pub fn total(&self) -> u64 {
        self.stacks.values().sum()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.stacks.is_empty()
    }

    /// Lines sorted by stack, so every output built from them is deterministic.
    #[must_use]
    pub fn lines(&self) -> Vec<String> {
        let mut v: Vec<(&String, &u64)> = self.stacks.iter().collect();
        v.sort_unstable();
        v.into_iter().map(|(s, c)| format!("{s} {c}")).collect()
    }

    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for l in self.lines() {
            let _ = writeln!(out, "{l}");
        }
        out
    }

    /// Count whose leaf frame is each function (self time), largest first.
    #[must_use]
    pub fn self_by_function(&self) -> Vec<(String, u64)> {
        let mut by: foldhash::HashMap<&str, u64> = foldhash::HashMap::default();
        for (stack, &count) in &self.stacks {
            let leaf = stack.rsplit(';').next().unwrap_or(stack);
            *by.entry(function_name(leaf)).or_insert(0) += count;
        }
        let mut v: Vec<(String, u64)> = by.into_iter().map(|(f, c)| (f.to_owned(), c)).collect();
        v.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }

    /// Count of stacks with at least one frame (after the process) that `matches`. Each distinct
    /// frame is asked once: profiles repeat a few thousand names across millions of frames.
    pub fn count_matching(&self, matches: impl Fn(&str) -> bool) -> u64 {
        self.count_matching_each(&[&matches])[0]
    }

    /// [`Self::count_matching`] for several tests (at most 64) in one walk of the stacks: each
    /// distinct frame is looked up once for all of them.
    #[must_use]
    pub fn count_matching_each(&self, tests: &[&dyn Fn(&str) -> bool]) -> Vec<u64> {
        assert!(tests.len() <= 64, "at most 64 tests in one walk");
        let all = if tests.len() == 64 {
            u64::MAX
        } else {
            (1u64 << tests.len()) - 1
        };
        let mut known: foldhash::HashMap<&str, u64> = foldhash::HashMap::default();
        let mut counts = vec![0u64; tests.len()];
        for (stack, &count) in &self.stacks {
            let mut seen = 0u64;
            for frame in stack.split(';').skip(1) {
                seen |= *known.entry(frame).or_insert_with(|| {
                    let name = function_name(frame);
                    tests
                        .iter()
                        .enumerate()
                        .filter(|(_, t)| t(name))
                        .fold(0, |m, (i, _)| m | 1 << i)
                });
                if seen == all {
                    break;
                }
            }
            for (i, c) in counts.iter_mut().enumerate() {
                if seen & 1 << i != 0 {
                    *c += count;
                }
            }
        }
        counts
    }

    /// The heaviest stack whose leaf is `function`, as the evidence of where it is called from.
    #[must_use]
    pub fn heaviest_path_to(&self, function: &str) -> Option<(&str, u64)> {
        self.stacks
            .iter()
            .filter(|(s, _)| function_name(s.rsplit(';').next().unwrap_or(s)) == function)
            .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
            .map(|(s, &c)| (s.as_str(), c))
    }
}

/// How a flamegraph is titled and what its counts are.
pub struct Graph<'a> {
    pub title: &'a str,
    pub subtitle: &'a str,
    pub count_name: &'a str,
}

/// An inferno flamegraph of `folded`; a plain "nothing recorded" page when it is empty, because
/// inferno refuses input without counts and a fake frame would lie.
pub fn flamegraph(folded: &Folded, graph: &Graph<'_>) -> std::io::Result<Vec<u8>> {
    flamegraph_of_lines(&folded.lines(), graph)
}

/// The flamegraph of folded `lines` (`frames count`), with TOE's title, unit and legend; the
/// agent's per-run flamegraphs and the processed ones are drawn the same way.
pub fn flamegraph_of_lines(lines: &[String], graph: &Graph<'_>) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    if lines.is_empty() {
        out.extend_from_slice(empty_svg(graph.title, graph.subtitle).as_bytes());
        return Ok(out);
    }
    let mut opts = inferno::flamegraph::Options::default();
    graph.title.clone_into(&mut opts.title);
    opts.count_name = graph.count_name.into();
    opts.subtitle = Some(format!("{}; _[k] kernel, _[i] inlined", graph.subtitle));
    inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut out)?;
    Ok(out)
}

/// A plain page that says nothing was recorded, in place of a flamegraph of no samples.
#[must_use]
pub fn empty_svg(title: &str, subtitle: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"960\" height=\"120\" font-family=\"sans-serif\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/><text x=\"480\" y=\"40\" text-anchor=\"middle\" font-size=\"17\">{}</text><text x=\"480\" y=\"80\" text-anchor=\"middle\" font-size=\"13\">{}: nothing was recorded</text></svg>\n",
        crate::esc(title),
        crate::esc(subtitle)
    )
}

/// A differential flamegraph: frame widths are `after`, colours show the change from `before`
/// (red grew, blue shrank), counts normalised so runs of different lengths compare (inferno's
/// differential folding, the method of Brendan Gregg's difffolded.pl).
pub fn differential(
    before: &Folded,
    after: &Folded,
    graph: &Graph<'_>,
) -> std::io::Result<Vec<u8>> {
    if before.is_empty() || after.is_empty() {
        return flamegraph(after, graph);
    }
    let (b, a) = (before.encode(), after.encode());
    let mut diff = Vec::new();
    let opts = inferno::differential::Options {
        normalize: true,
        ..inferno::differential::Options::default()
    };
    inferno::differential::from_readers(opts, b.as_bytes(), a.as_bytes(), &mut diff)?;
    let text = String::from_utf8_lossy(&diff).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    differential_of_lines(&lines, graph)
}

/// The differential flamegraph of `stack before after` lines, `before` already normalised to the
/// scale of `after`.
pub fn differential_of_lines(lines: &[&str], graph: &Graph<'_>) -> std::io::Result<Vec<u8>> {
    let mut fg = inferno::flamegraph::Options::default();
    graph.title.clone_into(&mut fg.title);
    fg.count_name = graph.count_name.into();
    fg.subtitle = Some(format!(
        "{}; width: after, colour: change from before (red more, blue less)",
        graph.subtitle
    ));
    let mut out = Vec::new();
    inferno::flamegraph::from_lines(&mut fg, lines.iter().copied(), &mut out)?;
    Ok(out)
}

/// Name of a frame in folded output. `;` separates frames and cannot be escaped in the format,
/// so it becomes `,` (Rust array types like `[u8; 16]` contain it). Kernel frames get the
/// conventional `_[k]` suffix, inlined ones `_[i]`, which flamegraph palettes colour.
#[must_use]
pub fn frame_label(f: &Frame) -> String {
    let mut s = f.function.replace(';', ",");
    if f.kernel {
        s.push_str("_[k]");
    } else if f.inlined {
        s.push_str("_[i]");
    }
    s
}

/// Root frame for a process: samples are attributed per process.
#[must_use]
pub fn process_label(process: &str, pid: u32) -> String {
    format!("{} ({pid})", process.replace(';', ","))
}

/// Folded lines of sample type `index`, merged and sorted so the output is deterministic. Stacks
/// whose value is 0 are left out (flamegraph tools treat them as noise).
#[must_use]
pub fn lines(profile: &Profile, index: usize) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for s in &profile.stacks {
        let value = s.values.get(index).copied().unwrap_or(0);
        if value == 0 {
            continue;
        }
        let mut line = process_label(&s.process, s.pid);
        for &f in &s.frames {
            line.push(';');
            line.push_str(&frame_label(&profile.frames[f as usize]));
        }
        *out.entry(line).or_insert(0) += value;
    }
    out
}

#[must_use]
pub fn encode(profile: &Profile, index: usize) -> String {
    let mut out = String::new();
    for (line, count) in lines(profile, index) {
        let _ = writeln!(out, "{line} {count}");
    }
    out
}

/// A flamegraph of sample type `index`; `count_name` names its unit in tooltips ("samples",
/// "bytes").
pub fn profile_flamegraph(
    profile: &Profile,
    index: usize,
    title: &str,
    subtitle: &str,
    count_name: &str,
) -> std::io::Result<Vec<u8>> {
    let lines: Vec<String> = lines(profile, index)
        .into_iter()
        .map(|(l, c)| format!("{l} {c}"))
        .collect();
    flamegraph_of_lines(
        &lines,
        &Graph {
            title,
            subtitle,
            count_name,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::fixtures;

    #[test]
    fn folded_preserves_totals() {
        let p = fixtures::profile();
        let text = encode(&p, 0);
        assert!(text.contains("demo (42);main;hot 70\n"), "{text}");
        assert!(
            text.contains("demo (42);main;cold;ksys_write_[k] 10\n"),
            "{text}"
        );
        let total: u64 = text
            .lines()
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
            .sum();
        assert_eq!(total, p.total(0));
    }

    #[test]
    fn separators_in_names_are_neutralised() {
        let mut p = fixtures::profile();
        p.frames[1].function = "<[u8; 16] as Debug>::fmt".into();
        assert!(encode(&p, 0).contains("main;<[u8, 16] as Debug>::fmt 70"));
    }

    #[test]
    fn empty_profile_says_so() {
        let svg = profile_flamegraph(&Profile::default(), 0, "t", "0 bytes", "bytes").unwrap();
        assert!(
            String::from_utf8(svg)
                .unwrap()
                .contains("nothing was recorded")
        );
    }

    #[test]
    fn svg_names_frames_and_total() {
        let svg = String::from_utf8(
            profile_flamegraph(&fixtures::profile(), 0, "t", "100 samples", "samples").unwrap(),
        )
        .unwrap();
        assert!(svg.starts_with("<?xml"));
        assert!(svg.contains("hot (70 samples"), "hot frame missing");
        assert!(svg.contains("all (100 samples"), "total missing");
    }

    #[test]
    fn parse_drops_pids_and_merges_the_same_program() {
        let f =
            Folded::parse("app (12);main;hot 5\napp (13);main;hot 7\napp (13);main;cold_[k] 1\n")
                .unwrap();
        assert_eq!(f.stacks["app;main;hot"], 12);
        assert_eq!(f.total(), 13);
        assert_eq!(f.self_by_function()[0], ("hot".into(), 12));
        assert_eq!(f.self_by_function()[1], ("cold".into(), 1));
    }

    #[test]
    fn bad_lines_name_their_number() {
        let err = Folded::parse("a;b 1\na;b x\n").unwrap_err();
        assert_eq!(err.line, 2, "{err}");
    }

    #[test]
    fn merge_under_a_root_preserves_totals() {
        let a = Folded::parse("p (1);x 3\np (1);y 4\n").unwrap();
        let b = Folded::parse("p (2);x 10\n").unwrap();
        let mut m = Folded::default();
        m.merge(&a, Some("pod-a/app"));
        m.merge(&b, Some("pod-b/app"));
        assert_eq!(m.total(), a.total() + b.total());
        assert_eq!(m.stacks["pod-a/app;p;x"], 3);
        let mut flat = Folded::default();
        flat.merge(&a, None);
        flat.merge(&b, None);
        assert_eq!(flat.stacks["p;x"], 13);
    }

    #[test]
    fn differential_renders_and_empty_input_says_so() {
        let a = Folded::parse("p;x 3\np;y 4\n").unwrap();
        let b = Folded::parse("p;x 9\np;y 1\n").unwrap();
        let g = Graph {
            title: "t",
            subtitle: "s",
            count_name: "samples",
        };
        let svg = String::from_utf8(differential(&a, &b, &g).unwrap()).unwrap();
        assert!(
            svg.contains("<svg") && svg.contains(">x<") || svg.contains("x ("),
            "{svg:.300}"
        );
        let empty = String::from_utf8(flamegraph(&Folded::default(), &g).unwrap()).unwrap();
        assert!(empty.contains("nothing was recorded"));
    }
}
