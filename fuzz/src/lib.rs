//! The fuzz harnesses: one function per untrusted input TOE reads, each taking raw bytes and
//! panicking only on a defect (a crash, or a property that must hold for every input).
//!
//! libFuzzer drives them through `fuzz_targets/` (`cargo xtask bench fuzz`); the regression
//! tests (`tests/regressions.rs`) replay every input kept under `regressions/<target>/` on the
//! stable toolchain, so a crash once found stays fixed.
//!
//! Inputs with several parts (a capture's files, the profiles of a merge, a spec and its config)
//! are framed by [`PART`]: a plain-text separator, so seed inputs can be written from real files
//! and a fuzzer can still split and join them by mutation.

use std::{collections::BTreeMap, time::SystemTime};

use bytes::Bytes;
use object_store::{ObjectStoreExt as _, PutPayload, memory::InMemory, path::Path as StorePath};
use toe_agent::{
    plan::{FieldValidation, RunRequest},
    targets::TargetSpec,
};
use toe_common::api;
use toe_report::{
    capture::{self, CUT_FRAME, Capture, MAX_DEPTH},
    html, merge, pprof, rules,
};

/// Separates the parts of one input.
pub const PART: &[u8] = b"\n--toe-part--\n";

/// A tag no report may ever contain: inputs that carry it must come out escaped.
pub const TAG: &str = "<x-toe";

/// A harness: raw input in, a panic only on a defect.
pub type Harness = fn(&[u8]);

/// The harnesses by name, as `fuzz_targets/` and `regressions/` name them.
pub const TARGETS: &[(&str, Harness)] = &[
    ("spec", spec),
    ("config", config),
    ("args", args),
    ("capture", capture),
    ("pprof_merge", pprof_merge),
];

/// `data` cut at every [`PART`].
#[must_use]
pub fn parts(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(at) = memchr::memmem::find(rest, PART) {
        out.push(&rest[..at]);
        rest = &rest[at + PART.len()..];
    }
    out.push(rest);
    out
}

fn request(spec_yaml: String, config: Option<String>) -> RunRequest {
    RunRequest {
        source_name: "spec.yaml".into(),
        spec_yaml,
        config: config.map(|c| ("config.yaml".into(), c)),
        target: TargetSpec::Pid(1),
        output: None,
        cwd: "/work".into(),
        now: SystemTime::UNIX_EPOCH,
        nonce: 0,
        validation: FieldValidation::Strict,
    }
}

/// What holds of every plan, whatever spec it came from.
fn check_plan(req: &RunRequest) {
    match toe_agent::plan::plan(req) {
        Ok(p) => {
            for t in std::iter::once(&p.tool).chain(&p.alongside) {
                let def = api::find_tool(&t.name).expect("a planned tool is in the catalogue");
                assert!(
                    t.duration <= def.max_duration,
                    "{}: duration {:?} over the tool's maximum {:?}",
                    t.name,
                    t.duration,
                    def.max_duration
                );
                assert!(
                    t.options.check().is_ok(),
                    "{}: planned options fail check",
                    t.name
                );
            }
            assert!(
                p.output.as_str().ends_with('/'),
                "output {} is not a directory",
                p.output
            );
        }
        Err(e) => assert!(!e.to_string().is_empty(), "an error without a message"),
    }
}

/// A PowerTool spec, optionally followed by a PowerToolConfig file: parsed, validated, planned.
pub fn spec(data: &[u8]) {
    let parts = parts(data);
    let text = |i: usize| {
        parts
            .get(i)
            .map(|p| String::from_utf8_lossy(p).into_owned())
    };
    check_plan(&request(text(0).unwrap_or_default(), text(1)));
}

/// Specs of every example, planned under a PowerToolConfig file.
const SPECS: &[&str] = &[
    include_str!("../../examples/cpu-profile.yaml"),
    include_str!("../../examples/memory-profile.yaml"),
    include_str!("../../examples/offcpu-profile.yaml"),
    include_str!("../../examples/signal-trace.yaml"),
    include_str!("../../examples/fault-cpu-stress.yaml"),
    include_str!("../../examples/fault-memory-stress.yaml"),
    include_str!("../../examples/fault-terminate.yaml"),
    include_str!("../../examples/fault-volume-fill.yaml"),
];

