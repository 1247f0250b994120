//! `cargo xtask bench processing`'s worker, one mode per process so each is measured alone:
//! - `generate DIR PROFILES STACKS`: synthetic captures in the agents' layout, each with STACKS
//!   distinct CPU stacks (half shared with every other profile, half its own) as folded stacks,
//!   pprof and a summary;
//! - `toe SOURCE OUT`: TOE's whole processing pass (merged flamegraph, differential, merged pprof,
//!   rules, HTML report) over the captures below SOURCE into OUT, each a directory or a store URL
//!   (`s3://...`, with the store's credentials in the environment);
//! - `upload DIR URL`: every file below DIR written to the store at URL (an `s3://` bucket) by
//!   its API, as agents write their captures;
//! - `inferno DIR OUT`: the hand-made baseline, every stacks.folded concatenated into one inferno
//!   flamegraph (`cat */stacks.folded | inferno-flamegraph`).

use std::{fmt::Write as _, io::Write as _, path::Path, time::SystemTime};

use toe_artifacts::proto::{Function, Line, Location, Profile, Sample, ValueType};

/// A frame name from a vocabulary shaped like real code: module paths of varying length.
fn frame(i: u64) -> String {
    const MODULES: [&str; 8] = [
        "app::http",
        "app::db",
        "tokio::runtime",
        "serde_json::de",
        "std::io",
        "hyper::proto",
        "app::cache",
        "alloc::vec",
    ];
    format!("{}::fn_{i}", MODULES[usize::try_from(i % 8).unwrap()])
}

/// The `n`th stack of a profile: a deterministic walk, so shared stacks match across profiles.
fn stack(seed: u64, n: u64) -> Vec<String> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ n.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let depth = 8 + (x % 24);
    let mut frames = vec!["main".to_owned()];
    for d in 0..depth {
        x ^= x >> 31;
        x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
        // Shallow frames come from a small set (a shared trunk), deep ones from a large one.
        let vocab = if d < 4 { 16 } else { 4000 };
        frames.push(frame(x % vocab));
    }
    frames
}

fn pprof(stacks: &[(Vec<String>, u64)]) -> Profile {
    let mut strings = vec![String::new(), "samples".into(), "count".into()];
    let mut functions: Vec<Function> = Vec::new();
    let mut index = std::collections::HashMap::new();
    let mut id_of = |name: &str, strings: &mut Vec<String>, functions: &mut Vec<Function>| {
        *index.entry(name.to_owned()).or_insert_with(|| {
            strings.push(name.to_owned());
            let id = functions.len() as u64 + 1;
            functions.push(Function {
                id,
                name: i64::try_from(strings.len() - 1).unwrap(),
                ..Function::default()
            });
            id
        })
    };
    let sample = stacks
        .iter()
        .map(|(frames, count)| Sample {
            location_id: frames
                .iter()
                .rev()
                .map(|f| id_of(f, &mut strings, &mut functions))
                .collect(),
            value: vec![i64::try_from(*count).unwrap()],
            label: Vec::new(),
        })
        .collect();
    let location = functions
        .iter()
        .map(|f| Location {
            id: f.id,
            line: vec![Line {
                function_id: f.id,
                ..Line::default()
            }],
            ..Location::default()
        })
        .collect();
    Profile {
        sample_type: vec![ValueType { r#type: 1, unit: 2 }],
        sample,
        location,
        function: functions,
        string_table: strings,
        ..Profile::default()
    }
}

fn generate(dir: &Path, profiles: u64, stacks: u64) {
    let now_ms = u64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    for p in 0..profiles {
        // Two runs, so the differential flamegraph has a before and an after.
        let run = if p < profiles / 2 {
            "g1-aaaaaaaa"
        } else {
            "g2-bbbbbbbb"
        };
        let capture = dir.join(format!("bench/cpu/{run}/pod-{p}/app"));
        std::fs::create_dir_all(&capture).unwrap();
        let all: Vec<(Vec<String>, u64)> = (0..stacks)
            .map(|n| {
                // Even stacks are shared by every profile, odd ones are this profile's own.
                let seed = if n % 2 == 0 { 0 } else { p + 1 };
                (stack(seed, n), 1 + (n * 7 + p) % 50)
            })
            .collect();
        let mut folded = String::new();
        for (frames, count) in &all {
            let _ = writeln!(folded, "app ({});{} {count}", 1000 + p, frames.join(";"));
        }
        std::fs::write(capture.join("stacks.folded"), folded).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&prost::Message::encode_to_vec(&pprof(&all)))
            .unwrap();
        std::fs::write(capture.join("cpu.pb.gz"), gz.finish().unwrap()).unwrap();
        let total: u64 = all.iter().map(|(_, c)| c).sum();
        let summary = serde_json::json!({
            "run": run, "tool": "cpu-profile", "target": format!("pod-{p}/app"),
            "complete": true, "ended": "duration reached",
            "started_unix_ms": now_ms - 60_000 + (if run == "g1-aaaaaaaa" { 0 } else { 30_000 }),
            "sampled_duration_s": 10.0,
            "cpu": {"frequency_hz": 99, "samples": {"taken": total, "recorded": total},
                    "frames": {"total": total * 20, "unresolved": 0}}
        });
        std::fs::write(capture.join("summary.json"), summary.to_string()).unwrap();
    }
}

/// A directory or a URL, as a directory URL.
fn dir_url(given: &str) -> url::Url {
    if given.contains("://") {
        url::Url::parse(given).unwrap()
    } else {
        url::Url::from_directory_path(given).unwrap()
    }
}

fn toe(source: &str, out: &str) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let job = toe_report::store::Job {
        sources: vec![toe_report::store::Source {
            url: dir_url(source),
            label: "cpu".into(),
        }],
        window: None,
        now: SystemTime::now(),
        output: dir_url(out),
        retention: None,
        options: toe_report::process::Options {
            merged_flamegraph: true,
            differential_flamegraph: true,
            merged_pprof: true,
            html_report: true,
            title: "bench".into(),
            ..toe_report::process::Options::default()
        },
    };
    // As the operator runs a processing: on a blocking thread of a multi-threaded runtime, whose
    // workers drive the store's connections.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = rt.handle().clone();
    let mut done = rt
        .block_on(rt.spawn_blocking(move || handle.block_on(toe_report::store::run(&job))))
        .unwrap()
        .unwrap();
    let html = done.outcome.file("report.html").map_or(0, |b| b.len());
    println!(
        "{} {} {html}",
        done.outcome.captures,
        done.outcome.files.len()
    );
}

