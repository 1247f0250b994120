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

/// Deduplicated mappings (one per module and build) and functions (one per name + file).
#[derive(Default)]
struct Tables {
    strings: Strings,
    mappings: Vec<Mapping>,
    /// (module, build-id) to the mapping's index.
    mapping_ids: HashMap<(String, Option<String>), usize>,
    functions: Vec<Function>,
    function_ids: HashMap<(String, String), u64>,
}

/// A module that names a file, not a pseudo-module (`[kernel]`, `[jit]`, `[unknown]`).
fn is_file(module: &str) -> bool {
    module.starts_with('/')
}

impl Tables {
    /// The mapping of `f`'s module. A file's mapping spans the whole address space from 0
    /// (pprof's convention for addresses already relative to the file), so a location's address
    /// is the ELF virtual address a symbolizer looks up; its build-id lets `go tool pprof` find
    /// the matching binary or debug file (`PPROF_BINARY_PATH`). A mapping any of whose frames
    /// went unresolved says it has no functions, which is what makes pprof symbolize it.
    fn mapping(&mut self, f: &crate::profile::Frame) -> u64 {
        let module = f.module.as_deref().unwrap_or("[unknown]");
        let key = (module.to_owned(), f.build_id.clone());
        let next = self.mappings.len();
        let index = *self.mapping_ids.entry(key).or_insert(next);
        if index == next {
            let filename = self.strings.get(module);
            let build_id = f.build_id.as_deref().map_or(0, |b| self.strings.get(b));
            self.mappings.push(Mapping {
                id: next as u64 + 1,
                memory_start: 0,
                memory_limit: if is_file(module) { u64::MAX } else { 0 },
                file_offset: 0,
                filename,
                build_id,
                has_functions: true,
                has_filenames: true,
                has_line_numbers: true,
                has_inline_frames: true,
            });
        }
        let m = &mut self.mappings[index];
        if !f.resolved {
            m.has_functions = false;
            m.has_filenames = false;
            m.has_line_numbers = false;
            m.has_inline_frames = false;
        }
        m.id
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
            mapping_id: t.mapping(f),
            address: f.address.unwrap_or(0),
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

    #[test]
    fn mappings_carry_build_ids_and_unresolved_frames_their_addresses() {
        use crate::profile::Frame;
        let mut p = fixtures::profile();
        let lib = |build: &str, function: &str, resolved: bool, address| Frame {
            function: function.into(),
            module: Some("/usr/lib/libc.so.6".into()),
            build_id: Some(build.into()),
            address,
            resolved,
            ..Frame::default()
        };
        // Two builds of one path (two containers' libc): two mappings. One has an unresolved
        // frame, so pprof is told to symbolize it; the other is complete.
        p.frames
            .push(lib("aa11", "libc.so.6+0x1234", false, Some(0x1234)));
        p.frames.push(lib("aa11", "memcpy", true, None));
        p.frames.push(lib("bb22", "memcpy", true, None));
        for (stack, frame) in [(0, 6), (1, 7), (2, 8)] {
            p.stacks[stack].frames.push(frame);
        }
        let decoded = build(&p);
        let text = |i: i64| decoded.string_table[usize::try_from(i).unwrap()].as_str();
        let libc: Vec<&Mapping> = decoded
            .mapping
            .iter()
            .filter(|m| text(m.filename) == "/usr/lib/libc.so.6")
            .collect();
        assert_eq!(libc.len(), 2, "{:?}", decoded.mapping);
        let (a, b) = (libc[0], libc[1]);
        assert_eq!((text(a.build_id), text(b.build_id)), ("aa11", "bb22"));
        assert!(!a.has_functions && b.has_functions, "{libc:?}");
        assert_eq!(
            (a.memory_start, a.memory_limit, a.file_offset),
            (0, u64::MAX, 0)
        );
        let at = |address| {
            decoded
                .location
                .iter()
                .filter(|l| l.address == address)
                .count()
        };
        assert_eq!(at(0x1234), 1);
        // Resolved frames keep address 0: pprof leaves a location it cannot look up alone.
        assert_eq!(at(0), decoded.location.len() - 1);
        // The demo's own frames are all resolved but one: its mapping asks for symbols too.
        let demo = decoded
            .mapping
            .iter()
            .find(|m| text(m.filename) == "/bin/demo")
            .unwrap();
        assert!(!demo.has_functions);
        let kernel = decoded
            .mapping
            .iter()
            .find(|m| text(m.filename) == "[kernel]")
            .unwrap();
        assert_eq!((kernel.memory_limit, kernel.build_id), (0, 0));
    }
}