/// A PowerToolConfig file: parsed and checked, then an example spec (picked by the input's
/// length, so every example is reached without planning all of them per run) planned under it.
pub fn config(data: &[u8]) {
    let yaml = String::from_utf8_lossy(data).into_owned();
    if toe_agent::plan::parse_configs("config.yaml", &yaml).is_err() {
        return;
    }
    let spec = SPECS[data.len() % SPECS.len()];
    check_plan(&request(spec.to_owned(), Some(yaml)));
}

/// A tool (the first byte picks it from the catalogue) and its arguments, one per line, in a
/// spec that is otherwise valid.
pub fn args(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let tools = api::catalogue();
    let tool = &tools[usize::from(pick) % tools.len()];
    let text = String::from_utf8_lossy(rest);
    let args: Vec<&str> = text.lines().collect();
    let yaml = format!(
        "apiVersion: toe.run/v1alpha1\nkind: PowerTool\nmetadata:\n  name: fuzz\nspec:\n  tool:\n    name: {}\n    args: {}\n",
        tool.name,
        serde_json::to_string(&args).expect("strings encode")
    );
    check_plan(&request(yaml, None));
    for a in &args {
        let value = a.split_once('=').map_or(*a, |(_, v)| v);
        // The scalar parsers the PowerToolConfig bounds use too.
        let _ = api::parse_size(value);
        let _ = api::parse_cpu(value);
        let _ = api::parse_duration(value);
    }
}

/// A capture directory as a node might have written it: each part is `<file name>\n<bytes>`.
/// Read as a processing pass reads it, merged, evaluated by the rules and rendered as HTML.
pub fn capture(data: &[u8]) {
    let (mut captures, tagged) = read_captures(data);
    process(&mut captures, tagged);
}

/// The captures the reader accepts from `data` (framed as for [`capture`]), and whether any of
/// their files carries [`TAG`].
#[must_use]
pub fn read_captures(data: &[u8]) -> (Vec<Capture>, bool) {
    let store = InMemory::new();
    let base = StorePath::from("fuzz");
    let mut tagged = false;
    for part in parts(data) {
        let Some(nl) = part.iter().position(|&b| b == b'\n') else {
            continue;
        };
        let Ok(name) = std::str::from_utf8(&part[..nl]) else {
            continue;
        };
        let Ok(path) = StorePath::parse(format!("fuzz/{name}")) else {
            continue;
        };
        let body = &part[nl + 1..];
        tagged |= memchr::memmem::find(body, TAG.as_bytes()).is_some();
        futures::executor::block_on(
            store.put(&path, PutPayload::from(Bytes::copy_from_slice(body))),
        )
        .expect("an in-memory put");
    }
    let listed = futures::executor::block_on(capture::list(&store, &base)).expect("listing memory");
    let mut captures = Vec::new();
    for (dir, files) in listed {
        if let Ok(c) =
            futures::executor::block_on(capture::load_one(&store, &base, &dir, &files, "fuzz"))
        {
            captures.push(c);
        }
    }
    (captures, tagged)
}

fn process(captures: &mut [Capture], tagged: bool) {
    let mut evaluator = rules::Evaluator::default();
    let mut merged = BTreeMap::new();
    for c in captures.iter_mut() {
        check_depth(c);
        c.keep_digests();
        evaluator.add(c);
        for (kind, f) in &c.profiles {
            merged
                .entry(*kind)
                .or_insert_with(toe_artifacts::folded::Folded::default)
                .merge(f, None);
        }
        check_merge(c);
        c.lighten();
    }
    let findings = evaluator.finish();
    let merged: Vec<_> = merged.into_iter().collect();
    let page = html::render(&html::Report {
        title: "fuzz",
        meta: "fuzz",
        captures,
        merged: &merged,
        findings: &findings,
        notes: &[],
        files: &[],
    });
    if tagged && let Some(at) = page.find(TAG) {
        let from = page.floor_char_boundary(at.saturating_sub(300));
        let to = page.ceil_char_boundary((at + 100).min(page.len()));
        panic!(
            "a capture's text reached the report unescaped: …{}…",
            &page[from..to]
        );
    }
}

