//! pprof: a gzipped `profile.proto` that `go tool pprof` reads. Encoding a [`Profile`] (CPU
//! profiles, heap profiles with Go's four sample types, page-fault profiles, with per-sample
//! labels for the process and thread), decoding, and the string table both sides intern into.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
};

use flate2::{Compression, read::GzDecoder, write::GzEncoder};
use prost::Message as _;

use crate::{
    profile::Profile,
    proto::{self, Function, Label, Line, Location, Mapping, Sample, ValueType},
};

/// pprof's string table: every string once, `""` at index 0 as the format requires.
#[derive(Debug)]
pub struct Strings {
    table: Vec<String>,
    index: foldhash::HashMap<String, i64>,
}

impl Default for Strings {
    fn default() -> Self {
        let mut s = Self {
            table: Vec::new(),
            index: foldhash::HashMap::default(),
        };
        s.get("");
        s
    }
}

impl Strings {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The index of `s`, added if new.
    pub fn get(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = i64::try_from(self.table.len()).unwrap_or(i64::MAX);
        self.table.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }

    /// The finished table, for `Profile::string_table`.
    #[must_use]
    pub fn into_table(self) -> Vec<String> {
        self.table
    }
}

/// The most bytes a gzipped profile may inflate to. Profiles are read from stores any node may
/// write to, and a few hundred kilobytes of gzip can inflate to gigabytes.
pub const MAX_INFLATED: u64 = 256 << 20;

/// A pprof profile from gzipped or plain bytes.
pub fn decode(data: &[u8]) -> Result<proto::Profile, String> {
    let mut raw = Vec::new();
    let bytes = if data.starts_with(&[0x1f, 0x8b]) {
        GzDecoder::new(data)
            .take(MAX_INFLATED + 1)
            .read_to_end(&mut raw)
            .map_err(|e| format!("gunzip: {e}"))?;
        if raw.len() as u64 > MAX_INFLATED {
            return Err(format!(
                "it inflates to more than {MAX_INFLATED} bytes (from {} gzipped)",
                data.len()
            ));
        }
        &raw[..]
    } else {
        data
    };
    proto::Profile::decode(bytes).map_err(|e| format!("not a pprof profile: {e}"))
}

/// `p` gzipped, as pprof files are stored.
#[must_use]
pub fn encode_gzip(p: &proto::Profile) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&p.encode_to_vec())
        .expect("writing to a Vec cannot fail");
    gz.finish().expect("writing to a Vec cannot fail")
}

