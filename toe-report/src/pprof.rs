//! Merging pprof profiles of many targets and runs into one, the way `pprof -proto a b` does:
//! strings, mappings, functions and locations are re-interned into one table and samples keep
//! their stacks and labels, plus `target` and `run` labels so `pprof -tagfocus` can split again.
//!
//! The merge streams: each input's samples are encoded and compressed as soon as it is read, and
//! only the tables (which grow with distinct code locations, not with samples or inputs) stay in
//! memory. A protobuf message may carry its fields in any order and repeated fields concatenate,
//! so the samples written first and the tables written last decode as one `Profile`, by pprof's
//! reader and by prost alike. No two inputs' samples are summed: each carries its own `target`
//! and `run` labels, so only samples of one input can share a key.

use std::{
    collections::HashMap,
    io::{self, Read as _, Seek as _, Write as _},
};

use flate2::{Compression, write::GzEncoder};
use prost::Message as _;
pub use toe_artifacts::pprof::{decode, encode_gzip, totals};
use toe_artifacts::{
    pprof::Strings,
    proto::{Function, Label, Line, Location, Mapping, Profile, Sample, ValueType},
};

/// One input: gzipped (or plain) pprof bytes and where they came from.
pub struct Input<'a> {
    pub data: &'a [u8],
    pub target: &'a str,
    pub run: &'a str,
}

/// The merged profile and the inputs left out, each with its reason.
#[derive(Debug, Default)]
pub struct Merged {
    pub profile: Profile,
    pub skipped: Vec<String>,
}

type LabelKey = (i64, i64, i64, i64);
/// A location's identity: mapping, address, and (function, line, column) of each line.
type LocationKey = (u64, u64, Vec<(u64, i64, i64)>);

/// Merged pprof bytes stay in memory up to this size, then go to a temporary file.
pub const SPOOL_IN_MEMORY: usize = 8 << 20;

/// Samples encoded per write.
const BATCH: usize = 4096;

/// A merge in progress; see the module docs.
pub struct Merger {
    strings: Strings,
    sample_types: Vec<(String, String)>,
    /// The merged totals per sample type, to refuse a profile that would overflow them.
    totals: Vec<i128>,
    /// Everything but the samples, which go to `gz` as they come.
    out: Profile,
    functions: foldhash::HashMap<(i64, i64, i64, i64), u64>,
    mappings: foldhash::HashMap<(u64, u64, u64, i64, i64), u64>,
    locations: foldhash::HashMap<LocationKey, u64>,
    gz: GzEncoder<tempfile::SpooledTempFile>,
    inputs: usize,
    /// Why each left-out input was left out.
    pub skipped: Vec<String>,
}

impl Default for Merger {
    fn default() -> Self {
        Self {
            strings: Strings::default(),
            sample_types: Vec::new(),
            totals: Vec::new(),
            out: Profile::default(),
            functions: foldhash::HashMap::default(),
            mappings: foldhash::HashMap::default(),
            locations: foldhash::HashMap::default(),
            // Level 1: a merged profile is several times larger than any input, and the levels
            // above cost more time than the bytes they save are worth here.
            gz: GzEncoder::new(
                tempfile::spooled_tempfile(SPOOL_IN_MEMORY),
                Compression::fast(),
            ),
            inputs: 0,
            skipped: Vec::new(),
        }
    }
}

/// The index in a table of the entry with pprof id `id` (ids count from 1).
fn index(id: u64) -> usize {
    usize::try_from(id.wrapping_sub(1)).unwrap_or(usize::MAX)
}

fn string(p: &Profile, i: i64) -> &str {
    usize::try_from(i)
        .ok()
        .and_then(|i| p.string_table.get(i))
        .map_or("", String::as_str)
}