fn check_depth(c: &Capture) {
    for f in c.profiles.values() {
        for stack in f.stacks.keys() {
            let depth = stack.split(';').count();
            assert!(
                depth <= MAX_DEPTH || (depth == MAX_DEPTH + 1 && stack.ends_with(CUT_FRAME)),
                "a stack of {depth} frames passed the reader"
            );
        }
    }
}

/// The sorter's memory budget in the harness: a few hundred stacks.
const SPILL_BUDGET: usize = 32 << 10;

/// The external merge gives the same stacks and totals as summing in memory, spilled or not.
fn check_merge(c: &Capture) {
    // tmpfs where there is one: spilling creates files, and a disk's inode churn would be most
    // of the time of a run.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    };
    for f in c.profiles.values() {
        // Large profiles spill (and so take the k-way merge); small ones stay in memory.
        let mut sorter = merge::Sorter::new(SPILL_BUDGET, &dir);
        for (stack, &count) in &f.stacks {
            sorter
                .add(stack, 0, count)
                .expect("spilling to the temporary directory");
        }
        let mut m = sorter.finish().expect("merging spilled runs");
        let mut total = 0u128;
        let mut seen = 0usize;
        while let Some((stack, counts)) = m.next_stack().expect("reading spilled runs") {
            let sum: u64 = counts.iter().map(|c| c.1).sum();
            assert_eq!(
                f.stacks.get(&stack),
                Some(&sum),
                "stack {stack:?} merged wrong"
            );
            total += u128::from(sum);
            seen += 1;
        }
        assert_eq!(seen, f.stacks.len(), "the merge lost or invented stacks");
        assert_eq!(
            total,
            f.stacks.values().map(|&v| u128::from(v)).sum::<u128>()
        );
    }
}

/// pprof files (gzipped or not) merged as a processing pass merges them; the merged profile
/// is readable and its totals are the sums of the inputs it did not leave out.
pub fn pprof_merge(data: &[u8]) {
    let parts = parts(data);
    let names: Vec<String> = (0..parts.len()).map(|i| format!("input-{i}")).collect();
    let inputs: Vec<pprof::Input<'_>> = parts
        .iter()
        .zip(&names)
        .map(|(data, name)| pprof::Input {
            data,
            target: name,
            run: "fuzz",
        })
        .collect();
    let merged = pprof::merge(&inputs);
    let mut expected: Vec<i128> = vec![0; merged.profile.sample_type.len()];
    for (input, name) in inputs.iter().zip(&names) {
        let prefix = format!("{name} (");
        if merged.skipped.iter().any(|s| s.starts_with(&prefix)) {
            continue;
        }
        let p = toe_artifacts::pprof::decode(input.data).expect("a merged input decodes");
        for s in &p.sample {
            for (acc, v) in expected.iter_mut().zip(&s.value) {
                *acc += i128::from(*v);
            }
        }
    }
    let mut got: Vec<i128> = vec![0; merged.profile.sample_type.len()];
    for s in &merged.profile.sample {
        for (acc, v) in got.iter_mut().zip(&s.value) {
            *acc += i128::from(*v);
        }
    }
    assert_eq!(got, expected, "merged totals differ from the inputs' sums");
}

/// Stacks, events and samples kept of each recorded file in a seed: enough for every structure
/// to appear, few enough that a run takes well under a millisecond (small inputs are what makes
/// tens of millions of runs affordable).
const SEED_RECORDS: usize = 24;