/// Sum of each sample type over all samples.
#[must_use]
pub fn totals(p: &proto::Profile) -> Vec<i64> {
    let mut t = vec![0i64; p.sample_type.len()];
    for s in &p.sample {
        for (acc, v) in t.iter_mut().zip(&s.value) {
            *acc += v;
        }
    }
    t
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Deduplicated mappings (one per module) and functions (one per name + file).
#[derive(Default)]
struct Tables {
    strings: Strings,
    mappings: Vec<Mapping>,
    mapping_ids: HashMap<String, u64>,
    functions: Vec<Function>,
    function_ids: HashMap<(String, String), u64>,
}

impl Tables {
    fn mapping(&mut self, module: &str) -> u64 {
        if let Some(&id) = self.mapping_ids.get(module) {
            return id;
        }
        let id = self.mappings.len() as u64 + 1;
        let filename = self.strings.get(module);
        self.mappings.push(Mapping {
            id,
            filename,
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
            ..Mapping::default()
        });
        self.mapping_ids.insert(module.to_owned(), id);
        id
    }

    fn function(&mut self, name: &str, file: &str) -> u64 {
        let key = (name.to_owned(), file.to_owned());
        if let Some(&id) = self.function_ids.get(&key) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        let name = self.strings.get(name);
        let filename = self.strings.get(file);
        self.functions.push(Function {
            id,
            name,
            system_name: name,
            filename,
            start_line: 0,
        });
        self.function_ids.insert(key, id);
        id
    }
}

/// Builds the uncompressed message: one location per distinct frame, samples leaf first,
/// labelled with pid, process and thread, and an off-CPU wait also with its reason (`pprof
/// -tagfocus reason=runnable`).
#[must_use]
pub fn build(profile: &Profile) -> proto::Profile {
    let mut t = Tables {
        strings: Strings::new(),
        ..Tables::default()
    };
    let locations = profile
        .frames
        .iter()
        .enumerate()
        .map(|(i, f)| Location {
            id: i as u64 + 1,
            mapping_id: t.mapping(f.module.as_deref().unwrap_or("[unknown]")),
            address: 0,
            line: vec![Line {
                function_id: t.function(&f.function, f.file.as_deref().unwrap_or_default()),
                line: i64::from(f.line.unwrap_or(0)),
                column: 0,
            }],
            is_folded: false,
        })
        .collect();
    let strings = &mut t.strings;
    let (pid_key, process_key, thread_key, reason_key) = (
        strings.get("pid"),
        strings.get("process"),
        strings.get("thread"),
        strings.get("reason"),
    );
    let sample = profile
        .stacks
        .iter()
        .map(|s| Sample {
            location_id: s.frames.iter().rev().map(|&f| u64::from(f) + 1).collect(),
            value: s.values.iter().map(|&v| as_i64(v)).collect(),
            label: vec![
                Label {
                    key: pid_key,
                    num: i64::from(s.pid),
                    ..Label::default()
                },
                Label {
                    key: process_key,
                    str: strings.get(&s.process),
                    ..Label::default()
                },
                Label {
                    key: thread_key,
                    str: strings.get(&s.thread),
                    ..Label::default()
                },
            ]
            .into_iter()
            .chain(reason(profile, s).map(|r| Label {
                key: reason_key,
                str: strings.get(r),
                ..Label::default()
            }))
            .collect(),
        })
        .collect();
    let mut value_type = |v: &crate::profile::ValueType| ValueType {
        r#type: strings.get(&v.kind),
        unit: strings.get(&v.unit),
    };
    let sample_type: Vec<ValueType> = profile.sample_types.iter().map(&mut value_type).collect();
    let (period_type, period) = match &profile.period {
        Some((v, p)) => (Some(value_type(v)), as_i64(*p)),
        None => (None, 0),
    };
    let default_sample_type = profile
        .sample_types
        .get(profile.default_type)
        .map_or(0, |v| strings.get(&v.kind));
    let comment = vec![strings.get(&profile.comment)];
    proto::Profile {
        sample_type,
        sample,
        mapping: t.mappings,
        location: locations,
        function: t.functions,
        string_table: t.strings.into_table(),
        time_nanos: as_i64(profile.start_unix_ns),
        duration_nanos: as_i64(profile.duration_ns),
        period_type,
        period,
        comment,
        default_sample_type,
        ..proto::Profile::default()
    }
}

/// The reason an off-CPU stack carries in its reason frame.
fn reason<'a>(profile: &'a Profile, s: &crate::profile::Stack) -> Option<&'a str> {
    s.frames.iter().find_map(|&id| {
        profile
            .frames
            .get(id as usize)
            .and_then(|f| crate::summary::offcpu::frame_reason(&f.function))
    })
}

/// Gzipped bytes, the form `go tool pprof` and every pprof consumer expect.
#[must_use]
pub fn encode(profile: &Profile) -> Vec<u8> {
    encode_gzip(&build(profile))
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::profile::fixtures;

    #[test]
    fn round_trips_and_keeps_totals() {
        let p = fixtures::profile();
        let mut raw = Vec::new();
        GzDecoder::new(&encode(&p)[..])
            .read_to_end(&mut raw)
            .unwrap();
        let decoded = proto::Profile::decode(&raw[..]).unwrap();
        assert_eq!(decoded.string_table[0], "");
        let total: i64 = decoded.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(total, 100);
        let cpu: i64 = decoded.sample.iter().map(|s| s.value[1]).sum();
        assert_eq!(cpu, 100 * decoded.period);
        // Leaf first: the 70-sample stack ends in `hot`.
        let hot = decoded.sample.iter().find(|s| s.value[0] == 70).unwrap();
        let leaf = &decoded.location[usize::try_from(hot.location_id[0] - 1).unwrap()];
        let func = &decoded.function[usize::try_from(leaf.line[0].function_id - 1).unwrap()];
        assert_eq!(
            decoded.string_table[usize::try_from(func.name).unwrap()],
            "hot"
        );
        // No reason frame, no reason label.
        let reason_key = decoded
            .string_table
            .iter()
            .position(|s| s == "reason")
            .and_then(|k| i64::try_from(k).ok());
        assert!(
            decoded
                .sample
                .iter()
                .all(|s| s.label.iter().all(|l| Some(l.key) != reason_key))
        );
    }

    #[test]
    fn an_off_cpu_wait_is_labelled_with_its_reason() {
        let mut p = fixtures::profile();
        p.frames.push(crate::profile::Frame::named(
            crate::summary::offcpu::reason_frame("runnable"),
            false,
        ));
        let id = u32::try_from(p.frames.len() - 1).unwrap();
        p.stacks[0].frames.insert(0, id);
        let decoded = build(&p);
        let label = |s: &Sample| {
            s.label
                .iter()
                .find(|l| decoded.string_table[usize::try_from(l.key).unwrap()] == "reason")
                .map(|l| decoded.string_table[usize::try_from(l.str).unwrap()].clone())
        };
        assert_eq!(label(&decoded.sample[0]).as_deref(), Some("runnable"));
        assert!(decoded.sample[1..].iter().all(|s| label(s).is_none()));
    }
}
