//! Folded stacks (`root;child;leaf count`) as the agent writes them, merged across targets and
//! runs, and turned into the flamegraphs of the processed outputs.

use std::{collections::HashMap, fmt::Write as _};

/// Stacks and their counts. The first frame is the process (`name (pid)` as the agent writes
/// it); [`Folded::parse`] drops the pid so the same program merges across pods and runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Folded {
    pub stacks: HashMap<String, u64>,
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
        let mut by: HashMap<&str, u64> = HashMap::new();
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
    pub fn count_matching(&self, mut matches: impl FnMut(&str) -> bool) -> u64 {
        let mut known: HashMap<&str, bool> = HashMap::new();
        self.stacks
            .iter()
            .filter(|(stack, _)| {
                stack.split(';').skip(1).any(|frame| {
                    *known
                        .entry(frame)
                        .or_insert_with(|| matches(function_name(frame)))
                })
            })
            .map(|(_, &c)| c)
            .sum()
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
    let mut fg = inferno::flamegraph::Options::default();
    graph.title.clone_into(&mut fg.title);
    fg.count_name = graph.count_name.into();
    fg.subtitle = Some(format!(
        "{}; width: after, colour: change from before (red more, blue less)",
        graph.subtitle
    ));
    let text = String::from_utf8_lossy(&diff).into_owned();
    let mut out = Vec::new();
    inferno::flamegraph::from_lines(&mut fg, text.lines(), &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