/// A recorded capture file cut to its first [`SEED_RECORDS`] records (pprof files re-encoded as
/// plain protobuf with their first samples).
fn shorten(file: &str, body: Vec<u8>) -> Vec<u8> {
    let lines = |body: &[u8]| -> Vec<u8> {
        body.split_inclusive(|&b| b == b'\n')
            .take(SEED_RECORDS)
            .flatten()
            .copied()
            .collect()
    };
    let ext = std::path::Path::new(file)
        .extension()
        .and_then(|e| e.to_str());
    if matches!(ext, Some("folded" | "jsonl" | "csv")) {
        lines(&body)
    } else if file.ends_with(".pb.gz") {
        match toe_artifacts::pprof::decode(&body) {
            Ok(mut p) => {
                p.sample.truncate(SEED_RECORDS);
                prost::Message::encode_to_vec(&p)
            }
            Err(_) => body,
        }
    } else {
        body
    }
}

/// The entries of `dir`, in name order (seeds must not depend on the file system's order).
fn sorted_entries(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut v: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    v.sort();
    Ok(v)
}

/// `data` with every `from` replaced by `to`.
fn replace(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut rest = data;
    while let Some(at) = memchr::memmem::find(rest, from) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(to);
        rest = &rest[at + from.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// Starting inputs for `target`, built from the project's own examples and recorded captures:
/// the fuzzer mutates real specs and real artifacts instead of searching from nothing.
pub fn seeds(target: &str) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let join = |chunks: Vec<Vec<u8>>| chunks.join(PART);
    let mut out = Vec::new();
    match target {
        "spec" => {
            let config = std::fs::read(root.join("examples/config.yaml"))?;
            for (i, s) in SPECS.iter().enumerate() {
                out.push((format!("example-{i}"), s.as_bytes().to_vec()));
                out.push((
                    format!("example-{i}-configured"),
                    join(vec![s.as_bytes().to_vec(), config.clone()]),
                ));
            }
        }
        "config" => out.push((
            "example".into(),
            std::fs::read(root.join("examples/config.yaml"))?,
        )),
        "args" => {
            for (i, t) in api::catalogue().iter().enumerate() {
                let mut seed = vec![u8::try_from(i).unwrap_or(0)];
                for a in t.args {
                    if let Some(d) = a.default {
                        seed.extend_from_slice(format!("--{}={d}\n", a.name).as_bytes());
                    }
                }
                out.push((t.name.to_owned(), seed));
            }
        }
        "capture" | "pprof_merge" => {
            let fixtures = root.join("toe-report/fixtures");
            let dirs: Vec<_> = sorted_entries(&fixtures)?
                .into_iter()
                .filter(|p| p.is_dir())
                .collect();
            let mut profiles = Vec::new();
            for dir in dirs {
                let name = dir
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                let mut chunks = Vec::new();
                for f in sorted_entries(&dir)? {
                    let file = f
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned();
                    let body = shorten(&file, std::fs::read(&f)?);
                    if file.ends_with(".pb.gz") {
                        // Plain protobuf: mutations then reach the merge, not the inflater
                        // (the first seed stays gzipped so that path is fuzzed too).
                        profiles.push(if profiles.is_empty() {
                            toe_artifacts::pprof::encode_gzip(
                                &toe_artifacts::pprof::decode(&body)
                                    .map_err(std::io::Error::other)?,
                            )
                        } else {
                            body.clone()
                        });
                    }
                    let mut chunk = format!("{name}/{file}\n").into_bytes();
                    chunk.extend_from_slice(&body);
                    chunks.push(chunk);
                }
                // The same capture with a tag in its process names, so the escaping check
                // runs from the first input instead of waiting for a mutation to spell it.
                let tagged: Vec<Vec<u8>> = chunks
                    .iter()
                    .map(|c| replace(c, b"toe-demo", format!("{TAG}-demo>").as_bytes()))
                    .collect();
                out.push((format!("{name}-tagged"), join(tagged)));
                out.push((name, join(chunks)));
            }
            if target == "pprof_merge" {
                out = profiles
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let next = &profiles[(i + 1) % profiles.len()];
                        (format!("profiles-{i}"), join(vec![p.clone(), next.clone()]))
                    })
                    .collect();
            }
        }
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no fuzz target {other}"),
            ));
        }
    }
    Ok(out)
}
