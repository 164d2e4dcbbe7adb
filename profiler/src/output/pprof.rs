//! The pprof writer: our [`Profile`] as a gzip-compressed `profile.proto`
//! message (the reader is `profile::read`).
//!
//! pprof takes the first mapping for the main binary, so file mappings come
//! before the kernel's and pseudo ones (`[vdso]`, `[jit]`). Kernel frames
//! keep their plain function names: the `[kernel.kallsyms]` mapping marks
//! them, and `_[k]` is only how the other writers show them.
use std::{collections::HashMap, io::Write as _};

use prost::Message as _;

use crate::profile::{Frame, LabelValue, Location, Mapping, Profile, Sample, SampleType, proto};

/// Interns strings into pprof's string table (index 0 is "").
struct Strings {
    table: Vec<Vec<u8>>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Self {
            table: Vec::new(),
            index: HashMap::new(),
        };
        s.get("");
        s
    }

    fn get(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.as_bytes().to_vec());
        self.index.insert(s.to_owned(), i);
        i
    }

    /// 0 (the empty string) for "", else the index of `s`.
    fn get_or_zero(&mut self, s: &str) -> i64 {
        if s.is_empty() { 0 } else { self.get(s) }
    }

    fn value_type(&mut self, t: &SampleType) -> proto::ValueType {
        proto::ValueType {
            r#type: self.get(&t.kind),
            unit: self.get(&t.unit),
        }
    }
}

/// The profile as a gzip-compressed profile.proto message.
pub fn encode(profile: &Profile) -> anyhow::Result<Vec<u8>> {
    let message = to_proto(profile);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&message.encode_to_vec())?;
    Ok(gz.finish()?)
}

pub(crate) fn to_proto(profile: &Profile) -> proto::Profile {
    let mut strings = Strings::new();
    let sample_type = profile
        .sample_types
        .iter()
        .map(|t| strings.value_type(t))
        .collect();
    let (mut mapping, mapping_ids) = mappings(&profile.mappings, &mut strings);
    let mut functions = Functions::default();
    let location = profile
        .locations
        .iter()
        .enumerate()
        .map(|(i, loc)| {
            let mapping_id = loc.mapping.and_then(|m| mapping_ids.get(m).copied());
            if let Some(id) = mapping_id {
                note_symbols(&mut mapping[(id - 1) as usize], loc);
            }
            proto::Location {
                id: i as u64 + 1,
                mapping_id: mapping_id.unwrap_or(0),
                address: loc.address,
                line: loc
                    .frames
                    .iter()
                    .map(|f| proto::Line {
                        function_id: functions.id(f, &mut strings),
                        line: f.line,
                        column: 0,
                    })
                    .collect(),
                is_folded: false,
            }
        })
        .collect();
    let sample = profile
        .samples
        .iter()
        .map(|s| sample(s, &mut strings))
        .collect();
    let period_type = profile.period_type.as_ref().map(|t| strings.value_type(t));
    let comment = profile.comments.iter().map(|c| strings.get(c)).collect();
    let default_sample_type = strings.get_or_zero(&profile.default_sample_type);
    proto::Profile {
        sample_type,
        sample,
        mapping,
        location,
        function: functions.list,
        string_table: strings.table,
        time_nanos: profile.time_nanos,
        duration_nanos: profile.duration_nanos,
        period_type,
        period: profile.period,
        comment,
        default_sample_type,
        ..Default::default()
    }
}

/// The mappings in pprof's order (files first, see the module docs), and
/// the pprof id of each of ours.
fn mappings(mappings: &[Mapping], strings: &mut Strings) -> (Vec<proto::Mapping>, Vec<u64>) {
    let mut order: Vec<usize> = (0..mappings.len()).collect();
    // Stable: among files, and among the others, the profile's order stays.
    order.sort_by_key(|&m| mappings[m].is_kernel() || mappings[m].file.starts_with('['));
    let mut ids = vec![0; mappings.len()];
    let list = order
        .iter()
        .enumerate()
        .map(|(i, &m)| {
            ids[m] = i as u64 + 1;
            proto::Mapping {
                id: i as u64 + 1,
                memory_start: mappings[m].start,
                memory_limit: mappings[m].limit,
                file_offset: mappings[m].offset,
                filename: strings.get(&mappings[m].file),
                build_id: strings.get(&mappings[m].build_id),
                ..Default::default()
            }
        })
        .collect();
    (list, ids)
}

/// What a mapping's symbolized locations have (pprof's has_* flags).
fn note_symbols(m: &mut proto::Mapping, loc: &Location) {
    if loc.frames.is_empty() {
        return;
    }
    m.has_functions = true;
    m.has_filenames |= loc.frames.iter().any(|f| !f.file.is_empty());
    m.has_line_numbers |= loc.frames.iter().any(|f| f.line != 0);
    m.has_inline_frames |= loc.frames.len() > 1;
}

/// pprof functions, one per (name, file).
#[derive(Default)]
struct Functions {
    list: Vec<proto::Function>,
    ids: HashMap<(String, String), u64>,
}

impl Functions {
    fn id(&mut self, f: &Frame, strings: &mut Strings) -> u64 {
        let key = (f.function.clone(), f.file.clone());
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        let id = self.list.len() as u64 + 1;
        let name = strings.get(&key.0);
        self.list.push(proto::Function {
            id,
            name,
            system_name: name,
            filename: strings.get(&key.1),
            start_line: 0,
        });
        self.ids.insert(key, id);
        id
    }
}

fn sample(s: &Sample, strings: &mut Strings) -> proto::Sample {
    proto::Sample {
        location_id: s.locations.iter().map(|&l| l as u64 + 1).collect(),
        value: s.values.clone(),
        label: s
            .labels
            .iter()
            .map(|l| match &l.value {
                LabelValue::Str(v) => proto::Label {
                    key: strings.get(&l.key),
                    str: strings.get(v),
                    ..Default::default()
                },
                LabelValue::Num(n, unit) => proto::Label {
                    key: strings.get(&l.key),
                    num: *n,
                    num_unit: strings.get_or_zero(unit),
                    ..Default::default()
                },
            })
            .collect(),
    }
}