fn baseline(dir: &Path, out: &Path) {
    let mut lines = Vec::new();
    for entry in walk(dir) {
        if entry.ends_with("stacks.folded") {
            let text = std::fs::read_to_string(&entry).unwrap();
            // The same stacks TOE's merged flamegraph draws: the root frame without the pid
            // (`app (1042)` -> `app`), as TOE's merge does, so that the processes of one program
            // are one tower and both sides render the same ~half-million distinct stacks.
            lines.extend(text.lines().map(|l| match l.split_once(';') {
                Some((root, rest)) => {
                    let name = root.rsplit_once(" (").map_or(root, |(name, _)| name);
                    format!("{name};{rest}")
                }
                None => l.to_owned(),
            }));
        }
    }
    let mut opts = inferno::flamegraph::Options::default();
    let mut svg = Vec::new();
    inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut svg).unwrap();
    std::fs::create_dir_all(out).unwrap();
    std::fs::write(out.join("merged.svg"), &svg).unwrap();
    println!("{} 1 {}", lines.len(), svg.len());
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Writes every file below `dir` to `url` through the store's API. A store that serves files
/// it did not write itself has none of its metadata: s3s-fs then hashes a whole object on every
/// read to make its ETag, which no store does for objects uploaded to it, as agents' captures are.
fn upload(dir: &Path, url: &str) {
    use futures::StreamExt as _;
    use object_store::ObjectStoreExt as _;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (store, base) = toe_artifacts::store::open(&dir_url(url)).unwrap();
    let files = walk(dir);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (store, base) = (&store, &base);
    rt.block_on(
        futures::stream::iter(files)
            .map(|p| async move {
                let rel = p.strip_prefix(dir).unwrap().to_str().unwrap().to_owned();
                let path: object_store::path::Path = base
                    .parts()
                    .chain(rel.split('/').map(object_store::path::PathPart::from))
                    .collect();
                let data = std::fs::read(&p).unwrap();
                store.put(&path, data.into()).await.unwrap();
            })
            .buffer_unordered(8)
            .collect::<Vec<()>>(),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    match arg(1) {
        "generate" => generate(
            Path::new(arg(2)),
            arg(3).parse().unwrap(),
            arg(4).parse().unwrap(),
        ),
        "toe" => toe(arg(2), arg(3)),
        "upload" => upload(Path::new(arg(2)), arg(3)),
        "inferno" => baseline(Path::new(arg(2)), Path::new(arg(3))),
        other => {
            eprintln!("bench-processing: unknown mode {other:?}; use generate|upload|toe|inferno");
            std::process::exit(2);
        }
    }
}
