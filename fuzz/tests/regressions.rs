//! Every input a fuzzer once crashed on (kept under `regressions/<target>/`) and every seed
//! input, replayed through its harness: a fixed crash stays fixed, and the harnesses' own
//! properties hold on the real examples and captures they start from.

use std::path::Path;

#[test]
fn every_kept_crash_input_passes_its_harness() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    let mut replayed = 0;
    for (name, harness) in toe_fuzz::TARGETS {
        let dir = root.join(name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let path = e.expect("listing regressions").path();
            let data = std::fs::read(&path).expect("reading a regression input");
            eprintln!("replaying {}", path.display());
            harness(&data);
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no regression input under {}", root.display());
}

#[test]
fn every_seed_input_passes_its_harness() {
    for (name, harness) in toe_fuzz::TARGETS {
        let seeds = toe_fuzz::seeds(name).expect("reading the seed sources");
        assert!(!seeds.is_empty(), "{name}: no seed inputs");
        for (seed, data) in seeds {
            eprintln!("{name}: seed {seed}");
            harness(&data);
        }
    }
}

#[test]
fn every_capture_seed_is_read_as_one_capture_with_its_profiles() {
    for (seed, data) in toe_fuzz::seeds("capture").expect("reading the fixtures") {
        let (captures, _) = toe_fuzz::read_captures(&data);
        assert_eq!(
            captures.len(),
            1,
            "{seed}: read {} captures",
            captures.len()
        );
        let files = toe_fuzz::parts(&data).len();
        assert!(files >= 2, "{seed}: {files} file(s)");
    }
}

#[test]
fn parts_split_at_every_separator_and_only_there() {
    let data = [
        b"a".as_slice(),
        toe_fuzz::PART,
        b"",
        toe_fuzz::PART,
        b"b\n--toe-part",
    ]
    .concat();
    assert_eq!(
        toe_fuzz::parts(&data),
        vec![b"a".as_slice(), b"".as_slice(), b"b\n--toe-part".as_slice()]
    );
}
