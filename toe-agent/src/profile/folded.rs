//! Folded stacks (`root;child;leaf count`), the interchange format of flamegraph tools.

use std::{collections::BTreeMap, fmt::Write as _};

use super::{Frame, Profile};

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

#[cfg(test)]
mod tests {
    use super::{super::fixtures, *};

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
}