impl Merger {
    fn types(p: &Profile) -> Vec<(String, String)> {
        p.sample_type
            .iter()
            .map(|v| (string(p, v.r#type).to_owned(), string(p, v.unit).to_owned()))
            .collect()
    }

    fn add(&mut self, p: &Profile, target: &str, run: &str) -> Result<(), String> {
        let types = Self::types(p);
        // Checked before anything is taken from the profile: a sample whose values do not
        // match the types cannot be summed (go tool pprof refuses such profiles too), and a
        // profile without types would leave the merge without any.
        if types.is_empty() {
            return Err("it declares no sample types".into());
        }
        if let Some((i, s)) = p
            .sample
            .iter()
            .enumerate()
            .find(|(_, s)| s.value.len() != types.len())
        {
            return Err(format!(
                "its sample {i} has {} values for {} sample types",
                s.value.len(),
                types.len()
            ));
        }
        if !self.sample_types.is_empty() && types != self.sample_types {
            return Err(format!(
                "its sample types {types:?} differ from the first profile's {:?}",
                self.sample_types
            ));
        }
        // Captures count, they never subtract: with every value non-negative, no merged sample
        // can exceed the merged total, and a total that would not fit leaves the profile out
        // instead of saturating (the totals must stay the inputs' sums).
        let mut sums = vec![0i128; types.len()];
        for s in &p.sample {
            for (acc, &v) in sums.iter_mut().zip(&s.value) {
                if v < 0 {
                    return Err(format!("it has a negative sample value ({v})"));
                }
                *acc += i128::from(v);
            }
        }
        let totals: Vec<i128> = sums
            .iter()
            .enumerate()
            .map(|(i, v)| v + self.totals.get(i).copied().unwrap_or(0))
            .collect();
        if totals.iter().any(|&t| t > i128::from(i64::MAX)) {
            return Err("its values would overflow the merged totals".into());
        }
        self.totals = totals;
        if self.sample_types.is_empty() {
            self.sample_types.clone_from(&types);
            self.out.sample_type = types
                .iter()
                .map(|(t, u)| ValueType {
                    r#type: self.strings.get(t),
                    unit: self.strings.get(u),
                })
                .collect();
            if let Some(pt) = &p.period_type {
                self.out.period_type = Some(ValueType {
                    r#type: self.strings.get(string(p, pt.r#type)),
                    unit: self.strings.get(string(p, pt.unit)),
                });
                self.out.period = p.period;
            }
            self.out.default_sample_type = self.strings.get(string(p, p.default_sample_type));
            self.out.time_nanos = p.time_nanos;
        }
        if p.time_nanos > 0 && (self.out.time_nanos == 0 || p.time_nanos < self.out.time_nanos) {
            self.out.time_nanos = p.time_nanos;
        }
        self.out.duration_nanos = self.out.duration_nanos.max(
            p.time_nanos.saturating_add(p.duration_nanos) - self.out.time_nanos.min(p.time_nanos),
        );
        let functions: HashMap<u64, u64> = p
            .function
            .iter()
            .map(|f| (f.id, self.function(p, f)))
            .collect();
        let mappings: HashMap<u64, u64> = p
            .mapping
            .iter()
            .map(|m| (m.id, self.mapping(p, m)))
            .collect();
        let locations: HashMap<u64, u64> = p
            .location
            .iter()
            .map(|l| (l.id, self.location(l, &functions, &mappings)))
            .collect();
        let samples = self.samples(p, &locations, target, run);
        for batch in samples.chunks(BATCH) {
            let part = Profile {
                sample: batch.to_vec(),
                ..Profile::default()
            };
            self.gz
                .write_all(&part.encode_to_vec())
                .map_err(|e| format!("writing the merged profile: {e}"))?;
        }
        Ok(())
    }

    /// `p`'s samples on the merged tables, with `target` and `run` labels; samples of `p` with
    /// the same stack and labels summed.
    fn samples(
        &mut self,
        p: &Profile,
        locations: &HashMap<u64, u64>,
        target: &str,
        run: &str,
    ) -> Vec<Sample> {
        let (target_key, run_key) = (self.strings.get("target"), self.strings.get("run"));
        let (target, run) = (self.strings.get(target), self.strings.get(run));
        let mut samples: Vec<Sample> = Vec::new();
        // Samples by the hash of their stack and labels (keys are not cloned per sample); the
        // rare different sample with the same hash goes to `collided`, keyed in full.
        let hasher = foldhash::fast::RandomState::default();
        let mut index: foldhash::HashMap<u64, usize> = foldhash::HashMap::default();
        let mut collided: HashMap<(Vec<u64>, Vec<LabelKey>), usize> = HashMap::new();
        let same = |s: &Sample, stack: &[u64], labels: &[LabelKey]| {
            s.location_id == stack
                && s.label.len() == labels.len()
                && s.label
                    .iter()
                    .zip(labels)
                    .all(|(l, k)| (l.key, l.str, l.num, l.num_unit) == *k)
        };
        for s in &p.sample {
            let stack: Vec<u64> = s
                .location_id
                .iter()
                .map(|id| locations.get(id).copied().unwrap_or(0))
                .collect();
            let mut labels: Vec<LabelKey> = s
                .label
                .iter()
                .map(|l| {
                    (
                        self.strings.get(string(p, l.key)),
                        self.strings.get(string(p, l.str)),
                        l.num,
                        self.strings.get(string(p, l.num_unit)),
                    )
                })
                .collect();
            labels.push((target_key, target, 0, 0));
            labels.push((run_key, run, 0, 0));
            let next = samples.len();
            let hash = std::hash::BuildHasher::hash_one(&hasher, (&stack, &labels));
            let i = match index.get(&hash) {
                Some(&i) if same(&samples[i], &stack, &labels) => i,
                Some(_) => *collided
                    .entry((stack.clone(), labels.clone()))
                    .or_insert(next),
                None => {
                    index.insert(hash, next);
                    next
                }
            };
            if i == next {
                samples.push(Sample {
                    location_id: stack,
                    value: vec![0; self.sample_types.len()],
                    label: labels
                        .into_iter()
                        .map(|(key, str, num, num_unit)| Label {
                            key,
                            str,
                            num,
                            num_unit,
                        })
                        .collect(),
                });
            }
            for (acc, v) in samples[i].value.iter_mut().zip(&s.value) {
                // Cannot overflow: checked against the merged totals above.
                *acc += *v;
            }
        }
        samples
    }

    fn function(&mut self, p: &Profile, f: &Function) -> u64 {
        let key = (
            self.strings.get(string(p, f.name)),
            self.strings.get(string(p, f.system_name)),
            self.strings.get(string(p, f.filename)),
            f.start_line,
        );
        let next = self.out.function.len() as u64 + 1;
        let id = *self.functions.entry(key).or_insert(next);
        if id == next {
            self.out.function.push(Function {
                id,
                name: key.0,
                system_name: key.1,
                filename: key.2,
                start_line: key.3,
            });
        }
        id
    }

    fn mapping(&mut self, p: &Profile, m: &Mapping) -> u64 {
        let key = (
            m.memory_start,
            m.memory_limit,
            m.file_offset,
            self.strings.get(string(p, m.filename)),
            self.strings.get(string(p, m.build_id)),
        );
        let next = self.out.mapping.len() as u64 + 1;
        let id = *self.mappings.entry(key).or_insert(next);
        if id == next {
            self.out.mapping.push(Mapping {
                id,
                filename: key.3,
                build_id: key.4,
                ..*m
            });
        } else if let Some(kept) = self.out.mapping.get_mut(index(id)) {
            // Complete only if complete in every profile: a mapping with unsymbolized
            // locations anywhere says so, or pprof would not symbolize them later.
            kept.has_functions &= m.has_functions;
            kept.has_filenames &= m.has_filenames;
            kept.has_line_numbers &= m.has_line_numbers;
            kept.has_inline_frames &= m.has_inline_frames;
        }
        id
    }

    fn location(
        &mut self,
        l: &Location,
        functions: &HashMap<u64, u64>,
        mappings: &HashMap<u64, u64>,
    ) -> u64 {
        let lines: Vec<(u64, i64, i64)> = l
            .line
            .iter()
            .map(|x| {
                (
                    functions.get(&x.function_id).copied().unwrap_or(0),
                    x.line,
                    x.column,
                )
            })
            .collect();
        let mapping = mappings.get(&l.mapping_id).copied().unwrap_or(0);
        let key = (mapping, l.address, lines);
        let next = self.out.location.len() as u64 + 1;
        let id = *self.locations.entry(key.clone()).or_insert(next);
        if id == next {
            self.out.location.push(Location {
                id,
                mapping_id: mapping,
                address: l.address,
                line: key
                    .2
                    .iter()
                    .map(|&(function_id, line, column)| Line {
                        function_id,
                        line,
                        column,
                    })
                    .collect(),
                is_folded: l.is_folded,
            });
        }
        id
    }
}

impl Merger {
    /// Adds one input (gzipped or plain pprof bytes); an input that cannot be read or whose
    /// sample types differ from the first readable one's is left out, with its reason.
    pub fn push(&mut self, input: &Input<'_>) {
        let res = decode(input.data).and_then(|p| self.add(&p, input.target, input.run));
        match res {
            Ok(()) => self.inputs += 1,
            Err(why) => self
                .skipped
                .push(format!("{} ({}): {why}", input.target, input.run)),
        }
    }

    /// The merged profile, gzipped: in memory when small, else in a temporary file.
    pub fn finish(mut self) -> io::Result<tempfile::SpooledTempFile> {
        let comment = self
            .strings
            .get(&format!("merged by TOE from {} profiles", self.inputs));
        self.out.comment = vec![comment];
        self.out.string_table = std::mem::take(&mut self.strings).into_table();
        self.gz.write_all(&self.out.encode_to_vec())?;
        let mut file = self.gz.finish()?;
        file.rewind()?;
        Ok(file)
    }
}

/// Merges every input whose sample types match the first readable one's, in memory.
#[must_use]
pub fn merge(inputs: &[Input<'_>]) -> Merged {
    let mut m = Merger::default();
    for i in inputs {
        m.push(i);
    }
    let skipped = std::mem::take(&mut m.skipped);
    let mut bytes = Vec::new();
    let profile = m
        .finish()
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| e.to_string())
        .and_then(|_| decode(&bytes))
        .expect("a merge written to memory reads back");
    Merged { profile, skipped }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::fixtures;

    /// Profiles whose values cannot be summed into the merge are left out with the reason;
    /// the others' totals stay exact (the fuzzer found a profile without sample types that
    /// reset the merge's types and lost its values).
    #[test]
    fn profiles_that_cannot_be_summed_are_left_out_and_totals_stay_exact() {
        let profile = |types: usize, values: &[&[i64]]| {
            let mut p = Profile {
                string_table: vec![String::new(), "samples".into(), "count".into()],
                ..Profile::default()
            };
            p.sample_type = (0..types)
                .map(|_| ValueType { r#type: 1, unit: 2 })
                .collect();
            p.sample = values
                .iter()
                .map(|v| Sample {
                    value: v.to_vec(),
                    ..Sample::default()
                })
                .collect();
            p.encode_to_vec()
        };
        let cases = [
            ("no types", profile(0, &[&[220]])),
            ("good", profile(1, &[&[5], &[7]])),
            ("short", profile(1, &[&[1, 2]])),
            ("negative", profile(1, &[&[-3]])),
            ("huge", profile(1, &[&[i64::MAX]])),
            ("also good", profile(1, &[&[30]])),
        ];
        let inputs: Vec<Input<'_>> = cases
            .iter()
            .map(|(name, data)| Input {
                data,
                target: name,
                run: "r",
            })
            .collect();
        let merged = merge(&inputs);
        let skipped: Vec<&str> = merged
            .skipped
            .iter()
            .map(|s| s.split(" (").next().unwrap())
            .collect();
        assert_eq!(
            skipped,
            ["no types", "short", "negative", "huge"],
            "{merged:?}"
        );
        assert_eq!(
            totals(&decode(&encode_gzip(&merged.profile)).unwrap()),
            [42]
        );
    }

    #[test]
    fn merge_preserves_totals_and_labels_targets() {
        let a = fixtures::capture("cpu");
        let b = fixtures::capture("contend");
        let c = fixtures::capture("leak");
        let (pa, pb) = (&a.pprof["cpu.pb.gz"], &b.pprof["cpu.pb.gz"]);
        let inputs = [
            Input {
                data: pa,
                target: "web-0/app",
                run: "r1",
            },
            Input {
                data: pb,
                target: "web-1/app",
                run: "r1",
            },
            Input {
                data: &c.pprof["heap.pb.gz"],
                target: "web-2/app",
                run: "r1",
            },
        ];
        let merged = merge(&inputs);
        assert_eq!(
            merged.skipped.len(),
            1,
            "the heap profile has other sample types"
        );
        assert!(
            merged.skipped[0].contains("web-2/app"),
            "{:?}",
            merged.skipped
        );
        let want: Vec<i64> = totals(&decode(pa).unwrap())
            .iter()
            .zip(totals(&decode(pb).unwrap()))
            .map(|(x, y)| x + y)
            .collect();
        let round = decode(&encode_gzip(&merged.profile)).unwrap();
        assert_eq!(totals(&round), want);
        let p = &round;
        let index = |text: &str| {
            i64::try_from(p.string_table.iter().position(|s| s == text).unwrap()).unwrap()
        };
        let target_key = index("target");
        let web1 = index("web-1/app");
        let web1_total: i64 = p
            .sample
            .iter()
            .filter(|s| s.label.iter().any(|l| l.key == target_key && l.str == web1))
            .map(|s| s.value[0])
            .sum();
        assert_eq!(web1_total, totals(&decode(pb).unwrap())[0]);
        // Every referenced id exists.
        for s in &p.sample {
            for id in &s.location_id {
                assert!(p.location.iter().any(|l| l.id == *id));
            }
        }
    }

    #[test]
    fn a_mapping_unsymbolized_in_any_profile_stays_so_in_the_merge() {
        let a = fixtures::capture("cpu");
        let complete = decode(&a.pprof["cpu.pb.gz"]).unwrap();
        let mut partial = complete.clone();
        for m in &mut partial.mapping {
            m.has_functions = false;
        }
        let (ca, cb) = (encode_gzip(&complete), encode_gzip(&partial));
        let inputs = [
            Input {
                data: &ca,
                target: "web-0/app",
                run: "r1",
            },
            Input {
                data: &cb,
                target: "web-1/app",
                run: "r1",
            },
        ];
        let merged = merge(&inputs).profile;
        assert_eq!(merged.mapping.len(), complete.mapping.len());
        assert!(
            merged.mapping.iter().all(|m| !m.has_functions),
            "{merged:?}"
        );
    }
}
