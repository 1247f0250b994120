//! One processing pass over a set of captures: merged and differential flamegraphs, merged pprof,
//! findings (rules, then the optional model), and the HTML report, as named files ready to store.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use toe_artifacts::folded::{self, Folded, Graph};

use crate::{
    capture::{Capture, ProfileKind},
    html, model, pprof,
    rules::{self, Finding},
};

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
}

/// Files produced (name relative to the output directory, content) and what was found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub files: Vec<(String, Bytes)>,
    pub findings: Vec<Finding>,
    /// What the reader must know: inputs skipped, the model step failed.
    pub notes: Vec<String>,
    /// Why the model step failed, when it was asked and did (also among the notes).
    pub model_error: Option<String>,
    pub runs: usize,
    pub captures: usize,
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

fn merge<'a>(captures: impl Iterator<Item = &'a Capture>, kind: ProfileKind) -> Folded {
    let mut m = Folded::default();
    for c in captures {
        if let Some(f) = c.profiles.get(&kind) {
            m.merge(f, None);
        }
    }
    m
}

/// Which captures holding a `kind` profile are the baseline and which the comparison of a
/// differential flamegraph: runs without a fault against runs with one when both are present
/// (baseline window vs fault window), else the earlier runs against the latest. The reason when
/// neither holds.
fn split_for_diff(
    captures: &[Capture],
    kind: ProfileKind,
) -> Result<(Vec<&Capture>, Vec<&Capture>, String), String> {
    let with: Vec<&Capture> = captures
        .iter()
        .filter(|c| c.profiles.get(&kind).is_some_and(|f| !f.is_empty()))
        .collect();
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

/// Runs one processing pass.
pub async fn process(captures: &[Capture], opts: &Options) -> Outcome {
    let runs = runs_in_order(captures);
    let mut out = Outcome {
        captures: captures.len(),
        runs: runs.len(),
        ..Outcome::default()
    };
    let kinds: Vec<ProfileKind> = ProfileKind::ALL
        .into_iter()
        .filter(|k| captures.iter().any(|c| c.profiles.contains_key(k)))
        .collect();
    let merged: Vec<(ProfileKind, Folded)> = kinds
        .iter()
        .map(|&k| (k, merge(captures.iter(), k)))
        .collect();
    if opts.merged_flamegraph {
        merged_flamegraphs(captures, &runs, &merged, &mut out);
    }
    if opts.differential_flamegraph {
        differential_flamegraphs(captures, &kinds, &mut out);
    }
    if opts.merged_pprof {
        merged_pprof(captures, &mut out);
    }
    out.findings = rules::evaluate(captures);
    if let Some(endpoint) = &opts.model {
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
    out.files.push((
        "findings.json".into(),
        Bytes::from(serde_json::to_vec_pretty(&out.findings).expect("findings serialize")),
    ));
    if opts.html_report {
        let files: Vec<(String, String)> = out
            .files
            .iter()
            .map(|(name, _)| (name.clone(), name.clone()))
            .collect();
        let page = html::render(&html::Report {
            title: &opts.title,
            meta: &format!(
                "{}; {} run(s), {} capture(s)",
                opts.meta, out.runs, out.captures
            ),
            captures,
            merged: &merged,
            findings: &out.findings,
            notes: &out.notes,
            files: &files,
        });
        out.files.push(("report.html".into(), Bytes::from(page)));
    }
    out
}

fn svg(folded: &Folded, title: &str, subtitle: &str, unit: &str) -> Result<Bytes, String> {
    folded::flamegraph(
        folded,
        &Graph {
            title,
            subtitle,
            count_name: unit,
        },
    )
    .map(Bytes::from)
    .map_err(|e| format!("rendering {title}: {e}"))
}

fn merged_flamegraphs(
    captures: &[Capture],
    runs: &[String],
    merged: &[(ProfileKind, Folded)],
    out: &mut Outcome,
) {
    for (kind, f) in merged {
        let subtitle = format!(
            "{} {} over {} capture(s) of {} run(s)",
            f.total(),
            kind.unit(),
            out.captures,
            out.runs
        );
        match svg(f, kind.title(), &subtitle, kind.unit()) {
            Ok(b) => out.files.push((format!("{}.svg", kind.name()), b)),
            Err(e) => out.notes.push(e),
        }
        out.files
            .push((format!("{}.folded", kind.name()), Bytes::from(f.encode())));
        if runs.len() < 2 {
            continue;
        }
        for run in runs {
            let per = merge(captures.iter().filter(|c| &c.run == run), *kind);
            if per.is_empty() {
                continue;
            }
            let sub = format!("{} {} in run {run}", per.total(), kind.unit());
            match svg(&per, kind.title(), &sub, kind.unit()) {
                Ok(b) => out
                    .files
                    .push((format!("runs/{}/{}.svg", file_name(run), kind.name()), b)),
                Err(e) => out.notes.push(e),
            }
        }
    }
}

fn differential_flamegraphs(captures: &[Capture], kinds: &[ProfileKind], out: &mut Outcome) {
    for &kind in kinds {
        let (before, after, how) = match split_for_diff(captures, kind) {
            Ok(split) => split,
            Err(why) => {
                out.notes.push(why);
                continue;
            }
        };
        let (b, a) = (
            merge(before.into_iter(), kind),
            merge(after.into_iter(), kind),
        );
        let subtitle = format!("{how}: {} -> {} {}", b.total(), a.total(), kind.unit());
        let graph = Graph {
            title: kind.title(),
            subtitle: &subtitle,
            count_name: kind.unit(),
        };
        match folded::differential(&b, &a, &graph) {
            Ok(svg) => out
                .files
                .push((format!("{}.diff.svg", kind.name()), Bytes::from(svg))),
            Err(e) => out.notes.push(format!("differential {}: {e}", kind.name())),
        }
    }
}

fn merged_pprof(captures: &[Capture], out: &mut Outcome) {
    let names: BTreeSet<&String> = captures.iter().flat_map(|c| c.pprof.keys()).collect();
    for name in names {
        let inputs: Vec<pprof::Input<'_>> = captures
            .iter()
            .filter_map(|c| {
                c.pprof.get(name).map(|data| pprof::Input {
                    data,
                    target: &c.target,
                    run: &c.run,
                })
            })
            .collect();
        let merged = pprof::merge(&inputs);
        out.notes.extend(
            merged
                .skipped
                .iter()
                .map(|s| format!("{name}: left out {s}")),
        );
        out.files.push((
            name.clone(),
            Bytes::from(pprof::encode_gzip(&merged.profile)),
        ));
    }
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
            model: None,
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
        let out = process(&caps, &all()).await;
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
        let folded = &out.files.iter().find(|(n, _)| n == "cpu.folded").unwrap().1;
        let merged = Folded::parse(std::str::from_utf8(folded).unwrap()).unwrap();
        let sum: u64 = caps
            .iter()
            .map(|c| c.profiles[&ProfileKind::Cpu].total())
            .sum();
        assert_eq!(merged.total(), sum);
        let pb = &out.files.iter().find(|(n, _)| n == "cpu.pb.gz").unwrap().1;
        let p = pprof::decode(pb).unwrap();
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
}
